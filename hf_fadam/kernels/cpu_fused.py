"""The fast CPU path of ``FAdam(fused=True)``: a small C kernel, compiled at first use and loaded with ctypes.

Why C and not ``torch.compile``: FAdam needs three per-tensor reductions before its update can be applied, and the
best Inductor formulation measured on CPU still made 3 sweeps with a materialised temporary (~52 B/param, 2.9-3.4x
the step time of ``torch.optim.AdamW(fused=True)``). The kernel in ``_fadam_cpu.c`` makes the minimal three passes
(sum g²; sums of (g/D)² and (θ/D)² with the new Fisher recomputed, not stored; the update), which is 44 B/param for
fp32 against AdamW's 28 B, with no temporaries, and steps every tensor of a call in one C call per pass and
(param dtype, state dtype) pair (OpenMP inside, ``torch.get_num_threads()`` threads). With a ``reduce`` hook the
three passes are separate calls with the reduction between them; without one, a single call runs them back to back
(each small tensor's three passes while it is in L1/L2). See ``docs/CONTRACT.md`` for the entry point.

Build: :mod:`hf_fadam.kernels._cpu_build` compiles the C file at first use (``-O3 -march=native -fopenmp`` with the
system C compiler), caches it in ``$HF_FADAM_CACHE_DIR`` (default ``~/.cache/hf_fadam``) and loads it only from
directories that nobody else can write. ``HF_FADAM_DISABLE_CPU_KERNEL=1`` makes :func:`is_available` return False
(the dispatcher then uses the foreach path, and ``fused=True`` raises).

Stores follow :mod:`hf_fadam._rounding` (``SUPPORTS_ROUNDING``): 16-bit state is rounded stochastically, a
bfloat16/float16 param by its group's ``param_rounding`` (``"nearest"``, ``"stochastic"``, or ``"kahan"`` with its
compensation buffer from ``param_comps``), with the random bits of :func:`hf_fadam._quant.sr_bits` and one seed per
tensor and stored quantity (:func:`hf_fadam._rounding.rounding_seeds`, computed in C from ``streams`` and the steps),
bit for bit the torch reference's 16-bit results given the same float32 values. :func:`store_stochastic` exposes
the kernel's stochastic store for tests.

Layouts: params, grads and state that are contiguous, or that share one dense (non-overlapping) layout such as a
transposed view, are used in place: the update is elementwise and the RMS is order-independent. A stochastic store
draws element i's bits by its row-major index, so a tensor stored stochastically is used in place only when
contiguous. Anything else (e.g. a strided slice) is stepped on contiguous copies that are copied back, which is
correct but not fast.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .._math import fisher_beta
from .._rounding import (
    KIND_EXP_AVG,
    KIND_FISHER,
    KIND_PARAM,
    SIXTEEN_BIT,
    check_param_rounding,
    resolve_param_rounding,
)
from . import _cpu_build


# Whether this kernel stores with hf_fadam._rounding's rules (param_rounding, stochastic 16-bit state).
SUPPORTS_ROUNDING = True

__all__ = ["fadam_cpu_", "is_available", "is_supported", "unavailable_reason", "library_path", "store_stochastic"]

_SOURCE = Path(__file__).with_name("_fadam_cpu.c")
_ABI = 3
# The build machinery, under the names the tests use.
_FLAG_SETS = _cpu_build.FLAG_SETS
_compiler = _cpu_build.compiler
_build = functools.partial(_cpu_build.build, _SOURCE)

# (param dtype, state dtype) -> exported C symbol suffix: every pair of the four float dtypes. The compute type is
# the state dtype, at least float32, as in the for-loop (hf_fadam._math.compute_dtype).
_DTYPE_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
_KERNELS = {(pd, sd): f"{ps}_{ss}" for pd, ps in _DTYPE_SUFFIX.items() for sd, ss in _DTYPE_SUFFIX.items()}
# The C kernel's param_mode of a resolved param_rounding of 16-bit params (32/64-bit params are always stored as is).
_PARAM_MODES = {"nearest": 0, "stochastic": 1, "kahan": 2}


class _HParams(ctypes.Structure):
    _fields_ = [  # noqa: RUF012 (ctypes needs a plain list)
        ("lr", ctypes.c_double),
        ("beta1", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("weight_decay", ctypes.c_double),
        ("clip", ctypes.c_double),
        ("p", ctypes.c_double),
        ("grad_scale", ctypes.c_double),
        ("maximize", ctypes.c_int),
        ("has_grad_scale", ctypes.c_int),
    ]


def _load_lib(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.hf_fadam_abi_version() != _ABI:
        raise RuntimeError(f"{path} has ABI {lib.hf_fadam_abi_version()}, expected {_ABI}")
    i64, hp = ctypes.c_int64, ctypes.POINTER(_HParams)
    ptrs, sizes, dbl = ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p
    cint, vp = ctypes.c_int, ctypes.c_void_p
    argtypes = {  # see the pass functions in _fadam_cpu.c; tensors' buffers are passed as raw addresses
        "a": [i64, ptrs, sizes, sizes, dbl, hp, cint],
        # params, grads, fishers, comps, sizes, cols, ncols, numels, beta2_hat, sums1, sums2, hp, param_mode, threads
        "b": [i64, ptrs, ptrs, ptrs, ptrs, sizes, sizes, i64, dbl, dbl, dbl, dbl, hp, cint, cint],
        # params, grads, exp_avgs, fishers, comps, sizes, cols, ncols, numels, beta2_hat, sums1, sums2, seeds, hp,
        # param_mode, threads
        "c": [i64, ptrs, ptrs, ptrs, ptrs, ptrs, sizes, sizes, i64, dbl, dbl, dbl, dbl, vp, hp, cint, cint],
    }
    argtypes["step"] = argtypes["c"]  # A, B and C with no reduction in between
    for suffix in _KERNELS.values():
        for name, types in argtypes.items():
            fn = getattr(lib, f"hf_fadam_{'step' if name == 'step' else 'pass_' + name}_{suffix}")
            fn.argtypes = types
            fn.restype = ctypes.c_int
    u32 = ctypes.c_uint32
    lib.hf_fadam_rounding_seeds.argtypes = [i64, vp, vp, u32, u32, u32, vp]
    lib.hf_fadam_rounding_seeds.restype = None
    lib.hf_fadam_store_sr.argtypes = [vp, vp, i64, cint, i64]
    lib.hf_fadam_store_sr.restype = None
    return lib


# The kernel library of this process: built and loaded at first use, a failure remembered (one attempt).
_library = _cpu_build.LazyLibrary(_SOURCE, _load_lib)


def _get_lib() -> ctypes.CDLL:
    """The loaded kernel library, built on first use; raises RuntimeError with the reason when it cannot be."""
    return _library.get()


def is_available() -> bool:
    """True when the CPU kernel is built (or can be built now) and loads; never raises."""
    return _library.is_available()


def unavailable_reason() -> str | None:
    """Why :func:`is_available` is False (the compiler command and its stderr when the build failed), else None."""
    return _library.unavailable_reason()


def library_path() -> Path | None:
    """The loaded library (for diagnostics), or None before the first successful load."""
    return _library.path


def is_supported(param_dtype: torch.dtype, state_dtype: torch.dtype) -> bool:
    """Whether the kernel handles this (param dtype, state dtype) pair (it computes in the state dtype)."""
    return (param_dtype, state_dtype) in _KERNELS


def store_stochastic(x: Tensor, dtype: torch.dtype, seed: int) -> Tensor:
    """The kernel's stochastic store of float32 ``x`` into ``dtype`` (bfloat16 or float16), element ``i`` of ``x``'s
    row-major order with the random bits of element ``i`` of a tensor seeded ``seed``: a test hook, bit for bit
    :func:`hf_fadam._rounding.round_stochastic` (``dtype`` and ``seed`` as there)."""
    if dtype not in SIXTEEN_BIT:
        raise ValueError(f"store_stochastic: dtype must be bfloat16 or float16; got {dtype}")
    x = x.detach().to("cpu", torch.float32).contiguous()
    out = torch.empty(x.shape, dtype=dtype)
    _get_lib().hf_fadam_store_sr(x.data_ptr(), out.data_ptr(), x.numel(), int(dtype == torch.float16), int(seed))
    return out


def _rounding_seeds(streams: Sequence[int] | None, steps: Tensor) -> Tensor:
    """The (3, n) int64 seeds of the param, exp_avg and fisher stores (rows in that order) of the tensors whose
    stacked, already incremented step counts are ``steps``: :func:`hf_fadam._rounding.rounding_seeds` of the three
    kinds, computed by the C library (no per-step torch ops)."""
    n = steps.numel()
    steps = steps.to("cpu", torch.float32).contiguous()
    seeds = torch.empty((3, n), dtype=torch.int64)
    stream_arr = None if streams is None else (ctypes.c_int64 * n)(*streams)
    _get_lib().hf_fadam_rounding_seeds(n, stream_arr, steps.data_ptr(), KIND_PARAM, KIND_EXP_AVG, KIND_FISHER,
                                       seeds.data_ptr())  # fmt: skip
    return seeds


def _dense_layout(t: Tensor) -> bool:
    """True when ``t``'s elements exactly tile ``numel`` consecutive storage slots (any dim order, no gaps)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:  # sorted by stride: dense iff each stride is the product of the smaller sizes
            return False
        expected *= size
    return True


