"""The multi-tensor FAdam step on ``torch._foreach_*`` ops.

The same math as the reference (``_single_tensor.py``), list-at-a-time, in the same three phases with the
``reduce`` hook between them (see :func:`hf_fadam.functional.fadam`):

1. Σg² per tensor (``torch._foreach_norm(..., dtype=float64)``, squared: accumulated in float64)  -> reduce
2. f ← β̂2 f + (1−β̂2) g², D = f^p + ε̂, Σ(g/D)² and Σ(θ/D)²                                    -> reduce
3. m ← β1 m + (1−β1) clip(g/D);  θ ← θ − η (m + λ clip(θ/D))

Tensors are grouped by (device, param dtype, state dtype); each elementwise line is one multi-tensor op per group,
in the compute dtype (the state dtype, at least float32; 16-bit state is loaded into float32 and stored once).
The phases run over all groups before the next phase starts, so ``reduce`` is called exactly twice per call. The
per-tensor scalars β̂2, 1−β̂2, ε̂ and the two clip divisors are computed once per call, in float64, on stacked
vectors of the steps and sums (no Python loop of per-tensor tensor ops), and enter the foreach ops as 0-d tensors
of the compute dtype. It is sync-free: nothing is read back to the host, so ``torch.compile`` traces it.

It takes plain tensors only: ``functional.fadam`` sends DTensor (FSDP2, HSDP, TP) parameters to ``_sharded.py``,
which calls this path on their local shards with the logical ``numels`` and an all-reduce as ``reduce``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._math import adaptive_eps, clip_divisor, compute_dtype, fisher_beta, rms_from_sumsq
from ._rounding import KIND_EXP_AVG, KIND_FISHER, KIND_PARAM, resolve_param_rounding, round_stochastic, rounding_seeds
from ._single_tensor import _kahan_buffers


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _group_indices(params: list[Tensor], fishers: list[Tensor]) -> dict[tuple, list[int]]:
    """Tensor indices grouped by (device, param dtype, state dtype), in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, (param, f) in enumerate(zip(params, fishers)):
        groups.setdefault((param.device, param.dtype, f.dtype), []).append(i)
    return groups


def _sums_of_squares(xs: list[Tensor]) -> Tensor:
    """Σx² of each tensor, accumulated in float64, as one stacked float64 vector."""
    return torch.stack(torch._foreach_norm(xs, 2, dtype=torch.float64)).square()


