#!/usr/bin/env python
"""Representation geometry of SCL, HSCL, HUCL, EMC² and SimCLR on Fashion-MNIST (Jiang et al.), and the loss of
spectral-clustering batches (Cho et al.).

Protocol (small enough for a 2-core CPU): the first ``--images`` Fashion-MNIST training images, each with
``--pool`` SimCLR augmentations drawn once (two distinct ones per image and step); a small CNN (three strided
convolutions with batch norm → 128-d backbone features h → MLP head → ``--dim``-d output z, *not* normalised by the
model); Adam, ``--epochs`` epochs of batches of ``--batch`` images (2 views each), the same batches for every run.
Each run names an estimator of the registry and the feature normalisation its loss sees: ``sphere`` (f/‖f‖; SimCLR
and EMC² always), ``ball`` (f/max(1, ‖f‖)) or ``none`` (raw z).  After every epoch the geometry of the test images
is logged; at the end, on ``--test-images`` test images:

* the singular-value spectrum and effective rank of z (as the loss sees it) and of h (dimensional collapse);
* NC1 and the distance of the class means from a simplex ETF, on z and on h (neural collapse), also on the
  (un-augmented) training images (``train_z``, ``train_h``);
* alignment (pairs of train views) and uniformity (test images), both on L2-normalised z (Wang & Isola);
* 1-NN / 20-NN accuracy of h (train images → test images).

Spectral batches: with the trained SimCLR model, the mean in-batch loss (eq. 1 restricted to a batch) of the batches of
:class:`~dual_emc2.data.spectral.SpectralBatchSampler` (clusters of un-augmented embeddings) against uniform batches.

    python experiments/geometry.py                      # the RESULTS.md run (about 20 min on the shared 2-core CPU)
    python experiments/geometry.py --smoke              # seconds
    python experiments/geometry.py --checkpoint runs/default/checkpoints/<ckpt>  # geometry of a trainer checkpoint

Writes ``experiments/results/geometry.json`` (``--out``) and PNGs beside it: ``geometry_spectrum_z.png``,
``geometry_spectrum_h.png``, ``geometry_nc.png`` (NC1 / ETF distance / effective rank along training) and
``geometry_class_means.png`` (cosines of the centred class means; a simplex ETF is −1/9 off the diagonal).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dual_emc2.data.augment import eval_transform, simclr_transform
from dual_emc2.data.image_sets import build_image_dataset, dataset_stats
from dual_emc2.data.samplers import GlobalBatchSampler
from dual_emc2.data.spectral import SpectralBatchSampler
from dual_emc2.loss.estimators.base import ContrastiveBatch
from dual_emc2.loss.estimators.scl import normalize_features
from dual_emc2.loss.registry import build_estimator
from dual_emc2.metrics.geometry import (
    alignment,
    class_means,
    geometry_metrics,
    plot_spectra,
    singular_values,
    uniformity,
)
from dual_emc2.metrics.knn import knn_accuracy

# run label -> (registry name, options; "normalize" is the feature normalisation the loss sees)
RUNS: dict[str, tuple[str, dict]] = {
    "simclr": ("infonce", {}),
    "emc2": ("emc2", {}),
    "scl": ("scl", {"normalize": "sphere"}),
    "scl_none": ("scl", {"normalize": "none"}),
    "hscl": ("hscl", {"normalize": "sphere", "hardness": 1.0}),
    "hscl_ball": ("hscl", {"normalize": "ball", "hardness": 1.0}),
    "hscl_none": ("hscl", {"normalize": "none", "hardness": 1.0}),
    "hucl": ("hucl", {"normalize": "sphere", "hardness": 1.0}),
}
DEFAULT_RUNS = "simclr,emc2,scl,scl_none,hscl,hscl_ball,hscl_none,hucl"


class SmallEncoder(nn.Module):
    """Conv(1→32,s2)–BN–ReLU → Conv(32→64,s2)–BN–ReLU → Conv(64→128,s2)–BN–ReLU → mean-pool = h [128];
    head Linear–BN–ReLU–Linear → z [dim], returned un-normalised."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, 2, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.backbone = nn.Sequential(*block(1, 32), *block(32, 64), *block(64, 128), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.head = nn.Sequential(nn.Linear(128, 128, bias=False), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
                                  nn.Linear(128, dim))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.backbone(x)
        return h, self.head(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.encode(x)[1]


def load_images(split: str, n: int, pool: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(eval images [n, 1, 28, 28], ``pool`` SimCLR views [n, pool, 1, 28, 28] (none if pool = 0), labels [n])."""
    base = build_image_dataset("fashion_mnist", split)
    n = min(n, len(base))
    mean, std = dataset_stats("fashion_mnist")
    ev = eval_transform(28, mean, std)
    aug = simclr_transform(28, mean, std, crop_scale=(0.3, 1.0), grayscale_p=0.0, blur=False, grey_input=True)
    imgs, views, labels = [], [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(n):
            img, y = base[i]
            imgs.append(ev(img)[:1])
            if pool:
                views.append(torch.stack([aug(img)[:1] for _ in range(pool)]))
            labels.append(int(y))
    v = torch.stack(views) if pool else torch.empty(0)
    return torch.stack(imgs), v, torch.tensor(labels)


@torch.no_grad()
def encode(model: SmallEncoder, x: Tensor, chunk: int = 1000) -> tuple[Tensor, Tensor]:
    model.eval()
    hs, zs = zip(*(model.encode(c) for c in x.split(chunk)))
    return torch.cat(hs), torch.cat(zs)


def seen_features(z: Tensor, norm: str) -> Tensor:
    """z as the run's loss sees it."""
    return normalize_features(z, norm)


def train_run(label: str, views: Tensor, labels: Tensor, test_x: Tensor, test_y: Tensor, args: argparse.Namespace
              ) -> tuple[SmallEncoder, list[dict], float]:
    name, options = RUNS[label]
    options = dict(options)
    norm = options.get("normalize", "sphere")
    n = views.shape[0]
    torch.manual_seed(args.seed)
    model = SmallEncoder(args.dim)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    objective = build_estimator(name, num_keys=2 * n, num_candidates=n, options=options, defaults={"seed": args.seed})
    b, V = args.batch, 2
    objective.check_batch_shape(2 * b - 2)
    cols = torch.arange(b * V)
    view = cols % V
    positive = cols - view + (view + 1) % V
    gen = torch.Generator().manual_seed(args.seed)
    curve = []
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=gen)
        for lo in range(0, n - b + 1, b):
            img = order[lo:lo + b]
            pick = torch.argsort(torch.rand(b, views.shape[1], generator=gen), dim=1)[:, :V]  # 2 distinct views
            x = views[img[:, None], pick].flatten(0, 1)  # image-major: view v of image k at row kV + v
            z = model(x)
            if name not in ("scl", "hscl", "hucl"):
                z = F.normalize(z, dim=1)
            ids = img.repeat_interleave(V)
            y = labels[img].repeat_interleave(V)
            batch = ContrastiveBatch(z, z, positive, ids, ids, anchor_keys=ids * V + view,
                                     labels=y if objective.needs_labels else None,
                                     candidate_labels=y if objective.needs_labels else None)
            loss = objective(batch, args.beta).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{label}: non-finite loss at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        h, z = encode(model, test_x[: args.curve_images])
        zs = seen_features(z, norm)
        m = geometry_metrics(zs, test_y[: args.curve_images])
        mh = geometry_metrics(h, test_y[: args.curve_images])
        curve.append({"epoch": epoch, "loss": loss.item(), "z_nc1": m["nc1"], "z_etf_distance": m["etf_distance"],
                      "z_effective_rank": m["effective_rank"], "h_nc1": mh["nc1"],
                      "h_etf_distance": mh["etf_distance"], "h_effective_rank": mh["effective_rank"]})
        print(f"  [{label}] epoch {epoch}: loss {loss.item():.3f}, z eff. rank {m['effective_rank']:.2f}, "
              f"NC1 {m['nc1']:.3f}, ETF dist {m['etf_distance']:.3f}", flush=True)
    return model, curve, time.perf_counter() - t0


def final_geometry(model: SmallEncoder, norm: str, train_x: Tensor, train_y: Tensor, views: Tensor, test_x: Tensor,
                   test_y: Tensor) -> tuple[dict, dict[str, Tensor]]:
    h, z = encode(model, test_x)
    zs = seen_features(z, norm)
    out = {"z": geometry_metrics(zs, test_y), "h": geometry_metrics(h, test_y)}
    m = min(2000, views.shape[0])
    _, z0 = encode(model, views[:m, 0])
    _, z1 = encode(model, views[:m, 1])
    out["alignment"] = alignment(F.normalize(z0, dim=1), F.normalize(z1, dim=1))
    out["uniformity"] = uniformity(F.normalize(z, dim=1)[:4096])
    htr, ztr = encode(model, train_x)
    out["train_z"] = geometry_metrics(seen_features(ztr, norm), train_y)  # neural collapse is a training-set property
    out["train_h"] = geometry_metrics(htr, train_y)
    out |= knn_accuracy(htr, train_y, h, test_y, ks=(1, 20))
    _, means = class_means(zs, test_y)
    c = means - means.mean(0)
    cos = F.normalize(c, dim=1) @ F.normalize(c, dim=1).t()
    out["class_mean_cosines"] = cos.tolist()
    return out, {"z": singular_values(zs), "h": singular_values(h)}


def in_batch_loss(plan: Tensor, u: Tensor, v: Tensor, beta: float) -> float:
    """Mean over batches and anchors of −β u_iᵀv_i + log Σ_{j∈batch} e^{β u_iᵀv_j}."""
    s = beta * torch.einsum("tid,tjd->tij", u[plan], v[plan])
    return float((torch.logsumexp(s, dim=2) - s.diagonal(dim1=1, dim2=2)).mean())


def spectral_check(model: SmallEncoder, train_x: Tensor, train_y: Tensor, views: Tensor, args: argparse.Namespace
                   ) -> dict:
    """Spectral batches: in-batch loss of spectral batches (clusters of the un-augmented embeddings) vs uniform batches,
    on two augmented views per image."""
    n, b = train_x.shape[0], args.batch
    _, z = encode(model, train_x)
    _, u = encode(model, views[:, 0])
    _, v = encode(model, views[:, 1])
    z, u, v = (F.normalize(t, dim=1) for t in (z, u, v))
    sampler = SpectralBatchSampler(n, b, seed=args.seed, beta=args.beta)
    t0 = time.perf_counter()
    sampler.update_embeddings(torch.arange(n), z)
    seconds = time.perf_counter() - t0
    sampler.set_epoch(0)
    plan = sampler.global_batches()
    uniform = GlobalBatchSampler(n, b, seed=args.seed)
    rand = []
    for epoch in range(5):
        uniform.set_epoch(epoch)
        rand.append(in_batch_loss(torch.tensor(list(uniform)), u, v, args.beta))
    purity = float(np.mean([torch.bincount(train_y[p], minlength=10).max().item() / b for p in plan]))
    return {"images": n, "batch": b, "num_clusters": sampler.num_clusters, "refresh_seconds": seconds,
            "spectral_in_batch_loss": in_batch_loss(plan, u, v, args.beta),
            "uniform_in_batch_loss_mean": float(np.mean(rand)), "uniform_in_batch_loss_max": float(np.max(rand)),
            "spectral_label_purity": purity}


def plot_nc(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("z_nc1", "NC1 of z (log)"), ("z_etf_distance", "ETF distance of z class means"),
            ("z_effective_rank", "effective rank of z")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label, run in result["runs"].items():
        ep = [p["epoch"] for p in run["curve"]]
        for ax, (k, _) in zip(axes, keys):
            ax.plot(ep, [p[k] for p in run["curve"]], marker=".", label=label)
    for ax, (_, title) in zip(axes, keys):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[2].axhline(9, color="grey", ls=":", lw=1)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Fashion-MNIST, {result['images']} train images, test-set geometry along training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_class_means(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(result["runs"].items())
    cols = min(4, len(runs))
    rows = (len(runs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, run) in zip(axes.flat, runs):
        ax.axis("on")
        im = ax.imshow(np.array(run["final"]["class_mean_cosines"]), vmin=-1, vmax=1, cmap="coolwarm")
        ax.set_title(f"{label}: ETF dist {run['final']['z']['etf_distance']:.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7)
    fig.suptitle("cosines of centred class means of z (simplex ETF: 1 on the diagonal, −1/9 elsewhere)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def checkpoint_geometry(path: str, args: argparse.Namespace) -> dict:
    """Geometry of a trainer checkpoint (backbone h and unit-norm projection z) on the test set of its dataset."""
    from dual_emc2.metrics.geometry import encode_all
    from dual_emc2.train.checkpoint import load_checkpoint
    from dual_emc2.train.config import config_from_dict
    from dual_emc2.train.evaluate import eval_loaders
    from dual_emc2.train.models import build_unimodal_model

    payload = load_checkpoint(path, map_location="cpu", weights_only=False)
    cfg = config_from_dict(payload["config"])
    model = build_unimodal_model(cfg)
    model.load_state_dict(payload["model"])
    model.eval()
    _, test = eval_loaders(cfg.data.name, cfg.data.root, cfg.data.eval_train_split, cfg.data.eval_test_split,
                           cfg.data.image_size, batch_size=256, max_train=1, max_test=args.test_images)
    (h, z), y = encode_all(model.encoder.encode, test, "cpu")
    sv = {"z": singular_values(z), "h": singular_values(h)}
    out = {"checkpoint": str(path), "step": payload.get("step"), "estimator": cfg.loss.estimator,
           "z": geometry_metrics(z, y, unit=True), "h": geometry_metrics(h, y),
           "spectrum_z": sv["z"].tolist(), "spectrum_h": sv["h"].tolist()}
    stem = Path(args.out).with_suffix("")
    for k, s in sv.items():
        plot_spectra({cfg.loss.estimator: s}, f"{stem}_spectrum_{k}.png", title=f"{path}: {k}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--curve-images", type=int, default=1000, help="test images for the per-epoch geometry")
    ap.add_argument("--pool", type=int, default=4, help="augmented views drawn once per training image")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=128, help="images per batch (2 views each)")
    ap.add_argument("--beta", type=float, default=5.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-6)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma-separated, from {', '.join(RUNS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", default=None, help="only measure the geometry of this trainer checkpoint")
    ap.add_argument("--smoke", action="store_true", help="tiny run (seconds)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.images, args.test_images, args.curve_images, args.epochs, args.batch = 256, 200, 200, 1, 32
    out = Path(args.out or f"experiments/results/geometry{'_smoke' if args.smoke else ''}.json")
    args.out = str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        res = checkpoint_geometry(args.checkpoint, args)
        out.write_text(json.dumps(res, indent=2))
        print(json.dumps({k: v for k, v in res.items() if not k.startswith("spectrum")}, indent=2))
        return 0
    labels = [r for r in args.runs.split(",") if r]
    for r in labels:
        if r not in RUNS:
            raise SystemExit(f"--runs: unknown run {r!r}; choose from {', '.join(RUNS)}")
    t0 = time.perf_counter()
    train_x, views, train_y = load_images("train", args.images, args.pool, seed=1234)
    test_x, _, test_y = load_images("test", args.test_images, 0, seed=0)
    print(f"data: {len(train_x)} train images x {args.pool} views, {len(test_x)} test images "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    result = {"images": len(train_x), "test_images": len(test_x), "pool": args.pool, "epochs": args.epochs,
              "batch": args.batch, "beta": args.beta, "lr": args.lr, "dim": args.dim, "seed": args.seed,
              "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "runs": {}}
    spectra_z, spectra_h = {}, {}
    for label in labels:
        model, curve, seconds = train_run(label, views, train_y, test_x, test_y, args)
        norm = RUNS[label][1].get("normalize", "sphere")
        final, sv = final_geometry(model, norm, train_x, train_y, views, test_x, test_y)
        spectra_z[label], spectra_h[label] = sv["z"], sv["h"]
        result["runs"][label] = {"estimator": RUNS[label][0], "options": RUNS[label][1], "normalize": norm,
                                 "train_seconds": seconds, "curve": curve, "final": final,
                                 "spectrum_z": sv["z"].tolist(), "spectrum_h": sv["h"].tolist()}
        print(f"[{label}] {seconds:.0f}s: z eff. rank {final['z']['effective_rank']:.2f} "
              f"(rank {final['z']['rank']:.0f}), "
              f"NC1 {final['z']['nc1']:.3f}, ETF {final['z']['etf_distance']:.3f} (train: NC1 "
              f"{final['train_z']['nc1']:.3f}, ETF {final['train_z']['etf_distance']:.3f}); h eff. rank "
              f"{final['h']['effective_rank']:.1f}; 1-NN {final['knn1_acc']:.3f}", flush=True)
        if label == "simclr":
            result["spectral_batches"] = spectral_check(model, train_x, train_y, views, args)
            print(f"[spectral batches] {result['spectral_batches']}", flush=True)
        out.write_text(json.dumps(result, indent=2))
    stem = out.with_suffix("")
    title = f"Fashion-MNIST test set, {len(train_x)} train images, {args.epochs} epochs"
    plot_spectra(spectra_z, f"{stem}_spectrum_z.png", title=f"z as the loss sees it ({args.dim}-d); {title}")
    plot_spectra(spectra_h, f"{stem}_spectrum_h.png", title=f"backbone h (128-d); {title}")
    plot_nc(result, Path(f"{stem}_nc.png"))
    plot_class_means(result, Path(f"{stem}_class_means.png"))
    result["total_seconds"] = time.perf_counter() - t0
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out} and {stem}_*.png ({result['total_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
