"""FAdam under DeepSpeed ZeRO 1, 2 and 3: flat partitions mapped back to parameters, exact per-tensor RMS.

* In-process, no DeepSpeed needed: the flat layer (``hf_fadam._flat``) on one flat tensor with padding equals the
  for-loop on the separate tensors for every implementation, leaves the padding alone, keeps one step per
  parameter, rejects malformed layouts; the Trainer handler no longer refuses DeepSpeed but still refuses NVMe
  optimizer offload.
* ``tests/distributed/deepspeed_checks.py`` (one ``torch.multiprocessing.spawn`` of 2 CPU ranks, gloo):
  ``deepspeed.initialize`` with FAdam for ZeRO 1, 2, 3 equals one process (weights and state), a per-partition
  FAdam is detectably wrong, and a checkpoint save/load resumes bit-identically; ZeRO 1 and 2 with
  ``round_robin_gradients`` (with and without CPU offload) equal one process too; ``FAdam8bit`` as the client
  optimizer is refused by name (ZeRO 1, 2, 3; one and several params per group) before anything changes; with bf16
  params (ZeRO 1 through ``BF16_Optimizer``, ZeRO 2, ZeRO 3) and with the optimizer offloaded to CPU (ZeRO 2, 3) one
  engine step equals the for-loop replayed on the gathered full fp32 weights, gradients and state.
* ``tests/distributed/deepspeed_trainer.py`` (slow): ``--optim fadam`` with ``--deepspeed`` through the Trainer under
  ``torchrun --nproc_per_node 2``, ZeRO 1, 2, 3, against the one-process Trainer; resume from a checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _tolerances import tolerance


REPO_ROOT = Path(__file__).resolve().parents[1]
DIST_DIR = REPO_ROOT / "tests" / "distributed"
WORLD_SIZE = 2
RUN_TIMEOUT_S = 480  # a hang is the only thing this catches (2 loaded cores: a full run takes about 60 s)

_has_deepspeed = pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install 'hf-fadam[deepspeed]')",
)
_linux_gloo = pytest.mark.skipif(
    sys.platform == "win32" or not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="2 gloo processes over 127.0.0.1 are tested on Linux",
)


# ---------------------------------------------------------------------------------------------------------------
# The flat layer in one process
# ---------------------------------------------------------------------------------------------------------------

SHAPES = [(5, 3), (7,), (4, 4), (1,)]
PAD = 3


def _flat_vs_separate(kwargs: dict, steps: int = 3, mapped: bool = True):
    from hf_fadam import FAdam
    from hf_fadam._flat import FlatLayout, set_layout

    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) * 10.0 ** (i - 2) for i, s in enumerate(SHAPES)] for _ in range(steps)]
    ref = [p.clone().requires_grad_() for p in params]
    ref_opt = FAdam(ref, lr=0.1, weight_decay=0.1, foreach=False)
    numels = [p.numel() for p in params]
    # Fragments in another order than the slots, with a gap: the layout, not the order, decides.
    order = [2, 0, 3, 1]
    starts, pos = [0] * len(params), 0
    for i in order:
        starts[i] = pos
        pos += numels[i] + (1 if i == 0 else 0)
    flat = torch.full((pos + PAD,), 7.0, requires_grad=True)
    with torch.no_grad():
        for i, p in enumerate(params):
            flat[starts[i] : starts[i] + numels[i]].copy_(p.flatten())
    if mapped:
        set_layout(flat, FlatLayout(tuple(starts), tuple(numels), tuple(numels), (0, 1, 2, 3), 4, flat.numel()))
    opt = FAdam([flat], lr=0.1, weight_decay=0.1, **kwargs)
    for g in grads:
        for r, gi in zip(ref, g):
            r.grad = gi.clone()
        ref_opt.step()
        grad = torch.full_like(flat, 5.0)
        for i, gi in enumerate(g):
            grad[starts[i] : starts[i] + numels[i]] = gi.flatten()
        flat.grad = grad
        opt.step()
    return flat, opt, ref, ref_opt, starts, numels


@pytest.mark.parametrize(
    "kwargs, impl", [({"foreach": False}, "foreach"), ({"foreach": True}, "foreach"), ({}, "fused_c")]
)
def test_flat_layout_equals_separate_tensors(kwargs, impl):
    flat, opt, ref, ref_opt, starts, numels = _flat_vs_separate(kwargs)
    atol, rtol = tolerance(impl, torch.float32)
    state = opt.state[flat]
    for i, r in enumerate(ref):
        sl = slice(starts[i], starts[i] + numels[i])
        torch.testing.assert_close(flat.detach()[sl], r.detach().flatten(), atol=atol, rtol=rtol)
        torch.testing.assert_close(state["exp_avg"][sl], ref_opt.state[r]["exp_avg"].flatten(), atol=atol, rtol=rtol)
        torch.testing.assert_close(state["fisher"][sl], ref_opt.state[r]["fisher"].flatten(), atol=atol, rtol=rtol)
    covered = torch.zeros(flat.numel(), dtype=torch.bool)
    for s, n in zip(starts, numels):
        covered[s : s + n] = True
    # Padding and gaps belong to no parameter: never written, state stays 0.
    assert torch.equal(flat.detach()[~covered], torch.full(((~covered).sum().item(),), 7.0))
    assert not state["exp_avg"][~covered].any() and not state["fisher"][~covered].any()
    assert torch.equal(state["step"], torch.full((4,), 3.0))


def test_per_partition_rms_would_be_detected():
    """Sensitivity: the same flat tensor without a layout (one RMS over the whole partition) is far off."""
    flat, _, ref, _, starts, numels = _flat_vs_separate({"foreach": True}, mapped=False)
    _, rtol = tolerance("foreach", torch.float32)
    worst = max(
        ((flat.detach()[s : s + n] - r.detach().flatten()).norm() / r.detach().norm()).item()
        for r, s, n in zip(ref, starts, numels)
    )
    assert worst > 100 * rtol, f"per-partition FAdam is only {worst:.2e} off: the parity test could not catch it"


def test_flat_state_dict_round_trip_keeps_the_step_vector():
    """A flat partition's state loads back (engine checkpoints): ``step`` stays one count per slot, and is checked."""
    import copy

    flat, opt, *_ = _flat_vs_separate({"foreach": True})
    saved = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(saved)
    assert torch.equal(opt.state[flat]["step"], torch.full((4,), 3.0))
    assert torch.equal(opt.state[flat]["exp_avg"], saved["state"][0]["exp_avg"])
    for step, message in ((torch.tensor(3.0), "a real vector of 4 counts"), (torch.full((4,), 2.5), "whole")):
        bad = copy.deepcopy(saved)
        bad["state"][0]["step"] = step
        with pytest.raises(ValueError, match=f"state 'step' of flat partition 0 .*{message}"):
            opt.load_state_dict(bad)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(starts=(0, 2), lengths=(3, 2)), "overlaps"),
        (dict(slots=(0, 0)), "at most one fragment per parameter"),
        (dict(lengths=(2, 5), numels=(2, 4)), "longer than its parameter"),
        (dict(slots=(0, 2)), "slot outside"),
        (dict(flat_numel=3), "past the flat tensor"),
        (dict(starts=(0,)), "one entry per fragment"),
    ],
)
def test_flat_layout_rejects(fields, message):
    from hf_fadam._flat import FlatLayout

    base = dict(starts=(0, 2), lengths=(2, 2), numels=(2, 4), slots=(0, 1), num_slots=2, flat_numel=6)
    base.update(fields)
    with pytest.raises(ValueError, match=message):
        FlatLayout(**base)


