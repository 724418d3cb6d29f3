/* CPU products on AMX tiles (Intel Xeon from Sapphire Rapids: AMX-TILE, AMX-INT8, AMX-BF16). A tile holds up
 * to 16 rows of 64 bytes; tdpbsud adds 16 x 16 x 64 products of signed by unsigned bytes into int32 sums,
 * tdpbf16ps 16 x 16 x 32 products of bf16 pairs into fp32 sums, each in about 16 cycles, where vpdpbusd
 * does 64 multiply-adds an instruction. The operands are read where the products already keep them:
 *
 * - int8 panel products (cpu_panels.c), tiles of 16 activation rows (a last one padded with zero rows):
 *   activation rows in the int8 form are the A tile (a block's 64 signed bytes per row, the row stride
 *   apart), and a weight panel's words [K / 4][32] are already the B tile's layout (a row per word along
 *   K, 16 weight rows' 4 unsigned bytes side by side). One tdpbsud is one scale block of the int8 form
 *   (cpu_gemm.h), so each block's int32 sums come out whole; they go through memory to AVX-512 registers,
 *   where, as in byte_sums, they take the activation row's offset (which cancels the weights' + 128) and
 *   become fp32 times both scales: the same integers and fp32 operations in the same order, so the vpdpbusd
 *   tiles' values bit for bit. What bounds it is moving operands and sums through memory and that scaling,
 *   not the tdpbsud (RUN_BLOCKS).
 * - bf16 panel products (the head's kept panels [K / 2][32] pairs, and int8 weight panels expanded to
 *   them for products of many rows): fp32 sums stay in the tile over all of K, stored once; rows padded
 *   with zero rows to whole tiles, two tiles of rows at a time where K is whole blocks (pair_quads).
 * - bf16 products of rows of pairs by [K][16 * vectors] pairs (lcq_amx_pair_product): the blocked product
 *   of weights expanded per call (weight rows the A tile, activation panels the B tiles) and prefill
 *   attention's scores and weighted values.
 *
 * Linux hands out tile state only to processes that ask (arch_prctl ARCH_REQ_XCOMP_PERM); each thread loads
 * a tile configuration before its tiles run and releases it after. Compiled with GCC 11 or clang 12 on;
 * with an older compiler this file builds the switch alone and AMX stays off. */
#include <stdint.h>
#include <string.h>

#include "cpu_gemm.h"

#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define LCQ_HAVE_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

static int amx_on; /* lcq_use_amx */

#ifdef LCQ_HAVE_AMX

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Whether the CPU has AMX-TILE, AMX-INT8 and AMX-BF16 and Linux lets this process use tile data (asked once). */
static int amx_here(void) {
    static int answer = -1;
    if (answer < 0) {
        unsigned a, b, c, d;
        const int cpu = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1) && (d >> 24 & 1) && (d >> 25 & 1);
        answer = cpu && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }
    return answer;
}

#else

static int amx_here(void) { return 0; }

#endif

int lcq_use_amx(int wanted) {
    amx_on = wanted && amx_here();
    return amx_on;
}

int lcq_amx_on(void) { return amx_on; }

#ifdef LCQ_HAVE_AMX

#define LCQ_AMX __attribute__((target("avx512f,avx512bw,avx512vl,amx-tile,amx-int8,amx-bf16")))

/* The tiles, one configuration for every form: two of sums (int8: even and odd blocks, alternating;
 * bf16: two vectors of 16 columns), the activation rows of a whole block and of a last
 * block shorter than LCQ_SCALE_WORDS words (K not a multiple of 64 bytes or 32 pairs), and two of weight
 * words of each. Macros, not an enum: the tile intrinsics paste the number into their assembly. */
#define SUMS_0 0
#define SUMS_1 1
#define X_WHOLE 2
#define X_SHORT 3
#define W_WHOLE_0 4
#define W_WHOLE_1 5
#define W_SHORT_0 6
#define W_SHORT_1 7

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

