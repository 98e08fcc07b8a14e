/* backend.c — the CPU table of backend.h: the kernels of csrc/cpu as they are (backend
 * memory is host memory), thin wrappers where the table's signature adds a context or a
 * state type, and the three ops that exist only for the model graph: the patch embedding,
 * the diffusion MSE and the gated branch norm. */
#include "../backend.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- memory ---------------------------------------------------------------------- */

static rd_status cpu_alloc(void **p, size_t bytes) {
    *p = NULL;
    if (bytes == 0) return RD_OK;
    /* 64-byte aligned: whole cache lines, and every SIMD width */
    *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    return *p ? RD_OK : rd_fail(RD_ENOMEM, "out of memory allocating %zu bytes", bytes);
}

static void cpu_free(void *p) { free(p); }

/* memmove: a buffer copied onto itself (set_param_buffer(param_buffer)) is fine */
static rd_status cpu_copy(void *dst, const void *src, size_t bytes) {
    if (bytes) memmove(dst, src, bytes);
    return RD_OK;
}

static rd_status cpu_memset(void *p, int byte, size_t bytes) {
    if (bytes) memset(p, byte, bytes);
    return RD_OK;
}

static rd_status cpu_sync(void) { return RD_OK; }

static rd_status cpu_ctx_new(void **ctx) {
    *ctx = NULL;
    return RD_OK;
}

static void cpu_ctx_free(void *ctx) { (void)ctx; }

static rd_status fp32_only(int prec) {
    if (prec == RD_PREC_FP32) return RD_OK;
    return rd_fail(RD_EINVAL, "precision: the CPU computes in fp32 only (got %s)",
                   prec == RD_PREC_TF32 ? "tf32" : prec == RD_PREC_BF16 ? "bf16" : "an unknown one");
}

static rd_status cpu_set_precision(void *ctx, int prec) {
    (void)ctx;
    return fp32_only(prec);
}

/* ---- DiT layers ---------------------------------------------------------------- */

static rd_status cpu_patch_embed(void *ctx, float *x, const float *patches, const float *W,
                                 const float *b, const float *pe, int64_t B, int64_t L,
                                 int64_t IC, int64_t D) {
    (void)ctx;
    /* each row starts from bias + pe; sgemm then adds the product (beta = 1) */
#pragma omp parallel for collapse(2)
    for (int64_t i = 0; i < B; i++)
        for (int64_t l = 0; l < L; l++) {
            float *row = x + (i * L + l) * D;
            const float *pl = pe + l * D;
            for (int64_t d = 0; d < D; d++) row[d] = b[d] + pl[d];
        }
    const int prev = rd_blas_threads_enter();
    rd_status s = rd_matmul_par(x, (int)D, patches, (int)IC, 0, W, (int)IC, 1, B * L, D, IC,
                                1.0f, 1.0f);
    rd_blas_threads_restore(prev);
    return s;
}

static rd_status cpu_linear_forward(void *ctx, float *out, const float *inp, const float *W,
                                    const float *b, int64_t N, int64_t IC, int64_t OC) {
    (void)ctx;
    return rd_linear_forward(out, inp, W, b, N, IC, OC);
}

static rd_status cpu_linear_backward(void *ctx, float *dinp, float *dW, float *db,
                                     const float *dout, const float *inp, const float *W,
                                     int64_t N, int64_t IC, int64_t OC) {
    (void)ctx;
    return rd_linear_backward(dinp, dW, db, dout, inp, W, N, IC, OC);
}

static rd_status cpu_attention_forward(void *ctx, float *out, float *att, const float *qkv,
                                       int64_t B, int64_t L, int64_t D, int64_t NH) {
    (void)ctx;
    return rd_attention_forward(out, att, qkv, B, L, D, NH);
}

static rd_status cpu_attention_backward(void *ctx, float *dqkv, float *datt, const float *dout,
                                        const float *qkv, const float *att, int64_t B,
                                        int64_t L, int64_t D, int64_t NH) {
    (void)ctx;
    return rd_attention_backward(dqkv, datt, dout, qkv, att, B, L, D, NH);
}

static rd_status cpu_add(float *y, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += x[i];
    return RD_OK;
}

/* The squares of the MSE's differences, indexed over (B,C,HW) like the target. */
typedef struct {
    const float *out, *tgt;
    int64_t C, Co, HW;
} mse_terms;

static double mse_term(const mse_terms *s, int64_t i) {
    const int64_t hw = i % s->HW, c = (i / s->HW) % s->C, b = i / (s->HW * s->C);
    const float d = s->out[(b * s->Co + c) * s->HW + hw] - s->tgt[i];
    return (double)d * (double)d;
}

