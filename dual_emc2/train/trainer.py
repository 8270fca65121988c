"""The one training loop, on Hugging Face Accelerate (one or many processes), for every task.

Data flows one way: the task's seeded batches → its model → features gathered over processes → estimator(batch, β)
→ surrogate → optimiser.  The loop never branches on the estimator or the layout: the task (:mod:`dual_emc2.train.task`)
computes a micro-batch's loss and evaluates.  Checkpoints hold model, optimiser, scheduler, estimator state, RNG and
data position, so a resumed run continues exactly.
"""
from __future__ import annotations

import contextlib
import json
import random
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dual_emc2.errors import CheckpointError, DataError, Interrupted, RunStopped
from dual_emc2.loss.state.keyed import split_sharded_state
from dual_emc2.train.checkpoint import find_latest_valid, load_checkpoint, resolve_resume, save_checkpoint
from dual_emc2.train.checkpoint_shards import restore_estimator, save_state_shard, shard_manifest
from dual_emc2.train.config import config_to_dict, save_config
from dual_emc2.train.factory import build_accelerator, build_task
from dual_emc2.train.optim import build_optimizer, build_scheduler
from dual_emc2.train.run_folder import check_new_run, check_resume_config
from dual_emc2.train.run_log import BOOKKEEPING, RunLogger, plot_curves
from dual_emc2.train.schema import Config
from dual_emc2.train.task import Task

__all__ = ["NonFiniteLossError", "PROGRESS_KEYS", "Position", "Trainer"]

# bookkeeping stamped on every evaluation beside the task's metrics (not accuracies: not printed or plotted as such)
PROGRESS_KEYS = tuple(sorted(BOOKKEEPING))


class NonFiniteLossError(RunStopped):
    """Raised after ``train.max_nonfinite`` consecutive non-finite losses (exit code 5); the message names the last
    good checkpoint.

    Example::

        try:
            Trainer(cfg).fit()
        except NonFiniteLossError as err:
            print(err)   # "3 consecutive non-finite losses at step 120; stopping (the last good checkpoint is ...)"
    """


@dataclass
class LoopState:
    """What the loop keeps between its steps: the inputs the last micro-batch encoded (for the throughput), the
    progress bar (evaluation writes what it is doing into it) and the signal that asked the run to stop.

    Example::

        trainer.loop.stop_signal = signal.SIGTERM   # what the signal handler does; the loop checkpoints and stops
    """

    last_inputs: int = 0
    bar: Any = None
    stop_signal: int | None = None


