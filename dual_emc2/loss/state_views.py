"""The chain states a step needs, named before the step so the caller can encode them *with the batch*.

An EMC² chain state is a candidate *view*: a sample id, which of its views, and the epoch whose augmentation drew it.
Before the forward pass the loss says which states its next call needs (:class:`StateViews`, one per tower side in a
:class:`StateRequest`); the caller regenerates exactly those views with the transform the batch uses, runs them
through the model in the batch's own forward (same train mode, same normalisation statistics), and passes their
features to the call.  The state is then a member of D_neg scored by the same function as the batch
(docs/DESIGN.md, "States seen as the batch sees them").
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["StateRequest", "StateViews"]


@dataclass(frozen=True)
class StateViews:
    """Views to encode beside the batch, in the order their features must be passed.

    ids:    [n] int64 dataset index of each sample.
    views:  [n] int64 which view of the sample (0 … V−1 for V augmented views per image; 0 for pairs).
    epochs: [n] int64 the epoch whose augmentation drew the view (0 where inputs do not change between epochs).

    Iterating yields ``(id, view, epoch)`` as Python ints.

    Example::

        views = StateViews(torch.tensor([4, 9]), torch.tensor([1, 0]), torch.tensor([2, 2]))
        images = torch.stack([augment(dataset[i], view=v, epoch=e) for i, v, e in views])   # encode with the batch
    """

    ids: Tensor
    views: Tensor
    epochs: Tensor

    def __post_init__(self) -> None:
        n = self.ids.shape[0] if self.ids.dim() == 1 else -1
        if n < 0 or self.views.shape != (n,) or self.epochs.shape != (n,):
            raise ValueError(f"StateViews: ids, views and epochs must be [n] each, got {tuple(self.ids.shape)}, "
                             f"{tuple(self.views.shape)}, {tuple(self.epochs.shape)}")

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> StateViews:
        z = torch.zeros(0, dtype=torch.int64, device=device)
        return StateViews(z, z.clone(), z.clone())

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return iter(zip(self.ids.tolist(), self.views.tolist(), self.epochs.tolist()))


@dataclass(frozen=True)
class StateRequest:
    """What the next call of a loss needs encoded, by tower: ``x`` with φ (the x tower), ``y`` with ψ (the y tower).

    Bimodal: the x→y chains stand on y samples (``y``), the y→x chains on x samples (``x``).  Unimodal (one tower):
    every state is a view of an image, all in ``y``; ``x`` is empty.  Pass their features as ``state_x`` /
    ``state_y``, one row per entry in this order.

    Args:
        x: the states to encode with the x tower (φ).
        y: the states to encode with the y tower (ψ).

    Example::

        need = loss_fn.state_request(index, epoch=epoch)      # loss_fn: a GlobalContrastiveLoss
        x = model.encode_image(torch.cat([images, load_images(need.x)]), normalize=True)
        y = model.encode_text(torch.cat([texts, load_texts(need.y)]), normalize=True)
        b = index.numel()
        loss = loss_fn(x[:b], y[:b], index, 10.0, epoch=epoch, state_x=x[b:], state_y=y[b:])
    """

    x: StateViews
    y: StateViews

    def __len__(self) -> int:
        return len(self.x) + len(self.y)
