/* y (M, N) = x (M, K) @ W^T for fp32 activations and an LCQ weight kept as its indices, on x86 CPUs
 * with AVX2 and FMA (AVX-512 where the caller says so); fp32 arithmetic.
 *
 * A CPU decode step streams every weight once. Kept as fp16 a weight costs 2 bytes; kept as 4-bit
 * indices (every bit width up to 4 uses a nibble) plus its group scales, about 0.7. Each group's
 * codebook c = S @ V - B is built in registers and weights are looked up by permutes: with AVX-512
 * the 16 entries fit one register (16 weights per vpermps), with AVX2 two registers (8 weights per
 * two permutes and a blend). On a Zen 4 that decodes as fast as the fp16 copy (bench/cpu_index.py).
 * Products of LCQ_GEMM_MIN_ROWS rows or more are bounded by arithmetic instead: cpu_gemm.c expands a
 * block of weight rows at a time to their fp32 entries in a per-thread buffer and multiplies it there,
 * so no copy of the whole layer is ever made and every product uses the exact entries.
 *
 * Index layout: per row, K_pad / 2 bytes; in each run of 32 indices byte i holds index i in its low
 * nibble and index i + 16 in its high nibble (groups are whole runs).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_gemm.h"

#define PASS_ROWS 4 /* activation rows per pass over a column's indices: 4 x 2 accumulators */

/* Must match IndexWeight in cpu_index.py. */
typedef struct {
    const uint8_t *indices;     /* (N, K_pad / 2) */
    const float *scales;        /* S (N, groups, rank) */
    const float *offsets;       /* B (N, groups) */
    const float *tables;        /* V (tables, rank, 16), zero past 2^bits entries */
    const int32_t *table_index; /* (N,) which table row n uses */
    int N, K, group_size, groups, rank;
    int wide; /* decode with AVX-512 (the caller checked the CPU has it) */
} lcq_index_weight;

static float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Codebook entries 0-7 and 8-15 of group j of row n. */
static inline void codebook(const lcq_index_weight *w, int n, int j, __m256 *low, __m256 *high) {
    const float *s = w->scales + ((int64_t)n * w->groups + j) * w->rank;
    const float *v = w->tables + (int64_t)w->table_index[n] * w->rank * 16;
    __m256 lo = _mm256_set1_ps(-w->offsets[(int64_t)n * w->groups + j]), hi = lo;
    for (int r = 0; r < w->rank; r++) {
        const __m256 scale = _mm256_set1_ps(s[r]);
        lo = _mm256_fmadd_ps(scale, _mm256_loadu_ps(v + r * 16), lo);
        hi = _mm256_fmadd_ps(scale, _mm256_loadu_ps(v + r * 16 + 8), hi);
    }
    *low = lo;
    *high = hi;
}

/* Weights of 8 indices (one per 32-bit lane). */
static inline __m256 lookup(__m256 low, __m256 high, __m256i index) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, index), _mm256_permutevar8x32_ps(high, index),
                            _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
}

/* The weight of index k of a row from the codebook written out as 16 floats (loop tails). */
static inline float tail_weight(const uint8_t *row, int k, const float *book) {
    const int run = k / 32 * 32, i = k - run;
    const uint8_t byte = row[run / 2 + (i & 15)];
    return book[i < 16 ? byte & 15 : byte >> 4];
}

/* tail[r] += x[r, k'] * weight for k' = k .. stop - 1 (inside one group, whose 16 codebook entries
 * are written out in book): the last indices of a row when K ends inside a run. */
static inline void add_tail(const uint8_t *row, int k, int stop, const float *book, int R, const float *x, int K,
                            float *tail) {
    for (; k < stop; k++) {
        const float weight = tail_weight(row, k, book);
        for (int r = 0; r < R; r++) tail[r] += x[(int64_t)r * K + k] * weight;
    }
}

/* From the run of 32 indices at k, half h (0 or 8): weights k + h .. k + h + 7 (low nibbles) and
 * k + 16 + h .. k + 23 + h (high nibbles). */
