"""FAdam on DTensors and FSDP2 in 2 or 4 gloo processes: the update must not depend on the number of processes.

Run standalone (prints one PASS/FAIL line per check; exit status 1 if any failed)::

    python tests/distributed/dtensor_checks.py [OUT_DIR]              # 2 ranks, 1-D mesh, FSDP2, DCP
    python tests/distributed/dtensor_checks.py [OUT_DIR] --world=4    # 4 ranks, 2x2 meshes (HSDP, FSDP x TP)

``tests/test_distributed.py`` runs each world size once and turns each check into a pytest test. Every comparison
is against the for-loop run on the whole, unsharded tensors in one process (each rank computes that reference
itself from the same seeded data). DTensor params go through ``hf_fadam/_sharded.py`` (local shards, logical
numels, one all-reduce per phase and sharding group) for every implementation but the for-loop, which runs on the
DTensors themselves. Checks:

* ``dtensor_parity[impl,layout,dtype]``: params, ``exp_avg``, ``fisher`` and ``step`` after 3 steps equal the
  unsharded for-loop, within the tolerance row of the implementation that ran on the local shards. Tensors: uneven
  rows, fewer rows than ranks (empty shards), zero-size, an all-zero gradient, a first gradient at step 2, and a
  param group whose only tensor has one row (every rank but rank 0 steps only empty shards in that call: it must
  still join both collectives); three param groups with different lr/eps/clip/p/maximize/weight_decay.
  Implementations: for-loop (on DTensors), foreach, default (the C kernel), fused (C kernel), fused Triton
  (interpreted). Layouts: ``shard0`` (FSDP2), ``shard1`` (TP), ``hsdp`` ((Replicate, Shard(0)), 1 x 2 and 2 x 2),
  ``fsdp_tp`` ((Shard(0), Shard(1)) on 2 x 2; vectors (Shard(0), Shard(0))), ``fsdp_tp_strided``
  ((_StridedShard(0), Shard(0)): what ``fully_shard`` makes of a TP colwise param), ``mixed`` (Shard(0) DTensors
  and plain tensors in one group), ``mixed_2d`` (four placements and plain tensors in one group on 2 x 2),
  ``grad_replicate`` (Shard(0) params with Replicate gradients: redistributed). fp32 and bf16 params.
* ``dtensor_comms[impl,layout]``: the collectives of one step, counted from the gloo backend's profiler events:
  exactly 2 per (param group, sharding group) for the sharded path, the same for 4 times as many tensors, and never
  an all-gather; the for-loop's count is reported.
* ``per_shard_mutant_is_detected``: the optimizer applied to each rank's shards as plain tensors (the bug FADAM_SPEC
  decision 6 forbids) misses the reference by far more than the tolerance: the parity checks can see it.
* ``dtensor_state_layout``: ``step`` is a plain 0-d float32 tensor, ``exp_avg``/``fisher`` are DTensors placed
  like the param; a param without gradient gets no state.
* ``partial_param_refused``: a ``Partial`` param raises an error naming its shape and placements, before any change.
* ``describe_sharded_path``: ``describe_implementation`` names the sharded path and the local kernel.
* ``process_group_over_mesh_dims`` (4 ranks): the group for two sharded mesh dims that do not span the world is
  one new group of exactly the sub-mesh's ranks; the per-dim fallback gives the same sums.
* ``fsdp2_fully_shard_equals_single_process[...]``: ``fully_shard`` training (params and grads are ``Shard(0)``
  DTensors inside ``step``) equals one process on the same global batch.
* ``fsdp2_dcp_roundtrip_and_dummy_step[...]``: DCP's dummy init step (zero grads, lr = 0) creates the state and
  leaves params unchanged and finite; DCP save/load restores params and state bit-identically (state dtype kept:
  fp32 for bf16 params) and the resumed run continues bit-identically.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any


_HERE = Path(__file__).resolve().parent
# tests/distributed and tests first; the repo root last, so an installed or PYTHONPATH hf_fadam wins when there is one.
sys.path[:0] = [str(_HERE), str(_HERE.parent)]
sys.path.append(str(_HERE.parents[1]))

import torch  # noqa: E402
from _common import (  # noqa: E402
    CheckRecorder,
    count_collectives,
    init_gloo,
    main_out_dir,
    max_rel_err,
    print_summary,
    spawn,
)

from _tolerances import tolerance  # noqa: E402


STEPS = 3
# Which fused kernel fused=True runs on CPU (hf_fadam.functional): the C kernel, unless a check asks for Triton.
BACKEND_VAR = "HF_FADAM_CPU_FUSED_BACKEND"

# name -> (global shape, gradient scale, param group). A scale of 0 gives an all-zero gradient.
TENSORS: dict[str, tuple[tuple[int, ...], float, int]] = {
    "uneven_7x5": ((7, 5), 1.0, 0),
    "fewer_rows_than_ranks_1x6": ((1, 6), 0.5, 0),  # rank >= 1's shard is empty
    "even_8x4": ((8, 4), 30.0, 0),
    "odd_vector_3": ((3,), 1e-3, 1),  # RMS(g) << 1: the adaptive epsilon is active
    "zero_grad_5x3": ((5, 3), 0.0, 1),  # RMS(g) = 0: the epsilon guard
    "late_grad_4x2": ((4, 2), 2e-2, 1),  # no gradient at step 1: skipped, its own step count starts later
    "empty_0x4": ((0, 4), 1.0, 1),  # zero-size on every rank
    "one_row_1x3": ((1, 3), 3.0, 2),  # alone in its group: ranks >= 1 hold only empty shards in that call
}
GROUP_OPTIONS = [
    {"lr": 1e-2, "weight_decay": 0.1},
    {"lr": 3e-2, "weight_decay": 0.05, "eps": 1e-3, "clip": 0.5, "p": 0.4, "maximize": True},
    {"lr": 2e-2, "weight_decay": 0.0},
]

# label -> (FAdam flags, fused CPU backend, tolerance row of the implementation run on the local shards).
# "default": FAdam() as users build it; on CPU with a C compiler the C kernel, else foreach.
IMPLS: dict[str, tuple[dict[str, Any], str, str | None]] = {
    "for_loop": ({"foreach": False}, "c", "foreach"),  # on the DTensors: sums reordered by DTensor's reduction
    "foreach": ({"foreach": True}, "c", "foreach"),
    "default": ({}, "c", None),
    "fused": ({"fused": True}, "c", "fused_c"),
    "fused_triton": ({"fused": True}, "triton", "fused_triton"),
}


def _tolerance_row(impl: str) -> str:
    row = IMPLS[impl][2]
    if row is None:
        from hf_fadam.kernels import cpu_fused

        row = "fused_c" if cpu_fused.is_available() else "foreach"
    return row


@contextlib.contextmanager
def _cpu_backend(name: str):
    old = os.environ.get(BACKEND_VAR)
    os.environ[BACKEND_VAR] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(BACKEND_VAR, None)
        else:
            os.environ[BACKEND_VAR] = old


def _tensors(copies: int = 1) -> dict[str, tuple[tuple[int, ...], float, int]]:
    if copies == 1:
        return TENSORS
    return {f"{name}#{c}": spec for c in range(copies) for name, spec in TENSORS.items()}


def _data(
    dtype: torch.dtype = torch.float32, copies: int = 1
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(1234)
    tensors = _tensors(copies)
    params = {name: torch.randn(shape, generator=gen).to(dtype) for name, (shape, _, _) in tensors.items()}
    grads = []
    for step in range(STEPS):
        step_grads = {}
        for name, (shape, scale, _) in tensors.items():
            if name.startswith("late") and step == 0:
                continue
            step_grads[name] = (torch.randn(shape, generator=gen) * scale).to(dtype)
        grads.append(step_grads)
    return params, grads


def _group_of(name: str) -> int:
    return TENSORS[name.split("#")[0]][2]


def _param_groups(params: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    groups = []
    for index, options in enumerate(GROUP_OPTIONS):
        groups.append({"params": [p for name, p in params.items() if _group_of(name) == index], **options})
    return groups


def _run(params: dict[str, torch.Tensor], grads: list[dict[str, torch.Tensor]], convert, **flags):
    """One step per entry of ``grads`` on ``params`` (in place); ``convert(name, full)`` places a gradient."""
    from hf_fadam import FAdam

    opt = FAdam(_param_groups(params), **flags)
    for step_grads in grads:
        for name, p in params.items():
            p.grad = convert(name, step_grads[name]) if name in step_grads else None
        opt.step()
    return opt


def _reference(
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Params and state after the unsharded for-loop run, keyed by tensor name."""
    params, grads = _data(dtype)
    params = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = _run(params, grads, lambda name, g: g, foreach=False)
    return params, _states(params, opt)


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _states(params: dict[str, torch.Tensor], opt) -> dict[str, dict[str, torch.Tensor]]:
    return {name: opt.state.get(p, {}) for name, p in params.items()}


