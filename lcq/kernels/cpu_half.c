/* y (M, N) = x (M, K) @ W^T for fp32 activations and an fp16 weight W (N, K), on x86 CPUs with
 * AVX2, FMA and F16C; fp32 arithmetic.
 *
 * Decode steps on a CPU are bounded by how fast the weights stream from memory: half-width weights
 * halve the bytes. torch has no fast fp16 x fp32 product on CPUs without AVX-512-FP16, hence this
 * kernel: convert 8 weights with one instruction, multiply them into every row. Larger products
 * (prefill, big batches) are bounded by arithmetic instead: cpu_gemm.c converts a block of weight
 * rows at a time to fp32 and multiplies it there, so the fp16 copy is the only weight a layer needs
 * to keep. With int8 products, a weight may also keep its int8 rows (the head: 1.125 bytes per weight),
 * which its decode products of 1-4 rows then read with vpdpbusd, or without the AVX-512 int8 products with AVX2's
 * vpmaddubsw.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* How many rows past its own a decode column asks for into L2 as it starts (lcq_ask_lines): the fp32 model's
 * batch-1 decode on the Xeon guest 66 -> 75-81 tokens/s (4 and 16 rows ahead alike). */
#define HALF_ROWS_AHEAD 8

/* Output column n for all M rows. Inlined with M a constant, so the accumulators live in
 * registers; with few rows, several accumulators per row hide the FMA latency. */
