/* Decode attention over the paged KV cache on x86 CPUs (AVX2, FMA, F16C): one new token per sequence, fp32
 * arithmetic over caches read where they lie (cpu_attention.h). It is bounded by reading the cache and converting
 * it: each K and V row is read from memory once for all query heads of its kv head, and loaded and converted once
 * per pass of up to three of them (attend_task), scores 8 rows at a time, the blocks ahead asked for as it goes.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_attention.h"
#include "cpu_constant.h"

/* The cache lines of one block a decode task reads later, asked for into L2 `per_step` lines at a time
 * (ask_lines) as the task's passes go (stream_block_rows). A range and a cursor the compiler keeps in
 * registers: cpu_gemm.h's lcq_line_stream, several ranges in arrays, stored and reloaded its position
 * every step (a tenth of the samples in a decode step's attention, hot or cold). With this, in one
 * process alternating with that build, 30 layers' caches from memory, 2 threads on a Zen 4, the same
 * outputs: fp16, 16 sequences of 1,400-1,600 tokens 1.07-1.09x, 64 of 16-300 1.04-1.05x; int8 1.03x. */
typedef struct {
    const char *next, *end;
    int per_step;
} block_lines;

static inline __attribute__((always_inline)) void ask_lines(block_lines *lines) {
    if (lines == NULL) return;
    for (int i = 0; i < lines->per_step && lines->next < lines->end; i++, lines->next += 64)
        _mm_prefetch(lines->next, _MM_HINT_T1);
}

#define MAX_GROUP 3 /* query heads of a GQA group scored in one pass over the rows (attend_task) */

/* The 8 horizontal sums of a[0..7] as one vector: three rounds of pairwise adds, then the halves. */
static inline __m256 sums8(const __m256 *a) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* scores[g][t] = scale * (query g . key row t) for G query heads (queries head_dim apart, scores
 * score_stride apart) and `count` cache rows from element `first` (row stride `stride`; int8 rows
 * times their scales; `readable` rows lie there, count or more): 8 rows at a time, each row's
 * products summed across the head in its own register and the 8 sums reduced together (one
 * horizontal sum per row cost more than the products). Each key vector is loaded and converted
 * once for the G heads. Inlined with G and FORM constants: 8 x G accumulators, so G > 1 needs
 * AVX-512's 32 registers. The lines ahead (or NULL) are asked for a step per 8 rows. */