/* The sum of terms [lo, lo+n) in NumPy's pairwise order (numpy's pairwise_sum: fewer than
 * 8 in turn, up to 128 in 8 partial sums, more split in halves at a multiple of 8), so that
 * the loss equals numpy.mean(np.square(out - target, dtype=float64)) bit for bit. */
static double pairwise(const mse_terms *s, int64_t lo, int64_t n) {
    if (n < 8) {
        double r = 0.0;
        for (int64_t i = 0; i < n; i++) r += mse_term(s, lo + i);
        return r;
    }
    if (n <= 128) {
        double r[8];
        int64_t i;
        for (int j = 0; j < 8; j++) r[j] = mse_term(s, lo + j);
        for (i = 8; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; j++) r[j] += mse_term(s, lo + i + j);
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += mse_term(s, lo + i);
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise(s, lo, n2) + pairwise(s, lo + n2, n - n2);
}

static rd_status cpu_mse(void *ctx, double *loss, float *dout, const float *out,
                         const float *target, int64_t B, int64_t C, int64_t Co, int64_t HW) {
    (void)ctx;
    const int64_t n = B * C * HW;
    if (n < 1 || C > Co) return rd_fail(RD_EINVAL, "mse: bad sizes B=%lld C=%lld Co=%lld HW=%lld",
                                        (long long)B, (long long)C, (long long)Co, (long long)HW);
    const float scale = (float)(2.0 / (double)n); /* racedit.diffusion._mse's factor */
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < B * Co * HW; i++) {
        const int64_t hw = i % HW, c = (i / HW) % Co, b = i / (HW * Co);
        dout[i] = c < C ? (out[i] - target[(b * C + c) * HW + hw]) * scale : 0.0f;
    }
    const mse_terms s = {out, target, C, Co, HW};
    *loss = pairwise(&s, 0, n) / (double)n;
    return RD_OK;
}

static rd_status cpu_gated_norm(void *ctx, double *out, const float *v, const float *gate,
                                int64_t B, int64_t L, int64_t D, int64_t S) {
    (void)ctx;
    double total = 0.0;
    for (int64_t b = 0; b < B; b++) {
        const float *g = gate + b * S;
        for (int64_t l = 0; l < L; l++) {
            const float *r = v + (b * L + l) * D;
            double s = 0.0;
            for (int64_t d = 0; d < D; d++) {
                double u = (double)g[d] * r[d];
                s += u * u;
            }
            total += sqrt(s);
        }
    }
    *out = B * L > 0 ? total / (double)(B * L) : 0.0;
    return RD_OK;
}

/* ---- experts and the MoE layer -------------------------------------------------------- */

static rd_status cpu_experts_new(void **ex) {
    *ex = rd_experts_new();
    return *ex ? RD_OK : rd_fail(RD_ENOMEM, "experts: out of memory");
}

static void cpu_experts_free(void *ex) { rd_experts_free(ex); }

static rd_status cpu_experts_set_precision(void *ex, int prec) {
    (void)ex;
    return fp32_only(prec);
}

static rd_status cpu_experts_forward(void *ex, float *y, const uint8_t *mask, const float *G,
                                     const float *x, const float *W1, const float *b1,
                                     const float *W2, const float *b2, int64_t N, int64_t D,
                                     int64_t E, int64_t He) {
    return rd_experts_forward(ex, y, mask, G, x, W1, b1, W2, b2, N, D, E, He);
}

static rd_status cpu_experts_backward(void *ex, float *dx, float *dG, float *dW1, float *db1,
                                      float *dW2, float *db2, const float *dy, const float *W1,
                                      const float *W2, int64_t N, int64_t D, int64_t E,
                                      int64_t He) {
    return rd_experts_backward(ex, dx, dG, dW1, db1, dW2, db2, dy, W1, W2, N, D, E, He);
}

static rd_status cpu_moe_new(void **st) {
    *st = rd_moe_state_new();
    return *st ? RD_OK : rd_fail(RD_ENOMEM, "moe: out of memory for the layer state");
}

static void cpu_moe_free(void *st) { rd_moe_state_free(st); }

static rd_status cpu_moe_set_precision(void *st, int prec) {
    (void)st;
    return fp32_only(prec);
}

static rd_status cpu_moe_forward(void *st, float *y, const float *x, const rd_moe_cfg *cfg,
                                 const rd_moe_params *p, int64_t B, int64_t L, int training,
                                 const float *plr_target) {
    return rd_moe_forward(st, y, x, cfg, p, B, L, training, plr_target);
}

