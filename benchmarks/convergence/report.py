"""Turns runs.csv and curves.csv of the convergence study into results.md and one loss-curve PNG per task.

Selection: for each task and optimizer, the learning rate with the lowest mean *validation* metric over seeds (a
learning rate where any seed diverged is not eligible); the headline table reports the *test* metric at that
learning rate, mean ± sample std over seeds. Seeds are paired across optimizers (same initial weights and the same
batches), so the comparison with AdamW also gives the per-seed difference and how many seeds FAdam won.

    python benchmarks/convergence/report.py --out benchmarks/convergence/results
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path

import numpy as np


TASK_TITLES = {
    "lm": "Language modelling (byte-level GPT, CPython docs)",
    "asr": "Speech recognition (CTC, espeak-ng speech)",
    "vqvae": "VQ-VAE (sklearn digits)",
    "whisper": "Whisper tiny.en fine-tune (decoder, espeak-ng speech, held-out voices)",
}
METRIC_NAMES = {"lm": "test loss (nats/byte)", "asr": "test WER", "vqvae": "test recon MSE", "whisper": "test WER"}
EXTRAS = {
    "lm": (("test_ppl", "test perplexity"),),
    "asr": (("test_cer", "test CER"), ("test_ctc_loss", "test CTC loss")),
    "vqvae": (
        ("test_code_usage", "codebook usage (fraction of the 32 codes)"),
        ("test_code_perplexity", "code perplexity"),
    ),
    "whisper": (
        ("test_cer", "test CER"),
        ("before_test_wer", "test WER of the pretrained model (before fine-tuning)"),
        ("test_librivox_wer", "LibriVox WER (human speech, 5 clips)"),
        ("before_librivox_wer", "LibriVox WER of the pretrained model (before fine-tuning)"),
    ),
}
LABELS = {
    "adamw": "torch AdamW",
    "fadam": "hf_fadam FAdam",
    "ptopt_fadam": "pytorch_optimizer FAdam",
    "fadam_wd0": "hf_fadam FAdam, weight_decay=0",
    "fadam_8bit": "hf_fadam FAdam8bit (8-bit state)",
}
ORDER = ("adamw", "fadam", "ptopt_fadam", "fadam_wd0", "fadam_8bit")
COLORS = {"adamw": "tab:blue", "fadam": "tab:red", "ptopt_fadam": "tab:green", "fadam_wd0": "tab:purple"}
COLORS["fadam_8bit"] = "tab:orange"
STYLES = {
    "adamw": "-",
    "fadam": "-",
    "ptopt_fadam": "--",
    "fadam_wd0": ":",
    "fadam_8bit": "-.",
}  # the two FAdams often overlap: keep both visible
LOG_Y = {"lm": False, "asr": True, "vqvae": True, "whisper": False}


def _float(x: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _fmt(values: list[float], digits: int = 4) -> str:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return "diverged"
    mean = float(np.mean(vals))
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
    s = f"{mean:.{digits}g} ± {std:.2g}" if math.isfinite(std) else f"{mean:.{digits}g}"
    return s + (f" ({len(vals)}/{len(values)} finite)" if len(vals) < len(values) else "")


def load_runs(out: Path) -> list[dict]:
    with (out / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["lr"] = float(r["lr"])
        r["seed"] = int(r["seed"])
        for k in (
            "val_metric",
            "test_metric",
            "wall_s",
            "cpu_s",
            *(key for extra in EXTRAS.values() for key, _ in extra),
        ):
            r[k] = _float(r.get(k, ""))
        r["finite"] = r["finite"] == "True" and math.isfinite(r["val_metric"])
    return rows


def select(rows: list[dict]) -> dict:
    """{(task, optimizer): best lr} by the mean validation metric over seeds."""
    by = defaultdict(list)
    for r in rows:
        by[(r["task"], r["optimizer"], r["lr"])].append(r)
    best: dict = {}
    for (task, opt, lr), rs in sorted(by.items()):
        score = float(np.mean([r["val_metric"] for r in rs])) if all(r["finite"] for r in rs) else math.inf
        if (task, opt) not in best or score < best[(task, opt)][1]:
            best[(task, opt)] = (lr, score)
    return {k: v[0] for k, v in best.items()}


def _at(rows: list[dict], task: str, opt: str, lr: float) -> list[dict]:
    return sorted(
        (r for r in rows if r["task"] == task and r["optimizer"] == opt and r["lr"] == lr), key=lambda r: r["seed"]
    )


def _at_edge(rows: list[dict], task: str, opt: str, lr: float) -> bool:
    """Whether ``lr`` is the lowest or highest of the grid (the optimum may then lie outside the grid)."""
    grid = sorted({r["lr"] for r in rows if r["task"] == task and r["optimizer"] == opt})
    return len(grid) > 2 and lr in (grid[0], grid[-1])


def _paired(rows: list[dict], task: str, opt: str, lr: float, base_lr: float) -> str:
    """Mean ± std of (optimizer − AdamW) over the seeds both have, and the seeds where the optimizer is better."""
    a = {r["seed"]: r["test_metric"] for r in _at(rows, task, opt, lr)}
    b = {r["seed"]: r["test_metric"] for r in _at(rows, task, "adamw", base_lr)}
    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]))
    if not seeds:
        return "n/a"
    d = [a[s] - b[s] for s in seeds]
    wins = sum(x < 0 for x in d)
    std = f" ± {np.std(d, ddof=1):.2g}" if len(d) > 1 else ""
    rel = np.mean(d) / np.mean([b[s] for s in seeds]) * 100
    return f"{np.mean(d):+.3g}{std} ({rel:+.1f}%), better in {wins}/{len(d)} seeds"


def headline_table(rows: list[dict], best: dict) -> str:
    cols = [o for o in ORDER if any(r["optimizer"] == o for r in rows)]

    def line(task_cell: str, name: str, cells: dict) -> str:
        return f"| {task_cell} | {name} | " + " | ".join(cells.get(o, "–") for o in cols) + " |"

    lines = [
        "| Task | Metric (lower is better unless noted) | " + " | ".join(LABELS[o] for o in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for task in [t for t in TASK_TITLES if any(r["task"] == t for r in rows)]:
        opts = [o for o in cols if (task, o) in best]
        cells = {
            o: _fmt([r["test_metric"] for r in _at(rows, task, o, best[(task, o)])])
            + f" (lr {best[(task, o)]:g}{', at the grid edge' if _at_edge(rows, task, o, best[(task, o)]) else ''})"
            for o in opts
        }
        lines.append(line(TASK_TITLES[task], f"**{METRIC_NAMES[task]}**", cells))
        for key, name in EXTRAS[task]:
            note = " (higher = more codes alive)" if key.startswith("test_code") else ""
            cells = {o: _fmt([r[key] for r in _at(rows, task, o, best[(task, o)])]) for o in opts}
            lines.append(line("", name + note, cells))
        if (task, "adamw") in best:
            cells = {o: _paired(rows, task, o, best[(task, o)], best[(task, "adamw")]) for o in opts if o != "adamw"}
            lines.append(line("", f"{METRIC_NAMES[task]}: difference to AdamW, paired by seed", cells))
    return "\n".join(lines)


def sweep_table(rows: list[dict], best: dict) -> str:
    lines = [
        "| Task | Optimizer | lr | seeds | val metric | test metric | wall s/run | CPU s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted(
        {(r["task"], r["optimizer"], r["lr"]) for r in rows},
        key=lambda k: (list(TASK_TITLES).index(k[0]), ORDER.index(k[1]), k[2]),
    )
    for task, opt, lr in keys:
        rs = _at(rows, task, opt, lr)
        mark = ""
        if best.get((task, opt)) == lr:
            mark = " **(selected, at the grid edge)**" if _at_edge(rows, task, opt, lr) else " **(selected)**"
        lines.append(
            f"| {task} | {LABELS[opt]} | {lr:g}{mark} | {len(rs)} | {_fmt([r['val_metric'] for r in rs])} | "
            f"{_fmt([r['test_metric'] for r in rs])} | {np.mean([r['wall_s'] for r in rs]):.0f} | "
            f"{np.mean([r['cpu_s'] for r in rs]):.0f} |"
        )
    return "\n".join(lines)


def plot_curves(out: Path, rows: list[dict], best: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (out / "curves.csv").open() as f:
        curves = list(csv.DictReader(f))
    series = defaultdict(lambda: defaultdict(dict))  # (task, opt, lr, split) -> seed -> step -> loss
    for c in curves:
        series[(c["task"], c["optimizer"], float(c["lr"]), c["split"])][int(c["seed"])][int(c["step"])] = _float(
            c["loss"]
        )
    paths = []
    for task in TASK_TITLES:
        opts = [o for o in ORDER if (task, o) in best]
        if not opts:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, split in zip(axes, ("train", "val")):
            for opt in opts:
                by_seed = series[(task, opt, best[(task, opt)], split)]
                if not by_seed:
                    continue
                steps = sorted(set.intersection(*(set(s) for s in by_seed.values())))
                y = np.array([[by_seed[s][t] for t in steps] for s in sorted(by_seed)])
                mean, std = np.nanmean(y, 0), (np.nanstd(y, 0, ddof=1) if len(y) > 1 else np.zeros(len(steps)))
                label = f"{LABELS[opt]} (lr {best[(task, opt)]:g}, {len(y)} seed{'s' if len(y) > 1 else ''})"
                ax.plot(steps, mean, STYLES[opt], color=COLORS[opt], label=label)
                ax.fill_between(steps, mean - std, mean + std, color=COLORS[opt], alpha=0.2)
            if LOG_Y[task]:
                ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel("train loss (interval mean)" if split == "train" else "validation loss")
            ax.grid(alpha=0.3, which="both")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{TASK_TITLES[task]}: mean ± std over seeds, each optimizer at its selected lr")
        fig.tight_layout()
        path = out / f"{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(out: Path) -> Path:
    out = Path(out)
    rows = load_runs(out)
    best = select(rows)
    plots = plot_curves(out, rows, best)
    r0 = rows[0]
    seeds = sorted({r["seed"] for r in rows})
    cpu_total = sum(r["cpu_s"] for r in rows)
    wall_total = sum(r["wall_s"] for r in rows)
    text = [
        "# Convergence study: FAdam vs AdamW",
        "",
        f"Mode `{r0['mode']}`; {len(rows)} runs; seeds {seeds}; torch {r0['torch']}, Python {r0['python']}, "
        f"{r0['machine']}, {r0['threads']} thread per run. Sum over runs: {wall_total / 60:.1f} min wall, "
        f"{cpu_total / 60:.1f} min CPU.",
        "",
        "Test metric at the learning rate that each optimizer's validation metric selected; mean ± sample std over "
        "seeds. The difference row pairs each seed with AdamW's run on the same seed (negative = lower than AdamW).",
        "",
        headline_table(rows, best),
        "",
        "## Full learning-rate sweep",
        "",
        sweep_table(rows, best),
        "",
        "## Loss curves",
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
        "",
    ]
    path = out / "results.md"
    path.write_text("\n".join(text))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    print(write_report(Path(p.parse_args().out)))


if __name__ == "__main__":
    main()
