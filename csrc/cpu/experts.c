/* experts.c — the dropless expert FFN of docs/method.md §2: dispatch the selected (token,
 * expert) pairs into expert-contiguous rows, run every expert as two sgemm calls on its rows
 * only, and combine the gated outputs back per token. Nothing is padded or dropped; all
 * buffers scale with P (selected pairs) and N (tokens), never with N*E*He.
 *
 * Layout of the P rows: expert-major (rows of expert e are offsets[e]..offsets[e+1]-1),
 * tokens ascending inside an expert. A per-token CSR (tok_ptr, tok_row) lists the rows
 * of each token in ascending expert order, so the combine and the dx reduction are
 * parallel over tokens and bitwise deterministic (no atomics, no scatter races).
 *
 * Threading: elementwise passes, gathers and per-token reductions use OpenMP. The
 * per-expert GEMMs run either one expert after another with the BLAS threading each
 * call (mode 0, default: the experts' GEMMs at DiT sizes are large enough for the BLAS
 * to use every core, and it keeps OpenMP and BLAS threads from oversubscribing), or
 * with OpenMP over experts calling a single-threaded BLAS (mode 1, for many small
 * experts). benchmarks/bench_moe.py measures both. In mode 1 every sgemm call is a
 * function of the shapes only, so the results are bit-identical at any thread count; in
 * mode 0 they are as thread-count independent as the BLAS's own threading. */
#include "../racedit.h"
#include "moe_math.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* A growable scratch buffer: reallocated only when a call needs more than it holds. */
typedef struct { void *p; size_t cap; } rd_buf;

/* Room for rows x cols elements of elsize bytes; NULL when out of memory or when the size
 * does not fit (RD_MAX_ALLOC_BYTES). */
static void *buf_get(rd_buf *b, int64_t rows, int64_t cols, size_t elsize) {
    int64_t n;
    if (!rd_mul_ok(rows, cols, &n) || (double)n * (double)elsize > RD_MAX_ALLOC_BYTES) return NULL;
    size_t bytes = (size_t)n * elsize;
    if (bytes == 0) bytes = 1;
    if (bytes > b->cap) {
        void *q = realloc(b->p, bytes);
        if (!q) return NULL;
        b->p = q;
        b->cap = bytes;
    }
    return b->p;
}

struct rd_experts {
    int64_t N, D, E, He, P;  /* sizes of the saved forward */
    int valid;               /* 1 when the buffers hold a complete forward */
    rd_buf counts_b, offsets_b, cursor_b; /* (E), (E+1), (E) */
    rd_buf tok_ptr_b;        /* (N+1) */
    rd_buf tok_row_b;        /* (P) rows of each token, ascending expert */
    rd_buf row_tok_b;        /* (P) token of each row */
    rd_buf row_exp_b;        /* (P) expert of each row (int32) */
    rd_buf row_gate_b;       /* (P) G[t,e] of each row */
    rd_buf xg_b;             /* (P,D)  gathered x rows */
    rd_buf a_b;              /* (P,He) pre-activation xg W1 + b1 */
    rd_buf hdn_b;            /* (P,He) GELU_tanh(a) */
    rd_buf o_b;              /* (P,D)  expert outputs hdn W2 + b2 */
    rd_buf dbuf_b;           /* (P,D)  backward: do, then dxg */
    rd_buf dhid_b;           /* (P,He) backward: dhdn, then da */
};

rd_experts *rd_experts_new(void) { return (rd_experts *)calloc(1, sizeof(rd_experts)); }

void rd_experts_free(rd_experts *ex) {
    if (!ex) return;
    rd_buf *bufs[] = {&ex->counts_b, &ex->offsets_b, &ex->cursor_b, &ex->tok_ptr_b,
                      &ex->tok_row_b, &ex->row_tok_b, &ex->row_exp_b, &ex->row_gate_b,
                      &ex->xg_b, &ex->a_b, &ex->hdn_b, &ex->o_b, &ex->dbuf_b, &ex->dhid_b};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]->p);
    free(ex);
}

