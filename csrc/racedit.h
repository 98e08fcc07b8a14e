/* racedit.h — the backend-neutral C API of racedit.
 *
 * Every op is a function `rd_<op>_<dir>()` returning an rd_status; on failure the
 * message is readable with rd_last_error() (thread-local). The core never prints,
 * never exits and never includes Python.
 *
 * Shape letters (used beside every pointer):
 *   B batch, L tokens per image, N = B*L tokens, D width, E experts,
 *   He expert hidden width, K selected pairs in one group, P selected pairs in total.
 * All tensors are float32, row-major, contiguous.
 * Conventions: parameter gradients ACCUMULATE (+=); activation gradients ASSIGN (=),
 * unless an argument is named *_acc, which accumulates.
 */
#ifndef RACEDIT_H
#define RACEDIT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    RD_OK = 0,
    RD_EINVAL = 1,   /* bad argument (shape, value, NaN, ...): ValueError */
    RD_ENOMEM = 2,   /* allocation failed: MemoryError */
    RD_ESTATE = 3,   /* call out of order (backward before forward): RuntimeError */
    RD_EBLAS = 4,    /* no BLAS registered: RuntimeError */
    RD_ECUDA = 5     /* CUDA runtime / cuBLAS failure: RuntimeError */
} rd_status;

/* Message of the last failure on this thread ("" if none). */
const char *rd_last_error(void);
/* Record a failure message (printf-style) and return `s`. */
rd_status rd_fail(rd_status s, const char *fmt, ...);

/* ---- Sizes -------------------------------------------------------------------
 * Every product of sizes that allocates or indexes memory is formed with these: a huge
 * argument becomes an error giving the true size, never a product that wrapped around. */

/* The most bytes racedit asks for in one allocation (4 PiB, more than any machine holds);
 * a larger request fails with RD_ENOMEM without being tried. Element counts below it are
 * exact in a double, which is how the model's arena is counted. */
#define RD_MAX_ALLOC_BYTES 4503599627370496.0 /* 2^52 */

/* *out = a * b for a, b >= 0: 1 when the product fits in int64_t, else 0. */
int rd_mul_ok(int64_t a, int64_t b, int64_t *out);
/* *out = f[0] * ... * f[n-1] (each >= 0), the elements of a buffer `what` of `elsize`-byte
 * elements: RD_EINVAL when the count does not fit in int64_t, RD_ENOMEM when its bytes
 * exceed RD_MAX_ALLOC_BYTES, with a message giving the factors and the true size. */
rd_status rd_size_product(int64_t *out, size_t elsize, const char *what, int n, const int64_t *f);
/* rd_size_product over the listed factors: RD_SIZE(&n, sizeof(float), "pe", gh, gw, D). */
#define RD_SIZE(out, elsize, what, ...)                                                      \
    rd_size_product((out), (elsize), (what),                                                \
                    (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)),              \
                    (const int64_t[]){__VA_ARGS__})

/* ---- BLAS --------------------------------------------------------------------
 * Fortran sgemm (column-major, arguments by pointer), as exported by SciPy's
 * scipy.linalg.cython_blas. The binding registers it at import time. */
typedef void (*rd_sgemm_fn)(char *transa, char *transb, int *m, int *n, int *k,
                            float *alpha, float *a, int *lda, float *b, int *ldb,
                            float *beta, float *c, int *ldc);
void rd_set_sgemm(rd_sgemm_fn f);
int rd_have_sgemm(void);

/* Row-major C (M,N) = alpha * op(A) @ op(B) + beta * C, op(A) (M,K), op(B) (K,N).
 * A is stored (M,K) or, with transA, (K,M); B likewise; lda/ldb/ldc are row strides. */
rd_status rd_matmul(float *C, int ldc, const float *A, int lda, int transA,
                    const float *B, int ldb, int transB,
                    int64_t M, int64_t N, int64_t K, float alpha, float beta);

/* Threads: number OpenMP will use (1 without OpenMP). */
int rd_num_threads(void);

#include "route.h"
#include "moe.h"
#include "losses.h"
#include "model.h"
#include "optim.h"
#include "backend.h"
#ifdef RD_HAVE_CUDA
#include "cuda.h"
#endif

#ifdef __cplusplus
}
#endif
#endif /* RACEDIT_H */
