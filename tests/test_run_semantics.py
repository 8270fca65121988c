"""Runs a user can trust: what a resume may change, a second run in the same folder, --resume edge cases, and
SIGINT / SIGTERM — each with its exit code, its message, and that nothing of the run was lost."""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dual_emc2.errors import CheckpointError
from dual_emc2.train.checkpoint import find_latest_valid, list_checkpoints, load_checkpoint
from dual_emc2.train.config import load_config
from dual_emc2.train.run_folder import config_differences
from dual_emc2.train.run_log import read_metrics
from dual_emc2.train.trainer import Trainer

pytestmark = pytest.mark.slow  # trains, and starts training processes

ROOT = Path(__file__).resolve().parents[1]
# 96 digits, b = 16: 6 steps an epoch; no evaluation (the semantics under test do not depend on it)
TINY = ["data.name=digits", "data.image_size=8", "data.subset=96", "data.num_workers=0", "model.proj_hidden=32",
        "model.proj_dim=16", "model.arch=small_cnn", "train.batch_size=16", "train.epochs=1", "train.ckpt_every=4",
        "train.log_every=1", "eval.enabled=false", "train.plots=false", "optim.schedule=cosine"]


def cfg(out, *extra):
    return load_config(ROOT / "configs/fmnist_unimodal.yaml", TINY + [f"output_dir={out}", *extra])


def cli(*args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "scripts/train.py"), "--config", "configs/fmnist_unimodal.yaml",
                           *TINY, *args], capture_output=True, text=True, timeout=300, cwd=ROOT, **kw)


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_config_differences_lists_every_leaf():
    old = {"optim": {"lr": 1e-3, "name": "adam"}, "loss": {"options": {}}, "train": {"epochs": 1}}
    new = {"optim": {"lr": 5e-4, "name": "adam"}, "loss": {"options": {"emc2": {"seed": 1}}}, "train": {}}
    assert config_differences(old, new) == [("loss.options.emc2.seed", "<unset>", 1),
                                            ("optim.lr", 1e-3, 5e-4), ("train.epochs", 1, "<unset>")]


def test_resume_with_more_epochs_rebuilds_the_schedule_for_the_new_end(tmp_path):
    Trainer(cfg(tmp_path)).fit()
    t = Trainer(cfg(tmp_path, "train.epochs=3", "train.resume=latest", "train.keep_last=10"))
    t.fit()
    assert t.pos.step == 18
    lrs = dict(zip(*read_metrics(tmp_path / "metrics.csv")[("train", "lr")]))
    base = t.cfg.optim.lr
    for step in (7, 12, 17):  # LambdaLR after `step` scheduler steps: f(step) of the 18-step cosine
        assert lrs[step] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * step / 18)), rel=1e-6)
    assert lrs[17] > 0
    saved = load_config(tmp_path / "config.yaml")
    assert saved.train.epochs == 3  # config.yaml tells the truth
    first, last = (load_checkpoint(p)["model"] for p in (tmp_path / "checkpoints" / "ckpt-00000006.pt",
                                                         find_latest_valid(tmp_path / "checkpoints")))
    assert any(not torch.equal(first[k], last[k]) for k in first if first[k].is_floating_point())


def test_resume_refuses_changes_that_make_another_run_and_lists_them(tmp_path):
    Trainer(cfg(tmp_path)).fit()
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError) as e:
        Trainer(cfg(tmp_path, "train.resume=latest", "loss.estimator=infonce", "train.batch_size=8",
                    "model.proj_dim=24")).fit()
    msg = str(e.value)
    assert "loss.estimator: 'emc2' → 'infonce'" in msg and "train.batch_size: 16 → 8" in msg
    assert "model.proj_dim: 16 → 24" in msg and "another output_dir" in msg
    with pytest.raises(CheckpointError, match=r"optim\.lr: 0\.001 → 0\.0005.*--allow-changes"):
        Trainer(cfg(tmp_path, "train.resume=latest", "optim.lr=5e-4")).fit()
    assert snapshot(tmp_path) == before  # nothing written, nothing lost


