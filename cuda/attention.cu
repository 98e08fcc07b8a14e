/* attention.cu — multi-head softmax attention on the device with the CPU's layout and
 * semantics (csrc/cpu/dit.c): qkv (B,L,3D) holds [q | k | v] with head h at columns
 * h*hd.., att (B,NH,L,L) keeps the probabilities, out (B,L,D) the heads side by side;
 * scores scaled by 1/sqrt(hd), softmax in fp32 with the row max subtracted.
 *
 * cuBLAS strided-batched GEMMs, one call per head and product with the batch running over
 * the samples b (q, k, v of sample b are L*3D floats apart, att blocks NH*L*L, out L*D), and
 * a warp-per-row softmax kernel: O(B*NH*L^2) memory like the CPU (L <= 256 at DiT sizes
 * with p = 2), no fused flash kernel. */
#include <math.h>

#include "common.cuh"

#define AT_THREADS 256

/* Row-major C_i (M,N) = alpha op(A_i) op(B_i) + beta C_i for i < batch, matrices strideX
 * floats apart. */
static rd_status gemm_sb(cublasHandle_t h, float *C, int ldc, long long sC, const float *A, int lda,
                         long long sA, int tA, const float *B, int ldb, long long sB, int tB,
                         int64_t M, int64_t N, int64_t K, float alpha, float beta, int64_t batch) {
    CB_TRY(cublasGemmStridedBatchedEx(h, tB ? CUBLAS_OP_T : CUBLAS_OP_N, tA ? CUBLAS_OP_T : CUBLAS_OP_N,
                                      (int)N, (int)M, (int)K, &alpha, B, CUDA_R_32F, ldb, sB, A,
                                      CUDA_R_32F, lda, sA, &beta, C, CUDA_R_32F, ldc, sC, (int)batch,
                                      rd_cublas_compute(), CUBLAS_GEMM_DEFAULT));
    return RD_OK;
}

/* In place: each row of att (rows of L) becomes its softmax. */
__global__ void softmax_rows_kernel(float *att, int64_t rows, int64_t L) {
    int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (r >= rows) return;
    float *a = att + r * L;
    float m = -INFINITY;
    for (int64_t j = lane; j < L; j += 32) m = fmaxf(m, a[j]);
    for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float s = 0.0f;
    for (int64_t j = lane; j < L; j += 32) {
        float e = expf(a[j] - m);
        a[j] = e;
        s += e;
    }
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    float inv = 1.0f / s;
    for (int64_t j = lane; j < L; j += 32) a[j] *= inv;
}

/* In place: da = att * (da - <att, da>) per row. */
__global__ void softmax_back_rows_kernel(float *da, const float *att, int64_t rows, int64_t L) {
    int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (r >= rows) return;
    const float *a = att + r * L;
    float *d = da + r * L;
    float dot = 0.0f;
    for (int64_t j = lane; j < L; j += 32) dot += a[j] * d[j];
    for (int o = 16; o; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    for (int64_t j = lane; j < L; j += 32) d[j] = a[j] * (d[j] - dot);
}

static rd_status check_attention(const char *op, int64_t B, int64_t L, int64_t D, int64_t NH) {
    if (B <= 0 || L <= 0 || D <= 0 || NH <= 0 || D % NH)
        return rd_fail(RD_EINVAL, "%s: need positive sizes and D %% NH == 0, got B=%lld L=%lld "
                       "D=%lld NH=%lld", op, (long long)B, (long long)L, (long long)D, (long long)NH);
    if (3 * D > INT32_MAX || L * L > INT32_MAX || B > INT32_MAX)
        return rd_fail(RD_EINVAL, "%s: sizes exceed the 32-bit cuBLAS interface", op);
    return RD_OK;
}

extern "C" rd_status rd_attention_forward_cuda(float *out, float *att, const float *qkv, int64_t B,
                                               int64_t L, int64_t D, int64_t NH) {
    RD_TRY(check_attention("attention_cuda", B, L, D, NH));
    cublasHandle_t h;
    RD_TRY(rd_cublas(&h));
    int64_t hd = D / NH;
    float scale = 1.0f / sqrtf((float)hd);
    int D3 = (int)(3 * D), iL = (int)L, iD = (int)D;
    long long sq = (long long)(L * 3 * D), sa = (long long)(NH * L * L), so = (long long)(L * D);
    for (int64_t hh = 0; hh < NH; hh++) {
        const float *q = qkv + hh * hd, *k = q + D;
        float *a = att + hh * L * L;
        /* S = scale q k^T (L,L) */
        RD_TRY(gemm_sb(h, a, iL, sa, q, D3, sq, 0, k, D3, sq, 1, L, L, hd, scale, 0.0f, B));
    }
    softmax_rows_kernel<<<rd_blocks(B * NH * L, AT_THREADS / 32), AT_THREADS, 0, RD_STREAM>>>(att, B * NH * L, L);
    CU_LAUNCHED("softmax_rows_kernel");
    for (int64_t hh = 0; hh < NH; hh++) {
        const float *v = qkv + hh * hd + 2 * D;
        /* out_h = att v (L,hd) */
        RD_TRY(gemm_sb(h, out + hh * hd, iD, so, att + hh * L * L, iL, sa, 0, v, D3, sq, 0, L, hd, L,
                       1.0f, 0.0f, B));
    }
    return RD_OK;
}

extern "C" rd_status rd_attention_backward_cuda(float *dqkv, float *datt, const float *dout,
                                                const float *qkv, const float *att, int64_t B,
                                                int64_t L, int64_t D, int64_t NH) {
    RD_TRY(check_attention("attention_backward_cuda", B, L, D, NH));
    cublasHandle_t h;
    RD_TRY(rd_cublas(&h));
    int64_t hd = D / NH;
    float scale = 1.0f / sqrtf((float)hd);
    int D3 = (int)(3 * D), iL = (int)L, iD = (int)D;
    long long sq = (long long)(L * 3 * D), sa = (long long)(NH * L * L), so = (long long)(L * D);
    for (int64_t hh = 0; hh < NH; hh++) {
        const float *v = qkv + hh * hd + 2 * D, *g = dout + hh * hd, *a = att + hh * L * L;
        float *da = datt + hh * L * L, *dv = dqkv + hh * hd + 2 * D;
        RD_TRY(gemm_sb(h, da, iL, sa, g, iD, so, 0, v, D3, sq, 1, L, L, hd, 1.0f, 0.0f, B)); /* g v^T */
        RD_TRY(gemm_sb(h, dv, D3, sq, a, iL, sa, 1, g, iD, so, 0, L, hd, L, 1.0f, 0.0f, B)); /* att^T g */
    }
    softmax_back_rows_kernel<<<rd_blocks(B * NH * L, AT_THREADS / 32), AT_THREADS, 0, RD_STREAM>>>(
        datt, att, B * NH * L, L);
    CU_LAUNCHED("softmax_back_rows_kernel");
    for (int64_t hh = 0; hh < NH; hh++) {
        const float *q = qkv + hh * hd, *k = q + D, *da = datt + hh * L * L;
        float *dq = dqkv + hh * hd, *dk = dq + D;
        RD_TRY(gemm_sb(h, dq, D3, sq, da, iL, sa, 0, k, D3, sq, 0, L, hd, L, scale, 0.0f, B)); /* dS k */
        RD_TRY(gemm_sb(h, dk, D3, sq, da, iL, sa, 1, q, D3, sq, 0, L, hd, L, scale, 0.0f, B)); /* dS^T q */
    }
    return RD_OK;
}
