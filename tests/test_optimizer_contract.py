"""The contract every torch optimizer keeps, held by FAdam and FAdam8bit alike (in the spirit of torch's OptimizerInfo
suite): param groups (generators included), for-loop/foreach/fused parity, state-dict round trips (older formats
included), the load/state-dict/step hooks, deepcopy and pickle, zero-size and no-grad params, and clear errors.

And what a checkpoint may not do: reach a kernel with state that does not fit its parameter (a crafted
``fisher_sqrt_scale`` of another dtype or count was a heap overflow in the C kernel), nor load into the other class
silently.
"""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch

from hf_fadam import FAdam, FAdam8bit
from hf_fadam._quant import dequantize_blockwise
from hf_fadam.kernels import cpu_fused, cpu_fused_8bit

from _harness import roundtrip


needs_c = pytest.mark.skipif(
    not cpu_fused_8bit.is_available() or not cpu_fused.is_available(), reason="no C compiler for the CPU kernels"
)
triton_interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton kernels run on CPU under TRITON_INTERPRET=1 only"
)

# FAdam8bit with small thresholds, so that the test model has 8-bit tensors (several blocks, a partial one) and
# fp32-state ones in the same group.
EIGHT_BIT = dict(block_size=32, min_8bit_size=64)
CLASSES = {"FAdam": (FAdam, {}), "FAdam8bit": (FAdam8bit, EIGHT_BIT)}
IMPLS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


