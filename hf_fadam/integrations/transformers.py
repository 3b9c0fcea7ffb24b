"""``--optim fadam`` for the Hugging Face ``Trainer``.

transformers has no public way to add an optimizer name: ``TrainingArguments.optim`` accepts only members of the
closed enum ``OptimizerNames``, and the Trainer maps each member to a class in a private table (transformers >= 5.2,
``trainer_optimizer._OPTIMIZER_HANDLERS``) or in the static method ``Trainer.get_optimizer_cls_and_kwargs`` (earlier
releases). :func:`register` patches both places at run time, plus the model card and the pickling of the new member:

1. ``OptimizerNames.FADAM = "fadam"`` is added to the enum, so ``--optim fadam`` parses, ``--help`` lists it and
   ``TrainingArguments(optim="fadam")`` (also from JSON/YAML configs) validates. The member pickles as the plain
   string ``"fadam"``, so a ``training_args.bin`` written by a FAdam run loads where hf_fadam is not installed.
   ``TrainingArguments.__post_init__`` checks FAdam's ``optim_args`` and hyperparameters, so a bad value fails when
   the arguments are built or parsed, before any model is loaded.
2. The Trainer builds :class:`hf_fadam.FAdam` for it: from ``learning_rate``, ``adam_beta1``/``adam_beta2``,
   ``adam_epsilon``, ``weight_decay`` (on the Trainer's decay group; its no-decay group gets 0) and the keys of
   ``optim_args`` listed in :data:`OPTIM_ARGS`. An unknown or malformed key is an error that names it.
3. When a Trainer builds FAdam (``Trainer.create_optimizer``), it logs one line on the Trainer's logger (shown with
   the Trainer's own info lines, on the main process) with the implementation chosen and the hyperparameters, and
   tags the run ``fadam``: in the model's tags (``model.add_model_tags``, which ``push_to_hub`` and TRL read) and in
   that trainer's ``create_model_card``, also where a subclass (TRL) overrides it.
4. The model card written by ``Trainer.create_model_card``/``push_to_hub`` names FAdam with the hyperparameters it
   ran with and carries the tag ``fadam``.

DeepSpeed hands the optimizer flat partitions that mix and cut many tensors; the handler has
:mod:`hf_fadam.integrations.deepspeed` map them back to parameters, so ZeRO 1-3 runs are exact. FSDP1 (flat or 1-D
shards) and DeepSpeed with the optimizer state on NVMe break FAdam's per-tensor RMS; the handler refuses them unless
``optim_args`` has ``allow_flat_shards=true``, which it also passes to the optimizer (FAdam itself refuses FSDP1
parameters without it). FSDP2 and DDP keep whole logical tensors and are fine.

Registration must happen before the script builds its ``HfArgumentParser``. The ``hf_fadam_autoload.pth`` installed
with the package does that for any script (see :mod:`hf_fadam.integrations.autoload`); ``python -m hf_fadam.run`` and
an explicit ``hf_fadam.register()`` are the other two ways.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
import os
import threading
from collections.abc import Callable
from typing import Any


__all__ = [
    "OPTIM_ARGS",
    "describe_optimizer",
    "fadam_cls_and_kwargs",
    "is_registered",
    "layerwise_problem",
    "optimizer_cls_and_kwargs",
    "parse_optim_args",
    "register",
    "validate_training_args",
]

logger = logging.getLogger("hf_fadam")

OPTIM_NAME = "fadam"
MEMBER_NAME = "FADAM"
# --optim fadam_8bit: hf_fadam.FAdam8bit (8-bit blockwise state), with FAdam's optim_args plus OPTIM_ARGS_8BIT.
OPTIM_NAME_8BIT = "fadam_8bit"
MEMBER_NAME_8BIT = "FADAM_8BIT"
# --optim fadam_layerwise / fadam_8bit_layerwise: the same optimizers with gradient_release=True (each parameter is
# stepped inside backward and its gradient freed; hf_fadam._release), for runs that layerwise_problem() accepts.
OPTIM_NAME_LAYERWISE = "fadam_layerwise"
MEMBER_NAME_LAYERWISE = "FADAM_LAYERWISE"
OPTIM_NAME_8BIT_LAYERWISE = "fadam_8bit_layerwise"
MEMBER_NAME_8BIT_LAYERWISE = "FADAM_8BIT_LAYERWISE"
#: Every ``--optim`` name hf_fadam adds: name -> (OptimizerNames member name, 8-bit state, gradient release).
OPTIM_NAMES: dict[str, tuple[str, bool, bool]] = {
    OPTIM_NAME: (MEMBER_NAME, False, False),
    OPTIM_NAME_8BIT: (MEMBER_NAME_8BIT, True, False),
    OPTIM_NAME_LAYERWISE: (MEMBER_NAME_LAYERWISE, False, True),
    OPTIM_NAME_8BIT_LAYERWISE: (MEMBER_NAME_8BIT_LAYERWISE, True, True),
}
MODEL_CARD_TAG = "fadam"
# Set to 1 to let hf_fadam patch transformers even where transformers already defines --optim fadam itself.
FORCE_ENV_VAR = "HF_FADAM_FORCE"

_lock = threading.RLock()
_MARK = "_hf_fadam_patched"  # attribute set on everything we patch, so that each patch happens once
_state = {"enum": False, "trainer": False, "native": None}


# --------------------------------------------------------------------------------------------------------------------
# optim_args: "key=value,key=value" (the Trainer's grammar; values are strings that each key converts)
# --------------------------------------------------------------------------------------------------------------------

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = ("none", "null", "auto")


def _to_float(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"optim_args key {key!r} needs a number; got {value!r}") from None


def _to_bool(key: str, value: str) -> bool:
    low = value.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"optim_args key {key!r} needs true or false; got {value!r}")


def _to_optional_bool(key: str, value: str) -> bool | None:
    if value.lower() in _NONE:
        return None
    try:
        return _to_bool(key, value)
    except ValueError:
        raise ValueError(f"optim_args key {key!r} needs true, false or none; got {value!r}") from None


def _to_state_dtype(key: str, value: str) -> str | None:
    # FAdam itself turns the name into a torch.dtype and rejects unknown names with the list of valid ones.
    return None if value.lower() in _NONE else value


#: The ``optim_args`` keys that are passed to :class:`hf_fadam.FAdam`, with the conversion of each value.
OPTIM_ARGS: dict[str, Callable[[str, str], Any]] = {
    "clip": _to_float,
    "p": _to_float,
    "state_dtype": _to_state_dtype,
    "foreach": _to_optional_bool,
    "fused": _to_optional_bool,
    "maximize": _to_bool,
    # FAdam itself checks the value against its list ("auto", "nearest", "stochastic", "kahan") and names them.
    "param_rounding": lambda key, value: value,
    # Also read by the handler's guard (FSDP1, DeepSpeed NVMe offload); FAdam itself refuses FSDP1 params without it.
    "allow_flat_shards": _to_bool,
}


def _to_int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"optim_args key {key!r} needs an integer; got {value!r}") from None


#: The extra ``optim_args`` keys of ``--optim fadam_8bit`` (passed to :class:`hf_fadam.FAdam8bit`).
OPTIM_ARGS_8BIT: dict[str, Callable[[str, str], Any]] = {"block_size": _to_int, "min_8bit_size": _to_int}
#: Keys that FAdam has but that come from TrainingArguments fields: say which flag to use instead.
_FROM_TRAINING_ARGS = {
    "lr": "--learning_rate",
    "learning_rate": "--learning_rate",
    "betas": "--adam_beta1 and --adam_beta2",
    "beta1": "--adam_beta1",
    "beta2": "--adam_beta2",
    "eps": "--adam_epsilon",
    "epsilon": "--adam_epsilon",
    "weight_decay": "--weight_decay",
    # chosen by the name, so that the refusals of layerwise_problem() always apply
    "gradient_release": "--optim fadam_layerwise or --optim fadam_8bit_layerwise",
}


def parse_optim_args(
    optim_args: str | None, extra: dict[str, Callable[[str, str], Any]] | None = None
) -> dict[str, Any]:
    """Parse ``TrainingArguments.optim_args`` for FAdam: ``"clip=1.0,p=0.5"`` → ``{"clip": 1.0, "p": 0.5}``.

    The grammar is the Trainer's (comma-separated ``key=value`` pairs; spaces are ignored), but where the Trainer
    silently drops keys that an optimizer does not use, this raises ``ValueError`` naming any unknown key, malformed
    pair or unconvertible value.
    """
    parsed: dict[str, Any] = {}
    if not optim_args:
        return parsed
    valid = {**OPTIM_ARGS, **(extra or {})}
    for pair in optim_args.replace(" ", "").split(","):
        key, sep, value = pair.partition("=")
        if not sep or not key or not value or "=" in value:
            raise ValueError(
                f"Malformed optim_args entry {pair!r} in {optim_args!r}: FAdam expects comma-separated key=value "
                f"pairs, e.g. 'clip=1.0,p=0.5'"
            )
        if key in _FROM_TRAINING_ARGS:
            raise ValueError(
                f"optim_args key {key!r} is not read from optim_args: set it with {_FROM_TRAINING_ARGS[key]}"
            )
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"Unknown optim_args key {key!r} for --optim fadam.{hint} Valid keys: {', '.join(sorted(valid))}"
            )
        if key in parsed:
            raise ValueError(f"optim_args key {key!r} is given twice in {optim_args!r}")
        parsed[key] = valid[key](key, value)
    return parsed


# --------------------------------------------------------------------------------------------------------------------
# TrainingArguments → FAdam
# --------------------------------------------------------------------------------------------------------------------


def fadam_variant(optim: Any) -> tuple[str, bool, bool] | None:
    """``(name, eight_bit, layerwise)`` when ``TrainingArguments.optim`` is one of hf_fadam's names (the enum member,
    or the plain string after unpickling), else None."""
    name = getattr(optim, "value", optim)
    if not isinstance(name, str) or name not in OPTIM_NAMES:
        return None
    _, eight_bit, layerwise = OPTIM_NAMES[name]
    return name, eight_bit, layerwise


def layerwise_problem(args: Any) -> str | None:
    """Why gradient release (``--optim fadam_layerwise``/``fadam_8bit_layerwise``) cannot give this run's result
    exactly, or None. Each released parameter is stepped inside backward with the gradient autograd has just
    accumulated, so nothing may need all gradients first or change them after backward."""
    accumulation = getattr(args, "gradient_accumulation_steps", 1) or 1
    if accumulation > 1:
        return (
            f"gradient_accumulation_steps={accumulation}: gradient release steps at every backward, so gradients "
            f"cannot be summed over micro-batches; use --gradient_accumulation_steps 1 (a larger "
            f"--per_device_train_batch_size) or --optim fadam"
        )
    max_norm = getattr(args, "max_grad_norm", None)
    if max_norm is not None and max_norm > 0:
        return (
            f"max_grad_norm={max_norm} (1.0 is the Trainer's default): clipping by the global gradient norm needs "
            f"every gradient at once, and gradient release frees each one as backward produces it; pass "
            f"--max_grad_norm 0 (FAdam clips its natural gradient per tensor itself: optim_args clip, default 1.0)"
        )
    if getattr(args, "fp16", False):
        return (
            "--fp16: GradScaler must see every gradient (to unscale it and to skip a step that overflowed) before "
            "anything is stepped; use --bf16 or float32"
        )
    if _is_deepspeed_run(args):
        return "DeepSpeed reduces and partitions the gradients after backward; use --optim fadam"
    if getattr(args, "fsdp", None) or _truthy_env("ACCELERATE_USE_FSDP"):
        return "FSDP reduce-scatters the gradients after backward; use --optim fadam"
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        return (
            f"a run of {world} processes (WORLD_SIZE={world}): DDP averages the gradients across processes after "
            f"backward, so a step inside backward would see this process's gradient alone; use --optim fadam"
        )
    return None


def _refuse_layerwise(args: Any, name: str) -> None:
    problem = layerwise_problem(args)
    if problem is not None:
        raise ValueError(f"--optim {name} refuses this run: {problem}")


def _truthy_env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _fsdp1_modules(model: Any) -> bool:
    if model is None or not hasattr(model, "modules"):
        return False
    import torch.distributed

    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(module, FullyShardedDataParallel) for module in model.modules())


def _fsdp_version(args: Any) -> int:
    config = getattr(args, "fsdp_config", None) or {}
    version = config.get("version") or config.get("fsdp_version") or os.environ.get("FSDP_VERSION")
    if version is not None:
        return int(version)
    import transformers

    # FSDP2 is the default of TrainingArguments from transformers 5; before, accelerate's default (FSDP1) applied.
    return 2 if int(transformers.__version__.split(".")[0]) >= 5 else 1


def _is_deepspeed_run(args: Any) -> bool:
    return bool(
        getattr(args, "deepspeed", None)
        or getattr(args, "hf_deepspeed_config", None)
        or _truthy_env("ACCELERATE_USE_DEEPSPEED")
    )


def _deepspeed_optimizer_offload_device(args: Any) -> str:
    """``zero_optimization.offload_optimizer.device`` of the run's DeepSpeed config ("" when not set)."""
    config = getattr(getattr(args, "hf_deepspeed_config", None), "config", None)
    if config is None:
        config = getattr(args, "deepspeed", None)
        if isinstance(config, (str, os.PathLike)) and os.path.isfile(config):
            import json

            with open(config) as f:
                config = json.load(f)
    device = ((config if isinstance(config, dict) else {}).get("zero_optimization") or {}).get("offload_optimizer")
    device = (device or {}).get("device") or os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "")
    return str(device).lower()


