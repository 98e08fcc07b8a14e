/* experts.cu — the dropless expert FFN of docs/method.md §2 on the device, laid out exactly
 * as the CPU's csrc/cpu/experts.c: the P selected pairs become expert-major rows (rows of
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
 * Combine and dx: each token's rows are summed in ascending expert order; dG is a warp
 * reduction per (token, row) in a fixed order; bias gradients use the fixed-order
 * segmented column sum: every result is bitwise reproducible run to run.
 *
 * Elementwise passes are grid-stride loops over 4-element groups (float4 / 2 x bf162) when
 * the widths are multiples of 4 and the caller's pointers are aligned, else over single
 * elements. Precision (rd_precision): the GEMM operands xg, a, hdn, do, da are stored in
 * T = float (fp32, tf32) or bf16; o and dxg, every gradient and the combine stay fp32.
 * bf16 also keeps bf16 copies of W1 and W2, made by each forward and used by its backward.
 *
 * Per-expert GEMMs (rd_cuda_set_expert_gemm): a loop of cublasGemmEx on the one stream, one
 * cublasGemmGroupedBatchedEx per product, or the loop spread over side streams (the small
 * weight-gradient products, (D,He) outputs over an expert's rows, leave most SMs idle one at
 * a time). */
#include <stdlib.h>
#include <string.h>

#include "common.cuh"
#include "internal.cuh"

#define EX_TILE 256    /* tokens per dispatch tile = threads per dispatch block */
#define EX_THREADS 256 /* threads of the row / token kernels */

struct rd_experts_cuda {
    int64_t N, D, E, He, P;
    int valid, prec;
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
    rd_dbuf dbuf, dhid, dxg;       /* (P,D) do; (P,He) dhdn then da; (P,D) fp32 dxg */
    rd_dbuf w1h, w2h;              /* bf16 copies of W1 (E,D,He), W2 (E,He,D) */
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
                       &ex->a, &ex->hdn, &ex->o, &ex->dbuf, &ex->dhid, &ex->dxg, &ex->w1h,
                       &ex->w2h, &ex->partial, &ex->ptrs};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) rd_dbuf_free(bufs[i]);
    free(ex->counts);
    free(ex->offsets);
    free(ex->info_h);
    free(ex);
}

extern "C" rd_status rd_experts_cuda_set_precision(rd_experts_cuda *ex, int prec) {
    if (!ex) return rd_fail(RD_EINVAL, "experts_cuda_set_precision: NULL workspace");
    if (prec < RD_PREC_FP32 || prec > RD_PREC_BF16)
        return rd_fail(RD_EINVAL, "precision: expected 0 (fp32), 1 (tf32) or 2 (bf16), got %d", prec);
    if (prec != ex->prec) ex->valid = 0; /* saved activations are of the old type */
    ex->prec = prec;
    return RD_OK;
}

extern "C" int rd_experts_cuda_get_precision(const rd_experts_cuda *ex) { return ex ? ex->prec : 0; }

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

/* ---- row and token kernels ----------------------------------------------------------
 * V = 4: items are groups of 4 consecutive columns (widths divisible by 4, aligned
 * pointers); V = 1: single elements. */
template <int V, typename T>
__device__ __forceinline__ float4 ldv(const T *p) {
    if (V == 4) return ld4(p);
    return make_float4(ld1(p), 0.0f, 0.0f, 0.0f);
}
template <int V, typename T>
__device__ __forceinline__ void stv(T *p, float4 v) {
    if (V == 4) st4(p, v);
    else st1(p, v.x);
}
/* v + b[0..V-1] (b scalar loads: the bias rows need no alignment). */
template <int V>
__device__ __forceinline__ float4 addb(float4 v, const float *b) {
    v.x += b[0];
    if (V == 4) { v.y += b[1]; v.z += b[2]; v.w += b[3]; }
    return v;
}
__device__ __forceinline__ float4 f4scale(float4 v, float g) {
    return make_float4(g * v.x, g * v.y, g * v.z, g * v.w);
}
__device__ __forceinline__ float f4dot(float4 a, float4 b, int V) {
    return V == 4 ? a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w : a.x * b.x;
}

