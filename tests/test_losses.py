"""The public loss ``GlobalContrastiveLoss``: equal to open_clip's ClipLoss and to NT-Xent for ``infonce``, the
default EMC² unbiased for eq. (1) at b = 4 where InfoNCE is not, its errors and its state."""
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from dual_emc2.loss.global_loss import GlobalContrastiveLoss


def _features(b=6, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1).requires_grad_(True)
    y = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1).requires_grad_(True)
    return x, y


def test_infonce_equals_open_clip_clip_loss_with_gradients():
    x, y = _features()
    scale = torch.tensor(14.3, requires_grad=True)
    ours = GlobalContrastiveLoss("infonce", num_samples=100)(x, y, torch.arange(20, 26), scale)
    ref = ClipLoss()(x, y, scale)
    assert torch.allclose(ours, ref, atol=1e-6)
    g_ours = torch.autograd.grad(ours, [x, y, scale])
    g_ref = torch.autograd.grad(ClipLoss()(x, y, scale), [x, y, scale])
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-6)


def test_unimodal_infonce_is_nt_xent():
    x, y = _features(b=5)
    beta = 4.0
    z = torch.cat([x, y])  # brute force NT-Xent: 2b rows, the positive of row i is row i ± b, self excluded
    logits = (beta * z @ z.t()).masked_fill(torch.eye(10, dtype=torch.bool), float("-inf"))
    ref = F.cross_entropy(logits, torch.cat([torch.arange(5, 10), torch.arange(5)]))
    ours = GlobalContrastiveLoss("simclr", num_samples=5, mode="unimodal")(x, y, torch.arange(5), beta)
    assert torch.allclose(ours, ref, atol=1e-6)


def _exact_bimodal(X, Y, beta):
    S = beta * X @ Y.t()
    eye = torch.eye(S.shape[0], dtype=torch.bool)
    lxy = (-S.diag() + torch.logsumexp(S.masked_fill(eye, float("-inf")), 1)).mean()
    lyx = (-S.diag() + torch.logsumexp(S.t().masked_fill(eye, float("-inf")), 1)).mean()
    return 0.5 * (lxy + lyx)


