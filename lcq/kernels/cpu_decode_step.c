/* A whole CPU decode step in one call (lcq_decode_layers): every layer's norms, products, attention or
 * recurrent mixer, MLP or mixture of experts, LoRA adapters and residual adds over the step's rows, in C, so that
 * Python and torch dispatch nothing per layer. The operations are cpu_ops.c's, the products cpu_index.c's and
 * cpu_half.c's, attention cpu_decode_attention.c's (and cpu_latent.c's, cpu_recurrent.c's, cpu_mixture.c's for
 * those layers). All tensors are contiguous fp32 unless a stride is given.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_cache.h"
#include "cpu_exp.h"
#include "cpu_latent.h"
#include "cpu_ops.h"

int lcq_half_matmul(const float *x, int M, int K, const uint16_t *w, int N, int swiglu, const uint32_t *panels,
                    const uint8_t *bytes, float *y); /* cpu_half.c */
int lcq_index_matmul(const float *x, int M, const void *w, int swiglu, float *y);       /* cpu_index.c */
int lcq_invariant_queries(void);                                                         /* cpu_gemm.c */
int lcq_decode_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int cache_form,
                         const int32_t *block_tables, int max_blocks, const int32_t *context_lens, float *out, int seqs,
                         int heads, int kv_heads, int head_dim, int block_size, float scale, float softcap,
                         int window, const float *sinks); /* cpu_decode_attention.c */
int lcq_prefill_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int cache_form,
                          const int32_t *block_tables, int max_blocks, const int32_t *context_lens,
                          const int32_t *query_start, float *out, int seqs, int heads, int kv_heads, int head_dim,
                          int block_size, float scale, float softcap, int window, int64_t stage_limit,
                          const float *sinks, int tile_every_query); /* cpu_prefill_attention.c */

/* Prefill attention's staging limit (cpu_ops.STAGE_LIMIT_FLOATS) */
#define STAGE_LIMIT_FLOATS ((int64_t)16 << 20)

/* Decode attention of one new token per sequence (lcq_decode_attention's arguments), or where the calling thread's
 * products are invariant (lcq_invariant_queries) prefill attention's tiles for every query, so that a token's
 * values are those a prefill step gives it. */
static int attend_new_tokens(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                             int cache_form, const int32_t *block_tables, int max_blocks, const int32_t *context_lens,
                             float *out, int seqs, int heads, int kv_heads, int head_dim, int block_size, float scale,
                             float softcap, int window, const float *sinks) {
    if (!lcq_invariant_queries())
        return lcq_decode_attention(q, q_stride, k_cache, v_cache, cache_form, block_tables, max_blocks, context_lens,
                                    out, seqs, heads, kv_heads, head_dim, block_size, scale, softcap, window, sinks);
    int32_t *query_start = malloc(sizeof(int32_t) * (seqs + 1));
    if (query_start == NULL) return -1;
    for (int s = 0; s <= seqs; s++) query_start[s] = s;
    const int status = lcq_prefill_attention(q, q_stride, k_cache, v_cache, cache_form, block_tables, max_blocks,
                                             context_lens, query_start, out, seqs, heads, kv_heads, head_dim,
                                             block_size, scale, softcap, window, STAGE_LIMIT_FLOATS, sinks, 1);
    free(query_start);
    return status;
}
struct RecurrentLayer;
int lcq_recurrent_step(const struct RecurrentLayer *layer, const int64_t *slots, int seqs, const float *projected,
                       float *out); /* cpu_recurrent.c */
struct Mixture;
int lcq_mixture_step(const struct Mixture *mixture, const float *x, int rows, float *out); /* cpu_mixture.c */

static void add_bias(float *y, const float *bias, int rows, int width) {
    if (bias == NULL) return;
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < width; i++) y[(int64_t)r * width + i] += bias[i];
}

