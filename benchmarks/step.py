#!/usr/bin/env python3
"""Optimizer-step benchmark: FAdam's implementations against ``torch.optim.AdamW`` in one process.

    python benchmarks/step.py --out results/step-cpu            # ~50M-param transformer set, CPU
    python benchmarks/step.py --device cuda --out results/step-cuda
    python benchmarks/step.py --quick --out /tmp/step-quick      # small sizes, a few seconds
    python benchmarks/step.py --host-only --dtype float32,bfloat16 --out /tmp/host   # Triton launcher host time, CPU
    python benchmarks/step.py --bf16-rounding --variants fadam_fused,fadam8bit_fused --out /tmp/bf16  # bf16 stores

Protocol (docs: benchmarks/README.md): every variant gets identical params and grads (same seed); one untimed
first step each (state allocation, kernel build / Triton compile: reported separately); then round-robin warm-up
and timed steps, a cache-flushing buffer written before every step; median / min / p90 per variant; the ratio to
``AdamW(fused=True)`` measured in the same process; achieved GB/s at each variant's bytes-per-param model next to
this machine's measured copy bandwidth; the extra memory of one step; and a correctness check after timing: every
FAdam variant is compared with the for-loop reference (``FAdam(foreach=False)``), and a variant that disagrees
prints FAIL instead of its numbers. ``pytorch_optimizer.FAdam`` uses a different adaptive-ε formula
(min(ε, ε₂·RMS(g)) instead of ε·min(1, RMS(g))), so its deviation is reported, not checked.

``--bf16-rounding`` adds rows for bfloat16 params on the fused path, one per store (``param_rounding`` nearest,
stochastic, kahan; FAdam with fp32 state, FAdam with bf16 state stored stochastically, FAdam8bit), next to the run's
own ``--dtype`` rows, so their ratios are to the same process's AdamW fused and FAdam fused; each may also be named
in ``--variants``. A row runs only on the fused kernel (``describe_implementation()`` is checked, and a kernel whose
``SUPPORTS_ROUNDING`` is False skips the stochastic/kahan rows with the reason): never silently on another path.

Writes ``<out>.csv`` (one row per variant, with the conditions) and ``<out>.md`` (machine, versions, conditions,
table) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from hf_fadam import FAdam  # noqa: E402


# ---------------------------------------------------------------------------------------------------- param sets


def transformer_shapes(d: int = 576, layers: int = 8, vocab: int = 32000, ctx: int = 1024) -> list[tuple[int, ...]]:
    """A small decoder's tensors: 100 tensors, 50.9M params at the defaults (largest 18.4M, smallest 576)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


PARAM_SETS = {
    "transformer": lambda quick: transformer_shapes(64, 2, 2000, 128) if quick else transformer_shapes(),
    "many_small": lambda quick: [(100, 100)] * (50 if quick else 1000),
    "few_huge": lambda quick: [(256, 1024)] * 4 if quick else [(8192, 8192)] * 4,
}


