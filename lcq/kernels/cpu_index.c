/* y (M, N) = x (M, K) @ W^T for fp32 activations and an LCQ weight kept as its indices, on x86 CPUs
 * with AVX2 and FMA (AVX-512 where the caller says so); fp32 arithmetic.
 *
 * A CPU decode step streams every weight once. Kept as fp16 a weight costs 2 bytes; kept as its
 * b-bit indices plus its group scales, about b / 8 + 0.19 (r 2, g 64). Each group's codebook
 * c = S @ V - B is built in registers and weights are looked up by permutes: with AVX-512 the 16
 * entries fit one register (16 weights per vpermps), with AVX2 two registers (8 weights per two
 * permutes and a blend), the row's table held in registers and a tile of 16 output columns reduced
 * at once. On a Zen 4 that decodes 1.3-1.9x as fast as the fp16 copy with AVX-512, 0.9-1.2x with
 * AVX2, at M = 1 (bench/cpu_index.py). With int8 products (AVX512_VNNI and AVX512_VBMI) and a weight that
 * keeps its codebooks in bytes (lcq_index_byte_books), decode products of a few rows look 64 weights up
 * in bytes per instruction and multiply them with int8 activations (lcq_index_byte_product,
 * cpu_index_bytes.c): 1.1-2.1x the fp32 form at M = 1 on a Zen 4; with int8 products and AVX2 only, decode products
 * of 2- and 4-bit weights with books look 32 weights up per vpshufb (lcq_index_shuffle_product,
 * cpu_index_shuffles.c): W4 1.4-2.3x the AVX2 fp32 form at M = 1; with bf16 products on, 5 rows or more
 * take the bf16 form (lcq_index_pair_product, cpu_index_pairs.c).
 * Products of lcq_gemm_min_rows() rows or more are bounded by arithmetic instead: cpu_gemm.c expands a
 * block of weight rows at a time to their fp32 entries (or with int8 products to bytes) in a
 * per-thread buffer and multiplies it there, so no copy of the whole layer is made unless asked for
 * (lcq_index_byte_rows: the int8 form kept, memory for speed) and every fp32 product uses the exact
 * entries. The index layout and the steps every form shares: cpu_index.h.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_gemm.h"
#include "cpu_index.h"

#define PASS_ROWS 6 /* the most activation rows per pass over a column's indices: AVX-512 6 (6 x 2 accumulators
                      * of its 32 registers), AVX2 4 (of 16) */

/* The decode product (fewer than lcq_gemm_min_rows(...) rows) of one instruction set, PREFIX narrow (AVX2)
 * or wide (AVX-512), from that set's steps (cpu_index.h): per tile of TILE_COLUMNS output columns (chunks of
 * tiles are OpenMP's iterations), passes of up to PASS_ROWS activation rows over each column's
 * indices; per run its words, per step of 16 weights one lookup (a new codebook where a group starts)
 * and a shift, two steps at a time so that they feed two accumulators, then scalar weights where K
 * ends inside a step; the tile's column sums are reduced together. A column is inlined with R, the
 * bit width and the rank constants, so the accumulators and the table stay in registers. Written
 * once and instantiated twice because AVX-512 intrinsics only inline into functions compiled for
 * AVX-512, so the two cannot share a plain function. */
