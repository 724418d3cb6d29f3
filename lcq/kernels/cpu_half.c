/* y (M, N) = x (M, K) @ W^T for fp32 activations and an fp16 weight W (N, K), on x86 CPUs with
 * AVX2, FMA and F16C; fp32 arithmetic.
 *
 * Decode steps on a CPU are bounded by how fast the weights stream from memory: half-width weights
 * halve the bytes. torch has no fast fp16 x fp32 product on CPUs without AVX-512-FP16, hence this
 * kernel: convert 8 weights with one instruction, multiply them into every row. Larger products
 * (prefill, big batches) are bounded by arithmetic instead: cpu_gemm.c converts a block of weight
 * rows at a time to fp32 and multiplies it there, so the fp16 copy is the only weight a layer needs
 * to keep.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_constant.h"
#include "cpu_gemm.h"

#define MAX_ROWS 8 /* rows per pass of the decode form over a column */
#define MAX_CHAINS 4

static float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Output column n for all M rows. Inlined with M a constant, so the accumulators live in
 * registers; with few rows, several accumulators per row hide the FMA latency. */
static inline __attribute__((always_inline)) void column(const int M, int n, const float *x, int K,
                                                         const uint16_t *w, float *y, int N) {
    const int chains = M <= 1 ? 4 : M <= 4 ? 2 : 1;
    const uint16_t *row = w + (int64_t)n * K;
    __m256 acc[MAX_ROWS][MAX_CHAINS];
    float tail[MAX_ROWS];
    for (int m = 0; m < M; m++) {
        for (int c = 0; c < chains; c++) acc[m][c] = _mm256_setzero_ps();
        tail[m] = 0.0f;
    }
    int k = 0;
    for (; k + 8 * chains <= K; k += 8 * chains)
        for (int c = 0; c < chains; c++) {
            __m256 weights = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + k + 8 * c)));
            for (int m = 0; m < M; m++)
                acc[m][c] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (int64_t)m * K + k + 8 * c), weights, acc[m][c]);
        }
    for (; k < K; k++) {
        float weight = _cvtsh_ss(row[k]);
        for (int m = 0; m < M; m++) tail[m] += x[(int64_t)m * K + k] * weight;
    }
    for (int m = 0; m < M; m++) {
        __m256 total = acc[m][0];
        for (int c = 1; c < chains; c++) total = _mm256_add_ps(total, acc[m][c]);
        y[(int64_t)m * N + n] = horizontal_sum(total) + tail[m];
    }
}

/* Rows first .. first + count - 1 of the fp16 weight as fp32, for cpu_gemm.c. */
static void expand_half(const void *weight, int K, int first, int count, float *out) {
    const uint16_t *src = (const uint16_t *)weight + (int64_t)first * K;
    const int64_t total = (int64_t)count * K;
    int64_t i = 0;
    for (; i + 8 <= total; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < total; i++) out[i] = _cvtsh_ss(src[i]);
}

/* Rows first .. first + count - 1 of the fp16 weight as bf16 pairs (as lcq_round_pairs rounds the
 * fp32 values), 32 values per conversion: one pass, where expand_half then rounding took two over a
 * buffer twice the size (the head's expansion at 64 sequences). */
LCQ_BF16 static void expand_half_pairs(const void *weight, int K, int first, int count, uint32_t *out) {
    const int padded = (K + 1) & ~1;
    for (int n = 0; n < count; n++) {
        const uint16_t *src = (const uint16_t *)weight + (int64_t)(first + n) * K;
        uint16_t *dst = (uint16_t *)(out + (int64_t)n * (padded / 2));
        for (int k = 0; k < padded; k += 32) {
            const int left = K - k < 32 ? K - k : 32, stored = padded - k < 32 ? padded - k : 32;
            const __m512i halves = _mm512_maskz_loadu_epi16((__mmask32)(((uint64_t)1 << left) - 1), src + k);
            const __m512 low = _mm512_cvtph_ps(_mm512_castsi512_si256(halves));
            const __m512 high = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(halves, 1));
            _mm512_mask_storeu_epi16(dst + k, (__mmask32)(((uint64_t)1 << stored) - 1),
                                     (__m512i)_mm512_cvtne2ps_pbh(high, low));
        }
    }
}

/* Rows first .. first + count - 1 into the stream (an lcq_stream_rows). */
static void stream_half(const void *weight, int K, int first, int count, lcq_line_stream *stream) {
    lcq_stream_add(stream, (const uint16_t *)weight + (int64_t)first * K, (int64_t)count * K * 2);
}

static const lcq_expansions half_expansions = {expand_half, expand_half_pairs, NULL, stream_half, NULL, NULL};

/* The decode form with bf16 operands (bf16 products on, PAIR_MIN_ROWS rows or more): activations
 * rounded once per call to bf16 pairs along K; per 32 weights two conversions to fp32 and one to 16
 * bf16 pairs, then one vdpbf16ps per row where the fp32 form spends four FMAs and four loads (8-wide).
 * Weights past the last whole 32 stay fp32. Against the fp32 form (same library, the setting
 * alternating, 2 threads, Zen 4, SmolLM2's shapes and head): 0.86-1.12x at 2 rows, 1.12-1.49x at
 * 3-4, 1.0-2.55x at 5-9. */
