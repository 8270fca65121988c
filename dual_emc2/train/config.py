"""Typed configuration schema of a training run, loaded from YAML with ``key.sub=value`` command-line overrides.

A YAML file mirrors :class:`Config`; every key is optional (defaults below).  A file may say ``base: other.yaml``
(a path relative to the file's own folder) to inherit another file and override some of its keys; mappings merge
recursively, every other value replaces the inherited one.  Values are parsed with a YAML 1.2 float rule, so ``1e-3``
is the float 0.001 (PyYAML's YAML 1.1 resolver would read it as a string) and only true/false are booleans
(``mixed_precision: no`` is the string "no").

Every error names the full dotted key and what was expected, e.g.
``unknown config key 'optim.learning_rate' (did you mean 'optim.lr'?)`` or
``train.batch_size: expected int, got str 'abc'``.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

__all__ = [
    "AugmentConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "PairsConfig",
    "TowersConfig",
    "SpectralConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "load_yaml",
    "save_config",
]

MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16")
SCHEDULE_CHOICES = ("cosine", "constant")  # the schedules dual_emc2.train.optim implements
MODE_CHOICES = ("unimodal", "bimodal")
TOWER_KIND_CHOICES = ("pretrained", "open_clip")  # dual_emc2.towers.two_tower.TOWER_KINDS
PRETRAINED_TOWER_CHOICES = ("minilm", "efficientnet_lite0")  # dual_emc2.towers.two_tower.PRETRAINED_TOWERS
PAIR_SOURCE_CHOICES = ("wordnet", "emoji", "shards", "file")
ARCH_CHOICES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "small_cnn")  # towers.heads.IMAGE_ARCHS
# uniform reshuffle each epoch, or the spectral high-loss batches of Cho et al.
BATCH_SAMPLER_CHOICES = ("shuffle", "spectral")


class ConfigError(ValueError):
    """An invalid configuration file, key, value or override; the message names the dotted key (and file)."""


def _check(*, choices: Sequence[str] | None = None, gt: float | None = None, ge: float | None = None,
           le: float | None = None, item_ge: int | None = None) -> dict[str, Any]:
    """Field metadata: constraints checked after the type (None values skip them)."""
    return {"choices": choices, "gt": gt, "ge": ge, "le": le, "item_ge": item_ge}


@dataclass
class AugmentConfig:
    """SimCLR-style view augmentation (random resized crop, flip, colour jitter, grayscale, blur)."""

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
    global batch per cluster; ``beta`` null: the model's current β."""

    refresh_every: int = field(default=100, metadata=_check(ge=1))
    num_clusters: int | None = field(default=None, metadata=_check(ge=1))
    beta: float | None = field(default=None, metadata=_check(gt=0.0))
    n_components: int | None = field(default=None, metadata=_check(ge=1))
    n_neighbors: int = field(default=30, metadata=_check(ge=1))
    dense_max: int = field(default=4096, metadata=_check(ge=1))
    n_init: int = field(default=1, metadata=_check(ge=1))


@dataclass
class DataConfig:
    """Dataset, splits and loader settings."""

    name: str = "fashion_mnist"
    root: str | None = None
    download: bool = False
    train_split: str = "train"
    eval_train_split: str = "train"
    eval_test_split: str = "test"
    image_size: int = field(default=28, metadata=_check(gt=0))
    n_views: int = field(default=2, metadata=_check(ge=1))
    num_workers: int = field(default=2, metadata=_check(ge=0))
    on_bad_sample: str = field(default="raise", metadata=_check(choices=("raise", "skip")))  # unreadable files
    subset: int | None = field(default=None, metadata=_check(gt=0))
    eval_subset: int | None = field(default=None, metadata=_check(gt=0))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    batch_sampler: str = field(default="shuffle", metadata=_check(choices=BATCH_SAMPLER_CHOICES))
    spectral: SpectralConfig = field(default_factory=SpectralConfig)


