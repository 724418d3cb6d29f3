/* Large CPU products (cpu_gemm.c), shared by the fp16 (cpu_half.c) and index (cpu_index.c) kernels. */
#ifndef LCQ_CPU_GEMM_H
#define LCQ_CPU_GEMM_H

/* From this many rows a product is bounded by arithmetic and takes lcq_expanded_product; below it the
 * decode kernels, which stream each weight once, are faster (3072 x 576 at 12 rows: 0.26 against
 * 0.33 ms for fp16 weights on a 2-core Zen 4). */
#define LCQ_GEMM_MIN_ROWS 16

/* Writes weight rows first .. first + count - 1 of `weight` (K columns) as fp32 into out (count, K). */
typedef void (*lcq_expand_rows)(const void *weight, int K, int first, int count, float *out);

/* y (M, N) = x (M, K) @ W^T, W given by its expansion; x and y fp32 contiguous, M >= 1.
 * Returns 0, or -1 when a buffer cannot be allocated. */
int lcq_expanded_product(const float *x, int M, int K, int N, lcq_expand_rows expand, const void *weight, float *y);

#endif