def make_params(shapes, device: str, dtype: torch.dtype, seed: int = 1234) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(s, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


# ---------------------------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    name: str
    build: object  # params -> optimizer
    bytes_model: str  # key into bytes_per_param() / bytes_moved_per_param()
    is_fadam: bool = True
    check: str = "strict"  # strict | report | none
    dtype: torch.dtype | None = None  # param dtype; None: the run's --dtype
    extra: bool = False  # run only with --bf16-rounding or when named in --variants
    rounding: str | None = None  # the param_rounding it asks for: checked against what the optimizer resolves
    kernels: tuple[str, str] | None = None  # (CPU, CUDA) kernel modules it must run on (their SUPPORTS_ROUNDING)


def _po_fadam(params):
    from pytorch_optimizer import FAdam as POFAdam

    return POFAdam(params, lr=1e-3, weight_decay=0.1, foreach=True)


def _fadam8bit_fused(params, **kwargs):
    from hf_fadam import FAdam8bit

    return FAdam8bit(params, lr=1e-3, fused=True, **kwargs)


def _fadam_store(mode: str, state_dtype: torch.dtype | None = None):
    def build(params, fused=True, foreach=None):  # fused=False, foreach=True: the same store on the foreach path
        return FAdam(params, lr=1e-3, fused=fused, foreach=foreach, param_rounding=mode, state_dtype=state_dtype)

    return build


def _fadam8bit_store(mode: str):
    def build(params, fused=True, foreach=None):
        from hf_fadam import FAdam8bit

        return FAdam8bit(params, lr=1e-3, fused=fused, foreach=foreach, param_rounding=mode)

    return build


def _layerwise(build):
    """The optimizer with ``gradient_release=True``, its ``step`` replaced by what backward's hooks run: one
    ``_step_param`` per parameter, last parameter first (gradients are kept, so every timed step sees them)."""

    def layerwise(params):
        opt = build(params, gradient_release=True)
        order = [p for group in opt.param_groups for p in group["params"]][::-1]

        def step():
            for p in order:
                opt._step_param(p)

        opt.step = step
        return opt

    return layerwise


def state_bytes(opt) -> int:
    """Bytes of every tensor in the optimizer's state (codes, scales, fp32 state and step counters)."""
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


VARIANTS = [
    Variant("fadam_forloop", lambda ps: FAdam(ps, lr=1e-3, foreach=False), "fadam"),
    Variant("fadam_foreach", lambda ps: FAdam(ps, lr=1e-3, foreach=True), "fadam"),
    Variant("fadam_fused", lambda ps: FAdam(ps, lr=1e-3, fused=True), "fadam"),
    Variant("fadam_default", lambda ps: FAdam(ps, lr=1e-3), "fadam"),
    Variant("adamw_foreach", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), "adamw", False, "none"),
    Variant("adamw_fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), "adamw", False, "none"),
    Variant("pytorch_optimizer_fadam", _po_fadam, "fadam", True, "report"),
    # 8-bit state: its θ differs from the fp32 reference by the state's rounding, so the deviation is reported.
    Variant("fadam8bit_fused", _fadam8bit_fused, "fadam8bit", True, "report"),
    # gradient release (--variants fadam_fused_layerwise,fadam8bit_fused_layerwise): one fused call per tensor
    Variant("fadam_fused_layerwise", _layerwise(lambda ps, **kw: FAdam(ps, lr=1e-3, fused=True, **kw)), "fadam",
            extra=True),
    Variant("fadam8bit_fused_layerwise", _layerwise(lambda ps, **kw: _fadam8bit_fused(ps, **kw)), "fadam8bit", True,
            "report", extra=True),
]
_FP32_KERNELS = ("cpu_fused", "triton_fadam")
_8BIT_KERNELS = ("cpu_fused_8bit", "triton_fadam8bit")


def _bf16(mode: str, kernels: tuple[str, str]) -> dict:
    return dict(dtype=torch.bfloat16, extra=True, rounding=mode, kernels=kernels)


# bf16 params on the fused path, one row per store (--bf16-rounding). Checked by same_store_check() (one step
# against the same store on the foreach path); their drift from the fp32 reference is reported, not checked.
BF16_VARIANTS = [
    *(
        Variant(f"fadam_bf16_{m}", _fadam_store(m), "fadam", check="report", **_bf16(m, _FP32_KERNELS))
        for m in ("nearest", "stochastic", "kahan")
    ),
    # bf16 m and f, always stored stochastically; θ stochastic too (the configuration with no extra memory)
    Variant(
        "fadam_bf16_stochastic_bf16state",
        _fadam_store("stochastic", torch.bfloat16),
        "fadam",
        check="report",
        **_bf16("stochastic", _FP32_KERNELS),
    ),
    *(
        Variant(f"fadam8bit_bf16_{m}", _fadam8bit_store(m), "fadam8bit", check="report", **_bf16(m, _8BIT_KERNELS))
        for m in ("nearest", "stochastic", "kahan")
    ),
]
VARIANTS += BF16_VARIANTS
REFERENCE = "fadam_forloop"
BASELINE = "adamw_fused"
FADAM_FUSED = "fadam_fused"


def bytes_per_param(model: str, param_dtype: torch.dtype) -> float:
    """Compulsory memory traffic per parameter per step.

    AdamW (torch keeps m, v in the param dtype): read p, g, m, v; write p, m, v = 7 x param bytes.
    FAdam, three passes with f recomputed (the C/Triton kernels' schedule): A reads g; B reads g, f, θ; C reads g,
    f, m, θ and writes f, m, θ = 3G + 3P + 5S, with fp32 state for 16-bit params (44 B fp32, 32 B bf16).
    """
    p = torch.finfo(param_dtype).bits // 8
    if model == "adamw":
        return 7 * p
    if model == "fadam8bit":  # the same passes on 1-byte codes (scales: 8 B per 256-element block, left out)
        return 6 * p + 5
    s = 4 if p < 4 else p
    return 3 * p + 3 * p + 5 * s


def bytes_moved_per_param(opt, model: str, param_dtype: torch.dtype) -> float:
    """What the fused kernels read and write per parameter per step, from the live params and state tensors' dtypes
    (the step counters' 4 B per tensor left out); the static :func:`bytes_per_param` where the state has no known
    layout (pytorch_optimizer). G, P, F, M, C: bytes per element of g, θ, fisher, exp_avg, param_comp (0 without
    Kahan).

    - AdamW: reads p, g, m, v, writes p, m, v: 2P + G + 2M + 2V (28 B fp32).
    - FAdam, the three passes of ``_fadam_cpu.c`` / the Triton kernels: A reads g; B reads g, f, θ (+ c); C reads
      g, f, m, θ (+ c) and writes f, m, θ (+ c): 3G + 3P + 3F + 2M + 3C. fp32: 44; bf16 θ with fp32 state: 32
      (nearest, stochastic), 38 (kahan: c is read in B and C and written in C); bf16 θ and bf16 state: 22.
    - FAdam8bit, 8-bit tensors (``_fadam8bit_cpu.c``): A reads g; B reads g, θ (+ c), the f code and its block
      scale; C reads g, θ (+ c), both codes and both scales and writes θ (+ c), both codes and both scales:
      3G + 3P + 3C + 5 + 20 / block_size (29.08 fp32, 17.08 bf16, 23.08 bf16 kahan at block 256); tensors under
      min_8bit_size keep fp32 state and count as FAdam.
    - Without weight decay pass B does not read θ (+ c): one P + C less.

    Every FAdam variant is given the fused kernels' traffic; for the for-loop and foreach rows it is an effective
    figure (they move more)."""
    if model not in ("adamw", "fadam", "fadam8bit"):
        return bytes_per_param(model, param_dtype)
    total = numel = 0
    for group in opt.param_groups:
        theta_reads = 3 if group.get("weight_decay", 0) != 0 else 2
        for p in group["params"]:
            st = opt.state.get(p, {})
            n, pb = p.numel(), p.element_size()
            gb = p.grad.element_size() if p.grad is not None else pb
            numel += n
            try:
                if model == "adamw":
                    total += n * (2 * pb + gb + 2 * st["exp_avg"].element_size() + 2 * st["exp_avg_sq"].element_size())
                    continue
                cb = st["param_comp"].element_size() if "param_comp" in st else 0
                if "fisher_sqrt" in st:
                    scales = 3 * st["fisher_sqrt_scale"].nbytes + 2 * st["exp_avg_scale"].nbytes
                    total += n * (3 * gb + theta_reads * (pb + cb) + 5) + scales
                else:
                    fb, mb = st["fisher"].element_size(), st["exp_avg"].element_size()
                    total += n * (3 * gb + theta_reads * (pb + cb) + 3 * fb + 2 * mb)
            except KeyError:  # a state layout this model does not know
                return bytes_per_param(model, param_dtype)
    return total / numel if numel else bytes_per_param(model, param_dtype)


def describe_store(opt, param_dtype: torch.dtype) -> tuple[str, str]:
    """(how θ is stored, the state's storage) from the optimizer: ``param_rounding_of`` as resolved for 16-bit
    params ("-" for 32/64-bit params: nothing is rounded), and the largest tensor's ``exp_avg`` dtype ("8-bit"
    for codes)."""
    rounding = "-"
    if param_dtype in (torch.bfloat16, torch.float16) and hasattr(opt, "param_rounding_of"):
        rounding = opt.param_rounding_of(opt.param_groups[0], param_dtype)
    states = [(p.numel(), st) for p, st in opt.state.items() if isinstance(st, dict)]
    state = "-"
    if states:
        st = max(states, key=lambda x: x[0])[1]
        m = st.get("exp_avg")
        if torch.is_tensor(m):
            state = "8-bit" if m.dtype in (torch.int8, torch.uint8) else _short(m.dtype)
    return rounding, state


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, str(dtype).replace("torch.", "")
    )


