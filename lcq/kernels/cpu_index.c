/* y (M, N) = x (M, K) @ W^T for fp32 activations and an LCQ weight kept as its indices, on x86 CPUs
 * with AVX2 and FMA (AVX-512 where the caller says so); fp32 arithmetic.
 *
 * A CPU decode step streams every weight once. Kept as fp16 a weight costs 2 bytes; kept as its
 * b-bit indices plus its group scales, about b / 8 + 0.19 (r 2, g 64). Each group's codebook
 * c = S @ V - B is built in registers and weights are looked up by permutes: with AVX-512 the 16
 * entries fit one register (16 weights per vpermps), with AVX2 two registers (8 weights per two
 * permutes and a blend), the row's table held in registers and a tile of 16 output columns reduced
 * at once. On a Zen 4 that decodes 1.3-1.9x as fast as the fp16 copy with AVX-512, 0.9-1.2x with
 * AVX2, at M = 1 (bench/cpu_index.py). With int8 products (AVX512_VNNI and AVX512_VBMI) and a weight that
 * keeps its codebooks in bytes (lcq_index_byte_books), decode products of a few rows look 64 weights up
 * in bytes per instruction and multiply them with int8 activations (byte_decode_product): 1.1-2.1x the
 * fp32 form at M = 1 on a Zen 4.
 * Products of lcq_gemm_min_rows() rows or more are bounded by arithmetic instead: cpu_gemm.c expands a
 * block of weight rows at a time to their fp32 entries (or with int8 products to bytes) in a
 * per-thread buffer and multiplies it there, so no copy of the whole layer is made unless asked for
 * (lcq_index_byte_rows: the int8 form kept, memory for speed) and every fp32 product uses the exact
 * entries.
 *
 * Index layout, one function for every bit width b: a row is runs of 16 32-bit words, each word
 * holding P = 32 / b indices (16, 10 or 8); field s of word i (bits b s ..) is index 16 s + i of the
 * run, so a step of 16 consecutive weights is one permute of the run's words, which are then shifted
 * down by b for the next step. Permutes read the low 4 bits of each word, so the layer's tables are
 * replicated to 16 entries (entry e is V[e mod 2^b]) and the next fields above an index do not
 * matter: no mask. The row ends with a partial run of 16 lanes of 1, 2 or 4 bytes (the fewest that
 * hold its fields), so rows are not padded to whole runs. Groups are multiples of 32 indices, so a
 * step never straddles two codebooks.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_constant.h"
#include "cpu_gemm.h"

#define PASS_ROWS 6 /* the most activation rows per pass over a column's indices: AVX-512 6 (6 x 2 accumulators
                      * of its 32 registers), AVX2 4 (of 16) */
#define TILE_COLUMNS 16 /* output columns whose sums are reduced together */
#define HELD_RANKS 4 /* ranks whose table rows a decode column holds in registers */
/* The loop over a decode product's tiles: LCQ_DECODE_COLUMNS' guided chunks of 32 columns, in tiles. */
#define DECODE_TILES _Pragma("omp parallel for schedule(guided, 2)")
#define PACK_BLOCK_ROWS 64 /* rows per task of lcq_index_byte_rows: whole panels of 32 */

/* Must match IndexWeight in cpu_index.py. */
typedef struct {
    const uint8_t *indices;     /* (N, row_bytes): `runs` runs of 16 words, then a partial run of 16 lanes */
    const float *scales;        /* S (N, groups, rank) */
    const float *offsets;       /* B (N, groups) */
    const float *tables;        /* V (tables, rank, 16), replicated: entry e is V[e mod 2^bits] */
    const int32_t *table_index; /* (N,) which table row n uses */
    int N, K, group_size, groups, rank;
    int bits, runs, last_lane_bytes, row_bytes; /* last_lane_bytes 0: no partial run */
    int wide; /* decode with AVX-512 (the caller checked the CPU has it) */
    const float *tops; /* (N, ceil(K / 64)) lcq_index_block_tops, for the int8 expansion; NULL where not wide */
    const uint32_t *byte_rows; /* every row in the int8 form (lcq_index_byte_rows), or NULL: expanded per block */
    const uint8_t *books; /* (N, groups) records of a scale and 2^bits bytes (lcq_index_byte_books), or NULL */
} lcq_index_weight;

/* Row n's table V (rank x 16). */
static inline const float *table_row(const lcq_index_weight *w, int n) {
    return w->tables + (int64_t)w->table_index[n] * w->rank * 16;
}

/* Word (or partial-run lane) i of run `run` of a row. */
static inline uint32_t lane_word(const lcq_index_weight *w, const uint8_t *row, int run, int i) {
    uint32_t word = 0;
    const int bytes = run < w->runs ? 4 : w->last_lane_bytes;
    memcpy(&word, row + (int64_t)run * 64 + i * bytes, bytes); /* x86: little-endian */
    return word;
}


/* The instruction-set steps of a decode product. A row's table V is held in registers (or where the
 * compiler spills them, on the stack) when RANK is a constant of 1 to HELD_RANKS, so a group's
 * codebook is a broadcast of B and r multiply-adds (with the table loaded per group and the rank a
 * run-time loop, building codebooks was a third of a batch-1 product's instructions); RANK 0 takes
 * any rank (w->rank) and reads the table per group. AVX2: a codebook in two registers (entries 0-7 and
 * 8-15), a run's words in two (lanes 0-7 and 8-15), a step of 16 weights as 8 + 8, one accumulator
 * per half. */
typedef struct {
    __m256 low, high;
} narrow_book;

typedef struct {
    __m256i first, second;
} narrow_words;

typedef struct {
    __m256 low[HELD_RANKS], high[HELD_RANKS];
    const float *v;
} narrow_table;

static inline narrow_table narrow_table_of(const lcq_index_weight *w, int n, const int RANK) {
    narrow_table table;
    table.v = table_row(w, n);
    for (int r = 0; r < RANK; r++) {
        table.low[r] = _mm256_loadu_ps(table.v + r * 16);
        table.high[r] = _mm256_loadu_ps(table.v + r * 16 + 8);
    }
    return table;
}

/* Entries 0-7 and 8-15 of the codebook of group j of row n (table: the row's). */
static inline narrow_book narrow_codebook(const lcq_index_weight *w, const narrow_table *table, const int RANK, int n,
                                          int j) {
    const int rank = RANK ? RANK : w->rank;
    const float *s = w->scales + ((int64_t)n * w->groups + j) * rank;
    narrow_book book;
    book.low = book.high = _mm256_set1_ps(-w->offsets[(int64_t)n * w->groups + j]);
    for (int r = 0; r < rank; r++) {
        const __m256 scale = _mm256_set1_ps(s[r]);
        book.low = _mm256_fmadd_ps(scale, RANK ? table->low[r] : _mm256_loadu_ps(table->v + r * 16), book.low);
        book.high = _mm256_fmadd_ps(scale, RANK ? table->high[r] : _mm256_loadu_ps(table->v + r * 16 + 8), book.high);
    }
    return book;
}

