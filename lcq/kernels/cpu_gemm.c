/* y (M, N) = x (M, K) @ W^T for products too large for the decode kernels (prefill, many sequences):
 * fp32 arithmetic on x86 CPUs with AVX2 and FMA, or bf16 operands with fp32 sums where the CPU has
 * AVX512_BF16 and the calling thread asks for them, for any weight that can be expanded to fp32 a
 * block of rows at a time (fp16 copies in cpu_half.c, LCQ indices in cpu_index.c); or 8-bit operands
 * with int32 sums (AVX512_VNNI) for weights that expand to bytes (LCQ indices).
 *
 * Such products are bounded by arithmetic, so the point is to keep the multiply-add units busy: the
 * activations are copied once per call into panels of rows stored k-major, each block of weight rows
 * is expanded to exact fp32 values into a per-thread buffer (in L2), and a micro-kernel keeps 6 weight
 * rows x 2 vectors of activation rows of outputs in 12 registers, per k loading 2 activation vectors
 * and broadcasting 6 weights. In fp32 a vector is 8 rows: panels of 16, 12 FMAs for 8 loads. (A
 * dot-product tile over fp16 weights, the form before, spent an fp16 conversion per 2 FMAs and
 * reached ~80% of that.) With bf16, vdpbf16ps sums the products of two bf16 pairs into each fp32
 * lane, twice the multiply-adds of an FMA of the same width: activations and each expanded block are
 * rounded to bf16 pairs along K (round to nearest even), a vector is 16 rows of pairs, panels are 32
 * rows stored [K / 2][32], and one 32-bit broadcast of a weight pair meets each vector. With int8,
 * vpdpbusd sums four products of bytes into each 32-bit lane and the roles turn round: activations are
 * quantized per block of 64 values along K (cpu_gemm.h's int8 form) and stay rows, weights are bytes
 * from their own expansion (or kept) stored as panels of 32 rows [K / 4][32] with the blocks' scales
 * after them (lcq_word_panels), a vector is 16 weight rows of 4-byte words, and a tile of 6 activation
 * rows x 2 weight vectors broadcasts 6 activation words per step against 2 weight loads; each block's
 * int32 sums become fp32 times both scales, and each tile stores whole vectors of a row's outputs.
 * (Activations as the panels, the form before, padded each panel to 16 or 32 rows and stored each
 * tile's outputs one at a time, transposed: a product of 33 rows took 1.46x one of 32.) bf16 products
 * of a weight that keeps its rows as panels of pairs (lcq_expansions.pair_panels: the fp16 head) take
 * that panel form too; expanding per call, their transposes cost more than the padding saved.
 */
#include <immintrin.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_constant.h"
#include "cpu_exp.h"
#include "cpu_gemm.h"
#include "cpu_ops.h"

#define PANEL 16       /* fp32: activation rows per panel, two vectors (a last panel of up to 8 rows: one) */
#define PAIR_PANEL 32  /* bf16: activation rows per panel, two vectors of pairs (a last one of up to 16: one) */
#define WORD_PANEL LCQ_WORD_PANEL /* int8, kept bf16: weight rows per panel, two vectors of 32-bit words */
#define TILE_WEIGHTS LCQ_TILE_ROWS /* weight rows per micro-tile */
#define BLOCK_ROWS 48  /* weight rows expanded at a time (110 KiB of fp32 at K = 576) */

/* From this many rows the bf16 product beats the decode forms (a panel of 16 then holds 10-15 rows):
 * fp32 decode products against the bf16 product of 16 rows, 2 threads on a Zen 4, crossed at 9-13
 * rows over SmolLM2's five weight shapes with indices and fp16 copies. LCQ weights' int8 products
 * start here too: over SmolLM2's four LCQ shapes at W4 r2 g64 they were 1.21-1.27x the bf16 product
 * at 10-16 rows, and against the bf16 decode forms 0.61-0.85x at 5-8 rows, 1.10x at 9. */
#define BF16_MIN_ROWS 10

