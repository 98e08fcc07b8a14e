/* moe.c — the MoE block of docs/method.md §2-§3 minus the experts (experts.c): the gate
 * functions, the router MLP, and the composite layer router -> gate -> route -> experts ->
 * combine with its learnable thresholds tau, forward and backward. The per-layer state keeps
 * the saved activations of the last forward and grows its buffers on demand. */
#include "../racedit.h"
#include "moe_math.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const gating_names[3] = {"identity", "sigmoid", "softmax"};
const char *rd_gating_name(rd_gating g) { return (unsigned)g < 3 ? gating_names[g] : "?"; }

/* ---- gating ------------------------------------------------------------------ */

static rd_status check_gate(const char *fn, int64_t N, int64_t E, rd_gating g) {
    if (N < 0 || E <= 0)
        return rd_fail(RD_EINVAL, "%s: expected N >= 0 and E > 0, got N=%lld E=%lld", fn,
                       (long long)N, (long long)E);
    if ((unsigned)g > RD_GATE_SOFTMAX)
        return rd_fail(RD_EINVAL, "%s: unknown gating %d (identity=0, sigmoid=1, softmax=2)", fn,
                       (int)g);
    return RD_OK;
}

rd_status rd_gate_forward(float *G, const float *R, int64_t N, int64_t E, rd_gating g) {
    rd_status s = check_gate("gate_forward", N, E, g);
    if (s) return s;
    if (g == RD_GATE_IDENTITY) {
        if (G != R) memcpy(G, R, (size_t)(N * E) * sizeof(float));
    } else if (g == RD_GATE_SIGMOID) {
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < N * E; i++) {
            float r = R[i];            /* exp of a non-positive number only: no overflow */
            if (r >= 0.0f) G[i] = 1.0f / (1.0f + expf(-r));
            else { float z = expf(r); G[i] = z / (1.0f + z); }
        }
    } else {
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < N; t++) {  /* softmax over E, max subtracted */
            const float *r = R + t * E;
            float *gt = G + t * E, m = r[0], sum = 0.0f;
            for (int64_t e = 1; e < E; e++) m = r[e] > m ? r[e] : m;
            for (int64_t e = 0; e < E; e++) { gt[e] = expf(r[e] - m); sum += gt[e]; }
            float inv = 1.0f / sum;
            for (int64_t e = 0; e < E; e++) gt[e] *= inv;
        }
    }
    return RD_OK;
}

rd_status rd_gate_backward(float *dR, const float *dG, const float *G, int64_t N, int64_t E,
                           rd_gating g) {
    rd_status s = check_gate("gate_backward", N, E, g);
    if (s) return s;
    if (g == RD_GATE_IDENTITY) {
        if (dR != dG) memcpy(dR, dG, (size_t)(N * E) * sizeof(float));
    } else if (g == RD_GATE_SIGMOID) {
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < N * E; i++) dR[i] = dG[i] * G[i] * (1.0f - G[i]);
    } else {
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < N; t++) {  /* dR = G (dG - <dG, G>) */
            const float *dg = dG + t * E, *gt = G + t * E;
            float dot = 0.0f;
            for (int64_t e = 0; e < E; e++) dot += dg[e] * gt[e];
            for (int64_t e = 0; e < E; e++) dR[t * E + e] = gt[e] * (dg[e] - dot);
        }
    }
    return RD_OK;
}

/* ---- router MLP -------------------------------------------------------------- */

rd_status rd_router_check(const char *fn, int64_t N, int64_t D, int64_t E) {
    if (N < 0 || D <= 0 || E <= 0)
        return rd_fail(RD_EINVAL, "%s: expected N >= 0 and D, E > 0, got N=%lld D=%lld E=%lld",
                       fn, (long long)N, (long long)D, (long long)E);
    if (N > INT_MAX || D > INT_MAX || E > INT_MAX)
        return rd_fail(RD_EINVAL, "%s: N=%lld, D=%lld or E=%lld exceeds the 32-bit BLAS interface",
                       fn, (long long)N, (long long)D, (long long)E);
    return RD_OK;
}

