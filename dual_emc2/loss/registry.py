"""The estimators by name: the registry, the checks of their options (names, types and values, one function for the
config and for :class:`~dual_emc2.loss.GlobalContrastiveLoss`) and :func:`build_estimator`."""
from __future__ import annotations

import difflib
import inspect
import numbers
import types
import typing
from typing import Any, Union

from dual_emc2.loss.errors import OptionError
from dual_emc2.loss.estimators.base import Estimator
from dual_emc2.loss.estimators.emc2 import EMC2
from dual_emc2.loss.estimators.hcl import HCL
from dual_emc2.loss.estimators.infonce import InfoNCE
from dual_emc2.loss.estimators.negative_cache import NegativeCache
from dual_emc2.loss.estimators.scl import HSCL, HUCL, SCL
from dual_emc2.loss.estimators.sogclr import SogCLR
from dual_emc2.loss.estimators.symmetric import SymmetricEstimator
from dual_emc2.loss.state.layout import SHARDING_MODES

REGISTRY: dict[str, type[Estimator]] = {
    "infonce": InfoNCE,
    "simclr": InfoNCE,
    "clip": InfoNCE,
    "sogclr": SogCLR,
    "emc2": EMC2,
    "negative_cache": NegativeCache,
    "hcl": HCL,
    "scl": SCL, "hscl": HSCL, "hucl": HUCL,
}


def register(name: str, cls: type[Estimator]) -> None:
    """Add an estimator class to the registry (its ``__init__`` takes ``num_keys, num_candidates, **options``)."""
    REGISTRY[name] = cls


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` has the annotated type ``tp`` (ints pass for floats; bools are not ints; unknown
    annotations pass)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _check_options(name: str, cls: type[Estimator], options: dict[str, Any],
                   prefix: str | None = None) -> None:
    """Unknown option names and values of the wrong type are a :class:`~dual_emc2.loss.errors.OptionError` naming the
    option as ``{prefix}.{key}`` (default ``loss.options.{name}``), what it takes and what it got."""
    prefix = prefix or f"loss.options.{name}"
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p not in ("self", "num_keys", "num_candidates", "state_sharding")]
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an estimator with annotations that do not resolve: check names only
        hints = {}
    for key, value in options.items():
        if key == "state_sharding":
            raise OptionError(f"{prefix}.state_sharding: the state layout is set once for every estimator, as "
                             f"loss.state_sharding ({', '.join(SHARDING_MODES)}); remove it here")
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            did = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise OptionError(f"unknown option '{prefix}.{key}'{did}; allowed: {', '.join(allowed) or 'none'}")
        if key in hints and not _fits(value, hints[key]):
            raise OptionError(f"{prefix}.{key}: expected {_type_name(hints[key])}, got {_describe(value)} "
                             f"(default: {params[key].default!r})")


def options_for(name: str, options_by_estimator: dict[str, Any] | None) -> dict[str, Any]:
    """The options of estimator ``name`` from the config's ``loss.options`` mapping, which holds one mapping per
    estimator name (``{emc2: {reencode_fraction: 0.5}, sogclr: {gamma: 0.9}}``) so that ``loss.estimator=…``
    switches estimator without editing options.  Unknown estimator names and bad options of any listed estimator
    are errors (with a did-you-mean)."""
    options_by_estimator = dict(options_by_estimator or {})
    for key, value in options_by_estimator.items():
        if key not in REGISTRY:
            hint = difflib.get_close_matches(key, REGISTRY, n=1)
            did = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise OptionError(f"loss.options.{key}: not an estimator name{did}; options are grouped by estimator, "
                             f"e.g. loss.options.sogclr.gamma=0.9 (estimators: {', '.join(sorted(REGISTRY))})")
        if not isinstance(value, dict):
            raise OptionError(f"loss.options.{key}: expected a mapping of options, got {value!r}")
        selected = "" if key == name else f" (checked although loss.estimator is {name!r})"
        try:
            _check_options(key, REGISTRY[key], value)
        except OptionError as err:
            raise OptionError(f"{err}{selected}") from None
        try:  # values too, for every estimator listed: a switch of loss.estimator must not meet a bad option later
            REGISTRY[key](num_keys=2, num_candidates=2, **value)
        except (ValueError, TypeError) as err:
            raise OptionError(f"loss.options.{key}: {err}{selected}") from None
    return dict(options_by_estimator.get(name, {}))


def build_estimator(
    name: str, *, num_keys: int, num_candidates: int, options: dict[str, Any] | None = None, symmetric: bool = False,
    defaults: dict[str, Any] | None = None, options_prefix: str | None = None, state_sharding: str = "auto",
) -> Estimator:
    """Build an estimator by registry name.  ``symmetric=True`` wraps it for x→y and y→x with separate states.

    ``state_sharding`` lays out the per-anchor state (EMC² chains, SogCLR's u) over the processes
    (:mod:`dual_emc2.loss.state.layout`); estimators without such state ignore it.  Build the estimator after
    ``torch.distributed`` is initialised.

    ``defaults`` are run facts (feature ``dim``, ``seed``) passed to estimators whose constructor takes them, unless
    ``options`` sets them.  Unknown options and values of the wrong type are an OptionError naming the option as
    ``{options_prefix}.{key}`` (default ``loss.options.{name}.{key}``).
    """
    options = dict(options or {})
    if name not in REGISTRY:
        hint = difflib.get_close_matches(name, REGISTRY, n=1)
        did = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise OptionError(f"unknown loss.estimator '{name}'{did}; choices: {', '.join(sorted(REGISTRY))}")
    if state_sharding not in SHARDING_MODES:
        raise OptionError(f"loss.state_sharding must be one of {', '.join(SHARDING_MODES)}, got "
                         f"{state_sharding!r}")
    cls = REGISTRY[name]
    _check_options(name, cls, options, prefix=options_prefix)
    accepted = inspect.signature(cls.__init__).parameters
    if "state_sharding" in accepted:
        options["state_sharding"] = state_sharding
    for key, value in (defaults or {}).items():
        if key in accepted and key not in options:
            options[key] = value

    def make() -> Estimator:
        return cls(num_keys=num_keys, num_candidates=num_candidates, **options)

    return SymmetricEstimator(make) if symmetric else make()


__all__ = ["REGISTRY", "build_estimator", "options_for", "register"]
