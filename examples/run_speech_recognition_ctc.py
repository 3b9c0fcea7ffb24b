#!/usr/bin/env python
# Copyright 2026 The hf_fadam authors. Licensed under the Apache License, Version 2.0.
# /// script
# dependencies = ["hf-fadam[examples]", "torchcodec"]
# ///
"""Train a wav2vec2 CTC speech recogniser with the FAdam optimizer, and report WER and CER.

With no arguments the script runs fully offline: it synthesises an English spoken-command dataset with espeak-ng
(`examples/make_speech_dataset.py`: 800 training and 100 test utterances, 30 voice/variant pairs, random speeds
and pitches, test sentences never seen in training) into an `audiofolder`, builds a character vocabulary from the
transcripts, trains a small Wav2Vec2-BERT model (the wav2vec2 family's Conformer on log-mel features, about 0.7 M
parameters) *from a config* (no pretrained speech checkpoint can be had offline), and writes the model, its
processor and a model card with the measured WER/CER to the output directory:

    # espeak-ng + sox make the speech; torchcodec 0.13 needs the 7 FFmpeg 5.1 libraries (the line .ci/run uses):
    sudo apt-get install -y -qq --no-install-recommends espeak-ng sox libavutil57 libavcodec59 libavformat59 libavdevice59 libavfilter8 libswscale6 libswresample4
    python examples/run_speech_recognition_ctc.py

A tiny run (what the tests do, well under a minute):

    python examples/run_speech_recognition_ctc.py --output_dir /tmp/fadam-ctc-tiny --data_dir /tmp/espeak-tiny \
        --num_synthetic_train 16 --num_synthetic_test 8 --max_steps 2 --per_device_train_batch_size 8

Fine-tune a pretrained Hub checkpoint on a Hub dataset (needs network), the classic wav2vec2 recipe:

    python examples/run_speech_recognition_ctc.py \
        --model_name_or_path facebook/wav2vec2-base \
        --dataset_name hf-internal-testing/librispeech_asr_dummy --dataset_config_name clean \
        --train_split_name validation --eval_split_name validation \
        --output_dir outputs/fadam-wav2vec2-base-librispeech-dummy \
        --learning_rate 1e-4 --warmup_steps 50 --max_steps 500 --per_device_train_batch_size 8 --mask_time_prob 0.05

Push the result to the Hub (model, processor and the FAdam model card), the standard way:

    huggingface-cli login
    python examples/run_speech_recognition_ctc.py --push_to_hub --hub_model_id <user>/fadam-wav2vec2-ctc-espeak

Every `TrainingArguments` flag is accepted; `--optim fadam --optim_args "clip=1.0,p=0.5"` is the default.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from datasets import Audio, load_dataset
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModelForCTC,
    AutoTokenizer,
    EvalPrediction,
    HfArgumentParser,
    SeamlessM4TFeatureExtractor,
    Trainer,
    TrainingArguments,
    Wav2Vec2BertConfig,
    Wav2Vec2BertForCTC,
    Wav2Vec2BertProcessor,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2Processor,
    set_seed,
)

import hf_fadam


sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_push import skip_push_if_unreachable  # noqa: E402
from make_speech_dataset import make_dataset  # noqa: E402
from metrics import load_metric  # noqa: E402
from model_card import CardInfo, Metric, save_model_card  # noqa: E402


logger = logging.getLogger(__name__)

SYNTHETIC_DATASET_ID = "hf_fadam-espeak-commands"

# Defaults of this example that differ from `TrainingArguments`; any of them can be overridden on the command line.
EXAMPLE_DEFAULTS = {
    "output_dir": "outputs/fadam-wav2vec2-ctc-espeak-commands",
    "optim": "fadam",
    "optim_args": "clip=1.0,p=0.5",
    "learning_rate": 3e-3,
    "weight_decay": 0.1,
    "warmup_steps": 50,
    "num_train_epochs": 10.0,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 32,
    "length_column_name": "input_length",
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "logging_steps": 25,
    "do_train": True,
    "do_eval": True,
    "seed": 42,
}
# Batch utterances of similar length (less padding): the flag was renamed in transformers 5.
if "train_sampling_strategy" in {f.name for f in fields(TrainingArguments)}:
    EXAMPLE_DEFAULTS["train_sampling_strategy"] = "group_by_length"
else:
    EXAMPLE_DEFAULTS["group_by_length"] = True

# A small Wav2Vec2-BERT (about 0.7 M parameters) for training from scratch on CPU: 80-bin log-mel features stacked in
# pairs (20 ms frames), a 3-layer, 96-wide Conformer. Log-mel input learns faster from scratch than the raw-waveform
# convolutions of the original wav2vec2, which pay off with pretraining. `--config_overrides` edits it.
SMALL_WAV2VEC2_BERT = {
    "hidden_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 384,
    "feature_projection_input_dim": 160,
    "conv_depthwise_kernel_size": 15,
    "position_embeddings_type": "relative_key",
    "left_max_position_embeddings": 64,
    "right_max_position_embeddings": 8,
    "add_adapter": False,
}


@dataclass
class ModelArguments:
    """Which model to train: a Hub checkpoint, or (the default) a new small Wav2Vec2-BERT built from a config."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained checkpoint (e.g. facebook/wav2vec2-base). Default: a new small Wav2Vec2-BERT."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Edits to the model config, e.g. 'num_hidden_layers=6,hidden_size=192'."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "An existing CTC tokenizer. Default: a character vocabulary built from the transcripts."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store files downloaded from the Hub."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the checkpoint."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models and datasets."})
    freeze_feature_encoder: bool | None = field(
        default=None,
        metadata={"help": "Freeze the convolutional feature encoder. Default: only when fine-tuning a checkpoint."},
    )
    mask_time_prob: float = field(
        default=0.0,
        metadata={
            "help": "SpecAugment: share of time frames masked (off for the small default; try 0.05 when fine-tuning)."
        },
    )
    layerdrop: float = field(default=0.0, metadata={"help": "Probability of dropping a Transformer layer."})
    hidden_dropout: float = field(default=0.0, metadata={"help": "Dropout in the Transformer."})
    ctc_loss_reduction: str = field(default="mean", metadata={"help": "'mean' or 'sum' over the batch."})


