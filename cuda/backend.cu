/* backend.cu — the CUDA table of backend.h: the launchers of the other .cu files behind
 * the op table, a context per object holding what the device ops need between calls (the
 * bf16 copies of the linear weights a forward rounded for its backward, GEMM and reduction
 * scratch), and the three graph-only ops: the patch embedding, the diffusion MSE and the
 * gated branch norm.
 *
 * Precision (set_precision): fp32 GEMMs (TF32 under rd_cuda_set_tf32), or bf16 — every
 * linear layer and the attention products read bf16 operands rounded just before each GEMM
 * and accumulate in fp32 into fp32 results; everything between the GEMMs stays fp32
 * (racedit.ref.bf16_gemm_operands is the float64 twin of this path).
 *
 * Determinism: no float atomics; the loss and the norms are fixed-grid two-stage
 * reductions in double: bitwise reproducible run to run. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"

#define BE_THREADS 256
#define BE_LOSS_BLOCKS 256

/* ---- the context ------------------------------------------------------------------- */

/* The bf16 copy of one linear weight, found by the weight's address (a weight of the
 * parameter buffer keeps its address for the model's life). */
typedef struct {
    const float *w;
    int64_t n;
    bf16 *h;
} wcopy;

typedef struct {
    int prec;
    wcopy *w;
    int nw, capw;
    rd_dbuf xh, gh, atws;  /* bf16 scratch: a linear's input, its output gradient, attention */
    rd_dbuf partial;       /* column-sum scratch of the bias gradients */
    rd_dbuf red;           /* (BE_LOSS_BLOCKS + 1) doubles, or one per token, for reductions */
} cu_ctx;

static void drop_copies(cu_ctx *c) {
    for (int i = 0; i < c->nw; i++) rd_cuda_free(c->w[i].h);
    c->nw = 0;
    rd_dbuf_free(&c->xh);
    rd_dbuf_free(&c->gh);
    rd_dbuf_free(&c->atws);
}

static rd_status cu_ctx_new(void **out) {
    *out = calloc(1, sizeof(cu_ctx));
    return *out ? RD_OK : rd_fail(RD_ENOMEM, "cuda: out of memory for a context");
}

static void cu_ctx_free(void *p) {
    cu_ctx *c = (cu_ctx *)p;
    if (!c) return;
    cudaStreamSynchronize(RD_STREAM);
    drop_copies(c);
    rd_dbuf_free(&c->partial);
    rd_dbuf_free(&c->red);
    free(c->w);
    free(c);
}

static rd_status cu_set_precision(void *p, int prec) {
    cu_ctx *c = (cu_ctx *)p;
    if (prec < RD_PREC_FP32 || prec > RD_PREC_BF16)
        return rd_fail(RD_EINVAL, "precision: unknown precision %d", prec);
    if (prec != RD_PREC_BF16 && c->nw) { /* copies and scratch unused: give the memory back */
        RD_TRY(rd_cuda_sync());
        drop_copies(c);
    }
    c->prec = prec;
    return RD_OK;
}

/* The bf16 copy of W (numel n), made on first use. */
static rd_status weight_copy(cu_ctx *c, const float *W, int64_t n, bf16 **out) {
    for (int i = 0; i < c->nw; i++)
        if (c->w[i].w == W && c->w[i].n == n) {
            *out = c->w[i].h;
            return RD_OK;
        }
    if (c->nw == c->capw) {
        int nc = c->capw ? 2 * c->capw : 16;
        wcopy *w = (wcopy *)realloc(c->w, (size_t)nc * sizeof *w);
        if (!w) return rd_fail(RD_ENOMEM, "cuda: out of memory for the bf16 weight table");
        c->w = w;
        c->capw = nc;
    }
    bf16 *h = NULL;
    RD_TRY(rd_cuda_malloc((void **)&h, (size_t)n * sizeof(bf16)));
    c->w[c->nw++] = (wcopy){W, n, h};
    *out = h;
    return RD_OK;
}

/* ---- linear layers ------------------------------------------------------------------ */

__global__ void bias_rows_kernel(float *out, const float *b, int64_t OC, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        out[i] = b[i % OC];
}

