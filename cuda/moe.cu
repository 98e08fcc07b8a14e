/* moe.cu — the MoE block of docs/method.md §2-§3 on the device, minus the experts
 * (experts.cu): the gate functions, the router MLP (cuBLAS GEMMs with fused bias + GELU_erf
 * kernels), and the composite layer router -> gate -> route / thresholds -> experts with
 * its thresholds tau (docs/method.md §3), forward and backward, mirroring rd_moe_forward / rd_moe_backward of
 * csrc/moe.h.
 *
 * The layer makes one synchronising device->host copy per forward (the experts' per-expert
 * counts, which carry the routing's NaN flag along; the aux terms' results ride on it, see
 * moe_aux.cu) and none in backward; the thresholds are updated on the device. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"
#include "internal.cuh"

#define MO_THREADS 256

/* ---- gating ------------------------------------------------------------------------ */
static rd_status check_gate(const char *fn, int64_t N, int64_t E, rd_gating g) {
    if (N < 0 || E <= 0)
        return rd_fail(RD_EINVAL, "%s: expected N >= 0 and E > 0, got N=%lld E=%lld", fn,
                       (long long)N, (long long)E);
    if ((unsigned)g > RD_GATE_SOFTMAX)
        return rd_fail(RD_EINVAL, "%s: unknown gating %d (identity=0, sigmoid=1, softmax=2)", fn, (int)g);
    if (N * E > INT32_MAX * 64LL)
        return rd_fail(RD_EINVAL, "%s: N*E=%lld too large", fn, (long long)(N * E));
    return RD_OK;
}

__global__ void sigmoid_kernel(float *G, const float *R, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float r = R[i]; /* exp of a non-positive number only: no overflow */
        if (r >= 0.0f) G[i] = 1.0f / (1.0f + expf(-r));
        else { float z = expf(r); G[i] = z / (1.0f + z); }
    }
}

__global__ void sigmoid_grad_kernel(float *dR, const float *dG, const float *G, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dR[i] = dG[i] * G[i] * (1.0f - G[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* One warp per row: softmax over E with the max subtracted. */
__global__ void softmax_kernel(float *G, const float *R, int64_t N, int64_t E) {
    int64_t t = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (t >= N) return;
    const float *r = R + t * E;
    float m = -INFINITY;
    for (int64_t e = lane; e < E; e += 32) m = fmaxf(m, r[e]);
    for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float s = 0.0f;
    for (int64_t e = lane; e < E; e += 32) {
        float v = expf(r[e] - m);
        G[t * E + e] = v;
        s += v;
    }
    float inv = 1.0f / warp_sum(s);
    for (int64_t e = lane; e < E; e += 32) G[t * E + e] *= inv;
}

/* dR = G (dG - <dG, G>) per row. */
__global__ void softmax_grad_kernel(float *dR, const float *dG, const float *G, int64_t N, int64_t E) {
    int64_t t = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (t >= N) return;
    float d = 0.0f;
    for (int64_t e = lane; e < E; e += 32) d += dG[t * E + e] * G[t * E + e];
    d = warp_sum(d);
    for (int64_t e = lane; e < E; e += 32) dR[t * E + e] = G[t * E + e] * (dG[t * E + e] - d);
}

static unsigned grid_stride_blocks(int64_t n) {
    int64_t b = rd_blocks(n, MO_THREADS * 4);
    return (unsigned)(b > 65535 ? 65535 : (b < 1 ? 1 : b));
}

extern "C" rd_status rd_gate_forward_cuda(float *G, const float *R, int64_t N, int64_t E, rd_gating g) {
    RD_TRY(check_gate("gate_forward_cuda", N, E, g));
    int64_t n = N * E;
    if (n == 0) return RD_OK;
    if (g == RD_GATE_IDENTITY) {
        if (G != R) CU_TRY(cudaMemcpyAsync(G, R, (size_t)n * sizeof(float), cudaMemcpyDeviceToDevice, RD_STREAM));
    } else if (g == RD_GATE_SIGMOID) {
        sigmoid_kernel<<<grid_stride_blocks(n), MO_THREADS, 0, RD_STREAM>>>(G, R, n);
        CU_LAUNCHED("sigmoid_kernel");
    } else {
        softmax_kernel<<<rd_blocks(N, MO_THREADS / 32), MO_THREADS, 0, RD_STREAM>>>(G, R, N, E);
        CU_LAUNCHED("softmax_kernel");
    }
    return RD_OK;
}

extern "C" rd_status rd_gate_backward_cuda(float *dR, const float *dG, const float *G, int64_t N,
                                           int64_t E, rd_gating g) {
    RD_TRY(check_gate("gate_backward_cuda", N, E, g));
    int64_t n = N * E;
    if (n == 0) return RD_OK;
    if (g == RD_GATE_IDENTITY) {
        if (dR != dG) CU_TRY(cudaMemcpyAsync(dR, dG, (size_t)n * sizeof(float), cudaMemcpyDeviceToDevice, RD_STREAM));
    } else if (g == RD_GATE_SIGMOID) {
        sigmoid_grad_kernel<<<grid_stride_blocks(n), MO_THREADS, 0, RD_STREAM>>>(dR, dG, G, n);
        CU_LAUNCHED("sigmoid_grad_kernel");
    } else {
        softmax_grad_kernel<<<rd_blocks(N, MO_THREADS / 32), MO_THREADS, 0, RD_STREAM>>>(dR, dG, G, N, E);
        CU_LAUNCHED("softmax_grad_kernel");
    }
    return RD_OK;
}

/* ---- router MLP -------------------------------------------------------------------- */

/* hpre += br; h = GELU_erf(hpre). One row per block. */
__global__ void bias_gelu_erf_kernel(float *hpre, float *h, const float *br, int64_t D) {
    int64_t t = blockIdx.x;
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
        float v = hpre[t * D + c] + br[c];
        hpre[t * D + c] = v;
        h[t * D + c] = d_gelu_erf(v);
    }
}

__global__ void add_bias_kernel(float *R, const float *b, int64_t N, int64_t E) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < N * E;
         i += (int64_t)gridDim.x * blockDim.x)
        R[i] += b[i % E];
}

