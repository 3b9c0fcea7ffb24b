r"""Multi-tensor Triton kernels for one FAdam step (the ``fused=True`` path on CUDA).

This is the only module of the package that imports triton, inside a guard (``import hf_fadam`` does not import
this module; ``functional.py`` imports it only on the fused path), and the kernels compile on their first launch.
Under ``TRITON_INTERPRET=1`` (set before triton is imported) the same kernels run in Triton's interpreter on CPU
tensors; that is how the test suite reaches them without a GPU.

Design
------
One call handles every tensor of the lists with three kernel launches per dtype combination, whatever the number
of tensors, and never reads a value back to the host:

* **Chunk table.** Each non-empty tensor is cut into chunks of ``CHUNK`` elements; one program handles one chunk.
  The table ``[numel | logical numel | sums column]`` per tensor and ``(tensor, start)`` per chunk lives in one
  int64 device tensor that depends only on the shapes, built once and cached.
* **Address table.** The ``data_ptr()`` of every param, grad, exp_avg, fisher and step tensor goes into an int64
  device tensor; a program loads its tensor's addresses and casts them with ``.to(tl.pointer_type(dtype))``. This
  works compiled and under ``TRITON_INTERPRET=1`` (on CPU tensors the addresses are host addresses, which the
  interpreter dereferences directly). When every address is 16-byte aligned, the kernels assert it
  (``tl.multiple_of``) and the chunk's full blocks are loaded unmasked, which is what lets Triton emit 16-byte
  vector loads through run-time pointers.
* **A cached plan.** Per call the host builds one key, the tuple of every tensor's address plus the params'
  sizes and the param and fisher dtypes (C-level maps, no Python loop over the tensors), and looks up the *plan*:
  the dtype groups with their chunk and address tables (copied to the device from pinned memory with
  ``non_blocking=True`` on a miss, so no sync). Grads that moved reuse the cached grouping and get new address
  tables only. The float64 hyperparameter vector and the sums buffer are cached too. A step of an unchanged model
  therefore costs one dictionary look-up, a ``zero_`` of the sums and the launches.
* **Per-tensor reductions without a host sync.** Each program reduces its chunk to one partial sum and
  ``tl.atomic_add``\ s it into column ``i`` of a zeroed float64 buffer ``sums[3, n]``; the next launch reads the
  finished sums (stream order is the barrier). Squares and sums are float64 from the element on: (1e-20)²
  underflows fp32 and (1e28)² overflows it, and a tensor of 2**31 elements adds ~10**5 partials. The float atomics
  make the summation order, and so the last bits of an RMS, vary from run to run: not bitwise deterministic.
* **The reduction hook.** Between the passes an optional ``reduce`` is called on the ``(1, n)`` view of row 0 and
  then on the ``(2, n)`` view of rows 1-2, in place (an all-reduce over the shards of each tensor): twice per call
  however many dtype groups there are (phase-major: pass A of every group, reduce, pass B of every group, reduce,
  pass C of every group). Every RMS divides by the tensor's *logical* numel, a column of the chunk table.
* **Three passes**, each recomputing what it needs instead of storing it:

  A. ``sum(g²)`` per tensor (g unscaled by ``grad_scale``).
  B. ``f_new = β̂2·f + (1−β̂2)·g²`` recomputed in registers (not stored), ``D = f_new^p + ε̂``,
     ``sum((g/D)²)`` and, only when ``weight_decay != 0``, ``sum((θ/D)²)``.
  C. the update: ``f ← f_new``, ``m ← β1·m + (1−β1)·ḡ/max(1, RMS(ḡ)/c)``,
     ``θ ← θ − η·(m + λ·w/max(1, RMS(w)/c))``, with ``w = θ/D``.

* **Per-tensor scalars in float64.** Each program computes its tensor's β̂2 and 1 − β̂2 from the step tensor
  (:func:`hf_fadam._math.fisher_beta` transcribed: ``β2·(1−β2^(t−1))/(1−β2^t)``, ``pow`` in float64), ε̂ and the
  two clip divisors (``adaptive_eps``, ``clip_divisor``, ``rms_from_sumsq`` of :mod:`hf_fadam._math`) in float64
  from the float64 sums and a float64 hyperparameter vector, and rounds them to the compute dtype only at the end.
  Never in the state dtype: a bf16 β̂2 rounds to 1 from t ≈ 850 on and would freeze the Fisher.
* **Non-finite gradients** propagate as IEEE arithmetic does in the for-loop reference: a NaN or ±inf element makes
  Σ(g/D)² NaN, and the clip divisor ``max(1, r)`` is written as ``r <= 1 ? 1 : r`` so that the NaN reaches every
  element of the tensor (compiled ``tl.maximum`` would drop it). ``found_inf`` (GradScaler) still skips the step.
* ``p == 0.5`` uses a correctly rounded square root, ``p == 1`` the identity, any other ``p`` ``libdevice.pow``
  (an exp2/log2 in float64 under the interpreter).
* AMP: ``grad_scale`` divides g inside every pass (the grads are not modified); when ``found_inf != 0`` every
  program skips its chunk, so nothing is read or written (the caller rolls the steps back).
* 64-bit offsets throughout (chunk starts and numels are int64), so a tensor may exceed 2**31 elements.
* **Stores** (:mod:`hf_fadam._rounding`): 16-bit m and f are stored with stochastic rounding (``_round_sr``, bit for
  bit ``round_stochastic``); a bf16/fp16 param as ``param_rounding`` resolves for its dtype (a launch constant per
  dtype group): to nearest, stochastically, or Kahan-compensated (θ = param + comp in passes B and C, θ' stored to
  nearest and the residual to nearest in the compensation buffer, whose addresses are a sixth address row). The
  seeds are computed per program from the tensor's step count and its stream (a column of the chunk table, part of
  the plan's key), so no extra launch or host work; the element index is the index in the tensor, so a
  non-contiguous tensor that rounds stochastically runs on a contiguous copy. Kahan adds 2 B read in B (with
  λ ≠ 0) and 2 B read + 2 B write in C per parameter to the table below.
* Dtypes: params, grads, exp_avgs and fishers each fp32, bf16, fp16 or fp64, in any combination
  (:func:`is_supported` is True for every pair); the element math runs in fp32, or fp64 when any of the four is
  fp64 (then the float hyperparameters come from the float64 vector, since Triton passes Python floats as fp32).

Bytes per parameter and step (HBM traffic, compulsory reads + writes; AdamW fused: 28 B fp32)
-------------------------------------------------------------------------------------------
============================  ==========================  ===========================
pass                          fp32 params, fp32 state     bf16/fp16 params, fp32 state
============================  ==========================  ===========================
A  read g                     4                           2
B  read g, f, θ               12 (8 when λ = 0)           8 (6 when λ = 0)
C  read g, f, m, θ; write     16 + 12                     12 + 10
   f, m, θ
total                         **44 B** (40 B when λ = 0)  **32 B** (30 B when λ = 0)
vs AdamW fused                1.57x (1.43x)               1.45x vs AdamW's 22 B
============================  ==========================  ===========================

44 B is the floor of an exact FAdam (three dependent reductions over the step's data: RMS(g), then RMS(ḡ) and
RMS(w), then the update), so this design is at the ideal; the per-call metadata (a few int64 per tensor and per
chunk) is negligible. The time above the traffic floor is host work: per call one plan look-up, one ``zero_`` of
the sums and 3 Triton launches per dtype group.
"""

