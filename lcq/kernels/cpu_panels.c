/* The panel form of the large CPU products (cpu_gemm.c's lcq_expanded_product takes it): 8-bit operands with
 * int32 sums (AVX512_VNNI) for weights that expand to bytes (LCQ indices), and bf16 operands over weights kept
 * as panels of pairs (the fp16 head). With int8, vpdpbusd sums four products of bytes into each 32-bit lane and,
 * against cpu_gemm.c's blocked product over expanded weights, the roles turn round: activations are
 * quantized per block of 64 values along K (cpu_gemm.h's int8 form) and stay rows, weights are bytes
 * from their own expansion (or kept) stored as panels of 32 rows [K / 4][32] with the blocks' scales
 * after them (lcq_word_panels), a vector is 16 weight rows of 4-byte words, and a tile of 6 activation
 * rows x 2 weight vectors broadcasts 6 activation words per step against 2 weight loads; each block's
 * int32 sums become fp32 times both scales, and each tile stores whole vectors of a row's outputs.
 * (Activations as the panels, the form before, padded each panel to 16 or 32 rows and stored each
 * tile's outputs one at a time, transposed: a product of 33 rows took 1.46x one of 32.) bf16 products
 * of a weight that keeps its rows as panels of pairs (lcq_expansions.pair_panels: the fp16 head) take
 * that panel form too; expanding per call, their transposes cost more than the padding saved.
 * On CPUs with AMX, tiles of 16 activation rows take the products (cpu_amx.c), and from byte_pair_rows rows the
 * int8 weights go to bf16 tiles.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_constant.h"
#include "cpu_exp.h"
#include "cpu_gemm.h"

#define WORD_PANEL LCQ_WORD_PANEL /* int8, kept bf16: weight rows per panel, two vectors of 32-bit words */

/* One step along K of byte_sums: R activation words (row stride lda) broadcast against the V weight
 * vectors of the panel's row at b. */
LCQ_BF16 static inline __attribute__((always_inline)) void byte_step(const int R, const int V, const uint32_t *a,
                                                                    int64_t lda, const uint32_t *b,
                                                                    __m512i sums[][2]) {
    __m512i weights[2];
    for (int v = 0; v < V; v++) weights[v] = _mm512_loadu_si512(b + v * 16);
    for (int r = 0; r < R; r++) {
        const __m512i words = _mm512_set1_epi32((int)a[r * lda]);
        for (int v = 0; v < V; v++) sums[r][v] = add_byte_products(sums[r][v], weights[v], words);
    }
}

/* acc[r][v] = the products of activation row a[r] (the int8 form: K words of signed bytes, then its
 * blocks' scales and offsets; row stride lda words) with weight rows 16v .. 16v + 16 of the panel b
 * (unsigned bytes, [K words + scales...][WORD_PANEL], lcq_word_panels). Per block, 32-bit sums start
 * at the row's offset and take one vpdpbusd (four multiply-adds per lane) per activation row and
 * weight vector per word, then become fp32 times both scales. The steps run LCQ_STREAM_EVERY at a
 * time, the stream stepped between them: with the step's test inside every step, GCC kept a pointer
 * on the stack (a store and reload per step); unrolled, 1.00-1.03x on SmolLM2's LCQ shapes at 64-256
 * rows, two libraries alternating, Zen 5. */
