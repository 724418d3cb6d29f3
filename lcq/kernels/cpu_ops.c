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

int lcq_half_matmul(const float *x, int M, int K, const uint16_t *w, int N, float *y); /* cpu_half.c */

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
 * block table from caches (blocks, block_size, kv_heads, head_dim). q: (seqs, heads, head_dim) with
 * q_stride floats between sequences; out: (seqs, heads, head_dim) contiguous.
 * Work is split over (sequence, kv head); the query heads sharing a kv head read each K/V row once.
 * A sequence with context length 0 (padding) gets zeros.
 * Returns 0, or -1 when a score buffer cannot be allocated. */
int lcq_decode_attention(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache, const int32_t *block_tables,
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
            const float *queries = q + s * q_stride + (int64_t)kvh * group * head_dim;
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

static void add_bias(float *y, const float *bias, int rows, int width) {
    if (bias == NULL) return;
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < width; i++) y[(int64_t)r * width + i] += bias[i];
}

/* Pointers per layer in the `layers` array of lcq_decode_layers, in this order. */
enum { INPUT_NORM, QKV, QKV_BIAS, O, O_BIAS, POST_NORM, GATE_UP, GATE_UP_BIAS, DOWN, DOWN_BIAS, K_CACHE, V_CACHE,
       POINTERS_PER_LAYER };

/* A whole decode step of a Llama-family model's decoder layers, for sequences of one new token
 * each: the same operations, in the same order and with the same kernels, as the Python
 * layers (lcq/models/llama.py) take on this path, without a Python call per operation. x (rows,
 * hidden) holds the embeddings and receives the residual stream after the last layer (before the
 * final norm). Weights are fp16 (N, K), biases fp32 or NULL. work holds
 * rows * (2 hidden + 2 q width + 2 kv width + 3 intermediate) floats. Returns 0, or -1 on bad sizes
 * or a failed allocation. */
int lcq_decode_layers(void *const *layers, int num_layers, float *x, int rows, int hidden, int heads, int kv_heads,
                      int head_dim, int intermediate, float eps, const float *cos, const float *sin,
                      const int64_t *slots, const int32_t *block_tables, int max_blocks, const int32_t *context_lens,
                      int block_size, float scale, float *work) {
    const int q_width = heads * head_dim, kv_width = kv_heads * head_dim, qkv_width = q_width + 2 * kv_width;
    float *normed = work, *qkv = normed + (int64_t)rows * hidden, *attn = qkv + (int64_t)rows * qkv_width;
    float *projected = attn + (int64_t)rows * q_width, *gate_up = projected + (int64_t)rows * hidden;
    float *activated = gate_up + (int64_t)rows * 2 * intermediate;
    for (int l = 0; l < num_layers; l++) {
        void *const *p = layers + (int64_t)l * POINTERS_PER_LAYER;
        float *k_cache = p[K_CACHE], *v_cache = p[V_CACHE];
        lcq_rms_norm(x, NULL, p[INPUT_NORM], normed, rows, hidden, eps);
        if (lcq_half_matmul(normed, rows, hidden, p[QKV], qkv_width, qkv)) return -1;
        add_bias(qkv, p[QKV_BIAS], rows, qkv_width);
        lcq_rotary(qkv, rows, qkv_width, heads + kv_heads, head_dim, cos, sin);
        lcq_store_kv(qkv + q_width, qkv + q_width + kv_width, qkv_width, k_cache, v_cache, slots, rows, kv_width);
        if (lcq_decode_attention(qkv, qkv_width, k_cache, v_cache, block_tables, max_blocks, context_lens, attn, rows,
                                 heads, kv_heads, head_dim, block_size, scale))
            return -1;
        if (lcq_half_matmul(attn, rows, q_width, p[O], hidden, projected)) return -1;
        add_bias(projected, p[O_BIAS], rows, hidden);
        lcq_rms_norm(projected, x, p[POST_NORM], normed, rows, hidden, eps); /* x += attention output */
        if (lcq_half_matmul(normed, rows, hidden, p[GATE_UP], 2 * intermediate, gate_up)) return -1;
        add_bias(gate_up, p[GATE_UP_BIAS], rows, 2 * intermediate);
        lcq_silu_mul(gate_up, activated, rows, intermediate);
        if (lcq_half_matmul(activated, rows, intermediate, p[DOWN], hidden, projected)) return -1;
        add_bias(projected, p[DOWN_BIAS], rows, hidden);
        for (int64_t i = 0; i < (int64_t)rows * hidden; i++) x[i] += projected[i]; /* x += MLP output */
    }
    return 0;
}
