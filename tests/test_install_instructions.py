"""What the docs and notebooks tell a user to install agrees with what CI installs.

- Every `apt-get install` line in the user docs that names FFmpeg libraries is the one `.ci/run` runs (torchcodec 0.13
  needs all seven FFmpeg 5.1 libraries: naming three of them leaves `import torchcodec` failing).
- The notebooks' install cells install hf_fadam from the checkout (it is not on PyPI yet) with `torch==2.13.0` in the
  same pip command (left alone, pip resolves torch to a multi-GB CUDA build).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "examples" / "notebooks").glob("*.ipynb"))
# Where the FFmpeg packages are listed for users (docs/trainer.md and docs/precision.md install no system packages).
APT_DOCS = [
    "docs/examples.md",
    "examples/README.md",
    "examples/run_speech_recognition_ctc.py",
    "examples/run_speech_recognition_seq2seq.py",
    "examples/notebooks/speech_recognition_ctc.ipynb",
    "examples/notebooks/speech_recognition_seq2seq.ipynb",
]
FFMPEG_LIB = re.compile(r"\blib(av|sw)[a-z]+\d+\b")


def apt_install_commands(text: str) -> list[list[str]]:
    """The words of each `apt-get install ...` command in `text`, from `apt-get` to the end of the command.

    Backslash continuations are joined; a comment, a redirection or a shell operator ends the command.
    """
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        if "apt-get install" not in line:
            continue
        command = line[line.index("apt-get install") :]
        try:
            split = shlex.split(command, comments=True)
        except ValueError:  # inside a string of code (an error message), not a shell line
            split = command.split()
        words = []
        for word in split:
            if word.startswith((">", "&", "|", ";", "2>")):
                break
            words.append(word)
        commands.append(words)
    return commands


def doc_text(path: Path) -> str:
    if path.suffix == ".ipynb":  # the cells' text, as a user reads (and a shell runs) it
        return "\n".join("".join(cell["source"]) for cell in json.loads(path.read_text())["cells"])
    return path.read_text()


def ci_apt_command() -> list[str]:
    (command,) = apt_install_commands((REPO / ".ci" / "run").read_text())
    return command


def test_ci_installs_the_seven_ffmpeg_libraries():
    libraries = {w for w in ci_apt_command() if FFMPEG_LIB.fullmatch(w)}
    assert libraries == {
        "libavutil57", "libavcodec59", "libavformat59", "libavdevice59", "libavfilter8", "libswscale6", "libswresample4"
    }  # fmt: skip


@pytest.mark.parametrize("doc", APT_DOCS)
def test_docs_apt_line_is_ci_apt_line(doc):
    ci = ci_apt_command()
    commands = [c for c in apt_install_commands(doc_text(REPO / doc)) if any(FFMPEG_LIB.fullmatch(w) for w in c)]
    assert commands, f"{doc}: no apt-get line with the FFmpeg libraries"
    for command in commands:
        assert set(command) == set(ci), f"{doc}: packages differ from .ci/run's: {set(command) ^ set(ci)}"
        assert command == ci, f"{doc}: write the apt-get line exactly as .ci/run does: {shlex.join(ci)}"


def test_no_other_user_doc_lists_ffmpeg_libraries_differently():
    ci = set(ci_apt_command())
    candidates = [*(REPO / "docs").glob("*.md"), *(REPO / "examples").rglob("*.py"), *NOTEBOOKS]
    candidates += [REPO / "examples" / "README.md"]
    for path in candidates:
        if path.name in ("trainer.md", "precision.md"):
            continue
        for command in apt_install_commands(doc_text(path)):
            if any(FFMPEG_LIB.fullmatch(w) for w in command):
                assert set(command) == ci, f"{path.relative_to(REPO)}: {shlex.join(command)}"


def install_cell(path: Path) -> str:
    notebook = json.loads(path.read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code" and "pip install" in "".join(c["source"])]
    assert len(cells) == 1, f"{path.name}: expected one install cell, found {len(cells)}"
    return "".join(cells[0]["source"])


def pip_commands(cell: str) -> list[list[str]]:
    """The words of each `pip install` command in a cell (`!`-lines, `&&` chains split)."""
    commands = []
    for line in cell.splitlines():
        for part in line.lstrip("!%").split("&&"):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"]:
                commands.append(words[2:])
    return commands


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_installs_from_the_checkout_with_torch_pinned(notebook):
    commands = pip_commands(install_cell(notebook))
    project = [c for c in commands if any("[examples]" in w for w in c)]
    assert len(project) == 1, f"{notebook.name}: {commands}"
    (command,) = project
    # Not the PyPI name (hf-fadam is not published yet): the repository root, relative to examples/notebooks/.
    assert not any(w.startswith(("hf-fadam", "hf_fadam")) for w in command), command
    assert command[command.index("-e") + 1] == "../..[examples]", command
    assert (notebook.parent / "../../pyproject.toml").resolve() == REPO / "pyproject.toml"
    assert "torch==2.13.0" in command, f"{notebook.name}: torch must be pinned in the same pip command: {command}"
    # Everything else that depends on torch goes in the same command too (torchcodec in the speech notebooks).
    for other in commands:
        if other is not command:
            assert "--no-deps" in other, f"{notebook.name}: a second pip command could pull its own torch: {other}"
    # A markdown cell says why, and how to install from a wheel instead.
    text = doc_text(notebook)
    assert "not on PyPI yet" in text and ".whl[examples]" in text and "torch==2.13.0" in text
