/*
 * FAdam8bit CPU kernel: one FAdam step with blockwise 8-bit m and sqrt(f) (hf_fadam/_quant.py has the maps),
 * built at first use by hf_fadam/kernels/cpu_fused_8bit.py. Plain C, no torch headers.
 *
 * One call steps every tensor of one param dtype. Each tensor is cut into chunks (a whole number of quantization
 * blocks); the OpenMP team shares the chunks of all tensors, phase by phase:
 *
 *   A  sums[0][i] = sum g^2                                            -> (reduce) -> eps_hat
 *   B  sums[1][i] = sum (g/D)^2, sums[2][i] = sum (theta/D)^2           -> (reduce) -> the two clip divisors
 *      with f = (decoded s)^2, f_new = bh f + (1-bh) g^2 and D = f_new^p + eps_hat, recomputed in registers
 *   C  per quantization block: m_new, s_new = sqrt(f_new) and theta into registers / a small local buffer, the
 *      block's absmax of m_new and max of s_new, then the codes and the two new scales are written.
 *
 * Per-chunk partial sums are combined in chunk order, so the sums do not depend on the thread count. `phase` 0
 * runs A, B and C in one parallel region (no reduce); 1, 2, 3 run one phase each, so that the caller can reduce
 * the (local) sums over processes in between (the reduction-hook contract of docs/CONTRACT.md).
 *
 * Tensors whose state is fp32 (below min_8bit_size; their scale pointers are NULL) run the same three passes on
 * float m and f. Codes are encoded with the bit operations of _quant.MiniFloat.encode, bit for bit the torch
 * reference given the same float input: m rounds to nearest even in its normal range and stochastically in its
 * subnormal range (so that an m whose gradient stopped decays to 0), f stochastically in its normal range, each with
 * the counter-based random bits of _quant.sr_bits (sr_bits32: half of one lowbias32 per two elements; one seed per
 * tensor, step and quantity: seeds[0..n) f, [n..2n) m, [2n..3n) the param). f's block maximum is clamped to F_MAX_S
 * (2^63: an inf s, from a gradient whose square overflows, is stored as code 255, not as an inf scale). The build
 * uses -ffp-contract=off. Sums of squares are float64: a float squared in double is exact, so SQ_ADD's fma (where
 * the target has one) gives the same bits as a multiply and an add, in one instruction.
 *
 * bf16/fp16 params are stored by hparams.round_mode (hf_fadam/_rounding.py, bit for bit given the same float input):
 * PARAM_NEAREST (bf16_store / f16_store), PARAM_STOCHASTIC (bf16_store_sr / f16_store_sr with sr_bits16 of the
 * param's seed, the element's index in the tensor), PARAM_KAHAN (theta = param + comp in pass B's sum of (theta/D)^2
 * and in pass C; stored theta = RNE(theta_new), comp = RNE(theta_new - theta)). They take the generic loops (the
 * AVX-512 passes are fp32 params only); round_mode is a compile-time constant in them, so the nearest loops are
 * unchanged. fp32 params are stored as they are.
 *
 * Non-finite values: a NaN in m_new or s_new can only come from a NaN/inf gradient or an already non-finite state,
 * and either makes a per-tensor sum (and so eps_hat or a clip divisor) non-finite, or from eps_hat underflowing to 0
 * (RMS(g) below ~1e-37: a zero gradient over a zero f code is then 0/0), which is checked too. So pass C takes each
 * block's maxima with plain vectorized max and encodes without NaN checks when the tensor's sums are finite, and
 * falls back to a NaN-propagating max (the block's scale becomes NaN, as in the reference) and NaN-safe encoding
 * otherwise, or when a block's maximum overflowed to inf, or when its m maximum is subnormal (VMAX / max may then be
 * inf, and 0 * inf must encode as the reference's 0), in the AVX-512 and the generic loops alike.
 *
 * Cost: decoding is a shift and a multiply per code through float32 subnormals (dn_ok(): AMD x86-64 without DAZ),
 * else a shift, an add and a select; encoding ~7 integer/float ops for m (one float addition rounds both of its
 * ranges, see c_encode) and ~8 for s, plus f's rounding hash (two multiplies, three shift-xors, one per two
 * elements). On one core of the 2-core Zen 4 of the benchmarks here, pass C is compute-bound (~0.76 ns/element, the
 * same with its data in L3 as streamed from memory; measured without the encoding: ~70 % of that, without the hash
 * ~92 %, without the sqrt and division ~91 %); passes A and B run at about the core's read bandwidth (~19 GB/s).
 * The sqrt and the division of B and C take ~16 cycles of the divider per 16 lanes and have long latencies, so
 * both passes are software-pipelined two vectors ahead (B -12 %, C -5 % with their data in cache). So the three
 * passes of fp32 params have hand-vectorized AVX-512 versions (below), pass C runs one block's encoding under the
 * next block's update, and chunks are long (~10 %).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define HF_FADAM8_ABI 4
/* acc + x*x for float x in double (x*x exact): one fma where the target has it; a library fma call elsewhere would
   stop the loop vectorizing */
#ifdef __FMA__
#define SQ_ADD(acc, x) ((acc) = fma((double)(x), (double)(x), (acc)))
#else
#define SQ_ADD(acc, x) ((acc) += (double)(x) * (double)(x))
#endif
#define MAX_BLOCK 4096
/* elements per chunk: long streams per thread (32768 measured 11 % slower on the step benchmark), still ~200 chunks
   for 50M params; one thread below MIN_PARALLEL elements or with one chunk */
#define CHUNK_TARGET 262144
#define MIN_PARALLEL 65536

typedef struct {
    double lr, beta1, eps, weight_decay, clip, p, grad_scale;
    int64_t block_size;
    int maximize, has_grad_scale;
    int round_mode; /* how 16-bit params are stored: PARAM_NEAREST, PARAM_STOCHASTIC, PARAM_KAHAN (0 for fp32) */
} fadam8_hparams;

enum { PARAM_NEAREST = 0, PARAM_STOCHASTIC = 1, PARAM_KAHAN = 2 };

int hf_fadam8_abi_version(void) { return HF_FADAM8_ABI; }

/* ---------------------------------------------------------------- conversions */

static inline float bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float bf16_load(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }
static inline uint16_t bf16_store(float f) {
    uint32_t u = f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float f16_load(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t expo = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    if (expo == 0x1fu) return bits_to_f32(sign | 0x7f800000u | (mant << 13));
    if (expo == 0) {
        float v = (float)mant * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return bits_to_f32(sign | ((expo + 112u) << 23) | (mant << 13));
}
static inline uint16_t f16_store(float f) {
    uint32_t x = f32_to_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) return sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u);
    if (x >= 0x477ff000u) return sign | 0x7c00u;
    if (x < 0x38800000u) {
        float a = bits_to_f32(x) + 0.5f;
        return sign | (uint16_t)(f32_to_bits(a) - 0x3f000000u);
    }
    x += 0xc8000fffu + ((x >> 13) & 1u);
    return sign | (uint16_t)(x >> 13);
}
#define ID(x) (x)
#define ID_SR(x, r) (x)

/* Stochastic stores of 16-bit params (hf_fadam/_rounding.round_stochastic, bit for bit given the same float input
   and bits): r is the element's 16 random bits (0 .. 65535, sr_bits16).
   bf16: (bits(x) + r) >> 16, up with probability low16(x) / 2^16 (a carry into the exponent is the next binade's
   first value; inf only from beyond bf16's largest finite value, as in the reference).
   f16, normal range (|x| >= 2^-14): (bits(x) + (r >> 3)) truncated to 10 mantissa bits, rebiased; past 65504 inf
   (only from |x| > 65504). Subnormal range (a grid of step 2^-24): k = floor(|x| 2^24) rounds up to k + 1 when
   r < frac(|x| 2^24) * 2^16 (float arithmetic, exact). NaN and +-inf are stored as bf16_store / f16_store do. */
static inline uint16_t bf16_store_sr(float x, uint32_t r) {
    const uint32_t u = f32_to_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_store(x); /* NaN */
    return (uint16_t)((u + r) >> 16); /* (+-inf + r stays inf: only the dropped mantissa bits change) */
}
static inline uint16_t f16_store_sr(float x, uint32_t r) {
    const uint32_t u = f32_to_bits(x), a = u & 0x7fffffffu;
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    if (a >= 0x7f800000u) return f16_store(x); /* NaN, +-inf */
    if (a < 0x38800000u) {                     /* |x| < 2^-14: k or k + 1 steps of 2^-24 (k + 1 = 1024: 2^-14) */
        const float sv = bits_to_f32(a) * 16777216.0f, k = floorf(sv);
        return sign | (uint16_t)((uint32_t)k + ((float)r < (sv - k) * 65536.0f));
    }
    const uint32_t y = (a + (r >> 3)) & 0xffffe000u;
    if (y > 0x477fe000u) return sign | 0x7c00u; /* past 65504: inf */
    return sign | (uint16_t)((y - (112u << 23)) >> 13);
}

/* ---------------------------------------------------------------- the two maps (see _quant.py)
 * m: sign + E3M4 (bias 7) magnitude in an int8; s = sqrt(f): E4M4 (bias 15) in a uint8. VMAX = 1.9375 for both.
 */
#define VMAX 1.9375f

/* decode: the float32 bits of a normal code are (q << 19) with the exponent rebiased by (127 - bias); a
   subnormal code (q < 16) is mant * 2^(1 - bias - 4) */