def flat_shard_problem(args: Any, model: Any = None) -> str | None:
    """Why FAdam's per-tensor RMS cannot hold in this run (FSDP1, DeepSpeed with NVMe offload), or None if it can.

    DeepSpeed ZeRO 1-3 (and its bf16/fp16 optimizers) hand FAdam flat partitions that mix and cut parameters, but
    :mod:`hf_fadam.integrations.deepspeed` maps them back to parameters, so those runs are exact.
    """
    if _is_deepspeed_run(args):
        if _deepspeed_optimizer_offload_device(args) == "nvme":
            return (
                "DeepSpeed ZeRO with the optimizer state on NVMe (offload_optimizer.device=nvme) swaps its flat "
                "partitions through placeholder tensors, which hf_fadam cannot map back to parameters; use "
                "offload_optimizer.device=cpu or none"
            )
        return None
    fsdp_xla = (getattr(args, "fsdp_config", None) or {}).get("xla", False)
    fsdp_on = (bool(getattr(args, "fsdp", None)) and not fsdp_xla) or _truthy_env("ACCELERATE_USE_FSDP")
    if _fsdp1_modules(model) or (fsdp_on and _fsdp_version(args) == 1):
        return (
            "FSDP1 hands the optimizer flat or 1-D local shards of parameters, so FAdam's per-tensor RMS (adaptive "
            "epsilon and clipping) would be taken per shard; use FSDP2 (fsdp_config version 2), whose DTensor "
            "parameters keep the full logical tensor"
        )
    return None


