/* experts.cu — the dropless expert FFN of SPEC §2 on the device, laid out exactly as the
 * CPU's csrc/cpu/experts.c: the P selected pairs become expert-major rows (rows of
 * expert e are offsets[e]..offsets[e+1]-1, tokens ascending inside an expert), and a
 * per-token CSR (tok_ptr, tok_row) lists each token's rows in ascending expert order.
 *
 * Dispatch, without sorting and without float atomics (the megablocks histogram ->
 * cumsum -> permutation idea, made stable by construction): tokens are cut into tiles of
 * 256; (1) each tile counts its tokens per expert (warp ballots) and its pairs; (2) one
 * block scans the tile counts per expert (giving each tile its base row inside every
 * expert), the expert counts into offsets, and the tile pair counts into token offsets;
 * (3) each tile places its pairs: row = offsets[e] + tile base + rank among the tile's
 * earlier tokens of e (ballot + popc), so rows are tokens-ascending within an expert.
 *
 * The host needs the per-expert counts: cuBLAS takes GEMM sizes from host memory, both
 * in a loop of cublasGemmEx and in cublasGemmGroupedBatchedEx (its m/n/k arrays are host
 * arrays), and P sizes the row buffers. So the forward makes ONE small device->host copy
 * per call (E+2 words: counts, P, and the routing's NaN flag riding along), right after
 * the count/scan kernels; everything else stays on the device. Avoiding it would take a
 * hand-written grouped GEMM reading sizes on the device; at DiT sizes the copy costs a
 * few microseconds against milliseconds of GEMMs.
 *
 * Combine and dx: one block per token sums its rows in ascending expert order; dG is a
 * fixed-order block reduction; bias gradients use the fixed-order segmented column sum:
 * every result is bitwise reproducible run to run. */
#include <stdlib.h>
#include <string.h>

#include "common.cuh"
#include "internal.cuh"

#define EX_TILE 256    /* tokens per dispatch tile = threads per dispatch block */
#define EX_THREADS 256 /* threads of the row / token kernels */

struct rd_experts_cuda {
    int64_t N, D, E, He, P;
    int valid;
    int64_t cap_E;                 /* capacity of the host arrays */
    int64_t *counts;               /* (E)   host */
    int64_t *offsets;              /* (E+1) host */
    unsigned long long *info_h;    /* (E+2) host: counts, P, NaN flag */
    rd_dbuf info;                  /* (E+2) device, same layout */
    rd_dbuf offsets_d;             /* (E+1) int */
    rd_dbuf tile_cnt, tile_tok;    /* (ntiles,E), (ntiles) int */
    rd_dbuf tok_ptr;               /* (N+1) int */
    rd_dbuf tok_row, row_tok, row_exp; /* (P) int */
    rd_dbuf row_gate;              /* (P) float */
    rd_dbuf xg, a, hdn, o;         /* (P,D) (P,He) (P,He) (P,D) */
    rd_dbuf dbuf, dhid;            /* (P,D) do then dxg; (P,He) dhdn then da */
    rd_dbuf partial;               /* colsum scratch */
    rd_dbuf ptrs;                  /* grouped GEMM pointer arrays (3,E) */
};

extern "C" rd_experts_cuda *rd_experts_cuda_new(void) {
    return (rd_experts_cuda *)calloc(1, sizeof(rd_experts_cuda));
}

extern "C" void rd_experts_cuda_free(rd_experts_cuda *ex) {
    if (!ex) return;
    cudaStreamSynchronize(RD_STREAM); /* queued work may still read the buffers */
    rd_dbuf *bufs[] = {&ex->info, &ex->offsets_d, &ex->tile_cnt, &ex->tile_tok, &ex->tok_ptr,
                       &ex->tok_row, &ex->row_tok, &ex->row_exp, &ex->row_gate, &ex->xg,
                       &ex->a, &ex->hdn, &ex->o, &ex->dbuf, &ex->dhid, &ex->partial, &ex->ptrs};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) rd_dbuf_free(bufs[i]);
    free(ex->counts);
    free(ex->offsets);
    free(ex->info_h);
    free(ex);
}

extern "C" int64_t rd_experts_cuda_pairs(const rd_experts_cuda *ex) {
    return ex && ex->valid ? ex->P : 0;
}
extern "C" const int64_t *rd_experts_cuda_counts(const rd_experts_cuda *ex) {
    return ex && ex->valid ? ex->counts : NULL;
}

