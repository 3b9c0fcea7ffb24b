"""The compiled C kernel behind ``FAdam(fused=True)`` on CPU, against the for-loop reference (``foreach=False``).

``tests/test_parity.py`` runs the shared awkward-parameter harness through every path; this file adds what is
specific to the C kernel: tensors large enough to be split across OpenMP threads (the per-thread partial sums),
several thread counts, fp16 and mixed (param, state) dtype pairs, a strided (non-dense) param that takes the
copy-in/copy-out path, grad_scale/found_inf, the 16-bit conversions, and the build/availability machinery.
"""

from __future__ import annotations

import pytest
import torch

from hf_fadam import FAdam
from hf_fadam.functional import fadam
from hf_fadam.kernels import _cpu_build, cpu_fused

from _harness import assert_trajectories_close, cpu_backend
from _tolerances import tolerance


pytestmark = pytest.mark.skipif(not cpu_fused.is_available(), reason="no working C compiler for the CPU kernel")

BIG = 70_001  # > the kernel's SMALL_NUMEL (65536): split across threads, per-thread partial sums
STEPS = 8


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(7)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    strided = rand(10, 12)[:, ::2]  # not dense: copied in and out by the kernel's wrapper
    assert not strided.is_contiguous()
    tensors = [
        rand(5, 7),  # 0 odd
        rand(9, 6).t(),  # 1 transposed view: dense, used in place
        rand(0, 3),  # 2 zero-size
        rand(()),  # 3 0-d
        rand(BIG),  # 4 big, all-zero gradient (every step: RMS(g) = 0, so ε̂ = ε)
        rand(331, 223).t(),  # 5 big, transposed (dense), frozen at steps 2..3
        rand(BIG + 64),  # 6 big, first gradient at step 4
        strided,  # 7 strided slice
        rand(300, 301),  # 8 big
        rand(127),  # 9 small
    ]
    return [torch.nn.Parameter(t) for t in tensors]


FROZEN = {5: range(2, 4), 6: range(0, 4)}


def _grad(step: int, i: int, param: torch.Tensor) -> torch.Tensor | None:
    if step in FROZEN.get(i, ()):
        return None
    if i == 4:
        return torch.zeros_like(param)
    gen = torch.Generator().manual_seed(1000 * step + i)
    scale = 10.0 ** (i % 4 - 3)  # 1e-3 .. 1: RMS(g) on both sides of 1
    return (scale * torch.randn(param.shape, generator=gen)).to(param.dtype)


def _groups(params):
    return [
        {"params": [params[0], params[1], params[4]]},  # the all-zero-gradient tensor with weight decay on
        {"params": params[2:4], "weight_decay": 0.0, "lr": 3e-3},
        {"params": params[5:7], "clip": 0.5, "p": 0.25, "betas": (0.8, 0.99)},
        {"params": params[7:9], "clip": 2.0, "p": 1.0, "eps": 1e-6},
        {"params": params[9:], "weight_decay": 0.3},
    ]


def _run(flags: dict, dtype: torch.dtype, maximize: bool = False, state_dtype=None, steps: int = STEPS):
    params = _params(dtype)
    opt = FAdam(_groups(params), lr=1e-2, maximize=maximize, state_dtype=state_dtype, **flags)
    history = []
    with cpu_backend("fused_c"):
        for step in range(steps):
            for i, param in enumerate(params):
                param.grad = _grad(step, i, param)
            opt.step()
            snap = []
            for param in params:
                st = opt.state.get(param, {})
                snap.append(
                    (
                        param.detach().clone(),
                        st.get("exp_avg", torch.zeros(0)).clone(),
                        st.get("fisher", torch.zeros(0)).clone(),
                        st.get("step", torch.zeros(())).clone(),
                    )
                )
            history.append(snap)
    return history, params, opt


@pytest.fixture(params=[1, 3], ids=["1thread", "3threads"])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def _state_dtype(dtype, state_dtype):
    if state_dtype is not None:
        return state_dtype
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


CASES = [
    (torch.float32, None),
    (torch.float64, None),
    (torch.bfloat16, None),
    (torch.float16, None),
    (torch.float32, torch.float64),
    (torch.float32, torch.bfloat16),  # 16-bit state: computed in fp32, stored once
]


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize(("dtype", "state_dtype"), CASES, ids=[f"{str(d)[6:]}-{str(s)[6:]}" for d, s in CASES])
def test_fused_c_matches_forloop(threads, dtype, state_dtype, maximize):
    expected, _, _ = _run({"foreach": False}, dtype, maximize, state_dtype)
    actual, params, opt = _run({"fused": True}, dtype, maximize, state_dtype)
    sdt = _state_dtype(dtype, state_dtype)
    param_tol = tolerance("fused_c", dtype) if state_dtype is None else tolerance("fused_c", sdt)
    if sdt == torch.float64:
        param_tol = tolerance("fused_c", torch.float32)
    assert_trajectories_close(actual, expected, param_tol, tolerance("fused_c", sdt))
    # the params were updated in place (no stray copies left behind) and kept their layout
    assert params[1].stride() == (1, 6) and params[7].stride() == (12, 2)
    assert all(torch.isfinite(p).all() for p in params)
    assert opt.state[params[6]]["step"].item() == STEPS - 4
    assert opt.state[params[5]]["step"].item() == STEPS - 2


