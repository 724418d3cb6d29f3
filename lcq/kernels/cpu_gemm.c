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
 * rows stored [K / 2][32], and one 32-bit broadcast of a weight pair meets each vector. With int8
 * operands, and bf16 ones over weights kept as panels, products take the panel form of cpu_panels.c.
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

/* Sets one of the calling thread's switches (lcq_set_invariant, lcq_set_shuffles), returning its last value, so
 * that a caller can put it back. */
static int exchanged(int *flag, int on) {
    const int previous = *flag;
    *flag = on;
    return previous;
}

static _Thread_local int invariant; /* lcq_set_invariant, per calling thread */

int lcq_set_invariant(int on) {
    return exchanged(&invariant, on);
}

int lcq_invariant(void) {
    return invariant && product_form == LCQ_INT8_PRODUCTS;
}

int lcq_invariant_queries(void) {
    return invariant;
}

int lcq_byte_decode_rows(int kept) {
    if (lcq_invariant()) return 0;
    if (product_form == LCQ_INT8_ROW_PRODUCTS) return INT_MAX;
    if (product_form != LCQ_INT8_PRODUCTS) return 0;
    return kept == LCQ_INT8_PRODUCTS ? KEPT_BYTES_MIN_ROWS - 1 : BYTE_DECODE_ROWS;
}

/* Up to this many rows, LCQ weights with int8 books take the shuffle form (cpu_index_shuffles.c) where
 * lcq_set_shuffles is on, at 4 and 2 bits: against the AVX2 fp32 decode form (bench/cpu_index.py, SmolLM2's
 * shapes at r2 g64 and W4 r4 g64, 2 threads, a Zen 4 with LCQ_CPU_AVX512=0, weights from memory), W4 ran
 * 1.4-2.3x at 1 row, 1.2-2.1x at 2 and 0.9-1.6x at 4; W2 1.1-1.6x at 1 row, 0.76-1.3x at 2, 0.85-1.14x at 4. */
#define SHUFFLE_DECODE_ROWS(BITS) ((BITS) == 4 ? 4 : 1)

static _Thread_local int shuffles; /* lcq_set_shuffles, per calling thread */

int lcq_set_shuffles(int on) {
    return exchanged(&shuffles, on);
}

int lcq_shuffles(void) {
    return shuffles;
}

int lcq_shuffle_decode_rows(int bits) {
    if (!shuffles || bits == 3) return 0;
    return lcq_rows_alone() ? INT_MAX : SHUFFLE_DECODE_ROWS(bits);
}

int lcq_rows_alone(void) {
    return product_form == LCQ_INT8_ROW_PRODUCTS || product_form == LCQ_FP32_ROW_PRODUCTS;
}

int lcq_gemm_min_rows(int kept) {
    if (lcq_invariant()) return 1;
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
void lcq_stream_block(const lcq_expansions *expansions, const void *weight, const uint32_t *panels, int words,
                      int K, int first, int rows, int outputs, int halves, int64_t steps, lcq_line_stream *stream) {
    const int count = outputs - first < rows ? outputs - first : rows;
    for (int h = 0; h < halves; h++) {
        const int at = first + h * outputs;
        if (panels != NULL)
            lcq_stream_add(stream, panels + (int64_t)at * words, sizeof(uint32_t) * LCQ_WORD_PANEL * (int64_t)words);
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

int lcq_expanded_product(const float *x, int M, int K, int N, const lcq_expansions *expansions, const void *weight,
                         int swiglu, float *y) {
    if (product_form == LCQ_INT8_PRODUCTS && expansions->bytes != NULL)
        return lcq_panel_product(LCQ_INT8_PRODUCTS, x, M, K, N, expansions, weight, swiglu, y);
    if (lcq_bf16_products() && expansions->pair_panels != NULL)
        return lcq_panel_product(LCQ_BF16_PRODUCTS, x, M, K, N, expansions, weight, swiglu, y);
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
                    lcq_stream_block(expansions, weight, NULL, words, K, first + block_outputs, block_outputs, outputs,
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