/* With a weight's int8 rows kept (lcq_expansions.byte_rows), its int8 product has no expansion to
 * amortize and reads 1.125 bytes per weight, and it pads no activation row: against the fp32 decode
 * form (tiles of 16 columns, the table held in registers), over SmolLM2's LCQ shapes at W4 r2 g64
 * (weights from memory, 2 threads, Zen 5, two libraries alternating in one process), 1.14-1.48x at 3
 * rows and 1.30-1.69x at 4; at 2, 0.92-1.29x (gate/up slower); the decode forms below. (The product
 * before, whose activation panels padded 3-5 rows to 16, crossed at 5 on a Zen 4.) */
#define KEPT_BYTES_MIN_ROWS 3

/* With a weight's bf16 panels kept (lcq_expansions.pair_panels: the fp16 head), from this many rows
 * its products read them: against the bf16 decode form of fp16 copies, SmolLM2's 49152 x 576 head
 * from memory (Zen 5, 2 threads, alternating) 1.29x at 3 rows, 1.24x at 4, 1.18x at 6, 1.35x at 8;
 * 1-2 rows keep the exact fp32 decode form, which reads as many bytes. */
#define KEPT_PAIRS_MIN_ROWS 3

static _Thread_local int product_form; /* LCQ_*_PRODUCTS per calling thread, like torch.autocast */

int lcq_bf16_products(void) {
    return product_form == LCQ_BF16_PRODUCTS || product_form == LCQ_INT8_PRODUCTS;
}

/* Up to this many rows, LCQ weights with int8 books take the int8 decode form where int8 products are
 * on: against the fp32 decode form (2 threads, Zen 4, two libraries alternating, weights from memory),
 * Llama 3.2 1B's shapes at W2 r2 g128 1.48-2.13x at 1 row, 1.19-1.89x at 2, 1.36-1.96x at 4, W4 r2 g64
 * 1.10-1.51x at 1 row; SmolLM2's 1.1-1.5x at 1 row. With the int8 form kept the blocked product takes
 * over from KEPT_BYTES_MIN_ROWS (at 3-4 rows 1.0-1.5x the decode form); without it, at 5-9 rows, the
 * decode form and the bf16 one ran alike (0.8-1.5x). */
#define BYTE_DECODE_ROWS 4

int lcq_byte_decode_rows(int kept) {
    if (product_form == LCQ_INT8_ROW_PRODUCTS) return INT_MAX;
    if (product_form != LCQ_INT8_PRODUCTS) return 0;
    return kept == LCQ_INT8_PRODUCTS ? KEPT_BYTES_MIN_ROWS - 1 : BYTE_DECODE_ROWS;
}

int lcq_rows_alone(void) {
    return product_form == LCQ_INT8_ROW_PRODUCTS || product_form == LCQ_FP32_ROW_PRODUCTS;
}

int lcq_gemm_min_rows(int kept) {
    if (lcq_rows_alone()) return INT_MAX;
    if (!lcq_bf16_products()) return LCQ_GEMM_MIN_ROWS;
    if (kept == LCQ_INT8_PRODUCTS && product_form == LCQ_INT8_PRODUCTS) return KEPT_BYTES_MIN_ROWS;
    return kept == LCQ_BF16_PRODUCTS ? KEPT_PAIRS_MIN_ROWS : BF16_MIN_ROWS;
}

/* Sets the calling thread's product form (the best the CPU has at or below the one asked for);
 * returns the previous one, so a caller can restore it. */
int lcq_set_products(int form) {
    const int previous = product_form;
    __builtin_cpu_init();
    const int bf16 = __builtin_cpu_supports("avx512bf16"), vnni = bf16 && __builtin_cpu_supports("avx512vnni") &&
                                                          __builtin_cpu_supports("avx512vbmi");
    product_form = form == LCQ_INT8_ROW_PRODUCTS ? (vnni ? LCQ_INT8_ROW_PRODUCTS : LCQ_FP32_ROW_PRODUCTS)
                   : form == LCQ_FP32_ROW_PRODUCTS      ? LCQ_FP32_ROW_PRODUCTS
                   : form >= LCQ_INT8_PRODUCTS && vnni  ? LCQ_INT8_PRODUCTS
                   : form >= LCQ_BF16_PRODUCTS && bf16  ? LCQ_BF16_PRODUCTS
                                                        : LCQ_FP32_PRODUCTS;
    return previous;
}