static rd_status check_sizes(const char *fn, int64_t N, int64_t D, int64_t E, int64_t He) {
    if (N < 0 || D <= 0 || E <= 0 || He <= 0)
        return rd_fail(RD_EINVAL, "%s: sizes must be N >= 0 and D, E, He > 0, got N=%lld D=%lld "
                       "E=%lld He=%lld", fn, (long long)N, (long long)D, (long long)E, (long long)He);
    if (N * E > INT32_MAX || N * D > INT32_MAX || D * He > INT32_MAX)
        return rd_fail(RD_EINVAL, "%s: N*E=%lld, N*D=%lld or D*He=%lld exceeds %d (32-bit row "
                       "indices)", fn, (long long)(N * E), (long long)(N * D), (long long)(D * He),
                       INT32_MAX);
    return RD_OK;
}

/* ---- dispatch kernels -------------------------------------------------------------- */
__global__ void count_kernel(int *tile_cnt /* ntiles,E */, int *tile_tok /* ntiles */,
                             const uint8_t *mask, int64_t N, int64_t E) {
    extern __shared__ int cnt[]; /* (E) */
    __shared__ int wsum[EX_TILE / 32];
    int64_t tile = blockIdx.x, t = tile * EX_TILE + threadIdx.x;
    int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    for (int64_t e = threadIdx.x; e < E; e += EX_TILE) cnt[e] = 0;
    __syncthreads();
    int mine = 0;
    for (int64_t e = 0; e < E; e++) {
        bool f = t < N && mask[t * E + e];
        mine += f;
        unsigned b = __ballot_sync(0xffffffffu, f);
        if (lane == 0 && b) atomicAdd(&cnt[e], __popc(b)); /* integer: exact in any order */
    }
    for (int o = 16; o; o >>= 1) mine += __shfl_down_sync(0xffffffffu, mine, o);
    if (lane == 0) wsum[w] = mine;
    __syncthreads();
    for (int64_t e = threadIdx.x; e < E; e += EX_TILE) tile_cnt[tile * E + e] = cnt[e];
    if (threadIdx.x == 0) {
        int s = 0;
        for (int u = 0; u < EX_TILE / 32; u++) s += wsum[u];
        tile_tok[tile] = s;
    }
}

/* Exclusive scan of v[i*stride], i < n, in place, by one warp (32 tiles per step);
 * returns the total. */
__device__ int warp_exclusive_scan(int *v, int64_t n, int64_t stride) {
    int lane = threadIdx.x % 32, run = 0;
    for (int64_t base = 0; base < n; base += 32) {
        int64_t i = base + lane;
        int x = i < n ? v[i * stride] : 0, incl = x;
        for (int o = 1; o < 32; o <<= 1) {
            int y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += y;
        }
        if (i < n) v[i * stride] = run + incl - x;
        run += __shfl_sync(0xffffffffu, incl, 31);
    }
    return run;
}

/* One block: tile counts -> exclusive per-expert tile bases (a warp per expert); expert
 * counts -> offsets; tile pair counts -> exclusive tile token bases. info = counts, P,
 * and the routing's NaN flag. */
__global__ void scan_kernel(int *tile_cnt, int *tile_tok, int *offsets, int *tok_ptr,
                            unsigned long long *info, const unsigned long long *nan_dev,
                            int64_t ntiles, int64_t N, int64_t E) {
    int w = threadIdx.x / 32, nw = blockDim.x / 32;
    for (int64_t e = w; e < E; e += nw) {
        int total = warp_exclusive_scan(tile_cnt + e, ntiles, E);
        if (threadIdx.x % 32 == 0) info[e] = (unsigned long long)total;
    }
    if (w == nw - 1) warp_exclusive_scan(tile_tok, ntiles, 1); /* read by assign only */
    __syncthreads();
    if (threadIdx.x == 0) {
        int run = 0;
        offsets[0] = 0;
        for (int64_t e = 0; e < E; e++) {
            run += (int)info[e];
            offsets[e + 1] = run;
        }
        info[E] = (unsigned long long)run;
        info[E + 1] = nan_dev ? *nan_dev : ~0ULL;
        tok_ptr[N] = run;
    }
}

