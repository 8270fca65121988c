"""Unimodal (φ = ψ) batches: every view is an anchor, its positive is another view of the same image (eq. 21)."""
from __future__ import annotations

import torch
from torch import Tensor

from dual_emc2.distributed import all_gather_rows, all_gather_with_grad, rank, world_size
from dual_emc2.objectives.base import ContrastiveBatch, EncodeFn


def unimodal_contrastive_batch(z: Tensor, ids: Tensor, n_views: int, encode_candidates: EncodeFn | None = None,
                               labels: Tensor | None = None) -> ContrastiveBatch:
    """Build the :class:`ContrastiveBatch` of one process from its projected views.

    ``z`` is [b·V, d] in image-major order (image k's views at rows kV … kV+V−1), ``ids`` the [b] global sample ids.
    Candidates are the views gathered over processes (with grad), in rank order, so the candidate columns are those
    of a single process holding the whole global batch.  View v of image k has positive view (v+1) mod V and chain
    key ``id·V + v``; the other views of the same image are neither positives nor negatives.  ``labels`` [b]: class
    labels of the images (supervised estimators), repeated per view and gathered like the candidates.
    """
    if n_views < 2:
        raise ValueError(f"unimodal contrastive training needs data.n_views >= 2, got {n_views}")
    b = ids.numel()
    if z.shape[0] != b * n_views:
        raise ValueError(f"expected {b} x {n_views} views, got {z.shape[0]} feature rows")
    local_ids = ids.repeat_interleave(n_views)
    candidates = all_gather_with_grad(z)
    candidate_ids = all_gather_rows(local_ids)
    rows = b * n_views
    offset = rank() * rows
    view = torch.arange(rows, device=z.device) % n_views
    cols = torch.arange(rows, device=z.device) + offset
    positive = cols - view + (view + 1) % n_views
    return ContrastiveBatch(
        anchors=z, candidates=candidates, positive=positive, anchor_ids=local_ids, candidate_ids=candidate_ids,
        anchor_keys=local_ids * n_views + view, row_offset=offset, total_rows=rows * world_size(),
        encode_candidates=encode_candidates,
        labels=None if labels is None else labels.repeat_interleave(n_views),
        candidate_labels=None if labels is None else all_gather_rows(labels.repeat_interleave(n_views)),
    )
