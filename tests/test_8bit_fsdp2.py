"""FAdam8bit under FSDP2 (``fully_shard``, 2 CPU processes, gloo): the local shards are stepped with the RMS of the
whole logical tensors. With fp32 state (``min_8bit_size`` above every tensor) the sharded run equals one process
up to the all-reduce's rounding; with 8-bit state the blocks are cut per shard, so it agrees within the state's
quantization noise. The per-rank checkpoint that FAdam8bit's docstring prescribes resumes bit-exactly, and FAdam's
sharded state dict loads as each rank's shard."""

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


RESUME_WORKER = textwrap.dedent(
    """
    import io, os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
    from hf_fadam import FAdam8bit

    OUT = sys.argv[1]
    KW = dict(lr=1e-2, min_8bit_size=100, block_size=64, fused=True)

    def worker(rank, world):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method="file://" + os.path.join(OUT, "store"), rank=rank, world_size=world)
        mesh = init_device_mesh("cpu", (world,))

        def build():
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(64, 97), torch.nn.Tanh(), torch.nn.Linear(97, 8))
            for layer in m:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            return fully_shard(m, mesh=mesh)

        g = torch.Generator().manual_seed(1)
        x = torch.randn(6, 32, 64, generator=g)
        y = (x @ torch.randn(64, 8, generator=g)).argmax(-1)

        def run(m, opt, steps):
            for t in steps:
                opt.zero_grad()
                xs, ys = x[t, rank * 16:(rank + 1) * 16], y[t, rank * 16:(rank + 1) * 16]
                torch.nn.functional.cross_entropy(m(xs), ys).backward()
                opt.step()

        m = build()
        opt = FAdam8bit(m.parameters(), **KW)
        run(m, opt, range(3))
        # the checkpoint, per rank: the local shards of the params and the optimizer's state dict, as bytes
        params_ckpt = [p.to_local().detach().clone() for p in m.parameters()]
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        run(m, opt, range(3, 6))
        straight = [p.to_local().detach().clone() for p in m.parameters()]
        straight_state = opt.state_dict()["state"]

        m2 = build()
        with torch.no_grad():
            for p, saved in zip(m2.parameters(), params_ckpt):
                p.to_local().copy_(saved)
        opt2 = FAdam8bit(m2.parameters(), **KW)
        buf.seek(0)
        opt2.load_state_dict(torch.load(buf))
        run(m2, opt2, range(3, 6))
        resumed = [p.to_local().detach().clone() for p in m2.parameters()]
        resumed_state = opt2.state_dict()["state"]
        kinds = sorted({k for s in straight_state.values() for k in s})

        # FAdam's sharded state (DTensors placed like the params) loads into FAdam8bit as its local shards, quantized
        from hf_fadam import FAdam
        from hf_fadam._quant import quantize_blockwise
        m3 = build()
        fadam = FAdam(m3.parameters(), lr=1e-2)
        run(m3, fadam, range(3))
        opt3 = FAdam8bit(m3.parameters(), **KW)
        opt3.load_state_dict(fadam.state_dict())
        from_fadam = []
        for p in m3.parameters():
            st, st8 = fadam.state[p], opt3.state[p]
            m_loc, f_loc = st["exp_avg"].to_local(), st["fisher"].to_local()
            if "fisher_sqrt" in st8:
                q_m = quantize_blockwise(m_loc, 64, signed=True)[0]
                q_f = quantize_blockwise(f_loc.sqrt(), 64, False)[0]
                from_fadam.append(torch.equal(st8["exp_avg"], q_m) and torch.equal(st8["fisher_sqrt"], q_f))
            else:
                from_fadam.append(torch.equal(st8["exp_avg"], m_loc) and torch.equal(st8["fisher"], f_loc))
            from_fadam.append(type(st8["exp_avg"]) is torch.Tensor)
        run(m3, opt3, range(3, 4))
        from_fadam.append(all(bool(p.to_local().isfinite().all()) for p in m3.parameters()))
        # a DTensor state placed unlike its param (its local shard would be other elements) is refused
        from torch.distributed.tensor import Replicate
        sd = fadam.state_dict()
        sd["state"][0] = dict(sd["state"][0], exp_avg=sd["state"][0]["exp_avg"].redistribute(placements=[Replicate()]))
        try:
            FAdam8bit(m3.parameters(), **KW).load_state_dict(sd)
            from_fadam.append(False)  # loaded without an error
        except ValueError as e:
            from_fadam.append("'exp_avg' is a DTensor with placements (Replicate(),)" in str(e))
        torch.save(
            {"straight": straight, "resumed": resumed, "straight_state": straight_state,
             "resumed_state": resumed_state, "kinds": kinds, "from_fadam": from_fadam},
            os.path.join(OUT, f"rank{rank}.pt"),
        )
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(worker, args=(2,), nprocs=2, join=True)
    """
)


def test_fsdp2_per_rank_checkpoint_resumes_bit_exactly(tmp_path):
    """The checkpoint the docstring prescribes for FSDP2 (each rank's ``optimizer.state_dict()`` and its param
    shards, same world size): three steps, save, three more; a fresh model and optimizer loaded from the save take
    the same three steps to the same bits, params and every state tensor (codes, scales, fp32 state, step). And
    FAdam's sharded state dict (DTensor state) loads as each rank's shard, quantized, and steps on."""
    script = tmp_path / "resume.py"
    script.write_text(RESUME_WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env["HF_FADAM_CPU_FUSED_BACKEND"] = "c"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        # both state layouts are exercised: 8-bit (the weights) and fp32 (the biases, under min_8bit_size)
        assert {"exp_avg_scale", "fisher_sqrt", "fisher"} <= set(out["kinds"]), out["kinds"]
        for a, b in zip(out["straight"], out["resumed"]):
            assert torch.equal(a, b)
        assert out["from_fadam"] and all(out["from_fadam"]), out["from_fadam"]
        assert out["straight_state"].keys() == out["resumed_state"].keys()
        for idx, st in out["straight_state"].items():
            for key, val in st.items():
                assert torch.equal(val, out["resumed_state"][idx][key]), (rank, idx, key)
