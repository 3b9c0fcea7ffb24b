"""FAdam8bit under FSDP2 (``fully_shard``, 2 CPU processes, gloo): the local shards are stepped with the RMS of the
whole logical tensors. With fp32 state (``min_8bit_size`` above every tensor) the sharded run equals one process
up to the all-reduce's rounding; with 8-bit state the blocks are cut per shard, so it agrees within the state's
quantization noise. The state is DTensors (codes placed like the param, scales sharded like it, a layout record):
per-rank ``torch.save`` and ``torch.distributed.checkpoint`` both resume bit-exactly at the same shards, a load for
other shards is refused with FAdam8bit's error, and FAdam's sharded state dict loads, quantized per shard
(``tests/distributed/fsdp2_8bit_dcp_checks.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist


REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="gloo over 127.0.0.1 is tested on Linux"),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo"),
]

WORKER = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
    from hf_fadam import FAdam8bit

    OUT, MIN8 = sys.argv[1], int(sys.argv[2])
    KW = dict(lr=1e-2, min_8bit_size=MIN8, block_size=64, fused=True)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 97), torch.nn.Tanh(), torch.nn.Linear(97, 8))

    def data():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(5, 32, 64, generator=g)
        return x, (x @ torch.randn(64, 8, generator=g)).argmax(-1)

    def worker(rank, world):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method="file://" + os.path.join(OUT, "store"), rank=rank, world_size=world)
        mesh = init_device_mesh("cpu", (world,))
        m = model()
        for layer in m:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        opt = FAdam8bit(m.parameters(), **KW)
        x, y = data()
        for t in range(x.shape[0]):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x[t, rank * 16:(rank + 1) * 16]), y[t, rank * 16:(rank + 1) * 16]).backward()
            opt.step()
        full = [p.full_tensor().detach() for p in m.parameters()]
        if rank == 0:
            torch.save(full, os.path.join(OUT, "fsdp.pt"))
            with open(os.path.join(OUT, "impl.txt"), "w") as f:
                f.write(opt.describe_implementation())
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(worker, args=(2,), nprocs=2, join=True)
        torch.set_num_threads(1)
        m = model()
        opt = FAdam8bit(m.parameters(), **KW)
        x, y = data()
        for t in range(x.shape[0]):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x[t]), y[t]).backward()
            opt.step()
        torch.save([p.detach() for p in m.parameters()], os.path.join(OUT, "single.pt"))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(("min8", "atol"), [(10**9, 2e-5), (100, 2e-3)], ids=["fp32_state", "8bit_state"])
def test_fsdp2_matches_one_process(tmp_path, min8, atol):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env["HF_FADAM_CPU_FUSED_BACKEND"] = "c"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(min8)], env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fsdp, single = torch.load(tmp_path / "fsdp.pt"), torch.load(tmp_path / "single.pt")
    for a, b in zip(fsdp, single):
        torch.testing.assert_close(a, b, atol=atol, rtol=10 * atol)
    assert "C kernel" in (tmp_path / "impl.txt").read_text()


CHECKS = [
    "per_rank_resume",
    "fadam_state_loads",
    "dcp_resume[fused]",
    "dcp_resume[foreach]",
    "full_state_dict_resume",
    "dcp_same_shards_exact[hsdp_1x2]",
    "dcp_reshard_refused[hsdp_2x1]",
]
CHECKS_ONE_PROCESS = ["dcp_reshard_refused[world1]", "reshard_through_fadam[world1]"]


@pytest.fixture(scope="module")
def checkpoint_results(tmp_path_factory):
    """One run of ``tests/distributed/fsdp2_8bit_dcp_checks.py`` (2 ranks, then 1 process): results per check."""
    out = tmp_path_factory.mktemp("fsdp2_8bit_dcp")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env["HF_FADAM_CPU_FUSED_BACKEND"] = "c"
    script = REPO / "tests" / "distributed" / "fsdp2_8bit_dcp_checks.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(out)], env=env, capture_output=True, text=True, timeout=400
    )
    results: dict[str, list[dict]] = {}
    for path in (out / "results_rank0.json", out / "results_rank1.json", out / "world1" / "results_rank0.json"):
        for name, res in (json.loads(path.read_text()) if path.exists() else {}).items():
            results.setdefault(name, []).append(res)
    return results, proc


def _assert_check(checkpoint_results, name: str, ranks: int) -> None:
    results, proc = checkpoint_results
    runs = results.get(name, [])
    if len(runs) != ranks:
        pytest.fail(f"{name} ran on {len(runs)} of {ranks} ranks (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    errors = [r.get("error", "") + "\n" + r.get("traceback", "")[-2000:] for r in runs if not r["ok"]]
    assert not errors, errors[0]


@pytest.mark.parametrize("name", CHECKS)
def test_fsdp2_checkpoint(checkpoint_results, name):
    """FAdam8bit's sharded state under FSDP2 (uneven and even ``Shard(0)``, 8-bit and fp32 state) checkpointed per
    rank and through ``torch.distributed.checkpoint``: bit-exact resume wherever the shards are the same (the
    checks are described in the worker script's docstring)."""
    _assert_check(checkpoint_results, name, 2)


@pytest.mark.parametrize("name", CHECKS_ONE_PROCESS)
def test_fsdp2_checkpoint_other_world_size(checkpoint_results, name):
    """The 2-rank checkpoint in one process: the 8-bit state is refused with FAdam8bit's error (not loaded with
    other shards' scales), and the documented way through FAdam's fp32 state resumes within quantization noise."""
    _assert_check(checkpoint_results, name, 1)