static inline __attribute__((always_inline)) void score_rows(const int G, const int FORM, const float *query,
                                                             const void *cache, int64_t first, int64_t stride,
                                                             int count, int readable, int head_dim, float scale,
                                                             float *scores, int64_t score_stride,
                                                             block_lines *stream) {
    const int vectors = head_dim / 8;
    int t = 0;
    for (; t < count && t + 8 <= readable; t += 8) {
        ask_lines(stream);
        /* 8 rows even past `count` (a sequence's last block), within the `readable` rows of its block:
         * the lanes of rows past `count` are not stored (a row per lane, so they touch no other) */
        const __m256i stored =
            _mm256_cmpgt_epi32(_mm256_set1_epi32(count - t), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 acc[MAX_GROUP][8];
        for (int g = 0; g < G; g++)
            for (int j = 0; j < 8; j++) acc[g][j] = _mm256_setzero_ps();
        for (int d = 0; d < vectors; d++) {
            __m256 q[MAX_GROUP];
            for (int g = 0; g < G; g++) q[g] = _mm256_loadu_ps(query + g * head_dim + 8 * d);
            for (int j = 0; j < 8; j++) {
                const __m256 key = load8(FORM, cache, first + (t + j) * stride + 8 * d);
                for (int g = 0; g < G; g++) acc[g][j] = _mm256_fmadd_ps(q[g], key, acc[g][j]);
            }
        }
        float factors[8];
        if (FORM == LCQ_CACHE_INT8)
            for (int j = 0; j < 8; j++) factors[j] = row_factor(FORM, cache, first + (t + j) * stride, head_dim);
        for (int g = 0; g < G; g++) {
            __m256 sums = sums8(acc[g]);
            for (int i = 8 * vectors; i < head_dim; i++) { /* head sizes that are not a multiple of 8 */
                float tail[8];
                for (int j = 0; j < 8; j++)
                    tail[j] = query[g * head_dim + i] * load1(FORM, cache, first + (t + j) * stride + i);
                sums = _mm256_add_ps(sums, _mm256_loadu_ps(tail));
            }
            if (FORM == LCQ_CACHE_INT8) sums = _mm256_mul_ps(sums, _mm256_loadu_ps(factors));
            const __m256 scaled = _mm256_mul_ps(sums, _mm256_set1_ps(scale));
            if (count - t >= 8) /* AMD microcodes vmaskmovps stores: whole 8s alone gave 1.07-1.28x */
                _mm256_storeu_ps(scores + g * score_stride + t, scaled);
            else
                _mm256_maskstore_ps(scores + g * score_stride + t, stored, scaled);
        }
    }
    for (; t < count; t++) /* rows of a block of fewer than 8 past the last 8 */
        for (int g = 0; g < G; g++) {
            float sum = 0.0f;
            for (int i = 0; i < head_dim; i++)
                sum += query[g * head_dim + i] * load1(FORM, cache, first + t * stride + i);
            scores[g * score_stride + t] = sum * row_factor(FORM, cache, first + t * stride, head_dim) * scale;
        }
}

/* out[g][0 .. V*8) += sum over `count` cache rows t from element `first` of weights[g][t] * row t for
 * G heads (weights weight_stride apart, outputs head_dim apart), the G x V output vectors held in
 * registers over all rows and each row vector loaded once (int8 rows' scales are in the weights:
 * attend_task). Inlined with G, V and FORM constants. The lines ahead (or NULL): a step per row. */
static inline __attribute__((always_inline)) void weigh_rows(const int G, const int V, const int FORM,
                                                             const float *weights, int64_t weight_stride,
                                                             const void *cache, int64_t first, int64_t stride,
                                                             int count, float *out, int head_dim,
                                                             block_lines *stream) {
    __m256 acc[MAX_GROUP][8];
    for (int g = 0; g < G; g++)
        for (int v = 0; v < V; v++) acc[g][v] = _mm256_loadu_ps(out + g * head_dim + 8 * v);
    for (int t = 0; t < count; t++) {
        ask_lines(stream);
        __m256 weight[MAX_GROUP];
        for (int g = 0; g < G; g++) weight[g] = _mm256_broadcast_ss(weights + g * weight_stride + t);
        for (int v = 0; v < V; v++) {
            const __m256 value = load8(FORM, cache, first + t * stride + 8 * v);
            for (int g = 0; g < G; g++) acc[g][v] = _mm256_fmadd_ps(weight[g], value, acc[g][v]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int v = 0; v < V; v++) _mm256_storeu_ps(out + g * head_dim + 8 * v, acc[g][v]);
}

/* out[g] (head_dim) += sum over rows of weights[g][t] * row t for G heads: the head in pieces of up
 * to 8 vectors (64 values) in registers, then the values past the last whole vector. */
static inline __attribute__((always_inline)) void weigh_head(const int G, const int FORM, const float *weights,
                                                             int64_t weight_stride, const void *cache, int64_t first,
                                                             int64_t stride, int count, int head_dim, float *out,
                                                             block_lines *stream) {
#define WEIGH(V) weigh_rows(G, V, FORM, weights, weight_stride, cache, first + i, stride, count, out + i, head_dim, \
                            stream)
    int i = 0;
    for (; i + 64 <= head_dim; i += 64) WEIGH(8);
    switch ((head_dim - i) / 8) {
        LCQ_CASES_1_TO_7(WEIGH)
        default: break;
    }
#undef WEIGH
    for (i += (head_dim - i) / 8 * 8; i < head_dim; i++)
        for (int g = 0; g < G; g++)
            for (int t = 0; t < count; t++)
                out[g * head_dim + i] += weights[g * weight_stride + t] * load1(FORM, cache, first + t * stride + i);
}

/* Blocks a decode task asks for ahead of reading them. Its blocks lie anywhere in the pool and, read
 * cold (as each layer's cache is in a decode step), a block's rows otherwise came a few misses at a
 * time. Caches evicted before each call, two interleaved runs: 64 sequences of 16-300 tokens
 * 1.10-1.43x, of 1,000 1.18-1.51x, 8 of 8,000 1.18-1.55x (the larger gains with fp16 caches); 2 and 8
 * blocks ahead did alike; asking for the whole sequence at the start gained less and lost on 8,000
 * tokens (past L2). The stream does not stop at the end of a pass: the last K blocks ask for the
 * first V blocks, and the last V blocks for the first K blocks of the task the thread takes next
 * (64 sequences of 16-300 tokens, fp16 cache from memory, 2 threads, alternating with the builds
 * before: 1.09x for the first, 1.22-1.26x with both). A block's prefetches are issued a part per kv
 * head, before that head's pass: a burst of a whole block's lines (96 at SmolLM2's shape) filled the
 * core's miss buffers and stalled the thread until memory answered, so compute and memory took turns
 * (cpu_gemm.h's stream spreads the blocked product's prefetches for the same reason). 30 layers'
 * caches of 64 sequences of 16-300 tokens, fp16, 2 threads, four rounds alternating with the build
 * before: 1.23-1.38x with score_rows' plain stores, 12.2-14.6 ms a step; prefetching every other line
 * lost, parts of a few rows each did not gain. */
#define PREFETCH_BLOCKS 4

/* Ask for part `part` of `parts` of block `block`'s rows of `cache` to be brought into L2, of each row
 * the `width` elements from `offset`: the task's kv heads. (A task of one kv head, as with fewer than
 * WHOLE_ROW_MIN_SEQS sequences, used to ask for every head's rows, into its own core's L2: in one
 * process alternating with that build, 30 layers' fp16 caches, one sequence of 3,000 tokens 1.21-1.40x,
 * 4 of 500-600 1.36x, whole rows (16 and 64 sequences) alike, the same outputs.) Nothing for a NULL
 * cache. always_inline: as a function of its own GCC finds it free of side effects (prefetches only)
 * and drops the call. */
static inline __attribute__((always_inline)) void prefetch_part(const void *cache, int element, const int32_t *table,
                                                                int block, int block_size, int64_t row,
                                                                int64_t offset, int64_t width, int part, int parts) {
    if (cache == NULL) return;
    const char *rows = (const char *)cache + (int64_t)table[block] * block_size * row * element;
    for (int t = block_size * part / parts; t < block_size * (part + 1) / parts; t++) {
        const uintptr_t first = (uintptr_t)(rows + (t * row + offset) * element);
        for (uintptr_t line = first & ~(uintptr_t)63; line < first + width * element; line += 64)
            _mm_prefetch((const char *)line, _MM_HINT_T1);
    }
}

/* The lines of block `block` of `cache` (none for NULL), whose rows a task reads whole (all kv heads: with
 * WHOLE_ROW_MIN_SEQS sequences or WHOLE_ROW_MIN_BLOCKS blocks or more): asked for `steps` times in even
 * parts by the passes over the block before it, a part per 8 key rows scored or per value row weighed.
 * Against a part per kv head before its pass (prefetch_part; the lines of 5-6 rows at once), which filled
 * the core's 16 miss buffers and stalled it until memory answered: 30 layers' fp16 caches from memory, 2
 * threads on a Xeon with AMX, alternating builds: 64 sequences of 16-300 tokens 1.09-1.15x, 16 of
 * 900-1,100 tokens 1.12-1.25x (13.5 -> 14.7 GB/s of cache at 100-350 tokens). */
static inline __attribute__((always_inline)) block_lines stream_block_rows(const void *cache, int element,
                                                                           const int32_t *table, int block,
                                                                           int block_size, int64_t row, int steps) {
    block_lines lines = {0};
    if (cache == NULL || steps <= 0) return lines;
    const int64_t bytes = (int64_t)block_size * row * element;
    const uintptr_t start = (uintptr_t)cache + (uintptr_t)((int64_t)table[block] * bytes);
    lines.next = (const char *)(start & ~(uintptr_t)63);
    lines.end = (const char *)(start + bytes);
    lines.per_step = (int)(((lines.end - lines.next + 63) / 64 + steps - 1) / steps);
    return lines;
}

/* A task of lcq_decode_attention: the query heads first_head .. first_head + task_heads - 1 of one
 * sequence (whole GQA groups, from kv head first_kv) over the positions skip .. length - 1 of the
 * blocks in `table` (skip > 0 where a sliding window begins inside the first block: its rows before
 * the window are not read; the thread's next task reads `next_length` tokens through `next_table`), a
 * block at a time: each block's K rows give all heads' scores, and after the softmax each block's V
 * rows are weighed into all heads' outputs (an int8 cache: each weight times its V row's scale
 * first). The heads of a GQA group go through the rows PASS at a time (each row loaded and converted
 * once per pass). sinks: the task's heads' attention sinks (sink_share), or NULL for none or for a task
 * that is one part of a context (combine_parts adds them). Inlined with FORM and PASS constants. */
static inline __attribute__((always_inline)) int attend_task(const int FORM, const int PASS, const float *queries,
                                                             const void *k_cache, const void *v_cache,
                                                             const int32_t *table, int skip, int length,
                                                             const int32_t *next_table, int next_length,
                                                             float *outputs, float *stats, int task_heads,
                                                             int first_kv, int group, int64_t row, int head_dim,
                                                             int block_size, float scale, float softcap,
                                                             const float *sinks) {
    const int head_stride = lcq_cache_head_stride(FORM, head_dim);
    for (int i = 0; i < task_heads * head_dim; i++) outputs[i] = 0.0f;
    if (length <= 0) return 0; /* a padding sequence: zeros */
    const int span = length - skip; /* scores per head */
    float *scores = malloc(sizeof(float) * (size_t)span * task_heads);
    if (scores == NULL) return -1;
    const int64_t offset = (int64_t)first_kv * head_stride;
    const int element = lcq_cache_element_bytes(FORM), blocks = (length + block_size - 1) / block_size;
    const int next_blocks = (next_length + block_size - 1) / block_size;
/* CALL(G, h, kv) for each pass of G heads (a constant) from head h of the task, of its kv head kv. */
#define HEAD_PASSES(CALL)                                                                                       \
    for (int h = 0; h < task_heads;) {                                                                          \
        const int kv = h / group, left = (kv + 1) * group - h;                                                  \
        switch (PASS == 1 || left == 1 ? 1 : PASS == 2 || left == 2 ? 2 : 3) {                                  \
            case 1: CALL(1, h, kv); h += 1; break;                                                              \
            case 2: CALL(2, h, kv); h += 2; break;                                                              \
            default: CALL(3, h, kv); h += 3; break;                                                             \
        }                                                                                                       \
    }
    const int task_kv = task_heads / group; /* a block ahead is asked for a part per kv head */
    const int64_t task_width = (int64_t)task_kv * head_stride; /* the task's elements of a row */
    const int whole_rows = task_width == row; /* blocks ahead through a stream (stream_block_rows) */
/* Part kv of block `block` of `cache` (through `blocks_at`), asked for by the first pass of kv head kv. */
#define PREFETCH_AHEAD(h, kv, cache, blocks_at, block)                                                          \
    if ((h) % group == 0)                                                                                       \
    prefetch_part(cache, element, blocks_at, block, block_size, row, offset, task_width, kv, task_kv)
    for (int b = 0; b < PREFETCH_BLOCKS && b < blocks; b++)
        prefetch_part(k_cache, element, table, b, block_size, row, offset, task_width, 0, 1);
/* The rows of the block from position `start` that the task reads: `count` from element `first`, their
 * scores from index `at` of each head's. */
#define BLOCK_ROWS(start)                                                                                       \
    const int skipped = (start) ? 0 : skip, at = (start) + skipped - skip;                                      \
    const int count = ((start) + block_size < length ? (start) + block_size : length) - (start) - skipped;      \
    const int64_t first = ((int64_t)table[(start) / block_size] * block_size + skipped) * row + offset
    for (int start = 0; start < length; start += block_size) { /* block by block: no division per token */
        BLOCK_ROWS(start);
        const int ahead = start / block_size + PREFETCH_BLOCKS; /* K blocks, then V blocks */
        const void *ahead_cache = ahead < blocks ? k_cache : ahead - blocks < blocks ? v_cache : NULL;
        const int ahead_block = ahead < blocks ? ahead : ahead - blocks;
        block_lines stream = stream_block_rows(whole_rows ? ahead_cache : NULL, element, table, ahead_block,
                                               block_size, row, task_kv * ((count + 7) / 8));
#define SCORE(G, h, kv)                                                                                         \
    if (!whole_rows) PREFETCH_AHEAD(h, kv, ahead_cache, table, ahead_block);                                    \
    score_rows(G, FORM, queries + (h) * head_dim, k_cache, first + (kv) * head_stride, row, count,              \
               block_size - skipped, head_dim, scale, scores + (int64_t)(h) * span + at, span,                  \
               (h) % group == 0 ? &stream : NULL)
        HEAD_PASSES(SCORE)
#undef SCORE
    }
    for (int h = 0; h < task_heads; h++) {
        float *p = scores + (int64_t)h * span, top = -INFINITY, total = 0.0f;
        if (softcap > 0.0f) cap_scores(p, span, softcap);
        __m256 tops = _mm256_set1_ps(-INFINITY);
        int t = 0;
        for (; t + 8 <= span; t += 8) tops = _mm256_max_ps(tops, _mm256_loadu_ps(p + t));
        top = max8(tops);
        for (; t < span; t++) top = p[t] > top ? p[t] : top;
        __m256 sums = _mm256_setzero_ps();
        t = 0;
        for (; t + 8 <= span; t += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), _mm256_set1_ps(top)));
            _mm256_storeu_ps(p + t, e);
            sums = _mm256_add_ps(sums, e);
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, sums);
        for (int i = 0; i < 8; i++) total += lanes[i];
        for (; t < span; t++) total += (p[t] = exp1(p[t] - top));
        const float inverse = 1.0f / (total + sink_share(sinks, h, top));
        for (t = 0; t < span; t++) p[t] *= inverse;
        if (stats != NULL) { /* the softmax's largest score and sum, for combining with other parts */
            stats[2 * h] = top;
            stats[2 * h + 1] = total;
        }
    }
    for (int start = 0; start < length; start += block_size) {
        BLOCK_ROWS(start);
        const int ahead = start / block_size + PREFETCH_BLOCKS; /* V blocks, then the next task's K blocks */
        const void *ahead_cache = ahead < blocks ? v_cache : ahead - blocks < next_blocks ? k_cache : NULL;
        const int32_t *ahead_table = ahead < blocks ? table : next_table;
        const int ahead_block = ahead < blocks ? ahead : ahead - blocks;
        if (FORM == LCQ_CACHE_INT8)
            for (int h = 0; h < task_heads; h++)
                for (int t = 0; t < count; t++)
                    scores[(int64_t)h * span + at + t] *=
                        row_factor(FORM, v_cache, first + (h / group) * head_stride + t * row, head_dim);
        block_lines stream = stream_block_rows(whole_rows ? ahead_cache : NULL, element, ahead_table, ahead_block,
                                               block_size, row, task_kv * count * ((head_dim + 63) / 64));
#define WEIGH_HEADS(G, h, kv)                                                                                   \
    if (!whole_rows) PREFETCH_AHEAD(h, kv, ahead_cache, ahead_table, ahead_block);                              \
    weigh_head(G, FORM, scores + (int64_t)(h) * span + at, span, v_cache, first + (kv) * head_stride, row, count, \
               head_dim, outputs + (int64_t)(h) * head_dim, (h) % group == 0 ? &stream : NULL)
        HEAD_PASSES(WEIGH_HEADS)
#undef WEIGH_HEADS
    }
