/* Prefill attention over the paged KV cache on x86 CPUs (AVX2, FMA, F16C): many new tokens per sequence, bounded
 * by arithmetic: flash-attention tiles of up to QUERY_ROWS query rows (positions x the heads of one kv head)
 * against chunks of KEYS keys (LONG_QUERY_ROWS and LONG_KEYS for long contexts' bf16 products), both products
 * on the register tile of cpu_gemm.h, with the softmax carried across chunks (running maximum and sum per row).
 * Where the calling thread's products are bf16 (lcq_bf16_products), it stages keys, values, queries and softmax
 * weights as bf16 pairs for the bf16 tile (on AMX tiles where the CPU has them); scores, the softmax and outputs
 * stay fp32. Caches are read where they lie (cpu_attention.h).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_attention.h"
#include "cpu_constant.h"
#include "cpu_gemm.h"

/* Keys per chunk (a multiple of 16). 32 against 16 (fp16 cache, bf16 products, 2 threads, the builds
 * alternating): 8 prompts of 16-256 tokens 1.07x, 4 of 256 1.10x, one of 2,048 1.17x, of 4,000 1.17x,
 * 16 of 16-64 0.96x (the last chunk reaches further past a short prompt's diagonal); 64: 1.0x, 1.02x,
 * 1.19x, 1.20x and 0.79x. */
#define KEYS 32
#define QUERY_ROWS 48  /* query rows per prefill task (about 16 positions of a 3-head GQA group; 24 and 96 did alike) */
/* Keys per chunk and query rows per task of calls whose products are bf16 and where a tiled sequence's
 * context reaches LONG_CONTEXT tokens (chunk_keys). Each chunk costs every row a running-softmax update
 * (its maximum and sum reduced, its outputs rescaled) and every tile a round of AMX tile loads and stores:
 * one prompt of 4,096 tokens on the Xeon (SmolLM2's heads, fp16 cache, 2 threads) 47 -> 31 ms a layer with
 * 128 keys (64: 28 with the short exp), 1.07x more with 96 rows, whose tasks read each staged chunk once
 * for twice the rows. 128 keys lost on the 64-request workload's prompts of 16-256 tokens (the diagonal's
 * chunk mostly past the rows), and on the fp32 tiles everywhere but long prompts, which keep 32. One prompt
 * alone, 128 keys against 32: 128 tokens 0.82x, 256 0.9x, 384 1.17-1.22x, 512 1.26-1.30x, 768 1.3-1.4x;
 * LONG_CONTEXT leaves a margin for the short prompts that share a call with a long context. */
#define LONG_KEYS 128
#define LONG_QUERY_ROWS 96
#define LONG_CONTEXT 512

/* Stage one chunk of `keys` keys of kv head `kv` of a sequence for the prefill products, as fp32 (int8
 * rows times their scales):
 * K transposed, kt[i][t] (head_dim x keys), and V, vp[t][i] (keys x padded_dim); keys past
 * `count` and columns past head_dim are zeros. */
static inline __attribute__((always_inline)) void stage_chunk(const int FORM, const void *k_cache, const void *v_cache,
                                                              const int32_t *table, int first_key, int count, int kv,
                                                              int64_t row, int head_dim, int padded_dim,
                                                              int block_size, int keys, float *kt, float *vp) {
    for (int i = 0; i < head_dim * keys; i++) kt[i] = 0.0f;
    for (int i = 0; i < keys * padded_dim; i++) vp[i] = 0.0f;
    for (int t = 0; t < count; t++) {
        const int key = first_key + t;
        const int64_t at = ((int64_t)table[key / block_size] * block_size + key % block_size) * row +
                           (int64_t)kv * lcq_cache_head_stride(FORM, head_dim);
        const float k_factor = row_factor(FORM, k_cache, at, head_dim);
        const float v_factor = row_factor(FORM, v_cache, at, head_dim);
        for (int i = 0; i < head_dim; i++) {
            kt[i * keys + t] = load1(FORM, k_cache, at + i) * k_factor;
            vp[t * padded_dim + i] = load1(FORM, v_cache, at + i) * v_factor;
        }
    }
}

/* The first n of 16 lanes (none for n <= 0). */
static inline __mmask16 first_lanes(int n) {
    return n <= 0 ? 0 : n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
}

/* `count` (up to 16) cache values from element i as fp32 times `factor`, zeros after. */
LCQ_BF16 static inline __attribute__((always_inline)) __m512 load16(const int FORM, const void *cache, int64_t i,
                                                                    int count, float factor) {
    const __mmask16 mask = first_lanes(count);
    __m512 values;
    if (FORM == LCQ_CACHE_INT8)
        values = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, (const int8_t *)cache + i)));
    else if (FORM == LCQ_CACHE_FP16)
        values = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)cache + i));
    else
        values = _mm512_maskz_loadu_ps(mask, (const float *)cache + i);
    return FORM == LCQ_CACHE_INT8 ? _mm512_mul_ps(values, _mm512_set1_ps(factor)) : values;
}

