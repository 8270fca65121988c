"""Estimators of the global contrastive loss behind one interface, built by name from config."""
from __future__ import annotations

import difflib
import inspect
from typing import Any

from dual_emc2.objectives.base import ContrastiveBatch, ContrastiveObjective, ObjectiveOutput
from dual_emc2.objectives.emc2 import EMC2
from dual_emc2.objectives.hcl import HCL
from dual_emc2.objectives.infonce import InfoNCE
from dual_emc2.objectives.negative_cache import NegativeCache
from dual_emc2.objectives.scl import HSCL, HUCL, SCL
from dual_emc2.objectives.sogclr import SogCLR
from dual_emc2.objectives.symmetric import SymmetricObjective

REGISTRY: dict[str, type[ContrastiveObjective]] = {
    "infonce": InfoNCE,
    "simclr": InfoNCE,
    "clip": InfoNCE,
    "sogclr": SogCLR,
    "emc2": EMC2,
    "negative_cache": NegativeCache,
    "hcl": HCL,
    "scl": SCL, "hscl": HSCL, "hucl": HUCL,
}


def register(name: str, cls: type[ContrastiveObjective]) -> None:
    """Add an estimator class to the registry (its ``__init__`` takes ``num_keys, num_candidates, **options``)."""
    REGISTRY[name] = cls


def _check_options(name: str, cls: type[ContrastiveObjective], options: dict[str, Any]) -> None:
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p not in ("self", "num_keys", "num_candidates")]
    for key in options:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            did = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ValueError(
                f"unknown option 'objective.options.{name}.{key}'{did}; allowed: {', '.join(allowed) or 'none'}"
            )


def options_for(name: str, options_by_estimator: dict[str, Any] | None) -> dict[str, Any]:
    """The options of estimator ``name`` from the config's ``objective.options`` mapping, which holds one mapping per
    estimator name (``{emc2: {reencode_fraction: 0.5}, sogclr: {gamma: 0.9}}``) so that ``objective.name=…``
    switches estimator without editing options.  Unknown estimator names and bad options of any listed estimator
    are errors (with a did-you-mean)."""
    options_by_estimator = dict(options_by_estimator or {})
    for key, value in options_by_estimator.items():
        if key not in REGISTRY:
            hint = difflib.get_close_matches(key, REGISTRY, n=1)
            did = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ValueError(f"objective.options.{key}: not an estimator name{did}; options are grouped by estimator, "
                             f"e.g. objective.options.sogclr.gamma=0.9 (estimators: {', '.join(sorted(REGISTRY))})")
        if not isinstance(value, dict):
            raise ValueError(f"objective.options.{key}: expected a mapping of options, got {value!r}")
        _check_options(key, REGISTRY[key], value)
        try:  # values too, for every estimator listed: a switch of objective.name must not meet a bad option later
            REGISTRY[key](num_keys=2, num_candidates=2, **value)
        except (ValueError, TypeError) as err:
            selected = "" if key == name else f" (checked although objective.name is {name!r})"
            raise ValueError(f"objective.options.{key}: {err}{selected}") from None
    return dict(options_by_estimator.get(name, {}))


def build_objective(
    name: str, *, num_keys: int, num_candidates: int, options: dict[str, Any] | None = None, symmetric: bool = False,
    defaults: dict[str, Any] | None = None,
) -> ContrastiveObjective:
    """Build an estimator by registry name.  ``symmetric=True`` wraps it for x→y and y→x with separate states.

    ``defaults`` are run facts (feature ``dim``, ``seed``) passed to estimators whose constructor takes them, unless
    ``options`` sets them.
    """
    options = dict(options or {})
    if name not in REGISTRY:
        hint = difflib.get_close_matches(name, REGISTRY, n=1)
        did = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ValueError(f"unknown objective.name '{name}'{did}; choices: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    _check_options(name, cls, options)
    accepted = inspect.signature(cls.__init__).parameters
    for key, value in (defaults or {}).items():
        if key in accepted and key not in options:
            options[key] = value

    def make() -> ContrastiveObjective:
        return cls(num_keys=num_keys, num_candidates=num_candidates, **options)

    return SymmetricObjective(make) if symmetric else make()


__all__ = [
    "REGISTRY", "ContrastiveBatch", "ContrastiveObjective", "ObjectiveOutput", "EMC2", "HCL", "InfoNCE",
    "NegativeCache", "SogCLR", "SymmetricObjective", "build_objective", "options_for", "register",
]