static rd_status check_router(const char *fn, int64_t N, int64_t D, int64_t E) {
    rd_status s = rd_router_check(fn, N, D, E);
    if (s != RD_OK) return s;
    if (!rd_have_sgemm()) return rd_fail(RD_EBLAS, "no BLAS sgemm registered (import racedit first)");
    return RD_OK;
}

static rd_status router_forward(float *hpre, float *h, float *R, const float *x,
                                const float *Wr, const float *br, const float *Wg,
                                const float *bg, int64_t N, int64_t D, int64_t E) {
    rd_status s;
    if ((s = rd_matmul_par(hpre, (int)D, x, (int)D, 0, Wr, (int)D, 0, N, D, D, 1.0f, 0.0f))) return s;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {
        float *hp = hpre + t * D, *ht = h + t * D;
#pragma omp simd
        for (int64_t c = 0; c < D; c++) {
            float v = hp[c] + br[c];
            hp[c] = v;
            ht[c] = rd_gelu_erf_v(v);
        }
    }
    if ((s = rd_matmul_par(R, (int)E, h, (int)D, 0, Wg, (int)E, 0, N, E, D, 1.0f, 0.0f))) return s;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++)
        for (int64_t e = 0; e < E; e++) R[t * E + e] += bg[e];
    return RD_OK;
}

static rd_status router_backward(float *dx_acc, float *dWr, float *dbr, float *dWg, float *dbg,
                                 float *dh, const float *dR, const float *dh_extra,
                                 const float *hpre, const float *h, const float *x,
                                 const float *Wr, const float *Wg,
                                 int64_t N, int64_t D, int64_t E) {
    rd_status s;
    int64_t all[2] = {0, N};
    /* dh = dR Wg^T (+ dh_extra); dhpre = dh GELU'(hpre), in place */
    if ((s = rd_matmul_par(dh, (int)D, dR, (int)E, 0, Wg, (int)E, 1, N, D, E, 1.0f, 0.0f))) return s;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {
        float *d = dh + t * D;
        const float *hp = hpre + t * D;
        if (dh_extra) {
            const float *ex = dh_extra + t * D;
#pragma omp simd
            for (int64_t c = 0; c < D; c++) d[c] = (d[c] + ex[c]) * rd_gelu_erf_grad_v(hp[c]);
        } else {
#pragma omp simd
            for (int64_t c = 0; c < D; c++) d[c] *= rd_gelu_erf_grad_v(hp[c]);
        }
    }
    if ((s = rd_matmul_par(dWg, (int)E, h, (int)D, 1, dR, (int)E, 0, D, E, N, 1.0f, 1.0f))) return s;
    rd_colsum_segments(dbg, dR, all, 1, E);
    if ((s = rd_matmul_par(dWr, (int)D, x, (int)D, 1, dh, (int)D, 0, D, D, N, 1.0f, 1.0f))) return s;
    rd_colsum_segments(dbr, dh, all, 1, D);
    return rd_matmul_par(dx_acc, (int)D, dh, (int)D, 0, Wr, (int)D, 1, N, D, D, 1.0f, 1.0f);
}

rd_status rd_router_forward(float *hpre, float *h, float *R, const float *x,
                            const float *Wr, const float *br, const float *Wg, const float *bg,
                            int64_t N, int64_t D, int64_t E) {
    rd_status s = check_router("router_forward", N, D, E);
    if (s) return s;
    int prev = rd_blas_threads_enter();
    s = router_forward(hpre, h, R, x, Wr, br, Wg, bg, N, D, E);
    rd_blas_threads_restore(prev);
    return s;
}

rd_status rd_router_backward(float *dx_acc, float *dWr, float *dbr, float *dWg, float *dbg,
                             float *dh, const float *dR, const float *dh_extra,
                             const float *hpre, const float *h, const float *x,
                             const float *Wr, const float *Wg,
                             int64_t N, int64_t D, int64_t E) {
    rd_status s = check_router("router_backward", N, D, E);
    if (s) return s;
    int prev = rd_blas_threads_enter();
    s = router_backward(dx_acc, dWr, dbr, dWg, dbg, dh, dR, dh_extra, hpre, h, x, Wr, Wg, N, D, E);
    rd_blas_threads_restore(prev);
    return s;
}

