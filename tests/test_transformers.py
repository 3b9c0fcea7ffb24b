"""``--optim fadam`` in the Hugging Face Trainer (hf_fadam.integrations.transformers, autoload, hf_fadam.run).

Real Trainer runs on a tiny GPT-2 built from a config, on CPU, with data made here. Three kinds of test:

- in this process, after ``register()``: the enum, ``optim_args`` parsing and its errors, the guards, one run per
  ``SchedulerType`` (the lr FAdam's param groups see follows the scheduler; the loss falls), exact resume, gradient
  accumulation with ``max_grad_norm``, bf16 autocast, the model card;
- in fresh subprocesses: the unmodified script ``trainer_scripts/stock_clm.py`` with the start-up hook, with
  ``python -m hf_fadam.run`` and with the hook off; ``training_args.bin`` loaded with and without hf_fadam;
- ``@pytest.mark.slow``: ``torchrun -m hf_fadam.run`` and ``accelerate launch -m hf_fadam.run`` (2 processes).

The hook tests need the package installed (``pip install .`` or ``pip install -e .``), which puts
``hf_fadam_autoload.pth`` into site-packages; they are skipped when hf_fadam is not installed at all.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch


transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.optimization import get_scheduler  # noqa: E402
from transformers.trainer_utils import SchedulerType  # noqa: E402
from transformers.training_args import OptimizerNames  # noqa: E402

import hf_fadam.integrations.transformers as hft  # noqa: E402
from hf_fadam import FAdam  # noqa: E402
from hf_fadam.integrations import autoload  # noqa: E402


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "trainer_scripts" / "stock_clm.py"
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
HAS_HANDLER_TABLE = importlib.util.find_spec("transformers.trainer_optimizer") is not None

_spec = importlib.util.spec_from_file_location("stock_clm", SCRIPT)
stock_clm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stock_clm)


@pytest.fixture(scope="module", autouse=True)
def registered():
    assert hft.register() is True
    # The model is tiny: one thread is faster than contended intra-op parallelism on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        HF_FADAM_AUTOREGISTER="1",  # tests that need the hook off say so
    )
    env.pop("HF_FADAM_FORCE", None)
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _stock_args(output_dir: Path, **overrides) -> list[str]:
    args = {
        "output_dir": str(output_dir),
        "report_file": str(output_dir / "report.json"),
        "optim": "fadam",
        "learning_rate": "1e-2",
        "max_steps": "4",
        "per_device_train_batch_size": "8",
        "logging_steps": "1",
        "save_steps": "2",
        "report_to": "none",
        "use_cpu": "true",
        "weight_decay": "0.05",
        "seed": "7",
    }
    args.update({k: str(v) for k, v in overrides.items()})
    return [item for key, value in args.items() for item in (f"--{key}", value)]


def _hook_installed() -> bool:
    """Whether a fresh interpreter of this environment starts with the hook on sys.meta_path."""
    code = "import sys; print(any(getattr(f, '_hf_fadam_autoload', False) for f in sys.meta_path))"
    out = _run([sys.executable, "-c", code], cwd=REPO, timeout=60, HF_FADAM_AUTOREGISTER="1")
    return out.stdout.strip() == "True"


@pytest.fixture(scope="session")
def hook():
    if _hook_installed():
        return True
    try:
        importlib.metadata.distribution("hf-fadam")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("hf_fadam is not installed (pip install -e .), so hf_fadam_autoload.pth is not in site-packages")
    pytest.fail("hf-fadam is installed but hf_fadam_autoload.pth did not install the start-up hook")


def _report(output_dir: Path) -> dict:
    return json.loads((output_dir / "report.json").read_text())


def _losses(log_history: list[dict]) -> list[float]:
    return [entry["loss"] for entry in log_history if "loss" in entry]


def _args(output_dir: Path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(output_dir),
        optim="fadam",
        learning_rate=1e-2,
        max_steps=6,
        per_device_train_batch_size=8,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=3,
        weight_decay=0.05,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class StepRecorder(TrainerCallback):
    """What FAdam sees at each step: lrs of its param groups, the global grad norm, and the optimizer itself."""

    def __init__(self):
        self.lrs: list[list[float]] = []
        self.grad_norms: list[float] = []
        self.alive: list[int] = []  # gradients alive when the Trainer calls step() (0 under gradient release)
        self.fadam: FAdam | None = None

    @property
    def optimizer(self) -> FAdam | None:
        return self.fadam

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.fadam = getattr(optimizer, "optimizer", optimizer)
        self.lrs.append([group["lr"] for group in self.fadam.param_groups])
        grads = [p.grad for group in self.fadam.param_groups for p in group["params"] if p.grad is not None]
        self.alive.append(len(grads))
        norms = [g.norm() for g in grads] or [torch.zeros(())]
        self.grad_norms.append(torch.linalg.vector_norm(torch.stack(norms)).item())


def _train(args: TrainingArguments, resume: str | None = None, eval_data: bool = False):
    torch.manual_seed(args.seed)
    model = stock_clm.tiny_gpt2()
    recorder = StepRecorder()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=stock_clm.TokenDataset(64, 16, 32, seed=0),
        eval_dataset=stock_clm.TokenDataset(16, 16, 32, seed=1) if eval_data else None,
        callbacks=[recorder],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


# ----------------------------------------------------------------------------------------------------------------------
# registration: enum, parser, configs, pickling
# ----------------------------------------------------------------------------------------------------------------------


def test_register_is_idempotent_and_extends_the_enum():
    import hf_fadam

    assert hf_fadam.register() is True and hft.register() is True and hft.is_registered()
    member = OptimizerNames("fadam")
    assert member is OptimizerNames.FADAM is OptimizerNames["FADAM"]
    assert [m.value for m in OptimizerNames].count("fadam") == 1
    assert OptimizerNames._member_names_.count("FADAM") == 1
    assert member == "fadam" and hash(member) == hash("fadam") and {member: 1}["fadam"] == 1
    wrapper = Trainer.get_optimizer_cls_and_kwargs
    assert getattr(wrapper, "_hf_fadam_patched", False)
    assert not getattr(wrapper.__wrapped__, "_hf_fadam_patched", False), "wrapped twice"
    if HAS_HANDLER_TABLE:
        from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS

        assert _OPTIMIZER_HANDLERS[member] is hft._fadam_handler


def test_parser_help_json_yaml_and_serialization(tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    assert "fadam" in parser.format_help()
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "fadam"])
    assert args.optim is OptimizerNames.FADAM

    config = {"output_dir": str(tmp_path), "optim": "fadam", "optim_args": "clip=0.5", "report_to": "none"}
    (tmp_path / "args.json").write_text(json.dumps(config))
    (tmp_path / "args.yaml").write_text("".join(f"{k}: {v}\n" for k, v in config.items()))
    for parsed in (parser.parse_json_file(tmp_path / "args.json"), parser.parse_yaml_file(tmp_path / "args.yaml")):
        assert parsed[0].optim is OptimizerNames.FADAM and parsed[0].optim_args == "clip=0.5"

    as_dict = args.to_dict()
    assert as_dict["optim"] == "fadam" and json.loads(args.to_json_string())["optim"] == "fadam"
    assert copy.deepcopy(args).optim is OptimizerNames.FADAM
    # Only FADAM pickles as a plain str (so that files load without hf_fadam); built-in members stay members.
    assert type(pickle.loads(pickle.dumps(OptimizerNames.FADAM))) is str
    assert pickle.loads(pickle.dumps(OptimizerNames.ADAMW_TORCH)) is OptimizerNames.ADAMW_TORCH
    restored = pickle.loads(pickle.dumps(args))
    assert restored.optim == "fadam" and OptimizerNames(restored.optim) is OptimizerNames.FADAM


def test_optim_args_table_covers_fadam_signature():
    import inspect

    params = inspect.signature(FAdam.__init__).parameters
    from_training_args = {"self", "params", "lr", "betas", "eps", "weight_decay"}
    from_the_name = {"gradient_release"}  # --optim fadam_layerwise / fadam_8bit_layerwise
    assert set(hft.OPTIM_ARGS) == set(params) - from_training_args - from_the_name
    with pytest.raises(ValueError, match="optim_args key 'gradient_release' is not read from optim_args: set it "
                       "with --optim fadam_layerwise or --optim fadam_8bit_layerwise"):  # fmt: skip
        hft.parse_optim_args("gradient_release=true")


def test_kwargs_from_training_args(tmp_path):
    args = _args(
        tmp_path,
        learning_rate=3e-3,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-6,
        weight_decay=0.2,
        optim_args="clip = 0.5, p=0.25,state_dtype=bf16,foreach=false,fused=none,maximize=true",
    )
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, None)
    assert cls is FAdam
    assert kwargs == {
        "lr": 3e-3,
        "betas": (0.8, 0.95),
        "eps": 1e-6,
        "weight_decay": 0.2,
        "clip": 0.5,
        "p": 0.25,
        "state_dtype": "bf16",
        "foreach": False,
        "fused": None,
        "maximize": True,
    }
    assert hft.fadam_cls_and_kwargs(args) == (cls, kwargs)


OPTIM_ARGS_ERRORS = [
    ("clip", "Malformed optim_args entry 'clip'"),
    ("clip=1.0,", "Malformed optim_args entry ''"),
    ("clip=1=2", "Malformed optim_args entry 'clip=1=2'"),
    ("cliip=1.0", "Unknown optim_args key 'cliip' for --optim fadam. Did you mean 'clip'?"),
    ("p=0.5,momentum=0.9", "Unknown optim_args key 'momentum'"),
    ("lr=0.1", "optim_args key 'lr' is not read from optim_args: set it with --learning_rate"),
    ("beta2=0.99", "set it with --adam_beta2"),
    ("weight_decay=0.1", "set it with --weight_decay"),
    ("clip=big", "optim_args key 'clip' needs a number; got 'big'"),
    ("maximize=maybe", "optim_args key 'maximize' needs true or false; got 'maybe'"),
    ("fused=sometimes", "optim_args key 'fused' needs true, false or none; got 'sometimes'"),
    ("p=0.5,p=0.25", "optim_args key 'p' is given twice"),
    ("clip=-1", "Invalid clip: -1.0"),  # FAdam's own validation, reached through the Trainer
    ("state_dtype=int8", "Invalid state_dtype: 'int8'"),
]


@pytest.mark.parametrize("optim_args, message", OPTIM_ARGS_ERRORS)
def test_bad_optim_args_fail_when_training_arguments_are_built(tmp_path, optim_args, message):
    """Before any model is loaded or data tokenized: TrainingArguments(...) itself refuses them."""
    with pytest.raises(ValueError) as info:
        _args(tmp_path, optim_args=optim_args)
    assert message in str(info.value)


@pytest.mark.parametrize("optim_args, message", OPTIM_ARGS_ERRORS[::3])
def test_bad_optim_args_fail_when_the_command_line_is_parsed(tmp_path, optim_args, message):
    parser = HfArgumentParser(TrainingArguments)
    argv = ["--output_dir", str(tmp_path), "--optim", "fadam", "--optim_args", optim_args, "--report_to", "none"]
    with pytest.raises(ValueError) as info:
        parser.parse_args_into_dataclasses(argv)
    assert message in str(info.value)
    with pytest.raises(ValueError) as info:  # JSON/YAML configs go through parse_dict
        parser.parse_dict({"output_dir": str(tmp_path), "optim": "fadam", "optim_args": optim_args})
    assert message in str(info.value)


def test_other_optimizers_keep_their_optim_args_unchecked(tmp_path):
    args = _args(tmp_path, optim="adamw_torch", optim_args="anything=goes")
    assert args.optim_args == "anything=goes"


@pytest.mark.parametrize("optim_args, message", OPTIM_ARGS_ERRORS[::2])
def test_bad_optim_args_set_after_construction_fail_when_fadam_is_built(tmp_path, optim_args, message):
    args = _args(tmp_path)
    args.optim_args = optim_args  # attribute assignment skips __post_init__: the Trainer still checks
    trainer = Trainer(model=stock_clm.tiny_gpt2(), args=args)
    with pytest.raises(ValueError) as info:
        trainer.create_optimizer()
    assert message in str(info.value)


def _namespace_args(tmp_path, **overrides):
    ns = types.SimpleNamespace(**vars(_args(tmp_path)))
    ns.__dict__.update(overrides)
    return ns


@pytest.mark.parametrize(
    "overrides, env, refused",
    [
        # DeepSpeed ZeRO is exact (hf_fadam.integrations.deepspeed maps its flat partitions back to parameters),
        # except with the optimizer state on NVMe.
        ({"deepspeed": "ds_config.json"}, {}, None),
        ({}, {"ACCELERATE_USE_DEEPSPEED": "true"}, None),
        (
            {},
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "nvme"},
            "DeepSpeed ZeRO with the optimizer state on NVMe",
        ),
        ({"fsdp": ["full_shard"], "fsdp_config": {"version": 1}}, {}, "FSDP1"),
        ({"fsdp": ["full_shard"], "fsdp_config": {}}, {"FSDP_VERSION": "1"}, "FSDP1"),
        ({"fsdp": ["full_shard"], "fsdp_config": {"version": 2}}, {}, None),
        ({}, {}, None),
    ],
)
def test_flat_shard_guard(tmp_path, monkeypatch, overrides, env, refused):
    for name in (
        "ACCELERATE_USE_DEEPSPEED",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
        "ACCELERATE_USE_FSDP",
        "FSDP_VERSION",
    ):
        monkeypatch.delenv(name, raising=False)
    args = _namespace_args(tmp_path, **overrides)  # before the env: TrainingArguments would look for deepspeed
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if refused is None:
        assert hft.fadam_kwargs(args)["lr"] == 1e-2
        return
    with pytest.raises(ValueError, match=rf"--optim fadam refuses this run: {refused}.*allow_flat_shards=true"):
        hft.fadam_kwargs(args)
    args.optim_args = "allow_flat_shards=true,clip=2"
    kwargs = hft.fadam_kwargs(args)
    assert kwargs["clip"] == 2.0 and kwargs["allow_flat_shards"] is True  # passed on to FAdam


def test_post_import_hook_runs_after_the_module_and_leaves_no_trace(tmp_path, monkeypatch):
    (tmp_path / "hf_fadam_probe_mod.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []

    def hook(name):
        seen.append((name, sys.modules[name].VALUE))
        raise RuntimeError("boom")  # a failing hook must not break the import

    finder = autoload._PostImportFinder({"hf_fadam_probe_mod": hook})
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    with pytest.warns(RuntimeWarning, match="could not enable --optim fadam after importing hf_fadam_probe_mod"):
        module = importlib.import_module("hf_fadam_probe_mod")
    assert seen == [("hf_fadam_probe_mod", 41)] and module.VALUE == 41
    assert type(module.__loader__).__name__ == "SourceFileLoader" and module.__spec__.loader is module.__loader__
    monkeypatch.delitem(sys.modules, "hf_fadam_probe_mod")


@pytest.mark.parametrize("value, enabled", [("0", False), ("off", False), (" False ", False), ("1", True), ("", True)])
def test_autoload_opt_out_variable(monkeypatch, value, enabled):
    monkeypatch.setenv("HF_FADAM_AUTOREGISTER", value)
    assert autoload.enabled() is enabled
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not getattr(f, "_hf_fadam_autoload", False)])
    assert autoload.install() is enabled and autoload.installed() is enabled
    assert autoload.install(force=True) and sum(getattr(f, "_hf_fadam_autoload", False) for f in sys.meta_path) == 1


# ----------------------------------------------------------------------------------------------------------------------
# real Trainer runs in this process
# ----------------------------------------------------------------------------------------------------------------------

LR = 1e-2
MAX_STEPS = 6
WARMUP = 2
SCHEDULER_KWARGS = {
    "cosine_with_min_lr": {"min_lr": 1e-3},
    "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
    "warmup_stable_decay": {"num_decay_steps": 2},
    "polynomial": {"lr_end": 1e-4, "power": 2.0},
    "cosine_with_restarts": {"num_cycles": 2},
    "inverse_sqrt": {"timescale": 2},
    # metric-driven: evaluated after every step, so the lr moves within a few steps
    "reduce_lr_on_plateau": {"mode": "max", "factor": 0.5, "patience": 0},
    "greedy": {"factor": 0.5, "patience": 1, "min_lr": 1e-4},
}
METRIC_DRIVEN = {"reduce_lr_on_plateau", "greedy"}


def _expected_lrs(name: str, args: TrainingArguments, eval_losses: list[float]) -> list[float]:
    """The lr sequence of the same scheduler on a throw-away SGD, stepped as the Trainer steps it."""
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = get_scheduler(
        name,
        optimizer=sgd,
        num_warmup_steps=args.get_warmup_steps(MAX_STEPS),
        num_training_steps=MAX_STEPS,
        scheduler_specific_kwargs=dict(SCHEDULER_KWARGS.get(name, {})),
    )
    lrs = []
    for step in range(MAX_STEPS):
        lrs.append(sgd.param_groups[0]["lr"])
        sgd.step()
        scheduler.step(eval_losses[step]) if name in METRIC_DRIVEN else scheduler.step()
    return lrs


@pytest.mark.parametrize("optim", ["fadam", "fadam_layerwise"])
def test_every_scheduler_drives_fadam_lr(tmp_path, optim):
    """Also under gradient release: the hooks step with the lr the scheduler set, and no gradient outlives backward."""
    failures = {}
    layerwise = optim.endswith("_layerwise")
    for scheduler_type in SchedulerType:
        name = scheduler_type.value
        extra = {}
        if name in METRIC_DRIVEN:
            extra = dict(eval_strategy="steps", eval_steps=1, metric_for_best_model="loss")
        if layerwise:
            extra["max_grad_norm"] = 0.0
        args = _args(
            tmp_path / name,
            optim=optim,
            learning_rate=LR,
            max_steps=MAX_STEPS,
            warmup_steps=WARMUP,
            lr_scheduler_type=name,
            lr_scheduler_kwargs=dict(SCHEDULER_KWARGS.get(name, {})),
            **extra,
        )
        try:
            trainer, recorder = _train(args, eval_data=name in METRIC_DRIVEN)
        except Exception as exc:  # report every scheduler that fails, not only the first
            failures[name] = repr(exc)
            continue
        eval_losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
        expected = _expected_lrs(name, args, eval_losses)
        seen = recorder.lrs
        losses = _losses(trainer.state.log_history)
        steps = {state["step"].item() for state in recorder.fadam.state.values()}
        logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
        if not isinstance(recorder.fadam, FAdam) or len(seen) != MAX_STEPS or len(logged) != MAX_STEPS:
            failures[name] = f"optimizer {type(recorder.fadam)}, {len(seen)} steps, {len(logged)} lrs logged"
        elif recorder.fadam.gradient_release != layerwise or (min(recorder.alive) == 0) != layerwise:
            failures[name] = f"gradient_release {recorder.fadam.gradient_release}, alive {recorder.alive}"
        elif steps != {float(MAX_STEPS)}:
            failures[name] = f"per-parameter steps {steps}"
        elif any(len(set(step_lrs)) != 1 for step_lrs in seen):
            failures[name] = f"param groups disagree: {seen}"
        elif not torch.allclose(torch.tensor([s[0] for s in seen]), torch.tensor(expected), rtol=1e-6, atol=1e-12):
            failures[name] = f"lr {[s[0] for s in seen]} != expected {expected}"
        elif len(set(expected)) == 1 and name not in ("constant",):
            failures[name] = f"the schedule never moved the lr: {expected}"
        elif not losses[-1] < losses[0]:
            failures[name] = f"training loss did not fall: {losses}"
    assert not failures, failures
    tested = {s.value for s in SchedulerType}
    assert "reduce_lr_on_plateau" in tested and "warmup_stable_decay" in tested
    if TRANSFORMERS_MAJOR >= 5:
        assert "greedy" in tested


def _final_state(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict]:
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return weights, trainer.optimizer.state_dict()


def _assert_same_final_state(a: Trainer, b: Trainer) -> None:
    """The two runs end with bit-identical weights and optimizer state (an assertion names what differs)."""
    wa, oa = _final_state(a)
    wb, ob = _final_state(b)
    for name, tensor in wa.items():
        torch.testing.assert_close(wb[name], tensor, rtol=0, atol=0, msg=name)
    assert oa["state"].keys() == ob["state"].keys()
    for index, state in oa["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(ob["state"][index][key], value, rtol=0, atol=0, msg=f"{index} {key}")


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    common = dict(max_steps=8, save_strategy="steps", save_steps=4, lr_scheduler_type="cosine", warmup_steps=2)
    full, _ = _train(_args(tmp_path / "full", **common))
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "scheduler.pt").is_file()

    # The Trainer reloads optimizer.pt with weights_only=True: FAdam's state must be plain tensors and numbers.
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    first_state = next(iter(saved["state"].values()))
    assert set(first_state) == {"step", "exp_avg", "fisher"} and first_state["step"].item() == 4
    assert [group["weight_decay"] for group in saved["param_groups"]] == [0.05, 0.0]

    resumed, recorder = _train(_args(tmp_path / "resumed", **common), resume=str(checkpoint))
    assert len(recorder.lrs) == 4, "the resumed run must do only the last 4 steps"
    _assert_same_final_state(full, resumed)
    full_opt, resumed_opt = full.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert [g["lr"] for g in resumed_opt["param_groups"]] == [g["lr"] for g in full_opt["param_groups"]]


def test_grad_accumulation_and_max_grad_norm(tmp_path):
    max_norm = 0.05
    common = dict(max_steps=4, max_grad_norm=max_norm, optim_args="clip=0.5,foreach=false")
    one_batch, rec_one = _train(_args(tmp_path / "ga1", per_device_train_batch_size=8, **common))
    accumulated, rec_acc = _train(
        _args(tmp_path / "ga2", per_device_train_batch_size=4, gradient_accumulation_steps=2, **common)
    )
    for trainer, recorder in ((one_batch, rec_one), (accumulated, rec_acc)):
        fadam = recorder.fadam
        assert isinstance(fadam, FAdam) and len(recorder.lrs) == 4
        assert all(group["clip"] == 0.5 and group["foreach"] is False for group in fadam.param_groups)
        assert [group["weight_decay"] for group in fadam.param_groups] == [0.05, 0.0]
        steps = {state["step"].item() for state in fadam.state.values()}
        assert steps == {4.0}, "one FAdam step per optimizer step, not per micro-batch"
        # The Trainer clips the global norm before FAdam's step; the logged grad_norm is the norm before clipping.
        assert max(recorder.grad_norms) <= max_norm * (1 + 1e-4)
        logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
        assert min(logged) > max_norm
    # Two micro-batches of 4 accumulate to the update of one batch of 8 (same samples, same order), up to float
    # summation order (atol: 0.5% of one step's lr). The key third of each attention bias is left out: its gradient is
    # zero analytically (softmax ignores a shift shared by all keys), and FAdam, invariant to the gradient's scale,
    # turns the float noise left there into O(lr) steps that differ between the two runs.
    width = one_batch.model.config.n_embd
    for (name, a), b in zip(one_batch.model.state_dict().items(), accumulated.model.state_dict().values()):
        if name.endswith("attn.c_attn.bias"):
            a, b = torch.cat([a[:width], a[2 * width :]]), torch.cat([b[:width], b[2 * width :]])
        diff = (a - b).abs().max().item()
        assert diff <= 5e-5, (name, diff)


def test_fp32_and_bf16_autocast_runs(tmp_path):
    results = {}
    for precision in ("fp32", "bf16"):
        args = _args(tmp_path / precision, max_steps=6, bf16=precision == "bf16")
        torch.manual_seed(0)
        logits_dtypes = []
        model = stock_clm.tiny_gpt2()
        model.lm_head.register_forward_hook(
            lambda module, inputs, output, seen=logits_dtypes: seen.append(output.dtype)
        )
        recorder = StepRecorder()
        trainer = Trainer(
            model=model, args=args, train_dataset=stock_clm.TokenDataset(64, 16, 32, seed=0), callbacks=[recorder]
        )
        trainer.train()
        losses = _losses(trainer.state.log_history)
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], (precision, losses)
        fadam = recorder.fadam
        assert isinstance(fadam, FAdam)
        for param, state in fadam.state.items():
            assert param.dtype == torch.float32 and state["exp_avg"].dtype == torch.float32
            assert state["fisher"].dtype == torch.float32 and torch.isfinite(param).all()
        results[precision] = set(logits_dtypes)
    assert results["fp32"] == {torch.float32}
    assert results["bf16"] == {torch.bfloat16}, "bf16=True must run the forward under CPU autocast"


def test_model_card_names_fadam_and_tags_it(tmp_path, monkeypatch):
    args = _args(tmp_path, max_steps=2, adam_beta2=0.99, optim_args="clip=0.5,p=0.25", weight_decay=0.05)
    trainer, _ = _train(args)
    assert "fadam" in (trainer.model.model_tags or []), "push_to_hub adds the model's tags to the card"
    optimizer_line = (
        "- optimizer: Use FAdam (hf_fadam.FAdam, --optim fadam) with betas=(0.9,0.99), epsilon=1e-08, "
        "weight_decay=0.05, clip=0.5, p=0.25, param_rounding=auto and optimizer_args=clip=0.5,p=0.25"
    )

    trainer.create_model_card(model_name="tiny", tags=["my-tag"])
    card = (tmp_path / "README.md").read_text()
    header = card.split("---")[1]
    assert "- fadam" in header and "- my-tag" in header and "- generated_from_trainer" in header
    assert optimizer_line in card and "OptimizerNames.FADAM" not in card

    # push_to_hub, with the upload replaced: the card it writes is the one that would be uploaded.
    (tmp_path / "README.md").unlink()
    uploads = []

    class FakeApi:
        def upload_folder(self, **kwargs):
            uploads.append(kwargs)

    import transformers.trainer as trainer_module

    if hasattr(trainer_module, "hf_api"):
        monkeypatch.setattr(trainer_module, "hf_api", lambda: FakeApi())
    if hasattr(trainer_module, "upload_folder"):
        monkeypatch.setattr(trainer_module, "upload_folder", lambda **kwargs: uploads.append(kwargs))
    trainer.hub_model_id = "someone/tiny-fadam"
    trainer.push_to_hub(commit_message="test", blocking=True)
    assert len(uploads) == 1 and uploads[0]["repo_id"] == "someone/tiny-fadam"
    card = (tmp_path / "README.md").read_text()
    assert "- fadam" in card.split("---")[1] and optimizer_line in card
    assert (tmp_path / "training_args.bin").is_file()


BUILT_LINE = "hf_fadam: the Trainer built FAdam"


@pytest.fixture
def trainer_log(caplog, monkeypatch):
    """The records of the Trainer's logger at INFO (transformers' own handler does not propagate to caplog's)."""
    import logging

    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    caplog.set_level(logging.INFO, logger="transformers.trainer")
    return caplog