def _gathered(params: dict[str, torch.Tensor], opt) -> tuple[dict, dict]:
    """Whole-tensor copies of params and state (collectives: call on every rank)."""
    full_params = {n: _full(p.detach()).clone() for n, p in params.items()}
    full_states = {n: {k: _full(v).clone() for k, v in s.items()} for n, s in _states(params, opt).items()}
    return full_params, full_states


def _compare(params, opt, ref_params, ref_states, param_tol: float, state_tol: float) -> dict[str, Any]:
    """Max relative error of params and state against the reference; all collectives before the assertion.

    State is compared at the fp32 tolerance whatever the param dtype: it is kept in fp32 for 16-bit params, and m
    and f do not depend on the params (the test gradients do not), so a 16-bit param rounding cannot reach them.
    """
    full_params, full_states = _gathered(params, opt)
    errs: dict[str, float] = {}
    for name, ref in ref_params.items():
        errs[f"{name}.param"] = max_rel_err(full_params[name], ref.detach())
        state, ref_state = full_states[name], ref_states[name]
        if set(state) != set(ref_state):
            raise AssertionError(f"{name}: state keys {sorted(state)} != reference {sorted(ref_state)}")
        for key in sorted(state):
            errs[f"{name}.{key}"] = max_rel_err(state[key], ref_state[key])
    bad = {k: v for k, v in errs.items() if not v <= (param_tol if k.endswith(".param") else state_tol)}
    if bad:
        raise AssertionError(f"max relative error above {param_tol} (params) / {state_tol} (state): {bad}")
    return {"max_rel_err": max(errs.values()), "worst": max(errs, key=errs.get)}


