/* Large CPU products (cpu_gemm.c, cpu_panels.c), shared by the fp16 (cpu_half.c) and index (cpu_index.c) kernels. */
#ifndef LCQ_CPU_GEMM_H
#define LCQ_CPU_GEMM_H

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* From this many rows a product is bounded by arithmetic and takes lcq_expanded_product; below it the
 * decode kernels, which stream each weight once, are faster (3072 x 576 at 12 rows: 0.26 against
 * 0.33 ms for fp16 weights on a 2-core Zen 4). */
#define LCQ_GEMM_MIN_ROWS 16

/* The rows from which a product of the calling thread is lcq_expanded_product's: LCQ_GEMM_MIN_ROWS,
 * or fewer with bf16 products on, and fewer still where the weight keeps its rows as panels of the
 * thread's product form (kept: LCQ_INT8_PRODUCTS for lcq_expansions.byte_rows, LCQ_BF16_PRODUCTS for
 * pair_panels, else LCQ_FP32_PRODUCTS). */
int lcq_gemm_min_rows(int kept);

/* Whether the calling thread's products must give each row what it alone gives (the row forms). */
int lcq_rows_alone(void);

/* With int8 products on, the calling thread's products take the blocked forms at every row count (1 too):
 * the int8 product of LCQ layers (register and AMX int8 tiles alike: integer sums per block, then the same
 * fp32 steps in the same order, whatever rows share a call) and the bf16 panels' (all on AMX tiles where AMX
 * is on), never the decode forms or bf16 tiles for int8 weights, whose choice follows the rows: each row's
 * values are then what it alone gives, as with the row forms, at the blocked forms' speed (a batch-invariant
 * engine, cpu_matmul.cpu_products). lcq_set_invariant returns the setting before; lcq_invariant: in force. */
int lcq_set_invariant(int on);
int lcq_invariant(void);

/* Whether lcq_set_invariant is on, whatever the product form: a decode step's queries then take prefill
 * attention's tiles (tile_every_query), as the engine's layer-by-layer steps do, not the decode kernel. */
int lcq_invariant_queries(void);

/* A buffer of `words` 32-bit words on a cache line's boundary (freed with free), or NULL: for AMX tiles'
 * operands, whose rows of 64 bytes are then one line each, not two (malloc's large buffers begin 16 bytes
 * past a page: SmolLM2's 1728 x 576 at 512 rows on bf16 tiles ran at 0.81 TFLOP/s, aligned 1.74). */
static inline uint32_t *lcq_aligned_words(size_t words) {
    return aligned_alloc(64, (4 * words + 63) & ~(size_t)63);
}

/* lcq_aligned_words, zeros. */
static inline void *lcq_aligned_zeros(size_t words) {
    uint32_t *buffer = lcq_aligned_words(words);
    if (buffer != NULL) memset(buffer, 0, 4 * words);
    return buffer;
}

/* Writes weight rows first .. first + count - 1 of `weight` (K columns) as fp32 into out (count, K). */
typedef void (*lcq_expand_rows)(const void *weight, int K, int first, int count, float *out);

/* The int8 form of a row of K values: ceil(K / 4) words of 4 bytes (signed for activations; weights
 * unsigned, q + 128), then per block of 4 * LCQ_SCALE_WORDS values along K its fp32 scale (a value
 * is q * scale), then per block an int32 offset (activations: -128 * the sum of q). Blocks of 64:
 * with every weight in int8 (the head too), the demo model's perplexity rose 0.13% on 4,088 tokens,
 * against 0.96% with blocks of 128, where one outlier sets the scale of more values
 * (bench/cpu_precision_quality.py). */
#define LCQ_SCALE_WORDS 16

static inline int lcq_scale_blocks(int words) {
    return (words + LCQ_SCALE_WORDS - 1) / LCQ_SCALE_WORDS;
}

static inline int lcq_byte_row_words(int words) {
    return words + 2 * lcq_scale_blocks(words);
}

