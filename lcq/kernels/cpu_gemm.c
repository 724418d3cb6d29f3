/* y (M, N) = x (M, K) @ W^T for products too large for the decode kernels (prefill, many sequences):
 * fp32 arithmetic on x86 CPUs with AVX2 and FMA, for any weight that can be expanded to fp32 a block
 * of rows at a time (fp16 copies in cpu_half.c, LCQ indices in cpu_index.c).
 *
 * Such products are bounded by arithmetic, so the point is to keep both FMA pipes busy: the
 * activations are copied once per call into panels of 16 rows stored k-major ([K][16]), each
 * block of weight rows is expanded to exact fp32 values into a per-thread buffer (in L2), and a
 * micro-kernel keeps a 6 x 16 tile of outputs in 12 registers: per k it loads two activation vectors
 * and broadcasts six weights, 12 FMAs for 8 loads. (A dot-product tile over fp16 weights, the form
 * before, spent an fp16 conversion per 2 FMAs and reached ~80% of what this reaches.) Where the CPU
 * has AVX512_BF16 and the caller asks for it, the same blocking runs on bf16 operands (below).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_constant.h"
#include "cpu_gemm.h"

#define PANEL 16       /* activation rows per panel: two vectors (a last panel of up to 8 rows: one) */
#define TILE_WEIGHTS LCQ_TILE_ROWS /* weight rows per micro-tile */
#define BLOCK_ROWS 48  /* weight rows expanded at a time (110 KiB of fp32 at K = 576) */

/* Rows m0 .. m0 + width - 1 of x (zeros past M) as a [K][width] panel. */
static void pack_panel(const float *x, int M, int K, int m0, int width, float *panel) {
    const int rows = M - m0 < width ? M - m0 : width;
    for (int k = 0; k < K; k++) {
        for (int i = 0; i < rows; i++) panel[(int64_t)k * width + i] = x[(int64_t)(m0 + i) * K + k];
        for (int i = rows; i < width; i++) panel[(int64_t)k * width + i] = 0.0f;
    }
}

/* The width of the panel at row m0: 16, or 8 for a last one of up to 8 rows. */
static inline int panel_width(int M, int m0) {
    return M - m0 <= PANEL / 2 ? PANEL / 2 : PANEL;
}

/* y[m, n] for a panel's `rows` valid rows (row stride N), V vectors wide, and R weight rows w (row
 * stride K): R x V accumulators, each the 8 outputs of one weight row for 8 activation rows. Inlined
 * with R and V constants. */
static inline __attribute__((always_inline)) void micro_tile(const int R, const int V, const float *panel, int K,
                                                             const float *w, int rows, float *y, int N) {
    __m256 acc[TILE_WEIGHTS][2];
    lcq_tile_sums(R, V, w, K, panel, V * 8, K, acc);
    float out[TILE_WEIGHTS][PANEL];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) _mm256_storeu_ps(out[r] + v * 8, acc[r][v]);
    for (int i = 0; i < rows; i++)
        for (int r = 0; r < R; r++) y[(int64_t)i * N + r] = out[r][i];
}

/* The columns of a panel V vectors wide: micro-tiles of TILE_WEIGHTS weight rows, then the rest. */
static inline __attribute__((always_inline)) void panel_product(const int V, const float *panel, int K,
                                                                const float *w, int count, int rows, float *y,
                                                                int N) {
#define TILE(R) micro_tile(R, V, panel, K, w + (int64_t)n * K, rows, y + n, N)
    int n = 0;
    for (; n + TILE_WEIGHTS <= count; n += TILE_WEIGHTS) TILE(TILE_WEIGHTS);
    switch (count - n) { /* fewer than TILE_WEIGHTS rows left */
        LCQ_CASES_1_TO_5(TILE)
        default: break;
    }
#undef TILE
}

/* y[:, 0 .. count) (row stride N) for `count` expanded weight rows against every panel. */
static void block_product(const float *panels, int M, int K, const float *w, int count, float *y, int N) {
    for (int m0 = 0; m0 < M; m0 += PANEL) {
        const float *panel = panels + (int64_t)m0 * K;
        const int rows = M - m0 < PANEL ? M - m0 : PANEL;
        if (panel_width(M, m0) == PANEL)
            panel_product(2, panel, K, w, count, rows, y + (int64_t)m0 * N, N);
        else
            panel_product(1, panel, K, w, count, rows, y + (int64_t)m0 * N, N);
    }
}

