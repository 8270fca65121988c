#!/usr/bin/env python
"""Small-batch quality: EMC² vs SimCLR (InfoNCE) vs SogCLR (and HCL) at b = 32 and b = 256 (EMC² section 4, Fig. 5
and Fig. 8): linear-probe and 1-NN accuracy of the frozen backbone against samples accessed and against wall-clock.

Each run is the real trainer (:class:`dual_emc2.train.trainer.Trainer`) built from a config plus overrides, with
evaluation after every epoch; the evaluation history is read back from the run's ``metrics.csv`` (group ``eval``).
The trainer is subclassed only to stamp three numbers on every evaluation: samples accessed (images), training
wall-clock (the whole training loop, data loading included, evaluation time excluded) and the process's CPU time over
the same span.  On a shared CPU the wall-clock depends on other people's jobs, so the CPU time (data loading
in-process, ``--workers 0``) is the default time axis there; on a GPU it is the wall-clock.  Every run of a seed starts
from the same initial network and sees the same batches.  EMC² uses P = b − 1 (Table 3); the accuracy of the initial
network is measured once and drawn at x = 0.

Data: Fashion-MNIST with ``configs/fmnist_unimodal.yaml`` (the same β and optimiser at both batch sizes).  With
``--data-root DIR`` (holding ``stl10_binary/``): STL-10 with the paper's settings, ``configs/stl10_unimodal.yaml``
at b = 32 (β = 14.28, Adam 1e-4) and ``configs/stl10_unimodal_b256.yaml`` at b = 256 (β = 5, Adam 1e-3).

Time to accuracy: for each run, the time (and samples) at which the linear-probe (and 1-NN) accuracy first reaches the
final accuracy of SimCLR at the smallest batch (linear interpolation between evaluations), and the speed-up over it.

    python experiments/small_batch.py                    # Fashion-MNIST, 2,000 images, 3 epochs, b = 32 and 256 (CPU)
    python experiments/small_batch.py --subset 60000 --epochs 20 --eval-max 10000     # a GPU
    python experiments/small_batch.py --data-root /data --epochs 100                 # STL-10, the paper's protocol
    python experiments/small_batch.py --smoke            # seconds (CI)

Multi-seed runs (v2): ``configs/fmnist_small_cnn.yaml`` (``model.arch: small_cnn``, 128-d features, ~0.25 ms forward +
backward per view on one CPU thread; data augmentation, ~0.65 ms per view, dominates the step) with the default EMC²,
SimCLR and SogCLR, 3 seeds; the summary gives the mean, std (ddof 1) and standard error over seeds of the final
accuracies, the main PNG the mean ± std band per estimator against epochs (one column per b; ``*_cpu.png`` against
training CPU seconds, ``*_runs.png`` every run).  One process per batch size, merged after:

    python experiments/small_batch.py --threads 1 --config configs/fmnist_small_cnn.yaml \
        --estimators emc2,infonce,sogclr \
        --batches 32 --seeds 0,1,2 --subset 10000 --epochs 20 --eval-every 5 --eval-max 10000 --eval-test 10000 \
        --override eval.geometry=false --work runs/sb_v2 --out runs/sb_v2/b32.json      # and --batches 256 ... b256
    python experiments/small_batch.py --merge runs/sb_v2/b32.json runs/sb_v2/b256.json \
        --out experiments/results/small_batch_v2.json

Every run appends to ``<out>.partial.json`` as it finishes, so an interrupted grid can still be merged.  The run
folders go to ``--work``, by default beside ``--out`` as ``<out stem>_runs/`` (``runs/<out stem>_runs/`` when
``--out`` is in experiments/results; ``runs/small_batch/`` without ``--out``), never into the checkout's results.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import ROOT, default_out, describe_machine, format_table, machine_info, pyplot, save_figure, write_json

from dual_emc2.train.config import load_config
from dual_emc2.train.run_log import CSV_NAME, read_metrics
from dual_emc2.train.trainer import Trainer

FMNIST_CONFIG = "configs/fmnist_unimodal.yaml"
STL10_CONFIGS = {32: "configs/stl10_unimodal.yaml", 256: "configs/stl10_unimodal_b256.yaml"}
METRICS = ("linear_probe_acc", "knn1_acc")
CLOCKS = ("train_seconds", "train_cpu_seconds")


def config_for(args: argparse.Namespace, b: int) -> str:
    if args.config:
        return args.config
    if args.data_root:
        return STL10_CONFIGS.get(b, STL10_CONFIGS[32])
    return FMNIST_CONFIG


# rows that are an estimator fed or set up another way: label → (loss.estimator, extra overrides)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    # the default EMC² with its states fed the earlier way: the un-augmented image re-encoded by id, eval mode
    "emc2_unaugmented": ("emc2", ["loss.state_views=unaugmented"]),
    # the default EMC² encoding a random fraction q of the out-of-batch states per step (unbiased; cheaper, noisier)
    "emc2_q0.5": ("emc2", ["loss.options.emc2.reencode_fraction=0.5"]),
    "emc2_q0.25": ("emc2", ["loss.options.emc2.reencode_fraction=0.25"]),
}


def run_overrides(args: argparse.Namespace, name: str, b: int, seed: int, out: Path) -> list[str]:
    # EMC² runs its default estimator (Rao–Blackwell weights over the thinned batch plus the chain state, encoded in
    # the batch's forward): it has no steps / burn-in to set (loss.options.emc2.burn_in only matters for
    # weights=visits).  A VARIANTS label runs its estimator with its overrides.
    registry, extra = VARIANTS.get(name, (name, []))
    o = [f"loss.estimator={registry}", *extra, f"train.batch_size={b}", f"train.epochs={args.epochs}", f"seed={seed}",
         f"eval.every_epochs={args.eval_every}", f"output_dir={out}",
         f"data.num_workers={args.workers}", "train.ckpt_every=1000000", "train.max_steps=null",
         f"eval.probe_epochs={args.probe_epochs}"]
    if args.no_run_plots:  # the trainer draws its curves after training; they are not part of this protocol
        o.append("train.plots=false")
    if args.data_root:
        o.append(f"data.root={args.data_root}")
    if args.subset:
        o.append(f"data.subset={args.subset}")
    if args.eval_max:
        o.append(f"eval.max_train={args.eval_max}")
    eval_test = args.eval_test if args.eval_test is not None else args.eval_max // 2
    if eval_test:
        o.append(f"eval.max_test={eval_test}")
    return o + list(args.override)


def eval_history(run_dir: Path) -> list[dict[str, float]]:
    """The run's evaluations from its metrics.csv: one dict per evaluated step (``step`` plus every eval metric)."""
    series = read_metrics(run_dir / CSV_NAME)
    by_step: dict[int, dict[str, float]] = {}
    for (group, name), (steps, values) in series.items():
        if group != "eval":
            continue
        for s, v in zip(steps.tolist(), values.tolist()):
            by_step.setdefault(int(s), {"step": float(s)})[name] = float(v)
    if not by_step:
        raise RuntimeError(f"{run_dir / CSV_NAME}: no evaluation rows (group 'eval'); was eval.enabled false?")
    return [by_step[s] for s in sorted(by_step)]


