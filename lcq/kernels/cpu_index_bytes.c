/* The int8 forms of an LCQ weight kept as its indices (cpu_index.h), with AVX-512 VNNI and VBMI: its rows
 * in cpu_gemm.c's int8 form (expanded per block of rows for the blocked products, or kept whole), each
 * group's codebook in bytes (books), and the int8 decode product that looks weights up in those books.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_gemm.h"
#include "cpu_index.h"

#define PACK_BLOCK_ROWS 64 /* rows per task of lcq_index_byte_rows: whole panels of 32 */

/* tops (N, ceil(K / 64)) = the largest |entry| of the codebooks that each block of 64 values along
 * a row meets (all 2^b entries of each): the int8 expansion's scale of the block, found once when a
 * weight is set up (AVX-512 weights). */
AVX512 void lcq_index_block_tops(const void *weight, float *tops) {
    const lcq_index_weight *w = weight;
    const int blocks = lcq_scale_blocks((w->K + 3) / 4), block_values = 4 * LCQ_SCALE_WORDS;
    for (int n = 0; n < w->N; n++) {
        const wide_table table = wide_table_of(w, n, 0);
        float *row = tops + (int64_t)n * blocks;
        for (int b = 0; b < blocks; b++) row[b] = 0.0f;
        for (int j = 0; j < w->groups; j++) {
            const float top = _mm512_reduce_max_ps(_mm512_abs_ps(wide_codebook(w, &table, 0, n, j)));
            const int last = ((j + 1) * w->group_size < w->K ? (j + 1) * w->group_size : w->K) - 1;
            for (int b = j * w->group_size / block_values; b <= last / block_values; b++)
                row[b] = row[b] > top ? row[b] : top;
        }
    }
}

/* A codebook as 16 unsigned bytes q + 128, q = round(entry * inverse): group scales s (rank) and
 * offset, the row's table v (rank x 16). */
LCQ_INT8 static inline __m128i byte_book(const float *s, float offset, const float *v, int rank, float inverse) {
    __m512 book = _mm512_set1_ps(-offset);
    for (int r = 0; r < rank; r++) book = _mm512_fmadd_ps(_mm512_set1_ps(s[r]), _mm512_loadu_ps(v + r * 16), book);
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(book, _mm512_set1_ps(inverse)));
    return _mm512_cvtepi32_epi8(_mm512_add_epi32(q, _mm512_set1_epi32(128)));
}

/* The fields of the 4 steps of a block, as wide_byte_row takes them with vpmultishiftqb: byte u of
 * each 64-bit lane (words 2q and 2q + 1) is field u / 2 of word 2q + u % 2, which starts at bit
 * 32 (u % 2) + BITS (u / 2) of the lane. */
static inline uint64_t step_shifts(int bits) {
    uint64_t shifts = 0;
    for (int u = 0; u < 8; u++) shifts |= (uint64_t)(32 * (u % 2) + bits * (u / 2)) << 8 * u;
    return shifts;
}

/* The fields of `count` whole steps from step `first` (a multiple of 4: a block of 64 values) of a row,
 * unmasked, as vpmultishiftqb takes them out of the run's words with `shifts` (step_shifts): each
 * 64-bit lane holds words 2q and 2q + 1, and its 8 bytes become their fields for the 4 steps; a block
 * that runs into the next run, at 3 bits, takes its later steps from there. */
LCQ_INT8 static inline __attribute__((always_inline)) __m512i block_fields(const int BITS, const lcq_index_weight *w,
                                                                          const uint8_t *row, __m512i shifts,
                                                                          int first, int count) {
    const int fields = 32 / BITS, run = first / fields, field = first % fields;
    __m512i picked =
        _mm512_multishift_epi64_epi8(_mm512_add_epi8(shifts, _mm512_set1_epi8((char)(BITS * field))),
                                     wide_load(row + (int64_t)run * 64, run < w->runs ? 4 : w->last_lane_bytes));
    if (field + count > fields) { /* steps fields - field .. come from the next run */
        const uint64_t later = (0xFFull << 2 * (fields - field) & 0xFF) * 0x0101010101010101ull;
        picked = _mm512_mask_multishift_epi64_epi8(
            picked, later, _mm512_add_epi8(shifts, _mm512_set1_epi8((char)(BITS * (field - fields)))),
            wide_load(row + (int64_t)(run + 1) * 64, run + 1 < w->runs ? 4 : w->last_lane_bytes));
    }
    return picked;
}