# Placements per layout. Matrices and vectors may differ; "mixed_2d" cycles through four placements by tensor.
_MIXED_2D = ("S0S1", "RS0", "S0R", "RR")


def _placements(layout: str, name: str, full: torch.Tensor):
    """The placements of tensor ``name`` in ``layout``, or None for a plain tensor."""
    from torch.distributed.tensor import Replicate, Shard

    matrix = full.dim() >= 2
    if layout in ("shard0", "grad_replicate"):
        return [Shard(0)]
    if layout == "shard1":  # tensor parallel, transformers' distributed loading; vectors replicated
        return [Shard(1) if matrix else Replicate()]
    if layout == "hsdp":
        return [Replicate(), Shard(0)]
    if layout == "fsdp_tp":  # FSDP on mesh dim 0 x TP on mesh dim 1; a vector sharded on both mesh dims
        return [Shard(0), Shard(1)] if matrix else [Shard(0), Shard(0)]
    if layout == "fsdp_tp_strided":  # fully_shard over a TP colwise-sharded param: FSDP2 makes it _StridedShard
        from torch.distributed.tensor.placement_types import _StridedShard

        return [_StridedShard(0, split_factor=2), Shard(0)]
    if layout == "mixed":  # FSDP2 ignored params or a root module left unsharded: plain vectors
        return [Shard(0)] if matrix else None
    if layout == "mixed_2d":
        if not matrix:
            return None
        kind = _MIXED_2D[sorted(n for n in TENSORS if len(TENSORS[n][0]) >= 2).index(name.split("#")[0]) % 4]
        return {
            "S0S1": [Shard(0), Shard(1)],
            "RS0": [Replicate(), Shard(0)],
            "S0R": [Shard(0), Replicate()],
            "RR": [Replicate(), Replicate()],
        }[kind]
    raise ValueError(f"unknown layout {layout!r}")


def _converter(mesh, layout: str, grads: bool = False):
    from torch.distributed.tensor import Replicate, distribute_tensor

    def convert(name: str, full: torch.Tensor) -> torch.Tensor:
        placements = _placements(layout, name, full)
        if placements is None:
            return full.clone()
        if grads and layout == "grad_replicate":
            placements = [Replicate()]
        # Every rank holds the same full tensor, so each slices its shard locally (no scatter).
        return distribute_tensor(full, mesh, placements, src_data_rank=None)

    return convert


