"""FAdam inside DeepSpeed: describe each flat fp32 partition that DeepSpeed hands FAdam, so that FAdam stays exact.

DeepSpeed wraps a client optimizer in an optimizer of its own that replaces every param group's parameters with
ONE flat fp32 tensor (the master weights) and calls the client's ``step()`` on it:

============================  ================================  ===============================================
DeepSpeed optimizer           flat tensor of group ``i``        which slice of which parameter it holds
============================  ================================  ===============================================
``DeepSpeedZeroOptimizer``    ``single_partition_of_fp32_``     this rank's slice of the group's concatenated
(ZeRO 1, 2)                   ``groups[i]``                     params, in ``round_robin_bit16_groups`` order
                                                                at ``round_robin_bit16_offsets``
``BF16_Optimizer``            ``fp32_groups_flat_partition[i]`` the same slice, params in their own order:
(ZeRO 1 with bf16 params)                                       each param's ``_hp_mapping``
``DeepSpeedZeroOptimizer_``   ``fp32_partitioned_groups_``      this rank's slice ``[r·n, (r+1)·n)`` of each
``Stage3`` (ZeRO 3)           ``flat[i]`` (a sub-group)         param of the sub-group, ``n = partition_numel()``
============================  ================================  ===============================================

Without ZeRO, fp16/bf16 params get ``FP16_UnfusedOptimizer`` for a client optimizer such as FAdam (DeepSpeed's flat
``FP16_Optimizer`` is only used for its own FusedAdam): an fp32 copy of each whole parameter, nothing to map.

:func:`attach` turns that record into a :class:`hf_fadam._flat.FlatLayout` per flat tensor (fragments, each
parameter's full size, the data-parallel process group) and attaches it to the tensor. ``FAdam.step`` then updates
the flat tensor fragment by fragment with per-parameter sums all-reduced over the group: the weights equal those
of one process on the same global batch. Padding belongs to no parameter and is left alone.

:func:`install` makes this automatic: it wraps the ``__init__`` of the three DeepSpeed optimizers so that each one
built around a FAdam attaches the layouts right away (``deepspeed.initialize``, the Trainer and accelerate all go
through them). ``FAdam()`` calls it when DeepSpeed is already imported (through ``hf_fadam._flat``'s engine
registry), and the Trainer's ``--optim fadam`` handler calls it for a DeepSpeed run; a script that imports DeepSpeed
only after building FAdam calls ``install()`` (or ``attach(engine)`` after ``deepspeed.initialize``) itself.

Refused: :class:`hf_fadam.FAdam8bit` (8-bit state) as the client optimizer of any of the three (``TypeError`` when
DeepSpeed builds its optimizer around it, before it changes anything; :func:`fadam8bit_refusal` says why and what
to use instead).

Not mapped: ZeRO 3 with the optimizer state on NVMe (``offload_optimizer.device: nvme``), whose flat tensors are
swapped in and out of placeholder tensors. ``attach`` raises ``NotImplementedError`` for it; the automatic hook
logs a warning and FAdam then takes its RMS per partition (the Trainer refuses such runs unless
``allow_flat_shards=true``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import Tensor

from .._flat import FlatLayout, get_layout, init_state, register_engine, set_layout


__all__ = ["attach", "fadam8bit_refusal", "install", "installed", "layouts"]

logger = logging.getLogger("hf_fadam")

_MARK = "_hf_fadam_patched"


def _is_fadam(optimizer: Any) -> bool:
    from ..optimizer import FAdam

    return isinstance(optimizer, FAdam)


def _is_fadam8bit(optimizer: Any) -> bool:
    from ..optimizer_8bit import FAdam8bit

    return isinstance(optimizer, FAdam8bit)


def fadam8bit_refusal() -> str:
    """Why FAdam8bit cannot run under DeepSpeed ZeRO, and what to use instead (the text of every such refusal)."""
    return (
        "hf_fadam.FAdam8bit cannot be the optimizer of a DeepSpeed ZeRO run (stage 1, 2 or 3, also bf16 and "
        "offload): DeepSpeed hands the optimizer flat fp32 partitions that cut and concatenate parameters, and "
        "FAdam8bit's 8-bit blockwise state and per-tensor RMS are not mapped onto them (it would take its statistics "
        "per partition, or fail). Use hf_fadam.FAdam (Trainer: --optim fadam), whose DeepSpeed ZeRO path is exact; "
        "FAdam8bit runs in one process, under DDP and under FSDP2."
    )


def _refuse_fadam8bit(optimizer: Any) -> None:
    if _is_fadam8bit(optimizer):
        raise TypeError(fadam8bit_refusal())


def _rank(group: Any) -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0
    return torch.distributed.get_rank(group)


def _hp_mapping_layout(lp_params: list[Tensor], flat: Tensor, group: Any) -> FlatLayout:
    """BF16_Optimizer: DeepSpeed's own record (``param._hp_mapping``) of each fragment's place."""
    starts, lengths, numels, slots = [], [], [], []
    for slot, lp in enumerate(lp_params):
        mapping = getattr(lp, "_hp_mapping", None)
        if mapping is None:  # no element of this parameter in this rank's partition
            continue
        address = mapping.get_hp_fragment_address()
        if address.numel == 0:
            continue
        starts.append(int(address.start))
        lengths.append(int(address.numel))
        numels.append(lp.numel())
        slots.append(slot)
    return FlatLayout(tuple(starts), tuple(lengths), tuple(numels), tuple(slots), len(lp_params), flat.numel(), group)


def _zero12_layout(ds_optimizer: Any, i: int, flat: Tensor, group: Any) -> FlatLayout:
    """ZeRO 1/2 (``DeepSpeedZeroOptimizer``): where each parameter of group ``i`` lies in the flat buffer.

    DeepSpeed flattens the group in ``round_robin_bit16_groups[i]`` order (the parameters themselves, or their
    round-robin reordering with ``round_robin_gradients``) at ``round_robin_bit16_offsets[i]`` (gaps where
    ``parameter_alignment`` pads), and this rank's partition is ``[rank·n, (rank+1)·n)`` of it, ``n = flat.numel()``.
    Not ``param._hp_mapping``: DeepSpeed links those in the original parameter order unless there is padding, which
    is wrong when round robin reorders the buffer. Slots number ``bit16_groups[i]``, the original order.
    """
    lp_params = ds_optimizer.bit16_groups[i]
    order = ds_optimizer.round_robin_bit16_groups[i]
    metas = getattr(ds_optimizer, "round_robin_bit16_meta", None)  # sizes even while params' storage is offloaded
    sizes = [int(m.numel()) for m in metas[i]] if metas is not None else [int(p.numel()) for p in order]
    offsets = getattr(ds_optimizer, "round_robin_bit16_offsets", None)
    if offsets is not None:
        offsets = [int(o) for o in offsets[i]]
    else:  # DeepSpeed before parameter_alignment: the parameters back to back
        offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    slot_of = {id(p): slot for slot, p in enumerate(lp_params)}
    if len(order) != len(lp_params) or len(slot_of) != len(lp_params) or any(id(p) not in slot_of for p in order):
        raise RuntimeError(
            "hf_fadam: DeepSpeed's round_robin_bit16_groups is not a reordering of bit16_groups; this DeepSpeed "
            "version lays out ZeRO 1/2 partitions in a way hf_fadam does not know"
        )
    part = flat.numel()
    lo, hi = _rank(group) * part, (_rank(group) + 1) * part
    starts, lengths, numels, slots = [], [], [], []
    for p, offset, size in zip(order, offsets, sizes):
        start, end = max(offset, lo), min(offset + size, hi)
        if end > start:
            starts.append(start - lo)
            lengths.append(end - start)
            numels.append(size)
            slots.append(slot_of[id(p)])
    return FlatLayout(tuple(starts), tuple(lengths), tuple(numels), tuple(slots), len(lp_params), part, group)


def _stage3_layout(params: list[Tensor], flat: Tensor, group: Any) -> FlatLayout:
    """ZeRO 3: the sub-group's flat tensor is this rank's partition of each parameter, one after the other."""
    rank = _rank(group)
    starts, lengths, numels, slots = [], [], [], []
    offset = 0
    for slot, param in enumerate(params):
        part = int(param.partition_numel())
        full = int(param.ds_numel)
        length = min(part, max(0, full - rank * part))  # the last ranks' partitions end in padding
        if length > 0:
            starts.append(offset)
            lengths.append(length)
            numels.append(full)
            slots.append(slot)
        offset += part
    if offset != flat.numel():
        raise RuntimeError(
            f"hf_fadam: a ZeRO-3 flat partition has {flat.numel()} elements, its parameters' partitions add up to "
            f"{offset}; this DeepSpeed version lays out ZeRO-3 partitions in a way hf_fadam does not know"
        )
    return FlatLayout(tuple(starts), tuple(lengths), tuple(numels), tuple(slots), len(params), flat.numel(), group)


def layouts(ds_optimizer: Any) -> list[tuple[Tensor, FlatLayout]]:
    """``(flat tensor, FlatLayout)`` for every flat tensor that ``ds_optimizer`` (a DeepSpeed optimizer) steps."""
    cls = type(ds_optimizer).__name__
    if hasattr(ds_optimizer, "fp32_partitioned_groups_flat") and hasattr(ds_optimizer, "fp16_groups"):  # ZeRO 3
        if getattr(ds_optimizer, "swap_optimizer", False):
            raise NotImplementedError(
                "hf_fadam: FAdam under ZeRO 3 with the optimizer state on NVMe (offload_optimizer.device=nvme) is "
                "not supported: its flat partitions are swapped through placeholder tensors. Use "
                "offload_optimizer.device=cpu or none."
            )
        groups = getattr(ds_optimizer, "sub_group_process_groups", None)
        out = []
        for i, (params, flat) in enumerate(zip(ds_optimizer.fp16_groups, ds_optimizer.fp32_partitioned_groups_flat)):
            group = groups[i] if groups else ds_optimizer.dp_process_group
            out.append((flat, _stage3_layout(params, flat, group)))
        return out
    # ZeRO 1/2 (DeepSpeedZeroOptimizer): the flat buffer's own order and offsets (round robin included).
    if all(
        hasattr(ds_optimizer, a)
        for a in ("bit16_groups", "round_robin_bit16_groups", "single_partition_of_fp32_groups")
    ):
        dp_groups = ds_optimizer.real_dp_process_group
        return [
            (flat, _zero12_layout(ds_optimizer, i, flat, dp_groups[i]))
            for i, flat in enumerate(ds_optimizer.single_partition_of_fp32_groups)
        ]
    # BF16_Optimizer (no reordering): DeepSpeed's _hp_mapping records.
    if hasattr(ds_optimizer, "bf16_groups") and hasattr(ds_optimizer, "fp32_groups_flat_partition"):
        dp_groups = ds_optimizer.real_dp_process_group
        return [
            (flat, _hp_mapping_layout(lp, flat, dp_groups[i]))
            for i, (lp, flat) in enumerate(zip(ds_optimizer.bf16_groups, ds_optimizer.fp32_groups_flat_partition))
        ]
    raise TypeError(
        f"hf_fadam: cannot map the flat partitions of DeepSpeed's {cls}: FAdam knows DeepSpeedZeroOptimizer (ZeRO 1, "
        f"2), DeepSpeedZeroOptimizer_Stage3 (ZeRO 3) and BF16_Optimizer"
    )


def attach(engine_or_optimizer: Any) -> int:
    """Attach fragment layouts to the flat tensors of a DeepSpeed optimizer (or engine) that wraps FAdam.

    Returns the number of flat tensors described. Idempotent. Raises ``TypeError`` for a DeepSpeed optimizer that
    does not wrap FAdam or whose layout hf_fadam does not know.
    """
    ds_optimizer = getattr(engine_or_optimizer, "optimizer", None)
    if _is_fadam(ds_optimizer):  # a DeepSpeed optimizer itself
        ds_optimizer = engine_or_optimizer
    elif not _is_fadam(getattr(ds_optimizer, "optimizer", None)):  # an engine: engine.optimizer.optimizer
        raise TypeError(
            f"hf_fadam.integrations.deepspeed.attach needs a DeepSpeed engine or optimizer that wraps FAdam; got "
            f"{type(engine_or_optimizer).__name__}"
        )
    fadam = ds_optimizer.optimizer
    _refuse_fadam8bit(fadam)
    pairs = layouts(ds_optimizer)
    group_ids = getattr(ds_optimizer, "sub_group_to_group_id", None)  # ZeRO 3: sub-group -> param group
    for i, (flat, layout) in enumerate(pairs):
        set_layout(flat, layout)
        group = fadam.param_groups[group_ids[i] if group_ids is not None else i]
        # DeepSpeed links per-parameter views of the state after the first group's first step: create it now.
        init_state(fadam.state, group, flat, layout)
    return len(pairs)


def _attach_after(init):
    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for arg in (*args, *kwargs.values()):  # the client optimizer: refused before DeepSpeed touches anything
            _refuse_fadam8bit(arg)
        init(self, *args, **kwargs)
        if _is_fadam(getattr(self, "optimizer", None)):
            try:
                attach(self)
            except NotImplementedError as exc:
                logger.warning("%s FAdam runs with per-partition statistics instead.", exc)

    setattr(__init__, _MARK, True)
    return __init__


def _optimizer_classes() -> list[type]:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return [DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer]


def installed() -> bool:
    """Whether :func:`install` has patched DeepSpeed in this process."""
    try:
        return all(getattr(cls.__init__, _MARK, False) for cls in _optimizer_classes())
    except ImportError:
        return False


def install() -> bool:
    """Make every DeepSpeed optimizer built around a FAdam from now on attach its layouts (idempotent).

    Returns False when DeepSpeed is not importable.
    """
    try:
        classes = _optimizer_classes()
    except ImportError:
        return False
    for cls in classes:
        if not getattr(cls.__init__, _MARK, False):
            cls.__init__ = _attach_after(cls.__init__)
    return True


def is_attached(flat: Tensor) -> bool:
    """Whether ``flat`` carries a layout (for tests and checks)."""
    return get_layout(flat) is not None


# FAdam() installs the patch when DeepSpeed is already imported (hf_fadam/__init__.py imports this module).
register_engine("deepspeed", install)
