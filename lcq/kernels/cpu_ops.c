/* The small fp32 operations of a CPU decode step, one pass over memory each.
 *
 * At batch 1 the matrix products of a small model take less than half of a decode step on a CPU;
 * the rest was torch dispatching five to ten tiny operations per RMSNorm, rotary embedding and
 * SwiGLU, and gathering every cached K/V row into a fresh tensor before attention. These functions
 * do each of those in one call, and attention reads the paged cache where it lies.
 * All tensors are contiguous fp32 unless a stride is given; sums of squares are kept in double.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_constant.h"

int lcq_half_matmul(const float *x, int M, int K, const uint16_t *w, int N, float *y); /* cpu_half.c */
int lcq_index_matmul(const float *x, int M, const void *w, float *y);                   /* cpu_index.c */

/* exp of 8 floats at once (AVX2): e^x = 2^n e^r with n = round(x log2 e), |r| <= ln 2 / 2, e^r by a
 * degree-6 polynomial (Cephes' expf coefficients; within 2 ulp of expf). Inputs are clamped to
 * [-87.3, 88.3], so very negative ones give about 1e-38 instead of 0. libm's expf is one call per
 * value: at 64 sequences it took a third of decode attention's arithmetic (softmax) and most of SwiGLU's. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3f)), _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln 2 in two parts: r exact */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(_mm256_mul_ps(y, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(exponent));
}

/* The same for one value (loop tails), so that every element of a row is computed alike. */
static inline float exp1(float x) {
    return _mm256_cvtss_f32(exp8(_mm256_set1_ps(x)));
}

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
        int64_t i = 0;
        for (; i + 8 <= width; i += 8) {
            const __m256 g = _mm256_loadu_ps(gate + i), one = _mm256_set1_ps(1.0f);
            const __m256 sigmoid = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
            _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), _mm256_loadu_ps(up + i)));
        }
        for (; i < width; i++) dst[i] = gate[i] * (1.0f / (1.0f + exp1(-gate[i]))) * up[i];
    }
}

/* Caches hold fp32, or fp16 (half_cache) for half the memory and bytes read per step. */
static void store_row(void *cache, int64_t slot, const float *src, int width, int half_cache) {
    if (!half_cache) {
        float *dst = (float *)cache + slot * width;
        for (int i = 0; i < width; i++) dst[i] = src[i];
        return;
    }
    uint16_t *dst = (uint16_t *)cache + slot * width;
    int i = 0;
    for (; i + 8 <= width; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < width; i++) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

/* Write the new tokens' K and V rows (tokens, kv_width) into their cache slots; slot -1 is skipped. */
void lcq_store_kv(const float *k, const float *v, int64_t row_stride, void *k_cache, void *v_cache,
                  const int64_t *slots, int64_t tokens, int kv_width, int half_cache) {
    for (int64_t t = 0; t < tokens; t++) {
        if (slots[t] < 0) continue;
        store_row(k_cache, slots[t], k + t * row_stride, kv_width, half_cache);
        store_row(v_cache, slots[t], v + t * row_stride, kv_width, half_cache);
    }
}

/* Cache values as fp32, from an fp32 or (HALF) an fp16 cache: 8 at element i, or one. Inlined with
 * HALF a constant, so attention reads an fp16 cache where it lies, converting as it loads (converting
 * each block into a scratch buffer first cost a write and a read of every value). */
static inline __attribute__((always_inline)) __m256 load8(const int HALF, const void *cache, int64_t i) {
    return HALF ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)cache + i)))
                : _mm256_loadu_ps((const float *)cache + i);
}

static inline __attribute__((always_inline)) float load1(const int HALF, const void *cache, int64_t i) {
    return HALF ? _cvtsh_ss(((const uint16_t *)cache)[i]) : ((const float *)cache)[i];
}

/* The 8 horizontal sums of a[0..7] as one vector: three rounds of pairwise adds, then the halves. */
static inline __m256 sums8(const __m256 *a) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* scores[t] = scale * (query . key row t) for `count` cache rows from element `first` (row stride
 * `stride`): 8 rows at a time, each row's products summed across the head in its own register and
 * the 8 sums reduced together (one horizontal sum per row cost more than the products). */
