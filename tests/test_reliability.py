"""Faults: a run killed with SIGKILL mid-epoch resumes to the same bits; a dying rank stops the job."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains through the CLI or starts processes: `make test-fast` skips it

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.name=digits", "data.image_size=8", "data.subset=96", "data.num_workers=0", "model.proj_hidden=64",
    "model.proj_dim=32", "train.batch_size=16", "train.epochs=2", "train.ckpt_every=2", "train.log_every=2",
    "eval.enabled=false",
]


def _train(out, *extra):
    return [sys.executable, str(ROOT / "scripts/train.py"), "--config", "configs/fmnist_unimodal.yaml",
            *TINY, f"output_dir={out}", *extra]


def _hashes(ckpt):
    r = subprocess.run([sys.executable, str(ROOT / "scripts/checkpoint_info.py"), str(ckpt), "--json"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["hash"]


@pytest.mark.determinism
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full = tmp_path / "full"
    r = subprocess.run(_train(full), capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_train(cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    target = cut / "checkpoints" / "ckpt-00000008.pt"  # mid-epoch 2 (6 steps per epoch)
    deadline = time.time() + 600
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "checkpoints" / "ckpt-00000012.pt").exists(), "the run finished before it could be killed"
    r = subprocess.run(_train(cut, "train.resume=latest"), capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[resume]" in r.stdout + r.stderr
    assert _hashes(full / "checkpoints" / "ckpt-00000012.pt") == _hashes(cut / "checkpoints" / "ckpt-00000012.pt")


@pytest.mark.dist
def test_a_dying_rank_stops_the_job(tmp_path):
    worker = tmp_path / "die.py"
    worker.write_text(f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from dual_emc2.train.config import load_config
from dual_emc2.train.trainer import Trainer

class Dying(Trainer):
    def train_step(self, item):
        if self.pos.step == 2 and self.acc.process_index == 1:
            os._exit(17)  # a rank vanishes without a word
        return super().train_step(item)

cfg = load_config({str(ROOT / 'configs/fmnist_unimodal.yaml')!r}, {TINY!r} + [
    "output_dir={tmp_path / 'out'}", "train.dist_timeout_s=20", "model.norm=group", "model.head_batch_norm=false"])
Dying(cfg).fit()
""")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    accelerate = str(Path(sys.executable).parent / "accelerate")
    t0 = time.time()
    r = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29519",
                        str(worker)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode != 0
    assert time.time() - t0 < 240, "the surviving rank hung"
    assert "exitcode" in r.stderr or "17" in r.stderr
