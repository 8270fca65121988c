#!/usr/bin/env python
"""Mean-field bias at fixed θ, through the public loss: how far is E ĝ from ∇L for each estimator?

Two fixed tables of unit features X, Y (N = 64 pairs, d = 16; Y = normalize(X + ``--noise`` · ε / √d), seeded) play
the encoders' outputs.  The leaf tensors Xf, Yf (requires_grad) are fed to
``GlobalContrastiveLoss(estimator, N, mode="bimodal", **options)`` with batch size b = 4 and β = 5: every epoch a random
permutation of the N ids cut into N / b batches, and every step

    loss = loss_fn(Xf[idx], Yf[idx], idx, beta, encode_x=lambda i: Xf[i], encode_y=lambda i: Yf[i])
    ĝ = torch.autograd.grad(loss, (Xf, Yf))

(θ = (Xf, Yf) never moves, so the estimator state — chains, SogCLR's u, the negative cache — reaches its stationary
behaviour and stays there).  After ``--warmup-epochs`` epochs that are not counted, Ê ĝ is the average of ĝ over all
counted steps.  The exact gradient is that of the global contrastive loss (Yau et al., eq. 1) on the N pairs,

    L = ½ (L_xy + L_yx),   L_xy = mean_i [ −β s_ii + log Σ_{j≠i} exp(β s_ij) ],  s_ij = x_i · y_j,

in float64 by autograd.  Reported: the relative error ‖Ê ĝ − ∇L‖ / ‖∇L‖ after 200 and 800 epochs (3,200 for the rows
of ``--long-rows``), beside its Monte Carlo noise: the counted epochs are split into K = ``--blocks`` contiguous blocks,
the covariance of the mean is estimated from the block means (batch means: Cov ≈ Σ_k (m_k − m̄)(m_k − m̄)ᵀ / (K(K − 1))),
and sqrt(tr Cov) / ‖∇L‖ is the error an unbiased estimator would show.  error ≫ noise: bias; error ≈ noise: noise.
``bias`` = sqrt(max(error² − noise², 0)) is the noise-corrected estimate of the relative bias.

A self-check runs first: the default EMC² at b = N (every negative in the batch, so its Rao–Blackwell weights are the
full softmax) must reproduce ∇L to float32 rounding; it validates the scaling (mean over anchors, ½ of the two
directions) of the whole comparison.

Rows (estimator, options):
  emc2                  default (Rao–Blackwell weights over batch ∪ state, exact draws, re-encoded state, q = 1)
  emc2_q0.25            reencode_fraction = 0.25
  emc2_visits_pool      weights = visits, proposal = pool, burn_in = 2 (R = 3 M-H steps over batch ∪ state)
  emc2_visits_batch     weights = visits, proposal = batch, burn_in = 2 (Algorithm 1 with exact state scores)
  emc2_stale_drop       weights = visits, proposal = batch, burn_in = 2, state_score = stale, out_of_batch = drop
                        (the previous default)
  infonce, sogclr, negative_cache (dim = 16), hcl: library defaults

    python experiments/mean_field_bias.py --threads 1   # ~22 min wall on a shared 2-core CPU (3,200 epochs: emc2 only)
    python experiments/mean_field_bias.py --smoke         # seconds (CI)

Augmented setting (``--setting augmented``): unimodal, every image i has K augmented views, a fixed table
F[i, k] = normalize(X_i + ``--view-noise`` · ε_ik / √d) (the clean features X_i stand for the un-augmented image).
D_neg(x) is every view of every other image (each image's K views equally likely), so with the anchor a = F[i, k_a]
and its positive another independent view k_p,

    L = mean_(i, k_a) [ −β mean_(k_p) s(a, F[i, k_p]) + log Σ_(j ≠ i, k) exp(β s(a, F[j, k])) ],

exact in float64.  A step draws b images, each with two views whose draws are a function of (seed, epoch, image,
view): the views "regenerated from stored seeds".  ``GlobalContrastiveLoss(..., mode="unimodal")`` gets
``F[idx, k_0]``, ``F[idx, k_1]``; EMC²'s states are requested before the call and read from the table at the view
their (id, view, epoch) names (``state_request``), exactly as the trainer regenerates them.  Rows:
  emc2               the default, states as their exact views
  emc2_q0.25         reencode_fraction = 0.25
  emc2_unaugmented   states re-encoded by id from the clean X_i (the trainer's earlier feeding): not members of
                     D_neg, and their gradient goes to X, not to the views
  infonce, sogclr    library defaults
What remains for EMC² is what the theory does not cover: the anchor's own view changes every epoch, so a chain
tracks a target that moves (its state was drawn for the anchor's previous view).

    python experiments/mean_field_bias.py --setting augmented --threads 1
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import default_out, describe_machine, format_table, machine_info, pyplot, save_figure, write_json
from torch import Tensor

from dual_emc2.loss.global_loss import GlobalContrastiveLoss

ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "emc2": ("emc2", {}),
    "emc2_q0.25": ("emc2", {"reencode_fraction": 0.25}),
    "emc2_visits_pool": ("emc2", {"weights": "visits", "proposal": "pool", "burn_in": 2}),
    "emc2_visits_batch": ("emc2", {"weights": "visits", "proposal": "batch", "burn_in": 2}),
    "emc2_stale_drop": ("emc2", {"weights": "visits", "proposal": "batch", "burn_in": 2, "state_score": "stale",
                                 "out_of_batch": "drop"}),
    "infonce": ("infonce", {}),
    "sogclr": ("sogclr", {}),
    "negative_cache": ("negative_cache", {"dim": 16}),
    "hcl": ("hcl", {}),
}


AUGMENTED_ROWS: dict[str, tuple[str, dict[str, Any], str | None]] = {  # label → (estimator, options, state feeding)
    "emc2": ("emc2", {}, "views"),
    "emc2_q0.25": ("emc2", {"reencode_fraction": 0.25}, "views"),
    "emc2_unaugmented": ("emc2", {}, "clean"),
    "infonce": ("infonce", {}, None),
    "sogclr": ("sogclr", {}, None),
}


def augmented_tables(n: int, k: int, d: int, view_noise: float, seed: int) -> tuple[Tensor, Tensor]:
    """(clean X [n, d], views F [n, k, d]): unit features of n images and of k augmented views of each."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g), dim=1)
    views = F.normalize(x[:, None, :] + view_noise * torch.randn(n, k, d, generator=g) / math.sqrt(d), dim=2)
    return x, views


