r"""Blockwise 8-bit quantization of FAdam's two states: the maps, and the torch reference of quantize/dequantize.

Layout. A state tensor of ``n`` elements is read in its flat (row-major) order and cut into blocks of
``block_size`` elements (the last block may be shorter). Each block stores one float32 ``scale`` and one byte per
element, a *code*. The value of an element is ``decode(code) * scale``; the scale is chosen per block so that the
block's largest magnitude lands on the largest code (``scale = absmax / VMAX``). Storage: 1 byte per element plus
4 bytes per block, i.e. ``1 + 4 / block_size`` bytes per element and state (1.016 at block_size 256).

The maps: small floating-point formats, relative to the block's absmax
-----------------------------------------------------------------------
Both codes are unsigned minifloats with ``E`` exponent bits and ``M`` mantissa bits (bias ``2**E - 1``, subnormals,
no inf/NaN): a code ``q = e << M | mant`` decodes to ``(1 + mant / 2**M) * 2**(e - bias)`` for ``e >= 1`` and to
``mant * 2**(1 - bias - M)`` for ``e == 0``. ``VMAX = 2 - 2**-M`` is the largest value.

* ``m`` (momentum, signed): ``int8`` code ``c`` in ``[-127, 127]``, value ``sign(c) * decode_E3M4(|c|) * scale``.
  E3M4: 7 binades from the block's absmax down with 16 steps each (relative rounding error <= 2**-5 = 3.1 %),
  then linear subnormals down to 2**-10 / VMAX ≈ 5e-4 of the absmax.
* ``f`` (Fisher, non-negative): the code stores ``s = sqrt(f)``, not ``f``: ``uint8`` code with E4M4, value
  ``decode_E4M4(q) * scale`` = s. 15 binades of s (30 of f) with 16 steps per binade, subnormals down to
  2**-18 / VMAX ≈ 2e-6 of the block's largest s (4e-12 of its largest f).

Why these maps, and not the ones bitsandbytes and torchao use
-------------------------------------------------------------
bitsandbytes' 8-bit optimizers (and torchao's ``AdamW8bit``, which copies its map) quantize blockwise (256 elements,
one absmax per block) with the *dynamic tree* map: a decimal exponent encoded by the number of leading zero bits,
then a linear fraction in [0.1, 1) with the remaining bits; signed for m, unsigned (the sign bit spent on one more
fraction bit) for Adam's v. Quantization there is a search of the 256-entry table (a binary search in the CUDA
kernels, ``bucketize``/``argmin`` in torchao). torchao's 4-bit optimizer found the *zero-point problem*: a v that
rounds to 0 blows the update up (g / (sqrt(0) + eps)); it quantizes v with a linear map that excludes zero, and
quantizing sqrt(v) instead of v (which halves the dynamic range in decades) is the other known remedy.

The choice here follows what FAdam needs:

1. **Relative precision where it matters.** FAdam uses f only through ``D = sqrt(f) + ε̂`` (p = ½), so what must
   be kept is the *relative* precision of ``sqrt(f)``. Storing s = sqrt(f) puts all of the code's precision on D
   (a relative error r on s is r on D; on f it would be r/2 on D but cost twice the decades), and halves the
   number of decades the code must span. A float format has a near-constant relative step (2**-4 per binade,
   ≤ 3.1 % error) over 15 binades of s, where the dynamic tree map has 0.35-3.5 % in its top decade but only
   2-3 values per decade below 1e-5.
2. **No zero point.** A Fisher that rounds to 0 is the dangerous error: the next step's D = sqrt(f_new) + ε̂ then
   sees only (1−β̂2)·g² (30x too small at β2 = 0.999), the element's θ/D dominates the weight-decay RMS clip of
   its tensor and moves it by up to lr·λ·sqrt(numel) (observed: one element overshooting by 3x its fp32 path).
   E4M4 on s reaches 2e-6 of the block's largest s (f down to 4e-12 of the block's largest f), and below the
   smallest normal value the f map rounds *up* (never to 0): an s that small is overestimated (a smaller,
   conservative update), never underestimated.
3. **Momentum decays.** m ← β1·m + (1−β1)·ḡ must be able to shrink by 10 % per step; with round-to-nearest that
   needs a relative half-step below 10 %. Linear int8 (absmax / 127) fails for small elements of a block (they
   freeze); E3M4's half step is ≤ 3.1 % over 7 binades. Its subnormal tail (a uniform grid of 2**-10 of the scale)
   would freeze below ~2e-3 of the block's absmax with round-to-nearest (0.9·q rounds back to q for codes q ≤ 4),
   and a frozen m is not negligible: an element whose gradient stopped kept moving its weight by lr·|m| every step,
   a drift that grows linearly with the steps. So the subnormal codes round stochastically (below, "Rounding").
4. **Closed-form, branch-free encoding.** A minifloat is encoded by rounding the float32 bits (round to nearest
   even), with no table search: a handful of integer ops that vectorize in the C kernel (AVX2), run in Triton and
   in torch with identical results. Decoding is the same bit manipulation in reverse. The torch functions below
   are the reference; the kernels reproduce them bit for bit given the same float32 input.

Rounding
--------
m rounds to nearest (ties to even) in its normal range, as in bitsandbytes' and torchao's 8-bit optimizers: with
β1 = 0.9 the EMA moves by up to 10 % a step, more than half a code step. In its subnormal range (codes below 16,
|m| < 2**-6 of the scale, 0.8 % of the block's absmax) it rounds **stochastically**, ``(floor(u * 2**26) + (r >> 16)) >> 16``: there
a 10 % decay is less than half a step for codes ≤ 4, so with round-to-nearest an m whose gradient stopped (while its
block's scale stayed put) never reached 0 and its weight drifted lr·|m| a step forever; unbiased rounding makes the
expected code decay by β1 a step, and 0 is absorbing. The noise this adds is at most one subnormal step (5e-4 of the
block's absmax); the normal range stays round-to-nearest (stochastic rounding of all of m was tried and made
training worse: noise in the update). Numbers: docs/8bit.md. m's random bits use their own seed,
``hf_fadam._rounding.rounding_seeds(streams, steps, KIND_EXP_AVG)`` = ``lowbias32(seed ^ KIND_EXP_AVG)`` with the f
seed below, so they are independent of f's.

f rounds **stochastically** in its normal range (and up in its subnormal range, point 2). Rounding to nearest
freezes an EMA whose per-step change is below half a code step: with β2 = 0.999, sqrt(f) changes by ~0.05 % a step
against a half step of up to 3.1 %, so an element's code stays put while its true Fisher drifts, and only its
block's scale (set by the block's largest element) moves it. Measured on the convergence study's LM task: with
round-to-nearest 99.8 % of the f codes stay the same from step to step, and after 500 steps the stored sqrt(f) is
26 % (rms) off an fp32 Fisher fed the same gradients, with a long tail of elements whose gradients shrank and whose
f stayed high (updates too small). Stochastic rounding makes each stored sqrt(f) unbiased (the expected value is
the exact one; f = s**2 itself comes out high by the rounding variance, at most a quarter code step squared, ~0.1 %),
so the EMA follows: 9 % rms after 500 steps, median -0.2 %. (m's stochastic rounding over its whole map was tried
too and made training worse, above.)

The random bits are a counter-based hash, so every implementation produces the same codes and a resumed run the same
trajectory. One hash serves two elements, ``i`` and ``i ^ 16``, 16 bits each: ``h = lowbias32(j ^ seed)`` with
``j = (i >> 5) << 4 | (i & 15)`` (elements are paired 16 apart, so that 16 vector lanes hash once for two vectors),
and ``r = h & 0xFFFF0000`` for ``i & 16 == 0``, ``r = h << 16`` (mod 2**32) otherwise: the element's 16 random bits on
top, zeros below. ``i`` is the element's index in its (local) tensor (mod 2**32), ``seed = lowbias32(stream ^
lowbias32(t))``, ``t`` the tensor's step count after the step and ``stream`` the parameter's position in the
optimizer (over all groups). ``lowbias32`` is C. Wellons' 32-bit integer hash (``x ^= x >> 16; x *= 0x7FEB352D;
x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16``, uint32 arithmetic), so every element's bits are uniform and
independent from step to step and from its neighbours' (the two halves of one output are as independent as two
outputs, to the hash's measured avalanche bias). 16 bits set the probability of rounding up to the discarded
fraction truncated to a multiple of 2**-16: a bias below 2**-16 of a code step, far under the code step's own 3 %.
(Earlier variants, measured in the convergence study (benchmarks/convergence/results_8bit/NOTE.md): one full hash
per element, the shipped kernel until this one, and a hash per block with a Weyl sequence inside it, which saved as
much but made one speech seed in ten fail to take off; it was not kept.) The normal-range
code is then ``(bits(u) + (r >> (32 - S))) >> S`` rebiased, ``S = 23 - man_bits``: the float32 mantissa bits below the
kept ones plus a uniform integer in ``[0, 2**S)``, truncated, rounds up with probability equal to the discarded
fraction, exactly.

A NaN anywhere in a block makes that block's scale NaN (the absmax propagates NaN), so the whole block decodes to
NaN: FAdam's IEEE propagation of non-finite gradients holds block-wise for f and, through the per-tensor RMS,
tensor-wise for m. An infinite sqrt(f) (a finite gradient above sqrt(FLT_MAX), whose square overflows float32) does
not make its block's scale inf: the f map's block maximum is clamped to :data:`F_MAX_S` = 2**63, so that element is
stored as code 255 and its next D ≈ 9e18 freezes it, as fp32 FAdam's D = inf does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


__all__ = [
    "M_FORMAT",
    "F_FORMAT",
    "F_MAX_S",
    "MiniFloat",
    "num_blocks",
    "quantize_blockwise",
    "lowbias32",
    "sr_bits",
    "sr_seeds",
    "dequantize_blockwise",
    "code_table",
]


class MiniFloat:
    """An unsigned minifloat with ``exp_bits`` exponent and ``man_bits`` mantissa bits (bias ``2**exp_bits - 1``).

    ``stochastic``: the range that random bits round stochastically, ``"normal"`` (the f map) or ``"subnormal"``
    (the m map); the other range rounds to nearest (or up, with ``round_up_subnormal``)."""

    def __init__(
        self, exp_bits: int, man_bits: int, round_up_subnormal: bool = False, stochastic: str = "normal"
    ) -> None:
        if stochastic not in ("normal", "subnormal"):
            raise ValueError(f"MiniFloat: stochastic must be 'normal' or 'subnormal'; got {stochastic!r}")
        self.exp_bits = exp_bits
        self.round_up_subnormal = round_up_subnormal
        self.stochastic = stochastic
        self.man_bits = man_bits
        self.bias = 2**exp_bits - 1
        self.qmax = 2 ** (exp_bits + man_bits) - 1
        self.vmax = 2.0 - 2.0**-man_bits  # largest value (exact in float32)
        self.min_normal = 2.0 ** (1 - self.bias)
        self.sub_mul = 2.0 ** (self.bias - 1 + man_bits)  # value -> subnormal code (an exact power of two)
        self.sub_step = 2.0 ** (1 - self.bias - man_bits)  # subnormal code -> value

    def encode(self, u: Tensor, random_bits: Tensor | None = None) -> Tensor:
        """Round float32 ``u`` (>= 0, <= vmax up to rounding) to the nearest code (ties to even), as int32.

        With ``random_bits`` (uint32 values in an int64 tensor shaped like ``u``, see :func:`sr_bits`) the range
        named by ``stochastic`` rounds stochastically instead: up with probability equal to the discarded fraction
        of a code step, truncated to 16 bits. The normal range (the f map): a uniform integer added to the float32
        bits below the kept mantissa, truncated. The subnormal range (the m map, a uniform grid of step
        ``2**(1 - bias - man_bits)``): ``(floor(u * 2**16 / step) + (r >> 16)) >> 16``, ``r >> 16`` the 16 random
        bits as an integer (``u / step`` scaled by a power of two: exact; the floor truncates to 16 fraction bits).
        With ``round_up_subnormal`` (the f map) values below the smallest normal round *up* to the next subnormal
        code: a positive value never becomes 0, so D = sqrt(f) + ε̂ is never underestimated by more than the
        normal range's step (see the module docstring, "zero point").
        """
        u = u.to(torch.float32)
        shift = 23 - self.man_bits
        bits = u.view(torch.int32)
        sr_normal = random_bits is not None and self.stochastic == "normal"
        sr_sub = random_bits is not None and self.stochastic == "subnormal"
        if not sr_normal:
            # Normal range: round the float32 mantissa to man_bits bits (nearest even), then rebias the exponent.
            rounded = (bits + ((1 << (shift - 1)) - 1) + ((bits >> shift) & 1)) >> shift
        else:
            # A uniform integer in [0, 2**shift) added to the bits below the kept mantissa, then truncated.
            rounded = (bits + (random_bits >> (32 - shift)).to(torch.int32)) >> shift
        normal = rounded - ((127 - self.bias) << self.man_bits)
        # Subnormal range: an exact scaling by a power of two, then round half to even (or up, or stochastically).
        y = u * self.sub_mul
        if sr_sub:
            # (u below the normal range only, so the integer fits: < 2**(16 + man_bits))
            fixed = (torch.where(u < self.min_normal, u, 0.0) * (self.sub_mul * 65536.0)).to(torch.int32)
            sub = (fixed + (random_bits >> 16).to(torch.int32)) >> 16
        else:
            sub = torch.round(y)
            if self.round_up_subnormal:
                sub = sub + (sub < y).to(sub.dtype)  # ceil, written as the kernels write it
            sub = sub.to(torch.int32)
        q = torch.where(u < self.min_normal, sub, normal)
        return q.clamp(0, self.qmax)

    def decode(self, q: Tensor) -> Tensor:
        """The float32 value of integer codes ``q`` (in [0, qmax])."""
        q = q.to(torch.int32)
        e = q >> self.man_bits
        mant = q & ((1 << self.man_bits) - 1)
        bits = ((e + (127 - self.bias)) << 23) | (mant << (23 - self.man_bits))
        normal = bits.view(torch.float32)
        sub = mant.to(torch.float32) * self.sub_step
        return torch.where(e == 0, sub, normal)

    def table(self) -> Tensor:
        """All ``qmax + 1`` values in code order (increasing), float32."""
        return self.decode(torch.arange(self.qmax + 1, dtype=torch.int32))


#: The map of m: sign + E3M4 magnitude (int8 codes in [-127, 127]); with random bits its subnormal range rounds
#: stochastically (so that an m whose gradient stopped decays to 0), the normal range to nearest.
M_FORMAT = MiniFloat(3, 4, stochastic="subnormal")
#: The map of f: E4M4 of sqrt(f) (uint8 codes in [0, 255]); with random bits its normal range rounds stochastically;
#: subnormals round up (no zero point).
F_FORMAT = MiniFloat(4, 4, round_up_subnormal=True, stochastic="normal")
#: The largest scale·VMAX (block maximum) of the f map: 2**63, so that s² (≤ 2**126 · (1 + 2**-22)) stays finite.
#: A block whose largest s is beyond it (a gradient above ~1.8e19 = sqrt(FLT_MAX), whose square overflows float32
#: to inf, or s > 2**63) stores that element as code 255 = 2**63: its next f ≈ 2**126 makes D ≈ 9e18 and its
#: update ≈ 0, as fp32 FAdam's f = inf, D = inf makes it 0. Without the clamp the block's scale became inf, every
#: code of the block decoded to 0·inf = NaN at the next step, and the NaN spread to the whole tensor.
F_MAX_S = 2.0**63


_M32 = 0xFFFFFFFF


def _lowbias32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def lowbias32(x: Tensor) -> Tensor:
    """C. Wellons' lowbias32 hash of uint32 values held in an int64 tensor (every operation kept to 32 bits).

    A few values on the CPU (per-tensor seeds: one call per step and parameter under gradient release) are hashed
    as Python integers, the same numbers without six tensor operations' dispatch."""
    if x.device.type == "cpu" and x.numel() <= 16 and x.dtype == torch.int64:
        return torch.tensor([_lowbias32_int(v) for v in x.reshape(-1).tolist()], dtype=torch.int64).reshape(x.shape)
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def sr_seeds(streams: Tensor | Sequence[int] | None, steps: Tensor) -> Tensor:
    """Per-tensor seeds of the f map's stochastic rounding: ``lowbias32(stream ^ lowbias32(t))``, int64.

    ``streams``: the parameters' positions in the optimizer (None: ``0 .. n-1``, the tensors' positions in the
    call); ``steps``: their step counts after the step, stacked (float, as torch optimizers keep them; exact
    integers below 2**24). Computed on ``steps``' device; a ``streams`` tensor already there costs no copy.
    """
    t = steps.to(torch.int64)
    if streams is None:
        s = torch.arange(t.numel(), dtype=torch.int64, device=t.device)
    else:
        s = torch.as_tensor(streams, dtype=torch.int64).to(t.device)
    return lowbias32(s ^ lowbias32(t))