static inline void narrow_write(narrow_book book, float *entries) {
    _mm256_storeu_ps(entries, book.low);
    _mm256_storeu_ps(entries + 8, book.high);
}

/* Lanes 0-7 and 8-15 as 32-bit words from lanes of `bytes` bytes. */
static inline narrow_words narrow_load(const uint8_t *run, int bytes) {
    narrow_words words;
    if (bytes == 4) {
        words.first = _mm256_loadu_si256((const __m256i *)run);
        words.second = _mm256_loadu_si256((const __m256i *)(run + 32));
    } else if (bytes == 2) {
        words.first = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)run));
        words.second = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(run + 16)));
    } else {
        words.first = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)run));
        words.second = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(run + 8)));
    }
    return words;
}

/* The next fields down (bits: a constant where inlined, so the shifts take an immediate). */
static inline narrow_words narrow_next(narrow_words words, const int bits) {
    words.first = _mm256_srli_epi32(words.first, bits);
    words.second = _mm256_srli_epi32(words.second, bits);
    return words;
}

/* Weights of the 8 lanes' low fields: the permutes read bits 0-2, the blend bit 3 moved to the sign. */
static inline __m256 lookup(narrow_book book, __m256i words) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(book.low, words), _mm256_permutevar8x32_ps(book.high, words),
                            _mm256_castsi256_ps(_mm256_slli_epi32(words, 28)));
}

/* acc[r][0] and acc[r][1] += the R activation rows at x times the 16 weights of the words' low fields
 * (chain: AVX-512 alternates accumulators between steps; here the halves have one each). */
static inline __attribute__((always_inline)) void narrow_step(const int R, narrow_words words, narrow_book book,
                                                              const float *x, int K, __m256 acc[][2], int chain) {
    (void)chain;
    const __m256 first = lookup(book, words.first), second = lookup(book, words.second);
    for (int r = 0; r < R; r++) {
        acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (int64_t)r * K), first, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (int64_t)r * K + 8), second, acc[r][1]);
    }
}

/* The 16 weights of the words' low fields, written out (the expansion for cpu_gemm.c). */
static inline void narrow_write_step(narrow_words words, narrow_book book, float *out) {
    _mm256_storeu_ps(out, lookup(book, words.first));
    _mm256_storeu_ps(out + 8, lookup(book, words.second));
}

/* out[c] = the sum of column c's lanes + tails[c], for a tile's `count` columns: 8 at a time by a
 * tree of horizontal adds (9 vector operations for 8 columns, where a horizontal sum took 5 each). */
static inline void narrow_reduce(const __m256 *sums, const float *tails, int count, float *out) {
    for (int c0 = 0; c0 < count; c0 += 8) {
        __m256 v[8];
        for (int c = 0; c < 8; c++) v[c] = c0 + c < count ? sums[c0 + c] : _mm256_setzero_ps();
        /* per 128-bit half: the half's sums of columns c0 .. c0 + 3, then of c0 + 4 .. c0 + 7 */
        const __m256 first = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
        const __m256 second = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
        const __m256 totals = _mm256_add_ps(_mm256_permute2f128_ps(first, second, 0x20),
                                            _mm256_permute2f128_ps(first, second, 0x31));
        float lanes[8];
        _mm256_storeu_ps(lanes, totals);
        for (int c = 0; c < 8 && c0 + c < count; c++) out[c0 + c] = lanes[c] + tails[c0 + c];
    }
}

/* Weights whole .. K - 1 of row n, past its last whole step of 16 (loop tails), into out: index by
 * index from the group's codebook written out (whole is a multiple of 16, so one group holds them). */
static void tail_weights(const lcq_index_weight *w, int n, int whole, float *out) {
    const uint8_t *row = w->indices + (int64_t)n * w->row_bytes;
    const int run_length = 16 * (32 / w->bits);
    const narrow_table table = narrow_table_of(w, n, 0);
    float book[16];
    narrow_write(narrow_codebook(w, &table, 0, n, whole / w->group_size), book);
    for (int k = whole; k < w->K; k++) {
        const int s = k % run_length / 16;
        out[k - whole] = book[(lane_word(w, row, k / run_length, k % 16) >> (w->bits * s)) & 15];
    }
}

#define AVX512 __attribute__((target("avx512f")))

/* AVX-512: the whole 16-entry codebook in one register, a run's 16 words in one, a step of 16 weights
 * in one; steps alternate between a row's two accumulators. */
typedef __m512 wide_book;
typedef __m512i wide_words;

/* A row's table: one register per rank. */
typedef struct {
    __m512 rows[HELD_RANKS];
    const float *v;
} wide_table;

AVX512 static inline wide_table wide_table_of(const lcq_index_weight *w, int n, const int RANK) {
    wide_table table;
    table.v = table_row(w, n);
    for (int r = 0; r < RANK; r++) table.rows[r] = _mm512_loadu_ps(table.v + r * 16);
    return table;
}

AVX512 static inline wide_book wide_codebook(const lcq_index_weight *w, const wide_table *table, const int RANK, int n,
                                             int j) {
    const int rank = RANK ? RANK : w->rank;
    const float *s = w->scales + ((int64_t)n * w->groups + j) * rank;
    __m512 book = _mm512_set1_ps(-w->offsets[(int64_t)n * w->groups + j]);
    for (int r = 0; r < rank; r++)
        book = _mm512_fmadd_ps(_mm512_set1_ps(s[r]), RANK ? table->rows[r] : _mm512_loadu_ps(table->v + r * 16), book);
    return book;
}

AVX512 static inline void wide_write(wide_book book, float *entries) {
    _mm512_storeu_ps(entries, book);
}

AVX512 static inline wide_words wide_load(const uint8_t *run, int bytes) {
    if (bytes == 4) return _mm512_loadu_si512(run);
    if (bytes == 2) return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)run));
    return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)run));
}

AVX512 static inline wide_words wide_next(wide_words words, const int bits) {
    return _mm512_srli_epi32(words, bits);
}

AVX512 static inline __attribute__((always_inline)) void wide_step(const int R, wide_words words, wide_book book,
                                                                 const float *x, int K, __m512 acc[][2],
                                                                 const int chain) {
    const __m512 weights = _mm512_permutexvar_ps(words, book);
    for (int r = 0; r < R; r++)
        acc[r][chain] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (int64_t)r * K), weights, acc[r][chain]);
}

AVX512 static inline void wide_write_step(wide_words words, wide_book book, float *out) {
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(words, book));
}

/* out[c] = the sum of column c's lanes + tails[c], for a tile's `count` columns: a transpose-add tree
 * over the 16 (45 vector operations, where a horizontal sum per column took 9, in a dependent chain
 * that was a fifth of a batch-1 product's time). */