__global__ void assign_kernel(int *tok_ptr, int *tok_row, int *row_tok, int *row_exp,
                              float *row_gate, const int *tile_cnt, const int *tile_tok,
                              const int *offsets, const uint8_t *mask, const float *G,
                              int64_t N, int64_t E) {
    __shared__ int wc[EX_TILE / 32];
    int64_t tile = blockIdx.x, t = tile * EX_TILE + threadIdx.x;
    int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    unsigned lt = (1u << lane) - 1u;
    /* this token's first CSR slot: tile base + exclusive scan of pair counts in the tile */
    int mine = 0;
    if (t < N)
        for (int64_t e = 0; e < E; e++) mine += mask[t * E + e] != 0;
    int incl = mine;
    for (int o = 1; o < 32; o <<= 1) {
        int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
    }
    if (lane == 31) wc[w] = incl;
    __syncthreads();
    int j = tile_tok[tile] + incl - mine;
    for (int u = 0; u < w; u++) j += wc[u];
    if (t < N) tok_ptr[t] = j;
    __syncthreads();
    for (int64_t e = 0; e < E; e++) {
        bool f = t < N && mask[t * E + e];
        unsigned b = __ballot_sync(0xffffffffu, f);
        if (lane == 0) wc[w] = __popc(b);
        __syncthreads();
        if (f) {
            int r = offsets[e] + tile_cnt[tile * E + e] + __popc(b & lt);
            for (int u = 0; u < w; u++) r += wc[u];
            row_tok[r] = (int)t;
            row_exp[r] = (int)e;
            row_gate[r] = G[t * E + e];
            tok_row[j++] = r;
        }
        __syncthreads();
    }
}

/* ---- row and token kernels ----------------------------------------------------------- */
__global__ void gather_kernel(float *xg, const float *x, const int *row_tok, int64_t D) {
    int64_t r = blockIdx.x, t = row_tok[r];
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x) xg[r * D + c] = x[t * D + c];
}

/* a += b1[e]; hdn = GELU_tanh(a). */
__global__ void bias_gelu_kernel(float *a, float *hdn, const float *b1, const int *row_exp,
                                 int64_t He) {
    int64_t r = blockIdx.x, e = row_exp[r];
    for (int64_t j = threadIdx.x; j < He; j += blockDim.x) {
        float v = a[r * He + j] + b1[e * He + j];
        a[r * He + j] = v;
        hdn[r * He + j] = d_gelu_tanh(v);
    }
}

/* o_r += b2[e_r] (the saved expert output), y_t = sum over t's rows, ascending expert,
 * of g_r o_r; a token without rows gets 0. */
__global__ void combine_kernel(float *y, float *o, const float *b2, const int *tok_ptr,
                               const int *tok_row, const int *row_exp, const float *row_gate,
                               int64_t D) {
    int64_t t = blockIdx.x;
    int j0 = tok_ptr[t], j1 = tok_ptr[t + 1];
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = j0; j < j1; j++) {
            int64_t r = tok_row[j];
            float v = o[r * D + c] + b2[(int64_t)row_exp[r] * D + c];
            o[r * D + c] = v;
            acc += row_gate[r] * v;
        }
        y[t * D + c] = acc;
    }
}

/* dG[t,e] = <dy_t, o_r> (0 off the mask), do_r = g_r dy_t. Fixed-order block reduction. */
__global__ void dgate_kernel(float *dG, float *dout, const float *dy, const float *o,
                             const int *tok_ptr, const int *tok_row, const int *row_exp,
                             const float *row_gate, int64_t D, int64_t E) {
    __shared__ float red[EX_THREADS];
    int64_t t = blockIdx.x;
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) dG[t * E + e] = 0.0f;
    __syncthreads();
    int j0 = tok_ptr[t], j1 = tok_ptr[t + 1];
    for (int j = j0; j < j1; j++) {
        int64_t r = tok_row[j];
        float g = row_gate[r], acc = 0.0f;
        for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
            float d = dy[t * D + c];
            acc += d * o[r * D + c];
            dout[r * D + c] = g * d;
        }
        red[threadIdx.x] = acc;
        __syncthreads();
        for (int s = EX_THREADS / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
            __syncthreads();
        }
        if (threadIdx.x == 0) dG[t * E + row_exp[r]] = red[0];
        __syncthreads();
    }
}

__global__ void gelu_grad_kernel(float *d, const float *a, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        d[i] *= d_gelu_tanh_grad(a[i]);
}

