#!/usr/bin/env python3
"""GPU benchmark of the Triton FAdam kernels: launch-config sweep, per-pass times, traffic model and checks.

    TRITON_INTERPRET=0 python benchmarks/gpu_step.py --out results/gpu_step          # ~1-2 min on an H100

(``benchmarks/gpu_check.sh`` runs it at the default configuration together with the CUDA tests and step.py.)

Complements ``benchmarks/step.py`` (all implementations against AdamW): this one looks inside ``fused=True`` on
CUDA. Per parameter dtype, on the ~50M-parameter transformer set of step.py, it times ``FAdam(fused=True)`` under
each launch configuration in ``CONFIGS`` round-robin with ``AdamW(fused=True)`` (CUDA events, a 256 MB buffer
written before every step to flush the 50 MB L2, median of ``--steps`` after ``--warmup`` rounds), reports GB/s at
the bytes-per-param model of hf_fadam/kernels/triton_fadam.py against a measured ``copy_`` bandwidth, the GPU time
of each kernel of one step (torch.profiler), the number of kernels per step, the extra memory of one step, whether
a step passes ``torch.cuda.set_sync_debug_mode("error")``, and, after the timing, a correctness check against the
for-loop reference ``FAdam(foreach=False)``. Prints everything and writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from step import transformer_shapes  # noqa: E402  (benchmarks/step.py: the same param set)

from hf_fadam import FAdam  # noqa: E402
from hf_fadam.kernels import triton_fadam  # noqa: E402


PARAM_SETS = {
    "transformer": transformer_shapes(),
    "many_small": [(100, 100)] * 1000,
    "few_huge": [(8192, 8192)] * 4,
}

C = triton_fadam._Config
CONFIGS = {
    "c16k-b2k/1k/1k-w4": C(16384, 2048, 1024, 1024, 4, 4, 4),
    "c16k-b4k/2k/2k-w8": C(16384, 4096, 2048, 2048, 8, 8, 8),
    "c8k-b2k/1k/1k-w4": C(8192, 2048, 1024, 1024, 4, 4, 4),
    "c32k-b4k/2k/1k-w8/8/4": C(32768, 4096, 2048, 1024, 8, 8, 4),
    "c64k-b4k/2k/2k-w8": C(65536, 4096, 2048, 2048, 8, 8, 8),
}


DEVICE = "cuda"  # --smoke: "cpu" under TRITON_INTERPRET=1, tiny shapes, to check this script without a GPU


def make_params(shapes, dtype, seed=1234):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=gen, device=DEVICE) * 0.02).to(dtype))
        p.grad = (torch.randn(s, generator=gen, device=DEVICE) * 1e-3).to(dtype)
        params.append(p)
    return params


def clone_params(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_step(fn) -> float:
    if DEVICE != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def copy_bandwidth(nbytes=2**30, reps=10) -> float:
    a = torch.rand(nbytes // 4, device=DEVICE)
    b = torch.empty_like(a)
    b.copy_(a)
    sync()
    ts = [time_step(lambda: b.copy_(a)) for _ in range(reps)]
    return 2 * nbytes / statistics.median(ts) / 1e9


def stats(ts):
    ts = sorted(ts)
    return dict(
        median_ms=statistics.median(ts) * 1e3, min_ms=ts[0] * 1e3, p90_ms=ts[math.ceil(0.9 * len(ts)) - 1] * 1e3
    )


def kernel_profile(step_fn):
    """(number of GPU kernels, {kernel name: GPU ms}) of one step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step_fn()
        sync()
    per_name, count = {}, 0
    for evt in prof.events():
        if str(getattr(evt, "device_type", "")).endswith("CUDA"):
            dur = getattr(evt, "device_time", None) or getattr(evt, "cuda_time", 0.0) or 0.0
            count += 1
            per_name[evt.name[:60]] = per_name.get(evt.name[:60], 0.0) + dur / 1e3
    return count, dict(sorted(per_name.items(), key=lambda kv: -kv[1])[:12])


