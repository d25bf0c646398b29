/* moeframe fused_cpu: the activations 16 lanes wide (AVX-512 F), shared by the x86 micro-kernels
 * (ukernel_x86.h) and the bf16 experts kernel (bf16_experts.c), so that both compute the same
 * values bit for bit.  The includer defines AI (an always-inline static), act_t ({kind, alpha,
 * limit}) and ACT_SILU / ACT_GELU / ACT_SWIGLUOAI before including it.
 *
 *   exp16      Cephes expf on the clamped range (about 1 ulp); NaN propagates
 *   sigmoid16  1 / (1 + exp(-x))
 *   erf16      Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7), as ATen's vectorised erf
 *   act16      act(g) * u: silu, exact gelu, or GPT-OSS's clamped swigluoai
 */
#ifndef MOEFRAME_ACT_AVX512_H
#define MOEFRAME_ACT_AVX512_H

#include <immintrin.h>

AI __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), x);
    x = _mm512_max_ps(_mm512_set1_ps(-88.3762626647949f), x);
    __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                     _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 y = _mm512_set1_ps(1.9875691500E-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), x);
    y = _mm512_add_ps(y, _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

AI __m512 sigmoid16(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

AI __m512 erf16(__m512 x) { /* Abramowitz-Stegun 7.1.26, as erf8 */
    const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u));
    const __m512 a = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), sign));
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), a, one));
    __m512 r = _mm512_set1_ps(1.061405429f);
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-1.453152027f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(1.421413741f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-0.284496736f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(0.254829592f));
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
    const __m512 y = _mm512_fnmadd_ps(_mm512_mul_ps(r, t), e, one);
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(y), sign));
}

AI __m512 act16(__m512 g, __m512 u, act_t act) {
    if (act.kind == ACT_SILU) return _mm512_mul_ps(_mm512_mul_ps(g, sigmoid16(g)), u);
    if (act.kind == ACT_GELU) {
        const __m512 half = _mm512_set1_ps(0.5f);
        __m512 c = _mm512_add_ps(_mm512_set1_ps(1.0f), erf16(_mm512_mul_ps(g, _mm512_set1_ps(0.70710678118654752f))));
        return _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(g, half), c), u);
    }
    const __m512 lim = _mm512_set1_ps(act.limit);
    g = _mm512_min_ps(lim, g);
    u = _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), lim), _mm512_min_ps(lim, u));
    __m512 s = sigmoid16(_mm512_mul_ps(_mm512_set1_ps(act.alpha), g));
    return _mm512_mul_ps(_mm512_add_ps(u, _mm512_set1_ps(1.0f)), _mm512_mul_ps(g, s));
}

#endif /* MOEFRAME_ACT_AVX512_H */
