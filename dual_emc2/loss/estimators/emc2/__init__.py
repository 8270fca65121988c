"""EMC² (Yau, Wai, Raman, Sarkar and Hong, "EMC²: Efficient MCMC Negative Sampling for Contrastive Learning with
Global Convergence", ICML 2024): persistent per-anchor Markov chains over the negatives.

Each anchor key i keeps a chain state z_i — a candidate *view* (its key and the epoch whose augmentation drew it) —
and its last score.  At every step the estimator needs E_{z ~ π_i} ∇s(x_i, z), π_i = softmax(β s(x_i, ·)) over all
of D_neg(x_i) (eq. 4–6).  The batch is an auxiliary variable drawn independently of z_i; thinned to one view per
image, the pool A_i = {kept views} ∪ {z_i} has p(z_i | A_i) ∝ π_i on A_i (docs/DESIGN.md, "pool kernel";
:mod:`dual_emc2.loss.estimators.emc2.pool`).  Hence

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
(``ContrastiveBatch.state_features``); without them ``encode_candidates`` re-encodes by sample id.  The parts:
:mod:`~dual_emc2.loss.estimators.emc2.plan` (which states a step needs), :mod:`~dual_emc2.loss.estimators.emc2.pool`
(the pools and their weights), :mod:`~dual_emc2.loss.estimators.emc2.chain` (the M-H sampler, with its Triton kernel
in :mod:`~dual_emc2.loss.estimators.emc2.chain_triton`) and :mod:`~dual_emc2.loss.estimators.emc2.update` (how the
chain moves).  A state that *is*
a batch candidate (same key, same epoch) is that column (``map_state_into_batch``).

Variants reachable by options (their measured bias is in experiments/RESULTS.md):
  ``weights="visits"``: post-burn-in visit counts of R M-H steps (the paper's estimator) with ``proposal`` ``pool``,
  ``batch`` (Algorithm 1: in-batch proposals, biased toward the batch softmax at small batch) or ``permuted_scan``;
  ``state_score="stale"``: the stored score instead of the state's current one (no extra forward);
  ``out_of_batch="drop"``: no state term, weights renormalised over the batch (no extra forward; biased).
"""
from __future__ import annotations

import torch
from torch import Tensor

from dual_emc2.loss.estimators.base import (
    ContrastiveBatch,
    Estimator,
    EstimatorOutput,
    step_seed,
    weighted_negative_surrogate,
)
from dual_emc2.loss.estimators.emc2.chain import check_proposal, mh_visit_counts
from dual_emc2.loss.estimators.emc2.plan import ChainPlan, plan_states, state_features
from dual_emc2.loss.estimators.emc2.pool import (
    control_variate,
    draw_rows,
    gumbel_argmax,
    pool_columns,
    pool_logits,
    rao_blackwell_weights,
    view_rotations,
)
from dual_emc2.loss.estimators.emc2.update import draw_next, next_state
from dual_emc2.loss.state.keyed import ChainState

__all__ = ["EMC2", "ChainPlan", "gumbel_argmax", "pool_logits"]

WEIGHTS = ("rao_blackwell", "visits")
STATE_UPDATES = ("draw", "chain")
STATE_SCORES = ("exact", "stale")
OUT_OF_BATCH = ("reencode", "drop")


