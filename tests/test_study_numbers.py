"""The convergence study's quoted numbers follow from its committed CSVs, and run.py never drops other runs' rows.

(a) The tables of README.md, benchmarks/convergence/README.md and results_8bit/NOTE.md are re-derived from
``benchmarks/convergence/results*/runs.csv`` with report.py's own loading, learning-rate selection and filtering
(imported, not copied): each quoted mean, std, selected lr, seed count, paired difference and win count must equal
the CSV's value to the quoted number of decimals. The results.md files must hold the tables report.py renders now.
(b) ``run.py`` without ``--resume`` replaces the rows of the runs it redoes and keeps every other run's rows (it
used to delete both CSVs, which lost 20 of the 24 Whisper runs). No training here.
"""

import concurrent.futures
import csv
import importlib.util
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest


ROOT = Path(__file__).resolve().parents[1]
CONV = ROOT / "benchmarks" / "convergence"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


report = _load("convergence_report", CONV / "report.py")

NUM = r"[+-]?\d+(?:\.\d+)?(?:e-?\d+)?"
TASK_OPTS = ("adamw", "fadam", "ptopt_fadam", "fadam_wd0")


# --------------------------------------------------------------------------------------------- (a) quoted numbers
_STUDIES: dict = {}


def study(folder: str):
    """(rows, best lr per (task, optimizer)) of one results folder, as report.py computes them."""
    if folder not in _STUDIES:
        rows = report.load_runs(CONV / folder)
        _STUDIES[folder] = (rows, report.select(rows))
    return _STUDIES[folder]


def tables(path: Path) -> list[list[list[str]]]:
    """Every markdown table of a file: a list of rows, each a list of stripped cells (separator rows left out)."""
    out, cur = [], []
    for line in path.read_text().splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                cur.append(cells)
        elif cur:
            out.append(cur)
            cur = []
    return out


def table_row(path: Path, header_start: str, label: str) -> tuple[list[str], list[str]]:
    """(header, row) of the row whose first cell starts with ``label`` in the table whose header starts so."""
    for t in tables(path):
        if " | ".join(t[0]).startswith(header_start):
            for row in t[1:]:
                if row[0].replace("*", "").startswith(label):
                    return t[0], row
    raise AssertionError(f"{path.name}: no row {label!r} in a table starting {header_start!r}")


def close(quoted: str, value: float) -> bool:
    """Whether ``value`` rounds to ``quoted`` (same number of decimals as quoted)."""
    q = float(quoted)
    mant = quoted.lstrip("+-").split("e")[0]
    decimals = len(mant.split(".")[1]) if "." in mant else 0
    exp = int(quoted.split("e")[1]) if "e" in quoted else 0
    return abs(value - q) <= 0.5 * 10.0 ** (exp - decimals) * (1 + 1e-9) + 1e-12


def quoted_lr(text: str) -> float | None:
    m = re.search(r"\((?:lr )?(\d(?:\.\d+)?e-\d+|0\.\d+)", text)
    return float(m.group(1)) if m else None


def values(folder: str, task: str, opt: str, key: str = "test_metric", lr: float | None = None) -> list[float]:
    rows, best = study(folder)
    lr = best[(task, opt)] if lr is None else lr
    return [r[key] for r in report._at(rows, task, opt, lr) if math.isfinite(r[key])]


def paired(folder: str, task: str, opt: str, base: str = "adamw") -> tuple[list[float], list[float]]:
    """Per-seed (opt - base) test metric at each one's selected lr, and base's values, over the seeds both have."""
    rows, best = study(folder)
    a = {r["seed"]: r["test_metric"] for r in report._at(rows, task, opt, best[(task, opt)])}
    b = {r["seed"]: r["test_metric"] for r in report._at(rows, task, base, best[(task, base)])}
    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]))
    return [a[s] - b[s] for s in seeds], [b[s] for s in seeds]


def check_stats(cell: str, vals: list[float], what: str) -> None:
    """The cell's first ``mean ± std`` (or bare mean) is the mean and sample std of ``vals``."""
    m = re.search(rf"({NUM})(?: ± ({NUM}))?", cell.replace("*", ""))
    assert m, f"{what}: no number in {cell!r}"
    mean, std = float(np.mean(vals)), float(np.std(vals, ddof=1))
    assert close(m.group(1), mean), f"{what}: quoted mean {m.group(1)} but the CSV gives {mean:.6g} ({cell!r})"
    if m.group(2):
        assert close(m.group(2), std), f"{what}: quoted std {m.group(2)} but the CSV gives {std:.6g} ({cell!r})"


