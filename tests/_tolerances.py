"""The one tolerance table of the test suite: (atol, rtol) per implementation and dtype, each with its reason.

Comparisons are against the for-loop reference (``foreach=False``) run on identical inputs. Keys: the
implementation name used by the tests (``foreach``, ``fused_c``, ``fused_triton``) and the parameter dtype.
"""

import torch


TOLERANCES = {
    # foreach mirrors the reference op for op; only the RMS differs (norm/sqrt(n) vs sqrt(sum/n)), a few ulp.
    ("foreach", torch.float64): (1e-12, 1e-10),
    # fp32: the same few-ulp RMS difference, amplified where D = sqrt(f) + eps is tiny, over 7+ steps.
    ("foreach", torch.float32): (1e-6, 1e-5),
    # bf16 params are computed in fp32 and rounded once per step: a 1e-7 difference can flip one bf16 rounding
    # (1 ulp = 2^-8 relative), and the flipped value feeds the next steps' w = θ/D.
    ("foreach", torch.bfloat16): (2e-2, 2e-2),
    # Fused kernels reorder the arithmetic (FMA, reductions in double/blocked partial sums, f recomputed in a
    # register), so they agree with the reference to fp32 rounding accumulated over the steps, not bit for bit.
    ("fused_c", torch.float64): (1e-10, 1e-9),
    ("fused_c", torch.float32): (1e-5, 1e-4),
    ("fused_c", torch.bfloat16): (2e-2, 2e-2),
    ("fused_c", torch.float16): (2e-3, 2e-3),
    ("fused_triton", torch.float32): (1e-5, 1e-4),
    ("fused_triton", torch.bfloat16): (2e-2, 2e-2),
    ("fused_triton", torch.float16): (2e-3, 2e-3),
    # torch.compile of the foreach step: Inductor fuses and reorders the same fp32 math.
    ("compiled", torch.float32): (1e-5, 1e-4),
}

# Appended with the Triton kernels: fp64 params (reachable with HF_FADAM_CPU_FUSED_BACKEND=triton, or by calling
# fadam_triton_ directly) run the kernels' math in fp64 with fp64 sums; like fused_c they agree with the reference
# to fp64 rounding (reordered sums, FMA) accumulated over the steps.
TOLERANCES[("fused_triton", torch.float64)] = (1e-10, 1e-9)


# Every (param dtype, state dtype) pair on foreach/default/fused_c against the for-loop, 3 steps (test_hardening):
# keyed by the lower-precision dtype of the pair. All paths compute in the state dtype (at least fp32) and round
# once on store, so they differ by reordered fp32/fp64 arithmetic, which can flip one 16-bit rounding (bf16 ulp
# 2^-8, fp16 ulp 2^-11 relative).
TOLERANCES[("dtype_pair", torch.float64)] = (1e-10, 1e-9)
TOLERANCES[("dtype_pair", torch.float32)] = (1e-5, 1e-4)
TOLERANCES[("dtype_pair", torch.bfloat16)] = (2e-2, 2e-2)
TOLERANCES[("dtype_pair", torch.float16)] = (2e-3, 2e-3)
# A tensor split across two simulated processes (reduce hook) against the unsplit step: only the order of the
# float64 partial sums changes, so the RMS values differ in the last bits; a bf16 param may flip one rounding.
TOLERANCES[("split", torch.float64)] = (1e-12, 1e-10)
TOLERANCES[("split", torch.float32)] = (1e-6, 1e-5)
TOLERANCES[("split", torch.bfloat16)] = (2e-2, 2e-2)

# DeepSpeed ZeRO 1/2/3 on 2 processes (flat partitions mapped to parameters) against one process on the same global
# batch, several steps: the rtol is normwise, ‖θ_zero - θ_one‖ / ‖θ_one - θ_init‖ per tensor (atol unused). The
# gradients differ by the order of the all-reduce/reduce-scatter sum versus one batch mean (fp32), and an Adam-like
# step amplifies that where g/D is near a sign change; so does the weight-decay term, whose RMS(θ/D) is dominated by
# the elements with the smallest |g|, the ones whose value depends most on the order of the sum (a stack of 8 linear
# layers: 4e-3 after 2 steps with weight_decay=0.1, 3e-6 without). Measured 7e-7 (deepspeed.initialize) and up to
# 1.0e-4 (Trainer, ZeRO 3); per-partition RMS, the error this mapping removes, is off by 0.15-0.19.
TOLERANCES[("deepspeed", torch.float32)] = (0.0, 1e-3)

# param_rounding="kahan" on the C kernel against the for-loop (tests/test_rounding_c.py): θ + c, the value the step
# works on, compared in float32. Both paths round the same θ_new up to its last float32 bits (the kernel multiplies
# by 1/D), and c is stored in the param's dtype: a last-bit difference that flips a rounding of c moves θ + c by one
# ulp of c, at most 2^-15 (bf16) or 2^-21 (fp16) of θ (rtol); where θ_new is a small difference of θ and the update,
# or c is an fp16 subnormal (a grid of 6e-8), the difference is absolute (atol). With 16-bit state the test uses the
# ("dtype_pair", state dtype) entry instead: a flipped rounding of f or m moves the update itself.
TOLERANCES[("kahan_theta", torch.bfloat16)] = (1e-6, 4e-5)
TOLERANCES[("kahan_theta", torch.float16)] = (5e-7, 1e-6)


def tolerance(impl: str, dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for comparing ``impl`` at ``dtype`` with the reference.

    State tensors are compared at their own dtype (fp32 for 16-bit params): they do not see the params' rounding,
    because the test gradients do not depend on the params.
    """
    return TOLERANCES[(impl, dtype)]
