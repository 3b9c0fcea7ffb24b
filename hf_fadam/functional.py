"""``fadam()``: the one functional entry point. It resolves ``foreach``/``fused`` and dispatches.

Implementations, all computing FADAM_SPEC.md in the same three phases with the ``reduce`` hook between them (see
:func:`fadam`), and tested against the first:

- ``_single_tensor_fadam`` (``foreach=False``): the literal per-tensor loop, the reference.
- ``_multi_tensor_fadam`` (``foreach=True``): ``torch._foreach_*`` ops per (device, param dtype, state dtype)
  group, per-tensor scalars on stacked vectors.
- ``_fused_fadam`` (``fused=True``): per (device, param dtype, state dtype) group one call into a fused kernel (one
  call for the whole list when a ``reduce`` is given): the Triton kernels on CUDA (and on CPU tensors when
  ``TRITON_INTERPRET=1``, which is how tests reach them without a GPU), the compiled C kernel on CPU.

Default (both ``None``): fused where a kernel is available for every parameter's device and (param dtype, state
dtype) pair, else foreach. DTensor parameters (FSDP2, HSDP, TP) go to ``_sharded.py`` for every implementation but
the for-loop: it steps their local shards with the implementation these rules pick for plain tensors, passing the
logical sizes as ``numels`` and an all-reduce over the sharded mesh dims as ``reduce``. Under ``torch.compile``
the default, and ``fused=True`` too, run foreach, which traces without graph breaks (the kernels are opaque to
Dynamo).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._multi_tensor import _multi_tensor_fadam
from ._rounding import SIXTEEN_BIT, check_param_rounding, resolve_param_rounding
from ._sharded import describe_sharded, has_dtensor, local_tensors, sharded_fadam
from ._single_tensor import _single_tensor_fadam


_FUSED_DTYPES = {
    "cuda": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
    "cpu": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
}


_CPU_BACKEND_VAR = "HF_FADAM_CPU_FUSED_BACKEND"


def _cpu_fused_backend() -> str:
    """Which kernel ``fused=True`` runs on CPU tensors: ``"c"`` or ``"triton"`` (interpreted).

    ``HF_FADAM_CPU_FUSED_BACKEND`` = ``auto`` (default: ``triton`` when ``TRITON_INTERPRET=1``, which is how the
    tests reach the Triton kernels without a GPU, else ``c``), ``c`` or ``triton``.
    """
    choice = os.environ.get(_CPU_BACKEND_VAR, "auto").strip().lower()
    if choice == "auto":
        return "triton" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "c"
    if choice not in ("c", "triton"):
        raise ValueError(f"Invalid {_CPU_BACKEND_VAR}={choice!r}; expected 'auto', 'c' or 'triton'")
    return choice


def _fused_kernel(device: torch.device):
    """The fused kernel entry for ``device``, or a RuntimeError that says why there is none."""
    if device.type == "cuda" or (device.type == "cpu" and _cpu_fused_backend() == "triton"):
        from .kernels import triton_fadam

        if not triton_fadam.is_available():
            raise RuntimeError(
                f"FAdam(fused=True) on {device.type} needs Triton (pip install 'hf-fadam[triton]'), and it cannot "
                f"run here: {triton_fadam.unavailable_reason()}. Use fused=None or foreach=True."
            )
        return triton_fadam.fadam_triton_
    if device.type == "cpu":
        from .kernels import cpu_fused

        if not cpu_fused.is_available():
            raise RuntimeError(
                "FAdam(fused=True) on cpu needs a C compiler (cc) to build its CPU kernel, and it is not available "
                f"here: {cpu_fused.unavailable_reason()}. Use fused=None or foreach=True."
            )
        return cpu_fused.fadam_cpu_
    raise RuntimeError(f"FAdam(fused=True) is not available on device type {device.type!r}; use foreach=True.")


def _needs_rounding(params: list[Tensor], fishers: list[Tensor], param_rounding: str) -> bool:
    """Whether a store of this call rounds other than to nearest (a 16-bit param not "nearest", or 16-bit state)."""
    return any(
        f.dtype in SIXTEEN_BIT or (t.dtype in SIXTEEN_BIT and resolve_param_rounding(param_rounding, t.dtype) != "nearest")
        for t, f in zip(params, fishers)
    )


def _fused_available(params: list[Tensor], fishers: list[Tensor], param_rounding: str = "nearest") -> bool:
    """Whether fused=None should choose the fused path for these parameters (and their state dtypes)."""
    if torch.compiler.is_compiling():
        return False
    for device_type, param_dtype, state_dtype in {(t.device.type, t.dtype, f.dtype) for t, f in zip(params, fishers)}:
        if device_type not in _FUSED_DTYPES or param_dtype not in _FUSED_DTYPES[device_type]:
            return False
        try:
            if device_type == "cuda":
                from .kernels import triton_fadam

                ok = triton_fadam.is_available() and triton_fadam.is_supported(param_dtype, state_dtype)
                ok = ok and (triton_fadam.SUPPORTS_ROUNDING or not _needs_rounding(params, fishers, param_rounding))
            else:
                from .kernels import cpu_fused

                # Never default to the interpreted Triton kernels: they exist for testing.
                ok = (
                    _cpu_fused_backend() == "c"
                    and cpu_fused.is_available()
                    and cpu_fused.is_supported(param_dtype, state_dtype)
                    and (cpu_fused.SUPPORTS_ROUNDING or not _needs_rounding(params, fishers, param_rounding))
                )
        except ImportError:
            ok = False
        if not ok:
            return False
    return True  # (DTensors never reach the kernels whole: fadam() routes them to _sharded.py first)


def resolve_implementation(
    params: list[Tensor],
    foreach: bool | None,
    fused: bool | None,
    fishers: list[Tensor] | None = None,
    param_rounding: str = "nearest",
) -> str:
    """Return ``"forloop"``, ``"foreach"`` or ``"fused"`` for these parameters (with their Fisher state) and flags."""
    if foreach and fused:
        raise ValueError("FAdam: foreach=True and fused=True contradict each other; set at most one of them.")
    if fused and torch.compiler.is_compiling():
        # The kernels are opaque to Dynamo (ctypes, Triton launches on raw pointers): a compiled step runs the
        # foreach path, which traces without graph breaks, as fused=None does.
        return "foreach"
    if fused:
        return "fused"
    if foreach:
        return "foreach"
    if foreach is False:
        return "forloop"
    if fused is None and _fused_available(params, params if fishers is None else fishers, param_rounding):
        return "fused"
    return "foreach"


def fadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    fishers: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip: float,
    p: float,
    maximize: bool,
    numels: Sequence[int] | None = None,
    reduce: Callable[[Tensor], object] | None = None,
    param_rounding: str = "nearest",
    param_comps: Sequence[Tensor | None] | None = None,
    streams: Sequence[int] | None = None,
) -> None:
    """Functional FAdam: one step over the given tensors, in place. See :class:`hf_fadam.FAdam` for the math.

    Every implementation runs three phases and calls ``reduce`` between them (the reduction hook):

    1. ``sums1[0, i] = Σ g_i²`` (g after maximize and AMP unscale); ``reduce(sums1)``
    2. ``sums2[0, i] = Σ (g_i/D_i)²``, ``sums2[1, i] = Σ (θ_i/D_i)²`` (row 1 may be 0 when weight_decay == 0);
       ``reduce(sums2)``
    3. the update, with every RMS = sqrt(sum / numels[i]).

    Args:
        numels: the logical size of each tensor for the RMS (default ``t.numel()``): a process that holds a shard
            passes the size of the whole tensor.
        reduce: called exactly twice per call (phase 1, then phase 2) with a float64 tensor of shape (k, n),
            k = 1 then 2, on the tensors' device, column i = tensor i of the lists as passed; it must turn the local
            partial sums into the sums over the whole logical tensors in place (e.g. ``dist.all_reduce(buf)``).
            ``None`` is the identity (one process). With a reduce, all tensors must be on one device; the
            implementations run phase-major over their internal dtype groups, so the count stays two.
        param_rounding: how new values of bfloat16/float16 params are stored (:mod:`hf_fadam._rounding`):
            ``"nearest"`` (the default of this function), ``"stochastic"``, ``"kahan"`` or ``"auto"``. 16-bit state
            is always stored with stochastic rounding.
        param_comps: with ``"kahan"``, each param's compensation buffer (its dtype and shape; None for params that
            are not 16-bit), updated in place.
        streams: each tensor's stream of random bits for stochastic rounding (the optimizer passes the parameter's
            position over all groups); default ``0 .. n-1``.

    With ``found_inf != 0`` (fused AMP) nothing is updated, but a ``reduce`` is still called twice (on zeros), so
    that processes never disagree on the number of collectives.
    """
    if (fused or foreach is not False) and has_dtensor(params):
        # DTensor params (FSDP2, HSDP, TP): the fastest implementation on the local shards, with logical numels and
        # one all-reduce per phase and sharding group (_sharded.py). The for-loop (foreach=False, fused not True)
        # stays on the DTensors: the oracle. The flags are resolved (and checked) for the local shards, which is
        # also cheaper than asking every DTensor for its device.
        if reduce is not None or numels is not None:
            raise ValueError("FAdam: numels/reduce take plain (local) tensors; DTensor params bring their own")
        sharded_fadam(
            params,
            grads,
            exp_avgs,
            fishers,
            state_steps,
            step_fn=fadam,
            foreach=foreach,
            fused=fused,
            grad_scale=grad_scale,
            found_inf=found_inf,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            clip=clip,
            p=p,
            maximize=maximize,
            param_rounding=param_rounding,
            param_comps=param_comps,
            streams=streams,
        )
        return
    impl = resolve_implementation(params, foreach, fused, fishers, param_rounding)
    if impl != "fused" and (grad_scale is not None or found_inf is not None):
        if fused:
            raise RuntimeError(
                "FAdam(fused=True) under torch.compile runs the foreach path (the kernels are opaque to Dynamo), "
                "which cannot unscale inside the step: call scaler.unscale_(optimizer) before the compiled step."
            )
        raise RuntimeError("FAdam: grad_scale/found_inf (AMP inside the step) are only supported with fused=True.")
    if numels is not None and len(numels) != len(params):
        raise ValueError(f"FAdam: numels has {len(numels)} entries for {len(params)} params; give one per tensor")
    check_param_rounding(param_rounding)
    hyper = dict(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, clip=clip, p=p, maximize=maximize,
        param_rounding=param_rounding, param_comps=param_comps, streams=streams,
    )  # fmt: skip
    if impl == "forloop":
        _single_tensor_fadam(params, grads, exp_avgs, fishers, state_steps, numels=numels, reduce=reduce, **hyper)
    elif impl == "foreach":
        _multi_tensor_fadam(params, grads, exp_avgs, fishers, state_steps, numels=numels, reduce=reduce, **hyper)
    else:
        _fused_fadam(
            params,
            grads,
            exp_avgs,
            fishers,
            state_steps,
            grad_scale=grad_scale,
            found_inf=found_inf,
            numels=numels,
            reduce=reduce,
            **hyper,
        )


def _fused_fadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    fishers: list[Tensor],
    state_steps: list[Tensor],
    *,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    numels: Sequence[int] | None = None,
    reduce: Callable[[Tensor], object] | None = None,
    **hyper: float | bool,
) -> None:
    """The fused path: one kernel call per (device, param dtype, state dtype) group, or, with a ``reduce``, one
    call for the whole list (one device), in which the kernel runs its dtype groups phase-major."""
    # DTensors never get here: fadam() routes them to _sharded.py. Checked per distinct (device, dtypes) key.
    keys = [(t.device, t.dtype, f.dtype) for t, f in zip(params, fishers)]
    for device, param_dtype, state_dtype in set(keys):
        if device.type not in _FUSED_DTYPES:
            raise RuntimeError(f"FAdam(fused=True) is not available on device type {device.type!r}; use foreach=True.")
        supported = _FUSED_DTYPES[device.type]
        if param_dtype not in supported or state_dtype not in supported:
            raise RuntimeError(
                f"FAdam(fused=True) supports parameter and state dtypes {[str(d) for d in supported]} on "
                f"{device.type}; got parameter dtype {param_dtype} with state dtype {state_dtype}. Use foreach=True."
            )
    lists = (params, grads, exp_avgs, fishers, state_steps)
    if reduce is not None:
        devices = {t.device for t in params}
        if len(devices) > 1:
            raise ValueError(f"FAdam: with a reduce hook all tensors of a call must be on one device; got {devices}")
        groups = {(next(iter(devices), torch.device("cpu")),): list(range(len(params)))}
    else:
        groups = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
    grad_scales = {} if grad_scale is None else {grad_scale.device: grad_scale}
    found_infs = {} if found_inf is None else {found_inf.device: found_inf}
    comps = hyper.pop("param_comps", None)
    streams = hyper.pop("streams", None)
    streams = list(range(len(params))) if streams is None else list(streams)
    for (device, *_), idx in groups.items():
        if len(idx) == len(params):  # one group (the usual case): the lists as they are
            dev_params, dev_grads, dev_exp_avgs, dev_fishers, dev_steps = lists
        else:
            dev_params, dev_grads, dev_exp_avgs, dev_fishers, dev_steps = ([lst[i] for i in idx] for lst in lists)
        kernel = _fused_kernel(device)
        if not sys.modules[kernel.__module__].SUPPORTS_ROUNDING and _needs_rounding(
            dev_params, dev_fishers, hyper["param_rounding"]
        ):
            raise RuntimeError(
                f"FAdam(fused=True): the {device.type} kernel stores 16-bit params and state to nearest only; "
                f"param_rounding={hyper['param_rounding']!r} (or 16-bit state) needs fused=None or foreach=True here"
            )
        dev_grad_scale = dev_found_inf = None
        if grad_scale is not None:
            dev_grad_scale = grad_scales.setdefault(device, grad_scale.to(device, non_blocking=True))
        if found_inf is not None:
            dev_found_inf = found_infs.setdefault(device, found_inf.to(device, non_blocking=True))
        if dev_steps:
            torch._foreach_add_(dev_steps, 1)
        kernel(
            dev_params,
            dev_grads,
            dev_exp_avgs,
            dev_fishers,
            dev_steps,
            grad_scale=dev_grad_scale,
            found_inf=dev_found_inf,
            # (passed only when given: the kernels default numels to the tensors' sizes and reduce to the identity)
            **({} if numels is None else {"numels": [numels[i] for i in idx] if len(idx) < len(params) else numels}),
            **({} if reduce is None else {"reduce": reduce}),
            param_comps=None if comps is None else [comps[i] for i in idx],
            streams=streams if len(idx) == len(params) else [streams[i] for i in idx],
            **hyper,
        )
        if dev_found_inf is not None and dev_steps:
            torch._foreach_sub_(dev_steps, [dev_found_inf] * len(dev_steps))


def describe_implementation(
    params: list[Tensor], fishers: list[Tensor] | None = None, foreach: bool | None = None, fused: bool | None = None
) -> str:
    """A human description of the implementation :func:`fadam` runs for these tensors and flags.

    For example ``"fused (C kernel, cpu)"``, ``"fused (Triton, cuda)"``, ``"foreach"``, ``"for-loop reference"``
    (the Trainer's log line uses it). It resolves exactly as :func:`fadam` does and builds nothing that is not
    already needed (asking whether the fused path is available may build the CPU kernel once).
    """
    fishers = params if fishers is None else fishers
    impl = resolve_implementation(params, foreach, fused, fishers)
    if impl == "forloop":
        return "for-loop reference"
    if has_dtensor(params):  # what fadam runs on the local shards
        local_params, local_fishers = local_tensors(params, fishers)
        return describe_sharded(params, describe_implementation(local_params, local_fishers, foreach, fused))
    if impl == "foreach":
        return "foreach"
    kernels = []
    for device_type in dict.fromkeys(t.device.type for t in params):
        if device_type == "cuda":
            kernels.append("Triton, cuda")
        elif device_type == "cpu" and _cpu_fused_backend() == "triton":
            kernels.append("Triton interpreter, cpu")
        elif device_type == "cpu":
            kernels.append("C kernel, cpu")
        else:
            kernels.append(f"unavailable on {device_type}")
    return f"fused ({'; '.join(kernels) or 'no tensors'})"
