/* Choosing each row's next token from its logits on x86 CPUs: the largest (greedy) in vector lanes, or a draw
 * after temperature, min-p, top-k and top-p (the sampler's arithmetic, lcq/runtime/sampler.py); rows are shared
 * among the threads from 8 rows for the largest, from 4 for draws.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_exp.h"

/* out[r] = the index of the largest value of row r of x (rows, n), as torch.argmax: the first of equal
 * ones, and the first NaN in a row that has one. Two passes over a row (the largest value with a NaN
 * check, then its first index) in vector lanes: torch's CPU argmax took 1.7-2.0 ms for a decode
 * step's 64 x 49,152 logits in cache, 4% of the step, where amax took 0.08. */
void lcq_argmax_rows(const float *x, int64_t rows, int64_t n, int64_t *out) {
#pragma omp parallel for if (rows >= 8)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * n;
        __m256 top = _mm256_set1_ps(-INFINITY), unordered = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            const __m256 v = _mm256_loadu_ps(row + i);
            top = _mm256_max_ps(top, v);
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        float lanes[8], best = -INFINITY;
        _mm256_storeu_ps(lanes, top);
        for (int j = 0; j < 8; j++) best = lanes[j] > best ? lanes[j] : best;
        int nan = _mm256_movemask_ps(unordered) != 0;
        for (; i < n; i++) {
            nan |= isnan(row[i]);
            best = row[i] > best ? row[i] : best;
        }
        int64_t found = 0;
        if (nan) {
            while (!isnan(row[found])) found++;
        } else {
            const __m256 target = _mm256_set1_ps(best);
            int mask = 0;
            for (i = 0; i + 8 <= n && !(mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + i), target,
                                                                                 _CMP_EQ_OQ)));
                 i += 8) {
            }
            if (mask)
                found = i + __builtin_ctz(mask);
            else
                for (found = i; found < n && row[found] != best; found++) {
                }
        }
        out[r] = found;
    }
}

/* Sampling (sampler.filtered_probs, then sampler.draw): a row's weights are w = exp((x - max) / temperature)
 * (the largest 1), zero below min_p; top-k and top-p keep the most likely tokens while fewer than top_k are
 * kept and the mass before the next one is below top_p of the total; the token drawn is the first, in
 * vocabulary order, where the kept weights' running sum passes uniform times their total. The kept set is
 * a threshold: every weight above the cut's, and at the cut's weight the tokens up to its index. The cut
 * is found from a histogram of the weights by their float's top bits (monotonic for positive floats):
 * whole buckets are kept while they fit, and the one where the cut falls is sorted. Weights below
 * SAMPLE_SMALL are left out of the histogram unless the cut lies among them, so that a peaked row
 * (SmolLM2 at temperature 0.7 keeps a median of 2 tokens at top-p 0.95) histograms a few hundred. */
#define SAMPLE_BUCKETS 1024 /* bits >> 20 of a float in [0, 1]: 8 of the exponent, 3 of the mantissa */
#define SAMPLE_SMALL 1e-4f
#define SAMPLE_UNDERFLOW -87.0f /* weights below e^-87 (relative to the largest) are 0, as in fp32 softmax nearly */

typedef struct {
    float weight;
    int32_t index;
} lcq_candidate;

static int most_likely_first(const void *a, const void *b) {
    const lcq_candidate *x = a, *y = b;
    if (x->weight != y->weight) return x->weight < y->weight ? 1 : -1;
    return (x->index > y->index) - (x->index < y->index);
}

static inline int weight_bucket(float w) {
    uint32_t bits;
    memcpy(&bits, &w, sizeof bits);
    return (int)(bits >> 20);
}

typedef struct {
    float weight;  /* the cut's: weights above it are kept */
    int64_t index; /* at the cut's weight, tokens up to this index are kept */
    double kept;   /* their total */
} sample_cut;

/* The cut of top_k and top_p (limit: top_p times the total) among the weights of at least `floor`, into
 * *cut; returns 0 (cut untouched) when it lies below them, or nowhere. */