#undef BLOCK_ROWS
#undef HEAD_PASSES
#undef PREFETCH_AHEAD
    free(scores);
    return 0;
}

/* attend_task for any cache form, heads one at a time (AVX2: 16 registers) or three at a time
 * (AVX-512's 32 registers, of which a pass of 3 heads takes 24 accumulators). Against one at a time,
 * with the same results: 64 sequences of 16-300 tokens with SmolLM2's 9 query and 3 kv heads of 64
 * 1.07-1.09x with an fp16 cache, 1.15-1.19x with int8, 16 sequences of 1,000-1,100 tokens 1.09x
 * (caches from memory, two builds alternating on a 2-core Zen 4); heads of 128 in groups of 4 and 7
 * 1.01-1.03x, where reading the cache bounds it. An fp32 cache has no conversion to share and ran
 * 0.90-1.0x: it keeps passes of one head. */
#define ATTEND_FORMS(ATTR, NAME, PASS)                                                                          \
    ATTR static int NAME(int form, const float *queries, const void *k_cache, const void *v_cache,              \
                         const int32_t *table, int skip, int length, const int32_t *next_table,                 \
                         int next_length, float *outputs, float *stats, int task_heads, int first_kv, int group, \
                         int64_t row, int head_dim, int block_size, float scale, float softcap,                 \
                         const float *sinks) {                                                                  \
        const int pass = PASS;                                                                                  \
        int status = 0;                                                                                         \
        LCQ_CACHE_FORMS(form, ATTEND)                                                                           \
        return status;                                                                                          \
    }
