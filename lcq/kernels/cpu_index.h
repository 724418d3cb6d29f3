/* An LCQ weight kept as its indices (lcq_index_weight) and the instruction-set steps every product from its
 * indices takes: a row's table held in registers, a group's codebook built, a run's words loaded and looked up
 * 16 weights at a time, a tile's column sums reduced; with AVX2 (narrow) and AVX-512 (wide). The products:
 * fp32 (cpu_index.c, which also chooses among them), int8 (cpu_index_bytes.c with AVX-512, cpu_index_shuffles.c
 * with AVX2) and bf16 (cpu_index_pairs.c).
 *
 * Index layout, one function for every bit width b: a row is runs of 16 32-bit words, each word
 * holding P = 32 / b indices (16, 10 or 8); field s of word i (bits b s ..) is index 16 s + i of the
 * run, so a step of 16 consecutive weights is one permute of the run's words, which are then shifted
 * down by b for the next step. Permutes read the low 4 bits of each word, so the layer's tables are
 * replicated to 16 entries (entry e is V[e mod 2^b]) and the next fields above an index do not
 * matter: no mask. The row ends with a partial run of 16 lanes of 1, 2 or 4 bytes (the fewest that
 * hold its fields), so rows are not padded to whole runs. Groups are multiples of 32 indices, so a
 * step never straddles two codebooks.
 */
#ifndef LCQ_CPU_INDEX_H
#define LCQ_CPU_INDEX_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "cpu_gemm.h"

/* The steps below are inlined into every product: only so do a column's accumulators and table stay in
 * registers (split across files, GCC's unit-growth limits had left some of them out of line). */
#define INDEX_STEP static inline __attribute__((always_inline))

#define TILE_COLUMNS 16 /* output columns whose sums are reduced together */
#define HELD_RANKS 4 /* ranks whose table rows a decode column holds in registers */
/* The loop over a decode product's tiles: LCQ_DECODE_COLUMNS' guided chunks of 32 columns, in tiles. */
#define DECODE_TILES _Pragma("omp parallel for schedule(guided, 2)")

#define INT8_PASS_ROWS 4 /* activation rows per pass of the int8 decode forms over a column */

/* PREFIX##_tiles_##BITS (TARGET: its instruction set's attribute, or nothing): a decode product over the weight's
 * tiles (DECODE_TILES), each in even passes of up to INT8_PASS_ROWS rows, a pass PREFIX##_tile(R, BITS, w, n0,
 * count, a, m, x, y) inlined with its row count R: the int8 decode forms' (cpu_index_bytes.c with ACTIVATIONS
 * byte_activations, cpu_index_shuffles.c with shuffle_activations). */
#define FOUR_ROW_TILES(PREFIX, TARGET, ACTIVATIONS, BITS)                                                           \
    TARGET static void PREFIX##_tiles_##BITS(const lcq_index_weight *w, const ACTIVATIONS *a, const float *x, int M, \
                                             float *y) {                                                            \
        const int tiles = (w->N + TILE_COLUMNS - 1) / TILE_COLUMNS;                                                 \
        const int passes = (M + INT8_PASS_ROWS - 1) / INT8_PASS_ROWS;                                               \
        DECODE_TILES for (int t = 0; t < tiles; t++) {                                                              \
            const int n0 = t * TILE_COLUMNS, count = w->N - n0 < TILE_COLUMNS ? w->N - n0 : TILE_COLUMNS;           \
            for (int pass = 0, m = 0; pass < passes; pass++) {                                                      \
                const int rows = M / passes + (pass < M % passes);                                                  \
                switch (rows) { /* (INT8_PASS_ROWS 4) */                                                            \
                    case 1: PREFIX##_tile(1, BITS, w, n0, count, a, m, x, y); break;                                \
                    case 2: PREFIX##_tile(2, BITS, w, n0, count, a, m, x, y); break;                                \
                    case 3: PREFIX##_tile(3, BITS, w, n0, count, a, m, x, y); break;                                \
                    default: PREFIX##_tile(INT8_PASS_ROWS, BITS, w, n0, count, a, m, x, y); break;                  \
                }                                                                                                   \
                m += rows;                                                                                          \
            }                                                                                                       \
        }                                                                                                           \
    }

