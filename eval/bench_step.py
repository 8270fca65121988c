#!/usr/bin/env python
"""Time per training step of every estimator against SimCLR (InfoNCE), same model, same batch, data on the device.

    python eval/bench_step.py                                   # CPU: ResNet-18, 32 px, b = 32
    python eval/bench_step.py --device cuda --size 96 --batch 32,256 --amp bf16
    python eval/bench_step.py --device cuda --arch resnet50 --size 224 --batch 256 --amp bf16
    python eval/bench_step.py --smoke                           # seconds (CI)

Each step is forward (2b views) → estimator → backward → Adam step.  Estimators are timed round-robin (one step of
each per round) so drift hits all alike; the median over rounds is reported with its ratio to InfoNCE, the peak
memory on CUDA, and the estimator's state size (EMC² chain state per anchor; negative cache m_neg × d floats).
A second table compares ``Trainer.train_step`` on the same synthetic on-device batch with a bare torch loop doing
the same work (the trainer's own overhead).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dual_emc2.objectives import build_objective  # noqa: E402
from dual_emc2.towers.heads import build_image_encoder  # noqa: E402
from dual_emc2.train.unimodal import unimodal_contrastive_batch  # noqa: E402

ESTIMATORS = ("infonce", "emc2", "sogclr", "hcl", "negative_cache")


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def state_bytes(objective: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in objective.buffers())


def bench(args: argparse.Namespace, b: int) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_image_encoder(args.arch, args.size <= 32, 512 if args.arch == "resnet18" else 2048, args.dim,
                                channels_last=device.type == "cuda").to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    V, n_data = 2, max(args.dataset, 4 * b)
    x = torch.randn(b * V, 3, args.size, args.size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    pool = torch.randn(256, 3, args.size, args.size, device=device)  # stand-in images for out-of-batch encodes
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")

    def encode(ids: torch.Tensor) -> torch.Tensor:
        with amp:
            return model(pool[ids.to(device) % pool.shape[0]]).float()

    names = [n for n in args.estimators.split(",") if n]
    objectives = {n: build_objective(n, num_keys=n_data * V, num_candidates=n_data,
                                     options={"negative_cache": {"dim": args.dim, "refresh": args.cache_refresh,
                                                                 "init_full": False},
                                              "emc2": {"burn_in": b - 1}}.get(n, {}),  # P = b - 1 (Table 3)
                                     defaults={"seed": 0}).to(device) for n in names}
    gen = torch.Generator().manual_seed(0)

    def step(name: str) -> None:
        ids = torch.randperm(n_data, generator=gen)[:b].to(device)
        with amp:
            z = model(x)
        batch = unimodal_contrastive_batch(z.float(), ids, V, encode_candidates=encode)
        out = objectives[name](batch, args.beta)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    timer = Timer(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    peak: dict[str, float] = {}
    for n in names:
        for _ in range(args.warmup):
            step(n)
    for r in range(args.repeats):
        for n in names:
            if device.type == "cuda" and r == 0:
                torch.cuda.reset_peak_memory_stats()
            times[n].append(timer(lambda n=n: step(n)))
            if device.type == "cuda" and r == 0:
                peak[n] = torch.cuda.max_memory_allocated() / 2**20
    base = statistics.median(times["infonce"]) if "infonce" in times else float("nan")
    rows = []
    for n in names:
        med = statistics.median(times[n])
        sb = state_bytes(objectives[n])
        rows.append({"estimator": n, "batch": b, "views": b * V, "median_ms": med,
                     "ratio_vs_infonce": med / base, "views_per_s": b * V / med * 1e3,
                     "peak_mem_mib": peak.get(n), "state_bytes": sb,
                     "state_bytes_per_anchor": sb / (n_data * V)})
    return {"rows": rows, "dataset_size": n_data}


def trainer_overhead(args: argparse.Namespace) -> dict:
    """Trainer.train_step on a synthetic on-device batch vs a bare loop doing the same forward/estimator/backward."""
    from dual_emc2.train.config import load_config
    from dual_emc2.train.trainer import Trainer

    b = int(args.batch.split(",")[0])
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/fmnist_unimodal.yaml", [
        "data.name=digits", f"data.image_size={args.size}", "data.num_workers=0", f"train.batch_size={b}",
        f"model.arch={args.arch}", f"model.cifar_stem={str(args.size <= 32).lower()}", f"model.proj_dim={args.dim}",
        "eval.enabled=false", "output_dir=/tmp/bench_step_trainer", "optim.name=adam", "optim.lr=1e-4",
        "optim.weight_decay=0", f"train.mixed_precision={'bf16' if args.amp == 'bf16' else 'no'}",
        "objective.name=emc2", f"objective.options.emc2.burn_in={b - 1}"])
    trainer = Trainer(cfg)
    device = trainer.device
    views = torch.randn(b, 2, 3, args.size, args.size, device=device)
    ids = torch.arange(b, device=device)
    model, opt, objective = trainer.model, trainer.optimizer, trainer.objective
    timer = Timer(device)

    def bare() -> None:
        z = model(views.flatten(0, 1))
        out = objective(unimodal_contrastive_batch(z.float(), ids, 2), trainer.core.temperature())
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def wrapped() -> None:
        trainer.train_step(ids, views)

    for _ in range(args.warmup):
        bare()
        wrapped()
    t_bare, t_trainer = [], []
    for _ in range(args.repeats):
        t_bare.append(timer(bare))
        t_trainer.append(timer(wrapped))
    mb, mt = statistics.median(t_bare), statistics.median(t_trainer)
    return {"batch": b, "bare_ms": mb, "trainer_ms": mt, "overhead": mt / mb - 1.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", default="32", help="comma-separated images per step (views = 2b)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--beta", type=float, default=5.0)
    ap.add_argument("--amp", default="no", choices=("no", "bf16"))
    ap.add_argument("--dataset", type=int, default=100_000, help="m: dataset size (state and cache sizes)")
    ap.add_argument("--cache-refresh", type=float, default=0.01024, help="negative cache ρ (Table 3, b = 32)")
    ap.add_argument("--estimators", default=",".join(ESTIMATORS))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-trainer", action="store_true", help="skip the trainer-overhead table")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.size, args.batch, args.repeats, args.warmup, args.dataset = 16, "8", 2, 1, 2000
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out or f"eval/results/bench_step{'_smoke' if args.smoke else ''}_{args.device}.json")
    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or
                                                                                      platform.machine())
    result = {"device": dev_name, "torch": torch.__version__, "arch": args.arch, "size": args.size, "amp": args.amp,
              "threads": torch.get_num_threads(), "repeats": args.repeats, "tables": []}
    print(f"device: {dev_name}, {args.arch} {args.size}px, amp={args.amp}, median of {args.repeats}")
    print(f"{'estimator':<16}{'b':>5}{'ms/step':>10}{'× InfoNCE':>11}{'views/s':>10}{'peak MiB':>10}"
          f"{'state B/anchor':>16}{'state MiB':>11}")
    for b in [int(v) for v in args.batch.split(",")]:
        table = bench(args, b)
        result["tables"].append(table)
        for r in table["rows"]:
            pk = f"{r['peak_mem_mib']:.0f}" if r["peak_mem_mib"] is not None else "-"
            print(f"{r['estimator']:<16}{b:>5}{r['median_ms']:>10.2f}{r['ratio_vs_infonce']:>11.3f}"
                  f"{r['views_per_s']:>10.0f}{pk:>10}{r['state_bytes_per_anchor']:>16.1f}"
                  f"{r['state_bytes'] / 2**20:>11.2f}")
    if not args.no_trainer:
        ov = trainer_overhead(args)
        result["trainer_overhead"] = ov
        print(f"\ntrainer.train_step {ov['trainer_ms']:.2f} ms vs bare loop {ov['bare_ms']:.2f} ms "
              f"(b = {ov['batch']}): overhead {100 * ov['overhead']:+.1f}%")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
