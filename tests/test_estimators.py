"""Estimators against closed forms: eq. (1) gradient in float64, SogCLR's u recursion, F.cross_entropy, HCL."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from dual_emc2.loss.estimators import EMC2, HCL, InfoNCE, NegativeCache, SogCLR
from dual_emc2.loss.estimators.base import ContrastiveBatch, weighted_negative_surrogate
from dual_emc2.loss.exact import global_contrastive_loss
from dual_emc2.loss.registry import build_estimator


def unimodal_batch(b=6, d=8, seed=0, dtype=torch.float32, ids=None):
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(2 * b, d, generator=g, dtype=dtype), dim=1).requires_grad_(True)
    ids = torch.arange(b) if ids is None else ids
    anchor_ids = ids.repeat(2)
    positive = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    keys = torch.cat([ids * 2, ids * 2 + 1])  # anchor key = candidate key = id * 2 + view
    return feats, ContrastiveBatch(feats, feats, positive, anchor_ids, anchor_ids, anchor_keys=keys,
                                   candidate_keys=keys, views_per_id=2)


def bimodal_batch(b=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_(True)
    y = F.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_(True)
    ids = torch.arange(10, 10 + b)
    return x, y, ContrastiveBatch(x, y, torch.arange(b), ids, ids)


def test_infonce_equals_cross_entropy_unimodal_and_bimodal():
    feats, batch = unimodal_batch()
    beta = 2.5
    logits = beta * feats @ feats.t()
    logits = logits.masked_fill(torch.eye(12, dtype=torch.bool), float("-inf"))
    ref = F.cross_entropy(logits, batch.positive)
    assert torch.allclose(InfoNCE()(batch, beta).loss, ref, atol=1e-6)
    x, y, batch = bimodal_batch()
    assert torch.allclose(InfoNCE()(batch, beta).loss, F.cross_entropy(beta * x @ y.t(), torch.arange(5)), atol=1e-6)


def test_surrogate_with_exact_softmax_has_the_gradient_of_eq1_float64():
    feats, batch = unimodal_batch(dtype=torch.float64)
    beta = 3.0
    ref = global_contrastive_loss(feats, feats, batch.positive, batch.anchor_ids, batch.candidate_ids, beta)
    (g_ref,) = torch.autograd.grad(ref, feats)
    scores = batch.scores()
    softmax = torch.softmax((beta * scores).masked_fill(~batch.negative_mask, float("-inf")), dim=1)
    sur = weighted_negative_surrogate(batch.positive_scores(scores), scores, softmax, beta)
    (g_sur,) = torch.autograd.grad(sur, feats)
    assert torch.allclose(g_sur, g_ref, atol=1e-12, rtol=1e-10)


def test_emc2_long_chains_estimate_the_gradient_of_eq1():
    feats, batch = unimodal_batch(b=5, dtype=torch.float64, seed=1)
    beta = 3.0
    ref = global_contrastive_loss(feats, feats, batch.positive, batch.anchor_ids, batch.candidate_ids, beta)
    (g_ref,) = torch.autograd.grad(ref, feats)
    emc2 = EMC2(num_keys=10, weights="visits", steps=40_000, burn_in=500, seed=3)
    (g,) = torch.autograd.grad(emc2(batch, beta).loss, feats)
    rel = (g - g_ref).norm() / g_ref.norm()
    assert rel < 0.03, float(rel)


def test_emc2_rao_blackwell_without_state_is_the_batch_gradient_of_eq1():
    # first visit: no chain state, the pool is the batch, and the Rao-Blackwell weights are its exact softmax
    feats, batch = unimodal_batch(b=5, dtype=torch.float64, seed=1)
    ref = global_contrastive_loss(feats, feats, batch.positive, batch.anchor_ids, batch.candidate_ids, 3.0)
    (g_ref,) = torch.autograd.grad(ref, feats)
    (g,) = torch.autograd.grad(EMC2(num_keys=10)(batch, 3.0).loss, feats)
    assert torch.allclose(g, g_ref, atol=1e-10)


@pytest.mark.parametrize("opts", [{}, {"weights": "visits", "steps": 6, "burn_in": 2}])
def test_emc2_state_persists_and_maps_into_the_batch(opts):
    feats, batch = unimodal_batch(b=4)
    emc2 = EMC2(num_keys=8, seed=0, **opts)
    out = emc2(batch, 5.0)
    key = emc2.chains.candidate_key[batch.anchor_keys].long()
    col = (key[:, None] == batch.candidate_keys[None, :]).long().argmax(dim=1)
    assert (batch.candidate_keys[col] == key).all(), "a chain state is not a candidate key of the batch"
    assert (key // 2 != batch.anchor_ids).all(), "a chain sits on its own sample"
    s = (feats @ feats.t()).detach()
    stored = emc2.chains.score[batch.anchor_keys]
    assert torch.allclose(stored, s[torch.arange(8), col]), "stored score is not the score of the stored view"
    out2 = emc2(batch, 5.0)  # same samples: every chain restarts inside the batch, at the column of its view
    assert float(out2.stats["start_outside_frac"]) == 0.0
    if "weights" in opts:
        assert 0 < float(out.stats["accept_rate"]) <= 1


class _ScoredInRankBlocks(ContrastiveBatch):
    """The single process's batch scored as the two ranks score it: two [4, d] × [d, 8] products instead of one
    [8, d] × [d, 8] (BLAS may round the two shapes differently, e.g. MKL's AVX-512 and SSE4.2 sgemm do)."""

    def scores(self):
        return torch.cat([self.anchors[lo:lo + 4] @ self.candidates.t() for lo in range(0, self.anchors.shape[0], 4)])


@pytest.mark.determinism
@pytest.mark.parametrize("scoring", ["rank_blocks", "one_product"])
@pytest.mark.parametrize("opts", [{}, {"weights": "visits", "steps": 6, "burn_in": 1}, {"reencode_fraction": 0.5}])
def test_emc2_rank_split_equals_single_process(opts, scoring):
    feats, batch = unimodal_batch(b=4, seed=2)
    if scoring == "rank_blocks":
        batch = _ScoredInRankBlocks(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)})
    table = F.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    batch.encode_candidates = lambda ids: table[ids]
    full = EMC2(num_keys=40, seed=5, **opts)
    full.chains.candidate_key[:8] = torch.tensor([30, 31, 2, 33, 34, 35, 4, 37], dtype=torch.int32)
    loss_full = full(batch, 4.0).loss
    ranks = [EMC2(num_keys=40, seed=5, **opts) for _ in range(2)]
    losses = []
    for r, (lo, hi) in enumerate([(0, 4), (4, 8)]):
        ranks[r].chains.load_state_dict({"candidate_key": torch.tensor([30, 31, 2, 33, 34, 35, 4, 37] + [-1] * 32,
                                                                       dtype=torch.int32),
                                         "score": torch.full((40,), float("-inf"))})
        part = ContrastiveBatch(feats[lo:hi], feats, batch.positive[lo:hi], batch.anchor_ids[lo:hi],
                                batch.candidate_ids, anchor_keys=batch.anchor_keys[lo:hi],
                                candidate_keys=batch.candidate_keys, views_per_id=2, row_offset=lo, total_rows=8,
                                encode_candidates=batch.encode_candidates)
        losses.append(ranks[r](part, 4.0).loss)
    # tolerance: the mean over 8 rows is summed in another order than the two means over 4
    assert torch.allclose(0.5 * (losses[0] + losses[1]), loss_full, atol=1e-6)
    for key in range(8):  # keys 0,2,4,6 are view-0 anchors (rank 0), keys 1,3,5,7 view-1 anchors (rank 1)
        owner = ranks[0] if key % 2 == 0 else ranks[1]
        # exact in both modes: a rounding-level score difference moves a sampling decision only at a near-tie
        assert owner.chains.candidate_key[key] == full.chains.candidate_key[key]
        if scoring == "rank_blocks":  # same products on both sides: the random numbers and rows must match exactly
            assert owner.chains.score[key].view(torch.int32) == full.chains.score[key].view(torch.int32)
        else:  # tolerance: one [8, d] × [d, 8] product against two [4, d] × [d, 8] ones, rounded per shape by BLAS
            assert torch.allclose(owner.chains.score[key], full.chains.score[key], rtol=0, atol=1e-6)


