"""``--optim fadam --deepspeed ds.json`` through the Hugging Face Trainer, ZeRO 1, 2 and 3 on 2 CPU processes.

Used by ``tests/test_deepspeed.py``; also runnable by hand::

    python tests/distributed/deepspeed_trainer.py single OUT                        # one process, no DeepSpeed
    torchrun --nproc_per_node 2 tests/distributed/deepspeed_trainer.py zero OUT 2   # ZeRO 2 (or: 1 2 3)

``single`` trains a tiny Llama for ``MAX_STEPS`` steps on a global batch of ``GLOBAL_BATCH`` and writes
``single_final.pt``. ``zero`` trains the same model under DeepSpeed ZeRO (``--deepspeed ds_zero{s}.json``, a file
written next to OUT; ``GLOBAL_BATCH / 2`` per process, the data split across the ranks), with a checkpoint at
``SAVE_STEP``, then resumes a fresh Trainer (other init) from
that checkpoint; rank 0 writes ``zero{s}_final.pt``, ``zero{s}_resumed.pt`` (full fp32 weights) and
``zero{s}.json`` (what ran). No ``allow_flat_shards`` is passed: FAdam maps the flat partitions itself.

Test-harness patch (CPU only): accelerate 1.15's ``PartialState`` keeps ``num_processes=1`` on CPU although
DeepSpeed made a 2-rank gloo group, and DeepSpeed then rejects the batch configuration ("train_batch_size is not
equal to micro_batch_per_gpu * gradient_acc_step * world_size"). :func:`_fix_cpu_world` copies the world from
``torch.distributed`` into that state and rebuilds the DeepSpeed config objects of the arguments. On GPUs
accelerate sets these itself.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import torch  # noqa: E402
from _trainer_common import GLOBAL_BATCH, MAX_STEPS, SAVE_STEP, Tokens, tiny_llama  # noqa: E402
from _trainer_common import rank as _rank  # noqa: E402
from _trainer_common import world as _world  # noqa: E402


def _model(seed: int = 0):
    return tiny_llama(seed)


def _ds_config(stage: int) -> dict[str, Any]:
    return {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 10**9,
    }


def _args(output_dir: str, stage: int | None):
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        optim="fadam",
        learning_rate=1e-2,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # DeepSpeed clips with (norm + 1e-6): keep clipping out of the comparison
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
        train_sampling_strategy="sequential",
    )
    if stage is not None:  # a ds.json file, as `--deepspeed ds.json` gives it
        path = Path(output_dir).parent / f"ds_zero{stage}.json"
        if _rank() == 0 and not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(_ds_config(stage)))
            tmp.replace(path)  # atomic: the other rank never reads half a file
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        while not path.exists():  # before the first Trainer, no process group exists yet to wait on
            time.sleep(0.05)
        kwargs["deepspeed"] = str(path)
    if _world() > 1:
        kwargs["ddp_backend"] = "gloo"
    args = TrainingArguments(**kwargs)
    if stage is not None:
        _fix_cpu_world(args)
    return args


def _fix_cpu_world(args) -> None:
    """See the module docstring: give accelerate's shared state the real world, rebuild the DeepSpeed config."""
    import torch.distributed as dist
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    state = PartialState._shared_state
    if dist.is_initialized() and state.get("num_processes") != dist.get_world_size():
        state["num_processes"] = dist.get_world_size()
        state["process_index"] = dist.get_rank()
        state["local_process_index"] = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(args.deepspeed)
    args.hf_deepspeed_config.trainer_config_process(args)
    args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.hf_deepspeed_config)


def _trainer(args, seed: int = 0):
    from transformers import Trainer

    return Trainer(model=_model(seed), args=args, train_dataset=Tokens(GLOBAL_BATCH * MAX_STEPS))


def _full_weights(trainer) -> dict[str, torch.Tensor]:
    """Full fp32 weights by name (collective under DeepSpeed: every rank calls it)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in model.named_parameters()}


def run_single(out: Path) -> None:
    trainer = _trainer(_args(str(out / "single_run"), None))
    init = _full_weights(trainer)
    trainer.train()
    torch.save({"init": init, "final": _full_weights(trainer)}, out / "single_final.pt")


def run_zero(out: Path, stage: int) -> None:
    from hf_fadam._flat import get_layout

    trainer = _trainer(_args(str(out / f"zero{stage}_run"), stage))
    trainer.train()
    ds_optimizer = trainer.model_wrapped.optimizer
    fadam = ds_optimizer.optimizer
    info: dict[str, Any] = {
        "deepspeed_optimizer": type(ds_optimizer).__name__,
        "client_optimizer": type(fadam).__name__,
        "zero_stage": trainer.model_wrapped.zero_optimization_stage(),
        "flat_partitions": len(fadam.state),
        "mapped": all(get_layout(t) is not None for t in fadam.state),
        "steps": sorted({float(x) for s in fadam.state.values() for x in s["step"].tolist()}),
    }
    final = _full_weights(trainer)
    checkpoint = out / f"zero{stage}_run" / f"checkpoint-{SAVE_STEP}"
    info["checkpoint_files"] = sorted(os.listdir(checkpoint))
    resumed = _trainer(_args(str(out / f"zero{stage}_resume"), stage), seed=123)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    info["resumed_global_step"] = resumed.state.global_step
    resumed_weights = _full_weights(resumed)
    if _rank() == 0:
        torch.save(final, out / f"zero{stage}_final.pt")
        torch.save(resumed_weights, out / f"zero{stage}_resumed.pt")
        (out / f"zero{stage}.json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    import hf_fadam

    hf_fadam.register()
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    if mode == "single":
        run_single(out_dir)
    else:
        for stage in [int(s) for s in sys.argv[3:]] or [1, 2, 3]:
            run_zero(out_dir, stage)
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=False)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Leave without the interpreter's teardown: about one run in 20 aborted there ("terminate called without an
    # active exception", a DeepSpeed/gloo thread) after every result had been written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
