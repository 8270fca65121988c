"""EMC²'s chain states as the batch sees them: a state is an exact augmented view (key and epoch), the loss names the
states of the next call before the forward (``state_request``), and the trainer encodes them in the batch's own
forward pass.  Against brute force where there is one; the trainer tests spy on what the model and the loss get."""
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dual_emc2.loss.estimators import EMC2
from dual_emc2.loss.estimators.base import ContrastiveBatch
from dual_emc2.loss.estimators.emc2.pool import thinned_pool_weights, view_rotations
from dual_emc2.loss.global_loss import GlobalContrastiveLoss
from dual_emc2.loss.state.keyed import ChainState
from dual_emc2.train.config import load_config
from dual_emc2.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _table(n, d=8, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


# ------------------------------------------------------------------------------------------------ the maths


def test_thinned_pool_weights_equal_the_average_of_each_pools_softmax():
    g = torch.Generator().manual_seed(0)
    B, C, V = 3, 8, 2
    logits = torch.randn(B, C, generator=g, dtype=torch.float64) * 2
    logits[0, 3] = float("-inf")  # not a negative of anchor 0
    rotation = view_rotations(torch.arange(C) // V, torch.arange(C) % V, V, torch.rand(B, C // V, generator=g))
    state = torch.tensor([0.5, float("-inf"), -1.0], dtype=torch.float64)  # anchor 1 has no state in its pools
    w, w_state = thinned_pool_weights(logits, rotation, state[:, None].repeat(1, V))
    for i in range(B):
        ref, ref_state = torch.zeros(C, dtype=torch.float64), 0.0
        for r in range(V):
            cols = [j for j in range(C) if rotation[i, j] == r and logits[i, j] > float("-inf")]
            p = torch.softmax(torch.cat([logits[i, cols], state[i:i + 1]]), 0) / V
            ref[cols] += p[:-1]
            ref_state += float(p[-1])
        assert torch.allclose(w[i], ref, atol=1e-12) and abs(float(w_state[i]) - ref_state) < 1e-12
        # every batch column is kept by exactly one pool of the anchor, each sample keeps one view per pool
        assert sorted(rotation[i].view(-1, V).sort(dim=1).values.flatten().tolist()) == sorted([0, 1] * (C // V))
    assert abs(float(w[1].sum()) - 1) < 1e-12 and float(w_state[1]) == 0


def _two_view_batch(ids, feats, epoch):
    """Unimodal batch of samples ``ids`` with views ``feats`` [2b, d] (image-major: sample k's views at 2k, 2k+1)."""
    b = ids.numel()
    anchor_ids = ids.repeat_interleave(2)
    keys = anchor_ids * 2 + torch.arange(2 * b) % 2
    positive = torch.arange(2 * b) ^ 1
    return ContrastiveBatch(feats, feats, positive, anchor_ids, anchor_ids, anchor_keys=keys, candidate_keys=keys,
                            views_per_id=2, epoch=epoch)


def test_a_state_of_another_epoch_whose_sample_is_in_the_batch_pools_only_with_that_sample():
    # one anchor (sample 1, view 0) against the views of samples 1-4 in epoch 2; its chain stands on view 0 of
    # sample 3 drawn in epoch 0.  Sample 3 is in the batch with fresh views, so only sample 3's entries (its kept
    # view and the state) can carry weight: samples 2 and 4 get no gradient, sample 3 and the state do
    cand = _table(8, seed=1).requires_grad_(True)
    anchor = _table(1, seed=8).requires_grad_(True)
    ids = torch.tensor([1, 2, 3, 4]).repeat_interleave(2)
    keys = ids * 2 + torch.arange(8) % 2
    batch = ContrastiveBatch(anchor, cand, torch.tensor([1]), ids[:1], ids, anchor_keys=keys[:1], candidate_keys=keys,
                             views_per_id=2, epoch=2)
    emc2 = EMC2(num_keys=20)
    emc2.chains.candidate_key[:] = 6
    plan = emc2.plan(batch.anchor_keys, batch.candidate_keys, views_per_id=2, epoch=2)
    assert plan.need.tolist() == [True]  # not the batch's view of sample 3: it is encoded
    assert list(plan.views) == [(3, 0, 0)]
    state = _table(1, seed=2).requires_grad_(True)
    batch.state_plan, batch.state_features = plan, state
    out = emc2(batch, 3.0)
    g_cand, g_state = torch.autograd.grad(out.loss, [cand, state])
    moved = g_cand.abs().sum(1) > 0
    assert moved.tolist() == [False, True, False, False, True, True, False, False]  # the positive, sample 3
    assert float(g_state.abs().sum()) > 0 and float(out.stats["state_weight"]) > 0


def test_a_state_that_is_a_batch_view_is_that_column_and_a_state_of_another_epoch_is_not():
    feats = _table(8, seed=3)
    batch = _two_view_batch(torch.tensor([0, 1, 2, 3]), feats, epoch=5)
    emc2 = EMC2(num_keys=8)
    emc2.chains.candidate_key[:] = 5  # sample 2, view 1
    emc2.chains.epoch[:] = torch.tensor([5, 5, 5, 5, 4, 4, 4, 4], dtype=torch.int32)
    plan = emc2.plan(batch.anchor_keys, batch.candidate_keys, views_per_id=2, epoch=5)
    assert plan.col[:4].tolist() == [5] * 4 and (plan.col[4:] == -1).all()
    assert plan.need.tolist() == [False] * 4 + [True] * 4
    assert plan.views.ids.tolist() == [2] and plan.views.views.tolist() == [1] and plan.views.epochs.tolist() == [4]


# ------------------------------------------------------------------------------------------------ the public API


def test_state_request_features_give_what_the_callback_gives_for_the_same_features():
    # fixed features per sample: the request path and the callback path compute the same losses and chains
    N, b = 24, 4
    X, Y = _table(N, seed=4), _table(N, seed=5)
    a = GlobalContrastiveLoss("emc2", num_samples=N)
    c = GlobalContrastiveLoss("emc2", num_samples=N)
    g = torch.Generator().manual_seed(0)
    for step in range(30):
        idx = torch.randperm(N, generator=g)[:b]
        need = a.state_request(idx)
        assert len(need.x) == len(need.x.ids.unique()) and (need.x.views == 0).all() and (need.x.epochs == 0).all()
        la = a(X[idx], Y[idx], idx, 4.0, state_x=X[need.x.ids], state_y=Y[need.y.ids])
        lc = c(X[idx], Y[idx], idx, 4.0, encode_x=lambda i: X[i], encode_y=lambda i: Y[i])
        assert torch.allclose(la, lc, atol=1e-6), step
    for k, v in a.state_dict().items():
        assert torch.equal(v, c.state_dict()[k]), k
    assert step and len(need) > 0


def test_state_request_names_the_out_of_batch_states_with_their_views_and_epochs():
    N = 10
    loss_fn = GlobalContrastiveLoss("emc2", num_samples=N, mode="unimodal")
    chains = loss_fn.estimator.chains
    chains.candidate_key[:] = torch.arange(20, dtype=torch.int32).flip(0)  # anchor key k stands on key 19 − k
    chains.epoch[:] = torch.arange(20, dtype=torch.int32) % 3
    idx = torch.tensor([0, 1])
    need = loss_fn.state_request(idx, epoch=7)
    assert len(need.x) == 0
    got = sorted(zip(need.y.ids.tolist(), need.y.views.tolist(), need.y.epochs.tolist()))
    assert got == sorted(((19 - k) // 2, (19 - k) % 2, k % 3) for k in range(4))
    assert list(need.y) == list(zip(need.y.ids.tolist(), need.y.views.tolist(), need.y.epochs.tolist()))


@pytest.mark.parametrize("call, match", [
    (lambda f, x, y, i, n: f(x, y, i, 5.0, epoch=1, state_y=y[:len(n.y)]), "state_request"),  # another epoch
    (lambda f, x, y, i, n: f(x, y, i.flip(0), 5.0, state_y=y[:len(n.y)]), "state_request"),  # another batch
    (lambda f, x, y, i, n: f(x, y, i, 5.0, state_y=y[:1]), r"state_y must be \[4, 8\]"),
    (lambda f, x, y, i, n: f(x, y, i, 5.0, state_y=2 * y[:4]), "state_y rows must be unit vectors"),
    (lambda f, x, y, i, n: f(x, y, i, 5.0), "needs the features of 4 chain-state views"),
    (lambda f, x, y, i, n: f(x, y, i, 5.0, state_x=x[:4]), "pass them as state_y"),
])
def test_missing_or_mismatched_state_features_name_the_fix(call, match):
    N = 12
    loss_fn = GlobalContrastiveLoss("emc2", num_samples=N, mode="unimodal")
    loss_fn.estimator.chains.candidate_key[:] = 20  # every anchor stands on view 0 of sample 10
    x, y = _table(4, seed=6), _table(4, seed=7)
    idx = torch.arange(4)
    need = loss_fn.state_request(idx)
    assert len(need.y) == 1
    loss_fn.estimator.chains.candidate_key[:] = torch.arange(24, dtype=torch.int32) % 4 + 16  # 4 distinct states
    need = loss_fn.state_request(idx)
    assert len(need.y) == 4
    with pytest.raises(ValueError, match=match):
        call(loss_fn, x, y, idx, need)


def test_chains_saved_without_view_epochs_load_with_epoch_zero_and_a_warning():
    chains = ChainState(6)
    with pytest.warns(UserWarning, match="saved without epoch"):
        chains.load_state_dict({"candidate_key": torch.arange(6, dtype=torch.int32),
                                "score": torch.zeros(6)})
    assert chains.candidate_key.tolist() == list(range(6)) and chains.epoch.tolist() == [0] * 6
    state = ChainState(6).state_dict()
    assert set(state) == {"candidate_key", "score", "epoch"}
    assert sum(t.element_size() for t in state.values()) == 12  # bytes per anchor
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ChainState(6).load_state_dict(state)


# ------------------------------------------------------------------------------------------------ the trainer

TINY = ["data.name=digits", "data.image_size=8", "data.subset=48", "data.num_workers=0", "model.proj_hidden=32",
        "model.proj_dim=16", "train.batch_size=8", "train.epochs=3", "train.log_every=2", "eval.enabled=false",
        "train.plots=false", "train.ckpt_every=100"]


class _Spy:
    """Records every forward of the model (rows, train mode, inputs) and every state request and loss call."""

    def __init__(self, trainer: Trainer, alone: bool = False) -> None:
        self.forwards, self.requests, self.batches, self.state_features = [], [], [], []
        self.alone, self._inside = alone, False
        task = trainer.task
        forward_views = task.loss_fn.forward_views

        def spy_forward_views(*args, **kwargs):
            feats = kwargs.get("state_features")
            self.state_features.append(None if feats is None else feats.detach().clone())
            return forward_views(*args, **kwargs)

        task.loss_fn.forward_views = spy_forward_views
        trainer.core.encoder.register_forward_hook(self._forward)  # the batch's forward and any by-id re-encode
        request = task.loss_fn.state_request

        def spy_request(index, *, epoch=0):
            need = request(index, epoch=epoch)
            self.requests.append((index.clone(), epoch, need))
            return need

        task.loss_fn.state_request = spy_request
        loss = task.loss

        def spy_loss(model, item):
            self.batches.append((item[0].clone(), task.epoch, item[1].clone()))
            return loss(model, item)

        task.loss = spy_loss

    def _forward(self, module, inputs, output):
        if self._inside:
            return
        x = inputs[0].detach().clone()
        self._inside = True
        try:
            with torch.no_grad():  # every row alone, with the parameters of this step (before the optimiser moves)
                alone = torch.cat([module(x[k:k + 1]) for k in range(x.shape[0])]) if self.alone else None
        finally:
            self._inside = False
        self.forwards.append((x.shape[0], module.training, x, output.detach(), alone))


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_unimodal_states_are_the_views_the_chains_accepted_encoded_in_the_batchs_forward(tmp_path, norm):
    # group: per-sample normalisation in the backbone and no batch norm in the head, so a view's features do not
    # depend on the batch it is encoded with
    per_sample = [] if norm == "batch" else ["model.norm=group", "model.head_batch_norm=false"]
    cfg = load_config(ROOT / "configs/fmnist_unimodal.yaml", TINY + [f"output_dir={tmp_path}", *per_sample])
    trainer = Trainer(cfg)
    spy = _Spy(trainer, alone=norm == "group")
    trainer.fit()
    steps = len(spy.batches)
    assert steps == 18 and len(spy.forwards) == steps and len(spy.requests) == steps
    seen = {}  # (sample, view, epoch) → the image the batch encoded
    used = 0
    for (ids, epoch, views), (rows, training, x, z, alone), (_, req_epoch, need), given in zip(
            spy.batches, spy.forwards, spy.requests, spy.state_features):
        b, V = views.shape[:2]
        assert training and req_epoch == epoch
        assert rows == b * V + len(need.y)  # one forward: the batch's views, then the requested states
        assert torch.equal(x[:b * V], views.flatten(0, 1))
        assert torch.equal(given, z[b * V:])  # what the loss gets for the states
        for k, (i, v, e) in enumerate(need.y):
            assert e < epoch, "a state from this epoch would be a batch view"
            assert torch.equal(x[b * V + k], seen[(i, v, e)]), (i, v, e)  # the exact view, bit for bit
            if norm == "group":  # per-sample normalisation: the view's features, as a batch candidate would get
                assert torch.allclose(z[b * V + k], alone[b * V + k], atol=1e-5)
            used += 1
        for k, i in enumerate(ids.tolist()):
            for v in range(V):
                seen[(i, v, epoch)] = views[k, v]
    assert used > 0 and trainer.task.state_misses == 0
    # what the chains hold after training is what a resumed run regenerates: keys and view epochs of past batches
    chains = trainer.estimator.chains
    held = chains.candidate_key >= 0
    for key, ep in zip(chains.candidate_key[held].tolist(), chains.epoch[held].tolist()):
        assert (key // 2, key % 2, ep) in seen


def test_unaugmented_state_views_option_reencodes_by_id_in_eval_mode(tmp_path):
    cfg = load_config(ROOT / "configs/fmnist_unimodal.yaml",
                      TINY + [f"output_dir={tmp_path}", "loss.state_views=unaugmented"])
    trainer = Trainer(cfg)
    spy = _Spy(trainer)
    trainer.fit()
    assert not trainer.task.exact_states and not spy.requests
    evals = [f for f in spy.forwards if not f[1]]  # the by-id re-encodes, in eval mode
    assert all(f is None for f in spy.state_features)
    assert evals and len(spy.forwards) == len(spy.batches) + len(evals)
