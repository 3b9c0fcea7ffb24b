"""The multi-tensor FAdam step on ``torch._foreach_*`` ops, grouped by device and dtype.

The same math as the reference, list-at-a-time: each elementwise line is one multi-tensor op per (device, dtype)
group, and the per-tensor reductions come from ``torch._foreach_norm``. It is sync-free and DTensor-safe:
``_foreach_norm`` of a sharded DTensor is reduced over the shards and ``numel()`` is the global size, so every RMS
is over the whole logical tensor (FSDP2 gives the same update as one process).

Per-tensor scalars (β̂2, ε̂, the two clip divisors) are computed on one stacked vector for plain tensors, and one
0-d tensor at a time for DTensors (whose scalars cannot be stacked across tensors of different meshes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from ._math import adaptive_eps, clip_divisor, fisher_beta, rms_from_norm


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _per_tensor(fn: Callable[..., Tensor], *lists: list[Tensor]) -> list[Tensor]:
    """Apply a scalar formula to per-tensor 0-d tensors: stacked for plain tensors, one by one for DTensors."""
    if any(_is_dtensor(t) for t in lists[0]):
        return [fn(*args) for args in zip(*lists)]
    return list(fn(*(torch.stack(lst) for lst in lists)).unbind(0))


def _multi_tensor_fadam(
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
    if not params:
        return
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, fishers, state_steps])
    for lists, _ in grouped.values():
        # DTensors and plain tensors cannot meet in one foreach op ("got mixed torch.Tensor and DTensor"): FSDP2's
        # ignored params, or a root module left without fully_shard, put both in one group. Split them.
        kinds = [_is_dtensor(t) for t in lists[0]]
        for kind in sorted(set(kinds)):
            dev_params, dev_grads, dev_exp_avgs, dev_fishers, dev_steps = (
                [t for t, k in zip(lst, kinds) if k == kind] for lst in lists
            )
            _multi_tensor_fadam_group(
                dev_params,
                dev_grads,
                dev_exp_avgs,
                dev_fishers,
                dev_steps,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                weight_decay=weight_decay,
                clip=clip,
                p=p,
                maximize=maximize,
            )


def _multi_tensor_fadam_group(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    fishers: list[Tensor],
    steps: list[Tensor],
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
    state_dtype = fishers[0].dtype
    if maximize:
        grads = torch._foreach_neg(grads)
    if grads[0].dtype != state_dtype:
        grads = [g.to(state_dtype) for g in grads]
    upcast = params[0].dtype != state_dtype
    thetas = [t.to(state_dtype) for t in params] if upcast else params
    numels = [g.numel() for g in grads]

    torch._foreach_add_(steps, 1)
    beta2_hats = _per_tensor(lambda s: fisher_beta(beta2, s).to(state_dtype), steps)
    one_minus_beta2_hats = _per_tensor(lambda b: 1 - b, beta2_hats)

    # f <- β̂2 f + (1 - β̂2) g²
    torch._foreach_mul_(fishers, beta2_hats)
    grad_sq = torch._foreach_mul(grads, grads)
    torch._foreach_mul_(grad_sq, one_minus_beta2_hats)
    torch._foreach_add_(fishers, grad_sq)
    del grad_sq

    # D = f^p + ε̂, with ε̂ = ε min(1, RMS(g))
    grad_rms = [rms_from_norm(n, k) for n, k in zip(torch._foreach_norm(grads), numels)]
    eps_hats = _per_tensor(lambda r: adaptive_eps(eps, r), grad_rms)
    denoms = torch._foreach_sqrt(fishers) if p == 0.5 else torch._foreach_pow(fishers, p)
    torch._foreach_add_(denoms, eps_hats)

    # m <- β1 m + (1 - β1) clip(g / D)
    nat_grads = torch._foreach_div(grads, denoms)
    nat_rms = [rms_from_norm(n, k) for n, k in zip(torch._foreach_norm(nat_grads), numels)]
    torch._foreach_div_(nat_grads, _per_tensor(lambda r: clip_divisor(r, clip), nat_rms))
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, nat_grads, alpha=1 - beta1)
    del nat_grads

    # u = m + λ clip(θ / D)
    updates = exp_avgs
    if weight_decay != 0:
        updates = torch._foreach_div(thetas, denoms)
        decay_rms = [rms_from_norm(n, k) for n, k in zip(torch._foreach_norm(updates), numels)]
        torch._foreach_div_(updates, _per_tensor(lambda r: clip_divisor(r, clip), decay_rms))
        torch._foreach_mul_(updates, weight_decay)
        torch._foreach_add_(updates, exp_avgs)
    del denoms

    # θ <- θ - η u
    if upcast:
        new_params = torch._foreach_add(thetas, updates, alpha=-lr)
        if any(_is_dtensor(t) for t in params):
            # DTensor registers no sharding strategy for aten._foreach_copy_ (torch 2.13); copy_ is local, no comms.
            for param, new_param in zip(params, new_params):
                param.copy_(new_param)
        else:
            torch._foreach_copy_(params, new_params)
    else:
        torch._foreach_add_(params, updates, alpha=-lr)
