/* optim.c — CPU kernels of the optimiser area: one OpenMP loop per update over the
 * flat parameter buffer. Elementwise loops are deterministic whatever the thread count;
 * the one reduction (the gradient norm) uses fixed chunks so it is too. */
#include "../racedit.h"

#include <math.h>
#include <stdlib.h>

rd_status rd_adamw_check(const char *op, int64_t n, int64_t step, double beta1, double beta2,
                         int has_ema, double ema_decay) {
    if (n < 0) return rd_fail(RD_EINVAL, "%s: n must be >= 0, got %lld", op, (long long)n);
    if (step < 1) return rd_fail(RD_EINVAL, "%s: step must be >= 1, got %lld", op, (long long)step);
    if (!(beta1 >= 0.0 && beta1 < 1.0) || !(beta2 >= 0.0 && beta2 < 1.0))
        return rd_fail(RD_EINVAL, "%s: betas must lie in [0, 1), got %g, %g", op, beta1, beta2);
    if (has_ema && !(ema_decay >= 0.0 && ema_decay <= 1.0))
        return rd_fail(RD_EINVAL, "%s: ema decay must lie in [0, 1], got %g", op, ema_decay);
    return RD_OK;
}

rd_status rd_adamw_step(float *params, const float *grads, float *m, float *v, int64_t n,
                        double lr, double beta1, double beta2, double eps,
                        double weight_decay, int64_t step, double grad_scale) {
    rd_status s = rd_adamw_check("adamw_step", n, step, beta1, beta2, 0, 0.0);
    if (s != RD_OK) return s;
    /* Bias corrections in double: 1 - beta2^step for small steps loses digits in float. */
    double bc1 = 1.0 - pow(beta1, (double)step);
    double bc2 = 1.0 - pow(beta2, (double)step);
    const float step_size = (float)(lr / bc1);
    const float inv_sqrt_bc2 = (float)(1.0 / sqrt(bc2));
    const float decay = (float)(1.0 - lr * weight_decay);
    const float b1 = (float)beta1, b2 = (float)beta2;
    const float one_m_b1 = (float)(1.0 - beta1), one_m_b2 = (float)(1.0 - beta2);
    const float gs = (float)grad_scale, epsf = (float)eps;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float g = grads[i] * gs;
        float mi = b1 * m[i] + one_m_b1 * g;
        float vi = b2 * v[i] + one_m_b2 * g * g;
        m[i] = mi;
        v[i] = vi;
        float denom = sqrtf(vi) * inv_sqrt_bc2 + epsf;
        params[i] = params[i] * decay - step_size * mi / denom;
    }
    return RD_OK;
}

rd_status rd_grad_norm(double *out, const float *grads, int64_t n) {
    if (n < 0) return rd_fail(RD_EINVAL, "grad_norm: n must be >= 0, got %lld", (long long)n);
    int64_t nchunk = (n + RD_NORM_CHUNK - 1) / RD_NORM_CHUNK;
    double *part = (double *)malloc((size_t)(nchunk > 0 ? nchunk : 1) * sizeof(double));
    if (!part) return rd_fail(RD_ENOMEM, "grad_norm: cannot allocate %lld partial sums",
                              (long long)nchunk);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < nchunk; c++) {
        int64_t lo = c * RD_NORM_CHUNK, hi = lo + RD_NORM_CHUNK < n ? lo + RD_NORM_CHUNK : n;
        double s = 0.0;
        for (int64_t i = lo; i < hi; i++) s += (double)grads[i] * (double)grads[i];
        part[c] = s;
    }
    double total = 0.0;
    for (int64_t c = 0; c < nchunk; c++) total += part[c];
    free(part);
    *out = sqrt(total);
    return RD_OK;
}

rd_status rd_ema_update(float *ema, const float *params, int64_t n, double decay) {
    if (n < 0) return rd_fail(RD_EINVAL, "ema_update: n must be >= 0, got %lld", (long long)n);
    if (!(decay >= 0.0 && decay <= 1.0))
        return rd_fail(RD_EINVAL, "ema_update: decay must lie in [0, 1], got %g", decay);
    const float d = (float)decay, w = (float)(1.0 - decay);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) ema[i] = ema[i] * d + params[i] * w;
    return RD_OK;
}

rd_status rd_nonfinite_index(int64_t *index, const float *x, int64_t n) {
    if (n < 0) return rd_fail(RD_EINVAL, "nonfinite_index: n must be >= 0, got %lld", (long long)n);
    int64_t nchunk = (n + RD_NORM_CHUNK - 1) / RD_NORM_CHUNK;
    int64_t first = n; /* min over chunks of each chunk's first non-finite index */
#pragma omp parallel for schedule(static) reduction(min : first)
    for (int64_t c = 0; c < nchunk; c++) {
        int64_t lo = c * RD_NORM_CHUNK, hi = lo + RD_NORM_CHUNK < n ? lo + RD_NORM_CHUNK : n;
        for (int64_t i = lo; i < hi; i++) {
            if (!isfinite(x[i])) {
                if (i < first) first = i;
                break;
            }
        }
    }
    *index = first < n ? first : -1;
    return RD_OK;
}