def _fadam_defaults() -> dict[str, Any]:
    from hf_fadam.optimizer import FAdam

    params = inspect.signature(FAdam.__init__).parameters
    return {name: param.default for name, param in params.items() if param.default is not inspect.Parameter.empty}


def fadam_kwargs(
    args: Any, model: Any = None, extra: dict[str, Callable[[str, str], Any]] | None = None
) -> dict[str, Any]:
    """The keyword arguments of :class:`hf_fadam.FAdam` for ``args`` (a ``TrainingArguments``).

    Raises ``ValueError`` for a bad ``optim_args`` and for FSDP1 (or DeepSpeed NVMe-offload) runs without
    ``allow_flat_shards=true``. ``allow_flat_shards=true`` is passed on: FAdam refuses FSDP1 parameters without it.
    """
    options = parse_optim_args(getattr(args, "optim_args", None), extra)
    allow_flat_shards = options.get("allow_flat_shards", False)
    problem = flat_shard_problem(args, model)
    if problem is not None:
        if not allow_flat_shards:
            raise ValueError(
                f"--optim fadam refuses this run: {problem}. Pass --optim_args allow_flat_shards=true to run anyway "
                f"with per-partition statistics."
            )
        logger.warning("hf_fadam: running with allow_flat_shards=true although %s.", problem)
    elif _is_deepspeed_run(args):
        # DeepSpeed's optimizers built around this FAdam describe their flat partitions to it (exact per-tensor RMS).
        # (Without the deepspeed package there is nothing to patch, and the run fails in DeepSpeed's own import.)
        from hf_fadam.integrations.deepspeed import install

        install()
    kwargs = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        # The Trainer's two param groups set their own weight_decay (args.weight_decay and 0.0); this default only
        # matters for groups built elsewhere, and keeps TrainingArguments' value rather than FAdam's 0.1.
        "weight_decay": args.weight_decay,
    }
    kwargs.update(options)
    return kwargs