def _state_out_of_batch(b=3, seed=4):
    """A unimodal batch whose every chain sits on view 0 of sample 99 (key 198), out of the batch."""
    feats, batch = unimodal_batch(b=b, seed=seed)
    z99 = F.normalize(torch.randn(1, 8, generator=torch.Generator().manual_seed(seed)), dim=1).requires_grad_(True)
    calls = []

    def encode(ids):
        calls.append((ids.clone(), torch.is_grad_enabled()))
        assert (ids == 99).all()
        return z99.expand(ids.numel(), -1)

    batch.encode_candidates = encode
    return feats, batch, z99, calls


def test_emc2_stale_state_visits_and_reencode():
    # stale score 50: the chain never moves, so the whole negative weight goes to the re-encoded sample 99
    feats, batch, z99, calls = _state_out_of_batch()
    emc2 = EMC2(num_keys=6, weights="visits", proposal="batch", steps=5, burn_in=1, state_score="stale")
    emc2.chains.candidate_key[:] = 198
    emc2.chains.score[:] = 50.0
    out = emc2(batch, 2.0)
    assert float(out.stats["state_weight"]) == 1.0
    g_feats, g_z = torch.autograd.grad(out.loss, [feats, z99])
    # d/dz of (beta/B) sum_i s(x_i, z) = beta/B * sum_i x_i
    assert torch.allclose(g_z[0], 2.0 / 6 * feats.detach().sum(0), atol=1e-6)
    assert calls and calls[-1][1] is True


