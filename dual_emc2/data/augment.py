"""SimCLR augmentations (Chen et al., 2020, appendix A) and the deterministic evaluation transform, on
``torchvision.transforms.v2``.

Inputs are PIL RGB images (the datasets of :mod:`dual_emc2.data.image_sets` convert grey images to RGB, so every
backbone takes 3 channels); outputs are normalised float32 tensors [3, size, size].  The geometric and colour
operations run on PIL images, which measured faster than on uint8 tensors at 28–96 px on this project's CPUs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torchvision.transforms import v2

Stats = Sequence[float]


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian-blur kernel of about 10 % of the image side (SimCLR): 96 → 9, 224 → 23; at least 3."""
    k = max(3, int(0.1 * size))
    return k if k % 2 == 1 else k + 1


def _check_stats(mean: Stats, std: Stats) -> tuple[list[float], list[float]]:
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean/std must have 3 values (RGB), got {mean} and {std}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std}")
    return mean, std


def _to_normalised_tensor(mean: Stats, std: Stats) -> list[v2.Transform]:
    mean, std = _check_stats(mean, std)
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def simclr_transform(size: int, mean: Stats, std: Stats, *, crop_scale: tuple[float, float] = (0.08, 1.0),
                     jitter_strength: float = 0.5, jitter_p: float = 0.8, grayscale_p: float = 0.2,
                     blur: bool | None = None, blur_p: float = 0.5, flip: bool = True,
                     grey_input: bool = False) -> v2.Compose:
    """The SimCLR view distribution: random resized crop (area fraction ``crop_scale``), horizontal flip, colour
    jitter with strength s (brightness, contrast, saturation 0.8 s, hue 0.2 s, hue capped at 0.5) applied with
    probability ``jitter_p``, random grayscale, Gaussian blur (σ ∈ [0.1, 2], kernel ≈ 10 % of ``size``, applied
    with probability ``blur_p``; on by default only when ``size >= 64``, as SimCLR drops it for CIFAR-sized
    images), then ToTensor and Normalize(mean, std).

    ``grey_input=True`` (images with R = G = B, e.g. MNIST served as RGB) drops the saturation and hue jitter and the
    random grayscale, which are exact identities on such images, so the view distribution is unchanged and a view
    costs about 40 % less CPU."""
    cfg = AugmentConfig(size=size, crop_scale=crop_scale, jitter_strength=jitter_strength, jitter_p=jitter_p,
                        grayscale_p=grayscale_p, blur=blur, blur_p=blur_p, flip=flip)
    ops: list[v2.Transform] = [v2.RandomResizedCrop(cfg.size, scale=cfg.crop_scale, antialias=True)]
    if cfg.flip:
        ops.append(v2.RandomHorizontalFlip())
    s = cfg.jitter_strength
    if s > 0 and cfg.jitter_p > 0:
        jitter = (v2.ColorJitter(0.8 * s, 0.8 * s) if grey_input
                  else v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, min(0.2 * s, 0.5)))
        ops.append(v2.RandomApply([jitter], p=cfg.jitter_p))
    if cfg.grayscale_p > 0 and not grey_input:
        ops.append(v2.RandomGrayscale(p=cfg.grayscale_p))
    if cfg.use_blur and cfg.blur_p > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(cfg.size), sigma=(0.1, 2.0))], p=cfg.blur_p))
    return v2.Compose(ops + _to_normalised_tensor(mean, std))


def eval_transform(size: int, mean: Stats, std: Stats, resize: int | None = None) -> v2.Compose:
    """Deterministic transform: resize the shorter side to ``resize`` (default ``size``), centre-crop ``size``,
    ToTensor, Normalize (ImageNet protocol: ``resize=256, size=224``)."""
    if int(size) < 1:
        raise ValueError(f"augment.size must be >= 1, got {size}")
    if resize is not None and int(resize) < int(size):
        raise ValueError(f"augment.eval_resize ({resize}) must be >= augment.size ({size})")
    r = int(resize) if resize is not None else int(size)
    ops: list[v2.Transform] = [v2.Resize(r, antialias=True), v2.CenterCrop(int(size))]
    return v2.Compose(ops + _to_normalised_tensor(mean, std))


@dataclass
class AugmentConfig:
    """Augmentation settings of a run (the ``augment`` config section); ``simclr``/``eval`` build the transforms.

    ``blur=None`` means "on when size >= 64"; ``eval_resize=None`` means resize straight to ``size``.

    Fields (the arguments of :func:`simclr_transform` / :func:`eval_transform`): ``size`` (output side),
    ``crop_scale`` (area fraction of the random resized crop), ``jitter_strength`` (s), ``jitter_p``, ``grayscale_p``,
    ``blur``, ``blur_p``, ``flip``, ``eval_resize``.  Values are checked at construction (ValueError).

    Example::

        cfg = AugmentConfig(size=96, crop_scale=(0.2, 1.0))
        mean, std = dataset_stats("stl10")
        train_tf, eval_tf = cfg.simclr(mean, std), cfg.eval(mean, std)
        view = train_tf(pil_image)                       # [3, 96, 96] float32
    """

    size: int = 32
    crop_scale: tuple[float, float] = field(default=(0.08, 1.0))
    jitter_strength: float = 0.5
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur: bool | None = None
    blur_p: float = 0.5
    flip: bool = True
    eval_resize: int | None = None

    def __post_init__(self) -> None:
        self.size = int(self.size)
        if self.size < 1:
            raise ValueError(f"augment.size must be >= 1, got {self.size}")
        cs = tuple(float(c) for c in self.crop_scale)
        if len(cs) != 2 or not 0 < cs[0] <= cs[1] <= 1:
            raise ValueError(f"augment.crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.crop_scale}")
        self.crop_scale = (cs[0], cs[1])
        if self.jitter_strength < 0:
            raise ValueError(f"augment.jitter_strength must be >= 0, got {self.jitter_strength}")
        for name in ("jitter_p", "grayscale_p", "blur_p"):
            p = getattr(self, name)
            if not 0 <= p <= 1:
                raise ValueError(f"augment.{name} must lie in [0, 1], got {p}")
        if self.eval_resize is not None and self.eval_resize < self.size:
            raise ValueError(f"augment.eval_resize ({self.eval_resize}) must be >= augment.size ({self.size})")

    @property
    def use_blur(self) -> bool:
        return self.size >= 64 if self.blur is None else bool(self.blur)

    def simclr(self, mean: Stats, std: Stats, grey_input: bool = False) -> v2.Compose:
        """The training view transform (:func:`simclr_transform`) with these settings; pass
        ``grey_input=dataset_info(name).grayscale``."""
        return simclr_transform(self.size, mean, std, crop_scale=self.crop_scale,
                                jitter_strength=self.jitter_strength, jitter_p=self.jitter_p,
                                grayscale_p=self.grayscale_p, blur=self.blur, blur_p=self.blur_p, flip=self.flip,
                                grey_input=grey_input)

    def eval(self, mean: Stats, std: Stats) -> v2.Compose:
        """The deterministic evaluation / EMC² re-encoding transform (:func:`eval_transform`)."""
        return eval_transform(self.size, mean, std, resize=self.eval_resize)
