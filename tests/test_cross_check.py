"""An independent cross-check: pytorch_optimizer's FAdam (4.1.0) at matching settings.

Its adaptive ε is min(ε, ε₂·RMS(g))^(2p) instead of our ε·min(1, RMS(g)); with gradients far above ε the two
agree to ~ε/|g|, so the trajectories must match closely. Its step counter is per group, ours per tensor: every
tensor gets a gradient at every step here, so that difference does not show.
"""

import pytest
import torch

from hf_fadam import FAdam


pytorch_optimizer = pytest.importorskip("pytorch_optimizer")


@pytest.mark.parametrize("clip", [1.0, 0.5])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_pytorch_optimizer_fadam(clip, weight_decay):
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 8), (8,), (3, 5, 2)]
    init = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    kw = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=weight_decay, clip=clip, p=0.5, eps=1e-8)
    opt_ours = FAdam(ours, foreach=False, **kw)
    opt_theirs = pytorch_optimizer.FAdam(
        theirs, momentum_dtype=torch.float64, fim_dtype=torch.float64, foreach=False, **kw
    )
    for _ in range(10):
        grads = [0.1 * torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    # Elements whose |g| is within a few decades of ε feel the different ε̂ formula most: ~1e-7 absolute in m.
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(opt_ours.state[p]["exp_avg"], opt_theirs.state[q]["momentum"], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(opt_ours.state[p]["fisher"], opt_theirs.state[q]["fim"], rtol=1e-10, atol=0)
