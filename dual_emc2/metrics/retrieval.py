"""Ranking metrics for query → document retrieval with one or more relevant documents per query.

Input is the ranked document ids of every query (``[Q, K]``, best first, e.g. the ``ids`` of
:func:`dual_emc2.metrics.faiss_search.search`; id ``-1`` marks an empty slot and is never relevant) and the set of
relevant document ids of every query.  With ``hit[q, r] = 1`` when the document at rank ``r`` (0-based) of query ``q``
is relevant and ``n_q`` the number of relevant documents of ``q``:

* ``recall@k``     = mean_q 1[Σ_{r<k} hit[q, r] ≥ 1]  (R@k of image–text retrieval: at least one positive found)
* ``recall_all@k`` = mean_q Σ_{r<k} hit[q, r] / n_q   (fraction of the relevant documents found)
* ``mrr``          = mean_q 1 / (1 + first r with hit[q, r]), 0 when none is in the K ranks
* ``ndcg@n``       = mean_q DCG_q / IDCG_q with binary gains, DCG_q = Σ_{r<n} hit[q, r] / log2(r + 2) and
                     IDCG_q = Σ_{r<min(n_q, n)} 1 / log2(r + 2) (the ideal ranking puts all relevant docs first)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _relevant_pairs(relevant: Any, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Flatten the relevance judgements into (query, doc) pairs and per-query counts."""
    if hasattr(relevant, "tocsr"):  # scipy.sparse matrix [Q, n_docs], nonzero = relevant
        csr = relevant.tocsr(copy=True)
        csr.eliminate_zeros()
        csr.sum_duplicates()
        if csr.shape[0] != n_queries:
            raise ValueError(f"relevant has {csr.shape[0]} rows but ranked_ids has {n_queries} queries")
        counts = np.diff(csr.indptr).astype(np.int64)
        docs = csr.indices.astype(np.int64)
    else:
        if not isinstance(relevant, Sequence) or isinstance(relevant, (str, bytes)):
            raise TypeError(f"relevant must be a list of sets of document ids or a scipy CSR matrix, "
                            f"got {type(relevant).__name__}")
        if len(relevant) != n_queries:
            raise ValueError(f"relevant has {len(relevant)} entries but ranked_ids has {n_queries} queries")
        rel_sets = []
        for q, rel in enumerate(relevant):
            try:
                ids = {int(d) for d in rel}
            except (TypeError, ValueError) as err:
                raise TypeError(f"relevant[{q}] must be a collection of integer document ids, got {rel!r}") from err
            if any(d < 0 for d in ids):
                raise ValueError(f"relevant[{q}] holds a negative document id: {sorted(ids)[:5]}")
            rel_sets.append(ids)
        counts = np.array([len(s) for s in rel_sets], dtype=np.int64)
        docs = np.fromiter((d for s in rel_sets for d in sorted(s)), dtype=np.int64, count=int(counts.sum()))
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(f"relevant: {empty.size} queries have no relevant document (first: query {empty[0]}); "
                         "recall and nDCG are undefined for them, drop them before evaluating")
    queries = np.repeat(np.arange(n_queries, dtype=np.int64), counts)
    return np.stack([queries, docs]), counts


def hit_matrix(ranked_ids: np.ndarray, relevant: Any) -> tuple[np.ndarray, np.ndarray]:
    """``hit[q, r]`` (bool ``[Q, K]``: rank ``r`` of query ``q`` is relevant) and the relevant counts ``n_q``."""
    ranked = np.asarray(ranked_ids)
    if ranked.ndim != 2 or ranked.shape[0] == 0 or ranked.shape[1] == 0:
        raise ValueError(f"ranked_ids must be a non-empty [Q, K] matrix of document ids, got shape {ranked.shape}")
    if not np.issubdtype(ranked.dtype, np.integer):
        raise TypeError(f"ranked_ids must hold integer document ids, got dtype {ranked.dtype}")
    ranked = ranked.astype(np.int64, copy=False)
    if (ranked < -1).any():
        raise ValueError("ranked_ids holds ids below -1 (only -1 may mark an empty slot)")
    srt = np.sort(ranked, axis=1)
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if dup.any():
        q = int(np.flatnonzero(dup.any(axis=1))[0])
        raise ValueError(f"ranked_ids: query {q} lists a document more than once; each rank must be a distinct id")
    pairs, counts = _relevant_pairs(relevant, ranked.shape[0])
    n_docs = int(max(ranked.max(), pairs[1].max() if pairs.shape[1] else 0)) + 1
    rel_keys = pairs[0] * n_docs + pairs[1]
    q_idx = np.arange(ranked.shape[0], dtype=np.int64)[:, None]
    hits = np.isin(q_idx * n_docs + ranked, rel_keys) & (ranked >= 0)
    return hits, counts


def retrieval_metrics(
    ranked_ids: np.ndarray,
    relevant: Any,
    ks: Sequence[int] = (1, 5, 10),
    *,
    ndcg_k: int = 10,
) -> dict[str, float]:
    """``recall@k``, ``recall_all@k`` for each k in ``ks``, ``mrr`` and ``ndcg@{ndcg_k}`` (module docstring).

    ranked_ids: [Q, K] integer document ids, best first (numpy array or CPU tensor).
    relevant:   a list of Q sets of relevant document ids, or a scipy sparse [Q, n_docs] matrix (nonzero = relevant).
    Every k and ``ndcg_k`` must be ≤ K: a shorter ranking cannot tell what lies below it.
    """
    hits, counts = hit_matrix(ranked_ids, relevant)
    n_ranks = hits.shape[1]
    ks = list(ks)
    for k in list(ks) + [ndcg_k]:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"ks and ndcg_k must be positive integers, got {k!r}")
        if k > n_ranks:
            raise ValueError(f"cutoff k={k} exceeds the K={n_ranks} ranked ids per query; retrieve at least k")
    cum = np.cumsum(hits, axis=1)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = float((cum[:, k - 1] > 0).mean())
    for k in ks:
        out[f"recall_all@{k}"] = float((cum[:, k - 1] / counts).mean())
    first = np.argmax(hits, axis=1)
    out["mrr"] = float(np.where(hits.any(axis=1), 1.0 / (first + 1), 0.0).mean())
    discounts = 1.0 / np.log2(np.arange(ndcg_k) + 2.0)
    dcg = (hits[:, :ndcg_k] * discounts).sum(axis=1)
    idcg = np.cumsum(discounts)[np.minimum(counts, ndcg_k) - 1]
    out[f"ndcg@{ndcg_k}"] = float((dcg / idcg).mean())
    return out