static inline __attribute__((always_inline)) void score_rows(const int HALF, const float *query, const void *cache,
                                                             int64_t first, int64_t stride, int count, int head_dim,
                                                             float scale, float *scores) {
    const int vectors = head_dim / 8;
    int t = 0;
    for (; t + 8 <= count; t += 8) {
        __m256 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
        for (int d = 0; d < vectors; d++) {
            const __m256 q = _mm256_loadu_ps(query + 8 * d);
            for (int j = 0; j < 8; j++)
                acc[j] = _mm256_fmadd_ps(q, load8(HALF, cache, first + (t + j) * stride + 8 * d), acc[j]);
        }
        __m256 sums = sums8(acc);
        for (int i = 8 * vectors; i < head_dim; i++) { /* head sizes that are not a multiple of 8 */
            float tail[8];
            for (int j = 0; j < 8; j++) tail[j] = query[i] * load1(HALF, cache, first + (t + j) * stride + i);
            sums = _mm256_add_ps(sums, _mm256_loadu_ps(tail));
        }
        _mm256_storeu_ps(scores + t, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
    }
    for (; t < count; t++) {
        float sum = 0.0f;
        for (int i = 0; i < head_dim; i++) sum += query[i] * load1(HALF, cache, first + t * stride + i);
        scores[t] = sum * scale;
    }
}

/* out[0 .. V*8) += sum over `count` cache rows t from element `first` of weights[t] * row t, the V
 * output vectors held in registers over all rows. Inlined with V and HALF constants. */
static inline __attribute__((always_inline)) void weigh_rows(const int V, const int HALF, const float *weights,
                                                             const void *cache, int64_t first, int64_t stride,
                                                             int count, float *out) {
    __m256 acc[8];
    for (int v = 0; v < V; v++) acc[v] = _mm256_loadu_ps(out + 8 * v);
    for (int t = 0; t < count; t++) {
        const __m256 weight = _mm256_broadcast_ss(weights + t);
        for (int v = 0; v < V; v++)
            acc[v] = _mm256_fmadd_ps(weight, load8(HALF, cache, first + t * stride + 8 * v), acc[v]);
    }
    for (int v = 0; v < V; v++) _mm256_storeu_ps(out + 8 * v, acc[v]);
}

/* out (head_dim) += sum over rows of weights[t] * row t: the head in pieces of up to 8 vectors (64
 * values) in registers, then the values past the last whole vector. */
static inline __attribute__((always_inline)) void weigh_head(const int HALF, const float *weights, const void *cache,
                                                             int64_t first, int64_t stride, int count, int head_dim,
                                                             float *out) {
#define WEIGH(V) weigh_rows(V, HALF, weights, cache, first + i, stride, count, out + i)
    int i = 0;
    for (; i + 64 <= head_dim; i += 64) WEIGH(8);
    switch ((head_dim - i) / 8) {
        LCQ_CASES_1_TO_7(WEIGH)
        default: break;
    }
#undef WEIGH
    for (i += (head_dim - i) / 8 * 8; i < head_dim; i++)
        for (int t = 0; t < count; t++) out[i] += weights[t] * load1(HALF, cache, first + t * stride + i);
}

/* A task of lcq_decode_attention: the query heads first_head .. first_head + task_heads - 1 of one
 * sequence (whole GQA groups, from kv head first_kv) over its cached tokens, a cache block at a time:
 * each block's K rows give all heads' scores, and after the softmax each block's V rows are weighed
 * into all heads' outputs. Inlined with HALF (an fp16 cache) a constant. */
static inline __attribute__((always_inline)) int attend_task(const int HALF, const float *queries, const void *k_cache,
                                                             const void *v_cache, const int32_t *table, int length,
                                                             float *outputs, int task_heads, int first_kv, int group,
                                                             int64_t row, int head_dim, int block_size, float scale) {
    for (int i = 0; i < task_heads * head_dim; i++) outputs[i] = 0.0f;
    if (length <= 0) return 0; /* a padding sequence: zeros */
    float *scores = malloc(sizeof(float) * (size_t)length * task_heads);
    if (scores == NULL) return -1;
    const int64_t offset = (int64_t)first_kv * head_dim;
    for (int start = 0; start < length; start += block_size) { /* block by block: no division per token */
        const int count = (start + block_size < length ? start + block_size : length) - start;
        const int64_t first = (int64_t)table[start / block_size] * block_size * row + offset;
        for (int h = 0; h < task_heads; h++)
            score_rows(HALF, queries + h * head_dim, k_cache, first + (h / group) * head_dim, row, count, head_dim,
                       scale, scores + (int64_t)h * length + start);
    }
    for (int h = 0; h < task_heads; h++) {
        float *p = scores + (int64_t)h * length, top = -INFINITY, total = 0.0f;
        for (int t = 0; t < length; t++) top = p[t] > top ? p[t] : top;
        __m256 sums = _mm256_setzero_ps();
        int t = 0;
        for (; t + 8 <= length; t += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), _mm256_set1_ps(top)));
            _mm256_storeu_ps(p + t, e);
            sums = _mm256_add_ps(sums, e);
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, sums);
        for (int i = 0; i < 8; i++) total += lanes[i];
        for (; t < length; t++) total += (p[t] = exp1(p[t] - top));
        const float inverse = 1.0f / total;
        for (t = 0; t < length; t++) p[t] *= inverse;
    }
    for (int start = 0; start < length; start += block_size) {
        const int count = (start + block_size < length ? start + block_size : length) - start;
        const int64_t first = (int64_t)table[start / block_size] * block_size * row + offset;
        for (int h = 0; h < task_heads; h++)
            weigh_head(HALF, scores + (int64_t)h * length + start, v_cache, first + (h / group) * head_dim, row, count,
                       head_dim, outputs + (int64_t)h * head_dim);
    }
    free(scores);
    return 0;
}

