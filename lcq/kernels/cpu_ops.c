/* The small fp32 operations of a CPU step, one pass over memory each: norms, the rotary embedding, activations
 * and gates, and writing K/V rows into the paged cache.
 *
 * At batch 1 the matrix products of a small model take less than half of a decode step on a CPU; the rest was
 * torch dispatching five to ten tiny operations per RMSNorm, rotary embedding and SwiGLU, and gathering every
 * cached K/V row into a fresh tensor before attention. These functions do each of those in one call (attention
 * reads the paged cache where it lies: cpu_decode_attention.c), and lcq_decode_layers (cpu_decode_step.c) runs
 * them for a whole decode step.
 * All tensors are contiguous fp32 unless a stride is given; sums of squares are kept in double.
 */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_cache.h"
#include "cpu_exp.h"
#include "cpu_ops.h"

/* dst = weight * in / rms(in) for one vector of dim values; dst may be in. */
static inline void norm_vector(const float *in, const float *weight, float *dst, int dim, float eps) {
    double squares = 0.0;
#pragma omp simd reduction(+ : squares) /* in vector lanes: one serial chain of adds took 3% of prefill */
    for (int i = 0; i < dim; i++) squares += (double)in[i] * in[i];
    const float scale = 1.0f / sqrtf((float)(squares / dim) + eps);
    for (int i = 0; i < dim; i++) dst[i] = weight[i] * (in[i] * scale);
}

/* dst = weight * (in - mean) / std + bias (bias NULL: none) for one vector of dim values, mean and variance in
 * double (LayerNorm: Cohere, StableLM); dst may be in. */
static inline void centred_norm_vector(const float *in, const float *weight, const float *bias, float *dst, int dim,
                                       float eps) {
    double sum = 0.0, squares = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < dim; i++) sum += in[i];
    const float mean = (float)(sum / dim);
#pragma omp simd reduction(+ : squares)
    for (int i = 0; i < dim; i++) squares += (double)(in[i] - mean) * (in[i] - mean);
    const float scale = 1.0f / sqrtf((float)(squares / dim) + eps);
    for (int i = 0; i < dim; i++) dst[i] = weight[i] * ((in[i] - mean) * scale) + (bias != NULL ? bias[i] : 0.0f);
}

/* out = the norm of x per row: weight * x / rms(x), or where centred weight * (x - mean) / std + bias (a
 * LayerNorm; bias may be NULL). With residual: residual += x first and the sum is normalised (the residual
 * stream then holds the sum, as the decoder layer needs). */
void lcq_norm(const float *x, float *residual, const float *weight, const float *bias, float *out, int64_t rows,
              int dim, float eps, int centred) {
#pragma omp parallel for if (rows >= 16)
    for (int64_t r = 0; r < rows; r++) {
        const float *in = x + r * dim;
        if (residual != NULL) {
            float *res = residual + r * dim;
            for (int i = 0; i < dim; i++) res[i] += in[i];
            in = res;
        }
        if (centred)
            centred_norm_vector(in, weight, bias, out + r * dim, dim, eps);
        else
            norm_vector(in, weight, out + r * dim, dim, eps);
    }
}

/* lcq_norm's RMSNorm. */
void lcq_rms_norm(const float *x, float *residual, const float *weight, float *out, int64_t rows, int dim,
                  float eps) {
    lcq_norm(x, residual, weight, NULL, out, rows, dim, eps, 0);
}

/* Normalise, in place, each of the first `heads` heads of every token row (RMSNorm, or where centred LayerNorm)
 * times head_dim weights: the same for every head (weight_stride 0: Qwen3's q_norm and k_norm), or head h's at
 * weight + h weight_stride (Command R+'s). */