def test_set_layout_checks_the_tensor():
    from hf_fadam._flat import FlatLayout, get_layout, set_layout

    layout = FlatLayout((0,), (2,), (2,), (0,), 1, 4)
    with pytest.raises(ValueError, match="describes a 1-D tensor of 4 elements"):
        set_layout(torch.zeros(2, 2), layout)
    t = torch.zeros(4)
    set_layout(t, layout)
    assert get_layout(t) is layout and get_layout(torch.zeros(4)) is None
    set_layout(t, None)
    assert get_layout(t) is None


# ---------------------------------------------------------------------------------------------------------------
# The Trainer handler: DeepSpeed is mapped, not refused; NVMe optimizer offload is refused
# ---------------------------------------------------------------------------------------------------------------


def _handler_args(tmp_path, deepspeed):
    import types

    return types.SimpleNamespace(
        deepspeed=deepspeed,
        hf_deepspeed_config=None,
        optim_args=None,
        learning_rate=1e-3,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        fsdp=None,
        fsdp_config={},
    )


@_has_deepspeed
def test_handler_maps_deepspeed_and_installs_the_hook(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from hf_fadam.integrations import deepspeed as ds_integration
    from hf_fadam.integrations import transformers as hft

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    for stage in (1, 2, 3):
        args = _handler_args(tmp_path, {"zero_optimization": {"stage": stage}})
        assert hft.flat_shard_problem(args) is None
        assert hft.fadam_kwargs(args)["lr"] == 1e-3
    assert ds_integration.installed()
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}))
    args = _handler_args(tmp_path, str(path))
    with pytest.raises(ValueError, match="refuses this run: DeepSpeed ZeRO with the optimizer state on NVMe"):
        hft.fadam_kwargs(args)
    args.optim_args = "allow_flat_shards=true"
    assert hft.fadam_kwargs(args)["allow_flat_shards"] is True  # passed on to FAdam


