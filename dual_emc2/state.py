"""Per-anchor estimator state keyed by global sample id (EMC² chains, SogCLR's u).

The buffers hold one entry per key for the whole dataset, so they are identical on every process: each process
updates the entries of its own anchors and the updates are all-gathered (:func:`dual_emc2.distributed.all_gather_rows`).
Being registered buffers, they travel with ``state_dict()``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dual_emc2.distributed import all_gather_rows


def _check_keys(keys: Tensor, size: int, what: str) -> None:
    if keys.is_cuda:  # a bounds check would cost a host sync per step; CUDA indexing asserts on its own
        return
    if keys.numel() and (int(keys.min()) < 0 or int(keys.max()) >= size):
        raise IndexError(
            f"{what}: state keys must lie in [0, {size}), got range [{int(keys.min())}, {int(keys.max())}]; "
            "is num_keys (dataset size × anchors per sample) set right?"
        )


class ChainState(nn.Module):
    """EMC² Markov-chain state Z_i per anchor key: the candidate key of the current negative (−1: none yet; a sample
    id, or ``id · n_views + view`` when candidates are views) and its last computed score s(x_i, Z_i) (the ``stale``
    score of docs/DESIGN.md).  8 bytes per anchor (int32 + float32)."""

    def __init__(self, num_keys: int) -> None:
        super().__init__()
        if num_keys < 1:
            raise ValueError(f"num_keys must be >= 1, got {num_keys}")
        self.register_buffer("candidate_key", torch.full((num_keys,), -1, dtype=torch.int32))
        self.register_buffer("score", torch.full((num_keys,), float("-inf"), dtype=torch.float32))
        self._register_load_state_dict_pre_hook(_reject_pre_key_checkpoints)

    @property
    def num_keys(self) -> int:
        return self.candidate_key.numel()

    def read(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """(candidate key [B] int64, stored score [B] float32) of the chains of ``keys``."""
        _check_keys(keys, self.num_keys, "ChainState.read")
        return self.candidate_key[keys].long(), self.score[keys]

    @torch.no_grad()
    def write(self, keys: Tensor, candidate_key: Tensor, score: Tensor) -> None:
        """Store new states for ``keys`` (this process's anchors); every process receives every process's update."""
        keys, candidate_key, score = (all_gather_rows(keys), all_gather_rows(candidate_key),
                                      all_gather_rows(score.float()))
        self.candidate_key[keys] = candidate_key.to(torch.int32)
        self.score[keys] = score


def _reject_pre_key_checkpoints(state_dict, prefix, *_args) -> None:
    if prefix + "sample_id" in state_dict and prefix + "candidate_key" not in state_dict:
        raise ValueError(
            f"{prefix}sample_id: this checkpoint's EMC² chains hold sample ids (dual_emc2 0.1); chains now hold "
            "candidate keys. Resume it with dual_emc2 0.1, or start the estimator state afresh (load the model only)")


class AnchorScalarState(nn.Module):
    """One float per anchor key (e.g. SogCLR's log u_i), initialised to ``init``."""

    def __init__(self, num_keys: int, init: float = float("-inf")) -> None:
        super().__init__()
        if num_keys < 1:
            raise ValueError(f"num_keys must be >= 1, got {num_keys}")
        self.register_buffer("value", torch.full((num_keys,), init, dtype=torch.float32))

    def read(self, keys: Tensor) -> Tensor:
        _check_keys(keys, self.value.numel(), "AnchorScalarState.read")
        return self.value[keys]

    @torch.no_grad()
    def write(self, keys: Tensor, value: Tensor) -> None:
        keys, value = all_gather_rows(keys), all_gather_rows(value.float())
        self.value[keys] = value
