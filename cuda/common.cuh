/* common.cuh — what every CUDA file of racedit shares: the error channel (every
 * cudaError_t / cublasStatus_t becomes an rd_status with a message, never an exit),
 * growable device buffers, the process-wide cuBLAS handle, the GELU variants written
 * exactly as the CPU's, and the order-preserving float key of the routing.
 * Internal to the .cu files; the public API is csrc/cuda.h. */
#ifndef RACEDIT_CUDA_COMMON_CUH
#define RACEDIT_CUDA_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "racedit.h"
#include "cuda.h"

/* Return RD_ECUDA with the failing call and CUDA's message. */
#define CU_TRY(call)                                                                       \
    do {                                                                                   \
        cudaError_t e_ = (call);                                                           \
        if (e_ != cudaSuccess)                                                             \
            return rd_fail(RD_ECUDA, "CUDA error in %s (%s:%d): %s", #call, __FILE__,      \
                           __LINE__, cudaGetErrorString(e_));                              \
    } while (0)

/* After a kernel launch: launch-configuration errors and earlier asynchronous faults. */
#define CU_LAUNCHED(what)                                                                  \
    do {                                                                                   \
        cudaError_t e_ = cudaGetLastError();                                               \
        if (e_ != cudaSuccess)                                                             \
            return rd_fail(RD_ECUDA, "CUDA error launching %s (%s:%d): %s", what, __FILE__, \
                           __LINE__, cudaGetErrorString(e_));                              \
    } while (0)

#define CB_TRY(call)                                                                       \
    do {                                                                                   \
        cublasStatus_t b_ = (call);                                                        \
        if (b_ != CUBLAS_STATUS_SUCCESS)                                                   \
            return rd_fail(RD_ECUDA, "cuBLAS error in %s (%s:%d): %s", #call, __FILE__,    \
                           __LINE__, cublasGetStatusString(b_));                           \
    } while (0)

#define RD_TRY(expr)                                                                       \
    do {                                                                                   \
        rd_status s_ = (expr);                                                             \
        if (s_ != RD_OK) return s_;                                                        \
    } while (0)

/* The one stream every op runs on (cuBLAS is bound to it too). */
#define RD_STREAM ((cudaStream_t)0)

/* The process-wide cuBLAS handle, created on first use. */
rd_status rd_cublas(cublasHandle_t *h);
/* cuBLAS compute type for fp32 GEMMs: exact fp32, or TF32 when opted in. */
cublasComputeType_t rd_cublas_compute(void);

typedef __nv_bfloat16 bf16;

/* Row-major C (M,N) = alpha op(A) op(B) + beta C on handle h with element types: A and B
 * of type ab (CUDA_R_32F or CUDA_R_16BF), C of type ct, accumulation `comp`. */
rd_status rd_gemm_typed(cublasHandle_t h, void *C, cudaDataType ct, int ldc, const void *A,
                        int lda, int transA, const void *B, int ldb, int transB, cudaDataType ab,
                        int64_t M, int64_t N, int64_t K, float alpha, float beta,
                        cublasComputeType_t comp);

/* Side streams for concurrent per-expert GEMMs, each with its own cuBLAS handle (a handle's
 * workspace must not be shared by concurrent streams). rd_side_fork makes every side
 * stream wait for the work queued so far on RD_STREAM; rd_side_join makes RD_STREAM wait
 * for everything queued on the side streams. Created on first use, never destroyed. */
#define RD_SIDE_STREAMS 4
rd_status rd_side_get(int i, cudaStream_t *s, cublasHandle_t *h);
rd_status rd_side_fork(void);
rd_status rd_side_join(void);

/* dst (n) bf16 = src (n) fp32, round to nearest even. */
rd_status rd_f32_to_bf16_launch(bf16 *dst, const float *src, int64_t n);

/* A device buffer that grows on demand (contents are not kept when it grows). */
typedef struct {
    void *p;
    size_t cap;
} rd_dbuf;
rd_status rd_dbuf_get(rd_dbuf *b, size_t bytes, void **out);
void rd_dbuf_free(rd_dbuf *b);
#define DBUF(b, T, count, ptr) rd_dbuf_get(&(b), (size_t)(count) * sizeof(T), (void **)&(ptr))

/* out[s,c] += sum of in[r,c] over rows r of segment s, for s < S, c < cols. Segments
 * are given by offsets (S+1, DEVICE), or with offsets == NULL there is one segment of
 * `rows` rows. Fixed-order two-stage reduction: bitwise deterministic. partial is
 * device scratch of rd_colsum_scratch(S, cols) floats. */
