"""Every tool that takes a checkpoint takes a file, a run folder, a checkpoints folder or ``checkpoints/latest``
(dual_emc2.train.checkpoint.resolve_checkpoint, the trainer's reading of train.resume too); a checkpoint for the other
tool is named as such; tools write under the user's run, never into experiments/results; errors are one ``error:``
line with the exit code of dual_emc2.errors."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dual_emc2.cli import checkpoint_info, linear_probe, retrieval
from dual_emc2.cli._io import fail, run_folder_of
from dual_emc2.errors import CheckpointError, DataError, RunStopped, UsageError
from dual_emc2.train.checkpoint import (
    CheckpointNotFound,
    find_latest_valid,
    resolve_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from dual_emc2.train.config import config_to_dict
from dual_emc2.train.schema import Config

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "experiments") not in sys.path:
    sys.path.insert(0, str(ROOT / "experiments"))
import small_batch  # noqa: E402


def _run_folder(tmp_path: Path, mode: str = "unimodal", steps: tuple[int, ...] = (5, 10)) -> Path:
    run = tmp_path / f"run_{mode}"
    for s in steps:
        save_checkpoint(run / "checkpoints", s, {"step": s, "config": config_to_dict(Config(mode=mode)),
                                                 "model": {"w": torch.full((2,), float(s))}})
    return run


def test_checkpoint_argument_forms_resolve_to_the_newest_intact_checkpoint(tmp_path: Path):
    run = _run_folder(tmp_path)
    ck = run / "checkpoints"
    newest = ck / "ckpt-00000010.pt"
    assert (ck / "latest").read_text().strip() == newest.name  # the pointer file the trainer writes
    for arg in (run, ck, ck / "latest", newest, str(run) + "/"):
        assert resolve_checkpoint(arg) == newest, arg
    assert resolve_checkpoint(ck / "ckpt-00000005.pt") == ck / "ckpt-00000005.pt"
    link = ck / "link"
    link.symlink_to(ck / "ckpt-00000005.pt")
    assert resolve_checkpoint(link) == link
    (ck / "latest").unlink()
    (ck / "latest").symlink_to("ckpt-00000005.pt")  # a symlink named latest
    assert resolve_checkpoint(ck / "latest") == (ck / "ckpt-00000005.pt").resolve()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the trainer's scan reads the symlink too (not as a text file)
        assert find_latest_valid(ck) == ck / "ckpt-00000005.pt"
    (ck / "latest").unlink()  # a folder without the pointer: `checkpoints/latest` still means the newest
    assert resolve_checkpoint(ck / "latest") == newest
    assert run_folder_of(newest) == run


def test_latest_pointing_at_a_damaged_checkpoint_falls_back_with_a_warning(tmp_path: Path):
    run = _run_folder(tmp_path)
    newest = run / "checkpoints" / "ckpt-00000010.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="ckpt-00000010.pt"):
        assert resolve_checkpoint(run / "checkpoints" / "latest") == run / "checkpoints" / "ckpt-00000005.pt"
    assert newest.read_bytes() == data[: len(data) // 2]  # nothing is repaired or removed
    (run / "checkpoints" / "latest").write_text("not a checkpoint name\n")
    with pytest.warns(UserWarning):
        assert resolve_checkpoint(run / "checkpoints" / "latest") == run / "checkpoints" / "ckpt-00000005.pt"
    copy = tmp_path / "elsewhere" / "latest"  # a checkpoint file that is called latest is itself
    copy.parent.mkdir()
    copy.write_bytes((run / "checkpoints" / "ckpt-00000005.pt").read_bytes())
    assert resolve_checkpoint(copy) == copy


def test_no_checkpoint_is_a_checkpoint_error_naming_the_folder_and_what_it_holds(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFound, match=r"no intact checkpoint .* in .*empty; it holds nothing") as e:
        resolve_checkpoint(tmp_path / "empty")
    assert e.value.exit_code == 4 and isinstance(e.value, (CheckpointError, FileNotFoundError))
    run = _run_folder(tmp_path, steps=(3,))
    (run / "checkpoints" / "ckpt-00000003.pt").write_bytes(b"DEMC2CKP torn")
    with pytest.warns(UserWarning), pytest.raises(CheckpointNotFound, match=r"1 checkpoint file\(s\), none intact"):
        resolve_checkpoint(run)
    with pytest.raises(CheckpointNotFound, match=r"ckpt-9\.pt does not exist; .*checkpoints holds"):
        resolve_checkpoint(run / "checkpoints" / "ckpt-9.pt")


def test_the_trainer_and_the_tools_read_a_checkpoint_argument_alike(tmp_path: Path):
    run = _run_folder(tmp_path)
    ck = run / "checkpoints"
    newest = ck / "ckpt-00000010.pt"
    # train.resume (resolve_resume, given the run's checkpoints folder) is resolve_checkpoint with run_dir
    for arg in ("latest", str(run), str(ck), str(ck / "latest"), str(newest)):
        assert resolve_resume(arg, ck) == newest == resolve_checkpoint(arg, run_dir=run), arg
    assert resolve_checkpoint("ckpt-00000005.pt", run_dir=run) == ck / "ckpt-00000005.pt"  # relative: in the run
    assert resolve_resume("ckpt-00000005.pt", ck) == ck / "ckpt-00000005.pt"
    fresh = tmp_path / "fresh"
    assert resolve_resume("latest", fresh / "checkpoints") is None  # no checkpoint yet: a fresh start
    assert resolve_checkpoint("latest", run_dir=fresh, missing_ok=True) is None
    with pytest.raises(CheckpointNotFound, match=r"latest: no intact checkpoint .*fresh; it holds nothing") as e:
        resolve_checkpoint("latest", run_dir=fresh)
    assert e.value.exit_code == 4
    with pytest.raises(CheckpointNotFound, match=r"train\.resume: checkpoint ckpt-00000077\.pt does not exist \(nor "
                                                 r".*\); .*checkpoints holds 2 checkpoint file\(s\) \(ckpt-00000005"):
        resolve_resume("ckpt-00000077.pt", ck)
    with pytest.raises(CheckpointError, match="train.resume must be"):
        resolve_resume(" ", ck)
    with pytest.raises(CheckpointNotFound, match="empty checkpoint argument"):
        resolve_checkpoint("")


def test_one_checkpoint_name_pattern_and_one_resolver():
    import dual_emc2.cli._io as cli_io

    assert not hasattr(cli_io, "resolve_checkpoint_arg") and not hasattr(cli_io, "ROOT")
    package = ROOT / "dual_emc2"
    patterns = [f"{p.relative_to(ROOT)}" for p in package.rglob("*.py") if r"ckpt-\d" in p.read_text(encoding="utf-8")]
    assert patterns == ["dual_emc2/train/checkpoint.py"]


def test_fail_prints_one_line_and_returns_the_errors_exit_code(capsys):
    assert fail(UsageError("u")) == 2 and fail(DataError("d")) == 3 and fail(CheckpointError("c")) == 4
    assert fail(RunStopped("r")) == 5 and fail("plain message") == 2 and fail(FileNotFoundError("f")) == 2
    assert fail(DataError("d"), 7) == 7
    assert fail(KeyError("no sample with index 3")) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: u" and err[-1] == "error: no sample with index 3" and len(err) == 8


def test_checkpoint_info_reads_checkpoints_latest(tmp_path: Path, capsys):
    run = _run_folder(tmp_path)
    assert checkpoint_info.main([str(run / "checkpoints" / "latest")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"checkpoint  {run / 'checkpoints' / 'ckpt-00000010.pt'}") and "step 10" in out
    assert checkpoint_info.main([str(tmp_path / "missing")]) == 4
    assert "does not exist" in capsys.readouterr().err


def test_two_tower_checkpoint_given_to_the_linear_probe_names_the_retrieval_tool(tmp_path: Path, capsys):
    run = _run_folder(tmp_path, mode="bimodal")
    assert linear_probe.main(["--checkpoint", str(run), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "two-tower (mode: bimodal)" in err and "dual-emc2-retrieval --checkpoint" in err


def test_one_tower_checkpoint_given_to_retrieval_names_the_linear_probe(tmp_path: Path, capsys):
    run = _run_folder(tmp_path, mode="unimodal")
    assert retrieval.main(["--checkpoint", str(run / "checkpoints" / "latest"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "one-tower (mode: unimodal)" in err
    assert "dual-emc2-linear-probe --checkpoint" in err
    assert retrieval.main(["--checkpoint", str(tmp_path / "nope")]) == 4
    assert list(tmp_path.glob("**/retrieval_*.json")) == []


def test_retrieval_writes_into_the_run_folder_or_nowhere_unless_told(tmp_path: Path):
    def args(**kw: object) -> argparse.Namespace:
        return argparse.Namespace(**{"out": None, "split": "eval", "data": None, **kw})

    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-00000375.pt"
    assert retrieval.default_out(args(), ckpt) == tmp_path / "run" / "retrieval_eval_ckpt-00000375.json"
    assert retrieval.default_out(args(data="x/my pairs.jsonl"), ckpt).name == \
        "retrieval_eval_my-pairs_ckpt-00000375.json"
    assert retrieval.default_out(args(), None) is None  # zero-shot: printed only
    assert retrieval.default_out(args(out="r.json"), None) == Path("r.json")


def test_small_batch_puts_its_runs_beside_out_never_in_the_results(tmp_path: Path):
    assert small_batch.work_folder(None, str(tmp_path / "b32.json"), False) == tmp_path / "b32_runs"
    assert small_batch.work_folder(None, str(ROOT / "experiments" / "results" / "sb.json"), False) == \
        ROOT / "runs" / "sb_runs"
    assert small_batch.work_folder(None, None, True) == ROOT / "runs" / "small_batch_smoke"
    assert small_batch.work_folder(str(tmp_path / "w"), str(tmp_path / "x.json"), False) == tmp_path / "w"
