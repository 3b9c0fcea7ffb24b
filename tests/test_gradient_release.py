"""Gradient release (``gradient_release=True``, hf_fadam._release): each parameter stepped inside backward.

The oracle is the same optimizer without gradient release, stepped after backward: params and every state tensor
must be bit-identical after each step (the same per-tensor kernels, step counts and random streams), on every
implementation, for fp32 and bf16 params in each param_rounding, with odd shapes, a zero-size tensor, a tensor whose
gradient is zero, a weight used twice (tied), several groups, and a tensor frozen and then unfrozen.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from hf_fadam import FAdam, FAdam8bit

from _harness import roundtrip


IMPLEMENTATIONS = {
    "forloop": (FAdam, dict(foreach=False, fused=False)),
    "foreach": (FAdam, dict(foreach=True)),
    "fused": (FAdam, dict(fused=True)),  # the C kernel on CPU (HF_FADAM_CPU_FUSED_BACKEND=c, set below)
    "8bit_foreach": (FAdam8bit, dict(foreach=True, min_8bit_size=64, block_size=32)),
    "8bit_fused": (FAdam8bit, dict(fused=True, min_8bit_size=64, block_size=32)),
}
# The Triton kernels (the GPU path) under the interpreter: slow on CPU, so fewer steps.
TRITON = {"fused_triton": IMPLEMENTATIONS["fused"], "8bit_fused_triton": IMPLEMENTATIONS["8bit_fused"]}


@pytest.fixture(autouse=True)
def c_kernel_on_cpu(monkeypatch):
    monkeypatch.setenv("HF_FADAM_CPU_FUSED_BACKEND", "c")


class Net(nn.Module):
    """Odd shapes, a tied weight (used twice), a zero-size param, a param whose gradient is always zero."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(23, 13)
        self.hidden = nn.Linear(13, 37)
        self.odd = nn.Parameter(torch.randn(5, 3, 7))
        self.empty = nn.Parameter(torch.empty(0, 4))
        self.unused = nn.Parameter(torch.randn(11))  # multiplied by 0: a zero gradient every step
        self.back = nn.Linear(37, 13)
        self.to(dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = self.back(torch.tanh(self.hidden(x)))
        logits = x @ self.embed.weight.T  # tied: the embedding's gradient accumulates from two uses
        extra = self.odd.float().square().mean() + 0.0 * self.unused.float().sum() + self.empty.float().sum()
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()) + extra


def groups(model: Net) -> list[dict]:
    matrices = [model.embed.weight, model.hidden.weight, model.back.weight, model.odd]
    rest = [model.hidden.bias, model.back.bias, model.empty, model.unused]
    return [{"params": matrices, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0, "lr": 3e-3}]


def assert_same(a: Net, oa, b: Net, ob) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        assert oa.state.get(p, {}).keys() == ob.state.get(q, {}).keys(), name
        for key, value in oa.state.get(p, {}).items():
            assert torch.equal(value, ob.state[q][key]), (name, key)


