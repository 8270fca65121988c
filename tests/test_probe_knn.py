"""Frozen-feature evaluation: feature extraction, linear probe (vs. scikit-learn) and k-NN (vs. brute force)."""
from __future__ import annotations

import faiss
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dual_emc2.metrics.knn import knn_accuracy, knn_predict
from dual_emc2.metrics.probe import extract_features, linear_probe, tune_weight_decay

torch.set_num_threads(1)
faiss.omp_set_num_threads(1)


def _blobs(n_per_class: int, n_classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, dim, generator=g) * spread
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = centers[y] + torch.randn(len(y), dim, generator=g)
    perm = torch.randperm(len(y), generator=g)
    return x[perm] * 3.0 + 5.0, y[perm]  # off-centre, scaled: standardisation must undo it


# ---------------------------------------------------------------- k-NN


def _brute_knn(train_x, train_y, test_x, k, temperature, n_classes):
    sim = F.normalize(test_x.double(), dim=1) @ F.normalize(train_x.double(), dim=1).T
    if k == 1:
        return train_y[sim.argmax(dim=1)]
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(test_x.shape[0], n_classes, dtype=torch.float64)
    votes.scatter_add_(1, train_y[idx], torch.exp(top / temperature))
    return votes.argmax(dim=1)


@pytest.mark.determinism
def test_knn_matches_brute_force():
    n_classes = 7
    x, y = _blobs(120, n_classes, 8, spread=0.8, seed=1)
    x = (x - 5.0) / 3.0  # centred blobs: their directions carry the class
    # un-normalised, different norms per row: cosine similarity must ignore them
    x = x * torch.rand(len(x), 1, generator=torch.Generator().manual_seed(2)).add(0.1) * 10
    train_x, train_y, test_x, test_y = x[:600], y[:600], x[600:], y[600:]
    ks, temperature = (1, 5, 20), 0.1
    preds = knn_predict(train_x, train_y, test_x, ks=ks, temperature=temperature, batch_size=64)
    accs = knn_accuracy(train_x, train_y, test_x, test_y, ks=ks, temperature=temperature, batch_size=64)
    assert set(accs) == {"knn1_acc", "knn5_acc", "knn20_acc"}
    for k in ks:
        expected = _brute_knn(train_x, train_y, test_x, k, temperature, n_classes)
        # exact: FAISS float32 against float64; the data's smallest score gap at a top-k boundary is 7.6e-6 (same
        # label on both sides), far above float32 rounding, so no kernel can reorder what decides a prediction
        assert torch.equal(preds[k], expected), k
        assert accs[f"knn{k}_acc"] == pytest.approx(float((expected == test_y).double().mean()))
    assert 0.25 < accs["knn20_acc"] < 0.9


def test_knn_weighted_vote_beats_majority_on_hand_case():
    # query (1, 0); train: one class-0 point at angle 0 (sim 1), two class-1 points at sim 0.5.
    # Majority of the 3 neighbours says 1; with T = 0.1 the weights are e^10 vs 2 e^5, so the vote says 0.
    s = 0.5
    train_x = torch.tensor([[1.0, 0.0], [s, (1 - s * s) ** 0.5], [s, -(1 - s * s) ** 0.5], [-1.0, 0.0]])
    train_y = torch.tensor([0, 1, 1, 2])
    test_x, test_y = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    assert knn_accuracy(train_x, train_y, test_x, test_y, ks=(3,), temperature=0.1)["knn3_acc"] == 1.0
    # with a hot temperature the weights equalise and the majority (class 1) wins
    assert knn_accuracy(train_x, train_y, test_x, test_y, ks=(3,), temperature=100.0)["knn3_acc"] == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(ks=(0,)), "positive integers"),
    (dict(ks=(31,)), "exceeds the number of training samples"),
    (dict(ks=()), "at least one"),
    (dict(temperature=0.0), "temperature"),
    (dict(batch_size=0), "batch_size"),
])
def test_knn_bad_arguments(kwargs, match):
    x, y = torch.randn(30, 4), torch.arange(30) % 3
    with pytest.raises(ValueError, match=match):
        knn_accuracy(x, y, x, y, **kwargs)


def test_knn_bad_shapes():
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match="dimension"):
        knn_accuracy(x, y, torch.randn(5, 3), y[:5])
    with pytest.raises(ValueError, match="test_y"):
        knn_accuracy(x, y, x, y[:5])
    with pytest.raises(TypeError, match="train_y"):
        knn_accuracy(x, y.float(), x, y)


# ---------------------------------------------------------------- feature extraction


class _Indexed(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return i, self.x[i], self.y[i]


def test_extract_features_order_eval_mode_and_normalisation():
    torch.manual_seed(0)
    x, y = torch.randn(37, 6), torch.randint(0, 4, (37,))
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Dropout(0.5))
    model(torch.randn(64, 6))  # move the running statistics away from their init
    model.train()
    loader = DataLoader(_Indexed(x, y), batch_size=8, shuffle=False)
    feats, labels = extract_features(model, loader, "cpu")
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        expected = model(x)
    assert feats.dtype == torch.float32 and labels.dtype == torch.int64
    assert feats.shape == (37, 5) and not feats.requires_grad
    torch.testing.assert_close(feats, expected)  # eval mode: running BN stats, no dropout
    assert torch.equal(labels, y)
    normed, _ = extract_features(model, loader, "cpu", normalize=True)
    torch.testing.assert_close(normed, F.normalize(expected, dim=1))


