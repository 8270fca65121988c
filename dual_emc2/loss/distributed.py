"""Small helpers over torch.distributed that are no-ops in a single process."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """``n`` of every process, in rank order (one small all-gather)."""
    if world_size() == 1:
        return [n]
    mine = torch.tensor([n], device=device)
    sizes = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(sizes, mine)
    return [int(s) for s in sizes]


def all_gather_rows(t: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenate ``t`` (no grad) from every process along dim 0, in rank order; sizes may differ between ranks
    (``sizes``: every process's row count when known, which saves the all-gather of the sizes)."""
    if world_size() == 1:
        return t
    sizes_i = sizes if sizes is not None else gather_sizes(t.shape[0], t.device)
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


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``t`` on every process with process ``src``'s ``t`` (a no-op in a single process); returns ``t``."""
    if world_size() > 1:
        dist.broadcast(t, src=src)
    return t


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` over processes in place (a no-op in a single process); returns ``t``."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_to_all_rows(t: Tensor, send_counts: list[int], recv_counts: list[int] | None = None
                    ) -> tuple[Tensor, list[int]]:
    """Send rows ``t[sum(send_counts[:p]) : sum(send_counts[:p + 1])]`` to process ``p``; returns the rows received
    (in rank order) and how many came from each process (exchanged first unless ``recv_counts`` is given)."""
    if world_size() == 1:
        return t, list(send_counts)
    if recv_counts is None:
        counts = torch.tensor(send_counts, dtype=torch.int64, device=t.device)
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts)
        recv_counts = [int(c) for c in received]
    out = t.new_empty((sum(recv_counts), *t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), output_split_sizes=recv_counts, input_split_sizes=list(send_counts))
    return out, recv_counts
