/* moe_aux.cu — the MoE layer's auxiliary losses and diagnostics (docs/method.md §4-§6) on the
 * device, with the semantics of the CPU's csrc/cpu/moe_aux.c: router similarity and balance
 * losses on P = softmax(R) (training only), the PLR head T = h Wt + bt and its MSE against a
 * target (training only), and on every forward the diagnostics from the co-selection
 * counts C = M^T M (loads on its diagonal, MaxVio, dead experts, combination usage,
 * experts per token).
 *
 * Split between device and host: everything of size N (softmax, P^T P, the column sums of P,
 * the counts, the PLR GEMMs and the squared errors) runs on the device; what is of size E or
 * E^2 (the similarity weights W, the shares f, the loss values and the diagnostics, which
 * sort C(E,2) pair counts) is finished on the host by the CPU's own functions. The device
 * results travel in ONE asynchronous copy into pinned memory, queued before the experts'
 * dispatch, whose synchronising read-back of the counts then also delivers them: the aux
 * terms add no host round trip of their own. W + W^T and f go back up (async) for backward.
 *
 * Determinism: counts are integer atomics (exact); the PLR squared error is summed per block
 * in double and the blocks summed in order on the host; the column sums are fixed-order. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"
#include "internal.cuh"

#define AX_THREADS 256
#define AX_PLR_BLOCKS 256 /* blocks of the PLR loss kernel (partial sums read back) */

struct rd_moe_aux_cuda {
    rd_moe_aux v;                   /* values of the last forward (load: host, plr_pred: device) */
    int64_t N, D, E, Pd;
    float w_sim, w_bal, w_plr;      /* the weights the last forward saw, used by its backward */
    int pending, want_P, want_sim, want_bal, want_plr_loss;
    int64_t plr_n;                  /* N * Pd when the PLR loss is computed */
    rd_dbuf P, dPs;                 /* (N,E) softmax of R; backward scratch */
    rd_dbuf T, dT;                  /* (N,Pd) head prediction; plr_weight * dL/dT */
    rd_dbuf dhx;                    /* (N,D) the head's gradient on h */
    rd_dbuf res;                    /* device results, layout below */
    rd_dbuf up;                     /* (E,E) S = W + W^T, (E) f */
    rd_dbuf partial;                /* colsum scratch */
    void *hres;                     /* pinned host copy of res */
    size_t hres_cap;
    float *hup;                     /* pinned host S, f */
    size_t hup_cap;
    cudaEvent_t copied;             /* recorded after the copy of res into hres */
    int64_t cap_E;
    int64_t *C, *load;              /* host (E,E), (E) */
    float *W;                       /* host (E,E) */
};

/* Byte layout of the results: counts C (E*E u32), P^T P (E*E f32), column sums of P
 * (E f32), PLR partial sums (AX_PLR_BLOCKS f64), first non-finite target index and first
 * non-finite logit index (u64 each, ~0 when none). */
typedef struct {
    size_t C, Pp, pbar, plr, flags, total;
} res_layout;

static size_t al8(size_t b) { return (b + 7) & ~(size_t)7; }

static res_layout layout_of(int64_t E) {
    res_layout l;
    l.C = 0;
    l.Pp = al8(l.C + (size_t)(E * E) * 4);
    l.pbar = al8(l.Pp + (size_t)(E * E) * 4);
    l.plr = al8(l.pbar + (size_t)E * 4);
    l.flags = l.plr + AX_PLR_BLOCKS * sizeof(double);
    l.total = l.flags + 2 * sizeof(unsigned long long);
    return l;
}

rd_moe_aux_cuda *rd_moe_aux_cuda_new(void) {
    return (rd_moe_aux_cuda *)calloc(1, sizeof(rd_moe_aux_cuda));
}

void rd_moe_aux_cuda_free(rd_moe_aux_cuda *a) {
    if (!a) return;
    cudaStreamSynchronize(RD_STREAM);
    rd_dbuf *bufs[] = {&a->P, &a->dPs, &a->T, &a->dT, &a->dhx, &a->res, &a->up, &a->partial};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) rd_dbuf_free(bufs[i]);
    if (a->copied) cudaEventDestroy(a->copied);
    if (a->hres) cudaFreeHost(a->hres);
    if (a->hup) cudaFreeHost(a->hup);
    free(a->C);
    free(a->load);
    free(a->W);
    free(a);
}

