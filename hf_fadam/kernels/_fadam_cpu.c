/*
 * FAdam CPU kernel (arXiv 2405.12807), built at first use by hf_fadam/kernels/cpu_fused.py.
 *
 * Plain C (no torch headers), so that it compiles in a few seconds with the system compiler. Each (param dtype,
 * state dtype) pair exports three multi-tensor pass functions, one per phase of the reduction-hook contract
 * (docs/CONTRACT.md); between them the caller may reduce the per-tensor sums across processes:
 *
 *   A  hf_fadam_pass_a_*: sums1[c] = sum g^2                                       (local partial sums)
 *   B  hf_fadam_pass_b_*: from the reduced sums1 and the logical numel, eps_hat = eps * min(1, RMS(g)) (eps when
 *      RMS(g) = 0) in double; sums2[c] = sum (g/D)^2, sums2[ncols + c] = sum (theta/D)^2, with the new Fisher
 *      f_new = bh f + (1-bh) g^2 and D = f_new^p + eps_hat recomputed, not stored
 *   C  hf_fadam_pass_c_*: from the reduced sums, the clip divisors max(1, RMS/c) in double; f = f_new,
 *      m = b1 m + (1-b1) (g/D)/k1, theta -= lr (m + wd (theta/D)/k2)
 *
 * hf_fadam_step_* runs A, B and C with no reduction (one process), each tensor's three passes in a row while it is in
 * the cache (a small one on one thread, a large one split across the threads with a barrier between the passes); it
 * gives the same results as the three passes with an identity reduce.
 *
 * c = cols[i] (or i when cols is NULL) is tensor i's column in the caller's sums buffers, which hold every tensor
 * of the call whatever its dtype pair. Traffic for fp32: A reads g (4 B), B reads g, f, theta (12 B), C reads g,
 * f, m, theta and writes f, m, theta (28 B): 44 B/param, against 28 B for fused AdamW. Tensors smaller than
 * SMALL_NUMEL are taken whole by one thread; larger ones are split statically across the OpenMP team, and their
 * per-thread partial sums are added in thread order after the parallel region, so the result is deterministic for
 * a given thread count. There is no barrier inside a pass.
 *
 * Sums are accumulated in double, and each element is converted to double BEFORE it is squared, so no square can
 * overflow or underflow in a 16- or 32-bit type (|theta/D| ~ 1e20 squares to inf in float). Per-tensor scalars
 * (beta2_hat, 1 - beta2_hat, eps_hat, the clip divisors) are computed in double and enter the elementwise math in
 * the compute type CT: the state dtype, at least float (16-bit state is loaded into float and rounded once on
 * store), as in hf_fadam/_single_tensor.py and in the same order, with two deliberate differences that cost a few
 * ulp: one reciprocal 1/D is multiplied into both g and theta (one division instead of two), and the clip
 * divisors and the AMP grad scale are applied as reciprocals (exact for GradScaler's power-of-two scales). The
 * build uses -ffp-contract=off so that passes B and C round f_new identically.
 *
 * Non-finite gradients propagate as in IEEE arithmetic and as in the for-loop: a NaN or inf in g makes the
 * tensor's sums non-finite, so its clip divisor is NaN and the whole tensor's m and theta become NaN (the clip
 * tests `r > 1 || isnan(r)`, so NaN is never replaced by 1).
 *
 * Stores (hf_fadam/_rounding.py has the rules and the torch reference, bit for bit the same given the same float
 * input and seed). Pass C stores f and m of 16-bit state with stochastic rounding, and a 16-bit param by the
 * launch's param_mode:
 *
 *   PARAM_NEAREST     theta = RNE(theta_new)                                (bf16_store / f16_store)
 *   PARAM_STOCHASTIC  theta = SR(theta_new as float)
 *   PARAM_KAHAN       the step works on theta + comp (in CT, in pass B's sum of (theta/D)^2 and in pass C);
 *                     theta = RNE(theta_new), comp = RNE(theta_new - theta): comp[i] is the param's dtype and shape
 *
 * float32/float64 params are always stored as they are (nearest). SR is one inline function per target dtype,
 * taking the float value x and the element's 16 random bits r (0 .. 65535):
 *
 *   bf16_store_sr(x, r)  (bits(x) + r) >> 16: rounds up with probability low16(x) / 2^16, the distance to the
 *                        lower bf16 neighbour in ulps; a carry into the exponent is the next binade's first value
 *                        (or inf from beyond bf16's largest finite value, as in the reference)
 *   f16_store_sr(x, r)   normal range (|x| >= 2^-14): the same with 13 bits, (bits(x) + (r >> 3)) truncated to 10
 *                        mantissa bits and rebiased; a result past 65504 is inf (it comes only from |x| > 65504:
 *                        a finite value in range never becomes inf). Subnormal range (a grid of step 2^-24):
 *                        k = floor(|x| 2^24) rounds up to k + 1 when r < frac(|x| 2^24) * 2^16 (float arithmetic,
 *                        exact)
 *
 * Both store NaN and +-inf as bf16_store / f16_store do (NaN stays NaN). The random bits of element i (its index
 * in the tensor's row-major order, mod 2^32, whatever thread stores it) are half of one lowbias32 hash per two
 * elements, as _quant.sr_bits: h = lowbias32(((i >> 5) << 4 | (i & 15)) ^ seed), r = h >> 16 for i & 16 == 0,
 * else h & 0xffff. The seeds come per column, seeds[k * ncols + col] for k = 0 (param), 1 (exp_avg), 2 (fisher):
 * _rounding.rounding_seeds, lowbias32(lowbias32(stream ^ lowbias32(t)) ^ kind), which hf_fadam_rounding_seeds
 * computes for the wrapper. The hash is computed only where a store uses it (dead code elsewhere), so
 * round-to-nearest loops are unchanged. Each element hashes for itself (the pair's partner recomputes the same
 * hash: simpler loops, and the hash is cheap next to the sqrt and the division). Every conversion is written with
 * selects, not branches, so that all the loops vectorize. Measured on one core of the 2-core Zen 4 here, 60k bf16
 * params in cache: fp32 state 2.2 (nearest), 2.4 (stochastic), 2.5 (kahan) ns/param; bf16 state (stochastic
 * f and m) 2.6-2.9 ns/param; fp16 params cost ~1.5x more (the conversions).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define HF_FADAM_ABI 3
#define SMALL_NUMEL 65536
#define ALIGN_ELEMS 64 /* split points are multiples of this (one cache line even for 1-byte types) */
#define MAX_THREADS 256