/* out (N,OC) = beta out + inp (N,IC) @ W (OC,IC)^T. bf16: W rounded into its copy (read
 * again by the backward), inp into scratch; cuBLAS accumulates in fp32 into the fp32 out. */
static rd_status lin_gemm(cu_ctx *c, float *out, float beta, const float *inp, const float *W,
                          int64_t N, int64_t IC, int64_t OC) {
    if (c->prec != RD_PREC_BF16)
        return rd_matmul_cuda(out, (int)OC, inp, (int)IC, 0, W, (int)IC, 1, N, OC, IC, 1.0f, beta);
    bf16 *wh, *xh;
    RD_TRY(weight_copy(c, W, OC * IC, &wh));
    RD_TRY(DBUF(c->xh, bf16, N * IC, xh));
    RD_TRY(rd_f32_to_bf16_launch(wh, W, OC * IC));
    RD_TRY(rd_f32_to_bf16_launch(xh, inp, N * IC));
    cublasHandle_t h;
    RD_TRY(rd_cublas(&h));
    return rd_gemm_typed(h, out, CUDA_R_32F, (int)OC, xh, (int)IC, 0, wh, (int)IC, 1, CUDA_R_16BF,
                         N, OC, IC, 1.0f, beta, CUBLAS_COMPUTE_32F);
}

static rd_status cu_linear_forward(void *ctx, float *out, const float *inp, const float *W,
                                   const float *b, int64_t N, int64_t IC, int64_t OC) {
    if (N < 0 || IC <= 0 || OC <= 0 || IC > INT32_MAX || OC > INT32_MAX)
        return rd_fail(RD_EINVAL, "linear_cuda: bad sizes N=%lld IC=%lld OC=%lld", (long long)N,
                       (long long)IC, (long long)OC);
    if (N == 0) return RD_OK;
    if (b) {
        bias_rows_kernel<<<rd_grid(N * OC, BE_THREADS), BE_THREADS, 0, RD_STREAM>>>(out, b, OC, N * OC);
        CU_LAUNCHED("bias_rows_kernel");
    }
    return lin_gemm((cu_ctx *)ctx, out, b ? 1.0f : 0.0f, inp, W, N, IC, OC);
}

/* dinp (N,IC, may be NULL) = dout W; dW (OC,IC) += dout^T inp; db (OC, may be NULL) += column
 * sums of dout (fp32 in every precision). bf16: W's copy from the forward, dout and inp
 * rounded into scratch. */
static rd_status cu_linear_backward(void *ctx, float *dinp, float *dW, float *db,
                                    const float *dout, const float *inp, const float *W,
                                    int64_t N, int64_t IC, int64_t OC) {
    cu_ctx *c = (cu_ctx *)ctx;
    if (N < 0 || IC <= 0 || OC <= 0 || IC > INT32_MAX || OC > INT32_MAX)
        return rd_fail(RD_EINVAL, "linear_backward_cuda: bad sizes N=%lld IC=%lld OC=%lld",
                       (long long)N, (long long)IC, (long long)OC);
    if (N == 0) return RD_OK;
    if (c->prec == RD_PREC_BF16) {
        bf16 *wh, *gh, *xh;
        RD_TRY(weight_copy(c, W, OC * IC, &wh));
        RD_TRY(DBUF(c->gh, bf16, N * OC, gh));
        RD_TRY(DBUF(c->xh, bf16, N * IC, xh));
        RD_TRY(rd_f32_to_bf16_launch(gh, dout, N * OC));
        RD_TRY(rd_f32_to_bf16_launch(xh, inp, N * IC));
        cublasHandle_t h;
        RD_TRY(rd_cublas(&h));
        if (dinp)
            RD_TRY(rd_gemm_typed(h, dinp, CUDA_R_32F, (int)IC, gh, (int)OC, 0, wh, (int)IC, 0,
                                 CUDA_R_16BF, N, IC, OC, 1.0f, 0.0f, CUBLAS_COMPUTE_32F));
        RD_TRY(rd_gemm_typed(h, dW, CUDA_R_32F, (int)IC, gh, (int)OC, 1, xh, (int)IC, 0,
                             CUDA_R_16BF, OC, IC, N, 1.0f, 1.0f, CUBLAS_COMPUTE_32F));
    } else {
        if (dinp) RD_TRY(rd_matmul_cuda(dinp, (int)IC, dout, (int)OC, 0, W, (int)IC, 0, N, IC, OC, 1.0f, 0.0f));
        RD_TRY(rd_matmul_cuda(dW, (int)IC, dout, (int)OC, 1, inp, (int)IC, 0, OC, IC, N, 1.0f, 1.0f));
    }
    if (!db) return RD_OK;
    float *partial;
    RD_TRY(DBUF(c->partial, float, rd_colsum_scratch(1, OC), partial));
    return rd_colsum_segments_cuda(db, dout, NULL, N, 1, OC, partial);
}

