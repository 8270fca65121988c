"""Frozen-feature evaluation of an image encoder: linear probe and k-NN on backbone features (before the projector),
as in EMC² section 4 (LP and 1-NN accuracy)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from dual_emc2.data.augment import eval_transform
from dual_emc2.data.image_sets import build_image_dataset, dataset_info, dataset_stats
from dual_emc2.data.views import EvalDataset
from dual_emc2.metrics.geometry import geometry_metrics, plot_spectra, singular_values
from dual_emc2.metrics.knn import knn_accuracy
from dual_emc2.metrics.probe import extract_features, linear_probe


def eval_loaders(name: str, root: str | None, train_split: str, test_split: str, image_size: int, *,
                 batch_size: int = 256, num_workers: int = 0, max_train: int | None = None,
                 max_test: int | None = None, download: bool = False) -> tuple[DataLoader, DataLoader]:
    """Loaders of (index, eval-transformed image, label) for the probe's train and test splits."""
    mean, std = dataset_stats(name)
    resize = dataset_info(name).eval_resize
    tf = eval_transform(image_size, mean, std, resize=resize if resize and resize >= image_size else None)
    out = []
    for split, cap in ((train_split, max_train), (test_split, max_test)):
        base = build_image_dataset(name, split, root=root, download=download)
        n = None if cap is None else min(cap, len(base))
        out.append(DataLoader(EvalDataset(base, tf, first_n=n), batch_size=batch_size, shuffle=False,
                              num_workers=num_workers))
    return out[0], out[1]


def evaluate_features(features: Callable[[Tensor], Tensor], train_loader: DataLoader, test_loader: DataLoader,
                      device: torch.device | str, *, probe_epochs: int = 100, knn_k: Sequence[int] = (1, 20),
                      seed: int = 0, geometry: bool = False, spectrum_png: str | Path | None = None
                      ) -> dict[str, float]:
    """Linear-probe and k-NN accuracy of ``features`` (e.g. ``encoder.features``) on frozen train/test features.

    ``geometry``: also the collapse measures of the test features (dual_emc2.metrics.geometry):
    ``geo_effective_rank``, ``geo_nc1``, ``geo_etf_distance``, ``geo_uniformity``; ``spectrum_png``: a plot of their
    singular-value spectrum."""
    module = getattr(features, "__self__", None)
    was_training = bool(getattr(module, "training", False))
    if module is not None:
        module.eval()
    try:
        xtr, ytr = extract_features(features, train_loader, device)
        xte, yte = extract_features(features, test_loader, device)
    finally:
        if module is not None:
            module.train(was_training)
    ks = [k for k in knn_k if k <= xtr.shape[0]]
    metrics = knn_accuracy(xtr, ytr, xte, yte, ks=ks)
    if probe_epochs > 0:
        metrics |= linear_probe(xtr, ytr, xte, yte, epochs=probe_epochs, seed=seed, device=device)
    if geometry:
        geo = geometry_metrics(xte, yte, seed=seed)
        metrics |= {f"geo_{k}": geo[k] for k in ("effective_rank", "nc1", "etf_distance", "uniformity")}
        if spectrum_png is not None:
            plot_spectra({"backbone features (test)": singular_values(xte)}, spectrum_png,
                         title="singular values of the frozen features")
    return metrics