static inline void run_weights(const uint8_t *row, int k, int h, __m256 low, __m256 high, __m256 *first,
                               __m256 *second) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + k / 2 + h)));
    *first = lookup(low, high, _mm256_and_si256(bytes, _mm256_set1_epi32(15)));
    *second = lookup(low, high, _mm256_srli_epi32(bytes, 4));
}

/* The instruction-set steps of a decode product. AVX2: a codebook in two registers (entries 0-7 and
 * 8-15), a run of 32 indices as two halves of 8 + 8 weights. */
typedef struct {
    __m256 low, high;
} narrow_book;

static inline narrow_book narrow_codebook(const lcq_index_weight *w, int n, int j) {
    narrow_book book;
    codebook(w, n, j, &book.low, &book.high);
    return book;
}

static inline void narrow_write(narrow_book book, float *entries) {
    _mm256_storeu_ps(entries, book.low);
    _mm256_storeu_ps(entries + 8, book.high);
}

/* acc[r][0] and acc[r][1] += the R activation rows times the run of 32 weights at k. */
static inline __attribute__((always_inline)) void narrow_run(const int R, const uint8_t *row, int k, narrow_book book,
                                                             const float *x, int K, __m256 acc[][2]) {
    for (int h = 0; h < 16; h += 8) {
        __m256 first, second;
        run_weights(row, k, h, book.low, book.high, &first, &second);
        for (int r = 0; r < R; r++) {
            acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (int64_t)r * K + k + h), first, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (int64_t)r * K + k + 16 + h), second, acc[r][1]);
        }
    }
}

static inline float narrow_sum(__m256 a, __m256 b) {
    return horizontal_sum(_mm256_add_ps(a, b));
}

#define AVX512 __attribute__((target("avx512f")))

/* AVX-512: the whole 16-entry codebook in one register; a run of 32 indices in one step, the low
 * nibbles weights k .. k + 15 and the high ones k + 16 .. k + 31. */
typedef __m512 wide_book;

AVX512 static inline wide_book wide_codebook(const lcq_index_weight *w, int n, int j) {
    const float *s = w->scales + ((int64_t)n * w->groups + j) * w->rank;
    const float *v = w->tables + (int64_t)w->table_index[n] * w->rank * 16;
    __m512 book = _mm512_set1_ps(-w->offsets[(int64_t)n * w->groups + j]);
    for (int r = 0; r < w->rank; r++) book = _mm512_fmadd_ps(_mm512_set1_ps(s[r]), _mm512_loadu_ps(v + r * 16), book);
    return book;
}

AVX512 static inline void wide_write(wide_book book, float *entries) {
    _mm512_storeu_ps(entries, book);
}

AVX512 static inline __attribute__((always_inline)) void wide_run(const int R, const uint8_t *row, int k, wide_book book,
                                                                const float *x, int K, __m512 acc[][2]) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + k / 2)));
    const __m512 low = _mm512_permutexvar_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)), book);
    const __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), book);
    for (int r = 0; r < R; r++) {
        acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (int64_t)r * K + k), low, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (int64_t)r * K + k + 16), high, acc[r][1]);
    }
}

AVX512 static inline float wide_sum(__m512 a, __m512 b) {
    return _mm512_reduce_add_ps(_mm512_add_ps(a, b));
}

/* The decode product (fewer than LCQ_GEMM_MIN_ROWS rows) of one instruction set, PREFIX narrow (AVX2) or
 * wide (AVX-512), from that set's steps above: per output column (one OpenMP iteration each), passes
 * of up to PASS_ROWS activation rows over the column's indices; per group a codebook, runs of 32
 * indices, and the scalar tail where K ends inside a run. The column is inlined with R a constant so
 * the accumulators stay in registers. Written once and instantiated twice because AVX-512 intrinsics
 * only inline into functions compiled for AVX-512, so the two cannot share a plain function. */
