"""Two-tower fine-tuning protocol: EMC² against InfoNCE on the WordNet text–text and emoji image–text configs, over
seeds, with held-out retrieval (R@1, R@10, MRR in both directions) at step 0 and after training, paired by seed.

    python experiments/two_tower.py --configs text_wordnet,clip_emoji --estimators emc2,infonce --seeds 0,1,2 \\
        --work /tmp/two_tower --out experiments/results/two_tower_finetune.json

Each run is ``scripts/train.py --config configs/<config>.yaml loss.estimator=<estimator> seed=<seed>
output_dir=<work>/<config>_<estimator>_s<seed>``, in a subprocess with ``--threads`` torch threads. The seed changes
the initial projection heads, the batch order, the augmentations and the chains; the held-out split
(``data.split_seed``) stays the same, so every run is scored on the same queries. A run whose ``final_metrics.json``
exists is read, not run again; a run folder without it (an interrupted run) is resumed from its latest checkpoint.
``--collect`` only reads; ``--include`` adds the runs of an earlier output of this script.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import ROOT, format_table, machine_info, write_json

from dual_emc2.train.config import find_config

METRICS = ("x2y_recall@1", "x2y_recall@10", "x2y_mrr", "y2x_recall@1", "y2x_recall@10", "y2x_mrr")
COSTS = ("train_seconds", "train_cpu_seconds")


def run_name(config: str, estimator: str, seed: int) -> str:
    return f"{config}_{estimator}_s{seed}"


def run_key(config: str, estimator: str, seed: int) -> str:
    """The key of a run in the output's ``runs``: ``config:estimator:seed``."""
    return f"{config}:{estimator}:{seed}"


def train_command(config: str, estimator: str, seed: int, out: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", config,  # a packaged config, by name
           f"loss.estimator={estimator}", f"seed={seed}", f"output_dir={out}"]
    return cmd + (["--resume", "latest"] if resume else [])


def read_run(out: Path) -> dict[str, dict[str, float]]:
    """``{"final": ..., "step_0": ...}`` from a finished run's ``final_metrics.json``."""
    metrics = json.loads((out / "final_metrics.json").read_text())
    step_0 = metrics.pop("baselines", {}).get("step_0", {})
    return {"final": metrics, "step_0": step_0}