/* dx_t = sum of t's dxg rows, ascending expert. */
__global__ void token_sum_kernel(float *dx, const float *dxg, const int *tok_ptr,
                                 const int *tok_row, int64_t D) {
    int64_t t = blockIdx.x;
    int j0 = tok_ptr[t], j1 = tok_ptr[t + 1];
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = j0; j < j1; j++) acc += dxg[(int64_t)tok_row[j] * D + c];
        dx[t * D + c] = acc;
    }
}

/* ---- per-expert GEMMs ---------------------------------------------------------------- */
/* One operand of an expert product: rows of the dispatch (base + offsets[e]*ld) or the
 * expert's own weight block (base + e*stride). */
typedef struct {
    const float *base;
    int per_row;
    int64_t stride;
} operand_t;

/* Row-major C (M,N) = op(A) (M,K) op(B) (K,N) + beta C for expert e; a size of -1 means
 * "this expert's row count". */
typedef struct {
    int64_t M, N, K;
    int tA, tB;
    operand_t A, B, C;
    int lda, ldb, ldc;
    float beta;
} expert_gemm_t;

/* The six products, as the CPU's expert_gemm `which`:
 *   0: a = xg W1[e]           1: o = hdn W2[e]           2: dW2[e] += hdn^T do
 *   3: dhid = do W2[e]^T      4: dW1[e] += xg^T da       5: dxg = da W1[e]^T */
static expert_gemm_t expert_gemm_of(int which, float *C, const float *A, const float *W,
                                    int64_t D, int64_t He) {
    expert_gemm_t g;
    memset(&g, 0, sizeof g);
    int iD = (int)D, iH = (int)He;
    switch (which) {
    case 0: g = {-1, He, D, 0, 0, {A, 1, D}, {W, 0, D * He}, {C, 1, He}, iD, iH, iH, 0.0f}; break;
    case 1: g = {-1, D, He, 0, 0, {A, 1, He}, {W, 0, He * D}, {C, 1, D}, iH, iD, iD, 0.0f}; break;
    case 2: g = {He, D, -1, 1, 0, {A, 1, He}, {W, 1, D}, {C, 0, He * D}, iH, iD, iD, 1.0f}; break;
    case 3: g = {-1, He, D, 0, 1, {A, 1, D}, {W, 0, He * D}, {C, 1, He}, iD, iD, iH, 0.0f}; break;
    case 4: g = {D, He, -1, 1, 0, {A, 1, D}, {W, 1, He}, {C, 0, D * He}, iD, iH, iH, 1.0f}; break;
    default: g = {-1, D, He, 0, 1, {A, 1, He}, {W, 0, D * He}, {C, 1, D}, iH, iH, iD, 0.0f}; break;
    }
    return g;
}

static inline int64_t size_of(int64_t v, int64_t n) { return v < 0 ? n : v; }
static inline const float *ptr_of(const operand_t &op, int64_t e, int64_t off) {
    return op.base + (op.per_row ? off * op.stride : e * op.stride);
}

#if CUBLAS_VERSION >= 120500
/* Pointer arrays of the non-empty experts in ascending order (the host's compaction). */
__global__ void grouped_ptrs_kernel(const float **pa, const float **pb, float **pc,
                                    operand_t A, operand_t B, operand_t C, const int *offsets,
                                    int64_t E) {
    int64_t j = 0;
    for (int64_t e = 0; e < E; e++) {
        int64_t off = offsets[e];
        if (offsets[e + 1] == off) continue;
        pa[j] = A.base + (A.per_row ? off * A.stride : e * A.stride);
        pb[j] = B.base + (B.per_row ? off * B.stride : e * B.stride);
        pc[j] = (float *)C.base + (C.per_row ? off * C.stride : e * C.stride);
        j++;
    }
}

