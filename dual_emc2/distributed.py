"""Small helpers over torch.distributed that are no-ops in a single process."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_gather_rows(t: Tensor) -> Tensor:
    """Concatenate ``t`` (no grad) from every process along dim 0, in rank order; sizes may differ between ranks."""
    if world_size() == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes_i = [int(s) for s in sizes]
    pad = max(sizes_i) - t.shape[0]
    padded = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) if pad else t.contiguous()
    out = [torch.empty_like(padded) for _ in sizes_i]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes_i)])


def all_gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` from every process keeping the autograd graph (backward sums each rank's gradient
    contributions into the owner's slice: the local-loss pattern, docs/DESIGN.md section 3)."""
    if world_size() == 1:
        return t
    import torch.distributed.nn.functional as dnn

    return torch.cat(dnn.all_gather(t.contiguous()), dim=0)
