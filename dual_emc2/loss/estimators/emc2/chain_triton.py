"""One fused Triton launch for the sequential part of the EMC² Metropolis–Hastings sampler (Algorithm 1, eq. 9).

:func:`mh_chains_triton` is a drop-in for :func:`dual_emc2.loss.estimators.emc2.chain.mh_chains_torch`: for the same
pre-drawn proposals it returns bit-identical :class:`~dual_emc2.loss.estimators.emc2.chain.MHResult` tensors.

Design (the step loop is latency-bound, not bandwidth-bound):

* one lane per chain, a 1-D grid of ``BLOCK``-chain programs, all ``R`` steps inside one launch;
* the randomness is step-major ``[R, B]`` and independent of the chain state, so the steps are processed in tiles of
  ``TILE`` unrolled steps whose loads (proposed column, its score, ``log u``) are issued together, one tile ahead
  (double buffering): the only dependent chain per step is ``sub → mul → compare → select`` in registers;
* visits are counted as run lengths: a chain accumulates the post-burn-in steps it spends on its current state in a
  register and adds the run to ``counts[i, j]`` with one fire-and-forget relaxed ``atomic_add`` when it leaves ``j``
  (and once at the end).  Compared with storing the ``[R, B]`` visit matrix and a separate ``scatter_add`` this needs
  no second launch, no ``R × B`` write, and only ``accepted + 1`` atomics per chain instead of ``R``; each lane writes
  only its own row, so atomics never contend.  Runs are integers below ``2**24``, which float32 adds exactly in any
  grouping, so the counts equal the reference's ``scatter_add`` of ones bit for bit.
* the acceptance test ``log u < β (p − s_cur)`` is evaluated in float32 as subtract-then-multiply (no FMA can form),
  the same rounding as the torch reference; ``β`` is rounded to float32 as in the reference.
* 32-bit lane indices inside the loop; every address that scales with ``R × B`` or ``B × C`` is formed with 64-bit
  offsets, so inputs beyond ``2**31`` elements are addressed correctly.

Triton is imported behind a guard: importing this module never fails, :func:`is_usable` says whether the kernel can
run.  On CPU tensors it runs under the Triton interpreter (``TRITON_INTERPRET=1`` set before Triton is imported),
which the tests use to check it against the reference without a GPU.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from torch import Tensor

from dual_emc2.loss.estimators.emc2.chain_types import MHResult

try:  # a missing or broken Triton must not break importing the package
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - ImportError, or a runtime error from an incompatible install
    triton = None
    tl = None

BLOCK = 128  # chains per program (one lane each; 4 warps)
TILE = 16  # steps per unrolled tile: 3 × TILE loads in flight per lane
NUM_WARPS = 4
MAX_STEPS = 2**24  # run lengths and counts must stay exactly representable in float32

_INTERPRETED = False

if triton is not None:
    _INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # triton.jit picks interpreter mode at decoration

    @triton.jit
    def _load_tile(pi_ptr, ps_ptr, lu_ptr, chain, live, r0, R, B, TILE: tl.constexpr):
        """Issue the loads of steps ``r0 .. r0 + TILE - 1`` (steps ``>= R`` masked off); returns three tuples."""
        idx = ()
        score = ()
        logu = ()
        for t in tl.static_range(TILE):
            r = r0 + t
            m = live & (r < R)
            off = tl.cast(r, tl.int64) * B + chain  # 64-bit: R * B may exceed 2**31
            idx = idx + (tl.load(pi_ptr + off, mask=m, other=0).to(tl.int32),)
            score = score + (tl.load(ps_ptr + off, mask=m, other=0.0),)
            logu = logu + (tl.load(lu_ptr + off, mask=m, other=0.0),)
        return idx, score, logu

    @triton.jit
    def _mh_chains_kernel(
        pi_ptr,  # [R, B] int64 proposed columns (-1: the stored state)
        ps_ptr,  # [R, B] float32 scores of the proposals
        lu_ptr,  # [R, B] float32 log u
        init_idx_ptr,  # [B] int64, -1 = out-of-batch state
        init_s_ptr,  # [B] float32
        counts_ptr,  # [B, C] float32, zero-filled
        out_idx_ptr,  # [B] int64
        out_s_ptr,  # [B] float32
        out_stay_ptr,  # [B] float32
        out_acc_ptr,  # [B] float32
        beta,  # float32
        R,
        B,
        C,
        burn_in,
        BLOCK: tl.constexpr,
        TILE: tl.constexpr,
    ):
        chain = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = chain < B
        cur_idx = tl.load(init_idx_ptr + chain, mask=live, other=-1).to(tl.int32)
        cur_s = tl.load(init_s_ptr + chain, mask=live, other=0.0)
        count_row = counts_ptr + tl.cast(chain, tl.int64) * C  # 64-bit: B * C may exceed 2**31
        run = tl.zeros([BLOCK], dtype=tl.int32)  # post-burn-in steps on the current state, not yet added
        stay = tl.zeros([BLOCK], dtype=tl.int32)
        n_acc = tl.zeros([BLOCK], dtype=tl.int32)
        nxt_idx, nxt_s, nxt_lu = _load_tile(pi_ptr, ps_ptr, lu_ptr, chain, live, 0, R, B, TILE)
        for r0 in range(0, R, TILE):
            tile_idx = nxt_idx
            tile_s = nxt_s
            tile_lu = nxt_lu
            # prefetch the next tile before the dependent chain of this one
            nxt_idx, nxt_s, nxt_lu = _load_tile(pi_ptr, ps_ptr, lu_ptr, chain, live, r0 + TILE, R, B, TILE)
            for t in tl.static_range(TILE):
                r = r0 + t
                m = live & (r < R)
                prop_s = tile_s[t]
                acc = (tile_lu[t] < beta * (prop_s - cur_s)) & m
                leave = acc & (run > 0)
                tl.atomic_add(count_row + cur_idx, run.to(tl.float32), mask=leave & (cur_idx >= 0), sem="relaxed")
                stay += tl.where(leave & (cur_idx < 0), run, 0)
                run = tl.where(acc, 0, run) + (m & (r >= burn_in)).to(tl.int32)
                cur_idx = tl.where(acc, tile_idx[t], cur_idx)
                cur_s = tl.where(acc, prop_s, cur_s)
                n_acc += acc.to(tl.int32)
        tl.atomic_add(count_row + cur_idx, run.to(tl.float32), mask=live & (run > 0) & (cur_idx >= 0), sem="relaxed")
        stay += tl.where(cur_idx < 0, run, 0)
        tl.store(out_idx_ptr + chain, cur_idx.to(tl.int64), mask=live)
        tl.store(out_s_ptr + chain, cur_s, mask=live)
        tl.store(out_stay_ptr + chain, stay.to(tl.float32), mask=live)
        tl.store(out_acc_ptr + chain, n_acc.to(tl.float32), mask=live)


def is_usable(device: torch.device) -> bool:
    """True iff the kernel can run on ``device``: Triton imports and either ``device`` is CUDA with CUDA available, or
    ``device`` is the CPU and the Triton interpreter is on (``TRITON_INTERPRET=1`` when Triton was imported)."""
    try:
        if triton is None:
            return False
        device = torch.device(device)
        if device.type == "cuda":
            return bool(torch.cuda.is_available())
        if device.type == "cpu":
            return _INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1"
        return False
    except Exception:  # noqa: BLE001 - a capability probe must never raise
        return False


def _check(name: str, x: Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} (the device of prop_index)")
    return x.contiguous()


def mh_chains_triton(
    prop_index: Tensor,
    prop_score: Tensor,
    log_u: Tensor,
    init_index: Tensor,
    init_score: Tensor,
    beta: float,
    burn_in: int,
    num_candidates: int,
    check_indices: bool | None = None,
) -> MHResult:
    """Run ``R`` M-H steps for ``B`` chains in one launch; same arguments and bit-identical results as
    :func:`dual_emc2.loss.estimators.emc2.chain.mh_chains_torch`.

    Step ``r`` accepts proposal ``j`` iff ``log u_r < β (S_ij − s_cur)``, i.e. with probability
    ``min(1, e^{β(S_ij − s_cur)})`` (EMC² eq. 9).

    Args:
        prop_index: [R, B] int64 proposed in-batch columns, in ``[0, num_candidates)``, or ``-1`` for the chain's
            stored out-of-batch state (pool proposals; its score is in ``prop_score`` like any other).
        prop_score: [R, B] float32 scores of the proposals.
        log_u: [R, B] float32 log acceptance uniforms.
        init_index: [B] initial column of each chain (integer dtype), ``-1`` for an out-of-batch state.
        init_score: [B] initial score (floating dtype, used in float32; ``-inf`` accepts the first proposal surely).
        beta: inverse temperature (rounded to float32, as in the reference).
        burn_in: P, steps ``r < P`` are not counted.
        num_candidates: C, number of columns of ``counts``.
        check_indices: verify ``prop_index`` and ``init_index`` are in range first (a host sync).  Default: only for
            CPU tensors; on CUDA the caller guarantees it (``draw_mh_proposals`` does), as out-of-range columns would
            make the kernel write outside ``counts``.

    Returns:
        :class:`~dual_emc2.loss.estimators.emc2.chain.MHResult` ``(counts [B, C], index [B], score [B], stay [B],
        accepted [B])``.
    """
    if not isinstance(prop_index, Tensor) or prop_index.dim() != 2:
        raise ValueError(f"prop_index must be an [R, B] tensor, got {getattr(prop_index, 'shape', type(prop_index))}")
    R, B = prop_index.shape
    C = int(num_candidates)
    device = prop_index.device
    prop_index = _check("prop_index", prop_index, (R, B), torch.int64, device)
    prop_score = _check("prop_score", prop_score, (R, B), torch.float32, device)
    log_u = _check("log_u", log_u, (R, B), torch.float32, device)
    # like the reference, the initial state may come in any integer / floating dtype
    if isinstance(init_index, Tensor) and not init_index.is_floating_point() and init_index.dtype != torch.bool:
        init_index = init_index.to(torch.int64)
    if isinstance(init_score, Tensor) and init_score.is_floating_point():
        init_score = init_score.to(torch.float32)
    init_index = _check("init_index", init_index, (B,), torch.int64, device)
    init_score = _check("init_score", init_score, (B,), torch.float32, device)
    if C < 1 or C >= 2**31:
        raise ValueError(f"num_candidates must be in [1, 2**31), got {num_candidates}")
    if B >= 2**31:
        raise ValueError(f"the number of chains B must be below 2**31, got {B}")
    if R >= MAX_STEPS:
        raise ValueError(f"steps R must be below 2**24 for exact float32 visit counts, got {R}")
    if burn_in < 0:
        raise ValueError(f"burn_in must be >= 0, got {burn_in}")
    if check_indices is None:
        check_indices = device.type == "cpu"
    if check_indices and R * B > 0:
        if bool((prop_index < -1).any()) or bool((prop_index >= C).any()):
            raise ValueError(f"prop_index must hold columns in [-1, {C}) (-1: the stored state), got values outside")
        if bool((init_index < -1).any()) or bool((init_index >= C).any()):
            raise ValueError(f"init_index must hold columns in [-1, {C}), got values outside")
    if not is_usable(device):
        raise RuntimeError(
            f"the Triton M-H kernel cannot run on {device}: it needs Triton and CUDA, or TRITON_INTERPRET=1 set before "
            "Triton is imported for CPU tensors"
        )

    counts = torch.zeros(B, C, dtype=torch.float32, device=device)
    index = torch.empty(B, dtype=torch.int64, device=device)
    score = torch.empty(B, dtype=torch.float32, device=device)
    stay = torch.empty(B, dtype=torch.float32, device=device)
    accepted = torch.empty(B, dtype=torch.float32, device=device)
    if B == 0:
        return MHResult(counts, index, score, stay, accepted)
    beta32 = float(torch.tensor(beta, dtype=torch.float32))  # the reference multiplies by a float32 β
    grid = (triton.cdiv(B, BLOCK),)
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        _mh_chains_kernel[grid](
            prop_index, prop_score, log_u, init_index, init_score, counts, index, score, stay, accepted,
            beta32, R, B, C, int(burn_in), BLOCK=BLOCK, TILE=TILE, num_warps=NUM_WARPS,
        )
    return MHResult(counts, index, score, stay, accepted)