def run_pair(cls, kwargs, dtype, steps=5, unfreeze_at=None):
    a, b = Net(dtype), Net(dtype)
    if unfreeze_at is not None:  # frozen when the optimizers are built (no hook can be registered on it then)
        a.hidden.weight.requires_grad_(False)
        b.hidden.weight.requires_grad_(False)
    oa = cls(groups(a), lr=1e-2, **kwargs)
    ob = cls(groups(b), lr=1e-2, gradient_release=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        if step == unfreeze_at:
            a.hidden.weight.requires_grad_(True)
            b.hidden.weight.requires_grad_(True)
        tokens = torch.randint(0, 23, (3, 9), generator=gen)
        a(tokens).backward()
        oa.step()
        oa.zero_grad()
        b(tokens).backward()
        # every released param is stepped and its gradient gone (a param unfrozen since the last step() is stepped
        # by step(); from its next backward on it is released too)
        alive = [n for n, p in b.named_parameters() if p.grad is not None]
        assert alive == (["hidden.weight"] if step == unfreeze_at else []), alive
        ob.step()
        ob.zero_grad()
        assert_same(a, oa, b, ob)
        for group in (*oa.param_groups, *ob.param_groups):  # a scheduler's lr change reaches the hooks
            group["lr"] *= 0.8
    return a, oa, b, ob


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_released_steps_equal_step_after_backward_fp32(impl):
    cls, kwargs = IMPLEMENTATIONS[impl]
    run_pair(cls, kwargs, torch.float32)


@pytest.mark.parametrize("impl", list(TRITON))
def test_released_steps_equal_step_after_backward_triton(impl, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("HF_FADAM_CPU_FUSED_BACKEND", "triton")
    cls, kwargs = TRITON[impl]
    _, oa, _, _ = run_pair(cls, kwargs, torch.float32, steps=2)
    assert "Triton" in oa.describe_implementation()


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "kahan"])
@pytest.mark.parametrize("impl", ["forloop", "foreach", "fused", "8bit_fused"])
def test_released_steps_equal_step_after_backward_bf16(impl, rounding):
    cls, kwargs = IMPLEMENTATIONS[impl]
    _, oa, _, _ = run_pair(cls, {**kwargs, "param_rounding": rounding}, torch.bfloat16, steps=4)
    if rounding == "kahan":
        assert any("param_comp" in s for s in oa.state.values())


@pytest.mark.parametrize("impl", ["foreach", "fused", "8bit_fused"])
def test_frozen_then_unfrozen_param_is_released_from_its_next_backward(impl):
    cls, kwargs = IMPLEMENTATIONS[impl]
    _, _, b, ob = run_pair(cls, kwargs, torch.float32, steps=5, unfreeze_at=2)
    assert ob.state[b.hidden.weight]["step"].item() == 3.0


@pytest.mark.parametrize("impl", ["foreach", "8bit_fused"])
def test_checkpoints_move_between_released_and_plain_runs(impl):
    """A released run's state dict resumes a plain run and the other way round, exactly (the state is the same)."""
    cls, kwargs = IMPLEMENTATIONS[impl]
    a, oa, b, ob = run_pair(cls, kwargs, torch.float32, steps=3)
    # swap: the released run continues from the plain run's checkpoint and vice versa
    a2, b2 = copy.deepcopy(a), copy.deepcopy(b)
    oa2 = cls(groups(a2), lr=1e-2, gradient_release=True, **kwargs)
    ob2 = cls(groups(b2), lr=1e-2, **kwargs)
    oa2.load_state_dict(roundtrip(oa.state_dict()))
    ob2.load_state_dict(roundtrip(ob.state_dict()))
    tokens = torch.randint(0, 23, (3, 9), generator=torch.Generator().manual_seed(7))
    for model, opt in ((a, oa), (b2, ob2)):  # plain
        model(tokens).backward()
        opt.step()
        opt.zero_grad()
    for model, opt in ((a2, oa2), (b, ob)):  # released
        model(tokens).backward()
        opt.step()
    assert_same(a, oa, a2, oa2)
    assert_same(b2, ob2, b, ob)
    assert_same(a, oa, b, ob)


