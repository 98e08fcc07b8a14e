/* moe.h — the MoE block of SPEC §2: router MLP, gating, dropless expert FFN,
 * and the composite layer (router -> gate -> route -> experts -> combine) with its
 * learnable threshold. Included by racedit.h; see there for conventions. */
#ifndef RACEDIT_MOE_H
#define RACEDIT_MOE_H

typedef enum { RD_GATE_IDENTITY = 0, RD_GATE_SIGMOID = 1, RD_GATE_SOFTMAX = 2 } rd_gating;
const char *rd_gating_name(rd_gating g);       /* "identity", "sigmoid", "softmax" */

/* G (N,E) = gate(R (N,E)); softmax over E. */
rd_status rd_gate_forward(float *G, const float *R, int64_t N, int64_t E, rd_gating g);
/* dR (N,E) = dG through the gate; uses the forward output G. */
rd_status rd_gate_backward(float *dR, const float *dG, const float *G, int64_t N, int64_t E,
                           rd_gating g);

/* Router MLP: hpre (N,D) = x Wr + br; h (N,D) = GELU_erf(hpre); R (N,E) = h Wg + bg.
 * Wr (D,D), br (D), Wg (D,E), bg (E). */
rd_status rd_router_forward(float *hpre, float *h, float *R, const float *x,
                            const float *Wr, const float *br, const float *Wg, const float *bg,
                            int64_t N, int64_t D, int64_t E);
/* Backward. dh (N,D) is scratch owned by the caller. dh_extra (N,D, may be NULL) is a
 * gradient reaching h from another head (PLR). dx_acc (N,D) ACCUMULATES. */
rd_status rd_router_backward(float *dx_acc, float *dWr, float *dbr, float *dWg, float *dbg,
                             float *dh, const float *dR, const float *dh_extra,
                             const float *hpre, const float *h, const float *x,
                             const float *Wr, const float *Wg,
                             int64_t N, int64_t D, int64_t E);

/* ---- the composite layer ----------------------------------------------------- */
typedef struct {
    int64_t D, E, He, k;     /* He = 4*D/k by default (hidden split = k) */
    int64_t plr_dim;         /* width of the per-layer regularization head (0: none) */
    rd_strategy strategy;
    rd_gating gating;
    float beta;              /* threshold EMA: tau <- beta*tau + (1-beta)*tau_b */
    int eval_topk;           /* 1: eval mode keeps batch top-K instead of G >= tau */
    float sim_weight;        /* lambda of the router-similarity loss (SPEC §4), 0: off */
    float balance_weight;    /* lambda of the balance loss, 0: off */
    float plr_weight;        /* lambda of the PLR loss (SPEC §3), used when plr_dim > 0 */
} rd_moe_cfg;

/* The layer's parameters, in this order, in one flat buffer (grads share the layout). */
typedef enum {
    RD_MOE_ROUTER_W = 0,  /* (D,D)      */
    RD_MOE_ROUTER_B,      /* (D)        */
    RD_MOE_GATE_W,        /* (D,E)      */
    RD_MOE_GATE_B,        /* (E)        */
    RD_MOE_W1,            /* (E,D,He)   */
    RD_MOE_B1,            /* (E,He)     */
    RD_MOE_W2,            /* (E,He,D)   */
    RD_MOE_B2,            /* (E,D)      */
    RD_MOE_PLR_W,         /* (D,plr_dim) empty when plr_dim == 0 */
    RD_MOE_PLR_B,         /* (plr_dim)  */
    RD_MOE_NPARAM
} rd_moe_param_id;

/* sizes[i] (elements) of each parameter; returns the total. */
int64_t rd_moe_param_sizes(int64_t sizes[RD_MOE_NPARAM], const rd_moe_cfg *cfg);
typedef struct { float *p[RD_MOE_NPARAM]; } rd_moe_params;
/* Point each entry into `buf` following the layout above. */
void rd_moe_params_point(rd_moe_params *out, float *buf, const rd_moe_cfg *cfg);
rd_status rd_moe_cfg_check(const rd_moe_cfg *cfg);

/* Opaque per-layer state: saved activations of the last forward, dispatch workspace
 * (grown on demand; nothing proportional to N*E*He), and the threshold tau. */
typedef struct rd_moe_state rd_moe_state;
rd_moe_state *rd_moe_state_new(void);
void rd_moe_state_free(rd_moe_state *st);

/* y (N,D) = MoE(x (N,D)), N = B*L. training: route by batch top-K and update tau;
 * else select G >= tau (or batch top-K with cfg->eval_topk; token choice is always
 * per-token top-k). plr_target (N,plr_dim, may be NULL): the regression target of the
 * PLR head; with it (and training) the PLR loss is computed and enters backward.
 * Aux losses and diagnostics of this forward are read with rd_moe_get_aux(). */
rd_status rd_moe_forward(rd_moe_state *st, float *y, const float *x,
                         const rd_moe_cfg *cfg, const rd_moe_params *p,
                         int64_t B, int64_t L, int training, const float *plr_target);
/* dx (N,D) = d(loss)/dx given dy (N,D) for the same x as the last forward, plus the
 * weighted aux losses' gradients. Parameter gradients ACCUMULATE into `grad`. */
rd_status rd_moe_backward(rd_moe_state *st, float *dx, const rd_moe_params *grad,
                          const float *dy, const float *x,
                          const rd_moe_cfg *cfg, const rd_moe_params *p);

#endif
