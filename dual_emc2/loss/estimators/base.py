"""The one interface every estimator of the global contrastive loss (eq. 1) implements.

An estimator receives the features of a batch (anchors of this process against candidates gathered over all
processes) and returns a scalar *surrogate* whose gradient is the estimator's stochastic gradient of eq. (1):

    ∇L(θ) = β E_(x,y) [ −∇s(x, y) + E_{z ~ softmax(β s(x,·)) over D_neg(x)} ∇s(x, z) ]        (eq. 4–6)

Estimators differ only in how they weight the negatives (docs/DESIGN.md, section 1).  The trainer never branches on
the estimator: it builds a :class:`ContrastiveBatch` and calls ``estimator(batch, beta)``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

EncodeFn = Callable[[Tensor], Tensor]


@dataclass
class ContrastiveBatch:
    """Features and global ids of one step, as seen by one process.

    anchors:       [B, d] anchor features φ(x_i), L2-normalised, this process's rows.
    candidates:    [C, d] candidate features ψ(z_j), L2-normalised, gathered over processes (with grad).
    positive:      [B] int64, column in ``candidates`` of each anchor's positive y_i.
    anchor_ids:    [B] int64, global dataset index of each anchor's sample (x_i, y_i).
    candidate_ids: [C] int64, global dataset index of each candidate; a candidate is a negative of anchor i iff its
                   id differs from ``anchor_ids[i]`` (D_neg(x) = all samples but x's own, eq. 1 / eq. 21).
    anchor_keys:   [B] int64 key of each anchor's per-anchor state (chain, u); defaults to ``anchor_ids``.  In the
                   unimodal setting both views of an image are anchors, so keys are ``id * n_views + view``.
    candidate_keys: [C] int64 key of each candidate column, what an EMC² chain state points to; defaults to
                   ``candidate_ids``.  Unimodal: ``id * n_views + view``, so a stored state re-enters the batch at the
                   column of the *same* view.  ``candidate_keys // views_per_id`` must equal ``candidate_ids``.
    views_per_id:  candidate keys per sample id (1 bimodal, n_views unimodal); ``encode_candidates`` gets ids.
    epoch:         the epoch whose augmentation drew the candidates' views (0 where views do not change between
                   epochs): with the key it names a view exactly, so a stored EMC² state is a batch column only when
                   both agree.
    row_offset, total_rows: position of these anchors in the global batch (rank-invariant random numbers).
    encode_candidates: maps global ids to candidate features ψ(z) by sample id, under the caller's grad mode; used by
                   estimators that need out-of-batch candidates the batch did not encode (the negative cache; EMC²
                   when no ``state_features`` are given).  ``None`` where no such access exists.
    state_plan, state_features: an estimator's plan of the states this step needs (:meth:`EMC2.plan`, made before
                   the forward pass) and the features of those states, [n, d], one row per planned view, encoded in
                   the batch's own forward (same transform and mode as the candidates).
    extra_negative_mask: optional [B, C] bool, False removes further candidates (e.g. known false negatives).
    labels, candidate_labels: optional [B] and [C] int64 class labels of the anchors and candidates, for supervised
                   estimators (``needs_labels``; SCL/HSCL of Jiang et al.).  Both or neither.

    Shapes and the id/label pairing are checked at construction (``ValueError``).  :mod:`dual_emc2.loss.batches`
    builds it from a step's features (``unimodal_contrastive_batch``, ``bimodal_contrastive_batches``), gathering
    over processes.

    Example::

        ids = torch.tensor([3, 7, 0, 5])                      # dataset index of each pair
        x, y = F.normalize(torch.randn(4, 16), dim=-1), F.normalize(torch.randn(4, 16), dim=-1)
        batch = ContrastiveBatch(anchors=x, candidates=y, positive=torch.arange(4), anchor_ids=ids,
                                 candidate_ids=ids)           # x→y: y_i is x_i's positive, every other y a negative
        batch.negative_mask                                   # [4, 4], False on the diagonal
    """

    anchors: Tensor
    candidates: Tensor
    positive: Tensor
    anchor_ids: Tensor
    candidate_ids: Tensor
    anchor_keys: Tensor | None = None
    candidate_keys: Tensor | None = None
    views_per_id: int = 1
    epoch: int = 0
    row_offset: int = 0
    total_rows: int | None = None
    encode_candidates: EncodeFn | None = None
    state_plan: Any = None
    state_features: Tensor | None = None
    extra_negative_mask: Tensor | None = None
    labels: Tensor | None = None
    candidate_labels: Tensor | None = None

    def __post_init__(self) -> None:
        B, C = self.anchors.shape[0], self.candidates.shape[0]
        if self.anchors.dim() != 2 or self.candidates.dim() != 2 or self.anchors.shape[1] != self.candidates.shape[1]:
            raise ValueError(
                f"anchors [B, d] and candidates [C, d] must share d; got {tuple(self.anchors.shape)} and "
                f"{tuple(self.candidates.shape)}"
            )
        for name, t, n in (("positive", self.positive, B), ("anchor_ids", self.anchor_ids, B),
                           ("candidate_ids", self.candidate_ids, C)):
            if t.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
        if self.anchor_keys is None:
            self.anchor_keys = self.anchor_ids
        elif self.anchor_keys.shape != (B,):
            raise ValueError(f"anchor_keys must have shape ({B},), got {tuple(self.anchor_keys.shape)}")
        if self.candidate_keys is None:
            self.candidate_keys = self.candidate_ids
        elif self.candidate_keys.shape != (C,):
            raise ValueError(f"candidate_keys must have shape ({C},), got {tuple(self.candidate_keys.shape)}")
        if self.views_per_id < 1:
            raise ValueError(f"views_per_id must be >= 1, got {self.views_per_id}")
        if self.total_rows is None:
            self.total_rows = B + self.row_offset
        if (self.labels is None) != (self.candidate_labels is None):
            raise ValueError("labels and candidate_labels must be given together (anchor labels [B], candidate "
                             "labels [C]) or not at all")
        for name, t, n in (("labels", self.labels, B), ("candidate_labels", self.candidate_labels, C)):
            if t is not None and t.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")

    @property
    def negative_mask(self) -> Tensor:
        """[B, C] bool: True where candidate j is in D_neg(x_i)."""
        mask = self.candidate_ids[None, :] != self.anchor_ids[:, None]
        if self.extra_negative_mask is not None:
            mask = mask & self.extra_negative_mask
        return mask

    def scores(self) -> Tensor:
        """[B, C] similarities s(x_i, z_j) = φ(x_i)ᵀψ(z_j), with grad, in float32 at least (also under autocast)."""
        s = self.anchors @ self.candidates.t()
        return s.float() if s.dtype in (torch.float16, torch.bfloat16) else s

    def positive_scores(self, scores: Tensor) -> Tensor:
        return scores.gather(1, self.positive[:, None])[:, 0]


@dataclass
class EstimatorOutput:
    """What an estimator's call returns.

    loss:  scalar surrogate whose gradient is the estimator's stochastic gradient (its value need not be eq. 1).
    stats: detached 0-dim diagnostics by name (logged by the trainer, ``GlobalContrastiveLoss.last_stats``).

    Example::

        out = EstimatorOutput(loss, {"top1": acc})
        out.loss.backward()
    """

    loss: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


class Estimator(nn.Module):
    """Base class of the estimators of eq. (1)'s gradient: subclasses implement :meth:`forward` and keep any state
    in registered buffers (saved with ``state_dict()``).

    Constructor: every estimator built by :func:`~dual_emc2.loss.registry.build_estimator` takes
    ``num_keys`` (anchor keys: dataset size × anchors per sample), ``num_candidates`` (candidate ids: the dataset size)
    and its options as keyword arguments.

    Call: ``estimator(batch, beta)`` → :class:`EstimatorOutput`.  batch: the step's :class:`ContrastiveBatch`.
    beta: β = 1/τ, a float or a 0-dim tensor (may require grad).  Estimators that need the features of their
    per-anchor states (``needs_state_features``) name them before the forward with :meth:`plan`.

    Example::

        class UniformNegatives(Estimator):                    # every negative weighted equally
            name = "uniform"

            def __init__(self, num_keys: int = 1, num_candidates: int = 1) -> None:
                super().__init__()

            def forward(self, batch, beta):
                s, neg = batch.scores(), batch.negative_mask.float()
                w = neg / neg.sum(dim=1, keepdim=True)
                return EstimatorOutput(weighted_negative_surrogate(batch.positive_scores(s), s, w, beta))

        register("uniform", UniformNegatives)                 # now loss.estimator=uniform in configs
    """

    name: str = "base"
    #: True when the estimator calls ``batch.encode_candidates`` whatever else it is given (the negative cache).
    needs_candidate_encoder: bool = False
    #: True when the estimator plans per-anchor states whose features it needs each step (:meth:`plan`; EMC²): the
    #: caller encodes them with the batch (``batch.state_features``), or supplies ``encode_candidates``.
    needs_state_features: bool = False
    #: True when the estimator reads ``batch.labels`` / ``batch.candidate_labels`` (supervised; the trainer supplies
    #: them).
    needs_labels: bool = False

    def forward(self, batch: ContrastiveBatch, beta: Tensor | float) -> EstimatorOutput:  # pragma: no cover
        raise NotImplementedError

    def plan(self, anchor_keys: Tensor, candidate_keys: Tensor, *, views_per_id: int = 1, epoch: int = 0,
             row_offset: int = 0, total_rows: int | None = None) -> Any:
        """The states the next call needs (``needs_state_features`` estimators); None for the others."""
        return None

    def check_batch_shape(self, negatives_per_anchor: int) -> None:
        """Fail early (at build time, before any training) if the estimator's options cannot work with batches whose
        anchors have ``negatives_per_anchor`` in-batch negatives.  Default: anything goes."""

    def _track_iteration(self) -> None:
        """Mirror the ``iteration`` buffer in a Python int, so per-step seeds need no device→host sync; the mirror is
        refreshed whenever a state dict is loaded."""
        self._iteration = 0

        def _refresh(module: nn.Module, _incompatible) -> None:
            module._iteration = int(module.iteration)

        self.register_load_state_dict_post_hook(_refresh)

    def _advance(self) -> int:
        """Current iteration (host int), then increment both the mirror and the buffer."""
        it = self._iteration
        self._iteration += 1
        self.iteration += 1
        return it

    @staticmethod
    def beta_value(beta: Tensor | float) -> float:
        """β as a Python float for samplers and state updates (β may be a learnable tensor)."""
        return float(beta.detach()) if isinstance(beta, Tensor) else float(beta)


def step_seed(seed: int, step: int) -> int:
    """Seed of an estimator's generator for one step's draws: identical on every process (rank-invariant draws)."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)


def weighted_negative_surrogate(pos_scores: Tensor, scores: Tensor, weights: Tensor, beta: Tensor | float) -> Tensor:
    """(β / B) Σ_i [ −s(x_i, y_i) + Σ_j w_ij s(x_i, z_j) ] with the weights detached: its gradient is
    β/B Σ_i [−∇s_ii⁺ + Σ_j w_ij ∇s_ij], the common form of every estimator's stochastic gradient (eq. 6, 10)."""
    per_anchor = -pos_scores + (weights.detach() * scores).sum(dim=1)
    return beta * per_anchor.mean()
