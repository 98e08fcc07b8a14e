/* route.cu — the six selection strategies of docs/method.md §2 on the device, with the CPU's
 * exact semantics (csrc/cpu/route.c): exactly K per group, ties to the lower flat index, the
 * same groups walked in ascending flat order, NaN -> RD_EINVAL, tau_b = mean over groups of
 * each group's K-th largest score (+inf when K = 0).
 *
 * Two paths, chosen by the group size n:
 *  - n <= 256 (token choice, expert choice at DiT sizes): one warp per group ranks every
 *    element against the others from shared memory (rank = #greater + #equal before it)
 *    and keeps rank < K. No workspace, one launch.
 *  - larger groups (bl, be, le, race up to ~2e6 scores in one group): a radix select on
 *    the order-preserving uint32 key, 4 passes of 8-bit digits from the top. Each pass is
 *    a histogram over chunks of 4096 elements (shared-memory counts, merged into the
 *    group's global histogram with integer atomics, so the counts are exact) and a pick
 *    kernel (one block per group scans the 256 bins from the top) that fixes one more
 *    digit of T, the K-th largest key, and how many keys equal to T are still needed.
 *    Then each chunk counts its keys equal to T, and the mark kernel selects key > T and
 *    the first `need` keys equal to T in group order (block ballots rank the ties; the
 *    chunks before contribute their counts), which is the CPU's lower-index tie-break.
 * All state (digits, counts, thresholds) stays on the device between kernels: routing
 * needs no host round trip. The only read-back is the NaN flag in the public entry
 * points; the MoE layer defers it to the one read-back it makes anyway (experts). */
#include <math.h>

#include "common.cuh"
#include "internal.cuh"

#define RT_THREADS 256
#define RT_CHUNK 4096        /* elements per histogram block */
#define RT_SMALL 256         /* largest group ranked by the warp path */

/* One group: elements off + i1*s1 + i2*s2, i1 < n1, i2 < n2, walked in ascending flat
 * index (exactly the CPU's group_of). */
typedef struct {
    int64_t off, n1, s1, n2, s2;
} group_t;

typedef struct {
    int s;              /* rd_strategy */
    int64_t B, L, E;
    int64_t n, K, ng;   /* group size, selected per group, number of groups */
    int64_t chunks;     /* histogram chunks per group */
} plan_t;

__device__ __forceinline__ group_t group_of(const plan_t &p, int64_t g) {
    group_t G = {0, 1, 0, 1, 1};
    switch (p.s) {
    case RD_ROUTE_TOKEN:  G.off = g * p.E; G.n2 = p.E; break;
    case RD_ROUTE_EXPERT: G.off = (g / p.E) * p.L * p.E + g % p.E; G.n2 = p.L; G.s2 = p.E; break;
    case RD_ROUTE_BL:     G.off = g; G.n2 = p.B * p.L; G.s2 = p.E; break;
    case RD_ROUTE_BE:     G.off = g * p.E; G.n1 = p.B; G.s1 = p.L * p.E; G.n2 = p.E; break;
    case RD_ROUTE_LE:     G.off = g * p.L * p.E; G.n2 = p.L * p.E; break;
    default:              G.n2 = p.B * p.L * p.E; break;
    }
    return G;
}

__device__ __forceinline__ int64_t group_at(const group_t &G, int64_t j) {
    return G.off + (j / G.n2) * G.s1 + (j % G.n2) * G.s2;
}

/* first[0] = min flat index holding NaN (left at ~0 when none). */
__global__ void nan_scan_kernel(unsigned long long *first, const float *x, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        if (isnan(x[i])) atomicMin(first, (unsigned long long)i);
}

rd_status rd_nan_scan_launch(unsigned long long *first, const float *x, int64_t n) {
    if (n <= 0) return RD_OK;
    int64_t blocks = rd_blocks(n, RT_THREADS * 8);
    if (blocks > 4096) blocks = 4096;
    nan_scan_kernel<<<(unsigned)blocks, RT_THREADS, 0, RD_STREAM>>>(first, x, n);
    CU_LAUNCHED("nan_scan_kernel");
    return RD_OK;
}