/* Writes weight rows first .. first + count - 1 into out (count rows of ceil(K / 2) bf16 pairs, as
 * lcq_round_pairs rounds them): for weights that round straight from their storage (fp16 copies). */
typedef void (*lcq_expand_pair_rows)(const void *weight, int K, int first, int count, uint32_t *out);

/* Writes weight rows first .. first + count - 1 into out (count rows of the unsigned int8 form of K
 * values); returns 0, or -1 when a buffer cannot be allocated. Only weights that have one take int8
 * products: LCQ indices, whose codebooks quantize once per group. Full-precision weights keep bf16:
 * on the demo model int8 products cost +0.33% perplexity with its head in int8, -0.015% with the
 * head in bf16. */
typedef int (*lcq_expand_byte_rows)(const void *weight, int K, int first, int count, uint32_t *out);

/* Memory a thread asks for while it multiplies: the blocked product's next block of weights, whose
 * expansion otherwise read it from memory while the multiply-add units waited (the fp16 head's
 * expansion was a fifth of its product at 64 rows). Ranges of cache lines, asked for into L2
 * `per_step` lines per lcq_stream_step, which the product's inner loops take every LCQ_STREAM_EVERY
 * steps along K: spread over the product, as a burst of a block's lines fills the core's miss buffers
 * and stalls the thread until memory answers, so that compute and memory take turns
 * (cpu_decode_attention.c). Two builds alternating in one process, weights from memory, 2 threads on a Zen 4:
 * the 49152 x 576 fp16 head 1.36x at 12 rows, 1.26x at 16, 1.23x at 32, 1.07x at 64; SmolLM2's W4 r2
 * LCQ shapes 1.16x (gate/up) and 0.97-1.09x at 12-64 rows; all alike at 512 (their expansion is
 * bounded by arithmetic, not by its 0.7 bytes per weight). Finishing the stream by the product's
 * middle, or stepping every 2 or 8, did not gain. */
#define LCQ_STREAM_RANGES 12 /* 5 arrays of an LCQ layer's rows, for both halves of a gate/up block */
#define LCQ_STREAM_EVERY 4
typedef struct {
    const char *start[LCQ_STREAM_RANGES];
    int64_t lines[LCQ_STREAM_RANGES], line;
    int ranges, range, per_step;
} lcq_line_stream;

/* Adds the lines of `bytes` from `start` to the stream. */
static inline void lcq_stream_add(lcq_line_stream *stream, const void *start, int64_t bytes) {
    if (bytes <= 0 || stream->ranges == LCQ_STREAM_RANGES) return;
    const uintptr_t at = (uintptr_t)start;
    stream->start[stream->ranges] = (const char *)(at & ~(uintptr_t)63);
    stream->lines[stream->ranges++] = ((int64_t)(at & 63) + bytes + 63) / 64;
}

/* Asks for the stream's next per_step lines (nothing for NULL: the products that stream nothing). */
static inline __attribute__((always_inline)) void lcq_stream_step(lcq_line_stream *stream) {
    if (stream == NULL) return;
    for (int i = 0; i < stream->per_step && stream->range < stream->ranges; i++) {
        _mm_prefetch(stream->start[stream->range] + 64 * stream->line, _MM_HINT_T1);
        if (++stream->line == stream->lines[stream->range]) {
            stream->line = 0;
            stream->range++;
        }
    }
}

/* Asks for the lines of the `bytes` from `start` into L2 at once: a few rows' worth, where a decode product
 * asks for the rows it reads some rows later (cpu_index.h, cpu_half.c). */
static inline __attribute__((always_inline)) void lcq_ask_lines(const void *start, int64_t bytes) {
    for (uintptr_t line = (uintptr_t)start & ~(uintptr_t)63; line < (uintptr_t)start + bytes; line += 64)
        _mm_prefetch((const char *)line, _MM_HINT_T1);
}

/* Adds the memory that expanding rows first .. first + count - 1 reads to the stream. */
typedef void (*lcq_stream_rows)(const void *weight, int K, int first, int count, lcq_line_stream *stream);

#define LCQ_WORD_PANEL 32 /* weight rows per panel of words (lcq_word_panels) */

