/* common.cu — the CUDA backend's shared pieces: the cuBLAS handle and math knobs, device
 * memory functions, the row-major GEMM on cuBLAS, and the deterministic segmented column
 * sum used for every bias gradient. */
#include <mutex>

#include "common.cuh"

static cublasHandle_t g_cublas = NULL;
static std::mutex g_cublas_mu;
static int g_tf32 = 0;
static int g_expert_gemm = 0;

rd_status rd_cublas(cublasHandle_t *h) {
    std::lock_guard<std::mutex> lock(g_cublas_mu);
    if (!g_cublas) {
        int n = 0;
        if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
            cudaGetLastError();
            return rd_fail(RD_ECUDA, "CUDA not available: no CUDA device or driver");
        }
        CB_TRY(cublasCreate(&g_cublas));
        cublasStatus_t b = cublasSetStream(g_cublas, RD_STREAM);
        if (b == CUBLAS_STATUS_SUCCESS) b = cublasSetPointerMode(g_cublas, CUBLAS_POINTER_MODE_HOST);
        if (b != CUBLAS_STATUS_SUCCESS) {
            cublasDestroy(g_cublas);
            g_cublas = NULL;
            return rd_fail(RD_ECUDA, "cuBLAS handle setup failed: %s", cublasGetStatusString(b));
        }
    }
    *h = g_cublas;
    return RD_OK;
}

cublasComputeType_t rd_cublas_compute(void) {
    return g_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
}

extern "C" void rd_cuda_set_tf32(int on) { g_tf32 = on ? 1 : 0; }
extern "C" int rd_cuda_get_tf32(void) { return g_tf32; }
extern "C" void rd_cuda_set_expert_gemm(int mode) {
    if (mode == 1 && !rd_cuda_have_grouped_gemm()) mode = 0;
    g_expert_gemm = (mode == 1 || mode == 2) ? mode : 0;
}
extern "C" int rd_cuda_get_expert_gemm(void) { return g_expert_gemm; }
extern "C" int rd_cuda_cublas_version(void) { return CUBLAS_VERSION; }
extern "C" int rd_cuda_have_grouped_gemm(void) {
#if CUBLAS_VERSION >= 120500
    return 1;
#else
    return 0;
#endif
}

/* ---- memory ---------------------------------------------------------------------- */
extern "C" rd_status rd_cuda_malloc(void **p, size_t bytes) {
    *p = NULL;
    if (bytes == 0) return RD_OK;
    cudaError_t e = cudaMalloc(p, bytes);
    if (e == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        *p = NULL;
        return rd_fail(RD_ENOMEM, "CUDA: out of device memory allocating %zu bytes", bytes);
    }
    if (e != cudaSuccess) {
        cudaGetLastError();
        *p = NULL;
        return rd_fail(RD_ECUDA, "CUDA error in cudaMalloc(%zu bytes): %s", bytes,
                       cudaGetErrorString(e));
    }
    return RD_OK;
}

extern "C" void rd_cuda_free(void *p) {
    if (p) cudaFree(p);
}

