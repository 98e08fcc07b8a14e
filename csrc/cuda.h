/* cuda.h — the CUDA backend's C API: the ops of route.h, moe.h and model.h as
 * `rd_<op>_cuda`, with the same argument order as the CPU ops but DEVICE pointers, plus the
 * device-memory functions; cuda/backend.cu puts them behind the op table of backend.h
 * (rd_backend_cuda), which the model graph and the binding use. Included by racedit.h
 * under RD_HAVE_CUDA.
 *
 * Every function runs on one stream (the legacy default stream, which cuBLAS also uses),
 * never exits or prints, checks every cudaError_t / cublasStatus_t and returns an
 * rd_status with the message in rd_last_error(). Calls are asynchronous unless said:
 * a call that must read something back (a NaN flag, the per-expert counts) synchronises.
 * Shapes and conventions are those of racedit.h (params ACCUMULATE, activations ASSIGN).
 * fp32 by default; TF32 tensor-core GEMMs after rd_cuda_set_tf32(1); the expert GEMMs of a
 * layer / experts handle also take a precision of their own (rd_precision: fp32, tf32,
 * bf16 operands with fp32 accumulation).
 */
#ifndef RACEDIT_CUDA_H
#define RACEDIT_CUDA_H

#include "racedit.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- device and memory ---------------------------------------------------------- */
int rd_cuda_device_count(void);            /* 0 when no driver / device */
const char *rd_cuda_runtime_version(void); /* "13.0" */
int rd_cuda_cublas_version(void);          /* CUBLAS_VERSION compiled against, e.g. 131000 */
int rd_cuda_have_grouped_gemm(void);       /* 1 if cublasGemmGroupedBatchedEx was compiled in */
rd_status rd_cuda_malloc(void **p, size_t bytes);     /* *p = NULL when bytes == 0 */
void rd_cuda_free(void *p);                           /* NULL is fine; errors ignored */
rd_status rd_cuda_h2d(void *dst, const void *src, size_t bytes);   /* synchronous */
rd_status rd_cuda_d2h(void *dst, const void *src, size_t bytes);   /* synchronous */
rd_status rd_cuda_memset(void *p, int byte, size_t bytes);
rd_status rd_cuda_sync(void);              /* wait for the stream; reports async errors */
/* TF32 tensor cores for fp32 GEMMs (process-wide, default 0: exact fp32 products). */
void rd_cuda_set_tf32(int on);
int rd_cuda_get_tf32(void);
/* Expert GEMMs: 0 = a loop of cublasGemmEx over experts (default), 1 = one
 * cublasGemmGroupedBatchedEx per product (falls back to 0 when not compiled in; a type
 * combination the grouped call refuses runs as the loop), 2 = the loop spread over
 * RD_SIDE_STREAMS side streams (fork/join events; small expert GEMMs run concurrently). */
void rd_cuda_set_expert_gemm(int mode);
int rd_cuda_get_expert_gemm(void);

/* Precision (backend.h's rd_precision) of the expert GEMMs of a device MoE layer / experts
 * handle: FP32 exact fp32 products (TF32 when rd_cuda_set_tf32(1) is on, as every fp32
 * GEMM); TF32 tensor cores, fp32 storage; BF16 bf16 copies of the activations and expert
 * weights feed the GEMMs (fp32 accumulation, CUBLAS_COMPUTE_32F); weights stay fp32 masters
 * (converted on each forward), gradients, biases, the combine, router, gate and routing are
 * fp32. */

/* Row-major C (M,N) = alpha op(A) op(B) + beta C on device, exactly as rd_matmul. */
rd_status rd_matmul_cuda(float *C, int ldc, const float *A, int lda, int transA,
                         const float *B, int ldb, int transB,
                         int64_t M, int64_t N, int64_t K, float alpha, float beta);

/* ---- routing (route.h) ------------------------------------------------------------
 * mask (B,L,E) uint8 and tau_b (one float, may be NULL) are device pointers. Masks are
 * bit-identical to rd_route's for the same scores; tau_b likewise. Synchronises once
 * (to report NaN in scores as RD_EINVAL). */
rd_status rd_route_cuda(uint8_t *mask, float *tau_b, const float *scores /* B,L,E */,
                        int64_t B, int64_t L, int64_t E, int64_t k, rd_strategy s);
