"""Hard-negative contrastive loss, HCL (Robinson et al., ICLR 2021; Jiang et al. discuss its supervised forms).

With β = 1/t and hardness h, for anchor i with positive score s⁺ and negatives N_i (N = |N_i|):

    w_ij = softmax_j(h β s_ij)                       (importance weights toward hard negatives)
    Ng_i = max( N/(1 − τ⁺) · (Σ_j w_ij e^{β s_ij} − τ⁺ e^{β s⁺}),  N e^{−β} )    (debiasing with class prior τ⁺)
    ℓ_i  = −log( e^{β s⁺} / (e^{β s⁺} + Ng_i) )

computed in log space.  h = 0 and τ⁺ = 0 give the InfoNCE loss over negatives plus positive.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dual_emc2.loss.estimators.base import ContrastiveBatch, Estimator, EstimatorOutput


def hcl_loss(pos: Tensor, scores: Tensor, neg_mask: Tensor, beta: Tensor | float, hardness: float,
             tau_plus: float) -> Tensor:
    """Mean HCL loss over anchors (formula in the module docstring); differentiable in ``pos`` and ``scores``."""
    n = neg_mask.sum(dim=1).float()
    bs = (beta * scores).masked_fill(~neg_mask, float("-inf"))
    log_w = F.log_softmax(hardness * bs, dim=1)  # −inf on non-negatives
    log_reweighted = torch.logsumexp(log_w + bs, dim=1)  # log Σ w e^{βs}
    bpos = beta * pos
    if tau_plus > 0:
        # log(Σ w e^{βs} − τ⁺ e^{βs⁺}); the clamp below guards the case where the difference is not positive
        scale = torch.maximum(log_reweighted, bpos).detach()
        diff = torch.exp(log_reweighted - scale) - tau_plus * torch.exp(bpos - scale)
        log_ng = torch.log(diff.clamp(min=1e-30)) + scale + n.log() - math.log1p(-tau_plus)
    else:
        log_ng = log_reweighted + n.log()
    log_floor = n.log() - beta
    log_ng = torch.maximum(log_ng, log_floor)
    return (torch.logaddexp(bpos, log_ng) - bpos).mean()


class HCL(Estimator):
    """HCL estimator (Robinson et al. 2021; formula in the module docstring), no state.

    Args:
        num_keys, num_candidates: unused (the common constructor of
            :func:`~dual_emc2.loss.registry.build_estimator`).
        hardness: h ≥ 0, the concentration on hard negatives (Robinson et al.'s β; default 1.0).
        tau_plus: τ⁺ in [0, 1), the class prior of the debiasing (default 0.1); h = 0, τ⁺ = 0 is InfoNCE.

    Call: ``hcl(batch, beta)`` → :class:`~dual_emc2.loss.estimators.base.EstimatorOutput`, ``loss`` the mean HCL loss
    over the batch's anchors (stat ``hcl``).

    Example::

        z = F.normalize(torch.randn(8, 16, requires_grad=True), dim=-1)   # 4 images × 2 views, image-major
        batch = unimodal_contrastive_batch(z, torch.tensor([3, 7, 0, 5]), 2)
        out = HCL(hardness=1.0, tau_plus=0.1)(batch, beta=2.0)
        out.loss.backward()
    """

    name = "hcl"

    def __init__(self, num_keys: int = 1, num_candidates: int = 1, hardness: float = 1.0,
                 tau_plus: float = 0.1) -> None:
        super().__init__()
        if hardness < 0:
            raise ValueError(f"hcl hardness must be >= 0, got {hardness}")
        if not 0.0 <= tau_plus < 1.0:
            raise ValueError(f"hcl tau_plus must be in [0, 1), got {tau_plus}")
        self.hardness = hardness
        self.tau_plus = tau_plus

    def forward(self, batch: ContrastiveBatch, beta: Tensor | float) -> EstimatorOutput:
        scores = batch.scores()
        loss = hcl_loss(batch.positive_scores(scores), scores, batch.negative_mask, beta, self.hardness, self.tau_plus)
        return EstimatorOutput(loss, {"hcl": loss.detach()})