/* ---- parameters and configuration -------------------------------------------- */

int64_t rd_moe_param_sizes(int64_t sizes[RD_MOE_NPARAM], const rd_moe_cfg *c) {
    sizes[RD_MOE_ROUTER_W] = c->D * c->D;
    sizes[RD_MOE_ROUTER_B] = c->D;
    sizes[RD_MOE_GATE_W] = c->D * c->E;
    sizes[RD_MOE_GATE_B] = c->E;
    sizes[RD_MOE_W1] = c->E * c->D * c->He;
    sizes[RD_MOE_B1] = c->E * c->He;
    sizes[RD_MOE_W2] = c->E * c->He * c->D;
    sizes[RD_MOE_B2] = c->E * c->D;
    sizes[RD_MOE_PLR_W] = c->D * c->plr_dim;
    sizes[RD_MOE_PLR_B] = c->plr_dim;
    int64_t total = 0;
    for (int i = 0; i < RD_MOE_NPARAM; i++) total += sizes[i];
    return total;
}

void rd_moe_params_point(rd_moe_params *out, float *buf, const rd_moe_cfg *cfg) {
    int64_t sizes[RD_MOE_NPARAM];
    rd_moe_param_sizes(sizes, cfg);
    for (int i = 0; i < RD_MOE_NPARAM; i++) {
        out->p[i] = buf;
        buf += sizes[i];
    }
}

rd_status rd_moe_cfg_check(const rd_moe_cfg *c) {
    if (!c) return rd_fail(RD_EINVAL, "moe: NULL config");
    if (c->D <= 0 || c->E <= 0 || c->He <= 0)
        return rd_fail(RD_EINVAL, "moe: expected D, E, He > 0, got D=%lld E=%lld He=%lld",
                       (long long)c->D, (long long)c->E, (long long)c->He);
    if (c->D > INT_MAX || c->E > INT_MAX || c->He > INT_MAX)
        return rd_fail(RD_EINVAL, "moe: D=%lld, E=%lld or He=%lld exceeds the 32-bit BLAS interface",
                       (long long)c->D, (long long)c->E, (long long)c->He);
    if (c->k < 0 || c->k > c->E)
        return rd_fail(RD_EINVAL, "moe: expected 0 <= k <= E=%lld, got k=%lld", (long long)c->E,
                       (long long)c->k);
    if (!(c->beta >= 0.0f && c->beta < 1.0f))
        return rd_fail(RD_EINVAL, "moe: expected 0 <= beta < 1, got beta=%g", (double)c->beta);
    if (c->plr_dim < 0)
        return rd_fail(RD_EINVAL, "moe: expected plr_dim >= 0, got %lld", (long long)c->plr_dim);
    if ((unsigned)c->strategy >= RD_NUM_STRATEGIES)
        return rd_fail(RD_EINVAL, "moe: unknown strategy %d (expected 0..%d)", (int)c->strategy,
                       RD_NUM_STRATEGIES - 1);
    if ((unsigned)c->gating > RD_GATE_SOFTMAX)
        return rd_fail(RD_EINVAL, "moe: unknown gating %d (expected 0..2)", (int)c->gating);
    /* the parameter count: E*D*He and D*plr_dim can overflow (the other products are of
     * sizes <= INT_MAX), then their sum */
    int64_t w1, plr, total = 0, sizes[RD_MOE_NPARAM];
    rd_status s;
    if ((s = RD_SIZE(&w1, sizeof(float), "moe: expert weights (E, D, He)", c->E, c->D, c->He)) ||
        (s = RD_SIZE(&plr, sizeof(float), "moe: PLR head (D, plr_dim)", c->D, c->plr_dim)))
        return s;
    rd_moe_param_sizes(sizes, c);
    for (int i = 0; i < RD_MOE_NPARAM; i++)
        if (__builtin_add_overflow(total, sizes[i], &total))
            return rd_fail(RD_EINVAL, "moe: the parameters of D=%lld E=%lld He=%lld plr_dim=%lld "
                           "are more than a 64-bit size counts", (long long)c->D,
                           (long long)c->E, (long long)c->He, (long long)c->plr_dim);
    return RD_OK;
}