def _multi_tensor_fadam(
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
    hyper = dict(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, clip=clip, p=p, maximize=maximize,
        param_rounding=param_rounding,
    )  # fmt: skip
    if any(_is_dtensor(t) for t in params):
        raise TypeError(
            "_multi_tensor_fadam takes plain tensors; DTensor params go through hf_fadam.functional.fadam, which "
            "steps their local shards (hf_fadam/_sharded.py)"
        )
    if numels is None:
        numels = [t.numel() for t in params]
    devices = list(dict.fromkeys(t.device for t in params))
    if reduce is not None and len(devices) > 1:
        raise ValueError(f"FAdam: with a reduce hook all tensors of a call must be on one device; got {devices}")
    if not devices:  # nothing to step; a reduce is still called twice, as on every other process
        if reduce is not None:
            reduce(torch.zeros((1, 0), dtype=torch.float64))
            reduce(torch.zeros((2, 0), dtype=torch.float64))
        return
    comps = _kahan_buffers(params, [resolve_param_rounding(param_rounding, t.dtype) for t in params], param_comps)
    streams = list(range(len(params))) if streams is None else list(streams)
    for device in devices:
        idx = [i for i, t in enumerate(params) if t.device == device]
        sub = [[lst[i] for i in idx] for lst in (params, grads, exp_avgs, fishers, state_steps)]
        _multi_tensor_fadam_device(*sub, numels=[numels[i] for i in idx], reduce=reduce,
                                   comps=[comps[i] for i in idx], streams=[streams[i] for i in idx],
                                   **hyper)  # fmt: skip


def _multi_tensor_fadam_device(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    fishers: list[Tensor],
    steps: list[Tensor],
    *,
    numels: Sequence[int],
    reduce: Callable[[Tensor], object] | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip: float,
    p: float,
    maximize: bool,
    param_rounding: str,
    comps: list[Tensor | None],
    streams: list[int],
) -> None:
    """One device's tensors: phase-major over the (param dtype, state dtype) groups."""
    device = params[0].device
    groups = list(_group_indices(params, fishers).values())
    # Stacked per-tensor vectors are kept in group order (the groups concatenated); the reduce buffers are in the
    # caller's order (column i = tensor i), so they go through `order`/`inverse` when there are several groups.
    order = [i for idx in groups for i in idx]
    permuted = order != list(range(len(params)))
    order_t = inverse_t = None
    if permuted:
        order_t = torch.tensor(order, device=device)
        inverse_t = torch.empty_like(order_t)
        inverse_t[order_t] = torch.arange(len(order), device=device)

    def reduced(sums: Tensor) -> Tensor:  # (k, n) in group order -> reduced, still in group order
        if reduce is None:
            return sums
        buf = sums[:, inverse_t] if permuted else sums.clone()
        reduce(buf)
        return buf[:, order_t] if permuted else buf

    def split(vec: Tensor, dtype: torch.dtype | None = None) -> list[list[Tensor]]:
        """A stacked per-tensor vector (group order) -> per group, a list of 0-d tensors (in ``dtype``)."""
        out, start = [], 0
        for idx, ct in zip(groups, cts):
            out.append(list(vec[start : start + len(idx)].to(dtype or ct).unbind(0)))
            start += len(idx)
        return out

    numels_t = torch.tensor([numels[i] for i in order], dtype=torch.float64, device=device)
    cts = [compute_dtype(fishers[idx[0]].dtype) for idx in groups]
    modes = [resolve_param_rounding(param_rounding, params[idx[0]].dtype) for idx in groups]
    torch._foreach_add_(steps, 1)
    random_stores = any(m == "stochastic" for m in modes) or any(
        fishers[idx[0]].dtype in (torch.bfloat16, torch.float16) for idx in groups
    )
    if random_stores:  # the per-tensor seeds of every stochastically rounded store, in group order
        steps_t = torch.stack([steps[i] for i in order]).reshape(-1)
        streams_t = torch.tensor([streams[i] for i in order], dtype=torch.int64, device=device)
        seeds = {k: split(rounding_seeds(streams_t, steps_t, k), torch.int64)
                 for k in (KIND_PARAM, KIND_EXP_AVG, KIND_FISHER)}  # fmt: skip

    def store(dst: list[Tensor], src: list[Tensor], gi: int, kind: int) -> None:
        """Copy ``src`` (compute dtype) into ``dst``: 16-bit state (and params rounded "stochastic") stochastically."""
        if dst[0].dtype in (torch.bfloat16, torch.float16):
            for d, x, seed in zip(dst, src, seeds[kind][gi]):
                d.copy_(round_stochastic(x, d.dtype, seed))
        else:
            torch._foreach_copy_(dst, src)

    # Phase 1: g (after maximize) in the compute dtype, and Σg².
    gs, grad_sums = [], []
    for idx, ct in zip(groups, cts):
        g = [grads[i] for i in idx]
        if maximize:
            g = torch._foreach_neg(g)
        if g[0].dtype != ct:
            g = [t.to(ct) for t in g]
        gs.append(g)
        grad_sums.append(_sums_of_squares(g))
    (grad_sums,) = reduced(torch.cat(grad_sums).unsqueeze(0))

    # Per-tensor scalars, once for the whole list, in float64.
    beta2_hats = fisher_beta(beta2, torch.stack([steps[i] for i in order]).to(device))
    eps_hats = adaptive_eps(eps, rms_from_sumsq(grad_sums, numels_t))
    beta2_hat_groups, one_minus_groups, eps_hat_groups = split(beta2_hats), split(1 - beta2_hats), split(eps_hats)

    # Phase 2: the Fisher, D = f^p + ε̂, and the sums of the two quantities that get clipped.
    thetas, denoms, nat_grads, nat_sums, decay_sums = [], [], [], [], []
    for gi, (idx, ct, g) in enumerate(zip(groups, cts, gs)):
        f_state = [fishers[i] for i in idx]
        f = f_state if ct == f_state[0].dtype else [t.to(ct) for t in f_state]
        # f <- β̂2 f + (1 - β̂2) g²   (f_1 = g², since β̂2 = 0 at t = 1)
        torch._foreach_mul_(f, beta2_hat_groups[gi])
        grad_sq = torch._foreach_mul(g, g)
        torch._foreach_mul_(grad_sq, one_minus_groups[gi])
        torch._foreach_add_(f, grad_sq)
        del grad_sq
        if f is not f_state:
            store(f_state, f, gi, KIND_FISHER)

        # D = f^p + ε̂
        denom = torch._foreach_sqrt(f) if p == 0.5 else torch._foreach_pow(f, p)
        torch._foreach_add_(denom, eps_hat_groups[gi])
        del f
        nat_grad = torch._foreach_div(g, denom)
        nat_sums.append(_sums_of_squares(nat_grad))
        theta = [params[i] for i in idx]
        if theta[0].dtype != ct:
            theta = [t.to(ct) for t in theta]
        if modes[gi] == "kahan":  # the step works on θ + c
            torch._foreach_add_(theta, [comps[i].to(ct) for i in idx])
        if weight_decay != 0:  # θ/D is recomputed in phase 3 rather than kept across the reduction
            decay_sums.append(_sums_of_squares(torch._foreach_div(theta, denom)))
        else:
            decay_sums.append(torch.zeros(len(idx), dtype=torch.float64, device=device))
        thetas.append(theta)
        denoms.append(denom)
        nat_grads.append(nat_grad)
    nat_sums, decay_sums = reduced(torch.stack([torch.cat(nat_sums), torch.cat(decay_sums)]))

    # Phase 3: the clipped natural gradient into m, the clipped weight decay, the step.
    nat_clip_groups = split(clip_divisor(rms_from_sumsq(nat_sums, numels_t), clip))
    decay_clip_groups = split(clip_divisor(rms_from_sumsq(decay_sums, numels_t), clip))
    for gi, (idx, ct, theta, denom, nat_grad) in enumerate(zip(groups, cts, thetas, denoms, nat_grads)):
        # m <- β1 m + (1 - β1) clip(g / D)
        torch._foreach_div_(nat_grad, nat_clip_groups[gi])
        m_state = [exp_avgs[i] for i in idx]
        m = m_state if ct == m_state[0].dtype else [t.to(ct) for t in m_state]
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, nat_grad, alpha=1 - beta1)
        if m is not m_state:
            store(m_state, m, gi, KIND_EXP_AVG)

        # u = m + λ clip(θ / D)
        updates = m
        if weight_decay != 0:
            updates = torch._foreach_div(theta, denom)
            torch._foreach_div_(updates, decay_clip_groups[gi])
            torch._foreach_mul_(updates, weight_decay)
            torch._foreach_add_(updates, m)

        # θ <- θ - η u
        param = [params[i] for i in idx]
        if param[0].dtype == ct and modes[gi] == "nearest":  # then theta holds the params themselves
            torch._foreach_add_(param, updates, alpha=-lr)
        elif modes[gi] == "kahan":
            theta_new = torch._foreach_add(theta, updates, alpha=-lr)
            stored = [t.to(param[0].dtype) for t in theta_new]  # to nearest; the residual is kept for next step
            torch._foreach_copy_([comps[i] for i in idx], torch._foreach_sub(theta_new, [t.to(ct) for t in stored]))
            torch._foreach_copy_(param, stored)
        elif modes[gi] == "stochastic":
            store(param, torch._foreach_add(theta, updates, alpha=-lr), gi, KIND_PARAM)
        else:
            torch._foreach_copy_(param, torch._foreach_add(theta, updates, alpha=-lr))
        # free this group's temporaries before the next group's update
        nat_grads[gi] = denoms[gi] = thetas[gi] = None
