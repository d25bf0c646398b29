/* moeframe fused_cpu: the aarch64 micro-kernels (Advanced SIMD, "NEON": 128-bit vectors of
 * 4 fp32 lanes, 32 vector registers; the baseline of every ARMv8-A CPU, so this variant
 * needs nothing beyond -march=armv8-a).  The interface and what each function computes:
 * ukernel.h (which includes this file; do not include it directly).
 *
 * - bf16 is widened to fp32 by a 16-bit left shift (vshll), which keeps the elements in
 *   order: the "dot order" is the identity here;
 * - fp16 is widened by vcvt_f32_f16 (FCVTL, part of ARMv8-A) and scalars go through __fp16;
 * - the panel kernel is 16 tokens (four vectors) by up to 4 weight rows: 16 accumulators,
 *   each weight element broadcast from memory (LD1R) into four fused multiply-adds;
 * - min/max are FMIN/FMAX, which return NaN when either operand is NaN, so NaN propagates
 *   through the activations as it does on x86;
 * - register use was checked in GCC 12's and clang's -O3 output for aarch64: no accumulator
 *   of the panel or dot kernels is kept on the stack (what sets UK_ROWS = 4 and the dot
 *   kernel's 8-element steps).
 * No SVE: see "CPU variants" in docs/performance.md for why.
 */
#ifndef MOEFRAME_UKERNEL_NEON_H
#define MOEFRAME_UKERNEL_NEON_H

#include <arm_neon.h>

#define AI UK_INLINE
/* loops over the registers of a micro-kernel, unrolled so that arrays of vectors become registers */
#define UNROLL _Pragma("GCC unroll 16")

enum { UK_PANEL = 16, UK_ROWS = 4, UK_DOT_MAX_M = 6, UK_DOT_ROWS_MAX = 8 };

UK_INLINE float uk_f16_to_float(uint16_t h) {
    __fp16 v;
    memcpy(&v, &h, 2);
    return (float)v;
}
UK_INLINE uint16_t uk_float_to_f16(float f) { /* FCVT: the rounding mode of FPCR, nearest even by default */
    const __fp16 v = (__fp16)f;
    uint16_t h;
    memcpy(&h, &v, 2);
    return h;
}

/* ------------------------------------------------------------------ element conversion */
/* four elements p[i .. i+4) of dtype dt as fp32 */
AI float32x4_t load4(const void *p, long i, const int dt) {
    if (dt == DT_F32) return vld1q_f32((const float *)p + i);
    const uint16x4_t v = vld1_u16((const uint16_t *)p + i);
    if (dt == DT_BF16) return vreinterpretq_f32_u32(vshll_n_u16(v, 16));
    return vcvt_f32_f16(vreinterpret_f16_u16(v));
}

/* eight elements p[i .. i+8) of dtype dt as fp32, in order (two vectors) */
AI void load8(const void *p, long i, const int dt, float32x4_t *lo, float32x4_t *hi) {
    if (dt == DT_F32) {
        *lo = vld1q_f32((const float *)p + i);
        *hi = vld1q_f32((const float *)p + i + 4);
        return;
    }
    const uint16x8_t v = vld1q_u16((const uint16_t *)p + i);
    if (dt == DT_BF16) {
        *lo = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(v), 16));
        *hi = vreinterpretq_f32_u32(vshll_high_n_u16(v, 16));
    } else {
        const float16x8_t h = vreinterpretq_f16_u16(v);
        *lo = vcvt_f32_f16(vget_low_f16(h));
        *hi = vcvt_high_f32_f16(h);
    }
}

/* ------------------------------------------------------------------ activations (fp32) */
AI float32x4_t exp4(float32x4_t x) { /* Cephes expf, as the x86 exp8: about 1 ulp; NaN propagates */
    x = vminq_f32(vdupq_n_f32(88.3762626647949f), x);
    x = vmaxq_f32(vdupq_n_f32(-88.3762626647949f), x);
    const float32x4_t fx = vrndmq_f32(vfmaq_f32(vdupq_n_f32(0.5f), x, vdupq_n_f32(1.44269504088896341f)));
    x = vfmsq_f32(x, fx, vdupq_n_f32(0.693359375f));
    x = vfmsq_f32(x, fx, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t y = vdupq_n_f32(1.9875691500E-4f);
    y = vfmaq_f32(vdupq_n_f32(1.3981999507E-3f), y, x);
    y = vfmaq_f32(vdupq_n_f32(8.3334519073E-3f), y, x);
    y = vfmaq_f32(vdupq_n_f32(4.1665795894E-2f), y, x);
    y = vfmaq_f32(vdupq_n_f32(1.6666665459E-1f), y, x);
    y = vfmaq_f32(vdupq_n_f32(5.0000001201E-1f), y, x);
    y = vfmaq_f32(x, y, vmulq_f32(x, x));
    y = vaddq_f32(y, vdupq_n_f32(1.0f));
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(fx), vdupq_n_s32(127)), 23);
    return vmulq_f32(y, vreinterpretq_f32_s32(e));
}