def _same_dense_layout(ts: Sequence[Tensor]) -> bool:
    """True when the kernel may walk the raw storage of all of ``ts`` in one order (elementwise update)."""
    first = ts[0]
    if all(t.is_contiguous() for t in ts):
        return True
    return all(t.shape == first.shape and t.stride() == first.stride() for t in ts) and _dense_layout(first)


@torch.no_grad()
def fadam_cpu_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    fishers: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
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
    """One FAdam step, in place on ``params``, ``exp_avgs`` (m) and ``fishers`` (f), for CPU tensors.

    Called by ``hf_fadam.functional``; ``steps`` are already incremented. The lists may mix (param dtype, state
    dtype) pairs: each pass runs over every pair's group before the next pass starts, so that ``reduce`` (the
    reduction hook of :func:`hf_fadam.functional.fadam`) is called exactly twice: pass A writes each tensor's
    local Σg² into a (1, n) float64 buffer, ``reduce`` makes it the whole tensor's, pass B writes Σ(g/D)² and
    Σ(θ/D)² into a (2, n) buffer, ``reduce`` again, pass C updates. ``numels`` are the logical sizes the RMS
    divides by (default: the tensors' sizes). ``grad_scale`` divides the gradients inside the kernel (the grads
    are not modified); a nonzero ``found_inf`` leaves everything unchanged (a ``reduce`` is still called twice, on
    zeros). β̂2 comes from :func:`hf_fadam._math.fisher_beta` in float64, so every path uses the same value.

    Stores (:mod:`hf_fadam._rounding`): ``param_rounding`` (the group's mode) for bfloat16/float16 params, with
    ``param_comps`` (one buffer of the param's dtype and shape per ``"kahan"`` param, None elsewhere) updated in
    place; 16-bit state stochastically. ``streams``: each tensor's stream of random bits (default ``0 .. n-1``).
    """
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(fishers) == len(steps) == n):
        raise ValueError(
            f"fadam_cpu_: list lengths differ: params={n}, grads={len(grads)}, exp_avgs={len(exp_avgs)}, "
            f"fishers={len(fishers)}, steps={len(steps)}"
        )
    if numels is not None and len(numels) != n:
        raise ValueError(f"fadam_cpu_: numels has {len(numels)} entries for {n} params")
    sums1 = torch.zeros((1, n), dtype=torch.float64)
    sums2 = torch.zeros((2, n), dtype=torch.float64)
    if n == 0 or (found_inf is not None and float(found_inf) != 0.0):  # CPU tensor: no device sync involved
        if reduce is not None:
            reduce(sums1)
            reduce(sums2)
        return
    lib = _get_lib()
    steps_t = torch.stack(steps)
    beta_hat = fisher_beta(beta2, steps_t).to("cpu", torch.float64).contiguous()
    numels_d = torch.tensor([t.numel() for t in params] if numels is None else list(numels), dtype=torch.float64)
    hp = _HParams(
        lr=float(lr),
        beta1=beta1,
        eps=eps,
        weight_decay=weight_decay,
        clip=clip,
        p=p,
        grad_scale=float(grad_scale) if grad_scale is not None else 1.0,
        maximize=int(bool(maximize)),
        has_grad_scale=int(grad_scale is not None),
    )
    check_param_rounding(param_rounding)
    if streams is not None and len(streams) != n:
        raise ValueError(f"fadam_cpu_: streams has {len(streams)} entries for {n} params")
    if param_comps is not None and len(param_comps) != n:
        raise ValueError(f"fadam_cpu_: param_comps has {len(param_comps)} entries for {n} params")
    lists = (params, grads, exp_avgs, fishers)
    pdt, sdt = params[0].dtype, fishers[0].dtype
    mode = _param_mode(param_rounding, pdt)
    copies: list[tuple[Tensor, Tensor]] = []  # (original, contiguous working copy) to write back
    # Fast path (the usual case): one dtype pair, every tensor contiguous; list comprehensions only, because the
    # per-tensor Python overhead is what a many-small-tensor model pays on every step.
    fast = (
        (pdt, sdt) in _KERNELS
        and all(t.is_cpu and t.dtype == pdt and t.is_contiguous() for t in params)
        and all(t.is_cpu and t.dtype == pdt and t.is_contiguous() for t in grads)
        and all(t.is_cpu and t.dtype == sdt and t.is_contiguous() for t in exp_avgs)
        and all(t.is_cpu and t.dtype == sdt and t.is_contiguous() for t in fishers)
        and all(a.numel() == b.numel() == c.numel() == d.numel() for a, b, c, d in zip(*lists))
        and (
            mode != _KAHAN
            or (
                param_comps is not None
                and all(
                    c is not None and c.is_cpu and c.dtype == pdt and c.is_contiguous() and c.shape == t.shape
                    for c, t in zip(param_comps, params)
                )
            )
        )
    )
    if fast:
        launches = [
            _Launch(_KERNELS[(pdt, sdt)], None, lists, range(n), param_comps if mode == _KAHAN else None, mode)
        ]
        random = sdt in SIXTEEN_BIT or mode == _STOCHASTIC
    else:
        launches, random = _general_launches(lists, param_rounding, param_comps, copies)
    # the seeds of the stochastic stores, by column (rows: param, exp_avg, fisher); kept alive over the calls
    seeds_t = _rounding_seeds(streams, steps_t) if random else None
    seeds = None if seeds_t is None else seeds_t.data_ptr()

    threads = torch.get_num_threads()
    addr = Tensor.data_ptr
    if reduce is None:  # one process: the three passes without a break, each small tensor's while it is cache-hot
        for g in launches:
            g.check(getattr(lib, f"hf_fadam_step_{g.suffix}")(
                g.k, g.params, g.grads, g.exp_avgs, g.fishers, g.comps, g.sizes, g.cols, n,
                addr(numels_d), addr(beta_hat), addr(sums1), addr(sums2), seeds, hp, g.mode, threads,
            ))  # fmt: skip
        for orig, copy in copies:
            orig.copy_(copy)
        return
    for g in launches:  # pass A: local Σg²
        g.check(getattr(lib, f"hf_fadam_pass_a_{g.suffix}")(g.k, g.grads, g.sizes, g.cols, addr(sums1), hp, threads))
    reduce(sums1)
    for g in launches:  # pass B: ε̂ from the reduced Σg²; local Σ(g/D)², Σ(θ/D)² (θ + comp with kahan)
        g.check(getattr(lib, f"hf_fadam_pass_b_{g.suffix}")(
            g.k, g.params, g.grads, g.fishers, g.comps, g.sizes, g.cols, n,
            addr(numels_d), addr(beta_hat), addr(sums1), addr(sums2), hp, g.mode, threads,
        ))  # fmt: skip
    reduce(sums2)
    for g in launches:  # pass C: the update, with the clip divisors from the reduced sums
        g.check(getattr(lib, f"hf_fadam_pass_c_{g.suffix}")(
            g.k, g.params, g.grads, g.exp_avgs, g.fishers, g.comps, g.sizes, g.cols, n,
            addr(numels_d), addr(beta_hat), addr(sums1), addr(sums2), seeds, hp, g.mode, threads,
        ))  # fmt: skip
    for orig, copy in copies:
        orig.copy_(copy)


