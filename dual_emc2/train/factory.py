"""Factories from a :class:`~dual_emc2.train.config.Config` to the parts of a run: the Accelerate accelerator and the
task (model, estimator, data) of the config's mode.  ``Trainer(cfg)`` uses them; a user composes their own run with
``Trainer(cfg, task=ImageViewsTask(cfg, accelerator, model=my_model), accelerator=accelerator)``."""
from __future__ import annotations

from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch import nn

from dual_emc2.train.schema import Config
from dual_emc2.train.task import Task

__all__ = ["build_accelerator", "build_task"]


def build_accelerator(cfg: Config) -> Accelerator:
    """Mixed precision and gradient accumulation of ``cfg.train``; CPU when no GPU is present; the collective timeout
    ``train.dist_timeout_s`` (a dead process stops the job instead of hanging it)."""
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_timeout_s))],
    )


def build_task(cfg: Config, accelerator: Accelerator, model: nn.Module | None = None) -> Task:
    """The task of ``cfg.mode``: :class:`~dual_emc2.train.unimodal.ImageViewsTask` (``unimodal``) or
    :class:`~dual_emc2.train.bimodal.PairsTask` (``bimodal``), with ``model`` instead of the config's if given."""
    if cfg.mode == "bimodal":
        from dual_emc2.train.bimodal import PairsTask

        return PairsTask(cfg, accelerator, model)
    from dual_emc2.train.unimodal import ImageViewsTask

    return ImageViewsTask(cfg, accelerator, model)