static rd_status gemms_grouped(rd_experts_cuda *ex, const expert_gemm_t &g) {
    int64_t E = ex->E, ng = 0;
    for (int64_t e = 0; e < E; e++) ng += ex->counts[e] > 0;
    if (ng == 0) return RD_OK;
    cublasHandle_t h;
    RD_TRY(rd_cublas(&h));
    void **pp;
    RD_TRY(DBUF(ex->ptrs, void *, 3 * ng, pp));
    const float **pa = (const float **)pp, **pb = (const float **)pp + ng;
    float **pc = (float **)pp + 2 * ng;
    grouped_ptrs_kernel<<<1, 1, 0, RD_STREAM>>>(pa, pb, pc, g.A, g.B, g.C,
                                                (const int *)ex->offsets_d.p, E);
    CU_LAUNCHED("grouped_ptrs_kernel");
    /* host arrays in column-major terms: C^T = op(B)^T op(A)^T */
    size_t n = (size_t)ng;
    int *iv = (int *)malloc(n * 7 * sizeof(int));
    float *fv = (float *)malloc(n * 2 * sizeof(float));
    cublasOperation_t *ov = (cublasOperation_t *)malloc(n * 2 * sizeof(cublasOperation_t));
    if (!iv || !fv || !ov) {
        free(iv); free(fv); free(ov);
        return rd_fail(RD_ENOMEM, "experts_cuda: out of host memory for %lld GEMM sizes", (long long)ng);
    }
    int *m = iv, *nn = iv + n, *k = iv + 2 * n, *lda = iv + 3 * n, *ldb = iv + 4 * n,
        *ldc = iv + 5 * n, *gs = iv + 6 * n;
    int64_t j = 0;
    for (int64_t e = 0; e < E; e++) {
        int64_t cnt = ex->counts[e];
        if (!cnt) continue;
        m[j] = (int)size_of(g.N, cnt);
        nn[j] = (int)size_of(g.M, cnt);
        k[j] = (int)size_of(g.K, cnt);
        lda[j] = g.ldb; ldb[j] = g.lda; ldc[j] = g.ldc; gs[j] = 1;
        fv[j] = 1.0f; fv[n + j] = g.beta;
        ov[j] = g.tB ? CUBLAS_OP_T : CUBLAS_OP_N;
        ov[n + j] = g.tA ? CUBLAS_OP_T : CUBLAS_OP_N;
        j++;
    }
    cublasStatus_t b = cublasGemmGroupedBatchedEx(
        h, ov, ov + n, m, nn, k, fv, (const void *const *)pb, CUDA_R_32F, lda,
        (const void *const *)pa, CUDA_R_32F, ldb, fv + n, (void *const *)pc, CUDA_R_32F, ldc,
        (int)ng, gs, rd_cublas_compute());
    free(iv); free(fv); free(ov);
    if (b != CUBLAS_STATUS_SUCCESS)
        return rd_fail(RD_ECUDA, "cuBLAS error in cublasGemmGroupedBatchedEx: %s",
                       cublasGetStatusString(b));
    return RD_OK;
}
#endif

static rd_status expert_gemms(rd_experts_cuda *ex, int which, float *C, const float *A,
                              const float *W) {
    expert_gemm_t g = expert_gemm_of(which, C, A, W, ex->D, ex->He);
#if CUBLAS_VERSION >= 120500
    if (rd_cuda_get_expert_gemm() == 1) return gemms_grouped(ex, g);
#endif
    for (int64_t e = 0; e < ex->E; e++) {
        int64_t off = ex->offsets[e], cnt = ex->counts[e];
        if (!cnt) continue;
        RD_TRY(rd_matmul_cuda((float *)ptr_of(g.C, e, off), g.ldc, ptr_of(g.A, e, off), g.lda,
                              g.tA, ptr_of(g.B, e, off), g.ldb, g.tB, size_of(g.M, cnt),
                              size_of(g.N, cnt), size_of(g.K, cnt), 1.0f, g.beta));
    }
    return RD_OK;
}

