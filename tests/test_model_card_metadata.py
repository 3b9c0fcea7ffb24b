"""Model-card metadata the Hub can use: no local dataset names under `datasets:`, and the versions behind the numbers.

A local dataset name (`hf_fadam-example-reviews`, made or shipped by the examples) in the `datasets:` front matter
becomes a link to a Hub dataset page that does not exist; it stays in the prose and the `model-index`. A Hub dataset id
is kept. Every card, rendered or committed, says which versions its numbers come from.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest


pytest.importorskip("huggingface_hub")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import model_card  # noqa: E402


CARDS = sorted(p for p in (REPO / "model_cards").glob("*.md") if p.name != "template.md")
LOCAL_DATASET = re.compile(r"^hf_fadam-")  # the examples' local datasets are all named hf_fadam-...


def card_info(**overrides) -> model_card.CardInfo:
    """What run_text_classification.py writes for its embedded default (local reviews data)."""
    info = model_card.CardInfo(
        model_name="fadam-minilm-reviews-sentiment",
        task_type="text-classification",
        task_name="Text Classification",
        dataset_id="hf_fadam-example-reviews",
        dataset_name="hf_fadam example reviews",
        dataset_split="test",
        dataset_is_local=True,
        metrics=[model_card.Metric("accuracy", 0.9, "Accuracy")],
        optimizer={"class": "hf_fadam.FAdam", "lr": 1e-4},
        training_hyperparameters={"learning_rate": 1e-4},
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        summary="Fine-tuned on hf_fadam-example-reviews.",
    )
    for key, value in overrides.items():
        setattr(info, key, value)
    return info


def front_matter(text: str) -> str:
    return text.split("---\n")[1]


def test_embedded_default_card_has_no_unlinkable_datasets_entry(tmp_path):
    path = model_card.save_model_card(card_info(), tmp_path)  # validates too
    text = path.read_text()
    data = model_card.validate_model_card(path)
    assert data.datasets is None and "datasets:" not in front_matter(text)
    # The local name stays in the prose and in the model-index (which needs a dataset type).
    assert "Fine-tuned on hf_fadam-example-reviews." in text
    assert [r.dataset_type for r in data.eval_results] == ["hf_fadam-example-reviews"]


def test_hub_dataset_id_is_kept(tmp_path):
    path = model_card.save_model_card(card_info(dataset_id="stanfordnlp/imdb", dataset_is_local=False), tmp_path)
    assert model_card.validate_model_card(path).datasets == ["stanfordnlp/imdb"]
    assert "datasets:\n- stanfordnlp/imdb\n" in front_matter(path.read_text())


def test_rendered_card_lists_versions_with_the_source_revision(tmp_path, monkeypatch):
    monkeypatch.setattr(model_card, "source_revision", lambda: "0123456789ab+dirty")
    text = model_card.save_model_card(card_info(), tmp_path).read_text()
    versions = text.split("## Framework versions")[1].split("## Citation")[0]
    assert "The results above were measured with these versions" in versions
    for name in ("transformers", "torch", "huggingface_hub"):
        assert re.search(rf"^- {name} \S+$", versions, re.M), name
    if "- hf_fadam " in versions:  # installed (editable or not) next to the examples
        assert re.search(r"^- hf_fadam \S+ \(git 0123456789ab\+dirty\)$", versions, re.M)


def test_source_revision_is_a_commit_or_none(tmp_path):
    revision = model_card.source_revision()
    assert revision is None or re.fullmatch(r"[0-9a-f]{12}(\+dirty)?", revision)
    assert model_card.source_revision(tmp_path) is None  # not a git checkout


@pytest.mark.parametrize("card", CARDS, ids=lambda p: p.stem)
def test_committed_card_has_no_local_dataset_in_metadata(card):
    data = model_card.validate_model_card(card)
    assert not [d for d in data.datasets or [] if LOCAL_DATASET.match(d)], data.datasets


@pytest.mark.parametrize("card", CARDS, ids=lambda p: p.stem)
def test_committed_card_says_which_versions_made_its_numbers(card):
    versions = card.read_text().split("## Framework versions")[1].split("## Citation")[0]
    for name in ("hf_fadam", "transformers", "torch", "datasets"):
        assert re.search(rf"^- {name} \S+", versions, re.M), f"{card.name}: no {name} version"
    assert re.search(r"commit\s+[0-9a-f]{7,}", versions), f"{card.name}: no hf_fadam commit"


def test_librivox_word_count_agrees_everywhere():
    # 71 words: the 5 transcripts of the pocketsphinx 5.1.1 sdist (22 + 8 + 14 + 19 + 8).
    places = [
        REPO / "docs" / "examples.md",
        REPO / "examples" / "make_speech_dataset.py",
        REPO / "examples" / "run_speech_recognition_seq2seq.py",
        REPO / "model_cards" / "fadam-whisper-tiny-en-espeak.md",
    ]
    counts = {}
    for path in places:
        text = " ".join(path.read_text().split())
        counts[path.name] = set(re.findall(r"(\d+) words", text)) - {"130", "190"}  # not the speaking rates
    assert all(found == {"71"} for found in counts.values()), counts