def test_allowed_change_applies_the_new_learning_rate(tmp_path):
    Trainer(cfg(tmp_path, "optim.schedule=constant")).fit()
    t = Trainer(cfg(tmp_path, "optim.schedule=constant", "train.epochs=2", "train.resume=latest", "optim.lr=5e-4",
                    "train.allow_changes=true"))
    t.fit()
    assert all(g["lr"] == 5e-4 for g in t.optimizer.param_groups)
    assert load_config(tmp_path / "config.yaml").optim.lr == 5e-4


def test_a_second_run_in_the_same_folder_is_refused_and_loses_nothing(tmp_path):
    r = cli(f"output_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-2000:]
    before = snapshot(tmp_path)
    r = cli(f"output_dir={tmp_path}")
    assert r.returncode == 4 and "Traceback" not in r.stderr
    assert "already holds a run" in r.stderr and "--resume latest" in r.stderr and f"{tmp_path}-2" in r.stderr
    assert snapshot(tmp_path) == before


def test_resume_latest_edge_cases(tmp_path):
    fresh = tmp_path / "fresh"
    r = cli(f"output_dir={fresh}", "--resume", "latest")  # a job script may always pass it
    assert r.returncode == 0 and "no run in" in r.stdout + r.stderr
    for _, p in list_checkpoints(fresh / "checkpoints"):
        p.write_bytes(p.read_bytes()[:100])  # every checkpoint torn
    before = snapshot(fresh)
    r = cli(f"output_dir={fresh}", "--resume", "latest")
    assert r.returncode == 4 and "no intact checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert snapshot(fresh) == before
    r = cli(f"output_dir={tmp_path / 'other'}", "--resume", str(tmp_path / "missing.pt"))
    assert r.returncode == 4 and "missing.pt" in r.stderr and "Traceback" not in r.stderr
    r = cli(f"output_dir={tmp_path / 'other2'}", "--resume", str(fresh / "checkpoints" / "ckpt-00000006.pt"))
    assert r.returncode == 4 and "ckpt-00000006.pt" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_writes_a_checkpoint_and_says_how_to_resume(tmp_path, sig, code):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts/train.py"), "--config", "configs/fmnist_unimodal.yaml",
                             *TINY, f"output_dir={tmp_path}", "train.epochs=400", "train.ckpt_every=100000"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 20):
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and "--resume latest" in err
    ckpt = find_latest_valid(tmp_path / "checkpoints")
    step = load_checkpoint(ckpt)["step"]
    assert step > 0 and f"stopped at step {step} of 2400" in err
    logged = read_metrics(metrics)[("train", "lr")][0]
    assert max(logged) == step  # every step up to the checkpoint is in the log, none after it
    r = cli(f"output_dir={tmp_path}", "train.epochs=400", "train.max_steps=" + str(step + 3), "--resume", "latest")
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_checkpoint(find_latest_valid(tmp_path / "checkpoints"))["step"] == step + 3


def test_a_streamed_run_resumes_only_with_its_readers():
    from dual_emc2.train.run_folder import check_resume_config

    old = {"mode": "bimodal", "pairs": {"streaming": True}, "data": {"num_workers": 2}, "train": {"batch_size": 8}}
    new = {**old, "data": {"num_workers": 4}}
    with pytest.raises(CheckpointError, match=r"data\.num_workers: 2 → 4"):
        check_resume_config(old, new, Path("ckpt.pt"), False, 1, 1)
    elastic = {**old, "train": {"batch_size": 4}}
    with pytest.raises(CheckpointError, match="processes: 1 → 2"):
        check_resume_config(old, elastic, Path("ckpt.pt"), False, 1, 2)
    assert check_resume_config(old, old, Path("ckpt.pt"), False, 2, 2) == []
