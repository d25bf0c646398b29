/* A stand-alone check of fused_cpu's native core through its C ABI (fused_cpu_abi.h),
 * for any ISA variant on any machine: linked with one variant's source into an executable
 * (statically for aarch64, run under qemu-aarch64 on an x86 machine), it calls
 * moe_forward on seeded random inputs and compares every output with a plain-C reference
 * of the math (docs: reference-math.md), computed in double.
 *
 * Cases: fp32, bf16 and fp16; silu, gelu and swigluoai (at an input scale where its clamps
 * act); with and without biases and an expert map; 0, 1, a few and many tokens (the
 * decode and prefill paths of the core, work items split and grouped); repeated expert
 * ids, experts given nothing, a NaN row, out-of-range ids and map entries (the status).
 * Every buffer the core gets is followed by a guard zone that must come back untouched.
 *
 *   fused_cpu_check [--threads N] [--break WHAT] [--dump DIR] [--case N] [--list] [-v]
 *
 * --threads N   nthreads passed to the core (default 2); every multi-token case is run
 *               with 1 thread as well and must give the same bits
 * --break WHAT  make the reference wrong on purpose (see BREAKS): the run must then fail,
 *               which shows that the comparison catches such an error
 * --dump DIR    write each case's inputs, the reference and the core's output to DIR/<n>/
 *               (raw little-endian arrays and meta.txt), to compare with another reference
 * --case N      run case N only;  --list: print the cases and exit
 *
 * Exit status: 0 every case agrees, 1 some case does not, 2 usage error.
 */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fused_cpu_abi.h"

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { ACT_SILU = 0, ACT_GELU = 1, ACT_SWIGLUOAI = 2 };
static const char *const DT_NAMES[] = {"float32", "bfloat16", "float16"};
static const char *const ACT_NAMES[] = {"silu", "gelu", "swigluoai"};
static const float ALPHA = 1.702f, LIMIT = 7.0f;

/* deliberate errors of the reference, for --break */
static const char *const BREAKS[] = {"none", "bias2", "up-bias", "gelu-tanh", "no-clamp", "no-weight", "gate-up", "last-k", NULL};
static int broken = 0;

/* ------------------------------------------------------------------ numbers */
static float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }
static uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0) return (sign ? -1.0f : 1.0f) * ldexpf((float)man, -24); /* zero, subnormal */
    if (exp == 31) return bits_f32(sign | 0x7f800000u | (man << 13));    /* inf, NaN */
    return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}
static uint16_t f32_to_f16(float f) { /* round to nearest even */
    const uint32_t u = f32_bits(f), sign = (u >> 16) & 0x8000u;
    const float a = fabsf(f);
    if (a != a) return (uint16_t)(sign | 0x7e00u);
    if (a >= 65520.0f) return (uint16_t)(sign | 0x7c00u);
    if (a < 6.103515625e-05f) /* subnormal: a multiple of 2^-24 */
        return (uint16_t)(sign | (uint32_t)nearbyintf(a * 16777216.0f));
    const uint32_t v = f32_bits(a), man = v & 0x7fffffu, exp = (v >> 23) - 112u;
    uint32_t r = (exp << 10) | (man >> 13);
    const uint32_t rest = man & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (r & 1u))) r++;
    return (uint16_t)(sign | r);
}
static long esize(int dt) { return dt == DT_F32 ? 4 : 2; }
static float get(const void *p, long i, int dt) {
    if (dt == DT_F32) return ((const float *)p)[i];
    const uint16_t h = ((const uint16_t *)p)[i];
    return dt == DT_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}
static void put(void *p, long i, float v, int dt) {
    if (dt == DT_F32)
        ((float *)p)[i] = v;
    else
        ((uint16_t *)p)[i] = dt == DT_BF16 ? f32_to_bf16(v) : f32_to_f16(v);
}