/* Entries per layer in the `layers` array of lcq_decode_layers, in this order. A linear layer is
 * three: its weight's kind (HALF_WEIGHT or INDEX_WEIGHT, cast to a pointer), the weight and its bias.
 * INPUT_NORM and POST_NORM (before the MLP) are NULL in layers without them (OLMo 2, EXAONE 4: the stream
 * itself goes in; Cohere's parallel blocks: one norm's output feeds the attention and the MLP), INPUT_NORM_BIAS
 * and POST_NORM_BIAS their biases (StableLM's LayerNorms), else NULL; Q_NORM and K_NORM are the q/k norm weights
 * (Qwen3, Gemma 3, OLMo 2, EXAONE 4), else NULL; ATTENTION_OUTPUT_NORM and MLP_OUTPUT_NORM the norms of the attention and MLP outputs before their
 * residual adds (Gemma, OLMo 2, EXAONE 4), else NULL; COS and SIN the layer's whole rotary tables
 * (Gemma's sliding-window layers have their own base), a row of rotated / 2 per position; WINDOW the
 * layer's sliding window in tokens (cast to a pointer; 0: full attention); GROUP the layer group whose
 * slots and block tables it uses (cast to a pointer; lcq/runtime/kv_groups.py); SINKS each head's attention sink
 * (gpt-oss), else NULL; TEMPERATURE (cast to a pointer) 1 where the query temperature applies (Ministral 3: every
 * layer; Llama 4: its NoPE layers), else 0. A layer's token mixer is DeepSeek's latent attention (LATENT: its LatentLayer,
 * cpu_latent.c, before the linear layer O),
 * attention (QKV not NULL), a recurrent mixer (RECURRENT: its RecurrentLayer, cpu_recurrent.c, between the
 * linear layers IN and OUT), both side by side (Falcon-H1), or neither (Nemotron-H's MLP blocks); it has an
 * MLP where GATE_UP is not NULL (MLP_FACTORS: xIELU's four, else NULL), or a mixture of experts where MIXTURE is
 * not NULL (its Mixture, cpu_mixture.c). A layer of one part (Nemotron-H) has INPUT_NORM only. */
enum { INPUT_NORM, INPUT_NORM_BIAS, QKV_KIND, QKV, QKV_BIAS, Q_NORM, K_NORM, COS, SIN, O_KIND, O, O_BIAS, RECURRENT,
       IN_KIND, IN, IN_BIAS, OUT_KIND, OUT, OUT_BIAS, ATTENTION_OUTPUT_NORM, POST_NORM, POST_NORM_BIAS, GATE_UP_KIND,
       GATE_UP, GATE_UP_BIAS, DOWN_KIND, DOWN, DOWN_BIAS, MLP_OUTPUT_NORM, MLP_FACTORS, MIXTURE, K_CACHE, V_CACHE, WINDOW, GROUP,
       SINKS, LATENT, TEMPERATURE, POINTERS_PER_LAYER };
enum { HALF_WEIGHT, INDEX_WEIGHT }; /* cpu_ops.py names them too */

/* y (rows, N) = x (rows, K) @ W^T + bias for the linear layer whose entries start at `entry`; with
 * swiglu and no bias, y (rows, N / 2) = silu(gate) * up of W = [gate; up] (cpu_gemm.h). (The mixtures' experts
 * too: cpu_mixture.c.) */
int lcq_linear_entry(void *const *entry, const float *x, int rows, int K, int N, int swiglu, float *y) {
    const int status = (intptr_t)entry[0] == INDEX_WEIGHT
                           ? lcq_index_matmul(x, rows, entry[1], swiglu, y)
                           : lcq_half_matmul(x, rows, K, entry[1], N, swiglu, NULL, NULL, y);
    add_bias(y, entry[2], rows, N);
    return status;
}

/* A decode step's LoRA adapters (lcq/models/lora.py AdapterStack): per layer, for each fused linear
 * layer in the order QKV, O, GATE_UP, DOWN, the stack's A (slots W, K) and B's transpose (slots W, N),
 * W = rank x the layer's parts (NULL where the layer has no such fused layer: a mixture's, a recurrent mixer's);
 * `active` (layers x 4) says which fused layers any held adapter touches (0 where NULL); row r uses slot
 * row_slots[r] (-1: none). */
