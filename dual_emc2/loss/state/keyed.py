"""Per-anchor estimator state keyed by global anchor key (EMC² chains, SogCLR's u).

A :class:`KeyedState` holds one row per key: every key on every process (``replicated``) or, ``sharded``, the keys ``k ≡
rank (mod W)`` only (:mod:`dual_emc2.loss.state.layout`).  Each process reads and writes the rows of its own anchors;
:mod:`dual_emc2.loss.state.exchange` moves them between processes, bit-exactly, so both layouts train identically.  The
buffers travel with ``state_dict()``; a sharded table adds a ``shard`` buffer ``[rank, world, num_keys]`` saying which
rows it holds.  Loading adapts the layout: a replicated state dict loads into a sharded table (each process keeps its
rows), and :func:`load_state_shards` fills any layout from the shards of another number of processes.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from dual_emc2.loss.distributed import all_gather_rows, rank, world_size
from dual_emc2.loss.state.exchange import ALL_TO_ALL, Exchange, read_rows, write_rows
from dual_emc2.loss.state.layout import KeyLayout, resolve_sharding

__all__ = ["AnchorScalarState", "ChainState", "KeyedState", "assemble_state_dict", "keyed_states",
           "load_state_shards", "split_sharded_state"]

SHARD = "shard"  # the buffer of a sharded table naming its layout


def _check_keys(keys: Tensor, size: int, what: str) -> None:
    if keys.is_cuda:  # a bounds check would cost a host sync per step; CUDA indexing asserts on its own
        return
    if keys.numel() and (int(keys.min()) < 0 or int(keys.max()) >= size):
        raise IndexError(
            f"{what}: state keys must lie in [0, {size}), got range [{int(keys.min())}, {int(keys.max())}]; "
            "is num_keys (dataset size × anchors per sample) set right?"
        )


def _version(t: Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def owned_keys(layout: KeyLayout, device: torch.device | str = "cpu") -> Tensor:
    """The keys whose rows ``layout`` holds, in local row order."""
    return torch.arange(layout.rank, layout.num_keys, layout.world, device=device)


def _layout_of(state_dict: Mapping[str, Tensor], prefix: str, first_column: str) -> KeyLayout:
    meta = state_dict.get(prefix + SHARD)
    if meta is None:
        return KeyLayout(int(state_dict[prefix + first_column].numel()))
    r, w, n = (int(v) for v in meta.tolist())
    return KeyLayout(n, w, r)


class KeyedState(nn.Module):
    """Rows of per-key columns (``columns``: name → (4-byte dtype, initial value)) for ``num_keys`` keys, laid out
    ``replicated`` or ``sharded`` over the processes (``sharding``, see
    :func:`~dual_emc2.loss.state.layout.resolve_sharding`).
    Build it after the process group is initialised: the layout follows the world size at construction.

    Args:
        num_keys: number of keys N (dataset size × anchors per sample).
        columns: name → (dtype, initial value) of each column; 4-byte dtypes only (int32, float32).
        sharding: ``"auto"`` (default), ``"replicated"`` or ``"sharded"``.

    :meth:`read_columns` (keys → one tensor per column) and :meth:`write_columns` are collectives when the table is
    sharded; every process calls them with its own anchors' keys.

    Example::

        table = KeyedState(1000, {"count": (torch.int32, 0), "score": (torch.float32, 0.0)})
        keys = torch.tensor([3, 7])
        count, score = table.read_columns(keys)
        table.write_columns(keys, [count + 1, score + 0.5])
    """

    exchange: Exchange = ALL_TO_ALL  # how a sharded table's rows travel (dual_emc2.loss.state.exchange)
    #: columns a state dict written by an earlier version may lack, with the value they load with (a warning says so)
    legacy_columns: Mapping[str, float] = {}

    def __init__(self, num_keys: int, columns: Mapping[str, tuple[torch.dtype, float]],
                 sharding: str = "auto") -> None:
        super().__init__()
        if num_keys < 1:
            raise ValueError(f"num_keys must be >= 1, got {num_keys}")
        for name, (dtype, _) in columns.items():
            if torch.empty((), dtype=dtype).element_size() != 4:
                raise ValueError(f"state column {name}: 4-byte dtypes only, got {dtype}")
        self.sharding = resolve_sharding(sharding, num_keys * 4 * len(columns), world_size())
        self.layout = (KeyLayout(num_keys, world_size(), rank()) if self.sharding == "sharded"
                       else KeyLayout(num_keys))
        self._columns = tuple(columns)
        for name, (dtype, fill) in columns.items():
            self.register_buffer(name, torch.full((self.layout.local_size,), fill, dtype=dtype))
        if self.sharding == "sharded":
            self.register_buffer(SHARD, torch.tensor(self.layout.describe(), dtype=torch.int64))
        self._pending: tuple[Tensor, int | None, object] | None = None
        self._register_load_state_dict_pre_hook(self._adopt_layout)

    @property
    def num_keys(self) -> int:
        return self.layout.num_keys

    def columns(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._columns]

    def _check_world(self) -> None:
        if self.sharding == "sharded" and self.layout.world != world_size():
            raise RuntimeError(
                f"this state is sharded over {self.layout.world} processes but {world_size()} are running: build the "
                "estimator (or GlobalContrastiveLoss) after torch.distributed is initialised")

    def read_columns(self, keys: Tensor) -> list[Tensor]:
        """The rows of ``keys`` (this process's anchors), one tensor per column; a collective when sharded."""
        _check_keys(keys, self.num_keys, f"{type(self).__name__}.read")
        self._check_world()
        values, context = read_rows(self.columns(), self.layout, keys, self.exchange)
        self._pending = (keys, _version(keys), context) if context is not None else None
        return values

    @torch.no_grad()
    def write_columns(self, keys: Tensor, values: list[Tensor]) -> None:
        """Store new rows for ``keys`` (this process's anchors); every process must call it (a collective)."""
        self._check_world()
        pending, self._pending = self._pending, None
        context = None
        if pending is not None and pending[0] is keys and pending[1] is not None and pending[1] == _version(keys):
            context = pending[2]  # the keys of the read: no second key exchange
        write_rows(self.columns(), self.layout, keys, values, context, self.exchange)

    def full_columns(self) -> list[Tensor]:
        """Every key's row of every column (copies, in key order); a collective when the table is sharded (each
        process's rows are gathered)."""
        if self.sharding != "sharded":
            return [c.clone() for c in self.columns()]
        self._check_world()
        n, world = self.num_keys, self.layout.world
        sizes = [len(range(r, n, world)) for r in range(world)]
        out = []
        for col in self.columns():
            gathered = all_gather_rows(col, sizes)
            full = torch.empty(n, dtype=col.dtype, device=col.device)
            start = 0
            for r, size in enumerate(sizes):
                full[r::world] = gathered[start:start + size]
                start += size
            out.append(full)
        return out

    # ------------------------------------------------------------------------------------------------ layouts
    def take_rows(self, source: KeyLayout, columns: Mapping[str, Tensor]) -> Tensor:
        """Copy into this table the rows it holds that ``columns`` (rows of ``source``) hold; returns the bool mask of
        local rows filled."""
        if source.num_keys != self.num_keys:
            raise ValueError(f"a state of {source.num_keys} keys does not fit this table of {self.num_keys} keys "
                             "(another dataset size or anchors per sample?)")
        mine = owned_keys(self.layout)
        present = source.owns(mine)
        src = source.local_index(mine[present])
        columns = dict(columns)
        self._fill_legacy(columns, "")
        for name in self._columns:
            col = getattr(self, name)
            col[present.to(col.device)] = columns[name][src].to(col.device, col.dtype)
        return present

    def _adopt_layout(self, state_dict: dict, prefix: str, *_args) -> None:
        """Load-state-dict pre-hook: turn a state dict of another layout that holds every row this process needs (a
        replicated one, say) into this table's layout."""
        self._fill_legacy(state_dict, prefix)
        names = [prefix + n for n in self._columns]
        if any(n not in state_dict for n in names):
            return  # strict loading names the missing keys
        source = _layout_of(state_dict, prefix, self._columns[0])
        if source != self.layout:
            self._convert(state_dict, prefix, source)
        if self.sharding == "sharded":
            state_dict[prefix + SHARD] = getattr(self, SHARD).clone()
        else:
            state_dict.pop(prefix + SHARD, None)

    def _fill_legacy(self, state_dict: dict, prefix: str) -> None:
        """Add the :attr:`legacy_columns` an older state dict lacks (same length as its first column), with a
        warning."""
        first = state_dict.get(prefix + self._columns[0])
        missing = [n for n in self.legacy_columns if prefix + n not in state_dict]
        if first is None or not missing:
            return
        for name in missing:
            dtype = getattr(self, name).dtype
            state_dict[prefix + name] = torch.full((first.numel(),), self.legacy_columns[name], dtype=dtype)
        warnings.warn(f"{prefix or 'state'}: saved without {', '.join(missing)} (an earlier dual_emc2); loaded with "
                      + ", ".join(f"{n}={self.legacy_columns[n]}" for n in missing), stacklevel=3)

    def _convert(self, state_dict: dict, prefix: str, source: KeyLayout) -> None:
        """Replace the columns of ``state_dict`` (rows of ``source``) by this table's rows, when they hold them."""
        covers = source.world == 1 or (self.layout.world % source.world == 0
                                       and self.layout.rank % source.world == source.rank)
        if source.num_keys != self.num_keys or not covers:
            what = (f"{source.num_keys} keys, this table has {self.num_keys}" if source.num_keys != self.num_keys
                    else f"shard {source.rank} of {source.world}, which lacks rows this process holds; load every "
                    "shard with dual_emc2.loss.state.keyed.load_state_shards")
            raise RuntimeError(f"{prefix or 'state'}: the state dict holds {what}")
        rows = source.local_index(owned_keys(self.layout))
        for name in self._columns:
            state_dict[prefix + name] = state_dict[prefix + name][rows]


class ChainState(KeyedState):
    """EMC² Markov-chain state Z_i per anchor key: the candidate *view* the chain stands on — its candidate key
    (−1: none yet; a sample id, or ``id · n_views + view`` when candidates are views) and the epoch whose
    augmentation drew it (the view is regenerated from (seed, epoch, id, view), so the state is an exact member of
    D_neg) — and its last computed score s(x_i, Z_i) (the ``stale`` score of docs/DESIGN.md).  12 bytes per anchor
    (int32 key, float32 score, int32 epoch).

    Args:
        num_keys: anchor keys (dataset size × anchors per sample), one chain each.
        sharding: ``"auto"`` (default), ``"replicated"`` or ``"sharded"`` (:class:`KeyedState`).

    Example::

        chains = ChainState(2 * n)                              # n = len(dataset), 2 views per image
        key, score, epoch = chains.read(anchor_keys)            # key −1: no state yet
        chains.write(anchor_keys, new_key, new_score, new_epoch)
    """

    #: chains saved before the view epoch existed load with epoch 0 (their states become the epoch-0 views of the same
    #: samples: still members of D_neg, so the chains go on from there)
    legacy_columns = {"epoch": 0}

    def __init__(self, num_keys: int, sharding: str = "auto") -> None:
        super().__init__(num_keys, {"candidate_key": (torch.int32, -1), "score": (torch.float32, float("-inf")),
                                    "epoch": (torch.int32, 0)}, sharding)
        self._register_load_state_dict_pre_hook(_reject_pre_key_checkpoints)

    def read(self, keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(candidate key [B] int64, stored score [B] float32, view epoch [B] int64) of the chains of ``keys``."""
        candidate_key, score, epoch = self.read_columns(keys)
        return candidate_key.long(), score, epoch.long()

    @torch.no_grad()
    def write(self, keys: Tensor, candidate_key: Tensor, score: Tensor, epoch: Tensor) -> None:
        """Store new states for ``keys`` (this process's anchors); every process receives every process's update."""
        self.write_columns(keys, [candidate_key.to(torch.int32), score.float(), epoch.to(torch.int32)])

    @torch.no_grad()
    def views(self) -> tuple[Tensor, Tensor]:
        """(candidate key [num_keys] int64, view epoch [num_keys] int64) of every chain, on the CPU: what a data
        loader needs to fetch each anchor's state view ahead of its step (a collective when sharded)."""
        key, _, epoch = self.full_columns()
        return key.long().cpu(), epoch.long().cpu()


def _reject_pre_key_checkpoints(state_dict, prefix, *_args) -> None:
    if prefix + "sample_id" in state_dict and prefix + "candidate_key" not in state_dict:
        raise ValueError(
            f"{prefix}sample_id: this checkpoint's EMC² chains hold sample ids (dual_emc2 0.1); chains now hold "
            "candidate keys. Resume it with dual_emc2 0.1, or start the estimator state afresh (load the model only)")


class AnchorScalarState(KeyedState):
    """One float per anchor key (e.g. SogCLR's log u_i), initialised to ``init``.

    Args:
        num_keys: anchor keys (dataset size × anchors per sample).
        init: initial value of every row (default −inf: SogCLR's log u = log 0).
        sharding: ``"auto"`` (default), ``"replicated"`` or ``"sharded"`` (:class:`KeyedState`).

    Example::

        u = AnchorScalarState(1000, init=0.0)
        keys = torch.tensor([3, 7])
        u.write(keys, 0.9 * u.read(keys) + 0.1)
    """

    def __init__(self, num_keys: int, init: float = float("-inf"), sharding: str = "auto") -> None:
        super().__init__(num_keys, {"value": (torch.float32, init)}, sharding)

    def read(self, keys: Tensor) -> Tensor:
        return self.read_columns(keys)[0]

    @torch.no_grad()
    def write(self, keys: Tensor, value: Tensor) -> None:
        self.write_columns(keys, [value.float()])


# ------------------------------------------------------------------------------------------------ state dicts


def keyed_states(module: nn.Module) -> dict[str, KeyedState]:
    """The :class:`KeyedState` tables of ``module`` by state-dict prefix (``"chains."``, ``"x_to_y.u."``, …)."""
    return {(name + "." if name else ""): m for name, m in module.named_modules() if isinstance(m, KeyedState)}


def split_sharded_state(module: nn.Module, state_dict: Mapping[str, Tensor]) -> tuple[dict, dict]:
    """(common, sharded): the entries of ``module``'s ``state_dict`` that are the same on every process, and those of
    its sharded tables (this process's rows and their ``shard`` layouts)."""
    prefixes = tuple(p for p, m in keyed_states(module).items() if m.sharding == "sharded")
    common, sharded = {}, {}
    for key, value in state_dict.items():
        (sharded if prefixes and key.startswith(prefixes) else common)[key] = value
    return common, sharded


def _tables(piece: Mapping[str, Tensor]) -> dict[str, KeyLayout]:
    """The sharded tables of a state dict: prefix → layout."""
    out = {}
    for key, meta in piece.items():
        if key == SHARD or key.endswith("." + SHARD):
            r, w, n = (int(v) for v in meta.tolist())
            out[key[:-len(SHARD)]] = KeyLayout(n, w, r)
    return out


def _columns_of(piece: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in piece.items()
            if k.startswith(prefix) and "." not in k[len(prefix):] and k[len(prefix):] != SHARD}


def assemble_state_dict(common: Mapping[str, Tensor], pieces: Iterable[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The replicated state dict (every key's row, no ``shard`` entries) of ``common`` plus every shard of its sharded
    tables; it equals the state dict of a replicated run.  Raises ValueError when a shard is missing."""
    out = dict(common)
    seen: dict[str, set[int]] = {}
    worlds: dict[str, KeyLayout] = {}
    for piece in pieces:
        for prefix, layout in _tables(piece).items():
            for name, col in _columns_of(piece, prefix).items():
                full = out.setdefault(prefix + name, torch.empty(layout.num_keys, dtype=col.dtype))
                full[layout.rank::layout.world] = col
            seen.setdefault(prefix, set()).add(layout.rank)
            worlds[prefix] = layout
    for prefix, ranks in seen.items():
        missing = sorted(set(range(worlds[prefix].world)) - ranks)
        if missing:
            raise ValueError(f"{prefix or 'state'}: shards {missing} of {worlds[prefix].world} are missing")
    return out


def load_state_shards(module: nn.Module, common: Mapping[str, Tensor],
                      pieces: Iterable[Mapping[str, Tensor]]) -> None:
    """Load into ``module`` (any layout, any number of processes) a state saved as ``common`` entries plus the shards
    of its sharded tables (``pieces``, one state dict per saving process; only those holding rows of this process's keys
    are needed, see :meth:`~dual_emc2.loss.state.layout.KeyLayout.sources`).  Tables not sharded in the saved state are
    in ``common`` and load as usual.  Raises ValueError when the pieces do not hold every row this process needs."""
    states = keyed_states(module)
    filled: dict[str, Tensor] = {}
    for piece in pieces:
        for prefix, source in _tables(piece).items():
            if prefix not in states:
                raise ValueError(f"{prefix}: a saved state table this estimator does not have")
            got = states[prefix].take_rows(source, _columns_of(piece, prefix))
            filled[prefix] = filled.get(prefix, torch.zeros_like(got)) | got
    full = dict(common)
    for prefix, got in filled.items():
        table = states[prefix]
        if not bool(got.all()):
            raise ValueError(f"{prefix}: the shards given hold {int(got.sum())} of the {got.numel()} rows this "
                             "process needs")
        full |= {prefix + k: v for k, v in table.state_dict().items()}
    module.load_state_dict(full)
