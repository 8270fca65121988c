"""Sharded estimator state with 2 and 4 processes (gloo, CPU): a sharded run equals the replicated run bit for bit
(checkpoint hashes of model, optimiser and the assembled state), its checkpoints hold one shard per process plus the
manifest, and a run checkpointed at 2 processes resumes at 1 or 4 (same global batch) and continues as the
uninterrupted run at that size does (docs/DESIGN.md, section 3)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dual_emc2.train.checkpoint import load_checkpoint
from dual_emc2.train.checkpoint_shards import load_estimator_state

# starts processes: `make test-fast` skips it
pytestmark = [pytest.mark.slow, pytest.mark.dist, pytest.mark.determinism]

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_dist_worker.py"
GLOBAL_BATCH = 8
# 24 images, 3 steps an epoch: the second epoch reads chain states written in the first; checkpoints at 2 and 4
COMMON = [
    "data.name=digits", "data.image_size=8", "data.subset=24", "data.num_workers=0", "model.arch=small_cnn",
    "model.proj_hidden=32", "model.proj_dim=16", "model.norm=group", "model.head_batch_norm=false",
    "train.epochs=2", "train.max_steps=6", "train.ckpt_every=2", "train.keep_last=5", "train.log_every=1",
    "eval.enabled=false", "train.dist_timeout_s=120", "train.plots=false",
    "optim.name=sgd", "optim.lr=0.05",  # SGD: float-order noise between process counts stays at rounding level
]
RUNS = {  # name: (processes, estimator, state layout, resume from (run, step) or None)
    "emc2-1-replicated": (1, "emc2", "replicated", None),
    "emc2-2-replicated": (2, "emc2", "replicated", None),
    "emc2-2-sharded": (2, "emc2", "sharded", None),
    "emc2-4-replicated": (4, "emc2", "replicated", None),
    "emc2-4-sharded": (4, "emc2", "sharded", None),
    "sogclr-2-replicated": (2, "sogclr", "replicated", None),
    "sogclr-2-sharded": (2, "sogclr", "sharded", None),
    "emc2-2to2": (2, "emc2", "replicated", ("emc2-2-sharded", 4)),
    "emc2-2to1": (1, "emc2", "replicated", ("emc2-2-sharded", 4)),
    "emc2-2to4": (4, "emc2", "sharded", ("emc2-2-sharded", 4)),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name in done:
            return done[name]
        world, estimator, layout, resume = RUNS[name]
        out = root / name
        extra = [f"loss.estimator={estimator}", f"loss.state_sharding={layout}",
                 f"train.batch_size={GLOBAL_BATCH // world}"]
        if resume is not None:
            extra.append(f"train.resume={get(resume[0]) / 'checkpoints' / f'ckpt-{resume[1]:08d}.pt'}")
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        cmd = [sys.executable, str(WORKER)]
        if world > 1:
            accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
            cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(world), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541", str(WORKER)]
        r = subprocess.run([*cmd, str(out), *COMMON, *extra], capture_output=True, text=True, timeout=900, env=env,
                           cwd=ROOT)
        assert r.returncode == 0, (name, r.stdout[-2000:], r.stderr[-4000:])
        (out / "stdout.txt").write_text(r.stdout + r.stderr)
        done[name] = out
        return out

    return get


@pytest.mark.parametrize("world", [2, 3, 4])
def test_both_exchange_protocols_read_and_write_what_a_replicated_table_holds(world):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "_exchange_worker.py"), str(world)], capture_output=True,
                       text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0 and f"exchange ok: {world} processes" in r.stdout, r.stderr[-4000:]


def _info(ckpt: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "dual_emc2.cli.checkpoint_info", str(ckpt), "--json"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"ckpt-{step:08d}.pt"


@pytest.mark.parametrize("estimator, world", [("emc2", 2), ("emc2", 4), ("sogclr", 2)])
def test_sharded_state_trains_bit_identically_to_replicated(runs, estimator, world):
    replicated, sharded = runs(f"{estimator}-{world}-replicated"), runs(f"{estimator}-{world}-sharded")
    for step in (2, 4, 6):
        a, b = _info(_ckpt(replicated, step)), _info(_ckpt(sharded, step))
        assert a["hash"] == b["hash"], (step, a["hash"], b["hash"])  # model, optimiser, whole estimator state
        assert a["state"] == {"layout": "replicated"}
        assert b["state"]["layout"] == "sharded" and b["state"]["world_size"] == world
    shards = sorted(p.name for p in (sharded / "checkpoints").glob("ckpt-00000006.shard-*"))
    assert shards == [f"ckpt-00000006.shard-{r:05d}-of-{world:05d}.pt" for r in range(world)]
    state = load_estimator_state(_ckpt(sharded, 6), load_checkpoint(_ckpt(sharded, 6)))
    table = state["chains.candidate_key"] if estimator == "emc2" else state["u.value"]
    visited = (table >= 0) if estimator == "emc2" else torch.isfinite(table)
    assert int(visited.sum()) >= 24  # the runs moved real state (every image's views were anchors)
    own = torch.load(sharded / "rank0.pt")["estimator"]  # a process holds its 1/W of the rows only
    key = "chains.candidate_key" if estimator == "emc2" else "u.value"
    assert own[key].numel() == -(-table.numel() // world)


def test_a_sharded_checkpoint_resumes_bit_identically_in_either_layout(runs):
    """Same number of processes, the layout switched on resume (a free key): the continued run is the uninterrupted
    one, bit for bit."""
    resumed, uninterrupted = runs("emc2-2to2"), runs("emc2-2-sharded")
    a, b = _info(_ckpt(resumed, 6)), _info(_ckpt(uninterrupted, 6))
    assert a["hash"] == b["hash"] and a["state"] == {"layout": "replicated"}
    assert "processes:" not in (resumed / "stdout.txt").read_text()


def _merged_batches(run: Path, world: int) -> list[list[int]]:
    ranks = [torch.load(run / f"rank{r}.pt") for r in range(world)]
    return [sum((rk["batches"][i] for rk in ranks), []) for i in range(len(ranks[0]["batches"]))]


@pytest.mark.parametrize("world", [1, 4])
def test_a_run_checkpointed_at_two_processes_resumes_at_another_size(runs, world):
    elastic = runs(f"emc2-2to{world}")
    reference = runs(f"emc2-{world}-{'replicated' if world == 1 else 'sharded'}")  # uninterrupted at that size
    log = (elastic / "stdout.txt").read_text()
    assert "processes: 2 → " + str(world) in log and f"train.batch_size: 4 → {GLOBAL_BATCH // world}" in log
    # exact: the global batches after the resume are those of the uninterrupted run at the new size
    assert _merged_batches(elastic, world) == _merged_batches(reference, world)[4:]
    got, ref = load_checkpoint(_ckpt(elastic, 6)), load_checkpoint(_ckpt(reference, 6))
    assert got["world_size"] == world and got["step"] == 6
    # to float rounding: steps 1-4 ran on 2 processes, whose gradient all-reduce sums in another order
    for k, v in ref["model"].items():
        assert torch.allclose(got["model"][k], v, atol=1e-4), k
    s_got, s_ref = (load_estimator_state(_ckpt(r, 6), p) for r, p in ((elastic, got), (reference, ref)))
    assert s_got.keys() == s_ref.keys()
    for k, v in s_ref.items():
        if v.is_floating_point():
            assert torch.allclose(s_got[k], v, atol=1e-4, equal_nan=True), k
        else:  # exact: integer states (chain keys) follow sampling decisions, which rounding moves only at a tie
            assert torch.equal(s_got[k], v), k