/* Byte 16 s + 2 q + p (value 16 s + i of the block, i = 2q + p) is byte 8 q + 2 s + p of those. */
static const uint8_t K_ORDER[64] = {0, 1, 8,  9,  16, 17, 24, 25, 32, 33, 40, 41, 48, 49, 56, 57,
                                    2, 3, 10, 11, 18, 19, 26, 27, 34, 35, 42, 43, 50, 51, 58, 59,
                                    4, 5, 12, 13, 20, 21, 28, 29, 36, 37, 44, 45, 52, 53, 60, 61,
                                    6, 7, 14, 15, 22, 23, 30, 31, 38, 39, 46, 47, 54, 55, 62, 63};

/* Row n in cpu_gemm.c's unsigned int8 form (BITS a constant where inlined), one block of 64 values (4
 * steps) at a time. A block's scale bounds the codebooks of the groups it meets (their 2^b entries,
 * w->tops), whose bytes make its table (a first group in bytes 0-15, a second from the block's middle
 * in 16-31). block_fields takes the block's fields out of the run's words, a ternary-logic op masks
 * them and adds the second group's offset, vpermb looks the 64 up in the table and a second vpermb
 * puts them in K order. inverses: a buffer of one float per block. */
LCQ_INT8 static inline __attribute__((always_inline)) void wide_byte_row(const int BITS, const lcq_index_weight *w,
                                                                         int n, float *inverses, uint32_t *out) {
    const int K = w->K, whole = K / 16 * 16, steps = K / 16, words = (K + 3) / 4;
    const int blocks = lcq_scale_blocks(words), block_values = 4 * LCQ_SCALE_WORDS, group_size = w->group_size;
    const int rank = w->rank;
    const uint8_t *row = w->indices + (int64_t)n * w->row_bytes;
    const float *tops = w->tops + (int64_t)n * blocks, *offsets = w->offsets + (int64_t)n * w->groups;
    const float *scales = w->scales + (int64_t)n * w->groups * rank;
    const float *table_row = w->tables + (int64_t)w->table_index[n] * rank * 16;
    uint8_t *bytes = (uint8_t *)out;
    float *block_scales = (float *)(out + words);
    int32_t *block_offsets = (int32_t *)(out + words + blocks);
    /* The blocks' scales (largest entry / 127) and inverses (127 / largest entry, 0 for 0). */
    for (int b = 0; b < blocks; b += 16) {
        const __mmask16 lanes = blocks - b >= 16 ? 0xFFFF : (__mmask16)((1u << (blocks - b)) - 1);
        const __m512 top = _mm512_maskz_loadu_ps(lanes, tops + b);
        _mm512_mask_storeu_ps(inverses + b, lanes,
                              _mm512_maskz_div_ps(_mm512_cmp_ps_mask(top, _mm512_setzero_ps(), _CMP_GT_OQ),
                                                  _mm512_set1_ps(127.0f), top));
        _mm512_mask_storeu_ps(block_scales + b, lanes, _mm512_div_ps(top, _mm512_set1_ps(127.0f)));
        _mm512_mask_storeu_epi32(block_offsets + b, lanes, _mm512_setzero_si512());
    }
    const __m512i shifts = _mm512_set1_epi64((long long)step_shifts(BITS));
    const __m512i field_mask = _mm512_set1_epi8((1 << BITS) - 1);
    const __m512i order = _mm512_loadu_si512(K_ORDER), later_steps = _mm512_set1_epi64(0x1010101000000000);
    for (int b = 0, group = 0, group_end = group_size; b < blocks; b++) {
        const int k0 = b * block_values;
        while (k0 >= group_end) {
            group++;
            group_end += group_size;
        }
        /* The table: bytes 0-15 the codebook of steps 0 and 1, 16-31 that of steps 2 and 3 (the same,
         * or the next group's from the block's middle). */
        const __m128i book = byte_book(scales + group * rank, offsets[group], table_row, rank, inverses[b]);
        const int second = (k0 + block_values < K ? k0 + block_values : K) > group_end;
        const __m512i table = _mm512_inserti32x4(
            _mm512_castsi128_si512(book),
            second ? byte_book(scales + (group + 1) * rank, offsets[group + 1], table_row, rank, inverses[b]) : book,
            1);
        const int first = 4 * b, count = steps - first < 4 ? steps - first : 4; /* whole steps in the block */
        if (count > 0) {
            const __m512i picked = block_fields(BITS, w, row, shifts, first, count);
            /* (picked & field_mask) | 16 for steps 2 and 3: ternary-logic table 0xEA is (A & B) | C */
            const __m512i entries = _mm512_ternarylogic_epi32(picked, field_mask, later_steps, 0xEA);
            const __m512i values = _mm512_permutexvar_epi8(order, _mm512_permutexvar_epi8(entries, table));
            _mm512_mask_storeu_epi8(bytes + k0, count == 4 ? ~0ull : (1ull << 16 * count) - 1, values);
        }
        if (whole < K && whole >= k0 && whole < k0 + block_values) {
            float tail[16];
            tail_weights(w, n, whole, tail);
            for (int i = whole; i < K; i++) /* rounded to nearest even, as the vector steps are */
                bytes[i] = (uint8_t)(_mm_cvtss_si32(_mm_set_ss(tail[i - whole] * inverses[b])) + 128);
        }
    }
    for (int i = K; i < 4 * words; i++) bytes[i] = 128; /* zeros */
}

