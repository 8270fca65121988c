"""Which chain states a step of EMC² needs, decided before the forward pass (docs/DESIGN.md, "States seen as the batch
sees them"): a state is a view (candidate key and epoch); it is a batch column only when both agree, and an
out-of-batch state is encoded when its Bernoulli(q) coin says so."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dual_emc2.loss.estimators.emc2.pool import lookup_columns
from dual_emc2.loss.state_views import StateViews

__all__ = ["ChainPlan", "plan_states", "state_features"]


@dataclass
class ChainPlan:
    """What one step of EMC² reads and needs, fixed before the forward pass.

    Per anchor row [B]: the chain's ``state_key``, ``stored_score`` and ``state_epoch``; ``col``, the batch column
    that *is* the state (same key and epoch) or −1; ``outside`` (a state that is not a batch column), the Bernoulli(q)
    coin ``chosen``, ``frozen`` (out of the batch and not chosen: kept as is this step), ``need`` (rows whose state
    view must be encoded) and ``grad_rows`` (rows whose state term has a gradient).  ``views``: the distinct state
    views to encode, one feature row each, and ``view_of_need`` [n_need] which of them each ``need`` row uses.
    ``step``: the estimator iteration the plan belongs to; ``epoch``: the batch's view epoch.

    Made by :meth:`EMC2.plan <dual_emc2.loss.estimators.emc2.EMC2.plan>` (:func:`plan_states`); hand it to the
    call as ``ContrastiveBatch.state_plan``, with the features of ``views`` as ``state_features``.

    Example::

        plan = emc2.plan(anchor_keys, candidate_keys, views_per_id=2, epoch=epoch)
        for sample_id, view, view_epoch in plan.views:    # the state views to encode, in feature-row order
            ...
    """

    anchor_keys: Tensor
    state_key: Tensor
    stored_score: Tensor
    state_epoch: Tensor
    col: Tensor
    outside: Tensor
    chosen: Tensor
    frozen: Tensor
    need: Tensor
    grad_rows: Tensor
    views: StateViews
    view_of_need: Tensor
    step: int
    epoch: int


@torch.no_grad()
def plan_states(anchor_keys: Tensor, state: tuple[Tensor, Tensor, Tensor], chosen: Tensor, candidate_keys: Tensor, *,
                views_per_id: int, epoch: int, step: int, exact_score: bool, reencode: bool, map_into_batch: bool
                ) -> ChainPlan:
    """The plan of one step from the chains' ``state`` (key, score, epoch per anchor row) and the Bernoulli(q) coins
    ``chosen``.  ``exact_score``: out-of-batch states chosen this step are encoded (their chain moves), the others are
    frozen; else (stale scores) only the gradient rows are encoded.  ``reencode``: chosen out-of-batch states get a
    gradient term."""
    state_key, stored_score, state_epoch = state
    if map_into_batch:
        col = lookup_columns(state_key, candidate_keys.to(state_key.device))
        col = torch.where(state_epoch == epoch, col, torch.full_like(col, -1))  # another epoch: another view
    else:
        col = torch.full_like(state_key, -1)
    outside = (state_key >= 0) & (col < 0)
    none = torch.zeros_like(outside)
    if exact_score:
        need = outside & chosen  # encoded: exact score, the chain moves, gradient term
        frozen = outside & ~chosen  # not this step: the chain stays (random-scan update)
        grad_rows = need if reencode else none
    else:
        frozen = none
        grad_rows = outside & chosen if reencode else none
        need = grad_rows
    V = views_per_id
    pair = torch.stack([state_key[need], state_epoch[need]], dim=1)
    uniq, inverse = torch.unique(pair, dim=0, return_inverse=True) if pair.shape[0] else (pair, pair[:, 0])
    views = StateViews(uniq[:, 0] // V, uniq[:, 0] % V, uniq[:, 1])
    return ChainPlan(anchor_keys, state_key, stored_score, state_epoch, col, outside, chosen, frozen, need, grad_rows,
                     views, inverse, step, int(epoch))


def state_features(plan: ChainPlan, given: Tensor | None, encode: object, dim: int, dtype: torch.dtype,
                   device: torch.device) -> Tensor | None:
    """[n_need, d] features of the ``need`` rows' state views: ``given`` (one row per ``plan.views`` entry, encoded
    with the batch), else ``encode`` (ids → features) by sample id (each id once, under grad only for the ids of
    gradient rows); None when no state is needed."""
    if len(plan.views) == 0:
        return None
    if given is not None:
        if given.dim() != 2 or given.shape[0] != len(plan.views) or given.shape[1] != dim:
            raise ValueError(f"emc2: state features must be [{len(plan.views)}, {dim}] (one row per requested state "
                             f"view), got {tuple(given.shape)}")
        return given[plan.view_of_need.to(given.device)]
    if encode is None:
        raise RuntimeError(
            f"emc2 needs the features of {len(plan.views)} chain-state views: ask "
            "GlobalContrastiveLoss.state_request(index) for them before the forward and pass state_x/state_y, or pass "
            "encode_x/encode_y (re-encoding by id); or build it with state_score='stale', out_of_batch='drop' (no "
            "state features, biased at small batch)")
    ids = plan.views.ids.to(device)
    uniq, inverse = torch.unique(ids, return_inverse=True)
    grad_view = torch.zeros(len(plan.views), dtype=torch.bool, device=device)
    grad_view[plan.view_of_need.to(device)[plan.grad_rows.to(device)[plan.need.to(device)]]] = True
    grad_uniq = torch.zeros(uniq.numel(), dtype=torch.bool, device=device)
    grad_uniq[inverse[grad_view]] = True
    parts, order = [], []
    if bool(grad_uniq.any()):
        with torch.enable_grad():
            parts.append(encode(uniq[grad_uniq]))
        order.append(grad_uniq.nonzero()[:, 0])
    if bool((~grad_uniq).any()):
        with torch.no_grad():
            parts.append(encode(uniq[~grad_uniq]))
        order.append((~grad_uniq).nonzero()[:, 0])
    feats = torch.cat([p.to(dtype) for p in parts])
    position = torch.empty_like(uniq)
    position[torch.cat(order)] = torch.arange(uniq.numel(), device=device)
    return feats[position[inverse]][plan.view_of_need.to(device)]
