"""The one training loop, on Hugging Face Accelerate (one or many processes), for every task.

Data flows one way: the task's seeded batches → its model → features gathered over processes → estimator(batch, β)
→ surrogate → optimiser.  The loop never branches on the estimator or the layout: the task (:mod:`dual_emc2.train.task`)
computes a micro-batch's loss and evaluates.  Checkpoints hold model, optimiser, scheduler, estimator state, RNG and
data position, so a resumed run continues exactly.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dual_emc2.data.spectral import SpectralBatchSampler
from dual_emc2.distributed import all_gather_rows
from dual_emc2.errors import RunStopped
from dual_emc2.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from dual_emc2.train.config import Config, config_to_dict, save_config
from dual_emc2.train.factory import build_accelerator, build_task
from dual_emc2.train.optim import build_optimizer, build_scheduler
from dual_emc2.train.run_log import RunLogger, plot_curves
from dual_emc2.train.task import Task

__all__ = ["NonFiniteLossError", "PROGRESS_KEYS", "Position", "Trainer"]

# bookkeeping stamped on every evaluation beside the task's metrics (not accuracies: not printed or plotted as such)
PROGRESS_KEYS = ("epoch", "samples", "train_seconds", "train_cpu_seconds")


class NonFiniteLossError(RunStopped):
    """Raised after ``train.max_nonfinite`` consecutive non-finite losses."""


@dataclass
class Position:
    """Where training stands: optimiser steps done, epoch, and micro-batches consumed in that epoch."""

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

        cfg = load_config("configs/fmnist_unimodal.yaml", ["objective.name=emc2"])
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
        self.objective = self.task.objective
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
    def state_payload(self) -> dict[str, Any]:
        return {
            "step": self.pos.step, "epoch": self.pos.epoch, "batch_in_epoch": self.pos.batch_in_epoch,
            "model": self.core.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "objective": self.objective.state_dict(),
            "rng": _rng_state(), "config": config_to_dict(self.cfg), "world_size": self.acc.num_processes,
            "nonfinite_total": self.nonfinite_total, "history": self.history,
            "sampler": self.sampler.state_dict() if isinstance(self.sampler, SpectralBatchSampler) else None,
        }

    def save(self) -> Path | None:
        path = None
        if self.acc.is_main_process:
            path = save_checkpoint(self.out / "checkpoints", self.pos.step, self.state_payload(),
                                   keep_last=self.cfg.train.keep_last)
        self.acc.wait_for_everyone()
        return path

    def restore(self, path: Path) -> None:
        payload = load_checkpoint(path, map_location="cpu")
        self.core.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.objective.load_state_dict(payload["objective"])
        self.pos = Position(payload["step"], payload["epoch"], payload["batch_in_epoch"])
        self.nonfinite_total = payload.get("nonfinite_total", 0)
        self.history = list(payload.get("history", []))
        if isinstance(self.sampler, SpectralBatchSampler):
            if payload.get("sampler") is None:
                raise ValueError(f"{path}: checkpoint of a run without data.batch_sampler=spectral; resume it with "
                                 "the batch sampler it was trained with")
            self.sampler.load_state_dict(payload["sampler"])
        _set_rng_state(payload["rng"])
        if self.pos.batch_in_epoch >= self.micro_used:
            self.pos = Position(self.pos.step, self.pos.epoch + 1, 0)

    # ------------------------------------------------------------------------------------------------ training
    def train_step(self, item: Any) -> tuple[Tensor, dict[str, Tensor]] | None:
        """One micro-batch (a loader item): the task's forward and loss, backward and (at accumulation boundaries)
        the optimiser step.  Returns (loss, diagnostics), or None when the loss was not finite and the step was
        skipped."""
        with self.acc.accumulate(self.model):
            loss, self._last_inputs = self.task.loss(self.model, item)
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
            raise NonFiniteLossError(
                f"{self.nonfinite_streak} consecutive non-finite losses at step {self.pos.step}; stopping "
                f"(the last good checkpoint in {self.out / 'checkpoints'} is kept)")

    def _refresh_due(self) -> bool:
        """A spectral re-clustering is due before the next optimiser step (never inside an accumulation group)."""
        return (isinstance(self.sampler, SpectralBatchSampler) and self.pos.batch_in_epoch % self.cfg.train.grad_accum
                == 0 and self.pos.batch_in_epoch < self.micro_used and self.sampler.refresh_due(self.pos.step))

    @torch.no_grad()
    def refresh_batches(self) -> float:
        """Spectral batches (Cho et al.): embed every training sample with the current towers (each process a contiguous
        slice), cluster the similarity graph on the main process, broadcast the clusters; they shape the batches from
        the current position on.  Returns the seconds it took."""
        from accelerate.utils import broadcast

        t0 = time.perf_counter()
        sampler: SpectralBatchSampler = self.sampler
        n, world = sampler.num_samples, self.acc.num_processes
        mine = torch.tensor_split(torch.arange(n), world)[self.acc.process_index]  # n >= global batch >= world
        us, vs = [], []
        for chunk in mine.split(self.cfg.eval.batch_size):
            u, v = self.task.spectral_embeddings(self.core, chunk)
            us.append(u.float())
            if v is not None:
                vs.append(v.float())
        u_all = all_gather_rows(torch.cat(us))
        v_all = all_gather_rows(torch.cat(vs)) if vs else None
        if self.cfg.data.spectral.beta is None:
            sampler.beta = float(self.core.temperature())
        if self.acc.is_main_process:
            assignment = sampler.compute_assignment(torch.arange(n), u_all.cpu(),
                                                    None if v_all is None else v_all.cpu()).to(self.device)
        else:
            assignment = torch.zeros(n, dtype=torch.int64, device=self.device)
        if world > 1:
            assignment = broadcast(assignment, from_process=0)
        sampler.set_assignment(assignment.cpu(), step=self.pos.step)
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
        e = self.cfg.eval
        if not e.enabled or not (final or epoch_done % e.every_epochs == 0):
            return None
        metrics = None
        if self.acc.is_main_process:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            progress = self._progress()
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
    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        resume = resolve_resume(cfg.train.resume, self.out / "checkpoints")
        if resume is not None:
            self.restore(resume)
            self.acc.print(f"[resume] from {resume} at step {self.pos.step}, epoch {self.pos.epoch}, "
                           f"batch {self.pos.batch_in_epoch}")
        logger = None
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            logger = RunLogger(self.out, tensorboard=True, start_step=self.pos.step)
        bar = tqdm(total=self.total_steps, initial=self.pos.step, disable=not self.acc.is_main_process,
                   desc=f"{cfg.objective.name} b={cfg.train.batch_size}x{self.acc.num_processes}", dynamic_ncols=True)
        self._clock_start, self._eval_spent = self._clocks(), (0.0, 0.0)
        last_eval = None
        try:
            last_eval = self._loop(logger, bar)
        finally:
            bar.close()
            if logger is not None:
                logger.close()
        final = last_eval or {}
        if self.acc.is_main_process:
            plots = plot_curves(self.out / "metrics.csv", self.out / "plots") if cfg.train.plots else []
            final = {"step": self.pos.step, **(self.history[-1] if self.history else {}),
                     "nonfinite_skipped": self.nonfinite_total, "bad_samples_skipped": self.task.bad_samples}
            (self.out / "final_metrics.json").write_text(json.dumps(final, indent=2))
            self.acc.print(f"[done] {self.out}: checkpoint {self.out / 'checkpoints'}, plots "
                           f"{', '.join(p.name for p in plots) or 'off'}; " +
                           ", ".join(f"{k}={v:.4f}" for k, v in final.items() if k.endswith("acc")))
        return final

    def _loop(self, logger: RunLogger | None, bar: tqdm) -> dict[str, float] | None:
        cfg = self.cfg
        last_eval = None
        t0, seen = time.perf_counter(), 0
        window: dict[str, Tensor] = {}  # diagnostics summed since the last log step (logged as window means)
        n_window = 0
        while self.pos.step < self.total_steps:
            if self._refresh_due():
                seconds = self.refresh_batches()
                if logger is not None:
                    logger.log(self.pos.step, {"spectral_refresh_s": seconds}, group="train")
            self.task.start_epoch(self.pos.epoch, self.pos.batch_in_epoch)
            self.model.train()
            for item in self.loader:
                if self.pos.batch_in_epoch >= self.micro_used or self._refresh_due():
                    break
                result = self.train_step(item)
                self.pos.batch_in_epoch += 1
                seen += self._last_inputs * self.acc.num_processes
                if not self.acc.sync_gradients:
                    continue
                self.scheduler.step()
                self.pos.step += 1
                bar.update(1)
                if result is not None:  # sum the window's diagnostics on device: no host sync between log steps
                    for k, v in result[1].items():
                        window[k] = window[k] + v if k in window else v.clone()
                    n_window += 1
                if n_window and (self.pos.step % cfg.train.log_every == 0 or self.pos.step == 1):
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
                if self.pos.step % cfg.train.ckpt_every == 0 and self.pos.step < self.total_steps:
                    self.save()
                if self.pos.step >= self.total_steps:
                    break
            if self.pos.batch_in_epoch >= self.micro_used:
                self.pos = Position(self.pos.step, self.pos.epoch + 1, 0)
                final = self.pos.step >= self.total_steps
                metrics = self._maybe_eval(self.pos.epoch, logger, final)
                last_eval = metrics or last_eval
            if self.pos.step >= self.total_steps:
                break
        if not self.history or self.history[-1].get("step") != self.pos.step:
            metrics = self._maybe_eval(self.pos.epoch, logger, final=True)
            last_eval = metrics or last_eval
        self.save()
        return last_eval

    @property
    def loader(self) -> DataLoader:
        return self.task.loader


