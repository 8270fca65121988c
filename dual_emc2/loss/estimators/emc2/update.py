"""How an EMC² chain moves at the end of a step: one exact draw from its pool (the default), or the last state of the
M-H chain; frozen chains (not encoded this step, ``reencode_fraction`` < 1) keep their state."""
from __future__ import annotations

import torch
from torch import Tensor

from dual_emc2.loss.estimators.emc2.pool import gumbel_argmax

__all__ = ["draw_next", "next_state"]


def draw_next(batch_logits: Tensor, full_logits: Tensor, rotation: Tensor, state_logit: Tensor, in_pool: Tensor,
              uniforms: Tensor) -> Tensor:
    """Column of one exact draw per row (−1: the out-of-batch state stays), from the pool of rotation 0 (an
    out-of-batch state and one view per batch sample) or from the whole batch (no state, or a state that is a batch
    column); ``uniforms`` [B, C + 1]."""
    C = batch_logits.shape[1]
    thin0 = batch_logits.masked_fill(rotation != 0, float("-inf"))
    logits = torch.cat([torch.where(in_pool[:, None], thin0, full_logits), state_logit[:, None]], dim=1)
    pick = gumbel_argmax(logits, uniforms)
    return torch.where(pick < C, pick, torch.full_like(pick, -1))


def next_state(new_col: Tensor, new_score: Tensor, state: tuple[Tensor, Tensor, Tensor], frozen: Tensor,
               candidate_keys: Tensor, epoch: int) -> tuple[Tensor, Tensor, Tensor]:
    """(key, score, epoch) of every chain after the step: the batch column it moved to (that view: its key, this
    epoch, its score), or its state (``new_col`` −1) with ``new_score``; frozen chains keep their stored state."""
    state_key, stored_score, state_epoch = state
    new_col = torch.where(frozen, torch.full_like(new_col, -1), new_col)
    key = torch.where(new_col >= 0, candidate_keys[new_col.clamp(min=0)], state_key)
    ep = torch.where(new_col >= 0, torch.full_like(state_epoch, epoch), state_epoch)
    return key, torch.where(frozen, stored_score, new_score), ep