static inline __attribute__((always_inline)) void column(const int M, int n, const float *x, int K,
                                                         const uint16_t *w, float *y, int N) {
    const int chains = M <= 1 ? 4 : M <= 4 ? 2 : 1;
    const uint16_t *row = w + (int64_t)n * K;
    if (n + HALF_ROWS_AHEAD < N) lcq_ask_lines(row + (int64_t)HALF_ROWS_AHEAD * K, 2 * (int64_t)K);
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
        int k = 0;
        for (; k + 32 <= K; k += 32) { /* without masks, which cost even with every lane on: 1.00-1.12x */
            const __m512 low = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + k)));
            const __m512 high = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + k + 16)));
            _mm512_storeu_si512(dst + k, (__m512i)_mm512_cvtne2ps_pbh(high, low));
        }
        for (; k < padded; k += 32) {
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
    if (n + HALF_ROWS_AHEAD < N) lcq_ask_lines(row + (int64_t)HALF_ROWS_AHEAD * K, 2 * (int64_t)K);
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

/* The int8 rows of an fp16 weight, which int8 products of a few rows read: 1.125 bytes per weight
 * where the fp16 weight takes 2. Per block of BYTE_BLOCK values along a row, scale = max |w| / 127 and
 * q = round(w / scale) (nearest even), stored as the unsigned byte q + 128; a value is q * scale.
 * Blocks of 32 (llama.cpp's Q8_0): the demo model's head rounded so moved its perplexity by -0.006%
 * (per block of 64 +0.066%, per row +0.10%; 4,088 tokens, fp32 activations). Layout: N rows of
 * BYTE_BLOCK * ceil(K / BYTE_BLOCK) bytes, then N rows of ceil(K / BYTE_BLOCK) fp32 scales. */
#define BYTE_BLOCK 32
/* byte_column asks for the codes and scales of the column this many bytes of codes ahead, rounded up to whole
 * columns, into L2 (prefetcht1, as cpu_gemm.h's line streams). Two builds alternating in one process, weights
 * from memory, 2 threads on a Zen 4, with prefetchnta: SmolLM2's head (576-byte columns, 6 ahead) 1.05-1.17x at
 * one row, 1.28x at two (3 and 12 ahead 0.94x and 0.96x of 6, into L2 0.99x, into L1 0.98x); Llama 3.2 1B's
 * (2,048 bytes) 1.07-1.21x at two rows, but 0.86-0.97x at one, which therefore did not ask. On a Xeon with AMX
 * (2 threads, builds alternating, medians of 15 calls after 512 MB written), prefetchnta held SmolLM2's head at
 * 2.3-2.6 ms a row whether its rows were in the L3 or not: prefetcht1 1.6-1.8 (0.7 from the L3); asking at one
 * row of the 1B's long columns too, 11.5-11.6 ms against 15.6-16.7 without; the demo model's batch-1 decode
 * 1.09-1.28x (three pairs of processes, 132-150 tokens/s against 107-126). Two columns at once (independent
 * chains) ran 1.0-1.3x on the head alone and no faster end to end. A column's scales are asked for whole (SmolLM2's
 * head has 72 bytes of them a column, over two or three lines, of which the first alone was asked for; the Xeon, after the LCQ
 * decode columns asked for rows ahead: batch 1 183-207 -> 197-210 tokens/s, three pairs of processes). */
#define BYTES_AHEAD 3072
#define HEAD_BYTE_ROWS 4 /* lcq_half_matmul */
#define CHUNK 64 /* values per vpdpbusd: two blocks */

static inline int byte_blocks(int K) {
    return (K + BYTE_BLOCK - 1) / BYTE_BLOCK;
}

/* The mask of the first `left` (at most 16) lanes of a vector of 16. */
static inline __mmask16 first_lanes(int left) {
    return left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

/* The mask of the first `left` (at most 64) bytes of a vector of 64. */
static inline __mmask64 first_bytes(int left) {
    return left >= 64 ? ~(__mmask64)0 : left <= 0 ? (__mmask64)0 : ((__mmask64)1 << left) - 1;
}

/* AVX2, so that the rows serve both int8 decode forms below (AVX-512 and AVX2); the same bytes either way. */
void lcq_half_byte_rows(const uint16_t *w, int N, int K, uint8_t *out) {
    const int blocks = byte_blocks(K);
    float *scales = (float *)(out + (int64_t)N * blocks * BYTE_BLOCK);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint16_t *row = w + (int64_t)n * K;
        uint8_t *codes = out + (int64_t)n * blocks * BYTE_BLOCK;
        for (int j = 0; j < blocks; j++) {
            const int k = j * BYTE_BLOCK, left = K - k < BYTE_BLOCK ? K - k : BYTE_BLOCK;
            uint16_t block[BYTE_BLOCK] = {0}; /* zeros past K */
            memcpy(block, row + k, sizeof(uint16_t) * left);
            __m256 values[BYTE_BLOCK / 8], largest = _mm256_setzero_ps();
            for (int i = 0; i < BYTE_BLOCK / 8; i++) {
                values[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(block + 8 * i)));
                largest = _mm256_max_ps(largest, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), values[i]));
            }
            float lanes[8], top = 0.0f;
            _mm256_storeu_ps(lanes, largest);
            for (int i = 0; i < 8; i++) top = lanes[i] > top ? lanes[i] : top;
            const __m256 inverse = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
            scales[(int64_t)n * blocks + j] = top / 127.0f;
            for (int i = 0; i < BYTE_BLOCK / 8; i++) {
                int32_t q[8];
                _mm256_storeu_si256((__m256i *)q, _mm256_cvtps_epi32(_mm256_mul_ps(values[i], inverse)));
                for (int e = 0; e < 8; e++) codes[k + 8 * i + e] = (uint8_t)(q[e] + 128);
            }
        }
    }
}

/* An activation row in two bytes per value, for vpdpbusd against the int8 rows: with S = max |x| / 127,
 * x = S * (high + low / 256) to about S / 512 (high = round(x / S), low = round(256 * the rest), at
 * most +-127), about 16 bits where one byte (int8 products' activations, a scale per 64 values) had cost the
 * demo model's head +0.25% perplexity. Per chunk of 64 values, `start` holds in lanes 0 and 8 (its two
 * blocks) -128 * (256 * the sum of high + the sum of low) over the block, which cancels what the
 * weights' +128 adds; the chunk's sums are then 256 * (high sums) + (low sums) + start. */
typedef struct {
    int8_t *high, *low; /* chunks * CHUNK bytes each, zeros past K */
    int32_t *start;     /* chunks * 16 */
    float scale;        /* S / 256 */
} byte_activations;

