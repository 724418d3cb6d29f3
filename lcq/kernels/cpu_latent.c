/* DeepSeek's multi-head latent attention (MLA: DeepSeek-V2 and V3, Moonlight, GLM-4.7-Flash) around the paged
 * attention on a CPU: what lcq/models/latent_attention.py does between its products and the attention, in C.
 *
 * The queries are taken into the latent's space (each head's query without rotary embedding times its part of
 * kv_b_proj), the latent normed and the rotated parts turned, and after the attention each head's weighted sum of
 * latents becomes its value (times the other part of kv_b_proj). The Python layers call lcq_latent_queries and
 * lcq_latent_values on CPU, and the one-call decode step (cpu_decode_step.c) runs a whole latent attention layer with them,
 * so both give the same numbers. All tensors are contiguous fp32.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_latent.h"
#include "cpu_ops.h"

/* From q (rows, heads, nope_dim + rope_dim) and compressed (rows, kv_rank + rope_dim): queries (rows, heads,
 * kv_rank + rope_dim), each head's query without rotary embedding taken into the latent's space, its rotated part
 * turned; cache_rows (rows, kv_rank + rope_dim), the normed latent and the turned key part. cos, sin: rows of
 * rope_dim / 2, row positions[t] for token t (a whole table), or row t where positions is NULL. */
void lcq_latent_queries(const LatentLayer *m, const float *q, const float *compressed, int rows, const float *cos,
                        const float *sin, const int64_t *positions, float *queries, float *cache_rows) {
    const int width = m->kv_rank + m->rope_dim, q_width = m->nope_dim + m->rope_dim;
    for (int r = 0; r < rows; r++) {
        lcq_rms_norm(compressed + (int64_t)r * width, NULL, m->kv_norm, cache_rows + (int64_t)r * width, 1,
                     m->kv_rank, m->eps);
        memcpy(cache_rows + (int64_t)r * width + m->kv_rank, compressed + (int64_t)r * width + m->kv_rank,
               sizeof(float) * m->rope_dim);
    }
    lcq_rotary(cache_rows + m->kv_rank, rows, width, 1, width, m->rope_dim, cos, sin, positions, m->interleaved);
#pragma omp parallel for collapse(2) if ((int64_t)rows * m->heads >= 4)
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < m->heads; h++) {
            const float *query = q + ((int64_t)r * m->heads + h) * q_width;
            float *out = queries + ((int64_t)r * m->heads + h) * width;
            for (int c = 0; c < m->kv_rank; c++) out[c] = 0.0f;
            for (int i = 0; i < m->nope_dim; i++) {
                const float *row = m->key_up + ((int64_t)h * m->nope_dim + i) * m->kv_rank, qi = query[i];
#pragma omp simd
                for (int c = 0; c < m->kv_rank; c++) out[c] += qi * row[c];
            }
            memcpy(out + m->kv_rank, query + m->nope_dim, sizeof(float) * m->rope_dim);
        }
    lcq_rotary(queries + m->kv_rank, rows, (int64_t)m->heads * width, m->heads, width, m->rope_dim, cos, sin,
               positions, m->interleaved);
}

/* values (rows, heads, value_dim) from the attention's out (rows, heads, kv_rank + rope_dim): each head's weighted
 * sum of latents times its value_up (the rotated part of out unused). */
void lcq_latent_values(const LatentLayer *m, const float *out, int rows, float *values) {
    const int width = m->kv_rank + m->rope_dim;
#pragma omp parallel for collapse(2) if ((int64_t)rows * m->heads >= 4)
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < m->heads; h++) {
            const float *latent = out + ((int64_t)r * m->heads + h) * width;
            for (int v = 0; v < m->value_dim; v++) {
                const float *row = m->value_up + ((int64_t)h * m->value_dim + v) * m->kv_rank;
                float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                for (int c = 0; c < m->kv_rank; c++) sum += latent[c] * row[c];
                values[((int64_t)r * m->heads + h) * m->value_dim + v] = sum;
            }
        }
}
