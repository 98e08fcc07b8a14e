/* optim.cu — the optimiser's passes over the flat parameter buffer on the device, with the
 * CPU optimiser's arithmetic (torch.optim.AdamW, DiT's update_ema): AdamW fused with the
 * EMA of the weights in one pass, the gradient norm for clipping, and a NaN/Inf finder.
 * Every product and sum is rounded as written (__fmul_rn / __fadd_rn: no FMA contraction,
 * as the CPU's ISO C build) so the updates equal the CPU's bit for bit. */
#include <math.h>

#include "common.cuh"

#define OP_THREADS 256
#define OP_NORM_CHUNK 8192 /* = RD_NORM_CHUNK of the CPU's grad norm */

typedef struct {
    float step_size, inv_sqrt_bc2, decay, b1, b2, one_m_b1, one_m_b2, gs, eps, ema_d, ema_w;
} adamw_consts;

/* g = gs*grad; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g g;
 * p = p*decay - step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps); ema = ema*d + p*w. */
__global__ void adamw_ema_kernel(float *p, const float *grad, float *m, float *v, float *ema,
                                 adamw_consts c, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float g = __fmul_rn(grad[i], c.gs);
        float mi = __fadd_rn(__fmul_rn(c.b1, m[i]), __fmul_rn(c.one_m_b1, g));
        float vi = __fadd_rn(__fmul_rn(c.b2, v[i]), __fmul_rn(__fmul_rn(c.one_m_b2, g), g));
        m[i] = mi;
        v[i] = vi;
        float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vi), c.inv_sqrt_bc2), c.eps);
        float pi = __fsub_rn(__fmul_rn(p[i], c.decay), __fdiv_rn(__fmul_rn(c.step_size, mi), denom));
        p[i] = pi;
        if (ema) ema[i] = __fadd_rn(__fmul_rn(ema[i], c.ema_d), __fmul_rn(pi, c.ema_w));
    }
}

extern "C" rd_status rd_adamw_ema_step_cuda(float *params, const float *grads, float *m, float *v,
                                            float *ema, int64_t n, double lr, double beta1,
                                            double beta2, double eps, double weight_decay,
                                            int64_t step, double grad_scale, double ema_decay) {
    RD_TRY(rd_adamw_check("adamw_cuda", n, step, beta1, beta2, ema != NULL, ema_decay));
    if (n == 0) return RD_OK;
    double bc1 = 1.0 - pow(beta1, (double)step), bc2 = 1.0 - pow(beta2, (double)step);
    adamw_consts c;
    c.step_size = (float)(lr / bc1);
    c.inv_sqrt_bc2 = (float)(1.0 / sqrt(bc2));
    c.decay = (float)(1.0 - lr * weight_decay);
    c.b1 = (float)beta1;
    c.b2 = (float)beta2;
    c.one_m_b1 = (float)(1.0 - beta1);
    c.one_m_b2 = (float)(1.0 - beta2);
    c.gs = (float)grad_scale;
    c.eps = (float)eps;
    c.ema_d = (float)ema_decay;
    c.ema_w = (float)(1.0 - ema_decay);
    adamw_ema_kernel<<<rd_grid(n, OP_THREADS), OP_THREADS, 0, RD_STREAM>>>(params, grads, m, v, ema, c, n);
    CU_LAUNCHED("adamw_ema_kernel");
    return RD_OK;
}

/* part[c] = sum of grads[i]^2 (double) over chunk c of OP_NORM_CHUNK elements: one block
 * per chunk, a fixed-order tree. */
__global__ void sumsq_chunks_kernel(double *part, const float *x, int64_t n) {
    __shared__ double red[OP_THREADS];
    int64_t lo = (int64_t)blockIdx.x * OP_NORM_CHUNK;
    int64_t hi = lo + OP_NORM_CHUNK < n ? lo + OP_NORM_CHUNK : n;
    double s = 0.0;
    for (int64_t i = lo + threadIdx.x; i < hi; i += OP_THREADS) s += (double)x[i] * (double)x[i];
    red[threadIdx.x] = s;
    __syncthreads();
    for (int k = OP_THREADS / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) red[threadIdx.x] += red[threadIdx.x + k];
        __syncthreads();
    }
    if (threadIdx.x == 0) part[blockIdx.x] = red[0];
}

/* One thread adds the chunk sums in order (deterministic), the square root last. */
__global__ void sum_parts_kernel(double *out, const double *part, int64_t nchunk) {
    double t = 0.0;
    for (int64_t c = 0; c < nchunk; c++) t += part[c];
    *out = sqrt(t);
}

extern "C" rd_status rd_grad_norm_cuda(double *out_dev, const float *grads, int64_t n) {
    if (n < 0) return rd_fail(RD_EINVAL, "grad_norm_cuda: n must be >= 0, got %lld", (long long)n);
    int64_t nchunk = (n + OP_NORM_CHUNK - 1) / OP_NORM_CHUNK;
    if (nchunk > INT32_MAX) return rd_fail(RD_EINVAL, "grad_norm_cuda: n=%lld too large", (long long)n);
    double *part;
    RD_TRY(rd_scratch_alloc((void **)&part, (size_t)(nchunk > 0 ? nchunk : 1) * sizeof(double)));
    if (nchunk > 0) sumsq_chunks_kernel<<<(unsigned)nchunk, OP_THREADS, 0, RD_STREAM>>>(part, grads, n);
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) {
        sum_parts_kernel<<<1, 1, 0, RD_STREAM>>>(out_dev, part, nchunk);
        e = cudaGetLastError();
    }
    rd_scratch_free(part);
    if (e != cudaSuccess)
        return rd_fail(RD_ECUDA, "CUDA error launching the grad-norm kernels: %s", cudaGetErrorString(e));
    return RD_OK;
}

__global__ void nonfinite_kernel(unsigned long long *first, const float *x, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        if (!isfinite(x[i])) atomicMin(first, (unsigned long long)i);
}

extern "C" rd_status rd_nonfinite_index_cuda(int64_t *index, const float *x, int64_t n) {
    if (n < 0) return rd_fail(RD_EINVAL, "nonfinite_index_cuda: n must be >= 0, got %lld", (long long)n);
    *index = -1;
    if (n == 0) return RD_OK;
    unsigned long long *d, h = ~0ULL;
    RD_TRY(rd_scratch_alloc((void **)&d, sizeof *d));
    rd_status s = RD_OK;
    cudaError_t e = cudaMemsetAsync(d, 0xff, sizeof *d, RD_STREAM);
    if (e == cudaSuccess) {
        nonfinite_kernel<<<rd_grid(n, OP_THREADS), OP_THREADS, 0, RD_STREAM>>>(d, x, n);
        e = cudaGetLastError();
    }
    if (e == cudaSuccess) e = cudaMemcpyAsync(&h, d, sizeof h, cudaMemcpyDeviceToHost, RD_STREAM);
    if (e == cudaSuccess) e = cudaStreamSynchronize(RD_STREAM);
    if (e != cudaSuccess) s = rd_fail(RD_ECUDA, "nonfinite_index_cuda: %s", cudaGetErrorString(e));
    rd_scratch_free(d);
    if (s == RD_OK && h != ~0ULL) *index = (int64_t)h;
    return s;
}
