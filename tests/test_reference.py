"""The for-loop reference against values derived by hand from FADAM_SPEC.md (float64 throughout)."""

import math

import pytest
import torch

from hf_fadam import FAdam


def _one_step(theta, grad, **kwargs):
    param = torch.nn.Parameter(theta.clone())
    opt = FAdam([param], foreach=False, **kwargs)
    param.grad = grad.clone()
    opt.step()
    return param.detach(), opt.state[param]


def _rms(x):
    return math.sqrt((x**2).mean().item())


def test_first_step_matches_hand_derivation():
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(64, dtype=torch.float64, generator=gen)
    grad = 1e-3 * torch.randn(64, dtype=torch.float64, generator=gen)
    lr, eps, wd = 0.01, 1e-8, 0.1
    new, state = _one_step(theta, grad, lr=lr, eps=eps, weight_decay=wd)

    # β̂2 = 0 at t = 1, so f_1 = g².
    torch.testing.assert_close(state["fisher"], grad**2, rtol=0, atol=0)
    eps_hat = eps * min(1.0, _rms(grad))
    denom = grad.abs() + eps_hat
    nat = grad / denom  # ≈ sign(g); its RMS is just below 1, so the clip at c = 1 does nothing
    assert _rms(nat) < 1
    torch.testing.assert_close(state["exp_avg"], 0.1 * nat, rtol=1e-15, atol=0)
    assert torch.allclose(state["exp_avg"].abs(), torch.full_like(theta, 0.1), rtol=1e-4)
    w = theta / denom
    w = w / max(1.0, _rms(w))
    torch.testing.assert_close(new, theta - lr * (0.1 * nat + wd * w), rtol=1e-13, atol=1e-15)
    assert state["step"].item() == 1.0 and state["step"].dtype == torch.float32


def test_beta2_hat_second_step():
    theta = torch.zeros(3, dtype=torch.float64)
    g1 = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    g2 = torch.tensor([0.5, 0.5, -1.0], dtype=torch.float64)
    param = torch.nn.Parameter(theta.clone())
    opt = FAdam([param], foreach=False, betas=(0.9, 0.99), weight_decay=0.0)
    for g in (g1, g2):
        param.grad = g.clone()
        opt.step()
    beta2_hat = 0.99 * (1 - 0.99) / (1 - 0.99**2)  # = β2 / (1 + β2)
    expected = beta2_hat * g1**2 + (1 - beta2_hat) * g2**2
    torch.testing.assert_close(opt.state[param]["fisher"], expected, rtol=1e-15, atol=0)


def test_fisher_equals_adam_bias_corrected_second_moment():
    gen = torch.Generator().manual_seed(1)
    p1 = torch.nn.Parameter(torch.randn(10, dtype=torch.float64, generator=gen))
    p2 = torch.nn.Parameter(p1.detach().clone())
    fadam = FAdam([p1], foreach=False, lr=0.0)
    adam = torch.optim.Adam([p2], lr=0.0, betas=(0.9, 0.999), foreach=False)
    for t in range(1, 31):
        g = torch.randn(10, dtype=torch.float64, generator=gen)
        p1.grad, p2.grad = g.clone(), g.clone()
        fadam.step()
        adam.step()
        v_hat = adam.state[p2]["exp_avg_sq"] / (1 - 0.999**t)
        torch.testing.assert_close(fadam.state[p1]["fisher"], v_hat, rtol=1e-12, atol=0)


