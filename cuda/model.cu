/* model.cu — the whole Race-DiT (SPEC §1-§3) on the device: csrc/cpu/model.c step for
 * step, with the DiT layers of layers.cu / attention.cu, the device MoE composite of
 * moe.cu (aux losses included), cuBLAS linears, and the fused AdamW + EMA of optim.cu.
 *
 * Layout: the parameter buffer is the CPU model's, byte for byte (an rd_model built from
 * the same configuration supplies the tensor table; offsets are looked up by name), so
 * checkpoints, load_dit_state_dict and the named views are shared with the CPU class.
 * Parameters, gradients, the AdamW moments and the EMA are five flat device buffers owned
 * here; activations live in one device arena carved for the largest batch (as the CPU),
 * and inference (rd_model_cuda_infer) in a second one with one block's activations.
 *
 * Host boundary: forward / backward / train_step take HOST arrays (x, t, y, targets, dout)
 * and copy them into device staging buffers; t and y are validated on the host first, so
 * the label gather never reads out of range. Everything else stays on the device; a train
 * step reads back only the loss (and the MoE layers' one read-back each, see moe.cu).
 *
 * Determinism: no float atomics. Bias gradients use the fixed-order column sums of
 * common.cu, the label-table gradient walks the batch in order per column, and the loss
 * is a fixed-grid two-stage reduction in double: bitwise reproducible run to run.
 *
 * Precision (rd_model_cuda_set_precision): fp32 GEMMs (TF32 under rd_cuda_set_tf32), or
 * bf16 — every linear layer (lin_gemm / lin_bwd), the attention products and the expert
 * GEMMs read bf16 operands rounded just before each GEMM and accumulate in fp32 into fp32
 * results; everything between the GEMMs stays fp32 (racedit.ref.bf16_gemm_operands is the
 * float64 twin of this path). */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"

#define MD_THREADS 256
#define MD_LOSS_BLOCKS 256

typedef struct {
    int64_t qkv_w, qkv_b, proj_w, proj_b, fc1_w, fc1_b, fc2_w, fc2_b, moe, ada_w, ada_b;
} md_block_offsets;

typedef struct {
    float *mod, *xhat1, *rstd1, *m1, *qkv, *att, *atty, *attproj, *xhat2, *rstd2, *m2, *fc1,
        *gel, *ffn;
} md_block_acts;

/* What a forward reads and writes (as model.c's fwd_acts): the staged inputs, the output
 * image and the activations, of the training arena (a block set per block, kept for
 * backward) or of the inference arena (one block set that every block overwrites). */
typedef struct {
    int64_t *labels;           /* (B) */
    float *tdev, *xin, *outimg; /* (B), (B,C,H,W), (B,Co,H,W) */
    float *patches, *tfreq, *th, *ths, *temb, *c, *sc, *x;
    md_block_acts *ba;
    int shared;                /* 1: every block writes ba[0] */
    float *modf, *xhatf, *rstdf, *mf, *otok;
} md_fwd_acts;

struct rd_model_cuda {
    rd_model *host;            /* the CPU model of the same configuration: layout only */
    rd_model_cfg cfg;          /* with moe.plr_dim set, as rd_model_config */
    rd_moe_cfg layer;          /* each MoE block's config (loss weights / depth) */
    int64_t H, L, Pin, Pout, nparams;
    int64_t xe_w, xe_b, t0_w, t0_b, t2_w, t2_b, ytab, fl_w, fl_b, fa_w, fa_b;
    md_block_offsets *blk;
    rd_moe_cuda_state **moe;   /* depth states when MoE, else NULL */
    float *buf[RD_MODEL_CUDA_NBUF]; /* params, grads, adam m, adam v, ema (device) */
    float *pe;                 /* (L,D) device */
    int64_t step;              /* AdamW steps taken */
    /* activations (device arena) */
    void *arena;
    int64_t cap;
    int fixed;
    int64_t *labels;           /* (cap) device */
    float *tdev;               /* (cap) device */
    float *xin, *tgt, *outimg, *dout; /* (B,C,H,W) (B,C,H,W) (B,Co,H,W) (B,Co,H,W) */
    float *patches, *tfreq, *th, *ths, *c, *sc, *plr, *x;
    md_block_acts *ba;
    float *modf, *xhatf, *rstdf, *mf, *otok;
    float *dx, *da, *db, *dqkv, *datt, *dfc, *dmod, *dsc, *dt1, *dt2, *dotok;
    float *partial;            /* colsum scratch */
    double *loss_part;         /* (MD_LOSS_BLOCKS + 1) device */
    int64_t last_B;
    int have_forward, last_plr;
    /* bf16 (rd_model_cuda_set_precision): the forward's bf16 copies of the linear layers'
     * weights, packed (lw_n weights: parameter offset lw_off[i] -> lw_pk[i] in pbf, lw_total
     * elements; the experts keep their own copies), and scratch for rounding a linear's
     * input (xh) and output gradient (gh) and for the attention (atws) */
    int prec;
    int lw_n;
    int64_t *lw_off, *lw_pk, *lw_numel, lw_total;
    bf16 *pbf;
    rd_dbuf xh, gh, atws;
    rd_dbuf nrm;                /* branch norms: (B*L) per-token norms + (depth, 2) results */
    /* inference (rd_model_cuda_infer): its own device arena, one block set, one MoE state */
    void *iarena;
    int64_t icap;
    md_block_acts iba;
    md_fwd_acts inf;
    rd_moe_cuda_state *imoe;
};

/* ---- kernels ------------------------------------------------------------------------ */

/* Between images (B,C,H,W) and patch tokens (B,L,p*p*C): one thread per element, a
 * bijection, so either direction writes each element once. to_tok: tok <- img. */
__global__ void md_patch_kernel(float *tok, float *img, int to_tok, int64_t C, int64_t H,
                                int64_t W, int64_t p, int ijc, int64_t n) {
    const int64_t gw = W / p, L = (H / p) * gw, F = p * p * C;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (int64_t)gridDim.x * blockDim.x) {
        int64_t f = e % F, bl = e / F, l = bl % L, b = bl / L;
        int64_t c, i, j;
        if (ijc) { c = f % C; j = (f / C) % p; i = f / (C * p); }
        else { j = f % p; i = (f / p) % p; c = f / (p * p); }
        int64_t hi = l / gw, wi = l % gw;
        int64_t g = ((b * C + c) * H + hi * p + i) * W + wi * p + j;
        if (to_tok) tok[e] = img[g];
        else img[g] = tok[e];
    }
}

/* out (N,OC) rows = b (OC). */
__global__ void md_bias_rows_kernel(float *out, const float *b, int64_t OC, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        out[i] = b[i % OC];
}

/* x (B,L,D) = bias (D) + pe (L,D), as the CPU (bias + pe, then the product added). */
__global__ void md_bias_pe_kernel(float *x, const float *bias, const float *pe, int64_t L,
                                  int64_t D, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t d = i % D, l = (i / D) % L;
        x[i] = bias[d] + pe[l * D + d];
    }
}

/* c (B,D) = table[y[b]] + temb (B,D) (labels validated on the host). */
__global__ void md_embed_kernel(float *c, const float *table, const int64_t *y,
                                const float *temb, int64_t D, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t b = i / D, d = i % D;
        c[i] = table[y[b] * D + d] + temb[i];
    }
}

/* dtable (V,D) += scatter of dc (B,D) by y: thread d walks the batch in order, so repeated
 * labels add in batch order (deterministic, no atomics). */
__global__ void md_embed_bwd_kernel(float *dtable, const float *dc, const int64_t *y, int64_t B,
                                    int64_t D) {
    int64_t d = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= D) return;
    for (int64_t b = 0; b < B; b++) dtable[y[b] * D + d] += dc[b * D + d];
}

