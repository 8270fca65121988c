"""Frozen-feature evaluation: feature extraction and the linear probe (multinomial logistic regression).

The probe minimises the L2-regularised multinomial logistic loss of a linear map on frozen features,

    J(W, b) = (1/N) Σ_i CE(Wᵀ x_i + b, y_i) + (λ/2) ‖W‖²_F,     λ = ``weight_decay`` (bias not penalised),

with the features standardised by the training mean and standard deviation.  J is strictly convex in W, so the
probe's answer should not depend on the optimiser; two are offered:

* ``"lbfgs"``: full-batch L-BFGS with a strong-Wolfe line search from W = 0, run to a gradient tolerance.  It finds
  the minimiser of J itself (the same problem scikit-learn's ``LogisticRegression`` solves with ``C = 1 / (λ N)``)
  with no learning rate to tune, and is deterministic.  Each iteration is a pass over all features, so it holds
  ``N × (d + C)`` floats at once.
* ``"adam"``: mini-batch Adam with a cosine learning-rate decay to 0 over ``epochs``, batches drawn by a generator
  seeded with ``seed``.  For sets too large for full-batch passes (e.g. ImageNet-size feature banks).

``solver="auto"`` takes L-BFGS while ``N × (d + C) ≤ LBFGS_MAX_ELEMENTS`` (every dataset of this project), else Adam.
λ is best chosen on held-out training data (:func:`tune_weight_decay`), never on the test set.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from torch import Tensor, nn

Solver = Literal["auto", "lbfgs", "adam"]
LBFGS_MAX_ELEMENTS = 1 << 27  # N × (d + C) floats (512 MiB in float32) up to which "auto" runs full-batch L-BFGS


def extract_features(
    fn: Callable[[Tensor], Tensor],
    loader: Iterable,
    device: str | torch.device,
    *,
    normalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Run ``fn`` over a loader of ``(index, images, labels)`` batches without autograd.

    Returns the features ``[N, d]`` (float32, CPU, L2-normalised if ``normalize``) and labels ``[N]`` (int64) in
    loader order.  Tensor inputs (or dicts of tensors, e.g. tokenised text) are moved to ``device``.  An
    ``nn.Module`` is put in eval mode for the pass (batch-norm statistics, dropout) and restored afterwards.
    """
    device = torch.device(device)
    module = fn if isinstance(fn, nn.Module) else None
    was_training = module.training if module is not None else False
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    if module is not None:
        module.eval()
    try:
        with torch.no_grad():
            for b, batch in enumerate(loader):
                if not isinstance(batch, (tuple, list)) or len(batch) != 3:
                    raise ValueError(f"loader batch {b}: expected an (index, images, labels) tuple, got "
                                     f"{type(batch).__name__}" + (f" of length {len(batch)}"
                                                                  if isinstance(batch, (tuple, list)) else ""))
                _, images, y = batch
                y = torch.as_tensor(y).reshape(-1)
                out = fn(send_to_device(images, device, non_blocking=True))
                if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != y.shape[0]:
                    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise ValueError(f"loader batch {b}: fn must return a [{y.shape[0]}, d] feature matrix "
                                     f"(one row per label), got {shape}")
                out = out.float()
                if normalize:
                    out = F.normalize(out, dim=1)
                feats.append(out.to("cpu"))
                labels.append(y.to("cpu", torch.int64))
    finally:
        if module is not None:
            module.train(was_training)
    if not feats:
        raise ValueError("loader yielded no batches")
    return torch.cat(feats), torch.cat(labels)


def _check_xy(x: Tensor, y: Tensor, name: str, dim: int | None = None) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] == 0 or not x.dtype.is_floating_point:
        desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}_x must be a non-empty floating-point [N, d] tensor, got {desc}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name}_x has dimension {x.shape[1]}, but train_x has {dim}")
    if (not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.dtype.is_floating_point
            or y.dtype == torch.bool or y.dtype.is_complex):
        desc = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"{name}_y must be an integer tensor of shape [{x.shape[0]}], got {desc}")
    if int(y.min()) < 0:
        raise ValueError(f"{name}_y must hold non-negative class labels, got minimum {int(y.min())}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}_x contains NaN or infinite values")


def _objective(linear: nn.Linear, x: Tensor, y: Tensor, weight_decay: float) -> Tensor:
    return F.cross_entropy(linear(x), y) + 0.5 * weight_decay * linear.weight.pow(2).sum()


