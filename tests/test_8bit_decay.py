"""FAdam8bit's m decays, and one huge gradient element keeps its tensor finite, on every path.

1. An element whose gradient stops while the rest of its quantization block stays active: m ← β1·m must reach 0.
   With m's codes rounded to nearest it did not: in the subnormal range of the m map (codes below 16, a grid of step
   2**-10 of the block's VMAX) 0.9·q rounds back to q for q ≤ 4, so m stuck at ~2e-3 of the block's absmax and the
   weight drifted lr·|m| every step, forever. m's subnormal codes now round stochastically (unbiased, with m's own
   random bits), so E[q] decays by β1 a step and q reaches 0, where it stays. The requirement checked here: the mean
   |movement| of such elements over a window that starts 2000 steps after their gradient stopped is at most
   max(1e-4, 10x fp32 FAdam's); the reference with m rounded to nearest exceeds it (the test sees the bug).
2. A finite gradient element above sqrt(FLT_MAX) (~1.8e19: g² overflows float32): fp32 FAdam's f becomes inf, D inf,
   and the element's update 0; the tensor stays finite. FAdam8bit's block scale of sqrt(f) became inf and the whole
   tensor NaN at the next step; the scale is now clamped (_quant.F_MAX_S), the element stored as code 255.
"""

from __future__ import annotations

import pytest
import torch
from test_8bit import _clone, _compare, _need_interpreted_triton, _step, needs_c
from test_8bit_edges import TINY, _state_with_a_subnormal_m_block

import hf_fadam._quant_step as quant_step
from hf_fadam import FAdam
from hf_fadam._quant import F_MAX_S, M_FORMAT, dequantize_blockwise, lowbias32, quantize_blockwise, sr_bits, sr_seeds
from hf_fadam._rounding import KIND_EXP_AVG, rounding_seeds
from hf_fadam.kernels import cpu_fused_8bit


VMAX = M_FORMAT.vmax
STEP = 2.0**-10  # the m map's subnormal code step (relative to the block's scale)


# ------------------------------------------------------------------------------------------------------ the map


def test_m_subnormal_rounding_is_unbiased_and_nearest_is_not():
    """2**16 copies of u = 2.3 code steps: stochastic rounding gives codes 2 and 3, mean 2.3; nearest always 2."""
    u = torch.full((1 << 16,), 2.3 * STEP)
    q = M_FORMAT.encode(u, sr_bits(u.numel(), 77))
    assert set(q.unique().tolist()) == {2, 3}
    assert float(q.double().mean()) == pytest.approx(2.3, abs=4 * (0.21 / u.numel()) ** 0.5)
    assert torch.equal(M_FORMAT.encode(u), torch.full_like(q, 2))
    # the normal range still rounds to nearest, random bits or not
    normal = M_FORMAT.table()[16:].repeat(4) * (1 + 2.0**-7)
    assert torch.equal(M_FORMAT.encode(normal, sr_bits(normal.numel(), 5)), M_FORMAT.encode(normal))


def test_m_code_decays_to_zero_under_beta1():
    """One element's m, ×0.9 per step with the block's scale fixed: from code 4 it reaches 0 with stochastic rounding
    (and stays there) in every one of 1000 trials, within 150 steps; to nearest it never leaves code 4."""
    trials, steps = 1000, 150
    seeds = sr_seeds(torch.arange(trials), torch.ones(trials))
    q = torch.full((trials,), 4, dtype=torch.int32)
    q_rtn = q.clone()
    for t in range(steps):
        bits = sr_bits(1, lowbias32(seeds ^ (t + 1))[:, None])[:, 0]  # one element, a fresh seed per step
        q = M_FORMAT.encode(M_FORMAT.decode(q) * 0.9, bits)
        q_rtn = M_FORMAT.encode(M_FORMAT.decode(q_rtn) * 0.9)
    assert (q == 0).all()
    assert (q_rtn == 4).all()


def test_m_bits_are_not_fs_bits():
    """m's codes draw their bits from their own seed (_rounding's KIND_EXP_AVG), independent of f's."""
    f_seed = sr_seeds([3], torch.tensor([12.0]))
    m_seed = rounding_seeds([3], torch.tensor([12.0]), KIND_EXP_AVG)
    assert int(m_seed) == int(lowbias32(f_seed ^ KIND_EXP_AVG))
    a, b = (sr_bits(1 << 16, s) >> 16 for s in (f_seed, m_seed))
    corr = torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1]
    assert abs(float(corr)) < 4 / 2**8