def time_to(history: list[dict[str, float]], metric: str, target: float, key: str = "train_seconds") -> float | None:
    """First ``key`` (wall-clock or samples) at which ``metric`` reaches ``target``, interpolating linearly between
    evaluations (the initial point included); None when never reached."""
    prev = None
    for p in history:
        if p.get(metric, -math.inf) >= target:
            if prev is None or prev[metric] >= target:
                return p[key]
            frac = (target - prev[metric]) / (p[metric] - prev[metric])
            return prev[key] + frac * (p[key] - prev[key])
        prev = p
    return None


def last_epoch_cost(history: list[dict[str, float]], key: str = "train_cpu_seconds") -> float | None:
    """``key`` (train CPU or wall-clock seconds) per epoch between the last two evaluated epochs, both ≥ 1: the
    steady-state cost. EMC²'s first epoch is cheaper than the others (an anchor has no chain state before its first
    visit, so epoch 1 encodes no states), which an average from epoch 0 hides; None with fewer than two such evals."""
    by_epoch = {p["epoch"]: p[key] for p in history if p.get("epoch", 0) >= 1 and key in p}
    if len(by_epoch) < 2:
        return None
    (e0, c0), (e1, c1) = sorted(by_epoch.items())[-2:]
    return (c1 - c0) / (e1 - e0)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global random states on exit."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def run(args: argparse.Namespace, name: str, b: int, seed: int, initial: dict[str, dict[str, float]]) -> dict:
    out = (Path(args.work) / f"{name}_b{b}_s{seed}").resolve()
    if out.exists():
        shutil.rmtree(out)  # a fresh run, never a resume of an older one
    config = config_for(args, b)
    overrides = run_overrides(args, name, b, seed, out)
    trainer = Trainer(load_config(ROOT / config, overrides))  # stamps samples and train seconds on each eval
    key = f"{config}:{seed}"
    if key not in initial:  # the initial network is the same for every estimator of a seed and config
        with preserved_rng():  # the evaluation's loaders draw from the global RNGs: leave training's streams alone
            start = trainer.evaluate()
        initial[key] = {**start, "step": 0.0, "epoch": 0.0, "samples": 0.0, "train_seconds": 0.0,
                        "train_cpu_seconds": 0.0}
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    history = [initial[key], *eval_history(out)]
    print(f"  {name} b={b} seed {seed}: " + ", ".join(f"{m}={history[-1].get(m, float('nan')):.4f}" for m in METRICS)
          + f", train {history[-1]['train_seconds']:.0f} s (fit {wall:.0f} s)", flush=True)
    return {"estimator": name, "batch": b, "seed": seed, "config": config, "overrides": overrides,
            "output_dir": str(out), "history": history, "fit_seconds": wall}