#define ATTEND(FORM)                                                                                            \
    status = attend_task(FORM, FORM == LCQ_CACHE_FP32 ? 1 : pass, queries, k_cache, v_cache, table, skip, length,  \
                         next_table, next_length, outputs, stats, task_heads, first_kv, group, row, head_dim,     \
                         block_size, scale, softcap, sinks)
ATTEND_FORMS(, attend_narrow, 1)
ATTEND_FORMS(__attribute__((target("avx512f,avx512vl"))), attend_wide, 3)
#undef ATTEND
#undef ATTEND_FORMS

static int wide_attention; /* lcq_use_wide_attention */

/* attend_task in the form this CPU and the caller chose (lcq_use_wide_attention); cpu_attention.h. */
int lcq_attend_task(int form, const float *queries, const void *k_cache, const void *v_cache, const int32_t *table,
                    int skip, int length, const int32_t *next_table, int next_length, float *outputs, float *stats,
                    int task_heads, int first_kv, int group, int64_t row, int head_dim, int block_size, float scale,
                    float softcap, const float *sinks) {
    return (wide_attention ? attend_wide : attend_narrow)(form, queries, k_cache, v_cache, table, skip, length,
                                                          next_table, next_length, outputs, stats, task_heads,
                                                          first_kv, group, row, head_dim, block_size, scale, softcap,
                                                          sinks);
}

