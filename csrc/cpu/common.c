/* common.c — what every CPU op shares: the error channel, the BLAS entry point
 * (a Fortran sgemm handed over by the binding), a row-major matmul on top of it,
 * and the GELU variants. */
#include "../racedit.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <limits.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static _Thread_local char rd_err[512];

const char *rd_last_error(void) { return rd_err; }

rd_status rd_fail(rd_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rd_err, sizeof rd_err, fmt, ap);
    va_end(ap);
    return s;
}

int rd_mul_ok(int64_t a, int64_t b, int64_t *out) {
    return a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, out);
}

rd_status rd_size_product(int64_t *out, size_t elsize, const char *what, int n, const int64_t *f) {
    int64_t p = 1;
    int fits = 1;
    double exact = 1.0; /* the true product, for the message */
    char factors[200] = "";
    size_t used = 0;
    for (int i = 0; i < n; i++) {
        if (f[i] < 0)
            return rd_fail(RD_EINVAL, "%s: negative size %lld", what, (long long)f[i]);
        fits = fits && rd_mul_ok(p, f[i], &p);
        exact *= (double)f[i];
        if (used < sizeof factors)
            used += (size_t)snprintf(factors + used, sizeof factors - used, "%s%lld",
                                     i ? " x " : "", (long long)f[i]);
    }
    if (!fits)
        return rd_fail(RD_EINVAL, "%s: %s = %.4g elements, more than a 64-bit size can count",
                       what, factors, exact);
    if (exact * (double)elsize > RD_MAX_ALLOC_BYTES)
        return rd_fail(RD_ENOMEM, "%s: %s elements of %zu bytes = %.4g MiB, more than one "
                       "allocation can hold", what, factors, elsize,
                       exact * (double)elsize / 1048576.0);
    *out = p;
    return RD_OK;
}

static rd_sgemm_fn rd_sgemm = NULL;
void rd_set_sgemm(rd_sgemm_fn f) { rd_sgemm = f; }
int rd_have_sgemm(void) { return rd_sgemm != NULL; }

int rd_num_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* Row-major C = alpha op(A) op(B) + beta C, as the column-major product
 * C^T = op(B)^T op(A)^T, so no data is ever transposed. */
rd_status rd_matmul(float *C, int ldc, const float *A, int lda, int transA,
                    const float *B, int ldb, int transB,
                    int64_t M, int64_t N, int64_t K, float alpha, float beta) {
    if (!rd_sgemm) return rd_fail(RD_EBLAS, "no BLAS sgemm registered (import racedit first)");
    if (M < 0 || N < 0 || K < 0) return rd_fail(RD_EINVAL, "matmul: negative size");
    if (M > INT_MAX || N > INT_MAX || K > INT_MAX)
        return rd_fail(RD_EINVAL, "matmul: size %lld x %lld x %lld exceeds 32-bit BLAS",
                       (long long)M, (long long)N, (long long)K);
    if (M == 0 || N == 0) return RD_OK;
    if (K == 0) { /* BLAS quick-returns differently across vendors: do it here */
        for (int64_t i = 0; i < M; i++)
            for (int64_t j = 0; j < N; j++)
                C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
        return RD_OK;
    }
    char ta = transB ? 'T' : 'N', tb = transA ? 'T' : 'N';
    int m = (int)N, n = (int)M, k = (int)K;
    int la = ldb > 0 ? ldb : 1, lb = lda > 0 ? lda : 1, lc = ldc > 0 ? ldc : 1;
    rd_sgemm(&ta, &tb, &m, &n, &k, &alpha, (float *)B, &la, (float *)A, &lb, &beta, C, &lc);
    return RD_OK;
}

