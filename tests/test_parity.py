"""Every implementation against the for-loop reference, on params and state, over 7 steps of awkward inputs."""

import pytest
import torch

from _harness import assert_trajectories_close, trajectory
from _tolerances import tolerance


def _available(impl: str) -> bool:
    if impl == "fused_c":
        try:
            from hf_fadam.kernels import cpu_fused
        except ImportError:
            return False
        return cpu_fused.is_available()
    if impl == "fused_triton":
        try:
            from hf_fadam.kernels import triton_fadam
        except ImportError:
            return False
        # The trajectories use CPU tensors: the Triton kernels reach them only through the interpreter.
        return triton_fadam.is_available() and triton_fadam._interpreting()
    return True


CASES = [
    ("foreach", torch.float64),
    ("foreach", torch.float32),
    ("foreach", torch.bfloat16),
    ("fused_c", torch.float64),
    ("fused_c", torch.float32),
    ("fused_c", torch.bfloat16),
    ("fused_triton", torch.float32),
    ("fused_triton", torch.bfloat16),
]


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize(("impl", "dtype"), CASES, ids=[f"{i}-{str(d)[6:]}" for i, d in CASES])
def test_matches_forloop(impl, dtype, maximize):
    if not _available(impl):
        pytest.skip(f"{impl} is not available on this machine")
    expected, _ = trajectory("forloop", dtype, maximize=maximize)
    actual, _ = trajectory(impl, dtype, maximize=maximize)
    state_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    assert_trajectories_close(actual, expected, tolerance(impl, dtype), tolerance(impl, state_dtype))


def test_state_dtype_defaults_and_override():
    _, opt = trajectory("forloop", torch.bfloat16, steps=1)
    for state in opt.state.values():
        assert state["exp_avg"].dtype == torch.float32 and state["fisher"].dtype == torch.float32
    _, opt = trajectory("foreach", torch.float32, steps=1, state_dtype="bfloat16")
    for state in opt.state.values():
        assert state["exp_avg"].dtype == torch.bfloat16 and state["fisher"].dtype == torch.bfloat16


def test_bf16_params_track_fp32_run():
    # bf16 params with fp32 state follow an fp32 run of the same problem closely (cosine similarity per tensor).
    run32, _ = trajectory("foreach", torch.float32)
    run16, _ = trajectory("foreach", torch.bfloat16)
    for (p32, *_), (p16, *_) in zip(run32[-1], run16[-1]):
        if p32.numel() > 1:
            cos = torch.nn.functional.cosine_similarity(p32.flatten(), p16.float().flatten(), dim=0)
            assert cos > 0.999


def test_default_dispatch_runs_and_matches():
    expected, _ = trajectory("forloop", torch.float32)
    from _harness import IMPL_FLAGS

    IMPL_FLAGS["default"] = {}
    try:
        actual, _ = trajectory("default", torch.float32)
    finally:
        del IMPL_FLAGS["default"]
    assert_trajectories_close(
        actual, expected, tolerance("fused_c", torch.float32), tolerance("fused_c", torch.float32)
    )


def test_default_dispatch_falls_back_when_the_cpu_kernel_lacks_the_dtype_pair(monkeypatch):
    # A pair the C kernel does not implement (today it implements all 16 float pairs; simulated here): fused=None
    # must pick foreach, not raise.
    monkeypatch.setenv("HF_FADAM_CPU_FUSED_BACKEND", "c")
    from hf_fadam.functional import resolve_implementation
    from hf_fadam.kernels import cpu_fused

    monkeypatch.setattr(cpu_fused, "is_supported", lambda pd, sd: (pd, sd) != (torch.float32, torch.bfloat16))
    params = [torch.zeros(3)]
    assert resolve_implementation(params, None, None, [torch.zeros(3, dtype=torch.bfloat16)]) == "foreach"
    assert resolve_implementation(params, None, None, [torch.zeros(3)]) == "fused"
    from hf_fadam import FAdam

    param = torch.nn.Parameter(torch.randn(5))
    opt = FAdam([param], state_dtype="bfloat16")  # both flags None
    param.grad = torch.randn(5)
    opt.step()
    assert opt.state[param]["fisher"].dtype == torch.bfloat16 and torch.isfinite(param).all()