#define GRID_STRIDE(i, n) \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (int64_t)gridDim.x * blockDim.x)

/* xg[r] = x[row_tok[r]] (converted to T). */
template <int V, typename T>
__global__ void gather_kernel(T *xg, const float *x, const int *row_tok, int64_t P, int64_t D) {
    int64_t per = D / V;
    GRID_STRIDE(i, P * per) {
        int64_t r = i / per, c = (i % per) * V, t = row_tok[r];
        stv<V>(xg + r * D + c, ldv<V>(x + t * D + c));
    }
}

/* a += b1[e]; hdn = GELU_tanh(a) (both T). */
template <int V, typename T>
__global__ void bias_gelu_kernel(T *a, T *hdn, const float *b1, const int *row_exp, int64_t P,
                                 int64_t He) {
    int64_t per = He / V;
    GRID_STRIDE(i, P * per) {
        int64_t r = i / per, j = (i % per) * V, e = row_exp[r];
        float4 v = addb<V>(ldv<V>(a + r * He + j), b1 + e * He + j);
        stv<V>(a + r * He + j, v);
        /* the GELU sees the stored (possibly rounded) pre-activation, as backward does */
        if (sizeof(T) != sizeof(float)) v = ldv<V>(a + r * He + j);
        stv<V>(hdn + r * He + j, make_float4(d_gelu_tanh(v.x), d_gelu_tanh(v.y),
                                             d_gelu_tanh(v.z), d_gelu_tanh(v.w)));
    }
}

/* o_r += b2[e_r] (the saved expert output), y_t = sum over t's rows, ascending expert,
 * of g_r o_r; a token without rows gets 0. */
template <int V>
__global__ void combine_kernel(float *y, float *o, const float *b2, const int *tok_ptr,
                               const int *tok_row, const int *row_exp, const float *row_gate,
                               int64_t N, int64_t D) {
    int64_t per = D / V;
    GRID_STRIDE(i, N * per) {
        int64_t t = i / per, c = (i % per) * V;
        int j0 = tok_ptr[t], j1 = tok_ptr[t + 1];
        float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (int j = j0; j < j1; j++) {
            int64_t r = tok_row[j];
            float4 v = addb<V>(ldv<V>(o + r * D + c), b2 + (int64_t)row_exp[r] * D + c);
            stv<V>(o + r * D + c, v);
            float g = row_gate[r];
            acc.x += g * v.x; acc.y += g * v.y; acc.z += g * v.z; acc.w += g * v.w;
        }
        stv<V>(y + t * D + c, acc);
    }
}

/* dG[t,e] = <dy_t, o_r> (0 off the mask), do_r = g_r dy_t (T). One block per token, one
 * warp per row of the token: a fixed-order warp reduction. */
#define DG_THREADS 128
template <int V, typename T>
__global__ void dgate_kernel(float *dG, T *dout, const float *dy, const float *o,
                             const int *tok_ptr, const int *tok_row, const int *row_exp,
                             const float *row_gate, int64_t D, int64_t E) {
    int64_t t = blockIdx.x;
    int w = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) dG[t * E + e] = 0.0f;
    __syncthreads();
    int j0 = tok_ptr[t], j1 = tok_ptr[t + 1];
    for (int j = j0 + w; j < j1; j += nw) {
        int64_t r = tok_row[j];
        float g = row_gate[r], acc = 0.0f;
        for (int64_t c = (int64_t)lane * V; c < D; c += 32 * V) {
            float4 d = ldv<V>(dy + t * D + c);
            acc += f4dot(d, ldv<V>(o + r * D + c), V);
            stv<V>(dout + r * D + c, f4scale(d, g));
        }
        for (int s = 16; s; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
        if (lane == 0) dG[t * E + row_exp[r]] = acc;
    }
}

