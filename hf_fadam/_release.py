r"""Gradient release: step each parameter inside backward, as soon as its gradient is complete, and free that gradient.

FAdam's update of a tensor reads only that tensor's gradient (every RMS it takes is per tensor), so it can run the
moment autograd has accumulated the gradient, in a hook registered with
``Tensor.register_post_accumulate_grad_hook``, and drop the gradient right after. The result is the result of
``optimizer.step()`` after backward, bit for bit: the same per-tensor kernels, the same step counts, the same random
bits for stochastic rounding (each parameter keeps its position in the optimizer, its stream). Only the peak memory
changes: gradients no longer all live at once (at most the ones autograd is still accumulating).

``FAdam(..., gradient_release=True)`` (and :class:`hf_fadam.FAdam8bit`) turns it on::

    optimizer = FAdam(model.parameters(), lr=1e-4, gradient_release=True)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()           # every parameter is stepped here and its .grad set to None
        optimizer.step()          # steps what still has a gradient (nothing, normally); keeps schedulers' contract
        scheduler.step()          # lr schedulers drive group["lr"] as usual: the hooks read it at each backward

Contract:

- The hook steps one parameter with its group's hyperparameters as they are when backward reaches it; a scheduler
  stepped after ``optimizer.step()`` therefore gives the next backward its lr, as without gradient release.
- ``optimizer.step()`` still steps every parameter that has a gradient (one set by hand, or one that was frozen when
  the hooks were registered: ``step()`` registers hooks on parameters that require a gradient and had none, so a
  parameter unfrozen later is released from its next backward on). ``state_dict``/``load_state_dict`` are
  unchanged: a checkpoint of a released run resumes a normal one and the other way round.
- What cannot be exact is refused by name, in the optimizer: parameters that are DTensors (FSDP2, tensor
  parallelism: gradients arrive by reduce-scatter, not through autograd's accumulation), FSDP1 flat parameters, and
  a process group of more than one process (DDP averages gradients across ranks after backward; a released step
  would see the local gradient): checked when the optimizer is built and at the first hook after each ``step()``. Gradient accumulation over several backward passes is not accumulation here:
  each backward steps; the Trainer integration refuses ``gradient_accumulation_steps > 1``, global gradient-norm
  clipping (FAdam clips per tensor, ``clip``) and ``--fp16``'s GradScaler (it must see all gradients before a step).
- One optimizer releases a parameter at a time: a newer optimizer that releases the same parameter takes it over
  (the older one's hook no longer steps it, and a warning says so).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import Tensor


__all__ = ["attach", "check_distributed", "check_release_param", "detach"]

# id(param) -> the optimizer that releases it, weakly (a deleted optimizer releases nothing); the entry goes with
# the param (a finalizer). Keyed by id: a WeakKeyDictionary would compare tensors with ==.
_OWNER: dict[int, weakref.ref] = {}


def _owner(param: Tensor) -> Any:
    ref = _OWNER.get(id(param))
    return None if ref is None else ref()


def _set_owner(param: Tensor, ref: weakref.ref) -> None:
    if id(param) not in _OWNER:
        weakref.finalize(param, _OWNER.pop, id(param), None)
    _OWNER[id(param)] = ref


def check_release_param(optimizer: Any, param: Tensor) -> None:
    """Raise ``ValueError`` for a parameter whose gradient does not come from autograd's accumulation alone."""
    name = type(optimizer).__name__
    from ._multi_tensor import _is_dtensor

    if _is_dtensor(param):
        raise ValueError(
            f"{name}(gradient_release=True) refuses DTensor parameters (FSDP2, HSDP, tensor parallelism): their "
            f"gradients are reduce-scattered by the engine after autograd's accumulation, so a released step would "
            f"see the unreduced local gradient; use gradient_release=False"
        )
    from ._fsdp1 import is_fsdp1_flat

    if is_fsdp1_flat(param):
        raise ValueError(
            f"{name}(gradient_release=True) refuses FSDP1 parameters: FSDP1 reduces flat gradients after backward; "
            f"use gradient_release=False"
        )


def check_distributed(optimizer: Any) -> None:
    """Raise ``RuntimeError`` inside a process group of several processes (DDP reduces gradients after backward)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    world = torch.distributed.get_world_size()
    if world > 1:
        raise RuntimeError(
            f"{type(optimizer).__name__}(gradient_release=True) refuses a process group of {world} processes: DDP "
            f"(and DeepSpeed) average the gradients across processes after autograd has accumulated them, so a step "
            f"taken inside backward would use this process's gradient alone and the replicas would diverge; use "
            f"gradient_release=False"
        )


def _hook(ref: weakref.ref):
    def release(param: Tensor) -> None:
        optimizer = ref()
        if optimizer is None or param.grad is None:
            return
        if _owner(param) is not optimizer:  # taken over by a newer optimizer
            return
        optimizer._step_param(param)
        param.grad = None

    return release


def attach(optimizer: Any) -> None:
    """Register the release hook on every parameter of ``optimizer`` that requires a gradient and has none yet."""
    handles: dict[int, Any] = optimizer.__dict__.setdefault("_release_handles", {})
    ref = weakref.ref(optimizer)
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not isinstance(param, Tensor) or id(param) in handles or not param.requires_grad:
                continue
            check_release_param(optimizer, param)
            previous = _owner(param)
            if previous is not None and previous is not optimizer:
                warnings.warn(
                    f"{type(optimizer).__name__}(gradient_release=True): a parameter of shape {tuple(param.shape)} "
                    f"was released by another optimizer; this one steps it from now on",
                    stacklevel=3,
                )
            _set_owner(param, ref)
            handles[id(param)] = param.register_post_accumulate_grad_hook(_hook(ref))


def detach(optimizer: Any) -> None:
    """Remove the release hooks of ``optimizer`` (its parameters keep their gradients again)."""
    for handle in optimizer.__dict__.pop("_release_handles", {}).values():
        handle.remove()
    for group in optimizer.param_groups:
        for param in group["params"]:
            if isinstance(param, Tensor) and _owner(param) is optimizer:
                del _OWNER[id(param)]
