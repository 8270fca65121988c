"""k-nearest-neighbour classification of frozen features by cosine similarity.

``k = 1`` is the plain nearest-neighbour rule.  For ``k > 1`` each of the ``k`` nearest training samples votes for
its label with weight ``exp(s / T)``, ``s`` its cosine similarity to the query (Wu et al. 2018, "Unsupervised
feature learning via non-parametric instance discrimination", eq. 8; the weighted k-NN of DINO, Caron et al. 2021),
and the class with the largest total wins (ties: the smallest class index).  Search is exact, through a FAISS
``IndexFlatIP`` over the L2-normalised training features (:mod:`dual_emc2.metrics.faiss_search`), in query batches.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dual_emc2.metrics.faiss_search import build_index, search


def _check_labels(y: Tensor, n: int, name: str) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D tensor of {n} labels, got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    if n and int(y.min()) < 0:
        raise ValueError(f"{name} must hold non-negative class labels, got minimum {int(y.min())}")
    return y.to("cpu", torch.int64)


def _check_features(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N, d] matrix, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
    return x.detach().to("cpu", torch.float32)


def _check_ks(ks: Sequence[int], n_train: int) -> list[int]:
    ks = list(ks)
    if not ks:
        raise ValueError("ks must list at least one neighbour count")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"ks must hold positive integers, got {k!r}")
        if k > n_train:
            raise ValueError(f"ks: k={k} exceeds the number of training samples ({n_train})")
    return sorted({int(k) for k in ks})


def knn_predict(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    *,
    ks: Sequence[int] = (1, 20),
    temperature: float = 0.07,
    batch_size: int = 4096,
    num_classes: int | None = None,
) -> dict[int, Tensor]:
    """Predicted test labels for every ``k`` in ``ks``: ``{k: [N_test] int64}`` (see the module docstring)."""
    train_x = _check_features(train_x, "train_x")
    test_x = _check_features(test_x, "test_x")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train_x has dimension {train_x.shape[1]} but test_x has {test_x.shape[1]}")
    train_y = _check_labels(train_y, train_x.shape[0], "train_y")
    ks = _check_ks(ks, train_x.shape[0])
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite positive number, got {temperature!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n_classes = int(train_y.max()) + 1
    if num_classes is not None:
        if num_classes < n_classes:
            raise ValueError(f"num_classes={num_classes} is smaller than the largest train label + 1 ({n_classes})")
        n_classes = int(num_classes)

    index = build_index(train_x.shape[1], "flat", metric="ip")
    index.add(F.normalize(train_x, dim=1))
    k_max = max(ks)
    preds: dict[int, list[Tensor]] = {k: [] for k in ks}
    for start in range(0, test_x.shape[0], batch_size):
        queries = F.normalize(test_x[start:start + batch_size], dim=1)
        sims, ids = search(index, queries, k_max)
        sims, ids = torch.from_numpy(sims), torch.from_numpy(ids)
        nbr_labels = train_y[ids]  # [b, k_max]
        # exp(s / T), shifted by the row maximum: the same argmax, no overflow for small T.
        weights = torch.exp((sims - sims[:, :1]) / temperature)
        for k in ks:
            if k == 1:
                preds[k].append(nbr_labels[:, 0])
                continue
            votes = torch.zeros(queries.shape[0], n_classes, dtype=torch.float32)
            votes.scatter_add_(1, nbr_labels[:, :k], weights[:, :k])
            preds[k].append(votes.argmax(dim=1))
    return {k: torch.cat(p) for k, p in preds.items()}


def knn_accuracy(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    ks: Sequence[int] = (1, 20),
    temperature: float = 0.07,
    batch_size: int = 4096,
) -> dict[str, float]:
    """Test accuracy of the k-NN classifier for each ``k`` in ``ks``: ``{"knn1_acc": ..., "knn20_acc": ...}``.

    Features are L2-normalised; ``k = 1`` is plain 1-NN, ``k > 1`` the ``exp(s / T)``-weighted vote.
    """
    test_x = _check_features(test_x, "test_x")
    test_y = _check_labels(test_y, test_x.shape[0], "test_y")
    preds = knn_predict(train_x, train_y, test_x, ks=ks, temperature=temperature, batch_size=batch_size)
    return {f"knn{k}_acc": float((p == test_y).double().mean()) for k, p in preds.items()}