def _thinned_reference(feats, batch, z, beta):
    """Brute force: the surrogate with the default weights averaged over every thinning of the batch — each other
    sample keeps one of its two views, uniformly (2^(b−1) pools per anchor) — and the state z in every pool."""
    import itertools

    s = feats @ feats.t()
    s_z = (feats @ z.t())[:, 0]
    B, C = s.shape
    valid = batch.negative_mask
    w = torch.zeros(B, C, dtype=s.dtype)
    w_z = torch.zeros(B, dtype=s.dtype)
    samples = batch.candidate_ids.unique().tolist()
    for i in range(B):
        others = [m for m in samples if valid[i][batch.candidate_ids == m].any()]
        choices = list(itertools.product(range(2), repeat=len(others)))
        for pick in choices:
            cols = [int(((batch.candidate_ids == m) & (batch.candidate_keys % 2 == v)).nonzero()[0]) for m, v in
                    zip(others, pick)]
            p = torch.softmax(beta * torch.cat([s[i, cols], s_z[i:i + 1]]).detach(), 0) / len(choices)
            w[i, cols] += p[:-1]
            w_z[i] += p[-1]
    pos = s.gather(1, batch.positive[:, None])[:, 0]
    return beta * (-pos + (w * s).sum(1) + w_z * s_z).mean(), w_z


def test_emc2_default_weights_average_the_thinned_pool_softmax_and_encode_each_id_once():
    # every chain sits on sample 99 outside the batch; a batch holds two views of each sample, so the pool keeps one
    # view of each (the state's lone view is then exchangeable with them); averaged over the thinning the weights are
    # the pool softmax averaged over every thinned pool (brute force), and the state's sample is encoded once
    feats, batch, z99, calls = _state_out_of_batch()
    f, z = feats.detach().clone().requires_grad_(True), z99.detach().clone().requires_grad_(True)
    ref, w_z = _thinned_reference(f, batch, z, 2.0)
    g_ref = torch.cat([t.flatten() for t in torch.autograd.grad(ref, [f, z])])
    grads, weights = [], []
    for seed in range(300):
        emc2 = EMC2(num_keys=6, seed=seed)
        emc2.chains.candidate_key[:] = 198
        emc2.chains.score[:] = 50.0  # ignored: the exact score is used
        calls.clear()
        out = emc2(batch, 2.0)
        assert len(calls) == 1 and calls[0][0].tolist() == [99] and calls[0][1] is True, calls
        grads.append(torch.cat([t.flatten() for t in torch.autograd.grad(out.loss, [feats, z99])]))
        weights.append(float(out.stats["state_weight"]))
        assert set(emc2.chains.candidate_key.tolist()) <= set(batch.candidate_keys.tolist()) | {198}
    grads = torch.stack(grads)
    err = float((grads.mean(0) - g_ref).norm() / g_ref.norm())
    noise = float(grads.std(0).norm() / math.sqrt(len(grads)) / g_ref.norm())
    assert err < 4 * noise + 1e-6, (err, noise)
    assert noise > 0, "the thinning never changed the weights"
    assert abs(sum(weights) / len(weights) - float(w_z.mean())) < 0.02