LCQ_BF16 static inline __attribute__((always_inline)) void byte_sums(const int R, const int V, const uint32_t *a,
                                                                    int64_t lda, const uint32_t *b, int K,
                                                                    __m512 acc[][2], lcq_line_stream *stream) {
    const int blocks = lcq_scale_blocks(K);
    const float *scales = (const float *)(b + (int64_t)K * WORD_PANEL);
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) acc[r][v] = _mm512_setzero_ps();
    for (int block = 0; block < blocks; block++) {
        __m512i sums[LCQ_TILE_ROWS][2];
        for (int r = 0; r < R; r++) {
            const __m512i offset = _mm512_set1_epi32(((const int32_t *)(a + r * lda + K + blocks))[block]);
            for (int v = 0; v < V; v++) sums[r][v] = offset;
        }
        const int steps = (block + 1) * LCQ_SCALE_WORDS < K ? LCQ_SCALE_WORDS : K - block * LCQ_SCALE_WORDS;
        const uint32_t *weights = b + (int64_t)block * LCQ_SCALE_WORDS * WORD_PANEL, *words = a + block * LCQ_SCALE_WORDS;
        int k = 0;
        for (; k + LCQ_STREAM_EVERY <= steps; k += LCQ_STREAM_EVERY) {
#pragma GCC unroll 4
            for (int u = 0; u < LCQ_STREAM_EVERY; u++)
                byte_step(R, V, words + k + u, lda, weights + (k + u) * WORD_PANEL, sums);
            lcq_stream_step(stream);
        }
        for (; k < steps; k++) byte_step(R, V, words + k, lda, weights + k * WORD_PANEL, sums);
        for (int v = 0; v < V; v++) {
            const __m512 scale = _mm512_loadu_ps(scales + block * WORD_PANEL + v * 16);
            for (int r = 0; r < R; r++) {
                const __m512 both = _mm512_mul_ps(scale, _mm512_set1_ps(((const float *)(a + r * lda + K))[block]));
                acc[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][v]), both, acc[r][v]);
            }
        }
    }
}

/* One step along K of pair_sums: R activation pairs broadcast against the V weight vectors at b. */
LCQ_BF16 static inline __attribute__((always_inline)) void pair_step(const int R, const int V, const uint32_t *a,
                                                                    int64_t lda, const uint32_t *b, __m512 acc[][2]) {
    __m512bh weights[2];
    for (int v = 0; v < V; v++) weights[v] = (__m512bh)_mm512_loadu_si512(b + v * 16);
    for (int r = 0; r < R; r++) {
        const __m512bh pair = (__m512bh)_mm512_set1_epi32((int)a[r * lda]);
        for (int v = 0; v < V; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], weights[v], pair);
    }
}

/* The bf16 form of byte_sums: acc[r][v] = the products of activation row a[r] (K bf16 pairs) with
 * weight rows 16v .. 16v + 16 of the panel b ([K][WORD_PANEL] pairs), one vdpbf16ps (two
 * multiply-adds per fp32 lane) per activation row and weight vector per pair: the sums, in the same
 * order, of the activation panels' form (lcq_pair_sums), so the same values. */
LCQ_BF16 static inline __attribute__((always_inline)) void pair_sums(const int R, const int V, const uint32_t *a,
                                                                    int64_t lda, const uint32_t *b, int K,
                                                                    __m512 acc[][2], lcq_line_stream *stream) {
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) acc[r][v] = _mm512_setzero_ps();
    int k = 0;
    for (; k + LCQ_STREAM_EVERY <= K; k += LCQ_STREAM_EVERY) {
#pragma GCC unroll 4
        for (int u = 0; u < LCQ_STREAM_EVERY; u++) pair_step(R, V, a + k + u, lda, b + (k + u) * WORD_PANEL, acc);
        lcq_stream_step(stream);
    }
    for (; k < K; k++) pair_step(R, V, a + k, lda, b + k * WORD_PANEL, acc);
}

/* y[r][0 .. columns) (row stride ldy) for R activation rows and the first `columns` rows of a weight
 * panel (V vectors of 16: columns > 16 (V - 1)), in the product form FORM (LCQ_INT8_PRODUCTS or
 * LCQ_BF16_PRODUCTS): whole vectors stored, the last one masked. */
LCQ_BF16 static inline __attribute__((always_inline)) void panel_tile(const int FORM, const int R, const int V,
                                                                     const uint32_t *a, int64_t lda,
                                                                     const uint32_t *panel, int K, int columns,
                                                                     float *y, int64_t ldy,
                                                                     lcq_line_stream *stream) {
    __m512 acc[LCQ_TILE_ROWS][2];
    if (FORM == LCQ_INT8_PRODUCTS)
        byte_sums(R, V, a, lda, panel, K, acc, stream);
    else
        pair_sums(R, V, a, lda, panel, K, acc, stream);
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) {
            const int left = columns - 16 * v;
            if (left >= 16)
                _mm512_storeu_ps(y + r * ldy + 16 * v, acc[r][v]);
            else
                _mm512_mask_storeu_ps(y + r * ldy + 16 * v, (__mmask16)((1u << left) - 1), acc[r][v]);
        }
}