@pytest.mark.parametrize(
    "optim_args, implementation", [("foreach=true", "foreach"), ("foreach=false", "for-loop reference")]
)
def test_trainer_logs_one_line_when_it_builds_fadam(tmp_path, trainer_log, optim_args, implementation):
    args = _args(tmp_path, adam_beta2=0.99, optim_args=f"clip=0.5,p=0.25,{optim_args}")
    trainer = Trainer(model=stock_clm.tiny_gpt2(), args=args)
    trainer.create_optimizer()
    trainer.create_optimizer()  # already built: no second line
    lines = [r.getMessage() for r in trainer_log.records if BUILT_LINE in r.getMessage()]
    assert len(lines) == 1, lines
    (line,) = lines
    fadam = trainer.optimizer
    assert isinstance(fadam, FAdam) and fadam.describe_implementation() == implementation
    assert f"implementation {implementation};" in line
    for part in ("lr=0.01", "betas=(0.9, 0.99)", "eps=1e-08", "weight_decay per param group=[0.05, 0.0]"):
        assert part in line, (part, line)
    assert "clip=0.5" in line and "p=0.25" in line and "state_dtype=auto" in line


def test_no_line_when_the_optimizer_was_not_built_by_the_trainer(tmp_path, trainer_log):
    model = stock_clm.tiny_gpt2()
    trainer = Trainer(model=model, args=_args(tmp_path), optimizers=(FAdam(model.parameters()), None))
    trainer.create_optimizer()
    assert not [r for r in trainer_log.records if BUILT_LINE in r.getMessage()]


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(30)} | {"<eos>": 30, "<pad>": 31}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="0")), eos_token="<eos>", pad_token="<pad>"
    )


