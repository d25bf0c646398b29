/* moeframe fused_cpu: the x86-64 micro-kernels (AVX2 + FMA + F16C; the prefill panel kernel
 * is 16 lanes wide where the variant is compiled with -mavx512f).  The interface and what
 * each function computes: ukernel.h (which includes this file; do not include it directly).
 */
#ifndef MOEFRAME_UKERNEL_X86_H
#define MOEFRAME_UKERNEL_X86_H

#include <immintrin.h>

#define AI UK_INLINE

#if defined(__AVX512F__)
/* a partial panel from 4 tokens on (fewer take the dot kernel) */
enum { UK_PANEL = 32, UK_ROWS = 12, UK_PANEL_MIN = 9, UK_ITEM = 128 };
#else
enum { UK_PANEL = 16, UK_ROWS = 6 };
#endif
enum { UK_DOT_MAX_M = 6, UK_DOT_ROWS_MAX = 8 };

UK_INLINE float uk_f16_to_float(uint16_t h) { return _cvtsh_ss(h); }
UK_INLINE uint16_t uk_float_to_f16(float f) { return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

/* ------------------------------------------------------------------ element conversion */
AI __m256 load8(const void *p, long i, const int dt) {
    if (dt == DT_F32) return _mm256_loadu_ps((const float *)p + i);
    __m128i v = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    if (dt == DT_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
    return _mm256_cvtph_ps(v);
}


/* ------------------------------------------------------------------ activations (fp32) */
AI __m256 exp8(__m256 x) { /* Cephes expf: about 1 ulp on the clamped range; NaN propagates */
    x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x);
    x = _mm256_max_ps(_mm256_set1_ps(-88.3762626647949f), x);
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x);
    y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

AI __m256 sigmoid8(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

AI __m256 erf8(__m256 x) { /* Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7), as ATen's vectorised erf */
    const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
    const __m256 a = _mm256_xor_ps(x, sign);
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a, one));
    __m256 r = _mm256_set1_ps(1.061405429f);
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-1.453152027f));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421413741f));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284496736f));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254829592f));
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
    const __m256 y = _mm256_fnmadd_ps(_mm256_mul_ps(r, t), e, one);
    return _mm256_xor_ps(y, sign);
}

AI __m256 act8(__m256 g, __m256 u, act_t act) {
    if (act.kind == ACT_SILU) return _mm256_mul_ps(_mm256_mul_ps(g, sigmoid8(g)), u);
    if (act.kind == ACT_GELU) {
        const __m256 half = _mm256_set1_ps(0.5f);
        __m256 c = _mm256_add_ps(_mm256_set1_ps(1.0f), erf8(_mm256_mul_ps(g, _mm256_set1_ps(0.70710678118654752f))));
        return _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(g, half), c), u);
    }
    const __m256 lim = _mm256_set1_ps(act.limit);
    g = _mm256_min_ps(lim, g);
    u = _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), lim), _mm256_min_ps(lim, u));
    __m256 s = sigmoid8(_mm256_mul_ps(_mm256_set1_ps(act.alpha), g));
    return _mm256_mul_ps(_mm256_add_ps(u, _mm256_set1_ps(1.0f)), _mm256_mul_ps(g, s));
}

#if defined(__AVX512F__)
/* the same functions, 16 lanes wide (the same operations lane by lane: equal results) */
#include "act_avx512.h"
#endif

/* Activation of n values: h[i] = act(g[i], u[i]); h may alias g. */
static inline void uk_act(float *h, const float *g, const float *u, long n, act_t act) {
    long i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(h + i, act16(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i), act));
#endif
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(h + i, act8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i), act));
    if (i < n) {
        float gb[8] = {0}, ub[8] = {0}, hb[8];
        memcpy(gb, g + i, (n - i) * 4);
        memcpy(ub, u + i, (n - i) * 4);
        _mm256_storeu_ps(hb, act8(_mm256_loadu_ps(gb), _mm256_loadu_ps(ub), act));
        memcpy(h + i, hb, (n - i) * 4);
    }
}