void lcq_head_norm(float *x, int64_t tokens, int64_t row_stride, int heads, int head_dim, const float *weight,
                   int weight_stride, float eps, int centred) {
#pragma omp parallel for if (tokens >= 16)
    for (int64_t t = 0; t < tokens; t++)
        for (int h = 0; h < heads; h++) {
            float *head = x + t * row_stride + (int64_t)h * head_dim;
            const float *w = weight + (int64_t)h * weight_stride;
            if (centred)
                centred_norm_vector(head, w, NULL, head, head_dim, eps);
            else
                norm_vector(head, w, head, head_dim, eps);
        }
}

/* Rotate the first `heads` heads of every token row in place, their first `rotated` dimensions (all of
 * head_dim, or a partial rotary embedding's: Qwen3.5's quarter): pair i is (a_i, b_i) = (x_i, x_{i + rotated/2})
 * (the half-split layout) or, interleaved (GLM-4-0414), (x_{2i}, x_{2i + 1}); a' = a cos - b sin,
 * b' = b cos + a sin. cos, sin: rows of rotated / 2 values, token t taking row positions[t] (a model's
 * whole table: the one-call decode step), or row t without positions. */
void lcq_rotary(float *x, int64_t tokens, int64_t row_stride, int heads, int head_dim, int rotated, const float *cos,
                const float *sin, const int64_t *positions, int interleaved) {
    const int half = rotated / 2;
#pragma omp parallel for if (tokens >= 16)
    for (int64_t t = 0; t < tokens; t++) {
        const int64_t row = positions != NULL ? positions[t] : t;
        const float *c = cos + row * half, *s = sin + row * half;
        for (int h = 0; h < heads; h++) {
            float *a = x + t * row_stride + (int64_t)h * head_dim, *b = a + half;
            if (interleaved) {
                for (int i = 0; i < half; i++) {
                    const float first = a[2 * i], second = a[2 * i + 1];
                    a[2 * i] = first * c[i] - second * s[i];
                    a[2 * i + 1] = second * c[i] + first * s[i];
                }
                continue;
            }
#pragma omp simd
            for (int i = 0; i < half; i++) {
                const float first = a[i], second = b[i];
                a[i] = first * c[i] - second * s[i];
                b[i] = second * c[i] + first * s[i];
            }
        }
    }
}

/* out (rows, width) = act(gate) * up for gate_up (rows, 2 * width) = [gate, up]: SwiGLU (LCQ_SILU),
 * Gemma's GeGLU (LCQ_GELU_TANH), or gpt-oss's clamped SwiGLU (LCQ_SWIGLU_OAI, factors (alpha, limit)): the gate
 * capped at limit, up clamped to +-limit, then gate * sigmoid(alpha * gate) * (up + 1). */
void lcq_gated_mul(const float *gate_up, float *out, int64_t rows, int64_t width, int activation,
                   const float *factors) {
#pragma omp parallel for if (rows >= 16)
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = gate_up + r * 2 * width, *up = gate + width;
        if (activation == LCQ_SWIGLU_OAI)
            for (int64_t i = 0; i < width; i++) {
                const float g = fminf(gate[i], factors[1]), u = fminf(fmaxf(up[i], -factors[1]), factors[1]);
                out[r * width + i] = g * (1.0f / (1.0f + expf(-factors[0] * g))) * (u + 1.0f);
            }
        else if (activation == LCQ_GELU_TANH)
            lcq_gelu_tanh_mul_row(gate, up, out + r * width, width);
        else
            lcq_silu_mul_row(gate, up, out + r * width, width);
    }
}

/* out (rows, width) = act(x) for an MLP without a gate (x: up_proj's output): Nemotron-H's and Arcee's relu(x)^2
 * (LCQ_RELU2), or Apertus's xIELU (LCQ_XIELU) with factors (alpha_p, alpha_n, beta, eps), its learned alphas
 * already through their softplus: alpha_p x^2 + beta x for x > 0, else alpha_n (expm1(min(x, eps)) - x) + beta x.
 * out may be x. */
