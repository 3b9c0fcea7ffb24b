"""``benchmarks/step.py --quick`` runs end to end, writes its CSV and markdown, and every FAdam variant passes the
benchmark's own correctness check (a FAIL row, an ERROR row or a nonzero exit fails this test)."""

import csv
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_step_benchmark_quick(tmp_path):
    out = tmp_path / "step"
    env = {**os.environ, "TRITON_INTERPRET": "0", "HF_FADAM_CPU_FUSED_BACKEND": "c"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step.py"), "--quick", "--steps", "3", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md, csv_path = out.with_suffix(".md"), out.with_suffix(".csv")
    assert md.is_file() and csv_path.is_file()
    text = md.read_text()
    assert "| FAIL |" not in text and "| ERROR |" not in text
    assert "| adamw_fused |" in text and "| fadam_fused |" in text
    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    names = {r["variant"] for r in rows}
    assert {"fadam_forloop", "fadam_foreach", "fadam_fused", "fadam_default", "adamw_fused"} <= names
    assert all(r["status"] == "OK" for r in rows)
    assert all(float(r["median_ms"]) > 0 for r in rows)
