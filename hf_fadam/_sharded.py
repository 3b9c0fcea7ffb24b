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
            **kwargs,
        )

    if plain:
        step_fn(*([lst[i] for i in plain] for lst in (params, grads, exp_avgs, fishers, state_steps)), **kwargs)


def describe_sharded(params: Sequence[Tensor], local_description: str) -> str:
    """The Trainer log's words for this path, e.g. ``sharded DTensor (local shards: C kernel)``."""
    n = sum(map(is_dtensor, params))
    plain = len(params) - n
    extra = f"; {plain} plain tensor(s) on the ordinary path" if plain else ""
    return f"sharded DTensor (local shards: {local_description}{extra})"


__all__ = [
    "describe_sharded",
    "has_dtensor",
    "is_dtensor",
    "local_tensors",
    "make_reduce",
    "sharded_dims",
    "sharded_fadam",
    "submesh_ranks",
]