void lcq_ungated(const float *x, float *out, int64_t rows, int64_t width, int activation, const float *factors) {
#pragma omp parallel for if (rows >= 16)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = r * width; i < (r + 1) * width; i++) {
            const float v = x[i];
            if (activation == LCQ_RELU2) {
                const float positive = v > 0.0f ? v : 0.0f;
                out[i] = positive * positive;
            } else {
                const float linear = factors[2] * v;
                out[i] = v > 0.0f ? factors[0] * v * v + linear
                                  : (expm1f(fminf(v, factors[3])) - v) * factors[1] + linear;
            }
        }
}

/* x (rows, heads, head_dim) *= sigmoid(gate) per value, in place; gate's head h of row r at gate + r * row_stride +
 * h * head_stride (Qwen3.5's attention output gate, read where q_proj's output holds it). */
void lcq_sigmoid_gate(float *x, const float *gate, int64_t rows, int heads, int head_dim, int64_t row_stride,
                      int64_t head_stride) {
#pragma omp parallel for if (rows >= 16)
    for (int64_t r = 0; r < rows; r++)
        for (int h = 0; h < heads; h++) {
            float *out = x + (r * heads + h) * head_dim;
            const float *g = gate + r * row_stride + h * head_stride;
            for (int i = 0; i < head_dim; i++) out[i] *= 1.0f / (1.0f + expf(-g[i]));
        }
}

#define HALF_MAX 65504.0f /* the largest finite fp16 */
#define TINY_TOP 0x1p-120f /* below this largest |v| (subnormal or nearly), 127 / max |v| overflows fp32 */
#define TINY_BOOST 0x1p64f /* ... so such a row is scaled by 2^64 first (exact) */

/* One head row as int8 (cpu_cache.h): q = round(v * 127 / max |v|) to nearest even, then the scale
 * max |v| / 127 (a row of zeros: scale 0). As in the fp16 cache, +-inf saturate (at +-FLT_MAX: q = +-127,
 * the scale one step below FLT_MAX / 127 so that 127 times it stays finite) rather than making the scale
 * inf and the rest of the row NaN, and a NaN stays NaN: a row holding one gets a NaN scale, so it reads
 * back as NaN, as from an fp32 cache (its bytes are the other values' as usual, and -128 for the NaN).
 * A row whose max |v| is below 2^-120 is scaled by 2^64 before it is multiplied by 127 / (2^64 max |v|):
 * the same formula, without 127 / max |v| overflowing to inf. */
static void store_int8_head(int8_t *dst, const float *src, int head_dim) {
    const __m256 sign = _mm256_set1_ps(-0.0f), most = _mm256_set1_ps(FLT_MAX), least = _mm256_set1_ps(-FLT_MAX);
    __m256 largest = _mm256_setzero_ps(), unordered = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= head_dim; i += 8) {
        const __m256 x = _mm256_loadu_ps(src + i);
        unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        /* min(most, NaN) is NaN and max(NaN, largest) is largest (MINPS/MAXPS return the second operand
         * where one is NaN): NaN drops out of the maximum, inf counts as FLT_MAX */
        largest = _mm256_max_ps(_mm256_min_ps(most, _mm256_andnot_ps(sign, x)), largest);
    }
    float lanes[8], top = 0.0f;
    int has_nan = _mm256_movemask_ps(unordered) != 0;
    _mm256_storeu_ps(lanes, largest);
    for (int j = 0; j < 8; j++) top = lanes[j] > top ? lanes[j] : top;
    for (int j = i; j < head_dim; j++) {
        const float magnitude = fabsf(src[j]) > FLT_MAX ? FLT_MAX : fabsf(src[j]);
        top = magnitude > top ? magnitude : top; /* false for NaN */
        has_nan |= src[j] != src[j];
    }
    const float boost = top < TINY_TOP ? TINY_BOOST : 1.0f;
    const float inverse = top > 0.0f ? 127.0f / (top * boost) : 0.0f, rounded = top / 127.0f;
    /* one step down where 127 times it would round to inf (max |v| within half a step of FLT_MAX) */
    const float scale = has_nan ? NAN : 127.0f * rounded > FLT_MAX ? nextafterf(rounded, 0.0f) : rounded;
    const __m256 boosts = _mm256_set1_ps(boost), inverses = _mm256_set1_ps(inverse);
    for (i = 0; i + 8 <= head_dim; i += 8) {
        /* max(least, min(most, x)) keeps NaN, which converts to 0x80000000 and packs to -128 */
        const __m256 x = _mm256_max_ps(least, _mm256_min_ps(most, _mm256_loadu_ps(src + i)));
        const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(x, boosts), inverses));
        const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        _mm_storel_epi64((__m128i *)(dst + i), _mm_packs_epi16(words, words));
    }
    for (; i < head_dim; i++) {
        const float x = src[i] > FLT_MAX ? FLT_MAX : src[i] < -FLT_MAX ? -FLT_MAX : src[i];
        const int q = _mm_cvtss_si32(_mm_set_ss(x * boost * inverse)); /* within +-127, or INT_MIN for NaN */
        dst[i] = (int8_t)(q < -128 ? -128 : q);                      /* saturated, as the packs above */
    }
    memcpy(dst + head_dim, &scale, sizeof scale);
}

