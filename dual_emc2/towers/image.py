"""Image backbones: torchvision ResNets without their classifier, with the SimCLR small-image ("CIFAR") stem."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import Tensor, nn

from .names import NORMS, RESNET_ARCHS

_RESNETS: dict[str, Callable[..., torchvision.models.ResNet]] = {
    arch: getattr(torchvision.models, arch) for arch in RESNET_ARCHS
}

_STEM_ORDER = ("conv1", "bn1", "relu", "maxpool")
_BODY_ORDER = ("layer1", "layer2", "layer3", "layer4")


class ResNetBackbone(nn.Module):
    """A randomly initialised torchvision ResNet whose ``fc`` is removed; returns pooled features [N, out_dim].

    ``cifar_stem=True`` is the SimCLR variant for 28–32 px inputs (Chen et al. 2020, appendix B.9): the 7×7/2 first
    convolution becomes 3×3/1 and the max-pool is dropped, so a 32×32 input keeps a 4×4 map after ``layer4``.
    ``in_channels`` adapts the first convolution to grey-scale (1) or other inputs.  Submodule names equal
    torchvision's (``conv1``, ``layer1`` ...), so torchvision state dicts load with ``strict=False`` (no ``fc``).

    Args:
        arch: a torchvision ResNet name, ``"resnet18"`` … ``"resnet152"``
            (:data:`~dual_emc2.towers.names.RESNET_ARCHS`).
        cifar_stem: the small-image stem above.
        in_channels: image channels.
        norm: ``"batch"`` (default) or ``"group"`` (GroupNorm(min(32, c)), batch-independent).

    Call: ``backbone(x)`` with images [N, in_channels, H, W] → [N, out_dim] (512 for resnet18/34, 2048 for 50+).

    Example::

        backbone = ResNetBackbone("resnet18", cifar_stem=True)
        h = backbone(torch.randn(8, 3, 32, 32))       # [8, 512]
    """

    def __init__(self, arch: str = "resnet18", cifar_stem: bool = False, in_channels: int = 3,
                 norm: str = "batch") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"model.norm: expected one of {', '.join(NORMS)}, got {norm!r}")
        if arch not in _RESNETS:
            raise ValueError(f"arch: unknown ResNet {arch!r}; expected one of {', '.join(RESNET_ARCHS)}")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels: expected a positive int, got {in_channels!r}")
        # "group": GroupNorm(32) everywhere — batch-independent, so a multi-process run computes exactly what one
        # process with the global batch computes (SyncBatchNorm needs CUDA).
        norm_layer = None if norm == "batch" else (lambda c: nn.GroupNorm(min(32, c), c))
        net = _RESNETS[arch](weights=None, norm_layer=norm_layer)
        self.norm = norm
        self.arch = arch
        self.cifar_stem = bool(cifar_stem)
        self.in_channels = in_channels
        self.out_dim: int = net.fc.in_features
        # Inputs are converted to channels_last when the model was put in that memory format (see build_image_encoder).
        self.channels_last = False

        if cifar_stem or in_channels != 3:
            kernel, stride, padding = (3, 1, 1) if cifar_stem else (7, 2, 3)
            conv = nn.Conv2d(in_channels, net.conv1.out_channels, kernel, stride, padding, bias=False)
            # The same initialisation torchvision gives every convolution of a ResNet.
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            net.conv1 = conv
        if cifar_stem:
            net.maxpool = nn.Identity()

        for name in _STEM_ORDER + _BODY_ORDER + ("avgpool",):
            self.add_module(name, getattr(net, name))

    def feature_map(self, x: Tensor) -> Tensor:
        """The last convolutional map [N, out_dim, H', H'] (H' = H/8 with the CIFAR stem, H/32 otherwise)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x: expected images [N, {self.in_channels}, H, W], got shape {tuple(x.shape)}"
            )
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for name in _STEM_ORDER + _BODY_ORDER:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Globally average-pooled features [N, out_dim]."""
        return torch.flatten(self.avgpool(self.feature_map(x)), 1)
