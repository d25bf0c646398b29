/* moeframe fused_cpu: the interface between the portable driver (fused_cpu.c: sort-and-group,
 * work items, scheduling, phases, epilogues; plain C) and the per-ISA micro-kernels.
 *
 * This header defines what every ISA shares (dtype and activation codes, scalar bf16
 * conversion, uk_load1/uk_store1), then includes the micro-kernel header of the target:
 * ukernel_x86.h (AVX2+FMA+F16C; AVX-512 where __AVX512F__), ukernel_neon.h (aarch64).
 *
 * Every ISA header defines the following (static, usually always inline; `dt` is always a
 * compile-time constant at the call sites, so the compiler specialises each dtype):
 *
 * Constants
 *   UK_PANEL      tokens per panel (the panel kernel's width); a multiple of 8.
 *   UK_ROWS       the most weight rows one panel call takes (R <= UK_ROWS); the driver
 *                 takes weight rows UK_ROWS at a time ("tiles").
 *   UK_PANEL_MIN  (optional, default UK_PANEL) the fewest tokens worth a panel: an item's
 *                 last tokens, when at least this many, form a zero-padded partial panel;
 *                 fewer go through uk_dot.
 *   UK_ITEM       (optional, default 64) tokens per work item (an expert's tokens are cut
 *                 into items of UK_ITEM, the last one up to UK_ITEM + UK_PANEL).
 *   UK_DOT_MAX_M  the most tokens one uk_dot call takes (M <= UK_DOT_MAX_M).
 *   uk_dot_rows[M]     (M = 0..UK_DOT_MAX_M) weight rows per uk_dot call for M tokens: the
 *                      rows x tokens accumulators fit the registers, and a lone token gets
 *                      the most rows (the most loads in flight).
 *   uk_dot_neurons[M]  the same in neurons (a gate row and an up row each) for phase 1.
 *   UK_DOT_ROWS_MAX    an upper bound of uk_dot_rows[] and of 2 * uk_dot_neurons[] (an even
 *                      number: the driver sizes its arrays with it).
 *
 * Scalar conversion
 *   float uk_f16_to_float(uint16_t h); uint16_t uk_float_to_f16(float f)  (IEEE binary16,
 *   round to nearest even).
 *
 * Compute: the panel kernel, in one of two forms
 *   void uk_panel_rows(int R, const float *const *w, long ks, const float *xp, long K, int n,
 *                      float *out, const char *const *pf, long pf_bytes)
 *       (an ISA header that defines it also defines the macro UK_PANEL_ROWS)
 *       out[r * UK_PANEL + j] = sum_k w[r][k * ks] * xp[k * UK_PANEL + j]
 *       for r < R (1 <= R <= UK_ROWS) and j < UK_PANEL; only j < n (1 <= n <= UK_PANEL, the
 *       panel's tokens; the lanes past n of xp are zero) need be right, but every lane must
 *       be written, with finite normal values (zero: the epilogue runs over whole rows).  w[r] are fp32 rows,
 *       either in place (ks = 1) or columns of packed tiles (ks = the tile's row count, from
 *       uk_pack_w).  In phase 1 a call takes R/2 gate rows and their R/2 up rows.
 *   void uk_panel(int R, const float *w, long rs, long ks, const float *xp, long K,
 *                 float *out, const char *const *pf, long pf_bytes)
 *       (the other form: full panels only) the same with row r at w + r * rs; phase 1 then
 *       takes UK_ROWS neurons per tile, their gate rows and their up rows in two calls.
 *   For both: xp is a token panel [K][UK_PANEL] (from uk_pack_panel, or the [I][UK_PANEL]
 *   rows of h); the sum over k is taken in an order fixed by K alone (never by the thread
 *   count); pf, when not NULL, holds R row addresses of the next tile, each pf_bytes long,
 *   to prefetch while computing (a hint).  No alignment is required of any pointer.
 *   void uk_dot(int dt, int R, int M, const void *const *w, const float *x, long K, float *res)
 *       res[r * M + m] = sum_k w[r][k] * x[m * K + k] for R rows w[r] of dtype dt (any R >= 1)
 *       and M <= UK_DOT_MAX_M fp32 token rows; the token rows are in "dot order"
 *       (uk_dot_order) for bf16 weights.  Each weight element is loaded once (memory bound
 *       decode and the tokens beyond the last full panel).  No alignment required.
 *   void uk_act(float *h, const float *g, const float *u, long n, act_t act)
 *       h[i] = act(g[i], u[i]) for i < n (silu(g) * u, gelu(g) * u (erf form), or
 *       swigluoai); h may alias g.  About 1 ulp of libm for exp.
 *
 * Packing (into per-thread scratch, fp32)
 *   void uk_pack_panel(const void *x, int dt, long K, const int32_t *tok, float *xp)
 *       xp[k * UK_PANEL + j] = x[tok[j] * K + k] for j < UK_PANEL, k < K.
 *   void uk_pack_panel_part(const void *x, int dt, long K, const int32_t *tok, int n, float *xp)
 *       (optional, with the macro UK_PACK_PANEL_PART; a portable one is defined here otherwise) the same for j < n, and 0 for
 *       n <= j < UK_PANEL (a partial panel; only called when UK_PANEL_MIN < UK_PANEL).
 *   void uk_pack_rows(const void *x, int dt, long K, const int32_t *tok, int m, float *dst)
 *       dst[j * K + uk_dot_order(k, K) (for bf16 weights; else k)] = x[tok[j] * K + k], j < m.
 *   void uk_pack_w(const void *const *w, int R, int dt, long K, float *wp)
 *       wp[k * R + r] = w[r][k] as fp32, R <= UK_ROWS; may write up to 7 floats past
 *       wp[K * R] (the caller leaves room).
 *   long uk_dot_order(long i, long K)
 *       where element i of a length-K fp32 operand sits in "dot order" (what uk_dot expects
 *       against bf16 weights; the identity where the ISA reads bf16 in order).
 */