LCQ_AMX void lcq_amx_configure(int depth) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) { /* sums: 16 x 16 32-bit; operands: 16 rows of a block's 16 words */
        config.rows[t] = LCQ_AMX_ROWS;
        config.bytes_per_row[t] = 4 * LCQ_SCALE_WORDS;
    }
    const int short_words = depth % LCQ_SCALE_WORDS; /* else the short tiles are whole ones, unused */
    if (short_words) {
        config.bytes_per_row[X_SHORT] = 4 * short_words;
        config.rows[W_SHORT_0] = config.rows[W_SHORT_1] = short_words;
    }
    /* GCC's intrinsic does not tell the compiler it reads the configuration, whose stores it then dropped */
    __asm__ volatile("" : : "r"(&config) : "memory");
    _tile_loadconfig(&config);
}

LCQ_AMX void lcq_amx_release(void) { _tile_release(); }

/* sums (16 x 16 int32) = the block's products of activation rows x (signed bytes, `stride` bytes apart)
 * and weight words w (a panel's rows of words, unsigned bytes), through tile SUMS. */
#define BLOCK_SUMS(SUMS, X, W, x, stride, w, sums)                                                              \
    do {                                                                                                        \
        _tile_zero(SUMS);                                                                                       \
        _tile_loadd(X, x, stride);                                                                              \
        _tile_loadd(W, w, 4 * LCQ_WORD_PANEL);                                                                  \
        _tile_dpbsud(SUMS, X, W);                                                                               \
        _tile_stored(SUMS, sums, 4 * LCQ_SCALE_WORDS);                                                          \
    } while (0)

/* Block `block` of a tile's int8 products into sums, through the sums tile of its parity (tile numbers
 * are immediates) and the operand tiles of a whole or a short block. */
LCQ_AMX static inline __attribute__((always_inline)) void block_sums(const uint32_t *x, int64_t stride,
                                                                    const uint32_t *w, int depth, int block,
                                                                    int32_t sums[][LCQ_SCALE_WORDS]) {
    const uint32_t *xb = x + block * LCQ_SCALE_WORDS, *wb = w + (int64_t)block * LCQ_SCALE_WORDS * LCQ_WORD_PANEL;
    const int whole = depth - block * LCQ_SCALE_WORDS >= LCQ_SCALE_WORDS;
    if (block % 2 == 0 && whole)
        BLOCK_SUMS(SUMS_0, X_WHOLE, W_WHOLE_0, xb, stride, wb, sums);
    else if (whole)
        BLOCK_SUMS(SUMS_1, X_WHOLE, W_WHOLE_0, xb, stride, wb, sums);
    else if (block % 2 == 0)
        BLOCK_SUMS(SUMS_0, X_SHORT, W_SHORT_0, xb, stride, wb, sums);
    else
        BLOCK_SUMS(SUMS_1, X_SHORT, W_SHORT_0, xb, stride, wb, sums);
}

/* Blocks whose tile products run before any of their sums are scaled: scaled right after its own block's
 * product, each waited for that product's store (1.17-1.41x the vpdpbusd tiles on SmolLM2's shapes at
 * 16-1024 rows, against 1.30-1.51x in runs of 8). Tile products and the scaling do not overlap in time
 * in either order (a microbenchmark of their sum: one 16 x 16 x 64 block 20 ns of tile loads, product
 * and store, 12 ns of scaling, 34 ns both). */
#define RUN_BLOCKS 8