static uint64_t rng;
static double uniform(void) { /* xorshift64*, [0, 1) */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return (double)((rng * 2685821657736338717ull) >> 11) / 9007199254740992.0;
}
static double normal(void) { /* about N(0, 1): the sum of four uniforms (no libm: fast under emulation) */
    return (uniform() + uniform() + uniform() + uniform() - 2.0) * 1.7320508075688772;
}

/* ------------------------------------------------------------------ guarded buffers */
enum { GUARD = 64 };
static void *guarded(long bytes) {
    unsigned char *p = malloc((size_t)bytes + GUARD);
    if (!p) {
        fprintf(stderr, "fused_cpu_check: out of memory\n");
        exit(2);
    }
    memset(p, 0x5a, (size_t)bytes);
    memset(p + bytes, 0xa5, GUARD);
    return p;
}
static int guard_ok(const void *p, long bytes) {
    const unsigned char *g = (const unsigned char *)p + bytes;
    for (int i = 0; i < GUARD; i++)
        if (g[i] != 0xa5) return 0;
    return 1;
}

/* ------------------------------------------------------------------ cases */
typedef struct {
    int dt, act, bias, map;
    long T, E, K, H, I;
    double xscale;
    long hbuf_cap;    /* 0: enough for every item; else at most this many slots (groups) */
    int special;      /* SP_* below */
    int expect;       /* status moe_forward must return */
} case_t;
enum { SP_NONE, SP_REPEAT, SP_NOTHING_LOCAL, SP_NAN_ROW, SP_BAD_ID, SP_BAD_MAP };
static const char *const SP_NAMES[] = {"", " repeated-ids", " nothing-local", " nan-row", " bad-id", " bad-map"};

static int ncases;
static case_t cases[256];
static void add(case_t c) { cases[ncases++] = c; }

static void make_cases(void) {
    static const long TS[] = {0, 1, 3, 7, 16, 23, 150};
    for (int dt = 0; dt < 3; dt++)
        for (int act = 0; act < 3; act++)
            for (int i = 0; i < 7; i++) {
                const long T = TS[i];
                add((case_t){dt, act, (int)((T + act) % 2), (int)((T + dt) % 2 == 0), T, 6, 3, T % 2 ? 61 : 64,
                             T % 3 ? 35 : 48, act == ACT_SWIGLUOAI ? 6.0 : 1.0, 0, SP_NONE, 0});
            }
    /* decode with long rows (several streams per thread), 1 to 6 tokens */
    for (int dt = 0; dt < 3; dt++) {
        add((case_t){dt, ACT_SILU, 1, 0, 1, 8, 4, 256, 128, 1.0, 0, SP_NONE, 0});
        add((case_t){dt, ACT_GELU, 0, 1, 5, 8, 4, 200, 96, 1.0, 0, SP_NONE, 0});
    }
    /* prefill: items of 64/80 tokens, and run in groups when hbuf holds one item */
    for (int dt = 0; dt < 3; dt++) add((case_t){dt, ACT_SILU, 1, 0, 200, 4, 2, 64, 40, 1.0, 80, SP_NONE, 0});
    add((case_t){DT_F32, ACT_SWIGLUOAI, 1, 1, 90, 5, 3, 48, 32, 6.0, 0, SP_NONE, 0});
    add((case_t){DT_BF16, ACT_SILU, 1, 1, 70, 8, 3, 32, 16, 1.0, 0, SP_REPEAT, 0});
    add((case_t){DT_F32, ACT_SILU, 0, 1, 9, 8, 2, 32, 16, 1.0, 0, SP_NOTHING_LOCAL, 0});
    add((case_t){DT_F32, ACT_SILU, 1, 0, 20, 4, 2, 32, 16, 1.0, 0, SP_NAN_ROW, 0});
    add((case_t){DT_BF16, ACT_SILU, 0, 0, 3, 4, 2, 32, 16, 1.0, 0, SP_NAN_ROW, 0});
    add((case_t){DT_F32, ACT_SILU, 0, 0, 12, 4, 2, 32, 16, 1.0, 0, SP_BAD_ID, -1});
    add((case_t){DT_F32, ACT_SILU, 0, 1, 12, 4, 2, 32, 16, 1.0, 0, SP_BAD_MAP, -2});
}

