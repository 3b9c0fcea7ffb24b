"""Shared plumbing for the multi-process checks in ``tests/distributed/``.

A worker script spawns ``WORLD_SIZE`` processes with :func:`spawn`, each process runs a list of named checks with
a :class:`CheckRecorder`, and every rank writes ``results_rank{r}.json`` into the output folder.
``tests/test_distributed.py`` runs each worker script once (one process start, one ``import torch`` per rank) and
turns every named check into its own pytest test. A check passes only if it passed on every rank.

Process groups use the gloo backend over 127.0.0.1 only and a ``FileStore`` rendezvous, so no TCP port has to be
chosen (and none can collide with the other engineers' jobs on the same machine).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


WORLD_SIZE = 2
# A collective that waits longer than this means one rank failed before reaching it; fail instead of hanging.
COLLECTIVE_TIMEOUT_S = 120


def local_env() -> None:
    """Keep gloo on the loopback interface and each rank on one thread (2 ranks share a small CPU)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def init_gloo(rank: int, world_size: int, store_path: str) -> None:
    import torch.distributed as dist

    local_env()
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )


def spawn(worker: Callable[[int, int, str, str], None], out_dir: str, world_size: int = WORLD_SIZE) -> None:
    """Run ``worker(rank, world_size, store_path, out_dir)`` in ``world_size`` fresh processes."""
    import torch.multiprocessing as mp

    local_env()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hf_fadam_store_") as store_dir:
        mp.spawn(worker, args=(world_size, os.path.join(store_dir, "store"), out_dir), nprocs=world_size, join=True)


class CheckRecorder:
    """Runs named checks and records, per rank, whether each passed and what it measured.

    A check is a callable returning a dict of measurements (max errors, counts, ...) or raising. Checks must do
    all their collectives before asserting, so that a failing assertion on one rank does not leave the other rank
    waiting in a collective.
    """

    def __init__(self, rank: int, out_dir: str) -> None:
        self.rank = rank
        self.out_path = Path(out_dir) / f"results_rank{rank}.json"
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> None:
        start = time.perf_counter()
        try:
            info = fn() or {}
            self.results[name] = {"ok": True, "info": info}
        except Exception as exc:  # noqa: BLE001 - every failure is recorded and reported by pytest
            self.results[name] = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        self.results[name]["seconds"] = round(time.perf_counter() - start, 3)
        self.flush()

    def flush(self) -> None:
        self.out_path.write_text(json.dumps(self.results, indent=2, default=str))


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Normwise relative error ``max|a - e| / max|e|`` (``max|a - e|`` when ``e`` is all zero)."""
    actual = actual.detach().double()
    expected = expected.detach().double()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if expected.numel() == 0:
        return 0.0
    diff = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    return diff / scale if scale > 0 else diff


def count_collectives(fn: Callable[[], Any]) -> dict[str, int]:
    """Run ``fn()`` under the profiler and count the collectives that reached the process-group backend.

    The backend records one event per collective it runs (``gloo:all_reduce``, ``nccl:all_reduce``, ...), whoever
    issued it: ``dist.all_reduce`` in a ``reduce`` hook, or DTensor's own redistributions. Returns name -> count.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: dict[str, int] = {}
    for event in prof.events():
        if event.name.startswith(("gloo:", "nccl:")):
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def main_out_dir() -> str:
    """The output folder given on the command line (a fresh temporary one when absent)."""
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if args:
        return args[0]
    return tempfile.mkdtemp(prefix="hf_fadam_dist_")


def print_summary(out_dir: str, world_size: int = WORLD_SIZE) -> int:
    """Print one line per check (standalone use); return 1 if any check failed on any rank."""
    failed = 0
    merged: dict[str, list[dict[str, Any]]] = {}
    for rank in range(world_size):
        path = Path(out_dir) / f"results_rank{rank}.json"
        for name, res in (json.loads(path.read_text()) if path.exists() else {}).items():
            merged.setdefault(name, []).append(res)
    for name, results in merged.items():
        ok = len(results) == world_size and all(r["ok"] for r in results)
        failed += not ok
        errors = [r["error"] for r in results if not r["ok"]]
        detail = results[0].get("info") if ok else (errors or [f"ran on {len(results)} of {world_size} ranks"])[0]
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
    return int(failed > 0)