def validate_training_args(args: Any) -> None:
    """Raise ``ValueError`` now for what would make the Trainer fail to build FAdam later (``fadam``, ``fadam_8bit``).

    Checks ``optim_args`` (:func:`parse_optim_args`) and then every hyperparameter as FAdam's constructor does (e.g.
    ``Invalid clip: -1.0``), without a model. The DeepSpeed/FSDP1 guard needs the model and stays at build time.
    """
    variant = fadam_variant(getattr(args, "optim", None))
    if variant is None:
        return
    name, eight_bit, layerwise = variant
    from hf_fadam.optimizer import FAdam

    options = parse_optim_args(getattr(args, "optim_args", None), OPTIM_ARGS_8BIT if eight_bit else None)
    options.pop("allow_flat_shards", None)
    if eight_bit:
        from hf_fadam.optimizer_8bit import _check_block_size, _check_min_size

        if "state_dtype" in options:
            raise ValueError(f"optim_args key 'state_dtype' does not apply to --optim {name} (its state is 8-bit)")
        _check_block_size(options.pop("block_size", 256))
        _check_min_size(options.pop("min_8bit_size", 4096))
    if layerwise:
        _refuse_layerwise(args, name)
    group = _fadam_defaults()
    group.update(
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )
    group.update(options)
    FAdam._validate_group(group)


def fadam_cls_and_kwargs(args: Any, model: Any = None) -> tuple[type, dict[str, Any]]:
    """``(class, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``: FAdam in a Trainer without any patching.

    The class and settings of ``args.optim`` where it is one of hf_fadam's names (:func:`optimizer_cls_and_kwargs`),
    else :class:`hf_fadam.FAdam` with FAdam's reading of ``args``."""
    if fadam_variant(getattr(args, "optim", None)) is not None:
        return optimizer_cls_and_kwargs(args, model)
    from hf_fadam.optimizer import FAdam

    return FAdam, fadam_kwargs(args, model)


def _tag_model(model: Any) -> None:
    add_tags = getattr(model, "add_model_tags", None)
    if callable(add_tags):
        try:
            add_tags([MODEL_CARD_TAG])
        except Exception:  # a wrapped model with its own notion of tags: the card tag is added elsewhere too
            logger.debug("hf_fadam: could not tag the model", exc_info=True)


