r"""Multi-tensor Triton kernels for one FAdam step (the ``fused=True`` path on CUDA).

This is the only module of the package that imports triton, inside a guard (``import hf_fadam`` does not import
this module; ``functional.py`` imports it only on the fused path), and the kernels compile on their first launch.
Under ``TRITON_INTERPRET=1`` (set before triton is imported) the same kernels run in Triton's interpreter on CPU
tensors; that is how the test suite reaches them without a GPU.

Design
------
One call handles every tensor of a (device, dtype) group with three kernel launches, whatever the number of
tensors, and never reads a value back to the host:

* **Chunk table.** Each non-empty tensor is cut into chunks of ``CHUNK`` elements; one program handles one chunk.
  The table ``(tensor index, start offset)`` and the per-tensor ``numel`` live in one int64 device tensor that
  depends only on the shapes, so it is built once and cached by the tuple of sizes.
* **Address table.** The ``data_ptr()`` of every param, grad, exp_avg and fisher goes into an int64 device
  tensor; a program loads its tensor's four addresses and casts them with ``.to(tl.pointer_type(dtype))``. This
  works compiled and under ``TRITON_INTERPRET=1`` (on CPU tensors the addresses are host addresses, which the
  interpreter dereferences directly). Grads may move between steps, so the table is looked up per call in a small
  cache keyed by the addresses, and on a miss copied from pinned memory with ``non_blocking=True`` (no sync).
  When every address is 16-byte aligned, the kernels assert it (``tl.multiple_of``) and the chunk's full blocks
  are loaded unmasked, which is what lets Triton emit 16-byte vector loads through run-time pointers.
* **Per-tensor reductions without a host sync.** Each program reduces its chunk to one partial sum and
  ``tl.atomic_add``\ s it into a per-tensor slot of a zeroed float64 buffer ``sums[3, n]``; the next launch reads
  the finished sums (stream order is the barrier). The float atomics make the summation order, and so the last
  bits of an RMS, vary from run to run: results are not bitwise deterministic.
* **Three passes**, each recomputing what it needs instead of storing it:

  A. ``sum(g²)`` per tensor (g unscaled by ``grad_scale``).
  B. ``f_new = β̂2·f + (1−β̂2)·g²`` recomputed in registers (not stored), ``D = f_new^p + ε̂``,
     ``sum((g/D)²)`` and, only when ``weight_decay != 0``, ``sum((θ/D)²)``.
  C. the update: ``f ← f_new``, ``m ← β1·m + (1−β1)·ḡ/max(1, RMS(ḡ)/c)``,
     ``θ ← θ − η·(m + λ·w/max(1, RMS(w)/c))``, with ``w = θ/D``.

  β̂2 comes from :func:`hf_fadam._math.fisher_beta` on the stacked (already incremented) step tensors, on the
  device, so every path uses the same value. ε̂ and the clip divisors are computed per program from the sums with
  the formulas of :mod:`hf_fadam._math` (``adaptive_eps``, ``clip_divisor``, ``rms_from_sumsq``) written out in
  Triton; the tests compare the results with the reference. ``p == 0.5`` uses a correctly rounded square root,
  ``p == 1`` the identity, any other ``p`` ``libdevice.pow`` (an exp2/log2 in float64 under the interpreter).
* AMP: ``grad_scale`` divides g inside every pass (the grads are not modified); when ``found_inf != 0`` every
  program skips its chunk, so nothing is read or written (the caller rolls the steps back).
* 64-bit offsets throughout (chunk starts and numels are int64), so a tensor may exceed 2**31 elements.
* Params fp32, bf16, fp16 or fp64; state (exp_avg, fisher) any of those; math in fp32 (fp64 when any of the
  four dtypes is fp64, with the float hyperparameters read from a small fp64 tensor, since Triton passes Python
  floats as fp32). fp64 works on CUDA too (tested), but the dispatcher sends only fp32/bf16/fp16 there.

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
chunk) is negligible. The time above the traffic floor is launch overhead: per call 3 Triton launches, one
``torch.zeros`` for the sums, and a handful of tiny ops for the stacked step tensor and β̂2.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor


__all__ = ["fadam_triton_", "is_available"]

_DTYPE = operator.attrgetter("dtype")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def is_available() -> bool:
    """Whether :func:`fadam_triton_` can run here: triton importable, and CUDA present or TRITON_INTERPRET=1."""
    if triton is None:
        return False
    return _interpreting() or torch.cuda.is_available()


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
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

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
        # (triton 3.6-3.8), which would bias every bf16 param update towards zero; compiled code uses cvt.rn.
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _store(ptr, value, mask, INTERPRET: tl.constexpr):
        if INTERPRET and ptr.dtype.element_ty == tl.bfloat16:
            value = _bf16_rne(value)
        else:
            value = value.to(ptr.dtype.element_ty)
        if mask is None:
            tl.store(ptr, value)
        else:
            tl.store(ptr, value, mask=mask)

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
        pid = tl.program_id(0)
        tidx = tl.load(meta_ptr + n_tensors + pid)
        # Hints go on the op that defines a value (a hint on a helper's argument is dropped): chunk starts are
        # multiples of CHUNK, and the caller checked that every address is 16-byte aligned.
        start = tl.multiple_of(tl.load(meta_ptr + n_tensors + n_chunks + pid), CHUNK)
        numel = tl.load(meta_ptr + tidx)
        base = tl.load(addr_ptr + ROW * n_tensors + tidx).to(tl.pointer_type(DT))
        if ALIGNED:
            base = tl.multiple_of(base, 16)
        return tidx, start, numel, base

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
    def _eps_hat(sums_ptr, tidx, numel, eps, CDT: tl.constexpr):
        # _math.rms_from_sumsq and _math.adaptive_eps: eps * min(1, RMS(g)), eps where RMS(g) == 0.
        count = tl.maximum(numel, 1).to(CDT)
        rms_g = _sqrt(_div(tl.load(sums_ptr + tidx).to(CDT), count))
        return tl.where(rms_g > 0, tl.minimum(rms_g, 1.0) * eps, eps)

    @triton.jit
    def _clip_divisor(sums_ptr, numel, clip, CDT: tl.constexpr):
        # _math.clip_divisor(_math.rms_from_sumsq(sum, numel), clip) = max(1, RMS / clip).
        count = tl.maximum(numel, 1).to(CDT)
        rms = _sqrt(_div(tl.load(sums_ptr).to(CDT), count))
        return tl.maximum(_div(rms, clip), 1.0)

    @triton.jit
    def _fisher_beta(bh_ptr, tidx, CDT: tl.constexpr):
        # β̂2 arrives in float64 (_math.fisher_beta); like the reference, round it to the compute dtype first.
        bh = tl.load(bh_ptr + tidx).to(CDT)
        return bh, 1.0 - bh

    # ---- pass A: sum(g²) per tensor ------------------------------------------------------------------------

    @triton.jit
    def _sumsq_grad_block(g_ptr, offs, mask, scale, HAS_SCALE: tl.constexpr, CDT: tl.constexpr):
        g = _grad(g_ptr, offs, mask, scale, HAS_SCALE, CDT)
        return g * g

    @triton.jit
    def _pass_a(
        meta_ptr, addr_ptr, sums_ptr, scale_ptr, found_ptr, n_tensors, n_chunks,
        G_DT: tl.constexpr, CDT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr,
        ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        tidx, start, numel, g_ptr = _chunk(meta_ptr, addr_ptr, n_tensors, n_chunks, 1, G_DT, ALIGNED, CHUNK)
        start, end, n_full = _extent(start, numel, found_ptr, HAS_FOUND, CHUNK, BLOCK)
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr).to(CDT)
        acc = tl.zeros([BLOCK], CDT)
        for j in tl.range(0, n_full):
            offs = start + j * BLOCK + tl.arange(0, BLOCK)
            acc += _sumsq_grad_block(g_ptr, offs, None, scale, HAS_SCALE, CDT)
        offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
        mask = offs < end
        acc += tl.where(mask, _sumsq_grad_block(g_ptr, offs, mask, scale, HAS_SCALE, CDT), 0.0)
        tl.atomic_add(sums_ptr + tidx, tl.sum(acc, axis=0).to(tl.float64))

    # ---- pass B: sum((g/D)²) and sum((θ/D)²) per tensor, f_new recomputed ---------------------------------

    @triton.jit
    def _denom_block(
        g_ptr, f_ptr, offs, mask, scale, bh, omb, eps_hat, p,
        HAS_SCALE: tl.constexpr, CDT: tl.constexpr, P_MODE: tl.constexpr, INTERPRET: tl.constexpr,
    ):  # fmt: skip
        g = _grad(g_ptr, offs, mask, scale, HAS_SCALE, CDT)
        f = _load(f_ptr + offs, mask, CDT)
        f_new = f * bh + g * g * omb
        denom = _power(f_new, p, P_MODE, INTERPRET) + eps_hat
        if mask is not None:
            denom = tl.where(mask, denom, 1.0)  # no 0/0 in masked lanes, even with eps = 0
        return g, f_new, denom

    @triton.jit
    def _pass_b(
        meta_ptr, addr_ptr, sums_ptr, bh_ptr, scale_ptr, found_ptr, scalars_ptr, n_tensors, n_chunks, eps, p,
        G_DT: tl.constexpr, P_DT: tl.constexpr, F_DT: tl.constexpr, CDT: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr, HAS_WD: tl.constexpr, P_MODE: tl.constexpr,
        INTERPRET: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        tidx, start, numel, g_ptr = _chunk(meta_ptr, addr_ptr, n_tensors, n_chunks, 1, G_DT, ALIGNED, CHUNK)
        f_ptr = _addr(addr_ptr, n_tensors, tidx, 3, F_DT, ALIGNED)
        p_ptr = _addr(addr_ptr, n_tensors, tidx, 0, P_DT, ALIGNED)
        start, end, n_full = _extent(start, numel, found_ptr, HAS_FOUND, CHUNK, BLOCK)
        if CDT == tl.float64:  # Python floats arrive as fp32 arguments: take the fp64 copies
            eps = tl.load(scalars_ptr + 3)
            p = tl.load(scalars_ptr + 6)
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr).to(CDT)
        eps_hat = _eps_hat(sums_ptr, tidx, numel, eps, CDT)
        bh, omb = _fisher_beta(bh_ptr, tidx, CDT)
        acc_g = tl.zeros([BLOCK], CDT)
        acc_w = tl.zeros([BLOCK], CDT)
        for j in tl.range(0, n_full):
            offs = start + j * BLOCK + tl.arange(0, BLOCK)
            g, f_new, denom = _denom_block(
                g_ptr, f_ptr, offs, None, scale, bh, omb, eps_hat, p, HAS_SCALE, CDT, P_MODE, INTERPRET
            )
            nat = _div(g, denom)
            acc_g += nat * nat
            if HAS_WD:
                w = _div(_load(p_ptr + offs, None, CDT), denom)
                acc_w += w * w
        offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
        mask = offs < end
        g, f_new, denom = _denom_block(
            g_ptr, f_ptr, offs, mask, scale, bh, omb, eps_hat, p, HAS_SCALE, CDT, P_MODE, INTERPRET
        )
        nat = _div(g, denom)
        acc_g += tl.where(mask, nat * nat, 0.0)
        tl.atomic_add(sums_ptr + n_tensors + tidx, tl.sum(acc_g, axis=0).to(tl.float64))
        if HAS_WD:
            w = _div(_load(p_ptr + offs, mask, CDT), denom)
            acc_w += tl.where(mask, w * w, 0.0)
            tl.atomic_add(sums_ptr + 2 * n_tensors + tidx, tl.sum(acc_w, axis=0).to(tl.float64))

    # ---- pass C: the update ------------------------------------------------------------------------------

    @triton.jit
    def _update_block(
        p_ptr, g_ptr, m_ptr, f_ptr, offs, mask, scale, bh, omb, eps_hat, p, div_g, div_w,
        lr, beta1, one_minus_beta1, weight_decay,
        HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, CDT: tl.constexpr,
        P_MODE: tl.constexpr, INTERPRET: tl.constexpr,
    ):  # fmt: skip
        g, f_new, denom = _denom_block(
            g_ptr, f_ptr, offs, mask, scale, bh, omb, eps_hat, p, HAS_SCALE, CDT, P_MODE, INTERPRET
        )
        if MAXIMIZE:
            g = -g
        _store(f_ptr + offs, f_new, mask, INTERPRET)
        nat = _div(_div(g, denom), div_g)
        m = _load(m_ptr + offs, mask, CDT) * beta1 + nat * one_minus_beta1
        _store(m_ptr + offs, m, mask, INTERPRET)
        theta = _load(p_ptr + offs, mask, CDT)
        update = m
        if HAS_WD:
            w = _div(_div(theta, denom), div_w)
            update = m + weight_decay * w
        _store(p_ptr + offs, theta - lr * update, mask, INTERPRET)

    @triton.jit
    def _pass_c(
        meta_ptr, addr_ptr, sums_ptr, bh_ptr, scale_ptr, found_ptr, scalars_ptr, n_tensors, n_chunks,
        lr, beta1, one_minus_beta1, eps, weight_decay, clip, p,
        P_DT: tl.constexpr, G_DT: tl.constexpr, M_DT: tl.constexpr, F_DT: tl.constexpr, CDT: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr, HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr,
        P_MODE: tl.constexpr, INTERPRET: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        tidx, start, numel, p_ptr = _chunk(meta_ptr, addr_ptr, n_tensors, n_chunks, 0, P_DT, ALIGNED, CHUNK)
        g_ptr = _addr(addr_ptr, n_tensors, tidx, 1, G_DT, ALIGNED)
        m_ptr = _addr(addr_ptr, n_tensors, tidx, 2, M_DT, ALIGNED)
        f_ptr = _addr(addr_ptr, n_tensors, tidx, 3, F_DT, ALIGNED)
        start, end, n_full = _extent(start, numel, found_ptr, HAS_FOUND, CHUNK, BLOCK)
        if CDT == tl.float64:  # Python floats arrive as fp32 arguments: take the fp64 copies
            lr = tl.load(scalars_ptr + 0)
            beta1 = tl.load(scalars_ptr + 1)
            one_minus_beta1 = tl.load(scalars_ptr + 2)
            eps = tl.load(scalars_ptr + 3)
            weight_decay = tl.load(scalars_ptr + 4)
            clip = tl.load(scalars_ptr + 5)
            p = tl.load(scalars_ptr + 6)
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr).to(CDT)
        eps_hat = _eps_hat(sums_ptr, tidx, numel, eps, CDT)
        bh, omb = _fisher_beta(bh_ptr, tidx, CDT)
        div_g = _clip_divisor(sums_ptr + n_tensors + tidx, numel, clip, CDT)
        div_w = 1.0
        if HAS_WD:
            div_w = _clip_divisor(sums_ptr + 2 * n_tensors + tidx, numel, clip, CDT)
        for j in tl.range(0, n_full):
            offs = start + j * BLOCK + tl.arange(0, BLOCK)
            _update_block(
                p_ptr, g_ptr, m_ptr, f_ptr, offs, None, scale, bh, omb, eps_hat, p, div_g, div_w,
                lr, beta1, one_minus_beta1, weight_decay, HAS_SCALE, MAXIMIZE, HAS_WD, CDT, P_MODE, INTERPRET,
            )  # fmt: skip
        offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
        mask = offs < end
        _update_block(
            p_ptr, g_ptr, m_ptr, f_ptr, offs, mask, scale, bh, omb, eps_hat, p, div_g, div_w,
            lr, beta1, one_minus_beta1, weight_decay, HAS_SCALE, MAXIMIZE, HAS_WD, CDT, P_MODE, INTERPRET,
        )  # fmt: skip


@functools.cache
def _kernels() -> _Kernels:
    if triton is None:
        raise RuntimeError("fadam_triton_ needs triton (pip install 'hf-fadam[triton]'); it is not importable here")
    from triton.runtime.interpreter import InterpretedFunction

    dtypes = {
        torch.float32: tl.float32,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
        torch.float64: tl.float64,
    }
    # Whether triton.jit built interpreted kernels is fixed when this module was imported.
    interpreting = isinstance(_pass_a, InterpretedFunction)
    return _Kernels(pass_a=_pass_a, pass_b=_pass_b, pass_c=_pass_c, dtypes=dtypes, interpreting=interpreting)


# ---------------------------------------------------------------------------------------------------------------
# Host side: tables, caches, launcher
# ---------------------------------------------------------------------------------------------------------------

_META_CACHE: OrderedDict = OrderedDict()
_ADDR_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 16


def _cache_get(cache: OrderedDict, key, build):
    value = cache.get(key)
    if value is None:
        value = build()
        cache[key] = value
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    if device.type == "cpu":
        return host
    # Pinned + non_blocking: a pageable host-to-device copy would synchronise the stream.
    return host.pin_memory().to(device, non_blocking=True)


def _meta_table(numels: tuple[int, ...], chunk: int, device: torch.device) -> tuple[Tensor, int]:
    """int64 [numels (n) | chunk tensor index (C) | chunk start (C)] on ``device``, and C."""

    def build():
        sizes = torch.tensor(numels, dtype=torch.int64)
        counts = (sizes + chunk - 1) // chunk
        tidx = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
        first = torch.cumsum(counts, 0) - counts
        starts = (torch.arange(tidx.numel(), dtype=torch.int64) - first[tidx]) * chunk
        host = torch.cat([sizes, tidx, starts])
        return _to_device(host, device), tidx.numel()

    return _cache_get(_META_CACHE, (device, numels, chunk), build)


def _addr_table(addrs: tuple[int, ...], device: torch.device) -> Tensor:
    """int64 [param | grad | exp_avg | fisher addresses] (4 rows of n) on ``device``."""
    return _cache_get(_ADDR_CACHE, (device, addrs), lambda: _to_device(torch.tensor(addrs, dtype=torch.int64), device))


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
) -> None:
    """One FAdam step over every tensor of one (device, dtype) group, in place, with 3 multi-tensor launches.

    The contract (docs/CONTRACT.md): the caller has already incremented ``steps``; grads have the param dtype,
    exp_avgs/fishers the state dtype; ``grad_scale`` (0-d fp32) divides the grads inside the kernels;
    ``found_inf != 0`` leaves everything unchanged (the caller rolls the steps back). Zero-size tensors are
    no-ops. Every RMS is over the whole tensor. No host synchronisation.
    """
    n_all = len(params)
    if not (len(grads) == len(exp_avgs) == len(fishers) == len(steps) == n_all):
        raise ValueError(
            "fadam_triton_: params, grads, exp_avgs, fishers and steps must have equal lengths; got "
            f"{n_all}, {len(grads)}, {len(exp_avgs)}, {len(fishers)}, {len(steps)}"
        )
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
    dtypes = (params[0].dtype, grads[0].dtype, exp_avgs[0].dtype, fishers[0].dtype)
    for dtype in dtypes:
        if dtype not in kernels.dtypes:
            raise ValueError(f"fadam_triton_: unsupported dtype {dtype}; expected float32, bfloat16, float16, float64")
    p_dtype, g_dtype, m_dtype, f_dtype = dtypes
    dev = params[0].get_device()

    # This runs every step, so the checks are C-level maps (a Python loop over the tensors costs more than the
    # launches): sizes, dtypes and devices must agree, since the kernels trust the address table.
    lists = (params, grads, exp_avgs, fishers)
    numels = list(map(Tensor.numel, params))
    for other in lists[1:]:
        if list(map(Tensor.numel, other)) != numels:
            raise ValueError("fadam_triton_: every grad, exp_avg and fisher must have its param's number of elements")
    for tensors in lists:
        if len(set(map(_DTYPE, tensors))) != 1:
            found = sorted(map(str, set(map(_DTYPE, tensors))))
            raise ValueError(f"fadam_triton_: all tensors of a list must share one dtype; got {found}")
    if set(map(Tensor.get_device, itertools.chain(*lists, steps))) != {dev}:
        raise ValueError(f"fadam_triton_: every tensor of a call must be on {device}")
    P, G, M, F, S = params, grads, exp_avgs, fishers, steps
    write_back = []
    if 0 in numels or not all(map(Tensor.is_contiguous, itertools.chain(*lists))):
        # Slow path: drop empty tensors, and route a tensor whose four buffers do not share one dense layout
        # through contiguous copies that are written back afterwards.
        P, G, M, F, S = [], [], [], [], []
        for param, grad, m, f, step in zip(params, grads, exp_avgs, fishers, steps):
            if param.numel() == 0:
                continue
            if not _same_flat_layout((param, grad, m, f)):
                staged = [t.contiguous() for t in (param, grad, m, f)]
                for dst, src in ((param, staged[0]), (m, staged[2]), (f, staged[3])):
                    if src is not dst:
                        write_back.append((dst, src))
                param, grad, m, f = staged
            P.append(param)
            G.append(grad)
            M.append(m)
            F.append(f)
            S.append(step)
        numels = list(map(Tensor.numel, P))
    if not P:
        return
    for scalar, name in ((grad_scale, "grad_scale"), (found_inf, "found_inf")):
        if scalar is not None and (scalar.get_device() != dev or scalar.numel() != 1):
            raise ValueError(f"fadam_triton_: {name} must be a one-element tensor on {device}")
    compute = torch.float64 if torch.float64 in dtypes else torch.float32

    cfg = _config()
    n = len(P)
    meta, n_chunks = _meta_table(tuple(numels), cfg.chunk, device)
    data_ptr = Tensor.data_ptr
    addrs = (*map(data_ptr, P), *map(data_ptr, G), *map(data_ptr, M), *map(data_ptr, F))
    addr = _addr_table(addrs, device)
    aligned = not functools.reduce(operator.or_, addrs) & 15

    from .._math import fisher_beta

    beta2_hat = fisher_beta(beta2, torch.stack(S))  # float64 [n], on device, sync-free
    # float64 sums: a tensor of 2**31 elements adds ~10**5 chunk partials, too many for fp32 accumulation.
    sums = torch.zeros(3 * n, dtype=torch.float64, device=device)
    scalars = sums  # unused unless the math runs in fp64 (Triton passes Python floats as fp32)
    if compute == torch.float64:
        values = (lr, beta1, 1.0 - beta1, eps, weight_decay, clip, p)
        scalars = _to_device(torch.tensor(values, dtype=torch.float64), device)

    # Triton launches on the current device: make it the tensors' device.
    same_device = device.type != "cuda" or device.index == torch.cuda.current_device()
    with contextlib.nullcontext() if same_device else torch.cuda.device(device):
        _launch(
            kernels, cfg, n, n_chunks, meta, addr, sums, beta2_hat, grad_scale, found_inf, scalars, aligned,
            dtypes=(p_dtype, g_dtype, m_dtype, f_dtype, compute), lr=lr, beta1=beta1, eps=eps,
            weight_decay=weight_decay, clip=clip, p=p, maximize=maximize,
        )  # fmt: skip
    for dst, src in write_back:
        dst.copy_(src)


def _launch(
    kernels, cfg, n, n_chunks, meta, addr, sums, beta2_hat, grad_scale, found_inf, scalars, aligned, *,
    dtypes, lr, beta1, eps, weight_decay, clip, p, maximize,
):  # fmt: skip
    p_dtype, g_dtype, m_dtype, f_dtype, compute = dtypes
    has_scale = grad_scale is not None
    has_found = found_inf is not None
    scale_arg = grad_scale if has_scale else sums
    found_arg = found_inf if has_found else sums
    has_wd = weight_decay != 0
    p_mode = 0 if p == 0.5 else 1 if p == 1 else 2
    t = kernels.dtypes
    common = dict(ALIGNED=aligned, CHUNK=cfg.chunk)
    grid = (n_chunks,)
    kernels.pass_a[grid](
        meta, addr, sums, scale_arg, found_arg, n, n_chunks,
        G_DT=t[g_dtype], CDT=t[compute], HAS_SCALE=has_scale, HAS_FOUND=has_found,
        BLOCK=cfg.block_a, num_warps=cfg.warps_a, **common,
    )  # fmt: skip
    kernels.pass_b[grid](
        meta, addr, sums, beta2_hat, scale_arg, found_arg, scalars, n, n_chunks, float(eps), float(p),
        G_DT=t[g_dtype], P_DT=t[p_dtype], F_DT=t[f_dtype], CDT=t[compute], HAS_SCALE=has_scale,
        HAS_FOUND=has_found, HAS_WD=has_wd, P_MODE=p_mode, INTERPRET=kernels.interpreting,
        BLOCK=cfg.block_b, num_warps=cfg.warps_b, **common,
    )  # fmt: skip
    kernels.pass_c[grid](
        meta, addr, sums, beta2_hat, scale_arg, found_arg, scalars, n, n_chunks,
        float(lr), float(beta1), 1.0 - float(beta1), float(eps), float(weight_decay), float(clip), float(p),
        P_DT=t[p_dtype], G_DT=t[g_dtype], M_DT=t[m_dtype], F_DT=t[f_dtype], CDT=t[compute],
        HAS_SCALE=has_scale, HAS_FOUND=has_found, HAS_WD=has_wd, MAXIMIZE=bool(maximize), P_MODE=p_mode,
        INTERPRET=kernels.interpreting, BLOCK=cfg.block_c, num_warps=cfg.warps_c, **common,
    )  # fmt: skip


def _bytes_per_param(param_bytes: int, state_bytes: int, weight_decay: bool = True) -> int:
    """HBM bytes per parameter per step of this design (the table in the module docstring)."""
    g = param_bytes
    a = g
    b = g + state_bytes + (param_bytes if weight_decay else 0)
    c = (g + 2 * state_bytes + param_bytes) + (2 * state_bytes + param_bytes)
    return a + b + c