int64_t rd_experts_pairs(const rd_experts *ex) { return ex && ex->valid ? ex->P : 0; }
const int64_t *rd_experts_counts(const rd_experts *ex) {
    return ex && ex->valid ? (const int64_t *)ex->counts_b.p : NULL;
}

static rd_status check_sizes(const char *fn, int64_t N, int64_t D, int64_t E, int64_t He) {
    if (N < 0 || D <= 0 || E <= 0 || He <= 0)
        return rd_fail(RD_EINVAL, "%s: sizes must be N >= 0 and D, E, He > 0, got N=%lld D=%lld "
                       "E=%lld He=%lld", fn, (long long)N, (long long)D, (long long)E,
                       (long long)He);
    if (N > INT_MAX || D > INT_MAX || He > INT_MAX || E > INT_MAX)
        return rd_fail(RD_EINVAL, "%s: N=%lld, D=%lld, He=%lld or E=%lld exceeds the 32-bit "
                       "BLAS interface", fn, (long long)N, (long long)D, (long long)He,
                       (long long)E);
    if (!rd_have_sgemm()) return rd_fail(RD_EBLAS, "no BLAS sgemm registered (import racedit first)");
    return RD_OK;
}

#define GET(ex, name, type, rows, cols) ((type *)buf_get(&(ex)->name##_b, (rows), (cols), sizeof(type)))

/* Build the expert-major rows and the per-token CSR from mask (N,E). */
static rd_status dispatch(rd_experts *ex, const uint8_t *mask, const float *G, int64_t N,
                          int64_t E) {
    int64_t *counts = GET(ex, counts, int64_t, E, 1);
    int64_t *offsets = GET(ex, offsets, int64_t, E + 1, 1);
    int64_t *cursor = GET(ex, cursor, int64_t, E, 1);
    int64_t *tok_ptr = GET(ex, tok_ptr, int64_t, N + 1, 1);
    if (!counts || !offsets || !cursor || !tok_ptr)
        return rd_fail(RD_ENOMEM, "experts: out of memory for the dispatch of N=%lld E=%lld",
                       (long long)N, (long long)E);
    memset(counts, 0, (size_t)E * sizeof(int64_t));
    tok_ptr[0] = 0;
    for (int64_t t = 0; t < N; t++) {
        const uint8_t *m = mask + t * E;
        int64_t c = 0;
        for (int64_t e = 0; e < E; e++) {
            int s = m[e] != 0;
            counts[e] += s;
            c += s;
        }
        tok_ptr[t + 1] = tok_ptr[t] + c;
    }
    offsets[0] = 0;
    for (int64_t e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];
    int64_t P = offsets[E];
    int64_t *tok_row = GET(ex, tok_row, int64_t, P, 1);
    int64_t *row_tok = GET(ex, row_tok, int64_t, P, 1);
    int32_t *row_exp = GET(ex, row_exp, int32_t, P, 1);
    float *row_gate = GET(ex, row_gate, float, P, 1);
    if (!tok_row || !row_tok || !row_exp || !row_gate)
        return rd_fail(RD_ENOMEM, "experts: out of memory for P=%lld selected pairs", (long long)P);
    memcpy(cursor, offsets, (size_t)E * sizeof(int64_t));
    for (int64_t t = 0; t < N; t++) {
        const uint8_t *m = mask + t * E;
        int64_t j = tok_ptr[t];
        for (int64_t e = 0; e < E; e++) {
            if (!m[e]) continue;
            int64_t r = cursor[e]++;
            row_tok[r] = t;
            row_exp[r] = (int32_t)e;
            row_gate[r] = G[t * E + e];
            tok_row[j++] = r;
        }
    }
    ex->P = P;
    return RD_OK;
}

