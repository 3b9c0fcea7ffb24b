"""Task 2, speech recognition: a small CTC model on log-mel features of speech synthesised with espeak-ng.

The setting of the speech example (synthesised speech and a small CTC model), in plain PyTorch. Utterances are 3-5
words drawn from a 40-word vocabulary (digits, commands, colours, animals, ...), spoken by espeak-ng with one of
five English accents, one of six voice variants, a random speed (130-200 words/min) and pitch (25-75). Train,
validation and test utterances are disjoint draws of the same generator (fixed data seed, independent of the run
seed), so the test set holds new word sequences and new speaker settings. Audio is synthesised once (needs the
``espeak-ng`` binary: ``apt-get install -y espeak-ng``) and the features are cached under ``--cache-dir``.

Features: 40 log-mel bands, 25 ms windows every 10 ms, from ``torch.stft`` and a triangular mel filterbank written
here (no torchaudio), normalised per utterance. Model: a strided conv front end, three residual conv blocks and a
one-layer bidirectional GRU, character CTC (27 symbols + blank), greedy decoding. Metric: word error rate (jiwer) on
the test utterances; the validation WER selects the learning rate.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import subprocess
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import make_optimizer, seed_everything, train_loop
from torch import nn


WORDS = (
    "zero one two three four five six seven eight nine "
    "yes no up down left right on off stop go "
    "red green blue black white yellow orange purple "
    "cat dog bird fish horse mouse "
    "house tree river mountain water light"
).split()
ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-029", "en-gb-scotland")
VARIANTS = ("", "+m3", "+m7", "+f2", "+f4", "+klatt")
ALPHABET = " abcdefghijklmnopqrstuvwxyz"  # CTC label i + 1; 0 is the blank
SAMPLE_RATE = 22050  # espeak-ng's native rate
N_MELS = 40


@dataclass(frozen=True)
class ASRConfig:
    n_train: int = 800
    n_val: int = 150
    n_test: int = 150
    data_seed: int = 1234
    steps: int = 700
    batch_size: int = 16
    channels: int = 96
    hidden: int = 96
    log_every: int = 25
    eval_every: int = 100


FULL = ASRConfig()
QUICK = ASRConfig(
    n_train=48, n_val=16, n_test=16, steps=20, batch_size=8, channels=32, hidden=32, log_every=5, eval_every=10
)


def _utterances(cfg: ASRConfig) -> list[dict]:
    rng = random.Random(cfg.data_seed)
    seen: set[str] = set()
    out = []
    while len(out) < cfg.n_train + cfg.n_val + cfg.n_test:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 5)))
        if text in seen:  # every split gets word sequences of its own
            continue
        seen.add(text)
        voice = rng.choice(ACCENTS) + rng.choice(VARIANTS)
        out.append({"text": text, "voice": voice, "speed": rng.randint(130, 200), "pitch": rng.randint(25, 75)})
    return out


def _synthesise(utt: dict) -> np.ndarray:
    wav = subprocess.run(
        ["espeak-ng", "-v", utt["voice"], "-s", str(utt["speed"]), "-p", str(utt["pitch"]), "--stdout", utt["text"]],
        check=True,
        capture_output=True,
    ).stdout
    # espeak-ng streams a 44-byte WAV header whose length fields are placeholders: take everything after it.
    with wave.open(io.BytesIO(wav)) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (SAMPLE_RATE, 2, 1), "unexpected WAV format"
    frames = wav[44:]
    return np.frombuffer(frames[: len(frames) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0


def _mel_filterbank(n_fft: int, sr: int, n_mels: int, fmin: float = 20.0, fmax: float = 8000.0) -> torch.Tensor:
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    bins = np.fft.rfftfreq(n_fft, 1.0 / sr)
    fb = np.zeros((n_mels, len(bins)), dtype=np.float32)
    for i in range(n_mels):
        lo, mid, hi = hz[i], hz[i + 1], hz[i + 2]
        fb[i] = np.clip(np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)), 0.0, None)
    return torch.from_numpy(fb)


def log_mel(audio: np.ndarray) -> torch.Tensor:
    """(frames, 40) log-mel features, 25 ms windows every 10 ms, normalised per utterance."""
    win, hop, n_fft = int(0.025 * SAMPLE_RATE), int(0.010 * SAMPLE_RATE), 1024
    x = torch.from_numpy(audio)
    spec = torch.stft(x, n_fft, hop_length=hop, win_length=win, window=torch.hann_window(win), return_complex=True)
    mel = _mel_filterbank(n_fft, SAMPLE_RATE, N_MELS) @ spec.abs().pow(2)
    feats = torch.log(mel + 1e-6).T
    return (feats - feats.mean(0)) / (feats.std(0) + 1e-5)


def load_data(cfg: ASRConfig, cache_dir: str) -> dict:
    """Synthesise (once) and featurise the utterances; returns {'train'|'val'|'test': [(feats, text), ...]}."""
    key_src = json.dumps({k: v for k, v in asdict(cfg).items() if k in ("n_train", "n_val", "n_test", "data_seed")})
    key = hashlib.sha1((key_src + " ".join(WORDS) + "".join(ACCENTS + VARIANTS)).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"asr_{key}.pt"
    if path.exists():
        return torch.load(path)
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("the speech task needs espeak-ng: apt-get update && apt-get install -y espeak-ng")
    utts = _utterances(cfg)
    with ThreadPoolExecutor(4) as pool:
        audio = list(pool.map(_synthesise, utts))
    items = [(log_mel(a), u["text"]) for a, u in zip(audio, utts)]
    a, b = cfg.n_train, cfg.n_train + cfg.n_val
    data = {
        "train": items[:a],
        "val": items[a:b],
        "test": items[b:],
        "seconds": float(sum(len(x) for x in audio) / SAMPLE_RATE),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{random.getrandbits(32)}")
    torch.save(data, tmp)
    tmp.replace(path)
    return data


class CTCModel(nn.Module):
    def __init__(self, cfg: ASRConfig):
        super().__init__()
        c = cfg.channels
        self.front = nn.Conv1d(N_MELS, c, 5, stride=2, padding=2)
        self.blocks = nn.ModuleList(nn.Conv1d(c, c, 5, padding=2) for _ in range(3))
        self.norms = nn.ModuleList(nn.LayerNorm(c) for _ in range(3))
        self.rnn = nn.GRU(c, cfg.hidden, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * cfg.hidden, len(ALPHABET) + 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (B, T, 40) -> (B, T', V) log-probs
        x = F.gelu(self.front(feats.transpose(1, 2)))
        for conv, norm in zip(self.blocks, self.norms):
            x = x + F.gelu(conv(norm(x.transpose(1, 2)).transpose(1, 2)))
        x, _ = self.rnn(x.transpose(1, 2))
        return self.out(x).log_softmax(-1)


def _collate(items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    feats = nn.utils.rnn.pad_sequence([f for f, _ in items], batch_first=True)
    in_lens = torch.tensor([(len(f) + 1) // 2 for f, _ in items])  # the stride-2 front end
    labels = [torch.tensor([ALPHABET.index(ch) + 1 for ch in t]) for _, t in items]
    return feats, in_lens, torch.cat(labels), torch.tensor([len(x) for x in labels])


def _ctc_loss(model: nn.Module, batch) -> torch.Tensor:
    feats, in_lens, labels, label_lens = batch
    log_probs = model(feats).transpose(0, 1)
    return F.ctc_loss(log_probs, labels, in_lens, label_lens, zero_infinity=True)


def _greedy(log_probs: torch.Tensor, length: int) -> str:
    ids = log_probs[:length].argmax(-1).tolist()
    out, prev = [], 0
    for i in ids:
        if i != prev and i != 0:
            out.append(ALPHABET[i - 1])
        prev = i
    return " ".join("".join(out).split())


def _evaluate(model: nn.Module, items: list, batch: int = 64) -> tuple[float, float, float]:
    """(mean CTC loss, WER, CER) over ``items``."""
    import jiwer

    hyps, refs, loss, n = [], [], 0.0, 0
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        b = _collate(chunk)
        loss += _ctc_loss(model, b).item() * len(chunk)
        n += len(chunk)
        lp = model(b[0])
        hyps += [_greedy(lp[j], int(b[1][j])) for j in range(len(chunk))]
        refs += [t for _, t in chunk]
    return loss / n, jiwer.wer(refs, hyps), jiwer.cer(refs, hyps)


def run(cfg: ASRConfig, optimizer: str, lr: float, seed: int, cache_dir: str) -> dict:
    data = load_data(cfg, cache_dir)
    train = data["train"]
    seed_everything(seed)
    model = CTCModel(cfg)
    opt = make_optimizer(optimizer, model, lr)
    gen = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            for idx in torch.randperm(len(train), generator=gen).split(cfg.batch_size):
                if len(idx) == cfg.batch_size:
                    yield _collate([train[i] for i in idx.tolist()])

    curve, finite, train_time = train_loop(
        model,
        opt,
        batches(),
        _ctc_loss,
        lambda m: _evaluate(m, data["val"])[0],
        cfg.steps,
        lr,
        cfg.log_every,
        cfg.eval_every,
    )
    model.eval()
    with torch.no_grad():
        _, val_wer, _ = _evaluate(model, data["val"]) if finite else (0, float("nan"), 0)
        test_loss, test_wer, test_cer = _evaluate(model, data["test"]) if finite else (float("nan"),) * 3
    return {
        "val_metric": val_wer,
        "test_metric": test_wer,
        "extra": {"test_cer": test_cer, "test_ctc_loss": test_loss},
        "finite": finite,
        "train_time_s": train_time,
        "curve": curve,
        "params": sum(p.numel() for p in model.parameters()),
        "data": {"corpus": "espeak-ng synthesised, 40 words", "train_audio_s": round(data["seconds"], 1)},
    }
