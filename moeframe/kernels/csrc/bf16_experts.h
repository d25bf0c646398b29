/* The bf16 grouped-experts entry points of the amx_bf16 and avx512_bf16 variants of
 * moeframe's fused_cpu native core (bf16_experts.c; bound by moeframe/kernels/_bf16_native.py).
 *
 * They compute the experts that fused_cpu hands over for having many tokens, on weights
 * repacked once (moeframe/kernels/bf16_packing.py) into the VNNI layout of AMX B tiles:
 *
 *   w13p[e] = [Ip/16 neuron blocks][2: gate, up][Hp/32 k blocks][16 k pairs][16 neurons][2] bf16
 *   w2p[e]  = [Hp/16 row blocks][Ip/32 k blocks][16 k pairs][16 rows][2] bf16
 *
 * with Hp = H and Ip = I rounded up to multiples of 32 (zeros in the padding): one B tile
 * (16 k pairs x 16 columns, 1 KiB) is contiguous, and so is a column block's whole K run.
 */
#ifndef MOEFRAME_BF16_EXPERTS_H
#define MOEFRAME_BF16_EXPERTS_H

#include <stdint.h>

#include "fused_cpu_abi.h"

/* Which kernels this library holds: 1 (AVX512-BF16 dot products) | 2 (AMX-BF16 tiles). */
MOE_EXPORT int moe_bf16_kernels(void);

/* Asks Linux once for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA);
   1 if AMX may be used in this process, 0 if not (not compiled in, or refused). */
MOE_EXPORT int moe_amx_enable(void);

/* acc[tok[r], :] += tw[r] * (act(x[tok[r]] W13_e^T + b13_e) W2_e^T + b2_e) for every row r of
   every group g (expert experts[g], rows [rows[g], rows[g+1])), groups in order; `use_amx`
   picks the AMX tiles (only after moe_amx_enable() returned 1) or the AVX512-BF16 kernel.
   xg and hbuf are bf16 buffers of hrows[G] rows of Hp and Ip elements, where hrows[g] is
   rows[g] with every group's row count rounded up to a multiple of 16.  Every output
   element is summed by one thread, in group order: the result does not depend on
   nthreads.  Returns 0, or -3 when use_amx is set and AMX is not enabled. */
MOE_EXPORT int moe_bf16_experts(int use_amx, const uint16_t *x, long H, long Hp, const int32_t *tok, const float *tw,
                                const int32_t *experts, const int32_t *rows, const int32_t *hrows, long G,
                                const uint16_t *w13p, const uint16_t *w2p, const uint16_t *b13, const uint16_t *b2,
                                long I, long Ip, int act_kind, float alpha, float limit, float *acc, uint16_t *xg,
                                uint16_t *hbuf, int nthreads);

#endif