def test_no_gradient_outlives_its_step_and_peak_is_one_gradient_at_a_time():
    """Gradients die as they are used: during backward at most the gradients autograd is still accumulating live."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])
    opt = FAdam(model.parameters(), lr=1e-3, gradient_release=True)
    alive_counts = []

    def count(_):
        alive_counts.append(sum(p.grad is not None for p in model.parameters()))

    for p in model.parameters():  # runs after the release hook: the param's own gradient is gone already
        p.register_post_accumulate_grad_hook(count)
    model(torch.randn(4, 64)).square().mean().backward()
    assert max(alive_counts) == 0
    assert all(p.grad is None for p in model.parameters())
    assert all(s["step"].item() == 1 for s in opt.state.values()) and len(opt.state) == 12


def test_step_hooks_and_closure_keep_torch_contract():
    model = nn.Linear(5, 3)
    opt = FAdam(model.parameters(), lr=1e-2, gradient_release=True)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

    def closure():
        loss = model(torch.ones(2, 5)).sum()
        loss.backward()  # the params are stepped inside this backward
        return loss

    before = model.weight.detach().clone()
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and calls == ["pre", "post"]
    assert not torch.equal(before, model.weight) and model.weight.grad is None


def test_hand_set_gradients_are_stepped_by_step():
    model = nn.Linear(4, 2)
    opt = FAdam(model.parameters(), lr=1e-2, gradient_release=True)
    ref = copy.deepcopy(model)
    ref_opt = FAdam(ref.parameters(), lr=1e-2)
    for m in (model, ref):
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.5)
    opt.step()
    ref_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_a_newer_optimizer_takes_the_params_over_with_a_warning():
    model = nn.Linear(4, 2)
    old = FAdam(model.parameters(), lr=1e-2, gradient_release=True)
    with pytest.warns(UserWarning, match="was released by another optimizer; this one steps it from now on"):
        new = FAdam(model.parameters(), lr=1e-2, gradient_release=True)
    model(torch.ones(1, 4)).sum().backward()
    assert not old.state and all(s["step"].item() == 1 for s in new.state.values())


def test_detach_and_deleted_optimizer_release_nothing():
    from hf_fadam import _release

    model = nn.Linear(4, 2)
    opt = FAdam(model.parameters(), lr=1e-2, gradient_release=True)
    _release.detach(opt)
    model(torch.ones(1, 4)).sum().backward()
    assert model.weight.grad is not None and not opt.state
    model.zero_grad()
    opt2 = FAdam(model.parameters(), lr=1e-2, gradient_release=True)
    del opt2
    import gc

    gc.collect()
    model(torch.ones(1, 4)).sum().backward()  # the dead optimizer's hooks do nothing
    assert model.weight.grad is not None


def test_pickle_and_deepcopy_keep_the_setting():
    model = nn.Linear(4, 2)
    opt = FAdam8bit(model.parameters(), lr=1e-2, gradient_release=True)
    for copied in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        assert copied.gradient_release is True
        p = copied.param_groups[0]["params"][0]
        p.sum().backward()  # a copy releases its own (copied) params
        assert p.grad is None and copied.state[p]["step"].item() == 1
    assert not opt.state


@pytest.mark.parametrize("value", [1, "yes", None])
def test_bad_gradient_release_value_is_refused_by_name(value):
    with pytest.raises(ValueError, match=f"Invalid gradient_release: {value!r}"):
        FAdam([nn.Parameter(torch.ones(2))], gradient_release=value)


def test_fsdp1_flat_params_are_refused():
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    p = nn.Parameter(torch.ones(8))
    _set_fsdp_flattened(p)
    with pytest.raises(ValueError, match=r"FAdam8bit\(gradient_release=True\) refuses FSDP1 parameters"):
        FAdam8bit([p], gradient_release=True, allow_flat_shards=True)


def test_dtensor_params_are_refused(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match=r"FAdam\(gradient_release=True\) refuses DTensor parameters"):
            FAdam([p], gradient_release=True)
    finally:
        dist.destroy_process_group()


def _two_ranks(rank: int, path: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    messages = []
    try:
        try:
            FAdam(nn.Linear(2, 2).parameters(), gradient_release=True)
        except RuntimeError as exc:
            messages.append(str(exc))
        model = nn.Linear(2, 2)
        opt = FAdam(model.parameters())
        opt.gradient_release = True  # a process group started after the optimizer was built: refused at the hook
        from hf_fadam import _release

        _release.attach(opt)
        try:
            model(torch.ones(1, 2)).sum().backward()
        except RuntimeError as exc:
            messages.append(str(exc))
    finally:
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as fh:
        fh.write("\n".join(messages))


def test_a_process_group_of_two_is_refused(tmp_path):
    import torch.multiprocessing as mp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.spawn(_two_ranks, args=(str(tmp_path / "pg"), str(tmp_path / "out")), nprocs=2, join=True)
    for rank in range(2):
        messages = (tmp_path / f"out.{rank}").read_text().split("\n")
        assert len(messages) == 2, messages
        for message in messages:
            assert "refuses a process group of 2 processes: DDP" in message
