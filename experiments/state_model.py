#!/usr/bin/env python
"""Memory and traffic model of the per-anchor estimator state (EMC² chains, SogCLR's u) beyond one machine.

A bimodal run keeps one state table per direction (x→y, y→x), ``N`` rows each (one per pair), each row ``C`` words of 4
bytes: EMC² an int32 candidate key, a float32 score and an int32 view epoch (C = 3, 12 bytes), SogCLR a float32 u (C =
1). Layouts (:mod:`dual_emc2.loss.state.layout`): ``replicated`` (every process holds every row) or ``sharded``
(process r holds
the keys k ≡ r mod W, ⌈N / W⌉ rows). Per step every process reads and writes the rows of its b anchors; the collectives
are those of :mod:`dual_emc2.loss.state.exchange` (``PROTOCOLS`` below, each message a parameter):
* replicated: read local; write all-gathers (int64 key, C words widened to int64) per anchor, after an all-gather of
  the row counts;
* sharded ``gather``: read all-gathers the row counts and the global batch's int64 keys, then all-reduces the
  [W·b, C] int32 rows (each owner fills its own); write all-gathers the C int32 words per anchor (keys reused);
* sharded ``alltoall``: read sends the counts (W int64) and each key to its owner and gets its row back; write sends
  each row to its owner.

Bytes on the wire per process per step, per collective of payload m per process: ring all-gather (W − 1)·m, ring
all-reduce of S bytes 2(W − 1)/W·S, all-to-all (W − 1)/W·m (owners uniform: the own share stays).  Checkpoints hold
one copy of each table: a replicated one is written by the main process, a sharded one as W pieces of ⌈N / W⌉ rows.

    python experiments/state_model.py [--batch 256] [--out experiments/results/state_model.json]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import RESULTS, format_table, write_json

INT32_MAX = 2**31 - 1  # EMC² candidate keys are int32: up to 2^31 − 1 keys (−1 marks an empty chain)
WORD = 4  # bytes of one state column entry (int32 / float32)
ESTIMATORS: dict[str, tuple[int, int]] = {"emc2": (3, 2), "sogclr": (1, 2)}  # name → (columns C, tables: directions)
LAYOUTS = ("replicated", "sharded")
SIZES = (10**6, 10**8, 2 * 10**9)
WORLDS = (8, 64, 512)
# context for the state traffic: a ResNet-50's fp32 gradient all-reduce and the forward all-gather of d = 512 fp32
# features of both towers
CONTEXT_PARAMS, CONTEXT_DIM = 25_557_032, 512


@dataclass(frozen=True)
class Message:
    """One collective of a state read or write: ``op`` (all_gather | all_reduce | all_to_all) and the payload one
    process puts in: ``nbytes`` per ``per`` (call: once; peer: per process of the world; anchor: per local anchor;
    global: per anchor of the global batch)."""

    op: str
    per: str
    nbytes: int
    what: str

    def payload(self, world: int, batch: int) -> int:
        """Bytes this process contributes (all-gather, all-to-all) or reduces (all-reduce)."""
        return self.nbytes * {"call": 1, "peer": world, "anchor": batch, "global": world * batch}[self.per]

    def wire(self, world: int, batch: int) -> float:
        """Bytes one process sends (= receives) for this collective (ring all-gather / all-reduce)."""
        m = self.payload(world, batch)
        return {"all_gather": (world - 1) * m, "all_reduce": 2 * (world - 1) / world * m,
                "all_to_all": (world - 1) / world * m}[self.op]


def protocol_messages(protocol: str, columns: int, key_bytes: int = 8, count_bytes: int = 8
                      ) -> tuple[list[Message], list[Message]]:
    """(read, write) collectives of one table of ``columns`` 4-byte words under ``protocol`` (``replicated``,
    ``gather`` or ``alltoall``); ``key_bytes`` / ``count_bytes``: the key and row-count dtypes (int64)."""
    row = WORD * columns
    if protocol == "replicated":
        return [], [Message("all_gather", "call", count_bytes, "row counts"),
                    Message("all_gather", "anchor", key_bytes * (1 + columns), "key + row as int64")]
    if protocol == "gather":
        return ([Message("all_gather", "call", count_bytes, "row counts"),
                 Message("all_gather", "anchor", key_bytes, "keys"),
                 Message("all_reduce", "global", row, "rows of the global batch")],
                [Message("all_gather", "anchor", row, "new rows")])
    if protocol == "alltoall":
        return ([Message("all_to_all", "peer", count_bytes, "key counts per owner"),
                 Message("all_to_all", "anchor", key_bytes, "keys to owners"),
                 Message("all_to_all", "anchor", row, "rows from owners")],
                [Message("all_to_all", "anchor", row, "new rows to owners")])
    raise ValueError(f"protocol must be replicated, gather or alltoall, got {protocol!r}")


def layout_of(protocol: str) -> str:
    return "replicated" if protocol == "replicated" else "sharded"


def rows_per_process(num_keys: int, world: int, layout: str) -> int:
    """Rows of one table on the process holding the most (rank 0 when sharded: ⌈N / W⌉)."""
    return num_keys if layout == "replicated" else -(-num_keys // world)


def state_bytes(num_keys: int, world: int, layout: str, columns: int, tables: int) -> int:
    """State bytes held by one process (the largest share)."""
    return tables * rows_per_process(num_keys, world, layout) * WORD * columns


def checkpoint_bytes(num_keys: int, world: int, layout: str, columns: int, tables: int) -> dict[str, int]:
    """State bytes of one checkpoint (one copy of every table) and the most one process writes."""
    total = tables * num_keys * WORD * columns
    return {"total": total, "per_process_max": total if layout == "replicated"
            else state_bytes(num_keys, world, layout, columns, tables)}


def step_traffic(protocol: str, world: int, batch: int, columns: int, tables: int, **sizes: int) -> dict[str, float]:
    """Per step (every table read and written once): payload and wire bytes per process, wire bytes of all
    processes together."""
    read, write = protocol_messages(protocol, columns, **sizes)
    msgs = read + write
    if world == 1:
        return {"payload_per_process": 0, "wire_per_process": 0.0, "wire_total": 0.0}
    payload = tables * sum(m.payload(world, batch) for m in msgs)
    wire = tables * sum(m.wire(world, batch) for m in msgs)
    return {"payload_per_process": payload, "wire_per_process": wire, "wire_total": wire * world}


def context_traffic(world: int, batch: int, params: int = CONTEXT_PARAMS, dim: int = CONTEXT_DIM) -> dict[str, float]:
    """What else a step moves per process, for scale: the fp32 gradient all-reduce of ``params`` parameters and the
    forward all-gather of ``dim``-d fp32 features of both towers."""
    return {"grad_allreduce_per_process": 2 * (world - 1) / world * 4 * params,
            "features_allgather_per_process": (world - 1) * 2 * batch * dim * 4}


def model_rows(sizes: tuple[int, ...] = SIZES, worlds: tuple[int, ...] = WORLDS, batch: int = 256,
               protocols: tuple[str, ...] = ("replicated", "gather", "alltoall")) -> list[dict[str, Any]]:
    """One row per (estimator, N, W, protocol)."""
    rows = []
    for est, (columns, tables) in ESTIMATORS.items():
        for n in sizes:
            for w in worlds:
                for proto in protocols:
                    layout = layout_of(proto)
                    rows.append({
                        "estimator": est, "pairs": n, "processes": w, "layout": layout, "protocol": proto,
                        "batch_per_process": batch, "columns": columns, "tables": tables,
                        "state_per_process": state_bytes(n, w, layout, columns, tables),
                        "checkpoint": checkpoint_bytes(n, w, layout, columns, tables),
                        "step": step_traffic(proto, w, batch, columns, tables),
                        "int32_keys_fit": n <= INT32_MAX,
                    })
    return rows


def human(n: float) -> str:
    """Bytes with a binary prefix (``1.5 GiB``)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.3g} {unit}" if v < 1000 else f"{v:.0f} {unit}"
    return f"{n:.0f} B"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256, help="anchors per process per step b (default 256)")
    ap.add_argument("--out", type=Path, default=RESULTS / "state_model.json")
    args = ap.parse_args(argv)
    rows = model_rows(batch=args.batch)
    for est in ESTIMATORS:
        print(f"\n{est} (bimodal: 2 tables of {ESTIMATORS[est][0] * WORD} B per pair), b = {args.batch} per process")
        print(format_table(
            ["pairs", "W", "layout / protocol", "state / process", "checkpoint", "ckpt / process",
             "step wire / process", "step wire, all"],
            [[f"{r['pairs']:.0e}", r["processes"], r["protocol"] if r["layout"] == "sharded" else "replicated",
              human(r["state_per_process"]), human(r["checkpoint"]["total"]),
              human(r["checkpoint"]["per_process_max"]), human(r["step"]["wire_per_process"]),
              human(r["step"]["wire_total"])] for r in rows if r["estimator"] == est]))
    ctx = {w: context_traffic(w, args.batch) for w in WORLDS}
    print("\nfor scale, per process per step: " + "; ".join(
        f"W={w}: ResNet-50 fp32 gradient all-reduce {human(c['grad_allreduce_per_process'])}, "
        f"d=512 features all-gather {human(c['features_allgather_per_process'])}" for w, c in ctx.items()))
    messages = {p: [[asdict(m) for m in side] for side in protocol_messages(p, 2)]
                for p in ("replicated", "gather", "alltoall")}
    write_json(args.out, {"model": "state bytes and state traffic per step (experiments/state_model.py)",
                          "command": " ".join(["python", "experiments/state_model.py", *(sys.argv[1:] if argv is None
                                                                                         else argv)]),
                          "word_bytes": WORD, "estimators": {k: {"columns": c, "tables": t}
                                                             for k, (c, t) in ESTIMATORS.items()},
                          "messages_emc2_table": messages, "context": ctx, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