#define DECODE_PRODUCT(PREFIX, TARGET, VECTOR, ZERO, ADD)                                                           \
    /* sums[r][c] and tails[r][c]: column c of the tile (row n) for activation rows r < R. */                       \
    TARGET static inline __attribute__((always_inline)) void PREFIX##_column(                                       \
        const int R, const int BITS, const int RANK, const lcq_index_weight *w, int n, const float *x,              \
        VECTOR sums[][TILE_COLUMNS], float tails[][TILE_COLUMNS], int c) {                                          \
        const int K = w->K, whole = K / 16 * 16, fields = 32 / BITS;                                                \
        const uint8_t *row = w->indices + (int64_t)n * w->row_bytes;                                                \
        ask_row_ahead(w, n, 0);                                                                                     \
        VECTOR acc[PASS_ROWS][2];                                                                                   \
        for (int r = 0; r < R; r++) {                                                                               \
            acc[r][0] = acc[r][1] = ZERO();                                                                         \
            tails[r][c] = 0.0f;                                                                                     \
        }                                                                                                           \
        const PREFIX##_table table = PREFIX##_table_of(w, n, RANK);                                                 \
        PREFIX##_book book = PREFIX##_codebook(w, &table, RANK, n, 0);                                              \
        int k = 0, group = 0, group_end = w->group_size; /* groups counted, not divided out */                      \
        for (int run = 0; k < whole; run++) {                                                                       \
            PREFIX##_words words = PREFIX##_load(row + (int64_t)run * 64, run < w->runs ? 4 : w->last_lane_bytes);  \
            const int steps = (whole - k) / 16 < fields ? (whole - k) / 16 : fields;                                \
            for (int s = 0; s < steps; s += 2, k += 32) { /* runs and groups are whole pairs of steps */            \
                if (k == group_end) {                                                                               \
                    book = PREFIX##_codebook(w, &table, RANK, n, ++group);                                          \
                    group_end += w->group_size;                                                                     \
                }                                                                                                   \
                PREFIX##_step(R, BITS, words, book, x + k, K, acc, 0);                                             \
                if (s + 1 == steps) { /* K ends inside this pair */                                                 \
                    k += 16;                                                                                        \
                    break;                                                                                          \
                }                                                                                                   \
                words = PREFIX##_next(words, BITS);                                                                 \
                PREFIX##_step(R, BITS, words, book, x + k + 16, K, acc, 1);                                        \
                words = PREFIX##_next(words, BITS);                                                                 \
            }                                                                                                       \
        }                                                                                                           \
        if (whole < K) {                                                                                            \
            float weights[16];                                                                                      \
            tail_weights(w, n, whole, weights);                                                           \
            for (; k < K; k++)                                                                                      \
                for (int r = 0; r < R; r++) tails[r][c] += x[(int64_t)r * K + k] * weights[k - whole];              \
        }                                                                                                           \
        for (int r = 0; r < R; r++) sums[r][c] = ADD(acc[r][0], acc[r][1]);                                         \
    }                                                                                                               \
                                                                                                                    \
    /* y[r, n0 + c] for R rows and the tile's `count` columns from n0. */                                           \
    TARGET static inline __attribute__((always_inline)) void PREFIX##_tile(                                         \
        const int R, const int BITS, const int RANK, const lcq_index_weight *w, int n0, int count, const float *x,  \
        float *y) {                                                                                                 \
        VECTOR sums[PASS_ROWS][TILE_COLUMNS];                                                                       \
        float tails[PASS_ROWS][TILE_COLUMNS];                                                                       \
        for (int c = 0; c < count; c++) PREFIX##_column(R, BITS, RANK, w, n0 + c, x, sums, tails, c);               \
        for (int r = 0; r < R; r++) PREFIX##_reduce(sums[r], tails[r], count, y + (int64_t)r * w->N + n0);          \
    }                                                                                                               \
                                                                                                                    \
    /* Row n's weights as fp32 (K), the exact codebook entries: the steps of a column, written out. */     \
    TARGET static inline __attribute__((always_inline)) void PREFIX##_expand_row(                              \
        const int BITS, const lcq_index_weight *w, int n, float *out) {                                         \
        const int K = w->K, whole = K / 16 * 16, fields = 32 / BITS;                                            \
        const uint8_t *row = w->indices + (int64_t)n * w->row_bytes;                                            \
        const PREFIX##_table table = PREFIX##_table_of(w, n, 0);                                                \
        PREFIX##_book book = PREFIX##_codebook(w, &table, 0, n, 0);                                             \
        int k = 0, group = 0, group_end = w->group_size;                                                        \
        for (int run = 0; k < whole; run++) {                                                                   \
            PREFIX##_words words = PREFIX##_load(row + (int64_t)run * 64, run < w->runs ? 4 : w->last_lane_bytes); \
            for (int s = 0; s < fields && k < whole; s++, k += 16) {                                            \
                if (k == group_end) {                                                                           \
                    book = PREFIX##_codebook(w, &table, 0, n, ++group);                                         \
                    group_end += w->group_size;                                                                 \
                }                                                                                               \
                PREFIX##_write_step(BITS, words, book, out + k);                                                \
                words = PREFIX##_next(words, BITS);                                                             \
            }                                                                                                   \
        }                                                                                                       \
        if (whole < K) tail_weights(w, n, whole, out + whole);                                        \
    }                                                                                                           \
                                                                                                                \
    /* Rows first .. first + count - 1 as fp32 (count, K), for cpu_gemm.c (an lcq_expand_rows). */         \
    TARGET static void PREFIX##_expand(const void *weight, int K, int first, int count, float *out) {           \
        const lcq_index_weight *w = weight;                                                                     \
        for (int n = first; n < first + count; n++) {                                                           \
            float *row = out + (int64_t)(n - first) * K;                                                        \
            switch (w->bits) {                                                                                  \
                case 2: PREFIX##_expand_row(2, w, n, row); break;                                               \
                case 3: PREFIX##_expand_row(3, w, n, row); break;                                               \
                default: PREFIX##_expand_row(4, w, n, row); break;                                              \
            }                                                                                                   \
        }                                                                                                       \
    }

