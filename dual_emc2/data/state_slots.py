"""EMC² chain-state views fetched with the batch, by the DataLoader's workers.

Each anchor of the training set is visited once per epoch, and only its own visit moves its chain, so the state every
anchor will need in an epoch is fixed when the epoch starts. The task hands a snapshot of the chains (candidate key and
view epoch per anchor key, :meth:`dual_emc2.loss.state.keyed.ChainState.views`) to these wrappers at every epoch start;
item i then carries, beside the batch inputs, the views its anchors' chains stand on, regenerated exactly: the
augmentation is seeded by (seed, state's epoch, sample), as the batch that drew the view was
(:class:`~dual_emc2.data.samplers.SeededViews`). The loss's
:meth:`~dual_emc2.loss.global_loss.GlobalContrastiveLoss.state_request` stays the truth: the task takes from the item
only the states the step asks for and regenerates any the snapshot did not foresee (:func:`match_slots`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from dual_emc2.data.pairs import PairSet
from dual_emc2.data.samplers import SeededViews

__all__ = ["ImageStateViews", "PairStateViews", "PairStateCollator", "match_slots", "select_rows"]


def _table(keys: Tensor | None, epochs: Tensor | None, n: int) -> tuple[Tensor, Tensor]:
    if keys is None:
        return torch.full((n,), -1, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
    if keys.shape != (n,) or epochs is None or epochs.shape != (n,):
        raise ValueError(f"chain-state table must hold {n} keys and epochs, got {tuple(keys.shape)}")
    return keys.long().cpu(), epochs.long().cpu()


class ImageStateViews(Dataset):
    """Item i of ``views`` (a :class:`SeededViews` over a :class:`~dual_emc2.data.views.MultiViewDataset`) plus the
    state view of each of its V anchors: ``(i, views [V, C, H, W], label, (keys [V], epochs [V], states [V, C, H, W]))``
    with key −1 (and a zero image) where an anchor has no state yet.

    Args:
        views: the seeded multi-view dataset of the training images.
        n_views: V, views (anchors) per image.

    Call :meth:`set_states` with the chains' snapshot at every epoch start (before the loader's workers start).

    Example::

        ds = ImageStateViews(SeededViews(MultiViewDataset(train_set, transform, n_views=2), seed=0), n_views=2)
        ds.set_epoch(epoch)
        ds.set_states(*emc2.state_views())                # (candidate key, view epoch) of every anchor key
        i, views, label, (keys, epochs, states) = ds[0]   # states: [2, 3, H, W], zero where keys == −1
    """

    def __init__(self, views: SeededViews, n_views: int) -> None:
        self.views, self.n_views = views, int(n_views)
        self.keys, self.epochs = _table(None, None, len(views) * self.n_views)

    def set_states(self, keys: Tensor, epochs: Tensor) -> None:
        """The chains' (candidate key, view epoch) of every anchor key ``i · V + v``, valid for this epoch."""
        self.keys, self.epochs = _table(keys, epochs, len(self.views) * self.n_views)

    def set_epoch(self, epoch: int) -> None:
        self.views.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.views)

    def state_view(self, key: int, epoch: int) -> Tensor:
        """The view of candidate key ``key`` (sample ``key // V``, view ``key % V``) drawn in ``epoch``, bit for bit."""
        sample, view = divmod(int(key), self.n_views)
        return self.views.at(sample, epoch, lambda: self.views.dataset.view(sample, view))

    def __getitem__(self, index: int) -> tuple[int, Tensor, int, tuple[Tensor, Tensor, Tensor]]:
        i, views, label = self.views[index]
        anchors = torch.arange(i * self.n_views, (i + 1) * self.n_views)
        keys, epochs = self.keys[anchors], self.epochs[anchors]
        states = torch.zeros_like(views)
        for v in range(self.n_views):
            if keys[v] >= 0:
                states[v] = self.state_view(int(keys[v]), int(epochs[v]))
        return i, views, label, (keys, epochs, states)

    def __getattr__(self, name: str) -> Any:
        if name == "views":
            raise AttributeError(name)
        return getattr(self.views, name)


