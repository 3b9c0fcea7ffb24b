"""The literal, per-tensor FAdam step: the readable reference and the oracle of every test.

It transcribes FADAM_SPEC.md line by line, one parameter tensor at a time, in the state dtype. Nothing in the
dispatcher chooses it by default; ``FAdam(..., foreach=False)`` selects it explicitly.
"""

from __future__ import annotations

from torch import Tensor

from ._math import adaptive_eps, clip_divisor, fisher_beta, rms


def _single_tensor_fadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    fishers: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip: float,
    p: float,
    maximize: bool,
) -> None:
    for param, grad, m, f, step in zip(params, grads, exp_avgs, fishers, state_steps):
        state_dtype = f.dtype
        g = (-grad if maximize else grad).to(state_dtype)
        theta = param.to(state_dtype)

        step += 1
        beta2_hat = fisher_beta(beta2, step).to(state_dtype)

        # Diagonal empirical Fisher, kept debiased: f_1 = g² because β̂2 = 0 at t = 1.
        f.mul_(beta2_hat).add_(g * g * (1 - beta2_hat))

        eps_hat = adaptive_eps(eps, rms(g))
        denom = f.pow(p) + eps_hat

        # Natural gradient, clipped to RMS <= clip; momentum on it, without bias correction.
        nat_grad = g / denom
        nat_grad = nat_grad / clip_divisor(rms(nat_grad), clip)
        m.mul_(beta1).add_(nat_grad, alpha=1 - beta1)

        update = m
        if weight_decay != 0:
            # Fisher-preconditioned weight decay, clipped like the natural gradient.
            w = theta / denom
            w = w / clip_divisor(rms(w), clip)
            update = m + weight_decay * w

        param.copy_(theta.add(update, alpha=-lr))
