"""SimCLR-style unimodal contrastive learning on Fashion-MNIST with EMC² negatives, in plain torch.

    python examples/unimodal_simclr.py --steps 500 --batch-size 64
    python examples/unimodal_simclr.py --smoke

View layout of ``GlobalContrastiveLoss(..., mode="unimodal")``: ``x_features`` holds view 1 of the images ``index``
and ``y_features`` view 2 of the same images, so row i of both is image ``index[i]`` ([b, d] each).  Every one of the
2b views is an anchor; its positive is the other view of its image, the other images' views its negatives (with
``infonce`` this is NT-Xent).  EMC²'s chain states are views too: before each forward the loss names the views it
needs (``state_request``: image, view, epoch), the dataset regenerates them (its augmentation is seeded by
(seed, epoch, image, view)), and they go through the encoder in the same forward as the batch, so a state is scored
by the same function as the batch's views.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dual_emc2.data.augment import simclr_transform
from dual_emc2.data.image_sets import build_image_dataset, dataset_stats
from dual_emc2.loss.global_loss import GlobalContrastiveLoss


class TwoViews(Dataset):
    """(index, view 0, view 1) of the first ``n`` images: two draws of the SimCLR augmentation, each seeded by
    (seed, epoch, image, view) so that any view can be drawn again later (:meth:`view`)."""

    def __init__(self, images, transform, n: int, seed: int = 0) -> None:
        self.images, self.transform, self.n, self.seed, self.epoch = images, transform, n, seed, 0

    def __len__(self) -> int:
        return self.n

    def view(self, i: int, v: int, epoch: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 10_000_019 + i) * 2 + v)
            return self.transform(self.images[i][0])

    def __getitem__(self, i: int):
        return i, self.view(i, 0, self.epoch), self.view(i, 1, self.epoch)


def small_cnn(out_dim: int = 64, width: int = 32) -> nn.Module:
    """Conv encoder (28 → 7 px) with a 2-layer projection head."""
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.ReLU()]

    return nn.Sequential(*block(3, width), nn.MaxPool2d(2), *block(width, 2 * width), nn.MaxPool2d(2),
                         *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, 4 * width), nn.ReLU(), nn.Linear(4 * width, out_dim))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--subset", type=int, default=None, help="train on the first n images (default: all 60k)")
    ap.add_argument("--temperature", type=float, default=0.2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a few steps on 512 images (CPU, seconds)")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.batch_size, args.subset = 3, 16, 512
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    images = build_image_dataset("fashion_mnist", "train")  # PIL RGB 28×28, label
    n = min(args.subset or len(images), len(images))
    mean, std = dataset_stats("fashion_mnist")
    data = TwoViews(images, simclr_transform(28, mean, std, grey_input=True), n, seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)

    model = small_cnn().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    loss_fn = GlobalContrastiveLoss("emc2", num_samples=n, mode="unimodal").to(device)
    beta = 1.0 / args.temperature

    print(f"fashion_mnist: {n} images, batch {args.batch_size}, device {device}", flush=True)
    step, epoch, start = 0, 0, time.time()
    while step < args.steps:
        data.epoch = epoch  # read by the loader's __iter__ below (num_workers=0)
        for index, view0, view1 in loader:
            b = index.numel()
            # the chain states this step needs: (image, view, epoch) of each, drawn again exactly
            need = loss_fn.state_request(index, epoch=epoch)
            states = [data.view(i, v, e)[None] for i, v, e in need.y]
            pixels = torch.cat([view0, view1, *states]).to(device)
            z = F.normalize(model(pixels), dim=-1)  # one forward: view 0 rows, view 1 rows, then the states
            loss = loss_fn(z[:b], z[b:2 * b], index, beta, epoch=epoch, state_y=z[2 * b:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            print(f"step {step}/{args.steps} loss {loss.item():.4f} batch_objective "
                  f"{float(loss_fn.last_stats['batch_objective']):.4f} states {len(need.y)} "
                  f"({time.time() - start:.1f}s)", flush=True)
            if step >= args.steps:
                break
        epoch += 1
    print(f"done: {step} steps", flush=True)


if __name__ == "__main__":
    main()