typedef struct Adapters {
    void *const *matrices;
    const uint8_t *active;
    const int64_t *row_slots;
    int slots, rank;
} Adapters;

enum { ADAPTER_QKV, ADAPTER_O, ADAPTER_GATE_UP, ADAPTER_DOWN, ADAPTER_LAYERS };
#define ADAPTER_PARALLEL_MACS 65536 /* an adapter product's multiply-adds from which both cores share it */
#define ADAPTER_COLUMNS 256         /* output columns per share of B's half of the product */

static int adapter_touches(const Adapters *adapters, int layer, int kind) {
    return adapters != NULL && adapters->active[layer * ADAPTER_LAYERS + kind];
}

/* y (rows, N) += each row's adapter product B_s (A_s x_r), s its slot, W = rank x parts (3 for q, k, v; 2 for
 * gate and up; 1 for up alone and the others): A_s the rows s W .. s W + W of A,
 * B_s the columns s W .. s W + W of B, read as rows of B's transpose (what LoRABatch.add computes, the
 * other slots' zero columns left out): each output row gains W scaled rows of it, in chunks of columns
 * the cores share. Returns 0, or -1 when a buffer cannot be allocated. */
static int add_adapter(const Adapters *adapters, int layer, int kind, int parts, const float *x, int rows, int K,
                       int N, float *y) {
    if (!adapter_touches(adapters, layer, kind)) return 0;
    const float *a = adapters->matrices[(layer * ADAPTER_LAYERS + kind) * 2];
    const float *b_rows = adapters->matrices[(layer * ADAPTER_LAYERS + kind) * 2 + 1];
    const int width = adapters->rank * parts;
    float *low = malloc(sizeof(float) * (size_t)rows * width);
    if (low == NULL) return -1;
#pragma omp parallel for collapse(2) schedule(static) if ((int64_t)rows * width * K >= ADAPTER_PARALLEL_MACS)
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < width; j++) {
            const int64_t s = adapters->row_slots[r];
            float sum = 0.0f;
            if (s >= 0) {
                const float *row = a + (s * width + j) * (int64_t)K, *in = x + (int64_t)r * K;
#pragma omp simd reduction(+ : sum)
                for (int k = 0; k < K; k++) sum += row[k] * in[k];
            }
            low[(int64_t)r * width + j] = sum;
        }
#pragma omp parallel for schedule(static) if ((int64_t)rows * width * N >= ADAPTER_PARALLEL_MACS)
    for (int first = 0; first < N; first += ADAPTER_COLUMNS) {
        const int last = first + ADAPTER_COLUMNS < N ? first + ADAPTER_COLUMNS : N;
        for (int r = 0; r < rows; r++) {
            const int64_t s = adapters->row_slots[r];
            float *out = y + (int64_t)r * N;
            for (int j = 0; s >= 0 && j < width; j++) {
                const float t = low[(int64_t)r * width + j], *column = b_rows + (s * width + j) * (int64_t)N;
#pragma omp simd
                for (int n = first; n < last; n++) out[n] += t * column[n];
            }
        }
    }
    free(low);
    return 0;
}

/* y (rows, in_dim) = an MLP of `width` over x (rows, in_dim), its gate/up (up alone without a gate) and down
 * linear layers the six entries from `entries`; activation one of cpu_exp.h's (factors: xIELU's four or the
 * clamped SwiGLU's two, else NULL); the
 * layer's LoRA adapters (or NULL) added after each product. gate_up (rows, 2 width) and activated (rows, width) are
 * its buffers. A decoder layer's MLP, and each expert of a mixture (cpu_mixture.c). */
