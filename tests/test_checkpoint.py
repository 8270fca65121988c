"""Checkpoints: exact round trip, detection of torn/corrupt files, fallback, pruning, and crash safety."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dual_emc2.errors import CheckpointError
from dual_emc2.train import checkpoint as ck
from dual_emc2.train.checkpoint import (
    CheckpointCorrupt,
    checkpoint_summary,
    find_latest_valid,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    tensor_dict_sha256,
)

ROOT = Path(__file__).resolve().parents[1]


def _payload(step: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 6, generator=g)).square().sum().backward()
    opt.step()
    return {
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "estimator": {"chain_idx": torch.randint(0, 100, (50,), generator=g),
                      "chain_score": torch.randn(50, generator=g).to(torch.bfloat16),
                      "valid": torch.rand(50, generator=g) > 0.5,
                      "beta": torch.tensor(14.28, dtype=torch.float64)},
        "rng": {"torch": torch.random.get_rng_state()},
        "epoch": 3,
        "config": {"optim": {"lr": 1e-3}, "train": {"batch_size": 32}},
    }


def _assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip_is_exact(tmp_path):
    payload = _payload(7)
    path = save_checkpoint(tmp_path, 7, payload)
    assert path == tmp_path / "ckpt-00000007.pt"
    assert (tmp_path / "latest").read_text().strip() == "ckpt-00000007.pt"
    loaded = load_checkpoint(path)
    _assert_same(payload, loaded)
    # header: magic, then sha256 of the torch.save body
    raw = path.read_bytes()
    assert raw[:8] == b"DEMC2CKP"
    assert hashlib.sha256(raw[ck._HEADER.size:]).digest() == raw[ck._HEADER.size - 32:ck._HEADER.size]


def test_rng_states_load_with_weights_only(tmp_path):
    """A trainer's RNG snapshot (python, numpy, torch) loads under the default weights_only=True and restores
    the same random streams; arbitrary objects are still refused unless weights_only=False."""
    import random

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "np_scalar": np.float64(0.5), "np_array": np.arange(4, dtype=np.int32)}
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    path = save_checkpoint(tmp_path, 1, {"rng": state})
    rng = load_checkpoint(path)["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    assert random.random() == expected[0] and np.random.rand(3).tolist() == expected[1]
    assert torch.equal(torch.rand(3), expected[2])
    assert rng["np_scalar"] == 0.5 and rng["np_array"].tolist() == [0, 1, 2, 3]

    path = save_checkpoint(tmp_path, 2, {"obj": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(Exception, match="weights_only|Weights only"):
        load_checkpoint(path)
    assert load_checkpoint(path, weights_only=False)["obj"][0] == {"a": 1}


def _truncate(path: Path, n_bytes: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:n_bytes])


def _flip_bit(path: Path, offset: int, bit: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("keep", [0, 10, ck._HEADER.size, ck._HEADER.size + 100, -1])
def test_truncated_file_detected(tmp_path, keep):
    path = save_checkpoint(tmp_path, 1, _payload(1))
    size = path.stat().st_size
    _truncate(path, keep if keep >= 0 else size - 1)
    with pytest.raises(CheckpointCorrupt) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)
    assert "truncated" in str(e.value) or "not a dual_emc2 checkpoint" in str(e.value)


@pytest.mark.parametrize("where", ["magic", "length", "digest", "body_start", "body_middle", "body_end"])
def test_bit_flip_detected(tmp_path, where):
    path = save_checkpoint(tmp_path, 1, _payload(1))
    size, h = path.stat().st_size, ck._HEADER.size
    offset = {"magic": 2, "length": 13, "digest": h - 5, "body_start": h + 1, "body_middle": (h + size) // 2,
              "body_end": size - 1}[where]
    _flip_bit(path, offset)
    with pytest.raises(CheckpointCorrupt, match=str(path.name)):
        load_checkpoint(path)
    with pytest.raises(CheckpointCorrupt):
        ck.verify_checkpoint(path)


def test_trailing_garbage_and_foreign_files_rejected(tmp_path):
    path = save_checkpoint(tmp_path, 1, _payload(1))
    with open(path, "ab") as f:
        f.write(b"xx")
    with pytest.raises(CheckpointCorrupt, match="trailing bytes"):
        load_checkpoint(path)
    plain = tmp_path / "ckpt-00000002.pt"
    torch.save({"step": 2}, plain)  # a plain torch.save file has no verifiable header
    with pytest.raises(CheckpointCorrupt, match="not a dual_emc2 checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(FileNotFoundError, match="ckpt-00000009.pt"):
        load_checkpoint(tmp_path / "ckpt-00000009.pt")


def test_find_latest_valid_falls_back(tmp_path):
    assert find_latest_valid(tmp_path / "missing") is None
    assert find_latest_valid(tmp_path) is None
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, _payload(step, seed=step), keep_last=5)
    assert find_latest_valid(tmp_path) == tmp_path / "ckpt-00000030.pt"

    _truncate(tmp_path / "ckpt-00000030.pt", 1000)
    with pytest.warns(UserWarning, match="ckpt-00000030.pt"):
        best = find_latest_valid(tmp_path)
    assert best == tmp_path / "ckpt-00000020.pt"
    _assert_same(load_checkpoint(best)["model"], _payload(20, seed=20)["model"])

    _flip_bit(tmp_path / "ckpt-00000020.pt", 500)
    with pytest.warns(UserWarning) as record:
        assert find_latest_valid(tmp_path) == tmp_path / "ckpt-00000010.pt"
    messages = [str(w.message) for w in record]
    assert any("ckpt-00000030.pt: truncated" in m for m in messages)
    assert any("ckpt-00000020.pt: sha256 mismatch" in m for m in messages)
    _truncate(tmp_path / "ckpt-00000010.pt", 0)
    with pytest.warns(UserWarning):
        assert find_latest_valid(tmp_path) is None


def test_keep_last_prunes_older(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step * 100, {"step": step * 100, "w": torch.full((3,), float(step))}, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == ["ckpt-00000400.pt", "ckpt-00000500.pt"]
    assert (tmp_path / "latest").read_text().strip() == "ckpt-00000500.pt"
    assert torch.equal(load_checkpoint(tmp_path / "ckpt-00000400.pt")["w"], torch.full((3,), 4.0))
    save_checkpoint(tmp_path, 600, {"step": 600}, keep_last=1)
    assert [p.name for p in tmp_path.glob("ckpt-*.pt")] == ["ckpt-00000600.pt"]


def test_resume_from_earlier_step_prefers_most_recent_save(tmp_path):
    for step in (100, 200, 300):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=5)
    past = time.time() - 60
    for step in (100, 200, 300):  # written a minute ago by the first run
        os.utime(tmp_path / f"ckpt-{step:08d}.pt", (past, past))
    with pytest.warns(UserWarning, match="later steps than 150"):
        save_checkpoint(tmp_path, 150, {"step": 150}, keep_last=2)  # second run, resumed from step 100
    # the abandoned run's 200 and 300 are kept; below 150 only keep_last - 1 older ones survive
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == [
        "ckpt-00000100.pt", "ckpt-00000150.pt", "ckpt-00000200.pt", "ckpt-00000300.pt"]
    assert find_latest_valid(tmp_path) == tmp_path / "ckpt-00000150.pt"
    _truncate(tmp_path / "ckpt-00000150.pt", 20)
    with pytest.warns(UserWarning, match="ckpt-00000150.pt"):
        assert find_latest_valid(tmp_path) == tmp_path / "ckpt-00000100.pt"


def test_crash_in_rename_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    good = _payload(1)
    save_checkpoint(tmp_path, 1, good)
    real_replace = os.replace

    def crash(src, dst):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, 2, _payload(2, seed=2))
    monkeypatch.setattr(os, "replace", real_replace)
    assert [p.name for p in tmp_path.glob("ckpt-*.pt")] == ["ckpt-00000001.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001.pt", "latest"]  # temp file removed
    assert (tmp_path / "latest").read_text().strip() == "ckpt-00000001.pt"
    latest = find_latest_valid(tmp_path)
    assert latest == tmp_path / "ckpt-00000001.pt"
    _assert_same(load_checkpoint(latest), good)


def test_crash_before_pointer_update_still_finds_newest(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"step": 1})
    past = time.time() - 60
    os.utime(tmp_path / "latest", (past, past))  # the previous save happened a minute ago
    real_replace = os.replace

    def crash_on_pointer(src, dst):
        if Path(dst).name == "latest":
            raise OSError("simulated crash while updating latest")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_pointer)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, 2, {"step": 2})
    monkeypatch.setattr(os, "replace", real_replace)
    assert (tmp_path / "latest").read_text().strip() == "ckpt-00000001.pt"
    assert find_latest_valid(tmp_path) == tmp_path / "ckpt-00000002.pt"
    assert load_checkpoint(find_latest_valid(tmp_path))["step"] == 2


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_process_killed_mid_write(tmp_path):
    """SIGKILL after the new bytes are written but before the rename: no ckpt-*.pt, the old one still loads."""
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from dual_emc2.train.checkpoint import save_checkpoint
        save_checkpoint({str(tmp_path)!r}, 1, {{"step": 1, "w": torch.arange(10.0)}})
        def die(fd):
            os.kill(os.getpid(), signal.SIGKILL)
        os.fsync = die
        save_checkpoint({str(tmp_path)!r}, 2, {{"step": 2, "w": torch.zeros(200_000)}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert [p.name for p in tmp_path.glob("ckpt-*.pt")] == ["ckpt-00000001.pt"]
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 800_000  # the torn write is there, hidden
    latest = find_latest_valid(tmp_path)
    assert latest == tmp_path / "ckpt-00000001.pt"
    assert torch.equal(load_checkpoint(latest)["w"], torch.arange(10.0))
    save_checkpoint(tmp_path, 3, {"step": 3})  # the next save clears the stale temporary file
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_resolve_resume(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("latest", tmp_path) is None  # nothing yet: fresh start
    save_checkpoint(tmp_path, 5, {"step": 5})
    save_checkpoint(tmp_path, 9, {"step": 9})
    assert resolve_resume("latest", tmp_path) == tmp_path / "ckpt-00000009.pt"
    explicit = tmp_path / "ckpt-00000005.pt"
    assert resolve_resume(str(explicit), tmp_path) == explicit
    assert resolve_resume("ckpt-00000005.pt", tmp_path) == explicit  # relative to the run folder
    with pytest.raises(CheckpointError, match="ckpt-00000077.pt does not exist"):
        resolve_resume("ckpt-00000077.pt", tmp_path)
    with pytest.raises(ValueError, match="train.resume"):
        resolve_resume("", tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, {})
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, {}, keep_last=0)
    with pytest.raises(TypeError, match="payload"):
        save_checkpoint(tmp_path, 1, [1, 2])


def test_tensor_hash_matches_documented_format_and_detects_changes():
    t = torch.tensor([1.0, 2.0])
    w = torch.tensor([[3, 4]], dtype=torch.int64)
    h = hashlib.sha256()
    for key, x in (("a", w), ("b", t)):  # sorted keys; key, dtype, shape, then raw little-endian bytes
        h.update(f"{key}\0{x.dtype}\0{tuple(x.shape)}\0".encode())
        h.update(x.numpy().tobytes())
    assert tensor_dict_sha256({"b": t, "a": w}) == h.hexdigest()
    assert tensor_dict_sha256({"a": w, "b": t}) == h.hexdigest()  # insertion order does not matter
    changed = t.clone()
    changed.view(torch.int32)[0] ^= 1  # one bit of one element
    assert tensor_dict_sha256({"b": changed, "a": w}) != h.hexdigest()
    assert tensor_dict_sha256({"c": t, "a": w}) != h.hexdigest()  # renamed key
    assert tensor_dict_sha256({"b": t.to(torch.float64), "a": w}) != h.hexdigest()  # same values, other dtype
    assert tensor_dict_sha256({"b": t.reshape(2, 1), "a": w}) != h.hexdigest()  # same bytes, other shape
    nc = torch.arange(6.0).reshape(2, 3).t()  # non-contiguous: hashed as its logical values
    assert tensor_dict_sha256({"x": nc}) == tensor_dict_sha256({"x": nc.contiguous()})


def test_checkpoint_summary(tmp_path):
    payload = _payload(42)
    path = save_checkpoint(tmp_path, 42, payload)
    s = checkpoint_summary(load_checkpoint(path))
    assert s["step"] == 42
    assert set(s["tensors"]) == {"model", "optimizer", "estimator", "rng"}
    model = payload["model"]
    m = s["tensors"]["model"]
    assert m["num_tensors"] == len(model)
    assert m["numel"] == sum(v.numel() for v in model.values())
    assert m["nbytes"] == sum(v.numel() * v.element_size() for v in model.values())
    assert m["shapes"]["0.weight"] == {"shape": [5, 6], "dtype": "float32"}
    assert s["tensors"]["estimator"]["shapes"]["chain_score"]["dtype"] == "bfloat16"
    # Adam moments are hashed too: state.<param>.exp_avg ...
    assert s["tensors"]["optimizer"]["num_tensors"] == 3 * len(list(payload["optimizer"]["state"]))
    assert m["sha256"] == checkpoint_summary(payload)["tensors"]["model"]["sha256"]  # survives the file
    other = _payload(42, seed=1)
    assert checkpoint_summary(other)["tensors"]["model"]["sha256"] != m["sha256"]
    assert np.isclose(float(load_checkpoint(path)["estimator"]["beta"]), 14.28)
