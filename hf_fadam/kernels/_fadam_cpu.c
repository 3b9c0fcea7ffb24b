/*
 * FAdam CPU kernel (arXiv 2405.12807), built at first use by hf_fadam/kernels/cpu_fused.py.
 *
 * Plain C (no torch headers), so that it compiles in about a second with the system compiler. One call steps
 * every tensor of one (param dtype, state dtype) group. Per tensor, three passes over memory:
 *
 *   A  sum g^2                                   -> eps_hat = eps * min(1, RMS(g))   (eps when RMS(g) = 0)
 *   B  sum (g/D)^2 and sum (theta/D)^2           -> the two RMS-clip divisors; f_new is recomputed, not stored
 *   C  f = f_new, m = b1 m + (1-b1) (g/D)/k1, theta -= lr (m + wd (theta/D)/k2)
 *
 * with f_new = bh f + (1-bh) g^2 and D = f_new^p + eps_hat. Traffic for fp32: A reads g (4 B), B reads g, f,
 * theta (12 B), C reads g, f, m, theta and writes f, m, theta (28 B): 44 B/param, against 28 B for fused AdamW.
 * Tensors smaller than SMALL_NUMEL are stepped whole by one thread (their three passes run from L1/L2); larger
 * ones are split statically across the OpenMP team, with per-thread partial sums combined in thread order, so the
 * result is deterministic for a given thread count. Sums are accumulated in double.
 *
 * The elementwise math is in the state dtype, as in hf_fadam/_single_tensor.py, and in the same order, with two
 * deliberate differences that cost a few ulp: one reciprocal 1/D is multiplied into both g and theta (one
 * division instead of two), and the clip divisors and the AMP grad scale are applied as reciprocals (exact for
 * GradScaler's power-of-two scales). The build uses -ffp-contract=off so that every pass rounds f_new identically.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define HF_FADAM_ABI 1
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

/* ---------------------------------------------------------------- thread partition */

static inline void split_range(int64_t n, int tid, int nthr, int64_t *lo, int64_t *hi) {
    int64_t per = (n + nthr - 1) / nthr;
    per = (per + ALIGN_ELEMS - 1) / ALIGN_ELEMS * ALIGN_ELEMS;
    int64_t a = per * tid, b = a + per;
    if (a > n) a = n;
    if (b > n) b = n;
    *lo = a;
    *hi = b;
}

/* ---------------------------------------------------------------- kernel template
 * NAME: suffix, PT/ST: param/state storage types, CT: compute type (the state dtype's),
 * LDP/STP: param load/store, LDS/STS: state load/store, SQRT/POW: CT math functions.
 */