/* Parallel over (segment, column block); each sum runs in row order: deterministic. */
void rd_colsum_segments(float *out /* S,cols */, const float *in /* rows,cols */,
                        const int64_t *offsets /* S+1 */, int64_t E, int64_t cols) {
    enum { CB = 64 };
    int64_t nb = (cols + CB - 1) / CB;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t task = 0; task < E * nb; task++) {
        int64_t e = task / nb, c0 = (task % nb) * CB;
        int64_t w = cols - c0 < CB ? cols - c0 : CB;
        float acc[CB];
        for (int64_t c = 0; c < w; c++) acc[c] = 0.0f;
        for (int64_t r = offsets[e]; r < offsets[e + 1]; r++) {
            const float *row = in + r * cols + c0;
            for (int64_t c = 0; c < w; c++) acc[c] += row[c];
        }
        for (int64_t c = 0; c < w; c++) out[e * cols + c0 + c] += acc[c];
    }
}

/* ---- threading ------------------------------------------------------------- */

static rd_threading g_threading = RD_THREADS_BLAS;
static rd_blas_set_threads_fn g_blas_set = NULL;
static rd_blas_get_threads_fn g_blas_get = NULL;

/* Without OpenMP there are no OpenMP threads to share the work: the BLAS keeps its own. */
void rd_set_threading(rd_threading mode) {
#ifdef _OPENMP
    g_threading = mode == RD_THREADS_OMP ? RD_THREADS_OMP : RD_THREADS_BLAS;
#else
    (void)mode;
    g_threading = RD_THREADS_BLAS;
#endif
}
rd_threading rd_get_threading(void) { return g_threading; }

void rd_set_blas_thread_control(rd_blas_set_threads_fn set, rd_blas_get_threads_fn get) {
    g_blas_set = set && get ? set : NULL;
    g_blas_get = set && get ? get : NULL;
}
int rd_have_blas_thread_control(void) { return g_blas_set != NULL; }

int rd_blas_threads_enter(void) {
    if (g_threading != RD_THREADS_OMP || !g_blas_set) return 0;
    int prev = g_blas_get();
    if (prev != 1) g_blas_set(1);
    return prev;
}
void rd_blas_threads_restore(int prev) {
    if (prev > 1 && g_blas_set) g_blas_set(prev);
}

/* Smallest row block worth a separate sgemm call. */
#define RD_MIN_ROWS 32
/* Least work (multiply-adds) of a row block: enough to amortise a call (packing the other
 * operand again, the kernel's edges). */
#define RD_BLOCK_WORK (1 << 24)
/* Most blocks of one product: plenty for the threads of one machine. */
#define RD_MAX_BLOCKS 64

/* Rows per block of an M x cols x K product: M split evenly into the largest power of two
 * of blocks (so that 2, 4, 8 ... threads share them evenly) that keeps RD_BLOCK_WORK each,
 * rows a multiple of 8, at least RD_MIN_ROWS. A function of the shape only, never of the
 * thread count: OpenBLAS's single-threaded sgemm picks its kernel and K blocking by the
 * call's shape, so a product split differently rounds differently. With the same calls at
 * any thread count, every output bit is the same (tests/layers/test_determinism.py). */
static int64_t block_rows(int64_t M, int64_t cols, int64_t K) {
    const double work = (double)M * (double)cols * (double)K;
    int64_t nb = 1;
    while (nb < RD_MAX_BLOCKS && work >= 2.0 * (double)nb * RD_BLOCK_WORK) nb *= 2;
    int64_t b = (M + nb - 1) / nb;
    b = (b + 7) / 8 * 8;
    return b < RD_MIN_ROWS ? RD_MIN_ROWS : b;
}