DECODE_PRODUCT(narrow, , __m256, _mm256_setzero_ps, _mm256_add_ps)
DECODE_PRODUCT(wide, AVX512, __m512, _mm512_setzero_ps, _mm512_add_ps)

/* PREFIX##_tiles_BITS_RANK: the decode product for one bit width and rank, both literals in its own
 * function, so that each variant's registers are allocated apart from the others' (the 60 ranks,
 * widths and row counts of AVX-512 in one function spilled the accumulators: 0.5-0.8x). */
#define ROWS_UP_TO_4(TILE, ...)                                                                                     \
    case 1: TILE(1, __VA_ARGS__); break;                                                                            \
    case 2: TILE(2, __VA_ARGS__); break;                                                                            \
    case 3: TILE(3, __VA_ARGS__); break;                                                                            \
    default: TILE(4, __VA_ARGS__); break;
#define ROWS_UP_TO_6(TILE, ...)                                                                                     \
    case 1: TILE(1, __VA_ARGS__); break;                                                                            \
    case 2: TILE(2, __VA_ARGS__); break;                                                                            \
    case 3: TILE(3, __VA_ARGS__); break;                                                                            \
    case 4: TILE(4, __VA_ARGS__); break;                                                                            \
    case 5: TILE(5, __VA_ARGS__); break;                                                                            \
    default: TILE(6, __VA_ARGS__); break;
/* Passes of up to MOST rows, as even as can be: AVX-512 takes 6 (5 rows in one pass instead of 4 + 1, which
 * read every index twice: 1.12x at 5 rows, 1.07x at 6, 1.08x at 9 on SmolLM2's shapes, the same sums;
 * passes of 8 lost at 8 rows, 0.94x), so that verifying 4 drafts at batch 1 reads the weights once. */
#define TILES(PREFIX, TARGET, BITS, RANK, MOST)                                                                     \
    TARGET static void PREFIX##_tiles_##BITS##_##RANK(const lcq_index_weight *w, const float *x, int M, float *y) { \
        const int tiles = (w->N + TILE_COLUMNS - 1) / TILE_COLUMNS, passes = (M + MOST - 1) / MOST;                 \
        DECODE_TILES for (int t = 0; t < tiles; t++) {                                                              \
            const int n0 = t * TILE_COLUMNS, count = w->N - n0 < TILE_COLUMNS ? w->N - n0 : TILE_COLUMNS;           \
            for (int pass = 0, m = 0; pass < passes; pass++) {                                                      \
                const int rows = M / passes + (pass < M % passes);                                                  \
                const float *xs = x + (int64_t)m * w->K;                                                            \
                float *out = y + (int64_t)m * w->N;                                                                 \
                switch (rows) { ROWS_UP_TO_##MOST(PREFIX##_tile, BITS, RANK, w, n0, count, xs, out) }              \
                m += rows;                                                                                          \
            }                                                                                                       \
        }                                                                                                           \
    }

/* PREFIX##_tiles_BITS_RANK for every width, ranks 1 to HELD_RANKS and 0 (any other rank). */
_Static_assert(HELD_RANKS == 4, "the decode products name ranks 1 to 4");
#define RANK_TILES(PREFIX, TARGET, BITS, MOST)                                                                      \
    TILES(PREFIX, TARGET, BITS, 1, MOST)                                                                            \
    TILES(PREFIX, TARGET, BITS, 2, MOST)                                                                            \
    TILES(PREFIX, TARGET, BITS, 3, MOST)                                                                            \
    TILES(PREFIX, TARGET, BITS, 4, MOST)                                                                            \
    TILES(PREFIX, TARGET, BITS, 0, MOST)