/* stage_chunk for bf16 products, in chunks of `keys` (KEYS or LONG_KEYS): K as pairs along the head,
 * kt[j][t] = (k[t][2j], k[t][2j + 1]) (head_dim / 2 x keys), and V as pairs along the keys, vp[u][i] =
 * (v[2u][i], v[2u + 1][i]) (keys / 2 x padded_dim); zeros past `count` and head_dim. head_dim is even.
 * Rounded to nearest even 32 values at a time (vcvtne2ps2bf16), each K row's pairs stored as a row, then
 * transposed 16 x 16 words at a time; V's two keys interleaved by one permute. Against element by element
 * (the same values; two builds alternating in one process, SmolLM2's heads, fp16 cache, 2 threads, Zen 4):
 * 64 prompts of 16-256 tokens 1.06-1.13x, 16 of 16-64 1.12-1.22x, 4 of 256 1.11x, one of 2,048 1.02-1.03x. */
LCQ_BF16 static inline __attribute__((always_inline)) void stage_pairs(const int FORM, const void *k_cache,
                                                                       const void *v_cache, const int32_t *table,
                                                                       int first_key, int count, int kv, int64_t row,
                                                                       int head_dim, int padded_dim, int block_size,
                                                                       int keys, uint32_t *kt, uint32_t *vp) {
    const int words = head_dim / 2;
    uint32_t k_rows[keys * words]; /* row t: key t's pairs */
    int64_t at[LONG_KEYS];         /* each key's head row in the caches */
    for (int t = 0; t < count; t++) {
        const int key = first_key + t;
        at[t] = ((int64_t)table[key / block_size] * block_size + key % block_size) * row +
                (int64_t)kv * lcq_cache_head_stride(FORM, head_dim);
        const float factor = row_factor(FORM, k_cache, at[t], head_dim);
        for (int j = 0; j < words; j += 16) {
            const __m512 low = load16(FORM, k_cache, at[t] + 2 * j, head_dim - 2 * j, factor);
            const __m512 high = load16(FORM, k_cache, at[t] + 2 * j + 16, head_dim - 2 * j - 16, factor);
            _mm512_mask_storeu_epi32(k_rows + t * words + j, first_lanes(words - j),
                                     (__m512i)_mm512_cvtne2ps_pbh(high, low));
        }
    }
    for (int t = 0; t < keys; t += 16)
        for (int j = 0; j < words; j += 16)
            lcq_transpose_words(k_rows + t * words + j, words, count - t < 0 ? 0 : count - t < 16 ? count - t : 16,
                                words - j < 16 ? words - j : 16, kt + (int64_t)j * keys + t, keys);
    /* bf16 i of the two keys' (i of the first, 16 + i of the second) as word i */
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int u = 0; u < keys / 2; u++) {
        const int first = 2 * u, second = 2 * u + 1;
        const float first_factor = first < count ? row_factor(FORM, v_cache, at[first], head_dim) : 0.0f;
        const float second_factor = second < count ? row_factor(FORM, v_cache, at[second], head_dim) : 0.0f;
        for (int i = 0; i < padded_dim; i += 16) {
            const int present = head_dim - i;
            const __m512 a = load16(FORM, v_cache, first < count ? at[first] + i : 0, first < count ? present : 0,
                                    first_factor);
            const __m512 b = load16(FORM, v_cache, second < count ? at[second] + i : 0,
                                    second < count ? present : 0, second_factor);
            _mm512_storeu_si512(vp + (int64_t)u * padded_dim + i,
                                _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(b, a)));
        }
    }
}

/* stage_pairs in the cache's form. */
LCQ_BF16 static void stage_pair_chunk(int form, const void *k_cache, const void *v_cache, const int32_t *table,
                                      int first_key, int count, int kv, int64_t row, int head_dim, int padded_dim,
                                      int block_size, int keys, uint32_t *kt, uint32_t *vp) {
#define STAGE_PAIRS(FORM)                                                                                       \
    stage_pairs(FORM, k_cache, v_cache, table, first_key, count, kv, row, head_dim, padded_dim, block_size, keys, kt, \
                vp)
    LCQ_CACHE_FORMS(form, STAGE_PAIRS)
#undef STAGE_PAIRS
}

/* The per-thread buffers of a prefill task. */
typedef struct {
    float *queries; /* (rows, head_dim), scaled; bf16: (rows, head_dim / 2) pairs */
    float *scores;  /* (rows, keys): scores, then (fp32 tiles) their softmax weights */
    uint32_t *weights; /* bf16: (rows, keys / 2) pairs of softmax weights */
    float *outputs; /* (rows, padded_dim): unnormalised outputs */
    float *top;     /* (rows): running maximum score of each row */
    float *total;   /* (rows): running sum of exp(score - top) */
} Tile;

/* c (R, 16) = or += a (R, K) @ b (K, 16). Inlined with R a constant: the accumulators stay in registers. */
static inline __attribute__((always_inline)) void row_tile(const int R, const float *a, int64_t lda, const float *b,
                                                           int64_t ldb, int K, float *c, int64_t ldc, int accumulate) {
    __m256 acc[LCQ_TILE_ROWS][2];
    lcq_tile_sums(R, 2, a, lda, b, ldb, K, acc, NULL);
    for (int r = 0; r < R; r++)
        for (int v = 0; v < 2; v++) {
            float *out = c + r * ldc + 8 * v;
            _mm256_storeu_ps(out, accumulate ? _mm256_add_ps(_mm256_loadu_ps(out), acc[r][v]) : acc[r][v]);
        }
}

