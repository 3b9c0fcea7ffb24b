"""The multi-tensor Triton kernels (hf_fadam/kernels/triton_fadam.py).

Without a GPU they run in Triton's interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET=1 before anything
imports triton); on a GPU machine, ``TRITON_INTERPRET=0 pytest tests/test_kernels_triton.py`` runs the compiled
kernels on CUDA tensors, and the CPU variants skip. Sizes are derived from the active launch configuration so that
tensors straddle block and chunk boundaries in both modes; interpreted tensors stay at a few thousand elements.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from hf_fadam import FAdam
from hf_fadam.kernels import triton_fadam

from _harness import assert_trajectories_close, trajectory
from _tolerances import tolerance


INTERPRETING = triton_fadam._interpreting()
HAS_CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.skipif(not triton_fadam.is_available(), reason="triton is not importable here")

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETING, reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not HAS_CUDA or INTERPRETING, reason="needs CUDA and TRITON_INTERPRET=0"),
        ],
    ),
]

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, clip=1.0, p=0.5, maximize=False)
HYPER_SETS = {
    "default": HYPER,
    "wd0-clip0.5-p0.25-max": dict(HYPER, weight_decay=0.0, clip=0.5, p=0.25, maximize=True, eps=1e-6),
    "clip2-p1-b0.8": dict(HYPER, clip=2.0, p=1.0, beta1=0.8, beta2=0.99),
}


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _sizes() -> list[int]:
    """Sizes around the block and chunk boundaries of the active configuration, one spanning several chunks."""
    cfg = triton_fadam._config()
    block = max(cfg.block_a, cfg.block_b, cfg.block_c)
    chunk = cfg.chunk
    return [1, block - 1, block + 1, chunk - 1, chunk, chunk + 1, 2 * chunk + 3 * block // 2 + 5, 0]


# --- an independent float64 transcription of FADAM_SPEC.md (not the package's reference) -------------------------


def _spec_step(theta, g, m, f, t, *, lr, beta1, beta2, eps, weight_decay, clip, p, maximize):
    """One step on float64 copies; returns new (theta, m, f)."""
    if theta.numel() == 0:
        return theta, m, f
    if maximize:
        g = -g
    beta2_hat = beta2 * (1 - beta2 ** (t - 1)) / (1 - beta2**t)
    f = beta2_hat * f + (1 - beta2_hat) * g * g
    rms_g = g.square().mean().sqrt().item()
    eps_hat = eps * min(1.0, rms_g) if rms_g > 0 else eps
    denom = f**p + eps_hat
    nat = g / denom
    nat = nat / max(1.0, nat.square().mean().sqrt().item() / clip)
    m = beta1 * m + (1 - beta1) * nat
    update = m
    if weight_decay != 0:
        w = theta / denom
        w = w / max(1.0, w.square().mean().sqrt().item() / clip)
        update = m + weight_decay * w
    return theta - lr * update, m, f


def _make_tensors(dtype, device, seed=0):
    """Params (one misaligned view, one all-zero gradient, one with large gradients), grads, fp32/fp64 states."""
    gen = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for i, n in enumerate(_sizes()):
        if i == 3:
            # A view one element into its buffer: its address is not 16-byte aligned (the unaligned variant).
            theta = torch.randn(n + 1, generator=gen)[1:]
        else:
            theta = torch.randn(n, generator=gen)
        scale = [1e-2, 1.0, 30.0][i % 3]
        g = scale * torch.randn(n, generator=gen)
        if i == 1:
            g.zero_()
        params.append(theta)
        grads.append(g)
    state = _state_dtype(dtype)
    params = [
        _misaligned(t, dtype, device) if i == 3 else t.to(device=device, dtype=dtype) for i, t in enumerate(params)
    ]
    grads = [g.to(device=device, dtype=dtype) for g in grads]
    exp_avgs = [torch.zeros(t.shape, dtype=state, device=device) for t in params]
    fishers = [torch.zeros(t.shape, dtype=state, device=device) for t in params]
    steps = [torch.zeros((), dtype=torch.float32, device=device) for _ in params]
    return params, grads, exp_avgs, fishers, steps


def _misaligned(t, dtype, device):
    buf = torch.empty(t.numel() + 1, dtype=dtype, device=device)
    view = buf[1:]
    view.copy_(t)
    return view


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("dtype", "hyper"),
    [
        (torch.float32, "default"),
        (torch.float32, "wd0-clip0.5-p0.25-max"),
        (torch.bfloat16, "clip2-p1-b0.8"),
        (torch.float16, "default"),
        (torch.float64, "wd0-clip0.5-p0.25-max"),
    ],
)
def test_kernel_matches_spec_transcription(device, dtype, hyper):
    hp = HYPER_SETS[hyper]
    params, grads, exp_avgs, fishers, steps = _make_tensors(dtype, device)
    assert params[3].data_ptr() % 16 != 0
    ref = [[t.detach().to("cpu", torch.float64, copy=True) for t in ts] for ts in (params, exp_avgs, fishers)]
    grads_before = [g.clone() for g in grads]
    for t in range(1, 4):
        torch._foreach_add_(steps, 1)
        triton_fadam.fadam_triton_(params, grads, exp_avgs, fishers, steps, **hp)
        for i, g in enumerate(grads):
            theta, m, f = _spec_step(ref[0][i], g.to("cpu", torch.float64), ref[1][i], ref[2][i], t, **hp)
            # The kernel keeps theta in the param dtype: round the transcription the same way between steps.
            ref[0][i], ref[1][i], ref[2][i] = theta.to(dtype).double(), m, f
    for g, g0 in zip(grads, grads_before):
        assert torch.equal(g, g0), "the kernel must not modify the grads"
    atol, rtol = tolerance("fused_triton", dtype)
    s_atol, s_rtol = tolerance("fused_triton", _state_dtype(dtype))
    for i in range(len(params)):
        torch.testing.assert_close(params[i].cpu().double(), ref[0][i], atol=atol, rtol=rtol, msg=f"param {i}")
        torch.testing.assert_close(exp_avgs[i].cpu().double(), ref[1][i], atol=s_atol, rtol=s_rtol, msg=f"m {i}")
        torch.testing.assert_close(fishers[i].cpu().double(), ref[2][i], atol=s_atol, rtol=s_rtol, msg=f"f {i}")
        assert torch.isfinite(params[i]).all()


# --- through FAdam(fused=True) against the reference FAdam(foreach=False) -----------------------------------------


def _model_params(dtype, device):
    """Multi-chunk sizes, a transposed view, a zero-size param, frozen/late/zero-grad tensors, in 3 groups."""
    gen = torch.Generator().manual_seed(7)
    sizes = _sizes()
    shapes = [(sizes[6],), (sizes[2],), (0, 3), (sizes[5] // 4, 4), (33,), (sizes[4] - 3,), (5, 7)]
    tensors = [torch.randn(s, generator=gen) for s in shapes]
    params = [torch.nn.Parameter(t.to(device=device, dtype=dtype)) for t in tensors]
    params[6] = torch.nn.Parameter(torch.randn(7, 5, generator=gen).to(device=device, dtype=dtype).t())
    groups = [
        {"params": params[0:3]},
        {"params": params[3:5], "weight_decay": 0.0, "lr": 3e-3, "clip": 0.5},
        {"params": params[5:], "p": 0.25, "clip": 2.0, "betas": (0.8, 0.99), "eps": 1e-6},
    ]
    return params, groups


FROZEN = {3: range(2, 4), 5: range(0, 3)}  # param 3 frozen at steps 2-3 then unfrozen; param 5 starts at step 3
ZERO_GRAD = {4}


def _grad(step, i, param):
    if step in FROZEN.get(i, ()):
        return None
    if i in ZERO_GRAD:
        return torch.zeros_like(param)
    gen = torch.Generator().manual_seed(1000 * step + i)
    g = 10.0 ** (i % 3 - 1) * torch.randn(param.shape, generator=gen)
    return g.to(device=param.device, dtype=param.dtype)


def _run(flags, dtype, device, steps=7, maximize=False, scale=None, skip_at=()):
    """Trajectory snapshots; ``scale`` multiplies the grads and hands grad_scale to the step like GradScaler does;
    at the steps in ``skip_at`` found_inf = 1."""
    params, groups = _model_params(dtype, device)
    opt = FAdam(groups, lr=1e-2, maximize=maximize, **flags)
    history = []
    for step in range(steps):
        k = step - sum(s < step for s in skip_at)  # a skipped step does not advance the gradient schedule
        for i, param in enumerate(params):
            g = _grad(k, i, param)
            param.grad = None if g is None else (g if scale is None else g * scale)
        if scale is not None:
            opt.grad_scale = torch.tensor(float(scale), device=device)
            opt.found_inf = torch.tensor(1.0 if step in skip_at else 0.0, device=device)
        opt.step()
        history.append(
            [
                tuple(
                    x.detach().clone()
                    for x in (
                        param,
                        opt.state.get(param, {}).get("exp_avg", torch.zeros(0)),
                        opt.state.get(param, {}).get("fisher", torch.zeros(0)),
                        opt.state.get(param, {}).get("step", torch.zeros(())),
                    )
                )
                for param in params
            ]
        )
    return history


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_fused_matches_forloop_multichunk(device, dtype, maximize, monkeypatch):
    if device == "cpu" and (dtype, maximize) == (torch.bfloat16, True):
        pytest.skip("interpreter time budget: bf16 x maximize is covered on CUDA and by test_parity")
    monkeypatch.setenv("HF_FADAM_CPU_FUSED_BACKEND", "triton")
    expected = _run({"foreach": False}, dtype, device, maximize=maximize)
    actual = _run({"fused": True}, dtype, device, maximize=maximize)
    assert_trajectories_close(
        actual, expected, tolerance("fused_triton", dtype), tolerance("fused_triton", _state_dtype(dtype))
    )


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scale_and_found_inf(device, monkeypatch):
    monkeypatch.setenv("HF_FADAM_CPU_FUSED_BACKEND", "triton")
    scale = 1024.0  # a power of two: unscaling is exact, so the run must match the unscaled reference
    expected = _run({"foreach": False}, torch.float32, device, steps=4)
    actual = _run({"fused": True}, torch.float32, device, steps=5, scale=scale, skip_at=(2,))
    # Step 2 found an inf: nothing changed and the step counters were rolled back.
    for before, after in zip(actual[1], actual[2]):
        for x, y in zip(before, after):
            assert torch.equal(x, y)
    del actual[2]
    assert_trajectories_close(
        actual, expected, tolerance("fused_triton", torch.float32), tolerance("fused_triton", torch.float32)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_fused_matches_forloop_harness(device, monkeypatch):
    """The shared awkward-parameter harness of test_parity.py (odd, non-contiguous, zero-size, 0-d, frozen, late)."""
    if device == "cpu":
        pytest.skip("test_parity.py runs the harness on the interpreted kernels")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        expected, _ = trajectory("forloop", dtype, device=device)
        actual, _ = trajectory("fused_triton", dtype, device=device)
        assert_trajectories_close(
            actual, expected, tolerance("fused_triton", dtype), tolerance("fused_triton", _state_dtype(dtype))
        )


# --- design properties ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_one_launch_per_pass_for_many_tensors(device, monkeypatch):
    """Multi-tensor: each pass is one launch for the whole list, not one per tensor."""
    launches = []
    real = triton_fadam._kernels()

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches.append((self.name, grid))
            return self.kernel[grid]

    counted = triton_fadam._Kernels(
        pass_a=Counting("a", real.pass_a),
        pass_b=Counting("b", real.pass_b),
        pass_c=Counting("c", real.pass_c),
        dtypes=real.dtypes,
        interpreting=real.interpreting,
    )
    monkeypatch.setattr(triton_fadam, "_kernels", lambda: counted)
    n = 40
    params = [torch.randn(3 + i, device=device) for i in range(n)]
    grads = [torch.randn_like(t) for t in params]
    states = [[torch.zeros_like(t) for t in params] for _ in range(2)]
    steps = [torch.ones((), device=device) for _ in params]
    triton_fadam.fadam_triton_(params, grads, *states, steps, **HYPER)
    assert [name for name, _ in launches] == ["a", "b", "c"]
    assert launches[0][1] == (n,)  # one chunk per small tensor


@pytest.mark.parametrize("device", DEVICES)
def test_zero_size_and_empty_lists_are_noops(device):
    empty = torch.zeros(0, 5, device=device)
    triton_fadam.fadam_triton_([], [], [], [], [], **HYPER)
    m, f = [torch.zeros_like(empty)], [torch.zeros_like(empty)]
    triton_fadam.fadam_triton_([empty], [empty.clone()], m, f, [torch.ones((), device=device)], **HYPER)


@pytest.mark.parametrize("device", DEVICES)
def test_all_zero_gradient_stays_finite(device):
    # ε̂ falls back to ε when RMS(g) = 0: the update is exactly the clipped weight decay, and nothing is NaN.
    theta = torch.randn(300, device=device)
    params, grads = [theta.clone()], [torch.zeros_like(theta)]
    m, f = [torch.zeros_like(theta)], [torch.zeros_like(theta)]
    triton_fadam.fadam_triton_(params, grads, m, f, [torch.ones((), device=device)], **HYPER)
    assert torch.isfinite(params[0]).all() and (m[0] == 0).all() and (f[0] == 0).all()
    w = theta / HYPER["eps"]
    w = w / max(1.0, w.square().mean().sqrt().item() / HYPER["clip"])
    torch.testing.assert_close(params[0], theta - HYPER["lr"] * HYPER["weight_decay"] * w)


def test_errors_name_the_problem():
    a = torch.zeros(4)
    with pytest.raises(ValueError, match="equal lengths"):
        triton_fadam.fadam_triton_([a], [], [a], [a], [a], **HYPER)
    if INTERPRETING:
        mixed = [torch.zeros(4), torch.zeros(4, dtype=torch.float64)]
        with pytest.raises(ValueError, match="one dtype"):
            triton_fadam.fadam_triton_(mixed, mixed, mixed, mixed, [torch.ones(())] * 2, **HYPER)
    else:
        with pytest.raises(RuntimeError, match="CUDA tensors"):
            triton_fadam.fadam_triton_([a], [a], [a], [a], [torch.ones(())], **HYPER)


def test_import_hf_fadam_does_not_import_triton():
    code = "import sys, hf_fadam; assert 'triton' not in sys.modules, 'import hf_fadam imported triton'"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)


def test_bytes_per_param_model():
    # The traffic model of the module docstring: 44 B fp32 (AdamW fused: 28 B), 32 B for 16-bit params.
    assert triton_fadam._bytes_per_param(4, 4) == 44
    assert triton_fadam._bytes_per_param(4, 4, weight_decay=False) == 40
    assert triton_fadam._bytes_per_param(2, 4) == 32


# --- CUDA only ----------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or INTERPRETING, reason="needs CUDA and TRITON_INTERPRET=0")
def test_step_is_sync_free():
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (1000, 70_000, 3)]
    opt = FAdam(params, fused=True)
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.grad_scale = torch.tensor(2.0, device="cuda") if step == 2 else None
        opt.found_inf = torch.tensor(0.0, device="cuda") if step == 2 else None
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA or INTERPRETING, reason="needs CUDA and TRITON_INTERPRET=0")
def test_tensor_over_2_pow_31_elements():
    """64-bit offsets: a bf16 tensor of 2**31 + 2**20 + 3 elements (about 26 GB with its grad and fp32 state)."""
    n = 2**31 + 2**20 + 3
    free, _ = torch.cuda.mem_get_info()
    if free < 32 * 2**30:
        pytest.skip("needs ~32 GiB of free GPU memory")
    lr, wd = 0.05, 0.1
    big = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    small = torch.ones(1000, dtype=torch.bfloat16, device="cuda")
    params = [big, small]
    grads = [torch.full_like(big, 0.5), torch.full_like(small, -0.25)]
    exp_avgs = [torch.zeros(t.shape, device="cuda") for t in params]
    fishers = [torch.zeros(t.shape, device="cuda") for t in params]
    steps = [torch.ones((), device="cuda") for _ in params]
    triton_fadam.fadam_triton_(params, grads, exp_avgs, fishers, steps, **dict(HYPER, lr=lr, weight_decay=wd))
    # Constant g, θ = 1 at t = 1: f = g², D = |g| + ε|g|, ḡ ≈ sign(g) (RMS ≈ 1, no clip), m = 0.1 ḡ,
    # w = 1/D has RMS 1/D, clipped to exactly 1, so θ = 1 − lr (0.1 sign(g) + wd).
    for t, g, tail in ((big, 0.5, [0, 2**31 - 1, 2**31, 2**31 + 1, n - 2, n - 1]), (small, -0.25, [0, 999])):
        expected_theta = torch.tensor(1 - lr * (0.1 * math.copysign(1, g) + wd)).to(torch.bfloat16).item()
        idx = torch.tensor(tail, device="cuda")
        assert (t[idx].float() == expected_theta).all(), (t[idx], expected_theta)
        assert bool((t == expected_theta).all())
    for f, g in zip(fishers, (0.5, -0.25)):
        assert bool((f == g * g).all())
    for m, g in zip(exp_avgs, (0.5, -0.25)):
        torch.testing.assert_close(m[-5:], torch.full((5,), 0.1 * math.copysign(1, g), device="cuda"))
