/* The small fp32 operations of a CPU decode step, one pass over memory each.
 *
 * At batch 1 the matrix products of a small model take less than half of a decode step on a CPU;
 * the rest was torch dispatching five to ten tiny operations per RMSNorm, rotary embedding and
 * SwiGLU, and gathering every cached K/V row into a fresh tensor before attention. These functions
 * do each of those in one call, and attention reads the paged cache where it lies.
 * All tensors are contiguous fp32 unless a stride is given; sums of squares are kept in double.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* out = weight * x / rms(x) per row. With residual: residual += x first and the sum is normalised
 * (the residual stream then holds the sum, as the decoder layer needs). */
void lcq_rms_norm(const float *x, float *residual, const float *weight, float *out, int64_t rows, int dim,
                  float eps) {
#pragma omp parallel for if (rows >= 16)
    for (int64_t r = 0; r < rows; r++) {
        const float *in = x + r * dim;
        float *dst = out + r * dim;
        if (residual != NULL) {
            float *res = residual + r * dim;
            for (int i = 0; i < dim; i++) res[i] += in[i];
            in = res;
        }
        double squares = 0.0;
        for (int i = 0; i < dim; i++) squares += (double)in[i] * in[i];
        const float scale = 1.0f / sqrtf((float)(squares / dim) + eps);
        for (int i = 0; i < dim; i++) dst[i] = weight[i] * (in[i] * scale);
    }
}

/* Rotate the first `heads` heads of every token row in place (the half-split layout): with
 * x = [a, b], x' = [a cos - b sin, b cos + a sin]. cos, sin: (tokens, head_dim / 2). */
void lcq_rotary(float *x, int64_t tokens, int64_t row_stride, int heads, int head_dim, const float *cos,
                const float *sin) {
    const int half = head_dim / 2;
#pragma omp parallel for if (tokens >= 16)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + t * half, *s = sin + t * half;
        for (int h = 0; h < heads; h++) {
            float *a = x + t * row_stride + (int64_t)h * head_dim, *b = a + half;
#pragma omp simd
            for (int i = 0; i < half; i++) {
                const float first = a[i], second = b[i];
                a[i] = first * c[i] - second * s[i];
                b[i] = second * c[i] + first * s[i];
            }
        }
    }
}

/* out (rows, width) = silu(gate) * up for gate_up (rows, 2 * width) = [gate, up]. */
void lcq_silu_mul(const float *gate_up, float *out, int64_t rows, int64_t width) {
#pragma omp parallel for if (rows >= 16)
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = gate_up + r * 2 * width, *up = gate + width;
        float *dst = out + r * width;
        for (int64_t i = 0; i < width; i++) dst[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}

/* Write the new tokens' K and V rows (tokens, kv_width) into their cache slots; slot -1 is skipped. */
void lcq_store_kv(const float *k, const float *v, int64_t row_stride, float *k_cache, float *v_cache,
                  const int64_t *slots, int64_t tokens, int kv_width) {
    for (int64_t t = 0; t < tokens; t++) {
        if (slots[t] < 0) continue;
        float *k_dst = k_cache + slots[t] * kv_width, *v_dst = v_cache + slots[t] * kv_width;
        const float *k_src = k + t * row_stride, *v_src = v + t * row_stride;
        for (int i = 0; i < kv_width; i++) {
            k_dst[i] = k_src[i];
            v_dst[i] = v_src[i];
        }
    }
}

static inline float dot(const float *a, const float *b, int n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* One query token per sequence against its cached tokens 0 .. context_len - 1, read through the
 * block table from caches (blocks, block_size, kv_heads, head_dim). q, out: (seqs, heads, head_dim).
 * Work is split over (sequence, kv head); the query heads sharing a kv head read each K/V row once.
 * A sequence with context length 0 (padding) gets zeros.
 * Returns 0, or -1 when a score buffer cannot be allocated. */
int lcq_decode_attention(const float *q, const float *k_cache, const float *v_cache, const int32_t *block_tables,
                         int max_blocks, const int32_t *context_lens, float *out, int seqs, int heads,
                         int kv_heads, int head_dim, int block_size, float scale) {
    const int group = heads / kv_heads;
    const int64_t row = (int64_t)kv_heads * head_dim;  /* floats per cache slot */
    int failed = 0;
#pragma omp parallel for collapse(2) schedule(dynamic) reduction(| : failed)
    for (int s = 0; s < seqs; s++)
        for (int kvh = 0; kvh < kv_heads; kvh++) {
            const int length = context_lens[s];
            const int32_t *table = block_tables + (int64_t)s * max_blocks;
            const float *queries = q + ((int64_t)s * heads + (int64_t)kvh * group) * head_dim;
            float *outputs = out + ((int64_t)s * heads + (int64_t)kvh * group) * head_dim;
            for (int i = 0; i < group * head_dim; i++) outputs[i] = 0.0f;
            if (length <= 0) continue; /* a padding sequence: zeros */
            float *scores = malloc(sizeof(float) * (size_t)length * group);
            if (scores == NULL) {
                failed = 1;
                continue;
            }
            for (int t = 0; t < length; t++) {
                const int64_t slot = (int64_t)table[t / block_size] * block_size + t % block_size;
                const float *key = k_cache + slot * row + (int64_t)kvh * head_dim;
                for (int g = 0; g < group; g++) scores[g * length + t] = dot(queries + g * head_dim, key, head_dim) * scale;
            }
            for (int g = 0; g < group; g++) {
                float *p = scores + (int64_t)g * length, top = -INFINITY, total = 0.0f;
                for (int t = 0; t < length; t++) top = p[t] > top ? p[t] : top;
                for (int t = 0; t < length; t++) total += (p[t] = expf(p[t] - top));
                for (int t = 0; t < length; t++) p[t] /= total;
            }
            for (int t = 0; t < length; t++) {
                const int64_t slot = (int64_t)table[t / block_size] * block_size + t % block_size;
                const float *value = v_cache + slot * row + (int64_t)kvh * head_dim;
                for (int g = 0; g < group; g++) {
                    const float weight = scores[g * length + t];
                    float *o = outputs + g * head_dim;
#pragma omp simd
                    for (int i = 0; i < head_dim; i++) o[i] += weight * value[i];
                }
            }
            free(scores);
        }
    return failed ? -1 : 0;
}
