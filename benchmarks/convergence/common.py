"""What every task of the convergence study shares: the optimizers under test, the schedule, seeding, and the loop.

Every optimizer gets the same parameter groups (weight decay on tensors with two or more dimensions only, as the
Hugging Face Trainer does it), the same schedule (linear warm-up over the first 5% of the steps, then cosine decay to
10% of the peak) and the same number of steps and examples. Each keeps its own default weight decay: 0.1 for both
FAdams (the paper's default) and 0.01 for ``torch.optim.AdamW``. No gradient-norm clipping anywhere: FAdam clips its
own natural gradient, and AdamW runs as most users run it.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn


OPTIMIZERS = ("adamw", "fadam", "ptopt_fadam")
# Run only when named in --optimizers: hf_fadam FAdam8bit (8-bit blockwise m and sqrt(f), its defaults block_size=256,
# min_8bit_size=4096), e.g. `--optimizers fadam_8bit --resume` next to an existing study.
OPTIONAL_OPTIMIZERS = ("fadam_8bit",)
# An ablation (in the default study, or alone with --optimizers fadam_wd0): hf_fadam FAdam without weight decay, to
# separate the effect of FAdam's Fisher-preconditioned decay (clipped to a per-tensor RMS of lr * weight_decay * clip
# per step, whatever the size of the weights) from the rest of the update.
ABLATIONS = ("fadam_wd0",)
WEIGHT_DECAY = {"adamw": 0.01, "fadam": 0.1, "ptopt_fadam": 0.1, "fadam_wd0": 0.0, "fadam_8bit": 0.1}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, WEIGHT_DECAY[name])
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if name in ("fadam", "fadam_wd0"):
        from hf_fadam import FAdam

        return FAdam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, clip=1.0, p=0.5)
    if name == "fadam_8bit":
        from hf_fadam import FAdam8bit

        return FAdam8bit(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, clip=1.0, p=0.5)
    if name == "ptopt_fadam":
        from pytorch_optimizer import FAdam as PtoptFAdam

        return PtoptFAdam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, clip=1.0, p=0.5)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS + ABLATIONS + OPTIONAL_OPTIMIZERS}")


def lr_factor(step: int, total: int, warmup_frac: float = 0.05, floor: float = 0.1) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warm-up, then cosine decay to ``floor``."""
    warmup = max(1, int(round(warmup_frac * total)))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Curve:
    """Loss curve of one run: train loss averaged over each logging interval, and held-out validation loss."""

    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)


def train_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    val_fn: Callable[[nn.Module], float],
    steps: int,
    peak_lr: float,
    log_every: int,
    eval_every: int,
) -> tuple[Curve, bool, float]:
    """Train for ``steps`` steps; returns the curve, whether the loss stayed finite, and the train time in seconds.

    ``val_fn`` runs under ``torch.no_grad`` with the model in eval mode; it is timed apart from training.
    """
    curve = Curve()
    finite = True
    acc, n_acc = 0.0, 0
    train_time = 0.0
    for step in range(steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = peak_lr * lr_factor(step, steps)
        model.train()
        loss = loss_fn(model, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        train_time += time.perf_counter() - t0
        if not math.isfinite(value):
            finite = False
            curve.train_steps.append(step + 1)
            curve.train_loss.append(float("nan"))
            break
        acc += value
        n_acc += 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.train_steps.append(step + 1)
            curve.train_loss.append(acc / n_acc)
            acc, n_acc = 0.0, 0
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.eval()
            with torch.no_grad():
                curve.val_steps.append(step + 1)
                curve.val_loss.append(float(val_fn(model)))
    return curve, finite, train_time