/* From this many sequences a task takes all kv heads of a sequence, so each cache row is read whole,
 * front to back, rather than one kv head's slice per task (64 sequences of 300 tokens, SmolLM2's 3 kv
 * heads, cache from memory, 2 threads: 4.7 -> 2.9 ms per layer). Fewer sequences are split by kv
 * head too, to keep every thread busy. */
#define WHOLE_ROW_MIN_SEQS 8

/* One query token per sequence against its cached tokens 0 .. context_len - 1, read through the
 * block table from caches (blocks, block_size, kv_heads, head_dim), fp32 or fp16 (half_cache).
 * q: (seqs, heads, head_dim) with q_stride floats between sequences; out: (seqs, heads, head_dim)
 * contiguous.
 * The query heads sharing a kv head read each K/V row once.
 * A sequence with context length 0 (padding) gets zeros.
 * Returns 0, or -1 when a score buffer cannot be allocated. */
int lcq_decode_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int half_cache,
                         const int32_t *block_tables, int max_blocks, const int32_t *context_lens, float *out, int seqs,
                         int heads, int kv_heads, int head_dim, int block_size, float scale) {
    const int group = heads / kv_heads;
    const int kv_per_task = seqs >= WHOLE_ROW_MIN_SEQS ? kv_heads : 1, tasks_per_seq = kv_heads / kv_per_task;
    const int64_t row = (int64_t)kv_heads * head_dim; /* floats per cache slot */
    int failed = 0;
#pragma omp parallel for schedule(dynamic) reduction(| : failed)
    for (int task = 0; task < seqs * tasks_per_seq; task++) {
        const int s = task / tasks_per_seq, first_kv = task % tasks_per_seq * kv_per_task;
        const int64_t first_head = (int64_t)first_kv * group;
#define ATTEND(HALF)                                                                                            \
    attend_task(HALF, q + s * q_stride + first_head * head_dim, k_cache, v_cache, block_tables + (int64_t)s * max_blocks, \
                context_lens[s], out + ((int64_t)s * heads + first_head) * head_dim, kv_per_task * group, first_kv,   \
                group, row, head_dim, block_size, scale)
        if (half_cache ? ATTEND(1) : ATTEND(0)) failed = 1;
#undef ATTEND
    }
    return failed ? -1 : 0;
}

static void add_bias(float *y, const float *bias, int rows, int width) {
    if (bias == NULL) return;
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < width; i++) y[(int64_t)r * width + i] += bias[i];
}

