#!/usr/bin/env python3
"""GPU check of FAdam8bit's compiled Triton kernel (under 3 minutes on one GPU):

    TRITON_INTERPRET=0 python benchmarks/gpu_8bit_check.py [--out benchmarks/results/gpu_8bit]

1. Correctness: one step of ``fadam8bit_triton_`` from a random quantized state against the dequantize → FAdam
   (foreach) → quantize reference on the same CUDA tensors, for fp32 and bf16 params, weight decay on and off, a
   reduce hook and an fp32-state small tensor: θ within fp32 tolerance, codes equal except a few off by one.
2. Speed and memory: FAdam(fused=True) against FAdam8bit(fused=True) on the 50.9M-param transformer set
   (``benchmarks/step.py``'s ``transformer_shapes``): median step time over 30 steps (CUDA events), the ratio,
   and the optimizer state bytes per parameter.
Exits non-zero when a check fails. Writes ``<out>.md`` when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path


os.environ.setdefault("TRITON_INTERPRET", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from hf_fadam import FAdam, FAdam8bit  # noqa: E402
from hf_fadam._quant import quantize_blockwise  # noqa: E402
from hf_fadam._quant_step import _dequantized_step  # noqa: E402
from hf_fadam.kernels.triton_fadam8bit import fadam8bit_triton_  # noqa: E402


HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, clip=1.0, p=0.5, maximize=False)


def _state(dtype, seed=0, block=256):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1000, 300), (4096,), (77,), (513, 129)]
    P, G, M, F, MS, FS, S = [], [], [], [], [], [], []
    for k, shape in enumerate(shapes):
        P.append((torch.randn(shape, generator=gen) * 0.1).to(dtype).cuda())
        G.append((torch.randn(shape, generator=gen) * 10.0 ** (k % 3 - 3)).to(dtype).cuda())
        m = torch.randn(shape, generator=gen) * 0.1
        f = (torch.randn(shape, generator=gen) * 10.0 ** (k % 3 - 3)) ** 2
        if m.numel() >= 4096:
            mc, msc = quantize_blockwise(m, block, True)
            fc, fsc = quantize_blockwise(f.sqrt(), block, False)
            M.append(mc.cuda()), F.append(fc.cuda()), MS.append(msc.cuda()), FS.append(fsc.cuda())
        else:
            M.append(m.cuda()), F.append(f.cuda()), MS.append(None), FS.append(None)
        S.append(torch.tensor(5.0, device="cuda"))
    return [P, G, M, F, MS, FS, S]


def _clone(state):
    return [[None if t is None else t.clone() for t in lst] for lst in state]


def check_correctness() -> list[str]:
    failures = []
    for dtype in (torch.float32, torch.bfloat16):
        for wd in (0.1, 0.0):
            for use_reduce in (False, True):
                state = _state(dtype)
                ref, out = _clone(state), _clone(state)
                _dequantized_step(*ref, block_size=256, foreach=True, numels=None, reduce=None,
                                  weight_decay=wd, **HYPER)  # fmt: skip
                calls: list = []

                def record(buf, calls=calls):
                    calls.append(buf.shape)

                torch._foreach_add_(out[-1], 1)
                fadam8bit_triton_(*out, block_size=256, weight_decay=wd, **HYPER,
                                  reduce=record if use_reduce else None)  # fmt: skip
                torch.cuda.synchronize()
                tag = f"{dtype}, wd={wd}, reduce={use_reduce}"
                if use_reduce and len(calls) != 2:
                    failures.append(f"{tag}: reduce called {len(calls)} times")
                tol = 1e-5 if dtype == torch.float32 else 1e-2
                for i in range(len(ref[0])):
                    if not torch.allclose(out[0][i].float(), ref[0][i].float(), atol=tol, rtol=tol):
                        err = (out[0][i].float() - ref[0][i].float()).abs().max().item()
                        failures.append(f"{tag}: θ[{i}] max err {err:.2e}")
                    if ref[5][i] is None:
                        continue
                    for a, b, name in ((out[2][i], ref[2][i], "m"), (out[3][i], ref[3][i], "f")):
                        diff = (a.int() - b.int()).abs()
                        frac = diff.ne(0).float().mean().item()
                        if diff.max() > 1 or frac > 2e-3:
                            failures.append(
                                f"{tag}: {name} codes[{i}] max diff {diff.max().item()}, {frac:.1e} differ"
                            )
                print(f"  correctness {tag}: {'ok' if not failures else 'FAIL so far'}", flush=True)
    return failures


def bench(steps: int = 30) -> dict:
    from step import make_params, transformer_shapes

    out = {}
    shapes = transformer_shapes()
    numel = sum(torch.Size(s).numel() for s in shapes)
    for name, build in (("fadam_fused", lambda ps: FAdam(ps, fused=True)),
                        ("fadam8bit_fused", lambda ps: FAdam8bit(ps, fused=True))):  # fmt: skip
        params = make_params(shapes, "cuda", torch.float32)
        opt = build(params)
        for _ in range(3):
            opt.step()
        torch.cuda.synchronize()
        ts = []
        for _ in range(steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            opt.step()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        sb = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
        out[name] = (statistics.median(ts), sb / numel, opt.describe_implementation())
        print(f"  {name}: median {out[name][0]:.3f} ms, state {out[name][1]:.2f} B/param, {out[name][2]}", flush=True)
        del opt, params
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    print(f"GPU: {torch.cuda.get_device_name()}", flush=True)
    failures = check_correctness()
    res = bench()
    ratio = res["fadam8bit_fused"][0] / res["fadam_fused"][0]
    lines = [
        f"## FAdam8bit on {torch.cuda.get_device_name()} (transformer set, fp32 params)",
        "",
        "| variant | median ms | state B/param | implementation |",
        "|---|---|---|---|",
        *[f"| {k} | {v[0]:.3f} | {v[1]:.2f} | {v[2]} |" for k, v in res.items()],
        "",
        f"ratio FAdam8bit / FAdam (fused): {ratio:.2f}; correctness: {'PASS' if not failures else 'FAIL'}",
        *failures,
    ]
    print("\n".join(lines))
    if args.out:
        Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
