"""Projection heads and the backbone + head encoder whose L2-normalised output feeds s(x, z) = φ(x)ᵀψ(z) (eq. 1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .image import ResNetBackbone


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


class ProjectionHead(nn.Module):
    """SimCLR MLP projector g(h): ``num_layers - 1`` blocks Linear–BN–ReLU (Linear–ReLU without BN), then a Linear.

    ``num_layers=1`` is a single linear map; ``num_layers=0`` is the identity and needs ``out_dim == in_dim``.
    Linear layers followed by BN carry no bias (BN's shift makes it redundant).
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
    """ResNet backbone + SimCLR projector; ``channels_last`` puts weights and inputs in NHWC (faster on tensor cores)."""
    backbone = ResNetBackbone(arch, cifar_stem=cifar_stem, in_channels=in_channels, norm=norm)
    head = ProjectionHead(backbone.out_dim, proj_hidden, proj_dim, num_layers=proj_layers, batch_norm=batch_norm)
    encoder = ContrastiveEncoder(backbone, head)
    if channels_last:
        backbone.channels_last = True
        encoder = encoder.to(memory_format=torch.channels_last)
    return encoder