/* d *= GELU_tanh'(a), elementwise over n (both T). */
template <int V, typename T>
__global__ void gelu_grad_kernel(T *d, const T *a, int64_t n) {
    GRID_STRIDE(i, n / V) {
        float4 g = ldv<V>(d + i * V), x = ldv<V>(a + i * V);
        stv<V>(d + i * V, make_float4(g.x * d_gelu_tanh_grad(x.x), g.y * d_gelu_tanh_grad(x.y),
                                      g.z * d_gelu_tanh_grad(x.z), g.w * d_gelu_tanh_grad(x.w)));
    }
}

/* dx_t = sum of t's dxg rows, ascending expert. */
template <int V>
__global__ void token_sum_kernel(float *dx, const float *dxg, const int *tok_ptr,
                                 const int *tok_row, int64_t N, int64_t D) {
    int64_t per = D / V;
    GRID_STRIDE(i, N * per) {
        int64_t t = i / per, c = (i % per) * V;
        int j0 = tok_ptr[t], j1 = tok_ptr[t + 1];
        float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (int j = j0; j < j1; j++) {
            float4 v = ldv<V>(dxg + (int64_t)tok_row[j] * D + c);
            acc.x += v.x; acc.y += v.y; acc.z += v.z; acc.w += v.w;
        }
        stv<V>(dx + t * D + c, acc);
    }
}

static inline int aligned(const void *p, int bytes) { return ((uintptr_t)p % (uintptr_t)bytes) == 0; }

/* ---- per-expert GEMMs ---------------------------------------------------------------- */
/* One operand of an expert product: rows of the dispatch (base + offsets[e]*stride) or the
 * expert's own weight block (base + e*stride); stride in elements of `es` bytes. */
typedef struct {
    const char *base;
    int per_row;
    int64_t stride;
    int es;
} operand_t;

/* Row-major C (M,N) = op(A) (M,K) op(B) (K,N) + beta C for expert e; a size of -1 means
 * "this expert's row count". A and B are of type ab, C of type ct. */
typedef struct {
    int64_t M, N, K;
    int tA, tB;
    operand_t A, B, C;
    int lda, ldb, ldc;
    float beta;
    cudaDataType ab, ct;
} expert_gemm_t;

static cublasComputeType_t compute_of(int prec) {
    if (prec == RD_PREC_TF32) return CUBLAS_COMPUTE_32F_FAST_TF32;
    if (prec == RD_PREC_BF16) return CUBLAS_COMPUTE_32F;
    return rd_cublas_compute();
}

/* The six products, as the CPU's expert_gemm `which`:
 *   0: a = xg W1[e]           1: o = hdn W2[e]           2: dW2[e] += hdn^T do
 *   3: dhid = do W2[e]^T      4: dW1[e] += xg^T da       5: dxg = da W1[e]^T
 * A and B are of the storage type T; C is T for 0 and 3 (a, dhid), fp32 otherwise. */
static expert_gemm_t expert_gemm_of(int which, void *C, const void *A, const void *W,
                                    int64_t D, int64_t He, int prec) {
    int es = prec == RD_PREC_BF16 ? 2 : 4, cs = (which == 0 || which == 3) ? es : 4;
    const char *a = (const char *)A, *w = (const char *)W, *c = (const char *)C;
    int iD = (int)D, iH = (int)He;
    expert_gemm_t g;
    switch (which) {
    case 0: g = {-1, He, D, 0, 0, {a, 1, D, es}, {w, 0, D * He, es}, {c, 1, He, cs}, iD, iH, iH, 0.0f}; break;
    case 1: g = {-1, D, He, 0, 0, {a, 1, He, es}, {w, 0, He * D, es}, {c, 1, D, cs}, iH, iD, iD, 0.0f}; break;
    case 2: g = {He, D, -1, 1, 0, {a, 1, He, es}, {w, 1, D, es}, {c, 0, He * D, cs}, iH, iD, iD, 1.0f}; break;
    case 3: g = {-1, He, D, 0, 1, {a, 1, D, es}, {w, 0, He * D, es}, {c, 1, He, cs}, iD, iD, iH, 0.0f}; break;
    case 4: g = {D, He, -1, 1, 0, {a, 1, D, es}, {w, 1, He, es}, {c, 0, D * He, cs}, iD, iH, iH, 1.0f}; break;
    default: g = {-1, D, He, 0, 1, {a, 1, He, es}, {w, 0, D * He, es}, {c, 1, D, cs}, iH, iH, iD, 0.0f}; break;
    }
    g.ab = es == 2 ? CUDA_R_16BF : CUDA_R_32F;
    g.ct = cs == 2 ? CUDA_R_16BF : CUDA_R_32F;
    return g;
}