/* mask (n) <- scores >= tau. Synchronises once (NaN check). */
rd_status rd_route_threshold_cuda(uint8_t *mask, const float *scores, int64_t n, float tau);
/* counts (rows, host) <- the nonzero bytes of each row of mask (rows, cols). Synchronises. */
rd_status rd_mask_row_counts_cuda(int64_t *counts, const uint8_t *mask, int64_t rows,
                                  int64_t cols);

/* ---- gating and router MLP (moe.h) ------------------------------------------------ */
rd_status rd_gate_forward_cuda(float *G, const float *R, int64_t N, int64_t E, rd_gating g);
rd_status rd_gate_backward_cuda(float *dR, const float *dG, const float *G, int64_t N,
                                int64_t E, rd_gating g);
rd_status rd_router_forward_cuda(float *hpre, float *h, float *R, const float *x,
                                 const float *Wr, const float *br, const float *Wg,
                                 const float *bg, int64_t N, int64_t D, int64_t E);
rd_status rd_router_backward_cuda(float *dx_acc, float *dWr, float *dbr, float *dWg, float *dbg,
                                  float *dh, const float *dR, const float *dh_extra,
                                  const float *hpre, const float *h, const float *x,
                                  const float *Wr, const float *Wg,
                                  int64_t N, int64_t D, int64_t E);

/* ---- dropless experts (moe.h's rd_experts_*) --------------------------------------
 * Same layout and determinism as the CPU: rows expert-major, tokens ascending; the
 * combine and dx sum each token's rows in ascending expert order (no atomics on floats);
 * bias gradients are fixed-order reductions. Forward synchronises once to read the
 * per-expert counts (the GEMM sizes). Buffers are device memory owned by the handle. */
typedef struct rd_experts_cuda rd_experts_cuda;
rd_experts_cuda *rd_experts_cuda_new(void);
void rd_experts_cuda_free(rd_experts_cuda *ex);
rd_status rd_experts_forward_cuda(rd_experts_cuda *ex, float *y, const uint8_t *mask,
                                  const float *G, const float *x, const float *W1,
                                  const float *b1, const float *W2, const float *b2,
                                  int64_t N, int64_t D, int64_t E, int64_t He);
rd_status rd_experts_backward_cuda(rd_experts_cuda *ex, float *dx, float *dG, float *dW1,
                                   float *db1, float *dW2, float *db2, const float *dy,
                                   const float *W1, const float *W2,
                                   int64_t N, int64_t D, int64_t E, int64_t He);
/* Precision of the handle's GEMMs (rd_precision; default RD_PREC_FP32). bf16: each
 * forward converts W1, W2 to bf16 copies that its backward uses. Changing it drops the
 * last forward (backward then needs a new forward). RD_EINVAL for an unknown value. */
rd_status rd_experts_cuda_set_precision(rd_experts_cuda *ex, int prec);
int rd_experts_cuda_get_precision(const rd_experts_cuda *ex);
/* How many type combinations cublasGemmGroupedBatchedEx refused so far (they run as the
 * GEMM loop instead), and which: bit (2*ab + c) set when operands of type ab (0 fp32,
 * 1 bf16) with results of type c (0 fp32, 1 bf16) were refused. */
int rd_cuda_grouped_fallbacks(void);
int rd_cuda_grouped_refused_mask(void);
/* Selected pairs of the last forward, and its per-expert counts (HOST array of E). */
int64_t rd_experts_cuda_pairs(const rd_experts_cuda *ex);
const int64_t *rd_experts_cuda_counts(const rd_experts_cuda *ex);

/* ---- the composite layer (moe.h's rd_moe_*) ---------------------------------------
 * Parameters and gradients are rd_moe_params whose pointers are DEVICE pointers (one
 * device buffer laid out by rd_moe_params_point). The thresholds live on the device and
 * are updated there: no host round trip for them. The aux losses (router similarity,
 * balance, PLR head; plr_target (N,plr_dim) is a DEVICE pointer) and the diagnostics are
 * those of rd_moe_forward / rd_moe_backward (moe_aux.c), computed on the device; the
 * forward still makes one synchronising read-back in all. */