AVX512 static inline void wide_reduce(const __m512 *sums, const float *tails, int count, float *out) {
    __m512 v[TILE_COLUMNS], pairs[8], quads[4], halves[2];
    for (int c = 0; c < TILE_COLUMNS; c++) v[c] = c < count ? sums[c] : _mm512_setzero_ps();
    for (int i = 0; i < 8; i++) /* per 128-bit lane: a0 + a2, b0 + b2, a1 + a3, b1 + b3 of a, b = v[2i], v[2i + 1] */
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per 128-bit lane: the lane's sums of columns 4i .. 4i + 3 */
        quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; i++) /* 128-bit lanes: quads 2i (lanes 0 + 1, 2 + 3), then quads 2i + 1 (the same) */
        halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 totals = _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                        _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __mmask16 lanes = (__mmask16)((1u << count) - 1);
    _mm512_mask_storeu_ps(out, lanes, _mm512_add_ps(totals, _mm512_maskz_loadu_ps(lanes, tails)));
}

/* The decode product (fewer than lcq_gemm_min_rows(...) rows) of one instruction set, PREFIX narrow (AVX2)
 * or wide (AVX-512), from that set's steps above: per tile of TILE_COLUMNS output columns (chunks of
 * tiles are OpenMP's iterations), passes of up to PASS_ROWS activation rows over each column's
 * indices; per run its words, per step of 16 weights one lookup (a new codebook where a group starts)
 * and a shift, two steps at a time so that they feed two accumulators, then scalar weights where K
 * ends inside a step; the tile's column sums are reduced together. A column is inlined with R, the
 * bit width and the rank constants, so the accumulators and the table stay in registers. Written
 * once and instantiated twice because AVX-512 intrinsics only inline into functions compiled for
 * AVX-512, so the two cannot share a plain function. */
#define DECODE_PRODUCT(PREFIX, TARGET, VECTOR, ZERO, ADD)                                                           \
    /* sums[r][c] and tails[r][c]: column c of the tile (row n) for activation rows r < R. */                       \
    TARGET static inline __attribute__((always_inline)) void PREFIX##_column(                                       \
        const int R, const int BITS, const int RANK, const lcq_index_weight *w, int n, const float *x,              \
        VECTOR sums[][TILE_COLUMNS], float tails[][TILE_COLUMNS], int c) {                                          \
        const int K = w->K, whole = K / 16 * 16, fields = 32 / BITS;                                                \
        const uint8_t *row = w->indices + (int64_t)n * w->row_bytes;                                                \
        VECTOR acc[PASS_ROWS][2];                                                                                   \
        for (int r = 0; r < R; r++) {                                                                               \
            acc[r][0] = acc[r][1] = ZERO();                                                                         \
            tails[r][c] = 0.0f;                                                                                     \
        }                                                                                                           \
        const PREFIX##_table table = PREFIX##_table_of(w, n, RANK);                                                 \
        PREFIX##_book book = PREFIX##_codebook(w, &table, RANK, n, 0);                                              \
        int k = 0, group = 0, group_end = w->group_size; /* groups counted, not divided out */                      \
        for (int run = 0; k < whole; run++) {                                                                       \
            PREFIX##_words words = PREFIX##_load(row + (int64_t)run * 64, run < w->runs ? 4 : w->last_lane_bytes);  \
            const int steps = (whole - k) / 16 < fields ? (whole - k) / 16 : fields;                                \
            for (int s = 0; s < steps; s += 2, k += 32) { /* runs and groups are whole pairs of steps */            \
                if (k == group_end) {                                                                               \
                    book = PREFIX##_codebook(w, &table, RANK, n, ++group);                                          \
                    group_end += w->group_size;                                                                     \
                }                                                                                                   \
                PREFIX##_step(R, words, book, x + k, K, acc, 0);                                                    \
                if (s + 1 == steps) { /* K ends inside this pair */                                                 \
                    k += 16;                                                                                        \
                    break;                                                                                          \
                }                                                                                                   \
                words = PREFIX##_next(words, BITS);                                                                 \
                PREFIX##_step(R, words, book, x + k + 16, K, acc, 1);                                               \
                words = PREFIX##_next(words, BITS);                                                                 \
            }                                                                                                       \
        }                                                                                                           \
        if (whole < K) {                                                                                            \
            float weights[16];                                                                                      \
            tail_weights(w, n, whole, weights);                                                                     \
            for (; k < K; k++)                                                                                      \
                for (int r = 0; r < R; r++) tails[r][c] += x[(int64_t)r * K + k] * weights[k - whole];              \
        }                                                                                                           \
        for (int r = 0; r < R; r++) sums[r][c] = ADD(acc[r][0], acc[r][1]);                                         \
    }                                                                                                               \
                                                                                                                    \
    /* y[r, n0 + c] for R rows and the tile's `count` columns from n0. */                                           \
    TARGET static inline __attribute__((always_inline)) void PREFIX##_tile(                                         \
        const int R, const int BITS, const int RANK, const lcq_index_weight *w, int n0, int count, const float *x,  \
        float *y) {                                                                                                 \
        VECTOR sums[PASS_ROWS][TILE_COLUMNS];                                                                       \
        float tails[PASS_ROWS][TILE_COLUMNS];                                                                       \
        for (int c = 0; c < count; c++) PREFIX##_column(R, BITS, RANK, w, n0 + c, x, sums, tails, c);               \
        for (int r = 0; r < R; r++) PREFIX##_reduce(sums[r], tails[r], count, y + (int64_t)r * w->N + n0);          \
    }                                                                                                               \
                                                                                                                    \
    /* Row n's weights as fp32 (K), the exact codebook entries: the steps of a column, written out. */     \
    TARGET static inline __attribute__((always_inline)) void PREFIX##_expand_row(                              \
        const int BITS, const lcq_index_weight *w, int n, float *out) {                                         \
        const int K = w->K, whole = K / 16 * 16, fields = 32 / BITS;                                            \
        const uint8_t *row = w->indices + (int64_t)n * w->row_bytes;                                            \
        const PREFIX##_table table = PREFIX##_table_of(w, n, 0);                                                \
        PREFIX##_book book = PREFIX##_codebook(w, &table, 0, n, 0);                                             \
        int k = 0, group = 0, group_end = w->group_size;                                                        \
        for (int run = 0; k < whole; run++) {                                                                   \
            PREFIX##_words words = PREFIX##_load(row + (int64_t)run * 64, run < w->runs ? 4 : w->last_lane_bytes); \
            for (int s = 0; s < fields && k < whole; s++, k += 16) {                                            \
                if (k == group_end) {                                                                           \
                    book = PREFIX##_codebook(w, &table, 0, n, ++group);                                         \
                    group_end += w->group_size;                                                                 \
                }                                                                                               \
                PREFIX##_write_step(words, book, out + k);                                                      \
                words = PREFIX##_next(words, BITS);                                                             \
            }                                                                                                   \
        }                                                                                                       \
        if (whole < K) tail_weights(w, n, whole, out + whole);                                                  \
    }                                                                                                           \
                                                                                                                \
    /* Rows first .. first + count - 1 as fp32 (count, K), for cpu_gemm.c (an lcq_expand_rows). */         \
    TARGET static void PREFIX##_expand(const void *weight, int K, int first, int count, float *out) {           \
        const lcq_index_weight *w = weight;                                                                     \
        for (int n = first; n < first + count; n++) {                                                           \
            float *row = out + (int64_t)(n - first) * K;                                                        \
            switch (w->bits) {                                                                                  \
                case 2: PREFIX##_expand_row(2, w, n, row); break;                                               \
                case 3: PREFIX##_expand_row(3, w, n, row); break;                                               \
                default: PREFIX##_expand_row(4, w, n, row); break;                                              \
            }                                                                                                   \
        }                                                                                                       \
    }

