#!/usr/bin/env python3
"""FAdam's step on sharded DTensors (FSDP2 layout) against ``torch.optim.AdamW(foreach=True)`` on the same tensors.

    python benchmarks/sharded_step.py                          # 2 gloo ranks, 50 / 200 / 800 tensors
    python benchmarks/sharded_step.py --tensors 200 --steps 10 # one size, fewer steps
    python benchmarks/sharded_step.py --out results/sharded-step-cpu   # also writes <out>.md and <out>.json
    python benchmarks/sharded_step.py --device cuda   # CUDA tensors: the Triton kernels on the local shards

Setup: ``--world`` processes (default 2) on this machine, gloo over 127.0.0.1, ``--threads`` torch threads per rank
(default 1). With ``--device cuda`` the tensors live on the GPUs: NCCL when there is one GPU per rank, else the
ranks share the GPUs and gloo reduces the (CUDA) sums. Tensors alternate 64x64 and 64 (``--tensors`` of them),
every one a ``DTensor`` placed ``Shard(0)`` on a 1-D mesh of all ranks, the layout ``fully_shard`` gives; each rank
slices its shard of the same seeded full tensors, and the gradients are DTensors with the same placements, set
once.

Protocol: one untimed first step per variant (state allocation, the C kernel's load), ``--warmup`` untimed rounds,
then ``--steps`` timed rounds, round-robin across the variants (load drift on a shared machine hits all alike).
Each timed step is bracketed by barriers; its time is the slowest rank's ``perf_counter`` interval. The table gives
the median (in brackets the min: on a shared machine the median of a step with collectives includes waits for a
descheduled peer), the ratio of medians (of mins) FAdam / AdamW, the median CPU time of the step's thread
(``thread_time``, busiest rank: the work itself, robust to load), and the collectives per step, counted in one
further step under ``torch.profiler`` from the process-group backend's own events (``gloo:*`` / ``nccl:*``: every
collective that reached the wire, also those DTensor issues internally). After timing, FAdam's params and state are
compared with ``FAdam(foreach=False)`` run on the whole tensors for the same number of steps; above 1e-4 (normwise
relative) the row prints FAIL instead of its time.

Output: a markdown table on stdout (rank 0), and with ``--out`` the same table in ``<out>.md`` with the conditions
and the raw numbers in ``<out>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

VARIANTS = ("fadam_default", "adamw_foreach")
# FAdam after the benchmark's steps vs the for-loop on the whole tensors: the C kernel's fp32 row of
# tests/_tolerances.py (the sharded sums only add in another order). Above it the row prints FAIL, not numbers.
CHECK_TOL = 1e-4


def shapes(n: int) -> list[tuple[int, ...]]:
    """``n`` tensors alternating 64x64 and 64."""
    return [(64, 64) if i % 2 == 0 else (64,) for i in range(n)]


def make_optimizer(name: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    from hf_fadam import FAdam

    if name == "fadam_default":
        return FAdam(params, lr=1e-3, weight_decay=0.01)
    if name == "adamw_foreach":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=True)
    raise ValueError(f"unknown variant {name!r}; expected one of {VARIANTS}")


def full_tensors(n: int, device: str, seed: int = 1234) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The whole (param, grad) pairs every rank starts from."""
    gen = torch.Generator().manual_seed(seed)
    pairs = [(torch.randn(s, generator=gen) * 0.02, torch.randn(s, generator=gen) * 1e-3) for s in shapes(n)]
    return [(p.to(device), g.to(device)) for p, g in pairs]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_dtensors(n: int, mesh) -> list[torch.nn.Parameter]:
    from torch.distributed.tensor import Shard, distribute_tensor

    params = []
    for full_p, full_g in full_tensors(n, mesh.device_type):
        # Every rank holds the same full tensor and slices its own shard (no scatter).
        p = torch.nn.Parameter(distribute_tensor(full_p, mesh, [Shard(0)], src_data_rank=None))
        p.grad = distribute_tensor(full_g, mesh, [Shard(0)], src_data_rank=None)
        params.append(p)
    return params


