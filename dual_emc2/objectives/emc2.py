"""EMC² (Yau et al., ICML 2024, seed 001): Metropolis–Hastings negatives with persistent per-anchor chains.

Each anchor key i keeps a chain state Z_i (a global sample id) and its last score.  At every step the chain runs R
M-H steps over the in-batch valid candidates (Algorithm 1, eq. 9), started from Z_i, and the post-burn-in visit counts
W_ij (steps r ≥ P) give the surrogate of eq. (10)–(11):

    ℓ(θ) = (β / B) Σ_i [ −s(x_i, y_i) + Σ_j W̄_ij s(x_i, z_j) ],      W̄ = W / (R − P) detached.

Where the stored state is out of the batch (DESIGN.md):
  * state score ``stale``: use the stored score (released code); ``refresh``: re-encode Z_i without grad for the exact
    acceptance ratio.  A state whose sample *is* among the batch candidates starts from that column with its exact
    current score (``map_state_into_batch``, on by default).
  * steps still on the out-of-batch state after burn-in: ``reencode`` adds W̄_stay,i · s(x_i, ψ(Z_i)) with ψ(Z_i) re-
    encoded with grad (released code); ``drop`` renormalises the in-batch visit counts instead.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dual_emc2.objectives.base import (
    ContrastiveBatch,
    ContrastiveObjective,
    ObjectiveOutput,
    weighted_negative_surrogate,
)
from dual_emc2.sampling import mh_visit_counts
from dual_emc2.state import ChainState

_STATE_SCORE = ("stale", "refresh")
_OUT_OF_BATCH = ("reencode", "drop")
_PROPOSALS = ("uniform", "scan")


def lookup_columns(sample_id: Tensor, candidate_ids: Tensor, valid: Tensor) -> Tensor:
    """Column j of ``candidate_ids`` holding ``sample_id[i]`` (first one in id order), −1 where absent or not valid."""
    order = torch.argsort(candidate_ids, stable=True)
    sorted_ids = candidate_ids[order]
    pos = torch.searchsorted(sorted_ids, sample_id).clamp(max=sorted_ids.numel() - 1)
    col = order[pos]
    found = (sorted_ids[pos] == sample_id) & (sample_id >= 0)
    found &= valid.gather(1, col[:, None])[:, 0]
    return torch.where(found, col, torch.full_like(col, -1))


def chain_seed(seed: int, step: int) -> int:
    """Seed of the generator for one step's draws: identical on every process (rank-invariant chains)."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)