@dataclass
class ModelConfig:
    """Backbone and projection head."""

    arch: str = field(default="resnet18", metadata=_check(choices=ARCH_CHOICES))  # a ResNet or "small_cnn"
    cifar_stem: bool = True
    proj_hidden: int = field(default=512, metadata=_check(gt=0))
    proj_dim: int = field(default=128, metadata=_check(gt=0))
    proj_layers: int = field(default=2, metadata=_check(ge=0))
    channels_last: bool = False
    norm: str = field(default="batch", metadata=_check(choices=("batch", "group")))  # backbone normalisation
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
    """

    source: str = field(default="wordnet", metadata=_check(choices=PAIR_SOURCE_CHOICES))
    path: str | None = None
    eval_path: str | None = None
    x_key: str = "x"
    y_key: str = "y"
    id_key: str | None = None
    wordnet_pos: list[str] = field(default_factory=lambda: ["noun"])
    wordnet_x: str = field(default="lemmas", metadata=_check(choices=("lemmas", "examples")))
    eval_size: int = field(default=0, metadata=_check(ge=0))
    train_size: int | None = field(default=None, metadata=_check(gt=0))
    split_seed: int = 0
    mask_duplicates: bool = True  # identical x or y texts/images of other pairs are not negatives
    streaming: bool = False  # shards: resampled webdataset streaming instead of loading every pair
    shuffle_buffer: int = field(default=1000, metadata=_check(ge=0))
    augment_images: bool = False  # mild random resized crop + flip on image sides


@dataclass
class TowersConfig:
    """Two towers of ``mode: bimodal`` (dual_emc2.towers.two_tower): pretrained backbones by name with projections
    to ``proj_dim`` (null: none), or an open_clip model by config name (or model-config JSON path), random or from a
    checkpoint file."""

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
class ObjectiveConfig:
    """Estimator of the global contrastive loss; ``options`` are validated by the estimator registry."""

    name: str = "emc2"
    beta: float = field(default=14.28, metadata=_check(gt=0.0))
    learnable_beta: bool = False
    options: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule."""

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
    """Loop length, precision, logging and checkpointing; ``batch_size`` is per process."""

    batch_size: int = field(default=32, metadata=_check(gt=0))
    epochs: int = field(default=1, metadata=_check(gt=0))
    max_steps: int | None = field(default=None, metadata=_check(gt=0))
    grad_accum: int = field(default=1, metadata=_check(ge=1))
    mixed_precision: str = field(default="no", metadata=_check(choices=MIXED_PRECISION_CHOICES))
    log_every: int = field(default=10, metadata=_check(ge=1))
    ckpt_every: int = field(default=500, metadata=_check(ge=1))
    keep_last: int = field(default=3, metadata=_check(ge=1))
    resume: str | None = None  # "latest" or a checkpoint path
    max_nonfinite: int = field(default=5, metadata=_check(ge=0))
    compile: bool = False
    # collective timeout: a dead rank stops the job
    dist_timeout_s: float = field(default=600.0, metadata=_check(gt=0.0))


@dataclass
class EvalConfig:
    """Frozen-feature evaluation (linear probe, k-NN)."""

    every_epochs: int = field(default=1, metadata=_check(ge=1))
    batch_size: int = field(default=256, metadata=_check(gt=0))
    probe_epochs: int = field(default=100, metadata=_check(ge=0))
    knn_k: list[int] = field(default_factory=lambda: [1, 20], metadata=_check(item_ge=1))
    enabled: bool = True
    max_train: int | None = field(default=None, metadata=_check(gt=0))
    max_test: int | None = field(default=None, metadata=_check(gt=0))
    geometry: bool = True  # effective rank, NC1, ETF distance, uniformity of the test features, spectrum PNG


@dataclass
class Config:
    """A whole training run."""

    seed: int = 0
    output_dir: str = "runs/default"
    mode: str = field(default="unimodal", metadata=_check(choices=MODE_CHOICES))  # unimodal: φ = ψ on images
    data: DataConfig = field(default_factory=DataConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)  # mode: bimodal
    model: ModelConfig = field(default_factory=ModelConfig)
    towers: TowersConfig = field(default_factory=TowersConfig)  # mode: bimodal
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and floats: ``no``/``yes``/``on`` stay strings (``mixed_precision: no``),
    only true/false are booleans, and ``1e-3``, ``-.5e1`` are floats."""


_BOOL_TAG, _FLOAT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from exc


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read one YAML config file into a plain dict, resolving ``base:`` inheritance (no schema validation)."""
    return _load_tree(Path(path), ())


def _load_tree(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"{path}: circular 'base' inheritance: {cycle}")
    if not path.is_file():
        where = f" (base of {chain[-1]})" if chain else ""
        raise FileNotFoundError(f"config file not found: {path}{where}")
    data = _parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: 'base' must be a path to another YAML file, got {_describe(base)}")
    parent = _load_tree(path.parent / base, (*chain, resolved))
    return _merge(parent, data)


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, any other value of ``over`` replaces ``base``'s."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ----------------------------------------------------------------------------------------------------- overrides

_KEY_RE = re.compile(r"^[^.=\s]+(?:\.[^.=\s]+)*$")


