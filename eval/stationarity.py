#!/usr/bin/env python
"""Convergence to a stationary point of the global contrastive loss (EMC² section 4.5, Fig. 7, appendix D).

Protocol: the first ``--images`` Fashion-MNIST training images, each with ``--views`` augmentations computed once
(so D_pos and D_neg are finite and L(θ) of eq. (1) and ‖∇L(θ)‖² are computable exactly), a small CNN without
normalisation layers (train and eval modes coincide), SGD with batch b = 4 images (8 views), β = 5, lr 1e-3 and for
EMC² R = 2b − 2, P = 3 (Table 3, "STL-10 subset" row).  Every estimator sees the same batches (same seed) and the
same number of samples; the exact objective and squared gradient norm are evaluated on all views every
``--eval-every`` epochs with :func:`dual_emc2.metrics.exact.exact_objective`.

The negative cache, as in the paper, contrasts against un-augmented images: its cache holds view 0 of every image,
so it optimises a slightly different objective and also uses b extra forwards per step.

    python eval/stationarity.py                     # default size: minutes on a 2-core CPU
    python eval/stationarity.py --smoke             # seconds (CI)
    python eval/stationarity.py --epochs 200 --images 500 --seeds 0,1,2 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dual_emc2.data.augment import simclr_transform  # noqa: E402
from dual_emc2.data.image_sets import build_image_dataset, dataset_stats  # noqa: E402
from dual_emc2.metrics.exact import exact_objective  # noqa: E402
from dual_emc2.objectives import build_objective  # noqa: E402
from dual_emc2.objectives.base import ContrastiveBatch  # noqa: E402

ESTIMATORS = ("emc2", "emc2_stale_drop", "infonce", "sogclr", "negative_cache")


def variants(burn_in: int, dim: int) -> dict[str, tuple[str, dict]]:
    """label -> (registry name, options).  In this finite setting a chain state is one fixed view, so EMC² can use
    the exact acceptance ratio (``refresh``) and re-encode a state it still sits on (``reencode``): the chain of
    Algorithm 1 restricted to the batch plus its state.  ``emc2_stale_drop`` is the cheap variant (no extra
    forwards)."""
    return {
        "emc2": ("emc2", {"burn_in": burn_in, "state_score": "refresh", "out_of_batch": "reencode"}),
        "emc2_stale_drop": ("emc2", {"burn_in": burn_in, "state_score": "stale", "out_of_batch": "drop"}),
        "infonce": ("infonce", {}),
        "sogclr": ("sogclr", {"gamma": 0.9}),
        "negative_cache": ("negative_cache", {"dim": dim, "refresh": 0.1}),
    }


class SmallCNN(nn.Module):
    """Conv(1→32, s2) → Conv(32→64, s2) → Conv(64→64, s2) → mean-pool → Linear(64→d), L2-normalised; no norm layers."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=1)


def fixed_views(n_images: int, n_views: int, seed: int) -> Tensor:
    """[n_images, n_views, 1, 28, 28]: ``n_views`` SimCLR augmentations of each image, drawn once."""
    base = build_image_dataset("fashion_mnist", "train")
    mean, std = dataset_stats("fashion_mnist")
    tf = simclr_transform(28, mean, std, crop_scale=(0.3, 1.0), grayscale_p=0.0, blur=False, grey_input=True)
    g = torch.random.fork_rng(devices=[])
    with g:
        torch.manual_seed(seed)
        views = torch.stack([torch.stack([tf(base[i][0]) for _ in range(n_views)]) for i in range(n_images)])
    return views[:, :, :1]  # grey images: one channel


