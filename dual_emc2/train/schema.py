"""Typed configuration schema of a training run: the dataclasses that a YAML config mirrors, their defaults and field
constraints, and which keys each ``mode`` reads.  Loading, overrides and validation: :mod:`dual_emc2.train.config`.

Choice tuples come from the modules that implement the choices (torch-free modules, so that importing the schema
stays cheap): the backbones and towers from :mod:`dual_emc2.towers.names`, the schedules from
:mod:`dual_emc2.train.schedules`, the state layouts from :mod:`dual_emc2.loss.state.layout`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dual_emc2.loss.state.layout import SHARDING_MODES
from dual_emc2.towers.names import IMAGE_ARCHS, NORMS, PRETRAINED_TOWERS, TOWER_KINDS
from dual_emc2.train.schedules import SCHEDULES

__all__ = [
    "ARCH_CHOICES",
    "BATCH_SAMPLER_CHOICES",
    "MIXED_PRECISION_CHOICES",
    "MODE_CHOICES",
    "NORM_CHOICES",
    "PAIR_SOURCE_CHOICES",
    "PRETRAINED_TOWER_CHOICES",
    "SCHEDULE_CHOICES",
    "STATE_SHARDING_CHOICES",
    "STATE_VIEW_CHOICES",
    "TOWER_KIND_CHOICES",
    "AugmentConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "LossConfig",
    "OptimConfig",
    "PairsConfig",
    "SpectralConfig",
    "TowersConfig",
    "TrainConfig",
]

ARCH_CHOICES = IMAGE_ARCHS
NORM_CHOICES = NORMS
TOWER_KIND_CHOICES = TOWER_KINDS
PRETRAINED_TOWER_CHOICES = PRETRAINED_TOWERS
SCHEDULE_CHOICES = SCHEDULES
STATE_SHARDING_CHOICES = SHARDING_MODES
STATE_VIEW_CHOICES = ("exact", "unaugmented")  # how the trainer encodes EMC²'s chain states (LossConfig)
# no torch-free implementing module holds these as a tuple: listed here
MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16")  # Accelerate's mixed_precision
MODE_CHOICES = ("unimodal", "bimodal")  # the two trainers of dual_emc2.train
PAIR_SOURCE_CHOICES = ("wordnet", "emoji", "shards", "file")  # the branches of read_pair_source
# uniform reshuffle each epoch, or the spectral high-loss batches of Cho et al.
BATCH_SAMPLER_CHOICES = ("shuffle", "spectral")


def _check(*, choices: Sequence[str] | None = None, gt: float | None = None, ge: float | None = None,
           le: float | None = None, item_ge: int | None = None, mode: str | None = None) -> dict[str, Any]:
    """Field metadata: constraints checked after the type (None values skip them), and ``mode``, the only
    ``Config.mode`` that reads the key (None: every mode); another mode rejects it at a non-default value."""
    return {"choices": choices, "gt": gt, "ge": ge, "le": le, "item_ge": item_ge, "mode": mode}


_UNI, _BI = MODE_CHOICES


@dataclass
class AugmentConfig:
    """SimCLR-style view augmentation (random resized crop, flip, colour jitter, grayscale, blur): ``data.augment``;
    the trainer turns it into a :class:`dual_emc2.data.augment.AugmentConfig` with the crop scale (min, 1).

    Example (YAML)::

        data:
          augment: {crop_scale_min: 0.08, jitter_strength: 0.5, grayscale_p: 0.2, blur: true, flip: true}
    """

    crop_scale_min: float = field(default=0.08, metadata=_check(gt=0.0, le=1.0))
    jitter_strength: float = field(default=0.5, metadata=_check(ge=0.0))
    grayscale_p: float = field(default=0.2, metadata=_check(ge=0.0, le=1.0))
    blur: bool | None = None  # None: the dataset's default (on for large images)
    flip: bool = True


@dataclass
class SpectralConfig:
    """High-loss batches by spectral clustering of the similarity graph (Cho et al., "Mini-Batch Optimization of
    Contrastive Loss"; dual_emc2.data.spectral), used when ``data.batch_sampler: spectral``.  ``refresh_every``:
    optimiser steps between re-clusterings of the embeddings of every training sample; ``num_clusters`` null: one
    global batch per cluster; ``beta`` null: the model's current β.  The other keys are those of
    :class:`~dual_emc2.data.spectral.SpectralBatchSampler`.

    Example (YAML)::

        data:
          batch_sampler: spectral
          spectral: {refresh_every: 200, beta: 5.0, n_neighbors: 30}
    """

    refresh_every: int = field(default=100, metadata=_check(ge=1))
    num_clusters: int | None = field(default=None, metadata=_check(ge=1))
    beta: float | None = field(default=None, metadata=_check(gt=0.0))
    n_components: int | None = field(default=None, metadata=_check(ge=1))
    n_neighbors: int = field(default=30, metadata=_check(ge=1))
    dense_max: int = field(default=4096, metadata=_check(ge=1))
    n_init: int = field(default=1, metadata=_check(ge=1))


@dataclass
class DataConfig:
    """Dataset, splits and loader settings.  ``mode: bimodal`` reads only the loader settings (``image_size``,
    ``num_workers``, ``on_bad_sample``, ``batch_sampler``, ``spectral``); its data are ``pairs``.

    ``subset``: train on the first n images only; ``on_bad_sample: skip`` drops unreadable samples and counts them.

    Example (YAML)::

        data:
          name: stl10
          root: data/stl10
          train_split: unlabeled
          image_size: 96
          n_views: 2
          num_workers: 8
    """

    name: str = field(default="fashion_mnist", metadata=_check(mode=_UNI))
    root: str | None = field(default=None, metadata=_check(mode=_UNI))
    download: bool = field(default=False, metadata=_check(mode=_UNI))
    train_split: str = field(default="train", metadata=_check(mode=_UNI))
    eval_train_split: str = field(default="train", metadata=_check(mode=_UNI))
    eval_test_split: str = field(default="test", metadata=_check(mode=_UNI))
    image_size: int = field(default=28, metadata=_check(gt=0))
    n_views: int = field(default=2, metadata=_check(ge=1, mode=_UNI))
    num_workers: int = field(default=2, metadata=_check(ge=0))
    on_bad_sample: str = field(default="raise", metadata=_check(choices=("raise", "skip")))  # unreadable files
    subset: int | None = field(default=None, metadata=_check(gt=0, mode=_UNI))
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata=_check(mode=_UNI))
    batch_sampler: str = field(default="shuffle", metadata=_check(choices=BATCH_SAMPLER_CHOICES))
    spectral: SpectralConfig = field(default_factory=SpectralConfig)


@dataclass
class ModelConfig:
    """Backbone and projection head of ``mode: unimodal`` (:func:`dual_emc2.towers.heads.build_image_encoder`):
    ``arch`` a ResNet or ``small_cnn``, ``cifar_stem`` the small-image stem, the projector ``proj_layers`` deep with
    ``proj_hidden`` hidden units to ``proj_dim``.

    Example (YAML)::

        model: {arch: resnet18, cifar_stem: false, proj_hidden: 512, proj_dim: 512, channels_last: true}
    """

    arch: str = field(default="resnet18", metadata=_check(choices=ARCH_CHOICES))  # a ResNet or "small_cnn"
    cifar_stem: bool = True
    proj_hidden: int = field(default=512, metadata=_check(gt=0))
    proj_dim: int = field(default=128, metadata=_check(gt=0))
    proj_layers: int = field(default=2, metadata=_check(ge=0))
    channels_last: bool = False
    norm: str = field(default="batch", metadata=_check(choices=NORM_CHOICES))  # backbone normalisation
    head_batch_norm: bool = True
    sync_bn: bool = True  # convert batch norm to SyncBatchNorm when several CUDA processes train


@dataclass
class PairsConfig:
    """Paired data (x, y) of ``mode: bimodal``; every pair keeps a stable global index (dual_emc2.data.pairs).

    ``source``: ``wordnet`` (lemma list or example ↔ definition, Debian wordnet-base), ``emoji`` (image ↔ caption,
    scripts/fetch_emoji.sh), ``shards`` (webdataset tar shards of scripts/make_shards.py) or ``file`` (CSV/TSV/JSONL
    text pairs, columns ``x_key``/``y_key``/``id_key``).  ``path``: the WordNet dict folder, emoji folder, shard
    folder/pattern or pairs file (null: the offline default).  The held-out split is ``eval_size`` pairs drawn with
    ``split_seed`` (``eval_path``: a separate held-out set instead); ``train_size`` caps the training pairs.

    Example (YAML)::

        pairs: {source: file, path: data/pairs.tsv, x_key: query, y_key: document, eval_size: 1000}
    """

    source: str = field(default="wordnet", metadata=_check(choices=PAIR_SOURCE_CHOICES))
    path: str | None = None
    eval_path: str | None = None
    x_key: str = "x"
    y_key: str = "y"
    id_key: str | None = None
    wordnet_pos: list[str] = field(default_factory=lambda: ["noun"])
    # dual_emc2.data.offline_sets.WORDNET_KINDS (dual_emc2.data imports torch)
    wordnet_x: str = field(default="lemmas", metadata=_check(choices=("lemmas", "examples")))
    eval_size: int = field(default=0, metadata=_check(ge=0))
    train_size: int | None = field(default=None, metadata=_check(gt=0))
    split_seed: int = 0
    mask_duplicates: bool = True  # identical x or y texts/images of other pairs are not negatives
    streaming: bool = False  # shards: streamed in seeded passes (dual_emc2.data.shards) instead of loaded
    shuffle_buffer: int = field(default=1000, metadata=_check(ge=0))
    augment_images: bool = False  # mild random resized crop + flip on image sides


@dataclass
class TowersConfig:
    """Two towers of ``mode: bimodal`` (dual_emc2.towers.two_tower): pretrained backbones by name with projections
    to ``proj_dim`` (null: none), or an open_clip model by config name (or model-config JSON path), random or from a
    checkpoint file.  The keys are the arguments of :func:`~dual_emc2.towers.two_tower.build_two_tower`.

    Example (YAML)::

        towers: {kind: pretrained, x: efficientnet_lite0, y: minilm, proj_dim: 256, freeze_y: true}
    """

    kind: str = field(default="pretrained", metadata=_check(choices=TOWER_KIND_CHOICES))
    x: str = field(default="minilm", metadata=_check(choices=PRETRAINED_TOWER_CHOICES))
    y: str = field(default="minilm", metadata=_check(choices=PRETRAINED_TOWER_CHOICES))
    shared: bool = False  # φ = ψ: one tower for both sides (needs x == y)
    proj_dim: int | None = field(default=256, metadata=_check(gt=0))
    freeze_x: bool = False  # freeze the x backbone (its projection still trains)
    freeze_y: bool = False
    max_length: int = field(default=32, metadata=_check(ge=2))  # text tokens
    open_clip_model: str = "RN50"
    open_clip_checkpoint: str | None = None


@dataclass
class LossConfig:
    """The global contrastive loss (what :class:`~dual_emc2.loss.GlobalContrastiveLoss` takes): ``estimator``, the
    estimator of its gradient (registry name), β (``beta``, learnable or not), and the estimators' ``options`` (one
    mapping per estimator name), validated by the estimator registry. ``state_sharding``: whether every process holds
    the whole per-anchor state (EMC² chains, SogCLR's u) or the rows of its 1/W of the keys; ``auto`` shards tables of
    256 MiB and more (:mod:`dual_emc2.loss.state.layout`). Results are identical either way; a resumed run may change
    it. ``state_views``: how EMC²'s chain states reach the estimator: ``exact`` (the augmented view the chain accepted,
    regenerated in the loader's workers and encoded in the batch's own forward pass, train mode) or ``unaugmented`` (the
    un-augmented sample re-encoded by id with norm layers and dropout in eval mode, a second forward: the earlier
    behaviour, kept to measure the difference).

    Example (YAML)::

        loss:
          estimator: emc2
          beta: 14.28
          options:
            emc2: {reencode_fraction: 0.5}
            sogclr: {gamma: 0.9}
    """

    estimator: str = "emc2"
    beta: float = field(default=14.28, metadata=_check(gt=0.0))
    learnable_beta: bool = False
    options: dict = field(default_factory=dict)
    state_sharding: str = field(default="auto", metadata=_check(choices=STATE_SHARDING_CHOICES))
    state_views: str = field(default="exact", metadata=_check(choices=STATE_VIEW_CHOICES))


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule: ``name`` ``adam``, ``adamw``, ``sgd`` or ``lars``
    (:mod:`dual_emc2.train.optim`; ``momentum`` for the last two), ``warmup_epochs`` of linear warm-up, then
    ``schedule`` (:class:`~dual_emc2.train.schedules.WarmupSchedule`) down to ``min_lr_ratio · lr``.

    Example (YAML)::

        optim: {name: adamw, lr: 1.0e-4, weight_decay: 0.01, warmup_epochs: 0.5, schedule: cosine}
    """

    name: str = "adam"
    lr: float = field(default=1e-3, metadata=_check(gt=0.0))
    weight_decay: float = field(default=1e-4, metadata=_check(ge=0.0))
    momentum: float = field(default=0.9, metadata=_check(ge=0.0))
    exclude_bias_and_norm: bool = True
    warmup_epochs: float = field(default=0.0, metadata=_check(ge=0.0))
    schedule: str = field(default="cosine", metadata=_check(choices=SCHEDULE_CHOICES))
    min_lr_ratio: float = field(default=0.0, metadata=_check(ge=0.0, le=1.0))