/* x (B,L,D) = bias (D) + pe (L,D), as the CPU (bias + pe, then the product added). */
__global__ void bias_pe_kernel(float *x, const float *bias, const float *pe, int64_t L, int64_t D,
                               int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t d = i % D, l = (i / D) % L;
        x[i] = bias[d] + pe[l * D + d];
    }
}

static rd_status cu_patch_embed(void *ctx, float *x, const float *patches, const float *W,
                                const float *b, const float *pe, int64_t B, int64_t L,
                                int64_t IC, int64_t D) {
    const int64_t n = B * L * D;
    if (n == 0) return RD_OK;
    bias_pe_kernel<<<rd_grid(n, BE_THREADS), BE_THREADS, 0, RD_STREAM>>>(x, b, pe, L, D, n);
    CU_LAUNCHED("bias_pe_kernel");
    return lin_gemm((cu_ctx *)ctx, x, 1.0f, patches, W, B * L, IC, D);
}

/* ---- attention in the context's precision (bf16: operands rounded into scratch) -------- */

static rd_status cu_attention_forward(void *ctx, float *out, float *att, const float *qkv,
                                      int64_t B, int64_t L, int64_t D, int64_t NH) {
    cu_ctx *c = (cu_ctx *)ctx;
    if (c->prec != RD_PREC_BF16) return rd_attention_forward_cuda(out, att, qkv, B, L, D, NH);
    void *ws;
    RD_TRY(rd_dbuf_get(&c->atws, rd_attention_bf16_scratch(B, L, D, NH), &ws));
    return rd_attention_forward_bf16_cuda(out, att, qkv, ws, B, L, D, NH);
}

static rd_status cu_attention_backward(void *ctx, float *dqkv, float *datt, const float *dout,
                                       const float *qkv, const float *att, int64_t B, int64_t L,
                                       int64_t D, int64_t NH) {
    cu_ctx *c = (cu_ctx *)ctx;
    if (c->prec != RD_PREC_BF16)
        return rd_attention_backward_cuda(dqkv, datt, dout, qkv, att, B, L, D, NH);
    void *ws;
    RD_TRY(rd_dbuf_get(&c->atws, rd_attention_bf16_scratch(B, L, D, NH), &ws));
    return rd_attention_backward_bf16_cuda(dqkv, datt, dout, qkv, att, ws, B, L, D, NH);
}

/* ---- reductions: the diffusion MSE and the gated branch norm --------------------------- */

/* part[blk] = sum of squared differences (double) over a fixed grid-stride share of the
 * first C of Co channels; dout = scale * diff there, 0 on the other channels. */
__global__ void mse_kernel(double *part, float *dout, const float *out, const float *tgt,
                           int64_t C, int64_t Co, int64_t HW, int64_t n, float scale) {
    __shared__ double acc[BE_THREADS];
    double a = 0.0;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t s = i % HW, c = (i / HW) % Co, b = i / (HW * Co);
        float g = 0.0f;
        if (c < C) {
            float d = out[i] - tgt[(b * C + c) * HW + s];
            a += (double)d * (double)d;
            g = d * scale;
        }
        dout[i] = g;
    }
    acc[threadIdx.x] = a;
    __syncthreads();
    for (int w = BE_THREADS / 2; w; w >>= 1) {
        if ((int)threadIdx.x < w) acc[threadIdx.x] += acc[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) part[blockIdx.x] = acc[0];
}

__global__ void sum_parts_kernel(double *out, const double *part, int64_t n, double inv) {
    if (blockIdx.x || threadIdx.x) return;
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += part[i];
    *out = s * inv;
}