def run_one(name: str, views: Tensor, *, seed: int, epochs: int, batch: int, beta: float, lr: float, burn_in: int,
            dim: int, eval_every: int, device: str) -> dict:
    n, V = views.shape[:2]
    torch.manual_seed(seed)
    model = SmallCNN(dim).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    flat = views.flatten(0, 1).to(device)  # image-major: view v of image k at row k*V + v
    ids_all = torch.arange(n, device=device).repeat_interleave(V)
    pos_all = torch.arange(n * V, device=device)
    pos_all = pos_all - pos_all % V + (pos_all % V + 1) % V
    registry_name, opts = variants(burn_in, dim)[name]
    # ids: for the negative cache (which contrasts against un-augmented images) a sample is an image and its cache
    # entry is view 0; for the others a sample is a view, and the other views of the same image are masked out of
    # the negatives (the positive stays a positive)
    by_view = registry_name != "negative_cache"
    objective = build_objective(registry_name, num_keys=n * V, num_candidates=n * V if by_view else n,
                                options=opts, defaults={"seed": seed}).to(device)

    def encode_candidates(ids: Tensor) -> Tensor:
        return model(flat[ids]) if by_view else model(views[ids.cpu(), 0].to(device))

    curve = []

    def evaluate(epoch: int) -> None:
        loss, sq = exact_objective(model, None, flat, None, pos_all, ids_all, ids_all, beta, model.parameters(),
                                   chunk=500)
        opt.zero_grad(set_to_none=True)
        curve.append({"epoch": epoch, "samples": epoch * n, "loss": loss, "grad_norm_sq": sq})

    evaluate(0)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=gen)
        for lo in range(0, n - batch + 1, batch):
            img = order[lo:lo + batch].to(device)
            rows = (img[:, None] * V + torch.arange(V, device=device)[None, :]).flatten()
            z = model(flat[rows])
            image = img.repeat_interleave(V)
            view = torch.arange(rows.numel(), device=device) % V
            cols = torch.arange(rows.numel(), device=device)
            ids = rows if by_view else image
            same_image = image[:, None] == image[None, :]
            b = ContrastiveBatch(z, z, cols - view + (view + 1) % V, ids, ids, anchor_keys=rows,
                                 encode_candidates=encode_candidates,
                                 extra_negative_mask=~same_image if by_view else None)
            out = objective(b, beta)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
        if epoch % eval_every == 0 or epoch == epochs:
            evaluate(epoch)
    return {"curve": curve, "train_seconds": time.perf_counter() - t0}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in result["curves"].items():
        ep = np.array([p["epoch"] for p in runs[0]])
        for ax, key in zip(axes, ("loss", "grad_norm_sq")):
            vals = np.array([[p[key] for p in r] for r in runs])
            line, = ax.plot(ep, np.median(vals, 0), label=name)
            ax.fill_between(ep, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.2)
    axes[0].set_title("exact L(θ), eq. (1)")
    axes[1].set_title("exact ‖∇L(θ)‖²")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("epochs (samples accessed / images)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['images']} images × {result['views']} fixed views, b = {result['batch']}, "
                 f"β = {result['beta']}, SGD lr {result['lr']} (median and range over {len(result['seeds'])} seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--beta", type=float, default=5.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--burn-in", type=int, default=3)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--estimators", default=",".join(ESTIMATORS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny run for CI (seconds)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.images, args.epochs, args.eval_every, args.seeds = 24, 2, 1, "0"
    out = Path(args.out or f"eval/results/stationarity{'_smoke' if args.smoke else ''}.json")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [s for s in args.estimators.split(",") if s]
    views = fixed_views(args.images, args.views, seed=1234)
    result = {"images": args.images, "views": args.views, "batch": args.batch, "beta": args.beta, "lr": args.lr,
              "burn_in": args.burn_in, "epochs": args.epochs, "dim": args.dim, "seeds": seeds,
              "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "device": args.device, "threads": torch.get_num_threads()},
              "curves": {}, "final_grad_norm_sq": {}, "final_loss": {}, "train_seconds": {}}
    for name in names:
        runs = [run_one(name, views, seed=s, epochs=args.epochs, batch=args.batch, beta=args.beta, lr=args.lr,
                        burn_in=args.burn_in, dim=args.dim, eval_every=args.eval_every, device=args.device)
                for s in seeds]
        result["curves"][name] = [r["curve"] for r in runs]
        finals = [r["curve"][-1]["grad_norm_sq"] for r in runs]
        result["final_grad_norm_sq"][name] = {"per_seed": finals, "mean": float(np.mean(finals)),
                                              "median": float(np.median(finals))}
        result["final_loss"][name] = float(np.mean([r["curve"][-1]["loss"] for r in runs]))
        result["train_seconds"][name] = float(np.mean([r["train_seconds"] for r in runs]))
        print(f"{name:<16} final L = {result['final_loss'][name]:.4f}   final ‖∇L‖² = "
              f"{result['final_grad_norm_sq'][name]['mean']:.3e}   ({result['train_seconds'][name]:.1f} s/run)",
              flush=True)
    g = result["final_grad_norm_sq"]
    if "emc2" in g:
        for other in ("infonce", "sogclr", "negative_cache", "emc2_stale_drop"):
            if other in g:
                key = "simclr" if other == "infonce" else other
                result[f"grad_norm_ratio_{key}_over_emc2"] = g[other]["mean"] / g["emc2"]["mean"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(f"\n{'estimator':<16}{'final L':>10}{'final ‖∇L‖²':>14}{'× EMC²':>10}")
    for name in names:
        ratio = g[name]["mean"] / g["emc2"]["mean"] if "emc2" in g else float("nan")
        print(f"{name:<16}{result['final_loss'][name]:>10.4f}{g[name]['mean']:>14.3e}{ratio:>10.2f}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