static inline int64_t size_of(int64_t v, int64_t n) { return v < 0 ? n : v; }
static inline const char *ptr_of(const operand_t &op, int64_t e, int64_t off) {
    return op.base + (op.per_row ? off * op.stride : e * op.stride) * op.es;
}

/* Type combinations cublasGemmGroupedBatchedEx refused (they then run as the loop):
 * index [A/B is bf16][C is bf16]. */
static int g_grouped_refused[2][2];
#define EX_REFUSED ((rd_status)100) /* internal: not an rd_status the API returns */
static int g_grouped_fallbacks = 0;
extern "C" int rd_cuda_grouped_fallbacks(void) { return g_grouped_fallbacks; }
extern "C" int rd_cuda_grouped_refused_mask(void) {
    int mask = 0;
    for (int ab = 0; ab < 2; ab++)
        for (int c = 0; c < 2; c++)
            if (g_grouped_refused[ab][c]) mask |= 1 << (2 * ab + c);
    return mask;
}

#if CUBLAS_VERSION >= 120500
/* Pointer arrays of the non-empty experts in ascending order (the host's compaction). */
__global__ void grouped_ptrs_kernel(const void **pa, const void **pb, void **pc, operand_t A,
                                    operand_t B, operand_t C, const int *offsets, int64_t E) {
    int64_t j = 0;
    for (int64_t e = 0; e < E; e++) {
        int64_t off = offsets[e];
        if (offsets[e + 1] == off) continue;
        pa[j] = A.base + (A.per_row ? off * A.stride : e * A.stride) * A.es;
        pb[j] = B.base + (B.per_row ? off * B.stride : e * B.stride) * B.es;
        pc[j] = (void *)(C.base + (C.per_row ? off * C.stride : e * C.stride) * C.es);
        j++;
    }
}

/* RD_OK, or EX_REFUSED (no message) when cuBLAS refuses this type combination. */
static rd_status gemms_grouped(rd_experts_cuda *ex, const expert_gemm_t &g) {
    int64_t E = ex->E, ng = 0;
    for (int64_t e = 0; e < E; e++) ng += ex->counts[e] > 0;
    if (ng == 0) return RD_OK;
    cublasHandle_t h;
    RD_TRY(rd_cublas(&h));
    void **pp;
    RD_TRY(DBUF(ex->ptrs, void *, 3 * ng, pp));
    const void **pa = (const void **)pp, **pb = (const void **)pp + ng;
    void **pc = pp + 2 * ng;
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
        h, ov, ov + n, m, nn, k, fv, (const void *const *)pb, g.ab, lda,
        (const void *const *)pa, g.ab, ldb, fv + n, (void *const *)pc, g.ct, ldc,
        (int)ng, gs, compute_of(ex->prec));
    free(iv); free(fv); free(ov);
    if (b == CUBLAS_STATUS_NOT_SUPPORTED || b == CUBLAS_STATUS_INVALID_VALUE) return EX_REFUSED;
    if (b != CUBLAS_STATUS_SUCCESS)
        return rd_fail(RD_ECUDA, "cuBLAS error in cublasGemmGroupedBatchedEx: %s",
                       cublasGetStatusString(b));
    return RD_OK;
}
#endif

