"""Negative cache (Lindgren et al., NeurIPS 2021): a cache of candidate features over the whole negative set.

The cache holds ψ(z; θ_τ) for every candidate id (m_neg × d floats, written at refresh time τ).  Each step:
  1. refresh ⌈ρ m_neg⌉ entries in round-robin order (no grad) — the staleness/cost trade-off ρ of Table 3;
  2. for each anchor draw one negative by the Gumbel-max trick from softmax(β φ(x_i)ᵀ cache) over D_neg(x_i);
  3. re-encode the drawn negatives with grad (B extra forwards) and use the surrogate
        ℓ = (β / B) Σ_i [ −s(x_i, y_i) + s(x_i, ψ(z_i)) ],
     whose gradient is an unbiased estimate of eq. (4) when the cache is fresh.
The re-encoded features are written back to the cache (they are the freshest available).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from dual_emc2.loss.distributed import all_gather_rows
from dual_emc2.loss.estimators.base import ContrastiveBatch, Estimator, EstimatorOutput, step_seed


class NegativeCache(Estimator):
    """Negative-cache estimator.

    Args:
        num_keys: unused (the cache is keyed by candidate id); kept for the common constructor.
        num_candidates: m_neg, the number of candidate ids (dataset size).
        dim: feature dimension d of the cache.
        refresh: ρ, fraction of the cache re-encoded per step (at least one entry).
        init_full: encode the whole cache at the first step (else entries not yet written are never sampled).
        encode_chunk: ids per ``encode_candidates`` call when refreshing.
        seed: seed of the per-step Gumbel noise (rank-invariant).

    Call: ``cache(batch, beta)`` → :class:`~dual_emc2.loss.estimators.base.EstimatorOutput` (stats
    ``cache_staleness``, ``negative_score``).  ``batch.encode_candidates`` (ids → [n, dim] features, under the
    caller's grad mode) is required: it fills and refreshes the cache and re-encodes the B drawn negatives with grad.

    Example::

        cache = NegativeCache(num_keys=n, num_candidates=n, dim=128, refresh=0.01)   # n = len(dataset)
        encode = lambda i: F.normalize(text_tower(tokens[i]), dim=-1)               # ids → [k, 128]
        xy = ContrastiveBatch(anchors=zx, candidates=zy, positive=torch.arange(b), anchor_ids=ids,
                              candidate_ids=ids, encode_candidates=encode)
        out = cache(xy, beta=10.0)
        out.loss.backward()
    """

    name = "negative_cache"
    needs_candidate_encoder = True

    def __init__(
        self,
        num_keys: int,
        num_candidates: int,
        dim: int = 128,
        refresh: float = 0.01,
        init_full: bool = True,
        encode_chunk: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_candidates < 2:
            raise ValueError(f"negative_cache needs num_candidates >= 2, got {num_candidates}")
        if not 0.0 < refresh <= 1.0:
            raise ValueError(f"negative_cache refresh (ρ) must be in (0, 1], got {refresh}")
        self.refresh, self.init_full, self.encode_chunk, self.seed = refresh, init_full, encode_chunk, seed
        self.register_buffer("features", torch.zeros(num_candidates, dim))
        self.register_buffer("written_at", torch.full((num_candidates,), -1, dtype=torch.int64))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.int64))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))
        self._track_iteration()

    @property
    def num_candidates(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def _refresh(self, batch: ContrastiveBatch, ids: Tensor) -> None:
        for chunk in ids.split(self.encode_chunk):
            feats = batch.encode_candidates(chunk.to(batch.anchors.device)).float()
            if feats.shape != (chunk.numel(), self.features.shape[1]):
                raise ValueError(
                    f"encode_candidates returned {tuple(feats.shape)}, expected ({chunk.numel()}, "
                    f"{self.features.shape[1]}): set loss.options.dim to the projection dimension"
                )
            self.features[chunk] = feats.to(self.features.device)
            self.written_at[chunk] = self.iteration

    def forward(self, batch: ContrastiveBatch, beta: Tensor | float) -> EstimatorOutput:
        if batch.encode_candidates is None:
            raise RuntimeError("negative_cache needs batch.encode_candidates to fill and refresh its cache")
        b = self.beta_value(beta)
        m = self.num_candidates
        step = self._iteration
        with torch.no_grad():
            if self.init_full and step == 0:
                self._refresh(batch, torch.arange(m))
            n_ref = max(1, math.ceil(self.refresh * m))
            start = int(self.pointer)
            ids = (torch.arange(n_ref) + start) % m
            self._refresh(batch, ids)
            self.pointer.fill_((start + n_ref) % m)

            # Gumbel-max over the cache, drawn for the whole global batch so every process sees the same noise
            anchors = batch.anchors.detach().float()
            logits = b * anchors @ self.features.to(anchors.device).t()
            excluded = torch.arange(m, device=anchors.device)[None, :] == batch.anchor_ids[:, None]
            excluded |= (self.written_at < 0).to(anchors.device)[None, :]
            gen = torch.Generator(device=anchors.device)
            gen.manual_seed(step_seed(self.seed, step))
            u = torch.rand(batch.total_rows, m, generator=gen, device=anchors.device)
            u = u[batch.row_offset: batch.row_offset + anchors.shape[0]]
            gumbel = -torch.log(-torch.log(u.clamp(min=1e-20)))
            drawn = (logits + gumbel).masked_fill(excluded, float("-inf")).argmax(dim=1)
            staleness = (self.iteration - self.written_at[drawn.to(self.written_at.device)]).float().mean()

        neg = batch.encode_candidates(drawn)
        scores = batch.scores()
        pos = batch.positive_scores(scores)
        s_neg = (batch.anchors * neg).sum(dim=1)
        loss = beta * (s_neg - pos).mean()
        with torch.no_grad():
            all_ids, all_feats = all_gather_rows(drawn), all_gather_rows(neg.detach().float())
            self.features[all_ids.to(self.features.device)] = all_feats.to(self.features.device)
            self.written_at[all_ids.to(self.written_at.device)] = self.iteration
            self._advance()
        return EstimatorOutput(loss, {"cache_staleness": staleness, "negative_score": s_neg.detach().mean()})
