/* moe.h — the MoE block of docs/method.md §2-§3: router MLP, gating, dropless expert FFN,
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

/* out[s,c] += sum over rows r in [offsets[s], offsets[s+1]) of in[r,c], for every segment
 * s < S and column c < cols: the bias gradients (one segment: a plain column sum; one
 * segment per expert: per-expert sums). Rows summed in order: bitwise deterministic. */
void rd_colsum_segments(float *out /* S,cols */, const float *in /* rows,cols */,
                        const int64_t *offsets /* S+1 */, int64_t S, int64_t cols);

/* ---- dropless experts ---------------------------------------------------------
 * The selected pairs (P of them, P = number of ones in mask) are laid out expert-major:
 * rows of expert e are offsets[e]..offsets[e+1]-1, tokens ascending inside an expert.
 * A per-token index (rows of token t in ascending expert order) makes the combine
 * deterministic and parallel over tokens. Buffers are proportional to P and N, grow
 * with realloc on demand and are reused across calls; never N*E*He. */
typedef struct rd_experts rd_experts;
rd_experts *rd_experts_new(void);
void rd_experts_free(rd_experts *ex);
/* y (N,D) = sum over t's selected experts e of G[t,e] * FFN_e(x_t), FFN_e(z) =
 * GELU_tanh(z W1[e] + b1[e]) W2[e] + b2[e]; a token with no expert gets y_t = 0.
 * Saves into `ex` what backward needs (the dispatch, gathered x, pre-activation,
 * hidden, expert outputs, row gates). mask (N,E) is 0/1. W1 (E,D,He), b1 (E,He),
 * W2 (E,He,D), b2 (E,D). */
rd_status rd_experts_forward(rd_experts *ex, float *y, const uint8_t *mask, const float *G,
                             const float *x, const float *W1, const float *b1,
                             const float *W2, const float *b2,
                             int64_t N, int64_t D, int64_t E, int64_t He);
/* Backward of the last rd_experts_forward on `ex` (mask held constant):
 * dx (N,D) and dG (N,E) ASSIGN (dG is 0 on unselected pairs); dW1, db1, dW2, db2
 * ACCUMULATE. RD_ESTATE if `ex` holds no forward of these sizes. */
rd_status rd_experts_backward(rd_experts *ex, float *dx, float *dG, float *dW1, float *db1,
                              float *dW2, float *db2, const float *dy,
                              const float *W1, const float *W2,
                              int64_t N, int64_t D, int64_t E, int64_t He);
/* Selected pairs of the last forward (0 before any), and per-expert counts (E) (NULL before). */
int64_t rd_experts_pairs(const rd_experts *ex);
const int64_t *rd_experts_counts(const rd_experts *ex);
/* How the MoE block's GEMMs are threaded (process-wide):
 * RD_THREADS_BLAS: one product after another (experts in turn), each threaded by the BLAS;
 * RD_THREADS_OMP: OpenMP tasks over (expert, row block), each a single-threaded sgemm;
 *   the router's products are split over OpenMP threads by rows likewise. The BLAS is
 *   made single-threaded for the duration of each call when its thread count can be
 *   controlled (rd_set_blas_thread_control); otherwise the caller must do it (e.g.
 *   threadpoolctl's threadpool_limits(1, "blas")), or OpenMP and BLAS threads compete.
 * The default is RD_THREADS_OMP when the BLAS thread count can be controlled, else
 * RD_THREADS_BLAS (benchmarks/bench_moe.py measures both). Built without OpenMP, the
 * mode is always RD_THREADS_BLAS. */
typedef enum { RD_THREADS_BLAS = 0, RD_THREADS_OMP = 1 } rd_threading;
void rd_set_threading(rd_threading mode);
rd_threading rd_get_threading(void);

/* The BLAS's thread-count functions (OpenBLAS's openblas_set/get_num_threads), handed
 * over by the binding when the BLAS exports them; NULL, NULL: unknown. */
typedef void (*rd_blas_set_threads_fn)(int);
typedef int (*rd_blas_get_threads_fn)(void);
void rd_set_blas_thread_control(rd_blas_set_threads_fn set, rd_blas_get_threads_fn get);
int rd_have_blas_thread_control(void);
/* In RD_THREADS_OMP mode with thread control: make the BLAS single-threaded and return the
 * previous count, to hand back to rd_blas_threads_restore(); otherwise a no-op (returns 0). */
int rd_blas_threads_enter(void);
void rd_blas_threads_restore(int prev);
/* Row-major C = alpha op(A) op(B) + beta C as rd_matmul, threaded as rd_get_threading()
 * says: in RD_THREADS_OMP mode the M rows are split over OpenMP threads, each block a
 * single-threaded sgemm (call between rd_blas_threads_enter/restore). */
rd_status rd_matmul_par(float *C, int ldc, const float *A, int lda, int transA,
                        const float *B, int ldb, int transB,
                        int64_t M, int64_t N, int64_t K, float alpha, float beta);