static rd_status cpu_moe_backward(void *st, float *dx, const rd_moe_params *grad, const float *dy,
                                  const float *x, const rd_moe_cfg *cfg, const rd_moe_params *p) {
    return rd_moe_backward(st, dx, grad, dy, x, cfg, p);
}

static rd_status cpu_moe_view(void *st, rd_moe_view *out) {
    rd_moe_state_view(st, out);
    return RD_OK;
}

static rd_status cpu_moe_aux(void *st, rd_moe_aux *out) { return rd_moe_get_aux(st, out); }

static rd_status cpu_moe_set_threshold(void *st, const float *tau, int64_t n) {
    return rd_moe_set_threshold(st, tau, n);
}

static rd_status cpu_moe_copy_threshold(void *dst, void *src) {
    rd_moe_view v;
    rd_moe_state_view(src, &v);
    return rd_moe_set_threshold(dst, v.have_tau ? v.taus : NULL, v.ntau);
}

/* ---- optimiser ------------------------------------------------------------------------ */

static rd_status cpu_adamw_step(float *params, const float *grads, float *m, float *v,
                                float *ema, int64_t n, double lr, double beta1, double beta2,
                                double eps, double weight_decay, int64_t step,
                                double grad_scale, double ema_decay) {
    rd_status s = rd_adamw_check("adamw_step", n, step, beta1, beta2, ema != NULL, ema_decay);
    if (!s) s = rd_adamw_step(params, grads, m, v, n, lr, beta1, beta2, eps, weight_decay, step,
                              grad_scale);
    if (!s && ema) s = rd_ema_update(ema, params, n, ema_decay);
    return s;
}

static rd_status cpu_grad_norm(void *ctx, double *out, const float *grads, int64_t n) {
    (void)ctx;
    return rd_grad_norm(out, grads, n);
}

const rd_backend rd_backend_cpu = {
    .name = "cpu", .host_memory = 1,
    .alloc = cpu_alloc, .free = cpu_free, .upload = cpu_copy, .download = cpu_copy,
    .copy = cpu_copy, .memset = cpu_memset, .sync = cpu_sync, .ctx_new = cpu_ctx_new,
    .ctx_free = cpu_ctx_free, .set_precision = cpu_set_precision,
    .enter = rd_blas_threads_enter, .leave = rd_blas_threads_restore,
    .patchify = rd_patchify_forward, .unpatchify = rd_unpatchify_forward,
    .patch_embed = cpu_patch_embed, .timestep_embedding = rd_timestep_embedding_forward,
    .linear_forward = cpu_linear_forward, .linear_backward = cpu_linear_backward,
    .layernorm_forward = rd_layernorm_forward, .layernorm_backward = rd_layernorm_backward,
    .modulate_forward = rd_modulate_forward, .modulate_backward = rd_modulate_backward,
    .gated_residual_forward = rd_gated_residual_forward,
    .gated_residual_backward = rd_gated_residual_backward,
    .attention_forward = cpu_attention_forward, .attention_backward = cpu_attention_backward,
    .silu_forward = rd_silu_forward, .silu_backward = rd_silu_backward,
    .gelu_forward = rd_gelu_forward, .gelu_backward = rd_gelu_backward,
    .embedding_forward = rd_embedding_forward, .embedding_backward = rd_embedding_backward,
    .add = cpu_add, .mse = cpu_mse, .gated_norm = cpu_gated_norm,
    .route = rd_route, .route_threshold = rd_route_threshold,
    .mask_row_counts = rd_mask_row_counts,
    .gate_forward = rd_gate_forward, .gate_backward = rd_gate_backward,
    .router_forward = rd_router_forward, .router_backward = rd_router_backward,
    .experts_new = cpu_experts_new, .experts_free = cpu_experts_free,
    .experts_set_precision = cpu_experts_set_precision,
    .experts_forward = cpu_experts_forward, .experts_backward = cpu_experts_backward,
    .moe_new = cpu_moe_new, .moe_free = cpu_moe_free, .moe_set_precision = cpu_moe_set_precision,
    .moe_forward = cpu_moe_forward, .moe_backward = cpu_moe_backward, .moe_view = cpu_moe_view,
    .moe_aux = cpu_moe_aux, .moe_set_threshold = cpu_moe_set_threshold,
    .moe_copy_threshold = cpu_moe_copy_threshold,
    .adamw_step = cpu_adamw_step, .grad_norm = cpu_grad_norm,
    .nonfinite_index = rd_nonfinite_index,
};
