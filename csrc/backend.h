/* backend.h — the op table: one struct of function pointers per backend (ggml's backend
 * interface at the op level), so that the model graph (csrc/core/model.c) and the binding
 * are written once. A table holds the backend's memory functions and every op that exists
 * on more than one backend, with the argument order of racedit.h's rd_<op>_<dir>() and
 * pointers into the backend's own memory ("backend memory": device memory for CUDA, the
 * guarded pool for the checking backend, plain host memory for the CPU).
 *
 * Backends: "cpu" (csrc/cpu: the kernels as they are), "cuda" (the .cu files of cuda/, when built) and
 * "check" (csrc/core/check.c: the CPU kernels behind a guarded pool that refuses any
 * pointer it did not hand out, for the tests).
 *
 * Per-object state a backend needs beyond its buffers (cuBLAS scratch, the bf16 copies of
 * the weights a forward rounded for its backward) lives behind an opaque context made by
 * ctx_new; ops that use it take it first. MoE layer states and expert workspaces are
 * opaque objects of the backend likewise. */
#ifndef RACEDIT_BACKEND_H
#define RACEDIT_BACKEND_H

#include "racedit.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Precision of a context's or MoE state's GEMMs: exact fp32 (TF32 when the CUDA backend's
 * rd_cuda_set_tf32 is on), TF32 tensor cores, or bf16 operands with fp32 accumulation.
 * The CPU computes in fp32 only. */
typedef enum { RD_PREC_FP32 = 0, RD_PREC_TF32 = 1, RD_PREC_BF16 = 2 } rd_precision;

