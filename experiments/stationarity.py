#!/usr/bin/env python
"""Convergence to a stationary point of the global contrastive loss (EMC² section 4.5, Fig. 7, appendix D).

Protocol (paper: first 500 STL-10 images; here Fashion-MNIST, on disk everywhere): the first ``--images`` training
images, each with ``--views`` augmentations drawn once with a fixed seed, so D_pos (the view pairs of an image) and
D_neg(x) (every view of every other image) are finite and the exact L(θ) of eq. (1) and ‖∇L(θ)‖² are computable.
The exact values come from :func:`dual_emc2.loss.exact.exact_objective` (φ = ψ on all views, float64 loss,
two-pass chunked backprop), evaluated every ``--eval-every`` epochs.  The network has no batch norm (a small CNN, or
ResNet-18 with GroupNorm), so training and evaluation compute the same function.

Every estimator gets the same initial network and the same batch order (per seed).  By default (``--equal forwards``)
each one trains until a common budget of forward passes is spent (``--budget-forwards``, default SimCLR's forwards for
``--epochs`` epochs; re-encodes count), so an estimator that re-encodes takes fewer SGD steps; the step-size schedule
(``--lr-schedule``, ``--decay-start``) is a function of the fraction of the budget spent and evaluations fall every
``--eval-every`` epochs' worth of SimCLR forwards.  ``--equal samples`` gives every estimator ``--epochs`` epochs.
Defaults follow Table 3's "STL-10 subset" row: SGD, b = 4 images (8 views, 2b − 2 = 6 in-batch negatives per
anchor), β = 5, negative-cache refresh ρ = 0.1; weight decay is 0 here (with weight decay the iterates approach a
stationary point of L + λ‖θ‖²/2, not of L).

Estimators (``--estimators``), all through :func:`dual_emc2.loss.registry.build_estimator`:
  emc2             the default EMC² (no options): Rao–Blackwell weights = softmax over batch ∪ {chain state}, the
                   out-of-batch state's score exact (re-encoded without grad) and its gradient term re-encoded with
                   grad, the state moved by one exact draw from that softmax (~15 forwards a step at b = 4).
  emc2_q025        the same with reencode_fraction q = 0.25.
  emc2_batch       the previous estimator: M-H visit counts of R = (b − 1)·views steps proposing from the batch
                   (Algorithm 1), burn-in P, exact state score, out-of-batch state re-encoded.
  emc2_r1          emc2_batch with R = 1, P = 0.
  emc2_stale_drop  visit counts, batch proposals, stale stored score, out-of-batch state dropped: no extra forwards.
  simclr           InfoNCE over the in-batch candidates.
  sogclr           SogCLR, γ = 0.9.
  negative_cache   Lindgren et al.: cache of ψ over the negatives, refresh ρ, Gumbel-max draw, re-encode with grad.
                   As in the paper it contrasts against one image per negative: its cache holds view 0 of every
                   image (the estimator keys candidates by image and excludes only the anchor's own image).
  hcl              hard-negative loss (Robinson et al.), not in Fig. 7.

``--bias-iters`` adds the mean-field bias of each estimator at one fixed network (``--bias-at``), with its Monte-Carlo
noise from batch means over ``--bias-blocks`` blocks (see :func:`gradient_bias`).  ``--merge a.json,b.json`` combines
runs of one configuration on disjoint (estimator, seed) pairs (e.g. one process per seed) into ``--out``.

    python experiments/stationarity.py                 # default: 3 seeds, equal forwards, minutes on a 2-core CPU
    python experiments/stationarity.py --smoke         # seconds (CI)
    python experiments/stationarity.py --device cuda --arch resnet18 --epochs 400 --eval-every 20   # paper scale
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import (
    default_out,
    describe_machine,
    format_table,
    geomean,
    machine_info,
    pyplot,
    resolve_device,
    save_figure,
    write_json,
)
from torch import Tensor, nn

from dual_emc2.data.augment import simclr_transform
from dual_emc2.data.image_sets import build_image_dataset, dataset_stats
from dual_emc2.loss.estimators.base import ContrastiveBatch
from dual_emc2.loss.exact import exact_objective
from dual_emc2.loss.registry import build_estimator
from dual_emc2.towers.heads import build_image_encoder

DEFAULT_ESTIMATORS = ("emc2", "simclr", "sogclr", "negative_cache")
ALL_ESTIMATORS = ("emc2", "emc2_q025", "emc2_batch", "emc2_r1", "emc2_stale_drop", "simclr", "sogclr", "negative_cache",
                  "hcl")
BASELINES = ("simclr", "sogclr", "negative_cache")


@dataclass(frozen=True)
class Estimator:
    """How one curve's estimator is built: registry name, options, and whether candidates are keyed by view (the
    finite D_neg of eq. 1) or by image (negative cache: view 0 of each image)."""

    registry: str
    options: dict[str, Any]
    by_view: bool = True


def estimator_specs(batch: int, views: int, burn_in: int, dim: int, cache_refresh: float) -> dict[str, Estimator]:
    """The estimators of this protocol, keyed by curve label (see the module docstring)."""
    r = (batch - 1) * views  # in-batch negatives per anchor: the views of the other b − 1 images
    visits_batch = {"weights": "visits", "proposal": "batch"}  # Algorithm 1: M-H visit counts, in-batch proposals
    exact = {"state_score": "exact", "out_of_batch": "reencode"}
    return {
        "emc2": Estimator("emc2", {}),  # the default: Rao–Blackwell weights over batch ∪ {state}, exact draw
        "emc2_q025": Estimator("emc2", {"reencode_fraction": 0.25}),
        "emc2_batch": Estimator("emc2", {**visits_batch, **exact, "steps": r, "burn_in": burn_in}),
        "emc2_r1": Estimator("emc2", {**visits_batch, **exact, "steps": 1, "burn_in": 0}),
        "emc2_stale_drop": Estimator("emc2", {**visits_batch, "state_score": "stale", "out_of_batch": "drop",
                                              "steps": r, "burn_in": burn_in}),
        "simclr": Estimator("infonce", {}),
        "sogclr": Estimator("sogclr", {"gamma": 0.9}),
        "negative_cache": Estimator("negative_cache", {"dim": dim, "refresh": cache_refresh}, by_view=False),
        "hcl": Estimator("hcl", {}),
    }


class SmallCNN(nn.Module):
    """Conv(1→32, /2)–ReLU–Conv(32→64, /2)–ReLU–Conv(64→64, /2)–ReLU–mean-pool–Linear(64→d), L2-normalised output.
    No normalisation layers: train and eval modes compute the same function."""

    def __init__(self, dim: int = 32, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, 2, 1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(2 * width, dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=1)


def build_model(arch: str, dim: int) -> nn.Module:
    """``cnn`` (:class:`SmallCNN`) or a torchvision ResNet with GroupNorm, CIFAR stem, 1 input channel and a projector
    without batch norm (``resnet18``, ``resnet50``)."""
    if arch == "cnn":
        return SmallCNN(dim)
    return build_image_encoder(arch, True, 512, dim, in_channels=1, batch_norm=False, norm="group")


def fixed_views(n_images: int, n_views: int, seed: int) -> Tensor:
    """[n_images, n_views, 1, 28, 28]: ``n_views`` augmentations of each of the first ``n_images`` Fashion-MNIST
    training images, drawn once from ``seed`` (the view distribution of configs/fmnist_unimodal.yaml)."""
    base = build_image_dataset("fashion_mnist", "train")
    if not 0 < n_images <= len(base):
        raise ValueError(f"--images must be in [1, {len(base)}], got {n_images}")
    mean, std = dataset_stats("fashion_mnist")
    tf = simclr_transform(28, mean, std, crop_scale=(0.2, 1.0), jitter_strength=0.5, grayscale_p=0.0, blur=False,
                          grey_input=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        views = torch.stack([torch.stack([tf(base[i][0]) for _ in range(n_views)]) for i in range(n_images)])
    return views[:, :, :1].contiguous()  # grey images: the three channels are equal


def view_pairs(n: int, V: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Image id of every view (image-major rows) and the row of its positive (view v → view (v + 1) mod V)."""
    rows = torch.arange(n * V, device=device)
    view = rows % V
    return rows // V, rows - view + (view + 1) % V


