#!/usr/bin/env python
# Copyright 2026 The hf_fadam authors. Licensed under the Apache License, Version 2.0.
"""Synthesise a small English speech-recognition dataset with espeak-ng, in the `audiofolder` layout.

The sentences come from a small grammar of spoken commands ("turn off the kitchen lights", "set a timer for
twenty minutes", "call anna", digit strings, ...). Each sentence is spoken by one of several espeak-ng voices and
voice variants, at a random speed and pitch, and converted by sox to 16 kHz mono 16-bit WAV. Training and test
sentences are disjoint (the test split holds word combinations never heard in training); speeds and pitches are drawn
from the same ranges in both. By default the voices are too; with `--num_test_voices k`, k of the 30 voice/variant
pairs (chosen by the seed) speak only the test split, so it holds new sentences *and* new voices. Everything is
seeded, so the same arguments give the same transcripts and settings (the audio itself can differ slightly between
espeak-ng versions).

`metadata.csv` has the columns `file_name,text,sentence,voice,speed,pitch`: `text` is the spoken form in lower case
without punctuation (what a CTC model learns), `sentence` the same words written as a sentence, capitalised and
punctuated the way Whisper writes (what a Whisper model learns).

`librivox_clips()` fetches real human speech to test on: the 5 LibriVox recordings of *Sense and Sensibility*
(public domain) with their transcripts that the pocketsphinx 5.1.1 source distribution carries in
`test/data/librivox/`, downloaded from PyPI as a file and checked against its sha256 (nothing is built; the clips are
cached; `$HF_FADAM_POCKETSPHINX_SDIST` may name a local copy).

Needs the Debian/Ubuntu packages `espeak-ng` and `sox`:

    sudo apt-get install -y espeak-ng sox
    python examples/make_speech_dataset.py --output_dir data/espeak-commands --num_train 800 --num_test 100
    python examples/make_speech_dataset.py --output_dir data/espeak-heldout --num_train 400 --num_test 60 \
        --num_test_voices 6
    python examples/make_speech_dataset.py --librivox_dir data/librivox      # the 5 human LibriVox clips

Load the result with 🤗 datasets (`datasets>=4` also needs `torchcodec` to decode audio):

    from datasets import load_dataset
    ds = load_dataset("audiofolder", data_dir="data/espeak-commands")   # splits "train" and "test"

The folder also gets a `README.md` dataset card (CC0-1.0; the grammar and the generated audio are this project's).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


SAMPLING_RATE = 16_000
FORMAT_VERSION = 2  # bump when the grammar or the voice set changes, so cached copies are regenerated

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


# Words that a written sentence capitalises (names, cities, days).
PROPER_NOUNS = {*CITIES, "anna", "peter", "maria", "james", "tom", "monday", "friday"}


def written_form(text: str) -> str:
    """`text` written as a sentence, as Whisper transcribes it: "call anna now" -> "Call Anna now."

    The words stay spelled out (Whisper would often write digits); the metric's normaliser treats both alike.
    """
    words = [w.capitalize() if w in PROPER_NOUNS else w for w in text.split()]
    words[0] = words[0][:1].upper() + words[0][1:]
    return " ".join(words) + ("?" if text.split()[0] in ("what", "how") else ".")


def split_voices(num_test_voices: int, seed: int) -> tuple[list[str], list[str]]:
    """(training voices, test voices). With `num_test_voices` > 0 the two are disjoint; with 0 both are all."""
    if not 0 <= num_test_voices < len(VOICES):
        raise ValueError(f"num_test_voices must be in [0, {len(VOICES) - 1}], got {num_test_voices}")
    if num_test_voices == 0:
        return list(VOICES), list(VOICES)
    held_out = set(random.Random(f"held-out voices {seed}").sample(VOICES, num_test_voices))
    return [v for v in VOICES if v not in held_out], [v for v in VOICES if v in held_out]


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


def make_dataset(
    output_dir: str | Path, num_train: int = 800, num_test: int = 100, seed: int = 0, num_test_voices: int = 0
) -> Path:
    """Write `num_train` + `num_test` utterances to `output_dir/{train,test}/` and return `output_dir`.

    With `num_test_voices` > 0, that many voice/variant pairs speak only the test split (see `split_voices`).
    Does nothing if `output_dir` already holds a complete dataset made with the same arguments.
    """
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(
            f"make_speech_dataset needs {' and '.join(missing)} on PATH: sudo apt-get install -y espeak-ng sox"
        )
    output_dir = Path(output_dir)
    voices = dict(zip(("train", "test"), split_voices(num_test_voices, seed)))
    held_out = f" --num_test_voices {num_test_voices}" if num_test_voices else ""
    stamp = f"v{FORMAT_VERSION} train={num_train} test={num_test} seed={seed}{held_out}\n"
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
            voice, speed, pitch = rng.choice(voices[split]), rng.randint(130, 190), rng.randint(30, 70)
            file_name = f"{split}_{i:05d}.wav"
            rows.append(
                {
                    "file_name": file_name,
                    "text": text,
                    "sentence": written_form(text),
                    "voice": voice,
                    "speed": speed,
                    "pitch": pitch,
                }
            )
            jobs.append((text, split_dir / file_name, voice, speed, pitch))
        with open(split_dir / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    with ThreadPoolExecutor(max_workers=4) as pool:  # each job is two short subprocesses
        list(pool.map(lambda job: synthesise(*job), jobs))
    voice_note = (
        f"The test split is spoken by {num_test_voices} voice/variant pairs that never speak in the training split "
        f"({', '.join(voices['test'])})."
        if num_test_voices
        else ""
    )
    (output_dir / "README.md").write_text(
        DATASET_CARD.format(
            num_train=num_train, num_test=num_test, seed=seed, voice_note=voice_note, held_out_flag=held_out
        )
    )
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
(`--num_train {num_train} --num_test {num_test} --seed {seed}{held_out_flag}`): sentences from a small command grammar
(smart-home commands, timers, weather questions, calls, reminders, digit strings), each spoken by one of 30
espeak-ng voice/variant pairs (five English accents) at 130–190 words per minute and pitch 30–70, stored as
16 kHz mono 16-bit WAV with the transcript in `metadata.csv` (`file_name,text,sentence,voice,speed,pitch`; `text`
is lower case without punctuation, `sentence` the same words capitalised and punctuated).

The test sentences never occur in the training split. {voice_note} All speakers are synthetic, so a model trained here
will not transcribe natural speech well; the data exists to demonstrate and test speech-recognition fine-tuning
offline.

Licence: CC0-1.0 (the grammar and the audio are generated by this project; espeak-ng, GPL-3.0, is only the tool).
"""


