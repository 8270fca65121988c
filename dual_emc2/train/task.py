"""What a data layout adds to the one training loop (:class:`~dual_emc2.train.trainer.Trainer`).

A task holds the model, the estimator wrapped in the public loss, and the data; it computes the loss of one
micro-batch and evaluates.  The trainer owns everything else: optimiser and schedule, Accelerate, checkpoints and
exact resume, logging, the non-finite guard and the spectral re-clustering.  Two tasks ship: multi-view images with
φ = ψ (:class:`~dual_emc2.train.unimodal.ImageViewsTask`) and pairs with two towers
(:class:`~dual_emc2.train.bimodal.PairsTask`); :func:`dual_emc2.train.factory.build_task` builds either from a
config, and a user can hand in their own model to either.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dual_emc2.data.samplers import GlobalBatchSampler
from dual_emc2.data.spectral import SpectralBatchSampler
from dual_emc2.loss.estimators.base import Estimator
from dual_emc2.loss.global_loss import GlobalContrastiveLoss
from dual_emc2.train.schema import Config

__all__ = ["Task", "forward_in_eval_mode"]


def forward_in_eval_mode(accelerator: Accelerator, module: nn.Module, inputs: Any) -> Tensor:
    """``module(inputs)`` in float32 under the accelerator's autocast with norm layers and dropout in eval mode (the
    inputs are samples looked up by id, not a batch), the training mode restored after; the caller's grad mode
    applies."""
    was = module.training
    module.eval()
    try:
        with accelerator.autocast():
            return module(inputs).float()
    finally:
        module.train(was)


class Task(ABC):
    """Model, estimator and data of a run, and the two things that depend on the layout: the loss of a micro-batch
    and the evaluation.

    Attributes set by subclasses: ``model`` (an ``nn.Module`` with ``temperature()`` returning β; the trainer
    prepares it), ``estimator``, ``loss_fn`` (:class:`GlobalContrastiveLoss` around it), ``loader``,
    ``sampler`` (the :class:`GlobalBatchSampler` of the loader, or None for streams), ``batches_per_epoch``
    (micro-batches per epoch on each process) and ``throughput_key`` (the name of the logged rate).

    Args:
        cfg: the run's :class:`~dual_emc2.train.schema.Config`.
        accelerator: the run's Accelerate ``Accelerator`` (:func:`~dual_emc2.train.factory.build_accelerator`).

    Subclasses implement :meth:`loss` (one micro-batch → (loss, inputs encoded)) and :meth:`evaluate`; the trainer
    calls :meth:`start_epoch` before each (resumed) epoch.

    Example::

        cfg = load_config("configs/fmnist_unimodal.yaml")
        acc = build_accelerator(cfg)
        task = build_task(cfg, acc)                       # an ImageViewsTask (cfg.mode: unimodal)
        Trainer(cfg, task, acc).fit()
    """

    model: nn.Module
    estimator: Estimator
    loss_fn: GlobalContrastiveLoss
    loader: DataLoader
    sampler: GlobalBatchSampler | None
    batches_per_epoch: int
    throughput_key: str = "samples_per_s"

    def __init__(self, cfg: Config, accelerator: Accelerator) -> None:
        self.cfg = cfg
        self.acc = accelerator
        self.device = accelerator.device

    def batch_sampler(self, num_samples: int) -> GlobalBatchSampler:
        """``data.batch_sampler``: the uniform reshuffle, or the spectral high-loss batches of Cho et al."""
        cfg = self.cfg
        common = dict(world_size=self.acc.num_processes, rank=self.acc.process_index, seed=cfg.seed)
        if cfg.data.batch_sampler == "spectral":
            s = cfg.data.spectral
            return SpectralBatchSampler(num_samples, cfg.train.batch_size, **common, refresh_every=s.refresh_every,
                                        num_clusters=s.num_clusters, beta=s.beta or 1.0, n_components=s.n_components,
                                        n_neighbors=s.n_neighbors, dense_max=s.dense_max, n_init=s.n_init)
        return GlobalBatchSampler(num_samples, cfg.train.batch_size, **common)

    def start_epoch(self, epoch: int, batch_in_epoch: int) -> None:
        """Position the sampler (and any per-sample augmentation seeds) at ``epoch``, batch ``batch_in_epoch``."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start_batch=batch_in_epoch)
        set_epoch = getattr(self.loader.dataset, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)

    @abstractmethod
    def loss(self, model: nn.Module, item: Any) -> tuple[Tensor, int]:
        """(surrogate loss of one loader item, number of inputs it encoded on this process).  ``model`` is the
        prepared (possibly wrapped) model for the forward; diagnostics are left in ``self.loss_fn.last_stats``."""

    @abstractmethod
    def evaluate(self, core: nn.Module, out_dir: Path) -> dict[str, float]:
        """Metrics of the unwrapped model ``core`` (main process only); files (plots) under ``out_dir``."""

    @property
    def eval_description(self) -> str:
        """What :meth:`evaluate` does, for the progress bar (it can take a while)."""
        return "evaluation"

    def baselines(self) -> dict[str, dict[str, float]]:
        """Metrics of reference features the trained model should beat (name → metrics of :meth:`evaluate`);
        none by default."""
        return {}

    def spectral_embeddings(self, core: nn.Module, positions: Tensor) -> tuple[Tensor, Tensor | None]:
        """(u, v) embeddings of the training samples at sampler ``positions`` for the spectral batch sampler (v None
        when φ = ψ); no grad, eval mode."""
        raise NotImplementedError(f"{type(self).__name__} does not support data.batch_sampler=spectral")

    @property
    def bad_samples(self) -> int:
        """Training samples skipped so far because they could not be read (``data.on_bad_sample=skip``)."""
        return int(getattr(self.loader.dataset, "bad_samples", 0))

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.acc.unwrap_model(model)