/* Must match IndexWeight in cpu_index.py. */
typedef struct {
    const uint8_t *indices;     /* (N, row_bytes): `runs` runs of 16 words, then a partial run of 16 lanes */
    const float *scales;        /* S (N, groups, rank) */
    const float *offsets;       /* B (N, groups) */
    const float *tables;        /* V (tables, rank, 16), replicated: entry e is V[e mod 2^bits] */
    const int32_t *table_index; /* (N,) which table row n uses */
    int N, K, group_size, groups, rank;
    int bits, runs, last_lane_bytes, row_bytes; /* last_lane_bytes 0: no partial run */
    int wide; /* decode with AVX-512 (the caller checked the CPU has it) */
    const float *tops; /* (N, ceil(K / 64)) lcq_index_block_tops, for the int8 expansion; NULL where not wide */
    const uint32_t *byte_rows; /* every row in the int8 form (lcq_index_byte_rows), or NULL: expanded per block */
    const uint8_t *books; /* (N, groups) records of a scale and 2^bits bytes (lcq_index_byte_books), or NULL */
} lcq_index_weight;

/* How many rows past the one a decode column starts it asks for (ask_row_ahead). */
#define ROWS_AHEAD 16

/* Asks, as a decode column of row n starts, for what the column of row n + ROWS_AHEAD will read into L2: its
 * indices, and its books (book_bytes per row: the int8 form) or else its groups' S and B. The decode products
 * read a weight's rows in order a column at a time, and each column had waited on its rows' first lines from the
 * L3 or memory: on the Xeon guest a batch-1 token of the demo model (int8 form) spent 43% of its products'
 * samples on the load of a run's indices, and ran 148 -> 200-216 tokens/s with rows asked for 16 ahead (32 and
 * 64 alike). */
INDEX_STEP void ask_row_ahead(const lcq_index_weight *w, int n, int64_t book_bytes) {
    const int64_t ahead = (int64_t)n + ROWS_AHEAD;
    if (ahead >= w->N) return;
    lcq_ask_lines(w->indices + ahead * w->row_bytes, w->row_bytes);
    if (book_bytes) {
        lcq_ask_lines(w->books + ahead * book_bytes, book_bytes);
        return;
    }
    lcq_ask_lines(w->scales + ahead * w->groups * w->rank, (int64_t)sizeof(float) * w->groups * w->rank);
    lcq_ask_lines(w->offsets + ahead * w->groups, (int64_t)sizeof(float) * w->groups);
}

/* Row n's table V (rank x 16). */
INDEX_STEP const float *table_row(const lcq_index_weight *w, int n) {
    return w->tables + (int64_t)w->table_index[n] * w->rank * 16;
}

/* Word (or partial-run lane) i of run `run` of a row. */
INDEX_STEP uint32_t lane_word(const lcq_index_weight *w, const uint8_t *row, int run, int i) {
    uint32_t word = 0;
    const int bytes = run < w->runs ? 4 : w->last_lane_bytes;
    memcpy(&word, row + (int64_t)run * 64 + i * bytes, bytes); /* x86: little-endian */
    return word;
}


/* The instruction-set steps of a decode product. A row's table V is held in registers (or where the
 * compiler spills them, on the stack) when RANK is a constant of 1 to HELD_RANKS, so a group's
 * codebook is a broadcast of B and r multiply-adds (with the table loaded per group and the rank a
 * run-time loop, building codebooks was a third of a batch-1 product's instructions); RANK 0 takes
 * any rank (w->rank) and reads the table per group. AVX2: a codebook in two registers (entries 0-7 and
 * 8-15), a run's words in two (lanes 0-7 and 8-15), a step of 16 weights as 8 + 8, one accumulator
 * per half. */
typedef struct {
    __m256 low, high;
} narrow_book;

typedef struct {
    __m256i first, second;
} narrow_words;

typedef struct {
    __m256 low[HELD_RANKS], high[HELD_RANKS];
    const float *v;
} narrow_table;