/* Whether decode attention takes heads three at a time (AVX-512; the caller asks where the CPU has
 * it and it is not turned off): returns the setting now in force. */
int lcq_use_wide_attention(int wanted) {
    __builtin_cpu_init();
    wide_attention = wanted && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
    return wide_attention;
}

/* From this many sequences a task takes all kv heads of a sequence, so each cache row is read whole,
 * front to back, rather than one kv head's slice per task (64 sequences of 300 tokens, SmolLM2's 3 kv
 * heads, cache from memory, 2 threads: 4.7 -> 2.9 ms per layer). Fewer sequences are split by kv
 * head too, to keep every thread busy, and their contexts in parts of CHUNK_BLOCKS blocks: at batch 1
 * SmolLM2's 3 kv heads were 3 tasks for 2 threads, one thread doing two of them. With parts (caches
 * from memory, the builds alternating): one sequence of 2,000-6,000 tokens 1.13-1.17x (fp16 and int8
 * caches), 2 of ~550 1.05x, one of 3,000 with 32 query and 8 kv heads of 128 1.10x.
 * From WHOLE_ROW_MIN_BLOCKS blocks in all, fewer sequences' tasks read whole rows too, their contexts
 * in parts sized for about PARTS_PER_THREAD tasks a thread (MIN_PART_BLOCKS to CHUNK_BLOCKS blocks; so
 * a sequence's outputs, which its parts round, also depend on the threads and the other sequences, as
 * they did on whether there were WHOLE_ROW_MIN_SEQS). Against kv heads' slices in parts of 32 blocks
 * (30 layers' caches from memory, 2 threads on a Zen 4, two builds alternating in one process): fp16,
 * one sequence of 1,500 tokens 1.14-1.17x, of 3,000 1.09-1.12x, 2 of 500-600 1.08x, 4 of 500-600
 * 1.11x, 4 of 2,000 1.09-1.12x; int8, one of 1,500 1.18x, 2 of 2,000 1.28x; Llama 3.2 1B's heads (32
 * and 8 of 128), one of 3,000 1.19x. Below it whole rows lost (one sequence of 120-300 tokens 0.75-0.98x
 * in parts of 4-16 blocks, its few tasks each waiting on its first blocks), as did parts sized by each
 * sequence alone (8 a sequence: 7 sequences of 100-300 tokens 0.91x). */