@needs_c
@pytest.mark.parametrize("seed", [0x9E3779B1, 12345])
def test_c_m_encoders_match_torch_with_random_bits(seed):
    """The kernel's scalar and AVX-512 m encoders with random bits equal the torch map bit for bit: random values
    over every binade, the code midpoints, and every 97th float32 below the normal range (2**-6)."""
    gen = torch.Generator().manual_seed(4)
    u = torch.rand(200_000, generator=gen) * VMAX * torch.exp2(-torch.randint(0, 30, (200_000,), generator=gen))
    table = M_FORMAT.table()
    u = torch.cat([u, table, (table[1:] + table[:-1]) / 2, torch.tensor([0.0, VMAX])])
    chunks = [u] + [
        torch.arange(lo, min(lo + (1 << 24) * 97, 0x3C800000), 97, dtype=torch.int32).view(torch.float32)
        for lo in range(0, 0x3C800000, (1 << 24) * 97)
    ]
    for x in chunks:
        want = M_FORMAT.encode(x, sr_bits(x.numel(), seed))
        assert torch.equal(cpu_fused_8bit.encode(x, True, seed=seed), want)
        simd = cpu_fused_8bit.encode_m_simd(x, seed)
        if simd is not None:
            assert torch.equal(simd.to(torch.int32), want)


# ------------------------------------------------------------------------------------------------------ m decays

BOUND = 1e-4  # max(1e-4, 10x fp32 FAdam's movement), fp32's being 0 here (its m underflows to 0)


def _grads(n, t, active, stopped):
    gen = torch.Generator().manual_seed(10_000 + t)
    sign = torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0)
    g = sign * (1 + 0.3 * torch.randn(n, generator=gen))  # consistent gradients: m ≈ ±1 (the case)
    return torch.where(stopped, torch.zeros(()), g) if t >= active else g


def _decay_run(impl, *, n_blocks, block, active, settle, window, simd=True):
    """Steps an 8-bit (impl) or fp32 FAdam (impl == "fp32") tensor; every 8th element's gradient stops after
    ``active`` steps. Returns the mean |movement| of those elements over ``window`` steps from ``settle`` steps after
    the stop, and over the ``settle`` steps themselves."""
    n = n_blocks * block
    theta = torch.randn(n, generator=torch.Generator().manual_seed(1)) * 0.1
    stopped = torch.zeros(n, dtype=torch.bool)
    stopped[3::8] = True
    hyper = dict(lr=1e-3, weight_decay=0.0)
    if impl == "fp32":
        p = torch.nn.Parameter(theta.clone())
        opt = FAdam([p], foreach=True, **hyper)
    else:
        mc, msc = quantize_blockwise(torch.zeros(n), block, True)
        fc, fsc = quantize_blockwise(torch.zeros(n), block, False)
        state = [[theta.clone()], [torch.zeros(n)], [mc], [fc], [msc], [fsc], [torch.zeros(())]]
    snaps = []
    old = cpu_fused_8bit.set_simd(simd) if impl == "c" else None
    try:
        for t in range(active + settle + window):
            g = _grads(n, t, active, stopped)
            if impl == "fp32":
                p.grad = g
                opt.step()
                now = p.detach()
            else:
                state[1][0].copy_(g)
                _step(impl, state, block_size=block, hyper=hyper)
                now = state[0][0]
            if t + 1 in (active, active + settle, active + settle + window):
                snaps.append(now.clone())
    finally:
        if old is not None:
            cpu_fused_8bit.set_simd(True)
    assert all(s.isfinite().all() for s in snaps)
    window_move = (snaps[2] - snaps[1])[stopped].abs().mean().item()
    settle_move = (snaps[1] - snaps[0])[stopped].abs().mean().item()
    return window_move, settle_move


FULL = dict(n_blocks=4, block=64, active=100, settle=2000, window=500)


def test_fp32_fadam_stops():
    window, settle = _decay_run("fp32", **FULL)
    assert window == 0.0 and settle > 1e-3  # (it moved after the stop, as m decayed, then stopped)