/* Caches hold fp32, fp16 for half the memory and bytes read per step, or int8 with a scale per head
 * row for about a quarter (cpu_cache.h). fp16 values past its range saturate at +-HALF_MAX (as the
 * torch path does) instead of becoming inf, which would turn the sequence's attention into NaN; NaN
 * stays NaN (as in the torch path and an fp32 cache: a model gone NaN fails the same with every cache). */
static void store_row(void *cache, int64_t slot, const float *src, int kv_heads, int head_dim, int form) {
    const int width = kv_heads * head_dim;
    if (form == LCQ_CACHE_INT8) {
        const int stride = lcq_cache_head_stride(form, head_dim);
        for (int h = 0; h < kv_heads; h++)
            store_int8_head((int8_t *)cache + (slot * kv_heads + h) * stride, src + h * head_dim, head_dim);
        return;
    }
    if (form == LCQ_CACHE_FP32) {
        float *dst = (float *)cache + slot * width;
        for (int i = 0; i < width; i++) dst[i] = src[i];
        return;
    }
    uint16_t *dst = (uint16_t *)cache + slot * width;
    const __m256 high = _mm256_set1_ps(HALF_MAX), low = _mm256_set1_ps(-HALF_MAX);
    int i = 0;
    for (; i + 8 <= width; i += 8) {
        /* this operand order keeps NaN: MINPS/MAXPS return their second operand where one is NaN */
        const __m256 values = _mm256_max_ps(low, _mm256_min_ps(high, _mm256_loadu_ps(src + i)));
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < width; i++) {
        const float value = src[i] > HALF_MAX ? HALF_MAX : src[i] < -HALF_MAX ? -HALF_MAX : src[i];
        dst[i] = _cvtss_sh(value, _MM_FROUND_TO_NEAREST_INT);
    }
}

/* Write the new tokens' K and V rows (tokens, kv_heads * head_dim) into their cache slots; slot -1 is
 * skipped. */
void lcq_store_kv(const float *k, const float *v, int64_t row_stride, void *k_cache, void *v_cache,
                  const int64_t *slots, int64_t tokens, int kv_heads, int head_dim, int cache_form) {
/* Distinct slots, so the rows go in parallel from 16 tokens: a decode step's rows land in blocks all over the
 * pool, and each thread's stores wait on their lines (the Xeon guest, fp16 caches, 30 layers' caches of 4,000
 * blocks: 64 tokens 14.8 -> 9.4 us a call through cpu_ops.store_kv). Serial, a prefill step spent 1.1% here. */
#pragma omp parallel for if (tokens >= 16)
    for (int64_t t = 0; t < tokens; t++) {
        if (slots[t] < 0) continue;
        store_row(k_cache, slots[t], k + t * row_stride, kv_heads, head_dim, cache_form);
        store_row(v_cache, slots[t], v + t * row_stride, kv_heads, head_dim, cache_form);
    }
}
