"""The public loss: the global contrastive loss (Yau et al., eq. 1) optimised by any of the project's estimators, as a
drop-in ``nn.Module`` for a user's own training loop (open_clip, sentence-transformers, plain torch).

Bimodal (CLIP-style, two towers): D_neg(x_i) = {y_j : j ≠ i}, and the target is L = ½ (L_xy + L_yx) with

    L_xy = mean_i [ −β s(x_i, y_i) + log Σ_{j ≠ i} exp(β s(x_i, y_j)) ],

each direction with its own estimator state.  Unimodal (SimCLR-style, one tower): ``x_features`` and
``y_features`` are two views of the same b images, row i of each belonging to image ``index[i]``; all 2b views are
anchors against all 2b views, the positive of a view is the other view of its image (``infonce`` is NT-Xent).

EMC² keeps one Markov-chain state per anchor: a sample elsewhere in the training set.  Its features must come from
the same function as the batch's — the same transform, the same train mode, the same normalisation statistics —
so ask the loss which states it needs *before* the forward pass and encode them with the batch::

    loss_fn = GlobalContrastiveLoss("emc2", num_samples=len(dataset))
    for index, images, texts in loader:                     # index: the dataset position of each pair
        need = loss_fn.state_request(index, epoch=epoch)    # need.x: images to encode, need.y: texts
        x = model.encode_image(torch.cat([images, train_images(need.x)]), normalize=True)
        y = model.encode_text(torch.cat([texts, tokens(need.y)]), normalize=True)
        b = index.numel()
        loss = loss_fn(x[:b], y[:b], index, model.logit_scale.exp(), epoch=epoch, state_x=x[b:], state_y=y[b:])
        loss.backward()

``need.x`` / ``need.y`` are :class:`~dual_emc2.loss.state_views.StateViews`: (dataset index, view, epoch) of
each state, to be produced by the transform the batch uses (seeded by the epoch when it is random, so the view is
the one the chain accepted; ``epoch`` may stay 0 where inputs do not change between epochs, e.g. text).  Loops that
cannot encode the states with the batch pass ``encode_x`` / ``encode_y`` instead (ids → features, re-encoded by
sample id; the states are then not the batch's views).  Without either use
``GlobalContrastiveLoss("emc2", N, state_score="stale", out_of_batch="drop")`` (no state features, biased at small
batch).  Under ``torch.distributed`` the features are gathered with gradient over processes; pass each process's
own rows, ids and states.  The estimator state (chains, SogCLR's u, the negative cache) is in ``state_dict()``; with
``state_sharding="sharded"`` each process holds (and saves) the rows of the keys it owns, and
:func:`dual_emc2.loss.state.keyed.load_state_shards` loads the shards of any number of processes.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dual_emc2.loss.batches import bimodal_contrastive_batches, unimodal_contrastive_batch, unimodal_layout
from dual_emc2.loss.distributed import all_gather_rows, rank, world_size
from dual_emc2.loss.estimators.base import ContrastiveBatch, Estimator
from dual_emc2.loss.estimators.symmetric import SymmetricEstimator
from dual_emc2.loss.exact import global_contrastive_loss
from dual_emc2.loss.registry import REGISTRY, build_estimator
from dual_emc2.loss.state_views import StateRequest, StateViews

Mode = Literal["bimodal", "unimodal"]
MODES = ("bimodal", "unimodal")
EncodeFn = Callable[[Tensor], Tensor]


def _unit_rows(name: str, t: Tensor, tol: float) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [b, d], got {type(t).__name__}")
    if t.dim() != 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must have shape [b, d] with b >= 1, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")
    norms = t.detach().float().norm(dim=1)
    if not bool(torch.isfinite(norms).all()):
        raise ValueError(f"{name} has non-finite values (rows {torch.nonzero(~torch.isfinite(norms))[:5, 0].tolist()})")
    lo, hi = float(norms.min()), float(norms.max())
    if lo < 1 - tol or hi > 1 + tol:
        raise ValueError(f"{name} rows must be unit vectors (L2 norm 1), got norms in [{lo:.4g}, {hi:.4g}]; pass "
                         "F.normalize(features, dim=-1) (open_clip: encode_image(..., normalize=True))")


class GlobalContrastiveLoss(nn.Module):
    """Global contrastive loss with a chosen estimator.

    Args:
        estimator: ``emc2`` (default options: unbiased Rao–Blackwell weights over batch ∪ chain state), ``infonce``
            (= ``clip``, ``simclr``), ``sogclr``, ``negative_cache``, ``hcl``, ``scl``, ``hscl``, ``hucl``.
        num_samples: size of the training set; ``index`` values lie in [0, num_samples).
        mode: ``"bimodal"`` (x, y from two towers; both directions) or ``"unimodal"`` (x, y two views).
        symmetric: bimodal only; ``False`` keeps the x→y direction alone (target L_xy; ``infonce`` is then
            sentence-transformers' MultipleNegativesRankingLoss, ``True`` its symmetric variant and open_clip's loss).
        check_inputs: validate shapes, unit norms and ids every call (one host sync); off for speed once it runs.
        state_sharding: ``"auto"`` (default), ``"replicated"`` or ``"sharded"``: whether every process holds the
            whole per-anchor state or a 1/W slice of it (:mod:`dual_emc2.loss.state.layout`; same results either way).
            Build
            the loss after ``torch.distributed`` is initialised.
        **options: the estimator's options, as ``loss.options.<estimator>`` in configs (e.g. ``burn_in=31``,
            ``reencode_fraction=0.5``, ``gamma=0.9``, ``seed=0``).

    Before the call (EMC²): ``need = loss_fn.state_request(index, epoch=e)`` → :class:`StateRequest`: the chain-state
    views the call needs, ``need.x`` for the x tower and ``need.y`` for the y tower (unimodal: all in ``need.y``).

    Call: ``loss_fn(x_features, y_features, index, logit_scale, *, epoch=0, state_x=None, state_y=None)`` → scalar.
        x_features, y_features: [b, d] unit rows.  index: [b] int global ids in [0, num_samples), distinct.
        logit_scale: β, a float or a 0-dim tensor (open_clip's ``logit_scale.exp()``; may require grad).
        epoch: the epoch whose augmentation drew this batch's views (0 when inputs do not change between epochs).
        state_x, state_y: [len(need.x), d] and [len(need.y), d] unit features of the requested states, encoded in
        the batch's forward pass (same transform and mode as the batch).
        encode_x, encode_y: instead of state features, ids → [n, d] unit features of those samples (estimators
        that re-encode by id; the negative cache needs them).
        labels: [b] class labels for the supervised estimators (unimodal).  x_groups, y_groups: [b] ids of groups of
        identical x / y (bimodal): candidates in the anchor's group are masked as known false negatives.
    ``last_stats``: detached diagnostics of the last call (estimator stats and ``batch_objective``, eq. 1 with D_neg
    the batch).

    Example::

        loss_fn = GlobalContrastiveLoss("emc2", num_samples=1000, mode="unimodal")
        need = loss_fn.state_request(index, epoch=epoch)          # need.y: (id, view, epoch) of each state
        z = F.normalize(model(torch.cat([views1, views2, augment(need.y)])), dim=-1)   # one forward, train mode
        b = index.numel()
        loss = loss_fn(z[:b], z[b:2 * b], index, 5.0, epoch=epoch, state_y=z[2 * b:])
    """

    def __init__(self, estimator: str = "emc2", num_samples: int = 0, mode: Mode = "bimodal", *,
                 symmetric: bool = True, check_inputs: bool = True, state_sharding: str = "auto",
                 **options: Any) -> None:
        super().__init__()
        if mode not in MODES:
            hint = difflib.get_close_matches(str(mode), MODES, n=1)
            raise ValueError(f"mode must be 'bimodal' or 'unimodal', got {mode!r}"
                             + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be the training set size (an int >= 1), got {num_samples!r}")
        keys = num_samples * (2 if mode == "unimodal" else 1)
        built = build_estimator(estimator, num_keys=keys, num_candidates=num_samples, options=options,
                                    symmetric=mode == "bimodal" and symmetric, state_sharding=state_sharding)
        self._setup(built, mode, num_samples, check_inputs, views_per_sample=2)
        self.estimator_name = estimator

    def _setup(self, estimator: Estimator, mode: str, num_samples: int, check_inputs: bool,
               views_per_sample: int) -> None:
        self.estimator = estimator
        self.mode = mode
        self.views_per_sample = views_per_sample
        self.num_samples = num_samples
        self.check_inputs = check_inputs
        self.last_stats: dict[str, Tensor] = {}
        self._shape_checked: int | None = None
        self._request: tuple[Tensor, int, tuple[Any, ...]] | None = None  # (index, epoch, plans) of state_request

    @classmethod
    def wrap(cls, estimator: Estimator, mode: Mode, num_samples: int, *, views_per_sample: int = 2,
             check_inputs: bool = False) -> GlobalContrastiveLoss:
        """A loss around an estimator built elsewhere (the trainer builds it from a config, with
        ``num_samples × views_per_sample`` anchor keys in the unimodal mode)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(estimator, mode, num_samples, check_inputs, views_per_sample)
        self.estimator_name = estimator.name
        return self

    @property
    def direction(self) -> Estimator:
        """The estimator of one direction (x→y bimodal; the only one unimodal)."""
        return self.estimator.x_to_y if isinstance(self.estimator, SymmetricEstimator) else self.estimator

    def _check_call(self, x: Tensor, y: Tensor, index: Tensor, logit_scale: Tensor | float) -> None:
        tol = 2e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-3
        _unit_rows("x_features", x, tol)
        _unit_rows("y_features", y, tol)
        if x.shape != y.shape:
            raise ValueError(f"x_features {tuple(x.shape)} and y_features {tuple(y.shape)} must have the same shape "
                             "(one row per pair or image)")
        if not isinstance(index, Tensor) or index.shape != (x.shape[0],) or index.is_floating_point():
            raise ValueError(f"index must be an integer tensor of shape ({x.shape[0]},) holding each row's dataset "
                             f"index, got {getattr(index, 'dtype', type(index).__name__)} "
                             f"{tuple(getattr(index, 'shape', ()))}")
        every = all_gather_rows(index.to(x.device))
        lo, hi = int(every.min()), int(every.max())
        if lo < 0 or hi >= self.num_samples:
            raise ValueError(f"index values must lie in [0, num_samples={self.num_samples}), got [{lo}, {hi}]: pass "
                             "the dataset position of each sample, and num_samples = len(dataset)")
        if torch.unique(every).numel() != every.numel():
            raise ValueError("index has repeated ids in one (global) batch: each sample may appear once per step")
        beta = float(logit_scale.detach()) if isinstance(logit_scale, Tensor) else float(logit_scale)
        if not beta > 0 or beta == float("inf"):
            raise ValueError(f"logit_scale (β) must be a finite positive number, got {beta}")

    def _check_shape(self, negatives_per_anchor: int) -> None:
        if self._shape_checked != negatives_per_anchor:
            for est in ((self.estimator.x_to_y, self.estimator.y_to_x)
                        if isinstance(self.estimator, SymmetricEstimator) else (self.estimator,)):
                est.check_batch_shape(negatives_per_anchor)
            self._shape_checked = negatives_per_anchor

    def _directions(self) -> tuple[Estimator, ...]:
        o = self.estimator
        return (o.x_to_y, o.y_to_x) if isinstance(o, SymmetricEstimator) else (o,)

    def _check_encoders(self, encode_x: EncodeFn | None, encode_y: EncodeFn | None) -> None:
        if not self.estimator.needs_candidate_encoder:
            return
        needed = ("encode_x", "encode_y") if isinstance(self.estimator, SymmetricEstimator) else ("encode_y",)
        missing = [n for n, f in (("encode_x", encode_x), ("encode_y", encode_y)) if f is None and n in needed]
        if self.mode == "unimodal":
            missing = [] if (encode_x or encode_y) else ["encode_x"]
        if missing:
            raise ValueError(f"estimator {self.estimator_name!r} re-encodes samples by id: pass "
                             f"{' and '.join(missing)} "
                             "(ids → unit features)")

    # ------------------------------------------------------------------------------------------------ states
    @torch.no_grad()
    def state_request(self, index: Tensor, *, epoch: int = 0) -> StateRequest:
        """The chain-state views the next call on the batch ``index`` needs (empty for estimators without states).

        Encode ``need.x`` with the x tower and ``need.y`` with the y tower (unimodal: the one encoder, ``need.y``)
        in the same forward pass as the batch — each entry is (dataset index, view, epoch): the sample, which of its
        V views, and the epoch whose augmentation drew it — then call the loss with the same ``index`` and ``epoch``
        and ``state_x`` / ``state_y`` holding their features in this order.  Under ``torch.distributed`` every
        process calls it (it reads the chains, a collective when they are sharded)."""
        if not isinstance(index, Tensor) or index.dim() != 1 or index.is_floating_point():
            raise ValueError(f"index must be a 1-d integer tensor of dataset indices, got "
                             f"{getattr(index, 'dtype', type(index).__name__)} {tuple(getattr(index, 'shape', ()))}")
        device = self._device()
        index = index.to(device, torch.int64)
        plans = self._plans(index, int(epoch))
        self._request = (index.clone(), int(epoch), plans)
        empty = StateViews.empty(device)
        views = [p.views if p is not None else empty for p in plans]
        if self.mode == "unimodal":
            return StateRequest(x=empty, y=views[0])
        if len(plans) == 1:
            return StateRequest(x=empty, y=views[0])
        return StateRequest(x=views[1], y=views[0])  # x→y chains stand on y samples, y→x chains on x samples

    def _device(self) -> torch.device:
        for t in self.estimator.buffers():
            return t.device
        return torch.device("cpu")

    def _plans(self, index: Tensor, epoch: int) -> tuple[Any, ...]:
        """Each direction's plan of its states for the batch ``index`` (None for estimators without states)."""
        if not self.estimator.needs_state_features:
            return tuple(None for _ in self._directions())
        if self.mode == "unimodal":
            V = self.views_per_sample
            anchor_keys, _, candidate_keys, offset, total = unimodal_layout(index, V)
            return (self.estimator.plan(anchor_keys, candidate_keys, views_per_id=V, epoch=epoch, row_offset=offset,
                                        total_rows=total),)
        candidate_keys = all_gather_rows(index)
        offset = rank() * index.numel()
        return tuple(d.plan(index, candidate_keys, epoch=epoch, row_offset=offset, total_rows=candidate_keys.numel())
                     for d in self._directions())

    def _take_plans(self, index: Tensor, epoch: int, given: bool) -> tuple[Any, ...] | None:
        """The plans of the last :meth:`state_request` when it was for this batch (then forgotten); None otherwise.
        State features given without a matching request are an error."""
        request, self._request = self._request, None
        if request is not None and request[1] == epoch and request[0].shape == index.shape \
                and torch.equal(request[0], index.to(request[0].device, torch.int64)):
            return request[2]
        if given:
            raise ValueError("state_x / state_y hold the states of a state_request; call "
                             "loss_fn.state_request(index, epoch=...) for this batch (same index and epoch) right "
                             "before the forward, and encode what it returns")
        return None

    def _check_states(self, plans: tuple[Any, ...], state_x: Tensor | None, state_y: Tensor | None,
                      encode_x: EncodeFn | None, encode_y: EncodeFn | None, d: int) -> None:
        """Every planned state has features (given, or an encoder to compute them), unit rows of the right shape."""
        sides = ("y",) if self.mode == "unimodal" or len(plans) == 1 else ("y", "x")
        for plan, side in zip(plans, sides):
            n = 0 if plan is None else len(plan.views)
            feats = state_y if side == "y" else state_x
            encoder = (encode_x or encode_y) if self.mode == "unimodal" else (encode_y if side == "y" else encode_x)
            if feats is None:
                if n and encoder is None:
                    raise ValueError(
                        f"estimator {self.estimator_name!r} needs the features of {n} chain-state views this step: "
                        "call "
                        f"need = loss_fn.state_request(index, epoch=...) before the forward, encode need.{side} with "
                        f"the batch and pass state_{side}=...; or pass encode_x/encode_y (re-encoding by id); or "
                        "build it with state_score='stale', out_of_batch='drop' (biased at small batch)")
                continue
            if not isinstance(feats, Tensor) or feats.dim() != 2 or feats.shape != (n, d):
                raise ValueError(f"state_{side} must be [{n}, {d}]: one feature row per entry of need.{side}, in its "
                                 f"order; got {tuple(getattr(feats, 'shape', ()))}")
            if self.check_inputs and n:
                tol = 2e-2 if feats.dtype in (torch.float16, torch.bfloat16) else 1e-3
                _unit_rows(f"state_{side}", feats, tol)

    def forward(self, x_features: Tensor, y_features: Tensor, index: Tensor, logit_scale: Tensor | float,
                encode_x: EncodeFn | None = None, encode_y: EncodeFn | None = None, *, labels: Tensor | None = None,
                x_groups: Tensor | None = None, y_groups: Tensor | None = None, epoch: int = 0,
                state_x: Tensor | None = None, state_y: Tensor | None = None) -> Tensor:
        if self.check_inputs:
            self._check_call(x_features, y_features, index, logit_scale)
        self._check_encoders(encode_x, encode_y)
        index = index.to(x_features.device, torch.int64)
        if self.mode == "unimodal":
            if state_x is not None:
                raise ValueError("unimodal: the states are views of the one encoder; pass them as state_y (need.y)")
            views = torch.stack([x_features, y_features], dim=1)  # [b, 2, d]: image-major, view 0 then view 1
            return self.forward_views(views, index, logit_scale, encode_x or encode_y, labels=labels, epoch=epoch,
                                      state_features=state_y)
        b_global = x_features.shape[0] * world_size()
        self._check_shape(b_global - 1)
        plans = self._take_plans(index, int(epoch), state_x is not None or state_y is not None)
        if plans is None:
            plans = self._plans(index, int(epoch))
        self._check_states(plans, state_x, state_y, encode_x, encode_y, x_features.shape[1])
        both = isinstance(self.estimator, SymmetricEstimator)
        xy, yx = bimodal_contrastive_batches(x_features, y_features, index, x_groups=x_groups, y_groups=y_groups,
                                             encode_x=encode_x, encode_y=encode_y, epoch=int(epoch),
                                             plans=(plans[0], plans[1] if both else None), state_x=state_x,
                                             state_y=state_y)
        out = self.estimator(xy, logit_scale, reverse=yx) if both else self.estimator(xy, logit_scale)
        with torch.no_grad():
            beta = float(logit_scale.detach()) if isinstance(logit_scale, Tensor) else float(logit_scale)
            directions = (xy, yx) if both else (xy,)
            batch_objective = sum(_batch_objective(bt, beta) for bt in directions) / len(directions)
        self.last_stats = dict(out.stats) | {"loss": out.loss.detach(), "batch_objective": batch_objective}
        return out.loss

    def forward_views(self, views: Tensor, index: Tensor, logit_scale: Tensor | float,
                      encode: EncodeFn | None = None, *, labels: Tensor | None = None, epoch: int = 0,
                      state_features: Tensor | None = None) -> Tensor:
        """Unimodal loss of ``views`` [b, V, d] (V ≥ 2 unit views of each of b images): every view is an anchor, its
        positive the next view of its image (v → v + 1 mod V), the other images' views its negatives.
        ``state_features``: the features of ``state_request(index, epoch=epoch).y``, encoded with the views."""
        if self.mode != "unimodal":
            raise ValueError("forward_views is the unimodal loss; this loss was built with mode='bimodal'")
        b, V, d = views.shape
        if V != self.views_per_sample:
            raise ValueError(f"this loss keeps state for {self.views_per_sample} views per image, got {V}")
        self._check_shape(b * world_size() * V - V)
        index = index.to(views.device, torch.int64)
        plans = self._take_plans(index, int(epoch), state_features is not None)
        if plans is None:
            plans = self._plans(index, int(epoch))
        self._check_states(plans, None, state_features, encode, None, d)
        batch = unimodal_contrastive_batch(views.reshape(b * V, d), index, V, encode_candidates=encode,
                                           labels=labels, epoch=int(epoch), state_plan=plans[0],
                                           state_features=state_features)
        out = self.estimator(batch, logit_scale)
        with torch.no_grad():
            beta = float(logit_scale.detach()) if isinstance(logit_scale, Tensor) else float(logit_scale)
            self.last_stats = dict(out.stats) | {"loss": out.loss.detach(),
                                                 "batch_objective": _batch_objective(batch, beta)}
        return out.loss


def _batch_objective(batch: ContrastiveBatch, beta: float) -> Tensor:
    """Eq. (1) with D_neg the batch: comparable across estimators, unlike their surrogates."""
    return global_contrastive_loss(batch.anchors.detach(), batch.candidates.detach(), batch.positive,
                                   batch.anchor_ids, batch.candidate_ids, beta)


__all__ = ["GlobalContrastiveLoss", "MODES", "REGISTRY", "StateRequest", "StateViews"]