def test_emc2_reencode_fraction_is_unbiased_over_the_random_choice():
    # q = 0.5: rows not re-encoded use the batch softmax and keep their state, the others are corrected by 1/q;
    # averaged over the Bernoulli choices the gradient equals the q = 1 (all re-encoded) gradient with the same
    # thinning (the same seed draws the same thinning for both)
    feats, batch, z99, calls = _state_out_of_batch(b=4, seed=6)

    def grad(q, seed):
        emc2 = EMC2(num_keys=8, reencode_fraction=q, seed=seed)
        emc2.chains.candidate_key[:] = 198
        g = torch.autograd.grad(emc2(batch, 3.0).loss, [feats, z99], allow_unused=True, materialize_grads=True)
        return torch.cat([g[0].flatten(), g[1].flatten()])

    diff = torch.stack([grad(0.5, seed) - grad(1.0, seed) for seed in range(600)])
    scale = torch.stack([grad(1.0, seed) for seed in range(20)]).mean(0).norm()
    err = diff.mean(0).norm() / scale
    noise = diff.std(0).norm() / math.sqrt(600) / scale
    assert err < 3 * noise + 1e-3, (float(err), float(noise))
    assert (diff.abs().sum(1) > 1e-4).any(), "q < 1 did not change a single draw"


def test_emc2_state_masked_in_the_batch_is_forgotten():
    # the stored key is in the batch but masked for this anchor (a known false negative): no re-encoding, no weight
    feats, batch, z99, calls = _state_out_of_batch()
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[:, 2] = False  # candidate column 2 holds key 4 (sample 2, view 0)
    batch.extra_negative_mask = mask
    emc2 = EMC2(num_keys=6)
    emc2.chains.candidate_key[:] = 4
    out = emc2(batch, 2.0)
    assert not calls and float(out.stats["state_weight"]) == 0.0
    assert (emc2.chains.candidate_key != 4).all()


def test_emc2_bad_options_name_the_choices():
    with pytest.raises(ValueError, match="state_score must be one of exact, stale, got 'fresh'"):
        EMC2(num_keys=4, state_score="fresh")
    with pytest.raises(ValueError, match="did you mean 'permuted_scan'"):
        EMC2(num_keys=4, proposal="permuted-scan")
    with pytest.raises(ValueError, match="state_update must be 'chain'"):
        EMC2(num_keys=4, weights="visits", state_update="draw")
    with pytest.raises(ValueError, match="reencode_fraction"):
        EMC2(num_keys=4, reencode_fraction=0.0)


def test_sogclr_u_follows_the_moving_average_and_weights():
    gamma, beta = 0.7, 2.0
    sog = SogCLR(num_keys=12, gamma=gamma)
    us = [torch.zeros(12, dtype=torch.float64)]
    for seed in (0, 1):
        feats, batch = unimodal_batch(seed=seed)
        out = sog(batch, beta)
        s = (feats @ feats.t()).detach().double()
        neg = batch.negative_mask
        g = (torch.exp(beta * s) * neg).sum(1) / neg.sum(1)
        u = (1 - gamma) * us[-1][batch.anchor_keys] + gamma * g
        us.append(torch.zeros(12, dtype=torch.float64).index_put((batch.anchor_keys,), u))
        assert torch.allclose(sog.u.value[batch.anchor_keys].double().exp(), u, rtol=1e-5)
        # gradient of the surrogate: beta/B sum_i [-grad s_i+ + sum_j exp(beta s_ij)/(u_i N_i) grad s_ij]
        w = (torch.exp(beta * s) * neg / (u[:, None] * neg.sum(1, keepdim=True))).float()
        sc = feats @ feats.t()
        ref = beta * (-sc.gather(1, batch.positive[:, None])[:, 0] + (w * sc).sum(1)).mean()
        (g1,) = torch.autograd.grad(out.loss, feats)
        (g2,) = torch.autograd.grad(ref, feats)
        assert torch.allclose(g1, g2, atol=1e-5)


def test_hcl_matches_reference_formula():
    feats, batch = unimodal_batch(b=5, dtype=torch.float64)
    beta, h, tau = 2.0, 1.0, 0.1
    loss = HCL(hardness=h, tau_plus=tau)(batch, beta).loss
    # Robinson et al.'s formulation, written naively
    s = feats @ feats.t()
    neg = batch.negative_mask.double()
    N = 2 * 5 - 2
    pos = torch.exp(beta * s.gather(1, batch.positive[:, None])[:, 0])
    e = torch.exp(beta * s) * neg
    imp = torch.exp(h * beta * s) * neg
    reweight = (imp * e).sum(1) / (imp.sum(1) / N)
    ng = (-tau * N * pos + reweight) / (1 - tau)
    ng = torch.clamp(ng, min=N * math.exp(-beta))
    ref = (-torch.log(pos / (pos + ng))).mean()
    assert torch.allclose(loss, ref, atol=1e-10)


