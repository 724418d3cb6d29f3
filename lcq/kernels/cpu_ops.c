/* The small fp32 operations of a CPU decode step, one pass over memory each.
 *
 * At batch 1 the matrix products of a small model take less than half of a decode step on a CPU;
 * the rest was torch dispatching five to ten tiny operations per RMSNorm, rotary embedding and
 * SwiGLU, and gathering every cached K/V row into a fresh tensor before attention. These functions
 * do each of those in one call (attention, which reads the paged cache where it lies: cpu_decode_attention.c),
 * and lcq_decode_layers runs a whole decode step.
 * All tensors are contiguous fp32 unless a stride is given; sums of squares are kept in double.
 */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_cache.h"
#include "cpu_exp.h"
#include "cpu_latent.h"

int lcq_half_matmul(const float *x, int M, int K, const uint16_t *w, int N, int swiglu, const uint32_t *panels,
                    const uint8_t *bytes, float *y); /* cpu_half.c */
int lcq_index_matmul(const float *x, int M, const void *w, int swiglu, float *y);       /* cpu_index.c */
int lcq_decode_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int cache_form,
                         const int32_t *block_tables, int max_blocks, const int32_t *context_lens, float *out, int seqs,
                         int heads, int kv_heads, int head_dim, int block_size, float scale, float softcap,
                         int window, const float *sinks); /* cpu_decode_attention.c */
struct RecurrentLayer;
int lcq_recurrent_step(const struct RecurrentLayer *layer, const int64_t *slots, int seqs, const float *projected,
                       float *out); /* cpu_recurrent.c */
struct Mixture;
int lcq_mixture_step(const struct Mixture *mixture, const float *x, int rows, float *out); /* cpu_mixture.c */

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

/* out[r] = the index of the largest value of row r of x (rows, n), as torch.argmax: the first of equal
 * ones, and the first NaN in a row that has one. Two passes over a row (the largest value with a NaN
 * check, then its first index) in vector lanes: torch's CPU argmax took 1.7-2.0 ms for a decode
 * step's 64 x 49,152 logits in cache, 4% of the step, where amax took 0.08. */
void lcq_argmax_rows(const float *x, int64_t rows, int64_t n, int64_t *out) {
#pragma omp parallel for if (rows >= 8)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * n;
        __m256 top = _mm256_set1_ps(-INFINITY), unordered = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            const __m256 v = _mm256_loadu_ps(row + i);
            top = _mm256_max_ps(top, v);
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        float lanes[8], best = -INFINITY;
        _mm256_storeu_ps(lanes, top);
        for (int j = 0; j < 8; j++) best = lanes[j] > best ? lanes[j] : best;
        int nan = _mm256_movemask_ps(unordered) != 0;
        for (; i < n; i++) {
            nan |= isnan(row[i]);
            best = row[i] > best ? row[i] : best;
        }
        int64_t found = 0;
        if (nan) {
            while (!isnan(row[found])) found++;
        } else {
            const __m256 target = _mm256_set1_ps(best);
            int mask = 0;
            for (i = 0; i + 8 <= n && !(mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + i), target,
                                                                                 _CMP_EQ_OQ)));
                 i += 8) {
            }
            if (mask)
                found = i + __builtin_ctz(mask);
            else
                for (found = i; found < n && row[found] != best; found++) {
                }
        }
        out[r] = found;
    }
}

/* Sampling (sampler.filtered_probs, then sampler.draw): a row's weights are w = exp((x - max) / temperature)
 * (the largest 1), zero below min_p; top-k and top-p keep the most likely tokens while fewer than top_k are
 * kept and the mass before the next one is below top_p of the total; the token drawn is the first, in
 * vocabulary order, where the kept weights' running sum passes uniform times their total. The kept set is
 * a threshold: every weight above the cut's, and at the cut's weight the tokens up to its index. The cut
 * is found from a histogram of the weights by their float's top bits (monotonic for positive floats):
 * whole buckets are kept while they fit, and the one where the cut falls is sorted. Weights below
 * SAMPLE_SMALL are left out of the histogram unless the cut lies among them, so that a peaked row
 * (SmolLM2 at temperature 0.7 keeps a median of 2 tokens at top-p 0.95) histograms a few hundred. */
#define SAMPLE_BUCKETS 1024 /* bits >> 20 of a float in [0, 1]: 8 of the exponent, 3 of the mantissa */
#define SAMPLE_SMALL 1e-4f
#define SAMPLE_UNDERFLOW -87.0f /* weights below e^-87 (relative to the largest) are 0, as in fp32 softmax nearly */

typedef struct {
    float weight;
    int32_t index;
} lcq_candidate;

static int most_likely_first(const void *a, const void *b) {
    const lcq_candidate *x = a, *y = b;
    if (x->weight != y->weight) return x->weight < y->weight ? 1 : -1;
    return (x->index > y->index) - (x->index < y->index);
}

static inline int weight_bucket(float w) {
    uint32_t bits;
    memcpy(&bits, &w, sizeof bits);
    return (int)(bits >> 20);
}

typedef struct {
    float weight;  /* the cut's: weights above it are kept */
    int64_t index; /* at the cut's weight, tokens up to this index are kept */
    double kept;   /* their total */
} sample_cut;