rd_status rd_moe_forward_check(const char *fn, const rd_moe_cfg *cfg, int64_t B, int64_t L) {
    rd_status s = rd_moe_cfg_check(cfg);
    if (s) return s;
    if (B <= 0 || L <= 0 || B * L > INT_MAX)
        return rd_fail(RD_EINVAL, "%s: expected B, L >= 1 and B*L <= %d, got B=%lld L=%lld", fn,
                       INT_MAX, (long long)B, (long long)L);
    return RD_OK;
}

rd_status rd_moe_backward_check(const char *fn, const rd_moe_cfg *cfg, int have_forward,
                                int64_t D, int64_t E, int64_t He) {
    rd_status s = rd_moe_cfg_check(cfg);
    if (s) return s;
    if (!have_forward)
        return rd_fail(RD_ESTATE, "%s: no forward to differentiate (call forward first)", fn);
    if (cfg->D != D || cfg->E != E || cfg->He != He)
        return rd_fail(RD_ESTATE, "%s: config D=%lld E=%lld He=%lld differs from the last "
                       "forward's D=%lld E=%lld He=%lld", fn, (long long)cfg->D,
                       (long long)cfg->E, (long long)cfg->He, (long long)D, (long long)E,
                       (long long)He);
    return RD_OK;
}

rd_status rd_moe_ntau_check(const char *fn, const rd_moe_cfg *c, int have_tau, int64_t ntau,
                            int64_t L, int64_t nt) {
    if (!have_tau || ntau == nt) return RD_OK;
    return rd_fail(RD_ESTATE, "%s: the layer holds %lld thresholds, strategy %s with L=%lld, "
                   "E=%lld needs %lld (set matching thresholds or forget them)", fn,
                   (long long)ntau, rd_strategy_name(c->strategy), (long long)L,
                   (long long)c->E, (long long)nt);
}

/* ---- the composite layer ----------------------------------------------------- */

struct rd_moe_state {
    int64_t B, L, N, D, E, He;  /* sizes of the last forward */
    int have_forward, have_tau;
    float tau, tau_b;           /* mean of the thresholds, mean K-th value of the last batch */
    int64_t ntau, cap_tau;      /* thresholds held, and room in taus and kth */
    float *taus, *kth;          /* (ntau) thresholds; (ntau) the last batch's K-th values */
    int64_t cap_ND, cap_NE;     /* capacity (elements) of the (N,D) and (N,E) buffers */
    int64_t cap_dND, cap_dNE;   /* ... and of the backward's, grown by the first backward */
    float *hpre, *h, *dh;       /* (N,D) router pre-activation, hidden, backward scratch */
    float *R, *G, *dG, *dR;     /* (N,E) logits, gates and their gradients */
    uint8_t *mask;              /* (N,E) selection */
    rd_experts *ex;             /* dispatch + expert activations */
    rd_moe_aux_state *aux;      /* aux losses and diagnostics (moe_aux.c) */
};

rd_moe_state *rd_moe_state_new(void) {
    rd_moe_state *st = (rd_moe_state *)calloc(1, sizeof(rd_moe_state));
    if (!st) return NULL;
    st->ex = rd_experts_new();
    st->aux = rd_moe_aux_new();
    if (!st->ex || !st->aux) { rd_experts_free(st->ex); rd_moe_aux_free(st->aux); free(st); return NULL; }
    return st;
}

void rd_moe_state_free(rd_moe_state *st) {
    if (!st) return;
    free(st->hpre); free(st->h); free(st->dh);
    free(st->R); free(st->G); free(st->dG); free(st->dR); free(st->mask);
    free(st->taus); free(st->kth);
    rd_experts_free(st->ex);
    rd_moe_aux_free(st->aux);
    free(st);
}

