/* The int8 decode product of an LCQ weight with books (lcq_index_byte_books) at 2 and 4 bits on CPUs with AVX2
 * but not the AVX-512 int8 form (cpu_index_bytes.c): vpshufb looks 32 weights up at once in a group's book of
 * bytes, where the fp32 form's vpermps looks up 8 (and at 4 bits spends two and a blend on them).
 *
 * A vector of 8 index words (half a run, cpu_index.h) becomes one of fields by a vpshufb that puts byte d of
 * each 128-bit lane's 4 words into its 32-bit lane d: each 32-bit lane then holds fields of one block of 64
 * values, so vpmaddubsw and vpmaddwd can sum its 4 products within the block. Plane p of it (a shift and a
 * mask) is field (8 / b) d + p of each word: 32 indices, looked up by one vpshufb in a table of the run's
 * books (4 bits: one book, or two blended by 32-bit lane where the run's two blocks lie in two groups; 2 bits:
 * the 4 entries of each of the run's 4 blocks' books, the lane's block chosen by the index's bits 2-3). The
 * activations are quantized per block of 64 as the AVX-512 form's are (lcq_quantize_row's scales and bytes)
 * and put in the planes' order once per call. vpmaddubsw multiplies unsigned by signed bytes, so weights q
 * (-127..127) multiply as |q| times the activations with q's sign, whose pairs' sums fit 16 bits. A run's
 * int32 sums become fp32 times its blocks' book and activation scales, per 32-bit lane.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_gemm.h"
#include "cpu_index.h"

/* Values per run: 16 words of 32 / BITS fields. */
#define RUN_VALUES(BITS) (16 * (32 / (BITS)))

/* Activations of a shuffle product, per row and run: its bytes in the planes' order (2 halves x 8 / BITS
 * planes x 32 bytes; zero past the last whole step) and per 32-bit lane j of a plane its block's scale / 127
 * (the weights' 127 cancelled: a book's scale is its top). */
typedef struct {
    int8_t *bytes;
    float *scales;
    int32_t *groups; /* per block of the runs, the group whose book it reads (the last one past K) */
    int32_t *picks;  /* 2 bits: per run and 32-bit lane j, 2 (group of block j % 4 - the run's first group) */
    int runs;
} shuffle_activations;

/* The 32-bit lane (of the run's K-order bytes) that lane t of the planes' order holds: plane vector
 * (h, p), lane 4 L + d holds the 4 values of words 8 h + 4 L .. of field (8 / BITS) d + p. */
static inline int plane_source(const int BITS, int t) {
    const int planes = 8 / BITS, vector = t / 8, h = vector / planes, p = vector % planes;
    const int L = t % 8 / 4, d = t % 4, field = planes * d + p;
    return 4 * field + 2 * h + L;
}

/* Block b's 64 values (zeros past K) as signed bytes q = round(v * 127 / max |v|) into out, returning the
 * block's scale max |v| / 127 (NaN for a block with a NaN, inf with +-inf: lcq_quantize_row's odd_block). */
static inline float quantize_block(const float *values, int8_t *out) {
    __m256i largest = _mm256_setzero_si256();
    const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF);
    for (int i = 0; i < 8; i++)
        largest = _mm256_max_epi32(largest, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(values + 8 * i)),
                                                              magnitude));
    int32_t lanes[8], top_bits = 0;
    _mm256_storeu_si256((__m256i *)lanes, largest);
    for (int i = 0; i < 8; i++) top_bits = lanes[i] > top_bits ? lanes[i] : top_bits;
    if (top_bits >= LCQ_INF_BITS) {
        const int nan = top_bits > LCQ_INF_BITS;
        for (int i = 0; i < 64; i++) out[i] = (int8_t)(nan || !isinf(values[i]) ? 0 : values[i] > 0.0f ? 127 : -127);
        return nan ? NAN : INFINITY;
    }
    float top;
    memcpy(&top, &top_bits, sizeof(top));
    const __m256 inverse = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
    __m256i q[8];
    for (int i = 0; i < 8; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(values + 8 * i), inverse));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* the packs interleave 128-bit lanes */
    for (int i = 0; i < 2; i++) {
        const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[4 * i], q[4 * i + 1]),
                                                  _mm256_packs_epi32(q[4 * i + 2], q[4 * i + 3]));
        _mm256_storeu_si256((__m256i *)(out + 32 * i), _mm256_permutevar8x32_epi32(packed, order));
    }
    return top / 127.0f;
}