def sr_bits(numel: int, seed: Tensor | int, device: torch.device | str | None = None) -> Tensor:
    """The random bits of elements ``0 .. numel-1`` of a tensor with this seed, int64 (uint32 values): 16 random bits
    on top, half of ``lowbias32(((i >> 5) << 4 | (i & 15)) ^ seed)``, the high half for ``i & 16 == 0`` and the low
    half otherwise (see the module docstring).

    ``seed`` may be a tensor that broadcasts against the elements, e.g. ``(steps, 1)`` for one tensor over steps."""
    i = torch.arange(numel, dtype=torch.int64, device=device) & _M32
    h = lowbias32((((i >> 5) << 4) | (i & 15)) ^ seed)
    return torch.where((i & 16) == 0, h & 0xFFFF0000, (h << 16) & _M32)


def num_blocks(numel: int, block_size: int) -> int:
    """The number of quantization blocks (and scales) of a tensor of ``numel`` elements."""
    return (numel + block_size - 1) // block_size


def _nan_max(x: Tensor, dim: int) -> Tensor:
    # torch.amax propagates NaN (it is not fmax), which is what makes a NaN block decode to NaN.
    return x.amax(dim=dim)


def _blocks(x: Tensor, block_size: int) -> tuple[Tensor, int]:
    """``x`` flat, zero-padded to whole blocks, as (num_blocks, block_size); and the pad length."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size), pad


def quantize_blockwise(
    x: Tensor, block_size: int, signed: bool, seed: Tensor | int | None = None
) -> tuple[Tensor, Tensor]:
    """Quantize float32 ``x`` blockwise: ``(codes, scales)``.

    ``seed``: round the map's stochastic range (:class:`MiniFloat`) with :func:`sr_bits` of this seed: the normal
    range of the f map (FAdam8bit: :func:`sr_seeds`), the subnormal range of the m map (FAdam8bit: m's own seed,
    ``hf_fadam._rounding.rounding_seeds(streams, steps, KIND_EXP_AVG)``); None: round to nearest even.

    ``signed=True`` (the m map): int8 codes, sign and E3M4 magnitude. ``signed=False`` (the f map, applied to
    ``x = sqrt(f)``): uint8 E4M4 codes. Codes have ``x``'s shape; scales are float32 ``(num_blocks,)`` with
    ``scale = absmax / VMAX``, the f map's absmax clamped to :data:`F_MAX_S` (a NaN kept). The scale's reciprocal
    ``VMAX / absmax`` is computed in float32 and multiplied in, exactly as the kernels do, so every implementation
    produces the same codes from the same float32 input.
    """
    fmt = M_FORMAT if signed else F_FORMAT
    x = x.to(torch.float32)
    blocks, pad = _blocks(x, block_size)
    mag = blocks.abs() if signed else blocks
    absmax = _nan_max(mag, 1)
    if not signed:  # (a NaN compares false: kept)
        absmax = torch.where(absmax > F_MAX_S, torch.full_like(absmax, F_MAX_S), absmax)
    vmax = torch.tensor(fmt.vmax, dtype=torch.float32, device=x.device)
    inv = torch.where(absmax > 0, vmax / absmax, torch.zeros_like(absmax))
    inv = torch.where(absmax.isnan(), absmax, inv)
    random_bits = None
    if seed is not None:
        random_bits, _ = _blocks(sr_bits(x.numel(), seed, x.device), block_size)
    q = fmt.encode((mag * inv[:, None]).nan_to_num(0.0), random_bits)
    if signed:
        q = torch.where(blocks < 0, -q, q)
        codes = q.to(torch.int8)
    else:
        codes = q.to(torch.uint8)
    codes = codes.reshape(-1)
    if pad:
        codes = codes[: x.numel()]
    scales = absmax / vmax
    return codes.view(x.shape), scales


def dequantize_blockwise(codes: Tensor, scales: Tensor, block_size: int) -> Tensor:
    """The float32 values of ``codes`` (int8: the m map; uint8: the f map, giving sqrt(f)), shaped like ``codes``."""
    signed = codes.dtype == torch.int8
    if not signed and codes.dtype != torch.uint8:
        raise TypeError(f"dequantize_blockwise: codes must be int8 or uint8; got {codes.dtype}")
    fmt = M_FORMAT if signed else F_FORMAT
    c = codes.reshape(-1).to(torch.int32)
    values = fmt.decode(c.abs()) if signed else fmt.decode(c)
    if signed:
        values = torch.where(c < 0, -values, values)
    n = c.numel()
    expanded = scales.repeat_interleave(block_size)[:n] if n else scales.new_zeros(0)
    return (values * expanded).view(codes.shape)


def code_table(signed: bool) -> Tensor:
    """All values of a map, sorted (for tests and docs): 255 for the signed m map, 256 for the f map."""
    fmt = M_FORMAT if signed else F_FORMAT
    t = fmt.table()
    return torch.cat([-t.flip(0)[:-1], t]) if signed else t


def relative_step(signed: bool) -> float:
    """The largest relative rounding error of a map's normal range (half a mantissa step at a binade's start)."""
    fmt = M_FORMAT if signed else F_FORMAT
    return 0.5 * 2.0**-fmt.man_bits