def test_default_dispatch_picks_the_c_kernel_on_cpu(monkeypatch):
    from hf_fadam.functional import resolve_implementation

    monkeypatch.setenv("HF_FADAM_CPU_FUSED_BACKEND", "c")
    assert resolve_implementation([torch.zeros(3)], None, None) == "fused"


def test_deterministic_for_a_thread_count():
    torch.set_num_threads(2)
    a, _, _ = _run({"fused": True}, torch.float32, steps=3)
    b, _, _ = _run({"fused": True}, torch.float32, steps=3)
    for sa, sb in zip(a[-1], b[-1]):
        for x, y in zip(sa, sb):
            assert torch.equal(x, y)


def _direct_inputs(n=BIG, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen).to(dtype)
    g = (torch.randn(n, generator=gen) * 1e-2).to(dtype)
    sd = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    m = torch.randn(n, generator=gen).to(sd) * 1e-3
    f = torch.rand(n, generator=gen).to(sd) * 1e-4
    return p, g, m, f, torch.tensor(3.0)


HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, clip=1.0, p=0.5, maximize=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_scale_unscales_inside_the_kernel(dtype):
    p, g, m, f, step = _direct_inputs(dtype=dtype)
    ref = [t.clone() for t in (p, g, m, f, step)]
    scale = torch.tensor(1024.0)
    scaled_g = (g.float() * 1024.0).to(dtype)  # power-of-two scale: exact, also in bf16
    found_inf = torch.tensor(0.0)
    cpu_fused.fadam_cpu_([p], [scaled_g], [m], [f], [step], grad_scale=scale, found_inf=found_inf, **HYPER)
    cpu_fused.fadam_cpu_([ref[0]], [ref[1]], [ref[2]], [ref[3]], [ref[4]], **HYPER)
    for x, y in zip((p, m, f), (ref[0], ref[2], ref[3])):
        assert torch.equal(x, y)
    assert torch.equal(scaled_g, (g.float() * 1024.0).to(dtype))  # the grads themselves are not modified


@pytest.mark.parametrize("weight_decay", [0.1, 0.0], ids=["wd", "no_wd"])
def test_three_passes_with_a_reduce_equal_the_whole_step_bit_for_bit(threads, weight_decay):
    # With reduce=None the kernel runs hf_fadam_step_* (each small tensor's passes back to back); with a reduce,
    # pass A, reduce, pass B, reduce, pass C over all tensors. Same partition, same sums: identical results.
    sizes = [BIG, 10, 0, 300 * 301, 1, 65_536]
    runs = []
    for reduce in (None, lambda buf: None):
        lists = [_direct_inputs(n, seed=i) for i, n in enumerate(sizes)]
        p, g, m, f, step = (list(x) for x in zip(*lists))
        hyper = {**HYPER, "weight_decay": weight_decay}
        for _ in range(2):
            torch._foreach_add_(step, 1)
            cpu_fused.fadam_cpu_(p, g, m, f, step, reduce=reduce, **hyper)
        runs.append((p, m, f))
    for a, b in zip(*runs):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_found_inf_skips_the_step():
    p, g, m, f, step = _direct_inputs()
    before = [t.clone() for t in (p, m, f)]
    cpu_fused.fadam_cpu_(
        [p], [g], [m], [f], [step], grad_scale=torch.tensor(2.0), found_inf=torch.tensor(1.0), **HYPER
    )
    for x, y in zip((p, m, f), before):
        assert torch.equal(x, y)


def test_functional_fused_found_inf_rolls_back_steps():
    p, g, m, f, step = _direct_inputs(n=100)
    with cpu_backend("fused_c"):
        fadam(
            [p], [g], [m], [f], [step], fused=True, grad_scale=torch.tensor(1.0), found_inf=torch.tensor(1.0), **HYPER
        )
    assert step.item() == 3.0


def test_zero_size_and_empty_lists_are_noops():
    cpu_fused.fadam_cpu_([], [], [], [], [], **HYPER)
    e = torch.zeros(0, 5)
    cpu_fused.fadam_cpu_([e], [e.clone()], [e.clone()], [e.clone()], [torch.tensor(1.0)], **HYPER)