/* ---- small groups: a warp ranks its group ------------------------------------------ */
__global__ void rank_small_kernel(uint8_t *mask, float *kth, const float *scores, plan_t p) {
    __shared__ uint32_t keys[RT_THREADS / 32][RT_SMALL];
    int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    int64_t g = (int64_t)blockIdx.x * (RT_THREADS / 32) + w;
    if (g >= p.ng) return; /* whole warps leave together: no later block-wide sync */
    group_t G = group_of(p, g);
    int n = (int)p.n;
    for (int j = lane; j < n; j += 32) keys[w][j] = d_f2key(scores[group_at(G, j)]);
    __syncwarp();
    for (int j = lane; j < n; j += 32) {
        uint32_t kj = keys[w][j];
        int rank = 0;
        for (int i = 0; i < n; i++) {
            uint32_t ki = keys[w][i];
            rank += ki > kj || (ki == kj && i < j);
        }
        mask[group_at(G, j)] = rank < p.K;
        if (rank == p.K - 1) kth[g] = d_key2f(kj);
    }
}

/* ---- radix select ------------------------------------------------------------------ */
typedef struct {
    uint32_t prefix; /* digits of T fixed so far */
    int need;        /* keys equal to the prefix still to take */
    int pad;
} sel_t;

__global__ void sel_init_kernel(sel_t *sel, int64_t ng, int K) {
    int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (g < ng) { sel[g].prefix = 0; sel[g].need = K; sel[g].pad = 0; }
}

/* Histogram of digit `pass` over the keys of one chunk that match the digits fixed so far. */
__global__ void hist_kernel(int *hist, const sel_t *sel, const float *scores, plan_t p, int pass) {
    __shared__ int sh[256];
    int64_t g = blockIdx.x / p.chunks, c = blockIdx.x % p.chunks;
    sh[threadIdx.x] = 0;
    __syncthreads();
    group_t G = group_of(p, g);
    int shift = 24 - 8 * pass;
    uint32_t high = pass ? sel[g].prefix >> (shift + 8) : 0;
    int64_t lo = c * RT_CHUNK, hi = min(p.n, lo + RT_CHUNK);
    for (int64_t j = lo + threadIdx.x; j < hi; j += RT_THREADS) {
        uint32_t key = d_f2key(scores[group_at(G, j)]);
        if (pass == 0 || (key >> (shift + 8)) == high) atomicAdd(&sh[(key >> shift) & 255u], 1);
    }
    __syncthreads();
    if (sh[threadIdx.x]) atomicAdd(&hist[g * 256 + threadIdx.x], sh[threadIdx.x]);
}

/* One block per group: bins from the top; the bin where the running count reaches
 * `need` is the next digit of T. */
__global__ void pick_kernel(sel_t *sel, float *kth, const int *hist, plan_t p, int pass) {
    __shared__ int cum[256];
    int64_t g = blockIdx.x;
    int t = threadIdx.x, shift = 24 - 8 * pass;
    int c = hist[g * 256 + 255 - t];
    int need = sel[g].need;
    uint32_t prefix = sel[g].prefix;
    cum[t] = c;
    __syncthreads();
    for (int off = 1; off < 256; off <<= 1) { /* inclusive scan (Hillis-Steele) */
        int v = t >= off ? cum[t - off] : 0;
        __syncthreads();
        cum[t] += v;
        __syncthreads();
    }
    int incl = cum[t], excl = incl - c;
    if (incl >= need && excl < need) {
        uint32_t T = prefix | ((uint32_t)(255 - t) << shift);
        sel[g].prefix = T;
        sel[g].need = need - excl;
        if (pass == 3) kth[g] = d_key2f(T);
    }
}