AI float32x4_t sigmoid4(float32x4_t x) {
    const float32x4_t one = vdupq_n_f32(1.0f);
    return vdivq_f32(one, vaddq_f32(one, exp4(vnegq_f32(x))));
}

AI float32x4_t erf4(float32x4_t x) { /* Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7), as the x86 erf8 */
    const uint32x4_t sign = vandq_u32(vreinterpretq_u32_f32(x), vdupq_n_u32(0x80000000u));
    const float32x4_t a = vabsq_f32(x), one = vdupq_n_f32(1.0f);
    const float32x4_t t = vdivq_f32(one, vfmaq_f32(one, vdupq_n_f32(0.3275911f), a));
    float32x4_t r = vdupq_n_f32(1.061405429f);
    r = vfmaq_f32(vdupq_n_f32(-1.453152027f), r, t);
    r = vfmaq_f32(vdupq_n_f32(1.421413741f), r, t);
    r = vfmaq_f32(vdupq_n_f32(-0.284496736f), r, t);
    r = vfmaq_f32(vdupq_n_f32(0.254829592f), r, t);
    const float32x4_t e = exp4(vnegq_f32(vmulq_f32(a, a)));
    const float32x4_t y = vfmsq_f32(one, vmulq_f32(r, t), e);
    return vreinterpretq_f32_u32(veorq_u32(vreinterpretq_u32_f32(y), sign));
}

AI float32x4_t act4(float32x4_t g, float32x4_t u, act_t act) {
    if (act.kind == ACT_SILU) return vmulq_f32(vmulq_f32(g, sigmoid4(g)), u);
    if (act.kind == ACT_GELU) {
        const float32x4_t c = vaddq_f32(vdupq_n_f32(1.0f), erf4(vmulq_f32(g, vdupq_n_f32(0.70710678118654752f))));
        return vmulq_f32(vmulq_f32(vmulq_f32(g, vdupq_n_f32(0.5f)), c), u);
    }
    const float32x4_t lim = vdupq_n_f32(act.limit);
    g = vminq_f32(lim, g);
    u = vmaxq_f32(vnegq_f32(lim), vminq_f32(lim, u));
    const float32x4_t s = sigmoid4(vmulq_f32(vdupq_n_f32(act.alpha), g));
    return vmulq_f32(vaddq_f32(u, vdupq_n_f32(1.0f)), vmulq_f32(g, s));
}

/* Activation of n values: h[i] = act(g[i], u[i]); h may alias g. */
static inline void uk_act(float *h, const float *g, const float *u, long n, act_t act) {
    long i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(h + i, act4(vld1q_f32(g + i), vld1q_f32(u + i), act));
    if (i < n) {
        float gb[4] = {0}, ub[4] = {0}, hb[4];
        memcpy(gb, g + i, (size_t)(n - i) * 4);
        memcpy(ub, u + i, (size_t)(n - i) * 4);
        vst1q_f32(hb, act4(vld1q_f32(gb), vld1q_f32(ub), act));
        memcpy(h + i, hb, (size_t)(n - i) * 4);
    }
}

/* ------------------------------------------------------------------ the panel kernel */
/* out[r][j] = sum_k w[r * rs + k * ks] * xp[k][j] for R <= 4 rows and a [K][16] panel: the
   16 tokens are four vectors, each weight element is broadcast from memory (LD1R) into four
   fused multiply-adds, 4 x 4 = 16 accumulators (named variables, so that they stay in
   registers): 16 independent chains, enough for 4 FMA pipes of latency 4.  Not 6 rows as on
   x86: 24 accumulators, 4 token vectors and the broadcast weights exceed the 32 registers,
   and GCC then keeps accumulators on the stack inside the loop (seen in its -O3 output).
   The sum over k runs in order: fixed by K alone. */