static inline float dec_e3m4(int32_t q) {
    float nv = bits_to_f32(((uint32_t)q << 19) + (120u << 23));
    float sv = (float)q * 0.0009765625f; /* 2^-10 */
    return q < 16 ? sv : nv;
}
static inline float dec_m(int8_t c) {
    int32_t ci = c;
    uint32_t sign = (uint32_t)ci & 0x80000000u;
    float v = dec_e3m4(ci < 0 ? -ci : ci);
    return bits_to_f32(f32_to_bits(v) | sign);
}
static inline float dec_s(uint8_t c) {
    int32_t q = c;
    float nv = bits_to_f32(((uint32_t)q << 19) + (112u << 23));
    float sv = (float)q * 3.814697265625e-06f; /* 2^-18 */
    return q < 16 ? sv : nv;
}
/* The same through float32 subnormals, 3 ops instead of 7: the bits q << 19 are a float32 whose exponent field is
   the code's, and whose subnormal range is the code's, so the code's value is that float times 2^(127 - bias),
   exactly. It needs subnormal float32 inputs read as they are: used only where dn_ok() says so. */
static inline float dec_m_bits(int8_t c) { /* the float32 of the bits: the m code's value * 2^-120 */
    int32_t ci = c;
    uint32_t a = (uint32_t)(ci < 0 ? -ci : ci);
    return bits_to_f32((a << 19) | ((uint32_t)ci & 0x80000000u));
}
static inline float dec_m_dn(int8_t c) { return dec_m_bits(c) * 0x1p120f; }
static inline float dec_s_dn(uint8_t c) { return bits_to_f32((uint32_t)c << 19) * 0x1p112f; }
/* Whether this thread may decode through subnormals: x86-64 AMD (whose multiplier takes subnormal inputs without a
   microcode assist; Intel cores may not) with the MXCSR DAZ bit clear (torch.set_flush_denormal(True) sets it).
   Either way the codes decode to the same values. */
static inline int dn_ok(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    return __builtin_cpu_is("amd") && (__builtin_ia32_stmxcsr() & 0x40u) == 0;
#else
    return 0;
#endif
}
/* round finite u (>= 0) to the nearest code, ties to even: the float32 mantissa rounded to 4 bits and the exponent
   rebiased (normal codes); for the subnormal codes of the m map, u + 2^13 (whose float32 spacing is the code step
   2^-10) rounds u to the nearest step, ties to even, in one addition (the same as rint(u * 2^10)); the f map's
   subnormal codes round up: ceil(u * 2^18) */
static inline int32_t enc_e3m4(float u) {
    uint32_t bits = f32_to_bits(u);
    /* the rebias folded into the rounding constant (it wraps only for u below the normal range, not selected) */
    int32_t nq = (int32_t)((bits + (0x3ffffu - (120u << 23)) + ((bits >> 19) & 1u)) >> 19);
    int32_t sq = (int32_t)(f32_to_bits(u + 8192.0f) - 0x46000000u); /* bits of 2^13 */
    int32_t q = u < 0.015625f ? sq : nq; /* min normal 2^-6 */
    return q > 127 ? 127 : q;
}
static inline int32_t enc_e4m4(float u) {
    uint32_t bits = f32_to_bits(u);
    int32_t nq = (int32_t)((bits + (0x3ffffu - (112u << 23)) + ((bits >> 19) & 1u)) >> 19);
    int32_t sq = (int32_t)ceilf(u * 262144.0f); /* subnormals round up: a positive s never becomes 0 */
    int32_t q = u < 6.103515625e-05f ? sq : nq;  /* min normal 2^-14 */
    return q > 255 ? 255 : q;
}
/* the same for any u: NaN -> 0 (its block's scale is NaN or inf, so the block decodes to NaN either way) */
static inline int32_t enc_e3m4_any(float u) { return u == u ? enc_e3m4(u) : 0; }
static inline int32_t enc_e4m4_any(float u) { return u == u ? enc_e4m4(u) : 0; }
/* C. Wellons' lowbias32: the random bits of f's stochastic rounding (see _quant.py) */
static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}
/* f's rounding bits for element i (see _quant.sr_bits): one lowbias32 serves two elements, i and i ^ 16, 16 bits
   each: h = lowbias32((i >> 5) << 4 | (i & 15)) ^ seed), the high half for i & 16 == 0 and the low half otherwise,
   returned as the top 16 bits of r (r >> 13 then adds a multiple of 8 below 2^19: the probability of rounding up is
   the fraction truncated to 16 bits). Pairs 16 apart, so that 16 lanes hash once for two vectors. */
static inline uint32_t sr_bits32(uint32_t i, uint32_t seed) {
    const uint32_t h = lowbias32((((i >> 5) << 4) | (i & 15u)) ^ seed);
    return (i & 16u) ? h << 16 : h & 0xffff0000u;
}
/* the same 16 bits as a number in [0, 2^16) (the stochastic stores of 16-bit params) */
static inline uint32_t sr_bits16(uint32_t i, uint32_t seed) { return sr_bits32(i, seed) >> 16; }
/* the f map with stochastic rounding in the normal range: the 19 mantissa bits below the kept 4 plus a uniform
   integer in [0, 2^19) (r >> 13), truncated, and the rebias (a multiple of 2^19) folded in; subnormals round up */
static inline int32_t enc_e4m4_sr(float u, uint32_t r) {
    uint32_t bits = f32_to_bits(u);
    int32_t nq = (int32_t)((bits + (r >> 13) - (112u << 23)) >> 19);
    int32_t sq = (int32_t)ceilf(u * 262144.0f);
    int32_t q = u < 6.103515625e-05f ? sq : nq;
    return q > 255 ? 255 : q;
}
static inline int32_t enc_e4m4_sr_any(float u, uint32_t r) { return u == u ? enc_e4m4_sr(u, r) : 0; }
/* the m map with stochastic rounding in its subnormal range (u < 2^-6, a grid of step 2^-10): (floor(u 2^26) +
   (r >> 16)) >> 16, up with probability equal to the fraction of a step truncated to 16 bits, so that an m whose
   gradient stopped decays to 0 (see _quant.py); the normal range to nearest even (enc_e3m4). r: sr_bits32 with m's
   own seed. (The integer conversion only sees u below 2^-6.) */
static inline int32_t enc_e3m4_sr(float u, uint32_t r) {
    const int sub = u < 0.015625f;
    const float us = sub ? u : 0.0f;
    const int32_t sq = (int32_t)(((uint32_t)(us * 67108864.0f) + (r >> 16)) >> 16);
    return sub ? sq : enc_e3m4(u);
}
static inline int32_t enc_e3m4_sr_any(float u, uint32_t r) { return u == u ? enc_e3m4_sr(u, r) : 0; }
/* The f map's largest block maximum, _quant.F_MAX_S = 2^63: s^2 stays finite. An s beyond it (a gradient whose
   square overflows float32 makes s = inf) is stored as code 255 of a block of scale 2^63 / VMAX instead of making the
   scale inf (and the block NaN at the next step); a NaN maximum stays NaN. */
#define F_MAX_S 9.223372036854775808e18f
static inline float clamp_s_max(float as) { return as > F_MAX_S ? F_MAX_S : as; }
static inline float nan_max(float a, float x) { return (x > a || x != x) ? x : a; }

/* ---------------------------------------------------------------- per tensor scalars */

typedef struct {
    float gmul, bh, omb, eps_hat, inv_kg, inv_kw, p, b1, omb1, neg_lr, wd;
    int p_half, want_w, finite, rmode;
    uint32_t seed;  /* f's stochastic rounding: r = sr_bits32(element index, seed) */
    uint32_t mseed; /* m's stochastic rounding (its subnormal range), the same way */
    uint32_t pseed; /* a 16-bit param's stochastic store: sr_bits16(element index, pseed) */
} tscal;

/* seeds: 3 rows of n, f's codes (_quant.sr_seeds), m's codes and the param's stochastic store
   (_rounding.rounding_seeds with KIND_EXP_AVG and KIND_PARAM) */
static void scalars(tscal *s, const fadam8_hparams *hp, const double *sums, int64_t n, int64_t i, double lnumel,
                    double bh, const int64_t *seeds, int phase) {
    s->seed = (uint32_t)seeds[i];
    s->mseed = (uint32_t)seeds[n + i];
    s->pseed = (uint32_t)seeds[2 * n + i];
    s->rmode = hp->round_mode;
    const double inv_scale = hp->has_grad_scale ? 1.0 / hp->grad_scale : 1.0;
    s->gmul = (float)(hp->maximize ? -inv_scale : inv_scale);
    s->bh = (float)bh;
    s->omb = 1.0f - s->bh;
    s->p = (float)hp->p;
    s->p_half = hp->p == 0.5;
    s->want_w = hp->weight_decay != 0.0;
    s->b1 = (float)hp->beta1;
    s->omb1 = (float)(1.0 - hp->beta1);
    s->neg_lr = (float)(-hp->lr);
    s->wd = (float)hp->weight_decay;
    const double nd = lnumel > 1.0 ? lnumel : 1.0;
    s->eps_hat = (float)hp->eps;
    s->inv_kg = s->inv_kw = 1.0f;
    s->finite = 1;
    if (phase >= 2) {
        const double rms_g = sqrt(sums[i] / nd);
        s->eps_hat = (float)(rms_g > 0.0 ? (rms_g < 1.0 ? rms_g : 1.0) * hp->eps : hp->eps);
    }
    if (phase >= 3) {
        /* max(1, RMS/c), keeping a NaN (a non-finite gradient makes the whole update NaN) */
        const double rg = sqrt(sums[n + i] / nd) / hp->clip, rw = sqrt(sums[2 * n + i] / nd) / hp->clip;
        s->inv_kg = (float)((rg > 1.0 || rg != rg) ? 1.0 / rg : 1.0);
        s->inv_kw = (float)((rw > 1.0 || rw != rw) ? 1.0 / rw : 1.0);
        /* eps_hat is 0 only when RMS(g) * eps underflows float32: then 0/0 can make a NaN from finite inputs */
        s->finite = isfinite(sums[i]) && isfinite(rg) && isfinite(rw) && s->eps_hat > 0.0f;
    }
}