int lcq_mlp(void *const *entries, const float *x, int rows, int in_dim, int width, int activation,
            const float *factors, const Adapters *adapters, int layer, float *gate_up, float *activated, float *y) {
    const int gated = activation < LCQ_RELU2, up_width = gated ? 2 * width : width;
    if (activation == LCQ_SILU && entries[2] == NULL && !adapter_touches(adapters, layer, ADAPTER_GATE_UP)) {
        if (lcq_linear_entry(entries, x, rows, in_dim, up_width, 1, activated)) return -1; /* SwiGLU in the product */
    } else {
        if (lcq_linear_entry(entries, x, rows, in_dim, up_width, 0, gate_up)) return -1;
        if (add_adapter(adapters, layer, ADAPTER_GATE_UP, gated ? 2 : 1, x, rows, in_dim, up_width, gate_up)) return -1;
        if (gated)
            lcq_gated_mul(gate_up, activated, rows, width, activation, factors);
        else
            lcq_ungated(gate_up, activated, rows, width, activation, factors);
    }
    if (lcq_linear_entry(entries + 3, activated, rows, width, in_dim, 0, y)) return -1;
    return add_adapter(adapters, layer, ADAPTER_DOWN, 1, activated, rows, width, in_dim, y);
}

/* What every layer of a decode step shares (lcq_decode_layers' arguments), and its work buffers. */
typedef struct {
    int rows, hidden, heads, kv_heads, head_dim, rotated, intermediate, activation, cache_form, max_blocks, block_size;
    int whole_qk_norms, qk_norms_after_rotary, interleaved_rotary, output_gate, recurrent_in, recurrent_out;
    int layer_norms, parallel_blocks, per_head_qk_weights;
    float eps, scale, softcap;
    const int64_t *positions, *slots, *state_slots;
    const int32_t *block_tables, *context_lens;
    const float *query_scales;
    const Adapters *adapters;
    float *normed, *qkv, *attn, *gates, *projected, *gate_up, *activated, *mixer_in, *mixer_out, *beside;
} Step;

/* out = the step's norm (layer_norms: LayerNorm, else RMSNorm) of (residual += x) as lcq_norm, or where weight is
 * NULL (a layer without that norm) out = the sum itself (x, without a residual). */
static void add_and_norm(const Step *st, const float *x, float *residual, const float *weight, const float *bias,
                         float *out) {
    if (weight != NULL) {
        lcq_norm(x, residual, weight, bias, out, st->rows, st->hidden, st->eps, st->layer_norms);
        return;
    }
    for (int64_t i = 0; i < (int64_t)st->rows * st->hidden; i++) {
        if (residual != NULL) residual[i] += x[i];
        out[i] = residual != NULL ? residual[i] : x[i];
    }
}

