"""Optimisers (Adam, AdamW, SGD, LARS) with bias/norm exclusion, and warm-up + cosine learning-rate schedules.

LARS is timm's maintained implementation (``timm.optim.Lars``; timm is a dependency of open_clip_torch).  Its
layer-wise update for a parameter w with gradient g, weight decay λ, trust coefficient η, learning rate γ and
momentum μ (You et al. 2017, "Large batch training of convolutional networks", Algorithm 1) is

    ρ = η ‖w‖ / (‖g‖ + λ ‖w‖ + ε)          (ρ = 1 when ‖w‖ = 0 or ‖g‖ = 0)
    u = ρ (g + λ w);   m ← μ m + u  (m = u on the first step);   w ← w − γ m

Note the denominator ‖g‖ + λ‖w‖ of the paper, which bounds ‖g + λw‖ (the SimCLR / MoCo-v3 variant) from above; the
two coincide for λ = 0 and differ by at most λ‖w‖ (negligible at the λ = 1e-6 of EMC² appendix D).  Parameters in
the no-decay group (biases, norm-layer parameters, extra parameters such as a learnable temperature) get λ = 0 and
no trust-ratio adaptation: a plain momentum-SGD step.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from dual_emc2.train.schedules import SCHEDULES, WarmupSchedule

OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd", "lars")

ParamsLike = nn.Module | Iterable[Tensor] | Iterable[tuple[str, Tensor]]


def _named_trainable(params: ParamsLike) -> list[tuple[str, Tensor]]:
    """(name, parameter) pairs that require grad, each tensor once (tied weights are shared, not duplicated)."""
    if isinstance(params, nn.Module):
        items: list[Any] = list(params.named_parameters())
    elif isinstance(params, Tensor):
        raise TypeError("params: expected a model or an iterable of parameters, got a single tensor; wrap it in a list")
    else:
        items = list(params)
    out: list[tuple[str, Tensor]] = []
    seen: set[int] = set()
    for k, item in enumerate(items):
        if isinstance(item, Tensor):
            name, p = f"params[{k}]", item
        elif (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
              and isinstance(item[1], Tensor)):
            name, p = item
        else:
            raise TypeError(
                f"params[{k}]: expected a tensor or a (name, tensor) pair, got {type(item).__name__} "
                "(pass a model, model.parameters() or model.named_parameters(); not parameter-group dicts)"
            )
        if not p.requires_grad or id(p) in seen:
            continue
        if not p.is_leaf:
            raise ValueError(f"{name}: optimisers need leaf tensors, got a non-leaf (computed) tensor")
        seen.add(id(p))
        out.append((name, p))
    return out


def _is_no_decay(p: Tensor) -> bool:
    """Biases and norm-layer scales/shifts (BN, LN, GN) are exactly the ≤ 1-D parameters of our towers."""
    return p.ndim <= 1


def param_groups(model_or_named_params: ParamsLike, weight_decay: float,
                 exclude_bias_and_norm: bool = True) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group and a no-decay group.

    With ``exclude_bias_and_norm`` every parameter with ``ndim <= 1`` (biases, BatchNorm/LayerNorm weights and
    biases, scalars) goes to the group ``name="no_decay"`` with ``weight_decay=0`` and ``lars_adapt=False`` (LARS
    leaves it unscaled); all others go to ``name="decay"`` with ``weight_decay`` and ``lars_adapt=True``.
    Without it, one group ``name="all"`` holds everything.  Empty groups are left out.
    """
    weight_decay = _non_negative("weight_decay", weight_decay)
    named = _named_trainable(model_or_named_params)
    if not exclude_bias_and_norm:
        groups = [{"name": "all", "params": [p for _, p in named], "weight_decay": weight_decay, "lars_adapt": True}]
    else:
        groups = [
            {"name": "decay", "params": [p for _, p in named if not _is_no_decay(p)],
             "weight_decay": weight_decay, "lars_adapt": True},
            {"name": "no_decay", "params": [p for _, p in named if _is_no_decay(p)],
             "weight_decay": 0.0, "lars_adapt": False},
        ]
    return [g for g in groups if g["params"]]