def check_fadam(opt, n: int, device: str) -> float:
    """Max normwise relative error of params and state against ``FAdam(foreach=False)`` on the whole tensors, run in
    this process for as many steps as ``opt`` took. Each rank compares its local shards with the same slices of the
    reference (no gather: gloo cannot all-gather CUDA tensors); the worst error over the ranks is returned."""
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    from hf_fadam import FAdam

    params = [p for g in opt.param_groups for p in g["params"]]
    steps = int(opt.state[params[0]]["step"].item())
    ref_params = []
    for full_p, full_g in full_tensors(n, device):
        p = torch.nn.Parameter(full_p)
        p.grad = full_g
        ref_params.append(p)
    ref = FAdam(ref_params, lr=1e-3, weight_decay=0.01, foreach=False)
    for _ in range(steps):
        ref.step()
    diff = {"param": 0.0, "exp_avg": 0.0, "fisher": 0.0}
    scale = dict.fromkeys(diff, 0.0)
    for p, r in zip(params, ref_params):
        pairs = {"param": (p.detach(), r.detach())}
        pairs.update({k: (opt.state[p][k], ref.state[r][k]) for k in ("exp_avg", "fisher")})
        for key, (actual, expected) in pairs.items():
            expected = distribute_tensor(expected, actual.device_mesh, actual.placements, src_data_rank=None)
            actual, expected = actual.to_local().double(), expected.to_local().double()
            if expected.numel():
                diff[key] = max(diff[key], (actual - expected).abs().max().item())
                scale[key] = max(scale[key], expected.abs().max().item())
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (diff, scale))
    worst = 0.0
    for key in diff:  # normwise over the whole set: max |a - e| / max |e|, both over every rank
        d, m = max(g[0][key] for g in gathered), max(g[1][key] for g in gathered)
        worst = max(worst, d / m if m > 0 else d)
    return worst