extern "C" rd_status rd_cuda_h2d(void *dst, const void *src, size_t bytes) {
    if (bytes) CU_TRY(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
    return RD_OK;
}

extern "C" rd_status rd_cuda_d2h(void *dst, const void *src, size_t bytes) {
    if (bytes) CU_TRY(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
    return RD_OK;
}

extern "C" rd_status rd_cuda_memset(void *p, int byte, size_t bytes) {
    if (bytes) CU_TRY(cudaMemsetAsync(p, byte, bytes, RD_STREAM));
    return RD_OK;
}

extern "C" rd_status rd_cuda_sync(void) {
    CU_TRY(cudaStreamSynchronize(RD_STREAM));
    CU_TRY(cudaGetLastError());
    return RD_OK;
}

rd_status rd_dbuf_get(rd_dbuf *b, size_t bytes, void **out) {
    if (bytes == 0) bytes = 16;
    if (bytes > b->cap) {
        /* the old contents may still be read by queued work: free only after it ran */
        if (b->p) {
            CU_TRY(cudaStreamSynchronize(RD_STREAM));
            cudaFree(b->p);
            b->p = NULL;
            b->cap = 0;
        }
        size_t want = bytes + bytes / 4; /* headroom: fewer regrowths as P varies */
        RD_TRY(rd_cuda_malloc(&b->p, want));
        b->cap = want;
    }
    *out = b->p;
    return RD_OK;
}

/* Stream-ordered allocation where the device has memory pools; plain cudaMalloc (and a
 * synchronising free) where it does not. */
static int g_no_pools = 0;

rd_status rd_scratch_alloc(void **p, size_t bytes) {
    *p = NULL;
    if (bytes == 0) bytes = 16;
    if (!g_no_pools) {
        cudaError_t e = cudaMallocAsync(p, bytes, RD_STREAM);
        if (e == cudaSuccess) return RD_OK;
        cudaGetLastError();
        *p = NULL;
        if (e != cudaErrorNotSupported)
            return rd_fail(e == cudaErrorMemoryAllocation ? RD_ENOMEM : RD_ECUDA,
                           "CUDA: cannot allocate %zu bytes of scratch: %s", bytes, cudaGetErrorString(e));
        g_no_pools = 1;
    }
    return rd_cuda_malloc(p, bytes);
}

void rd_scratch_free(void *p) {
    if (!p) return;
    if (g_no_pools) cudaFree(p);
    else cudaFreeAsync(p, RD_STREAM);
}

void rd_dbuf_free(rd_dbuf *b) {
    if (b->p) cudaFree(b->p);
    b->p = NULL;
    b->cap = 0;
}

/* ---- side streams ----------------------------------------------------------------- */
static cudaStream_t g_side[RD_SIDE_STREAMS];
static cublasHandle_t g_side_h[RD_SIDE_STREAMS];
static cudaEvent_t g_fork, g_join[RD_SIDE_STREAMS];
static int g_side_ready = 0;

static rd_status side_init(void) {
    std::lock_guard<std::mutex> lock(g_cublas_mu);
    if (g_side_ready) return RD_OK;
    CU_TRY(cudaEventCreateWithFlags(&g_fork, cudaEventDisableTiming));
    for (int i = 0; i < RD_SIDE_STREAMS; i++) {
        CU_TRY(cudaStreamCreateWithFlags(&g_side[i], cudaStreamNonBlocking));
        CU_TRY(cudaEventCreateWithFlags(&g_join[i], cudaEventDisableTiming));
        CB_TRY(cublasCreate(&g_side_h[i]));
        CB_TRY(cublasSetStream(g_side_h[i], g_side[i]));
        CB_TRY(cublasSetPointerMode(g_side_h[i], CUBLAS_POINTER_MODE_HOST));
    }
    g_side_ready = 1;
    return RD_OK;
}

rd_status rd_side_get(int i, cudaStream_t *s, cublasHandle_t *h) {
    RD_TRY(side_init());
    i %= RD_SIDE_STREAMS;
    *s = g_side[i];
    *h = g_side_h[i];
    return RD_OK;
}

rd_status rd_side_fork(void) {
    RD_TRY(side_init());
    CU_TRY(cudaEventRecord(g_fork, RD_STREAM));
    for (int i = 0; i < RD_SIDE_STREAMS; i++) CU_TRY(cudaStreamWaitEvent(g_side[i], g_fork, 0));
    return RD_OK;
}

rd_status rd_side_join(void) {
    RD_TRY(side_init());
    for (int i = 0; i < RD_SIDE_STREAMS; i++) {
        CU_TRY(cudaEventRecord(g_join[i], g_side[i]));
        CU_TRY(cudaStreamWaitEvent(RD_STREAM, g_join[i], 0));
    }
    return RD_OK;
}

__global__ void f32_to_bf16_kernel(bf16 *dst, const float *src, int64_t n, int vec) {
    int64_t n4 = vec ? n / 4 : 0, stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += stride)
        st4(dst + 4 * i, ld4(src + 4 * i));
    for (int64_t i = 4 * n4 + (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dst[i] = __float2bfloat16_rn(src[i]);
}

rd_status rd_f32_to_bf16_launch(bf16 *dst, const float *src, int64_t n) {
    if (n <= 0) return RD_OK;
    int vec = ((uintptr_t)dst % 8) == 0 && ((uintptr_t)src % 16) == 0;
    f32_to_bf16_kernel<<<rd_grid(vec ? n / 4 + 1 : n, 256), 256, 0, RD_STREAM>>>(dst, src, n, vec);
    CU_LAUNCHED("f32_to_bf16_kernel");
    return RD_OK;
}

/* ---- GEMM ------------------------------------------------------------------------- */
rd_status rd_gemm_typed(cublasHandle_t h, void *C, cudaDataType ct, int ldc, const void *A,
                        int lda, int transA, const void *B, int ldb, int transB, cudaDataType ab,
                        int64_t M, int64_t N, int64_t K, float alpha, float beta,
                        cublasComputeType_t comp) {
    if (M < 0 || N < 0 || K < 0) return rd_fail(RD_EINVAL, "gemm_cuda: negative size");
    if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX)
        return rd_fail(RD_EINVAL, "gemm_cuda: size %lld x %lld x %lld exceeds 32-bit cuBLAS",
                       (long long)M, (long long)N, (long long)K);
    if (M == 0 || N == 0) return RD_OK;
    CB_TRY(cublasGemmEx(h, transB ? CUBLAS_OP_T : CUBLAS_OP_N, transA ? CUBLAS_OP_T : CUBLAS_OP_N,
                        (int)N, (int)M, (int)K, &alpha, B, ab, ldb > 0 ? ldb : 1, A, ab,
                        lda > 0 ? lda : 1, &beta, C, ct, ldc > 0 ? ldc : 1, comp,
                        CUBLAS_GEMM_DEFAULT));
    return RD_OK;
}

/* Row-major C = alpha op(A) op(B) + beta C is the column-major C^T = op(B)^T op(A)^T:
 * the row-major buffers are already those transposes, so nothing moves. */
extern "C" rd_status rd_matmul_cuda(float *C, int ldc, const float *A, int lda, int transA,
                                    const float *B, int ldb, int transB,
                                    int64_t M, int64_t N, int64_t K, float alpha, float beta) {
    if (M < 0 || N < 0 || K < 0) return rd_fail(RD_EINVAL, "matmul_cuda: negative size");
    if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX)
        return rd_fail(RD_EINVAL, "matmul_cuda: size %lld x %lld x %lld exceeds 32-bit cuBLAS",
                       (long long)M, (long long)N, (long long)K);
    if (M == 0 || N == 0) return RD_OK;
    cublasHandle_t h;
    RD_TRY(rd_cublas(&h));
    /* K == 0 is C = beta C in cuBLAS as in BLAS: well defined, so passed on */
    CB_TRY(cublasGemmEx(h, transB ? CUBLAS_OP_T : CUBLAS_OP_N, transA ? CUBLAS_OP_T : CUBLAS_OP_N,
                        (int)N, (int)M, (int)K, &alpha, B, CUDA_R_32F, ldb > 0 ? ldb : 1, A,
                        CUDA_R_32F, lda > 0 ? lda : 1, &beta, C, CUDA_R_32F, ldc > 0 ? ldc : 1,
                        rd_cublas_compute(), CUBLAS_GEMM_DEFAULT));
    return RD_OK;
}

/* ---- segmented column sums -------------------------------------------------------- */
#define CS_COLS 32   /* columns per block (one warp wide) */
#define CS_LANES 8   /* row lanes per block */
#define CS_CHUNKS 16 /* row chunks per segment: partial sums, then summed in chunk order */

/* partial[(s*CS_CHUNKS + ch), c] = sum of in[r,c] over chunk ch of segment s. */
template <typename T>
__global__ void colsum_partial_kernel(float *partial, const T *in, const int *offsets,
                                      int64_t rows, int64_t cols) {
    __shared__ float acc[CS_LANES][CS_COLS];
    int s = blockIdx.y, ch = blockIdx.z;
    int64_t c = (int64_t)blockIdx.x * CS_COLS + threadIdx.x;
    int64_t lo = offsets ? offsets[s] : 0, n = offsets ? offsets[s + 1] - lo : rows;
    int64_t r0 = lo + n * ch / CS_CHUNKS, r1 = lo + n * (ch + 1) / CS_CHUNKS;
    float a = 0.0f;
    if (c < cols)
        for (int64_t r = r0 + threadIdx.y; r < r1; r += CS_LANES) a += ld1(in + r * cols + c);
    acc[threadIdx.y][threadIdx.x] = a;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float t = 0.0f;
        for (int l = 0; l < CS_LANES; l++) t += acc[l][threadIdx.x];
        partial[((int64_t)s * CS_CHUNKS + ch) * cols + c] = t;
    }
}