#define PAIR_MIN_ROWS 3

LCQ_BF16 static inline __attribute__((always_inline)) void pair_column(const int M, int n, const uint32_t *pairs,
                                                                       int K2, const float *x, int K,
                                                                       const uint16_t *w, float *y, int N) {
    const uint16_t *row = w + (int64_t)n * K;
    __m512 acc[MAX_ROWS];
    float tail[MAX_ROWS];
    for (int m = 0; m < M; m++) {
        acc[m] = _mm512_setzero_ps();
        tail[m] = 0.0f;
    }
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m512 low = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + k)));
        const __m512 high = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + k + 16)));
        const __m512bh weights = _mm512_cvtne2ps_pbh(high, low); /* weights k .. k + 31 in order */
        for (int m = 0; m < M; m++)
            acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(pairs + (int64_t)m * K2 + k / 2), weights);
    }
    for (; k < K; k++) {
        float weight = _cvtsh_ss(row[k]);
        for (int m = 0; m < M; m++) tail[m] += x[(int64_t)m * K + k] * weight;
    }
    for (int m = 0; m < M; m++) y[(int64_t)m * N + n] = _mm512_reduce_add_ps(acc[m]) + tail[m];
}

LCQ_BF16 static int pair_decode_product(const float *x, int M, int K, const uint16_t *w, int N, float *y) {
    const int K2 = (K + 1) / 2, pass_rows = lcq_even_pass_rows(M, MAX_ROWS);
    uint32_t *pairs = lcq_round_rows(x, M, K);
    if (pairs == NULL) return -1;
#define COLUMN(rows) pair_column(rows, n, pairs + (int64_t)m * K2, K2, x + (int64_t)m * K, K, w, y + (int64_t)m * N, N)
    LCQ_DECODE_COLUMNS
    for (int n = 0; n < N; n++) LCQ_ROW_PASSES(M, pass_rows, MAX_ROWS, COLUMN)
#undef COLUMN
    free(pairs);
    return 0;
}

/* The weight (N, K) as panels of bf16 pairs (lcq_word_panels of its rows as expand_half_pairs rounds
 * them: ceil(N / 32) * 32 * ceil(K / 2) words) into out, for bf16 products to read in place of
 * converting rows per call; returns 0, or -1 when a buffer cannot be allocated. */
LCQ_BF16 int lcq_half_pair_panels(const uint16_t *w, int N, int K, uint32_t *out) {
    const int words = (K + 1) / 2, block = 64; /* rows per task: whole panels */
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        uint32_t *rows = malloc(sizeof(uint32_t) * block * (size_t)words);
        failed |= rows == NULL;
#pragma omp for schedule(static)
        for (int first = 0; first < N; first += block) {
            if (rows == NULL) continue;
            const int count = N - first < block ? N - first : block;
            expand_half_pairs(w, K, first, count, rows);
            lcq_word_panels(rows, count, words, out + (int64_t)first * words);
        }
        free(rows);
    }
    return failed ? -1 : 0;
}

/* x (M, K) fp32 contiguous, M >= 1; w (N, K) fp16 contiguous; y (M, N) fp32, or with swiglu (W =
 * [gate; up]) y (M, N / 2) = silu(gate) * up (cpu_gemm.h). panels: the weight's lcq_half_pair_panels,
 * or NULL. Fewer than lcq_gemm_min_rows(...) rows: per output column, passes of up to MAX_ROWS rows
 * (the column's weights stay in L1 between passes). Returns 0, or -1 for M < 1 or when a buffer
 * cannot be allocated. */
int lcq_half_matmul(const float *x, int M, int K, const uint16_t *w, int N, int swiglu, const uint32_t *panels,
                    float *y) {
    if (M < 1 || (swiglu && N % 2)) return -1;
    if (M >= lcq_gemm_min_rows(panels != NULL ? LCQ_BF16_PRODUCTS : LCQ_FP32_PRODUCTS)) {
        lcq_expansions expansions = half_expansions;
        expansions.pair_panels = panels;
        return lcq_expanded_product(x, M, K, N, &expansions, w, swiglu, y);
    }
    float *products = lcq_swiglu_products(swiglu, M, N, y);
    int status = 0;
    if (products == NULL) {
        status = -1;
    } else if (M >= PAIR_MIN_ROWS && lcq_bf16_products()) {
        status = pair_decode_product(x, M, K, w, N, products);
    } else {
#define COLUMN(rows) column(rows, n, x + (int64_t)m * K, K, w, products + (int64_t)m * N, N)
        LCQ_DECODE_COLUMNS
        for (int n = 0; n < N; n++) LCQ_ROW_PASSES(M, MAX_ROWS, MAX_ROWS, COLUMN)
#undef COLUMN
    }
    return lcq_swiglu_finish(swiglu, products, M, N, y, status);
}