/* Into the calling thread's scratch buffer (lcq_scratch): returns 0, or -1 when it cannot grow. */
static int shuffle_activations_of(const int BITS, const lcq_index_weight *w, const float *x, int M,
                                  shuffle_activations *a) {
    const int K = w->K;
    const int whole = K / 16 * 16, run_values = RUN_VALUES(BITS), runs = (whole + run_values - 1) / run_values;
    const int blocks = (K + 63) / 64, run_blocks = run_values / 64;
    const int padded = blocks * 64 > runs * run_values ? blocks * 64 : runs * run_values;
    const size_t row_values = (sizeof(float) * (size_t)padded + 63) / 64 * 64;
    const size_t row_bytes = ((size_t)padded + 63) / 64 * 64;
    const size_t plane_bytes = (size_t)M * runs * run_values, lanes = (size_t)M * runs * 8;
    uint8_t *buffer = lcq_scratch(row_values + row_bytes + sizeof(float) * blocks + plane_bytes +
                                  sizeof(float) * lanes + sizeof(int32_t) * runs * (run_blocks + 8));
    if (buffer == NULL) return -1;
    float *values = (float *)buffer, *block_scales = (float *)(buffer + row_values + row_bytes);
    int8_t *bytes = (int8_t *)(buffer + row_values);
    a->bytes = (int8_t *)(block_scales + blocks);
    a->scales = (float *)(a->bytes + plane_bytes);
    a->groups = (int32_t *)(a->scales + lanes);
    a->picks = a->groups + runs * run_blocks;
    a->runs = runs;
    for (int b = 0; b < runs * run_blocks; b++) {
        const int group = b * 64 / w->group_size;
        a->groups[b] = group < w->groups ? group : w->groups - 1;
    }
    for (int run = 0; run < runs; run++)
        for (int j = 0; j < 8; j++)
            a->picks[run * 8 + j] = 2 * (a->groups[run * run_blocks + j % run_blocks] - a->groups[run * run_blocks]);
    for (int m = 0; m < M; m++) {
        memcpy(values, x + (int64_t)m * K, sizeof(float) * K);
        memset(values + K, 0, sizeof(float) * (padded - K));
        for (int b = 0; b < blocks; b++)
            block_scales[b] = quantize_block(values + 64 * b, bytes + 64 * b) / 127.0f;
        memset(bytes + whole, 0, padded - whole); /* values past the last whole step are fp32 (the tails) */
        const uint32_t *source = (const uint32_t *)bytes;
        uint32_t *planes = (uint32_t *)(a->bytes + (int64_t)m * runs * run_values);
        float *scales = a->scales + (int64_t)m * runs * 8;
        for (int run = 0; run < runs; run++) {
            for (int j = 0; j < 8; j++) { /* lane j's block: 4 bits (j % 4) / 2, 2 bits j % 4 */
                const int b = run * run_blocks + (BITS == 4 ? j % 4 / 2 : j % 4);
                scales[run * 8 + j] = b < blocks ? block_scales[b] : 0.0f;
            }
            for (int t = 0; t < run_values / 4; t++)
                planes[run * run_values / 4 + t] = source[run * run_values / 4 + plane_source(BITS, t)];
        }
    }
    return 0;
}

/* One table and the book scales of a run's 32-bit lanes: at 4 bits the book of the run's first block (and
 * `second`, that of its second block where it lies in another group), at 2 bits the 4 blocks' books in
 * entries 4 d .. 4 d + 3 of both 128-bit lanes; their bytes q + 128 made signed. */
typedef struct {
    __m256i table, second;
    __m256 tops;
    int two;
} shuffle_books;

/* groups: the run's blocks' (shuffle_activations); picks: the run's, at 2 bits. The 4 blocks of a 2-bit run lie in
 * at most 4 consecutive groups, whose 8-byte records (a top, then 4 entries) one 32-byte load holds: one vpermd
 * takes each lane's block's top, another its entries (a scalar load per record and a set of the four, per run,
 * had been a quarter of the W2 form's instructions at one row). */
static inline __attribute__((always_inline)) shuffle_books run_books(const int BITS, const uint8_t *books,
                                                                     const int32_t *groups, const int32_t *picks) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    shuffle_books book;
    if (BITS == 4) {
        const uint8_t *first = books + (int64_t)groups[0] * LCQ_BOOK_BYTES(4);
        const uint8_t *second = books + (int64_t)groups[1] * LCQ_BOOK_BYTES(4);
        book.table = _mm256_xor_si256(
            _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(first + sizeof(float)))), flip);
        book.two = groups[1] != groups[0];
        book.second = book.two ? _mm256_xor_si256(_mm256_broadcastsi128_si256(
                                                      _mm_loadu_si128((const __m128i *)(second + sizeof(float)))),
                                                  flip)
                               : book.table;
        book.tops = _mm256_blend_ps(_mm256_broadcast_ss((const float *)first),
                                    _mm256_broadcast_ss((const float *)second), 0xCC);
    } else {
        const __m256i records = _mm256_loadu_si256((const __m256i *)(books + (int64_t)groups[0] * LCQ_BOOK_BYTES(2)));
        const __m256i pick = _mm256_loadu_si256((const __m256i *)picks);
        book.tops = _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(records, pick));
        book.table = book.second = _mm256_xor_si256(
            _mm256_permutevar8x32_epi32(records, _mm256_add_epi32(pick, _mm256_set1_epi32(1))), flip);
        book.two = 0;
    }
    return book;
}

