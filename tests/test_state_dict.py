"""The state dict is a contract: exact resume, weights_only loading, state dtypes kept."""


import pytest
import torch

from hf_fadam import FAdam

from _harness import IMPL_FLAGS, cpu_backend, grad_for, make_params, param_groups, roundtrip


def _run(opt, params, steps):
    for step in steps:
        for i, param in enumerate(params):
            param.grad = grad_for(step, i, param)
        opt.step()


@pytest.mark.parametrize("impl", ["forloop", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_save_load_continue_is_bit_exact(impl, dtype):
    with cpu_backend(impl):
        params = make_params(dtype)
        opt = FAdam(param_groups(params), lr=1e-2, **IMPL_FLAGS[impl])
        _run(opt, params, range(0, 4))
        saved_params = [p.detach().clone() for p in params]
        saved = roundtrip(opt.state_dict())
        _run(opt, params, range(4, 8))  # the uninterrupted run

        fresh = [torch.nn.Parameter(p) for p in saved_params]
        resumed = FAdam(param_groups(fresh), lr=1e-2, **IMPL_FLAGS[impl])
        resumed.load_state_dict(saved)
        _run(resumed, fresh, range(4, 8))

    for a, b in zip(params, fresh):
        assert torch.equal(a.detach(), b.detach())
        for key in ("exp_avg", "fisher", "step"):
            if a in opt.state:
                x, y = opt.state[a][key], resumed.state[b][key]
                assert x.dtype == y.dtype and torch.equal(x, y), key


def test_bf16_params_keep_fp32_state_after_load():
    param = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    opt = FAdam([param])
    param.grad = torch.randn(8, dtype=torch.bfloat16)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[param].items()}
    fresh = torch.nn.Parameter(param.detach().clone())
    opt2 = FAdam([fresh])
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    state = opt2.state[fresh]
    assert state["exp_avg"].dtype == torch.float32 and state["fisher"].dtype == torch.float32
    assert state["step"].dtype == torch.float32
    assert torch.equal(state["fisher"], before["fisher"])  # not rounded through bf16


def test_loaded_state_does_not_alias_the_source():
    param = torch.nn.Parameter(torch.randn(4))
    opt = FAdam([param])
    param.grad = torch.randn(4)
    opt.step()
    opt2 = FAdam([torch.nn.Parameter(param.detach().clone())])
    opt2.load_state_dict(opt.state_dict())
    (state2,) = opt2.state.values()
    assert state2["fisher"].data_ptr() != opt.state[param]["fisher"].data_ptr()


def test_state_dict_keys_and_group_hyperparameters_round_trip():
    param = torch.nn.Parameter(torch.randn(3))
    opt = FAdam([param], lr=0.5, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.2, clip=2.0, p=0.25, state_dtype="fp64")
    param.grad = torch.randn(3)
    opt.step()
    sd = roundtrip(opt.state_dict())
    assert set(sd["state"][0]) == {"step", "exp_avg", "fisher"}
    group = sd["param_groups"][0]
    assert group["betas"] == (0.8, 0.9) and group["clip"] == 2.0 and group["p"] == 0.25
    assert group["state_dtype"] == torch.float64
    opt2 = FAdam([torch.nn.Parameter(param.detach().clone())])
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["state_dtype"] == torch.float64
    assert next(iter(opt2.state.values()))["fisher"].dtype == torch.float64


def _trained_bf16_fadam():
    param = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    opt = FAdam([param])
    param.grad = torch.randn(8, dtype=torch.bfloat16)
    opt.step()
    return opt, param


def test_load_pre_hook_edits_of_state_are_loaded():
    """torch's contract (AdamW honours it): what a load_state_dict pre-hook returns is what gets loaded."""
    opt, param = _trained_bf16_fadam()
    saved = roundtrip(opt.state_dict())
    fisher = saved["state"][0]["fisher"]
    fresh = torch.nn.Parameter(param.detach().clone())
    opt2 = FAdam([fresh])
    seen_by_hook = []

    def rescale_fisher(optimizer, state_dict):
        seen_by_hook.append(optimizer)
        state = {k: {**v, "fisher": v["fisher"] * 3.0} for k, v in state_dict["state"].items()}
        return {**state_dict, "state": state}

    opt2.register_load_state_dict_pre_hook(rescale_fisher)
    opt2.load_state_dict(saved)
    assert seen_by_hook == [opt2]
    loaded = opt2.state[fresh]["fisher"]
    assert loaded.dtype == torch.float32  # still the state dtype, not the bf16 param dtype
    assert torch.equal(loaded, fisher * 3.0)
    assert torch.equal(saved["state"][0]["fisher"], fisher)  # the caller's dict is not modified


def test_load_pre_hook_in_place_edit_is_loaded():
    opt, param = _trained_bf16_fadam()
    saved = roundtrip(opt.state_dict())
    fresh = torch.nn.Parameter(param.detach().clone())
    opt2 = FAdam([fresh])

    def bump_step(optimizer, state_dict):
        state_dict["state"][0]["step"] = torch.tensor(41.0)

    opt2.register_load_state_dict_pre_hook(bump_step)
    opt2.load_state_dict(saved)
    step = opt2.state[fresh]["step"]
    assert step.dtype == torch.float32 and step.item() == 41.0


def test_load_post_hook_sees_the_loaded_state():
    opt, param = _trained_bf16_fadam()
    saved = roundtrip(opt.state_dict())
    fresh = torch.nn.Parameter(param.detach().clone())
    opt2 = FAdam([fresh])
    seen = {}

    def record(optimizer):
        state = optimizer.state[fresh]
        seen.update({k: (v.dtype, v.clone()) for k, v in state.items()})

    opt2.register_load_state_dict_post_hook(record)
    opt2.load_state_dict(saved)
    assert set(seen) == {"step", "exp_avg", "fisher", "param_comp"}  # bf16 params: Kahan-compensated by default
    assert seen["fisher"][0] == torch.float32 and seen["exp_avg"][0] == torch.float32
    assert seen["param_comp"][0] == torch.bfloat16 and torch.equal(seen["param_comp"][1], opt.state[param]["param_comp"])
    assert torch.equal(seen["fisher"][1], opt.state[param]["fisher"])  # not rounded through bf16
    assert seen["step"] == (torch.float32, torch.tensor(1.0))


def _load_through_hooks(cls):
    """Load a trained ``cls`` state dict through a pre-hook that zeroes exp_avg and a post-hook that records."""
    param = torch.nn.Parameter(torch.randn(4))
    opt = cls([param])
    param.grad = torch.randn(4)
    opt.step()
    saved = roundtrip(opt.state_dict())
    fresh = torch.nn.Parameter(param.detach().clone())
    opt2 = cls([fresh])
    post_seen = []

    def zero_exp_avg(optimizer, state_dict):
        state = {k: {**v, "exp_avg": v["exp_avg"] * 0} for k, v in state_dict["state"].items()}
        return {**state_dict, "state": state}

    opt2.register_load_state_dict_pre_hook(zero_exp_avg)
    opt2.register_load_state_dict_post_hook(lambda o: post_seen.append(sorted(o.state[fresh])))
    opt2.load_state_dict(saved)
    return post_seen, torch.count_nonzero(opt2.state[fresh]["exp_avg"]).item()


def test_load_hooks_behave_as_for_torch_adamw():
    """The same hooks on AdamW and FAdam: the pre-hook's edit is loaded and the post-hook sees the state."""
    adamw_seen, adamw_nonzero = _load_through_hooks(torch.optim.AdamW)
    fadam_seen, fadam_nonzero = _load_through_hooks(FAdam)
    assert adamw_seen == [["exp_avg", "exp_avg_sq", "step"]] and adamw_nonzero == 0
    assert fadam_seen == [["exp_avg", "fisher", "step"]] and fadam_nonzero == 0


def test_state_not_assigned_to_a_param_is_kept_as_saved():
    param = torch.nn.Parameter(torch.randn(4))
    opt = FAdam([param])
    param.grad = torch.randn(4)
    opt.step()
    sd = opt.state_dict()
    extra = torch.ones(2, dtype=torch.float64)
    sd["state"]["not-a-param"] = {"buffer": extra}
    opt2 = FAdam([torch.nn.Parameter(param.detach().clone())])
    opt2.load_state_dict(sd)
    assert opt2.state["not-a-param"]["buffer"] is extra
