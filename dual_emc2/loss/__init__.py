"""The global contrastive loss (Yau et al., eq. 1) and the estimators of its gradient: a closed package that imports
torch and itself only.

Public names (loaded on first use, so that the torch-free modules here — :mod:`dual_emc2.loss.state.layout` — can be
imported by the config without torch):

* :class:`GlobalContrastiveLoss`: the loss for a training loop (``state_request`` before the forward, state features
  in the call);
* :class:`StateRequest`, :class:`StateViews`: the chain states a call needs;
* :class:`Estimator`, :class:`ContrastiveBatch`, :class:`EstimatorOutput`: the interface every estimator implements;
* :data:`REGISTRY`, :func:`build_estimator`, :func:`register`: estimators by name;
* :func:`global_contrastive_loss`: eq. (1) exactly, for checks.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "GlobalContrastiveLoss": "dual_emc2.loss.global_loss",
    "StateRequest": "dual_emc2.loss.state_views",
    "StateViews": "dual_emc2.loss.state_views",
    "Estimator": "dual_emc2.loss.estimators.base",
    "EstimatorOutput": "dual_emc2.loss.estimators.base",
    "ContrastiveBatch": "dual_emc2.loss.estimators.base",
    "REGISTRY": "dual_emc2.loss.registry",
    "build_estimator": "dual_emc2.loss.registry",
    "register": "dual_emc2.loss.registry",
    "global_contrastive_loss": "dual_emc2.loss.exact",
    "OptionError": "dual_emc2.loss.errors",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'dual_emc2.loss' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
