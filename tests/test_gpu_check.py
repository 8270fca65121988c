"""`make gpu-check` (scripts/gpu_check.sh) cannot rot: its smoke mode runs every stage on CPU, and the summary's
goal logic is checked on hand-made benchmark results."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check_summary", ROOT / "scripts" / "gpu_check_summary.py")
summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summary)


def _fake_results(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sampler = {"device": "H200", "smoke": False, "results": [
        {"B": B, "R": B - 2, "full_ms": ms, "triton_ms": ms / 2, "torch_ms": 40.0, "infonce_ms": 0.2,
         "full_backend": "triton"} for B, ms in ((64, 0.05), (512, 0.08), (8192, 2.5))]}
    rows = [{"case": "resnet18 96px b=256 bf16", "estimator": n, "batch": 256, "median_ms": ms,
             "ratio_vs_simclr": ms / 30, "peak_mem_mib": 9000.0, "peak_mem_vs_simclr_mib": 0.0,
             "host_syncs_per_step": 0, "state_bytes_per_anchor": 8.0}
            for n, ms in (("simclr", 30.0), ("emc2", 61.5), ("emc2_q025", 39.0), ("emc2_stale_drop", 31.5))]
    (folder / "bench_sampler.json").write_text(json.dumps(sampler))
    (folder / "bench_step.json").write_text(json.dumps({"machine": {"gpu": "H200"}, "rows": rows}))
    (folder / "pytest_gpu.xml").write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="1">'
                                           "</testsuite></testsuites>")
    (folder / "stages.tsv").write_text("pytest_gpu\t40\t1\nbench_sampler\t50\t0\n")


def test_summary_judges_each_goal(tmp_path):
    _fake_results(tmp_path)
    s = summary.summarize(tmp_path)
    status = {g["goal"]: g["status"] for g in s["goals"]}
    assert status == {"sampler B = 512": "PASS", "sampler B = 8192": "MISS",
                      "emc2 step / SimCLR (b = 256)": "PASS",  # 2.05× ≤ 1.03 × (1 + 1)
                      "emc2_q025 step / SimCLR (b = 256)": "MISS",  # 1.30× > 1.03 × 1.25
                      "emc2_stale_drop step / SimCLR (b = 256)": "MISS"}  # 1.05× > 1.03
    limits = {g["goal"]: g["limit"] for g in s["goals"]}
    assert limits["emc2 step / SimCLR (b = 256)"] == 2.06 and limits["emc2_q025 step / SimCLR (b = 256)"] == 1.2875
    assert s["gpu_tests"] == {"tests": 5, "failures": 1, "errors": 0, "skipped": 1, "passed": 3}
    assert s["stages"][0] == {"stage": "pytest_gpu", "seconds": 40, "exit": 1} and s["device"] == "H200"
    text = summary.report(s)
    assert "MISS  sampler B = 8192" in text and "3 passed, 1 failed, 1 skipped" in text
    assert summary.main([str(tmp_path)]) == 0 and json.loads((tmp_path / "summary.json").read_text())["goals"]


def test_summary_of_an_empty_folder_skips_every_goal(tmp_path):
    s = summary.summarize(tmp_path)
    assert {g["status"] for g in s["goals"]} == {"SKIP"} and s["gpu_tests"] is None and s["stages"] == []


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "gc"
    env = dict(os.environ, OMP_NUM_THREADS="1", VENV=str(Path(sys.executable).parents[1]), CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--smoke", str(out)], capture_output=True,
                       text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    got = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in got["stages"]] == ["pytest_gpu", "bench_sampler", "bench_step"]
    assert all(s["exit"] == 0 for s in got["stages"]) and got["smoke"]
    assert {r["estimator"] for r in got["steps"]} == {"simclr", "emc2", "emc2_q025", "emc2_stale_drop"}
    assert len(got["goals"]) == 5 and got["gpu_tests"] is not None
    assert "[gpu-check" in r.stdout and (out / "environment.txt").is_file()
