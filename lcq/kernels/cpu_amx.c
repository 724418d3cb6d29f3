/* The int8 panel product's tiles of 16 activation rows on AMX (AMX-INT8: Intel Xeon from Sapphire Rapids).
 *
 * The int8 product (cpu_gemm.c) runs one vpdpbusd, 64 multiply-adds, per instruction; a tdpbsud runs
 * 16 x 16 x 64 of them: one block of 64 values along K for 16 activation rows and 16 weight rows, which is
 * the int8 form's scale block (cpu_gemm.h), so each block's int32 sums come out whole. The operands are
 * the product's own, read in place: activation rows in the int8 form are the A tile (16 rows, a block's
 * 64 signed bytes each, the row stride apart), and a weight panel's words [K / 4][32] are already the B
 * tile's layout (a row per word along K, 16 weight rows' 4 unsigned bytes side by side). Each block's
 * sums then go through memory to AVX-512 registers, where, as in byte_sums, they take the activation
 * row's offset (which cancels the weights' + 128) and become fp32 times both scales: the same integers and
 * the same fp32 operations in the same order, so the same values bit for bit as the vpdpbusd tiles.
 *
 * What bounds it is not the tdpbsud (16 of its 64-value blocks take about 5 ns on one core of this host)
 * but moving operands and sums through memory and scaling sums: on SmolLM2's shapes 1.3-1.5x the
 * vpdpbusd tiles from 64 rows (RUN_BLOCKS).
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

/* Whether the CPU has AMX-TILE and AMX-INT8 and Linux lets this process use tile data (asked once). */
static int amx_here(void) {
    static int answer = -1;
    if (answer < 0) {
        unsigned a, b, c, d;
        const int cpu = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 24 & 1) && (d >> 25 & 1);
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

#define LCQ_AMX __attribute__((target("avx512f,avx512bw,avx512vl,amx-tile,amx-int8")))

/* The tiles: two of sums (even and odd blocks, alternating), the operands of each, and the operands of a last block
 * shorter than 16 words (K not a multiple of 64). Macros, not an enum: the tile intrinsics paste the
 * number into their assembly. */
#define SUMS_EVEN 0
#define SUMS_ODD 1
#define X_EVEN 2
#define X_ODD 3
#define W_EVEN 4
#define W_ODD 5
#define X_SHORT 6
#define W_SHORT 7

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

LCQ_AMX void lcq_amx_configure(int depth) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = SUMS_EVEN; t <= W_ODD; t++) {
        config.rows[t] = LCQ_AMX_ROWS;
        config.bytes_per_row[t] = 4 * LCQ_SCALE_WORDS; /* sums: 16 int32; operands: a block of 64 bytes */
    }
    const int short_words = depth % LCQ_SCALE_WORDS;
    if (short_words) {
        config.rows[X_SHORT] = LCQ_AMX_ROWS;
        config.bytes_per_row[X_SHORT] = 4 * short_words;
        config.rows[W_SHORT] = short_words;
        config.bytes_per_row[W_SHORT] = 4 * LCQ_SCALE_WORDS;
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

/* Block `block` of a tile's products into sums, through the tiles of its parity (tile numbers are
 * immediates) with a whole block's operands, or the short ones. */
LCQ_AMX static inline __attribute__((always_inline)) void block_sums(const uint32_t *x, int64_t stride,
                                                                    const uint32_t *w, int depth, int block,
                                                                    int32_t sums[][LCQ_SCALE_WORDS]) {
    const uint32_t *xb = x + block * LCQ_SCALE_WORDS, *wb = w + (int64_t)block * LCQ_SCALE_WORDS * LCQ_WORD_PANEL;
    const int whole = depth - block * LCQ_SCALE_WORDS >= LCQ_SCALE_WORDS;
    if (block % 2 == 0 && whole)
        BLOCK_SUMS(SUMS_EVEN, X_EVEN, W_EVEN, xb, stride, wb, sums);
    else if (whole)
        BLOCK_SUMS(SUMS_ODD, X_ODD, W_ODD, xb, stride, wb, sums);
    else if (block % 2 == 0)
        BLOCK_SUMS(SUMS_EVEN, X_SHORT, W_SHORT, xb, stride, wb, sums);
    else
        BLOCK_SUMS(SUMS_ODD, X_SHORT, W_SHORT, xb, stride, wb, sums);
}

/* Blocks whose tile products run before any of their sums are scaled: scaled right after its own block's
 * product, each waited for that product's store (1.17-1.41x the vpdpbusd tiles on SmolLM2's shapes at
 * 16-1024 rows, against 1.30-1.51x in runs of 8). Tile products and the scaling do not overlap in time
 * in either order (a microbenchmark of their sum: one 16 x 16 x 64 block 20 ns of tile loads, product
 * and store, 12 ns of scaling, 34 ns both). */
#define RUN_BLOCKS 8

LCQ_AMX void lcq_amx_tile(const uint32_t *x, int words, int depth, const uint32_t *panel, int columns, float *y,
                          int64_t ldy, lcq_line_stream *stream) {
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
        for (int r = 0; r < LCQ_AMX_ROWS; r++) _mm512_mask_storeu_ps(y + r * ldy + 16 * v, stored, acc[r]);
    }
}

#else

void lcq_amx_configure(int depth) { (void)depth; }
void lcq_amx_release(void) {}
void lcq_amx_tile(const uint32_t *x, int words, int depth, const uint32_t *panel, int columns, float *y, int64_t ldy,
                  lcq_line_stream *stream) {
    (void)x, (void)words, (void)depth, (void)panel, (void)columns, (void)y, (void)ldy, (void)stream;
}

#endif