/* tensor i's sums from its chunks' partials [c0, c1), added in chunk order (so independent of the thread count):
   after phase 1 sums[i] = sum g^2; after phase 2 sums[n + i], sums[2n + i] = sum (g/D)^2, sum (theta/D)^2 */
static void combine_sums(int phase, int64_t i, int64_t c0, int64_t c1, const double *part, double *sums, int64_t n) {
    double a = 0.0, b = 0.0;
    for (int64_t c = c0; c < c1; ++c) a += part[2 * c];
    if (phase == 2)
        for (int64_t c = c0; c < c1; ++c) b += part[2 * c + 1];
    if (phase == 1) {
        sums[i] = a;
    } else {
        sums[n + i] = a;
        sums[2 * n + i] = b;
    }
}

/* A block's codes where its values may be NaN or its maxima inf (the rare path of pass C, see the header): the
   maxima taken again with NaN propagation into *amax_m, *amax_s (clamped to F_MAX_S), then NaN-safe encoding. ib:
   the block's first element index (element j's rounding bits are sr_bits32(ib + j, seed) for f, with mseed for m). */
static void encode_block_any(int8_t *mc, uint8_t *fc, const float *mbuf, const float *sbuf, int64_t len, uint32_t ib,
                             uint32_t seed, uint32_t mseed, float *amax_m, float *amax_s) {
    float am = 0.0f, as = 0.0f;
    for (int64_t j = 0; j < len; ++j) {
        am = nan_max(am, fabsf(mbuf[j]));
        as = nan_max(as, sbuf[j]);
    }
    as = clamp_s_max(as);
    const float im = am > 0.0f ? VMAX / am : 0.0f, is = as > 0.0f ? VMAX / as : 0.0f;
    for (int64_t j = 0; j < len; ++j) {
        int32_t q = enc_e3m4_sr_any(fabsf(mbuf[j]) * im, sr_bits32(ib + (uint32_t)j, mseed));
        mc[j] = (int8_t)(mbuf[j] < 0.0f ? -q : q);
        fc[j] = (uint8_t)enc_e4m4_sr_any(sbuf[j] * is, sr_bits32(ib + (uint32_t)j, seed));
    }
    *amax_m = am;
    *amax_s = as;
}

/* ---------------------------------------------------------------- AVX-512 passes B and C (fp32 params, p = 0.5)
 * The generic loops below, written 16 lanes at a time with explicit vectors. Compiled from C, those loops run 64
 * elements wide (the byte codes set the width): registers spill, codes are repacked through permutes, and pass B sums
 * each quantization block into eight float64 accumulators reduced at the block's end. Here the accumulators live
 * across blocks, a code widens or narrows in one instruction, and a block's last partial vector takes masked loads
 * and stores. Every float operation is the generic loop's, in its order, so params and state are the generic path's
 * bit for bit given the same sums; pass B's float64 sums are added in another (fixed) order, so they may differ in
 * their last bits. hf_fadam8_set_simd(0) selects the generic loops (the tests compare the two). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define HAVE_SIMD 1
#else
#define HAVE_SIMD 0
#endif
static int use_simd = HAVE_SIMD;
/* test hook: use the AVX-512 passes where they apply (on != 0) or never; returns whether they are compiled in */
int hf_fadam8_set_simd(int on) {
    use_simd = on && HAVE_SIMD;
    return HAVE_SIMD;
}

#if HAVE_SIMD
static inline __mmask16 lanes(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }
static inline __m512 v1(float x) { return _mm512_set1_ps(x); }
static inline __m512i i1(uint32_t x) { return _mm512_set1_epi32((int)x); }

/* 16 s codes (zero-extended) times the block's scale: dn_s, or dec_s (see the scalar decoders) */
static inline __m512 dec_s16(__m512i c, __m512 sc, int dn) {
    if (dn) return _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(c, 19)), sc);
    __m512 nv = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(c, 19), i1(112u << 23)));
    __m512 sv = _mm512_mul_ps(_mm512_cvtepi32_ps(c), v1(3.814697265625e-06f));
    return _mm512_mul_ps(_mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(c, i1(16)), nv, sv), sc);
}
/* 16 m codes (sign-extended) times the block's scale: dec_m_bits, or dec_m */
static inline __m512 dec_m16(__m512i ci, __m512 sc, int dn) {
    __m512i a = _mm512_abs_epi32(ci), v = _mm512_slli_epi32(a, 19);
    if (!dn) {
        __m512 nv = _mm512_castsi512_ps(_mm512_add_epi32(v, i1(120u << 23)));
        __m512 sv = _mm512_mul_ps(_mm512_cvtepi32_ps(a), v1(0.0009765625f));
        v = _mm512_castps_si512(_mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(a, i1(16)), nv, sv));
    }
    v = _mm512_or_si512(v, _mm512_and_si512(ci, i1(0x80000000u)));
    return _mm512_mul_ps(_mm512_castsi512_ps(v), sc);
}
static inline __m512d lo8(__m512 x) { return _mm512_cvtps_pd(_mm512_castps512_ps256(x)); }
static inline __m512d hi8(__m512 x) {
    return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
}

/* one vector of pass B in two stages, elements [i, i + 16) under mask k. Stage 1: g (times gmul unless ug: gmul is
   1) and rd = 1 / (sqrt(f_new) + eps_hat); stage 2 adds (g rd)^2 and (theta rd)^2 to the float64 accumulators. */
typedef struct {
    __m512 gv, rd;
} b_front;
static inline __attribute__((always_inline)) b_front b_stage1(const float *g, const uint8_t *fc, int64_t i,
                                                              __mmask16 k, __m512 sc, const __m512 *c, const int dn,
                                                              const int ug) {
    __m512 gv = _mm512_maskz_loadu_ps(k, g + i);
    if (!ug) gv = _mm512_mul_ps(gv, c[0]);
    __m512 so = dec_s16(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, fc + i)), sc, dn);
    __m512 fn = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(so, so), c[1]), _mm512_mul_ps(_mm512_mul_ps(gv, gv), c[2]));
    const b_front r = {gv, _mm512_div_ps(c[4], _mm512_add_ps(_mm512_sqrt_ps(fn), c[3]))};
    return r;
}
static inline __attribute__((always_inline)) void b_stage2(const float *th, int64_t i, __mmask16 k, const int want_w,
                                                           b_front f, __m512d *acc) {
    __m512 nb = _mm512_maskz_mul_ps(k, f.gv, f.rd);
    acc[0] = _mm512_fmadd_pd(lo8(nb), lo8(nb), acc[0]);
    acc[1] = _mm512_fmadd_pd(hi8(nb), hi8(nb), acc[1]);
    if (want_w) {
        __m512 w = _mm512_maskz_mul_ps(k, _mm512_maskz_loadu_ps(k, th + i), f.rd);
        acc[2] = _mm512_fmadd_pd(lo8(w), lo8(w), acc[2]);
        acc[3] = _mm512_fmadd_pd(hi8(w), hi8(w), acc[3]);
    }
}
/* pass B over one block [blo, bhi), software-pipelined: stage 1 of vectors v + 2, v + 3 is issued before stage 2 of
   v, v + 1, so that the sqrt and division (long latency, ~16 cycles of the divider per vector) run ahead and few
   operations wait on them in the scheduler (measured: 12 % off pass B against one vector after the other). The
   vectors are added to the accumulators in order, as before. */
static inline __attribute__((always_inline)) void b_block(const float *th, const float *g, const uint8_t *fc,
                                                          int64_t blo, int64_t bhi, __m512 sc, const __m512 *c,
                                                          const int dn, const int want_w, const int ug,
                                                          __m512d *acc) {
    const __mmask16 all = (__mmask16)0xFFFF;
    int64_t i = blo;
    if (i + 32 <= bhi) {
        b_front a = b_stage1(g, fc, i, all, sc, c, dn, ug), b = b_stage1(g, fc, i + 16, all, sc, c, dn, ug);
        for (; i + 64 <= bhi; i += 32) {
            const b_front a2 = b_stage1(g, fc, i + 32, all, sc, c, dn, ug);
            const b_front b2 = b_stage1(g, fc, i + 48, all, sc, c, dn, ug);
            b_stage2(th, i, all, want_w, a, acc);
            b_stage2(th, i + 16, all, want_w, b, acc);
            a = a2;
            b = b2;
        }
        b_stage2(th, i, all, want_w, a, acc);
        b_stage2(th, i + 16, all, want_w, b, acc);
        i += 32;
    }
    for (; i < bhi; i += 16) {
        const __mmask16 k = lanes(bhi - i);
        b_stage2(th, i, k, want_w, b_stage1(g, fc, i, k, sc, c, dn, ug), acc);
    }
}
/* the compile-time cases of passes B and C but the decoder: 2 * (the weight term is on) + (gmul is 1), and for pass C
   4 * (inv_kg is 1) */