/* The cut of top_k and top_p (limit: top_p times the total) among the weights of at least `floor`, into
 * *cut; returns 0 (cut untouched) when it lies below them, or nowhere. */
static int find_cut(const float *w, int64_t n, int64_t top_k, double limit, float floor, int32_t *counts,
                    double *masses, lcq_candidate *candidates, sample_cut *cut) {
    memset(counts, 0, SAMPLE_BUCKETS * sizeof *counts);
    memset(masses, 0, SAMPLE_BUCKETS * sizeof *masses);
    const __m256 low = _mm256_set1_ps(floor);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(w + i), low, _CMP_GE_OQ)); mask;
             mask &= mask - 1) {
            const float v = w[i + __builtin_ctz(mask)];
            counts[weight_bucket(v)]++;
            masses[weight_bucket(v)] += v;
        }
    for (; i < n; i++)
        if (w[i] >= floor) {
            counts[weight_bucket(w[i])]++;
            masses[weight_bucket(w[i])] += w[i];
        }
    int64_t count = 0;
    double kept = 0.0;
    for (int b = SAMPLE_BUCKETS - 1; b >= 0; b--) {
        if (!counts[b]) continue;
        if (count + counts[b] <= top_k && kept + masses[b] < limit) { /* even its last token is kept */
            count += counts[b];
            kept += masses[b];
            continue;
        }
        if (count >= top_k) { /* top_k was reached at this bucket's upper edge: keep the buckets above */
            const uint32_t edge = ((uint32_t)b + 1) << 20;
            const uint32_t below = edge - 1;
            memcpy(&cut->weight, &below, sizeof below);
            *cut = (sample_cut){cut->weight, -1, kept};
            return 1;
        }
        int64_t m = 0;
        for (int64_t j = 0; j < n; j++)
            if (w[j] >= floor && w[j] > 0.0f && weight_bucket(w[j]) == b)
                candidates[m++] = (lcq_candidate){w[j], (int32_t)j};
        if (!m) continue; /* (only zero weights: none to keep) */
        qsort(candidates, (size_t)m, sizeof *candidates, most_likely_first);
        int64_t j = 0; /* at least one is kept, even where top_p was so small that its limit rounded to 0 */
        do {
            count++;
            kept += candidates[j++].weight;
        } while (j < m && count < top_k && kept < limit);
        /* top_k keeps the tokens tied with its k-th too, as vLLM and transformers do (equal weights share a
         * bucket, and sort by index: the cut's index then takes them all) */
        while (j < m && count >= top_k && kept < limit && candidates[j].weight == candidates[j - 1].weight) {
            count++;
            kept += candidates[j++].weight;
        }
        if (j < m || count >= top_k || kept >= limit) {
            *cut = (sample_cut){candidates[j - 1].weight, candidates[j - 1].index, kept};
            return 1;
        }
    }
    return 0;
}

/* The cut of top_k and top_p (limit: top_p times the mass it applies to) among all weights: none where every
 * positive weight is kept. */
static sample_cut top_cut(const float *w, int64_t n, int64_t top_k, double limit, double total, int32_t *counts,
                          double *masses, lcq_candidate *candidates) {
    sample_cut cut = {0.0f, -1, total};
    if (!find_cut(w, n, top_k, limit, SAMPLE_SMALL, counts, masses, candidates, &cut)) /* among small ones? */
        find_cut(w, n, top_k, limit, 0.0f, counts, masses, candidates, &cut);          /* else none: cut stays */
    return cut;
}

