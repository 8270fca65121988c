#!/usr/bin/env python
"""Soak test: train with periodic SIGKILLs and resumes, then compare with an uninterrupted run, bit for bit.

    python experiments/soak.py [--minutes 30] [--kill-every 20,90] [--out experiments/results/soak.json] [key=value ...]

The run is sized (by ``--epochs``/overrides) so that the killed run outlasts the budget; the uninterrupted reference
runs beside it (one thread each); the killed
run is SIGKILLed after a random delay (uniform in --kill-every seconds, so kills land mid-epoch, mid-step and during
checkpoint writes alike) and restarted with ``--resume latest`` until it reports its last step.  The final checkpoint
hashes (scripts/checkpoint_info.py) of both runs must agree.  Not part of CI.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["data.subset=2048", "data.num_workers=0", "train.batch_size=32", "eval.enabled=false",
         "train.ckpt_every=10", "train.keep_last=2"]


def _cmd(out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "scripts/train.py"), "--config", "configs/fmnist_unimodal.yaml", *SMOKE,
            f"output_dir={out}", *extra]


def _hashes(ckpt: Path) -> dict:
    r = subprocess.run([sys.executable, str(ROOT / "scripts/checkpoint_info.py"), str(ckpt), "--json"],
                       capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(r.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="budget of the killed run")
    ap.add_argument("--kill-every", default="20,90", help="min,max seconds between kills")
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs (default: sized to the budget)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/soak")
    ap.add_argument("--out", default="experiments/results/soak.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    lo, hi = (float(x) for x in args.kill_every.split(","))
    rng = random.Random(args.seed)
    work = ROOT / args.work
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    extra = list(args.overrides) + ([f"train.epochs={args.epochs}"] if args.epochs else [])

    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"{work} is not empty (an earlier soak?): remove it or pass --work, so that neither run "
                         "resumes from old checkpoints")
    t0 = time.time()
    ref = work / "reference"
    # the uninterrupted reference runs beside the killed run (one thread each), so the soak takes its budget once
    ref_proc = subprocess.Popen(_cmd(ref, extra), cwd=ROOT, env=env, stdout=subprocess.DEVNULL)

    cut = work / "killed"
    kills, restarts, t1 = 0, 0, time.time()
    deadline = t1 + args.minutes * 60
    while True:
        resume = ["train.resume=latest"] if restarts else []
        proc = subprocess.Popen(_cmd(cut, extra + resume), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        restarts += 1
        try:
            proc.wait(timeout=rng.uniform(lo, hi))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            if time.time() < deadline:
                continue
            # budget spent: let the last attempt finish
            subprocess.run(_cmd(cut, extra + ["train.resume=latest"]), check=True, cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            restarts += 1
            break
        if proc.returncode not in (0, -signal.SIGKILL, None):
            raise SystemExit(f"the killed run failed with exit code {proc.returncode}")
        if proc.returncode == 0 and (cut / "final_metrics.json").exists():
            break
    if ref_proc.wait() != 0:
        raise SystemExit(f"the reference run failed with exit code {ref_proc.returncode}")
    ref_s = (ref / "final_metrics.json").stat().st_mtime - t0
    ref_ckpt = Path((ref / "checkpoints" / "latest").read_text().strip())
    ref_info = _hashes(ref / "checkpoints" / ref_ckpt.name)
    cut_info = _hashes(cut / "checkpoints" / ref_ckpt.name)
    same = cut_info["hash"] == ref_info["hash"]
    result = {"reference_seconds": round(ref_s, 1), "killed_run_seconds": round(time.time() - t1, 1),
              "kills": kills, "starts": restarts, "final_step": ref_info["step"], "identical": same,
              "reference_hash": ref_info["hash"], "killed_hash": cut_info["hash"]}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{'reference run':<22}{result['reference_seconds']:>10.1f} s")
    print(f"{'killed run':<22}{result['killed_run_seconds']:>10.1f} s  ({kills} SIGKILLs, {restarts} starts)")
    print(f"{'final step':<22}{result['final_step']:>10}")
    print(f"{'bit-identical state':<22}{str(same):>10}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