def test_trl_sft_trainer_card_carries_the_fadam_tag(tmp_path):
    """TRL overrides create_model_card (and writes the card at every checkpoint): the tag must still be there."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(tmp_path),
        optim="fadam",
        max_steps=1,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    data = datasets.Dataset.from_dict({"input_ids": [[(s + i) % 30 for i in range(12)] for s in range(8)]})
    trainer = SFTTrainer(
        model=stock_clm.tiny_gpt2(), args=args, train_dataset=data, processing_class=_tiny_tokenizer()
    )
    trainer.train()
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), FAdam)
    trainer.create_model_card(model_name="tiny", tags=["mine"])
    header = (tmp_path / "README.md").read_text().split("---")[1]
    for tag in ("fadam", "trl", "sft", "mine"):
        assert f"- {tag}\n" in header, header
    assert "fadam" in trainer.model.model_tags  # what push_to_hub adds to any card


def test_launcher_help_is_plain_text(capsys):
    from hf_fadam import run

    with pytest.raises(SystemExit) as info:
        run.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m hf_fadam.run")
    assert "accelerate launch -m hf_fadam.run" in out and "hf_fadam.register()" in out
    for markup in ("``", ":func:", ":mod:", "::"):
        assert markup not in out, markup


# ----------------------------------------------------------------------------------------------------------------------
# unmodified script in fresh processes
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def hook_run(tmp_path_factory, hook):
    """The stock script, which never imports hf_fadam, run with --optim fadam through the start-up hook."""
    out = tmp_path_factory.mktemp("hook_run")
    cmd = [sys.executable, str(SCRIPT), *_stock_args(out, optim_args="clip=1.0,p=0.5", lr_scheduler_type="cosine")]
    result = _run(cmd, cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_stock_script_with_start_up_hook(hook_run):
    report = _report(hook_run)
    assert report["optimizer_class"] == "hf_fadam.optimizer.FAdam" and report["optim"] == "fadam"
    assert report["global_step"] == 4 and len(report["lrs"]) == 4
    assert [g["weight_decay"] for g in report["param_groups"]] == [0.05, 0.0]
    assert all(g["clip"] == 1.0 and g["p"] == 0.5 for g in report["param_groups"])
    losses = _losses(report["log_history"])
    assert losses[-1] < losses[0]
    assert (hook_run / "checkpoint-2" / "optimizer.pt").is_file()
    card = (hook_run / "README.md").read_text()
    assert "- fadam" in card.split("---")[1] and "Use FAdam (hf_fadam.FAdam, --optim fadam)" in card


def test_stock_script_help_lists_fadam_with_hook(hook, tmp_path):
    result = _run([sys.executable, str(SCRIPT), "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    optim_help = result.stdout[result.stdout.index("--optim ") :]
    assert "fadam" in optim_help[: optim_help.index("--optim_args")]


def test_stock_script_with_launcher_and_json_config(tmp_path):
    """``python -m hf_fadam.run`` with the hook off; the script reads a JSON config, as the examples accept."""
    config = {
        "output_dir": str(tmp_path),
        "report_file": str(tmp_path / "report.json"),
        "optim": "fadam",
        "optim_args": "clip=0.5",
        "learning_rate": 1e-2,
        "max_steps": 2,
        "lr_scheduler_type": "linear",
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "hf_fadam.run", str(SCRIPT), str(tmp_path / "config.json")]
    result = _run(cmd, cwd=tmp_path, HF_FADAM_AUTOREGISTER="0")
    assert result.returncode == 0, result.stderr[-3000:]
    report = _report(tmp_path)
    assert report["optimizer_class"] == "hf_fadam.optimizer.FAdam"
    assert all(g["clip"] == 0.5 for g in report["param_groups"])
    assert report["lrs"][0][0] == pytest.approx(1e-2) and report["lrs"][1][0] == pytest.approx(5e-3)


def test_stock_script_without_hook_rejects_fadam(tmp_path):
    cmd = [sys.executable, str(SCRIPT), *_stock_args(tmp_path)]
    result = _run(cmd, cwd=tmp_path, HF_FADAM_AUTOREGISTER="0")
    assert result.returncode == 2
    assert "argument --optim: invalid choice: 'fadam'" in result.stderr


def test_start_up_hook_imports_nothing_heavy(hook, tmp_path):
    result = _run([sys.executable, "-X", "importtime", "-c", "import json"], cwd=tmp_path)
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert imported, result.stderr[-2000:]
    heavy = [m for m in imported if m.split(".")[0] in ("torch", "transformers", "hf_fadam", "numpy", "accelerate")]
    assert heavy == [], heavy


LOAD_ARGS = """
import sys, torch
args = torch.load(sys.argv[1], weights_only=False)
print(type(args).__name__, repr(args.optim), type(args.optim).__name__, "hf_fadam" in sys.modules)
"""


def test_training_args_bin_loads_without_hf_fadam(hook_run):
    path = hook_run / "checkpoint-2" / "training_args.bin"
    result = _run([sys.executable, "-c", LOAD_ARGS, str(path)], cwd=hook_run, HF_FADAM_AUTOREGISTER="0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["TrainingArguments", "'fadam'", "str", "False"]


def test_training_args_bin_loads_with_hf_fadam(hook_run):
    # hf_fadam imported and the start-up hook on: loading the pickle imports transformers.training_args, whose hook
    # adds the member, so the plain "fadam" maps back to it.
    code = (
        "import hf_fadam\n"
        + LOAD_ARGS
        + "from transformers import TrainingArguments\n"
        + "from transformers.training_args import OptimizerNames\n"
        + "assert OptimizerNames(args.optim) is OptimizerNames.FADAM\n"
        + "again = TrainingArguments(output_dir=args.output_dir, optim=args.optim, optim_args=args.optim_args)\n"
        + "print(repr(again.optim))\n"
    )
    path = hook_run / "checkpoint-2" / "training_args.bin"
    result = _run([sys.executable, "-c", code, str(path)], cwd=hook_run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [
        "TrainingArguments",
        "'fadam'",
        "str",
        "True",
        "<OptimizerNames.FADAM:",
        "'fadam'>",
    ]


def test_transformers_with_its_own_fadam_is_left_alone(tmp_path):
    """A future transformers that defines ``fadam``: register() changes nothing and says so."""
    code = textwrap.dedent(
        """
        import logging
        from transformers.training_args import OptimizerNames
        import hf_fadam.integrations.transformers as hft
        native = hft._add_enum_member(OptimizerNames, "FADAM", "fadam")  # as if upstream had it
        logging.basicConfig(level=logging.WARNING)
        print(hft.register(), hft.register(), hft.is_registered())
        import pickle, sys
        print(OptimizerNames("fadam") is native, "transformers.trainer" in sys.modules)
        print(type(pickle.loads(pickle.dumps(native))).__name__)
        """
    )
    result = _run([sys.executable, "-c", code], cwd=tmp_path, HF_FADAM_AUTOREGISTER="0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "False", "False", "True", "False", "OptimizerNames"]
    assert result.stderr.count("already provides --optim fadam") == 1


# ----------------------------------------------------------------------------------------------------------------------
# launchers with 2 processes (slow)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_launcher_module_under_distributed_launchers(tmp_path, launcher):
    if launcher == "torchrun":
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29611"]
    else:
        # accelerate's --cpu means one process; --multi_gpu on a machine without GPUs gives 2 gloo processes.
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
        prefix += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"]
        prefix += ["29612"]
    cmd = [*prefix, "-m", "hf_fadam.run", str(SCRIPT), *_stock_args(tmp_path, per_device_train_batch_size=4)]
    result = _run(cmd, cwd=tmp_path, timeout=600, HF_FADAM_AUTOREGISTER="0")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    report = _report(tmp_path)
    assert report["optimizer_class"] == "hf_fadam.optimizer.FAdam" and report["global_step"] == 4
    assert report["world_size"] == 2
    assert any(entry.get("train_loss") for entry in report["log_history"])


# ----------------------------------------------------------------------------------------------------------------------
# --optim fadam_layerwise / fadam_8bit_layerwise: gradient release (each parameter stepped inside backward)
# ----------------------------------------------------------------------------------------------------------------------

LAYERWISE = {"fadam_layerwise": "fadam", "fadam_8bit_layerwise": "fadam_8bit"}


def _assert_same_run(a: Trainer, b: Trainer) -> None:
    assert _losses(a.state.log_history) == _losses(b.state.log_history)
    _assert_same_final_state(a, b)


def test_layerwise_names_parse_from_cli_json_and_pickle(tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    assert "fadam_layerwise" in parser.format_help() and "fadam_8bit_layerwise" in parser.format_help()
    for name, member in (("fadam_layerwise", "FADAM_LAYERWISE"), ("fadam_8bit_layerwise", "FADAM_8BIT_LAYERWISE")):
        cli = ["--output_dir", str(tmp_path), "--optim", name, "--max_grad_norm", "0", "--optim_args", "clip=0.5"]
        (args,) = parser.parse_args_into_dataclasses(cli)
        assert args.optim is OptimizerNames[member]
        (tmp_path / "a.json").write_text(json.dumps({"output_dir": str(tmp_path), "optim": name, "max_grad_norm": 0}))
        assert parser.parse_json_file(tmp_path / "a.json")[0].optim is OptimizerNames[member]
        restored = pickle.loads(pickle.dumps(args))
        assert type(restored.optim) is str and restored.optim == name
        if HAS_HANDLER_TABLE:
            from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS

            assert _OPTIMIZER_HANDLERS[OptimizerNames[member]] is hft._fadam_handler


@pytest.mark.parametrize("layerwise", list(LAYERWISE))
def test_layerwise_equals_its_optimizer_step_for_step(tmp_path, layerwise):
    """gradient_accumulation_steps=1, max_grad_norm=0: the same losses, weights and optimizer state, bit for bit;
    no gradient is alive when the Trainer calls step()."""
    common = dict(max_steps=5, max_grad_norm=0.0, lr_scheduler_type="cosine", warmup_steps=2, optim_args="clip=0.5")
    plain, plain_rec = _train(_args(tmp_path / "plain", optim=LAYERWISE[layerwise], **common))
    released, rec = _train(_args(tmp_path / "released", optim=layerwise, **common))
    assert rec.optimizer.gradient_release is True and plain_rec.optimizer.gradient_release is False
    assert type(rec.optimizer) is type(plain_rec.optimizer)
    assert rec.alive == [0] * 5 and min(plain_rec.alive) > 0
    assert rec.lrs == plain_rec.lrs
    _assert_same_run(plain, released)


def test_layerwise_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    common = dict(
        optim="fadam_8bit_layerwise", max_grad_norm=0.0, max_steps=8, save_strategy="steps", save_steps=4,
        lr_scheduler_type="linear", warmup_steps=2,
    )  # fmt: skip
    full, _ = _train(_args(tmp_path / "full", **common))
    checkpoint = tmp_path / "full" / "checkpoint-4"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert {s["step"].item() for s in saved["state"].values()} == {4.0}
    resumed, recorder = _train(_args(tmp_path / "resumed", **common), resume=str(checkpoint))
    assert len(recorder.lrs) == 4 and recorder.alive == [0] * 4
    _assert_same_final_state(full, resumed)


LAYERWISE_REFUSALS = [
    (dict(), {}, r"max_grad_norm=1.0 \(1.0 is the Trainer's default\).*pass --max_grad_norm 0"),
    (dict(max_grad_norm=0.0, gradient_accumulation_steps=2), {}, "gradient_accumulation_steps=2: gradient release"),
    (dict(max_grad_norm=0.0, deepspeed={"zero_optimization": {"stage": 2}}), {}, "DeepSpeed reduces and partitions"),
    (dict(max_grad_norm=0.0, fsdp="full_shard"), {}, "FSDP reduce-scatters the gradients"),
    (dict(max_grad_norm=0.0), {"WORLD_SIZE": "2"}, r"a run of 2 processes \(WORLD_SIZE=2\): DDP averages"),
]


@pytest.mark.parametrize("name", list(LAYERWISE))
@pytest.mark.parametrize("overrides, env, message", LAYERWISE_REFUSALS)
def test_layerwise_refuses_what_it_cannot_run_exactly(tmp_path, monkeypatch, name, overrides, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=f"--optim {name} refuses this run: " + message):
        TrainingArguments(output_dir=str(tmp_path), optim=name, report_to="none", use_cpu=True, **overrides)


def test_layerwise_refuses_fp16_and_the_handler_checks_again(tmp_path):
    args = _namespace_args(tmp_path, optim=OptimizerNames.FADAM_LAYERWISE, max_grad_norm=0.0, fp16=True)
    with pytest.raises(ValueError, match="--optim fadam_layerwise refuses this run: --fp16: GradScaler"):
        hft.optimizer_cls_and_kwargs(args)
    args = _args(tmp_path, optim="fadam_layerwise", max_grad_norm=0.0)
    args.gradient_accumulation_steps = 4  # set after construction: the Trainer's build checks again
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):
        Trainer(model=stock_clm.tiny_gpt2(), args=args).create_optimizer()


def test_layerwise_log_line_and_card(tmp_path, trainer_log):
    args = _args(tmp_path, optim="fadam_8bit_layerwise", max_grad_norm=0.0, max_steps=2, optim_args="block_size=64")
    trainer, _ = _train(args)
    (line,) = [r.getMessage() for r in trainer_log.records if "hf_fadam: the Trainer built" in r.getMessage()]
    assert "the Trainer built FAdam8bit" in line
    assert "gradient_release=True: each parameter stepped inside backward, its gradient freed" in line
    assert "plain tensors (whole parameters)" in line
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    assert (
        "Use FAdam8bit (hf_fadam.FAdam8bit, --optim fadam_8bit_layerwise) with betas=(0.9,0.999), epsilon=1e-08, "
        "weight_decay=0.05, clip=1.0, p=0.5, block_size=64, min_8bit_size=4096, param_rounding=auto, "
        "gradient_release=True" in card
    )
    assert "OptimizerNames" not in card and "- fadam" in card.split("---")[1]


def test_fadam_8bit_card_line_lists_its_settings(tmp_path):
    args = _args(tmp_path, optim="fadam_8bit", optim_args="block_size=128,min_8bit_size=1024,clip=0.5")
    line = hft.describe_optimizer(args)
    assert line.startswith("Use FAdam8bit (hf_fadam.FAdam8bit, --optim fadam_8bit) with betas=(0.9,0.999)")
    for part in ("weight_decay=0.05", "clip=0.5", "p=0.5", "block_size=128", "min_8bit_size=1024"):
        assert part in line, (part, line)
    assert "state_dtype" not in line and "gradient_release" not in line


def test_training_arguments_errors_of_others_carry_no_hf_fadam_frame(tmp_path):
    """Arguments are still checked when built, but only FAdam's own errors show a frame of hf_fadam."""
    import traceback

    import hf_fadam

    package = str(Path(hf_fadam.__file__).resolve().parent)

    def ours(frames) -> list[str]:
        return [f.filename for f in frames if str(Path(f.filename).resolve()).startswith(package)]

    bad = [
        dict(optim="not_an_optimizer"),
        dict(eval_strategy="steps", load_best_model_at_end=True, save_strategy="epoch"),
        dict(optim="adamw_torch", lr_scheduler_type="no_such_schedule"),
    ]
    for overrides in bad:
        with pytest.raises(ValueError) as info:
            TrainingArguments(output_dir=str(tmp_path), report_to="none", **overrides)
        assert not ours(traceback.extract_tb(info.value.__traceback__)), overrides
    with pytest.raises(ValueError, match="Invalid clip: -1.0") as info:
        TrainingArguments(output_dir=str(tmp_path), report_to="none", optim="fadam", optim_args="clip=-1")
    assert ours(traceback.extract_tb(info.value.__traceback__))
    assert TrainingArguments.optim == TrainingArguments.__dataclass_fields__["optim"].default