typedef struct {
    double lr, beta1, eps, weight_decay, clip, p, grad_scale;
    int maximize, has_grad_scale;
} fadam_hparams;

int hf_fadam_abi_version(void) { return HF_FADAM_ABI; }

int hf_fadam_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------- element conversions (bit exact, RNE) */

static inline float bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float bf16_load(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

static inline uint16_t bf16_store(float f) {
    uint32_t u = f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u; /* NaN -> the canonical quiet NaN, as torch does */
    u += 0x7fffu + ((u >> 16) & 1u);                                             /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static inline float f16_load(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, expo = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    /* zero or subnormal: mant * 2^-24 is exact in float; inf/NaN: the float exponent all ones */
    const float sub = (float)mant * 5.9604644775390625e-8f;
    uint32_t bits = expo == 0 ? f32_to_bits(sub) : ((expo + 112u) << 23) | (mant << 13);
    bits = expo == 0x1fu ? 0x7f800000u | (mant << 13) : bits;
    return bits_to_f32(sign | bits);
}

static inline uint16_t f16_store(float f) {
    const uint32_t u = f32_to_bits(f), x = u & 0x7fffffffu;
    /* half subnormal or zero (x < 2^-14): adding 0.5 puts the half ulp (2^-24) at the float ulp of the sum, so the
       FPU's round-to-nearest-even does the rounding */
    const uint32_t sub = f32_to_bits(bits_to_f32(x < 0x38800000u ? x : 0u) + 0.5f) - 0x3f000000u;
    /* normal: rebias the exponent (-112 << 23) and round the 13 dropped mantissa bits to nearest even */
    const uint32_t nrm = (x + 0xc8000fffu + ((x >> 13) & 1u)) >> 13;
    /* then what rounds to inf, and NaN; two-way selects rather than branches, so that the loops vectorize */
    uint32_t h = x < 0x38800000u ? sub : nrm;
    h = x >= 0x477ff000u ? 0x7c00u : h;
    h = x > 0x7f800000u ? 0x7e00u : h;
    return (uint16_t)(((u >> 16) & 0x8000u) | h);
}

/* ---------------------------------------------------------------- stochastic rounding (see the header) */

enum { PARAM_NEAREST = 0, PARAM_STOCHASTIC = 1, PARAM_KAHAN = 2 };

/* C. Wellons' lowbias32 (_quant.lowbias32) */
static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

/* the 16 random bits (0 .. 65535) of element i: half of the hash shared with element i ^ 16 (_quant.sr_bits) */
static inline uint32_t sr_bits16(uint32_t i, uint32_t seed) {
    const uint32_t h = lowbias32((((i >> 5) << 4) | (i & 15u)) ^ seed);
    return (i & 16u) ? (h & 0xffffu) : (h >> 16);
}

/* x rounded stochastically to bfloat16 with the random bits r (selects, no branches: the loops vectorize) */
static inline uint16_t bf16_store_sr(float x, uint32_t r) {
    const uint32_t u = f32_to_bits(x);
    const uint32_t h = (u + r) >> 16; /* (+-inf + r stays inf: only the dropped mantissa bits change) */
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : h); /* NaN: as bf16_store */
}

/* x rounded stochastically to float16 with the random bits r (selects, no branches: the loops vectorize) */
static inline uint16_t f16_store_sr(float x, uint32_t r) {
    const uint32_t u = f32_to_bits(x), a = u & 0x7fffffffu;
    /* |x| < 2^-14: k or k + 1 steps of 2^-24 (k + 1 = 1024 is 2^-14, the smallest normal code) */
    const float s = (a < 0x38800000u ? bits_to_f32(a) : 0.0f) * 16777216.0f, k = floorf(s);
    const uint32_t sub = (uint32_t)k + ((float)r < (s - k) * 65536.0f);
    /* normal range: a result past 65504 is inf (it comes only from |x| > 65504: 65504 truncates to itself) */
    const uint32_t y = (a + (r >> 3)) & 0xffffe000u;
    uint32_t h = y > 0x477fe000u ? 0x7c00u : (y - (112u << 23)) >> 13;
    h = a < 0x38800000u ? sub : h;
    h = a > 0x7f800000u ? 0x7e00u : h; /* NaN: as f16_store */
    return (uint16_t)(((u >> 16) & 0x8000u) | h);
}

/* ---------------------------------------------------------------- per-tensor scalars (double) */

static inline double rms_of(double sum, double numel) { return sqrt(sum / (numel > 1.0 ? numel : 1.0)); }

/* _math.adaptive_eps: eps * min(1, RMS(g)), eps when RMS(g) = 0 (also when it is NaN, like torch.where(r > 0)) */
static inline double eps_hat_of(double sum, double numel, double eps) {
    double r = rms_of(sum, numel);
    return r > 0.0 ? (r < 1.0 ? r : 1.0) * eps : eps;
}

/* 1 / _math.clip_divisor = 1 / max(1, RMS/c); a NaN RMS gives NaN (IEEE propagation, as torch's clamp_min) */
static inline double inv_clip_of(double sum, double numel, double clip) {
    double r = rms_of(sum, numel) / clip;
    return (r > 1.0 || isnan(r)) ? 1.0 / r : 1.0;
}

/* ---------------------------------------------------------------- the multi-tensor drivers
 * Everything a pass needs, whatever the dtype pair; the per-tensor bodies cast the pointers. */
typedef struct {
    void *const *params, *const *grads, *const *exp_avgs, *const *fishers;
    const int64_t *cols; /* column of tensor i in the sums buffers; NULL = i */
    int64_t ncols;       /* row length of the sums buffers */
    const double *numels, *beta2_hat, *sums1, *sums2; /* indexed by column */
    const fadam_hparams *hp;
    void *const *comps;   /* PARAM_KAHAN: tensor i's compensation buffer (the param's dtype); else NULL */
    const int64_t *seeds; /* seeds[k * ncols + col], k = 0 param, 1 exp_avg, 2 fisher; NULL: no stochastic store */
    int param_mode;       /* PARAM_NEAREST, PARAM_STOCHASTIC or PARAM_KAHAN (16-bit params only) */
} pass_ctx;

static inline int64_t col_of(const pass_ctx *c, int64_t i) { return c->cols ? c->cols[i] : i; }

typedef void (*sum_fn)(const pass_ctx *c, int64_t i, int64_t lo, int64_t hi, double *out);
typedef void (*apply_fn)(const pass_ctx *c, int64_t i, int64_t lo, int64_t hi);

static inline void split_range(int64_t n, int tid, int nthr, int64_t *lo, int64_t *hi) {
    int64_t per = (n + nthr - 1) / nthr;
    per = (per + ALIGN_ELEMS - 1) / ALIGN_ELEMS * ALIGN_ELEMS;
    int64_t a = per * tid, b = a + per;
    if (a > n) a = n;
    if (b > n) b = n;
    *lo = a;
    *hi = b;
}

/* the team size: [1, MAX_THREADS], and 1 when the whole call is small; *nlarge = tensors split across threads */
static int plan_threads(int64_t ntensors, const int64_t *sizes, int nthreads, int64_t *nlarge) {
    int64_t total = 0, large = 0;
    for (int64_t i = 0; i < ntensors; ++i) {
        total += sizes[i];
        large += sizes[i] >= SMALL_NUMEL;
    }
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (total < SMALL_NUMEL) nthreads = 1;
    *nlarge = nthreads > 1 ? large : 0;
    return nthreads;
}

#ifdef _OPENMP
#define PARALLEL_IDS(tid, nthr)       \
    do {                              \
        tid = omp_get_thread_num();   \
        nthr = omp_get_num_threads(); \
    } while (0)
#else
#define PARALLEL_IDS(tid, nthr) \
    do {                        \
    } while (0)
#endif

/* K sums per tensor: sums[k * ncols + col(i)] = fn over tensor i. Small tensors go whole to one thread each
   (dynamic schedule); then every thread takes its slice of each large tensor and leaves its partial sums in
   `part`, which are added in thread order after the parallel region (deterministic for a thread count; no
   barrier). Returns -1 when the partial-sum buffer cannot be allocated. */
static int multi_tensor_sums(const pass_ctx *c, int64_t ntensors, const int64_t *sizes, int K, sum_fn fn,
                             double *sums, int nthreads) {
    int64_t nlarge = 0;
    nthreads = plan_threads(ntensors, sizes, nthreads, &nlarge);
    double *part = NULL;
    if (nlarge > 0 && !(part = (double *)calloc((size_t)(nlarge * nthreads * K), sizeof(double)))) return -1;
    int used = 1;
#pragma omp parallel num_threads(nthreads)
    {
        int tid = 0, nthr = 1;
        PARALLEL_IDS(tid, nthr);
        if (tid == 0) used = nthr;
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t i = 0; i < ntensors; ++i) {
            if (sizes[i] < SMALL_NUMEL || nthr == 1 || part == NULL) {
                double out[2] = {0.0, 0.0};
                if (sizes[i] > 0) fn(c, i, 0, sizes[i], out);
                for (int k = 0; k < K; ++k) sums[k * c->ncols + col_of(c, i)] = out[k];
            }
        }
        if (nthr > 1 && part != NULL) {
            int64_t li = 0;
            for (int64_t i = 0; i < ntensors; ++i) {
                if (sizes[i] < SMALL_NUMEL) continue;
                int64_t lo, hi;
                split_range(sizes[i], tid, nthr, &lo, &hi);
                if (lo < hi) fn(c, i, lo, hi, part + (li * nthreads + tid) * K);
                ++li;
            }
        }
    }
    if (part != NULL && used > 1) { /* (a team of 1 despite the plan has written every sum directly) */
        int64_t li = 0;
        for (int64_t i = 0; i < ntensors; ++i) {
            if (sizes[i] < SMALL_NUMEL) continue;
            for (int k = 0; k < K; ++k) {
                double s = 0.0;
                for (int t = 0; t < used; ++t) s += part[(li * nthreads + t) * K + k];
                sums[k * c->ncols + col_of(c, i)] = s;
            }
            ++li;
        }
    }
    free(part);
    return 0;
}

