/* A mixture of experts on a CPU in one call: the router, each row's choice of experts, and the chosen experts'
 * products, for any number of rows.
 *
 * The Python layers called a dozen torch operations to route and then each chosen expert's two products one at a
 * time (at 8 experts a token and 48 layers, about 2,000 calls a token); here each expert the step's rows chose runs
 * once over the rows that chose it, its products the same C kernels as every other layer's (cpu_index.c,
 * cpu_half.c). Both the Python layers (MixtureOfExperts.forward on CPU) and the one-call decode step (cpu_decode_step.c)
 * call lcq_mixture_step, so both give the same numbers. All tensors are contiguous fp32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_exp.h"

struct Adapters;
int lcq_linear_entry(void *const *entry, const float *x, int rows, int K, int N, int swiglu, float *y); /* cpu_decode_step.c */
int lcq_mlp(void *const *entries, const float *x, int rows, int in_dim, int width, int activation,
            const float *factors, const struct Adapters *adapters, int layer, float *gate_up, float *activated,
            float *y); /* cpu_decode_step.c */

/* A mixture as lcq_mixture_step reads it (cpu_ops.py's Mixture mirrors it). The router (num_experts, hidden),
 * with a bias or NULL, scores each row; probabilities are their softmax, or their sigmoid (sigmoid); the choice is
 * by the probabilities plus a correction (or NULL), by the scores themselves where sigmoid without a correction
 * (Llama 4), within each row's kept_groups best of `groups` equal groups of experts where groups > 1 (a group's
 * score the sum of its group_score_experts best). The top_k chosen take their probabilities as weights,
 * renormalized where norm_topk_prob, times routed_scale; each expert's output is scaled by its weight, or its input
 * (input_weights: Llama 4). An expert is an MLP of `width` (lcq_mlp; activation one of cpu_exp.h's but xIELU,
 * factors gpt-oss's clamped SwiGLU's or NULL): six entries in `experts` per expert, gate/up then down, each (kind,
 * weight, bias) as cpu_decode_step.c's linear layers. latent > 0: the routed experts run in that width, between the linear
 * layers latent_projections (in, then out: six entries). shared: a shared expert's six entries (of shared_width),
 * or NULL; shared_gate (hidden), where not NULL, scales its output by sigmoid(shared_gate . x). */
typedef struct Mixture {
    int num_experts, top_k, hidden, width, shared_width, activation, sigmoid, norm_topk_prob, input_weights;
    int groups, kept_groups, group_score_experts, latent;
    float routed_scale;
    const float *router, *router_bias, *correction, *shared_gate, *factors;
    void *const *experts, *const *shared, *const *latent_projections;
} Mixture;

/* Row r's top_k experts (chosen, most favoured first; the lower index first among equals) and their weights. */
static void route_row(const Mixture *m, const float *x, float *scores, float *probs, float *choice, int32_t *chosen,
                      float *weights) {
    const int experts = m->num_experts;
    for (int e = 0; e < experts; e++) {
        const float *row = m->router + (int64_t)e * m->hidden;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < m->hidden; i++) sum += row[i] * x[i];
        scores[e] = sum + (m->router_bias != NULL ? m->router_bias[e] : 0.0f);
    }
    if (m->sigmoid) {
        for (int e = 0; e < experts; e++) probs[e] = 1.0f / (1.0f + expf(-scores[e]));
    } else {
        float top = scores[0], total = 0.0f;
        for (int e = 1; e < experts; e++) top = fmaxf(top, scores[e]);
        for (int e = 0; e < experts; e++) total += probs[e] = expf(scores[e] - top);
        for (int e = 0; e < experts; e++) probs[e] /= total;
    }
    for (int e = 0; e < experts; e++)
        choice[e] = m->correction != NULL ? probs[e] + m->correction[e] : m->sigmoid ? scores[e] : probs[e];
    if (m->groups > 1) { /* each row's kept_groups best groups of experts; the others out of the choice */
        const int size = experts / m->groups;
        float group_scores[m->groups];
        for (int g = 0; g < m->groups; g++) {
            float best[m->group_score_experts];
            for (int j = 0; j < m->group_score_experts; j++) best[j] = -INFINITY;
            for (int e = g * size; e < (g + 1) * size; e++)
                for (int j = 0; j < m->group_score_experts; j++)
                    if (choice[e] > best[j]) {
                        memmove(best + j + 1, best + j, sizeof(float) * (m->group_score_experts - j - 1));
                        best[j] = choice[e];
                        break;
                    }
            group_scores[g] = 0.0f;
            for (int j = 0; j < m->group_score_experts; j++) group_scores[g] += best[j];
        }
        for (int g = 0; g < m->groups; g++) {
            int better = 0;
            for (int h = 0; h < m->groups; h++)
                better += group_scores[h] > group_scores[g] || (group_scores[h] == group_scores[g] && h < g);
            if (better >= m->kept_groups)
                for (int e = g * size; e < (g + 1) * size; e++) choice[e] = -INFINITY;
        }
    }
    float total = 0.0f;
    for (int k = 0; k < m->top_k; k++) {
        int best = -1;
        for (int e = 0; e < experts; e++) {
            int taken = 0;
            for (int j = 0; j < k; j++) taken |= chosen[j] == e;
            if (!taken && (best < 0 || choice[e] > choice[best])) best = e;
        }
        chosen[k] = best;
        total += weights[k] = probs[best];
    }
    for (int k = 0; k < m->top_k; k++)
        weights[k] = (m->norm_topk_prob ? weights[k] / total : weights[k]) * m->routed_scale;
}