static int64_t sample_row(const float *x, int64_t n, float temperature, float min_p, int64_t top_k, float top_p,
                          float uniform, float *w, int32_t *counts, double *masses, lcq_candidate *candidates) {
    __m256 largest = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) largest = _mm256_max_ps(largest, _mm256_loadu_ps(x + i));
    float lanes[8], top = -INFINITY;
    _mm256_storeu_ps(lanes, largest);
    for (int j = 0; j < 8; j++) top = lanes[j] > top ? lanes[j] : top;
    for (; i < n; i++) top = x[i] > top ? x[i] : top;
    const float scale = 1.0f / (temperature > 1e-5f ? temperature : 1e-5f);
    const __m256 shift = _mm256_set1_ps(top), factor = _mm256_set1_ps(scale), low = _mm256_set1_ps(min_p);
    __m256d total4 = _mm256_setzero_pd();
    const __m256 underflow = _mm256_set1_ps(SAMPLE_UNDERFLOW);
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 exponent = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), shift), factor);
        __m256 v = exp8(exponent); /* 0 below -87.3; the scalar tail's rule (SAMPLE_UNDERFLOW) applies too */
        v = _mm256_and_ps(v, _mm256_and_ps(_mm256_cmp_ps(v, low, _CMP_GE_OQ), /* below min_p: 0 */
                                           _mm256_cmp_ps(exponent, underflow, _CMP_GE_OQ)));
        _mm256_storeu_ps(w + i, v);
        total4 = _mm256_add_pd(total4, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                                                     _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
    }
    double parts[4], total = 0.0;
    _mm256_storeu_pd(parts, total4);
    total = parts[0] + parts[1] + parts[2] + parts[3];
    for (; i < n; i++) {
        const float exponent = (x[i] - top) * scale, v = exp1(exponent);
        w[i] = v >= min_p && exponent >= SAMPLE_UNDERFLOW ? v : 0.0f;
        total += w[i];
    }
    sample_cut cut = {0.0f, -1, total}; /* no cut: every positive weight */
    if (top_k < n || top_p < 1.0f) { /* top-p of what top-k keeps (renormalised, as vLLM and transformers) */
        const double mass = top_k < n && top_p < 1.0f
            ? top_cut(w, n, top_k, INFINITY, total, counts, masses, candidates).kept : total;
        cut = top_cut(w, n, top_k, (double)top_p * mass, total, counts, masses, candidates);
    }
    const double target = (double)uniform * cut.kept;
    const __m256 above = _mm256_set1_ps(cut.weight);
    double run = 0.0;
    int64_t last = -1;
    for (i = 0; i < n; i += 8) {
        if (i + 8 <= n) { /* a block's kept sum first; its tokens one by one only where the draw falls in it */
            const __m256 v = _mm256_loadu_ps(w + i);
            const int ties = _mm256_movemask_ps(_mm256_cmp_ps(v, above, _CMP_EQ_OQ));
            const __m256 kept = _mm256_and_ps(v, _mm256_cmp_ps(v, above, _CMP_GT_OQ));
            const __m128 half = _mm_add_ps(_mm256_castps256_ps128(kept), _mm256_extractf128_ps(kept, 1));
            const double sum = (double)_mm_cvtss_f32(_mm_hadd_ps(_mm_hadd_ps(half, half), _mm_hadd_ps(half, half)));
            if (!ties && !(run + sum > target) && sum == 0.0) continue;
            if (!ties && !(run + sum > target)) { /* the last kept token of the block, for rounding at the end */
                run += sum;
                for (int j = 7; j >= 0; j--)
                    if (w[i + j] > cut.weight) { last = i + j; break; }
                continue;
            }
        }
        for (int64_t t = i; t < i + 8 && t < n; t++) {
            if (!(w[t] > cut.weight || (w[t] == cut.weight && t <= cut.index && w[t] > 0.0f))) continue;
            run += w[t];
            last = t;
            if (run > target) return t;
        }
    }
    return last; /* the running sum fell short of the target by rounding */
}

/* tokens[r] for each row r of logits (rows, n), drawn at uniform[r] in [0, 1) as above (top_k >= n: none,
 * top_p 1: none, min_p 0: none). torch's ops took 3.2 ms for 64 rows of 49,152 at a temperature alone and
 * 7 ms with top-p. Returns 0, or -1 when buffers cannot be allocated. */
int lcq_sample_rows(const float *logits, int64_t rows, int64_t n, const float *temperature, const float *min_p,
                    const int64_t *top_k, const float *top_p, const float *uniform, int64_t *tokens) {
    int status = 0;
#pragma omp parallel if (rows >= 4)
    {
        float *w = malloc((size_t)n * sizeof *w);
        lcq_candidate *candidates = malloc((size_t)n * sizeof *candidates);
        int32_t *counts = malloc(SAMPLE_BUCKETS * sizeof *counts);
        double *masses = malloc(SAMPLE_BUCKETS * sizeof *masses);
        const int ready = w && candidates && counts && masses;
        if (!ready) {
#pragma omp atomic write
            status = -1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < rows; r++)
            if (ready)
                tokens[r] = sample_row(logits + r * n, n, temperature[r], min_p[r], top_k[r], top_p[r], uniform[r], w,
                                       counts, masses, candidates);
        free(w);
        free(candidates);
        free(counts);
        free(masses);
    }
    return status;
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
#pragma omp parallel for if (tokens >= 256) /* distinct slots; serial, a prefill step spent 1.1% here */
    for (int64_t t = 0; t < tokens; t++) {
        if (slots[t] < 0) continue;
        store_row(k_cache, slots[t], k + t * row_stride, kv_heads, head_dim, cache_form);
        store_row(v_cache, slots[t], v + t * row_stride, kv_heads, head_dim, cache_form);
    }
}

static void add_bias(float *y, const float *bias, int rows, int width) {
    if (bias == NULL) return;
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < width; i++) y[(int64_t)r * width + i] += bias[i];
}

/* Entries per layer in the `layers` array of lcq_decode_layers, in this order. A linear layer is
 * three: its weight's kind (HALF_WEIGHT or INDEX_WEIGHT, cast to a pointer), the weight and its bias.
 * INPUT_NORM and POST_NORM (before the MLP) are NULL in layers without them (OLMo 2, EXAONE 4: the stream
 * itself goes in; Cohere's parallel blocks: one norm's output feeds the attention and the MLP), INPUT_NORM_BIAS
 * and POST_NORM_BIAS their biases (StableLM's LayerNorms), else NULL; Q_NORM and K_NORM are the q/k norm weights
 * (Qwen3, Gemma 3, OLMo 2, EXAONE 4), else NULL; ATTENTION_OUTPUT_NORM and MLP_OUTPUT_NORM the norms of the attention and MLP outputs before their
 * residual adds (Gemma, OLMo 2, EXAONE 4), else NULL; COS and SIN the layer's whole rotary tables
 * (Gemma's sliding-window layers have their own base), a row of rotated / 2 per position; WINDOW the
 * layer's sliding window in tokens (cast to a pointer; 0: full attention); GROUP the layer group whose
 * slots and block tables it uses (cast to a pointer; lcq/runtime/kv_groups.py); SINKS each head's attention sink
 * (gpt-oss), else NULL; TEMPERATURE (cast to a pointer) 1 where the query temperature applies (Ministral 3: every
 * layer; Llama 4: its NoPE layers), else 0. A layer's token mixer is DeepSeek's latent attention (LATENT: its LatentLayer,
 * cpu_latent.c, before the linear layer O),
 * attention (QKV not NULL), a recurrent mixer (RECURRENT: its RecurrentLayer, cpu_recurrent.c, between the
 * linear layers IN and OUT), both side by side (Falcon-H1), or neither (Nemotron-H's MLP blocks); it has an
 * MLP where GATE_UP is not NULL (MLP_FACTORS: xIELU's four, else NULL), or a mixture of experts where MIXTURE is
 * not NULL (its Mixture, cpu_mixture.c). A layer of one part (Nemotron-H) has INPUT_NORM only. */