/* The int8 form of lcq_amx_tile: 16 rows read, the first `rows` stored (the rest the caller's zero rows). */
LCQ_AMX static void byte_tile(int rows, const uint32_t *x, int words, int depth, const uint32_t *panel, int columns,
                              float *y, int64_t ldy, lcq_line_stream *stream) {
    const int blocks = lcq_scale_blocks(depth);
    const int64_t stride = 4 * (int64_t)words;
    int32_t sums[RUN_BLOCKS][LCQ_AMX_ROWS][LCQ_SCALE_WORDS] __attribute__((aligned(64)));
    for (int v = 0; v * 16 < columns; v++) {
        const uint32_t *w = panel + 16 * v;
        const float *scales = (const float *)(panel + (int64_t)depth * LCQ_WORD_PANEL) + 16 * v;
        __m512 acc[LCQ_AMX_ROWS];
        for (int r = 0; r < LCQ_AMX_ROWS; r++) acc[r] = _mm512_setzero_ps();
        for (int first = 0; first < blocks; first += RUN_BLOCKS) {
            const int run = blocks - first < RUN_BLOCKS ? blocks - first : RUN_BLOCKS;
            for (int b = 0; b < run; b++) block_sums(x, stride, w, depth, first + b, sums[b]);
            for (int b = 0; b < run; b++) {
                const int block = first + b;
                const __m512 scale = _mm512_loadu_ps(scales + block * LCQ_WORD_PANEL);
                for (int r = 0; r < LCQ_AMX_ROWS; r++) {
                    const uint32_t *row = x + (int64_t)r * words;
                    const __m512i offset = _mm512_set1_epi32(((const int32_t *)(row + depth + blocks))[block]);
                    const __m512i whole = _mm512_add_epi32(_mm512_load_si512(sums[b][r]), offset);
                    const __m512 both = _mm512_mul_ps(scale, _mm512_set1_ps(((const float *)(row + depth))[block]));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(whole), both, acc[r]);
                }
                lcq_stream_step(stream);
            }
        }
        const int left = columns - 16 * v;
        const __mmask16 stored = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        for (int r = 0; r < rows; r++) _mm512_mask_storeu_ps(y + r * ldy + 16 * v, stored, acc[r]);
    }
}

/* One block's bf16 products into the sums tiles: the activation tile X once, each vector's weights W0 and
 * (with two vectors) W1, rows of weight words `w_stride` bytes apart. */
#define PAIR_BLOCK(X, W0, W1, x, stride, w, w_stride, two)                                                      \
    do {                                                                                                        \
        _tile_loadd(X, x, stride);                                                                              \
        _tile_loadd(W0, w, w_stride);                                                                           \
        _tile_dpbf16ps(SUMS_0, X, W0);                                                                          \
        if (two) {                                                                                              \
            _tile_loadd(W1, (w) + 16, w_stride);                                                                \
            _tile_dpbf16ps(SUMS_1, X, W1);                                                                      \
        }                                                                                                       \
    } while (0)

/* SUMS_0 (and with `two` SUMS_1) += the bf16 products of 16 rows x (`stride` bytes apart, `depth` words
 * of pairs each) and one (two) vectors of 16 columns of w (rows of pairs along K, `w_words` words apart):
 * tiles of whole blocks of LCQ_SCALE_WORDS words, then the short one. */
LCQ_AMX static inline __attribute__((always_inline)) void pair_blocks(const uint32_t *x, int64_t stride,
                                                                     const uint32_t *w, int64_t w_words, int depth,
                                                                     int two, lcq_line_stream *stream) {
    const int whole = depth / LCQ_SCALE_WORDS;
    const int64_t w_stride = 4 * w_words;
    for (int block = 0; block < whole; block++) {
        PAIR_BLOCK(X_WHOLE, W_WHOLE_0, W_WHOLE_1, x + block * LCQ_SCALE_WORDS, stride,
                   w + (int64_t)block * LCQ_SCALE_WORDS * w_words, w_stride, two);
        for (int v = 0; v <= two; v++) lcq_stream_step(stream);
    }
    if (whole * LCQ_SCALE_WORDS < depth)
        PAIR_BLOCK(X_SHORT, W_SHORT_0, W_SHORT_1, x + whole * LCQ_SCALE_WORDS, stride,
                   w + (int64_t)whole * LCQ_SCALE_WORDS * w_words, w_stride, two);
}