/* fn over every tensor, partitioned as in multi_tensor_sums (the slices of a large tensor are independent) */
static void multi_tensor_apply(const pass_ctx *c, int64_t ntensors, const int64_t *sizes, apply_fn fn,
                               int nthreads) {
    int64_t nlarge = 0;
    nthreads = plan_threads(ntensors, sizes, nthreads, &nlarge);
#pragma omp parallel num_threads(nthreads)
    {
        int tid = 0, nthr = 1;
        PARALLEL_IDS(tid, nthr);
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t i = 0; i < ntensors; ++i) {
            if (sizes[i] > 0 && (sizes[i] < SMALL_NUMEL || nthr == 1)) fn(c, i, 0, sizes[i]);
        }
        if (nthr > 1) {
            for (int64_t i = 0; i < ntensors; ++i) {
                if (sizes[i] < SMALL_NUMEL) continue;
                int64_t lo, hi;
                split_range(sizes[i], tid, nthr, &lo, &hi);
                if (lo < hi) fn(c, i, lo, hi);
            }
        }
    }
}

/* One large tensor's three passes back to back, split across the team (the tensor's slices stay in the shared
   cache between the passes: pass-major over the whole model would stream it from memory three times). Partial sums
   are added in thread order, exactly as multi_tensor_sums does, so the result equals A, B, C with an identity
   reduce bit for bit. */
