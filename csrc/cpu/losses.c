/* losses.c — the router's auxiliary losses (docs/method.md §4-§5) on the CPU: the
 * router-similarity loss, the balance loss, the per-layer regularization head and its MSE.
 * Everything is O(N*E + N*E^2) at most (the E x E products go through sgemm); nothing is N x
 * N. The selection mask is a constant of these losses: gradients flow through softmax(R) and
 * the PLR head only. */
#include "../racedit.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Below this many elements a parallel region costs more than it saves. */
#define RD_LOSS_PAR_MIN (1 << 18)

static rd_status check_sizes(const char *op, int64_t N, int64_t E) {
    if (N < 1) return rd_fail(RD_EINVAL, "%s: N must be >= 1, got %lld", op, (long long)N);
    if (E < 2)
        return rd_fail(RD_EINVAL, "%s: E must be >= 2 (one expert has a constant softmax), got %lld",
                       op, (long long)E);
    int64_t EE; /* the (E,E) scratch the losses allocate */
    return RD_SIZE(&EE, sizeof(int64_t), op, E, E);
}

/* ---- softmax over E ---------------------------------------------------------- */

rd_status rd_softmax_forward(float *P, const float *R, int64_t N, int64_t E) {
    /* First non-finite element (found in parallel, reported after: rd_fail is per thread). */
    int64_t bad = N * E;
#pragma omp parallel for reduction(min : bad) if (N * E > RD_LOSS_PAR_MIN)
    for (int64_t t = 0; t < N; t++) {
        const float *r = R + t * E;
        float *p = P + t * E;
        float mx = r[0];
        for (int64_t e = 0; e < E; e++) {
            if (!isfinite(r[e])) { if (t * E + e < bad) bad = t * E + e; break; }
            if (r[e] > mx) mx = r[e];
        }
        float s = 0.0f;
        for (int64_t e = 0; e < E; e++) { p[e] = expf(r[e] - mx); s += p[e]; }
        float inv = 1.0f / s;
        for (int64_t e = 0; e < E; e++) p[e] *= inv;
    }
    if (bad < N * E)
        return rd_fail(RD_EINVAL, "R: non-finite logit %g at (%lld, %lld)", (double)R[bad],
                       (long long)(bad / E), (long long)(bad % E));
    return RD_OK;
}

rd_status rd_softmax_backward(float *dR, const float *dP, const float *P, int64_t N, int64_t E) {
#pragma omp parallel for if (N * E > RD_LOSS_PAR_MIN)
    for (int64_t t = 0; t < N; t++) {
        const float *p = P + t * E, *g = dP + t * E;
        float *d = dR + t * E;
        float dot = 0.0f;
        for (int64_t e = 0; e < E; e++) dot += p[e] * g[e];
        for (int64_t e = 0; e < E; e++) d[e] = p[e] * (g[e] - dot);
    }
    return RD_OK;
}

/* ---- counts ------------------------------------------------------------------- */

rd_status rd_expert_load(int64_t *load, const uint8_t *mask, int64_t N, int64_t E) {
    if (N < 0 || E < 0) return rd_fail(RD_EINVAL, "expert_load: negative size");
    memset(load, 0, (size_t)E * sizeof *load);
    for (int64_t t = 0; t < N; t++)
        for (int64_t e = 0; e < E; e++) load[e] += mask[t * E + e] != 0;
    return RD_OK;
}

/* Exact integer counts rather than a float sgemm on the 0/1 mask: no N*E float copy of
 * the mask, no 2^24 limit, and with k << E enumerating each token's experts is cheaper
 * than the N*E^2 product. Serial: at N*k^2 increments it is never the bottleneck. */
rd_status rd_coselect_counts(int64_t *C, const uint8_t *mask, int64_t N, int64_t E) {
    if (N < 0 || E < 0) return rd_fail(RD_EINVAL, "coselect_counts: negative size");
    memset(C, 0, (size_t)(E * E) * sizeof *C);
    if (E == 0) return RD_OK;
    int64_t *sel = malloc((size_t)E * sizeof *sel);
    if (!sel) return rd_fail(RD_ENOMEM, "coselect_counts: out of memory (E=%lld)", (long long)E);
    for (int64_t t = 0; t < N; t++) {
        const uint8_t *m = mask + t * E;
        int64_t n = 0;
        for (int64_t e = 0; e < E; e++)
            if (m[e]) sel[n++] = e;
        for (int64_t a = 0; a < n; a++) {
            int64_t *row = C + sel[a] * E;
            for (int64_t b = 0; b < n; b++) row[sel[b]]++;
        }
    }
    free(sel);
    return RD_OK;
}

/* ---- router-similarity loss ---------------------------------------------------- */