/* bf16 arithmetic (AVX512_BF16, when lcq_set_bf16_products turned it on): the same blocking, with
 * activations and expanded weights rounded to bf16 (round to nearest even) and multiplied by
 * vdpbf16ps, which sums the products of two bf16 pairs into each fp32 lane: per instruction twice the
 * multiply-adds of an fp32 FMA of the same width, and sums stay fp32. Panels are 32 activation rows
 * wide (two 16-lane vectors; a last one of up to 16 rows: one) and stored as [K / 2][width] pairs, so
 * one 32-bit broadcast of a weight pair meets one vector of activation pairs. */
#define BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define BF16_PANEL 32

/* From this many rows the bf16 product beats the decode forms (a panel of 16 then holds 10-15 rows):
 * fp32 decode products against the bf16 product of 16 rows, 2 threads on a Zen 4, crossed at 9-13
 * rows over SmolLM2's five weight shapes with indices and fp16 copies. */
#define BF16_MIN_ROWS 10

static _Thread_local int bf16_products; /* per calling thread, like torch.autocast */

int lcq_gemm_min_rows(void) {
    return bf16_products ? BF16_MIN_ROWS : LCQ_GEMM_MIN_ROWS;
}

/* Turns bf16 products on (where the CPU has AVX512_BF16) or off for the calling thread; returns the
 * previous setting, so a caller can restore it. */
int lcq_set_bf16_products(int on) {
    const int previous = bf16_products;
    __builtin_cpu_init();
    bf16_products = on && __builtin_cpu_supports("avx512bf16");
    return previous;
}

/* K fp32 values as ceil(K / 2) bf16 pairs, the last one padded with zero. */
BF16 static void round_pairs(const float *src, int K, uint32_t *pairs) {
    uint16_t *dst = (uint16_t *)pairs;
    const int padded = (K + 1) & ~1;
    for (int k = 0; k < padded; k += 16) {
        const int left = K - k < 16 ? K - k : 16, stored = padded - k < 16 ? padded - k : 16;
        const __m512 values = _mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1), src + k);
        _mm256_mask_storeu_epi16(dst + k, (__mmask16)((1u << stored) - 1), (__m256i)_mm512_cvtneps_pbh(values));
    }
}

static inline int bf16_panel_width(int M, int m0) {
    return M - m0 <= BF16_PANEL / 2 ? BF16_PANEL / 2 : BF16_PANEL;
}

/* Rows m0 .. m0 + width - 1 of the rounded activations (M rows of K2 pairs; zeros past M) as a
 * [K2][width] panel of pairs. */
static void pack_pair_panel(const uint32_t *pairs, int M, int K2, int m0, int width, uint32_t *panel) {
    const int rows = M - m0 < width ? M - m0 : width;
    for (int k = 0; k < K2; k++) {
        for (int i = 0; i < rows; i++) panel[(int64_t)k * width + i] = pairs[(int64_t)(m0 + i) * K2 + k];
        for (int i = rows; i < width; i++) panel[(int64_t)k * width + i] = 0;
    }
}

/* y[m, n] for a panel's `rows` valid rows (row stride N), V vectors wide, and R rounded weight rows
 * (K2 pairs each): R x V accumulators of 16 outputs. Inlined with R and V constants. */
BF16 static inline __attribute__((always_inline)) void pair_tile(const int R, const int V, const uint32_t *panel,
                                                                 int K2, const uint32_t *w, int rows, float *y,
                                                                 int N) {
    __m512 acc[TILE_WEIGHTS][2];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) acc[r][v] = _mm512_setzero_ps();
    for (int k = 0; k < K2; k++) {
        __m512bh columns[2];
        for (int v = 0; v < V; v++) columns[v] = (__m512bh)_mm512_loadu_si512(panel + (int64_t)k * V * 16 + v * 16);
        for (int r = 0; r < R; r++) {
            const __m512bh pair = (__m512bh)_mm512_set1_epi32((int)w[(int64_t)r * K2 + k]);
            for (int v = 0; v < V; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], pair, columns[v]);
        }
    }
    float out[TILE_WEIGHTS][BF16_PANEL];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) _mm512_storeu_ps(out[r] + v * 16, acc[r][v]);
    for (int i = 0; i < rows; i++)
        for (int r = 0; r < R; r++) y[(int64_t)i * N + r] = out[r][i];
}

