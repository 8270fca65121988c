"""Learning-rate schedules (the choices of config ``optim.schedule``), torch-free so that the config schema can
import them; :func:`dual_emc2.train.optim.build_scheduler` applies them through ``LambdaLR``."""
from __future__ import annotations

import math

__all__ = ["SCHEDULES", "WarmupSchedule"]

SCHEDULES: tuple[str, ...] = ("cosine", "constant")


class WarmupSchedule:
    """Learning-rate multiplier f(step) for :class:`~torch.optim.lr_scheduler.LambdaLR`.

    Warm-up (W steps): f(s) = (s + 1) / (W + 1), rising linearly from 1/(W+1) at s = 0 to 1 at s = W.
    cosine:   f(s) = m + (1 − m) · ½ (1 + cos(π p)),  p = min(1, (s − W) / (T − W)),  so f(W) = 1 and f(T) = m.
    constant: f(s) = 1 for s ≥ W.
    A plain object (not a lambda) so that LambdaLR.state_dict() records it.

    Args:
        total_steps: T, optimiser steps of the run.
        warmup_steps: W.
        schedule: ``"cosine"`` or ``"constant"`` (:data:`SCHEDULES`; config key ``optim.schedule``).
        min_lr_ratio: m, the final multiplier of the cosine.

    Example::

        f = WarmupSchedule(total_steps=1000, warmup_steps=100, schedule="cosine", min_lr_ratio=0.0)
        f(0), f(100), f(1000)                            # (1/101, 1.0, 0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, f)
    """

    def __init__(self, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.schedule = schedule
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        W, T, m = self.warmup_steps, self.total_steps, self.min_lr_ratio
        if step < W:
            return (step + 1) / (W + 1)
        if self.schedule == "constant":
            return 1.0
        p = min(1.0, (step - W) / max(1, T - W))
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))
