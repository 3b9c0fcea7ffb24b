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

Layouts: params, grads and state that are contiguous, or that share one dense (non-overlapping) layout such as a
transposed view, are used in place: the update is elementwise and the RMS is order-independent. Anything else
(e.g. a strided slice) is stepped on contiguous copies that are copied back, which is correct but not fast.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .._math import fisher_beta
from . import _cpu_build


__all__ = ["fadam_cpu_", "is_available", "is_supported", "unavailable_reason", "library_path"]

_SOURCE = Path(__file__).with_name("_fadam_cpu.c")
_ABI = 2
# The build machinery, under the names the tests use.
_FLAG_SETS = _cpu_build.FLAG_SETS
_compiler = _cpu_build.compiler
_build = functools.partial(_cpu_build.build, _SOURCE)

# (param dtype, state dtype) -> exported C symbol suffix: every pair of the four float dtypes. The compute type is
# the state dtype, at least float32, as in the for-loop (hf_fadam._math.compute_dtype).
_DTYPE_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
_KERNELS = {(pd, sd): f"{ps}_{ss}" for pd, ps in _DTYPE_SUFFIX.items() for sd, ss in _DTYPE_SUFFIX.items()}


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
    argtypes = {  # see the pass functions in _fadam_cpu.c; double buffers are passed as raw addresses
        "a": [i64, ptrs, sizes, sizes, dbl, hp, ctypes.c_int],
        "b": [i64, ptrs, ptrs, ptrs, sizes, sizes, i64, dbl, dbl, dbl, dbl, hp, ctypes.c_int],
        "c": [i64, ptrs, ptrs, ptrs, ptrs, sizes, sizes, i64, dbl, dbl, dbl, dbl, hp, ctypes.c_int],
    }
    argtypes["step"] = argtypes["c"]  # A, B and C with no reduction in between
    for suffix in _KERNELS.values():
        for name, types in argtypes.items():
            fn = getattr(lib, f"hf_fadam_{'step' if name == 'step' else 'pass_' + name}_{suffix}")
            fn.argtypes = types
            fn.restype = ctypes.c_int
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
    beta_hat = fisher_beta(beta2, torch.stack(steps)).to("cpu", torch.float64).contiguous()
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
    lists = (params, grads, exp_avgs, fishers)
    pdt, sdt = params[0].dtype, fishers[0].dtype
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
    )
    if fast:
        launches = [_Launch(_KERNELS[(pdt, sdt)], None, lists, range(n))]
    else:
        # General path: check each tensor, group by dtype pair, step non-dense layouts on contiguous copies.
        by_kernel: dict[str, list[int]] = {}
        work = [list(lst) for lst in lists]
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
            if prm.numel() > 0 and not _same_dense_layout((prm, grd, m, f)):
                for lst, t in zip(work, (prm, grd, m, f)):
                    c = t.contiguous()
                    if c is not t and t is not grd:
                        copies.append((t, c))
                    lst[i] = c
            by_kernel.setdefault(suffix, []).append(i)
        launches = [_Launch(suffix, idx, work, idx) for suffix, idx in by_kernel.items()]

    threads = torch.get_num_threads()
    addr = Tensor.data_ptr
    if reduce is None:  # one process: the three passes without a break, each small tensor's while it is cache-hot
        for g in launches:
            g.check(getattr(lib, f"hf_fadam_step_{g.suffix}")(
                g.k, g.params, g.grads, g.exp_avgs, g.fishers, g.sizes, g.cols, n,
                addr(numels_d), addr(beta_hat), addr(sums1), addr(sums2), hp, threads,
            ))  # fmt: skip
        for orig, copy in copies:
            orig.copy_(copy)
        return
    for g in launches:  # pass A: local Σg²
        g.check(getattr(lib, f"hf_fadam_pass_a_{g.suffix}")(g.k, g.grads, g.sizes, g.cols, addr(sums1), hp, threads))
    if reduce is not None:
        reduce(sums1)
    for g in launches:  # pass B: ε̂ from the reduced Σg²; local Σ(g/D)², Σ(θ/D)²
        g.check(getattr(lib, f"hf_fadam_pass_b_{g.suffix}")(
            g.k, g.params, g.grads, g.fishers, g.sizes, g.cols, n,
            addr(numels_d), addr(beta_hat), addr(sums1), addr(sums2), hp, threads,
        ))  # fmt: skip
    if reduce is not None:
        reduce(sums2)
    for g in launches:  # pass C: the update, with the clip divisors from the reduced sums
        g.check(getattr(lib, f"hf_fadam_pass_c_{g.suffix}")(
            g.k, g.params, g.grads, g.exp_avgs, g.fishers, g.sizes, g.cols, n,
            addr(numels_d), addr(beta_hat), addr(sums1), addr(sums2), hp, threads,
        ))  # fmt: skip
    for orig, copy in copies:
        orig.copy_(copy)


class _Launch:
    """The ctypes arguments of one (param dtype, state dtype) group: pointer arrays, local sizes, and the columns
    (indices into the call's lists and sums buffers; None = the identity)."""

    __slots__ = ("cols", "exp_avgs", "fishers", "grads", "k", "params", "sizes", "suffix")

    def __init__(self, suffix: str, cols: list[int] | None, lists: Sequence[list[Tensor]], idx: Sequence[int]):
        k = self.k = len(idx)
        self.suffix = suffix
        rows = [[lst[i].data_ptr() for i in idx] for lst in lists]
        self.params, self.grads, self.exp_avgs, self.fishers = ((ctypes.c_void_p * k)(*row) for row in rows)
        self.sizes = (ctypes.c_int64 * k)(*[lists[0][i].numel() for i in idx])
        self.cols = None if cols is None else (ctypes.c_int64 * k)(*cols)

    @staticmethod
    def check(status: int) -> None:
        if status != 0:
            raise MemoryError("fadam_cpu_: the kernel could not allocate its partial-sum buffer")
