r"""Triton kernels for one FAdam8bit step (``FAdam8bit(fused=True)`` on CUDA; tested under ``TRITON_INTERPRET=1``).

One program per quantization block (``BLOCK = block_size`` elements) of every tensor of the call, and one kernel
launched three times (``PHASE`` 0, 1, 2) with the reduce hook in between:

0. ``sums[0, t] += Σ g²`` over the block (``tl.atomic_add`` in float64).
1. f decoded (s = code·scale, f = s²), ``f_new = β̂2·f + (1−β̂2)·g²`` and ``D = f_new^p + ε̂`` in registers;
   ``sums[1, t] += Σ (g/D)²`` and ``sums[2, t] += Σ (θ/D)²``.
2. ``m_new``, ``s_new = sqrt(f_new)`` and θ in registers; the block's absmax of m_new and max of s_new (NaN kept);
   codes and the two scales written (``hf_fadam._quant``'s maps: the same bit operations as the torch reference and
   the C kernel; f rounds stochastically in its normal range, m in its subnormal range, each with ``_quant.sr_bits`` of
   its own seed per tensor and step: half of one lowbias32 per two elements; f's largest block maximum is
   ``_quant.F_MAX_S``). Tensors with fp32 state (no scales) store m and f directly.

Params fp32, bf16 or fp16; the math is fp32 (sums and per-tensor scalars in float64). A bf16/fp16 param is stored as
``param_rounding`` says (:mod:`hf_fadam._rounding`, with the device functions of :mod:`hf_fadam.kernels.triton_fadam`):
to nearest, stochastically (its own seed per tensor and step, ``KIND_PARAM``), or Kahan-compensated (θ = param + comp
in phases 1 and 2, the residual of the nearest store kept in ``param_comps[i]``). The host side builds two small
int64 tables per call (chunk → tensor/offset; the addresses of param, grad, m, f and the two scales); the float
atomics make the sums' last bits vary from run to run, as in :mod:`hf_fadam.kernels.triton_fadam`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._math import fisher_beta
from .._quant import lowbias32, sr_seeds
from .._rounding import KIND_EXP_AVG, KIND_PARAM, check_param_rounding, resolve_param_rounding, rounding_seeds
from .._state_checks import check_8bit_state


__all__ = ["fadam8bit_triton_", "is_available"]

# Whether this kernel stores with hf_fadam._rounding's rules (param_rounding for bf16/fp16 params).
SUPPORTS_ROUNDING = True

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:
    # The stores' device functions, shared with FAdam's kernels (one definition of the rounding bits):
    # _lowbias32/_sr_bits are hf_fadam._quant's hash and bits, _round_sr is hf_fadam._rounding.round_stochastic and
    # _rne the round-to-nearest-even store (through float32; integer ops for bf16 under the interpreter).
    from .triton_fadam import _lowbias32, _rne, _round_sr, _sr_bits  # noqa: F401 (jit globals)

_ROUND_MODES = {"nearest": 0, "stochastic": 1, "kahan": 2}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def is_available() -> bool:
    """Whether :func:`fadam8bit_triton_` can run here: triton importable, and CUDA present or TRITON_INTERPRET=1."""
    return triton is not None and (_interpreting() or torch.cuda.is_available())


if triton is not None:

    @triton.jit
    def _rne_int(y):
        # round half to even for 0 <= y < 2**22, as rintf / torch.round do (no libdevice in the interpreter)
        return ((y + 12582912.0) - 12582912.0).to(tl.int32)

    @triton.jit
    def _encode(u, MAN_SHIFT_BIAS: tl.constexpr, SUB_MUL: tl.constexpr, MIN_NORMAL: tl.constexpr,
                QMAX: tl.constexpr, CEIL_SUB: tl.constexpr):  # fmt: skip
        # _quant.MiniFloat.encode: the float32 mantissa rounded to 4 bits (nearest even), exponent rebiased; an
        # exact power-of-two scaling and rint below the smallest normal; NaN -> 0.
        bits = u.to(tl.uint32, bitcast=True)
        nq = ((bits + 0x3FFFF + ((bits >> 19) & 1)) >> 19).to(tl.int32) - MAN_SHIFT_BIAS
        y = u * SUB_MUL
        sq = _rne_int(y)
        if CEIL_SUB:  # the f map: subnormals round up, a positive s never becomes 0
            sq = tl.where(sq.to(tl.float32) < y, sq + 1, sq)
        q = tl.where(u < MIN_NORMAL, sq, nq)
        q = tl.minimum(tl.maximum(q, 0), QMAX)
        return tl.where(u == u, q, 0)

    @triton.jit
    def _encode_f_sr(u, r):
        # the f map (E4M4, bias 15) with stochastic rounding in the normal range: the 19 mantissa bits below the
        # kept 4 plus r >> 13 (a multiple of 8 in [0, 2**19), see _sr_bits), truncated; subnormals round up; NaN -> 0
        bits = u.to(tl.uint32, bitcast=True)
        nq = ((bits + (r >> 13)) >> 19).to(tl.int32) - (112 << 4)
        y = tl.where(u < 6.103515625e-05, u, 0.0) * 262144.0  # (only the subnormal range is converted)
        sq = _rne_int(y)
        sq = tl.where(sq.to(tl.float32) < y, sq + 1, sq)
        q = tl.where(u < 6.103515625e-05, sq, nq)
        q = tl.minimum(tl.maximum(q, 0), 255)
        return tl.where(u == u, q, 0)

    @triton.jit
    def _encode_m_sr(u, r):
        # the m map (E3M4, bias 7): nearest even in the normal range, and stochastically in the subnormal range (u <
        # 2**-6, a grid of step 2**-10): (floor(u * 2**26) + (r >> 16)) >> 16 (_quant.MiniFloat.encode); NaN -> 0
        qn = _encode(u, 120 << 4, 1024.0, 0.015625, 127, False)
        sub = u < 0.015625
        fixed = (tl.where(sub, u, 0.0) * 67108864.0).to(tl.int32).to(tl.uint32)
        qs = ((fixed + (r >> 16)) >> 16).to(tl.int32)
        return tl.where(sub, qs, qn)

    @triton.jit
    def _decode(q, EXP_ADD: tl.constexpr, SUB_STEP: tl.constexpr):
        nv = ((q.to(tl.uint32) << 19) + (EXP_ADD << 23)).to(tl.float32, bitcast=True)
        return tl.where(q < 16, q.to(tl.float32) * SUB_STEP, nv)

    @triton.jit
    def _store_param(
        p_ptr, c_ptr, offs, theta_new, mask, pseed, P_DT: tl.constexpr, ROUND_MODE: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):  # fmt: skip
        # hf_fadam._rounding's param store: 0 to nearest, 1 stochastic, 2 Kahan (θ' to nearest, the residual into c)
        if ROUND_MODE == 1:
            tl.store(p_ptr + offs, _round_sr(theta_new, offs, pseed, P_DT), mask=mask)
        elif ROUND_MODE == 2:
            stored = _rne(theta_new, P_DT, INTERPRET)
            tl.store(p_ptr + offs, stored, mask=mask)
            tl.store(c_ptr + offs, _rne(theta_new - stored.to(tl.float32), P_DT, INTERPRET), mask=mask)
        else:
            tl.store(p_ptr + offs, _rne(theta_new, P_DT, INTERPRET), mask=mask)

    @triton.jit
    def _nan_max(x, mask):
        # max over the block that keeps a NaN (tl.max would drop it)
        has_nan = tl.sum(tl.where(mask & (x != x), 1, 0), axis=0) > 0
        m = tl.max(tl.where(mask, x, 0.0), axis=0)
        return tl.where(has_nan, float("nan"), m)

    @triton.jit
    def _fadam8bit_pass(
        meta_ptr, addr_ptr, lnum_ptr, sums_ptr, bh_ptr, seed_ptr, mseed_ptr, pseed_ptr, scale_ptr, found_ptr,
        n_tensors, n_chunks, lr, beta1, eps, weight_decay, clip, p,
        PHASE: tl.constexpr, P_DT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr,
        HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr, P_HALF: tl.constexpr, ROUND_MODE: tl.constexpr,
        INTERPRET: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        t = tl.load(meta_ptr + n_tensors + pid)
        start = tl.load(meta_ptr + n_tensors + n_chunks + pid)
        numel = tl.load(meta_ptr + t)
        offs = start + tl.arange(0, BLOCK)
        found = False
        if HAS_FOUND:
            found = tl.load(found_ptr) != 0
            numel = tl.where(found, 0, numel)  # an inf/NaN step: nothing is read or written
        mask = offs < numel
        gmul = 1.0
        if HAS_SCALE:
            gmul = 1.0 / tl.load(scale_ptr).to(tl.float32)
        if MAXIMIZE:
            gmul = -gmul
        g_ptr = tl.load(addr_ptr + n_tensors + t).to(tl.pointer_type(P_DT))
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * gmul
        if PHASE == 0:
            gd = g.to(tl.float64)  # squared in float64: no underflow (|g| ~ 1e-20) or overflow
            tl.atomic_add(sums_ptr + t, tl.sum(gd * gd, axis=0))
        else:
            lnum = tl.maximum(tl.load(lnum_ptr + t), 1.0)
            rms_g = tl.sqrt(tl.load(sums_ptr + t) / lnum)
            eps_hat = tl.where(rms_g > 0, tl.minimum(rms_g, 1.0) * eps, eps).to(tl.float32)
            bh = tl.load(bh_ptr + t).to(tl.float32)
            omb = 1.0 - bh
            p_ptr = tl.load(addr_ptr + t).to(tl.pointer_type(P_DT))
            theta = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            c_ptr = p_ptr
            if ROUND_MODE == 2:  # kahan: the step's θ is the param plus its compensation
                c_ptr = tl.load(addr_ptr + 6 * n_tensors + t).to(tl.pointer_type(P_DT))
                theta = theta + tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            fsc_addr = tl.load(addr_ptr + 5 * n_tensors + t)
            blk = start // BLOCK
            quant = fsc_addr != 0
            # (defined before the run-time branches: compiled Triton keeps no name that only one branch defines)
            f_addr = tl.load(addr_ptr + 3 * n_tensors + t)
            fc_ptr = f_addr.to(tl.pointer_type(tl.uint8))
            ff_ptr = f_addr.to(tl.pointer_type(tl.float32))
            fs_old = tl.load(fsc_addr.to(tl.pointer_type(tl.float32)) + blk, mask=quant, other=0.0)
            if quant:
                so = _decode(tl.load(fc_ptr + offs, mask=mask, other=0).to(tl.int32), 112, 3.814697265625e-06)
                fo = (so * fs_old) * (so * fs_old)
            else:
                fo = tl.load(ff_ptr + offs, mask=mask, other=0.0)
            fn = fo * bh + (g * g) * omb
            sn = tl.sqrt_rn(fn)
            if P_HALF:
                denom = sn + eps_hat
            else:
                safe = tl.where(fn > 0, fn, 1.0)
                denom = tl.where(fn > 0, tl.exp2(p * tl.log2(safe)), 0.0) + eps_hat
            denom = tl.where(mask, denom, 1.0)
            nb = tl.div_rn(g, denom)
            w = tl.div_rn(theta, denom)
            if PHASE == 1:
                nbd = tl.where(mask, nb, 0.0).to(tl.float64)
                tl.atomic_add(sums_ptr + n_tensors + t, tl.sum(nbd * nbd, axis=0))
                if HAS_WD:
                    wd = tl.where(mask, w, 0.0).to(tl.float64)
                    tl.atomic_add(sums_ptr + 2 * n_tensors + t, tl.sum(wd * wd, axis=0))
            else:
                rg = tl.sqrt(tl.load(sums_ptr + n_tensors + t) / lnum) / clip
                kg = tl.where((rg > 1.0) | (rg != rg), rg, 1.0).to(tl.float32)
                mnew_nb = tl.div_rn(nb, kg)
                upd_w = 0.0
                if HAS_WD:
                    rw = tl.sqrt(tl.load(sums_ptr + 2 * n_tensors + t) / lnum) / clip
                    kw = tl.where((rw > 1.0) | (rw != rw), rw, 1.0).to(tl.float32)
                    upd_w = weight_decay * tl.div_rn(w, kw)
                if quant:
                    mc_ptr = tl.load(addr_ptr + 2 * n_tensors + t).to(tl.pointer_type(tl.int8))
                    msc_ptr = tl.load(addr_ptr + 4 * n_tensors + t).to(tl.pointer_type(tl.float32))
                    fsc_ptr = fsc_addr.to(tl.pointer_type(tl.float32))
                    ms_old = tl.load(msc_ptr + blk)
                    c = tl.load(mc_ptr + offs, mask=mask, other=0).to(tl.int32)
                    mo = _decode(tl.abs(c), 120, 0.0009765625) * ms_old
                    mo = tl.where(c < 0, -mo, mo)
                    mn = mo * beta1 + mnew_nb * (1.0 - beta1)
                    amax_m = _nan_max(tl.abs(mn), mask)
                    amax_s = _nan_max(sn, mask)
                    amax_s = tl.where(amax_s > 9.223372036854775808e18, 9.223372036854775808e18, amax_s)  # F_MAX_S
                    inv_m = tl.where(amax_m > 0, tl.div_rn(1.9375, tl.where(amax_m > 0, amax_m, 1.0)), 0.0)
                    inv_s = tl.where(amax_s > 0, tl.div_rn(1.9375, tl.where(amax_s > 0, amax_s, 1.0)), 0.0)
                    mseed = tl.load(mseed_ptr + t).to(tl.uint32)
                    qm = _encode_m_sr(tl.abs(mn) * inv_m, _sr_bits(offs.to(tl.uint32), mseed))
                    tl.store(mc_ptr + offs, tl.where(mn < 0, -qm, qm).to(tl.int8), mask=mask)
                    seed = tl.load(seed_ptr + t).to(tl.uint32)
                    qs = _encode_f_sr(sn * inv_s, _sr_bits(offs.to(tl.uint32), seed))
                    tl.store(fc_ptr + offs, qs.to(tl.uint8), mask=mask)
                    # (on a skipped step the old scales are written back unchanged)
                    tl.store(msc_ptr + blk, tl.where(found, ms_old, tl.div_rn(amax_m, 1.9375)))
                    tl.store(fsc_ptr + blk, tl.where(found, fs_old, tl.div_rn(amax_s, 1.9375)))
                else:
                    mf_ptr = tl.load(addr_ptr + 2 * n_tensors + t).to(tl.pointer_type(tl.float32))
                    mo = tl.load(mf_ptr + offs, mask=mask, other=0.0)
                    mn = mo * beta1 + mnew_nb * (1.0 - beta1)
                    tl.store(mf_ptr + offs, mn, mask=mask)
                    tl.store(ff_ptr + offs, fn, mask=mask)
                pseed = 0
                if ROUND_MODE == 1:
                    pseed = tl.load(pseed_ptr + t).to(tl.uint32)
                _store_param(p_ptr, c_ptr, offs, theta - lr * (mn + upd_w), mask, pseed, P_DT, ROUND_MODE, INTERPRET)


_DTYPES = {}
if triton is not None:
    _DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    return host if device.type == "cpu" else host.pin_memory().to(device, non_blocking=True)


@torch.no_grad()
def fadam8bit_triton_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    fishers: list[Tensor],
    exp_avg_scales: list[Tensor | None],
    fisher_scales: list[Tensor | None],
    steps: list[Tensor],
    *,
    block_size: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip: float,
    p: float,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    numels: Sequence[int] | None = None,
    reduce: Callable[[Tensor], object] | None = None,
    streams: Sequence[int] | None = None,
    param_rounding: str = "nearest",
    param_comps: Sequence[Tensor | None] | None = None,
) -> None:
    """One FAdam8bit step over tensors of one device and param dtype (the contract of ``fadam8bit_cpu_``).

    ``param_rounding`` (``"auto"``, ``"nearest"``, ``"stochastic"``, ``"kahan"``) sets how bf16/fp16 params are
    stored (:mod:`hf_fadam._rounding`); with ``"kahan"`` ``param_comps[i]`` is param i's compensation buffer (its
    dtype and shape), updated in place. The stochastic bits of param i come from ``streams[i]`` (default ``i``)."""
    if triton is None:
        raise RuntimeError("fadam8bit_triton_ needs triton (pip install 'hf-fadam[triton]')")
    n = len(params)
    if n == 0:
        return
    if block_size & (block_size - 1) or not 32 <= block_size <= 4096:
        raise ValueError(f"fadam8bit_triton_: block_size must be a power of two in [32, 4096]; got {block_size}")
    device = params[0].device
    pdt = params[0].dtype
    if pdt not in _DTYPES:
        raise TypeError(f"fadam8bit_triton_: param dtype {pdt} is not supported (float32, bfloat16, float16)")
    check_param_rounding(param_rounding)
    mode = resolve_param_rounding(param_rounding, pdt)
    if streams is not None and len(streams) != n:
        raise ValueError(f"fadam8bit_triton_: streams has {len(streams)} entries for {n} params")
    comps: list[Tensor | None] = [None] * n
    if mode == "kahan":
        if param_comps is None or len(param_comps) != n:
            raise ValueError("fadam8bit_triton_: param_rounding='kahan' needs param_comps, one buffer per param")
        comps = list(param_comps)
    interpreting = _interpreting()
    if interpreting != (device.type == "cpu"):
        raise RuntimeError(
            f"fadam8bit_triton_: tensors on {device} need "
            + ("TRITON_INTERPRET unset (compiled kernels)" if interpreting else "TRITON_INTERPRET=1")
        )
    work = [list(lst) for lst in (params, grads, exp_avgs, fishers, comps)]
    copies = []
    for i in range(n):
        prm, grd = params[i], grads[i]
        if (
            prm.dtype != pdt
            or grd.dtype != pdt
            or prm.device != device
            or grd.device != device
            or grd.shape != prm.shape
        ):
            raise TypeError(
                f"fadam8bit_triton_: params[{i}]/grads[{i}] must be {pdt} on {device} of one shape; got {prm.dtype} "
                f"{tuple(prm.shape)} on {prm.device} / {grd.dtype} {tuple(grd.shape)} on {grd.device}"
            )
        # the kernel writes codes and scales through raw addresses: nothing reaches it unchecked
        check_8bit_state("fadam8bit_triton_", i, prm, exp_avgs[i], fishers[i], exp_avg_scales[i], fisher_scales[i],
                         block_size)  # fmt: skip
        comp = comps[i]
        if mode == "kahan" and (comp is None or comp.shape != prm.shape or comp.dtype != pdt or comp.device != device):
            raise ValueError(
                f"fadam8bit_triton_: param_comps[{i}] must be a {pdt} tensor shaped like its param on {device}"
            )
        for k, lst in enumerate(work):
            if lst[i] is not None and not lst[i].is_contiguous():
                c = lst[i].contiguous()
                if k != 1:
                    copies.append((lst[i], c))
                lst[i] = c
    local = [t.numel() for t in params]
    logical = local if numels is None else list(numels)
    counts = [(x + block_size - 1) // block_size for x in local]
    tidx = [i for i, c in enumerate(counts) for _ in range(c)]
    starts = [j * block_size for c in counts for j in range(c)]
    n_chunks = len(tidx)
    if n_chunks == 0:
        torch._foreach_add_(steps, 0)
        return
    meta = _to_device(torch.tensor(local + tidx + starts, dtype=torch.int64), device)

    def ptr(t):
        return 0 if t is None else t.data_ptr()

    addrs = [ptr(t) for lst in (*work[:4], exp_avg_scales, fisher_scales, work[4]) for t in lst]
    addr = _to_device(torch.tensor(addrs, dtype=torch.int64), device)
    lnum = _to_device(torch.tensor([float(x) for x in logical], dtype=torch.float64), device)
    step_t = torch.stack([t.reshape(()) for t in steps])
    beta_hat = fisher_beta(beta2, step_t).to(device)
    stream_t = None if streams is None else _to_device(torch.tensor(list(streams), dtype=torch.int64), device)
    seeds = sr_seeds(stream_t, step_t).to(device)
    mseeds = lowbias32(seeds ^ KIND_EXP_AVG)  # m's codes: _rounding.rounding_seeds(streams, steps, KIND_EXP_AVG)
    # the params' stochastic rounding bits: their own seeds (hf_fadam._rounding.KIND_PARAM), only where used
    pseeds = rounding_seeds(stream_t, step_t, KIND_PARAM).to(device) if mode == "stochastic" else seeds
    sums = torch.zeros((3, n), dtype=torch.float64, device=device)
    scale_arg = grad_scale if grad_scale is not None else sums
    found_arg = found_inf if found_inf is not None else sums
    args = (meta, addr, lnum, sums, beta_hat, seeds, mseeds, pseeds, scale_arg, found_arg, n, n_chunks,
            float(lr), float(beta1), float(eps), float(weight_decay), float(clip), float(p))  # fmt: skip
    consts = dict(
        P_DT=_DTYPES[pdt], HAS_SCALE=grad_scale is not None, HAS_FOUND=found_inf is not None,
        HAS_WD=weight_decay != 0, MAXIMIZE=bool(maximize), P_HALF=p == 0.5, ROUND_MODE=_ROUND_MODES[mode],
        INTERPRET=interpreting, BLOCK=block_size, num_warps=4,
    )  # fmt: skip
    grid = (n_chunks,)
    _fadam8bit_pass[grid](*args, PHASE=0, **consts)
    if reduce is not None:
        reduce(sums[0:1])
    _fadam8bit_pass[grid](*args, PHASE=1, **consts)
    if reduce is not None:
        reduce(sums[1:3])
    _fadam8bit_pass[grid](*args, PHASE=2, **consts)
    for orig, copy in copies:
        orig.copy_(copy)
