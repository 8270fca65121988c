"""Unimodal batches: see :mod:`dual_emc2.objectives.batches` (kept here for imports of earlier versions)."""
from dual_emc2.objectives.batches import unimodal_contrastive_batch

__all__ = ["unimodal_contrastive_batch"]