/* Pinned host buffer of at least `bytes` (the old one is freed after the stream drained). */
static rd_status pinned(void **p, size_t *cap, size_t bytes) {
    if (bytes <= *cap) return RD_OK;
    if (*p) {
        CU_TRY(cudaStreamSynchronize(RD_STREAM));
        cudaFreeHost(*p);
        *p = NULL;
        *cap = 0;
    }
    cudaError_t e = cudaMallocHost(p, bytes);
    if (e != cudaSuccess) {
        cudaGetLastError();
        *p = NULL;
        return rd_fail(RD_ENOMEM, "moe aux: cannot allocate %zu bytes of pinned host memory: %s",
                       bytes, cudaGetErrorString(e));
    }
    *cap = bytes;
    return RD_OK;
}

/* ---- kernels ------------------------------------------------------------------------- */
/* C[a,b] += 1 for every token selecting both a and b (a tile of tokens per block; counts
 * in shared memory when C fits, else straight into global memory). */
__global__ void coselect_kernel(unsigned *C, const uint8_t *mask, int64_t N, int64_t E, int use_sh) {
    extern __shared__ unsigned sh[];
    int64_t EE = E * E;
    if (use_sh) {
        for (int64_t i = threadIdx.x; i < EE; i += blockDim.x) sh[i] = 0;
        __syncthreads();
    }
    unsigned *dst = use_sh ? sh : C;
    int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t < N) {
        const uint8_t *m = mask + t * E;
        for (int64_t a = 0; a < E; a++) {
            if (!m[a]) continue;
            for (int64_t b = 0; b < E; b++)
                if (m[b]) atomicAdd(dst + a * E + b, 1u);
        }
    }
    if (use_sh) {
        __syncthreads();
        for (int64_t i = threadIdx.x; i < EE; i += blockDim.x)
            if (sh[i]) atomicAdd(C + i, sh[i]);
    }
}

__device__ __forceinline__ float ax_warp_sum(float v) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* One warp per row: P = softmax(R) (the CPU's order of operations); the first non-finite
 * logit's flat index goes to *bad. */
__global__ void softmax_aux_kernel(float *P, const float *R, int64_t N, int64_t E,
                                   unsigned long long *bad) {
    int64_t t = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (t >= N) return;
    const float *r = R + t * E;
    float m = -INFINITY;
    for (int64_t e = lane; e < E; e += 32) {
        float v = r[e];
        if (!isfinite(v)) atomicMin(bad, (unsigned long long)(t * E + e));
        m = fmaxf(m, v);
    }
    for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float s = 0.0f;
    for (int64_t e = lane; e < E; e += 32) {
        float v = expf(r[e] - m);
        P[t * E + e] = v;
        s += v;
    }
    float inv = 1.0f / ax_warp_sum(s);
    for (int64_t e = lane; e < E; e += 32) P[t * E + e] *= inv;
}

/* dT = c (T - target); partial[block] = sum of (T - target)^2 over the block's elements, in
 * double; the first non-finite target's index goes to *bad. */
__global__ void plr_loss_kernel(double *partial, float *dT, unsigned long long *bad,
                                const float *T, const float *target, int64_t n, float c) {
    __shared__ double red[AX_THREADS];
    double acc = 0.0;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float tg = target[i];
        if (!isfinite(tg)) atomicMin(bad, (unsigned long long)i);
        double d = (double)T[i] - (double)tg;
        acc += d * d;
        dT[i] = c * (T[i] - tg);
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = AX_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = red[0];
}

__global__ void add_cols_kernel(float *X, const float *b, int64_t n, int64_t cols) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        X[i] += b[i % cols];
}

/* One warp per row: g = dPs[t] (or 0) + cbal f (or 0); dR[t] += P (g - <P, g>): the softmax
 * backward of the similarity and balance gradients together (it is linear in g). */