/* The bf16 form of lcq_amx_tile: fp32 sums stay in the tiles over all of K (no scale per block), and
 * are stored once; rows past `rows` are computed (the caller's zero rows) but not stored. */
LCQ_AMX static void pair_tile(int rows, const uint32_t *x, int words, int depth, const uint32_t *panel, int columns,
                              float *y, int64_t ldy, lcq_line_stream *stream) {
    const int two = columns > 16;
    _tile_zero(SUMS_0);
    _tile_zero(SUMS_1);
    pair_blocks(x, 4 * (int64_t)words, panel, LCQ_WORD_PANEL, depth, two, stream);
    float sums[2][LCQ_AMX_ROWS][16] __attribute__((aligned(64)));
    _tile_stored(SUMS_0, sums[0], 64);
    if (two) _tile_stored(SUMS_1, sums[1], 64);
    for (int v = 0; v <= two; v++) {
        const int left = columns - 16 * v;
        const __mmask16 stored = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        for (int r = 0; r < rows; r++) _mm512_mask_storeu_ps(y + r * ldy + 16 * v, stored, _mm512_load_ps(sums[v][r]));
    }
}

/* The bf16 form of lcq_amx_tile for 17 to 32 rows of whole blocks (depth a multiple of LCQ_SCALE_WORDS, so
 * the configuration's short tiles are whole ones and free): two tiles of activation rows by the panel's
 * two vectors of 16 columns, four sums tiles (SUMS_0, SUMS_1 for the first rows, X_SHORT and W_SHORT_0 for
 * the second), each block's two activation tiles (X_WHOLE, W_SHORT_1) and two weight tiles loaded once
 * for four products, and whole ones stored straight into y. What bounds these tiles is loading them (a
 * microbenchmark, operands in L1 and L2: 9.3 ns a product with three loads for two, 7.9 with four for
 * four, 4.8 without loads); against tiles of 16 rows, SmolLM2's 49152 x 576 head at 32-64 rows 1.07-1.23x. */
LCQ_AMX static void pair_quads(int rows, const uint32_t *x, int words, int depth, const uint32_t *panel,
                               int columns, float *y, int64_t ldy, lcq_line_stream *stream) {
    const int64_t stride = 4 * (int64_t)words;
    _tile_zero(SUMS_0);
    _tile_zero(SUMS_1);
    _tile_zero(X_SHORT);
    _tile_zero(W_SHORT_0);
    for (int k = 0; k < depth; k += LCQ_SCALE_WORDS) {
        const uint32_t *w = panel + (int64_t)k * LCQ_WORD_PANEL;
        _tile_loadd(X_WHOLE, x + k, stride);
        _tile_loadd(W_WHOLE_0, w, 4 * LCQ_WORD_PANEL);
        _tile_dpbf16ps(SUMS_0, X_WHOLE, W_WHOLE_0);
        _tile_loadd(W_WHOLE_1, w + 16, 4 * LCQ_WORD_PANEL);
        _tile_dpbf16ps(SUMS_1, X_WHOLE, W_WHOLE_1);
        _tile_loadd(W_SHORT_1, x + (int64_t)LCQ_AMX_ROWS * words + k, stride);
        _tile_dpbf16ps(X_SHORT, W_SHORT_1, W_WHOLE_0);
        _tile_dpbf16ps(W_SHORT_0, W_SHORT_1, W_WHOLE_1);
        for (int step = 0; step < 4; step++) lcq_stream_step(stream);
    }
    if (rows == 2 * LCQ_AMX_ROWS && columns == 32) { /* whole: straight into y */
        _tile_stored(SUMS_0, y, 4 * ldy);
        _tile_stored(SUMS_1, y + 16, 4 * ldy);
        _tile_stored(X_SHORT, y + LCQ_AMX_ROWS * ldy, 4 * ldy);
        _tile_stored(W_SHORT_0, y + LCQ_AMX_ROWS * ldy + 16, 4 * ldy);
        return;
    }
    float sums[2 * LCQ_AMX_ROWS][2 * 16] __attribute__((aligned(64)));
    _tile_stored(SUMS_0, sums[0], sizeof sums[0]);
    _tile_stored(SUMS_1, sums[0] + 16, sizeof sums[0]);
    _tile_stored(X_SHORT, sums[LCQ_AMX_ROWS], sizeof sums[0]);
    _tile_stored(W_SHORT_0, sums[LCQ_AMX_ROWS] + 16, sizeof sums[0]);
    for (int v = 0; v < 2 && 16 * v < columns; v++) {
        const int left = columns - 16 * v;
        const __mmask16 stored = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        for (int r = 0; r < rows; r++) _mm512_mask_storeu_ps(y + r * ldy + 16 * v, stored, _mm512_load_ps(sums[r] + 16 * v));
    }
}

