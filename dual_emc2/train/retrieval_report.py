"""Retrieval evaluation of a two-tower model on held-out pairs, both directions, searched with FAISS."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dual_emc2.data.pairs import PairSet, relevant_sets
from dual_emc2.metrics.faiss_search import build_index
from dual_emc2.metrics.retrieval import retrieval_metrics
from dual_emc2.towers.two_tower import TwoTowerModel, check_modalities

__all__ = ["retrieval_both_directions", "retrieval_report"]


def retrieval_both_directions(
    zx: Tensor | np.ndarray, zy: Tensor | np.ndarray, relevant: Sequence[set[int]], *, ks: Sequence[int] = (1, 5, 10),
    ndcg_k: int = 10, index: str = "flat", use_gpu: str | bool = "auto", **index_options: Any,
) -> dict[str, float]:
    """Recall@k, recall_all@k, MRR (over the top max(ks, ndcg_k) ranks) and nDCG@``ndcg_k`` of x→y (queries ``zx``
    against documents ``zy``) and y→x, searched with a FAISS inner-product index (``index``: ``flat`` exact, ``ivf``
    or ``hnsw``).  ``relevant[i]``:
    positions relevant to query i (symmetric relation, e.g. :func:`~dual_emc2.data.pairs.relevant_sets`).
    Cut-offs larger than the corpus are dropped (``ndcg_k`` is clamped).  Keys: ``x2y_recall@1`` ..."""
    n = int(zx.shape[0])
    if n == 0 or int(zy.shape[0]) != n:
        raise ValueError(f"need as many x as y embeddings (> 0), got {n} and {int(zy.shape[0])}")
    ks = [k for k in ks if k <= n] or [1]
    ndcg_k = min(ndcg_k, n)
    depth = max(max(ks), ndcg_k)
    out: dict[str, float] = {}
    for name, queries, docs in (("x2y", zx, zy), ("y2x", zy, zx)):
        dim = int(docs.shape[1])
        idx = build_index(dim, index, metric="ip", use_gpu=use_gpu, **index_options)
        idx.add(docs)
        _, ranked = idx.search(queries, depth)
        for key, value in retrieval_metrics(ranked, relevant, ks, ndcg_k=ndcg_k).items():
            out[f"{name}_{key}"] = value
    return out


def retrieval_report(model: TwoTowerModel, pairs: PairSet, *, batch_size: int = 256,
                     device: torch.device | str = "cpu", image_size: int | None = None, index: str = "flat",
                     ks: Sequence[int] = (1, 5, 10), ndcg_k: int = 10, **index_options: Any) -> dict[str, float]:
    """Embed both sides of ``pairs`` with ``model`` and evaluate retrieval in both directions; queries with the
    same x (or y) as other pairs have all those pairs' documents as relevant."""
    check_modalities(model, pairs)
    zx = model.embed("x", pairs.x, batch_size=batch_size, device=device, image_size=image_size)
    zy = model.embed("y", pairs.y, batch_size=batch_size, device=device, image_size=image_size)
    return retrieval_both_directions(zx, zy, relevant_sets(pairs), ks=ks, ndcg_k=ndcg_k, index=index,
                                     **index_options)
