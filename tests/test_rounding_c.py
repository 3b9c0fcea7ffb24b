"""The C kernel's stores (``_fadam_cpu.c``) against :mod:`hf_fadam._rounding` and the for-loop reference.

1. The kernel's stochastic store (``cpu_fused.store_stochastic``) and its seeds, bit for bit the torch functions,
   over values chosen at the bf16/fp16 edges (binades, fp16 subnormals, beyond fp16's range, ±0, NaN, inf).
2. Trajectories of ``fadam(fused=True)`` against ``fadam(foreach=False)``: bf16/fp16 params × nearest/stochastic/
   kahan × fp32/bf16/fp16 state, with and without the reduce hook (three passes, several dtype groups), odd shapes,
   zero-size, a transposed view and a tensor split across threads. Within the tolerances, and with nearly all 16-bit
   outputs identical (the same bits round the same float32 values; rounding to nearest, or other bits, would leave
   only 2/3 to 3/4 of the state and param codes of these trajectories identical).
3. A resumed run (state dict with the Kahan residual) continues bit for bit on the fused path.
4. The dispatch: ``fused=True`` with a rounding mode runs the kernel, and ``fused=None`` picks it.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch

from hf_fadam import FAdam
from hf_fadam._rounding import KIND_EXP_AVG, KIND_FISHER, KIND_PARAM, round_stochastic, rounding_seeds
from hf_fadam.functional import fadam
from hf_fadam.kernels import cpu_fused

from _tolerances import tolerance


pytestmark = pytest.mark.skipif(not cpu_fused.is_available(), reason="no working C compiler for the CPU kernel")

SIXTEEN = (torch.bfloat16, torch.float16)
BIG = 70_001  # > the kernel's SMALL_NUMEL (65536): split across the threads
STEPS = 4


@pytest.fixture(autouse=True)
def _c_backend(monkeypatch):
    monkeypatch.setenv("HF_FADAM_CPU_FUSED_BACKEND", "c")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@contextmanager
def _threads(n: int):
    """``n`` threads for torch and the kernel (which takes torch.get_num_threads()); the references run on one,
    which keeps them fast on a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype in SIXTEEN else t