static int grow(void **p, size_t bytes) {
    void *q = realloc(*p, bytes ? bytes : 1);
    if (!q) return -1;
    *p = q;
    return 0;
}

/* Make room for a forward of N tokens; the contents are not kept. The backward's scratch
 * comes with the first backward (reserve_backward): a layer only ever run forward (eval,
 * inference) never holds it. */
static rd_status reserve(rd_moe_state *st, int64_t N, int64_t D, int64_t E) {
    int64_t ND, NE; /* element sizes: the bytes one (t, d) or (t, e) takes over its buffers */
    rd_status s;
    if ((s = RD_SIZE(&ND, 2 * sizeof(float), "moe: (N, D) buffers", N, D)) ||
        (s = RD_SIZE(&NE, 2 * sizeof(float) + 1, "moe: (N, E) buffers", N, E)))
        return s;
    if (ND > st->cap_ND) {
        size_t b = (size_t)ND * sizeof(float);
        if (grow((void **)&st->hpre, b) || grow((void **)&st->h, b))
            return rd_fail(RD_ENOMEM, "moe: out of memory for %lld tokens x D=%lld", (long long)N,
                           (long long)D);
        st->cap_ND = ND;
    }
    if (NE > st->cap_NE) {
        size_t b = (size_t)NE * sizeof(float);
        if (grow((void **)&st->R, b) || grow((void **)&st->G, b) ||
            grow((void **)&st->mask, (size_t)NE))
            return rd_fail(RD_ENOMEM, "moe: out of memory for %lld tokens x E=%lld", (long long)N,
                           (long long)E);
        st->cap_NE = NE;
    }
    return RD_OK;
}

/* The backward's scratch dh (N,D), dG and dR (N,E) for the last forward's N tokens. */
static rd_status reserve_backward(rd_moe_state *st) {
    const int64_t ND = st->N * st->D, NE = st->N * st->E;
    if (ND > st->cap_dND) {
        if (grow((void **)&st->dh, (size_t)ND * sizeof(float)))
            return rd_fail(RD_ENOMEM, "moe_backward: out of memory for %lld tokens x D=%lld",
                           (long long)st->N, (long long)st->D);
        st->cap_dND = ND;
    }
    if (NE > st->cap_dNE) {
        if (grow((void **)&st->dG, (size_t)NE * sizeof(float)) ||
            grow((void **)&st->dR, (size_t)NE * sizeof(float)))
            return rd_fail(RD_ENOMEM, "moe_backward: out of memory for %lld tokens x E=%lld",
                           (long long)st->N, (long long)st->E);
        st->cap_dNE = NE;
    }
    return RD_OK;
}

/* Room for n thresholds and K-th values; the thresholds held are kept. */
static rd_status reserve_tau(rd_moe_state *st, int64_t n) {
    if (n <= st->cap_tau) return RD_OK;
    if (grow((void **)&st->taus, (size_t)n * sizeof(float)) ||
        grow((void **)&st->kth, (size_t)n * sizeof(float)))
        return rd_fail(RD_ENOMEM, "moe: out of memory for %lld thresholds", (long long)n);
    st->cap_tau = n;
    return RD_OK;
}

/* The selection of docs/method.md §2-§3: batch top-K in training (recording each
 * threshold group's K-th value in kth and their mean in tau_b); in eval, token, expert and
 * LE choice keep their exact per-group top-K, BL / BE / race select G >= tau per pair, or,
 * with eval_topk or without thresholds yet (a layer never trained), the same batch top-K,
 * recording nothing. */
static rd_status select_pairs(rd_moe_state *st, float *tau_b, const rd_moe_cfg *c, int64_t B,
                              int64_t L, int training) {
    int64_t E = c->E, nt = rd_route_num_thresholds(c->strategy, L, E);
    rd_status s;
    if (training) {
        if ((s = rd_moe_ntau_check("thresholds", c, st->have_tau, st->ntau, L, nt)) ||
            (s = reserve_tau(st, nt)))
            return s;
        return rd_route_kth(st->mask, nt ? st->kth : NULL, tau_b, st->G, B, L, E, c->k,
                            c->strategy);
    }
    if (c->eval_topk || nt == 0 || !st->have_tau)
        return rd_route(st->mask, NULL, st->G, B, L, E, c->k, c->strategy);
    if ((s = rd_moe_ntau_check("thresholds", c, st->have_tau, st->ntau, L, nt))) return s;
    return rd_route_thresholds(st->mask, st->G, st->taus, B, L, E, c->strategy);
}

