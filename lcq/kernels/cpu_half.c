/* y (M, N) = x (M, K) @ W^T for fp32 activations and an fp16 weight W (N, K), on x86 CPUs with
 * AVX2, FMA and F16C; fp32 arithmetic.
 *
 * Decode steps on a CPU are bounded by how fast the weights stream from memory: half-width weights
 * halve the bytes. torch has no fast fp16 x fp32 product on CPUs without AVX-512-FP16, hence this
 * kernel: convert 8 weights with one instruction, multiply them into every row. Larger products
 * (prefill, big batches) are bounded by arithmetic instead: there a register tile of rows x columns
 * reuses each converted weight vector and each activation vector several times, so the fp16 copy
 * is the only weight a layer needs to keep.
 */
#include <immintrin.h>
#include <stdint.h>

#define MAX_ROWS 8 /* decode-sized products: one column at a time, all rows */
#define MAX_CHAINS 4
/* Larger products: a tile of 2 x 4 accumulators, 4 weight vectors and an activation vector (13 of the
 * 16 registers; 4 x 3 tiles spilled and ran 10-20% slower on a Zen 4), over blocks of 48 weight rows
 * (54 KiB of fp16 at K = 576, in L2). */
#define TILE_ROWS 2
#define TILE_COLUMNS 4
#define COLUMN_BLOCK 48

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

/* y[r, c] for a tile of R rows of x (row stride K) and C rows of w (row stride K), into y (row
 * stride N): R x C accumulators stay in registers, so each loaded activation vector feeds C FMAs
 * and each converted weight vector R. Inlined with R, C constants. */
static inline __attribute__((always_inline)) void tile(const int R, const int C, const float *x, int K,
                                                       const uint16_t *w, float *y, int N) {
    __m256 acc[TILE_ROWS][TILE_COLUMNS];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 weights[TILE_COLUMNS];
        for (int c = 0; c < C; c++)
            weights[c] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + (int64_t)c * K + k)));
        for (int r = 0; r < R; r++) {
            __m256 activations = _mm256_loadu_ps(x + (int64_t)r * K + k);
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_fmadd_ps(activations, weights[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++) {
        float sums[TILE_COLUMNS];
        if (C == 4) { /* the four columns' sums at once: two rounds of pairwise adds, then the halves */
            __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(acc[r][0], acc[r][1]), _mm256_hadd_ps(acc[r][2], acc[r][3]));
            _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1)));
        } else {
            for (int c = 0; c < C; c++) sums[c] = horizontal_sum(acc[r][c]);
        }
        for (int c = 0; c < C; c++) {
            for (int t = k; t < K; t++) sums[c] += x[(int64_t)r * K + t] * _cvtsh_ss(w[(int64_t)c * K + t]);
            y[(int64_t)r * N + c] = sums[c];
        }
    }
}

/* y[:, 0 .. columns) (row stride N) for `columns` <= COLUMN_BLOCK rows of w: tiles of TILE_ROWS
 * activation rows, which stay in L1, against the block, which stays in L2. One thread; cpu_index.c
 * calls it on blocks it expands from indices. */
void lcq_half_block(const float *x, int M, int K, const uint16_t *w, int columns, float *y, int N) {
#define TILE(rows, cols) tile(rows, cols, x + (int64_t)m * K, K, w + (int64_t)n * K, y + (int64_t)m * N + n, N)
    for (int m = 0; m < M; m += TILE_ROWS) {
        const int rows = M - m < TILE_ROWS ? M - m : TILE_ROWS;
        int n = 0;
        for (; n + TILE_COLUMNS <= columns; n += TILE_COLUMNS) {
            if (rows == TILE_ROWS) TILE(TILE_ROWS, TILE_COLUMNS); else TILE(1, TILE_COLUMNS);
        }
        for (; n < columns; n++) {
            if (rows == TILE_ROWS) TILE(TILE_ROWS, 1); else TILE(1, 1);
        }
    }
#undef TILE
}

/* More than MAX_ROWS rows: blocks of COLUMN_BLOCK weight rows, one per OpenMP task. */
static void large_matmul(const float *x, int M, int K, const uint16_t *w, int N, float *y) {
    const int blocks = (N + COLUMN_BLOCK - 1) / COLUMN_BLOCK;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < blocks; b++) {
        const int first = b * COLUMN_BLOCK, columns = N - first < COLUMN_BLOCK ? N - first : COLUMN_BLOCK;
        lcq_half_block(x, M, K, w + (int64_t)first * K, columns, y + first, N);
    }
}

/* x (M, K) fp32 contiguous, M >= 1; w (N, K) fp16 contiguous; y (M, N) fp32.
 * Returns 0, or -1 for M < 1. */
int lcq_half_matmul(const float *x, int M, int K, const uint16_t *w, int N, float *y) {
    if (M < 1) return -1;
    if (M > MAX_ROWS) {
        large_matmul(x, M, K, w, N, y);
        return 0;
    }
#define COLUMN(rows) column(rows, n, x, K, w, y, N)
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        switch (M) {
            case 1: COLUMN(1); break;
            case 2: COLUMN(2); break;
            case 3: COLUMN(3); break;
            case 4: COLUMN(4); break;
            case 5: COLUMN(5); break;
            case 6: COLUMN(6); break;
            case 7: COLUMN(7); break;
            default: COLUMN(8); break;
        }
    }
#undef COLUMN
    return 0;
}