RANK_TILES(narrow, , 2, 4)
RANK_TILES(narrow, , 3, 4)
RANK_TILES(narrow, , 4, 4)
RANK_TILES(wide, AVX512, 2, 6)
RANK_TILES(wide, AVX512, 3, 6)
RANK_TILES(wide, AVX512, 4, 6)
#undef RANK_TILES
#undef TILES
#undef ROWS_UP_TO_4
#undef ROWS_UP_TO_6

/* PREFIX##_decode_product: the variant for the weight's width and rank. */
#define DECODE_DISPATCH(PREFIX, TARGET)                                                                             \
    TARGET static void PREFIX##_decode_product(const lcq_index_weight *w, const float *x, int M, float *y) {        \
        switch (w->bits) {                                                                                          \
            case 2: RANKS(PREFIX, 2, , (w, x, M, y)) break;                                                         \
            case 3: RANKS(PREFIX, 3, , (w, x, M, y)) break;                                                         \
            default: RANKS(PREFIX, 4, , (w, x, M, y)) break;                                                        \
        }                                                                                                           \
    }
DECODE_DISPATCH(narrow, )
DECODE_DISPATCH(wide, AVX512)
#undef DECODE_DISPATCH

/* What expanding rows first .. first + count - 1 reads, into the stream (an lcq_stream_rows): their
 * indices, S, B, table rows and block scales (the tables are a layer's few hundred bytes). */
static void stream_index_rows(const void *weight, int K, int first, int count, lcq_line_stream *stream) {
    const lcq_index_weight *w = weight;
    const int64_t entries = (int64_t)w->groups * w->rank;
    lcq_stream_add(stream, w->indices + (int64_t)first * w->row_bytes, (int64_t)count * w->row_bytes);
    lcq_stream_add(stream, w->scales + first * entries, sizeof(float) * count * entries);
    lcq_stream_add(stream, w->offsets + (int64_t)first * w->groups, sizeof(float) * count * w->groups);
    lcq_stream_add(stream, w->table_index + first, sizeof(int32_t) * count);
    if (w->tops != NULL) {
        const int blocks = lcq_scale_blocks((K + 3) / 4);
        lcq_stream_add(stream, w->tops + (int64_t)first * blocks, sizeof(float) * count * blocks);
    }
}

/* x (M, K) fp32 contiguous, M >= 1; y (M, N) fp32, or with swiglu (W = [gate; up]) y (M, N / 2) =
 * silu(gate) * up (cpu_gemm.h). Returns 0, or -1 when M < 1 or a buffer cannot be allocated. */
int lcq_index_matmul(const float *x, int M, const void *weight, int swiglu, float *y) {
    const lcq_index_weight *w = weight;
    if (M < 1 || (swiglu && w->N % 2)) return -1;
    const int kept = w->byte_rows != NULL ? LCQ_INT8_PRODUCTS : LCQ_FP32_PRODUCTS;
    const int shuffles = w->books != NULL && M <= lcq_shuffle_decode_rows(w->bits);
    const int bytes = !shuffles && w->books != NULL && M <= lcq_byte_decode_rows(kept);
    if (!bytes && !shuffles && M >= lcq_gemm_min_rows(kept)) {
        const lcq_expansions expansions = {w->wide ? wide_expand : narrow_expand, NULL,
                                           w->wide ? lcq_index_expand_bytes : NULL, stream_index_rows, w->byte_rows,
                                           NULL};
        return lcq_expanded_product(x, M, w->K, w->N, &expansions, w, swiglu, y);
    }
    float *products = lcq_swiglu_products(swiglu, M, w->N, y);
    int status = 0;
    if (products == NULL)
        status = -1;
    else if (shuffles)
        status = lcq_index_shuffle_product(w, x, M, products);
    else if (bytes)
        status = lcq_index_byte_product(w, x, M, products);
    else if (w->wide && M >= PAIR_MIN_ROWS && lcq_bf16_products())
        status = lcq_index_pair_product(w, x, M, products);
    else if (w->wide)
        wide_decode_product(w, x, M, products);
    else
        narrow_decode_product(w, x, M, products);
    return lcq_swiglu_finish(swiglu, products, M, w->N, y, status);
}