@dataclass
class TrainConfig:
    """Loop length, precision, logging and checkpointing; ``batch_size`` is per process.  ``max_steps`` (optimiser
    steps) overrides ``epochs``; ``max_nonfinite`` non-finite losses in a row stop the run.

    Example (YAML)::

        train: {batch_size: 32, epochs: 100, mixed_precision: bf16, ckpt_every: 2000, resume: latest}
    """

    batch_size: int = field(default=32, metadata=_check(gt=0))
    epochs: int = field(default=1, metadata=_check(gt=0))
    max_steps: int | None = field(default=None, metadata=_check(gt=0))
    grad_accum: int = field(default=1, metadata=_check(ge=1))
    mixed_precision: str = field(default="no", metadata=_check(choices=MIXED_PRECISION_CHOICES))
    log_every: int = field(default=10, metadata=_check(ge=1))
    ckpt_every: int = field(default=500, metadata=_check(ge=1))
    keep_last: int = field(default=3, metadata=_check(ge=1))
    resume: str | None = None  # "latest" or a checkpoint path
    # a resume may apply changed optim.*, loss.options.*, mixed_precision, compile (dual_emc2.train.run_folder)
    allow_changes: bool = False
    max_nonfinite: int = field(default=5, metadata=_check(ge=0))
    compile: bool = False
    plots: bool = True  # PNGs of the logged curves under <output_dir>/plots after training
    # collective timeout: a dead rank stops the job
    dist_timeout_s: float = field(default=600.0, metadata=_check(gt=0.0))


