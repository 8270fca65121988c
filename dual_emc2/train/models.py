"""The models a config describes, for training and for evaluating checkpoints: the unimodal image encoder with β
(φ = ψ) and the two towers with β (φ, ψ)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from dual_emc2.towers.heads import build_image_encoder
from dual_emc2.towers.temperature import ContrastiveModel, InverseTemperature
from dual_emc2.towers.two_tower import TwoTowerModel, build_two_tower
from dual_emc2.train.checkpoint import load_checkpoint
from dual_emc2.train.config import config_from_dict
from dual_emc2.train.schema import Config

__all__ = ["build_two_tower_model", "build_unimodal_model", "checkpoint_model"]


def build_unimodal_model(cfg: Config) -> ContrastiveModel:
    """ResNet (or small CNN) backbone + projection head (φ = ψ) and the inverse temperature, as ``cfg`` describes."""
    m = cfg.model
    encoder = build_image_encoder(m.arch, m.cifar_stem, m.proj_hidden, m.proj_dim, m.proj_layers,
                                  channels_last=m.channels_last, batch_norm=m.head_batch_norm, norm=m.norm)
    return ContrastiveModel(encoder, InverseTemperature(cfg.loss.beta, cfg.loss.learnable_beta))


def build_two_tower_model(cfg: Config) -> TwoTowerModel:
    """The x and y towers of ``cfg.towers`` and the inverse temperature."""
    return build_two_tower(**dataclasses.asdict(cfg.towers), beta=cfg.loss.beta, learnable_beta=cfg.loss.learnable_beta)


def checkpoint_model(path: str | Path, cfg: Config | None = None) -> tuple[TwoTowerModel, Config]:
    """Rebuild the two-tower model of a bimodal checkpoint (its own config unless ``cfg`` is given) and load it."""
    payload = load_checkpoint(path, map_location="cpu")
    cfg = cfg or config_from_dict(payload["config"])
    if cfg.mode != "bimodal":
        raise ValueError(f"{path}: not a bimodal checkpoint (mode: {cfg.mode})")
    model = build_two_tower_model(cfg)
    model.load_state_dict(payload["model"])
    return model, cfg
