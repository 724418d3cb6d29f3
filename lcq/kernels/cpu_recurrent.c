/* A recurrent mixer's decode step on a CPU in one call: from its input projection's output to its output
 * projection's input, every sequence's states advanced in place in their slots.
 *
 * Mamba-2 (Granite 4.0-H, Bamba, Nemotron-H, Falcon-H1), Qwen3.5's gated delta rule and LFM2's short
 * convolution take one token per sequence here: the convolution window, the inputs' activations, the state
 * update and its read-out, and the gated norm. torch's operations copied every state out of its slot and back
 * and made several passes over it, and Python called about fifteen of them per layer and token. Both the Python
 * layers (lcq/models/recurrent.py) and the one-call decode step (cpu_decode_step.c) call lcq_recurrent_step, so both
 * give the same numbers. All tensors are contiguous fp32; sums of squares are kept in double.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { RECURRENT_MAMBA, RECURRENT_DELTA, RECURRENT_SHORT_CONV }; /* cpu_ops.py's RECURRENT_KINDS */
enum { NORM_GATED, NORM_BEFORE_GATE, NORM_NONE };                 /* Mamba-2's output norm: cpu_ops.py's NORMS */

/* One recurrent mixer layer as lcq_recurrent_step reads it (cpu_ops.py's RecurrentLayer mirrors it). Mamba-2:
 * heads of head_dim, groups of B and C of state_dim each, decay = -exp(A_log), dt_bias, skip = D per head, dt
 * clamped to [dt_min, dt_max]. The delta rule: heads value heads of head_dim, groups key heads of state_dim,
 * decay = -exp(A_log) and dt_bias per value head. The short convolution: conv_channels = the hidden size. */
typedef struct RecurrentLayer {
    int kind, heads, head_dim, groups, state_dim, norm, conv_channels, conv_kernel;
    float eps, dt_min, dt_max;
    float *conv_states, *states;
    const float *conv_weight, *conv_bias, *decay, *dt_bias, *skip, *norm_weight;
} RecurrentLayer;

static inline float silu(float x) { return x / (1.0f + expf(-x)); }

static inline float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); } /* torch's threshold */

/* One token of a causal depthwise convolution per sequence, in place in its slot's window: windows (slots,
 * channels, kernel - 1) hold each channel's last inputs; out[s, ch] = the channel's kernel taps over its window
 * and input[s * input_stride + ch], plus bias[ch] (bias may be NULL); then the window drops its oldest input and
 * takes this one. */
static void conv_step(float *windows, const int64_t *slots, int seqs, int channels, int kernel, const float *input,
                      int64_t input_stride, const float *weight, const float *bias, float *out) {
    const int kept = kernel - 1;
#pragma omp parallel for if ((int64_t)seqs * channels >= 16384)
    for (int s = 0; s < seqs; s++) {
        float *window = windows + slots[s] * (int64_t)channels * kept;
        for (int ch = 0; ch < channels; ch++) {
            float *last = window + (int64_t)ch * kept;
            const float *taps = weight + (int64_t)ch * kernel, value = input[s * input_stride + ch];
            float sum = bias != NULL ? bias[ch] : 0.0f;
            for (int k = 0; k < kept; k++) sum += taps[k] * last[k];
            out[(int64_t)s * channels + ch] = sum + taps[kept] * value;
            for (int k = 0; k + 1 < kept; k++) last[k] = last[k + 1];
            if (kept > 0) last[kept - 1] = value;
        }
    }
}

/* The gated norm, per row of x (rows, width) and its gate z (row stride z_stride): each group of `group` values
 * RMS-normalized times weight[i % period] (period = width: a weight per value; Qwen3.5's: one head's, shared),
 * with silu(z) applied to the values first (gate_first: Mamba-2's) or to the normed ones (Qwen3.5's,
 * Falcon-H1's). out may be x. Also the mixers' output in prefill (recurrent.py). */