/* split_row's row where its largest |value| has bits `top` at or past LCQ_INF_BITS. A NaN: the scale NaN
 * (every byte 0), so the row's outputs are NaN, as the fp32 product's are. +-inf (no NaN): the scale inf,
 * high = +-127 for +-inf and every other byte 0, so the row's outputs are +-inf where the fp32 product's
 * are (NaN where an inf meets a code of 0, or infs of both signs cancel). Scalar: only such rows come here. */
static void split_odd_row(const float *x, int K, int32_t top, byte_activations *row) {
    const int chunks = (K + CHUNK - 1) / CHUNK, nan = top > LCQ_INF_BITS;
    for (int c = 0; c < chunks; c++) {
        int32_t sums[2] = {0, 0};
        for (int i = 0; i < CHUNK; i++) {
            const int k = c * CHUNK + i;
            const float v = k < K ? x[k] : 0.0f;
            const int high = nan || !isinf(v) ? 0 : v > 0.0f ? 127 : -127;
            row->high[k] = (int8_t)high;
            row->low[k] = 0;
            sums[i / (CHUNK / 2)] += 256 * high;
        }
        int32_t *start = row->start + 16 * c;
        for (int lane = 0; lane < 16; lane++) start[lane] = 0;
        start[0] = -128 * sums[0];
        start[8] = -128 * sums[1];
    }
    row->scale = nan ? NAN : INFINITY;
}

/* The row's largest |value| is taken on its bits (LCQ_INF_BITS), and a row holding a NaN or +-inf is
 * split_odd_row's: until 2026-12-05 a NaN could drop out of it and became finite bytes, and
 * the row's products were finite. */
LCQ_BF16 static void split_row(const float *x, int K, byte_activations *row) {
    const int chunks = (K + CHUNK - 1) / CHUNK;
    __m512i largest = _mm512_setzero_si512();
    for (int k = 0; k < K; k += 16)
        largest = _mm512_max_epi32(
            largest, _mm512_castps_si512(_mm512_abs_ps(_mm512_maskz_loadu_ps(first_lanes(K - k), x + k))));
    const int32_t bits = _mm512_reduce_max_epi32(largest);
    if (bits >= LCQ_INF_BITS) {
        split_odd_row(x, K, bits, row);
        return;
    }
    float top;
    memcpy(&top, &bits, sizeof top);
    const __m512 inverse = _mm512_set1_ps(top > 0.0f ? 127.0f / top : 0.0f), fraction = _mm512_set1_ps(256.0f);
    const __m512i limit = _mm512_set1_epi32(127);
    row->scale = top / 127.0f / 256.0f;
    for (int c = 0; c < chunks; c++) {
        int32_t sums[2] = {0, 0};
        for (int i = 0; i < CHUNK / 16; i++) {
            const int k = c * CHUNK + 16 * i;
            const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(first_lanes(K - k), x + k), inverse);
            const __m512i high = _mm512_cvtps_epi32(v);
            __m512i low = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(v, _mm512_cvtepi32_ps(high)), fraction));
            low = _mm512_max_epi32(_mm512_min_epi32(low, limit), _mm512_sub_epi32(_mm512_setzero_si512(), limit));
            _mm_storeu_si128((__m128i *)(row->high + k), _mm512_cvtepi32_epi8(high));
            _mm_storeu_si128((__m128i *)(row->low + k), _mm512_cvtepi32_epi8(low));
            sums[i / 2] += 256 * _mm512_reduce_add_epi32(high) + _mm512_reduce_add_epi32(low);
        }
        int32_t *start = row->start + 16 * c;
        for (int lane = 0; lane < 16; lane++) start[lane] = 0;
        start[0] = -128 * sums[0];
        start[8] = -128 * sums[1];
    }
}

/* Where output column n's int8 row lies (lcq_half_byte_rows' layout) and what it asks for ahead, for both decode
 * forms' columns: its codes and block scales, and the codes BYTES_AHEAD later (whole columns), whose scales it
 * asks for into L2 at once and whose codes the column asks for as it goes (ahead is NULL past the last column). */
