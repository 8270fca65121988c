"""Global batches that do not depend on the number of processes, and per-sample seeded augmentations.

A run with W processes of ``b`` samples each must see exactly the global batches of a single process with
``W·b`` samples (docs/DESIGN.md, section 3): the epoch permutation is drawn from ``(seed, epoch)`` only, global batch
``t`` is ``perm[t·W·b : (t+1)·W·b]`` and process ``r`` takes the ``r``-th slice of it.  Augmentations are drawn from a
generator seeded by ``(seed, epoch, index)`` so views do not depend on workers, processes or resume point.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch.utils.data import Dataset, Sampler

T = TypeVar("T")


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this process's slice of each global batch; ``drop_last`` always (every batch has ``W·b`` samples).

    ``set_epoch(e, start_batch=k)`` positions the sampler at global batch ``k`` of epoch ``e`` (exact resume).

    Args:
        num_samples: dataset size N; at least one global batch.
        batch_size: b, samples per process and batch.
        world_size, rank: W processes, this one's rank.
        seed: seed of the epoch permutations.
        shuffle: False keeps the dataset order.

    It also answers the trainer's batch-sampler hooks (``refresh_due``, ``refresh``, ``state_dict``,
    ``load_state_dict``), with nothing to refresh or save.

    Example::

        sampler = GlobalBatchSampler(len(ds), 64, world_size=2, rank=1, seed=0)
        sampler.set_epoch(3, start_batch=10)             # resume at global batch 10 of epoch 3
        loader = DataLoader(ds, batch_sampler=sampler)
    """

    def __init__(self, num_samples: int, batch_size: int, *, world_size: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, got {batch_size}")
        if num_samples < batch_size * world_size:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch of "
                f"{batch_size} x {world_size} processes; lower train.batch_size or use more data"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.num_samples, self.batch_size, self.world_size, self.rank = num_samples, batch_size, world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order(self.epoch)
        G = self.global_batch
        for t in range(self.start_batch, self.batches_per_epoch()):
            glob = order[t * G:(t + 1) * G]
            yield glob[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start_batch

    # ---------------------------------------------------------------------------- what the trainer asks every sampler
    def refresh_due(self, step: int) -> bool:
        """Whether the batches are to be regrouped before optimiser step ``step`` (never for the reshuffle)."""
        return False

    def refresh(self, embed: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]], *, step: int,
                beta: float | None, chunk: int, device: torch.device | str = "cpu") -> None:
        """Regroup the batches to come from the embeddings ``embed(positions) -> (u, v or None)`` of every training
        sample (nothing to do for the reshuffle)."""

    def state_dict(self) -> dict[str, Any] | None:
        """What decides the batches still to come beyond (seed, epoch, position): nothing for the reshuffle."""
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            raise ValueError("the checkpoint holds a spectral sampler's state (data.batch_sampler=spectral); resume "
                             "it with the batch sampler it was trained with")


class SeededViews(Dataset):
    """Wraps a dataset whose ``__getitem__`` draws random augmentations from torch's global RNG; seeds that RNG per
    item from ``(seed, epoch, index)`` inside a forked RNG scope, so the training RNG is left untouched.

    Args:
        dataset: the wrapped dataset (its other attributes are reachable through the wrapper).
        seed: the run's seed.

    Example::

        views = SeededViews(MultiViewDataset(images, transform, n_views=2), seed=0)
        views.set_epoch(1)
        a = views[5]
        b = views.at(5, 1, lambda: views.dataset[5])     # the same views again: equal to a
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.at(index, self.epoch, lambda: self.dataset[index])

    def at(self, index: int, epoch: int, draw: Callable[[], T]) -> T:
        """``draw()`` with the RNG of item ``index`` in ``epoch``: regenerates what that epoch's item drew (an EMC²
        chain state is such a view, :mod:`dual_emc2.data.state_slots`)."""
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (what the transforms draw from): torch.manual_seed would also queue a lazy CUDA
            # seeding, with a stack trace, on every item of a CUDA build
            torch.default_generator.manual_seed((self.seed * 1_000_003 + int(epoch)) * 10_000_019 + int(index))
            return draw()

    def __getattr__(self, name: str):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
