/* attention.cu — multi-head softmax attention on the device with the CPU's layout and
 * semantics (csrc/cpu/dit.c): qkv (B,L,3D) holds [q | k | v] with head h at columns
 * h*hd.., att (B,NH,L,L) keeps the probabilities, out (B,L,D) the heads side by side;
 * scores scaled by 1/sqrt(hd), softmax in fp32 with the row max subtracted.
 *
 * cuBLAS strided-batched GEMMs, one call per head and product with the batch running over
 * the samples b (q, k, v of sample b are L*3D floats apart, att blocks NH*L*L, out L*D), and
 * a warp-per-row softmax kernel: O(B*NH*L^2) memory like the CPU (L <= 256 at DiT sizes
 * with p = 2), no fused flash kernel.
 *
 * bf16 variant: the same products with bf16 operands (fp32 accumulation and fp32 results):
 * qkv, dout, the probabilities and the score gradients are rounded into bf16 scratch just
 * before the GEMMs that read them; the softmax and its backward stay fp32 on the fp32 att. */
#include <math.h>

#include "common.cuh"

#define AT_THREADS 256

/* Row-major C_i (M,N) = alpha op(A_i) op(B_i) + beta C_i for i < batch, matrices strideX
 * elements apart; A and B of type ab, C fp32. */