def check_paired(cell: str, folder: str, task: str, opt: str, base: str = "adamw", stats: bool = True) -> None:
    """A cell quoting the paired difference to ``base``: mean ± std, relative %, seeds better (or worse) of all.
    With ``stats=False`` only the seed count is checked (a headline cell that adds "better in k/n")."""
    d, b = paired(folder, task, opt, base)
    what = f"{folder} {task} {opt} - {base}"
    if stats:
        check_stats(cell, d, what)
    m = re.search(rf"\(({NUM}) ?%\)", cell)
    if m:
        rel = np.mean(d) / np.mean(b) * 100
        assert close(m.group(1), rel), f"{what}: quoted {m.group(1)} % but the CSV gives {rel:.3f} %"
    m = re.search(r"(better|worse) in (\d+)/(\d+)", cell)
    assert m, f"{what}: no win count in {cell!r}"
    count = sum(x < 0 for x in d) if m.group(1) == "better" else sum(x > 0 for x in d)
    assert (int(m.group(2)), int(m.group(3))) == (count, len(d)), (
        f"{what}: {m.group(0)} but the CSV gives {count}/{len(d)}"
    )


def check_headline(cell: str, folder: str, task: str, opt: str) -> None:
    """A cell quoting the test metric at the selected lr: mean ± std, the lr, a grid-edge note, a win count."""
    rows, best = study(folder)
    check_stats(cell, values(folder, task, opt), f"{folder} {task} {opt}")
    lr = quoted_lr(cell)
    if lr is not None:
        assert lr == best[(task, opt)], f"{folder} {task} {opt}: quoted lr {lr:g}, selected {best[(task, opt)]:g}"
        edge = report._at_edge(rows, task, opt, lr)
        assert ("grid edge" in cell) == edge, f"{folder} {task} {opt}: grid-edge note wrong in {cell!r}"
    if re.search(r"(better|worse) in", cell):
        check_paired(cell, folder, task, opt, stats=False)


README = ROOT / "README.md"
CONV_README = CONV / "README.md"
NOTE = CONV / "results_8bit" / "NOTE.md"

# README.md: the small-scale study table (task rows; columns AdamW, FAdam, pytorch_optimizer FAdam, weight_decay=0)
README_ROWS = [("LM, byte-level GPT", "lm"), ("ASR, CTC on espeak-ng", "asr"), ("VQ-VAE on sklearn digits", "vqvae")]


@pytest.mark.parametrize("label,task", README_ROWS)
def test_readme_study_table(label, task):
    header, row = table_row(README, "Task (held-out metric", label)
    rows, best = study("results")
    for opt, cell in zip(TASK_OPTS, row[1:]):
        check_headline(cell, "results", task, opt)
        n = int(re.search(r"(\d+) seeds", row[0]).group(1))
        assert len(report._at(rows, task, opt, best[(task, opt)])) == n, (task, opt, n)


def test_convergence_readme_table_is_the_report_table():
    """benchmarks/convergence/README.md's results table: lines of report.py's headline table of results/."""
    rows, best = study("results")
    rendered = set(report.headline_table(rows, best).splitlines())
    text = CONV_README.read_text().splitlines()
    start = text.index(next(line for line in text if line.startswith("| Task | Metric")))
    quoted = []
    for line in text[start:]:
        if not line.startswith("|"):
            break
        quoted.append(line)
    assert len(quoted) == 2 + sum(2 + len(report.EXTRAS[t]) for t in ("lm", "asr", "vqvae"))
    missing = [line for line in quoted if line not in rendered]
    assert not missing, "not what report.py renders from results/runs.csv:\n" + "\n".join(missing)


# benchmarks/convergence/README.md, the Whisper fine-tune: the headline table and the by-lr table
WHISPER_ROWS = [("torch AdamW (lr", "adamw"), ("hf_fadam FAdam (lr", "fadam")]


