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
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define HF_FADAM_ABI 2
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
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t expo = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    if (expo == 0x1fu) return bits_to_f32(sign | 0x7f800000u | (mant << 13));
    if (expo == 0) { /* zero or subnormal: mant * 2^-24 is exact in float */
        float v = (float)mant * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return bits_to_f32(sign | ((expo + 112u) << 23) | (mant << 13));
}

static inline uint16_t f16_store(float f) {
    uint32_t x = f32_to_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) return sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u); /* NaN / inf */
    if (x >= 0x477ff000u) return sign | 0x7c00u;                                /* rounds to inf */
    if (x < 0x38800000u) {
        /* half subnormal or zero: adding 0.5 puts the half ulp (2^-24) at the float ulp of the sum, so the
           FPU's round-to-nearest-even does the rounding */
        float a = bits_to_f32(x) + 0.5f;
        return sign | (uint16_t)(f32_to_bits(a) - 0x3f000000u);
    }
    /* normal: rebias the exponent (-112 << 23) and round the 13 dropped mantissa bits to nearest even */
    x += 0xc8000fffu + ((x >> 13) & 1u);
    return sign | (uint16_t)(x >> 13);
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
 * LDP/STP: param load/store, LDS/STS: state load/store, SQRT/POW: CT math functions.
 */