#define DECODE_PRODUCT(PREFIX, TARGET, VECTOR, ZERO)                                                             \
    TARGET static inline __attribute__((always_inline)) void PREFIX##_column(                                  \
        const int R, const lcq_index_weight *w, int n, const float *x, float *y) {                              \
        const int K = w->K;                                                                                     \
        const uint8_t *row = w->indices + (int64_t)n * (w->groups * w->group_size / 2);                         \
        VECTOR acc[PASS_ROWS][2];                                                                               \
        float tail[PASS_ROWS];                                                                                  \
        for (int r = 0; r < R; r++) {                                                                           \
            acc[r][0] = acc[r][1] = ZERO();                                                                     \
            tail[r] = 0.0f;                                                                                     \
        }                                                                                                       \
        for (int j = 0; j < w->groups && j * w->group_size < K; j++) {                                          \
            const int start = j * w->group_size, stop = start + w->group_size < K ? start + w->group_size : K; \
            const PREFIX##_book book = PREFIX##_codebook(w, n, j);                                              \
            int k = start;                                                                                      \
            for (; k + 32 <= stop; k += 32) PREFIX##_run(R, row, k, book, x, K, acc);                           \
            if (k < stop) {                                                                                     \
                float entries[16];                                                                              \
                PREFIX##_write(book, entries);                                                                  \
                add_tail(row, k, stop, entries, R, x, K, tail);                                                 \
            }                                                                                                   \
        }                                                                                                       \
        for (int r = 0; r < R; r++) y[(int64_t)r * w->N + n] = PREFIX##_sum(acc[r][0], acc[r][1]) + tail[r];    \
    }                                                                                                           \
                                                                                                                \
    TARGET static void PREFIX##_decode_product(const lcq_index_weight *w, const float *x, int M, float *y) {     \
        _Pragma("omp parallel for schedule(static)") for (int n = 0; n < w->N; n++) {                           \
            for (int m = 0; m < M; m += PASS_ROWS) {                                                            \
                const float *rows = x + (int64_t)m * w->K;                                                      \
                float *out = y + (int64_t)m * w->N;                                                             \
                switch (M - m) {                                                                                \
                    case 1: PREFIX##_column(1, w, n, rows, out); break;                                         \
                    case 2: PREFIX##_column(2, w, n, rows, out); break;                                         \
                    case 3: PREFIX##_column(3, w, n, rows, out); break;                                         \
                    default: PREFIX##_column(PASS_ROWS, w, n, rows, out); break;                                \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
    }

DECODE_PRODUCT(narrow, , __m256, _mm256_setzero_ps)
DECODE_PRODUCT(wide, AVX512, __m512, _mm512_setzero_ps)

/* Rows first .. first + count - 1 of the weight as fp32 (count, K), the exact codebook entries, for
 * cpu_gemm.c. */
static void expand(const void *weight, int K, int first, int count, float *out) {
    const lcq_index_weight *w = weight;
    for (int n = first; n < first + count; n++) {
        const uint8_t *row = w->indices + (int64_t)n * (w->groups * w->group_size / 2);
        float *dst = out + (int64_t)(n - first) * K;
        for (int j = 0; j < w->groups && j * w->group_size < K; j++) {
            const int start = j * w->group_size, stop = start + w->group_size < K ? start + w->group_size : K;
            __m256 low, high;
            codebook(w, n, j, &low, &high);
            int k = start;
            for (; k + 32 <= stop; k += 32)
                for (int h = 0; h < 16; h += 8) {
                    __m256 lower, upper;
                    run_weights(row, k, h, low, high, &lower, &upper);
                    _mm256_storeu_ps(dst + k + h, lower);
                    _mm256_storeu_ps(dst + k + 16 + h, upper);
                }
            if (k < stop) {
                float book[16];
                _mm256_storeu_ps(book, low);
                _mm256_storeu_ps(book + 8, high);
                for (; k < stop; k++) dst[k] = tail_weight(row, k, book);
            }
        }
    }
}

/* x (M, K) fp32 contiguous, M >= 1; y (M, N) fp32. Returns 0, or -1 when M < 1 or a large
 * product's expansion buffers cannot be allocated. */
int lcq_index_matmul(const float *x, int M, const void *weight, float *y) {
    const lcq_index_weight *w = weight;
    if (M < 1) return -1;
    if (M >= LCQ_GEMM_MIN_ROWS) return lcq_expanded_product(x, M, w->K, w->N, expand, w, y);
    if (w->wide)
        wide_decode_product(w, x, M, y);
    else
        narrow_decode_product(w, x, M, y);
    return 0;
}