/* c (rows, 16 * panels) = or += a (rows, K) @ b (K, 16 * panels), LCQ_TILE_ROWS rows at a time. */
static void tile_product(const float *a, int64_t lda, const float *b, int64_t ldb, int K, int rows, int panels,
                         float *c, int64_t ldc, int accumulate) {
    for (int p = 0; p < panels; p++)
        for (int r0 = 0; r0 < rows; r0 += LCQ_TILE_ROWS) {
#define TILE(R) row_tile(R, a + r0 * lda, lda, b + 16 * p, ldb, K, c + r0 * ldc + 16 * p, ldc, accumulate)
            switch (rows - r0 < LCQ_TILE_ROWS ? rows - r0 : LCQ_TILE_ROWS) {
                LCQ_CASES_1_TO_5(TILE)
                default: TILE(LCQ_TILE_ROWS); break;
            }
#undef TILE
        }
}

/* The bf16 forms of row_tile and tile_product: a and b bf16 pairs (K pairs deep, strides in pairs),
 * c (rows, 16 * vectors) fp32, two vectors of 16 columns at a time. */
LCQ_BF16 static inline __attribute__((always_inline)) void pair_row_tile(const int R, const int V, const uint32_t *a,
                                                                         int64_t lda, const uint32_t *b, int64_t ldb,
                                                                         int K, float *c, int64_t ldc, int accumulate) {
    __m512 acc[LCQ_TILE_ROWS][2];
    lcq_pair_sums(R, V, a, lda, b, ldb, K, acc, NULL);
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) {
            float *out = c + r * ldc + 16 * v;
            _mm512_storeu_ps(out, accumulate ? _mm512_add_ps(_mm512_loadu_ps(out), acc[r][v]) : acc[r][v]);
        }
}

LCQ_BF16 static void pair_tile_product(const uint32_t *a, int64_t lda, const uint32_t *b, int64_t ldb, int K, int rows,
                                       int vectors, float *c, int64_t ldc, int accumulate) {
    for (int v0 = 0; v0 < vectors; v0 += 2)
        for (int r0 = 0; r0 < rows; r0 += LCQ_TILE_ROWS) {
#define TILE(R) pair_row_tile(R, V, a + r0 * lda, lda, b + 16 * v0, ldb, K, c + r0 * ldc + 16 * v0, ldc, accumulate)
#define ROWS(V_)                                                                                               \
    {                                                                                                          \
        const int V = V_;                                                                                      \
        switch (rows - r0 < LCQ_TILE_ROWS ? rows - r0 : LCQ_TILE_ROWS) {                                       \
            LCQ_CASES_1_TO_5(TILE)                                                                             \
            default: TILE(LCQ_TILE_ROWS); break;                                                               \
        }                                                                                                      \
    }
            if (vectors - v0 >= 2) ROWS(2) else ROWS(1)
#undef ROWS
#undef TILE
        }
}

/* pair_tile_product, or its AMX form (amx: the thread configured its tiles for the queries' depth). bf16
 * products of the whole 16 x 64 x 16 tiles: prompts of 2,048 tokens (SmolLM2's heads, fp16 cache, 2 threads)
 * ran 2.1x faster (see cpu_amx.c). */
LCQ_BF16 static void pairs_product(int amx, const uint32_t *a, int64_t lda, const uint32_t *b, int64_t ldb, int K,
                                   int rows, int vectors, float *c, int64_t ldc, int accumulate) {
    if (amx)
        lcq_amx_pair_product(a, lda, b, ldb, K, rows, vectors, c, ldc, accumulate);
    else
        pair_tile_product(a, lda, b, ldb, K, rows, vectors, c, ldc, accumulate);
}

/* Fold a chunk's scores into the running softmax of each row: row r (at position first_position +
 * r / group) sees the chunk's keys up to its position and below `count`, and with a sliding window
 * or attention chunks (window != 0: window_start) none before its window's or chunk's first; its
 * scores become weights exp(score - top), and its outputs and total are rescaled to the new top. fp32
 * tiles only, whose chunks are always of KEYS keys (chunk_keys). */
