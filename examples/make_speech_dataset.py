#!/usr/bin/env python
# Copyright 2026 The hf_fadam authors. Licensed under the Apache License, Version 2.0.
"""Synthesise a small English speech-recognition dataset with espeak-ng, in the `audiofolder` layout.

The sentences come from a small grammar of spoken commands ("turn off the kitchen lights", "set a timer for
twenty minutes", "call anna", digit strings, ...). Each sentence is spoken by one of several espeak-ng voices and
voice variants, at a random speed and pitch, and converted by sox to 16 kHz mono 16-bit WAV. Training and test
sentences are disjoint (the test split holds word combinations never heard in training); voices, speeds and pitches
are drawn from the same ranges in both. Everything is seeded, so the same arguments give the same transcripts and
settings (the audio itself can differ slightly between espeak-ng versions).

Needs the Debian/Ubuntu packages `espeak-ng` and `sox`:

    sudo apt-get install -y espeak-ng sox
    python examples/make_speech_dataset.py --output_dir data/espeak-commands --num_train 800 --num_test 100

Load the result with 🤗 datasets (`datasets>=4` also needs `torchcodec` to decode audio):

    from datasets import load_dataset
    ds = load_dataset("audiofolder", data_dir="data/espeak-commands")   # splits "train" and "test"

The folder also gets a `README.md` dataset card (CC0-1.0; the grammar and the generated audio are this project's).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


SAMPLING_RATE = 16_000
FORMAT_VERSION = 1  # bump when the grammar or the voice set changes, so cached copies are regenerated

NUMBERS = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "fifteen",
    "twenty",
    "thirty",
]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ROOMS = ["kitchen", "bedroom", "garden", "hall", "office", "bathroom", "garage", "living room"]
DEVICES = ["lights", "fan", "heater", "radio", "television", "oven", "music"]
CITIES = ["paris", "london", "berlin", "tokyo", "madrid", "rome", "lisbon", "oslo", "dublin", "vienna"]
PEOPLE = ["anna", "peter", "mum", "dad", "the office", "maria", "james", "the doctor", "grandma", "tom"]
MUSIC = ["jazz", "rock", "the news", "classical music", "the radio", "some blues", "my playlist", "a podcast"]
ITEMS = ["milk", "bread", "eggs", "coffee", "apples", "rice", "butter", "cheese", "tomatoes", "soap", "tea", "pasta"]
DAYS = ["today", "tomorrow", "on monday", "on friday", "this weekend", "tonight"]


def grammar() -> list[str]:
    """Every sentence of the command grammar (about 1,000), in a fixed order."""
    p = itertools.product
    sentences = [f"turn {s} the {r} {d}" for s, r, d in p(["on", "off"], ROOMS, DEVICES)]
    sentences += [f"set a timer for {n} {u}" for n, u in p(NUMBERS, ["minutes", "seconds", "hours"])]
    sentences += [f"what is the weather {d} in {c}" for d, c in p(DAYS, CITIES)]
    sentences += [f"call {who} {when}" for who, when in p(PEOPLE, ["now", "later", "tomorrow", "at {n}"])]
    sentences += [f"play {m} in the {r}" for m, r in p(MUSIC, ROOMS)]
    sentences += [f"remind me to call {who} {d}" for who, d in p(PEOPLE, DAYS)]
    sentences += [" ".join(ds) for ds in p(DIGITS[:7], DIGITS[3:], DIGITS[::2])]
    sentences += [f"set the {r} heating to {n} degrees" for r, n in p(ROOMS, NUMBERS)]
    sentences += [f"dim the {r} lights to {n} percent" for r, n in p(ROOMS, NUMBERS)]
    sentences += [
        f"{a} the {r} {t}" for a, r, t in p(["open", "close"], ROOMS, ["window", "door", "blinds", "curtains"])
    ]
    sentences += [
        f"wake me up at {n} {t}" for n, t in p(NUMBERS[:12], ["in the morning", "tonight", "fifteen", "thirty"])
    ]
    sentences += [f"how long does it take to {m} to {c}" for m, c in p(["drive", "walk", "cycle", "fly"], CITIES)]
    sentences += [f"add {item} to the shopping list" for item in ITEMS]
    sentences = [s.replace("at {n}", f"at {NUMBERS[i % 12]}") for i, s in enumerate(sentences)]
    return sorted(set(sentences))


# (espeak-ng voice, variant) pairs: five accents, male and female variants.
VOICES = [
    f"{voice}+{variant}"
    for voice, variant in itertools.product(
        ["en-us", "en-gb", "en-gb-x-rp", "en-029", "en-gb-scotland"], ["m1", "m3", "m7", "f1", "f3", "f4"]
    )
]


def synthesise(text: str, path: Path, voice: str, speed: int, pitch: int) -> None:
    """Speak `text` with espeak-ng and store it as 16 kHz mono 16-bit WAV at `path` (via sox)."""
    espeak = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
        check=True,
        capture_output=True,
    )
    # espeak-ng writes 22,050 Hz; -v 0.8 leaves headroom so resampling never clips.
    subprocess.run(
        ["sox", "-q", "-v", "0.8", "-t", "wav", "-", "-r", str(SAMPLING_RATE), "-c", "1", "-b", "16", str(path)],
        input=espeak.stdout,
        check=True,
    )


def make_dataset(output_dir: str | Path, num_train: int = 800, num_test: int = 100, seed: int = 0) -> Path:
    """Write `num_train` + `num_test` utterances to `output_dir/{train,test}/` and return `output_dir`.

    Does nothing if `output_dir` already holds a complete dataset made with the same arguments.
    """
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(
            f"make_speech_dataset needs {' and '.join(missing)} on PATH: sudo apt-get install -y espeak-ng sox"
        )
    output_dir = Path(output_dir)
    stamp = f"v{FORMAT_VERSION} train={num_train} test={num_test} seed={seed}\n"
    stamp_path = output_dir / ".complete"
    if stamp_path.exists() and stamp_path.read_text() == stamp:
        return output_dir
    sentences = grammar()
    if num_train + num_test > len(sentences):
        raise ValueError(f"num_train + num_test must be at most {len(sentences)}, got {num_train + num_test}")
    rng = random.Random(seed)
    rng.shuffle(sentences)
    splits = {"train": sentences[:num_train], "test": sentences[num_train : num_train + num_test]}
    jobs = []
    for split, texts in splits.items():
        split_dir = output_dir / split
        if split_dir.exists():
            shutil.rmtree(split_dir)
        split_dir.mkdir(parents=True)
        rows = []
        for i, text in enumerate(texts):
            voice, speed, pitch = rng.choice(VOICES), rng.randint(130, 190), rng.randint(30, 70)
            file_name = f"{split}_{i:05d}.wav"
            rows.append({"file_name": file_name, "text": text, "voice": voice, "speed": speed, "pitch": pitch})
            jobs.append((text, split_dir / file_name, voice, speed, pitch))
        with open(split_dir / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    with ThreadPoolExecutor(max_workers=4) as pool:  # each job is two short subprocesses
        list(pool.map(lambda job: synthesise(*job), jobs))
    (output_dir / "README.md").write_text(DATASET_CARD.format(num_train=num_train, num_test=num_test, seed=seed))
    stamp_path.write_text(stamp)
    return output_dir


DATASET_CARD = """---
license: cc0-1.0
language:
- en
task_categories:
- automatic-speech-recognition
pretty_name: espeak-ng spoken commands (hf_fadam example)
size_categories:
- n<1K
---