static int find_cut(const float *w, int64_t n, int64_t top_k, double limit, float floor, int32_t *counts,
                    double *masses, lcq_candidate *candidates, sample_cut *cut) {
    memset(counts, 0, SAMPLE_BUCKETS * sizeof *counts);
    memset(masses, 0, SAMPLE_BUCKETS * sizeof *masses);
    const __m256 low = _mm256_set1_ps(floor);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(w + i), low, _CMP_GE_OQ)); mask;
             mask &= mask - 1) {
            const float v = w[i + __builtin_ctz(mask)];
            counts[weight_bucket(v)]++;
            masses[weight_bucket(v)] += v;
        }
    for (; i < n; i++)
        if (w[i] >= floor) {
            counts[weight_bucket(w[i])]++;
            masses[weight_bucket(w[i])] += w[i];
        }
    int64_t count = 0;
    double kept = 0.0;
    for (int b = SAMPLE_BUCKETS - 1; b >= 0; b--) {
        if (!counts[b]) continue;
        if (count + counts[b] <= top_k && kept + masses[b] < limit) { /* even its last token is kept */
            count += counts[b];
            kept += masses[b];
            continue;
        }
        if (count >= top_k) { /* top_k was reached at this bucket's upper edge: keep the buckets above */
            const uint32_t edge = ((uint32_t)b + 1) << 20;
            const uint32_t below = edge - 1;
            memcpy(&cut->weight, &below, sizeof below);
            *cut = (sample_cut){cut->weight, -1, kept};
            return 1;
        }
        int64_t m = 0;
        for (int64_t j = 0; j < n; j++)
            if (w[j] >= floor && w[j] > 0.0f && weight_bucket(w[j]) == b)
                candidates[m++] = (lcq_candidate){w[j], (int32_t)j};
        if (!m) continue; /* (only zero weights: none to keep) */
        qsort(candidates, (size_t)m, sizeof *candidates, most_likely_first);
        int64_t j = 0; /* at least one is kept, even where top_p was so small that its limit rounded to 0 */
        do {
            count++;
            kept += candidates[j++].weight;
        } while (j < m && count < top_k && kept < limit);
        /* top_k keeps the tokens tied with its k-th too, as vLLM and transformers do (equal weights share a
         * bucket, and sort by index: the cut's index then takes them all) */
        while (j < m && count >= top_k && kept < limit && candidates[j].weight == candidates[j - 1].weight) {
            count++;
            kept += candidates[j++].weight;
        }
        if (j < m || count >= top_k || kept >= limit) {
            *cut = (sample_cut){candidates[j - 1].weight, candidates[j - 1].index, kept};
            return 1;
        }
    }
    return 0;
}

/* The cut of top_k and top_p (limit: top_p times the mass it applies to) among all weights: none where every
 * positive weight is kept. */
static sample_cut top_cut(const float *w, int64_t n, int64_t top_k, double limit, double total, int32_t *counts,
                          double *masses, lcq_candidate *candidates) {
    sample_cut cut = {0.0f, -1, total};
    if (!find_cut(w, n, top_k, limit, SAMPLE_SMALL, counts, masses, candidates, &cut)) /* among small ones? */
        find_cut(w, n, top_k, limit, 0.0f, counts, masses, candidates, &cut);          /* else none: cut stays */
    return cut;
}