/* `count` rows in the unsigned int8 form (`words` words each, row after row) as panels of 32 rows,
 * ceil(count / 32) of them, each [words][32] (word k of its rows side by side; rows past count zero):
 * the form in which int8 products read weights (cpu_panels.c). */
void lcq_word_panels(const uint32_t *rows, int count, int words, uint32_t *panels);

/* How a weight expands a block of its rows: to fp32 (every weight), and where it has them (else
 * NULL) straight to bf16 pairs or to the int8 form; what a block of its rows reads; and, where the
 * weight keeps them (else NULL), all its rows already in the int8 form as panels (lcq_word_panels of
 * its N rows of lcq_byte_row_words((K + 3) / 4) words), which int8 products then read in place of
 * expanding. */
typedef struct {
    lcq_expand_rows fp32;
    lcq_expand_pair_rows pairs;
    lcq_expand_byte_rows bytes;
    lcq_stream_rows stream;
    const uint32_t *byte_rows;
    const uint32_t *pair_panels;
} lcq_expansions;

/* y (M, N) = x (M, K) @ W^T, W given by its expansions; x and y fp32 contiguous, M >= 1. Operands
 * rounded to bf16 (sums fp32) or 8 bits (sums int32, where W expands to bytes) where the calling
 * thread asks (lcq_set_products). With swiglu, W is [gate; up] (N even) and y (M, N / 2) takes
 * silu(x @ gate^T) * (x @ up^T), each block of both halves' outputs finished while it is in cache (the
 * same values as the product then lcq_gated_mul). Returns 0, or -1 when a buffer cannot be allocated. */
int lcq_expanded_product(const float *x, int M, int K, int N, const lcq_expansions *expansions, const void *weight,
                         int swiglu, float *y);

/* lcq_expanded_product in the panel form (cpu_panels.c), in the product form `form` (LCQ_INT8_PRODUCTS for W
 * that expands to bytes, LCQ_BF16_PRODUCTS for W with kept panels of pairs). */
int lcq_panel_product(int form, const float *x, int M, int K, int N, const lcq_expansions *expansions,
                      const void *weight, int swiglu, float *y);

/* Into `stream`, what the product's next block of `rows` weight rows from `first` (of each of `halves` halves of
 * `outputs` rows) reads, paced over a product that steps it `steps` times: what expanding them reads, or their
 * kept int8 panel (`words` words per row) where panels is not NULL (cpu_gemm.c). */
void lcq_stream_block(const lcq_expansions *expansions, const void *weight, const uint32_t *panels, int words, int K,
                      int first, int rows, int outputs, int halves, int64_t steps, lcq_line_stream *stream);

/* The decode forms write whole products: with swiglu into a buffer from lcq_swiglu_products (M, N),
 * which lcq_swiglu_finish turns into y (M, N / 2) = silu(gate) * up and frees (else both pass y
 * through); finish returns the product's status, or -1 when the buffer could not be allocated. */
float *lcq_swiglu_products(int swiglu, int M, int N, float *y);
int lcq_swiglu_finish(int swiglu, float *products, int M, int N, float *y, int status);

/* acc[r][v] = sum over k < K of a[r][k] * b[k][8v .. 8v + 8): the register tile of the C kernels'
 * products (cpu_gemm.c, cpu_prefill_attention.c), R <= 6 rows of a (row stride lda, values broadcast) against
 * V <= 2 vectors of b (row stride ldb). Per k: V loads and R broadcasts feed R x V FMAs (12 FMAs for
 * 8 loads at 6 x 2, all in 15 of the 16 AVX2 registers). Inlined with R and V constants, so acc
 * stays in registers. The stream (or NULL) takes a step every LCQ_STREAM_EVERY k. */
