"""FAISS search (flat / IVF / HNSW) against brute force, and retrieval metrics against hand-computed values."""
from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from dual_emc2.metrics.faiss_search import build_index, exact_topk, faiss_gpu_available, search
from dual_emc2.metrics.retrieval import retrieval_metrics

torch.set_num_threads(1)
faiss.omp_set_num_threads(1)


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(db: np.ndarray, q: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    db64, q64 = torch.from_numpy(db).double(), torch.from_numpy(q).double()
    if metric == "ip":
        scores, ids = (q64 @ db64.T).topk(k, dim=1)
    else:
        scores, ids = torch.cdist(q64, db64).pow(2).topk(k, dim=1, largest=False)
    return scores.numpy(), ids.numpy()


# ---------------------------------------------------------------- FAISS


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.determinism
def test_flat_search_equals_brute_force(metric):
    db, q = _unit(500, 24, 0) * 2.0, _unit(60, 24, 1)
    index = build_index(24, "flat", metric=metric)
    index.add(torch.from_numpy(db))  # torch input is accepted
    assert index.ntotal == 500 and index.on_gpu == faiss_gpu_available()
    scores, ids = search(index, q, 10)
    exp_scores, exp_ids = _brute(db, q, 10, metric)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (60, 10)
    np.testing.assert_array_equal(ids, exp_ids)  # exact: top-11 score gaps >= 3.6e-5, far above float32 rounding
    np.testing.assert_allclose(scores, exp_scores, rtol=1e-5, atol=1e-5)
    s2, i2 = exact_topk(db, torch.from_numpy(q), 10, metric=metric)
    np.testing.assert_array_equal(i2, exp_ids)
    np.testing.assert_allclose(s2, exp_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.determinism
def test_ivf_with_all_lists_probed_is_exact():
    db, q = _unit(1000, 16, 2), _unit(50, 16, 3)
    index = build_index(16, "ivf", nlist=20, nprobe=20)
    assert index.index is None  # trained on the first add
    index.add(db)
    assert index.index.is_trained and index.nlist == 20
    scores, ids = search(index, q, 10)
    exp_scores, exp_ids = _brute(db, q, 10, "ip")
    np.testing.assert_array_equal(ids, exp_ids)  # exact: top-11 score gaps >= 2.5e-5, far above float32 rounding
    np.testing.assert_allclose(scores, exp_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.determinism
def test_ivf_clamps_nlist_to_training_size_and_trains_on_train_x():
    train = _unit(40, 8, 4)
    index = build_index(8, "ivf", nlist=1024, nprobe=2048, train_x=train)
    assert index.nlist == 40 and index.nprobe == 40 and index.index.is_trained
    db, q = _unit(300, 8, 5), _unit(20, 8, 6)
    index.add(db)
    _, ids = search(index, q, 5)
    np.testing.assert_array_equal(ids, _brute(db, q, 5, "ip")[1])  # nprobe = nlist: exact (top-6 gaps >= 2e-4)


def test_hnsw_recall_at_10():
    db, q = _unit(2000, 32, 7), _unit(200, 32, 8)
    index = build_index(32, "hnsw", hnsw_m=32)
    index.add(db)
    _, ids = search(index, q, 10)
    _, exact = _brute(db, q, 10, "ip")
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), exact.tolist())])
    assert recall > 0.95


def test_auto_device_falls_back_to_cpu():
    index = build_index(4, "flat", use_gpu="auto")
    assert index.on_gpu == faiss_gpu_available()
    assert not build_index(4, "flat", use_gpu=False).on_gpu


@pytest.mark.skipif(faiss_gpu_available(), reason="FAISS has GPU support here")
def test_use_gpu_true_without_gpu_support_raises():
    with pytest.raises(RuntimeError, match="no GPU support"):
        build_index(4, "flat", use_gpu=True)


@pytest.mark.parametrize("args, kwargs, match", [
    ((0,), {}, "dim must be a positive integer"),
    ((4.5,), {}, "dim must be a positive integer"),
    ((4, "pq"), {}, "kind must be one of"),
    ((4,), dict(metric="cosine"), "metric must be one of"),
    ((4, "ivf"), dict(nlist=0), "nlist"),
    ((4, "hnsw"), dict(hnsw_m=0), "hnsw_m"),
    ((4,), dict(use_gpu="yes"), "use_gpu"),
    ((4, "flat"), dict(train_x=np.zeros((10, 4), np.float32)), "train_x is only used"),
    ((4, "ivf"), dict(train_x=np.zeros((10, 3), np.float32)), "train_x has dimension 3"),
])
def test_build_index_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_index(*args, **kwargs)


def test_search_bad_arguments():
    index = build_index(4, "flat")
    with pytest.raises(ValueError, match="empty"):
        search(index, np.zeros((1, 4), np.float32), 1)
    index.add(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="exceeds the number of indexed vectors"):
        search(index, np.zeros((1, 4), np.float32), 5)
    with pytest.raises(ValueError, match="dimension 3"):
        search(index, np.zeros((1, 3), np.float32), 1)
    with pytest.raises(ValueError, match="2-D"):
        search(index, np.zeros(4, np.float32), 1)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        search(index, np.zeros((1, 4), np.float32), 0)
    with pytest.raises(ValueError, match="database vectors has dimension 5"):
        index.add(np.zeros((2, 5), np.float32))
    with pytest.raises(TypeError, match="queries must be a torch.Tensor or numpy.ndarray"):
        search(index, [[0.0] * 4], 1)


# ---------------------------------------------------------------- retrieval metrics