/* ---- forward / backward -------------------------------------------------------------- */
static rd_status dispatch(rd_experts_cuda *ex, const uint8_t *mask, const float *G, int64_t N,
                          int64_t E, const unsigned long long *nan_dev,
                          unsigned long long *nan_host) {
    if (E > ex->cap_E) {
        int64_t *c = (int64_t *)realloc(ex->counts, (size_t)E * sizeof(int64_t));
        if (c) ex->counts = c;
        int64_t *o = (int64_t *)realloc(ex->offsets, (size_t)(E + 1) * sizeof(int64_t));
        if (o) ex->offsets = o;
        unsigned long long *ih =
            (unsigned long long *)realloc(ex->info_h, (size_t)(E + 2) * sizeof *ih);
        if (ih) ex->info_h = ih;
        if (!c || !o || !ih) return rd_fail(RD_ENOMEM, "experts_cuda: out of host memory for E=%lld", (long long)E);
        ex->cap_E = E;
    }
    int64_t ntiles = N > 0 ? (N + EX_TILE - 1) / EX_TILE : 0;
    unsigned long long *info;
    int *offsets, *tile_cnt, *tile_tok, *tok_ptr;
    RD_TRY(DBUF(ex->info, unsigned long long, E + 2, info));
    RD_TRY(DBUF(ex->offsets_d, int, E + 1, offsets));
    RD_TRY(DBUF(ex->tile_cnt, int, ntiles * E, tile_cnt));
    RD_TRY(DBUF(ex->tile_tok, int, ntiles, tile_tok));
    RD_TRY(DBUF(ex->tok_ptr, int, N + 1, tok_ptr));
    size_t shmem = (size_t)E * sizeof(int);
    if (shmem > 48 * 1024)
        return rd_fail(RD_EINVAL, "experts_cuda: E=%lld experts exceed the dispatch's shared memory", (long long)E);
    if (ntiles) {
        count_kernel<<<(unsigned)ntiles, EX_TILE, shmem, RD_STREAM>>>(tile_cnt, tile_tok, mask, N, E);
        CU_LAUNCHED("count_kernel");
    }
    scan_kernel<<<1, 256, 0, RD_STREAM>>>(tile_cnt, tile_tok, offsets, tok_ptr, info, nan_dev,
                                          ntiles, N, E);
    CU_LAUNCHED("scan_kernel");
    /* the one read-back: GEMM sizes (and the routing's NaN flag) */
    CU_TRY(cudaMemcpy(ex->info_h, info, (size_t)(E + 2) * sizeof *info, cudaMemcpyDeviceToHost));
    if (nan_host) *nan_host = ex->info_h[E + 1];
    ex->offsets[0] = 0;
    for (int64_t e = 0; e < E; e++) {
        ex->counts[e] = (int64_t)ex->info_h[e];
        ex->offsets[e + 1] = ex->offsets[e] + ex->counts[e];
    }
    int64_t P = (int64_t)ex->info_h[E];
    ex->P = P;
    int *tok_row, *row_tok, *row_exp;
    float *row_gate;
    RD_TRY(DBUF(ex->tok_row, int, P, tok_row));
    RD_TRY(DBUF(ex->row_tok, int, P, row_tok));
    RD_TRY(DBUF(ex->row_exp, int, P, row_exp));
    RD_TRY(DBUF(ex->row_gate, float, P, row_gate));
    if (ntiles) {
        assign_kernel<<<(unsigned)ntiles, EX_TILE, 0, RD_STREAM>>>(
            tok_ptr, tok_row, row_tok, row_exp, row_gate, tile_cnt, tile_tok, offsets, mask, G, N, E);
        CU_LAUNCHED("assign_kernel");
    }
    return RD_OK;
}

rd_status rd_experts_forward_impl(rd_experts_cuda *ex, float *y, const uint8_t *mask,
                                  const float *G, const float *x, const float *W1,
                                  const float *b1, const float *W2, const float *b2,
                                  int64_t N, int64_t D, int64_t E, int64_t He,
                                  const unsigned long long *nan_dev,
                                  unsigned long long *nan_host) {
    if (!ex) return rd_fail(RD_EINVAL, "experts_forward_cuda: NULL workspace");
    RD_TRY(check_sizes("experts_forward_cuda", N, D, E, He));
    ex->valid = 0;
    ex->D = D; ex->He = He; ex->E = E; ex->N = N;
    RD_TRY(dispatch(ex, mask, G, N, E, nan_dev, nan_host));
    int64_t P = ex->P;
    float *xg, *a, *hdn, *o;
    RD_TRY(DBUF(ex->xg, float, P * D, xg));
    RD_TRY(DBUF(ex->a, float, P * He, a));
    RD_TRY(DBUF(ex->hdn, float, P * He, hdn));
    RD_TRY(DBUF(ex->o, float, P * D, o));
    const int *row_tok = (const int *)ex->row_tok.p, *row_exp = (const int *)ex->row_exp.p;
    if (P > 0) {
        gather_kernel<<<(unsigned)P, 128, 0, RD_STREAM>>>(xg, x, row_tok, D);
        CU_LAUNCHED("gather_kernel");
        RD_TRY(expert_gemms(ex, 0, a, xg, W1));                    /* a = xg W1[e] */
        bias_gelu_kernel<<<(unsigned)P, EX_THREADS, 0, RD_STREAM>>>(a, hdn, b1, row_exp, He);
        CU_LAUNCHED("bias_gelu_kernel");
        RD_TRY(expert_gemms(ex, 1, o, hdn, W2));                   /* o = hdn W2[e] */
    }
    if (N > 0) {
        combine_kernel<<<(unsigned)N, EX_THREADS, 0, RD_STREAM>>>(
            y, o, b2, (const int *)ex->tok_ptr.p, (const int *)ex->tok_row.p, row_exp,
            (const float *)ex->row_gate.p, D);
        CU_LAUNCHED("combine_kernel");
    }
    ex->valid = 1;
    return RD_OK;
}