/* lcq_scratch's buffer: grown as needed, kept for the thread's next call and freed when the thread ends. A
 * batch-1 token of SmolLM2 at W4 runs 120 one-row LCQ products, each quantizing its activations into a buffer of
 * its own: with this one the products ran 1.03x (2 threads, Zen 4, two builds alternating in one process over the
 * model's 120 products, weights from memory, the same outputs), the buffer's lines warm from the call before. */
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static _Thread_local struct {
    void *data;
    size_t size;
} scratch;

static void free_scratch(void *data) { free(data); }
static void make_scratch_key(void) { pthread_key_create(&scratch_key, free_scratch); }

void *lcq_scratch(size_t size) {
    if (size <= scratch.size) return scratch.data;
    pthread_once(&scratch_once, make_scratch_key);
    void *grown = aligned_alloc(64, (size + 63) / 64 * 64);
    if (grown == NULL) return NULL;
    free(scratch.data);
    scratch.data = grown;
    scratch.size = size;
    pthread_setspecific(scratch_key, grown); /* freed at the thread's end */
    return grown;
}

LCQ_BF16 void lcq_round_pairs(const float *src, int K, uint32_t *pairs) {
    uint16_t *dst = (uint16_t *)pairs;
    const int padded = (K + 1) & ~1;
    for (int k = 0; k < padded; k += 16) {
        const int left = K - k < 16 ? K - k : 16, stored = padded - k < 16 ? padded - k : 16;
        const __m512 values = _mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1), src + k);
        _mm256_mask_storeu_epi16(dst + k, (__mmask16)((1u << stored) - 1), (__m256i)_mm512_cvtneps_pbh(values));
    }
}

uint32_t *lcq_round_rows(const float *x, int M, int K) {
    const int K2 = (K + 1) / 2;
    uint32_t *pairs = malloc(sizeof(uint32_t) * (size_t)M * K2);
    if (pairs != NULL)
        for (int m = 0; m < M; m++) lcq_round_pairs(x + (int64_t)m * K, K, pairs + (int64_t)m * K2);
    return pairs;
}

int lcq_even_pass_rows(int M, int most) {
    const int passes = (M + most - 1) / most;
    return (M + passes - 1) / passes;
}

/* Block `block` (`stored` bytes from it, padding included) of lcq_quantize_row's row (below), whose
 * largest |value| has bits `top` at or past LCQ_INF_BITS. A NaN: the scale NaN (bytes and offset 0), so
 * every product with the block, and so the row's outputs, are NaN. +-inf (no NaN): the scale inf, q = +-127
 * for +-inf and 0 for the rest, so the block's products are +-inf where the fp32 product's are (NaN where
 * an inf meets a weight rounded to 0, or where the sums are scaled before they are added, as the int8
 * decode form's lanes are, some of them 0 * inf; infs of both signs may give +-inf where fp32 gives NaN).
 * Scalar: only such blocks come here. */
static void odd_block(const float *src, int K, int block, int stored, int32_t top, int8_t *bytes, float *scale,
                      int32_t *offset) {
    const int k0 = block * 4 * LCQ_SCALE_WORDS, nan = top > LCQ_INF_BITS;
    int32_t sum = 0;
    for (int i = 0; i < stored; i++) {
        const float v = k0 + i < K ? src[k0 + i] : 0.0f;
        const int q = nan || !isinf(v) ? 0 : v > 0.0f ? 127 : -127;
        bytes[k0 + i] = (int8_t)q;
        sum += q;
    }
    *scale = nan ? NAN : INFINITY;
    *offset = -128 * sum;
}