@pytest.mark.parametrize("label,opt", WHISPER_ROWS)
def test_whisper_table(label, opt):
    header, row = table_row(CONV_README, "Optimizer (selected lr)", label)
    rows, best = study("results")
    assert quoted_lr(row[0]) == best[("whisper", opt)], row[0]
    assert len(values("results", "whisper", opt)) == 3
    check_stats(row[1], values("results", "whisper", opt), f"whisper {opt} test WER")
    check_stats(row[2], values("results", "whisper", opt, "test_cer"), f"whisper {opt} CER")
    check_stats(row[3], values("results", "whisper", opt, "test_librivox_wer"), f"whisper {opt} LibriVox WER")
    before = re.search(rf"before: ({NUM})", header[3]).group(1)
    check_stats(before, values("results", "whisper", opt, "before_librivox_wer"), "LibriVox WER before")
    if opt != "adamw":
        check_paired(row[4], "results", "whisper", opt)


@pytest.mark.parametrize("label,opt", [("torch AdamW", "adamw"), ("hf_fadam FAdam", "fadam")])
def test_whisper_by_lr_table(label, opt):
    header, row = table_row(CONV_README, "lr | 3e-5", label)
    for lr_text, cell in zip(header[1:], row[1:]):
        lr = float(lr_text)
        wer, librivox = re.findall(NUM, cell.replace("*", ""))
        check_stats(wer, values("results", "whisper", opt, lr=lr), f"whisper {opt} lr {lr:g}")
        check_stats(librivox, values("results", "whisper", opt, "test_librivox_wer", lr=lr), f"LibriVox {opt} {lr:g}")
        assert cell.startswith("**") == (lr == study("results")[1][("whisper", opt)]), cell


# results_8bit/NOTE.md: FAdam vs FAdam8bit, 10 seeds on each task, paired 8-bit minus FAdam
NOTE_ROWS = [("LM test loss", "lm"), ("speech test WER", "asr"), ("VQ-VAE test MSE", "vqvae")]


@pytest.mark.parametrize("label,task", NOTE_ROWS)
def test_8bit_note_table(label, task):
    header, row = table_row(NOTE, "task | FAdam | FAdam8bit", label)
    rows, best = study("results_8bit")
    for opt, cell in (("fadam", row[1]), ("fadam_8bit", row[2])):
        check_headline(cell, "results_8bit", task, opt)
        assert len(values("results_8bit", task, opt)) == 10
    check_paired(row[4], "results_8bit", task, "fadam_8bit", base="fadam")


def test_quoted_run_counts():
    rows, _ = study("results")
    study_runs = sum(r["task"] in ("lm", "asr", "vqvae") for r in rows)
    whisper_runs = sum(r["task"] == "whisper" for r in rows)
    assert re.search(r"`; (\d+) runs, ~2 CPU-hours", README.read_text()).group(1) == str(study_runs)
    text = CONV_README.read_text()
    assert re.search(r"Measured 2026-12-01 \((\d+) runs", text).group(1) == str(whisper_runs) == "24"
    assert f"(3 seeds each; {whisper_runs} runs)" in text
    # FAdam8bit behind FAdam in "4, 4 and 5 of 10" paired seeds (README and docs/8bit.md)
    behind = [sum(x > 0 for x in paired("results_8bit", t, "fadam_8bit", "fadam")[0]) for t in ("lm", "asr", "vqvae")]
    quoted = f"{behind[0]}, {behind[1]} and {behind[2]} of 10"
    assert quoted in README.read_text() and quoted in (ROOT / "docs" / "8bit.md").read_text(), quoted


@pytest.mark.parametrize("folder", ["results", "results_8bit"])
def test_results_md_is_current(folder):
    """results.md holds the tables report.py renders from the committed runs.csv (rerun report.py if not)."""
    rows, best = study(folder)
    text = (CONV / folder / "results.md").read_text()
    assert report.headline_table(rows, best) in text
    assert report.sweep_table(rows, best) in text
    assert f"; {len(rows)} runs;" in text


@pytest.mark.parametrize("name", ["results/runs.csv", "results_8bit/runs.csv", "results/curves.csv"])
def test_one_row_set_per_run(name):
    """No run twice in runs.csv; curves.csv has the curves of exactly the runs in runs.csv."""
    with (CONV / name).open(newline="") as f:
        rows = list(csv.DictReader(f))
    keys = [(r["task"], r["optimizer"], float(r["lr"]), int(r["seed"]), r["mode"]) for r in rows]
    if name.endswith("runs.csv"):
        assert len(keys) == len(set(keys))
    else:
        runs = {(r["task"], r["optimizer"], r["lr"], r["seed"], r["mode"]) for r in study("results")[0]}
        assert set(keys) == runs
        assert len(keys) == len({(*k, r["split"], r["step"]) for k, r in zip(keys, rows)})


