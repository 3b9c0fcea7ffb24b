"""Property tests (hypothesis) for the shared helpers: the RMS clip and the adaptive epsilon."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_fadam._math import adaptive_eps, clip_divisor, fisher_beta, rms


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=64)
vectors = st.lists(finite, min_size=1, max_size=64).map(lambda v: torch.tensor(v, dtype=torch.float64))
clips = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(vectors, clips)
def test_clip_bounds_rms_and_only_shrinks(x, c):
    y = x / clip_divisor(rms(x), c)
    assert rms(y).item() <= c * (1 + 1e-12)
    assert (y.abs() <= x.abs() * (1 + 1e-12)).all()  # never amplifies, whatever c
    if rms(x).item() <= c:
        assert torch.equal(y, x)  # inside the threshold it is the identity
    else:
        assert math.isclose(rms(y).item(), c, rel_tol=1e-9)  # above, it lands exactly on the threshold
        # direction unchanged
        assert torch.allclose(y * (rms(x) / c), x, rtol=1e-9, atol=1e-300)


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=0, max_value=1e6, allow_nan=False), st.floats(min_value=0, max_value=1e-2))
def test_adaptive_eps_is_eps_times_min_one_rms_and_guarded_at_zero(r, eps):
    out = adaptive_eps(eps, torch.tensor(r, dtype=torch.float64)).item()
    expected = eps if r == 0 else eps * min(1.0, r)
    assert out == expected
    assert 0 <= out <= eps and math.isfinite(out)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=100_000), st.floats(min_value=0.0, max_value=0.9999))
def test_fisher_beta_matches_definition(t, beta2):
    out = fisher_beta(beta2, torch.tensor(float(t))).item()
    if t == 1:
        assert out == 0.0
    else:
        assert math.isclose(out, beta2 * (1 - beta2 ** (t - 1)) / (1 - beta2**t), rel_tol=1e-12, abs_tol=1e-300)
    assert 0 <= out < 1


def test_rms_of_empty_tensor_is_zero_not_nan():
    assert rms(torch.zeros(0)).item() == 0.0