/* dh = (dh + dh_extra) * GELU_erf'(hpre). */
__global__ void gelu_erf_back_kernel(float *dh, const float *extra, const float *hpre, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float d = extra ? dh[i] + extra[i] : dh[i];
        dh[i] = d * d_gelu_erf_grad(hpre[i]);
    }
}

extern "C" rd_status rd_router_forward_cuda(float *hpre, float *h, float *R, const float *x,
                                            const float *Wr, const float *br, const float *Wg,
                                            const float *bg, int64_t N, int64_t D, int64_t E) {
    RD_TRY(rd_router_check("router_forward_cuda", N, D, E));
    if (N == 0) return RD_OK;
    RD_TRY(rd_matmul_cuda(hpre, (int)D, x, (int)D, 0, Wr, (int)D, 0, N, D, D, 1.0f, 0.0f));
    bias_gelu_erf_kernel<<<(unsigned)N, MO_THREADS, 0, RD_STREAM>>>(hpre, h, br, D);
    CU_LAUNCHED("bias_gelu_erf_kernel");
    RD_TRY(rd_matmul_cuda(R, (int)E, h, (int)D, 0, Wg, (int)E, 0, N, E, D, 1.0f, 0.0f));
    add_bias_kernel<<<grid_stride_blocks(N * E), MO_THREADS, 0, RD_STREAM>>>(R, bg, N, E);
    CU_LAUNCHED("add_bias_kernel");
    return RD_OK;
}

