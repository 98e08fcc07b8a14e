/* losses.h — the router's auxiliary losses and the routing diagnostics (docs/method.md §4-§6):
 * the router-similarity loss, the balance loss, the per-layer regularization (PLR) head
 * and its loss, MaxVio, combination usage, per-expert load, dead experts and the
 * allocation of experts by a per-sample key. Included by racedit.h; see there for
 * conventions. `mask` is the selection M (N,E) of docs/method.md §2, one byte per pair (0 or 1).
 *
 * Degenerate masks never give NaN:
 *  - similarity loss: when no pair is selected the diagonal weights are 0; when no two
 *    experts share a token (E = 1 is refused, but e.g. every token has <= 1 expert) the
 *    off-diagonal weights are 0. The loss is then the remaining terms only, and 0 when
 *    nothing is selected.
 *  - balance loss: f = 0 when nothing is selected, so the loss and its gradient are 0.
 * Both losses need E >= 2 (with one expert softmax is constant: nothing to learn) and
 * N >= 1, and reject non-finite logits.
 */
#ifndef RACEDIT_LOSSES_H
#define RACEDIT_LOSSES_H

/* ---- shared by the losses and the diagnostics --------------------------------- */

/* P (N,E) = softmax over E of R (N,E). RD_EINVAL on a non-finite logit. */
rd_status rd_softmax_forward(float *P, const float *R, int64_t N, int64_t E);
/* dR (N,E) = softmax backward of dP (N,E) given P; dR may alias dP. */
rd_status rd_softmax_backward(float *dR, const float *dP, const float *P, int64_t N, int64_t E);

/* load (E) = sum_t mask[t,e]. */
rd_status rd_expert_load(int64_t *load, const uint8_t *mask /* N,E */, int64_t N, int64_t E);
/* C (E,E) = M^T M in exact integers: C[i,j] = number of tokens that selected both i and j;
 * the diagonal is the load. Enumerates the selected experts of each token, O(N*E + N*k^2). */
rd_status rd_coselect_counts(int64_t *C, const uint8_t *mask /* N,E */, int64_t N, int64_t E);

/* ---- router-similarity loss (docs/method.md §5) ----------------------------------------- */

/* P = softmax(R); M' = M^T M; W[i,i] = E M'[i,i] / sum_k M'[k,k];
 * W[i,j] = (E^2-E) M'[i,j] / sum_{k!=l} M'[k,l] (i != j); loss = (1/N) sum W o (P^T P).
 * Outputs: loss (scalar); saved for backward: P (N,E), W (E,E). */
rd_status rd_router_similarity_forward(float *loss, float *P, float *W,
                                       const float *R /* N,E */, const uint8_t *mask /* N,E */,
                                       int64_t N, int64_t E);
/* The two steps after the softmax, for callers that already hold P and the counts:
 * W (E,E) from co-selection counts C (E,E) (rd_coselect_counts), and
 * loss = (1/N) sum W o (P^T P) for P (N,E). */
void rd_similarity_weights(float *W, const int64_t *C, int64_t E);
rd_status rd_router_similarity_value(float *loss, const float *P, const float *W, int64_t N,
                                     int64_t E);
/* dR (N,E) = dloss * d(loss)/dR = softmax backward of (dloss/N) P (W + W^T). ASSIGNS. */
rd_status rd_router_similarity_backward(float *dR, float dloss, const float *P /* N,E */,
                                        const float *W /* E,E */, int64_t N, int64_t E);

/* ---- balance loss (docs/method.md §5, Switch/GShard) ------------------------------------ */

/* loss = E sum_i f_i Pbar_i, f_i = load_i / sum_k load_k (0 when nothing is selected),
 * Pbar_i = mean_t P[t,i], P = softmax(R). Saved for backward: P (N,E), f (E). */
rd_status rd_balance_forward(float *loss, float *P, float *f,
                             const float *R /* N,E */, const uint8_t *mask /* N,E */,
                             int64_t N, int64_t E);
/* The step after the softmax: f (E) from load (E), and the loss, for P (N,E). */
rd_status rd_balance_value(float *loss, float *f, const float *P, const int64_t *load,
                           int64_t N, int64_t E);
/* dR (N,E) = softmax backward of dP[t,i] = dloss E f_i / N (f is constant). ASSIGNS. */
rd_status rd_balance_backward(float *dR, float dloss, const float *P /* N,E */,
                              const float *f /* E */, int64_t N, int64_t E);

/* ---- per-layer regularization head (docs/method.md §4) ---------------------------------- */

/* T (N,Pd) = h (N,D) Wt (D,Pd) + bt (Pd). */
rd_status rd_plr_forward(float *T, const float *h, const float *Wt, const float *bt,
                         int64_t N, int64_t D, int64_t Pd);
/* dh (N,D) = dT Wt^T (ASSIGNS; pass it as dh_extra to rd_router_backward);
 * dWt (D,Pd) += h^T dT; dbt (Pd) += sum_t dT. */
rd_status rd_plr_backward(float *dh, float *dWt, float *dbt, const float *dT /* N,Pd */,
                          const float *h /* N,D */, const float *Wt /* D,Pd */,
                          int64_t N, int64_t D, int64_t Pd);
/* loss = mean over the n = N*Pd entries of (T - target)^2, accumulated in double.
 * RD_EINVAL when n == 0 or target holds a non-finite value. */