def check_dtensor_parity(mesh, impl: str, dtype: torch.dtype = torch.float32, layout: str = "shard0"):
    def check():
        from hf_fadam.functional import describe_implementation

        flags, backend, _ = IMPLS[impl]
        row = _tolerance_row(impl)
        ref_params, ref_states = _reference(dtype)
        convert = _converter(mesh, layout)
        full_params, grads = _data(dtype)
        params = {k: torch.nn.Parameter(convert(k, v)) for k, v in full_params.items()}
        local_shapes = {k: tuple(_local(p).shape) for k, p in params.items()}
        with _cpu_backend(backend):
            opt = _run(params, grads, _converter(mesh, layout, grads=True), **flags)
            group = opt.param_groups[0]
            fishers = [opt.state[p]["fisher"] for p in group["params"]]
            ran = describe_implementation(group["params"], fishers, group["foreach"], group["fused"])
        info = _compare(
            params, opt, ref_params, ref_states, tolerance(row, dtype)[1], tolerance(row, torch.float32)[1]
        )
        info.update(implementation=ran, tolerance_row=row, local_shapes=local_shapes)
        return info

    return check


def _expected_collectives(params: dict[str, torch.Tensor], mesh) -> int:
    """2 per (param group, set of mesh dims of size > 1 on which a DTensor of that group is not replicated)."""
    from torch.distributed.tensor import DTensor

    keys = set()
    for name, p in params.items():
        if isinstance(p, DTensor):
            dims = tuple(d for d, pl in enumerate(p.placements) if not pl.is_replicate() and mesh.size(d) > 1)
            if dims:
                keys.add((_group_of(name), dims))
    return 2 * len(keys)


def check_comms(mesh, impl: str, layout: str = "shard0"):
    """Collectives of one step (all gradients present), for the tensor set and for 4 copies of it."""

    def check():
        flags, backend, _ = IMPLS[impl]
        counts, expected = {}, {}
        # The for-loop's count is only reported, and per tensor: its 4x run would just cost time.
        for copies in (1,) if impl == "for_loop" else (1, 4):
            convert = _converter(mesh, layout)
            full_params, grads = _data(copies=copies)
            params = {k: torch.nn.Parameter(convert(k, v)) for k, v in full_params.items()}
            with _cpu_backend(backend):
                opt = _run(params, grads[:1], _converter(mesh, layout, grads=True), **flags)  # state exists
                for name, p in params.items():
                    p.grad = _converter(mesh, layout, grads=True)(name, grads[1][name])
                counts[copies] = count_collectives(opt.step)
            expected[copies] = _expected_collectives(params, mesh)
        info = {
            "tensors": len(TENSORS),
            "counts": counts[1],
            "counts_4x_tensors": counts.get(4),
            "expected": expected[1],
        }
        gathers = {op: n for c in counts.values() for op, n in c.items() if "all_reduce" not in op}
        if gathers:
            raise AssertionError(f"a step ran collectives other than all-reduce: {gathers} ({counts})")
        if impl == "for_loop":  # the oracle: DTensor's own reductions, one per tensor and RMS; reported
            return info
        totals = {copies: sum(c.values()) for copies, c in counts.items()}
        if totals[1] != expected[1] or totals[4] != expected[4]:
            raise AssertionError(
                f"collectives per step {totals} (1x, 4x tensors), expected {expected}: 2 per param group and "
                "sharding group, whatever the number of tensors"
            )
        return info

    return check


def check_mutant(mesh):
    """Apply the reference to local shards as plain tensors: the per-shard RMS bug. It must be visible."""

    def check():
        from torch.distributed.tensor import DTensor, Shard

        ref_params, _ = _reference()
        convert = _converter(mesh, "shard0")
        full_params, grads = _data()
        local = {k: convert(k, v).to_local().clone().requires_grad_() for k, v in full_params.items()}
        _run(local, grads, lambda name, g: convert(name, g).to_local(), foreach=False)
        errs = {}
        for name, p in local.items():
            full = DTensor.from_local(
                p.detach(), mesh, [Shard(0)], shape=ref_params[name].shape, stride=ref_params[name].stride()
            ).full_tensor()
            errs[name] = max_rel_err(full, ref_params[name])
        # A tensor whose rows all sit on one rank is updated identically; the others must miss by far more than
        # the largest tolerance the parity checks use for fp32 (measured: 1.4e-3).
        worst_tol = max(tolerance(row, torch.float32)[1] for row in ("foreach", "fused_c", "fused_triton"))
        if not max(errs.values()) > 10 * worst_tol:
            raise AssertionError(f"per-shard updates are not distinguishable from the whole-tensor ones: {errs}")
        return {"per_shard_rel_err": errs}

    return check