def _mean_gradient_error(estimator: str, epochs: int, N=16, b=4, beta=5.0, **options) -> float:
    g = torch.Generator().manual_seed(0)
    X0 = F.normalize(torch.randn(N, 8, generator=g), dim=1)
    Y0 = F.normalize(X0 + 0.8 * torch.randn(N, 8, generator=g), dim=1)
    X, Y = X0.double().requires_grad_(True), Y0.double().requires_grad_(True)
    g_true = torch.cat([t.flatten() for t in torch.autograd.grad(_exact_bimodal(X, Y, beta), [X, Y])])
    Xf, Yf = X0.clone().requires_grad_(True), Y0.clone().requires_grad_(True)
    loss_fn = GlobalContrastiveLoss(estimator, num_samples=N, **options)
    acc, n = torch.zeros(g_true.numel()), 0
    for _ in range(epochs):
        perm = torch.randperm(N, generator=g)
        for k in range(N // b):
            idx = perm[k * b:(k + 1) * b]
            loss = loss_fn(Xf[idx], Yf[idx], idx, beta, encode_x=lambda i: Xf[i], encode_y=lambda i: Yf[i])
            grads = torch.autograd.grad(loss, [Xf, Yf])
            acc += torch.cat([t.flatten() for t in grads])
            n += 1
    return float((acc.double() / n - g_true).norm() / g_true.norm())


def test_default_emc2_mean_gradient_matches_eq1_at_b4_where_infonce_does_not():
    emc2 = _mean_gradient_error("emc2", 500)
    infonce = _mean_gradient_error("infonce", 50)
    old = _mean_gradient_error("emc2", 500, weights="visits", proposal="batch", burn_in=2, state_score="stale",
                               out_of_batch="drop")
    assert emc2 < 0.06 and infonce > 0.3 and old > 2 * emc2, (emc2, infonce, old)


@pytest.mark.parametrize("estimator, options", [("emc2", {}), ("sogclr", {}), ("negative_cache", {"dim": 8})])
@pytest.mark.determinism
def test_state_round_trips_and_two_directions_have_their_own(estimator, options):
    table_x, table_y = _features(b=30, seed=3)
    table_x, table_y = table_x.detach(), table_y.detach()
    enc = dict(encode_x=lambda i: table_x[i], encode_y=lambda i: table_y[i])
    a = GlobalContrastiveLoss(estimator, num_samples=30, **options)
    for k in range(4):
        idx = torch.arange(k, 30, 6)[:5]
        a(table_x[idx], table_y[idx], idx, 3.0, **enc)
    b = GlobalContrastiveLoss(estimator, num_samples=30, **options)
    b.load_state_dict(a.state_dict())
    idx = torch.tensor([1, 8, 15, 22, 29])
    assert torch.equal(a(table_x[idx], table_y[idx], idx, 3.0, **enc), b(table_x[idx], table_y[idx], idx, 3.0, **enc))
    sd = a.state_dict()
    assert any(k.startswith("estimator.x_to_y.") for k in sd) and any(k.startswith("estimator.y_to_x.") for k in sd)
    assert set(a.last_stats) >= {"loss", "batch_objective"}


@pytest.mark.parametrize("call, match", [
    (lambda f, x, y, i: f(10 * x, y, i, 5.0), "x_features rows must be unit vectors"),
    (lambda f, x, y, i: f(x, y[:3], i, 5.0), "same shape"),
    (lambda f, x, y, i: f(x, y, i.float(), 5.0), "index must be an integer tensor"),
    (lambda f, x, y, i: f(x, y, i + 95, 5.0), r"index values must lie in \[0, num_samples=100\)"),
    (lambda f, x, y, i: f(x, y, torch.zeros_like(i), 5.0), "repeated ids"),
    (lambda f, x, y, i: f(x, y, i, -1.0), "logit_scale"),
    (lambda f, x, y, i: f(x, y, i, 5.0, state_y=y), "state_request"),
])
def test_bad_calls_name_the_argument_and_the_fix(call, match):
    x, y = _features()
    with pytest.raises(ValueError, match=match):
        call(GlobalContrastiveLoss("emc2", num_samples=100), x.detach(), y.detach(), torch.arange(6))


def test_bad_construction_is_named():
    with pytest.raises(ValueError, match="did you mean 'unimodal'"):
        GlobalContrastiveLoss("emc2", num_samples=10, mode="unimodel")
    with pytest.raises(ValueError, match="did you mean 'emc2'"):
        GlobalContrastiveLoss("emc", num_samples=10)
    with pytest.raises(ValueError, match="did you mean 'burn_in'"):
        GlobalContrastiveLoss("emc2", num_samples=10, burnin=3)
    with pytest.raises(ValueError, match="num_samples"):
        GlobalContrastiveLoss("emc2", num_samples=0)


def test_emc2_without_encoders_when_built_not_to_reencode():
    x, y = _features()
    loss_fn = GlobalContrastiveLoss("emc2", num_samples=10, state_score="stale", out_of_batch="drop")
    for k in range(3):
        loss = loss_fn(x, y, torch.arange(6) + k % 2 * 4, 5.0)
        assert torch.isfinite(loss)


def test_one_direction_is_the_x_to_y_cross_entropy():
    x, y = _features()
    ours = GlobalContrastiveLoss("infonce", num_samples=10, symmetric=False)(x, y, torch.arange(6), 7.0)
    assert torch.allclose(ours, F.cross_entropy(7.0 * x @ y.t(), torch.arange(6)), atol=1e-6)
    loss_fn = GlobalContrastiveLoss("emc2", num_samples=10, symmetric=False)
    assert torch.isfinite(loss_fn(x, y, torch.arange(6), 7.0, encode_y=lambda i: y[i % 6]))
    assert not any(k.startswith("estimator.y_to_x") for k in loss_fn.state_dict())