@pytest.mark.parametrize(
    ("impl", "simd"),
    [
        ("foreach", True),
        ("forloop", True),
        pytest.param("c", True, marks=needs_c),
        pytest.param("c", False, marks=needs_c),
    ],
    ids=["foreach", "forloop", "c-avx512", "c-generic"],
)
def test_a_stopped_element_stops_moving(impl, simd):
    if impl == "c" and simd and not cpu_fused_8bit.set_simd(True):
        pytest.skip("this build of the kernel has no AVX-512 passes")
    window, settle = _decay_run(impl, simd=simd, **FULL)
    fp32_window, fp32_settle = _decay_run("fp32", **FULL) if impl == "foreach" else (0.0, None)
    assert window <= max(BOUND, 10 * fp32_window), window
    if fp32_settle is not None:  # the decay itself follows fp32 FAdam's (m's stored error is 3 % at most)
        assert settle == pytest.approx(fp32_settle, rel=0.05)


def test_nearest_m_would_fail(monkeypatch):
    """The check sees the bug: the reference with m's codes rounded to nearest (the old map) keeps moving the stopped
    elements, ~lr · 1.2e-3 a step here."""
    quantize = quant_step.quantize_blockwise

    def nearest_m(x, block_size, signed, seed=None):
        return quantize(x, block_size, signed, seed=None if signed else seed)

    monkeypatch.setattr(quant_step, "quantize_blockwise", nearest_m)
    window, _ = _decay_run("foreach", **FULL)
    assert window > 4 * BOUND, window


@needs_c
def test_c_avx512_and_generic_decay_bit_for_bit():
    """The two C loops take the same trajectory through the decay, bit for bit (one thread)."""
    if not cpu_fused_8bit.set_simd(True):
        pytest.skip("this build of the kernel has no AVX-512 passes")
    n, block = 256, 64
    stopped = torch.zeros(n, dtype=torch.bool)
    stopped[3::8] = True
    outs = []
    old_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for simd in (True, False):
            cpu_fused_8bit.set_simd(simd)
            mc, msc = quantize_blockwise(torch.zeros(n), block, True)
            fc, fsc = quantize_blockwise(torch.zeros(n), block, False)
            state = [[torch.ones(n) * 0.1], [torch.zeros(n)], [mc], [fc], [msc], [fsc], [torch.zeros(())]]
            for t in range(200):
                state[1][0].copy_(_grads(n, t, 20, stopped))
                _step("c", state, block_size=block, hyper=dict(lr=1e-3, weight_decay=0.0))
            outs.append(state)
    finally:
        cpu_fused_8bit.set_simd(True)
        torch.set_num_threads(old_threads)
    for a, b in zip(outs[0], outs[1]):
        assert torch.equal(a[0], b[0])
    assert (outs[0][2][0][stopped] == 0).all()  # every stopped element's m reached 0


@pytest.mark.parametrize(
    "size",
    [
        pytest.param(dict(n_blocks=2, block=64, active=30, settle=250, window=100), id="small"),
        pytest.param(FULL, id="full", marks=pytest.mark.slow),
    ],
)
def test_triton_stopped_element_stops_moving(size):
    """The interpreted Triton kernel is slow: by default a short run (the elements' m reaches 0 within ~120 steps of
    the stop here); the full 2000-step run with -m slow."""
    _need_interpreted_triton()
    window, _ = _decay_run("triton", **size)
    assert window <= BOUND, window


# ------------------------------------------------------------------------------------------------------ huge g

IMPLS = [
    pytest.param("forloop", True, id="forloop"),
    pytest.param("foreach", True, id="foreach"),
    pytest.param("c", True, id="c-avx512", marks=needs_c),
    pytest.param("c", False, id="c-generic", marks=needs_c),
    pytest.param("triton", True, id="triton"),
]


def _huge_state(block=64):
    gen = torch.Generator().manual_seed(3)
    n = 3 * block
    m = torch.randn(n, generator=gen) * 0.1
    f = (torch.randn(n, generator=gen) * 0.5) ** 2 + 1e-4
    mc, msc = quantize_blockwise(m, block, True)
    fc, fsc = quantize_blockwise(f.sqrt(), block, False)
    theta = torch.randn(n, generator=gen) * 0.1
    return [[theta], [torch.zeros(n)], [mc], [fc], [msc], [fsc], [torch.tensor(5.0)]]


