"""Projection heads and the backbone + head encoder whose L2-normalised output feeds s(x, z) = φ(x)ᵀψ(z) (eq. 1)."""
from __future__ import annotations

import difflib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .image import ResNetBackbone
from .names import IMAGE_ARCHS, NORMS, SMALL_CNN  # IMAGE_ARCHS: the choices of config ``model.arch``


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


class SmallCNNBackbone(nn.Module):
    """A small convolutional backbone for 28–32 px images, cheap enough for multi-seed runs on one CPU thread.

    Three 3×3 convolution blocks Conv–Norm–ReLU with widths (w, 2w, 4w) and stride 2 each, then a global average
    pool: ``out_dim = 4w`` features (128 for the default w = 32).  A 28×28 input gives maps 14, 7, 4 px; about 2 M
    multiply-adds per 28 px image (ResNet-18 with the CIFAR stem: ~0.56 G), ~0.25 ms forward + backward per image on
    one CPU thread.  ``norm``: ``"batch"`` or
    ``"group"`` (GroupNorm(min(32, c)), batch-independent), as :class:`ResNetBackbone`.  Same interface as
    :class:`ResNetBackbone` (``feature_map``, ``forward`` → pooled [N, out_dim], ``out_dim``, ``channels_last``).

    Args:
        in_channels: image channels (1 grey-scale, 3 RGB).
        width: w, the channels of the first block.
        norm: ``"batch"`` (default) or ``"group"``.

    Call: ``backbone(x)`` with images [N, in_channels, H, W] → [N, 4w].

    Example::

        backbone = SmallCNNBackbone(in_channels=1)
        h = backbone(torch.randn(8, 1, 28, 28))      # [8, 128]
    """

    def __init__(self, in_channels: int = 3, width: int = 32, norm: str = "batch") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"model.norm: expected one of {', '.join(NORMS)}, got {norm!r}")
        _positive_int("in_channels", in_channels)
        _positive_int("width", width)
        self.arch, self.norm, self.in_channels, self.width = SMALL_CNN, norm, in_channels, width
        widths, strides = (width, 2 * width, 4 * width), (2, 2, 2)
        layers: list[nn.Module] = []
        c_in = in_channels
        for c, s in zip(widths, strides):
            conv = nn.Conv2d(c_in, c, 3, s, 1, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            layers += [conv, nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(min(32, c), c),
                       nn.ReLU(inplace=True)]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim: int = widths[-1]
        self.channels_last = False

    def feature_map(self, x: Tensor) -> Tensor:
        """The last convolutional map [N, out_dim, H', W'] (H' = ceil(H / 8))."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected images [N, {self.in_channels}, H, W], got shape {tuple(x.shape)}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Globally average-pooled features [N, out_dim]."""
        return torch.flatten(self.avgpool(self.feature_map(x)), 1)


def check_arch(arch: str) -> str:
    """``arch`` if it is one of :data:`IMAGE_ARCHS`, else a ValueError naming the closest choice."""
    if arch in IMAGE_ARCHS:
        return arch
    close = difflib.get_close_matches(str(arch), IMAGE_ARCHS, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"model.arch: unknown backbone {arch!r}{hint}; expected one of {', '.join(IMAGE_ARCHS)}")


class ProjectionHead(nn.Module):
    """SimCLR MLP projector g(h): ``num_layers - 1`` blocks Linear–BN–ReLU (Linear–ReLU without BN), then a Linear.

    ``num_layers=1`` is a single linear map; ``num_layers=0`` is the identity and needs ``out_dim == in_dim``.
    Linear layers followed by BN carry no bias (BN's shift makes it redundant).

    Args:
        in_dim: backbone feature dimension.
        hidden_dim: width of the hidden layers (used when ``num_layers >= 2``).
        out_dim: projection dimension (the d of s(x, z)).
        num_layers: Linear layers (0: identity).
        batch_norm: BatchNorm1d after each hidden Linear.

    Call: ``head(h)`` with [N, in_dim] → [N, out_dim] (not normalised; :class:`ContrastiveEncoder` normalises).

    Example::

        head = ProjectionHead(512, 2048, 128)         # SimCLR: 512 → 2048 → 128
        z = head(torch.randn(8, 512))                 # [8, 128]
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                 batch_norm: bool = True) -> None:
        super().__init__()
        _positive_int("in_dim", in_dim)
        _positive_int("out_dim", out_dim)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(f"num_layers: expected an int >= 0, got {num_layers!r}")
        if num_layers == 0 and out_dim != in_dim:
            raise ValueError(f"num_layers=0 (identity head) needs out_dim == in_dim, got {out_dim} != {in_dim}")
        if num_layers >= 2:
            _positive_int("hidden_dim", hidden_dim)
        self.in_dim, self.hidden_dim, self.out_dim, self.num_layers = in_dim, hidden_dim, out_dim, num_layers

        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(width, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            width = hidden_dim
        if num_layers >= 1:
            layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


class ContrastiveEncoder(nn.Module):
    """Tower φ = normalise(head(backbone(x))).

    ``features`` gives the backbone representation h used for evaluation (linear probe, k-NN); ``forward`` gives the
    unit-norm projection z used in the contrastive loss, always in float32 (also under autocast) so that scores
    s = zᵀz' and their softmax at large β are computed in full precision.

    Args:
        backbone: maps inputs to features h [N, out_dim] (e.g. :class:`ResNetBackbone`).
        head: maps h to the projection (e.g. :class:`ProjectionHead`).

    Call: ``encoder(x)`` → z [N, d], unit-norm float32.

    Example::

        encoder = ContrastiveEncoder(SmallCNNBackbone(), ProjectionHead(128, 512, 64))
        h, z = encoder.encode(torch.randn(8, 3, 32, 32))    # h: [8, 128] features, z: [8, 64] unit rows
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: Tensor) -> Tensor:
        """Backbone features h [N, out_dim] (before the projector)."""
        return self.backbone(x)

    def project(self, h: Tensor) -> Tensor:
        """Unit-norm float32 projection z of backbone features h."""
        p = self.head(h)
        with torch.autocast(device_type=p.device.type, enabled=False):
            return F.normalize(p.float(), dim=-1)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Both h (backbone features) and z (unit-norm float32 projection) from one forward pass."""
        h = self.features(x)
        return h, self.project(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.features(x))


def build_image_encoder(arch: str, cifar_stem: bool, proj_hidden: int, proj_dim: int, proj_layers: int = 2,
                        channels_last: bool = False, in_channels: int = 3,
                        batch_norm: bool = True, norm: str = "batch") -> ContrastiveEncoder:
    """Backbone (a ResNet, or ``arch="small_cnn"``: :class:`SmallCNNBackbone`, which ignores ``cifar_stem``) + SimCLR
    projector; ``channels_last`` puts weights and inputs in NHWC (faster on tensor cores)."""
    check_arch(arch)
    backbone: nn.Module
    if arch == SMALL_CNN:
        backbone = SmallCNNBackbone(in_channels=in_channels, norm=norm)
    else:
        backbone = ResNetBackbone(arch, cifar_stem=cifar_stem, in_channels=in_channels, norm=norm)
    head = ProjectionHead(backbone.out_dim, proj_hidden, proj_dim, num_layers=proj_layers, batch_norm=batch_norm)
    encoder = ContrastiveEncoder(backbone, head)
    if channels_last:
        backbone.channels_last = True
        encoder = encoder.to(memory_format=torch.channels_last)
    return encoder
