"""FAdam on DTensors and FSDP2, two gloo processes: the update must not depend on the number of processes.

Run standalone (prints one PASS/FAIL line per check; exit status 1 if any failed)::

    python tests/distributed/dtensor_checks.py [OUT_DIR]

``tests/test_distributed.py`` runs it once and turns each check into a pytest test. Every comparison is against
the same optimizer run on the whole, unsharded tensors in one process (each rank computes that reference itself
from the same seeded data). Checks:

* ``dtensor_parity[...]``: params, ``exp_avg``, ``fisher`` and ``step`` after 3 steps on DTensors equal the
  unsharded for-loop reference. Tensors: uneven rows, fewer rows than ranks (rank 1's shard is empty), zero-size,
  an all-zero gradient, a first gradient at step 2; two param groups with different lr/eps/clip/p/maximize.
  Implementations: for-loop, foreach, default; fp32 and bf16 params; placements ``Shard(0)`` (FSDP2),
  ``Shard(1)`` (tensor parallel), ``(Replicate(), Shard(0))`` on a 2-D mesh (HSDP), and DTensors mixed with plain
  tensors in one group.
* ``per_shard_mutant_is_detected``: the same optimizer applied to each rank's local shards as plain tensors (the
  bug decision 6 forbids) misses the reference by far more than the tolerance: the parity checks can see it.
* ``dtensor_state_layout``: ``step`` is a plain 0-d float32 tensor, ``exp_avg``/``fisher`` are DTensors placed
  like the param; a param without gradient gets no state.
* ``dtensor_comms[...]``: a step never all-gathers a tensor (``mean()`` on an uneven shard does); the number of
  all-reduces is reported.
* ``fused_true_refuses_dtensor`` / ``fused_none_resolves_to_foreach_for_dtensor``: ``fused=True`` raises an error
  that names DTensor, before touching the params; the default picks foreach even where a fused kernel exists.
* ``fsdp2_fully_shard_equals_single_process[...]``: ``fully_shard`` training (params and grads are ``Shard(0)``
  DTensors inside ``step``) equals one process on the same global batch.
* ``fsdp2_dcp_roundtrip_and_dummy_step[...]``: DCP's dummy init step (zero grads, lr = 0) creates the state and
  leaves params unchanged and finite; DCP save/load restores params and state bit-identically (state dtype kept:
  fp32 for bf16 params) and the resumed run continues bit-identically.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


_HERE = Path(__file__).resolve().parent
# tests/distributed and tests first; the repo root last, so an installed or PYTHONPATH hf_fadam wins when there is one.
sys.path[:0] = [str(_HERE), str(_HERE.parent)]
sys.path.append(str(_HERE.parents[1]))

import torch  # noqa: E402
from _common import CheckRecorder, init_gloo, main_out_dir, max_rel_err, print_summary, spawn  # noqa: E402

from _tolerances import tolerance  # noqa: E402


def _tol(dtype: torch.dtype) -> float:
    """Normwise relative tolerance (max|a - e| / max|e|) for sharded vs unsharded results.

    Sharded reductions add partial sums in another order than the unsharded ones (everything else is elementwise),
    the same few-ulp effect as foreach vs the for-loop, so the table's foreach rtol applies. Measured: <= 2e-7,
    while a per-shard RMS (the bug) gives 3e-5 to 1.4e-3 on these tensors.
    """
    return tolerance("foreach", dtype)[1]


TOL = _tol(torch.float32)
STEPS = 3

# name -> (global shape, gradient scale, param group). A scale of 0 gives an all-zero gradient.
TENSORS: dict[str, tuple[tuple[int, ...], float, int]] = {
    "uneven_7x5": ((7, 5), 1.0, 0),
    "fewer_rows_than_ranks_1x6": ((1, 6), 0.5, 0),  # rank 1's shard is empty
    "even_8x4": ((8, 4), 30.0, 0),
    "odd_vector_3": ((3,), 1e-3, 1),  # RMS(g) << 1: the adaptive epsilon is active
    "zero_grad_5x3": ((5, 3), 0.0, 1),  # RMS(g) = 0: the epsilon guard
    "late_grad_4x2": ((4, 2), 2e-2, 1),  # no gradient at step 1: skipped, its own step count starts later
    "empty_0x4": ((0, 4), 1.0, 1),  # zero-size on every rank
}
GROUP_OPTIONS = [
    {"lr": 1e-2, "weight_decay": 0.1},
    {"lr": 3e-2, "weight_decay": 0.05, "eps": 1e-3, "clip": 0.5, "p": 0.4, "maximize": True},
]


def _data(dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(1234)
    params = {name: torch.randn(shape, generator=gen).to(dtype) for name, (shape, _, _) in TENSORS.items()}
    grads = []
    for step in range(STEPS):
        step_grads = {}
        for name, (shape, scale, _) in TENSORS.items():
            if name.startswith("late") and step == 0:
                continue
            step_grads[name] = (torch.randn(shape, generator=gen) * scale).to(dtype)
        grads.append(step_grads)
    return params, grads


def _param_groups(params: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    groups = []
    for index, options in enumerate(GROUP_OPTIONS):
        groups.append({"params": [p for name, p in params.items() if TENSORS[name][2] == index], **options})
    return groups


def _run(params: dict[str, torch.Tensor], grads: list[dict[str, torch.Tensor]], convert, **flags):
    """STEPS steps on ``params`` (in place); ``convert`` maps a full gradient to the type of its param."""
    from hf_fadam import FAdam

    opt = FAdam(_param_groups(params), **flags)
    for step_grads in grads:
        for name, p in params.items():
            p.grad = convert(step_grads[name]) if name in step_grads else None
        opt.step()
    return opt


def _reference(
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Params and state after the unsharded for-loop run, keyed by tensor name."""
    params, grads = _data(dtype)
    params = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = _run(params, grads, lambda g: g, foreach=False)
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


