/* exp for the C kernels' softmax (cpu_decode_attention.c, cpu_prefill_attention.c), SwiGLU and GeGLU (cpu_ops.c,
 * cpu_gemm.c): AVX2, and AVX-512 for the products' SwiGLU. */
#ifndef LCQ_CPU_EXP_H
#define LCQ_CPU_EXP_H

#include <immintrin.h>

#define LCQ_EXP16 __attribute__((target("avx512f")))

/* e^x = 2^n e^r in vectors of W bits (256: AVX2, 512: AVX-512), x clamped and n = round(x log2 e):
 * |r| <= ln 2 / 2, e^r by a degree-6 polynomial (Cephes' expf coefficients; within 2 ulp of expf). */
#define LCQ_EXP_SCALED(ATTR, W)                                                                               \
    ATTR static inline __m##W exp_scaled##W(__m##W x, __m##W n) {                                             \
        __m##W r = _mm##W##_fnmadd_ps(n, _mm##W##_set1_ps(0.693359375f), x); /* ln 2 in two parts: r exact */ \
        r = _mm##W##_fnmadd_ps(n, _mm##W##_set1_ps(-2.12194440e-4f), r);                                     \
        __m##W y = _mm##W##_set1_ps(1.9875691500e-4f);                                                        \
        y = _mm##W##_fmadd_ps(y, r, _mm##W##_set1_ps(1.3981999507e-3f));                                      \
        y = _mm##W##_fmadd_ps(y, r, _mm##W##_set1_ps(8.3334519073e-3f));                                      \
        y = _mm##W##_fmadd_ps(y, r, _mm##W##_set1_ps(4.1665795894e-2f));                                      \
        y = _mm##W##_fmadd_ps(y, r, _mm##W##_set1_ps(1.6666665459e-1f));                                      \
        y = _mm##W##_fmadd_ps(y, r, _mm##W##_set1_ps(5.0000001201e-1f));                                      \
        y = _mm##W##_fmadd_ps(_mm##W##_mul_ps(y, r), r, _mm##W##_add_ps(r, _mm##W##_set1_ps(1.0f)));         \
        const __m##W##i exponent =                                                                            \
            _mm##W##_slli_epi32(_mm##W##_add_epi32(_mm##W##_cvtps_epi32(n), _mm##W##_set1_epi32(127)), 23);     \
        return _mm##W##_mul_ps(y, _mm##W##_castsi##W##_ps(exponent));                                         \
    }
LCQ_EXP_SCALED(, 256)
LCQ_EXP_SCALED(LCQ_EXP16, 512)

/* exp of 8 floats at once. Inputs above 88.3 give e^88.3, and below -87.3 zero, not the subnormals expf
 * gives there (down to -103.3): a subnormal operand or result costs the core a microcode assist of about
 * a hundred cycles, and they spread through what multiplies them (a softmax's weights times values).
 * libm's expf is one call per value: at 64 sequences it took a third of decode attention's arithmetic
 * (softmax) and most of SwiGLU's. */
static inline __m256 exp8(__m256 x) {
    const __m256 kept = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3f)), _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_and_ps(exp_scaled256(x, n), kept);
}

/* exp8 on 16 floats (AVX-512): the same value in every lane. */
LCQ_EXP16 static inline __m512 exp16(__m512 x) {
    const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3f)), _mm512_set1_ps(-87.3f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_maskz_mov_ps(kept, exp_scaled512(x, n));
}

/* e^(x - top) for softmax weights, x <= top (x -inf, or NaN: 0): 2^n 2^r with t = x log2 e - top log2 e (one
 * FMA), n = round(t), r = t - n, 2^r by a degree-5 polynomial fitted for relative error on |r| <= 1/2 (2.2e-7,
 * about 2 ulp), 2^n applied by vscalefps; zero below e^-87.3, as exp16. Eleven operations where exp16 and the
 * subtraction take twenty: prefill attention's bf16 tiles round these weights to bf16 at once, and spent a third
 * of their time in exp16. Within a few ulp of exp16 near the top (t's rounding, about 6e-8 |t|, adds to it for
 * far-off keys). */