/* K fp32 activations as a row of the int8 form (cpu_gemm.h; the bytes padded with zeros to a whole
 * word): per block, scale = max |v| / 127 and q = round(v / scale), and offset = -128 * the sum of q,
 * which cancels what the weights' +128 adds to their products with these values (vpdpbusd multiplies
 * unsigned by signed bytes: weights are the unsigned side). Up to 16 blocks at a time: their largest
 * values first, one vector division for all their inverses, then each block's 64 bytes packed in
 * registers and stored at once. (Per block, a scalar division and four saturating down-converting
 * stores, vpmovsdb to memory, which Zen 4 runs slowly, had made this 4% of a decode step of 64
 * sequences.) The blocks' largest values and inverses stay in registers: through arrays on the stack,
 * the int8 products of SmolLM2's 576-wide LCQ shapes ran 0.92-0.97x at 64-1024 rows (Zen 5, two
 * libraries alternating; the same bytes). A block's largest |value| is taken on its bits (LCQ_INF_BITS),
 * and a block holding a NaN or +-inf is then rewritten by odd_block (one test per 16 blocks otherwise),
 * so that a row holding a NaN gives NaN, as the fp32 product does: until 2026-12-05 a NaN could drop out
 * of the largest value (MAXPS) and became a byte of -128, and the row's products were finite. */
_Static_assert(LCQ_SCALE_WORDS == 16, "quantize_row packs a block's four vectors into one");
LCQ_INT8 void lcq_quantize_row(const float *src, int K, uint32_t *row) {
    const int words = (K + 3) / 4, blocks = lcq_scale_blocks(words), padded = 4 * words;
    const int values = 4 * LCQ_SCALE_WORDS, vectors = values / 16; /* per block */
    int8_t *bytes = (int8_t *)row;
    float *scales = (float *)(row + words);
    int32_t *offsets = (int32_t *)(row + words + blocks);
    /* 32-bit lane r of the packed bytes holds 4 values of input vector r % 4, group r / 4: back in order */
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (int b0 = 0; b0 < blocks; b0 += 16) {
        const int count = blocks - b0 < 16 ? blocks - b0 : 16;
        __m512i bits = _mm512_setzero_si512(); /* lane b: block b0 + b's largest |value|, its bits */
        for (int b = 0; b < count; b++) {
            __m512i largest = _mm512_setzero_si512();
            for (int i = 0; i < vectors; i++) {
                const int k = (b0 + b) * values + 16 * i, left = K - k <= 0 ? 0 : K - k < 16 ? K - k : 16;
                const __m512 v = _mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1), src + k);
                largest = _mm512_max_epi32(largest, _mm512_castps_si512(_mm512_abs_ps(v)));
            }
            bits = _mm512_mask_mov_epi32(bits, (__mmask16)(1u << b),
                                         _mm512_set1_epi32(_mm512_reduce_max_epi32(largest)));
        }
        /* blocks holding a NaN or +-inf: written as the rest, then by odd_block */
        const __mmask16 odd = _mm512_mask_cmpge_epi32_mask((__mmask16)((1u << count) - 1), bits,
                                                           _mm512_set1_epi32(LCQ_INF_BITS));
        const __m512 limit = _mm512_set1_ps(127.0f), top = _mm512_castsi512_ps(bits);
        const __m512 inverses =
            _mm512_maskz_div_ps(_mm512_cmp_ps_mask(top, _mm512_setzero_ps(), _CMP_GT_OQ), limit, top);
        _mm512_mask_storeu_ps(scales + b0, (__mmask16)((1u << count) - 1), _mm512_div_ps(top, limit));
        for (int b = 0; b < count; b++) {
            const int k0 = (b0 + b) * values, stored = padded - k0 < values ? padded - k0 : values;
            const __m512 inverse = _mm512_permutexvar_ps(_mm512_set1_epi32(b), inverses);
            __m512i q[4], sum = _mm512_setzero_si512();
            for (int i = 0; i < vectors; i++) {
                const int k = k0 + 16 * i, left = K - k <= 0 ? 0 : K - k < 16 ? K - k : 16;
                const __m512 v = _mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1), src + k);
                q[i] = _mm512_cvtps_epi32(_mm512_mul_ps(v, inverse));
                sum = _mm512_add_epi32(sum, q[i]);
            }
            const __m512i packed = _mm512_packs_epi16(_mm512_packs_epi32(q[0], q[1]), _mm512_packs_epi32(q[2], q[3]));
            _mm512_mask_storeu_epi8(bytes + k0, stored == values ? ~0ull : (1ull << stored) - 1,
                                    _mm512_permutexvar_epi32(order, packed));
            offsets[b0 + b] = -128 * _mm512_reduce_add_epi32(sum);
        }
        if (odd) {
            int32_t tops[16];
            _mm512_storeu_si512(tops, bits);
            for (int b = 0; b < count; b++)
                if (odd >> b & 1) {
                    const int k0 = (b0 + b) * values, stored = padded - k0 < values ? padded - k0 : values;
                    odd_block(src, K, b0 + b, stored, tops[b], bytes, scales + b0 + b, offsets + b0 + b);
                }
        }
    }
}

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

