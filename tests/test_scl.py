"""SCL / HSCL / HUCL (Jiang et al.) against their formulas, computed here by explicit loops over anchors and
candidates."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from dual_emc2.loss.estimators.base import ContrastiveBatch
from dual_emc2.loss.estimators.infonce import InfoNCE
from dual_emc2.loss.estimators.scl import HSCL, HUCL, SCL, normalize_features
from dual_emc2.loss.registry import REGISTRY, build_estimator


def unimodal_batch(n_images: int = 6, n_views: int = 2, dim: int = 5, n_classes: int = 3, seed: int = 0,
                   scale: float = 1.0, normalise: bool = True) -> ContrastiveBatch:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_images * n_views, dim, generator=g, dtype=torch.float64) * scale
    if normalise:
        z = F.normalize(z, dim=1)
    ids = torch.arange(n_images).repeat_interleave(n_views)
    view = torch.arange(n_images * n_views) % n_views
    cols = torch.arange(n_images * n_views)
    positive = cols - view + (view + 1) % n_views
    labels = (torch.arange(n_images) % n_classes).repeat_interleave(n_views)
    return ContrastiveBatch(z, z, positive, ids, ids, anchor_keys=ids * n_views + view, labels=labels,
                            candidate_labels=labels)


def brute_force(batch: ContrastiveBatch, beta: float, hardness: float, supervised: bool, norm: str = "sphere"
                ) -> float:
    """ℓ_i = mean_{p∈P(i)} log(1 + n_i Σ_{j∈N(i)} w_ij exp(β(s_ij − s_ip))), w_ij ∝ exp(h β s_ij); mean over i."""
    def prep(v):
        v = [float(x) for x in v]
        r = math.sqrt(sum(x * x for x in v))
        if norm == "sphere":
            return [x / r for x in v]
        if norm == "ball":
            return [x / max(1.0, r) for x in v]
        return v

    A = [prep(r) for r in batch.anchors.tolist()]
    C = [prep(r) for r in batch.candidates.tolist()]
    ids_a, ids_c = batch.anchor_ids.tolist(), batch.candidate_ids.tolist()
    total, count = 0.0, 0
    for i, a in enumerate(A):
        s = [sum(x * y for x, y in zip(a, c)) for c in C]
        P, N = [], []
        for j in range(len(C)):
            if j == int(batch.positive[i]):
                P.append(j)
            elif supervised:
                same_class = int(batch.labels[i]) == int(batch.candidate_labels[j])
                if same_class and ids_c[j] != ids_a[i]:
                    P.append(j)
                elif not same_class:
                    N.append(j)
            elif ids_c[j] != ids_a[i]:
                N.append(j)
        if batch.extra_negative_mask is not None:
            N = [j for j in N if bool(batch.extra_negative_mask[i, j])]
        if not P or not N:
            continue
        z = sum(math.exp(hardness * beta * s[j]) for j in N)
        w = {j: math.exp(hardness * beta * s[j]) / z for j in N}
        terms = [math.log(1 + len(N) * sum(w[j] * math.exp(beta * (s[j] - s[p])) for j in N)) for p in P]
        total += sum(terms) / len(terms)
        count += 1
    return total / count


@pytest.mark.parametrize("hardness", [0.0, 0.7, 3.0])
@pytest.mark.parametrize("n_views", [2, 3])
def test_scl_and_hscl_match_formula(hardness: float, n_views: int) -> None:
    batch = unimodal_batch(n_images=7, n_views=n_views, n_classes=3, seed=int(hardness * 10) + n_views)
    cls = SCL if hardness == 0 else HSCL
    out = cls(hardness=hardness)(batch, 4.0)
    assert out.loss.item() == pytest.approx(brute_force(batch, 4.0, hardness, supervised=True), rel=1e-10)


@pytest.mark.parametrize("hardness", [0.5, 2.0])
def test_hucl_matches_formula(hardness: float) -> None:
    batch = unimodal_batch(n_images=8, n_views=2, seed=3)
    out = HUCL(hardness=hardness)(batch, 3.0)
    assert out.loss.item() == pytest.approx(brute_force(batch, 3.0, hardness, supervised=False), rel=1e-10)


def test_hucl_without_hardness_is_infonce() -> None:
    batch = unimodal_batch(n_images=8, n_views=2, seed=5)
    ucl = HUCL(hardness=0.0)(batch, 5.0).loss
    ref = InfoNCE()(batch, 5.0).loss
    assert ucl.item() == pytest.approx(ref.item(), rel=1e-12)
    # labels are ignored by the unsupervised loss
    relabel = dataclasses.replace(batch, labels=torch.zeros_like(batch.labels),
                                  candidate_labels=torch.zeros_like(batch.labels))
    assert HUCL(hardness=0.0)(relabel, 5.0).loss.item() == pytest.approx(ucl.item(), rel=1e-12)


def test_scl_without_labels_in_common_is_ucl() -> None:
    """With one class per image, SCL's positives are only the batch positives and its negatives all other ids: UCL."""
    batch = unimodal_batch(n_images=6, n_views=2, seed=7)
    own = torch.arange(6).repeat_interleave(2)
    batch = dataclasses.replace(batch, labels=own, candidate_labels=own)
    assert SCL()(batch, 2.0).loss.item() == pytest.approx(HUCL(hardness=0.0)(batch, 2.0).loss.item(), rel=1e-12)