DECODE_PRODUCT(narrow, , __m256, _mm256_setzero_ps, _mm256_add_ps)
DECODE_PRODUCT(wide, AVX512, __m512, _mm512_setzero_ps, _mm512_add_ps)

/* PREFIX##_tiles_BITS_RANK: the decode product for one bit width and rank, both literals in its own
 * function, so that each variant's registers are allocated apart from the others' (the 60 ranks,
 * widths and row counts of AVX-512 in one function spilled the accumulators: 0.5-0.8x). */
#define ROWS_UP_TO_4(TILE, ...)                                                                                     \
    case 1: TILE(1, __VA_ARGS__); break;                                                                            \
    case 2: TILE(2, __VA_ARGS__); break;                                                                            \
    case 3: TILE(3, __VA_ARGS__); break;                                                                            \
    default: TILE(4, __VA_ARGS__); break;
#define ROWS_UP_TO_6(TILE, ...)                                                                                     \
    case 1: TILE(1, __VA_ARGS__); break;                                                                            \
    case 2: TILE(2, __VA_ARGS__); break;                                                                            \
    case 3: TILE(3, __VA_ARGS__); break;                                                                            \
    case 4: TILE(4, __VA_ARGS__); break;                                                                            \
    case 5: TILE(5, __VA_ARGS__); break;                                                                            \
    default: TILE(6, __VA_ARGS__); break;
/* Passes of up to MOST rows, as even as can be: AVX-512 takes 6 (5 rows in one pass instead of 4 + 1, which
 * read every index twice: 1.12x at 5 rows, 1.07x at 6, 1.08x at 9 on SmolLM2's shapes, the same sums;
 * passes of 8 lost at 8 rows, 0.94x), so that verifying 4 drafts at batch 1 reads the weights once. */
#define TILES(PREFIX, TARGET, BITS, RANK, MOST)                                                                     \
    TARGET static void PREFIX##_tiles_##BITS##_##RANK(const lcq_index_weight *w, const float *x, int M, float *y) { \
        const int tiles = (w->N + TILE_COLUMNS - 1) / TILE_COLUMNS, passes = (M + MOST - 1) / MOST;                 \
        DECODE_TILES for (int t = 0; t < tiles; t++) {                                                              \
            const int n0 = t * TILE_COLUMNS, count = w->N - n0 < TILE_COLUMNS ? w->N - n0 : TILE_COLUMNS;           \
            for (int pass = 0, m = 0; pass < passes; pass++) {                                                      \
                const int rows = M / passes + (pass < M % passes);                                                  \
                const float *xs = x + (int64_t)m * w->K;                                                            \
                float *out = y + (int64_t)m * w->N;                                                                 \
                switch (rows) { ROWS_UP_TO_##MOST(PREFIX##_tile, BITS, RANK, w, n0, count, xs, out) }              \
                m += rows;                                                                                          \
            }                                                                                                       \
        }                                                                                                           \
    }

/* PREFIX##_tiles_BITS_RANK for every width, ranks 1 to HELD_RANKS and 0 (any other rank). */
_Static_assert(HELD_RANKS == 4, "the decode products name ranks 1 to 4");
#define RANK_TILES(PREFIX, TARGET, BITS, MOST)                                                                      \
    TILES(PREFIX, TARGET, BITS, 1, MOST)                                                                            \
    TILES(PREFIX, TARGET, BITS, 2, MOST)                                                                            \
    TILES(PREFIX, TARGET, BITS, 3, MOST)                                                                            \
    TILES(PREFIX, TARGET, BITS, 4, MOST)                                                                            \
    TILES(PREFIX, TARGET, BITS, 0, MOST)
RANK_TILES(narrow, , 2, 4)
RANK_TILES(narrow, , 3, 4)
RANK_TILES(narrow, , 4, 4)
RANK_TILES(wide, AVX512, 2, 6)
RANK_TILES(wide, AVX512, 3, 6)
RANK_TILES(wide, AVX512, 4, 6)
#undef RANK_TILES
#undef TILES
#undef ROWS_UP_TO_4
#undef ROWS_UP_TO_6

/* RESULT PREFIX##_tiles_BITS_RANK ARGS for the weight's rank (RESULT: empty, or `status =`). */
#define RANKS(PREFIX, BITS, RESULT, ARGS)                                                                           \
    switch (w->rank) {                                                                                              \
        case 1: RESULT PREFIX##_tiles_##BITS##_1 ARGS; break;                                                       \
        case 2: RESULT PREFIX##_tiles_##BITS##_2 ARGS; break;                                                       \
        case 3: RESULT PREFIX##_tiles_##BITS##_3 ARGS; break;                                                       \
        case 4: RESULT PREFIX##_tiles_##BITS##_4 ARGS; break;                                                       \
        default: RESULT PREFIX##_tiles_##BITS##_0 ARGS; break;                                                      \
    }
/* PREFIX##_decode_product: the variant for the weight's width and rank. */
#define DECODE_DISPATCH(PREFIX, TARGET)                                                                             \
    TARGET static void PREFIX##_decode_product(const lcq_index_weight *w, const float *x, int M, float *y) {        \
        switch (w->bits) {                                                                                          \
            case 2: RANKS(PREFIX, 2, , (w, x, M, y)) break;                                                         \
            case 3: RANKS(PREFIX, 3, , (w, x, M, y)) break;                                                         \
            default: RANKS(PREFIX, 4, , (w, x, M, y)) break;                                                        \
        }                                                                                                           \
    }
DECODE_DISPATCH(narrow, )
DECODE_DISPATCH(wide, AVX512)
#undef DECODE_DISPATCH

/* tops (N, ceil(K / 64)) = the largest |entry| of the codebooks that each block of 64 values along
 * a row meets (all 2^b entries of each): the int8 expansion's scale of the block, found once when a
 * weight is set up (AVX-512 weights). */
AVX512 void lcq_index_block_tops(const void *weight, float *tops) {
    const lcq_index_weight *w = weight;
    const int blocks = lcq_scale_blocks((w->K + 3) / 4), block_values = 4 * LCQ_SCALE_WORDS;
    for (int n = 0; n < w->N; n++) {
        const wide_table table = wide_table_of(w, n, 0);
        float *row = tops + (int64_t)n * blocks;
        for (int b = 0; b < blocks; b++) row[b] = 0.0f;
        for (int j = 0; j < w->groups; j++) {
            const float top = _mm512_reduce_max_ps(_mm512_abs_ps(wide_codebook(w, &table, 0, n, j)));
            const int last = ((j + 1) * w->group_size < w->K ? (j + 1) * w->group_size : w->K) - 1;
            for (int b = j * w->group_size / block_values; b <= last / block_values; b++)
                row[b] = row[b] > top ? row[b] : top;
        }
    }
}

