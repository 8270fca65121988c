"""EMC² (Yau, Wai, Raman, Sarkar and Hong, "EMC²: Efficient MCMC Negative Sampling for Contrastive Learning with
Global Convergence", ICML 2024): persistent per-anchor Markov chains over the negatives.

Each anchor key i keeps a chain state z_i — a candidate *view* (its key and the epoch whose augmentation drew it) —
and its last score.  At every step the estimator needs E_{z ~ π_i} ∇s(x_i, z), π_i = softmax(β s(x_i, ·)) over all
of D_neg(x_i) (eq. 4–6).  The batch is an auxiliary variable drawn independently of z_i; thinned to one view per
image, the pool A_i = {kept views} ∪ {z_i} has p(z_i | A_i) ∝ π_i on A_i (docs/DESIGN.md, "pool kernel";
:mod:`dual_emc2.objectives.emc2_pool`).  Hence

* any kernel invariant for π_i restricted to A_i keeps π_i invariant: one exact draw from softmax over A_i
  (``state_update="draw"``), or R M-H steps with uniform proposals over batch ∪ state (``proposal="pool"``);
* the Rao–Blackwell weights w_i = softmax(β s_i·) over A_i (``weights="rao_blackwell"``), averaged over the V
  rotations of the thinning and the state's own term included, satisfy E[Σ_a w_ia ∇s(x_i, a)] = E_{π_i} ∇s at
  stationarity.

The surrogate (eq. 10–11 with these weights) is

    ℓ(θ) = (β / B) Σ_i [ −s(x_i, y_i) + Σ_j w_ij s(x_i, z_j) + (m_i / q) w_i,state s(x_i, ψ(z_i)) ],

weights detached; ψ(z_i) is the state view's feature with grad, for a random fraction q of the out-of-batch states
(m_i ~ Bernoulli(q), ``reencode_fraction``), which keeps the estimate unbiased.  Which states a step needs is known
before it (:meth:`EMC2.plan`), so a caller encodes them in the batch's own forward pass and hands their features in
(``ContrastiveBatch.state_features``); without them ``encode_candidates`` re-encodes by sample id.  A state that *is*
a batch candidate (same key, same epoch) is that column (``map_state_into_batch``).

Variants reachable by options (their measured bias is in experiments/RESULTS.md):
  ``weights="visits"``: post-burn-in visit counts of R M-H steps (the paper's estimator) with ``proposal`` ``pool``,
  ``batch`` (Algorithm 1: in-batch proposals, biased toward the batch softmax at small batch) or ``permuted_scan``;
  ``state_score="stale"``: the stored score instead of the state's current one (no extra forward);
  ``out_of_batch="drop"``: no state term, weights renormalised over the batch (no extra forward; biased).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dual_emc2.objectives.base import (
    ContrastiveBatch,
    ContrastiveObjective,
    ObjectiveOutput,
    step_seed,
    weighted_negative_surrogate,
)
from dual_emc2.objectives.emc2_pool import (
    draw_rows,
    gumbel_argmax,
    lookup_columns,
    pool_logits,
    thinned_pool_weights,
    view_rotations,
)
from dual_emc2.objectives.state_views import StateViews
from dual_emc2.sampling import check_proposal, mh_visit_counts
from dual_emc2.state import ChainState

__all__ = ["EMC2", "ChainPlan", "draw_rows", "gumbel_argmax", "lookup_columns", "pool_logits"]

WEIGHTS = ("rao_blackwell", "visits")
STATE_UPDATES = ("draw", "chain")
STATE_SCORES = ("exact", "stale")
OUT_OF_BATCH = ("reencode", "drop")


@dataclass
class ChainPlan:
    """What one step of :class:`EMC2` reads and needs, fixed before the forward pass (:meth:`EMC2.plan`).

    Per anchor row [B]: the chain's ``state_key``, ``stored_score`` and ``state_epoch``; ``col``, the batch column
    that *is* the state (same key and epoch) or −1; ``outside`` (a state that is not a batch column), the Bernoulli(q)
    coin ``chosen``, ``frozen`` (out of the batch and not chosen: kept as is this step), ``need`` (rows whose state
    view must be encoded) and ``grad_rows`` (rows whose state term has a gradient).  ``views``: the distinct state
    views to encode, one feature row each, and ``view_of_need`` [n_need] which of them each ``need`` row uses.
    ``step``: the estimator iteration the plan belongs to; ``epoch``: the batch's view epoch."""

    anchor_keys: Tensor
    state_key: Tensor
    stored_score: Tensor
    state_epoch: Tensor
    col: Tensor
    outside: Tensor
    chosen: Tensor
    frozen: Tensor
    need: Tensor
    grad_rows: Tensor
    views: StateViews
    view_of_need: Tensor
    step: int
    epoch: int