__global__ void colsum_finish_kernel(float *out, const float *partial, int64_t S, int64_t cols) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= S * cols) return;
    int64_t s = i / cols, c = i % cols;
    float t = 0.0f;
    for (int ch = 0; ch < CS_CHUNKS; ch++) t += partial[(s * CS_CHUNKS + ch) * cols + c];
    out[i] += t;
}

int64_t rd_colsum_scratch(int64_t S, int64_t cols) { return S * CS_CHUNKS * cols; }

template <typename T>
static rd_status colsum_segments(float *out, const T *in, const int *offsets, int64_t rows,
                                 int64_t S, int64_t cols, float *partial) {
    if (S <= 0 || cols <= 0) return RD_OK;
    if (S > 65535) return rd_fail(RD_EINVAL, "colsum_segments_cuda: %lld segments > 65535", (long long)S);
    dim3 grid(rd_blocks(cols, CS_COLS), (unsigned)S, CS_CHUNKS), block(CS_COLS, CS_LANES);
    colsum_partial_kernel<T><<<grid, block, 0, RD_STREAM>>>(partial, in, offsets, rows, cols);
    CU_LAUNCHED("colsum_partial_kernel");
    colsum_finish_kernel<<<rd_blocks(S * cols, 256), 256, 0, RD_STREAM>>>(out, partial, S, cols);
    CU_LAUNCHED("colsum_finish_kernel");
    return RD_OK;
}

rd_status rd_colsum_segments_cuda(float *out, const float *in, const int *offsets, int64_t rows,
                                  int64_t S, int64_t cols, float *partial) {
    return colsum_segments<float>(out, in, offsets, rows, S, cols, partial);
}

rd_status rd_colsum_segments_bf16_cuda(float *out, const bf16 *in, const int *offsets,
                                       int64_t rows, int64_t S, int64_t cols, float *partial) {
    return colsum_segments<bf16>(out, in, offsets, rows, S, cols, partial);
}
