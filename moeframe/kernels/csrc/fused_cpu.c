/* moeframe fused_cpu: the routed experts of a MoE layer on CPUs.  This file is the portable
 * driver (plain C and OpenMP): sort-and-group, work items, scheduling, the two phases and
 * their epilogues.  The vector code (panel and dot kernels, packing, activations) is in the
 * per-ISA micro-kernel headers behind ukernel.h (ukernel_x86.h: AVX2, AVX-512; ...), whose
 * interface ukernel.h documents.
 *
 * One call computes out[t] = sum_k w[t,k] * f_{ids[t,k]}(x[t]) for the local experts:
 *
 *   group    (one thread)  counting sort of the (token, k) pairs by local expert (stable);
 *                          each expert's pairs are cut into work items of ITEM tokens (the
 *                          last one up to ITEM_MAX);
 *   phase 1  (all threads) per item: h = act(x W_gate^T + b) * (x W_up^T + b); in prefill the
 *                          threads claim (item, UNIT neurons) units in order, so that one
 *                          slowed down by another process leaves work to the others; in
 *                          decode each thread takes its share of the rows, as long
 *                          contiguous runs;
 *   phase 2  (all threads) per item: out[t, rows] += w[t,k] * (h W2^T + b2)[rows]; each thread
 *                          owns a fixed range of hidden rows, so every output element is
 *                          summed by one thread, in expert order: the result does not depend
 *                          on the number of threads.
 * A call holds at most `hbuf_slots` rows of h; larger calls run in groups of items, with
 * one barrier after phase 1 and one after phase 2 of each group.
 *
 * Two ways through an item, chosen by its token count m:
 *   tile mode   (m >= TILE_MIN, compute bound, prefill): weight rows are taken UK_ROWS at a
 *               time (a tile, read from memory once, the next tile prefetched meanwhile);
 *               the item's full UK_PANEL-token panels (tokens packed [K][UK_PANEL], fp32) go
 *               through the panel kernel; the tail tokens (m % UK_PANEL) go through the dot
 *               kernel on the same rows while they are in cache (no padding);
 *   stream mode (m < TILE_MIN, memory bound, decode): the dot kernel over a few long
 *               contiguous runs of rows at once, each weight element loaded once and
 *               multiplied into all m tokens.
 * Weights stay in the canonical layout (w13 [E, 2I, H], w2 [E, H, I]) and dtype: fp32 rows
 * are read in place, bf16/fp16 rows are widened to fp32 in registers (dot) or into a small
 * per-thread tile (panel).  Everything is accumulated in fp32.  Every buffer is allocated by
 * the caller (with torch, so that the profiler sees it).
 */
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "fused_cpu_abi.h"
#include "ukernel.h"

#define AI UK_INLINE

/* Work items: an expert's pairs are cut into items of ITEM tokens, the last one taking up
   to ITEM_MAX (so that no item is left with a handful of tokens).  Tiles: phase 1 takes NT
   neurons (their gate and up rows) at a time, phase 2 TROWS rows of W2. */
enum { PANEL = UK_PANEL, ITEM = UK_ITEM, ITEM_MAX = ITEM + PANEL, TROWS = UK_ROWS, NT = UK_TILE_NEURONS };
/* the slots (rows of h) of the largest item: its partial panel is padded */
enum { ITEM_MAX_SLOTS = (ITEM_MAX + PANEL - 1) / PANEL * PANEL };

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
   (read from memory once), the full panels go through the panel kernel, and so do the last
   tokens (m % PANEL) as a zero-padded partial panel when there are at least UK_PANEL_MIN of
   them; fewer take the dot kernel, in chunks of at most TAIL_CHUNK, while the tile is still
   in cache.  Stream mode (fewer tokens, decode): the dot kernel over long contiguous
   runs of rows. */
enum { TILE_MIN = 7, TAIL_CHUNK = UK_DOT_MAX_M };
/* neurons of a phase-1 work unit in prefill: a multiple of 16 (decode splits and bf16 order's blocks) and of the tile rows */
enum { UNIT = 96 };
_Static_assert(UNIT % 16 == 0 && UNIT % NT == 0, "UNIT: a multiple of 16 and of the tile's neurons");

/* Layout of an item's rows of h: its panels ([I][PANEL] each; the last one may be partial,
   padded to PANEL), then the tail tokens' rows ([I] each, in dot order for bf16 weights). */