/* A codebook as 16 unsigned bytes q + 128, q = round(entry * inverse): group scales s (rank) and
 * offset, the row's table v (rank x 16). */
LCQ_INT8 static inline __m128i byte_book(const float *s, float offset, const float *v, int rank, float inverse) {
    __m512 book = _mm512_set1_ps(-offset);
    for (int r = 0; r < rank; r++) book = _mm512_fmadd_ps(_mm512_set1_ps(s[r]), _mm512_loadu_ps(v + r * 16), book);
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(book, _mm512_set1_ps(inverse)));
    return _mm512_cvtepi32_epi8(_mm512_add_epi32(q, _mm512_set1_epi32(128)));
}

/* The fields of the 4 steps of a block, as wide_byte_row takes them with vpmultishiftqb: byte u of
 * each 64-bit lane (words 2q and 2q + 1) is field u / 2 of word 2q + u % 2, which starts at bit
 * 32 (u % 2) + BITS (u / 2) of the lane. */
static inline uint64_t step_shifts(int bits) {
    uint64_t shifts = 0;
    for (int u = 0; u < 8; u++) shifts |= (uint64_t)(32 * (u % 2) + bits * (u / 2)) << 8 * u;
    return shifts;
}

/* The fields of `count` whole steps from step `first` (a multiple of 4: a block of 64 values) of a row,
 * unmasked, as vpmultishiftqb takes them out of the run's words with `shifts` (step_shifts): each
 * 64-bit lane holds words 2q and 2q + 1, and its 8 bytes become their fields for the 4 steps; a block
 * that runs into the next run, at 3 bits, takes its later steps from there. */
LCQ_INT8 static inline __attribute__((always_inline)) __m512i block_fields(const int BITS, const lcq_index_weight *w,
                                                                          const uint8_t *row, __m512i shifts,
                                                                          int first, int count) {
    const int fields = 32 / BITS, run = first / fields, field = first % fields;
    __m512i picked =
        _mm512_multishift_epi64_epi8(_mm512_add_epi8(shifts, _mm512_set1_epi8((char)(BITS * field))),
                                     wide_load(row + (int64_t)run * 64, run < w->runs ? 4 : w->last_lane_bytes));
    if (field + count > fields) { /* steps fields - field .. come from the next run */
        const uint64_t later = (0xFFull << 2 * (fields - field) & 0xFF) * 0x0101010101010101ull;
        picked = _mm512_mask_multishift_epi64_epi8(
            picked, later, _mm512_add_epi8(shifts, _mm512_set1_epi8((char)(BITS * (field - fields)))),
            wide_load(row + (int64_t)(run + 1) * 64, run + 1 < w->runs ? 4 : w->last_lane_bytes));
    }
    return picked;
}

/* Byte 16 s + 2 q + p (value 16 s + i of the block, i = 2q + p) is byte 8 q + 2 s + p of those. */
static const uint8_t K_ORDER[64] = {0, 1, 8,  9,  16, 17, 24, 25, 32, 33, 40, 41, 48, 49, 56, 57,
                                    2, 3, 10, 11, 18, 19, 26, 27, 34, 35, 42, 43, 50, 51, 58, 59,
                                    4, 5, 12, 13, 20, 21, 28, 29, 36, 37, 44, 45, 52, 53, 60, 61,
                                    6, 7, 14, 15, 22, 23, 30, 31, 38, 39, 46, 47, 54, 55, 62, 63};

/* Row n in cpu_gemm.c's unsigned int8 form (BITS a constant where inlined), one block of 64 values (4
 * steps) at a time. A block's scale bounds the codebooks of the groups it meets (their 2^b entries,
 * w->tops), whose bytes make its table (a first group in bytes 0-15, a second from the block's middle
 * in 16-31). block_fields takes the block's fields out of the run's words, a ternary-logic op masks
 * them and adds the second group's offset, vpermb looks the 64 up in the table and a second vpermb
 * puts them in K order. inverses: a buffer of one float per block. */
LCQ_INT8 static inline __attribute__((always_inline)) void wide_byte_row(const int BITS, const lcq_index_weight *w,
                                                                         int n, float *inverses, uint32_t *out) {
    const int K = w->K, whole = K / 16 * 16, steps = K / 16, words = (K + 3) / 4;
    const int blocks = lcq_scale_blocks(words), block_values = 4 * LCQ_SCALE_WORDS, group_size = w->group_size;
    const int rank = w->rank;
    const uint8_t *row = w->indices + (int64_t)n * w->row_bytes;
    const float *tops = w->tops + (int64_t)n * blocks, *offsets = w->offsets + (int64_t)n * w->groups;
    const float *scales = w->scales + (int64_t)n * w->groups * rank;
    const float *table_row = w->tables + (int64_t)w->table_index[n] * rank * 16;
    uint8_t *bytes = (uint8_t *)out;
    float *block_scales = (float *)(out + words);
    int32_t *block_offsets = (int32_t *)(out + words + blocks);
    /* The blocks' scales (largest entry / 127) and inverses (127 / largest entry, 0 for 0). */
    for (int b = 0; b < blocks; b += 16) {
        const __mmask16 lanes = blocks - b >= 16 ? 0xFFFF : (__mmask16)((1u << (blocks - b)) - 1);
        const __m512 top = _mm512_maskz_loadu_ps(lanes, tops + b);
        _mm512_mask_storeu_ps(inverses + b, lanes,
                              _mm512_maskz_div_ps(_mm512_cmp_ps_mask(top, _mm512_setzero_ps(), _CMP_GT_OQ),
                                                  _mm512_set1_ps(127.0f), top));
        _mm512_mask_storeu_ps(block_scales + b, lanes, _mm512_div_ps(top, _mm512_set1_ps(127.0f)));
        _mm512_mask_storeu_epi32(block_offsets + b, lanes, _mm512_setzero_si512());
    }
    const __m512i shifts = _mm512_set1_epi64((long long)step_shifts(BITS));
    const __m512i field_mask = _mm512_set1_epi8((1 << BITS) - 1);
    const __m512i order = _mm512_loadu_si512(K_ORDER), later_steps = _mm512_set1_epi64(0x1010101000000000);
    for (int b = 0, group = 0, group_end = group_size; b < blocks; b++) {
        const int k0 = b * block_values;
        while (k0 >= group_end) {
            group++;
            group_end += group_size;
        }
        /* The table: bytes 0-15 the codebook of steps 0 and 1, 16-31 that of steps 2 and 3 (the same,
         * or the next group's from the block's middle). */
        const __m128i book = byte_book(scales + group * rank, offsets[group], table_row, rank, inverses[b]);
        const int second = (k0 + block_values < K ? k0 + block_values : K) > group_end;
        const __m512i table = _mm512_inserti32x4(
            _mm512_castsi128_si512(book),
            second ? byte_book(scales + (group + 1) * rank, offsets[group + 1], table_row, rank, inverses[b]) : book,
            1);
        const int first = 4 * b, count = steps - first < 4 ? steps - first : 4; /* whole steps in the block */
        if (count > 0) {
            const __m512i picked = block_fields(BITS, w, row, shifts, first, count);
            /* (picked & field_mask) | 16 for steps 2 and 3: ternary-logic table 0xEA is (A & B) | C */
            const __m512i entries = _mm512_ternarylogic_epi32(picked, field_mask, later_steps, 0xEA);
            const __m512i values = _mm512_permutexvar_epi8(order, _mm512_permutexvar_epi8(entries, table));
            _mm512_mask_storeu_epi8(bytes + k0, count == 4 ? ~0ull : (1ull << 16 * count) - 1, values);
        }
        if (whole < K && whole >= k0 && whole < k0 + block_values) {
            float tail[16];
            tail_weights(w, n, whole, tail);
            for (int i = whole; i < K; i++) /* rounded to nearest even, as the vector steps are */
                bytes[i] = (uint8_t)(_mm_cvtss_si32(_mm_set_ss(tail[i - whole] * inverses[b])) + 128);
        }
    }
    for (int i = K; i < 4 * words; i++) bytes[i] = 128; /* zeros */
}

