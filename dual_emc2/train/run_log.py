"""Metric logging of a run: a long-format ``metrics.csv`` (step, group, name, value), TensorBoard, and PNG curves.

Only the main process should create a :class:`RunLogger`.  On resume from step ``s`` the CSV rows and TensorBoard
events after ``s`` are dropped first, so a resumed run's curves continue without duplicates or a jump.
"""
from __future__ import annotations

import csv
import math
import os
import re
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CSV_NAME", "RunLogger", "plot_curves", "read_metrics"]

CSV_NAME = "metrics.csv"
_FIELDS = ("step", "group", "name", "value")


def _read_rows(csv_path: Path) -> list[tuple[int, str, str, float]]:
    """All rows of a metrics CSV; malformed rows raise ValueError naming the file and line."""
    rows = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return rows
        if tuple(header) != _FIELDS:
            raise ValueError(f"{csv_path}: expected header {','.join(_FIELDS)}, got {','.join(header)}")
        for row in reader:
            if not row:
                continue
            try:
                step, group, name, value = row
                rows.append((int(step), group, name, float(value)))
            except ValueError as exc:
                raise ValueError(f"{csv_path}:{reader.line_num}: bad metrics row {row!r} ({exc})") from None
    return rows


class RunLogger:
    """Append scalar metrics to ``directory/metrics.csv`` (flushed every call) and to TensorBoard (tag group/name).

    ``start_step > 0`` resumes: rows with step > start_step are removed from the CSV and TensorBoard events from
    step start_step + 1 on are purged.  ``start_step == 0`` starts a fresh CSV.

    Args:
        directory: the run folder (created if missing); the CSV is ``metrics.csv``, TensorBoard events go to ``tb/``.
        tensorboard: also write TensorBoard events.
        start_step: the step a resumed run continues from (0: a fresh run).

    Example::

        with RunLogger("runs/demo", start_step=0) as log:
            log.log(10, {"loss": 1.25, "lr": 3e-4})
            log.log(10, {"knn_top1": 0.81}, group="eval")
        read_metrics("runs/demo/metrics.csv")[("train", "loss")]    # (array([10]), array([1.25]))
    """

    def __init__(self, directory: str | os.PathLike[str], *, tensorboard: bool = True, start_step: int = 0) -> None:
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"RunLogger: start_step must be a non-negative int, got {start_step!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.directory / CSV_NAME
        kept: list[tuple[int, str, str, float]] = []
        if self.csv_path.exists():
            if start_step > 0:
                kept = [r for r in _read_rows(self.csv_path) if r[0] <= start_step]
            else:
                warnings.warn(f"{self.csv_path} exists and start_step == 0: starting a fresh metrics file",
                              stacklevel=2)
        tmp = self.csv_path.with_name(f".{CSV_NAME}.tmp{os.getpid()}")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(_FIELDS)
            writer.writerows((s, g, n, repr(v)) for s, g, n, v in kept)
        os.replace(tmp, self.csv_path)
        self._file = open(self.csv_path, "a", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # pragma: no cover - tensorboard is a declared dependency
                raise ImportError("RunLogger(tensorboard=True) needs the 'tensorboard' package") from exc
            _wait_for_a_later_event_file_second(self.directory / "tb")
            self._tb = SummaryWriter(log_dir=str(self.directory / "tb"),
                                     purge_step=start_step + 1 if start_step > 0 else None)

    def log(self, step: int, values: Mapping[str, Any], group: str = "train") -> None:
        """Record ``values`` (name -> number, e.g. python floats or 0-dim tensors) at ``step`` under ``group``."""
        if self._file.closed:
            raise RuntimeError(f"RunLogger for {self.directory} is closed")
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"RunLogger.log: step must be an int, got {type(step).__name__}")
        if not isinstance(group, str) or not group:
            raise ValueError(f"RunLogger.log: group must be a non-empty string, got {group!r}")
        rows = []
        for name, value in values.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"RunLogger.log: metric {group}/{name} must be a number, got "
                                f"{type(value).__name__}") from None
            rows.append((step, group, str(name), number))
        self._csv.writerows((s, g, n, repr(v)) for s, g, n, v in rows)
        self._file.flush()
        if self._tb is not None:
            for _, g, n, v in rows:
                self._tb.add_scalar(f"{g}/{n}", v, global_step=step)

    def flush(self) -> None:
        """Push buffered TensorBoard events to disk (the CSV is flushed by every :meth:`log`)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the CSV file and the TensorBoard writer (idempotent)."""
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(csv_path: str | os.PathLike[str]) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """``{(group, name): (steps int64, values float64)}`` from a metrics CSV, each series sorted by step."""
    series: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
    for step, group, name, value in _read_rows(Path(csv_path)):
        steps, values = series.setdefault((group, name), ([], []))
        steps.append(step)
        values.append(value)
    out = {}
    for key, (steps, values) in series.items():
        s, v = np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)
        order = np.argsort(s, kind="stable")
        out[key] = (s[order], v[order])
    return out


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over the last ``window`` finite values (fewer at the start); NaN stays NaN."""
    out = np.full_like(values, np.nan)
    finite = np.isfinite(values)
    v = values[finite]
    if v.size:
        c = np.concatenate([[0.0], np.cumsum(v)])
        idx = np.arange(1, v.size + 1)
        lo = np.maximum(idx - window, 0)
        out[finite] = (c[idx] - c[lo]) / (idx - lo)
    return out


def _safe_name(group: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", group).strip("._") or "group"


# bookkeeping the trainer stamps on evaluations: a column of metrics.csv, not a curve worth a panel
BOOKKEEPING = frozenset({"epoch", "samples", "train_seconds", "train_cpu_seconds"})


def natural_key(name: str) -> list[Any]:
    """Sort key reading digit runs as numbers: ``recall@5`` before ``recall@10``, ``knn5`` before ``knn20``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def plot_curves(csv_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                smooth: int = 1) -> list[Path]:
    """Write one PNG per metric group (``{group}.png``, one subplot per metric in natural order, x = step) into
    ``out_dir``; the bookkeeping columns (:data:`BOOKKEEPING`) get no panel.

    ``smooth > 1`` draws a trailing moving average over that many points on top of the faint raw curve.
    Returns the written paths (none for an empty CSV).
    """
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise ValueError(f"plot_curves: smooth must be an int >= 1, got {smooth!r}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = read_metrics(csv_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[str]] = {}
    for group, name in metrics:
        if name not in BOOKKEEPING:
            groups.setdefault(group, []).append(name)
    run_name = Path(csv_path).resolve().parent.name
    written = []
    for group, names in groups.items():
        names = sorted(names, key=natural_key)
        ncols = min(3, len(names))
        nrows = math.ceil(len(names) / ncols)
        fig = Figure(figsize=(4.5 * ncols, 3.2 * nrows), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, name in zip(axes, names):
            steps, values = metrics[(group, name)]
            if smooth > 1:
                ax.plot(steps, values, color="C0", alpha=0.3, linewidth=0.8, label="raw")
                ax.plot(steps, _smooth(values, smooth), color="C0", linewidth=1.5, label=f"mean of {smooth}")
                ax.legend(fontsize="small")
            else:
                ax.plot(steps, values, color="C0", linewidth=1.2, marker="o" if len(steps) < 30 else None,
                        markersize=3)
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.set_ylabel(name)
            ax.grid(True, alpha=0.3)
        for ax in axes[len(names):]:
            ax.set_visible(False)
        fig.suptitle(f"{run_name}: {group}")
        stem = _safe_name(group)
        path = out / f"{stem}.png"
        k = 1
        while path in written:
            k += 1
            path = out / f"{stem}_{k}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def _wait_for_a_later_event_file_second(tb_dir: Path) -> None:
    """TensorBoard orders a run's event files by name, ``events.out.tfevents.<unix second>.<host>.<pid>.<counter>``;
    within one second and process the unpadded counter sorts 10 before 9, which would put a resumed run's purge
    before the events it purges.  Waiting (at most a second) until the clock passes the newest file's second keeps
    the order by time."""
    newest = -1
    for f in tb_dir.glob("events.out.tfevents.*"):
        parts = f.name.split(".")
        if len(parts) > 3 and parts[3].isdigit():
            newest = max(newest, int(parts[3]))
    while int(time.time()) <= newest:
        time.sleep(0.02)
