"""FAdam8bit + FSDP2 + ``torch.distributed.checkpoint`` (DCP) in 2 gloo processes, then 1.

Run standalone (prints one PASS/FAIL line per check; exit status 1 if any failed)::

    python tests/distributed/fsdp2_8bit_dcp_checks.py [OUT_DIR]

``tests/test_8bit_fsdp2.py`` runs it once and turns each check into a pytest test. The model's FSDP2 ``Shard(0)``
params cover every state layout: an uneven weight (201 rows over 2 ranks: 101 + 100) and an even one (8 rows: 4 +
4), 8-bit with scales sharded like the rows; an uneven 1-D bias of 201, 8-bit with one even part of scales per
rank; a bias of 8 below ``min_8bit_size`` (fp32 state). Checks:

* ``per_rank_resume`` (2 ranks): each rank's ``torch.save(optimizer.state_dict())`` and param shards after 3 steps;
  a fresh model and optimizer loaded from it take the same 3 further steps to the same bits (params, every state
  tensor), from this version's save (DTensor state) and from the previous format (plain local tensors, no layout
  record). A ``block_size`` changed after the state was made is refused at the next step.
* ``fadam_state_loads`` (2 ranks): FAdam's sharded state dict (fp32 DTensors) loads as DTensor 8-bit state, each
  rank's shard quantized with its own blocks, and steps on; a DTensor state placed unlike its param is refused.
* ``dcp_resume[fused]`` / ``dcp_resume[foreach]`` (2 ranks): 3 steps, ``dcp.save`` of ``get_state_dict`` (the
  foreach run with ``flatten_optimizer_state_dict=True``), 3 more; a fresh model (other init) and optimizer,
  ``get_state_dict`` (DCP's dummy init step), ``dcp.load``, ``set_state_dict``, the same 3 steps: the params and
  every state tensor (codes, scales, fp32 state, ``step``, the layout record) equal the uninterrupted run bit for
  bit on every rank, and the codes and scales are DTensors on the param's mesh.
* ``full_state_dict_resume`` (2 ranks): ``get_optimizer_state_dict``/``set_optimizer_state_dict`` with
  ``full_state_dict=True`` (whole tensors, distributed back to the current placements): bit-exact resume.
* ``dcp_same_shards_exact[hsdp_1x2]`` (2 ranks): the checkpoint loads into HSDP on a 1 x 2 mesh (the same 2-way
  ``Shard(0)``, a size-1 replicate dim): same shards, so the same bits after the same 3 steps.
* ``dcp_reshard_refused[hsdp_2x1]`` (2 ranks) and ``dcp_reshard_refused[world1]`` (1 process): a load where the
  shards differ (a 2 x 1 mesh: each rank holds the whole tensor; one process) raises ``ValueError`` naming
  FAdam8bit, resharding, DCP and what to do instead; ``dcp.load`` has already written the checkpoint into the
  optimizer's live state by then, so the next ``step`` is refused with the same error.
* ``reshard_through_fadam[world1]``: the documented way to change the world size: at 2 ranks the 8-bit state is
  loaded into ``hf_fadam.FAdam`` (dequantized, DTensors) and saved with DCP; 1 process loads that into FAdam (DCP
  reshards fp32 DTensors) and FAdam8bit loads FAdam's state dict (quantized with the new blocks). The 3 resumed
  steps end within the 8-bit state's quantization noise of the uninterrupted 2-rank run.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any


_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]
sys.path.append(str(_HERE.parents[1]))

import torch  # noqa: E402
from _common import CheckRecorder, init_gloo, main_out_dir, print_summary, spawn  # noqa: E402


KW: dict[str, Any] = dict(lr=1e-2, min_8bit_size=100, block_size=64)
FLAGS = {"fused": {"fused": True}, "foreach": {"foreach": True}}
GLOBAL_BATCH = 32
SAVE_AT, STEPS = 3, 6


def _model(mesh, seed: int = 0) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 201), torch.nn.Tanh(), torch.nn.Linear(201, 8))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, 64, generator=g)
    return x, (x @ torch.randn(64, 8, generator=g)).argmax(-1)


def _train(model, opt, steps, rank: int, world: int) -> None:
    x, y = _data()
    rows = GLOBAL_BATCH // world
    for t in steps:
        opt.zero_grad(set_to_none=True)
        sl = slice(rank * rows, (rank + 1) * rows)
        torch.nn.functional.cross_entropy(model(x[t, sl]), y[t, sl]).backward()
        opt.step()


def _local(t: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _snapshot(model, opt) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """This rank's bits: the local shards of the params, and every state tensor's local part (and its type)."""
    params = [_local(p.detach()).clone() for p in model.parameters()]
    state = {}
    for i, p in enumerate(model.parameters()):
        for key, value in opt.state.get(p, {}).items():
            state[f"{i}.{key}"] = _local(value).clone()
            state[f"{i}.{key}.type"] = type(value).__name__
    return params, state


def _differences(a, b) -> list[str]:
    (pa, sa), (pb, sb) = a, b
    out = [f"param {i}" for i, (x, y) in enumerate(zip(pa, pb)) if not torch.equal(x, y)]
    if sa.keys() != sb.keys():
        out.append(f"state keys {sorted(sa)} != {sorted(sb)}")
    for key in sorted(sa.keys() & sb.keys()):
        x, y = sa[key], sb[key]
        same = torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y
        if not same:
            out.append(key)
    return out


def _dcp_load(model, opt, ckpt: str, options=None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt, options=options)  # runs DCP's dummy step on a fresh optimizer
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)


def _dcp_save(model, opt, ckpt: str, options=None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)


def _refusal_info(exc: BaseException) -> dict[str, Any]:
    """The refusal must name FAdam8bit, resharding, DCP and a way out, and leave the optimizer as it was."""
    text = str(exc)
    missing = [w for w in ("FAdam8bit", "reshard", "torch.distributed.checkpoint", "hf_fadam.FAdam") if w not in text]
    if not isinstance(exc, ValueError) or missing:
        raise AssertionError(f"refusal {type(exc).__name__} lacks {missing}: {text}")
    return {"message": text[:400]}


def _reraised(fn):
    """DCP raises ``CheckpointException``, a ``BaseException``: make it an ordinary failure of the check."""

    def run():
        try:
            return fn()
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:
            raise
        except BaseException as exc:  # noqa: BLE001
            raise RuntimeError(f"{type(exc).__name__}: {exc}") from exc

    return run


def check_resume(mesh, rank: int, world: int, out: str, impl: str):
    @_reraised
    def check():
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        from torch.distributed.tensor import DTensor

        from hf_fadam import FAdam, FAdam8bit

        options = StateDictOptions(flatten_optimizer_state_dict=impl == "foreach")
        model = _model(mesh)
        opt = FAdam8bit(model.parameters(), **KW, **FLAGS[impl])
        _train(model, opt, range(SAVE_AT), rank, world)
        ckpt = os.path.join(out, f"ckpt_{impl}")
        _dcp_save(model, opt, ckpt, options)
        _train(model, opt, range(SAVE_AT, STEPS), rank, world)
        straight = _snapshot(model, opt)
        full = [p.detach().full_tensor() for p in model.parameters()]
        if impl == "fused" and rank == 0:
            torch.save(full, os.path.join(out, "straight_full.pt"))

        new_model = _model(mesh, seed=7)
        new_opt = FAdam8bit(new_model.parameters(), **KW, **FLAGS[impl])
        _dcp_load(new_model, new_opt, ckpt, options)
        kinds = {k: type(v).__name__ for s in new_opt.state.values() for k, v in s.items() if k != "step"}
        scale_shapes = [
            tuple(new_opt.state[p]["exp_avg_scale"].shape) for p in new_model.parameters() if p.numel() > 8
        ]
        if scale_shapes != [(201, 1), (4,), (8, 4)]:  # sharded like the rows; per rank (1-D bias); like the rows
            raise AssertionError(f"scale layouts {scale_shapes}")
        if impl == "fused":
            # the documented way to another world size: FAdam's fp32 DTensor state, which DCP reshards
            fadam = FAdam(new_model.parameters(), lr=KW["lr"])
            fadam.load_state_dict(new_opt.state_dict())
            _dcp_save(new_model, fadam, os.path.join(out, "ckpt_fp32"))
        _train(new_model, new_opt, range(SAVE_AT, STEPS), rank, world)
        differ = _differences(straight, _snapshot(new_model, new_opt))
        if differ:
            raise AssertionError(f"the DCP-resumed run differs from the uninterrupted one on rank {rank}: {differ}")
        not_dtensor = sorted(k for k, kind in kinds.items() if kind != DTensor.__name__ and k != "shard_layout")
        if not_dtensor:
            raise AssertionError(f"state entries that are not DTensors after the DCP load: {not_dtensor}")
        return {"resumed": "bit-identical (params, codes, scales, fp32 state, step)", "scales": scale_shapes}

    return check


def check_full_state_dict(mesh, rank: int, world: int):
    """``get_optimizer_state_dict``/``set_optimizer_state_dict`` with ``full_state_dict=True``: the state gathered
    to whole tensors and distributed back (to the current placements) resumes bit-exactly."""

    @_reraised
    def check():
        import copy

        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        from hf_fadam import FAdam8bit

        options = StateDictOptions(full_state_dict=True)
        model = _model(mesh)
        opt = FAdam8bit(model.parameters(), **KW, fused=True)
        _train(model, opt, range(SAVE_AT), rank, world)
        full = copy.deepcopy(get_optimizer_state_dict(model, opt, options=options))  # (it shares "step")
        params = [_local(p.detach()).clone() for p in model.parameters()]
        _train(model, opt, range(SAVE_AT, STEPS), rank, world)
        new_model = _model(mesh, seed=7)
        with torch.no_grad():
            for p, saved in zip(new_model.parameters(), params):
                p.to_local().copy_(saved)
        new_opt = FAdam8bit(new_model.parameters(), **KW, fused=True)
        set_optimizer_state_dict(new_model, new_opt, optim_state_dict=full, options=options)
        _train(new_model, new_opt, range(SAVE_AT, STEPS), rank, world)
        differ = _differences(_snapshot(model, opt), _snapshot(new_model, new_opt))
        if differ:
            raise AssertionError(f"the full-state-dict resume differs on rank {rank}: {differ}")
        return {"resumed": "bit-identical"}

    return check


def check_hsdp(rank: int, world: int, out: str, shape: tuple[int, int]):
    @_reraised
    def check():
        from torch.distributed.device_mesh import init_device_mesh

        from hf_fadam import FAdam8bit

        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
        model = _model(mesh, seed=7)
        opt = FAdam8bit(model.parameters(), **KW, fused=True)
        if shape[1] == world:  # the same 2-way shards: exact
            _dcp_load(model, opt, os.path.join(out, "ckpt_fused"))
            _train(model, opt, range(SAVE_AT, STEPS), rank, world)
            full = [p.detach().full_tensor() for p in model.parameters()]
            straight = torch.load(os.path.join(out, "straight_full.pt"))
            differ = [i for i, (a, b) in enumerate(zip(full, straight)) if not torch.equal(a, b)]
            if differ:
                raise AssertionError(f"HSDP {shape} resumed params differ from the uninterrupted run: {differ}")
            return {"resumed": "bit-identical"}
        return _expect_refusal(model, opt, os.path.join(out, "ckpt_fused"))

    return check


def _expect_refusal(model, opt, ckpt: str) -> dict[str, Any]:
    error = None
    try:
        _dcp_load(model, opt, ckpt)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - the refusal is inspected (DCP's CheckpointException included)
        error = exc
    if error is None:
        raise AssertionError("a checkpoint with other shards was loaded without an error")
    info = _refusal_info(error)
    # dcp.load has written the checkpoint into the optimizer's live state before load_state_dict refused it: a step
    # on that state must be refused as well, not taken on codes decoded with other shards' scales.
    try:
        _train(model, opt, range(SAVE_AT, SAVE_AT + 1), *_rank_world())
    except ValueError as exc:
        info["step_after_refusal"] = _refusal_info(exc)["message"][:120]
        return info
    raise AssertionError("a step on the state of a refused load ran")


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def _previous_format(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state dict as FAdam8bit saved a DTensor param's state before it kept DTensors: each rank's plain local
    tensors, ``num_blocks`` scales, no ``shard_layout``."""
    out = {**state_dict, "state": {}}
    for key, st in state_dict["state"].items():
        st = {k: _local(v).clone() for k, v in st.items() if k != "shard_layout"}
        if "fisher_sqrt" in st:
            nb = (st["exp_avg"].numel() + KW["block_size"] - 1) // KW["block_size"]
            for name in ("exp_avg_scale", "fisher_sqrt_scale"):
                st[name] = st[name].reshape(-1)[:nb].clone()
        out["state"][key] = st
    return out