/* ------------------------------------------------------------------ micro-kernels */
#if defined(__AVX512F__)
/* AVX-512 panel kernel: a 32-token panel is two 16-lane vectors; each weight element is
   broadcast (an embedded-broadcast memory operand) into one fused multiply-add per vector,
   R <= 12 rows x 2 vectors = 24 accumulators.  Per reduction step: 2 panel loads and R
   broadcasts for 2R multiply-adds, so the two FMA ports, not the load ports, set the pace
   (the 16-token, 6-row kernel before it loaded 7 times per 6 multiply-adds).  A panel of
   at most 16 tokens takes one vector (R accumulators).  The rows are given as pointers
   (the gate and up rows of a tile lie in two places), each summed in k order. */
#define UK_PANEL_ROWS 1
#define PANEL_DEF(RR, NV)                                                                                          \
    static __attribute__((noinline)) void panel_##RR##_##NV(const float *const *w, long ks, const float *xp, long K, \
                                                           float *out, const char *const *pf, long pf_bytes) {     \
        enum { R = RR };                                                                                           \
        const float *p[R];                                                                                         \
        __m512 a[R][NV];                                                                                           \
        for (int r = 0; r < R; r++) {                                                                              \
            p[r] = w[r];                                                                                           \
            for (int v = 0; v < NV; v++) a[r][v] = _mm512_setzero_ps();                                            \
        }                                                                                                          \
        for (long k0 = 0; k0 < K; k0 += 16) {                                                                      \
            if (pf) { /* the next tile's weight rows: one line of each per 16 steps */                             \
                const long off = k0 * pf_bytes / K;                                                                \
                for (int r = 0; r < R; r++) _mm_prefetch(pf[r] + off, _MM_HINT_T1);                                \
            }                                                                                                      \
            const long k1 = k0 + 16 < K ? k0 + 16 : K;                                                             \
            for (long k = k0; k < k1; k++) {                                                                       \
                __m512 x[NV];                                                                                      \
                for (int v = 0; v < NV; v++) x[v] = _mm512_loadu_ps(xp + UK_PANEL * k + 16 * v);                   \
                for (int r = 0; r < R; r++) {                                                                      \
                    const __m512 b = _mm512_set1_ps(p[r][k * ks]);                                                 \
                    for (int v = 0; v < NV; v++) a[r][v] = _mm512_fmadd_ps(b, x[v], a[r][v]);                      \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
        for (int r = 0; r < R; r++) { /* lanes past the vectors computed: zero (no garbage, no denormals) */   \
            for (int v = 0; v < NV; v++) _mm512_storeu_ps(out + r * UK_PANEL + 16 * v, a[r][v]);                  \
            for (int v = NV; v < 2; v++) _mm512_storeu_ps(out + r * UK_PANEL + 16 * v, _mm512_setzero_ps());      \
        }                                                                                                          \
    }
#define PANEL_DEF2(RR) PANEL_DEF(RR, 1) PANEL_DEF(RR, 2)
PANEL_DEF2(1) PANEL_DEF2(2) PANEL_DEF2(3) PANEL_DEF2(4) PANEL_DEF2(5) PANEL_DEF2(6)
PANEL_DEF2(7) PANEL_DEF2(8) PANEL_DEF2(9) PANEL_DEF2(10) PANEL_DEF2(11) PANEL_DEF2(12)
typedef void (*panel_fn)(const float *const *w, long ks, const float *xp, long K, float *out, const char *const *pf,
                         long pf_bytes);
static const panel_fn PANELS[2][13] = {
    {0, panel_1_1, panel_2_1, panel_3_1, panel_4_1, panel_5_1, panel_6_1, panel_7_1, panel_8_1, panel_9_1, panel_10_1,
     panel_11_1, panel_12_1},
    {0, panel_1_2, panel_2_2, panel_3_2, panel_4_2, panel_5_2, panel_6_2, panel_7_2, panel_8_2, panel_9_2, panel_10_2,
     panel_11_2, panel_12_2}};

UK_INLINE void uk_panel_rows(int R, const float *const *w, long ks, const float *xp, long K, int n, float *out,
                             const char *const *pf, long pf_bytes) {
    PANELS[n > 16][R](w, ks, xp, K, out, pf, pf_bytes);
}
#undef PANEL_DEF2
#else /* AVX2: 8 lanes, two vectors per 16-token panel */
/* panel: out[r][8i .. 8i+8) = sum_k wp[k][r] * xp[k][8i .. 8i+8) for R <= 6 weight rows packed as
   [K][R] (fp32) and a [K][16] token panel.  The 12 accumulators are named variables (an
   array would be kept in memory by the compiler). */
#define PK_STEP(r)                                                  \
    if (R > r) {                                                    \
        const __m256 b = _mm256_broadcast_ss(wp + r * rs + k * ks);  \
        a##r##0 = _mm256_fmadd_ps(b, x0, a##r##0);                  \
        a##r##1 = _mm256_fmadd_ps(b, x1, a##r##1);                  \
    }
#define PK_OUT(r)                   \
    if (R > r) {                    \
        _mm256_storeu_ps(out + r * UK_PANEL, a##r##0);     \
        _mm256_storeu_ps(out + r * UK_PANEL + 8, a##r##1); \
    }
#define PANEL_DEF(RR)                                                                                      \
    static __attribute__((noinline)) void panel_##RR(const float *wp, long rs, long ks, const float *xp, long K,  \
                                                     float *out, const char *const *pf, long pf_bytes) {      \
        enum { R = RR };                                                                                  \
        const __m256 z = _mm256_setzero_ps();                                                             \
        __m256 a00 = z, a01 = z, a10 = z, a11 = z, a20 = z, a21 = z, a30 = z, a31 = z, a40 = z, a41 = z;   \
        __m256 a50 = z, a51 = z;                                                                          \
        for (long k0 = 0; k0 < K; k0 += 16) {                                                             \
            if (pf) { /* the next tile's weight rows: one line of each per 16 steps */                    \
                const long off = k0 * pf_bytes / K;                                                       \
                for (int r = 0; r < R; r++) _mm_prefetch(pf[r] + off, _MM_HINT_T0);                       \
            }                                                                                             \
            const long k1 = k0 + 16 < K ? k0 + 16 : K;                                                    \
            for (long k = k0; k < k1; k++) {                                                              \
                const __m256 x0 = _mm256_loadu_ps(xp + UK_PANEL * k), x1 = _mm256_loadu_ps(xp + UK_PANEL * k + 8); \
                PK_STEP(0) PK_STEP(1) PK_STEP(2) PK_STEP(3) PK_STEP(4) PK_STEP(5)                         \
            }                                                                                             \
        }                                                                                                 \
        PK_OUT(0) PK_OUT(1) PK_OUT(2) PK_OUT(3) PK_OUT(4) PK_OUT(5)                                       \
    }
typedef void (*panel_fn)(const float *wp, long rs, long ks, const float *xp, long K, float *out, const char *const *pf,
                         long pf_bytes);
PANEL_DEF(1) PANEL_DEF(2) PANEL_DEF(3) PANEL_DEF(4) PANEL_DEF(5) PANEL_DEF(6)
static const panel_fn PANELS[7] = {0, panel_1, panel_2, panel_3, panel_4, panel_5, panel_6};

UK_INLINE void uk_panel(int R, const float *w, long rs, long ks, const float *xp, long K, float *out,
                        const char *const *pf, long pf_bytes) {
    PANELS[R](w, rs, ks, xp, K, out, pf, pf_bytes);
}
#endif


AI float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* bf16 rows are read 16 elements (32 bytes) at a time: the 32-bit lanes hold the pairs
   (w[2i], w[2i+1]); a shift gives the even elements as fp32, a mask the odd ones.  The fp32
   operand is stored to match ("bf16 order": within each full block of 16, the 8 even
   elements then the 8 odd ones); elements past the last full block keep their order. */
AI long uk_dot_order(long i, long K) {
    if (i >= K / 16 * 16) return i;
    const long j = i & 15;
    return (i & ~15L) + ((j & 1) ? 8 + (j >> 1) : (j >> 1));
}

/* dot: res[r*M + m] = sum_k w[r][k] * x[m][k] for R weight rows (dtype dt) and M fp32 rows
   (in bf16 order when dt is bf16).  Each weight element is loaded once, 16 at a time. */
AI void dot_block(const int R, const int M, const void *const *w, const int dt, const float *x, long K, long k,
                  __m256 *acc) {
    const __m256i hi16 = _mm256_set1_epi32((int)0xffff0000u);
    for (int r = 0; r < R; r++) {
        __m256 wa, wb;
        if (dt == DT_F32) {
            wa = _mm256_loadu_ps((const float *)w[r] + k);
            wb = _mm256_loadu_ps((const float *)w[r] + k + 8);
        } else if (dt == DT_BF16) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w[r] + k));
            wa = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            wb = _mm256_castsi256_ps(_mm256_and_si256(v, hi16));
        } else {
            wa = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w[r] + k)));
            wb = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w[r] + k + 8)));
        }
        for (int m = 0; m < M; m++) {
            acc[r * M + m] = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x + m * K + k), acc[r * M + m]);
            acc[r * M + m] = _mm256_fmadd_ps(wb, _mm256_loadu_ps(x + m * K + k + 8), acc[r * M + m]);
        }
    }
}

