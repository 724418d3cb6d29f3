/* The KV cache forms the C attention reads and writes (cpu_ops.py names them too). A cache is
 * (blocks, block_size, kv_heads, head row): fp32 or fp16 head rows of head_dim values, or int8 head
 * rows of head_dim values q followed by their fp32 scale s (a value is q * s), which holds a token
 * in 68 bytes per head of 64 against fp16's 128. */
#ifndef LCQ_CPU_CACHE_H
#define LCQ_CPU_CACHE_H

#include <stdint.h>
#include <string.h>

enum { LCQ_CACHE_FP32, LCQ_CACHE_FP16, LCQ_CACHE_INT8 };

/* The attention kernels' status where a block table entry they would read holds no block (-1: handed
 * back by a sliding-window group) or lies past its row (cpu_ops.py: NO_BLOCK). */
#define LCQ_NO_BLOCK (-3)

/* Elements (of the form's type) per head row. */
static inline int lcq_cache_head_stride(int form, int head_dim) {
    return form == LCQ_CACHE_INT8 ? head_dim + (int)sizeof(float) : head_dim;
}

static inline int lcq_cache_element_bytes(int form) {
    return form == LCQ_CACHE_FP32 ? 4 : form == LCQ_CACHE_FP16 ? 2 : 1;
}

/* The scale of the int8 head row that starts at element `start`. */
static inline float lcq_cache_scale(const void *cache, int64_t start, int head_dim) {
    float scale;
    memcpy(&scale, (const int8_t *)cache + start + head_dim, sizeof scale);
    return scale;
}

/* CALL(form) with the form a constant, so that callers inline one loop per form. */
#define LCQ_CACHE_FORMS(form, CALL)                                                                             \
    switch (form) {                                                                                             \
        case LCQ_CACHE_FP16: CALL(LCQ_CACHE_FP16); break;                                                       \
        case LCQ_CACHE_INT8: CALL(LCQ_CACHE_INT8); break;                                                       \
        default: CALL(LCQ_CACHE_FP32); break;                                                                   \
    }

#endif