typedef struct rd_moe_cuda_state rd_moe_cuda_state;
rd_moe_cuda_state *rd_moe_cuda_state_new(void);
void rd_moe_cuda_state_free(rd_moe_cuda_state *st);
rd_status rd_moe_forward_cuda(rd_moe_cuda_state *st, float *y, const float *x,
                              const rd_moe_cfg *cfg, const rd_moe_params *p,
                              int64_t B, int64_t L, int training, const float *plr_target);
rd_status rd_moe_backward_cuda(rd_moe_cuda_state *st, float *dx, const rd_moe_params *grad,
                               const float *dy, const float *x,
                               const rd_moe_cfg *cfg, const rd_moe_params *p);
/* What the last forward left in the state (moe.h's rd_moe_view): sizes, DEVICE pointers
 * (mask, G, R, h, valid until the next forward or free), the per-expert counts as a HOST
 * array, and the thresholds (into a host copy the view points to) and tau_b read back from
 * the device (synchronises). */
rd_status rd_moe_cuda_state_view(rd_moe_cuda_state *st, rd_moe_view *out);
/* Precision of the layer's expert GEMMs (rd_precision, default fp32); the router, gate
 * and routing stay fp32 (TF32 router GEMMs only under rd_cuda_set_tf32(1)), so the masks
 * do not depend on it. A change drops the last forward. RD_EINVAL for an unknown value. */
rd_status rd_moe_cuda_set_precision(rd_moe_cuda_state *st, int prec);
/* The aux losses and diagnostics of the last forward (zeros before any), as rd_moe_get_aux:
 * load is a HOST array (E) owned by the state, plr_pred a DEVICE pointer (N,plr_dim) or
 * NULL; tau / tau_b read back from the device (NaN when unset). Synchronises. */
rd_status rd_moe_cuda_get_aux(rd_moe_cuda_state *st, rd_moe_aux *out);
/* Set the n thresholds (host values; NaN -> RD_EINVAL) or forget them (NULL). */
rd_status rd_moe_set_threshold_cuda(rd_moe_cuda_state *st, const float *tau, int64_t n);
/* dst's thresholds := src's, a device-to-device copy queued on the stream (no sync), or
 * none when src has none. */
rd_status rd_moe_cuda_copy_threshold(rd_moe_cuda_state *dst, const rd_moe_cuda_state *src);

/* ---- DiT layers (layers.cu, attention.cu): the CPU's csrc/model.h ops on device pointers,
 * same arguments and semantics (LayerNorm eps 1e-6 without affine, two-pass variance;
 * modulate / gated residual with per-sample rows of stride S >= D; attention with qkv
 * (B,L,3D) = [q | k | v] and saved probabilities att (B,NH,L,L)). Results agree with the
 * CPU within fp32 rounding (other summation orders), bitwise reproducible run to run. */
rd_status rd_layernorm_forward_cuda(float *out, float *rstd, const float *inp, int64_t N, int64_t D);
rd_status rd_layernorm_backward_cuda(float *dinp_acc, const float *dout, const float *out,
                                     const float *rstd, int64_t N, int64_t D);
rd_status rd_modulate_forward_cuda(float *out, const float *inp, const float *shift,
                                   const float *scale, int64_t B, int64_t L, int64_t D, int64_t S);
rd_status rd_modulate_backward_cuda(float *dinp, float *dshift, float *dscale, const float *dout,
                                    const float *inp, const float *scale, int64_t B, int64_t L,
                                    int64_t D, int64_t S);
rd_status rd_gated_residual_forward_cuda(float *out, const float *inp, const float *h,
                                         const float *gate, int64_t B, int64_t L, int64_t D,
                                         int64_t S);
rd_status rd_gated_residual_backward_cuda(float *dh, float *dgate, const float *dout,
                                          const float *h, const float *gate, int64_t B, int64_t L,
                                          int64_t D, int64_t S);
rd_status rd_silu_forward_cuda(float *out, const float *inp, int64_t n);
rd_status rd_gelu_forward_cuda(float *out, const float *inp, int64_t n);
rd_status rd_gelu_backward_cuda(float *dinp, const float *dout, const float *inp, int64_t n);
rd_status rd_patchify_forward_cuda(float *tok, const float *img, int64_t B, int64_t C, int64_t H,
                                   int64_t W, int64_t p, rd_patch_order order);