/* Mean of the thresholds, a diagnostic (the scalar tau of race itself). */
static float tau_mean(const float *taus, int64_t n) {
    double sum = 0.0;
    for (int64_t g = 0; g < n; g++) sum += taus[g];
    return n ? (float)(sum / (double)n) : NAN;
}

/* tau[g] <- beta tau[g] + (1 - beta) kth[g]; the first batch sets tau = kth. */
static void update_tau(rd_moe_state *st, const rd_moe_cfg *c, int64_t nt, float tau_b) {
    for (int64_t g = 0; g < nt; g++)
        st->taus[g] = st->have_tau ? c->beta * st->taus[g] + (1.0f - c->beta) * st->kth[g]
                                   : st->kth[g];
    st->ntau = nt;
    st->tau_b = tau_b;
    st->tau = tau_mean(st->taus, nt);
    st->have_tau = 1;
}

static rd_status moe_forward(rd_moe_state *st, float *y, const float *x,
                             const rd_moe_cfg *cfg, const rd_moe_params *p,
                             int64_t B, int64_t L, int training, const float *plr_target) {
    if (!st) return rd_fail(RD_EINVAL, "moe_forward: NULL state");
    rd_status s = rd_moe_forward_check("moe_forward", cfg, B, L);
    if (s) return s;
    int64_t N = B * L, D = cfg->D, E = cfg->E, He = cfg->He;
    st->have_forward = 0;
    if ((s = reserve(st, N, D, E))) return s;
    s = rd_router_forward(st->hpre, st->h, st->R, x, p->p[RD_MOE_ROUTER_W], p->p[RD_MOE_ROUTER_B],
                          p->p[RD_MOE_GATE_W], p->p[RD_MOE_GATE_B], N, D, E);
    if (s) return s;
    if ((s = rd_gate_forward(st->G, st->R, N, E, cfg->gating))) return s;
    float tau_b = NAN;
    if ((s = select_pairs(st, &tau_b, cfg, B, L, training))) {
        char msg[400];
        snprintf(msg, sizeof msg, "%s", rd_last_error());
        return rd_fail(s, "moe_forward: selecting pairs by the gates G (%s, strategy %s): %s",
                       training ? "training" : "eval", rd_strategy_name(cfg->strategy), msg);
    }
    /* aux losses (training) and diagnostics on R, h and the selection: moe_aux.c */
    s = rd_moe_aux_forward(st->aux, st->R, st->h, st->mask, plr_target, cfg, p, N, training);
    if (s) return s;
    s = rd_experts_forward(st->ex, y, st->mask, st->G, x, p->p[RD_MOE_W1], p->p[RD_MOE_B1],
                           p->p[RD_MOE_W2], p->p[RD_MOE_B2], N, D, E, He);
    if (s) return s;
    if (training) update_tau(st, cfg, rd_route_num_thresholds(cfg->strategy, L, E), tau_b);
    st->B = B; st->L = L; st->N = N; st->D = D; st->E = E; st->He = He;
    st->have_forward = 1;
    return RD_OK;
}

