/* moeframe fused_cpu: the routed experts of a MoE layer on x86-64 CPUs with AVX2 and FMA
 * (compiled with -mavx512f as well, the prefill panel kernel is 16 lanes wide; see below).
 *
 * One call computes out[t] = sum_k w[t,k] * f_{ids[t,k]}(x[t]) for the local experts:
 *
 *   group    (one thread)  counting sort of the (token, k) pairs by local expert (stable);
 *                          each expert's pairs are cut into work items of 64 tokens (the
 *                          last one up to 80);
 *   phase 1  (all threads) per item: h = act(x W_gate^T + b) * (x W_up^T + b); in prefill the
 *                          threads claim (item, 96 neurons) units in order, so that one slowed
 *                          down by another process leaves work to the others; in decode each
 *                          thread takes half of the rows, as long contiguous runs;
 *   phase 2  (all threads) per item: out[t, rows] += w[t,k] * (h W2^T + b2)[rows]; each thread
 *                          owns a fixed range of hidden rows, so every output element is
 *                          summed by one thread, in expert order: the result does not depend
 *                          on the number of threads.
 * A call holds at most `hbuf_slots` rows of h; larger calls run in groups of items, with
 * one barrier after phase 1 and one after phase 2 of each group.
 *
 * Two ways through an item, chosen by its token count m:
 *   tile mode   (m >= 7, compute bound, prefill): weight rows are taken 6 at a time (a tile,
 *               read from memory once, the next tile prefetched meanwhile); the item's full
 *               16-token panels (tokens packed [K][16], fp32) go through the panel kernel:
 *               each weight element is broadcast into 16 fused multiply-adds, 6 rows x 16
 *               tokens in 12 accumulators; the m % 16 tail tokens go through the dot kernel
 *               on the same rows while they are in cache (no padding);
 *   stream mode (m <= 6, memory bound, decode): the dot kernel over a few long contiguous
 *               runs of rows at once, each weight element loaded once and multiplied into
 *               all m tokens.
 * Weights stay in the canonical layout (w13 [E, 2I, H], w2 [E, H, I]) and dtype: fp32 rows
 * are read in place, bf16/fp16 rows are widened to fp32 in registers (dot) or into a small
 * per-thread tile (panel).  Everything is accumulated in fp32.  Every buffer is allocated by
 * the caller (with torch, so that the profiler sees it).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "fused_cpu_abi.h"

#define AI static inline __attribute__((always_inline))

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { ACT_SILU = 0, ACT_GELU = 1, ACT_SWIGLUOAI = 2 };
/* Work items: an expert's pairs are cut into items of ITEM tokens, the last one taking up
   to ITEM_MAX (so that no item is left with a handful of tokens). */
enum { PANEL = 16, ITEM = 64, ITEM_MAX = ITEM + PANEL };