extern "C" rd_status rd_router_backward_cuda(float *dx_acc, float *dWr, float *dbr, float *dWg,
                                             float *dbg, float *dh, const float *dR,
                                             const float *dh_extra, const float *hpre,
                                             const float *h, const float *x, const float *Wr,
                                             const float *Wg, int64_t N, int64_t D, int64_t E) {
    RD_TRY(rd_router_check("router_backward_cuda", N, D, E));
    if (N == 0) return RD_OK;
    float *partial;
    int64_t wide = D > E ? D : E;
    RD_TRY(rd_scratch_alloc((void **)&partial, (size_t)rd_colsum_scratch(1, wide) * sizeof(float)));
    rd_status s = rd_matmul_cuda(dh, (int)D, dR, (int)E, 0, Wg, (int)E, 1, N, D, E, 1.0f, 0.0f);
    if (s == RD_OK) {
        gelu_erf_back_kernel<<<grid_stride_blocks(N * D), MO_THREADS, 0, RD_STREAM>>>(dh, dh_extra, hpre, N * D);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess)
            s = rd_fail(RD_ECUDA, "CUDA error launching gelu_erf_back_kernel: %s", cudaGetErrorString(e));
    }
    if (s == RD_OK) s = rd_matmul_cuda(dWg, (int)E, h, (int)D, 1, dR, (int)E, 0, D, E, N, 1.0f, 1.0f);
    if (s == RD_OK) s = rd_colsum_segments_cuda(dbg, dR, NULL, N, 1, E, partial);
    if (s == RD_OK) s = rd_matmul_cuda(dWr, (int)D, x, (int)D, 1, dh, (int)D, 0, D, D, N, 1.0f, 1.0f);
    if (s == RD_OK) s = rd_colsum_segments_cuda(dbr, dh, NULL, N, 1, D, partial);
    if (s == RD_OK) s = rd_matmul_cuda(dx_acc, (int)D, dh, (int)D, 0, Wr, (int)D, 1, N, D, D, 1.0f, 1.0f);
    rd_scratch_free(partial);
    return s;
}

/* ---- the composite layer ----------------------------------------------------------- */
struct rd_moe_cuda_state {
    int64_t B, L, N, D, E, He;
    int have_forward, have_tau;
    rd_dbuf hpre, h, dh;       /* (N,D) */
    rd_dbuf R, G, dG, dR;      /* (N,E) */
    rd_dbuf mask;              /* (N,E) uint8 */
    rd_dbuf taus;              /* (ntau) the thresholds (device) */
    rd_dbuf scal;              /* [0] mean of the thresholds, [1] tau_b (device floats) */
    int64_t ntau;              /* thresholds held */
    float *taus_host;          /* (ntau) host copy the view points to */
    rd_dbuf nan;               /* first NaN index of the gate scores (device) */
    rd_route_ws rws;
    rd_experts_cuda *ex;
    rd_moe_aux_cuda *aux;
};

extern "C" rd_moe_cuda_state *rd_moe_cuda_state_new(void) {
    rd_moe_cuda_state *st = (rd_moe_cuda_state *)calloc(1, sizeof(rd_moe_cuda_state));
    if (!st) return NULL;
    st->ex = rd_experts_cuda_new();
    st->aux = rd_moe_aux_cuda_new();
    if (!st->ex || !st->aux) {
        rd_experts_cuda_free(st->ex);
        rd_moe_aux_cuda_free(st->aux);
        free(st);
        return NULL;
    }
    return st;
}

extern "C" void rd_moe_cuda_state_free(rd_moe_cuda_state *st) {
    if (!st) return;
    cudaStreamSynchronize(RD_STREAM);
    rd_dbuf *bufs[] = {&st->hpre, &st->h, &st->dh, &st->R, &st->G, &st->dG, &st->dR,
                       &st->mask, &st->taus, &st->scal, &st->nan};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) rd_dbuf_free(bufs[i]);
    rd_route_ws_free(&st->rws);
    rd_experts_cuda_free(st->ex);
    rd_moe_aux_cuda_free(st->aux);
    free(st->taus_host);
    free(st);
}

/* tau[g] <- beta tau[g] + (1 - beta) kth[g], or kth[g] the first time; rounded op by op
 * (no FMA contraction) like the CPU's expression. */
__global__ void tau_update_kernel(float *taus, const float *kth, int64_t n, float beta,
                                  int have_tau) {
    for (int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; g < n;
         g += (int64_t)gridDim.x * blockDim.x)
        taus[g] = have_tau ? __fadd_rn(__fmul_rn(beta, taus[g]), __fmul_rn(1.0f - beta, kth[g]))
                           : kth[g];
}

