import math

import pytest
import torch
from torch import nn

from dual_emc2.towers import build_image_encoder
from dual_emc2.train.optim import build_optimizer, build_scheduler, param_groups

torch.set_num_threads(1)


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def _set_grads(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def _groups_by_name(opt: torch.optim.Optimizer) -> dict[str, dict]:
    return {g["name"]: g for g in opt.param_groups}


# ----------------------------------------------------------------------------------------------- param groups


def test_param_groups_split_bias_and_norm_from_weights():
    enc = build_image_encoder("resnet18", cifar_stem=True, proj_hidden=32, proj_dim=16, proj_layers=3,
                              batch_norm=True)
    groups = {g["name"]: g for g in param_groups(enc, weight_decay=1e-4)}
    decay = {id(p) for p in groups["decay"]["params"]}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 1e-4 and groups["no_decay"]["weight_decay"] == 0.0
    assert groups["decay"]["lars_adapt"] is True and groups["no_decay"]["lars_adapt"] is False
    n_weights = n_excluded = 0
    for m in enc.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert id(m.weight) in decay
            n_weights += 1
            if m.bias is not None:
                assert id(m.bias) in no_decay
                n_excluded += 1
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            assert id(m.weight) in no_decay and id(m.bias) in no_decay
            n_excluded += 2
    assert len(decay) == n_weights and len(no_decay) == n_excluded
    assert not decay & no_decay
    assert len(decay) + len(no_decay) == len(list(enc.parameters()))


def test_param_groups_without_exclusion_and_frozen_params():
    model = _tiny()
    model[0].weight.requires_grad_(False)
    (group,) = param_groups(model.named_parameters(), weight_decay=0.1, exclude_bias_and_norm=False)
    assert group["name"] == "all" and group["weight_decay"] == 0.1
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, weight_decay=-1.0)


# ----------------------------------------------------------------------------------------------- optimisers


def test_sgd_step_matches_closed_form_with_decay_only_on_weights():
    model = _tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, "sgd", lr=0.1, weight_decay=0.01, momentum=0.9)
    assert isinstance(opt, torch.optim.SGD)
    _set_grads(model, 1)
    opt.step()
    for n, p in model.named_parameters():
        wd = 0.01 if p.ndim > 1 else 0.0
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * (p.grad + wd * before[n]))


def test_adam_and_adamw_first_step_closed_form():
    eps = 1e-8
    for name, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        model = _tiny()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = build_optimizer(model, name, lr=1e-2, weight_decay=0.5, betas=(0.8, 0.99))
        assert type(opt) is cls
        assert all(g["betas"] == (0.8, 0.99) for g in opt.param_groups)
        _set_grads(model, 2)
        opt.step()
        for n, p in model.named_parameters():
            wd = 0.5 if p.ndim > 1 else 0.0
            w, g = before[n], p.grad
            if name == "adam":  # coupled L2; first bias-corrected step = g' / (|g'| + eps)
                g = g + wd * w
                expected = w - 1e-2 * g / (g.abs() + eps)
            else:  # decoupled decay
                expected = w * (1 - 1e-2 * wd) - 1e-2 * g / (g.abs() + eps)
            torch.testing.assert_close(p.detach(), expected)


def _lars_reference(w, g, m, *, lr, wd, eta, mu, adapt):
    """LARS (You et al. 2017, Alg. 1, as in timm): u = ρ (g + λw), ρ = η‖w‖ / (‖g‖ + λ‖w‖ + 1e-8)."""
    if adapt:
        rho = eta * w.norm() / (g.norm() + wd * w.norm() + 1e-8)
        u = rho * (g + wd * w)
    else:
        u = g
    m = u.clone() if m is None else mu * m + u
    return w - lr * m, m


@pytest.mark.parametrize("wd", [0.3, 0.0])
def test_lars_two_steps_match_hand_formula(wd):
    model = _tiny()
    lr, eta, mu = 0.7, 0.02, 0.9
    opt = build_optimizer(model, "lars", lr=lr, weight_decay=wd, momentum=mu, trust_coeff=eta)
    assert type(opt).__name__.lower() == "lars"
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = {n: None for n in w}
    for step in range(2):
        _set_grads(model, 10 + step)
        opt.step()
        for n, p in model.named_parameters():
            excluded = p.ndim <= 1
            w[n], m[n] = _lars_reference(w[n], p.grad, m[n], lr=lr, wd=0.0 if excluded else wd, eta=eta, mu=mu,
                                         adapt=not excluded)
            torch.testing.assert_close(p.detach(), w[n], rtol=1e-5, atol=1e-7)
    # the trust ratio really acted: a decayed weight moved far less than a plain SGD step would move it
    w0 = _tiny()[0].weight.detach()
    assert (model[0].weight.detach() - w0).norm() < 0.2 * lr * model[0].weight.grad.norm()