def train(config: str, estimator: str, seed: int, work: Path, threads: int) -> dict[str, dict[str, float]]:
    """Run one training (or resume an interrupted one) and read its result."""
    out = work / run_name(config, estimator, seed)
    if (out / "final_metrics.json").exists():
        print(f"  {out.name}: done earlier, read", flush=True)
        return read_run(out)
    resume = out.exists()
    log = work / f"{out.name}.log"
    print(f"  {out.name}: {'resuming' if resume else 'training'} (log {log})", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with log.open("a") as f:
        rc = subprocess.run(train_command(config, estimator, seed, out, resume), stdout=f, stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT).returncode
    if rc != 0 or not (out / "final_metrics.json").exists():
        raise SystemExit(f"{out.name}: training failed (exit {rc}); see the end of {log}. Run the same command "
                         f"again to resume it from its latest checkpoint.")
    return read_run(out)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; None for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(runs: dict[str, dict[str, dict[str, float]]], reference: str) -> list[dict[str, Any]]:
    """One row per (config, estimator): mean ± std over seeds of each metric, and for estimators other than
    ``reference`` the per-seed difference from ``reference`` on the same config and seed (mean ± std of the paired
    differences).  Step 0 is one row per config (the mean over its seeds' initial networks)."""
    grid: dict[str, dict[str, dict[int, dict[str, dict[str, float]]]]] = {}  # config → estimator → seed → run
    for key, run in runs.items():
        config, estimator, seed = key.rsplit(":", 2)
        grid.setdefault(config, {}).setdefault(estimator, {})[int(seed)] = run
    rows: list[dict[str, Any]] = []
    for config, by_estimator in grid.items():
        starts = {s: r["step_0"] for by_seed in by_estimator.values() for s, r in by_seed.items()}
        row: dict[str, Any] = {"config": config, "estimator": "step_0", "seeds": sorted(starts)}
        for m in METRICS:
            row[m], row[f"{m}_std"] = mean_std([starts[s][m] for s in sorted(starts)])
        rows.append(row)
        base = by_estimator.get(reference, {})
        for estimator, by_seed in by_estimator.items():
            seeds = sorted(by_seed)
            row = {"config": config, "estimator": estimator, "seeds": seeds}
            for m in (*METRICS, *COSTS):
                row[f"{m}_per_seed"] = [by_seed[s]["final"][m] for s in seeds]
                row[m], row[f"{m}_std"] = mean_std(row[f"{m}_per_seed"])
            paired = [s for s in seeds if s in base]
            if estimator != reference and paired:
                row["paired_seeds"] = paired
                for m in (*METRICS, *COSTS):
                    d = [by_seed[s]["final"][m] - base[s]["final"][m] for s in paired]
                    row[f"{m}_paired_diff"], row[f"{m}_paired_diff_std"] = mean_std(d)
                    row[f"{m}_paired_diff_per_seed"] = d
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], reference: str) -> str:
    def cell(row: dict[str, Any], m: str) -> str:
        sd = row.get(f"{m}_std")
        text = f"{row[m]:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")
        if f"{m}_paired_diff" in row:
            d, dsd = row[f"{m}_paired_diff"], row[f"{m}_paired_diff_std"]
            text += f" (Δ {d:+.3f}" + (f" ± {dsd:.3f}" if dsd is not None else "") + ")"
        return text

    headers = ["config", "estimator", "seeds", *METRICS, "train CPU s"]
    body = [[r["config"], r["estimator"], len(r["seeds"]), *(cell(r, m) for m in METRICS),
             f"{r['train_cpu_seconds']:.0f}" if "train_cpu_seconds" in r else None] for r in rows]
    return format_table(headers, body) + f"\nΔ: paired by seed against {reference}, mean ± std over seeds"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="text_wordnet,clip_emoji", help="config names under configs/")
    p.add_argument("--estimators", default="emc2,infonce")
    p.add_argument("--reference", default="infonce", help="the estimator the others are paired against")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    p.add_argument("--work", required=True, help="folder of the run folders (outside the checkout)")
    p.add_argument("--out", required=True, help="JSON result")
    p.add_argument("--collect", action="store_true", help="read the runs in --work; train nothing")
    p.add_argument("--include", nargs="*", default=[], help="earlier outputs of this script whose runs to add")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs, estimators = args.configs.split(","), args.estimators.split(",")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else []
    for config in configs:
        try:
            find_config(f"configs/{config}.yaml")
        except FileNotFoundError as e:
            raise SystemExit(f"--configs: {e}") from None
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, dict[str, float]]] = {}
    for path in args.include:
        try:
            runs.update(json.loads(Path(path).read_text())["runs"])
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise SystemExit(f"--include {path}: not an output of this script ({e})") from None
    for seed in seeds:
        for config in configs:
            for estimator in estimators:
                key = run_key(config, estimator, seed)
                out = work / run_name(config, estimator, seed)
                if args.collect:
                    if (out / "final_metrics.json").exists():
                        runs[key] = read_run(out)
                elif key not in runs:
                    runs[key] = train(config, estimator, seed, work, args.threads)
    if not runs:
        raise SystemExit(f"no finished runs in {work} and nothing included")
    rows = summarise(runs, args.reference)
    print(table(rows, args.reference))
    write_json(args.out, {
        "protocol": "two-tower fine-tuning, held-out retrieval after training and at step 0, paired by seed",
        "command": " ".join(["python experiments/two_tower.py", *(argv if argv is not None else sys.argv[1:])]),
        "reference": args.reference, "machine": {**machine_info(), "torch_threads": args.threads}, "summary": rows,
        "runs": dict(sorted(runs.items())),
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