class EMC2(Estimator):
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
            (:mod:`dual_emc2.loss.state.layout`; config key ``loss.state_sharding``).
        num_candidates: unused (the common constructor of :func:`~dual_emc2.loss.registry.build_estimator`).

    Before the call: ``plan = emc2.plan(anchor_keys, candidate_keys, views_per_id=V, epoch=e)`` → :class:`ChainPlan`;
    ``plan.views`` are the (id, view, epoch) of the state views to encode with the batch.

    Call: ``emc2(batch, beta)`` → :class:`~dual_emc2.loss.estimators.base.EstimatorOutput`, ``batch`` carrying
    ``state_plan=plan`` and ``state_features`` ([len(plan.views), d], in that order) or ``encode_candidates``; stats
    include ``state_weight``, ``ess`` and (with a chain) ``accept_rate``.  Each call advances the chains of the
    batch's anchor keys.  ``state_score="stale", out_of_batch="drop"`` needs neither (biased at small batch).
    :class:`~dual_emc2.loss.GlobalContrastiveLoss` does the planning for a training loop (``state_request``).

    Example::

        emc2 = EMC2(num_keys=2 * n)                          # n = len(dataset): one chain per view, 2 views per image
        anchor_keys, _, candidate_keys, _, _ = unimodal_layout(ids, 2)      # ids: [b] dataset indices of the batch
        plan = emc2.plan(anchor_keys, candidate_keys, views_per_id=2, epoch=epoch)
        z = F.normalize(model(torch.cat([views, augment(plan.views)])), dim=-1)  # views: [2b, ...], image-major
        batch = unimodal_contrastive_batch(z[:2 * b], ids, 2, epoch=epoch, state_plan=plan, state_features=z[2 * b:])
        out = emc2(batch, beta=5.0)
        out.loss.backward()
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
                + "): lower loss.options.emc2.burn_in or raise the batch size")

    def state_views(self) -> tuple[Tensor, Tensor]:
        """(candidate key, view epoch) of every anchor key's chain, on the CPU (:meth:`ChainState.views`)."""
        return self.chains.views()

    # ------------------------------------------------------------------------------------------------ the plan
    @torch.no_grad()
    def plan(self, anchor_keys: Tensor, candidate_keys: Tensor, *, views_per_id: int = 1, epoch: int = 0,
             row_offset: int = 0, total_rows: int | None = None) -> ChainPlan:
        """Read the chains of ``anchor_keys`` (a collective when the state is sharded) and decide which state views
        the next call needs (:func:`~dual_emc2.loss.estimators.emc2.plan.plan_states`); the Bernoulli(q) coins come
        from the step's generator, so the forward draws the same ones."""
        total_rows = anchor_keys.numel() + row_offset if total_rows is None else total_rows
        state = self.chains.read(anchor_keys)
        dev = state[0].device
        gen = torch.Generator(device=dev)
        gen.manual_seed(step_seed(self.seed, self._iteration))
        chosen = draw_rows(gen, (), row_offset, total_rows, anchor_keys.numel(), dev) < self.reencode_fraction
        return plan_states(anchor_keys, state, chosen, candidate_keys, views_per_id=views_per_id, epoch=epoch,
                           step=self._iteration, exact_score=self.state_score == "exact",
                           reencode=self.out_of_batch == "reencode", map_into_batch=self.map_state_into_batch)

    # ------------------------------------------------------------------------------------------------ the step
    def forward(self, batch: ContrastiveBatch, beta: Tensor | float) -> EstimatorOutput:
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
        V = batch.views_per_id
        dev = scores.device
        gen = torch.Generator(device=dev)
        gen.manual_seed(step_seed(self.seed, self._advance()))
        draw = dict(row_offset=batch.row_offset, total_rows=batch.total_rows, rows=B, device=dev)
        draw_rows(gen, (), **draw)  # the plan's Bernoulli(q) coins: keeps the generator's stream
        q = self.reencode_fraction
        state_key, state_epoch = plan.state_key.to(dev), plan.state_epoch.to(dev)
        stored_score = plan.stored_score.to(dev).float()
        need, grad_rows, frozen = plan.need.to(dev), plan.grad_rows.to(dev), plan.frozen.to(dev)
        outside = plan.outside.to(dev)

        with torch.no_grad():
            col = plan.col.to(dev)
            col_valid = (col >= 0) & valid.gather(1, col.clamp(min=0)[:, None])[:, 0]
            # a state that is a batch column but masked for this anchor (a known false negative) is forgotten
            state_key = torch.where((col >= 0) & ~col_valid, torch.full_like(state_key, -1), state_key)
            col = torch.where(col_valid, col, torch.full_like(col, -1))

        feats = state_features(plan, batch.state_features, batch.encode_candidates, batch.anchors.shape[1],
                               batch.anchors.dtype, dev)
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
            pool_valid = pool_columns(valid, batch.candidate_ids, state_key // V, in_pool)
            batch_logits = (b * s_det).masked_fill(~pool_valid, float("-inf"))
            full_logits = (b * s_det).masked_fill(~valid, float("-inf"))
            batch_softmax = torch.softmax(full_logits, dim=1)
            state_logit = torch.where(in_pool, b * state_score, torch.full_like(state_score, float("-inf")))
            if self.runs_chain:
                R, P = self._steps(valid)
                res = mh_visit_counts(
                    s_det, beta=b, steps=R, burn_in=P, valid=pool_valid, init_index=col,
                    init_score=torch.where(in_pool, state_score, torch.full_like(state_score, float("-inf"))),
                    proposal=self.proposal, generator=gen, row_offset=batch.row_offset, total_rows=batch.total_rows,
                    backend=self.backend)
            if self.weights == "rao_blackwell" or not self.runs_chain:
                # an out-of-batch state joins thinned pools (one view per batch sample), the others pool with the
                # whole batch (docs/DESIGN.md, "which element was the state")
                if V > 1:
                    n_samples = int(torch.unique(batch.candidate_ids).numel())
                    rotation = view_rotations(batch.candidate_ids, batch.candidate_keys % V, V,
                                              draw_rows(gen, (n_samples,), **draw))
                else:
                    rotation = torch.zeros(B, C, dtype=torch.int64, device=dev)
            if self.weights == "rao_blackwell":
                w_batch, w_state = rao_blackwell_weights(batch_logits, full_logits, rotation, state_logit, in_pool, V)
            else:
                n_post = float(R - P)
                w_batch, w_state = res.counts / n_post, res.stay / n_post
            if self.out_of_batch == "drop":  # renormalise over the batch; a chain never in it: the batch softmax
                mass = w_batch.sum(dim=1, keepdim=True)
                w_batch = torch.where(mass > 0, w_batch / mass.clamp(min=1e-30), batch_softmax)
                w_state = torch.zeros_like(w_state)
            if self.state_score == "exact" and q < 1:
                w_batch = control_variate(w_batch, batch_softmax, in_pool, frozen, q)
            w_state = torch.where(grad_rows, w_state / q, torch.zeros_like(w_state))

            if self.runs_chain:
                new_col, new_score = res.index, res.score
            else:
                new_col = draw_next(batch_logits, full_logits, rotation, state_logit, in_pool,
                                    draw_rows(gen, (C + 1,), **draw))
                new_score = torch.where(new_col >= 0, s_det.gather(1, new_col.clamp(min=0)[:, None])[:, 0],
                                        state_score)
            new_key, new_score, new_epoch = next_state(new_col, new_score, (state_key, stored_score, state_epoch),
                                                       frozen, batch.candidate_keys, batch.epoch)

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
        return EstimatorOutput(loss, stats)