def check_state_layout(mesh):
    def check():
        from torch.distributed.tensor import DTensor

        convert = _converter(mesh, "shard0")
        full_params, grads = _data()
        params = {k: torch.nn.Parameter(convert(k, v)) for k, v in full_params.items()}
        opt = _run(params, grads[:1], convert)
        problems = []
        for name, p in params.items():
            state = opt.state.get(p, {})
            if name.startswith("late"):
                if state:
                    problems.append(f"{name}: state created for a param without grad: {sorted(state)}")
                continue
            step = state["step"]
            if isinstance(step, DTensor) or step.dim() != 0 or step.dtype != torch.float32:
                problems.append(f"{name}: step is {type(step).__name__} {step.dtype} dim {step.dim()}")
            for key in ("exp_avg", "fisher"):
                value = state[key]
                if not isinstance(value, DTensor):
                    problems.append(f"{name}.{key} is {type(value).__name__}, not DTensor")
                elif value.placements != p.placements or value.to_local().shape != p.to_local().shape:
                    problems.append(
                        f"{name}.{key}: {value.placements} {value.to_local().shape} vs param "
                        f"{p.placements} {p.to_local().shape}"
                    )
        if problems:
            raise AssertionError("; ".join(problems))

    return check


def check_partial_refused(mesh):
    """A Partial param (unreduced addends) has no whole-tensor RMS: a clear error, nothing changed."""

    def check():
        from torch.distributed.tensor import DTensor, Partial

        from hf_fadam import FAdam

        local = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
        param = torch.nn.Parameter(DTensor.from_local(local, mesh, [Partial()]))
        param.grad = DTensor.from_local(torch.ones(4, 3), mesh, [Partial()])
        before = param.detach().to_local().clone()
        opt = FAdam([param], lr=1e-2)
        try:
            opt.step()
        except ValueError as exc:
            message = str(exc)
        else:
            raise AssertionError("a Partial DTensor parameter was stepped without an error")
        for needed in ("Partial", "(4, 3)", "placements"):
            if needed not in message:
                raise AssertionError(f"the error does not name {needed!r}: {message}")
        if not torch.equal(param.detach().to_local(), before):
            raise AssertionError("the param changed before the refusal")
        return {"message": message}

    return check


def check_description(mesh):
    """describe_implementation: the sharded path and the kernel it runs on the local shards."""

    def check():
        from hf_fadam.functional import describe_implementation
        from hf_fadam.kernels import cpu_fused

        convert = _converter(mesh, "shard0")
        full_params, _ = _data()
        dtensors = [convert(k, v) for k, v in full_params.items()]
        with _cpu_backend("c"):
            got = {
                label: describe_implementation(dtensors, dtensors, flags.get("foreach"), flags.get("fused"))
                for label, (flags, _, _) in IMPLS.items()
                if label != "fused_triton"
            }
        expected_kernel = "C kernel" if cpu_fused.is_available() else "foreach"
        problems = []
        if got["for_loop"] != "for-loop reference":
            problems.append(f"for_loop: {got['for_loop']!r}")
        for label, kernel in (("default", expected_kernel), ("foreach", "foreach"), ("fused", "C kernel")):
            if label == "fused" and not cpu_fused.is_available():
                continue
            if not (got[label].startswith("sharded DTensor") and kernel in got[label]):
                problems.append(f"{label}: {got[label]!r} (expected 'sharded DTensor ... {kernel}')")
        if problems:
            raise AssertionError("; ".join(problems))
        return got

    return check


