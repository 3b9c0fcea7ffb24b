"""The multi-tensor Triton kernels (hf_fadam/kernels/triton_fadam.py).

Without a GPU they run in Triton's interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET=1 before anything
imports triton); on a GPU machine, ``TRITON_INTERPRET=0 pytest tests/test_kernels_triton.py`` runs the compiled
kernels on CUDA tensors, and the CPU variants skip. Sizes are derived from the active launch configuration so that
tensors straddle block and chunk boundaries in both modes; interpreted tensors stay at a few thousand elements.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from hf_fadam import FAdam
from hf_fadam._rounding import KIND_EXP_AVG, KIND_FISHER, round_stochastic, rounding_seeds
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

    # Two dtype groups in one call with a reduce hook: phase-major, so the hook runs exactly twice.
    launches.clear()
    half = [t.to(torch.bfloat16) for t in params[:2]]
    mixed = [half + params[2:6], [g.to(torch.bfloat16) for g in grads[:2]] + grads[2:6]]
    mixed += [states[0][:6], states[1][:6], steps[:6]]
    triton_fadam.fadam_triton_(*mixed, reduce=lambda buf: launches.append(("reduce", tuple(buf.shape))), **HYPER)
    names = [name for name, _ in launches]
    assert names == ["a", "a", "reduce", "b", "b", "reduce", "c", "c"]
    assert [shape for name, shape in launches if name == "reduce"] == [(1, 6), (2, 6)]


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
    with pytest.raises(ValueError, match="numels has 2 entries for 1 params"):
        triton_fadam.fadam_triton_([a], [a], [a], [a], [a], numels=[4, 4], **HYPER)
    if INTERPRETING:
        ints = [torch.zeros(4, dtype=torch.int32)]
        with pytest.raises(ValueError, match=r"unsupported dtype.*torch.int32.*params"):
            triton_fadam.fadam_triton_(ints, [a], [a], [a], [torch.ones(())], **HYPER)
        with pytest.raises(ValueError, match="grads must have its param's number of elements"):
            triton_fadam.fadam_triton_([a], [torch.zeros(5)], [a], [a], [torch.ones(())], **HYPER)
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


# --- issue 10: per-tensor scalars, tiny and non-finite gradients, dtype pairs, import diagnostics -----------------

_PRECISION = [torch.bfloat16, torch.float16, torch.float32, torch.float64]  # least precise first


def _forloop(lists, hp, **kw):
    from hf_fadam.functional import fadam

    fadam(*lists, foreach=False, **kw, **hp)


def _clone_lists(lists, dtype=None, device=None):
    return [[t.detach().to(device=device or t.device, dtype=dtype or t.dtype, copy=True) for t in ts] for ts in lists]


@pytest.mark.parametrize("device", DEVICES)
def test_every_dtype_pair_in_one_call(device):
    """All 16 (param dtype, state dtype) pairs run (is_supported says so), mixed in ONE call (one dtype group each),
    and match the for-loop reference at the tolerance of the less precise dtype of the pair."""
    pairs = [(pd, sd) for pd in _PRECISION for sd in _PRECISION]
    assert all(triton_fadam.is_supported(pd, sd) for pd, sd in pairs)
    assert not triton_fadam.is_supported(torch.int32, torch.float32)
    gen = torch.Generator().manual_seed(3)
    lists = [[], [], [], [], []]
    for i, (pd, sd) in enumerate(pairs):
        n = 37 + i
        lists[0].append(torch.randn(n, generator=gen).to(device=device, dtype=pd))
        lists[1].append(torch.randn(n, generator=gen).to(device=device, dtype=pd))
        lists[2].append(torch.zeros(n, dtype=sd, device=device))
        lists[3].append(torch.zeros(n, dtype=sd, device=device))
        lists[4].append(torch.zeros((), device=device))
    ref = _clone_lists(lists)
    for _ in range(2):
        torch._foreach_add_(lists[4], 1)
        triton_fadam.fadam_triton_(*lists, **HYPER)
        _forloop(ref, HYPER)
    for i, (pd, sd) in enumerate(pairs):
        low = min(pd, sd, key=_PRECISION.index)
        atol, rtol = tolerance("fused_triton", low)
        for k, name in ((0, "param"), (2, "exp_avg"), (3, "fisher")):
            torch.testing.assert_close(
                lists[k][i].double(), ref[k][i].double(), atol=atol, rtol=rtol, msg=f"{name} of pair {pd}/{sd}"
            )


@pytest.mark.parametrize("device", DEVICES)
def test_fisher_keeps_learning_at_large_steps_with_low_precision_state(device):
    """Issue 10 item 1: β̂2 and 1 - β̂2 stay in fp64 until they meet the data. At t ~ 5000 β̂2 rounds to 1.0 in
    bf16, which would freeze f; here f must follow the float64 transcription of the spec, for bf16, fp16 and fp32
    state (one call, three dtype groups), and fp32 state at t ~ 10**6 checks the in-kernel pow."""
    hp = dict(HYPER, weight_decay=0.0)
    cases = [(torch.bfloat16, 5000), (torch.float16, 5000), (torch.float32, 5000), (torch.float32, 10**6)]
    gen = torch.Generator().manual_seed(11)
    lists = [[], [], [], [], []]
    for sd, t0 in cases:
        lists[0].append(torch.randn(64, generator=gen).to(device))
        lists[1].append(torch.randn(64, generator=gen).to(device))
        lists[2].append(torch.zeros(64, dtype=sd, device=device))
        lists[3].append(torch.full((64,), 1e-3, dtype=sd, device=device))  # a Fisher learnt at |g| ~ 3e-2
        lists[4].append(torch.tensor(float(t0), device=device))
    spec = [[t.detach().cpu().double() for t in ts] for ts in lists[:4]]
    for t in range(1, 11):
        torch._foreach_add_(lists[4], 1)
        triton_fadam.fadam_triton_(*lists, **hp)
        for i, (sd, t0) in enumerate(cases):
            theta, m, f = _spec_step(spec[0][i], spec[1][i], spec[2][i], spec[3][i], t0 + t, **hp)
            # the kernel stores θ, m and f in their dtypes: round the transcription the same way between steps
            steps = torch.tensor([float(t0 + t)])  # 16-bit state is stored stochastically (hf_fadam._rounding)
            m = round_stochastic(m.float(), sd, rounding_seeds([i], steps, KIND_EXP_AVG))
            f = round_stochastic(f.float(), sd, rounding_seeds([i], steps, KIND_FISHER))
            spec[0][i], spec[2][i], spec[3][i] = theta.float().double(), m.double(), f.double()
    for i, (sd, t0) in enumerate(cases):
        f = lists[3][i].cpu().double()
        assert f.mean() > 5e-3, f"f froze at t={t0} with {sd} state"  # 10 steps at |g| ~ 1 add ~ 1e-2
        atol, rtol = tolerance("fused_triton", sd)
        torch.testing.assert_close(f, spec[3][i], atol=atol, rtol=rtol, msg=f"fisher, {sd} state, t0={t0}")
        torch.testing.assert_close(lists[0][i].cpu().double(), spec[0][i], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rms_g", [1e-12, 1e-20])
def test_tiny_gradients_fp32_matches_fp64(device, rms_g):
    """Issue 10 item 4: RMS(g) = 1e-20 with one zero element gives ε̂ = 1e-28 and θ/D ~ 1e28 there; its square
    overflows fp32 (and g² underflows it). The kernels square and sum in float64, so fp32 params/state match the
    float64 for-loop reference, and the decay of the whole tensor is not lost."""
    gen = torch.Generator().manual_seed(5)
    n = 300
    theta = torch.randn(n, generator=gen)
    # |g| within a factor 2 of rms_g: g² stays within fp32's subnormal range with ~5 digits (f is STORED in fp32,
    # so an element 100x below the RMS would carry f's storage rounding, identical in the fp32 for-loop)
    g = rms_g * (1 + torch.rand(n, generator=gen)) * torch.randn(n, generator=gen).sign()
    g[7] = 0.0
    lists = [
        [theta.to(device, copy=True)],
        [g.to(device)],
        [torch.zeros(n, device=device)],
        [torch.zeros(n, device=device)],
    ]
    lists.append([torch.zeros((), device=device)])
    ref = _clone_lists(lists, dtype=torch.float64, device="cpu")
    ref[4] = [torch.zeros((), dtype=torch.float32)]
    ref32 = _clone_lists(lists, device="cpu")
    for _ in range(3):
        torch._foreach_add_(lists[4], 1)
        triton_fadam.fadam_triton_(*lists, **HYPER)
        _forloop(ref, HYPER)
        _forloop(ref32, HYPER)
    torch.testing.assert_close(lists[0][0].cpu(), ref32[0][0], atol=1e-5, rtol=1e-4, msg="vs the fp32 for-loop")
    got = lists[0][0].cpu().double()
    assert torch.isfinite(got).all()
    # the zero-gradient element moves by the clipped decay (fp64: about -lr * wd * sqrt(n) * sign(θ) per step)
    assert abs(got[7] - theta[7].double()) > 1e-3
    atol, rtol = tolerance("fused_triton", torch.float32)
    torch.testing.assert_close(got, ref[0][0], atol=atol, rtol=rtol)
    torch.testing.assert_close(lists[2][0].cpu().double(), ref[2][0], atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_gradient_makes_the_tensor_nan_like_forloop(device):
    """Issue 10 item 5, the decided semantics: IEEE propagation through the per-tensor RMS. A NaN or an inf element
    makes Σ(g/D)² NaN, and max(1, RMS/c) must keep the NaN (compiled tl.maximum would drop it), so θ and m of the
    whole tensor become NaN, exactly as in the for-loop; other tensors of the same call are untouched by it."""
    gen = torch.Generator().manual_seed(9)
    n = 700
    lists = [[], [], [], [], []]
    for bad in (float("nan"), float("inf"), None):
        g = torch.randn(n, generator=gen)
        if bad is not None:
            g[123] = bad
        lists[0].append(torch.randn(n, generator=gen).to(device))
        lists[1].append(g.to(device))
        lists[2].append(torch.zeros(n, device=device))
        lists[3].append(torch.zeros(n, device=device))
        lists[4].append(torch.zeros((), device=device))
    ref = _clone_lists(lists, device="cpu")
    torch._foreach_add_(lists[4], 1)
    triton_fadam.fadam_triton_(*lists, **HYPER)
    _forloop(ref, HYPER)
    for i in range(3):
        for k in (0, 2, 3):
            torch.testing.assert_close(lists[k][i].cpu(), ref[k][i], equal_nan=True, atol=1e-5, rtol=1e-4)
    assert torch.isnan(lists[0][0]).all() and torch.isnan(lists[0][1]).all() and torch.isnan(lists[2][1]).all()
    assert torch.isfinite(lists[0][2]).all()


def test_missing_numpy_under_the_interpreter_is_named():
    """Issue 10: with triton installed but numpy missing, TRITON_INTERPRET=1 fails inside `import triton`; the
    message must name numpy, not claim that Triton is not importable."""
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "import torch\n"
        "from hf_fadam.kernels import triton_fadam as t\n"
        "assert not t.is_available()\n"
        "reason = t.unavailable_reason()\n"
        "assert 'numpy' in reason and 'pip install numpy' in reason, reason\n"
        "from hf_fadam.functional import _fused_kernel\n"
        "try:\n"
        "    _fused_kernel(torch.device('cpu'))\n"
        "except RuntimeError as exc:\n"
        "    assert 'numpy' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", HF_FADAM_CPU_FUSED_BACKEND="triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True, env=env, cwd=root)


_PTX_SCRIPT = r"""
import inspect, json, re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hf_fadam.kernels import triton_fadam as m

