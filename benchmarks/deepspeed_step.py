#!/usr/bin/env python3
"""FAdam vs ``torch.optim.AdamW(foreach=True)`` as DeepSpeed's client optimizer under ZeRO 2, 2 CPU processes.

    python benchmarks/deepspeed_step.py                         # 2 ranks, 8 x Linear(512, 512), 20 timed steps
    python benchmarks/deepspeed_step.py --layers 4 --steps 10   # smaller
    python benchmarks/deepspeed_step.py --out benchmarks/results/deepspeed-step-cpu   # also <out>.md, <out>.json

Setup: ``--world`` processes (default 2) spawned on this machine, gloo over 127.0.0.1, ``--threads`` torch threads
per rank (default 1), DeepSpeed's CPU accelerator, ZeRO stage 2, fp32, no gradient clipping. The model is
``--layers`` Linear(``--width``, ``--width``) layers with biases; every variant gets its own engine on the same
seeded model and the same seeded batches (each rank its half of the global batch). AdamW is torch's (foreach),
not DeepSpeed's ``DeepSpeedCPUAdam`` (a C++ op that DeepSpeed would first compile).

Protocol: ``--warmup`` untimed rounds, then ``--steps`` timed rounds, round-robin across the variants (load drift
on a shared machine hits all alike). In a round, each variant runs forward and backward (untimed), then
``engine.step()`` bracketed by barriers. Two times per step, each the slowest rank's: ``engine.step()`` (ZeRO's
bookkeeping, the client optimizer, the all-gather of the updated partitions) and the client optimizer's
``step()`` calls alone (one per param group; for FAdam it includes the two per-parameter sum all-reduces). The
table gives medians and the ratio to AdamW. After timing, each variant's full weights are compared with the same
optimizer in one process on the whole batches (FAdam: the for-loop reference); above 1e-3 of the weights' movement
(tests/_tolerances.py, ("deepspeed", float32)) the row prints FAIL instead of its times.
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = ("fadam_default", "fadam_foreach", "adamw_foreach")
CHECK_TOL = 1e-3
MICRO_BATCH = 16
LR = 1e-3


def _model(layers: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def _optimizer(name: str, params, wd: float, *, reference: bool = False) -> torch.optim.Optimizer:
    from hf_fadam import FAdam

    if name.startswith("fadam"):
        if reference:
            return FAdam(params, lr=LR, weight_decay=wd, foreach=False)
        return FAdam(params, lr=LR, weight_decay=wd, foreach=True if name == "fadam_foreach" else None)
    return torch.optim.AdamW(params, lr=LR, weight_decay=wd, foreach=True)


def _batch(step: int, world: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    n = MICRO_BATCH * world
    return torch.randn(n, width, generator=gen), torch.randn(n, width, generator=gen)


def _config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def _reference(name: str, steps: int, world: int, layers: int, width: int, wd: float) -> tuple[list, list]:
    model = _model(layers, width)
    init = [p.detach().clone() for p in model.parameters()]
    opt = _optimizer(name, model.parameters(), wd, reference=True)
    for i in range(steps):
        x, y = _batch(i, world, width)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], init


def _worker(rank: int, world: int, store: str, out: str, cfg: dict) -> None:
    import datetime as dt

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(cfg["threads"])
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=dt.timedelta(seconds=300)
    )
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    deepspeed.init_distributed(dist_backend="gloo")
    engines, client_times = {}, {}
    for name in VARIANTS:
        model = _model(cfg["layers"], cfg["width"])
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=_optimizer(name, model.parameters(), cfg["weight_decay"]), config=_config()
        )
        times: list[float] = []
        client = engine.optimizer.optimizer
        starts: list[float] = []
        client.register_step_pre_hook(lambda *_, s=starts: s.append(time.perf_counter()))
        client.register_step_post_hook(lambda *_, s=starts, t=times: t.append(time.perf_counter() - s.pop()))
        engines[name], client_times[name] = engine, times
    total = cfg["warmup"] + cfg["steps"]
    engine_times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    client_per_step: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for i in range(total):
        x, y = _batch(i, world, cfg["width"])
        sl = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
        for name, engine in engines.items():
            loss = torch.nn.functional.mse_loss(engine(x[sl]), y[sl])
            engine.backward(loss)
            client_times[name].clear()
            dist.barrier()
            t0 = time.perf_counter()
            engine.step()
            dist.barrier()
            elapsed = time.perf_counter() - t0
            if i >= cfg["warmup"]:
                engine_times[name].append(elapsed)
                client_per_step[name].append(sum(client_times[name]))
    results = {}
    for name, engine in engines.items():
        weights = [safe_get_full_fp32_param(p).detach().clone() for p in engine.module.parameters()]
        slowest = torch.tensor([engine_times[name], client_per_step[name]], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        results[name] = {"engine_step_s": slowest[0].tolist(), "client_step_s": slowest[1].tolist()}
        if rank == 0:
            ref, init = _reference(name, total, world, cfg["layers"], cfg["width"], cfg["weight_decay"])
            err = max(((w - r).norm() / (r - i0).norm()).item() for w, r, i0 in zip(weights, ref, init))
            results[name]["rel_err_vs_one_process"] = err
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter teardown, where DeepSpeed runs occasionally abort after finishing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--out", type=str, default=None)
    args = parser.parse_args()
    cfg = vars(args)
    import deepspeed
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    with tempfile.TemporaryDirectory(prefix="hf_fadam_ds_bench_") as tmp:
        out = os.path.join(tmp, "results.json")
        mp.spawn(_worker, args=(args.world, os.path.join(tmp, "store"), out, cfg), nprocs=args.world, join=True)
        results = json.loads(Path(out).read_text())
    params = args.layers * (args.width * args.width + args.width)
    base = statistics.median(results["adamw_foreach"]["client_step_s"])
    base_engine = statistics.median(results["adamw_foreach"]["engine_step_s"])
    lines = [
        f"ZeRO 2, {args.world} CPU processes x {args.threads} thread(s), {params / 1e6:.2f} M fp32 params "
        f"({args.layers} x Linear({args.width}, {args.width})), {args.steps} timed steps; "
        f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, {platform.processor() or platform.machine()}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        "| variant | client step (ms, median) | / AdamW | engine.step (ms, median) | / AdamW | check |",
        "|---|---|---|---|---|---|",
    ]
    failed = False
    for name in VARIANTS:
        res = results[name]
        err = res["rel_err_vs_one_process"]
        if err > CHECK_TOL:
            failed = True
            lines.append(f"| {name} | FAIL | | FAIL | | {err:.1e} of the movement (> {CHECK_TOL}) |")
            continue
        client = statistics.median(res["client_step_s"])
        engine = statistics.median(res["engine_step_s"])
        lines.append(
            f"| {name} | {client * 1e3:.2f} | {client / base:.2f} | {engine * 1e3:.2f} | {engine / base_engine:.2f} "
            f"| ok ({err:.0e}) |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".md").write_text(table + "\n")
        Path(args.out + ".json").write_text(json.dumps({"config": cfg, "results": results}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
