"""SogCLR (Yuan et al., "Provable Stochastic Optimization for Global Contrastive Learning", ICML 2022): moving-average
estimate u_i of the per-anchor normaliser.

    g_i = 1/|N_i| Σ_{j ∈ N_i} exp(β s_ij)            (N_i: in-batch negatives of anchor i)
    u_i ← (1 − γ) u_i + γ g_i                        (Algorithm 1 of SogCLR, u_i = 0 initially)
    ∇ ≈ β/B Σ_i [ −∇s_i⁺ + Σ_{j∈N_i} exp(β s_ij) / (u_i |N_i|) ∇s_ij ]

u is stored as log u (exp(β s) overflows float32 for β ≳ 88, e.g. a learned CLIP temperature).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from dual_emc2.loss.estimators.base import (
    ContrastiveBatch,
    Estimator,
    EstimatorOutput,
    weighted_negative_surrogate,
)
from dual_emc2.loss.state.keyed import AnchorScalarState


def sogclr_update_log_u(log_u: Tensor, log_g: Tensor, gamma: float) -> Tensor:
    """log of (1 − γ) u + γ g, computed in log space; γ = 1 gives g."""
    if gamma >= 1.0:
        return log_g
    return torch.logaddexp(log_u + math.log1p(-gamma), log_g + math.log(gamma))


class SogCLR(Estimator):
    """SogCLR estimator with per-anchor u in a buffer (``state_dict``-saved).

    Args:
        num_keys: number of anchor keys (dataset size × anchors per sample).
        gamma: moving-average weight γ of the newest batch estimate (LibAUC default 0.9).
        init: ``"zero"`` (u_i = 0 before the first visit, as in SogCLR's Algorithm 1) or ``"first"`` (u_i = g_i at the
            first visit).
        state_sharding: layout of u over processes, ``"auto"``/``"replicated"``/``"sharded"``
            (:mod:`dual_emc2.loss.state.layout`; config key ``loss.state_sharding``).
        num_candidates: unused (the common constructor of :func:`~dual_emc2.loss.registry.build_estimator`).

    Call: ``sogclr(batch, beta)`` → :class:`~dual_emc2.loss.estimators.base.EstimatorOutput` (stats ``weight_sum``,
    ``log_u``); it updates u of the batch's anchor keys.

    Example::

        sogclr = SogCLR(num_keys=2 * n, gamma=0.9)          # n = len(dataset), 2 views (anchors) per image
        batch = unimodal_contrastive_batch(z, ids, 2)        # z: [2b, d] unit views, image-major; ids: [b]
        out = sogclr(batch, beta=10.0)
        out.loss.backward()
    """

    name = "sogclr"

    def __init__(self, num_keys: int, num_candidates: int = 1, gamma: float = 0.9, init: str = "zero",
                 state_sharding: str = "auto") -> None:
        super().__init__()
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"sogclr gamma must be in (0, 1], got {gamma}")
        if init not in ("zero", "first"):
            raise ValueError(f"sogclr init must be 'zero' or 'first', got {init!r}")
        self.gamma = gamma
        self.init = init
        self.u = AnchorScalarState(num_keys, init=float("-inf"), sharding=state_sharding)

    def forward(self, batch: ContrastiveBatch, beta: Tensor | float) -> EstimatorOutput:
        b = self.beta_value(beta)
        scores = batch.scores()
        neg = batch.negative_mask
        n_neg = neg.sum(dim=1).clamp(min=1).float()
        with torch.no_grad():
            logits = (b * scores.detach().float()).masked_fill(~neg, float("-inf"))
            log_g = torch.logsumexp(logits, dim=1) - n_neg.log()
            old = self.u.read(batch.anchor_keys)
            if self.init == "first":
                old = torch.where(torch.isinf(old), log_g, old)
            log_u = sogclr_update_log_u(old, log_g, self.gamma)
            weights = torch.exp(logits - log_u[:, None]) / n_neg[:, None]
            self.u.write(batch.anchor_keys, log_u)
        loss = weighted_negative_surrogate(batch.positive_scores(scores), scores, weights, beta)
        return EstimatorOutput(loss, {"weight_sum": weights.sum(dim=1).mean(), "log_u": log_u.mean()})