rd_status rd_matmul_par(float *C, int ldc, const float *A, int lda, int transA,
                        const float *B, int ldb, int transB,
                        int64_t M, int64_t N, int64_t K, float alpha, float beta) {
    if (g_threading != RD_THREADS_OMP || M < 2 * RD_MIN_ROWS)
        return rd_matmul(C, ldc, A, lda, transA, B, ldb, transB, M, N, K, alpha, beta);
    /* validate here: a failure inside a worker thread would leave its message there */
    if (!rd_have_sgemm()) return rd_fail(RD_EBLAS, "no BLAS sgemm registered (import racedit first)");
    if (N < 0 || K < 0 || M > INT_MAX || N > INT_MAX || K > INT_MAX)
        return rd_fail(RD_EINVAL, "matmul: size %lld x %lld x %lld out of range of the 32-bit BLAS",
                       (long long)M, (long long)N, (long long)K);
    int64_t rows = block_rows(M, N, K), nblk = (M + rows - 1) / rows;
#pragma omp parallel for schedule(dynamic, 1) if (nblk > 1)
    for (int64_t i = 0; i < nblk; i++) {
        int64_t m0 = i * rows, m = M - m0 < rows ? M - m0 : rows;
        rd_matmul(C + m0 * ldc, ldc, transA ? A + m0 : A + m0 * lda, lda, transA, B, ldb, transB,
                  m, N, K, alpha, beta);
    }
    return RD_OK;
}

/* ---- the per-expert products ------------------------------------------------- */

/* The six products, for rows [m0, m1) of the output of expert e (rows of its block of
 * the P rows for the row products, rows of its weight gradient for 2 and 4):
 *   0: a = xg W1[e]          1: o += hdn W2[e]         2: dW2[e] += hdn^T do
 *   3: dhid = do W2[e]^T     4: dW1[e] += xg^T da      5: dxg = da W1[e]^T          */
typedef struct {
    const int64_t *offsets;
    int64_t D, He;
} gemm_plan;

static int64_t product_rows(const gemm_plan *pl, int which, int64_t e) {
    int64_t n = pl->offsets[e + 1] - pl->offsets[e];
    if (n == 0) return 0;
    return which == 2 ? pl->He : which == 4 ? pl->D : n;
}

/* Row block of expert e's product: from its shape (rows, columns, inner size) alone. */
static int64_t product_block(const gemm_plan *pl, int which, int64_t e) {
    int64_t n = pl->offsets[e + 1] - pl->offsets[e];
    int64_t cols = which == 0 || which == 3 || which == 4 ? pl->He : pl->D;
    int64_t K = which == 2 || which == 4 ? n : which == 0 || which == 3 ? pl->D : pl->He;
    return block_rows(product_rows(pl, which, e), cols, K);
}

static void expert_gemm(const gemm_plan *pl, int which, int64_t e, int64_t m0, int64_t m1,
                        float *C, const float *A, const float *W) {
    int64_t off = pl->offsets[e], n = pl->offsets[e + 1] - off, D = pl->D, He = pl->He;
    int64_t r = off + m0, m = m1 - m0;
    int iD = (int)D, iH = (int)He;
    switch (which) {
    case 0: rd_matmul(C + r * He, iH, A + r * D, iD, 0, W + e * D * He, iH, 0, m, He, D, 1.0f, 0.0f); break;
    case 1: rd_matmul(C + r * D, iD, A + r * He, iH, 0, W + e * He * D, iD, 0, m, D, He, 1.0f, 1.0f); break;
    case 2: rd_matmul(C + (e * He + m0) * D, iD, A + off * He + m0, iH, 1, W + off * D, iD, 0,
                      m, D, n, 1.0f, 1.0f); break;
    case 3: rd_matmul(C + r * He, iH, A + r * D, iD, 0, W + e * He * D, iD, 1, m, He, D, 1.0f, 0.0f); break;
    case 4: rd_matmul(C + (e * D + m0) * He, iH, A + off * D + m0, iD, 1, W + off * He, iH, 0,
                      m, He, n, 1.0f, 1.0f); break;
    case 5: rd_matmul(C + r * D, iD, A + r * He, iH, 0, W + e * D * He, iH, 1, m, D, He, 1.0f, 0.0f); break;
    }
}

/* One product for every expert. RD_THREADS_BLAS: experts in turn, whole blocks, BLAS
 * threads. RD_THREADS_OMP: dynamic OpenMP tasks over (expert, row block), so uneven
 * expert loads (expert race) and few experts still spread over every thread; the blocks
 * depend on the shapes only (block_rows), not on the thread count. Sizes were
 * checked by the caller, so rd_matmul cannot fail here. */
