"""Two towers φ (x side) and ψ (y side) with projections to a shared dimension and β: s(x, y) = φ(x)ᵀψ(y) (eq. 1).

Tower kinds (``towers.kind``):
  * ``pretrained``: ``towers.x`` / ``towers.y`` name pretrained backbones that exist offline — ``minilm``
    (all-MiniLM-L6-v2 text) and ``efficientnet_lite0`` (ImageNet image) — each followed by a linear projection to
    ``towers.proj_dim`` (``null``: no projection, the backbones' widths must agree).  ``towers.shared`` makes φ = ψ
    (one text tower for both sides, the usual set-up for text–text retrieval).
  * ``open_clip``: an open_clip model built by config name (any of ``open_clip.list_models()``, or a path to a model
    config JSON) with random weights (``pretrained=None``, CLIP training from scratch) or from
    ``towers.open_clip_checkpoint``; x = its visual tower, y = its text tower, each with the model's own projection
    to ``embed_dim`` (plus ours when ``proj_dim`` differs).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from torch import Tensor, nn

from dual_emc2.data.pairs import PairSet, decode_rgb
from dual_emc2.errors import UsageError
from dual_emc2.towers.names import PRETRAINED_TOWERS, TOWER_KINDS
from dual_emc2.towers.pretrained_image import (
    EfficientNetLiteBackbone,
    OpenCLIPImageBackbone,
    image_transform,
    stack_images,
)
from dual_emc2.towers.temperature import InverseTemperature
from dual_emc2.towers.text import HFTextBackbone, OpenCLIPTextBackbone, minilm_path

__all__ = ["PRETRAINED_TOWERS", "TOWER_KINDS", "Tower", "TwoTowerModel", "build_backbone", "build_open_clip_towers",
           "build_two_tower", "check_modalities"]


class Tower(nn.Module):
    """backbone → linear projection (or none) → L2 normalisation, output in float32 (also under autocast).

    ``freeze_backbone`` stops the backbone's gradients and keeps it in eval mode (batch-norm statistics and dropout
    fixed); the projection still trains.

    Args:
        backbone: a module with ``modality`` (``"text"`` or ``"image"``) and ``out_dim`` (:mod:`~dual_emc2.towers.text`,
            :mod:`~dual_emc2.towers.pretrained_image`).
        proj_dim: output dimension of the bias-free linear projection; None: no projection.
        freeze_backbone: as above.

    Call: ``tower(tower.prepare(items))`` → [N, out_dim] unit-norm float32 embeddings.

    Example::

        tower = Tower(HFTextBackbone(minilm_path()), proj_dim=256)
        z = tower(tower.prepare(["a dog", "a cat"]))          # [2, 256], unit rows
    """

    def __init__(self, backbone: nn.Module, proj_dim: int | None, freeze_backbone: bool = False) -> None:
        super().__init__()
        if getattr(backbone, "modality", None) not in ("text", "image"):
            raise ValueError(f"backbone {type(backbone).__name__} must declare modality 'text' or 'image'")
        self.backbone = backbone
        in_dim = int(backbone.out_dim)
        if proj_dim is None:
            self.proj: nn.Module = nn.Identity()
            self.out_dim = in_dim
        else:
            if proj_dim < 1:
                raise ValueError(f"towers.proj_dim must be >= 1, got {proj_dim}")
            lin = nn.Linear(in_dim, proj_dim, bias=False)
            nn.init.normal_(lin.weight, std=in_dim ** -0.5)  # CLIP's projection initialisation
            self.proj = lin
            self.out_dim = proj_dim
        self.frozen = bool(freeze_backbone)
        if self.frozen:
            backbone.requires_grad_(False)
            backbone.eval()

    @property
    def modality(self) -> str:
        return self.backbone.modality

    def train(self, mode: bool = True) -> Tower:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def transform(self, size: int | None, augment: bool = False) -> Callable[[Any], Tensor] | None:
        """PIL → tensor transform for an image tower (its own fixed size wins over ``size``); None for text."""
        if self.modality != "image":
            return None
        fixed = getattr(self.backbone, "image_size", None)
        side = fixed if fixed is not None else size
        if side is None:
            raise ValueError("data.image_size must be set for image towers")
        return image_transform(int(side), self.backbone.mean, self.backbone.std, augment=augment)

    def prepare(self, items: list[Any]) -> Any:
        """Collate one side of a batch: tokenise texts, stack transformed images."""
        return self.backbone.tokenize(items) if self.modality == "text" else stack_images(items)

    def features(self, inputs: Any) -> Tensor:
        """Backbone features before the projection."""
        return self.backbone(inputs)

    def forward(self, inputs: Any) -> Tensor:
        p = self.proj(self.features(inputs))
        with torch.autocast(device_type=p.device.type, enabled=False):
            return F.normalize(p.float(), dim=-1)


class TwoTowerModel(nn.Module):
    """φ = ``x_tower``, ψ = ``y_tower`` (the same module when ``y_tower`` is None: shared weights) and β.

    One ``forward(x_inputs, y_inputs) -> (φ(x), ψ(y))`` call so that a DDP wrapper sees every parameter used.

    Args:
        x_tower: φ.
        y_tower: ψ, or None to share ``x_tower``; its ``out_dim`` must equal ``x_tower``'s.
        temperature: β.

    Call: ``model(x_inputs, y_inputs)`` → (φ(x) [b, d], ψ(y) [b, d]), unit rows; inputs as the towers' ``prepare``
    makes them.  :func:`build_two_tower` builds it from the ``towers.*`` config keys.

    Example::

        model = TwoTowerModel(Tower(EfficientNetLiteBackbone(), 256), Tower(HFTextBackbone(minilm_path()), 256),
                              InverseTemperature(14.28, learnable=True))
        zx, zy = model(model.x_tower.prepare(images), model.y_tower.prepare(captions))   # images: transformed [3, H, W]
        loss = loss_fn(zx, zy, index, model.temperature())
    """

    def __init__(self, x_tower: Tower, y_tower: Tower | None, temperature: InverseTemperature) -> None:
        super().__init__()
        self.x_tower = x_tower
        self.y_tower = y_tower
        self.temperature = temperature
        if y_tower is not None and y_tower.out_dim != x_tower.out_dim:
            raise ValueError(f"the towers' output dimensions differ ({x_tower.out_dim} vs {y_tower.out_dim}); "
                             "set towers.proj_dim")

    @property
    def shared(self) -> bool:
        return self.y_tower is None

    def tower(self, side: str) -> Tower:
        if side == "x":
            return self.x_tower
        if side == "y":
            return self.x_tower if self.y_tower is None else self.y_tower
        raise ValueError(f"side must be 'x' or 'y', got {side!r}")

    def encode_x(self, inputs: Any) -> Tensor:
        return self.x_tower(inputs)

    def encode_y(self, inputs: Any) -> Tensor:
        return self.tower("y")(inputs)

    def forward(self, x_inputs: Any, y_inputs: Any) -> tuple[Tensor, Tensor]:
        return self.encode_x(x_inputs), self.encode_y(y_inputs)

    @torch.no_grad()
    def embed(self, side: str, items: list[Any], *, batch_size: int = 256, device: torch.device | str = "cpu",
              image_size: int | None = None) -> Tensor:
        """Unit-norm embeddings [N, d] (float32, CPU) of raw items of one side (texts, or encoded image bytes),
        in batches, in eval mode (the previous mode is restored)."""
        tower = self.tower(side)
        tf = tower.transform(image_size)
        was = self.training
        self.eval()
        out = []
        try:
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                if tf is not None:
                    chunk = [tf(decode_rgb(v)) for v in chunk]
                out.append(tower(send_to_device(tower.prepare(chunk), device)).float().cpu())
        finally:
            self.train(was)
        if not out:
            return torch.zeros(0, tower.out_dim)
        return torch.cat(out)


def modality_fix(x_modality: str, y_modality: str) -> str:
    """The towers (and a shipped config) that fit pairs of these modalities, for error messages."""
    if x_modality == y_modality == "text":
        return ("text–text pairs take text towers: towers.kind=pretrained towers.x=minilm towers.y=minilm "
                "(configs/text_webdataset.yaml for shards, configs/text_wordnet.yaml)")
    if (x_modality, y_modality) == ("image", "text"):
        return ("image–caption pairs take an image x tower and a text y tower: towers.kind=open_clip "
                "(configs/clip_scratch_webdataset.yaml) or towers.x=efficientnet_lite0 towers.y=minilm "
                "(configs/clip_emoji.yaml)")
    return "pick towers that match the data (towers.x / towers.y / towers.kind)"


def check_modalities(model: TwoTowerModel, pairs: PairSet) -> None:
    """Each tower must take its side's modality (an image tower cannot embed captions, and vice versa); a
    UsageError names the towers that fit."""
    for side, have in (("x", pairs.x_modality), ("y", pairs.y_modality)):
        want = model.tower(side).modality
        if want != have:
            raise UsageError(f"{pairs.source}: side {side} holds {have} but the {side} tower takes {want}; "
                             f"{modality_fix(pairs.x_modality, pairs.y_modality)}")


def build_backbone(name: str, max_length: int = 128) -> nn.Module:
    """A pretrained backbone by name (:data:`PRETRAINED_TOWERS`)."""
    if name == "minilm":
        return HFTextBackbone(minilm_path(), max_length=max_length)
    if name == "efficientnet_lite0":
        return EfficientNetLiteBackbone(pretrained=True)
    raise ValueError(f"towers.x / towers.y: unknown pretrained tower {name!r}; expected one of {PRETRAINED_TOWERS}")


def _open_clip_name(model: str) -> str:
    import open_clip

    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"towers.open_clip_model: model config file not found: {path}")
        open_clip.add_model_config(str(path))
        return path.stem
    if model not in open_clip.list_models():
        import difflib

        hint = difflib.get_close_matches(model, open_clip.list_models(), n=3)
        raise ValueError(f"towers.open_clip_model: unknown open_clip model {model!r}"
                         + (f" (did you mean {', '.join(hint)}?)" if hint else "")
                         + "; see open_clip.list_models() or give a model-config .json path")
    return model


def build_open_clip_towers(model: str, checkpoint: str | None = None, proj_dim: int | None = None, *,
                           freeze_image: bool = False, freeze_text: bool = False) -> tuple[Tower, Tower, Any]:
    """(image tower, text tower, tokenizer) of an open_clip model: random weights (``pretrained=None``) or the
    weights of a local ``checkpoint`` file.  CLIP's own ``logit_scale`` is not trained (β is ours)."""
    import open_clip

    name = _open_clip_name(model)
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"towers.open_clip_checkpoint: file not found: {checkpoint}")
    clip = open_clip.create_model(name, pretrained=checkpoint, pretrained_image=False, pretrained_text=False)
    tokenizer = open_clip.get_tokenizer(name)
    pp = open_clip.get_model_preprocess_cfg(clip)
    embed_dim = int(open_clip.get_model_config(name)["embed_dim"])
    visual = clip.visual
    del clip.visual  # the text tower keeps the rest; each parameter lives in exactly one tower
    image = OpenCLIPImageBackbone(visual, embed_dim, pp["mean"], pp["std"])
    text = OpenCLIPTextBackbone(clip, tokenizer, embed_dim)
    proj = None if proj_dim in (None, embed_dim) else proj_dim
    return Tower(image, proj, freeze_image), Tower(text, proj, freeze_text), tokenizer