def _with_tag(tags: Any) -> list[str]:
    tags = [] if tags is None else [tags] if isinstance(tags, str) else list(tags)
    return tags if MODEL_CARD_TAG in tags else [*tags, MODEL_CARD_TAG]


def _tag_model_cards(trainer: Any) -> None:
    """Add ``fadam`` to the tags of this trainer's ``create_model_card``, whichever class defines it (TRL's too)."""
    original = trainer.create_model_card
    if getattr(original, _MARK, False):
        return
    signature = inspect.signature(original)
    if "tags" not in signature.parameters:
        return

    @functools.wraps(original)
    def create_model_card(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.arguments["tags"] = _with_tag(bound.arguments.get("tags"))
        return original(*bound.args, **bound.kwargs)

    setattr(create_model_card, _MARK, True)
    trainer.create_model_card = create_model_card


def _trainer_logger() -> logging.Logger:
    # The Trainer's own logger: the line shows where "***** Running training *****" does (the main process, at
    # --log_level info or a script's set_verbosity_info()), and replicas stay quiet.
    from transformers.utils import logging as hf_logging

    return hf_logging.get_logger("transformers.trainer")


def describe_built_optimizer(optimizer: Any) -> str:
    """The log line for a FAdam the Trainer built: the implementation ``step`` runs and the hyperparameters."""
    defaults = optimizer.defaults
    beta1, beta2 = defaults["betas"]
    decays = ", ".join(str(g["weight_decay"]) for g in optimizer.param_groups)
    state_dtype = defaults["state_dtype"]
    state_dtype = "auto (float32 for 16-bit params, else the param dtype)" if state_dtype is None else state_dtype
    try:
        implementation = optimizer.describe_implementation()
    except Exception as exc:  # a log line must not stop a run; the step itself reports real problems
        implementation = f"unknown ({type(exc).__name__}: {exc})"
    return (
        f"hf_fadam: the Trainer built {type(optimizer).__name__}, implementation {implementation}; "
        f"lr={defaults['lr']}, betas=({beta1}, {beta2}), eps={defaults['eps']}, weight_decay per param group="
        f"[{decays}], clip={defaults['clip']}, p={defaults['p']}, maximize={defaults['maximize']}, "
        f"state_dtype={state_dtype}, foreach={defaults['foreach']}, fused={defaults['fused']}, "
        f"{describe_param_rounding(optimizer)}; steps {describe_stepped_tensors(optimizer)}"
        + ("; gradient_release=True: each parameter stepped inside backward, its gradient freed"
           if getattr(optimizer, "gradient_release", False) else "")
    )  # fmt: skip


def describe_stepped_tensors(optimizer: Any) -> str:
    """What the optimizer's params are, so that an engine that silently fell back shows in the log: DTensor shards
    (FSDP2/TP), DeepSpeed flat partitions, FSDP1 flat shards, or plain tensors (one process, DDP)."""
    from hf_fadam._flat import get_layout, has_layouts
    from hf_fadam._fsdp1 import is_fsdp1_flat
    from hf_fadam._multi_tensor import _is_dtensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    dtensors = [p for p in params if _is_dtensor(p)]
    if dtensors:
        meshes = sorted({str(tuple(p.device_mesh.shape)) for p in dtensors})
        return (
            f"{len(dtensors)} DTensor parameters (FSDP2/TP shards of whole logical tensors, mesh {', '.join(meshes)})"
            + (f" and {len(params) - len(dtensors)} plain tensors" if len(dtensors) < len(params) else "")
        )
    if has_layouts() and any(get_layout(p) is not None for p in params):
        n = sum(get_layout(p).num_slots for p in params if get_layout(p) is not None)
        return f"{len(params)} DeepSpeed flat partitions (mapped back to {n} parameters: per-tensor RMS)"
    flat = sum(1 for p in params if is_fsdp1_flat(p))
    if flat:
        return f"{flat} FSDP1 flat shards (per-shard RMS: allow_flat_shards=True)"
    world = ""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = f", replicated on {dist.get_world_size()} processes (DDP)"
    return f"{len(params)} plain tensors (whole parameters{world})"


def describe_param_rounding(optimizer: Any) -> str:
    """``param_rounding=...`` with what it means for this optimizer's params: which 16-bit dtypes it steps directly
    (a pure low-precision fine-tune) and how it stores them, or that every param is 32/64-bit (nothing rounds)."""
    from hf_fadam._rounding import SIXTEEN_BIT

    mode = optimizer.defaults.get("param_rounding", "nearest")
    low = sorted({str(p.dtype).removeprefix("torch.") for g in optimizer.param_groups for p in g["params"]
                  if p.dtype in SIXTEEN_BIT})  # fmt: skip
    if not low:
        return f"param_rounding={mode} (float32/float64 params: nothing to round)"
    stores = sorted({optimizer.param_rounding_of(g, p.dtype)
                     for g in optimizer.param_groups for p in g["params"] if p.dtype in SIXTEEN_BIT})  # fmt: skip
    return (
        f"param_rounding={mode}: {'/'.join(low)} params stepped directly (a pure low-precision fine-tune), "
        f"stored with {'/'.join(stores)} rounding"
    )


def _on_fadam_built(trainer: Any, optimizer: Any) -> None:
    _tag_model(getattr(trainer, "model", None))
    _tag_model_cards(trainer)
    _trainer_logger().info(describe_built_optimizer(optimizer))


def optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[type, dict[str, Any]]:
    """The class and keyword arguments the Trainer builds for ``args.optim`` (any of :data:`OPTIM_NAMES`).

    ``fadam``: :class:`hf_fadam.FAdam`; ``fadam_8bit``: :class:`hf_fadam.FAdam8bit`; the ``_layerwise`` names the same
    with ``gradient_release=True``, after :func:`layerwise_problem` found nothing to refuse.
    """
    variant = fadam_variant(args.optim)
    if variant is None:
        raise ValueError(f"--optim {getattr(args.optim, 'value', args.optim)} is not one of {sorted(OPTIM_NAMES)}")
    name, eight_bit, layerwise = variant
    if layerwise:
        _refuse_layerwise(args, name)
    if eight_bit:
        from hf_fadam.optimizer_8bit import FAdam8bit

        cls, kwargs = FAdam8bit, fadam_8bit_kwargs(args, model, name)
    else:
        from hf_fadam.optimizer import FAdam

        cls, kwargs = FAdam, fadam_kwargs(args, model)
    if layerwise:
        kwargs["gradient_release"] = True
    return cls, kwargs


def _fadam_handler(ctx: Any) -> tuple[type, dict[str, Any]]:
    """Handler of every hf_fadam name for ``trainer_optimizer._OPTIMIZER_HANDLERS`` (transformers >= 5.2)."""
    cls, kwargs = optimizer_cls_and_kwargs(ctx.args, ctx.model)
    # The Trainer computed lr/betas/eps from the same args; take its values in case a subclass adjusted them.
    kwargs.update(ctx.optimizer_kwargs)
    kwargs.update(ctx.adam_kwargs)
    _tag_model(ctx.model)
    return cls, kwargs


def fadam_8bit_kwargs(args: Any, model: Any = None, name: str = OPTIM_NAME_8BIT) -> dict[str, Any]:
    """The keyword arguments of :class:`hf_fadam.FAdam8bit`: FAdam's (:func:`fadam_kwargs`) plus ``block_size`` and
    ``min_8bit_size`` from ``optim_args``. DeepSpeed and FSDP runs are refused (FAdam8bit steps whole tensors)."""
    if _is_deepspeed_run(args):
        from hf_fadam.integrations.deepspeed import fadam8bit_refusal

        raise ValueError(f"--optim {name} refuses this run: {fadam8bit_refusal()}")
    if getattr(args, "fsdp", None) or _truthy_env("ACCELERATE_USE_FSDP"):
        raise ValueError(
            f"--optim {name} supports single-process and DDP runs; under DeepSpeed or FSDP use --optim fadam"
        )
    kwargs = fadam_kwargs(args, model, extra=OPTIM_ARGS_8BIT)
    if "state_dtype" in kwargs:
        raise ValueError(f"optim_args key 'state_dtype' does not apply to --optim {name} (its state is 8-bit)")
    return kwargs


def describe_optimizer(args: Any) -> str:
    """The model card's ``optimizer`` line for a run of any hf_fadam name: the class and every setting it ran with."""
    name, eight_bit, layerwise = fadam_variant(args.optim) or (OPTIM_NAME, False, False)
    values = _fadam_defaults()
    if eight_bit:
        values.pop("state_dtype", None)
        values.update(block_size=256, min_8bit_size=4096)
    try:
        values.update(fadam_8bit_kwargs(args, None, name) if eight_bit else fadam_kwargs(args))
    except ValueError:  # a run that the handler refused or that overrode the optimizer: describe what args say
        values.update(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        values.update(weight_decay=args.weight_decay)
    beta1, beta2 = values["betas"]
    keys = ["maximize", "state_dtype"] if not eight_bit else ["maximize"]
    extra = [f"{key}={values[key]}" for key in keys if values.get(key)]
    if eight_bit:
        extra += [f"block_size={values['block_size']}", f"min_8bit_size={values['min_8bit_size']}"]
    extra.append(f"param_rounding={values.get('param_rounding', 'auto')}")
    if layerwise:
        extra.append("gradient_release=True (each parameter stepped inside backward, its gradient freed)")
    optimizer_args = args.optim_args or "No additional optimizer arguments"
    cls = "FAdam8bit" if eight_bit else "FAdam"
    return (
        f"Use {cls} (hf_fadam.{cls}, --optim {name}) with betas=({beta1},{beta2}), epsilon={values['eps']}, "
        f"weight_decay={values['weight_decay']}, clip={values['clip']}, p={values['p']}, {', '.join(extra)} and "
        f"optimizer_args={optimizer_args}"
    )


# --------------------------------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------------------------------


def _reduce_ex_str_for_fadam(original: Callable[..., Any]) -> Callable[..., Any]:
    def __reduce_ex__(self: Any, protocol: int) -> Any:
        # Only our member pickles as a plain str: a training_args.bin then loads without hf_fadam, where
        # OptimizerNames("fadam") would fail. Nothing in transformers needs args.optim to be the member itself.
        if self._value_ in OPTIM_NAMES:
            return str, (self._value_,)
        return original(self, protocol)

    setattr(__reduce_ex__, _MARK, True)
    __reduce_ex__.__wrapped__ = original
    return __reduce_ex__


def _add_enum_member(enum_cls: type, name: str, value: str) -> Any:
    """Add a member to a closed ``str`` Enum (CPython 3.10-3.13 internals; every step is checked by the tests)."""
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    existing = next(iter(enum_cls._member_map_.values()), None)
    if existing is not None and hasattr(existing, "_sort_order_"):
        member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)
    return member


def _native_fadam(enum_cls: type) -> bool:
    member = enum_cls._value2member_map_.get(OPTIM_NAME)
    return member is not None and not getattr(enum_cls, _MARK, False)


def register_enum() -> bool:
    """Add ``OptimizerNames.FADAM`` (the part of :func:`register` that needs only ``transformers.training_args``).

    Returns False, changing nothing, where transformers already defines ``fadam`` (unless ``HF_FADAM_FORCE=1``).
    """
    from transformers.training_args import OptimizerNames

    with _lock:
        if _state["enum"]:
            return True
        if _native_fadam(OptimizerNames) and not _truthy_env(FORCE_ENV_VAR):
            if _state["native"] is None:
                import transformers

                logger.warning(
                    "hf_fadam: transformers %s already provides --optim fadam; hf_fadam.register() leaves it as it "
                    "is (set %s=1 to use hf_fadam.FAdam instead).",
                    transformers.__version__,
                    FORCE_ENV_VAR,
                )
            _state["native"] = True
            return False
        for name, (member_name, _, _) in OPTIM_NAMES.items():
            if name not in OptimizerNames._value2member_map_:
                _add_enum_member(OptimizerNames, member_name, name)
        original = OptimizerNames.__reduce_ex__
        if not getattr(original, _MARK, False):
            type.__setattr__(OptimizerNames, "__reduce_ex__", _reduce_ex_str_for_fadam(original))
        _patch_post_init()
        type.__setattr__(OptimizerNames, _MARK, True)
        _state["enum"] = True
        return True


def _patch_get_optimizer_cls_and_kwargs(trainer_cls: type, has_handler_table: bool) -> None:
    original = inspect.getattr_static(trainer_cls, "get_optimizer_cls_and_kwargs")
    if getattr(original, _MARK, False):
        return
    original_func = original.__func__ if isinstance(original, staticmethod) else original

    def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, Any]:
        if fadam_variant(args.optim) is None:
            return original_func(args, model)
        if has_handler_table:
            # Check everything here: the Trainer splits optim_args before calling our handler, and a malformed pair
            # would fail there with "not enough values to unpack" instead of an error that names it.
            optimizer_cls_and_kwargs(args, model)
            return original_func(args, model)
        cls, kwargs = optimizer_cls_and_kwargs(args, model)
        _tag_model(model)
        return cls, kwargs

    get_optimizer_cls_and_kwargs.__doc__ = original_func.__doc__
    get_optimizer_cls_and_kwargs.__wrapped__ = original_func
    wrapper = staticmethod(get_optimizer_cls_and_kwargs)
    setattr(get_optimizer_cls_and_kwargs, _MARK, True)
    type.__setattr__(trainer_cls, "get_optimizer_cls_and_kwargs", wrapper)