static void large_tensor_step(const pass_ctx *c, int64_t i, int64_t n, sum_fn a, sum_fn b, apply_fn u,
                              double *sums1, double *sums2, int nthreads) {
    double part[3 * MAX_THREADS];
    const int64_t col = col_of(c, i);
#pragma omp parallel num_threads(nthreads)
    {
        int tid = 0, nthr = 1;
        PARALLEL_IDS(tid, nthr);
        int64_t lo = 0, hi = n;
        if (nthr > 1) split_range(n, tid, nthr, &lo, &hi);
        double out[2] = {0.0, 0.0};
        if (lo < hi) a(c, i, lo, hi, out);
        part[tid] = out[0];
#pragma omp barrier
#pragma omp single
        {
            double s = 0.0;
            for (int t = 0; t < nthr; ++t) s += part[t];
            sums1[col] = s; /* c->sums1 aliases sums1: pass B's scalars read it */
        } /* (implicit barrier) */
        out[0] = out[1] = 0.0;
        if (lo < hi) b(c, i, lo, hi, out);
        part[MAX_THREADS + 2 * tid] = out[0];
        part[MAX_THREADS + 2 * tid + 1] = out[1];
#pragma omp barrier
#pragma omp single
        {
            double sg = 0.0, sw = 0.0;
            for (int t = 0; t < nthr; ++t) {
                sg += part[MAX_THREADS + 2 * t];
                sw += part[MAX_THREADS + 2 * t + 1];
            }
            sums2[col] = sg;
            sums2[c->ncols + col] = sw;
        } /* (implicit barrier) */
        if (lo < hi) u(c, i, lo, hi);
    }
}

/* The whole step with no reduction between the passes (one process): every tensor goes through A, B and C in one
   go while it sits in the cache (its sums are final at once): a small one whole on one thread, a large one split
   across the threads (large_tensor_step). Same results as A, B, C with an identity reduce. */
static int whole_step(const pass_ctx *c, int64_t ntensors, const int64_t *sizes, sum_fn a, sum_fn b, apply_fn u,
                      double *sums1, double *sums2, int nthreads) {
    int64_t nlarge = 0;
    nthreads = plan_threads(ntensors, sizes, nthreads, &nlarge);
    for (int64_t i = 0; i < ntensors; ++i)
        if (sizes[i] >= SMALL_NUMEL) large_tensor_step(c, i, sizes[i], a, b, u, sums1, sums2, nthreads);
    int64_t small_total = 0;
    for (int64_t i = 0; i < ntensors; ++i) small_total += sizes[i] < SMALL_NUMEL ? sizes[i] : 0;
    int nt = small_total < SMALL_NUMEL ? 1 : nthreads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t i = 0; i < ntensors; ++i) {
        if (sizes[i] <= 0 || sizes[i] >= SMALL_NUMEL) continue;
        const int64_t col = col_of(c, i);
        double out[2] = {0.0, 0.0};
        a(c, i, 0, sizes[i], out);
        sums1[col] = out[0]; /* c->sums1 aliases sums1: pass B's scalars read it */
        b(c, i, 0, sizes[i], out);
        sums2[col] = out[0];
        sums2[c->ncols + col] = out[1];
        u(c, i, 0, sizes[i]);
    }
    return 0;
}

/* ---------------------------------------------------------------- kernel template
 * NAME: suffix, PT/ST: param/state storage types, CT: compute type (the state dtype's, at least float),
 * P16/S16: 1 when the param/state is 16-bit (its stores round), LDP/STP: param load/store (to nearest), SRP: the
 * param's stochastic store (x, r), LDS: state load, STS: state store (x, r) (stochastic for 16-bit state, r unused
 * and never computed otherwise). SQRT_##CT / POW_##CT: CT's math functions.
 */