#: The refusal of FAdam8bit under DeepSpeed ZeRO (hf_fadam.integrations.deepspeed.fadam8bit_refusal): it names the
#: optimizer, the engine and what to use instead.
FADAM8BIT_REFUSAL = (
    r"hf_fadam\.FAdam8bit cannot be the optimizer of a DeepSpeed ZeRO run .*"
    r"Use hf_fadam\.FAdam \(Trainer: --optim fadam\), whose DeepSpeed ZeRO path is exact"
)


@_has_deepspeed
def test_handler_refuses_fadam_8bit_under_deepspeed(tmp_path, monkeypatch):
    """``--optim fadam_8bit`` with ``--deepspeed`` (any stage, or accelerate's env) gets the same named refusal."""
    import types

    pytest.importorskip("transformers")
    from hf_fadam.integrations import transformers as hft

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    for stage in (1, 2, 3):
        args = _handler_args(tmp_path, {"zero_optimization": {"stage": stage}})
        with pytest.raises(ValueError, match="--optim fadam_8bit refuses this run: " + FADAM8BIT_REFUSAL):
            hft.fadam_8bit_kwargs(args)
        for name in ("fadam_8bit", "fadam_8bit_layerwise"):  # the one handler of every hf_fadam name
            args.optim, args.max_grad_norm, args.gradient_accumulation_steps = name, 0.0, 1
            ctx = types.SimpleNamespace(args=args, model=None, optimizer_kwargs={}, adam_kwargs={})
            with pytest.raises(ValueError, match=f"--optim {name} refuses this run: "):
                hft._fadam_handler(ctx)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match=FADAM8BIT_REFUSAL):
        hft.fadam_8bit_kwargs(_handler_args(tmp_path, None))


def test_attach_and_the_hook_refuse_fadam8bit():
    """``attach`` refuses a DeepSpeed optimizer around FAdam8bit; the hook refuses before DeepSpeed's own __init__."""
    from hf_fadam import FAdam8bit
    from hf_fadam.integrations.deepspeed import _attach_after, attach

    param = torch.nn.Parameter(torch.ones(3))
    opt = FAdam8bit([param])
    built = []

    class FakeZeroOptimizer:
        def __init__(self, init_optimizer, *args, **kwargs):
            built.append(True)
            self.optimizer = init_optimizer

    with pytest.raises(TypeError, match=FADAM8BIT_REFUSAL):
        attach(FakeZeroOptimizer(opt))
    built.clear()
    FakeZeroOptimizer.__init__ = _attach_after(FakeZeroOptimizer.__init__)
    with pytest.raises(TypeError, match=FADAM8BIT_REFUSAL):
        FakeZeroOptimizer(opt, ["param_names"])
    with pytest.raises(TypeError, match=FADAM8BIT_REFUSAL):
        FakeZeroOptimizer(init_optimizer=opt)
    assert not built and len(opt.state) == 0 and torch.equal(param.detach(), torch.ones(3))


@_has_deepspeed
def test_attach_rejects_an_optimizer_that_is_not_fadam():
    from hf_fadam.integrations.deepspeed import attach

    class Wrapper:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    with pytest.raises(TypeError, match="needs a DeepSpeed engine or optimizer that wraps FAdam; got Wrapper"):
        attach(Wrapper())


# ---------------------------------------------------------------------------------------------------------------
# 2 processes: deepspeed.initialize (one spawn covers ZeRO 1, 2 and 3)
# ---------------------------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("DS_ACCELERATOR", "cpu")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.setdefault(var, "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _run(cmd: list[str], what: str, ok_codes: tuple[int, ...] = (0,), extra_env: dict | None = None) -> str:
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO_ROOT,
            env={**_env(), **(extra_env or {})},
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"{what} did not finish in {RUN_TIMEOUT_S} s:\n{out[-4000:]}")
    output = proc.stdout + proc.stderr
    if proc.returncode not in ok_codes:
        pytest.fail(f"{what} failed with exit status {proc.returncode}:\n{output[-6000:]}")
    return output


CHECKS = [
    f"zero{stage}_{name}"
    for stage in (1, 2, 3)
    for name in ("equals_single_process", "per_partition_mutant_is_detected", "checkpoint_resume_is_exact")
]
ROUND_ROBIN_CHECKS = [
    f"zero{stage}_round_robin{offload}_equals_single_process" for stage in (1, 2) for offload in ("", "_offload_cpu")
] + ["zero2_round_robin_parameter_alignment_equals_single_process"]
FADAM8BIT_CHECKS = [
    f"zero{stage}_fadam8bit_{per_group}_param_per_group_is_refused"
    for stage in (1, 2, 3)
    for per_group in ("one", "several")
]
ORACLE_CHECKS = [
    f"{case}_one_step_equals_for_loop"
    for case in ("zero1_bf16", "zero2_bf16", "zero3_bf16", "zero2_offload_cpu", "zero3_offload_cpu")
]