LCQ_EXP16 static inline __m512 exp16_weights(__m512 x, float top) {
    const float log2e = 1.44269504088896341f;
    const __m512 t = _mm512_fmsub_ps(x, _mm512_set1_ps(log2e), _mm512_set1_ps(top * log2e));
    const __mmask16 kept = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-87.3f * log2e), _CMP_GE_OQ);
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(t, n);
    __m512 y = _mm512_set1_ps(1.3266970636e-3f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(9.6754599362e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.5507425219e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(2.4022121727e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(6.9314694405e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0000001192f));
    return _mm512_maskz_scalef_ps(kept, y, n);
}

/* The same for one value (loop tails), so that every element of a row is computed alike. */
static inline float exp1(float x) {
    return _mm256_cvtss_f32(exp8(_mm256_set1_ps(x)));
}

/* sigmoid(g) = 1 / (1 + e^-g) of 8 floats, with e^-g taken at most e^80: below g = -80 the sigmoid
 * stays 1.8e-35 (a normal float) instead of falling to subnormals past g = -87.3 (exp8), which made
 * SwiGLU of such gates ten times slower; silu(g) there is within 1e-32 of its value either way. */
static inline __m256 sigmoid8(__m256 g) {
    const __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), g),
                                                                     _mm256_set1_ps(80.0f)))));
}

/* out[i] = silu(gate[i]) * up[i] for `width` values: every element computed alike (vector lanes or
 * the tail), so a row gives the same values whole or in pieces. */
static inline void lcq_silu_mul_row(const float *gate, const float *up, float *out, int64_t width) {
    int64_t i = 0;
    for (; i + 8 <= width; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid8(g)), _mm256_loadu_ps(up + i)));
    }
    for (; i < width; i++) out[i] = gate[i] * _mm256_cvtss_f32(sigmoid8(_mm256_set1_ps(gate[i]))) * up[i];
}

/* lcq_silu_mul_row on AVX-512 (its callers' products, where the CPU has it): the same values bit for bit,
 * 1.3x as fast (a microbenchmark of 32-wide rows in L1: 0.36 against 0.46 ns a value). */
LCQ_EXP16 static inline void lcq_silu_mul_row16(const float *gate, const float *up, float *out, int64_t width) {
    const __m512 one = _mm512_set1_ps(1.0f), cap = _mm512_set1_ps(80.0f);
    for (int64_t i = 0; i < width; i += 16) {
        const __mmask16 lanes = width - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (width - i)) - 1);
        const __m512 g = _mm512_maskz_loadu_ps(lanes, gate + i);
        const __m512 e = exp16(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), g), cap));
        const __m512 silu = _mm512_mul_ps(g, _mm512_div_ps(one, _mm512_add_ps(one, e)));
        _mm512_mask_storeu_ps(out + i, lanes, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(lanes, up + i)));
    }
}

/* MLP activations: gated (lcq_gated_mul; cpu_ops.py's ACTIVATIONS), then ungated (lcq_ungated; its UNGATED) */
enum { LCQ_SILU, LCQ_GELU_TANH, LCQ_SWIGLU_OAI, LCQ_RELU2, LCQ_XIELU };

/* gelu(x) with tanh's approximation, 0.5 x (1 + tanh(u)) for u = sqrt(2 / pi) (x + 0.044715 x^3), as
 * x / (1 + e^(-2u)): the same function without tanh's rounding near -1, where 1 + tanh(u) cancels. */
static inline __m256 gelu_tanh8(__m256 x) {
    const __m256 twice_scale = _mm256_set1_ps(-2.0f * 0.7978845608028654f); /* -2 sqrt(2 / pi) */
    const __m256 cubic = _mm256_fmadd_ps(_mm256_mul_ps(x, x), _mm256_set1_ps(0.044715f), _mm256_set1_ps(1.0f));
    const __m256 e = exp8(_mm256_mul_ps(_mm256_mul_ps(x, cubic), twice_scale));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

/* out[i] = gelu_tanh(gate[i]) * up[i] (Gemma's GeGLU), every element computed alike as above. */
static inline void lcq_gelu_tanh_mul_row(const float *gate, const float *up, float *out, int64_t width) {
    int64_t i = 0;
    for (; i + 8 <= width; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(gelu_tanh8(_mm256_loadu_ps(gate + i)), _mm256_loadu_ps(up + i)));
    for (; i < width; i++) out[i] = _mm256_cvtss_f32(gelu_tanh8(_mm256_set1_ps(gate[i]))) * up[i];
}

#endif