def check_process_groups(world: int):
    """Two sharded mesh dims that do not span the world: one new group of the sub-mesh's ranks (or, if that
    cannot be created, the per-dim groups in turn); either way the same sums. Mesh (2, 2, 1), dims (1, 2)."""

    def check():
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from hf_fadam import _sharded

        mesh = init_device_mesh("cpu", (2, world // 2, 1), mesh_dim_names=("a", "b", "c"))
        rank = dist.get_rank()
        coordinate = mesh.get_coordinate()
        expected_ranks = sorted(mesh.mesh[coordinate[0]].flatten().tolist())
        ranks = _sharded.submesh_ranks(mesh, (1, 2))
        world_ranks = _sharded.submesh_ranks(mesh, (0, 1, 2))

        def summed(reduce) -> float:
            buf = torch.tensor([[float(rank)]], dtype=torch.float64)
            reduce(buf)
            return buf.item()

        one_group = summed(_sharded.make_reduce(mesh, (1, 2)))
        group = _sharded._GROUPS[(mesh, (1, 2))]
        group_ranks = dist.get_process_group_ranks(group) if group is not None else None
        # The fallback: what make_reduce does when new_group is refused (e.g. TorchComms' split-only path).
        del _sharded._GROUPS[(mesh, (1, 2))]
        real_new_group = dist.new_group

        def refuse(*args, **kwargs):
            raise NotImplementedError("new_group refused by the test")

        dist.new_group = refuse
        try:
            fallback_reduce = _sharded.make_reduce(mesh, (1, 2))
        finally:
            dist.new_group = real_new_group
        fallback = summed(fallback_reduce)
        fallback_groups = _sharded._GROUPS.pop((mesh, (1, 2)))

        problems = []
        if ranks != expected_ranks or world_ranks != list(range(world)):
            problems.append(f"submesh_ranks: {ranks} (expected {expected_ranks}), all dims {world_ranks}")
        if group_ranks != expected_ranks:
            problems.append(f"the group of dims (1, 2) has ranks {group_ranks}, expected {expected_ranks}")
        if one_group != sum(expected_ranks) or fallback != sum(expected_ranks):
            problems.append(f"sums {one_group} (one group), {fallback} (per dim), expected {sum(expected_ranks)}")
        if not isinstance(fallback_groups, tuple) or len(fallback_groups) != 2:
            problems.append(f"the fallback is {fallback_groups!r}, not the two per-dim groups")
        if problems:
            raise AssertionError("; ".join(problems))
        return {"submesh_ranks": ranks, "sum": one_group}

    return check


# ----------------------------------------------------------------------------------------------- FSDP2


FSDP_STEPS = 4
GLOBAL_BATCH = 8


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # Linear(7, 1): weight (1, 7) and bias (1,) have fewer rows than ranks; Linear(5, 7) is uneven (4 + 3 rows).
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))