static inline int simd_flags(const tscal *s) { return 2 * s->want_w + (s->gmul == 1.0f); }
static inline int simd_flags_c(const tscal *s) { return 4 * (s->inv_kg == 1.0f) + simd_flags(s); }
/* pass B of an 8-bit tensor, elements [lo, hi) in whole blocks (but the tensor's last): out = the two sums */
static void pass_b_simd(const float *th, const float *g, const uint8_t *fc, const float *fsc, int64_t bs, int64_t lo,
                        int64_t hi, const tscal *s, double *out) {
    __m512d acc[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
    const __m512 c[5] = {v1(s->gmul), v1(s->bh), v1(s->omb), v1(s->eps_hat), v1(1.0f)};
    const int dn = dn_ok(), flags = simd_flags(s);
    for (int64_t blo = lo; blo < hi; blo += bs) {
        const int64_t bhi = blo + bs < hi ? blo + bs : hi;
        const float sc = fsc[blo / bs];
        const int dnb = dn && sc * 0x1p112f <= FLT_MAX;
        const __m512 scv = v1(dnb ? sc * 0x1p112f : sc);
#define B_CASE(F) \
    case F: b_block(th, g, fc, blo, bhi, scv, c, (F) >> 2, ((F) >> 1) & 1, (F) & 1, acc); break
        switch (4 * dnb + flags) {
            B_CASE(0); B_CASE(1); B_CASE(2); B_CASE(3); B_CASE(4); B_CASE(5); B_CASE(6); B_CASE(7);
        }
#undef B_CASE
    }
    out[0] = _mm512_reduce_add_pd(_mm512_add_pd(acc[0], acc[1]));
    out[1] = _mm512_reduce_add_pd(_mm512_add_pd(acc[2], acc[3]));
}

/* pass A of fp32 params, elements [lo, hi): sum (g * gmul)^2 in float64, in eight accumulators (the generic loop's
   one chain of fma is bound by their latency), added in a fixed order */
static double pass_a_simd(const float *g, int64_t lo, int64_t hi, float gmul) {
    __m512d acc[8];
    for (int k = 0; k < 8; ++k) acc[k] = _mm512_setzero_pd();
    const __m512 gm = v1(gmul);
    int64_t i = lo;
    for (; i + 64 <= hi; i += 64)
        for (int k = 0; k < 4; ++k) {
            __m512 v = _mm512_mul_ps(_mm512_loadu_ps(g + i + 16 * k), gm);
            acc[2 * k] = _mm512_fmadd_pd(lo8(v), lo8(v), acc[2 * k]);
            acc[2 * k + 1] = _mm512_fmadd_pd(hi8(v), hi8(v), acc[2 * k + 1]);
        }
    for (; i < hi; i += 16) {
        __m512 v = _mm512_maskz_mul_ps(lanes(hi - i), _mm512_maskz_loadu_ps(lanes(hi - i), g + i), gm);
        acc[0] = _mm512_fmadd_pd(lo8(v), lo8(v), acc[0]);
        acc[1] = _mm512_fmadd_pd(hi8(v), hi8(v), acc[1]);
    }
    __m512d t = _mm512_add_pd(_mm512_add_pd(_mm512_add_pd(acc[0], acc[1]), _mm512_add_pd(acc[2], acc[3])),
                              _mm512_add_pd(_mm512_add_pd(acc[4], acc[5]), _mm512_add_pd(acc[6], acc[7])));
    return _mm512_reduce_add_pd(t);
}

/* pass C's per-tensor constants, broadcast */
typedef struct {
    __m512 gmul, bh, omb, eps, one, inv_kg, inv_kw, b1, omb1, neg_lr, wd;
} cvec;
/* one vector of pass C's update in two stages (as pass B's), elements [j, j + 16) of the block at blo under mask k.
   Stage 1: g, s_new = sqrt(f_new) and rd = 1 / (s_new + eps_hat); stage 2: theta stored, m_new and s_new into
   mbuf/sbuf (0 in masked lanes), their maxima into *vam, *vas. ug: gmul is 1; kg1: inv_kg is 1 (no clipping of the
   natural gradient; the multiply by 1 is exact and skipped). */
typedef struct {
    __m512 gv, sn, rd;
} c_front;
static inline __attribute__((always_inline)) c_front c_stage1(const float *g, const uint8_t *fc, int64_t i,
                                                              __mmask16 k, __m512 fs_old, const cvec *c, const int dn,
                                                              const int ug) {
    __m512 gv = _mm512_maskz_loadu_ps(k, g + i);
    if (!ug) gv = _mm512_mul_ps(gv, c->gmul);
    __m512 so = dec_s16(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, fc + i)), fs_old, dn);
    __m512 fn = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(so, so), c->bh),
                              _mm512_mul_ps(_mm512_mul_ps(gv, gv), c->omb));
    __m512 sn = _mm512_sqrt_ps(fn);
    const c_front r = {gv, sn, _mm512_div_ps(c->one, _mm512_add_ps(sn, c->eps))};
    return r;
}
static inline __attribute__((always_inline)) void c_stage2(float *th, const int8_t *mc, int64_t blo, int64_t j,
                                                           __mmask16 k, __m512 ms_old, const cvec *c, const int dn,
                                                           const int want_w, const int kg1, c_front f, float *mbuf,
                                                           float *sbuf, __m512 *vam, __m512 *vas) {
    const int64_t i = blo + j;
    __m512 t = _mm512_maskz_loadu_ps(k, th + i);
    __m512 nb = _mm512_mul_ps(f.gv, f.rd);
    if (!kg1) nb = _mm512_mul_ps(nb, c->inv_kg);
    __m512 mo = dec_m16(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, mc + i)), ms_old, dn);
    __m512 mn = _mm512_add_ps(_mm512_mul_ps(mo, c->b1), _mm512_mul_ps(nb, c->omb1));
    __m512 upd = mn;
    if (want_w) upd = _mm512_add_ps(mn, _mm512_mul_ps(c->wd, _mm512_mul_ps(_mm512_mul_ps(t, f.rd), c->inv_kw)));
    _mm512_mask_storeu_ps(th + i, k, _mm512_add_ps(t, _mm512_mul_ps(upd, c->neg_lr)));
    mn = _mm512_maskz_mov_ps(k, mn);
    const __m512 sn = _mm512_maskz_mov_ps(k, f.sn);
    _mm512_storeu_ps(mbuf + j, mn);
    _mm512_storeu_ps(sbuf + j, sn);
    /* the block maxima: max(|mn|, vam) in one VRANGEPS (absolute max, sign cleared), which may keep a NaN, and
       MAXPS, which returns its second operand when either is NaN and so drops one as the generic loop does. A NaN
       cannot occur on the path that uses these maxima (see the header); one that did would send the block to the
       NaN-safe encoder, which takes both maxima again, either way. */
    *vam = _mm512_range_ps(mn, *vam, 0x0B);
    *vas = _mm512_max_ps(sn, *vas);
}
/* lowbias32 of 16 lanes */
static inline __m512i lowbias32_16(__m512i x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, i1(0x7feb352du));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, i1(0x846ca68bu));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}
/* the codes of 16 values under mask k: m (enc_e3m4_sr of |m| * inv_m with the rounding bits rm, 16 bits per lane
   as numbers, i.e. sr_bits32 >> 16; enc_e3m4 where m_sr is 0; signed) and s (enc_e4m4_sr of s * inv_s with the
   rounding bits r, see sr_bits32). The caller guarantees a finite inv_m: then |m| * inv_m <= VMAX (1 + 2^-23), whose
   code is 127, so m's codes need no clamp; s's do (its stochastic rounding can carry a value just above VMAX up). */