def summarise(runs: list[dict], reference: tuple[str, int]) -> dict[str, Any]:
    """Final accuracies (mean over seeds) and time / samples to reach the reference run's final accuracy."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["estimator"], r["batch"]), []).append(r)
    ref = groups.get(reference)
    rows = []
    for (name, b), rs in groups.items():
        row: dict[str, Any] = {"estimator": name, "batch": b, "seeds": len(rs),
                               "seed_list": [r["seed"] for r in rs],
                               "epochs": float(np.mean([r["history"][-1].get("epoch", math.nan) for r in rs]))}
        for key in CLOCKS:
            row[key] = float(np.mean([r["history"][-1][key] for r in rs]))
            last = [last_epoch_cost(r["history"], key) for r in rs]
            row[f"{key}_per_epoch_last"] = None if any(v is None for v in last) else float(np.mean(last))
        for m in METRICS:
            finals = [r["history"][-1].get(m, math.nan) for r in rs]
            row[m] = float(np.mean(finals))
            row[f"{m}_per_seed"] = [float(v) for v in finals]
            # across seeds: sample std (ddof 1) and the standard error of the mean, std / sqrt(seeds)
            row[f"{m}_std"] = float(np.std(finals, ddof=1)) if len(finals) > 1 else None
            row[f"{m}_sem"] = row[f"{m}_std"] / math.sqrt(len(finals)) if len(finals) > 1 else None
            if ref is not None:
                target = float(np.mean([r["history"][-1].get(m, math.nan) for r in ref]))
                row[f"{m}_target"] = target
                for key, label in (("train_seconds", "seconds"), ("train_cpu_seconds", "cpu_seconds"),
                                   ("samples", "samples")):
                    hits = [time_to(r["history"], m, target, key) for r in rs]
                    row[f"{label}_to_{m}"] = None if any(h is None for h in hits) else float(np.mean(hits))
        # paired by seed against the reference estimator at the same b (same initial network and batches per seed)
        base = {r["seed"]: r for r in groups.get((reference[0], b), [])}
        pairs = [(r, base[r["seed"]]) for r in rs if r["seed"] in base]
        if name != reference[0] and pairs:
            for m in METRICS:
                d = [r["history"][-1].get(m, math.nan) - q["history"][-1].get(m, math.nan) for r, q in pairs]
                row[f"{m}_paired_diff_vs_{reference[0]}"] = float(np.mean(d))
                row[f"{m}_paired_diff_std"] = float(np.std(d, ddof=1)) if len(d) > 1 else None
                row[f"{m}_paired_diff_per_seed"] = [float(v) for v in d]
        rows.append(row)
    if ref is not None:
        ref_row = next(x for x in rows if (x["estimator"], x["batch"]) == reference)
        for row in rows:
            for m in METRICS:
                for label in ("seconds", "cpu_seconds", "samples"):
                    t, t_ref = row.get(f"{label}_to_{m}"), ref_row.get(f"{label}_to_{m}")
                    row[f"speedup_{label}_to_{m}_vs_ref"] = (t_ref / t) if t and t_ref else None
    return {"reference": {"estimator": reference[0], "batch": reference[1]}, "rows": rows}


def plot(runs: list[dict], path: Path, title: str, clock: str) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    names = sorted({r["estimator"] for r in runs})
    batches = sorted({r["batch"] for r in runs})
    styles = ["-", "--", ":", "-."]
    for r in runs:
        h = r["history"]
        color = f"C{names.index(r['estimator'])}"
        ls = styles[batches.index(r["batch"]) % len(styles)]
        label = f"{r['estimator']} b={r['batch']}" + (f" s{r['seed']}" if r["seed"] else "")
        for row, metric in enumerate(METRICS):
            y = [p.get(metric, math.nan) for p in h]
            axes[row, 0].plot([p["samples"] for p in h], y, ls, color=color, marker="o", ms=3, label=label)
            axes[row, 1].plot([p[clock] for p in h], y, ls, color=color, marker="o", ms=3, label=label)
    for row, metric in enumerate(METRICS):
        axes[row, 0].set_ylabel(metric.replace("_acc", " accuracy").replace("knn1", "1-NN").replace("_", " "))
    axes[1, 0].set_xlabel("samples accessed (images)")
    axes[1, 1].set_xlabel("training wall-clock (s, evaluation excluded)" if clock == "train_seconds"
                          else "training CPU time of the process (s, evaluation excluded)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def mean_curves(runs: list[dict], metric: str) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """Per (estimator, b): the epochs evaluated by every seed, and the mean, std (ddof 1; 0 with one seed) and mean
    train CPU / wall seconds of ``metric`` over the seeds at those epochs."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["estimator"], r["batch"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        tables = [{round(p.get("epoch", math.nan), 6): p for p in r["history"]} for r in rs]
        epochs = sorted(set.intersection(*(set(t) for t in tables)))
        vals = np.array([[t[e].get(metric, math.nan) for e in epochs] for t in tables], dtype=float)
        out[key] = {"epoch": np.array(epochs, dtype=float), "mean": vals.mean(0),
                    "std": vals.std(0, ddof=1) if len(rs) > 1 else np.zeros(len(epochs)),
                    **{c: np.array([[t[e][c] for e in epochs] for t in tables]).mean(0) for c in CLOCKS}}
    return out