/* scal[0] = mean of the thresholds, summed in double in order as on the CPU (NaN: none). */
__global__ void tau_mean_of_kernel(float *scal, const float *taus, int64_t n) {
    double sum = 0.0;
    for (int64_t g = 0; g < n; g++) sum += taus[g];
    scal[0] = n ? (float)(sum / (double)n) : __int_as_float(0x7fc00000);
}

/* The training update of every threshold from the route's per-group K-th values. */
static rd_status update_taus(rd_moe_cuda_state *st, const rd_moe_cfg *c, int64_t nt) {
    float *taus, *scal = (float *)st->scal.p;
    RD_TRY(DBUF(st->taus, float, nt, taus));
    if (nt) {
        unsigned blocks = (unsigned)rd_blocks(nt, MO_THREADS);
        tau_update_kernel<<<blocks, MO_THREADS, 0, RD_STREAM>>>(taus, (const float *)st->rws.kth.p,
                                                                nt, c->beta, st->have_tau);
        CU_LAUNCHED("tau_update_kernel");
    }
    tau_mean_of_kernel<<<1, 1, 0, RD_STREAM>>>(scal, taus, nt);
    CU_LAUNCHED("tau_mean_of_kernel");
    st->ntau = nt;
    st->have_tau = 1;
    return RD_OK;
}

extern "C" rd_status rd_moe_forward_cuda(rd_moe_cuda_state *st, float *y, const float *x,
                                         const rd_moe_cfg *cfg, const rd_moe_params *p,
                                         int64_t B, int64_t L, int training,
                                         const float *plr_target) {
    if (!st) return rd_fail(RD_EINVAL, "moe_forward_cuda: NULL state");
    RD_TRY(rd_moe_forward_check("moe_forward_cuda", cfg, B, L));
    int64_t N = B * L, D = cfg->D, E = cfg->E, He = cfg->He;
    /* eval as on the CPU: exact top-K for token, expert and LE choice; G >= tau for BL,
     * BE and race, or batch top-K (tau untouched) with eval_topk or while the layer has
     * no tau yet (never trained, nor set) */
    int64_t nt = rd_route_num_thresholds(cfg->strategy, L, E);
    int topk = cfg->eval_topk || nt == 0 || !st->have_tau;
    if (training || !topk)  /* the thresholds held are those the strategy needs at L */
        RD_TRY(rd_moe_ntau_check("moe_forward_cuda", cfg, st->have_tau, st->ntau, L, nt));
    st->have_forward = 0;
    float *hpre, *h, *R, *G, *scal;
    uint8_t *mask;
    unsigned long long *nan;
    RD_TRY(DBUF(st->hpre, float, N * D, hpre));
    RD_TRY(DBUF(st->h, float, N * D, h));
    RD_TRY(DBUF(st->R, float, N * E, R));
    RD_TRY(DBUF(st->G, float, N * E, G));
    RD_TRY(DBUF(st->mask, uint8_t, N * E, mask));
    RD_TRY(DBUF(st->scal, float, 2, scal));
    RD_TRY(DBUF(st->nan, unsigned long long, 1, nan));
    RD_TRY(rd_router_forward_cuda(hpre, h, R, x, p->p[RD_MOE_ROUTER_W], p->p[RD_MOE_ROUTER_B],
                                  p->p[RD_MOE_GATE_W], p->p[RD_MOE_GATE_B], N, D, E));
    RD_TRY(rd_gate_forward_cuda(G, R, N, E, cfg->gating));
    CU_TRY(cudaMemsetAsync(nan, 0xff, sizeof *nan, RD_STREAM));
    if (training)
        RD_TRY(rd_route_launch(&st->rws, mask, scal + 1, G, B, L, E, cfg->k, cfg->strategy, nan));
    else if (topk)
        RD_TRY(rd_route_launch(&st->rws, mask, NULL, G, B, L, E, cfg->k, cfg->strategy, nan));
    else
        RD_TRY(rd_route_thresholds_launch(mask, G, (const float *)st->taus.p, B, L, E,
                                          cfg->strategy, nan));
    /* aux losses (training) and diagnostics: queued now, finished after the read-back */
    RD_TRY(rd_moe_aux_cuda_launch(st->aux, R, h, mask, plr_target, cfg, p, N, training));
    unsigned long long first_nan = ~0ULL;
    RD_TRY(rd_experts_forward_impl(st->ex, y, mask, G, x, p->p[RD_MOE_W1], p->p[RD_MOE_B1],
                                   p->p[RD_MOE_W2], p->p[RD_MOE_B2], N, D, E, He, nan, &first_nan));
    if (first_nan != ~0ULL)
        return rd_fail(RD_EINVAL, "moe_forward_cuda: gate scores contain NaN at flat index %llu "
                       "(NaN or inf in x or the router parameters?)", first_nan);
    RD_TRY(rd_moe_aux_cuda_finish(st->aux));
    if (training) RD_TRY(update_taus(st, cfg, nt));
    st->B = B; st->L = L; st->N = N; st->D = D; st->E = E; st->He = He;
    st->have_forward = 1;
    return RD_OK;
}