/* sums[r][c] and tails[r][c]: column c of a tile (row n) for R activation rows from row m. */
static inline __attribute__((always_inline)) void shuffle_column(const int R, const int BITS,
                                                                 const lcq_index_weight *w, int n,
                                                                 const shuffle_activations *a, int m, const float *x,
                                                                 __m256 sums[][TILE_COLUMNS],
                                                                 float tails[][TILE_COLUMNS], int c) {
    const int planes = 8 / BITS, run_values = RUN_VALUES(BITS);
    const uint8_t *row = w->indices + (int64_t)n * w->row_bytes;
    const uint8_t *books = w->books + (int64_t)n * w->groups * LCQ_BOOK_BYTES(BITS);
    ask_row_ahead(w, n, (int64_t)w->groups * LCQ_BOOK_BYTES(BITS));
    /* per 128-bit lane: 32-bit lane d = byte d of the lane's 4 words */
    const __m256i gather = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5,
                                            9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m256i mask = _mm256_set1_epi8((1 << BITS) - 1), ones = _mm256_set1_epi16(1);
    const __m256i slots = _mm256_setr_epi32(0, 0x04040404, 0x08080808, 0x0C0C0C0C, 0, 0x04040404, 0x08080808,
                                            0x0C0C0C0C); /* 2 bits: lane d's book, entries 4 d .. */
    __m256 acc[INT8_PASS_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int run = 0; run < a->runs; run++) {
        const shuffle_books book = run_books(BITS, books, a->groups + run * (run_values / 64), a->picks + run * 8);
        const narrow_words words = narrow_load(row + (int64_t)run * 64, run < w->runs ? 4 : w->last_lane_bytes);
        __m256i dots[INT8_PASS_ROWS];
        for (int r = 0; r < R; r++) dots[r] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i fields = _mm256_shuffle_epi8(h ? words.second : words.first, gather);
#pragma GCC unroll 4
            for (int p = 0; p < planes; p++) {
                const __m256i index = _mm256_and_si256(p ? _mm256_srli_epi16(fields, BITS * p) : fields, mask);
                __m256i weights;
                if (BITS == 2)
                    weights = _mm256_shuffle_epi8(book.table, _mm256_or_si256(index, slots));
                else if (book.two)
                    weights = _mm256_blend_epi32(_mm256_shuffle_epi8(book.table, index),
                                                 _mm256_shuffle_epi8(book.second, index), 0xCC);
                else
                    weights = _mm256_shuffle_epi8(book.table, index);
                const __m256i magnitudes = _mm256_abs_epi8(weights);
                const int64_t at = (int64_t)run * run_values + (h * planes + p) * 32;
                for (int r = 0; r < R; r++) {
                    const __m256i values =
                        _mm256_loadu_si256((const __m256i *)(a->bytes + (int64_t)(m + r) * a->runs * run_values + at));
                    dots[r] = _mm256_add_epi32(
                        dots[r], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitudes, _mm256_sign_epi8(values, weights)),
                                                   ones));
                }
            }
        }
        for (int r = 0; r < R; r++) {
            const __m256 scales = _mm256_loadu_ps(a->scales + ((int64_t)(m + r) * a->runs + run) * 8);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r]), _mm256_mul_ps(book.tops, scales), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) sums[r][c] = acc[r];
    tail_sums(R, w, n, x, m, tails, c);
}

static inline __attribute__((always_inline)) void shuffle_tile(const int R, const int BITS, const lcq_index_weight *w,
                                                               int n0, int count, const shuffle_activations *a, int m,
                                                               const float *x, float *y) {
    __m256 sums[INT8_PASS_ROWS][TILE_COLUMNS];
    float tails[INT8_PASS_ROWS][TILE_COLUMNS];
    for (int c = 0; c < count; c++) shuffle_column(R, BITS, w, n0 + c, a, m, x, sums, tails, c);
    for (int r = 0; r < R; r++) narrow_reduce(sums[r], tails[r], count, y + (int64_t)(m + r) * w->N + n0);
}

FOUR_ROW_TILES(shuffle, , shuffle_activations, 2)
FOUR_ROW_TILES(shuffle, , shuffle_activations, 4)

int lcq_index_shuffle_product(const lcq_index_weight *w, const float *x, int M, float *y) {
    shuffle_activations a;
    if (w->bits == 2) {
        if (shuffle_activations_of(2, w, x, M, &a)) return -1;
        shuffle_tiles_2(w, &a, x, M, y);
    } else {
        if (shuffle_activations_of(4, w, x, M, &a)) return -1;
        shuffle_tiles_4(w, &a, x, M, y);
    }
    return 0;
}
