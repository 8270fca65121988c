"""Exact L(θ) and ‖∇L(θ)‖² (eq. 1) by chunked two-pass backprop against one-shot autograd in float64."""
import torch
import torch.nn.functional as F
from torch import nn

from dual_emc2.loss.exact import exact_objective, global_contrastive_loss


def _naive_loss(a, c, positive, aid, cid, beta):
    total = 0.0
    for k in range(a.shape[0]):
        s = a[k] @ c.t()
        neg = cid != aid[k]
        total = total - beta * s[positive[k]] + torch.logsumexp(beta * s[neg], 0)
    return total / a.shape[0]


def test_loss_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=1)
    c = F.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=1)
    aid = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    cid = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8])
    pos = torch.arange(7)
    for chunk in (2, 100):
        got = global_contrastive_loss(a, c, pos, aid, cid, 2.5, row_chunk=chunk)
        assert torch.allclose(got, _naive_loss(a, c, pos, aid, cid, 2.5), atol=1e-12)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))

    def forward(self, x):
        return F.normalize(self.net(x), dim=1)


def test_unimodal_grad_norm_equals_full_autograd():
    torch.manual_seed(0)
    model = Tiny().double()
    m = 11
    views = torch.randn(2 * m, 6, dtype=torch.float64)
    ids = torch.arange(m).repeat(2)
    pos = torch.cat([torch.arange(m, 2 * m), torch.arange(m)])
    loss, sq = exact_objective(model, None, views, None, pos, ids, ids, 3.0, model.parameters(), chunk=4)
    model.zero_grad()
    f = model(views)
    ref = global_contrastive_loss(f, f, pos, ids, ids, 3.0)
    grads = torch.autograd.grad(ref, list(model.parameters()))
    ref_sq = sum(float(g.square().sum()) for g in grads)
    assert abs(loss - float(ref)) < 1e-10
    assert abs(sq - ref_sq) < 1e-9 * max(1.0, ref_sq)


def test_two_tower_grad_norm_equals_full_autograd():
    torch.manual_seed(1)
    phi, psi = Tiny().double(), Tiny().double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    ids = torch.arange(8)
    params = list(phi.parameters()) + list(psi.parameters())
    loss, sq = exact_objective(phi, psi, x, y, ids, ids, ids, 2.0, params, chunk=3)
    ref = global_contrastive_loss(phi(x), psi(y), ids, ids, ids, 2.0)
    grads = torch.autograd.grad(ref, params)
    assert abs(loss - float(ref)) < 1e-10
    assert abs(sq - sum(float(g.square().sum()) for g in grads)) < 1e-9
