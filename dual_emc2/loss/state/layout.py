"""Which process holds which per-anchor state rows (``loss.state_sharding``), without importing torch.

``replicated``: every process holds every key's row (the layout of a single process).  ``sharded``: process ``r`` of
``W`` owns the keys ``k`` with ``k % W == r``, stored at local row ``k // W``; a process then holds ⌈N / W⌉ rows.
``auto`` (the default) shards a table of at least :data:`AUTO_SHARD_BYTES` when several processes train, and
replicates smaller ones.  Both layouts train bit-identically (docs/DESIGN.md, section 3); only memory, checkpoint
files and the collectives of a state read differ.

Keys by residue (not contiguous ranges) make re-sharding cheap: going from ``W`` to ``W'`` processes, the new owner
of a key needs only the old shards ``r`` with ``r ≡ r' (mod gcd(W, W'))`` (:meth:`KeyLayout.sources`), e.g. one
shard when the number of processes doubles.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["AUTO_SHARD_BYTES", "SHARDING_MODES", "KeyLayout", "resolve_sharding"]

SHARDING_MODES: tuple[str, ...] = ("auto", "replicated", "sharded")  # the choices of loss.state_sharding
# ``auto`` shards a state table from this size on (per table: EMC²'s chains take 12 bytes a key, SogCLR's u 4, and a
# bimodal run has one table per direction): 256 MiB is 22M EMC² anchors, i.e. 11M samples of two directions
AUTO_SHARD_BYTES = 256 * 2**20


def resolve_sharding(mode: str, table_bytes: int, world_size: int) -> str:
    """``replicated`` or ``sharded`` for a table of ``table_bytes`` on ``world_size`` processes (``auto``: sharded
    from :data:`AUTO_SHARD_BYTES` on, and only with several processes)."""
    if mode not in SHARDING_MODES:
        raise ValueError(f"state_sharding must be one of {', '.join(SHARDING_MODES)}, got {mode!r}")
    if mode == "auto":
        return "sharded" if world_size > 1 and table_bytes >= AUTO_SHARD_BYTES else "replicated"
    return mode


@dataclass(frozen=True)
class KeyLayout:
    """The rows of ``num_keys`` keys that process ``rank`` of ``world`` holds: keys ``rank, rank + world, …``.  A
    replicated table is ``KeyLayout(num_keys, 1, 0)``.  Key arguments are integer tensors (or ints).

    Args:
        num_keys: keys of the table, N ≥ 1.
        world: processes the keys are spread over, W (1: replicated).
        rank: this process, in [0, W).

    Example::

        layout = KeyLayout(10, world=4, rank=1)      # keys 1, 5, 9
        layout.local_size                            # 3
        layout.local_index(9), layout.owns(6)        # (2, False)
        KeyLayout(10, world=8, rank=1).sources(4)    # [1]: the old shard that holds this process's keys
    """

    num_keys: int
    world: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.num_keys < 1 or self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"bad key layout: {self.num_keys} keys, rank {self.rank} of {self.world}")

    @property
    def local_size(self) -> int:
        """Rows this process holds: the keys in [0, num_keys) congruent to ``rank`` modulo ``world``."""
        return max(0, -(-(self.num_keys - self.rank) // self.world))

    def owner(self, keys: Any) -> Any:
        return keys % self.world

    def local_index(self, keys: Any) -> Any:
        """Local row of each key (meaningful where this process owns it)."""
        return keys // self.world

    def owns(self, keys: Any) -> Any:
        return keys % self.world == self.rank

    def sources(self, old_world: int) -> list[int]:
        """Ranks of a layout over ``old_world`` processes that hold at least one of this process's keys."""
        g = math.gcd(old_world, self.world)
        return [r for r in range(old_world) if r % g == self.rank % g]

    def describe(self) -> list[int]:
        """``[rank, world, num_keys]``: what a sharded state dict records of its layout."""
        return [self.rank, self.world, self.num_keys]