static void all_experts(const gemm_plan *pl, int which, int64_t E, float *C, const float *A,
                        const float *W) {
    if (g_threading != RD_THREADS_OMP) {
        for (int64_t e = 0; e < E; e++) expert_gemm(pl, which, e, 0, product_rows(pl, which, e), C, A, W);
        return;
    }
    int64_t nb = 0;
    for (int64_t e = 0; e < E; e++) {
        int64_t m = product_rows(pl, which, e), rows = product_block(pl, which, e);
        nb = (m + rows - 1) / rows > nb ? (m + rows - 1) / rows : nb;
    }
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t e = 0; e < E; e++)
        for (int64_t b = 0; b < nb; b++) {
            int64_t m = product_rows(pl, which, e), rows = product_block(pl, which, e);
            int64_t m0 = b * rows;
            if (m0 < m) expert_gemm(pl, which, e, m0, m0 + rows < m ? m0 + rows : m, C, A, W);
        }
}

rd_status rd_experts_forward(rd_experts *ex, float *y, const uint8_t *mask, const float *G,
                             const float *x, const float *W1, const float *b1,
                             const float *W2, const float *b2,
                             int64_t N, int64_t D, int64_t E, int64_t He) {
    if (!ex) return rd_fail(RD_EINVAL, "experts_forward: NULL workspace");
    rd_status s = check_sizes("experts_forward", N, D, E, He);
    if (s) return s;
    ex->valid = 0;
    if ((s = dispatch(ex, mask, G, N, E))) return s;
    int64_t P = ex->P;
    float *xg = GET(ex, xg, float, P, D);
    float *a = GET(ex, a, float, P, He);
    float *hdn = GET(ex, hdn, float, P, He);
    float *o = GET(ex, o, float, P, D);
    if (!xg || !a || !hdn || !o)
        return rd_fail(RD_ENOMEM, "experts_forward: out of memory for P=%lld rows (D=%lld, "
                       "He=%lld)", (long long)P, (long long)D, (long long)He);
    const int64_t *row_tok = ex->row_tok_b.p, *tok_ptr = ex->tok_ptr_b.p, *tok_row = ex->tok_row_b.p;
    const int32_t *row_exp = ex->row_exp_b.p;
    const float *row_gate = ex->row_gate_b.p;
    gemm_plan pl = {ex->offsets_b.p, D, He};
    int blas_prev = rd_blas_threads_enter();

#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < P; r++) memcpy(xg + r * D, x + row_tok[r] * D, (size_t)D * sizeof(float));

    all_experts(&pl, 0, E, a, xg, W1);                         /* a = xg W1[e] */
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < P; r++) {                          /* a += b1; hdn = GELU(a) */
        const float *bb = b1 + (int64_t)row_exp[r] * He;
        float *ar = a + r * He, *hr = hdn + r * He;
#pragma omp simd
        for (int64_t j = 0; j < He; j++) {
            float v = ar[j] + bb[j];
            ar[j] = v;
            hr[j] = rd_gelu_tanh_v(v);
        }
    }
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < P; r++)                            /* o = b2, then += hdn W2[e] */
        memcpy(o + r * D, b2 + (int64_t)row_exp[r] * D, (size_t)D * sizeof(float));
    all_experts(&pl, 1, E, o, hdn, W2);

#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {                          /* y_t = sum g_r o_r */
        float *yt = y + t * D;
        for (int64_t c = 0; c < D; c++) yt[c] = 0.0f;
        for (int64_t j = tok_ptr[t]; j < tok_ptr[t + 1]; j++) {
            int64_t r = tok_row[j];
            float g = row_gate[r];
            const float *orow = o + r * D;
#pragma omp simd
            for (int64_t c = 0; c < D; c++) yt[c] += g * orow[c];
        }
    }
    rd_blas_threads_restore(blas_prev);
    ex->N = N; ex->D = D; ex->E = E; ex->He = He;
    ex->valid = 1;
    return RD_OK;
}