def skip_reason(v: Variant, dev: str) -> str | None:
    """Why a store variant cannot run on its fused kernel here (None: it can): the kernel module's
    ``SUPPORTS_ROUNDING`` is False and the variant asks for a stochastic or Kahan store. Such a row is skipped, not
    run on another path."""
    if v.kernels is None or v.rounding in (None, "nearest"):
        return None
    module_name = f"hf_fadam.kernels.{v.kernels[0] if dev == 'cpu' else v.kernels[1]}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return f"{module_name} cannot be imported: {exc}"
    if not getattr(module, "SUPPORTS_ROUNDING", False):
        return f"{module_name}.SUPPORTS_ROUNDING is False: its fused kernel cannot store param_rounding={v.rounding!r}"
    return None


def path_mismatch(v: Variant, opt, dev: str, param_dtype: torch.dtype) -> str | None:
    """Why a store variant's optimizer would not run what the row claims (None when it does): the fused kernel
    (``describe_implementation()`` names the C kernel on CPU, Triton on CUDA) and the requested store."""
    if v.kernels is None:
        return None
    impl = opt.describe_implementation()
    want = "C kernel" if dev == "cpu" else "Triton"
    if not impl.startswith("fused") or want not in impl:
        return f"describe_implementation() is {impl!r}, not the fused {want}"
    got = opt.param_rounding_of(opt.param_groups[0], param_dtype)
    if got != v.rounding:
        return f"param_rounding resolves to {got!r}, not {v.rounding!r}"
    return None


# ---------------------------------------------------------------------------------------------------- timing


class Timer:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn) -> float:
        """Seconds for fn(); CUDA events on GPU, perf_counter on CPU."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def copy_bandwidth(device: str, nbytes: int, reps: int, timer: Timer) -> float:
    """GB/s of a large ``copy_`` (counted as read + write), median of ``reps``."""
    a = torch.rand(nbytes // 4, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    timer.sync()
    ts = [timer.time(lambda: b.copy_(a)) for _ in range(reps)]
    return 2 * nbytes / statistics.median(ts) / 1e9


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_memory(opt, device: str, timer: Timer) -> float | None:
    """Extra memory of one step in MB: max_memory_allocated growth on CUDA; on Linux CPU, the peak resident-set
    growth sampled every ~0.2 ms during the step (approximate: short-lived temporaries can slip between samples,
    and memory that the allocator keeps counts at its first step only)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        opt.step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    if not os.path.exists("/proc/self/statm"):
        opt.step()
        return None
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    opt.step()
    done.set()
    th.join()
    peak[0] = max(peak[0], _rss_bytes())
    return (peak[0] - before) / 2**20


# ---------------------------------------------------------------------------------------------------- checks


def _state_of(opt, p):
    st = opt.state.get(p, {})
    return st.get("exp_avg"), st.get("fisher")