static rd_status expert_gemms(rd_experts_cuda *ex, int which, void *C, const void *A,
                              const void *W) {
    expert_gemm_t g = expert_gemm_of(which, C, A, W, ex->D, ex->He, ex->prec);
    int mode = rd_cuda_get_expert_gemm();
#if CUBLAS_VERSION >= 120500
    int ib = g.ab == CUDA_R_16BF, ic = g.ct == CUDA_R_16BF;
    if (mode == 1 && !g_grouped_refused[ib][ic]) {
        rd_status s = gemms_grouped(ex, g);
        if (s != EX_REFUSED) return s;
        g_grouped_refused[ib][ic] = 1; /* this combination runs as the loop from now on */
        g_grouped_fallbacks++;
    }
#endif
    cublasComputeType_t comp = compute_of(ex->prec);
    cublasHandle_t h;
    RD_TRY(rd_cublas(&h));
    int side = mode == 2;
    if (side) RD_TRY(rd_side_fork());
    int64_t used = 0;
    rd_status s = RD_OK;
    for (int64_t e = 0; e < ex->E && s == RD_OK; e++) {
        int64_t off = ex->offsets[e], cnt = ex->counts[e];
        if (!cnt) continue;
        cudaStream_t st;
        if (side) s = rd_side_get((int)(used % RD_SIDE_STREAMS), &st, &h);
        used++;
        if (s == RD_OK)
            s = rd_gemm_typed(h, (void *)ptr_of(g.C, e, off), g.ct, g.ldc, ptr_of(g.A, e, off),
                              g.lda, g.tA, ptr_of(g.B, e, off), g.ldb, g.tB, g.ab,
                              size_of(g.M, cnt), size_of(g.N, cnt), size_of(g.K, cnt), 1.0f,
                              g.beta, comp);
    }
    if (side) {
        rd_status j = rd_side_join(); /* always: RD_STREAM must not run ahead of the side work */
        if (s == RD_OK) s = j;
    }
    return s;
}

/* ---- forward / backward -------------------------------------------------------------- */
/* The P selected rows' buffers hold at most P x max(D, He) floats: that size must fit. */
static rd_status check_rows(const char *fn, int64_t P, int64_t D, int64_t He) {
    int64_t n;
    if (rd_mul_ok(P, D > He ? D : He, &n) && (double)n * sizeof(float) <= RD_MAX_ALLOC_BYTES)
        return RD_OK;
    return rd_fail(RD_ENOMEM, "%s: P=%lld selected rows of width %lld need %.4g MiB, more than "
                   "one allocation can hold", fn, (long long)P, (long long)(D > He ? D : He),
                   (double)P * (double)(D > He ? D : He) * sizeof(float) / 1048576.0);
}

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

