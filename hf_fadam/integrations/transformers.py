"""``--optim fadam`` for the Hugging Face ``Trainer``.

transformers has no public way to add an optimizer name: ``TrainingArguments.optim`` accepts only members of the
closed enum ``OptimizerNames``, and the Trainer maps each member to a class in a private table (transformers >= 5.2,
``trainer_optimizer._OPTIMIZER_HANDLERS``) or in the static method ``Trainer.get_optimizer_cls_and_kwargs`` (earlier
releases). :func:`register` patches both places at run time, plus the model card and the pickling of the new member:

1. ``OptimizerNames.FADAM = "fadam"`` is added to the enum, so ``--optim fadam`` parses, ``--help`` lists it and
   ``TrainingArguments(optim="fadam")`` (also from JSON/YAML configs) validates. The member pickles as the plain
   string ``"fadam"``, so a ``training_args.bin`` written by a FAdam run loads where hf_fadam is not installed.
2. The Trainer builds :class:`hf_fadam.FAdam` for it: from ``learning_rate``, ``adam_beta1``/``adam_beta2``,
   ``adam_epsilon``, ``weight_decay`` (on the Trainer's decay group; its no-decay group gets 0) and the keys of
   ``optim_args`` listed in :data:`OPTIM_ARGS`. An unknown or malformed key is an error that names it.
3. The model card written by ``Trainer.create_model_card``/``push_to_hub`` names FAdam with the hyperparameters it
   ran with and carries the tag ``fadam``.

DeepSpeed (ZeRO hands the optimizer flat partitions that mix many tensors) and FSDP1 (flat or 1-D shards) break
FAdam's per-tensor RMS; the handler refuses them unless ``optim_args`` has ``allow_flat_shards=true``. FSDP2 and DDP
keep whole logical tensors and are fine.

Registration must happen before the script builds its ``HfArgumentParser``. The ``hf_fadam_autoload.pth`` installed
with the package does that for any script (see :mod:`hf_fadam.integrations.autoload`); ``python -m hf_fadam.run`` and
an explicit ``hf_fadam.register()`` are the other two ways.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import threading
from collections.abc import Callable
from typing import Any


__all__ = ["OPTIM_ARGS", "describe_optimizer", "fadam_cls_and_kwargs", "is_registered", "parse_optim_args", "register"]

logger = logging.getLogger("hf_fadam")

OPTIM_NAME = "fadam"
MEMBER_NAME = "FADAM"
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
}
#: ``optim_args`` keys read by the handler itself and not passed on.
_HANDLER_ARGS: dict[str, Callable[[str, str], Any]] = {"allow_flat_shards": _to_bool}
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
}


def parse_optim_args(optim_args: str | None) -> dict[str, Any]:
    """Parse ``TrainingArguments.optim_args`` for FAdam: ``"clip=1.0,p=0.5"`` → ``{"clip": 1.0, "p": 0.5}``.

    The grammar is the Trainer's (comma-separated ``key=value`` pairs; spaces are ignored), but where the Trainer
    silently drops keys that an optimizer does not use, this raises ``ValueError`` naming any unknown key, malformed
    pair or unconvertible value. The handler-only key ``allow_flat_shards`` is returned too.
    """
    parsed: dict[str, Any] = {}
    if not optim_args:
        return parsed
    valid = {**OPTIM_ARGS, **_HANDLER_ARGS}
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


def is_fadam(optim: Any) -> bool:
    """Whether ``TrainingArguments.optim`` names FAdam (the enum member, or the plain string after unpickling)."""
    return getattr(optim, "value", optim) == OPTIM_NAME


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


def flat_shard_problem(args: Any, model: Any = None) -> str | None:
    """Why FAdam's per-tensor RMS cannot hold in this run (DeepSpeed or FSDP1), or None if it can."""
    if (
        getattr(args, "deepspeed", None)
        or getattr(args, "hf_deepspeed_config", None)
        or _truthy_env("ACCELERATE_USE_DEEPSPEED")
    ):
        return (
            "DeepSpeed hands the optimizer flat partitions that concatenate many parameter tensors (ZeRO stages 1-3 "
            "and its bf16 optimizer), so FAdam's per-tensor RMS (adaptive epsilon and clipping) would be taken over "
            "a mix of tensors"
        )
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


def fadam_kwargs(args: Any, model: Any = None) -> dict[str, Any]:
    """The keyword arguments of :class:`hf_fadam.FAdam` for ``args`` (a ``TrainingArguments``).

    Raises ``ValueError`` for a bad ``optim_args`` and for DeepSpeed/FSDP1 runs without ``allow_flat_shards=true``.
    """
    options = parse_optim_args(getattr(args, "optim_args", None))
    allow_flat_shards = options.pop("allow_flat_shards", False)
    problem = flat_shard_problem(args, model)
    if problem is not None:
        if not allow_flat_shards:
            raise ValueError(
                f"--optim fadam refuses this run: {problem}. Pass --optim_args allow_flat_shards=true to run anyway "
                f"with per-partition statistics."
            )
        logger.warning("hf_fadam: running with allow_flat_shards=true although %s.", problem)
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


