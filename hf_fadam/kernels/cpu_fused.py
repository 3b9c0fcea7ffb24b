"""The fast CPU path of ``FAdam(fused=True)``: a small C kernel, compiled at first use and loaded with ctypes.

Why C and not ``torch.compile``: FAdam needs three per-tensor reductions before its update can be applied, and the
best Inductor formulation measured on CPU still made 3 sweeps with a materialised temporary (~52 B/param, 2.9-3.4x
the step time of ``torch.optim.AdamW(fused=True)``). The kernel in ``_fadam_cpu.c`` makes the minimal three passes
(sum g²; sums of (g/D)² and (θ/D)² with the new Fisher recomputed, not stored; the update), which is 44 B/param for
fp32 against AdamW's 28 B, with no temporaries, and steps every tensor of a group in one call (OpenMP inside,
``torch.get_num_threads()`` threads). See ``docs/CONTRACT.md`` for the entry point.

Build: the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) compiles the C file with ``-O3
-march=native -fopenmp`` (falling back to portable flags and then to no OpenMP when the compiler refuses those)
into ``$HF_FADAM_CACHE_DIR`` (default ``~/.cache/hf_fadam``), in a directory named by a hash of the source, the
flags, the compiler's version and the CPU, so a changed kernel, compiler or machine never loads a stale binary. The
library is written to a temporary name and renamed into place, so concurrent processes (DDP ranks, test workers)
can build at the same time safely (an unwritable cache directory falls back to a per-user directory under the
system temp dir). The first build takes about a second. ``HF_FADAM_DISABLE_CPU_KERNEL=1`` makes
:func:`is_available` return False (the dispatcher then uses the foreach path, and ``fused=True`` raises).

Layouts: params, grads and state that are contiguous, or that share one dense (non-overlapping) layout such as a
transposed view, are used in place: the update is elementwise and the RMS is order-independent. Anything else
(e.g. a strided slice) is stepped on contiguous copies that are copied back, which is correct but not fast.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .._math import fisher_beta


__all__ = ["fadam_cpu_", "is_available", "is_supported", "unavailable_reason", "library_path"]

_SOURCE = Path(__file__).with_name("_fadam_cpu.c")
_ABI = 1
_BASE_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
# Tried in order until one compiles and loads: native ISA + OpenMP, portable + OpenMP, then without the OpenMP
# runtime (the kernel is then single-threaded; -fopenmp-simd still lets the double-precision sums vectorize).
_FLAG_SETS = (
    ["-march=native", "-fopenmp"],
    ["-fopenmp"],
    ["-march=native", "-fopenmp-simd"],
    ["-fopenmp-simd"],
    ["-march=native"],
    [],
)

# (param dtype, state dtype) -> exported C symbol suffix. The compute type is the state dtype, as in the for-loop.
_KERNELS = {
    (torch.float32, torch.float32): "f32_f32",
    (torch.float64, torch.float64): "f64_f64",
    (torch.bfloat16, torch.float32): "bf16_f32",
    (torch.float16, torch.float32): "f16_f32",
    (torch.float32, torch.float64): "f32_f64",
    (torch.float64, torch.float32): "f64_f32",
}


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


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_path: Path | None = None
_error: str | None = None


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"


def _cpu_fingerprint() -> str:
    """Enough of the CPU's identity that a ``-march=native`` binary never runs on a CPU without its ISA."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    text += line
                if line.strip() == "":
                    break  # the first processor's block is enough
    except OSError:
        text += platform.processor()
    return text


def _cache_root() -> Path:
    env = os.environ.get("HF_FADAM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "hf_fadam"


def _build(cc: str, flags: list[str]) -> Path:
    """Compile the kernel with ``flags`` unless an identical build is cached; return the library path."""
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, " ".join(flags).encode(), _compiler_version(cc).encode(), _cpu_fingerprint().encode()])
    ).hexdigest()[:16]
    out_dir = _cache_root() / f"cpu_kernel-{key}"
    lib = out_dir / "libhf_fadam_cpu.so"
    if lib.exists():
        return lib
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError:  # e.g. a read-only home directory: build into a per-user temporary directory instead
        out_dir = Path(tempfile.gettempdir()) / f"hf_fadam-{os.getuid() if hasattr(os, 'getuid') else 0}"
        out_dir = out_dir / f"cpu_kernel-{key}"
        lib = out_dir / "libhf_fadam_cpu.so"
        if lib.exists():
            return lib
        out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [cc, *flags, *_BASE_FLAGS, str(_SOURCE), "-o", tmp, "-lm"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(
                f"building the FAdam CPU kernel failed (exit {proc.returncode}).\ncommand: {' '.join(cmd)}\n"
                f"stderr:\n{proc.stderr.strip()}"
            )
        os.replace(tmp, lib)  # atomic: a concurrent builder either sees no file or a complete one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load_lib(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.hf_fadam_abi_version() != _ABI:
        raise RuntimeError(f"{path} has ABI {lib.hf_fadam_abi_version()}, expected {_ABI}")
    vp = ctypes.POINTER(ctypes.c_void_p)
    for suffix in _KERNELS.values():
        fn = getattr(lib, f"hf_fadam_step_{suffix}")
        fn.argtypes = [
            ctypes.c_int64, vp, vp, vp, vp,
            ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_double),
            ctypes.POINTER(_HParams), ctypes.c_int,
        ]  # fmt: skip
        fn.restype = ctypes.c_int
    return lib