static inline __attribute__((always_inline)) void c_encode(int8_t *mc, uint8_t *fc, const float *mbuf,
                                                           const float *sbuf, __mmask16 k, __m512 inv_m, __m512 inv_s,
                                                           __m512i r, const int m_sr, __m512i rm) {
    __m512 mv = _mm512_loadu_ps(mbuf);
    __m512 u = _mm512_mul_ps(_mm512_abs_ps(mv), inv_m);
    __m512i bits = _mm512_castps_si512(u);
    /* enc_e3m4 by one float addition for the normal and the subnormal codes: for u in [2^e, 2^(e+1)), e >= -6 (e = -6
       for all u below 2^-6, the subnormal codes), C = 2^(e+19) + 64 ulps has the float32 spacing 2^(e-4), the code
       step at u, so u + C rounds u to a multiple R of that step, ties to even, and holds it in its mantissa field as
       64 + R (R <= 32). Its exponent field is e + 146, so bits(u + C) + (bits(u + C) >> 19) has the low byte
       64 + R + 16 (e + 146) = 16 (e + 6) + R (mod 256): the code (0..127), which VPMOVDB keeps. No masks; checked
       against enc_e3m4 on every float32 in [0, VMAX (1 + 2^-22)]. */
    __m512i cb = _mm512_max_epu32(_mm512_and_si512(bits, i1(0x7f800000u)), i1(121u << 23)); /* 2^e, e >= -6 */
    cb = _mm512_add_epi32(cb, i1((19u << 23) + 64u));
    __m512i q = _mm512_castps_si512(_mm512_add_ps(u, _mm512_castsi512_ps(cb)));
    q = _mm512_add_epi32(q, _mm512_srli_epi32(q, 19));
    if (m_sr) {
        /* the subnormal codes (u < 2^-6, by the bits: u >= 0) stochastically, enc_e3m4_sr's (floor(u 2^26) + rm) >> 16:
           u + 2^-3 rounded toward zero is 2^-3 + floor(u 2^26) 2^-26 (that binade's spacing is 2^-26), so its bits
           are bits(2^-3) + floor(u 2^26); bits(2^-3) = 0x3e000000 adds 0x3e00 after the shift, whose low byte, all
           that VPMOVDB keeps (of q and of -q), is 0. One float addition and integer ops (no conversion). */
        const __m512 ut = _mm512_add_round_ps(u, v1(0.125f), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        const __m512i fx = _mm512_castps_si512(ut);
        q = _mm512_mask_srli_epi32(q, _mm512_cmplt_epu32_mask(bits, i1(0x3c800000u)), _mm512_add_epi32(fx, rm), 16);
    }
    q = _mm512_mask_sub_epi32(q, _mm512_cmp_ps_mask(mv, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_setzero_si512(), q);
    _mm512_mask_cvtepi32_storeu_epi8(mc, k, q);
    /* enc_e4m4_sr: normal codes (bits + (r >> 13) - rebias) >> 19; subnormal codes ceil(u * 2^18), as the bits of
       u + 2^5 rounded up (its spacing is 2^-18) minus those of 2^5, selected under u < 2^-14 */
    __m512 us = _mm512_mul_ps(_mm512_loadu_ps(sbuf), inv_s);
    __m512i nqs = _mm512_add_epi32(_mm512_castps_si512(us), _mm512_srli_epi32(r, 13));
    nqs = _mm512_srli_epi32(_mm512_sub_epi32(nqs, i1(112u << 23)), 19);
    __m512i sqs = _mm512_castps_si512(_mm512_add_round_ps(us, v1(32.0f), _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
    __m512i qs = _mm512_mask_sub_epi32(nqs, _mm512_cmp_ps_mask(us, v1(6.103515625e-05f), _CMP_LT_OQ), sqs,
                                       i1(0x42000000u));
    _mm512_mask_cvtusepi32_storeu_epi8(fc, k, qs); /* VPMOVUSDB: the clamp at 255 in the store */
}
/* a block whose update is done and whose codes are still to be written: its new m and s in mbuf/sbuf, the
   reciprocals of its new scales, and its maxima (the scales to store once the codes are written) */
typedef struct {
    int64_t blo, blk, len;
    const float *mbuf, *sbuf;
    __m512 inv_m, inv_s;
    float amax_m, amax_s;
} pending_codes;
/* encoding vector j of the pending block alone, under mask k (see sr_bits32 for r; is = iota ^ seed of f and of m) */
typedef struct {
    __m512i f, m;
} iseeds;
static inline __attribute__((always_inline)) void enc_vec(int8_t *mc, uint8_t *fc, const pending_codes *pe,
                                                          int64_t j, __mmask16 k, iseeds is) {
    const uint32_t i0 = (uint32_t)(pe->blo + j); /* a multiple of 16 */
    const __m512i h = lowbias32_16(_mm512_xor_si512(i1((i0 >> 5) << 4), is.f));
    const __m512i r = (i0 & 16u) ? _mm512_slli_epi32(h, 16) : _mm512_and_si512(h, i1(0xffff0000u));
    const __m512i hm = lowbias32_16(_mm512_xor_si512(i1((i0 >> 5) << 4), is.m));
    const __m512i rm = (i0 & 16u) ? _mm512_and_si512(hm, i1(0xffffu)) : _mm512_srli_epi32(hm, 16);
    c_encode(mc + i0, fc + i0, pe->mbuf + j, pe->sbuf + j, k, pe->inv_m, pe->inv_s, r, 1, rm);
}
/* encoding vectors j and j + 16 of the pending block, whole, element index of j a multiple of 32: one hash each for
   f and m */
static inline __attribute__((always_inline)) void enc_pair(int8_t *mc, uint8_t *fc, const pending_codes *pe,
                                                           int64_t j, iseeds is) {
    const uint32_t i0 = (uint32_t)(pe->blo + j);
    const __m512i h = lowbias32_16(_mm512_xor_si512(i1(i0 >> 1), is.f));
    const __m512i hm = lowbias32_16(_mm512_xor_si512(i1(i0 >> 1), is.m));
    const __mmask16 all = (__mmask16)0xFFFF;
    c_encode(mc + i0, fc + i0, pe->mbuf + j, pe->sbuf + j, all, pe->inv_m, pe->inv_s,
             _mm512_and_si512(h, i1(0xffff0000u)), 1, _mm512_srli_epi32(hm, 16));
    c_encode(mc + i0 + 16, fc + i0 + 16, pe->mbuf + j + 16, pe->sbuf + j + 16, all, pe->inv_m, pe->inv_s,
             _mm512_slli_epi32(h, 16), 1, _mm512_and_si512(hm, i1(0xffffu)));
}
/* the pending block's encoding from vector w (one whose element index is a multiple of 16) to its end: pairs where
   aligned to 32 elements, a vector alone before and after them, the partial last one under a mask */
static inline __attribute__((always_inline)) void enc_rest(int8_t *mc, uint8_t *fc, const pending_codes *pe,
                                                           int64_t w, iseeds is) {
    const int64_t pf = pe->len / 16;
    const __mmask16 all = (__mmask16)0xFFFF;
    if (w < pf && ((pe->blo + 16 * w) & 31) != 0) enc_vec(mc, fc, pe, 16 * w++, all, is);
    for (; w + 2 <= pf; w += 2) enc_pair(mc, fc, pe, 16 * w, is);
    if (w < pf) enc_vec(mc, fc, pe, 16 * w++, all, is);
    if (16 * pf < pe->len) enc_vec(mc, fc, pe, 16 * pf, lanes(pe->len - 16 * pf), is);
}
/* the update of the block [blo, blo + len), software-pipelined as pass B's (stage 1 of vectors v + 2, v + 3 before
   stage 2 of v, v + 1), and interleaved with the encoding of the previous block's codes (*pe, len 0 if none), two
   vectors at a time, so that the update's loads and divisions and the encoder's integer work overlap */
static inline __attribute__((always_inline)) void c_block(float *th, const float *g, int8_t *mc, uint8_t *fc,
                                                          int64_t blo, int64_t len, __m512 ms_old, __m512 fs_old,
                                                          const cvec *c, const int dn, const int want_w, const int ug,
                                                          const int kg1, float *mbuf, float *sbuf, __m512 *vam,
                                                          __m512 *vas, const pending_codes *pe, iseeds iseed) {
    const int64_t nf = len / 16, pf = pe->len / 16;
    const __mmask16 all = (__mmask16)0xFFFF;
    int64_t v = 0, w = 0;
    if (pf > 0 && (pe->blo & 31) != 0) enc_vec(mc, fc, pe, 16 * w++, all, iseed); /* then pairs align */
    if (nf >= 2) {
        c_front a = c_stage1(g, fc, blo, all, fs_old, c, dn, ug), b = c_stage1(g, fc, blo + 16, all, fs_old, c, dn, ug);
        for (;; v += 2) {
            const int more = v + 4 <= nf;
            c_front a2 = a, b2 = b;
            if (more) {
                a2 = c_stage1(g, fc, blo + 16 * v + 32, all, fs_old, c, dn, ug);
                b2 = c_stage1(g, fc, blo + 16 * v + 48, all, fs_old, c, dn, ug);
            }
            c_stage2(th, mc, blo, 16 * v, all, ms_old, c, dn, want_w, kg1, a, mbuf, sbuf, vam, vas);
            c_stage2(th, mc, blo, 16 * v + 16, all, ms_old, c, dn, want_w, kg1, b, mbuf, sbuf, vam, vas);
            if (w + 2 <= pf) {
                enc_pair(mc, fc, pe, 16 * w, iseed);
                w += 2;
            }
            if (!more) break;
            a = a2;
            b = b2;
        }
        v += 2;
    }
    for (; 16 * v < len; ++v) {
        const __mmask16 k = lanes(len - 16 * v);
        c_stage2(th, mc, blo, 16 * v, k, ms_old, c, dn, want_w, kg1, c_stage1(g, fc, blo + 16 * v, k, fs_old, c, dn, ug),
                 mbuf, sbuf, vam, vas);
    }
    enc_rest(mc, fc, pe, w, iseed);
}
/* the pending block's codes are written: its scales too */
static inline void finish_pending(pending_codes *pe, float *msc, float *fsc) {
    msc[pe->blk] = pe->amax_m / VMAX;
    fsc[pe->blk] = pe->amax_s / VMAX;
    pe->len = 0;
}
/* pass C of an 8-bit tensor, elements [lo, hi) in whole blocks (but the tensor's last): block b's update runs
   together with block b-1's encoding (two buffers), the last block's encoding alone */
static void pass_c_simd(float *th, const float *g, int8_t *mc, uint8_t *fc, float *msc, float *fsc, int64_t bs,
                        int64_t lo, int64_t hi, const tscal *s) {
    float bufs[2][2][MAX_BLOCK + 16];
    const cvec c = {v1(s->gmul), v1(s->bh),     v1(s->omb),  v1(s->eps_hat), v1(1.0f), v1(s->inv_kg),
                    v1(s->inv_kw), v1(s->b1), v1(s->omb1), v1(s->neg_lr),  v1(s->wd)};
    const int dn = dn_ok();
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const iseeds iseed = {_mm512_xor_si512(iota, i1(s->seed)), _mm512_xor_si512(iota, i1(s->mseed))}; /* see enc_vec */
    const int flags = simd_flags_c(s);
    pending_codes pe = {0, 0, 0, NULL, NULL, _mm512_setzero_ps(), _mm512_setzero_ps(), 0.0f, 0.0f};
    int slot = 0;
    for (int64_t blo = lo; blo < hi; blo += bs) {
        const int64_t blk = blo / bs, bhi = blo + bs < hi ? blo + bs : hi, len = bhi - blo;
        float *mbuf = bufs[slot][0], *sbuf = bufs[slot][1];
        __m512 vam = _mm512_setzero_ps(), vas = vam;
        const int dnb = dn && msc[blk] * 0x1p120f <= FLT_MAX && fsc[blk] * 0x1p112f <= FLT_MAX;
        const __m512 ms_old = v1(dnb ? msc[blk] * 0x1p120f : msc[blk]);
        const __m512 fs_old = v1(dnb ? fsc[blk] * 0x1p112f : fsc[blk]);
#define C_CASE(F)                                                                                                   \
    case F:                                                                                                         \
        c_block(th, g, mc, fc, blo, len, ms_old, fs_old, &c, (F) >> 3, ((F) >> 1) & 1, (F) & 1, ((F) >> 2) & 1,     \
                mbuf, sbuf, &vam, &vas, &pe, iseed);                                                                 \
        break
        switch (8 * dnb + flags) {
            C_CASE(0); C_CASE(1); C_CASE(2); C_CASE(3); C_CASE(4); C_CASE(5); C_CASE(6); C_CASE(7);
            C_CASE(8); C_CASE(9); C_CASE(10); C_CASE(11); C_CASE(12); C_CASE(13); C_CASE(14); C_CASE(15);
        }
#undef C_CASE
        if (pe.len > 0) finish_pending(&pe, msc, fsc);
        float amax_m = _mm512_reduce_max_ps(vam), amax_s = clamp_s_max(_mm512_reduce_max_ps(vas));
        /* the rare path: a NaN possible, a maximum overflowed, or one so small (subnormal) that VMAX / amax_m is inf */
        if (!s->finite || !(amax_m <= 3.4e38f && amax_s <= 3.4e38f) || (amax_m > 0.0f && amax_m < FLT_MIN)) {
            encode_block_any(mc + blo, fc + blo, mbuf, sbuf, len, (uint32_t)blo, s->seed, s->mseed, &amax_m,
                             &amax_s);
            msc[blk] = amax_m / VMAX;
            fsc[blk] = amax_s / VMAX;
        } else {
            pe.blo = blo;
            pe.blk = blk;
            pe.len = len;
            pe.mbuf = mbuf;
            pe.sbuf = sbuf;
            pe.inv_m = v1(amax_m > 0.0f ? VMAX / amax_m : 0.0f);
            pe.inv_s = v1(amax_s > 0.0f ? VMAX / amax_s : 0.0f);
            pe.amax_m = amax_m;
            pe.amax_s = amax_s;
            slot ^= 1;
        }
    }
    if (pe.len > 0) {
        enc_rest(mc, fc, &pe, 0, iseed);
        finish_pending(&pe, msc, fsc);
    }
}

/* the AVX-512 passes take fp32 params, 8-bit state, p = 0.5 and whole vectors per block */
static inline int simd_applies(const float *fsc, int64_t bs, const tscal *s) {
    return use_simd && fsc != NULL && s->p_half && bs % 16 == 0;
}
#define TRY_SIMD_A_f32(g, lo, hi, gmul, out) (use_simd ? (*(out) = pass_a_simd(g, lo, hi, gmul), 1) : 0)
#define TRY_SIMD_B_f32(th, g, fstate, fsc, bs, lo, hi, s, out)                                                      \
    (simd_applies(fsc, bs, s) ? (pass_b_simd(th, g, (const uint8_t *)(fstate), fsc, bs, lo, hi, s, out), 1) : 0)
#define TRY_SIMD_C_f32(th, g, mc, fc, msc, fsc, bs, lo, hi, s)                                                      \
    (simd_applies(fsc, bs, s) ? (pass_c_simd(th, g, mc, fc, msc, fsc, bs, lo, hi, s), 1) : 0)
#else
#define TRY_SIMD_A_f32(...) 0
#define TRY_SIMD_B_f32(...) 0
#define TRY_SIMD_C_f32(...) 0
#endif
#define TRY_SIMD_A_bf16(...) 0
#define TRY_SIMD_A_f16(...) 0
#define TRY_SIMD_B_bf16(...) 0
#define TRY_SIMD_C_bf16(...) 0
#define TRY_SIMD_B_f16(...) 0
#define TRY_SIMD_C_f16(...) 0

/* ---------------------------------------------------------------- passes, per param storage type */
#define DEFINE_PASSES(NAME, PT, LDP, STP, SRP, ROUNDS)                                                              \
    static double pass_a_##NAME(const PT *g, int64_t lo, int64_t hi, float gmul) {                                  \
        double s = 0.0;                                                                                             \
        if (TRY_SIMD_A_##NAME(g, lo, hi, gmul, &s)) return s;                                                       \
        _Pragma("omp simd reduction(+:s)") for (int64_t i = lo; i < hi; ++i) {                                      \
            float v = LDP(g[i]) * gmul;                                                                             \
            SQ_ADD(s, v); /* squared in double: no underflow or overflow */                                         \
        }                                                                                                           \
        return s;                                                                                                   \
    }                                                                                                               \
    /* elements [lo, hi) of one block (8-bit: scale sc, or sc * 2^112 when dn) or of an fp32-state range: the       \
       sums of (g/D)^2 and (theta/D)^2 added to ab[0], ab[1]; f_old is the decoded s squared or the float state;   \
       kahan: theta = param + comp */                                                                               \
    static inline __attribute__((always_inline)) void pass_b_range_##NAME(                                          \
        const PT *th, const PT *cp, const PT *g, const void *fstate, float sc, int64_t lo, int64_t hi,              \
        const tscal *s, const int quant, const int p_half, const int want_w, const int dn, const int kahan,         \
        double *ab) {                                                                                               \
        double a = 0.0, b = 0.0;                                                                                    \
        const float gmul = s->gmul, bh = s->bh, omb = s->omb, eps_hat = s->eps_hat, p = s->p;                       \
        _Pragma("omp simd reduction(+:a,b)") for (int64_t i = lo; i < hi; ++i) {                                    \
            float gv = LDP(g[i]) * gmul;                                                                            \
            float fo;                                                                                               \
            if (quant) {                                                                                            \
                const uint8_t c = ((const uint8_t *)fstate)[i];                                                     \
                float so = (dn ? bits_to_f32((uint32_t)c << 19) : dec_s(c)) * sc;                                   \
                fo = so * so;                                                                                       \
            } else {                                                                                                \
                fo = ((const float *)fstate)[i];                                                                    \
            }                                                                                                       \
            float fn = fo * bh + (gv * gv) * omb;                                                                   \
            float rd = 1.0f / ((p_half ? sqrtf(fn) : powf(fn, p)) + eps_hat);                                       \
            float nb = gv * rd;                                                                                     \
            SQ_ADD(a, nb);                                                                                          \
            if (want_w) {                                                                                           \
                float t = LDP(th[i]);                                                                               \
                if (kahan) t += LDP(cp[i]);                                                                         \
                float w = t * rd;                                                                                   \
                SQ_ADD(b, w);                                                                                       \
            }                                                                                                       \
        }                                                                                                           \
        ab[0] += a;                                                                                                 \
        ab[1] += b;                                                                                                 \
    }                                                                                                               \
    /* pass B over [lo, hi) (whole blocks but the tensor's last), block by block for 8-bit state: a block decodes   \
       through float32 subnormals (dn, scale folded with 2^112, the same products) when the CPU allows it and the   \
       folded scale is finite */                                                                                    \
    static inline __attribute__((always_inline)) void pass_b_impl_##NAME(                                           \
        const PT *th, const PT *cp, const PT *g, const void *fstate, const float *fsc, int64_t bs, int64_t lo,      \
        int64_t hi, const tscal *s, const int quant, const int p_half, const int want_w, const int dn,              \
        const int kahan, double *out) {                                                                             \
        double ab[2] = {0.0, 0.0};                                                                                  \
        if (!quant) {                                                                                               \
            pass_b_range_##NAME(th, cp, g, fstate, 0.0f, lo, hi, s, 0, p_half, want_w, 0, kahan, ab);               \
        } else {                                                                                                    \
            for (int64_t blo = lo; blo < hi; blo += bs) {                                                           \
                const int64_t bhi = blo + bs < hi ? blo + bs : hi;                                                  \
                const float sc = fsc[blo / bs];                                                                     \
                if (dn && sc * 0x1p112f <= FLT_MAX)                                                                 \
                    pass_b_range_##NAME(th, cp, g, fstate, sc * 0x1p112f, blo, bhi, s, 1, p_half, want_w, 1, kahan, \
                                        ab);                                                                        \
                else                                                                                                \
                    pass_b_range_##NAME(th, cp, g, fstate, sc, blo, bhi, s, 1, p_half, want_w, 0, kahan, ab);       \
            }                                                                                                       \
        }                                                                                                           \
        out[0] = ab[0];                                                                                             \
        out[1] = ab[1];                                                                                             \
    }                                                                                                               \
    static inline __attribute__((always_inline)) void pass_b_cases_##NAME(                                          \
        const PT *th, const PT *cp, const PT *g, const void *fstate, const float *fsc, int64_t bs, int64_t lo,      \
        int64_t hi, const tscal *s, const int kahan, double *out) {                                                 \
        const int q = fsc != NULL;                                                                                  \
        const int dn = q && dn_ok();                                                                                \
        if (q && s->p_half && s->want_w) {                                                                          \
            if (dn) pass_b_impl_##NAME(th, cp, g, fstate, fsc, bs, lo, hi, s, 1, 1, 1, 1, kahan, out);              \
            else pass_b_impl_##NAME(th, cp, g, fstate, fsc, bs, lo, hi, s, 1, 1, 1, 0, kahan, out);                 \
        } else if (q && s->p_half) {                                                                                \
            if (dn) pass_b_impl_##NAME(th, cp, g, fstate, fsc, bs, lo, hi, s, 1, 1, 0, 1, kahan, out);              \
            else pass_b_impl_##NAME(th, cp, g, fstate, fsc, bs, lo, hi, s, 1, 1, 0, 0, kahan, out);                 \
        } else if (q) pass_b_impl_##NAME(th, cp, g, fstate, fsc, bs, lo, hi, s, 1, 0, s->want_w, 0, kahan, out);    \
        else pass_b_impl_##NAME(th, cp, g, fstate, fsc, bs, lo, hi, s, 0, s->p_half, s->want_w, 0, kahan, out);     \
    }                                                                                                               \
    static void pass_b_##NAME(const PT *th, const PT *cp, const PT *g, const void *fstate, const float *fsc,        \
                              int64_t bs, int64_t lo, int64_t hi, const tscal *s, double *out) {                    \
        if (TRY_SIMD_B_##NAME(th, g, fstate, fsc, bs, lo, hi, s, out)) return;                                      \
        /* (Kahan only for 16-bit params: ROUNDS is 0 for fp32, whose store is exact) */                            \
        if (ROUNDS && s->rmode == PARAM_KAHAN) pass_b_cases_##NAME(th, cp, g, fstate, fsc, bs, lo, hi, s, 1, out);  \
        else pass_b_cases_##NAME(th, cp, g, fstate, fsc, bs, lo, hi, s, 0, out);                                    \
    }                                                                                                               \
    /* the param's store of theta_new at element i by rmode (a compile-time constant at every call): to nearest,    \
       stochastically (its own bits), or Kahan (theta to nearest, the residual to nearest into cp) */               \
    static inline __attribute__((always_inline)) void store_param_##NAME(PT *th, PT *cp, int64_t i, float tn,       \
                                                                         const int rmode, uint32_t pseed) {          \
        (void)pseed;                                                                                                \
        if (ROUNDS && rmode == PARAM_STOCHASTIC) {                                                                  \
            th[i] = SRP(tn, sr_bits16((uint32_t)i, pseed));                                                         \
        } else if (ROUNDS && rmode == PARAM_KAHAN) {                                                                \
            const PT st = STP(tn);                                                                                  \
            th[i] = st;                                                                                             \
            cp[i] = STP(tn - LDP(st));                                                                              \
        } else {                                                                                                    \
            th[i] = STP(tn);                                                                                        \
        }                                                                                                           \
    }                                                                                                               \
    /* the update of one quantization block [blo, bhi) of an 8-bit tensor */                                        \
    static inline __attribute__((always_inline)) void pass_c_block_##NAME(                                          \
        PT *th, PT *cp, const PT *g, int8_t *mc, uint8_t *fc, float *msc, float *fsc, int64_t blk, int64_t blo,     \
        int64_t bhi, const tscal *s, const int p_half, const int want_w, const int dn, const int rmode,             \
        float *mbuf, float *sbuf) {                                                                                 \
        const float gmul = s->gmul, bh = s->bh, omb = s->omb, eps_hat = s->eps_hat, p = s->p;                       \
        const float inv_kg = s->inv_kg, inv_kw = s->inv_kw, b1 = s->b1, omb1 = s->omb1;                             \
        const float neg_lr = s->neg_lr, wd = s->wd;                                                                 \
        const uint32_t seed = s->seed, ib = (uint32_t)blo; /* f's rounding bits: sr_bits32(ib + j, seed) */        \
        const uint32_t pseed = s->pseed, mseed = s->mseed;                                                          \
        /* dn: the codes' float32 subnormal bits times the scales * 2^120 (m) and * 2^112 (s) (finite: the caller   \
           checks), the same products as decode * scale */                                                          \
        const float ms_old = dn ? msc[blk] * 0x1p120f : msc[blk], fs_old = dn ? fsc[blk] * 0x1p112f : fsc[blk];     \
        const int64_t len = bhi - blo;                                                                              \
        float amax_m = 0.0f, amax_s = 0.0f;                                                                         \
        _Pragma("omp simd reduction(max:amax_m,amax_s)") for (int64_t j = 0; j < len; ++j) {                        \
            const int64_t i = blo + j;                                                                              \
            float gv = LDP(g[i]) * gmul;                                                                            \
            float so = (dn ? bits_to_f32((uint32_t)fc[i] << 19) : dec_s(fc[i])) * fs_old;                           \
            float fo = so * so;                                                                                     \
            float fn = fo * bh + (gv * gv) * omb;                                                                   \
            float sn = sqrtf(fn);                                                                                   \
            float rd = 1.0f / ((p_half ? sn : powf(fn, p)) + eps_hat);                                              \
            float t = LDP(th[i]);                                                                                   \
            if (ROUNDS && rmode == PARAM_KAHAN) t += LDP(cp[i]);                                                    \
            float nb = (gv * rd) * inv_kg;                                                                          \
            float mo = (dn ? dec_m_bits(mc[i]) : dec_m(mc[i])) * ms_old;                                            \
            float mn = mo * b1 + nb * omb1;                                                                         \
            float upd = mn;                                                                                         \
            if (want_w) upd = mn + wd * ((t * rd) * inv_kw);                                                        \
            store_param_##NAME(th, cp, i, t + upd * neg_lr, rmode, pseed);                                          \
            mbuf[j] = mn;                                                                                           \
            sbuf[j] = sn;                                                                                           \
            float am = fabsf(mn);                                                                                   \
            amax_m = am > amax_m ? am : amax_m;                                                                     \
            amax_s = sn > amax_s ? sn : amax_s;                                                                     \
        }                                                                                                           \
        /* A NaN in m or s implies a non-finite per-tensor sum (see the header), so a block is checked for NaN      \
           only when s->finite is 0, or when its maxima overflowed. A subnormal m maximum takes the same encoder    \
           (as in pass_c_simd): VMAX / amax_m may be inf, and an m of 0 must get code 0 (0 * inf is NaN, which      \
           enc_e3m4_any maps to 0, as the reference does), not enc_e3m4's 127 */                                    \
        amax_s = clamp_s_max(amax_s);                                                                               \
        if (!s->finite || !(amax_m <= 3.4e38f && amax_s <= 3.4e38f) || (amax_m > 0.0f && amax_m < FLT_MIN)) {       \
            encode_block_any(mc + blo, fc + blo, mbuf, sbuf, len, ib, seed, mseed, &amax_m, &amax_s);               \
        } else {                                                                                                    \
            const float inv_m = amax_m > 0.0f ? VMAX / amax_m : 0.0f;                                               \
            const float inv_s = amax_s > 0.0f ? VMAX / amax_s : 0.0f;                                               \
            int8_t *mcb = mc + blo;                                                                                 \
            uint8_t *fcb = fc + blo;                                                                                \
            const int32_t n32 = (int32_t)len;                                                                       \
            _Pragma("omp simd") for (int32_t j = 0; j < n32; ++j) {                                                 \
                float mv = mbuf[j];                                                                                 \
                int32_t q = enc_e3m4_sr(fabsf(mv) * inv_m, sr_bits32(ib + (uint32_t)j, mseed));                     \
                mcb[j] = (int8_t)(mv < 0.0f ? -q : q);                                                              \
                fcb[j] = (uint8_t)enc_e4m4_sr(sbuf[j] * inv_s, sr_bits32(ib + (uint32_t)j, seed));               \
            }                                                                                                       \
        }                                                                                                           \
        msc[blk] = amax_m / VMAX;                                                                                   \
        fsc[blk] = amax_s / VMAX;                                                                                   \
    }                                                                                                               \
    static inline __attribute__((always_inline)) void pass_c_cases_##NAME(                                          \
        PT *th, PT *cp, const PT *g, int8_t *mc, uint8_t *fc, float *msc, float *fsc, int64_t bs, int64_t lo,       \
        int64_t hi, const tscal *s, const int rmode) {                                                              \
        float mbuf[MAX_BLOCK], sbuf[MAX_BLOCK];                                                                     \
        const int dn = dn_ok();                                                                                     \
        for (int64_t blo = lo; blo < hi; blo += bs) {                                                               \
            const int64_t bhi = blo + bs < hi ? blo + bs : hi, b = blo / bs;                                        \
            const int dnb = dn && msc[b] * 0x1p120f <= FLT_MAX && fsc[b] * 0x1p112f <= FLT_MAX;                     \
            if (s->p_half && s->want_w && dnb)                                                                      \
                pass_c_block_##NAME(th, cp, g, mc, fc, msc, fsc, b, blo, bhi, s, 1, 1, 1, rmode, mbuf, sbuf);       \
            else if (s->p_half && s->want_w)                                                                        \
                pass_c_block_##NAME(th, cp, g, mc, fc, msc, fsc, b, blo, bhi, s, 1, 1, 0, rmode, mbuf, sbuf);       \
            else if (s->p_half && dnb)                                                                              \
                pass_c_block_##NAME(th, cp, g, mc, fc, msc, fsc, b, blo, bhi, s, 1, 0, 1, rmode, mbuf, sbuf);       \
            else if (s->p_half)                                                                                     \
                pass_c_block_##NAME(th, cp, g, mc, fc, msc, fsc, b, blo, bhi, s, 1, 0, 0, rmode, mbuf, sbuf);       \
            else                                                                                                    \
                pass_c_block_##NAME(th, cp, g, mc, fc, msc, fsc, b, blo, bhi, s, 0, s->want_w, 0, rmode, mbuf,      \
                                    sbuf);                                                                          \
        }                                                                                                           \
    }                                                                                                               \
    static void pass_c_q_##NAME(PT *th, PT *cp, const PT *g, int8_t *mc, uint8_t *fc, float *msc, float *fsc,       \
                                int64_t bs, int64_t lo, int64_t hi, const tscal *s) {                               \
        if (TRY_SIMD_C_##NAME(th, g, mc, fc, msc, fsc, bs, lo, hi, s)) return;                                      \
        if (ROUNDS && s->rmode == PARAM_STOCHASTIC)                                                                 \
            pass_c_cases_##NAME(th, cp, g, mc, fc, msc, fsc, bs, lo, hi, s, PARAM_STOCHASTIC);                      \
        else if (ROUNDS && s->rmode == PARAM_KAHAN)                                                                 \
            pass_c_cases_##NAME(th, cp, g, mc, fc, msc, fsc, bs, lo, hi, s, PARAM_KAHAN);                           \
        else                                                                                                        \
            pass_c_cases_##NAME(th, cp, g, mc, fc, msc, fsc, bs, lo, hi, s, PARAM_NEAREST);                         \
    }                                                                                                               \
    /* fp32-state tensors (small ones): FAdam's update on float m and f */                                          \
    static void pass_c_f_##NAME(PT *th, PT *cp, const PT *g, float *m, float *f, int64_t lo, int64_t hi,            \
                                const tscal *s) {                                                                   \
        const int rmode = ROUNDS ? s->rmode : PARAM_NEAREST;                                                        \
        for (int64_t i = lo; i < hi; ++i) {                                                                         \
            float gv = LDP(g[i]) * s->gmul;                                                                         \
            float fn = f[i] * s->bh + (gv * gv) * s->omb;                                                           \
            float rd = 1.0f / ((s->p_half ? sqrtf(fn) : powf(fn, s->p)) + s->eps_hat);                              \
            float t = LDP(th[i]);                                                                                   \
            if (rmode == PARAM_KAHAN) t += LDP(cp[i]);                                                              \
            float nb = (gv * rd) * s->inv_kg;                                                                       \
            float mn = m[i] * s->b1 + nb * s->omb1;                                                                 \
            float upd = mn;                                                                                         \
            if (s->want_w) upd = mn + s->wd * ((t * rd) * s->inv_kw);                                               \
            f[i] = fn;                                                                                              \
            m[i] = mn;                                                                                              \
            if (rmode == PARAM_STOCHASTIC) store_param_##NAME(th, cp, i, t + upd * s->neg_lr, 1, s->pseed);         \
            else if (rmode == PARAM_KAHAN) store_param_##NAME(th, cp, i, t + upd * s->neg_lr, 2, s->pseed);         \
            else store_param_##NAME(th, cp, i, t + upd * s->neg_lr, 0, s->pseed);                                   \
        }                                                                                                           \
    }                                                                                                               \
                                                                                                                    \
    static void run_chunk_##NAME(int phase, int64_t c, const int64_t *ctid, const int64_t *cstart, int64_t cs,      \
                                 void *const *params, void *const *comps, void *const *grads, void *const *ms,      \
                                 void *const *fs, float *const *msc, float *const *fsc, const int64_t *numels,      \
                                 const double *lnumels, const double *bhat, const int64_t *seeds,                   \
                                 const double *sums, int64_t n,                                                     \
                                 const fadam8_hparams *hp, double *part) {                                          \
        const int64_t i = ctid[c], lo = cstart[c];                                                                  \
        const int64_t hi = lo + cs < numels[i] ? lo + cs : numels[i];                                               \
        tscal s;                                                                                                    \
        scalars(&s, hp, sums, n, i, lnumels[i], bhat[i], seeds, phase);                                             \
        PT *th = (PT *)params[i];                                                                                   \
        PT *cp = (PT *)comps[i]; /* Kahan's compensation (NULL unless round_mode is PARAM_KAHAN) */                 \
        const PT *g = (const PT *)grads[i];                                                                         \
        if (phase == 1) {                                                                                           \
            part[2 * c] = pass_a_##NAME(g, lo, hi, s.gmul);                                                         \
        } else if (phase == 2) {                                                                                    \
            pass_b_##NAME(th, cp, g, fs[i], fsc[i], hp->block_size, lo, hi, &s, part + 2 * c);                      \
        } else if (fsc[i] != NULL) {                                                                                \
            pass_c_q_##NAME(th, cp, g, (int8_t *)ms[i], (uint8_t *)fs[i], msc[i], fsc[i], hp->block_size, lo, hi,   \
                            &s);                                                                                    \
        } else {                                                                                                    \
            pass_c_f_##NAME(th, cp, g, (float *)ms[i], (float *)fs[i], lo, hi, &s);                                 \
        }                                                                                                           \
    }                                                                                                               \
                                                                                                                    \
    int hf_fadam8_step_##NAME(int64_t n, void *const *params, void *const *comps, void *const *grads,              \
                              void *const *ms, void *const *fs, float *const *msc, float *const *fsc,               \
                              const int64_t *numels, const double *lnumels, const double *bhat,                     \
                              const int64_t *seeds, double *sums, const fadam8_hparams *hp, int phase,              \
                              int nthreads) {                                                                       \
        const int64_t bs = hp->block_size;                                                                          \
        if (bs < 1 || bs > MAX_BLOCK) return -1;                                                                    \
        const int64_t cs = (CHUNK_TARGET + bs - 1) / bs * bs;                                                       \
        int64_t nchunks = 0, total = 0;                                                                             \
        for (int64_t i = 0; i < n; ++i) {                                                                           \
            nchunks += (numels[i] + cs - 1) / cs;                                                                   \
            total += numels[i];                                                                                     \
        }                                                                                                           \
        int64_t *ctid = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * nchunks + 1));                             \
        double *part = (double *)malloc(sizeof(double) * (size_t)(2 * nchunks + 2));                                \
        if (ctid == NULL || part == NULL) {                                                                         \
            free(ctid);                                                                                             \
            free(part);                                                                                             \
            return -2;                                                                                              \
        }                                                                                                           \
        int64_t *cstart = ctid + nchunks;                                                                           \
        for (int64_t i = 0, c = 0; i < n; ++i)                                                                      \
            for (int64_t lo = 0; lo < numels[i]; lo += cs, ++c) {                                                   \
                ctid[c] = i;                                                                                        \
                cstart[c] = lo;                                                                                     \
            }                                                                                                       \
        if (nthreads < 1) nthreads = 1;                                                                             \
        if (total < MIN_PARALLEL || nchunks < 2) nthreads = 1;                                                      \
        /* phase 0 (one process): A, B and C in one parallel region, the chunk partials combined in                 \
           between; 1, 2, 3: one phase, the caller reduces the sums between the calls. Tensor-by-tensor             \
           scheduling (each tensor's passes back to back while it is in the cache, as the fp32 kernel does)         \
           was measured: no faster here, where this kernel is compute-bound, and a barrier pair per tensor          \
           is fragile on a loaded machine. So was a staged schedule (pass A of one group of tensors beside pass     \
           C of an earlier group, ~28 barriers a step): 1.8 ms faster in some hours of this VM, 30 ms slower in     \
           others (its two vCPUs then answer barriers slowly). */                                                   \
        const int first = phase == 0 ? 1 : phase, last = phase == 0 ? 3 : phase;                                    \
        _Pragma("omp parallel num_threads(nthreads)") {                                                             \
            for (int ph = first; ph <= last; ++ph) {                                                                \
                _Pragma("omp for schedule(dynamic, 1)") for (int64_t c = 0; c < nchunks; ++c)                       \
                    run_chunk_##NAME(ph, c, ctid, cstart, cs, params, comps, grads, ms, fs, msc, fsc, numels,      \
                                     lnumels, bhat, seeds, sums, n, hp, part);                                      \
                if (ph < 3) {                                                                                       \
                    /* the chunk partials added in chunk order (deterministic); implicit barrier after */           \
                    _Pragma("omp single") for (int64_t i = 0, c = 0; i < n; ++i) {                                  \
                        const int64_t c1 = c + (numels[i] + cs - 1) / cs;                                           \
                        combine_sums(ph, i, c, c1, part, sums, n);                                                  \
                        c = c1;                                                                                     \
                    }                                                                                               \
                }                                                                                                   \
            }                                                                                                       \
        }                                                                                                           \
        free(ctid);                                                                                                 \
        free(part);                                                                                                 \
        return 0;                                                                                                   \
    }