#define WHOLE_ROW_MIN_SEQS 8
#define WHOLE_ROW_MIN_BLOCKS 64
#define PARTS_PER_THREAD 4
#define MIN_PART_BLOCKS 4
#define CHUNK_BLOCKS 32

/* out (heads, head_dim) of a task's query heads from `count` parts of their context, each part
 * (`stride` floats apart) heads x head_dim normalized outputs, then each head's largest score and
 * softmax sum: each part weighed by its sum times exp(its largest score - the largest of all). sinks:
 * these heads' attention sinks, added to the whole context's sum (sink_share), or NULL. */
static void combine_parts(const float *parts, int count, int64_t stride, int heads, int head_dim,
                          const float *sinks, float *out) {
    for (int h = 0; h < heads; h++) {
        const float *stats = parts + (int64_t)heads * head_dim + 2 * h;
        float top = -INFINITY, total = 0.0f;
        for (int c = 0; c < count; c++) top = fmaxf(top, stats[c * stride]);
        for (int i = 0; i < head_dim; i++) out[h * head_dim + i] = 0.0f;
        for (int c = 0; c < count; c++) {
            const float weight = stats[c * stride + 1] * exp1(stats[c * stride] - top);
            total += weight;
            for (int i = 0; i < head_dim; i++) out[h * head_dim + i] += weight * parts[c * stride + h * head_dim + i];
        }
        total += sink_share(sinks, h, top);
        for (int i = 0; i < head_dim; i++) out[h * head_dim + i] /= total;
    }
}