_NEAREST, _STOCHASTIC, _KAHAN = _PARAM_MODES["nearest"], _PARAM_MODES["stochastic"], _PARAM_MODES["kahan"]


def _param_mode(param_rounding: str, param_dtype: torch.dtype) -> int:
    """The C kernel's param_mode for params of ``param_dtype``: hf_fadam._rounding.resolve_param_rounding's."""
    return _PARAM_MODES[resolve_param_rounding(param_rounding, param_dtype)]


def _general_launches(
    lists: tuple[list[Tensor], ...],
    param_rounding: str,
    param_comps: Sequence[Tensor | None] | None,
    copies: list[tuple[Tensor, Tensor]],
) -> tuple[list[_Launch], bool]:
    """The launches of a call that the fast path does not take: each tensor checked, grouped by dtype pair, and
    stepped on contiguous copies (appended to ``copies``) where its layout cannot be used in place. Also whether any
    store rounds stochastically (then the seeds are needed)."""
    by_kernel: dict[str, list[int]] = {}
    modes: dict[str, int] = {}
    work = [list(lst) for lst in lists]
    comps_work: list[Tensor | None] = [None] * len(lists[0])
    random = False
    for i, (prm, grd, m, f) in enumerate(zip(*lists)):
        if not (prm.is_cpu and grd.is_cpu and m.is_cpu and f.is_cpu):
            raise ValueError(
                f"fadam_cpu_: params[{i}] and its grad and state must be CPU tensors; got {prm.device}, "
                f"{grd.device}, {m.device}, {f.device}"
            )
        suffix = _KERNELS.get((prm.dtype, f.dtype))
        if suffix is None or grd.dtype != prm.dtype or m.dtype != f.dtype:
            raise TypeError(
                f"fadam_cpu_: unsupported dtypes at index {i}: param {prm.dtype}, grad {grd.dtype}, exp_avg "
                f"{m.dtype}, fisher {f.dtype} (supported: params and state of "
                f"{', '.join(str(d) for d in _DTYPE_SUFFIX)}, grad dtype = param dtype, exp_avg dtype = "
                "fisher dtype)"
            )
        if not prm.numel() == grd.numel() == m.numel() == f.numel():
            # the kernel reads and writes all four through raw pointers over the param's elements
            raise ValueError(
                f"fadam_cpu_: element counts differ at index {i}: param {prm.numel()}, grad {grd.numel()}, "
                f"exp_avg {m.numel()}, fisher {f.numel()}"
            )
        mode = modes[suffix] = _param_mode(param_rounding, prm.dtype)
        tensors = [prm, grd, m, f]
        if mode == _KAHAN:
            comp = None if param_comps is None else param_comps[i]
            if comp is None or not comp.is_cpu or comp.dtype != prm.dtype or comp.shape != prm.shape:
                raise ValueError(
                    f"fadam_cpu_: param_comps[{i}] must be a CPU {prm.dtype} tensor shaped like its param"
                )
            tensors.append(comp)
        row_major = f.dtype in SIXTEEN_BIT or mode == _STOCHASTIC  # element i's random bits: its row-major index
        random = random or row_major
        if prm.numel() > 0 and not (
            all(t.is_contiguous() for t in tensors) or (not row_major and _same_dense_layout(tensors))
        ):
            for k, t in enumerate(tensors):
                c = t.contiguous()
                if c is not t and t is not grd:
                    copies.append((t, c))
                tensors[k] = c
        for lst, t in zip(work, tensors):
            lst[i] = t
        if mode == _KAHAN:
            comps_work[i] = tensors[4]
        by_kernel.setdefault(suffix, []).append(i)
    launches = [
        _Launch(suffix, idx, work, idx, comps_work if modes[suffix] == _KAHAN else None, modes[suffix])
        for suffix, idx in by_kernel.items()
    ]
    return launches, random