/* ------------------------------------------------------------------ the reference */
static double act_ref(double g, double u, int act) {
    if (broken == 4 && act == ACT_SWIGLUOAI) return (u + 1.0) * g / (1.0 + exp(-ALPHA * g));
    if (act == ACT_SILU) return g / (1.0 + exp(-g)) * u;
    if (act == ACT_GELU) {
        if (broken == 3) return 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))) * u;
        return 0.5 * g * (1.0 + erf(g * 0.7071067811865476)) * u;
    }
    g = g < LIMIT ? g : LIMIT;
    u = u < -LIMIT ? -LIMIT : (u > LIMIT ? LIMIT : u);
    return (u + 1.0) * g / (1.0 + exp(-ALPHA * g));
}

/* every element of p (n of dtype dt) as double, in a new array */
static double *widen(const void *p, long n, int dt) {
    double *d = malloc(sizeof(double) * (size_t)(n + 1));
    for (long i = 0; i < n; i++) d[i] = get(p, i, dt);
    return d;
}

/* out[t] = sum_k tw[t,k] * f_{ids[t,k]}(x[t]) over the local experts, in double */
static void reference(const case_t *c, const void *x, const int64_t *ids, const float *tw, const int32_t *map,
                      const void *w13, const void *w2, const void *b13, const void *b2, long L, double *out) {
    const long T = c->T, H = c->H, I = c->I, K = c->K;
    double *h = malloc(sizeof(double) * (size_t)(I + 1));
    double *xd = widen(x, T * H, c->dt), *w13d = widen(w13, L * 2 * I * H, c->dt), *w2d = widen(w2, L * H * I, c->dt);
    double *b13d = b13 ? widen(b13, L * 2 * I, c->dt) : NULL, *b2d = b2 ? widen(b2, L * H, c->dt) : NULL;
    memset(out, 0, sizeof(double) * (size_t)(T * H));
    for (long t = 0; t < T; t++)
        for (long k = 0; k < K; k++) {
            if (broken == 7 && k == K - 1) continue;
            const long e = (long)ids[t * K + k], l = map ? map[e] : e;
            if (l < 0) continue;
            const double *xt = xd + t * H;
            for (long n = 0; n < I; n++) {
                const long gr = broken == 6 ? I + n : n, ur = broken == 6 ? n : I + n;
                const double *wg = w13d + (l * 2 * I + gr) * H, *wu = w13d + (l * 2 * I + ur) * H;
                double g = 0, u = 0;
                for (long j = 0; j < H; j++) {
                    g += wg[j] * xt[j];
                    u += wu[j] * xt[j];
                }
                if (b13d) {
                    g += b13d[l * 2 * I + gr];
                    if (broken != 2) u += b13d[l * 2 * I + ur];
                }
                h[n] = act_ref(g, u, c->act);
            }
            const double w = broken == 5 ? 1.0 : tw[t * K + k];
            for (long r = 0; r < H; r++) {
                const double *wr = w2d + (l * H + r) * I;
                double y = 0;
                for (long n = 0; n < I; n++) y += wr[n] * h[n];
                if (b2d && broken != 1) y += b2d[l * H + r];
                out[t * H + r] += w * y;
            }
        }
    free(h);
    free(xd);
    free(w13d);
    free(w2d);
    free(b13d);
    free(b2d);
}

/* tolerances: the core computes in fp32 from the same inputs, so only fp32 rounding and
   the output's final rounding to the dtype separate it from the exact result */
static int within(double out, double ref, double scale, int dt) {
    if (isnan(out) || isnan(ref)) return isnan(out) && isnan(ref);
    const double atol = dt == DT_F32 ? 1e-5 : 1e-4, scale_rtol = 1e-5;
    const double rtol = dt == DT_F32 ? 1e-5 : (dt == DT_BF16 ? 1.0 / 256 + 1e-4 : 1.0 / 2048 + 1e-4);
    return fabs(out - ref) <= atol + rtol * fabs(ref) + scale_rtol * scale;
}