def _get_lib() -> ctypes.CDLL:
    """The loaded kernel library, built on first use; raises RuntimeError with the reason when it cannot be."""
    global _lib, _lib_path, _error
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        if _error is not None:
            raise RuntimeError(_error)
        if os.environ.get("HF_FADAM_DISABLE_CPU_KERNEL", "") not in ("", "0"):
            _error = "the FAdam CPU kernel is disabled by HF_FADAM_DISABLE_CPU_KERNEL"
            raise RuntimeError(_error)
        cc = _compiler()
        if cc is None:
            _error = (
                "the FAdam CPU kernel needs a C compiler at first use, and none was found (tried $CC, cc, gcc, "
                "clang). Install one (e.g. `apt-get install gcc`) or use FAdam(foreach=True) on CPU."
            )
            raise RuntimeError(_error)
        errors = []
        for flags in _FLAG_SETS:
            try:
                path = _build(cc, flags)
                lib = _load_lib(path)
            except (RuntimeError, OSError, AttributeError, subprocess.SubprocessError) as exc:
                errors.append(str(exc))
                continue
            _lib, _lib_path = lib, path
            return lib
        _error = "could not build the FAdam CPU kernel; the first attempt:\n" + errors[0]
        raise RuntimeError(_error)


def is_available() -> bool:
    """True when the CPU kernel is built (or can be built now) and loads; never raises."""
    try:
        _get_lib()
    except RuntimeError:
        return False
    return True


def unavailable_reason() -> str | None:
    """Why :func:`is_available` is False (the compiler command and its stderr when the build failed), else None."""
    return None if is_available() else _error


def library_path() -> Path | None:
    """The loaded library (for diagnostics), or None before the first successful load."""
    return _lib_path


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
) -> None:
    """One FAdam step, in place on ``params``, ``exp_avgs`` (m) and ``fishers`` (f), for CPU tensors.

    Called once per (device, param dtype) group by ``hf_fadam.functional``; ``steps`` are already incremented.
    ``grad_scale`` divides the gradients inside the kernel (the grads are not modified); a nonzero ``found_inf``
    leaves everything unchanged. β̂2 comes from :func:`hf_fadam._math.fisher_beta` so every path uses the same
    float64 value. Reductions are in double; the elementwise math is in the state dtype.
    """
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(fishers) == len(steps) == n):
        raise ValueError(
            f"fadam_cpu_: list lengths differ: params={n}, grads={len(grads)}, exp_avgs={len(exp_avgs)}, "
            f"fishers={len(fishers)}, steps={len(steps)}"
        )
    if n == 0:
        return
    if found_inf is not None and float(found_inf) != 0.0:  # CPU tensor: no device sync involved
        return
    lib = _get_lib()
    beta_hat = fisher_beta(beta2, torch.stack(steps)).to("cpu", torch.float64).contiguous()
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
    # Fast path (the usual case): one dtype pair, every tensor contiguous; list comprehensions only, because the
    # per-tensor Python overhead is what a many-small-tensor model pays on every step.
    fast = (
        (pdt, sdt) in _KERNELS
        and all(t.is_cpu and t.dtype == pdt and t.is_contiguous() for t in params)
        and all(t.dtype == pdt and t.is_contiguous() for t in grads)
        and all(t.dtype == sdt and t.is_contiguous() for t in exp_avgs)
        and all(t.dtype == sdt and t.is_contiguous() for t in fishers)
    )
    if fast:
        _launch(lib, _KERNELS[(pdt, sdt)], [[t.data_ptr() for t in lst] for lst in lists], params, beta_hat, hp)
        return

    # General path: check each tensor, group by dtype pair, step non-dense layouts on contiguous copies.
    by_kernel: dict[str, list[int]] = {}
    copies: list[tuple[Tensor, Tensor]] = []  # (original, contiguous working copy) to write back
    work = [list(lst) for lst in lists]
    for i, (prm, grd, m, f) in enumerate(zip(*lists)):
        if not prm.is_cpu:
            raise ValueError(f"fadam_cpu_: params[{i}] is on {prm.device}; this kernel steps CPU tensors only")
        suffix = _KERNELS.get((prm.dtype, f.dtype))
        if suffix is None or grd.dtype != prm.dtype or m.dtype != f.dtype:
            raise TypeError(
                f"fadam_cpu_: unsupported dtypes at index {i}: param {prm.dtype}, grad {grd.dtype}, exp_avg "
                f"{m.dtype}, fisher {f.dtype} (supported (param, state) pairs: "
                f"{', '.join(f'({a}, {b})' for a, b in _KERNELS)})"
            )
        if prm.numel() > 0 and not _same_dense_layout((prm, grd, m, f)):
            for lst, t in zip(work, (prm, grd, m, f)):
                c = t.contiguous()
                if c is not t and t is not grd:
                    copies.append((t, c))
                lst[i] = c
        by_kernel.setdefault(suffix, []).append(i)
    for suffix, idx in by_kernel.items():
        ptrs = [[lst[j].data_ptr() for j in idx] for lst in work]
        bh = beta_hat if len(idx) == n else beta_hat[idx].contiguous()
        _launch(lib, suffix, ptrs, [params[j] for j in idx], bh, hp)
    for orig, copy in copies:
        orig.copy_(copy)


def _launch(lib: ctypes.CDLL, suffix: str, ptrs: list[list[int]], params: list[Tensor], beta_hat, hp) -> None:
    k = len(params)
    arrs = [(ctypes.c_void_p * k)(*row) for row in ptrs]
    numels = (ctypes.c_int64 * k)(*[t.numel() for t in params])
    bh = ctypes.cast(beta_hat.data_ptr(), ctypes.POINTER(ctypes.c_double))
    getattr(lib, f"hf_fadam_step_{suffix}")(k, *arrs, numels, bh, ctypes.byref(hp), torch.get_num_threads())
