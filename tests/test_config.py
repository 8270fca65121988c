"""Config schema: YAML round trip, base inheritance, overrides, error messages naming the dotted key, the choices the
implementing modules define, and the keys each mode reads."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from dual_emc2.loss.state.layout import SHARDING_MODES
from dual_emc2.towers.heads import IMAGE_ARCHS, NORMS
from dual_emc2.towers.two_tower import PRETRAINED_TOWERS, TOWER_KINDS
from dual_emc2.train import config as config_module
from dual_emc2.train.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    find_config,
    load_config,
    packaged_configs,
    save_config,
)
from dual_emc2.train.optim import SCHEDULES
from dual_emc2.train.schema import MIXED_PRECISION_CHOICES, Config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _write(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def test_defaults_match_schema():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.loss.beta == 14.28 and cfg.optim.lr == 1e-3 and cfg.eval.knn_k == [1, 20]
    assert cfg.data.augment.blur is None and cfg.train.resume is None and cfg.loss.options == {}


def test_yaml_round_trip(tmp_path):
    src = _write(tmp_path / "run.yaml", """
seed: 7
output_dir: runs/x
data: {name: mnist, subset: 500, augment: {blur: true, crop_scale_min: 0.2}}
model: {arch: resnet50, proj_dim: 64}
loss: {estimator: sogclr, beta: 5, options: {gamma: 0.9, policy: stale, nested: {a: [1, 2]}}}
optim: {name: lars, lr: 1.2, weight_decay: 1e-6, warmup_epochs: 10}
train: {batch_size: 256, epochs: 3, mixed_precision: bf16, resume: latest, max_steps: 100}
eval: {knn_k: [1, 5, 200], max_test: 1000, enabled: false}
""")
    cfg = load_config(src)
    assert cfg.seed == 7 and cfg.data.augment.blur is True and cfg.data.augment.crop_scale_min == 0.2
    assert cfg.loss.beta == 5.0 and isinstance(cfg.loss.beta, float)  # int accepted for float
    assert cfg.optim.weight_decay == pytest.approx(1e-6) and isinstance(cfg.optim.weight_decay, float)
    assert cfg.loss.options == {"gamma": 0.9, "policy": "stale", "nested": {"a": [1, 2]}}
    assert cfg.train.resume == "latest" and cfg.eval.knn_k == [1, 5, 200]

    out = save_config(cfg, tmp_path / "sub" / "saved.yaml")
    again = load_config(out)
    assert again == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    # the saved YAML is plain: a stock safe loader reads back the same dict (no custom tags)
    assert yaml.safe_load(out.read_text()) == config_to_dict(cfg)


def test_base_inheritance_relative_to_file(tmp_path):
    (tmp_path / "common").mkdir()
    _write(tmp_path / "common" / "base.yaml", {"seed": 1, "optim": {"lr": 0.5, "name": "sgd"},
                                                 "loss": {"options": {"a": 1, "b": 2}}})
    _write(tmp_path / "common" / "mid.yaml", {"base": "base.yaml", "train": {"epochs": 4}, "optim": {"lr": 0.25}})
    (tmp_path / "exp").mkdir()
    leaf = _write(tmp_path / "exp" / "leaf.yaml", {"base": "../common/mid.yaml", "loss": {"options": {"b": 3}}})
    cfg = load_config(leaf)
    assert cfg.seed == 1 and cfg.optim.name == "sgd"  # from base
    assert cfg.optim.lr == 0.25 and cfg.train.epochs == 4  # mid overrides base
    assert cfg.loss.options == {"a": 1, "b": 3}  # mappings merge key by key
    assert cfg.train.batch_size == 32  # untouched default


def test_base_cycle_and_missing_base(tmp_path):
    _write(tmp_path / "a.yaml", {"base": "b.yaml"})
    _write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")
    _write(tmp_path / "c.yaml", {"base": "nope.yaml"})
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize(
    "override, getter, expected, typ",
    [
        ("optim.lr=1e-3", lambda c: c.optim.lr, 1e-3, float),
        ("optim.lr=5E-4", lambda c: c.optim.lr, 5e-4, float),
        ("optim.lr=2", lambda c: c.optim.lr, 2.0, float),
        ("loss.beta=-.5e1", None, None, None),  # parses as -5.0: rejected by beta > 0 below
        ("train.batch_size=64", lambda c: c.train.batch_size, 64, int),
        ("model.channels_last=true", lambda c: c.model.channels_last, True, bool),
        ("data.augment.flip=false", lambda c: c.data.augment.flip, False, bool),
        ("data.augment.blur=null", lambda c: c.data.augment.blur, None, type(None)),
        ("train.resume=latest", lambda c: c.train.resume, "latest", str),
        ("eval.knn_k=[1,5]", lambda c: c.eval.knn_k, [1, 5], list),
        ("loss.options.tau=1e-2", lambda c: c.loss.options["tau"], 0.01, float),
        ("loss.options.scan.order=random", lambda c: c.loss.options["scan"]["order"], "random", str),
        ("data.subset=100", lambda c: c.data.subset, 100, int),
        ("seed=3", lambda c: c.seed, 3, int),
    ],
)
def test_overrides_of_nested_keys(override, getter, expected, typ):
    if getter is None:
        with pytest.raises(ConfigError, match=r"loss\.beta: must be > 0.0, got -5\.0"):
            load_config(None, [override])
        return
    cfg = load_config(None, [override])
    value = getter(cfg)
    assert value == expected and type(value) is typ


def test_overrides_apply_on_top_of_file_in_order(tmp_path):
    src = _write(tmp_path / "r.yaml", {"optim": {"lr": 0.1}, "train": {"batch_size": 8}})
    cfg = load_config(src, ["optim.lr=0.2", "train.batch_size=16", "optim.lr=0.3"])
    assert cfg.optim.lr == 0.3 and cfg.train.batch_size == 16
    base = {"optim": {"lr": 0.1}}
    out = apply_overrides(base, ["optim.lr=0.5", "train.epochs=2"])
    assert out == {"optim": {"lr": 0.5}, "train": {"epochs": 2}}
    assert base == {"optim": {"lr": 0.1}}  # input not mutated


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.learning_rate=0.1"])
    assert "unknown config key 'optim.learning_rate' (did you mean 'optim.lr'?)" in str(e.value)
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.batchsize' \(did you mean 'train\.batch_size'"):
        config_from_dict({"train": {"batchsize": 3}})
    with pytest.raises(ConfigError, match=r"unknown config key 'trian' \(did you mean 'train'\?\)"):
        config_from_dict({"trian": {}})
    with pytest.raises(ConfigError, match=r"'train\.lr' \(did you mean 'optim\.lr'\?\)"):
        config_from_dict({"train": {"lr": 0.1}})
    with pytest.raises(ConfigError) as e:
        config_from_dict({"zzzqqq": 1})
    assert "unknown config key 'zzzqqq'" in str(e.value) and "did you mean" not in str(e.value)


def test_unknown_key_in_file_names_the_file(tmp_path):
    src = _write(tmp_path / "bad.yaml", {"data": {"augment": {"blurr": True}}})
    with pytest.raises(ConfigError) as e:
        load_config(src)
    msg = str(e.value)
    assert str(src) in msg and "'data.augment.blurr' (did you mean 'data.augment.blur'?)" in msg


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_size=abc", "train.batch_size: expected int, got str 'abc'"),
        ("train.batch_size=true", "train.batch_size: expected int, got bool True"),
        ("train.batch_size=3.5", "train.batch_size: expected int, got float 3.5"),
        ("optim.lr=fast", "optim.lr: expected float, got str 'fast'"),
        ("optim.lr=true", "optim.lr: expected float, got bool True"),
        ("model.cifar_stem=1", "model.cifar_stem: expected bool (true/false), got int 1"),
        ("data.subset=many", "data.subset: expected int or null, got str 'many'"),
        ("eval.knn_k=[1,x]", "eval.knn_k[1]: expected int, got str 'x'"),
        ("eval.knn_k=5", "eval.knn_k: expected list of int, got int 5"),
        ("loss.options=3", "loss.options: expected a mapping, got int 3"),
        ("data.root=5", "data.root: expected str or null, got int 5"),
        ("train=5", "train: expected a mapping of TrainConfig keys, got int 5"),
    ],
)
def test_wrong_types_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.mixed_precision=fp32", "train.mixed_precision: expected one of 'no', 'bf16', 'fp16', got 'fp32'"),
        ("optim.schedule=exp", "optim.schedule: expected one of"),
        ("train.batch_size=0", "train.batch_size: must be > 0, got 0"),
        ("train.epochs=-1", "train.epochs: must be > 0, got -1"),
        ("optim.lr=0", "optim.lr: must be > 0.0, got 0.0"),
        ("optim.lr=-1e-3", "optim.lr: must be > 0.0, got -0.001"),
        ("eval.knn_k=[0]", "eval.knn_k[0]: must be >= 1, got 0"),
    ],
)
def test_choices_and_bounds(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


IMPLEMENTED = [  # (key, what the implementing module builds, mode) : the config must accept exactly these
    ("model.arch", IMAGE_ARCHS, "unimodal"),
    ("model.norm", NORMS, "unimodal"),
    ("optim.schedule", SCHEDULES, "unimodal"),
    ("train.mixed_precision", MIXED_PRECISION_CHOICES, "unimodal"),
    ("loss.state_sharding", SHARDING_MODES, "bimodal"),  # a state layout of dual_emc2.loss.state.keyed
    ("towers.kind", TOWER_KINDS, "bimodal"),
    ("towers.x", PRETRAINED_TOWERS, "bimodal"),
    ("towers.y", PRETRAINED_TOWERS, "bimodal"),
]


@pytest.mark.parametrize("key, implemented, mode", IMPLEMENTED, ids=[k for k, _, _ in IMPLEMENTED])
def test_every_implemented_choice_is_accepted_and_a_typo_suggests_one(key, implemented, mode):
    section, name = key.split(".")
    for value in implemented:
        cfg = load_config(None, [f"mode={mode}", f"{key}={value}"])
        assert getattr(getattr(cfg, section), name) == value
    typo = implemented[-1][:-1] + "x"  # one character off a real choice
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"mode={mode}", f"{key}={typo}"])
    msg = str(e.value)
    assert f"{key}: expected one of" in msg and f"got {typo!r}" in msg
    assert f"(did you mean {implemented[-1]!r}?)" in msg
    with pytest.raises(ConfigError, match=rf"{key}: expected one of .*got 'zzzz'$"):  # nothing close: no hint
        load_config(None, [f"mode={mode}", f"{key}=zzzz"])


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "optim..lr=3", "optim.lr =", "a b=1"])
def test_bad_override_strings(bad):
    if bad == "optim.lr =":  # an empty value is YAML null: a type error on a float field
        with pytest.raises(ConfigError, match="optim.lr: expected float, got NoneType None"):
            load_config(None, [bad])
        return
    with pytest.raises(ConfigError, match="bad override"):
        load_config(None, [bad])


def test_override_into_non_mapping_and_bad_yaml():
    with pytest.raises(ConfigError, match=r"'train\.batch_size' is int 32, not a mapping"):
        apply_overrides({"train": {"batch_size": 32}}, ["train.batch_size.x=1"])
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(None, ["eval.knn_k=[1,"])
    with pytest.raises(ConfigError, match="sequence of 'key=value'"):
        load_config(None, "optim.lr=1")


def test_file_top_level_must_be_mapping(tmp_path):
    src = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_config(src)
    empty = _write(tmp_path / "empty.yaml", "")
    assert load_config(empty) == Config()


# every leaf of the schema at a non-default value, by the modes that read it
BOTH_MODES = [
    "seed=11", "output_dir=runs/y",
    "data.image_size=96", "data.on_bad_sample=skip", "data.num_workers=0",
    "data.batch_sampler=spectral", "data.spectral.refresh_every=5", "data.spectral.num_clusters=3",
    "data.spectral.beta=2", "data.spectral.n_components=4", "data.spectral.n_neighbors=7",
    "data.spectral.dense_max=99", "data.spectral.n_init=2",
    "loss.estimator=infonce", "loss.beta=5",
    "loss.learnable_beta=true", "loss.options={k: v}", "loss.state_sharding=sharded",
    "loss.state_views=unaugmented",
    "optim.name=sgd", "optim.lr=0.3",
    "optim.weight_decay=0", "optim.momentum=0.95", "optim.exclude_bias_and_norm=false",
    "optim.warmup_epochs=0.5", "optim.schedule=constant", "optim.min_lr_ratio=0.1", "train.batch_size=4",
    "train.epochs=9", "train.max_steps=7", "train.grad_accum=2", "train.mixed_precision=fp16",
    "train.log_every=1", "train.ckpt_every=3", "train.keep_last=1", "train.resume=/tmp/ckpt.pt",
    "train.max_nonfinite=0", "train.compile=true", "train.plots=false", "train.allow_changes=true",
    "train.dist_timeout_s=30",
    "eval.every_epochs=2", "eval.batch_size=8", "eval.enabled=false", "eval.at_start=false",
]
UNIMODAL_ONLY = [
    "data.name=digits", "data.root=/data", "data.download=true",
    "data.train_split=unlabeled", "data.eval_train_split=unlabeled", "data.eval_test_split=val",
    "data.n_views=3", "data.subset=10",
    "data.augment.crop_scale_min=0.3", "data.augment.jitter_strength=1",
    "data.augment.grayscale_p=0", "data.augment.blur=false", "data.augment.flip=false",
    "model.arch=resnet50", "model.cifar_stem=false", "model.proj_hidden=2048", "model.proj_dim=256",
    "model.proj_layers=3", "model.channels_last=true", "model.norm=group", "model.head_batch_norm=false",
    "model.sync_bn=false",
    "eval.probe_epochs=0", "eval.knn_k=[3]", "eval.max_train=5", "eval.max_test=6", "eval.geometry=false",
]
BIMODAL_ONLY = [
    "pairs.source=file", "pairs.path=/p.csv", "pairs.eval_path=/e.csv", "pairs.x_key=q",
    "pairs.y_key=d", "pairs.id_key=id", "pairs.wordnet_pos=[verb]", "pairs.wordnet_x=examples",
    "pairs.eval_size=10", "pairs.train_size=100", "pairs.split_seed=3", "pairs.mask_duplicates=false",
    "pairs.streaming=true", "pairs.shuffle_buffer=10", "pairs.augment_images=true", "towers.kind=open_clip",
    "towers.x=efficientnet_lite0", "towers.y=efficientnet_lite0", "towers.shared=true", "towers.proj_dim=64",
    "towers.freeze_x=true", "towers.freeze_y=true", "towers.max_length=16", "towers.open_clip_model=ViT-B-32",
    "towers.open_clip_checkpoint=/c.pt",
]


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and k != "options":
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _keys(overrides):
    return [o.split("=", 1)[0] for o in overrides]


def test_every_schema_field_round_trips_through_overrides(tmp_path):
    """Set every leaf to a non-default value by override, in the mode that reads it; saving and reloading must
    reproduce all of them."""
    default = dict(_leaves(config_to_dict(Config())))
    changed = set()
    for mode, only in (("unimodal", UNIMODAL_ONLY), ("bimodal", BIMODAL_ONLY)):
        cfg = load_config(None, [f"mode={mode}", *BOTH_MODES, *only])
        got = dict(_leaves(config_to_dict(cfg)))
        changed |= {k for k, v in got.items() if v != default[k]}
        assert load_config(save_config(cfg, tmp_path / f"{mode}.yaml")) == cfg
    assert changed == set(default)  # the lists above cover the whole schema
    assert sorted(_keys(BOTH_MODES + UNIMODAL_ONLY + BIMODAL_ONLY) + ["mode"]) == sorted(default)  # each key once
    assert [f.name for f in dataclasses.fields(Config)] == [
        "seed", "output_dir", "mode", "data", "pairs", "model", "towers", "loss", "optim", "train", "eval"]


def test_bimodal_run_rejects_model_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["mode=bimodal", "model.arch=small_cnn"])
    msg = str(e.value)
    assert msg.startswith("command-line override: model.arch applies to mode: unimodal only; this is a mode: "
                          "bimodal run (the towers are set with towers.*)")
    assert msg.endswith("remove it")


def test_unimodal_run_rejects_tower_keys():
    with pytest.raises(ConfigError, match=r"towers\.x applies to mode: bimodal only; this is a mode: unimodal run "
                                          r"\(the encoder is set with model\.\*\)"):
        load_config(None, ["towers.x=efficientnet_lite0"])


@pytest.mark.parametrize("mode, foreign", [("bimodal", UNIMODAL_ONLY), ("unimodal", BIMODAL_ONLY)])
def test_one_error_names_every_key_the_mode_does_not_read(mode, foreign):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"mode={mode}", *BOTH_MODES, *foreign])
    msg = str(e.value)
    other = "unimodal" if mode == "bimodal" else "bimodal"
    # exactly the foreign keys, none of those both modes read
    assert msg.startswith(f"command-line override: {', '.join(_keys(foreign))} apply to mode: {other} only; "
                          f"this is a mode: {mode} run")
    if mode == "bimodal":  # the keys of a section it reads in part are listed
        assert "of data.* it reads image_size, num_workers, on_bad_sample, batch_sampler, spectral" in msg
        assert "of eval.* it reads every_epochs, batch_size, enabled" in msg


@pytest.mark.parametrize("mode", ["unimodal", "bimodal"])
def test_keys_of_the_other_mode_pass_at_their_defaults(tmp_path, mode):
    """A saved config holds every key, the other mode's at their defaults: it must load, and round-trip."""
    assert load_config(None, [f"mode={mode}"]).mode == mode
    cfg = config_from_dict({**config_to_dict(Config()), "mode": mode})  # every key, explicitly
    assert cfg == Config(mode=mode)
    at_default = [f"model.arch={Config().model.arch}", f"towers.x={Config().towers.x}", "data.subset=null",
                  "pairs.source=wordnet", "eval.knn_k=[1, 20]"]
    assert load_config(None, [f"mode={mode}", *at_default]) == Config(mode=mode)
    saved = save_config(load_config(None, [f"mode={mode}", *BOTH_MODES]), tmp_path / "config.yaml")
    assert load_config(saved) == config_from_dict(yaml.safe_load(saved.read_text()))