typedef struct {
    const uint8_t *codes;
    const float *scales;
    const char *ahead;
    int blocks, stride;
} byte_column_rows;

static inline __attribute__((always_inline)) byte_column_rows byte_column_start(int n, int K, const uint8_t *bytes,
                                                                                int N) {
    byte_column_rows rows;
    rows.blocks = byte_blocks(K);
    rows.stride = rows.blocks * BYTE_BLOCK;
    rows.codes = bytes + (int64_t)n * rows.stride;
    rows.scales = (const float *)(bytes + (int64_t)N * rows.stride) + (int64_t)n * rows.blocks;
    const int columns_ahead = (BYTES_AHEAD + rows.stride - 1) / rows.stride;
    rows.ahead = n + columns_ahead < N ? (const char *)rows.codes + (int64_t)columns_ahead * rows.stride : NULL;
    if (rows.ahead != NULL)
        lcq_ask_lines(rows.scales + (int64_t)columns_ahead * rows.blocks, (int64_t)sizeof(float) * rows.blocks);
    return rows;
}

/* Output column n for M activation rows from the int8 rows: per chunk of 64 weights, one load, then per
 * row two vpdpbusd (the high and low bytes), a shift and an add, and the chunk's int32 sums times its two
 * blocks' scales (lanes 0-7 and 8-15, read in one 64-bit load: a masked 512-bit load of the two ran
 * 1.04-1.20x slower, two builds alternating on SmolLM2's and Llama 3.2 1B's heads at 1-2 rows) into the
 * row's fp32 sums. A row's sums run in the same order whatever M is (its values are what it gives alone).
 * Rows with their scales after their codes, one stream instead of two, ran about 1.5x slower. */
LCQ_BF16 static inline __attribute__((always_inline)) void byte_column(const int M, int n, const byte_activations *x,
                                                                       int K, const uint8_t *bytes, int N, float *y) {
    const byte_column_rows rows = byte_column_start(n, K, bytes, N);
    const int chunks = (K + CHUNK - 1) / CHUNK, stride = rows.stride;
    const uint8_t *codes = rows.codes;
    const float *scales = rows.scales;
    const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    __m512 acc[MAX_ROWS];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    for (int c = 0; c < chunks; c++) {
        const int k = c * CHUNK, whole = k + CHUNK <= stride;
        if (rows.ahead != NULL) _mm_prefetch(rows.ahead + k, _MM_HINT_T1);
        const __m512i weights =
            whole ? _mm512_loadu_si512(codes + k) : _mm512_maskz_loadu_epi8(first_bytes(stride - k), codes + k);
        const __m512 pair = _mm512_castps128_ps512(
            whole ? _mm_castpd_ps(_mm_load_sd((const double *)(scales + 2 * c))) : _mm_load_ss(scales + 2 * c));
        const __m512 scale = _mm512_permutexvar_ps(halves, pair);
        for (int m = 0; m < M; m++) {
            const __m512i high = add_byte_products(_mm512_setzero_si512(), weights, _mm512_loadu_si512(x[m].high + k));
            const __m512i low = add_byte_products(_mm512_loadu_si512(x[m].start + 16 * c), weights,
                                                  _mm512_loadu_si512(x[m].low + k));
            const __m512i sums = _mm512_add_epi32(_mm512_slli_epi32(high, 8), low);
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[m]);
        }
    }
    for (int m = 0; m < M; m++) y[(int64_t)m * N + n] = _mm512_reduce_add_ps(acc[m]) * x[m].scale;
}

