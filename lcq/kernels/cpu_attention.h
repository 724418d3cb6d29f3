/* What decode and prefill attention over the paged KV cache (cpu_decode_attention.c, cpu_prefill_attention.c)
 * share: caches fp32, fp16 or int8 (cpu_cache.h) read through the block tables where they lie (no gathered
 * copy per sequence) and converted to fp32 as they are loaded, the softmax's pieces (soft caps, sinks), and
 * which positions a query sees (windows and chunks) and whether their blocks are there.
 */
#ifndef LCQ_CPU_ATTENTION_H
#define LCQ_CPU_ATTENTION_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "cpu_cache.h"
#include "cpu_exp.h"

/* Cache values as fp32, from a cache of the given form (cpu_cache.h; int8 values before their row's
 * scale): 8 at element i, or one. Inlined with FORM a constant, so attention reads a cache where it
 * lies, converting as it loads (converting each block into a scratch buffer first cost a write and a
 * read of every value). */
static inline __attribute__((always_inline)) __m256 load8(const int FORM, const void *cache, int64_t i) {
    if (FORM == LCQ_CACHE_INT8)
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)cache + i))));
    return FORM == LCQ_CACHE_FP16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)cache + i)))
                                  : _mm256_loadu_ps((const float *)cache + i);
}

static inline __attribute__((always_inline)) float load1(const int FORM, const void *cache, int64_t i) {
    if (FORM == LCQ_CACHE_INT8) return ((const int8_t *)cache)[i];
    return FORM == LCQ_CACHE_FP16 ? _cvtsh_ss(((const uint16_t *)cache)[i]) : ((const float *)cache)[i];
}

/* The factor of the head row that starts at element `start`: its scale in an int8 cache, else 1. */
static inline __attribute__((always_inline)) float row_factor(const int FORM, const void *cache, int64_t start,
                                                              int head_dim) {
    return FORM == LCQ_CACHE_INT8 ? lcq_cache_scale(cache, start, head_dim) : 1.0f;
}

/* The largest of the 8 lanes, and their sum. */
static inline float max8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* Soft-capped scores (Gemma 2): each s becomes cap * tanh(s / cap), before the softmax and its masks. */
static inline void cap_scores(float *scores, int count, float cap) {
    const float inverse = 1.0f / cap;
    for (int t = 0; t < count; t++) scores[t] = cap * tanhf(scores[t] * inverse);
}

/* What head `head`'s attention sink (gpt-oss: one more key, of score sinks[head] and value zero) adds to
 * a softmax sum of exp(score - top): exp(sinks[head] - top), or 0 without sinks (NULL). Added once where
 * the sum divides the outputs, it lowers every weight as the extra key would. */
static inline float sink_share(const float *sinks, int head, float top) {
    return sinks == NULL ? 0.0f : exp1(sinks[head] - top);
}

/* The first position a query at position length - 1 sees: 0, the first of its sliding window of
 * `window` positions (window > 0), or of its chunk of -window positions (window < 0: Llama 4's chunked
 * attention). */
static inline int window_start(int length, int window) {
    if (window < 0)
        return length > 0 ? (length - 1) / -window * -window : 0;
    return window > 0 && length > window ? length - window : 0;
}

/* 1 when a sequence's row of max_blocks table entries holds a block (>= 0) for each of the positions
 * from .. length - 1 it is about to read, and the row is long enough. A sliding group's blocks before
 * its window are handed back as -1 (lcq/runtime/block_manager.py): reading one would address memory
 * before the cache, so the kernels refuse such a step (LCQ_NO_BLOCK) rather than read it. */
static inline int blocks_present(const int32_t *table, int max_blocks, int from, int length, int block_size) {
    if (length <= 0) return 1;
    const int last = (length - 1) / block_size;
    if (last >= max_blocks) return 0;
    for (int b = from / block_size; b <= last; b++)
        if (table[b] < 0) return 0;
    return 1;
}

/* The query heads of one new token of a sequence, a task's (whole GQA groups from kv head first_kv), over its
 * cached positions skip .. length - 1 through `table` (cpu_decode_attention.c's attend_task, in the form this CPU
 * and the caller chose): decode attention's tasks, and prefill's sequences of one new token. Returns 0, or -1
 * when a buffer cannot be allocated. */
int lcq_attend_task(int form, const float *queries, const void *k_cache, const void *v_cache, const int32_t *table,
                    int skip, int length, const int32_t *next_table, int next_length, float *outputs, float *stats,
                    int task_heads, int first_kv, int group, int64_t row, int head_dim, int block_size, float scale,
                    float softcap, const float *sinks);

#endif