AI int item_panels(int m) {
    if (m < TILE_MIN) return 0;
    return m / PANEL + ((int)UK_PANEL_MIN < (int)PANEL && m % PANEL >= UK_PANEL_MIN);
}
AI int item_tail(int m) { return m - item_panels(m) * PANEL > 0 ? m - item_panels(m) * PANEL : 0; }
AI int panel_tokens(int m, int p) { return m - p * PANEL < PANEL ? m - p * PANEL : PANEL; }
AI long item_slots(int m) { return (long)item_panels(m) * PANEL + item_tail(m); }

/* Phase 1 of one item for neurons [n0, n1): h = act(x W_gate^T + b) * (x W_up^T + b). */
/* The item's tokens, as fp32, into this thread's scratch: full panels [H][PANEL], then the
   tail tokens' rows. */
AI void pack_item(const ctx_t *c, const int dt, const item_t *it, float *scr) {
    const long H = c->H;
    const int m = it->m, npan = item_panels(m), tail = item_tail(m);
    int32_t tok[ITEM_MAX];
    for (int j = 0; j < m; j++) tok[j] = c->pairs[it->start + j] / (int32_t)c->topk;
    for (int p = 0; p < npan; p++) {
        const int n = panel_tokens(m, p);
        if (n == PANEL)
            uk_pack_panel(c->x, dt, H, tok + p * PANEL, scr + (long)p * H * PANEL);
        else
            uk_pack_panel_part(c->x, dt, H, tok + p * PANEL, n, scr + (long)p * H * PANEL);
    }
    if (tail) uk_pack_rows(c->x, dt, H, tok + npan * PANEL, tail, scr + (long)npan * PANEL * H);
}