def compare(ref_opt, ref_params, opt, params, init_params, mode: str) -> tuple[bool, str]:
    """Deviation from the reference: max |Δθ| relative to the reference's largest total movement, and the same
    for m and f relative to their largest magnitude. PASS below 1e-2, plus 4 ulp of the largest |θ| in the param
    dtype (16-bit params round every step). A real bug - a missed clip, a wrong ε̂ or β̂2 - moves θ by O(1) of its
    movement; fp32 rounding differences stay near 1e-5."""
    dtheta = move = mag = 0.0
    dstate = scale = 0.0
    finite = True
    for p_ref, p, p0 in zip(ref_params, params, init_params):
        a, b = p.detach().double(), p_ref.detach().double()
        finite &= bool(torch.isfinite(a).all())
        dtheta = max(dtheta, (a - b).abs().max().item())
        move = max(move, (b - p0.double()).abs().max().item())
        mag = max(mag, b.abs().max().item())
        if mode == "strict":
            for x, y in zip(_state_of(opt, p), _state_of(ref_opt, p_ref)):
                if x is not None and y is not None:
                    dstate = max(dstate, (x.double() - y.double()).abs().max().item())
                    scale = max(scale, y.double().abs().max().item())
    rel_theta = dtheta / move if move > 0 else (0.0 if dtheta == 0 else math.inf)
    rel_state = dstate / scale if scale > 0 else 0.0
    # 16-bit params round θ every step; one flipped rounding is an ulp of |θ|, not a bug: allow a few of them.
    ulps = 4 * torch.finfo(params[0].dtype).eps * mag
    ok = finite and dtheta <= 1e-2 * move + ulps and rel_state <= 1e-2
    return ok, f"θ {rel_theta:.1e}, m/f {rel_state:.1e}" if mode == "strict" else f"θ {rel_theta:.1e}"


def _ulps(a: Tensor, b: Tensor, dtype: torch.dtype, before: Tensor | None = None) -> Tensor:
    """|a - b| in units of ``dtype``'s ulp at max(|a|, |b|, |before|) (float64; subnormals count in the smallest
    normal's ulp). ``before``: the value the step started from: a new value computed as θ - lr·u in float32 carries
    the float32 error of |θ|, also where it cancels to near 0."""
    a, b = a.double(), b.double()
    big = torch.maximum(a.abs(), b.abs())
    if before is not None:
        big = torch.maximum(big, before.double().abs())
    big = big.clamp_min(torch.finfo(dtype).tiny)
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(big)))
    return (a - b).abs() / ulp


def same_store_check(v: Variant, opt, params, dev: str) -> tuple[bool, str]:
    """One more step of a store row against the same configuration on the foreach path, from the row's final state.

    The rounding rules make every implementation store the same 16-bit values from the same float32 inputs
    (hf_fadam/_rounding.py); the kernels' float32 math differs from torch's by a few fp32 ulp, which can flip one
    rounding. So: θ (θ + c for Kahan, compared in θ's dtype) within 1 ulp of the param dtype (at the larger of
    the old and new |θ|: where the update cancels θ to near 0, float32's error is that of the old θ), and at most 1e-3 of
    the elements half an ulp or more off (a wrong store, e.g. nearest for stochastic, is 1 ulp off in ~30 % of
    them); 16-bit state within 1 ulp of its dtype and 8-bit codes within 1, at most 1e-3 of the elements off; fp32
    state, the scales and the step counters within 1e-5 of their largest magnitude. The deviation from the fp32
    reference's trajectory (the check column's first part) is reported, not checked: 16-bit stores drift from fp32
    by design (and the rows' grads are the reference's rounded to bf16)."""
    vdtype = params[0].dtype
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for rp, p in zip(ref_params, params):
        rp.grad = p.grad.detach().clone()
    ref = v.build(ref_params, fused=False, foreach=True)
    ref.load_state_dict(opt.state_dict())  # the step counts and streams too: the same random bits
    for group in ref.param_groups:  # the loaded groups bring fused=True back
        group["fused"], group["foreach"] = False, True
    impl = ref.describe_implementation()
    if not impl.startswith("foreach"):
        return False, f"1 step vs foreach: the reference runs {impl!r}"

    def value(p, st):  # θ, or θ + c with Kahan, in float32
        return p.detach().float() + st["param_comp"].float() if "param_comp" in st else p.detach().float()

    before = [value(p, opt.state[p]) for p in params]
    opt.step()
    ref.step()
    theta, theta_diff, total = 0.0, 0, 0
    state_ok, worst = True, ""
    for p, rp, p0 in zip(params, ref_params, before):
        st, rst = opt.state[p], ref.state[rp]
        a, b = value(p, st), value(rp, rst)
        if a.numel():
            u = _ulps(a, b, vdtype, p0)
            theta, theta_diff, total = (
                max(theta, u.max().item()),
                theta_diff + int((u >= 0.5).sum()),
                total + a.numel(),
            )
        for key, x in st.items():
            y = rst.get(key)
            if key == "param_comp" or not torch.is_tensor(x) or not torch.is_tensor(y) or x.numel() == 0:
                continue
            if not x.is_floating_point() or x.element_size() == 2:  # 8-bit codes; 16-bit state, stored stochastically
                d = (x.long() - y.long()).abs() if not x.is_floating_point() else _ulps(x, y, x.dtype)
                dev_k, frac = d.max().item(), (d > 0).double().mean().item()
                ok = dev_k <= 1 and frac <= 1e-3
                what = f"{key} {dev_k:.0f} {'ulp' if x.is_floating_point() else 'code'} at {frac:.1e}"
            else:
                scale = y.double().abs().max().item()
                dev_k = (x.double() - y.double()).abs().max().item() / (scale or 1.0)
                ok, what = dev_k <= 1e-5, f"{key} {dev_k:.1e}"
            if not ok and state_ok:
                state_ok, worst = False, what
    frac = theta_diff / max(total, 1)
    # the same store: an element differs only where the float32 math's last bits cross a rounding threshold, rarely
    # (θ + c of Kahan differs below half an ulp where c's last bits do: not counted); a different store (nearest for
    # stochastic, say) differs by 1 ulp in a large share of the elements
    ok = theta <= 1 and frac <= 1e-3 and state_ok
    detail = f"1 step vs foreach: θ ≤ {theta:.2g} ulp, {frac:.1e} of elements off, state " + (
        "ok" if state_ok else f"off ({worst})"
    )
    del ref, ref_params
    return ok, detail