@pytest.mark.parametrize("clip", [0.5, 2.0])
def test_clip_follows_the_paper_not_the_ports(clip):
    # Step 1 with p = ½: ḡ ≈ sign(g), RMS(ḡ) ≈ 1. The paper divides by max(1, RMS/c): halves it at c = 0.5 and
    # leaves it alone at c = 2. The ports' max(1, RMS)/c would double it at c = 2.
    grad = torch.tensor([1.0, -1.0, 2.0, -0.5], dtype=torch.float64)
    theta = torch.zeros(4, dtype=torch.float64)
    _, state = _one_step(theta, grad, clip=clip, weight_decay=0.0)
    nat = grad / (grad.abs() + 1e-8)
    expected = 0.1 * nat / max(1.0, _rms(nat) / clip)
    torch.testing.assert_close(state["exp_avg"], expected, rtol=1e-15, atol=0)
    assert _rms(state["exp_avg"]) == pytest.approx(0.1 * min(1.0, clip), rel=1e-7)


def test_weight_decay_term_is_clipped_to_rms_c():
    theta = torch.linspace(-1, 1, 50, dtype=torch.float64)
    grad = 1e-4 * torch.ones(50, dtype=torch.float64)
    lr, wd, clip = 1.0, 0.1, 0.7
    new, state = _one_step(theta, grad, lr=lr, weight_decay=wd, clip=clip)
    decay = (theta - new) / lr - state["exp_avg"]
    assert _rms(decay) == pytest.approx(wd * clip, rel=1e-12)  # |θ|/√f ≫ 1: λ·w sits at the clip


def test_zero_gradient_stays_finite_with_adaptive_eps_guard():
    theta = torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    lr, wd, eps = 0.05, 0.1, 1e-8
    new, state = _one_step(theta, torch.zeros(20, dtype=torch.float64), lr=lr, weight_decay=wd, eps=eps)
    assert torch.isfinite(new).all() and torch.isfinite(state["exp_avg"]).all()
    assert torch.equal(state["exp_avg"], torch.zeros(20, dtype=torch.float64))
    # ε̂ = ε when RMS(g) = 0, so w = θ/ε, clipped to RMS c = 1: θ/RMS(θ).
    torch.testing.assert_close(new, theta - lr * wd * theta / _rms(theta), rtol=1e-13, atol=0)


def test_zero_gradient_and_zero_lr_leave_params_unchanged():
    theta = torch.randn(7, 3)
    for foreach in (False, True):
        param = torch.nn.Parameter(theta.clone())
        opt = FAdam([param], lr=0.0, foreach=foreach)
        param.grad = torch.zeros_like(param)
        opt.step()
        assert torch.equal(param.detach(), theta)
        assert all(torch.isfinite(t).all() for t in opt.state[param].values())


def test_loss_scale_invariance():
    # Scaling the loss by k > 0 leaves the update unchanged up to ε (ε̂ scales with RMS(g) below 1).
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(30, dtype=torch.float64, generator=gen)
    grads = [1e-3 * torch.randn(30, dtype=torch.float64, generator=gen) for _ in range(5)]
    finals = []
    for k in (1.0, 37.0):
        param = torch.nn.Parameter(theta.clone())
        opt = FAdam([param], foreach=False, lr=0.1)
        for g in grads:
            param.grad = k * g
            opt.step()
        finals.append(param.detach())
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-6, atol=1e-9)


def test_maximize_ascends():
    param = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = FAdam([param], lr=0.1, maximize=True, foreach=False, weight_decay=0.0)
    param.grad = torch.ones(5, dtype=torch.float64)
    opt.step()
    assert (param.detach() > 0).all()


def test_none_grad_is_skipped_entirely():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    opt = FAdam([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    assert b not in opt.state and torch.equal(b.detach(), torch.ones(3))  # no state, no decay, no step
    assert opt.state[a]["step"].item() == 1


def test_closure_returns_loss():
    param = torch.nn.Parameter(torch.ones(2))
    opt = FAdam([param])

    def closure():
        opt.zero_grad()
        loss = (param**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(2.0)


@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
def test_training_loss_falls_on_a_classification_problem(foreach):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(256, 10, generator=gen)
    y = (x[:, :3].sum(dim=1) > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    opt = FAdam(model.parameters(), lr=1e-2, foreach=foreach)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