@torch.no_grad()
def _evaluate(linear: nn.Linear, x: Tensor, y: Tensor, weight_decay: float, chunk: int = 65536) -> tuple[float, float]:
    """Accuracy and J (mean cross-entropy + penalty) over all of ``x``, in chunks."""
    correct, ce = 0, 0.0
    for s in range(0, x.shape[0], chunk):
        logits = linear(x[s:s + chunk])
        ce += float(F.cross_entropy(logits, y[s:s + chunk], reduction="sum"))
        correct += int((logits.argmax(dim=1) == y[s:s + chunk]).sum())
    loss = ce / x.shape[0] + 0.5 * weight_decay * float(linear.weight.pow(2).sum())
    return correct / x.shape[0], loss


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 1024,
    standardize: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    solver: Solver = "auto",
    max_iter: int = 1000,
) -> dict[str, float]:
    """Fit the linear probe on ``(train_x, train_y)`` and report its accuracies (see the module docstring).

    ``epochs``, ``lr`` and ``batch_size`` drive the Adam solver; ``max_iter`` bounds the L-BFGS iterations.
    Returns ``linear_probe_acc`` (test), ``linear_probe_train_acc`` and ``linear_probe_train_loss`` (J at the end).
    """
    _check_xy(train_x, train_y, "train")
    _check_xy(test_x, test_y, "test", dim=train_x.shape[1])
    if solver not in ("auto", "lbfgs", "adam"):
        raise ValueError(f"solver must be 'auto', 'lbfgs' or 'adam', got {solver!r}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("max_iter", max_iter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite positive number, got {lr!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite non-negative number, got {weight_decay!r}")

    device = torch.device(device)
    x_tr = train_x.detach().to(device, torch.float32)
    x_te = test_x.detach().to(device, torch.float32)
    y_tr = train_y.detach().to(device, torch.int64)
    y_te = test_y.detach().to(device, torch.int64)
    if standardize:
        mean = x_tr.mean(dim=0)
        std = x_tr.std(dim=0, unbiased=False)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant features stay constant (zero)
        x_tr = (x_tr - mean) / std
        x_te = (x_te - mean) / std
    n, d = x_tr.shape
    n_classes = int(max(int(y_tr.max()), int(y_te.max()))) + 1
    if solver == "auto":
        solver = "lbfgs" if n * (d + n_classes) <= LBFGS_MAX_ELEMENTS else "adam"

    linear = nn.Linear(d, n_classes).to(device)
    nn.init.zeros_(linear.weight)  # convex problem: start at 0, no init randomness
    nn.init.zeros_(linear.bias)
    if solver == "lbfgs":
        opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, max_eval=2 * max_iter,
                                tolerance_grad=1e-6, tolerance_change=1e-10, history_size=20,
                                line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            loss = _objective(linear, x_tr, y_tr, weight_decay)
            loss.backward()
            return loss

        opt.step(closure)
    else:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        steps_per_epoch = math.ceil(n / batch_size)
        opt = torch.optim.Adam(linear.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen).to(device)
            for s in range(0, n, batch_size):
                idx = perm[s:s + batch_size]
                opt.zero_grad(set_to_none=True)
                _objective(linear, x_tr[idx], y_tr[idx], weight_decay).backward()
                opt.step()
                sched.step()

    train_acc, train_loss = _evaluate(linear, x_tr, y_tr, weight_decay)
    test_acc, _ = _evaluate(linear, x_te, y_te, weight_decay)
    return {"linear_probe_acc": test_acc, "linear_probe_train_acc": train_acc, "linear_probe_train_loss": train_loss}


def tune_weight_decay(
    train_x: Tensor,
    train_y: Tensor,
    grid: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2),
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    **probe_kwargs: Any,
) -> tuple[float, dict[float, float]]:
    """Pick the probe's ``weight_decay`` on a held-out split of the *training* features (test set untouched).

    A ``seed``-ed random ``val_fraction`` of ``train_x`` is held out, :func:`linear_probe` is fitted on the rest for
    every value in ``grid`` (``probe_kwargs`` passed through), and the value with the best held-out accuracy is
    returned (ties: the larger, more regularised value), with ``{weight_decay: held-out accuracy}``.
    """
    _check_xy(train_x, train_y, "train")
    grid = [float(wd) for wd in grid]
    if not grid or any(not (math.isfinite(wd) and wd >= 0) for wd in grid):
        raise ValueError(f"grid must be a non-empty list of finite non-negative weight decays, got {grid}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    n = train_x.shape[0]
    n_val = int(round(val_fraction * n))
    if not 1 <= n_val < n:
        raise ValueError(f"val_fraction={val_fraction} of {n} samples leaves an empty train or validation split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(train_x.device)
    val, fit = perm[:n_val], perm[n_val:]
    scores = {wd: linear_probe(train_x[fit], train_y[fit], train_x[val], train_y[val], weight_decay=wd, seed=seed,
                               **probe_kwargs)["linear_probe_acc"] for wd in grid}
    best = max(scores, key=lambda wd: (scores[wd], wd))
    return best, scores
