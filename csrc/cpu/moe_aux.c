/* moe_aux.c — the MoE layer's auxiliary losses and diagnostics (docs/method.md §4-§6), as two
 * hooks that rd_moe_forward / rd_moe_backward call, plus the state they keep between the two:
 * the router softmax P, the similarity weights W, the balance shares f, the PLR head's
 * prediction T and its weighted gradient. The co-selection counts M^T M are computed once and
 * serve the similarity weights, the loads and the combination usage. */
#include "../racedit.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct rd_moe_aux_state {
    rd_moe_aux v;               /* values of the last forward (pointers into the buffers) */
    int64_t D;
    float w_sim, w_bal, w_plr;  /* the weights of the last forward, used by its backward  */
    int64_t cap_NE, cap_ND, cap_NP, cap_EE, cap_E;   /* elements */
    float *P, *S;               /* (N,E) router softmax; backward scratch                 */
    float *T, *dT;              /* (N,plr_dim) PLR prediction; plr_weight * dL_PLR/dT     */
    float *dh;                  /* (N,D) the PLR head's gradient on h                      */
    float *W, *f;               /* (E,E) similarity weights; (E) balance shares            */
    int64_t *C, *load;          /* (E,E) co-selection counts; (E) loads                    */
};

rd_moe_aux_state *rd_moe_aux_new(void) { return calloc(1, sizeof(rd_moe_aux_state)); }

void rd_moe_aux_free(rd_moe_aux_state *a) {
    if (!a) return;
    free(a->P); free(a->S); free(a->T); free(a->dT); free(a->dh);
    free(a->W); free(a->f); free(a->C); free(a->load);
    free(a);
}

/* Grow the one or two buffers of a group to rows x cols elements of `elem` bytes each;
 * -1 when out of memory or when the size does not fit (RD_MAX_ALLOC_BYTES). */
static int grow(int64_t *cap, int64_t rows, int64_t cols, size_t elem, void **b1, void **b2) {
    int64_t n;
    if (!rd_mul_ok(rows, cols, &n) || (double)n * (double)elem > RD_MAX_ALLOC_BYTES) return -1;
    if (n <= *cap) return 0;
    void *q = realloc(*b1, (size_t)n * elem);
    if (!q) return -1;
    *b1 = q;
    if (b2) {
        if (!(q = realloc(*b2, (size_t)n * elem))) return -1;
        *b2 = q;
    }
    *cap = n;
    return 0;
}

/* Buffers for N tokens; the (N,E), (N,plr_dim) and (N,D) ones only when a loss needs them
 * (training), so an eval forward holds none. W and f share the 8-byte groups of C and load
 * (they are float: twice the room they need). */
static rd_status reserve(rd_moe_aux_state *a, const rd_moe_cfg *c, int64_t N, int need_P,
                         int need_plr) {
    int64_t E = c->E, Pd = need_plr ? c->plr_dim : 0;
    if (grow(&a->cap_NE, need_P ? N : 0, E, sizeof(float), (void **)&a->P, (void **)&a->S) ||
        grow(&a->cap_NP, N, Pd, sizeof(float), (void **)&a->T, (void **)&a->dT) ||
        grow(&a->cap_ND, Pd ? N : 0, c->D, sizeof(float), (void **)&a->dh, NULL) ||
        grow(&a->cap_EE, E, E, sizeof(int64_t), (void **)&a->W, (void **)&a->C) ||
        grow(&a->cap_E, E, 1, sizeof(int64_t), (void **)&a->f, (void **)&a->load))
        return rd_fail(RD_ENOMEM, "moe aux: out of memory for N=%lld E=%lld plr_dim=%lld",
                       (long long)N, (long long)E, (long long)Pd);
    return RD_OK;
}

rd_status rd_moe_aux_weights_check(const rd_moe_cfg *c) {
    const char *names[3] = {"sim_weight", "balance_weight", "plr_weight"};
    float w[3] = {c->sim_weight, c->balance_weight, c->plr_weight};
    for (int i = 0; i < 3; i++)
        if (!(w[i] >= 0.0f) || isinf(w[i]))
            return rd_fail(RD_EINVAL, "moe: expected a finite %s >= 0, got %g", names[i], (double)w[i]);
    if ((c->sim_weight > 0.0f || c->balance_weight > 0.0f) && c->E < 2)
        return rd_fail(RD_EINVAL, "moe: sim_weight / balance_weight > 0 need E >= 2 experts, got E=%lld",
                       (long long)c->E);
    return RD_OK;
}