rd_status rd_unpatchify_forward_cuda(float *img, const float *tok, int64_t B, int64_t C,
                                     int64_t H, int64_t W, int64_t p, rd_patch_order order);
/* y (device, validated by the caller) indexes table (V,D); the backward walks the batch in
 * order per column (deterministic). y (n) += x (n). */
rd_status rd_embedding_forward_cuda(float *out, const int64_t *y, const float *table, int64_t B,
                                    int64_t V, int64_t D);
rd_status rd_embedding_backward_cuda(float *dtable, const float *dout, const int64_t *y,
                                     int64_t B, int64_t V, int64_t D);
rd_status rd_add_cuda(float *y, const float *x, int64_t n);
rd_status rd_silu_backward_cuda(float *dinp, const float *dout, const float *inp, int64_t n);
rd_status rd_timestep_embedding_forward_cuda(float *emb, const float *t, int64_t B, int64_t F,
                                             float max_period);
rd_status rd_attention_forward_cuda(float *out, float *att, const float *qkv, int64_t B,
                                    int64_t L, int64_t D, int64_t NH);
rd_status rd_attention_backward_cuda(float *dqkv, float *datt, const float *dout,
                                     const float *qkv, const float *att, int64_t B, int64_t L,
                                     int64_t D, int64_t NH);
/* The same with bf16 GEMM operands (fp32 accumulation; the softmax, att, out and dqkv stay
 * fp32): qkv, dout, the probabilities and the score gradients are rounded to bf16 into ws,
 * device scratch of rd_attention_bf16_scratch(B, L, D, NH) bytes (its contents are not
 * kept between calls). */
size_t rd_attention_bf16_scratch(int64_t B, int64_t L, int64_t D, int64_t NH);
rd_status rd_attention_forward_bf16_cuda(float *out, float *att, const float *qkv, void *ws,
                                         int64_t B, int64_t L, int64_t D, int64_t NH);
rd_status rd_attention_backward_bf16_cuda(float *dqkv, float *datt, const float *dout,
                                          const float *qkv, const float *att, void *ws,
                                          int64_t B, int64_t L, int64_t D, int64_t NH);

/* ---- optimiser (optim.cu): the CPU optimiser's arithmetic, bit for bit -------------
 * One AdamW step (torch.optim.AdamW, as rd_adamw_step) fused with the EMA of the updated
 * weights, ema <- ema_decay*ema + (1-ema_decay)*params (skipped when ema is NULL). */
rd_status rd_adamw_ema_step_cuda(float *params, const float *grads, float *m, float *v,
                                 float *ema, int64_t n, double lr, double beta1, double beta2,
                                 double eps, double weight_decay, int64_t step,
                                 double grad_scale, double ema_decay);
/* *out_dev (a DEVICE double) = sqrt(sum grads^2): double sums over chunks of 8192 elements
 * added in order (deterministic; not bitwise the CPU's, whose chunks sum sequentially). */
rd_status rd_grad_norm_cuda(double *out_dev, const float *grads, int64_t n);
/* *index = the first i with x[i] NaN or +-Inf, or -1. Synchronises. */
rd_status rd_nonfinite_index_cuda(int64_t *index, const float *x, int64_t n);

/* ---- benchmark ----------------------------------------------------------------------
 * Device-resident timings (CUDA events, mean ms per call over `iters` after a warm-up)
 * of the layer on HOST inputs x (B,L,D), params (flat, rd_moe_params layout), dy
 * (B,L,D), uploaded once: routing alone, layer forward (training), layer forward +
 * backward, experts forward + backward alone, and dense cuBLAS GEMMs of the experts'
 * FLOPs (the same shapes with all P rows in one expert: 2 GEMMs forward, 6 in all, with
 * the experts' operand and result types). Uses the current TF32 / expert-GEMM settings
 * and the expert precision `prec` (rd_precision). */
typedef struct {
    double route_ms, fwd_ms, fwdbwd_ms, experts_fwdbwd_ms, dense_fwd_ms, dense_fwdbwd_ms;
    int64_t P;
} rd_cuda_bench_result;
rd_status rd_cuda_bench_moe(rd_cuda_bench_result *r, const float *x, const float *params,
                            const float *dy, const rd_moe_cfg *cfg, int64_t B, int64_t L,
                            int iters, int prec);

#ifdef __cplusplus
}
#endif
#endif