def _with_impl(impl, simd, fn):
    if impl == "triton":
        _need_interpreted_triton()
    if impl == "c" and simd and not cpu_fused_8bit.set_simd(True):
        pytest.skip("this build of the kernel has no AVX-512 passes")
    if impl == "c":
        cpu_fused_8bit.set_simd(simd)
    try:
        return fn()
    finally:
        cpu_fused_8bit.set_simd(True)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # (g² in the Triton interpreter: inf)
@pytest.mark.parametrize("big", [2e19, 1e20, 3e38])
@pytest.mark.parametrize(("impl", "simd"), IMPLS)
def test_a_huge_gradient_element_keeps_the_tensor_finite(impl, simd, big):
    """One element's gradient above sqrt(FLT_MAX) at one step: the tensor stays finite on every path, the element is
    stored as code 255 of a block of scale F_MAX_S / VMAX (the same codes as the reference), and over the next steps
    it moves as in fp32 FAdam, whose f is inf (D inf: only its old m moves it)."""
    block, k = 64, 70  # the element, in block 1
    state = _huge_state(block)
    hyper = dict(lr=1e-2, weight_decay=0.1)
    p = torch.nn.Parameter(state[0][0].clone())
    opt = FAdam([p], foreach=True, **hyper)  # fp32 FAdam from the same (dequantized) state
    opt.state[p].update(
        step=torch.tensor(5.0),
        exp_avg=dequantize_blockwise(state[2][0], state[4][0], block),
        fisher=dequantize_blockwise(state[3][0], state[5][0], block) ** 2,
    )

    def grads(t, big):
        g = torch.randn(3 * block, generator=torch.Generator().manual_seed(t))
        if t == 0:
            g[k] = big
        return g

    def run(big):
        ref, out = _clone(state), _clone(state)
        ref[1][0].copy_(grads(0, big))
        out[1][0].copy_(grads(0, big))
        _step("forloop", ref, block_size=block, hyper=hyper)
        _step(impl, out, block_size=block, hyper=hyper)
        _compare(ref, out)  # the step with the huge element, from the same state
        for t in range(1, 4):
            out[1][0].copy_(grads(t, big))
            _step(impl, out, block_size=block, hyper=hyper)
        return ref, out

    ref, out = _with_impl(impl, simd, lambda: run(big))
    assert int(ref[3][0][k]) == 255 and float(ref[5][0][1]) == pytest.approx(F_MAX_S / M_FORMAT.vmax, rel=1e-6)
    for lst in out[:6]:
        assert lst[0].float().isfinite().all()
    theta0 = state[0][0]
    for t in range(4):
        p.grad = grads(t, big)
        opt.step()
    assert p.isfinite().all() and opt.state[p]["fisher"][k] == float("inf")
    torch.testing.assert_close(out[0][0][k] - theta0[k], p.detach()[k] - theta0[k], rtol=0.05, atol=1e-5)
    # The other blocks follow fp32 FAdam, less closely than without the huge element (~5 % here): its block-mates'
    # sqrt(f) codes round up to at least 2**-18 of the clamped maximum, so their D >= ~2e13 freezes them, which
    # drops them from the tensor's RMS sums and changes its clip divisors (measured: 12 % of the movement).
    others = torch.cat([torch.arange(0, block), torch.arange(2 * block, 3 * block)])
    moved = (p.detach() - theta0)[others]
    assert ((out[0][0] - p.detach())[others]).norm() <= 0.25 * moved.norm()


@needs_c
@pytest.mark.parametrize("simd", [True, False], ids=["avx512", "generic"])
def test_huge_gradient_in_a_block_on_the_nan_safe_path(simd):
    """The C kernel's NaN-safe encoder (here: a block whose new m maximum is subnormal) clamps the scale too."""
    state = _state_with_a_subnormal_m_block(64, torch.float32)
    state[1][0][TINY * 64 + 5] = 1e20
    ref, out = _clone(state), _clone(state)
    _step("forloop", ref, block_size=64)
    _with_impl("c", simd, lambda: _step("c", out, block_size=64))
    assert float(ref[5][0][TINY]) == pytest.approx(F_MAX_S / M_FORMAT.vmax, rel=1e-6)
    tiny = slice(TINY * 64, (TINY + 1) * 64)
    assert torch.equal(out[3][0][tiny], ref[3][0][tiny]) and torch.equal(out[2][0][tiny], ref[2][0][tiny])
    _compare(ref, out)