enum { INPUT_NORM, INPUT_NORM_BIAS, QKV_KIND, QKV, QKV_BIAS, Q_NORM, K_NORM, COS, SIN, O_KIND, O, O_BIAS, RECURRENT,
       IN_KIND, IN, IN_BIAS, OUT_KIND, OUT, OUT_BIAS, ATTENTION_OUTPUT_NORM, POST_NORM, POST_NORM_BIAS, GATE_UP_KIND,
       GATE_UP, GATE_UP_BIAS, DOWN_KIND, DOWN, DOWN_BIAS, MLP_OUTPUT_NORM, MLP_FACTORS, MIXTURE, K_CACHE, V_CACHE, WINDOW, GROUP,
       SINKS, LATENT, TEMPERATURE, POINTERS_PER_LAYER };
enum { HALF_WEIGHT, INDEX_WEIGHT }; /* cpu_ops.py names them too */

/* y (rows, N) = x (rows, K) @ W^T + bias for the linear layer whose entries start at `entry`; with
 * swiglu and no bias, y (rows, N / 2) = silu(gate) * up of W = [gate; up] (cpu_gemm.h). (The mixtures' experts
 * too: cpu_mixture.c.) */
int lcq_linear_entry(void *const *entry, const float *x, int rows, int K, int N, int swiglu, float *y) {
    const int status = (intptr_t)entry[0] == INDEX_WEIGHT
                           ? lcq_index_matmul(x, rows, entry[1], swiglu, y)
                           : lcq_half_matmul(x, rows, K, entry[1], N, swiglu, NULL, NULL, y);
    add_bias(y, entry[2], rows, N);
    return status;
}

/* A decode step's LoRA adapters (lcq/models/lora.py AdapterStack): per layer, for each fused linear
 * layer in the order QKV, O, GATE_UP, DOWN, the stack's A (slots W, K) and B's transpose (slots W, N),
 * W = rank x the layer's parts (NULL where the layer has no such fused layer: a mixture's, a recurrent mixer's);
 * `active` (layers x 4) says which fused layers any held adapter touches (0 where NULL); row r uses slot
 * row_slots[r] (-1: none). */
typedef struct Adapters {
    void *const *matrices;
    const uint8_t *active;
    const int64_t *row_slots;
    int slots, rank;
} Adapters;

enum { ADAPTER_QKV, ADAPTER_O, ADAPTER_GATE_UP, ADAPTER_DOWN, ADAPTER_LAYERS };
#define ADAPTER_PARALLEL_MACS 65536 /* an adapter product's multiply-adds from which both cores share it */
#define ADAPTER_COLUMNS 256         /* output columns per share of B's half of the product */

static int adapter_touches(const Adapters *adapters, int layer, int kind) {
    return adapters != NULL && adapters->active[layer * ADAPTER_LAYERS + kind];
}

/* y (rows, N) += each row's adapter product B_s (A_s x_r), s its slot, W = rank x parts (3 for q, k, v; 2 for
 * gate and up; 1 for up alone and the others): A_s the rows s W .. s W + W of A,
 * B_s the columns s W .. s W + W of B, read as rows of B's transpose (what LoRABatch.add computes, the
 * other slots' zero columns left out): each output row gains W scaled rows of it, in chunks of columns
 * the cores share. Returns 0, or -1 when a buffer cannot be allocated. */
static int add_adapter(const Adapters *adapters, int layer, int kind, int parts, const float *x, int rows, int K,
                       int N, float *y) {
    if (!adapter_touches(adapters, layer, kind)) return 0;
    const float *a = adapters->matrices[(layer * ADAPTER_LAYERS + kind) * 2];
    const float *b_rows = adapters->matrices[(layer * ADAPTER_LAYERS + kind) * 2 + 1];
    const int width = adapters->rank * parts;
    float *low = malloc(sizeof(float) * (size_t)rows * width);
    if (low == NULL) return -1;
#pragma omp parallel for collapse(2) schedule(static) if ((int64_t)rows * width * K >= ADAPTER_PARALLEL_MACS)
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < width; j++) {
            const int64_t s = adapters->row_slots[r];
            float sum = 0.0f;
            if (s >= 0) {
                const float *row = a + (s * width + j) * (int64_t)K, *in = x + (int64_t)r * K;
#pragma omp simd reduction(+ : sum)
                for (int k = 0; k < K; k++) sum += row[k] * in[k];
            }
            low[(int64_t)r * width + j] = sum;
        }
