/* The latent attention layer (cpu_latent.c) that the one-call decode step (cpu_decode_step.c) runs too. */
#ifndef LCQ_CPU_LATENT_H
#define LCQ_CPU_LATENT_H

#include <stdint.h>

/* A latent attention layer as these functions read it (cpu_ops.py's LatentLayer mirrors it): heads; kv_rank, the
 * latent's width; q_rank, the queries' latent's (0: one q_proj); nope_dim and rope_dim, a query head's dimensions
 * without and with the rotary embedding; value_dim, a value head's; interleaved: the rotary pairs are adjacent;
 * the norms' weights (q_down_norm NULL without a queries' latent); key_up (heads, nope_dim, kv_rank) and value_up
 * (heads, value_dim, kv_rank), kv_b_proj's parts; projections: nine entries, (kind, weight, bias) of q_a_proj (its
 * weight NULL without one), q_proj (or q_b_proj) and kv_a_proj_with_mqa, as cpu_decode_step.c's linear layers. */
typedef struct LatentLayer {
    int heads, kv_rank, q_rank, nope_dim, rope_dim, value_dim, interleaved;
    float eps;
    const float *q_down_norm, *kv_norm, *key_up, *value_up;
    void *const *projections;
} LatentLayer;

void lcq_latent_queries(const LatentLayer *m, const float *q, const float *compressed, int rows, const float *cos,
                        const float *sin, const int64_t *positions, float *queries, float *cache_rows);
void lcq_latent_values(const LatentLayer *m, const float *out, int rows, float *values);

#endif