/* Rows first .. first + count - 1 in the unsigned int8 form (an lcq_expand_byte_rows). */
LCQ_INT8 int lcq_index_expand_bytes(const void *weight, int K, int first, int count, uint32_t *out) {
    const lcq_index_weight *w = weight;
    const int row_words = lcq_byte_row_words((K + 3) / 4);
    const int blocks = lcq_scale_blocks((K + 3) / 4);
    float *inverses = malloc(sizeof(float) * (size_t)blocks);
    if (inverses == NULL) return -1;
    for (int n = first; n < first + count; n++) {
        uint32_t *row = out + (int64_t)(n - first) * row_words;
        switch (w->bits) {
            case 2: wide_byte_row(2, w, n, inverses, row); break;
            case 3: wide_byte_row(3, w, n, inverses, row); break;
            default: wide_byte_row(4, w, n, inverses, row); break;
        }
    }
    free(inverses);
    return 0;
}

/* The int8 form of every row of a wide weight as panels (lcq_word_panels: lcq_index_byte_words(N, K)
 * words) into out, for int8 products to read in place of expanding a block of rows per call; returns
 * 0, or -1 for a weight without the form (not wide) or a failed allocation. */
LCQ_INT8 int lcq_index_byte_rows(const void *weight, uint32_t *out) {
    const lcq_index_weight *w = weight;
    if (!w->wide) return -1;
    const int words = lcq_byte_row_words((w->K + 3) / 4);
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        uint32_t *rows = malloc(sizeof(uint32_t) * PACK_BLOCK_ROWS * (size_t)words);
        failed |= rows == NULL;
#pragma omp for schedule(static)
        for (int first = 0; first < w->N; first += PACK_BLOCK_ROWS) {
            const int count = w->N - first < PACK_BLOCK_ROWS ? w->N - first : PACK_BLOCK_ROWS;
            if (rows == NULL || lcq_index_expand_bytes(weight, w->K, first, count, rows) != 0) {
                failed = 1;
                continue;
            }
            lcq_word_panels(rows, count, words, out + (int64_t)first * words);
        }
        free(rows);
    }
    return failed ? -1 : 0;
}

int64_t lcq_index_byte_words(int N, int K) {
    return (int64_t)(N + 31) / 32 * 32 * lcq_byte_row_words((K + 3) / 4);
}