def test_infinite_hardness_keeps_only_the_hardest_negative() -> None:
    """h → ∞: n Σ_j w_ij e^{βs_ij} → n e^{β max_j s_ij} (closed form), here checked for HUCL with V = 2."""
    batch = unimodal_batch(n_images=5, n_views=2, seed=11)
    beta = 2.0
    s = batch.anchors @ batch.candidates.t()
    neg = batch.negative_mask
    hardest = s.masked_fill(~neg, -math.inf).max(dim=1).values
    pos = s.gather(1, batch.positive[:, None])[:, 0]
    n = neg.sum(1).double()
    expected = torch.log1p(n * torch.exp(beta * (hardest - pos))).mean()
    got = HUCL(hardness=500.0)(batch, beta).loss
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # and hardness raises the loss (the hardened negative law puts more mass on high scores)
    losses = [HUCL(hardness=h)(batch, beta).loss.item() for h in (0.0, 0.5, 2.0, 500.0)]
    assert losses == sorted(losses)


@pytest.mark.parametrize("norm", ["sphere", "ball", "none"])
def test_normalisation_options(norm: str) -> None:
    batch = unimodal_batch(n_images=6, n_views=2, seed=13, scale=0.8, normalise=False)
    got = HSCL(hardness=1.0, normalize=norm)(batch, 2.0).loss.item()
    assert got == pytest.approx(brute_force(batch, 2.0, 1.0, supervised=True, norm=norm), rel=1e-10)


def test_normalize_features_closed_form() -> None:
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    assert torch.allclose(normalize_features(x, "sphere")[:2], torch.tensor([[0.6, 0.8], [0.6, 0.8]]))
    assert torch.allclose(normalize_features(x, "ball"), torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))
    assert torch.equal(normalize_features(x, "none"), x)
    with pytest.raises(ValueError, match="normalize must be one of"):
        normalize_features(x, "cube")


def test_extra_negative_mask_and_anchor_without_negatives_give_finite_grads() -> None:
    batch = unimodal_batch(n_images=6, n_views=2, seed=17)
    z = batch.anchors.clone().requires_grad_(True)
    mask = torch.ones(12, 12, dtype=torch.bool)
    mask[0] = False  # anchor 0 loses all its negatives: dropped from the mean
    mask[3, 5] = False
    b = dataclasses.replace(batch, anchors=z, candidates=z, extra_negative_mask=mask)
    out = HSCL(hardness=1.0)(b, 3.0)
    loss = out.loss
    assert loss.item() == pytest.approx(brute_force(b, 3.0, 1.0, supervised=True), rel=1e-10)
    assert out.stats["valid_anchors"].item() == pytest.approx(11 / 12)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_gradient_matches_finite_differences() -> None:
    batch = unimodal_batch(n_images=4, n_views=2, dim=3, n_classes=2, seed=19, normalise=False)
    x = batch.anchors.clone().requires_grad_(True)

    def f(v):
        return HSCL(hardness=1.3, normalize="ball")(dataclasses.replace(batch, anchors=v, candidates=v), 2.0).loss

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_errors_name_the_problem_and_a_single_class_batch_is_a_zero_step() -> None:
    batch = unimodal_batch()
    unlabelled = dataclasses.replace(batch, labels=None, candidate_labels=None)
    with pytest.raises(ValueError, match="candidate_labels"):
        SCL()(unlabelled, 1.0)
    with pytest.raises(ValueError, match="labels and candidate_labels must be given together"):
        dataclasses.replace(batch, candidate_labels=None)
    with pytest.raises(ValueError, match=r"labels must have shape \(12,\)"):
        dataclasses.replace(batch, labels=batch.labels[:5])
    one_class = dataclasses.replace(batch, labels=torch.zeros(12, dtype=torch.long),
                                    candidate_labels=torch.zeros(12, dtype=torch.long))
    z = one_class.anchors.clone().requires_grad_(True)
    out = SCL()(dataclasses.replace(one_class, anchors=z, candidates=z), 1.0)  # no negatives anywhere
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.stats["valid_anchors"].item() == 0.0 and torch.all(z.grad == 0)
    with pytest.raises(ValueError, match="hscl hardness must be a number >= 0"):
        HSCL(hardness=-1.0)
    with pytest.raises(ValueError, match="normalize must be one of"):
        SCL(normalize="unit")


def test_registry_builds_them_by_name() -> None:
    assert REGISTRY["scl"] is SCL and REGISTRY["hscl"] is HSCL and REGISTRY["hucl"] is HUCL
    obj = build_estimator("hscl", num_keys=10, num_candidates=10, options={"hardness": 2.0, "normalize": "ball"})
    assert isinstance(obj, HSCL) and obj.hardness == 2.0 and obj.normalize == "ball" and obj.needs_labels
    assert not build_estimator("hucl", num_keys=1, num_candidates=1).needs_labels
    assert not InfoNCE().needs_labels
    with pytest.raises(ValueError, match="loss.options.scl.hardnes"):
        build_estimator("scl", num_keys=1, num_candidates=1, options={"hardnes": 1.0})