def test_extract_features_bad_input():
    with pytest.raises(ValueError, match="index, images, labels"):
        extract_features(lambda t: t, [(torch.zeros(2, 3), torch.zeros(2))], "cpu")
    with pytest.raises(ValueError, match=r"\[2, d\] feature matrix"):
        extract_features(lambda t: t.sum(1), [(torch.arange(2), torch.zeros(2, 3), torch.zeros(2))], "cpu")
    with pytest.raises(ValueError, match="no batches"):
        extract_features(lambda t: t, [], "cpu")


# ---------------------------------------------------------------- linear probe


@pytest.mark.parametrize("solver", ["lbfgs", "adam"])
def test_linear_probe_separable_blobs(solver):
    x, y = _blobs(120, 5, 10, spread=3.0, seed=0)
    r = linear_probe(x[:400], y[:400], x[400:], y[400:], solver=solver, epochs=30, batch_size=128)
    assert r["linear_probe_acc"] > 0.95 and r["linear_probe_train_acc"] > 0.95


def test_linear_probe_matches_sklearn_on_overlapping_blobs():
    x, y = _blobs(300, 6, 20, spread=0.45, seed=3)
    xtr, ytr, xte, yte = x[:1200], y[:1200], x[1200:], y[1200:]
    wd = 1e-3
    ours = linear_probe(xtr, ytr, xte, yte, weight_decay=wd, solver="lbfgs")
    adam = linear_probe(xtr, ytr, xte, yte, weight_decay=wd, solver="adam", epochs=60, batch_size=256)
    scaler = StandardScaler().fit(xtr.numpy())
    # scikit-learn minimises C Σ CE + ½‖W‖²: the same minimiser as mean CE + (λ/2)‖W‖² with C = 1 / (λ N)
    clf = LogisticRegression(C=1.0 / (wd * len(ytr)), max_iter=2000, tol=1e-8)
    clf.fit(scaler.transform(xtr.numpy()), ytr.numpy())
    sk_test = clf.score(scaler.transform(xte.numpy()), yte.numpy())
    sk_train = clf.score(scaler.transform(xtr.numpy()), ytr.numpy())
    assert 0.5 < sk_test < 0.9  # the set really overlaps
    assert abs(ours["linear_probe_acc"] - sk_test) <= 0.02
    assert abs(ours["linear_probe_train_acc"] - sk_train) <= 0.02
    assert abs(adam["linear_probe_acc"] - sk_test) <= 0.02
    # the Adam solver reaches (nearly) the same objective value as the exact L-BFGS solution
    assert adam["linear_probe_train_loss"] == pytest.approx(ours["linear_probe_train_loss"], rel=0.02)
    assert adam["linear_probe_train_loss"] >= ours["linear_probe_train_loss"] - 1e-4


def test_linear_probe_is_deterministic_given_seed():
    x, y = _blobs(60, 4, 8, spread=0.6, seed=5)
    kw = dict(solver="adam", epochs=5, batch_size=32)
    a = linear_probe(x[:180], y[:180], x[180:], y[180:], seed=7, **kw)
    b = linear_probe(x[:180], y[:180], x[180:], y[180:], seed=7, **kw)
    c = linear_probe(x[:180], y[:180], x[180:], y[180:], seed=8, **kw)
    assert a == b
    assert a["linear_probe_train_loss"] != c["linear_probe_train_loss"]  # the seed drives the batch order


@pytest.mark.parametrize("kwargs, match", [
    (dict(solver="newton"), "solver"),
    (dict(epochs=0), "epochs"),
    (dict(lr=-1.0), "lr"),
    (dict(weight_decay=float("nan")), "weight_decay"),
    (dict(batch_size=0), "batch_size"),
])
def test_linear_probe_bad_arguments(kwargs, match):
    x, y = torch.randn(20, 3), torch.arange(20) % 2
    with pytest.raises(ValueError, match=match):
        linear_probe(x, y, x, y, **kwargs)


def test_linear_probe_bad_data():
    x, y = torch.randn(20, 3), torch.arange(20) % 2
    with pytest.raises(ValueError, match="test_x has dimension 4"):
        linear_probe(x, y, torch.randn(5, 4), y[:5])
    with pytest.raises(ValueError, match="train_y"):
        linear_probe(x, y[:10], x, y)
    with pytest.raises(ValueError, match="non-negative"):
        linear_probe(x, y - 1, x, y)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        linear_probe(bad, y, x, y)


def test_tune_weight_decay_prefers_moderate_regularisation_in_high_dimension():
    # 600-d features, 640 fitting samples, signal in 20 dims: an almost unregularised probe overfits the noise
    # dimensions and a huge penalty flattens the classifier; the held-out split must pick the middle value.
    g = torch.Generator().manual_seed(0)
    y = torch.arange(800) % 2
    x = torch.randn(800, 600, generator=g)
    x[:, :20] += (2 * y[:, None] - 1) * 0.25
    best, scores = tune_weight_decay(x, y, (1e-5, 0.3, 100.0), val_fraction=0.2, seed=0)
    assert list(scores) == [1e-5, 0.3, 100.0]
    assert best == 0.3
    assert scores[0.3] > scores[1e-5] + 0.03 and scores[0.3] > scores[100.0] + 0.2
    with pytest.raises(ValueError, match="val_fraction"):
        tune_weight_decay(x, y, (1e-3,), val_fraction=1.0)
    with pytest.raises(ValueError, match="grid"):
        tune_weight_decay(x, y, (-1.0,))