static void softmax_chunk(Tile *tile, int rows, int group, int first_position, int first_key, int count, int window,
                          float softcap, int padded_dim) {
    for (int r = 0; r < rows; r++) {
        const int position = first_position + r / group;
        const int visible = position - first_key + 1 < count ? position - first_key + 1 : count;
        const int before = window_start(position + 1, window) - first_key, hidden = before > 0 ? before : 0;
        float *s = tile->scores + r * KEYS;
        if (visible <= hidden) { /* the whole chunk lies after this row's position or before its window */
            for (int t = 0; t < KEYS; t++) s[t] = 0.0f;
            continue;
        }
        if (softcap > 0.0f) cap_scores(s + hidden, visible - hidden, softcap);
        for (int t = 0; t < hidden; t++) s[t] = -INFINITY;
        for (int t = visible; t < KEYS; t++) s[t] = -INFINITY;
        __m256 values[KEYS / 8], largest = _mm256_set1_ps(-INFINITY), sums = _mm256_setzero_ps();
        for (int i = 0; i < KEYS / 8; i++) largest = _mm256_max_ps(largest, values[i] = _mm256_loadu_ps(s + 8 * i));
        const float previous = tile->top[r], chunk_top = max8(largest);
        const float top = chunk_top > previous ? chunk_top : previous;
        const __m256 shift = _mm256_set1_ps(top);
        for (int i = 0; i < KEYS / 8; i++) { /* masked keys (-inf, or NaN where all are) give exp8's 0 */
            const __m256 e = exp8(_mm256_sub_ps(values[i], shift));
            _mm256_storeu_ps(s + 8 * i, e);
            sums = _mm256_add_ps(sums, e);
        }
        const float sum = sum8(sums);
        if (top > previous) { /* rescale what earlier chunks gave (nothing before the first) */
            const float factor = previous == -INFINITY ? 0.0f : exp1(previous - top);
            float *out = tile->outputs + (int64_t)r * padded_dim;
            for (int i = 0; i < padded_dim; i++) out[i] *= factor;
            tile->total[r] *= factor;
            tile->top[r] = top;
        }
        tile->total[r] += sum;
    }
}

/* Memory of tiles a thread asks for into L2 while it computes another: the next tile's query rows and its
 * own tile's output rows, `positions` runs of `bytes` bytes `stride` bytes apart in each range, `per_step`
 * lines per step (a step per query row of each chunk's softmax). Both are read or written once per tile,
 * rows of one position but apart from the next position's, and came from memory or the L3 as the tile
 * began and ended: a fifth of prefill attention's samples at 64 prompts of 16-256 tokens. */
#define TILE_RANGES 2
typedef struct {
    const char *start[TILE_RANGES];
    int64_t stride[TILE_RANGES];
    int lines[TILE_RANGES], positions[TILE_RANGES];
    int ranges, range, position, line, per_step;
} tile_lines;

static void tile_lines_add(tile_lines *stream, const float *first, int64_t stride, int64_t bytes, int positions) {
    const uintptr_t at = (uintptr_t)first;
    stream->start[stream->ranges] = (const char *)(at & ~(uintptr_t)63);
    stream->stride[stream->ranges] = stride * (int64_t)sizeof(float);
    stream->lines[stream->ranges] = (int)(((int64_t)(at & 63) + bytes + 63) / 64);
    stream->positions[stream->ranges++] = positions;
}

static inline __attribute__((always_inline)) void tile_lines_step(tile_lines *stream) {
    for (int i = 0; i < stream->per_step && stream->range < stream->ranges; i++) {
        _mm_prefetch(stream->start[stream->range] + stream->position * stream->stride[stream->range] +
                         64 * stream->line, _MM_HINT_T1);
        if (++stream->line < stream->lines[stream->range]) continue;
        stream->line = 0;
        if (++stream->position < stream->positions[stream->range]) continue;
        stream->position = 0;
        stream->range++;
    }
}

/* The lanes t of 16 with low <= t < high. */
static inline __mmask16 lanes_between(int low, int high) {
    return (__mmask16)(first_lanes(high) & ~first_lanes(low));
}

/* softmax_chunk for bf16 products and chunks of CHUNK keys, in 16 lanes, each row's weights rounded straight
 * to its pairs in tile->weights (fp32 weights were stored, then read back and rounded by lcq_round_pairs per
 * row), by exp16_weights: the weights are bf16 at once, so its 2 ulp do not show in them, and the totals move
 * by as little. Inlined with CHUNK a constant (softmax_pairs): a row's chunk of scores stays in registers. */
LCQ_BF16 static inline __attribute__((always_inline)) void softmax_pair_rows(const int CHUNK, Tile *tile, int rows,
                                                                            int group, int first_position,
                                                                            int first_key, int count, int window,
                                                                            float softcap, int padded_dim,
                                                                            tile_lines *stream) {
    for (int r = 0; r < rows; r++) {
        tile_lines_step(stream);
        const int position = first_position + r / group;
        const int visible = position - first_key + 1 < count ? position - first_key + 1 : count;
        const int before = window_start(position + 1, window) - first_key, hidden = before > 0 ? before : 0;
        float *s = tile->scores + r * CHUNK;
        __m512i *weights = (__m512i *)(tile->weights + r * CHUNK / 2);
        if (visible <= hidden) { /* the whole chunk lies after this row's position or before its window */
            for (int i = 0; i < CHUNK / 32; i++) _mm512_storeu_si512(weights + i, _mm512_setzero_si512());
            continue;
        }
        if (softcap > 0.0f) cap_scores(s + hidden, visible - hidden, softcap);
        __m512 values[CHUNK / 16], largest = _mm512_set1_ps(-INFINITY);
        if (hidden == 0 && visible == CHUNK) /* every key seen: a chunk inside the rows' windows */
            for (int i = 0; i < CHUNK / 16; i++)
                largest = _mm512_max_ps(largest, values[i] = _mm512_loadu_ps(s + 16 * i));
        else /* unseen keys -inf */
            for (int i = 0; i < CHUNK / 16; i++) {
                const __mmask16 seen = lanes_between(hidden - 16 * i, visible - 16 * i);
                values[i] = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), seen, s + 16 * i);
                largest = _mm512_max_ps(largest, values[i]);
            }
        const float previous = tile->top[r], chunk_top = _mm512_reduce_max_ps(largest);
        const float top = chunk_top > previous ? chunk_top : previous;
        __m512 sums = _mm512_setzero_ps();
        for (int i = 0; i < CHUNK / 16; i++) { /* unseen keys (-inf) and NaN give 0 */
            values[i] = exp16_weights(values[i], top);
            sums = _mm512_add_ps(sums, values[i]);
        }
        for (int i = 0; i < CHUNK / 32; i++)
            _mm512_storeu_si512(weights + i, (__m512i)_mm512_cvtne2ps_pbh(values[2 * i + 1], values[2 * i]));
        if (top > previous) { /* rescale what earlier chunks gave (nothing before the first) */
            const float factor = previous == -INFINITY ? 0.0f : exp1(previous - top);
            float *out = tile->outputs + (int64_t)r * padded_dim;
            for (int i = 0; i < padded_dim; i += 16)
                _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_loadu_ps(out + i), _mm512_set1_ps(factor)));
            tile->total[r] *= factor;
            tile->top[r] = top;
        }
        tile->total[r] += _mm512_reduce_add_ps(sums);
    }
}