@pytest.fixture(autouse=True)
def _c_backend_for_fused(monkeypatch):
    # fused=True on CPU means the C kernels here (CI sets TRITON_INTERPRET=1, which would route it to Triton).
    monkeypatch.setenv("HF_FADAM_CPU_FUSED_BACKEND", "c")


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    """An odd 8-bit tensor (3 blocks of 32, the last partial), a non-contiguous 8-bit one, a small fp32-state one,
    a 0-d one, a zero-size one and one that never gets a gradient."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(7, 11, generator=gen),
        torch.randn(12, 9, generator=gen).t(),
        torch.randn(5, generator=gen),
        torch.randn((), generator=gen),
        torch.randn(0, 3, generator=gen),
        torch.randn(4, 4, generator=gen),
    ]
    return [torch.nn.Parameter(t) for t in tensors]


NO_GRAD = 5


def _set_grads(params, step: int) -> None:
    for i, p in enumerate(params):
        if i == NO_GRAD:
            p.grad = None
            continue
        gen = torch.Generator().manual_seed(1000 * step + i)
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _make(name: str, params, impl: str = "foreach", **kw):
    cls, extra = CLASSES[name]
    return cls(params, lr=1e-2, **extra, **IMPLS[impl], **kw)


def _run(opt, params, steps) -> None:
    for step in steps:
        _set_grads(params, step)
        opt.step()


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor), name
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), name


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], [{k: v.clone() for k, v in opt.state[p].items()} for p in params]


CLASS_NAMES = pytest.mark.parametrize("name", list(CLASSES))


# ----------------------------------------------------------------------------------------------- param groups
@CLASS_NAMES
def test_a_group_whose_params_is_a_generator_keeps_them_all(name):
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Linear(12, 8))
    before = [p.detach().clone() for p in model.parameters()]
    opt = _make(name, [{"params": model.parameters()}])  # torch's per-parameter-options pattern
    assert len(opt.param_groups[0]["params"]) == 4
    opt.add_param_group({"params": (p for p in [torch.nn.Parameter(torch.ones(3))]), "lr": 1e-3})
    assert len(opt.param_groups[1]["params"]) == 1
    model(torch.randn(2, 8)).square().sum().backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@CLASS_NAMES
def test_param_group_errors_are_torchs(name):
    p = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(TypeError, match="ordered collections"):
        _make(name, [{"params": {p}}])
    with pytest.raises(ValueError, match="more than one parameter group"):
        _make(name, [{"params": [p]}, {"params": [p]}])
    with pytest.raises(ValueError, match="empty parameter list"):
        _make(name, [])


@CLASS_NAMES
def test_group_hyperparameters_are_used_per_group(name):
    a, b = torch.nn.Parameter(torch.ones(100)), torch.nn.Parameter(torch.ones(100))
    opt = _make(name, [{"params": [a]}, {"params": [b], "lr": 0.0}], weight_decay=0.0)
    a.grad, b.grad = torch.ones(100), torch.ones(100)
    opt.step()
    assert not torch.equal(a, torch.ones(100)) and torch.equal(b, torch.ones(100))


# ----------------------------------------------------------------------------------------------- implementations
@CLASS_NAMES
@pytest.mark.parametrize("impl", ["forloop", pytest.param("fused", marks=needs_c)])
def test_implementations_agree_with_foreach_on_params_and_state(name, impl):
    """Params and state over 5 steps; the 8-bit codes may differ by one code where the fp32 math rounds across a
    code boundary (a flip), so 8-bit state is compared dequantized, within one code step."""
    ref_params, params = _params(), _params()
    ref, opt = _make(name, ref_params, "foreach"), _make(name, params, impl)
    for step in range(5):
        _set_grads(ref_params, step)
        _set_grads(params, step)
        ref.step()
        opt.step()
    for i, (p_ref, p) in enumerate(zip(ref_params, params)):
        torch.testing.assert_close(p, p_ref, atol=1e-5, rtol=1e-4, msg=f"param {i}")
        s_ref, s = ref.state.get(p_ref, {}), opt.state.get(p, {})
        assert s_ref.keys() == s.keys()
        if "fisher_sqrt" in s:
            for codes, scale in (("exp_avg", "exp_avg_scale"), ("fisher_sqrt", "fisher_sqrt_scale")):
                x = dequantize_blockwise(s[codes], s[scale], EIGHT_BIT["block_size"])
                y = dequantize_blockwise(s_ref[codes], s_ref[scale], EIGHT_BIT["block_size"])
                block_max = y.abs().amax().clamp_min(1e-30)
                assert ((x - y).abs() <= 0.07 * y.abs() + 1e-3 * block_max).all(), f"param {i} {codes}"
        else:
            for key in s:
                torch.testing.assert_close(s[key], s_ref[key], atol=1e-5, rtol=1e-4, msg=f"param {i} {key}")


@CLASS_NAMES
@pytest.mark.parametrize("impl", ["forloop", "foreach", pytest.param("fused", marks=needs_c)])
def test_zero_size_and_no_grad_params(name, impl):
    params = _params()
    opt = _make(name, params, impl)
    _run(opt, params, range(3))
    assert params[NO_GRAD] not in opt.state  # no gradient, no state, unchanged
    assert float(opt.state[params[4]]["step"]) == 3 and params[4].numel() == 0
    assert all(float(opt.state[p]["step"]) == 3 for i, p in enumerate(params) if i != NO_GRAD)


# ----------------------------------------------------------------------------------------------- state dict
@CLASS_NAMES
@pytest.mark.parametrize("impl", ["foreach", pytest.param("fused", marks=needs_c)])
@pytest.mark.parametrize("old_step_format", [False, True], ids=["tensor_step", "number_step"])
def test_state_dict_round_trip_resumes_bit_exactly(name, impl, old_step_format):
    params = _params()
    opt = _make(name, params, impl)
    _run(opt, params, range(3))
    saved = roundtrip(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    if old_step_format:  # older checkpoints (and some converters) store step as a Python number
        for value in saved["state"].values():
            value["step"] = float(value["step"])
    _run(opt, params, range(3, 6))

    fresh = [torch.nn.Parameter(t.clone()) for t in saved_params]
    resumed = _make(name, fresh, impl)
    resumed.load_state_dict(saved)
    for p in fresh:
        if p in resumed.state:
            step = resumed.state[p]["step"]
            assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.dim() == 0
    _run(resumed, fresh, range(3, 6))
    for i, (p, q) in enumerate(zip(params, fresh)):
        assert torch.equal(p, q), f"param {i}"
        if p in opt.state:
            _assert_same_state(opt.state[p], resumed.state[q])
    assert resumed.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


@CLASS_NAMES
def test_load_does_not_alias_or_modify_the_source(name):
    params = _params()
    opt = _make(name, params)
    _run(opt, params, range(2))
    saved = opt.state_dict()
    before = copy.deepcopy(saved)
    other = _make(name, _params())
    other.load_state_dict(saved)
    _run(other, other.param_groups[0]["params"], range(2, 4))
    for key, value in saved["state"].items():
        _assert_same_state(value, before["state"][key])


# ----------------------------------------------------------------------------------------------- hooks
@CLASS_NAMES
def test_load_state_dict_hooks_follow_torchs_contract(name):
    """Pre-hooks see the whole state dict and their edits are loaded; post-hooks see the loaded state."""
    params = _params()
    opt = _make(name, params)
    _run(opt, params, range(2))
    saved = opt.state_dict()
    target = _make(name, _params())
    seen = {}

    def pre(optimizer, state_dict):
        seen["pre"] = (len(optimizer.state), sorted(state_dict["state"]))
        state_dict = copy.deepcopy(state_dict)
        for value in state_dict["state"].values():
            value["step"] = torch.tensor(41.0)
        return state_dict

    def post(optimizer):
        seen["post"] = sorted({float(s["step"]) for s in optimizer.state.values()})

    target.register_load_state_dict_pre_hook(pre)
    target.register_load_state_dict_post_hook(post)
    target.load_state_dict(saved)
    assert seen["pre"] == (0, sorted(saved["state"]))
    assert seen["post"] == [41.0]
    assert {float(s["step"]) for s in target.state.values()} == {41.0}
    assert all(s["step"].dtype == torch.float32 for s in target.state.values())


@CLASS_NAMES
def test_state_dict_and_step_hooks_run(name):
    params = _params()
    opt = _make(name, params)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("step_pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("step_post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))

    def sd_post(o, state_dict):
        calls.append("sd_post")
        state_dict["extra"] = 1
        return state_dict

    opt.register_state_dict_post_hook(sd_post)
    _run(opt, params, range(1))
    assert opt.state_dict()["extra"] == 1
    assert calls == ["step_pre", "step_post", "sd_pre", "sd_post"]


# ----------------------------------------------------------------------------------------------- copies
@CLASS_NAMES
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_keep_groups_and_state(name, how):
    params = _params()
    opt = _make(name, params)
    _run(opt, params, range(2))
    if how == "deepcopy":
        twin_params, twin = copy.deepcopy((params, opt))
    else:
        twin_params, twin = pickle.loads(pickle.dumps((params, opt)))
    assert type(twin) is type(opt)
    assert twin.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    _run(opt, params, range(2, 4))
    _run(twin, twin_params, range(2, 4))
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
        if p in opt.state:
            _assert_same_state(opt.state[p], twin.state[q])


# ----------------------------------------------------------------------------------------------- what is refused
@CLASS_NAMES
def test_unsupported_inputs_are_refused_by_name(name):
    cls, extra = CLASSES[name]
    with pytest.raises(ValueError, match="lr"):
        cls([torch.nn.Parameter(torch.ones(3))], lr=torch.tensor(1e-3), **extra)  # tensor lr: unsupported
    with pytest.raises(ValueError, match="complex"):
        cls([torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))], **extra)
    with pytest.raises(ValueError, match="floating-point"):
        cls([torch.ones(3, dtype=torch.int64)], **extra)
    p = torch.nn.Parameter(torch.ones(100))
    opt = cls([p], **extra)
    p.grad = torch.ones(100).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@needs_c
def test_fused_8bit_refuses_float64_before_counting_a_step():
    p = torch.nn.Parameter(torch.randn(500, dtype=torch.float64))
    opt = FAdam8bit([p], fused=True, **EIGHT_BIT)
    p.grad = torch.randn(500, dtype=torch.float64)
    before = p.detach().clone()
    with pytest.raises(TypeError, match=r"FAdam8bit\(fused=True\).*float64.*foreach=True"):
        opt.step()
    assert float(opt.state[p]["step"]) == 0 and torch.equal(p, before)


# ----------------------------------------------------------------------------------------------- crafted checkpoints
def _stepped_8bit(impl="fused"):
    params = _params()
    opt = _make("FAdam8bit", params, impl)
    _run(opt, params, range(2))
    return params, opt


# (state entry, corruption, the words of the error)
CORRUPTIONS = {
    "scale_float16": ("fisher_sqrt_scale", lambda t: t.half(), "torch.float16"),
    "scale_float64": ("exp_avg_scale", lambda t: t.double(), "torch.float64"),
    "scale_too_few": ("fisher_sqrt_scale", lambda t: t[:-1].clone(), "scales"),
    "scale_too_many": ("exp_avg_scale", lambda t: torch.cat([t, t]), "scales"),
    "scale_strided": ("fisher_sqrt_scale", lambda t: torch.stack([t, t], 1)[:, 0], "contiguous"),
    "codes_wrong_dtype": ("fisher_sqrt", lambda t: t.to(torch.int8), "torch.int8"),
    "codes_as_float": ("exp_avg", lambda t: t.float(), "torch.float32"),
    "codes_too_few": ("exp_avg", lambda t: t.flatten()[:-5].clone(), "elements"),
    "scale_not_a_tensor": ("exp_avg_scale", lambda t: t.tolist(), "list"),
}


@pytest.mark.parametrize("case", [c for c in CORRUPTIONS if c != "scale_strided"])
def test_a_crafted_8bit_checkpoint_is_refused_at_load(case):
    entry, corrupt, words = CORRUPTIONS[case]
    params, opt = _stepped_8bit("foreach")
    saved = roundtrip(opt.state_dict())
    saved["state"][0][entry] = corrupt(saved["state"][0][entry])
    target = _make("FAdam8bit", _params(), "fused")
    with pytest.raises(ValueError, match=rf"FAdam8bit.load_state_dict: state '{entry}' of tensor 0 .*{words}"):
        target.load_state_dict(saved)
    assert len(target.state) == 0  # nothing was loaded


def test_a_strided_scale_in_a_checkpoint_loads_as_a_contiguous_copy():
    params, opt = _stepped_8bit("foreach")
    saved = opt.state_dict()
    scale = saved["state"][0]["fisher_sqrt_scale"]
    saved["state"][0]["fisher_sqrt_scale"] = torch.stack([scale, scale], 1)[:, 0]
    target = _make("FAdam8bit", _params())
    target.load_state_dict(saved)
    loaded = target.state[target.param_groups[0]["params"][0]]["fisher_sqrt_scale"]
    assert loaded.is_contiguous() and torch.equal(loaded, scale)


@pytest.mark.parametrize("missing", ["fisher_sqrt_scale", "exp_avg"])
def test_a_truncated_8bit_state_is_refused_at_load(missing):
    params, opt = _stepped_8bit("foreach")
    saved = opt.state_dict()
    del saved["state"][0][missing]
    with pytest.raises(ValueError, match=rf"lacks \['{missing}'\]"):
        _make("FAdam8bit", _params()).load_state_dict(saved)


@pytest.mark.parametrize("impl", ["forloop", "foreach", pytest.param("fused", marks=needs_c)])
@pytest.mark.parametrize("case", ["scale_float16", "scale_too_few", "scale_strided", "codes_too_few"])
def test_state_edited_by_hand_never_reaches_a_kernel(impl, case):
    """State set after the load (``opt.state[p][...] = ...``) is checked before every step, on every path."""
    entry, corrupt, words = CORRUPTIONS[case]
    params, opt = _stepped_8bit(impl)
    opt.state[params[0]][entry] = corrupt(opt.state[params[0]][entry])
    before = _snapshot(opt, params)
    _set_grads(params, 2)
    with pytest.raises(ValueError, match=rf"FAdam8bit: state '{entry}' of tensor 0 .*{words}"):
        opt.step()
    after = _snapshot(opt, params)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    for a, b in zip(before[1][1:], after[1][1:]):  # the other tensors' state (step counts included) is untouched
        _assert_same_state(a, b)


def _kernel_args(opt, params):
    live = [p for p in params if p.grad is not None]
    states = [opt.state[p] for p in live]
    return (
        [p.detach() for p in live],
        [p.grad for p in live],
        [s["exp_avg"] for s in states],
        [s.get("fisher_sqrt", s.get("fisher")) for s in states],
        [s.get("exp_avg_scale") for s in states],
        [s.get("fisher_sqrt_scale") for s in states],
        [s["step"] for s in states],
    )


HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, clip=1.0, p=0.5, maximize=False)


@pytest.mark.parametrize(
    "kernel",
    [
        pytest.param("c", marks=needs_c),
        pytest.param("triton", marks=[triton_interpreted]),
    ],
)
@pytest.mark.parametrize("case", ["scale_float16", "scale_too_many", "scale_strided", "codes_wrong_dtype"])
def test_the_8bit_kernel_entry_points_check_the_state_themselves(kernel, case):
    entry, corrupt, words = CORRUPTIONS[case]
    params, opt = _stepped_8bit("foreach")
    _set_grads(params, 2)
    args = _kernel_args(opt, params)
    names = ["exp_avg", "fisher_sqrt", "exp_avg_scale", "fisher_sqrt_scale"]
    args[2 + names.index(entry)][0] = corrupt(args[2 + names.index(entry)][0])
    if kernel == "c":
        fn, who = cpu_fused_8bit.fadam8bit_cpu_, "fadam8bit_cpu_"
    else:
        from hf_fadam.kernels import triton_fadam8bit

        fn, who = triton_fadam8bit.fadam8bit_triton_, "fadam8bit_triton_"
    before = [p.clone() for p in args[0]]
    with pytest.raises(ValueError, match=rf"{who}: state '{entry}' of tensor 0 .*{words}"):
        fn(*args, block_size=EIGHT_BIT["block_size"], **HYPER)
    assert all(torch.equal(a, b) for a, b in zip(before, args[0]))


@needs_c
def test_the_fp32_c_kernel_checks_element_counts():
    p = torch.nn.Parameter(torch.randn(100))
    m, f = torch.zeros(100), torch.zeros(64)  # a fisher of another parameter
    with pytest.raises(ValueError, match="element counts differ at index 0"):
        cpu_fused.fadam_cpu_([p.detach()], [torch.randn(100)], [m], [f], [torch.ones(())], **HYPER)


@pytest.mark.parametrize("impl", ["foreach", pytest.param("fused", marks=needs_c)])
@pytest.mark.parametrize(("old", "new"), [(256, 32), (32, 256)])
def test_a_block_size_changed_after_the_state_exists_is_refused(impl, old, new):
    params = _params()
    opt = FAdam8bit(params, lr=1e-2, block_size=old, min_8bit_size=64, **IMPLS[impl])
    _run(opt, params, range(2))
    before = _snapshot(opt, params)
    opt.param_groups[0]["block_size"] = new
    _set_grads(params, 2)
    with pytest.raises(ValueError, match=rf"block_size={new} needs .*quantized with another block_size"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before[0], _snapshot(opt, params)[0]))
    opt.param_groups[0]["block_size"] = old  # set back: it steps on
    opt.step()


def test_a_block_size_check_at_load_names_the_block_size():
    params, opt = _stepped_8bit("foreach")
    saved = opt.state_dict()
    saved["param_groups"][0]["block_size"] = 64
    with pytest.raises(ValueError, match="block_size=64 needs"):
        _make("FAdam8bit", _params()).load_state_dict(saved)


# ----------------------------------------------------------------------------------------------- across the classes
def test_an_8bit_state_dict_loads_into_fadam_dequantized():
    params, opt = _stepped_8bit("foreach")
    saved = roundtrip(opt.state_dict())
    target_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    target = FAdam(target_params, lr=1e-2)
    target.load_state_dict(saved)
    assert "block_size" not in target.param_groups[0] and "min_8bit_size" not in target.param_groups[0]
    bs = EIGHT_BIT["block_size"]
    for p, q in zip(params, target_params):
        src = opt.state.get(p)
        if src is None:
            assert q not in target.state
            continue
        state = target.state[q]
        assert set(state) == {"step", "exp_avg", "fisher"} and torch.equal(state["step"], src["step"])
        if "fisher_sqrt" in src:
            m = dequantize_blockwise(src["exp_avg"], src["exp_avg_scale"], bs).reshape(p.shape)
            s = dequantize_blockwise(src["fisher_sqrt"], src["fisher_sqrt_scale"], bs).reshape(p.shape)
            assert torch.equal(state["exp_avg"], m) and torch.equal(state["fisher"], s * s)
        else:
            assert torch.equal(state["exp_avg"], src["exp_avg"]) and torch.equal(state["fisher"], src["fisher"])
    _set_grads(target_params, 2)
    target.step()
    assert all(torch.isfinite(p).all() for p in target_params)


def test_a_fadam_state_of_another_shape_is_refused():
    params = _params()
    opt = FAdam(params)
    _run(opt, params, range(1))
    saved = opt.state_dict()
    saved["state"][0]["fisher"] = torch.zeros(77)  # the right count, another shape
    with pytest.raises(ValueError, match=r"FAdam.load_state_dict: state 'fisher' of parameter 0 has shape \(77,\)"):
        FAdam(_params()).load_state_dict(saved)
    saved["state"][0]["fisher"] = torch.zeros(7, 11, dtype=torch.int32)
    with pytest.raises(ValueError, match="must be a floating-point tensor"):
        FAdam(_params()).load_state_dict(saved)
    del saved["state"][0]["fisher"]
    with pytest.raises(ValueError, match=r"lacks \['fisher'\]"):
        FAdam(_params()).load_state_dict(saved)


@CLASS_NAMES
def test_bad_hyperparameters_in_a_checkpoint_are_refused_at_load(name):
    params = _params()
    opt = _make(name, params)
    saved = opt.state_dict()
    saved["param_groups"][0]["eps"] = 0.0
    with pytest.raises(ValueError, match="Invalid eps: 0.0"):
        _make(name, _params()).load_state_dict(saved)


@pytest.mark.parametrize("step", [-1.0, 2.5, "3", float("nan")])
def test_a_bad_step_in_a_checkpoint_is_refused(step):
    params = _params()
    opt = FAdam(params)
    _run(opt, params, range(1))
    saved = opt.state_dict()
    saved["state"][0]["step"] = step
    with pytest.raises(ValueError, match="state 'step' of parameter 0"):
        FAdam(_params()).load_state_dict(saved)