/* ---- the composite layer ----------------------------------------------------- */
typedef struct {
    int64_t D, E, He, k;     /* He = 4*D/k by default (hidden split = k) */
    int64_t plr_dim;         /* width of the per-layer regularization head (0: none) */
    rd_strategy strategy;
    rd_gating gating;
    float beta;              /* threshold EMA: tau[g] <- beta*tau[g] + (1-beta)*kth[g] */
    int eval_topk;           /* 1: eval mode keeps batch top-K instead of G >= tau */
    float sim_weight;        /* lambda of router similarity (docs/method.md §5), 0: off */
    float balance_weight;    /* lambda of the balance loss, 0: off */
    float plr_weight;        /* lambda of PLR (docs/method.md §4), used when plr_dim > 0 */
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
/* The argument checks of a layer state's forward and backward and of its thresholds, for
 * the CPU and CUDA layers alike (`fn` names the caller in the message): forward, cfg
 * valid and B, L >= 1 with B*L within 32 bits; backward, cfg valid, a forward held
 * (`have_forward`) and cfg's D, E, He those of that forward; thresholds, the `ntau` held
 * (if any, `have_tau`) are the nt the strategy needs at L (RD_ESTATE otherwise). */
rd_status rd_moe_forward_check(const char *fn, const rd_moe_cfg *cfg, int64_t B, int64_t L);
rd_status rd_moe_backward_check(const char *fn, const rd_moe_cfg *cfg, int have_forward,
                                int64_t D, int64_t E, int64_t He);
rd_status rd_moe_ntau_check(const char *fn, const rd_moe_cfg *cfg, int have_tau, int64_t ntau,
                            int64_t L, int64_t nt);
/* The aux-loss weights of cfg, for the CPU and CUDA layers alike: sim_weight,
 * balance_weight and plr_weight finite and >= 0; sim / balance > 0 need E >= 2. */
rd_status rd_moe_aux_weights_check(const rd_moe_cfg *cfg);
/* The router MLP's sizes, for the CPU and CUDA routers alike (fn names the caller):
 * N >= 0, D, E > 0, each within the 32-bit (cu)BLAS interface. */
rd_status rd_router_check(const char *fn, int64_t N, int64_t D, int64_t E);

/* Opaque per-layer state: saved activations of the last forward, dispatch workspace
 * (grown on demand; nothing proportional to N*E*He), and the thresholds tau (docs/method.md
 * §3: rd_route_num_thresholds values, one per batch-spanning selection group). */
typedef struct rd_moe_state rd_moe_state;
rd_moe_state *rd_moe_state_new(void);
void rd_moe_state_free(rd_moe_state *st);

/* y (N,D) = MoE(x (N,D)), N = B*L. training: route by batch top-K and update every
 * threshold tau[g] from its group's K-th largest gate; eval: token, expert and LE choice
 * keep their exact per-group top-K (batch-independent), BL / BE / race select
 * G[b,l,e] >= tau[e] / tau[l] / tau[0], or the batch top-K (tau untouched) with
 * cfg->eval_topk or while the layer has no tau yet (never trained, nor set). A tau of
 * the wrong length for the strategy (BE: L changed) is RD_ESTATE.
 * plr_target (N,plr_dim, may be NULL): the regression target of the PLR head; with it
 * (and training) the PLR loss is computed and enters backward.
 * Aux losses and diagnostics of this forward are read with rd_moe_get_aux(). */
rd_status rd_moe_forward(rd_moe_state *st, float *y, const float *x,
                         const rd_moe_cfg *cfg, const rd_moe_params *p,
                         int64_t B, int64_t L, int training, const float *plr_target);
/* dx (N,D) = d(loss)/dx given dy (N,D) for the same x as the last forward, plus the
 * weighted aux losses' gradients. Parameter gradients ACCUMULATE into `grad`. */
rd_status rd_moe_backward(rd_moe_state *st, float *dx, const rd_moe_params *grad,
                          const float *dy, const float *x,
                          const rd_moe_cfg *cfg, const rd_moe_params *p);

/* What the last forward left in the state, for the binding and diagnostics. Pointers
 * are owned by the state and valid until its next forward or free; NULL / 0 before the
 * first forward. */
typedef struct {
    int64_t B, L, N, D, E, He;   /* sizes of the last forward (N = B*L)               */
    int64_t P;                   /* selected pairs of the last forward                */
    int have_forward;            /* 1 after a successful forward                      */
    int have_tau;                /* 1 once tau is set (first training forward / set)  */
    int64_t ntau;                /* number of thresholds (0 for token / expert / LE)  */
    const float *taus;           /* (ntau) the thresholds, host memory                */
    float tau;                   /* mean of the thresholds (NaN when ntau == 0)       */
    float tau_b;                 /* mean K-th value of the last training forward      */
    const uint8_t *mask;         /* (N,E) 0/1 selection                               */
    const float *G;              /* (N,E) gates                                       */
    const float *R;              /* (N,E) router logits                               */
    const float *h;              /* (N,D) router hidden                               */
    const int64_t *counts;       /* (E)   tokens per expert                           */
} rd_moe_view;
void rd_moe_state_view(const rd_moe_state *st, rd_moe_view *out);
/* Set the n thresholds (tau != NULL, n >= 0; NaN -> RD_EINVAL; whether n fits the
 * strategy is checked by the next forward) or forget them (tau == NULL: the next training
 * forward initialises them from its batch). */
rd_status rd_moe_set_threshold(rd_moe_state *st, const float *tau, int64_t n);

#endif