class _CheckedOptim:
    """``TrainingArguments.optim`` as a data descriptor that checks hf_fadam's arguments when ``__post_init__`` sets
    the enum member (``self.optim = OptimizerNames(self.optim)``), so a bad ``optim_args`` or hyperparameter fails
    when the arguments are built or parsed, before any model is loaded.

    A descriptor rather than a wrapper of ``__post_init__``: a wrapper would put a frame of hf_fadam on the
    traceback of every ``TrainingArguments`` error, also where FAdam is not involved; this frame is on the stack
    only while ``optim`` is assigned, and raises only for hf_fadam's own names. The value lives in the instance's
    ``__dict__``, so pickling, copying and ``dataclasses`` see a plain field; the class attribute still reads as
    the field's default.
    """

    def __init__(self, default: Any) -> None:
        self.default = default
        setattr(self, _MARK, True)

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self.default
        try:
            return instance.__dict__["optim"]
        except KeyError:
            raise AttributeError("optim") from None

    def __set__(self, instance: Any, value: Any) -> None:
        instance.__dict__["optim"] = value
        # Only the enum member that __post_init__ assigns, once every field is set (not __init__'s raw value).
        if _is_member(value):
            if all(name in instance.__dict__ for name in _CHECKED_FIELDS):
                validate_training_args(instance)


