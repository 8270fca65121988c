"""Build the unimodal model of a config (towers + β), for training and for evaluating checkpoints."""
from __future__ import annotations

from dual_emc2.towers.heads import build_image_encoder
from dual_emc2.towers.temperature import ContrastiveModel, InverseTemperature
from dual_emc2.train.config import Config


def build_unimodal_model(cfg: Config) -> ContrastiveModel:
    """ResNet backbone + projection head (φ = ψ) and the inverse temperature, as the config describes."""
    m = cfg.model
    encoder = build_image_encoder(m.arch, m.cifar_stem, m.proj_hidden, m.proj_dim, m.proj_layers,
                                  channels_last=m.channels_last, batch_norm=m.head_batch_norm, norm=m.norm)
    return ContrastiveModel(encoder, InverseTemperature(cfg.objective.beta, cfg.objective.learnable_beta))