typedef struct rd_backend {
    const char *name;  /* "cpu", "cuda", "check" */
    int host_memory;   /* 1: backend memory is the caller's host memory (no staging copies) */

    /* ---- memory (sizes in bytes; a 0-byte alloc gives NULL) and context ---- */
    rd_status (*alloc)(void **p, size_t bytes);
    void (*free)(void *p);
    rd_status (*upload)(void *dst, const void *host_src, size_t bytes);
    rd_status (*download)(void *host_dst, const void *src, size_t bytes);
    rd_status (*copy)(void *dst, const void *src, size_t bytes);
    rd_status (*memset)(void *p, int byte, size_t bytes);
    rd_status (*sync)(void);
    rd_status (*ctx_new)(void **ctx);
    void (*ctx_free)(void *ctx);
    rd_status (*set_precision)(void *ctx, int prec);
    /* Around a whole pass (the CPU makes its BLAS single-threaded once; may be NULL). */
    int (*enter)(void);
    void (*leave)(int prev);

    /* ---- DiT layers (model.h); unpatchify's backward is patchify and vice versa ---- */
    rd_status (*patchify)(float *tok, const float *img, int64_t B, int64_t C, int64_t H,
                          int64_t W, int64_t p, rd_patch_order order);
    rd_status (*unpatchify)(float *img, const float *tok, int64_t B, int64_t C, int64_t H,
                            int64_t W, int64_t p, rd_patch_order order);
    /* x (B,L,D) = b (D) + pe (L,D) + patches (B*L,IC) @ W (D,IC)^T, the sum formed in that
     * order (DiT's x_embedder followed by the position embedding). */
    rd_status (*patch_embed)(void *ctx, float *x, const float *patches, const float *W,
                             const float *b, const float *pe, int64_t B, int64_t L, int64_t IC,
                             int64_t D);
    rd_status (*timestep_embedding)(float *emb, const float *t, int64_t B, int64_t F,
                                    float max_period);
    rd_status (*linear_forward)(void *ctx, float *out, const float *inp, const float *W,
                                const float *b, int64_t N, int64_t IC, int64_t OC);
    rd_status (*linear_backward)(void *ctx, float *dinp, float *dW, float *db,
                                 const float *dout, const float *inp, const float *W,
                                 int64_t N, int64_t IC, int64_t OC);
    rd_status (*layernorm_forward)(float *out, float *rstd, const float *inp, int64_t N,
                                   int64_t D);
    rd_status (*layernorm_backward)(float *dinp_acc, const float *dout, const float *out,
                                    const float *rstd, int64_t N, int64_t D);
    rd_status (*modulate_forward)(float *out, const float *inp, const float *shift,
                                  const float *scale, int64_t B, int64_t L, int64_t D, int64_t S);
    rd_status (*modulate_backward)(float *dinp, float *dshift, float *dscale, const float *dout,
                                   const float *inp, const float *scale, int64_t B, int64_t L,
                                   int64_t D, int64_t S);
    rd_status (*gated_residual_forward)(float *out, const float *inp, const float *h,
                                        const float *gate, int64_t B, int64_t L, int64_t D,
                                        int64_t S);
    rd_status (*gated_residual_backward)(float *dh, float *dgate, const float *dout,
                                         const float *h, const float *gate, int64_t B,
                                         int64_t L, int64_t D, int64_t S);
    rd_status (*attention_forward)(void *ctx, float *out, float *att, const float *qkv,
                                   int64_t B, int64_t L, int64_t D, int64_t NH);
    rd_status (*attention_backward)(void *ctx, float *dqkv, float *datt, const float *dout,
                                    const float *qkv, const float *att, int64_t B, int64_t L,
                                    int64_t D, int64_t NH);
    rd_status (*silu_forward)(float *out, const float *inp, int64_t n);
    rd_status (*silu_backward)(float *dinp, const float *dout, const float *inp, int64_t n);
    rd_status (*gelu_forward)(float *out, const float *inp, int64_t n);
    rd_status (*gelu_backward)(float *dinp, const float *dout, const float *inp, int64_t n);
    /* y (backend, validated by the caller) indexes table (V,D). */
    rd_status (*embedding_forward)(float *out, const int64_t *y, const float *table, int64_t B,
                                   int64_t V, int64_t D);
    rd_status (*embedding_backward)(float *dtable, const float *dout, const int64_t *y,
                                    int64_t B, int64_t V, int64_t D);
    /* y (n) += x (n). */
    rd_status (*add)(float *y, const float *x, int64_t n);
    /* The diffusion MSE over the first C of Co channels of out (B,Co,HW) against target
     * (B,C,HW): *loss (host) = mean of the squares (in double), dout (B,Co,HW) = 2 (out -
     * target) / (B*C*HW) there and 0 on the other channels. */
    rd_status (*mse)(void *ctx, double *loss, float *dout, const float *out,
                     const float *target, int64_t B, int64_t C, int64_t Co, int64_t HW);
    /* *out (host) = mean over the B*L tokens of || gate[b] * v[t] ||_2, v (B*L,D), gate rows
     * (B) S apart, summed in double in token order. */
    rd_status (*gated_norm)(void *ctx, double *out, const float *v, const float *gate,
                            int64_t B, int64_t L, int64_t D, int64_t S);

    /* ---- routing and the MoE block (route.h, moe.h; tau_b a backend float) ---- */
    rd_status (*route)(uint8_t *mask, float *tau_b, const float *scores, int64_t B, int64_t L,
                       int64_t E, int64_t k, rd_strategy s);
    rd_status (*route_threshold)(uint8_t *mask, const float *scores, int64_t n, float tau);
    /* counts (rows, host) <- the nonzero bytes of each row of mask (rows, cols). */
    rd_status (*mask_row_counts)(int64_t *counts, const uint8_t *mask, int64_t rows,
                                 int64_t cols);
    rd_status (*gate_forward)(float *G, const float *R, int64_t N, int64_t E, rd_gating g);
    rd_status (*gate_backward)(float *dR, const float *dG, const float *G, int64_t N, int64_t E,
                               rd_gating g);
    rd_status (*router_forward)(float *hpre, float *h, float *R, const float *x, const float *Wr,
                                const float *br, const float *Wg, const float *bg, int64_t N,
                                int64_t D, int64_t E);
    rd_status (*router_backward)(float *dx_acc, float *dWr, float *dbr, float *dWg, float *dbg,
                                 float *dh, const float *dR, const float *dh_extra,
                                 const float *hpre, const float *h, const float *x,
                                 const float *Wr, const float *Wg, int64_t N, int64_t D,
                                 int64_t E);
    rd_status (*experts_new)(void **ex);
    void (*experts_free)(void *ex);
    rd_status (*experts_set_precision)(void *ex, int prec);
    rd_status (*experts_forward)(void *ex, float *y, const uint8_t *mask, const float *G,
                                 const float *x, const float *W1, const float *b1,
                                 const float *W2, const float *b2, int64_t N, int64_t D,
                                 int64_t E, int64_t He);
    rd_status (*experts_backward)(void *ex, float *dx, float *dG, float *dW1, float *db1,
                                  float *dW2, float *db2, const float *dy, const float *W1,
                                  const float *W2, int64_t N, int64_t D, int64_t E, int64_t He);
    rd_status (*moe_new)(void **st);
    void (*moe_free)(void *st);
    rd_status (*moe_set_precision)(void *st, int prec);
    rd_status (*moe_forward)(void *st, float *y, const float *x, const rd_moe_cfg *cfg,
                             const rd_moe_params *p, int64_t B, int64_t L, int training,
                             const float *plr_target);
    rd_status (*moe_backward)(void *st, float *dx, const rd_moe_params *grad, const float *dy,
                              const float *x, const rd_moe_cfg *cfg, const rd_moe_params *p);
    /* What the last forward left (moe.h): mask, G, R, h backend memory, counts host. */
    rd_status (*moe_view)(void *st, rd_moe_view *out);
    /* out->load is host memory, out->plr_pred backend memory (or NULL). */
    rd_status (*moe_aux)(void *st, rd_moe_aux *out);
    /* tau: n host floats, NULL: forget (moe.h's rd_moe_set_threshold). */
    rd_status (*moe_set_threshold)(void *st, const float *tau, int64_t n);
    rd_status (*moe_copy_threshold)(void *dst, void *src);

    /* ---- optimiser (optim.h): AdamW fused with the EMA (ema NULL: none) ---- */
    rd_status (*adamw_step)(float *params, const float *grads, float *m, float *v, float *ema,
                            int64_t n, double lr, double beta1, double beta2, double eps,
                            double weight_decay, int64_t step, double grad_scale,
                            double ema_decay);
    rd_status (*grad_norm)(void *ctx, double *out /* host */, const float *grads, int64_t n);
    rd_status (*nonfinite_index)(int64_t *index /* host */, const float *x, int64_t n);
} rd_backend;

extern const rd_backend rd_backend_cpu;
extern const rd_backend rd_backend_check;
#ifdef RD_HAVE_CUDA
extern const rd_backend rd_backend_cuda;
#endif

/* The backend called `name`: RD_EINVAL for an unknown name, RD_ECUDA for "cuda" in a build
 * without it (whether a device is usable is the caller's question: rd_cuda_device_count). */
rd_status rd_backend_get(const char *name, const rd_backend **out);

/* The checking backend's pool: live allocations and bytes, the count and first message
 * of the misuses it saw (pointers it did not hand out, guard bytes overwritten, a free of
 * an unknown pointer), and the uploads and downloads made (count, bytes); reset clears the
 * misuses and the transfer counts. */
typedef struct {
    int64_t live, bytes, errors;
    int64_t uploads, upload_bytes, downloads, download_bytes;
    char first_error[256];
} rd_check_report;
void rd_check_pool_report(rd_check_report *out);
void rd_check_pool_reset(void);

#ifdef __cplusplus
}
#endif
#endif /* RACEDIT_BACKEND_H */
