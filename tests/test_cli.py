"""Console scripts (setup.cfg ``[options.entry_points]``): each answers ``--help``, the old script paths are thin
wrappers without ``sys.path`` edits, and a bad config key is a named usage error (exit 2, no traceback)."""
import os
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