class _Launch:
    """The ctypes arguments of one (param dtype, state dtype) group: pointer arrays, local sizes, the columns
    (indices into the call's lists and sums buffers; None = the identity), the params' store mode and, with
    ``"kahan"``, the compensation buffers' pointers (else NULL)."""

    __slots__ = ("cols", "comps", "exp_avgs", "fishers", "grads", "k", "mode", "params", "sizes", "suffix")

    def __init__(
        self,
        suffix: str,
        cols: list[int] | None,
        lists: Sequence[list[Tensor]],
        idx: Sequence[int],
        comps: Sequence[Tensor | None] | None,
        mode: int,
    ):
        k = self.k = len(idx)
        self.suffix = suffix
        self.mode = mode
        rows = [[lst[i].data_ptr() for i in idx] for lst in lists]
        self.params, self.grads, self.exp_avgs, self.fishers = ((ctypes.c_void_p * k)(*row) for row in rows)
        self.comps = None if comps is None else (ctypes.c_void_p * k)(*[comps[i].data_ptr() for i in idx])
        self.sizes = (ctypes.c_int64 * k)(*[lists[0][i].numel() for i in idx])
        self.cols = None if cols is None else (ctypes.c_int64 * k)(*cols)

    @staticmethod
    def check(status: int) -> None:
        if status == -2:  # (the wrapper passes them: a bug if it is ever raised)
            raise ValueError("fadam_cpu_: the kernel's rounding arguments are incomplete (comps or seeds missing)")
        if status != 0:
            raise MemoryError("fadam_cpu_: the kernel could not allocate its partial-sum buffer")