# espeak-ng spoken commands

Synthetic English speech made by `examples/make_speech_dataset.py` of the hf_fadam project
(`--num_train {num_train} --num_test {num_test} --seed {seed}`): sentences from a small command grammar
(smart-home commands, timers, weather questions, calls, reminders, digit strings), each spoken by one of 30
espeak-ng voice/variant pairs (five English accents) at 130–190 words per minute and pitch 30–70, stored as
16 kHz mono 16-bit WAV with the transcript in `metadata.csv` (`file_name,text,voice,speed,pitch`).

The test sentences never occur in the training split. All speakers are synthetic, so a model trained here
will not transcribe natural speech well; the data exists to demonstrate and test CTC fine-tuning offline.

Licence: CC0-1.0 (the grammar and the audio are generated by this project; espeak-ng, GPL-3.0, is only the tool).
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="Folder to write train/, test/ and README.md into.")
    parser.add_argument("--num_train", type=int, default=800, help="Number of training utterances.")
    parser.add_argument("--num_test", type=int, default=100, help="Number of test utterances.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for sentences, voices, speeds and pitches.")
    args = parser.parse_args(argv)
    path = make_dataset(args.output_dir, args.num_train, args.num_test, args.seed)
    print(f"Wrote {args.num_train} + {args.num_test} utterances to {path.resolve()}", file=sys.stderr)


if __name__ == "__main__":
    main()
