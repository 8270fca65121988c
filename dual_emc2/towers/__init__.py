"""Towers φ, ψ: backbones, projection heads and the normalised encoder wrapped around them."""
from .heads import ContrastiveEncoder, ProjectionHead, build_image_encoder
from .image import RESNET_ARCHS, ResNetBackbone

__all__ = ["RESNET_ARCHS", "ContrastiveEncoder", "ProjectionHead", "ResNetBackbone", "build_image_encoder"]