values = dict(P_DT=tl.float32, G_DT=tl.float32, M_DT=tl.float32, F_DT=tl.float32, S_DT=tl.float32, CDT=tl.float32,
              HAS_SCALE=False, HAS_FOUND=False, HAS_WD=True, MAXIMIZE=False, P_MODE=0, INTERPRET=False, ALIGNED=True,
              CHUNK=16384, BLOCK=1024)
types = dict(meta_ptr="*i64", addr_ptr="*i64", sums_ptr="*fp64", scale_ptr="*fp64", found_ptr="*fp64",
             scalars_ptr="*fp64", n_tensors="i32", n_chunks="i32", n_cols="i32")
fn = m._pass_c
names = list(inspect.signature(fn.fn).parameters)
signature = {k: ("constexpr" if k in values else types.get(k, "fp32")) for k in names}
src = ASTSource(fn=fn, signature=signature, constexprs={k: v for k, v in values.items() if k in names})
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
count = lambda pat: len(re.findall(pat, ptx))
print(json.dumps(dict(
    max_f=count(r"\bmax(\.NaN)?\.f(32|64)\b"),
    ordered_le=count(r"setp\.le\.f64"),
    ftz_math=count(r"\b(mul|fma|add|sub|div|sqrt)(\.\w+)*\.ftz\.f32"),
    vector_loads=count(r"ld\.global(\.\w+)*\.v4"),
)))
"""


@pytest.mark.skipif(not INTERPRETING, reason="the compiled semantics are tested on the GPU itself")
def test_compiled_ptx_keeps_nan_and_subnormals():
    """Without a GPU, compile pass C for sm_90 (Triton builds PTX without a device) and check what the interpreter
    cannot show: the clip divisors are an ordered compare + select (a NaN reaches the whole tensor), not max.f32,
    which drops NaN; the fp32 element math does not flush subnormals (g² ~ 1e-40 for RMS(g) ~ 1e-20); and the
    aligned full blocks use 16-byte vector loads."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _PTX_SCRIPT], env=env, cwd=root, capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"Triton cannot build CUDA code here: {proc.stderr.strip().splitlines()[-1:]}")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["max_f"] == 0, found
    assert found["ordered_le"] >= 2, found  # RMS(ḡ)/c and RMS(w)/c: setp.le + selp
    assert found["ftz_math"] == 0, found
    assert found["vector_loads"] > 0, found