__global__ void md_gelu_fwd_kernel(float *out, const float *inp, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        out[i] = d_gelu_tanh(inp[i]);
}

/* dinp = dout * gelu'(inp); dinp may alias dout. */
__global__ void md_gelu_bwd_kernel(float *dinp, const float *dout, const float *inp, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dinp[i] = dout[i] * d_gelu_tanh_grad(inp[i]);
}

/* Diffusion MSE over the first C of Co channels: part[blk] = sum of squared differences
 * (double) over a fixed grid-stride share; dout = scale * diff there, 0 on the other
 * channels (learned-variance outputs get no gradient). */
__global__ void md_mse_kernel(double *part, float *dout, const float *out, const float *tgt,
                              int64_t C, int64_t Co, int64_t HW, int64_t n, float scale) {
    __shared__ double acc[MD_THREADS];
    double a = 0.0;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t s = i % HW, c = (i / HW) % Co, b = i / (HW * Co);
        float g = 0.0f;
        if (c < C) {
            float d = out[i] - tgt[(b * C + c) * HW + s];
            a += (double)d * (double)d;
            g = scale * d;
        }
        dout[i] = g;
    }
    acc[threadIdx.x] = a;
    __syncthreads();
    for (int w = MD_THREADS / 2; w; w >>= 1) {
        if ((int)threadIdx.x < w) acc[threadIdx.x] += acc[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) part[blockIdx.x] = acc[0];
}

__global__ void md_sum_parts_kernel(double *out, const double *part, int n, double inv) {
    if (blockIdx.x || threadIdx.x) return;
    double s = 0.0;
    for (int i = 0; i < n; i++) s += part[i];
    *out = s * inv;
}

/* part[t] = || gate[b(t)] * v[t] ||_2 for the N tokens of v (N,D), gate rows (B,S) apart;
 * one warp per token, summed in double. */