DEFINE_PASSES(f32, float, ID, ID, ID_SR, 0)
DEFINE_PASSES(bf16, uint16_t, bf16_load, bf16_store, bf16_store_sr, 1)
DEFINE_PASSES(f16, uint16_t, f16_load, f16_store, f16_store_sr, 1)

/* test hook: pass C's vector encoder of the m map (c_encode with inv_m = 1) on u >= 0, |u| <= VMAX (1 + 2^-23);
   codes into q; sr: its subnormal range stochastically with the bits sr_bits32(i, seed). Returns 0 where this build
   has no AVX-512 passes (q untouched), else 1. */
int hf_fadam8_encode_m_simd(const float *u, int8_t *q, int64_t n, int sr, int64_t seed) {
#if HAVE_SIMD
    uint8_t sink[16];
    const float zeros[16] = {0};
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = lanes(n - i);
        float buf[16] = {0};
        uint32_t rm[16];
        for (int l = 0; l < 16; ++l) rm[l] = sr_bits32((uint32_t)(i + l), (uint32_t)seed) >> 16;
        memcpy(buf, u + i, sizeof(float) * (size_t)(n - i < 16 ? n - i : 16));
        if (sr)
            c_encode(q + i, sink, buf, zeros, k, v1(1.0f), v1(0.0f), _mm512_setzero_si512(), 1,
                     _mm512_loadu_si512(rm));
        else
            c_encode(q + i, sink, buf, zeros, k, v1(1.0f), v1(0.0f), _mm512_setzero_si512(), 0,
                     _mm512_setzero_si512());
    }
    return 1;
