/* diag.c — routing diagnostics of docs/method.md §6 (the paper's MaxVio and combination usage,
 * dead experts, experts per token by diffusion-step bucket). Cheap enough to run on
 * every training step: O(N*E) for loads, O(E^2 log E) for the pair histogram, which
 * is the upper triangle of the co-selection counts M^T M (rd_coselect_counts). */
#include "../racedit.h"

#include <math.h>
#include <stdlib.h>

rd_status rd_max_violation(double *out, const int64_t *load, int64_t E) {
    if (E < 1) return rd_fail(RD_EINVAL, "max_violation: E must be >= 1, got %lld", (long long)E);
    int64_t total = 0, mx = load[0];
    for (int64_t e = 0; e < E; e++) {
        total += load[e];
        if (load[e] > mx) mx = load[e];
    }
    if (total == 0) { *out = 0.0; return RD_OK; }   /* nothing selected: no violation */
    double mean = (double)total / (double)E;
    *out = ((double)mx - mean) / mean;
    return RD_OK;
}

rd_status rd_dead_experts(int64_t *out, const int64_t *load, int64_t E) {
    if (E < 0) return rd_fail(RD_EINVAL, "dead_experts: negative E");
    int64_t n = 0;
    for (int64_t e = 0; e < E; e++) n += load[e] == 0;
    *out = n;
    return RD_OK;
}

static int cmp_desc(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x < y) - (x > y);
}

rd_status rd_combination_usage(double *out, const int64_t *C, int64_t E, double coverage) {
    if (!(coverage > 0.0 && coverage <= 1.0))
        return rd_fail(RD_EINVAL, "coverage: expected a value in (0, 1], got %g", coverage);
    if (E < 0) return rd_fail(RD_EINVAL, "combination_usage: negative E");
    *out = 0.0;
    if (E < 2) return RD_OK;
    int64_t npairs = E * (E - 1) / 2;
    int64_t *bins = malloc((size_t)npairs * sizeof *bins);
    if (!bins) return rd_fail(RD_ENOMEM, "combination_usage: out of memory (E=%lld)", (long long)E);
    int64_t n = 0, total = 0;
    for (int64_t i = 0; i < E; i++)
        for (int64_t j = i + 1; j < E; j++) { bins[n] = C[i * E + j]; total += bins[n++]; }
    if (total > 0) {
        qsort(bins, (size_t)npairs, sizeof *bins, cmp_desc);
        /* Integer cumulative counts against coverage*total: no drift from summing fractions.
         * Counted: the bins whose cumulative count stays strictly below the goal; the bin
         * that reaches it is not (docs/method.md §6). */
        double goal = coverage * (double)total * (1.0 - 1e-12);
        int64_t cum = 0, below = 0;
        for (int64_t b = 0; b < npairs; b++) {
            cum += bins[b];
            if ((double)cum >= goal) break;
            below++;
        }
        *out = (double)below / (double)npairs;
    }
    free(bins);
    return RD_OK;
}

rd_status rd_allocation_by_key(double *mean, int64_t *count, const uint8_t *mask,
                               const int64_t *keys, int64_t B, int64_t L, int64_t E, int64_t NB) {
    if (B < 0 || L < 0 || E < 0 || NB < 1)
        return rd_fail(RD_EINVAL, "allocation_by_key: need sizes >= 0 and num_buckets >= 1, got "
                       "B=%lld L=%lld E=%lld num_buckets=%lld", (long long)B, (long long)L,
                       (long long)E, (long long)NB);
    for (int64_t s = 0; s < B; s++)
        if (keys[s] < 0 || keys[s] >= NB)
            return rd_fail(RD_EINVAL, "keys: expected values in [0, %lld), got %lld at index %lld",
                           (long long)NB, (long long)keys[s], (long long)s);
    int64_t *pairs = calloc((size_t)NB, sizeof *pairs);
    if (!pairs) return rd_fail(RD_ENOMEM, "allocation_by_key: out of memory");
    for (int64_t b = 0; b < NB; b++) count[b] = 0;
    for (int64_t s = 0; s < B; s++) {
        const uint8_t *m = mask + s * L * E;
        int64_t n = 0;
        for (int64_t i = 0; i < L * E; i++) n += m[i] != 0;
        pairs[keys[s]] += n;
        count[keys[s]]++;
    }
    for (int64_t b = 0; b < NB; b++)
        mean[b] = count[b] > 0 && L > 0 ? (double)pairs[b] / ((double)count[b] * (double)L) : NAN;
    free(pairs);
    return RD_OK;
}