def test_extra_params_join_no_decay_group():
    model = _tiny()
    inv_temp = nn.Parameter(torch.tensor(14.28))
    opt = build_optimizer(model, "lars", lr=1.0, weight_decay=1e-6, extra_params=[inv_temp, model[3].weight])
    groups = _groups_by_name(opt)
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert id(inv_temp) in no_decay and id(model[3].weight) in no_decay
    assert id(model[3].weight) not in {id(p) for p in groups["decay"]["params"]}
    assert groups["no_decay"]["always_adapt"] is False and groups["decay"]["always_adapt"] is True
    # also when no exclusion is asked for the model itself
    opt = build_optimizer(model, "adam", lr=1e-3, weight_decay=0.1, exclude_bias_and_norm=False,
                          extra_params=[inv_temp])
    groups = _groups_by_name(opt)
    assert [id(p) for p in groups["no_decay"]["params"]] == [id(inv_temp)]
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["all"]["weight_decay"] == 0.1


def test_bad_optimizer_arguments_raise():
    model = _tiny()
    with pytest.raises(ValueError, match="adam, adamw, sgd, lars"):
        build_optimizer(model, "rmsprop", lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(model, "sgd", lr=0.0)
    with pytest.raises(ValueError, match="momentum"):
        build_optimizer(model, "sgd", lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="betas"):
        build_optimizer(model, "adam", lr=0.1, betas=(0.9,))
    frozen = _tiny().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, "adam", lr=0.1)
    with pytest.raises(TypeError, match="params"):
        build_optimizer([{"params": list(model.parameters())}], "sgd", lr=0.1)


# ----------------------------------------------------------------------------------------------- schedules


def _lrs(total, warmup, schedule="cosine", min_lr_ratio=0.0, base=0.1, steps=None):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = build_scheduler(opt, total, warmup, schedule, min_lr_ratio)
    out = [sched.get_last_lr()[0]]
    for _ in range(total if steps is None else steps):
        opt.step()
        sched.step()
        out.append(sched.get_last_lr()[0])
    return out


def test_warmup_cosine_closed_form():
    base, T, W, m = 0.1, 100, 10, 0.1
    lrs = _lrs(T, W, "cosine", m, base)

    def closed(s):
        if s < W:
            return base * (s + 1) / (W + 1)
        return base * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * (s - W) / (T - W))))

    assert lrs[0] == pytest.approx(base / (W + 1))
    assert lrs[W] == pytest.approx(base)
    assert lrs[55] == pytest.approx(base * (m + (1 - m) * 0.5))  # half-way through the cosine
    assert lrs[T] == pytest.approx(base * m)
    assert lrs == pytest.approx([closed(s) for s in range(T + 1)])
    assert all(a < b for a, b in zip(lrs[:W], lrs[1:W + 1]))  # strictly rising warm-up
    assert all(a >= b for a, b in zip(lrs[W:], lrs[W + 1:]))  # non-increasing decay


def test_constant_and_no_warmup_and_resume():
    lrs = _lrs(20, 4, "constant", base=0.5)
    assert lrs[:5] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert lrs[4:] == pytest.approx([0.5] * 17)
    lrs = _lrs(10, 0, "cosine", base=1.0)
    assert lrs[0] == pytest.approx(1.0) and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(0.0, abs=1e-12)
    # resuming from a state dict continues the same curve
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, 10, 2)
    for _ in range(6):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([p], lr=1.0)
    sched2 = build_scheduler(opt2, 10, 2)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())


def test_bad_schedule_arguments_raise():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="warmup_steps .* total_steps"):
        build_scheduler(opt, 10, 11)
    with pytest.raises(ValueError, match="cosine, constant"):
        build_scheduler(opt, 10, 0, "step")
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler(opt, 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        build_scheduler(opt, 10, -1)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        build_scheduler(opt, 10, 0, min_lr_ratio=1.5)