def apply_overrides(cfg_dict: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``cfg_dict`` with each ``a.b.c=value`` override set (value parsed as YAML, ``1e-3`` a float).

    Missing intermediate mappings are created (the schema check reports unknown keys afterwards).
    """
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a sequence of 'key=value' strings, got the single string {overrides!r}")
    out = copy.deepcopy(dict(cfg_dict))
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"bad override {item!r}: expected 'key.sub=value' (e.g. 'optim.lr=1e-3')")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not _KEY_RE.match(key):
            raise ConfigError(f"bad override {item!r}: '{key}' is not a dotted key like 'train.batch_size'")
        value = _parse_yaml(raw, f"override {item!r}")
        parts = key.split(".")
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise ConfigError(f"bad override {item!r}: '{prefix}' is {_describe(child)}, not a mapping")
            node = child
        node[parts[-1]] = value
    return out


# ---------------------------------------------------------------------------------------------------- validation


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(item)}"
    if tp is dict or origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        path = _join(prefix, f.name)
        keys.append(path)
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, path))
    return keys


def _initials(name: str) -> str:
    return "".join(part[0] for part in name.split("_") if part)


def _suggest(key: str, prefix: str, cls: type) -> str | None:
    """Closest valid key: same-section spelling/abbreviation, else the same name in another section."""
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return _join(prefix, close[0])
    lowered = key.lower()
    for name in names:
        if len(name) > 1 and (_initials(lowered) == name or _initials(name) == lowered):
            return _join(prefix, name)
    everywhere = _all_keys(Config)
    same_leaf = [k for k in everywhere if k.rsplit(".", 1)[-1] == key]
    if same_leaf:
        return same_leaf[0]
    close = difflib.get_close_matches(_join(prefix, key), everywhere, n=1, cutoff=0.75)
    return close[0] if close else None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted (and converted) for floats, bools are not."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        for option in others:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                if len(others) == 1 and (dataclasses.is_dataclass(option) or typing.get_origin(option) is list):
                    raise
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"{key}: keys must be strings, got {_describe(bad[0])}")
        return copy.deepcopy(dict(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool (true/false), got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {_describe(value)}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {_describe(value)}")
        return value
    raise TypeError(f"{key}: unsupported annotation {tp!r} in the config schema")


def _constrain(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if value is None or not meta:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    for bound, ok, word in (("gt", lambda v, b: v > b, ">"), ("ge", lambda v, b: v >= b, ">="),
                            ("le", lambda v, b: v <= b, "<=")):
        b = meta.get(bound)
        if b is not None and not ok(value, b):
            raise ConfigError(f"{key}: must be {word} {b}, got {value!r}")
    item_ge = meta.get("item_ge")
    if item_ge is not None:
        for i, v in enumerate(value):
            if v < item_ge:
                raise ConfigError(f"{key}[{i}]: must be >= {item_ge}, got {v!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:  # an empty YAML section ("augment:") keeps the defaults
        data = {}
    if not isinstance(data, Mapping):
        where = prefix or "config"
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} keys, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            full = _join(prefix, str(key))
            hint = _suggest(str(key), prefix, cls)
            suffix = f" (did you mean '{hint}'?)" if hint else ""
            raise ConfigError(f"unknown config key '{full}'{suffix}")
    kwargs = {}
    for name, value in data.items():
        full = _join(prefix, name)
        coerced = _coerce(value, hints[name], full)
        _constrain(coerced, fields[name].metadata, full)
        kwargs[name] = coerced
    return cls(**kwargs)


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Validate a plain dict against the schema and build a :class:`Config` (missing keys take defaults)."""
    return _build(Config, d, "")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of ``cfg`` (YAML-serialisable; ``config_from_dict`` inverts it)."""
    if not isinstance(cfg, Config):
        raise TypeError(f"config_to_dict expects a Config, got {type(cfg).__name__}")
    return dataclasses.asdict(cfg)


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (with its ``base:`` chain; None = all defaults), apply ``key.sub=value`` overrides, validate.

    Errors are prefixed with the file or with "command-line override", whichever the offending value came from.
    """
    data = load_yaml(path) if path is not None else {}
    merged = apply_overrides(data, overrides)
    try:
        return config_from_dict(merged)
    except ConfigError as exc:
        origin = "command-line override"
        if path is not None:
            try:
                config_from_dict(data)
            except ConfigError as file_exc:
                if str(file_exc) == str(exc) or not overrides:
                    origin = str(path)
        raise ConfigError(f"{origin}: {exc}") from None


def save_config(cfg: Config, path: str | os.PathLike[str]) -> Path:
    """Write ``cfg`` as YAML (atomically) so that ``load_config(path) == cfg``; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