#ifndef UK_DOT_PF_BYTES
#define UK_DOT_PF_BYTES 1024
#endif
/* dot: res[r*M + m] = sum_k w[r][k] * x[m][k] for R weight rows (dtype dt) and M fp32 rows
   (in bf16 order when dt is bf16).  Each weight element is loaded once, 16 at a time;
   16-bit rows go 32 at a time (a whole cache line of each row per step, so that as many
   lines are in flight as for fp32 rows). */
AI void dot_kernel(const int R, const int M, const void *const *w, const int dt, const float *x, long K, float *res) {
    __m256 acc[12];
    for (int i = 0; i < R * M; i++) acc[i] = _mm256_setzero_ps();
    long k = 0;
    if (dt != DT_F32)
        for (; k + 32 <= K; k += 32) {
            /* a 16-bit row takes half the time per line of an fp32 one: the hardware
               prefetchers lag, so each stream asks UK_DOT_PF_BYTES ahead (past a row's end:
               the stream's next row, contiguous in stream mode) */
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)w[r] + 2 * k + UK_DOT_PF_BYTES, _MM_HINT_T0);
            dot_block(R, M, w, dt, x, K, k, acc);
            dot_block(R, M, w, dt, x, K, k + 16, acc);
        }
    for (; k + 16 <= K; k += 16) dot_block(R, M, w, dt, x, K, k, acc);
    for (; k + 8 <= K; k += 8)
        for (int r = 0; r < R; r++) {
            const __m256 wa = load8(w[r], k, dt);
            for (int m = 0; m < M; m++) acc[r * M + m] = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x + m * K + k), acc[r * M + m]);
        }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) {
            float s = hsum8(acc[r * M + m]);
            for (long kk = k; kk < K; kk++) s += uk_load1(w[r], kk, dt) * x[m * K + kk];
            res[r * M + m] = s;
        }
}

