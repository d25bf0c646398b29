/* The C ABI of moeframe's fused_cpu native core: every ISA variant (fused_cpu_<isa>.c)
 * includes this header, so that the compiler checks each definition against these
 * prototypes, and moeframe/kernels/_fused_cpu_native.py binds exactly these (with ctypes
 * argtypes named after the parameters below).  Changing a signature means bumping
 * MOE_ABI_VERSION here and in _fused_cpu_native.py (the loader refuses a mismatch).
 */
#ifndef MOEFRAME_FUSED_CPU_ABI_H
#define MOEFRAME_FUSED_CPU_ABI_H

#include <stdint.h>

#define MOE_ABI_VERSION 1

#define MOE_EXPORT __attribute__((visibility("default")))

/* dtype codes: 0 fp32, 1 bf16, 2 fp16; act_kind: 0 silu, 1 gelu, 2 swigluoai. */

/* MOE_ABI_VERSION of the library. */
MOE_EXPORT int moe_abi_version(void);

/* out[t] = sum_k tw[t,k] * f_{ids[t,k]}(x[t]) over the local experts.  Returns 0, or -1 for
   an expert id outside [0, num_experts), -2 for an expert map entry outside
   [-1, local_experts).  Every buffer is allocated by the caller (sizes below). */
MOE_EXPORT int moe_forward(int dtype, const void *x, long T, long H, const int64_t *ids, const float *tw, long topk,
                           const int32_t *expert_map, long num_experts, const void *w13, const void *w2,
                           const void *b13, const void *b2, long local_experts, long I, int act_kind, float alpha,
                           float limit, void *out, float *acc, int32_t *ints, float *hbuf, long hbuf_slots,
                           float *scratch, long scratch_floats, int nthreads);

/* int32 elements of the `ints` buffer for a call with `pairs` (token, k) pairs. */
MOE_EXPORT long moe_ints_needed(long pairs, long local_experts);

/* hbuf slots (rows of I floats) of the largest work item. */
MOE_EXPORT long moe_item_max_slots(void);

/* floats of scratch per thread for a call of T tokens. */
MOE_EXPORT long moe_scratch_floats(long H, long I, long T);

#endif