static rd_status cu_mse(void *ctx, double *loss, float *dout, const float *out,
                        const float *target, int64_t B, int64_t C, int64_t Co, int64_t HW) {
    cu_ctx *c = (cu_ctx *)ctx;
    const int64_t n = B * Co * HW, nt = B * C * HW;
    if (nt < 1 || C > Co) return rd_fail(RD_EINVAL, "mse_cuda: bad sizes");
    double *part;
    RD_TRY(DBUF(c->red, double, BE_LOSS_BLOCKS + 1, part));
    mse_kernel<<<BE_LOSS_BLOCKS, BE_THREADS, 0, RD_STREAM>>>(part + 1, dout, out, target, C, Co,
                                                            HW, n, (float)(2.0 / (double)nt));
    CU_LAUNCHED("mse_kernel");
    sum_parts_kernel<<<1, 1, 0, RD_STREAM>>>(part, part + 1, BE_LOSS_BLOCKS, 1.0 / (double)nt);
    CU_LAUNCHED("sum_parts_kernel");
    return rd_cuda_d2h(loss, part, sizeof(double));
}

/* part[t] = || gate[b(t)] * v[t] ||_2 for the N tokens of v (N,D), gate rows (B,S) apart;
 * one warp per token, summed in double. */
__global__ void gated_norm_kernel(double *part, const float *v, const float *gate, int64_t L,
                                  int64_t D, int64_t S, int64_t N) {
    int64_t t = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (t >= N) return;
    const float *r = v + t * D, *g = gate + (t / L) * S;
    double s = 0.0;
    for (int64_t d = lane; d < D; d += 32) {
        double u = (double)g[d] * (double)r[d];
        s += u * u;
    }
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) part[t] = sqrt(s);
}

static rd_status cu_gated_norm(void *ctx, double *out, const float *v, const float *gate,
                               int64_t B, int64_t L, int64_t D, int64_t S) {
    cu_ctx *c = (cu_ctx *)ctx;
    const int64_t N = B * L;
    if (N < 1 || N > INT32_MAX) return rd_fail(RD_EINVAL, "gated_norm_cuda: %lld tokens", (long long)N);
    double *part;
    RD_TRY(DBUF(c->red, double, N + 1, part));
    gated_norm_kernel<<<rd_blocks(N, BE_THREADS / 32), BE_THREADS, 0, RD_STREAM>>>(part + 1, v, gate,
                                                                                   L, D, S, N);
    CU_LAUNCHED("gated_norm_kernel");
    sum_parts_kernel<<<1, 1, 0, RD_STREAM>>>(part, part + 1, N, 1.0 / (double)N);
    CU_LAUNCHED("sum_parts_kernel");
    return rd_cuda_d2h(out, part, sizeof(double));
}

static rd_status cu_grad_norm(void *ctx, double *out, const float *grads, int64_t n) {
    cu_ctx *c = (cu_ctx *)ctx;
    double *dev;
    RD_TRY(DBUF(c->red, double, 1, dev));
    RD_TRY(rd_grad_norm_cuda(dev, grads, n));
    return rd_cuda_d2h(out, dev, sizeof(double));
}

/* ---- memory, experts and the MoE layer: the launchers' types ---------------------------- */

static rd_status cu_copy(void *dst, const void *src, size_t bytes) {
    if (bytes) CU_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, RD_STREAM));
    return RD_OK;
}

static rd_status cu_experts_new(void **ex) {
    *ex = rd_experts_cuda_new();
    return *ex ? RD_OK : rd_fail(RD_ENOMEM, "experts_cuda: out of memory");
}
static void cu_experts_free(void *ex) { rd_experts_cuda_free((rd_experts_cuda *)ex); }
static rd_status cu_experts_set_precision(void *ex, int prec) {
    return rd_experts_cuda_set_precision((rd_experts_cuda *)ex, prec);
}
static rd_status cu_experts_forward(void *ex, float *y, const uint8_t *mask, const float *G,
                                    const float *x, const float *W1, const float *b1,
                                    const float *W2, const float *b2, int64_t N, int64_t D,
                                    int64_t E, int64_t He) {
    return rd_experts_forward_cuda((rd_experts_cuda *)ex, y, mask, G, x, W1, b1, W2, b2, N, D, E, He);
}
static rd_status cu_experts_backward(void *ex, float *dx, float *dG, float *dW1, float *db1,
                                     float *dW2, float *db2, const float *dy, const float *W1,
                                     const float *W2, int64_t N, int64_t D, int64_t E, int64_t He) {
    return rd_experts_backward_cuda((rd_experts_cuda *)ex, dx, dG, dW1, db1, dW2, db2, dy, W1, W2,
                                    N, D, E, He);
}

