"""The Trainer runs' shared pieces (``trainer_runs.py``, ``deepspeed_trainer.py``): sizes, ranks, a tiny Llama and
its token data.

Both scripts train the same model on the same data for the same number of steps, so that a run under DDP, FSDP2 or
DeepSpeed can be compared with the one-process run of the same script.
"""

from __future__ import annotations

import os

import torch


MAX_STEPS = 6
SAVE_STEP = 3
GLOBAL_BATCH = 8
SEQ_LEN = 16
VOCAB = 64


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def tiny_llama(seed: int = 0):
    """A 2-layer Llama of hidden size 16 (k_proj/v_proj of 8 rows; the norms (16,) land in the no-decay group)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


class Tokens(torch.utils.data.Dataset):
    """``n`` fixed random sequences of ``SEQ_LEN`` tokens, labels = inputs (the model shifts them)."""

    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(5)
        self.ids = torch.randint(0, VOCAB, (n, SEQ_LEN), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}