from __future__ import annotations

import array
import contextlib
import functools
import importlib.util
import itertools
import math
import operator
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._rounding import (
    KIND_EXP_AVG,
    KIND_FISHER,
    KIND_PARAM,
    SIXTEEN_BIT,
    check_param_rounding,
    resolve_param_rounding,
)


# Whether this kernel stores with hf_fadam._rounding's rules (param_rounding, stochastic 16-bit state).
SUPPORTS_ROUNDING = True

__all__ = ["fadam_triton_", "is_available", "is_supported", "unavailable_reason"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def is_available() -> bool:
    """Whether :func:`fadam_triton_` can run here: triton importable, and CUDA present or TRITON_INTERPRET=1."""
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    """Why :func:`is_available` is False, naming what is really missing; None when it is True."""
    if triton is None:
        missing = getattr(_IMPORT_ERROR, "name", None)
        if missing and missing != "triton" and not missing.startswith("triton."):
            what = "Triton's interpreter (TRITON_INTERPRET=1)" if _interpreting() else "Triton"
            return (
                f"triton is installed but importing it failed because {missing!r} is not importable ({_IMPORT_ERROR}); "
                f"{what} needs it: pip install {missing.split('.')[0]}"
            )
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'hf-fadam[triton]')"
        return f"triton is installed but importing it failed: {_IMPORT_ERROR!r}"
    if not (_interpreting() or torch.cuda.is_available()):
        return "no CUDA device is available (and TRITON_INTERPRET is not set)"
    return None


def is_supported(param_dtype: torch.dtype, state_dtype: torch.dtype) -> bool:
    """Whether the kernels handle this (param dtype, state dtype) pair: every pair of fp32, bf16, fp16 and fp64
    (the element math runs in fp32, or fp64 when either is fp64; the per-tensor scalars always in fp64)."""
    return param_dtype in _DTYPES and state_dtype in _DTYPES


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    """Chunk size (elements per program) and, per pass, the block size and warps. CHUNK is a multiple of each
    block. The interpreter runs one numpy op per Triton op and per program, so it wants few, large programs; the
    small interpreter CHUNK still gives the tests several chunks and several blocks per chunk."""

    chunk: int
    block_a: int
    block_b: int
    block_c: int
    warps_a: int = 4
    warps_b: int = 4
    warps_c: int = 4


# benchmarks/gpu_step.py sweeps these. On an H200 (triton 3.6) five configurations (chunks of 8K-64K elements,
# blocks of 1K-4K, 4 or 8 warps) timed within 4% of each other on the 50.9M-param set; this one was fastest.
# Each pass then runs at ~85-90% of the device's copy bandwidth (docs/triton_kernel.md).
_GPU_CONFIG = _Config(chunk=16384, block_a=2048, block_b=1024, block_c=1024, warps_a=4, warps_b=4, warps_c=4)
_INTERPRET_CONFIG = _Config(chunk=1024, block_a=512, block_b=256, block_c=256, warps_a=1, warps_b=1, warps_c=1)


def _config() -> _Config:
    return _INTERPRET_CONFIG if _interpreting() else _GPU_CONFIG


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Kernels:
    pass_a: object
    pass_b: object
    pass_c: object
    dtypes: dict
    interpreting: bool


# Triton is imported when this module is imported (functional.py imports it only on the fused path), and the
# kernels are defined at module level: the interpreter re-executes each kernel's source against the module's
# globals, so kernels and their helpers cannot live in a closure.
_IMPORT_ERROR: BaseException | None = None
try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only where triton (or numpy, when interpreting) is missing
    triton = None
    _IMPORT_ERROR = exc

# Rows of the float64 hyperparameter vector on the device (Triton passes Python floats as fp32, so every value
# that must stay exact - β2 for β̂2, eps and clip for the per-tensor scalars, and all of them when the math runs
# in fp64 - comes from here).
_S_LR, _S_BETA1, _S_OMB1, _S_EPS, _S_WD, _S_CLIP, _S_P, _S_BETA2, _S_LOG2_BETA2 = range(9)