/* The layer's attention over normed rows into step->projected (its output projection's output). */
static int attention(const Step *st, void *const *p, int l) {
    const int rows = st->rows, q_width = st->heads * st->head_dim, kv_width = st->kv_heads * st->head_dim;
    const int qkv_width = q_width + 2 * kv_width, stride = qkv_width + (st->output_gate ? q_width : 0);
    const int64_t group = (intptr_t)p[GROUP];
    float *qkv = st->qkv;
    if (lcq_linear_entry(p + QKV_KIND, st->normed, rows, st->hidden, stride, 0, qkv)) return -1;
    if (add_adapter(st->adapters, l, ADAPTER_QKV, 3, st->normed, rows, st->hidden, qkv_width, qkv)) return -1;
    if (st->output_gate) /* (Qwen3.5) each head's query, then its gate: the gates set apart, the rest closed up */
        for (int r = 0; r < rows; r++) {
            float *row = qkv + (int64_t)r * stride;
            for (int h = 0; h < st->heads; h++) {
                memcpy(st->gates + (int64_t)r * q_width + (int64_t)h * st->head_dim, row + (2 * h + 1) * st->head_dim,
                       sizeof(float) * st->head_dim);
                memmove(row + h * st->head_dim, row + 2 * h * st->head_dim, sizeof(float) * st->head_dim);
            }
            memmove(row + q_width, row + 2 * q_width, sizeof(float) * 2 * kv_width);
        }
    for (int rotated = 0; rotated < 2; rotated++) { /* q/k norms before the rotation, or after it (Hunyuan) */
        if (p[Q_NORM] != NULL && rotated == st->qk_norms_after_rotary) { /* Qwen3, Gemma 3, OLMo 2, ... */
            const int weight_stride = st->per_head_qk_weights ? st->head_dim : 0;
            lcq_head_norm(qkv, rows, stride, st->whole_qk_norms ? 1 : st->heads,
                          st->whole_qk_norms ? q_width : st->head_dim, p[Q_NORM], weight_stride, st->eps,
                          st->layer_norms);
            lcq_head_norm(qkv + q_width, rows, stride, st->whole_qk_norms ? 1 : st->kv_heads,
                          st->whole_qk_norms ? kv_width : st->head_dim, p[K_NORM], weight_stride, st->eps,
                          st->layer_norms);
        }
        if (!rotated)
            lcq_rotary(qkv, rows, stride, st->heads + st->kv_heads, st->head_dim, st->rotated, p[COS], p[SIN],
                       st->positions, st->interleaved_rotary);
    }
    for (int r = 0; st->query_scales != NULL && p[TEMPERATURE] != NULL && r < rows; r++) /* the query temperature */
        for (int i = 0; i < q_width; i++) qkv[(int64_t)r * stride + i] *= st->query_scales[r];
    lcq_store_kv(qkv + q_width, qkv + q_width + kv_width, stride, p[K_CACHE], p[V_CACHE], st->slots + group * rows,
                 rows, st->kv_heads, st->head_dim, st->cache_form);
    const int attended = attend_new_tokens(qkv, stride, p[K_CACHE], p[V_CACHE], st->cache_form,
                                           st->block_tables + group * rows * st->max_blocks, st->max_blocks,
                                           st->context_lens, st->attn, rows, st->heads, st->kv_heads, st->head_dim,
                                           st->block_size, st->scale, st->softcap, (int)(intptr_t)p[WINDOW],
                                           p[SINKS]);
    if (attended) return attended;
    if (st->output_gate) lcq_sigmoid_gate(st->attn, st->gates, rows, st->heads, st->head_dim, q_width, st->head_dim);
    if (lcq_linear_entry(p + O_KIND, st->attn, rows, q_width, st->hidden, 0, st->projected)) return -1;
    return add_adapter(st->adapters, l, ADAPTER_O, 1, st->attn, rows, q_width, st->hidden, st->projected);
}

/* The layer's latent attention (DeepSeek's MLA) over normed rows into step->projected: the queries' and latent's
 * products, lcq_latent_queries, the cache rows written and attended as one KV head of kv_rank + rope_dim, the
 * values, O. */