/* softmax_pair_rows for the call's chunks of `keys` (KEYS or LONG_KEYS). */
LCQ_BF16 static void softmax_pairs(int keys, Tile *tile, int rows, int group, int first_position, int first_key,
                                   int count, int window, float softcap, int padded_dim, tile_lines *stream) {
    if (keys == LONG_KEYS)
        softmax_pair_rows(LONG_KEYS, tile, rows, group, first_position, first_key, count, window, softcap, padded_dim,
                          stream);
    else
        softmax_pair_rows(KEYS, tile, rows, group, first_position, first_key, count, window, softcap, padded_dim,
                          stream);
}

/* The sequence s with base[s] <= item < base[s + 1] (base: seqs + 1 ascending counts from 0). */
static int sequence_of(const int64_t *base, int seqs, int64_t item) {
    int low = 0, high = seqs - 1;
    while (low < high) {
        const int mid = (low + high + 1) / 2;
        if (base[mid] <= item) low = mid; else high = mid - 1;
    }
    return low;
}

/* A prefill call's inputs and layout (see lcq_prefill_attention). Sequences of more than one new
 * token are tiled: chunk_base[s] counts the key chunks staged before sequence s, task_base[s] its
 * first task (one per kv head and tile of positions_per_tile positions; a single new token is one
 * task of the decode form). */
typedef struct {
    const float *q;
    int64_t q_stride;
    const void *k_cache, *v_cache;
    int cache_form;
    const int32_t *block_tables, *context_lens, *query_start;
    int max_blocks, heads, kv_heads, head_dim, block_size, group, positions_per_tile, padded_dim, tile_rows;
    float scale, softcap, *out; /* softcap: 0, or the scores' cap (cap_scores) */
    const float *sinks; /* (heads): attention sinks (sink_share), or NULL */
    int window; /* a sliding window's positions, or 0 */
    int64_t row, chunk_floats; /* elements per cache slot; 4-byte words per staged chunk of one kv head (K, V) */
    int64_t *chunk_base, *task_base;
    int pairs; /* bf16 products: chunks, queries and weights staged as bf16 pairs */
    int amx;   /* with pairs, products on AMX tiles (lcq_amx_pair_product): tile buffers of whole 16 rows */
    int keys;  /* keys per staged chunk: KEYS, or LONG_KEYS (chunk_keys) */
    int tile_every_query; /* a sequence's single new token tiled too, not the decode form (lcq_prefill_attention) */
} Prefill;

/* Whether sequence s's new tokens are tiled (several of them, or one where every query is): else its one new
 * token takes the decode form. */
static int tiled(const Prefill *p, int s) {
    const int n = p->query_start[s + 1] - p->query_start[s];
    return n > 1 || (n == 1 && p->tile_every_query);
}

/* The first chunk of keys any new token of sequence s sees: chunks before it lie before every new
 * token's sliding window, and are neither staged nor read. */
static int first_seen_chunk(const Prefill *p, int s) {
    const int n = p->query_start[s + 1] - p->query_start[s];
    return window_start(p->context_lens[s] - n + 1, p->window) / p->keys;
}

/* Task `local` of tiled sequence s: one kv head's query rows of one tile over the staged chunks
 * (staged: this group's buffer, from sequence first_seq on). */
/* Where task `local` of tiled sequence s lies: its first new token (from the sequence's first), its
 * positions and its kv head. A kv head's tasks follow each other, longest tiles first, so that a thread's
 * next task reads the chunks its last one read, from its L2 (one prompt of 4,096 tokens with SmolLM2's
 * heads: a kv head's chunks 1 MB, all three 3 MB; 1.07-1.10x against the kv heads taken in turn). */
static void tile_place(const Prefill *p, int s, int64_t local, int *first, int *positions, int *kv) {
    const int n = p->query_start[s + 1] - p->query_start[s];
    const int tiles = (n + p->positions_per_tile - 1) / p->positions_per_tile;
    *kv = (int)(local / tiles);
    *first = (tiles - 1 - (int)(local % tiles)) * p->positions_per_tile;
    *positions = n - *first < p->positions_per_tile ? n - *first : p->positions_per_tile;
}

