"""The convergence study's pipeline end to end: ``benchmarks/convergence/run.py --quick`` writes every file it should.

Runs the quick mode (tiny models, 1 seed, 1 learning rate, all three tasks and all four optimizer settings) in a subprocess into a
temporary folder and checks the CSVs, the markdown report and the PNGs. It says nothing about which optimizer wins:
that is the full study's job (see benchmarks/convergence/README.md).
"""

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "convergence" / "run.py"
TASKS = ("lm", "asr", "vqvae")
OPTIMIZERS = ("adamw", "fadam", "ptopt_fadam", "fadam_wd0")


@pytest.mark.timeout(300)
def test_quick_mode_writes_every_file(tmp_path):
    pytest.importorskip("pytorch_optimizer")
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    pytest.importorskip("jiwer")
    if shutil.which("espeak-ng") is None:
        pytest.skip("the speech task needs espeak-ng (apt-get install -y espeak-ng)")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for name in ("runs.csv", "curves.csv", "results.md", *(f"{t}.png" for t in TASKS)):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for task in TASKS:
        assert (out / f"{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with (out / "runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert sorted((r["task"], r["optimizer"]) for r in runs) == sorted((t, o) for t in TASKS for o in OPTIMIZERS)
    for r in runs:
        assert r["mode"] == "quick" and r["finite"] == "True", r
        for key in ("val_metric", "test_metric", "wall_s", "cpu_s"):
            assert math.isfinite(float(r[key])), (key, r)

    with (out / "curves.csv").open() as f:
        curves = list(csv.DictReader(f))
    assert {c["split"] for c in curves} == {"train", "val"}
    assert all(math.isfinite(float(c["loss"])) for c in curves)

    report = (out / "results.md").read_text()
    for label in ("torch AdamW", "hf_fadam FAdam", "pytorch_optimizer FAdam", "## Full learning-rate sweep"):
        assert label in report
    assert "diverged" not in report and "nan" not in report.lower()