def _assert_same_codes(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal 16-bit codes, except that any NaN matches any NaN (torch's NaN payloads depend on the cast's path)."""
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), f"{what}: NaN positions differ"
    a, e = _bits(actual)[~nan], _bits(expected)[~nan]
    bad = (a != e).nonzero().flatten()
    assert bad.numel() == 0, f"{what}: {bad.numel()} codes differ, first at {bad[:5].tolist()}"


# ----------------------------------------------------------------------------------------- 1. the stores and seeds


def _edge_values() -> torch.Tensor:
    """float32 values at every edge of the two stores, each repeated so that many random bits meet it."""
    f32 = torch.float32
    tiny = torch.finfo(f32).tiny
    vals = [0.0, -0.0, float("nan"), -float("nan"), float("inf"), -float("inf"), torch.finfo(f32).max, tiny]
    vals += [tiny / 8, 1.5e-45, torch.finfo(f32).max * 0.99999]  # float32 subnormals, beyond bf16's largest
    for dt in SIXTEEN:
        fi = torch.finfo(dt)
        vals += [fi.max, fi.tiny, fi.smallest_normal, fi.eps]
    # fp16: its largest value and what lies beyond it (65504 < x < 65520 rounds to 65504 to nearest, more to inf)
    vals += [65503.0, 65504.0, 65504.5, 65519.0, 65520.0, 65535.9, 65536.0, 1e5, 1e30]
    # fp16's subnormal range (a grid of 2^-24) and its edge to the normal range at 2^-14
    sub = 2.0**-24
    vals += [sub, sub / 2, sub / 3, 1.5 * sub, 7.25 * sub, 1023.5 * sub, 1023.99 * sub]
    vals += [2.0**-14, 2.0**-14 * (1 - 2**-12), 2.0**-14 * (1 - 2**-20)]
    base = torch.tensor(vals, dtype=f32)
    # NaNs whose payload sits in the low mantissa bits only (adding the random bits must not make them inf or 0)
    nans = torch.tensor([0x7F800001, 0x7F80FFFF, 0x7FBFFFFF, -0x007FFFFF, -1], dtype=torch.int32).view(f32)
    assert nans.isnan().all()
    base = torch.cat([base, nans])
    # binade edges: powers of two, and their float32 neighbours on both sides, across bf16's and fp16's ranges
    pw = torch.tensor([2.0**e for e in range(-30, 17)] + [2.0**e for e in (-133, -126, -100, 60, 100, 127)], dtype=f32)
    edges = torch.cat([pw, torch.nextafter(pw, torch.zeros_like(pw)), torch.nextafter(pw, pw * 4)])
    # values just below/above a bf16 code and halfway between codes (the carry into the next binade)
    codes = torch.tensor([1.0, 1.9921875, 3.0, 255.0, 65280.0, 1e-3, 0.1], dtype=torch.bfloat16).float()
    between = torch.cat([codes, codes * (1 + 2.0**-9), codes * (1 + 2.0**-8 - 2.0**-20)])
    x = torch.cat([base, edges, between])
    x = torch.cat([x, -x])
    return x.repeat(64)  # each value at 64 indices: 64 different random draws


def _random_values() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    mag = torch.exp2(torch.empty(200_000).uniform_(-30, 18, generator=gen))
    return (torch.randn(200_000, generator=gen).sign() * mag).float()


@pytest.mark.parametrize("dtype", SIXTEEN, ids=str)
@pytest.mark.parametrize("seed", [0, 1, 0x9E3779B9, 0xFFFFFFFF])
def test_store_stochastic_matches_round_stochastic(dtype, seed):
    for name, x in (("edges", _edge_values()), ("random", _random_values())):
        got = cpu_fused.store_stochastic(x, dtype, seed)
        expected = round_stochastic(x, dtype, seed)
        assert got.dtype == dtype and got.shape == x.shape
        _assert_same_codes(got, expected, f"{name} {dtype} seed {seed:#x}")
    # meaningful: stochastic, not to nearest, and the bits depend on the seed
    x = _random_values()
    got = cpu_fused.store_stochastic(x, dtype, seed)
    assert (_bits(got) != _bits(x.to(dtype))).float().mean() > 0.2
    other = cpu_fused.store_stochastic(x, dtype, seed ^ 1)
    assert (_bits(got) != _bits(other)).float().mean() > 0.2


def test_store_stochastic_is_unbiased_and_finite_in_range():
    x = torch.full((1 << 16,), 1.0 + 2.0**-10, dtype=torch.float32)  # a quarter of a bf16 ulp above 1
    mean = cpu_fused.store_stochastic(x, torch.bfloat16, 7).double().mean()
    assert abs(mean - x[0].double()) < 2.0**-12
    top = torch.full((4096,), 65504.0 * (1 + 2.0**-12), dtype=torch.float32)  # within 65504's rounding range
    assert cpu_fused.store_stochastic(top.clamp(max=65504.0), torch.float16, 3).isfinite().all()


def test_rounding_seeds_match():
    steps = torch.tensor([1.0, 2.0, 3.0, 1000.0, 2.0**24, 0.0, 5.0], dtype=torch.float32)
    kinds = (KIND_PARAM, KIND_EXP_AVG, KIND_FISHER)
    for streams in (None, [0, 1, 2, 3, 4, 5, 6], [7, 3, 2**31, 2**32 + 5, 2**40, 11, 0]):
        expected = torch.stack([rounding_seeds(streams, steps, kind) for kind in kinds])
        assert torch.equal(cpu_fused._rounding_seeds(streams, steps), expected), streams


# ----------------------------------------------------------------------------------- 2. trajectories vs for-loop

CONFIGS = [  # (hyperparameters, which exercise each template variant: p = 0.5 or not, weight decay on or off)
    dict(lr=2e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, clip=1.0, p=0.5, maximize=False),
    dict(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05, clip=0.5, p=0.25, maximize=True),
    dict(lr=3e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, clip=1.0, p=0.5, maximize=False),
]


def _tensors(pdt: torch.dtype, mixed: bool) -> list[torch.Tensor]:
    """Odd shapes, zero-size, 0-d, a transposed (dense, non-contiguous) view and a tensor split across threads;
    ``mixed``: every other one in the other 16-bit dtype (several dtype groups in one kernel call)."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(5, 7), (0, 3), (), (BIG,), (9, 6), (127,), (33, 65)]
    out = []
    for i, shape in enumerate(shapes):
        dt = (SIXTEEN[1] if pdt == SIXTEEN[0] else SIXTEEN[0]) if mixed and i % 2 else pdt
        t = (torch.randn(shape, generator=gen) * 0.5).to(dt)
        out.append(t.t().contiguous().t() if shape == (9, 6) else t)
    assert not out[4].is_contiguous()
    return out


def _grads(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for i, p in enumerate(params):
        gen = torch.Generator().manual_seed(100 * step + i)
        scale = 10.0 ** (i % 3 - 1)  # 0.1, 1, 10: RMS(g) both sides of 1
        out.append((scale * torch.randn(p.shape, generator=gen)).to(p.dtype))
    return out


def _trajectory(impl: str, params, sdt, mode, config, reduce_calls):
    params = [p.clone() for p in params]  # (clone keeps the transposed view's strides)
    exp_avgs = [torch.zeros_like(p, dtype=sdt) for p in params]
    fishers = [torch.zeros_like(p, dtype=sdt) for p in params]
    comps = [torch.zeros_like(p) for p in params] if mode == "kahan" else None
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    streams = [3 * i + 1 for i in range(len(params))]

    def reduce(buf):
        reduce_calls.append(buf.shape)

    flags = {"fused": True} if impl == "fused" else {"foreach": False}
    history = []
    for step in range(STEPS):
        grads = _grads(step, params)
        # the kernel on two threads, so that BIG is split (two slices with their own element indices)
        with _threads(2 if impl == "fused" else 1):
            fadam(params, grads, exp_avgs, fishers, steps, **flags, **config, param_rounding=mode,
                  param_comps=comps, streams=streams, reduce=None if reduce_calls is None else reduce)  # fmt: skip
        snap = {"param": [p.clone() for p in params], "exp_avg": [m.clone() for m in exp_avgs]}
        snap["fisher"] = [f.clone() for f in fishers]
        if comps is not None:
            snap["comp"] = [c.clone() for c in comps]
        history.append(snap)
    return history


def _compare(actual, expected, sdt):
    """Within tolerance, and the fraction of identical 16-bit codes (over all steps, per kind of tensor)."""
    fractions = {}
    for step, (snap_a, snap_e) in enumerate(zip(actual, expected)):
        for name in snap_e:
            for i, (a, e) in enumerate(zip(snap_a[name], snap_e[name])):
                what = f"step {step}, tensor {i}, {name}"
                assert a.dtype == e.dtype and a.shape == e.shape and a.stride() == e.stride(), what
                if name == "comp":  # a residual: compared through θ + c below, and its codes are counted
                    theta_a = snap_a["param"][i].float() + a.float()
                    theta_e = snap_e["param"][i].float() + e.float()
                    # (16-bit state: a flipped rounding of f or m moves the update by up to half the state's ulp)
                    tol = _tol("kahan_theta", a.dtype) if sdt not in SIXTEEN else _tol("dtype_pair", sdt)
                    msg = lambda m, w=what: f"{w} (θ + c): {m}"  # noqa: E731
                    torch.testing.assert_close(theta_a, theta_e, **tol, msg=msg)
                else:
                    dt = e.dtype if name == "param" else sdt
                    atol, rtol = tolerance("fused_c", dt) if name == "param" else tolerance("dtype_pair", dt)
                    torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m, w=what: f"{w}: {m}")
                if e.dtype in SIXTEEN and e.numel():
                    same, total = fractions.get(name, (0, 0))
                    fractions[name] = (same + int((_bits(a) == _bits(e)).sum()), total + e.numel())
    return {name: same / total for name, (same, total) in fractions.items()}


def _tol(key: str, dtype: torch.dtype) -> dict:
    atol, rtol = tolerance(key, dtype)
    return {"atol": atol, "rtol": rtol}


STATE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("with_reduce", [False, True], ids=["one_call", "reduce"])
@pytest.mark.parametrize("sdt", STATE_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["nearest", "stochastic", "kahan"])
@pytest.mark.parametrize("pdt", SIXTEEN, ids=str)
def test_trajectory_matches_forloop(pdt, mode, sdt, with_reduce):
    # each (param dtype, mode) meets every config twice over its six (state dtype, reduce) cases
    config = CONFIGS[(STATE_DTYPES.index(sdt) + with_reduce) % len(CONFIGS)]
    params = _tensors(pdt, mixed=with_reduce)  # with a reduce: one call over both 16-bit dtypes (columns, seeds)
    calls = [] if with_reduce else None
    fused = _trajectory("fused", params, sdt, mode, config, calls)
    if with_reduce:
        assert calls == [torch.Size([1, len(params)]), torch.Size([2, len(params)])] * STEPS
    ref = _trajectory("forloop", params, sdt, mode, config, [] if with_reduce else None)
    fractions = _compare(fused, ref, sdt)
    # Nearly every code identical: the paths' float32 values differ in the last bits at most (reciprocal 1/D),
    # which changes a 16-bit store only where it crosses a rounding boundary (a changed element stays changed in
    # later steps). Rounding to nearest instead of stochastically, or other random bits, would leave ~2/3 (states)
    # to ~3/4 (params) of them identical here.
    for name, fraction in fractions.items():
        assert fraction > 0.97, f"{name}: only {fraction:.4f} of the 16-bit codes are identical ({config})"
    if mode != "nearest":  # and the mode mattered: its stores differ from rounding to nearest
        nearest = _trajectory("fused", params, sdt, "nearest", config, None)
        moved = [(a != b).float().mean() for a, b in zip(fused[-1]["param"], nearest[-1]["param"]) if a.numel()]
        assert max(moved) > 0.05


def test_kahan_comp_is_the_residual():
    """With kahan, c is what rounding θ + c to nearest drops: RNE(θ + c) = θ, or a tie (c half the spacing: θ + 2c
    is the neighbour on c's side)."""
    params = _tensors(torch.bfloat16, mixed=False)
    traj = _trajectory("fused", params, torch.float32, "kahan", CONFIGS[0], None)
    for p, c in zip(traj[-1]["param"], traj[-1]["comp"]):
        p, c = p.float(), c.float()
        tie = ((p + 2 * c).to(torch.bfloat16).float() == p + 2 * c) & (c != 0)
        assert (((p + c).to(torch.bfloat16).float() == p) | tie).all()
    assert any(c.abs().max() > 0 for c in traj[-1]["comp"] if c.numel())


# ---------------------------------------------------------------------------------------- 3. resume, 4. dispatch


def _model(pdt):
    gen = torch.Generator().manual_seed(5)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.3).to(pdt)) for s in [(17, 9), (BIG,), (4,)]]