void lcq_gated_group_norm(const float *x, const float *z, int64_t z_stride, const float *weight, int period,
                          int64_t rows, int width, int group, float eps, int gate_first, float *out) {
#pragma omp parallel for if (rows >= 16)
    for (int64_t r = 0; r < rows; r++)
        for (int start = 0; start < width; start += group) {
            const float *xs = x + r * width + start, *zs = z + r * z_stride + start;
            float *dst = out + r * width + start;
            double squares = 0.0;
            for (int i = 0; i < group; i++) {
                const float v = gate_first ? xs[i] * silu(zs[i]) : xs[i];
                squares += (double)v * v;
            }
            const float scale = 1.0f / sqrtf((float)(squares / group) + eps);
            for (int i = 0; i < group; i++) {
                const float w = weight[(start + i) % period];
                dst[i] = gate_first ? xs[i] * silu(zs[i]) * scale * w : xs[i] * scale * w * silu(zs[i]);
            }
        }
}

/* Mamba-2's state update and read-out for each sequence, in place in its slot: per head h, with B and C its
 * group's, H = H exp(dt A_h) + B (dt x)^T over H (state_dim x head_dim), then y = H^T C + D_h x. x, b and c are
 * the rows of xbc (row stride `stride`): x (heads, head_dim), then b and c (groups, state_dim); dt (seqs, heads);
 * y (seqs, heads, head_dim). One pass over each state. */
static void mamba_state_step(const RecurrentLayer *m, const int64_t *slots, int seqs, const float *xbc,
                             int64_t stride, const float *dt, float *y) {
    const int heads = m->heads, head_dim = m->head_dim, state_dim = m->state_dim, per_group = heads / m->groups;
    const int64_t inner = (int64_t)heads * head_dim;
#pragma omp parallel for collapse(2) if (seqs * heads >= 4)
    for (int s = 0; s < seqs; s++)
        for (int h = 0; h < heads; h++) {
            float *state = m->states + (slots[s] * heads + h) * (int64_t)state_dim * head_dim;
            const float *xs = xbc + s * stride + (int64_t)h * head_dim;
            const float *bs = xbc + s * stride + inner + (int64_t)(h / per_group) * state_dim;
            const float *cs = bs + (int64_t)m->groups * state_dim;
            const float step = dt[(int64_t)s * heads + h], decay = expf(step * m->decay[h]);
            float *out = y + ((int64_t)s * heads + h) * head_dim;
            for (int p = 0; p < head_dim; p++) out[p] = m->skip[h] * xs[p];
            for (int n = 0; n < state_dim; n++) {
                float *row = state + (int64_t)n * head_dim;
                const float bn = bs[n] * step, cn = cs[n];
#pragma omp simd
                for (int p = 0; p < head_dim; p++) {
                    const float v = row[p] * decay + bn * xs[p];
                    row[p] = v;
                    out[p] += v * cn;
                }
            }
        }
}

/* The gated delta rule's step for each sequence, in place in its slot: per value head h, with S its state
 * (k_dim x v_dim), S = S exp(decay); u = beta (v - S^T k); S = S + k u^T; y = S^T q. q, k (seqs, heads, k_dim),
 * already normalized and repeated per value head; v, y (seqs, heads, v_dim); decay (its log) and beta (seqs,
 * heads). Two passes over each state (one to read what it remembers of k, one to update and read it). */