/* ------------------------------------------------------------------ dumping */
static int write_raw(const char *dir, const char *name, const void *p, long bytes) {
    char path[8192];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    const size_t n = bytes > 0 ? fwrite(p, 1, (size_t)bytes, f) : 0;
    return fclose(f) == 0 && (long)n == (bytes > 0 ? bytes : 0) ? 0 : -1;
}

/* ------------------------------------------------------------------ one case */
typedef struct {
    int threads;
    const char *dump;
    int verbose;
} opts_t;

static int call(const case_t *c, const void *x, const int64_t *ids, const float *tw, const int32_t *map,
                const void *w13, const void *w2, const void *b13, const void *b2, long L, int nthreads, void *out,
                int *guards) {
    const long T = c->T, H = c->H, I = c->I, P = T * c->K;
    const long ints_n = moe_ints_needed(P, L), max_slots = moe_item_max_slots();
    long slots = c->hbuf_cap ? c->hbuf_cap : P;
    if (slots < max_slots) slots = max_slots;
    const long sf = moe_scratch_floats(H, I, T);
    float *acc = c->dt == DT_F32 ? (float *)out : guarded(4 * T * H);
    int32_t *ints = guarded(4 * ints_n);
    float *hbuf = guarded(4 * slots * I);
    float *scratch = guarded(4 * sf * nthreads);
    const int status = moe_forward(c->dt, x, T, H, ids, tw, c->K, map, c->E, w13, w2, b13, b2, L, I, c->act, ALPHA,
                                   LIMIT, out, acc, ints, hbuf, slots, scratch, sf, nthreads);
    *guards = guard_ok(ints, 4 * ints_n) && guard_ok(hbuf, 4 * slots * I) && guard_ok(scratch, 4 * sf * nthreads) &&
              (c->dt == DT_F32 || guard_ok(acc, 4 * T * H));
    if (c->dt != DT_F32) free(acc);
    free(ints);
    free(hbuf);
    free(scratch);
    return status;
}

