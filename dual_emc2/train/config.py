"""Load a run's configuration (:mod:`dual_emc2.train.schema`) from YAML with ``key.sub=value`` command-line overrides.

A YAML file mirrors :class:`Config`; every key is optional (defaults in the schema).  A file may say
``base: other.yaml`` (a path relative to the file's own folder) to inherit another file and override some of its keys;
mappings merge recursively, every other value replaces the inherited one.  The configs of the repository ship inside
the package (``dual_emc2/configs``, read with :mod:`importlib.resources`): where no such file exists relative to the
working folder, ``fmnist_quickstart``, ``fmnist_quickstart.yaml`` and ``configs/fmnist_quickstart.yaml`` all name the
packaged file (:func:`find_config`), so an installed wheel runs ``dual-emc2-train --config fmnist_quickstart``.

Values are parsed with a YAML 1.2 float rule, so ``1e-3`` is the float 0.001 (PyYAML's YAML 1.1 resolver would read it
as a string) and only true/false are booleans (``mixed_precision: no`` is the string "no").

Every error names the full dotted key and what was expected, e.g.
``unknown config key 'optim.learning_rate' (did you mean 'optim.lr'?)`` or
``train.batch_size: expected int, got str 'abc'``.  Keys that the run's ``mode`` does not read are errors unless
they hold their default value (a saved config holds every key), e.g. ``model.arch applies to mode: unimodal only;
this is a mode: bimodal run (the towers are set with towers.*); remove it``.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.resources
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

if typing.TYPE_CHECKING:
    from importlib.resources.abc import Traversable

import yaml

from dual_emc2.errors import UsageError
from dual_emc2.text_files import decode_utf8
from dual_emc2.train.schema import Config

__all__ = ["ConfigError", "apply_overrides", "check_mode_keys", "config_from_dict", "config_to_dict", "find_config",
           "load_config", "load_yaml", "packaged_configs", "save_config"]


class ConfigError(UsageError):
    """An invalid configuration file, key, value or override; the message names the dotted key (and file).

    Example::

        raise ConfigError("bad override 'optim.lr': expected 'key.sub=value' (e.g. 'optim.lr=1e-3')")
    """


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


# ------------------------------------------------------------------------------------------- packaged configs

_PACKAGE, _CONFIG_FOLDER, _SUFFIX = "dual_emc2", "configs", ".yaml"


def _packaged_folder() -> Traversable:
    """The folder of the configs shipped in the package (``dual_emc2/configs``), wherever the package is installed."""
    return importlib.resources.files(_PACKAGE).joinpath(_CONFIG_FOLDER)


def packaged_configs() -> list[str]:
    """Names (without ``.yaml``) of the configs shipped in the package, sorted."""
    folder = _packaged_folder()
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(_SUFFIX)] for p in folder.iterdir() if p.name.endswith(_SUFFIX) and p.is_file())


def _packaged_name(arg: str) -> str | None:
    """The packaged config name that ``arg`` spells (``name``, ``name.yaml`` or ``configs/name.yaml``), else None."""
    parts = Path(arg).parts
    if len(parts) == 2 and parts[0] == _CONFIG_FOLDER:
        parts = parts[1:]
    if len(parts) != 1:
        return None
    name = parts[0][: -len(_SUFFIX)] if parts[0].endswith(_SUFFIX) else parts[0]
    return name or None


def find_config(path: str | os.PathLike[str]) -> Path | Traversable:
    """The config file that ``path`` means: the file itself when it exists (relative to the working folder), else
    the packaged config it names (``fmnist_quickstart``, ``fmnist_quickstart.yaml`` or
    ``configs/fmnist_quickstart.yaml``).  Otherwise FileNotFoundError listing the packaged configs, with the
    closest name."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    name = _packaged_name(os.fspath(path))
    if name is not None:
        packaged = _packaged_folder().joinpath(name + _SUFFIX)
        if packaged.is_file():
            return packaged
    known = packaged_configs()
    if p.is_dir():
        problem = f"config path is a folder, not a YAML file: {path}"
    else:
        problem = f"config file not found: {path}"
    close = difflib.get_close_matches(name or p.stem, known, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    listing = f"; the packaged configs are {', '.join(known)} (pass one by name)" if known else ""
    raise FileNotFoundError(f"{problem}{hint}{listing}")


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read one YAML config file (a path, or a packaged config by name: :func:`find_config`) into a plain dict,
    resolving ``base:`` inheritance (no schema validation)."""
    found = find_config(path)
    return _load_tree(found, _folder_of(found), ())


def _folder_of(path: Path | Traversable) -> Path | Traversable:
    return path.parent if isinstance(path, Path) else _packaged_folder()


def _identity(path: Path | Traversable) -> str:
    return str(path.resolve()) if isinstance(path, Path) else str(path)


def _load_tree(path: Path | Traversable, folder: Path | Traversable, chain: tuple[str, ...]) -> dict[str, Any]:
    """``path`` (a file, or a packaged config: a Traversable) with its ``base:`` chain; ``folder`` is its folder,
    against which a ``base`` path is taken."""
    resolved = _identity(path)
    if resolved in chain:
        cycle = " -> ".join((*chain, resolved))
        raise ConfigError(f"{path}: circular 'base' inheritance: {cycle}")
    if not path.is_file():
        where = f" (base of {chain[-1]})" if chain else ""
        raise FileNotFoundError(f"config file not found: {path}{where}")
    data = _parse_yaml(decode_utf8(path.read_bytes(), str(path), ConfigError, "config file"), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: 'base' must be a path to another YAML file, got {_describe(base)}")
    if isinstance(folder, Path):
        parent_path: Path | Traversable = folder / base
        parent_folder: Path | Traversable = parent_path.parent
    else:  # a packaged config inherits another packaged config of the same folder
        parent_path, parent_folder = folder.joinpath(*Path(base).parts), folder
    parent = _load_tree(parent_path, parent_folder, (*chain, resolved))
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
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}{hint}")
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


# --------------------------------------------------------------------------------------------------------- modes

# where a run of the mode sets what another mode's keys would set
_INSTEAD = {
    ("bimodal", "model"): "the towers are set with towers.*",
    ("bimodal", "data"): "the pairs are set with pairs.*",
    ("bimodal", "eval"): "it evaluates retrieval on the held-out pairs",
    ("unimodal", "towers"): "the encoder is set with model.*",
    ("unimodal", "pairs"): "the images are set with data.*",
}


def _changed(value: Any, default: Any, key: str) -> list[str]:
    """Dotted leaf keys under ``key`` whose value differs from ``default`` (``loss.options`` is one leaf)."""
    if dataclasses.is_dataclass(value):
        return [k for f in dataclasses.fields(value)
                for k in _changed(getattr(value, f.name), getattr(default, f.name), _join(key, f.name))]
    return [] if value == default else [key]


def _foreign(node: Any, default: Any, mode: str, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, the mode that reads it) of every non-default key of ``node`` that ``mode`` does not read."""
    out = []
    for f in dataclasses.fields(node):
        key, value, base = _join(prefix, f.name), getattr(node, f.name), getattr(default, f.name)
        owner = f.metadata.get("mode")
        if owner is not None and owner != mode:
            out += [(k, owner) for k in _changed(value, base, key)]
        elif dataclasses.is_dataclass(value):
            out += _foreign(value, base, mode, key)
    return out


def check_mode_keys(cfg: Config) -> None:
    """Raise one :class:`ConfigError` naming every key that ``cfg.mode`` does not read but that is set to a
    non-default value (the schema's ``mode`` field metadata says which keys a mode reads)."""
    foreign = _foreign(cfg, Config(), cfg.mode)
    if not foreign:
        return
    what = []
    for owner in dict.fromkeys(o for _, o in foreign):
        keys = [k for k, o in foreign if o == owner]
        what.append(f"{', '.join(keys)} {'applies' if len(keys) == 1 else 'apply'} to mode: {owner} only")
    hints = [_section_hint(cfg.mode, s) for s in dict.fromkeys(k.split(".", 1)[0] for k, _ in foreign)]
    why = "; ".join(h for h in hints if h)
    raise ConfigError(f"{'; '.join(what)}; this is a mode: {cfg.mode} run{f' ({why})' if why else ''}; remove "
                      f"{'it' if len(foreign) == 1 else 'them'}")


def _section_hint(mode: str, section: str) -> str:
    """What a ``mode`` run uses instead of ``section``, and which of its keys it reads when it reads some."""
    parts = [_INSTEAD.get((mode, section), "")]
    field = {f.name: f for f in dataclasses.fields(Config)}[section]
    if field.metadata.get("mode") is None:  # a section the mode reads in part
        cls = typing.get_type_hints(Config)[section]
        read = [f.name for f in dataclasses.fields(cls) if f.metadata.get("mode") in (None, mode)]
        parts.append(f"of {section}.* it reads {', '.join(read)}")
    return ", and ".join(p for p in parts if p)


# ------------------------------------------------------------------------------------------------------- loading


def config_from_dict(d: Mapping[str, Any], *, check_mode: bool = True) -> Config:
    """Validate a plain dict against the schema and build a :class:`Config` (missing keys take defaults).

    ``check_mode``: reject keys that the config's mode does not read (:func:`check_mode_keys`); False accepts them,
    for configs written before that check (e.g. in old checkpoints)."""
    cfg = _build(Config, d, "")
    if check_mode:
        check_mode_keys(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of ``cfg`` (YAML-serialisable; ``config_from_dict`` inverts it)."""
    if not isinstance(cfg, Config):
        raise TypeError(f"config_to_dict expects a Config, got {type(cfg).__name__}")
    return dataclasses.asdict(cfg)


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (with its ``base:`` chain; None = all defaults), apply ``key.sub=value`` overrides, validate.

    ``path`` is a YAML file or, where no such file exists, a packaged config by name (:func:`find_config`).

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
