"""Task 1, language modelling: a small GPT-style byte-level causal LM trained from scratch on real English text.

Text: the Python documentation topics that ship with CPython itself (``pydoc_data.topics``, the text behind
``help("assert")`` and friends: about 465 000 characters of technical English prose with code samples in Python
3.11), under the PSF License. Nothing to download. The topics are joined in their stored order and split
contiguously: the first 90% of the bytes train, the next 5% validate (learning-rate selection), the last 5% test.

Metric: mean next-byte cross-entropy (nats) on every non-overlapping window of the test split, and its perplexity.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from common import make_optimizer, seed_everything, train_loop
from torch import nn


@dataclass(frozen=True)
class LMConfig:
    steps: int = 500
    batch_size: int = 32
    context: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    log_every: int = 20
    eval_every: int = 100
    curve_eval_windows: int = 128  # validation windows used for the curve; final numbers use the whole split


FULL = LMConfig()
QUICK = LMConfig(
    steps=30, batch_size=8, context=32, d_model=32, n_layers=1, log_every=5, eval_every=10, curve_eval_windows=16
)


def load_corpus() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics.values())
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    n = len(data)
    a, b = int(0.9 * n), int(0.95 * n)
    info = {
        "corpus": "pydoc_data.topics (CPython docs, PSF License)",
        "python": sys.version.split()[0],
        "bytes": n,
        "sha1": hashlib.sha1(text.encode("utf-8")).hexdigest()[:12],
    }
    return data[:a], data[a:b], data[b:], info


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class ByteGPT(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.tok = nn.Embedding(256, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads) for _ in range(cfg.n_layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 256, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def _windows(data: torch.Tensor, context: int, limit: int | None = None) -> torch.Tensor:
    n = (len(data) - 1) // context
    if limit is not None:
        n = min(n, limit)
    return torch.stack([data[i * context : i * context + context + 1] for i in range(n)])


def _eval_loss(model: nn.Module, windows: torch.Tensor, batch: int = 256) -> float:
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        logits = model(w[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, 256), w[:, 1:].reshape(-1), reduction="sum").item()
        count += w[:, 1:].numel()
    return total / count


def run(cfg: LMConfig, optimizer: str, lr: float, seed: int, cache_dir: str) -> dict:
    train, val, test, info = load_corpus()
    val_windows, test_windows = _windows(val, cfg.context), _windows(test, cfg.context)
    curve_windows = val_windows[: cfg.curve_eval_windows]
    seed_everything(seed)
    model = ByteGPT(cfg)
    opt = make_optimizer(optimizer, model, lr)
    gen = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            starts = torch.randint(0, len(train) - cfg.context - 1, (cfg.batch_size,), generator=gen)
            yield torch.stack([train[s : s + cfg.context + 1] for s in starts.tolist()])

    def loss_fn(m, w):
        return F.cross_entropy(m(w[:, :-1]).reshape(-1, 256), w[:, 1:].reshape(-1))

    curve, finite, train_time = train_loop(
        model,
        opt,
        batches(),
        loss_fn,
        lambda m: _eval_loss(m, curve_windows),
        cfg.steps,
        lr,
        cfg.log_every,
        cfg.eval_every,
    )
    model.eval()
    with torch.no_grad():
        val_loss = _eval_loss(model, val_windows) if finite else float("nan")
        test_loss = _eval_loss(model, test_windows) if finite else float("nan")
    return {
        "val_metric": val_loss,
        "test_metric": test_loss,
        "extra": {
            "test_ppl": math.exp(test_loss) if finite else float("nan"),
            "test_bits_per_byte": test_loss / math.log(2),
        },
        "finite": finite,
        "train_time_s": train_time,
        "curve": curve,
        "params": sum(p.numel() for p in model.parameters()),
        "data": info,
    }