static rd_status gemm_sb(cublasHandle_t h, float *C, int ldc, long long sC, const void *A, int lda,
                         long long sA, int tA, const void *B, int ldb, long long sB, int tB,
                         int64_t M, int64_t N, int64_t K, float alpha, float beta, int64_t batch,
                         cudaDataType ab, cublasComputeType_t comp) {
    CB_TRY(cublasGemmStridedBatchedEx(h, tB ? CUBLAS_OP_T : CUBLAS_OP_N, tA ? CUBLAS_OP_T : CUBLAS_OP_N,
                                      (int)N, (int)M, (int)K, &alpha, B, ab, ldb, sB, A,
                                      ab, lda, sA, &beta, C, CUDA_R_32F, ldc, sC, (int)batch,
                                      comp, CUBLAS_GEMM_DEFAULT));
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

/* Element e of an operand of type ab (fp32 or bf16) at base. */
static inline const void *at_(const void *base, int64_t e, cudaDataType ab) {
    return (const char *)base + e * (ab == CUDA_R_16BF ? 2 : 4);
}

/* Forward with the GEMM operands read from qop (the qkv layout; qkv itself or its bf16
 * copy) and, for att v, from aop (fp32: att itself; bf16: scratch the probabilities are
 * rounded into after the softmax). */
static rd_status attention_fwd(float *out, float *att, const void *qop, void *aop, int64_t B,
                               int64_t L, int64_t D, int64_t NH, cudaDataType ab,
                               cublasComputeType_t comp) {
    cublasHandle_t h;
    RD_TRY(rd_cublas(&h));
    int64_t hd = D / NH;
    float scale = 1.0f / sqrtf((float)hd);
    int D3 = (int)(3 * D), iL = (int)L, iD = (int)D;
    long long sq = (long long)(L * 3 * D), sa = (long long)(NH * L * L), so = (long long)(L * D);
    for (int64_t hh = 0; hh < NH; hh++) /* S = scale q k^T (L,L) */
        RD_TRY(gemm_sb(h, att + hh * L * L, iL, sa, at_(qop, hh * hd, ab), D3, sq, 0,
                       at_(qop, hh * hd + D, ab), D3, sq, 1, L, L, hd, scale, 0.0f, B, ab, comp));
    softmax_rows_kernel<<<rd_blocks(B * NH * L, AT_THREADS / 32), AT_THREADS, 0, RD_STREAM>>>(att, B * NH * L, L);
    CU_LAUNCHED("softmax_rows_kernel");
    if (ab == CUDA_R_16BF) RD_TRY(rd_f32_to_bf16_launch((bf16 *)aop, att, B * NH * L * L));
    for (int64_t hh = 0; hh < NH; hh++) /* out_h = att v (L,hd) */
        RD_TRY(gemm_sb(h, out + hh * hd, iD, so, at_(aop, hh * L * L, ab), iL, sa, 0,
                       at_(qop, hh * hd + 2 * D, ab), D3, sq, 0, L, hd, L, 1.0f, 0.0f, B, ab, comp));
    return RD_OK;
}

/* Backward with operands qop (qkv layout), gop (dout layout) and aop (att layout: the
 * probabilities for att^T g, then the score gradients for dS k and dS^T q; for bf16 it is
 * scratch refilled between the two uses). */
static rd_status attention_bwd(float *dqkv, float *datt, const float *att, const void *qop,
                               const void *gop, void *aop, int64_t B, int64_t L, int64_t D,
                               int64_t NH, cudaDataType ab, cublasComputeType_t comp) {
    cublasHandle_t h;
    RD_TRY(rd_cublas(&h));
    int64_t hd = D / NH;
    float scale = 1.0f / sqrtf((float)hd);
    int D3 = (int)(3 * D), iL = (int)L, iD = (int)D;
    long long sq = (long long)(L * 3 * D), sa = (long long)(NH * L * L), so = (long long)(L * D);
    const int bf = ab == CUDA_R_16BF;
    if (bf) RD_TRY(rd_f32_to_bf16_launch((bf16 *)aop, att, B * NH * L * L));
    for (int64_t hh = 0; hh < NH; hh++) {
        const void *v = at_(qop, hh * hd + 2 * D, ab), *g = at_(gop, hh * hd, ab);
        /* dA = g v^T, dv = att^T g */
        RD_TRY(gemm_sb(h, datt + hh * L * L, iL, sa, g, iD, so, 0, v, D3, sq, 1, L, L, hd, 1.0f,
                       0.0f, B, ab, comp));
        RD_TRY(gemm_sb(h, dqkv + hh * hd + 2 * D, D3, sq, at_(aop, hh * L * L, ab), iL, sa, 1, g, iD,
                       so, 0, L, hd, L, 1.0f, 0.0f, B, ab, comp));
    }
    softmax_back_rows_kernel<<<rd_blocks(B * NH * L, AT_THREADS / 32), AT_THREADS, 0, RD_STREAM>>>(
        datt, att, B * NH * L, L);
    CU_LAUNCHED("softmax_back_rows_kernel");
    const void *dS = datt;
    if (bf) {
        RD_TRY(rd_f32_to_bf16_launch((bf16 *)aop, datt, B * NH * L * L));
        dS = aop;
    }
    for (int64_t hh = 0; hh < NH; hh++) {
        const void *q = at_(qop, hh * hd, ab), *k = at_(qop, hh * hd + D, ab),
                   *ds = at_(dS, hh * L * L, ab);
        RD_TRY(gemm_sb(h, dqkv + hh * hd, D3, sq, ds, iL, sa, 0, k, D3, sq, 0, L, hd, L, scale, 0.0f,
                       B, ab, comp)); /* dq = dS k */
        RD_TRY(gemm_sb(h, dqkv + hh * hd + D, D3, sq, ds, iL, sa, 1, q, D3, sq, 0, L, hd, L, scale,
                       0.0f, B, ab, comp)); /* dk = dS^T q */
    }
    return RD_OK;
}

extern "C" rd_status rd_attention_forward_cuda(float *out, float *att, const float *qkv, int64_t B,
                                               int64_t L, int64_t D, int64_t NH) {
    RD_TRY(check_attention("attention_cuda", B, L, D, NH));
    return attention_fwd(out, att, qkv, att, B, L, D, NH, CUDA_R_32F, rd_cublas_compute());
}

extern "C" rd_status rd_attention_backward_cuda(float *dqkv, float *datt, const float *dout,
                                                const float *qkv, const float *att, int64_t B,
                                                int64_t L, int64_t D, int64_t NH) {
    RD_TRY(check_attention("attention_backward_cuda", B, L, D, NH));
    return attention_bwd(dqkv, datt, att, qkv, dout, (void *)att, B, L, D, NH, CUDA_R_32F,
                         rd_cublas_compute());
}

/* ---- bf16 operands ------------------------------------------------------------------- */
static inline size_t at_round(size_t bytes) { return (bytes + 255) / 256 * 256; }

extern "C" size_t rd_attention_bf16_scratch(int64_t B, int64_t L, int64_t D, int64_t NH) {
    return at_round((size_t)(B * L * 3 * D) * 2) + at_round((size_t)(B * L * D) * 2) +
           at_round((size_t)(B * NH * L * L) * 2);
}

/* ws -> the bf16 copies of qkv (B,L,3D), dout (B,L,D) and an att-sized block. */
static void at_carve(void *ws, int64_t B, int64_t L, int64_t D, bf16 **q, bf16 **g, bf16 **a) {
    char *p = (char *)ws;
    *q = (bf16 *)p;
    p += at_round((size_t)(B * L * 3 * D) * 2);
    *g = (bf16 *)p;
    p += at_round((size_t)(B * L * D) * 2);
    *a = (bf16 *)p;
}

extern "C" rd_status rd_attention_forward_bf16_cuda(float *out, float *att, const float *qkv,
                                                    void *ws, int64_t B, int64_t L, int64_t D,
                                                    int64_t NH) {
    RD_TRY(check_attention("attention_cuda", B, L, D, NH));
    if (!ws) return rd_fail(RD_EINVAL, "attention_cuda: NULL bf16 scratch");
    bf16 *q, *g, *a;
    at_carve(ws, B, L, D, &q, &g, &a);
    RD_TRY(rd_f32_to_bf16_launch(q, qkv, B * L * 3 * D));
    return attention_fwd(out, att, q, a, B, L, D, NH, CUDA_R_16BF, CUBLAS_COMPUTE_32F);
}

extern "C" rd_status rd_attention_backward_bf16_cuda(float *dqkv, float *datt, const float *dout,
                                                     const float *qkv, const float *att, void *ws,
                                                     int64_t B, int64_t L, int64_t D, int64_t NH) {
    RD_TRY(check_attention("attention_backward_cuda", B, L, D, NH));
    if (!ws) return rd_fail(RD_EINVAL, "attention_backward_cuda: NULL bf16 scratch");
    bf16 *q, *g, *a;
    at_carve(ws, B, L, D, &q, &g, &a);
    RD_TRY(rd_f32_to_bf16_launch(q, qkv, B * L * 3 * D));
    RD_TRY(rd_f32_to_bf16_launch(g, dout, B * L * D));
    return attention_bwd(dqkv, datt, att, q, g, a, B, L, D, NH, CUDA_R_16BF, CUBLAS_COMPUTE_32F);
}
