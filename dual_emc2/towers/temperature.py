"""Inverse temperature β, fixed or learned (CLIP's logit scale), kept as a module so it is saved and optimised with
the towers."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class InverseTemperature(nn.Module):
    """β = exp(log β); learnable when ``learnable`` (then clamped to ``max_beta``, 100 as in CLIP).

    Args:
        beta: initial β = 1/τ (finite, > 0).
        learnable: optimise log β as a parameter (else a buffer).
        max_beta: upper clamp of β.

    Call: ``temperature()`` → β, a 0-dim tensor (with grad when learnable).

    Example::

        temperature = InverseTemperature(1 / 0.07, learnable=True)    # CLIP's initial τ = 0.07
        loss = loss_fn(x, y, index, temperature())
    """

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
    """Towers plus β in one module (one DDP wrapper, one state_dict).  For φ = ψ both towers are ``encoder``.

    Args:
        encoder: the tower (e.g. a :class:`~dual_emc2.towers.heads.ContrastiveEncoder`).
        temperature: β.

    Call: ``model(x)`` → ``encoder(x)``.

    Example::

        model = ContrastiveModel(encoder, InverseTemperature(10.0))
        z, beta = model(images), model.temperature()
    """

    def __init__(self, encoder: nn.Module, temperature: InverseTemperature) -> None:
        super().__init__()
        self.encoder = encoder
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)