def count_collectives(step) -> dict[str, int]:
    """Run ``step()`` under the profiler; count the process-group backend's collective events by name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts: dict[str, int] = {}
    for event in prof.events():
        if event.name.startswith(("gloo:", "nccl:")):
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def describe(opt) -> str:
    """The implementation FAdam picks for these params (``functional.describe_implementation`` when present)."""
    try:
        from hf_fadam.functional import describe_implementation
    except ImportError:
        from hf_fadam.functional import resolve_implementation

        params = [p for g in opt.param_groups for p in g["params"]]
        return resolve_implementation(params, None, None)
    params = [p for g in opt.param_groups for p in g["params"]]
    fishers = [opt.state[p]["fisher"] for p in params]
    return describe_implementation(params, fishers, None, None)


def run_size(n: int, mesh, variants, steps: int, warmup: int) -> dict:
    import torch.distributed as dist

    device = mesh.device_type
    opts = {}
    first = {}
    for name in variants:
        opt = make_optimizer(name, make_dtensors(n, mesh))
        dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        sync(device)
        first[name] = time.perf_counter() - t0
        opts[name] = opt
    for _ in range(warmup):
        for opt in opts.values():
            opt.step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu_times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(steps):
        for name, opt in opts.items():
            sync(device)
            dist.barrier()
            t0, c0 = time.perf_counter(), time.thread_time()
            opt.step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.thread_time() - c0)
            dist.barrier()
    collectives = {name: count_collectives(opt.step) for name, opt in opts.items()}
    impl = describe(opts["fadam_default"]) if "fadam_default" in opts else ""
    error = check_fadam(opts["fadam_default"], n, device) if "fadam_default" in opts else None
    # The step's time is the slowest rank's.
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (times, cpu_times))
    slowest = {name: [max(r[0][name][i] for r in gathered) for i in range(steps)] for name in variants}
    busiest = {name: [max(r[1][name][i] for r in gathered) for i in range(steps)] for name in variants}
    n_params = sum(torch.Size(s).numel() for s in shapes(n))
    return {
        "tensors": n,
        "params": n_params,
        "median_ms": {name: statistics.median(ts) * 1e3 for name, ts in slowest.items()},
        "min_ms": {name: min(ts) * 1e3 for name, ts in slowest.items()},
        "median_cpu_ms": {name: statistics.median(ts) * 1e3 for name, ts in busiest.items()},
        "first_step_ms": {name: t * 1e3 for name, t in first.items()},
        "collectives_per_step": {name: sum(c.values()) for name, c in collectives.items()},
        "collectives_by_kind": collectives,
        "fadam_implementation": impl,
        "fadam_max_rel_err_vs_reference": error,
        "fadam_ok": error is None or error <= CHECK_TOL,
    }


def table(rows: list[dict]) -> str:
    """Median and (in brackets) min step time per variant; the ratios of medians and of mins."""
    lines = [
        "| tensors | params | FAdam default ms | AdamW foreach ms | FAdam / AdamW | CPU ms FAdam / AdamW "
        "| FAdam collectives/step | AdamW collectives/step | FAdam implementation |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        med, low = r["median_ms"], r["min_ms"]
        f, a = med.get("fadam_default"), med.get("adamw_foreach")
        fs = f"{f:.2f} ({low['fadam_default']:.2f})" if f is not None else "-"
        as_ = f"{a:.2f} ({low['adamw_foreach']:.2f})" if a is not None else "-"
        ratio = f"{f / a:.2f}x ({low['fadam_default'] / low['adamw_foreach']:.2f}x)" if f and a else "-"
        if not r["fadam_ok"]:
            fs = ratio = f"FAIL (max rel. error {r['fadam_max_rel_err_vs_reference']:.1e} vs the for-loop)"
        cpu = r["median_cpu_ms"]
        cpu_s = f"{cpu['fadam_default']:.2f} / {cpu['adamw_foreach']:.2f}" if f and a else "-"
        cf = r["collectives_per_step"].get("fadam_default", "-")
        ca = r["collectives_per_step"].get("adamw_foreach", "-")
        lines.append(
            f"| {r['tensors']} | {r['params']:,} | {fs} | {as_} | {ratio} | {cpu_s} | {cf} | {ca} "
            f"| {r['fadam_implementation']} |"
        )
    return "\n".join(lines)


def worker(rank: int, world: int, store: str, args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(args.threads)
    backend = "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        # NCCL needs one GPU per rank; with fewer GPUs the ranks share them and gloo reduces the CUDA tensors.
        backend = "nccl" if torch.cuda.device_count() >= world else "gloo"
    dist.init_process_group(
        backend, init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600)
    )
    mesh = init_device_mesh(args.device, (world,))
    rows = []
    for n in args.tensors:
        row = run_size(n, mesh, args.variants, args.steps, args.warmup)
        rows.append(row)
        if rank == 0:
            print(
                f"[{n} tensors] {json.dumps(row['median_ms'])} collectives {row['collectives_per_step']}", flush=True
            )
    if rank == 0:
        where = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        if args.device == "cuda":
            where += f", {torch.cuda.get_device_name()} x {torch.cuda.device_count()}"
        conditions = (
            f"{world} {backend} ranks on one machine ({where}), tensors on {args.device}, "
            f"{args.threads} thread(s) per rank, torch {torch.__version__}, "
            f"Shard(0) on a 1-D mesh, tensors alternating 64x64 and 64; median of {args.steps} steps "
            f"(slowest rank), {args.warmup} warm-up rounds, round-robin"
        )
        text = table(rows)
        if not all(r["fadam_ok"] for r in rows):
            Path(store + ".failed").write_text("FAdam disagreed with the reference\n")
        print("\n" + conditions + "\n\n" + text)
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            command = "python benchmarks/sharded_step.py " + " ".join(sys.argv[1:])
            out.with_suffix(".md").write_text(f"{conditions}\n\n`{command}`\n\n{text}\n")
            out.with_suffix(".json").write_text(json.dumps({"conditions": conditions, "rows": rows}, indent=2))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[50, 200, 800])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--variants", type=lambda s: tuple(s.split(",")), default=VARIANTS)
    parser.add_argument("--out", default=None, help="write <out>.md and <out>.json")
    args = parser.parse_args(argv)
    for name in args.variants:
        if name not in VARIANTS:
            parser.error(f"--variants: unknown {name!r}; choose from {','.join(VARIANTS)}")

    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    with tempfile.TemporaryDirectory(prefix="hf_fadam_bench_") as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(worker, args=(args.world, store, args), nprocs=args.world, join=True)
        if os.path.exists(store + ".failed"):
            sys.exit("FAIL: the sharded FAdam step disagrees with the for-loop reference (see the table)")


if __name__ == "__main__":
    main()