static inline __attribute__((always_inline)) void lcq_tile_sums(const int R, const int V, const float *a, int64_t lda,
                                                                const float *b, int64_t ldb, int K, __m256 acc[][2],
                                                                lcq_line_stream *stream) {
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) acc[r][v] = _mm256_setzero_ps();
    for (int k = 0; k < K; k++) {
        __m256 columns[2];
        for (int v = 0; v < V; v++) columns[v] = _mm256_loadu_ps(b + k * ldb + v * 8);
        for (int r = 0; r < R; r++) {
            const __m256 value = _mm256_broadcast_ss(a + r * lda + k);
            for (int v = 0; v < V; v++) acc[r][v] = _mm256_fmadd_ps(value, columns[v], acc[r][v]);
        }
        if (k % LCQ_STREAM_EVERY == LCQ_STREAM_EVERY - 1) lcq_stream_step(stream);
    }
}

#define LCQ_TILE_ROWS 6 /* the most rows of a in one lcq_tile_sums or lcq_pair_sums */

/* Functions with bf16 instructions (AVX512_BF16), called only where the CPU has them. */
#define LCQ_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

/* Functions with 8-bit dot products (AVX512_VNNI) and byte permutes (AVX512_VBMI, for the LCQ
 * expansion), called only where the CPU has both. */
#define LCQ_INT8 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))

/* dst[c][16 * i] = src[i][c] for 16 rows of 16 words (rows at src, src_stride apart, `rows` of them
 * there, zeros after; `columns` words of each, the rest not stored; dst rows dst_stride apart): four
 * rounds of unpacks and 128-bit shuffles. */
LCQ_BF16 static inline void lcq_transpose_words(const uint32_t *src, int64_t src_stride, int rows, int columns,
                                                uint32_t *dst, int64_t dst_stride) {
    const __mmask16 present = (__mmask16)((1u << columns) - 1);
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++)
        r[i] = i < rows ? _mm512_maskz_loadu_epi32(present, src + i * src_stride) : _mm512_setzero_si512();
    for (int i = 0; i < 16; i += 2) { /* t[i]: per 128-bit lane L, words 4L, 4L + 1 of rows i, i + 1 */
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int g = 0; g < 16; g += 4) { /* r[g + e]: per lane L, word 4L + e of rows g .. g + 3 */
        r[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
        r[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
        r[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
        r[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
    }
    for (int e = 0; e < 4; e++) { /* rows 0-7, then 8-15: words e, 8 + e (t[e]) and 4 + e, 12 + e (t[4 + e]) */
        t[e] = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x88);
        t[4 + e] = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xdd);
        t[8 + e] = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x88);
        t[12 + e] = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xdd);
    }
    for (int e = 0; e < 4; e++) { /* word c of every row */
        r[e] = _mm512_shuffle_i32x4(t[e], t[8 + e], 0x88);
        r[8 + e] = _mm512_shuffle_i32x4(t[e], t[8 + e], 0xdd);
        r[4 + e] = _mm512_shuffle_i32x4(t[4 + e], t[12 + e], 0x88);
        r[12 + e] = _mm512_shuffle_i32x4(t[4 + e], t[12 + e], 0xdd);
    }
    for (int c = 0; c < columns; c++) _mm512_storeu_si512(dst + c * dst_stride, r[c]);
}

/* The forms of the calling thread's products (lcq_set_products in cpu_gemm.c): fp32; bf16 operands
 * with fp32 sums; 8-bit operands with 32-bit sums in the blocked product of weights that expand to
 * bytes (lcq_expand_byte_rows) and in the decode products of LCQ weights with int8 books (up to
 * lcq_byte_decode_rows), bf16 elsewhere; and the int8 decode form of LCQ weights with books at every
 * row count (each row's values what that row alone would give), fp32 elsewhere: the form of a step that
 * verifies drafts for sequences whose plain decode steps (too few rows for rounded products but
 * the int8 decode form) it must reproduce. In both row forms the fp32 products take their decode form at
 * every row count too (LCQ_FP32_ROW_PRODUCTS: fp32 only), whose rows are summed alone, where the blocked
 * product from LCQ_GEMM_MIN_ROWS rows sums them otherwise. */