/* Block-wide sum of one int per thread (RT_THREADS threads). */
__device__ int block_sum(int v, int *scratch /* RT_THREADS/32 */) {
    for (int o = 16; o; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    int t = 0;
    for (int w = 0; w < RT_THREADS / 32; w++) t += scratch[w];
    __syncthreads();
    return t;
}

__global__ void eqcount_kernel(int *chunk_eq, const sel_t *sel, const float *scores, plan_t p) {
    __shared__ int scratch[RT_THREADS / 32];
    int64_t g = blockIdx.x / p.chunks, c = blockIdx.x % p.chunks;
    group_t G = group_of(p, g);
    uint32_t T = sel[g].prefix;
    int64_t lo = c * RT_CHUNK, hi = min(p.n, lo + RT_CHUNK);
    int cnt = 0;
    for (int64_t j = lo + threadIdx.x; j < hi; j += RT_THREADS)
        cnt += d_f2key(scores[group_at(G, j)]) == T;
    cnt = block_sum(cnt, scratch);
    if (threadIdx.x == 0) chunk_eq[blockIdx.x] = cnt;
}

__global__ void mark_kernel(uint8_t *mask, const sel_t *sel, const int *chunk_eq,
                            const float *scores, plan_t p) {
    __shared__ int scratch[RT_THREADS / 32];
    __shared__ int wcnt[RT_THREADS / 32];
    int64_t g = blockIdx.x / p.chunks, c = blockIdx.x % p.chunks;
    group_t G = group_of(p, g);
    uint32_t T = sel[g].prefix;
    int need = sel[g].need;
    int before = 0; /* keys equal to T in the chunks before this one */
    for (int64_t i = threadIdx.x; i < c; i += RT_THREADS) before += chunk_eq[g * p.chunks + i];
    before = block_sum(before, scratch);
    int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    unsigned lt = (1u << lane) - 1u;
    int64_t lo = c * RT_CHUNK, hi = min(p.n, lo + RT_CHUNK);
    for (int64_t base = lo; base < hi; base += RT_THREADS) { /* uniform trip count */
        int64_t j = base + threadIdx.x;
        bool valid = j < hi;
        int64_t idx = valid ? group_at(G, j) : 0;
        uint32_t key = valid ? d_f2key(scores[idx]) : 0;
        bool eq = valid && key == T;
        unsigned b = __ballot_sync(0xffffffffu, eq);
        if (lane == 0) wcnt[w] = __popc(b);
        __syncthreads();
        int rank = before + __popc(b & lt), tile = 0;
        for (int u = 0; u < RT_THREADS / 32; u++) {
            rank += u < w ? wcnt[u] : 0;
            tile += wcnt[u];
        }
        if (valid) mask[idx] = key > T || (eq && rank < need);
        before += tile;
        __syncthreads();
    }
}

/* tau_b = mean of kth over groups, summed in double. Few groups: one thread in group
 * order, the CPU's own sum. Many groups (token / expert choice): a fixed-order tree over
 * contiguous slices — deterministic, and equal to the CPU's up to the double rounding. */
__global__ void tau_mean_kernel(float *tau_b, const float *kth, int64_t ng) {
    __shared__ double part[RT_THREADS];
    if (ng <= 1024) {
        if (threadIdx.x == 0) {
            double s = 0.0;
            for (int64_t g = 0; g < ng; g++) s += kth[g];
            *tau_b = (float)(s / (double)ng);
        }
        return;
    }
    int64_t lo = ng * threadIdx.x / RT_THREADS, hi = ng * (threadIdx.x + 1) / RT_THREADS;
    double s = 0.0;
    for (int64_t g = lo; g < hi; g++) s += kth[g];
    part[threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int u = 0; u < RT_THREADS; u++) t += part[u];
        *tau_b = (float)(t / (double)ng);
    }
}

__global__ void fill_float_kernel(float *p, int64_t n, float v) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = v;
}

void rd_route_ws_free(rd_route_ws *ws) {
    rd_dbuf_free(&ws->hist);
    rd_dbuf_free(&ws->sel);
    rd_dbuf_free(&ws->chunk_eq);
    rd_dbuf_free(&ws->kth);
}