__global__ void aux_grad_kernel(float *dR, const float *P, const float *dPs, const float *f,
                                float cbal, int64_t N, int64_t E) {
    int64_t t = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (t >= N) return;
    float dot = 0.0f;
    for (int64_t e = lane; e < E; e += 32) {
        float g = (dPs ? dPs[t * E + e] : 0.0f) + (f ? cbal * f[e] : 0.0f);
        dot += P[t * E + e] * g;
    }
    dot = ax_warp_sum(dot);
    for (int64_t e = lane; e < E; e += 32) {
        float g = (dPs ? dPs[t * E + e] : 0.0f) + (f ? cbal * f[e] : 0.0f);
        dR[t * E + e] += P[t * E + e] * (g - dot);
    }
}

/* ---- forward ------------------------------------------------------------------------- */
rd_status rd_moe_aux_cuda_launch(rd_moe_aux_cuda *a, const float *R, const float *h,
                                 const uint8_t *mask, const float *plr_target,
                                 const rd_moe_cfg *cfg, const rd_moe_params *p, int64_t N,
                                 int training) {
    if (!a) return rd_fail(RD_EINVAL, "moe aux: NULL state");
    RD_TRY(rd_moe_aux_weights_check(cfg));
    int64_t E = cfg->E, D = cfg->D, Pd = cfg->plr_dim;
    if (E * E > INT32_MAX) return rd_fail(RD_EINVAL, "moe aux: E=%lld too large", (long long)E);
    a->pending = 0;
    memset(&a->v, 0, sizeof a->v);
    a->N = N; a->D = D; a->E = E; a->Pd = Pd;
    a->w_sim = cfg->sim_weight; a->w_bal = cfg->balance_weight; a->w_plr = cfg->plr_weight;
    a->want_sim = training && cfg->sim_weight > 0.0f;
    a->want_bal = training && cfg->balance_weight > 0.0f;
    a->want_P = a->want_sim || a->want_bal;
    a->want_plr_loss = training && Pd > 0 && plr_target != NULL;
    a->plr_n = a->want_plr_loss ? N * Pd : 0;
    a->v.N = N; a->v.E = E; a->v.plr_dim = Pd; a->v.training = training;

    if (E > a->cap_E) {
        int64_t *C = (int64_t *)realloc(a->C, (size_t)(E * E) * sizeof(int64_t));
        if (C) a->C = C;
        int64_t *ld = (int64_t *)realloc(a->load, (size_t)E * sizeof(int64_t));
        if (ld) a->load = ld;
        float *W = (float *)realloc(a->W, (size_t)(E * E) * sizeof(float));
        if (W) a->W = W;
        if (!C || !ld || !W) return rd_fail(RD_ENOMEM, "moe aux: out of host memory for E=%lld", (long long)E);
        a->cap_E = E;
    }
    res_layout l = layout_of(E);
    char *res;
    RD_TRY(rd_dbuf_get(&a->res, l.total, (void **)&res));
    RD_TRY(pinned(&a->hres, &a->hres_cap, l.total));
    CU_TRY(cudaMemsetAsync(res, 0, l.flags, RD_STREAM));
    CU_TRY(cudaMemsetAsync(res + l.flags, 0xff, l.total - l.flags, RD_STREAM));
    unsigned long long *bad_target = (unsigned long long *)(res + l.flags), *bad_R = bad_target + 1;

    /* counts (every forward) */
    size_t shmem = (size_t)(E * E) * sizeof(unsigned);
    int use_sh = shmem <= 32 * 1024;
    coselect_kernel<<<rd_blocks(N, AX_THREADS), AX_THREADS, use_sh ? shmem : 0, RD_STREAM>>>(
        (unsigned *)(res + l.C), mask, N, E, use_sh);
    CU_LAUNCHED("coselect_kernel");

    if (a->want_P) {
        float *P;
        RD_TRY(DBUF(a->P, float, N * E, P));
        softmax_aux_kernel<<<rd_blocks(N, AX_THREADS / 32), AX_THREADS, 0, RD_STREAM>>>(P, R, N, E, bad_R);
        CU_LAUNCHED("softmax_aux_kernel");
        if (a->want_sim) /* P' = P^T P (E,E) */
            RD_TRY(rd_matmul_cuda((float *)(res + l.Pp), (int)E, P, (int)E, 1, P, (int)E, 0, E, E, N,
                                  1.0f, 0.0f));
        if (a->want_bal) { /* column sums of P (E) */
            float *partial;
            RD_TRY(DBUF(a->partial, float, rd_colsum_scratch(1, E), partial));
            RD_TRY(rd_colsum_segments_cuda((float *)(res + l.pbar), P, NULL, N, 1, E, partial));
        }
    }
    if (training && Pd > 0) { /* the head: T = h Wt + bt */
        float *T;
        RD_TRY(DBUF(a->T, float, N * Pd, T));
        RD_TRY(rd_matmul_cuda(T, (int)Pd, h, (int)D, 0, p->p[RD_MOE_PLR_W], (int)Pd, 0, N, Pd, D,
                              1.0f, 0.0f));
        add_cols_kernel<<<rd_grid(N * Pd, AX_THREADS), AX_THREADS, 0, RD_STREAM>>>(
            T, p->p[RD_MOE_PLR_B], N * Pd, Pd);
        CU_LAUNCHED("add_cols_kernel");
        a->v.plr_pred = T;
        if (a->want_plr_loss) {
            float *dT;
            RD_TRY(DBUF(a->dT, float, N * Pd, dT));
            int64_t n = N * Pd, nb = rd_blocks(n, AX_THREADS);
            if (nb > AX_PLR_BLOCKS) nb = AX_PLR_BLOCKS;
            float c = 2.0f * a->w_plr / (float)n;
            plr_loss_kernel<<<(unsigned)nb, AX_THREADS, 0, RD_STREAM>>>(
                (double *)(res + l.plr), dT, bad_target, T, plr_target, n, c);
            CU_LAUNCHED("plr_loss_kernel");
        }
    }
    /* one copy back, completed by the layer's next synchronising read-back */
    CU_TRY(cudaMemcpyAsync(a->hres, res, l.total, cudaMemcpyDeviceToHost, RD_STREAM));
    if (!a->copied) CU_TRY(cudaEventCreateWithFlags(&a->copied, cudaEventDisableTiming));
    CU_TRY(cudaEventRecord(a->copied, RD_STREAM));
    a->pending = 1;
    return RD_OK;
}