#define DEFINE_FADAM_KERNEL(NAME, PT, ST, CT, P16, S16, LDP, STP, SRP, LDS, STS)                                   \
                                                                                                                   \
    /* the per-tensor scalars of passes B and C, from the reduced Σg² (double, then CT). gmul converts g as the  \
       reference sees it: times -1 for maximize and 1/grad_scale for AMP (exact for power-of-two scales) */        \
    typedef struct {                                                                                               \
        CT gmul, bh, omb, p, eps_hat;                                                                              \
        int p_half, want_w;                                                                                        \
    } scalars_##NAME;                                                                                              \
                                                                                                                   \
    static inline CT gmul_##NAME(const fadam_hparams *hp) {                                                        \
        const double inv_scale = hp->has_grad_scale ? 1.0 / hp->grad_scale : 1.0;                                  \
        return (CT)(hp->maximize ? -inv_scale : inv_scale);                                                        \
    }                                                                                                              \
                                                                                                                   \
    static inline scalars_##NAME scalars_of_##NAME(const pass_ctx *c, int64_t col) {                               \
        const fadam_hparams *hp = c->hp;                                                                           \
        scalars_##NAME s;                                                                                          \
        s.gmul = gmul_##NAME(hp);                                                                                  \
        s.bh = (CT)c->beta2_hat[col];                                                                              \
        s.omb = (CT)(1.0 - c->beta2_hat[col]);                                                                     \
        s.p = (CT)hp->p;                                                                                           \
        s.eps_hat = (CT)eps_hat_of(c->sums1[col], c->numels[col], hp->eps);                                        \
        s.p_half = hp->p == 0.5;                                                                                   \
        s.want_w = hp->weight_decay != 0.0;                                                                        \
        return s;                                                                                                  \
    }                                                                                                              \
                                                                                                                   \
    /* the launch's store mode of the params (always PARAM_NEAREST for 32/64-bit params, so that the other modes'  \
       loops are dead code there), and whether its arguments are complete: -2 when a mode lacks its buffers */     \
    static inline int mode_of_##NAME(const pass_ctx *c) { return P16 ? c->param_mode : PARAM_NEAREST; }            \
    static inline int check_args_##NAME(const pass_ctx *c, int need_seeds) {                                       \
        const int mode = mode_of_##NAME(c);                                                                        \
        if (mode < PARAM_NEAREST || mode > PARAM_KAHAN || (mode == PARAM_KAHAN && c->comps == NULL)) return -2;    \
        if (need_seeds && (S16 || mode == PARAM_STOCHASTIC) && c->seeds == NULL) return -2;                        \
        return 0;                                                                                                  \
    }                                                                                                              \
                                                                                                                   \
    /* pass A body: Σg², each element widened to double before it is squared */                                  \
    static void sum_a_##NAME(const pass_ctx *c, int64_t t, int64_t lo, int64_t hi, double *out) {                  \
        const PT *g = (const PT *)c->grads[t];                                                                     \
        const CT gmul = gmul_##NAME(c->hp);                                                                        \
        double s = 0.0;                                                                                            \
        _Pragma("omp simd reduction(+:s)") for (int64_t i = lo; i < hi; ++i) {                                     \
            double v = (double)((CT)LDP(g[i]) * gmul);                                                             \
            s += v * v;                                                                                            \
        }                                                                                                          \
        out[0] = s;                                                                                                \
    }                                                                                                              \
                                                                                                                   \
    /* p_half, want_w and kahan are compile-time constants at every call (always_inline), so no branch or pow call  \
       is left in the p = 0.5 loops. kahan: theta = param + comp */                                                \
    static inline __attribute__((always_inline)) void sum_b_impl_##NAME(                                           \
        const PT *th, const PT *cp, const PT *g, const ST *f, int64_t lo, int64_t hi, const scalars_##NAME *sc,    \
        const int p_half, const int want_w, const int kahan, double *out) {                                        \
        const CT gmul = sc->gmul, bh = sc->bh, omb = sc->omb, p = sc->p, eps_hat = sc->eps_hat;                    \
        double a = 0.0, b = 0.0;                                                                                   \
        _Pragma("omp simd reduction(+:a,b)") for (int64_t i = lo; i < hi; ++i) {                                   \
            CT gv = (CT)LDP(g[i]) * gmul;                                                                          \
            CT fn = (CT)LDS(f[i]) * bh + (gv * gv) * omb;                                                          \
            CT rd = (CT)1 / ((p_half ? SQRT_##CT(fn) : POW_##CT(fn, p)) + eps_hat);                                \
            double nb = (double)(gv * rd);                                                                         \
            a += nb * nb;                                                                                          \
            if (want_w) {                                                                                          \
                CT t = (CT)LDP(th[i]);                                                                             \
                if (kahan) t += (CT)LDP(cp[i]);                                                                    \
                double w = (double)(t * rd);                                                                       \
                b += w * w;                                                                                        \
            }                                                                                                      \
        }                                                                                                          \
        out[0] = a;                                                                                                \
        out[1] = b;                                                                                                \
    }                                                                                                              \
                                                                                                                   \
    /* pass B body: Σ(g/D)² and Σ(θ/D)² */                                                                    \
    static void sum_b_##NAME(const pass_ctx *c, int64_t t, int64_t lo, int64_t hi, double *out) {                  \
        const scalars_##NAME sc = scalars_of_##NAME(c, col_of(c, t));                                              \
        const PT *th = (const PT *)c->params[t], *g = (const PT *)c->grads[t];                                     \
        const ST *f = (const ST *)c->fishers[t];                                                                   \
        if (sc.want_w && mode_of_##NAME(c) == PARAM_KAHAN) {                                                       \
            const PT *cp = (const PT *)c->comps[t];                                                                \
            if (sc.p_half)                                                                                         \
                sum_b_impl_##NAME(th, cp, g, f, lo, hi, &sc, 1, 1, 1, out);                                        \
            else                                                                                                   \
                sum_b_impl_##NAME(th, cp, g, f, lo, hi, &sc, 0, 1, 1, out);                                        \
        } else if (sc.p_half && sc.want_w)                                                                         \
            sum_b_impl_##NAME(th, NULL, g, f, lo, hi, &sc, 1, 1, 0, out);                                          \
        else if (sc.p_half)                                                                                        \
            sum_b_impl_##NAME(th, NULL, g, f, lo, hi, &sc, 1, 0, 0, out);                                          \
        else if (sc.want_w)                                                                                        \
            sum_b_impl_##NAME(th, NULL, g, f, lo, hi, &sc, 0, 1, 0, out);                                          \
        else                                                                                                       \
            sum_b_impl_##NAME(th, NULL, g, f, lo, hi, &sc, 0, 0, 0, out);                                          \
    }                                                                                                              \
                                                                                                                   \
    /* p_half, want_w and mode are compile-time constants (always_inline). Element i's random bits are             \
       sr_bits16(i, seed of the stored quantity); STS and SRP use them only where they round stochastically */     \
    static inline __attribute__((always_inline)) void update_impl_##NAME(                                          \
        PT *th, PT *cp, const PT *g, ST *m, ST *f, int64_t lo, int64_t hi, const scalars_##NAME *sc,               \
        const int p_half, const int want_w, const int mode, CT inv_kg, CT inv_kw, const uint32_t *seed,            \
        const fadam_hparams *hp) {                                                                                 \
        const CT gmul = sc->gmul, bh = sc->bh, omb = sc->omb, p = sc->p, eps_hat = sc->eps_hat;                    \
        const CT b1 = (CT)hp->beta1, omb1 = (CT)(1.0 - hp->beta1), neg_lr = (CT)(-hp->lr);                         \
        const CT wd = (CT)hp->weight_decay;                                                                        \
        /* the seeds of the stochastic stores, and below each element's index (unused where nothing rounds) */     \
        __attribute__((unused)) const uint32_t seed_p = seed[0], seed_m = seed[1], seed_f = seed[2];               \
        _Pragma("omp simd") for (int64_t i = lo; i < hi; ++i) {                                                    \
            __attribute__((unused)) const uint32_t e = (uint32_t)i;                                                \
            CT gv = (CT)LDP(g[i]) * gmul;                                                                          \
            CT fn = (CT)LDS(f[i]) * bh + (gv * gv) * omb;                                                          \
            CT rd = (CT)1 / ((p_half ? SQRT_##CT(fn) : POW_##CT(fn, p)) + eps_hat);                                \
            CT t = (CT)LDP(th[i]);                                                                                 \
            if (mode == PARAM_KAHAN) t += (CT)LDP(cp[i]);                                                          \
            CT nb = (gv * rd) * inv_kg;                                                                            \
            CT mn = (CT)LDS(m[i]) * b1 + nb * omb1;                                                                \
            CT upd = mn;                                                                                           \
            if (want_w) upd = mn + wd * ((t * rd) * inv_kw);                                                       \
            f[i] = STS(fn, sr_bits16(e, seed_f));                                                                  \
            m[i] = STS(mn, sr_bits16(e, seed_m));                                                                  \
            const CT tn = t + upd * neg_lr;                                                                        \
            if (mode == PARAM_STOCHASTIC) {                                                                        \
                th[i] = SRP(tn, sr_bits16(e, seed_p));                                                             \
            } else if (mode == PARAM_KAHAN) { /* to nearest; what that dropped is kept for the next step */        \
                const PT s = STP(tn);                                                                              \
                th[i] = s;                                                                                         \
                cp[i] = STP(tn - (CT)LDP(s));                                                                      \
            } else {                                                                                               \
                th[i] = STP(tn);                                                                                   \
            }                                                                                                      \
        }                                                                                                          \
    }                                                                                                              \
                                                                                                                   \
    static inline __attribute__((always_inline)) void update_mode_##NAME(                                          \
        PT *th, PT *cp, const PT *g, ST *m, ST *f, int64_t lo, int64_t hi, const scalars_##NAME *sc,               \
        const int mode, CT inv_kg, CT inv_kw, const uint32_t *seed, const fadam_hparams *hp) {                     \
        if (sc->p_half && sc->want_w)                                                                              \
            update_impl_##NAME(th, cp, g, m, f, lo, hi, sc, 1, 1, mode, inv_kg, inv_kw, seed, hp);                 \
        else if (sc->p_half)                                                                                       \
            update_impl_##NAME(th, cp, g, m, f, lo, hi, sc, 1, 0, mode, inv_kg, inv_kw, seed, hp);                 \
        else if (sc->want_w)                                                                                       \
            update_impl_##NAME(th, cp, g, m, f, lo, hi, sc, 0, 1, mode, inv_kg, inv_kw, seed, hp);                 \
        else                                                                                                       \
            update_impl_##NAME(th, cp, g, m, f, lo, hi, sc, 0, 0, mode, inv_kg, inv_kw, seed, hp);                 \
    }                                                                                                              \
                                                                                                                   \
    /* pass C body: the clip divisors from the reduced sums, then f, m and theta (and comp) */                     \
    static void update_##NAME(const pass_ctx *c, int64_t t, int64_t lo, int64_t hi) {                              \
        const int64_t col = col_of(c, t);                                                                          \
        const scalars_##NAME sc = scalars_of_##NAME(c, col);                                                       \
        const CT inv_kg = (CT)inv_clip_of(c->sums2[col], c->numels[col], c->hp->clip);                             \
        const CT inv_kw = (CT)inv_clip_of(c->sums2[c->ncols + col], c->numels[col], c->hp->clip);                  \
        PT *th = (PT *)c->params[t];                                                                               \
        const PT *g = (const PT *)c->grads[t];                                                                     \
        ST *m = (ST *)c->exp_avgs[t], *f = (ST *)c->fishers[t];                                                    \
        uint32_t seed[3] = {0, 0, 0}; /* param, exp_avg, fisher */                                                 \
        if (c->seeds != NULL)                                                                                      \
            for (int k = 0; k < 3; ++k) seed[k] = (uint32_t)c->seeds[k * c->ncols + col];                          \
        const int mode = mode_of_##NAME(c);                                                                        \
        PT *cp = mode == PARAM_KAHAN ? (PT *)c->comps[t] : NULL;                                                   \
        if (mode == PARAM_STOCHASTIC)                                                                              \
            update_mode_##NAME(th, cp, g, m, f, lo, hi, &sc, PARAM_STOCHASTIC, inv_kg, inv_kw, seed, c->hp);       \
        else if (mode == PARAM_KAHAN)                                                                              \
            update_mode_##NAME(th, cp, g, m, f, lo, hi, &sc, PARAM_KAHAN, inv_kg, inv_kw, seed, c->hp);            \
        else                                                                                                       \
            update_mode_##NAME(th, cp, g, m, f, lo, hi, &sc, PARAM_NEAREST, inv_kg, inv_kw, seed, c->hp);          \
    }                                                                                                              \
                                                                                                                   \
    /* pass A: sums1[col(i)] = Σ g_i² over the local elements */                                                 \
    int hf_fadam_pass_a_##NAME(int64_t ntensors, void *const *grads, const int64_t *sizes, const int64_t *cols,    \
                               double *sums1, const fadam_hparams *hp, int nthreads) {                             \
        pass_ctx c = {NULL, grads, NULL, NULL, cols, 0, NULL, NULL, NULL, NULL, hp, NULL, NULL, PARAM_NEAREST};    \
        return multi_tensor_sums(&c, ntensors, sizes, 1, sum_a_##NAME, sums1, nthreads);                           \
    }                                                                                                              \
                                                                                                                   \
    /* pass B: from the reduced sums1 and the logical numels, sums2[col(i)] = Σ (g/D)² and                       \
       sums2[ncols + col(i)] = Σ (θ/D)² (0 when weight_decay == 0); θ includes comps[i] with PARAM_KAHAN */    \
    int hf_fadam_pass_b_##NAME(int64_t ntensors, void *const *params, void *const *grads, void *const *fishers,    \
                               void *const *comps, const int64_t *sizes, const int64_t *cols, int64_t ncols,       \
                               const double *numels, const double *beta2_hat, const double *sums1, double *sums2,  \
                               const fadam_hparams *hp, int param_mode, int nthreads) {                            \
        pass_ctx c = {params, grads, NULL, fishers, cols, ncols, numels, beta2_hat, sums1, NULL, hp,               \
                      comps, NULL, param_mode};                                                                    \
        if (check_args_##NAME(&c, 0)) return -2;                                                                   \
        return multi_tensor_sums(&c, ntensors, sizes, 2, sum_b_##NAME, sums2, nthreads);                           \
    }                                                                                                              \
                                                                                                                   \
    /* pass C: the update, from the reduced sums1 and sums2 (2 rows of ncols), storing as param_mode says with the  \
       seeds (3 rows of ncols) */                                                                                  \
    int hf_fadam_pass_c_##NAME(int64_t ntensors, void *const *params, void *const *grads, void *const *exp_avgs,   \
                               void *const *fishers, void *const *comps, const int64_t *sizes, const int64_t *cols,  \
                               int64_t ncols, const double *numels, const double *beta2_hat, const double *sums1,  \
                               const double *sums2, const int64_t *seeds, const fadam_hparams *hp, int param_mode,  \
                               int nthreads) {                                                                     \
        pass_ctx c = {params, grads, exp_avgs, fishers, cols, ncols, numels, beta2_hat, sums1, sums2, hp,          \
                      comps, seeds, param_mode};                                                                   \
        if (check_args_##NAME(&c, 1)) return -2;                                                                   \
        multi_tensor_apply(&c, ntensors, sizes, update_##NAME, nthreads);                                          \
        return 0;                                                                                                  \
    }                                                                                                              \
                                                                                                                   \
    /* A, B and C without a reduction (one process), small tensors cache-hot: see whole_step */                    \
    int hf_fadam_step_##NAME(int64_t ntensors, void *const *params, void *const *grads, void *const *exp_avgs,     \
                             void *const *fishers, void *const *comps, const int64_t *sizes, const int64_t *cols,  \
                             int64_t ncols, const double *numels, const double *beta2_hat, double *sums1,          \
                             double *sums2, const int64_t *seeds, const fadam_hparams *hp, int param_mode,         \
                             int nthreads) {                                                                       \
        pass_ctx c = {params, grads, exp_avgs, fishers, cols, ncols, numels, beta2_hat, sums1, sums2, hp,          \
                      comps, seeds, param_mode};                                                                   \
        if (check_args_##NAME(&c, 1)) return -2;                                                                   \
        return whole_step(&c, ntensors, sizes, sum_a_##NAME, sum_b_##NAME, update_##NAME, sums1, sums2, nthreads);  \
    }

#define ID(x) (x)
#define TO_F32(x) ((float)(x))
#define SQRT_float sqrtf
#define POW_float powf
#define SQRT_double sqrt
#define POW_double pow
#define KEEP(x, r) (x) /* a store that does not round: r is dropped unevaluated */
#define BF16_SR(x, r) bf16_store_sr((float)(x), (r))
#define F16_SR(x, r) f16_store_sr((float)(x), (r))

/* every (param, state) pair of {f32, f64, bf16, f16}; CT = double for f64 state, else float; P, S: P16, S16 */
/*                  NAME       PT        ST        CT      P  S  LDP        STP         SRP      LDS        STS */
DEFINE_FADAM_KERNEL(f32_f32,   float,    float,    float,  0, 0, ID,        ID,         KEEP,    ID,        KEEP)
DEFINE_FADAM_KERNEL(f64_f32,   double,   float,    float,  0, 0, ID,        ID,         KEEP,    ID,        KEEP)
DEFINE_FADAM_KERNEL(bf16_f32,  uint16_t, float,    float,  1, 0, bf16_load, bf16_store, BF16_SR, ID,        KEEP)
DEFINE_FADAM_KERNEL(f16_f32,   uint16_t, float,    float,  1, 0, f16_load,  f16_store,  F16_SR,  ID,        KEEP)
DEFINE_FADAM_KERNEL(f32_f64,   float,    double,   double, 0, 0, ID,        TO_F32,     KEEP,    ID,        KEEP)
DEFINE_FADAM_KERNEL(f64_f64,   double,   double,   double, 0, 0, ID,        ID,         KEEP,    ID,        KEEP)
DEFINE_FADAM_KERNEL(bf16_f64,  uint16_t, double,   double, 1, 0, bf16_load, bf16_store, BF16_SR, ID,        KEEP)
DEFINE_FADAM_KERNEL(f16_f64,   uint16_t, double,   double, 1, 0, f16_load,  f16_store,  F16_SR,  ID,        KEEP)
DEFINE_FADAM_KERNEL(f32_bf16,  float,    uint16_t, float,  0, 1, ID,        ID,         KEEP,    bf16_load, BF16_SR)
DEFINE_FADAM_KERNEL(f64_bf16,  double,   uint16_t, float,  0, 1, ID,        ID,         KEEP,    bf16_load, BF16_SR)
DEFINE_FADAM_KERNEL(bf16_bf16, uint16_t, uint16_t, float,  1, 1, bf16_load, bf16_store, BF16_SR, bf16_load, BF16_SR)
DEFINE_FADAM_KERNEL(f16_bf16,  uint16_t, uint16_t, float,  1, 1, f16_load,  f16_store,  F16_SR,  bf16_load, BF16_SR)
DEFINE_FADAM_KERNEL(f32_f16,   float,    uint16_t, float,  0, 1, ID,        ID,         KEEP,    f16_load,  F16_SR)
DEFINE_FADAM_KERNEL(f64_f16,   double,   uint16_t, float,  0, 1, ID,        ID,         KEEP,    f16_load,  F16_SR)
DEFINE_FADAM_KERNEL(bf16_f16,  uint16_t, uint16_t, float,  1, 1, bf16_load, bf16_store, BF16_SR, f16_load,  F16_SR)
DEFINE_FADAM_KERNEL(f16_f16,   uint16_t, uint16_t, float,  1, 1, f16_load,  f16_store,  F16_SR,  f16_load,  F16_SR)

/* The per-column seeds of the stochastic stores (_rounding.rounding_seeds): seeds[k * n + i] =
   lowbias32(lowbias32(stream ^ lowbias32(t)) ^ kinds[k]), t = (int64) steps[i] (the step count after the step),
   stream = streams[i] (NULL: i); k = 0 param, 1 exp_avg, 2 fisher (the _rounding.KIND_* constants, passed in). */
void hf_fadam_rounding_seeds(int64_t n, const int64_t *streams, const float *steps, uint32_t kind_param,
                             uint32_t kind_exp_avg, uint32_t kind_fisher, int64_t *seeds) {
    const uint32_t kinds[3] = {kind_param, kind_exp_avg, kind_fisher};
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t stream = (uint32_t)(streams != NULL ? streams[i] : i);
        const uint32_t inner = lowbias32(stream ^ lowbias32((uint32_t)(int64_t)steps[i]));
        for (int k = 0; k < 3; ++k) seeds[k * n + i] = (int64_t)lowbias32(inner ^ kinds[k]);
    }
}

/* test hooks: the conversions, and the stochastic stores of elements 0 .. n-1 of a tensor with this seed */
void hf_fadam_f16_roundtrip(const float *in, uint16_t *h, float *out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        h[i] = f16_store(in[i]);
        out[i] = f16_load(h[i]);
    }
}
void hf_fadam_bf16_roundtrip(const float *in, uint16_t *h, float *out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        h[i] = bf16_store(in[i]);
        out[i] = bf16_load(h[i]);
    }
}
void hf_fadam_store_sr(const float *in, uint16_t *out, int64_t n, int to_f16, int64_t seed) {
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t r = sr_bits16((uint32_t)i, (uint32_t)seed);
        out[i] = to_f16 ? f16_store_sr(in[i], r) : bf16_store_sr(in[i], r);
    }
}