#pragma omp parallel for schedule(static) if ((int64_t)rows * width * N >= ADAPTER_PARALLEL_MACS)
    for (int first = 0; first < N; first += ADAPTER_COLUMNS) {
        const int last = first + ADAPTER_COLUMNS < N ? first + ADAPTER_COLUMNS : N;
        for (int r = 0; r < rows; r++) {
            const int64_t s = adapters->row_slots[r];
            float *out = y + (int64_t)r * N;
            for (int j = 0; s >= 0 && j < width; j++) {
                const float t = low[(int64_t)r * width + j], *column = b_rows + (s * width + j) * (int64_t)N;
#pragma omp simd
                for (int n = first; n < last; n++) out[n] += t * column[n];
            }
        }
    }
    free(low);
    return 0;
}

/* y (rows, in_dim) = an MLP of `width` over x (rows, in_dim), its gate/up (up alone without a gate) and down
 * linear layers the six entries from `entries`; activation one of cpu_exp.h's (factors: xIELU's four or the
 * clamped SwiGLU's two, else NULL); the
 * layer's LoRA adapters (or NULL) added after each product. gate_up (rows, 2 width) and activated (rows, width) are
 * its buffers. A decoder layer's MLP, and each expert of a mixture (cpu_mixture.c). */
int lcq_mlp(void *const *entries, const float *x, int rows, int in_dim, int width, int activation,
            const float *factors, const Adapters *adapters, int layer, float *gate_up, float *activated, float *y) {
    const int gated = activation < LCQ_RELU2, up_width = gated ? 2 * width : width;
    if (activation == LCQ_SILU && entries[2] == NULL && !adapter_touches(adapters, layer, ADAPTER_GATE_UP)) {
        if (lcq_linear_entry(entries, x, rows, in_dim, up_width, 1, activated)) return -1; /* SwiGLU in the product */
    } else {
        if (lcq_linear_entry(entries, x, rows, in_dim, up_width, 0, gate_up)) return -1;
        if (add_adapter(adapters, layer, ADAPTER_GATE_UP, gated ? 2 : 1, x, rows, in_dim, up_width, gate_up)) return -1;
        if (gated)
            lcq_gated_mul(gate_up, activated, rows, width, activation, factors);
        else
            lcq_ungated(gate_up, activated, rows, width, activation, factors);
    }
    if (lcq_linear_entry(entries + 3, activated, rows, width, in_dim, 0, y)) return -1;
    return add_adapter(adapters, layer, ADAPTER_DOWN, 1, activated, rows, width, in_dim, y);
}

/* What every layer of a decode step shares (lcq_decode_layers' arguments), and its work buffers. */
typedef struct {
    int rows, hidden, heads, kv_heads, head_dim, rotated, intermediate, activation, cache_form, max_blocks, block_size;
    int whole_qk_norms, qk_norms_after_rotary, interleaved_rotary, output_gate, recurrent_in, recurrent_out;
    int layer_norms, parallel_blocks, per_head_qk_weights;
    float eps, scale, softcap;
    const int64_t *positions, *slots, *state_slots;
    const int32_t *block_tables, *context_lens;
    const float *query_scales;
    const Adapters *adapters;
    float *normed, *qkv, *attn, *gates, *projected, *gate_up, *activated, *mixer_in, *mixer_out, *beside;
} Step;

/* out = the step's norm (layer_norms: LayerNorm, else RMSNorm) of (residual += x) as lcq_norm, or where weight is
 * NULL (a layer without that norm) out = the sum itself (x, without a residual). */
static void add_and_norm(const Step *st, const float *x, float *residual, const float *weight, const float *bias,
                         float *out) {
    if (weight != NULL) {
        lcq_norm(x, residual, weight, bias, out, st->rows, st->hidden, st->eps, st->layer_norms);
        return;
    }
    for (int64_t i = 0; i < (int64_t)st->rows * st->hidden; i++) {
        if (residual != NULL) residual[i] += x[i];
        out[i] = residual != NULL ? residual[i] : x[i];
    }
}

