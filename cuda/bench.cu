/* bench.cu — device-resident timings of the MoE layer for benchmarks/bench_cuda_moe.py:
 * inputs are uploaded once, every timed region is bracketed by CUDA events on the one
 * stream, and the dense baseline runs the experts' GEMM shapes with all rows in one
 * expert, so the ratio isolates the cost of routing, dispatch and per-expert GEMMs. */
#include <stdlib.h>

#include "common.cuh"
#include "internal.cuh"

typedef struct {
    cudaEvent_t a, b;
} timer_t_;

static rd_status timer_start(timer_t_ *t) {
    CU_TRY(cudaEventRecord(t->a, RD_STREAM));
    return RD_OK;
}

static rd_status timer_stop(timer_t_ *t, int iters, double *ms) {
    CU_TRY(cudaEventRecord(t->b, RD_STREAM));
    CU_TRY(cudaEventSynchronize(t->b));
    float f = 0.0f;
    CU_TRY(cudaEventElapsedTime(&f, t->a, t->b));
    *ms = (double)f / iters;
    return RD_OK;
}

/* The state of one benchmark: device buffers freed together. */
typedef struct {
    void *d[32];
    int n;
} blist;

static rd_status balloc(blist *L, void **p, size_t bytes, const void *host) {
    RD_TRY(rd_cuda_malloc(p, bytes ? bytes : 4));
    L->d[L->n++] = *p;
    if (host) RD_TRY(rd_cuda_h2d(*p, host, bytes));
    else CU_TRY(cudaMemset(*p, 0, bytes ? bytes : 4));
    return RD_OK;
}

/* The experts' six products on P rows in one expert, with the experts' types: T operands
 * (xg, a, hdn, dout, W1t, W2t), fp32 o / dxg / weight gradients. */
static rd_status dense_gemms(void *xg, void *a, void *hdn, void *dout, float *o, float *dW1,
                             float *dW2, const void *W1, const void *W2, int64_t P, int64_t D,
                             int64_t He, int prec, int backward) {
    cublasHandle_t h;
    RD_TRY(rd_cublas(&h));
    int iD = (int)D, iH = (int)He;
    cudaDataType T = prec == RD_PREC_BF16 ? CUDA_R_16BF : CUDA_R_32F, F = CUDA_R_32F;
    cublasComputeType_t c = prec == RD_PREC_TF32 ? CUBLAS_COMPUTE_32F_FAST_TF32
                          : prec == RD_PREC_BF16 ? CUBLAS_COMPUTE_32F : rd_cublas_compute();
    RD_TRY(rd_gemm_typed(h, a, T, iH, xg, iD, 0, W1, iH, 0, T, P, He, D, 1.0f, 0.0f, c));
    RD_TRY(rd_gemm_typed(h, o, F, iD, hdn, iH, 0, W2, iD, 0, T, P, D, He, 1.0f, 0.0f, c));
    if (!backward) return RD_OK;
    RD_TRY(rd_gemm_typed(h, dW2, F, iD, hdn, iH, 1, dout, iD, 0, T, He, D, P, 1.0f, 1.0f, c));
    RD_TRY(rd_gemm_typed(h, a, T, iH, dout, iD, 0, W2, iD, 1, T, P, He, D, 1.0f, 0.0f, c));
    RD_TRY(rd_gemm_typed(h, dW1, F, iH, xg, iD, 1, a, iH, 0, T, D, He, P, 1.0f, 1.0f, c));
    return rd_gemm_typed(h, o, F, iD, a, iH, 0, W1, iH, 1, T, P, D, He, 1.0f, 0.0f, c);
}

