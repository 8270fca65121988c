#!/usr/bin/env python
"""Small-batch quality: EMC² vs SimCLR (InfoNCE) vs SogCLR vs HCL at b = 32 and b = 256 (EMC² section 4.6, Fig. 5).

Trains each estimator with the real trainer (configs/fmnist_unimodal.yaml plus overrides; STL-10 with
``--config configs/stl10_unimodal.yaml --override data.root=DIR``), evaluates the linear probe and 1-NN accuracy of
the backbone after every epoch, and records them against samples accessed and against training wall-clock (the
time spent in training steps, evaluation excluded).  EMC² uses P = b − 1 as in Table 3.

    python eval/small_batch.py                        # Fashion-MNIST, 2 epochs on 2,000 images per run (CPU)
    python eval/small_batch.py --subset 60000 --epochs 20 --batches 32,256
    python eval/small_batch.py --smoke                # seconds (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dual_emc2.train.config import load_config  # noqa: E402
from dual_emc2.train.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class TimedTrainer(Trainer):
    """Trainer that records the wall-clock spent in training steps and stamps it on every evaluation."""

    train_seconds = 0.0

    def train_step(self, ids, views):
        t0 = time.perf_counter()
        out = super().train_step(ids, views)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.train_seconds += time.perf_counter() - t0
        return out

    def evaluate(self):
        metrics = super().evaluate()
        metrics["train_seconds"] = self.train_seconds
        metrics["samples"] = float(self.pos.step * self.cfg.train.batch_size * self.acc.num_processes)
        return metrics


def run(args: argparse.Namespace, name: str, b: int) -> dict:
    out = Path(args.work) / f"{name}_b{b}"
    overrides = [f"objective.name={name}", f"train.batch_size={b}", f"train.epochs={args.epochs}",
                 "eval.every_epochs=1", f"output_dir={out}", f"objective.options.emc2.burn_in={b - 1}",
                 f"data.num_workers={args.workers}", *args.override]
    if args.subset:
        overrides.append(f"data.subset={args.subset}")
    if args.eval_max:
        overrides += [f"eval.max_train={args.eval_max}", f"eval.max_test={args.eval_max // 3}"]
    cfg = load_config(ROOT / args.config, overrides)
    trainer = TimedTrainer(cfg)
    trainer.fit()
    return {"estimator": name, "batch": b, "history": trainer.history, "output_dir": str(out)}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for r in results:
        h = r["history"]
        label = f"{r['estimator']} b={r['batch']}"
        ls = "-" if r["batch"] == min(x["batch"] for x in results) else "--"
        for row, metric in enumerate(("linear_probe_acc", "knn1_acc")):
            axes[row, 0].plot([p["samples"] for p in h], [p.get(metric, float("nan")) for p in h], ls, marker="o",
                              label=label)
            axes[row, 1].plot([p["train_seconds"] for p in h], [p.get(metric, float("nan")) for p in h], ls,
                              marker="o", label=label)
            axes[row, 0].set_ylabel(metric)
    for ax in axes[1]:
        ax.set_xlabel("")
    axes[1, 0].set_xlabel("samples accessed (images)")
    axes[1, 1].set_xlabel("training wall-clock (s)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/fmnist_unimodal.yaml")
    ap.add_argument("--estimators", default="emc2,infonce,sogclr,hcl")
    ap.add_argument("--batches", default="32,256")
    ap.add_argument("--subset", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--eval-max", type=int, default=3000, help="probe train images (test: a third)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--work", default="runs/small_batch")
    ap.add_argument("--override", nargs="*", default=[], help="extra config overrides key.sub=value")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.config, args.estimators, args.batches, args.subset, args.epochs, args.eval_max = (
            "configs/fmnist_unimodal.yaml", "emc2,infonce", "8", 64, 1, 150)
        args.override = [*args.override, "data.name=digits", "data.image_size=8", "model.proj_hidden=64",
                         "model.proj_dim=32", "eval.probe_epochs=10", "eval.knn_k=[1]"]
    out = Path(args.out or f"eval/results/small_batch{'_smoke' if args.smoke else ''}.json")
    results = [run(args, name, int(b)) for b in args.batches.split(",") for name in args.estimators.split(",")]
    summary = {"config": args.config, "subset": args.subset, "epochs": args.epochs,
               "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                           "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
               "runs": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"\n{'estimator':<16}{'b':>5}{'epochs':>8}{'train s':>10}{'linear probe':>14}{'1-NN':>8}")
    for r in results:
        last = r["history"][-1]
        print(f"{r['estimator']:<16}{r['batch']:>5}{last['epoch']:>8.0f}{last['train_seconds']:>10.1f}"
              f"{last.get('linear_probe_acc', float('nan')):>14.4f}{last['knn1_acc']:>8.4f}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
