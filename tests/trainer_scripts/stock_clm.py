"""A stock-style causal-LM training script, shaped like transformers' examples/pytorch/language-modeling/run_clm.py.

It never imports hf_fadam: ``--optim fadam`` must reach it through the start-up hook or ``python -m hf_fadam.run``.
The model is a tiny GPT-2 built from a config and the data is made here, so it runs offline on CPU in seconds::

    python tests/trainer_scripts/stock_clm.py --output_dir /tmp/out --optim fadam --optim_args "clip=1.0,p=0.5" \
        --lr_scheduler_type cosine --max_steps 6 --report_file /tmp/out/report.json
    python tests/trainer_scripts/stock_clm.py config.json      # or config.yaml, as the examples accept

After training it writes the model, the model card (README.md) and, with ``--report_file``, a JSON report that the
tests read: the optimizer class the Trainer built, the log history and the lr of each param group at each step.
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)


logger = logging.getLogger(__name__)


@dataclass
class DataArguments:
    vocab_size: int = field(default=32, metadata={"help": "Vocabulary of the synthetic data and the model."})
    block_size: int = field(default=16, metadata={"help": "Sequence length."})
    num_train_samples: int = field(default=64, metadata={"help": "Number of synthetic training sequences."})
    num_eval_samples: int = field(default=16, metadata={"help": "Number of synthetic evaluation sequences."})
    report_file: str | None = field(default=None, metadata={"help": "Write a JSON report of the run here."})


class TokenDataset(torch.utils.data.Dataset):
    """Sequences that count up modulo the vocabulary from a random start: easy to learn, so the loss falls fast."""

    def __init__(self, n: int, block_size: int, vocab_size: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab_size, (n, 1), generator=gen)
        self.data = (starts + torch.arange(block_size)) % vocab_size

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


class LrRecorder(TrainerCallback):
    """The lr of each param group of the optimizer the Trainer built, as the optimizer's step sees it."""

    def __init__(self):
        self.lrs = []
        self.optimizer_class = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)
        self.optimizer_class = f"{type(inner).__module__}.{type(inner).__qualname__}"
        self.lrs.append([group["lr"] for group in inner.param_groups])


def tiny_gpt2(vocab_size: int = 32, block_size: int = 16) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 with 32-wide embeddings and no dropout (resumed runs must match uninterrupted ones)."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=block_size,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def main():
    parser = HfArgumentParser((DataArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    elif len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        data_args, training_args = parser.parse_yaml_file(yaml_file=os.path.abspath(sys.argv[1]))
    else:
        data_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(level=logging.WARNING)

    set_seed(training_args.seed)
    model = tiny_gpt2(data_args.vocab_size, data_args.block_size)
    train_dataset = TokenDataset(data_args.num_train_samples, data_args.block_size, data_args.vocab_size, seed=0)
    eval_dataset = TokenDataset(data_args.num_eval_samples, data_args.block_size, data_args.vocab_size, seed=1)

    recorder = LrRecorder()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if training_args.eval_strategy != "no" else None,
        callbacks=[recorder],
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_state()
    trainer.create_model_card(tasks="text-generation", model_name="tiny-gpt2-synthetic")

    if data_args.report_file:
        report = {
            "optimizer_class": recorder.optimizer_class,
            "optim": str(getattr(training_args.optim, "value", training_args.optim)),
            "lrs": recorder.lrs,
            "log_history": trainer.state.log_history,
            "global_step": trainer.state.global_step,
            "world_size": training_args.world_size,
            "param_groups": [
                {k: v for k, v in group.items() if k != "params" and isinstance(v, (int, float, str, bool, tuple))}
                for group in trainer.optimizer.param_groups
            ],
        }
        with open(data_args.report_file, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