def plot_bands(runs: list[dict], path: Path, title: str, clock: str = "epoch") -> Path:
    """Linear-probe (top) and 1-NN (bottom) accuracy against ``clock`` (``epoch`` or a mean clock of CLOCKS): the
    mean over seeds with a ± 1 std band per estimator, one column per batch size."""
    plt = pyplot()
    batches = sorted({r["batch"] for r in runs})
    names = list(dict.fromkeys(r["estimator"] for r in runs))
    label = {"emc2": "EMC² (states in the batch's forward)",
             "emc2_unaugmented": "EMC² (states un-augmented, eval mode)", "infonce": "SimCLR (InfoNCE)",
             "emc2_q0.5": "EMC², reencode_fraction 0.5", "emc2_q0.25": "EMC², reencode_fraction 0.25",
             "sogclr": "SogCLR", "hcl": "HCL"}
    fig, axes = plt.subplots(len(METRICS), len(batches), figsize=(5.5 * len(batches), 7), squeeze=False,
                             sharey="row")
    for row, metric in enumerate(METRICS):
        curves = mean_curves(runs, metric)
        for col, b in enumerate(batches):
            ax = axes[row, col]
            for i, name in enumerate(names):
                c = curves.get((name, b))
                if c is None:
                    continue
                x = c["epoch"] if clock == "epoch" else c[clock]
                seeds = sum(1 for r in runs if (r["estimator"], r["batch"]) == (name, b))
                ax.plot(x, c["mean"], "-o", ms=3, color=f"C{i}", label=f"{label.get(name, name)} ({seeds} seeds)")
                ax.fill_between(x, c["mean"] - c["std"], c["mean"] + c["std"], color=f"C{i}", alpha=0.2)
            ax.set_title(f"b = {b}", fontsize=10)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(("linear probe" if metric == "linear_probe_acc" else "1-NN") + " test accuracy")
            if row == len(METRICS) - 1:
                ax.set_xlabel("epoch" if clock == "epoch" else
                              "training CPU s (mean over seeds)" if clock == "train_cpu_seconds" else
                              "training wall-clock s (mean over seeds)")
    legend: dict[str, Any] = {}  # every estimator once, also one run at only some batch sizes
    for ax in axes.flat:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(text, handle)
    axes[0, -1].legend(list(legend.values()), list(legend), fontsize=8, loc="lower right")
    fig.suptitle(title + "\nmean ± 1 std over seeds", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimators", default="emc2,infonce,sogclr,hcl")
    ap.add_argument("--batches", default="32,256", help="comma-separated b (images per step)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--subset", type=int, default=2000, help="first N training images (0: all)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--eval-max", type=int, default=2000, help="probe training images (test: half as many; 0: all)")
    ap.add_argument("--eval-test", type=int, default=None,
                    help="held-out test images of the probe and 1-NN (default: half of --eval-max; 0: all)")
    ap.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    ap.add_argument("--probe-epochs", type=int, default=100)
    ap.add_argument("--workers", type=int, default=0, help="data loader workers (0: in-process, so CPU time counts it)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--clock", choices=CLOCKS, default=None,
                    help="x axis of the time plots and the speed-up (default: CPU time on a CPU, wall-clock on a GPU)")
    ap.add_argument("--data-root", default=None,
                    help="folder holding stl10_binary/: run STL-10 with the paper's configs")
    ap.add_argument("--config", default=None, help="one config for every batch size (overrides the defaults above)")
    ap.add_argument("--override", nargs="*", default=[], help="extra config overrides key.sub=value")
    ap.add_argument("--work", default=None,
                    help="folder of the run folders (checkpoints, metrics.csv, plots; each run's folder is replaced); "
                         "default: <out stem>_runs/ beside --out, or runs/small_batch[_smoke]/ in the checkout "
                         "without --out")
    ap.add_argument("--no-run-plots", action="store_true",
                    help="skip the trainer's per-run PNGs (plot_curves: ~10 s a run on a 2-core CPU; on in --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny run for CI (seconds)")
    ap.add_argument("--out", default=None, help="JSON path (default experiments/results/small_batch[_smoke].json)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="train nothing: combine the runs of these result files (or their .partial.json, written "
                         "after every run) into --out, with the summary, table and plots")
    args = ap.parse_args(argv)
    if args.smoke:
        args.estimators, args.batches, args.subset, args.epochs, args.eval_max, args.probe_epochs = (
            "emc2,infonce", "4", 16, 1, 32, 3)
        args.threads = args.threads or 1
        args.no_run_plots = True
        args.override = ["data.name=digits", "data.image_size=8", "model.cifar_stem=true", "model.proj_hidden=32",
                         "model.proj_dim=16", "eval.knn_k=[1]", "eval.batch_size=64", *args.override]
    args.work = str(work_folder(args.work, args.out, args.smoke))
    args.estimator_list = [s for s in args.estimators.split(",") if s]
    args.batch_list = [int(b) for b in args.batches.split(",") if b]
    args.seed_list = [int(s) for s in args.seeds.split(",") if s]
    if not args.estimator_list or not args.batch_list or not args.seed_list or min(args.batch_list) < 2:
        ap.error("--estimators, --batches (each >= 2) and --seeds must be non-empty")
    return args


def work_folder(work: str | None, out: str | None, smoke: bool) -> Path:
    """The folder of the run folders: ``--work`` (relative to the current folder); else beside ``--out`` as
    ``<out stem>_runs`` (``runs/<out stem>_runs`` in the checkout when ``--out`` is in experiments/results: the
    committed results never receive run folders); else ``runs/small_batch[_smoke]`` in the checkout."""
    if work:
        return Path(work).expanduser().resolve()
    if out:
        o = Path(out).expanduser().resolve()
        results = (ROOT / "experiments" / "results").resolve()
        return (ROOT / "runs" if o.parent == results else o.parent) / f"{o.stem}_runs"
    return ROOT / "runs" / ("small_batch_smoke" if smoke else "small_batch")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else default_out("small_batch", args.smoke)
    info = machine_info("cuda" if torch.cuda.is_available() else "cpu")
    clock = args.clock or ("train_seconds" if info["gpu"] else "train_cpu_seconds")
    if args.merge:
        return merge(args, out)
    print(f"machine: {describe_machine(info)}", flush=True)
    initial: dict[str, dict[str, float]] = {}
    data = "STL-10" if args.data_root else ("digits" if args.smoke else "Fashion-MNIST")
    command = " ".join(["python", "experiments/small_batch.py", *(sys.argv[1:] if argv is None else argv)])
    config = {k: v for k, v in vars(args).items() if k not in ("estimator_list", "batch_list", "seed_list")}
    runs: list[dict] = []
    for seed in args.seed_list:
        for b in args.batch_list:
            for name in args.estimator_list:
                runs.append(run(args, name, b, seed, initial))
                # the runs so far, so that an interrupted grid keeps what it finished (--merge reads these)
                write_json(out.with_name(out.stem + ".partial.json"),
                           {"command": command, "machine": info, "data": data, "clock": clock,
                            "config": config, "runs": runs})
    report(runs, out, {"command": command, "machine": info, "data": data, "clock": clock, "config": config})
    return 0


def merge(args: argparse.Namespace, out: Path) -> int:
    """``--merge``: the runs of several result files (one per process of a grid run in parallel) as one result."""
    metas, runs = [], []
    for p in args.merge:
        d = json.loads(Path(p).read_text())
        metas.append({k: d.get(k) for k in ("command", "machine", "data", "clock", "config")})
        runs += d["runs"]
    seen = set()
    for r in runs:
        key = (r["estimator"], r["batch"], r["seed"])
        if key in seen:
            raise SystemExit(f"--merge: run {key} appears twice")
        seen.add(key)
    first = metas[0]
    report(runs, out, {"command": " | ".join(m["command"] for m in metas), "merged_from": list(args.merge),
                       "machine": first["machine"], "data": first["data"], "clock": first["clock"],
                       "config": first["config"], "configs": [m["config"] for m in metas]})
    return 0


def report(runs: list[dict], out: Path, meta: dict[str, Any]) -> None:
    """Summary (mean ± std over seeds, time to the reference accuracy), JSON, plots and the printed table."""
    data, clock, cfg, info = meta["data"], meta["clock"], meta["config"], meta["machine"]
    names = list(dict.fromkeys(r["estimator"] for r in runs))
    batches = sorted({r["batch"] for r in runs})
    ref_name = "infonce" if "infonce" in names else names[0]
    summary = summarise(runs, (ref_name, min(batches)))
    result = {"protocol": "small-batch quality: linear probe and 1-NN vs samples accessed and wall-clock",
              **meta, "summary": summary, "runs": runs}
    write_json(out, result)
    seeds = sorted({r["seed"] for r in runs})
    epochs = max(r["history"][-1].get("epoch", 0) for r in runs)
    title = (f"{data}, {cfg.get('subset') or 'all'} images, {epochs:g} epochs, {len(seeds)} seeds, "
             f"{describe_machine(info)}")
    png = plot_bands(runs, out.with_suffix(".png"), title)
    plot_bands(runs, out.with_name(out.stem + "_cpu.png"), title, clock=clock)
    plot(runs, out.with_name(out.stem + "_runs.png"), title, clock)

    def f(v: Any, spec: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    ref = summary["reference"]
    c = "seconds" if clock == "train_seconds" else "cpu_seconds"
    print(f"\n{data}: final accuracy, mean ± std over seeds (sem = std / sqrt(seeds))")
    print(format_table(
        ["estimator", "b", "seeds", "epochs", "linear probe", "LP sem", "1-NN", "1-NN sem", "train CPU s",
         "CPU s / epoch (last)", f"LP − {ref_name} (paired)", f"1-NN − {ref_name} (paired)"],
        [[r["estimator"], r["batch"], r["seeds"], f(r["epochs"], "g"),
          f(r["linear_probe_acc"], ".4f") + " ± " + f(r["linear_probe_acc_std"], ".4f"),
          f(r["linear_probe_acc_sem"], ".4f"),
          f(r["knn1_acc"], ".4f") + " ± " + f(r["knn1_acc_std"], ".4f"), f(r["knn1_acc_sem"], ".4f"),
          f(r["train_cpu_seconds"], ".0f"), f(r["train_cpu_seconds_per_epoch_last"], ".1f")]
         + [f(r.get(f"{m}_paired_diff_vs_{ref_name}"), "+.4f") + " ± " + f(r.get(f"{m}_paired_diff_std"), ".4f")
            if f"{m}_paired_diff_vs_{ref_name}" in r else "-" for m in METRICS]
         for r in summary["rows"]]))
    print(f"\n{data}: final accuracy; time ({'wall-clock' if c == 'seconds' else 'process CPU'} s) and samples to "
          f"reach {ref['estimator']} b={ref['batch']}'s final accuracy, and speed-up over it")
    print(format_table(
        ["estimator", "b", "linear probe", "1-NN", "train wall s", "train CPU s", "s to LP target", "× (LP)",
         "samples to LP target", "s to 1-NN target", "× (1-NN)"],
        [[r["estimator"], r["batch"], f(r["linear_probe_acc"], ".4f"), f(r["knn1_acc"], ".4f"),
          f(r["train_seconds"], ".0f"), f(r["train_cpu_seconds"], ".0f"), f(r.get(f"{c}_to_linear_probe_acc"), ".0f"),
          f(r.get(f"speedup_{c}_to_linear_probe_acc_vs_ref"), ".2f"), f(r.get("samples_to_linear_probe_acc"), ".0f"),
          f(r.get(f"{c}_to_knn1_acc"), ".0f"), f(r.get(f"speedup_{c}_to_knn1_acc_vs_ref"), ".2f")]
         for r in summary["rows"]]))
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    raise SystemExit(main())
