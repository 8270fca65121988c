"""EMC² (Yau, Wai, Raman, Sarkar and Hong, "EMC²: Efficient MCMC Negative Sampling for Contrastive Learning with
Global Convergence", ICML 2024): persistent per-anchor Markov chains over the negatives.

Each anchor key i keeps a chain state z_i (a candidate key) and its last score.  At every step the estimator needs
E_{z ~ π_i} ∇s(x_i, z), π_i = softmax(β s(x_i, ·)) over all of D_neg(x_i) (eq. 4–6).  The batch is an auxiliary
variable drawn independently of z_i: with the *pool* A_i = C_i ∪ {z_i} (valid in-batch candidates plus the stored
state), p(z_i | A_i) ∝ π_i on A_i (docs/DESIGN.md, "pool kernel").  Hence

* any kernel invariant for π_i restricted to A_i keeps π_i invariant: one exact draw from softmax over A_i
  (``state_update="draw"``), or R M-H steps with uniform proposals over A_i (``proposal="pool"``);
* the Rao–Blackwell weights w_i = softmax(β s_i·) over A_i (``weights="rao_blackwell"``), the state's own term
  included, satisfy E[Σ_a w_ia ∇s(x_i, a)] = E_{π_i} ∇s at stationarity.

The surrogate (eq. 10–11 with these weights) is

    ℓ(θ) = (β / B) Σ_i [ −s(x_i, y_i) + Σ_j w_ij s(x_i, z_j) + (m_i / q) w_i,state s(x_i, ψ(z_i)) ],

weights detached; ψ(z_i) is re-encoded with grad for a random fraction q of the out-of-batch states (m_i ~
Bernoulli(q), ``reencode_fraction``), which keeps the estimate unbiased.  A state whose key is among the batch's
candidates is that column (``map_state_into_batch``): no re-encoding, and the pool is the batch.

Variants reachable by options (their measured bias is in experiments/RESULTS.md):
  ``weights="visits"``: post-burn-in visit counts of R M-H steps (the paper's estimator) with ``proposal`` ``pool``,
  ``batch`` (Algorithm 1: in-batch proposals, biased toward the batch softmax at small batch) or ``permuted_scan``;
  ``state_score="stale"``: the stored score instead of re-encoding (the released code; no extra forward);
  ``out_of_batch="drop"``: no state term, weights renormalised over the batch (no extra forward; biased).
"""
from __future__ import annotations

import torch
from torch import Tensor

from dual_emc2.objectives.base import (
    ContrastiveBatch,
    ContrastiveObjective,
    ObjectiveOutput,
    step_seed,
    weighted_negative_surrogate,
)
from dual_emc2.sampling import check_proposal, mh_visit_counts
from dual_emc2.state import ChainState

WEIGHTS = ("rao_blackwell", "visits")
STATE_UPDATES = ("draw", "chain")
STATE_SCORES = ("exact", "stale")
OUT_OF_BATCH = ("reencode", "drop")


def lookup_columns(keys: Tensor, candidate_keys: Tensor) -> Tensor:
    """Column j with ``candidate_keys[j] == keys[i]`` (the first in key order), −1 where absent or ``keys[i] < 0``."""
    order = torch.argsort(candidate_keys, stable=True)
    sorted_keys = candidate_keys[order]
    pos = torch.searchsorted(sorted_keys, keys).clamp(max=sorted_keys.numel() - 1)
    col = order[pos]
    found = (sorted_keys[pos] == keys) & (keys >= 0)
    return torch.where(found, col, torch.full_like(col, -1))


def pool_logits(scores: Tensor, valid: Tensor, state_score: Tensor, state_in_pool: Tensor, beta: float) -> Tensor:
    """[B, C + G] logits β s over the pool A_i = C_i ∪ G(z_i): columns 0..C−1 the batch (−inf where not a valid
    negative), columns C.. the G candidate keys of the stored state's sample (``state_score`` [B, G], or [B] for
    G = 1; −inf where the state is in the batch already or absent)."""
    state_score = state_score.float()
    if state_score.dim() == 1:
        state_score = state_score[:, None]
    batch = (beta * scores.float()).masked_fill(~valid, float("-inf"))
    state = torch.where(state_in_pool[:, None], beta * state_score, torch.full_like(state_score, float("-inf")))
    return torch.cat([batch, state], dim=1)