class EMC2(ContrastiveObjective):
    """EMC² estimator.

    Args:
        num_keys: number of anchor keys (dataset size × anchors per sample); one chain state each.
        steps: R, M-H steps per anchor and iteration; ``None`` uses the number of valid candidates of the first row
            (R = B − 2 in the unimodal setting, as in the paper).
        burn_in: P < R, steps not counted.  ``None`` uses R − 1 (only the last sample, as in the analysis).
        proposal: ``"uniform"`` (default, exact) or ``"scan"`` (released code, slightly biased).
        state_score: ``"stale"`` or ``"refresh"``.  out_of_batch: ``"reencode"`` or ``"drop"``.
        map_state_into_batch: start a chain from the batch column holding its state's sample when present.
        seed: seed of the per-step generators.
        backend: sampler backend, ``"auto"``/``"torch"``/``"triton"``.
    """

    name = "emc2"

    def __init__(
        self,
        num_keys: int,
        num_candidates: int = 1,
        steps: int | None = None,
        burn_in: int | None = None,
        proposal: str = "uniform",
        state_score: str = "stale",
        out_of_batch: str = "drop",
        map_state_into_batch: bool = True,
        seed: int = 0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if proposal not in _PROPOSALS:
            raise ValueError(f"emc2 proposal must be one of {_PROPOSALS}, got {proposal!r}")
        if state_score not in _STATE_SCORE:
            raise ValueError(f"emc2 state_score must be one of {_STATE_SCORE}, got {state_score!r}")
        if out_of_batch not in _OUT_OF_BATCH:
            raise ValueError(f"emc2 out_of_batch must be one of {_OUT_OF_BATCH}, got {out_of_batch!r}")
        if steps is not None and steps < 1:
            raise ValueError(f"emc2 steps (R) must be >= 1, got {steps}")
        if burn_in is not None and burn_in < 0:
            raise ValueError(f"emc2 burn_in (P) must be >= 0, got {burn_in}")
        if steps is not None and burn_in is not None and burn_in >= steps:
            raise ValueError(f"emc2 burn_in (P = {burn_in}) must be smaller than steps (R = {steps})")
        self.steps, self.burn_in = steps, burn_in
        self.proposal, self.state_score, self.out_of_batch = proposal, state_score, out_of_batch
        self.map_state_into_batch = map_state_into_batch
        self.seed, self.backend = seed, backend
        self.needs_candidate_encoder = state_score == "refresh" or out_of_batch == "reencode"
        self.chains = ChainState(num_keys)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))
        self._track_iteration()
        self._negatives_per_anchor: int | None = None  # set by check_batch_shape: R without a host sync

    def _steps(self, valid: Tensor) -> tuple[int, int]:
        if self.steps is not None:
            R = self.steps
        elif self._negatives_per_anchor is not None:
            R = self._negatives_per_anchor
        else:
            R = int(valid[0].sum())
        P = self.burn_in if self.burn_in is not None else R - 1
        if P >= R:
            raise ValueError(f"emc2 burn_in (P = {P}) must be smaller than steps (R = {R})")
        return R, P

    def check_batch_shape(self, negatives_per_anchor: int) -> None:
        self._negatives_per_anchor = negatives_per_anchor
        R = self.steps if self.steps is not None else negatives_per_anchor
        P = self.burn_in if self.burn_in is not None else R - 1
        if P >= R:
            raise ValueError(
                f"emc2 burn_in (P = {P}) must be smaller than steps (R = {R}"
                + (f", the {negatives_per_anchor} in-batch negatives per anchor" if self.steps is None else "")
                + "): lower objective.options.emc2.burn_in or raise the batch size")

    def _encode(self, batch: ContrastiveBatch, ids: Tensor) -> Tensor:
        if batch.encode_candidates is None:
            raise RuntimeError(
                f"emc2 with state_score={self.state_score!r}, out_of_batch={self.out_of_batch!r} needs "
                "batch.encode_candidates (the trainer supplies it when the objective says needs_candidate_encoder)"
            )
        return batch.encode_candidates(ids)

    def forward(self, batch: ContrastiveBatch, beta: Tensor | float) -> ObjectiveOutput:
        b = self.beta_value(beta)
        scores = batch.scores()
        valid = batch.negative_mask
        R, P = self._steps(valid)
        keys = batch.anchor_keys
        state_id, state_score = self.chains.read(keys)

        with torch.no_grad():
            if self.map_state_into_batch:
                init_col = lookup_columns(state_id, batch.candidate_ids, valid)
            else:
                init_col = torch.full_like(state_id, -1)
            outside = (init_col < 0) & (state_id >= 0)
            if self.state_score == "refresh":
                rows = outside.nonzero()[:, 0]
                if rows.numel():
                    feats = self._encode(batch, state_id[rows]).float()
                    state_score = state_score.clone()
                    state_score[rows] = (batch.anchors[rows].detach().float() * feats).sum(dim=1)
            gen = torch.Generator(device=scores.device)
            step = self._advance()
            gen.manual_seed(chain_seed(self.seed, step))
            res = mh_visit_counts(
                scores.detach(), beta=b, steps=R, burn_in=P, valid=valid, init_index=init_col,
                init_score=state_score, proposal=self.proposal, generator=gen,
                row_offset=batch.row_offset, total_rows=batch.total_rows, backend=self.backend,
            )
            n_post = float(R - P)
            if self.out_of_batch == "drop":
                in_batch = res.counts.sum(dim=1, keepdim=True)
                # a chain that never entered the batch after burn-in falls back to the exact in-batch softmax
                softmax = torch.softmax((b * scores.detach().float()).masked_fill(~valid, float("-inf")), dim=1)
                weights = torch.where(in_batch > 0, res.counts / in_batch.clamp(min=1), softmax)
            else:
                weights = res.counts / n_post

        loss = weighted_negative_surrogate(batch.positive_scores(scores), scores, weights, beta)
        if self.out_of_batch == "reencode":
            rows = (res.stay > 0).nonzero()[:, 0]
            if rows.numel():
                feats = self._encode(batch, state_id[rows])
                s_out = (batch.anchors[rows] * feats).sum(dim=1)
                loss = loss + beta * ((res.stay[rows] / n_post).detach() * s_out).sum() / scores.shape[0]

        with torch.no_grad():
            new_id = torch.where(res.index >= 0, batch.candidate_ids[res.index.clamp(min=0)], state_id)
            self.chains.write(keys, new_id, res.score)
            c = res.counts.sum(dim=1)
            ess = c.square() / res.counts.square().sum(dim=1).clamp(min=1)  # (Σw)²/Σw² of the in-batch visits
            stats = {
                "accept_rate": res.accepted.mean() / R,
                "stay_frac": res.stay.mean() / n_post,
                "start_outside_frac": outside.float().mean(),
                "ess": ess.sum() / (c > 0).sum().clamp(min=1),  # distinct-negative equivalent, chains that visited
                "visited_score": (weights * scores.detach()).sum(dim=1).mean(),
            }
        return ObjectiveOutput(loss, stats)