rd_status rd_moe_aux_cuda_finish(rd_moe_aux_cuda *a) {
    if (!a || !a->pending) return rd_fail(RD_ESTATE, "moe aux: finish without a launch");
    /* done already when the experts' read-back (queued after it) returned: waits for the
     * copy only, not for the expert GEMMs queued since */
    CU_TRY(cudaEventSynchronize(a->copied));
    a->pending = 0;
    int64_t N = a->N, E = a->E;
    res_layout l = layout_of(E);
    const char *hr = (const char *)a->hres;
    const unsigned *Cu = (const unsigned *)(hr + l.C);
    const unsigned long long *flags = (const unsigned long long *)(hr + l.flags);
    if (a->want_P && flags[1] != ~0ULL) {
        unsigned long long i = flags[1];
        return rd_fail(RD_EINVAL, "R: non-finite logit at (%lld, %lld)", (long long)(i / E),
                       (long long)(i % E));
    }
    if (a->want_plr_loss && flags[0] != ~0ULL)
        return rd_fail(RD_EINVAL, "target: non-finite value at flat index %llu", flags[0]);

    /* diagnostics, from the counts */
    int64_t pairs = 0;
    for (int64_t i = 0; i < E * E; i++) a->C[i] = (int64_t)Cu[i];
    for (int64_t e = 0; e < E; e++) pairs += a->load[e] = a->C[e * E + e];
    a->v.load = a->load;
    a->v.experts_per_token = N > 0 ? (double)pairs / (double)N : 0.0;
    RD_TRY(rd_max_violation(&a->v.max_violation, a->load, E));
    RD_TRY(rd_dead_experts(&a->v.dead_experts, a->load, E));
    RD_TRY(rd_combination_usage(&a->v.combination_usage, a->C, E, 0.95));

    if (a->want_sim || a->want_bal) {
        RD_TRY(pinned((void **)&a->hup, &a->hup_cap, (size_t)(E * E + E) * sizeof(float)));
        float *S = a->hup, *f = a->hup + E * E;
        if (a->want_sim) {
            const float *Pp = (const float *)(hr + l.Pp);
            rd_similarity_weights(a->W, a->C, E);
            double acc = 0.0;
            for (int64_t i = 0; i < E * E; i++) acc += (double)a->W[i] * (double)Pp[i];
            a->v.sim_loss = (float)(acc / (double)N);
            a->v.has_sim = 1;
            for (int64_t i = 0; i < E; i++)
                for (int64_t j = 0; j < E; j++) S[i * E + j] = a->W[i * E + j] + a->W[j * E + i];
        }
        if (a->want_bal) {
            const float *pbar = (const float *)(hr + l.pbar);
            int64_t total = 0;
            for (int64_t e = 0; e < E; e++) total += a->load[e];
            double acc = 0.0;
            for (int64_t e = 0; e < E; e++) {
                f[e] = total > 0 ? (float)((double)a->load[e] / (double)total) : 0.0f;
                acc += (double)f[e] * (double)pbar[e] / (double)N;
            }
            a->v.balance_loss = (float)((double)E * acc);
            a->v.has_balance = 1;
        }
        float *up;
        RD_TRY(DBUF(a->up, float, E * E + E, up));
        CU_TRY(cudaMemcpyAsync(up, a->hup, (size_t)(E * E + E) * sizeof(float),
                               cudaMemcpyHostToDevice, RD_STREAM));
    }
    if (a->want_plr_loss) {
        const double *part = (const double *)(hr + l.plr);
        double acc = 0.0;
        for (int b = 0; b < AX_PLR_BLOCKS; b++) acc += part[b];
        a->v.plr_loss = (float)(acc / (double)a->plr_n);
        a->v.has_plr = 1;
    }
    a->v.aux_loss = a->w_sim * a->v.sim_loss + a->w_bal * a->v.balance_loss +
                    (a->v.has_plr ? a->w_plr * a->v.plr_loss : 0.0f);
    return RD_OK;
}