LIBRIVOX_SDIST = "pocketsphinx==5.1.1"
LIBRIVOX_MEMBER = "pocketsphinx-5.1.1/test/data/librivox/"
LIBRIVOX_SDIST_FILE = "pocketsphinx-5.1.1.tar.gz"
# The file on PyPI is immutable: its hash is pinned here, and the download must match it.
LIBRIVOX_SDIST_SHA256 = "675778b309a22dfc9b7d37f7621976bba491d2a5f8c59696bd77fd6d07271355"
# PyPI's simple index (PEP 691 JSON): it names the file's URL, size and hash without building anything.
PYPI_SIMPLE_URL = "https://pypi.org/simple"
NETWORK_TIMEOUT_S = 60


def default_cache_dir() -> Path:
    """`$HF_FADAM_CACHE_DIR` (as for hf_fadam's compiled kernels), else `$XDG_CACHE_HOME/hf_fadam`, else
    `~/.cache/hf_fadam`."""
    if os.environ.get("HF_FADAM_CACHE_DIR"):
        return Path(os.environ["HF_FADAM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_fadam"


def _open_url(url: str, accept: str | None = None):
    """`urllib.request.urlopen(url)` with a timeout (the one network call of this module; tests replace it)."""
    headers = {"Accept": accept} if accept else {}
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=NETWORK_TIMEOUT_S)


def _sdist_on_pypi() -> tuple[str, int | None]:
    """(URL, size in bytes) of the pocketsphinx 5.1.1 sdist, read from PyPI's simple index."""
    index_url = f"{PYPI_SIMPLE_URL}/pocketsphinx/"
    with _open_url(index_url, accept="application/vnd.pypi.simple.v1+json") as response:
        files = json.load(response)["files"]
    for entry in files:
        if entry["filename"] == LIBRIVOX_SDIST_FILE:
            listed = entry.get("hashes", {}).get("sha256")
            if listed is not None and listed != LIBRIVOX_SDIST_SHA256:
                raise RuntimeError(
                    f"{index_url} lists {LIBRIVOX_SDIST_FILE} with sha256 {listed}, expected {LIBRIVOX_SDIST_SHA256}"
                )
            return urllib.parse.urljoin(index_url, entry["url"]), entry.get("size")
    raise RuntimeError(f"{index_url} lists no {LIBRIVOX_SDIST_FILE}")


def _pocketsphinx_sdist(download_dir: Path, clips_dir: Path | None = None) -> Path:
    """The pocketsphinx 5.1.1 sdist as a file: `$HF_FADAM_POCKETSPHINX_SDIST`, or downloaded from PyPI.

    The download is a plain HTTPS fetch of the `.tar.gz` (no pip, nothing built), checked against
    `LIBRIVOX_SDIST_SHA256`, into `download_dir`.
    """
    local = os.environ.get("HF_FADAM_POCKETSPHINX_SDIST")
    if local:
        if not Path(local).is_file():
            raise FileNotFoundError(f"HF_FADAM_POCKETSPHINX_SDIST={local!r} is not a file")
        return Path(local)
    hint = f"set HF_FADAM_POCKETSPHINX_SDIST to a local {LIBRIVOX_SDIST_FILE} (sha256 {LIBRIVOX_SDIST_SHA256})"
    try:
        url, size = _sdist_on_pypi()
        size_text = "size unknown" if size is None else f"{size / 1e6:.1f} MB"
        print(
            f"make_speech_dataset: fetching {LIBRIVOX_SDIST_FILE} ({size_text}, sha256 {LIBRIVOX_SDIST_SHA256[:12]}...) "
            f"from {url} (no build); keeping only its 5 LibriVox clips in {clips_dir or download_dir}",
            file=sys.stderr,
        )
        path = download_dir / LIBRIVOX_SDIST_FILE
        digest = hashlib.sha256()
        with _open_url(url) as response, open(path, "wb") as f:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
    except (OSError, ValueError, KeyError) as error:  # URLError and timeouts are OSErrors; a malformed index
        raise RuntimeError(f"could not fetch {LIBRIVOX_SDIST_FILE} from PyPI ({error}); {hint}") from error
    if digest.hexdigest() != LIBRIVOX_SDIST_SHA256:
        raise RuntimeError(
            f"{LIBRIVOX_SDIST_FILE} downloaded from {url} has sha256 {digest.hexdigest()}, expected "
            f"{LIBRIVOX_SDIST_SHA256} (a corrupted or altered download; nothing was extracted); {hint}"
        )
    return path


def librivox_clips(output_dir: str | Path | None = None) -> Path:
    """The 5 LibriVox clips of the pocketsphinx 5.1.1 sdist as an `audiofolder` (`test/` with `metadata.csv`).

    Real read speech (Jane Austen, *Sense and Sensibility*, chapter 1; LibriVox recordings are public domain),
    16 kHz mono WAV, 2.9-7.1 s each, 24.7 s and 71 words in all, with lower-case transcripts without punctuation (one
    keeps the reader's repeated "a": "a more a amiable woman"). Fetched once: `pocketsphinx-5.1.1.tar.gz` (34 MB) is
    downloaded from PyPI over HTTPS (its URL read from PyPI's simple index, nothing built, no pip) and checked against
    its pinned sha256; only the clips are kept, in `output_dir`, by default
    `~/.cache/hf_fadam/librivox-pocketsphinx-5.1.1` (the cache root is `$HF_FADAM_CACHE_DIR`, else
    `$XDG_CACHE_HOME/hf_fadam`, else `~/.cache/hf_fadam`). `$HF_FADAM_POCKETSPHINX_SDIST` may name a local copy of
    the sdist instead. Returns the folder.
    """
    if output_dir is None:
        output_dir = default_cache_dir() / "librivox-pocketsphinx-5.1.1"
    output_dir = Path(output_dir)
    stamp = output_dir / ".complete"
    if stamp.exists():
        return output_dir
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _pocketsphinx_sdist(Path(tmp), output_dir)
        with tarfile.open(sdist) as tar:
            names = tar.getnames()
            ids = tar.extractfile(LIBRIVOX_MEMBER + "fileids").read().decode().split()
            split_dir = output_dir / "test"
            split_dir.mkdir(parents=True, exist_ok=True)
            rows = []
            for utterance in ids:
                for suffix in (".wav", ".txt"):
                    if LIBRIVOX_MEMBER + utterance + suffix not in names:
                        raise ValueError(f"{sdist}: no {utterance}{suffix} in {LIBRIVOX_MEMBER}")
                (split_dir / f"{utterance}.wav").write_bytes(
                    tar.extractfile(LIBRIVOX_MEMBER + utterance + ".wav").read()
                )
                text = tar.extractfile(LIBRIVOX_MEMBER + utterance + ".txt").read().decode()
                rows.append({"file_name": f"{utterance}.wav", "text": " ".join(text.split())})
    with open(split_dir / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)
    (output_dir / "README.md").write_text(LIBRIVOX_CARD)
    stamp.write_text(f"{LIBRIVOX_SDIST}\n")
    return output_dir


LIBRIVOX_CARD = """---
license: pd
language:
- en
task_categories:
- automatic-speech-recognition
pretty_name: LibriVox clips from the pocketsphinx 5.1.1 test data
---

# LibriVox clips (pocketsphinx 5.1.1 test data)

Five utterances of a LibriVox recording of Jane Austen's *Sense and Sensibility* (chapter 1), 16 kHz mono, with
lower-case reference transcripts, as shipped in `test/data/librivox/` of the pocketsphinx 5.1.1 source distribution
on PyPI. LibriVox recordings are in the public domain. Extracted by hf_fadam's `examples/make_speech_dataset.py`.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=None, help="Folder to write train/, test/ and README.md into.")
    parser.add_argument("--num_train", type=int, default=800, help="Number of training utterances.")
    parser.add_argument("--num_test", type=int, default=100, help="Number of test utterances.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for sentences, voices, speeds and pitches.")
    parser.add_argument(
        "--num_test_voices", type=int, default=0, help="Voice/variant pairs heard only in the test split."
    )
    parser.add_argument("--librivox_dir", default=None, help="Also extract the 5 LibriVox clips into this folder.")
    args = parser.parse_args(argv)
    if args.output_dir is None and args.librivox_dir is None:
        parser.error("give --output_dir (espeak-ng speech) and/or --librivox_dir (the LibriVox clips)")
    if args.output_dir is not None:
        path = make_dataset(args.output_dir, args.num_train, args.num_test, args.seed, args.num_test_voices)
        print(f"Wrote {args.num_train} + {args.num_test} utterances to {path.resolve()}", file=sys.stderr)
    if args.librivox_dir is not None:
        print(f"LibriVox clips in {librivox_clips(args.librivox_dir).resolve()}", file=sys.stderr)


if __name__ == "__main__":
    main()
