#!/usr/bin/env python
"""Summary of a `make gpu-check` folder: each goal against what was measured (PASS / MISS, or SKIP when the run did
not measure it, e.g. at --smoke sizes), the GPU tests, peak memory and host syncs, the stage times; printed and
written to OUT/summary.json.

    python scripts/gpu_check_summary.py OUT

Goals: the M-H sampler (``mh_visit_counts``: proposal draws + chains) ≤ 0.1 ms at B = 512, R = 510 and ≤ 2 ms at
B = 8192; an EMC² step at ResNet-18 96 px b = 256 bf16 costs at most 3 % more than SimCLR's step with the rows it
encodes: ≤ 1.03 × (1 + q) × SimCLR's, where q is the fraction of the out-of-batch chain states it encodes in the
batch's forward (the default q = 1: 2b state views beside the 2b batch views, so ≤ 2.06×; ``emc2_q025``: ≤ 1.29×;
Algorithm 1 with stale scores encodes none: ≤ 1.03×).
"""
from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

SAMPLER_GOALS_MS = {512: 0.1, 8192: 2.0}  # B → median ms of the full sampler call
STEP_GOAL_RATIO, STEP_BATCH = 1.03, 256
#: estimator → q, the fraction of its out-of-batch chain states encoded with the batch (extra rows: q × the batch's)
STEP_ESTIMATORS = {"emc2": 1.0, "emc2_q025": 0.25, "emc2_stale_drop": 0.0}


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def goal(name: str, measured: float | None, limit: float, unit: str, note: str = "") -> dict[str, Any]:
    """One goal row: PASS when ``measured <= limit``, MISS above, SKIP when not measured."""
    status = "SKIP" if measured is None else "PASS" if measured <= limit else "MISS"
    return {"goal": name, "limit": limit, "measured": measured, "unit": unit, "status": status, "note": note}


def sampler_goals(bench: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = {r["B"]: r for r in (bench or {}).get("results", [])}
    out = []
    for B, limit in SAMPLER_GOALS_MS.items():
        r = rows.get(B)
        note = "" if r is None else (f"R = {r['R']}, {r['full_backend']}; chains only: "
                                     f"{r['triton_ms'] if r['triton_ms'] is not None else r['torch_ms']:.4g} ms, "
                                     f"InfoNCE fwd+bwd {r['infonce_ms']:.4g} ms")
        out.append(goal(f"sampler B = {B}", None if r is None else r["full_ms"], limit, "ms", note))
    return out


def step_goals(bench: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = [r for r in (bench or {}).get("rows", []) if r["batch"] == STEP_BATCH]
    by_name = {r["estimator"]: r for r in rows}
    out = []
    for name, q in STEP_ESTIMATORS.items():
        r = by_name.get(name)
        note = "" if r is None else (f"{r['case']}: {r['median_ms']:.2f} ms vs SimCLR "
                                     f"{by_name['simclr']['median_ms']:.2f} ms")
        out.append(goal(f"{name} step / SimCLR (b = {STEP_BATCH})", None if r is None else r["ratio_vs_simclr"],
                        round(STEP_GOAL_RATIO * (1.0 + q), 4), "x", note))
    return out


def gpu_tests(xml_path: Path) -> dict[str, Any] | None:
    """Counts of the junit report of ``pytest -m gpu`` (None when it was not written)."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def stages(tsv: Path) -> list[dict[str, Any]]:
    out = []
    if tsv.is_file():
        for line in tsv.read_text().splitlines():
            name, seconds, rc = line.split("\t")
            out.append({"stage": name, "seconds": int(seconds), "exit": int(rc)})
    return out


def summarize(folder: Path) -> dict[str, Any]:
    """The summary of a gpu-check folder (see the module docstring)."""
    sampler, step = _load(folder / "bench_sampler.json"), _load(folder / "bench_step.json")
    steps = [{k: r.get(k) for k in ("case", "estimator", "median_ms", "ratio_vs_simclr", "peak_mem_mib",
                                    "peak_mem_vs_simclr_mib", "host_syncs_per_step", "state_bytes_per_anchor")}
             for r in (step or {}).get("rows", [])]
    return {"folder": str(folder), "goals": sampler_goals(sampler) + step_goals(step),
            "gpu_tests": gpu_tests(folder / "pytest_gpu.xml"),
            "device": (step or {}).get("machine", {}).get("gpu") or (sampler or {}).get("device"),
            "smoke": bool((sampler or {}).get("smoke")), "steps": steps, "stages": stages(folder / "stages.tsv")}


def report(summary: dict[str, Any]) -> str:
    lines = [f"gpu-check {summary['folder']} on {summary['device']}" + (" (smoke sizes)" if summary["smoke"] else "")]
    for g in summary["goals"]:
        got = "-" if g["measured"] is None else f"{g['measured']:.4g} {g['unit']}"
        limit = f"<= {g['limit']:g} {g['unit']}"
        lines.append(f"  {g['status']:<4}  {g['goal']:<40} goal {limit:<9} measured {got:<11} {g['note']}".rstrip())
    t = summary["gpu_tests"]
    lines.append("  pytest -m gpu: " + ("no report" if t is None else
                                        f"{t['passed']} passed, {t['failures'] + t['errors']} failed, "
                                        f"{t['skipped']} skipped"))
    for r in summary["steps"]:
        lines.append(f"  step {r['case']} {r['estimator']:<16} {r['median_ms']:.2f} ms  x{r['ratio_vs_simclr']:.3f}  "
                     f"peak {r['peak_mem_mib'] if r['peak_mem_mib'] is not None else '-'} MiB  "
                     f"syncs/step {r['host_syncs_per_step'] if r['host_syncs_per_step'] is not None else '-'}")
    lines.append("  stages: " + ", ".join(f"{s['stage']} {s['seconds']} s" + ("" if s["exit"] == 0 else
                                                                               f" (exit {s['exit']})")
                                         for s in summary["stages"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="the OUT folder of scripts/gpu_check.sh")
    args = ap.parse_args(argv)
    summary = summarize(args.folder)
    print(report(summary))
    (args.folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
