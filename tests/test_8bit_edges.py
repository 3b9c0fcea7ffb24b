"""FAdam8bit's C kernel at an edge of the m map: a block whose new |m| maximum is subnormal in float32.

Below ~5.7e-39 (VMAX / FLT_MAX) the reciprocal of such a block's scale, VMAX / amax, is inf. The torch reference
(``hf_fadam._quant.quantize_blockwise``) then writes code 0 for an m of exactly 0 (0 · inf is NaN, mapped to 0) and
±127 for every other element. Every loop of the kernel must write the same codes: the AVX-512 pass C (fp32 params,
p = 0.5, blocks of whole vectors) and the generic loops (``set_simd(False)``, 16-bit params, p ≠ 0.5, blocks that
are not whole vectors), which wrote +127 for the zeros.
"""

from __future__ import annotations

import pytest
import torch
from test_8bit import _clone, _compare, _step, needs_c

from hf_fadam._quant import M_FORMAT, quantize_blockwise
from hf_fadam.kernels import cpu_fused_8bit


VMAX = M_FORMAT.vmax
TINY = 2  # the block whose new m maximum is subnormal


def _state_with_a_subnormal_m_block(block: int, dtype: torch.dtype):
    """Four blocks; block TINY has g = 0 and m in ±1e-39 with exact zeros, so its new m is 0.9 m: max ~9e-40."""
    n = 4 * block
    gen = torch.Generator().manual_seed(11)
    theta = torch.randn(n, generator=gen) * 0.1
    g = torch.randn(n, generator=gen) * 1e-2
    m = torch.randn(n, generator=gen) * 1e-2
    f = (torch.randn(n, generator=gen) * 1e-2) ** 2 + 1e-8
    tiny = slice(TINY * block, (TINY + 1) * block)
    g[tiny] = 0.0
    m[tiny] = torch.linspace(-1e-39, 1e-39, block)
    m[tiny][::3] = 0.0
    mc, msc = quantize_blockwise(m, block, True)
    fc, fsc = quantize_blockwise(f.sqrt(), block, False)
    return [[theta.to(dtype)], [g.to(dtype)], [mc], [fc], [msc], [fsc], [torch.tensor(4.0)]]


CASES = [
    # (param dtype, AVX-512 passes allowed, block, hyper): which loop writes the codes
    pytest.param(torch.float32, True, 64, {}, id="f32-avx512"),
    pytest.param(torch.float32, False, 64, {}, id="f32-generic"),
    pytest.param(torch.float32, True, 40, {}, id="f32-block40-generic"),
    pytest.param(torch.float32, True, 64, {"p": 0.7}, id="f32-p0.7-generic"),
    pytest.param(torch.bfloat16, True, 64, {}, id="bf16-generic"),
    pytest.param(torch.float16, True, 64, {}, id="f16-generic"),
]


@needs_c
@pytest.mark.parametrize(("dtype", "simd", "block", "hyper"), CASES)
def test_c_kernel_zero_m_in_a_block_with_a_subnormal_maximum_is_code_zero(dtype, simd, block, hyper):
    state = _state_with_a_subnormal_m_block(block, dtype)
    ref = _clone(state)
    _step("forloop", ref, block_size=block, hyper=hyper)
    old_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cpu_fused_8bit.set_simd(simd)
        out = _clone(state)
        _step("c", out, block_size=block, hyper=hyper)
    finally:
        cpu_fused_8bit.set_simd(True)
        torch.set_num_threads(old_threads)
    tiny = slice(TINY * block, (TINY + 1) * block)
    want, got = ref[2][0][tiny], out[2][0][tiny]
    # the case occurs: the block's new m maximum is subnormal and VMAX / maximum overflows; zeros and ±127 codes
    amax = float(ref[4][0][TINY]) * VMAX
    assert 0.0 < amax < VMAX / torch.finfo(torch.float32).max
    assert (want == 0).sum() >= block // 3 and (want.abs() == 127).sum() >= block // 2
    assert torch.equal(got, want), f"m codes of the subnormal block: {got.tolist()} != {want.tolist()}"
    assert float(out[4][0][TINY]) == float(ref[4][0][TINY])
    tol = {} if dtype == torch.float32 else {"theta_tol": (1e-2, 1e-2), "flips": 5e-3}
    _compare(ref, out, **tol)
