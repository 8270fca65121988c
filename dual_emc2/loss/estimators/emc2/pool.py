"""The maths of EMC²'s pool kernel as pure functions (docs/DESIGN.md, section 2).

The batch is an auxiliary variable drawn independently of the chain state z_i.  With unimodal batches every image
brings V views, so a pool of the batch plus one lone state view would tell the state apart.  The pool is therefore
*thinned*: for each other image of the batch one of its V views is kept, chosen uniformly (an offset o_ig per anchor
and image), and the pool A_i(r) = {kept views} ∪ {z_i} holds lone views only, exchangeable with the state.  Rotating
the offsets by r = 0 … V−1 keeps every batch view in exactly one of V such pools; the Rao–Blackwell weights are the
average of the V pool softmaxes (each is unbiased given its pool, so the average is too), and the chain moves by one
exact draw from the pool of rotation 0.  With V = 1 (pairs) there is one pool: the batch plus the state.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["control_variate", "draw_rows", "gumbel_argmax", "lookup_columns", "pool_columns", "pool_logits",
           "rao_blackwell_weights", "thinned_pool_weights", "view_rotations"]


def lookup_columns(keys: Tensor, candidate_keys: Tensor) -> Tensor:
    """Column j with ``candidate_keys[j] == keys[i]`` (the first in key order), −1 where absent or ``keys[i] < 0``."""
    order = torch.argsort(candidate_keys, stable=True)
    sorted_keys = candidate_keys[order]
    pos = torch.searchsorted(sorted_keys, keys).clamp(max=sorted_keys.numel() - 1)
    col = order[pos]
    found = (sorted_keys[pos] == keys) & (keys >= 0)
    return torch.where(found, col, torch.full_like(col, -1))


def draw_rows(generator: torch.Generator, shape_per_row: tuple[int, ...], row_offset: int, total_rows: int,
              rows: int, device: torch.device) -> Tensor:
    """Uniforms in [0, 1) of shape [rows, *shape_per_row], drawn for all ``total_rows`` rows of the global batch and
    sliced: the numbers a row gets do not depend on how the batch is split over processes."""
    u = torch.rand((total_rows, *shape_per_row), generator=generator, device=device)
    return u[row_offset:row_offset + rows]


def gumbel_argmax(logits: Tensor, uniforms: Tensor) -> Tensor:
    """One exact draw per row from softmax(logits) (Gumbel-max), with the uniforms given."""
    g = -torch.log(-torch.log(uniforms.clamp(min=1e-12, max=1 - 1e-7)))
    return torch.argmax(logits + g, dim=1)


def pool_logits(scores: Tensor, valid: Tensor, state_score: Tensor, state_in_pool: Tensor, beta: float) -> Tensor:
    """[B, C + G] logits β s over an unthinned pool: columns 0..C−1 the batch (−inf where not a valid negative),
    columns C.. the state's G entries (``state_score`` [B, G], or [B] for G = 1; −inf where not in the pool)."""
    state_score = state_score.float()
    if state_score.dim() == 1:
        state_score = state_score[:, None]
    batch = (beta * scores.float()).masked_fill(~valid, float("-inf"))
    state = torch.where(state_in_pool[:, None], beta * state_score, torch.full_like(state_score, float("-inf")))
    return torch.cat([batch, state], dim=1)


def view_rotations(candidate_ids: Tensor, candidate_views: Tensor, views_per_id: int, offsets: Tensor) -> Tensor:
    """[B, C] rotation r(i, j) = (v(j) − o_i,g(j)) mod V in which anchor i's thinned pool keeps column j: g(j) is the
    column's sample (its rank among the distinct ``candidate_ids``), v(j) its view, and ``offsets`` [B, n_samples]
    uniforms in [0, 1) give o = ⌊V u⌋."""
    V = views_per_id
    group = torch.unique(candidate_ids, return_inverse=True)[1]
    o = (offsets * V).long().clamp(max=V - 1)
    return (candidate_views[None, :] - o[:, group]) % V


def thinned_pool_weights(batch_logits: Tensor, rotation: Tensor, state_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Rao–Blackwell weights averaged over the V thinned pools.

    ``batch_logits`` [B, C]: β s_ij, −inf outside D_neg; ``rotation`` [B, C]: the pool (0 … V−1) that keeps column j;
    ``state_logits`` [B, V]: β s(x_i, z_i) in each pool, −inf where the state is not in it.  Returns (w_batch [B, C],
    w_state [B]):  w_ij = e_ij / (V D_i,r(j)),  w_i,state = Σ_r e_i,state,r / (V D_ir),  with D_ir the sum of e over
    pool r (a pool with nothing in it contributes nothing)."""
    V = state_logits.shape[1]
    m = torch.maximum(batch_logits.max(dim=1).values, state_logits.max(dim=1).values)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))[:, None]
    e = torch.exp(batch_logits - m)
    e_state = torch.exp(state_logits - m)
    total = e_state.scatter_add(1, rotation, e)
    inv = torch.where(total > 0, 1.0 / total.clamp(min=1e-30), torch.zeros_like(total)) / V
    return e * inv.gather(1, rotation), (e_state * inv).sum(dim=1)


def pool_columns(valid: Tensor, candidate_ids: Tensor, state_id: Tensor, in_pool: Tensor) -> Tensor:
    """[B, C] the batch columns that can share a pool with the state: every valid negative, except where the
    state's sample is in the batch under another view (another epoch) — batches hold distinct samples, so only that
    sample's entries and the state can have been the state, and the pool is restricted to them."""
    same_sample = candidate_ids[None, :] == state_id[:, None]
    duplicate = in_pool & (same_sample & valid).any(dim=1)
    return torch.where(duplicate[:, None], valid & same_sample, valid)


def rao_blackwell_weights(batch_logits: Tensor, full_logits: Tensor, rotation: Tensor, state_logit: Tensor,
                          in_pool: Tensor, views_per_id: int) -> tuple[Tensor, Tensor]:
    """(w_batch [B, C], w_state [B]): for rows whose state is out of the batch (``in_pool``), the thinned pools'
    weights with the state (:func:`thinned_pool_weights`; ``batch_logits`` restricted by :func:`pool_columns`); for
    the others (no state, or a state that is a batch column) the softmax of ``full_logits`` over the whole batch."""
    w_thin, w_state = thinned_pool_weights(batch_logits, rotation, state_logit[:, None].repeat(1, views_per_id))
    w_batch = torch.where(in_pool[:, None], w_thin, torch.softmax(full_logits, dim=1))
    return w_batch, torch.where(in_pool, w_state, torch.zeros_like(w_state))


def control_variate(w_batch: Tensor, batch_softmax: Tensor, in_pool: Tensor, frozen: Tensor, q: float) -> Tensor:
    """Weights with ``reencode_fraction`` q < 1: rows whose state was encoded (``in_pool``) use h + (w − h)/q, rows
    that were not (``frozen``) the batch softmax h; E over the Bernoulli(q) choice is w, the unbiased weights."""
    return torch.where(in_pool[:, None], batch_softmax + (w_batch - batch_softmax) / q,
                       torch.where(frozen[:, None], batch_softmax, w_batch))