extern "C" rd_status rd_moe_backward_cuda(rd_moe_cuda_state *st, float *dx,
                                          const rd_moe_params *grad, const float *dy,
                                          const float *x, const rd_moe_cfg *cfg,
                                          const rd_moe_params *p) {
    if (!st) return rd_fail(RD_EINVAL, "moe_backward_cuda: NULL state");
    RD_TRY(rd_moe_backward_check("moe_backward_cuda", cfg, st->have_forward, st->D, st->E,
                                 st->He));
    int64_t N = st->N, D = st->D, E = st->E, He = st->He;
    float *dh, *dG, *dR;
    RD_TRY(DBUF(st->dh, float, N * D, dh));
    RD_TRY(DBUF(st->dG, float, N * E, dG));
    RD_TRY(DBUF(st->dR, float, N * E, dR));
    RD_TRY(rd_experts_backward_cuda(st->ex, dx, dG, grad->p[RD_MOE_W1], grad->p[RD_MOE_B1],
                                    grad->p[RD_MOE_W2], grad->p[RD_MOE_B2], dy, p->p[RD_MOE_W1],
                                    p->p[RD_MOE_W2], N, D, E, He));
    RD_TRY(rd_gate_backward_cuda(dR, dG, (const float *)st->G.p, N, E, cfg->gating));
    const float *dh_extra = NULL; /* aux losses: weighted grads into dR, PLR head's on h */
    RD_TRY(rd_moe_aux_cuda_backward(st->aux, dR, &dh_extra, grad, (const float *)st->h.p, p));
    return rd_router_backward_cuda(dx, grad->p[RD_MOE_ROUTER_W], grad->p[RD_MOE_ROUTER_B],
                                   grad->p[RD_MOE_GATE_W], grad->p[RD_MOE_GATE_B], dh, dR, dh_extra,
                                   (const float *)st->hpre.p, (const float *)st->h.p, x,
                                   p->p[RD_MOE_ROUTER_W], p->p[RD_MOE_GATE_W], N, D, E);
}

extern "C" rd_status rd_moe_cuda_set_precision(rd_moe_cuda_state *st, int prec) {
    if (!st) return rd_fail(RD_EINVAL, "moe_cuda_set_precision: NULL state");
    int old = rd_experts_cuda_get_precision(st->ex);
    RD_TRY(rd_experts_cuda_set_precision(st->ex, prec));
    if (prec != old) st->have_forward = 0; /* the saved expert activations are of the old type */
    return RD_OK;
}

/* The thresholds read back into the host copy (synchronises). */
static rd_status download_taus(rd_moe_cuda_state *st) {
    if (!st->have_tau || st->ntau == 0) return RD_OK;
    float *h = (float *)realloc(st->taus_host, (size_t)st->ntau * sizeof(float));
    if (!h) return rd_fail(RD_ENOMEM, "moe_cuda: out of memory for %lld thresholds",
                           (long long)st->ntau);
    st->taus_host = h;
    return rd_cuda_d2h(h, st->taus.p, (size_t)st->ntau * sizeof(float));
}

