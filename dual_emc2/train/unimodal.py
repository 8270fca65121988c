"""Unimodal task (φ = ψ): V augmented views of each image, one encoder, every view an anchor against every view
(SimCLR's layout; EMC² section 4).

The loss of a micro-batch is :meth:`GlobalContrastiveLoss.forward_views` on the encoder's [b, V, d] features. EMC²'s
chain states are views too: the loader's workers regenerate the view each anchor's chain stands on
(:class:`~dual_emc2.data.state_slots.ImageStateViews`), and the states the step asks for
(:meth:`~dual_emc2.loss.global_loss.GlobalContrastiveLoss.state_request`) go through the encoder in the batch's own
forward pass (``loss.state_views=exact``; ``unaugmented`` re-encodes the un-augmented image by id in eval mode).
Evaluation: linear probe and k-NN on the frozen backbone features (``eval.*``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dual_emc2.data.augment import AugmentConfig
from dual_emc2.data.image_sets import build_image_dataset, dataset_info, dataset_stats
from dual_emc2.data.samplers import SeededViews
from dual_emc2.data.state_slots import ImageStateViews, match_slots
from dual_emc2.data.views import MultiViewDataset, UnaugmentedLookup
from dual_emc2.loss.global_loss import GlobalContrastiveLoss, StateViews
from dual_emc2.loss.registry import build_estimator, options_for
from dual_emc2.train.evaluate import eval_loaders, evaluate_features
from dual_emc2.train.models import build_unimodal_model
from dual_emc2.train.schema import Config
from dual_emc2.train.task import Task, forward_in_eval_mode

__all__ = ["ImageViewsTask"]


class ImageViewsTask(Task):
    """Images of ``data.*`` with ``data.n_views`` SimCLR views each; the model of ``model.*`` unless ``model`` is
    given (an ``nn.Module`` mapping images [n, C, H, W] to unit features [n, d], with ``temperature()`` and, for
    evaluation, ``encoder.features``; see :class:`~dual_emc2.towers.temperature.ContrastiveModel`).

    Args:
        cfg: a ``mode: unimodal`` :class:`~dual_emc2.train.schema.Config`.
        accelerator: the run's ``Accelerator``.
        model: the model to train, or None for ``model.*``'s.

    A loader item is ``(ids [b], views [b, V, C, H, W], labels [b])`` (plus the chain-state slots with
    ``loss.state_views=exact``); :meth:`loss` returns the global contrastive loss of the b·V views and b·V.
    :meth:`evaluate`: linear probe and k-NN on ``encoder.features``.

    Example::

        cfg = load_config("configs/fmnist_unimodal.yaml", ["model.proj_dim=64"])
        acc = build_accelerator(cfg)
        model = ContrastiveModel(my_encoder, InverseTemperature(cfg.loss.beta))   # my_encoder(x) → unit rows [n, d]
        Trainer(cfg, ImageViewsTask(cfg, acc, model=model), acc).fit()
    """

    throughput_key = "views_per_s"

    def __init__(self, cfg: Config, accelerator: Accelerator, model: nn.Module | None = None) -> None:
        super().__init__(cfg, accelerator)
        d = cfg.data
        base = build_image_dataset(d.name, d.train_split, root=d.root, download=d.download)
        mean, std = dataset_stats(d.name)
        aug = AugmentConfig(size=d.image_size, crop_scale=(d.augment.crop_scale_min, 1.0),
                            jitter_strength=d.augment.jitter_strength, grayscale_p=d.augment.grayscale_p,
                            blur=d.augment.blur, flip=d.augment.flip, eval_resize=_eval_resize(d.name, d.image_size))
        n = None if d.subset is None else min(d.subset, len(base))
        simclr = aug.simclr(mean, std, grey_input=dataset_info(d.name).grayscale)
        views = SeededViews(MultiViewDataset(base, simclr, d.n_views, first_n=n, on_error=d.on_bad_sample), cfg.seed)
        num_samples = len(views)
        self.lookup = UnaugmentedLookup(base, aug.eval(mean, std), first_n=n)

        model = build_unimodal_model(cfg) if model is None else model
        if cfg.model.sync_bn and accelerator.num_processes > 1 and self.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.estimator = build_estimator(
            cfg.loss.estimator, num_keys=num_samples * d.n_views, num_candidates=num_samples,
            options=options_for(cfg.loss.estimator, cfg.loss.options),
            defaults={"dim": cfg.model.proj_dim, "seed": cfg.seed}, state_sharding=cfg.loss.state_sharding,
        ).to(self.device)
        global_views = cfg.train.batch_size * accelerator.num_processes * d.n_views
        self.estimator.check_batch_shape(global_views - d.n_views)
        self.loss_fn = GlobalContrastiveLoss.wrap(self.estimator, "unimodal", num_samples, views_per_sample=d.n_views)
        # EMC²'s states as the batch sees them: fetched by the workers, encoded in the batch's forward
        self.exact_states = self.estimator.needs_state_features and cfg.loss.state_views == "exact"
        self.train_set = ImageStateViews(views, d.n_views) if self.exact_states else views
        self.epoch = 0
        self.state_misses = 0  # states the workers' snapshot did not hold, regenerated in this process
        self.sampler = self.batch_sampler(num_samples)
        self.loader = DataLoader(self.train_set, batch_sampler=self.sampler, num_workers=d.num_workers,
                                 pin_memory=self.device.type == "cuda", persistent_workers=False)
        self.batches_per_epoch = self.sampler.batches_per_epoch()
        self._eval_loaders: tuple[DataLoader, DataLoader] | None = None

    def start_epoch(self, epoch: int, batch_in_epoch: int) -> None:
        """The sampler's and the augmentations' epoch, and (exact states) the chains' states for the workers: each
        anchor is visited once per epoch, so its state is fixed until its own step."""
        super().start_epoch(epoch, batch_in_epoch)
        self.epoch = epoch
        if self.exact_states:
            self.train_set.set_states(*self.estimator.state_views())

    def encode_by_id(self, core: nn.Module, ids: Tensor) -> Tensor:
        """ψ of the un-augmented images of global ``ids`` under the caller's grad mode; batch norm in eval mode (the
        ids are few and not a batch): the spectral sampler's embeddings, the negative cache, and EMC²'s states with
        ``loss.state_views=unaugmented``."""
        x = self.lookup(ids.cpu()).to(self.device)
        if self.cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return forward_in_eval_mode(self.acc, core.encoder, x)

    def _state_images(self, need: StateViews, slots: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """The images of the requested state views [n, C, H, W], in request order: from the item's slots, or
        regenerated here when the workers' snapshot did not hold them."""
        keys, epochs, images = slots
        V = self.cfg.data.n_views
        want = need.ids.cpu() * V + need.views.cpu()
        pos = match_slots(want, need.epochs, keys, epochs)
        out = images.flatten(0, 1)[pos.clamp(min=0)]
        missing = (pos < 0).nonzero()[:, 0].tolist()
        for k in missing:
            out[k] = self.train_set.state_view(int(want[k]), int(need.epochs[k]))
        self.state_misses += len(missing)
        return out

    def loss(self, model: nn.Module, item: Any) -> tuple[Tensor, int]:
        ids, views, labels = item[:3]
        b, V = views.shape[:2]
        x = views.flatten(0, 1)
        n_states = 0
        if self.exact_states:  # the states this step needs, through the encoder with the batch (one forward)
            need = self.loss_fn.state_request(ids, epoch=self.epoch).y
            n_states = len(need)
            if n_states:
                x = torch.cat([x, self._state_images(need, item[3])])
        x = x.to(self.device, non_blocking=True)
        if self.cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        core = self.unwrap(model)
        by_id = self.estimator.needs_candidate_encoder or (self.estimator.needs_state_features
                                                           and not self.exact_states)
        encode = (lambda i: self.encode_by_id(core, i)) if by_id else None
        with self.acc.autocast():
            z = model(x)
        z = z.float()
        supervised = torch.as_tensor(labels).long().to(self.device) if self.estimator.needs_labels else None
        loss = self.loss_fn.forward_views(z[:b * V].view(b, V, -1), ids.to(self.device), core.temperature(), encode,
                                          labels=supervised, epoch=self.epoch,
                                          state_features=z[b * V:] if self.exact_states else None)
        if self.exact_states:
            self.loss_fn.last_stats["state_views"] = torch.tensor(float(n_states))
        return loss, b * V

    def spectral_embeddings(self, core: nn.Module, positions: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.encode_by_id(core, positions), None  # the encoder's z is unit-norm already

    def _loaders(self) -> tuple[DataLoader, DataLoader]:
        cfg = self.cfg
        if self._eval_loaders is None:
            self._eval_loaders = eval_loaders(
                cfg.data.name, cfg.data.root, cfg.data.eval_train_split, cfg.data.eval_test_split,
                cfg.data.image_size, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers,
                max_train=cfg.eval.max_train, max_test=cfg.eval.max_test, download=cfg.data.download)
        return self._eval_loaders

    @property
    def eval_description(self) -> str:
        tr, te = self._loaders()
        return f"linear probe + k-NN ({len(tr.dataset):,} train / {len(te.dataset):,} test images)"

    def baselines(self) -> dict[str, dict[str, float]]:
        """The linear probe and k-NN on raw pixels (the flattened, normalised evaluation images)."""
        cfg = self.cfg
        tr, te = self._loaders()
        pixels = evaluate_features(_flatten, tr, te, self.device, probe_epochs=cfg.eval.probe_epochs,
                                   knn_k=cfg.eval.knn_k, seed=cfg.seed)
        return {"raw_pixels": pixels}

    def evaluate(self, core: nn.Module, out_dir: Path) -> dict[str, float]:
        cfg = self.cfg
        tr, te = self._loaders()
        return evaluate_features(core.encoder.features, tr, te, self.device, probe_epochs=cfg.eval.probe_epochs,
                                 knn_k=cfg.eval.knn_k, seed=cfg.seed, geometry=cfg.eval.geometry,
                                 spectrum_png=out_dir / "plots" / "spectrum.png" if cfg.eval.geometry else None)


def _flatten(images: Tensor) -> Tensor:
    return images.flatten(1)


def _eval_resize(name: str, size: int) -> int | None:
    r = dataset_info(name).eval_resize
    return r if r is not None and r >= size else None