/* panel_tile of R activation rows for a task's panels: with an up panel, y takes silu(gate) * up. */
LCQ_BF16 static inline __attribute__((always_inline)) void task_tile(const int FORM, const int R, const int V,
                                                                    const uint32_t *a, int64_t lda,
                                                                    const uint32_t *gate, const uint32_t *up, int K,
                                                                    int columns, float *y, int64_t ldy,
                                                                    lcq_line_stream *stream) {
    if (up == NULL) {
        panel_tile(FORM, R, V, a, lda, gate, K, columns, y, ldy, stream);
        return;
    }
    float products[LCQ_TILE_ROWS][2 * WORD_PANEL]; /* gate, then up */
    panel_tile(FORM, R, V, a, lda, gate, K, columns, products[0], 2 * WORD_PANEL, stream);
    panel_tile(FORM, R, V, a, lda, up, K, columns, products[0] + WORD_PANEL, 2 * WORD_PANEL, stream);
    for (int r = 0; r < R; r++) lcq_silu_mul_row16(products[r], products[r] + WORD_PANEL, y + r * ldy, columns);
}

/* y[m][0 .. columns) (row stride ldy) for the M activation rows (`words` words apart, K words of
 * bytes or pairs each) and a task's panels: tiles of LCQ_TILE_ROWS rows, then the rest. */
LCQ_BF16 static inline __attribute__((always_inline)) void task_rows(const int FORM, const int V, const uint32_t *x,
                                                                    int M, int K, int words, const uint32_t *gate,
                                                                    const uint32_t *up, int columns, float *y,
                                                                    int64_t ldy, lcq_line_stream *stream) {
#define TASK_TILE_AT(R) \
    task_tile(FORM, R, V, x + (int64_t)m * words, words, gate, up, K, columns, y + (int64_t)m * ldy, ldy, stream)
    int m = 0;
    for (; m + LCQ_TILE_ROWS <= M; m += LCQ_TILE_ROWS) TASK_TILE_AT(LCQ_TILE_ROWS);
    switch (M - m) {
        LCQ_CASES_1_TO_5(TASK_TILE_AT)
        default: break;
    }
#undef TASK_TILE_AT
}

/* The rows the AMX tiles of M activation rows read, in this form and depth (lcq_amx_tile_rows): M up to a
 * whole tile. */
static int amx_padded_rows(int form, int depth, int M) {
    const int step = lcq_amx_tile_rows(form, depth);
    return M > step - LCQ_AMX_ROWS ? (M + step - 1) / step * step : (M + LCQ_AMX_ROWS - 1) / LCQ_AMX_ROWS * LCQ_AMX_ROWS;
}

/* lcq_amx_tile's tiles of up to lcq_amx_tile_rows activation rows for M rows (the rows past M to
 * amx_padded_rows are readable) and a task's panels: with an up panel, y takes silu(gate) * up. */
LCQ_BF16 static void amx_rows(int form, const uint32_t *x, int M, int K, int words, const uint32_t *gate,
                              const uint32_t *up, int columns, float *y, int64_t ldy, lcq_line_stream *stream) {
    const int step = lcq_amx_tile_rows(form, K);
    for (int m = 0; m < M; m += step) {
        const int count = M - m < step ? M - m : step;
        const uint32_t *rows = x + (int64_t)m * words;
        float *out = y + (int64_t)m * ldy;
        if (up == NULL) {
            lcq_amx_tile(form, count, rows, words, K, gate, columns, out, ldy, stream);
            continue;
        }
        float products[2 * LCQ_AMX_ROWS][2 * WORD_PANEL]; /* gate, then up */
        lcq_amx_tile(form, count, rows, words, K, gate, columns, products[0], 2 * WORD_PANEL, stream);
        lcq_amx_tile(form, count, rows, words, K, up, columns, products[0] + WORD_PANEL, 2 * WORD_PANEL, stream);
        for (int r = 0; r < count; r++)
            lcq_silu_mul_row16(products[r], products[r] + WORD_PANEL, out + r * ldy, columns);
    }
}