static int delta_state_step(float *states, const int64_t *slots, int seqs, int heads, int k_dim, int v_dim,
                            const float *q, const float *k, const float *v, const float *decay, const float *beta,
                            float *y) {
    float *scratch = malloc(sizeof(float) * (size_t)seqs * heads * v_dim);
    if (scratch == NULL) return -1;
#pragma omp parallel for collapse(2) if (seqs * heads >= 4)
    for (int s = 0; s < seqs; s++)
        for (int h = 0; h < heads; h++) {
            const int64_t head = (int64_t)s * heads + h;
            float *state = states + (slots[s] * heads + h) * (int64_t)k_dim * v_dim;
            const float *qs = q + head * k_dim, *ks = k + head * k_dim, *vs = v + head * v_dim;
            const float g = expf(decay[head]), b = beta[head];
            float *u = scratch + head * v_dim, *out = y + head * v_dim;
            for (int j = 0; j < v_dim; j++) u[j] = 0.0f;
            for (int i = 0; i < k_dim; i++) {
                const float *row = state + (int64_t)i * v_dim;
                const float ki = ks[i];
#pragma omp simd
                for (int j = 0; j < v_dim; j++) u[j] += row[j] * ki;
            }
            for (int j = 0; j < v_dim; j++) {
                u[j] = (vs[j] - g * u[j]) * b;
                out[j] = 0.0f;
            }
            for (int i = 0; i < k_dim; i++) {
                float *row = state + (int64_t)i * v_dim;
                const float ki = ks[i], qi = qs[i];
#pragma omp simd
                for (int j = 0; j < v_dim; j++) {
                    const float value = row[j] * g + ki * u[j];
                    row[j] = value;
                    out[j] += value * qi;
                }
            }
        }
    free(scratch);
    return 0;
}

/* Mamba-2: projected rows [z (inner) | x, B, C (the convolution's channels) | dt (heads)]. */
static int mamba_step(const RecurrentLayer *m, const int64_t *slots, int seqs, const float *projected, float *out) {
    const int inner = m->heads * m->head_dim, channels = m->conv_channels;
    const int64_t stride = (int64_t)inner + channels + m->heads;
    float *convolved = malloc(sizeof(float) * (size_t)seqs * (channels + m->heads + inner));
    if (convolved == NULL) return -1;
    float *dt = convolved + (int64_t)seqs * channels, *y = dt + (int64_t)seqs * m->heads;
    conv_step(m->conv_states, slots, seqs, channels, m->conv_kernel, projected + inner, stride, m->conv_weight,
              m->conv_bias, convolved);
    for (int64_t i = 0; i < (int64_t)seqs * channels; i++) convolved[i] = silu(convolved[i]);
    for (int s = 0; s < seqs; s++)
        for (int h = 0; h < m->heads; h++) {
            const float step = softplus(projected[s * stride + inner + channels + h] + m->dt_bias[h]);
            dt[(int64_t)s * m->heads + h] = fminf(fmaxf(step, m->dt_min), m->dt_max);
        }
    mamba_state_step(m, slots, seqs, convolved, channels, dt, y);
    if (m->norm == NORM_NONE)
        for (int s = 0; s < seqs; s++)
            for (int i = 0; i < inner; i++)
                out[(int64_t)s * inner + i] = y[(int64_t)s * inner + i] * silu(projected[s * stride + i]);
    else
        lcq_gated_group_norm(y, projected, stride, m->norm_weight, inner, seqs, inner, inner / m->groups, m->eps,
                         m->norm == NORM_GATED, out);
    free(convolved);
    return 0;
}

/* The gated delta rule: projected rows [q, k, v (the convolution's channels) | z | b | a], z per value, b and a
 * per value head. q and k are L2-normalized per key head (q also scaled by k_dim^-0.5) and repeated for the value
 * heads each serves. */