__global__ void md_gated_norm_kernel(double *part, const float *v, const float *gate, int64_t L,
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

/* ---- layer helpers ------------------------------------------------------------------ */

/* The bf16 copy of the linear weight W (a pointer into the parameter buffer) of numel
 * elements. */
static rd_status wcopy(rd_model_cuda *m, const float *W, int64_t numel, bf16 **wh) {
    const int64_t off = W - m->buf[RD_MODEL_CUDA_PARAMS];
    for (int i = 0; i < m->lw_n; i++)
        if (m->lw_off[i] == off) {
            if (numel > m->lw_numel[i])
                return rd_fail(RD_ESTATE, "model_cuda: weight at offset %lld has %lld elements, "
                               "not %lld", (long long)off, (long long)m->lw_numel[i],
                               (long long)numel);
            *wh = m->pbf + m->lw_pk[i];
            return RD_OK;
        }
    return rd_fail(RD_ESTATE, "model_cuda: no bf16 copy for the weight at offset %lld", (long long)off);
}

/* out (N,OC) = beta out + inp (N,IC) @ W (OC,IC)^T, W a linear weight of the parameter
 * buffer. bf16: W is rounded into its copy (read again by lin_bwd) and inp into scratch;
 * cuBLAS accumulates in fp32 into the fp32 out. */
static rd_status lin_gemm(rd_model_cuda *m, float *out, float beta, const float *inp,
                          const float *W, int64_t N, int64_t IC, int64_t OC) {
    if (m->prec != RD_PREC_BF16)
        return rd_matmul_cuda(out, (int)OC, inp, (int)IC, 0, W, (int)IC, 1, N, OC, IC, 1.0f, beta);
    bf16 *wh = NULL, *xh;
    RD_TRY(wcopy(m, W, OC * IC, &wh));
    RD_TRY(DBUF(m->xh, bf16, N * IC, xh));
    RD_TRY(rd_f32_to_bf16_launch(wh, W, OC * IC));
    RD_TRY(rd_f32_to_bf16_launch(xh, inp, N * IC));
    cublasHandle_t h;
    RD_TRY(rd_cublas(&h));
    return rd_gemm_typed(h, out, CUDA_R_32F, (int)OC, xh, (int)IC, 0, wh, (int)IC, 1, CUDA_R_16BF,
                         N, OC, IC, 1.0f, beta, CUBLAS_COMPUTE_32F);
}

/* out (N,OC) = inp (N,IC) @ W (OC,IC)^T + b (OC, may be NULL). */
static rd_status lin_fwd(rd_model_cuda *m, float *out, const float *inp, const float *W,
                         const float *b, int64_t N, int64_t IC, int64_t OC) {
    if (N == 0) return RD_OK;
    if (b) {
        md_bias_rows_kernel<<<rd_grid(N * OC, MD_THREADS), MD_THREADS, 0, RD_STREAM>>>(out, b, OC, N * OC);
        CU_LAUNCHED("md_bias_rows_kernel");
    }
    return lin_gemm(m, out, b ? 1.0f : 0.0f, inp, W, N, IC, OC);
}

/* dinp (N,IC, may be NULL) = dinp_beta*dinp + dout W; dW (OC,IC) += dout^T inp;
 * db (OC, may be NULL) += column sums of dout (fp32 in every precision). bf16: W's copy
 * from the forward, dout and inp rounded into scratch. */
static rd_status lin_bwd(rd_model_cuda *m, float *dinp, float dinp_beta, float *dW, float *db,
                         const float *dout, const float *inp, const float *W, int64_t N,
                         int64_t IC, int64_t OC) {
    if (m->prec == RD_PREC_BF16 && N > 0) {
        bf16 *wh = NULL, *gh, *xh;
        RD_TRY(wcopy(m, W, OC * IC, &wh));
        RD_TRY(DBUF(m->gh, bf16, N * OC, gh));
        RD_TRY(DBUF(m->xh, bf16, N * IC, xh));
        RD_TRY(rd_f32_to_bf16_launch(gh, dout, N * OC));
        RD_TRY(rd_f32_to_bf16_launch(xh, inp, N * IC));
        cublasHandle_t h;
        RD_TRY(rd_cublas(&h));
        if (dinp)
            RD_TRY(rd_gemm_typed(h, dinp, CUDA_R_32F, (int)IC, gh, (int)OC, 0, wh, (int)IC, 0,
                                 CUDA_R_16BF, N, IC, OC, 1.0f, dinp_beta, CUBLAS_COMPUTE_32F));
        RD_TRY(rd_gemm_typed(h, dW, CUDA_R_32F, (int)IC, gh, (int)OC, 1, xh, (int)IC, 0,
                             CUDA_R_16BF, OC, IC, N, 1.0f, 1.0f, CUBLAS_COMPUTE_32F));
    } else {
        if (dinp) RD_TRY(rd_matmul_cuda(dinp, (int)IC, dout, (int)OC, 0, W, (int)IC, 0, N, IC, OC, 1.0f, dinp_beta));
        RD_TRY(rd_matmul_cuda(dW, (int)IC, dout, (int)OC, 1, inp, (int)IC, 0, OC, IC, N, 1.0f, 1.0f));
    }
    if (db) RD_TRY(rd_colsum_segments_cuda(db, dout, NULL, N, 1, OC, m->partial));
    return RD_OK;
}

/* The attention in the model's precision (bf16: operands rounded into m->atws). */
static rd_status attn_fwd(rd_model_cuda *m, float *out, float *att, const float *qkv, int64_t B) {
    const rd_model_cfg *c = &m->cfg;
    if (m->prec != RD_PREC_BF16)
        return rd_attention_forward_cuda(out, att, qkv, B, m->L, c->D, c->NH);
    void *ws;
    RD_TRY(rd_dbuf_get(&m->atws, rd_attention_bf16_scratch(B, m->L, c->D, c->NH), &ws));
    return rd_attention_forward_bf16_cuda(out, att, qkv, ws, B, m->L, c->D, c->NH);
}

static rd_status attn_bwd(rd_model_cuda *m, float *dqkv, float *datt, const float *dout,
                          const float *qkv, const float *att, int64_t B) {
    const rd_model_cfg *c = &m->cfg;
    if (m->prec != RD_PREC_BF16)
        return rd_attention_backward_cuda(dqkv, datt, dout, qkv, att, B, m->L, c->D, c->NH);
    void *ws;
    RD_TRY(rd_dbuf_get(&m->atws, rd_attention_bf16_scratch(B, m->L, c->D, c->NH), &ws));
    return rd_attention_backward_bf16_cuda(dqkv, datt, dout, qkv, att, ws, B, m->L, c->D, c->NH);
}

static rd_status patch_op(float *tok, float *img, int to_tok, int64_t B, int64_t C, int64_t H,
                          int64_t p, int ijc) {
    const int64_t n = B * C * H * H;
    md_patch_kernel<<<rd_grid(n, MD_THREADS), MD_THREADS, 0, RD_STREAM>>>(tok, img, to_tok, C, H, H,
                                                                         p, ijc, n);
    CU_LAUNCHED("md_patch_kernel");
    return RD_OK;
}

static rd_status gelu_op(float *out, const float *inp, const float *dout, int64_t n) {
    if (dout) md_gelu_bwd_kernel<<<rd_grid(n, MD_THREADS), MD_THREADS, 0, RD_STREAM>>>(out, dout, inp, n);
    else md_gelu_fwd_kernel<<<rd_grid(n, MD_THREADS), MD_THREADS, 0, RD_STREAM>>>(out, inp, n);
    CU_LAUNCHED("md_gelu_kernel");
    return RD_OK;
}

/* ---- construction --------------------------------------------------------------------- */

static int64_t find_tensor(const rd_model *h, const char *fmt, ...) {
    char name[RD_NAME_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    for (int i = 0; i < rd_model_num_tensors(h); i++) {
        const rd_tensor_info *t = rd_model_tensor(h, i);
        if (!strcmp(t->name, name)) return t->offset;
    }
    return -1;
}

static rd_status build_offsets(rd_model_cuda *m) {
    const rd_model *h = m->host;
    int miss = 0;
#define F(dst, ...) miss |= ((dst) = find_tensor(h, __VA_ARGS__)) < 0
    F(m->xe_w, "x_embedder.proj.weight");
    F(m->xe_b, "x_embedder.proj.bias");
    F(m->t0_w, "t_embedder.mlp.0.weight");
    F(m->t0_b, "t_embedder.mlp.0.bias");
    F(m->t2_w, "t_embedder.mlp.2.weight");
    F(m->t2_b, "t_embedder.mlp.2.bias");
    F(m->ytab, "y_embedder.embedding_table.weight");
    F(m->fl_w, "final_layer.linear.weight");
    F(m->fl_b, "final_layer.linear.bias");
    F(m->fa_w, "final_layer.adaLN_modulation.1.weight");
    F(m->fa_b, "final_layer.adaLN_modulation.1.bias");
    for (int64_t i = 0; i < m->cfg.depth; i++) {
        md_block_offsets *b = &m->blk[i];
        long long li = (long long)i;
        F(b->qkv_w, "blocks.%lld.attn.qkv.weight", li);
        F(b->qkv_b, "blocks.%lld.attn.qkv.bias", li);
        F(b->proj_w, "blocks.%lld.attn.proj.weight", li);
        F(b->proj_b, "blocks.%lld.attn.proj.bias", li);
        F(b->ada_w, "blocks.%lld.adaLN_modulation.1.weight", li);
        F(b->ada_b, "blocks.%lld.adaLN_modulation.1.bias", li);
        if (m->moe) {
            F(b->moe, "blocks.%lld.moe.router_w", li);
        } else {
            F(b->fc1_w, "blocks.%lld.mlp.fc1.weight", li);
            F(b->fc1_b, "blocks.%lld.mlp.fc1.bias", li);
            F(b->fc2_w, "blocks.%lld.mlp.fc2.weight", li);
            F(b->fc2_b, "blocks.%lld.mlp.fc2.bias", li);
        }
    }
#undef F
    return miss ? rd_fail(RD_EINVAL, "model_cuda: the CPU layout lacks an expected tensor") : RD_OK;
}

/* The linear layers' weights (the GEMM operands of lin_gemm / lin_bwd) and their places
 * in the packed bf16 copy. */
static rd_status build_linear_table(rd_model_cuda *m) {
    const int per_block = m->moe ? 3 : 5;
    const int n = 5 + per_block * (int)m->cfg.depth;
    m->lw_off = (int64_t *)calloc((size_t)n, sizeof(int64_t));
    m->lw_pk = (int64_t *)calloc((size_t)n, sizeof(int64_t));
    m->lw_numel = (int64_t *)calloc((size_t)n, sizeof(int64_t));
    if (!m->lw_off || !m->lw_pk || !m->lw_numel) return rd_fail(RD_ENOMEM, "model_cuda: out of memory");
    int64_t *o = m->lw_off;
    int k = 0;
    o[k++] = m->xe_w; o[k++] = m->t0_w; o[k++] = m->t2_w; o[k++] = m->fa_w; o[k++] = m->fl_w;
    for (int64_t i = 0; i < m->cfg.depth; i++) {
        const md_block_offsets *b = &m->blk[i];
        o[k++] = b->ada_w; o[k++] = b->qkv_w; o[k++] = b->proj_w;
        if (!m->moe) { o[k++] = b->fc1_w; o[k++] = b->fc2_w; }
    }
    m->lw_n = k;
    m->lw_total = 0;
    for (int i = 0; i < k; i++) {
        int64_t numel = 0; /* the largest tensor starting there (an empty one may share it) */
        for (int j = 0; j < rd_model_num_tensors(m->host); j++) {
            const rd_tensor_info *t = rd_model_tensor(m->host, j);
            if (t->offset == o[i] && t->numel > numel) numel = t->numel;
        }
        if (numel <= 0) return rd_fail(RD_EINVAL, "model_cuda: no tensor at offset %lld", (long long)o[i]);
        m->lw_numel[i] = numel;
        m->lw_pk[i] = m->lw_total;
        m->lw_total += (numel + 7) / 8 * 8; /* 16-byte aligned copies */
    }
    return RD_OK;
}

extern "C" rd_status rd_model_cuda_new(rd_model_cuda **out, const rd_model_cfg *cfg) {
    *out = NULL;
    rd_model_cuda *m = (rd_model_cuda *)calloc(1, sizeof *m);
    if (!m) return rd_fail(RD_ENOMEM, "model_cuda: out of memory");
    rd_status s = rd_model_new(&m->host, cfg);
    if (s) {
        free(m);
        return s;
    }
    m->cfg = *rd_model_config(m->host);
    const rd_model_cfg *c = &m->cfg;
    const int64_t p = c->patch, D = c->D;
    m->H = c->input_size;
    m->L = (m->H / p) * (m->H / p);
    m->Pin = p * p * c->in_channels;
    m->Pout = p * p * c->out_channels;
    m->nparams = rd_model_num_params(m->host);
    float *pe = NULL;
    m->blk = (md_block_offsets *)calloc((size_t)c->depth, sizeof *m->blk);
    m->ba = (md_block_acts *)calloc((size_t)c->depth, sizeof *m->ba);
    if (!m->blk || !m->ba) {
        s = rd_fail(RD_ENOMEM, "model_cuda: out of memory");
        goto fail;
    }
    if (c->moe.E > 0) {
        /* the same per-layer weights as model.c: each aux loss is the mean over layers */
        m->layer = c->moe;
        m->layer.plr_weight /= (float)c->depth;
        m->layer.sim_weight /= (float)c->depth;
        m->layer.balance_weight /= (float)c->depth;
        m->moe = (rd_moe_cuda_state **)calloc((size_t)c->depth, sizeof *m->moe);
        if (!m->moe) {
            s = rd_fail(RD_ENOMEM, "model_cuda: out of memory");
            goto fail;
        }
        for (int64_t i = 0; i < c->depth; i++)
            if (!(m->moe[i] = rd_moe_cuda_state_new())) {
                s = rd_fail(RD_ENOMEM, "model_cuda: out of memory for the MoE states");
                goto fail;
            }
    }
    if ((s = build_offsets(m))) goto fail;
    if ((s = build_linear_table(m))) goto fail;
    for (int i = 0; i < RD_MODEL_CUDA_NBUF; i++) {
        if ((s = rd_cuda_malloc((void **)&m->buf[i], (size_t)m->nparams * sizeof(float)))) goto fail;
        if ((s = rd_cuda_memset(m->buf[i], 0, (size_t)m->nparams * sizeof(float)))) goto fail;
    }
    pe = (float *)malloc((size_t)(m->L * D) * sizeof(float));
    if (!pe) {
        s = rd_fail(RD_ENOMEM, "model_cuda: out of memory");
        goto fail;
    }
    if ((s = rd_pos_embed_2d(pe, m->H / p, m->H / p, D))) goto fail;
    if ((s = rd_cuda_malloc((void **)&m->pe, (size_t)(m->L * D) * sizeof(float)))) goto fail;
    if ((s = rd_cuda_h2d(m->pe, pe, (size_t)(m->L * D) * sizeof(float)))) goto fail;
    if ((s = rd_cuda_malloc((void **)&m->loss_part, (MD_LOSS_BLOCKS + 1) * sizeof(double)))) goto fail;
    free(pe);
    *out = m;
    return RD_OK;
fail:
    free(pe);
    rd_model_cuda_free(m);
    return s;
}

extern "C" void rd_model_cuda_free(rd_model_cuda *m) {
    if (!m) return;
    if (m->moe)
        for (int64_t i = 0; i < m->cfg.depth; i++) rd_moe_cuda_state_free(m->moe[i]);
    free(m->moe);
    for (int i = 0; i < RD_MODEL_CUDA_NBUF; i++) rd_cuda_free(m->buf[i]);
    rd_cuda_free(m->pe);
    rd_cuda_free(m->loss_part);
    rd_cuda_free(m->arena);
    rd_cuda_free(m->pbf);
    free(m->lw_off);
    free(m->lw_pk);
    free(m->lw_numel);
    rd_dbuf_free(&m->xh);
    rd_dbuf_free(&m->gh);
    rd_dbuf_free(&m->atws);
    rd_dbuf_free(&m->nrm);
    free(m->blk);
    free(m->ba);
    rd_model_cuda_infer_release(m);
    rd_model_free(m->host);
    free(m);
}

extern "C" const rd_model *rd_model_cuda_layout(const rd_model_cuda *m) { return m->host; }
extern "C" int64_t rd_model_cuda_num_params(const rd_model_cuda *m) { return m->nparams; }
extern "C" float *rd_model_cuda_buffer(rd_model_cuda *m, int which) {
    return which >= 0 && which < RD_MODEL_CUDA_NBUF ? m->buf[which] : NULL;
}
extern "C" int64_t rd_model_cuda_num_moe(const rd_model_cuda *m) { return m->moe ? m->cfg.depth : 0; }
extern "C" rd_moe_cuda_state *rd_model_cuda_moe_state(rd_model_cuda *m, int64_t l) {
    return m->moe && l >= 0 && l < m->cfg.depth ? m->moe[l] : NULL;
}
extern "C" int64_t rd_model_cuda_max_batch(const rd_model_cuda *m) { return m->cap; }
extern "C" int64_t rd_model_cuda_last_batch(const rd_model_cuda *m) {
    return m->have_forward ? m->last_B : 0;
}
extern "C" int64_t rd_model_cuda_get_step(const rd_model_cuda *m) { return m->step; }
extern "C" rd_status rd_model_cuda_set_step(rd_model_cuda *m, int64_t step) {
    if (step < 0) return rd_fail(RD_EINVAL, "model_cuda: step must be >= 0, got %lld", (long long)step);
    m->step = step;
    return RD_OK;
}

extern "C" rd_status rd_model_cuda_set_precision(rd_model_cuda *m, int prec) {
    if (prec < RD_PREC_FP32 || prec > RD_PREC_BF16)
        return rd_fail(RD_EINVAL, "model_cuda: unknown precision %d", prec);
    m->have_forward = 0;
    if (prec == RD_PREC_BF16 && !m->pbf)
        RD_TRY(rd_cuda_malloc((void **)&m->pbf, (size_t)m->lw_total * sizeof(bf16)));
    if (prec != RD_PREC_BF16 && m->pbf) { /* copies and scratch unused: give the memory back */
        RD_TRY(rd_cuda_sync());
        rd_cuda_free(m->pbf);
        m->pbf = NULL;
        rd_dbuf_free(&m->xh);
        rd_dbuf_free(&m->gh);
        rd_dbuf_free(&m->atws);
    }
    for (int64_t i = 0; m->moe && i < m->cfg.depth; i++)
        RD_TRY(rd_moe_cuda_set_precision(m->moe[i], prec));
    if (m->imoe) RD_TRY(rd_moe_cuda_set_precision(m->imoe, prec));
    m->prec = prec;
    return RD_OK;
}

/* ---- activations ------------------------------------------------------------------- */

/* Bytes counted in double, as model.c's arena: no size wraps, and below
 * RD_MAX_ALLOC_BYTES (checked before carving) every count is exact. */
static float *carve(char *base, double *used, double nfloats) {
    float *p = base ? (float *)(base + (int64_t)*used) : NULL;
    *used += ceil(nfloats * 4 / 256) * 256;
    return p;
}

/* One block's activations for N = B*L tokens (att: B*NH*L*L floats). */
static void carve_block(md_block_acts *a, char *base, double *u, double B, double N, double D,
                        double att, int dense) {
    a->mod = carve(base, u, B * 6 * D);
    a->xhat1 = carve(base, u, N * D);
    a->rstd1 = carve(base, u, N);
    a->m1 = carve(base, u, N * D);
    a->qkv = carve(base, u, N * 3 * D);
    a->att = carve(base, u, att);
    a->atty = carve(base, u, N * D);
    a->attproj = carve(base, u, N * D);
    a->xhat2 = carve(base, u, N * D);
    a->rstd2 = carve(base, u, N);
    a->m2 = carve(base, u, N * D);
    a->fc1 = dense ? carve(base, u, N * 4 * D) : NULL;
    a->gel = dense ? carve(base, u, N * 4 * D) : NULL;
    a->ffn = carve(base, u, N * D);
}

static double carve_all(rd_model_cuda *m, char *base, double B) {
    const rd_model_cfg *c = &m->cfg;
    const double D = c->D, L = m->L, N = B * L, F = RD_FREQ_DIM;
    const double att = B * c->NH * L * L, img = B * c->in_channels * m->H * m->H;
    const double oimg = B * c->out_channels * m->H * m->H;
    const int dense = c->moe.E == 0;
    double u = 0;
    m->labels = (int64_t *)carve(base, &u, 2 * B);
    m->tdev = carve(base, &u, B);
    m->xin = carve(base, &u, img);
    m->tgt = carve(base, &u, img);
    m->outimg = carve(base, &u, oimg);
    m->dout = carve(base, &u, oimg);
    m->patches = carve(base, &u, N * m->Pin);
    m->tfreq = carve(base, &u, B * F);
    m->th = carve(base, &u, B * D);
    m->ths = carve(base, &u, B * D);
    m->c = carve(base, &u, B * D);
    m->sc = carve(base, &u, B * D);
    m->plr = dense ? NULL : carve(base, &u, N * m->Pin);
    m->x = carve(base, &u, N * D);
    for (int64_t i = 0; i < c->depth; i++) carve_block(&m->ba[i], base, &u, B, N, D, att, dense);
    m->modf = carve(base, &u, B * 2 * D);
    m->xhatf = carve(base, &u, N * D);
    m->rstdf = carve(base, &u, N);
    m->mf = carve(base, &u, N * D);
    m->otok = carve(base, &u, N * m->Pout);
    m->dx = carve(base, &u, N * D);
    m->da = carve(base, &u, N * D);
    m->db = carve(base, &u, N * D);
    m->dqkv = carve(base, &u, N * 3 * D);
    m->datt = carve(base, &u, att);
    m->dfc = dense ? carve(base, &u, N * 4 * D) : NULL;
    m->dmod = carve(base, &u, B * 6 * D);
    m->dsc = carve(base, &u, B * D);
    m->dt1 = carve(base, &u, B * D);
    m->dt2 = carve(base, &u, B * D);
    m->dotok = carve(base, &u, N * m->Pout);
    const int64_t cols = 6 * c->D > m->Pout ? 6 * c->D : m->Pout;
    m->partial = carve(base, &u, rd_colsum_scratch(1, cols));
    return u;
}

extern "C" rd_status rd_model_cuda_reserve(rd_model_cuda *m, int64_t max_batch, int fixed) {
    if (max_batch < 1)
        return rd_fail(RD_EINVAL, "max_batch must be >= 1, got %lld", (long long)max_batch);
    if (max_batch > 65535)
        return rd_fail(RD_EINVAL, "max_batch %lld exceeds 65535 (the device layers' limit)",
                       (long long)max_batch);
    const double bytes = carve_all(m, NULL, (double)max_batch);
    if (bytes > RD_MAX_ALLOC_BYTES)
        return rd_fail(RD_ENOMEM, "model_cuda: activations of batch %lld need %.4g MiB, more than "
                       "one allocation can hold", (long long)max_batch, bytes / 1048576.0);
    void *arena = NULL;
    rd_status s = rd_cuda_malloc(&arena, (size_t)bytes);
    if (s) {
        carve_all(m, (char *)m->arena, (double)m->cap); /* keep the old carving valid */
        return rd_fail(s, "model_cuda: no device memory for activations of batch %lld (%.0f MiB)",
                       (long long)max_batch, bytes / 1048576.0);
    }
    rd_cuda_free(m->arena);
    m->arena = arena;
    carve_all(m, (char *)arena, (double)max_batch);
    m->cap = max_batch;
    m->fixed = fixed;
    m->have_forward = 0;
    return RD_OK;
}

/* ---- forward ---------------------------------------------------------------------- */

static void point_moe(rd_model_cuda *m, rd_moe_params *mp, float *buf, int64_t i) {
    rd_moe_params_point(mp, buf + m->blk[i].moe, &m->layer);
}

/* The state MoE block i routes with: its own in training arena forwards; in inference the
 * shared one, given block i's threshold (or none: batch top-K) first. */
static rd_status block_moe_state(rd_model_cuda *m, const md_fwd_acts *A, int64_t i,
                                 rd_moe_cuda_state **st) {
    *st = A->shared ? m->imoe : m->moe[i];
    return A->shared ? rd_moe_cuda_copy_threshold(m->imoe, m->moe[i]) : RD_OK;
}

/* Block i on A's residual stream; plr (N,Pin device, may be NULL) the PLR heads' target. */
static rd_status block_forward(rd_model_cuda *m, const md_fwd_acts *A, int64_t i, int64_t B,
                               int training, const float *plr) {
    const rd_model_cfg *c = &m->cfg;
    const md_block_offsets *o = &m->blk[i];
    md_block_acts *a = A->shared ? A->ba : &A->ba[i];
    const float *P = m->buf[RD_MODEL_CUDA_PARAMS];
    const int64_t D = c->D, L = m->L, N = B * L, S = 6 * D;
    RD_TRY(lin_fwd(m, a->mod, A->sc, P + o->ada_w, P + o->ada_b, B, D, 6 * D));
    RD_TRY(rd_layernorm_forward_cuda(a->xhat1, a->rstd1, A->x, N, D));
    RD_TRY(rd_modulate_forward_cuda(a->m1, a->xhat1, a->mod, a->mod + D, B, L, D, S));
    RD_TRY(lin_fwd(m, a->qkv, a->m1, P + o->qkv_w, P + o->qkv_b, N, D, 3 * D));
    RD_TRY(attn_fwd(m, a->atty, a->att, a->qkv, B));
    RD_TRY(lin_fwd(m, a->attproj, a->atty, P + o->proj_w, P + o->proj_b, N, D, D));
    RD_TRY(rd_gated_residual_forward_cuda(A->x, A->x, a->attproj, a->mod + 2 * D, B, L, D, S));
    RD_TRY(rd_layernorm_forward_cuda(a->xhat2, a->rstd2, A->x, N, D));
    RD_TRY(rd_modulate_forward_cuda(a->m2, a->xhat2, a->mod + 3 * D, a->mod + 4 * D, B, L, D, S));
    if (m->moe) {
        rd_moe_params mp;
        rd_moe_cuda_state *st;
        point_moe(m, &mp, m->buf[RD_MODEL_CUDA_PARAMS], i);
        RD_TRY(block_moe_state(m, A, i, &st));
        RD_TRY(rd_moe_forward_cuda(st, a->ffn, a->m2, &m->layer, &mp, B, L, training, plr));
    } else {
        RD_TRY(lin_fwd(m, a->fc1, a->m2, P + o->fc1_w, P + o->fc1_b, N, D, 4 * D));
        RD_TRY(gelu_op(a->gel, a->fc1, NULL, N * 4 * D));
        RD_TRY(lin_fwd(m, a->ffn, a->gel, P + o->fc2_w, P + o->fc2_b, N, 4 * D, D));
    }
    return rd_gated_residual_forward_cuda(A->x, A->x, a->ffn, a->mod + 5 * D, B, L, D, S);
}

static rd_status check_host_inputs(const rd_model_cuda *m, const float *t, const int64_t *y,
                                   const float *plr, const char *plr_name, int64_t B) {
    for (int64_t b = 0; b < B; b++)
        if (!(t[b] >= 0.0f && t[b] <= RD_T_MAX)) /* also catches NaN */
            return rd_fail(RD_EINVAL, "t[%lld]=%g outside [0, %g]", (long long)b, (double)t[b],
                           (double)RD_T_MAX);
    for (int64_t b = 0; b < B; b++)
        if (y[b] < 0 || y[b] > m->cfg.num_classes)
            return rd_fail(RD_EINVAL, "y[%lld]=%lld outside [0, %lld] (%lld = null label)",
                           (long long)b, (long long)y[b], (long long)m->cfg.num_classes,
                           (long long)m->cfg.num_classes);
    if (plr) {
        const int64_t n = B * m->cfg.in_channels * m->H * m->H;
        for (int64_t i = 0; i < n; i++)
            if (!isfinite(plr[i]))
                return rd_fail(RD_EINVAL, "%s: non-finite value %g at flat index %lld of (B,C,H,W)",
                               plr_name, (double)plr[i], (long long)i);
    }
    return RD_OK;
}

/* The forward's layers on A's staged inputs (xin, tdev, labels) into A->outimg; plr
 * (N,Pin device, may be NULL) the patchified PLR target. */
static rd_status forward_pass(rd_model_cuda *m, const md_fwd_acts *A, int64_t B, int training,
                              const float *plr) {
    const rd_model_cfg *c = &m->cfg;
    const int64_t D = c->D, L = m->L, N = B * L, p = c->patch, H = m->H;
    const float *P = m->buf[RD_MODEL_CUDA_PARAMS];
    RD_TRY(patch_op(A->patches, A->xin, 1, B, c->in_channels, H, p, 0));
    md_bias_pe_kernel<<<rd_grid(N * D, MD_THREADS), MD_THREADS, 0, RD_STREAM>>>(A->x, P + m->xe_b,
                                                                               m->pe, L, D, N * D);
    CU_LAUNCHED("md_bias_pe_kernel");
    RD_TRY(lin_gemm(m, A->x, 1.0f, A->patches, P + m->xe_w, N, m->Pin, D));
    RD_TRY(rd_timestep_embedding_forward_cuda(A->tfreq, A->tdev, B, RD_FREQ_DIM, RD_MAX_PERIOD));
    RD_TRY(lin_fwd(m, A->th, A->tfreq, P + m->t0_w, P + m->t0_b, B, RD_FREQ_DIM, D));
    RD_TRY(rd_silu_forward_cuda(A->ths, A->th, B * D));
    RD_TRY(lin_fwd(m, A->temb, A->ths, P + m->t2_w, P + m->t2_b, B, D, D));
    md_embed_kernel<<<rd_grid(B * D, MD_THREADS), MD_THREADS, 0, RD_STREAM>>>(
        A->c, P + m->ytab, A->labels, A->temb, D, B * D);
    CU_LAUNCHED("md_embed_kernel");
    RD_TRY(rd_silu_forward_cuda(A->sc, A->c, B * D));
    for (int64_t i = 0; i < c->depth; i++) RD_TRY(block_forward(m, A, i, B, training, plr));
    RD_TRY(lin_fwd(m, A->modf, A->sc, P + m->fa_w, P + m->fa_b, B, D, 2 * D));
    RD_TRY(rd_layernorm_forward_cuda(A->xhatf, A->rstdf, A->x, N, D));
    RD_TRY(rd_modulate_forward_cuda(A->mf, A->xhatf, A->modf, A->modf + D, B, L, D, 2 * D));
    RD_TRY(lin_fwd(m, A->otok, A->mf, P + m->fl_w, P + m->fl_b, N, D, m->Pout));
    return patch_op(A->otok, A->outimg, 0, B, c->out_channels, H, p, 1);
}

/* The training arena's pointers as a forward's set. */
static md_fwd_acts train_acts(const rd_model_cuda *m) {
    md_fwd_acts A = {m->labels, m->tdev, m->xin, m->outimg, m->patches, m->tfreq, m->th,
                     m->ths, m->dt1, m->c, m->sc, m->x, m->ba, 0, m->modf, m->xhatf,
                     m->rstdf, m->mf, m->otok};
    return A;
}

/* Forward on the staged inputs (xin, tdev, labels, tgt when plr). */
static rd_status forward_dev(rd_model_cuda *m, int64_t B, int training, int plr) {
    const rd_model_cfg *c = &m->cfg;
    m->have_forward = 0;
    m->last_plr = m->moe && plr && training && c->moe.plr_weight != 0.0f;
    if (m->last_plr) RD_TRY(patch_op(m->plr, m->tgt, 1, B, c->in_channels, m->H, c->patch, 1));
    const md_fwd_acts A = train_acts(m);
    RD_TRY(forward_pass(m, &A, B, training, m->last_plr ? m->plr : NULL));
    m->last_B = B;
    m->have_forward = 1;
    return RD_OK;
}

/* Copy x (B,C,H,W), t (B), y (B) from the host into A's staging buffers. */
static rd_status upload_inputs(const rd_model_cuda *m, const md_fwd_acts *A, const float *x,
                               const float *t, const int64_t *y, int64_t B) {
    const size_t img = (size_t)(B * m->cfg.in_channels * m->H * m->H) * sizeof(float);
    RD_TRY(rd_cuda_h2d(A->xin, x, img));
    RD_TRY(rd_cuda_h2d(A->tdev, t, (size_t)B * sizeof(float)));
    return rd_cuda_h2d(A->labels, y, (size_t)B * sizeof(int64_t));
}

/* Validate and stage the host inputs (growing the arena when allowed). */
static rd_status stage(rd_model_cuda *m, const float *x, const float *t, const int64_t *y,
                       const float *tgt, int64_t B) {
    if (B < 1) return rd_fail(RD_EINVAL, "batch must be >= 1, got %lld", (long long)B);
    RD_TRY(check_host_inputs(m, t, y, NULL, NULL, B));
    if (B > m->cap) {
        if (m->fixed)
            return rd_fail(RD_EINVAL, "batch %lld exceeds max_batch=%lld given at construction",
                           (long long)B, (long long)m->cap);
        RD_TRY(rd_model_cuda_reserve(m, B, 0));
    }
    const size_t img = (size_t)(B * m->cfg.in_channels * m->H * m->H) * sizeof(float);
    m->have_forward = 0;
    const md_fwd_acts A = train_acts(m);
    RD_TRY(upload_inputs(m, &A, x, t, y, B));
    if (tgt) RD_TRY(rd_cuda_h2d(m->tgt, tgt, img));
    return RD_OK;
}

extern "C" rd_status rd_model_cuda_forward(rd_model_cuda *m, float *out, const float *x,
                                           const float *t, const int64_t *y,
                                           const float *plr_target, int64_t B, int training) {
    int plr = m->moe && plr_target && training && m->cfg.moe.plr_weight != 0.0f;
    if (plr && B >= 1) RD_TRY(check_host_inputs(m, t, y, plr_target, "plr_target", B));
    RD_TRY(stage(m, x, t, y, plr ? plr_target : NULL, B));
    RD_TRY(forward_dev(m, B, training, plr));
    if (out)
        RD_TRY(rd_cuda_d2h(out, m->outimg,
                           (size_t)(B * m->cfg.out_channels * m->H * m->H) * sizeof(float)));
    return RD_OK;
}

/* ---- inference --------------------------------------------------------------------- */

/* The inference arena's carving into A and its one block set ba, for batch B; with
 * base == NULL only counts. */
static double carve_infer(const rd_model_cuda *m, md_fwd_acts *A, md_block_acts *ba,
                          char *base, double B) {
    const rd_model_cfg *c = &m->cfg;
    const double D = c->D, L = m->L, N = B * L;
    double u = 0;
    A->labels = (int64_t *)carve(base, &u, 2 * B);
    A->tdev = carve(base, &u, B);
    A->xin = carve(base, &u, B * c->in_channels * m->H * m->H);
    A->outimg = carve(base, &u, B * c->out_channels * m->H * m->H);
    A->patches = carve(base, &u, N * m->Pin);
    A->tfreq = carve(base, &u, B * RD_FREQ_DIM);
    A->th = carve(base, &u, B * D);
    A->ths = carve(base, &u, B * D);
    A->temb = carve(base, &u, B * D);
    A->c = carve(base, &u, B * D);
    A->sc = carve(base, &u, B * D);
    A->x = carve(base, &u, N * D);
    carve_block(ba, base, &u, B, N, D, B * c->NH * L * L, c->moe.E == 0);
    A->ba = ba;
    A->shared = 1;
    A->modf = carve(base, &u, B * 2 * D);
    A->xhatf = carve(base, &u, N * D);
    A->rstdf = carve(base, &u, N);
    A->mf = carve(base, &u, N * D);
    A->otok = carve(base, &u, N * m->Pout);
    return u;
}

/* Grow the inference arena (and make the shared MoE state) for batch B. */
static rd_status infer_reserve(rd_model_cuda *m, int64_t B) {
    if (B > 65535)
        return rd_fail(RD_EINVAL, "infer: batch %lld exceeds 65535 (the device layers' limit)",
                       (long long)B);
    if (m->moe && !m->imoe) {
        if (!(m->imoe = rd_moe_cuda_state_new()))
            return rd_fail(RD_ENOMEM, "model_cuda infer: out of memory for the MoE state");
        RD_TRY(rd_moe_cuda_set_precision(m->imoe, m->prec));
    }
    md_fwd_acts A;
    md_block_acts ba;
    const double bytes = carve_infer(m, &A, &ba, NULL, (double)B);
    if (bytes > RD_MAX_ALLOC_BYTES)
        return rd_fail(RD_ENOMEM, "model_cuda infer: activations of batch %lld need %.4g MiB, "
                       "more than one allocation can hold", (long long)B, bytes / 1048576.0);
    void *arena = NULL;
    rd_status s = rd_cuda_malloc(&arena, (size_t)bytes);
    if (s)
        return rd_fail(s, "model_cuda infer: no device memory for activations of batch %lld "
                       "(%.0f MiB)", (long long)B, bytes / 1048576.0);
    rd_cuda_free(m->iarena); /* synchronous: no kernel still reads it */
    m->iarena = arena;
    carve_infer(m, &m->inf, &m->iba, (char *)arena, (double)B);
    m->icap = B;
    return RD_OK;
}

extern "C" rd_status rd_model_cuda_infer(rd_model_cuda *m, float *out, const float *x,
                                         const float *t, const int64_t *y, int64_t B) {
    if (B < 1) return rd_fail(RD_EINVAL, "batch must be >= 1, got %lld", (long long)B);
    RD_TRY(check_host_inputs(m, t, y, NULL, NULL, B));
    if (B > m->icap) RD_TRY(infer_reserve(m, B));
    const md_fwd_acts *A = &m->inf;
    RD_TRY(upload_inputs(m, A, x, t, y, B));
    RD_TRY(forward_pass(m, A, B, 0, NULL));
    return rd_cuda_d2h(out, A->outimg,
                       (size_t)(B * m->cfg.out_channels * m->H * m->H) * sizeof(float));
}

extern "C" void rd_model_cuda_infer_release(rd_model_cuda *m) {
    if (!m) return;
    rd_cuda_free(m->iarena);
    m->iarena = NULL;
    m->icap = 0;
    rd_moe_cuda_state_free(m->imoe);
    m->imoe = NULL;
}

extern "C" int64_t rd_model_cuda_infer_batch(const rd_model_cuda *m) { return m->icap; }

/* ---- backward ---------------------------------------------------------------------- */

static rd_status block_backward(rd_model_cuda *m, int64_t i, int64_t B) {
    const rd_model_cfg *c = &m->cfg;
    const md_block_offsets *o = &m->blk[i];
    const md_block_acts *a = &m->ba[i];
    const float *P = m->buf[RD_MODEL_CUDA_PARAMS];
    float *G = m->buf[RD_MODEL_CUDA_GRADS];
    const int64_t D = c->D, L = m->L, N = B * L, S = 6 * D;
    float *dmod = m->dmod;
    RD_TRY(rd_gated_residual_backward_cuda(m->da, dmod + 5 * D, m->dx, a->ffn, a->mod + 5 * D, B,
                                           L, D, S));
    if (m->moe) {
        rd_moe_params mp, mg;
        point_moe(m, &mp, m->buf[RD_MODEL_CUDA_PARAMS], i);
        point_moe(m, &mg, G, i);
        RD_TRY(rd_moe_backward_cuda(m->moe[i], m->db, &mg, m->da, a->m2, &m->layer, &mp));
    } else {
        RD_TRY(lin_bwd(m, m->dfc, 0.0f, G + o->fc2_w, G + o->fc2_b, m->da, a->gel, P + o->fc2_w, N,
                       4 * D, D));
        RD_TRY(gelu_op(m->dfc, a->fc1, m->dfc, N * 4 * D));
        RD_TRY(lin_bwd(m, m->db, 0.0f, G + o->fc1_w, G + o->fc1_b, m->dfc, a->m2, P + o->fc1_w, N,
                       D, 4 * D));
    }
    RD_TRY(rd_modulate_backward_cuda(m->da, dmod + 3 * D, dmod + 4 * D, m->db, a->xhat2,
                                     a->mod + 4 * D, B, L, D, S));
    RD_TRY(rd_layernorm_backward_cuda(m->dx, m->da, a->xhat2, a->rstd2, N, D));
    RD_TRY(rd_gated_residual_backward_cuda(m->da, dmod + 2 * D, m->dx, a->attproj, a->mod + 2 * D,
                                           B, L, D, S));
    RD_TRY(lin_bwd(m, m->db, 0.0f, G + o->proj_w, G + o->proj_b, m->da, a->atty, P + o->proj_w, N,
                   D, D));
    RD_TRY(attn_bwd(m, m->dqkv, m->datt, m->db, a->qkv, a->att, B));
    RD_TRY(lin_bwd(m, m->da, 0.0f, G + o->qkv_w, G + o->qkv_b, m->dqkv, a->m1, P + o->qkv_w, N, D,
                   3 * D));
    RD_TRY(rd_modulate_backward_cuda(m->db, dmod, dmod + D, m->da, a->xhat1, a->mod + D, B, L, D, S));
    RD_TRY(rd_layernorm_backward_cuda(m->dx, m->db, a->xhat1, a->rstd1, N, D));
    /* adaLN: dsc += dmod W; its weight and bias gradients */
    return lin_bwd(m, m->dsc, 1.0f, G + o->ada_w, G + o->ada_b, dmod, m->sc, P + o->ada_w, B, D,
                   6 * D);
}

/* Backward of the last forward from the device dout (B,Co,H,W) in m->dout. */
static rd_status backward_dev(rd_model_cuda *m) {
    if (!m->have_forward) return rd_fail(RD_ESTATE, "backward called before forward");
    const rd_model_cfg *c = &m->cfg;
    const int64_t B = m->last_B, D = c->D, L = m->L, N = B * L, p = c->patch, H = m->H;
    const float *P = m->buf[RD_MODEL_CUDA_PARAMS];
    float *G = m->buf[RD_MODEL_CUDA_GRADS];
    CU_TRY(cudaMemsetAsync(m->dsc, 0, (size_t)(B * D) * sizeof(float), RD_STREAM));
    RD_TRY(patch_op(m->dotok, m->dout, 1, B, c->out_channels, H, p, 1));
    RD_TRY(lin_bwd(m, m->da, 0.0f, G + m->fl_w, G + m->fl_b, m->dotok, m->mf, P + m->fl_w, N, D,
                   m->Pout));
    RD_TRY(rd_modulate_backward_cuda(m->db, m->dmod, m->dmod + D, m->da, m->xhatf, m->modf + D, B,
                                     L, D, 2 * D));
    CU_TRY(cudaMemsetAsync(m->dx, 0, (size_t)(N * D) * sizeof(float), RD_STREAM));
    RD_TRY(rd_layernorm_backward_cuda(m->dx, m->db, m->xhatf, m->rstdf, N, D));
    RD_TRY(lin_bwd(m, m->dsc, 1.0f, G + m->fa_w, G + m->fa_b, m->dmod, m->sc, P + m->fa_w, B, D,
                   2 * D));
    for (int64_t i = c->depth - 1; i >= 0; i--) RD_TRY(block_backward(m, i, B));
    RD_TRY(lin_bwd(m, NULL, 0.0f, G + m->xe_w, G + m->xe_b, m->dx, m->patches, P + m->xe_w, N,
                   m->Pin, D));
    float *dc = m->dt2;
    RD_TRY(rd_silu_backward_cuda(dc, m->dsc, m->c, B * D));
    md_embed_bwd_kernel<<<rd_blocks(D, MD_THREADS), MD_THREADS, 0, RD_STREAM>>>(G + m->ytab, dc,
                                                                              m->labels, B, D);
    CU_LAUNCHED("md_embed_bwd_kernel");
    RD_TRY(lin_bwd(m, m->dt1, 0.0f, G + m->t2_w, G + m->t2_b, dc, m->ths, P + m->t2_w, B, D, D));
    RD_TRY(rd_silu_backward_cuda(m->dt1, m->dt1, m->th, B * D));
    return lin_bwd(m, NULL, 0.0f, G + m->t0_w, G + m->t0_b, m->dt1, m->tfreq, P + m->t0_w, B,
                   RD_FREQ_DIM, D);
}

extern "C" rd_status rd_model_cuda_branch_norms(rd_model_cuda *m, double *out) {
    if (!m->have_forward) return rd_fail(RD_ESTATE, "branch_norms: no forward yet");
    const int64_t B = m->last_B, L = m->L, D = m->cfg.D, N = B * L, depth = m->cfg.depth;
    if (N > INT32_MAX) return rd_fail(RD_EINVAL, "branch_norms: %lld tokens", (long long)N);
    double *part;
    RD_TRY(DBUF(m->nrm, double, N + 2 * depth, part));
    double *res = part + N;
    for (int64_t i = 0; i < depth; i++)
        for (int j = 0; j < 2; j++) { /* per token, then the tokens in order (deterministic) */
            const md_block_acts *a = &m->ba[i];
            md_gated_norm_kernel<<<rd_blocks(N, MD_THREADS / 32), MD_THREADS, 0, RD_STREAM>>>(
                part, j ? a->ffn : a->attproj, a->mod + (j ? 5 : 2) * D, L, D, 6 * D, N);
            CU_LAUNCHED("md_gated_norm_kernel");
            md_sum_parts_kernel<<<1, 1, 0, RD_STREAM>>>(res + 2 * i + j, part, (int)N,
                                                        1.0 / (double)N);
            CU_LAUNCHED("md_sum_parts_kernel");
        }
    return rd_cuda_d2h(out, res, (size_t)(2 * depth) * sizeof(double));
}

extern "C" rd_status rd_model_cuda_backward(rd_model_cuda *m, const float *dout) {
    if (!m->have_forward) return rd_fail(RD_ESTATE, "backward called before forward");
    const size_t n = (size_t)(m->last_B * m->cfg.out_channels * m->H * m->H);
    RD_TRY(rd_cuda_h2d(m->dout, dout, n * sizeof(float)));
    return backward_dev(m);
}

/* ---- the training step ------------------------------------------------------------------ */

static rd_status check_opt(const rd_model_cuda_opt *o) {
    if (!(o->lr >= 0.0) || !(o->weight_decay >= 0.0) || !(o->eps > 0.0) || !(o->max_grad_norm >= 0.0))
        return rd_fail(RD_EINVAL, "train_step: lr, weight_decay, max_grad_norm must be >= 0 and "
                       "eps > 0");
    return RD_OK;
}

/* Clip (when asked) and one AdamW + EMA step on the device gradients. */
static rd_status opt_step(rd_model_cuda *m, const rd_model_cuda_opt *o, double *norm_out) {
    float *G = m->buf[RD_MODEL_CUDA_GRADS];
    double scale = 1.0, norm = NAN;
    *norm_out = NAN;
    if (o->max_grad_norm > 0.0) {
        RD_TRY(rd_grad_norm_cuda(m->loss_part + 1, G, m->nparams));
        RD_TRY(rd_cuda_d2h(&norm, m->loss_part + 1, sizeof(double)));
        if (!isfinite(norm))
            return rd_fail(RD_EINVAL, "train_step: non-finite gradient norm %g (step skipped)", norm);
        /* racedit.optim.clip_scale (torch's clip_grad_norm_): min(1, max / (norm + 1e-6)) */
        scale = o->max_grad_norm / (norm + 1e-6);
        if (scale > 1.0) scale = 1.0;
    }
    RD_TRY(rd_adamw_ema_step_cuda(m->buf[RD_MODEL_CUDA_PARAMS], G, m->buf[RD_MODEL_CUDA_ADAM_M],
                                  m->buf[RD_MODEL_CUDA_ADAM_V],
                                  o->ema_decay >= 0.0 ? m->buf[RD_MODEL_CUDA_EMA] : NULL,
                                  m->nparams, o->lr, o->beta1, o->beta2, o->eps, o->weight_decay,
                                  m->step + 1, scale, o->ema_decay >= 0.0 ? o->ema_decay : 0.0));
    m->step++;
    *norm_out = norm;
    return RD_OK;
}

extern "C" rd_status rd_model_cuda_optimizer_step(rd_model_cuda *m, rd_model_cuda_step_out *res,
                                                  const rd_model_cuda_opt *o) {
    memset(res, 0, sizeof *res);
    res->loss = NAN;
    RD_TRY(check_opt(o));
    double norm = NAN;
    RD_TRY(opt_step(m, o, &norm));
    RD_TRY(rd_cuda_sync());
    res->grad_norm = norm;
    res->step = m->step;
    return RD_OK;
}

extern "C" rd_status rd_model_cuda_train_step(rd_model_cuda *m, rd_model_cuda_step_out *res,
                                              const float *x, const float *t, const int64_t *y,
                                              const float *target, int64_t B,
                                              const rd_model_cuda_opt *o) {
    memset(res, 0, sizeof *res);
    RD_TRY(check_opt(o));
    const rd_model_cfg *c = &m->cfg;
    int plr = m->moe && c->moe.plr_weight != 0.0f;
    if (B >= 1) RD_TRY(check_host_inputs(m, t, y, target, "target", B));
    RD_TRY(stage(m, x, t, y, target, B));
    RD_TRY(forward_dev(m, B, 1, plr));
    const int64_t C = c->in_channels, Co = c->out_channels, HW = m->H * m->H;
    const int64_t n = B * Co * HW, nt = B * C * HW;
    md_mse_kernel<<<MD_LOSS_BLOCKS, MD_THREADS, 0, RD_STREAM>>>(m->loss_part + 1, m->dout, m->outimg,
                                                               m->tgt, C, Co, HW, n,
                                                               (float)(2.0 / (double)nt));
    CU_LAUNCHED("md_mse_kernel");
    md_sum_parts_kernel<<<1, 1, 0, RD_STREAM>>>(m->loss_part, m->loss_part + 1, MD_LOSS_BLOCKS,
                                                1.0 / (double)nt);
    CU_LAUNCHED("md_sum_parts_kernel");
    float *G = m->buf[RD_MODEL_CUDA_GRADS];
    CU_TRY(cudaMemsetAsync(G, 0, (size_t)m->nparams * sizeof(float), RD_STREAM));
    RD_TRY(backward_dev(m));
    double norm = NAN;
    RD_TRY(opt_step(m, o, &norm));
    double loss = 0.0;
    RD_TRY(rd_cuda_d2h(&loss, m->loss_part, sizeof(double)));
    res->loss = loss;
    res->grad_norm = norm;
    res->step = m->step;
    return RD_OK;
}