def _steps(opt, params, start, n):
    for step in range(start, start + n):
        for p, g in zip(params, _grads(step, params)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize(
    "mode,state_dtype", [("kahan", None), ("kahan", torch.bfloat16), ("stochastic", torch.float16)]
)
def test_resume_is_bit_exact(mode, state_dtype):
    kw = dict(lr=1e-2, weight_decay=0.1, fused=True, param_rounding=mode, state_dtype=state_dtype)
    params = _model(torch.bfloat16)
    opt = FAdam(params, **kw)
    _steps(opt, params, 0, 3)
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    if mode == "kahan":
        assert all("param_comp" in opt.state[p] for p in params)
    _steps(opt, params, 3, 3)  # the uninterrupted run

    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = FAdam(resumed, **kw)
    opt2.load_state_dict(saved)
    _steps(opt2, resumed, 3, 3)
    for a, b in zip(resumed, params):
        assert torch.equal(_bits(a.detach()), _bits(b.detach()))
        for key, value in opt.state[b].items():
            assert torch.equal(_bits(opt2.state[a][key]), _bits(value)), key


def test_fused_true_runs_the_kernel_and_fused_none_picks_it(monkeypatch):
    calls = []
    kernel = cpu_fused.fadam_cpu_

    def counting(*args, **kwargs):
        calls.append(kwargs["param_rounding"])
        return kernel(*args, **kwargs)

    counting.__module__ = cpu_fused.__name__  # (functional reads SUPPORTS_ROUNDING from the kernel's module)
    monkeypatch.setattr(cpu_fused, "fadam_cpu_", counting)
    for fused in (True, None):
        for pdt, kw in [
            (torch.bfloat16, {}),  # auto
            (torch.float16, {"param_rounding": "stochastic"}),
            (torch.float16, {"param_rounding": "kahan"}),
            (torch.bfloat16, {"param_rounding": "nearest", "state_dtype": torch.bfloat16}),
            (torch.float32, {"state_dtype": torch.float16}),
        ]:
            params = _model(pdt)
            opt = FAdam(params, lr=1e-2, fused=fused, **kw)
            assert opt.describe_implementation() == "fused (C kernel, cpu)"
            ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            ref = FAdam(ref_params, lr=1e-2, foreach=False, **kw)
            calls.clear()
            _steps(opt, params, 0, 2)
            _steps(ref, ref_params, 0, 2)
            assert len(calls) == 2  # one kernel call per step
            for a, b in zip(params, ref_params):
                torch.testing.assert_close(a, b, **_tol("fused_c", pdt))
