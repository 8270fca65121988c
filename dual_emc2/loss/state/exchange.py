"""How a step reads and writes the per-anchor state rows of its anchors across processes
(:mod:`dual_emc2.loss.state.keyed`).

A table is a list of 1-D columns of 4-byte dtypes (int32, float32), moved as their int32 bit patterns, so every
exchange is bit-exact (−0.0, NaN payloads and −inf included).  ``keys`` are this process's anchor keys; the state of a
key lives on the processes its :class:`~dual_emc2.loss.state.layout.KeyLayout` says.

* Replicated (every process holds every row): a read is local; a write all-gathers (key, row) of every process and
  each process applies all of them, in rank order.
* Sharded, ``protocol="alltoall"`` (the default): a read sends each key to its owner and gets its row back
  (``all_to_all_single``: the counts, the keys, the rows); the write sends each new row to its owner (the read's
  routing is reused).  Traffic O(batch per process), memory O(N / W).
* Sharded, ``protocol="gather"``: a read all-gathers the keys of the global batch, each owner fills the rows it owns
  (zero elsewhere) and one all-reduce (sum of int32 bits: exactly one process contributes a non-zero word per entry)
  gives every process its rows; the write all-gathers the new rows (the read's keys reused) and each owner keeps its
  own.  Traffic O(global batch).

Both take four collectives per read + write; with 4 gloo processes the all-to-all round was 1.2–1.3× the replicated
one and the gather round 2× (experiments/bench_state.py: ring all-gather and all-reduce take W − 1 and 2(W − 1)
sequential hops, an all-to-all one), hence the default.

Both sharded protocols apply the rows of a write in the order of the global batch, as the replicated write does, so
the tables of all three are equal after every step.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dual_emc2.loss.distributed import all_gather_rows, all_reduce_sum_, all_to_all_rows, gather_sizes, rank
from dual_emc2.loss.state.layout import KeyLayout

__all__ = ["PROTOCOLS", "owner_apply", "owner_fill", "pack", "read_rows", "unpack", "write_rows"]

PROTOCOLS = ("alltoall", "gather")


def pack(columns: list[Tensor]) -> Tensor:
    """[n, C] int32: the bit patterns of ``C`` 1-D columns of 4-byte dtypes."""
    return torch.stack([c.contiguous().view(torch.int32) for c in columns], dim=1)


def unpack(packed: Tensor, dtypes: list[torch.dtype]) -> list[Tensor]:
    """The columns of :func:`pack`, back in their dtypes."""
    return [packed[:, i].contiguous().view(dt) for i, dt in enumerate(dtypes)]


def owner_fill(columns: list[Tensor], layout: KeyLayout, keys: Tensor) -> Tensor:
    """[len(keys), C] int32: the packed rows of the ``keys`` this process owns, zero for the others (summed over the
    processes, every key's row)."""
    out = torch.zeros((keys.numel(), len(columns)), dtype=torch.int32, device=keys.device)
    mine = layout.owns(keys)
    local = layout.local_index(keys[mine])
    out[mine] = pack([c[local] for c in columns])
    return out


def owner_apply(columns: list[Tensor], layout: KeyLayout, keys: Tensor, packed: Tensor) -> None:
    """Store the packed rows of the ``keys`` this process owns (in the given order), ignore the others."""
    mine = layout.owns(keys)
    local = layout.local_index(keys[mine])
    for i, col in enumerate(columns):
        col[local] = packed[mine, i].contiguous().view(col.dtype)


def read_rows(columns: list[Tensor], layout: KeyLayout, keys: Tensor, protocol: str = "alltoall"
              ) -> tuple[list[Tensor], Any]:
    """The rows of ``keys`` (one tensor per column) and a context that lets the write of the same keys skip the
    key exchange.  Every process must call it (a collective) when the table is sharded."""
    dtypes = [c.dtype for c in columns]
    if layout.world == 1:
        return [c[keys] for c in columns], None
    if protocol == "gather":
        sizes = gather_sizes(keys.numel(), keys.device)
        every = all_gather_rows(keys, sizes)
        packed = all_reduce_sum_(owner_fill(columns, layout, every))
        start = sum(sizes[:rank()])
        return unpack(packed[start:start + keys.numel()], dtypes), ("gather", every, sizes)
    if protocol == "alltoall":
        owner = layout.owner(keys)
        order = torch.argsort(owner, stable=True)
        counts = torch.bincount(owner, minlength=layout.world).tolist()
        asked, asked_counts = all_to_all_rows(keys[order], counts)
        local = layout.local_index(asked)
        rows, _ = all_to_all_rows(pack([c[local] for c in columns]), asked_counts, recv_counts=counts)
        out = torch.empty_like(rows)
        out[order] = rows
        return unpack(out, dtypes), ("alltoall", order, counts, asked, asked_counts)
    raise ValueError(f"state exchange protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")


@torch.no_grad()
def write_rows(columns: list[Tensor], layout: KeyLayout, keys: Tensor, values: list[Tensor], context: Any = None,
               protocol: str = "alltoall") -> None:
    """Store ``values`` (one tensor per column, rows of ``keys``) wherever the layout keeps them; ``context``: what
    :func:`read_rows` returned for the same keys (or None).  A collective when several processes train."""
    rows = pack([v.to(c.dtype) for v, c in zip(values, columns)])
    if layout.world == 1 and context is None:  # replicated: every process applies every process's rows
        both = all_gather_rows(torch.cat([keys[:, None].long(), rows.long()], dim=1))
        owner_apply(columns, layout, both[:, 0], both[:, 1:].to(torch.int32))
        return
    if context is None:
        context = _key_context(layout, keys, protocol)
    if context[0] == "gather":
        _, every, sizes = context
        owner_apply(columns, layout, every, all_gather_rows(rows, sizes))
    else:
        _, order, counts, asked, asked_counts = context
        received, _ = all_to_all_rows(rows[order], counts, recv_counts=asked_counts)
        owner_apply(columns, layout, asked, received)


def _key_context(layout: KeyLayout, keys: Tensor, protocol: str) -> Any:
    """The key exchange of a read, for a write without one."""
    if protocol == "gather":
        sizes = gather_sizes(keys.numel(), keys.device)
        return "gather", all_gather_rows(keys, sizes), sizes
    owner = layout.owner(keys)
    order = torch.argsort(owner, stable=True)
    counts = torch.bincount(owner, minlength=layout.world).tolist()
    asked, asked_counts = all_to_all_rows(keys[order], counts)
    return "alltoall", order, counts, asked, asked_counts
