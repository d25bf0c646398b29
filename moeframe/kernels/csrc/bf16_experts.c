/* moeframe fused_cpu: bf16 experts with many tokens, on AMX-BF16 tiles or AVX512-BF16 dot
 * products, over weights repacked once into the VNNI layout of AMX B tiles (see
 * bf16_experts.h for the layout and the entry points).
 *
 * One call takes groups of rows (an expert and its tokens, in expert order):
 *
 *   gather   (all threads) each group's tokens copied into a bf16 buffer, Hp wide, its row
 *                          count rounded up to 16 with zero rows (the A tiles of GEMM 1);
 *   GEMM 1   (all threads) units of (group, 64 neurons) claimed in order: for each 16-neuron
 *                          block and each 32-row block, C = A x [gate | up] (two 16 x 16
 *                          fp32 C tiles per 16 rows), then h = act(C_gate + b) * (C_up + b)
 *                          rounded to bf16 (the A tiles of GEMM 2);
 *   GEMM 2   (all threads) units of 32 hidden rows claimed in order: each unit takes every
 *                          group in order, C = h x W2^T for 32 tokens x 32 rows, then
 *                          acc[tok] += w * (C + b2): each output element is summed by one
 *                          thread, in group order, whatever the number of threads.
 *
 * The tile step is the same in both kernels: C[32][32] (fp32) += A[rows][32 k] (bf16) x
 * two B tiles [16 k pairs][16 columns][2].  AMX holds C in four tiles (2 row blocks x 2
 * column blocks), A in two and B in two; AVX512-BF16 (vdpbf16ps) holds 8 rows x 32
 * columns in 16 vectors at a time, one broadcast k pair of A against a B row per step.
 */
#include "bf16_experts.h"

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#if defined(__AMX_TILE__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define AI static inline __attribute__((always_inline))

enum { ACT_SILU = 0, ACT_GELU = 1, ACT_SWIGLUOAI = 2 };
/* rows of a tile, bf16 k elements of a tile row (64 bytes), neurons per GEMM-1 unit */
enum { TR = 16, TK = 32, UNIT_BLOCKS = 4 };

/* ------------------------------------------------------------------ activations (fp32, 16 lanes) */
typedef struct {
    int kind;
    float alpha, limit;
} act_t;

#include "act_avx512.h"