static int64_t sample_row(const float *x, int64_t n, float temperature, float min_p, int64_t top_k, float top_p,
                          float uniform, float *w, int32_t *counts, double *masses, lcq_candidate *candidates) {
    __m256 largest = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) largest = _mm256_max_ps(largest, _mm256_loadu_ps(x + i));
    float lanes[8], top = -INFINITY;
    _mm256_storeu_ps(lanes, largest);
    for (int j = 0; j < 8; j++) top = lanes[j] > top ? lanes[j] : top;
    for (; i < n; i++) top = x[i] > top ? x[i] : top;
    const float scale = 1.0f / (temperature > 1e-5f ? temperature : 1e-5f);
    const __m256 shift = _mm256_set1_ps(top), factor = _mm256_set1_ps(scale), low = _mm256_set1_ps(min_p);
    __m256d total4 = _mm256_setzero_pd();
    const __m256 underflow = _mm256_set1_ps(SAMPLE_UNDERFLOW);
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 exponent = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), shift), factor);
        __m256 v = exp8(exponent); /* 0 below -87.3; the scalar tail's rule (SAMPLE_UNDERFLOW) applies too */
        v = _mm256_and_ps(v, _mm256_and_ps(_mm256_cmp_ps(v, low, _CMP_GE_OQ), /* below min_p: 0 */
                                           _mm256_cmp_ps(exponent, underflow, _CMP_GE_OQ)));
        _mm256_storeu_ps(w + i, v);
        total4 = _mm256_add_pd(total4, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                                                     _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
    }
    double parts[4], total = 0.0;
    _mm256_storeu_pd(parts, total4);
    total = parts[0] + parts[1] + parts[2] + parts[3];
    for (; i < n; i++) {
        const float exponent = (x[i] - top) * scale, v = exp1(exponent);
        w[i] = v >= min_p && exponent >= SAMPLE_UNDERFLOW ? v : 0.0f;
        total += w[i];
    }
    sample_cut cut = {0.0f, -1, total}; /* no cut: every positive weight */
    if (top_k < n || top_p < 1.0f) { /* top-p of what top-k keeps (renormalised, as vLLM and transformers) */
        const double mass = top_k < n && top_p < 1.0f
            ? top_cut(w, n, top_k, INFINITY, total, counts, masses, candidates).kept : total;
        cut = top_cut(w, n, top_k, (double)top_p * mass, total, counts, masses, candidates);
    }
    const double target = (double)uniform * cut.kept;
    const __m256 above = _mm256_set1_ps(cut.weight);
    double run = 0.0;
    int64_t last = -1;
    for (i = 0; i < n; i += 8) {
        if (i + 8 <= n) { /* a block's kept sum first; its tokens one by one only where the draw falls in it */
            const __m256 v = _mm256_loadu_ps(w + i);
            const int ties = _mm256_movemask_ps(_mm256_cmp_ps(v, above, _CMP_EQ_OQ));
            const __m256 kept = _mm256_and_ps(v, _mm256_cmp_ps(v, above, _CMP_GT_OQ));
            const __m128 half = _mm_add_ps(_mm256_castps256_ps128(kept), _mm256_extractf128_ps(kept, 1));
            const double sum = (double)_mm_cvtss_f32(_mm_hadd_ps(_mm_hadd_ps(half, half), _mm_hadd_ps(half, half)));
            if (!ties && !(run + sum > target) && sum == 0.0) continue;
            if (!ties && !(run + sum > target)) { /* the last kept token of the block, for rounding at the end */
                run += sum;
                for (int j = 7; j >= 0; j--)
                    if (w[i + j] > cut.weight) { last = i + j; break; }
                continue;
            }
        }
        for (int64_t t = i; t < i + 8 && t < n; t++) {
            if (!(w[t] > cut.weight || (w[t] == cut.weight && t <= cut.index && w[t] > 0.0f))) continue;
            run += w[t];
            last = t;
            if (run > target) return t;
        }
    }
    return last; /* the running sum fell short of the target by rounding */
}

/* tokens[r] for each row r of logits (rows, n), drawn at uniform[r] in [0, 1) as above (top_k >= n: none,
 * top_p 1: none, min_p 0: none). torch's ops took 3.2 ms for 64 rows of 49,152 at a temperature alone and
 * 7 ms with top-p. Returns 0, or -1 when buffers cannot be allocated. */
int lcq_sample_rows(const float *logits, int64_t rows, int64_t n, const float *temperature, const float *min_p,
                    const int64_t *top_k, const float *top_p, const float *uniform, int64_t *tokens) {
    int status = 0;
#pragma omp parallel if (rows >= 4)
    {
        float *w = malloc((size_t)n * sizeof *w);
        lcq_candidate *candidates = malloc((size_t)n * sizeof *candidates);
        int32_t *counts = malloc(SAMPLE_BUCKETS * sizeof *counts);
        double *masses = malloc(SAMPLE_BUCKETS * sizeof *masses);
        const int ready = w && candidates && counts && masses;
        if (!ready) {
#pragma omp atomic write
            status = -1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < rows; r++)
            if (ready)
                tokens[r] = sample_row(logits + r * n, n, temperature[r], min_p[r], top_k[r], top_p[r], uniform[r], w,
                                       counts, masses, candidates);
        free(w);
        free(candidates);
        free(counts);
        free(masses);
    }
    return status;
}