static rd_status run(rd_cuda_bench_result *r, blist *L, rd_moe_cuda_state *st,
                     rd_experts_cuda *ex, rd_route_ws *ws, timer_t_ *tm, const float *xh,
                     const float *ph, const float *dyh, const rd_moe_cfg *c, int64_t B,
                     int64_t Ls, int iters, int prec) {
    int64_t N = B * Ls, D = c->D, E = c->E, He = c->He, sizes[RD_MOE_NPARAM];
    int64_t np = rd_moe_param_sizes(sizes, c);
    void *x, *pb, *gb, *dy, *y, *dx, *hpre, *h, *R, *G, *mask, *dG, *nan;
    RD_TRY(balloc(L, &x, (size_t)(N * D) * 4, xh));
    RD_TRY(balloc(L, &pb, (size_t)np * 4, ph));
    RD_TRY(balloc(L, &gb, (size_t)np * 4, NULL));
    RD_TRY(balloc(L, &dy, (size_t)(N * D) * 4, dyh));
    RD_TRY(balloc(L, &y, (size_t)(N * D) * 4, NULL));
    RD_TRY(balloc(L, &dx, (size_t)(N * D) * 4, NULL));
    RD_TRY(balloc(L, &hpre, (size_t)(N * D) * 4, NULL));
    RD_TRY(balloc(L, &h, (size_t)(N * D) * 4, NULL));
    RD_TRY(balloc(L, &R, (size_t)(N * E) * 4, NULL));
    RD_TRY(balloc(L, &G, (size_t)(N * E) * 4, NULL));
    RD_TRY(balloc(L, &dG, (size_t)(N * E) * 4, NULL));
    RD_TRY(balloc(L, &mask, (size_t)(N * E), NULL));
    RD_TRY(balloc(L, &nan, 8, NULL));
    rd_moe_params p, g;
    rd_moe_params_point(&p, (float *)pb, c);
    rd_moe_params_point(&g, (float *)gb, c);
    RD_TRY(rd_moe_cuda_set_precision(st, prec));
    RD_TRY(rd_experts_cuda_set_precision(ex, prec));

    /* the layer: warm-up (buffers grow), then forward alone and forward + backward */
    for (int i = 0; i < 2; i++) {
        RD_TRY(rd_moe_forward_cuda(st, (float *)y, (const float *)x, c, &p, B, Ls, 1, NULL));
        RD_TRY(rd_moe_backward_cuda(st, (float *)dx, &g, (const float *)dy, (const float *)x, c, &p));
    }
    RD_TRY(timer_start(tm));
    for (int i = 0; i < iters; i++)
        RD_TRY(rd_moe_forward_cuda(st, (float *)y, (const float *)x, c, &p, B, Ls, 1, NULL));
    RD_TRY(timer_stop(tm, iters, &r->fwd_ms));
    RD_TRY(timer_start(tm));
    for (int i = 0; i < iters; i++) {
        RD_TRY(rd_moe_forward_cuda(st, (float *)y, (const float *)x, c, &p, B, Ls, 1, NULL));
        RD_TRY(rd_moe_backward_cuda(st, (float *)dx, &g, (const float *)dy, (const float *)x, c, &p));
    }
    RD_TRY(timer_stop(tm, iters, &r->fwdbwd_ms));

    /* routing alone, on the layer's own gate scores */
    RD_TRY(rd_router_forward_cuda((float *)hpre, (float *)h, (float *)R, (const float *)x,
                                  p.p[RD_MOE_ROUTER_W], p.p[RD_MOE_ROUTER_B], p.p[RD_MOE_GATE_W],
                                  p.p[RD_MOE_GATE_B], N, D, E));
    RD_TRY(rd_gate_forward_cuda((float *)G, (const float *)R, N, E, c->gating));
    RD_TRY(rd_route_launch(ws, (uint8_t *)mask, NULL, (const float *)G, B, Ls, E, c->k, c->strategy,
                           (unsigned long long *)nan));
    RD_TRY(timer_start(tm));
    for (int i = 0; i < iters; i++)
        RD_TRY(rd_route_launch(ws, (uint8_t *)mask, NULL, (const float *)G, B, Ls, E, c->k,
                               c->strategy, (unsigned long long *)nan));
    RD_TRY(timer_stop(tm, iters, &r->route_ms));

    /* experts alone */
    RD_TRY(rd_experts_forward_cuda(ex, (float *)y, (const uint8_t *)mask, (const float *)G,
                                   (const float *)x, p.p[RD_MOE_W1], p.p[RD_MOE_B1],
                                   p.p[RD_MOE_W2], p.p[RD_MOE_B2], N, D, E, He));
    RD_TRY(timer_start(tm));
    for (int i = 0; i < iters; i++) {
        RD_TRY(rd_experts_forward_cuda(ex, (float *)y, (const uint8_t *)mask, (const float *)G,
                                       (const float *)x, p.p[RD_MOE_W1], p.p[RD_MOE_B1],
                                       p.p[RD_MOE_W2], p.p[RD_MOE_B2], N, D, E, He));
        RD_TRY(rd_experts_backward_cuda(ex, (float *)dx, (float *)dG, g.p[RD_MOE_W1], g.p[RD_MOE_B1],
                                        g.p[RD_MOE_W2], g.p[RD_MOE_B2], (const float *)dy,
                                        p.p[RD_MOE_W1], p.p[RD_MOE_W2], N, D, E, He));
    }
    RD_TRY(timer_stop(tm, iters, &r->experts_fwdbwd_ms));
    r->P = rd_experts_cuda_pairs(ex);

    /* dense GEMMs of the same FLOPs: all P rows through one expert's weights */
    int64_t P = r->P > 0 ? r->P : 1;
    size_t es = prec == RD_PREC_BF16 ? 2 : 4;
    void *xg, *a, *hdn, *dout, *o, *W1t = p.p[RD_MOE_W1], *W2t = p.p[RD_MOE_W2];
    RD_TRY(balloc(L, &xg, (size_t)(P * D) * es, NULL));
    RD_TRY(balloc(L, &a, (size_t)(P * He) * es, NULL));
    RD_TRY(balloc(L, &hdn, (size_t)(P * He) * es, NULL));
    RD_TRY(balloc(L, &dout, (size_t)(P * D) * es, NULL));
    RD_TRY(balloc(L, &o, (size_t)(P * D) * 4, NULL));
    if (prec == RD_PREC_BF16) {
        RD_TRY(balloc(L, &W1t, (size_t)(D * He) * 2, NULL));
        RD_TRY(balloc(L, &W2t, (size_t)(He * D) * 2, NULL));
        RD_TRY(rd_f32_to_bf16_launch((bf16 *)W1t, p.p[RD_MOE_W1], D * He));
        RD_TRY(rd_f32_to_bf16_launch((bf16 *)W2t, p.p[RD_MOE_W2], He * D));
    }
    float *dW1 = g.p[RD_MOE_W1], *dW2 = g.p[RD_MOE_W2];
    for (int bw = 0; bw < 2; bw++) {
        RD_TRY(dense_gemms(xg, a, hdn, dout, (float *)o, dW1, dW2, W1t, W2t, P, D, He, prec, bw));
        RD_TRY(timer_start(tm));
        for (int i = 0; i < iters; i++)
            RD_TRY(dense_gemms(xg, a, hdn, dout, (float *)o, dW1, dW2, W1t, W2t, P, D, He, prec, bw));
        RD_TRY(timer_stop(tm, iters, bw ? &r->dense_fwdbwd_ms : &r->dense_fwd_ms));
    }
    return rd_cuda_sync();
}

