"""The M-H sampler's data types, imported by both the sampler (:mod:`dual_emc2.loss.estimators.emc2.chain`) and
the fused kernel (:mod:`dual_emc2.loss.estimators.emc2.chain_triton`), so neither imports the other at module level."""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["MHProposals", "MHResult"]


class MHResult(NamedTuple):
    """Output of :func:`mh_visit_counts`.

    counts:   [B, C] float32, number of post-burn-in steps chain ``i`` sat on in-batch candidate ``j``.
    index:    [B] int64, final in-batch column of each chain, ``-1`` if it ends on its (out-of-batch) init state.
    score:    [B] float32, score of each chain's final state (the stored init score if it never moved).
    stay:     [B] float32, post-burn-in steps spent on the out-of-batch init state.
    accepted: [B] float32, number of accepted proposals over all ``R`` steps.

    Example::

        res = mh_visit_counts(scores, beta=5.0, steps=8, burn_in=4)   # scores: [B, C]
        weights = res.counts / (8 - 4)                                  # visit frequencies of the post-burn-in steps
    """

    counts: Tensor
    index: Tensor
    score: Tensor
    stay: Tensor
    accepted: Tensor


class MHProposals(NamedTuple):
    """Pre-drawn randomness of ``R`` M-H steps for ``B`` chains, step-major for coalesced loads
    (:func:`~dual_emc2.loss.estimators.emc2.chain.draw_mh_proposals`).

    index: [R, B] int64, proposed candidate column; -1 proposes the stored out-of-batch state (``pool``).
    log_u: [R, B] float32, log of the acceptance uniform.

    Example::

        prop = draw_mh_proposals(valid, steps=8, generator=gen)   # valid: [B, C] bool
        prop.index.shape                                          # (8, B)
    """

    index: Tensor  # [R, B] int64, proposed candidate column; -1 proposes the stored out-of-batch state (pool)
    log_u: Tensor  # [R, B] float32, log of the acceptance uniform
