/* The bf16 decode product of an LCQ weight kept as its indices (cpu_index.h), with AVX-512 BF16.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_gemm.h"
#include "cpu_index.h"

/* The AVX-512 decode product with bf16 operands (bf16 products on, PAIR_MIN_ROWS rows or more):
 * activations rounded once per call to bf16 pairs along K; per pair of steps the two lookups (32
 * consecutive weights) become one vector of 16 bf16 pairs, and each row takes one vdpbf16ps with its
 * 16 pairs of activations where the fp32 form takes two FMAs and two loads, in passes of 4 to 8
 * rows (the fp32 form: up to 4), with tables held and tiles reduced as in the fp32 form (1.19-1.28x
 * the form before them at 5-9 rows). Weights past the last whole step stay fp32, as in the fp32 form.
 * Against the fp32 form (two copies of the library alternating, 2 threads, Zen 4, SmolLM2's shapes
 * at W4, both forms tiled): 1.10-1.20x at 5-6 rows, 1.00-1.06x at 9; before tiles 0.83-0.97x at 2-4
 * rows, where the lookups and the conversion bound both, 1.08-1.31x at 5-8. */
#define PAIR_PASS_ROWS 8
_Static_assert(PAIR_MIN_ROWS >= 4, "wide_pair_tiles_* take passes of 4 to 8 rows");

/* sums[r][c] and tails[r][c]: column c of a tile (row n) for R activation rows, as bf16 pairs (row
 * stride K2) and, for the scalar tail, fp32 (x). */
LCQ_BF16 static inline __attribute__((always_inline)) void wide_pair_column(
    const int R, const int BITS, const int RANK, const lcq_index_weight *w, int n, const uint32_t *pairs, int K2,
    const float *x, __m512 sums[][TILE_COLUMNS], float tails[][TILE_COLUMNS], int c) {
    const int K = w->K, whole = K / 16 * 16, fields = 32 / BITS;
    const uint8_t *row = w->indices + (int64_t)n * w->row_bytes;
    ask_row_ahead(w, n, 0);
    __m512 acc[PAIR_PASS_ROWS][2]; /* pairs of steps alternate between a row's two */
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const wide_table table = wide_table_of(w, n, RANK);
    wide_book book = wide_codebook(w, &table, RANK, n, 0);
    int k = 0, group = 0, group_end = w->group_size, chain = 0;
    for (int run = 0; k < whole; run++) {
        wide_words words = wide_load(row + (int64_t)run * 64, run < w->runs ? 4 : w->last_lane_bytes);
        const int steps = (whole - k) / 16 < fields ? (whole - k) / 16 : fields;
        for (int s = 0; s < steps; s += 2) { /* runs and groups are whole pairs of steps */
            if (k == group_end) {
                book = wide_codebook(w, &table, RANK, n, ++group);
                group_end += w->group_size;
            }
            const int both = s + 1 < steps; /* else K ends inside this pair: 16 weights, 8 pairs */
            const __m512 first = _mm512_permutexvar_ps(words, book);
            words = wide_next(words, BITS);
            const __m512 second = both ? _mm512_permutexvar_ps(words, book) : _mm512_setzero_ps();
            words = wide_next(words, BITS);
            const __m512bh weights = _mm512_cvtne2ps_pbh(second, first); /* weights k .. k + 31 in order */
            /* activations by a plain load but where K ends: with the masked load at every pair of steps, even
             * with every lane on, 5-8 rows ran 1.00-1.25x slower (two builds alternating, SmolLM2's and
             * Llama 3.2 1B's shapes at W4 g64 and W2 g128) */
            const __mmask16 lanes = both ? 0xFFFF : 0x00FF;
#define PAIR_STEP(C)                                                                                           \
    for (int r = 0; r < R; r++)                                                                                \
        acc[r][C] = _mm512_dpbf16_ps(acc[r][C], (__m512bh)(both ? _mm512_loadu_si512(pairs + (int64_t)r * K2 + k / 2) \
                                     : _mm512_maskz_loadu_epi32(lanes, pairs + (int64_t)r * K2 + k / 2)), weights)
            if (chain) PAIR_STEP(1); else PAIR_STEP(0); /* constant indices keep acc in registers */
#undef PAIR_STEP
            k += both ? 32 : 16;
            chain ^= 1;
        }
    }
    for (int r = 0; r < R; r++) tails[r][c] = 0.0f;
    if (whole < K) {
        float weights[16];
        tail_weights(w, n, whole, weights);
        for (int i = whole; i < K; i++)
            for (int r = 0; r < R; r++) tails[r][c] += x[(int64_t)r * K + i] * weights[i - whole];
    }
    for (int r = 0; r < R; r++) sums[r][c] = _mm512_add_ps(acc[r][0], acc[r][1]);
}