if triton is not None:
    try:
        from triton.language.extra import libdevice
    except ImportError:  # pragma: no cover
        libdevice = None

    @triton.jit
    def _load(ptr, mask, DT: tl.constexpr):
        if mask is None:
            return tl.load(ptr).to(DT)
        else:
            return tl.load(ptr, mask=mask, other=0.0).to(DT)

    @triton.jit
    def _bf16_rne(x):
        # fp32 -> bf16 rounded to nearest even, in integer ops. The interpreter's own fp32 -> bf16 cast truncates
        # (triton 3.6-3.9), which would bias every bf16 param update towards zero; compiled code uses cvt.rn.
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _rne(value, DT: tl.constexpr, INTERPRET: tl.constexpr):
        # value rounded to nearest even into DT; into 16 bits through float32, as torch converts (an fp64 value is
        # rounded twice, like tensor.to(bfloat16) of a float64 tensor)
        if DT == tl.bfloat16:
            if INTERPRET:
                return _bf16_rne(value)
            else:
                return value.to(tl.float32).to(tl.bfloat16)
        elif DT == tl.float16:
            return value.to(tl.float32).to(tl.float16)
        else:
            return value.to(DT)

    @triton.jit
    def _put(ptr, value, mask):
        if mask is None:
            tl.store(ptr, value)
        else:
            tl.store(ptr, value, mask=mask)

    # ---- stochastic rounding (hf_fadam._rounding): the bits of hf_fadam._quant.sr_bits ------------------------

    _KIND_PARAM = tl.constexpr(KIND_PARAM)
    _KIND_EXP_AVG = tl.constexpr(KIND_EXP_AVG)
    _KIND_FISHER = tl.constexpr(KIND_FISHER)

    @triton.jit
    def _lowbias32(x):
        # C. Wellons' lowbias32 on uint32 (wrapping multiplies): hf_fadam._quant.lowbias32
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _sr_bits(i, seed):
        # the rounding bits of element i (uint32; hf_fadam._quant.sr_bits): one lowbias32 per two elements, i and
        # i ^ 16, the high half for the first, the low half for the second, on top of 16 zero bits
        h = _lowbias32((((i >> 5) << 4) | (i & 15)) ^ seed)
        return tl.where((i & 16) == 0, h & 0xFFFF0000, h << 16)

    @triton.jit
    def _rounding_seed(stream, step, KIND: tl.constexpr):
        # hf_fadam._rounding.rounding_seeds of one tensor: lowbias32(lowbias32(stream ^ lowbias32(t)) ^ kind), t the
        # step count after the step (truncated to an integer, mod 2**32) and stream mod 2**32
        t = step.to(tl.int64).to(tl.uint32)
        inner = _lowbias32(stream.to(tl.uint32) ^ _lowbias32(t))
        return _lowbias32(inner ^ KIND)

    @triton.jit
    def _round_sr(x, idx, seed, DT: tl.constexpr):
        # hf_fadam._rounding.round_stochastic of float32 x (element index idx) into DT, bfloat16 or float16, bit for
        # bit: the 16 random bits added below the kept mantissa and truncated (bf16: 16 bits; fp16: 13 bits in its
        # normal range, its subnormal grid 2**-24 rounded up with probability frac below 2**-14); a finite x within
        # range never becomes inf; NaN and inf stay as they are.
        r = _sr_bits(idx.to(tl.uint32), seed.to(tl.uint32)) >> 16
        bits = x.to(tl.uint32, bitcast=True)
        sign = bits & 0x80000000
        ax = tl.abs(x)
        if DT == tl.bfloat16:
            out = ((bits + r) & 0xFFFF0000).to(tl.float32, bitcast=True)
            fmax = 3.3895313892515355e38
        else:
            normal = ((bits + (r >> 3)) & 0xFFFFE000).to(tl.float32, bitcast=True)
            a = ax * 16777216.0  # float16's subnormal grid as integers (exact)
            k = tl.floor(a)
            up = r.to(tl.float32) < (a - k) * 65536.0
            sub = (k + tl.where(up, 1.0, 0.0)) * 5.9604644775390625e-08
            sub = (sub.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
            out = tl.where(ax < 6.103515625e-05, sub, normal)
            fmax = 65504.0
        out = tl.where((tl.abs(out) > fmax) & (ax <= fmax), tl.where(sign != 0, -fmax, fmax), out)
        finite = ax < float("inf")  # (False for NaN)
        if DT == tl.bfloat16:
            # out is exact in bf16 (its low 16 bits are 0): take its top half; a NaN becomes bf16's quiet NaN
            top = tl.where(finite, out.to(tl.uint32, bitcast=True), bits) >> 16
            top = tl.where(x != x, 0x7FC0, top)
            return top.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return tl.where(finite, out, x).to(tl.float16)  # exact: out is on float16's grid, or beyond its max

    @triton.jit
    def _store_rounded(ptr, value, mask, idx, seed, DT: tl.constexpr, INTERPRET: tl.constexpr):
        # a store of state of dtype DT (hf_fadam._rounding): 16 bits stochastically, wider exactly (or to nearest)
        if DT == tl.bfloat16:
            _put(ptr, _round_sr(value.to(tl.float32), idx, seed, DT), mask)
        elif DT == tl.float16:
            _put(ptr, _round_sr(value.to(tl.float32), idx, seed, DT), mask)
        else:
            _put(ptr, _rne(value, DT, INTERPRET), mask)

    @triton.jit
    def _div(a, b):
        # Correctly rounded, as torch divides (Triton's plain fp32 "/" is a 2-ulp approximation).
        if a.dtype == tl.float32:
            return tl.div_rn(a, b)
        else:
            return a / b

    @triton.jit
    def _sqrt(x):
        if x.dtype == tl.float32:
            return tl.sqrt_rn(x)
        else:
            return tl.sqrt(x)

    @triton.jit
    def _grad(g_ptr, offs, mask, scale, HAS_SCALE: tl.constexpr, CDT: tl.constexpr):
        g = _load(g_ptr + offs, mask, CDT)
        if HAS_SCALE:
            g = _div(g, scale)
        return g

    @triton.jit
    def _power(x, p, P_MODE: tl.constexpr, INTERPRET: tl.constexpr):
        # P_MODE 0: p == 0.5 (sqrt, as torch.pow does), 1: p == 1, 2: any other p > 0. x >= 0.
        if P_MODE == 0:
            return _sqrt(x)
        elif P_MODE == 1:
            return x
        else:
            if INTERPRET:
                # libdevice is not interpreted: exp2/log2 in float64 round like a correctly rounded pow.
                safe = tl.where(x > 0, x, 1.0).to(tl.float64)
                y = tl.exp2(p * tl.log2(safe)).to(x.dtype)
                return tl.where(x > 0, y, 0.0)
            else:
                return libdevice.pow(x, p.to(x.dtype))

    @triton.jit
    def _chunk(
        meta_ptr, addr_ptr, n_tensors, n_chunks, ROW: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr,
        CHUNK: tl.constexpr,
    ):  # fmt: skip
        # meta: [local numel (n) | logical numel (n) | sums column (n) | chunk's tensor (C) | chunk start (C)]
        pid = tl.program_id(0)
        tidx = tl.load(meta_ptr + 3 * n_tensors + pid)
        # Hints go on the op that defines a value (a hint on a helper's argument is dropped): chunk starts are
        # multiples of CHUNK, and the caller checked that every address is 16-byte aligned.
        start = tl.multiple_of(tl.load(meta_ptr + 3 * n_tensors + n_chunks + pid), CHUNK)
        numel = tl.load(meta_ptr + tidx)
        col = tl.load(meta_ptr + 2 * n_tensors + tidx)
        base = tl.load(addr_ptr + ROW * n_tensors + tidx).to(tl.pointer_type(DT))
        if ALIGNED:
            base = tl.multiple_of(base, 16)
        return tidx, col, start, numel, base

    @triton.jit
    def _addr(addr_ptr, n_tensors, tidx, ROW: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr):
        ptr = tl.load(addr_ptr + ROW * n_tensors + tidx).to(tl.pointer_type(DT))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        return ptr

    @triton.jit
    def _extent(start, numel, found_ptr, HAS_FOUND: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        # [start, end) is this program's part of the tensor; n_full blocks of it are loaded unmasked.
        end = tl.minimum(start + CHUNK, numel)
        if HAS_FOUND:
            end = tl.where(tl.load(found_ptr) != 0, start, end)
        n_full = (end - start) // BLOCK
        return start, end, n_full

    @triton.jit
    def _clip_divisor(sumsq, count, clip):
        # _math.clip_divisor(_math.rms_from_sumsq(sumsq, count), clip) = max(1, RMS / clip), in float64. Written
        # as a select on an ordered comparison, not tl.maximum: compiled tl.maximum is max.f32, which returns the
        # other operand for a NaN (the interpreter's np.maximum keeps it). A non-finite gradient must make the
        # whole tensor NaN, as the for-loop reference does.
        q = tl.sqrt(sumsq / count) / clip
        return tl.where(q <= 1.0, 1.0, q)

    @triton.jit
    def _tensor_scalars(
        meta_ptr, addr_ptr, sums_ptr, scalars_ptr, tidx, col, n_tensors, n_cols,
        S_DT: tl.constexpr, CDT: tl.constexpr, CLIP: tl.constexpr, HAS_WD: tl.constexpr, INTERPRET: tl.constexpr,
    ):  # fmt: skip
        # The per-tensor scalars, all in float64 from the float64 sums and hyperparameters, rounded to the compute
        # dtype only at the end: β̂2 and 1 - β̂2 (_math.fisher_beta, from the tensor's step count), ε̂
        # (_math.adaptive_eps: eps * min(1, RMS(g)), eps where RMS(g) == 0) and, when CLIP, the two clip divisors.
        # RMS over the LOGICAL numel (the whole tensor, also when this process holds a shard of it).
        count = tl.maximum(tl.load(meta_ptr + n_tensors + tidx), 1).to(tl.float64)
        beta2 = tl.load(scalars_ptr + 7)
        step_ptr = tl.load(addr_ptr + 4 * n_tensors + tidx).to(tl.pointer_type(S_DT))
        t_minus_1 = tl.load(step_ptr).to(tl.float64) - 1.0
        if INTERPRET:  # libdevice is not interpreted. β2^0 is exactly 1 (β̂2 exactly 0 at t = 1), also for β2 = 0
            pow_t_minus_1 = tl.where(t_minus_1 == 0, 1.0, tl.exp2(t_minus_1 * tl.load(scalars_ptr + 8)))
        else:
            pow_t_minus_1 = libdevice.pow(beta2, t_minus_1)
        beta2_hat = beta2 * (1.0 - pow_t_minus_1) / (1.0 - pow_t_minus_1 * beta2)
        one_minus_beta2_hat = 1.0 - beta2_hat
        eps = tl.load(scalars_ptr + 3)
        rms_g = tl.sqrt(tl.load(sums_ptr + col) / count)
        eps_hat = tl.where(rms_g > 0, tl.minimum(rms_g, 1.0) * eps, eps)
        div_g = 1.0
        div_w = 1.0
        if CLIP:
            clip = tl.load(scalars_ptr + 5)
            div_g = _clip_divisor(tl.load(sums_ptr + n_cols + col), count, clip).to(CDT)
            if HAS_WD:
                div_w = _clip_divisor(tl.load(sums_ptr + 2 * n_cols + col), count, clip).to(CDT)
        return beta2_hat.to(CDT), one_minus_beta2_hat.to(CDT), eps_hat.to(CDT), div_g, div_w

    # ---- pass A: sum(g²) per tensor ------------------------------------------------------------------------

    @triton.jit
    def _pass_a(
        meta_ptr, addr_ptr, sums_ptr, scale_ptr, found_ptr, n_tensors, n_chunks,
        G_DT: tl.constexpr, CDT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr,
        ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        tidx, col, start, numel, g_ptr = _chunk(meta_ptr, addr_ptr, n_tensors, n_chunks, 1, G_DT, ALIGNED, CHUNK)
        start, end, n_full = _extent(start, numel, found_ptr, HAS_FOUND, CHUNK, BLOCK)
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr).to(CDT)
        # Squares and sums in float64: (1e-20)² underflows fp32 and (1e28)² overflows it.
        acc = tl.zeros([BLOCK], tl.float64)
        for j in tl.range(0, n_full):
            offs = start + j * BLOCK + tl.arange(0, BLOCK)
            g = _grad(g_ptr, offs, None, scale, HAS_SCALE, CDT).to(tl.float64)
            acc += g * g
        offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
        mask = offs < end
        g = _grad(g_ptr, offs, mask, scale, HAS_SCALE, CDT).to(tl.float64)
        acc += tl.where(mask, g * g, 0.0)
        tl.atomic_add(sums_ptr + col, tl.sum(acc, axis=0))

    # ---- pass B: sum((g/D)²) and sum((θ/D)²) per tensor, f_new recomputed ---------------------------------

    @triton.jit
    def _denom_block(
        g_ptr, f_ptr, offs, mask, scale, bh, omb, eps_hat, p,
        HAS_SCALE: tl.constexpr, CDT: tl.constexpr, P_MODE: tl.constexpr, INTERPRET: tl.constexpr,
    ):  # fmt: skip
        g = _grad(g_ptr, offs, mask, scale, HAS_SCALE, CDT)
        f_new = _load(f_ptr + offs, mask, CDT) * bh + g * g * omb
        denom = _power(f_new, p, P_MODE, INTERPRET) + eps_hat
        return g, f_new, denom

    @triton.jit
    def _theta(p_ptr, c_ptr, offs, mask, CDT: tl.constexpr, ROUND_MODE: tl.constexpr):
        # the step's θ: the stored param, plus its Kahan compensation (ROUND_MODE 2)
        theta = _load(p_ptr + offs, mask, CDT)
        if ROUND_MODE == 2:
            theta = theta + _load(c_ptr + offs, mask, CDT)
        return theta

    @triton.jit
    def _pass_b(
        meta_ptr, addr_ptr, sums_ptr, scale_ptr, found_ptr, scalars_ptr, n_tensors, n_chunks, n_cols, p,
        G_DT: tl.constexpr, P_DT: tl.constexpr, F_DT: tl.constexpr, S_DT: tl.constexpr, CDT: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr, HAS_WD: tl.constexpr, P_MODE: tl.constexpr,
        ROUND_MODE: tl.constexpr, INTERPRET: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        tidx, col, start, numel, g_ptr = _chunk(meta_ptr, addr_ptr, n_tensors, n_chunks, 1, G_DT, ALIGNED, CHUNK)
        f_ptr = _addr(addr_ptr, n_tensors, tidx, 3, F_DT, ALIGNED)
        p_ptr = _addr(addr_ptr, n_tensors, tidx, 0, P_DT, ALIGNED)
        c_ptr = p_ptr
        if ROUND_MODE == 2:  # kahan: θ = param + its compensation
            c_ptr = _addr(addr_ptr, n_tensors, tidx, 5, P_DT, ALIGNED)
        start, end, n_full = _extent(start, numel, found_ptr, HAS_FOUND, CHUNK, BLOCK)
        if CDT == tl.float64:  # Python floats arrive as fp32 arguments: take the fp64 copy
            p = tl.load(scalars_ptr + 6)
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr).to(CDT)
        bh, omb, eps_hat, _dg, _dw = _tensor_scalars(
            meta_ptr, addr_ptr, sums_ptr, scalars_ptr, tidx, col, n_tensors, n_cols, S_DT, CDT, False, HAS_WD,
            INTERPRET,
        )  # fmt: skip
        acc_g = tl.zeros([BLOCK], tl.float64)
        acc_w = tl.zeros([BLOCK], tl.float64)
        for j in tl.range(0, n_full):
            offs = start + j * BLOCK + tl.arange(0, BLOCK)
            g, f_new, denom = _denom_block(
                g_ptr, f_ptr, offs, None, scale, bh, omb, eps_hat, p, HAS_SCALE, CDT, P_MODE, INTERPRET
            )
            nat = _div(g, denom).to(tl.float64)
            acc_g += nat * nat
            if HAS_WD:
                w = _div(_theta(p_ptr, c_ptr, offs, None, CDT, ROUND_MODE), denom).to(tl.float64)
                acc_w += w * w
        offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
        mask = offs < end
        g, f_new, denom = _denom_block(
            g_ptr, f_ptr, offs, mask, scale, bh, omb, eps_hat, p, HAS_SCALE, CDT, P_MODE, INTERPRET
        )
        nat = _div(g, denom).to(tl.float64)
        acc_g += tl.where(mask, nat * nat, 0.0)
        tl.atomic_add(sums_ptr + n_cols + col, tl.sum(acc_g, axis=0))
        if HAS_WD:
            w = _div(_theta(p_ptr, c_ptr, offs, mask, CDT, ROUND_MODE), denom).to(tl.float64)
            acc_w += tl.where(mask, w * w, 0.0)
            tl.atomic_add(sums_ptr + 2 * n_cols + col, tl.sum(acc_w, axis=0))

    # ---- pass C: the update ------------------------------------------------------------------------------

    @triton.jit
    def _update_block(
        p_ptr, g_ptr, m_ptr, f_ptr, c_ptr, offs, mask, scale, bh, omb, eps_hat, p, div_g, div_w,
        lr, beta1, one_minus_beta1, weight_decay, seed_p, seed_m, seed_f,
        HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, CDT: tl.constexpr,
        P_MODE: tl.constexpr, INTERPRET: tl.constexpr, P_DT: tl.constexpr, M_DT: tl.constexpr, F_DT: tl.constexpr,
        ROUND_MODE: tl.constexpr,
    ):  # fmt: skip
        g, f_new, denom = _denom_block(
            g_ptr, f_ptr, offs, mask, scale, bh, omb, eps_hat, p, HAS_SCALE, CDT, P_MODE, INTERPRET
        )
        if MAXIMIZE:
            g = -g
        _store_rounded(f_ptr + offs, f_new, mask, offs, seed_f, F_DT, INTERPRET)
        nat = _div(_div(g, denom), div_g)
        m = _load(m_ptr + offs, mask, CDT) * beta1 + nat * one_minus_beta1
        _store_rounded(m_ptr + offs, m, mask, offs, seed_m, M_DT, INTERPRET)
        theta = _theta(p_ptr, c_ptr, offs, mask, CDT, ROUND_MODE)
        update = m
        if HAS_WD:
            w = _div(_div(theta, denom), div_w)
            update = m + weight_decay * w
        theta_new = theta - lr * update
        if ROUND_MODE == 1:  # stochastic (a 16-bit param)
            _put(p_ptr + offs, _round_sr(theta_new.to(tl.float32), offs, seed_p, P_DT), mask)
        elif ROUND_MODE == 2:  # kahan: θ' to nearest, what that dropped into the compensation, to nearest
            stored = _rne(theta_new, P_DT, INTERPRET)
            _put(p_ptr + offs, stored, mask)
            _put(c_ptr + offs, _rne(theta_new - stored.to(CDT), P_DT, INTERPRET), mask)
        else:
            _put(p_ptr + offs, _rne(theta_new, P_DT, INTERPRET), mask)

    @triton.jit
    def _pass_c(
        meta_ptr, addr_ptr, sums_ptr, scale_ptr, found_ptr, scalars_ptr, n_tensors, n_chunks, n_cols,
        lr, beta1, one_minus_beta1, weight_decay, p,
        P_DT: tl.constexpr, G_DT: tl.constexpr, M_DT: tl.constexpr, F_DT: tl.constexpr, S_DT: tl.constexpr,
        CDT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr, HAS_WD: tl.constexpr,
        MAXIMIZE: tl.constexpr, P_MODE: tl.constexpr, ROUND_MODE: tl.constexpr, INTERPRET: tl.constexpr,
        ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        tidx, col, start, numel, p_ptr = _chunk(meta_ptr, addr_ptr, n_tensors, n_chunks, 0, P_DT, ALIGNED, CHUNK)
        g_ptr = _addr(addr_ptr, n_tensors, tidx, 1, G_DT, ALIGNED)
        m_ptr = _addr(addr_ptr, n_tensors, tidx, 2, M_DT, ALIGNED)
        f_ptr = _addr(addr_ptr, n_tensors, tidx, 3, F_DT, ALIGNED)
        c_ptr = p_ptr
        if ROUND_MODE == 2:
            c_ptr = _addr(addr_ptr, n_tensors, tidx, 5, P_DT, ALIGNED)
        # The seeds of this tensor's rounding bits (hf_fadam._rounding.rounding_seeds): its stream (a meta column)
        # and its step count after the step. A few scalar integer ops per program; unused where nothing rounds.
        stream = tl.load(meta_ptr + 3 * n_tensors + 2 * n_chunks + tidx)
        step = tl.load(tl.load(addr_ptr + 4 * n_tensors + tidx).to(tl.pointer_type(S_DT)))
        seed_p = _rounding_seed(stream, step, _KIND_PARAM)
        seed_m = _rounding_seed(stream, step, _KIND_EXP_AVG)
        seed_f = _rounding_seed(stream, step, _KIND_FISHER)
        start, end, n_full = _extent(start, numel, found_ptr, HAS_FOUND, CHUNK, BLOCK)
        if CDT == tl.float64:  # Python floats arrive as fp32 arguments: take the fp64 copies
            lr = tl.load(scalars_ptr + 0)
            beta1 = tl.load(scalars_ptr + 1)
            one_minus_beta1 = tl.load(scalars_ptr + 2)
            weight_decay = tl.load(scalars_ptr + 4)
            p = tl.load(scalars_ptr + 6)
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr).to(CDT)
        bh, omb, eps_hat, div_g, div_w = _tensor_scalars(
            meta_ptr, addr_ptr, sums_ptr, scalars_ptr, tidx, col, n_tensors, n_cols, S_DT, CDT, True, HAS_WD,
            INTERPRET,
        )  # fmt: skip
        for j in tl.range(0, n_full):
            offs = start + j * BLOCK + tl.arange(0, BLOCK)
            _update_block(
                p_ptr, g_ptr, m_ptr, f_ptr, c_ptr, offs, None, scale, bh, omb, eps_hat, p, div_g, div_w,
                lr, beta1, one_minus_beta1, weight_decay, seed_p, seed_m, seed_f, HAS_SCALE, MAXIMIZE, HAS_WD, CDT,
                P_MODE, INTERPRET, P_DT, M_DT, F_DT, ROUND_MODE,
            )  # fmt: skip
        offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
        mask = offs < end
        _update_block(
            p_ptr, g_ptr, m_ptr, f_ptr, c_ptr, offs, mask, scale, bh, omb, eps_hat, p, div_g, div_w,
            lr, beta1, one_minus_beta1, weight_decay, seed_p, seed_m, seed_f, HAS_SCALE, MAXIMIZE, HAS_WD, CDT,
            P_MODE, INTERPRET, P_DT, M_DT, F_DT, ROUND_MODE,
        )  # fmt: skip


_STEP_DTYPES = (torch.float32, torch.float64, torch.int64, torch.int32)


@functools.cache
def _kernels() -> _Kernels:
    if triton is None:
        raise RuntimeError(f"fadam_triton_: {unavailable_reason()}")
    from triton.runtime.interpreter import InterpretedFunction

    dtypes = {
        torch.float32: tl.float32,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
        torch.float64: tl.float64,
        torch.int64: tl.int64,
        torch.int32: tl.int32,
    }
    # Whether triton.jit built interpreted kernels is fixed when this module was imported.
    interpreting = isinstance(_pass_a, InterpretedFunction)
    return _Kernels(pass_a=_pass_a, pass_b=_pass_b, pass_c=_pass_c, dtypes=dtypes, interpreting=interpreting)


# ---------------------------------------------------------------------------------------------------------------
# Host side: plans, caches, launcher
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    """The tensors of one dtype combination: one launch per pass. ``dtypes`` = (param, grad, exp_avg, fisher,
    step, compute) torch dtypes."""

    dtypes: tuple
    n: int
    n_chunks: int
    meta: Tensor
    addr: Tensor
    aligned: bool


@dataclass(frozen=True)
class _GroupSpec:
    """A dtype group without its addresses: ``cols`` are the members' indices in the lists as passed."""

    dtypes: tuple
    cols: tuple
    n_chunks: int
    meta: Tensor


@dataclass(frozen=True)
class _Static:
    """What a plan needs beyond the grads' addresses, for contiguous tensors: grads that move (new allocations
    every step) then cost only new address tables, not a new validation and grouping."""

    specs: tuple
    n_cols: int
    numels: tuple  # the params' sizes, which every grad must have
    grad_dtypes: tuple
    device_index: int


@dataclass(frozen=True)
class _Plan:
    """Everything about a call that depends only on the tensors' addresses, sizes, dtypes and layouts."""

    groups: tuple
    n_cols: int
    any_fp64: bool
    write_back: tuple  # (destination, contiguous copy) pairs; only in plans that are not cached
    keep_alive: tuple  # the contiguous copies the address tables point to


_CACHE_SIZE = 16
_META_CACHE: OrderedDict = OrderedDict()  # (device, numels, logical numels, columns, chunk, streams) -> (meta, C)
_PLAN_CACHE: OrderedDict = OrderedDict()  # (static key, grad addresses) -> _Plan
_STATIC_CACHE: OrderedDict = OrderedDict()  # (addresses but the grads', numels, dtypes, logical numels, config,
#                                             streams, compensation addresses) -> _Static
_ROUND_MODES = {"nearest": 0, "stochastic": 1, "kahan": 2}  # the kernels' ROUND_MODE of a param store
_SCALARS_CACHE: OrderedDict = OrderedDict()  # (device, hyperparameters) -> float64 tensor
_SUMS_CACHE: OrderedDict = OrderedDict()  # (device, columns) -> float64 [3, columns]
_DATA_PTR = Tensor.data_ptr
_DTYPE = operator.attrgetter("dtype")
_NUMEL = Tensor.numel
_IS_CONTIGUOUS = Tensor.is_contiguous


def _cache_get(cache: OrderedDict, key, build):
    value = cache.get(key)
    if value is None:
        value = build()
        cache[key] = value
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    return value


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    if device.type == "cpu":
        return host
    # Pinned + non_blocking: a pageable host-to-device copy would synchronise the stream.
    return host.pin_memory().to(device, non_blocking=True)


def _meta_table(
    numels: tuple[int, ...],
    logical: tuple[int, ...],
    cols: tuple[int, ...],
    chunk: int,
    device: torch.device,
    streams: tuple[int, ...],
) -> tuple[Tensor, int]:
    """int64 [numels (n) | logical numels (n) | sums columns (n) | chunk's tensor (C) | chunk start (C) | streams
    (n): the tensors' streams of rounding bits, mod 2**32], and C."""

    def build():
        sizes = torch.tensor(numels, dtype=torch.int64)
        counts = (sizes + chunk - 1) // chunk
        tidx = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
        first = torch.cumsum(counts, 0) - counts
        starts = (torch.arange(tidx.numel(), dtype=torch.int64) - first[tidx]) * chunk
        extra = torch.tensor(logical + cols, dtype=torch.int64)
        stream = torch.tensor([s & 0xFFFFFFFF for s in streams], dtype=torch.int64)
        host = torch.cat([sizes, extra, tidx, starts, stream])
        return _to_device(host, device), tidx.numel()

    return _cache_get(_META_CACHE, (device, numels, logical, cols, chunk, streams), build)


def _dense_layout(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive slots from ``data_ptr()``."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda s: s[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _same_flat_layout(tensors: tuple[Tensor, ...]) -> bool:
    """Whether element i of every tensor sits at flat slot i, i.e. one dense layout shared by all."""
    first = tensors[0]
    return _dense_layout(first) and all(t.stride() == first.stride() for t in tensors[1:])


def _build_plan(
    lists, logical, cfg, device, others, grad_addrs, comps, comp_addrs, streams, param_rounding
) -> tuple[_Plan, _Static | None]:
    """Validate the tensors and build the launch plan; returns it and, when it may be cached (every tensor
    contiguous), its grad-independent part. ``comps``: the Kahan compensation buffers (aligned with the params,
    None entries) when ``param_rounding`` is "kahan", else None; ``streams``: the tensors' streams or None."""
    params, grads, exp_avgs, fishers, steps = lists
    numels = list(map(_NUMEL, params))
    for name, other in (("grads", grads), ("exp_avgs", exp_avgs), ("fishers", fishers)):
        if list(map(_NUMEL, other)) != numels:
            raise ValueError(f"fadam_triton_: every tensor of {name} must have its param's number of elements")
    dev = params[0].get_device()
    if set(map(Tensor.get_device, itertools.chain(*lists))) != {dev}:
        raise ValueError(f"fadam_triton_: every tensor of a call must be on {device}")
    for name, tensors, allowed in (
        ("params", params, _DTYPES),
        ("grads", grads, _DTYPES),
        ("exp_avgs", exp_avgs, _DTYPES),
        ("fishers", fishers, _DTYPES),
        ("steps", steps, _STEP_DTYPES),
    ):
        bad = sorted({str(t.dtype) for t in tensors if t.dtype not in allowed})
        if bad:
            raise ValueError(
                f"fadam_triton_: unsupported dtype(s) {bad} in {name}; expected one of {[str(d) for d in allowed]}"
            )
    if any(s.numel() != 1 for s in steps):
        raise ValueError("fadam_triton_: every step tensor must have exactly one element")
    modes = [resolve_param_rounding(param_rounding, t.dtype) for t in params]
    comps = [None] * len(params) if comps is None else list(comps)
    for i, (param, mode, comp) in enumerate(zip(params, modes, comps)):
        if mode != "kahan":
            comps[i] = None
        elif comp is None or comp.shape != param.shape or comp.dtype != param.dtype or comp.device != param.device:
            raise ValueError(
                f"fadam_triton_: param_rounding='kahan' needs param_comps[{i}], a {param.dtype} tensor shaped like "
                "its param on its device"
            )

    cacheable = True
    groups: dict[tuple, list] = {}
    write_back, keep_alive = [], []
    for col, (param, grad, m, f, step) in enumerate(zip(*lists)):
        if param.numel() == 0:
            continue  # nothing local to update; its sums column stays 0 (a shard may be empty)
        comp = comps[col]
        tensors = (param, grad, m, f) if comp is None else (param, grad, m, f, comp)
        if not all(t.is_contiguous() for t in tensors):
            cacheable = False
            # The random bits of a stochastic store are drawn by the element's index in the tensor's (row-major)
            # order, which is the flat slot only in a contiguous tensor.
            random = modes[col] == "stochastic" or m.dtype in SIXTEEN_BIT or f.dtype in SIXTEEN_BIT
            if not _same_flat_layout(tensors) or (random and not param.is_contiguous()):
                # Run on contiguous copies, written back after the step.
                staged = [t.contiguous() for t in tensors]
                for dst, src in zip(tensors, staged):
                    if src is not dst and dst is not grad:
                        write_back.append((dst, src))
                keep_alive += staged
                param, grad, m, f = staged[:4]
                comp = None if comp is None else staged[4]
        key = (param.dtype, grad.dtype, m.dtype, f.dtype, step.dtype)
        groups.setdefault(key, []).append((col, param, grad, m, f, step, comp))

    specs = []
    for (p_dt, g_dt, m_dt, f_dt, s_dt), members in groups.items():
        compute = torch.float64 if torch.float64 in (p_dt, g_dt, m_dt, f_dt) else torch.float32
        cols = tuple(c for c, *_ in members)
        local = tuple(t[1].numel() for t in members)
        sizes = tuple(logical[c] for c in cols) if logical is not None else local
        stream = cols if streams is None else tuple(streams[c] for c in cols)
        meta, n_chunks = _meta_table(local, sizes, cols, cfg.chunk, device, stream)
        specs.append(_GroupSpec((p_dt, g_dt, m_dt, f_dt, s_dt, compute), cols, n_chunks, meta))
    if cacheable:
        static = _Static(tuple(specs), len(params), tuple(numels), tuple(map(_DTYPE, grads)), dev)
        return _plan_from_static(static, others, grad_addrs, comp_addrs, device), static
    # (staged copies: the address tables point to them, not to the lists' tensors)
    by_col = {member[0]: member[1:] for members in groups.values() for member in members}
    built = []
    for spec in specs:
        addrs = [0 if by_col[c][row] is None else by_col[c][row].data_ptr() for row in range(6) for c in spec.cols]
        built.append(_group(spec, addrs, device))
    plan = _Plan(tuple(built), len(params), _any_fp64(specs), tuple(write_back), tuple(keep_alive))
    return plan, None


def _any_fp64(specs) -> bool:
    return any(spec.dtypes[5] == torch.float64 for spec in specs)


def _group(spec: _GroupSpec, addrs: list[int], device: torch.device) -> _Group:
    """A launchable group from its spec and its int64 address rows [param | grad | exp_avg | fisher | step |
    compensation (0: none)]."""
    n = len(spec.cols)
    aligned = (
        not (functools.reduce(operator.or_, addrs[: 4 * n]) | functools.reduce(operator.or_, addrs[5 * n :])) & 15
    )
    # (array + frombuffer: a third of torch.tensor(list)'s time; the tensor keeps the array alive)
    addr = _to_device(torch.frombuffer(array.array("q", addrs), dtype=torch.int64), device)
    return _Group(spec.dtypes, n, spec.n_chunks, spec.meta, addr, aligned)


def _plan_from_static(
    static: _Static, others: tuple[int, ...], grad_addrs: tuple[int, ...], comp_addrs: tuple[int, ...] | None, device
) -> _Plan:
    """The plan for these (contiguous) tensors: new address tables on top of a cached grouping. ``others`` are the
    addresses of params, exp_avgs, fishers and steps (in that order), ``grad_addrs`` the grads', ``comp_addrs`` the
    Kahan compensation buffers' (0 for none; None: no buffers)."""
    n = static.n_cols
    comp_addrs = (0,) * n if comp_addrs is None else comp_addrs
    rows = (others[:n], grad_addrs, others[n : 2 * n], others[2 * n : 3 * n], others[3 * n :], comp_addrs)
    groups = []
    for spec in static.specs:
        if len(spec.cols) == n:  # one group holds every tensor, in order
            addrs = [*rows[0], *rows[1], *rows[2], *rows[3], *rows[4], *rows[5]]
        else:
            addrs = [row[c] for row in rows for c in spec.cols]
        groups.append(_group(spec, addrs, device))
    return _Plan(tuple(groups), n, _any_fp64(static.specs), (), ())


def _grads_fit(static: _Static, grads: list[Tensor]) -> bool:
    """Whether grads at new addresses fit a cached grouping: the params' sizes, the same dtypes, one device."""
    return (
        tuple(map(_NUMEL, grads)) == static.numels
        and tuple(map(_DTYPE, grads)) == static.grad_dtypes
        and set(map(Tensor.get_device, grads)) == {static.device_index}
    )


def _scalars(device, lr, beta1, beta2, eps, weight_decay, clip, p, with_lr: bool) -> Tensor:
    """The float64 hyperparameter vector (rows ``_S_*``) on ``device``, cached. ``lr`` (which a schedule changes
    every step) is in it, and in the key, only when some group computes in fp64. log2(β2) (the interpreter's pow)
    is finite also for β2 = 0: 2**(-1e4 (t-1)) is exactly 0 in float64 for t > 1, as 0**(t-1) is."""
    lr = float(lr) if with_lr else 0.0
    values = (lr, beta1, 1.0 - beta1, eps, weight_decay, clip, p, beta2, math.log2(beta2) if beta2 > 0 else -1e4)
    values = tuple(map(float, values))
    return _cache_get(
        _SCALARS_CACHE, (device, values), lambda: _to_device(torch.tensor(values, dtype=torch.float64), device)
    )


def _sums(device: torch.device, n_cols: int) -> Tensor:
    """The zeroed float64 [3, n_cols] sums buffer: reused between calls (stream order makes that safe)."""
    sums = _cache_get(
        _SUMS_CACHE, (device, n_cols), lambda: torch.empty(3, n_cols, dtype=torch.float64, device=device)
    )
    return sums.zero_()


def fadam_triton_(
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
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    numels: Sequence[int] | None = None,
    reduce: Callable[[Tensor], object] | None = None,
    param_rounding: str = "nearest",
    param_comps: Sequence[Tensor | None] | None = None,
    streams: Sequence[int] | None = None,
) -> None:
    """One FAdam step over every tensor of the lists, in place, with 3 multi-tensor launches per dtype group.

    The contract (docs/CONTRACT.md): the caller has already incremented ``steps``; exp_avgs/fishers may have any
    supported dtype, and the lists may mix dtypes (one launch per pass for each (param, grad, exp_avg, fisher,
    step) dtype combination); ``grad_scale`` (0-d fp32) divides the grads inside the kernels; ``found_inf != 0``
    leaves everything unchanged (the caller rolls the steps back). Zero-size tensors are no-ops. No host
    synchronisation.

    Every RMS is over ``numels[i]`` elements (default: ``params[i].numel()``): the logical size of tensor i, of
    which these tensors may be local shards. ``reduce`` (default: none, one process) is called exactly twice, with
    the float64 partial sums as a ``(1, n)`` tensor (Σg²) after pass A and as a ``(2, n)`` tensor (Σ(g/D)²,
    Σ(θ/D)²) after pass B, column i = tensor i of the lists as passed; it must sum them over the shards in place
    (e.g. ``torch.distributed.all_reduce``). The buffer is reused by the next call: a hook must not keep it.
    With ``reduce``, every tensor must be on one device, and it is called even when no local tensor has elements.

    Stores follow :mod:`hf_fadam._rounding`: 16-bit exp_avgs/fishers round stochastically; a bf16/fp16 param is
    stored as ``param_rounding`` (``"auto"``, ``"nearest"``, ``"stochastic"``, ``"kahan"``) resolves for its dtype,
    with ``"kahan"`` reading and updating ``param_comps[i]`` (its dtype and shape; None for the other params). The
    random bits of tensor i come from ``streams[i]`` (default ``i``) and its step count after the step.
    """
    n_all = len(params)
    if not (len(grads) == len(exp_avgs) == len(fishers) == len(steps) == n_all):
        raise ValueError(
            "fadam_triton_: params, grads, exp_avgs, fishers and steps must have equal lengths; got "
            f"{n_all}, {len(grads)}, {len(exp_avgs)}, {len(fishers)}, {len(steps)}"
        )
    logical = None
    if numels is not None:
        logical = tuple(map(int, numels))
        if len(logical) != n_all:
            raise ValueError(f"fadam_triton_: numels has {len(logical)} entries for {n_all} params")
        if n_all and min(logical) < 0:
            raise ValueError(f"fadam_triton_: numels must be >= 0; got {min(logical)}")
    if n_all == 0:
        return
    kernels = _kernels()
    device = params[0].device
    if kernels.interpreting and device.type != "cpu":
        raise RuntimeError(
            f"fadam_triton_: TRITON_INTERPRET=1 runs the kernels on CPU tensors only; got tensors on {device}. "
            "Unset TRITON_INTERPRET (or set it to 0) to run the compiled kernels on the GPU."
        )
    if not kernels.interpreting and device.type != "cuda":
        raise RuntimeError(
            f"fadam_triton_: the compiled Triton kernels need CUDA tensors; got {device}. "
            "Set TRITON_INTERPRET=1 (before triton is imported) to interpret them on CPU tensors."
        )
    cfg = _INTERPRET_CONFIG if kernels.interpreting else _GPU_CONFIG  # (_config() reads the environment)
    lists = (params, grads, exp_avgs, fishers, steps)
    # Rounding (hf_fadam._rounding): the streams enter the meta tables, the compensation buffers (only where 16-bit
    # params resolve to "kahan", the only store that reads them) the address tables; both are part of the plan's key.
    check_param_rounding(param_rounding)
    stream_key = None
    if streams is not None:
        stream_key = tuple(map(int, streams))
        if len(stream_key) != n_all:
            raise ValueError(f"fadam_triton_: streams has {len(stream_key)} entries for {n_all} params")
    comps = comp_key = None
    if resolve_param_rounding(param_rounding, torch.bfloat16) == "kahan":  # "kahan", or "auto" meaning it
        comps = [None] * n_all if param_comps is None else list(param_comps)
        if len(comps) != n_all:
            raise ValueError(f"fadam_triton_: param_comps has {len(comps)} entries for {n_all} params")
        comp_key = tuple(0 if c is None else c.data_ptr() for c in comps)
    # Per call, in C-level maps (a Python loop over the tensors would cost more than the launches): the plan is
    # keyed by every address, the params' sizes and the param and fisher dtypes (freed memory is reused: a new model
    # of the same shapes in another dtype can sit at the same addresses; a grad has its param's dtype, as autograd
    # enforces, and exp_avg is created with fisher); the contiguity of params and grads (the tensors whose layout
    # can change under one address) is re-checked because a cached plan assumes it. Grads at new addresses with an
    # unchanged rest reuse the cached grouping and only get new address tables.
    static_key = (
        tuple(map(_DATA_PTR, itertools.chain(params, exp_avgs, fishers, steps))),
        tuple(map(_NUMEL, params)),
        tuple(map(_DTYPE, itertools.chain(params, fishers))),
        logical,
        cfg,
        stream_key,
        comp_key,
    )
    grad_addrs = tuple(map(_DATA_PTR, grads))
    key = (static_key, grad_addrs)
    plan = _PLAN_CACHE.get(key)
    contiguous = all(map(_IS_CONTIGUOUS, itertools.chain(params, grads)))
    if comps is not None:
        contiguous = contiguous and all(c is None or c.is_contiguous() for c in comps)
    if plan is None or not contiguous:
        static = _STATIC_CACHE.get(static_key) if contiguous else None
        if static is not None and _grads_fit(static, grads):
            plan = _plan_from_static(static, static_key[0], grad_addrs, comp_key, device)
        else:
            plan, static = _build_plan(
                lists, logical, cfg, device, static_key[0], grad_addrs, comps, comp_key, stream_key, param_rounding
            )
            if static is not None:
                _cache_get(_STATIC_CACHE, static_key, lambda: static)
        if static is not None:
            _cache_get(_PLAN_CACHE, key, lambda: plan)
    for scalar, name in ((grad_scale, "grad_scale"), (found_inf, "found_inf")):
        if scalar is not None and (scalar.device != device or scalar.numel() != 1):
            raise ValueError(f"fadam_triton_: {name} must be a one-element tensor on {device}")
    if not plan.groups and reduce is None:
        return
    scalars = _scalars(device, lr, beta1, beta2, eps, weight_decay, clip, p, plan.any_fp64)
    sums = _sums(device, plan.n_cols)
    # Triton launches on the current device: make it the tensors' device.
    same_device = device.type != "cuda" or device.index == torch.cuda.current_device()
    with contextlib.nullcontext() if same_device else torch.cuda.device(device):
        _launch(
            kernels, cfg, plan, sums, scalars, grad_scale, found_inf, reduce,
            lr=lr, beta1=beta1, weight_decay=weight_decay, p=p, maximize=maximize, param_rounding=param_rounding,
        )  # fmt: skip
    for dst, src in plan.write_back:
        dst.copy_(src)


def _launch(
    kernels, cfg, plan, sums, scalars, grad_scale, found_inf, reduce, *, lr, beta1, weight_decay, p, maximize,
    param_rounding,
):  # fmt: skip
    """Pass A of every group, reduce(Σg²), pass B of every group, reduce(Σ(g/D)², Σ(θ/D)²), pass C of every group.
    A group's param store (ROUND_MODE) is ``param_rounding`` resolved for its param dtype."""
    has_scale = grad_scale is not None
    has_found = found_inf is not None
    scale_arg = grad_scale if has_scale else sums
    found_arg = found_inf if has_found else sums
    has_wd = weight_decay != 0
    p_mode = 0 if p == 0.5 else 1 if p == 1 else 2
    t = kernels.dtypes
    interp = kernels.interpreting
    n_cols = plan.n_cols
    lr, beta1, weight_decay, p = float(lr), float(beta1), float(weight_decay), float(p)
    for g in plan.groups:
        kernels.pass_a[(g.n_chunks,)](
            g.meta, g.addr, sums, scale_arg, found_arg, g.n, g.n_chunks,
            G_DT=t[g.dtypes[1]], CDT=t[g.dtypes[5]], HAS_SCALE=has_scale, HAS_FOUND=has_found,
            ALIGNED=g.aligned, CHUNK=cfg.chunk, BLOCK=cfg.block_a, num_warps=cfg.warps_a,
        )  # fmt: skip
    if reduce is not None:
        reduce(sums[0:1])
    round_modes = [_ROUND_MODES[resolve_param_rounding(param_rounding, g.dtypes[0])] for g in plan.groups]
    for g, round_mode in zip(plan.groups, round_modes):
        kernels.pass_b[(g.n_chunks,)](
            g.meta, g.addr, sums, scale_arg, found_arg, scalars, g.n, g.n_chunks, n_cols, p,
            G_DT=t[g.dtypes[1]], P_DT=t[g.dtypes[0]], F_DT=t[g.dtypes[3]], S_DT=t[g.dtypes[4]], CDT=t[g.dtypes[5]],
            HAS_SCALE=has_scale, HAS_FOUND=has_found, HAS_WD=has_wd, P_MODE=p_mode, ROUND_MODE=round_mode,
            INTERPRET=interp, ALIGNED=g.aligned, CHUNK=cfg.chunk, BLOCK=cfg.block_b, num_warps=cfg.warps_b,
        )  # fmt: skip
    if reduce is not None:
        reduce(sums[1:3])
    for g, round_mode in zip(plan.groups, round_modes):
        kernels.pass_c[(g.n_chunks,)](
            g.meta, g.addr, sums, scale_arg, found_arg, scalars, g.n, g.n_chunks, n_cols,
            lr, beta1, 1.0 - beta1, weight_decay, p,
            P_DT=t[g.dtypes[0]], G_DT=t[g.dtypes[1]], M_DT=t[g.dtypes[2]], F_DT=t[g.dtypes[3]], S_DT=t[g.dtypes[4]],
            CDT=t[g.dtypes[5]], HAS_SCALE=has_scale, HAS_FOUND=has_found, HAS_WD=has_wd, MAXIMIZE=bool(maximize),
            P_MODE=p_mode, ROUND_MODE=round_mode, INTERPRET=interp, ALIGNED=g.aligned, CHUNK=cfg.chunk,
            BLOCK=cfg.block_c, num_warps=cfg.warps_c,
        )  # fmt: skip


def _bytes_per_param(param_bytes: int, state_bytes: int, weight_decay: bool = True) -> int:
    """HBM bytes per parameter per step of this design (the table in the module docstring)."""
    g = param_bytes
    a = g
    b = g + state_bytes + (param_bytes if weight_decay else 0)
    c = (g + 2 * state_bytes + param_bytes) + (2 * state_bytes + param_bytes)
    return a + b + c
