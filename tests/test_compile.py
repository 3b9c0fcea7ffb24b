"""``torch.compile(opt.step)`` traces our step without graph breaks and matches eager."""

import pytest
import torch

from hf_fadam import FAdam

from _tolerances import tolerance


def _params():
    gen = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(5, 7, generator=gen)),
        torch.nn.Parameter(torch.randn(11, generator=gen)),
        torch.nn.Parameter(torch.zeros(3, 2)),  # gets an all-zero gradient
    ]


def _grads(step, params):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.zeros_like(p) if i == 2 else 0.1 * torch.randn(p.shape, generator=gen) for i, p in enumerate(params)]


def test_compiled_step_matches_eager_without_graph_breaks():
    torch._dynamo.reset()
    eager_params, compiled_params = _params(), _params()
    eager = FAdam(eager_params, lr=1e-2)
    compiled = FAdam(compiled_params, lr=1e-2)

    @torch.compile(fullgraph=True, backend="inductor")
    def compiled_step():
        compiled.step()

    for step in range(4):
        for params in (eager_params, compiled_params):
            for p, g in zip(params, _grads(step, params)):
                p.grad = g
        eager.step()
        compiled_step()
        atol, rtol = tolerance("compiled", torch.float32)
        for a, b in zip(eager_params, compiled_params):
            torch.testing.assert_close(b.detach(), a.detach(), atol=atol, rtol=rtol)
            for key in ("exp_avg", "fisher", "step"):
                torch.testing.assert_close(compiled.state[b][key], eager.state[a][key], atol=atol, rtol=rtol)


@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
def test_each_implementation_traces_fullgraph(foreach):
    torch._dynamo.reset()
    params = _params()
    opt = FAdam(params, foreach=foreach)
    for p, g in zip(params, _grads(0, params)):
        p.grad = g

    def step():
        opt.step()

    explanation = torch._dynamo.explain(step)()
    assert explanation.graph_break_count == 0, explanation.break_reasons