/* Streams per dot pass for M tokens (R*M accumulators <= 12; a lone token gets the most
   streams, to keep the most loads in flight).  Phase 1 counts neurons (2 rows each). */
static const int uk_dot_neurons[UK_DOT_MAX_M + 1] = {0, 4, 3, 2, 1, 1, 1};
static const int uk_dot_rows[UK_DOT_MAX_M + 1] = {0, 8, 6, 4, 3, 2, 2};

typedef void (*dot_fn)(const void *const *w, const float *x, long K, float *res);
#define DOT_DEF(R, M, DT, NAME) \
    static __attribute__((noinline)) void NAME##_##R##_##M(const void *const *w, const float *x, long K, float *res) { \
        dot_kernel(R, M, w, DT, x, K, res); \
    }
#define DOT_ALL(DT, NAME) \
    DOT_DEF(8, 1, DT, NAME) DOT_DEF(6, 2, DT, NAME) DOT_DEF(4, 3, DT, NAME) DOT_DEF(2, 4, DT, NAME) \
    DOT_DEF(3, 4, DT, NAME) DOT_DEF(2, 5, DT, NAME) DOT_DEF(2, 6, DT, NAME) DOT_DEF(1, 1, DT, NAME) \
    DOT_DEF(1, 2, DT, NAME) DOT_DEF(1, 3, DT, NAME) DOT_DEF(1, 4, DT, NAME) DOT_DEF(1, 5, DT, NAME) \
    DOT_DEF(1, 6, DT, NAME)