BF16 static inline __attribute__((always_inline)) void pair_panel_product(const int V, const uint32_t *panel, int K2,
                                                                          const uint32_t *w, int count, int rows,
                                                                          float *y, int N) {
#define TILE(R) pair_tile(R, V, panel, K2, w + (int64_t)n * K2, rows, y + n, N)
    int n = 0;
    for (; n + TILE_WEIGHTS <= count; n += TILE_WEIGHTS) TILE(TILE_WEIGHTS);
    switch (count - n) {
        LCQ_CASES_1_TO_5(TILE)
        default: break;
    }
#undef TILE
}

BF16 static void pair_block_product(const uint32_t *panels, int M, int K2, const uint32_t *w, int count, float *y,
                                    int N) {
    for (int m0 = 0; m0 < M; m0 += BF16_PANEL) {
        const uint32_t *panel = panels + (int64_t)m0 * K2;
        const int rows = M - m0 < BF16_PANEL ? M - m0 : BF16_PANEL;
        if (bf16_panel_width(M, m0) == BF16_PANEL)
            pair_panel_product(2, panel, K2, w, count, rows, y + (int64_t)m0 * N, N);
        else
            pair_panel_product(1, panel, K2, w, count, rows, y + (int64_t)m0 * N, N);
    }
}

static int bf16_product(const float *x, int M, int K, int N, lcq_expand_rows expand, const void *weight, float *y) {
    const int K2 = (K + 1) / 2, panels = (M + BF16_PANEL - 1) / BF16_PANEL;
    const int blocks = (N + BLOCK_ROWS - 1) / BLOCK_ROWS;
    uint32_t *pairs = malloc(sizeof(uint32_t) * (size_t)M * K2);
    uint32_t *packed = malloc(sizeof(uint32_t) * (size_t)panels * BF16_PANEL * K2);
    int failed = pairs == NULL || packed == NULL;
    if (!failed) {
#pragma omp parallel reduction(| : failed)
        {
#pragma omp for schedule(static)
            for (int m = 0; m < M; m++) round_pairs(x + (int64_t)m * K, K, pairs + (int64_t)m * K2);
#pragma omp for schedule(static)
            for (int p = 0; p < panels; p++)
                pack_pair_panel(pairs, M, K2, p * BF16_PANEL, bf16_panel_width(M, p * BF16_PANEL),
                                packed + (int64_t)p * BF16_PANEL * K2);
            float *block = malloc(sizeof(float) * BLOCK_ROWS * (size_t)K);
            uint32_t *rounded = malloc(sizeof(uint32_t) * BLOCK_ROWS * (size_t)K2);
            if (block == NULL || rounded == NULL) failed = 1;
#pragma omp for schedule(static)
            for (int b = 0; b < blocks; b++) {
                if (block == NULL || rounded == NULL) continue;
                const int first = b * BLOCK_ROWS, count = N - first < BLOCK_ROWS ? N - first : BLOCK_ROWS;
                expand(weight, K, first, count, block);
                for (int r = 0; r < count; r++) round_pairs(block + (int64_t)r * K, K, rounded + (int64_t)r * K2);
                pair_block_product(packed, M, K2, rounded, count, y + first, N);
            }
            free(block);
            free(rounded);
        }
    }
    free(pairs);
    free(packed);
    return failed ? -1 : 0;
}

static int fp32_product(const float *x, int M, int K, int N, lcq_expand_rows expand, const void *weight, float *y) {
    const int panels = (M + PANEL - 1) / PANEL, blocks = (N + BLOCK_ROWS - 1) / BLOCK_ROWS;
    float *packed = malloc(sizeof(float) * (size_t)panels * PANEL * K);
    if (packed == NULL) return -1;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
#pragma omp for schedule(static)
        for (int p = 0; p < panels; p++)
            pack_panel(x, M, K, p * PANEL, panel_width(M, p * PANEL), packed + (int64_t)p * PANEL * K);
        float *block = malloc(sizeof(float) * BLOCK_ROWS * (size_t)K);
        if (block == NULL) failed = 1;
#pragma omp for schedule(static)
        for (int b = 0; b < blocks; b++) {
            if (block == NULL) continue;
            const int first = b * BLOCK_ROWS, count = N - first < BLOCK_ROWS ? N - first : BLOCK_ROWS;
            expand(weight, K, first, count, block);
            block_product(packed, M, K, block, count, y + first, N);
        }
        free(block);
    }
    free(packed);
    return failed ? -1 : 0;
}

int lcq_expanded_product(const float *x, int M, int K, int N, lcq_expand_rows expand, const void *weight, float *y) {
    return (bf16_products ? bf16_product : fp32_product)(x, M, K, N, expand, weight, y);
}