rd_status rd_route_launch(rd_route_ws *ws, uint8_t *mask, float *tau_b, const float *scores,
                          int64_t B, int64_t L, int64_t E, int64_t k, rd_strategy s,
                          unsigned long long *nan_first) {
    int64_t ng, K;
    RD_TRY(rd_route_plan(&ng, &K, B, L, E, k, s));
    int64_t total = B * L * E;
    if (total > INT32_MAX)
        return rd_fail(RD_EINVAL, "route_cuda: B*L*E = %lld exceeds %d", (long long)total, INT32_MAX);
    RD_TRY(rd_nan_scan_launch(nan_first, scores, total));
    if (K == 0) { /* nothing selected: every group's K-th value and tau_b are +inf */
        float *kth;
        RD_TRY(DBUF(ws->kth, float, ng, kth));
        CU_TRY(cudaMemsetAsync(mask, 0, (size_t)total, RD_STREAM));
        fill_float_kernel<<<rd_blocks(ng, RT_THREADS), RT_THREADS, 0, RD_STREAM>>>(kth, ng, INFINITY);
        CU_LAUNCHED("fill_float_kernel");
        if (tau_b) {
            fill_float_kernel<<<1, 1, 0, RD_STREAM>>>(tau_b, 1, INFINITY);
            CU_LAUNCHED("fill_float_kernel");
        }
        return RD_OK;
    }
    plan_t p;
    p.s = (int)s; p.B = B; p.L = L; p.E = E;
    p.n = total / ng; p.K = K; p.ng = ng;
    p.chunks = (p.n + RT_CHUNK - 1) / RT_CHUNK;
    float *kth;
    RD_TRY(DBUF(ws->kth, float, ng, kth));
    if (p.n <= RT_SMALL) {
        rank_small_kernel<<<rd_blocks(ng, RT_THREADS / 32), RT_THREADS, 0, RD_STREAM>>>(mask, kth,
                                                                                      scores, p);
        CU_LAUNCHED("rank_small_kernel");
    } else {
        int *hist, *chunk_eq;
        sel_t *sel;
        RD_TRY(DBUF(ws->hist, int, ng * 256, hist));
        RD_TRY(DBUF(ws->sel, sel_t, ng, sel));
        RD_TRY(DBUF(ws->chunk_eq, int, ng * p.chunks, chunk_eq));
        sel_init_kernel<<<rd_blocks(ng, RT_THREADS), RT_THREADS, 0, RD_STREAM>>>(sel, ng, (int)K);
        CU_LAUNCHED("sel_init_kernel");
        unsigned nb = (unsigned)(ng * p.chunks);
        for (int pass = 0; pass < 4; pass++) {
            CU_TRY(cudaMemsetAsync(hist, 0, (size_t)ng * 256 * sizeof(int), RD_STREAM));
            hist_kernel<<<nb, RT_THREADS, 0, RD_STREAM>>>(hist, sel, scores, p, pass);
            CU_LAUNCHED("hist_kernel");
            pick_kernel<<<(unsigned)ng, 256, 0, RD_STREAM>>>(sel, kth, hist, p, pass);
            CU_LAUNCHED("pick_kernel");
        }
        eqcount_kernel<<<nb, RT_THREADS, 0, RD_STREAM>>>(chunk_eq, sel, scores, p);
        CU_LAUNCHED("eqcount_kernel");
        mark_kernel<<<nb, RT_THREADS, 0, RD_STREAM>>>(mask, sel, chunk_eq, scores, p);
        CU_LAUNCHED("mark_kernel");
    }
    if (tau_b) {
        tau_mean_kernel<<<1, RT_THREADS, 0, RD_STREAM>>>(tau_b, kth, ng);
        CU_LAUNCHED("tau_mean_kernel");
    }
    return RD_OK;
}

rd_status rd_nan_check(const unsigned long long *first_dev, const char *op) {
    unsigned long long first = 0;
    CU_TRY(cudaMemcpy(&first, first_dev, sizeof first, cudaMemcpyDeviceToHost));
    if (first != ~0ULL)
        return rd_fail(RD_EINVAL, "%s: scores contains NaN at flat index %llu", op, first);
    return RD_OK;
}

extern "C" rd_status rd_route_cuda(uint8_t *mask, float *tau_b, const float *scores,
                                   int64_t B, int64_t L, int64_t E, int64_t k, rd_strategy s) {
    int64_t ng, K;
    RD_TRY(rd_route_plan(&ng, &K, B, L, E, k, s)); /* argument errors before any CUDA call */
    rd_route_ws ws = {};
    rd_dbuf nanb = {};
    unsigned long long *first;
    rd_status st = DBUF(nanb, unsigned long long, 1, first);
    if (st == RD_OK) st = rd_cuda_memset(first, 0xff, sizeof *first);
    if (st == RD_OK) st = rd_route_launch(&ws, mask, tau_b, scores, B, L, E, k, s, first);
    if (st == RD_OK) st = rd_nan_check(first, "route");
    rd_route_ws_free(&ws);
    rd_dbuf_free(&nanb);
    return st;
}

__global__ void threshold_kernel(uint8_t *mask, const float *scores, int64_t n, const float *tau_dev,
                                 float tau) {
    float t = tau_dev ? *tau_dev : tau;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        mask[i] = scores[i] >= t;
}

rd_status rd_route_threshold_launch(uint8_t *mask, const float *scores, int64_t n,
                                    const float *tau_dev, float tau,
                                    unsigned long long *nan_first) {
    if (n <= 0) return RD_OK;
    RD_TRY(rd_nan_scan_launch(nan_first, scores, n));
    int64_t blocks = rd_blocks(n, RT_THREADS * 4);
    if (blocks > 65535) blocks = 65535;
    threshold_kernel<<<(unsigned)blocks, RT_THREADS, 0, RD_STREAM>>>(mask, scores, n, tau_dev, tau);
    CU_LAUNCHED("threshold_kernel");
    return RD_OK;
}