/* How lcq_decode_attention splits its sequences into tasks: each task reads kv_per_task kv heads (all of
 * them: whole rows) of a sequence, tasks_per_seq tasks a part of its context; with fewer than
 * WHOLE_ROW_MIN_SEQS sequences (`parted`) contexts come in parts of part_blocks blocks, and sequence s's
 * tasks start at first[s]. */
typedef struct {
    int parted, tasks_per_seq, kv_per_task, max_blocks, block_size, window, part_blocks;
    int first[WHOLE_ROW_MIN_SEQS + 1];
    const int32_t *block_tables, *context_lens;
} decode_plan;

/* What a task reads: the query heads of sequence `seq` from kv head first_kv on, over the positions
 * skip .. length - 1 of the blocks from `table` (part `part` of the context's window, from the block
 * where it begins); `many`: one of several parts. */
typedef struct {
    int seq, first_kv, part, many, skip, length;
    const int32_t *table;
} decode_task;

static decode_task task_of(const decode_plan *p, int task) {
    decode_task t = {0};
    int s = p->parted ? 0 : task / p->tasks_per_seq;
    while (p->parted && p->first[s + 1] <= task) s++;
    const int local = p->parted ? task - p->first[s] : task % p->tasks_per_seq;
    t.seq = s;
    t.first_kv = local % p->tasks_per_seq * p->kv_per_task;
    t.part = local / p->tasks_per_seq;
    t.many = p->parted && p->first[s + 1] - p->first[s] > p->tasks_per_seq;
    const int begin = window_start(p->context_lens[s], p->window);
    const int first_block = begin / p->block_size + t.part * p->part_blocks, chunk = p->part_blocks * p->block_size;
    const int left = p->context_lens[s] - first_block * p->block_size;
    t.length = t.many && left > chunk ? chunk : left;
    t.skip = t.part == 0 ? begin % p->block_size : 0;
    t.table = p->block_tables + (int64_t)s * p->max_blocks + first_block;
    return t;
}

/* One query token per sequence against its cached tokens 0 .. context_len - 1, or with a sliding
 * window (window > 0) the last `window` of them, with chunks (window < 0) those of its chunk, read
 * through the block table from caches (blocks, block_size, kv_heads, head row) of the given form
 * (cpu_cache.h); the tokens before the window or chunk are not read. softcap > 0 caps the scores
 * (cap_scores; Gemma 2), 0 leaves them. sinks (heads), or NULL: each head's attention sink (gpt-oss;
 * sink_share), added once per sequence and head, by the task that reads its whole context or by
 * combine_parts.
 * q: (seqs, heads, head_dim) with q_stride floats between sequences; out: (seqs, heads, head_dim)
 * contiguous.
 * The query heads sharing a kv head read each K/V row once.
 * A sequence with context length 0 (padding) gets zeros.
 * Returns 0, -1 when a buffer cannot be allocated, or LCQ_NO_BLOCK when a table entry it would read is
 * not a block (blocks_present). */
