"""Adapters of :class:`dual_emc2.loss.global_loss.GlobalContrastiveLoss` to other libraries' training conventions.

* :mod:`dual_emc2.integrations.sentence_transformers`: :class:`GlobalContrastiveSTLoss`, a sentence-transformers loss
  (``loss(sentence_features, labels)`` with the dataset index as ``labels``).  Needs the ``st`` extra
  (``pip install -e ".[st]"``); imported lazily so that ``dual_emc2.integrations`` itself has no extra dependency.

open_clip and plain torch need no adapter: ``GlobalContrastiveLoss`` replaces ``ClipLoss`` / NT-Xent directly
(``examples/open_clip_emoji.py``, ``examples/unimodal_simclr.py``).
"""
from __future__ import annotations

from typing import Any

__all__ = ["GlobalContrastiveSTLoss"]


def __getattr__(name: str) -> Any:
    if name == "GlobalContrastiveSTLoss":
        from dual_emc2.integrations.sentence_transformers import GlobalContrastiveSTLoss

        return GlobalContrastiveSTLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