/* From this many rows int8 products of LCQ layers run on bf16 AMX tiles where AMX is on (panel_product):
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
    return M >= AMX_PAIR_MIN_ROWS ? M : 0;
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

/* The width of the panel at row m0: `panel` rows, or half for a last one of up to half. */
static inline int panel_width(int M, int m0, int panel) {
    return M - m0 <= panel / 2 ? panel / 2 : panel;
}

/* Rows m0 .. m0 + width - 1 of rows (M rows of K 32-bit words: fp32 values or bf16 pairs; zeros past
 * M) as a [K][width] panel. */
static void pack_panel(const uint32_t *rows, int M, int K, int m0, int width, uint32_t *panel) {
    const int count = M - m0 < width ? M - m0 : width;
    for (int k = 0; k < K; k++) {
        for (int i = 0; i < count; i++) panel[(int64_t)k * width + i] = rows[(int64_t)(m0 + i) * K + k];
        for (int i = count; i < width; i++) panel[(int64_t)k * width + i] = 0;
    }
}

/* y[i, r] = out[r][i] for a tile's R weight rows and `rows` activation rows (row stride N). */
static inline __attribute__((always_inline)) void store_tile(const int R, const float *out, int out_stride,
                                                             int rows, float *y, int N) {
    for (int i = 0; i < rows; i++)
        for (int r = 0; r < R; r++) y[(int64_t)i * N + r] = out[r * out_stride + i];
}

/* PREFIX##tile: y[m, n] for a panel's `rows` valid rows (row stride N), V vectors of LANES rows wide,
 * and R weight rows w (K elements of TYPE each, rows STRIDE(K) apart): R x V accumulators from SUMS
 * (lcq_tile_sums: fp32, 8 rows per vector; lcq_pair_sums: bf16 pairs, 16), each the outputs of one
 * weight row, stepping the stream. Inlined with R and V constants. */
#define MICRO_TILE(ATTR, PREFIX, TYPE, VECTOR, LANES, SUMS, STORE, PANEL_ROWS, STRIDE)                                \
    ATTR static inline __attribute__((always_inline)) void PREFIX##tile(const int R, const int V, const TYPE *panel, \
                                                                        int K, const TYPE *w, int rows, float *y,   \
                                                                        int N, lcq_line_stream *stream) {           \
        VECTOR acc[TILE_WEIGHTS][2];                                                                            \
        SUMS(R, V, w, STRIDE(K), panel, V * LANES, K, acc, stream);                                                \
        float out[TILE_WEIGHTS][PANEL_ROWS];                                                                    \
        for (int r = 0; r < R; r++)                                                                             \
            for (int v = 0; v < V; v++) STORE(out[r] + v * LANES, acc[r][v]);                                   \
        store_tile(R, out[0], PANEL_ROWS, rows, y, N);                                                          \
    }

#define WORDS(K) (K) /* the row stride of fp32 and bf16 forms: their K elements */
MICRO_TILE(, fp32_, float, __m256, 8, lcq_tile_sums, _mm256_storeu_ps, PANEL, WORDS)
MICRO_TILE(LCQ_BF16, pair_, uint32_t, __m512, 16, lcq_pair_sums, _mm512_storeu_ps, PAIR_PANEL, WORDS)

