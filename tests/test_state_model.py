"""experiments/state_model.py against direct counts: the bytes of the real state buffers, and the payload of every
collective a state read and write makes (counted on torch.distributed, faked as a world of W processes)."""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "experiments") not in sys.path:
    sys.path.insert(0, str(ROOT / "experiments"))

import state_model as sm  # noqa: E402
from gather_exchange import GATHER  # noqa: E402

from dual_emc2.loss.registry import build_estimator  # noqa: E402
from dual_emc2.loss.state.exchange import ALL_TO_ALL  # noqa: E402
from dual_emc2.loss.state.keyed import AnchorScalarState, ChainState, KeyedState  # noqa: E402
from dual_emc2.loss.state.layout import KeyLayout  # noqa: E402


def _table_bytes(t: KeyedState) -> int:
    return sum(c.numel() * c.element_size() for c in t.columns())


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_state_bytes_equal_the_buffers(n):
    assert _table_bytes(ChainState(n, sharding="replicated")) == sm.state_bytes(n, 1, "replicated", 3, 1) == 12 * n
    assert _table_bytes(AnchorScalarState(n, sharding="replicated")) == sm.state_bytes(n, 1, "replicated", 1, 1)
    for name, (columns, tables) in sm.ESTIMATORS.items():  # bimodal: one table per direction
        obj = build_estimator(name, num_keys=n, num_candidates=n, symmetric=True, state_sharding="replicated")
        held = [m for m in obj.modules() if isinstance(m, KeyedState)]
        assert len(held) == tables and sum(map(_table_bytes, held)) == sm.state_bytes(n, 1, "replicated", columns,
                                                                                        tables)
        assert sm.checkpoint_bytes(n, 8, "sharded", columns, tables)["total"] == sum(map(_table_bytes, held))
    for w in (2, 3, 8):  # sharded: the largest share is rank 0's ⌈N / W⌉ rows
        assert max(KeyLayout(n, w, r).local_size for r in range(w)) == sm.rows_per_process(n, w, "sharded")
        assert sum(KeyLayout(n, w, r).local_size for r in range(w)) == n


class FakeWorld:
    """torch.distributed as rank 0 of ``world`` processes that all hold the same rows; records each collective's
    payload (what this process puts in)."""

    def __init__(self, monkeypatch, world: int) -> None:
        self.calls: list[tuple[str, int]] = []
        for name, fn in (("is_initialized", lambda: True), ("is_available", lambda: True),
                         ("get_world_size", lambda group=None: world), ("get_rank", lambda group=None: 0),
                         ("all_gather", self.all_gather), ("all_reduce", self.all_reduce),
                         ("all_to_all_single", self.all_to_all_single)):
            monkeypatch.setattr(dist, name, fn)

    def all_gather(self, outs, t, *args, **kwargs):
        self.calls.append(("all_gather", t.numel() * t.element_size()))
        for o in outs:
            o.copy_(t)

    def all_reduce(self, t, *args, **kwargs):
        self.calls.append(("all_reduce", t.numel() * t.element_size()))

    def all_to_all_single(self, out, t, *args, **kwargs):
        self.calls.append(("all_to_all", t.numel() * t.element_size()))
        out.copy_(t)


@pytest.mark.parametrize("protocol", ["replicated", "gather", "alltoall"])
@pytest.mark.parametrize("table", ["chains", "u"])
def test_step_payloads_equal_the_collectives_of_a_read_and_write(monkeypatch, protocol, table):
    n, world, b = 1000, 4, 16
    fake = FakeWorld(monkeypatch, world)
    layout = sm.layout_of(protocol)
    if table == "chains":
        state, columns = ChainState(n, sharding=layout), 3
    else:
        state, columns = AnchorScalarState(n, sharding=layout), 1
    state.exchange = ALL_TO_ALL if protocol == "alltoall" else GATHER
    assert state.layout.world == (1 if layout == "replicated" else world)
    assert _table_bytes(state) == sm.state_bytes(n, world, layout, columns, 1)
    keys = torch.randperm(n)[:b]
    rows = state.read(keys)
    if table == "chains":
        state.write(keys, rows[0], rows[1], rows[2])
    else:
        state.write(keys, rows)
    read, write = sm.protocol_messages(protocol, columns)
    want = Counter((m.op, m.payload(world, b)) for m in read + write)
    assert Counter(fake.calls) == want
    assert sm.step_traffic(protocol, world, b, columns, 1)["payload_per_process"] == sum(c for _, c in fake.calls)


def test_wire_bytes_and_table():
    # ring all-gather: W − 1 contributions; ring all-reduce: 2 (W − 1) / W of the buffer; all-to-all: (W − 1) / W
    m = sm.Message("all_gather", "anchor", 8, "keys")
    assert m.wire(4, 10) == 3 * 80 and sm.Message("all_reduce", "global", 8, "").wire(4, 10) == 2 * 3 / 4 * 320
    assert sm.Message("all_to_all", "anchor", 8, "").wire(4, 10) == 3 / 4 * 80
    assert sm.step_traffic("replicated", 1, 256, 2, 2)["wire_per_process"] == 0
    rows = sm.model_rows()
    assert len(rows) == 2 * 3 * 3 * 3
    big = {r["protocol"]: r for r in rows if r["estimator"] == "emc2" and r["pairs"] == 2 * 10**9
           and r["processes"] == 512}
    assert big["replicated"]["state_per_process"] == 48 * 10**9  # 2 directions × 2·10⁹ × 12 B on every process
    assert big["gather"]["state_per_process"] == 2 * 12 * -(-2 * 10**9 // 512)
    assert big["alltoall"]["step"]["wire_per_process"] < big["replicated"]["step"]["wire_per_process"] / 100
    assert all(r["int32_keys_fit"] for r in rows)


def test_main_writes_json(tmp_path):
    import json

    assert sm.main(["--out", str(tmp_path / "m.json")]) == 0
    got = json.loads((tmp_path / "m.json").read_text())
    assert len(got["rows"]) == 54 and set(got["messages_emc2_table"]) == {"replicated", "gather", "alltoall"}