/* y[r, n0 + c] for R rows and a tile's `count` columns from n0. */
LCQ_BF16 static inline __attribute__((always_inline)) void wide_pair_tile(
    const int R, const int BITS, const int RANK, const lcq_index_weight *w, int n0, int count, const uint32_t *pairs,
    int K2, const float *x, float *y) {
    __m512 sums[PAIR_PASS_ROWS][TILE_COLUMNS];
    float tails[PAIR_PASS_ROWS][TILE_COLUMNS];
    for (int c = 0; c < count; c++) wide_pair_column(R, BITS, RANK, w, n0 + c, pairs, K2, x, sums, tails, c);
    for (int r = 0; r < R; r++) wide_reduce(sums[r], tails[r], count, y + (int64_t)r * w->N + n0);
}

/* wide_pair_tiles_BITS_RANK: the product for one bit width and rank, in its own function (TILES). M >= 4
 * rows go in passes of 4 to 8 (sizes as even as can be: M / passes >= 4 with passes = ceil(M / 8)),
 * so the tile is instantiated for those five row counts only. */
#define PAIR_TILES(BITS, RANK)                                                                                      \
    LCQ_BF16 static int wide_pair_tiles_##BITS##_##RANK(const lcq_index_weight *w, const float *x, int M, float *y) { \
        const int K2 = (w->K + 1) / 2, passes = (M + PAIR_PASS_ROWS - 1) / PAIR_PASS_ROWS;                          \
        const int tiles = (w->N + TILE_COLUMNS - 1) / TILE_COLUMNS;                                                 \
        uint32_t *pairs = lcq_round_rows(x, M, w->K);                                                               \
        if (pairs == NULL) return -1;                                                                               \
        DECODE_TILES for (int t = 0; t < tiles; t++) {                                                              \
            const int n0 = t * TILE_COLUMNS, count = w->N - n0 < TILE_COLUMNS ? w->N - n0 : TILE_COLUMNS;           \
            for (int pass = 0, m = 0; pass < passes; pass++) {                                                      \
                const int rows = M / passes + (pass < M % passes);                                                  \
                const uint32_t *p = pairs + (int64_t)m * K2;                                                        \
                const float *xs = x + (int64_t)m * w->K;                                                            \
                float *out = y + (int64_t)m * w->N;                                                                 \
                switch (rows) {                                                                                     \
                    case 4: wide_pair_tile(4, BITS, RANK, w, n0, count, p, K2, xs, out); break;                     \
                    case 5: wide_pair_tile(5, BITS, RANK, w, n0, count, p, K2, xs, out); break;                     \
                    case 6: wide_pair_tile(6, BITS, RANK, w, n0, count, p, K2, xs, out); break;                     \
                    case 7: wide_pair_tile(7, BITS, RANK, w, n0, count, p, K2, xs, out); break;                     \
                    default: wide_pair_tile(PAIR_PASS_ROWS, BITS, RANK, w, n0, count, p, K2, xs, out); break;       \
                }                                                                                                   \
                m += rows;                                                                                          \
            }                                                                                                       \
        }                                                                                                           \
        free(pairs);                                                                                                \
        return 0;                                                                                                   \
    }
#define PAIR_RANK_TILES(BITS)                                                                                       \
    PAIR_TILES(BITS, 1)                                                                                             \
    PAIR_TILES(BITS, 2)                                                                                             \
    PAIR_TILES(BITS, 3)                                                                                             \
    PAIR_TILES(BITS, 4)                                                                                             \
    PAIR_TILES(BITS, 0)
PAIR_RANK_TILES(2)
PAIR_RANK_TILES(3)
PAIR_RANK_TILES(4)
#undef PAIR_RANK_TILES
#undef PAIR_TILES

LCQ_BF16 int lcq_index_pair_product(const lcq_index_weight *w, const float *x, int M, float *y) {
    int status = 0;
    switch (w->bits) {
        case 2: RANKS(wide_pair, 2, status = , (w, x, M, y)) break;
        case 3: RANKS(wide_pair, 3, status = , (w, x, M, y)) break;
        default: RANKS(wide_pair, 4, status = , (w, x, M, y)) break;
    }
    return status;
}
