"""Supervised and hard-negative contrastive losses of Jiang, Nguyen, Aeron, Ishwar ("Hard-Negative Sampling for
Contrastive Learning: Optimal Representation Geometry and Neural- vs Dimensional-Collapse"): SCL, HSCL, HUCL.

Jiang et al. write every loss as ψ(Σ_{k} φ(f(x)ᵀf(x⁻_k) − f(x)ᵀf(x⁺))) with InfoNCE's ψ(t) = log(1 + t) and
φ(t) = e^{t/τ}, negatives x⁻ drawn from a *hardened* law p⁻_h(x⁻ | x) ∝ e^{h f(x)ᵀf(x⁻)/τ} p⁻(x⁻) (hardness h ≥ 0;
h = 0 is the plain law).  On a batch, with β = 1/τ, s_ij = φ(x_i)ᵀψ(z_j), negatives N(i) (n_i = |N(i)|) and
positives P(i), the hardened expectation is estimated by importance weights (as in HCL, Robinson et al. 2021):

    w_ij  = softmax_{j ∈ N(i)} (h β s_ij)
    ℓ_ip  = log( 1 + n_i Σ_{j ∈ N(i)} w_ij e^{β (s_ij − s_ip)} )
    ℓ_i   = (1 / |P(i)|) Σ_{p ∈ P(i)} ℓ_ip,        L = mean of ℓ_i over anchors with P(i), N(i) non-empty
                                                       (0, with zero gradient, if there is none).

With h = 0, n_i Σ_j w_ij e^{β s_ij} = Σ_j e^{β s_ij} and ℓ_ip is the InfoNCE term of one positive.

* SCL  (supervised, h = 0) and HSCL (supervised, h > 0): P(i) = the batch positive plus every candidate of the
  anchor's class with another sample id; N(i) = candidates of another class.  Needs ``batch.labels`` and
  ``batch.candidate_labels``.  Candidates with the anchor's id other than its positive (the anchor itself, its other
  views) are neither positives nor negatives.
* HUCL (unsupervised, h > 0; h = 0 is UCL = InfoNCE): P(i) = {the batch positive}, N(i) = ``batch.negative_mask``
  (every other sample, whatever its class).

Feature normalisation (Jiang et al. compare the three): ``sphere`` f/‖f‖, ``ball`` f/max(1, ‖f‖) (projection onto the
unit ball), ``none`` (raw features; Jiang et al. report dimensional collapse without normalisation or hard negatives).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dual_emc2.loss.estimators.base import ContrastiveBatch, Estimator, EstimatorOutput

NORMALIZATIONS = ("sphere", "ball", "none")


def normalize_features(x: Tensor, mode: str) -> Tensor:
    """Project features [N, d] onto the unit sphere (``sphere``), the unit ball (``ball``) or leave them (``none``)."""
    if mode == "sphere":
        return F.normalize(x, dim=-1)
    if mode == "ball":
        return x / x.norm(dim=-1, keepdim=True).clamp(min=1.0)
    if mode == "none":
        return x
    raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {mode!r}")


def hard_negative_loss(scores: Tensor, pos_mask: Tensor, neg_mask: Tensor, beta: Tensor | float,
                       hardness: float) -> Tensor:
    """Per-anchor loss ℓ_i [B] of the module docstring (log space, differentiable in ``scores``); finite, and with
    finite gradients, also for anchors without positives or negatives, whose values are meaningless (callers drop them
    with :func:`valid_anchors`)."""
    bs = beta * scores
    has_neg = neg_mask.any(dim=1, keepdim=True)
    # rows without negatives get finite dummy logits (they are dropped by the caller; −inf rows would give NaN grads)
    neg_bs = torch.where(has_neg, bs.masked_fill(~neg_mask, float("-inf")), torch.zeros_like(bs))
    if hardness == 0:  # uniform weights: n Σ_j (1/n) e^{β s_ij} = Σ_j e^{β s_ij}
        log_neg = torch.logsumexp(neg_bs, dim=1)
    else:
        n = neg_mask.sum(dim=1).clamp(min=1).to(bs.dtype)
        log_w = F.log_softmax(hardness * neg_bs, dim=1)
        log_neg = torch.logsumexp(log_w + neg_bs, dim=1) + n.log()
    # ℓ_ip = log(e^{β s_ip} + n Σ w e^{β s_ij}) − β s_ip for every column; kept only where p ∈ P(i)
    per_pair = torch.logaddexp(bs, log_neg[:, None]) - bs
    per_pair = torch.where(pos_mask, per_pair, torch.zeros_like(per_pair))
    n_pos = pos_mask.sum(dim=1)
    return per_pair.sum(dim=1) / n_pos.clamp(min=1)


def valid_anchors(pos_mask: Tensor, neg_mask: Tensor) -> Tensor:
    """[B] bool: anchors with at least one positive and one negative."""
    return pos_mask.any(dim=1) & neg_mask.any(dim=1)


def supervised_masks(batch: ContrastiveBatch) -> tuple[Tensor, Tensor]:
    """(P, N) [B, C] bool for SCL/HSCL: positives = the batch positive + same-class candidates of other ids;
    negatives = other-class candidates (also filtered by ``extra_negative_mask``)."""
    if batch.labels is None or batch.candidate_labels is None:
        raise ValueError("supervised contrastive losses (scl, hscl) need class labels: ContrastiveBatch.labels "
                         "(anchor labels [B]) and ContrastiveBatch.candidate_labels ([C]); the dataset must have "
                         "labels and the trainer must pass them (estimator.needs_labels)")
    same_class = batch.candidate_labels[None, :] == batch.labels[:, None]
    same_id = batch.candidate_ids[None, :] == batch.anchor_ids[:, None]
    cols = torch.arange(batch.candidates.shape[0], device=batch.candidates.device)
    is_positive = cols[None, :] == batch.positive[:, None]
    pos = is_positive | (same_class & ~same_id)
    neg = ~same_class
    if batch.extra_negative_mask is not None:
        neg = neg & batch.extra_negative_mask
    return pos, neg


class _HardContrastive(Estimator):
    """Shared body of SCL / HSCL / HUCL; subclasses choose the masks."""

    def __init__(self, num_keys: int = 1, num_candidates: int = 1, hardness: float = 0.0,
                 normalize: str = "sphere") -> None:
        super().__init__()
        if not isinstance(hardness, (int, float)) or isinstance(hardness, bool) or hardness < 0:
            raise ValueError(f"{self.name} hardness must be a number >= 0, got {hardness!r}")
        normalize_features(torch.zeros(1, 1), normalize)  # validates the option name
        self.hardness, self.normalize = float(hardness), normalize

    def masks(self, batch: ContrastiveBatch) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, batch: ContrastiveBatch, beta: Tensor | float) -> EstimatorOutput:
        a = normalize_features(batch.anchors, self.normalize)
        c = normalize_features(batch.candidates, self.normalize)
        scores = a @ c.t()
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()
        pos, neg = self.masks(batch)
        keep = valid_anchors(pos, neg)
        per_anchor = hard_negative_loss(scores, pos, neg, beta, self.hardness)
        # a batch where no anchor has both (e.g. a single-class batch for SCL) contributes a zero loss and gradient
        loss = (per_anchor * keep).sum() / keep.sum().clamp(min=1)
        with torch.no_grad():
            stats = {self.name: loss.detach(), "valid_anchors": keep.float().mean(),
                     "n_positives": (pos & keep[:, None]).sum() / keep.sum().clamp(min=1),
                     "feature_norm": batch.anchors.detach().norm(dim=1).mean()}
        return EstimatorOutput(loss, stats)


class SCL(_HardContrastive):
    """Supervised contrastive loss (Jiang et al.'s SCL; ``hardness`` 0): positives are the batch positive and every
    candidate of the anchor's class, negatives the other classes (module docstring).  No state.

    Args:
        num_keys, num_candidates: unused (the common constructor of
            :func:`~dual_emc2.loss.registry.build_estimator`).
        hardness: h ≥ 0 (0: SCL; > 0: HSCL).
        normalize: feature normalisation before scoring, ``"sphere"`` (default), ``"ball"`` or ``"none"``.

    Call: ``scl(batch, beta)`` → :class:`~dual_emc2.loss.estimators.base.EstimatorOutput` (stats ``scl``,
    ``valid_anchors``, ``n_positives``, ``feature_norm``); ``batch`` must carry ``labels`` and ``candidate_labels``.

    Example::

        z = F.normalize(torch.randn(8, 16, requires_grad=True), dim=-1)   # 4 images × 2 views, image-major
        batch = unimodal_contrastive_batch(z, torch.tensor([3, 7, 0, 5]), 2, labels=torch.tensor([1, 0, 1, 2]))
        out = SCL()(batch, beta=10.0)
        out.loss.backward()
    """

    name = "scl"
    needs_labels = True

    def __init__(self, num_keys: int = 1, num_candidates: int = 1, hardness: float = 0.0,
                 normalize: str = "sphere") -> None:
        super().__init__(num_keys, num_candidates, hardness, normalize)

    def masks(self, batch: ContrastiveBatch) -> tuple[Tensor, Tensor]:
        return supervised_masks(batch)


class HSCL(SCL):
    """Hard-negative supervised contrastive loss (Jiang et al.'s HSCL): SCL with hardness h > 0 (default 1).

    Args and call as :class:`SCL` (``hardness`` defaults to 1.0; stat ``hscl``); needs labels.

    Example::

        batch = unimodal_contrastive_batch(z, ids, 2, labels=labels)       # labels: [b] class of each image
        out = HSCL(hardness=1.0, normalize="ball")(batch, beta=10.0)
        out.loss.backward()
    """

    name = "hscl"

    def __init__(self, num_keys: int = 1, num_candidates: int = 1, hardness: float = 1.0,
                 normalize: str = "sphere") -> None:
        super().__init__(num_keys, num_candidates, hardness, normalize)


class HUCL(_HardContrastive):
    """Hard-negative unsupervised contrastive loss (Jiang et al.'s HUCL; h = 0 gives UCL = InfoNCE).  No labels:
    the positive is the batch positive, the negatives ``batch.negative_mask``.

    Args and call as :class:`SCL` (``hardness`` defaults to 1.0; stat ``hucl``).

    Example::

        batch = unimodal_contrastive_batch(z, ids, 2)      # z: [2b, d] unit views, image-major; ids: [b]
        out = HUCL(hardness=1.0)(batch, beta=10.0)
        out.loss.backward()
    """

    name = "hucl"

    def __init__(self, num_keys: int = 1, num_candidates: int = 1, hardness: float = 1.0,
                 normalize: str = "sphere") -> None:
        super().__init__(num_keys, num_candidates, hardness, normalize)

    def masks(self, batch: ContrastiveBatch) -> tuple[Tensor, Tensor]:
        cols = torch.arange(batch.candidates.shape[0], device=batch.candidates.device)
        pos = cols[None, :] == batch.positive[:, None]
        return pos, batch.negative_mask & ~pos
