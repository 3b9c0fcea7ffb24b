"""``--optim fadam`` through the Hugging Face Trainer, in one process or under ``torchrun`` (DDP or FSDP2, gloo/CPU).

Used by ``tests/test_distributed.py``; also runnable by hand::

    python tests/distributed/trainer_runs.py ddp OUT                       # one process, global batch 8
    torchrun --nproc_per_node 2 tests/distributed/trainer_runs.py ddp OUT  # DDP, 2 x 4 = the same global batch
    torchrun --nproc_per_node 2 tests/distributed/trainer_runs.py fsdp2 OUT  # FSDP2 through accelerate
    torchrun --nproc_per_node 2 tests/distributed/trainer_runs.py all OUT  # ddp, then fsdp2, in one launch

``ddp``: a tiny Llama trained for ``MAX_STEPS`` steps with a checkpoint at ``SAVE_STEP``. In one process rank 0
writes ``init.pt`` and ``world1_final.pt``; under torchrun a second Trainer (fresh model, other init) also resumes
from the checkpoint, and rank 0 writes ``world2_final.pt`` and ``world2_resumed.pt``. ``fsdp2`` does the same
through accelerate's FSDP2 path (checkpoints through DCP) and writes ``fsdp2_final.pt``, ``fsdp2_resumed.pt``
(full weights gathered from the shards) and ``fsdp2_rank{r}.json`` (what ``FAdam.step`` received). The test
compares them with the one-process run.

FSDP1 is not run through the Trainer: its handler refuses it (``tests/test_distributed.py`` tests that guard
in-process), and FAdam refuses FSDP1 parameters itself (``tests/test_fsdp1.py``, real FSDP1 on gloo).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


sys.path.append(str(Path(__file__).resolve().parents[2]))  # the repo root, after any installed hf_fadam

import torch  # noqa: E402
from _trainer_common import GLOBAL_BATCH, MAX_STEPS, SAVE_STEP, Tokens, tiny_llama  # noqa: E402
from _trainer_common import rank as _rank  # noqa: E402
from _trainer_common import world as _world  # noqa: E402


def _register() -> None:
    import hf_fadam

    register = getattr(hf_fadam, "register", None)
    if register is None:
        from hf_fadam.integrations.transformers import register
    register()


def _model():
    return tiny_llama(0)


def _args(output_dir: str, **overrides: Any):
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        optim="fadam",
        learning_rate=1e-2,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        max_steps=MAX_STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // _world(),
        save_strategy="steps",
        save_steps=SAVE_STEP,
        logging_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if _world() > 1:
        kwargs["ddp_backend"] = "gloo"
    fields = TrainingArguments.__dataclass_fields__
    if "train_sampling_strategy" in fields:  # transformers >= 5: no shuffling, same order for every world size
        kwargs["train_sampling_strategy"] = "sequential"
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _trainer(args, model=None):
    from transformers import Trainer

    return Trainer(
        model=model if model is not None else _model(), args=args, train_dataset=Tokens(GLOBAL_BATCH * MAX_STEPS)
    )


def _inner_optimizer(trainer) -> Any:
    opt = trainer.optimizer
    return getattr(opt, "optimizer", opt)


def _save_weights(trainer, path: Path) -> None:
    state = {
        k: v.detach().cpu().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()
    }
    if _rank() == 0:
        torch.save(state, path)


def run_ddp(out: Path) -> None:
    world = _world()
    first = _trainer(_args(str(out / f"world{world}_run")))
    if world == 1:
        _save_weights(first, out / "init.pt")
    first.train()
    optimizer_cls = type(_inner_optimizer(first)).__module__ + "." + type(_inner_optimizer(first)).__name__
    _save_weights(first, out / f"world{world}_final.pt")
    info: dict[str, Any] = {"optimizer": optimizer_cls, "world": world}
    if world > 1:
        # A fresh Trainer and model (other init: the checkpoint must restore everything) resumes at SAVE_STEP.
        torch.manual_seed(123)
        resumed = _trainer(_args(str(out / f"world{world}_resume")))
        resumed.train(resume_from_checkpoint=str(out / f"world{world}_run" / f"checkpoint-{SAVE_STEP}"))
        _save_weights(resumed, out / f"world{world}_resumed.pt")
        info["resumed_global_step"] = resumed.state.global_step
        info["checkpoint_files"] = sorted(os.listdir(out / f"world{world}_run" / f"checkpoint-{SAVE_STEP}"))
    if _rank() == 0:
        (out / f"ddp_world{world}.json").write_text(json.dumps(info, indent=2))


def _record_step_inputs(optimizer, seen: list) -> None:
    from torch.distributed.tensor import DTensor

    def hook(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                seen.append(
                    [
                        type(p).__name__,
                        str(getattr(p, "placements", "")),
                        type(p.grad).__name__,
                        str(getattr(p.grad, "placements", "")),
                        list(p.shape),
                        list(p.to_local().shape) if isinstance(p, DTensor) else list(p.shape),
                    ]
                )

    optimizer.register_step_pre_hook(hook)


def _force_fsdp_on_cpu() -> None:
    """Let accelerate take its FSDP path on CPU/gloo.

    accelerate (1.15) switches to ``DistributedType.FSDP`` only for accelerator devices
    (``AcceleratorState.__init__``); on CPU a Trainer with ``fsdp=True`` silently runs plain DDP instead. Setting the
    distributed type after the state's own init makes ``Accelerator.prepare`` run its real FSDP code
    (``fsdp2_prepare_model``, the optimizer param switch, FSDP clipping and checkpointing) on CPU, which is what
    these tests need to see. The FSDP code itself is device-agnostic; only this gate is not.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    AcceleratorState.__init__ = __init__