# ---------------------------------------------------------------------------------------------------- main


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("hf-fadam", "pytorch-optimizer", "triton"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if "hf-fadam" not in out:
        import hf_fadam

        out["hf-fadam"] = getattr(hf_fadam, "__version__", "?") + " (checkout)"
    return out


def checkout() -> str:
    """The checkout the run measured: git HEAD and the files under hf_fadam/ with uncommitted changes (kernel
    sources edited in the working tree are what the C kernels are built from)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "hf_fadam"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return "-"
    if head.returncode != 0:
        return "-"
    changed = sorted(line[3:] for line in dirty.stdout.splitlines() if line.strip())
    return head.stdout.strip() + (f" + uncommitted {', '.join(changed)}" if changed else "")


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    if device.startswith("cuda"):
        text = f"{torch.cuda.get_device_name()} ({text})"
    return text


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or float64")
    ap.add_argument("--param-set", default="transformer", choices=sorted(PARAM_SETS))
    ap.add_argument("--quick", action="store_true", help="small sizes and few steps (smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 25; quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="round-robin warm-up rounds (default 3; quick 1)")
    ap.add_argument("--flush-mb", type=int, default=None, help="cache-flush buffer (default 512 CPU, 256 CUDA)")
    ap.add_argument("--bw-mb", type=int, default=None, help="copy-bandwidth probe size (default 1024; quick 64)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    ap.add_argument("--variants", default="", help="comma-separated subset (the reference and baseline are kept)")
    ap.add_argument(
        "--bf16-rounding",
        action="store_true",
        help="add the bf16-param rows of every store on the fused path ("
        + ", ".join(v.name for v in BF16_VARIANTS)
        + "); ratios to the same run's AdamW fused and FAdam fused",
    )
    ap.add_argument("--out", required=True, help="output path stem: writes <out>.csv and <out>.md")
    ap.add_argument("--note", default="", help="a line for the markdown's conditions (e.g. who else used the machine)")
    ap.add_argument(
        "--host-only",
        action="store_true",
        help="time only the host side of the Triton launcher on CPU, kernels stubbed (--dtype may list several)",
    )
    ap.add_argument("--triton-module", default=None, help="--host-only: load the launcher from this file instead")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- host only


class _NoopLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` does nothing (no compile, no interpreter)."""

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        return None


def _load_triton_module(path: str | None):
    """hf_fadam.kernels.triton_fadam, or the file at ``path`` installed in its place (for "before" numbers:
    ``git show HEAD:hf_fadam/kernels/triton_fadam.py > /tmp/triton_fadam_before.py``)."""
    import importlib
    import importlib.util

    import hf_fadam.kernels as kernels_pkg

    name = "hf_fadam.kernels.triton_fadam"
    if path is None:
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # functional.py's "from .kernels import triton_fadam" finds this one
    spec.loader.exec_module(module)
    kernels_pkg.triton_fadam = module
    return module


def host_only(args) -> int:
    """Host time of the Triton launcher, on CPU, with the three kernel launches replaced by no-ops.

    ``fadam_triton_`` runs on CPU tensors under ``TRITON_INTERPRET=1`` (set here before triton is imported); the
    kernels it would launch are swapped for :class:`_NoopLaunch`, so what is timed is exactly the Python work of a
    step on the host: checks, table and cache look-ups, argument packing, the ``kernel[grid](...)`` call sites. Not
    included: Triton's own launch path (``JITFunction.run``: argument binding and the driver call, ~15-50 µs per
    launch on a GPU host), which only a GPU can time (``benchmarks/gpu_step.py`` reports the host enqueue time).

    Two rows per dtype: ``launcher`` calls ``fadam_triton_`` alone on the param set's tensors; ``FAdam.step``
    times a whole ``FAdam(fused=True).step()`` routed to the Triton launcher (``HF_FADAM_CPU_FUSED_BACKEND=triton``),
    so it adds the optimizer's bookkeeping and the dispatch in functional.py (the step increment is real CPU work
    on 0-d tensors). The tensors are allocated but never touched by the no-op kernels.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["HF_FADAM_CPU_FUSED_BACKEND"] = "triton"
    module = _load_triton_module(args.triton_module)
    if not module._interpreting():
        raise SystemExit("--host-only: TRITON_INTERPRET must be 1 before triton is imported")
    import dataclasses

    real = module._kernels()
    noop = _NoopLaunch()
    stub = dataclasses.replace(real, pass_a=noop, pass_b=noop, pass_c=noop)
    module._kernels = lambda: stub

    shapes = PARAM_SETS[args.param_set](args.quick)
    numel = sum(math.prod(s) for s in shapes)
    calls = args.steps or (20 if args.quick else 300)
    rows = []
    for dname in args.dtype.split(","):
        dtype = getattr(torch, dname)
        state = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        params = [torch.nn.Parameter(torch.empty(s, dtype=dtype)) for s in shapes]
        for p in params:
            p.grad = torch.empty_like(p)
        lists = (
            [p.detach() for p in params],
            [p.grad for p in params],
            [torch.zeros(p.shape, dtype=state) for p in params],
            [torch.zeros(p.shape, dtype=state) for p in params],
            [torch.zeros((), dtype=torch.float32) for _ in params],
        )
        hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, clip=1.0, p=0.5, maximize=False)
        opt = FAdam(params, lr=1e-3, fused=True)
        for name, fn in (
            ("launcher", lambda lists=lists, hyper=hyper: module.fadam_triton_(*lists, **hyper)),
            ("FAdam.step", opt.step),
        ):
            for _ in range(5):  # fill the caches
                fn()
            ts = []
            for _ in range(calls):
                t0 = time.perf_counter_ns()
                fn()
                ts.append(time.perf_counter_ns() - t0)
            ts.sort()
            rows.append(
                dict(
                    dtype=dname,
                    what=name,
                    median_ms=statistics.median(ts) / 1e6,
                    min_ms=ts[0] / 1e6,
                    p90_ms=ts[min(len(ts) - 1, math.ceil(0.9 * len(ts)) - 1)] / 1e6,
                )
            )
            print(f"  {dname:9s} {name:11s} median {rows[-1]['median_ms']:.4f} ms  min {rows[-1]['min_ms']:.4f} ms")
    source = args.triton_module or "hf_fadam/kernels/triton_fadam.py"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    lines = [
        f"## Host time of the Triton launcher, kernels stubbed: {args.param_set} ({len(shapes)} tensors, "
        f"{numel / 1e6:.2f} M params) on CPU",
        "",
        f"- machine: {machine('cpu')}; load average {_load(load)}",
        f"- launcher source: `{source}`; versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"- {calls} timed calls after 5 untimed ones; per call perf_counter_ns",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        "",
        "| dtype | timed | median ms | min ms | p90 ms |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['dtype']} | {r['what']} | {r['median_ms']:.4f} | {r['min_ms']:.4f} | {r['p90_ms']:.4f} |" for r in rows
    ]
    table = "\n".join(lines)
    print()
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    with out.with_suffix(".csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) + ["source"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: _csv(v) for k, v in row.items()}, "source": source})
    print(f"\nwrote {out.with_suffix('.csv')} and {out.with_suffix('.md')}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in args.dtype.split(","):
        if name not in ("float32", "bfloat16", "float16", "float64") or (not args.host_only and name != args.dtype):
            raise SystemExit(f"--dtype: {args.dtype!r}; expected one of float32, bfloat16, float16, float64")
    if args.host_only:
        return host_only(args)
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (5 if args.quick else 25)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    flush_mb = args.flush_mb if args.flush_mb is not None else (32 if args.quick else (256 if dev != "cpu" else 512))
    bw_mb = args.bw_mb or (64 if args.quick else 1024)
    dtype = getattr(torch, args.dtype)
    timer = Timer(dev)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None

    variants = [v for v in VARIANTS if not v.extra or args.bf16_rounding]
    if args.variants:
        keep = set(args.variants.split(",")) | {REFERENCE, BASELINE}
        unknown = keep - {v.name for v in VARIANTS}
        if unknown:
            raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {[v.name for v in VARIANTS]}")
        if args.bf16_rounding:
            keep |= {v.name for v in BF16_VARIANTS}
        if any(v.extra and v.name in keep for v in VARIANTS):
            keep.add(FADAM_FUSED)  # the store rows' second baseline
        variants = [v for v in VARIANTS if v.name in keep]

    # one-time cost of the fused kernel, apart from the steps: the C build (cached after the first run) on CPU
    kernel_note = ""
    if dev == "cpu":
        from hf_fadam.kernels import cpu_fused

        t0 = time.perf_counter()
        ok = cpu_fused.is_available()
        kernel_note = (
            f"C kernel load/build {time.perf_counter() - t0:.2f} s ({cpu_fused.library_path()})"
            if ok
            else f"C kernel unavailable: {cpu_fused.unavailable_reason()}"
        )

    bw = copy_bandwidth(dev, bw_mb * 2**20, 5 if args.quick else 10, timer)
    shapes = PARAM_SETS[args.param_set](args.quick)
    numel = sum(math.prod(s) for s in shapes)
    print(f"device {dev}: {machine(dev)}; copy bandwidth {bw:.1f} GB/s; {kernel_note}", flush=True)
    print(f"param set {args.param_set}: {len(shapes)} tensors, {numel / 1e6:.2f} M params, {args.dtype}", flush=True)

    init = [p.detach().clone() for p in make_params(shapes, "cpu", dtype)]
    opts, params_of, first_s, errors, skipped, impls = {}, {}, {}, {}, {}, {}
    for v in variants:
        vdtype = v.dtype or dtype
        reason = skip_reason(v, dev)
        if reason:
            skipped[v.name] = reason
            print(f"  {v.name}: SKIP {reason}", flush=True)
            continue
        params = make_params(shapes, dev, vdtype)  # identical start for every variant (rounded to its dtype)
        try:
            opt = v.build(params)
            reason = path_mismatch(v, opt, dev, vdtype)
            if reason:
                skipped[v.name] = reason
                print(f"  {v.name}: SKIP {reason}", flush=True)
                del opt, params
                continue
            impls[v.name] = opt.describe_implementation() if hasattr(opt, "describe_implementation") else ""
            timer.sync()
            first_s[v.name] = timer.time(opt.step)  # untimed in the statistics: allocation, build, compile
        except Exception as exc:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
            errors[v.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:150]}"
            print(f"  {v.name}: ERROR {errors[v.name]}", flush=True)
            continue
        opts[v.name], params_of[v.name] = opt, params
        if v.kernels is not None:  # once more with state: the step ran on the fused kernel
            reason = path_mismatch(v, opt, dev, vdtype)
            if reason:
                skipped[v.name] = reason
                print(f"  {v.name}: SKIP {reason}", flush=True)
                del opts[v.name], params_of[v.name]
                continue
        print(f"  {v.name}: first step {first_s[v.name]:.3f} s ({impls[v.name] or type(opt).__name__})", flush=True)

    flush = torch.empty(flush_mb * 2**18, device=dev) if flush_mb else None
    times = {k: [] for k in opts}
    faults = dict.fromkeys(opts, 0)
    for rnd in range(warmup + steps):
        for name, opt in opts.items():  # round-robin: drift on a shared machine hits every variant alike
            if flush is not None:
                flush.fill_(rnd)
            timer.sync()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            dt = timer.time(opt.step)
            if rnd >= warmup:
                times[name].append(dt)
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    mem = {name: peak_extra_memory(opt, dev, timer) for name, opt in opts.items()}

    init_dev = [t.to(dev) for t in init]
    verdict = {}
    ref = opts.get(REFERENCE)
    for v in variants:
        if v.name not in opts or v.check == "none" or v.name == REFERENCE or ref is None:
            continue
        ok, detail = compare(ref, params_of[REFERENCE], opts[v.name], params_of[v.name], init_dev, v.check)
        verdict[v.name] = (ok or v.check == "report", detail if v.check == "strict" else detail + " (report only)")
    for v in variants:  # store rows: exact against the same store on the foreach path (after the drift above)
        if v.kernels is not None and v.name in opts:
            ok, detail = same_store_check(v, opts[v.name], params_of[v.name], dev)
            before = verdict.get(v.name, (True, ""))
            verdict[v.name] = (before[0] and ok, "; ".join(x for x in ("vs ref: " + before[1], detail) if x))

    if dev == "cpu" and any(v.bytes_model == "fadam8bit" and v.name in opts for v in variants):
        lib8 = getattr(getattr(sys.modules.get("hf_fadam.kernels.cpu_fused_8bit"), "_library", None), "path", None)
        kernel_note += f"; 8-bit C kernel {lib8}" if lib8 else ""
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    base = statistics.median(times[BASELINE]) if times.get(BASELINE) else None
    rows = []
    for v in variants:
        vdtype = v.dtype or dtype
        row = {"variant": v.name, "param_dtype": _short(vdtype)}
        if v.name in errors:
            row.update(status="ERROR", note=errors[v.name])
            rows.append(row)
            continue
        if v.name in skipped:
            row.update(status="SKIP", note=skipped[v.name], param_rounding=v.rounding or "")
            rows.append(row)
            continue
        ts = sorted(times[v.name])
        med = statistics.median(ts)
        # per-round ratio to the baseline timed moments apart: robust to load that drifts during the run
        paired = (
            statistics.median(a / b for a, b in zip(times[v.name], times[BASELINE])) if times.get(BASELINE) else None
        )
        # the same against FAdam's fused step: FAdam8bit's speed target is stated relative to it
        paired_fadam = (
            statistics.median(a / b for a, b in zip(times[v.name], times[FADAM_FUSED]))
            if times.get(FADAM_FUSED) and v.name != FADAM_FUSED
            else None
        )
        ok, detail = verdict.get(v.name, (True, "reference" if v.name == REFERENCE else ""))
        nb = bytes_moved_per_param(opts[v.name], v.bytes_model, vdtype)
        rounding, state = describe_store(opts[v.name], vdtype)
        row.update(
            param_rounding=rounding,
            state_dtype=state,
            implementation=impls.get(v.name, ""),
            status="OK" if ok else "FAIL",
            median_ms=med * 1e3,
            min_ms=ts[0] * 1e3,
            p90_ms=ts[min(len(ts) - 1, math.ceil(0.9 * len(ts)) - 1)] * 1e3,
            x_adamw_fused=med / base if base else None,
            paired_x_adamw_fused=paired,
            paired_x_fadam_fused=paired_fadam,
            bytes_per_param=nb,
            state_bytes_per_param=state_bytes(opts[v.name]) / numel,
            gbps=nb * numel / med / 1e9,
            frac_copy_bw=nb * numel / med / 1e9 / bw,
            first_step_s=first_s[v.name],
            extra_mem_mb=mem[v.name],
            minor_faults_per_step=faults[v.name] / len(ts) if dev == "cpu" else None,
            check=detail,
        )
        rows.append(row)

    vers = versions()
    cond = {
        "device": dev,
        "machine": machine(dev),
        "param_set": args.param_set,
        "n_tensors": len(shapes),
        "numel": numel,
        "dtype": args.dtype,
        "steps": steps,
        "warmup": warmup,
        "flush_mb": flush_mb,
        "copy_gbps": round(bw, 2),
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "kernel": kernel_note,
        "checkout": checkout(),
        "note": args.note,
        **{f"v_{k}": val for k, val in vers.items()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
    }
    table = render_markdown(rows, cond, dev)
    print()
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    fields = ["variant", "param_dtype", "param_rounding", "state_dtype", "implementation", "status"]
    fields += ["median_ms", "min_ms", "p90_ms", "x_adamw_fused", "paired_x_adamw_fused"]
    fields += ["paired_x_fadam_fused"]
    fields += ["bytes_per_param", "state_bytes_per_param", "gbps"]
    fields += ["frac_copy_bw", "first_step_s", "extra_mem_mb", "minor_faults_per_step", "check", "note"]
    with out.with_suffix(".csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields + list(cond))
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: _csv(row.get(k)) for k in fields}, **{k: _csv(val) for k, val in cond.items()}})
    print(f"\nwrote {out.with_suffix('.csv')} and {out.with_suffix('.md')}")
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


def _csv(x):
    return f"{x:.6g}" if isinstance(x, float) else ("" if x is None else x)


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def render_markdown(rows, cond, dev) -> str:
    lines = [
        f"## Optimizer step: {cond['param_set']} ({cond['n_tensors']} tensors, {cond['numel'] / 1e6:.2f} M params, "
        f"{cond['dtype']}) on {dev}",
        "",
        f"- machine: {cond['machine']}",
        "- versions: " + ", ".join(f"{k[2:]} {v}" for k, v in cond.items() if k.startswith("v_")),
        f"- checkout: {cond.get('checkout', '-')}",
        f"- conditions: {cond['steps']} timed steps after {cond['warmup']} round-robin warm-up rounds, variants "
        f"interleaved, {cond['flush_mb']} MB cache flush before every step, first step untimed; load average "
        f"{_load(cond['loadavg_start'])} at start, {_load(cond['loadavg_end'])} at end",
        f"- measured copy bandwidth (read + write): {cond['copy_gbps']} GB/s"
        + (f"; {cond['kernel']}" if cond["kernel"] else ""),
        f"- command: `{cond['command']}`",
        *([f"- note: {cond['note']}"] if cond.get("note") else []),
        "",
        "| variant | θ / store / state | median ms | min ms | p90 ms | x AdamW fused | paired x | paired x FAdam fused "
        "| B/param (model) | state B/param | GB/s at model | x copy BW | first step s | extra MB/step | faults/step "
        "| check vs for-loop |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        store = f"{r['param_dtype']} / {r.get('param_rounding') or '-'} / {r.get('state_dtype') or '-'}"
        if r["status"] in ("ERROR", "SKIP"):
            lines.append(f"| {r['variant']} | {store} | {r['status']} | | | | | | | | | | | | | {r['note']} |")
            continue
        if r["status"] == "FAIL":
            lines.append(
                f"| {r['variant']} | {store} | FAIL | FAIL | FAIL | FAIL | FAIL | | | | | | | | | {r['check']} |"
            )
            continue
        lines.append(
            f"| {r['variant']} | {store} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['p90_ms']:.2f} | "
            f"{_f(r['x_adamw_fused'], '.2f')} | {_f(r['paired_x_adamw_fused'], '.2f')} | "
            f"{_f(r['paired_x_fadam_fused'], '.2f')} | "
            f"{r['bytes_per_param']:.4g} | {r['state_bytes_per_param']:.2f} | {r['gbps']:.1f} | "
            f"{r['frac_copy_bw']:.2f} | {r['first_step_s']:.2f} | {_f(r['extra_mem_mb'], '.0f')} | "
            f"{_f(r['minor_faults_per_step'], '.0f')} | {r['check']} |"
        )
    impls = sorted({r["implementation"] for r in rows if r.get("implementation")})
    lines += [
        "",
        "x AdamW fused: ratio of medians; paired x: median over rounds of (this variant's step / AdamW fused's "
        "step in the same round), the steadier figure on a loaded machine; paired x FAdam fused: the same against "
        "FAdam's fused step (fp32 state). "
        "state B/param: bytes of the optimizer state after the run / params (FAdam8bit: 1-byte codes of m and "
        "sqrt(f) plus per-block scales; tensors under 4096 elements keep fp32 state; Kahan adds param_comp, 2 B "
        "for bf16; the step counters, 4 B per tensor, are included). "
        "θ / store / state: param dtype / param_rounding as the optimizer resolves it ('-': 32-bit params, nothing "
        "rounded) / the largest tensor's exp_avg storage (16-bit state is always stored stochastically). "
        "B/param: computed from the live params' and state's dtypes as what the fused kernels read and write per "
        "step (G, P, F, M, C: bytes of g, θ, fisher, exp_avg, param_comp per element): AdamW 2P + G + 2M + 2V "
        "(28 fp32); FAdam's three passes (A: g; B: g, f, θ, c; C: g, f, m, θ, c read, f, m, θ, c written) "
        "3G + 3P + 3F + 2M + 3C = 44 fp32, 32 bf16 θ with fp32 state (nearest, stochastic), 38 kahan, 22 bf16 θ "
        "and bf16 state; FAdam8bit 3G + 3P + 3C + 5 (codes) + 20 B of scales per 256-element block = 29.08 fp32, "
        "17.08 bf16, 23.08 bf16 kahan (tensors under 4096 elements with fp32 state as FAdam) - the fused model is "
        "used for every FAdam variant, so for the for-loop/foreach/pytorch_optimizer rows the GB/s is an effective "
        "figure. "
        "check: max deviation from FAdam(foreach=False) after all steps, relative to the reference's largest "
        "movement (θ; plus 4 ulp of |θ| of the row's param dtype for 16-bit params, which also get the grads "
        "rounded to bf16) and magnitude (m, f); FAIL above 1e-2.",
    ]
    if impls:
        lines += ["", "Implementations (describe_implementation()): " + "; ".join(f"`{i}`" for i in impls)]
    return "\n".join(lines)


def _load(x):
    return "-" if x is None else "/".join(f"{v:.1f}" for v in x)


if __name__ == "__main__":
    sys.exit(main())
