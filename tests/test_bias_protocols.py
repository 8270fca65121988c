"""The bias protocols (experiments/chain_check.py, mean_field_bias.py) run end to end at their smoke size, write the
documented JSON, and still show the effects they exist to measure: Rao–Blackwell draws sample softmax(β s) over D_neg
more closely than Algorithm 1's in-batch proposals, and the default EMC² gradient is closer to ∇L than InfoNCE's at
b = 4 (whose target is a different loss).  The mean-field protocol's exact gradient is checked against the default
EMC² at b = N, where every negative is in the batch and the estimator is exact."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "experiments"
if str(EVAL) not in sys.path:
    sys.path.insert(0, str(EVAL))

import chain_check  # noqa: E402
import mean_field_bias  # noqa: E402


def _run(script: str, *args: str, timeout: int = 240) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(EVAL / script), *args, "--threads", "1"], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT, env=env)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout


# ------------------------------------------------------------------------------------------------ chain check
def test_chain_check_smoke(tmp_path: Path) -> None:
    out = tmp_path / "cc.json"
    stdout = _run("chain_check.py", "--smoke", "--out", str(out))
    res = json.loads(out.read_text())
    cfg = res["config"]
    assert cfg["smoke"] and res["machine"]["torch"] == torch.__version__
    (st,) = res["settings"]
    assert (st["c"], st["beta"], st["steps"], st["burn_in"]) == (6, 5.0, 6, 3)
    assert set(st["curves"]) == set(chain_check.VARIANTS) | set(chain_check.REFERENCES)
    cps = cfg["checkpoints"]
    for name, cur in st["curves"].items():
        assert cur["visits"] == cps, name
        assert len(cur["tv"]) == len(cps) and all(0 < v < 1 for v in cur["tv"]), name
        if name in chain_check.VARIANTS:
            assert len(cur["noise"]) == len(cps) and all(v > 0 for v in cur["noise"])
            assert 0 <= cur["per_visit_tv_from_batch_softmax"] <= 1
    # the Rao–Blackwell weights are the pool softmax by construction; the M-H visit counts are not
    assert st["curves"]["rao_blackwell"]["per_visit_tv_from_pool_softmax"] < 1e-9
    assert st["curves"]["pool"]["per_visit_tv_from_pool_softmax"] > 0.05
    # the effect: Algorithm 1 (batch proposals) is further from softmax(β s) over D_neg than the exact RB update
    rb, batch = st["curves"]["rao_blackwell"]["tv"][-1], st["curves"]["batch"]["tv"][-1]
    assert rb < 0.7 * batch, (rb, batch)
    # ... because it is pulled toward the in-batch softmax, which is itself far from the global one
    inb = st["curves"]["in-batch softmax"]["tv"][-1]
    assert inb > batch
    to_inb = {v: st["curves"][v]["tv_from_in_batch_softmax"][-1] for v in ("batch", "rao_blackwell")}
    assert to_inb["batch"] < to_inb["rao_blackwell"], to_inb
    # more i.i.d. samples, smaller Monte Carlo floor
    assert st["curves"]["iid (same n)"]["tv"][-1] < st["curves"]["iid (1/visit)"]["tv"][-1]
    assert "rao_blackwell" in stdout and out.with_suffix(".png").stat().st_size > 10_000


def test_chain_check_tv_and_iid_floor() -> None:
    p = torch.tensor([0.5, 0.25, 0.25])
    assert chain_check.tv(p, torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(0.5)
    assert chain_check.tv(2 * p, p) == 0.0  # normalised first
    import numpy as np

    rng = np.random.default_rng(0)
    small, large = chain_check.iid_tv(p, 100, rng), chain_check.iid_tv(p, 1_000_000, rng)
    assert large < 0.01 and large < small


def test_chain_check_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        chain_check.parse_args(["--variants", "pool,nope"])
    with pytest.raises(SystemExit):
        chain_check.parse_args(["--negatives", "10", "--candidates", "20"])


# ------------------------------------------------------------------------------------------------ mean-field bias
def test_mean_field_bias_smoke(tmp_path: Path) -> None:
    out = tmp_path / "mf.json"
    stdout = _run("mean_field_bias.py", "--smoke", "--out", str(out))
    res = json.loads(out.read_text())
    cfg = res["config"]
    assert cfg["smoke"] and cfg["batch"] == 4 and cfg["steps_per_epoch"] == cfg["n"] // 4
    # independent check of the reference: EMC² at b = N is exact, and matches the float64 autograd ∇L
    assert res["check_full_batch_emc2_rel_error"] < 1e-5
    assert set(res["rows"]) == {"emc2", "infonce"}
    for label, row in res["rows"].items():
        (pt,) = row["points"]
        assert pt["epochs"] == cfg["epochs"][0] and pt["blocks"] == cfg["blocks"]
        assert pt["rel_error"] > 0 and pt["rel_noise"] > 0 and pt["rel_bias"] <= pt["rel_error"]
        assert row["estimator"] == mean_field_bias.ROWS[label][0] and row["ms_per_step"] > 0
    emc2, infonce = res["rows"]["emc2"]["points"][0], res["rows"]["infonce"]["points"][0]
    # InfoNCE (positive in the denominator, in-batch negatives only) is biased for ∇L well beyond its noise; the
    # default EMC² is closer
    assert infonce["rel_error"] > 0.3 and infonce["rel_error"] > 3 * infonce["rel_noise"]
    assert emc2["rel_error"] < infonce["rel_error"]
    assert "infonce" in stdout and out.with_suffix(".png").stat().st_size > 10_000


def test_mean_field_noise_is_batch_means() -> None:
    # per-epoch means that alternate ±1 around the exact gradient: K = 2 blocks of equal size have means ±…, the
    # estimate is exact arithmetic on them
    grad = torch.tensor([1.0, 0.0], dtype=torch.float64)
    per_epoch = torch.stack([grad + torch.tensor([0.0, 1.0]) * (1 if e < 2 else -1) for e in range(4)]).double()
    r = mean_field_bias.error_and_noise(per_epoch, 4, grad, blocks=2)
    assert r["rel_error"] == pytest.approx(0.0)
    # block means (1, 1) and (1, −1): Σ‖m_k − m̄‖² = 2, / (K (K − 1)) = 1
    assert r["rel_noise"] == pytest.approx(1.0)
    assert r["rel_bias"] == 0.0 and r["cosine"] == pytest.approx(1.0)