/* PREFIX##block_product: y[:, 0 .. count) (row stride N) for `count` expanded weight rows (K elements
 * of TYPE each) against every panel of PANEL_ROWS rows, each panel's columns in micro-tiles of
 * TILE_WEIGHTS weight rows, then the rest: TILE_AT(R) is the micro-tile of R rows at column n. */
#define BLOCK_PRODUCT(ATTR, PREFIX, TYPE, PANEL_ROWS, TILE_AT, STRIDE)                                            \
    ATTR static inline __attribute__((always_inline)) void PREFIX##panel_product(                             \
        const int V, const TYPE *panel, int K, const TYPE *w, int count, int rows, float *y, int N,            \
        lcq_line_stream *stream) {                                                                              \
        int n = 0;                                                                                              \
        for (; n + TILE_WEIGHTS <= count; n += TILE_WEIGHTS) TILE_AT(TILE_WEIGHTS);                             \
        switch (count - n) { /* fewer than TILE_WEIGHTS rows left */                                          \
            LCQ_CASES_1_TO_5(TILE_AT)                                                                           \
            default: break;                                                                                     \
        }                                                                                                       \
    }                                                                                                           \
    ATTR static void PREFIX##block_product(const TYPE *panels, int M, int K, const TYPE *w, int count, float *y, \
                                           int N, lcq_line_stream *stream) {                                    \
        for (int m0 = 0; m0 < M; m0 += PANEL_ROWS) {                                                            \
            const TYPE *panel = panels + (int64_t)m0 * STRIDE(K);                                                  \
            const int rows = M - m0 < PANEL_ROWS ? M - m0 : PANEL_ROWS;                                         \
            if (panel_width(M, m0, PANEL_ROWS) == PANEL_ROWS)                                                   \
                PREFIX##panel_product(2, panel, K, w, count, rows, y + (int64_t)m0 * N, N, stream);             \
            else                                                                                                \
                PREFIX##panel_product(1, panel, K, w, count, rows, y + (int64_t)m0 * N, N, stream);             \
        }                                                                                                       \
    }

#define FP32_TILE_AT(R) fp32_tile(R, V, panel, K, w + (int64_t)n * K, rows, y + n, N, stream)
#define PAIR_TILE_AT(R) pair_tile(R, V, panel, K, w + (int64_t)n * K, rows, y + n, N, stream)
BLOCK_PRODUCT(, fp32_, float, PANEL, FP32_TILE_AT, WORDS)
BLOCK_PRODUCT(LCQ_BF16, pair_, uint32_t, PAIR_PANEL, PAIR_TILE_AT, WORDS)

/* pair_block_product on AMX tiles (the thread configured them for K words): per panel of activation rows
 * and 16 weight rows, the weight rows are the A tile and the panel ([K][width] pairs) the B tiles, and the
 * 16 x width sums are stored transposed into y. The weight rows are read to a multiple of 16. */
static void amx_block_product(const uint32_t *panels, int M, int K, const uint32_t *w, int count, float *y, int N) {
    for (int m0 = 0; m0 < M; m0 += PAIR_PANEL) {
        const int width = panel_width(M, m0, PAIR_PANEL), rows = M - m0 < width ? M - m0 : width;
        for (int n0 = 0; n0 < count; n0 += LCQ_AMX_ROWS) {
            float out[LCQ_AMX_ROWS][PAIR_PANEL];
            lcq_amx_pair_product(w + (int64_t)n0 * K, K, panels + (int64_t)m0 * K, width, K, LCQ_AMX_ROWS, width / 16,
                                 out[0], PAIR_PANEL, 0);
            store_tile(count - n0 < LCQ_AMX_ROWS ? count - n0 : LCQ_AMX_ROWS, out[0], PAIR_PANEL, rows,
                       y + (int64_t)m0 * N + n0, N);
        }
    }
}