extern "C" rd_status rd_moe_cuda_state_view(rd_moe_cuda_state *st, rd_moe_view *v) {
    memset(v, 0, sizeof *v);
    if (!st) return rd_fail(RD_EINVAL, "moe_cuda_state_view: NULL state");
    v->have_tau = st->have_tau;
    v->tau = v->tau_b = NAN;
    if (st->scal.p) {
        float s[2];
        RD_TRY(rd_cuda_d2h(s, st->scal.p, sizeof s));
        if (st->have_tau) v->tau = s[0];
        if (st->have_forward) v->tau_b = s[1];
    }
    RD_TRY(download_taus(st));
    v->ntau = st->have_tau ? st->ntau : 0;
    v->taus = st->taus_host;
    if (!st->have_forward) return RD_OK;
    v->have_forward = 1;
    v->B = st->B; v->L = st->L; v->N = st->N; v->D = st->D; v->E = st->E; v->He = st->He;
    v->P = rd_experts_cuda_pairs(st->ex);
    v->mask = (const uint8_t *)st->mask.p;
    v->G = (const float *)st->G.p;
    v->R = (const float *)st->R.p;
    v->h = (const float *)st->h.p;
    v->counts = rd_experts_cuda_counts(st->ex);
    return RD_OK;
}

extern "C" rd_status rd_moe_cuda_get_aux(rd_moe_cuda_state *st, rd_moe_aux *out) {
    memset(out, 0, sizeof *out);
    if (!st) return rd_fail(RD_EINVAL, "moe_cuda_get_aux: NULL state");
    if (!st->have_forward) return RD_OK;
    rd_moe_aux_cuda_read(st->aux, out);
    out->tau = out->tau_b = NAN;
    if (st->scal.p) {
        float s[2];
        RD_TRY(rd_cuda_d2h(s, st->scal.p, sizeof s));
        if (st->have_tau) out->tau = s[0];
        out->tau_b = s[1];
    }
    return RD_OK;
}

extern "C" rd_status rd_moe_set_threshold_cuda(rd_moe_cuda_state *st, const float *tau,
                                               int64_t n) {
    if (!st) return rd_fail(RD_EINVAL, "moe_set_threshold_cuda: NULL state");
    if (!tau) { st->have_tau = 0; return RD_OK; }
    if (n < 0) return rd_fail(RD_EINVAL, "moe_set_threshold_cuda: negative count n=%lld", (long long)n);
    double sum = 0.0; /* the mean as tau_mean_of_kernel forms it */
    for (int64_t g = 0; g < n; g++) {
        if (isnan(tau[g]))
            return rd_fail(RD_EINVAL, "moe_set_threshold_cuda: tau[%lld] is NaN", (long long)g);
        sum += tau[g];
    }
    float *taus, *scal, mean = n ? (float)(sum / (double)n) : NAN;
    RD_TRY(DBUF(st->taus, float, n, taus));
    RD_TRY(DBUF(st->scal, float, 2, scal));
    if (n) RD_TRY(rd_cuda_h2d(taus, tau, (size_t)n * sizeof(float)));
    RD_TRY(rd_cuda_h2d(scal, &mean, sizeof(float)));
    st->ntau = n;
    st->have_tau = 1;
    return RD_OK;
}

extern "C" rd_status rd_moe_cuda_copy_threshold(rd_moe_cuda_state *dst,
                                                const rd_moe_cuda_state *src) {
    if (!dst || !src) return rd_fail(RD_EINVAL, "moe_cuda_copy_threshold: NULL state");
    dst->have_tau = src->have_tau;
    if (!src->have_tau) return RD_OK;
    float *taus, *scal;
    RD_TRY(DBUF(dst->taus, float, src->ntau, taus));
    RD_TRY(DBUF(dst->scal, float, 2, scal));
    if (src->ntau)
        CU_TRY(cudaMemcpyAsync(taus, src->taus.p, (size_t)src->ntau * sizeof(float),
                               cudaMemcpyDeviceToDevice, RD_STREAM));
    CU_TRY(cudaMemcpyAsync(scal, src->scal.p, sizeof(float), cudaMemcpyDeviceToDevice, RD_STREAM));
    dst->ntau = src->ntau;
    return RD_OK;
}
