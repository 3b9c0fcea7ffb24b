"""FAdam8bit's C kernel stores bf16/fp16 params as hf_fadam/_rounding.py says (``param_rounding``): to nearest,
stochastically (the reference's random bits, ``KIND_PARAM``), or Kahan-compensated (θ = param + comp in pass B's
Σ(θ/D)² and in pass C, the residual of the nearest store kept in ``param_comps``).

The bit-exact checks compare the kernel's stores with ``round_stochastic`` / the reference where the float32 values
are exact on every path; the trajectory checks bound the share of stored 16-bit values that differ from the foreach
reference (a stochastic store may differ where the float32 value it rounds differs in its last bits: a 2**-16 chance
per ulp) and verify that nearest rounding, or other streams, would exceed that bound.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_8bit import _clone, _compare, _state, needs_c
from test_rounding_triton import MAX_MISMATCH, MIN_POWER, _bits, _edge_values, _mismatch

from hf_fadam._quant import num_blocks
from hf_fadam._quant_step import fadam8bit
from hf_fadam._rounding import KIND_PARAM, resolve_param_rounding, round_stochastic, rounding_seeds
from hf_fadam.kernels import cpu_fused_8bit
from hf_fadam.optimizer_8bit import FAdam8bit


pytestmark = needs_c

SIXTEEN = (torch.bfloat16, torch.float16)
MODES = ("nearest", "stochastic", "kahan")
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, clip=1.0, p=0.5, maximize=False)


@pytest.fixture(autouse=True)
def _c_backend(monkeypatch):
    monkeypatch.setenv("HF_FADAM_CPU_FUSED_BACKEND", "c")


@pytest.mark.parametrize("dtype", SIXTEEN, ids=["bf16", "fp16"])
def test_store_matches_round_stochastic_bit_for_bit(dtype):
    """The kernel's stochastic param store reproduces _rounding.round_stochastic bit for bit over binade edges, fp16
    subnormals, values beyond the largest finite one, ±0, ±inf and NaN, for several seeds."""
    x = _edge_values(dtype)
    for seed in (0, 1, 0x2545F491, 0xFFFFFFFF):
        out = cpu_fused_8bit.store_sr(x, dtype, seed)
        ref = round_stochastic(x, dtype, seed)
        nan = ref.isnan()
        assert torch.equal(out.isnan(), nan)
        bad = (_bits(out) != _bits(ref)) & ~nan
        assert not bad.any(), f"seed {seed}: {int(bad.sum())} values differ, e.g. x={x[bad][:4].tolist()}"
        assert _mismatch(out, x.to(dtype)) > 0.1  # (not round-to-nearest)


def _exact_state(pdt, mode, block=64):
    """Step 1 with exact float32 values on every path: eps = 0 and gradients ±2**k make D = |g| and ḡ = g·(1/D) = ±1
    exactly (RMS 1, no clip; the kernel multiplies by the reciprocal of D, exact for a power of two); β1 = 0.5,
    lr = 2**-10 and no weight decay make m = ±0.5 and θ' = θ ∓ 2**-11. One tensor in three chunks of the kernel
    (600_001 elements), one of odd shape, one with fp32 state (below min_8bit_size: the kernel's fp32-state loop)."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(600_001,), (33, 41), (9,)]
    params = [(torch.randn(s, generator=gen) * 4).to(pdt) for s in shapes]
    grads = [
        (
            torch.exp2(torch.randint(-3, 4, s, generator=gen).float())
            * (torch.randint(0, 2, s, generator=gen) * 2 - 1)
        ).to(pdt)
        for s in shapes
    ]
    state = [params, grads, [], [], [], [], []]
    for s in shapes:
        n = torch.Size(s).numel()
        quant = n >= 1000
        state[2].append(torch.zeros(s, dtype=torch.int8) if quant else torch.zeros(s))
        state[3].append(torch.zeros(s, dtype=torch.uint8) if quant else torch.zeros(s))
        state[4].append(torch.zeros(num_blocks(n, block)) if quant else None)
        state[5].append(torch.zeros(num_blocks(n, block)) if quant else None)
        state[6].append(torch.zeros(()))
    comps = [torch.zeros_like(p) for p in params] if mode == "kahan" else None
    return state, comps


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
@pytest.mark.parametrize("pdt", SIXTEEN, ids=["bf16", "fp16"])
def test_step_stores_bit_for_bit(pdt, mode, threads):
    """The whole kernel at step 1 with exact float32 values: params (and Kahan residuals) equal the foreach
    reference's bit for bit, and the stochastic store is round_stochastic with each tensor's KIND_PARAM seed."""
    streams = [9, 2, 0x1_0000_0003]  # (a stream beyond 32 bits counts mod 2**32)
    hyper = dict(HYPER, lr=2.0**-10, beta1=0.5, eps=0.0, weight_decay=0.0)
    state, comps = _exact_state(pdt, mode)
    ref, out = _clone(state), _clone(state)
    ref_comps, out_comps = copy.deepcopy(comps), copy.deepcopy(comps)
    fadam8bit(*ref, block_size=64, foreach=True, streams=streams, param_rounding=mode, param_comps=ref_comps,
              **hyper)  # fmt: skip
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        fadam8bit(*out, block_size=64, fused=True, streams=streams, param_rounding=mode, param_comps=out_comps,
                  **hyper)  # fmt: skip
    finally:
        torch.set_num_threads(old)
    for i, (a, b) in enumerate(zip(out[0], ref[0])):
        assert torch.equal(_bits(a), _bits(b)), f"param {i}: {_mismatch(a, b):.2%} of the values differ"
    for k in (2, 3, 4, 5):  # codes, scales, fp32 state
        for a, b in zip(out[k], ref[k]):
            assert a is None or torch.equal(a, b)
    params, grads = state[0], state[1]
    exact = [p.float() - 2.0**-11 * torch.sign(g.float()) for p, g in zip(params, grads)]
    if mode == "kahan":
        for i, (c, e) in enumerate(zip(out_comps, exact)):
            assert torch.equal(_bits(c), _bits(ref_comps[i])), f"comp {i}"
            assert torch.equal(_bits(c), _bits((e - e.to(pdt).float()).to(pdt))), f"comp {i}"
        assert (out_comps[0] != 0).float().mean() > 0.5
    else:
        for i, e in enumerate(exact):
            seed = rounding_seeds([streams[i]], torch.ones(1), KIND_PARAM)
            assert torch.equal(_bits(out[0][i]), _bits(round_stochastic(e, pdt, seed))), f"param {i}"
        assert _mismatch(out[0][0], exact[0].to(pdt)) > MIN_POWER


def _trajectory(pdt, mode, *, fused, steps=3, reduce=False, streams=None, comps=None):
    """``steps`` steps of fadam8bit from a random quantized state: odd shapes, a partial block, an fp32-state tensor,
    a transposed (non-contiguous) param with its grad and Kahan buffer in the same layout."""
    state = _state([(40, 50), (7,), (3000,), (33, 65), (1,)], seed=4)
    state[0] = [p.to(pdt) for p in state[0]]
    state[0][3] = state[0][3].t().contiguous().t()  # strides (1, 33)
    state[1] = [g.to(pdt) for g in state[1]]
    if comps is None:
        comps = resolve_param_rounding(mode, pdt) == "kahan"
    comps = [torch.zeros_like(p) for p in state[0]] if comps else None
    calls = []
    kw = dict(streams=streams, param_rounding=mode, param_comps=comps, block_size=64, **HYPER)
    if reduce:
        kw.update(numels=[p.numel() for p in state[0]], reduce=lambda buf: calls.append(tuple(buf.shape)))
    kw.update(fused=True) if fused else kw.update(foreach=True)
    for t in range(steps):
        gen = torch.Generator().manual_seed(100 + t)
        grads = [(torch.randn(p.shape, generator=gen) * 10.0 ** (i % 3 - 2)).to(pdt) for i, p in enumerate(state[0])]
        for g, p in zip(grads, state[1]):
            p.copy_(g)
        fadam8bit(*state, **kw)
    if reduce:
        assert calls == [(1, 5), (2, 5)] * steps
    assert state[0][3].stride() == (1, 33)
    return state, comps


CASES = [pytest.param(pdt, mode, id=f"{str(pdt)[6:]}-{mode}") for pdt in SIXTEEN for mode in MODES]


@pytest.mark.parametrize(("pdt", "mode"), CASES)
@pytest.mark.parametrize("reduce", [False, True], ids=["no_reduce", "reduce"])
def test_trajectory_matches_foreach(pdt, mode, reduce):
    """3 steps of the C kernel against FAdam8bit's foreach reference, each on its own trajectory: params and Kahan
    residuals within 0.5 % differing 16-bit values, codes and scales as _compare allows."""
    streams = [4, 8, 15, 16, 23]
    ref, ref_comps = _trajectory(pdt, mode, fused=False, reduce=reduce, streams=streams)
    out, out_comps = _trajectory(pdt, mode, fused=True, reduce=reduce, streams=streams)
    for i, (a, b) in enumerate(zip(out[0], ref[0])):
        assert _mismatch(a, b) <= MAX_MISMATCH, f"param {i}: {_mismatch(a, b):.2%} of the values differ"
    _compare(ref, out, theta_tol=(1e-2, 1e-2), flips=5e-3)
    if mode == "kahan":
        # A residual holds the float32 θ's low bits: where the kernel's θ differs from the reference's in its last
        # float32 bit (it multiplies by 1/D where the reference divides by D), so does the residual (fp16's holds
        # bits down to 2**-22 of θ: ~1 % of them differ here; bf16's to 2**-16). So the residuals are bounded by
        # share, and what they stand for, θ + c, to float32 precision on every element.
        comp_share = MAX_MISMATCH if pdt == torch.bfloat16 else 4 * MAX_MISMATCH
        for i, (a, b) in enumerate(zip(out_comps, ref_comps)):
            assert _mismatch(a, b) <= comp_share, f"comp {i}: {_mismatch(a, b):.2%} of the values differ"
            torch.testing.assert_close(out[0][i].float() + a.float(), ref[0][i].float() + b.float(), atol=2e-6,
                                       rtol=1e-5, msg=f"param + comp {i}")  # fmt: skip
        assert (ref_comps[2] != 0).float().mean() > 0.5  # (a kernel that left them alone would fail)
    else:
        assert out_comps is None
    if not reduce and mode != "nearest":  # the check can see a wrong store: nearest, or other bits, differ more
        plain, _ = _trajectory(pdt, "nearest", fused=False, streams=streams)
        assert _mismatch(plain[0][2], ref[0][2]) > MIN_POWER
        if mode == "stochastic":
            other, _ = _trajectory(pdt, mode, fused=False, streams=[s + 1 for s in streams])
            assert _mismatch(other[0][2], ref[0][2]) > MIN_POWER


@pytest.mark.parametrize("pdt", SIXTEEN, ids=["bf16", "fp16"])
def test_auto_and_fp32_params(pdt):
    """``"auto"`` means FAdam8bit's default for 16-bit params in the kernel as in the reference (with the buffers
    "kahan" would need), and float32 params are stored exactly whatever param_rounding says."""
    auto = resolve_param_rounding("auto", pdt)
    ref, _ = _trajectory(pdt, auto, fused=False, steps=2)
    out, _ = _trajectory(pdt, "auto", fused=True, steps=2, comps=auto == "kahan")
    for a, b in zip(out[0], ref[0]):
        assert _mismatch(a, b) <= MAX_MISMATCH
    f32 = [_trajectory(torch.float32, mode, fused=True, steps=2)[0] for mode in ("nearest", "stochastic")]
    for a, b in zip(f32[0][0], f32[1][0]):
        assert torch.equal(a, b)


def test_kahan_needs_its_buffers():
    state, _ = _exact_state(torch.bfloat16, "kahan")
    state = [lst[1:2] for lst in state]
    with pytest.raises(ValueError, match="param_comps"):
        fadam8bit(*_clone(state), block_size=64, fused=True, param_rounding="kahan", **HYPER)
    with pytest.raises(ValueError, match="param_comps"):
        bad = [torch.zeros(state[0][0].shape)]  # float32, not the param's dtype
        fadam8bit(*_clone(state), block_size=64, fused=True, param_rounding="kahan", param_comps=bad, **HYPER)
    assert cpu_fused_8bit.SUPPORTS_ROUNDING


@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
def test_resume_is_bit_exact(mode):
    """FAdam8bit(fused=True) with bf16 params: a state dict saved after 3 steps and loaded into a new optimizer
    continues bit for bit like the uninterrupted run, params, codes, scales and the Kahan residuals."""

    def grads(t, ps):
        gen = torch.Generator().manual_seed(50 + t)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).bfloat16()

    def make():
        gen = torch.Generator().manual_seed(8)
        return [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16()) for s in ((70, 33), (130,), (5,))]

    mk = dict(lr=3e-3, min_8bit_size=100, block_size=64, fused=True, param_rounding=mode, weight_decay=0.1)
    ps = make()
    opt = FAdam8bit(ps, **mk)
    assert "C kernel" in opt.describe_implementation()
    for t in range(3):
        grads(t, ps)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    saved = [p.detach().clone() for p in ps]
    for t in range(3, 6):
        grads(t, ps)
        opt.step()
    ps2 = [torch.nn.Parameter(p) for p in saved]
    opt2 = FAdam8bit(ps2, **mk)
    opt2.load_state_dict(sd)
    for t in range(3, 6):
        grads(t, ps2)
        opt2.step()
    for a, b in zip(ps, ps2):
        assert torch.equal(_bits(a.detach()), _bits(b.detach()))
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert set(a) == set(b)
        for name in a:
            assert torch.equal(a[name], b[name]), name
    if mode == "kahan":
        assert all("param_comp" in st and st["param_comp"].abs().max() > 0 for st in opt.state.values())