int lcq_decode_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int cache_form,
                         const int32_t *block_tables, int max_blocks, const int32_t *context_lens, float *out, int seqs,
                         int heads, int kv_heads, int head_dim, int block_size, float scale, float softcap,
                         int window, const float *sinks) {
    for (int s = 0; s < seqs; s++)
        if (!blocks_present(block_tables + (int64_t)s * max_blocks, max_blocks,
                            window_start(context_lens[s], window), context_lens[s], block_size))
            return LCQ_NO_BLOCK;
    const int group = heads / kv_heads, parted = seqs < WHOLE_ROW_MIN_SEQS;
    const int64_t row = (int64_t)kv_heads * lcq_cache_head_stride(cache_form, head_dim); /* elements per slot */
    int blocks_read[WHOLE_ROW_MIN_SEQS], total_blocks = 0; /* per sequence, where parted */
    for (int s = 0; s < seqs && parted; s++) {
        blocks_read[s] =
            (context_lens[s] + block_size - 1) / block_size - window_start(context_lens[s], window) / block_size;
        total_blocks += blocks_read[s];
    }
    const int whole_rows = !parted || total_blocks >= WHOLE_ROW_MIN_BLOCKS; /* the same outputs either way */
    const int tasks_wanted = PARTS_PER_THREAD * omp_get_max_threads();
    const int wanted = (total_blocks + tasks_wanted - 1) / tasks_wanted; /* blocks per part */
    decode_plan plan = {parted, whole_rows ? 1 : kv_heads, whole_rows ? kv_heads : 1, max_blocks, block_size, window,
                        !whole_rows || wanted > CHUNK_BLOCKS ? CHUNK_BLOCKS
                        : wanted < MIN_PART_BLOCKS           ? MIN_PART_BLOCKS
                                                             : wanted,
                        {0}, block_tables, context_lens};
    int many_parts = 0;
    for (int s = 0; s < seqs && parted; s++) {
        const int parts = (blocks_read[s] + plan.part_blocks - 1) / plan.part_blocks;
        plan.first[s + 1] = plan.first[s] + (parts > 1 ? parts : 1) * plan.tasks_per_seq;
        many_parts |= parts > 1;
    }
    const int tasks = parted ? plan.first[seqs] : seqs, task_heads = plan.kv_per_task * group;
    const int64_t part_floats = (int64_t)task_heads * (head_dim + 2); /* a task's outputs, then statistics */
    float *parts = many_parts ? malloc(sizeof(float) * (size_t)tasks * part_floats) : NULL;
    if (many_parts && parts == NULL) return -1;
    int failed = 0, claimed = 0;
    /* Tasks handed out one at a time as threads free up, each thread claiming its next task before it
     * reads the current one, whose last blocks then ask for the next one's first. */
#pragma omp parallel reduction(| : failed)
    for (int task = __atomic_fetch_add(&claimed, 1, __ATOMIC_RELAXED), next; task < tasks; task = next) {
        next = __atomic_fetch_add(&claimed, 1, __ATOMIC_RELAXED);
        const decode_task t = task_of(&plan, task), ahead = next < tasks ? task_of(&plan, next) : (decode_task){0};
        const int64_t first_head = (int64_t)t.first_kv * group;
        float *outputs = t.many ? parts + task * part_floats : out + ((int64_t)t.seq * heads + first_head) * head_dim;
        if (lcq_attend_task(cache_form, q + t.seq * q_stride + first_head * head_dim, k_cache, v_cache, t.table,
                            t.skip, t.length, ahead.table, ahead.length, outputs,
                            t.many ? outputs + task_heads * head_dim : NULL, task_heads, t.first_kv, group, row,
                            head_dim, block_size, scale, softcap, sinks == NULL || t.many ? NULL : sinks + first_head))
            failed = 1;
    }
    for (int s = 0; s < seqs && many_parts && !failed; s++) {
        const int count = (plan.first[s + 1] - plan.first[s]) / plan.tasks_per_seq;
        /* its parts: tasks first[s] + part * tasks_per_seq + c, each of task_heads heads from head c * task_heads */
        for (int c = 0; c < plan.tasks_per_seq && count > 1; c++)
            combine_parts(parts + ((int64_t)plan.first[s] + c) * part_floats, count, plan.tasks_per_seq * part_floats,
                          task_heads, head_dim, sinks == NULL ? NULL : sinks + (int64_t)c * task_heads,
                          out + ((int64_t)s * heads + (int64_t)c * task_heads) * head_dim);
    }
    free(parts);
    return failed ? -1 : 0;
}