/* The layer's attention over normed rows into step->projected (its output projection's output). */
static int attention(const Step *st, void *const *p, int l) {
    const int rows = st->rows, q_width = st->heads * st->head_dim, kv_width = st->kv_heads * st->head_dim;
    const int qkv_width = q_width + 2 * kv_width, stride = qkv_width + (st->output_gate ? q_width : 0);
    const int64_t group = (intptr_t)p[GROUP];
    float *qkv = st->qkv;
    if (lcq_linear_entry(p + QKV_KIND, st->normed, rows, st->hidden, stride, 0, qkv)) return -1;
    if (add_adapter(st->adapters, l, ADAPTER_QKV, 3, st->normed, rows, st->hidden, qkv_width, qkv)) return -1;
    if (st->output_gate) /* (Qwen3.5) each head's query, then its gate: the gates set apart, the rest closed up */
        for (int r = 0; r < rows; r++) {
            float *row = qkv + (int64_t)r * stride;
            for (int h = 0; h < st->heads; h++) {
                memcpy(st->gates + (int64_t)r * q_width + (int64_t)h * st->head_dim, row + (2 * h + 1) * st->head_dim,
                       sizeof(float) * st->head_dim);
                memmove(row + h * st->head_dim, row + 2 * h * st->head_dim, sizeof(float) * st->head_dim);
            }
            memmove(row + q_width, row + 2 * q_width, sizeof(float) * 2 * kv_width);
        }
    for (int rotated = 0; rotated < 2; rotated++) { /* q/k norms before the rotation, or after it (Hunyuan) */
        if (p[Q_NORM] != NULL && rotated == st->qk_norms_after_rotary) { /* Qwen3, Gemma 3, OLMo 2, ... */
            const int weight_stride = st->per_head_qk_weights ? st->head_dim : 0;
            lcq_head_norm(qkv, rows, stride, st->whole_qk_norms ? 1 : st->heads,
                          st->whole_qk_norms ? q_width : st->head_dim, p[Q_NORM], weight_stride, st->eps,
                          st->layer_norms);
            lcq_head_norm(qkv + q_width, rows, stride, st->whole_qk_norms ? 1 : st->kv_heads,
                          st->whole_qk_norms ? kv_width : st->head_dim, p[K_NORM], weight_stride, st->eps,
                          st->layer_norms);
        }
        if (!rotated)
            lcq_rotary(qkv, rows, stride, st->heads + st->kv_heads, st->head_dim, st->rotated, p[COS], p[SIN],
                       st->positions, st->interleaved_rotary);
    }
    for (int r = 0; st->query_scales != NULL && p[TEMPERATURE] != NULL && r < rows; r++) /* the query temperature */
        for (int i = 0; i < q_width; i++) qkv[(int64_t)r * stride + i] *= st->query_scales[r];
    lcq_store_kv(qkv + q_width, qkv + q_width + kv_width, stride, p[K_CACHE], p[V_CACHE], st->slots + group * rows,
                 rows, st->kv_heads, st->head_dim, st->cache_form);
    const int attended = lcq_decode_attention(qkv, stride, p[K_CACHE], p[V_CACHE], st->cache_form,
                                              st->block_tables + group * rows * st->max_blocks, st->max_blocks,
                                              st->context_lens, st->attn, rows, st->heads, st->kv_heads, st->head_dim,
                                              st->block_size, st->scale, st->softcap, (int)(intptr_t)p[WINDOW],
                                              p[SINKS]);
    if (attended) return attended;
    if (st->output_gate) lcq_sigmoid_gate(st->attn, st->gates, rows, st->heads, st->head_dim, q_width, st->head_dim);
    if (lcq_linear_entry(p + O_KIND, st->attn, rows, q_width, st->hidden, 0, st->projected)) return -1;
    return add_adapter(st->adapters, l, ADAPTER_O, 1, st->attn, rows, q_width, st->hidden, st->projected);
}

/* The layer's latent attention (DeepSeek's MLA) over normed rows into step->projected: the queries' and latent's
 * products, lcq_latent_queries, the cache rows written and attended as one KV head of kv_rank + rope_dim, the
 * values, O. */
static int latent_attention(const Step *st, void *const *p) {
    const LatentLayer *m = p[LATENT];
    const int rows = st->rows, width = m->kv_rank + m->rope_dim, q_width = m->heads * (m->nope_dim + m->rope_dim);
    const int64_t group = (intptr_t)p[GROUP];
    const size_t floats = (size_t)rows * (m->q_rank + q_width + 2 * width + 2 * (size_t)m->heads * width +
                                          (size_t)m->heads * m->value_dim);
    float *q_low = malloc(sizeof(float) * floats);
    if (q_low == NULL) return -1;
    float *q = q_low + (int64_t)rows * m->q_rank, *compressed = q + (int64_t)rows * q_width;
    float *cache_rows = compressed + (int64_t)rows * width, *queries = cache_rows + (int64_t)rows * width;
    float *out = queries + (int64_t)rows * m->heads * width, *values = out + (int64_t)rows * m->heads * width;
    int status = 0;
    if (m->q_rank > 0) { /* the queries through their own latent, normed */
        status = lcq_linear_entry(m->projections, st->normed, rows, st->hidden, m->q_rank, 0, q_low);
        if (status == 0) lcq_rms_norm(q_low, NULL, m->q_down_norm, q_low, rows, m->q_rank, m->eps);
    }
    if (status == 0)
        status = lcq_linear_entry(m->projections + 3, m->q_rank > 0 ? q_low : st->normed, rows,
                                  m->q_rank > 0 ? m->q_rank : st->hidden, q_width, 0, q);
    if (status == 0) status = lcq_linear_entry(m->projections + 6, st->normed, rows, st->hidden, width, 0, compressed);
    if (status == 0) {
        lcq_latent_queries(m, q, compressed, rows, p[COS], p[SIN], st->positions, queries, cache_rows);
        lcq_store_kv(cache_rows, cache_rows, width, p[K_CACHE], p[V_CACHE], st->slots + group * rows, rows, 1, width,
                     st->cache_form);
        status = lcq_decode_attention(queries, (int64_t)m->heads * width, p[K_CACHE], p[V_CACHE], st->cache_form,
                                      st->block_tables + group * rows * st->max_blocks, st->max_blocks,
                                      st->context_lens, out, rows, m->heads, 1, width, st->block_size, st->scale, 0.0f,
                                      (int)(intptr_t)p[WINDOW], NULL);
    }
    if (status == 0) {
        lcq_latent_values(m, out, rows, values);
        status = lcq_linear_entry(p + O_KIND, values, rows, m->heads * m->value_dim, st->hidden, 0, st->projected);
    }
    free(q_low);
    return status;
}

