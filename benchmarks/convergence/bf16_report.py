"""Turns the pure-bf16 study's runs.csv and curves.csv (bf16_clm.py) into results.md and bf16_clm.png.

Per learning rate, one row per (optimizer, weights): held-out perplexity after the fine-tune, mean ± sample std over
seeds; the share of the fp32-master run's progress that the arm keeps, ``(NLL_before − NLL) / (NLL_before −
NLL_fp32_master)`` from the seed means of held-out NLL (1.0: all of it; 0: none); the optimizer state's bytes per
parameter (``param_comp`` included; an fp32 master copy's 4 B/param are not optimizer state and are listed apart).

    python benchmarks/convergence/bf16_report.py --out benchmarks/convergence/results_bf16
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path


OPTIMIZER_LABELS = {
    "fadam": "FAdam",
    "fadam_8bit": "FAdam8bit",
    "fadam_layerwise": "FAdam, gradient release",
    "fadam_8bit_layerwise": "FAdam8bit, gradient release",
}
WEIGHT_LABELS = {
    "nearest": "bf16, `nearest`",
    "stochastic": "bf16, `stochastic`",
    "kahan": "bf16, `kahan`",
    "fp32_master": "bf16 + fp32 master copy",
    "fp32": "fp32 (weights and compute)",
}
ORDER_W = tuple(WEIGHT_LABELS)
ORDER_O = tuple(OPTIMIZER_LABELS)
MASTER_BYTES = {"fp32_master": 4.0}  # the master copy: memory outside the optimizer state


def load(out: Path) -> tuple[list[dict], list[dict]]:
    with open(out / "runs.csv", newline="") as fh:
        runs = list(csv.DictReader(fh))
    curves_path = out / "curves.csv"
    curves = list(csv.DictReader(open(curves_path, newline=""))) if curves_path.exists() else []
    return runs, curves


def summarize(runs: list[dict]) -> dict:
    """(lr, optimizer, weights) -> dict(n, ppl mean/std, nll mean, before nll, state bytes)."""
    cells = defaultdict(list)
    for r in runs:
        cells[(float(r["lr"]), r["optimizer"], r["weights"])].append(r)
    table = {}
    for key, rows in cells.items():
        finite = [r for r in rows if r["finite"] == "1"]
        ppl = [float(r["test_ppl"]) for r in finite]
        table[key] = {
            "n": len(rows),
            "diverged": len(rows) - len(finite),
            "ppl_mean": statistics.mean(ppl) if ppl else math.nan,
            "ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else math.nan,
            "nll_mean": statistics.mean(float(r["test_nll"]) for r in finite) if finite else math.nan,
            "before_nll": statistics.mean(math.log(float(r["before_ppl"])) for r in rows),
            "before_ppl": statistics.mean(float(r["before_ppl"]) for r in rows),
            "state": statistics.mean(float(r["state_bytes_per_param"]) for r in rows),
        }
    return table


def share(table: dict, lr: float, optimizer: str, weights: str) -> float:
    """The arm's held-out NLL gain over the fp32-master arm's of the same optimizer (FAdam's for the layerwise)."""
    cell = table[(lr, optimizer, weights)]
    base_opt = optimizer.removesuffix("_layerwise")
    master = table.get((lr, base_opt, "fp32_master"))
    if master is None:
        return math.nan
    gain = master["before_nll"] - master["nll_mean"]
    return (cell["before_nll"] - cell["nll_mean"]) / gain if gain > 0 else math.nan


def render(runs: list[dict]) -> str:
    table = summarize(runs)
    first = runs[0]
    lines = [
        "# Pure-bf16 fine-tuning of SmolLM2-135M: what each `param_rounding` keeps",
        "",
        f"Model: {first['model']}; data: examples/data/reviews (252 training and 62 held-out sentences, blocks of 64 "
        "tokens); batch 8, 3 epochs, 2 warm-up steps then linear decay, weight decay 0.1 on 2-D tensors, FAdam "
        "defaults otherwise. Every bf16 arm runs the same bf16 forward and backward. Held-out perplexity: every "
        "held-out token, after the last epoch, of the model in its training dtype. Mean ± sample std over seeds "
        "(the seed orders the batches). Runs: "
        + ", ".join(sorted({f"torch {r['torch']}, transformers {r['transformers']}, {r['date']}" for r in runs}))
        + ". Produced by `bf16_clm.py`; this file by `bf16_report.py`.",
        "",
    ]
    for lr in sorted({k[0] for k in table}, reverse=True):
        before = statistics.mean(c["before_ppl"] for k, c in table.items() if k[0] == lr and k[2] != "fp32")
        lines += [
            f"## Peak learning rate {lr:g}",
            "",
            f"Held-out perplexity before fine-tuning: {before:.2f} (bf16 weights; the fp32 arm starts from the same "
            "weights, evaluated in fp32).",
            "",
            "| optimizer | weights | held-out perplexity | share of the fp32-master gain | optimizer state B/param "
            "| seeds |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for optimizer in ORDER_O:
            for weights in ORDER_W:
                cell = table.get((lr, optimizer, weights))
                if cell is None:
                    continue
                std = "" if math.isnan(cell["ppl_std"]) else f" ± {cell['ppl_std']:.2f}"
                state = f"{cell['state']:.2f}" + (
                    f" (+{MASTER_BYTES[weights]:.0f} master)" if weights in MASTER_BYTES else ""
                )
                s = share(table, lr, optimizer, weights)
                seeds = f"{cell['n']}" + (f" ({cell['diverged']} diverged)" if cell["diverged"] else "")
                lines.append(
                    f"| {OPTIMIZER_LABELS[optimizer]} | {WEIGHT_LABELS[weights]} | {cell['ppl_mean']:.2f}{std} | "
                    f"{'' if math.isnan(s) else f'{s:.2f}'} | {state} | {seeds} |"
                )
        lines.append("")
    lines.append("![held-out perplexity after each epoch](bf16_clm.png)")
    return "\n".join(lines) + "\n"


def plot(curves: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(lambda: defaultdict(list))
    for c in curves:
        if c["kind"] == "test_nll":
            series[(float(c["lr"]), c["optimizer"], c["weights"])][int(c["step"])].append(math.exp(float(c["value"])))
    panels = sorted({(k[0], k[1].removesuffix("_layerwise")) for k in series}, key=lambda k: (-k[0], k[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    styles = {"nearest": "tab:gray", "stochastic": "tab:orange", "kahan": "tab:red", "fp32_master": "tab:blue",
              "fp32": "black"}  # fmt: skip
    for ax, (lr, optimizer) in zip(axes[0], panels):
        for (lr_k, opt_k, weights), by_step in sorted(series.items()):
            if lr_k != lr or opt_k.removesuffix("_layerwise") != optimizer:
                continue
            steps = sorted(by_step)
            mean = [statistics.mean(by_step[s]) for s in steps]
            label = WEIGHT_LABELS[weights] + (" (layerwise)" if opt_k.endswith("_layerwise") else "")
            ax.plot(steps, mean, marker="o", color=styles[weights], label=label,
                    linestyle="--" if opt_k.endswith("_layerwise") else "-")  # fmt: skip
        ax.set_title(f"{OPTIMIZER_LABELS[optimizer]}, lr {lr:g}")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out perplexity")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    runs, curves = load(args.out)
    (args.out / "results.md").write_text(render(runs))
    if curves:
        plot(curves, args.out / "bf16_clm.png")
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
