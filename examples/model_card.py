# Copyright 2026 The hf_fadam authors. Licensed under the Apache License, Version 2.0.
"""Model cards for the FAdam example models.

The example scripts (`run_text_classification.py`, `run_speech_recognition_ctc.py`) call `build_model_card` after
training and write the result as the `README.md` of their output directory, which is what `--push_to_hub` uploads.
The card is rendered from the Jinja template `model_cards/template.md` with `huggingface_hub.ModelCard`, so its YAML
front matter (`model-index`, `base_model`, `datasets`, `tags`, ...) is the metadata the Hub parses.

This module only needs `huggingface_hub` (and `jinja2`); it neither imports transformers nor hf_fadam, so the scripts
pass in plain dictionaries. `validate_model_card` re-reads a written card offline and checks the metadata the Hub uses.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData


REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_PATH = REPO_ROOT / "model_cards" / "template.md"

FADAM_BIBTEX = """@article{hwang2024fadam,
  title   = {{FAdam}: Adam is a natural gradient optimizer using diagonal empirical {F}isher information},
  author  = {Hwang, Dongseong},
  journal = {arXiv preprint arXiv:2405.12807},
  year    = {2024},
  url     = {https://arxiv.org/abs/2405.12807}
}"""

# Packages whose versions every card lists, in this order; missing ones are skipped.
FRAMEWORKS = ("hf_fadam", "transformers", "torch", "datasets", "tokenizers", "accelerate", "jiwer", "huggingface_hub")

# The FAdam group keys a card reports, in this order, with the name used in the card.
FADAM_KEYS = {
    "lr": "learning rate (peak)",
    "betas": "betas (β1, β2)",
    "eps": "eps (ε)",
    "weight_decay": "weight decay (λ)",
    "clip": "clip (c)",
    "p": "p (Fisher exponent)",
}


@dataclass
class Metric:
    """One measured number, rendered into the card's `model-index` and its results table.

    `type` is the Hub metric id (`accuracy`, `f1`, `wer`, `cer`, ...), `name` the human label. A metric measured on
    another dataset than the card's (e.g. a second test set) names it in `dataset_id` / `dataset_name` /
    `dataset_split` / `dataset_config`; unset fields fall back to the card's.
    """

    type: str
    value: float
    name: str | None = None
    dataset_id: str | None = None
    dataset_name: str | None = None
    dataset_split: str | None = None
    dataset_config: str | None = None


@dataclass
class CardInfo:
    """Everything a card says about one trained model. The scripts fill it from the run.

    Parameters:
        model_name (`str`): name of the model (the last part of the Hub repo id).
        task_type (`str`): Hub task id, e.g. `text-classification`, `automatic-speech-recognition`.
        task_name (`str`): human name of the task.
        dataset_id (`str`): Hub dataset id, or the name of the local dataset (see `dataset_is_local`). A local name
            stays in the card's prose and `model-index`, but not in the `datasets:` metadata (the Hub would link it
            to a dataset page that does not exist).
        dataset_name (`str`): human name of the dataset.
        dataset_split (`str`): split the metrics were measured on.
        metrics (`list[Metric]`): the evaluation results.
        optimizer (`dict`): optimizer class name under `"class"` and its defaults (`lr`, `betas`, `eps`, ...).
        training_hyperparameters (`dict`): the `TrainingArguments` values worth reporting.
        base_model (`str`, *optional*): Hub id of the fine-tuned checkpoint, `None` when trained from a config.
        dataset_config (`str`, *optional*): dataset configuration name.
        dataset_is_local (`bool`): whether the dataset ships with the example instead of living on the Hub.
        language (`str`), license (`str`), pipeline_tag (`str`), tags (`list[str]`): Hub metadata.
        summary, usage, data_description, limitations (`str`): markdown paragraphs of the card body.
        command (`str`): the command line that produced the model.
        log_history (`list[dict]`): `trainer.state.log_history`; its evaluation rows become a table.
        train_runtime_s (`float`, *optional*): wall time of training, in seconds.
        hardware (`str`, *optional*): where it ran; defaults to this machine's CPU/OS description.
        frameworks (`tuple[str, ...]`): distributions whose versions the card lists.
    """

    model_name: str
    task_type: str
    task_name: str
    dataset_id: str
    dataset_name: str
    dataset_split: str
    metrics: list[Metric]
    optimizer: dict[str, Any]
    training_hyperparameters: dict[str, Any]
    base_model: str | None = None
    dataset_config: str | None = None
    dataset_is_local: bool = False
    language: str = "en"
    license: str = "apache-2.0"
    pipeline_tag: str | None = None
    tags: list[str] = field(default_factory=list)
    summary: str = ""
    usage: str = ""
    data_description: str = ""
    limitations: str = ""
    command: str = ""
    log_history: list[dict[str, Any]] = field(default_factory=list)
    train_runtime_s: float | None = None
    hardware: str | None = None
    frameworks: tuple[str, ...] = FRAMEWORKS


def framework_versions(names: Iterable[str] = FRAMEWORKS) -> dict[str, str]:
    """Installed versions of `names` (distribution names), skipping those that are not installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def source_revision(repo: str | Path = REPO_ROOT) -> str | None:
    """The git commit of the hf_fadam checkout at `repo` (12 hex digits), with `+dirty` when `hf_fadam/` or
    `examples/` have uncommitted changes; `None` outside a git checkout (e.g. hf_fadam installed from a wheel)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True, timeout=30).stdout

    try:
        commit = git("rev-parse", "--short=12", "HEAD").strip()
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "hf_fadam", "examples").strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def describe_machine() -> str:
    """A one-line description of this machine, e.g. `CPU x86_64, 2 cores, Linux`."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU {platform.machine()}, {cores} cores, {platform.system()}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