#define PK_STEP(r)                                                   \
    if (R > r) {                                                     \
        const float32x4_t b = vld1q_dup_f32(wp + r * rs + k * ks);   \
        a##r##0 = vfmaq_f32(a##r##0, b, x0);                         \
        a##r##1 = vfmaq_f32(a##r##1, b, x1);                         \
        a##r##2 = vfmaq_f32(a##r##2, b, x2);                         \
        a##r##3 = vfmaq_f32(a##r##3, b, x3);                         \
    }
#define PK_OUT(r)                                  \
    if (R > r) {                                   \
        vst1q_f32(out + r * UK_PANEL, a##r##0);      \
        vst1q_f32(out + r * UK_PANEL + 4, a##r##1);  \
        vst1q_f32(out + r * UK_PANEL + 8, a##r##2);  \
        vst1q_f32(out + r * UK_PANEL + 12, a##r##3); \
    }
#define PANEL_DEF(RR)                                                                                            \
    static __attribute__((noinline)) void panel_##RR(const float *wp, long rs, long ks, const float *xp, long K,  \
                                                     float *out, const char *const *pf, long pf_bytes) {        \
        enum { R = RR };                                                                                        \
        const float32x4_t z = vdupq_n_f32(0.0f);                                                                \
        float32x4_t a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z;                     \
        float32x4_t a20 = z, a21 = z, a22 = z, a23 = z, a30 = z, a31 = z, a32 = z, a33 = z;                     \
        for (long k0 = 0; k0 < K; k0 += 16) {                                                                   \
            if (pf) { /* the next tile's weight rows: one line of each per 16 steps */                          \
                const long off = k0 * pf_bytes / K;                                                             \
                for (int r = 0; r < R; r++) __builtin_prefetch(pf[r] + off, 0, 3);                              \
            }                                                                                                   \
            const long k1 = k0 + 16 < K ? k0 + 16 : K;                                                          \
            for (long k = k0; k < k1; k++) {                                                                    \
                const float *xk = xp + UK_PANEL * k;                                                            \
                const float32x4_t x0 = vld1q_f32(xk), x1 = vld1q_f32(xk + 4), x2 = vld1q_f32(xk + 8);           \
                const float32x4_t x3 = vld1q_f32(xk + 12);                                                      \
                PK_STEP(0) PK_STEP(1) PK_STEP(2) PK_STEP(3)                                                     \
            }                                                                                                   \
        }                                                                                                       \
        PK_OUT(0) PK_OUT(1) PK_OUT(2) PK_OUT(3)                                                                 \
        (void)a00, (void)a01, (void)a02, (void)a03, (void)a10, (void)a11, (void)a12, (void)a13;                 \
        (void)a20, (void)a21, (void)a22, (void)a23, (void)a30, (void)a31, (void)a32, (void)a33;                 \
    }
typedef void (*panel_fn)(const float *wp, long rs, long ks, const float *xp, long K, float *out, const char *const *pf,
                         long pf_bytes);
PANEL_DEF(1) PANEL_DEF(2) PANEL_DEF(3) PANEL_DEF(4)
static const panel_fn PANELS[UK_ROWS + 1] = {0, panel_1, panel_2, panel_3, panel_4};

UK_INLINE void uk_panel(int R, const float *w, long rs, long ks, const float *xp, long K, float *out,
                        const char *const *pf, long pf_bytes) {
    PANELS[R](w, rs, ks, xp, K, out, pf, pf_bytes);
}

/* ------------------------------------------------------------------ the dot kernel */
/* bf16 and fp16 are widened in order, so operands need no reordering */
AI long uk_dot_order(long i, long K) {
    (void)K;
    return i;
}

/* acc[r*M + m] += w[r][k .. k+8) . x[m][k .. k+8): each weight element is loaded once, as two
   vectors, into the M tokens' accumulators.  Eight elements a step keeps the live registers
   (R*M <= 12 accumulators, 2*M token vectors, 2 weight vectors) within the 32 there are;
   a 16-element step spills accumulators to the stack with GCC (seen in its -O3 output). */
AI void dot_step(const int R, const int M, const void *const *w, const int dt, const float *x, long K, long k,
                 float32x4_t *acc) {
    UNROLL for (int r = 0; r < R; r++) {
        float32x4_t w0, w1;
        load8(w[r], k, dt, &w0, &w1);
        UNROLL for (int m = 0; m < M; m++) {
            const float *xm = x + m * K + k;
            acc[r * M + m] = vfmaq_f32(vfmaq_f32(acc[r * M + m], w0, vld1q_f32(xm)), w1, vld1q_f32(xm + 4));
        }
    }
}

/* res[r*M + m] = sum_k w[r][k] * x[m][k] for R weight rows (dtype dt) and M fp32 rows, in
   order (the dot order is the identity) */
AI void dot_kernel(const int R, const int M, const void *const *w, const int dt, const float *x, long K, float *res) {
    float32x4_t acc[12];
    UNROLL for (int i = 0; i < R * M; i++) acc[i] = vdupq_n_f32(0.0f);
    long k = 0;
    for (; k + 8 <= K; k += 8) dot_step(R, M, w, dt, x, K, k, acc);
    for (; k + 4 <= K; k += 4)
        UNROLL for (int r = 0; r < R; r++) {
            const float32x4_t wa = load4(w[r], k, dt);
            UNROLL for (int m = 0; m < M; m++) acc[r * M + m] = vfmaq_f32(acc[r * M + m], wa, vld1q_f32(x + m * K + k));
        }
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int m = 0; m < M; m++) {
            float s = vaddvq_f32(acc[r * M + m]);
            for (long kk = k; kk < K; kk++) s += uk_load1(w[r], kk, dt) * x[m * K + kk];
            res[r * M + m] = s;
        }
}

/* Rows per dot pass for M tokens (R*M accumulators <= 12; a lone token gets the most rows,
   to keep the most loads in flight).  Phase 1 counts neurons (2 rows each). */
static const int uk_dot_neurons[UK_DOT_MAX_M + 1] = {0, 4, 3, 2, 1, 1, 1};
static const int uk_dot_rows[UK_DOT_MAX_M + 1] = {0, 8, 6, 4, 3, 2, 2};

typedef void (*dot_fn)(const void *const *w, const float *x, long K, float *res);
#define DOT_DEF(R, M, DT, NAME)                                                                                     \
    static __attribute__((noinline)) void NAME##_##R##_##M(const void *const *w, const float *x, long K, float *res) { \
        dot_kernel(R, M, w, DT, x, K, res);                                                                         \
    }
#define DOT_ALL(DT, NAME)                                                                           \
    DOT_DEF(8, 1, DT, NAME) DOT_DEF(6, 2, DT, NAME) DOT_DEF(4, 3, DT, NAME) DOT_DEF(2, 4, DT, NAME) \
    DOT_DEF(3, 4, DT, NAME) DOT_DEF(2, 5, DT, NAME) DOT_DEF(2, 6, DT, NAME) DOT_DEF(1, 1, DT, NAME) \
    DOT_DEF(1, 2, DT, NAME) DOT_DEF(1, 3, DT, NAME) DOT_DEF(1, 4, DT, NAME) DOT_DEF(1, 5, DT, NAME) \
    DOT_DEF(1, 6, DT, NAME)
DOT_ALL(DT_F32, dot_f32)
DOT_ALL(DT_BF16, dot_bf16)
DOT_ALL(DT_F16, dot_f16)
#define DOT_PICK(NAME, R, M)             \
    switch ((R) * 8 + (M)) {             \
        case 8 * 8 + 1: return NAME##_8_1; \
        case 6 * 8 + 2: return NAME##_6_2; \
        case 4 * 8 + 3: return NAME##_4_3; \
        case 2 * 8 + 4: return NAME##_2_4; \
        case 3 * 8 + 4: return NAME##_3_4; \
        case 2 * 8 + 5: return NAME##_2_5; \
        case 2 * 8 + 6: return NAME##_2_6; \
        case 1 * 8 + 1: return NAME##_1_1; \
        case 1 * 8 + 2: return NAME##_1_2; \
        case 1 * 8 + 3: return NAME##_1_3; \
        case 1 * 8 + 4: return NAME##_1_4; \
        case 1 * 8 + 5: return NAME##_1_5; \
        case 1 * 8 + 6: return NAME##_1_6; \
        default: return 0;               \
    }
static dot_fn dot_pick(int dt, int R, int M) {
    if (dt == DT_F32) DOT_PICK(dot_f32, R, M)
    if (dt == DT_BF16) DOT_PICK(dot_bf16, R, M)
    DOT_PICK(dot_f16, R, M)
}

/* R rows against M tokens; R without a kernel of its own goes one row at a time. */
static inline void uk_dot(int dt, int R, int M, const void *const *w, const float *x, long K, float *res) {
    const dot_fn f = dot_pick(dt, R, M);
    if (f) {
        f(w, x, K, res);
        return;
    }
    const dot_fn one = dot_pick(dt, 1, M);
    for (int r = 0; r < R; r++) one(w + r, x, K, res + r * M);
}

/* ------------------------------------------------------------------ packing */
/* 4x4 transpose: row q of the result holds element q of each of r0..r3 */
AI void transpose4(float32x4_t *r0, float32x4_t *r1, float32x4_t *r2, float32x4_t *r3) {
    const float32x4_t t0 = vtrn1q_f32(*r0, *r1), t1 = vtrn2q_f32(*r0, *r1);
    const float32x4_t t2 = vtrn1q_f32(*r2, *r3), t3 = vtrn2q_f32(*r2, *r3);
    *r0 = vreinterpretq_f32_f64(vtrn1q_f64(vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t2)));
    *r1 = vreinterpretq_f32_f64(vtrn1q_f64(vreinterpretq_f64_f32(t1), vreinterpretq_f64_f32(t3)));
    *r2 = vreinterpretq_f32_f64(vtrn2q_f64(vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t2)));
    *r3 = vreinterpretq_f32_f64(vtrn2q_f64(vreinterpretq_f64_f32(t1), vreinterpretq_f64_f32(t3)));
}