LCQ_BF16 static int byte_decode_product(const float *x, int M, int K, const uint8_t *bytes, int N, float *y) {
    const int chunks = (K + CHUNK - 1) / CHUNK;
    const size_t row_bytes = 2 * (size_t)chunks * CHUNK + sizeof(int32_t) * 16 * chunks;
    byte_activations *rows = malloc(sizeof(byte_activations) * M);
    uint8_t *buffer = malloc(row_bytes * M);
    if (rows == NULL || buffer == NULL) {
        free(rows);
        free(buffer);
        return -1;
    }
    for (int m = 0; m < M; m++) {
        uint8_t *at = buffer + row_bytes * m;
        rows[m].start = (int32_t *)at;
        rows[m].high = (int8_t *)(at + sizeof(int32_t) * 16 * chunks);
        rows[m].low = rows[m].high + (size_t)chunks * CHUNK;
        split_row(x + (int64_t)m * K, K, &rows[m]);
    }
#define COLUMN(count) byte_column(count, n, rows + m, K, bytes, N, y + (int64_t)m * N)
    LCQ_DECODE_COLUMNS
    for (int n = 0; n < N; n++) LCQ_ROW_PASSES(M, MAX_ROWS, MAX_ROWS, COLUMN)
#undef COLUMN
    free(rows);
    free(buffer);
    return 0;
}

/* The int8 rows' decode product in AVX2 (where int8 products take the shuffle form, without the AVX-512 ones:
 * lcq_set_shuffles): the same rows and the same two-byte activations as the form above, multiplied as
 * cpu_index_shuffles.c multiplies bytes. vpmaddubsw takes unsigned by signed bytes, so a weight q = code - 128
 * multiplies as |q| times the activation bytes with q's sign; vpmaddwd sums each 32-bit lane; per block of 32
 * values 256 times the high bytes' sums plus the low bytes', times the block's scale, into the row's fp32 sums. */
typedef struct {
    int8_t *high, *low; /* blocks * BYTE_BLOCK bytes each, zeros past K */
    float scale;        /* S / 256 */
} narrow_activations;

/* split_row's values and scale, scalar (K values per call, against N x K weights): x = S * (high + low / 256). */
static void narrow_split_row(const float *x, int K, int padded, narrow_activations *row) {
    int32_t top_bits = 0;
    for (int k = 0; k < K; k++) {
        int32_t bits;
        memcpy(&bits, x + k, sizeof bits);
        bits &= 0x7FFFFFFF;
        top_bits = bits > top_bits ? bits : top_bits;
    }
    memset(row->high, 0, padded);
    memset(row->low, 0, padded);
    if (top_bits >= LCQ_INF_BITS) { /* as split_odd_row */
        const int nan = top_bits > LCQ_INF_BITS;
        for (int k = 0; k < K; k++) row->high[k] = (int8_t)(nan || !isinf(x[k]) ? 0 : x[k] > 0.0f ? 127 : -127);
        row->scale = nan ? NAN : INFINITY;
        return;
    }
    float top;
    memcpy(&top, &top_bits, sizeof top);
    const float inverse = top > 0.0f ? 127.0f / top : 0.0f;
    row->scale = top / 127.0f / 256.0f;
    for (int k = 0; k < K; k++) {
        const float v = x[k] * inverse;
        const int high = _mm_cvtss_si32(_mm_set_ss(v));
        const int low = _mm_cvtss_si32(_mm_set_ss((v - (float)high) * 256.0f));
        row->high[k] = (int8_t)high;
        row->low[k] = (int8_t)(low > 127 ? 127 : low < -127 ? -127 : low);
    }
}

static inline __attribute__((always_inline)) void narrow_byte_column(const int M, int n, const narrow_activations *x,
                                                                     int K, const uint8_t *bytes, int N, float *y) {
    const byte_column_rows rows = byte_column_start(n, K, bytes, N);
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    __m256 acc[MAX_ROWS];
    for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
    for (int j = 0; j < rows.blocks; j++) {
        const int k = j * BYTE_BLOCK;
        if (rows.ahead != NULL && j % 2 == 0) _mm_prefetch(rows.ahead + k, _MM_HINT_T1);
        const __m256i weights = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(rows.codes + k)), flip);
        const __m256i magnitudes = _mm256_abs_epi8(weights);
        const __m256 scale = _mm256_broadcast_ss(rows.scales + j);
        for (int m = 0; m < M; m++) {
            const __m256i high = _mm256_madd_epi16(
                _mm256_maddubs_epi16(magnitudes, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(x[m].high + k)),
                                                                  weights)), ones);
            const __m256i low = _mm256_madd_epi16(
                _mm256_maddubs_epi16(magnitudes, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(x[m].low + k)),
                                                                  weights)), ones);
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(high, 8), low)), scale,
                                     acc[m]);
        }
    }
    for (int m = 0; m < M; m++) y[(int64_t)m * N + n] = horizontal_sum(acc[m]) * x[m].scale;
}

