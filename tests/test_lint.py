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