static int run_case(int n, const case_t *c, const opts_t *o) {
    const int dt = c->dt;
    const long T = c->T, E = c->E, K = c->K, H = c->H, I = c->I, L = c->map ? (E + 1) / 2 : E, es = esize(dt);
    rng = 0x9e3779b97f4a7c15ull * (uint64_t)(n + 1);
    void *x = malloc((size_t)(es * T * H + 1)), *w13 = malloc((size_t)(es * L * 2 * I * H));
    void *w2 = malloc((size_t)(es * L * H * I)), *b13 = NULL, *b2 = NULL;
    int64_t *ids = malloc(sizeof(int64_t) * (size_t)(T * K + 1));
    float *tw = malloc(sizeof(float) * (size_t)(T * K + 1));
    int32_t *map = NULL;
    for (long i = 0; i < T * H; i++) put(x, i, (float)(normal() * c->xscale), dt);
    for (long t = 0; t < T; t++) { /* distinct ids per token, softmax weights */
        long perm[64];
        for (long e = 0; e < E; e++) perm[e] = e;
        double z[64], s = 0;
        for (long k = 0; k < K; k++) {
            const long j = k + (long)(uniform() * (double)(E - k));
            const long tmp = perm[k];
            perm[k] = perm[j];
            perm[j] = tmp;
            ids[t * K + k] = perm[k];
            z[k] = exp(2.0 * uniform());
            s += z[k];
        }
        for (long k = 0; k < K; k++) tw[t * K + k] = (float)(z[k] / s);
    }
    for (long i = 0; i < L * 2 * I * H; i++) put(w13, i, (float)(normal() / sqrt((double)H)), dt);
    for (long i = 0; i < L * H * I; i++) put(w2, i, (float)(normal() / sqrt((double)I)), dt);
    if (c->bias) {
        b13 = malloc((size_t)(es * L * 2 * I));
        b2 = malloc((size_t)(es * L * H));
        for (long i = 0; i < L * 2 * I; i++) put(b13, i, (float)(0.1 * normal()), dt);
        for (long i = 0; i < L * H; i++) put(b2, i, (float)(0.1 * normal()), dt);
    }
    if (c->map) { /* even experts local */
        map = malloc(sizeof(int32_t) * (size_t)E);
        for (long e = 0; e < E; e++) map[e] = e % 2 ? -1 : (int32_t)(e / 2);
    }
    if (c->special == SP_REPEAT)
        for (long t = 0; t < T; t++) {
            ids[t * K] = 2;                       /* local expert 1 gets every token */
            ids[t * K + 1] = 5;                   /* not local */
            if (t % 2 == 0) ids[t * K + 2] = 2;   /* the same expert twice for a token */
        }
    if (c->special == SP_NOTHING_LOCAL)
        for (long p = 0; p < T * K; p++) ids[p] = 2 * (p % 2) + 1;
    if (c->special == SP_NAN_ROW) put(x, (T / 2) * H + 3, NAN, dt);
    if (c->special == SP_BAD_ID) ids[5] = E;
    if (c->special == SP_BAD_MAP) map[2] = (int32_t)L;

    void *out = guarded(es * T * H);
    int guards = 1;
    const int status = call(c, x, ids, tw, map, w13, w2, b13, b2, L, o->threads, out, &guards);
    int ok = status == c->expect && guards, bad = 0;
    double max_err = 0, scale = 0;
    double *ref = malloc(sizeof(double) * (size_t)(T * H + 1));
    char why[200] = "";
    if (status != c->expect) snprintf(why, sizeof why, "status %d, expected %d", status, c->expect);
    else if (!guards) snprintf(why, sizeof why, "a buffer was written past its end");
    if (ok && c->expect == 0) {
        reference(c, x, ids, tw, map, w13, w2, b13, b2, L, ref);
        for (long i = 0; i < T * H; i++)
            if (isfinite(ref[i]) && fabs(ref[i]) > scale) scale = fabs(ref[i]);
        for (long i = 0; i < T * H; i++) {
            const double v = get(out, i, dt), d = fabs(v - ref[i]);
            if (!within(v, ref[i], scale, dt)) {
                if (!bad++) snprintf(why, sizeof why, "out[%ld][%ld] = %.7g, reference %.7g", i / H, i % H, v, ref[i]);
                ok = 0;
            }
            if (d == d && d > max_err) max_err = d;
        }
        /* the same bits with one thread (each output element is summed in a fixed order) */
        if (ok && o->threads > 1 && T > 1) {
            void *one = guarded(es * T * H);
            int g1 = 1;
            call(c, x, ids, tw, map, w13, w2, b13, b2, L, 1, one, &g1);
            if (memcmp(one, out, (size_t)(es * T * H)) != 0 || !g1) {
                ok = 0;
                snprintf(why, sizeof why, "1 thread and %d threads give different results", o->threads);
            }
            free(one);
        }
    }
    if (!ok || o->verbose)
        printf("%s case %d: %s %s%s%s%s T=%ld E=%ld K=%ld H=%ld I=%ld%s: max error %.3g of scale %.3g%s%s\n",
               ok ? "ok" : "FAIL", n, DT_NAMES[dt], ACT_NAMES[c->act], c->bias ? " bias" : "", c->map ? " map" : "",
               c->hbuf_cap ? " groups" : "", T, E, K, H, I, SP_NAMES[c->special], max_err, scale, *why ? ": " : "",
               why);
    if (o->dump && c->expect == 0) {
        char dir[4096];
        snprintf(dir, sizeof dir, "%s/%d", o->dump, n);
        if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
            fprintf(stderr, "fused_cpu_check: cannot create %s\n", dir);
            exit(2);
        }
        float *reff = malloc(sizeof(float) * (size_t)(T * H + 1));
        for (long i = 0; i < T * H; i++) reff[i] = (float)ref[i];
        int w = write_raw(dir, "x.bin", x, es * T * H) | write_raw(dir, "ids.bin", ids, 8 * T * K) |
                write_raw(dir, "tw.bin", tw, 4 * T * K) | write_raw(dir, "w13.bin", w13, es * L * 2 * I * H) |
                write_raw(dir, "w2.bin", w2, es * L * H * I) | write_raw(dir, "ref.bin", reff, 4 * T * H) |
                write_raw(dir, "out.bin", out, es * T * H);
        if (b13) w |= write_raw(dir, "b13.bin", b13, es * L * 2 * I) | write_raw(dir, "b2.bin", b2, es * L * H);
        if (map) w |= write_raw(dir, "map.bin", map, 4 * E);
        char meta[512];
        const int len = snprintf(meta, sizeof meta,
                                 "dtype %s\nactivation %s\nT %ld\nE %ld\nK %ld\nH %ld\nI %ld\nlocal %ld\nbias %d\nmap %d\n"
                                 "alpha %.9g\nlimit %.9g\nok %d\n",
                                 DT_NAMES[dt], ACT_NAMES[c->act], T, E, K, H, I, L, c->bias, c->map, ALPHA, LIMIT, ok);
        w |= write_raw(dir, "meta.txt", meta, len);
        free(reff);
        if (w) {
            fprintf(stderr, "fused_cpu_check: cannot write the files of case %d in %s\n", n, dir);
            exit(2);
        }
    }
    free(ref);
    free(x);
    free(w13);
    free(w2);
    free(b13);
    free(b2);
    free(ids);
    free(tw);
    free(map);
    free(out);
    return ok;
}