/* From this many rows bf16 products take AMX tiles: SmolLM2's 49152 x 576 head (kept panels, 2 threads)
 * 0.85x the register tiles at 3 rows, 1.01x at 4, 1.14x at 5, 1.45x at 6, 1.77x at 8, 3.3x at 16, 7.4x
 * at 64, 3.6x at 256. */
#define AMX_PAIR_MIN_ROWS 5

/* From this many rows int8 products of LCQ layers run on bf16 AMX tiles where AMX is on (lcq_panel_product):
 * no scaling per block of 64 values (what bounds the int8 tiles), for a bf16 expansion of each task's int8
 * panels (byte_panel_pairs, about 0.1 ns a weight) and twice the activation bytes. bench/cpu_amx.py,
 * W4 r2 g64 with int8 rows kept, weights from memory, 2 threads on a Xeon with AMX, against the int8
 * tiles: SmolLM2's shapes 0.77-0.92x at 64 rows, 0.87-1.04x at 128, 0.96-1.18x at 256, 0.97-1.23x at
 * 1024; Llama 3.2 1B's 0.78-0.91x, 0.81-1.05x, 0.96-1.27x, 1.06-1.10x. lcq_set_byte_pair_rows changes it
 * (benchmarks, tests). */
static int byte_pair_rows = 256;

int lcq_set_byte_pair_rows(int rows) {
    const int previous = byte_pair_rows;
    byte_pair_rows = rows;
    return previous;
}

/* From this many rows past the last whole tile of 16 (with one whole tile or more) an int8 product's last
 * rows take a tile of their own, padded with zero rows, instead of the register tiles. SmolLM2's four LCQ
 * layers' products (W4 r2 g64, kept int8 rows, 2 threads on a Xeon with AMX; ad hoc timings, two builds
 * in turn), ms a layer: 31 rows 0.264-0.286 -> 0.199-0.203, 47 rows 0.325-0.341 -> 0.265-0.274, 63 rows
 * 0.398-0.431 -> 0.329-0.334, 24 rows 0.216-0.238 -> 0.196-0.199; padding from 1 row lost at 1-6 rows
 * past a tile (17-20 rows 0.168-0.183 -> 0.204-0.214, 36-38 rows 0.227-0.258 -> 0.281-0.295), and 8-12 rows
 * alone took 0.128-0.139 against 0.152 for a tile of 16. The same values either way (the tiles' are the
 * register tiles' bit for bit). */
#define AMX_BYTE_PAD_ROWS 8

/* The rows of a task's product that take AMX tiles (the thread configured them), where AMX is on: in
 * int8 products whole tiles of LCQ_AMX_ROWS (each block's scaling costs what a row does in the register
 * tiles), and the rows past them from AMX_BYTE_PAD_ROWS; in bf16 from AMX_PAIR_MIN_ROWS every row; the
 * activation rows padded with zero rows to whole tiles (amx_padded_rows). None elsewhere. */
static int amx_task_rows(int form, int M) {
    if (!lcq_amx_on()) return 0;
    if (form == LCQ_INT8_PRODUCTS)
        return M >= LCQ_AMX_ROWS && M % LCQ_AMX_ROWS >= AMX_BYTE_PAD_ROWS ? M : M - M % LCQ_AMX_ROWS;
    return M >= AMX_PAIR_MIN_ROWS || lcq_invariant() ? M : 0;
}

/* The product of a task's panels in the product form FORM: its first `tiled` rows in AMX tiles
 * (amx_task_rows), then register tiles for the rest. */