def fadam_cls_and_kwargs(args: Any, model: Any = None) -> tuple[type, dict[str, Any]]:
    """``(FAdam, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``: FAdam in a Trainer without any patching."""
    from hf_fadam.optimizer import FAdam

    return FAdam, fadam_kwargs(args, model)


def _tag_model(model: Any) -> None:
    add_tags = getattr(model, "add_model_tags", None)
    if callable(add_tags):
        try:
            add_tags([MODEL_CARD_TAG])
        except Exception:  # a wrapped model with its own notion of tags: the card tag is added elsewhere too
            logger.debug("hf_fadam: could not tag the model", exc_info=True)


def _fadam_handler(ctx: Any) -> tuple[type, dict[str, Any]]:
    """Handler for ``trainer_optimizer._OPTIMIZER_HANDLERS`` (transformers >= 5.2)."""
    from hf_fadam.optimizer import FAdam

    kwargs = fadam_kwargs(ctx.args, ctx.model)
    # The Trainer computed lr/betas/eps from the same args; take its values in case a subclass adjusted them.
    kwargs.update(ctx.optimizer_kwargs)
    kwargs.update(ctx.adam_kwargs)
    _tag_model(ctx.model)
    return FAdam, kwargs


def describe_optimizer(args: Any) -> str:
    """The model card's ``optimizer`` line for a FAdam run: the class and every hyperparameter it ran with."""
    values = _fadam_defaults()
    try:
        values.update(fadam_kwargs(args))
    except ValueError:  # a run that the handler refused or that overrode the optimizer: describe what args say
        values.update(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        values.update(weight_decay=args.weight_decay)
    beta1, beta2 = values["betas"]
    extra = ", ".join(f"{key}={values[key]}" for key in ("maximize", "state_dtype") if values.get(key))
    extra = f", {extra}" if extra else ""
    optimizer_args = args.optim_args or "No additional optimizer arguments"
    return (
        f"Use FAdam (hf_fadam.FAdam, --optim {OPTIM_NAME}) with betas=({beta1},{beta2}), epsilon={values['eps']}, "
        f"weight_decay={values['weight_decay']}, clip={values['clip']}, p={values['p']}{extra} and "
        f"optimizer_args={optimizer_args}"
    )


# --------------------------------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------------------------------


def _reduce_ex_str_for_fadam(original: Callable[..., Any]) -> Callable[..., Any]:
    def __reduce_ex__(self: Any, protocol: int) -> Any:
        # Only our member pickles as a plain str: a training_args.bin then loads without hf_fadam, where
        # OptimizerNames("fadam") would fail. Nothing in transformers needs args.optim to be the member itself.
        if self._value_ == OPTIM_NAME:
            return str, (OPTIM_NAME,)
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
        if OPTIM_NAME not in OptimizerNames._value2member_map_:
            _add_enum_member(OptimizerNames, MEMBER_NAME, OPTIM_NAME)
        original = OptimizerNames.__reduce_ex__
        if not getattr(original, _MARK, False):
            type.__setattr__(OptimizerNames, "__reduce_ex__", _reduce_ex_str_for_fadam(original))
        type.__setattr__(OptimizerNames, _MARK, True)
        _state["enum"] = True
        return True


def _patch_get_optimizer_cls_and_kwargs(trainer_cls: type, has_handler_table: bool) -> None:
    original = inspect.getattr_static(trainer_cls, "get_optimizer_cls_and_kwargs")
    if getattr(original, _MARK, False):
        return
    original_func = original.__func__ if isinstance(original, staticmethod) else original

    def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, Any]:
        if not is_fadam(args.optim):
            return original_func(args, model)
        if has_handler_table:
            # Check optim_args here: the Trainer splits it before calling our handler, and a malformed pair would
            # fail there with "not enough values to unpack" instead of an error that names it.
            parse_optim_args(args.optim_args)
            return original_func(args, model)
        cls, kwargs = fadam_cls_and_kwargs(args, model)
        _tag_model(model)
        return cls, kwargs

    get_optimizer_cls_and_kwargs.__doc__ = original_func.__doc__
    get_optimizer_cls_and_kwargs.__wrapped__ = original_func
    wrapper = staticmethod(get_optimizer_cls_and_kwargs)
    setattr(get_optimizer_cls_and_kwargs, _MARK, True)
    type.__setattr__(trainer_cls, "get_optimizer_cls_and_kwargs", wrapper)


def _patch_model_card() -> None:
    from transformers import modelcard

    summary_cls = modelcard.TrainingSummary
    original = inspect.getattr_static(summary_cls, "from_trainer")
    if getattr(original.__func__, _MARK, False):
        return
    original_func = original.__func__

    def from_trainer(cls: type, trainer: Any, *args: Any, **kwargs: Any) -> Any:
        if not is_fadam(getattr(trainer.args, "optim", None)):
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

            handlers[OptimizerNames(OPTIM_NAME)] = _fadam_handler
        _patch_get_optimizer_cls_and_kwargs(trainer_module.Trainer, has_handler_table=handlers is not None)
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