def check_per_rank(mesh, rank: int, world: int):
    @_reraised
    def check():
        import io

        from hf_fadam import FAdam8bit

        model = _model(mesh)
        opt = FAdam8bit(model.parameters(), **KW, fused=True)
        _train(model, opt, range(SAVE_AT), rank, world)
        params_ckpt = [_local(p.detach()).clone() for p in model.parameters()]
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        _train(model, opt, range(SAVE_AT, STEPS), rank, world)
        straight = _snapshot(model, opt)

        def resumed(state_dict):
            new_model = _model(mesh, seed=7)
            with torch.no_grad():
                for p, saved in zip(new_model.parameters(), params_ckpt):
                    p.to_local().copy_(saved)
            new_opt = FAdam8bit(new_model.parameters(), **KW, fused=True)
            new_opt.load_state_dict(state_dict)
            _train(new_model, new_opt, range(SAVE_AT, STEPS), rank, world)
            return _snapshot(new_model, new_opt), new_opt, new_model

        buf.seek(0)
        saved = torch.load(buf)
        kinds = sorted({k for st in saved["state"].values() for k in st})
        if not {"exp_avg_scale", "fisher", "shard_layout"} <= set(kinds):
            raise AssertionError(f"both state layouts (8-bit and fp32) must be exercised; saved state has {kinds}")
        differ = {label: _differences(straight, resumed(sd)[0])
                  for label, sd in (("this version", saved), ("previous format", _previous_format(saved)))}  # fmt: skip
        differ = {k: v for k, v in differ.items() if v}
        if differ:
            raise AssertionError(f"per-rank resume differs from the uninterrupted run on rank {rank}: {differ}")

        # a block_size changed after the state was made: refused before a kernel decodes with it
        _, new_opt, new_model = resumed(saved)
        new_opt.param_groups[0]["block_size"] = 128
        try:
            _train(new_model, new_opt, range(1), rank, world)
            raise AssertionError("a step with another block_size than the state's ran")
        except ValueError as exc:
            if "block_size=64" not in str(exc):
                raise
        return {"resumed": "bit-identical from this version's and the previous format's per-rank saves"}

    return check


