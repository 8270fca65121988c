"""Run logging: CSV contents, resume truncation, TensorBoard events, and PNG curves."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dual_emc2.train.run_log import RunLogger, _smooth, plot_curves, read_metrics


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_csv_long_format_flushed_each_call(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False)
    logger.log(1, {"loss": 2.5, "acceptance": torch.tensor(0.25)})
    # readable before close: every call is flushed
    assert _rows(tmp_path / "metrics.csv") == [
        ["step", "group", "name", "value"], ["1", "train", "loss", "2.5"], ["1", "train", "acceptance", "0.25"]]
    logger.log(2, {"loss": 0.1 + 0.2})
    logger.log(2, {"knn@1": 0.875, "nan_metric": float("nan")}, group="eval")
    logger.close()
    logger.close()  # idempotent
    m = read_metrics(tmp_path / "metrics.csv")
    assert set(m) == {("train", "loss"), ("train", "acceptance"), ("eval", "knn@1"), ("eval", "nan_metric")}
    steps, values = m[("train", "loss")]
    assert steps.tolist() == [1, 2] and values[1] == 0.1 + 0.2  # exact float round trip
    assert math.isnan(m[("eval", "nan_metric")][1][0])
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(3, {"loss": 1.0})


def test_bad_values_rejected(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(TypeError, match="train/loss must be a number"):
            logger.log(1, {"loss": "high"})
        with pytest.raises(TypeError, match="step must be an int"):
            logger.log(1.5, {"loss": 1.0})
    with pytest.raises(ValueError, match="start_step"):
        RunLogger(tmp_path, tensorboard=False, start_step=-1)


def test_resume_drops_rows_after_start_step(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as logger:
        for step in range(1, 11):
            logger.log(step, {"loss": 10.0 - step})
            if step % 5 == 0:
                logger.log(step, {"acc": step / 10}, group="eval")
    # the run crashed after step 10; the last checkpoint was at step 6
    with RunLogger(tmp_path, tensorboard=False, start_step=6) as logger:
        for step in range(7, 9):
            logger.log(step, {"loss": 100.0 + step})
    m = read_metrics(tmp_path / "metrics.csv")
    steps, values = m[("train", "loss")]
    assert steps.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]  # no duplicate 7, 8 and nothing from the lost 9, 10
    assert values.tolist() == [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 107.0, 108.0]
    assert m[("eval", "acc")][0].tolist() == [5]  # eval at 10 was after the checkpoint
    # a fresh run (start_step 0) starts a new file
    with pytest.warns(UserWarning, match="fresh metrics file"):
        RunLogger(tmp_path, tensorboard=False).close()
    assert _rows(tmp_path / "metrics.csv") == [["step", "group", "name", "value"]]


def test_tensorboard_events_purged_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": float(step)})
    with RunLogger(tmp_path, start_step=3) as logger:
        logger.log(4, {"loss": 40.0})
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in events] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_read_metrics_reports_bad_rows(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,group,name,value\n1,train,loss,0.5\n2,train,loss,oops\n")
    with pytest.raises(ValueError, match=r"metrics.csv:3: bad metrics row"):
        read_metrics(path)
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match="expected header"):
        read_metrics(path)


def test_smoothing_is_trailing_mean():
    v = np.array([1.0, 2.0, np.nan, 3.0, 4.0, 5.0])
    # brute force: mean of the last (up to) 3 finite values, NaN where the input is NaN
    finite = [1.0, 2.0, 3.0, 4.0, 5.0]
    expected = [np.mean(finite[max(0, i - 2):i + 1]) for i in range(5)]
    out = _smooth(v, 3)
    assert np.isnan(out[2])
    np.testing.assert_allclose(out[np.isfinite(v)], expected)
    np.testing.assert_allclose(_smooth(v, 1)[np.isfinite(v)], finite)


def test_plot_curves_writes_one_png_per_group(tmp_path):
    run = tmp_path / "run"
    with RunLogger(run, tensorboard=False) as logger:
        rng = np.random.default_rng(0)
        for step in range(0, 200, 5):
            logger.log(step, {"loss": float(np.exp(-step / 50) + 0.05 * rng.standard_normal()),
                              "acceptance_rate": 0.3, "lr": 1e-3, "grad_norm": 1.0 / (1 + step)})
            if step % 50 == 0:
                logger.log(step, {"knn@1": step / 200, "linear_probe": step / 250}, group="eval")
        logger.log(200, {"x": 1.0}, group="eval/extra")
    paths = plot_curves(run / "metrics.csv", tmp_path / "plots", smooth=5)
    assert sorted(p.name for p in paths) == ["eval.png", "eval_extra.png", "train.png"]
    sizes = {}
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        sizes[p.name] = len(data)
        assert len(data) > 5_000
    assert sizes["train.png"] > sizes["eval_extra.png"]  # four subplots vs one
    assert plot_curves(run / "metrics.csv", tmp_path / "plots2")  # smooth=1 path
    with pytest.raises(ValueError, match="smooth"):
        plot_curves(run / "metrics.csv", tmp_path / "plots", smooth=0)
    empty = tmp_path / "empty"
    RunLogger(empty, tensorboard=False).close()
    assert plot_curves(empty / "metrics.csv", tmp_path / "plots3") == []


def test_resume_purge_survives_the_event_file_counter_gaining_a_digit(tmp_path):
    """Event files are ordered by name; within one second the process counter sorts 10 before 9 (regression)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer import event_file_writer
    from torch.utils.tensorboard import SummaryWriter

    k = 0
    while len(str(event_file_writer._global_uid._value)) == len(str(event_file_writer._global_uid._value + 1)):
        SummaryWriter(log_dir=str(tmp_path / "other" / str(k))).close()  # next writer gets 9, 99, ...: one before
        k += 1
    with RunLogger(tmp_path / "run") as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": float(step)})
    with RunLogger(tmp_path / "run", start_step=3) as logger:  # its counter has one digit more
        logger.log(4, {"loss": 40.0})
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_eval_panels_in_natural_order_without_bookkeeping(tmp_path, monkeypatch):
    from dual_emc2.train import run_log

    drawn = []
    real = run_log.natural_key
    monkeypatch.setattr(run_log, "natural_key", lambda n: (drawn.append(n), real(n))[1])
    run = tmp_path / "run"
    logger = RunLogger(run, tensorboard=False)
    logger.log(1, {"x2y_recall@10": 0.5, "x2y_recall@5": 0.4, "x2y_recall@1": 0.1, "epoch": 1.0, "samples": 64.0,
                   "train_seconds": 2.0}, group="eval")
    logger.close()
    plot_curves(run / "metrics.csv", tmp_path / "plots")
    assert set(drawn) == {"x2y_recall@1", "x2y_recall@5", "x2y_recall@10"}  # no panel for the bookkeeping
    assert sorted(["knn20_acc", "knn5_acc", "knn1_acc"], key=real) == ["knn1_acc", "knn5_acc", "knn20_acc"]
    assert sorted(["r@10", "r@5", "r@1"], key=real) == ["r@1", "r@5", "r@10"]  # plain sorted() puts @10 second