static int delta_step(const RecurrentLayer *m, const int64_t *slots, int seqs, const float *projected, float *out) {
    const int v_heads = m->heads, v_dim = m->head_dim, k_heads = m->groups, k_dim = m->state_dim;
    const int channels = m->conv_channels, values = v_heads * v_dim, keys = k_heads * k_dim;
    const int64_t stride = (int64_t)channels + values + 2 * v_heads;
    const size_t floats = (size_t)seqs * (channels + 2 * (size_t)v_heads * k_dim + 2 * values + 2 * v_heads);
    float *convolved = malloc(sizeof(float) * floats);
    if (convolved == NULL) return -1;
    float *q = convolved + (int64_t)seqs * channels, *k = q + (int64_t)seqs * v_heads * k_dim;
    float *v = k + (int64_t)seqs * v_heads * k_dim, *y = v + (int64_t)seqs * values;
    float *decay = y + (int64_t)seqs * values, *beta = decay + (int64_t)seqs * v_heads;
    conv_step(m->conv_states, slots, seqs, channels, m->conv_kernel, projected, stride, m->conv_weight, m->conv_bias,
              convolved);
    for (int64_t i = 0; i < (int64_t)seqs * channels; i++) convolved[i] = silu(convolved[i]);
    const float query_scale = 1.0f / sqrtf((float)k_dim);
    for (int s = 0; s < seqs; s++) {
        const float *row = convolved + (int64_t)s * channels, *gates = projected + s * stride + channels + values;
        for (int kh = 0; kh < k_heads; kh++)
            for (int part = 0; part < 2; part++) { /* the queries, then the keys */
                const float *x = row + (int64_t)part * keys + (int64_t)kh * k_dim;
                double squares = 0.0;
                for (int i = 0; i < k_dim; i++) squares += (double)x[i] * x[i];
                const float scale = 1.0f / sqrtf((float)squares + 1e-6f) * (part == 0 ? query_scale : 1.0f);
                for (int vh = kh * (v_heads / k_heads); vh < (kh + 1) * (v_heads / k_heads); vh++) {
                    float *dst = (part == 0 ? q : k) + ((int64_t)s * v_heads + vh) * k_dim;
                    for (int i = 0; i < k_dim; i++) dst[i] = x[i] * scale;
                }
            }
        memcpy(v + (int64_t)s * values, row + 2 * (int64_t)keys, sizeof(float) * values);
        for (int h = 0; h < v_heads; h++) {
            decay[(int64_t)s * v_heads + h] = m->decay[h] * softplus(gates[v_heads + h] + m->dt_bias[h]);
            beta[(int64_t)s * v_heads + h] = 1.0f / (1.0f + expf(-gates[h]));
        }
    }
    int status = delta_state_step(m->states, slots, seqs, v_heads, k_dim, v_dim, q, k, v, decay, beta, y);
    if (status == 0)
        lcq_gated_group_norm(y, projected + channels, stride, m->norm_weight, v_dim, seqs, values, v_dim, m->eps, 0,
                             out);
    free(convolved);
    return status;
}

/* LFM2's short convolution: projected rows [B | C | x], each conv_channels wide; out = C * conv(B * x). */
static int short_conv_step(const RecurrentLayer *m, const int64_t *slots, int seqs, const float *projected,
                           float *out) {
    const int width = m->conv_channels;
    float *gated = malloc(sizeof(float) * (size_t)seqs * width);
    if (gated == NULL) return -1;
    for (int s = 0; s < seqs; s++)
        for (int i = 0; i < width; i++) {
            const float *row = projected + (int64_t)s * 3 * width;
            gated[(int64_t)s * width + i] = row[i] * row[2 * width + i];
        }
    conv_step(m->conv_states, slots, seqs, width, m->conv_kernel, gated, width, m->conv_weight, m->conv_bias, out);
    for (int s = 0; s < seqs; s++)
        for (int i = 0; i < width; i++) out[(int64_t)s * width + i] *= projected[(int64_t)s * 3 * width + width + i];
    free(gated);
    return 0;
}

/* One token of each of `seqs` sequences through a recurrent mixer: projected (seqs, its input projection's
 * width) -> out (seqs, its output projection's input width), each sequence's convolution window and state
 * advanced in slot slots[s]. Returns 0, or -1 where a buffer cannot be allocated. */
int lcq_recurrent_step(const RecurrentLayer *layer, const int64_t *slots, int seqs, const float *projected,
                       float *out) {
    switch (layer->kind) {
    case RECURRENT_MAMBA: return mamba_step(layer, slots, seqs, projected, out);
    case RECURRENT_DELTA: return delta_step(layer, slots, seqs, projected, out);
    default: return short_conv_step(layer, slots, seqs, projected, out);
    }
}