def test_mode_check_can_be_skipped_for_old_configs():
    old = {"mode": "bimodal", "model": {"arch": "small_cnn"}}  # written before the check (e.g. in a checkpoint)
    with pytest.raises(ConfigError, match="model.arch applies to mode: unimodal only"):
        config_from_dict(old)
    assert config_from_dict(old, check_mode=False).model.arch == "small_cnn"


def test_mode_error_names_the_file(tmp_path):
    src = _write(tmp_path / "run.yaml", {"mode": "bimodal", "model": {"proj_dim": 64}})
    with pytest.raises(ConfigError, match=r"run\.yaml: model\.proj_dim applies to mode: unimodal only"):
        load_config(src)
    assert load_config(src, ["mode=unimodal"]).model.proj_dim == 64  # the other mode reads it


def test_yaml_1_2_booleans_keep_no_a_string(tmp_path):
    """PyYAML's YAML 1.1 reads `no` as False; the config loader must keep `mixed_precision: no` a string."""
    src = _write(tmp_path / "mp.yaml", "train:\n  mixed_precision: no\n  resume: null\nmodel:\n  channels_last: true\n")
    cfg = load_config(src)
    assert cfg.train.mixed_precision == "no" and cfg.model.channels_last is True
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="data.augment.flip: expected bool \\(true/false\\), got str 'yes'"):
        load_config(None, ["data.augment.flip=yes"])