rd_status rd_experts_backward(rd_experts *ex, float *dx, float *dG, float *dW1, float *db1,
                              float *dW2, float *db2, const float *dy,
                              const float *W1, const float *W2,
                              int64_t N, int64_t D, int64_t E, int64_t He) {
    if (!ex || !ex->valid)
        return rd_fail(RD_ESTATE, "experts_backward: no forward to differentiate (call forward first)");
    if (ex->N != N || ex->D != D || ex->E != E || ex->He != He)
        return rd_fail(RD_ESTATE, "experts_backward: sizes N=%lld D=%lld E=%lld He=%lld differ from "
                       "the last forward's N=%lld D=%lld E=%lld He=%lld", (long long)N, (long long)D,
                       (long long)E, (long long)He, (long long)ex->N, (long long)ex->D,
                       (long long)ex->E, (long long)ex->He);
    rd_status s = check_sizes("experts_backward", N, D, E, He);
    if (s) return s;
    int64_t P = ex->P;
    float *dbuf = GET(ex, dbuf, float, P, D);
    float *dhid = GET(ex, dhid, float, P, He);
    if (!dbuf || !dhid)
        return rd_fail(RD_ENOMEM, "experts_backward: out of memory for P=%lld rows", (long long)P);
    const int64_t *tok_ptr = ex->tok_ptr_b.p, *tok_row = ex->tok_row_b.p, *offsets = ex->offsets_b.p;
    const int32_t *row_exp = ex->row_exp_b.p;
    const float *row_gate = ex->row_gate_b.p;
    const float *xg = ex->xg_b.p, *a = ex->a_b.p, *hdn = ex->hdn_b.p, *o = ex->o_b.p;
    gemm_plan pl = {offsets, D, He};
    int blas_prev = rd_blas_threads_enter();

#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {          /* dG[t,e] = <dy_t, o_r>; do_r = g_r dy_t */
        const float *dyt = dy + t * D;
        float *dGt = dG + t * E;
        for (int64_t e = 0; e < E; e++) dGt[e] = 0.0f;
        for (int64_t j = tok_ptr[t]; j < tok_ptr[t + 1]; j++) {
            int64_t r = tok_row[j];
            const float *orow = o + r * D;
            float *dr = dbuf + r * D, g = row_gate[r], acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t c = 0; c < D; c++) {
                acc += dyt[c] * orow[c];
                dr[c] = g * dyt[c];
            }
            dGt[row_exp[r]] = acc;
        }
    }
    rd_colsum_segments(db2, dbuf, offsets, E, D);                /* db2 += sum do */
    all_experts(&pl, 2, E, dW2, hdn, dbuf);                    /* dW2 += hdn^T do */
    all_experts(&pl, 3, E, dhid, dbuf, W2);                    /* dhdn = do W2^T */
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < P; r++) {                          /* da = dhdn GELU'(a) */
        float *dr = dhid + r * He;
        const float *ar = a + r * He;
#pragma omp simd
        for (int64_t j = 0; j < He; j++) dr[j] *= rd_gelu_tanh_grad_v(ar[j]);
    }
    rd_colsum_segments(db1, dhid, offsets, E, He);               /* db1 += sum da */
    all_experts(&pl, 4, E, dW1, xg, dhid);                     /* dW1 += xg^T da */
    all_experts(&pl, 5, E, dbuf, dhid, W1);                    /* dxg = da W1^T (over do) */

#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {                          /* dx_t = sum of t's dxg rows */
        float *dxt = dx + t * D;
        for (int64_t c = 0; c < D; c++) dxt[c] = 0.0f;
        for (int64_t j = tok_ptr[t]; j < tok_ptr[t + 1]; j++) {
            const float *dr = dbuf + tok_row[j] * D;
#pragma omp simd
            for (int64_t c = 0; c < D; c++) dxt[c] += dr[c];
        }
    }
    rd_blas_threads_restore(blas_prev);
    return RD_OK;
}
