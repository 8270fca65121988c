"""Dataset wrappers that attach the global sample id to every item.

The id of an item is its position in the base :class:`~dual_emc2.data.image_sets.ImageSet` (after an optional
``first_n`` truncation, which keeps ids ``0..n-1``).  It depends only on the files on disk, never on the epoch,
shuffling, the number of processes or workers, so it can key per-sample estimator state (EMC² chain states Z_i,
SogCLR's u_i; docs/DESIGN.md, section 3).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dual_emc2.data.data_errors import UnreadableSample
from dual_emc2.data.image_sets import ImageSet

Transform = Callable[[Image.Image], Tensor]


class FirstN(ImageSet):
    """The first ``n`` samples of ``base``, with the same ids 0..n-1 (smoke runs, the paper's 500-image check).

    Args:
        base: the full :class:`~dual_emc2.data.image_sets.ImageSet`.
        n: samples kept, in [1, len(base)] (config key ``data.first_n``).

    Example::

        small = FirstN(build_image_dataset("mnist", "train"), 500)
        len(small), small.labels().shape                # (500, (500,))
    """

    def __init__(self, base: ImageSet, n: int) -> None:
        if not 1 <= int(n) <= len(base):
            raise ValueError(f"data.first_n must lie in [1, {len(base)}] (size of {base.name}/{base.split}), got {n}")
        self.base, self.n = base, int(n)
        self.name, self.split, self.classes, self.image_size = base.name, base.split, base.classes, base.image_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.base[self._check_index(index)]

    def labels(self) -> np.ndarray:
        return self.base.labels()[: self.n]


def take_first(base: ImageSet, first_n: int | None) -> ImageSet:
    """``base`` itself when ``first_n`` is None, else :class:`FirstN` of it."""
    return base if first_n is None else FirstN(base, first_n)


def _position(index: int, size: int) -> int:
    i = int(index)
    if not 0 <= i < size:
        raise IndexError(f"sample id {i} out of range for a dataset of size {size}")
    return i


def _as_tensor(x: object, where: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: the transform must return a Tensor [3, H, W], got {type(x).__name__}; end it with "
                        "ToImage/ToDtype (see dual_emc2.data.augment)")
    return x


class MultiViewDataset(Dataset):
    """Item ``i`` -> ``(i, views [n_views, 3, H, W], label)``: ``n_views`` independent draws of ``transform`` of
    ``base[i]``; ``i`` is the global sample id (position in ``base``).  The default collate gives
    ``(ids [b], views [b, n_views, 3, H, W], labels [b])``.

    ``on_error="raise"`` (default) lets an unreadable sample stop the run with its file named;
    ``on_error="skip"`` replaces it by the next readable sample (that sample's id is returned), warns, and counts it
    in :attr:`bad_samples` (shared with loader worker processes).

    Args:
        base: the :class:`~dual_emc2.data.image_sets.ImageSet`.
        transform: PIL RGB → Tensor [3, H, W], random (e.g. ``AugmentConfig.simclr(mean, std)``).
        n_views: views per item, ≥ 1.
        first_n: keep the first ``n`` samples only (:class:`FirstN`), or None.
        on_error: ``"raise"`` or ``"skip"`` (config key ``data.on_bad_sample``).

    Example::

        ds = MultiViewDataset(build_image_dataset("stl10", "train", root="data"), AugmentConfig(size=96).simclr(
            *dataset_stats("stl10")), n_views=2)
        ids, views, labels = next(iter(DataLoader(ds, batch_size=4)))   # [4], [4, 2, 3, 96, 96], [4]
        z = encoder(views.flatten(0, 1))                 # image-major: what unimodal_contrastive_batch expects
    """

    def __init__(self, base: ImageSet, transform: Transform, n_views: int = 2, first_n: int | None = None,
                 on_error: str = "raise") -> None:
        if int(n_views) < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_bad_sample must be 'raise' or 'skip', got {on_error!r}")
        self.base = take_first(base, first_n)
        self.transform, self.n_views, self.on_error = transform, int(n_views), on_error
        self._bad = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def bad_samples(self) -> int:
        """Unreadable samples skipped so far (all loader workers together)."""
        return int(self._bad)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[int, Tensor, int]:
        i = _position(index, len(self.base))
        for _ in range(len(self.base)):
            try:
                img, label = self.base[i]
                break
            except UnreadableSample as e:
                if self.on_error == "raise":
                    raise
                self._bad += 1
                warnings.warn(f"{e.what or e}; skipped (data.on_bad_sample=skip), using sample "
                              f"{(i + 1) % len(self.base)}", stacklevel=2)
                i = (i + 1) % len(self.base)
        else:
            raise UnreadableSample(f"no readable sample in {self.base.name}/{self.base.split}: every image failed to "
                                   "decode (data.on_bad_sample=skip skipped them all); check the data folder")
        views = [_as_tensor(self.transform(img), "MultiViewDataset") for _ in range(self.n_views)]
        return i, torch.stack(views), int(label)

    def view(self, index: int, view: int) -> Tensor:
        """View ``view`` of sample ``index`` as :meth:`__getitem__` draws it from the same RNG state (the draws of
        the views before it are made and dropped), so a seeded item's view is regenerated bit for bit."""
        if not 0 <= int(view) < self.n_views:
            raise IndexError(f"view {view} out of range for {self.n_views} views")
        img, _ = self.base[_position(index, len(self.base))]
        for _ in range(int(view)):
            self.transform(img)
        return _as_tensor(self.transform(img), "MultiViewDataset")

    def labels(self) -> np.ndarray:
        return self.base.labels()


class EvalDataset(Dataset):
    """Item ``i`` -> ``(i, transform(base[i] image), label)`` for feature extraction (linear probe, k-NN).

    Args:
        base: the :class:`~dual_emc2.data.image_sets.ImageSet`.
        transform: the deterministic evaluation transform (e.g. ``AugmentConfig.eval(mean, std)``).
        first_n: keep the first ``n`` samples only, or None.

    Example::

        test = EvalDataset(build_image_dataset("mnist", "test"), AugmentConfig(size=28).eval(*dataset_stats("mnist")))
        i, image, label = test[0]                        # 0, [3, 28, 28], int
    """

    def __init__(self, base: ImageSet, transform: Transform, first_n: int | None = None) -> None:
        self.base = take_first(base, first_n)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[int, Tensor, int]:
        i = _position(index, len(self.base))
        img, label = self.base[i]
        return i, _as_tensor(self.transform(img), "EvalDataset"), int(label)

    def labels(self) -> np.ndarray:
        return self.base.labels()


class UnaugmentedLookup:
    """``lookup(ids) -> Tensor [n, 3, H, W]``: the un-augmented (``transform`` = evaluation transform) images of the
    given global ids, on ``ids.device``.  EMC² uses it to re-encode chain states that lie outside the current batch
    (docs/DESIGN.md, "State policies").  Repeated ids are decoded once.

    Args:
        base: the :class:`~dual_emc2.data.image_sets.ImageSet` (the training set).
        transform: the evaluation transform.
        first_n: keep the first ``n`` samples only, or None.

    Call: ``lookup(ids)`` with a 1-d integer tensor [n] → images [n, 3, H, W] on ``ids.device``.

    Example::

        lookup = UnaugmentedLookup(train_set, AugmentConfig(size=96).eval(*dataset_stats("stl10")))
        encode = lambda ids: encoder(lookup(ids))        # ids → [n, d]: an estimator's encode_candidates
    """

    def __init__(self, base: ImageSet, transform: Transform, first_n: int | None = None) -> None:
        self.base = take_first(base, first_n)
        self.transform = transform
        self._shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.base)

    def image(self, sample_id: int) -> Tensor:
        """Evaluation-transformed image [3, H, W] of one global id."""
        img, _ = self.base[_position(sample_id, len(self.base))]
        x = _as_tensor(self.transform(img), "UnaugmentedLookup")
        self._shape = tuple(x.shape)
        return x

    def __call__(self, ids: Tensor) -> Tensor:
        if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex \
                or ids.dtype == torch.bool:
            raise TypeError(f"UnaugmentedLookup: ids must be an integer Tensor, got "
                            f"{ids.dtype if isinstance(ids, Tensor) else type(ids).__name__}")
        if ids.dim() != 1:
            raise ValueError(f"UnaugmentedLookup: ids must be 1-d [n], got shape {tuple(ids.shape)}")
        flat = ids.detach().cpu().to(torch.int64)
        n = len(self.base)
        if flat.numel():
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi >= n:
                raise IndexError(f"UnaugmentedLookup: sample id {lo if lo < 0 else hi} out of range for a dataset of "
                                 f"size {n} ({self.base.name}/{self.base.split})")
        else:
            if self._shape is None:
                self.image(0)
            return torch.empty((0, *self._shape), device=ids.device)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        images = torch.stack([self.image(int(u)) for u in uniq.tolist()])
        return images[inverse].to(ids.device)
