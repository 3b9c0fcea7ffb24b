"""The Triton kernels' stores follow hf_fadam/_rounding.py: stochastic 16-bit state, and bf16/fp16 params stored to
nearest, stochastically or Kahan-compensated (``param_rounding``), with the reference's random bits.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest.py); on a
GPU machine ``TRITON_INTERPRET=0 pytest tests/test_rounding_triton.py`` runs the compiled kernels on CUDA tensors.
Every check here fails for a kernel that rounds to nearest where it should not, or draws other random bits: the
bit-exact checks compare codes, and the trajectory checks both bound the share of stored values that differ from the
for-loop reference and verify that nearest rounding, or other streams, would exceed that bound.
"""

from __future__ import annotations

import pytest
import torch

from hf_fadam._rounding import KIND_FISHER, KIND_PARAM, resolve_param_rounding, round_stochastic, rounding_seeds
from hf_fadam._single_tensor import _single_tensor_fadam
from hf_fadam.kernels import triton_fadam

from _tolerances import tolerance


INTERPRETING = triton_fadam._interpreting()
HAS_CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.skipif(
    not (triton_fadam.is_available() and (INTERPRETING or HAS_CUDA)),
    reason="needs triton with TRITON_INTERPRET=1 (CPU tensors) or CUDA",
)
DEVICE = "cpu" if INTERPRETING else "cuda"
SIXTEEN = (torch.bfloat16, torch.float16)
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, clip=1.0, p=0.5, maximize=False)
# A stochastic store of the kernel may differ from the reference's where the float32 value it rounds differs in its
# last bits (reordered sums, FMA): rare (a 2**-16 chance per ulp of difference). Nearest rounding or other random
# bits differ in far more of the values (checked against the reference itself in every trajectory test).
MAX_MISMATCH = 0.005
MIN_POWER = 4 * MAX_MISMATCH


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share of elements whose stored values differ (two NaNs agree)."""
    if a.numel() == 0:
        return 0.0
    a, b = a.cpu().float(), b.cpu().float()
    differ = (a != b) & ~(a.isnan() & b.isnan())
    return differ.float().mean().item()


# --- the store itself, bit for bit -----------------------------------------------------------------------------

if triton_fadam.triton is not None:
    import triton
    import triton.language as tl

    from hf_fadam.kernels.triton_fadam import _round_sr  # the kernels' device function

    @triton.jit
    def _store_only(x_ptr, out_ptr, seed, n, DT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, _round_sr(x, offs, seed, DT), mask=mask)


def _edge_values(dtype: torch.dtype) -> torch.Tensor:
    """float32 values at the edges of ``dtype``'s grid, each in both signs, and a random spread of magnitudes."""
    f32 = torch.finfo(torch.float32)
    fmax = torch.finfo(dtype).max
    edges = [0.0, f32.tiny, f32.tiny / 8, 1e-30, float("inf"), float(fmax), f32.max]
    for k in (-20, -14, -1, 0, 1, 7, 15, 100):  # binade edges: 2**k and its float32 neighbours
        v = torch.tensor(2.0**k, dtype=torch.float32)
        edges += [
            v.item(),
            torch.nextafter(v, torch.tensor(0.0)).item(),
            torch.nextafter(v, torch.tensor(1e38)).item(),
        ]
    fm = torch.tensor(fmax, dtype=torch.float32)  # just below / above the largest finite value of dtype
    edges += [torch.nextafter(fm, torch.tensor(0.0)).item(), torch.nextafter(fm, torch.tensor(float("inf"))).item()]
    if dtype == torch.float16:  # subnormals (grid 2**-24), half a step, the rounding boundary to inf, beyond
        edges += [2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14 - 2.0**-30, 1000 * 2.0**-24 + 2.0**-27]
        edges += [65519.0, 65520.0, 65535.0, 1e5, 70000.0]
    else:
        edges += [3.3961e38, 3.39e38, 1.0 + 2.0**-9, 1.0 + 2.0**-8 - 2.0**-23]
    edges = torch.tensor(edges, dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    spread = torch.randn(1500, generator=gen) * torch.logspace(-12, 6, 1500)
    x = torch.cat([edges, -edges, spread, torch.tensor([float("nan")])])
    return x.repeat(2)  # each value at two indices (different bits, and both halves of one hash)


@pytest.mark.parametrize("dtype", SIXTEEN, ids=["bf16", "fp16"])
def test_store_matches_round_stochastic_bit_for_bit(dtype):
    """The kernels' stochastic store (``_round_sr``) reproduces hf_fadam._rounding.round_stochastic bit for bit over
    binade edges, fp16 subnormals, values beyond the largest finite one, ±0, ±inf and NaN, for several seeds."""
    x = _edge_values(dtype)
    n = x.numel()
    xd = x.to(DEVICE)
    tdt = tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    for seed in (0, 1, 0x2545F491, 0xFFFFFFFF):
        out = torch.empty(n, dtype=dtype, device=DEVICE)
        _store_only[(triton.cdiv(n, 1024),)](xd, out, seed, n, DT=tdt, BLOCK=1024)
        ref = round_stochastic(x, dtype, seed)
        out = out.cpu()
        nan = ref.isnan()
        assert torch.equal(out.isnan(), nan)
        bad = (_bits(out) != _bits(ref)) & ~nan
        assert not bad.any(), f"seed {seed}: {int(bad.sum())} codes differ, e.g. x={x[bad][:4].tolist()}"
        # (power: the store is not round-to-nearest, and another seed gives other values)
        assert _mismatch(out, x.to(dtype)) > 0.1
        assert _mismatch(out, round_stochastic(x, dtype, seed ^ 1)) > 0.1
        # finite values in range never become inf
        finite = x.abs() <= torch.finfo(dtype).max
        assert out[finite].isfinite().all()


def _exact_case(pdt, sdt, mode, streams):
    """Step 1 with inputs whose stored float32 values are exact on every path (no reordering can change them):
    eps = 0 and |g| > 0 make D = |g| and ḡ = ±1 (RMS 1, no clip); β1 = 0.5, lr = 2**-10 and no weight decay make
    m = ±0.5 and θ' = θ ∓ 2**-11, exact in float32; f' = g² exact too. So the kernel's 16-bit stores must equal the
    reference's (round_stochastic with the same seeds) bit for bit."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(1500,), (33, 41), (0, 3), (5,)]
    params = [(torch.randn(s, generator=gen) * 4).to(pdt) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(pdt) for s in shapes]
    grads = [torch.where(g == 0, torch.ones_like(g), g) for g in grads]
    hyper = dict(HYPER, lr=2.0**-10, beta1=0.5, eps=0.0, weight_decay=0.0)

    def fresh():
        comps = [torch.zeros_like(p) for p in params] if mode == "kahan" else None
        return (
            [p.clone() for p in params],
            [torch.zeros(s, dtype=sdt) for s in shapes],
            [torch.zeros(s, dtype=sdt) for s in shapes],
            [torch.zeros(()) for _ in shapes],
            comps,
        )

    ref = fresh()
    _single_tensor_fadam(ref[0], grads, *ref[1:4], param_rounding=mode, param_comps=ref[4], streams=streams, **hyper)
    out = [None if lst is None else [t.to(DEVICE) for t in lst] for lst in fresh()]
    torch._foreach_add_(out[3], 1)
    triton_fadam.fadam_triton_(
        out[0], [g.to(DEVICE) for g in grads], *out[1:4], param_rounding=mode, param_comps=out[4], streams=streams,
        **hyper,
    )  # fmt: skip
    return params, grads, ref, out


@pytest.mark.parametrize(
    ("pdt", "sdt", "mode"),
    [
        (torch.bfloat16, torch.bfloat16, "stochastic"),
        (torch.float16, torch.float16, "stochastic"),
        (torch.bfloat16, torch.float32, "kahan"),
        (torch.float16, torch.bfloat16, "kahan"),
    ],
    ids=["bf16-bf16-stochastic", "fp16-fp16-stochastic", "bf16-fp32-kahan", "fp16-bf16-kahan"],
)
def test_step_stores_bit_for_bit(pdt, sdt, mode):
    """The whole kernel: its stored params, m, f and Kahan residuals equal the for-loop's bit for bit where the
    float32 values are exact (seeds from the streams and the step count, element index in the tensor, several chunks
    and blocks)."""
    streams = [9, 2, 5, 0x1_0000_0003]  # (a stream beyond 32 bits counts mod 2**32)
    params, grads, ref, out = _exact_case(pdt, sdt, mode, streams)
    for k, name in enumerate(("param", "exp_avg", "fisher", "param_comp")):
        if ref[k] is None:
            continue
        for i, (a, b) in enumerate(zip(out[k], ref[k])):
            assert a.dtype == b.dtype
            assert torch.equal(_bits(a.cpu()), _bits(b)), f"{name}[{i}]: {_mismatch(a, b):.2%} of the values differ"
    if mode == "stochastic":  # the params' and f's bits are the ones of their own seeds
        for i, (p, g) in enumerate(zip(params, grads)):
            exact = p.float() - 2.0**-11 * torch.sign(g.float())
            seed = rounding_seeds([streams[i]], torch.ones(1), KIND_PARAM)
            assert torch.equal(_bits(out[0][i].cpu()), _bits(round_stochastic(exact, pdt, seed)))
            seed_f = rounding_seeds([streams[i]], torch.ones(1), KIND_FISHER)
            assert torch.equal(_bits(out[2][i].cpu()), _bits(round_stochastic(g.float() ** 2, sdt, seed_f)))
        big = out[0][0].cpu()
        assert _mismatch(big, (params[0].float() - 2.0**-11 * torch.sign(grads[0].float())).to(pdt)) > MIN_POWER


# --- trajectories against the for-loop reference ---------------------------------------------------------------


def _make(pdt, *, with_fp32=False, gen_seed=0):
    """Odd shapes, a zero-size tensor, several chunks, and a transposed (non-contiguous) param whose grad and state
    share its layout; optionally one float32 param (its store stays exact whatever param_rounding says)."""
    gen = torch.Generator().manual_seed(gen_seed)
    params = [
        torch.randn(37, generator=gen).to(pdt),
        torch.randn(3, 130, generator=gen).to(pdt),  # several blocks (test_step_stores_bit_for_bit: several chunks)
        torch.randn(0, generator=gen).to(pdt),
        torch.randn(9, 41, generator=gen).to(pdt).t(),  # non-contiguous, strides (1, 41)
    ]
    if with_fp32:
        params.append(torch.randn(50, generator=gen))
    return params


def _state(params, sdt, mode, device, comps=None):
    ps = [p.clone().to(device) if p.is_contiguous() else p.t().clone().to(device).t() for p in params]

    def like(p, dtype):
        return torch.zeros_like(p, dtype=dtype if p.dtype in SIXTEEN else p.dtype)

    ms = [like(p, sdt) for p in ps]
    fs = [like(p, sdt) for p in ps]
    steps = [torch.zeros((), device=device) for _ in ps]
    if comps is None:
        comps = mode == "kahan"
    comps = [torch.zeros_like(p) if p.dtype in SIXTEEN else None for p in ps] if comps else None
    return ps, ms, fs, steps, comps


def _grads(params, step, device):
    out = []
    for i, p in enumerate(params):
        gen = torch.Generator().manual_seed(1000 * step + i)
        g = torch.randn(p.shape, generator=gen) * 10.0 ** (i % 3 - 1)
        if not p.is_contiguous():  # the same layout as its param
            g = g.t().contiguous().t()
        out.append(g.to(dtype=p.dtype, device=device))
    return out


def _run(params, sdt, mode, *, kernel, steps=3, reduce=None, streams=None, hyper=HYPER, comps=None):
    device = DEVICE if kernel else "cpu"
    ps, ms, fs, st, comps = _state(params, sdt, mode, device, comps)
    calls = []
    hook = None
    if reduce:

        def hook(buf):
            calls.append(tuple(buf.shape))

    for t in range(steps):
        grads = _grads(params, t, device)
        kw = dict(param_rounding=mode, param_comps=comps, streams=streams, **hyper)
        if reduce:
            kw["reduce"] = hook
        if kernel:
            torch._foreach_add_(st, 1)
            triton_fadam.fadam_triton_(ps, grads, ms, fs, st, **kw)
        else:
            _single_tensor_fadam(ps, grads, ms, fs, st, **kw)
    if reduce:
        assert calls == [(1, len(ps)), (2, len(ps))] * steps
    return [[None if t is None else t.cpu() for t in lst] for lst in (ps, ms, fs)] + [
        None if comps is None else [None if c is None else c.cpu() for c in comps]
    ]


def _assert_close_stored(actual, expected, what):
    for i, (a, b) in enumerate(zip(actual, expected)):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), f"{what}[{i}]"
        if b.dtype in SIXTEEN:
            share = _mismatch(a, b)
            assert share <= MAX_MISMATCH, f"{what}[{i}]: {share:.2%} of the stored values differ"
        atol, rtol = tolerance("fused_triton", b.dtype)
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=f"{what}[{i}]")


def _power(ref, other, what):
    """The comparison can see a wrong store: ``other`` (nearest rounding, or other streams) differs from the
    reference in far more of the largest param's values than the bound of _assert_close_stored allows."""
    share = _mismatch(other[0][1], ref[0][1])
    assert share > MIN_POWER, f"{what}: only {share:.2%} of the values differ; the test would not see it"


CASES = [
    pytest.param(pdt, sdt, mode, id=f"{str(pdt)[6:]}-{str(sdt)[6:]}-{mode}")
    for pdt in SIXTEEN
    for sdt in (torch.float32, torch.bfloat16)
    for mode in ("nearest", "stochastic", "kahan")
] + [pytest.param(torch.bfloat16, torch.float16, "stochastic", id="bfloat16-float16-stochastic")]


@pytest.mark.parametrize(("pdt", "sdt", "mode"), CASES)
@pytest.mark.parametrize("reduce", [False, True], ids=["no_reduce", "reduce"])
def test_trajectory_matches_forloop(pdt, sdt, mode, reduce):
    """3 steps of the kernel against the for-loop reference: params, m, f and Kahan residuals. With a reduce hook the
    call holds a float32 param too (two dtype groups in one call, phase-major, the hook called exactly twice)."""
    params = _make(pdt, with_fp32=reduce)
    streams = [4, 8, 15, 16, 23][: len(params)]
    ref = _run(params, sdt, mode, kernel=False, streams=streams, reduce=reduce)
    out = _run(params, sdt, mode, kernel=True, streams=streams, reduce=reduce)
    for k, what in enumerate(("param", "exp_avg", "fisher")):
        _assert_close_stored(out[k], ref[k], what)
    if mode == "kahan":
        _assert_close_stored(out[3], ref[3], "param_comp")
        # (a kernel that leaves the residuals alone fails the comparison: the reference's are mostly nonzero)
        assert (ref[3][1] != 0).float().mean() > MIN_POWER
    else:
        assert out[3] is None
    if reduce and mode != "nearest":  # the float32 param is stored exactly, whatever param_rounding says
        plain = _run(params, sdt, "nearest", kernel=False, streams=streams, reduce=True)
        atol, rtol = tolerance("fused_triton", torch.float32)
        torch.testing.assert_close(out[0][-1], plain[0][-1], atol=atol, rtol=rtol)
    if not reduce:  # (once per case) nearest rounding, or other bits, would fail the comparison above
        if mode != "nearest":
            _power(ref, _run(params, sdt, "nearest", kernel=False, streams=streams), f"{mode} vs nearest")
        if mode == "stochastic" or sdt in SIXTEEN:
            other = _run(params, sdt, mode, kernel=False, streams=[s + 1 for s in streams])
            share = max(_mismatch(a, b) for k in range(3) for a, b in zip(other[k], ref[k]) if b.dtype in SIXTEEN)
            assert share > MIN_POWER, f"other streams differ in only {share:.2%} of the values"


@pytest.mark.parametrize("sdt", [torch.float32, torch.bfloat16], ids=["fp32_state", "bf16_state"])
def test_default_streams_and_auto(sdt):
    """streams=None means 0 .. n-1, and "auto" means for bf16 params what it means in the reference
    (hf_fadam._rounding.AUTO_16BIT), with its buffers when that is "kahan"."""
    params = _make(torch.bfloat16)
    auto = resolve_param_rounding("auto", torch.bfloat16)
    ref = _run(params, sdt, auto, kernel=False, steps=2)
    out = _run(params, sdt, "auto", kernel=True, steps=2, comps=auto == "kahan")
    for k, what in enumerate(("param", "exp_avg", "fisher", "param_comp")):
        if ref[k] is not None:
            _assert_close_stored(out[k], ref[k], what)


def test_cached_plan_follows_new_comps_and_streams():
    """The plan is cached by addresses (contiguous tensors; the grads here stay in one buffer, so every step after
    the first is a full cache hit): new Kahan buffers (new addresses) and new streams on the same params must reach
    the kernels (a plan that kept the old ones would write the residual into the old buffers, or draw the old
    bits)."""
    params = [p for p in _make(torch.bfloat16) if p.is_contiguous()]
    for mode, change in (("kahan", "comps"), ("stochastic", "streams")):
        state_ref = _state(params, torch.bfloat16, mode, "cpu")
        state_out = _state(params, torch.bfloat16, mode, DEVICE)
        grads = [torch.empty_like(p) for p in state_out[0]]
        streams = [1, 2, 3]
        for t in range(4):
            if t == 2 and change == "comps":
                state_ref = (*state_ref[:4], [c.clone() for c in state_ref[4]])
                old = state_out[4]
                state_out = (*state_out[:4], [c.clone() for c in old])
                old_values = [c.clone() for c in old]
            if t == 2 and change == "streams":
                streams = [7, 7, 9]
            kw = dict(param_rounding=mode, streams=streams, **HYPER)
            ps, ms, fs, st, comps = state_ref
            _single_tensor_fadam(ps, _grads(params, t, "cpu"), ms, fs, st, param_comps=comps, **kw)
            ps, ms, fs, st, comps = state_out
            torch._foreach_copy_(grads, _grads(params, t, DEVICE))
            torch._foreach_add_(st, 1)
            triton_fadam.fadam_triton_(ps, grads, ms, fs, st, param_comps=comps, **kw)
        for k, what in enumerate(("param", "exp_avg", "fisher")):
            _assert_close_stored([t.cpu() for t in state_out[k]], state_ref[k], f"{change}: {what}")
        if change == "comps":
            _assert_close_stored([c.cpu() for c in state_out[4]], state_ref[4], "param_comp")
            assert all(torch.equal(a, b) for a, b in zip(old, old_values)), "the old buffers were written"


def test_kahan_needs_its_buffers():
    params = [torch.randn(5).bfloat16().to(DEVICE)]
    lists = ([params[0]], [torch.randn(5).bfloat16().to(DEVICE)], [torch.zeros(5, device=DEVICE)],
             [torch.zeros(5, device=DEVICE)], [torch.ones((), device=DEVICE)])  # fmt: skip
    with pytest.raises(ValueError, match="param_comps"):
        triton_fadam.fadam_triton_(*lists, param_rounding="kahan", **HYPER)
    with pytest.raises(ValueError, match="param_comps"):
        triton_fadam.fadam_triton_(
            *lists, param_rounding="kahan", param_comps=[torch.zeros(5, device=DEVICE)], **HYPER
        )
    with pytest.raises(ValueError, match="param_rounding"):
        triton_fadam.fadam_triton_(*lists, param_rounding="up", **HYPER)
    assert triton_fadam.SUPPORTS_ROUNDING


# --- FAdam8bit ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
def test_fadam8bit_fused_rounding_matches_foreach(mode, monkeypatch):
    """FAdam8bit(fused=True) on the Triton backend with bf16 params (8-bit state and a small fp32-state tensor)
    against its foreach reference: the params' stores follow param_rounding with the reference's bits."""
    from hf_fadam import FAdam8bit
    from hf_fadam.kernels import triton_fadam8bit

    if not triton_fadam8bit.is_available():
        pytest.skip("triton_fadam8bit is not available here")
    assert triton_fadam8bit.SUPPORTS_ROUNDING
    monkeypatch.setenv("HF_FADAM_CPU_FUSED_BACKEND", "triton")

    def run(fused, rounding=mode):
        gen = torch.Generator().manual_seed(3)
        ps = [
            torch.nn.Parameter((torch.randn(6, 50, generator=gen)).bfloat16().to(DEVICE)),
            torch.nn.Parameter(torch.randn(9, generator=gen).bfloat16().to(DEVICE)),
        ]
        opt = FAdam8bit(ps, lr=4e-3, min_8bit_size=100, block_size=64, fused=fused, foreach=None if fused else True,
                        param_rounding=rounding)  # fmt: skip
        for t in range(3):
            g = torch.Generator().manual_seed(100 + t)
            for prm in ps:
                prm.grad = torch.randn(prm.shape, generator=g).bfloat16().to(DEVICE)
            opt.step()
        return [p.detach().cpu() for p in ps], opt

    ref, _ = run(False)
    out, opt = run(True)
    assert "Triton" in opt.describe_implementation()
    for a, b in zip(out, ref):
        assert _mismatch(a, b) <= MAX_MISMATCH
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    if mode == "kahan":
        for prm in opt.param_groups[0]["params"]:
            assert opt.state[prm]["param_comp"].abs().max() > 0
    nearest, _ = run(False, "nearest")
    assert _mismatch(nearest[0], ref[0]) > MIN_POWER


def test_fadam8bit_kernel_param_store_bit_for_bit():
    """The 8-bit kernel's stochastic param store at step 1 with exact float32 values (as in _exact_case) equals
    round_stochastic with the KIND_PARAM seed of each tensor's stream, bit for bit."""
    from hf_fadam._quant import num_blocks
    from hf_fadam.kernels import triton_fadam8bit

    gen = torch.Generator().manual_seed(5)
    shapes, block = [(300,), (7, 11)], 64
    params = [(torch.randn(s, generator=gen) * 4).bfloat16() for s in shapes]
    grads = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
    grads = [torch.where(g == 0, torch.ones_like(g), g) for g in grads]
    streams = [6, 3]
    ps = [p.clone().to(DEVICE) for p in params]
    ms = [torch.zeros(s, dtype=torch.int8, device=DEVICE) for s in shapes[:1]] + [
        torch.zeros(shapes[1], device=DEVICE)
    ]
    fs = [torch.zeros(s, dtype=torch.uint8, device=DEVICE) for s in shapes[:1]] + [
        torch.zeros(shapes[1], device=DEVICE)
    ]
    msc = [torch.zeros(num_blocks(300, block), device=DEVICE), None]
    fsc = [torch.zeros(num_blocks(300, block), device=DEVICE), None]
    steps = [torch.ones((), device=DEVICE) for _ in shapes]
    hyper = dict(HYPER, lr=2.0**-10, beta1=0.5, eps=0.0, weight_decay=0.0)
    triton_fadam8bit.fadam8bit_triton_(ps, [g.to(DEVICE) for g in grads], ms, fs, msc, fsc, steps, block_size=block,
                                       streams=streams, param_rounding="stochastic", **hyper)  # fmt: skip
    for i, (p, g) in enumerate(zip(params, grads)):
        exact = p.float() - 2.0**-11 * torch.sign(g.float())
        seed = rounding_seeds([streams[i]], torch.ones(1), KIND_PARAM)
        assert torch.equal(_bits(ps[i].cpu()), _bits(round_stochastic(exact, torch.bfloat16, seed))), f"param {i}"
        assert _mismatch(ps[i], exact.bfloat16()) > MIN_POWER
