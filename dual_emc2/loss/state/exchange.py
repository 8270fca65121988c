"""How a step reads and writes the per-anchor state rows of its anchors across processes
(:mod:`dual_emc2.loss.state.keyed`).

A table is a list of 1-D columns of 4-byte dtypes (int32, float32), moved as their int32 bit patterns, so every
exchange is bit-exact (−0.0, NaN payloads and −inf included).  ``keys`` are this process's anchor keys; the state of a
key lives on the processes its :class:`~dual_emc2.loss.state.layout.KeyLayout` says.

* Replicated (every process holds every row): a read is local; a write all-gathers (key, row) of every process and
  each process applies all of them, in rank order.
* Sharded (:class:`AllToAll`): a read sends each key to its owner and gets its row back (``all_to_all_single``: the
  counts, the keys, the rows); the write sends each new row to its owner (the read's routing is reused).  Traffic
  O(batch per process), memory O(N / W), four collectives per read + write.

An :class:`Exchange` is pluggable (``KeyedState.exchange``): experiments/gather_exchange.py holds an all-gather /
all-reduce alternative that experiments/bench_state.py measured at 2× the replicated round against 1.2–1.3× for the
all-to-all with 4 gloo processes (ring collectives take W − 1 or 2(W − 1) sequential hops, an all-to-all one).  Every
exchange applies the rows of a write in the order of the global batch, as the replicated write does, so the tables of
every layout are equal after every step.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from dual_emc2.loss.distributed import all_gather_rows, all_to_all_rows
from dual_emc2.loss.state.layout import KeyLayout

__all__ = ["ALL_TO_ALL", "AllToAll", "Exchange", "owner_apply", "owner_fill", "pack", "read_rows", "unpack",
           "write_rows"]


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


class Exchange(Protocol):
    """How a sharded table's rows travel: ``read`` returns the rows of ``keys`` (packed, :func:`pack`) and a context
    for the write of the same keys; ``write`` stores packed rows where their owners are (``context`` from the read
    of the same keys, or None).

    Both are collectives: every process calls them with its own ``keys`` (a 1-D int64 tensor), ``columns`` being
    this process's local columns and ``layout`` their :class:`~dual_emc2.loss.state.layout.KeyLayout`.  Set an
    implementation on a table or its class (``KeyedState.exchange``); :data:`ALL_TO_ALL` is the default.

    Example::

        class Logged(AllToAll):                          # an exchange that counts the keys it routes
            def read(self, columns, layout, keys):
                print(f"reading {keys.numel()} rows")
                return super().read(columns, layout, keys)

        emc2.chains.exchange = Logged()                  # one table; or ChainState.exchange for every chain table
    """

    def read(self, columns: list[Tensor], layout: KeyLayout, keys: Tensor) -> tuple[Tensor, Any]: ...

    def write(self, columns: list[Tensor], layout: KeyLayout, keys: Tensor, rows: Tensor, context: Any) -> None: ...


class AllToAll:
    """The default :class:`Exchange` of a sharded table: each key goes to its owner and its row comes back
    (``all_to_all_single``); the write reuses the routing of the read of the same keys.  No constructor arguments;
    :data:`ALL_TO_ALL` is the shared instance.

    Example::

        packed, context = ALL_TO_ALL.read(table.columns(), table.layout, keys)   # a collective
        ALL_TO_ALL.write(table.columns(), table.layout, keys, packed, context)
    """

    @staticmethod
    def _route(layout: KeyLayout, keys: Tensor) -> tuple[Tensor, list[int], Tensor, list[int]]:
        owner = layout.owner(keys)
        order = torch.argsort(owner, stable=True)
        counts = torch.bincount(owner, minlength=layout.world).tolist()
        asked, asked_counts = all_to_all_rows(keys[order], counts)
        return order, counts, asked, asked_counts

    def read(self, columns: list[Tensor], layout: KeyLayout, keys: Tensor) -> tuple[Tensor, Any]:
        order, counts, asked, asked_counts = self._route(layout, keys)
        local = layout.local_index(asked)
        rows, _ = all_to_all_rows(pack([c[local] for c in columns]), asked_counts, recv_counts=counts)
        out = torch.empty_like(rows)
        out[order] = rows
        return out, (order, counts, asked, asked_counts)

    def write(self, columns: list[Tensor], layout: KeyLayout, keys: Tensor, rows: Tensor, context: Any) -> None:
        order, counts, asked, asked_counts = context if context is not None else self._route(layout, keys)
        received, _ = all_to_all_rows(rows[order], counts, recv_counts=asked_counts)
        owner_apply(columns, layout, asked, received)


ALL_TO_ALL = AllToAll()


def read_rows(columns: list[Tensor], layout: KeyLayout, keys: Tensor, exchange: Exchange = ALL_TO_ALL
              ) -> tuple[list[Tensor], Any]:
    """The rows of ``keys`` (one tensor per column) and a context that lets the write of the same keys skip the
    key exchange.  Every process must call it (a collective) when the table is sharded."""
    dtypes = [c.dtype for c in columns]
    if layout.world == 1:
        return [c[keys] for c in columns], None
    packed, context = exchange.read(columns, layout, keys)
    return unpack(packed, dtypes), context


@torch.no_grad()
def write_rows(columns: list[Tensor], layout: KeyLayout, keys: Tensor, values: list[Tensor], context: Any = None,
               exchange: Exchange = ALL_TO_ALL) -> None:
    """Store ``values`` (one tensor per column, rows of ``keys``) wherever the layout keeps them; ``context``: what
    :func:`read_rows` returned for the same keys (or None).  A collective when several processes train."""
    rows = pack([v.to(c.dtype) for v, c in zip(values, columns)])
    if layout.world == 1:  # replicated: every process applies every process's rows
        both = all_gather_rows(torch.cat([keys[:, None].long(), rows.long()], dim=1))
        owner_apply(columns, layout, both[:, 0], both[:, 1:].to(torch.int32))
        return
    exchange.write(columns, layout, keys, rows, context)