/* xp[k][j] = x[tok[j]][k] for j < 16 (a [K][16] panel, fp32), 4x4 blocks at a time */
AI void uk_pack_panel(const void *x, const int dt, long K, const int32_t *tok, float *xp) {
    long k = 0;
    for (; k + 4 <= K; k += 4)
        for (int j0 = 0; j0 < UK_PANEL; j0 += 4) {
            float32x4_t r0 = load4(x, (long)tok[j0] * K + k, dt), r1 = load4(x, (long)tok[j0 + 1] * K + k, dt);
            float32x4_t r2 = load4(x, (long)tok[j0 + 2] * K + k, dt), r3 = load4(x, (long)tok[j0 + 3] * K + k, dt);
            transpose4(&r0, &r1, &r2, &r3);
            float *d = xp + k * UK_PANEL + j0;
            vst1q_f32(d, r0);
            vst1q_f32(d + UK_PANEL, r1);
            vst1q_f32(d + 2 * UK_PANEL, r2);
            vst1q_f32(d + 3 * UK_PANEL, r3);
        }
    for (; k < K; k++)
        for (int j = 0; j < UK_PANEL; j++) xp[k * UK_PANEL + j] = uk_load1(x, (long)tok[j] * K + k, dt);
}

/* dst[j][k] = x[tok[j]][k] as fp32 rows (in order: the dot order is the identity here) */
AI void uk_pack_rows(const void *x, const int dt, long K, const int32_t *tok, int m, float *dst) {
    for (int j = 0; j < m; j++) {
        long k = 0;
        const long base = (long)tok[j] * K;
        float *d = dst + j * K;
        for (; k + 8 <= K; k += 8) {
            float32x4_t lo, hi;
            load8(x, base + k, dt, &lo, &hi);
            vst1q_f32(d + k, lo);
            vst1q_f32(d + k + 4, hi);
        }
        for (; k < K; k++) d[k] = uk_load1(x, base + k, dt);
    }
}

/* wp[k][r] = w[r][k] as fp32, for R <= UK_ROWS rows of length K (the panel kernel's operand):
   4 rows by 4x4 transposes, fewer element by element.  Writes nothing past wp[K * R]. */
AI void uk_pack_w(const void *const *w, const int R, const int dt, long K, float *wp) {
    long k = 0;
    if (R == 4)
        for (; k + 4 <= K; k += 4) {
            float32x4_t r0 = load4(w[0], k, dt), r1 = load4(w[1], k, dt), r2 = load4(w[2], k, dt);
            float32x4_t r3 = load4(w[3], k, dt);
            transpose4(&r0, &r1, &r2, &r3);
            vst1q_f32(wp + k * 4, r0);
            vst1q_f32(wp + k * 4 + 4, r1);
            vst1q_f32(wp + k * 4 + 8, r2);
            vst1q_f32(wp + k * 4 + 12, r3);
        }
    for (; k < K; k++)
        for (int r = 0; r < R; r++) wp[k * R + r] = uk_load1(w[r], k, dt);
}

#undef AI
#undef UNROLL
#undef PK_STEP
#undef PK_OUT
#undef PANEL_DEF
#undef DOT_DEF
#undef DOT_ALL
#undef DOT_PICK

#endif