void rd_similarity_weights(float *W, const int64_t *C, int64_t E) {
    int64_t sdiag = 0, soff = 0;
    for (int64_t i = 0; i < E; i++)
        for (int64_t j = 0; j < E; j++) {
            if (i == j) sdiag += C[i * E + j];
            else soff += C[i * E + j];
        }
    /* an empty block (nothing selected / no token with two experts) gets weight 0 */
    double wd = sdiag > 0 ? (double)E / (double)sdiag : 0.0;
    double wo = soff > 0 ? (double)(E * E - E) / (double)soff : 0.0;
    for (int64_t i = 0; i < E; i++)
        for (int64_t j = 0; j < E; j++)
            W[i * E + j] = (float)((i == j ? wd : wo) * (double)C[i * E + j]);
}

rd_status rd_router_similarity_value(float *loss, const float *P, const float *W, int64_t N,
                                     int64_t E) {
    rd_status st = check_sizes("router_similarity", N, E);
    if (st != RD_OK) return st;
    float *Pp = malloc((size_t)(E * E) * sizeof *Pp);   /* P' = P^T P (E,E) */
    if (!Pp) return rd_fail(RD_ENOMEM, "router_similarity: out of memory (E=%lld)", (long long)E);
    st = rd_matmul(Pp, (int)E, P, (int)E, 1, P, (int)E, 0, E, E, N, 1.0f, 0.0f);
    if (st == RD_OK) {
        double acc = 0.0;
        for (int64_t i = 0; i < E * E; i++) acc += (double)W[i] * (double)Pp[i];
        *loss = (float)(acc / (double)N);
    }
    free(Pp);
    return st;
}

rd_status rd_router_similarity_forward(float *loss, float *P, float *W, const float *R,
                                       const uint8_t *mask, int64_t N, int64_t E) {
    rd_status st = check_sizes("router_similarity", N, E);
    if (st != RD_OK) return st;
    st = rd_softmax_forward(P, R, N, E);
    if (st != RD_OK) return st;
    int64_t *C = malloc((size_t)(E * E) * sizeof *C);
    if (!C) return rd_fail(RD_ENOMEM, "router_similarity: out of memory (E=%lld)", (long long)E);
    st = rd_coselect_counts(C, mask, N, E);
    if (st == RD_OK) {
        rd_similarity_weights(W, C, E);
        st = rd_router_similarity_value(loss, P, W, N, E);
    }
    free(C);
    return st;
}

rd_status rd_router_similarity_backward(float *dR, float dloss, const float *P, const float *W,
                                        int64_t N, int64_t E) {
    rd_status st = check_sizes("router_similarity_backward", N, E);
    if (st != RD_OK) return st;
    float *S = malloc((size_t)(E * E) * sizeof *S);     /* W + W^T (E,E) */
    if (!S) return rd_fail(RD_ENOMEM, "router_similarity_backward: out of memory");
    for (int64_t i = 0; i < E; i++)
        for (int64_t j = 0; j < E; j++) S[i * E + j] = W[i * E + j] + W[j * E + i];
    /* dP (N,E) = (dloss/N) P S, written into dR and turned into dR in place. */
    st = rd_matmul(dR, (int)E, P, (int)E, 0, S, (int)E, 0, N, E, E, dloss / (float)N, 0.0f);
    free(S);
    if (st != RD_OK) return st;
    return rd_softmax_backward(dR, dR, P, N, E);
}

/* ---- balance loss ------------------------------------------------------------- */

rd_status rd_balance_value(float *loss, float *f, const float *P, const int64_t *load,
                           int64_t N, int64_t E) {
    rd_status st = check_sizes("balance", N, E);
    if (st != RD_OK) return st;
    double *pbar = calloc((size_t)E, sizeof *pbar);   /* sum_t P[t,i] (E) */
    if (!pbar) return rd_fail(RD_ENOMEM, "balance: out of memory (E=%lld)", (long long)E);
    int64_t total = 0;
    for (int64_t e = 0; e < E; e++) total += load[e];
    for (int64_t e = 0; e < E; e++) f[e] = total > 0 ? (float)((double)load[e] / (double)total) : 0.0f;
    for (int64_t t = 0; t < N; t++)
        for (int64_t e = 0; e < E; e++) pbar[e] += P[t * E + e];
    double acc = 0.0;
    for (int64_t e = 0; e < E; e++) acc += (double)f[e] * pbar[e] / (double)N;
    *loss = (float)((double)E * acc);
    free(pbar);
    return RD_OK;
}

rd_status rd_balance_forward(float *loss, float *P, float *f, const float *R,
                             const uint8_t *mask, int64_t N, int64_t E) {
    rd_status st = check_sizes("balance", N, E);
    if (st != RD_OK) return st;
    st = rd_softmax_forward(P, R, N, E);
    if (st != RD_OK) return st;
    int64_t *load = malloc((size_t)E * sizeof *load);
    if (!load) return rd_fail(RD_ENOMEM, "balance: out of memory (E=%lld)", (long long)E);
    rd_expert_load(load, mask, N, E);
    st = rd_balance_value(loss, f, P, load, N, E);
    free(load);
    return st;
}

