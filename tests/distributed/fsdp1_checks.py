"""FAdam and FAdam8bit under real FSDP1 (``FullyShardedDataParallel``), 2 processes, gloo, CPU.

FSDP1 runs on CPU when it is given ``device_id=torch.device("cpu")`` (torch 2.13; without it, it looks for an
accelerator and raises "FSDP needs a non-CPU accelerator device"). Per optimizer class and ``use_orig_params``:

- ``refused[...]``: building the optimizer on the FSDP1 module's parameters raises the named ``RuntimeError``.
- ``refused_late[...]`` (``use_orig_params=True``): an optimizer built on the parameters *before* FSDP1 wrapped
  them (the same ``nn.Parameter`` objects, now 1-D views of a shard) refuses at its first step, leaving params and
  state untouched.
- ``allowed[...]``: with ``allow_flat_shards=True`` it takes 3 steps; every parameter moves and stays finite, and
  the result differs from the same optimizer in one process on the whole batch (per-shard RMS; the measured
  difference, relative to the movement, is recorded).

Standalone: ``python tests/distributed/fsdp1_checks.py [OUT]``; ``tests/test_fsdp1.py`` runs it and reports each
check as a test.
"""

from __future__ import annotations

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, before any installed hf_fadam
sys.path.insert(1, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import CheckRecorder, init_gloo, main_out_dir, print_summary, spawn  # noqa: E402


STEPS = 3
CLASSES = ("FAdam", "FAdam8bit")
# foreach: no C kernel to compile; FAdam8bit with every tensor quantized in small blocks.
OPTIONS = {"FAdam": dict(foreach=True), "FAdam8bit": dict(foreach=True, block_size=32, min_8bit_size=0)}
LR = 0.05


def check_names() -> list[str]:
    names = []
    for cls in CLASSES:
        for uop in (False, True):
            names += [f"refused[{cls},use_orig_params={uop}]", f"allowed[{cls},use_orig_params={uop}]"]
        names.append(f"refused_late[{cls}]")
    return names


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank and in the reference
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _batches(rank: int | None, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step a global batch of 4 * world rows; ``rank`` None: all of it, else this rank's rows."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x, y = torch.randn(4 * world, 6, generator=gen), torch.randn(4 * world, 3, generator=gen)
        out.append((x, y) if rank is None else (x[4 * rank : 4 * rank + 4], y[4 * rank : 4 * rank + 4]))
    return out


def _loss_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    torch.nn.functional.mse_loss(model(x), y).backward()


def _wrap(model: torch.nn.Module, uop: bool) -> torch.nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP(model, device_id=torch.device("cpu"), use_orig_params=uop)


def _optimizer_cls(name: str):
    import hf_fadam

    return getattr(hf_fadam, name)


def _assert_refusal(exc: BaseException | None, name: str) -> str:
    assert isinstance(exc, RuntimeError), f"expected RuntimeError, got {exc!r}"
    msg = str(exc)
    for part in (f"{name} refuses FSDP1", "per shard", "per whole tensor", "fully_shard", "allow_flat_shards=True"):
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


def refused(name: str, uop: bool, rank: int) -> dict:
    fsdp = _wrap(_model(), uop)
    before = [p.detach().clone() for p in fsdp.parameters()]
    exc = None
    try:
        _optimizer_cls(name)(fsdp.parameters(), lr=LR, **OPTIONS[name])
    except Exception as e:  # noqa: BLE001 - inspected below
        exc = e
    msg = _assert_refusal(exc, name)
    assert all(torch.equal(b, p) for b, p in zip(before, fsdp.parameters()))
    return {"shapes": [tuple(p.shape) for p in fsdp.parameters()], "message": msg[:80]}


def refused_late(name: str, rank: int, world: int) -> dict:
    model = _model()
    opt = _optimizer_cls(name)(model.parameters(), lr=LR, **OPTIONS[name])  # plain params: accepted
    fsdp = _wrap(model, uop=True)  # the same Parameter objects become 1-D views of this rank's shard
    (x, y), *_ = _batches(rank, world)
    _loss_backward(fsdp, x, y)
    before = [p.detach().clone() for p in fsdp.parameters()]
    exc = None
    try:
        opt.step()
    except Exception as e:  # noqa: BLE001 - inspected below
        exc = e
    _assert_refusal(exc, name)
    assert all(torch.equal(b, p) for b, p in zip(before, fsdp.parameters())), "a parameter changed"
    assert all(len(s) == 0 for s in opt.state.values()), "state was created"
    return {"local_shapes": [tuple(p.shape) for p in fsdp.parameters()]}


def _full_params(fsdp: torch.nn.Module) -> list[torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(fsdp):
        return [p.detach().clone() for p in fsdp.module.parameters()]


def allowed(name: str, uop: bool, rank: int, world: int) -> dict:
    cls = _optimizer_cls(name)
    init = [p.detach().clone() for p in _model().parameters()]
    fsdp = _wrap(_model(), uop)
    opt = cls(fsdp.parameters(), lr=LR, allow_flat_shards=True, **OPTIONS[name])
    for x, y in _batches(rank, world):
        opt.zero_grad()
        _loss_backward(fsdp, x, y)
        opt.step()
    final = _full_params(fsdp)  # collective: before any assertion
    ref_model = _model()
    ref = cls(ref_model.parameters(), lr=LR, **OPTIONS[name])
    for x, y in _batches(None, world):
        ref.zero_grad()
        _loss_backward(ref_model, x, y)
        ref.step()
    moved = [(f - i).abs().max().item() for f, i in zip(final, init)]
    assert all(bool(torch.isfinite(f).all()) for f in final), "a parameter is not finite"
    assert all(m > 0 for m in moved), f"a parameter did not move: {moved}"
    # Per-shard RMS: the run differs from one process on the whole batch, relative to the movement.
    off = [
        ((f - r).abs().max() / (r - i).abs().max()).item()
        for f, r, i in zip(final, [p.detach() for p in ref_model.parameters()], init)
    ]
    assert max(off) > 1e-3, f"per-shard run matches the per-tensor reference: {off}"
    return {"off_vs_one_process": [round(v, 3) for v in off]}


def worker(rank: int, world: int, store: str, out_dir: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")  # FSDP1's deprecation warning, once per wrap
    init_gloo(rank, world, store)
    rec = CheckRecorder(rank, out_dir)
    for name in CLASSES:
        for uop in (False, True):
            rec.run(f"refused[{name},use_orig_params={uop}]", lambda n=name, u=uop: refused(n, u, rank))
            rec.run(f"allowed[{name},use_orig_params={uop}]", lambda n=name, u=uop: allowed(n, u, rank, world))
        rec.run(f"refused_late[{name}]", lambda n=name: refused_late(n, rank, world))
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    out = main_out_dir()
    spawn(worker, out)
    sys.exit(print_summary(out))