extern "C" rd_status rd_experts_forward_cuda(rd_experts_cuda *ex, float *y, const uint8_t *mask,
                                             const float *G, const float *x, const float *W1,
                                             const float *b1, const float *W2, const float *b2,
                                             int64_t N, int64_t D, int64_t E, int64_t He) {
    return rd_experts_forward_impl(ex, y, mask, G, x, W1, b1, W2, b2, N, D, E, He, NULL, NULL);
}

extern "C" rd_status rd_experts_backward_cuda(rd_experts_cuda *ex, float *dx, float *dG,
                                              float *dW1, float *db1, float *dW2, float *db2,
                                              const float *dy, const float *W1, const float *W2,
                                              int64_t N, int64_t D, int64_t E, int64_t He) {
    if (!ex || !ex->valid)
        return rd_fail(RD_ESTATE, "experts_backward_cuda: no forward to differentiate (call forward first)");
    if (ex->N != N || ex->D != D || ex->E != E || ex->He != He)
        return rd_fail(RD_ESTATE, "experts_backward_cuda: sizes N=%lld D=%lld E=%lld He=%lld differ "
                       "from the last forward's N=%lld D=%lld E=%lld He=%lld", (long long)N,
                       (long long)D, (long long)E, (long long)He, (long long)ex->N,
                       (long long)ex->D, (long long)ex->E, (long long)ex->He);
    int64_t P = ex->P;
    float *dbuf, *dhid, *partial;
    RD_TRY(DBUF(ex->dbuf, float, P * D, dbuf));
    RD_TRY(DBUF(ex->dhid, float, P * He, dhid));
    int64_t wide = D > He ? D : He;
    RD_TRY(DBUF(ex->partial, float, rd_colsum_scratch(E, wide), partial));
    const int *tok_ptr = (const int *)ex->tok_ptr.p, *tok_row = (const int *)ex->tok_row.p;
    const int *row_exp = (const int *)ex->row_exp.p, *offsets = (const int *)ex->offsets_d.p;
    const float *xg = (const float *)ex->xg.p, *a = (const float *)ex->a.p;
    const float *hdn = (const float *)ex->hdn.p, *o = (const float *)ex->o.p;
    if (N > 0) {
        dgate_kernel<<<(unsigned)N, EX_THREADS, 0, RD_STREAM>>>(
            dG, dbuf, dy, o, tok_ptr, tok_row, row_exp, (const float *)ex->row_gate.p, D, E);
        CU_LAUNCHED("dgate_kernel");
    }
    if (P > 0) {
        RD_TRY(rd_colsum_segments_cuda(db2, dbuf, offsets, 0, E, D, partial)); /* db2 += sum do */
        RD_TRY(expert_gemms(ex, 2, dW2, hdn, dbuf));               /* dW2 += hdn^T do */
        RD_TRY(expert_gemms(ex, 3, dhid, dbuf, W2));               /* dhdn = do W2^T */
        int64_t n = P * He, blocks = rd_blocks(n, EX_THREADS * 4);
        gelu_grad_kernel<<<(unsigned)(blocks > 65535 ? 65535 : blocks), EX_THREADS, 0, RD_STREAM>>>(
            dhid, a, n);                                           /* da = dhdn GELU'(a) */
        CU_LAUNCHED("gelu_grad_kernel");
        RD_TRY(rd_colsum_segments_cuda(db1, dhid, offsets, 0, E, He, partial)); /* db1 += sum da */
        RD_TRY(expert_gemms(ex, 4, dW1, xg, dhid));                /* dW1 += xg^T da */
        RD_TRY(expert_gemms(ex, 5, dbuf, dhid, W1));               /* dxg = da W1^T */
    }
    if (N > 0) {
        token_sum_kernel<<<(unsigned)N, EX_THREADS, 0, RD_STREAM>>>(dx, dbuf, tok_ptr, tok_row, D);
        CU_LAUNCHED("token_sum_kernel");
    }
    return RD_OK;
}