# --- issue 11: logical numels and the reduce hook; the cached plan --------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_shards_with_numels_and_reduce_match_the_whole_tensors(device):
    """Each tensor is split in two "shards" stepped by two calls that see only their shard, with the logical
    numels and a reduce hook. The hook checks what the contract promises (called twice per call, float64 (1, n)
    then (2, n) on the device, column i = tensor i, the local partial sums in phase 1) and then writes the
    whole-tensor sums recorded from the for-loop reference in place. Each shard must then equal the reference's
    update of those elements. Mixed dtypes (two groups), an empty shard, and found_inf (hook still called twice)."""
    gen = torch.Generator().manual_seed(21)
    sizes = [1500, 40, 3, 700]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]
    cuts = [600, 40, 0, 350]  # shard 0 = [:cut], shard 1 = [cut:]; tensor 1 has an empty shard 1
    full = [[], [], [], [], []]
    for n, dt in zip(sizes, dtypes):
        full[0].append(torch.randn(n, generator=gen).to(device=device, dtype=dt))
        full[1].append(torch.randn(n, generator=gen).mul(10.0 ** float(torch.randint(-3, 2, (), generator=gen)))
                       .to(device=device, dtype=dt))  # fmt: skip
        full[2].append(torch.zeros(n, device=device))
        full[3].append(torch.zeros(n, device=device))
        full[4].append(torch.zeros((), device=device))
    shards = [
        [[t[:c].clone() for t, c in zip(ts, cuts)] for ts in full[:4]] + [[s.clone() for s in full[4]]],
        [[t[c:].clone() for t, c in zip(ts, cuts)] for ts in full[:4]] + [[s.clone() for s in full[4]]],
    ]
    ref = _clone_lists(full, device="cpu")
    for _step in range(2):
        recorded = []
        _forloop(ref, HYPER, reduce=lambda buf, recorded=recorded: recorded.append(buf.clone()))
        assert [tuple(b.shape) for b in recorded] == [(1, 4), (2, 4)]
        for lists in shards:
            calls = []

            def reduce(buf, lists=lists, calls=calls, recorded=recorded):
                assert buf.dtype == torch.float64 and buf.device.type == torch.device(device).type
                if not calls:  # phase 1: the local Σg², column i = tensor i (the empty shard gives 0)
                    local = torch.stack([g.double().square().sum() for g in lists[1]])
                    torch.testing.assert_close(buf[0].cpu(), local.cpu(), rtol=1e-12, atol=0)
                calls.append(tuple(buf.shape))
                buf.copy_(recorded[len(calls) - 1].to(buf.device))

            torch._foreach_add_(lists[4], 1)
            triton_fadam.fadam_triton_(*lists, numels=sizes, reduce=reduce, **HYPER)
            assert calls == [(1, 4), (2, 4)]
        for i, dt in enumerate(dtypes):
            for kk, name in ((0, "param"), (2, "exp_avg"), (3, "fisher")):
                got = torch.cat([shards[0][kk][i].cpu(), shards[1][kk][i].cpu()]).double()
                atol, rtol = tolerance("fused_triton", dt if kk == 0 else torch.float32)
                torch.testing.assert_close(got, ref[kk][i].double(), atol=atol, rtol=rtol, msg=f"{name} {i}")
    # found_inf: nothing moves, and the hook is still called twice (on zeros)
    calls = []
    before = [t.clone() for t in shards[0][0]]
    triton_fadam.fadam_triton_(
        *shards[0], numels=sizes, reduce=lambda buf: calls.append(float(buf.abs().sum())), **HYPER,
        found_inf=torch.ones((), device=device),
    )  # fmt: skip
    assert calls == [0.0, 0.0]
    assert all(torch.equal(a, b) for a, b in zip(before, shards[0][0]))


