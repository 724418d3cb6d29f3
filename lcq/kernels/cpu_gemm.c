/* y (M, N) = x (M, K) @ W^T for products too large for the decode kernels (prefill, many sequences):
 * fp32 arithmetic on x86 CPUs with AVX2 and FMA, for any weight that can be expanded to fp32 a block
 * of rows at a time (fp16 copies in cpu_half.c, LCQ indices in cpu_index.c).
 *
 * Such products are bounded by arithmetic, so the point is to keep both FMA pipes busy: the
 * activations are copied once per call into panels of 16 rows stored k-major ([K][16]), each
 * block of weight rows is expanded to exact fp32 values into a per-thread buffer (in L2), and a
 * micro-kernel keeps a 6 x 16 tile of outputs in 12 registers: per k it loads two activation vectors
 * and broadcasts six weights, 12 FMAs for 8 loads. (A dot-product tile over fp16 weights, the form
 * before, spent an fp16 conversion per 2 FMAs and reached ~80% of what this reaches.)
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

int lcq_expanded_product(const float *x, int M, int K, int N, lcq_expand_rows expand, const void *weight, float *y) {
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