/* The layer's recurrent mixer over normed rows into out (rows, hidden): IN, the mixer's step, OUT. */
static int recurrent(const Step *st, void *const *p, float *out) {
    if (lcq_linear_entry(p + IN_KIND, st->normed, st->rows, st->hidden, st->recurrent_in, 0, st->mixer_in)) return -1;
    if (lcq_recurrent_step(p[RECURRENT], st->state_slots, st->rows, st->mixer_in, st->mixer_out)) return -1;
    return lcq_linear_entry(p + OUT_KIND, st->mixer_out, st->rows, st->recurrent_out, st->hidden, 0, out);
}

/* A whole decode step of a Llama-family model's decoder layers (Gemma 3's, and hybrids' with recurrent mixers),
 * for sequences of one new token each: the same operations, in the same order and with the same kernels, as the
 * Python layers (lcq/models/llama.py) take on this path, without a Python call per operation; mixtures of experts
 * too (cpu_mixture.c). x (rows,
 * hidden) holds the embeddings (scaled, for Gemma), or where token_ids is not NULL receives them from the
 * table `embeddings` (vocab rows of hidden values, fp16 where half_embeddings, else fp32) times embed_scale
 * (rounded to fp32, as the Python path rounds it to the model dtype): at batch 1 torch's lookup and
 * conversion took ~90 us a token on a 2-core Zen 4 with the step's weights through the caches; x then
 * receives the residual stream after the last layer. Where final_norm is not NULL, out receives that
 * stream through the model's final norm (its bias final_norm_bias, for LayerNorms), the Python path's
 * last operation (~75 us a token the same way). Weights are fp16 (N, K) or LCQ indices (cpu_index.c), biases fp32 or
 * NULL, KV caches of the given form (cpu_cache.h); the MLP's activation is one of cpu_exp.h's.
 * Row r is at positions[r], below the rotary tables' table_positions rows; rotated: the dimensions of each
 * head the rotary embedding turns; softcap > 0 caps the attention
 * scores (Gemma 2); query_scales (rows), where not NULL, multiply each row's queries after the rotary
 * embedding in the layers whose TEMPERATURE entry is 1 (Ministral 3, Llama 4). whole_qk_norms: the q and k norms span the whole projections (OLMo 2), else
 * each head; qk_norms_after_rotary: they follow the rotary embedding (Hunyuan), else precede it;
 * interleaved_rotary: it turns adjacent pairs of dimensions (GLM-4-0414, lcq_rotary); output_gate: q_proj
 * gives each head a gate too (Qwen3.5); layer_norms: the layers' norms are LayerNorms (Cohere, StableLM), else
 * RMSNorms; parallel_blocks: the attention and the MLP both read the input norm's output and their outputs are
 * summed (Cohere, StableLM's parallel residual); per_head_qk_weights: each head's q/k norm has its own weights
 * (Command R+'s LayerNorms; the q/k norms are LayerNorms where layer_norms). slots
 * (groups, rows) and block_tables (groups, rows, max_blocks) hold each layer group's cache slots and
 * block tables, contiguous; state_slots (rows) each row's slot of the recurrent mixers' states, whose input and
 * output projections are recurrent_in and recurrent_out wide (0 without them). adapter_matrices (NULL: no LoRA
 * this step), with adapter_active,
 * adapter_slots (rows), adapter_slot_count and adapter_rank: the step's LoRA adapters (Adapters). work
 * holds rows * (3 hidden + 2 q width + 2 kv width + 3 intermediate + recurrent_in + recurrent_out), plus 2 q width
 * with output_gate, floats. Returns 0, -1 on a failed allocation, -2 on a position outside the rotary tables, -4 on
 * a token id outside the embedding table, or LCQ_NO_BLOCK where a block table entry the attention would read is
 * not a block. */
