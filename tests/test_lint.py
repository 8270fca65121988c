"""The code base passes the project's linter (ruff, configured in pyproject.toml; installed by the test extra)."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    ruff = Path(sys.executable).parent / "ruff"
    exe = str(ruff) if ruff.exists() else shutil.which("ruff")
    assert exe, "ruff is not installed: pip install -e '.[test]' (or make setup)"
    r = subprocess.run([exe, "check", "--output-format", "concise", "."], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def _imported_tops(path: Path) -> set[str]:
    import ast

    tops = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            tops.add(node.module.split(".")[0])
    return tops


def test_imports_point_one_way():
    """Library ← user tools ← experiments / examples: the library never imports the tools, protocols or examples, and
    the user tools never import the protocols; nothing edits sys.path to find the library."""
    layers = {"dual_emc2": {"eval", "experiments", "examples", "scripts", "tests"},
              "eval": {"experiments", "examples", "tests"}, "scripts": {"experiments", "examples", "tests"},
              "examples": {"experiments", "eval", "tests"}, "experiments": {"examples", "tests"}}
    bad = []
    for layer, forbidden in layers.items():
        for path in sorted((ROOT / layer).rglob("*.py")):
            hit = _imported_tops(path) & forbidden
            if hit:
                bad.append(f"{path.relative_to(ROOT)} imports {sorted(hit)}")
            if "sys.path.insert" in path.read_text(encoding="utf-8"):
                bad.append(f"{path.relative_to(ROOT)} edits sys.path")
    assert not bad, "\n".join(bad)


# The layers of the library, bottom up: each module may import only the modules its entry allows (the longest entry
# that prefixes its name applies; a module may always import itself and its own submodules).  The loss package is
# closed (torch and itself only); metrics take plain arrays; data and towers take plain arguments; train is the only
# reader of the config; the command-line tools sit on top.
LOSS_BASE = ("dual_emc2.loss.distributed", "dual_emc2.loss.errors", "dual_emc2.loss.state_views",
             "dual_emc2.loss.exact")
LAYERS: dict[str, tuple[str, ...]] = {
    "dual_emc2": (),
    "dual_emc2.errors": (),
    "dual_emc2.text_files": ("dual_emc2.errors",),
    "dual_emc2.loss": ("dual_emc2.loss",),  # the package's lazy exports
    "dual_emc2.loss.distributed": (),
    "dual_emc2.loss.errors": (),
    "dual_emc2.loss.exact": (),
    "dual_emc2.loss.state_views": (),
    "dual_emc2.loss.state": ("dual_emc2.loss.distributed", "dual_emc2.loss.state"),
    "dual_emc2.loss.estimators": (*LOSS_BASE, "dual_emc2.loss.state", "dual_emc2.loss.estimators.base"),
    "dual_emc2.loss.estimators.emc2": (*LOSS_BASE, "dual_emc2.loss.state", "dual_emc2.loss.estimators.base",
                                       "dual_emc2.loss.estimators.emc2."),
    "dual_emc2.loss.estimators.emc2.": (*LOSS_BASE, "dual_emc2.loss.estimators.emc2."),  # its parts, not the estimator
    "dual_emc2.loss.batches": (*LOSS_BASE, "dual_emc2.loss.estimators.base"),
    "dual_emc2.loss.registry": (*LOSS_BASE, "dual_emc2.loss.state.layout", "dual_emc2.loss.estimators"),
    "dual_emc2.loss.global_loss": ("dual_emc2.loss.",),
    "dual_emc2.metrics": ("dual_emc2.errors", "dual_emc2.metrics"),
    "dual_emc2.data": ("dual_emc2.errors", "dual_emc2.text_files", "dual_emc2.loss", "dual_emc2.metrics",
                       "dual_emc2.data"),
    "dual_emc2.towers": ("dual_emc2.errors", "dual_emc2.data", "dual_emc2.towers"),
    "dual_emc2.integrations": ("dual_emc2.loss",),
    "dual_emc2.train": ("dual_emc2.errors", "dual_emc2.text_files", "dual_emc2.loss", "dual_emc2.metrics",
                        "dual_emc2.data", "dual_emc2.towers", "dual_emc2.train"),
    "dual_emc2.train.schema": ("dual_emc2.loss.state.layout", "dual_emc2.towers.names", "dual_emc2.train.schedules"),
    "dual_emc2.cli": ("dual_emc2.errors", "dual_emc2.data", "dual_emc2.metrics", "dual_emc2.towers", "dual_emc2.train",
                      "dual_emc2.cli"),
}


def _module_imports(path: Path) -> tuple[str, set[str]]:
    import ast

    parts = path.relative_to(ROOT).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return name, {m for m in found if m == "dual_emc2" or m.startswith("dual_emc2.")}


def _covers(prefix: str, module: str) -> bool:
    """``prefix`` names ``module``: itself or one of its submodules; a prefix ending in "." names submodules only."""
    if prefix.endswith("."):
        return module.startswith(prefix)
    return module == prefix or module.startswith(prefix + ".")


def _entry(module: str) -> str:
    """The layer-table entry of ``module``: the longest one that names it."""
    keys = [k for k in LAYERS if _covers(k, module)]
    if not keys:
        raise AssertionError(f"{module}: not in the layer table of tests/test_lint.py; add it")
    return max(keys, key=len)


def test_every_library_module_imports_only_the_layers_below_it():
    bad = []
    for path in sorted((ROOT / "dual_emc2").rglob("*.py")):
        name, imports = _module_imports(path)
        allowed = LAYERS[_entry(name)]
        for m in sorted(imports):
            if m.startswith(name + "."):  # its own submodules
                continue
            if not any(_covers(a, m) for a in allowed):
                bad.append(f"{name} imports {m} (allowed: {', '.join(allowed) or 'nothing of dual_emc2'})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_the_layer_table_catches_an_upward_import():
    assert _entry("dual_emc2.loss.estimators.emc2.pool") == "dual_emc2.loss.estimators.emc2."
    assert _entry("dual_emc2.loss.estimators.emc2") == "dual_emc2.loss.estimators.emc2"
    assert _entry("dual_emc2.data.pairs") == "dual_emc2.data"
    assert not any(_covers(a, "dual_emc2.train.config") for a in LAYERS["dual_emc2.data"])
    assert not any(_covers(a, "dual_emc2.errors") for a in LAYERS["dual_emc2.loss.registry"])
    assert any(_covers(a, "dual_emc2.loss.state.keyed") for a in LAYERS["dual_emc2.loss.estimators"])