static rd_status moe_backward(rd_moe_state *st, float *dx, const rd_moe_params *grad,
                              const float *dy, const float *x,
                              const rd_moe_cfg *cfg, const rd_moe_params *p) {
    if (!st) return rd_fail(RD_EINVAL, "moe_backward: NULL state");
    rd_status s = rd_moe_backward_check("moe_backward", cfg, st->have_forward, st->D, st->E,
                                        st->He);
    if (s) return s;
    int64_t N = st->N, D = st->D, E = st->E, He = st->He;
    if ((s = reserve_backward(st))) return s;
    s = rd_experts_backward(st->ex, dx, st->dG, grad->p[RD_MOE_W1], grad->p[RD_MOE_B1],
                            grad->p[RD_MOE_W2], grad->p[RD_MOE_B2], dy, p->p[RD_MOE_W1],
                            p->p[RD_MOE_W2], N, D, E, He);
    if (s) return s;
    if ((s = rd_gate_backward(st->dR, st->dG, st->G, N, E, cfg->gating))) return s;
    const float *dh_extra = NULL;   /* aux losses: weighted grads into dR, PLR head's on h */
    if ((s = rd_moe_aux_backward(st->aux, st->dR, &dh_extra, grad, st->h, p))) return s;
    return rd_router_backward(dx, grad->p[RD_MOE_ROUTER_W], grad->p[RD_MOE_ROUTER_B],
                              grad->p[RD_MOE_GATE_W], grad->p[RD_MOE_GATE_B], st->dh, st->dR,
                              dh_extra, st->hpre, st->h, x, p->p[RD_MOE_ROUTER_W],
                              p->p[RD_MOE_GATE_W], N, D, E);
}

/* The BLAS is made single-threaded once for the whole layer (RD_THREADS_OMP mode). */
rd_status rd_moe_forward(rd_moe_state *st, float *y, const float *x,
                         const rd_moe_cfg *cfg, const rd_moe_params *p,
                         int64_t B, int64_t L, int training, const float *plr_target) {
    int prev = rd_blas_threads_enter();
    rd_status s = moe_forward(st, y, x, cfg, p, B, L, training, plr_target);
    rd_blas_threads_restore(prev);
    return s;
}

rd_status rd_moe_backward(rd_moe_state *st, float *dx, const rd_moe_params *grad,
                          const float *dy, const float *x,
                          const rd_moe_cfg *cfg, const rd_moe_params *p) {
    int prev = rd_blas_threads_enter();
    rd_status s = moe_backward(st, dx, grad, dy, x, cfg, p);
    rd_blas_threads_restore(prev);
    return s;
}

void rd_moe_state_view(const rd_moe_state *st, rd_moe_view *v) {
    memset(v, 0, sizeof *v);
    if (!st) return;
    v->have_tau = st->have_tau;
    v->ntau = st->have_tau ? st->ntau : 0;
    v->taus = st->taus;
    v->tau = st->have_tau ? st->tau : NAN;
    v->tau_b = st->tau_b;
    if (!st->have_forward) return;
    v->have_forward = 1;
    v->B = st->B; v->L = st->L; v->N = st->N; v->D = st->D; v->E = st->E; v->He = st->He;
    v->P = rd_experts_pairs(st->ex);
    v->mask = st->mask; v->G = st->G; v->R = st->R; v->h = st->h;
    v->counts = rd_experts_counts(st->ex);
}

rd_status rd_moe_get_aux(const rd_moe_state *st, rd_moe_aux *out) {
    if (!st) return rd_fail(RD_EINVAL, "moe_get_aux: NULL state");
    rd_moe_aux_read(st->have_forward ? st->aux : NULL, out);
    out->tau = st->tau;
    out->tau_b = st->tau_b;
    return RD_OK;
}

rd_status rd_moe_set_threshold(rd_moe_state *st, const float *tau, int64_t n) {
    if (!st) return rd_fail(RD_EINVAL, "moe_set_threshold: NULL state");
    if (!tau) { st->have_tau = 0; return RD_OK; }
    if (n < 0) return rd_fail(RD_EINVAL, "moe_set_threshold: negative count n=%lld", (long long)n);
    for (int64_t g = 0; g < n; g++)
        if (isnan(tau[g])) return rd_fail(RD_EINVAL, "moe_set_threshold: tau[%lld] is NaN", (long long)g);
    rd_status s = reserve_tau(st, n);
    if (s) return s;
    if (n) memmove(st->taus, tau, (size_t)n * sizeof(float));
    st->ntau = n;
    st->tau = tau_mean(st->taus, n);
    st->have_tau = 1;
    return RD_OK;
}