static int latent_attention(const Step *st, void *const *p) {
    const LatentLayer *m = p[LATENT];
    const int rows = st->rows, width = m->kv_rank + m->rope_dim, q_width = m->heads * (m->nope_dim + m->rope_dim);
    const int64_t group = (intptr_t)p[GROUP];
    const size_t floats = (size_t)rows * (m->q_rank + q_width + 2 * width + 2 * (size_t)m->heads * width +
                                          (size_t)m->heads * m->value_dim);
    float *q_low = malloc(sizeof(float) * floats);
    if (q_low == NULL) return -1;
    float *q = q_low + (int64_t)rows * m->q_rank, *compressed = q + (int64_t)rows * q_width;
    float *cache_rows = compressed + (int64_t)rows * width, *queries = cache_rows + (int64_t)rows * width;
    float *out = queries + (int64_t)rows * m->heads * width, *values = out + (int64_t)rows * m->heads * width;
    int status = 0;
    if (m->q_rank > 0) { /* the queries through their own latent, normed */
        status = lcq_linear_entry(m->projections, st->normed, rows, st->hidden, m->q_rank, 0, q_low);
        if (status == 0) lcq_rms_norm(q_low, NULL, m->q_down_norm, q_low, rows, m->q_rank, m->eps);
    }
    if (status == 0)
        status = lcq_linear_entry(m->projections + 3, m->q_rank > 0 ? q_low : st->normed, rows,
                                  m->q_rank > 0 ? m->q_rank : st->hidden, q_width, 0, q);
    if (status == 0) status = lcq_linear_entry(m->projections + 6, st->normed, rows, st->hidden, width, 0, compressed);
    if (status == 0) {
        lcq_latent_queries(m, q, compressed, rows, p[COS], p[SIN], st->positions, queries, cache_rows);
        lcq_store_kv(cache_rows, cache_rows, width, p[K_CACHE], p[V_CACHE], st->slots + group * rows, rows, 1, width,
                     st->cache_form);
        status = lcq_decode_attention(queries, (int64_t)m->heads * width, p[K_CACHE], p[V_CACHE], st->cache_form,
                                      st->block_tables + group * rows * st->max_blocks, st->max_blocks,
                                      st->context_lens, out, rows, m->heads, 1, width, st->block_size, st->scale, 0.0f,
                                      (int)(intptr_t)p[WINDOW], NULL);
    }
    if (status == 0) {
        lcq_latent_values(m, out, rows, values);
        status = lcq_linear_entry(p + O_KIND, values, rows, m->heads * m->value_dim, st->hidden, 0, st->projected);
    }
    free(q_low);
    return status;
}

/* The layer's recurrent mixer over normed rows into out (rows, hidden): IN, the mixer's step, OUT. */
static int recurrent(const Step *st, void *const *p, float *out) {
    if (lcq_linear_entry(p + IN_KIND, st->normed, st->rows, st->hidden, st->recurrent_in, 0, st->mixer_in)) return -1;
    if (lcq_recurrent_step(p[RECURRENT], st->state_slots, st->rows, st->mixer_in, st->mixer_out)) return -1;
    return lcq_linear_entry(p + OUT_KIND, st->mixer_out, st->rows, st->recurrent_out, st->hidden, 0, out);
}

/* A whole decode step of a Llama-family model's decoder layers (Gemma 3's, and hybrids' with recurrent mixers),
 * for sequences of one new token each: the same operations, in the same order and with the same kernels, as the
 * Python layers (lcq/models/llama.py) take on this path, without a Python call per operation; mixtures of experts
 * too (cpu_mixture.c). x (rows,
 * hidden) holds the embeddings (scaled, for Gemma), or where token_ids is not NULL receives them from the
 * table `embeddings` (vocab rows of hidden values, fp16 where half_embeddings, else fp32) times embed_scale
 * (rounded to fp32, as the Python path rounds it to the model dtype): at batch 1 torch's lookup and
 * conversion took ~90 us a token on a 2-core Zen 4 with the step's weights through the caches; x then
 * receives the residual stream after the last layer. Where final_norm is not NULL, out receives that
 * stream through the model's final norm (its bias final_norm_bias, for LayerNorms), the Python path's
 * last operation (~75 us a token the same way). Weights are fp16 (N, K) or LCQ indices (cpu_index.c), biases fp32 or
 * NULL, KV caches of the given form (cpu_cache.h); the MLP's activation is one of cpu_exp.h's.
 * Row r is at positions[r], below the rotary tables' table_positions rows; rotated: the dimensions of each
 * head the rotary embedding turns; softcap > 0 caps the attention
 * scores (Gemma 2); query_scales (rows), where not NULL, multiply each row's queries after the rotary
 * embedding in the layers whose TEMPERATURE entry is 1 (Ministral 3, Llama 4). whole_qk_norms: the q and k norms span the whole projections (OLMo 2), else
 * each head; qk_norms_after_rotary: they follow the rotary embedding (Hunyuan), else precede it;
 * interleaved_rotary: it turns adjacent pairs of dimensions (GLM-4-0414, lcq_rotary); output_gate: q_proj
 * gives each head a gate too (Qwen3.5); layer_norms: the layers' norms are LayerNorms (Cohere, StableLM), else
 * RMSNorms; parallel_blocks: the attention and the MLP both read the input norm's output and their outputs are
 * summed (Cohere, StableLM's parallel residual); per_head_qk_weights: each head's q/k norm has its own weights
 * (Command R+'s LayerNorms; the q/k norms are LayerNorms where layer_norms). slots
 * (groups, rows) and block_tables (groups, rows, max_blocks) hold each layer group's cache slots and
 * block tables, contiguous; state_slots (rows) each row's slot of the recurrent mixers' states, whose input and
 * output projections are recurrent_in and recurrent_out wide (0 without them). adapter_matrices (NULL: no LoRA
 * this step), with adapter_active,
 * adapter_slots (rows), adapter_slot_count and adapter_rank: the step's LoRA adapters (Adapters). work
 * holds rows * (3 hidden + 2 q width + 2 kv width + 3 intermediate + recurrent_in + recurrent_out), plus 2 q width
 * with output_gate, floats. Returns 0, -1 on a failed allocation, -2 on a position outside the rotary tables, -4 on
 * a token id outside the embedding table, or LCQ_NO_BLOCK where a block table entry the attention would read is
 * not a block. */
