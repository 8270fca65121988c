"""The unimodal trainer end to end on tiny data: outputs, exact resume after a crash, STL-10 files, clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dual_emc2.train.checkpoint import find_latest_valid, load_checkpoint
from dual_emc2.train.config import load_config
from dual_emc2.train.trainer import Trainer

pytestmark = pytest.mark.slow  # trains through the CLI or starts processes: `make test-fast` skips it

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "data.name=digits", "data.image_size=8", "data.subset=96", "data.num_workers=0", "model.proj_hidden=64",
    "model.proj_dim=32", "train.batch_size=16", "train.epochs=2", "train.ckpt_every=4", "train.log_every=2",
    "eval.max_train=300", "eval.max_test=150", "eval.probe_epochs=20", "eval.knn_k=[1,5]", "eval.batch_size=128",

]


def tiny_config(tmp_path, *extra):
    return load_config(ROOT / "configs/fmnist_unimodal.yaml", TINY + [f"output_dir={tmp_path}", *extra])


def _flat_state(payload):
    out = {}
    for part in ("model", "estimator"):
        for k, v in payload[part].items():
            out[f"{part}.{k}"] = v
    for i, st in payload["optimizer"]["state"].items():
        for k, v in st.items():
            out[f"opt.{i}.{k}"] = v
    return out


@pytest.mark.parametrize("name", ["emc2", "sogclr", "infonce"])
def test_run_writes_checkpoint_metrics_and_plots(tmp_path, name):
    final = Trainer(tiny_config(tmp_path, f"loss.estimator={name}")).fit()
    assert final["step"] == 12
    assert 0.0 <= final["knn1_acc"] <= 1.0 and "linear_probe_acc" in final
    assert (tmp_path / "plots" / "train.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "eval.png").stat().st_size > 1000
    assert json.loads((tmp_path / "final_metrics.json").read_text())["step"] == 12
    ckpt = load_checkpoint(find_latest_valid(tmp_path / "checkpoints"))
    assert ckpt["step"] == 12 and ckpt["epoch"] == 2
    names = (tmp_path / "metrics.csv").read_text()
    assert "loss" in names and ("state_weight" in names) == (name == "emc2")


class Crash(RuntimeError):
    pass


@pytest.mark.determinism
def test_resume_after_a_crash_is_bit_identical(tmp_path):
    full = Trainer(tiny_config(tmp_path / "full", "eval.enabled=false"))
    full.fit()
    ref = _flat_state(full.state_payload())

    class Crashing(Trainer):
        def train_step(self, item):
            if self.pos.step == 9:  # mid-epoch 2, after the step-8 checkpoint
                raise Crash()
            return super().train_step(item)

    with pytest.raises(Crash):
        Crashing(tiny_config(tmp_path / "cut", "eval.enabled=false")).fit()
    assert load_checkpoint(find_latest_valid(tmp_path / "cut" / "checkpoints"))["step"] == 8
    resumed = Trainer(tiny_config(tmp_path / "cut", "eval.enabled=false", "train.resume=latest"))
    resumed.fit()
    got = _flat_state(resumed.state_payload())
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert resumed.pos.step == full.pos.step == 12


def _write_stl10(root: Path, n_unlabeled=64, n_train=20, n_test=20):
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("unlabeled", n_unlabeled), ("train", n_train), ("test", n_test)):
        (folder / f"{split}_X.bin").write_bytes(rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tobytes())
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes(rng.integers(1, 11, n, dtype=np.uint8).tobytes())
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    (folder / "fold_indices.txt").write_text("\n".join("0 1 2" for _ in range(10)) + "\n")


def _train_cli(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "scripts/train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_stl10_config_fails_clearly_without_data(tmp_path):
    r = _train_cli("--config", "configs/stl10_unimodal.yaml", f"data.root={tmp_path / 'nowhere'}",
                   f"output_dir={tmp_path / 'out'}")
    assert r.returncode == 3  # a data error
    assert "stl10_binary" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists(), "a failed start left output behind"


def test_stl10_config_runs_on_files_in_the_stl10_format(tmp_path):
    _write_stl10(tmp_path / "stl")
    r = _train_cli("--config", "configs/stl10_unimodal.yaml", f"data.root={tmp_path / 'stl'}",
                   f"output_dir={tmp_path / 'out'}", "data.image_size=32", "data.num_workers=0",
                   "train.mixed_precision=no", "train.batch_size=8", "train.epochs=1", "model.proj_hidden=64",
                   "model.proj_dim=32", "model.channels_last=false", "eval.probe_epochs=5", "eval.knn_k=[1]")
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads((tmp_path / "out" / "final_metrics.json").read_text())
    assert final["step"] == 8 and "knn1_acc" in final


def test_config_errors_are_named(tmp_path):
    r = _train_cli("--config", "configs/fmnist_unimodal.yaml", "optim.learning_rate=0.1")
    assert r.returncode == 2 and "did you mean 'optim.lr'" in r.stderr and "Traceback" not in r.stderr
    r = _train_cli("--config", "configs/fmnist_unimodal.yaml", "loss.options.emc2.burnin=3",
                   f"output_dir={tmp_path}", "data.subset=64")
    assert r.returncode == 2 and "burn_in" in r.stderr and "Traceback" not in r.stderr
    r = _train_cli("--config", "configs/fmnist_unimodal.yaml", "loss.options.emc2.burn_in=62",
                   "loss.options.emc2.weights=visits", f"output_dir={tmp_path}", "data.subset=64")
    assert r.returncode == 2 and "burn_in (P = 62) must be smaller than steps (R = 62" in r.stderr
    r = _train_cli("--config", "configs/fmnist_unimodal.yaml", "loss.options.emc2.burn_in=31",
                   f"output_dir={tmp_path}", "data.subset=64")
    assert r.returncode == 2 and "no burn-in" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    Trainer(load_config(ROOT / "configs/fmnist_unimodal.yaml", TINY + [f"output_dir={out}"])).fit()
    return out


def test_linear_probe_script_reads_a_checkpoint(tiny_run, tmp_path):
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, str(ROOT / "eval/linear_probe.py"), "--checkpoint", str(tiny_run),
                        "--max-train", "200", "--max-test", "100", "--probe-epochs", "10", "--knn", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["step"] == 12 and res["n_train"] == 200 and 0 <= res["knn1_acc"] <= 1
    assert "linear_probe_acc" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "eval/linear_probe.py"), "--checkpoint", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 4 and "none" in r.stderr and "Traceback" not in r.stderr  # a checkpoint error


@pytest.mark.determinism
def test_checkpoint_info_hashes_match_between_identical_runs(tiny_run, tmp_path):
    def info(path):
        r = subprocess.run([sys.executable, str(ROOT / "scripts/checkpoint_info.py"), str(path), "--json"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    a = info(find_latest_valid(tiny_run / "checkpoints"))
    assert a["step"] == 12 and a["estimator"] == "emc2" and a["sizes"]["estimator"]["bytes"] > 0
    assert "estimator/chains" in a["hash"]
    Trainer(load_config(ROOT / "configs/fmnist_unimodal.yaml", TINY + [f"output_dir={tmp_path}"])).fit()
    b = info(find_latest_valid(tmp_path / "checkpoints"))
    assert a["hash"] == b["hash"], "same seed, same processes: the run must be reproducible"


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "eval.enabled=false", "train.max_nonfinite=3", "train.ckpt_every=2")
    trainer = Trainer(cfg)
    real = trainer.estimator.forward
    calls = {"n": 0}

    def flaky(batch, beta):
        out = real(batch, beta)
        calls["n"] += 1
        if calls["n"] == 3 or calls["n"] >= 6:  # one isolated NaN, then NaN forever
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer.estimator, "forward", flaky)
    from dual_emc2.train.trainer import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite"):
        trainer.fit()
    assert trainer.nonfinite_total == 4
    last = load_checkpoint(find_latest_valid(tmp_path / "checkpoints"))
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_gradient_accumulation_counts_optimizer_steps_and_estimator_calls(tmp_path):
    # every micro-batch is its own contrastive batch (one estimator call, one chain update); the optimiser steps
    # once per accumulation group with the mean gradient
    t = Trainer(tiny_config(tmp_path, "train.grad_accum=2", "eval.enabled=false"))
    t.fit()
    assert t.pos.step == 6 and t.total_steps == 6
    assert int(t.estimator.iteration) == 12
    assert t.scheduler.last_epoch == 6


class _MLPEncoder(torch.nn.Module):
    """A user's own encoder: 8×8 images → unit features; ``features`` is what evaluation probes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 48), torch.nn.ReLU())
        self.head = torch.nn.Linear(48, 16)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return torch.nn.functional.normalize(self.head(self.body(x)), dim=-1)


def test_a_users_own_model_trains_in_the_one_loop(tmp_path):
    """Composition: the trainer takes a task built around a model the config does not describe (EMC² re-encodes its
    chain states with it) and trains and evaluates that very object."""
    from dual_emc2.towers.temperature import ContrastiveModel, InverseTemperature
    from dual_emc2.train.factory import build_accelerator
    from dual_emc2.train.unimodal import ImageViewsTask

    cfg = tiny_config(tmp_path, "loss.estimator=emc2", "model.proj_dim=16", "train.plots=false")
    model = ContrastiveModel(_MLPEncoder(), InverseTemperature(cfg.loss.beta))
    before = [p.detach().clone() for p in model.parameters()]
    acc = build_accelerator(cfg)
    trainer = Trainer(cfg, ImageViewsTask(cfg, acc, model=model), acc)
    final = trainer.fit()
    assert trainer.core is model and final["step"] == 12
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert 0.0 < final["linear_probe_acc"] <= 1.0 and final["samples"] == 12 * 16
    assert float(trainer.loss_fn.last_stats["reencoded_frac"]) > 0  # chain states went through the user's encoder
    assert not (tmp_path / "plots" / "train.png").exists()  # train.plots=false: no curves drawn