enum { LCQ_FP32_PRODUCTS, LCQ_BF16_PRODUCTS, LCQ_INT8_PRODUCTS, LCQ_INT8_ROW_PRODUCTS, LCQ_FP32_ROW_PRODUCTS };

/* Whether the calling thread's products take bf16 (or, in the blocked product, 8-bit) operands. */
int lcq_bf16_products(void);

/* The most rows whose products take the int8 decode form (an LCQ weight with int8 books, an fp16 one
 * with int8 rows: cpu_half.c), in the calling thread's product form, for a weight whose int8 rows are
 * kept (kept: LCQ_INT8_PRODUCTS) or not; 0 where they do not. */
int lcq_byte_decode_rows(int kept);

/* Sets whether the calling thread's decode products of LCQ weights with int8 books at 2 and 4 bits take the
 * AVX2 int8 form (cpu_index_shuffles.c: int8 products on a CPU without the AVX-512 ones, whose other products
 * stay fp32); returns the previous setting. */
int lcq_set_shuffles(int on);

/* Whether lcq_set_shuffles is on in the calling thread (the AVX2 int8 decode forms, cpu_half.c's too). */
int lcq_shuffles(void);

/* The most rows whose products of a weight of `bits` take that form in the calling thread (every row count where
 * each row's values must be what it alone gives, lcq_rows_alone), 0 where it is off (and at 3 bits). */
int lcq_shuffle_decode_rows(int bits);

/* K fp32 activations as a row of the int8 form (lcq_byte_row_words((K + 3) / 4) words; cpu_gemm.c). A
 * block holding a NaN gets a NaN scale, one holding +-inf an inf scale, so that its products are not finite. */
void lcq_quantize_row(const float *src, int K, uint32_t *row);

/* +inf's bits: where activations are quantized, each block's (or row's) largest |value| is taken on the
 * bits as int32, the order of fp32's for the rest but with NaN past inf, so that a NaN cannot drop out of
 * it as it does from MAXPS; from these bits on a block holds a NaN or +-inf. */
#define LCQ_INF_BITS 0x7F800000

/* At least `size` bytes (64-byte aligned) of the calling thread's own buffer, valid until its next call, or NULL
 * where it cannot grow: for the activations of decode products of a few rows, which a batch-1 token runs ~120
 * of, where allocating and freeing them each call had cost ~3% of the one-row products (cpu_gemm.c). */
void *lcq_scratch(size_t size);

/* K fp32 values as ceil(K / 2) bf16 pairs (round to nearest even), the last one padded with zero. */
void lcq_round_pairs(const float *src, int K, uint32_t *pairs);

/* The M rows of x (M, K) as rows of ceil(K / 2) pairs in a new buffer (the caller frees it; NULL when
 * it cannot be allocated), and the rows per pass that split M into even passes of at most `most`:
 * the set-up of the bf16 decode forms (cpu_half.c, cpu_index.c). */
uint32_t *lcq_round_rows(const float *x, int M, int K);
int lcq_even_pass_rows(int M, int most);

/* The bf16 form of lcq_tile_sums: acc[r][v] = sum over k < K of pair a[r][k] . pairs b[k][16v ..
 * 16v + 16), a and b bf16 pairs (row strides in pairs): per k, V loads and R 32-bit broadcasts feed
 * R x V vdpbf16ps, each two multiply-adds per fp32 lane. */
LCQ_BF16 static inline __attribute__((always_inline)) void lcq_pair_sums(const int R, const int V, const uint32_t *a,
                                                                         int64_t lda, const uint32_t *b, int64_t ldb,
                                                                         int K, __m512 acc[][2],
                                                                         lcq_line_stream *stream) {
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) acc[r][v] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        __m512bh columns[2];
        for (int v = 0; v < V; v++) columns[v] = (__m512bh)_mm512_loadu_si512(b + k * ldb + v * 16);
        for (int r = 0; r < R; r++) {
            const __m512bh pair = (__m512bh)_mm512_set1_epi32((int)a[r * lda + k]);
            for (int v = 0; v < V; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], pair, columns[v]);
        }
        if (k % LCQ_STREAM_EVERY == LCQ_STREAM_EVERY - 1) lcq_stream_step(stream);
    }
}

