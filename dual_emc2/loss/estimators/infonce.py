"""InfoNCE / NT-Xent (SimCLR, CLIP): softmax over the in-batch candidates (EMC² eq. 2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dual_emc2.loss.estimators.base import ContrastiveBatch, Estimator, EstimatorOutput


def infonce_logits(batch: ContrastiveBatch, scores: Tensor, beta: Tensor | float) -> Tensor:
    """β S with every candidate that shares the anchor's id masked out, except the positive itself (the anchor's own
    view in the unimodal setting; nothing else in the bimodal one)."""
    cols = torch.arange(scores.shape[1], device=scores.device)
    same_id = batch.candidate_ids[None, :] == batch.anchor_ids[:, None]
    drop = same_id & (cols[None, :] != batch.positive[:, None])
    if batch.extra_negative_mask is not None:
        drop = drop | (~batch.extra_negative_mask & (cols[None, :] != batch.positive[:, None]))
    return (beta * scores).masked_fill(drop, float("-inf"))


class InfoNCE(Estimator):
    """InfoNCE / NT-Xent (SimCLR, CLIP; EMC² eq. 2): cross-entropy of the positive against the in-batch candidates,
    ``F.cross_entropy(β S_masked, positive)``.  No state, no options.

    Args:
        num_keys, num_candidates: unused (the common constructor of
            :func:`~dual_emc2.loss.registry.build_estimator`).

    Call: ``infonce(batch, beta)`` → :class:`~dual_emc2.loss.estimators.base.EstimatorOutput` (stats ``infonce``,
    ``top1``).  Candidates that share the anchor's id, other than its positive, are masked, as are those of
    ``batch.extra_negative_mask``.

    Example::

        z = F.normalize(torch.randn(8, 16, requires_grad=True), dim=-1)   # 4 images × 2 views, image-major
        batch = unimodal_contrastive_batch(z, torch.tensor([3, 7, 0, 5]), 2)
        out = InfoNCE()(batch, beta=10.0)                                   # NT-Xent at τ = 0.1
        out.loss.backward()
    """

    name = "infonce"

    def __init__(self, num_keys: int = 1, num_candidates: int = 1) -> None:
        super().__init__()

    def forward(self, batch: ContrastiveBatch, beta: Tensor | float) -> EstimatorOutput:
        scores = batch.scores()
        logits = infonce_logits(batch, scores, beta)
        loss = F.cross_entropy(logits, batch.positive)
        with torch.no_grad():
            acc = (logits.argmax(dim=1) == batch.positive).float().mean()
        return EstimatorOutput(loss, {"infonce": loss.detach(), "top1": acc})