def _batches(dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(99)
    return [
        (torch.randn(GLOBAL_BATCH, 5, generator=gen).to(dtype), torch.randn(GLOBAL_BATCH, 1, generator=gen).to(dtype))
        for _ in range(FSDP_STEPS + 2)
    ]


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _fsdp2_model(mesh, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model(seed).to(dtype)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp2_train(model, opt, batches, rank: int, world: int, placements_seen: list | None = None) -> None:
    from torch.distributed.tensor import DTensor

    rows = GLOBAL_BATCH // world
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        _loss(model, x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]).backward()
        if placements_seen is not None:
            for p in model.parameters():
                placements_seen.append(
                    (
                        type(p).__name__,
                        isinstance(p, DTensor) and str(p.placements),
                        type(p.grad).__name__,
                        isinstance(p.grad, DTensor) and str(p.grad.placements),
                    )
                )
        opt.step()


def _single_process_train(flags: dict[str, Any], batches):
    from hf_fadam import FAdam

    model = _model(0)
    opt = FAdam(model.parameters(), lr=1e-2, weight_decay=0.1, **flags)
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        opt.step()
    return model, opt


def _compare_models(model, opt, ref_params, ref_states, row: str) -> dict[str, Any]:
    params = dict(model.named_parameters())
    if sorted(params) != sorted(ref_params):
        raise AssertionError(f"param names {sorted(params)} != {sorted(ref_params)}")
    tol = tolerance(row, torch.float32)[1]
    return _compare(params, opt, ref_params, ref_states, tol, tol)


def check_fsdp2_training(mesh, rank: int, world: int, impl: str):
    def check():
        from hf_fadam import FAdam

        flags = IMPLS[impl][0]
        batches = _batches()[:FSDP_STEPS]
        ref_model, ref_opt = _single_process_train({"foreach": False}, batches)
        ref_params = dict(ref_model.named_parameters())
        model = _fsdp2_model(mesh)
        opt = FAdam(model.parameters(), lr=1e-2, weight_decay=0.1, **flags)
        seen: list = []
        _fsdp2_train(model, opt, batches, rank, world, seen)
        info = _compare_models(model, opt, ref_params, _states(ref_params, ref_opt), _tolerance_row(impl))
        wrong = sorted(
            {
                s
                for s in seen
                if s[0] != "DTensor" or s[2] != "DTensor" or "Shard(dim=0)" not in s[1] or "Shard(dim=0)" not in s[3]
            }
        )
        if wrong:
            raise AssertionError(f"inside step, params/grads were not Shard(0) DTensors: {wrong}")
        info["local_shapes"] = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
        return info

    return check


def check_dcp(mesh, rank: int, world: int, ckpt_dir: str, flags: dict[str, Any], dtype: torch.dtype):
    """DCP save/load of an FSDP2 model + FAdam state, through DCP's dummy init step, then two more identical steps."""

    def check():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, get_state_dict, set_state_dict

        from hf_fadam import FAdam

        model = _fsdp2_model(mesh, dtype=dtype)
        opt = FAdam(model.parameters(), lr=1e-2, weight_decay=0.1, **flags)
        _fsdp2_train(model, opt, _batches(dtype)[:FSDP_STEPS], rank, world)
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt_dir)

        # A fresh model (other init) and an optimizer without state: DCP's first call runs a dummy step
        # with zero grads and lr = 0 to create the state. It must not move or poison the params.
        new_model = _fsdp2_model(mesh, seed=7, dtype=dtype)
        new_opt = FAdam(new_model.parameters(), lr=1e-2, weight_decay=0.1, **flags)
        before = {n: p.detach().full_tensor().clone() for n, p in new_model.named_parameters()}
        get_optimizer_state_dict(new_model, new_opt)
        after = {n: p.detach().full_tensor() for n, p in new_model.named_parameters()}
        dummy_steps = sorted({float(s["step"]) for s in new_opt.state.values()})
        dummy_states = len(new_opt.state)
        dummy_state_finite = all(
            bool(torch.isfinite(_full(v)).all()) for s in new_opt.state.values() for v in s.values()
        )
        moved = [n for n in before if not torch.equal(before[n], after[n])]
        lrs = [g["lr"] for g in new_opt.param_groups]

        new_model_sd, new_optim_sd = get_state_dict(new_model, new_opt)
        to_load = {"model": new_model_sd, "optim": new_optim_sd}
        dcp.load(to_load, checkpoint_id=ckpt_dir)
        set_state_dict(new_model, new_opt, model_state_dict=to_load["model"], optim_state_dict=to_load["optim"])
        saved = _gathered(dict(model.named_parameters()), opt)
        loaded = _gathered(dict(new_model.named_parameters()), new_opt)
        dtypes = sorted({f"{k}:{v.dtype}" for s in new_opt.state.values() for k, v in s.items()})
        layout = sorted({f"{k}:{type(v).__name__}" for s in new_opt.state.values() for k, v in s.items()})

        # Resume: the same two further steps on both must give bit-identical params and state.
        extra = _batches(dtype)[FSDP_STEPS:]
        _fsdp2_train(model, opt, extra, rank, world)
        _fsdp2_train(new_model, new_opt, extra, rank, world)
        resumed = _gathered(dict(model.named_parameters()), opt)
        resumed_new = _gathered(dict(new_model.named_parameters()), new_opt)

        n_params = len(before)
        if dummy_states != n_params or dummy_steps != [1.0]:
            raise AssertionError(f"dummy step: state for {dummy_states}/{n_params} params, steps {dummy_steps}")
        if moved:
            raise AssertionError(f"DCP's dummy init step (zero grads, lr=0) moved params: {moved}")
        if not dummy_state_finite or not all(torch.isfinite(t).all() for t in after.values()):
            raise AssertionError("DCP's dummy init step produced non-finite params or state")
        if lrs != [1e-2] * len(lrs):
            raise AssertionError(f"lr not restored after the dummy step: {lrs}")
        state_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        expected = {"step:torch.float32", f"exp_avg:{state_dtype}", f"fisher:{state_dtype}"}
        types = {"exp_avg:DTensor", "fisher:DTensor", "step:Tensor"}
        if dtype in (torch.bfloat16, torch.float16):  # param_rounding="auto": Kahan buffer, a DTensor like the param
            expected.add(f"param_comp:{dtype}")
            types.add("param_comp:DTensor")
        expected = sorted(expected)
        if dtypes != expected or layout != sorted(types):
            raise AssertionError(f"loaded state dtypes {dtypes} (expected {expected}), types {layout}")
        for label, (a, b) in (("restored", (loaded, saved)), ("resumed", (resumed_new, resumed))):
            differ = [n for n in a[0] if not torch.equal(a[0][n], b[0][n])]
            differ += [f"{n}.{k}" for n in a[1] for k in a[1][n] if not torch.equal(a[1][n][k], b[1][n][k])]
            if differ:
                raise AssertionError(f"{label} params/state are not bit-identical to the original run: {differ}")
        return {"dummy_step": "params unchanged, finite", "restored": "bit-identical", "resume": "bit-identical"}

    return check


