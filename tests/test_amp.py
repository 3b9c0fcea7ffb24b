"""torch.amp.GradScaler drives FAdam(fused=True): it hands over grad_scale/found_inf and the kernel unscales."""

import pytest
import torch

from hf_fadam import FAdam

from _tolerances import tolerance


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _available():
    from hf_fadam.kernels import cpu_fused

    return cpu_fused.is_available()


@pytest.mark.skipif(not _available(), reason="the CPU kernel cannot be built here (no C compiler)")
def test_grad_scaler_matches_unscaled_run_and_skips_inf_steps(monkeypatch):
    monkeypatch.setenv("HF_FADAM_CPU_FUSED_BACKEND", "c")
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen)

    plain, scaled = _model(), _model()
    opt_plain = FAdam(plain.parameters(), lr=1e-2, fused=True)
    opt_scaled = FAdam(scaled.parameters(), lr=1e-2, fused=True)
    assert opt_scaled._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)

    for step in range(5):
        opt_plain.zero_grad()
        torch.nn.functional.cross_entropy(plain(x), y).backward()
        opt_plain.step()

        opt_scaled.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(scaled(x), y)).backward()
        before = [p.detach().clone() for p in scaled.parameters()]
        if step == 2:  # an overflowing step: GradScaler must skip it and lower the scale
            next(scaled.parameters()).grad[0, 0] = float("inf")
        scaler.step(opt_scaled)
        scaler.update()
        if step == 2:
            assert all(torch.equal(a, b.detach()) for a, b in zip(before, scaled.parameters()))
            assert scaler.get_scale() == 512.0
            # replay the skipped step unscaled so both runs see the same number of updates
            opt_scaled.zero_grad()
            torch.nn.functional.cross_entropy(scaled(x), y).backward()
            opt_scaled.step()

    atol, rtol = tolerance("fused_c", torch.float32)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(b.detach(), a.detach(), atol=atol, rtol=rtol)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(opt_plain.state[a]["step"], opt_scaled.state[b]["step"])  # the skipped step is not counted