/* Task `local` of tiled sequence s (staged: this group's buffer, from sequence first_seq on); the thread's
 * next task is task next_local of tiled sequence next_s (-1: none, or not a tile), whose queries it asks
 * for as it goes (tile_lines). */
static void attend_tile(const Prefill *p, Tile *tile, const float *staged, int first_seq, int s, int64_t local,
                        int next_s, int64_t next_local) {
    const int n = p->query_start[s + 1] - p->query_start[s], length = p->context_lens[s], group = p->group;
    int first, positions, kv;
    tile_place(p, s, local, &first, &positions, &kv);
    const int rows = positions * group, first_position = length - n + first, head_dim = p->head_dim;
    const int pairs = p->pairs, depth = pairs ? head_dim / 2 : head_dim; /* per query row, in words */
    const int keys = p->keys;
    uint32_t *query_pairs = (uint32_t *)tile->queries;
    for (int r = 0; r < rows; r++) {
        const float *src = p->q + (int64_t)(p->query_start[s] + first + r / group) * p->q_stride +
                           (int64_t)(kv * group + r % group) * head_dim;
        float *scaled = pairs ? tile->outputs + (int64_t)r * p->padded_dim : tile->queries + r * head_dim; /* zeroed below */
        for (int i = 0; i < head_dim; i++) scaled[i] = src[i] * p->scale;
        if (pairs) lcq_round_pairs(scaled, head_dim, query_pairs + r * depth);
        tile->top[r] = -INFINITY;
        tile->total[r] = 0.0f;
    }
    for (int64_t i = 0; i < (int64_t)rows * p->padded_dim; i++) tile->outputs[i] = 0.0f;
    /* where chunk 0 would lie in `staged` (the chunks before the first one seen are not staged) */
    const int64_t first_chunk = p->chunk_base[s] - p->chunk_base[first_seq] - first_seen_chunk(p, s);
    const int lowest = window_start(first_position + 1, p->window); /* the first key of the tile's first row */
    const int64_t group_bytes = (int64_t)group * head_dim * sizeof(float), out_stride = (int64_t)p->heads * head_dim;
    tile_lines stream = {0};
    tile_lines_add(&stream, p->out + ((int64_t)(p->query_start[s] + first) * p->heads + kv * group) * head_dim,
                   out_stride, group_bytes, positions);
    if (next_s >= 0) {
        int next_first, next_positions, next_kv;
        tile_place(p, next_s, next_local, &next_first, &next_positions, &next_kv);
        tile_lines_add(&stream, p->q + (int64_t)(p->query_start[next_s] + next_first) * p->q_stride +
                                    (int64_t)next_kv * group * head_dim, p->q_stride, group_bytes, next_positions);
    }
    const int chunks = (first_position + positions - 1) / keys - lowest / keys + 1;
    int64_t lines = 0;
    for (int i = 0; i < stream.ranges; i++) lines += (int64_t)stream.lines[i] * stream.positions[i];
    stream.per_step = (int)((lines + (int64_t)rows * chunks - 1) / ((int64_t)rows * chunks));
    for (int first_key = lowest / keys * keys; first_key <= first_position + positions - 1; first_key += keys) {
        const float *kt = staged + ((first_chunk + first_key / keys) * p->kv_heads + kv) * p->chunk_floats;
        const int count = length - first_key < keys ? length - first_key : keys;
        if (pairs)
            pairs_product(p->amx, query_pairs, depth, (const uint32_t *)kt, keys, depth, rows, keys / 16, tile->scores,
                          keys, 0);
        else
            tile_product(tile->queries, head_dim, kt, keys, head_dim, rows, keys / 16, tile->scores, keys, 0);
        if (pairs) {
            softmax_pairs(keys, tile, rows, group, first_position, first_key, count, p->window, p->softcap,
                          p->padded_dim, &stream);
            pairs_product(p->amx, tile->weights, keys / 2, (const uint32_t *)kt + (int64_t)depth * keys,
                          p->padded_dim, keys / 2, rows, p->padded_dim / 16, tile->outputs, p->padded_dim, 1);
        } else {
            softmax_chunk(tile, rows, group, first_position, first_key, count, p->window, p->softcap, p->padded_dim);
            tile_product(tile->scores, keys, kt + (int64_t)head_dim * keys, p->padded_dim, keys, rows,
                         p->padded_dim / 16, tile->outputs, p->padded_dim, 1);
        }
    }
    for (int r = 0; r < rows; r++) {
        float *dst = p->out + ((int64_t)(p->query_start[s] + first + r / group) * p->heads + kv * group + r % group) *
                              head_dim;
        const float inverse = 1.0f / (tile->total[r] + sink_share(p->sinks, kv * group + r % group, tile->top[r]));
        for (int i = 0; i < head_dim; i++) dst[i] = tile->outputs[(int64_t)r * p->padded_dim + i] * inverse;
    }
}

/* Sequences first .. last - 1: stage their chunks into `staged`, then run their tasks. Returns 0, or
 * -1 when a buffer cannot be allocated. */