_CHECKED_FIELDS = (
    "optim_args", "learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "max_grad_norm",
    "gradient_accumulation_steps", "fp16", "deepspeed", "fsdp",
)  # fmt: skip


def _is_member(value: Any) -> bool:
    """An ``OptimizerNames`` member of hf_fadam's (a plain string is ``__init__``'s raw value)."""
    return fadam_variant(value) is not None and type(value) is not str


def _patch_post_init() -> None:
    """Install :class:`_CheckedOptim` on ``TrainingArguments`` (its subclasses inherit it unless they redeclare
    ``optim``; the Trainer checks the same arguments again when it builds the optimizer)."""
    from transformers.training_args import TrainingArguments

    current = TrainingArguments.__dict__.get("optim")
    if getattr(current, _MARK, False):
        return
    type.__setattr__(TrainingArguments, "optim", _CheckedOptim(current))


def _unwrap_optimizer(optimizer: Any) -> Any:
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 4:  # AcceleratedOptimizer, SageMaker MP, ...
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


def _patch_create_optimizer(trainer_cls: type) -> None:
    original = trainer_cls.__dict__["create_optimizer"]
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def create_optimizer(self: Any, *args: Any, **kwargs: Any) -> Any:
        built_here = getattr(self, "optimizer", None) is None
        optimizer = original(self, *args, **kwargs)
        if built_here:
            from hf_fadam.optimizer import FAdam

            inner = _unwrap_optimizer(optimizer if optimizer is not None else getattr(self, "optimizer", None))
            if isinstance(inner, FAdam):
                _on_fadam_built(self, inner)
        return optimizer

    setattr(create_optimizer, _MARK, True)
    type.__setattr__(trainer_cls, "create_optimizer", create_optimizer)


