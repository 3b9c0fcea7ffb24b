r"""``fadam8bit()``: one FAdam step over 8-bit blockwise state. It resolves the implementation and dispatches.

Every implementation runs FAdam's exact math in fp32 between a dequantize and a requantize (maps and layout:
:mod:`hf_fadam._quant`):

- ``forloop`` / ``foreach`` (the references): dequantize each state to fp32 temporaries (m, and f = s² from the
  stored s = sqrt(f)), run :func:`hf_fadam.functional.fadam` on them (the literal loop or the foreach path, with
  the same ``numels``/``reduce``), then quantize the new m and sqrt(f) with new per-block scales.
- ``fused`` on CPU: the C kernel of :mod:`hf_fadam.kernels.cpu_fused_8bit` (three passes, f recomputed in
  registers, codes and scales written per block at the end of pass C).
- ``fused`` on CUDA (and on CPU under ``TRITON_INTERPRET=1``): :mod:`hf_fadam.kernels.triton_fadam8bit`.

A tensor with fp32 state (below ``min_8bit_size``) has ``None`` scales and is stepped like FAdam's, in the same call,
so that ``reduce`` is called exactly twice per call (the reduction-hook contract), whatever the mix.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._multi_tensor import _is_dtensor
from ._quant import dequantize_blockwise, lowbias32, quantize_blockwise, sr_seeds
from ._rounding import KIND_EXP_AVG, check_param_rounding, resolve_param_rounding
from ._state_checks import check_8bit_state
from .functional import fadam


__all__ = ["fadam8bit", "resolve_implementation_8bit"]

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_backend_on_cpu() -> bool:
    choice = os.environ.get("HF_FADAM_CPU_FUSED_BACKEND", "auto").strip().lower()
    if choice == "auto":
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return choice == "triton"


def _fused_kernel_8bit(device: torch.device):
    if device.type == "cuda" or (device.type == "cpu" and _triton_backend_on_cpu()):
        from .kernels import triton_fadam8bit

        if not triton_fadam8bit.is_available():
            raise RuntimeError(
                f"FAdam8bit(fused=True) on {device.type} needs Triton (pip install 'hf-fadam[triton]'); it is not "
                "importable here. Use fused=None or foreach=True."
            )
        return triton_fadam8bit.fadam8bit_triton_
    if device.type == "cpu":
        from .kernels import cpu_fused_8bit

        if not cpu_fused_8bit.is_available():
            raise RuntimeError(
                "FAdam8bit(fused=True) on cpu needs a C compiler to build its kernel: "
                f"{cpu_fused_8bit.unavailable_reason()}. Use fused=None or foreach=True."
            )
        return cpu_fused_8bit.fadam8bit_cpu_
    raise RuntimeError(f"FAdam8bit(fused=True) is not available on device type {device.type!r}; use foreach=True.")


def _rounds(params: list[Tensor], param_rounding: str) -> bool:
    """Whether a 16-bit param of this call is stored other than to nearest."""
    return any(resolve_param_rounding(param_rounding, t.dtype) != "nearest" for t in params)


def _fused_ok(params: list[Tensor], param_rounding: str = "nearest") -> bool:
    if torch.compiler.is_compiling():
        return False
    for t in params:
        if _is_dtensor(t) or t.dtype not in _FUSED_DTYPES:
            return False
    rounds = _rounds(params, param_rounding)
    for device_type in {t.device.type for t in params}:
        try:
            if device_type == "cuda":
                from .kernels import triton_fadam8bit

                ok = triton_fadam8bit.is_available() and (triton_fadam8bit.SUPPORTS_ROUNDING or not rounds)
            elif device_type == "cpu":
                from .kernels import cpu_fused_8bit

                ok = not _triton_backend_on_cpu() and cpu_fused_8bit.is_available()
                ok = ok and (cpu_fused_8bit.SUPPORTS_ROUNDING or not rounds)
            else:
                ok = False
        except ImportError:
            ok = False
        if not ok:
            return False
    return True


def resolve_implementation_8bit(
    params: list[Tensor], foreach: bool | None, fused: bool | None, param_rounding: str = "nearest"
) -> str:
    """``"forloop"``, ``"foreach"`` or ``"fused"`` for these parameters and flags (fused by default where it can)."""
    if foreach and fused:
        raise ValueError("FAdam8bit: foreach=True and fused=True contradict each other; set at most one of them.")
    if fused:
        return "fused"
    if foreach:
        return "foreach"
    if foreach is False:
        return "forloop"
    if fused is None and params and _fused_ok(params, param_rounding):
        return "fused"
    return "foreach"


def fadam8bit(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    fishers: list[Tensor],
    exp_avg_scales: list[Tensor | None],
    fisher_scales: list[Tensor | None],
    state_steps: list[Tensor],
    *,
    block_size: int,
    foreach: bool | None = None,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    numels: Sequence[int] | None = None,
    reduce: Callable[[Tensor], object] | None = None,
    streams: Sequence[int] | None = None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip: float,
    p: float,
    maximize: bool,
    param_rounding: str = "nearest",
    param_comps: Sequence[Tensor | None] | None = None,
) -> None:
    """Functional FAdam8bit: one step, in place on params, codes and scales (and fp32 state where scales are None).

    ``exp_avgs[i]``/``fishers[i]``: int8 codes of m / uint8 codes of sqrt(f) with float32 ``(num_blocks,)`` scales,
    or float32 m / f with ``None`` scales. ``numels``/``reduce``: see the reduction-hook contract in
    docs/CONTRACT.md (``reduce`` is called exactly twice per call, with float64 (1, n) then (2, n) sums).
    ``streams``: each tensor's stream of random bits for f's stochastic rounding (:func:`hf_fadam._quant.sr_seeds`;
    the optimizer passes the parameter's position over all groups); default ``0 .. n-1``; the same streams give the
    bits of a 16-bit param's stochastic rounding. ``param_rounding``/``param_comps``: how bfloat16/float16 params are
    stored, as in :func:`hf_fadam.functional.fadam` (:mod:`hf_fadam._rounding`).
    """
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, clip=clip, p=p,
                 maximize=maximize)  # fmt: skip
    check_param_rounding(param_rounding)
    rounding = dict(param_rounding=param_rounding, param_comps=None if param_comps is None else list(param_comps))
    impl = resolve_implementation_8bit(params, foreach, fused, param_rounding)
    if impl != "fused" and (grad_scale is not None or found_inf is not None):
        raise RuntimeError("FAdam8bit: grad_scale/found_inf (AMP inside the step) are only supported with fused=True.")
    if not params:
        return
    streams = list(range(len(params))) if streams is None else list(streams)
    if len(streams) != len(params):
        raise ValueError(f"fadam8bit: streams has {len(streams)} entries for {len(params)} params")
    # Everything is checked before anything changes (steps included): state from a checkpoint or a user's hands
    # reaches no kernel, and no half-done step is left behind, unless it fits.
    lists = [params, grads, exp_avgs, fishers, exp_avg_scales, fisher_scales, state_steps]
    if len({len(lst) for lst in lists}) != 1:
        raise ValueError(f"fadam8bit: the tensor lists have different lengths {[len(lst) for lst in lists]}")
    for i, (prm, m, f, msc, fsc) in enumerate(zip(params, exp_avgs, fishers, exp_avg_scales, fisher_scales)):
        if impl == "fused" and prm.dtype not in _FUSED_DTYPES:
            raise TypeError(
                f"FAdam8bit(fused=True) steps float32, bfloat16 and float16 params; params[{i}] is {prm.dtype}. "
                "Use fused=None or foreach=True for it (the reference path steps any floating dtype)."
            )
        check_8bit_state("FAdam8bit", i, prm, m, f, msc, fsc, block_size)
    if impl != "fused":
        _dequantized_step(params, grads, exp_avgs, fishers, exp_avg_scales, fisher_scales, state_steps,
                          block_size=block_size, foreach=impl == "foreach", numels=numels, reduce=reduce,
                          streams=streams, **rounding, **hyper)  # fmt: skip
        return
    devices = {t.device for t in params}
    if len(devices) > 1 and reduce is not None:
        raise ValueError(
            f"FAdam8bit: with a reduce hook all tensors must be on one device; got {sorted(map(str, devices))}"
        )
    grouped: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i in range(len(params)):
        grouped.setdefault((params[i].device, params[i].dtype), []).append(i)
    if len(grouped) > 1 and reduce is not None:
        # One reduce call per phase, whatever the number of dtype groups: run them phase-major on the reference path.
        _dequantized_step(params, grads, exp_avgs, fishers, exp_avg_scales, fisher_scales, state_steps,
                          block_size=block_size, foreach=True, numels=numels, reduce=reduce, streams=streams,
                          **rounding, **hyper)  # fmt: skip
        return
    for (device, _), idx in grouped.items():
        kernel = _fused_kernel_8bit(device)
        if not getattr(sys.modules[kernel.__module__], "SUPPORTS_ROUNDING", False) and _rounds(
            [params[i] for i in idx], param_rounding
        ):
            raise RuntimeError(
                f"FAdam8bit(fused=True): the {device.type} kernel stores 16-bit params to nearest only; "
                f"param_rounding={param_rounding!r} needs fused=None or foreach=True here"
            )
        sub = [[lst[i] for i in idx] for lst in lists]
        steps = sub[-1]
        torch._foreach_add_(steps, 1)
        dev_scale = None if grad_scale is None else grad_scale.to(device)
        dev_found = None if found_inf is None else found_inf.to(device)
        kernel(
            *sub, block_size=block_size, grad_scale=dev_scale, found_inf=dev_found,
            numels=None if numels is None else [numels[i] for i in idx], reduce=reduce,
            streams=[streams[i] for i in idx], param_rounding=param_rounding,
            param_comps=None if param_comps is None else [param_comps[i] for i in idx], **hyper,
        )  # fmt: skip
        if dev_found is not None:
            torch._foreach_sub_(steps, [dev_found] * len(steps))


def _dequantized_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    fishers: list[Tensor],
    exp_avg_scales: list[Tensor | None],
    fisher_scales: list[Tensor | None],
    state_steps: list[Tensor],
    *,
    block_size: int,
    foreach: bool,
    numels: Sequence[int] | None,
    reduce: Callable[[Tensor], object] | None,
    streams: Sequence[int] | None = None,
    param_rounding: str = "nearest",
    param_comps: Sequence[Tensor | None] | None = None,
    **hyper: float | bool,
) -> None:
    """The reference: dequantize → :func:`hf_fadam.functional.fadam` on fp32 temporaries → quantize."""
    ms: list[Tensor] = []
    fs: list[Tensor] = []
    for m, f, msc, fsc in zip(exp_avgs, fishers, exp_avg_scales, fisher_scales):
        if fsc is None:
            ms.append(m)
            fs.append(f)
        else:
            ms.append(dequantize_blockwise(m, msc, block_size))
            s = dequantize_blockwise(f, fsc, block_size)
            fs.append(s * s)
    extra = {} if numels is None and reduce is None else {"numels": numels, "reduce": reduce}
    fadam(params, grads, ms, fs, state_steps, foreach=foreach, fused=False, param_rounding=param_rounding,
          param_comps=param_comps, streams=streams, **hyper, **extra)  # fmt: skip
    seeds = sr_seeds(streams, torch.stack([t.reshape(()) for t in state_steps]))
    # m's codes round stochastically in their subnormal range with bits of their own (_rounding.rounding_seeds of
    # KIND_EXP_AVG), independent of f's
    m_seeds = lowbias32(seeds ^ KIND_EXP_AVG)
    for i, (m, f, msc, fsc, m_new, f_new) in enumerate(zip(exp_avgs, fishers, exp_avg_scales, fisher_scales, ms, fs)):
        if fsc is None:
            continue
        codes, scales = quantize_blockwise(m_new, block_size, signed=True, seed=m_seeds[i].to(m.device))
        m.copy_(codes)
        msc.copy_(scales)
        codes, scales = quantize_blockwise(f_new.sqrt(), block_size, signed=False, seed=seeds[i].to(f.device))
        f.copy_(codes)
        fsc.copy_(scales)