def state_group_keys(state_key: Tensor, views_per_id: int) -> Tensor:
    """[B, V] candidate keys of every view of the stored state's sample (keys ``id · V + v``)."""
    base = (state_key.clamp(min=0) // views_per_id) * views_per_id
    return base[:, None] + torch.arange(views_per_id, device=state_key.device)[None, :]


def draw_rows(generator: torch.Generator, shape_per_row: tuple[int, ...], row_offset: int, total_rows: int,
              rows: int, device: torch.device) -> Tensor:
    """Uniforms in [0, 1) of shape [rows, *shape_per_row], drawn for all ``total_rows`` rows of the global batch and
    sliced: the numbers a row gets do not depend on how the batch is split over processes."""
    u = torch.rand((total_rows, *shape_per_row), generator=generator, device=device)
    return u[row_offset:row_offset + rows]


def gumbel_argmax(logits: Tensor, uniforms: Tensor) -> Tensor:
    """One exact draw per row from softmax(logits) (Gumbel-max), with the uniforms given."""
    g = -torch.log(-torch.log(uniforms.clamp(min=1e-12, max=1 - 1e-7)))
    return torch.argmax(logits + g, dim=1)


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
        self.needs_candidate_encoder = state_score == "exact" or out_of_batch == "reencode"
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

    def _encode_states(self, batch: ContrastiveBatch, keys: Tensor, need: Tensor, with_grad: Tensor
                       ) -> Tensor | None:
        """ψ of the candidate keys ``keys`` [B, G] of rows ``need``, as [n_need, G, d] in row order; each distinct
        key (or sample id) encoded once, under grad for the rows ``with_grad`` and without for the others.
        ``batch.encode_candidate_keys`` encodes keys (e.g. fixed views); otherwise ``encode_candidates`` encodes
        the sample of each key (every view of a sample gets the same, un-augmented, features)."""
        rows = need.nonzero()[:, 0]
        if rows.numel() == 0:
            return None
        by_key = batch.encode_candidate_keys is not None
        if not by_key and batch.encode_candidates is None:
            raise RuntimeError(
                f"emc2 with state_score={self.state_score!r}, out_of_batch={self.out_of_batch!r} re-encodes chain "
                "states by sample id and needs an encoder (GlobalContrastiveLoss: pass encode_x/encode_y; "
                "ContrastiveBatch: encode_candidates), or use state_score='stale', out_of_batch='drop'")
        encode = batch.encode_candidate_keys if by_key else batch.encode_candidates
        G = keys.shape[1]
        wanted = keys[rows] if by_key else keys[rows] // batch.views_per_id  # [n, G]
        uniq, inverse = torch.unique(wanted.reshape(-1), return_inverse=True)
        grad_uniq = torch.zeros(uniq.numel(), dtype=torch.bool, device=uniq.device)
        grad_uniq[inverse[with_grad[rows].repeat_interleave(G)]] = True
        parts, order = [], []
        if bool(grad_uniq.any()):
            with torch.enable_grad():
                parts.append(encode(uniq[grad_uniq]))
            order.append(grad_uniq.nonzero()[:, 0])
        if bool((~grad_uniq).any()):
            with torch.no_grad():
                parts.append(encode(uniq[~grad_uniq]))
            order.append((~grad_uniq).nonzero()[:, 0])
        feats = torch.cat([p.to(batch.anchors.dtype) for p in parts])
        position = torch.empty_like(uniq)
        position[torch.cat(order)] = torch.arange(uniq.numel(), device=uniq.device)
        return feats[position[inverse]].reshape(rows.numel(), G, -1)

    def forward(self, batch: ContrastiveBatch, beta: Tensor | float) -> ObjectiveOutput:
        b = self.beta_value(beta)
        scores = batch.scores()
        valid = batch.negative_mask
        B = scores.shape[0]
        dev = scores.device
        keys = batch.anchor_keys
        state_key, stored_score = self.chains.read(keys)
        step = self._advance()
        gen = torch.Generator(device=dev)
        gen.manual_seed(step_seed(self.seed, step))
        draw = dict(row_offset=batch.row_offset, total_rows=batch.total_rows, rows=B, device=dev)

        with torch.no_grad():
            col = lookup_columns(state_key, batch.candidate_keys) if self.map_state_into_batch \
                else torch.full_like(state_key, -1)
            present = col >= 0
            col_valid = present & valid.gather(1, col.clamp(min=0)[:, None])[:, 0]
            # a state present in the batch but masked for this anchor (a known false negative) is forgotten
            state_key = torch.where(present & ~col_valid, torch.full_like(state_key, -1), state_key)
            col = torch.where(col_valid, col, torch.full_like(col, -1))
            outside = (state_key >= 0) & (col < 0)
            chosen = draw_rows(gen, (), **draw) < self.reencode_fraction  # Bernoulli(q) per row
            q = self.reencode_fraction
            if self.state_score == "exact":
                refresh = outside & chosen  # re-encoded: exact score, the chain moves, gradient term
                frozen = outside & ~chosen  # not re-encoded this step: the chain stays (random-scan update)
                grad_rows = refresh if self.out_of_batch == "reencode" else torch.zeros_like(outside)
                need = refresh
            else:
                frozen = torch.zeros_like(outside)
                grad_rows = outside & chosen if self.out_of_batch == "reencode" else torch.zeros_like(outside)
                need = grad_rows
        # the pool holds every view of the state's sample (G = views per id) under Rao–Blackwell weights: a batch
        # holds whole samples, so a lone view would tell the state apart and break p(z | A) ∝ π (docs/DESIGN.md)
        G = batch.views_per_id if not self.runs_chain else 1
        group = state_group_keys(state_key, G) if G > 1 else state_key[:, None]  # [B, G]
        feats = self._encode_states(batch, group, need, grad_rows)
        state_score = stored_score.float()[:, None].repeat(1, G)  # [B, G]; stale: the stored view's score for all
        s_out = None
        if feats is not None:
            need_rows = need.nonzero()[:, 0]
            s_out = (batch.anchors[need_rows].float()[:, None, :] * feats.float()).sum(dim=-1)  # [n, G], with grad
            if self.state_score == "exact":
                state_score[need_rows] = s_out.detach()
        in_pool = outside & ~frozen
        state_score = torch.where(in_pool[:, None], state_score, torch.full_like(state_score, float("-inf")))

        with torch.no_grad():
            s_det = scores.detach().float()
            if self.runs_chain:
                R, P = self._steps(valid)
                res = mh_visit_counts(
                    s_det, beta=b, steps=R, burn_in=P, valid=valid, init_index=col, init_score=state_score[:, 0],
                    proposal=self.proposal, generator=gen, row_offset=batch.row_offset, total_rows=batch.total_rows,
                    backend=self.backend)
                new_col = res.index
            logits = pool_logits(s_det, valid, state_score, in_pool, b)
            C = s_det.shape[1]
            batch_softmax = torch.softmax(logits[:, :C], dim=1)
            if self.weights == "rao_blackwell":
                p = torch.softmax(logits, dim=1)
                w_batch, w_state = p[:, :C], p[:, C:]  # [B, C], [B, G]
            else:
                n_post = float(R - P)
                w_batch, w_state = res.counts / n_post, (res.stay / n_post)[:, None]
            if self.out_of_batch == "drop":  # renormalise over the batch; a chain never in it: the batch softmax
                mass = w_batch.sum(dim=1, keepdim=True)
                w_batch = torch.where(mass > 0, w_batch / mass.clamp(min=1e-30), batch_softmax)
                w_state = torch.zeros_like(w_state)
            if self.state_score == "exact" and q < 1:
                # control variate: E over the Bernoulli(q) choice of h + (m/q)(w − h) is w, the unbiased weights;
                # rows that were not re-encoded use the batch softmax h and keep their state
                refresh_rows = (outside & ~frozen)[:, None]
                w_batch = torch.where(refresh_rows, batch_softmax + (w_batch - batch_softmax) / q,
                                      torch.where(frozen[:, None], batch_softmax, w_batch))
            w_state = torch.where(grad_rows[:, None], w_state / q, torch.zeros_like(w_state))
            stay_key = state_key
            if not self.runs_chain:
                pick = gumbel_argmax(logits, draw_rows(gen, (logits.shape[1],), **draw))
                new_col = torch.where(pick < C, pick, torch.full_like(pick, -1))
                in_group = (pick - C).clamp(min=0, max=G - 1)[:, None]
                stay_key = torch.where(pick >= C, group.gather(1, in_group)[:, 0], state_key)
                new_score = torch.where(new_col >= 0, s_det.gather(1, new_col.clamp(min=0)[:, None])[:, 0],
                                        state_score.gather(1, in_group)[:, 0])
            else:
                new_score = res.score
            new_col = torch.where(frozen, torch.full_like(new_col, -1), new_col)
            stay_key = torch.where(frozen, state_key, stay_key)
            new_score = torch.where(frozen, stored_score.float(), new_score)

        loss = weighted_negative_surrogate(batch.positive_scores(scores), scores, w_batch, beta)
        if s_out is not None and bool(grad_rows.any()):
            rows_in_need = grad_rows[need]  # positions of the grad rows among the encoded rows
            loss = loss + beta * (w_state[grad_rows].detach() * s_out[rows_in_need]).sum() / B

        with torch.no_grad():
            new_key = torch.where(new_col >= 0, batch.candidate_keys[new_col.clamp(min=0)], stay_key)
            self.chains.write(keys, new_key, new_score)
            w_all = torch.cat([w_batch, w_state], dim=1).clamp(min=0)
            ess = w_all.sum(dim=1).square() / w_all.square().sum(dim=1).clamp(min=1e-30)
            stats = {
                "state_weight": w_state.sum(dim=1).mean(),
                "start_outside_frac": outside.float().mean(),
                "reencoded_frac": need.float().mean(),
                "frozen_frac": frozen.float().mean(),
                "ess": ess.mean(),
                "visited_score": (w_batch * s_det).sum(dim=1).mean(),
            }
            if self.runs_chain:
                stats["accept_rate"] = res.accepted.mean() / R
        return ObjectiveOutput(loss, stats)
