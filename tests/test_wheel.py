"""The built wheel works on its own: installed into a fresh virtual environment and run from a folder that is not the
checkout, its console scripts find the configs packaged in ``dual_emc2/configs`` (by name, ``base:`` included) and
the retrieval tool its default config.

No network: the wheel is built with the project venv's setuptools (``--no-build-isolation``) and installed with
``--no-deps --no-index``; torch and the other dependencies come from the project venv's site-packages, which a ``.pth``
file in the fresh venv puts on ``sys.path`` (written after the install, so pip never sees the project's own
installation).  The editable install's ``.pth`` in that folder is not processed (a folder named in a ``.pth`` file is
not a site dir), so ``dual_emc2`` is imported from the wheel: the test checks ``dual_emc2.__file__``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what setuptools reads to build the wheel (setup.cfg names README.md as the long description)
BUILD_FILES = ("setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in")

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"{r.args}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """(the fresh venv, a working folder outside the checkout, the environment to run in)."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    # Build from a copy of the files the build reads: an in-tree build would write build/ and *.egg-info into the
    # checkout (where other test runs may build at the same time).
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_FILES:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "dual_emc2", src / "dual_emc2", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp / "dist"
    _ok(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src],
             tmp, env))
    (wheel,) = dist.glob("dual_emc2-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packaged = sorted(n for n in names if n.startswith("dual_emc2/configs/"))
    assert packaged == sorted(f"dual_emc2/configs/{p.name}" for p in (ROOT / "dual_emc2" / "configs").glob("*.yaml"))
    assert "dual_emc2/configs/fmnist_quickstart.yaml" in packaged and "dual_emc2/data/imagenet100_classes.txt" in names

    venv = tmp / "venv"
    _ok(_run([sys.executable, "-m", "venv", venv], tmp, env))
    python = venv / "bin" / "python"
    _ok(_run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], tmp, env))
    site = Path(_ok(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp,
                         env)).stdout.strip())
    project_site = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "zz_project_dependencies.pth").write_text("".join(f"{p}\n" for p in project_site))
    work = tmp / "elsewhere"  # neither the checkout nor a folder holding configs/
    work.mkdir()
    return venv, work, env


def test_the_wheel_imports_from_the_fresh_venv_and_reads_its_packaged_configs(wheel_venv):
    venv, work, env = wheel_venv
    probe = (
        "import json, torch, dual_emc2\n"
        "from dual_emc2.train.config import config_to_dict, find_config, load_config, packaged_configs\n"
        "print(json.dumps({'file': dual_emc2.__file__, 'found': str(find_config('fmnist_quickstart')),\n"
        "                  'names': packaged_configs(), 'torch': torch.__version__,\n"
        "                  'cfg': config_to_dict(load_config('fmnist_quickstart'))}))\n"
    )
    r = _ok(_run([venv / "bin" / "python", "-c", probe], work, env))
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).is_relative_to(venv), got["file"]  # the wheel, not the editable checkout
    assert Path(got["found"]).is_relative_to(venv) and got["found"].endswith("dual_emc2/configs/fmnist_quickstart.yaml")
    assert got["names"] == sorted(p.stem for p in (ROOT / "dual_emc2" / "configs").glob("*.yaml"))
    from dual_emc2.train.config import config_to_dict, load_config

    # the packaged fmnist_quickstart with its packaged base (fmnist_unimodal.yaml) is the checkout's config
    checkout = config_to_dict(load_config(ROOT / "configs" / "fmnist_quickstart.yaml"))
    assert got["cfg"] == json.loads(json.dumps(checkout))


def test_the_installed_console_scripts_use_the_packaged_configs(wheel_venv):
    venv, work, env = wheel_venv
    bin_ = venv / "bin"
    r = _ok(_run([bin_ / "dual-emc2-retrieval", "--help"], work, env))
    assert r.stdout.startswith("usage: dual-emc2-retrieval") and "packaged text_wordnet" in r.stdout
    # no --config, no --checkpoint: the default config is the packaged text_wordnet (mode: bimodal); a one-tower key
    # is refused naming the mode the file set, before any tower or data is built
    r = _run([bin_ / "dual-emc2-retrieval", "model.arch=small_cnn"], work, env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "model.arch applies to mode: unimodal only; this is a mode: bimodal run" in r.stderr
    # a config by name (with its base) from the package; a bad key is named against the parsed file
    r = _run([bin_ / "dual-emc2-train", "--config", "fmnist_quickstart", "optim.learning_rate=0.1"], work, env)
    assert r.returncode == 2 and "did you mean 'optim.lr'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _run([bin_ / "dual-emc2-train", "--config", "configs/fmnist_quickstart.yaml", "towers.proj_dim=8"], work, env)
    assert r.returncode == 2 and "this is a mode: unimodal run" in r.stderr, r.stderr[-3000:]
    r = _run([bin_ / "dual-emc2-train", "--config", "fmnist_quickstrt"], work, env)
    assert r.returncode == 2 and "did you mean 'fmnist_quickstart'" in r.stderr
    assert "the packaged configs are clip_emoji" in r.stderr
    r = _run([bin_ / "dual-emc2-checkpoint-info", "no_such_run"], work, env)
    assert r.returncode == 4 and "checkpoint no_such_run does not exist" in r.stderr, r.stderr[-3000:]
    assert not (work / "runs").exists() and list(work.iterdir()) == []  # nothing was written