INDEX_STEP narrow_table narrow_table_of(const lcq_index_weight *w, int n, const int RANK) {
    narrow_table table;
    table.v = table_row(w, n);
    for (int r = 0; r < RANK; r++) {
        table.low[r] = _mm256_loadu_ps(table.v + r * 16);
        table.high[r] = _mm256_loadu_ps(table.v + r * 16 + 8);
    }
    return table;
}

/* Entries 0-7 and 8-15 of the codebook of group j of row n (table: the row's). */
INDEX_STEP narrow_book narrow_codebook(const lcq_index_weight *w, const narrow_table *table, const int RANK, int n,
                                       int j) {
    const int rank = RANK ? RANK : w->rank;
    const float *s = w->scales + ((int64_t)n * w->groups + j) * rank;
    narrow_book book;
    book.low = book.high = _mm256_set1_ps(-w->offsets[(int64_t)n * w->groups + j]);
    for (int r = 0; r < rank; r++) {
        const __m256 scale = _mm256_set1_ps(s[r]);
        book.low = _mm256_fmadd_ps(scale, RANK ? table->low[r] : _mm256_loadu_ps(table->v + r * 16), book.low);
        book.high = _mm256_fmadd_ps(scale, RANK ? table->high[r] : _mm256_loadu_ps(table->v + r * 16 + 8), book.high);
    }
    return book;
}

INDEX_STEP void narrow_write(narrow_book book, float *entries) {
    _mm256_storeu_ps(entries, book.low);
    _mm256_storeu_ps(entries + 8, book.high);
}

/* Lanes 0-7 and 8-15 as 32-bit words from lanes of `bytes` bytes. */
INDEX_STEP narrow_words narrow_load(const uint8_t *run, int bytes) {
    narrow_words words;
    if (bytes == 4) {
        words.first = _mm256_loadu_si256((const __m256i *)run);
        words.second = _mm256_loadu_si256((const __m256i *)(run + 32));
    } else if (bytes == 2) {
        words.first = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)run));
        words.second = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(run + 16)));
    } else {
        words.first = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)run));
        words.second = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(run + 8)));
    }
    return words;
}

/* The next fields down (bits: a constant where inlined, so the shifts take an immediate). */
INDEX_STEP narrow_words narrow_next(narrow_words words, const int bits) {
    words.first = _mm256_srli_epi32(words.first, bits);
    words.second = _mm256_srli_epi32(words.second, bits);
    return words;
}

/* Weights of the 8 lanes' low fields: the permutes read bits 0-2, the blend bit 3 moved to the sign. With 2 or 3
 * bits entries 8-15 repeat 0-7 (the replicated table), so one permute reads them all: the two permutes and the
 * blend of 4 bits were the port-bound part of a decode step on an AVX2-only Zen 3. */
INDEX_STEP __m256 lookup(const int BITS, narrow_book book, __m256i words) {
    if (BITS <= 3) return _mm256_permutevar8x32_ps(book.low, words);
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(book.low, words), _mm256_permutevar8x32_ps(book.high, words),
                            _mm256_castsi256_ps(_mm256_slli_epi32(words, 28)));
}

/* acc[r][0] and acc[r][1] += the R activation rows at x times the 16 weights of the words' low fields
 * (chain: AVX-512 alternates accumulators between steps; here the halves have one each). */
INDEX_STEP void narrow_step(const int R, const int BITS, narrow_words words, narrow_book book, const float *x, int K,
                            __m256 acc[][2], int chain) {
    (void)chain;
    const __m256 first = lookup(BITS, book, words.first), second = lookup(BITS, book, words.second);
    for (int r = 0; r < R; r++) {
        acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (int64_t)r * K), first, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (int64_t)r * K + 8), second, acc[r][1]);
    }
}

/* The 16 weights of the words' low fields, written out (the expansion for cpu_gemm.c). */
INDEX_STEP void narrow_write_step(const int BITS, narrow_words words, narrow_book book, float *out) {
    _mm256_storeu_ps(out, lookup(BITS, book, words.first));
    _mm256_storeu_ps(out + 8, lookup(BITS, book, words.second));
}

/* out[c] = the sum of column c's lanes + tails[c], for a tile's `count` columns: 8 at a time by a
 * tree of horizontal adds (9 vector operations for 8 columns, where a horizontal sum took 5 each). */