static int usage(const char *msg) {
    fprintf(stderr, "fused_cpu_check: %s\nusage: fused_cpu_check [--threads N] [--break WHAT] [--dump DIR] [--case N] [--list] [-v]\n", msg);
    return 2;
}

int main(int argc, char **argv) {
    opts_t o = {2, NULL, 0};
    int only = -1, list = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--threads") && v) {
            char *end;
            o.threads = (int)strtol(v, &end, 10), i++;
            if (*end || o.threads < 1) return usage("--threads needs a number >= 1");
        } else if (!strcmp(a, "--break") && v) {
            broken = -1;
            for (int b = 0; BREAKS[b]; b++)
                if (!strcmp(BREAKS[b], v)) broken = b;
            if (broken < 0) return usage("--break takes none, bias2, up-bias, gelu-tanh, no-clamp, no-weight, gate-up or last-k");
            i++;
        } else if (!strcmp(a, "--dump") && v) {
            o.dump = v, i++;
        } else if (!strcmp(a, "--case") && v) {
            char *end;
            only = (int)strtol(v, &end, 10), i++;
            if (*end || only < 0) return usage("--case needs a case number (see --list)");
        } else if (!strcmp(a, "--list")) {
            list = 1;
        } else if (!strcmp(a, "-v")) {
            o.verbose = 1;
        } else {
            return usage(a);
        }
    }
    if (moe_abi_version() != MOE_ABI_VERSION) {
        printf("FAIL: the core speaks ABI %d, this check %d\n", moe_abi_version(), MOE_ABI_VERSION);
        return 1;
    }
    make_cases();
    if (only >= ncases) return usage("--case is past the last case");
    if (list) {
        for (int n = 0; n < ncases; n++)
            printf("%d %s %s T=%ld H=%ld I=%ld%s\n", n, DT_NAMES[cases[n].dt], ACT_NAMES[cases[n].act], cases[n].T,
                   cases[n].H, cases[n].I, SP_NAMES[cases[n].special]);
        return 0;
    }
    int failed = 0, run = 0;
    for (int n = 0; n < ncases; n++)
        if (only < 0 || n == only) {
            failed += !run_case(n, &cases[n], &o);
            run++;
        }
    printf("%s: %d of %d cases agree with the reference (threads %d%s%s)\n", failed ? "FAIL" : "ok", run - failed, run,
           o.threads, broken ? ", reference broken on purpose: " : "", broken ? BREAKS[broken] : "");
    return failed ? 1 : 0;
}
