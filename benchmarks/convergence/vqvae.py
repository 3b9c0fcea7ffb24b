"""Task 3, VQ-VAE: a small convolutional VQ-VAE on scikit-learn's bundled handwritten digits.

Data: ``sklearn.datasets.load_digits()`` (1 797 8x8 grey images, values 0-16 scaled to [0, 1]; the UCI optdigits
test set, shipped inside scikit-learn, BSD-3-Clause). A fixed permutation splits it into 1 197 train, 300
validation and 300 test images.

Model: conv encoder to a 4x4 grid of 8-dimensional latents, a codebook of 32 vectors trained by the optimizer (the
original VQ-VAE losses: codebook term plus 0.25 x commitment term, straight-through gradients, no EMA updates and no
code restarts, so that the optimizer alone decides how many codes stay alive), conv decoder. Metrics on the test
images: reconstruction mean squared error per pixel (the validation MSE selects the learning rate), the fraction of
the 32 codes in use, and the perplexity of the code distribution. The reconstruction loss is a regression loss, so
the paper's reading of FAdam's Fisher as an empirical Fisher of a discrete likelihood does not hold here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from common import make_optimizer, seed_everything, train_loop
from torch import nn


@dataclass(frozen=True)
class VQConfig:
    steps: int = 800
    batch_size: int = 64
    codes: int = 32
    code_dim: int = 8
    width: int = 16
    beta: float = 0.25
    log_every: int = 50
    eval_every: int = 80


FULL = VQConfig()
QUICK = VQConfig(steps=40, width=8, log_every=10, eval_every=20)


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0).unsqueeze(1)
    perm = torch.from_numpy(np.random.RandomState(0).permutation(len(x)))
    x = x[perm]
    return x[:1197], x[1197:1497], x[1497:]


class VQVAE(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        w = cfg.width
        self.beta = cfg.beta
        self.encoder = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, cfg.code_dim, 1),
        )
        self.codebook = nn.Parameter(torch.empty(cfg.codes, cfg.code_dim).uniform_(-1.0 / cfg.codes, 1.0 / cfg.codes))
        self.decoder = nn.Sequential(
            nn.Conv2d(cfg.code_dim, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, vq loss, code indices)."""
        z = self.encoder(x)  # (B, D, 4, 4)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        idx = torch.cdist(flat, self.codebook).argmin(1)
        q = self.codebook[idx].view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        vq_loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        q = z + (q - z).detach()  # straight-through estimator
        return self.decoder(q), vq_loss, idx


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    recon, vq_loss, _ = model(x)
    return F.mse_loss(recon, x) + vq_loss


def _evaluate(model: nn.Module, x: torch.Tensor, codes: int) -> tuple[float, float, float]:
    """(reconstruction MSE per pixel, fraction of codes used, code perplexity)."""
    recon, _, idx = model(x)
    counts = torch.bincount(idx, minlength=codes).float()
    prob = counts / counts.sum()
    entropy = -(prob[prob > 0] * prob[prob > 0].log()).sum().item()
    return F.mse_loss(recon, x).item(), (counts > 0).float().mean().item(), math.exp(entropy)


def run(cfg: VQConfig, optimizer: str, lr: float, seed: int, cache_dir: str) -> dict:
    train, val, test = load_digits_split()
    seed_everything(seed)
    model = VQVAE(cfg)
    opt = make_optimizer(optimizer, model, lr)
    gen = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            for idx in torch.randperm(len(train), generator=gen).split(cfg.batch_size):
                if len(idx) == cfg.batch_size:
                    yield train[idx]

    curve, finite, train_time = train_loop(
        model,
        opt,
        batches(),
        _loss,
        lambda m: _loss(m, val).item(),
        cfg.steps,
        lr,
        cfg.log_every,
        cfg.eval_every,
    )
    model.eval()
    with torch.no_grad():
        nan3 = (float("nan"),) * 3
        val_mse, _, _ = _evaluate(model, val, cfg.codes) if finite else nan3
        test_mse, usage, perplexity = _evaluate(model, test, cfg.codes) if finite else nan3
    return {
        "val_metric": val_mse,
        "test_metric": test_mse,
        "extra": {"test_code_usage": usage, "test_code_perplexity": perplexity},
        "finite": finite,
        "train_time_s": train_time,
        "curve": curve,
        "params": sum(p.numel() for p in model.parameters()),
        "data": {"corpus": "sklearn.datasets.load_digits (BSD-3-Clause)", "train_images": len(train)},
    }