/* The diagnostics of docs/method.md §6 from the counts. */
static rd_status diagnose(rd_moe_aux_state *a, const uint8_t *mask, int64_t N, int64_t E) {
    rd_status st = rd_coselect_counts(a->C, mask, N, E);
    if (st) return st;
    int64_t pairs = 0;
    for (int64_t e = 0; e < E; e++) pairs += a->load[e] = a->C[e * E + e];
    a->v.experts_per_token = N > 0 ? (double)pairs / (double)N : 0.0;
    if ((st = rd_max_violation(&a->v.max_violation, a->load, E))) return st;
    if ((st = rd_dead_experts(&a->v.dead_experts, a->load, E))) return st;
    return rd_combination_usage(&a->v.combination_usage, a->C, E, 0.95);
}

rd_status rd_moe_aux_forward(rd_moe_aux_state *a, const float *R, const float *h,
                             const uint8_t *mask, const float *plr_target,
                             const rd_moe_cfg *cfg, const rd_moe_params *p, int64_t N,
                             int training) {
    if (!a) return rd_fail(RD_EINVAL, "moe aux: NULL state");
    rd_status st = rd_moe_aux_weights_check(cfg);
    if (st) return st;
    int64_t E = cfg->E, D = cfg->D, Pd = cfg->plr_dim;
    int sim = training && cfg->sim_weight > 0.0f, bal = training && cfg->balance_weight > 0.0f;
    memset(&a->v, 0, sizeof a->v);
    if ((st = reserve(a, cfg, N, sim || bal, training && Pd > 0))) return st;
    a->v.N = N; a->v.E = E; a->v.plr_dim = Pd; a->v.training = training;
    a->D = D;
    a->w_sim = cfg->sim_weight; a->w_bal = cfg->balance_weight; a->w_plr = cfg->plr_weight;
    a->v.load = a->load;
    if ((st = diagnose(a, mask, N, E))) return st;
    if (sim || bal) {
        if ((st = rd_softmax_forward(a->P, R, N, E))) return st;
    }
    if (sim) {
        rd_similarity_weights(a->W, a->C, E);
        if ((st = rd_router_similarity_value(&a->v.sim_loss, a->P, a->W, N, E))) return st;
        a->v.has_sim = 1;
    }
    if (bal) {
        if ((st = rd_balance_value(&a->v.balance_loss, a->f, a->P, a->load, N, E))) return st;
        a->v.has_balance = 1;
    }
    if (training && Pd > 0) {
        st = rd_plr_forward(a->T, h, p->p[RD_MOE_PLR_W], p->p[RD_MOE_PLR_B], N, D, Pd);
        if (st) return st;
        a->v.plr_pred = a->T;
        if (plr_target) {
            if ((st = rd_plr_loss_forward(&a->v.plr_loss, a->T, plr_target, N * Pd))) return st;
            st = rd_plr_loss_backward(a->dT, a->w_plr, a->T, plr_target, N * Pd);
            if (st) return st;
            a->v.has_plr = 1;
        }
    }
    a->v.aux_loss = a->w_sim * a->v.sim_loss + a->w_bal * a->v.balance_loss +
                    (a->v.has_plr ? a->w_plr * a->v.plr_loss : 0.0f);
    return RD_OK;
}

static void add_into(float *dst, const float *src, int64_t n) {
#pragma omp parallel for schedule(static) if (n > (1 << 18))
    for (int64_t i = 0; i < n; i++) dst[i] += src[i];
}

rd_status rd_moe_aux_backward(rd_moe_aux_state *a, float *dR_acc, const float **dh_extra,
                              const rd_moe_params *grad, const float *h, const rd_moe_params *p) {
    *dh_extra = NULL;
    if (!a) return rd_fail(RD_EINVAL, "moe aux: NULL state");
    int64_t N = a->v.N, E = a->v.E, Pd = a->v.plr_dim, D = a->D;
    rd_status st;
    if (a->v.has_sim) {
        if ((st = rd_router_similarity_backward(a->S, a->w_sim, a->P, a->W, N, E))) return st;
        add_into(dR_acc, a->S, N * E);
    }
    if (a->v.has_balance) {
        if ((st = rd_balance_backward(a->S, a->w_bal, a->P, a->f, N, E))) return st;
        add_into(dR_acc, a->S, N * E);
    }
    if (a->v.has_plr && a->w_plr > 0.0f) {
        st = rd_plr_backward(a->dh, grad->p[RD_MOE_PLR_W], grad->p[RD_MOE_PLR_B], a->dT, h,
                             p->p[RD_MOE_PLR_W], N, D, Pd);
        if (st) return st;
        *dh_extra = a->dh;
    }
    return RD_OK;
}

void rd_moe_aux_read(const rd_moe_aux_state *a, rd_moe_aux *out) {
    memset(out, 0, sizeof *out);
    if (a) *out = a->v;
}