def test_negative_cache_draws_follow_the_cache_softmax():
    torch.manual_seed(0)
    m, d, beta = 12, 6, 3.0
    table = F.normalize(torch.randn(m, d), dim=1)
    a = F.normalize(torch.randn(1, d), dim=1)
    B = 64
    drawn = []

    def encode(ids):
        if not torch.is_grad_enabled():
            return table[ids]
        drawn.append(ids.clone())
        return table[ids].clone().requires_grad_(True)

    cache = NegativeCache(num_keys=m, num_candidates=m, dim=d, refresh=0.25)
    ids = torch.zeros(B, dtype=torch.long)
    for _ in range(250):
        anchors = a.expand(B, -1)
        batch = ContrastiveBatch(anchors, anchors, torch.arange(B), ids, ids, encode_candidates=encode)
        cache(batch, beta)
    counts = torch.bincount(torch.cat(drawn), minlength=m).float()
    target = torch.softmax(beta * (a @ table.t())[0].masked_fill(torch.arange(m) == 0, float("-inf")), 0)
    tv = 0.5 * (counts / counts.sum() - target).abs().sum()
    assert counts[0] == 0 and tv < 0.03, float(tv)
    assert int(cache.pointer) == (250 * 3) % m


@pytest.mark.parametrize("name, opts", [("emc2", {}), ("emc2", {"weights": "visits", "steps": 6, "burn_in": 2}),
                                        ("sogclr", {}),
                                        ("negative_cache", {"dim": 8})])
@pytest.mark.determinism
def test_state_round_trips_through_state_dict(name, opts):
    table = F.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(9)), dim=1)

    def encode(ids):
        return table[ids]

    a = build_estimator(name, num_keys=40, num_candidates=40, options=opts)
    for seed in range(3):
        _, batch = unimodal_batch(b=4, seed=seed, ids=torch.arange(4) * 3 + seed)
        batch.encode_candidates = encode
        a(batch, 3.0)
    b = build_estimator(name, num_keys=40, num_candidates=40, options=opts)
    b.load_state_dict(a.state_dict())
    _, batch = unimodal_batch(b=4, seed=7, ids=torch.arange(4) * 5)
    batch.encode_candidates = encode
    la, lb = a(batch, 3.0).loss, b(batch, 3.0).loss
    assert torch.equal(la, lb)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k


def test_registry_errors_name_the_option():
    with pytest.raises(ValueError, match="did you mean 'emc2'"):
        build_estimator("emc", num_keys=4, num_candidates=4)
    with pytest.raises(ValueError, match="did you mean 'burn_in'"):
        build_estimator("emc2", num_keys=4, num_candidates=4, options={"burnin": 3})
    with pytest.raises(ValueError, match="burn_in"):
        build_estimator("emc2", num_keys=4, num_candidates=4, options={"weights": "visits", "steps": 3, "burn_in": 3})


def test_symmetric_objective_keeps_separate_states():
    x, y, batch = bimodal_batch(b=4)
    rev = ContrastiveBatch(y, x, torch.arange(4), batch.anchor_ids, batch.anchor_ids)
    obj = build_estimator("sogclr", num_keys=20, num_candidates=20, symmetric=True)
    out = obj(batch, 2.0, reverse=rev)
    assert not torch.equal(obj.x_to_y.u.value, obj.y_to_x.u.value)
    ref = 0.5 * (SogCLR(20)(batch, 2.0).loss + SogCLR(20)(rev, 2.0).loss)
    assert torch.allclose(out.loss, ref)


def test_options_of_estimators_not_selected_are_checked_too():
    from dual_emc2.loss.registry import options_for

    with pytest.raises(ValueError, match=r"loss.options.sogclr: sogclr gamma must be in \(0, 1\].*emc2"):
        options_for("emc2", {"emc2": {}, "sogclr": {"gamma": 2.0}})
    with pytest.raises(ValueError, match="did you mean 'refresh'"):
        options_for("emc2", {"negative_cache": {"refesh": 0.1}})
    assert options_for("emc2", {"emc2": {"reencode_fraction": 0.5}, "sogclr": {"gamma": 0.5}}) == {
        "reencode_fraction": 0.5}
