"""An alternative exchange of sharded per-anchor state, kept for the measurement that chose the library's all-to-all
(experiments/bench_state.py): a read all-gathers the keys of the global batch, each owner fills the rows it owns (zero
elsewhere) and one all-reduce (a sum of int32 bit patterns: exactly one process contributes a non-zero word per entry)
gives every process its rows; the write all-gathers the new rows (the read's keys reused) and each owner keeps its
own.  Traffic O(global batch), four collectives per read + write, bit-exact like the all-to-all.

    chains = ChainState(n, "sharded"); chains.exchange = GATHER
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from dual_emc2.loss.distributed import all_gather_rows, all_reduce_sum_, gather_sizes, rank
from dual_emc2.loss.state.exchange import owner_apply, owner_fill
from dual_emc2.loss.state.layout import KeyLayout

__all__ = ["GATHER", "Gather"]


class Gather:
    """The all-gather / all-reduce exchange (:class:`dual_emc2.loss.state.exchange.Exchange`)."""

    @staticmethod
    def _keys(keys: Tensor) -> tuple[Tensor, list[int]]:
        sizes = gather_sizes(keys.numel(), keys.device)
        return all_gather_rows(keys, sizes), sizes

    def read(self, columns: list[Tensor], layout: KeyLayout, keys: Tensor) -> tuple[Tensor, Any]:
        every, sizes = self._keys(keys)
        packed = all_reduce_sum_(owner_fill(columns, layout, every))
        start = sum(sizes[:rank()])
        return packed[start:start + keys.numel()], (every, sizes)

    def write(self, columns: list[Tensor], layout: KeyLayout, keys: Tensor, rows: Tensor, context: Any) -> None:
        every, sizes = context if context is not None else self._keys(keys)
        owner_apply(columns, layout, every, all_gather_rows(rows, sizes))


GATHER = Gather()
