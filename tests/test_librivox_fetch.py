"""`librivox_clips()` fetches the pocketsphinx 5.1.1 sdist as a file (no pip, nothing built) and checks its sha256.

The network is faked: `make_speech_dataset._open_url` serves PyPI's simple-index JSON and a small sdist built here
with the same member layout, and `subprocess` refuses to run anything, so a build (or `pip download`) would fail.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import make_speech_dataset as msd  # noqa: E402


FILE_URL = "https://files.example/packages/ab/cd/pocketsphinx-5.1.1.tar.gz"
CLIPS = {"utt-0870": "and the first words", "utt-0880": "of the  chapter\n"}


def fake_sdist() -> bytes:
    """A tar.gz laid out like pocketsphinx-5.1.1.tar.gz's LibriVox test data (and a C file that must stay packed)."""
    members = {"fileids": "\n".join(CLIPS) + "\n", "src/pocketsphinx.c": "int main(void) { return 0; }\n"}
    for utterance, text in CLIPS.items():
        members[f"{utterance}.wav"] = b"RIFF....WAVE" + utterance.encode()
        members[f"{utterance}.txt"] = text
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            data = data.encode() if isinstance(data, str) else data
            prefix = "pocketsphinx-5.1.1/" if name.startswith("src/") else msd.LIBRIVOX_MEMBER
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def fake_pypi(monkeypatch, tmp_path):
    """Serve the index and the sdist; record the URLs asked for; forbid every subprocess."""
    sdist = fake_sdist()
    sha256 = hashlib.sha256(sdist).hexdigest()
    monkeypatch.setattr(msd, "LIBRIVOX_SDIST_SHA256", sha256)
    monkeypatch.delenv("HF_FADAM_POCKETSPHINX_SDIST", raising=False)
    monkeypatch.setenv("HF_FADAM_CACHE_DIR", str(tmp_path / "cache"))
    served = {"body": sdist, "requests": []}

    def open_url(url, accept=None):
        served["requests"].append(url)
        if url == f"{msd.PYPI_SIMPLE_URL}/pocketsphinx/":
            assert accept == "application/vnd.pypi.simple.v1+json"
            entry = {"filename": "pocketsphinx-5.1.1.tar.gz", "url": FILE_URL, "hashes": {"sha256": sha256}}
            other = {"filename": "pocketsphinx-5.1.1-cp311-cp311-manylinux.whl", "url": "x", "hashes": {}}
            return io.BytesIO(json.dumps({"files": [other, {**entry, "size": len(sdist)}]}).encode())
        assert url == FILE_URL
        return io.BytesIO(served["body"])

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"librivox_clips ran a subprocess: {args}")

    monkeypatch.setattr(msd, "_open_url", open_url)
    for name in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, no_subprocess)
    return served


def test_fetch_builds_nothing_and_writes_the_clips(fake_pypi, tmp_path, capsys):
    folder = msd.librivox_clips()
    assert folder == tmp_path / "cache" / "librivox-pocketsphinx-5.1.1"  # the docstring's default, under the root
    assert fake_pypi["requests"] == [f"{msd.PYPI_SIMPLE_URL}/pocketsphinx/", FILE_URL]
    assert sorted(p.name for p in (folder / "test").iterdir()) == ["metadata.csv", "utt-0870.wav", "utt-0880.wav"]
    rows = list(csv.DictReader(open(folder / "test" / "metadata.csv", newline="")))
    assert rows == [
        {"file_name": "utt-0870.wav", "text": "and the first words"},
        {"file_name": "utt-0880.wav", "text": "of the chapter"},
    ]
    assert (folder / "test" / "utt-0880.wav").read_bytes() == b"RIFF....WAVEutt-0880"
    assert "license: pd" in (folder / "README.md").read_text()
    assert not list(folder.rglob("*.c")) and not list(folder.rglob("*.tar.gz"))  # only the clips are kept
    # One log line: what, how big, from where, where the clips go.
    log = capsys.readouterr().err.strip().splitlines()
    assert len(log) == 1
    assert "pocketsphinx-5.1.1.tar.gz" in log[0] and FILE_URL in log[0] and str(folder) in log[0]
    assert f"{len(fake_sdist()) / 1e6:.1f} MB" in log[0]
    # Cached: a second call touches nothing.
    assert msd.librivox_clips() == folder and len(fake_pypi["requests"]) == 2


def test_hash_mismatch_names_the_file_and_extracts_nothing(fake_pypi, tmp_path):
    fake_pypi["body"] = fake_sdist()[:-10] + b"0123456789"  # altered in transit
    with pytest.raises(
        RuntimeError, match=r"pocketsphinx-5\.1\.1\.tar\.gz downloaded from .* has sha256 [0-9a-f]{64}"
    ):
        msd.librivox_clips(tmp_path / "clips")
    assert not (tmp_path / "clips" / ".complete").exists()
    assert not list((tmp_path / "clips").rglob("*.wav"))


def test_index_with_another_hash_is_refused(fake_pypi, monkeypatch, tmp_path):
    monkeypatch.setattr(msd, "LIBRIVOX_SDIST_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="lists pocketsphinx-5.1.1.tar.gz with sha256"):
        msd.librivox_clips(tmp_path / "clips")
    assert fake_pypi["requests"] == [f"{msd.PYPI_SIMPLE_URL}/pocketsphinx/"]  # the file itself was never fetched


def test_network_error_says_how_to_work_offline(monkeypatch, tmp_path):
    def unreachable(url, accept=None):
        raise OSError("Name or service not known")

    monkeypatch.delenv("HF_FADAM_POCKETSPHINX_SDIST", raising=False)
    monkeypatch.setattr(msd, "_open_url", unreachable)
    with pytest.raises(RuntimeError, match="Name or service not known.*HF_FADAM_POCKETSPHINX_SDIST"):
        msd.librivox_clips(tmp_path / "clips")


def test_local_sdist_override_uses_no_network(fake_pypi, monkeypatch, tmp_path):
    local = tmp_path / "pocketsphinx-5.1.1.tar.gz"
    local.write_bytes(fake_sdist())
    monkeypatch.setenv("HF_FADAM_POCKETSPHINX_SDIST", str(local))
    folder = msd.librivox_clips(tmp_path / "clips")
    assert len(list((folder / "test").glob("*.wav"))) == 2 and fake_pypi["requests"] == []
    monkeypatch.setenv("HF_FADAM_POCKETSPHINX_SDIST", str(tmp_path / "missing.tar.gz"))
    with pytest.raises(FileNotFoundError, match="HF_FADAM_POCKETSPHINX_SDIST="):
        msd.librivox_clips(tmp_path / "other")


def test_default_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_FADAM_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert msd.default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("HF_FADAM_CACHE_DIR")
    assert msd.default_cache_dir() == tmp_path / "b" / "hf_fadam"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert msd.default_cache_dir() == Path.home() / ".cache" / "hf_fadam"