def _worker_2(rank: int, world: int, out_dir: str, rec: CheckRecorder) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    for impl in ("for_loop", "foreach", "default", "fused", "fused_triton"):
        if impl == "fused_triton" and not _triton_available():
            continue
        rec.run(f"dtensor_parity[{impl}]", check_dtensor_parity(mesh, impl))
    for impl in ("for_loop", "foreach", "default", "fused"):
        rec.run(f"dtensor_parity[{impl},bf16]", check_dtensor_parity(mesh, impl, torch.bfloat16))
    hsdp_mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    for impl in ("foreach", "default"):
        rec.run(f"dtensor_parity[{impl},shard1]", check_dtensor_parity(mesh, impl, layout="shard1"))
        rec.run(f"dtensor_parity[{impl},hsdp]", check_dtensor_parity(hsdp_mesh, impl, layout="hsdp"))
        rec.run(f"dtensor_parity[{impl},mixed]", check_dtensor_parity(mesh, impl, layout="mixed"))
    rec.run("dtensor_parity[default,grad_replicate]", check_dtensor_parity(mesh, "default", layout="grad_replicate"))
    rec.run("per_shard_mutant_is_detected", check_mutant(mesh))
    rec.run("dtensor_state_layout", check_state_layout(mesh))
    for impl in ("for_loop", "foreach", "default", "fused"):
        rec.run(f"dtensor_comms[{impl}]", check_comms(mesh, impl))
    rec.run("dtensor_comms[default,mixed]", check_comms(mesh, "default", layout="mixed"))
    rec.run("partial_param_refused", check_partial_refused(mesh))
    rec.run("describe_sharded_path", check_description(mesh))

    for impl in ("for_loop", "default"):
        rec.run(f"fsdp2_fully_shard_equals_single_process[{impl}]", check_fsdp2_training(mesh, rank, world, impl))
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        # Default flags: what an FSDP2 user gets (the sharded path with the C kernel on the local shards).
        ckpt = str(Path(out_dir) / f"dcp_{label}")
        rec.run(f"fsdp2_dcp_roundtrip_and_dummy_step[{label}]", check_dcp(mesh, rank, world, ckpt, {}, dtype))


def _worker_4(rank: int, world: int, out_dir: str, rec: CheckRecorder) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    mesh_2d = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    for impl in ("foreach", "default"):
        rec.run(f"dtensor_parity[{impl},shard0]", check_dtensor_parity(mesh, impl))
    rec.run("dtensor_parity[default,shard0,bf16]", check_dtensor_parity(mesh, "default", torch.bfloat16))
    for layout in ("hsdp", "fsdp_tp", "mixed_2d"):
        for impl in ("foreach", "default"):
            rec.run(f"dtensor_parity[{impl},{layout}]", check_dtensor_parity(mesh_2d, impl, layout=layout))
    rec.run(
        "dtensor_parity[default,fsdp_tp_strided]", check_dtensor_parity(mesh_2d, "default", layout="fsdp_tp_strided")
    )
    rec.run("dtensor_parity[for_loop,fsdp_tp]", check_dtensor_parity(mesh_2d, "for_loop", layout="fsdp_tp"))
    rec.run(
        "dtensor_parity[default,fsdp_tp,bf16]",
        check_dtensor_parity(mesh_2d, "default", torch.bfloat16, layout="fsdp_tp"),
    )
    rec.run("dtensor_comms[default,shard0]", check_comms(mesh, "default"))
    for layout in ("hsdp", "fsdp_tp", "fsdp_tp_strided", "mixed_2d"):
        rec.run(f"dtensor_comms[default,{layout}]", check_comms(mesh_2d, "default", layout=layout))
    rec.run("process_group_over_mesh_dims", check_process_groups(world))


def _triton_available() -> bool:
    try:
        from hf_fadam.kernels import triton_fadam
    except ImportError:
        return False
    return triton_fadam.is_available()


def worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused_triton checks run the kernels on CPU
    os.environ[BACKEND_VAR] = "c"  # fused=True and the default: the C kernel, as users get it on CPU
    init_gloo(rank, world, store_path)
    rec = CheckRecorder(rank, out_dir)
    (_worker_2 if world == 2 else _worker_4)(rank, world, out_dir, rec)
    dist.barrier()
    dist.destroy_process_group()


def _world_from_argv() -> int:
    for arg in sys.argv[1:]:
        if arg.startswith("--world="):
            return int(arg.split("=", 1)[1])
    return 2


if __name__ == "__main__":
    world = _world_from_argv()
    if world not in (2, 4):
        sys.exit(f"--world={world}: the checks are written for 2 or 4 processes")
    out = main_out_dir()
    spawn(worker, out, world_size=world)
    sys.exit(print_summary(out, world_size=world))