/* ------------------------------------------------------------------ element conversion */
AI __m256 load8(const void *p, long i, const int dt) {
    if (dt == DT_F32) return _mm256_loadu_ps((const float *)p + i);
    __m128i v = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    if (dt == DT_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
    return _mm256_cvtph_ps(v);
}

AI float load1(const void *p, long i, const int dt) {
    if (dt == DT_F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    if (dt == DT_BF16) {
        uint32_t u = (uint32_t)h << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return _cvtsh_ss(h);
}

AI void store1(void *p, long i, float v, const int dt) {
    if (dt == DT_F32) {
        ((float *)p)[i] = v;
    } else if (dt == DT_BF16) {
        uint32_t u;
        memcpy(&u, &v, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) { /* NaN stays a (quiet) NaN */
            ((uint16_t *)p)[i] = (uint16_t)((u >> 16) | 0x40u);
        } else {
            u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
            ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
        }
    } else {
        ((uint16_t *)p)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
    }
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

typedef struct {
    int kind;
    float alpha, limit;
} act_t;

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

/* Activation of n values: h[i] = act(g[i], u[i]); h may alias g. */
static void act_rows(float *h, const float *g, const float *u, long n, act_t act) {
    long i = 0;
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
/* AVX-512 panel kernel: the 16 tokens of a panel are one 16-lane vector; each weight element
   is broadcast (an embedded-broadcast memory operand) into one fused multiply-add per row.
   The reduction dimension is taken two steps at a time into two sets of accumulators
   (R <= 6 rows: up to 12 independent chains, enough to hide the FMA latency), added at the
   end: the same fixed order for any number of threads. */
#define PK_STEP(r)                                                                   \
    if (R > r) {                                                                     \
        a##r##0 = _mm512_fmadd_ps(_mm512_set1_ps(wp[r * rs + k * ks]), x0, a##r##0);       \
        a##r##1 = _mm512_fmadd_ps(_mm512_set1_ps(wp[r * rs + (k + 1) * ks]), x1, a##r##1); \
    }
#define PK_STEP1(r)                                                                  \
    if (R > r) a##r##0 = _mm512_fmadd_ps(_mm512_set1_ps(wp[r * rs + k * ks]), x0, a##r##0);
#define PK_OUT(r)                                                      \
    if (R > r) {                                                       \
        const __m512 s = _mm512_add_ps(a##r##0, a##r##1);              \
        out[2 * r] = _mm512_castps512_ps256(s);                        \
        out[2 * r + 1] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)); \
    }
#define PANEL_DEF(RR)                                                                                          \
    static __attribute__((noinline)) void panel_##RR(const float *wp, long rs, long ks, const float *xp, long K, \
                                                     __m256 *out, const char *const *pf, long pf_bytes) {     \
        enum { R = RR };                                                                                      \
        const __m512 z = _mm512_setzero_ps();                                                                 \
        __m512 a00 = z, a01 = z, a10 = z, a11 = z, a20 = z, a21 = z, a30 = z, a31 = z, a40 = z, a41 = z;       \
        __m512 a50 = z, a51 = z;                                                                              \
        long k = 0;                                                                                           \
        for (long k0 = 0; k0 < K; k0 += 16) {                                                                 \
            if (pf) { /* the next tile's weight rows: one line of each per 16 steps */                        \
                const long off = k0 * pf_bytes / K;                                                           \
                for (int r = 0; r < R; r++) _mm_prefetch(pf[r] + off, _MM_HINT_T0);                           \
            }                                                                                                 \
            const long k1 = k0 + 16 < K ? k0 + 16 : K;                                                        \
            for (k = k0; k + 2 <= k1; k += 2) {                                                               \
                const __m512 x0 = _mm512_loadu_ps(xp + PANEL * k), x1 = _mm512_loadu_ps(xp + PANEL * (k + 1)); \
                PK_STEP(0) PK_STEP(1) PK_STEP(2) PK_STEP(3) PK_STEP(4) PK_STEP(5)                             \
            }                                                                                                 \
            for (; k < k1; k++) {                                                                             \
                const __m512 x0 = _mm512_loadu_ps(xp + PANEL * k);                                            \
                PK_STEP1(0) PK_STEP1(1) PK_STEP1(2) PK_STEP1(3) PK_STEP1(4) PK_STEP1(5)                       \
            }                                                                                                 \
        }                                                                                                     \
        PK_OUT(0) PK_OUT(1) PK_OUT(2) PK_OUT(3) PK_OUT(4) PK_OUT(5)                                           \
    }
#else /* AVX2: 8 lanes, two vectors per 16-token panel */
/* panel: out[2r + i] = sum_k wp[k][r] * xp[k][8i .. 8i+8) for R <= 6 weight rows packed as
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
        out[2 * r] = a##r##0;       \
        out[2 * r + 1] = a##r##1;   \
    }
#define PANEL_DEF(RR)                                                                                      \
    static __attribute__((noinline)) void panel_##RR(const float *wp, long rs, long ks, const float *xp, long K,  \
                                                     __m256 *out, const char *const *pf, long pf_bytes) {      \
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
                const __m256 x0 = _mm256_loadu_ps(xp + PANEL * k), x1 = _mm256_loadu_ps(xp + PANEL * k + 8); \
                PK_STEP(0) PK_STEP(1) PK_STEP(2) PK_STEP(3) PK_STEP(4) PK_STEP(5)                         \
            }                                                                                             \
        }                                                                                                 \
        PK_OUT(0) PK_OUT(1) PK_OUT(2) PK_OUT(3) PK_OUT(4) PK_OUT(5)                                       \
    }
#endif
typedef void (*panel_fn)(const float *wp, long rs, long ks, const float *xp, long K, __m256 *out, const char *const *pf,
                         long pf_bytes);
PANEL_DEF(1) PANEL_DEF(2) PANEL_DEF(3) PANEL_DEF(4) PANEL_DEF(5) PANEL_DEF(6)
static const panel_fn PANELS[7] = {0, panel_1, panel_2, panel_3, panel_4, panel_5, panel_6};


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
AI long perm16(long i, long K) {
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
            for (long kk = k; kk < K; kk++) s += load1(w[r], kk, dt) * x[m * K + kk];
            res[r * M + m] = s;
        }
}

/* Streams per dot pass for M tokens (R*M accumulators <= 12; a lone token gets the most
   streams, to keep the most loads in flight).  Phase 1 counts neurons (2 rows each). */
static const int DOT_NEURONS[7] = {0, 4, 3, 2, 1, 1, 1};
static const int DOT_ROWS[7] = {0, 8, 6, 4, 3, 2, 2};

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
static void dot_any(int dt, int R, int M, const void *const *w, const float *x, long K, float *res) {
    const dot_fn f = dot_pick(dt, R, M);
    if (f) {
        f(w, x, K, res);
        return;
    }
    const dot_fn one = dot_pick(dt, 1, M);
    for (int r = 0; r < R; r++) one(w + r, x, K, res + r * M);
}

/* ------------------------------------------------------------------ packing */
/* in-place transpose of an 8x8 block held in 8 vectors */
AI void transpose8(__m256 *v) {
    __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
    __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
    __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
    __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    v[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    v[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    v[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    v[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    v[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    v[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    v[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    v[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}


/* xp[k][j] = x[tok[j]][k] for j < 16 (a [K][16] panel, fp32) */
AI void pack_panel(const void *x, const int dt, long K, const int32_t *tok, float *xp) {
    long k = 0;
    for (; k + 8 <= K; k += 8) {
        for (int j0 = 0; j0 < PANEL; j0 += 8) {
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
            float *d = xp + k * PANEL + j0;
            _mm256_storeu_ps(d + 0 * PANEL, _mm256_permute2f128_ps(s0, s4, 0x20));
            _mm256_storeu_ps(d + 1 * PANEL, _mm256_permute2f128_ps(s1, s5, 0x20));
            _mm256_storeu_ps(d + 2 * PANEL, _mm256_permute2f128_ps(s2, s6, 0x20));
            _mm256_storeu_ps(d + 3 * PANEL, _mm256_permute2f128_ps(s3, s7, 0x20));
            _mm256_storeu_ps(d + 4 * PANEL, _mm256_permute2f128_ps(s0, s4, 0x31));
            _mm256_storeu_ps(d + 5 * PANEL, _mm256_permute2f128_ps(s1, s5, 0x31));
            _mm256_storeu_ps(d + 6 * PANEL, _mm256_permute2f128_ps(s2, s6, 0x31));
            _mm256_storeu_ps(d + 7 * PANEL, _mm256_permute2f128_ps(s3, s7, 0x31));
        }
    }
    for (; k < K; k++)
        for (int j = 0; j < PANEL; j++) xp[k * PANEL + j] = load1(x, (long)tok[j] * K + k, dt);
}

/* dst[j][k] = x[tok[j]][k] (fp32 rows, in bf16 order when dt is bf16) */
AI void pack_rows(const void *x, const int dt, long K, const int32_t *tok, int m, float *dst) {
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
        for (; k < K; k++) d[k] = load1(x, base + k, dt);
    }
}

/* wp[k][r] = w[r][k] as fp32, for R <= 6 rows of length K (the panel kernel's operand).
   Writes up to 2 floats past wp[K * R] (the caller leaves room). */
AI void pack_w(const void *const *w, const int R, const int dt, long K, float *wp) {
    long k = 0;
    if (R == 6) {
        const __m256 z = _mm256_setzero_ps();
        for (; k + 8 <= K; k += 8) {
            const __m256 r0 = load8(w[0], k, dt), r1 = load8(w[1], k, dt), r2 = load8(w[2], k, dt);
            const __m256 r3 = load8(w[3], k, dt), r4 = load8(w[4], k, dt), r5 = load8(w[5], k, dt);
            /* 8x8 transpose of rows r0..r5 and two zero rows; column q = (w0..w5)[k+q], 0, 0 */
            __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
            __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
            __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
            __m256 t6 = _mm256_unpacklo_ps(z, z), t7 = t6;
            __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            float *d = wp + k * 6;
            _mm256_storeu_ps(d + 0 * 6, _mm256_permute2f128_ps(s0, s4, 0x20));
            _mm256_storeu_ps(d + 1 * 6, _mm256_permute2f128_ps(s1, s5, 0x20));
            _mm256_storeu_ps(d + 2 * 6, _mm256_permute2f128_ps(s2, s6, 0x20));
            _mm256_storeu_ps(d + 3 * 6, _mm256_permute2f128_ps(s3, s7, 0x20));
            _mm256_storeu_ps(d + 4 * 6, _mm256_permute2f128_ps(s0, s4, 0x31));
            _mm256_storeu_ps(d + 5 * 6, _mm256_permute2f128_ps(s1, s5, 0x31));
            _mm256_storeu_ps(d + 6 * 6, _mm256_permute2f128_ps(s2, s6, 0x31));
            _mm256_storeu_ps(d + 7 * 6, _mm256_permute2f128_ps(s3, s7, 0x31));
        }
    }
    for (; k < K; k++)
        for (int r = 0; r < R; r++) wp[k * R + r] = load1(w[r], k, dt);
}

/* ------------------------------------------------------------------ one call */
typedef struct {
    int32_t expert, start, m;
} item_t;

typedef struct {
    const void *x;
    const int32_t *pairs; /* sorted pair ids p = t * K + k */
    const float *tw;      /* [T * topk] routing weights */
    const void *w13, *w2, *b13, *b2;
    long H, I, topk;
    act_t act;
    float *acc; /* [T][H] fp32 */
    float *hbuf;
} ctx_t;

/* How an item is computed.  Tile mode (m >= TILE_MIN tokens): for each tile of weight rows
   (read from memory once), the full 16-token panels go through the panel kernel and the
   m % 16 tail tokens through the dot kernel, in chunks of at most 6, while the tile is
   still in cache.  Stream mode (fewer tokens, decode): the dot kernel over long contiguous
   runs of rows. */
enum { TILE_MIN = 7, TAIL_CHUNK = 6 };
/* neurons of a phase-1 work unit in prefill: a multiple of 16 (the bf16 order's blocks) and of 6 (the tiles) */
enum { UNIT = 96 };

/* Layout of an item's rows of h: the full panels ([I][16] each), then the tail tokens' rows
   ([I] each, in bf16 order for bf16 weights). */
AI int item_panels(int m) { return m >= TILE_MIN ? m / PANEL : 0; }
AI long item_slots(int m) { return m; }

/* Phase 1 of one item for neurons [n0, n1): h = act(x W_gate^T + b) * (x W_up^T + b). */
/* The item's tokens, as fp32, into this thread's scratch: full panels [H][16], then the
   tail tokens' rows. */
AI void pack_item(const ctx_t *c, const int dt, const item_t *it, float *scr) {
    const long H = c->H;
    const int m = it->m, npan = item_panels(m), tail = m - npan * PANEL;
    int32_t tok[ITEM_MAX];
    for (int j = 0; j < m; j++) tok[j] = c->pairs[it->start + j] / (int32_t)c->topk;
    for (int p = 0; p < npan; p++) pack_panel(c->x, dt, H, tok + p * PANEL, scr + (long)p * H * PANEL);
    if (tail) pack_rows(c->x, dt, H, tok + npan * PANEL, tail, scr + (long)npan * PANEL * H);
}

/* Phase 1 of one item (its tokens packed in scr) for neurons [n0, n1). */
AI void phase1(const ctx_t *c, const int dt, const item_t *it, float *h, long n0, long n1, const float *scr,
               float *wsc, float *usc) {
    const long H = c->H, I = c->I;
    const int m = it->m, npan = item_panels(m), tail = m - npan * PANEL;
    const long esz = dt == DT_F32 ? 4 : 2;
    const char *w13 = (const char *)c->w13 + (long)it->expert * 2 * I * H * esz;
    const void *b13 = c->b13 ? (const char *)c->b13 + (long)it->expert * 2 * I * esz : NULL;
    const float *xr = scr + (long)npan * PANEL * H; /* the tail tokens' rows */
    float *hr = h + (long)npan * PANEL * I;
    if (m >= TILE_MIN) {
        /* tiles of 6 neurons: their 6 gate rows, then their 6 up rows */
        for (long n = n0; n < n1; n += 6) {
            const int nn = (int)(n1 - n < 6 ? n1 - n : 6);
            const char *gate = w13 + n * H * esz, *up = w13 + (I + n) * H * esz;
            const int more = n + 12 <= n1;
            const char *next[6], *next_up[6];
            for (int j = 0; more && j < 6; j++) {
                next[j] = gate + (6 + j) * H * esz;
                next_up[j] = up + (6 + j) * H * esz;
            }
            if (npan) {
                const float *wg, *wu;
                long rs, ks;
                if (dt == DT_F32) { /* broadcast straight from the rows */
                    wg = (const float *)gate, wu = (const float *)up, rs = H, ks = 1;
                } else { /* widened to fp32, packed [K][nn] */
                    const void *src[6];
                    for (int j = 0; j < nn; j++) src[j] = gate + j * H * esz;
                    pack_w(src, nn, dt, H, wsc);
                    for (int j = 0; j < nn; j++) src[j] = up + j * H * esz;
                    pack_w(src, nn, dt, H, wsc + 6 * H + 8);
                    wg = wsc, wu = wsc + 6 * H + 8, rs = 1, ks = nn;
                }
                for (int p = 0; p < npan; p++) {
                    __m256 ga[12], ua[12];
                    const float *xp = scr + (long)p * H * PANEL;
                    /* while the first panel computes, prefetch the next tile's rows */
                    PANELS[nn](wg, rs, ks, xp, H, ga, p == 0 && more ? next : NULL, H * esz);
                    PANELS[nn](wu, rs, ks, xp, H, ua, p == 0 && more ? next_up : NULL, H * esz);
                    for (int j = 0; j < nn; j++) {
                        __m256 g0 = ga[2 * j], g1 = ga[2 * j + 1], u0 = ua[2 * j], u1 = ua[2 * j + 1];
                        if (b13) {
                            const __m256 bg = _mm256_set1_ps(load1(b13, n + j, dt)), bu = _mm256_set1_ps(load1(b13, I + n + j, dt));
                            g0 = _mm256_add_ps(g0, bg); g1 = _mm256_add_ps(g1, bg);
                            u0 = _mm256_add_ps(u0, bu); u1 = _mm256_add_ps(u1, bu);
                        }
                        float *hp = h + (long)p * I * PANEL + (n + j) * PANEL;
                        _mm256_storeu_ps(hp, act8(g0, u0, c->act));
                        _mm256_storeu_ps(hp + 8, act8(g1, u1, c->act));
                    }
                }
            }
            /* the tail tokens against the same 12 rows, still in cache */
            for (int t0 = 0; t0 < tail; t0 += TAIL_CHUNK) {
                const int mm = tail - t0 < TAIL_CHUNK ? tail - t0 : TAIL_CHUNK;
                const int rows = DOT_ROWS[mm];
                const void *src[12];
                for (int j = 0; j < nn; j++) {
                    src[j] = gate + j * H * esz;
                    src[nn + j] = up + j * H * esz;
                }
                float res[12 * TAIL_CHUNK];
                for (int r = 0; r < 2 * nn; r += rows)
                    dot_any(dt, 2 * nn - r < rows ? 2 * nn - r : rows, mm, src + r, xr + (long)t0 * H, H, res + r * mm);
                for (int j = 0; j < nn; j++) {
                    const long pn = dt == DT_BF16 ? perm16(n + j, I) : n + j;
                    const float bg = b13 ? load1(b13, n + j, dt) : 0.0f, bu = b13 ? load1(b13, I + n + j, dt) : 0.0f;
                    for (int t = 0; t < mm; t++) {
                        hr[(long)(t0 + t) * I + pn] = res[j * mm + t] + bg;
                        usc[(long)(t0 + t) * I + pn] = res[(nn + j) * mm + t] + bu;
                    }
                }
            }
        }
    } else {
        /* stream mode: nd streams, each a contiguous run of `chunk` neurons (gate rows and
           up rows); long contiguous streams keep the hardware prefetchers busy */
        const int nd = DOT_NEURONS[m];
        const long len = n1 - n0, chunk = (len + nd - 1) / nd;
        for (long q = 0; q < chunk; q++) {
            const void *src[2 * 4];
            long nid[4];
            int nn = 0;
            for (int s = 0; s < nd; s++)
                if (s * chunk + q < len) nid[nn++] = n0 + s * chunk + q;
            for (int j = 0; j < nn; j++) {
                src[j] = w13 + nid[j] * H * esz;
                src[nn + j] = w13 + (I + nid[j]) * H * esz;
            }
            float res[12];
            dot_any(dt, 2 * nn, m, src, xr, H, res);
            for (int j = 0; j < nn; j++) {
                const long n = nid[j], pn = dt == DT_BF16 ? perm16(n, I) : n;
                const float bg = b13 ? load1(b13, n, dt) : 0.0f, bu = b13 ? load1(b13, I + n, dt) : 0.0f;
                for (int t = 0; t < m; t++) {
                    hr[(long)t * I + pn] = res[j * m + t] + bg;
                    usc[(long)t * I + pn] = res[(nn + j) * m + t] + bu;
                }
            }
        }
    }
    for (int t = 0; t < tail; t++) {
        float *ht = hr + (long)t * I;
        act_rows(ht + n0, ht + n0, usc + (long)t * I + n0, n1 - n0, c->act);
    }
}

/* Phase 2 of one item for hidden rows [r0, r1): acc[t][rows] += w * (h W2^T + b2). */
AI void phase2(const ctx_t *c, const int dt, const item_t *it, const float *h, long r0, long r1, float *wsc,
               float *ybuf) {
    const long H = c->H, I = c->I;
    const int m = it->m, npan = item_panels(m), tail = m - npan * PANEL;
    const long esz = dt == DT_F32 ? 4 : 2;
    const char *w2 = (const char *)c->w2 + (long)it->expert * H * I * esz;
    const void *b2 = c->b2 ? (const char *)c->b2 + (long)it->expert * H * esz : NULL;
    const float *hr = h + (long)npan * PANEL * I;
    int32_t tok[ITEM_MAX];
    float tw[ITEM_MAX];
    for (int j = 0; j < m; j++) {
        const int32_t p = c->pairs[it->start + j];
        tok[j] = p / (int32_t)c->topk;
        tw[j] = c->tw[p];
    }
    const float *ttw = tw + npan * PANEL;
    const long ld = r1 - r0 + 8; /* ybuf: this thread's results of the item, [m][ld] */
    if (m >= TILE_MIN) {
        for (long r = r0; r < r1; r += 6) {
            const int nr = (int)(r1 - r < 6 ? r1 - r : 6);
            const char *rows = w2 + r * I * esz;
            const char *next[6];
            const int more = r + 6 + 6 <= r1;
            for (int j = 0; more && j < 6; j++) next[j] = w2 + (r + 6 + j) * I * esz;
            if (npan) {
                const float *wr;
                long rs, ks;
                if (dt == DT_F32) {
                    wr = (const float *)rows, rs = I, ks = 1;
                } else {
                    const void *src[6];
                    for (int j = 0; j < nr; j++) src[j] = rows + j * I * esz;
                    pack_w(src, nr, dt, I, wsc);
                    wr = wsc, rs = 1, ks = nr;
                }
                for (int p = 0; p < npan; p++) {
                    __m256 acc[12];
                    PANELS[nr](wr, rs, ks, h + (long)p * I * PANEL, I, acc, p == 0 && more ? next : NULL, I * esz);
                    const __m256 w0 = _mm256_loadu_ps(tw + p * PANEL), w1 = _mm256_loadu_ps(tw + p * PANEL + 8);
                    __m256 y0[8], y1[8];
                    for (int j = 0; j < 6; j++) {
                        const __m256 b = _mm256_set1_ps(b2 && j < nr ? load1(b2, r + j, dt) : 0.0f);
                        y0[j] = j < nr ? _mm256_mul_ps(_mm256_add_ps(acc[2 * j], b), w0) : _mm256_setzero_ps();
                        y1[j] = j < nr ? _mm256_mul_ps(_mm256_add_ps(acc[2 * j + 1], b), w1) : _mm256_setzero_ps();
                    }
                    y0[6] = y0[7] = y1[6] = y1[7] = _mm256_setzero_ps();
                    /* rows x tokens -> tokens x rows, then one masked add of the nr values per token */
                    transpose8(y0);
                    transpose8(y1);
                    for (int q = 0; q < PANEL; q++)
                        _mm256_storeu_ps(ybuf + (long)(p * PANEL + q) * ld + (r - r0), q < 8 ? y0[q] : y1[q - 8]);
                }
            }
            for (int t0 = 0; t0 < tail; t0 += TAIL_CHUNK) {
                const int mm = tail - t0 < TAIL_CHUNK ? tail - t0 : TAIL_CHUNK;
                const int per = DOT_ROWS[mm];
                const void *src[6];
                for (int j = 0; j < nr; j++) src[j] = rows + j * I * esz;
                float res[6 * TAIL_CHUNK];
                for (int j = 0; j < nr; j += per)
                    dot_any(dt, nr - j < per ? nr - j : per, mm, src + j, hr + (long)t0 * I, I, res + j * mm);
                for (int j = 0; j < nr; j++) {
                    const float b = b2 ? load1(b2, r + j, dt) : 0.0f;
                    for (int t = 0; t < mm; t++)
                        ybuf[(long)(npan * PANEL + t0 + t) * ld + (r - r0) + j] = ttw[t0 + t] * (res[j * mm + t] + b);
                }
            }
        }
        /* each token's row of results goes into the output once, contiguously */
        for (int t = 0; t < m; t++) {
            float *o = c->acc + (long)tok[t] * H + r0;
            const float *y = ybuf + (long)t * ld;
            long j = 0;
            for (; j + 8 <= r1 - r0; j += 8) _mm256_storeu_ps(o + j, _mm256_add_ps(_mm256_loadu_ps(o + j), _mm256_loadu_ps(y + j)));
            for (; j < r1 - r0; j++) o[j] += y[j];
        }
        return;
    }
    const int nd = DOT_ROWS[m];
    const long len = r1 - r0, chunk = (len + nd - 1) / nd;
    for (long q = 0; q < chunk; q++) {
        const void *src[8];
        long rid[8];
        int nr = 0;
        for (int s = 0; s < nd; s++)
            if (s * chunk + q < len) rid[nr++] = r0 + s * chunk + q;
        for (int j = 0; j < nr; j++) src[j] = w2 + rid[j] * I * esz;
        float res[12];
        dot_any(dt, nr, m, src, hr, I, res);
        for (int j = 0; j < nr; j++) {
            const float b = b2 ? load1(b2, rid[j], dt) : 0.0f;
            for (int t = 0; t < m; t++) c->acc[(long)tok[t] * H + rid[j]] += tw[t] * (res[j * m + t] + b);
        }
    }
}

static void split(long n, int parts, int idx, long align, long *a, long *b) {
    const long units = (n + align - 1) / align;
    long ua = units * idx / parts, ub = units * (idx + 1) / parts;
    *a = ua * align < n ? ua * align : n;
    *b = ub * align < n ? ub * align : n;
}

AI int run(const int dt, const void *x, long T, long H, const int64_t *ids, const float *tw, long topk,
           const int32_t *expert_map, long num_experts, const void *w13, const void *w2, const void *b13,
           const void *b2, long local_experts, long I, int act_kind, float alpha, float limit, void *out, float *acc,
           int32_t *ints, float *hbuf, long hbuf_slots, float *scratch, long scratch_floats, int nthreads) {
    const long P = T * topk;
    int32_t *counts = ints, *pairs = ints + local_experts + 1;
    item_t *items = (item_t *)(pairs + P);
    /* group: counting sort of the pairs by local expert (stable) */
    memset(counts, 0, sizeof(int32_t) * (local_experts + 1));
    for (long p = 0; p < P; p++) {
        const int64_t e = ids[p];
        if (e < 0 || e >= num_experts) return -1;
        const long l = expert_map ? expert_map[e] : e;
        if (l >= local_experts) return -2;
        if (l >= 0) counts[l + 1]++;
    }
    for (long e = 0; e < local_experts; e++) counts[e + 1] += counts[e];
    long nitems = 0;
    for (long e = 0; e < local_experts; e++)
        for (long s = counts[e]; s < counts[e + 1];) {
            const long left = counts[e + 1] - s, m = left <= ITEM_MAX ? left : ITEM;
            items[nitems].expert = (int32_t)e;
            items[nitems].start = (int32_t)s;
            items[nitems].m = (int32_t)m;
            nitems++;
            s += m;
        }
    for (long p = 0; p < P; p++) {
        const int64_t e = ids[p];
        const long l = expert_map ? expert_map[e] : e;
        if (l >= 0) pairs[counts[l]++] = (int32_t)p;
    }
    const ctx_t c = {x, pairs, tw, w13, w2, b13, b2, H, I, topk, {act_kind, alpha, limit}, acc, hbuf};
    const long wsc_floats = 12 * (H > I ? H : I) + 32;
#pragma omp parallel num_threads(nthreads)
    {
        const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
        float *scr = scratch + (long)tid * scratch_floats;
        /* the layout moe_scratch_floats sized (decode calls: packed tokens and up values only) */
        float *wsc = T < TILE_MIN ? NULL : scr + (long)ITEM_MAX * H;
        float *usc = T < TILE_MIN ? scr + (long)TILE_MIN * H : wsc + wsc_floats;
        float *ybuf = T < TILE_MIN ? NULL : usc + (long)PANEL * I;
        long n0, n1, r0, r1;
        split(I, nth, tid, 16, &n0, &n1);
        split(H, nth, tid, 8, &r0, &r1);
        for (long t = 0; t < T; t++) memset(acc + t * H + r0, 0, sizeof(float) * (r1 - r0));
        long g0 = 0;
        while (g0 < nitems) {
            long g1 = g0, used = 0;
            while (g1 < nitems && used + item_slots(items[g1].m) <= hbuf_slots) used += item_slots(items[g1++].m);
            if (g1 == g0) g1++; /* the caller sizes hbuf for at least one item */
            long slot[g1 - g0];
            for (long i = g0, o = 0; i < g1; o += item_slots(items[i].m), i++) slot[i - g0] = o;
            long off = 0;
            if (T < TILE_MIN) { /* decode: each thread its half of the rows, as long runs */
                for (long i = g0; i < g1; i++) {
                    pack_item(&c, dt, &items[i], scr);
                    phase1(&c, dt, &items[i], hbuf + off * I, n0, n1, scr, wsc, usc);
                    off += item_slots(items[i].m);
                }
#pragma omp barrier
            } else {
                /* units of (item, UNIT neurons) claimed in order: a thread that falls behind
                   leaves units to the other (h is written once per element either way) */
                long packed = -1;
                const long per = (I + UNIT - 1) / UNIT;
#pragma omp for schedule(dynamic, 1)
                for (long u = 0; u < (g1 - g0) * per; u++) {
                    const long i = g0 + u / per, q = u % per;
                    if (i != packed) {
                        pack_item(&c, dt, &items[i], scr);
                        packed = i;
                    }
                    const long a = q * UNIT, b = a + UNIT < I ? a + UNIT : I;
                    phase1(&c, dt, &items[i], hbuf + slot[i - g0] * I, a, b, scr, wsc, usc);
                }
            }
            off = 0;
            for (long i = g0; i < g1; i++) {
                phase2(&c, dt, &items[i], hbuf + off * I, r0, r1, wsc, ybuf);
                off += item_slots(items[i].m);
            }
            g0 = g1;
            if (g0 < nitems) {
#pragma omp barrier
            }
        }
        if (dt != DT_F32)
            for (long t = 0; t < T; t++)
                for (long r = r0; r < r1; r++) store1(out, t * H + r, acc[t * H + r], dt);
    }
    return 0;
}

/* Returns 0, or -1 for an expert id outside [0, num_experts), -2 for an expert map entry
   outside [-1, local_experts). */
int moe_forward(int dtype, const void *x, long T, long H, const int64_t *ids, const float *tw, long topk,
                const int32_t *expert_map, long num_experts, const void *w13, const void *w2, const void *b13,
                const void *b2, long local_experts, long I, int act_kind, float alpha, float limit, void *out,
                float *acc, int32_t *ints, float *hbuf, long hbuf_slots, float *scratch, long scratch_floats,
                int nthreads) {
    if (dtype == DT_F32)
        return run(DT_F32, x, T, H, ids, tw, topk, expert_map, num_experts, w13, w2, b13, b2, local_experts, I,
                   act_kind, alpha, limit, out, acc, ints, hbuf, hbuf_slots, scratch, scratch_floats, nthreads);
    if (dtype == DT_BF16)
        return run(DT_BF16, x, T, H, ids, tw, topk, expert_map, num_experts, w13, w2, b13, b2, local_experts, I,
                   act_kind, alpha, limit, out, acc, ints, hbuf, hbuf_slots, scratch, scratch_floats, nthreads);
    return run(DT_F16, x, T, H, ids, tw, topk, expert_map, num_experts, w13, w2, b13, b2, local_experts, I,
               act_kind, alpha, limit, out, acc, ints, hbuf, hbuf_slots, scratch, scratch_floats, nthreads);
}

int moe_abi_version(void) { return MOE_ABI_VERSION; }

/* Sizes the caller allocates. */
/* int32 elements of the `ints` buffer for a call with `pairs` (token, k) pairs */
long moe_ints_needed(long pairs, long local_experts) {
    const long items = local_experts + pairs / ITEM + 1;
    return local_experts + 1 + pairs + items * (long)(sizeof(item_t) / sizeof(int32_t));
}
/* hbuf slots of the largest item */
long moe_item_max_slots(void) { return ITEM_MAX; }
/* floats of scratch per thread for a call of T tokens: calls of fewer than TILE_MIN tokens
   (decode) only take stream mode, which needs much less (and small allocations are served
   without fresh pages, which matters at a millisecond per call) */
long moe_scratch_floats(long H, long I, long T) {
    const long n = T < TILE_MIN ? (long)TILE_MIN * H + (long)PANEL * I + 64
                                : (long)ITEM_MAX * H + 12 * (H > I ? H : I) + 32 + (long)PANEL * I + (long)ITEM_MAX * (H + 8);
    return (n + 15) / 16 * 16;
}