/* Phase 1 of one item (its tokens packed in scr) for neurons [n0, n1). */
AI void phase1(const ctx_t *c, const int dt, const item_t *it, float *h, long n0, long n1, const float *scr,
               float *wsc, float *usc) {
    const long H = c->H, I = c->I;
    const int m = it->m, npan = item_panels(m), tail = item_tail(m);
    const long esz = dt == DT_F32 ? 4 : 2;
    const char *w13 = (const char *)c->w13 + (long)it->expert * 2 * I * H * esz;
    const void *b13 = c->b13 ? (const char *)c->b13 + (long)it->expert * 2 * I * esz : NULL;
    const float *xr = scr + (long)npan * PANEL * H; /* the tail tokens' rows */
    float *hr = h + (long)npan * PANEL * I;
    if (m >= TILE_MIN) {
        /* tiles of nt neurons: their gate rows and their up rows */
        const int nt = NT;
        for (long n = n0; n < n1; n += nt) {
            const int nn = (int)(n1 - n < nt ? n1 - n : nt);
            const char *gate = w13 + n * H * esz, *up = w13 + (I + n) * H * esz;
            const int more = n + 2 * nt <= n1;
            const char *next[2 * NT];
            for (int j = 0; more && j < nt; j++) {
                next[j] = gate + (nt + j) * H * esz;
                next[nt + j] = up + (nt + j) * H * esz;
            }
            if (npan) {
                const float *rows[2 * NT];
                long ks;
                if (dt == DT_F32) { /* broadcast straight from the rows */
                    for (int j = 0; j < nn; j++) {
                        rows[j] = (const float *)(gate + j * H * esz);
                        rows[nn + j] = (const float *)(up + j * H * esz);
                    }
                    ks = 1;
                } else { /* widened to fp32, packed [K][nn] (gate) and [K][nn] (up) */
                    const void *src[NT];
                    float *wu = wsc + nt * H + 8;
                    for (int j = 0; j < nn; j++) src[j] = gate + j * H * esz;
                    uk_pack_w(src, nn, dt, H, wsc);
                    for (int j = 0; j < nn; j++) src[j] = up + j * H * esz;
                    uk_pack_w(src, nn, dt, H, wu);
                    for (int j = 0; j < nn; j++) {
                        rows[j] = wsc + j;
                        rows[nn + j] = wu + j;
                    }
                    ks = nn;
                }
                for (int p = 0; p < npan; p++) {
                    float gu[2 * NT * PANEL];
                    const float *xp = scr + (long)p * H * PANEL;
                    /* while the first panel computes, prefetch the next tile's rows */
                    uk_panel_rows(2 * nn, rows, ks, xp, H, panel_tokens(m, p), gu, p == 0 && more ? next : NULL, H * esz);
                    float *ga = gu, *ua = gu + (long)nn * PANEL;
                    if (b13)
                        for (int j = 0; j < nn; j++) {
                            const float bg = uk_load1(b13, n + j, dt), bu = uk_load1(b13, I + n + j, dt);
                            for (int q = 0; q < PANEL; q++) {
                                ga[j * PANEL + q] += bg;
                                ua[j * PANEL + q] += bu;
                            }
                        }
                    /* the nn rows of h of this panel are contiguous ([I][PANEL]) */
                    uk_act(h + (long)p * I * PANEL + n * PANEL, ga, ua, (long)nn * PANEL, c->act);
                }
            }
            /* the tail tokens against the same 2 * NT rows, still in cache */
            for (int t0 = 0; t0 < tail; t0 += TAIL_CHUNK) {
                const int mm = tail - t0 < TAIL_CHUNK ? tail - t0 : TAIL_CHUNK;
                const int rows = uk_dot_rows[mm];
                const void *src[2 * NT];
                for (int j = 0; j < nn; j++) {
                    src[j] = gate + j * H * esz;
                    src[nn + j] = up + j * H * esz;
                }
                float res[2 * NT * TAIL_CHUNK];
                for (int r = 0; r < 2 * nn; r += rows)
                    uk_dot(dt, 2 * nn - r < rows ? 2 * nn - r : rows, mm, src + r, xr + (long)t0 * H, H, res + r * mm);
                for (int j = 0; j < nn; j++) {
                    const long pn = dt == DT_BF16 ? uk_dot_order(n + j, I) : n + j;
                    const float bg = b13 ? uk_load1(b13, n + j, dt) : 0.0f, bu = b13 ? uk_load1(b13, I + n + j, dt) : 0.0f;
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
        const int nd = uk_dot_neurons[m];
        const long len = n1 - n0, chunk = (len + nd - 1) / nd;
        for (long q = 0; q < chunk; q++) {
            const void *src[UK_DOT_ROWS_MAX];
            long nid[UK_DOT_ROWS_MAX / 2];
            int nn = 0;
            for (int s = 0; s < nd; s++)
                if (s * chunk + q < len) nid[nn++] = n0 + s * chunk + q;
            for (int j = 0; j < nn; j++) {
                src[j] = w13 + nid[j] * H * esz;
                src[nn + j] = w13 + (I + nid[j]) * H * esz;
            }
            float res[UK_DOT_ROWS_MAX * UK_DOT_MAX_M];
            uk_dot(dt, 2 * nn, m, src, xr, H, res);
            for (int j = 0; j < nn; j++) {
                const long n = nid[j], pn = dt == DT_BF16 ? uk_dot_order(n, I) : n;
                const float bg = b13 ? uk_load1(b13, n, dt) : 0.0f, bu = b13 ? uk_load1(b13, I + n, dt) : 0.0f;
                for (int t = 0; t < m; t++) {
                    hr[(long)t * I + pn] = res[j * m + t] + bg;
                    usc[(long)t * I + pn] = res[(nn + j) * m + t] + bu;
                }
            }
        }
    }
    for (int t = 0; t < tail; t++) {
        float *ht = hr + (long)t * I;
        uk_act(ht + n0, ht + n0, usc + (long)t * I + n0, n1 - n0, c->act);
    }
}

/* Phase 2 of one item for hidden rows [r0, r1): acc[t][rows] += w * (h W2^T + b2). */
AI void phase2(const ctx_t *c, const int dt, const item_t *it, const float *h, long r0, long r1, float *wsc,
               float *ybuf) {
    const long H = c->H, I = c->I;
    const int m = it->m, npan = item_panels(m), tail = item_tail(m);
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
        const int tr = TROWS;
        for (long r = r0; r < r1; r += tr) {
            const int nr = (int)(r1 - r < tr ? r1 - r : tr);
            const char *rows = w2 + r * I * esz;
            const char *next[TROWS];
            const int more = r + 2 * tr <= r1;
            for (int j = 0; more && j < tr; j++) next[j] = w2 + (r + tr + j) * I * esz;
            if (npan) {
                const float *wr[TROWS];
                long ks;
                if (dt == DT_F32) {
                    for (int j = 0; j < nr; j++) wr[j] = (const float *)(rows + j * I * esz);
                    ks = 1;
                } else {
                    const void *src[TROWS];
                    for (int j = 0; j < nr; j++) src[j] = rows + j * I * esz;
                    uk_pack_w(src, nr, dt, I, wsc);
                    for (int j = 0; j < nr; j++) wr[j] = wsc + j;
                    ks = nr;
                }
                for (int p = 0; p < npan; p++) {
                    const int np = panel_tokens(m, p);
                    float acc[TROWS * PANEL], b[TROWS];
                    uk_panel_rows(nr, wr, ks, h + (long)p * I * PANEL, I, np, acc, p == 0 && more ? next : NULL, I * esz);
                    for (int j = 0; j < nr; j++) b[j] = b2 ? uk_load1(b2, r + j, dt) : 0.0f;
                    /* rows x tokens -> tokens x rows */
                    for (int q = 0; q < np; q++) {
                        const float w = tw[p * PANEL + q];
                        float *y = ybuf + (long)(p * PANEL + q) * ld + (r - r0);
                        for (int j = 0; j < nr; j++) y[j] = (acc[j * PANEL + q] + b[j]) * w;
                    }
                }
            }
            for (int t0 = 0; t0 < tail; t0 += TAIL_CHUNK) {
                const int mm = tail - t0 < TAIL_CHUNK ? tail - t0 : TAIL_CHUNK;
                const int per = uk_dot_rows[mm];
                const void *src[TROWS];
                for (int j = 0; j < nr; j++) src[j] = rows + j * I * esz;
                float res[TROWS * TAIL_CHUNK];
                for (int j = 0; j < nr; j += per)
                    uk_dot(dt, nr - j < per ? nr - j : per, mm, src + j, hr + (long)t0 * I, I, res + j * mm);
                for (int j = 0; j < nr; j++) {
                    const float b = b2 ? uk_load1(b2, r + j, dt) : 0.0f;
                    for (int t = 0; t < mm; t++)
                        ybuf[(long)(npan * PANEL + t0 + t) * ld + (r - r0) + j] = ttw[t0 + t] * (res[j * mm + t] + b);
                }
            }
        }
        /* each token's row of results goes into the output once, contiguously */
        for (int t = 0; t < m; t++) {
            float *o = c->acc + (long)tok[t] * H + r0;
            const float *y = ybuf + (long)t * ld;
            for (long j = 0; j < r1 - r0; j++) o[j] += y[j];
        }
        return;
    }
    const int nd = uk_dot_rows[m];
    const long len = r1 - r0, chunk = (len + nd - 1) / nd;
    for (long q = 0; q < chunk; q++) {
        const void *src[UK_DOT_ROWS_MAX];
        long rid[UK_DOT_ROWS_MAX];
        int nr = 0;
        for (int s = 0; s < nd; s++)
            if (s * chunk + q < len) rid[nr++] = r0 + s * chunk + q;
        for (int j = 0; j < nr; j++) src[j] = w2 + rid[j] * I * esz;
        float res[UK_DOT_ROWS_MAX * UK_DOT_MAX_M];
        uk_dot(dt, nr, m, src, hr, I, res);
        for (int j = 0; j < nr; j++) {
            const float b = b2 ? uk_load1(b2, rid[j], dt) : 0.0f;
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
    /* a call of fewer than TILE_MIN tokens has the scratch of stream mode only: its items
       stay below TILE_MIN pairs even where a token names an expert twice */
    const long item_cut = T < TILE_MIN ? TILE_MIN - 1 : ITEM, item_max = T < TILE_MIN ? TILE_MIN - 1 : ITEM_MAX;
    long nitems = 0;
    for (long e = 0; e < local_experts; e++)
        for (long s = counts[e]; s < counts[e + 1];) {
            const long left = counts[e + 1] - s, m = left <= item_max ? left : item_cut;
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
    const long wsc_floats = 2 * TROWS * (H > I ? H : I) + 32;
#pragma omp parallel num_threads(nthreads)
    {
        const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
        float *scr = scratch + (long)tid * scratch_floats;
        /* the layout moe_scratch_floats sized (decode calls: packed tokens and up values only) */
        float *wsc = T < TILE_MIN ? NULL : scr + (long)ITEM_MAX_SLOTS * H;
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
                for (long r = r0; r < r1; r++) uk_store1(out, t * H + r, acc[t * H + r], dt);
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
    const long items = local_experts + pairs / (TILE_MIN - 1) + 1; /* items of ITEM, or TILE_MIN - 1 in decode */
    return local_experts + 1 + pairs + items * (long)(sizeof(item_t) / sizeof(int32_t));
}
/* hbuf slots of the largest item */
long moe_item_max_slots(void) { return ITEM_MAX_SLOTS; }
/* floats of scratch per thread for a call of T tokens: calls of fewer than TILE_MIN tokens
   (decode) only take stream mode, which needs much less (and small allocations are served
   without fresh pages, which matters at a millisecond per call) */
long moe_scratch_floats(long H, long I, long T) {
    const long n = T < TILE_MIN ? (long)TILE_MIN * H + (long)PANEL * I + 64
                                : (long)ITEM_MAX_SLOTS * H + 2 * TROWS * (H > I ? H : I) + 32 + (long)PANEL * I +
                                      (long)ITEM_MAX * (H + 8);
    return (n + 15) / 16 * 16;
}