/* ---- backward ------------------------------------------------------------------------ */
rd_status rd_moe_aux_cuda_backward(rd_moe_aux_cuda *a, float *dR_acc, const float **dh_extra,
                                   const rd_moe_params *grad, const float *h,
                                   const rd_moe_params *p) {
    *dh_extra = NULL;
    if (!a) return rd_fail(RD_EINVAL, "moe aux: NULL state");
    int64_t N = a->N, E = a->E, Pd = a->Pd, D = a->D;
    if (a->v.has_sim || a->v.has_balance) {
        const float *P = (const float *)a->P.p, *S = (const float *)a->up.p, *f = S + E * E;
        float *dPs = NULL;
        if (a->v.has_sim) { /* dP_sim = (w_sim / N) P (W + W^T) */
            RD_TRY(DBUF(a->dPs, float, N * E, dPs));
            RD_TRY(rd_matmul_cuda(dPs, (int)E, P, (int)E, 0, S, (int)E, 0, N, E, E,
                                  a->w_sim / (float)N, 0.0f));
        }
        float cbal = a->w_bal * (float)E / (float)N;
        aux_grad_kernel<<<rd_blocks(N, AX_THREADS / 32), AX_THREADS, 0, RD_STREAM>>>(
            dR_acc, P, dPs, a->v.has_balance ? f : NULL, cbal, N, E);
        CU_LAUNCHED("aux_grad_kernel");
    }
    if (a->v.has_plr && a->w_plr > 0.0f) {
        float *dhx, *partial;
        const float *dT = (const float *)a->dT.p;
        RD_TRY(DBUF(a->dhx, float, N * D, dhx));
        RD_TRY(DBUF(a->partial, float, rd_colsum_scratch(1, Pd > E ? Pd : E), partial));
        /* dh = dT Wt^T; dWt += h^T dT; dbt += sum_t dT */
        RD_TRY(rd_matmul_cuda(dhx, (int)D, dT, (int)Pd, 0, p->p[RD_MOE_PLR_W], (int)Pd, 1, N, D, Pd,
                              1.0f, 0.0f));
        RD_TRY(rd_matmul_cuda(grad->p[RD_MOE_PLR_W], (int)Pd, h, (int)D, 1, dT, (int)Pd, 0, D, Pd, N,
                              1.0f, 1.0f));
        RD_TRY(rd_colsum_segments_cuda(grad->p[RD_MOE_PLR_B], dT, NULL, N, 1, Pd, partial));
        *dh_extra = dhx;
    }
    return RD_OK;
}

void rd_moe_aux_cuda_read(const rd_moe_aux_cuda *a, rd_moe_aux *out) {
    memset(out, 0, sizeof *out);
    if (a) *out = a->v;
}