def _full_weights(trainer) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
        for k, v in trainer.model.state_dict().items()
    }


def run_fsdp2(out: Path) -> None:
    """FSDP2 through Trainer + accelerate, with a checkpoint (DCP inside accelerate) and a resume from it."""
    _force_fsdp_on_cpu()
    # SHARDED_STATE_DICT: model and optimizer go through DCP. (FULL_STATE_DICT fails on CPU inside the
    # safetensors save of the gathered model, before the optimizer is reached.)
    fsdp = dict(
        fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"}
    )
    trainer = _trainer(_args(str(out / "fsdp2_run"), **fsdp))
    if not trainer.is_fsdp_enabled or trainer.accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise RuntimeError("accelerate did not take its FSDP2 path; _force_fsdp_on_cpu no longer matches accelerate")
    trainer.create_optimizer()  # the Trainer builds it before accelerate shards the model (FSDP2); hook it first
    seen: list = []
    _record_step_inputs(_inner_optimizer(trainer), seen)
    trainer.train()
    final = _full_weights(trainer)
    info: dict[str, Any] = {
        "optimizer": type(_inner_optimizer(trainer)).__name__,
        "step_inputs": seen[: len(seen) // MAX_STEPS],
    }

    torch.manual_seed(123)
    resumed = _trainer(_args(str(out / "fsdp2_resume"), **fsdp))
    checkpoint = out / "fsdp2_run" / f"checkpoint-{SAVE_STEP}"
    info["checkpoint_files"] = sorted(os.listdir(checkpoint))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    info["resumed_global_step"] = resumed.state.global_step
    resumed_weights = _full_weights(resumed)
    if _rank() == 0:
        torch.save(final, out / "fsdp2_final.pt")
        torch.save(resumed_weights, out / "fsdp2_resumed.pt")
    (out / f"fsdp2_rank{_rank()}.json").write_text(json.dumps(info, indent=2))


def run_all(out: Path) -> None:
    """``ddp`` then ``fsdp2`` in one process: one interpreter start and one ``import transformers`` per rank."""
    run_ddp(out)
    if _world() > 1:
        from accelerate.state import AcceleratorState

        torch.distributed.barrier()  # every rank done with DDP before the state is reset

        AcceleratorState._reset_state(reset_partial_state=False)
        run_fsdp2(out)


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    _register()
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    {"ddp": run_ddp, "fsdp2": run_fsdp2, "all": run_all}[mode](out_dir)
    # Leave together and tear the process group down before the interpreter exits: a gloo group left to the
    # interpreter's shutdown can abort one rank ("terminate called without an active exception").
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