@dataclass
class Position:
    """Where training stands: optimiser steps done, epoch, and micro-batches consumed in that epoch.

    Example::

        Position(step=1248, epoch=4, batch_in_epoch=0)   # what a checkpoint stores and a resume continues from
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """One training loop for every task: optimiser and schedule, Accelerate, checkpoints with exact resume, logging,
    the non-finite guard and spectral re-clustering.  ``task`` (model, estimator, data; default: the config's mode,
    :func:`~dual_emc2.train.factory.build_task`) computes the loss of a micro-batch and evaluates.

    Example::

        cfg = load_config("configs/fmnist_unimodal.yaml", ["loss.estimator=emc2"])
        Trainer(cfg).fit()
        acc = build_accelerator(cfg)                                  # or: hand in your own model
        Trainer(cfg, ImageViewsTask(cfg, acc, model=my_model), acc).fit()
    """

    def __init__(self, cfg: Config, task: Task | None = None, accelerator: Accelerator | None = None) -> None:
        self.cfg = cfg
        if task is not None and accelerator is None:
            accelerator = task.acc
        self.acc = accelerator or build_accelerator(cfg)
        self.device = self.acc.device
        self.out = Path(cfg.output_dir)
        seed_everything(cfg.seed)
        self.task = task or build_task(cfg, self.acc)
        self.estimator = self.task.estimator
        self.loss_fn = self.task.loss_fn
        self.sampler = self.task.sampler
        micro = self.task.batches_per_epoch
        if micro < cfg.train.grad_accum:
            raise ValueError(f"an epoch has {micro} batches, fewer than train.grad_accum={cfg.train.grad_accum}")
        self.steps_per_epoch = micro // cfg.train.grad_accum
        self.micro_used = self.steps_per_epoch * cfg.train.grad_accum  # whole accumulation groups per epoch
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self._prepare_optimisation(self.task.model)
        self.pos = Position()
        self.loop = LoopState()
        self.nonfinite_streak = 0
        self.nonfinite_total = 0
        self.history: list[dict[str, float]] = []
        self._clock_start: tuple[float, float] | None = None
        self._eval_spent = (0.0, 0.0)

    def _prepare_optimisation(self, model: torch.nn.Module) -> None:
        """Optimiser and schedule of ``model`` from ``cfg.optim``, then Accelerate's prepare (and torch.compile)."""
        cfg = self.cfg
        o = cfg.optim
        optimizer = build_optimizer(model, o.name, o.lr, o.weight_decay, momentum=o.momentum,
                                    exclude_bias_and_norm=o.exclude_bias_and_norm)
        warmup = int(round(o.warmup_epochs * self.steps_per_epoch))
        self.scheduler = build_scheduler(optimizer, self.total_steps, min(warmup, self.total_steps), o.schedule,
                                         o.min_lr_ratio)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        if cfg.train.compile:
            self.model = torch.compile(self.model)

    @property
    def core(self) -> torch.nn.Module:
        """The model without Accelerate's (or torch.compile's) wrappers."""
        return self.acc.unwrap_model(self.model)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def state_payload(self, estimator: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """What a checkpoint holds; ``estimator``: the estimator entries to save (default: its whole state dict, on a
        sharded run this process's rows)."""
        return {
            "step": self.pos.step, "epoch": self.pos.epoch, "batch_in_epoch": self.pos.batch_in_epoch,
            "model": self.core.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "estimator": self.estimator.state_dict() if estimator is None else estimator,
            "rng": _rng_state(), "config": config_to_dict(self.cfg), "world_size": self.acc.num_processes,
            "nonfinite_total": self.nonfinite_total, "history": self.history,
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
        }

    def save(self) -> Path | None:
        """Write the checkpoint of the current step (the main process; with sharded estimator state every process
        first writes its shard, :mod:`dual_emc2.train.checkpoint_shards`); returns its path on the main process."""
        folder, step, world = self.out / "checkpoints", self.pos.step, self.acc.num_processes
        common, sharded = split_sharded_state(self.estimator, self.estimator.state_dict())
        if sharded:
            save_state_shard(folder, step, self.acc.process_index, world, sharded)
            self.acc.wait_for_everyone()
        path = None
        if self.acc.is_main_process:
            manifest = shard_manifest(folder, step, world) if sharded else None
            path = save_checkpoint(folder, step, self.state_payload(common), keep_last=self.cfg.train.keep_last,
                                   manifest=manifest)
        self.acc.wait_for_everyone()
        return path

    def restore(self, path: Path) -> None:
        """Continue the run of checkpoint ``path``: its config must match this one except where a resumed run may
        differ (:mod:`dual_emc2.train.run_folder`; another number of processes with the same global batch
        included); the schedule follows this config (a longer run gets a schedule rebuilt for its new end), and so do
        the optimiser's hyperparameters.  The estimator state is re-laid out for this run's processes."""
        payload = load_checkpoint(path, map_location="cpu")
        self.resume_changes = check_resume_config(payload.get("config", {}), config_to_dict(self.cfg), path,
                                                  self.cfg.train.allow_changes, payload.get("world_size"),
                                                  self.acc.num_processes)
        try:
            self.core.load_state_dict(payload["model"])
            restore_estimator(self.estimator, path, payload)
        except RuntimeError as exc:  # same config, different state layout: a checkpoint of another code version
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"{path}: its model or estimator state does not fit this run ({first}); resume it "
                                  "with the version of dual_emc2 that wrote it, or start a new run") from None
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(payload["optimizer"])
        for group, hyper in zip(self.optimizer.param_groups, configured):
            group.update(hyper)  # this config's lr, weight decay, ... (the checkpoint's unless --allow-changes)
        self.pos = Position(payload["step"], payload["epoch"], payload["batch_in_epoch"])
        self._set_schedule_position(self.pos.step)
        self.nonfinite_total = payload.get("nonfinite_total", 0)
        self.history = list(payload.get("history", []))
        if self.sampler is not None:
            try:
                self.sampler.load_state_dict(payload.get("sampler"))
            except ValueError as exc:
                raise CheckpointError(f"{path}: {exc}") from None
        _set_rng_state(payload["rng"])
        if self.pos.batch_in_epoch >= self.micro_used:
            self.pos = Position(self.pos.step, self.pos.epoch + 1, 0)

    def _set_schedule_position(self, step: int) -> None:
        """Put the learning-rate schedule of this config at optimiser step ``step``: the scheduler's own step from
        ``step − 1`` (its closed form, so an unchanged resume is bit-identical)."""
        self.scheduler.last_epoch = step - 1
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": no optimiser step is skipped
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()

    # ------------------------------------------------------------------------------------------------ training
    def train_step(self, item: Any) -> tuple[Tensor, dict[str, Tensor]] | None:
        """One micro-batch (a loader item): the task's forward and loss, backward and (at accumulation boundaries)
        the optimiser step.  Returns (loss, diagnostics), or None when the loss was not finite and the step was
        skipped."""
        with self.acc.accumulate(self.model):
            loss, self.loop.last_inputs = self.task.loss(self.model, item)
            if not self._apply(loss):
                return None
        stats = dict(self.loss_fn.last_stats)  # estimator diagnostics, the loss, eq. (1) on the batch
        stats["beta"] = self.core.temperature().detach()
        return loss.detach(), stats

    def _apply(self, loss: Tensor) -> bool:
        """Backward of one micro-batch's surrogate and the optimiser step (Accelerate turns it into accumulation inside
        ``accumulate``); a non-finite loss applies nothing and returns False (:meth:`_skip_nonfinite`)."""
        if not bool(torch.isfinite(loss)):
            self._skip_nonfinite()
            return False
        self.nonfinite_streak = 0
        self.acc.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def _skip_nonfinite(self) -> None:
        """Drop this micro-batch's gradients after a non-finite loss; stop after ``train.max_nonfinite`` in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_streak += 1
        self.nonfinite_total += 1
        if self.nonfinite_streak >= max(1, self.cfg.train.max_nonfinite):
            last = find_latest_valid(self.out / "checkpoints")
            kept = (f"the last good checkpoint is {last}" if last is not None else
                    f"no checkpoint was written yet (train.ckpt_every={self.cfg.train.ckpt_every})")
            raise NonFiniteLossError(
                f"{self.nonfinite_streak} consecutive non-finite losses at step {self.pos.step}; stopping ({kept}). "
                "Lower optim.lr or loss.beta, or check the data for NaNs")

    def _refresh_due(self) -> bool:
        """The sampler wants its batches regrouped before the next optimiser step (never inside an accumulation
        group; the spectral sampler's refresh, Cho et al.)."""
        return (self.sampler is not None and self.pos.batch_in_epoch % self.cfg.train.grad_accum == 0
                and self.pos.batch_in_epoch < self.micro_used and self.sampler.refresh_due(self.pos.step))

    @torch.no_grad()
    def refresh_batches(self) -> float:
        """Regroup the batches to come from the current towers' embeddings of every training sample
        (:meth:`~dual_emc2.data.samplers.GlobalBatchSampler.refresh`); returns the seconds it took."""
        t0 = time.perf_counter()
        beta = float(self.core.temperature()) if self.cfg.data.spectral.beta is None else None
        self.sampler.refresh(lambda positions: self.task.spectral_embeddings(self.core, positions), step=self.pos.step,
                             beta=beta, chunk=self.cfg.eval.batch_size, device=self.device)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------------ evaluation
    @staticmethod
    def _clocks() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def evaluate(self) -> dict[str, float]:
        """The task's evaluation of the current model (main process)."""
        return self.task.evaluate(self.core, self.out)

    def _progress(self) -> dict[str, float]:
        """Samples accessed (inputs of every process, accumulation included) and the training loop's wall-clock and
        CPU seconds without evaluation, so runs can be compared against time (time to accuracy)."""
        now = self._clocks()
        start = self._clock_start or now
        train = [n - s - e for n, s, e in zip(now, start, self._eval_spent)]
        samples = self.pos.step * self.cfg.train.batch_size * self.acc.num_processes * self.cfg.train.grad_accum
        return {"samples": float(samples), "train_seconds": train[0], "train_cpu_seconds": train[1]}

    def _maybe_eval(self, epoch_done: int, logger: RunLogger | None, final: bool) -> dict[str, float] | None:
        """Evaluate after epoch ``epoch_done`` if ``eval.every_epochs`` (or ``final``) says so; logged, printed and
        kept in ``history`` (main process)."""
        e = self.cfg.eval
        if not e.enabled or not (final or epoch_done % e.every_epochs == 0):
            return None
        metrics = None
        if self.acc.is_main_process:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            progress = self._progress()
            bar = self.loop.bar
            if bar is not None:
                bar.set_postfix_str(f"evaluating: {self.task.eval_description}")
            before = self._clocks()
            metrics = {"epoch": float(epoch_done), **self.evaluate(), **progress}
            self._eval_spent = tuple(s + c - b for s, c, b in zip(self._eval_spent, self._clocks(), before))
            if not self.history or self.history[-1].get("step") != self.pos.step:
                self.history.append({"step": float(self.pos.step), **metrics})
            if logger is not None:
                logger.log(self.pos.step, metrics, group="eval")
            self.acc.print(f"[eval] step {self.pos.step} epoch {epoch_done}: " +
                           ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k not in PROGRESS_KEYS))
        self.acc.wait_for_everyone()
        return metrics

    # ------------------------------------------------------------------------------------------------ the loop
    def _start(self) -> Path | None:
        """Resume (``train.resume``) or check that a new run may start in ``output_dir``; nothing is written before
        every process has passed the checks."""
        cfg = self.cfg
        resume = resolve_resume(cfg.train.resume, self.out / "checkpoints")
        if self.acc.num_processes > 1:  # every process must continue the same checkpoint
            from accelerate.utils import gather_object

            seen = gather_object([str(resume) if resume is not None else None])
            if len(set(seen)) > 1:
                raise CheckpointError(f"processes see different checkpoints in {self.out} ({seen}): output_dir must "
                                      "be on storage every machine sees at the same path")
        if resume is None:
            check_new_run(self.out, cfg.train.resume)
            if cfg.train.resume == "latest":
                self.acc.print(f"[resume] no run in {self.out} yet: starting a new one")
        self.acc.wait_for_everyone()
        if resume is not None:
            self.restore(resume)
            changes = "".join(f"; {k}: {a!r} → {b!r}" for k, a, b in self.resume_changes)
            self.acc.print(f"[resume] from {resume} at step {self.pos.step}, epoch {self.pos.epoch}, batch "
                           f"{self.pos.batch_in_epoch} of {self.total_steps} steps{changes}")
        return resume

    def fit(self) -> dict[str, float]:
        """Train to ``total_steps`` (evaluating as ``eval.*`` says), then write ``final_metrics.json`` and plots.
        SIGINT / SIGTERM write a checkpoint at the current step and raise :class:`Interrupted`."""
        cfg = self.cfg
        resumed = self._start()
        logger = None
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            logger = RunLogger(self.out, tensorboard=True, start_step=self.pos.step)
        self._clock_start, self._eval_spent = self._clocks(), (0.0, 0.0)
        if resumed is None and cfg.eval.at_start:
            self._maybe_eval(0, logger, final=True)  # the network before training, in the same run
        bar = tqdm(total=self.total_steps, initial=self.pos.step, disable=not self.acc.is_main_process,
                   desc=f"{cfg.loss.estimator} b={cfg.train.batch_size}x{self.acc.num_processes}", dynamic_ncols=True)
        self.loop.bar = bar
        try:
            with self._stop_on_signals():
                self._loop(logger, bar)
        finally:
            bar.close()
            if logger is not None:
                logger.close()
        return self._finish()

    def _finish(self) -> dict[str, float]:
        """``final_metrics.json`` (the last step, the last evaluation and its step, the counters), the plots and a
        short summary: the metrics at step 0, at the end, and of the task's baseline (raw pixels)."""
        final: dict[str, float] = {}
        if self.acc.is_main_process:
            cfg = self.cfg
            plots = plot_curves(self.out / "metrics.csv", self.out / "plots") if cfg.train.plots else []
            last = dict(self.history[-1]) if self.history else {}
            eval_step = last.pop("step", None)
            final = {"step": self.pos.step, **({"eval_step": eval_step} if eval_step is not None else {}), **last,
                     "nonfinite_skipped": self.nonfinite_total, "bad_samples_skipped": self.task.bad_samples}
            table = self._summary_table(last)
            if table:
                final["baselines"] = table["baselines"]
            (self.out / "final_metrics.json").write_text(json.dumps(final, indent=2))
            self.acc.print(f"[done] {self.out}: step {self.pos.step}; checkpoint {self.out / 'checkpoints'}; plots "
                           f"{', '.join(p.name for p in plots) or 'off'}")
            if table:
                self.acc.print(table["text"])
        self.acc.wait_for_everyone()
        return final

    def _summary_table(self, last: dict[str, float]) -> dict[str, Any] | None:
        """Columns step 0 (if evaluated), final, and the task's baselines (e.g. raw pixels), one row per metric."""
        metrics = [k for k in last if k not in PROGRESS_KEYS and not k.startswith("geo_") and "_train_" not in k]
        if not metrics:
            return None
        start = next((h for h in self.history if h.get("step") == 0), None)
        baselines = {"step_0": {k: start[k] for k in metrics if k in start}} if start is not None else {}
        if self.cfg.eval.enabled:
            self.acc.print(f"[eval] baselines for the summary: {self.task.eval_description} of reference features")
            baselines |= self.task.baselines()
        columns = [*baselines, "final"]
        rows = [f"{'metric':<22}" + "".join(f"{c:>12}" for c in columns)]
        for k in metrics:
            values = [baselines[c].get(k) for c in baselines] + [last[k]]
            rows.append(f"{k:<22}" + "".join(f"{v:>12.4f}" if v is not None else f"{'-':>12}" for v in values))
        return {"baselines": baselines, "text": "\n".join(rows)}

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT / SIGTERM set a flag the loop checks at the next optimiser step (a second one acts at once)."""
        self.loop.stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum: int, frame: Any) -> None:
            self.loop.stop_signal = signum
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _stop_requested(self) -> int | None:
        """The signal to stop on, agreed by every process (checked every step alone, every ``train.log_every``
        steps with several processes: one small all-reduce)."""
        mine = self.loop.stop_signal
        if self.acc.num_processes == 1:
            return mine
        if self.pos.step % self.cfg.train.log_every:
            return None
        flag = torch.tensor([mine or 0], device=self.device)
        return int(self.acc.reduce(flag, reduction="max").item()) or None

    def _checkpoint_and_raise(self, err: BaseException, signum: int | None = None) -> None:
        """Write a checkpoint at the last whole optimiser step and raise: :class:`Interrupted` for a signal, else
        ``err`` with what was saved and how to continue."""
        self.pos.batch_in_epoch -= self.pos.batch_in_epoch % self.cfg.train.grad_accum  # an unfinished group reruns
        self.optimizer.zero_grad(set_to_none=True)
        path = self.save()
        where = f"checkpoint at step {self.pos.step}: {path}" if path else f"checkpoint at step {self.pos.step}"
        resume = f"resume with the same command and --resume latest (output_dir={self.out})"
        if signum is not None:
            name = signal.Signals(signum).name
            raise Interrupted(f"{name}: stopped at step {self.pos.step} of {self.total_steps}; {where}; {resume}",
                              signum) from None
        text = str(err).split("Original Traceback")[0].strip() or type(err).__name__
        raise type(err)(f"{text}\n{where}; fix it (or set data.on_bad_sample=skip), then {resume}") from None

    def _loop(self, logger: RunLogger | None, bar: tqdm) -> None:
        cfg = self.cfg
        t0, seen = time.perf_counter(), 0
        window: dict[str, Tensor] = {}  # diagnostics summed since the last log step (logged as window means)
        n_window = 0

        def flush_window() -> None:
            nonlocal t0, seen, window, n_window
            dt = time.perf_counter() - t0
            values = {k: float(v) / n_window for k, v in window.items()}
            values["lr"] = self.scheduler.get_last_lr()[0]
            values[self.task.throughput_key] = seen / max(dt, 1e-9)
            values["bad_samples"] = float(self.task.bad_samples)
            t0, seen, window, n_window = time.perf_counter(), 0, {}, 0
            if logger is not None:
                logger.log(self.pos.step, values, group="train")
            bar.set_postfix(objective=f"{values['batch_objective']:.3f}", **(
                {"state_w": f"{values['state_weight']:.2f}"} if "state_weight" in values else {}))

        while self.pos.step < self.total_steps:
            if self._refresh_due():
                seconds = self.refresh_batches()
                if logger is not None:
                    logger.log(self.pos.step, {"spectral_refresh_s": seconds}, group="train")
            self.task.start_epoch(self.pos.epoch, self.pos.batch_in_epoch)
            self.model.train()
            batches = iter(self.loader)
            while True:
                if self.pos.batch_in_epoch >= self.micro_used or self._refresh_due():
                    break  # before reading: a stream must not consume a batch the run does not train on
                try:
                    item = next(batches)
                except StopIteration:
                    break
                except Exception as err:  # a worker killed by the signal, or data that cannot be read
                    signum = self.loop.stop_signal
                    if signum is not None or isinstance(err, DataError):
                        self._checkpoint_and_raise(err, signum)
                    raise
                result = self.train_step(item)
                self.pos.batch_in_epoch += 1
                seen += self.loop.last_inputs * self.acc.num_processes
                if not self.acc.sync_gradients:
                    continue
                self.scheduler.step()
                self.pos.step += 1
                bar.update(1)
                if result is not None:  # sum the window's diagnostics on device: no host sync between log steps
                    for k, v in result[1].items():
                        window[k] = window[k] + v if k in window else v.clone()
                    n_window += 1
                if n_window and (self.pos.step % cfg.train.log_every == 0 or self.pos.step == 1
                                 or self.pos.step == self.total_steps):
                    flush_window()
                signum = self._stop_requested()
                if signum is not None:
                    self._checkpoint_and_raise(KeyboardInterrupt(), signum)
                if self.pos.step % cfg.train.ckpt_every == 0 and self.pos.step < self.total_steps:
                    self.save()
                if self.pos.step >= self.total_steps:
                    break
            if self.pos.batch_in_epoch >= self.micro_used:
                self.pos = Position(self.pos.step, self.pos.epoch + 1, 0)
                self._maybe_eval(self.pos.epoch, logger, self.pos.step >= self.total_steps)
            if self.pos.step >= self.total_steps:
                break
        if n_window:
            flush_window()  # the last, partial logging window
        if not self.history or self.history[-1].get("step") != self.pos.step:
            self._maybe_eval(self.pos.epoch, logger, final=True)
        self.save()

    @property
    def loader(self) -> DataLoader:
        return self.task.loader