/* Rows first .. first + count - 1 in the unsigned int8 form (an lcq_expand_byte_rows). */
LCQ_INT8 static int wide_expand_bytes(const void *weight, int K, int first, int count, uint32_t *out) {
    const lcq_index_weight *w = weight;
    const int row_words = lcq_byte_row_words((K + 3) / 4);
    const int blocks = lcq_scale_blocks((K + 3) / 4);
    float *inverses = malloc(sizeof(float) * (size_t)blocks);
    if (inverses == NULL) return -1;
    for (int n = first; n < first + count; n++) {
        uint32_t *row = out + (int64_t)(n - first) * row_words;
        switch (w->bits) {
            case 2: wide_byte_row(2, w, n, inverses, row); break;
            case 3: wide_byte_row(3, w, n, inverses, row); break;
            default: wide_byte_row(4, w, n, inverses, row); break;
        }
    }
    free(inverses);
    return 0;
}

/* The int8 form of every row of a wide weight as panels (lcq_word_panels: lcq_index_byte_words(N, K)
 * words) into out, for int8 products to read in place of expanding a block of rows per call; returns
 * 0, or -1 for a weight without the form (not wide) or a failed allocation. */
LCQ_INT8 int lcq_index_byte_rows(const void *weight, uint32_t *out) {
    const lcq_index_weight *w = weight;
    if (!w->wide) return -1;
    const int words = lcq_byte_row_words((w->K + 3) / 4);
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        uint32_t *rows = malloc(sizeof(uint32_t) * PACK_BLOCK_ROWS * (size_t)words);
        failed |= rows == NULL;
#pragma omp for schedule(static)
        for (int first = 0; first < w->N; first += PACK_BLOCK_ROWS) {
            const int count = w->N - first < PACK_BLOCK_ROWS ? w->N - first : PACK_BLOCK_ROWS;
            if (rows == NULL || wide_expand_bytes(weight, w->K, first, count, rows) != 0) {
                failed = 1;
                continue;
            }
            lcq_word_panels(rows, count, words, out + (int64_t)first * words);
        }
        free(rows);
    }
    return failed ? -1 : 0;
}

int64_t lcq_index_byte_words(int N, int K) {
    return (int64_t)(N + 31) / 32 * 32 * lcq_byte_row_words((K + 3) / 4);
}

/* Books (N, groups) records of BOOK_BYTES(bits): each group's weight scale, its top (w->tops) as a float,
 * then its codebook in the unsigned bytes of the int8 form, q + 128 with q = round(entry * 127 / top): for
 * group sizes that are multiples of 64, where each block of 64 values lies in one group, the bytes and
 * scale wide_byte_row gives its blocks. One stream of 8 bytes per group at 2 bits, 20 at 4. */
#define BOOK_BYTES(BITS) (4 + (1 << (BITS)))

LCQ_INT8 void lcq_index_byte_books(const void *weight, uint8_t *books) {
    const lcq_index_weight *w = weight;
    const int blocks = lcq_scale_blocks((w->K + 3) / 4), group_blocks = w->group_size / 64;
    for (int n = 0; n < w->N; n++) {
        const float *v = table_row(w, n);
        for (int j = 0; j < w->groups; j++) {
            uint8_t *record = books + ((int64_t)n * w->groups + j) * BOOK_BYTES(w->bits);
            const float top = w->tops[(int64_t)n * blocks + j * group_blocks];
            const __m128i book = byte_book(w->scales + ((int64_t)n * w->groups + j) * w->rank,
                                           w->offsets[(int64_t)n * w->groups + j], v, w->rank,
                                           top > 0.0f ? 127.0f / top : 0.0f);
            memcpy(record, &top, sizeof(float));
            _mm_mask_storeu_epi8(record + sizeof(float), (__mmask16)((1u << (1 << w->bits)) - 1), book);
        }
    }
}

/* The int8 decode product (a weight with books, up to lcq_byte_decode_rows rows, in passes of 4): per
 * block of 64 values the fields of its 4 steps (block_fields), masked, looked up in the group's book by
 * one vpermb, then one vpdpbusd per activation row with the row's bytes, put in the fields' order once
 * per call. Where the fp32 form spends a permute, a shift and an FMA on 16 weights, this spends three
 * operations on 64 and three per activation row, and reads a book in place of S and B. A block's int32
 * sums (started at the activations' offset) become fp32 times the activations' scale into the group's
 * sums, which take the weight's scale when the group ends. The bytes of the int8 blocked product (the
 * activations quantize_row's, the weights' its expansion's), so the same sums but for their order;
 * weights past the last whole step stay fp32, as in the fp32 form. */
#define BYTE_PASS_ROWS 4

/* Activations of an int8 decode product, per row and block: 64 signed bytes in block_fields' order (zero
 * past the last whole step), -128 * their sum (the weights' + 128 cancelled) and their scale / 127 (the
 * weights' 127 cancelled: a book's scale is its top). */
typedef struct {
    int8_t *bytes;
    int32_t *offsets;
    float *scales;
    int blocks;
} byte_activations;

/* Value 16 s + 2 q + p of a block is byte 8 q + 2 s + p of block_fields (K_ORDER's inverse). */
static const uint8_t FIELD_ORDER[64] = {0,  1,  16, 17, 32, 33, 48, 49, 2,  3,  18, 19, 34, 35, 50, 51,
                                        4,  5,  20, 21, 36, 37, 52, 53, 6,  7,  22, 23, 38, 39, 54, 55,
                                        8,  9,  24, 25, 40, 41, 56, 57, 10, 11, 26, 27, 42, 43, 58, 59,
                                        12, 13, 28, 29, 44, 45, 60, 61, 14, 15, 30, 31, 46, 47, 62, 63};