def _patch_model_card() -> None:
    from transformers import modelcard

    summary_cls = modelcard.TrainingSummary
    original = inspect.getattr_static(summary_cls, "from_trainer")
    if getattr(original.__func__, _MARK, False):
        return
    original_func = original.__func__

    def from_trainer(cls: type, trainer: Any, *args: Any, **kwargs: Any) -> Any:
        if fadam_variant(getattr(trainer.args, "optim", None)) is None:
            return original_func(cls, trainer, *args, **kwargs)
        tags = kwargs.get("tags")
        tags = [] if tags is None else [tags] if isinstance(tags, str) else list(tags)
        if MODEL_CARD_TAG not in tags:
            tags.append(MODEL_CARD_TAG)
        kwargs["tags"] = tags
        summary = original_func(cls, trainer, *args, **kwargs)
        if summary.hyperparameters is not None:
            summary.hyperparameters["optimizer"] = describe_optimizer(trainer.args)
        return summary

    from_trainer.__wrapped__ = original_func
    setattr(from_trainer, _MARK, True)
    type.__setattr__(summary_cls, "from_trainer", classmethod(from_trainer))


def register_trainer() -> bool:
    """Teach the Trainer to build FAdam for ``--optim fadam`` and the model card to describe it (needs the enum)."""
    with _lock:
        if not register_enum():
            return False
        if _state["trainer"]:
            return True
        from transformers import trainer as trainer_module

        try:
            from transformers import trainer_optimizer
        except ImportError:  # transformers < 5.2: the if/elif chain inside get_optimizer_cls_and_kwargs
            trainer_optimizer = None
        handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
        if handlers is not None:
            from transformers.training_args import OptimizerNames

            for name in OPTIM_NAMES:
                handlers[OptimizerNames(name)] = _fadam_handler
        _patch_get_optimizer_cls_and_kwargs(trainer_module.Trainer, has_handler_table=handlers is not None)
        _patch_create_optimizer(trainer_module.Trainer)
        _patch_model_card()
        _state["trainer"] = True
        return True


def register() -> bool:
    """Make ``--optim fadam`` available to the Hugging Face Trainer in this process. Idempotent and thread-safe.

    Call it before the script builds its ``HfArgumentParser`` (a parser built earlier keeps its list of choices).
    Returns True when ``fadam`` maps to :class:`hf_fadam.FAdam`; False, changing nothing and logging why, where the
    installed transformers already defines ``fadam`` itself (set ``HF_FADAM_FORCE=1`` to patch it anyway).
    """
    return register_trainer()


def is_registered() -> bool:
    """Whether :func:`register` has completed in this process."""
    return bool(_state["enum"] and _state["trainer"])
