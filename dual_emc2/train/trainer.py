"""The unimodal contrastive trainer on Hugging Face Accelerate (one or many processes).

Data flows one way: seeded multi-view batches → encoder → features gathered over processes → estimator(batch, β) →
surrogate → optimiser.  The trainer never branches on the estimator; it only supplies ``encode_candidates`` when the
estimator says it needs out-of-batch candidates.  Checkpoints hold model, optimiser, scheduler, estimator state, RNG
and data position, so a resumed run continues exactly.
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
from accelerate.utils import InitProcessGroupKwargs
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dual_emc2.data.augment import AugmentConfig
from dual_emc2.data.image_sets import build_image_dataset, dataset_info, dataset_stats
from dual_emc2.data.samplers import GlobalBatchSampler, SeededViews
from dual_emc2.data.spectral import SpectralBatchSampler
from dual_emc2.data.views import MultiViewDataset, UnaugmentedLookup
from dual_emc2.distributed import all_gather_rows
from dual_emc2.losses import GlobalContrastiveLoss
from dual_emc2.objectives import build_objective, options_for
from dual_emc2.towers.temperature import ContrastiveModel
from dual_emc2.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from dual_emc2.train.config import Config, config_to_dict, save_config
from dual_emc2.train.evaluate import eval_loaders, evaluate_features
from dual_emc2.train.models import build_unimodal_model
from dual_emc2.train.optim import build_optimizer, build_scheduler
from dual_emc2.train.run_log import RunLogger, plot_curves


class NonFiniteLossError(RuntimeError):
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
    """Builds everything from a :class:`Config` and runs :meth:`fit`."""

    def __init__(self, cfg: Config, accelerator: Accelerator | None = None) -> None:
        self.cfg = cfg
        self.acc = accelerator or Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.grad_accum,
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=_timedelta(cfg.train.dist_timeout_s))],
        )
        self.device = self.acc.device
        self.out = Path(cfg.output_dir)
        seed_everything(cfg.seed)
        self._build_data()
        self._build_model()
        self.pos = Position()
        self.nonfinite_streak = 0
        self.nonfinite_total = 0
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------------------------------------ building
    def _build_data(self) -> None:
        cfg, d = self.cfg, self.cfg.data
        base = build_image_dataset(d.name, d.train_split, root=d.root, download=d.download)
        mean, std = dataset_stats(d.name)
        aug = AugmentConfig(size=d.image_size, crop_scale=(d.augment.crop_scale_min, 1.0),
                            jitter_strength=d.augment.jitter_strength, grayscale_p=d.augment.grayscale_p,
                            blur=d.augment.blur, flip=d.augment.flip, eval_resize=_eval_resize(d.name, d.image_size))
        n = None if d.subset is None else min(d.subset, len(base))
        simclr = aug.simclr(mean, std, grey_input=dataset_info(d.name).grayscale)
        self.train_set = SeededViews(MultiViewDataset(base, simclr, d.n_views, first_n=n, on_error=d.on_bad_sample),
                                     cfg.seed)
        self.lookup = UnaugmentedLookup(base, aug.eval(mean, std), first_n=n)
        self.sampler = self._build_batch_sampler(len(self.train_set))
        self.loader = DataLoader(self.train_set, batch_sampler=self.sampler, num_workers=d.num_workers,
                                 pin_memory=self.device.type == "cuda", persistent_workers=False)
        self.micro_per_epoch = self.sampler.batches_per_epoch()
        if self.micro_per_epoch < cfg.train.grad_accum:
            raise ValueError(f"an epoch has {self.micro_per_epoch} batches, fewer than train.grad_accum="
                             f"{cfg.train.grad_accum}")
        self.steps_per_epoch = self.micro_per_epoch // cfg.train.grad_accum
        self.micro_used = self.steps_per_epoch * cfg.train.grad_accum  # whole accumulation groups per epoch
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch

    def _build_batch_sampler(self, num_samples: int) -> GlobalBatchSampler:
        """``data.batch_sampler``: the uniform reshuffle, or the spectral high-loss batches of Cho et al.."""
        cfg = self.cfg
        common = dict(world_size=self.acc.num_processes, rank=self.acc.process_index, seed=cfg.seed)
        if cfg.data.batch_sampler == "spectral":
            s = cfg.data.spectral
            return SpectralBatchSampler(num_samples, cfg.train.batch_size, **common, refresh_every=s.refresh_every,
                                        num_clusters=s.num_clusters, beta=s.beta or 1.0, n_components=s.n_components,
                                        n_neighbors=s.n_neighbors, dense_max=s.dense_max, n_init=s.n_init)
        return GlobalBatchSampler(num_samples, cfg.train.batch_size, **common)

    def _build_model(self) -> None:
        cfg, m = self.cfg, self.cfg.model
        model = build_unimodal_model(cfg)
        if m.sync_bn and self.acc.num_processes > 1 and self.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.objective = build_objective(
            cfg.objective.name, num_keys=len(self.train_set) * cfg.data.n_views,
            num_candidates=len(self.train_set),
            options=options_for(cfg.objective.name, cfg.objective.options),
            defaults={"dim": m.proj_dim, "seed": cfg.seed},
        ).to(self.device)
        global_views = cfg.train.batch_size * self.acc.num_processes * cfg.data.n_views
        self.objective.check_batch_shape(global_views - cfg.data.n_views)
        # the public loss around the estimator: the trainer and a user's own loop run the same code
        self.loss_fn = GlobalContrastiveLoss.wrap(self.objective, "unimodal", len(self.train_set),
                                                  views_per_sample=cfg.data.n_views)
        self._prepare_optimisation(model)

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
    def core(self) -> ContrastiveModel:
        return self.acc.unwrap_model(self.model)

    def encode_candidates(self, ids: Tensor) -> Tensor:
        """ψ of un-augmented samples by global id, under the caller's grad mode; batch-norm in eval mode (the ids
        are few and not a batch)."""
        x = self.lookup(ids.cpu()).to(self.device)
        if self.cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._forward_in_eval_mode(self.core.encoder, x)

    def _forward_in_eval_mode(self, module: torch.nn.Module, inputs: Any) -> Tensor:
        """``module(inputs)`` in float32 under autocast with norm layers and dropout in eval mode (the inputs are
        samples looked up by id, not a batch), the training mode restored after; the caller's grad mode applies."""
        was = module.training
        module.eval()
        try:
            with self.acc.autocast():
                return module(inputs).float()
        finally:
            module.train(was)

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
    def train_step(self, ids: Tensor, views: Tensor, labels: Tensor | None = None
                   ) -> tuple[Tensor, dict[str, Tensor]] | None:
        """One micro-batch: forward, estimator, backward and (at accumulation boundaries) the optimiser step.
        ``labels`` [b]: class labels for supervised estimators (``needs_labels``).  Returns None when the loss was
        not finite and the step was skipped."""
        b, V = views.shape[:2]
        x = views.flatten(0, 1).to(self.device, non_blocking=True)
        if self.cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ids = ids.to(self.device)
        enc = self.encode_candidates if self.objective.needs_candidate_encoder else None
        with self.acc.accumulate(self.model):
            with self.acc.autocast():
                z = self.model(x)
            beta = self.core.temperature()
            loss = self.loss_fn.forward_views(
                z.float().view(b, V, -1), ids, beta, enc,
                labels=labels.to(self.device) if labels is not None and self.objective.needs_labels else None)
            if not self._apply(loss):
                return None
        stats = dict(self.loss_fn.last_stats)  # estimator diagnostics, the loss, eq. (1) on the batch
        stats["beta"] = beta.detach()
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

    # Hooks of the training loop that differ between data layouts (the bimodal trainer overrides them).
    throughput_key = "views_per_s"

    def _start_epoch(self) -> None:
        """Position the sampler and the per-sample augmentation seeds at the current epoch and batch."""
        self.sampler.set_epoch(self.pos.epoch, start_batch=self.pos.batch_in_epoch)
        self.train_set.set_epoch(self.pos.epoch)

    def _step_inputs(self, item: Any) -> tuple[Any, ...]:
        """Arguments of :meth:`train_step` from one loader item (``(ids, views, labels)`` here); the labels only for
        supervised estimators."""
        ids, views, labels = item
        if self.objective.needs_labels:
            return ids, views, torch.as_tensor(labels).long()
        return ids, views

    def _samples_in(self, inputs: tuple[Any, ...]) -> int:
        """Number of encoded inputs of one micro-batch on this process (for the throughput log)."""
        views = inputs[1]
        return views.shape[0] * views.shape[1]

    def _spectral_embeddings(self, positions: Tensor) -> tuple[Tensor, Tensor | None]:
        """Anchor and candidate embeddings (u, v; v None when φ = ψ) of the training samples at sampler positions
        ``positions``, for the spectral batch sampler (no grad, eval mode)."""
        return self.encode_candidates(positions), None  # the encoder's z is unit-norm already

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
            u, v = self._spectral_embeddings(chunk)
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

    def evaluate(self) -> dict[str, float]:
        cfg = self.cfg
        if not hasattr(self, "_eval_loaders"):
            self._eval_loaders = eval_loaders(
                cfg.data.name, cfg.data.root, cfg.data.eval_train_split, cfg.data.eval_test_split,
                cfg.data.image_size, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers,
                max_train=cfg.eval.max_train, max_test=cfg.eval.max_test, download=cfg.data.download)
        tr, te = self._eval_loaders
        return evaluate_features(self.core.encoder.features, tr, te, self.device, probe_epochs=cfg.eval.probe_epochs,
                                 knn_k=cfg.eval.knn_k, seed=cfg.seed, geometry=cfg.eval.geometry,
                                 spectrum_png=self.out / "plots" / "spectrum.png" if cfg.eval.geometry else None)

    def _maybe_eval(self, epoch_done: int, logger: RunLogger | None, final: bool) -> dict[str, float] | None:
        e = self.cfg.eval
        if not e.enabled or not (final or epoch_done % e.every_epochs == 0):
            return None
        metrics = None
        if self.acc.is_main_process:
            metrics = self.evaluate()
            metrics = {"epoch": float(epoch_done), **metrics}
            if not self.history or self.history[-1].get("step") != self.pos.step:
                self.history.append({"step": float(self.pos.step), **metrics})
            if logger is not None:
                logger.log(self.pos.step, metrics, group="eval")
            self.acc.print(f"[eval] step {self.pos.step} epoch {epoch_done}: " +
                           ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "epoch"))
        self.acc.wait_for_everyone()
        return metrics

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
        last_eval = None
        try:
            last_eval = self._loop(logger, bar)
        finally:
            bar.close()
            if logger is not None:
                logger.close()
        final = last_eval or {}
        if self.acc.is_main_process:
            plots = plot_curves(self.out / "metrics.csv", self.out / "plots")
            final = {"step": self.pos.step, **(self.history[-1] if self.history else {}),
                     "nonfinite_skipped": self.nonfinite_total, "bad_samples_skipped": self.train_set.bad_samples}
            (self.out / "final_metrics.json").write_text(json.dumps(final, indent=2))
            self.acc.print(f"[done] {self.out}: checkpoint {self.out / 'checkpoints'}, plots "
                           f"{', '.join(p.name for p in plots)}; " +
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
            self._start_epoch()
            self.model.train()
            for item in self.loader:
                if self.pos.batch_in_epoch >= self.micro_used or self._refresh_due():
                    break
                inputs = self._step_inputs(item)
                result = self.train_step(*inputs)
                self.pos.batch_in_epoch += 1
                seen += self._samples_in(inputs) * self.acc.num_processes
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
                    values[self.throughput_key] = seen / max(dt, 1e-9)
                    values["bad_samples"] = float(self.train_set.bad_samples)
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


def _eval_resize(name: str, size: int) -> int | None:
    r = dataset_info(name).eval_resize
    return r if r is not None and r >= size else None


def _timedelta(seconds: float):
    from datetime import timedelta

    return timedelta(seconds=seconds)
