"""Towers φ, ψ: backbones, projection heads and the normalised encoder wrapped around them.

The names below load their module (and torch) on first use, so that importing a torch-free submodule such as
:mod:`dual_emc2.towers.names` (the config schema does) stays cheap."""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["RESNET_ARCHS", "ContrastiveEncoder", "ProjectionHead", "ResNetBackbone", "build_image_encoder"]

_HOME = {"RESNET_ARCHS": "names", "ContrastiveEncoder": "heads", "ProjectionHead": "heads",
         "ResNetBackbone": "image", "build_image_encoder": "heads"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