def test_every_float_dtype_pair_is_supported():
    floats = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    assert all(cpu_fused.is_supported(pd, sd) for pd in floats for sd in floats)


def test_unsupported_dtypes_raise_with_names():
    p = torch.zeros(4)
    bf = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="unsupported dtypes at index 0: param torch.float32, grad torch.bfloat16"):
        cpu_fused.fadam_cpu_([p], [bf.clone()], [p.clone()], [p.clone()], [torch.tensor(1.0)], **HYPER)


def test_mismatched_list_lengths_raise():
    p = torch.zeros(4)
    with pytest.raises(ValueError, match="list lengths differ"):
        cpu_fused.fadam_cpu_([p], [p], [p], [p], [], **HYPER)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_conversions_match_torch(dtype):
    """Every 16-bit pattern loads exactly, and stores round to nearest even exactly like torch's ``.to()``."""
    import ctypes

    lib = cpu_fused._get_lib()
    fn = lib.hf_fadam_bf16_roundtrip if dtype == torch.bfloat16 else lib.hf_fadam_f16_roundtrip
    all_bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            all_bits.float(),  # exact round trips, incl. inf, NaN, subnormals
            all_bits.float() * (1 + 2.0**-9),  # just past the 16-bit values: rounding
            torch.randn(100_000, generator=gen) * torch.logspace(-10, 6, 100_000),
            torch.tensor([65519.0, 65520.0, 7e4, 2.0**-25, 2.0**-24 * 1.5, 3e38, -3.4e38]),
        ]
    ).contiguous()
    h = torch.empty(x.numel(), dtype=torch.int16)
    back = torch.empty_like(x)
    vp = ctypes.c_void_p
    fn(vp(x.data_ptr()), vp(h.data_ptr()), vp(back.data_ptr()), ctypes.c_int64(x.numel()))
    expected = x.to(dtype)
    ours = h.view(dtype)
    nan = expected.isnan()
    assert torch.equal(ours.isnan(), nan)
    assert torch.equal(ours[~nan].view(torch.int16), expected[~nan].view(torch.int16))
    assert torch.equal(back[~nan], expected[~nan].float())


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """A cpu_fused module state as in a new process (nothing loaded yet), restored afterwards."""
    monkeypatch.setattr(cpu_fused, "_library", _cpu_build.LazyLibrary(cpu_fused._SOURCE, cpu_fused._load_lib))
    monkeypatch.setenv("HF_FADAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_FADAM_CPU_FUSED_BACKEND", "c")
    return tmp_path / "cache"


def test_build_goes_to_cache_dir_and_is_reused(fresh_loader):
    assert cpu_fused.is_available(), cpu_fused.unavailable_reason()
    lib = cpu_fused.library_path()
    assert lib.is_file() and fresh_loader in lib.parents
    assert not [q for q in lib.parent.iterdir() if q.name.startswith(".build-")]  # no temp files left behind
    mtime = lib.stat().st_mtime_ns
    again = cpu_fused._build(cpu_fused._compiler(), list(cpu_fused._FLAG_SETS[0]))
    assert again == lib and lib.stat().st_mtime_ns == mtime  # cached: not rebuilt


def test_no_compiler_means_unavailable_and_a_clear_error(fresh_loader, monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CC", raising=False)
    assert cpu_fused.is_available() is False
    assert "C compiler" in cpu_fused.unavailable_reason()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = FAdam([p])
    opt.step()  # fused=None picks foreach
    with pytest.raises(RuntimeError, match="fused=True"):
        FAdam([p], fused=True).step()
    with pytest.raises(RuntimeError, match="C compiler"):
        cpu_fused.fadam_cpu_([p.data], [p.grad], [torch.zeros(3)], [torch.zeros(3)], [torch.tensor(1.0)], **HYPER)


def test_build_failure_names_the_command_and_stderr(fresh_loader, monkeypatch, tmp_path):
    fake = tmp_path / "badcc"
    fake.write_text(
        "#!/bin/sh\ncase \"$1\" in --version) echo fake 1.0;; *) echo 'fake compiler says no' >&2; exit 3;; esac\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    assert not cpu_fused.is_available()
    reason = cpu_fused.unavailable_reason()
    assert "command:" in reason and str(fake) in reason and "fake compiler says no" in reason


def test_disable_switch(fresh_loader, monkeypatch):
    monkeypatch.setenv("HF_FADAM_DISABLE_CPU_KERNEL", "1")
    assert not cpu_fused.is_available()
    assert "HF_FADAM_DISABLE_CPU_KERNEL" in cpu_fused.unavailable_reason()