class EMC2(ContrastiveObjective):
    """EMC² estimator (see the module docstring for the maths and the variants).

    Args:
        num_keys: number of anchor keys (dataset size × anchors per sample); one chain state each.
        weights: ``"rao_blackwell"`` (default: softmax over the pool) or ``"visits"`` (M-H visit counts).
        state_update: how the chain moves: ``"draw"`` (one exact draw from the pool softmax; default with Rao–Blackwell
            weights) or ``"chain"`` (the last state of R M-H steps; the only choice with visit-count weights).
        proposal: M-H proposal when a chain runs: ``"pool"`` (default), ``"batch"`` (Algorithm 1) or
            ``"permuted_scan"``.
        steps: R, M-H steps per anchor and iteration; ``None`` uses the in-batch negatives per anchor.
        burn_in: P < R, steps not counted (visit weights).  ``None`` uses R − 1 (only the last sample).
        state_score: ``"exact"`` (re-encode an out-of-batch state without grad for its current score; default) or
            ``"stale"`` (the score stored when the state was drawn).
        out_of_batch: the gradient term of an out-of-batch state: ``"reencode"`` (ψ(z) re-encoded with grad; default)
            or ``"drop"`` (weights renormalised over the batch).
        reencode_fraction: q in (0, 1]: the fraction of out-of-batch states whose gradient term is computed each
            step, weighted 1/q (unbiased; fewer backward passes).
        map_state_into_batch: start a chain from the batch column holding its state's key when present.
        seed: seed of the per-step generators.  backend: sampler backend, ``"auto"``/``"torch"``/``"triton"``.
        state_sharding: layout of the chains over processes, ``"auto"``/``"replicated"``/``"sharded"``
            (:mod:`dual_emc2.sharding`; config key ``objective.state_sharding``).
    """

    name = "emc2"

    def __init__(
        self,
        num_keys: int,
        num_candidates: int = 1,
        weights: str = "rao_blackwell",
        state_update: str | None = None,
        proposal: str = "pool",
        steps: int | None = None,
        burn_in: int | None = None,
        state_score: str = "exact",
        out_of_batch: str = "reencode",
        reencode_fraction: float = 1.0,
        map_state_into_batch: bool = True,
        seed: int = 0,
        backend: str = "auto",
        state_sharding: str = "auto",
    ) -> None:
        super().__init__()
        if state_score == "refresh":
            raise ValueError("emc2 state_score 'refresh' is now called 'exact'; choices: exact, stale")
        for opt, value, choices in (("weights", weights, WEIGHTS), ("state_score", state_score, STATE_SCORES),
                                    ("out_of_batch", out_of_batch, OUT_OF_BATCH)):
            if value not in choices:
                raise ValueError(f"emc2 {opt} must be one of {', '.join(choices)}, got {value!r}")
        try:
            proposal = check_proposal(proposal)
        except ValueError as err:
            raise ValueError(f"emc2 {err}") from None
        if state_update is None:
            state_update = "draw" if weights == "rao_blackwell" else "chain"
        if state_update not in STATE_UPDATES:
            raise ValueError(f"emc2 state_update must be one of {', '.join(STATE_UPDATES)}, got {state_update!r}")
        if weights == "visits" and state_update != "chain":
            raise ValueError("emc2 weights='visits' counts the visits of an M-H chain: state_update must be 'chain'")
        if not 0.0 < reencode_fraction <= 1.0:
            raise ValueError(f"emc2 reencode_fraction (q) must be in (0, 1], got {reencode_fraction}")
        if steps is not None and steps < 1:
            raise ValueError(f"emc2 steps (R) must be >= 1, got {steps}")
        if burn_in is not None and burn_in < 0:
            raise ValueError(f"emc2 burn_in (P) must be >= 0, got {burn_in}")
        if steps is not None and burn_in is not None and burn_in >= steps:
            raise ValueError(f"emc2 burn_in (P = {burn_in}) must be smaller than steps (R = {steps})")
        if state_update != "chain" and (steps is not None or burn_in is not None):
            raise ValueError("emc2 steps (R) and burn_in (P) set the M-H chain, which runs only with weights='visits' "
                             "or state_update='chain'; the default Rao–Blackwell estimator has no burn-in: drop them, "
                             "or set weights: visits")
        self.weights, self.state_update, self.proposal = weights, state_update, proposal
        self.steps, self.burn_in = steps, burn_in
        self.state_score, self.out_of_batch, self.reencode_fraction = state_score, out_of_batch, reencode_fraction
        self.map_state_into_batch = map_state_into_batch
        self.seed, self.backend = seed, backend
        self.needs_state_features = state_score == "exact" or out_of_batch == "reencode"
        self.chains = ChainState(num_keys, state_sharding)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))
        self._track_iteration()
        self._negatives_per_anchor: int | None = None  # set by check_batch_shape: R without a host sync

    @property
    def runs_chain(self) -> bool:
        return self.state_update == "chain"

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
        if not self.runs_chain:
            return
        R = self.steps if self.steps is not None else negatives_per_anchor
        P = self.burn_in if self.burn_in is not None else R - 1
        if P >= R:
            raise ValueError(
                f"emc2 burn_in (P = {P}) must be smaller than steps (R = {R}"
                + (f", the {negatives_per_anchor} in-batch negatives per anchor" if self.steps is None else "")
                + "): lower objective.options.emc2.burn_in or raise the batch size")

    def state_views(self) -> tuple[Tensor, Tensor]:
        """(candidate key, view epoch) of every anchor key's chain, on the CPU (:meth:`ChainState.views`)."""
        return self.chains.views()

    # ------------------------------------------------------------------------------------------------ the plan
    @torch.no_grad()
    def plan(self, anchor_keys: Tensor, candidate_keys: Tensor, *, views_per_id: int = 1, epoch: int = 0,
             row_offset: int = 0, total_rows: int | None = None) -> ChainPlan:
        """Read the chains of ``anchor_keys`` (a collective when the state is sharded) and decide which state views
        the next call needs: out-of-batch states (a state is a batch column only with the same key *and* epoch),
        those whose Bernoulli(q) coin is drawn (the coins come from the step's generator, so the forward draws the
        same ones)."""
        total_rows = anchor_keys.numel() + row_offset if total_rows is None else total_rows
        state_key, stored_score, state_epoch = self.chains.read(anchor_keys)
        dev = state_key.device
        step = self._iteration
        gen = torch.Generator(device=dev)
        gen.manual_seed(step_seed(self.seed, step))
        chosen = draw_rows(gen, (), row_offset, total_rows, anchor_keys.numel(), dev) < self.reencode_fraction
        if self.map_state_into_batch:
            col = lookup_columns(state_key, candidate_keys.to(dev))
            col = torch.where(state_epoch == epoch, col, torch.full_like(col, -1))  # another epoch: another view
        else:
            col = torch.full_like(state_key, -1)
        outside = (state_key >= 0) & (col < 0)
        none = torch.zeros_like(outside)
        if self.state_score == "exact":
            need = outside & chosen  # re-encoded: exact score, the chain moves, gradient term
            frozen = outside & ~chosen  # not this step: the chain stays (random-scan update)
            grad_rows = need if self.out_of_batch == "reencode" else none
        else:
            frozen = none
            grad_rows = outside & chosen if self.out_of_batch == "reencode" else none
            need = grad_rows
        V = views_per_id
        key, ep = state_key[need], state_epoch[need]
        pair = torch.stack([key, ep], dim=1)
        uniq, inverse = torch.unique(pair, dim=0, return_inverse=True) if key.numel() else (pair, key)
        views = StateViews(uniq[:, 0] // V, uniq[:, 0] % V, uniq[:, 1])
        return ChainPlan(anchor_keys, state_key, stored_score, state_epoch, col, outside, chosen, frozen, need,
                         grad_rows, views, inverse, step, int(epoch))

    def _state_features(self, batch: ContrastiveBatch, plan: ChainPlan) -> Tensor | None:
        """[n_need, d] features of the ``need`` rows' state views: the caller's ``batch.state_features`` (one row per
        ``plan.views`` entry, encoded with the batch), else ``batch.encode_candidates`` by sample id (each id once,
        under grad only for the ids of gradient rows)."""
        if len(plan.views) == 0:
            return None
        if batch.state_features is not None:
            feats = batch.state_features
            if feats.dim() != 2 or feats.shape[0] != len(plan.views) or feats.shape[1] != batch.anchors.shape[1]:
                raise ValueError(f"emc2: state features must be [{len(plan.views)}, {batch.anchors.shape[1]}] (one row "
                                 f"per requested state view), got {tuple(feats.shape)}")
            return feats[plan.view_of_need]
        if batch.encode_candidates is None:
            raise RuntimeError(
                f"emc2 with state_score={self.state_score!r}, out_of_batch={self.out_of_batch!r} needs the features of "
                f"{len(plan.views)} chain-state views: ask GlobalContrastiveLoss.state_request(index) for them before "
                "the forward and pass state_x/state_y, or pass encode_x/encode_y (re-encoding by id); or build it with "
                "state_score='stale', out_of_batch='drop' (no state features, biased at small batch)")
        ids = plan.views.ids.to(batch.anchors.device)
        uniq, inverse = torch.unique(ids, return_inverse=True)
        grad_view = torch.zeros(len(plan.views), dtype=torch.bool, device=ids.device)
        grad_view[plan.view_of_need[plan.grad_rows[plan.need].to(ids.device)]] = True
        grad_uniq = torch.zeros(uniq.numel(), dtype=torch.bool, device=ids.device)
        grad_uniq[inverse[grad_view]] = True
        parts, order = [], []
        if bool(grad_uniq.any()):
            with torch.enable_grad():
                parts.append(batch.encode_candidates(uniq[grad_uniq]))
            order.append(grad_uniq.nonzero()[:, 0])
        if bool((~grad_uniq).any()):
            with torch.no_grad():
                parts.append(batch.encode_candidates(uniq[~grad_uniq]))
            order.append((~grad_uniq).nonzero()[:, 0])
        feats = torch.cat([p.to(batch.anchors.dtype) for p in parts])
        position = torch.empty_like(uniq)
        position[torch.cat(order)] = torch.arange(uniq.numel(), device=uniq.device)
        return feats[position[inverse]][plan.view_of_need.to(ids.device)]

    # ------------------------------------------------------------------------------------------------ the step
    def forward(self, batch: ContrastiveBatch, beta: Tensor | float) -> ObjectiveOutput:
        b = self.beta_value(beta)
        plan = batch.state_plan
        if plan is None:
            plan = self.plan(batch.anchor_keys, batch.candidate_keys, views_per_id=batch.views_per_id,
                             epoch=batch.epoch, row_offset=batch.row_offset, total_rows=batch.total_rows)
        elif plan.step != self._iteration or plan.epoch != batch.epoch or not torch.equal(
                plan.anchor_keys, batch.anchor_keys.to(plan.anchor_keys.device)):
            raise ValueError("emc2: the state plan belongs to another batch or step; plan the states of this batch "
                             "(GlobalContrastiveLoss.state_request(index, epoch=...)) right before its forward")
        scores = batch.scores()
        valid = batch.negative_mask
        B, C = scores.shape
        dev = scores.device
        step = self._advance()
        gen = torch.Generator(device=dev)
        gen.manual_seed(step_seed(self.seed, step))
        draw = dict(row_offset=batch.row_offset, total_rows=batch.total_rows, rows=B, device=dev)
        draw_rows(gen, (), **draw)  # the plan's Bernoulli(q) coins: keeps the generator's stream
        q = self.reencode_fraction
        state_key, state_epoch = plan.state_key.to(dev), plan.state_epoch.to(dev)
        stored_score = plan.stored_score.to(dev).float()
        need, grad_rows, frozen = plan.need.to(dev), plan.grad_rows.to(dev), plan.frozen.to(dev)
        outside = plan.outside.to(dev)

        with torch.no_grad():
            col = plan.col.to(dev)
            present = col >= 0
            col_valid = present & valid.gather(1, col.clamp(min=0)[:, None])[:, 0]
            # a state that is a batch column but masked for this anchor (a known false negative) is forgotten
            state_key = torch.where(present & ~col_valid, torch.full_like(state_key, -1), state_key)
            col = torch.where(col_valid, col, torch.full_like(col, -1))

        feats = self._state_features(batch, plan)
        state_score = stored_score.clone()  # stale: the stored score
        s_out = None
        if feats is not None:
            need_rows = need.nonzero()[:, 0]
            s_out = (batch.anchors[need_rows].float() * feats.float()).sum(dim=-1)  # [n_need], with grad
            if self.state_score == "exact":
                state_score[need_rows] = s_out.detach()
        in_pool = outside & ~frozen  # an out-of-batch state with a score for this step

        with torch.no_grad():
            s_det = scores.detach().float()
            # a state whose sample is also in the batch under another view: of the pool, only that sample's two
            # entries could have been the state (batches hold distinct samples), so the pool is restricted to them
            state_id = state_key // batch.views_per_id
            same_sample = batch.candidate_ids[None, :] == state_id[:, None]
            duplicate = in_pool & (same_sample & valid).any(dim=1)
            pool_valid = torch.where(duplicate[:, None], valid & same_sample, valid)
            batch_logits = (b * s_det).masked_fill(~pool_valid, float("-inf"))
            batch_softmax = torch.softmax((b * s_det).masked_fill(~valid, float("-inf")), dim=1)
            if self.runs_chain:
                R, P = self._steps(valid)
                res = mh_visit_counts(
                    s_det, beta=b, steps=R, burn_in=P, valid=pool_valid, init_index=col,
                    init_score=torch.where(in_pool, state_score, torch.full_like(state_score, float("-inf"))),
                    proposal=self.proposal, generator=gen, row_offset=batch.row_offset, total_rows=batch.total_rows,
                    backend=self.backend)
            V = batch.views_per_id
            full_logits = (b * s_det).masked_fill(~valid, float("-inf"))
            if self.weights == "rao_blackwell" or not self.runs_chain:
                # an out-of-batch state joins thinned pools (one view per batch sample); a state that is a batch
                # column, or none, leaves the pool the whole batch (exact either way: the two kinds of pool differ
                # in size, so each has its own posterior, docs/DESIGN.md)
                if V > 1:
                    n_samples = int(torch.unique(batch.candidate_ids).numel())
                    rotation = view_rotations(batch.candidate_ids, batch.candidate_keys % V, V,
                                              draw_rows(gen, (n_samples,), **draw))
                else:
                    rotation = torch.zeros(B, C, dtype=torch.int64, device=dev)
                out_logit = torch.where(in_pool, b * state_score, torch.full_like(state_score, float("-inf")))
            if self.weights == "rao_blackwell":
                w_thin, w_state = thinned_pool_weights(batch_logits, rotation, out_logit[:, None].repeat(1, V))
                w_batch = torch.where(in_pool[:, None], w_thin, batch_softmax)
                w_state = torch.where(in_pool, w_state, torch.zeros_like(w_state))
            else:
                n_post = float(R - P)
                w_batch, w_state = res.counts / n_post, res.stay / n_post
            if self.out_of_batch == "drop":  # renormalise over the batch; a chain never in it: the batch softmax
                mass = w_batch.sum(dim=1, keepdim=True)
                w_batch = torch.where(mass > 0, w_batch / mass.clamp(min=1e-30), batch_softmax)
                w_state = torch.zeros_like(w_state)
            if self.state_score == "exact" and q < 1:
                # control variate: E over the Bernoulli(q) choice of h + (m/q)(w − h) is w, the unbiased weights;
                # rows that were not re-encoded use the batch softmax h and keep their state
                w_batch = torch.where(in_pool[:, None], batch_softmax + (w_batch - batch_softmax) / q,
                                      torch.where(frozen[:, None], batch_softmax, w_batch))
            w_state = torch.where(grad_rows, w_state / q, torch.zeros_like(w_state))

            # the chain's next state
            if self.runs_chain:
                new_col, new_score = res.index, res.score
            else:  # one exact draw: from the pool of rotation 0 (out-of-batch state), or from the whole batch
                thin0 = batch_logits.masked_fill(rotation != 0, float("-inf"))
                logits = torch.cat([torch.where(in_pool[:, None], thin0, full_logits), out_logit[:, None]], dim=1)
                pick = gumbel_argmax(logits, draw_rows(gen, (C + 1,), **draw))
                new_col = torch.where(pick < C, pick, torch.full_like(pick, -1))
                new_score = torch.where(new_col >= 0, s_det.gather(1, new_col.clamp(min=0)[:, None])[:, 0],
                                        state_score)
            new_col = torch.where(frozen, torch.full_like(new_col, -1), new_col)
            new_key = torch.where(new_col >= 0, batch.candidate_keys[new_col.clamp(min=0)], state_key)
            new_epoch = torch.where(new_col >= 0, torch.full_like(state_epoch, batch.epoch), state_epoch)
            new_score = torch.where(frozen, stored_score, new_score)

        loss = weighted_negative_surrogate(batch.positive_scores(scores), scores, w_batch, beta)
        if s_out is not None and bool(grad_rows.any()):
            rows_in_need = grad_rows[need]  # positions of the grad rows among the encoded rows
            loss = loss + beta * (w_state[grad_rows].detach() * s_out[rows_in_need]).sum() / B

        with torch.no_grad():
            self.chains.write(plan.anchor_keys.to(dev), new_key, new_score, new_epoch)
            w_all = torch.cat([w_batch, w_state[:, None]], dim=1).clamp(min=0)
            ess = w_all.sum(dim=1).square() / w_all.square().sum(dim=1).clamp(min=1e-30)
            stats = {
                "state_weight": w_state.sum() / B,
                "start_outside_frac": outside.float().mean(),
                "reencoded_frac": need.float().mean(),
                "frozen_frac": frozen.float().mean(),
                "ess": ess.mean(),
                "visited_score": (w_batch * s_det).sum(dim=1).mean(),
            }
            if self.runs_chain:
                stats["accept_rate"] = res.accepted.mean() / R
        return ObjectiveOutput(loss, stats)