/* Into the calling thread's scratch buffer (lcq_scratch): returns 0, or -1 when it cannot grow. */
LCQ_INT8 static int byte_activations_of(const float *x, int M, int K, byte_activations *a) {
    const int words = (K + 3) / 4, blocks = lcq_scale_blocks(words), whole = K / 16 * 16;
    const size_t row_bytes = (sizeof(uint32_t) * (size_t)lcq_byte_row_words(words) + 63) / 64 * 64;
    const size_t count = (size_t)M * blocks, byte_bytes = 64 * count;
    uint8_t *buffer = lcq_scratch(row_bytes + byte_bytes + (sizeof(int32_t) + sizeof(float)) * count);
    if (buffer == NULL) return -1;
    uint32_t *row = (uint32_t *)buffer;
    a->blocks = blocks;
    a->bytes = (int8_t *)(buffer + row_bytes);
    a->offsets = (int32_t *)(buffer + row_bytes + byte_bytes);
    a->scales = (float *)(a->offsets + count);
    const __m512i order = _mm512_loadu_si512(FIELD_ORDER), ones = _mm512_set1_epi8(1);
    for (int m = 0; m < M; m++) {
        lcq_quantize_row(x + (int64_t)m * K, K, row);
        const float *scales = (const float *)(row + words);
        for (int b = 0; b < blocks; b++) {
            const int64_t at = (int64_t)m * blocks + b;
            const int left = whole - 64 * b <= 0 ? 0 : whole - 64 * b < 64 ? whole - 64 * b : 64;
            const __m512i bytes =
                _mm512_maskz_loadu_epi8(left == 64 ? ~0ull : (1ull << left) - 1, (const int8_t *)row + 64 * b);
            _mm512_storeu_si512(a->bytes + at * 64, _mm512_permutexvar_epi8(order, bytes));
            a->offsets[at] = -128 * _mm512_reduce_add_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, bytes));
            a->scales[at] = scales[b] / 127.0f;
        }
    }
    return 0;
}

/* A column's sums: per activation row all groups' so far and the group's, and the group's book. */
typedef struct {
    __m512 acc[BYTE_PASS_ROWS], group[BYTE_PASS_ROWS]; /* (two chains alternating blocks spilled at 2-4 rows) */
    __m512i table;
    const uint8_t *book; /* the group's record */
    int left;            /* blocks left in the group */
} byte_sums;

/* The group's sums times its weight scale into acc. */
LCQ_INT8 static inline __attribute__((always_inline)) void byte_group_end(const int R, byte_sums *st) {
    const __m512 scale = _mm512_set1_ps(*(const float *)st->book);
    for (int r = 0; r < R; r++) st->acc[r] = _mm512_fmadd_ps(st->group[r], scale, st->acc[r]);
}

/* One block of byte_column (picked: its fields), from activation row m; a new group first ends the last.
 * Each row's sums start at its block offset in lane 0, put there by a zero-masked broadcast: with a
 * masked load of that one lane, the products ran 1.01-1.14x slower at W4 g64 and 1.07-1.42x at W2 g128
 * (two builds alternating, SmolLM2's and Llama 3.2 1B's shapes, 1-2 rows, weights from memory). */
LCQ_INT8 static inline __attribute__((always_inline)) void byte_block(const int R, const int BITS, byte_sums *st,
                                                                      int group_blocks, __m512i picked,
                                                                      const byte_activations *a, int m, int b) {
    if (st->left == 0) {
        if (b > 0) {
            byte_group_end(R, st);
            st->book += BOOK_BYTES(BITS);
        }
        for (int r = 0; r < R; r++) st->group[r] = _mm512_setzero_ps();
        st->table = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(st->book + sizeof(float))));
        st->left = group_blocks;
    }
    st->left--;
    const __m512i weights =
        _mm512_permutexvar_epi8(_mm512_and_si512(picked, _mm512_set1_epi8((1 << BITS) - 1)), st->table);
    for (int r = 0; r < R; r++) {
        const int64_t at = (int64_t)(m + r) * a->blocks + b;
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_maskz_set1_epi32(1, a->offsets[at]), weights,
                                                _mm512_loadu_si512(a->bytes + at * 64));
        st->group[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(a->scales[at]), st->group[r]);
    }
}

/* sums[r][c] and tails[r][c]: column c of a tile (row n) for R activation rows from row m. Whole blocks
 * go a span of runs at a time (one run of 4 blocks at 2 bits, of 2 at 4; two runs of 5 at 3), their
 * fields taken with constant shifts (block_fields per block, its counts and branches, ran at 0.6-0.8x
 * the fp32 form); a last block of 1-3 steps, block_fields. */
LCQ_INT8 static inline __attribute__((always_inline)) void byte_column(const int R, const int BITS,
                                                                       const lcq_index_weight *w, int n,
                                                                       const byte_activations *a, int m,
                                                                       const float *x, __m512 sums[][TILE_COLUMNS],
                                                                       float tails[][TILE_COLUMNS], int c) {
    const int K = w->K, steps = K / 16, whole = steps * 16, blocks = (steps + 3) / 4, group_blocks = w->group_size / 64;
    const int fields = 32 / BITS, span_runs = BITS == 3 ? 2 : 1, span_blocks = span_runs * fields / 4;
    const uint8_t *row = w->indices + (int64_t)n * w->row_bytes;
    const __m512i shifts = _mm512_set1_epi64((long long)step_shifts(BITS));
    byte_sums st;
    st.book = w->books + (int64_t)n * w->groups * BOOK_BYTES(BITS);
    st.left = 0;
    for (int r = 0; r < R; r++) st.acc[r] = st.group[r] = _mm512_setzero_ps();
    st.table = _mm512_setzero_si512();
    const int whole_blocks = steps / 4;
    int b = 0;
    for (int run = 0; b < whole_blocks; run += span_runs) {
        const __m512i first = wide_load(row + (int64_t)run * 64, run < w->runs ? 4 : w->last_lane_bytes);
        const int two = span_runs == 2 && b + 2 < whole_blocks; /* a whole block in the second run */
        const __m512i second =
            two ? wide_load(row + (int64_t)(run + 1) * 64, run + 1 < w->runs ? 4 : w->last_lane_bytes) : first;
#pragma GCC unroll 8 /* whole, so that each block's shifts are constants */
        for (int i = 0; i < span_blocks && b < whole_blocks; i++, b++) {
            const int field = 4 * i % fields, later = 4 * i / fields;
            __m512i picked = _mm512_multishift_epi64_epi8(
                _mm512_add_epi8(shifts, _mm512_set1_epi8((char)(BITS * field))), later ? second : first);
            if (field + 4 > fields) /* at 3 bits: steps fields - field .. from the second run */
                picked = _mm512_mask_multishift_epi64_epi8(
                    picked, (0xFFull << 2 * (fields - field) & 0xFF) * 0x0101010101010101ull,
                    _mm512_add_epi8(shifts, _mm512_set1_epi8((char)(BITS * (field - fields)))), second);
            byte_block(R, BITS, &st, group_blocks, picked, a, m, b);
        }
    }
    for (; b < blocks; b++) {
        const int count = steps - 4 * b < 4 ? steps - 4 * b : 4;
        byte_block(R, BITS, &st, group_blocks, block_fields(BITS, w, row, shifts, 4 * b, count), a, m, b);
    }
    if (blocks > 0) byte_group_end(R, &st);
    for (int r = 0; r < R; r++) {
        sums[r][c] = st.acc[r];
        tails[r][c] = 0.0f;
    }
    if (whole < K) {
        float weights[16];
        tail_weights(w, n, whole, weights);
        for (int k = whole; k < K; k++)
            for (int r = 0; r < R; r++) tails[r][c] += x[(int64_t)(m + r) * K + k] * weights[k - whole];
    }
}