static int attend_sequences(const Prefill *p, int first, int last, float *staged) {
    const int64_t *chunk_base = p->chunk_base + first, *task_base = p->task_base + first;
    const int seqs = last - first;
    int failed = 0;
    int64_t claimed = task_base[0]; /* the next task no thread has claimed */
#pragma omp parallel reduction(| : failed)
    {
#pragma omp for schedule(dynamic, 4)
        for (int64_t item = 0; item < (chunk_base[seqs] - chunk_base[0]) * p->kv_heads; item++) {
            const int64_t chunk = item / p->kv_heads + chunk_base[0];
            const int s = first + sequence_of(chunk_base, seqs, chunk);
            const int first_key = (int)(chunk - p->chunk_base[s] + first_seen_chunk(p, s)) * p->keys;
            const int length = p->context_lens[s];
            const int count = length - first_key < p->keys ? length - first_key : p->keys;
            float *kt = staged + item * p->chunk_floats;
#define STAGE(FUNCTION, FORM, TYPE, DEPTH)                                                                     \
    FUNCTION(FORM, p->k_cache, p->v_cache, p->block_tables + (int64_t)s * p->max_blocks, first_key, count,        \
             (int)(item % p->kv_heads), p->row, p->head_dim, p->padded_dim, p->block_size, p->keys, (TYPE *)kt,    \
             (TYPE *)kt + (int64_t)(DEPTH) * p->keys)
#define STAGE_FLOATS(FORM) STAGE(stage_chunk, FORM, float, p->head_dim)
            if (p->pairs) {
                STAGE(stage_pair_chunk, p->cache_form, uint32_t, p->head_dim / 2);
            } else {
                LCQ_CACHE_FORMS(p->cache_form, STAGE_FLOATS)
            }
#undef STAGE_FLOATS
#undef STAGE
        }
        /* rows rounded up to whole AMX tiles, zeros to begin with (tiles read rows past a task's) */
        const int rows = (p->tile_rows + LCQ_AMX_ROWS - 1) / LCQ_AMX_ROWS * LCQ_AMX_ROWS;
        Tile tile = {lcq_aligned_zeros((size_t)rows * p->head_dim), lcq_aligned_zeros((size_t)rows * p->keys),
                     lcq_aligned_zeros((size_t)rows * p->keys / 2), lcq_aligned_zeros((size_t)rows * p->padded_dim),
                     malloc(sizeof(float) * rows), malloc(sizeof(float) * rows)};
        const int ready = tile.queries && tile.scores && tile.weights && tile.outputs && tile.top && tile.total;
        if (!ready) failed = 1;
        if (p->amx) lcq_amx_configure(p->head_dim / 2);
        /* tasks claimed one ahead from a shared counter, so that a tile can ask for the next one's queries */
        int64_t next = __atomic_fetch_add(&claimed, 1, __ATOMIC_RELAXED);
        while (next < task_base[seqs]) {
            const int64_t task = next;
            next = __atomic_fetch_add(&claimed, 1, __ATOMIC_RELAXED);
            if (!ready) continue;
            const int s = first + sequence_of(task_base, seqs, task);
            const int start = p->query_start[s];
            if (!tiled(p, s)) { /* one new token: the decode form, all heads */
                const int length = p->context_lens[s], begin = window_start(length, p->window);
                const int skipped = begin / p->block_size * p->block_size; /* the blocks before the window's */
                if (lcq_attend_task(p->cache_form, p->q + start * p->q_stride, p->k_cache, p->v_cache,
                                    p->block_tables + (int64_t)s * p->max_blocks + begin / p->block_size,
                                    begin - skipped, length - skipped, NULL, 0,
                                    p->out + (int64_t)start * p->heads * p->head_dim, NULL, p->heads, 0, p->group,
                                    p->row, p->head_dim, p->block_size, p->scale, p->softcap, p->sinks))
                    failed = 1;
                continue;
            }
            const int next_s = next < task_base[seqs] ? first + sequence_of(task_base, seqs, next) : -1;
            const int next_tiled = next_s >= 0 && tiled(p, next_s);
            attend_tile(p, &tile, staged, first, s, task - p->task_base[s], next_tiled ? next_s : -1,
                        next_tiled ? next - p->task_base[next_s] : 0);
        }
        if (p->amx) lcq_amx_release();
        free(tile.queries);
        free(tile.scores);
        free(tile.weights);
        free(tile.outputs);
        free(tile.top);
        free(tile.total);
    }
    return failed ? -1 : 0;
}

/* Keys per staged chunk for a call: LONG_KEYS where its products are bf16 and the context of a sequence with
 * several new tokens reaches LONG_CONTEXT, else KEYS (the fp32 tiles' softmax_chunk takes KEYS only). */
static int chunk_keys(int pairs, const int32_t *context_lens, const int32_t *query_start, int seqs) {
    for (int s = 0; pairs && s < seqs; s++)
        if (query_start[s + 1] - query_start[s] > 1 && context_lens[s] >= LONG_CONTEXT) return LONG_KEYS;
    return KEYS;
}