def _eval_rows(log_history: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Turn the evaluation entries of `trainer.state.log_history` into (header, rows) of a markdown table."""
    evals, seen_steps = [], set()
    for row in log_history:
        # The final `trainer.evaluate()` repeats the last epoch's evaluation at the same step: keep one.
        if any(k.startswith("eval_") for k in row) and row.get("step") not in seen_steps:
            evals.append(row)
            seen_steps.add(row.get("step"))
    if not evals:
        return [], []
    skip = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}
    keys = [k for k in evals[-1] if k.startswith("eval_") and k not in skip]
    # Match each evaluation with the most recent training loss logged before it.
    train_loss, rows = {}, []
    last_loss = None
    for row in log_history:
        if "loss" in row:
            last_loss = row["loss"]
        if any(k.startswith("eval_") for k in row):
            train_loss[id(row)] = last_loss
    for row in evals:
        loss = train_loss[id(row)]
        cells = [_fmt(row.get("epoch", "")), str(row.get("step", "")), "—" if loss is None else _fmt(float(loss))]
        cells += [_fmt(row.get(k, "")) for k in keys]
        rows.append(cells)
    header = ["epoch", "step", "training loss"] + [k.removeprefix("eval_").replace("_", " ") for k in keys]
    return header, rows


def build_model_card(info: CardInfo, template_path: str | Path = TEMPLATE_PATH) -> ModelCard:
    """Render the card for `info` from the Jinja template at `template_path`."""
    if not any(m.type for m in info.metrics):
        raise ValueError(f"CardInfo.metrics must hold at least one metric, got {info.metrics!r}")
    eval_results = [
        EvalResult(
            task_type=info.task_type,
            task_name=info.task_name,
            dataset_type=metric.dataset_id or info.dataset_id,
            dataset_name=metric.dataset_name or info.dataset_name,
            dataset_config=metric.dataset_config or info.dataset_config,
            dataset_split=metric.dataset_split or info.dataset_split,
            metric_type=metric.type,
            metric_name=metric.name or metric.type,
            metric_value=round(float(metric.value), 4),
        )
        for metric in info.metrics
    ]
    tags = ["fadam", "hf_fadam", "generated_from_trainer"] + [t for t in info.tags if t not in ("fadam", "hf_fadam")]
    card_data = ModelCardData(
        model_name=info.model_name,
        base_model=info.base_model,
        datasets=None if info.dataset_is_local else [info.dataset_id],
        language=info.language,
        license=info.license,
        library_name="transformers",
        pipeline_tag=info.pipeline_tag,
        metrics=sorted({m.type for m in info.metrics}),
        tags=list(dict.fromkeys(tags)),
        eval_results=eval_results,
    )
    optimizer_rows = [(label, _fmt(info.optimizer[key])) for key, label in FADAM_KEYS.items() if key in info.optimizer]
    header, rows = _eval_rows(info.log_history)
    versions = framework_versions(info.frameworks)
    if "hf_fadam" in versions and (revision := source_revision()) is not None:
        versions["hf_fadam"] += f" (git {revision})"
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        info=info,
        results=[(m.name or m.type, _fmt(float(m.value))) for m in info.metrics],
        optimizer_class=info.optimizer.get("class", "FAdam"),
        optimizer_rows=optimizer_rows,
        hyperparameter_rows=[(k, _fmt(v)) for k, v in info.training_hyperparameters.items()],
        eval_header=header,
        eval_rows=rows,
        versions=versions,
        hardware=info.hardware or describe_machine(),
        train_runtime=None if info.train_runtime_s is None else f"{info.train_runtime_s:.0f} s",
        bibtex=FADAM_BIBTEX,
    )


def save_model_card(info: CardInfo, output_dir: str | Path, template_path: str | Path = TEMPLATE_PATH) -> Path:
    """Write the card as `output_dir/README.md` (the file the Hub shows) and return its path."""
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    build_model_card(info, template_path).save(path)
    validate_model_card(path)
    return path


def validate_model_card(path: str | Path) -> ModelCardData:
    """Parse the card at `path` as the Hub does and check the metadata these examples promise.

    Offline: `huggingface_hub` parses the YAML and the `model-index` (it raises on a malformed one); this function
    then checks that the fields below are present. Returns the parsed `ModelCardData`.
    """
    card = ModelCard.load(path)
    data = card.data
    problems = []
    if "fadam" not in (data.tags or []):
        problems.append(f"tags {data.tags!r} lack 'fadam'")
    if not data.eval_results:
        problems.append("no model-index / eval_results")
    for result in data.eval_results or []:
        if not result.dataset_type:
            problems.append(f"metric {result.metric_type} names no dataset")
    if data.library_name != "transformers":
        problems.append(f"library_name is {data.library_name!r}")
    for result in data.eval_results or []:
        if not isinstance(result.metric_value, (int, float)):
            problems.append(f"metric {result.metric_type} has non-numeric value {result.metric_value!r}")
    if problems:
        raise ValueError(f"Model card {path} is invalid: " + "; ".join(problems))
    return data