INDEX_STEP void narrow_reduce(const __m256 *sums, const float *tails, int count, float *out) {
    for (int c0 = 0; c0 < count; c0 += 8) {
        __m256 v[8];
        for (int c = 0; c < 8; c++) v[c] = c0 + c < count ? sums[c0 + c] : _mm256_setzero_ps();
        /* per 128-bit half: the half's sums of columns c0 .. c0 + 3, then of c0 + 4 .. c0 + 7 */
        const __m256 first = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
        const __m256 second = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
        const __m256 totals = _mm256_add_ps(_mm256_permute2f128_ps(first, second, 0x20),
                                            _mm256_permute2f128_ps(first, second, 0x31));
        float lanes[8];
        _mm256_storeu_ps(lanes, totals);
        for (int c = 0; c < 8 && c0 + c < count; c++) out[c0 + c] = lanes[c] + tails[c0 + c];
    }
}

/* Weights whole .. K - 1 of row n, past its last whole step of 16 (loop tails), into out: index by
 * index from the group's codebook written out (whole is a multiple of 16, so one group holds them). Out
 * of line, as GCC left it when one file held every product: a row's tail is read once per column. */
static __attribute__((noinline)) void tail_weights(const lcq_index_weight *w, int n, int whole, float *out) {
    const uint8_t *row = w->indices + (int64_t)n * w->row_bytes;
    const int run_length = 16 * (32 / w->bits);
    const narrow_table table = narrow_table_of(w, n, 0);
    float book[16];
    narrow_write(narrow_codebook(w, &table, 0, n, whole / w->group_size), book);
    for (int k = whole; k < w->K; k++) {
        const int s = k % run_length / 16;
        out[k - whole] = book[(lane_word(w, row, k / run_length, k % 16) >> (w->bits * s)) & 15];
    }
}

/* tails[r][c] = the fp32 products of activation rows m .. m + R - 1 (x: (M, K)) with row n's weights past its
 * last whole step of 16, which the int8 decode forms leave out of their bytes (0 where K is whole steps). */
INDEX_STEP void tail_sums(const int R, const lcq_index_weight *w, int n, const float *x, int m,
                          float tails[][TILE_COLUMNS], int c) {
    const int K = w->K, whole = K / 16 * 16;
    for (int r = 0; r < R; r++) tails[r][c] = 0.0f;
    if (whole == K) return;
    float weights[16];
    tail_weights(w, n, whole, weights);
    for (int k = whole; k < K; k++)
        for (int r = 0; r < R; r++) tails[r][c] += x[(int64_t)(m + r) * K + k] * weights[k - whole];
}

#define AVX512 __attribute__((target("avx512f")))

/* AVX-512: the whole 16-entry codebook in one register, a run's 16 words in one, a step of 16 weights
 * in one; steps alternate between a row's two accumulators. */
typedef __m512 wide_book;
typedef __m512i wide_words;

/* A row's table: one register per rank. */
typedef struct {
    __m512 rows[HELD_RANKS];
    const float *v;
} wide_table;

AVX512 INDEX_STEP wide_table wide_table_of(const lcq_index_weight *w, int n, const int RANK) {
    wide_table table;
    table.v = table_row(w, n);
    for (int r = 0; r < RANK; r++) table.rows[r] = _mm512_loadu_ps(table.v + r * 16);
    return table;
}

AVX512 INDEX_STEP wide_book wide_codebook(const lcq_index_weight *w, const wide_table *table, const int RANK,
                                          int n, int j) {
    const int rank = RANK ? RANK : w->rank;
    const float *s = w->scales + ((int64_t)n * w->groups + j) * rank;
    __m512 book = _mm512_set1_ps(-w->offsets[(int64_t)n * w->groups + j]);
    for (int r = 0; r < rank; r++)
        book = _mm512_fmadd_ps(_mm512_set1_ps(s[r]), RANK ? table->rows[r] : _mm512_loadu_ps(table->v + r * 16), book);
    return book;
}

AVX512 INDEX_STEP void wide_write(wide_book book, float *entries) {
    _mm512_storeu_ps(entries, book);
}

AVX512 INDEX_STEP wide_words wide_load(const uint8_t *run, int bytes) {
    if (bytes == 4) return _mm512_loadu_si512(run);
    if (bytes == 2) return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)run));
    return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)run));
}

