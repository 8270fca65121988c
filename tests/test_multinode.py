"""Two machines on one host: two launcher invocations (machine 0 and machine 1, one process each, gloo over loopback)
train one job together, and it ends bit-identical to the same job started by one launcher with two processes.  Both
"machines" share output_dir, as on a cluster with shared storage: only the main process (global rank 0) writes."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.dist, pytest.mark.determinism]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAIN = [str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "fmnist_unimodal.yaml")]
TINY = [  # the tiny unimodal job of tests/test_distributed.py, 2 processes × b = 4, 4 steps
    "data.name=digits", "data.image_size=8", "data.subset=64", "data.num_workers=0", "model.proj_hidden=32",
    "model.proj_dim=16", "model.norm=group", "model.head_batch_norm=false", "train.epochs=1", "train.max_steps=4",
    "train.log_every=1", "eval.enabled=false", "train.dist_timeout_s=120", "optim.name=sgd", "optim.lr=0.05",
    "train.batch_size=4", "train.plots=false",
]
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    return shutil.which(name, path=str(BIN)) or name


def _accelerate(port: int, machines: int, machine_rank: int = 0) -> list[str]:
    cmd = [_tool("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", str(machines),
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    if machines > 1:
        cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    return cmd


def _torchrun(port: int, machine_rank: int) -> list[str]:
    return [_tool("torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(machine_rank),
            "--master_addr", "127.0.0.1", "--master_port", str(port)]


def _run_together(cmds: list[list[str]], timeout: int = 600) -> None:
    procs = [subprocess.Popen(c, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for c, p, out in zip(cmds, procs, outs):
        assert p.returncode == 0, (" ".join(c[:12]), out[-4000:])


def _info(run: Path) -> dict:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "checkpoint_info.py"), str(run), "--json"],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def one_launcher(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("one_launcher")
    _run_together([_accelerate(_free_port(), machines=1) + TRAIN + TINY + [f"output_dir={out}"]])
    return _info(out)


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_machines_train_together_and_equal_one_launcher(tmp_path, one_launcher, launcher):
    port, out = _free_port(), tmp_path / "two_machines"
    head = _accelerate if launcher == "accelerate" else None
    cmds = [(head(port, 2, r) if head else _torchrun(port, r)) + TRAIN + TINY + [f"output_dir={out}"] for r in (0, 1)]
    _run_together(cmds)
    got = _info(out)
    assert got["step"] == one_launcher["step"] == 4 and got["world_size"] == one_launcher["world_size"] == 2
    assert got["hash"] == one_launcher["hash"]  # parameters, optimiser and estimator state: bit-identical
