r"""FAdam on flat partitions: one 1-D tensor that holds slices ("fragments") of many parameters.

Engines such as DeepSpeed ZeRO hand the optimizer, per param group, one flat fp32 tensor: this process's slice of
the group's parameters concatenated (ZeRO 1/2), or the concatenation of this process's slice of each parameter
(ZeRO 3), plus padding. FAdam's three per-tensor RMS values must still be taken over whole parameters. An engine
integration (``hf_fadam.integrations.deepspeed``) describes each flat tensor with a :class:`FlatLayout` and
attaches it with :func:`set_layout`; :meth:`hf_fadam.FAdam.step` then routes that tensor here, and this module:

1. views every fragment as a 1-D slice of the flat parameter, gradient, ``exp_avg`` and ``fisher``;
2. calls the normal implementation (:func:`hf_fadam.functional.fadam`) on those views with ``numels`` = each
   fragment's *whole* parameter size and a ``reduce`` that adds the fragments' partial sums into one slot per
   parameter (``index_add``), all-reduces the slots over the data-parallel group (one collective per phase, two
   per step and flat tensor) and copies each parameter's total back to its fragments.

So every fragment is updated with its parameter's scalars (β̂2, ε̂, both clip divisors): exactly the
single-process update. Padding belongs to no fragment and is never read or written.

State of a flat tensor (tensor-only, saved and restored by the engine's own checkpoints):

- ``exp_avg``, ``fisher``: flat, the shape of the partition (so engines that slice state per parameter, such as
  DeepSpeed's ``safe_get_full_optimizer_state``, see each parameter's part);
- ``step``: a float32 vector with one count per parameter *slot* of the layout (every parameter of the group,
  also those with no fragment here). All slots advance together on every process, so the vector is the same on
  every rank, which keeps it valid for checkpoints that keep one copy of non-partition state.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._math import group_hyperparameters, resolve_state_dtype
from ._rounding import SIXTEEN_BIT, resolve_param_rounding


__all__ = ["FlatLayout", "flat_fadam_group", "get_layout", "init_state", "loaded_step", "set_layout"]


@dataclass(frozen=True)
class FlatLayout:
    """Which slice of which parameter each fragment of a flat 1-D tensor is.

    Fragment ``j`` is ``flat[starts[j] : starts[j] + lengths[j]]``; it belongs to parameter slot ``slots[j]``,
    whose whole (logical) size is ``numels[j]``. Slots number the parameters of the group ``0 .. num_slots - 1``
    the same way on every process; a process holds at most one fragment per slot. ``group`` is the process group
    over which a parameter's fragments are spread (None: one process holds whole parameters).
    """

    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    numels: tuple[int, ...]
    slots: tuple[int, ...]
    num_slots: int
    flat_numel: int
    group: Any = None

    def __post_init__(self) -> None:
        n = len(self.starts)
        if not (len(self.lengths) == len(self.numels) == len(self.slots) == n):
            raise ValueError("FlatLayout: starts, lengths, numels and slots must have one entry per fragment")
        if len(set(self.slots)) != n:
            raise ValueError(f"FlatLayout: a process holds at most one fragment per parameter; slots={self.slots}")
        end = 0
        for start, length, numel, slot in sorted(zip(self.starts, self.lengths, self.numels, self.slots)):
            if start < end or length <= 0 or length > numel or not 0 <= slot < self.num_slots:
                raise ValueError(
                    f"FlatLayout: fragment (start={start}, length={length}, numel={numel}, slot={slot}) overlaps "
                    f"another, is empty, is longer than its parameter or has a slot outside [0, {self.num_slots})"
                )
            end = start + length
        if end > self.flat_numel:
            raise ValueError(f"FlatLayout: fragments end at {end}, past the flat tensor's {self.flat_numel} elements")


# id(flat) -> (weak reference to flat, layout). Not an attribute of the tensor: engines pickle their flat tensors
# into checkpoints (ZeRO 3 does), and a layout holds a process group, which does not pickle.
_LAYOUTS: dict[int, tuple[weakref.ref, FlatLayout]] = {}


def set_layout(flat: Tensor, layout: FlatLayout | None) -> None:
    """Attach ``layout`` to the flat tensor ``flat`` (None detaches): FAdam then updates it fragment by fragment."""
    key = id(flat)
    if layout is None:
        _LAYOUTS.pop(key, None)
        return
    if flat.dim() != 1 or flat.numel() != layout.flat_numel:
        raise ValueError(
            f"set_layout: the flat tensor has shape {tuple(flat.shape)}, the layout describes a 1-D tensor of "
            f"{layout.flat_numel} elements"
        )
    _LAYOUTS[key] = (weakref.ref(flat, lambda _, key=key: _LAYOUTS.pop(key, None)), layout)


#: module name -> installer: integrations of engines that hand FAdam flat partitions register here when imported
#: (``hf_fadam.integrations.deepspeed``), so that ``FAdam()`` can install them without importing upwards.
_ENGINE_INSTALLERS: dict[str, Callable[[], object]] = {}


def register_engine(module_name: str, installer: Callable[[], object]) -> None:
    """Have :func:`install_engine_hooks` call ``installer`` whenever ``module_name`` has been imported."""
    _ENGINE_INSTALLERS[module_name] = installer


def install_engine_hooks() -> None:
    """Run the installer of every registered engine that is imported in this process (``FAdam()`` calls this)."""
    for module_name, installer in _ENGINE_INSTALLERS.items():
        if module_name in sys.modules:
            installer()


def has_layouts() -> bool:
    """Whether any flat tensor has a layout (a cheap test before looking up every parameter)."""
    return bool(_LAYOUTS)


def get_layout(t: Tensor) -> FlatLayout | None:
    """The :class:`FlatLayout` attached to ``t``, or None for an ordinary parameter."""
    entry = _LAYOUTS.get(id(t))
    if entry is None or entry[0]() is not t:
        return None
    return entry[1]


def _slot_reduce(layout: FlatLayout, slot_index: Tensor):
    """The ``reduce`` hook: fragment partial sums -> per-parameter totals over the group, in place."""
    group = layout.group
    distributed = group is not None and torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size(group) == 1:
        distributed = False

    def reduce(buf: Tensor) -> None:
        slots = torch.zeros(buf.shape[0], layout.num_slots, dtype=buf.dtype, device=buf.device)
        slots.index_add_(1, slot_index, buf)
        if distributed:
            torch.distributed.all_reduce(slots, group=group)
        buf.copy_(slots.index_select(1, slot_index))

    return reduce


def init_state(state: dict[Tensor, dict[str, Any]], group: dict[str, Any], flat: Tensor, layout: FlatLayout) -> dict:
    """The state of ``flat``, created (zeros) if it has none.

    Integrations call it when they attach a layout: an engine that links per-parameter views of the optimizer
    state after the first step of its first group (DeepSpeed ZeRO 1/2) must find every group's state there.
    """
    st = state[flat]
    if len(st) == 0:
        state_dtype = resolve_state_dtype(flat.dtype, group["state_dtype"])
        st["step"] = torch.zeros(layout.num_slots, dtype=torch.float32, device=flat.device)
        st["exp_avg"] = torch.zeros_like(flat, dtype=state_dtype)
        st["fisher"] = torch.zeros_like(flat, dtype=state_dtype)
    return st


def loaded_step(who: str, step: Any, layout: FlatLayout, device: torch.device, key: Any) -> Tensor:
    """A flat partition's saved ``step`` as it is kept: float32 on ``device``, one count per parameter slot.

    ``FAdam.load_state_dict`` calls it for a parameter with a layout (engines' checkpoints, e.g. DeepSpeed's
    ``load_checkpoint``); ``ValueError`` naming ``key`` for anything else.
    """
    n = layout.num_slots
    if not (isinstance(step, Tensor) and step.shape == (n,) and not step.is_complex()):
        raise ValueError(
            f"{who}: state 'step' of flat partition {key} is {step!r}; it must be a real vector of {n} counts (one "
            f"per parameter of the group): was the checkpoint written with another parameter grouping?"
        )
    value = step.detach().to(device="cpu", dtype=torch.float64)
    if not bool(((value >= 0) & (value == value.round())).all()):
        raise ValueError(f"{who}: state 'step' of flat partition {key} is {step!r}; its counts must be whole and >= 0")
    return value.to(device=device, dtype=torch.float32)


def flat_fadam_group(
    state: dict[Tensor, dict[str, Any]],
    group: dict[str, Any],
    flat: Tensor,
    layout: FlatLayout,
    *,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One FAdam step on the flat tensor ``flat`` (a parameter of ``group``) with its fragment ``layout``.

    Every process of ``layout.group`` must call it for its flat tensor of the same group in the same order: it
    all-reduces twice (once per sum phase), also on a process whose partition holds no fragment.
    """
    grad = flat.grad
    if grad is None:
        raise RuntimeError(
            "FAdam: a flat partition has no gradient; every process must step its partition of each group "
            "(the per-parameter sums are all-reduced across them)"
        )
    if grad.is_sparse or grad.shape != flat.shape:
        raise RuntimeError(f"FAdam: the flat partition's gradient must be dense of shape {tuple(flat.shape)}")
    st = init_state(state, group, flat, layout)
    steps = st["step"]
    if steps.shape != (layout.num_slots,):
        raise RuntimeError(
            f"FAdam: the state 'step' of a flat partition has shape {tuple(steps.shape)}, expected "
            f"({layout.num_slots},) (one count per parameter of the group); was the checkpoint written with "
            f"another parameter grouping?"
        )

    def views(t: Tensor) -> list[Tensor]:
        return [t.narrow(0, s, n) for s, n in zip(layout.starts, layout.lengths)]

    slot_index = torch.tensor(layout.slots, dtype=torch.long, device=flat.device)
    reduce = _slot_reduce(layout, slot_index)
    step_views = [steps.select(0, s) for s in layout.slots]
    mode = resolve_param_rounding(group.get("param_rounding", "nearest"), flat.dtype)
    if mode != "nearest" or st["fisher"].dtype in SIXTEEN_BIT:
        raise RuntimeError(
            f"FAdam: an engine hands FAdam a {flat.dtype} flat partition (state {st['fisher'].dtype}); stochastic or "
            f"Kahan stores (param_rounding={group.get('param_rounding')!r}, or 16-bit state) are not implemented for "
            "flat partitions. Keep the engine's float32 master weights and float32 optimizer state (DeepSpeed's "
            "default), or set param_rounding='nearest' and state_dtype=None to accept round-to-nearest."
        )
    hyper = group_hyperparameters(group)
    args = (views(flat), views(grad), views(st["exp_avg"]), views(st["fisher"]), step_views)
    if not layout.starts:
        # Nothing of the group lives here: take part in the two collectives with empty sums.
        empty = torch.zeros(1, 0, dtype=torch.float64, device=flat.device)
        reduce(empty)
        reduce(torch.zeros(2, 0, dtype=torch.float64, device=flat.device))
    else:
        from .functional import fadam

        fadam(
            *args,
            foreach=group["foreach"],
            fused=group["fused"],
            grad_scale=grad_scale,
            found_inf=found_inf,
            numels=list(layout.numels),
            reduce=reduce,
            **hyper,
        )
    # Slots without a fragment here advance too, so that every process holds the same step vector.
    others = torch.ones(layout.num_slots, dtype=steps.dtype, device=flat.device)
    others[slot_index] = 0
    if found_inf is not None:  # a step that AMP skips counts nowhere
        others.mul_(1 - found_inf.to(device=flat.device, dtype=steps.dtype))
    steps.add_(others)
