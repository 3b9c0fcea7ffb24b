"""The fused CPU path of ``FAdam8bit``: the C kernel of ``_fadam8bit_cpu.c``, built at first use, loaded with ctypes.

The kernel runs FAdam's three passes over 8-bit state (see the C file's header): A sums g², B sums (g/D)² and
(θ/D)² with f decoded and f_new recomputed in registers, C updates θ and writes new codes and per-block scales.
Traffic for fp32 params: A reads g (4 B), B reads g, θ and the f code (9 B), C reads g, θ and both codes and writes
θ and both codes (16 B): 29 B/param plus 16 B per block of scales, against 44 B for FAdam's fp32-state kernel.

The build (compiler, flags, private cache) is :mod:`hf_fadam.kernels._cpu_build`'s, as for the fp32 kernel. With a
``reduce`` hook the three phases run as three calls with the hook in between; without, in one call.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .._math import fisher_beta
from .._quant import lowbias32, sr_seeds
from .._rounding import KIND_EXP_AVG, KIND_PARAM, check_param_rounding, resolve_param_rounding
from .._state_checks import check_8bit_state
from . import _cpu_build


# Whether this kernel stores 16-bit params with hf_fadam._rounding's rules (param_rounding).
SUPPORTS_ROUNDING = True

__all__ = ["fadam8bit_cpu_", "is_available", "is_supported", "unavailable_reason"]

_SOURCE = Path(__file__).with_name("_fadam8bit_cpu.c")
_ABI = 4
_KERNELS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_ROUND_MODES = {"nearest": 0, "stochastic": 1, "kahan": 2}
MAX_BLOCK = 4096


class _HParams(ctypes.Structure):
    _fields_ = [  # noqa: RUF012 (ctypes needs a plain list)
        ("lr", ctypes.c_double),
        ("beta1", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("weight_decay", ctypes.c_double),
        ("clip", ctypes.c_double),
        ("p", ctypes.c_double),
        ("grad_scale", ctypes.c_double),
        ("block_size", ctypes.c_int64),
        ("maximize", ctypes.c_int),
        ("has_grad_scale", ctypes.c_int),
        ("round_mode", ctypes.c_int),
    ]


def _loader(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.hf_fadam8_abi_version() != _ABI:
        raise RuntimeError(f"{path} has ABI {lib.hf_fadam8_abi_version()}, expected {_ABI}")
    vp = ctypes.POINTER(ctypes.c_void_p)
    dp = ctypes.POINTER(ctypes.c_double)
    for suffix in _KERNELS.values():
        fn = getattr(lib, f"hf_fadam8_step_{suffix}")
        fn.argtypes = [
            ctypes.c_int64, vp, vp, vp, vp, vp, vp, vp, ctypes.POINTER(ctypes.c_int64), dp, dp,
            ctypes.POINTER(ctypes.c_int64), dp, ctypes.POINTER(_HParams), ctypes.c_int, ctypes.c_int,
        ]  # fmt: skip
        fn.restype = ctypes.c_int
    for name in ("hf_fadam8_encode", "hf_fadam8_decode"):
        getattr(lib, name).restype = None
    lib.hf_fadam8_encode_m_simd.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                            ctypes.c_int64]  # fmt: skip
    lib.hf_fadam8_encode_m_simd.restype = ctypes.c_int
    lib.hf_fadam8_store_sr.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int64]
    lib.hf_fadam8_store_sr.restype = None
    lib.hf_fadam8_set_simd.argtypes = [ctypes.c_int]
    lib.hf_fadam8_set_simd.restype = ctypes.c_int
    return lib


# The kernel library of this process: built and loaded at first use, a failure remembered (one attempt).
_library = _cpu_build.LazyLibrary(_SOURCE, _loader)


def _get_lib() -> ctypes.CDLL:
    """The loaded 8-bit kernel library, built on first use; raises RuntimeError with the reason when it cannot be."""
    return _library.get()


def is_available() -> bool:
    """True when the 8-bit CPU kernel is built (or can be built now) and loads; never raises."""
    return _library.is_available()


def unavailable_reason() -> str | None:
    """Why :func:`is_available` is False, else None."""
    return _library.unavailable_reason()


def is_supported(param_dtype: torch.dtype) -> bool:
    """Whether the kernel steps params of this dtype (fp32, bf16, fp16; the math is fp32)."""
    return param_dtype in _KERNELS


def set_simd(on: bool) -> bool:
    """Test hook: let the kernel use its AVX-512 passes where they apply (the default) or never; returns whether this
    build has them (compiled with AVX-512 F/BW/VL). They compute what the generic loops compute (see the C file)."""
    return bool(_get_lib().hf_fadam8_set_simd(int(bool(on))))


def encode(u: Tensor, signed: bool, seed: int | None = None) -> Tensor:
    """The kernel's encoder on float32 values (test hook): int32 codes of the m map (signed) or the f map.

    ``seed``: the map's stochastic rounding (f: its normal range, m: its subnormal range) with the random bits of
    element ``i`` of ``_quant.sr_bits``.
    """
    lib = _get_lib()
    u = u.to(torch.float32).contiguous()
    q = torch.empty(u.shape, dtype=torch.int32)
    lib.hf_fadam8_encode(ctypes.c_void_p(u.data_ptr()), ctypes.c_void_p(q.data_ptr()), ctypes.c_int64(u.numel()),
                         ctypes.c_int(int(signed)), ctypes.c_int(seed is not None),
                         ctypes.c_int64(0 if seed is None else int(seed)))  # fmt: skip
    return q


def store_sr(x: Tensor, dtype: torch.dtype, seed: int) -> Tensor:
    """The kernel's stochastic store of a 16-bit param (test hook): float32 ``x`` rounded to ``dtype`` (bfloat16 or
    float16) with the random bits of element ``i`` of ``_quant.sr_bits(., seed)``, as pass C stores element ``i``."""
    x = x.to(torch.float32).contiguous()
    out = torch.empty(x.shape, dtype=dtype)
    _get_lib().hf_fadam8_store_sr(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                                  ctypes.c_int64(x.numel()), ctypes.c_int(dtype == torch.float16),
                                  ctypes.c_int64(int(seed)))  # fmt: skip
    return out


def encode_m_simd(u: Tensor, seed: int | None = None) -> Tensor | None:
    """Pass C's AVX-512 encoder of the m map on float32 values in [0, VMAX] (test hook): int8 codes, or None where
    this build has no AVX-512 passes. ``seed``: its subnormal range rounded stochastically with the random bits of
    element ``i`` of ``_quant.sr_bits``; None: to nearest."""
    u = u.to(torch.float32).contiguous()
    q = torch.empty(u.shape, dtype=torch.int8)
    done = _get_lib().hf_fadam8_encode_m_simd(ctypes.c_void_p(u.data_ptr()), ctypes.c_void_p(q.data_ptr()),
                                              ctypes.c_int64(u.numel()), ctypes.c_int(seed is not None),
                                              ctypes.c_int64(0 if seed is None else int(seed)))  # fmt: skip
    return q if done else None


def decode(q: Tensor, signed: bool) -> Tensor:
    """The kernel's decoder on int32 codes (magnitudes for the m map) (test hook)."""
    lib = _get_lib()
    q = q.to(torch.int32).contiguous()
    v = torch.empty(q.shape, dtype=torch.float32)
    lib.hf_fadam8_decode(ctypes.c_void_p(q.data_ptr()), ctypes.c_void_p(v.data_ptr()), ctypes.c_int64(q.numel()),
                         ctypes.c_int(int(signed)))  # fmt: skip
    return v