# Ranks 0..3 of four queries and their relevant sets (-1 = empty slot):
#   q0: [3, 7, 1, 9]   relevant {7}          hits 0 1 0 0
#   q1: [2, 5, 8, 4]   relevant {4, 2}       hits 1 0 0 1
#   q2: [6, 0, 3, 1]   relevant {9, 5}       hits 0 0 0 0
#   q3: [5, 1, 2, -1]  relevant {1, 5, 2, 8} hits 1 1 1 0
RANKED = np.array([[3, 7, 1, 9], [2, 5, 8, 4], [6, 0, 3, 1], [5, 1, 2, -1]])
RELEVANT = [{7}, {4, 2}, {9, 5}, {1, 5, 2, 8}]
L3 = 1.0 / math.log2(3)  # discount of rank 1 (0-based); rank 0 has 1, rank 2 has 1/log2(4) = 0.5
EXPECTED = {
    "recall@1": (0 + 1 + 0 + 1) / 4,
    "recall@2": (1 + 1 + 0 + 1) / 4,
    "recall@4": (1 + 1 + 0 + 1) / 4,
    "recall_all@1": (0 / 1 + 1 / 2 + 0 / 2 + 1 / 4) / 4,
    "recall_all@2": (1 / 1 + 1 / 2 + 0 / 2 + 2 / 4) / 4,
    "recall_all@4": (1 / 1 + 2 / 2 + 0 / 2 + 3 / 4) / 4,
    "mrr": (1 / 2 + 1 / 1 + 0 + 1 / 1) / 4,
    # nDCG@3: q0 L3 / 1; q1 1 / (1 + L3); q2 0; q3 (1 + L3 + 0.5) / (1 + L3 + 0.5), ideal capped at 3 of its 4
    "ndcg@3": (L3 + 1 / (1 + L3) + 0 + 1) / 4,
}


def test_retrieval_metrics_hand_computed():
    out = retrieval_metrics(RANKED, RELEVANT, ks=(1, 2, 4), ndcg_k=3)
    assert set(out) == set(EXPECTED)
    for key, value in EXPECTED.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key
    assert out["ndcg@3"] == pytest.approx(0.561019236, abs=1e-9)


def test_retrieval_metrics_sparse_relevance_and_tensor_ids_agree():
    rows = np.repeat(np.arange(4), [len(r) for r in RELEVANT])
    cols = np.array([d for r in RELEVANT for d in sorted(r)])
    csr = sp.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(4, 12))
    out = retrieval_metrics(torch.from_numpy(RANKED), csr, ks=(1, 2, 4), ndcg_k=3)
    for key, value in EXPECTED.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key


def _loop_reference(ranked: np.ndarray, relevant: list[set[int]], ks, ndcg_k):
    out = {f"recall@{k}": 0.0 for k in ks} | {f"recall_all@{k}": 0.0 for k in ks} | {"mrr": 0.0, f"ndcg@{ndcg_k}": 0.0}
    for row, rel in zip(ranked.tolist(), relevant):
        for k in ks:
            found = [d for d in row[:k] if d in rel]
            out[f"recall@{k}"] += bool(found)
            out[f"recall_all@{k}"] += len(found) / len(rel)
        out["mrr"] += next((1 / (r + 1) for r, d in enumerate(row) if d in rel), 0.0)
        dcg = sum(1 / math.log2(r + 2) for r, d in enumerate(row[:ndcg_k]) if d in rel)
        out[f"ndcg@{ndcg_k}"] += dcg / sum(1 / math.log2(r + 2) for r in range(min(len(rel), ndcg_k)))
    return {key: v / len(relevant) for key, v in out.items()}


def test_retrieval_metrics_match_loop_reference_with_default_cutoffs():
    rng = np.random.default_rng(0)
    n_docs, n_q = 40, 200
    ranked = np.stack([rng.permutation(n_docs)[:12] for _ in range(n_q)])
    relevant = [set(rng.choice(n_docs, size=rng.integers(1, 15), replace=False).tolist()) for _ in range(n_q)]
    out = retrieval_metrics(ranked, relevant)
    ref = _loop_reference(ranked, relevant, (1, 5, 10), 10)
    assert set(out) == set(ref)
    for key in ref:
        assert out[key] == pytest.approx(ref[key], abs=1e-12), key


@pytest.mark.parametrize("ranked, relevant, kwargs, match", [
    (RANKED, RELEVANT, dict(ks=(5,)), "k=5 exceeds the K=4"),
    (RANKED, RELEVANT, dict(ks=(1,)), "k=10 exceeds"),  # default ndcg_k = 10 > K
    (RANKED, RELEVANT, dict(ks=(0,), ndcg_k=3), "positive integers"),
    (RANKED, RELEVANT[:3], dict(ndcg_k=3, ks=(1,)), "3 entries but ranked_ids has 4"),
    (RANKED, [{7}, set(), {1}, {2}], dict(ndcg_k=3, ks=(1,)), "no relevant document"),
    (np.array([[1, 2, 1, 3]]), [{1}], dict(ndcg_k=3, ks=(1,)), "more than once"),
    (np.array([[1, -2, 0, 3]]), [{1}], dict(ndcg_k=3, ks=(1,)), "below -1"),
    (np.zeros(4, dtype=np.int64), [{1}], dict(), r"\[Q, K\]"),
])
def test_retrieval_metrics_bad_arguments(ranked, relevant, kwargs, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(ranked, relevant, **kwargs)


def test_retrieval_metrics_bad_types():
    with pytest.raises(TypeError, match="integer document ids"):
        retrieval_metrics(RANKED.astype(float), RELEVANT, ks=(1,), ndcg_k=3)
    with pytest.raises(TypeError, match="list of sets"):
        retrieval_metrics(RANKED, {0: {7}}, ks=(1,), ndcg_k=3)