/* n <= 16 bf16 values from p, widened (masked: nothing read past n) */
AI __m512 load_bf16(const uint16_t *p, int n) {
    const __mmask16 mask = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

AI __m256i to_bf16(__m512 v) { /* round to nearest even (vcvtneps2bf16) */
    return (__m256i)_mm512_cvtneps_pbh(v);
}

/* ------------------------------------------------------------------ the tile step: AVX512-BF16 */
/* C[r][0..16) += A[r] . B0, C[r][16..32) += A[r] . B1 for rows [0, rows) (a multiple of 8),
   over kb k blocks; A rows `lda` bf16 apart, B0/B1 contiguous [kb * 16 pairs][16][2]; C is
   [32][32] fp32, overwritten. */
static void gemm_dp(const uint16_t *A, long lda, int rows, const uint16_t *B0, const uint16_t *B1, long kb,
                    float *C) {
    const long pairs = kb * TR;
    for (int r0 = 0; r0 < rows; r0 += 8) {
        __m512 c0[8], c1[8];
#pragma GCC unroll 8
        for (int r = 0; r < 8; r++) c0[r] = c1[r] = _mm512_setzero_ps();
        const uint16_t *a = A + r0 * lda;
        for (long kp = 0; kp < pairs; kp++) {
            const __m512bh b0 = (__m512bh)_mm512_load_si512(B0 + kp * 32);
            const __m512bh b1 = (__m512bh)_mm512_load_si512(B1 + kp * 32);
#pragma GCC unroll 8
            for (int r = 0; r < 8; r++) {
                int32_t pair;
                memcpy(&pair, a + r * lda + 2 * kp, 4);
                const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
                c0[r] = _mm512_dpbf16_ps(c0[r], av, b0);
                c1[r] = _mm512_dpbf16_ps(c1[r], av, b1);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < 8; r++) {
            _mm512_store_ps(C + (r0 + r) * 32, c0[r]);
            _mm512_store_ps(C + (r0 + r) * 32 + 16, c1[r]);
        }
    }
}

/* ------------------------------------------------------------------ the tile step: AMX-BF16 */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define HAVE_AMX 1
typedef struct __attribute__((aligned(64))) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg_t;

/* tiles 0-3: C (rows 0-15 | 16-31) x (columns 0-15 | 16-31); 4, 5: A; 6, 7: B */
static void amx_configure(void) {
    tilecfg_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = TR;
    }
    _tile_loadconfig(&cfg);
}

/* as gemm_dp, rows 16 or 32; meanwhile pfl cache lines from pf per k block are prefetched
   into L2 (the next B panel: weights stream from memory under the tile work) */
static void gemm_amx(const uint16_t *A, long lda, int rows, const uint16_t *B0, const uint16_t *B1, long kb,
                     float *C, const char *pf, int pfl, int load_c) {
    const long sa = lda * 2;
    if (rows > TR) {
        if (load_c) {
            _tile_loadd(0, C, 128);
            _tile_loadd(1, C + 16, 128);
            _tile_loadd(2, C + TR * 32, 128);
            _tile_loadd(3, C + TR * 32 + 16, 128);
        } else {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
        }
        for (long k = 0; k < kb; k++) {
            _tile_loadd(4, A + k * TK, sa);
            _tile_loadd(5, A + TR * lda + k * TK, sa);
            _tile_loadd(6, B0 + k * TR * TK, 64);
            _tile_loadd(7, B1 + k * TR * TK, 64);
            for (int i = 0; i < pfl; i++) _mm_prefetch(pf + (k * pfl + i) * 64, _MM_HINT_T1);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, C, 128);
        _tile_stored(1, C + 16, 128);
        _tile_stored(2, C + TR * 32, 128);
        _tile_stored(3, C + TR * 32 + 16, 128);
    } else {
        if (load_c) {
            _tile_loadd(0, C, 128);
            _tile_loadd(1, C + 16, 128);
        } else {
            _tile_zero(0);
            _tile_zero(1);
        }
        for (long k = 0; k < kb; k++) {
            _tile_loadd(4, A + k * TK, sa);
            _tile_loadd(6, B0 + k * TR * TK, 64);
            _tile_loadd(7, B1 + k * TR * TK, 64);
            for (int i = 0; i < pfl; i++) _mm_prefetch(pf + (k * pfl + i) * 64, _MM_HINT_T1);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
        }
        _tile_stored(0, C, 128);
        _tile_stored(1, C + 16, 128);
    }
}
#else
#define HAVE_AMX 0
#endif

int moe_bf16_kernels(void) { return 1 | (HAVE_AMX ? 2 : 0); }

static int amx_state = -1; /* -1 not asked yet, 0 refused, 1 granted */

int moe_amx_enable(void) {
#if HAVE_AMX && defined(__linux__)
    if (amx_state < 0) {
        enum { ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };
        amx_state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : 0;
    }
    return amx_state;
#else
    amx_state = 0;
    return 0;
#endif
}

/* ------------------------------------------------------------------ the experts */
typedef struct {
    const uint16_t *x;
    long H, Hp, I, Ip;
    const int32_t *tok, *experts, *rows, *hrows;
    long G;
    const float *tw;
    const uint16_t *w13p, *w2p, *b13, *b2;
    act_t act;
    float *acc;
    uint16_t *xg, *hbuf;
} call_t;

AI void tile_step(const int amx, const uint16_t *A, long lda, int rows, const uint16_t *B0, const uint16_t *B1,
                  long kb, float *C, const char *pf, int pfl, int load_c) {
#if HAVE_AMX
    if (amx) {
        gemm_amx(A, lda, rows, B0, B1, kb, C, pf, pfl, load_c);
        return;
    }
#else
    (void)amx;
#endif
    (void)pf;
    (void)pfl;
    (void)load_c; /* the dot-product kernel is always given the whole k range */
    gemm_dp(A, lda, rows, B0, B1, kb, C);
}

/* GEMM 1 of group g for neuron blocks [nb0, nb1): h rows of the group, bf16 */
static void gemm1(const call_t *c, const int amx, long g, long nb0, long nb1) {
    const long e = c->experts[g], Hp = c->Hp, Ip = c->Ip, I = c->I;
    const long m16 = c->hrows[g + 1] - c->hrows[g]; /* rows, a multiple of 16 */
    const uint16_t *xa = c->xg + c->hrows[g] * Hp;
    uint16_t *h = c->hbuf + c->hrows[g] * Ip;
    const uint16_t *w = c->w13p + e * 2 * Ip * Hp;
    const uint16_t *b = c->b13 ? c->b13 + e * 2 * I : NULL;
    /* AMX: k in chunks of KC tile blocks (the panel's B tiles for one chunk, 2 x 8 KiB, stay
       in L1 while up to CH rows of A stream from L2), C kept in Cb between chunks (exact:
       fp32 stored and loaded back) */
    enum { KC = 8, CH = 128 };
    float Cb[CH * 32] __attribute__((aligned(64)));
    const long kb = Hp / TK, kc = amx ? KC : kb;
    /* the next panel's weights (this expert's next 16 neurons, or the next group's first)
       are prefetched into L2 while this panel's row blocks run: 64 lines per k block
       spread over all of them */
    const long panel = 2 * 16 * Hp * 2; /* bytes */
    const long rblocks = (m16 + 31) / 32, steps = rblocks * kb;
    const int pfl = (int)((panel / 64 + steps - 1) / steps);
    for (long nb = nb0; nb < nb1; nb++) {
        const long n = nb * 16;
        const char *next = nb + 1 < Ip / 16 ? (const char *)(w + (nb + 1) * 32 * Hp)
                           : g + 1 < c->G   ? (const char *)(c->w13p + (long)c->experts[g + 1] * 2 * Ip * Hp)
                                            : (const char *)w;
        const uint16_t *bg = w + (nb * 2) * 16 * Hp, *bu = bg + 16 * Hp;
        const int valid = n >= I ? 0 : (int)(I - n < 16 ? I - n : 16);
        const __m512 biasg = b && valid ? load_bf16(b + n, valid) : _mm512_setzero_ps();
        const __m512 biasu = b && valid ? load_bf16(b + I + n, valid) : _mm512_setzero_ps();
        long kdone = 0; /* k blocks run so far on this panel: where the prefetch stands */
        for (long ch0 = 0; ch0 < m16; ch0 += CH) {
            const long chr = m16 - ch0 < CH ? m16 - ch0 : CH;
            for (long k0 = 0; k0 < kb; k0 += kc) {
                const long kn = kb - k0 < kc ? kb - k0 : kc;
                for (long r0 = ch0; r0 < ch0 + chr; r0 += 32) {
                    const int rows = m16 - r0 < 32 ? (int)(m16 - r0) : 32;
                    const long done = kdone * pfl * 64;
                    kdone += kn;
                    tile_step(amx, xa + r0 * Hp + k0 * TK, Hp, rows, bg + k0 * TR * TK, bu + k0 * TR * TK, kn,
                              Cb + (r0 - ch0) * 32, next + (done < panel ? done : 0), done < panel ? pfl : 0, k0 > 0);
                }
            }
            for (long r = 0; r < chr; r++) {
                const __m512 gv = _mm512_add_ps(_mm512_load_ps(Cb + r * 32), biasg);
                const __m512 uv = _mm512_add_ps(_mm512_load_ps(Cb + r * 32 + 16), biasu);
                /* padded neurons have zero weights and biases: act(0, 0) = 0 */
                _mm256_storeu_si256((__m256i *)(h + (ch0 + r) * Ip + n), to_bf16(act16(gv, uv, c->act)));
            }
        }
    }
}

/* GEMM 2 for hidden rows [32 cb0, 32 cb1), every group in order; for each 32-token block
   of h (kept in L1) every column block of the range in turn (their weights kept in L2) */
static void gemm2(const call_t *c, const int amx, long G, long cb0, long cb1) {
    const long H = c->H, Hp = c->Hp, Ip = c->Ip;
    float C[32 * 32] __attribute__((aligned(64)));
    for (long g = 0; g < G; g++) {
        const long e = c->experts[g], m = c->rows[g + 1] - c->rows[g];
        const long m16 = c->hrows[g + 1] - c->hrows[g];
        const uint16_t *ha = c->hbuf + c->hrows[g] * Ip;
        const uint16_t *w = c->w2p + e * Hp * Ip;
        for (long r0 = 0; r0 < m16; r0 += 32) {
            const int rows = m16 - r0 < 32 ? (int)(m16 - r0) : 32;
            const long live = m - r0 < rows ? m - r0 : rows;
            for (long cb = cb0; cb < cb1; cb++) {
                const long col = cb * 32;
                const int n0 = H - col < 16 ? (int)(H - col) : 16;
                const int n1 = H - col - 16 <= 0 ? 0 : (H - col - 16 < 16 ? (int)(H - col - 16) : 16);
                const __mmask16 k0 = (__mmask16)(n0 >= 16 ? 0xffffu : (1u << n0) - 1u);
                const __mmask16 k1 = (__mmask16)(n1 >= 16 ? 0xffffu : (1u << n1) - 1u);
                const uint16_t *B0 = w + (cb * 2) * 16 * Ip, *B1 = B0 + 16 * Ip;
                const uint16_t *b = c->b2 ? c->b2 + e * H + col : NULL;
                const __m512 bias0 = b ? load_bf16(b, n0) : _mm512_setzero_ps();
                const __m512 bias1 = b && n1 ? load_bf16(b + 16, n1) : _mm512_setzero_ps();
                tile_step(amx, ha + r0 * Ip, Ip, rows, B0, B1, Ip / TK, C, NULL, 0, 0);
                for (long r = 0; r < live; r++) {
                    const long row = c->rows[g] + r0 + r;
                    const __m512 wv = _mm512_set1_ps(c->tw[row]);
                    float *o = c->acc + (long)c->tok[row] * H + col;
                    const __m512 y0 = _mm512_mul_ps(_mm512_add_ps(_mm512_load_ps(C + r * 32), bias0), wv);
                    _mm512_mask_storeu_ps(o, k0, _mm512_add_ps(_mm512_maskz_loadu_ps(k0, o), y0));
                    if (n1) {
                        const __m512 y1 = _mm512_mul_ps(_mm512_add_ps(_mm512_load_ps(C + r * 32 + 16), bias1), wv);
                        _mm512_mask_storeu_ps(o + 16, k1, _mm512_add_ps(_mm512_maskz_loadu_ps(k1, o + 16), y1));
                    }
                }
            }
        }
    }
}

int moe_bf16_experts(int use_amx, const uint16_t *x, long H, long Hp, const int32_t *tok, const float *tw,
                     const int32_t *experts, const int32_t *rows, const int32_t *hrows, long G, const uint16_t *w13p,
                     const uint16_t *w2p, const uint16_t *b13, const uint16_t *b2, long I, long Ip, int act_kind,
                     float alpha, float limit, float *acc, uint16_t *xg, uint16_t *hbuf, int nthreads) {
    if (use_amx && amx_state != 1) return -3;
    const call_t c = {x,  H,   Hp,  I,   Ip,  tok, experts, rows, hrows, G, tw, w13p, w2p, b13, b2,
                      {act_kind, alpha, limit}, acc, xg, hbuf};
    const long nblocks = Ip / 16, per = (nblocks + UNIT_BLOCKS - 1) / UNIT_BLOCKS;
    const long cbs = Hp / 32, per2 = (cbs + 2 * nthreads - 1) / (2 * nthreads), units2 = (cbs + per2 - 1) / per2;
#pragma omp parallel num_threads(nthreads)
    {
#if HAVE_AMX
        if (use_amx) amx_configure();
#endif
        /* gather: the A tiles of GEMM 1, zero columns and rows in the padding */
#pragma omp for schedule(static)
        for (long g = 0; g < G; g++) {
            const long m = rows[g + 1] - rows[g];
            for (long r = 0; r < hrows[g + 1] - hrows[g]; r++) {
                uint16_t *d = xg + (hrows[g] + r) * Hp;
                if (r < m) {
                    memcpy(d, x + (long)tok[rows[g] + r] * H, H * 2);
                    memset(d + H, 0, (Hp - H) * 2);
                } else {
                    memset(d, 0, Hp * 2);
                }
            }
        }
        /* (the implicit barrier: every row is gathered) */
#pragma omp for schedule(dynamic, 1)
        for (long u = 0; u < G * per; u++) {
            const long g = u / per, nb0 = (u % per) * UNIT_BLOCKS;
            gemm1(&c, use_amx, g, nb0, nb0 + UNIT_BLOCKS < nblocks ? nb0 + UNIT_BLOCKS : nblocks);
        }
        /* two units per thread: few passes over h, some room for a thread slowed down */
#pragma omp for schedule(dynamic, 1)
        for (long u = 0; u < units2; u++) gemm2(&c, use_amx, G, u * per2, (u + 1) * per2 < cbs ? (u + 1) * per2 : cbs);
#if HAVE_AMX
        if (use_amx) _tile_release();
#endif
    }
    return 0;
}