LCQ_BF16 static void task_product(int form, int tiled, const uint32_t *x, int M, int K, int words,
                                  const uint32_t *gate, const uint32_t *up, int columns, float *y, int64_t ldy,
                                  lcq_line_stream *stream) {
    if (tiled) amx_rows(form, x, tiled, K, words, gate, up, columns, y, ldy, stream);
    x += (int64_t)tiled * words, y += tiled * ldy, M -= tiled;
    if (M == 0) return;
    const int wide = columns > 16;
    if (form == LCQ_INT8_PRODUCTS && wide)
        task_rows(LCQ_INT8_PRODUCTS, 2, x, M, K, words, gate, up, columns, y, ldy, stream);
    else if (form == LCQ_INT8_PRODUCTS)
        task_rows(LCQ_INT8_PRODUCTS, 1, x, M, K, words, gate, up, columns, y, ldy, stream);
    else if (wide)
        task_rows(LCQ_BF16_PRODUCTS, 2, x, M, K, words, gate, up, columns, y, ldy, stream);
    else
        task_rows(LCQ_BF16_PRODUCTS, 1, x, M, K, words, gate, up, columns, y, ldy, stream);
}

LCQ_BF16 void lcq_word_panels(const uint32_t *rows, int count, int words, uint32_t *panels) {
    for (int first = 0; first < count; first += 16) {
        uint32_t *panel = panels + (int64_t)(first / WORD_PANEL) * WORD_PANEL * words + first % WORD_PANEL;
        const int height = count - first < 16 ? count - first : 16;
        for (int c = 0; c < words; c += 16)
            lcq_transpose_words(rows + (int64_t)first * words + c, words, height, words - c < 16 ? words - c : 16,
                            panel + (int64_t)c * WORD_PANEL, WORD_PANEL);
    }
    if (count % WORD_PANEL > 0 && count % WORD_PANEL <= 16) /* the last panel's second half: zeros */
        for (int c = 0; c < words; c++)
            for (int i = 16; i < WORD_PANEL; i++)
                panels[(int64_t)(count / WORD_PANEL) * WORD_PANEL * words + (int64_t)c * WORD_PANEL + i] = 0;
}

/* A panel of weight rows in the int8 form (cpu_gemm.h: [depth][WORD_PANEL] words of unsigned bytes, then
 * each block's scales) as bf16 pairs [pair_rows][WORD_PANEL]: word j's values q = byte - 128 times their
 * block's scale (exact in fp32 up to one rounding), rounded to bf16, as pair rows 2j (values 4j, 4j + 1)
 * and 2j + 1 (4j + 2, 4j + 3); rows from 2 * depth zeros. */
LCQ_BF16 static void byte_panel_pairs(const uint32_t *panel, int depth, int pair_rows, uint32_t *pairs) {
    static const uint16_t interleaved[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                             8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i order = _mm512_loadu_si512(interleaved), low_byte = _mm512_set1_epi32(0xff);
    const __m512i bias = _mm512_set1_epi32(128);
    const float *scales = (const float *)(panel + (int64_t)depth * WORD_PANEL);
    for (int j = 0; j < depth; j++)
        for (int c = 0; c < WORD_PANEL; c += 16) {
            const __m512 scale = _mm512_loadu_ps(scales + j / LCQ_SCALE_WORDS * WORD_PANEL + c);
            const __m512i word = _mm512_loadu_si512(panel + (int64_t)j * WORD_PANEL + c);
            __m512 values[4];
            for (int e = 0; e < 4; e++) {
                const __m512i byte = _mm512_and_si512(_mm512_srli_epi32(word, 8 * e), low_byte);
                values[e] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(byte, bias)), scale);
            }
            for (int p = 0; p < 2; p++) { /* lanes 0-15 the even values, 16-31 the odd, then side by side */
                const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(values[2 * p + 1], values[2 * p]);
                _mm512_storeu_si512(pairs + (int64_t)(2 * j + p) * WORD_PANEL + c,
                                    _mm512_permutexvar_epi16(order, halves));
            }
        }
    memset(pairs + (int64_t)2 * depth * WORD_PANEL, 0, sizeof(uint32_t) * WORD_PANEL * (size_t)(pair_rows - 2 * depth));
}