/* Rows of src (K fp32 values each) as rows of `words` bf16 pairs at dst (activations and expanded weights). */
static void convert_rows(const float *src, int K, int count, uint32_t *dst, int words) {
    for (int r = 0; r < count; r++) lcq_round_pairs(src + (int64_t)r * K, K, dst + (int64_t)r * words);
}

/* The stream of the block of `rows` rows from `first` (of each half), paced over a product that steps
 * it `steps` times: what expanding them reads, or their kept int8 panel (`words` words per row) where
 * panels is not NULL. */
static void stream_block(const lcq_expansions *expansions, const void *weight, const uint32_t *panels, int words,
                         int K, int first, int rows, int outputs, int halves, int64_t steps,
                         lcq_line_stream *stream) {
    const int count = outputs - first < rows ? outputs - first : rows;
    for (int h = 0; h < halves; h++) {
        const int at = first + h * outputs;
        if (panels != NULL)
            lcq_stream_add(stream, panels + (int64_t)at * words, sizeof(uint32_t) * WORD_PANEL * (int64_t)words);
        else
            expansions->stream(weight, K, at, count, stream);
    }
    int64_t lines = 0;
    for (int r = 0; r < stream->ranges; r++) lines += stream->lines[r];
    stream->per_step = steps > 0 ? (int)((lines + steps - 1) / steps) : 0;
}

float *lcq_swiglu_products(int swiglu, int M, int N, float *y) {
    return swiglu ? malloc(sizeof(float) * (size_t)M * N) : y;
}