def check_from_fadam(mesh, rank: int, world: int):
    """FAdam's sharded state (fp32 DTensors) loads into FAdam8bit as DTensor state, quantized per local shard."""

    @_reraised
    def check():
        from torch.distributed.tensor import DTensor, Replicate

        from hf_fadam import FAdam, FAdam8bit
        from hf_fadam._quant import quantize_blockwise

        model = _model(mesh)
        fadam = FAdam(model.parameters(), lr=KW["lr"])
        _train(model, fadam, range(SAVE_AT), rank, world)
        opt = FAdam8bit(model.parameters(), **KW, fused=True)
        opt.load_state_dict(fadam.state_dict())
        wrong = []
        for i, p in enumerate(model.parameters()):
            st, st8 = fadam.state[p], opt.state[p]
            m, f = st["exp_avg"].to_local(), st["fisher"].to_local()
            if "fisher_sqrt" in st8:
                nb = (m.numel() + KW["block_size"] - 1) // KW["block_size"]
                q_m, s_m = quantize_blockwise(m, KW["block_size"], signed=True)
                q_f, s_f = quantize_blockwise(f.sqrt(), KW["block_size"], signed=False)
                pairs = ((st8["exp_avg"], q_m, None), (st8["fisher_sqrt"], q_f, None),
                         (st8["exp_avg_scale"], s_m, nb), (st8["fisher_sqrt_scale"], s_f, nb))  # fmt: skip
            else:
                pairs = ((st8["exp_avg"], m, None), (st8["fisher"], f, None))
            for got, want, nb in pairs:
                local = got.to_local()
                local = local.reshape(-1)[:nb] if nb is not None else local
                if not isinstance(got, DTensor) or got.device_mesh != p.device_mesh or not torch.equal(local, want):
                    wrong.append(i)
        _train(model, opt, range(SAVE_AT, SAVE_AT + 1), rank, world)
        finite = all(bool(p.to_local().isfinite().all()) for p in model.parameters())
        # a DTensor state placed unlike its param (its local shard would be other elements) is refused
        sd = fadam.state_dict()
        first = next(iter(sd["state"]))
        sd["state"][first] = dict(sd["state"][first])
        sd["state"][first]["exp_avg"] = sd["state"][first]["exp_avg"].redistribute(placements=[Replicate()])
        try:
            FAdam8bit(model.parameters(), **KW).load_state_dict(sd)
            refused = "loaded"
        except ValueError as exc:
            refused = str(exc)
        if wrong or not finite or "'exp_avg' is a DTensor with placements (Replicate(),)" not in refused:
            raise AssertionError(f"params with wrong state {wrong}, finite {finite}, misplaced state: {refused}")
        return {"from_fadam": "DTensor state, quantized per local shard"}

    return check


def worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    init_gloo(rank, world, store)
    rec = CheckRecorder(rank, out)
    mesh = init_device_mesh("cpu", (world,))
    rec.run("per_rank_resume", check_per_rank(mesh, rank, world))
    rec.run("fadam_state_loads", check_from_fadam(mesh, rank, world))
    for impl in ("fused", "foreach"):
        rec.run(f"dcp_resume[{impl}]", check_resume(mesh, rank, world, out, impl))
    rec.run("full_state_dict_resume", check_full_state_dict(mesh, rank, world))
    rec.run("dcp_same_shards_exact[hsdp_1x2]", check_hsdp(rank, world, out, (1, 2)))
    rec.run("dcp_reshard_refused[hsdp_2x1]", check_hsdp(rank, world, out, (2, 1)))
    dist.barrier()
    dist.destroy_process_group()


def one_process(out: str) -> None:
    """The checkpoints of the 2-rank run, loaded by one process (an FSDP2 mesh of size 1)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from hf_fadam import FAdam, FAdam8bit

    with tempfile.TemporaryDirectory(prefix="hf_fadam_store_") as store_dir:
        init_gloo(0, 1, os.path.join(store_dir, "store"))
        Path(out, "world1").mkdir(exist_ok=True)
        rec = CheckRecorder(0, os.path.join(out, "world1"))
        mesh = init_device_mesh("cpu", (1,))

        def refused():
            model = _model(mesh, seed=7)
            return _expect_refusal(model, FAdam8bit(model.parameters(), **KW, fused=True), f"{out}/ckpt_fused")

        def through_fadam():
            model = _model(mesh, seed=7)
            fadam = FAdam(model.parameters(), lr=KW["lr"])
            _dcp_load(model, fadam, f"{out}/ckpt_fp32")
            opt = FAdam8bit(model.parameters(), **KW, fused=True)
            opt.load_state_dict(fadam.state_dict())
            _train(model, opt, range(SAVE_AT, STEPS), 0, 1)
            straight = torch.load(os.path.join(out, "straight_full.pt"))
            errs = [float((p.detach().full_tensor() - s).abs().max()) for p, s in zip(model.parameters(), straight)]
            if max(errs) > 2e-3:
                raise AssertionError(f"resumed through FAdam's state: max abs param error {max(errs)} > 2e-3")
            return {"max_abs_err": max(errs)}

        rec.run("dcp_reshard_refused[world1]", _reraised(refused))
        rec.run("reshard_through_fadam[world1]", _reraised(through_fadam))
        dist.destroy_process_group()


if __name__ == "__main__":
    out_dir = main_out_dir()
    spawn(worker, out_dir)
    one_process(out_dir)
    status = print_summary(out_dir)
    sys.exit(max(status, print_summary(os.path.join(out_dir, "world1"), world_size=1)))