/* Launchers of the templated row kernels: T from the precision, V from widths/alignment. */
template <typename T>
static rd_status forward_rows(rd_experts_cuda *ex, float *y, const float *x, const float *b1,
                              const float *b2, const void *W1t, const void *W2t) {
    int64_t P = ex->P, N = ex->N, D = ex->D, He = ex->He;
    T *xg = (T *)ex->xg.p, *a = (T *)ex->a.p, *hdn = (T *)ex->hdn.p;
    float *o = (float *)ex->o.p;
    const int *row_tok = (const int *)ex->row_tok.p, *row_exp = (const int *)ex->row_exp.p;
    int vD = D % 4 == 0 && aligned(x, 16) && aligned(y, 16), vH = He % 4 == 0;
    if (P > 0) {
        if (vD) gather_kernel<4, T><<<rd_grid(P * D / 4, 256), 256, 0, RD_STREAM>>>(xg, x, row_tok, P, D);
        else gather_kernel<1, T><<<rd_grid(P * D, 256), 256, 0, RD_STREAM>>>(xg, x, row_tok, P, D);
        CU_LAUNCHED("gather_kernel");
        RD_TRY(expert_gemms(ex, 0, a, xg, W1t));                   /* a = xg W1[e] */
        if (vH) bias_gelu_kernel<4, T><<<rd_grid(P * He / 4, 256), 256, 0, RD_STREAM>>>(a, hdn, b1, row_exp, P, He);
        else bias_gelu_kernel<1, T><<<rd_grid(P * He, 256), 256, 0, RD_STREAM>>>(a, hdn, b1, row_exp, P, He);
        CU_LAUNCHED("bias_gelu_kernel");
        RD_TRY(expert_gemms(ex, 1, o, hdn, W2t));                  /* o = hdn W2[e] */
    }
    if (N > 0) {
        const int *tok_ptr = (const int *)ex->tok_ptr.p, *tok_row = (const int *)ex->tok_row.p;
        const float *gate = (const float *)ex->row_gate.p;
        if (vD) combine_kernel<4><<<rd_grid(N * D / 4, 256), 256, 0, RD_STREAM>>>(
            y, o, b2, tok_ptr, tok_row, row_exp, gate, N, D);
        else combine_kernel<1><<<rd_grid(N * D, 256), 256, 0, RD_STREAM>>>(
            y, o, b2, tok_ptr, tok_row, row_exp, gate, N, D);
        CU_LAUNCHED("combine_kernel");
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
    int bf = ex->prec == RD_PREC_BF16;
    size_t es = bf ? sizeof(bf16) : sizeof(float);
    const void *W1t = W1, *W2t = W2;
    if (bf) { /* bf16 copies of the fp32 master weights, queued before the dispatch's read-back */
        bf16 *w1h, *w2h;
        RD_TRY(DBUF(ex->w1h, bf16, E * D * He, w1h));
        RD_TRY(DBUF(ex->w2h, bf16, E * He * D, w2h));
        RD_TRY(rd_f32_to_bf16_launch(w1h, W1, E * D * He));
        RD_TRY(rd_f32_to_bf16_launch(w2h, W2, E * He * D));
        W1t = w1h;
        W2t = w2h;
    }
    RD_TRY(dispatch(ex, mask, G, N, E, nan_dev, nan_host));
    int64_t P = ex->P;
    RD_TRY(check_rows("experts_forward_cuda", P, D, He));
    void *xg, *a, *hdn;
    float *o;
    RD_TRY(rd_dbuf_get(&ex->xg, (size_t)(P * D) * es, &xg));
    RD_TRY(rd_dbuf_get(&ex->a, (size_t)(P * He) * es, &a));
    RD_TRY(rd_dbuf_get(&ex->hdn, (size_t)(P * He) * es, &hdn));
    RD_TRY(DBUF(ex->o, float, P * D, o));
    if (bf) RD_TRY(forward_rows<bf16>(ex, y, x, b1, b2, W1t, W2t));
    else RD_TRY(forward_rows<float>(ex, y, x, b1, b2, W1t, W2t));
    ex->valid = 1;
    return RD_OK;
}

extern "C" rd_status rd_experts_forward_cuda(rd_experts_cuda *ex, float *y, const uint8_t *mask,
                                             const float *G, const float *x, const float *W1,
                                             const float *b1, const float *W2, const float *b2,
                                             int64_t N, int64_t D, int64_t E, int64_t He) {
    return rd_experts_forward_impl(ex, y, mask, G, x, W1, b1, W2, b2, N, D, E, He, NULL, NULL);
}

template <typename T>
static rd_status backward_rows(rd_experts_cuda *ex, float *dx, float *dG, float *dW1, float *db1,
                               float *dW2, float *db2, const float *dy, const void *W1t,
                               const void *W2t, float *partial) {
    int64_t P = ex->P, N = ex->N, D = ex->D, E = ex->E, He = ex->He;
    T *dbuf = (T *)ex->dbuf.p, *dhid = (T *)ex->dhid.p;
    float *dxg = (float *)ex->dxg.p;
    const int *tok_ptr = (const int *)ex->tok_ptr.p, *tok_row = (const int *)ex->tok_row.p;
    const int *row_exp = (const int *)ex->row_exp.p, *offsets = (const int *)ex->offsets_d.p;
    const T *xg = (const T *)ex->xg.p, *a = (const T *)ex->a.p, *hdn = (const T *)ex->hdn.p;
    const float *o = (const float *)ex->o.p, *gate = (const float *)ex->row_gate.p;
    int vD = D % 4 == 0 && aligned(dy, 16) && aligned(dx, 16), vH = He % 4 == 0;
    if (N > 0) {
        if (vD) dgate_kernel<4, T><<<(unsigned)N, DG_THREADS, 0, RD_STREAM>>>(
            dG, dbuf, dy, o, tok_ptr, tok_row, row_exp, gate, D, E);
        else dgate_kernel<1, T><<<(unsigned)N, DG_THREADS, 0, RD_STREAM>>>(
            dG, dbuf, dy, o, tok_ptr, tok_row, row_exp, gate, D, E);
        CU_LAUNCHED("dgate_kernel");
    }
    if (P > 0) {
        if (sizeof(T) == sizeof(float))                             /* db2 += sum do */
            RD_TRY(rd_colsum_segments_cuda(db2, (const float *)dbuf, offsets, 0, E, D, partial));
        else
            RD_TRY(rd_colsum_segments_bf16_cuda(db2, (const bf16 *)dbuf, offsets, 0, E, D, partial));
        RD_TRY(expert_gemms(ex, 2, dW2, hdn, dbuf));               /* dW2 += hdn^T do */
        RD_TRY(expert_gemms(ex, 3, dhid, dbuf, W2t));              /* dhdn = do W2^T */
        int64_t n = P * He;                                        /* da = dhdn GELU'(a) */
        if (vH) gelu_grad_kernel<4, T><<<rd_grid(n / 4, 256), 256, 0, RD_STREAM>>>(dhid, a, n);
        else gelu_grad_kernel<1, T><<<rd_grid(n, 256), 256, 0, RD_STREAM>>>(dhid, a, n);
        CU_LAUNCHED("gelu_grad_kernel");
        if (sizeof(T) == sizeof(float))                             /* db1 += sum da */
            RD_TRY(rd_colsum_segments_cuda(db1, (const float *)dhid, offsets, 0, E, He, partial));
        else
            RD_TRY(rd_colsum_segments_bf16_cuda(db1, (const bf16 *)dhid, offsets, 0, E, He, partial));
        RD_TRY(expert_gemms(ex, 4, dW1, xg, dhid));                /* dW1 += xg^T da */
        RD_TRY(expert_gemms(ex, 5, dxg, dhid, W1t));               /* dxg = da W1^T */
    }
    if (N > 0) {
        if (vD) token_sum_kernel<4><<<rd_grid(N * D / 4, 256), 256, 0, RD_STREAM>>>(
            dx, dxg, tok_ptr, tok_row, N, D);
        else token_sum_kernel<1><<<rd_grid(N * D, 256), 256, 0, RD_STREAM>>>(
            dx, dxg, tok_ptr, tok_row, N, D);
        CU_LAUNCHED("token_sum_kernel");
    }
    return RD_OK;
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
    RD_TRY(check_rows("experts_backward_cuda", P, D, He));
    int bf = ex->prec == RD_PREC_BF16;
    size_t es = bf ? sizeof(bf16) : sizeof(float);
    void *dbuf, *dhid;
    float *dxg, *partial;
    RD_TRY(rd_dbuf_get(&ex->dbuf, (size_t)(P * D) * es, &dbuf));
    RD_TRY(rd_dbuf_get(&ex->dhid, (size_t)(P * He) * es, &dhid));
    RD_TRY(DBUF(ex->dxg, float, P * D, dxg));
    int64_t wide = D > He ? D : He;
    RD_TRY(DBUF(ex->partial, float, rd_colsum_scratch(E, wide), partial));
    if (bf) /* the forward's bf16 weight copies (W1, W2 are those same weights) */
        return backward_rows<bf16>(ex, dx, dG, dW1, db1, dW2, db2, dy, ex->w1h.p, ex->w2h.p, partial);
    return backward_rows<float>(ex, dx, dG, dW1, db1, dW2, db2, dy, W1, W2, partial);
}