/* Causal attention of a prefill step's new tokens. Sequence s has n = query_start[s + 1] -
 * query_start[s] new tokens, already written into the caches at positions context_lens[s] - n
 * onwards; each sees the cache positions up to its own, or with a sliding window (window > 0) the
 * last `window` of those, with chunks (window < 0) those of its own chunk; softcap > 0 caps the
 * scores (cap_scores); sinks (heads), or NULL: each head's attention sink (sink_share), added where a
 * task normalises its rows. q: (tokens, heads, head_dim) with q_stride floats between tokens; out:
 * (tokens, heads, head_dim) contiguous. Every kv head's chunks of keys from the first that a new
 * token sees are staged once as fp32 (K transposed), then tasks of up to QUERY_ROWS query rows run
 * over them from the chunk where their first row's window begins;
 * sequences of one new token take the decode form, unless tile_every_query: then they are tiled too, so that
 * a query's values do not depend on how many new tokens its sequence has in the call (each row is summed
 * over the same chunks of keys in the same order whatever rows share its tile: a batch-invariant engine's
 * prefill and decode steps alike). Sequences whose staged chunks would pass
 * stage_limit floats are staged and attended a group at a time (each group within the limit, or one
 * sequence), so that many sequences with long cached prefixes do not stage all their keys at once.
 * Returns 0, -1 when a buffer cannot be allocated, -2 for a sequence with more new tokens than
 * tokens in its context, LCQ_NO_BLOCK when a table entry it would read is not a block (blocks_present). */
int lcq_prefill_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int cache_form,
                          const int32_t *block_tables, int max_blocks, const int32_t *context_lens,
                          const int32_t *query_start, float *out, int seqs, int heads, int kv_heads, int head_dim,
                          int block_size, float scale, float softcap, int window, int64_t stage_limit,
                          const float *sinks, int tile_every_query) {
    /* (every query tiled: fp32 chunks of KEYS, whose length does not follow the call's contexts) */
    const int padded_dim = (head_dim + 15) / 16 * 16, pairs = lcq_bf16_products() && head_dim % 2 == 0 &&
                                                              !tile_every_query;
    const int keys = chunk_keys(pairs, context_lens, query_start, seqs);
    const int group = heads / kv_heads, query_rows = keys == LONG_KEYS ? LONG_QUERY_ROWS : QUERY_ROWS;
    const int positions_per_tile = query_rows / group > 0 ? query_rows / group : 1;
    const int64_t chunk_words = (int64_t)head_dim * keys + keys * padded_dim; /* fp32 values, or half as many pairs */
    Prefill p = {q, q_stride, k_cache, v_cache, cache_form, block_tables, context_lens, query_start, max_blocks,
                 heads, kv_heads, head_dim, block_size, group, positions_per_tile, padded_dim,
                 positions_per_tile * group, scale, softcap, out, sinks, window,
                 (int64_t)kv_heads * lcq_cache_head_stride(cache_form, head_dim),
                 pairs ? chunk_words / 2 : chunk_words, malloc(sizeof(int64_t) * (seqs + 1)),
                 malloc(sizeof(int64_t) * (seqs + 1)), pairs, pairs && lcq_amx_on(), keys, tile_every_query};
    int status = p.chunk_base == NULL || p.task_base == NULL ? -1 : 0;
    if (status == 0) {
        p.chunk_base[0] = p.task_base[0] = 0;
        for (int s = 0; s < seqs && status == 0; s++) {
            const int n = query_start[s + 1] - query_start[s], length = context_lens[s];
            if (n > length || n < 0) status = -2;
            const int tiles = tiled(&p, s);
            const int from = tiles ? first_seen_chunk(&p, s) * keys : window_start(length, window);
            if (status == 0 && !blocks_present(block_tables + (int64_t)s * max_blocks, max_blocks, from, length,
                                               block_size))
                status = LCQ_NO_BLOCK;
            p.chunk_base[s + 1] = p.chunk_base[s] + (tiles ? (length + keys - 1) / keys - first_seen_chunk(&p, s) : 0);
            p.task_base[s + 1] = p.task_base[s] + (tiles ? (int64_t)(n + positions_per_tile - 1) / positions_per_tile *
                                                               kv_heads : n);
        }
    }
    const int64_t floats_per_chunk = kv_heads * p.chunk_floats;
    float *staged = NULL;
    for (int first = 0, last; status == 0 && first < seqs; first = last) {
        for (last = first + 1; last < seqs; last++) /* the group: at least one sequence, within the limit */
            if ((p.chunk_base[last + 1] - p.chunk_base[first]) * floats_per_chunk > stage_limit) break;
        if (staged == NULL) { /* once, for the largest group: the limit, or one sequence past it */
            int64_t largest = 0;
            for (int s = 0; s < seqs; s++)
                if (p.chunk_base[s + 1] - p.chunk_base[s] > largest) largest = p.chunk_base[s + 1] - p.chunk_base[s];
            const int64_t size = largest * floats_per_chunk > stage_limit ? largest * floats_per_chunk : stage_limit;
            const int64_t needed = p.chunk_base[seqs] * floats_per_chunk < size ? p.chunk_base[seqs] * floats_per_chunk
                                                                                  : size;
            staged = (float *)lcq_aligned_words((size_t)(needed + 1));
            if (staged == NULL) {
                status = -1;
                break;
            }
        }
        status = attend_sequences(&p, first, last, staged);
    }
    free(staged);
    free(p.chunk_base);
    free(p.task_base);
    return status;
}