#else
    (void)u, (void)q, (void)n, (void)sr, (void)seed;
    return 0;
#endif
}

/* test hooks: the maps, element by element; sr: the map's stochastic rounding (f: its normal range, m: its
   subnormal range) with the bits of _quant.sr_bits, r = sr_bits32(i, seed) */
void hf_fadam8_encode(const float *u, int32_t *q, int64_t n, int signed_map, int sr, int64_t seed) {
    for (int64_t i = 0; i < n; ++i)
        q[i] = signed_map ? (sr ? enc_e3m4_sr(u[i], sr_bits32((uint32_t)i, (uint32_t)seed)) : enc_e3m4(u[i]))
               : sr       ? enc_e4m4_sr(u[i], sr_bits32((uint32_t)i, (uint32_t)seed))
                          : enc_e4m4(u[i]);
}
void hf_fadam8_decode(const int32_t *q, float *v, int64_t n, int signed_map) {
    const int dn = dn_ok(); /* the kernel's decoder on this CPU: through subnormals or the arithmetic one */
    for (int64_t i = 0; i < n; ++i) {
        if (dn) v[i] = signed_map ? dec_m_dn((int8_t)q[i]) : dec_s_dn((uint8_t)q[i]);
        else v[i] = signed_map ? dec_e3m4(q[i]) : dec_s((uint8_t)q[i]);
    }
}
/* test hook: the params' stochastic stores of elements 0 .. n-1 of a tensor with this seed (bf16, or f16 when
   to_f16), as pass C writes them */
void hf_fadam8_store_sr(const float *in, uint16_t *out, int64_t n, int to_f16, int64_t seed) {
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t r = sr_bits16((uint32_t)i, (uint32_t)seed);
        out[i] = to_f16 ? f16_store_sr(in[i], r) : bf16_store_sr(in[i], r);
    }
}