#define DEFINE_FADAM_KERNEL(NAME, PT, ST, CT, LDP, STP, LDS, STS, SQRT, POW)                                      \
                                                                                                                  \
    /* the per-tensor scalars of passes B and C, from the reduced Σg² (double, then CT). gmul converts g as the  \
       reference sees it: times -1 for maximize and 1/grad_scale for AMP (exact for power-of-two scales) */       \
    typedef struct {                                                                                               \
        CT gmul, bh, omb, p, eps_hat;                                                                              \
        int p_half, want_w;                                                                                        \
    } scalars_##NAME;                                                                                              \
                                                                                                                  \
    static inline CT gmul_##NAME(const fadam_hparams *hp) {                                                       \
        const double inv_scale = hp->has_grad_scale ? 1.0 / hp->grad_scale : 1.0;                                 \
        return (CT)(hp->maximize ? -inv_scale : inv_scale);                                                       \
    }                                                                                                              \
                                                                                                                  \
    static inline scalars_##NAME scalars_of_##NAME(const pass_ctx *c, int64_t col) {                              \
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
    /* pass A body: Σg², each element widened to double before it is squared */                                  \
    static void sum_a_##NAME(const pass_ctx *c, int64_t t, int64_t lo, int64_t hi, double *out) {                 \
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
    /* p_half and want_w are compile-time constants at every call (always_inline), so no branch or pow call is  \
       left in the p = 0.5 loops */                                                                               \
    static inline __attribute__((always_inline)) void sum_b_impl_##NAME(                                          \
        const PT *th, const PT *g, const ST *f, int64_t lo, int64_t hi, const scalars_##NAME *sc,                  \
        const int p_half, const int want_w, double *out) {                                                         \
        const CT gmul = sc->gmul, bh = sc->bh, omb = sc->omb, p = sc->p, eps_hat = sc->eps_hat;                    \
        double a = 0.0, b = 0.0;                                                                                   \
        _Pragma("omp simd reduction(+:a,b)") for (int64_t i = lo; i < hi; ++i) {                                   \
            CT gv = (CT)LDP(g[i]) * gmul;                                                                          \
            CT fn = (CT)LDS(f[i]) * bh + (gv * gv) * omb;                                                          \
            CT rd = (CT)1 / ((p_half ? SQRT(fn) : POW(fn, p)) + eps_hat);                                          \
            double nb = (double)(gv * rd);                                                                         \
            a += nb * nb;                                                                                          \
            if (want_w) {                                                                                          \
                double w = (double)((CT)LDP(th[i]) * rd);                                                          \
                b += w * w;                                                                                        \
            }                                                                                                      \
        }                                                                                                          \
        out[0] = a;                                                                                                \
        out[1] = b;                                                                                                \
    }                                                                                                              \
                                                                                                                  \
    /* pass B body: Σ(g/D)² and Σ(θ/D)² */                                                                        \
    static void sum_b_##NAME(const pass_ctx *c, int64_t t, int64_t lo, int64_t hi, double *out) {                 \
        const scalars_##NAME sc = scalars_of_##NAME(c, col_of(c, t));                                              \
        const PT *th = (const PT *)c->params[t], *g = (const PT *)c->grads[t];                                     \
        const ST *f = (const ST *)c->fishers[t];                                                                   \
        if (sc.p_half && sc.want_w)                                                                                \
            sum_b_impl_##NAME(th, g, f, lo, hi, &sc, 1, 1, out);                                                   \
        else if (sc.p_half)                                                                                        \
            sum_b_impl_##NAME(th, g, f, lo, hi, &sc, 1, 0, out);                                                   \
        else if (sc.want_w)                                                                                        \
            sum_b_impl_##NAME(th, g, f, lo, hi, &sc, 0, 1, out);                                                   \
        else                                                                                                       \
            sum_b_impl_##NAME(th, g, f, lo, hi, &sc, 0, 0, out);                                                   \
    }                                                                                                              \
                                                                                                                  \
    static inline __attribute__((always_inline)) void update_impl_##NAME(                                         \
        PT *th, const PT *g, ST *m, ST *f, int64_t lo, int64_t hi, const scalars_##NAME *sc, const int p_half,     \
        const int want_w, CT inv_kg, CT inv_kw, const fadam_hparams *hp) {                                         \
        const CT gmul = sc->gmul, bh = sc->bh, omb = sc->omb, p = sc->p, eps_hat = sc->eps_hat;                    \
        const CT b1 = (CT)hp->beta1, omb1 = (CT)(1.0 - hp->beta1), neg_lr = (CT)(-hp->lr);                         \
        const CT wd = (CT)hp->weight_decay;                                                                        \
        _Pragma("omp simd") for (int64_t i = lo; i < hi; ++i) {                                                    \
            CT gv = (CT)LDP(g[i]) * gmul;                                                                          \
            CT fn = (CT)LDS(f[i]) * bh + (gv * gv) * omb;                                                          \
            CT rd = (CT)1 / ((p_half ? SQRT(fn) : POW(fn, p)) + eps_hat);                                          \
            CT t = (CT)LDP(th[i]);                                                                                 \
            CT nb = (gv * rd) * inv_kg;                                                                            \
            CT mn = (CT)LDS(m[i]) * b1 + nb * omb1;                                                                \
            CT upd = mn;                                                                                           \
            if (want_w) upd = mn + wd * ((t * rd) * inv_kw);                                                       \
            f[i] = STS(fn);                                                                                        \
            m[i] = STS(mn);                                                                                        \
            th[i] = STP(t + upd * neg_lr);                                                                         \
        }                                                                                                          \
    }                                                                                                              \
                                                                                                                  \
    /* pass C body: the clip divisors from the reduced sums, then f, m and theta */                              \
    static void update_##NAME(const pass_ctx *c, int64_t t, int64_t lo, int64_t hi) {                             \
        const int64_t col = col_of(c, t);                                                                          \
        const scalars_##NAME sc = scalars_of_##NAME(c, col);                                                       \
        const CT inv_kg = (CT)inv_clip_of(c->sums2[col], c->numels[col], c->hp->clip);                             \
        const CT inv_kw = (CT)inv_clip_of(c->sums2[c->ncols + col], c->numels[col], c->hp->clip);                  \
        PT *th = (PT *)c->params[t];                                                                               \
        const PT *g = (const PT *)c->grads[t];                                                                     \
        ST *m = (ST *)c->exp_avgs[t], *f = (ST *)c->fishers[t];                                                    \
        if (sc.p_half && sc.want_w)                                                                                \
            update_impl_##NAME(th, g, m, f, lo, hi, &sc, 1, 1, inv_kg, inv_kw, c->hp);                             \
        else if (sc.p_half)                                                                                        \
            update_impl_##NAME(th, g, m, f, lo, hi, &sc, 1, 0, inv_kg, inv_kw, c->hp);                             \
        else if (sc.want_w)                                                                                        \
            update_impl_##NAME(th, g, m, f, lo, hi, &sc, 0, 1, inv_kg, inv_kw, c->hp);                             \
        else                                                                                                       \
            update_impl_##NAME(th, g, m, f, lo, hi, &sc, 0, 0, inv_kg, inv_kw, c->hp);                             \
    }                                                                                                              \
                                                                                                                  \
    /* pass A: sums1[col(i)] = Σ g_i² over the local elements */                                                  \
    int hf_fadam_pass_a_##NAME(int64_t ntensors, void *const *grads, const int64_t *sizes, const int64_t *cols,   \
                               double *sums1, const fadam_hparams *hp, int nthreads) {                             \
        pass_ctx c = {NULL, grads, NULL, NULL, cols, 0, NULL, NULL, NULL, NULL, hp};                               \
        return multi_tensor_sums(&c, ntensors, sizes, 1, sum_a_##NAME, sums1, nthreads);                           \
    }                                                                                                              \
                                                                                                                  \
    /* pass B: from the reduced sums1 and the logical numels, sums2[col(i)] = Σ (g/D)² and                       \
       sums2[ncols + col(i)] = Σ (θ/D)² (0 when weight_decay == 0) */                                             \
    int hf_fadam_pass_b_##NAME(int64_t ntensors, void *const *params, void *const *grads, void *const *fishers,    \
                               const int64_t *sizes, const int64_t *cols, int64_t ncols, const double *numels,     \
                               const double *beta2_hat, const double *sums1, double *sums2,                       \
                               const fadam_hparams *hp, int nthreads) {                                            \
        pass_ctx c = {params, grads, NULL, fishers, cols, ncols, numels, beta2_hat, sums1, NULL, hp};              \
        return multi_tensor_sums(&c, ntensors, sizes, 2, sum_b_##NAME, sums2, nthreads);                           \
    }                                                                                                              \
                                                                                                                  \
    /* pass C: the update, from the reduced sums1 and sums2 (2 rows of ncols) */                                  \
    int hf_fadam_pass_c_##NAME(int64_t ntensors, void *const *params, void *const *grads, void *const *exp_avgs,  \
                               void *const *fishers, const int64_t *sizes, const int64_t *cols, int64_t ncols,     \
                               const double *numels, const double *beta2_hat, const double *sums1,                \
                               const double *sums2, const fadam_hparams *hp, int nthreads) {                       \
        pass_ctx c = {params, grads, exp_avgs, fishers, cols, ncols, numels, beta2_hat, sums1, sums2, hp};         \
        multi_tensor_apply(&c, ntensors, sizes, update_##NAME, nthreads);                                          \
        return 0;                                                                                                  \
    }                                                                                                              \
                                                                                                                  \
    /* A, B and C without a reduction (one process), small tensors cache-hot: see whole_step */                   \
    int hf_fadam_step_##NAME(int64_t ntensors, void *const *params, void *const *grads, void *const *exp_avgs,    \
                             void *const *fishers, const int64_t *sizes, const int64_t *cols, int64_t ncols,       \
                             const double *numels, const double *beta2_hat, double *sums1, double *sums2,         \
                             const fadam_hparams *hp, int nthreads) {                                              \
        pass_ctx c = {params, grads, exp_avgs, fishers, cols, ncols, numels, beta2_hat, sums1, sums2, hp};         \
        return whole_step(&c, ntensors, sizes, sum_a_##NAME, sum_b_##NAME, update_##NAME, sums1, sums2, nthreads); \
    }

#define ID(x) (x)
#define TO_F32(x) ((float)(x))

/* every (param, state) pair of {f32, f64, bf16, f16}; CT = double for f64 state, else float */
/*                   NAME       PT        ST        CT      LDP        STP         LDS        STS         SQRT   POW */
DEFINE_FADAM_KERNEL(f32_f32,   float,    float,    float,  ID,        ID,         ID,        ID,         sqrtf, powf)
DEFINE_FADAM_KERNEL(f64_f32,   double,   float,    float,  ID,        ID,         ID,        ID,         sqrtf, powf)
DEFINE_FADAM_KERNEL(bf16_f32,  uint16_t, float,    float,  bf16_load, bf16_store, ID,        ID,         sqrtf, powf)
DEFINE_FADAM_KERNEL(f16_f32,   uint16_t, float,    float,  f16_load,  f16_store,  ID,        ID,         sqrtf, powf)
DEFINE_FADAM_KERNEL(f32_f64,   float,    double,   double, ID,        TO_F32,     ID,        ID,         sqrt,  pow)
DEFINE_FADAM_KERNEL(f64_f64,   double,   double,   double, ID,        ID,         ID,        ID,         sqrt,  pow)
DEFINE_FADAM_KERNEL(bf16_f64,  uint16_t, double,   double, bf16_load, bf16_store, ID,        ID,         sqrt,  pow)
DEFINE_FADAM_KERNEL(f16_f64,   uint16_t, double,   double, f16_load,  f16_store,  ID,        ID,         sqrt,  pow)
DEFINE_FADAM_KERNEL(f32_bf16,  float,    uint16_t, float,  ID,        ID,         bf16_load, bf16_store, sqrtf, powf)
DEFINE_FADAM_KERNEL(f64_bf16,  double,   uint16_t, float,  ID,        ID,         bf16_load, bf16_store, sqrtf, powf)
DEFINE_FADAM_KERNEL(bf16_bf16, uint16_t, uint16_t, float,  bf16_load, bf16_store, bf16_load, bf16_store, sqrtf, powf)
DEFINE_FADAM_KERNEL(f16_bf16,  uint16_t, uint16_t, float,  f16_load,  f16_store,  bf16_load, bf16_store, sqrtf, powf)
DEFINE_FADAM_KERNEL(f32_f16,   float,    uint16_t, float,  ID,        ID,         f16_load,  f16_store,  sqrtf, powf)
DEFINE_FADAM_KERNEL(f64_f16,   double,   uint16_t, float,  ID,        ID,         f16_load,  f16_store,  sqrtf, powf)
DEFINE_FADAM_KERNEL(bf16_f16,  uint16_t, uint16_t, float,  bf16_load, bf16_store, f16_load,  f16_store,  sqrtf, powf)
DEFINE_FADAM_KERNEL(f16_f16,   uint16_t, uint16_t, float,  f16_load,  f16_store,  f16_load,  f16_store,  sqrtf, powf)

/* test hooks for the conversions */
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
