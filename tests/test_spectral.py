"""The spectral-clustering batch sampler (Cho et al.): high-loss batches, against brute force and random batches;
drop-in behaviour of GlobalBatchSampler (rank invariance, exact resume, each sample once per epoch)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dual_emc2.data.samplers import GlobalBatchSampler
from dual_emc2.data.spectral import (
    SpectralBatchSampler,
    cluster_batches,
    knn_affinity,
    pair_affinity,
    spectral_clusters,
    spectral_embedding_maps,
)

BETA = 5.0


def toy_pairs(n: int, n_clusters: int, dim: int = 8, spread: float = 0.3, seed: int = 0):
    """Pairs (u_i, v_i) around ``n_clusters`` random directions, in random order."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(n_clusters, dim, generator=g, dtype=torch.float64), dim=1)
    label = torch.randperm(n, generator=g) % n_clusters
    u = F.normalize(centers[label] + spread * torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    v = F.normalize(u + 0.1 * torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    return u, v, label


def in_batch_loss(batch: list[int] | torch.Tensor, u: torch.Tensor, v: torch.Tensor, beta: float = BETA) -> float:
    """Mean over the batch of −β u_iᵀv_i + log Σ_{j∈batch} e^{β u_iᵀv_j} (the mini-batch contrastive loss)."""
    idx = torch.as_tensor(batch)
    s = beta * u[idx] @ v[idx].t()
    return float((torch.logsumexp(s, dim=1) - s.diagonal()).mean())


def epoch_loss(plan, u, v) -> float:
    return float(np.mean([in_batch_loss(b, u, v) for b in plan]))


def partitions(items: list[int], size: int):
    """Every partition of ``items`` into unordered groups of ``size``."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, size - 1):
        remaining = [x for x in rest if x not in others]
        for tail in partitions(remaining, size):
            yield [(first, *others)] + tail


def test_spectral_partition_is_the_highest_loss_partition_brute_force() -> None:
    """12 pairs, batches of 4: over all 5,775 partitions, the spectral batches have the largest total loss."""
    u, v, _ = toy_pairs(12, 3, spread=0.25, seed=1)
    sampler = SpectralBatchSampler(12, 4, seed=0, num_clusters=3, beta=BETA)
    sampler.update_embeddings(torch.arange(12), u, v)
    sampler.set_epoch(0)
    plan = sampler.global_batches()
    assert sorted(plan.reshape(-1).tolist()) == list(range(12))
    group_loss = {g: in_batch_loss(list(g), u, v) for g in itertools.combinations(range(12), 4)}
    totals = [sum(group_loss[g] for g in p) for p in partitions(list(range(12)), 4)]
    assert len(totals) == 5775  # 12! / (4!^3 3!)
    best = max(totals)
    got = sum(in_batch_loss(b, u, v) for b in plan)
    assert got == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("dense_max", [4096, 64])  # dense W, and the k-NN graph
def test_spectral_batches_have_higher_loss_than_random(dense_max: int) -> None:
    n, b = 384, 24
    u, v, label = toy_pairs(n, 16, seed=2)
    spectral = SpectralBatchSampler(n, b, seed=0, beta=BETA, dense_max=dense_max, n_neighbors=20)
    spectral.update_embeddings(torch.arange(n), u, v)
    spectral.set_epoch(0)
    high = epoch_loss(spectral.global_batches(), u, v)
    uniform = GlobalBatchSampler(n, b, seed=0)
    random_losses = []
    for epoch in range(5):
        uniform.set_epoch(epoch)
        random_losses.append(epoch_loss(list(uniform), u, v))
    assert high > 1.5 * max(random_losses)
    # the batches are mostly single toy clusters, which random batches are not
    purity = np.mean([torch.bincount(label[p], minlength=16).max().item() / b for p in spectral.global_batches()])
    assert purity > 0.6


def test_clusters_match_scikit_learn_spectral_clustering() -> None:
    from scipy.linalg import subspace_angles
    from sklearn.cluster import SpectralClustering
    from sklearn.manifold import spectral_embedding
    from sklearn.metrics import adjusted_rand_score

    u, v, _ = toy_pairs(300, 6, spread=0.35, seed=3)
    w = pair_affinity(u, v, BETA).numpy()
    labels, maps = spectral_clusters(w, 6, n_components=6, seed=0, n_init=10)
    ref = SpectralClustering(6, affinity="precomputed", random_state=0, n_init=10).fit(w).labels_
    assert adjusted_rand_score(labels, ref) == 1.0
    ref_maps = spectral_embedding(w, n_components=6, random_state=0, drop_first=False)
    assert np.max(subspace_angles(maps, ref_maps)) < 1e-5
    assert np.allclose(spectral_embedding_maps(w, 6, seed=0), maps)
    sparse_maps = spectral_embedding_maps(knn_affinity(u, v, BETA, n_neighbors=299), 6)  # complete graph, sparse
    assert np.max(subspace_angles(sparse_maps, ref_maps)) < 1e-4


def test_affinities_brute_force() -> None:
    u, v, _ = toy_pairs(20, 2, seed=4)
    w = pair_affinity(u, v, 2.0)
    i, j = 3, 11
    scale = torch.exp(2.0 * (u @ v.t()).max())
    assert float(w[i, j] * scale) == pytest.approx(float(torch.exp(2.0 * u[i] @ v[j]) + torch.exp(2.0 * u[j] @ v[i])))
    assert torch.equal(w, w.t()) and float(w.diagonal().abs().sum()) == 0.0
    knn = knn_affinity(u, None, 2.0, n_neighbors=4).toarray()
    s = (u @ u.t()).numpy()
    np.fill_diagonal(s, -np.inf)
    top = np.argsort(-s, axis=1)[:, :4]
    ref = np.zeros((20, 20))
    for a in range(20):
        ref[a, top[a]] = np.exp(2.0 * (s[a, top[a]] - 1.0))
    assert np.allclose(knn, ref + ref.T, rtol=1e-5)


def test_before_any_refresh_it_is_the_uniform_sampler() -> None:
    a = SpectralBatchSampler(100, 8, seed=5)
    b = GlobalBatchSampler(100, 8, seed=5)
    for epoch, start in ((0, 0), (3, 4)):
        a.set_epoch(epoch, start)
        b.set_epoch(epoch, start)
        assert list(a) == list(b) and len(a) == len(b)


def _refreshed(n=240, b=12, world_size=1, rank=0, seed=0):
    u, v, _ = toy_pairs(n, 10, seed=6)
    s = SpectralBatchSampler(n, b, world_size=world_size, rank=rank, seed=seed, beta=BETA)
    s.update_embeddings(torch.arange(n), u, v, step=0)
    return s, u, v


def test_rank_invariant_global_batches() -> None:
    one, u, v = _refreshed(b=12)
    ranks = [_refreshed(b=4, world_size=3, rank=r)[0] for r in range(3)]
    for s in [one, *ranks]:
        s.set_epoch(1, 2)
    whole = list(one)
    parts = [list(s) for s in ranks]
    assert whole == [sum((p[t] for p in parts), []) for t in range(len(whole))]
    # a refresh mid-epoch, installed on every rank, keeps them consistent
    for s in [one, *ranks]:
        s.update_embeddings(torch.arange(240), v, u, step=7)
        s.set_epoch(1, 5)
    whole = list(one)
    parts = [list(s) for s in ranks]
    assert whole == [sum((p[t] for p in parts), []) for t in range(len(whole))]


def test_mid_epoch_refresh_regroups_only_unused_samples() -> None:
    s, u, v = _refreshed()
    s.set_epoch(0)
    before = s.global_batches().clone()
    s.update_embeddings(torch.arange(240), v.flip(0), u.flip(0), step=5)  # new clusters
    s.set_epoch(0, 6)
    after = s.global_batches()
    assert torch.equal(after[:6], before[:6])
    assert not torch.equal(after[6:], before[6:])
    assert sorted(after[6:].reshape(-1).tolist()) == sorted(before[6:].reshape(-1).tolist())
    assert after.unique().numel() == after.numel()  # each sample at most once in the epoch
    assert list(s) == after[6:].tolist() and len(s) == 20 - 6


def test_state_dict_resume_replays_the_same_batches() -> None:
    s, u, v = _refreshed()
    s.set_epoch(2)
    s.update_embeddings(torch.arange(240), v, u, step=40)  # pending: applied at the next set_epoch
    state = s.state_dict()
    s.set_epoch(2, 9)
    expected = list(s)
    t = SpectralBatchSampler(240, 12, seed=0, beta=BETA)
    t.load_state_dict(torch.load(_roundtrip(state), weights_only=False))
    t.set_epoch(2, 9)
    assert list(t) == expected
    assert not t.refresh_due(40) and t.refresh_due(0) is True and not t.refresh_due(41)
    s.set_epoch(3)
    t.set_epoch(3)
    assert list(s) == list(t)
    with pytest.raises(ValueError, match="global_batch"):
        SpectralBatchSampler(240, 8, seed=0).load_state_dict(state)


def _roundtrip(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_cluster_batches_keeps_clusters_whole_where_they_fill_batches() -> None:
    assignment = torch.tensor([0] * 9 + [1] * 7 + [2] * 4)  # batch 4: 2 + 1 + 1 pure batches, 4 leftovers
    plan = cluster_batches(torch.arange(20), assignment, 4, torch.Generator().manual_seed(0))
    assert plan.shape == (5, 4) and sorted(plan.reshape(-1).tolist()) == list(range(20))
    pure = sorted(int(assignment[row].unique().numel() == 1) for row in plan)
    assert pure == [0, 1, 1, 1, 1]


def test_bad_input_is_named() -> None:
    s = SpectralBatchSampler(50, 5)
    u = torch.randn(50, 4)
    with pytest.raises(ValueError, match="ids must hold every sample id"):
        s.update_embeddings(torch.arange(49), u[:49])
    with pytest.raises(ValueError, match=r"feats must be \[50, d\]"):
        s.update_embeddings(torch.arange(50), u[:40])
    with pytest.raises(ValueError, match="NaN"):
        s.update_embeddings(torch.arange(50), u.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="num_clusters"):
        SpectralBatchSampler(50, 5, num_clusters=0)
    with pytest.raises(ValueError, match="refresh_every"):
        SpectralBatchSampler(50, 5, refresh_every=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        SpectralBatchSampler(8, 5, world_size=2)
