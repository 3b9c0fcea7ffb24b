"""The small shared pieces of FAdam's math, one definition each.

Every implementation (the for-loop reference, the ``torch._foreach_*`` path and the fused kernels' launchers)
calls these functions, so a formula lives in exactly one place. All of them are sync-free tensor code: they take
and return tensors (0-d, or 1-D stacks of per-tensor scalars) and never read a value back to the host, which keeps
``torch.compile``, CUDA graphs and DTensor (FSDP2) working.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def resolve_state_dtype(param_dtype: torch.dtype, state_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of ``exp_avg``/``fisher``: ``state_dtype`` if set, else float32 for 16-bit params, else the param's.

    16-bit params get float32 state by default: a 16-bit Fisher rounds away most of the (1 − β̂2)·g² increments.
    """
    if state_dtype is not None:
        return state_dtype
    if param_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return param_dtype


def fisher_beta(beta2: float, step: Tensor) -> Tensor:
    r"""The bias-corrected β2 of the Fisher EMA, :math:`\hat\beta_2 = \beta_2 (1-\beta_2^{t-1}) / (1-\beta_2^t)`.

    ``step`` holds the already incremented step count(s) ``t``: a 0-d tensor or a 1-D stack of per-tensor steps.
    The result is float64 (computed in float64 so that every path sees the same value) and exactly 0 at t = 1,
    because ``β2 ** 0`` is exactly 1: the first Fisher estimate is then ``g²`` whatever the initial state.
    """
    t = step.to(torch.float64)
    pow_t_minus_1 = torch.pow(beta2, t - 1)
    return beta2 * (1 - pow_t_minus_1) / (1 - pow_t_minus_1 * beta2)


def adaptive_eps(eps: float, rms_grad: Tensor) -> Tensor:
    r"""The adaptive epsilon :math:`\hat\epsilon = \epsilon \cdot \min(1, \mathrm{RMS}(g))`, and ε when RMS(g) = 0.

    The guard keeps an all-zero gradient tensor finite (public ports give 0/0 = NaN there); replacing ``min`` by
    ``max``, as one port did, would silently remove the scale adaptivity, so it is not done here.
    """
    return torch.where(rms_grad > 0, rms_grad.clamp_max(1.0) * eps, torch.full_like(rms_grad, eps))


def clip_divisor(rms: Tensor, clip: float) -> Tensor:
    r"""The RMS-clip divisor :math:`\max(1, \mathrm{RMS}(x) / c)` of the paper (and Adafactor).

    Dividing ``x`` by it leaves ``x`` alone while RMS(x) <= c and scales it to RMS exactly c above. (The public
    ports divide by ``max(1, RMS) / c``, which equals this only at c = 1 and amplifies updates for c > 1.)
    """
    return (rms / clip).clamp_min(1.0)


def rms_from_sumsq(sumsq: Tensor, numel: int | Tensor) -> Tensor:
    """RMS from a sum of squares over ``numel`` elements; 0 for an empty tensor (never 0/0).

    ``numel`` is the size of the whole logical tensor (``DTensor.numel()`` is global; a shard's caller passes the
    logical size), so a sum that was reduced over shards gives the same RMS as the unsharded tensor. It may be a
    tensor of sizes, elementwise with a stacked ``sumsq``.
    """
    if isinstance(numel, Tensor):
        return (sumsq / numel.clamp_min(1)).sqrt()
    return (sumsq / max(numel, 1)).sqrt()


def sumsq(x: Tensor) -> Tensor:
    """Σx² over all elements of ``x``, accumulated in float64 (0-d float64 tensor).

    ``x`` is cast to float64 *before* squaring, so neither overflow (|x| > 1.8e19 in fp32) nor underflow
    (|x| < 1e-19) can happen in a lower-precision dtype: fp32 state then gives the RMS that float64 gives.
    """
    return x.to(torch.float64).square().sum()


def compute_dtype(state_dtype: torch.dtype) -> torch.dtype:
    """The dtype the elementwise math runs in: the state dtype, but at least float32.

    16-bit state (``state_dtype=torch.bfloat16``/``float16``) is only a storage format: m and f are loaded into
    float32, updated there and rounded once when stored, as the fused kernels do. Per-tensor scalars (β̂2, 1−β̂2,
    ε̂, the clip divisors) are float64 and enter the math as float32 at the least, never rounded to 16 bits (a
    bf16 β̂2 rounds to 1.0 from t ≈ 850 on and freezes the Fisher).
    """
    return torch.promote_types(state_dtype, torch.float32)


def rms_from_norm(norm: Tensor, numel: int) -> Tensor:
    """RMS from an L2 norm over ``numel`` elements (``norm / sqrt(numel)``); 0 for an empty tensor."""
    return norm / math.sqrt(max(numel, 1))


def rms(x: Tensor) -> Tensor:
    """RMS over all elements of one (whole, possibly sharded) tensor, as a 0-d tensor."""
    return rms_from_sumsq(x.square().sum(), x.numel())


def group_hyperparameters(group: dict) -> dict:
    """The scalar hyperparameters of a param group as the functional API takes them (``betas`` split in two)."""
    beta1, beta2 = group["betas"]
    return dict(
        lr=group["lr"],
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        clip=group["clip"],
        p=group["p"],
        maximize=group["maximize"],
    )