/* sums + the four products of unsigned bytes u and signed bytes s in each 32-bit lane, in place: with
 * the intrinsic, GCC 12 copied every accumulator to another register and back around each vpdpbusd
 * (24 moves per 12 multiply-adds in cpu_panels.c's byte_sums): without them the int8 product of SmolLM2
 * gate/up and down shapes ran 1.07-1.21x faster at 16-256 rows (two libraries alternating). Inline asm
 * needs no AVX512_VNNI target, so the products that take it share LCQ_BF16 for int8 and bf16 (int8
 * products run only where the CPU also has AVX512_BF16, lcq_set_products). */
LCQ_BF16 static inline __attribute__((always_inline)) __m512i add_byte_products(__m512i sums, __m512i u, __m512i s) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(sums) : "v"(u), "v"(s));
    return sums;
}

/* The panel products' tiles of LCQ_AMX_ROWS activation rows on AMX (cpu_amx.c), where the CPU and the
 * OS allow it and lcq_use_amx asked for it (process-wide; returns whether it is on, as lcq_amx_on). A
 * thread that runs lcq_amx_tile first loads the tile configuration for rows `depth` words deep
 * (lcq_amx_configure) and releases it after (lcq_amx_release). lcq_amx_tile: y[r][0 .. columns) (row
 * stride ldy) for r < rows of LCQ_AMX_ROWS activation rows x in the product form `form` (`words` words
 * apart, `depth` words of values each) and a weight panel of the same form (lcq_word_panels). int8
 * (LCQ_INT8_PRODUCTS): 16 rows read and `rows` stored, the values of the vpdpbusd tiles bit for bit. bf16:
 * up to lcq_amx_tile_rows rows, of which whole tiles of 16 are read and `rows` stored. The stream steps once
 * per block of LCQ_SCALE_WORDS words, vector of 16 weight rows and tile of 16 rows. */
#define LCQ_AMX_ROWS 16
int lcq_use_amx(int wanted);
int lcq_amx_on(void);
void lcq_amx_configure(int depth);
void lcq_amx_release(void);
void lcq_amx_tile(int form, int rows, const uint32_t *x, int words, int depth, const uint32_t *panel, int columns,
                  float *y, int64_t ldy, lcq_line_stream *stream);

/* The most rows one lcq_amx_tile takes in this form and depth: 32 in bf16 rows of whole blocks of
 * LCQ_SCALE_WORDS words (two tiles of rows; x must have 32 readable rows), else LCQ_AMX_ROWS. */
int lcq_amx_tile_rows(int form, int depth);

/* From `rows` rows (process-wide; returns the number before), int8 products of weights in the int8 form
 * run on bf16 AMX tiles where AMX is on: activations rounded to bf16 pairs, and each task's int8 weight
 * panels expanded to bf16 pairs (their values q * scale rounded to bf16), sums fp32 over all of K. */
int lcq_set_byte_pair_rows(int rows);

/* Paired products of 1,024 rows or more run all rows through groups of tasks whose bf16 pairs take up to `kb`
 * KB a block of rows at a time, or (0) all rows through each task in turn (process-wide; returns the setting
 * before): the same products, in another order. */
int lcq_set_paired_group_kb(int kb);

/* c (rows, 16 * vectors) = or (accumulate) += a (rows, K words of bf16 pairs, lda words apart) @ b (K rows
 * of pairs along K, ldb words apart), on AMX tiles configured for K (lcq_amx_configure(K)): the bf16
 * blocked product of weights expanded per call (cpu_gemm.c) and prefill attention's (cpu_prefill_attention.c). Whole tiles of LCQ_AMX_ROWS rows are read and written:
 * a's and c's rows past `rows` up to a multiple of them must be there (their values are not used). */
void lcq_amx_pair_product(const uint32_t *a, int64_t lda, const uint32_t *b, int64_t ldb, int K, int rows,
                          int vectors, float *c, int64_t ldc, int accumulate);

#endif
