"""``benchmarks/step.py --quick`` runs end to end, writes its CSV and markdown, and every FAdam variant passes the
benchmark's own correctness check (a FAIL row, an ERROR row or a nonzero exit fails this test)."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, *args, timeout=120):
    out = tmp_path / "step"
    env = {**os.environ, "TRITON_INTERPRET": "0", "HF_FADAM_CPU_FUSED_BACKEND": "c"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step.py"), "--quick", *args, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md, csv_path = out.with_suffix(".md"), out.with_suffix(".csv")
    assert md.is_file() and csv_path.is_file()
    with csv_path.open() as fh:
        rows = {r["variant"]: r for r in csv.DictReader(fh)}
    return md.read_text(), rows, proc.stdout


def test_step_benchmark_quick(tmp_path):
    text, rows, _ = _run(tmp_path, "--steps", "3")
    assert "| FAIL |" not in text and "| ERROR |" not in text
    assert "| adamw_fused |" in text and "| fadam_fused |" in text
    assert {"fadam_forloop", "fadam_foreach", "fadam_fused", "fadam_default", "adamw_fused"} <= set(rows)
    assert not any(name.startswith(("fadam_bf16", "fadam8bit_bf16")) for name in rows)  # only with --bf16-rounding
    assert all(r["status"] == "OK" for r in rows.values())
    assert all(float(r["median_ms"]) > 0 for r in rows.values())
    # the state column, from the live state tensors (the step counters add 4 B per tensor: < 1e-3 B/param here)
    assert float(rows["fadam_fused"]["state_bytes_per_param"]) == pytest.approx(8.0, abs=1e-3)
    assert float(rows["adamw_fused"]["state_bytes_per_param"]) == pytest.approx(8.0, abs=1e-3)
    assert float(rows["fadam_fused"]["bytes_per_param"]) == 44 and float(rows["adamw_fused"]["bytes_per_param"]) == 28


STORE_ROWS = {  # variant: (param_rounding, state, bytes moved per param, optimizer state bytes per param)
    "fadam_bf16_nearest": ("nearest", "fp32", 32.0, 8.0),
    "fadam_bf16_stochastic": ("stochastic", "fp32", 32.0, 8.0),
    "fadam_bf16_kahan": ("kahan", "fp32", 38.0, 10.0),  # + param_comp, 2 B read in passes B and C, written in C
    "fadam_bf16_stochastic_bf16state": ("stochastic", "bf16", 22.0, 4.0),
    # 8-bit: 2 B of codes + 8 B of scales per 256-element block = 2.03; the quick set's 1792 elements in tensors under
    # 4096 keep fp32 state (+0.045 B/param here) and move 32 B, not 17.08
    "fadam8bit_bf16_nearest": ("nearest", "8-bit", 17.19, 2.077),
    "fadam8bit_bf16_stochastic": ("stochastic", "8-bit", 17.19, 2.077),
    "fadam8bit_bf16_kahan": ("kahan", "8-bit", 23.19, 4.077),
}


def test_step_benchmark_bf16_stores_quick(tmp_path, monkeypatch):
    """--bf16-rounding: a row per store of bf16 params, each on the fused C kernel, exact against the same store on
    the foreach path, with its traffic model and the measured state bytes. In process (torch is imported already)."""
    from hf_fadam.kernels import cpu_fused_8bit

    monkeypatch.setenv("HF_FADAM_CPU_FUSED_BACKEND", "c")
    monkeypatch.setattr(sys, "argv", ["step.py"])
    out = tmp_path / "step"
    args = ["--quick", "--steps", "2", "--warmup", "0", "--flush-mb", "8", "--bw-mb", "16", "--bf16-rounding"]
    threads = torch.get_num_threads()
    try:
        rc = _step_module().main([*args, "--variants", "fadam_fused", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    text = out.with_suffix(".md").read_text()
    with out.with_suffix(".csv").open() as fh:
        rows = {r["variant"]: r for r in csv.DictReader(fh)}
    assert "| FAIL |" not in text and "| ERROR |" not in text
    assert set(rows) == {"fadam_forloop", "fadam_fused", "adamw_fused", *STORE_ROWS}
    for name, (mode, state, moved, held) in STORE_ROWS.items():
        r = rows[name]
        if name.startswith("fadam8bit") and mode != "nearest" and not cpu_fused_8bit.SUPPORTS_ROUNDING:
            assert r["status"] == "SKIP" and "SUPPORTS_ROUNDING is False" in r["note"], r
            continue
        assert r["status"] == "OK", r
        assert r["param_dtype"] == "bf16" and r["param_rounding"] == mode and r["state_dtype"] == state, r
        assert r["implementation"].startswith("fused (C kernel, cpu)"), r
        assert "1 step vs foreach" in r["check"], r
        assert float(r["bytes_per_param"]) == pytest.approx(moved, abs=0.01), name
        assert float(r["state_bytes_per_param"]) == pytest.approx(held, abs=0.002), name
        assert float(r["paired_x_fadam_fused"]) > 0 and float(r["x_adamw_fused"]) > 0
    assert float(rows["fadam_fused"]["state_bytes_per_param"]) == pytest.approx(8.0, abs=1e-3)


def _step_module():
    spec = importlib.util.spec_from_file_location("_bench_step", ROOT / "benchmarks" / "step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_store_rows_skip_without_kernel_rounding(monkeypatch):
    """A kernel without SUPPORTS_ROUNDING skips the stochastic and Kahan rows with the reason (never another path);
    its nearest row runs (the kernel's plain store)."""
    from hf_fadam.kernels import cpu_fused, cpu_fused_8bit

    step = _step_module()
    rows = {v.name: v for v in step.BF16_VARIANTS}
    monkeypatch.setattr(cpu_fused_8bit, "SUPPORTS_ROUNDING", False)
    assert "cpu_fused_8bit.SUPPORTS_ROUNDING is False" in step.skip_reason(rows["fadam8bit_bf16_kahan"], "cpu")
    assert step.skip_reason(rows["fadam8bit_bf16_stochastic"], "cpu")
    assert step.skip_reason(rows["fadam8bit_bf16_nearest"], "cpu") is None
    assert step.skip_reason(rows["fadam_bf16_kahan"], "cpu") is None
    monkeypatch.setattr(cpu_fused, "SUPPORTS_ROUNDING", False)
    assert step.skip_reason(rows["fadam_bf16_stochastic_bf16state"], "cpu")


def test_step_benchmark_layerwise_rows_quick(tmp_path):
    """The gradient-release rows (one fused call per tensor, as backward's hooks make them) pass the benchmark's own
    correctness check against the for-loop reference, on the fused C kernel."""
    text, rows, _ = _run(tmp_path, "--steps", "2", "--variants", "fadam_fused_layerwise,fadam8bit_fused_layerwise")
    assert "| FAIL |" not in text and "| ERROR |" not in text
    for name in ("fadam_fused_layerwise", "fadam8bit_fused_layerwise"):
        assert rows[name]["status"] == "OK" and float(rows[name]["median_ms"]) > 0, rows[name]
        assert "fused (C kernel, cpu)" in rows[name]["implementation"], rows[name]


@pytest.mark.slow
def test_memory_benchmark_quick(tmp_path):
    """benchmarks/memory.py on a 2-layer model: gradient release leaves no gradient after backward and holds less."""
    pytest.importorskip("gguf")
    out = tmp_path / "memory"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--quick", "--out", str(out),
           "--configs", "fadam8bit_bf16,fadam8bit_bf16_layerwise"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with out.with_suffix(".csv").open() as fh:
        rows = {r["config"]: r for r in csv.DictReader(fh)}
    plain, released = rows["fadam8bit_bf16"], rows["fadam8bit_bf16_layerwise"]
    assert plain["grads_alive_after_backward"] != "0" and released["grads_alive_after_backward"] == "0"
    assert float(released["grad_peak_bytes_per_param"]) < float(plain["grad_peak_bytes_per_param"]) == 2.0
    assert float(released["state_bytes_per_param"]) == float(plain["state_bytes_per_param"]) < 2.1
    assert "| **" in out.with_suffix(".md").read_text()
