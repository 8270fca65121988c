#!/usr/bin/env python
"""Replicated against sharded per-anchor state (``loss.state_sharding``), measured with W gloo processes on this
machine's CPU: memory per process and the time of one state round (read + write of a global batch's keys).

For each table size N (EMC² chains: int32 key + float32 score + int32 view epoch, 12 bytes a key) and each
layout/protocol (``replicated``; ``sharded`` with the ``gather`` exchange of experiments/gather_exchange.py and the
``alltoall`` one of :mod:`dual_emc2.loss.state.exchange`), every process builds a
:class:`dual_emc2.loss.state.keyed.ChainState` alone to measure its memory: the state's bytes (its buffers) and the peak
resident growth while building it (VmHWM after resetting it, minus the resident memory before). Then the three tables
run rounds side by side, interleaved: each round draws a global batch of ``--batch`` distinct keys (the same on every
process), each process reads the states of its slice and writes new ones; the time of a round is the slowest process's,
and the median over rounds is reported. Ratios are against the replicated table of the same N, measured in the same run.

    python experiments/bench_state.py [--world 4] [--keys 1e6,1e7] [--batch 256] [--rounds 200]
        [--out experiments/results/bench_state.json] [--smoke]
"""
from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import default_out, describe_machine, format_table, machine_info, median, write_json
from gather_exchange import GATHER

from dual_emc2.loss.state.exchange import ALL_TO_ALL
from dual_emc2.loss.state.keyed import ChainState

VARIANTS = (("replicated", "gather"), ("sharded", "gather"), ("sharded", "alltoall"))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    """Reset VmHWM to the current resident size (Linux ≥ 4.0); without it the peak is the process's so far."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _round(chains: ChainState, keys: torch.Tensor, step: int) -> None:
    candidate, score, epoch = chains.read(keys)
    chains.write(keys, candidate + step + 1, score + 1.0, epoch + 1)


def _table(n_keys: int, layout: str, protocol: str) -> ChainState:
    chains = ChainState(n_keys, layout)
    chains.exchange = GATHER if protocol == "gather" else ALL_TO_ALL
    return chains


def memory(n_keys: int, layout: str, protocol: str) -> dict[str, float]:
    """State bytes and peak resident growth of one table on this process (built alone)."""
    gc.collect()
    dist.barrier()
    before = _status_kib("VmRSS")
    _reset_peak()
    chains = _table(n_keys, layout, protocol)
    state_bytes = sum(b.numel() * b.element_size() for b in chains.buffers())
    peak = _status_kib("VmHWM") - before
    del chains
    gc.collect()
    return {"state_mib": state_bytes / 2**20, "peak_rss_mib": peak / 1024}


def timing(n_keys: int, batch: int, rounds: int, warmup: int) -> dict[tuple[str, str], float]:
    """Median milliseconds of a read + write round per variant (the slowest process each round); the variants run
    interleaved on the same keys, so a load change on the machine hits them alike."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tables = {v: _table(n_keys, *v) for v in VARIANTS}
    gen = torch.Generator().manual_seed(n_keys)
    per = batch // world
    times: dict[tuple[str, str], list[float]] = {v: [] for v in VARIANTS}
    for step in range(warmup + rounds):
        drawn = torch.unique(torch.randint(0, n_keys, (2 * batch,), generator=gen))
        glob = drawn[torch.randperm(drawn.numel(), generator=gen)][:batch]  # distinct keys, random order
        keys = glob[rank * per:(rank + 1) * per]
        for i in range(len(VARIANTS)):
            variant = VARIANTS[(i + step) % len(VARIANTS)]
            dist.barrier()
            t0 = time.perf_counter()
            _round(tables[variant], keys, step)
            elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if step >= warmup:
                times[variant].append(float(elapsed) * 1e3)
    return {v: median(t) for v, t in times.items()}


def _worker(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    rows = []
    for n_keys in args.keys:
        mem = {}
        for variant in VARIANTS:
            every: list[Any] = [None] * world
            dist.all_gather_object(every, memory(n_keys, *variant))
            mem[variant] = {k: max(r[k] for r in every) for k in every[0]}  # the largest process
        for (layout, protocol), ms in timing(n_keys, args.batch, args.rounds, args.warmup).items():
            rows.append({"keys": n_keys, "layout": layout, "protocol": protocol if layout == "sharded" else None,
                         **mem[layout, protocol], "round_ms": ms})
    if rank == 0:
        torch.save(rows, out)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.spawn(_worker, args=(args.world, f"tcp://127.0.0.1:{_free_port()}", args, out), nprocs=args.world)
        rows = torch.load(out)
    for row in rows:
        ref = next(r for r in rows if r["keys"] == row["keys"] and r["layout"] == "replicated")
        row["memory_ratio"] = row["peak_rss_mib"] / ref["peak_rss_mib"] if ref["peak_rss_mib"] > 0 else None
        row["state_ratio"] = row["state_mib"] / ref["state_mib"]
        row["time_ratio"] = row["round_ms"] / ref["round_ms"]
    return {"config": {"world": args.world, "batch": args.batch, "rounds": args.rounds, "warmup": args.warmup,
                       "keys": args.keys, "backend": "gloo"},
            "machine": machine_info("cpu") | {"torch_threads": 1}, "rows": rows}


def table(result: dict[str, Any]) -> str:
    headers = ["keys", "layout", "state MiB/proc", "peak RSS MiB/proc", "round ms", "state ×", "RSS ×", "time ×"]
    rows = [[f"{r['keys']:.0e}", r["layout"] + (f"/{r['protocol']}" if r["protocol"] else ""), r["state_mib"],
             r["peak_rss_mib"], r["round_ms"], r["state_ratio"], r["memory_ratio"], r["time_ratio"]]
            for r in result["rows"]]
    cfg = result["config"]
    head = (f"{cfg['world']} gloo processes, global batch {cfg['batch']} keys, median of {cfg['rounds']} rounds; "
            f"{describe_machine(result['machine'])}")
    return head + "\n" + format_table(headers, rows, floatfmt=".3g")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--keys", default="1e6,1e7", help="comma-separated table sizes (keys)")
    ap.add_argument("--batch", type=int, default=256, help="keys of the global batch per round")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="2 processes, 1e4 keys, 10 rounds")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.world, args.keys, args.rounds, args.warmup, args.batch = 2, "1e4", 10, 2, 32
    args.keys = [int(float(k)) for k in args.keys.split(",") if k.strip()]
    if args.batch % args.world or args.world < 2:
        ap.error(f"--batch ({args.batch}) must be a multiple of --world ({args.world}), and --world >= 2")
    result = run(args)
    out = write_json(args.out or default_out("bench_state", args.smoke), result)
    print(table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