extern "C" rd_status rd_cuda_bench_moe(rd_cuda_bench_result *r, const float *x, const float *params,
                                       const float *dy, const rd_moe_cfg *cfg, int64_t B, int64_t L,
                                       int iters, int prec) {
    RD_TRY(rd_moe_cfg_check(cfg));
    if (B < 1 || L < 1 || iters < 1)
        return rd_fail(RD_EINVAL, "bench_moe: expected B, L, iters >= 1, got %lld %lld %d",
                       (long long)B, (long long)L, iters);
    *r = rd_cuda_bench_result{};
    blist bl = {};
    rd_route_ws ws = {};
    timer_t_ tm = {};
    rd_moe_cuda_state *st = rd_moe_cuda_state_new();
    rd_experts_cuda *ex = rd_experts_cuda_new();
    rd_status s = (st && ex) ? RD_OK : rd_fail(RD_ENOMEM, "bench_moe: out of host memory");
    if (s == RD_OK && cudaEventCreate(&tm.a) != cudaSuccess) s = rd_fail(RD_ECUDA, "bench_moe: cudaEventCreate failed");
    if (s == RD_OK && cudaEventCreate(&tm.b) != cudaSuccess) s = rd_fail(RD_ECUDA, "bench_moe: cudaEventCreate failed");
    if (s == RD_OK) s = run(r, &bl, st, ex, &ws, &tm, x, params, dy, cfg, B, L, iters, prec);
    cudaStreamSynchronize(RD_STREAM);
    if (tm.a) cudaEventDestroy(tm.a);
    if (tm.b) cudaEventDestroy(tm.b);
    rd_moe_cuda_state_free(st);
    rd_experts_cuda_free(ex);
    rd_route_ws_free(&ws);
    for (int i = 0; i < bl.n; i++) rd_cuda_free(bl.d[i]);
    return s;
}