def _non_negative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


def _unit_interval(name: str, value: float) -> float:
    value = _non_negative(name, value)
    if value >= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1), got {value!r}")
    return value


def build_optimizer(params_or_model: ParamsLike, name: str, lr: float, weight_decay: float = 0.0,
                    momentum: float = 0.9, exclude_bias_and_norm: bool = True,
                    betas: Sequence[float] = (0.9, 0.999), extra_params: list[Tensor] | None = None,
                    trust_coeff: float = 1e-3) -> torch.optim.Optimizer:
    """Optimiser ``name`` ∈ {adam, adamw, sgd, lars} over :func:`param_groups` of ``params_or_model``.

    ``weight_decay`` is L2 added to the gradient for adam/sgd/lars and decoupled for adamw.  ``momentum`` is used
    by sgd and lars, ``betas`` by adam/adamw, ``trust_coeff`` (η) by lars.  ``extra_params`` (e.g. a learnable
    inverse temperature) always join the no-decay, non-adapted group, even if they are also part of the model.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        raise ValueError(f"optimizer name: unknown {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr: expected a finite number > 0, got {lr!r}")
    weight_decay = _non_negative("weight_decay", weight_decay)
    momentum = _unit_interval("momentum", momentum)
    if len(betas) != 2:
        raise ValueError(f"betas: expected two numbers (beta1, beta2), got {betas!r}")
    beta1, beta2 = (_unit_interval(f"betas[{i}]", b) for i, b in enumerate(betas))
    trust_coeff = float(trust_coeff)
    if not (math.isfinite(trust_coeff) and trust_coeff > 0):
        raise ValueError(f"trust_coeff: expected a finite number > 0, got {trust_coeff!r}")

    extra = _named_trainable(list(extra_params or []))
    extra_ids = {id(p) for _, p in extra}
    named = [(n, p) for n, p in _named_trainable(params_or_model) if id(p) not in extra_ids]
    groups = param_groups(named, weight_decay, exclude_bias_and_norm)
    if extra:
        no_decay = next((g for g in groups if g["name"] == "no_decay"), None)
        if no_decay is None:
            no_decay = {"name": "no_decay", "params": [], "weight_decay": 0.0, "lars_adapt": False}
            groups.append(no_decay)
        no_decay["params"].extend(p for _, p in extra)
    if not groups:
        raise ValueError("params_or_model: no trainable parameters (none requires grad)")

    if key == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)
    if key == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)
    if key == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    try:
        from timm.optim import Lars
    except ImportError as err:  # pragma: no cover - timm ships with open_clip_torch
        raise ImportError("optimizer 'lars' needs timm (pip install timm; it is a dependency of open_clip_torch)") \
            from err
    for g in groups:
        # timm adapts a group iff weight_decay != 0 or always_adapt: force it on for decayed weights (also at λ = 0)
        # and off for the excluded group, whose weight_decay is 0.
        g["always_adapt"] = g["lars_adapt"]
    return Lars(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coeff=trust_coeff)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                    schedule: str = "cosine", min_lr_ratio: float = 0.0) -> LambdaLR:
    """LambdaLR applying :class:`WarmupSchedule` to every group's lr; call ``.step()`` once per optimiser step."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps: expected a positive int, got {total_steps!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected an int >= 0, got {warmup_steps!r}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps})")
    key = schedule.strip().lower() if isinstance(schedule, str) else schedule
    if key not in SCHEDULES:
        raise ValueError(f"schedule: unknown {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    min_lr_ratio = _non_negative("min_lr_ratio", min_lr_ratio)
    if min_lr_ratio > 1.0:
        raise ValueError(f"min_lr_ratio: expected a number in [0, 1], got {min_lr_ratio!r}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return LambdaLR(optimizer, WarmupSchedule(total_steps, warmup_steps, key, min_lr_ratio))
