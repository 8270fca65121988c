"""Names of the implemented towers, without importing torch: the choices of the config keys ``model.arch``,
``model.norm``, ``towers.kind`` and ``towers.x`` / ``towers.y``.  The modules that build the towers
(:mod:`~dual_emc2.towers.image`, :mod:`~dual_emc2.towers.heads`, :mod:`~dual_emc2.towers.two_tower`) take their
names from here, so the config schema accepts exactly what they build."""
from __future__ import annotations

__all__ = ["IMAGE_ARCHS", "NORMS", "PRETRAINED_TOWERS", "RESNET_ARCHS", "SMALL_CNN", "TOWER_KINDS"]

RESNET_ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")  # torchvision names
SMALL_CNN = "small_cnn"
IMAGE_ARCHS: tuple[str, ...] = RESNET_ARCHS + (SMALL_CNN,)  # the backbones of mode: unimodal
NORMS: tuple[str, ...] = ("batch", "group")  # backbone normalisation layers

TOWER_KINDS: tuple[str, ...] = ("pretrained", "open_clip")  # the towers of mode: bimodal
PRETRAINED_TOWERS: tuple[str, ...] = ("minilm", "efficientnet_lite0")  # backbones of towers.kind: pretrained