def test_errors_name_their_origin_and_overrides_can_fix_a_file(tmp_path):
    src = _write(tmp_path / "r.yaml", {"optim": {"lr": 0}})  # invalid alone ...
    assert load_config(src, ["optim.lr=0.1"]).optim.lr == 0.1  # ... but fixed on the command line
    with pytest.raises(ConfigError, match=r"r\.yaml: optim\.lr: must be > 0"):
        load_config(src)
    with pytest.raises(ConfigError, match=r"r\.yaml: optim\.lr: must be > 0"):
        load_config(src, ["train.epochs=2"])
    good = _write(tmp_path / "g.yaml", {"optim": {"lr": 0.1}})
    with pytest.raises(ConfigError, match=r"^command-line override: train\.epochs: must be > 0, got 0$"):
        load_config(good, ["train.epochs=0"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_round_trips_and_builds_its_estimator(path, tmp_path):
    from dual_emc2.loss.registry import build_estimator, options_for

    cfg = load_config(path)
    assert load_config(save_config(cfg, tmp_path / "config.yaml")) == cfg  # what a run saves in its output_dir
    obj = build_estimator(cfg.loss.estimator, num_keys=4096, num_candidates=4096,
                          options=options_for(cfg.loss.estimator, cfg.loss.options),
                          symmetric=cfg.mode == "bimodal", defaults={"dim": 16, "seed": 0})
    assert obj is not None


def test_configs_ship_in_the_package_and_the_checkout_links_them():
    root = Path(__file__).resolve().parents[1]
    assert (root / "configs").is_symlink() and (root / "configs").resolve() == (root / "dual_emc2" / "configs")
    assert packaged_configs() == [p.stem for p in CONFIGS] and "fmnist_quickstart" in packaged_configs()
    assert Path(find_config("fmnist_quickstart")) == root / "dual_emc2" / "configs" / "fmnist_quickstart.yaml"


def test_a_packaged_config_by_name_from_any_folder(tmp_path, monkeypatch):
    by_path = load_config(CONFIGS[0].parent / "fmnist_quickstart.yaml")
    monkeypatch.chdir(tmp_path)  # no configs/ here
    for arg in ("fmnist_quickstart", "fmnist_quickstart.yaml", "configs/fmnist_quickstart.yaml"):
        assert load_config(arg) == by_path, arg
    # its base (fmnist_unimodal.yaml) is packaged too: the ResNet settings it does not override are inherited
    assert by_path.model.arch == "small_cnn" and by_path.data.name == "fashion_mnist" and by_path.optim.name == "adam"
    assert load_config("fmnist_quickstart", ["seed=3"]).seed == 3
    # a file that exists relative to the working folder comes first
    _write(tmp_path / "fmnist_quickstart.yaml", {"seed": 7})
    (tmp_path / "configs").mkdir()
    _write(tmp_path / "configs" / "fmnist_quickstart.yaml", {"seed": 8})
    assert load_config("fmnist_quickstart.yaml").seed == 7 and load_config("configs/fmnist_quickstart.yaml").seed == 8
    assert load_config("fmnist_quickstart") == by_path  # no file of that very name here


def test_an_unknown_config_name_lists_the_packaged_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    listing = ", ".join(packaged_configs())
    with pytest.raises(FileNotFoundError, match=r"^config file not found: fmnist_quickstrt \(did you mean "
                                                r"'fmnist_quickstart'\?\); the packaged configs are ") as e:
        load_config("fmnist_quickstrt")
    assert str(e.value).endswith(f"the packaged configs are {listing} (pass one by name)")
    with pytest.raises(FileNotFoundError, match=r"config file not found: configs/nothing_like_it\.yaml; the packaged"):
        load_config("configs/nothing_like_it.yaml")
    with pytest.raises(FileNotFoundError, match=r"config file not found: elsewhere/fmnist_quickstart\.yaml \(did you"):
        load_config("elsewhere/fmnist_quickstart.yaml")  # a path in another folder is not a packaged name
    (tmp_path / "text_wordnet").mkdir()  # a folder of that name does not hide the packaged config
    assert load_config("text_wordnet").mode == "bimodal"


def test_packaged_configs_read_from_a_zipped_package(tmp_path, monkeypatch):
    """Where the package is not a folder on disk (a zip import), the configs are read through importlib.resources'
    Traversable, their base: inheritance included."""
    import zipfile

    archive = tmp_path / "pkg.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("dual_emc2/configs/leaf.yaml", "base: mid.yaml\ntrain: {epochs: 4}\n")
        z.writestr("dual_emc2/configs/mid.yaml", "base: root.yaml\noptim: {lr: 0.25}\n")
        z.writestr("dual_emc2/configs/root.yaml", "seed: 5\noptim: {lr: 0.5, name: sgd}\n")
        z.writestr("dual_emc2/configs/loop.yaml", "base: loop.yaml\n")
    folder = zipfile.Path(archive, "dual_emc2/configs/")
    monkeypatch.setattr(config_module, "_packaged_folder", lambda: folder)
    monkeypatch.chdir(tmp_path)
    assert packaged_configs() == ["leaf", "loop", "mid", "root"]
    assert not isinstance(find_config("leaf"), Path)
    cfg = load_config("configs/leaf.yaml")
    assert (cfg.seed, cfg.optim.name, cfg.optim.lr, cfg.train.epochs) == (5, "sgd", 0.25, 4)
    with pytest.raises(ConfigError, match="circular"):
        load_config("loop")
