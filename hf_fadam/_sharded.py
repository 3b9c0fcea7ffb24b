r"""FAdam on DTensor parameters (FSDP2, HSDP, tensor parallel): the local shards, and one all-reduce per phase.

FAdam's only non-elementwise parts are three per-tensor sums of squares (FADAM_SPEC.md decision 6): Σg² for the
adaptive ε̂, then Σ(g/D)² and Σ(θ/D)² for the two RMS clips. Every implementation computes them into one stacked
float64 buffer per phase and calls a ``reduce`` hook on it before going on (``functional.fadam``'s ``reduce=``).
This module is the sharding layer on top of that hook, and nothing more; it holds no copy of the update rule:

1. **Local shards.** For each DTensor it takes ``to_local()`` of the param, the gradient and both state tensors
   (``exp_avg`` and ``fisher`` are DTensors placed like the param, created by ``zeros_like``). The update is
   elementwise, so stepping the local shards is stepping the DTensor, with no collective.
2. **Logical sizes.** Each RMS divides by ``DTensor.numel()``, the size of the whole logical tensor, not of the
   shard (uneven and empty shards included).
3. **One reduction per phase and sharding group.** Tensors are grouped by ``(mesh, mesh dims on which the tensor is
   sharded)``. For a group the local sums are all-reduced over the process group spanning exactly those mesh dims:
   ``Shard(0)`` on a 1-D mesh (FSDP2) reduces over the mesh; ``(Replicate(), Shard(0))`` (HSDP) over the shard dim
   only, since replicas hold the same values; ``(Shard(0), Shard(1))`` (FSDP × TP) over one group that spans both
   dims, never two collectives; a fully replicated DTensor, or one sharded only on mesh dims of size 1, needs no
   collective. A group costs two all-reduces per step (phase 1, phase 2) however many tensors it holds.
4. **The fastest local implementation.** The local shards are plain tensors, so ``functional.fadam`` resolves
   ``foreach``/``fused`` for them as for any plain tensors: the C kernel on CPU, Triton on CUDA, else foreach;
   ``fused=True`` and ``foreach=True`` are honoured. Plain tensors in the same call (FSDP2's ignored params, a root
   module left unsharded) take the ordinary path, without a reduction.

Placements: ``Shard(d)`` and ``_StridedShard`` (FSDP2 × TP) are shards; ``Replicate()`` is a replica. A
``Partial`` param holds unreduced addends, not a shard, so no whole-tensor RMS exists: it is refused with an error
naming its shape and placements. A gradient placed differently from its param (a ``Partial`` gradient of a
replicated TP weight, for instance) is redistributed to the param's placements first, because the local shards of
param, gradient and state must cover the same elements; that costs a collective per such tensor, and a warning
says so once per layout.

The literal for-loop (``foreach=False``) does not come here: it runs on the DTensors themselves through DTensor's
own dispatch (exact, slow) and stays the oracle the tests compare this path against.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


logger = logging.getLogger("hf_fadam")

# (mesh, sharded mesh dims) -> process group (None = the default group) or a tuple of per-dim groups (fallback).
_GROUPS: dict[tuple[Any, tuple[int, ...]], Any] = {}
_WARNED: set[tuple[str, str]] = set()


def is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def has_dtensor(tensors: Sequence[Tensor]) -> bool:
    """Whether any tensor is a DTensor; asked on every step, so free when DTensor was never imported."""
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    # The distinct types are few (Tensor, Parameter, DTensor): cheaper than an isinstance per tensor.
    return dtensor is not None and any(issubclass(kind, dtensor) for kind in set(map(type, tensors)))


def sharded_dims(param: Tensor) -> tuple[int, ...]:
    """The mesh dims over which ``param``'s per-tensor sums must be reduced; a ValueError for ``Partial``.

    A mesh dim of size 1 holds the whole tensor on its one member, so it needs no reduction.
    """
    mesh, placements = param.device_mesh, param.placements
    dims = []
    for dim, placement in enumerate(placements):
        if placement.is_partial():
            raise ValueError(
                f"FAdam: a DTensor parameter of shape {tuple(param.shape)} has placements {tuple(placements)} on "
                f"{mesh}: a Partial parameter holds unreduced addends, not a shard, so FAdam cannot take its "
                "per-tensor RMS. Redistribute the parameter to Shard/Replicate placements before the step."
            )
        if not placement.is_replicate() and mesh.size(dim) > 1:
            dims.append(dim)  # Shard(d), _StridedShard (FSDP2 x TP; its is_shard() is False), ...
    return tuple(dims)


def submesh_ranks(mesh, dims: Sequence[int]) -> list[int]:
    """Global ranks of the sub-mesh through this rank that spans ``dims`` (the other coordinates fixed)."""
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise RuntimeError(f"FAdam: rank {dist.get_rank()} is not part of the DTensor mesh {mesh}")
    index = tuple(slice(None) if d in dims else coordinate[d] for d in range(mesh.ndim))
    return sorted(mesh.mesh[index].flatten().tolist())


def _process_group(mesh, dims: tuple[int, ...]):
    """The process group spanning ``dims`` of ``mesh`` through this rank (cached).

    One mesh dim: the mesh's own group. Several: the default group when they span every rank, else a group created
    once with ``new_group(use_local_synchronization=True)``, so only its members take part (pipeline stages with
    other meshes do not). If that is impossible (e.g. TorchComms' split-only path), the per-dim groups are returned
    and reduced one after another: the same sums, one collective per dim.
    """
    key = (mesh, dims)
    if key in _GROUPS:
        return _GROUPS[key]
    if len(dims) == 1:
        group = mesh.get_group(dims[0])
    else:
        ranks = submesh_ranks(mesh, dims)
        if ranks == list(range(dist.get_world_size())):
            group = None
        else:
            try:
                group = dist.new_group(
                    ranks, backend=dist.get_backend(mesh.get_group(dims[0])), use_local_synchronization=True
                )
            except (NotImplementedError, RuntimeError, ValueError) as exc:
                group = tuple(mesh.get_group(d) for d in dims)
                logger.warning(
                    "FAdam: could not create one process group over mesh dims %s of %s (%s); reducing over each "
                    "dim in turn (%d collectives per phase instead of 1).",
                    dims,
                    mesh,
                    exc,
                    len(dims),
                )
    _GROUPS[key] = group
    return group


def make_reduce(mesh, dims: tuple[int, ...]) -> Callable[[Tensor], None] | None:
    """The ``reduce`` hook for tensors sharded on ``dims`` of ``mesh``: an in-place sum all-reduce, or None."""
    if not dims:
        return None
    group = _process_group(mesh, dims)
    if isinstance(group, tuple):

        def reduce_each_dim(buf: Tensor) -> None:
            for g in group:
                dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=g)

        return reduce_each_dim

    def reduce(buf: Tensor) -> None:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)

    return reduce


def _placed_like(t: Tensor, spec) -> bool:
    """Whether ``t`` is a DTensor on ``spec``'s mesh with ``spec``'s placements (so its local shard matches)."""
    other = getattr(t, "_spec", None)
    return (
        other is not None
        and (other.mesh is spec.mesh or other.mesh == spec.mesh)
        and other.placements == spec.placements
    )


def _check_like_param(name: str, t: Tensor, param: Tensor) -> None:
    if not is_dtensor(t) or t.device_mesh != param.device_mesh or t.placements != param.placements:
        where = f"{tuple(t.placements)} on {t.device_mesh}" if is_dtensor(t) else f"a plain {type(t).__name__}"
        raise RuntimeError(
            f"FAdam: the {name} of the DTensor parameter of shape {tuple(param.shape)} (placements "
            f"{tuple(param.placements)} on {param.device_mesh}) is {where}; it must be a DTensor placed like its "
            "parameter (load optimizer state through torch.distributed.checkpoint.state_dict.set_state_dict)."
        )


def _grad_like_param(grad: Tensor, param: Tensor) -> Tensor:
    """``grad`` with ``param``'s placements, so that their local shards hold the same elements."""
    if not is_dtensor(grad) or grad.device_mesh != param.device_mesh:
        _check_like_param("gradient", grad, param)  # raises
    if grad.placements == param.placements:
        return grad
    key = (str(tuple(param.placements)), str(tuple(grad.placements)))
    if key not in _WARNED:  # once per pair of layouts, not per tensor and step
        _WARNED.add(key)
        logger.warning(
            "FAdam: the gradient of a DTensor parameter (shape %s) is placed %s, the parameter %s; such gradients "
            "are redistributed to their parameter's placements every step (one collective per tensor) so that the "
            "local shards of parameter, gradient and state cover the same elements.",
            tuple(param.shape),
            key[1],
            key[0],
        )
    return grad.redistribute(param.device_mesh, param.placements)


def local_tensors(params: Sequence[Tensor], fishers: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The local shards of DTensors (plain tensors as they are): what the sharded path steps on."""
    return (
        [p.to_local() if is_dtensor(p) else p for p in params],
        [f.to_local() if is_dtensor(f) else f for f in fishers],
    )


def sharded_fadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    fishers: list[Tensor],
    state_steps: list[Tensor],
    *,
    step_fn: Callable[..., None],
    **kwargs: Any,
) -> None:
    """One FAdam step over a list that holds DTensors (and maybe plain tensors), in place.

    ``step_fn`` is ``functional.fadam``; it is called once per sharding group on the local shards with
    ``numels=`` the logical sizes and ``reduce=`` that group's all-reduce, and once on the plain tensors, with
    ``kwargs`` (flags, AMP tensors, hyper-parameters) passed through. Groups run in the order of their first
    tensor in ``params``, which is the same on every rank (the optimizer's param order), so the collectives match.
    """
    with torch.no_grad():  # to_local() is then the local tensor itself, updated in place
        _sharded_fadam(params, grads, exp_avgs, fishers, state_steps, step_fn=step_fn, **kwargs)


def _sharded_fadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    fishers: list[Tensor],
    state_steps: list[Tensor],
    *,
    step_fn: Callable[..., None],
    **kwargs: Any,
) -> None:
    refuse_random_stores(params, fishers, kwargs.get("param_rounding", "nearest"))
    # Per-tensor lists among the kwargs follow the tensors into each call (a Kahan buffer as its local shard).
    comps = kwargs.pop("param_comps", None)
    streams = kwargs.pop("streams", None)
    streams = list(range(len(params))) if streams is None else list(streams)

    def per_tensor(index: list[int]) -> dict[str, Any]:
        out: dict[str, Any] = {"streams": [streams[i] for i in index]}
        if comps is not None:
            out["param_comps"] = [None if comps[i] is None else getattr(comps[i], "_local_tensor", comps[i])
                                  for i in index]  # fmt: skip
        return out

    # The hot loop reads each DTensor's spec (mesh, placements, global shape) and local tensor once, through the
    # attributes DTensor's own methods use: the public properties cost a few microseconds each, per tensor and step.
    by_layout: dict[tuple[int, tuple], list[int]] = {}
    plain: list[int] = []
    for i, param in enumerate(params):
        spec = getattr(param, "_spec", None)
        if spec is None:
            plain.append(i)
        else:
            by_layout.setdefault((id(spec.mesh), spec.placements), []).append(i)
    # Layouts that need the same reduction share one call (e.g. Shard(0) and Shard(1) on one mesh). The order is
    # that of the params, identical on every rank, so the collectives of the groups match across ranks.
    groups: dict[tuple[Any, tuple[int, ...]], list[int]] = {}
    for index in by_layout.values():
        param = params[index[0]]
        groups.setdefault((param._spec.mesh, sharded_dims(param)), []).extend(index)

    for (mesh, dims), index in groups.items():
        local_params, local_grads, local_exp_avgs, local_fishers, steps, numels = [], [], [], [], [], []
        for i in index:
            param, grad, exp_avg, fisher = params[i], grads[i], exp_avgs[i], fishers[i]
            spec = param._spec
            if not _placed_like(exp_avg, spec):
                _check_like_param("exp_avg state", exp_avg, param)
            if not _placed_like(fisher, spec):
                _check_like_param("fisher state", fisher, param)
            if not _placed_like(grad, spec):
                grad = _grad_like_param(grad, param)
            local_params.append(param._local_tensor)
            local_grads.append(grad._local_tensor)
            local_exp_avgs.append(exp_avg._local_tensor)
            local_fishers.append(fisher._local_tensor)
            steps.append(state_steps[i])
            numels.append(spec.shape.numel())
        step_fn(
            local_params,
            local_grads,
            local_exp_avgs,
            local_fishers,
            steps,
            numels=numels,
            reduce=make_reduce(mesh, dims),
            **per_tensor(index),
            **kwargs,
        )

    if plain:
        step_fn(*([lst[i] for i in plain] for lst in (params, grads, exp_avgs, fishers, state_steps)),
                **per_tensor(plain), **kwargs)  # fmt: skip


# FAdam8bit's state of a DTensor parameter. Its blocks are cut per local shard (each rank quantizes its own shard,
# in the shard's flat order), and it is kept as DTensors so that torch.distributed.checkpoint (DCP) saves and loads
# each rank's part, as it does FAdam's state:
#
# * the codes (``exp_avg`` int8, ``fisher_sqrt`` uint8; also the fp32 ``exp_avg``/``fisher`` of small tensors):
#   DTensors placed like the param, its global shape, this rank's shard as the local tensor;
# * the scales: DTensors whose local part has at least num_blocks(shard numel) slots; the first num_blocks hold the
#   scales in block order (what the kernels step), the rest stay zero. Their logical shape is the sizes of the
#   param's sharded tensor dims, then K = num_blocks(R, block_size) with R the product of its other dims, sharded
#   like the param (``Shard(d)`` of the param becomes ``Shard(i)``, i the position of d among the sharded dims), so a
#   rank has (its shard's sizes of those dims) x K >= num_blocks(shard numel) slots. That shape does not depend on
#   the mesh sizes, and it wastes no slot when block_size divides R. Where R < block_size / 2 (a 1-D param; a weight
#   sharded on every dim, e.g. FSDP x row-wise TP) it would waste most slots, so such scales are one even part per
#   rank instead: logical shape (ranks x num_blocks(largest shard numel),), Shard(0) on each sharded mesh dim;
# * ``shard_layout``: a small int64 record (block_size; per sharded mesh dim: its size, the tensor dim, the split
#   factor). The elements a rank's blocks cover follow from it and the param's shape.
#
# A load where the record differs (another world size, or other shards) is refused with an error that says what to
# do: DCP would move each code to the rank that now holds its element, but a block's scale belongs to the old
# shard. Where the scales' logical shape does not depend on the mesh sizes, DCP itself loads such a checkpoint and
# the refusal comes from here with its explanation (for the per-rank scales, DCP's own size mismatch may come first).

LAYOUT_KEY = "shard_layout"
_CODES = ("exp_avg", "fisher_sqrt")
_SCALES = ("exp_avg_scale", "fisher_sqrt_scale")
_RECORD_ROWS = 4  # the record's length is fixed for up to 4 sharded mesh dims: DCP loads it into the same shape


def _sharding(param: Tensor) -> list[tuple[int, int, int]]:
    """(mesh dim size, tensor dim, split factor) of each mesh dim on which ``param`` is sharded, in mesh order."""
    from torch.distributed.tensor.placement_types import Shard, _StridedShard

    sharded_dims(param)  # a Partial param: the sharded path's error
    rows = []
    for i, placement in enumerate(param.placements):
        if placement.is_replicate():
            continue
        if not isinstance(placement, (Shard, _StridedShard)):
            raise ValueError(
                f"FAdam8bit: a DTensor parameter of shape {tuple(param.shape)} has placement {placement!r}; its "
                "8-bit state supports Shard, _StridedShard and Replicate placements"
            )
        split = placement.split_factor if isinstance(placement, _StridedShard) else 1
        rows.append((param.device_mesh.size(i), placement.dim % max(param.ndim, 1), split))
    return rows


def layout_record(param: Tensor, block_size: int) -> Tensor:
    """The ``shard_layout`` record of a DTensor ``param``'s 8-bit state (int64, CPU)."""
    rows = _sharding(param)
    values = [block_size, len(rows), *(v for row in rows for v in row)]
    values += [0] * (3 * max(0, _RECORD_ROWS - len(rows)))
    return torch.tensor(values, dtype=torch.int64)


def describe_layout(record: Tensor) -> str:
    """A record in words, e.g. ``2-way Shard(0)`` or ``not sharded``."""
    values = record.tolist()
    rows = [values[2 + 3 * i : 5 + 3 * i] for i in range(values[1])]
    if not rows:
        return "not sharded"
    words = [f"{size}-way " + (f"_StridedShard({dim}, split_factor={sf})" if sf != 1 else f"Shard({dim})")
             for size, dim, sf in rows]  # fmt: skip
    return ", ".join(words)


def _scales_layout(param: Tensor, block_size: int):
    """(logical shape, placements, local shape) of the scales DTensors of ``param``'s 8-bit state (see above)."""
    from torch.distributed.tensor.placement_types import Replicate, Shard, _StridedShard

    rows = _sharding(param)
    dims = sorted({dim for _, dim, _ in rows})
    shape, local = tuple(param.shape), tuple(param._local_tensor.shape)
    rest = 1
    for d in range(len(shape)):
        if d not in dims:
            rest *= shape[d]
    if 2 * rest < block_size:
        # Per row of the sharded dims, less than half a block: a slot per row would waste most of the scales (a
        # 1-D param: one per element). One even part per rank instead, of the largest shard's block count.
        bound = 1  # no shard has more elements (torch.chunk: ceil per mesh dim, in turn)
        for d in range(len(shape)):
            ways = 1
            for size, dim, _ in rows:
                ways *= size if dim == d else 1
            bound *= -(-shape[d] // ways)
        if param._local_tensor.numel() > bound:
            raise RuntimeError(f"FAdam8bit: a shard of {local} exceeds the bound {bound} of its DTensor {shape}")
        per_rank = -(-bound // block_size)
        ranks = 1
        for size, _, _ in rows:
            ranks *= size
        placements = tuple(Replicate() if p.is_replicate() else Shard(0) for p in param.placements)
        return (ranks * per_rank,), placements, (per_rank,)
    k = (rest + block_size - 1) // block_size
    placements = []
    for placement in param.placements:
        if placement.is_replicate():
            placements.append(Replicate())
        elif isinstance(placement, _StridedShard):
            placements.append(
                _StridedShard(dims.index(placement.dim % len(shape)), split_factor=placement.split_factor)
            )
        else:
            placements.append(Shard(dims.index(placement.dim % len(shape))))
    return (*(shape[d] for d in dims), k), tuple(placements), (*(local[d] for d in dims), k)


def sharded_8bit_state(param: Tensor, state: dict[str, Any], block_size: int) -> dict[str, Any]:
    """A DTensor ``param``'s state as FAdam8bit keeps it, from plain local tensors (``state``: codes of the local
    shard's shape, ``num_blocks(shard numel)`` scales per state; or fp32 ``exp_avg``/``fisher``): DTensors (see
    above), and the ``shard_layout`` record for 8-bit state. The local tensors are used, not copied (but scales)."""
    from torch.distributed.tensor import DTensor

    mesh, placements = param.device_mesh, param.placements
    out = {k: v for k, v in state.items() if k != LAYOUT_KEY}
    if "fisher_sqrt" in out:
        shape, scale_placements, local_shape = _scales_layout(param, block_size)
        stride = [1] * len(shape)
        for d in range(len(shape) - 2, -1, -1):
            stride[d] = stride[d + 1] * shape[d + 1]
        for name in _SCALES:
            scales = out[name]
            padded = torch.zeros(local_shape, dtype=torch.float32, device=scales.device)
            padded.view(-1)[: scales.numel()].copy_(scales.reshape(-1))
            out[name] = DTensor.from_local(padded, mesh, scale_placements, run_check=False, shape=torch.Size(shape),
                                           stride=tuple(stride))  # fmt: skip
        out[LAYOUT_KEY] = layout_record(param, block_size)
    for name in ("exp_avg", "fisher_sqrt", "fisher"):
        if name in out:
            local = out[name].reshape(param._local_tensor.shape)  # (checked: the shard's element count)
            out[name] = DTensor.from_local(local, mesh, placements, run_check=False, shape=param.shape,
                                           stride=param.stride())  # fmt: skip
    return out


def local_8bit_state(
    param: Tensor, state: dict[str, Any], block_size: int, key: Any = "?"
) -> tuple[Tensor, Tensor, Any, Any]:
    """What the kernels step for a DTensor ``param`` (``key``: its index, for messages): this rank's codes (or fp32
    state) and the first ``num_blocks(shard numel)`` slots of its scales, as views of the state's local tensors
    (their sizes and dtypes are checked by the caller).

    Plain tensors (state set by hand) are passed as they are; a DTensor placed unlike the param, scales that are not
    contiguous, or a ``shard_layout`` made for other shards or another ``block_size`` raise ``ValueError``.
    """
    quant = "fisher_sqrt" in state
    spec = param._spec
    out = []
    for name in ("exp_avg", "fisher_sqrt" if quant else "fisher"):
        t = state[name]
        if is_dtensor(t):
            if not _placed_like(t, spec):
                raise ValueError(
                    f"FAdam8bit: state {name!r} of a DTensor parameter (shape {tuple(param.shape)}, placements "
                    f"{tuple(param.placements)}) is a DTensor placed {tuple(t.placements)} on {t.device_mesh}; it "
                    "must be placed like its parameter"
                )
            t = t._local_tensor
        out.append(t)
    if not quant:
        return out[0], out[1], None, None
    nb = (param._local_tensor.numel() + block_size - 1) // block_size
    for name in _SCALES:
        t = state[name]
        if is_dtensor(t):
            if name == _SCALES[0]:  # cut for these shards and block_size? (DCP writes into the live state before
                # load_state_dict can refuse it: a step after a refused load is refused too)
                check_layout("FAdam8bit", key, param, state.get(LAYOUT_KEY), block_size)
            t = t._local_tensor
            if not t.is_contiguous() or t.numel() < nb:
                raise ValueError(
                    f"FAdam8bit: state {name!r} of parameter {key}: its local part ({t.numel()} slots, "
                    f"{'' if t.is_contiguous() else 'not '}contiguous) must be contiguous with at least the {nb} "
                    "scales of this rank's blocks"
                )
            t = t.as_strided((nb,), (1,))  # its first nb slots (one view op: this runs per tensor and step)
        out.append(t)
    return out[0], out[1], out[2], out[3]


_RECORDS: dict[tuple[Any, tuple, int, int], list[int]] = {}


def check_layout(who: str, key: Any, param: Tensor, record: Any, block_size: int) -> None:
    """Raise ``ValueError`` unless ``record`` (a ``shard_layout``) is DTensor ``param``'s for ``block_size``."""
    spec = param._spec
    cache_key = (spec.mesh, spec.placements, param.ndim, block_size)
    expected = _RECORDS.get(cache_key)
    if expected is None:
        expected = _RECORDS[cache_key] = layout_record(param, block_size).tolist()
    if not isinstance(record, Tensor) or record.dtype != torch.int64 or record.dim() != 1 or record.numel() < 2:
        got = f"{record.dtype} of shape {tuple(record.shape)}" if isinstance(record, Tensor) else type(record).__name__
        raise ValueError(
            f"{who}: parameter {key} has DTensor 8-bit state without a valid {LAYOUT_KEY!r} record (an int64 vector "
            f"saved with it); got {got}"
        )
    saved = record.tolist()
    if saved == expected:
        return
    if saved[0] != block_size and saved[1:] == expected[1:]:
        raise ValueError(
            f"{who}: the 8-bit state of parameter {key} was quantized with block_size={saved[0]}, but its param "
            f"group has block_size={block_size}; use the block_size the state was made with."
        )
    _refuse_reshard(who, key, param, record, block_size)


def _refuse_reshard(who: str, key: Any, param: Tensor, saved: Tensor | None, block_size: int) -> None:
    here = describe_layout(layout_record(param, block_size)) if is_dtensor(param) else "a plain tensor (no DTensor)"
    was = describe_layout(saved) if isinstance(saved, Tensor) else "a DTensor"
    raise ValueError(
        f"{who}: the 8-bit state of parameter {key} (shape {tuple(param.shape)}) was quantized in blocks cut per "
        f"local shard of {was}, but here the parameter is {here}. FAdam8bit's 8-bit state cannot be resharded: "
        "torch.distributed.checkpoint (DCP) would move each code to the rank that now holds its element, but a "
        "block's scale belongs to the old shard, so it is refused instead of loaded wrong. Resume with the mesh "
        "and placements it was saved with (the same world size; the number of HSDP replicas may differ), or "
        "change the world size through fp32 state: where it was saved, load it into hf_fadam.FAdam "
        "(fadam.load_state_dict(fadam8bit.state_dict()) dequantizes it) and save that with DCP, which reshards "
        "FAdam's state exactly; at the new size, load that into FAdam and pass fadam.state_dict() to "
        "FAdam8bit.load_state_dict (docs/8bit.md, 'Distributed')."
    )


def loaded_8bit_local(who: str, key: Any, param: Tensor, state: dict[str, Any], block_size: int) -> dict[str, Any]:
    """The saved 8-bit state of ``param`` (codes, scales, ``shard_layout``) as this rank's plain tensors: codes of
    its shard, ``num_blocks`` scales each (the caller copies and checks them with ``check_8bit_state``).

    Accepted: DTensor state of FAdam8bit (DCP, or a per-rank ``torch.save``) whose record matches ``param``'s
    layout and ``block_size``; plain local tensors without a record (the per-rank save of earlier versions) for a
    DTensor param; plain tensors without a record for a plain param. Anything else raises ``ValueError``: state cut
    per shard of another layout (resharding), or a sharded state for an unsharded param.
    """
    record = state.get(LAYOUT_KEY)
    dtensors = [is_dtensor(state[name]) for name in (*_CODES, *_SCALES)]
    out = {name: state[name] for name in (*_CODES, *_SCALES)}
    if not is_dtensor(param):
        if record is not None or any(dtensors):
            _refuse_reshard(who, key, param, record if isinstance(record, Tensor) else None, block_size)
        return out
    if record is None and not any(dtensors):
        return out  # a per-rank save of earlier versions: this rank's shard (its sizes are checked by the caller)
    check_layout(who, key, param, record, block_size)
    if not all(dtensors):  # a gathered (full_state_dict) or hand-made copy: which shard is this rank's?
        _refuse_reshard(who, key, param, record, block_size)
    spec = param._spec
    scale_shape, scale_placements, _ = _scales_layout(param, block_size)
    nb = (param._local_tensor.numel() + block_size - 1) // block_size
    for name in _CODES:
        t = out[name]
        if not _placed_like(t, spec) or t.shape != param.shape:
            raise ValueError(
                f"{who}: state {name!r} of parameter {key} is a DTensor of shape {tuple(t.shape)} placed "
                f"{tuple(t.placements)} on {t.device_mesh}; it must have its parameter's shape {tuple(param.shape)} "
                f"and placements {tuple(param.placements)} on {param.device_mesh}"
            )
        out[name] = t.to_local()
    for name in _SCALES:
        t = out[name]
        if t.device_mesh != spec.mesh or tuple(t.placements) != scale_placements or tuple(t.shape) != scale_shape:
            raise ValueError(
                f"{who}: state {name!r} of parameter {key} is a DTensor of shape {tuple(t.shape)} placed "
                f"{tuple(t.placements)} on {t.device_mesh}; for this parameter and block_size={block_size} it must "
                f"have shape {scale_shape} and placements {scale_placements} on {spec.mesh}"
            )
        out[name] = t.to_local().reshape(-1)[:nb]
    return out


def refuse_random_stores(params: Sequence[Tensor], fishers: Sequence[Tensor], param_rounding: str) -> None:
    """Stochastic rounding draws its bits by the element's index in the tensor it is given: a local shard's indices
    are not the whole tensor's, so a sharded run would not give the one-process result. Refuse it by name."""
    from ._rounding import SIXTEEN_BIT, resolve_param_rounding

    for i, (param, f) in enumerate(zip(params, fishers)):
        if not is_dtensor(param):
            continue
        if resolve_param_rounding(param_rounding, param.dtype) == "stochastic" or f.dtype in SIXTEEN_BIT:
            raise RuntimeError(
                f"FAdam: param {i} is a {param.dtype} DTensor (FSDP2/TP) with a stochastically rounded store "
                f"(param_rounding={param_rounding!r}, state {f.dtype}); its random bits would follow the local "
                "shard, not the whole tensor, so the run would differ from one process. Use "
                "param_rounding='kahan' (deterministic, exact under sharding) or 'nearest', and float32 state."
            )


def describe_sharded(params: Sequence[Tensor], local_description: str) -> str:
    """The Trainer log's words for this path, e.g. ``sharded DTensor (local shards: C kernel)``."""
    n = sum(map(is_dtensor, params))
    plain = len(params) - n
    extra = f"; {plain} plain tensor(s) on the ordinary path" if plain else ""
    return f"sharded DTensor (local shards: {local_description}{extra})"


__all__ = [
    "LAYOUT_KEY",
    "describe_layout",
    "check_layout",
    "describe_sharded",
    "has_dtensor",
    "is_dtensor",
    "layout_record",
    "loaded_8bit_local",
    "local_8bit_state",
    "local_tensors",
    "make_reduce",
    "sharded_8bit_state",
    "sharded_dims",
    "sharded_fadam",
    "submesh_ranks",
]