def lr_factor(schedule: str, frac: float, decay_start: float) -> float:
    """Step-size multiplier at training progress ``frac`` in [0, 1] (fraction of the budget spent): ``constant``;
    ``cosine`` (from 1 to 0 over the run); ``const_cosine`` (1 until ``decay_start``, then cosine to 0);
    ``const_step`` (1 until ``decay_start``, then ×0.1, then ×0.01 from halfway through the rest); ``const_decades``
    (1 until ``decay_start``, then ×0.1, ×0.01 and ×0.001 over equal thirds of the rest)."""
    frac = min(max(frac, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * frac))
    if frac < decay_start:
        return 1.0
    rest = (frac - decay_start) / max(1e-12, 1 - decay_start)
    if schedule == "const_cosine":
        return 0.5 * (1 + math.cos(math.pi * rest))
    if schedule == "const_step":
        return 0.1 if rest < 0.5 else 0.01
    if schedule == "const_decades":
        return 10.0 ** -(1 + min(2, int(rest * 3)))
    raise ValueError(f"unknown --lr-schedule {schedule!r}")


def nominal_budget(args: argparse.Namespace, n: int) -> int:
    """SimCLR's forward passes for ``--epochs`` epochs: 2b views a step, n // b steps an epoch."""
    return args.epochs * (n // args.batch) * args.batch * args.views


def view_batch(anchors: Tensor, candidates: Tensor, rows: Tensor, image: Tensor, local: Tensor, view: Tensor, V: int,
               by_view: bool, encode: Any, plan: Any = None, state_features: Tensor | None = None) -> ContrastiveBatch:
    """The batch of b images × V fixed views.  By view (the finite D_neg of eq. 1): sample ids are images, candidate
    keys are view rows (so an EMC² chain state is a view), and the states the estimator planned come as
    ``state_features``; otherwise (negative cache) ids are images and ``encode`` maps image ids to features."""
    positive = local - view + (view + 1) % V
    if by_view:
        return ContrastiveBatch(anchors=anchors, candidates=candidates, positive=positive, anchor_ids=image,
                                candidate_ids=image, anchor_keys=rows, candidate_keys=rows, views_per_id=V,
                                state_plan=plan, state_features=state_features)
    return ContrastiveBatch(anchors=anchors, candidates=candidates, positive=positive, anchor_ids=image,
                            candidate_ids=image, anchor_keys=rows, encode_candidates=encode)


def plan_states(objective: Any, rows: Tensor, V: int) -> tuple[Any, Tensor]:
    """The estimator's plan of the chain states this batch needs and the view rows to encode with it (none for
    estimators without states)."""
    plan = objective.plan(rows, rows, views_per_id=V, row_offset=0, total_rows=rows.numel())
    if plan is None:
        return None, rows[:0]
    return plan, (plan.views.ids * V + plan.views.views).to(rows.device)


def run_one(label: str, spec: Estimator, views: Tensor, args: argparse.Namespace, seed: int,
            device: torch.device) -> dict[str, Any]:
    """Train one estimator from the seed's initial network; return its curve of exact (L, ‖∇L‖²).

    Equal forwards (``args.budget`` > 0): SGD steps until ``args.budget`` views have been encoded (re-encodes
    included), exact evaluations every ``--eval-every`` epochs' worth of SimCLR forwards, the step size a function of
    the fraction of the budget spent.  Equal samples (``args.budget`` == 0): ``--epochs`` epochs for everyone, the
    same checkpoints and schedule by steps."""
    n, V = views.shape[:2]
    b = args.batch
    torch.manual_seed(seed)
    model = build_model(args.arch, args.dim).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    steps_per_epoch = n // b
    end = args.budget if args.budget > 0 else nominal_budget(args, n)  # in forwards, or SimCLR-equivalent forwards
    gap = args.eval_every * steps_per_epoch * b * V
    flat = views.flatten(0, 1).to(device)  # [n·V, 1, 28, 28], view v of image k at row k·V + v
    image_of, positive_of = view_pairs(n, V, device)
    objective = build_estimator(spec.registry, num_keys=n * V, num_candidates=n * V if spec.by_view else n,
                                options=spec.options, defaults={"seed": seed}).to(device)
    objective.check_batch_shape((b - 1) * V)
    forwards = [0]  # views encoded, including the estimator's extra encodes
    steps = [0]

    def progress() -> int:
        return forwards[0] if args.budget > 0 else steps[0] * b * V

    def encode_candidates(ids: Tensor) -> Tensor:
        ids = ids.to(device)
        forwards[0] += ids.numel()
        return model(flat[ids] if spec.by_view else flat[ids * V])  # by image: view 0 of each image

    curve: list[dict[str, float]] = []
    train_s = 0.0

    def evaluate(checkpoint: int) -> None:
        model.eval()
        loss, sq = exact_objective(model, None, flat, None, positive_of, image_of, image_of, args.beta,
                                   model.parameters(), chunk=args.eval_chunk)
        opt.zero_grad(set_to_none=True)
        model.train()
        curve.append({"checkpoint": checkpoint, "epoch": steps[0] / steps_per_epoch, "steps": steps[0],
                      "samples": steps[0] * b, "forwards": forwards[0], "lr": opt.param_groups[0]["lr"],
                      "train_seconds": train_s, "loss": loss, "grad_norm_sq": sq})
        if args.progress:
            print(f"  {label} seed {seed}: forwards {forwards[0]:,} steps {steps[0]} lr {opt.param_groups[0]['lr']:.3g}"
                  f"  L {loss:.4f}  ‖∇L‖² {sq:.4g}", flush=True)

    evaluate(0)
    next_eval = min(gap, end)
    order_gen = torch.Generator().manual_seed(seed)
    local = torch.arange(b * V, device=device)
    view = local % V
    order, pos = None, n
    t0 = time.perf_counter()
    while progress() < end:
        if pos + b > n:
            order, pos = torch.randperm(n, generator=order_gen).to(device), 0
        img = order[pos:pos + b]
        pos += b
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(args.lr_schedule, progress() / end, args.decay_start)
        rows = (img[:, None] * V + torch.arange(V, device=device)).flatten()
        plan, state_rows = plan_states(objective, rows, V) if spec.by_view else (None, rows[:0])
        z = model(flat[torch.cat([rows, state_rows])])  # the states in the batch's forward
        forwards[0] += rows.numel() + state_rows.numel()
        image = image_of[rows]
        batch = view_batch(z[:rows.numel()], z[:rows.numel()], rows, image, local, view, V, spec.by_view,
                           encode_candidates, plan, z[rows.numel():])
        out = objective(batch, args.beta)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        steps[0] += 1
        if progress() >= next_eval:
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_s += time.perf_counter() - t0
            checkpoint = next_eval
            while next_eval <= progress() and next_eval < end:
                next_eval = min(next_eval + gap, end)
            evaluate(checkpoint if progress() < end else end)
            t0 = time.perf_counter()
    return {"curve": curve, "model": model}


def gradient_bias(model: nn.Module, views: Tensor, specs: dict[str, Estimator], labels: list[str],
                  args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    """Mean-field bias of each estimator at one fixed θ: how far its expected stochastic gradient is from ∇L(θ).

    With the features F = φ(all views; θ) frozen (an out-of-batch re-encode reads the frozen row, with grad where
    the estimator asks for it), each estimator starts from a fresh state, runs a burn-in of
    ``--bias-burn-in-epochs`` epochs (a chain moves only when its anchor is in the batch, so it needs many epochs to
    forget its start), then ``--bias-iters`` steps on random batches whose gradients with respect to F are averaged
    over K = ``--bias-blocks`` consecutive blocks (batch means).  With g = ∇_F L(θ) of eq. (1), J = ∂F/∂θ and
    d_k = Jᵀ(B̄_k − g) (parameter space), the squared bias ‖Jᵀ(E ĝ − g)‖² is estimated without the Monte-Carlo
    noise by the U-statistic Σ_{k≠l} d_k·d_l / (K(K − 1)) (= ‖d̄‖² − s²/K, s² the between-block variance), and the
    noise of the K-block mean by ``mc_noise`` = sqrt(s²/K) / ‖Jᵀg‖ (the RMS distance of the averaged gradient from its
    expectation); ``relative_bias_se`` is the jackknife (leave one block out) standard error of the relative bias.
    ``relative_bias_naive`` = ‖d̄‖/‖Jᵀg‖ includes the noise.  An unbiased estimator reads ≈ 0 within its noise; a
    biased one settles where its own mean field vanishes, at ‖∇L‖ ≈ its bias there.  Batch means assume the blocks
    are long compared with the estimator state's memory (``--bias-iters`` / K steps ≫ n / b).
    """
    from dual_emc2.loss.exact import global_contrastive_loss

    n, V = views.shape[:2]
    b = args.batch
    K = args.bias_blocks
    model.eval()
    flat = views.flatten(0, 1).to(device)
    with torch.no_grad():
        feats = torch.cat([model(x) for x in flat.split(args.eval_chunk)]).float()
    image_of, positive_of = view_pairs(n, V, device)
    f64 = feats.double().requires_grad_(True)
    (g,) = torch.autograd.grad(global_contrastive_loss(f64, f64, positive_of, image_of, image_of, args.beta), [f64])
    pg = pullback(model, flat, g, args.eval_chunk)
    norm_theta = math.sqrt(float(sum(x.square().sum() for x in pg)))
    local = torch.arange(b * V, device=device)
    view = local % V
    per_block = args.bias_iters // K
    out = {}
    for label in labels:
        spec = specs[label]
        objective = build_estimator(spec.registry, num_keys=n * V, num_candidates=n * V if spec.by_view else n,
                                    options=spec.options, defaults={"seed": 0}).to(device)
        objective.check_batch_shape((b - 1) * V)
        leaf = feats.clone().requires_grad_(True)

        def encode(ids: Tensor, leaf: Tensor = leaf, by_view: bool = spec.by_view) -> Tensor:
            ids = ids.to(device)
            return leaf[ids] if by_view else leaf[ids * V]

        gen = torch.Generator().manual_seed(0)
        order, pos = torch.randperm(n, generator=gen), 0
        burn = max(args.bias_iters // 5, args.bias_burn_in_epochs * (n // b))
        blocks = [torch.zeros_like(feats, dtype=torch.float64) for _ in range(K)]
        for it in range(burn + per_block * K):
            if pos + b > n:
                order, pos = torch.randperm(n, generator=gen), 0
            img = order[pos:pos + b].to(device)
            pos += b
            rows = (img[:, None] * V + torch.arange(V, device=device)).flatten()
            image = image_of[rows]
            plan, state_rows = plan_states(objective, rows, V) if spec.by_view else (None, rows[:0])
            batch = view_batch(leaf[rows], leaf[rows], rows, image, local, view, V, spec.by_view, encode, plan,
                               leaf[state_rows])
            (grad,) = torch.autograd.grad(objective(batch, args.beta).loss, [leaf])
            if it >= burn:
                blocks[(it - burn) // per_block] += grad.double()
        means = [blk / per_block for blk in blocks]
        mean = sum(means) / K
        # parameter space: d_k = Jᵀ(B̄_k − g), by chunked vector–Jacobian products; G = Gram matrix of the d_k
        d = [torch.cat([x.flatten() for x in pullback(model, flat, m - g, args.eval_chunk)]) for m in means]
        D = torch.stack(d)
        G = D @ D.t()
        off = (G.sum() - G.diagonal().sum()) / (K * (K - 1))
        dbar_sq = float(G.sum()) / K**2
        s2 = float((D - D.mean(0)).square().sum()) / (K - 1)
        jack = []
        for k in range(K):  # leave block k out
            keep = [j for j in range(K) if j != k]
            Gk = G[keep][:, keep]
            u = float((Gk.sum() - Gk.diagonal().sum()) / ((K - 1) * (K - 2))) if K > 2 else float(off)
            jack.append(math.sqrt(max(u, 0.0)) / norm_theta)
        jm = float(np.mean(jack))
        se = math.sqrt((K - 1) / K * sum((j - jm) ** 2 for j in jack))
        fd = torch.stack([m - g for m in means]).flatten(1)
        Gf = fd @ fd.t()
        off_f = float((Gf.sum() - Gf.diagonal().sum()) / (K * (K - 1)))
        s2_f = float((fd - fd.mean(0)).square().sum()) / (K - 1)
        out[label] = {"relative_bias": math.sqrt(max(float(off), 0.0)) / norm_theta,
                      "relative_bias_sq_signed": float(off) / norm_theta**2,
                      "relative_bias_se": se,
                      "mc_noise": math.sqrt(s2 / K) / norm_theta,
                      "relative_bias_naive": math.sqrt(dbar_sq) / norm_theta,
                      "bias_sq": float(off), "grad_norm_sq": norm_theta**2,
                      "relative_bias_features": math.sqrt(max(off_f, 0.0)) / float(g.norm()),
                      "mc_noise_features": math.sqrt(s2_f / K) / float(g.norm()),
                      "cosine_features": float(F.cosine_similarity(mean.flatten(), g.flatten(), dim=0)),
                      "blocks": K, "steps_per_block": per_block, "burn_in_steps": burn}
    return out


def chain_target_check(settings: list[tuple[int, int]], *, images: int, views: int, batch: int, beta: float,
                       spread: float = 0.3, iters: int = 300, reps: int = 2000, seed: int = 0
                       ) -> list[dict[str, float]]:
    """Does EMC²'s chain sample softmax(β s) over D_neg when its R steps per visit all propose from one mini-batch?

    One anchor with fixed scores s over the (images − 1)·views negatives (image scores ~ N(0, ``spread``), views
    jittered around them), ``reps`` independent copies of its chain.  Each iteration draws for every copy a batch of
    b − 1 other images (their views are the in-batch candidates), runs
    :func:`dual_emc2.loss.estimators.emc2.chain.mh_visit_counts`
    (R steps, burn-in P, exact score of the stored state, as ``state_score=refresh``) and counts the post-burn-in
    visits, the steps spent on the out-of-batch state included (as ``out_of_batch=reencode``).  Returns, per (R, P),
    the total variation between the counted samples (after the first third of the iterations) and softmax(β s),
    beside the TV of as many exact draws (the Monte-Carlo floor), and the mass on the hardest 1 % of negatives.
    """
    from dual_emc2.loss.estimators.emc2.chain import mh_visit_counts

    g = torch.Generator().manual_seed(seed)
    n_img = images - 1
    s = ((torch.randn(n_img, 1, generator=g) + 0.1 * torch.randn(n_img, views, generator=g)) * spread).clamp(-1, 1)
    s = s.flatten()
    target = torch.softmax(beta * s.double(), 0)
    hard = torch.argsort(s, descending=True)[:max(1, s.numel() // 100)]
    out = []
    for steps, burn_in in settings:
        state = torch.full((reps,), -1, dtype=torch.int64)
        visits = torch.zeros(s.numel(), dtype=torch.float64)
        for t in range(iters):
            imgs = torch.rand(reps, n_img, generator=g).argsort(dim=1)[:, :batch - 1]
            cand = (imgs[:, :, None] * views + torch.arange(views)).flatten(1)  # [reps, C] candidate ids
            hit = cand == state[:, None]
            init_index = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(state, -1))
            init_score = torch.where(state >= 0, s[state.clamp(min=0)], torch.full((reps,), float("-inf")))
            res = mh_visit_counts(s[cand], beta=beta, steps=steps, burn_in=burn_in, init_index=init_index,
                                  init_score=init_score, generator=g, backend="torch")
            if t >= iters // 3:
                visits.index_add_(0, cand.flatten(), res.counts.flatten().double())
                visits.index_add_(0, state.clamp(min=0), (res.stay * (state >= 0)).double())
            state = torch.where(res.index >= 0, cand.gather(1, res.index.clamp(min=0)[:, None])[:, 0], state)
        n = int(visits.sum())
        emp = visits / visits.sum()
        exact = torch.bincount(torch.multinomial(target.float(), n, replacement=True, generator=g),
                               minlength=s.numel()).double() / n
        out.append({"steps": steps, "burn_in": burn_in, "samples": n,
                    "tv": float(0.5 * (emp - target).abs().sum()),
                    "tv_exact_draws": float(0.5 * (exact - target).abs().sum()),
                    "hardest_1pct_mass": float(emp[hard].sum()), "hardest_1pct_mass_target": float(target[hard].sum())})
    return out


def pullback(model: nn.Module, inputs: Tensor, d: Tensor, chunk: int) -> list[Tensor]:
    """Jᵀd: the parameter gradient of ⟨model(inputs), d⟩, in float64, by chunks (vector–Jacobian product)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for x, dx in zip(inputs.split(chunk), d.split(chunk)):
        out = model(x)
        for t, gp in zip(total, torch.autograd.grad(out, params, dx.to(out.dtype), allow_unused=True)):
            if gp is not None:
                t += gp.double()
    return total


def summarise(values: list[float]) -> dict[str, Any]:
    return {"per_seed": values, "mean": float(np.mean(values)), "median": float(np.median(values)),
            "geomean": geomean(values), "min": float(np.min(values)), "max": float(np.max(values))}


def x_key(result: dict[str, Any]) -> str:
    return "checkpoint" if result["config"].get("budget", 0) > 0 else "samples"


def plot(result: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    key_x = x_key(result)
    for label, runs in result["curves"].items():
        m = min(len(r) for r in runs)
        x = np.array([p[key_x] for p in runs[0][:m]], dtype=float)
        for ax, key in zip(axes, ("loss", "grad_norm_sq")):
            vals = np.array([[p[key] for p in r[:m]] for r in runs])
            line, = ax.plot(x, np.median(vals, 0), label=label, lw=1.6)
            if len(runs) > 1:
                ax.fill_between(x, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.15)
    axes[0].set_title("exact L(θ), eq. (1)")
    axes[1].set_title("exact ‖∇L(θ)‖²")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("forward passes (views encoded, re-encodes included)" if key_x == "checkpoint"
                      else "samples accessed (images)")
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=8)
    c = result["config"]
    equal = f"equal forwards ({c['budget']:,})" if c.get("budget", 0) > 0 else "equal samples"
    sched = c["lr_schedule"] + (f" from {c['decay_start']:g}" if c["lr_schedule"].startswith("const_") else "")
    fig.suptitle(f"Fashion-MNIST, first {c['images']} images × {c['views']} fixed views, {c['arch']}, SGD lr "
                 f"{c['lr']} ({sched}), b = {c['batch']}, β = {c['beta']}, {equal}; median and "
                 f"range over {len(c['seeds'])} seed(s)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def finalise(result: dict[str, Any]) -> None:
    """Per-estimator summaries of the curves (final and last-fifth ‖∇L‖², final L, steps, forwards per step) and the
    ratios of the baselines' final ‖∇L‖² to EMC²'s."""
    for k in ("final_grad_norm_sq", "tail_grad_norm_sq", "final_loss", "train_seconds", "forwards_per_step",
              "steps", "forwards"):
        result[k] = {}
    for label, runs in result["curves"].items():
        tail = max(1, len(runs[0]) // 5)  # last fifth of the evaluations: less sensitive to the last step's noise
        result["final_grad_norm_sq"][label] = summarise([r[-1]["grad_norm_sq"] for r in runs])
        result["tail_grad_norm_sq"][label] = summarise([float(np.mean([p["grad_norm_sq"] for p in r[-tail:]]))
                                                        for r in runs])
        result["final_loss"][label] = summarise([r[-1]["loss"] for r in runs])
        result["train_seconds"][label] = float(np.mean([r[-1]["train_seconds"] for r in runs]))
        result["steps"][label] = [int(r[-1].get("steps", r[-1]["samples"] // result["config"]["batch"]))
                                  for r in runs]
        result["forwards"][label] = [int(r[-1]["forwards"]) for r in runs]
        result["forwards_per_step"][label] = float(np.mean([f / max(1, s) for f, s in
                                                            zip(result["forwards"][label], result["steps"][label])]))
    g = result["final_grad_norm_sq"]
    for k in [k for k in result if k.startswith("grad_norm_ratio_")]:
        del result[k]
    seeds = result.get("curve_seeds") or {k: result["config"]["seeds"] for k in g}
    result["curve_seeds"] = seeds
    if "emc2" in g:
        emc2 = dict(zip(seeds["emc2"], g["emc2"]["per_seed"]))
        for other in g:
            if other != "emc2":
                per = [a / emc2[s] for s, a in zip(seeds[other], g[other]["per_seed"]) if s in emc2]
                if not per:
                    continue
                result[f"grad_norm_ratio_{other}_over_emc2"] = g[other]["mean"] / g["emc2"]["mean"]
                result[f"grad_norm_ratio_{other}_over_emc2_per_seed"] = per
                result[f"grad_norm_ratio_{other}_over_emc2_min_over_seeds"] = min(per)
    result["lowest_final_grad_norm_sq"] = min(g, key=lambda k: g[k]["mean"])


def merge(paths: list[str]) -> dict[str, Any]:
    """One result from several runs of one configuration on (estimator, seed) pairs that do not overlap, e.g. one
    process per seed or per group of estimators: curves concatenated per estimator in seed order; the chain check
    and the bias check taken from the first run that has them."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    base = parts[0]
    for p in parts:
        for k in ("lr", "lr_schedule", "decay_start", "budget", "epochs", "images", "views", "batch", "beta", "arch",
                  "dim", "view_seed", "cache_refresh", "burn_in"):
            if p["config"].get(k) != base["config"].get(k):
                raise ValueError(f"merge: config {k} differs ({base['config'].get(k)} vs {p['config'].get(k)})")
    runs: dict[str, dict[int, Any]] = {}
    for p in parts:
        for label, curves in p["curves"].items():
            for seed, curve in zip(p["config"]["seeds"], curves):
                if seed in runs.setdefault(label, {}):
                    raise ValueError(f"merge: {label} seed {seed} appears twice")
                runs[label][seed] = curve
    result = {k: v for k, v in base.items() if k not in ("curves", "estimators", "chain_check", "gradient_bias")}
    result["config"] = dict(base["config"])
    result["config"]["seeds"] = sorted({s for r in runs.values() for s in r})
    result["config"]["estimators"] = list(runs)
    result["command"] = [p["command"] for p in parts]
    result["merged_from"] = [str(p) for p in paths]
    result["wall_seconds"] = [p.get("wall_seconds") for p in parts]
    result["estimators"] = {k: v for p in parts for k, v in p["estimators"].items()}
    result["curve_seeds"] = {label: sorted(r) for label, r in runs.items()}
    result["curves"] = {label: [r[s] for s in sorted(r)] for label, r in runs.items()}
    for key in ("chain_check", "gradient_bias"):
        found = [p[key] for p in parts if key in p]
        if found:
            result[key] = found[0]
    finalise(result)
    return result


def report(result: dict[str, Any]) -> None:
    g = result["final_grad_norm_sq"]
    labels = list(result["curves"])
    e = g.get("emc2", {}).get("median", float("nan"))
    rows = [[k, result["final_loss"][k]["median"], g[k]["median"], g[k]["min"], g[k]["max"],
             result["tail_grad_norm_sq"][k]["median"], g[k]["median"] / e, result["forwards_per_step"][k],
             int(np.median(result["steps"][k])), result["train_seconds"][k]] for k in labels]
    c = result["config"]
    equal = f"equal forwards {c['budget']:,}" if c.get("budget", 0) > 0 else f"equal samples, {c['epochs']} epochs"
    print(f"\n{len(c['seeds'])} seed(s), {equal}, {describe_machine(result['machine'])}")
    print(format_table(["estimator", "final L (median)", "final ‖∇L‖² (median)", "min", "max", "tail median",
                        "÷ EMC²", "forwards/step", "steps", "train s"], rows))
    if "chain_check" in result:
        print("\nEMC² chain at fixed scores, R steps per visit proposing from one batch: distance of its counted "
              "samples from softmax(β s) over D_neg")
        print(format_table(["R", "P", "TV", "TV of exact draws", "mass on hardest 1 %", "target mass"],
                           [[c["steps"], c["burn_in"], c["tv"], c["tv_exact_draws"], c["hardest_1pct_mass"],
                             c["hardest_1pct_mass_target"]] for c in result["chain_check"]]))
    if "gradient_bias" in result:
        gb = result["gradient_bias"]
        est = [k for k in gb if isinstance(gb[k], dict)]
        print(f"\nMean-field bias at the {gb['at']} ({gb['iterations']} steps at fixed θ in {gb[est[0]]['blocks']} "
              "blocks): ‖E ĝ − ∇L‖ / ‖∇L‖ (noise removed), its jackknife s.e., the MC noise of the block mean, in "
              "parameters and in features")
        print(format_table(["estimator", "‖bias‖/‖∇L‖ (θ)", "± s.e.", "MC noise (θ)", "naive (θ)", "‖bias‖²",
                            "‖bias‖/‖∇L‖ (features)", "MC noise (features)", "cos (features)"],
                           [[k, gb[k]["relative_bias"], gb[k]["relative_bias_se"], gb[k]["mc_noise"],
                             gb[k]["relative_bias_naive"], gb[k]["bias_sq"], gb[k]["relative_bias_features"],
                             gb[k]["mc_noise_features"], gb[k]["cosine_features"]] for k in est]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=500, help="first N Fashion-MNIST training images")
    ap.add_argument("--views", type=int, default=2, help="pre-computed augmentations per image")
    ap.add_argument("--epochs", type=int, default=20,
                    help="run length: epochs (equal samples), or SimCLR's forwards for so many epochs (equal forwards)")
    ap.add_argument("--equal", choices=("forwards", "samples"), default="forwards",
                    help="compare at equal forward passes (re-encodes count; default) or at equal samples accessed")
    ap.add_argument("--budget-forwards", type=int, default=0,
                    help="forward-pass budget of every estimator (--equal forwards; 0: SimCLR's for --epochs)")
    ap.add_argument("--batch", type=int, default=4, help="b images per step (2b views)")
    ap.add_argument("--beta", type=float, default=5.0)
    ap.add_argument("--lr", type=float, default=1e-2,
                    help="SGD step size (paper: 1e-3 for its ResNet-18 with batch norm; see RESULTS.md for 1e-3 here)")
    ap.add_argument("--lr-schedule", choices=("constant", "cosine", "const_cosine", "const_step", "const_decades"),
                    default="constant",
                    help="step size against the fraction of the budget spent (see lr_factor)")
    ap.add_argument("--decay-start", type=float, default=0.5,
                    help="const_cosine / const_step: fraction of the budget at the constant step size")
    ap.add_argument("--momentum", type=float, default=0.0)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--burn-in", type=int, default=3, help="EMC² visit-count variants' P (R = (b − 1) · views)")
    ap.add_argument("--cache-refresh", type=float, default=0.1, help="negative cache ρ")
    ap.add_argument("--arch", choices=("cnn", "resnet18", "resnet50"), default="cnn")
    ap.add_argument("--dim", type=int, default=32, help="feature dimension d")
    ap.add_argument("--eval-every", type=int, default=5,
                    help="epochs (equal forwards: epochs' worth of SimCLR forwards) between exact evaluations")
    ap.add_argument("--eval-chunk", type=int, default=500, help="views per forward in the exact evaluation")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bias-iters", type=int, default=0,
                    help="steps of the mean-field bias check at a fixed network (0: skip)")
    ap.add_argument("--bias-blocks", type=int, default=10, help="batch-mean blocks of the bias check (MC noise)")
    ap.add_argument("--bias-at", default="emc2",
                    help="network of the bias check: 'init' or an estimator label (its final first-seed network)")
    ap.add_argument("--bias-estimators", default=None, help="estimators of the bias check (default: --estimators)")
    ap.add_argument("--bias-burn-in-epochs", type=int, default=20,
                    help="epochs of estimator-state burn-in at fixed θ before the bias check averages")
    ap.add_argument("--chain-check-iters", type=int, default=300,
                    help="iterations of the fixed-score chain check (0: skip)")
    ap.add_argument("--chain-check-reps", type=int, default=2000, help="chain copies in the chain check")
    ap.add_argument("--view-seed", type=int, default=1234, help="seed of the pre-computed augmentations")
    ap.add_argument("--estimators", default=",".join(DEFAULT_ESTIMATORS),
                    help=f"comma-separated, from {','.join(ALL_ESTIMATORS)}")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--merge", default=None,
                    help="comma-separated result JSONs of one configuration on disjoint seeds: combine them into --out")
    ap.add_argument("--progress", action="store_true", help="print every exact evaluation")
    ap.add_argument("--smoke", action="store_true", help="tiny run for CI (seconds)")
    ap.add_argument("--out", default=None, help="JSON path (default experiments/results/stationarity[_smoke].json)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.images, args.epochs, args.eval_every, args.seeds = 16, 2, 1, "0"
        args.bias_iters, args.bias_burn_in_epochs, args.bias_blocks = 40, 2, 4
        args.chain_check_iters, args.chain_check_reps = 30, 200
        args.estimators = ",".join(e for e in ALL_ESTIMATORS if e != "emc2_stale_drop")
    names = [s for s in args.estimators.split(",") if s]
    unknown = [s for s in names if s not in ALL_ESTIMATORS]
    if unknown or not names:
        ap.error(f"--estimators: unknown {unknown}; choose from {', '.join(ALL_ESTIMATORS)}")
    args.estimator_list = names
    args.bias_list = [s for s in (args.bias_estimators or args.estimators).split(",") if s]
    if any(s not in ALL_ESTIMATORS for s in args.bias_list):
        ap.error(f"--bias-estimators: choose from {', '.join(ALL_ESTIMATORS)}")
    if args.bias_iters > 0 and args.bias_at != "init" and args.bias_at not in names:
        ap.error(f"--bias-at must be 'init' or one of --estimators, got {args.bias_at!r}")
    if args.bias_iters > 0 and (args.bias_blocks < 2 or args.bias_iters < args.bias_blocks):
        ap.error("--bias-blocks must be >= 2 and <= --bias-iters")
    args.seed_list = [int(s) for s in args.seeds.split(",") if s]
    if args.batch < 2 or args.views < 2:
        ap.error("--batch and --views must be >= 2 (every anchor needs a positive and a negative image)")
    if args.burn_in >= (args.batch - 1) * args.views:
        ap.error(f"--burn-in {args.burn_in} must be smaller than R = (b − 1)·views = {(args.batch - 1) * args.views}")
    if not 0.0 <= args.decay_start < 1.0:
        ap.error("--decay-start must be in [0, 1)")
    args.budget = 0 if args.equal == "samples" else (args.budget_forwards or nominal_budget(args, args.images))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else default_out("stationarity", args.smoke)
    if args.merge:
        result = merge([p for p in args.merge.split(",") if p])
        write_json(out, result)
        png = plot(result, out.with_suffix(".png"))
        report(result)
        print(f"wrote {out} and {png}")
        return 0
    wall0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    specs = estimator_specs(args.batch, args.views, args.burn_in, args.dim, args.cache_refresh)
    views = fixed_views(args.images, args.views, args.view_seed)
    config = {k: v for k, v in vars(args).items()
              if k not in ("estimator_list", "seed_list", "bias_list", "out", "seeds", "merge")}
    config.update(seeds=args.seed_list, estimators=args.estimator_list, R=(args.batch - 1) * args.views)
    equal = "equal forward passes (re-encodes included)" if args.budget > 0 else "equal samples accessed"
    result: dict[str, Any] = {
        "protocol": f"stationarity (EMC² Fig. 7): exact L(θ) and ‖∇L(θ)‖² at {equal}",
        "command": " ".join(["python", "experiments/stationarity.py", *(sys.argv[1:] if argv is None else argv)]),
        "config": config, "machine": machine_info(device),
        "estimators": {k: {"registry": specs[k].registry, "options": specs[k].options,
                           "negatives": "views of other images" if specs[k].by_view else "view 0 of other images"}
                       for k in args.estimator_list},
        "curves": {},
    }
    print(f"machine: {describe_machine(result['machine'])}; {equal}"
          + (f", budget {args.budget:,} forwards" if args.budget else ""), flush=True)
    bias_model = None
    if args.bias_iters > 0 and args.bias_at == "init":
        torch.manual_seed(args.seed_list[0])
        bias_model = build_model(args.arch, args.dim).to(device)
    for label in args.estimator_list:
        t0 = time.perf_counter()
        outs = [run_one(label, specs[label], views, args, s, device) for s in args.seed_list]
        runs = [o["curve"] for o in outs]
        if label == args.bias_at:
            bias_model = outs[0]["model"]
        result["curves"][label] = runs
        print(f"{label:<16} L = {np.mean([r[-1]['loss'] for r in runs]):.4f}  ‖∇L‖² = "
              f"{np.mean([r[-1]['grad_norm_sq'] for r in runs]):.3e}  steps {runs[0][-1]['steps']}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    finalise(result)
    if args.chain_check_iters > 0:
        r = (args.batch - 1) * args.views
        settings = sorted({(1, 0), (2, 1), (r, args.burn_in), (r, r - 1)})
        result["chain_check"] = chain_target_check(settings, images=args.images, views=args.views, batch=args.batch,
                                                   beta=args.beta, iters=args.chain_check_iters,
                                                   reps=args.chain_check_reps)
    if args.bias_iters > 0:
        t0 = time.perf_counter()
        bias = gradient_bias(bias_model, views, specs, args.bias_list, args, device)
        at = ("initial network" if args.bias_at == "init" else f"final network of {args.bias_at}") \
            + f", seed {args.seed_list[0]}"
        result["gradient_bias"] = {"at": at, "iterations": args.bias_iters, **bias}
        print(f"gradient bias at the {at}: {time.perf_counter() - t0:.0f} s", flush=True)
    result["wall_seconds"] = time.perf_counter() - wall0
    write_json(out, result)
    png = plot(result, out.with_suffix(".png"))
    report(result)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
