r"""How a step's float32 results are stored into 16-bit tensors: the rounding of params and of 16-bit state.

Every implementation computes the new θ, m and f in float32 (at least) and then stores them. Into a float32 tensor
that store is exact; into a bfloat16 or float16 tensor it rounds, and round-to-nearest loses every update smaller
than half a unit in the last place (ulp) of the stored value. At fine-tuning learning rates that is most of them: a
bf16 weight of magnitude 0.05 has an ulp of 2.4e-4, against an update of lr·|m + λw| ≈ 2e-5·1 = 2e-5. The run then
does not learn, silently. So the store is a choice, ``param_rounding``, made per param group:

``"nearest"``
    Round to nearest even (``tensor.copy_``): what plain PyTorch does. Updates below half an ulp are lost.
``"stochastic"``
    Round up or down at random, up with probability equal to the distance to the lower neighbour in ulps: the
    stored value is unbiased (its expectation is the exact value), so small updates survive on average. No extra
    memory. The random bits come from the counter-based hash below: reproducible, and a resumed run draws the
    same bits.
``"kahan"``
    Keep what rounding dropped in a compensation buffer ``param_comp`` of the param's dtype (2 bytes per
    parameter, in the optimizer state): the step works on θ + c (in float32), stores θ' = round(θ + c − ηu) to
    nearest and c' = round(θ + c − ηu − θ'), so the next step adds it back. θ + c carries about 16 significant
    bits for bf16, and the state dict keeps c, so a resume is exact.
``"auto"`` (default)
    ``"nearest"`` for float32/float64 params, where nothing is rounded (the math runs in their dtype). For
    bfloat16/float16 params the class chooses: :class:`hf_fadam.FAdam` ``"kahan"`` (:data:`AUTO_16BIT`, the meaning
    of ``"auto"`` here and in :func:`hf_fadam.functional.fadam`), :class:`hf_fadam.FAdam8bit` ``"stochastic"``
    (:data:`AUTO_16BIT_8BIT`). Why: see the constants.

16-bit optimizer state (``state_dtype`` bfloat16 or float16) is always stored with stochastic rounding: with β2 =
0.999 the Fisher's per-step change (1 − β̂2)·(g² − f) is far below half an ulp of f, so a round-to-nearest Fisher
stalls (at 0.25 where the EMA is 0.665 in the jump test); stochastic rounding keeps it unbiased.

The random bits
---------------
Each stored tensor draws 16 bits per element from :func:`hf_fadam._quant.sr_bits` with its own seed, the scheme of
FAdam8bit's Fisher codes (one ``lowbias32`` per two elements): ``seed = lowbias32(lowbias32(stream ^ lowbias32(t))
^ kind)``, ``t`` the tensor's step count after the step, ``stream`` the parameter's position in the optimizer (over
all groups) and ``kind`` one constant per stored quantity (:data:`KIND_PARAM`, :data:`KIND_EXP_AVG`,
:data:`KIND_FISHER`), so the param's, m's and f's bits are independent of each other and of FAdam8bit's f codes
(whose seed is the inner hash itself). The element index is the index in the (local) tensor.

Stochastic rounding to bfloat16 (8 mantissa bits) adds the 16 random bits ``r`` to the float32 bit pattern and
truncates the low 16 bits: it rounds up with probability ``low16 / 2**16``, exactly the distance to the lower
neighbour in ulps (carries into the exponent are the next binade's first value, as they should be). To float16 (10
mantissa bits) the same with 13 bits (``r >> 3``) in float16's normal range; in its subnormal range (|x| < 2**-14,
a uniform grid of step 2**-24) ``k = floor(|x|·2**24)`` rounds up to ``k + 1`` when ``r < frac(|x|·2**24)·2**16``.
NaN and ±inf are stored as they are, and a finite value within the dtype's range never rounds up to inf. Each kernel reproduces these bits exactly (the tests compare codes and values).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._quant import lowbias32, sr_bits


__all__ = [
    "AUTO_16BIT",
    "AUTO_16BIT_8BIT",
    "KIND_EXP_AVG",
    "KIND_FISHER",
    "KIND_PARAM",
    "PARAM_ROUNDINGS",
    "check_param_rounding",
    "resolve_param_rounding",
    "rounding_seeds",
    "round_stochastic",
]

PARAM_ROUNDINGS = ("auto", "nearest", "stochastic", "kahan")
SIXTEEN_BIT = (torch.bfloat16, torch.float16)

#: What ``"auto"`` means for FAdam's bfloat16/float16 params: Kahan compensation. Measured (docs/precision.md): bf16
#: params follow an fp64 master copy to 0.8 % of the movement over 3000 steps, where stochastic rounding's zero-mean
#: noise is 15 %; it is deterministic (no random bits), so sharded runs (FSDP2, TP) give the one-process result bit for
#: bit; and FAdam already keeps 8 bytes of float32 state per parameter, so 2 more buy accuracy cheaply.
AUTO_16BIT = "kahan"
#: What ``"auto"`` means for FAdam8bit's bfloat16/float16 params: stochastic rounding. FAdam8bit is chosen for
#: memory, and stochastic rounding costs none (2 bytes of param + 2.04 of state per parameter), with the same loss
#: reduction as an fp32 master copy in the real-checkpoint measurements (docs/precision.md).
AUTO_16BIT_8BIT = "stochastic"

KIND_PARAM = 0x2545F491
KIND_EXP_AVG = 0x5851F42D
KIND_FISHER = 0x4F1BBCDD

_M32 = 0xFFFFFFFF


def check_param_rounding(value: Any) -> str:
    """``value`` if it is one of :data:`PARAM_ROUNDINGS`, else ``ValueError`` naming the argument and the value."""
    if not isinstance(value, str) or value not in PARAM_ROUNDINGS:
        raise ValueError(f"Invalid param_rounding: {value!r}; it must be one of {list(PARAM_ROUNDINGS)}")
    return value


def resolve_param_rounding(mode: str, param_dtype: torch.dtype) -> str:
    """The store that ``mode`` means for params of ``param_dtype``: ``"nearest"``, ``"stochastic"`` or ``"kahan"``.

    Only 16-bit params are rounded: float32/float64 params always get ``"nearest"`` (an exact store)."""
    if param_dtype not in SIXTEEN_BIT:
        return "nearest"
    return AUTO_16BIT if mode == "auto" else mode


def rounding_seeds(streams: Tensor | Sequence[int] | None, steps: Tensor, kind: int) -> Tensor:
    """Per-tensor seeds (int64 holding uint32) of one stored quantity: ``lowbias32(lowbias32(stream ^
    lowbias32(t)) ^ kind)``. ``steps``: the tensors' step counts after the step, stacked; ``streams``: their
    positions in the optimizer (None: ``0 .. n-1``)."""
    t = steps.to(torch.int64)
    if streams is None:
        s = torch.arange(t.numel(), dtype=torch.int64, device=t.device)
    else:
        s = torch.as_tensor(streams, dtype=torch.int64).to(t.device)
    return lowbias32(lowbias32(s ^ lowbias32(t)) ^ kind)


def round_stochastic(x: Tensor, dtype: torch.dtype, seed: Tensor | int) -> Tensor:
    """``x`` (float32) rounded stochastically to ``dtype`` (bfloat16 or float16) with the bits of ``seed``; a
    ``dtype`` of 32 bits or more is a plain cast. The result has ``x``'s shape and ``dtype``."""
    if dtype not in SIXTEEN_BIT:
        return x.to(dtype)
    x = x.to(torch.float32)
    r = (sr_bits(x.numel(), seed, x.device) >> 16).view(x.shape)  # 16 random bits, 0 .. 65535
    bits = x.view(torch.int32).to(torch.int64) & _M32
    if dtype == torch.bfloat16:
        y = (bits + r) & 0xFFFF0000
        out = _as_float(y)
    else:
        y = (bits + (r >> 3)) & 0xFFFFE000
        normal = _as_float(y)
        a = x.abs() * 2.0**24  # float16's subnormal grid as integers (exact: a power-of-two scale)
        k = a.floor()
        up = r.to(torch.float32) < (a - k) * 65536.0
        sub = torch.copysign((k + up.to(torch.float32)) * 2.0**-24, x)
        out = torch.where(x.abs() < 2.0**-14, sub, normal)
    fmax = torch.finfo(dtype).max  # a finite value within range never rounds up to inf
    out = torch.where((out.abs() > fmax) & (x.abs() <= fmax), torch.copysign(torch.tensor(fmax), x), out)
    out = torch.where(torch.isfinite(x), out, x)
    return out.to(dtype)


def _as_float(y: Tensor) -> Tensor:
    """int64 tensor of uint32 bit patterns -> float32 values."""
    return torch.where(y >= 2**31, y - 2**32, y).to(torch.int32).view(torch.float32)
