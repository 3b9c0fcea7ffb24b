"""``fadam()``: the one functional entry point. It resolves ``foreach``/``fused`` and dispatches.

Implementations, all computing FADAM_SPEC.md and tested against the first:

- ``_single_tensor_fadam`` (``foreach=False``): the literal per-tensor loop, the reference.
- ``_multi_tensor_fadam`` (``foreach=True``): ``torch._foreach_*`` ops per (device, dtype) group; DTensor-safe.
- ``_fused_fadam`` (``fused=True``): per (device, dtype) group one call into a fused kernel: the Triton kernels on
  CUDA (and on CPU tensors when ``TRITON_INTERPRET=1``, which is how tests reach them without a GPU), the
  compiled C kernel on CPU.

Default (both ``None``): fused where a kernel is available for every parameter's device and dtype and no parameter
is a DTensor (a kernel sees only the local shard, so it cannot take a whole-tensor RMS), else foreach. Under
``torch.compile`` the default is foreach, which traces without graph breaks.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from ._multi_tensor import _is_dtensor, _multi_tensor_fadam
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
                f"FAdam(fused=True) on {device.type} needs Triton (pip install 'hf-fadam[triton]'); "
                "it is not importable here. Use fused=None or foreach=True."
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


def _fused_available(params: list[Tensor], fishers: list[Tensor]) -> bool:
    """Whether fused=None should choose the fused path for these parameters (and their state dtypes)."""
    if torch.compiler.is_compiling():
        return False
    for device_type in {t.device.type for t in params}:
        if device_type not in _FUSED_DTYPES:
            return False
        try:
            if device_type == "cuda":
                from .kernels import triton_fadam

                ok = triton_fadam.is_available()
            else:
                from .kernels import cpu_fused

                # Never default to the interpreted Triton kernels: they exist for testing.
                ok = _cpu_fused_backend() == "c" and cpu_fused.is_available()
        except ImportError:
            ok = False
        if not ok:
            return False
    if not all(t.dtype in _FUSED_DTYPES[t.device.type] and not _is_dtensor(t) for t in params):
        return False
    if any(t.device.type == "cpu" for t in params):
        from .kernels import cpu_fused

        return all(cpu_fused.is_supported(t.dtype, f.dtype) for t, f in zip(params, fishers) if t.device.type == "cpu")
    return True


def resolve_implementation(
    params: list[Tensor], foreach: bool | None, fused: bool | None, fishers: list[Tensor] | None = None
) -> str:
    """Return ``"forloop"``, ``"foreach"`` or ``"fused"`` for these parameters (with their Fisher state) and flags."""
    if foreach and fused:
        raise ValueError("FAdam: foreach=True and fused=True contradict each other; set at most one of them.")
    if fused:
        return "fused"
    if foreach:
        return "foreach"
    if foreach is False:
        return "forloop"
    if fused is None and _fused_available(params, params if fishers is None else fishers):
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
) -> None:
    """Functional FAdam: one step over the given tensors, in place. See :class:`hf_fadam.FAdam` for the math."""
    impl = resolve_implementation(params, foreach, fused, fishers)
    if impl != "fused" and (grad_scale is not None or found_inf is not None):
        raise RuntimeError("FAdam: grad_scale/found_inf (AMP inside the step) are only supported with fused=True.")
    hyper = dict(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, clip=clip, p=p, maximize=maximize
    )
    if impl == "forloop":
        _single_tensor_fadam(params, grads, exp_avgs, fishers, state_steps, **hyper)
    elif impl == "foreach":
        _multi_tensor_fadam(params, grads, exp_avgs, fishers, state_steps, **hyper)
    else:
        _fused_fadam(
            params, grads, exp_avgs, fishers, state_steps, grad_scale=grad_scale, found_inf=found_inf, **hyper
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
    **hyper: float | bool,
) -> None:
    if not params:
        return
    for t in params:
        if _is_dtensor(t):
            raise RuntimeError(
                "FAdam(fused=True) does not support DTensor (FSDP2) parameters: a fused kernel sees only the local "
                "shard and would take per-shard RMS values. Use foreach=True (the default for DTensors)."
            )
        if t.device.type not in _FUSED_DTYPES:
            raise RuntimeError(
                f"FAdam(fused=True) is not available on device type {t.device.type!r}; use foreach=True."
            )
        supported = _FUSED_DTYPES[t.device.type]
        if t.dtype not in supported:
            raise RuntimeError(
                f"FAdam(fused=True) supports parameter dtypes {[str(d) for d in supported]} on {t.device.type}; "
                f"got {t.dtype}. Use foreach=True."
            )
    grad_scales = {} if grad_scale is None else {grad_scale.device: grad_scale}
    found_infs = {} if found_inf is None else {found_inf.device: found_inf}
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, fishers, state_steps])
    for (device, _), ((dev_params, dev_grads, dev_exp_avgs, dev_fishers, dev_steps), _) in grouped.items():
        kernel = _fused_kernel(device)
        dev_grad_scale = dev_found_inf = None
        if grad_scale is not None:
            dev_grad_scale = grad_scales.setdefault(device, grad_scale.to(device, non_blocking=True))
        if found_inf is not None:
            dev_found_inf = found_infs.setdefault(device, found_inf.to(device, non_blocking=True))
        torch._foreach_add_(dev_steps, 1)
        kernel(
            dev_params,
            dev_grads,
            dev_exp_avgs,
            dev_fishers,
            dev_steps,
            grad_scale=dev_grad_scale,
            found_inf=dev_found_inf,
            **hyper,
        )
        if dev_found_inf is not None:
            torch._foreach_sub_(dev_steps, [dev_found_inf] * len(dev_steps))
