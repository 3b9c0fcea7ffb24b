"""FAdam8bit under FSDP2 (``fully_shard``, 2 CPU processes, gloo): the local shards are stepped with the RMS of the
whole logical tensors. With fp32 state (``min_8bit_size`` above every tensor) the sharded run equals one process
up to the all-reduce's rounding; with 8-bit state the blocks are cut per shard, so it agrees within the state's
quantization noise."""

from __future__ import annotations

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
    pytest.mark.slow,
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