DOT_ALL(DT_F32, dot_f32)
DOT_ALL(DT_BF16, dot_bf16)
DOT_ALL(DT_F16, dot_f16)
#define DOT_PICK(NAME, R, M)                                                                              \
    switch ((R) * 8 + (M)) {                                                                             \
        case 8 * 8 + 1: return NAME##_8_1;  case 6 * 8 + 2: return NAME##_6_2;  case 4 * 8 + 3: return NAME##_4_3; \
        case 2 * 8 + 4: return NAME##_2_4;  case 3 * 8 + 4: return NAME##_3_4;  case 2 * 8 + 5: return NAME##_2_5; \
        case 2 * 8 + 6: return NAME##_2_6;  case 1 * 8 + 1: return NAME##_1_1;  case 1 * 8 + 2: return NAME##_1_2; \
        case 1 * 8 + 3: return NAME##_1_3;  case 1 * 8 + 4: return NAME##_1_4;  case 1 * 8 + 5: return NAME##_1_5; \
        case 1 * 8 + 6: return NAME##_1_6;  default: return 0;                                           \
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
#define UK_PACK_PANEL_PART 1
/* xp[k][j] = x[tok[j]][k] for j < n, 0 for n <= j < UK_PANEL (a [K][UK_PANEL] panel, fp32) */
AI void uk_pack_panel_part(const void *x, const int dt, long K, const int32_t *tok, int n, float *xp) {
    long k = 0;
    for (; k + 8 <= K; k += 8) {
        for (int j0 = 0; j0 < UK_PANEL; j0 += 8) {
            if (j0 + 8 > n) { /* the last tokens of a partial panel, and its zero padding */
                for (long kk = k; kk < k + 8; kk++)
                    for (int j = j0; j < j0 + 8; j++) xp[kk * UK_PANEL + j] = j < n ? uk_load1(x, (long)tok[j] * K + kk, dt) : 0.0f;
                continue;
            }
            __m256 r0 = load8(x, (long)tok[j0 + 0] * K + k, dt), r1 = load8(x, (long)tok[j0 + 1] * K + k, dt);
            __m256 r2 = load8(x, (long)tok[j0 + 2] * K + k, dt), r3 = load8(x, (long)tok[j0 + 3] * K + k, dt);
            __m256 r4 = load8(x, (long)tok[j0 + 4] * K + k, dt), r5 = load8(x, (long)tok[j0 + 5] * K + k, dt);
            __m256 r6 = load8(x, (long)tok[j0 + 6] * K + k, dt), r7 = load8(x, (long)tok[j0 + 7] * K + k, dt);
            /* 8x8 transpose */
            __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
            __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
            __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
            __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
            __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            float *d = xp + k * UK_PANEL + j0;
            _mm256_storeu_ps(d + 0 * UK_PANEL, _mm256_permute2f128_ps(s0, s4, 0x20));
            _mm256_storeu_ps(d + 1 * UK_PANEL, _mm256_permute2f128_ps(s1, s5, 0x20));
            _mm256_storeu_ps(d + 2 * UK_PANEL, _mm256_permute2f128_ps(s2, s6, 0x20));
            _mm256_storeu_ps(d + 3 * UK_PANEL, _mm256_permute2f128_ps(s3, s7, 0x20));
            _mm256_storeu_ps(d + 4 * UK_PANEL, _mm256_permute2f128_ps(s0, s4, 0x31));
            _mm256_storeu_ps(d + 5 * UK_PANEL, _mm256_permute2f128_ps(s1, s5, 0x31));
            _mm256_storeu_ps(d + 6 * UK_PANEL, _mm256_permute2f128_ps(s2, s6, 0x31));
            _mm256_storeu_ps(d + 7 * UK_PANEL, _mm256_permute2f128_ps(s3, s7, 0x31));
        }
    }
    for (; k < K; k++)
        for (int j = 0; j < UK_PANEL; j++) xp[k * UK_PANEL + j] = j < n ? uk_load1(x, (long)tok[j] * K + k, dt) : 0.0f;
}

AI void uk_pack_panel(const void *x, const int dt, long K, const int32_t *tok, float *xp) {
    uk_pack_panel_part(x, dt, K, tok, UK_PANEL, xp);
}

/* dst[j][k] = x[tok[j]][k] (fp32 rows, in bf16 order when dt is bf16) */
AI void uk_pack_rows(const void *x, const int dt, long K, const int32_t *tok, int m, float *dst) {
    for (int j = 0; j < m; j++) {
        long k = 0;
        const long base = (long)tok[j] * K;
        float *d = dst + j * K;
        if (dt == DT_BF16) {
            for (; k + 16 <= K; k += 16) {
                const __m256 a = load8(x, base + k, dt), b = load8(x, base + k + 8, dt);
                /* even elements, then odd ones */
                const __m256 ev = _mm256_shuffle_ps(a, b, 0x88), od = _mm256_shuffle_ps(a, b, 0xDD);
                _mm256_storeu_ps(d + k, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev), 0xD8)));
                _mm256_storeu_ps(d + k + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(od), 0xD8)));
            }
        }
        for (; k + 8 <= K; k += 8) _mm256_storeu_ps(d + k, load8(x, base + k, dt));
        for (; k < K; k++) d[k] = uk_load1(x, base + k, dt);
    }
}

