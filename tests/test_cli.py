"""Console scripts (setup.cfg ``[options.entry_points]``): each answers ``--help``, the old script paths are thin
wrappers without ``sys.path`` edits, and a bad config key is a named usage error (exit 2, no traceback)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMMANDS = {
    "dual-emc2-train": ("train", "scripts/train.py"),
    "dual-emc2-retrieval": ("retrieval", "eval/retrieval.py"),
    "dual-emc2-linear-probe": ("linear_probe", "eval/linear_probe.py"),
    "dual-emc2-checkpoint-info": ("checkpoint_info", "scripts/checkpoint_info.py"),
    "dual-emc2-make-shards": ("make_shards", "scripts/make_shards.py"),
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _exe(name: str) -> Path:
    exe = BIN / name
    if not exe.exists():
        pytest.fail(f"{exe} is missing: reinstall the package (pip install -e .) to create the console scripts")
    return exe


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_console_script_help(name):
    r = subprocess.run([str(_exe(name)), "--help"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"usage: {name}") and "Traceback" not in r.stderr


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_old_paths_are_thin_wrappers(name):
    module, path = COMMANDS[name]
    text = (ROOT / path).read_text()
    assert "sys.path" not in text and f"from dual_emc2.cli.{module} import main" in text
    assert 'if __name__ == "__main__":\n    raise SystemExit(main())' in text


def test_train_bad_config_key_is_a_named_error():
    r = subprocess.run([str(_exe("dual-emc2-train")), "--config", "configs/fmnist_unimodal.yaml",
                        "optim.learning_rate=0.1"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert r.returncode == 2 and "did you mean 'optim.lr'" in r.stderr and "Traceback" not in r.stderr


def test_configs_by_name_and_retrieval_defaults_come_from_the_package(tmp_path, monkeypatch, capsys):
    from dual_emc2.cli import retrieval, train

    monkeypatch.chdir(tmp_path)  # not the checkout: no configs/ folder here
    assert train.main(["--config", "fmnist_quickstart", "optim.learning_rate=0.1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
    assert train.main(["--config", "fmnist_quickstrt"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'fmnist_quickstart'" in err and "the packaged configs are clip_emoji" in err
    # without --checkpoint and --config, retrieval reads the packaged text_wordnet (clip_emoji for --data emoji),
    # both mode: bimodal, so a one-tower key is refused naming the mode the file set
    for extra in ([], ["--data", "emoji"]):
        assert retrieval.main([*extra, "model.arch=small_cnn"]) == 2
        err = capsys.readouterr().err
        assert "model.arch applies to mode: unimodal only; this is a mode: bimodal run" in err, err


def test_the_package_does_not_depend_on_the_checkout_layout():
    """An installed wheel has no repository around it: no module of the package climbs to the checkout."""
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "dual_emc2").rglob("*.py"))
                 for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if "parents[" in line or re.search(r"\bROOT\b", line)]
    assert offenders == []
