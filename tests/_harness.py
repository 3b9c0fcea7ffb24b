"""Shared test harness: one set of awkward parameters and a trajectory runner for comparing implementations.

Gradients are drawn from a generator seeded by (step, index), so every implementation sees identical gradients
whatever its params are, and the comparison isolates the optimizer.
"""

from __future__ import annotations

import io
import os
from contextlib import contextmanager

import torch

from hf_fadam import FAdam


# name -> (shape builder, which steps have grad None)
def make_params(dtype: torch.dtype, device: str = "cpu") -> list[torch.nn.Parameter]:
    """Parameters that exercise the corner cases: odd, non-contiguous, zero-size, 0-d, frozen, late, zero-grad."""
    gen = torch.Generator().manual_seed(1234)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype=dtype, device=device)

    non_contiguous = rand(6, 9).t()  # a transposed view: strides (1, 9)
    assert not non_contiguous.is_contiguous()
    tensors = [
        rand(5, 7),  # 0: odd shape
        non_contiguous,  # 1: non-contiguous
        rand(0, 4),  # 2: zero-size
        rand(()),  # 3: 0-d scalar
        rand(33),  # 4: all-zero gradient every step
        rand(4, 3),  # 5: frozen at steps 2..3, then unfrozen
        rand(2, 2, 3),  # 6: first gradient only at step 4
        rand(257),  # 7: plain vector across power-of-two sizes
    ]
    return [torch.nn.Parameter(t) for t in tensors]


FROZEN = {5: range(2, 4), 6: range(0, 4)}
ZERO_GRAD = {4}


def grad_for(step: int, index: int, param: torch.Tensor) -> torch.Tensor | None:
    if step in FROZEN.get(index, ()):
        return None
    if index in ZERO_GRAD:
        return torch.zeros_like(param)
    gen = torch.Generator().manual_seed(10_000 * step + index)
    scale = 10.0 ** (index % 3 - 2)  # 1e-2, 1e-1, 1: RMS(g) below and above 1, so ε̂ takes both branches
    g = scale * torch.randn(param.shape, generator=gen, dtype=torch.float32)
    return g.to(dtype=param.dtype, device=param.device)


def param_groups(params: list[torch.nn.Parameter]) -> list[dict]:
    """Several groups with different hyperparameters (the Trainer's decay/no-decay split and more)."""
    return [
        {"params": params[0:3]},
        {"params": params[3:5], "weight_decay": 0.0, "lr": 3e-3},
        {"params": params[5:7], "clip": 0.5, "p": 0.25, "betas": (0.8, 0.99)},
        {"params": params[7:], "clip": 2.0, "p": 1.0, "eps": 1e-6},
    ]


IMPL_FLAGS = {
    "forloop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused_c": {"fused": True},
    "fused_triton": {"fused": True},
}


@contextmanager
def cpu_backend(impl: str):
    """Route fused=True on CPU tensors to the kernel that ``impl`` names (see functional._cpu_fused_backend)."""
    old = os.environ.get("HF_FADAM_CPU_FUSED_BACKEND")
    if impl in ("fused_c", "fused_triton"):
        os.environ["HF_FADAM_CPU_FUSED_BACKEND"] = impl.removeprefix("fused_")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_FADAM_CPU_FUSED_BACKEND", None)
        else:
            os.environ["HF_FADAM_CPU_FUSED_BACKEND"] = old


def trajectory(impl: str, dtype: torch.dtype, steps: int = 7, maximize: bool = False, device: str = "cpu", **kw):
    """Run ``steps`` steps; return a list, per step, of (params, exp_avgs, fishers, steps) snapshots."""
    params = make_params(dtype, device)
    opt = FAdam(param_groups(params), lr=1e-2, maximize=maximize, **IMPL_FLAGS[impl], **kw)
    history = []
    with cpu_backend(impl):
        for step in range(steps):
            for i, param in enumerate(params):
                param.grad = grad_for(step, i, param)
            opt.step()
            snap = []
            for param in params:
                state = opt.state.get(param, {})
                snap.append(
                    (
                        param.detach().clone(),
                        state.get("exp_avg", torch.zeros(0)).clone(),
                        state.get("fisher", torch.zeros(0)).clone(),
                        state.get("step", torch.zeros(())).clone(),
                    )
                )
            history.append(snap)
    return history, opt


def assert_trajectories_close(actual, expected, atol_rtol, state_atol_rtol):
    for step, (snap_a, snap_e) in enumerate(zip(actual, expected)):
        for i, (a, e) in enumerate(zip(snap_a, snap_e)):
            names = ("param", "exp_avg", "fisher", "step")
            for name, x, y in zip(names, a, e):
                atol, rtol = atol_rtol if name == "param" else state_atol_rtol
                if name == "step":
                    atol, rtol = 0, 0
                assert x.dtype == y.dtype, f"step {step}, tensor {i}, {name}: dtype {x.dtype} != {y.dtype}"
                torch.testing.assert_close(
                    x.cpu(),
                    y.cpu(),
                    atol=atol,
                    rtol=rtol,
                    msg=lambda m, s=step, j=i, n=name: f"step {s}, tensor {j}, {n}: {m}",
                )


def roundtrip(obj):
    """``obj`` through ``torch.save`` and ``torch.load(weights_only=True)``, as a checkpoint on disk would be."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)