def bench_dtype(dtype, shapes, configs, steps, warmup, bw, log):
    numel = sum(math.prod(s) for s in shapes)
    pbytes = torch.finfo(dtype).bits // 8
    fadam_bytes = triton_fadam._bytes_per_param(pbytes, 4 if pbytes < 4 else pbytes)
    adamw_bytes = 7 * pbytes
    base = make_params(shapes, dtype)
    runs = {"adamw_fused": (torch.optim.AdamW(clone_params(base), lr=1e-3, fused=True), None, adamw_bytes)}
    for name, cfg in configs.items():
        runs[f"fadam_fused[{name}]"] = (FAdam(clone_params(base), lr=1e-3, fused=True), cfg, fadam_bytes)
    first = {}
    for name, (opt, cfg, _) in runs.items():
        if cfg is not None:
            triton_fadam._GPU_CONFIG = cfg
        sync()
        first[name] = time_step(opt.step)
    flush = torch.empty(256 * 2**18 if DEVICE == "cuda" else 1024, device=DEVICE)
    times = {name: [] for name in runs}
    host = {name: [] for name in runs}  # time to enqueue the step (host side), the GPU not waited for

    def timed(opt, name):
        def step():
            t0 = time.perf_counter()
            opt.step()
            host[name].append(time.perf_counter() - t0)

        return step

    for rnd in range(warmup + steps):
        for name, (opt, cfg, _) in runs.items():
            if cfg is not None:
                triton_fadam._GPU_CONFIG = cfg
            flush.fill_(rnd)
            dt = time_step(timed(opt, name))
            if rnd >= warmup:
                times[name].append(dt)
    rows = []
    base_med = statistics.median(times["adamw_fused"])
    for name, (_opt, _cfg, nb) in runs.items():
        st = stats(times[name])
        med = st["median_ms"] / 1e3
        row = dict(
            variant=name,
            **st,
            x_adamw_fused=med / base_med,
            bytes_per_param=nb,
            gbps=nb * numel / med / 1e9,
            frac_copy_bw=nb * numel / med / 1e9 / bw,
            first_step_s=first[name],
            host_enqueue_ms=statistics.median(host[name][warmup:]) * 1e3,
        )
        rows.append(row)
        log(
            f"  {name:34s} median {st['median_ms']:7.3f} ms  min {st['min_ms']:7.3f}  p90 {st['p90_ms']:7.3f}  "
            f"x AdamW fused {row['x_adamw_fused']:.3f}  {row['gbps']:7.1f} GB/s at {nb} B/param "
            f"({row['frac_copy_bw']:.2f} of copy)  host enqueue {row['host_enqueue_ms']:.3f} ms  "
            f"first step {first[name]:.2f} s"
        )
    return rows, runs


def extra_checks(dtype, shapes, cfg, log):
    out = {}
    triton_fadam._GPU_CONFIG = cfg
    base = make_params(shapes, dtype, seed=99)
    fused_params, ref_params = clone_params(base), clone_params(base)
    fused_opt = FAdam(fused_params, lr=1e-3, fused=True)
    ref = FAdam(ref_params, lr=1e-3, foreach=False)
    n_fused = [0]

    class Counted:  # the reference must take as many steps as the fused optimizer, whatever fails below
        state = fused_opt.state

        @staticmethod
        def step():
            n_fused[0] += 1
            fused_opt.step()

    fused = Counted
    fused.step()
    sync()
    # kernels per step and their GPU time
    try:
        count, per_name = kernel_profile(fused.step)
        out["kernels_per_step"] = count
        out["kernel_ms"] = per_name
        log(f"  kernels in one fused step: {count}; GPU ms by kernel: {json.dumps(per_name)}")
    except Exception as exc:  # noqa: BLE001
        log(f"  profiler failed: {exc!r}")
    if DEVICE == "cuda":
        # extra memory of one step
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fused.step()
        torch.cuda.synchronize()
        out["extra_mem_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        log(f"  extra memory of one fused step: {out['extra_mem_mb']:.2f} MB")
        # sync-free
        try:
            torch.cuda.set_sync_debug_mode("error")
            fused.step()
            out["sync_free"] = True
        except Exception as exc:  # noqa: BLE001
            out["sync_free"] = f"FAILED: {exc!r}"[:300]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        log(f"  set_sync_debug_mode('error') around a fused step: {out['sync_free']}")
    # correctness: the same number of steps on both, then compare params and state
    for _ in range(n_fused[0]):
        ref.step()
    sync()
    tol = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}[dtype]
    worst = {"param": 0.0, "exp_avg": 0.0, "fisher": 0.0}
    ok = True
    for pf, pr in zip(fused_params, ref_params):
        pairs = [("param", pf, pr)]
        pairs += [(k, fused.state[pf][k], ref.state[pr][k]) for k in ("exp_avg", "fisher")]
        for key, a, b in pairs:
            d = (a.double() - b.double()).abs()
            worst[key] = max(worst[key], d.max().item())
            atol, rtol = tol if key == "param" else (1e-5, 1e-4)
            ok &= bool((d <= atol + rtol * b.double().abs()).all())
        ok &= bool(torch.equal(fused.state[pf]["step"], ref.state[pr]["step"]))
    out["check_vs_forloop"] = "OK" if ok else "FAIL"
    out["max_abs_diff"] = worst
    log(f"  check vs FAdam(foreach=False) after {n_fused[0]} steps: {out['check_vs_forloop']} max|diff| {worst}")
    return out


