"""Batches of one step as the estimators see them (:class:`ContrastiveBatch`): features gathered with grad over
processes, global ids, positives, state keys.  Unimodal (φ = ψ, eq. 21 of Yau et al.): every view is an anchor, its
positive another view of the same image.  Bimodal: x→y and y→x, D_neg(x_i) = {y_j : j ≠ i}."""
from __future__ import annotations

import torch
from torch import Tensor

from dual_emc2.loss.distributed import all_gather_rows, all_gather_with_grad, rank, world_size
from dual_emc2.loss.estimators.base import ContrastiveBatch, EncodeFn


def view_keys(ids: Tensor, n_views: int) -> Tensor:
    """Key ``id · V + v`` of every view of the samples ``ids``, image-major ([b·V]: sample k's views at kV … kV+V−1):
    the one formula for unimodal anchor and candidate keys (a chain state names a view by it)."""
    return ids.repeat_interleave(n_views) * n_views + torch.arange(n_views, device=ids.device).repeat(ids.numel())


def unimodal_layout(ids: Tensor, n_views: int) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """(anchor keys [b·V] of this process's views, candidate ids [C] and keys [C] of the global batch gathered in rank
    order, row offset, total rows) of a unimodal step over the samples ``ids`` (one collective)."""
    candidate_ids = all_gather_rows(ids.repeat_interleave(n_views))
    rows = ids.numel() * n_views
    candidate_keys = view_keys(candidate_ids[::n_views], n_views)
    return view_keys(ids, n_views), candidate_ids, candidate_keys, rank() * rows, rows * world_size()


def unimodal_contrastive_batch(z: Tensor, ids: Tensor, n_views: int, encode_candidates: EncodeFn | None = None,
                               labels: Tensor | None = None, *, epoch: int = 0,
                               state_plan: object = None, state_features: Tensor | None = None) -> ContrastiveBatch:
    """Build the :class:`ContrastiveBatch` of one process from its projected views.

    ``z`` is [b·V, d] in image-major order (image k's views at rows kV … kV+V−1), ``ids`` the [b] global sample ids.
    Candidates are the views gathered over processes (with grad), in rank order, so the candidate columns are those
    of a single process holding the whole global batch.  View v of image k has positive view (v+1) mod V, and anchor
    key and candidate key ``id·V + v`` (:func:`view_keys`); the other views of the same image are neither positives
    nor negatives.  ``labels`` [b]: class labels of the images (supervised estimators), repeated per view and
    gathered like the candidates.  ``epoch``: the augmentation epoch of the views; ``state_plan`` /
    ``state_features``: the estimator's planned chain states and their features, encoded with the batch.
    """
    if n_views < 2:
        raise ValueError(f"unimodal contrastive training needs data.n_views >= 2, got {n_views}")
    b = ids.numel()
    if z.shape[0] != b * n_views:
        raise ValueError(f"expected {b} x {n_views} views, got {z.shape[0]} feature rows")
    anchor_keys, candidate_ids, candidate_keys, offset, total = unimodal_layout(ids, n_views)
    candidates = all_gather_with_grad(z)
    rows = b * n_views
    view = torch.arange(rows, device=z.device) % n_views
    cols = torch.arange(rows, device=z.device) + offset
    positive = cols - view + (view + 1) % n_views
    return ContrastiveBatch(
        anchors=z, candidates=candidates, positive=positive, anchor_ids=ids.repeat_interleave(n_views),
        candidate_ids=candidate_ids, anchor_keys=anchor_keys, candidate_keys=candidate_keys,
        views_per_id=n_views, epoch=epoch, row_offset=offset, total_rows=total,
        encode_candidates=encode_candidates, state_plan=state_plan, state_features=state_features,
        labels=None if labels is None else labels.repeat_interleave(n_views),
        candidate_labels=None if labels is None else all_gather_rows(labels.repeat_interleave(n_views)),
    )


def bimodal_contrastive_batches(
    zx: Tensor, zy: Tensor, ids: Tensor, *, x_groups: Tensor | None = None, y_groups: Tensor | None = None,
    encode_x: EncodeFn | None = None, encode_y: EncodeFn | None = None, epoch: int = 0,
    plans: tuple[object, object] = (None, None), state_x: Tensor | None = None, state_y: Tensor | None = None,
) -> tuple[ContrastiveBatch, ContrastiveBatch]:
    """The x→y and y→x :class:`ContrastiveBatch` of one process.

    ``zx``, ``zy``: [b, d] unit-norm φ(x_i), ψ(y_i) of this process's pairs; ``ids``: their [b] global indices.
    ``x_groups`` / ``y_groups``: optional [b] ids of identical-x / identical-y groups; candidates of the anchor's
    group are known false negatives and are masked.  ``encode_y`` (ψ of y by sample index) serves x→y estimators
    that need out-of-batch candidates, ``encode_x`` the reverse direction.  ``plans``: the x→y and y→x estimators'
    state plans; their states are y samples (features ``state_y``, from ψ) and x samples (``state_x``, from φ).
    """
    b = ids.numel()
    if zx.shape[0] != b or zy.shape[0] != b:
        raise ValueError(f"expected {b} x and y feature rows, got {zx.shape[0]} and {zy.shape[0]}")
    cand_y, cand_x = all_gather_with_grad(zy), all_gather_with_grad(zx)
    cand_ids = all_gather_rows(ids)
    offset = rank() * b
    positive = torch.arange(b, device=zx.device) + offset
    total = b * world_size()
    mask = None
    if x_groups is not None and y_groups is not None:
        mask = same_group_mask(x_groups, y_groups, all_gather_rows(x_groups), all_gather_rows(y_groups))
    xy = ContrastiveBatch(anchors=zx, candidates=cand_y, positive=positive, anchor_ids=ids, candidate_ids=cand_ids,
                          epoch=epoch, row_offset=offset, total_rows=total, encode_candidates=encode_y,
                          state_plan=plans[0], state_features=state_y, extra_negative_mask=mask)
    yx = ContrastiveBatch(anchors=zy, candidates=cand_x, positive=positive, anchor_ids=ids, candidate_ids=cand_ids,
                          epoch=epoch, row_offset=offset, total_rows=total, encode_candidates=encode_x,
                          state_plan=plans[1], state_features=state_x, extra_negative_mask=mask)
    return xy, yx


def same_group_mask(anchor_x: Tensor, anchor_y: Tensor, cand_x: Tensor, cand_y: Tensor) -> Tensor:
    """[B, C] bool, False where candidate j is a known false negative of anchor i: same x group or same y group
    (identical text or image).  Feed it as ``ContrastiveBatch.extra_negative_mask``; the own column is False too,
    which the id mask already removes."""
    return (anchor_x[:, None] != cand_x[None, :]) & (anchor_y[:, None] != cand_y[None, :])