def _spawn_checks(tmp_path_factory, cases: str):
    out = tmp_path_factory.mktemp(f"deepspeed_checks_{cases}")
    cmd = [sys.executable, str(DIST_DIR / "deepspeed_checks.py"), str(out)]
    output = _run(cmd, f"deepspeed_checks ({cases})", (0, 1), extra_env={"HF_FADAM_DS_CASES": cases})
    results: dict[str, list[dict]] = {}
    for rank in range(WORLD_SIZE):
        path = out / f"results_rank{rank}.json"
        for name, res in (json.loads(path.read_text()) if path.exists() else {}).items():
            results.setdefault(name, []).append({"rank": rank, **res})
    return results, output


@pytest.fixture(scope="module")
def initialize_results(tmp_path_factory):
    return _spawn_checks(tmp_path_factory, "main,round_robin,fadam8bit")


@pytest.fixture(scope="module")
def oracle_results(tmp_path_factory):
    return _spawn_checks(tmp_path_factory, "oracle")


def _assert_check(run, name: str) -> None:
    results, output = run
    ranks = results.get(name, [])
    if len(ranks) != WORLD_SIZE:
        pytest.fail(f"{name} ran on {len(ranks)} of {WORLD_SIZE} ranks:\n{output[-4000:]}")
    failed = [r for r in ranks if not r["ok"]]
    if failed:
        pytest.fail(f"{name} failed on rank {failed[0]['rank']}: {failed[0]['error']}\n{failed[0]['traceback']}")


@_has_deepspeed
@_linux_gloo
@pytest.mark.parametrize("name", CHECKS)
def test_deepspeed_initialize(initialize_results, name):
    _assert_check(initialize_results, name)


@_has_deepspeed
@_linux_gloo
@pytest.mark.parametrize("name", ROUND_ROBIN_CHECKS)
def test_deepspeed_round_robin_gradients_equals_single_process(initialize_results, name):
    """ZeRO 1/2 ``round_robin_gradients``: the flat buffer is in round-robin order, not ``_hp_mapping``'s."""
    _assert_check(initialize_results, name)


@_has_deepspeed
@_linux_gloo
@pytest.mark.parametrize("name", FADAM8BIT_CHECKS)
def test_deepspeed_initialize_refuses_fadam8bit(initialize_results, name):
    _assert_check(initialize_results, name)


@_has_deepspeed
@_linux_gloo
@pytest.mark.slow
@pytest.mark.parametrize("name", ORACLE_CHECKS)
def test_deepspeed_bf16_and_offload_step(oracle_results, name):
    _assert_check(oracle_results, name)


# ---------------------------------------------------------------------------------------------------------------
# 2 processes: the Trainer with --deepspeed (slow: a one-process run and one torchrun launch of 3 stages)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed_trainer")
    script = str(DIST_DIR / "deepspeed_trainer.py")
    _run([sys.executable, script, "single", str(out)], "one-process Trainer")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD_SIZE)]
    torchrun += ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0"]
    _run([*torchrun, script, "zero", str(out), "1", "2", "3"], "Trainer under DeepSpeed ZeRO 1-3")
    return out


@_has_deepspeed
@_linux_gloo
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_trainer_deepspeed_equals_one_process_and_resumes(trainer_results, stage):
    pytest.importorskip("transformers")
    out = trainer_results
    info = json.loads((out / f"zero{stage}.json").read_text())
    expected_cls = "DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer"
    assert info["deepspeed_optimizer"] == expected_cls and info["client_optimizer"] == "FAdam"
    assert info["zero_stage"] == stage and info["mapped"] and info["steps"] == [6.0]
    assert info["resumed_global_step"] == 6 and f"global_step{3}" in info["checkpoint_files"]
    single = torch.load(out / "single_final.pt")
    final = torch.load(out / f"zero{stage}_final.pt")
    resumed = torch.load(out / f"zero{stage}_resumed.pt")
    _, rtol = tolerance("deepspeed", torch.float32)
    for name, expected in single["final"].items():
        moved = (expected - single["init"][name]).norm()
        err = ((final[name] - expected).norm() / moved).item()
        assert err < rtol, f"{name}: ZeRO {stage} differs from one process by {err:.2e} of the update"
        assert torch.equal(resumed[name], final[name]), f"{name}: the resumed run differs from the uninterrupted one"