#define DEFINE_FADAM_KERNEL(NAME, PT, ST, CT, LDP, STP, LDS, STS, SQRT, POW)                                      \
                                                                                                                  \
    /* the gradient as the reference sees it: converted to CT, times -1 for maximize and 1/grad_scale for AMP    \
       (gmul = sign / scale; exact for the power-of-two scales GradScaler uses) */                                 \
    static double pass_a_##NAME(const PT *g, int64_t lo, int64_t hi, CT gmul) {                                   \
        double s = 0.0;                                                                                            \
        _Pragma("omp simd reduction(+:s)") for (int64_t i = lo; i < hi; ++i) {                                     \
            CT v = (CT)LDP(g[i]) * gmul;                                                                           \
            CT sq = v * v;                                                                                         \
            s += (double)sq;                                                                                       \
        }                                                                                                          \
        return s;                                                                                                  \
    }                                                                                                              \
                                                                                                                  \
    /* p_half and want_w are compile-time constants at every call (always_inline), so no branch or pow call is  \
       left in the p = 0.5 loops */                                                                               \
    static inline __attribute__((always_inline)) void pass_b_impl_##NAME(                                         \
        const PT *th, const PT *g, const ST *f, int64_t lo, int64_t hi, CT gmul, CT bh, CT omb, CT p,              \
        const int p_half, CT eps_hat, const int want_w, double *sg, double *sw) {                                  \
        double a = 0.0, b = 0.0;                                                                                   \
        _Pragma("omp simd reduction(+:a,b)") for (int64_t i = lo; i < hi; ++i) {                                   \
            CT gv = (CT)LDP(g[i]) * gmul;                                                                          \
            CT fn = (CT)LDS(f[i]) * bh + (gv * gv) * omb;                                                          \
            CT rd = (CT)1 / ((p_half ? SQRT(fn) : POW(fn, p)) + eps_hat);                                          \
            CT nb = gv * rd;                                                                                       \
            CT nb2 = nb * nb;                                                                                      \
            a += (double)nb2;                                                                                      \
            if (want_w) {                                                                                          \
                CT w = (CT)LDP(th[i]) * rd;                                                                        \
                CT w2 = w * w;                                                                                     \
                b += (double)w2;                                                                                   \
            }                                                                                                      \
        }                                                                                                          \
        *sg = a;                                                                                                   \
        *sw = b;                                                                                                   \
    }                                                                                                              \
                                                                                                                  \
    static inline __attribute__((always_inline)) void pass_c_impl_##NAME(                                         \
        PT *th, const PT *g, ST *m, ST *f, int64_t lo, int64_t hi, CT gmul, CT bh, CT omb, CT p, const int p_half, \
        CT eps_hat, CT inv_kg, CT inv_kw, CT b1, CT omb1, CT neg_lr, CT wd, const int want_w) {                    \
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
    static void pass_b_##NAME(const PT *th, const PT *g, const ST *f, int64_t lo, int64_t hi, CT gmul, CT bh,     \
                              CT omb, CT p, int p_half, CT eps_hat, int want_w, double *sg, double *sw) {          \
        if (p_half && want_w)                                                                                      \
            pass_b_impl_##NAME(th, g, f, lo, hi, gmul, bh, omb, p, 1, eps_hat, 1, sg, sw);                         \
        else if (p_half)                                                                                           \
            pass_b_impl_##NAME(th, g, f, lo, hi, gmul, bh, omb, p, 1, eps_hat, 0, sg, sw);                         \
        else if (want_w)                                                                                           \
            pass_b_impl_##NAME(th, g, f, lo, hi, gmul, bh, omb, p, 0, eps_hat, 1, sg, sw);                         \
        else                                                                                                       \
            pass_b_impl_##NAME(th, g, f, lo, hi, gmul, bh, omb, p, 0, eps_hat, 0, sg, sw);                         \
    }                                                                                                              \
                                                                                                                  \
    static void pass_c_##NAME(PT *th, const PT *g, ST *m, ST *f, int64_t lo, int64_t hi, CT gmul, CT bh, CT omb,  \
                              CT p, int p_half, CT eps_hat, CT inv_kg, CT inv_kw, CT b1, CT omb1, CT neg_lr, CT wd, \
                              int want_w) {                                                                        \
        if (p_half && want_w)                                                                                      \
            pass_c_impl_##NAME(th, g, m, f, lo, hi, gmul, bh, omb, p, 1, eps_hat, inv_kg, inv_kw, b1, omb1, neg_lr, \
                               wd, 1);                                                                             \
        else if (p_half)                                                                                           \
            pass_c_impl_##NAME(th, g, m, f, lo, hi, gmul, bh, omb, p, 1, eps_hat, inv_kg, inv_kw, b1, omb1, neg_lr, \
                               wd, 0);                                                                             \
        else if (want_w)                                                                                           \
            pass_c_impl_##NAME(th, g, m, f, lo, hi, gmul, bh, omb, p, 0, eps_hat, inv_kg, inv_kw, b1, omb1, neg_lr, \
                               wd, 1);                                                                             \
        else                                                                                                       \
            pass_c_impl_##NAME(th, g, m, f, lo, hi, gmul, bh, omb, p, 0, eps_hat, inv_kg, inv_kw, b1, omb1, neg_lr, \
                               wd, 0);                                                                             \
    }                                                                                                              \
                                                                                                                  \
    /* one tensor, elements [lo, hi) of it owned by this thread; partial sums go through `part` (nthr x 2) */     \
    static void tensor_##NAME(PT *th, const PT *g, ST *m, ST *f, int64_t n, double bh_d, const fadam_hparams *hp, \
                              int tid, int nthr, double *part) {                                                   \
        int64_t lo = 0, hi = n;                                                                                    \
        if (nthr > 1) split_range(n, tid, nthr, &lo, &hi);                                                         \
        const double inv_scale = hp->has_grad_scale ? 1.0 / hp->grad_scale : 1.0;                                  \
        const CT gmul = (CT)(hp->maximize ? -inv_scale : inv_scale);                                               \
        const int want_w = hp->weight_decay != 0.0;                                                                \
        const int p_half = hp->p == 0.5;                                                                           \
        const CT p = (CT)hp->p, bh = (CT)bh_d, omb = (CT)1 - bh;                                                   \
        const double nd = (double)n;                                                                               \
                                                                                                                  \
        double sa = pass_a_##NAME(g, lo, hi, gmul);                                                     \
        if (nthr > 1) {                                                                                            \
            part[2 * tid] = sa;                                                                                    \
            _Pragma("omp barrier");                                                                                \
            sa = 0.0;                                                                                              \
            for (int t = 0; t < nthr; ++t) sa += part[2 * t];                                                      \
        }                                                                                                          \
        const double rms_g = sqrt(sa / nd);                                                                        \
        const CT eps_hat = (CT)(rms_g > 0.0 ? (rms_g < 1.0 ? rms_g : 1.0) * hp->eps : hp->eps);                   \
                                                                                                                  \
        double sg, sw;                                                                                             \
        pass_b_##NAME(th, g, f, lo, hi, gmul, bh, omb, p, p_half, eps_hat, want_w, &sg, &sw);          \
        if (nthr > 1) {                                                                                            \
            double *pb = part + 2 * nthr; /* a second buffer: slow threads may still read pass A's */             \
            pb[2 * tid] = sg;                                                                                      \
            pb[2 * tid + 1] = sw;                                                                                  \
            _Pragma("omp barrier");                                                                                \
            sg = sw = 0.0;                                                                                         \
            for (int t = 0; t < nthr; ++t) {                                                                       \
                sg += pb[2 * t];                                                                                   \
                sw += pb[2 * t + 1];                                                                               \
            }                                                                                                      \
        }                                                                                                          \
        const double rg = sqrt(sg / nd) / hp->clip, rw = sqrt(sw / nd) / hp->clip;                                 \
        const CT inv_kg = (CT)(rg > 1.0 ? 1.0 / rg : 1.0), inv_kw = (CT)(rw > 1.0 ? 1.0 / rw : 1.0);              \
        pass_c_##NAME(th, g, m, f, lo, hi, gmul, bh, omb, p, p_half, eps_hat, inv_kg, inv_kw,                      \
                      (CT)hp->beta1, (CT)(1.0 - hp->beta1), (CT)(-hp->lr), (CT)hp->weight_decay, want_w);          \
    }                                                                                                              \
                                                                                                                  \
    int hf_fadam_step_##NAME(int64_t ntensors, void *const *params, void *const *grads, void *const *exp_avgs,    \
                             void *const *fishers, const int64_t *numels, const double *beta2_hat,                \
                             const fadam_hparams *hp, int nthreads) {                                              \
        if (nthreads < 1) nthreads = 1;                                                                            \
        if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;                                                        \
        double part[4 * MAX_THREADS];                                                                              \
        int64_t total = 0;                                                                                         \
        for (int64_t i = 0; i < ntensors; ++i) total += numels[i];                                                 \
        if (total < SMALL_NUMEL) nthreads = 1;                                                                     \
        _Pragma("omp parallel num_threads(nthreads)") {                                                            \
            int tid = 0, nthr = 1;                                                                                 \
            PARALLEL_IDS(tid, nthr);                                                                              \
            /* small tensors: whole tensors to single threads; no barrier inside */                               \
            _Pragma("omp for schedule(dynamic, 1) nowait") for (int64_t i = 0; i < ntensors; ++i) {                \
                int64_t n = numels[i];                                                                             \
                if (n > 0 && (n < SMALL_NUMEL || nthr == 1))                                                       \
                    tensor_##NAME((PT *)params[i], (const PT *)grads[i], (ST *)exp_avgs[i], (ST *)fishers[i], n,   \
                                  beta2_hat[i], hp, 0, 1, part);                                                   \
            }                                                                                                      \
            /* large tensors: every thread takes a slice, two barriers per tensor */                              \
            if (nthr > 1) {                                                                                        \
                for (int64_t i = 0; i < ntensors; ++i) {                                                           \
                    int64_t n = numels[i];                                                                         \
                    if (n >= SMALL_NUMEL)                                                                          \
                        tensor_##NAME((PT *)params[i], (const PT *)grads[i], (ST *)exp_avgs[i], (ST *)fishers[i],  \
                                      n, beta2_hat[i], hp, tid, nthr, part);                                       \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
        return 0;                                                                                                  \
    }

#ifdef _OPENMP
#define PARALLEL_IDS(tid, nthr) \
    do {                         \
        tid = omp_get_thread_num(); \
        nthr = omp_get_num_threads(); \
    } while (0)
#else
#define PARALLEL_IDS(tid, nthr) \
    do {                         \
    } while (0)
#endif

#define ID(x) (x)

DEFINE_FADAM_KERNEL(f32_f32, float, float, float, ID, ID, ID, ID, sqrtf, powf)
DEFINE_FADAM_KERNEL(f64_f64, double, double, double, ID, ID, ID, ID, sqrt, pow)
DEFINE_FADAM_KERNEL(bf16_f32, uint16_t, float, float, bf16_load, bf16_store, ID, ID, sqrtf, powf)
DEFINE_FADAM_KERNEL(f16_f32, uint16_t, float, float, f16_load, f16_store, ID, ID, sqrtf, powf)
DEFINE_FADAM_KERNEL(f32_f64, float, double, double, ID, (float), ID, ID, sqrt, pow)
DEFINE_FADAM_KERNEL(f64_f32, double, float, float, ID, ID, ID, ID, sqrtf, powf)

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
