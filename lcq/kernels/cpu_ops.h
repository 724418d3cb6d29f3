/* The small operations of a CPU step (cpu_ops.c) that the one-call decode step (cpu_decode_step.c), the latent
 * attention layer (cpu_latent.c) and the blocked products (cpu_gemm.c) run too; what each does is said where it
 * is defined. */
#ifndef LCQ_CPU_OPS_H
#define LCQ_CPU_OPS_H

#include <stdint.h>

void lcq_norm(const float *x, float *residual, const float *weight, const float *bias, float *out, int64_t rows,
              int dim, float eps, int centred);
void lcq_rms_norm(const float *x, float *residual, const float *weight, float *out, int64_t rows, int dim,
                  float eps);
void lcq_head_norm(float *x, int64_t tokens, int64_t row_stride, int heads, int head_dim, const float *weight,
                   int weight_stride, float eps, int centred);
void lcq_rotary(float *x, int64_t tokens, int64_t row_stride, int heads, int head_dim, int rotated, const float *cos,
                const float *sin, const int64_t *positions, int interleaved);
/* out (rows, width) = act(gate) * up for gate_up (rows, 2 * width) = [gate, up], act one of cpu_exp.h's gated ones,
 * factors its factors or NULL: the MLP's and the blocked products' SwiGLU (cpu_gemm.c). */
void lcq_gated_mul(const float *gate_up, float *out, int64_t rows, int64_t width, int activation,
                   const float *factors);
void lcq_ungated(const float *x, float *out, int64_t rows, int64_t width, int activation, const float *factors);
void lcq_sigmoid_gate(float *x, const float *gate, int64_t rows, int heads, int head_dim, int64_t row_stride,
                      int64_t head_stride);
void lcq_store_kv(const float *k, const float *v, int64_t row_stride, void *k_cache, void *v_cache,
                  const int64_t *slots, int64_t tokens, int kv_heads, int head_dim, int cache_form);

#endif