int lcq_decode_layers(void *const *layers, int num_layers, const int64_t *token_ids, const void *embeddings,
                      int64_t vocab, int half_embeddings, float embed_scale, float *x, const float *final_norm,
                      const float *final_norm_bias, float *out, int rows, int hidden, int heads, int kv_heads,
                      int head_dim, int intermediate, float eps, const int64_t *positions, int64_t table_positions,
                      const int64_t *slots, const int32_t *block_tables, int max_blocks, const int32_t *context_lens,
                      int block_size, float scale, float softcap, const float *query_scales, int whole_qk_norms,
                      int qk_norms_after_rotary, int interleaved_rotary, int rotated, int output_gate, int layer_norms,
                      int parallel_blocks, int per_head_qk_weights, int activation, int cache_form, const int64_t *state_slots,
                      int recurrent_in, int recurrent_out, float *work,
                      void *const *adapter_matrices, const uint8_t *adapter_active, const int64_t *adapter_slots,
                      int adapter_slot_count, int adapter_rank) {
    for (int r = 0; r < rows; r++)
        if (positions[r] < 0 || positions[r] >= table_positions) return -2;
    for (int r = 0; token_ids != NULL && r < rows; r++) {
        if (token_ids[r] < 0 || token_ids[r] >= vocab) return -4;
        float *row = x + (int64_t)r * hidden;
        if (half_embeddings) {
            const uint16_t *half = (const uint16_t *)embeddings + token_ids[r] * hidden;
            int i = 0;
            for (; i + 8 <= hidden; i += 8)
                _mm256_storeu_ps(row + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(half + i))));
            for (; i < hidden; i++) row[i] = _cvtsh_ss(half[i]);
        } else
            memcpy(row, (const float *)embeddings + token_ids[r] * hidden, sizeof(float) * hidden);
        for (int i = 0; embed_scale != 1.0f && i < hidden; i++) row[i] *= embed_scale;
    }
    const Adapters step_adapters = {adapter_matrices, adapter_active, adapter_slots, adapter_slot_count, adapter_rank};
    const int64_t q_width = (int64_t)heads * head_dim, qkv_width = q_width + 2 * (int64_t)kv_heads * head_dim;
    Step st = {rows, hidden, heads, kv_heads, head_dim, rotated, intermediate, activation, cache_form, max_blocks,
               block_size, whole_qk_norms, qk_norms_after_rotary, interleaved_rotary, output_gate, recurrent_in,
               recurrent_out, layer_norms, parallel_blocks, per_head_qk_weights, eps, scale, softcap, positions, slots, state_slots,
               block_tables, context_lens, query_scales, adapter_matrices != NULL ? &step_adapters : NULL};
    st.normed = work;
    st.qkv = st.normed + (int64_t)rows * hidden;
    st.attn = st.qkv + rows * (qkv_width + (output_gate ? q_width : 0));
    st.gates = st.attn + rows * q_width;
    st.projected = st.gates + (output_gate ? rows * q_width : 0);
    st.gate_up = st.projected + (int64_t)rows * hidden;
    st.activated = st.gate_up + (int64_t)rows * 2 * intermediate;
    st.mixer_in = st.activated + (int64_t)rows * intermediate;
    st.mixer_out = st.mixer_in + (int64_t)rows * recurrent_in;
    st.beside = st.mixer_out + (int64_t)rows * recurrent_out;
    for (int l = 0; l < num_layers; l++) {
        void *const *p = layers + (int64_t)l * POINTERS_PER_LAYER;
        if (l == 0)
            add_and_norm(&st, x, NULL, p[INPUT_NORM], p[INPUT_NORM_BIAS], st.normed);
        else /* x += the previous layer's output, in the norm's pass over x (not a serial loop) */
            add_and_norm(&st, st.projected, x, p[INPUT_NORM], p[INPUT_NORM_BIAS], st.normed);
        const int mixes = p[QKV] != NULL || p[RECURRENT] != NULL || p[LATENT] != NULL;
        const int has_mlp = p[GATE_UP] != NULL || p[MIXTURE] != NULL;
        if (p[LATENT] != NULL) {
            const int attended = latent_attention(&st, p);
            if (attended) return attended;
        }
        if (p[QKV] != NULL) {
            const int attended = attention(&st, p, l);
            if (attended) return attended;
        }
        if (p[RECURRENT] != NULL) { /* alone, or beside the attention (Falcon-H1): their outputs summed */
            if (recurrent(&st, p, p[QKV] != NULL ? st.beside : st.projected)) return -1;
            for (int64_t i = 0; p[QKV] != NULL && i < (int64_t)rows * hidden; i++) st.projected[i] += st.beside[i];
        }
        const int parallel = mixes && has_mlp && parallel_blocks; /* Cohere: the MLP reads the mixer's input too */
        if (mixes && has_mlp && !parallel) {
            if (p[ATTENTION_OUTPUT_NORM] != NULL) /* Gemma */
                lcq_rms_norm(st.projected, NULL, p[ATTENTION_OUTPUT_NORM], st.projected, rows, hidden, eps);
            add_and_norm(&st, st.projected, x, p[POST_NORM], p[POST_NORM_BIAS], st.normed); /* x += the mixer's */
        }
        if (has_mlp) {
            float *out = parallel ? st.beside : st.projected;
            const int status = p[MIXTURE] != NULL ? lcq_mixture_step(p[MIXTURE], st.normed, rows, out)
                : lcq_mlp(p + GATE_UP_KIND, st.normed, rows, hidden, intermediate, activation, p[MLP_FACTORS],
                          st.adapters, l, st.gate_up, st.activated, out);
            if (status) return -1;
            if (p[MLP_OUTPUT_NORM] != NULL) /* Gemma */
                lcq_rms_norm(out, NULL, p[MLP_OUTPUT_NORM], out, rows, hidden, eps);
            for (int64_t i = 0; parallel && i < (int64_t)rows * hidden; i++) st.projected[i] += st.beside[i];
        }
    }
    if (final_norm != NULL) /* x += the last layer's output, in the final norm's pass */
        add_and_norm(&st, num_layers > 0 ? st.projected : x, num_layers > 0 ? x : NULL, final_norm, final_norm_bias,
                     out);
    else
        for (int64_t i = 0; num_layers > 0 && i < (int64_t)rows * hidden; i++) x[i] += st.projected[i]; /* the last's */
    return 0;
}
