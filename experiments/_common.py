"""Helpers shared by the experiments (stationarity.py, small_batch.py, bench_step.py): the machine record, result
paths, JSON output, aligned text tables, and step timing (CUDA events on a GPU, ``perf_counter`` on a CPU)."""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """What a result was measured on: CPU model and cores, torch threads, GPU name (when ``device`` is CUDA) and
    versions of Python, torch and CUDA."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "device": str(device), "gpu": None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line for a table header: ``GPU name`` or ``CPU model (n cores, t threads)``, and the torch version."""
    where = info["gpu"] or f"{info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads)"
    return f"{where}, torch {info['torch']}"


def resolve_device(name: str) -> torch.device:
    """``--device`` value to a device; ``auto`` is CUDA when available.  A CUDA request without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA GPU is visible to torch on this machine")
    return device


def default_out(name: str, smoke: bool) -> Path:
    """``experiments/results/<name>.json`` (``<name>_smoke.json`` for smoke runs: CI never overwrites real results)."""
    return RESULTS / f"{name}{'_smoke' if smoke else ''}.json"


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON (NaN/inf as null), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(obj), indent=1) + "\n")
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], floatfmt: str = ".4g") -> str:
    """A Markdown pipe table (readable as plain text too); floats formatted with ``floatfmt``, None as ``-``."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else format(v, floatfmt)
        return str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


class StepTimer:
    """Milliseconds of one call: CUDA events around it on a GPU (then a synchronise), ``perf_counter`` on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            self._start.record()
            fn()
            self._end.record()
            torch.cuda.synchronize()
            return float(self._start.elapsed_time(self._end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def geomean(values: Sequence[float]) -> float:
    """Geometric mean of positive values (the natural average of quantities compared on a log scale)."""
    vals = [v for v in values if v is not None]
    if not vals or min(vals) <= 0:
        return float("nan")
    return float(math.exp(sum(math.log(v) for v in vals) / len(vals)))


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG (Agg backend, no display needed) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