rd_status rd_plr_loss_forward(float *loss, const float *T, const float *target, int64_t n);
/* dT (n) = dloss * 2 (T - target) / n. ASSIGNS. */
rd_status rd_plr_loss_backward(float *dT, float dloss, const float *T, const float *target,
                               int64_t n);

/* ---- diagnostics (docs/method.md §6), O(N*E + N*k^2 + E^2 log E) ------------------------- */

/* (max_i load_i - mean_i load_i) / mean_i load_i; 0 when nothing is selected. */
rd_status rd_max_violation(double *out, const int64_t *load /* E */, int64_t E);
/* Number of experts with load 0. */
rd_status rd_dead_experts(int64_t *out, const int64_t *load /* E */, int64_t E);
/* Combination usage from co-selection counts C (E,E) (rd_coselect_counts): the C(E,2)
 * unordered pairs i<j are a histogram with C[i,j] in bin (i,j); sorted descending, the
 * number n of bins whose cumulative count stays strictly below coverage * total (a
 * cumulative count within a relative 1e-12 of it counts as reaching it) gives
 * out = n / C(E,2). So a uniform histogram gives (ceil(coverage * C(E,2)) - 1) / C(E,2)
 * and one pair holding at least `coverage` of the mass gives 0.
 * out = 0 when E < 2 or no token has two experts. coverage in (0, 1]. */
rd_status rd_combination_usage(double *out, const int64_t *C /* E,E */, int64_t E,
                               double coverage);
/* For each key bucket b: count[b] = number of samples with keys[s] == b and
 * mean[b] = (selected pairs of those samples) / (count[b] * L), the mean number of
 * experts per token; mean[b] = NaN when count[b] == 0 (or L == 0). keys must lie in
 * [0, NB). */
rd_status rd_allocation_by_key(double *mean /* NB */, int64_t *count /* NB */,
                               const uint8_t *mask /* B,L,E */, const int64_t *keys /* B */,
                               int64_t B, int64_t L, int64_t E, int64_t NB);

/* ---- the MoE layer's aux losses and diagnostics --------------------------------
 * rd_moe_forward / rd_moe_backward (moe.c) call these hooks; the aux state lives in the
 * layer's state. In a training forward: L_sim (cfg->sim_weight > 0), L_bal
 * (cfg->balance_weight > 0), the PLR head's prediction T = h Wt + bt (cfg->plr_dim > 0)
 * and, given a target, L_PLR = mean((T - target)^2). Eval forwards skip all of these
 * (the head costs nothing at inference). The diagnostics are computed on every forward.
 * Backward adds sim_weight * dL_sim/dR + balance_weight * dL_bal/dR into dR and
 * plr_weight * dL_PLR/dh as dh_extra (plus dWt, dbt). L_PLR is this layer's: a model
 * averaging over its layers sets plr_weight = lambda_PLR / layers. */
typedef struct {
    int64_t N, E, plr_dim;     /* sizes of the last forward (0 before any)                */
    int training;              /* 1 if the last forward was a training forward            */
    int has_sim, has_balance, has_plr;   /* which losses the last forward computed         */
    float sim_loss;            /* L_sim, unweighted (0 when not computed)                 */
    float balance_loss;        /* L_bal, unweighted                                       */
    float plr_loss;            /* L_PLR, unweighted                                       */
    float aux_loss;            /* sim_w L_sim + balance_w L_bal + plr_w L_PLR (computed)  */
    double max_violation;      /* MaxVio of the last selection                            */
    double combination_usage;  /* at coverage 0.95                                        */
    double experts_per_token;  /* selected pairs / N                                      */
    int64_t dead_experts;      /* experts with load 0                                     */
    float tau, tau_b;          /* the layer's threshold and its last batch threshold      */
    const int64_t *load;       /* (E) tokens per expert; owned by the state               */
    const float *plr_pred;     /* (N,plr_dim) T of the last training forward, or NULL     */
} rd_moe_aux;

typedef struct rd_moe_aux_state rd_moe_aux_state;
rd_moe_aux_state *rd_moe_aux_new(void);
void rd_moe_aux_free(rd_moe_aux_state *a);
/* Hook of rd_moe_forward, after the selection. R (N,E) logits, h (N,D) router hidden,
 * mask (N,E), plr_target (N,plr_dim) or NULL. RD_EINVAL: sim/balance weight > 0 with
 * E < 2, a non-finite logit or target. */
rd_status rd_moe_aux_forward(rd_moe_aux_state *a, const float *R, const float *h,
                             const uint8_t *mask, const float *plr_target,
                             const rd_moe_cfg *cfg, const rd_moe_params *p, int64_t N,
                             int training);
/* Hook of rd_moe_backward, before the router's backward, for the last forward (with the
 * weights that forward saw): dR_acc (N,E) ACCUMULATES the weighted sim/balance
 * gradients; *dh_extra <- the PLR head's weighted gradient on h (N,D, owned by the aux
 * state) or NULL; grad's PLR_W / PLR_B ACCUMULATE. h (N,D) is the router hidden. */
rd_status rd_moe_aux_backward(rd_moe_aux_state *a, float *dR_acc, const float **dh_extra,
                              const rd_moe_params *grad, const float *h, const rd_moe_params *p);
/* The aux values of the last forward (tau and tau_b left 0: rd_moe_get_aux fills them). */
void rd_moe_aux_read(const rd_moe_aux_state *a, rd_moe_aux *out);
/* Aux losses and diagnostics of the layer's last forward (moe.c). */
rd_status rd_moe_get_aux(const rd_moe_state *st, rd_moe_aux *out);

#endif
