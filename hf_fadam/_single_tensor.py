"""The literal, per-tensor FAdam step: the readable reference and the oracle of every test.

It transcribes FADAM_SPEC.md line by line, one parameter tensor at a time. The elementwise math runs in the state
dtype, at least float32 (:func:`hf_fadam._math.compute_dtype`); m and f are stored back in the state dtype. The
per-tensor scalars (β̂2, ε̂, the clip divisors) are float64, and every sum of squares is accumulated in float64.

The loop is written in the three phases every implementation shares, so that the per-tensor sums can go through
the ``reduce`` hook between them (see :func:`hf_fadam.functional.fadam`):

1. Σg² per tensor                                  -> reduce
2. the Fisher update, D, Σ(g/D)² and Σ(θ/D)²       -> reduce
3. the update, with every RMS = sqrt(sum / numel)

Stores follow :mod:`hf_fadam._rounding`: a 16-bit param is stored by its ``param_rounding`` (with ``"kahan"`` the
step works on θ + c and keeps the new residual in ``param_comps[i]``), 16-bit state is stored with stochastic
rounding; the random bits of tensor i come from ``streams[i]`` and its step count.

Nothing in the dispatcher chooses it by default; ``FAdam(..., foreach=False)`` selects it explicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._math import adaptive_eps, clip_divisor, compute_dtype, fisher_beta, rms_from_sumsq, sumsq
from ._rounding import KIND_EXP_AVG, KIND_FISHER, KIND_PARAM, resolve_param_rounding, round_stochastic, rounding_seeds


def _reduced(rows: list[list[Tensor]], reduce: Callable[[Tensor], object] | None) -> list[list[Tensor]]:
    """Pass per-tensor sums (``rows[k][i]``, 0-d float64) through ``reduce`` as one (k, n) buffer, in place."""
    if reduce is None:
        return rows
    if rows[0]:
        buf = torch.stack([torch.stack(row) for row in rows])
    else:
        buf = torch.zeros((len(rows), 0), dtype=torch.float64)
    reduce(buf)
    return [list(row.unbind(0)) for row in buf]


def _single_tensor_fadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    fishers: list[Tensor],
    state_steps: list[Tensor],
    *,
    numels: Sequence[int] | None = None,
    reduce: Callable[[Tensor], object] | None = None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip: float,
    p: float,
    maximize: bool,
    param_rounding: str = "nearest",
    param_comps: Sequence[Tensor | None] | None = None,
    streams: Sequence[int] | None = None,
) -> None:
    if numels is None:
        numels = [param.numel() for param in params]
    if streams is None:
        streams = range(len(params))
    modes = [resolve_param_rounding(param_rounding, param.dtype) for param in params]
    comps = _kahan_buffers(params, modes, param_comps)

    # Phase 1: g (after maximize) in the compute dtype, and Σg². θ is the stored param, plus its residual (kahan).
    gs, thetas = [], []
    for param, grad, f, step, comp in zip(params, grads, fishers, state_steps, comps):
        step += 1
        ct = compute_dtype(f.dtype)
        gs.append((-grad if maximize else grad).to(ct))
        thetas.append(param.to(ct) if comp is None else param.to(ct) + comp.to(ct))
    (grad_sums,) = _reduced([[sumsq(g) for g in gs]], reduce)

    # Phase 2: the Fisher, D = f^p + ε̂, and the sums of the two quantities that get clipped.
    denoms, nat_grads, decays = [], [], []
    for g, theta, f, step, grad_sum, numel, stream in zip(gs, thetas, fishers, state_steps, grad_sums, numels, streams):
        # Diagonal empirical Fisher, kept debiased: f_1 = g² because β̂2 = 0 at t = 1.
        beta2_hat = fisher_beta(beta2, step)
        f_new = f.to(g.dtype) * beta2_hat + g * g * (1 - beta2_hat)
        f.copy_(_stored(f_new, f.dtype, stream, step, KIND_FISHER))

        eps_hat = adaptive_eps(eps, rms_from_sumsq(grad_sum, numel))
        denom = f_new.pow(p) + eps_hat
        denoms.append(denom)
        nat_grads.append(g / denom)  # natural gradient
        decays.append(theta / denom)  # Fisher-preconditioned weight decay
    # (Σ(θ/D)² is left 0 when there is no weight decay: nothing reads it.)
    nat_sums, decay_sums = _reduced(
        [
            [sumsq(x) for x in nat_grads],
            [sumsq(w) if weight_decay != 0 else torch.zeros_like(s) for w, s in zip(decays, grad_sums)],
        ],
        reduce,
    )

    # Phase 3: clip both to RMS <= clip; momentum on the natural gradient, without bias correction; the step.
    for param, theta, m, nat_grad, w, nat_sum, decay_sum, numel, step, stream, mode, comp in zip(
        params, thetas, exp_avgs, nat_grads, decays, nat_sums, decay_sums, numels, state_steps, streams, modes, comps
    ):
        nat_grad = nat_grad / clip_divisor(rms_from_sumsq(nat_sum, numel), clip)
        m_new = m.to(nat_grad.dtype).mul(beta1).add_(nat_grad, alpha=1 - beta1)
        m.copy_(_stored(m_new, m.dtype, stream, step, KIND_EXP_AVG))

        update = m_new
        if weight_decay != 0:
            w = w / clip_divisor(rms_from_sumsq(decay_sum, numel), clip)
            update = m_new + weight_decay * w

        theta_new = theta.add(update, alpha=-lr)
        if mode == "stochastic":
            param.copy_(_stored(theta_new, param.dtype, stream, step, KIND_PARAM))
        elif mode == "kahan":
            stored = theta_new.to(param.dtype)  # to nearest; what that dropped is kept for the next step
            comp.copy_(theta_new - stored.to(theta_new.dtype))
            param.copy_(stored)
        else:
            param.copy_(theta_new)


def _stored(x: Tensor, dtype: torch.dtype, stream: int, step: Tensor, kind: int) -> Tensor:
    """``x`` as it is stored into a tensor of ``dtype``: rounded stochastically into 16 bits, else as it is."""
    if dtype not in (torch.bfloat16, torch.float16):
        return x
    return round_stochastic(x, dtype, rounding_seeds([stream], step.reshape(1), kind).to(x.device))


def _kahan_buffers(
    params: list[Tensor], modes: list[str], param_comps: Sequence[Tensor | None] | None
) -> list[Tensor | None]:
    """Each param's compensation buffer where its store is ``"kahan"`` (checked), else None."""
    if not any(mode == "kahan" for mode in modes):
        return [None] * len(params)
    if param_comps is None or len(param_comps) != len(params):
        raise ValueError("FAdam: param_rounding='kahan' needs param_comps, one buffer (or None) per param")
    out = []
    for i, (param, mode, comp) in enumerate(zip(params, modes, param_comps)):
        if mode != "kahan":
            out.append(None)
            continue
        if comp is None or comp.shape != param.shape or comp.dtype != param.dtype or comp.device != param.device:
            raise ValueError(f"FAdam: param_comps[{i}] must be a {param.dtype} tensor shaped like its param")
        out.append(comp)
    return out