def view_draws(seed: int, epoch: int, n: int, k: int) -> Tensor:
    """[n, 2] which of the k views image i shows as its view 0 and view 1 in ``epoch`` (a function of the seed, the
    epoch, the image and the view, so a stored state's view is drawn again exactly)."""
    return torch.randint(k, (n, 2), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def exact_augmented_loss(views: Tensor, beta: float) -> Tensor:
    """L of the augmented setting (module docstring) for views [n, k, d], in their dtype."""
    n, k, d = views.shape
    flat = views.reshape(n * k, d)
    s = beta * flat @ flat.t()  # [nk, nk]
    image = torch.arange(n).repeat_interleave(k)
    same = image[:, None] == image[None, :]
    pos = -(s.masked_fill(~same, 0.0).sum(1) / k)
    neg = torch.logsumexp(s.masked_fill(same, float("-inf")), dim=1)
    return (pos + neg).mean()


def run_augmented_row(estimator: str, options: dict[str, Any], feeding: str | None, clean: Tensor, views: Tensor, *,
                      batch: int, beta: float, epochs: int, warmup: int, seed: int) -> tuple[Tensor, float]:
    """Per-epoch mean of ĝ with respect to the view table, [epochs, n·k·d] float64 (warm-up dropped), and seconds."""
    n, k, _ = views.shape
    loss_fn = GlobalContrastiveLoss(estimator, n, mode="unimodal", check_inputs=False, **options)
    table = views.clone().requires_grad_()
    x_clean = clean.clone().requires_grad_()  # the un-augmented images' features: not part of L
    draws = torch.stack([view_draws(seed, e, n, k) for e in range(warmup + epochs)])  # [E, n, 2]
    g = torch.Generator().manual_seed(seed)
    steps = n // batch
    per_epoch = torch.zeros(epochs, table.numel(), dtype=torch.float64)
    t0 = time.perf_counter()
    for e in range(warmup + epochs):
        perm = torch.randperm(n, generator=g)
        acc = torch.zeros(table.numel(), dtype=torch.float64)
        for step in range(steps):
            idx = perm[step * batch:(step + 1) * batch]
            v0, v1 = table[idx, draws[e, idx, 0]], table[idx, draws[e, idx, 1]]
            if feeding == "views":
                need = loss_fn.state_request(idx, epoch=e).y
                state = table[need.ids, draws[need.epochs, need.ids, need.views]]
                loss = loss_fn(v0, v1, idx, beta, epoch=e, state_y=state)
            elif feeding == "clean":
                loss = loss_fn(v0, v1, idx, beta, encode_x=lambda i: x_clean[i])
            else:
                loss = loss_fn(v0, v1, idx, beta)
            (grad,) = torch.autograd.grad(loss, table, allow_unused=True, materialize_grads=True)
            acc += grad.flatten().double()
        if e >= warmup:
            per_epoch[e - warmup] = acc / steps
    return per_epoch, time.perf_counter() - t0


def feature_tables(n: int, d: int, noise: float, seed: int) -> tuple[Tensor, Tensor]:
    """X: n unit rows; Y = normalize(X + noise · ε / √d), correlated with X (float32)."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g), dim=1)
    y = F.normalize(x + noise * torch.randn(n, d, generator=g) / math.sqrt(d), dim=1)
    return x, y


def exact_loss(x: Tensor, y: Tensor, beta: float) -> Tensor:
    """L = ½ (L_xy + L_yx), L_xy = mean_i [−β s_ii + log Σ_{j≠i} exp(β s_ij)], in the dtype of x, y."""
    s = beta * (x @ y.t())
    off = ~torch.eye(s.shape[0], dtype=torch.bool)
    neg_inf = torch.full_like(s, float("-inf"))
    l_xy = (-s.diagonal() + torch.logsumexp(torch.where(off, s, neg_inf), dim=1)).mean()
    l_yx = (-s.diagonal() + torch.logsumexp(torch.where(off, s, neg_inf).t(), dim=1)).mean()
    return 0.5 * (l_xy + l_yx)


def exact_gradient(x: Tensor, y: Tensor, beta: float) -> tuple[float, Tensor]:
    """(L, ∇L flattened over (X, Y)) in float64."""
    xd = x.double().clone().requires_grad_()
    yd = y.double().clone().requires_grad_()
    loss = exact_loss(xd, yd, beta)
    gx, gy = torch.autograd.grad(loss, (xd, yd))
    return float(loss.detach()), torch.cat([gx.flatten(), gy.flatten()])


def run_row(estimator: str, options: dict[str, Any], x: Tensor, y: Tensor, *, batch: int, beta: float, epochs: int,
            warmup: int, seed: int) -> tuple[Tensor, float]:
    """Per-epoch mean of ĝ over the epoch's steps, [epochs, 2·N·d] float64 (warm-up epochs dropped), and seconds."""
    n = x.shape[0]
    loss_fn = GlobalContrastiveLoss(estimator, n, mode="bimodal", check_inputs=False, **options)
    xf = x.clone().requires_grad_()
    yf = y.clone().requires_grad_()
    enc_x = lambda i: xf[i]  # noqa: E731
    enc_y = lambda i: yf[i]  # noqa: E731
    g = torch.Generator().manual_seed(seed)
    steps = n // batch
    per_epoch = torch.zeros(epochs, 2 * x.numel(), dtype=torch.float64)
    t0 = time.perf_counter()
    for e in range(warmup + epochs):
        perm = torch.randperm(n, generator=g)
        acc = torch.zeros(2 * x.numel(), dtype=torch.float64)
        for k in range(steps):
            idx = perm[k * batch:(k + 1) * batch]
            loss = loss_fn(xf[idx], yf[idx], idx, beta, encode_x=enc_x, encode_y=enc_y)
            gx, gy = torch.autograd.grad(loss, (xf, yf), allow_unused=True)
            gx = torch.zeros_like(xf) if gx is None else gx
            gy = torch.zeros_like(yf) if gy is None else gy
            acc += torch.cat([gx.flatten(), gy.flatten()]).double()
        if e >= warmup:
            per_epoch[e - warmup] = acc / steps
    return per_epoch, time.perf_counter() - t0


def error_and_noise(per_epoch: Tensor, upto: int, grad: Tensor, blocks: int) -> dict[str, float]:
    """Relative error of the mean of the first ``upto`` epochs and its batch-means noise (K contiguous blocks)."""
    g_norm = float(grad.norm())
    sub = per_epoch[:upto]
    mean = sub.mean(0)
    k = min(blocks, upto)
    size = upto // k
    block_means = sub[:k * size].reshape(k, size, -1).mean(1)
    tr_cov = float((block_means - block_means.mean(0)).square().sum()) / (k * (k - 1))
    err = float((mean - grad).norm()) / g_norm
    noise = math.sqrt(tr_cov) / g_norm
    cos = float(torch.nn.functional.cosine_similarity(mean, grad, dim=0))
    return {"epochs": upto, "rel_error": err, "rel_noise": noise, "blocks": k,
            "rel_bias": math.sqrt(max(err * err - noise * noise, 0.0)), "cosine": cos}


def plot(result: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    cmap = plt.get_cmap("tab10")
    for i, (label, row) in enumerate(result["rows"].items()):
        pts = row["points"]
        ep = [p["epochs"] for p in pts]
        ax.plot(ep, [p["rel_error"] for p in pts], "o-", color=cmap(i % 10), label=label)
        ax.plot(ep, [p["rel_noise"] for p in pts], ":", color=cmap(i % 10), alpha=0.8)
    ax.axhline(0.05, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    cfg = result["config"]
    ax.set_xlabel("epochs averaged (N / b steps each)")
    ax.set_ylabel("‖Ê ĝ − ∇L‖ / ‖∇L‖   (dotted: MC noise)")
    where = (f"augmented ({cfg['views']} views per image), " if cfg.get("setting") == "augmented" else "")
    ax.set_title(f"Mean-field bias at fixed θ, {where}\nN = {cfg['n']}, d = {cfg['dim']}, b = {cfg['batch']}, "
                 f"β = {cfg['beta']:g}; dashed: 0.05", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="N, pairs (samples)")
    ap.add_argument("--dim", type=int, default=16, help="feature dimension d")
    ap.add_argument("--noise", type=float, default=1.0, help="Y = normalize(X + noise · ε / √d)")
    ap.add_argument("--batch", type=int, default=4, help="b")
    ap.add_argument("--beta", type=float, default=5.0)
    ap.add_argument("--epochs", default="200,800", help="epoch counts at which every row is reported")
    ap.add_argument("--long-epochs", type=int, default=3200, help="extra report point for --long-rows (0: none)")
    ap.add_argument("--long-rows", default="emc2", help="rows run to --long-epochs")
    ap.add_argument("--warmup-epochs", type=int, default=20, help="epochs at fixed θ not counted (state burn-in)")
    ap.add_argument("--blocks", type=int, default=20, help="K, contiguous blocks of the batch-means noise estimate")
    ap.add_argument("--setting", choices=("fixed", "augmented"), default="fixed",
                    help="fixed: bimodal tables X, Y; augmented: unimodal, K views per image (module docstring)")
    ap.add_argument("--views", type=int, default=8, help="K, augmented views per image (--setting augmented)")
    ap.add_argument("--view-noise", type=float, default=0.5, help="F[i, k] = normalize(X_i + view_noise · ε / √d)")
    ap.add_argument("--rows", default=None, help=f"comma-separated; fixed: {','.join(ROWS)}; augmented: "
                    f"{','.join(AUGMENTED_ROWS)} (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--smoke", action="store_true", help="tiny run for CI (seconds)")
    ap.add_argument("--out", default=None, help="JSON path (default experiments/results/mean_field_bias[_smoke].json)")
    args = ap.parse_args(argv)
    table = ROWS if args.setting == "fixed" else AUGMENTED_ROWS
    if args.smoke:
        args.epochs, args.long_epochs, args.warmup_epochs, args.rows, args.blocks = "30", 0, 5, "emc2,infonce", 10
    args.epoch_list = sorted({int(e) for e in args.epochs.split(",") if e})
    args.row_list = [r for r in (args.rows or ",".join(table)).split(",") if r]
    args.long_list = [r for r in args.long_rows.split(",") if r] if args.long_epochs > 0 else []
    if any(r not in table for r in args.row_list) or not args.row_list:
        ap.error(f"--rows: choose from {', '.join(table)} (--setting {args.setting})")
    if args.n % args.batch or args.batch < 2:
        ap.error("--batch must be >= 2 and divide --n")
    if args.blocks < 2 or min(args.epoch_list) < args.blocks:
        ap.error("--blocks must be >= 2 and at most the smallest --epochs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    augmented = args.setting == "augmented"
    name = "mean_field_bias_augmented" if augmented else "mean_field_bias"
    out = Path(args.out) if args.out else default_out(name, args.smoke)
    check_err = None
    if augmented:
        clean, views = augmented_tables(args.n, args.views, args.dim, args.view_noise, args.seed)
        v64 = views.double().requires_grad_()
        exact = exact_augmented_loss(v64, args.beta)
        loss_value, grad = float(exact.detach()), torch.autograd.grad(exact, v64)[0].flatten()
    else:
        x, y = feature_tables(args.n, args.dim, args.noise, args.seed)
        loss_value, grad = exact_gradient(x, y, args.beta)
        # self-check: b = N puts every negative in the batch; the default EMC² is then exact
        check, _ = run_row("emc2", {}, x, y, batch=args.n, beta=args.beta, epochs=2, warmup=1, seed=args.seed)
        check_err = float((check.mean(0) - grad).norm() / grad.norm())
    config = {"setting": args.setting, "n": args.n, "dim": args.dim, "noise": args.noise, "batch": args.batch,
              "beta": args.beta,
              "epochs": args.epoch_list, "long_epochs": args.long_epochs, "long_rows": args.long_list,
              "warmup_epochs": args.warmup_epochs, "blocks": args.blocks, "seed": args.seed, "smoke": args.smoke,
              "steps_per_epoch": args.n // args.batch,
              **({"views": args.views, "view_noise": args.view_noise} if augmented else {})}
    result: dict[str, Any] = {
        "protocol": "mean-field bias at fixed θ through GlobalContrastiveLoss: ‖Ê ĝ − ∇L‖ / ‖∇L‖ with batch-means "
                    "noise",
        "command": " ".join(["python", "experiments/mean_field_bias.py", *(sys.argv[1:] if argv is None else argv)]),
        "config": config, "machine": machine_info(), "exact_loss": loss_value, "exact_grad_norm": float(grad.norm()),
        "check_full_batch_emc2_rel_error": check_err, "rows": {},
    }
    print(f"machine: {describe_machine(result['machine'])}", flush=True)
    print(f"L = {loss_value:.5f}, ‖∇L‖ = {float(grad.norm()):.4e}" + (
        f"; self-check (emc2 at b = N): relative error {check_err:.2e}" if check_err is not None else ""), flush=True)
    for label in args.row_list:
        report = list(args.epoch_list)
        if label in args.long_list and args.long_epochs > max(report):
            report.append(args.long_epochs)
        common = dict(batch=args.batch, beta=args.beta, epochs=max(report), warmup=args.warmup_epochs, seed=args.seed)
        if augmented:
            estimator, options, feeding = AUGMENTED_ROWS[label]
            per_epoch, secs = run_augmented_row(estimator, options, feeding, clean, views, **common)
        else:
            estimator, options = ROWS[label]
            per_epoch, secs = run_row(estimator, options, x, y, **common)
        pts = [error_and_noise(per_epoch, e, grad, args.blocks) for e in report]
        n_steps = (max(report) + args.warmup_epochs) * (args.n // args.batch)
        result["rows"][label] = {"estimator": estimator, "options": options, "seconds": secs,
                                 "ms_per_step": 1e3 * secs / n_steps, "points": pts}
        print(f"{label:<18} " + "  ".join(f"{p['epochs']} ep: {p['rel_error']:.3f} (noise {p['rel_noise']:.3f})"
                                          for p in pts) + f"  ({secs:.0f} s)", flush=True)
        write_json(out, {**result, "complete": False})  # rows so far, should a long run be stopped
    result["complete"] = True
    write_json(out, result)
    png = plot(result, out.with_suffix(".png"))
    cols = sorted({p["epochs"] for r in result["rows"].values() for p in r["points"]})
    rows = []
    for label, r in result["rows"].items():
        by = {p["epochs"]: p for p in r["points"]}
        cells = []
        for e in cols:
            p = by.get(e)
            cells.append(f"{p['rel_error']:.3f} ± {p['rel_noise']:.3f}" if p else "-")
        last = r["points"][-1]
        rows.append([label, " ".join(f"{k}={v}" for k, v in r["options"].items()) or "-", *cells, last["rel_bias"],
                     last["cosine"], r["ms_per_step"]])
    print(f"\n‖Ê ĝ − ∇L‖ / ‖∇L‖ ± MC noise (batch means, K = {args.blocks}) at fixed θ: N = {args.n}, d = {args.dim}, "
          f"b = {args.batch}, β = {args.beta:g}, {args.warmup_epochs} warm-up epochs; "
          f"{describe_machine(result['machine'])}")
    print(format_table(["row", "options", *[f"{e} epochs" for e in cols], "bias (noise-corrected, last)",
                        "cos(Ê ĝ, ∇L)", "wall ms/step"], rows, floatfmt=".3g"))
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