/* in-place transpose of an 8x8 block held in 8 vectors */
AI void transpose8(__m256 *v) {
    const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
    const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
    const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
    const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    v[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    v[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    v[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    v[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    v[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    v[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    v[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    v[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/* wp[k][r] = w[r][k] as fp32, for R <= UK_ROWS rows of length K (the panel kernel's operand).
   8 columns at a time: rows 0..7 (zero rows past R) transposed into 8-float stores at stride
   R, rows 8..11 into 4-float stores after them, in k order, so that what a store writes past
   its column is written again by the next one.  Writes up to 7 floats past wp[K * R] (the
   caller leaves room). */
AI void uk_pack_w(const void *const *w, const int R, const int dt, long K, float *wp) {
    long k = 0;
    if (R <= 12) {
        const __m256 z = _mm256_setzero_ps();
        for (; k + 8 <= K; k += 8) {
            __m256 a[8], b[8];
            for (int r = 0; r < 8; r++) a[r] = r < R ? load8(w[r], k, dt) : z;
            transpose8(a);
            if (R > 8) {
                for (int r = 0; r < 8; r++) b[r] = 8 + r < R ? load8(w[8 + r], k, dt) : z;
                transpose8(b);
            }
            float *d = wp + k * R;
            for (int q = 0; q < 8; q++) {
                _mm256_storeu_ps(d + q * R, a[q]);
                if (R > 8) _mm_storeu_ps(d + q * R + 8, _mm256_castps256_ps128(b[q]));
            }
        }
    }
    for (; k < K; k++)
        for (int r = 0; r < R; r++) wp[k * R + r] = uk_load1(w[r], k, dt);
}

#undef AI
#undef PK_STEP
#undef PK_STEP1
#undef PK_OUT
#undef PANEL_DEF
#undef DOT_DEF
#undef DOT_ALL
#undef DOT_PICK

#endif