AVX512 INDEX_STEP wide_words wide_next(wide_words words, const int bits) {
    return _mm512_srli_epi32(words, bits);
}

AVX512 INDEX_STEP void wide_step(const int R, const int BITS, wide_words words, wide_book book, const float *x,
                                 int K, __m512 acc[][2], const int chain) {
    (void)BITS; /* one permute reads 16 entries */
    const __m512 weights = _mm512_permutexvar_ps(words, book);
    for (int r = 0; r < R; r++)
        acc[r][chain] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (int64_t)r * K), weights, acc[r][chain]);
}

AVX512 INDEX_STEP void wide_write_step(const int BITS, wide_words words, wide_book book, float *out) {
    (void)BITS;
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(words, book));
}

/* out[c] = the sum of column c's lanes + tails[c], for a tile's `count` columns: a transpose-add tree
 * over the 16 (45 vector operations, where a horizontal sum per column took 9, in a dependent chain
 * that was a fifth of a batch-1 product's time). */
AVX512 INDEX_STEP void wide_reduce(const __m512 *sums, const float *tails, int count, float *out) {
    __m512 v[TILE_COLUMNS], pairs[8], quads[4], halves[2];
    for (int c = 0; c < TILE_COLUMNS; c++) v[c] = c < count ? sums[c] : _mm512_setzero_ps();
    for (int i = 0; i < 8; i++) /* per 128-bit lane: a0 + a2, b0 + b2, a1 + a3, b1 + b3 of a, b = v[2i], v[2i + 1] */
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per 128-bit lane: the lane's sums of columns 4i .. 4i + 3 */
        quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; i++) /* 128-bit lanes: quads 2i (lanes 0 + 1, 2 + 3), then quads 2i + 1 (the same) */
        halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 totals = _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                        _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __mmask16 lanes = (__mmask16)((1u << count) - 1);
    _mm512_mask_storeu_ps(out, lanes, _mm512_add_ps(totals, _mm512_maskz_loadu_ps(lanes, tails)));
}

/* RESULT PREFIX##_tiles_BITS_RANK ARGS for the weight's rank (RESULT: empty, or `status =`). */
#define RANKS(PREFIX, BITS, RESULT, ARGS)                                                                           \
    switch (w->rank) {                                                                                              \
        case 1: RESULT PREFIX##_tiles_##BITS##_1 ARGS; break;                                                       \
        case 2: RESULT PREFIX##_tiles_##BITS##_2 ARGS; break;                                                       \
        case 3: RESULT PREFIX##_tiles_##BITS##_3 ARGS; break;                                                       \
        case 4: RESULT PREFIX##_tiles_##BITS##_4 ARGS; break;                                                       \
        default: RESULT PREFIX##_tiles_##BITS##_0 ARGS; break;                                                      \
    }

/* A group's book for the int8 decode products (lcq_index_byte_books): its top as a float, then 2^bits bytes. */
#define LCQ_BOOK_BYTES(BITS) (4 + (1 << (BITS)))

/* From this many rows the bf16 decode product (cpu_index_pairs.c) serves where bf16 products are on. */
#define PAIR_MIN_ROWS 5

/* The products the dispatcher (lcq_index_matmul, cpu_index.c) chooses among besides the fp32 one: y (M, N) =
 * x (M, K) @ W^T, 0 or -1 where a buffer cannot be allocated. The int8 decode products of a weight with books
 * (cpu_index_bytes.c with AVX-512, cpu_index_shuffles.c at 2 and 4 bits with AVX2), the bf16 one of a wide
 * weight (cpu_index_pairs.c); and rows first .. first + count - 1
 * of a wide weight in the int8 form (an lcq_expand_byte_rows, cpu_index_bytes.c). */
int lcq_index_byte_product(const lcq_index_weight *w, const float *x, int M, float *y);
int lcq_index_shuffle_product(const lcq_index_weight *w, const float *x, int M, float *y);
int lcq_index_pair_product(const lcq_index_weight *w, const float *x, int M, float *y);
int lcq_index_expand_bytes(const void *weight, int K, int first, int count, uint32_t *out);

#endif