def host_profile(dtype, shapes) -> int:
    """Where the host time of a fused step goes: cProfile over 20 steps, top functions by own time."""
    import cProfile
    import pstats

    opt = FAdam(make_params(shapes, dtype), lr=1e-3, fused=True)
    for _ in range(3):
        opt.step()
    sync()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(20):
        opt.step()
    prof.disable()
    sync()
    print(f"20 fused steps, {len(shapes)} tensors: {(time.perf_counter() - t0) / 20 * 1e3:.3f} ms/step (profiled)")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--configs", default="", help="comma-separated subset of CONFIGS (default: all)")
    ap.add_argument("--extra-sets", default="many_small,few_huge", help="param sets timed at the first config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1 (script check)")
    ap.add_argument("--host-profile", action="store_true", help="only cProfile 20 fused steps (host overhead)")
    args = ap.parse_args(argv)
    global DEVICE
    if args.smoke:
        if not triton_fadam._interpreting():
            raise SystemExit("--smoke needs TRITON_INTERPRET=1")
        DEVICE = "cpu"
        for key in PARAM_SETS:
            PARAM_SETS[key] = [(3, 100), (700,), (5,), (2000,)]
    elif not torch.cuda.is_available() or triton_fadam._interpreting():
        raise SystemExit("needs CUDA and TRITON_INTERPRET unset or 0")
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    import triton

    configs = {k: v for k, v in CONFIGS.items() if not args.configs or k in args.configs.split(",")}
    if args.host_profile:
        return host_profile(getattr(torch, args.dtypes.split(",")[0]), PARAM_SETS["transformer"])
    bw = copy_bandwidth(2**30 if DEVICE == "cuda" else 2**24)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter smoke run)"
    log(f"device {name}; torch {torch.__version__}; triton {triton.__version__}")
    log(f"copy_ bandwidth (read + write): {bw:.1f} GB/s")
    result = {"device": name, "copy_gbps": bw, "torch": torch.__version__}
    result["triton"] = triton.__version__
    first_cfg = next(iter(configs.values()))
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        shapes = PARAM_SETS["transformer"]
        numel = sum(math.prod(s) for s in shapes)
        log(f"\n== transformer set: {len(shapes)} tensors, {numel / 1e6:.2f} M params, {dname} params ==")
        try:
            rows, _ = bench_dtype(dtype, shapes, configs, args.steps, args.warmup, bw, log)
            result[f"transformer_{dname}"] = rows
            best = min((r for r in rows if r["variant"] != "adamw_fused"), key=lambda r: r["median_ms"])
            log(f"  best config: {best['variant']} at {best['x_adamw_fused']:.3f}x AdamW fused")
            result[f"checks_{dname}"] = extra_checks(dtype, shapes, first_cfg, log)
        except Exception:  # noqa: BLE001 - report and go on to the next dtype
            log(traceback.format_exc())
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        for set_name in [s for s in args.extra_sets.split(",") if s]:
            shapes = PARAM_SETS[set_name]
            numel = sum(math.prod(s) for s in shapes)
            log(f"-- {set_name}: {len(shapes)} tensors, {numel / 1e6:.1f} M params, {dname} --")
            try:
                rows, _ = bench_dtype(dtype, shapes, {"first": first_cfg}, args.steps, args.warmup, bw, log)
                result[f"{set_name}_{dname}"] = rows
            except Exception:  # noqa: BLE001
                log(traceback.format_exc())
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    out.with_suffix(".md").write_text("```\n" + "\n".join(lines) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