int lcq_decode_layers(void *const *layers, int num_layers, const int64_t *token_ids, const void *embeddings,
                      int64_t vocab, int half_embeddings, float embed_scale, float *x, const float *final_norm,
                      const float *final_norm_bias, float *out, int rows, int hidden, int heads, int kv_heads,
                      int head_dim, int intermediate, float eps, const int64_t *positions, int64_t table_positions,
                      const int64_t *slots, const int32_t *block_tables, int max_blocks, const int32_t *context_lens,
                      int block_size, float scale, float softcap, const float *query_scales, int whole_qk_norms,
                      int qk_norms_after_rotary, int interleaved_rotary, int rotated, int output_gate, int layer_norms,
                      int parallel_blocks, int per_head_qk_weights, int activation, int cache_form, const int64_t *state_slots,
                      int recurrent_in, int recurrent_out, float *work,
                      void *const *adapter_matrices, const uint8_t *adapter_active, const int64_t *adapter_slots,
                      int adapter_slot_count, int adapter_rank) {
    for (int r = 0; r < rows; r++)
        if (positions[r] < 0 || positions[r] >= table_positions) return -2;
    for (int r = 0; token_ids != NULL && r < rows; r++) {
        if (token_ids[r] < 0 || token_ids[r] >= vocab) return -4;
        float *row = x + (int64_t)r * hidden;
        if (half_embeddings) {
            const uint16_t *half = (const uint16_t *)embeddings + token_ids[r] * hidden;
            int i = 0;
            for (; i + 8 <= hidden; i += 8)
                _mm256_storeu_ps(row + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(half + i))));
            for (; i < hidden; i++) row[i] = _cvtsh_ss(half[i]);
        } else
            memcpy(row, (const float *)embeddings + token_ids[r] * hidden, sizeof(float) * hidden);
        for (int i = 0; embed_scale != 1.0f && i < hidden; i++) row[i] *= embed_scale;
    }
    const Adapters step_adapters = {adapter_matrices, adapter_active, adapter_slots, adapter_slot_count, adapter_rank};
    const int64_t q_width = (int64_t)heads * head_dim, qkv_width = q_width + 2 * (int64_t)kv_heads * head_dim;
    Step st = {rows, hidden, heads, kv_heads, head_dim, rotated, intermediate, activation, cache_form, max_blocks,
               block_size, whole_qk_norms, qk_norms_after_rotary, interleaved_rotary, output_gate, recurrent_in,
               recurrent_out, layer_norms, parallel_blocks, per_head_qk_weights, eps, scale, softcap, positions, slots, state_slots,
               block_tables, context_lens, query_scales, adapter_matrices != NULL ? &step_adapters : NULL};
    st.normed = work;
    st.qkv = st.normed + (int64_t)rows * hidden;
    st.attn = st.qkv + rows * (qkv_width + (output_gate ? q_width : 0));
    st.gates = st.attn + rows * q_width;
    st.projected = st.gates + (output_gate ? rows * q_width : 0);
    st.gate_up = st.projected + (int64_t)rows * hidden;
    st.activated = st.gate_up + (int64_t)rows * 2 * intermediate;
    st.mixer_in = st.activated + (int64_t)rows * intermediate;
    st.mixer_out = st.mixer_in + (int64_t)rows * recurrent_in;
    st.beside = st.mixer_out + (int64_t)rows * recurrent_out;
    for (int l = 0; l < num_layers; l++) {
        void *const *p = layers + (int64_t)l * POINTERS_PER_LAYER;
        if (l == 0)
            add_and_norm(&st, x, NULL, p[INPUT_NORM], p[INPUT_NORM_BIAS], st.normed);
        else /* x += the previous layer's output, in the norm's pass over x (not a serial loop) */
            add_and_norm(&st, st.projected, x, p[INPUT_NORM], p[INPUT_NORM_BIAS], st.normed);
        const int mixes = p[QKV] != NULL || p[RECURRENT] != NULL || p[LATENT] != NULL;
        const int has_mlp = p[GATE_UP] != NULL || p[MIXTURE] != NULL;
        if (p[LATENT] != NULL) {
            const int attended = latent_attention(&st, p);
            if (attended) return attended;
        }
        if (p[QKV] != NULL) {
            const int attended = attention(&st, p, l);
            if (attended) return attended;
        }
        if (p[RECURRENT] != NULL) { /* alone, or beside the attention (Falcon-H1): their outputs summed */
            if (recurrent(&st, p, p[QKV] != NULL ? st.beside : st.projected)) return -1;
            for (int64_t i = 0; p[QKV] != NULL && i < (int64_t)rows * hidden; i++) st.projected[i] += st.beside[i];
        }
        const int parallel = mixes && has_mlp && parallel_blocks; /* Cohere: the MLP reads the mixer's input too */
        if (mixes && has_mlp && !parallel) {
            if (p[ATTENTION_OUTPUT_NORM] != NULL) /* Gemma */
                lcq_rms_norm(st.projected, NULL, p[ATTENTION_OUTPUT_NORM], st.projected, rows, hidden, eps);
            add_and_norm(&st, st.projected, x, p[POST_NORM], p[POST_NORM_BIAS], st.normed); /* x += the mixer's */
        }
        if (has_mlp) {
            float *out = parallel ? st.beside : st.projected;
            const int status = p[MIXTURE] != NULL ? lcq_mixture_step(p[MIXTURE], st.normed, rows, out)
                : lcq_mlp(p + GATE_UP_KIND, st.normed, rows, hidden, intermediate, activation, p[MLP_FACTORS],
                          st.adapters, l, st.gate_up, st.activated, out);
            if (status) return -1;
            if (p[MLP_OUTPUT_NORM] != NULL) /* Gemma */
                lcq_rms_norm(out, NULL, p[MLP_OUTPUT_NORM], out, rows, hidden, eps);
            for (int64_t i = 0; parallel && i < (int64_t)rows * hidden; i++) st.projected[i] += st.beside[i];
        }
    }
    if (final_norm != NULL) /* x += the last layer's output, in the final norm's pass */
        add_and_norm(&st, num_layers > 0 ? st.projected : x, num_layers > 0 ? x : NULL, final_norm, final_norm_bias,
                     out);
    else
        for (int64_t i = 0; num_layers > 0 && i < (int64_t)rows * hidden; i++) x[i] += st.projected[i]; /* the last's */
    return 0;
}