@dataclass
class EvalConfig:
    """Evaluation: frozen-feature linear probe and k-NN (``mode: unimodal``), or retrieval on the held-out pairs
    (``mode: bimodal``, which reads only ``enabled``, ``every_epochs`` and ``batch_size``).

    Example (YAML)::

        eval: {every_epochs: 5, batch_size: 512, probe_epochs: 100, knn_k: [1, 20]}
    """

    every_epochs: int = field(default=1, metadata=_check(ge=1))
    batch_size: int = field(default=256, metadata=_check(gt=0))
    probe_epochs: int = field(default=100, metadata=_check(ge=0, mode=_UNI))
    knn_k: list[int] = field(default_factory=lambda: [1, 20], metadata=_check(item_ge=1, mode=_UNI))
    enabled: bool = True
    at_start: bool = True  # also evaluate the network before training (step 0), in the same run
    max_train: int | None = field(default=None, metadata=_check(gt=0, mode=_UNI))
    max_test: int | None = field(default=None, metadata=_check(gt=0, mode=_UNI))
    # effective rank, NC1, ETF distance, uniformity of the test features, spectrum PNG
    geometry: bool = field(default=True, metadata=_check(mode=_UNI))


@dataclass
class Config:
    """A whole training run.  Sections and keys that only one mode reads carry ``mode`` in their field metadata.

    Build it with :func:`dual_emc2.train.config.load_config` (a YAML file with optional ``base:`` inheritance, plus
    ``key.sub=value`` overrides), which checks every key and value.

    Example::

        cfg = load_config("configs/fmnist_unimodal.yaml", ["loss.estimator=sogclr", "train.batch_size=64"])
        cfg.mode, cfg.loss.estimator, cfg.train.batch_size      # ("unimodal", "sogclr", 64)
    """

    seed: int = 0
    output_dir: str = "runs/default"
    mode: str = field(default="unimodal", metadata=_check(choices=MODE_CHOICES))  # unimodal: φ = ψ on images
    data: DataConfig = field(default_factory=DataConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig, metadata=_check(mode=_BI))
    model: ModelConfig = field(default_factory=ModelConfig, metadata=_check(mode=_UNI))
    towers: TowersConfig = field(default_factory=TowersConfig, metadata=_check(mode=_BI))
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