static int narrow_byte_decode_product(const float *x, int M, int K, const uint8_t *bytes, int N, float *y) {
    const int padded = byte_blocks(K) * BYTE_BLOCK;
    uint8_t *buffer = lcq_scratch(sizeof(narrow_activations) * (size_t)M + 2 * (size_t)padded * M);
    if (buffer == NULL) return -1;
    narrow_activations *rows = (narrow_activations *)buffer;
    int8_t *values = (int8_t *)(rows + M);
    for (int m = 0; m < M; m++) {
        rows[m].high = values + 2 * (int64_t)padded * m;
        rows[m].low = rows[m].high + padded;
        narrow_split_row(x + (int64_t)m * K, K, padded, &rows[m]);
    }
#define COLUMN(count) narrow_byte_column(count, n, rows + m, K, bytes, N, y + (int64_t)m * N)
    LCQ_DECODE_COLUMNS
    for (int n = 0; n < N; n++) LCQ_ROW_PASSES(M, MAX_ROWS, MAX_ROWS, COLUMN)
#undef COLUMN
    return 0;
}

/* x (M, K) fp32 contiguous, M >= 1; w (N, K) fp16 contiguous; y (M, N) fp32, or with swiglu (W =
 * [gate; up]) y (M, N / 2) = silu(gate) * up (cpu_gemm.h). panels: the weight's lcq_half_pair_panels,
 * or NULL; bytes: its lcq_half_byte_rows, or NULL, which int8 products of a few rows then read. Fewer
 * than lcq_gemm_min_rows(...) rows: per output column, passes of up to MAX_ROWS rows (the column's
 * weights stay in L1 between passes). Returns 0, or -1 for M < 1 or when a buffer cannot be allocated. */
int lcq_half_matmul(const float *x, int M, int K, const uint16_t *w, int N, int swiglu, const uint32_t *panels,
                    const uint8_t *bytes, float *y) {
    if (M < 1 || (swiglu && N % 2)) return -1;
    const int kept = panels != NULL ? LCQ_BF16_PRODUCTS : LCQ_FP32_PRODUCTS;
    /* int8 rows up to HEAD_BYTE_ROWS rows (every row count where each row must give what it gives alone): on
     * SmolLM2's and Llama 3.2 1B's heads (2 threads, Zen 4, from memory) 1.38-1.66x the fp32 decode form at
     * 1 row, 0.94-2.0x at 2; since they ask for columns ahead, against the kept bf16 panels 1.20x and 1.31x
     * at 3 rows, 1.47x and 1.13x at 4, but 0.75x at 5 on SmolLM2's. */
    const int byte_rows = lcq_byte_decode_rows(LCQ_INT8_PRODUCTS), narrow = lcq_shuffles();
    if (bytes != NULL && (byte_rows > 0 || narrow) &&
        (M <= HEAD_BYTE_ROWS || M <= byte_rows || (narrow && lcq_rows_alone()))) {
        float *products = lcq_swiglu_products(swiglu, M, N, y);
        const int status = products == NULL ? -1
                           : byte_rows > 0  ? byte_decode_product(x, M, K, bytes, N, products)
                                            : narrow_byte_decode_product(x, M, K, bytes, N, products);
        return lcq_swiglu_finish(swiglu, products, M, N, y, status);
    }
    if (M >= lcq_gemm_min_rows(kept)) {
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
        /* a column's chains of sums follow its rows per pass: rows alone take passes of one, as one row does */
        const int pass_rows = lcq_rows_alone() ? 1 : MAX_ROWS;
        LCQ_DECODE_COLUMNS
        for (int n = 0; n < N; n++) LCQ_ROW_PASSES(M, pass_rows, MAX_ROWS, COLUMN)
#undef COLUMN
    }
    return lcq_swiglu_finish(swiglu, products, M, N, y, status);
}