@dataclass
class DataTrainingArguments:
    """Which speech to train and evaluate on. Without `--dataset_name`, espeak-ng speech in `--data_dir`."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id (audio + transcript)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "An audiofolder (train/ and test/ with metadata.csv). Without --dataset_name it is synthesised "
            "here if missing; default ~/.cache/hf_fadam/espeak-commands."
        },
    )
    num_synthetic_train: int = field(default=800, metadata={"help": "Utterances to synthesise for training."})
    num_synthetic_test: int = field(default=100, metadata={"help": "Utterances to synthesise for testing."})
    train_split_name: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split_name: str = field(default="test", metadata={"help": "Split to evaluate on."})
    audio_column_name: str = field(default="audio", metadata={"help": "Column holding the audio."})
    text_column_name: str = field(default="text", metadata={"help": "Column holding the transcript."})
    chars_to_ignore: list[str] = field(
        default_factory=lambda: list(',?.!-;:"“”%‘’�'),
        metadata={"help": "Characters removed from transcripts before training and scoring."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N eval examples."})
    max_duration_in_seconds: float = field(default=20.0, metadata={"help": "Drop longer training utterances."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for preprocessing."})
    unk_token: str = field(default="[UNK]", metadata={"help": "Unknown token of a new vocabulary."})
    pad_token: str = field(default="[PAD]", metadata={"help": "Padding (CTC blank) token of a new vocabulary."})
    word_delimiter_token: str = field(default="|", metadata={"help": "Word delimiter token of a new vocabulary."})


@dataclass
class DataCollatorCTCWithPadding:
    """Pads audio features with the feature extractor and labels with the tokenizer; padded labels become -100."""

    processor: Wav2Vec2Processor | Wav2Vec2BertProcessor

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_name = self.processor.feature_extractor.model_input_names[0]  # input_values or input_features
        batch = self.processor.feature_extractor.pad(
            [{input_name: f[input_name]} for f in features], padding=True, return_tensors="pt"
        )
        labels = self.processor.tokenizer.pad(
            [{"input_ids": f["labels"]} for f in features], padding=True, return_tensors="pt"
        )
        batch["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"].ne(1), -100)
        return batch


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataTrainingArguments, TrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_dict({**EXAMPLE_DEFAULTS, **json.loads(Path(argv[0]).read_text())})
    parser.set_defaults(**EXAMPLE_DEFAULTS)
    return parser.parse_args_into_dataclasses(args=argv)


def default_data_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "hf_fadam" / "espeak-commands"


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments) -> datasets.DatasetDict:
    if data_args.dataset_name is None:
        data_dir = Path(data_args.data_dir) if data_args.data_dir else default_data_dir()
        logger.info("Synthesising (or reusing) espeak-ng speech in %s", data_dir)
        make_dataset(data_dir, data_args.num_synthetic_train, data_args.num_synthetic_test)
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


def normalise_transcript(text: str, chars_to_ignore: list[str]) -> str:
    """Lower-case, drop the ignored characters and collapse whitespace: the form the model learns and is scored on."""
    if chars_to_ignore:
        text = re.sub("[" + re.escape("".join(chars_to_ignore)) + "]", "", text)
    return " ".join(text.lower().split())


def build_vocabulary(texts: list[str], data_args: DataTrainingArguments) -> dict[str, int]:
    """Character vocabulary of `texts`, with the word delimiter for spaces and the unknown and padding tokens."""
    chars = sorted(set("".join(texts)) - {" "})
    vocab = {char: i for i, char in enumerate(chars)}
    vocab[data_args.word_delimiter_token] = len(vocab)
    vocab[data_args.unk_token] = len(vocab)
    vocab[data_args.pad_token] = len(vocab)
    return vocab


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
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args, model_args)
    if data_args.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(len(raw["train"]), data_args.max_train_samples)))
    if data_args.max_eval_samples is not None:
        raw["eval"] = raw["eval"].select(range(min(len(raw["eval"]), data_args.max_eval_samples)))
    raw = raw.map(
        lambda batch: {
            "target_text": [
                normalise_transcript(t, data_args.chars_to_ignore) for t in batch[data_args.text_column_name]
            ]
        },
        batched=True,
        desc="Normalising transcripts",
    )

    # Processor: the checkpoint's, or a new character vocabulary and a 16 kHz feature extractor.
    output_dir = Path(training_args.output_dir).resolve()
    if model_args.tokenizer_name_or_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path, token=model_args.token)
    else:
        vocab = build_vocabulary(list(raw["train"]["target_text"]), data_args)  # unseen characters map to unk
        output_dir.mkdir(parents=True, exist_ok=True)
        vocab_file = output_dir / "vocab.json"
        with training_args.main_process_first(desc="writing the vocabulary"):
            vocab_file.write_text(json.dumps(vocab, ensure_ascii=False))
        tokenizer = Wav2Vec2CTCTokenizer(
            str(vocab_file),
            unk_token=data_args.unk_token,
            pad_token=data_args.pad_token,
            word_delimiter_token=data_args.word_delimiter_token,
        )
    if model_args.model_name_or_path is not None:
        feature_extractor = AutoFeatureExtractor.from_pretrained(
            model_args.model_name_or_path, cache_dir=model_args.cache_dir, token=model_args.token
        )
    else:
        feature_extractor = SeamlessM4TFeatureExtractor(
            feature_size=80, num_mel_bins=80, sampling_rate=16_000, stride=2, padding_value=1.0
        )
    processor_class = (
        Wav2Vec2BertProcessor if isinstance(feature_extractor, SeamlessM4TFeatureExtractor) else Wav2Vec2Processor
    )
    processor = processor_class(feature_extractor=feature_extractor, tokenizer=tokenizer)

    # Model: new from the small config, or the checkpoint with a new CTC head sized for this vocabulary.
    ctc_settings = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "ctc_loss_reduction": model_args.ctc_loss_reduction,
        "ctc_zero_infinity": True,
        "mask_time_prob": model_args.mask_time_prob,
        "layerdrop": model_args.layerdrop,
        "hidden_dropout": model_args.hidden_dropout,
    }
    if model_args.model_name_or_path is None:
        config = Wav2Vec2BertConfig(**SMALL_WAV2VEC2_BERT, **ctc_settings)
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        model = Wav2Vec2BertForCTC(config)
    else:
        config = AutoConfig.from_pretrained(
            model_args.model_name_or_path,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
        )
        config.update(ctc_settings)
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        model = AutoModelForCTC.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            ignore_mismatched_sizes=True,  # the CTC head always has this vocabulary's size
        )
    freeze = model_args.freeze_feature_encoder
    if freeze if freeze is not None else model_args.model_name_or_path is not None:
        if not hasattr(model, "freeze_feature_encoder"):
            raise ValueError(f"--freeze_feature_encoder: {type(model).__name__} has no convolutional feature encoder")
        model.freeze_feature_encoder()
    logger.info("Model: %s with %.2f M parameters", type(model).__name__, model.num_parameters() / 1e6)

    sampling_rate = feature_extractor.sampling_rate
    raw = raw.cast_column(data_args.audio_column_name, Audio(sampling_rate=sampling_rate))

    input_name = feature_extractor.model_input_names[0]

    def prepare(example: dict) -> dict:
        audio = example[data_args.audio_column_name]
        values = feature_extractor(audio["array"], sampling_rate=sampling_rate)[input_name][0]
        return {
            input_name: values,
            "input_length": len(audio["array"]),  # in samples, whatever the features
            "labels": tokenizer(example["target_text"]).input_ids,
        }

    with training_args.main_process_first(desc="dataset map pre-processing"):
        vectorised = raw.map(
            prepare,
            remove_columns=raw["train"].column_names,
            num_proc=data_args.preprocessing_num_workers,
            desc="Extracting features",
        )
        max_length = int(data_args.max_duration_in_seconds * sampling_rate)
        vectorised["train"] = vectorised["train"].filter(
            lambda length: length <= max_length, input_columns=["input_length"], desc="Dropping long utterances"
        )

    wer_metric, cer_metric = load_metric("wer"), load_metric("cer")  # evaluate modules, from examples/metrics offline

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        predicted_ids = np.argmax(prediction.predictions, axis=-1)
        label_ids = np.where(prediction.label_ids == -100, tokenizer.pad_token_id, prediction.label_ids)
        hypotheses = processor.batch_decode(predicted_ids)
        references = processor.batch_decode(label_ids, group_tokens=False)  # labels are not CTC-collapsed
        # The Hub's wer/cer modules reject empty references; score only pairs whose reference has words.
        pairs = [(r, h) for r, h in zip(references, hypotheses) if r.strip()]
        references, hypotheses = [r for r, _ in pairs], [h for _, h in pairs]
        return {
            "wer": wer_metric.compute(predictions=hypotheses, references=references),
            "cer": cer_metric.compute(predictions=hypotheses, references=references),
        }

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=vectorised["train"] if training_args.do_train else None,
        eval_dataset=vectorised["eval"] if training_args.do_eval else None,
        processing_class=processor,
        data_collator=DataCollatorCTCWithPadding(processor),
        compute_metrics=compute_metrics,
    )
    if training_args.push_to_hub:
        # Each push (from save_model and at the end) would write the Trainer's generic card over README.md; this
        # script writes the FAdam card itself, after evaluation, and the final push uploads it.
        trainer.create_model_card = lambda **kwargs: None

    metrics: dict[str, float] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        processor.save_pretrained(training_args.output_dir)
        metrics.update(train_result.metrics)
        metrics["train_samples"] = len(vectorised["train"])
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = len(vectorised["eval"])
        metrics.update(eval_metrics)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        examples = trainer.predict(vectorised["eval"].select(range(min(3, len(vectorised["eval"])))))
        for reference, hypothesis in zip(
            processor.batch_decode(
                np.where(examples.label_ids == -100, tokenizer.pad_token_id, examples.label_ids), group_tokens=False
            ),
            processor.batch_decode(np.argmax(examples.predictions, axis=-1)),
        ):
            print(f"reference: {reference!r}\nhypothesis: {hypothesis!r}")

    if training_args.do_train and trainer.is_world_process_zero():
        write_card_and_push(trainer, model, model_args, data_args, training_args, metrics, argv)
    return metrics


def write_card_and_push(trainer, model, model_args, data_args, training_args, metrics, argv) -> None:
    output_dir = Path(training_args.output_dir).resolve()
    synthetic = data_args.dataset_name is None
    dataset_id = SYNTHETIC_DATASET_ID if synthetic else data_args.dataset_name
    card_metrics = [Metric(k, metrics[f"eval_{k}"], k.upper()) for k in ("wer", "cer") if f"eval_{k}" in metrics]
    base = model_args.model_name_or_path
    model_id = training_args.hub_model_id or training_args.output_dir
    card = CardInfo(
        model_name=(training_args.hub_model_id or output_dir.name).split("/")[-1],
        task_type="automatic-speech-recognition",
        task_name="Automatic Speech Recognition",
        dataset_id=dataset_id,
        dataset_name="espeak-ng spoken commands (synthetic)" if synthetic else dataset_id,
        dataset_config=data_args.dataset_config_name,
        dataset_split=data_args.eval_split_name,
        dataset_is_local=synthetic,
        metrics=card_metrics,
        base_model=base if base is not None and not os.path.isdir(base) else None,
        pipeline_tag="automatic-speech-recognition",
        tags=["automatic-speech-recognition", "ctc", model.config.model_type],
        summary=(
            f"A {type(model).__name__} CTC speech recogniser ({model.num_parameters() / 1e6:.2f} M parameters) "
            + (f"fine-tuned from `{base}`" if base else "trained from scratch (built from a config)")
            + f" on {dataset_id}, with a {len(trainer.processing_class.tokenizer)}-token character vocabulary."
        ),
        usage=(
            "import soundfile\nfrom transformers import pipeline\n\n"
            f'asr = pipeline("automatic-speech-recognition", model="{model_id}")\n'
            'audio, rate = soundfile.read("command.wav", dtype="float32")  # 16 kHz mono\n'
            'print(asr({"raw": audio, "sampling_rate": rate}))'
        ),
        data_description=SYNTHETIC_DATA_DESCRIPTION.format(
            train=metrics.get("train_samples", "?"), test=metrics.get("eval_samples", "?")
        )
        if synthetic
        else f"`{dataset_id}` (train split `{data_args.train_split_name}`, eval split `{data_args.eval_split_name}`).",
        limitations=LIMITATIONS if synthetic else "Evaluated only on the split named above.",
        optimizer=optimizer_summary(trainer, training_args),
        training_hyperparameters={
            "learning_rate": training_args.learning_rate,
            "lr_scheduler_type": str(training_args.lr_scheduler_type.value),
            "warmup_steps": training_args.warmup_steps,
            "num_train_epochs": training_args.num_train_epochs,
            "max_steps": trainer.state.max_steps,
            "train_batch_size": training_args.per_device_train_batch_size,
            "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
            "train_sampling_strategy": getattr(training_args, "train_sampling_strategy", "group_by_length"),
            "mask_time_prob": model_args.mask_time_prob,
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
        trainer.push_to_hub(commit_message="FAdam CTC model: model, processor and model card")
        print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}")


SYNTHETIC_DATA_DESCRIPTION = (
    "Synthetic English speech made offline by `examples/make_speech_dataset.py` (hf_fadam repository, CC0-1.0): "
    "spoken commands from a small grammar (smart-home commands, timers, weather questions, calls, reminders, digit "
    "strings), each spoken by one of 30 espeak-ng voice/variant pairs (five English accents) at 130–190 words per "
    "minute and pitch 30–70, 16 kHz mono. {train} utterances for training and {test} for evaluation; no test "
    "sentence occurs in the training split."
)

LIMITATIONS = (
    "Trained only on synthetic espeak-ng speech with a closed vocabulary of a few dozen words: it demonstrates and "
    "tests the FAdam CTC recipe and will not transcribe natural human speech. For a real recogniser, fine-tune a "
    "pretrained checkpoint such as `facebook/wav2vec2-base` on real recordings (see the script's docstring)."
)


if __name__ == "__main__":
    main()