#ifndef MOEFRAME_UKERNEL_H
#define MOEFRAME_UKERNEL_H

#include <stdint.h>
#include <string.h>

#define UK_INLINE static inline __attribute__((always_inline))

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { ACT_SILU = 0, ACT_GELU = 1, ACT_SWIGLUOAI = 2 };

typedef struct {
    int kind;
    float alpha, limit;
} act_t;

UK_INLINE float uk_bf16_to_float(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

UK_INLINE uint16_t uk_float_to_bf16(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays a (quiet) NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                              /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* element i of p (dtype dt) as fp32, and v stored as element i of p */
static inline float uk_load1(const void *p, long i, int dt);
static inline void uk_store1(void *p, long i, float v, int dt);

#if defined(__x86_64__) || defined(__i386__)
#include "ukernel_x86.h"
#elif defined(__aarch64__)
#include "ukernel_neon.h"
#else
#error "moeframe fused_cpu: no micro-kernels for this architecture"
#endif

static inline __attribute__((always_inline)) float uk_load1(const void *p, long i, int dt) {
    if (dt == DT_F32) return ((const float *)p)[i];
    const uint16_t h = ((const uint16_t *)p)[i];
    return dt == DT_BF16 ? uk_bf16_to_float(h) : uk_f16_to_float(h);
}

static inline __attribute__((always_inline)) void uk_store1(void *p, long i, float v, int dt) {
    if (dt == DT_F32)
        ((float *)p)[i] = v;
    else
        ((uint16_t *)p)[i] = dt == DT_BF16 ? uk_float_to_bf16(v) : uk_float_to_f16(v);
}

/* ------------------------------------------------------------------ defaults */
#ifdef UK_PANEL_ROWS
/* phase 1 takes UK_ROWS / 2 neurons per tile, gate and up rows in one call */
enum { UK_TILE_NEURONS = UK_ROWS / 2 };
#else
/* phase 1 takes UK_ROWS neurons per tile (2 * UK_ROWS rows) */
enum { UK_TILE_NEURONS = UK_ROWS, UK_PANEL_MIN = UK_PANEL, UK_ITEM = 64 };

/* uk_panel_rows from uk_panel: the rows in runs of at most UK_ROWS at a constant stride
   (the driver passes R/2 gate rows and their up rows, or the rows of a packed tile) */
UK_INLINE void uk_panel_rows(int R, const float *const *w, long ks, const float *xp, long K, int n, float *out,
                             const char *const *pf, long pf_bytes) {
    (void)n;
    for (int r0 = 0; r0 < R;) {
        int r1 = r0 + 1;
        const long rs = R > r0 + 1 ? (long)(w[r0 + 1] - w[r0]) : 1;
        while (r1 < R && r1 - r0 < UK_ROWS && w[r1] - w[r1 - 1] == rs) r1++;
        uk_panel(r1 - r0, w[r0], rs, ks, xp, K, out + (long)r0 * UK_PANEL, pf ? pf + r0 : NULL, pf_bytes);
        r0 = r1;
    }
}

#endif

#ifndef UK_PACK_PANEL_PART
/* portable; only called where UK_PANEL_MIN < UK_PANEL */
UK_INLINE void uk_pack_panel_part(const void *x, int dt, long K, const int32_t *tok, int n, float *xp) {
    for (long k = 0; k < K; k++)
        for (int j = 0; j < UK_PANEL; j++) xp[k * UK_PANEL + j] = j < n ? uk_load1(x, (long)tok[j] * K + k, dt) : 0.0f;
}
#endif

#endif