/* Books (N, groups) records of LCQ_BOOK_BYTES(bits) (cpu_index.h) for the int8 decode products, this file's and
 * cpu_index_shuffles.c's: each group's top, the largest |entry| of its codebook, as a float, then the codebook
 * in the unsigned bytes of the int8 form, q + 128 with q = round(entry * 127 / top): for group sizes that are
 * multiples of 64, where each block of 64 values lies in one group, the bytes and scale wide_byte_row gives its
 * blocks (the entries are the same multiply-adds, so the same floats). AVX2, for either form. */
void lcq_index_byte_books(const void *weight, uint8_t *books) {
    const lcq_index_weight *w = weight;
    for (int n = 0; n < w->N; n++) {
        const narrow_table table = narrow_table_of(w, n, 0);
        for (int j = 0; j < w->groups; j++) {
            float entries[16], top = 0.0f;
            narrow_write(narrow_codebook(w, &table, 0, n, j), entries);
            for (int e = 0; e < 16; e++) top = fabsf(entries[e]) > top ? fabsf(entries[e]) : top;
            const __m256 inverse = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
            uint8_t *record = books + ((int64_t)n * w->groups + j) * LCQ_BOOK_BYTES(w->bits);
            memcpy(record, &top, sizeof(float));
            for (int half = 0; half < 2; half++) {
                int32_t q[8];
                _mm256_storeu_si256((__m256i *)q,
                                    _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(entries + 8 * half), inverse)));
                for (int e = 0; e < 8 && 8 * half + e < 1 << w->bits; e++)
                    record[sizeof(float) + 8 * half + e] = (uint8_t)(q[e] + 128);
            }
        }
    }
}

/* The int8 decode product (a weight with books, up to lcq_byte_decode_rows rows, in passes of 4): per
 * block of 64 values the fields of its 4 steps (block_fields), masked, looked up in the group's book by
 * one vpermb, then one vpdpbusd per activation row with the row's bytes, put in the fields' order once
 * per call. Where the fp32 form spends a permute, a shift and an FMA on 16 weights, this spends three
 * operations on 64 and three per activation row, and reads a book in place of S and B. A block's int32
 * sums (started at the activations' offset) become fp32 times the activations' scale into the group's
 * sums, which take the weight's scale when the group ends. The bytes of the int8 blocked product (the
 * activations quantize_row's, the weights' its expansion's), so the same sums but for their order;
 * weights past the last whole step stay fp32, as in the fp32 form. */

/* Activations of an int8 decode product, per row and block: 64 signed bytes in block_fields' order (zero
 * past the last whole step), -128 * their sum (the weights' + 128 cancelled) and their scale / 127 (the
 * weights' 127 cancelled: a book's scale is its top). */
typedef struct {
    int8_t *bytes;
    int32_t *offsets;
    float *scales;
    int blocks;
} byte_activations;

/* Value 16 s + 2 q + p of a block is byte 8 q + 2 s + p of block_fields (K_ORDER's inverse). */
static const uint8_t FIELD_ORDER[64] = {0,  1,  16, 17, 32, 33, 48, 49, 2,  3,  18, 19, 34, 35, 50, 51,
                                        4,  5,  20, 21, 36, 37, 52, 53, 6,  7,  22, 23, 38, 39, 54, 55,
                                        8,  9,  24, 25, 40, 41, 56, 57, 10, 11, 26, 27, 42, 43, 58, 59,
                                        12, 13, 28, 29, 44, 45, 60, 61, 14, 15, 30, 31, 46, 47, 62, 63};