int lcq_amx_tile_rows(int form, int depth) {
    return form == LCQ_BF16_PRODUCTS && depth % LCQ_SCALE_WORDS == 0 ? 2 * LCQ_AMX_ROWS : LCQ_AMX_ROWS;
}

LCQ_AMX void lcq_amx_pair_product(const uint32_t *a, int64_t lda, const uint32_t *b, int64_t ldb, int K, int rows,
                                  int vectors, float *c, int64_t ldc, int accumulate) {
    for (int r0 = 0; r0 < rows; r0 += LCQ_AMX_ROWS)
        for (int v = 0; v < vectors; v += 2) {
            const int two = vectors - v >= 2;
            float *out = c + (int64_t)r0 * ldc + 16 * v;
            if (accumulate) {
                _tile_loadd(SUMS_0, out, 4 * ldc);
                if (two) _tile_loadd(SUMS_1, out + 16, 4 * ldc);
            } else {
                _tile_zero(SUMS_0);
                _tile_zero(SUMS_1);
            }
            pair_blocks(a + (int64_t)r0 * lda, 4 * lda, b + 16 * v, ldb, K, two, NULL);
            _tile_stored(SUMS_0, out, 4 * ldc);
            if (two) _tile_stored(SUMS_1, out + 16, 4 * ldc);
        }
}

LCQ_AMX void lcq_amx_tile(int form, int rows, const uint32_t *x, int words, int depth, const uint32_t *panel,
                          int columns, float *y, int64_t ldy, lcq_line_stream *stream) {
    if (form == LCQ_INT8_PRODUCTS)
        byte_tile(rows, x, words, depth, panel, columns, y, ldy, stream);
    else if (rows > LCQ_AMX_ROWS)
        pair_quads(rows, x, words, depth, panel, columns, y, ldy, stream);
    else
        pair_tile(rows, x, words, depth, panel, columns, y, ldy, stream);
}

#else

void lcq_amx_configure(int depth) { (void)depth; }
void lcq_amx_release(void) {}
void lcq_amx_tile(int form, int rows, const uint32_t *x, int words, int depth, const uint32_t *panel, int columns,
                  float *y, int64_t ldy, lcq_line_stream *stream) {
    (void)form, (void)rows, (void)x, (void)words, (void)depth, (void)panel, (void)columns, (void)y, (void)ldy,
        (void)stream;
}
int lcq_amx_tile_rows(int form, int depth) {
    (void)form, (void)depth;
    return LCQ_AMX_ROWS;
}
void lcq_amx_pair_product(const uint32_t *a, int64_t lda, const uint32_t *b, int64_t ldb, int K, int rows,
                          int vectors, float *c, int64_t ldc, int accumulate) {
    (void)a, (void)lda, (void)b, (void)ldb, (void)K, (void)rows, (void)vectors, (void)c, (void)ldc, (void)accumulate;
}

#endif
