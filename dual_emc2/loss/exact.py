"""Exact global contrastive loss L(θ) (EMC² eq. 1) and ‖∇L(θ)‖² on a finite set of positive pairs.

    L(θ) = 1/n Σ_k [ −β s(x_k, y_k) + log Σ_{z ∈ D_neg(x_k)} exp(β s(x_k, z)) ],     D_neg(x_k) = {z_j : id_j ≠ id_k}

The loss is computed in float64 from the features; its gradient is backpropagated into the parameters in two passes
(features without grad → dL/dfeatures in float64 → per-chunk re-encode with grad and ``backward(dL/dfeatures)``), so
memory stays at one chunk of activations whatever the dataset size.  Used by the stationarity protocol (Fig. 7).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


def global_contrastive_loss(
    anchors: Tensor, candidates: Tensor, positive: Tensor, anchor_ids: Tensor, candidate_ids: Tensor,
    beta: float, row_chunk: int = 4096,
) -> Tensor:
    """Eq. (1) over all anchors of a finite set, differentiable in ``anchors`` and ``candidates``.

    ``positive[k]`` is the column in ``candidates`` of anchor k's positive; candidates sharing the anchor's id are not
    negatives.  Computed in the dtype of the inputs (pass float64 for the exact value), by chunks of anchors.
    """
    n = anchors.shape[0]
    total = anchors.new_zeros(())
    for lo in range(0, n, row_chunk):
        a = anchors[lo: lo + row_chunk]
        s = a @ candidates.t()
        neg = candidate_ids[None, :] != anchor_ids[lo: lo + row_chunk, None]
        pos = s.gather(1, positive[lo: lo + row_chunk, None])[:, 0]
        lse = torch.logsumexp((beta * s).masked_fill(~neg, float("-inf")), dim=1)
        total = total + (lse - beta * pos).sum()
    return total / n


def _encode_all(encode: Callable[[Tensor], Tensor], inputs: Tensor, chunk: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([encode(x) for x in inputs.split(chunk)])


def exact_objective(
    encode_anchor: Callable[[Tensor], Tensor],
    encode_candidate: Callable[[Tensor], Tensor] | None,
    anchor_inputs: Tensor,
    candidate_inputs: Tensor | None,
    positive: Tensor,
    anchor_ids: Tensor,
    candidate_ids: Tensor,
    beta: float,
    params: Iterable[nn.Parameter],
    chunk: int = 256,
) -> tuple[float, float]:
    """Exact ``(L(θ), ‖∇_θ L(θ)‖²)`` of eq. (1) for a model over a finite dataset.

    ``encode_candidate``/``candidate_inputs`` of ``None`` mean φ = ψ on the same inputs (the unimodal setting: every
    view is both an anchor and a candidate).  The gradient is accumulated into the parameters' ``.grad`` (cleared
    first) and its squared norm summed in float64.  The model should be in eval mode (no batch-norm updates).
    """
    params = [p for p in params if p.requires_grad]
    shared = encode_candidate is None
    a_feat = _encode_all(encode_anchor, anchor_inputs, chunk).double().requires_grad_(True)
    if shared:
        loss = global_contrastive_loss(a_feat, a_feat, positive, anchor_ids, candidate_ids, beta)
        (g_a,) = torch.autograd.grad(loss, [a_feat])
        grads = [(encode_anchor, anchor_inputs, g_a)]
    else:
        c_feat = _encode_all(encode_candidate, candidate_inputs, chunk).double().requires_grad_(True)
        loss = global_contrastive_loss(a_feat, c_feat, positive, anchor_ids, candidate_ids, beta)
        g_a, g_c = torch.autograd.grad(loss, [a_feat, c_feat])
        grads = [(encode_anchor, anchor_inputs, g_a), (encode_candidate, candidate_inputs, g_c)]
    for p in params:
        p.grad = None
    for encode, inputs, g in grads:
        for x, gx in zip(inputs.split(chunk), g.split(chunk)):
            out = encode(x)
            out.backward(gx.to(out.dtype))
    sq = sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None)
    return float(loss.detach()), sq