/* Into the calling thread's scratch buffer (lcq_scratch): returns 0, or -1 when it cannot grow. */
LCQ_INT8 static int byte_activations_of(const float *x, int M, int K, byte_activations *a) {
    const int words = (K + 3) / 4, blocks = lcq_scale_blocks(words), whole = K / 16 * 16;
    const size_t row_bytes = (sizeof(uint32_t) * (size_t)lcq_byte_row_words(words) + 63) / 64 * 64;
    const size_t count = (size_t)M * blocks, byte_bytes = 64 * count;
    uint8_t *buffer = lcq_scratch(row_bytes + byte_bytes + (sizeof(int32_t) + sizeof(float)) * count);
    if (buffer == NULL) return -1;
    uint32_t *row = (uint32_t *)buffer;
    a->blocks = blocks;
    a->bytes = (int8_t *)(buffer + row_bytes);
    a->offsets = (int32_t *)(buffer + row_bytes + byte_bytes);
    a->scales = (float *)(a->offsets + count);
    const __m512i order = _mm512_loadu_si512(FIELD_ORDER), ones = _mm512_set1_epi8(1);
    for (int m = 0; m < M; m++) {
        lcq_quantize_row(x + (int64_t)m * K, K, row);
        const float *scales = (const float *)(row + words);
        for (int b = 0; b < blocks; b++) {
            const int64_t at = (int64_t)m * blocks + b;
            const int left = whole - 64 * b <= 0 ? 0 : whole - 64 * b < 64 ? whole - 64 * b : 64;
            const __m512i bytes =
                _mm512_maskz_loadu_epi8(left == 64 ? ~0ull : (1ull << left) - 1, (const int8_t *)row + 64 * b);
            _mm512_storeu_si512(a->bytes + at * 64, _mm512_permutexvar_epi8(order, bytes));
            a->offsets[at] = -128 * _mm512_reduce_add_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, bytes));
            a->scales[at] = scales[b] / 127.0f;
        }
    }
    return 0;
}

/* A column's sums: per activation row all groups' so far and the group's, and the group's book. */
typedef struct {
    __m512 acc[INT8_PASS_ROWS], group[INT8_PASS_ROWS]; /* (two chains alternating blocks spilled at 2-4 rows) */
    __m512i table;
    const uint8_t *book; /* the group's record */
    int left;            /* blocks left in the group */
} byte_sums;

/* The group's sums times its weight scale into acc. */
LCQ_INT8 static inline __attribute__((always_inline)) void byte_group_end(const int R, byte_sums *st) {
    const __m512 scale = _mm512_set1_ps(*(const float *)st->book);
    for (int r = 0; r < R; r++) st->acc[r] = _mm512_fmadd_ps(st->group[r], scale, st->acc[r]);
}

/* One block of byte_column (picked: its fields), from activation row m; a new group first ends the last.
 * Each row's sums start at its block offset in lane 0, put there by a zero-masked broadcast: with a
 * masked load of that one lane, the products ran 1.01-1.14x slower at W4 g64 and 1.07-1.42x at W2 g128
 * (two builds alternating, SmolLM2's and Llama 3.2 1B's shapes, 1-2 rows, weights from memory). */
LCQ_INT8 static inline __attribute__((always_inline)) void byte_block(const int R, const int BITS, byte_sums *st,
                                                                      int group_blocks, __m512i picked,
                                                                      const byte_activations *a, int m, int b) {
    if (st->left == 0) {
        if (b > 0) {
            byte_group_end(R, st);
            st->book += LCQ_BOOK_BYTES(BITS);
        }
        for (int r = 0; r < R; r++) st->group[r] = _mm512_setzero_ps();
        st->table = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(st->book + sizeof(float))));
        st->left = group_blocks;
    }
    st->left--;
    const __m512i weights =
        _mm512_permutexvar_epi8(_mm512_and_si512(picked, _mm512_set1_epi8((1 << BITS) - 1)), st->table);
    for (int r = 0; r < R; r++) {
        const int64_t at = (int64_t)(m + r) * a->blocks + b;
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_maskz_set1_epi32(1, a->offsets[at]), weights,
                                                _mm512_loadu_si512(a->bytes + at * 64));
        st->group[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(a->scales[at]), st->group[r]);
    }
}

/* sums[r][c] and tails[r][c]: column c of a tile (row n) for R activation rows from row m. Whole blocks
 * go a span of runs at a time (one run of 4 blocks at 2 bits, of 2 at 4; two runs of 5 at 3), their
 * fields taken with constant shifts (block_fields per block, its counts and branches, ran at 0.6-0.8x
 * the fp32 form); a last block of 1-3 steps, block_fields. */