LCQ_INT8 static inline __attribute__((always_inline)) void byte_tile(const int R, const int BITS,
                                                                     const lcq_index_weight *w, int n0, int count,
                                                                     const byte_activations *a, int m, const float *x,
                                                                     float *y) {
    __m512 sums[BYTE_PASS_ROWS][TILE_COLUMNS];
    float tails[BYTE_PASS_ROWS][TILE_COLUMNS];
    for (int c = 0; c < count; c++) byte_column(R, BITS, w, n0 + c, a, m, x, sums, tails, c);
    for (int r = 0; r < R; r++) wide_reduce(sums[r], tails[r], count, y + (int64_t)(m + r) * w->N + n0);
}

#define BYTE_TILES(BITS)                                                                                            \
    LCQ_INT8 static void byte_tiles_##BITS(const lcq_index_weight *w, const byte_activations *a, const float *x,   \
                                           int M, float *y) {                                                       \
        const int tiles = (w->N + TILE_COLUMNS - 1) / TILE_COLUMNS;                                                 \
        const int passes = (M + BYTE_PASS_ROWS - 1) / BYTE_PASS_ROWS;                                               \
        DECODE_TILES for (int t = 0; t < tiles; t++) {                                                              \
            const int n0 = t * TILE_COLUMNS, count = w->N - n0 < TILE_COLUMNS ? w->N - n0 : TILE_COLUMNS;           \
            for (int pass = 0, m = 0; pass < passes; pass++) {                                                      \
                const int rows = M / passes + (pass < M % passes);                                                  \
                switch (rows) {                                                                                     \
                    case 1: byte_tile(1, BITS, w, n0, count, a, m, x, y); break;                                    \
                    case 2: byte_tile(2, BITS, w, n0, count, a, m, x, y); break;                                    \
                    case 3: byte_tile(3, BITS, w, n0, count, a, m, x, y); break;                                    \
                    default: byte_tile(4, BITS, w, n0, count, a, m, x, y); break;                                   \
                }                                                                                                   \
                m += rows;                                                                                          \
            }                                                                                                       \
        }                                                                                                           \
    }
BYTE_TILES(2)
BYTE_TILES(3)
BYTE_TILES(4)
#undef BYTE_TILES

LCQ_INT8 static int byte_decode_product(const lcq_index_weight *w, const float *x, int M, float *y) {
    byte_activations a;
    if (byte_activations_of(x, M, w->K, &a)) return -1;
    switch (w->bits) {
        case 2: byte_tiles_2(w, &a, x, M, y); break;
        case 3: byte_tiles_3(w, &a, x, M, y); break;
        default: byte_tiles_4(w, &a, x, M, y); break;
    }
    return 0;
}

/* What expanding rows first .. first + count - 1 reads, into the stream (an lcq_stream_rows): their
 * indices, S, B, table rows and block scales (the tables are a layer's few hundred bytes). */
static void stream_index_rows(const void *weight, int K, int first, int count, lcq_line_stream *stream) {
    const lcq_index_weight *w = weight;
    const int64_t entries = (int64_t)w->groups * w->rank;
    lcq_stream_add(stream, w->indices + (int64_t)first * w->row_bytes, (int64_t)count * w->row_bytes);
    lcq_stream_add(stream, w->scales + first * entries, sizeof(float) * count * entries);
    lcq_stream_add(stream, w->offsets + (int64_t)first * w->groups, sizeof(float) * count * w->groups);
    lcq_stream_add(stream, w->table_index + first, sizeof(int32_t) * count);
    if (w->tops != NULL) {
        const int blocks = lcq_scale_blocks((K + 3) / 4);
        lcq_stream_add(stream, w->tops + (int64_t)first * blocks, sizeof(float) * count * blocks);
    }
}

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
#define PAIR_MIN_ROWS 5
_Static_assert(PAIR_MIN_ROWS >= 4, "wide_pair_tiles_* take passes of 4 to 8 rows");

/* sums[r][c] and tails[r][c]: column c of a tile (row n) for R activation rows, as bf16 pairs (row
 * stride K2) and, for the scalar tail, fp32 (x). */
LCQ_BF16 static inline __attribute__((always_inline)) void wide_pair_column(
    const int R, const int BITS, const int RANK, const lcq_index_weight *w, int n, const uint32_t *pairs, int K2,
    const float *x, __m512 sums[][TILE_COLUMNS], float tails[][TILE_COLUMNS], int c) {
    const int K = w->K, whole = K / 16 * 16, fields = 32 / BITS;
    const uint8_t *row = w->indices + (int64_t)n * w->row_bytes;
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

LCQ_BF16 static int wide_pair_decode_product(const lcq_index_weight *w, const float *x, int M, float *y) {
    int status = 0;
    switch (w->bits) {
        case 2: RANKS(wide_pair, 2, status = , (w, x, M, y)) break;
        case 3: RANKS(wide_pair, 3, status = , (w, x, M, y)) break;
        default: RANKS(wide_pair, 4, status = , (w, x, M, y)) break;
    }
    return status;
}

/* x (M, K) fp32 contiguous, M >= 1; y (M, N) fp32, or with swiglu (W = [gate; up]) y (M, N / 2) =
 * silu(gate) * up (cpu_gemm.h). Returns 0, or -1 when M < 1 or a buffer cannot be allocated. */
int lcq_index_matmul(const float *x, int M, const void *weight, int swiglu, float *y) {
    const lcq_index_weight *w = weight;
    if (M < 1 || (swiglu && w->N % 2)) return -1;
    const int kept = w->byte_rows != NULL ? LCQ_INT8_PRODUCTS : LCQ_FP32_PRODUCTS;
    const int bytes = w->books != NULL && M <= lcq_byte_decode_rows(kept);
    if (!bytes && M >= lcq_gemm_min_rows(kept)) {
        const lcq_expansions expansions = {w->wide ? wide_expand : narrow_expand, NULL,
                                           w->wide ? wide_expand_bytes : NULL, stream_index_rows, w->byte_rows, NULL};
        return lcq_expanded_product(x, M, w->K, w->N, &expansions, w, swiglu, y);
    }
    float *products = lcq_swiglu_products(swiglu, M, w->N, y);
    int status = 0;
    if (products == NULL)
        status = -1;
    else if (bytes)
        status = byte_decode_product(w, x, M, products);
    else if (w->wide && M >= PAIR_MIN_ROWS && lcq_bf16_products())
        status = wide_pair_decode_product(w, x, M, products);
    else if (w->wide)
        wide_decode_product(w, x, M, products);
    else
        narrow_decode_product(w, x, M, products);
    return lcq_swiglu_finish(swiglu, products, M, w->N, y, status);
}