@pytest.mark.parametrize("device", DEVICES)
def test_cached_plan_follows_moved_and_restrided_grads(device, monkeypatch):
    """The plan is cached by addresses and sizes. A second step hits it; new grads at new addresses reuse the
    cached grouping (no new validation and grouping, only new address tables), and a grad re-strided under the
    SAME address (a transposed view of one buffer) is rebuilt; every step must give the reference result."""
    builds = []
    real_build = triton_fadam._build_plan

    def counting_build(*args, **kwargs):
        builds.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(triton_fadam, "_build_plan", counting_build)
    gen = torch.Generator().manual_seed(4)
    theta = torch.randn(30, 20, generator=gen).to(device)
    lists = [[theta], [None], [torch.zeros_like(theta)], [torch.zeros_like(theta)], [torch.zeros((), device=device)]]
    ref = _clone_lists([lists[0], [theta], *lists[2:]], device="cpu")
    buf = torch.randn(600, generator=gen).to(device)
    grads = [
        buf.view(30, 20),  # contiguous
        buf.view(30, 20),  # same addresses: plan cache hit
        torch.randn(30, 20, generator=gen).to(device),  # moved
        buf.view(20, 30).t(),  # same address as the first grad, other layout
    ]
    for i, g in enumerate(grads):
        lists[1] = [g]
        ref[1] = [g.cpu()]
        builds.clear()
        torch._foreach_add_(lists[4], 1)
        triton_fadam.fadam_triton_(*lists, **HYPER)
        _forloop(ref, HYPER)
        if i in (1, 2):
            assert not builds, "same tensors, or only the grads moved: the cached grouping must be reused"
        if i == 3:
            assert builds, "a grad re-strided under the same address must not hit the contiguous plan"
        atol, rtol = tolerance("fused_triton", torch.float32)
        torch.testing.assert_close(lists[0][0].cpu(), ref[0][0], atol=atol, rtol=rtol)
        torch.testing.assert_close(lists[3][0].cpu(), ref[3][0], atol=atol, rtol=rtol)

    # Freed memory is reused: tensors of another dtype at the SAME addresses with the same sizes must not hit the
    # plan of the first ones (here: fp32, then bf16 views of the very same buffers).
    n = 500
    raw = [torch.zeros(4 * n, dtype=torch.uint8, device=device) for _ in range(4)]
    step = torch.ones((), device=device)
    for dtype in (torch.float32, torch.bfloat16):
        views = [r.view(dtype)[:n] for r in raw]
        views[0].copy_(torch.randn(n, generator=gen))
        views[1].copy_(torch.randn(n, generator=gen))
        views[2].zero_()
        views[3].zero_()
        lists = [[v] for v in views] + [[step.fill_(1.0)]]
        ref = _clone_lists(lists, device="cpu")
        triton_fadam.fadam_triton_(*lists, **HYPER)
        ref[4][0].zero_()  # the for-loop increments the step itself
        _forloop(ref, HYPER)
        atol, rtol = tolerance("fused_triton", dtype)
        torch.testing.assert_close(lists[0][0].cpu(), ref[0][0], atol=atol, rtol=rtol, msg=str(dtype))


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