LCQ_INT8 static inline __attribute__((always_inline)) void byte_column(const int R, const int BITS,
                                                                       const lcq_index_weight *w, int n,
                                                                       const byte_activations *a, int m,
                                                                       const float *x, __m512 sums[][TILE_COLUMNS],
                                                                       float tails[][TILE_COLUMNS], int c) {
    const int steps = w->K / 16, blocks = (steps + 3) / 4, group_blocks = w->group_size / 64;
    const int fields = 32 / BITS, span_runs = BITS == 3 ? 2 : 1, span_blocks = span_runs * fields / 4;
    const uint8_t *row = w->indices + (int64_t)n * w->row_bytes;
    const __m512i shifts = _mm512_set1_epi64((long long)step_shifts(BITS));
    byte_sums st;
    st.book = w->books + (int64_t)n * w->groups * LCQ_BOOK_BYTES(BITS);
    ask_row_ahead(w, n, (int64_t)w->groups * LCQ_BOOK_BYTES(BITS));
    st.left = 0;
    for (int r = 0; r < R; r++) st.acc[r] = st.group[r] = _mm512_setzero_ps();
    st.table = _mm512_setzero_si512();
    const int whole_blocks = steps / 4;
    int b = 0;
    for (int run = 0; b < whole_blocks; run += span_runs) {
        const __m512i first = wide_load(row + (int64_t)run * 64, run < w->runs ? 4 : w->last_lane_bytes);
        const int two = span_runs == 2 && b + 2 < whole_blocks; /* a whole block in the second run */
        const __m512i second =
            two ? wide_load(row + (int64_t)(run + 1) * 64, run + 1 < w->runs ? 4 : w->last_lane_bytes) : first;
#pragma GCC unroll 8 /* whole, so that each block's shifts are constants */
        for (int i = 0; i < span_blocks && b < whole_blocks; i++, b++) {
            const int field = 4 * i % fields, later = 4 * i / fields;
            __m512i picked = _mm512_multishift_epi64_epi8(
                _mm512_add_epi8(shifts, _mm512_set1_epi8((char)(BITS * field))), later ? second : first);
            if (field + 4 > fields) /* at 3 bits: steps fields - field .. from the second run */
                picked = _mm512_mask_multishift_epi64_epi8(
                    picked, (0xFFull << 2 * (fields - field) & 0xFF) * 0x0101010101010101ull,
                    _mm512_add_epi8(shifts, _mm512_set1_epi8((char)(BITS * (field - fields)))), second);
            byte_block(R, BITS, &st, group_blocks, picked, a, m, b);
        }
    }
    for (; b < blocks; b++) {
        const int count = steps - 4 * b < 4 ? steps - 4 * b : 4;
        byte_block(R, BITS, &st, group_blocks, block_fields(BITS, w, row, shifts, 4 * b, count), a, m, b);
    }
    if (blocks > 0) byte_group_end(R, &st);
    for (int r = 0; r < R; r++) sums[r][c] = st.acc[r];
    tail_sums(R, w, n, x, m, tails, c);
}

LCQ_INT8 static inline __attribute__((always_inline)) void byte_tile(const int R, const int BITS,
                                                                     const lcq_index_weight *w, int n0, int count,
                                                                     const byte_activations *a, int m, const float *x,
                                                                     float *y) {
    __m512 sums[INT8_PASS_ROWS][TILE_COLUMNS];
    float tails[INT8_PASS_ROWS][TILE_COLUMNS];
    for (int c = 0; c < count; c++) byte_column(R, BITS, w, n0 + c, a, m, x, sums, tails, c);
    for (int r = 0; r < R; r++) wide_reduce(sums[r], tails[r], count, y + (int64_t)(m + r) * w->N + n0);
}

FOUR_ROW_TILES(byte, LCQ_INT8, byte_activations, 2)
FOUR_ROW_TILES(byte, LCQ_INT8, byte_activations, 3)
FOUR_ROW_TILES(byte, LCQ_INT8, byte_activations, 4)

LCQ_INT8 int lcq_index_byte_product(const lcq_index_weight *w, const float *x, int M, float *y) {
    byte_activations a;
    if (byte_activations_of(x, M, w->K, &a)) return -1;
    switch (w->bits) {
        case 2: byte_tiles_2(w, &a, x, M, y); break;
        case 3: byte_tiles_3(w, &a, x, M, y); break;
        default: byte_tiles_4(w, &a, x, M, y); break;
    }
    return 0;
}