rd_status rd_balance_backward(float *dR, float dloss, const float *P, const float *f,
                              int64_t N, int64_t E) {
    rd_status st = check_sizes("balance_backward", N, E);
    if (st != RD_OK) return st;
    float c = dloss * (float)E / (float)N;
#pragma omp parallel for if (N * E > RD_LOSS_PAR_MIN)
    for (int64_t t = 0; t < N; t++) {
        const float *p = P + t * E;
        float *d = dR + t * E;
        float dot = 0.0f;
        for (int64_t e = 0; e < E; e++) dot += p[e] * f[e];
        for (int64_t e = 0; e < E; e++) d[e] = c * p[e] * (f[e] - dot);
    }
    return RD_OK;
}

/* ---- per-layer regularization head -------------------------------------------- */

rd_status rd_plr_forward(float *T, const float *h, const float *Wt, const float *bt,
                         int64_t N, int64_t D, int64_t Pd) {
    if (N < 0 || D < 1 || Pd < 1)
        return rd_fail(RD_EINVAL, "plr_forward: need N >= 0, D >= 1, Pd >= 1, got N=%lld D=%lld Pd=%lld",
                       (long long)N, (long long)D, (long long)Pd);
    for (int64_t t = 0; t < N; t++) memcpy(T + t * Pd, bt, (size_t)Pd * sizeof *T);
    return rd_matmul(T, (int)Pd, h, (int)D, 0, Wt, (int)Pd, 0, N, Pd, D, 1.0f, 1.0f);
}

rd_status rd_plr_backward(float *dh, float *dWt, float *dbt, const float *dT, const float *h,
                          const float *Wt, int64_t N, int64_t D, int64_t Pd) {
    if (N < 0 || D < 1 || Pd < 1)
        return rd_fail(RD_EINVAL, "plr_backward: need N >= 0, D >= 1, Pd >= 1, got N=%lld D=%lld Pd=%lld",
                       (long long)N, (long long)D, (long long)Pd);
    rd_status st = rd_matmul(dh, (int)D, dT, (int)Pd, 0, Wt, (int)Pd, 1, N, D, Pd, 1.0f, 0.0f);
    if (st != RD_OK) return st;
    st = rd_matmul(dWt, (int)Pd, h, (int)D, 1, dT, (int)Pd, 0, D, Pd, N, 1.0f, 1.0f);
    if (st != RD_OK) return st;
    for (int64_t t = 0; t < N; t++)
        for (int64_t j = 0; j < Pd; j++) dbt[j] += dT[t * Pd + j];
    return RD_OK;
}

/* Partial sums over fixed chunks of RD_NORM_CHUNK elements, added in chunk order: the
 * same bits at any thread count. */
rd_status rd_plr_loss_forward(float *loss, const float *T, const float *target, int64_t n) {
    if (n < 1) return rd_fail(RD_EINVAL, "plr_loss: need at least one element, got %lld", (long long)n);
    const int64_t nchunk = (n + RD_NORM_CHUNK - 1) / RD_NORM_CHUNK;
    double *part = malloc((size_t)nchunk * sizeof *part);
    if (!part) return rd_fail(RD_ENOMEM, "plr_loss: out of memory for %lld partial sums",
                              (long long)nchunk);
    int64_t bad = n;
#pragma omp parallel for reduction(min : bad) if (n > RD_LOSS_PAR_MIN)
    for (int64_t c = 0; c < nchunk; c++) {
        const int64_t lo = c * RD_NORM_CHUNK, hi = lo + RD_NORM_CHUNK < n ? lo + RD_NORM_CHUNK : n;
        double acc = 0.0;
        for (int64_t i = lo; i < hi; i++) {
            if (!isfinite(target[i]) && i < bad) bad = i;
            double d = (double)T[i] - (double)target[i];
            acc += d * d;
        }
        part[c] = acc;
    }
    double acc = 0.0;
    for (int64_t c = 0; c < nchunk; c++) acc += part[c];
    free(part);
    if (bad < n)
        return rd_fail(RD_EINVAL, "target: non-finite value %g at flat index %lld",
                       (double)target[bad], (long long)bad);
    *loss = (float)(acc / (double)n);
    return RD_OK;
}

rd_status rd_plr_loss_backward(float *dT, float dloss, const float *T, const float *target,
                               int64_t n) {
    if (n < 1) return rd_fail(RD_EINVAL, "plr_loss_backward: need at least one element");
    float c = 2.0f * dloss / (float)n;
#pragma omp parallel for if (n > RD_LOSS_PAR_MIN)
    for (int64_t i = 0; i < n; i++) dT[i] = c * (T[i] - target[i]);
    return RD_OK;
}