def _compare(params, opt, ref_params, ref_states, param_tol: float = TOL) -> dict[str, Any]:
    """Max relative error of params and state against the reference; all collectives before the assertion.

    State is compared at ``TOL`` whatever the param dtype: it is kept in fp32 for 16-bit params, and m and f do not
    depend on the params (the test gradients do not), so a 16-bit param rounding difference cannot reach them.
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
    bad = {k: v for k, v in errs.items() if not v <= (param_tol if k.endswith(".param") else TOL)}
    if bad:
        raise AssertionError(f"max relative error above {param_tol} (params) / {TOL} (state): {bad}")
    return {"max_rel_err": max(errs.values()), "worst": max(errs, key=errs.get)}


def _sharded(mesh, layout: str = "shard0"):
    """Full tensor -> DTensor. ``shard0``: ``Shard(0)`` (FSDP2). ``shard1``: ``Shard(1)`` for matrices (tensor
    parallel, transformers' distributed loading), vectors replicated. ``hsdp``: a 2-D (replicate x shard) mesh of
    shape (1, world) with ``(Replicate(), Shard(0))``, the placements of HSDP. ``mixed``: matrices ``Shard(0)``,
    vectors plain tensors, in the same param group (FSDP2 ignored params, or a root module left unsharded)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    def placements(full: torch.Tensor) -> list:
        if layout == "shard1":
            return [Shard(1) if full.dim() >= 2 else Replicate()]
        if layout == "hsdp":
            return [Replicate(), Shard(0)]
        return [Shard(0)]

    def convert(full: torch.Tensor) -> torch.Tensor:
        if layout == "mixed" and full.dim() < 2:
            return full.clone()
        # Every rank holds the same full tensor, so each slices its shard locally (no scatter).
        return distribute_tensor(full, mesh, placements(full), src_data_rank=None)

    return convert


def check_dtensor_parity(mesh, flags: dict[str, Any], dtype: torch.dtype = torch.float32, layout: str = "shard0"):
    def check():
        ref_params, ref_states = _reference(dtype)
        convert = _sharded(mesh, layout)
        full_params, grads = _data(dtype)
        params = {k: torch.nn.Parameter(convert(v)) for k, v in full_params.items()}
        local_shapes = {k: tuple(_local(p).shape) for k, p in params.items()}
        opt = _run(params, grads, convert, **flags)
        info = _compare(params, opt, ref_params, ref_states, param_tol=_tol(dtype))
        info["local_shapes"] = local_shapes
        return info

    return check


def check_mutant(mesh):
    """Apply the reference to local shards as plain tensors: the per-shard RMS bug. It must be visible."""

    def check():
        from torch.distributed.tensor import DTensor, Shard

        ref_params, _ = _reference()
        convert = _sharded(mesh)
        full_params, grads = _data()
        local = {k: convert(v).to_local().clone().requires_grad_() for k, v in full_params.items()}
        _run(local, grads, lambda g: convert(g).to_local(), foreach=False)
        errs = {}
        for name, p in local.items():
            full = DTensor.from_local(
                p.detach(), mesh, [Shard(0)], shape=ref_params[name].shape, stride=ref_params[name].stride()
            ).full_tensor()
            errs[name] = max_rel_err(full, ref_params[name])
        # A tensor whose rows all sit on one rank is updated identically; the others must miss (measured: 140 TOL).
        if not max(errs.values()) > 50 * TOL:
            raise AssertionError(f"per-shard updates are not distinguishable from the whole-tensor ones: {errs}")
        return {"per_shard_rel_err": errs}

    return check


def check_state_layout(mesh):
    def check():
        from torch.distributed.tensor import DTensor

        convert = _sharded(mesh)
        full_params, grads = _data()
        params = {k: torch.nn.Parameter(convert(v)) for k, v in full_params.items()}
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


def check_comms(mesh, flags: dict[str, Any]):
    def check():
        from torch.distributed.tensor.debug import CommDebugMode

        convert = _sharded(mesh)
        full_params, grads = _data()
        params = {k: torch.nn.Parameter(convert(v)) for k, v in full_params.items()}
        mode = CommDebugMode()
        with mode:
            _run(params, grads[1:2], convert, **flags)
        counts = {str(op).split(".")[-1]: n for op, n in mode.get_comm_counts().items()}
        gathers = {op: n for op, n in counts.items() if "gather" in op}
        if gathers:
            raise AssertionError(
                f"a step all-gathers whole tensors ({gathers}); use sum()/numel, not mean(): {counts}"
            )
        return {"comm_counts": counts, "tensors": len(params)}

    return check


def check_fused_refusal(mesh):
    def check():
        from hf_fadam import FAdam

        convert = _sharded(mesh)
        full_params, grads = _data()
        params = {k: torch.nn.Parameter(convert(v)) for k, v in full_params.items()}
        before = {k: p.detach().to_local().clone() for k, p in params.items()}
        error = None
        try:
            opt = FAdam(_param_groups(params), fused=True)
            for name, p in params.items():
                p.grad = convert(grads[1][name])
            opt.step()
        except Exception as exc:  # noqa: BLE001 - the type is up to the core; the message must say why
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            raise AssertionError("fused=True with DTensor params did not raise")
        if "dtensor" not in error.lower():
            raise AssertionError(f"fused=True with DTensor params raised without naming DTensor: {error}")
        changed = [k for k, p in params.items() if not torch.equal(p.detach().to_local(), before[k])]
        if changed:
            raise AssertionError(f"params changed before the refusal: {changed}")
        return {"message": error}

    return check


def check_default_resolution(mesh):
    """With both flags None the dispatcher must pick foreach for DTensors, even where a fused kernel exists."""

    def check():
        from hf_fadam.functional import resolve_implementation

        convert = _sharded(mesh)
        full_params, _ = _data()
        dtensors = [convert(v) for v in full_params.values()]
        locals_ = [d.to_local() for d in dtensors]
        picked = resolve_implementation(dtensors, None, None)
        if picked != "foreach":
            raise AssertionError(f"fused=None, foreach=None chose {picked!r} for DTensor params, expected 'foreach'")
        # For the record: what the same local tensors would get as plain tensors ("fused" where cc works here).
        return {"dtensor": picked, "plain_local_tensors": resolve_implementation(locals_, None, None)}

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


def _compare_models(model, opt, ref_params, ref_states) -> dict[str, Any]:
    params = dict(model.named_parameters())
    if sorted(params) != sorted(ref_params):
        raise AssertionError(f"param names {sorted(params)} != {sorted(ref_params)}")
    return _compare(params, opt, ref_params, ref_states)


def check_fsdp2_training(mesh, rank: int, world: int, flags: dict[str, Any]):
    def check():
        from hf_fadam import FAdam

        batches = _batches()[:FSDP_STEPS]
        ref_model, ref_opt = _single_process_train({"foreach": False}, batches)
        ref_params = dict(ref_model.named_parameters())
        model = _fsdp2_model(mesh)
        opt = FAdam(model.parameters(), lr=1e-2, weight_decay=0.1, **flags)
        seen: list = []
        _fsdp2_train(model, opt, batches, rank, world, seen)
        info = _compare_models(model, opt, ref_params, _states(ref_params, ref_opt))
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
        expected = sorted({"step:torch.float32", f"exp_avg:{state_dtype}", f"fisher:{state_dtype}"})
        if dtypes != expected or layout != ["exp_avg:DTensor", "fisher:DTensor", "step:Tensor"]:
            raise AssertionError(f"loaded state dtypes {dtypes} (expected {expected}), types {layout}")
        for label, (a, b) in (("restored", (loaded, saved)), ("resumed", (resumed_new, resumed))):
            differ = [n for n in a[0] if not torch.equal(a[0][n], b[0][n])]
            differ += [f"{n}.{k}" for n in a[1] for k in a[1][n] if not torch.equal(a[1][n][k], b[1][n][k])]
            if differ:
                raise AssertionError(f"{label} params/state are not bit-identical to the original run: {differ}")
        return {"dummy_step": "params unchanged, finite", "restored": "bit-identical", "resume": "bit-identical"}

    return check


def worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    init_gloo(rank, world, store_path)
    mesh = init_device_mesh("cpu", (world,))
    rec = CheckRecorder(rank, out_dir)
    for label, flags in (("for_loop", {"foreach": False}), ("foreach", {"foreach": True}), ("default", {})):
        rec.run(f"dtensor_parity[{label}]", check_dtensor_parity(mesh, flags))
    for label, flags in (("for_loop", {"foreach": False}), ("foreach", {"foreach": True})):
        rec.run(f"dtensor_parity[{label},bf16]", check_dtensor_parity(mesh, flags, torch.bfloat16))
    rec.run("dtensor_parity[foreach,shard1]", check_dtensor_parity(mesh, {"foreach": True}, layout="shard1"))
    hsdp_mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    rec.run("dtensor_parity[foreach,hsdp]", check_dtensor_parity(hsdp_mesh, {"foreach": True}, layout="hsdp"))
    rec.run(
        "dtensor_parity[foreach,mixed_plain_and_dtensor]",
        check_dtensor_parity(mesh, {"foreach": True}, layout="mixed"),
    )
    rec.run("per_shard_mutant_is_detected", check_mutant(mesh))
    rec.run("dtensor_state_layout", check_state_layout(mesh))
    for label, flags in (("for_loop", {"foreach": False}), ("foreach", {"foreach": True})):
        rec.run(f"dtensor_comms[{label}]", check_comms(mesh, flags))
    rec.run("fused_true_refuses_dtensor", check_fused_refusal(mesh))
    rec.run("fused_none_resolves_to_foreach_for_dtensor", check_default_resolution(mesh))

    for label, flags in (("for_loop", {"foreach": False}), ("default", {})):
        rec.run(f"fsdp2_fully_shard_equals_single_process[{label}]", check_fsdp2_training(mesh, rank, world, flags))
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        # Default flags: what an FSDP2 user gets (foreach for DTensors).
        ckpt = str(Path(out_dir) / f"dcp_{label}")
        rec.run(f"fsdp2_dcp_roundtrip_and_dummy_step[{label}]", check_dcp(mesh, rank, world, ckpt, {}, dtype))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    out = main_out_dir()
    spawn(worker, out)
    sys.exit(print_summary(out))
