"""Small helpers shared by the command-line entry points: the checkout's root folder and the ``error: ...`` exit."""
from __future__ import annotations

import sys
from pathlib import Path

# The repository checkout (the package is installed editable: ``pip install -e .``): default configs live in
# ROOT/configs and default eval outputs in ROOT/experiments/results, as for the scripts these commands replace.
ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"


def fail(err: BaseException | str) -> int:
    """Print ``error: <err>`` on stderr and return the usage-error exit code 2."""
    print(f"error: {err}", file=sys.stderr)
    return 2