def _ptrs(ts: Sequence[Tensor | None]):
    return (ctypes.c_void_p * len(ts))(*[None if t is None else t.data_ptr() for t in ts])


@torch.no_grad()
def fadam8bit_cpu_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    fishers: list[Tensor],
    exp_avg_scales: list[Tensor | None],
    fisher_scales: list[Tensor | None],
    steps: list[Tensor],
    *,
    block_size: int,
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
    streams: Sequence[int] | None = None,
    param_rounding: str = "nearest",
    param_comps: Sequence[Tensor | None] | None = None,
) -> None:
    """One FAdam8bit step for CPU tensors of one param dtype, in place; ``steps`` are already incremented.

    Tensor ``i`` has 8-bit state when ``fisher_scales[i]`` is not None: ``exp_avgs[i]`` int8 codes,
    ``fishers[i]`` uint8 codes of sqrt(f), the scales float32 ``(num_blocks,)``; otherwise float32 ``exp_avg`` and
    ``fisher``. ``numels``/``reduce``: the reduction-hook contract (``reduce`` is called twice, with float64
    ``(1, n)`` then ``(2, n)`` sums). ``found_inf != 0`` leaves everything unchanged. ``streams``: each tensor's
    stream of random bits for the stochastic roundings (:func:`hf_fadam._quant.sr_seeds`; default ``0 .. n-1``).
    ``param_rounding`` (``"auto"``, ``"nearest"``, ``"stochastic"``, ``"kahan"``): how bf16/fp16 params are stored
    (:mod:`hf_fadam._rounding`); with ``"kahan"`` ``param_comps[i]`` is param i's compensation buffer (its dtype and
    shape), updated in place.
    """
    check_param_rounding(param_rounding)
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(fishers) == len(exp_avg_scales) == len(fisher_scales) == n):
        raise ValueError("fadam8bit_cpu_: the tensor lists must have equal lengths")
    if n == 0:
        return
    if found_inf is not None and float(found_inf) != 0.0:
        return
    if not 1 <= block_size <= MAX_BLOCK:
        raise ValueError(f"fadam8bit_cpu_: block_size must be in [1, {MAX_BLOCK}]; got {block_size}")
    pdt = params[0].dtype
    if pdt not in _KERNELS:
        raise TypeError(f"fadam8bit_cpu_: param dtype {pdt} is not supported (float32, bfloat16, float16)")
    mode = resolve_param_rounding(param_rounding, pdt)
    if streams is not None and len(streams) != n:
        raise ValueError(f"fadam8bit_cpu_: streams has {len(streams)} entries for {n} params")
    comps: list[Tensor | None] = [None] * n
    if mode == "kahan":
        if param_comps is None or len(param_comps) != n:
            raise ValueError("fadam8bit_cpu_: param_rounding='kahan' needs param_comps, one buffer per param")
        comps = list(param_comps)
        for i, (prm, comp) in enumerate(zip(params, comps)):
            if comp is None or comp.shape != prm.shape or comp.dtype != pdt or not comp.is_cpu:
                raise ValueError(f"fadam8bit_cpu_: param_comps[{i}] must be a CPU {pdt} tensor shaped like its param")
    for i, (prm, grd, m, f, ms, fs) in enumerate(zip(params, grads, exp_avgs, fishers, exp_avg_scales, fisher_scales)):
        if prm.dtype != pdt or grd.dtype != pdt or not prm.is_cpu or grd.shape != prm.shape or not grd.is_cpu:
            raise TypeError(
                f"fadam8bit_cpu_: params[{i}]/grads[{i}] must be CPU {pdt} of one shape; got {prm.dtype} "
                f"{tuple(prm.shape)} on {prm.device} / {grd.dtype} {tuple(grd.shape)} on {grd.device}"
            )
        # the kernel writes codes and scales through raw pointers: nothing reaches it unchecked
        check_8bit_state("fadam8bit_cpu_", i, prm, m, f, ms, fs, block_size)
    lib = _get_lib()
    lists = [params, grads, exp_avgs, fishers, comps]
    work = [list(lst) for lst in lists]
    copies: list[tuple[Tensor, Tensor]] = []
    for i in range(n):
        for k, lst in enumerate(work):
            t = lst[i]
            if t is not None and not t.is_contiguous():
                c = t.contiguous()
                if k != 1:
                    copies.append((t, c))
                lst[i] = c
    local = [t.numel() for t in params]
    logical = local if numels is None else list(numels)
    step_t = torch.stack([t.reshape(()) for t in steps])
    beta_hat = fisher_beta(beta2, step_t).to("cpu", torch.float64).contiguous()
    # the random bits' seeds, 3 rows: f's codes (_quant.sr_seeds), m's codes and the param's stochastic store
    # (_rounding.rounding_seeds of KIND_EXP_AVG and KIND_PARAM: lowbias32(f's seed ^ kind))
    f_seeds = sr_seeds(streams, step_t).cpu()
    seeds = torch.stack([f_seeds, lowbias32(f_seeds ^ KIND_EXP_AVG), lowbias32(f_seeds ^ KIND_PARAM)]).contiguous()
    sums = torch.zeros((3, n), dtype=torch.float64)
    hp = _HParams(
        lr=float(lr), beta1=beta1, eps=eps, weight_decay=weight_decay, clip=clip, p=p,
        grad_scale=float(grad_scale) if grad_scale is not None else 1.0, block_size=block_size,
        maximize=int(bool(maximize)), has_grad_scale=int(grad_scale is not None), round_mode=_ROUND_MODES[mode],
    )  # fmt: skip
    lnum = torch.tensor([float(x) for x in logical], dtype=torch.float64)
    prm_w, grd_w, m_w, f_w, comp_w = work
    args = [
        n, *(_ptrs(lst) for lst in (prm_w, comp_w, grd_w, m_w, f_w)), _ptrs(exp_avg_scales), _ptrs(fisher_scales),
        (ctypes.c_int64 * n)(*local),
        ctypes.cast(lnum.data_ptr(), ctypes.POINTER(ctypes.c_double)),
        ctypes.cast(beta_hat.data_ptr(), ctypes.POINTER(ctypes.c_double)),
        ctypes.cast(seeds.data_ptr(), ctypes.POINTER(ctypes.c_int64)),
        ctypes.cast(sums.data_ptr(), ctypes.POINTER(ctypes.c_double)),
        ctypes.byref(hp),
    ]  # fmt: skip
    fn = getattr(lib, f"hf_fadam8_step_{_KERNELS[pdt]}")
    threads = torch.get_num_threads()
    if reduce is None:
        _check(fn(*args, 0, threads))
    else:
        _check(fn(*args, 1, threads))
        reduce(sums[0:1])
        _check(fn(*args, 2, threads))
        reduce(sums[1:3])
        _check(fn(*args, 3, threads))
    for orig, copy in copies:
        orig.copy_(copy)


def _check(rc: int) -> None:
    if rc != 0:
        raise RuntimeError(f"fadam8bit_cpu_: the kernel failed (code {rc}: -1 bad block_size, -2 out of memory)")
