"""FAdam8bit under DDP (2 CPU processes, gloo): both ranks stay bitwise identical and equal one process on the whole
batch (DDP averages the gradients, so only the all-reduce's rounding differs)."""

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
    from torch.nn.parallel import DistributedDataParallel as DDP
    from hf_fadam import FAdam8bit

    OUT, IMPL = sys.argv[1], sys.argv[2]
    KW = dict(fused=True) if IMPL == "fused" else dict(foreach=True)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 8))

    def data():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(6, 32, 64, generator=g)
        return x, (x @ torch.randn(64, 8, generator=g)).argmax(-1)

    def train(m, opt, x, y, rank=None):
        for t in range(x.shape[0]):
            xs, ys = (x[t], y[t]) if rank is None else (x[t, rank * 16:(rank + 1) * 16], y[t, rank * 16:(rank + 1) * 16])
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(xs), ys).backward()
            opt.step()

    def worker(rank, world):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method="file://" + os.path.join(OUT, "store"), rank=rank, world_size=world)
        m = DDP(model())
        opt = FAdam8bit(m.parameters(), lr=1e-2, min_8bit_size=100, block_size=64, **KW)
        x, y = data()
        train(m, opt, x, y, rank)
        torch.save([p.detach() for p in m.module.parameters()], os.path.join(OUT, f"rank{rank}.pt"))
        torch.save(opt.state_dict(), os.path.join(OUT, f"state{rank}.pt"))
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(worker, args=(2,), nprocs=2, join=True)
        torch.set_num_threads(1)
        m = model()
        opt = FAdam8bit(m.parameters(), lr=1e-2, min_8bit_size=100, block_size=64, **KW)
        x, y = data()
        train(m, opt, x, y)
        torch.save([p.detach() for p in m.parameters()], os.path.join(OUT, "single.pt"))
    """
)


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_ddp_ranks_agree_and_match_one_process(tmp_path, impl):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env["HF_FADAM_CPU_FUSED_BACKEND"] = "c"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), impl], env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1, single = (torch.load(tmp_path / f"{n}.pt") for n in ("rank0", "rank1", "single"))
    for a, b, c in zip(r0, r1, single):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=2e-4, rtol=1e-3)
    s0, s1 = (torch.load(tmp_path / f"state{r}.pt") for r in (0, 1))
    for k in s0["state"]:
        for name, t in s0["state"][k].items():
            assert torch.equal(t, s1["state"][k][name]), name