def build_two_tower(*, kind: str = "pretrained", x: str = "minilm", y: str = "minilm", shared: bool = False,
                    proj_dim: int | None = 256, freeze_x: bool = False, freeze_y: bool = False, max_length: int = 32,
                    open_clip_model: str = "RN50", open_clip_checkpoint: str | None = None, beta: float = 14.28,
                    learnable_beta: bool = False) -> TwoTowerModel:
    """A :class:`TwoTowerModel`: pretrained backbones ``x`` / ``y`` by name (:data:`PRETRAINED_TOWERS`) each with a
    projection to ``proj_dim`` (``kind="pretrained"``; ``shared``: one tower for both sides), or the image and text
    towers of an open_clip model (``kind="open_clip"``), and β (``beta``, ``learnable_beta``).  The keywords are the
    ``towers.*`` config keys (their names are kept in the messages).

    Example::

        model = build_two_tower(kind="pretrained", x="minilm", y="minilm", shared=True, proj_dim=None, beta=20.0)
        zx, zy = model(model.x_tower.prepare(["dog"]), model.y_tower.prepare(["a domestic canine"]))
    """
    temperature = InverseTemperature(beta, learnable_beta)
    if kind == "open_clip":
        if shared:
            raise ValueError("towers.shared=true needs towers.kind=pretrained (open_clip has an image and a text "
                             "tower)")
        tx, ty, _ = build_open_clip_towers(open_clip_model, open_clip_checkpoint, proj_dim, freeze_image=freeze_x,
                                           freeze_text=freeze_y)
        return TwoTowerModel(tx, ty, temperature)
    if kind != "pretrained":
        raise ValueError(f"towers.kind: expected one of {TOWER_KINDS}, got {kind!r}")
    if shared:
        if x != y:
            raise ValueError(f"towers.shared=true needs towers.x == towers.y, got {x!r} and {y!r}")
        if freeze_x != freeze_y:
            raise ValueError("towers.shared=true: towers.freeze_x and towers.freeze_y must agree")
        return TwoTowerModel(Tower(build_backbone(x, max_length), proj_dim, freeze_x), None, temperature)
    tx = Tower(build_backbone(x, max_length), proj_dim, freeze_x)
    ty = Tower(build_backbone(y, max_length), proj_dim, freeze_y)
    if proj_dim is None and tx.out_dim != ty.out_dim:
        raise ValueError(f"towers.proj_dim=null needs equal backbone widths, got {x}={tx.out_dim} and "
                         f"{y}={ty.out_dim}; set towers.proj_dim")
    return TwoTowerModel(tx, ty, temperature)