# ----------------------------------------------------------------------------------- (b) run.py keeps other runs
@pytest.fixture(scope="module")
def run_mod():
    pytest.importorskip("torch")  # run.py imports the task helpers, which import torch
    return _load("convergence_run", CONV / "run.py")


def _run_row(run_mod, task, opt, lr, seed, mode, val):
    row = dict.fromkeys(run_mod.RUN_COLUMNS, "")
    row.update(task=task, optimizer=opt, lr=lr, seed=seed, mode=mode, metric=run_mod.METRICS[task])
    row.update(val_metric=val, test_metric=val, finite=True, wall_s=1.0, cpu_s=1.0, threads=1)
    return row


def _curve_rows(task, opt, lr, seed, mode, loss):
    return [
        dict(task=task, optimizer=opt, lr=lr, seed=seed, mode=mode, split="train", step=s, loss=loss) for s in (1, 2)
    ]


def _write(path, columns, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _read(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_drop_runs_keeps_other_tasks(run_mod, tmp_path):
    path = tmp_path / "runs.csv"
    lm = [_run_row(run_mod, "lm", o, 0.003, s, "full", 2.0 + s) for o in ("adamw", "fadam") for s in (0, 1)]
    vq = [_run_row(run_mod, "vqvae", o, 0.003, s, "full", 0.01) for o in ("adamw", "fadam") for s in (0, 1)]
    _write(path, run_mod.RUN_COLUMNS, lm[:2] + vq + lm[2:])
    before = path.read_text()
    redo = {("vqvae", o, 0.003, s, "full") for o in ("adamw", "fadam") for s in (0, 1)}
    assert run_mod._drop_runs(path, redo) == 4
    after = _read(path)
    assert [r["task"] for r in after] == ["lm"] * 4
    lm_lines = [line for line in before.splitlines(keepends=True) if line.startswith("lm,")]
    assert path.read_text() == before.splitlines(keepends=True)[0] + "".join(lm_lines)  # byte for byte
    assert run_mod._drop_runs(path, redo) == 0 and path.read_text() != ""


class _InlineExecutor:
    """ProcessPoolExecutor's shape, running each job at once in this process."""

    def __init__(self, max_workers=None, mp_context=None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        fut = concurrent.futures.Future()
        fut.set_result(fn(*args))
        return fut


def test_rerun_without_resume_keeps_other_tasks(run_mod, tmp_path, monkeypatch):
    """``run.py --tasks vqvae`` (no --resume) into a folder that holds lm and vqvae runs: the lm runs stay as they
    were, the vqvae run is replaced (one row, the new result), and its curves likewise."""
    out = tmp_path / "out"
    out.mkdir()
    lr = run_mod.QUICK_LR["vqvae"]
    old = [_run_row(run_mod, "lm", "adamw", run_mod.QUICK_LR["lm"], 0, "quick", 2.5)]
    old.append(_run_row(run_mod, "vqvae", "adamw", lr, 0, "quick", 0.9))
    _write(out / "runs.csv", run_mod.RUN_COLUMNS, old)
    _write(
        out / "curves.csv",
        run_mod.CURVE_COLUMNS,
        _curve_rows("lm", "adamw", run_mod.QUICK_LR["lm"], 0, "quick", 3.0)
        + _curve_rows("vqvae", "adamw", lr, 0, "quick", 9.0),
    )
    lm_run, lm_curves = _read(out / "runs.csv")[0], _read(out / "curves.csv")[:2]

    def fake_run_one(spec):
        mode = "quick" if spec["quick"] else "full"
        row = _run_row(run_mod, spec["task"], spec["optimizer"], spec["lr"], spec["seed"], mode, 0.1)
        return row, _curve_rows(spec["task"], spec["optimizer"], spec["lr"], spec["seed"], mode, 1.0)

    monkeypatch.setattr(run_mod, "_run_one", fake_run_one)
    monkeypatch.setattr(run_mod, "ProcessPoolExecutor", _InlineExecutor)
    monkeypatch.setitem(sys.modules, "report", types.SimpleNamespace(write_report=lambda out: None))
    args = ["--quick", "--tasks", "vqvae", "--optimizers", "adamw", "--out", str(out), "--cache-dir", str(tmp_path)]
    assert run_mod.main(args) == 0

    runs, curves = _read(out / "runs.csv"), _read(out / "curves.csv")
    assert [r for r in runs if r["task"] == "lm"] == [lm_run]
    assert [c for c in curves if c["task"] == "lm"] == lm_curves
    vq = [r for r in runs if r["task"] == "vqvae"]
    assert len(vq) == 1 and float(vq[0]["val_metric"]) == 0.1
    assert [float(c["loss"]) for c in curves if c["task"] == "vqvae"] == [1.0, 1.0]


# ----------------------------------------------------------------------------------------------------------------------
# the pure-bf16 study (bf16_clm.py): README, the study README and docs/precision.md quote results_bf16/runs.csv
# ----------------------------------------------------------------------------------------------------------------------

bf16_report = _load("bf16_report", CONV / "bf16_report.py")
BF16_ROWS = {
    "bf16, `nearest`": "nearest",
    "bf16, `stochastic`": "stochastic",
    "bf16, `kahan`": "kahan",
    "bf16 + fp32 master copy": "fp32_master",
    "fp32 weights and compute": "fp32",
}


def _bf16_cells() -> dict:
    runs, _ = bf16_report.load(CONV / "results_bf16")
    return bf16_report.summarize(runs)


@pytest.mark.parametrize("doc", ["README.md", "benchmarks/convergence/README.md"])
def test_bf16_study_tables_follow_the_csv(doc):
    cells = _bf16_cells()
    text = (ROOT / doc).read_text()
    checked = 0
    for line in text.splitlines():
        label = next((k for k in BF16_ROWS if line.startswith(f"| {k}")), None)
        if label is None:
            continue
        quoted = re.findall(rf"({NUM}) ± ({NUM})", line)
        for optimizer, (mean, std) in zip(("fadam", "fadam_8bit"), quoted):
            cell = cells[(1e-4, optimizer, BF16_ROWS[label])]
            assert cell["n"] == 3
            assert round(cell["ppl_mean"], 2) == float(mean), (doc, line)
            assert round(cell["ppl_std"], 2) == float(std), (doc, line)
            checked += 1
    assert checked == 9, checked


def test_bf16_study_numbers_in_precision_doc_and_shares():
    cells = _bf16_cells()
    text = (ROOT / "docs" / "precision.md").read_text()
    for weights, quoted in (("nearest", "64.19"), ("kahan", "37.30"), ("fp32_master", "37.28"), ("stochastic", "34.40"),
                            ("fp32", "34.35")):  # fmt: skip
        assert f"{cells[(1e-4, 'fadam', weights)]['ppl_mean']:.2f}" == quoted and quoted in text
    readme = (CONV / "README.md").read_text()
    for weights, quoted in (("nearest", "0.23"), ("stochastic", "1.11"), ("kahan", "1.00")):
        assert f"{bf16_report.share(cells, 1e-4, 'fadam', weights):.2f}" == quoted
        assert f"| {quoted} |" in readme
    # gradient release: the same held-out NLL per seed as the plain FAdam8bit runs
    runs, _ = bf16_report.load(CONV / "results_bf16")
    nll = {(r["optimizer"], r["seed"]): r["test_nll"] for r in runs if r["weights"] == "stochastic" and r["lr"] == "0.0001"}
    assert [nll[("fadam_8bit_layerwise", s)] for s in "012"] == [nll[("fadam_8bit", s)] for s in "012"]


def test_bf16_study_2e5_numbers_follow_the_csv():
    cells = _bf16_cells()
    quoted = {"nearest": "75.05", "kahan": "69.31", "fp32_master": "69.35", "stochastic": "54.95", "fp32": "54.62"}
    for weights, value in quoted.items():
        assert f"{cells[(2e-5, 'fadam', weights)]['ppl_mean']:.2f}" == value
        assert cells[(2e-5, "fadam", weights)]["n"] == 3
    for doc in ("README.md", "docs/precision.md", "benchmarks/convergence/README.md"):
        text = (ROOT / doc).read_text()
        assert all(v in text for v in quoted.values()), doc
