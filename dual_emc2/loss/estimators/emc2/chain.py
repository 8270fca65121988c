"""Metropolis–Hastings negative sampling over in-batch candidates (EMC², Algorithm 1, eq. 9).

For a score matrix ``S = [s(x_i, z_j)]`` (``B`` chains × ``C`` candidates) every chain ``i`` runs ``R`` M-H steps
targeting ``softmax(β S_i·)`` restricted to its proposable set, starting from a stored state.  The result is returned
as visit counts ``W_ij`` (steps ``r ≥ P`` spent on candidate ``j``) and the steps spent on the stored state while it is
out of the batch, which turn the EMC² stochastic gradient (eq. 10) into a single weighted sum over the batch (see
:mod:`dual_emc2.loss.estimators.emc2`).

Proposals (``proposal``):

* ``pool`` (default): uniform over the *pool* A = C_i ∪ {z_i}: the row's valid in-batch candidates plus the chain's
  stored out-of-batch state, which stays proposable for the whole visit (proposal column ``-1``).  Because the batch
  is drawn independently of the state, p(z | A) ∝ π(z) on A, so a kernel invariant for the softmax restricted to A
  keeps softmax(β s) over all of D_neg invariant (docs/DESIGN.md, "pool kernel").  No within-visit bias.
* ``batch`` (Algorithm 1 of Yau et al.): uniform over the valid in-batch candidates only.  Once the chain leaves its
  stored state it cannot return, so ``R > 1`` steps drift toward the softmax restricted to the batch: a bias that
  more visits do not remove (experiments/RESULTS.md, chain check).
* ``permuted_scan``: the valid columns in a fresh random order per sweep, a randomised systematic scan.  Not exactly
  invariant for its target even on a fixed batch; kept as a measured variant.

The work is split in two:

* :func:`draw_mh_proposals` draws every random number up front (proposal columns and ``log u`` for the acceptance
  test), as ``[R, B]`` arrays.  These do not depend on the chain, which is what lets the fused kernel prefetch them.
  The draws are made for all ``total_rows`` chains of the global batch and sliced, so a chain's randomness does not
  depend on how the batch is split over processes.
* the sequential chain itself (:func:`run_mh_chains`): a vectorised torch loop over steps (CPU) or one fused Triton
  launch (CUDA, :mod:`dual_emc2.loss.estimators.emc2.chain_triton`), which give identical results for identical
  random numbers.
"""
from __future__ import annotations

import difflib
import math
import warnings
from typing import Literal

import torch
from torch import Tensor

from dual_emc2.loss.estimators.emc2.chain_types import MHProposals, MHResult

Proposal = Literal["pool", "batch", "permuted_scan"]
PROPOSALS: tuple[str, ...] = ("pool", "batch", "permuted_scan")
Backend = Literal["auto", "torch", "triton"]


def _check_inputs(scores: Tensor, valid: Tensor | None, steps: int, burn_in: int, beta: float) -> Tensor:
    if scores.dim() != 2:
        raise ValueError(f"scores must be a [B, C] matrix, got shape {tuple(scores.shape)}")
    if not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite positive inverse temperature, got {beta}")
    if steps < 1:
        raise ValueError(f"steps (R) must be >= 1, got {steps}")
    if not 0 <= burn_in < steps:
        raise ValueError(f"burn_in (P) must satisfy 0 <= P < R = {steps}, got P = {burn_in}")
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    if valid.shape != scores.shape or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool mask of shape {tuple(scores.shape)}, "
                         f"got {valid.dtype} {tuple(valid.shape)}")
    if not valid.is_cuda and not bool(valid.any(dim=1).all()):  # on CUDA the check would sync every step
        raise ValueError("every chain needs at least one valid candidate (a row of `valid` is all False)")
    return valid