int64_t rd_colsum_scratch(int64_t S, int64_t cols);
rd_status rd_colsum_segments_cuda(float *out /* S,cols */, const float *in /* rows,cols */,
                                  const int *offsets /* S+1, device */, int64_t rows,
                                  int64_t S, int64_t cols, float *partial);
/* The same over a bf16 input (sums in fp32). */
rd_status rd_colsum_segments_bf16_cuda(float *out, const bf16 *in, const int *offsets,
                                       int64_t rows, int64_t S, int64_t cols, float *partial);

/* Stream-ordered scratch for the stateless ops (no synchronisation to free it). */
rd_status rd_scratch_alloc(void **p, size_t bytes);
void rd_scratch_free(void *p);

/* Loads and stores of one or four consecutive elements as floats (float or bf16 storage;
 * four-element accesses need 16-byte (float) / 8-byte (bf16) alignment). */
__device__ __forceinline__ float ld1(const float *p) { return *p; }
__device__ __forceinline__ float ld1(const bf16 *p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st1(float *p, float v) { *p = v; }
__device__ __forceinline__ void st1(bf16 *p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ float4 ld4(const float *p) { return *(const float4 *)p; }
__device__ __forceinline__ float4 ld4(const bf16 *p) {
    uint2 u = *(const uint2 *)p;
    float2 a = __bfloat1622float2(*(const __nv_bfloat162 *)&u.x);
    float2 b = __bfloat1622float2(*(const __nv_bfloat162 *)&u.y);
    return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ void st4(float *p, float4 v) { *(float4 *)p = v; }
__device__ __forceinline__ void st4(bf16 *p, float4 v) {
    __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
    uint2 u;
    u.x = *(const unsigned *)&a;
    u.y = *(const unsigned *)&b;
    *(uint2 *)p = u;
}

/* Grid of a grid-stride loop over n items: enough blocks to fill the device, capped. */
static inline unsigned rd_grid(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads;
    return (unsigned)(b < 1 ? 1 : (b > 8192 ? 8192 : b));
}

/* Blocks for n items of `per` items each, at least 1 (callers skip n == 0). */
static inline unsigned rd_blocks(int64_t n, int64_t per) { return (unsigned)((n + per - 1) / per); }

/* ---- device math: the GELUs in forms without cancellation in the negative tail (as
 * the CPU's csrc/cpu/moe_math.h), on CUDA's own expf / erfcf ------------------------ */
#define RD_GELU_T0_F 0.7978845608028654f /* sqrt(2/pi) */
#define RD_GELU_T1_F 0.044715f
/* GELU_tanh(x) = 0.5 x (1 + tanh u) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3). */
__device__ __forceinline__ float d_gelu_tanh(float x) {
    float u = RD_GELU_T0_F * (x + RD_GELU_T1_F * x * x * x);
    float e = expf(-2.0f * fabsf(u)), r = 1.0f / (1.0f + e);
    return x * (u >= 0.0f ? r : e * r);
}
/* 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) u'(x). */
__device__ __forceinline__ float d_gelu_tanh_grad(float x) {
    float u = RD_GELU_T0_F * (x + RD_GELU_T1_F * x * x * x);
    float e = expf(-2.0f * fabsf(u)), r = 1.0f / (1.0f + e);
    float half_1pt = u >= 0.0f ? r : e * r;
    float sech2 = 4.0f * e * r * r;
    return half_1pt + 0.5f * x * sech2 * RD_GELU_T0_F * (1.0f + 3.0f * RD_GELU_T1_F * x * x);
}
/* GELU_erf(x) = x Phi(x), Phi(x) = erfc(-x / sqrt 2) / 2; derivative Phi(x) + x phi(x). */
__device__ __forceinline__ float d_phi_cdf(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
__device__ __forceinline__ float d_gelu_erf(float x) { return x * d_phi_cdf(x); }
__device__ __forceinline__ float d_gelu_erf_grad(float x) {
    return d_phi_cdf(x) + x * 0.39894228040143268f * expf(-0.5f * x * x);
}

/* Order-preserving key of a float (as csrc/cpu/route.c): a > b <=> key(a) > key(b) for
 * non-NaN floats; -0.0 takes +0.0's key since they compare equal. */
__device__ __forceinline__ uint32_t d_f2key(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u << 1) == 0) u = 0;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float d_key2f(uint32_t k) {
    uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    return __uint_as_float(u);
}

#endif