def test_stock_script_runs_fadam_8bit_layerwise_with_the_hook(hook, tmp_path):
    """The unmodified stock script: --optim fadam_8bit_layerwise trains (with --max_grad_norm 0) and is refused, in
    one line that says what to pass, with the Trainer's default max_grad_norm."""
    out = tmp_path / "run"
    args = _stock_args(out, optim="fadam_8bit_layerwise", max_grad_norm=0, optim_args="min_8bit_size=256")
    result = _run([sys.executable, str(SCRIPT), *args], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = _report(out)
    assert report["optimizer_class"] == "hf_fadam.optimizer_8bit.FAdam8bit"
    assert report["optim"] == "fadam_8bit_layerwise" and report["global_step"] == 4
    losses = _losses(report["log_history"])
    assert losses[-1] < losses[0]
    card = (out / "README.md").read_text()
    assert "Use FAdam8bit (hf_fadam.FAdam8bit, --optim fadam_8bit_layerwise)" in card and "gradient_release=True" in card

    refused = _run([sys.executable, str(SCRIPT), *_stock_args(tmp_path / "refused", optim="fadam_layerwise")],
                   cwd=tmp_path)  # fmt: skip
    assert refused.returncode != 0
    assert "--optim fadam_layerwise refuses this run: max_grad_norm=1.0" in refused.stderr
    assert "pass --max_grad_norm 0" in refused.stderr


def test_log_line_says_what_is_stepped(tmp_path):
    """The built-optimizer line ends with what the optimizer steps, so that an engine that fell back shows."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from hf_fadam._flat import FlatLayout, set_layout

    plain = FAdam([torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))])
    assert hft.describe_stepped_tensors(plain) == "2 plain tensors (whole parameters)"
    flat = torch.nn.Parameter(torch.ones(10))
    set_layout(flat, FlatLayout(starts=(0, 4), lengths=(4, 6), numels=(4, 9), slots=(0, 1), num_slots=3,
                                flat_numel=10))  # fmt: skip
    try:
        line = hft.describe_built_optimizer(FAdam([flat]))
        assert line.endswith("steps 1 DeepSpeed flat partitions (mapped back to 3 parameters: per-tensor RMS)")
    finally:
        set_layout(flat, None)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        shard = torch.nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)]))
        mixed = FAdam([shard, torch.nn.Parameter(torch.ones(3))])
        assert hft.describe_stepped_tensors(mixed) == (
            "1 DTensor parameters (FSDP2/TP shards of whole logical tensors, mesh (1,)) and 1 plain tensors"
        )
    finally:
        dist.destroy_process_group()