class PairStateViews(Dataset):
    """Item k of ``dataset`` (``(index, x, y)``, a :class:`~dual_emc2.data.pairs.PairDataset`, optionally in
    :class:`SeededViews`) plus the states of the pair's two chains: ``(index, x, y, states)`` with
    ``states = ((key, epoch, x value or None), (key, epoch, y value or None))``: the x→y chain stands on a y sample,
    the y→x chain on an x sample; a key is a global pair index (−1: no state yet).

    Args:
        dataset: the pair dataset, item ``k`` → ``(index, x, y)``.
        pairs: its :class:`~dual_emc2.data.pairs.PairSet` (to find a state's pair by global index).

    Example::

        ds = PairStateViews(PairDataset(pairs), pairs)
        ds.set_states(x=loss_fn.estimator.y_to_x.state_views(), y=loss_fn.estimator.x_to_y.state_views())
        index, x, y, ((kx, ex, x_state), (ky, ey, y_state)) = ds[0]
        loader = DataLoader(ds, batch_size=64, collate_fn=PairStateCollator(prepare_x, prepare_y))
    """

    def __init__(self, dataset: Any, pairs: PairSet) -> None:
        self.dataset, self.pairs = dataset, pairs
        n = int(pairs.num_keys)
        self.tables = {"x": _table(None, None, n), "y": _table(None, None, n)}

    def set_states(self, x: tuple[Tensor, Tensor] | None, y: tuple[Tensor, Tensor] | None) -> None:
        """``y``: (candidate key, epoch) of every x→y chain by anchor index (states on y samples); ``x``: the y→x
        chains (states on x samples)."""
        n = int(self.pairs.num_keys)
        self.tables = {"x": _table(*(x or (None, None)), n), "y": _table(*(y or (None, None)), n)}

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.dataset, SeededViews):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def state_value(self, side: str, key: int, epoch: int) -> Any:
        """Side ``side`` of the pair with global index ``key`` as the batch of ``epoch`` saw it (augmentations
        replayed from their seed)."""
        position = int(self.pairs.position_of([int(key)])[0])
        if isinstance(self.dataset, SeededViews):
            item = self.dataset.at(position, epoch, lambda: self.dataset.dataset[position])
        else:
            item = self.dataset[position]
        return item[1] if side == "x" else item[2]

    def __getitem__(self, index: int) -> tuple[int, Any, Any, tuple[tuple[int, int, Any], tuple[int, int, Any]]]:
        i, x, y = self.dataset[index]
        states = []
        for side in ("x", "y"):
            keys, epochs = self.tables[side]
            key, epoch = int(keys[i]), int(epochs[i])
            states.append((key, epoch, self.state_value(side, key, epoch) if key >= 0 else None))
        return i, x, y, (states[0], states[1])

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class PairStateCollator:
    """``[(index, x, y, states), ...]`` → ``(ids [b], x_inputs, y_inputs, slots)``: each side prepared once with the
    batch's values first and then the present states' values (one tokenisation, one image stack), and
    ``slots = {"x": (keys [S], epochs [S], values), "y": ...}`` naming the state rows (rows b … b+S−1 of that side's
    inputs, values kept for a re-preparation should the step ask for states the snapshot did not foresee).

    Args:
        prepare_x, prepare_y: collate one side's items (a tower's ``prepare``).

    Example::

        collate = PairStateCollator(model.x_tower.prepare, model.y_tower.prepare)
        ids, x_inputs, y_inputs, slots = collate([ds[0], ds[1]])
        keys, epochs, _ = slots["y"]                      # the y rows after the batch's: x→y chain states
    """

    def __init__(self, prepare_x: Callable[[list[Any]], Any], prepare_y: Callable[[list[Any]], Any]) -> None:
        self.prepare = {"x": prepare_x, "y": prepare_y}

    def __call__(self, items: list[tuple[int, Any, Any, Any]]) -> tuple[Tensor, Any, Any, dict[str, Any]]:
        ids = torch.tensor([int(it[0]) for it in items], dtype=torch.int64)
        out, slots = {}, {}
        for s, side in enumerate(("x", "y")):
            batch = [it[1 + s] for it in items]
            present = [it[3][s] for it in items if it[3][s][0] >= 0]
            values = [v for _, _, v in present]
            out[side] = self.prepare[side](batch + values)
            slots[side] = (torch.tensor([k for k, _, _ in present], dtype=torch.int64),
                           torch.tensor([e for _, e, _ in present], dtype=torch.int64), batch + values)
        return ids, out["x"], out["y"], slots


def match_slots(want_keys: Tensor, want_epochs: Tensor, have_keys: Tensor, have_epochs: Tensor) -> Tensor:
    """Position in ``have`` of every wanted (key, epoch) pair, −1 where the item does not carry it."""
    want_keys, want_epochs = want_keys.cpu().long(), want_epochs.cpu().long()
    have_keys, have_epochs = have_keys.cpu().long().reshape(-1), have_epochs.cpu().long().reshape(-1)
    if have_keys.numel() == 0 or want_keys.numel() == 0:
        return torch.full_like(want_keys, -1)
    scale = int(max(have_epochs.max(), want_epochs.max(), 0)) + 1
    have_code = torch.where(have_keys >= 0, have_keys * scale + have_epochs, torch.full_like(have_keys, -1))
    want_code = want_keys * scale + want_epochs
    order = torch.argsort(have_code, stable=True)
    srt = have_code[order]
    pos = torch.searchsorted(srt, want_code).clamp(max=srt.numel() - 1)
    return torch.where(srt[pos] == want_code, order[pos], torch.full_like(pos, -1))


def select_rows(inputs: Any, rows: Tensor) -> Any:
    """Rows ``rows`` of prepared tower inputs: a tensor, or a mapping of tensors (a tokenizer's output)."""
    if isinstance(inputs, Tensor):
        return inputs[rows.to(inputs.device)]
    if hasattr(inputs, "items"):
        return {k: select_rows(v, rows) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    raise TypeError(f"cannot select rows of tower inputs of type {type(inputs).__name__}")