def check_proposal(proposal: str) -> str:
    """``proposal`` if it names a proposal, else a ValueError naming the choices (and the nearest one)."""
    if proposal in PROPOSALS:
        return proposal
    hint = difflib.get_close_matches(str(proposal), PROPOSALS, n=1)
    raise ValueError(f"proposal must be one of {', '.join(PROPOSALS)}, got {proposal!r}"
                     + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def draw_mh_proposals(
    valid: Tensor,
    steps: int,
    proposal: Proposal = "pool",
    generator: torch.Generator | None = None,
    row_offset: int = 0,
    total_rows: int | None = None,
    state_in_pool: Tensor | None = None,
) -> MHProposals:
    """Draw the proposals and acceptance uniforms of ``steps`` M-H steps for each row of ``valid``.

    ``pool``: each step proposes uniformly from the row's valid columns plus, where ``state_in_pool[i]``, the stored
    state (column ``-1``).  ``batch`` (Algorithm 1): uniformly from the valid columns.  ``permuted_scan``: the valid
    columns in a random order, a fresh random permutation for every sweep through them.

    The random streams are drawn for ``total_rows`` chains and rows ``row_offset : row_offset + B`` are kept, so a
    process holding part of a global batch gets the same numbers as a single process holding all of it.
    """
    proposal = check_proposal(proposal)
    B, C = valid.shape
    total_rows = B if total_rows is None else total_rows
    if not 0 <= row_offset <= total_rows - B:
        raise ValueError(f"rows [{row_offset}, {row_offset + B}) do not fit in total_rows={total_rows}")
    dev = valid.device
    rows = slice(row_offset, row_offset + B)
    n_valid = valid.sum(dim=1)  # [B]
    # valid columns first, in column order: order[i, k] is the k-th valid column of row i
    if proposal in ("pool", "batch"):
        u_prop = torch.rand(total_rows, steps, generator=generator, device=dev)[rows]
        log_u = torch.rand(total_rows, steps, generator=generator, device=dev)[rows].log_()
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        extra = state_in_pool.to(torch.int64) if proposal == "pool" and state_in_pool is not None else 0
        n_pool = n_valid + extra
        k = (u_prop * n_pool[:, None]).long()
        k = torch.minimum(k, (n_pool - 1)[:, None])
        index = order.gather(1, k.clamp(max=C - 1))
        index = torch.where(k >= n_valid[:, None], torch.full_like(index, -1), index)  # k = n_valid: the state
    else:
        log_u = torch.rand(total_rows, steps, generator=generator, device=dev)[rows].log_()
        sweeps = -(-steps // int(n_valid.min()))
        perms = []
        for _ in range(sweeps):  # one [total_rows, C] draw per sweep: earlier sweeps never depend on later ones
            keys = torch.rand(total_rows, C, generator=generator, device=dev)[rows]
            keys = keys.masked_fill(~valid, 2.0)
            perms.append(torch.argsort(keys, dim=1))
        perm = torch.stack(perms, dim=1).reshape(B, sweeps * C)
        r = torch.arange(steps, device=dev)[None, :]
        flat = (r // n_valid[:, None]) * C + r % n_valid[:, None]
        index = perm.gather(1, flat)
    return MHProposals(index=index.t().contiguous(), log_u=log_u.t().contiguous())


def mh_chains_torch(
    prop_index: Tensor,
    prop_score: Tensor,
    log_u: Tensor,
    init_index: Tensor,
    init_score: Tensor,
    beta: float,
    burn_in: int,
    num_candidates: int,
) -> MHResult:
    """Reference implementation of the sequential part: a loop over steps, vectorised over chains.

    Step ``r`` accepts proposal ``j`` iff ``log u_r < β (S_ij − s_cur)`` (probability ``min(1, e^{β(S_ij − s_cur)})``).
    A proposal ``-1`` is the stored state, with score ``init_score`` (pool proposals).
    """
    R, B = prop_index.shape
    beta_t = torch.tensor(beta, dtype=torch.float32, device=prop_score.device)
    cur_idx = init_index.to(torch.int64).clone()
    cur_s = init_score.to(torch.float32).clone()
    accepted = torch.zeros(B, dtype=torch.float32, device=prop_score.device)
    visits = torch.empty(R, B, dtype=torch.int64, device=prop_score.device)
    for r in range(R):
        acc = log_u[r] < beta_t * (prop_score[r] - cur_s)
        cur_idx = torch.where(acc, prop_index[r], cur_idx)
        cur_s = torch.where(acc, prop_score[r], cur_s)
        accepted += acc
        visits[r] = cur_idx
    return _counts_from_visits(visits[burn_in:], cur_idx, cur_s, accepted, num_candidates)


def _counts_from_visits(post: Tensor, index: Tensor, score: Tensor, accepted: Tensor, C: int) -> MHResult:
    B = post.shape[1]
    slot = torch.where(post < 0, torch.full_like(post, C), post).t()  # out-of-batch steps go to an extra column
    counts = torch.zeros(B, C + 1, dtype=torch.float32, device=post.device)
    counts.scatter_add_(1, slot, torch.ones_like(slot, dtype=torch.float32))
    return MHResult(counts[:, :C].contiguous(), index, score, counts[:, C].contiguous(), accepted)


def triton_available(device: torch.device) -> bool:
    """True when the fused kernel can run on ``device`` (CUDA + importable Triton, or the Triton interpreter)."""
    import dual_emc2.loss.estimators.emc2.chain_triton as mh_triton

    return mh_triton.is_usable(device)


_warned_fallback = False


def run_mh_chains(
    prop: MHProposals,
    scores: Tensor,
    init_index: Tensor,
    init_score: Tensor,
    beta: float,
    burn_in: int,
    backend: Backend = "auto",
) -> MHResult:
    """Run the chains for pre-drawn proposals, on the fused Triton kernel where it can run, else the torch loop."""
    global _warned_fallback
    idx = prop.index.t()
    prop_score = scores.to(torch.float32).gather(1, idx.clamp(min=0))  # [B, R], gathered up front
    # column -1 is the stored state (proposable under ``pool``), with its score
    prop_score = torch.where(idx < 0, init_score.to(torch.float32)[:, None], prop_score)
    prop_score = prop_score.t().contiguous()
    if backend == "auto":
        use_triton = scores.is_cuda and triton_available(scores.device)
        if scores.is_cuda and not use_triton and not _warned_fallback:
            warnings.warn("Triton is not importable: EMC² sampler falls back to a per-step torch loop on CUDA (slow)",
                          stacklevel=2)
            _warned_fallback = True
    elif backend == "triton":
        if not triton_available(scores.device):
            raise RuntimeError("backend='triton' needs CUDA and Triton (or TRITON_INTERPRET=1 for CPU tensors)")
        use_triton = True
    elif backend == "torch":
        use_triton = False
    else:
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    args = (prop.index, prop_score, prop.log_u, init_index, init_score, beta, burn_in, scores.shape[1])
    if use_triton:
        from dual_emc2.loss.estimators.emc2.chain_triton import mh_chains_triton

        return mh_chains_triton(*args)
    return mh_chains_torch(*args)


def mh_visit_counts(
    scores: Tensor,
    *,
    beta: float,
    steps: int,
    burn_in: int,
    valid: Tensor | None = None,
    init_index: Tensor | None = None,
    init_score: Tensor | None = None,
    proposal: Proposal = "pool",
    generator: torch.Generator | None = None,
    row_offset: int = 0,
    total_rows: int | None = None,
    backend: Backend = "auto",
) -> MHResult:
    """Run ``steps`` Metropolis–Hastings steps for each of the ``B`` chains over the ``C`` in-batch candidates.

    Args:
        scores: [B, C] scores ``s(x_i, z_j)`` (no grad needed; detached here).
        beta: inverse temperature β of the target ``softmax(β s)``.
        steps: R, M-H steps per chain.  burn_in: P, steps ``r < P`` are not counted.
        valid: [B, C] bool mask of allowed negatives (positives and self excluded); all True if None.
        init_index: [B] in-batch column of each chain's stored state, ``-1`` if it is out of the batch (default all -1).
        init_score: [B] score of the stored state; ``-inf`` (default) means no state: the first proposal is always
            accepted, and under ``pool`` there is no state to propose.
        proposal: ``"pool"`` (default: batch ∪ {stored state}, no within-visit bias), ``"batch"`` (Algorithm 1) or
            ``"permuted_scan"``; see the module docstring.
        generator: torch generator on ``scores.device`` for reproducible draws.
        row_offset, total_rows: position of these chains in the global batch (rank-invariant randomness).
        backend: ``"auto"`` (Triton on CUDA when available, else torch), ``"torch"`` or ``"triton"``.

    Returns:
        :class:`MHResult` ``(counts, index, score, stay, accepted)``.
    """
    scores = scores.detach()
    valid = _check_inputs(scores, valid, steps, burn_in, float(beta))
    B = scores.shape[0]
    dev = scores.device
    if init_index is None:
        init_index = torch.full((B,), -1, dtype=torch.int64, device=dev)
    if init_score is None:
        init_score = torch.full((B,), float("-inf"), dtype=torch.float32, device=dev)
    init_score = init_score.to(device=dev, dtype=torch.float32)
    init_index = init_index.to(device=dev, dtype=torch.int64)
    # an in-batch init state takes its score from the current scores: the exact acceptance ratio
    in_batch = init_index >= 0
    init_score = torch.where(in_batch, scores.float().gather(1, init_index.clamp(min=0)[:, None])[:, 0], init_score)
    state_in_pool = (~in_batch) & torch.isfinite(init_score)
    prop = draw_mh_proposals(valid, steps, proposal, generator, row_offset, total_rows, state_in_pool=state_in_pool)
    return run_mh_chains(prop, scores, init_index, init_score, float(beta), burn_in, backend)