/* out (rows, hidden) = the mixture's output for x (rows, hidden). Returns 0, or -1 where a buffer cannot be
 * allocated or a product fails. */
int lcq_mixture_step(const Mixture *m, const float *x, int rows, float *out) {
    const int experts = m->num_experts, k = m->top_k, hidden = m->hidden;
    const int routed = m->latent > 0 ? m->latent : hidden, io = routed > hidden ? routed : hidden;
    const int wide = m->width > m->shared_width ? m->width : m->shared_width;
    const size_t floats = (size_t)experts * 3 + (size_t)rows * k + (size_t)rows * io * 3 + (size_t)rows * 3 * wide;
    float *buffer = malloc(sizeof(float) * floats);
    int32_t *chosen = malloc(sizeof(int32_t) * (size_t)rows * k), *members = malloc(sizeof(int32_t) * (size_t)rows);
    int status = buffer == NULL || chosen == NULL || members == NULL ? -1 : 0;
    float *scores = buffer, *probs = scores + experts, *choice = probs + experts, *weights = choice + experts;
    float *inputs = weights + (int64_t)rows * k, *gathered = inputs + (int64_t)rows * io;
    float *summed = gathered + (int64_t)rows * io, *gate_up = summed + (int64_t)rows * io;
    float *activated = gate_up + (int64_t)rows * 2 * wide;
    for (int r = 0; status == 0 && r < rows; r++)
        route_row(m, x + (int64_t)r * hidden, scores, probs, choice, chosen + (int64_t)r * k, weights + (int64_t)r * k);
    if (status == 0 && m->latent > 0)
        status = lcq_linear_entry(m->latent_projections, x, rows, hidden, routed, 0, inputs);
    else if (status == 0)
        memcpy(inputs, x, sizeof(float) * rows * (size_t)hidden);
    if (status == 0) memset(summed, 0, sizeof(float) * rows * (size_t)routed);
    for (int e = 0; status == 0 && e < experts; e++) { /* each expert over the rows that chose it, in expert order */
        int count = 0;
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < k; j++)
                if (chosen[(int64_t)r * k + j] == e) members[count++] = r * k + j;
        if (count == 0) continue;
        for (int i = 0; i < count; i++) {
            const float *in = inputs + (int64_t)(members[i] / k) * routed, scale = weights[members[i]];
            for (int c = 0; c < routed; c++)
                gathered[(int64_t)i * routed + c] = m->input_weights ? in[c] * scale : in[c];
        }
        status = lcq_mlp(m->experts + (int64_t)e * 6, gathered, count, routed, m->width, m->activation, m->factors,
                         NULL, 0, gate_up, activated, gathered);
        for (int i = 0; status == 0 && i < count; i++) {
            float *sum = summed + (int64_t)(members[i] / k) * routed;
            const float scale = m->input_weights ? 1.0f : weights[members[i]];
            for (int c = 0; c < routed; c++) sum[c] += gathered[(int64_t)i * routed + c] * scale;
        }
    }
    if (status == 0 && m->latent > 0)
        status = lcq_linear_entry(m->latent_projections + 3, summed, rows, routed, hidden, 0, out);
    else if (status == 0)
        memcpy(out, summed, sizeof(float) * rows * (size_t)hidden);
    if (status == 0 && m->shared != NULL) {
        float *shared = inputs; /* (rows, hidden) past the routed experts */
        status = lcq_mlp(m->shared, x, rows, hidden, m->shared_width, m->activation, m->factors, NULL, 0, gate_up,
                         activated, shared);
        for (int r = 0; status == 0 && r < rows; r++) {
            float scale = 1.0f;
            if (m->shared_gate != NULL) {
                float dot = 0.0f;
                for (int i = 0; i < hidden; i++) dot += m->shared_gate[i] * x[(int64_t)r * hidden + i];
                scale = 1.0f / (1.0f + expf(-dot));
            }
            for (int i = 0; i < hidden; i++) out[(int64_t)r * hidden + i] += shared[(int64_t)r * hidden + i] * scale;
        }
    }
    free(buffer);
    free(chosen);
    free(members);
    return status;
}