static rd_status cu_moe_new(void **st) {
    *st = rd_moe_cuda_state_new();
    return *st ? RD_OK : rd_fail(RD_ENOMEM, "moe_cuda: out of memory for the layer state");
}
static void cu_moe_free(void *st) { rd_moe_cuda_state_free((rd_moe_cuda_state *)st); }
static rd_status cu_moe_set_precision(void *st, int prec) {
    return rd_moe_cuda_set_precision((rd_moe_cuda_state *)st, prec);
}
static rd_status cu_moe_forward(void *st, float *y, const float *x, const rd_moe_cfg *cfg,
                                const rd_moe_params *p, int64_t B, int64_t L, int training,
                                const float *plr_target) {
    return rd_moe_forward_cuda((rd_moe_cuda_state *)st, y, x, cfg, p, B, L, training, plr_target);
}
static rd_status cu_moe_backward(void *st, float *dx, const rd_moe_params *grad, const float *dy,
                                 const float *x, const rd_moe_cfg *cfg, const rd_moe_params *p) {
    return rd_moe_backward_cuda((rd_moe_cuda_state *)st, dx, grad, dy, x, cfg, p);
}
static rd_status cu_moe_view(void *st, rd_moe_view *out) {
    return rd_moe_cuda_state_view((rd_moe_cuda_state *)st, out);
}
static rd_status cu_moe_aux(void *st, rd_moe_aux *out) {
    return rd_moe_cuda_get_aux((rd_moe_cuda_state *)st, out);
}
static rd_status cu_moe_set_threshold(void *st, const float *tau, int64_t n) {
    return rd_moe_set_threshold_cuda((rd_moe_cuda_state *)st, tau, n);
}
static rd_status cu_moe_copy_threshold(void *dst, void *src) {
    return rd_moe_cuda_copy_threshold((rd_moe_cuda_state *)dst, (const rd_moe_cuda_state *)src);
}

extern "C" const rd_backend rd_backend_cuda = {
    /* .name = */ "cuda", /* .host_memory = */ 0,
    rd_cuda_malloc, rd_cuda_free, rd_cuda_h2d, rd_cuda_d2h, cu_copy, rd_cuda_memset,
    rd_cuda_sync, cu_ctx_new, cu_ctx_free, cu_set_precision, NULL, NULL,
    rd_patchify_forward_cuda, rd_unpatchify_forward_cuda, cu_patch_embed,
    rd_timestep_embedding_forward_cuda, cu_linear_forward, cu_linear_backward,
    rd_layernorm_forward_cuda, rd_layernorm_backward_cuda, rd_modulate_forward_cuda,
    rd_modulate_backward_cuda, rd_gated_residual_forward_cuda, rd_gated_residual_backward_cuda,
    cu_attention_forward, cu_attention_backward, rd_silu_forward_cuda, rd_silu_backward_cuda,
    rd_gelu_forward_cuda, rd_gelu_backward_cuda, rd_embedding_forward_cuda,
    rd_embedding_backward_cuda, rd_add_cuda, cu_mse, cu_gated_norm,
    rd_route_cuda, rd_route_threshold_cuda, rd_mask_row_counts_cuda, rd_gate_forward_cuda,
    rd_gate_backward_cuda,
    rd_router_forward_cuda, rd_router_backward_cuda,
    cu_experts_new, cu_experts_free, cu_experts_set_precision, cu_experts_forward,
    cu_experts_backward,
    cu_moe_new, cu_moe_free, cu_moe_set_precision, cu_moe_forward, cu_moe_backward, cu_moe_view,
    cu_moe_aux, cu_moe_set_threshold, cu_moe_copy_threshold,
    rd_adamw_ema_step_cuda, cu_grad_norm, rd_nonfinite_index_cuda,
};