/* The output columns of task t's panel: WORD_PANEL, or fewer in the last one. */
static inline int task_columns(int outputs, int t) {
    return outputs - t * WORD_PANEL < WORD_PANEL ? outputs - t * WORD_PANEL : WORD_PANEL;
}

/* The int8 panels of the task whose first output column is `first`, of each half: the weight's kept ones, or
 * its rows expanded into `expanded` and made panels there. 0, or 1 where expanding failed. */
static int task_panels(const lcq_expansions *expansions, const void *weight, const uint32_t *kept, int K, int words,
                       int first, int outputs, int halves, uint32_t *expanded, const uint32_t *panels[2]) {
    const int columns = outputs - first < WORD_PANEL ? outputs - first : WORD_PANEL;
    int failed = 0;
    for (int h = 0; h < halves; h++) {
        const int at = first + h * outputs;
        if (kept != NULL) {
            panels[h] = kept + (int64_t)at * words;
            continue;
        }
        uint32_t *panel = expanded + (int64_t)(1 + h) * WORD_PANEL * words;
        failed |= expansions->bytes(weight, K, at, columns, expanded) != 0;
        lcq_word_panels(expanded, columns, words, panel);
        panels[h] = panel;
    }
    return failed;
}

/* The bf16 pairs of a group of paired tasks take at most this many KB (0: a task at a time, all rows through
 * each). A group's pairs stay in L2 while all activation rows run through its tasks a block of rows at a time
 * (32 rows, in L1 up to K = 768), so that y is written a block of rows at a time, each row's columns of the
 * group in one run: a task at a time wrote y in strips of 32 columns, and the tiles waited on those stores.
 * A microbenchmark of one thread's tiles (1024 x 576 by 768 x 576 in bf16, y 1024 x 768 in fp32) ran at
 * 1.1 TFLOP/s a task at a time, 1.7 a block of rows at a time, 2.0 with y not stored. With SwiGLU, silu
 * takes each block's products of the whole group at once: silu after each tile measured 0.9x a task at a time
 * on SmolLM2's gate/up, once a block 1.04-1.05x there and 1.04-1.2x on Llama 3.2 1B's (builds alternating).
 * lcq_set_paired_group_kb changes it. */
static int paired_group_kb = 768;

/* Groups run from this many rows: below it, all rows through one task at a time (its pairs in L1 up to
 * K = 768, the activation rows from L2) were as fast or faster. bench/cpu_amx.py, weights from memory, 2
 * threads, groups against a task at a time: SmolLM2's shapes 0.84-1.0x at 256 rows, 0.95-1.11x at 512,
 * 1.0-1.27x at 1024; Llama 3.2 1B's 0.91-1.0x, 1.05-1.15x, 1.08-1.43x. */
#define PAIRED_GROUP_ROWS 1024

int lcq_set_paired_group_kb(int kb) {
    const int previous = paired_group_kb;
    paired_group_kb = kb;
    return previous;
}

/* The groups of a paired product of `tasks` tasks of `task_words` words of pairs each: the same number for
 * each thread (which takes them in turn under a static schedule), each within paired_group_kb; or a task
 * each (tasks). */
static int paired_groups(int tasks, int64_t task_words) {
    if (paired_group_kb <= 0) return tasks;
    const int threads = omp_get_max_threads();
    const int64_t budget = (int64_t)paired_group_kb << 10;
    const int64_t share = (tasks + threads - 1) / threads * task_words * (int64_t)sizeof(uint32_t);
    const int64_t groups = threads * ((share + budget - 1) / budget);
    return groups < tasks ? (int)groups : tasks;
}

/* lcq_expanded_product in the panel form: activations as rows of the product form (quantize_row for
 * int8, lcq_round_pairs for bf16), weights as panels of WORD_PANEL rows (the weight's kept ones, or,
 * for int8, each task's rows expanded then transposed), a task per panel of each half's rows, all rows
 * through it (paired from PAIRED_GROUP_ROWS rows: groups of tasks, all rows through a group a block of
 * rows at a time); tiles of
 * LCQ_TILE_ROWS activation rows (6 x 2 vectors of 16 weight rows) store whole output vectors, and no
 * activation row is padded (a step of 33 sequences is 33 rows). */