/* mode 0: one threshold (race), 1: per expert (BL), 2: per position (BE). */
__global__ void thresholds_kernel(uint8_t *mask, const float *scores, const float *taus,
                                  int64_t L, int64_t E, int64_t n, int mode) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t g = mode == 1 ? i % E : (mode == 2 ? (i / E) % L : 0);
        mask[i] = scores[i] >= taus[g];
    }
}

rd_status rd_route_thresholds_launch(uint8_t *mask, const float *scores, const float *taus,
                                     int64_t B, int64_t L, int64_t E, rd_strategy s,
                                     unsigned long long *nan_first) {
    if (rd_route_num_thresholds(s, L, E) == 0)
        return rd_fail(RD_EINVAL, "route_thresholds_cuda: strategy '%s' has no thresholds",
                       rd_strategy_name(s));
    int64_t n = B * L * E;
    if (n <= 0) return RD_OK;
    RD_TRY(rd_nan_scan_launch(nan_first, scores, n));
    int64_t blocks = rd_blocks(n, RT_THREADS * 4);
    if (blocks > 65535) blocks = 65535;
    int mode = s == RD_ROUTE_BL ? 1 : (s == RD_ROUTE_BE ? 2 : 0);
    thresholds_kernel<<<(unsigned)blocks, RT_THREADS, 0, RD_STREAM>>>(mask, scores, taus, L, E,
                                                                      n, mode);
    CU_LAUNCHED("thresholds_kernel");
    return RD_OK;
}

/* counts[r] <- the nonzero bytes of row r of mask (rows, cols): one block per row. */
__global__ void row_counts_kernel(unsigned long long *counts, const uint8_t *mask, int64_t cols) {
    __shared__ int scratch[RT_THREADS / 32];
    const uint8_t *row = mask + (int64_t)blockIdx.x * cols;
    int c = 0;
    for (int64_t j = threadIdx.x; j < cols; j += RT_THREADS) c += row[j] != 0;
    c = block_sum(c, scratch);
    if (threadIdx.x == 0) counts[blockIdx.x] = (unsigned long long)c;
}

extern "C" rd_status rd_mask_row_counts_cuda(int64_t *counts, const uint8_t *mask, int64_t rows,
                                             int64_t cols) {
    if (rows < 0 || cols < 0 || rows > INT32_MAX || cols > INT32_MAX)
        return rd_fail(RD_EINVAL, "mask_row_counts_cuda: size %lld x %lld out of range",
                       (long long)rows, (long long)cols);
    if (rows == 0) return RD_OK;
    rd_dbuf b = {};
    unsigned long long *d;
    rd_status st = DBUF(b, unsigned long long, rows, d);
    if (st == RD_OK) {
        row_counts_kernel<<<(unsigned)rows, RT_THREADS, 0, RD_STREAM>>>(d, mask, cols);
        cudaError_t e = cudaGetLastError();
        if (e == cudaSuccess)
            e = cudaMemcpyAsync(counts, d, (size_t)rows * sizeof *d, cudaMemcpyDeviceToHost,
                                RD_STREAM);
        if (e == cudaSuccess) e = cudaStreamSynchronize(RD_STREAM);
        if (e != cudaSuccess)
            st = rd_fail(RD_ECUDA, "mask_row_counts_cuda: %s", cudaGetErrorString(e));
    }
    rd_dbuf_free(&b);
    return st;
}

extern "C" rd_status rd_route_threshold_cuda(uint8_t *mask, const float *scores, int64_t n,
                                             float tau) {
    if (isnan(tau)) return rd_fail(RD_EINVAL, "route_threshold: tau must not be NaN");
    if (n < 0) return rd_fail(RD_EINVAL, "route_threshold: negative size n=%lld", (long long)n);
    if (n == 0) return RD_OK;
    rd_dbuf nanb = {};
    unsigned long long *first;
    rd_status st = DBUF(nanb, unsigned long long, 1, first);
    if (st == RD_OK) st = rd_cuda_memset(first, 0xff, sizeof *first);
    if (st == RD_OK) st = rd_route_threshold_launch(mask, scores, n, NULL, tau, first);
    if (st == RD_OK) st = rd_nan_check(first, "route_threshold");
    rd_dbuf_free(&nanb);
    return st;
}