int lcq_swiglu_finish(int swiglu, float *products, int M, int N, float *y, int status) {
    if (!swiglu) return status;
    if (products == NULL) return -1;
    if (status == 0) lcq_gated_mul(products, y, M, N / 2, LCQ_SILU, NULL);
    free(products);
    return status;
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
LCQ_BF16 static int panel_product(int form, const float *x, int M, int K, int N, const lcq_expansions *expansions,
                                  const void *weight, int swiglu, float *y) {
    const int halves = swiglu ? 2 : 1, outputs = N / halves;
    if (swiglu && N % 2) return -1;
    if (swiglu && outputs % WORD_PANEL) { /* a panel would hold rows of both halves: the product, then SwiGLU */
        float *products = lcq_swiglu_products(1, M, N, y);
        const int status = products == NULL ? -1 : panel_product(form, x, M, K, N, expansions, weight, 0, products);
        return lcq_swiglu_finish(1, products, M, N, y, status);
    }
    const int bytes = form == LCQ_INT8_PRODUCTS;
    const int depth = bytes ? (K + 3) / 4 : (K + 1) / 2; /* words of values per weight row */
    const int words = bytes ? lcq_byte_row_words(depth) : depth; /* 32-bit words per weight row */
    /* int8 weights on bf16 AMX tiles: activations as bf16 pairs, each task's panels expanded to pairs */
    const int paired = bytes && lcq_amx_on() && M >= byte_pair_rows;
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
                    stream_block(expansions, weight, kept, words, K, t1 * WORD_PANEL,
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

int lcq_expanded_product(const float *x, int M, int K, int N, const lcq_expansions *expansions, const void *weight,
                         int swiglu, float *y) {
    if (product_form == LCQ_INT8_PRODUCTS && expansions->bytes != NULL)
        return panel_product(LCQ_INT8_PRODUCTS, x, M, K, N, expansions, weight, swiglu, y);
    if (lcq_bf16_products() && expansions->pair_panels != NULL)
        return panel_product(LCQ_BF16_PRODUCTS, x, M, K, N, expansions, weight, swiglu, y);
    const int converted = lcq_bf16_products(); /* bf16 pairs */
    const int amx = converted && lcq_amx_on(); /* the blocks' products on AMX tiles */
    const int width = converted ? PAIR_PANEL : PANEL;
    const int words = converted ? (K + 1) / 2 : K; /* 32-bit words per row */
    /* With swiglu, a block is rows first .. of both halves of W, and y takes silu(gate) * up. */
    const int halves = swiglu ? 2 : 1, outputs = N / halves, block_outputs = BLOCK_ROWS / halves;
    const int panels = (M + width - 1) / width, blocks = (outputs + block_outputs - 1) / block_outputs;
    uint32_t *converted_x = converted ? malloc(sizeof(uint32_t) * (size_t)M * words) : NULL;
    uint32_t *packed = lcq_aligned_words((size_t)panels * width * words);
    int failed = packed == NULL || (converted && converted_x == NULL) || (swiglu && N % 2);
    if (!failed) {
#pragma omp parallel reduction(| : failed)
        {
            if (converted) {
#pragma omp for schedule(static)
                for (int m = 0; m < M; m++) convert_rows(x + (int64_t)m * K, K, 1, converted_x + (int64_t)m * words, words);
            }
#pragma omp for schedule(static)
            for (int p = 0; p < panels; p++)
                pack_panel(converted ? converted_x : (const uint32_t *)x, M, words, p * width,
                           panel_width(M, p * width, width), packed + (int64_t)p * width * words);
            const int pairs = converted && expansions->pairs != NULL; /* weights expand to bf16 pairs */
            float *block = pairs ? NULL : malloc(sizeof(float) * BLOCK_ROWS * (size_t)K);
            /* with AMX, whole tiles of 16 rows from each half's first are read: zeros past the block's */
            uint32_t *rows = converted ? lcq_aligned_zeros((size_t)(BLOCK_ROWS + LCQ_AMX_ROWS) * words) : NULL;
            float *products = swiglu ? malloc(sizeof(float) * BLOCK_ROWS * (size_t)M) : NULL; /* gate, up */
            const int ready = (pairs || block != NULL) && (!converted || rows != NULL) && (!swiglu || products != NULL);
            if (!ready) failed = 1;
            if (amx) lcq_amx_configure(words);
#pragma omp for schedule(static)
            for (int b = 0; b < blocks; b++) {
                if (!ready) continue;
                const int first = b * block_outputs;
                const int count = outputs - first < block_outputs ? outputs - first : block_outputs;
                const void *source[2]; /* each half's rows in the product's form */
                for (int h = 0; h < halves; h++) { /* rows first + h * outputs .. at row h * count of the block */
                    const int at = first + h * outputs, row = h * count;
                    if (pairs)
                        expansions->pairs(weight, K, at, count, rows + (int64_t)row * words);
                    else {
                        expansions->fp32(weight, K, at, count, block + (int64_t)row * K);
                        if (converted)
                            convert_rows(block + (int64_t)row * K, K, count, rows + (int64_t)row * words, words);
                    }
                    source[h] = converted ? (const void *)(rows + (int64_t)row * words) : block + (int64_t)row * K;
                }
                float *out = swiglu ? products : y + first;
                const int out_stride = swiglu ? halves * count : N;
                lcq_line_stream next = {0}; /* the next block, this thread's under the static schedule */
                if (b + 1 < blocks && expansions->stream != NULL && !amx) /* AMX tiles step no stream */
                    stream_block(expansions, weight, NULL, words, K, first + block_outputs, block_outputs, outputs,
                                 halves,
                                 (int64_t)panels * halves * ((count + TILE_WEIGHTS - 1) / TILE_WEIGHTS) *
                                     (words / LCQ_STREAM_EVERY),
                                 &next);
                for (int h = 0; h < halves; h++) { /* the halves' outputs side by side in out */
                    if (amx)
                        amx_block_product(packed, M, words, source[h], count, out + h * count, out_stride);
                    else if (converted)
                        pair_block_product(packed, M, words, source[h], count, out + h * count, out_stride, &next);
                    else
                        fp32_block_product((const float *)packed, M, K, source[h], count, out + h * count, out_stride,
                                           &next);
                }
                for (int m = 0; swiglu && m < M; m++)
                    lcq_silu_mul_row(products + (int64_t)m * out_stride, products + (int64_t)m * out_stride + count,
                                     y + (int64_t)m * outputs + first, count);
            }
            if (amx) lcq_amx_release();
            free(block);
            free(rows);
            free(products);
        }
    }
    free(converted_x);
    free(packed);
    return failed ? -1 : 0;
}