LCQ_BF16 int lcq_panel_product(int form, const float *x, int M, int K, int N, const lcq_expansions *expansions,
                               const void *weight, int swiglu, float *y) {
    const int halves = swiglu ? 2 : 1, outputs = N / halves;
    if (swiglu && N % 2) return -1;
    if (swiglu && outputs % WORD_PANEL) { /* a panel would hold rows of both halves: the product, then SwiGLU */
        float *products = lcq_swiglu_products(1, M, N, y);
        const int status = products == NULL ? -1 : lcq_panel_product(form, x, M, K, N, expansions, weight, 0, products);
        return lcq_swiglu_finish(1, products, M, N, y, status);
    }
    const int bytes = form == LCQ_INT8_PRODUCTS;
    const int depth = bytes ? (K + 3) / 4 : (K + 1) / 2; /* words of values per weight row */
    const int words = bytes ? lcq_byte_row_words(depth) : depth; /* 32-bit words per weight row */
    /* int8 weights on bf16 AMX tiles: activations as bf16 pairs, each task's panels expanded to pairs */
    const int paired = bytes && lcq_amx_on() && M >= byte_pair_rows && !lcq_invariant();
    const int tile_form = paired ? LCQ_BF16_PRODUCTS : form;
    /* activation rows: int8 as the weights', bf16 pairs padded with zeros to whole blocks where paired */
    const int x_depth = paired ? lcq_scale_blocks((K + 1) / 2) * LCQ_SCALE_WORDS : depth;
    const int x_words = paired ? x_depth : words;
    const int tasks = (outputs + WORD_PANEL - 1) / WORD_PANEL, tiled = amx_task_rows(tile_form, M);
    /* the stream's steps per task: per block of each AMX tile's vectors, per LCQ_STREAM_EVERY words of the
     * register tiles' */
    const int tiles = (tiled + LCQ_AMX_ROWS - 1) / LCQ_AMX_ROWS;
    const int64_t steps = halves * ((int64_t)tiles * (WORD_PANEL / 16) * lcq_scale_blocks(x_depth) +
                                    (int64_t)(M - tiled + LCQ_TILE_ROWS - 1) / LCQ_TILE_ROWS * (depth / LCQ_STREAM_EVERY));
    const uint32_t *kept = bytes ? expansions->byte_rows : expansions->pair_panels;
    const int pair_rows = 2 * depth > x_depth ? 2 * depth : x_depth; /* of a panel expanded to pairs */
    const int64_t pair_panel = (int64_t)WORD_PANEL * pair_rows;        /* its words */
    /* tasks taken together: one, or where paired from PAIRED_GROUP_ROWS rows a group of tasks (paired_groups);
     * group g is tasks g * tasks / groups to (g + 1) * tasks / groups */
    const int groups = paired && M >= PAIRED_GROUP_ROWS ? paired_groups(tasks, halves * pair_panel) : tasks;
    const int group = (tasks + groups - 1) / groups, row_block = lcq_amx_tile_rows(LCQ_BF16_PRODUCTS, x_depth);
    const int padded = tiled ? amx_padded_rows(tile_form, x_depth, M) : M; /* rows the AMX tiles read */
    uint32_t *rows = lcq_aligned_words((size_t)padded * x_words);
    int failed = rows == NULL;
    if (!failed) {
        memset(rows + (int64_t)M * x_words, 0, sizeof(uint32_t) * (size_t)(padded - M) * x_words);
#pragma omp parallel reduction(| : failed)
        {
#pragma omp for schedule(static)
            for (int m = 0; m < M; m++) {
                if (tile_form == LCQ_INT8_PRODUCTS)
                    lcq_quantize_row(x + (int64_t)m * K, K, rows + (int64_t)m * x_words);
                else {
                    uint32_t *row = rows + (int64_t)m * x_words;
                    lcq_round_pairs(x + (int64_t)m * K, K, row);
                    for (int k = (K + 1) / 2; k < x_words; k++) row[k] = 0;
                }
            }
            /* without kept panels (int8 only): a task's rows expanded, then each half's panel */
            uint32_t *expanded = kept == NULL ? lcq_aligned_words(WORD_PANEL * (size_t)words * (1 + halves)) : NULL;
            /* where paired: a task's (a group's) panels expanded to pairs */
            uint32_t *pairs = paired ? lcq_aligned_words((size_t)(group * halves * pair_panel)) : NULL;
            /* a group's products of a block of rows where SwiGLU takes them: all its gate columns, then its up */
            float *products = groups < tasks && halves == 2
                                  ? (float *)lcq_aligned_words((size_t)row_block * 2 * group * WORD_PANEL) : NULL;
            const int ready = (kept != NULL || expanded != NULL) && (!paired || pairs != NULL) &&
                              (products != NULL || groups == tasks || halves == 1);
            if (!ready) failed = 1;
            if (tiled) lcq_amx_configure(x_depth);
#pragma omp for schedule(static)
            for (int g = 0; g < groups; g++) {
                const int t0 = (int)((int64_t)g * tasks / groups), t1 = (int)((int64_t)(g + 1) * tasks / groups);
                const uint32_t *panels[2] = {NULL, NULL};
                for (int t = t0; ready && t < t1; t++) {
                    failed |= task_panels(expansions, weight, kept, K, words, t * WORD_PANEL, outputs, halves,
                                          expanded, panels);
                    for (int h = 0; paired && h < halves; h++) {
                        uint32_t *panel = pairs + ((int64_t)(t - t0) * halves + h) * pair_panel;
                        byte_panel_pairs(panels[h], depth, pair_rows, panel);
                        panels[h] = panel;
                    }
                }
                if (!ready || failed) continue;
                lcq_line_stream next = {0}; /* the next task or group, this thread's under the static schedule */
                if (t1 < tasks && (kept != NULL || expansions->stream != NULL))
                    lcq_stream_block(expansions, weight, kept, words, K, t1 * WORD_PANEL,
                                 ((int)((int64_t)(g + 2) * tasks / groups) - t1) * WORD_PANEL, outputs, halves,
                                 steps * (t1 - t0), &next);
                if (groups == tasks) {
                    task_product(tile_form, tiled, rows, M, x_depth, x_words, panels[0], panels[1],
                                 task_columns(outputs, t0), y + t0 * WORD_PANEL, outputs, &next);
                    continue;
                }
                /* a group: all rows through it a block at a time; with SwiGLU, each block's products of the
                 * group's gate and up columns, then silu(gate) * up of its rows */
                const int64_t stride = 2 * group * WORD_PANEL; /* of products' rows */
                const int width = (t1 == tasks ? outputs : t1 * WORD_PANEL) - t0 * WORD_PANEL;
                for (int m0 = 0; m0 < M; m0 += row_block) {
                    const int count = M - m0 < row_block ? M - m0 : row_block;
                    for (int t = t0; t < t1; t++)
                        for (int h = 0; h < halves; h++)
                            lcq_amx_tile(LCQ_BF16_PRODUCTS, count, rows + (int64_t)m0 * x_words, x_words, x_depth,
                                         pairs + ((int64_t)(t - t0) * halves + h) * pair_panel,
                                         task_columns(outputs, t),
                                         halves == 1 ? y + (int64_t)m0 * outputs + t * WORD_PANEL
                                                     : products + (int64_t)(h * group + t - t0) * WORD_PANEL,
                                         halves == 1 ? outputs : stride, &next);
                    for (int r = 0; halves == 2 && r < count; r++)
                        lcq_silu_mul_row16(products + r * stride, products + r * stride + group * WORD_PANEL,
                                           y + (int64_t)(m0 + r) * outputs + t0 * WORD_PANEL, width);
                }
            }
            if (tiled) lcq_amx_release();
            free(expanded);
            free(pairs);
            free(products);
        }
    }
    free(rows);
    return failed ? -1 : 0;
}
