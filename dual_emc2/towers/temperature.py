"""Inverse temperature β, fixed or learned (CLIP's logit scale), kept as a module so it is saved and optimised with
the towers."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class InverseTemperature(nn.Module):
    """β = exp(log β); learnable when ``learnable`` (then clamped to ``max_beta``, 100 as in CLIP)."""

    def __init__(self, beta: float, learnable: bool = False, max_beta: float = 100.0) -> None:
        super().__init__()
        if not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"loss.beta must be a finite positive number, got {beta}")
        log_beta = torch.tensor(math.log(beta), dtype=torch.float32)
        if learnable:
            self.log_beta = nn.Parameter(log_beta)
        else:
            self.register_buffer("log_beta", log_beta)
        self.max_beta = max_beta

    def forward(self) -> Tensor:
        return self.log_beta.exp().clamp(max=self.max_beta)


class ContrastiveModel(nn.Module):
    """Towers plus β in one module (one DDP wrapper, one state_dict).  For φ = ψ both towers are ``encoder``."""

    def __init__(self, encoder: nn.Module, temperature: InverseTemperature) -> None:
        super().__init__()
        self.encoder = encoder
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)