/* Entries per layer in the `layers` array of lcq_decode_layers, in this order. A linear layer is
 * three: its weight's kind (HALF_WEIGHT or INDEX_WEIGHT, cast to a pointer), the weight and its bias. */
enum { INPUT_NORM, QKV_KIND, QKV, QKV_BIAS, O_KIND, O, O_BIAS, POST_NORM, GATE_UP_KIND, GATE_UP, GATE_UP_BIAS,
       DOWN_KIND, DOWN, DOWN_BIAS, K_CACHE, V_CACHE, POINTERS_PER_LAYER };
enum { HALF_WEIGHT, INDEX_WEIGHT }; /* cpu_ops.py names them too */

/* y (rows, N) = x (rows, K) @ W^T + bias for the linear layer whose entries start at `entry`. */
static int linear(void *const *entry, const float *x, int rows, int K, int N, float *y) {
    const int status = (intptr_t)entry[0] == INDEX_WEIGHT ? lcq_index_matmul(x, rows, entry[1], y)
                                                          : lcq_half_matmul(x, rows, K, entry[1], N, y);
    add_bias(y, entry[2], rows, N);
    return status;
}

/* A whole decode step of a Llama-family model's decoder layers, for sequences of one new token
 * each: the same operations, in the same order and with the same kernels, as the Python
 * layers (lcq/models/llama.py) take on this path, without a Python call per operation. x (rows,
 * hidden) holds the embeddings and receives the residual stream after the last layer (before the
 * final norm). Weights are fp16 (N, K) or LCQ indices (cpu_index.c), biases fp32 or NULL, KV caches fp32
 * or fp16 (half_cache). work holds
 * rows * (2 hidden + 2 q width + 2 kv width + 3 intermediate) floats. Returns 0, or -1 on bad sizes
 * or a failed allocation. */
int lcq_decode_layers(void *const *layers, int num_layers, float *x, int rows, int hidden, int heads, int kv_heads,
                      int head_dim, int intermediate, float eps, const float *cos, const float *sin,
                      const int64_t *slots, const int32_t *block_tables, int max_blocks, const int32_t *context_lens,
                      int block_size, float scale, int half_cache, float *work) {
    const int q_width = heads * head_dim, kv_width = kv_heads * head_dim, qkv_width = q_width + 2 * kv_width;
    float *normed = work, *qkv = normed + (int64_t)rows * hidden, *attn = qkv + (int64_t)rows * qkv_width;
    float *projected = attn + (int64_t)rows * q_width, *gate_up = projected + (int64_t)rows * hidden;
    float *activated = gate_up + (int64_t)rows * 2 * intermediate;
    for (int l = 0; l < num_layers; l++) {
        void *const *p = layers + (int64_t)l * POINTERS_PER_LAYER;
        void *k_cache = p[K_CACHE], *v_cache = p[V_CACHE];
        lcq_rms_norm(x, NULL, p[INPUT_NORM], normed, rows, hidden, eps);
        if (linear(p + QKV_KIND, normed, rows, hidden, qkv_width, qkv)) return -1;
        lcq_rotary(qkv, rows, qkv_width, heads + kv_heads, head_dim, cos, sin);
        lcq_store_kv(qkv + q_width, qkv + q_width + kv_width, qkv_width, k_cache, v_cache, slots, rows, kv_width,
                     half_cache);
        if (lcq_decode_attention(qkv, qkv_width, k_cache, v_cache, half_cache, block_tables, max_blocks, context_lens,
                                 attn, rows, heads, kv_heads, head_dim, block_size, scale))
            return -1;
        if (linear(p + O_KIND, attn, rows, q_width, hidden, projected)) return -1;
        lcq_rms_norm(projected, x, p[POST_NORM], normed, rows, hidden, eps); /* x += attention output */
        if (linear(p + GATE_UP_KIND, normed, rows, hidden, 2 * intermediate, gate_up)) return -1;
        lcq_silu_mul(gate_up, activated, rows, intermediate);
        if (linear(p + DOWN_KIND, activated, rows, intermediate, hidden, projected)) return -1;
        for (int64_t i = 0; i < (int64_t)rows * hidden; i++) x[i] += projected[i]; /* x += MLP output */
    }
    return 0;
}
