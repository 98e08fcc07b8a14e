/* dit.c — the layers of the DiT backbone (docs/method.md §1) on CPU: patchify, the fixed
 * position and timestep embeddings, linear, LayerNorm without affine, adaLN modulate, gated
 * residual, multi-head attention, SiLU/GELU and the label embedding. Each is a
 * forward/backward pair in llm.c's argument order (outputs, saved activations, inputs,
 * parameters, sizes). Matrix products go through rd_matmul / rd_matmul_par (BLAS), threaded
 * as rd_get_threading() says (moe.h); the elementwise loops are OpenMP-parallel over rows.
 * The model (model.c) composes them. */
#include "../racedit.h"
#include "moe_math.h"

#include <limits.h>
#include <math.h>
#include <string.h>

#define LN_EPS 1e-6f

static int bad_size(int64_t v) { return v <= 0; }

/* ---- patchify ----------------------------------------------------------------- */

/* Moves data between the image (B,C,H,W) and the tokens (B,L,p*p*C) in either direction;
 * the two are permutations of each other, so each one's backward is the other. */
static rd_status patch_move(float *tok, float *img, int to_tokens, int64_t B, int64_t C,
                            int64_t H, int64_t W, int64_t p, rd_patch_order order,
                            const char *what) {
    if (bad_size(B) || bad_size(C) || bad_size(H) || bad_size(W) || bad_size(p))
        return rd_fail(RD_EINVAL, "%s: sizes must be positive", what);
    if (H % p || W % p)
        return rd_fail(RD_EINVAL, "%s: image %lldx%lld is not a multiple of patch %lld", what,
                       (long long)H, (long long)W, (long long)p);
    if (order != RD_PATCH_CIJ && order != RD_PATCH_IJC)
        return rd_fail(RD_EINVAL, "%s: unknown patch order %d", what, (int)order);
    const int64_t gh = H / p, gw = W / p, P = p * p * C;
    /* feature f of (c, i, j): stride of c and of the (i, j) pair */
    const int64_t fc = order == RD_PATCH_CIJ ? p * p : 1;
    const int64_t fij = order == RD_PATCH_CIJ ? 1 : C;
#pragma omp parallel for collapse(2)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t hi = 0; hi < gh; hi++) {
            for (int64_t wi = 0; wi < gw; wi++) {
                float *t = tok + ((b * gh + hi) * gw + wi) * P;
                for (int64_t c = 0; c < C; c++) {
                    for (int64_t i = 0; i < p; i++) {
                        float *row = img + ((b * C + c) * H + hi * p + i) * W + wi * p;
                        for (int64_t j = 0; j < p; j++) {
                            float *f = t + c * fc + (i * p + j) * fij;
                            if (to_tokens) *f = row[j];
                            else row[j] = *f;
                        }
                    }
                }
            }
        }
    }
    return RD_OK;
}

rd_status rd_patchify_forward(float *tok, const float *img, int64_t B, int64_t C, int64_t H,
                              int64_t W, int64_t p, rd_patch_order order) {
    return patch_move(tok, (float *)img, 1, B, C, H, W, p, order, "patchify");
}
rd_status rd_unpatchify_forward(float *img, const float *tok, int64_t B, int64_t C, int64_t H,
                                int64_t W, int64_t p, rd_patch_order order) {
    return patch_move((float *)tok, img, 0, B, C, H, W, p, order, "unpatchify");
}

/* ---- fixed embeddings ------------------------------------------------------------ */

rd_status rd_pos_embed_2d(float *pe, int64_t gh, int64_t gw, int64_t D) {
    if (bad_size(gh) || bad_size(gw) || bad_size(D) || D % 4)
        return rd_fail(RD_EINVAL, "pos_embed_2d: need positive grid and D a multiple of 4, "
                       "got %lldx%lld, D=%lld", (long long)gh, (long long)gw, (long long)D);
    int64_t n;
    rd_status st = RD_SIZE(&n, sizeof(float), "pos_embed_2d: pe (gh*gw, D)", gh, gw, D);
    if (st) return st;
    const int64_t q = D / 4;
    for (int64_t r = 0; r < gh; r++) {
        for (int64_t s = 0; s < gw; s++) {
            float *e = pe + (r * gw + s) * D;
            for (int64_t k = 0; k < q; k++) {
                double w = pow(10000.0, -(double)k / (double)q);
                e[k] = (float)sin((double)s * w);
                e[q + k] = (float)cos((double)s * w);
                e[2 * q + k] = (float)sin((double)r * w);
                e[3 * q + k] = (float)cos((double)r * w);
            }
        }
    }
    return RD_OK;
}

rd_status rd_timestep_embedding_forward(float *emb, const float *t, int64_t B, int64_t F,
                                        float max_period) {
    if (bad_size(B) || bad_size(F) || F % 2)
        return rd_fail(RD_EINVAL, "timestep_embedding: need B > 0 and an even F, got B=%lld F=%lld",
                       (long long)B, (long long)F);
    if (!(max_period > 0.0f))
        return rd_fail(RD_EINVAL, "timestep_embedding: max_period must be > 0");
    const int64_t half = F / 2;
    const double lnp = log((double)max_period);
    for (int64_t b = 0; b < B; b++) {
        for (int64_t k = 0; k < half; k++) {
            double a = (double)t[b] * exp(-lnp * (double)k / (double)half);
            emb[b * F + k] = (float)cos(a);
            emb[b * F + half + k] = (float)sin(a);
        }
    }
    return RD_OK;
}

/* ---- linear ------------------------------------------------------------------------ */

static rd_status check_linear(int64_t N, int64_t IC, int64_t OC, const char *what) {
    if (N < 0 || bad_size(IC) || bad_size(OC))
        return rd_fail(RD_EINVAL, "%s: bad sizes N=%lld IC=%lld OC=%lld", what, (long long)N,
                       (long long)IC, (long long)OC);
    if (IC > INT_MAX || OC > INT_MAX)
        return rd_fail(RD_EINVAL, "%s: feature sizes exceed 32-bit BLAS strides", what);
    return RD_OK;
}

rd_status rd_linear_forward(float *out, const float *inp, const float *W, const float *b,
                            int64_t N, int64_t IC, int64_t OC) {
    rd_status s = check_linear(N, IC, OC, "linear");
    if (s) return s;
    if (b) { /* start from the bias, then let sgemm add the product (beta = 1) */
#pragma omp parallel for
        for (int64_t n = 0; n < N; n++) memcpy(out + n * OC, b, (size_t)OC * sizeof(float));
    }
    const int prev = rd_blas_threads_enter();
    s = rd_matmul_par(out, (int)OC, inp, (int)IC, 0, W, (int)IC, 1, N, OC, IC, 1.0f,
                      b ? 1.0f : 0.0f);
    rd_blas_threads_restore(prev);
    return s;
}

/* db (OC) += column sums of dout (N,OC), each column summed in row order (deterministic). */
static void colsum_acc(float *db, const float *dout, int64_t N, int64_t OC) {
    const int64_t blk = 64;
#pragma omp parallel for
    for (int64_t c0 = 0; c0 < OC; c0 += blk) {
        const int64_t c1 = c0 + blk < OC ? c0 + blk : OC;
        float acc[64] = {0};
        for (int64_t n = 0; n < N; n++) {
            const float *row = dout + n * OC;
            for (int64_t c = c0; c < c1; c++) acc[c - c0] += row[c];
        }
        for (int64_t c = c0; c < c1; c++) db[c] += acc[c - c0];
    }
}

rd_status rd_linear_backward(float *dinp, float *dW, float *db, const float *dout,
                             const float *inp, const float *W, int64_t N, int64_t IC, int64_t OC) {
    rd_status s = check_linear(N, IC, OC, "linear_backward");
    if (s) return s;
    const int prev = rd_blas_threads_enter();
    if (dinp) s = rd_matmul_par(dinp, (int)IC, dout, (int)OC, 0, W, (int)IC, 0, N, IC, OC, 1.0f, 0.0f);
    if (!s) s = rd_matmul_par(dW, (int)IC, dout, (int)OC, 1, inp, (int)IC, 0, OC, IC, N, 1.0f, 1.0f);
    rd_blas_threads_restore(prev);
    if (!s && db) colsum_acc(db, dout, N, OC);
    return s;
}

/* ---- LayerNorm (no affine) ------------------------------------------------------- */

rd_status rd_layernorm_forward(float *out, float *rstd, const float *inp, int64_t N, int64_t D) {
    if (N < 0 || bad_size(D)) return rd_fail(RD_EINVAL, "layernorm: bad sizes");
#pragma omp parallel for
    for (int64_t n = 0; n < N; n++) {
        const float *x = inp + n * D;
        float *o = out + n * D;
        float m = 0.0f;
#pragma omp simd reduction(+ : m)
        for (int64_t d = 0; d < D; d++) m += x[d];
        m /= (float)D;
        float v = 0.0f; /* two passes: no cancellation when |mean| >> std */
#pragma omp simd reduction(+ : v)
        for (int64_t d = 0; d < D; d++) v += (x[d] - m) * (x[d] - m);
        v /= (float)D;
        const float r = 1.0f / sqrtf(v + LN_EPS);
        for (int64_t d = 0; d < D; d++) o[d] = (x[d] - m) * r;
        rstd[n] = r;
    }
    return RD_OK;
}

rd_status rd_layernorm_backward(float *dinp_acc, const float *dout, const float *out,
                                const float *rstd, int64_t N, int64_t D) {
    if (N < 0 || bad_size(D)) return rd_fail(RD_EINVAL, "layernorm_backward: bad sizes");
#pragma omp parallel for
    for (int64_t n = 0; n < N; n++) {
        const float *g = dout + n * D, *xh = out + n * D;
        float *dx = dinp_acc + n * D;
        float mg = 0.0f, mgx = 0.0f;
#pragma omp simd reduction(+ : mg, mgx)
        for (int64_t d = 0; d < D; d++) {
            mg += g[d];
            mgx += g[d] * xh[d];
        }
        mg /= (float)D;
        mgx /= (float)D;
        const float r = rstd[n];
        for (int64_t d = 0; d < D; d++) dx[d] += r * (g[d] - mg - xh[d] * mgx);
    }
    return RD_OK;
}

/* ---- adaLN modulate and gated residual ------------------------------------------ */

static rd_status check_bld(int64_t B, int64_t L, int64_t D, int64_t S, const char *what) {
    if (bad_size(B) || bad_size(L) || bad_size(D) || S < D)
        return rd_fail(RD_EINVAL, "%s: bad sizes B=%lld L=%lld D=%lld stride=%lld", what,
                       (long long)B, (long long)L, (long long)D, (long long)S);
    return RD_OK;
}

rd_status rd_modulate_forward(float *out, const float *inp, const float *shift,
                              const float *scale, int64_t B, int64_t L, int64_t D, int64_t S) {
    rd_status s = check_bld(B, L, D, S, "modulate");
    if (s) return s;
#pragma omp parallel for collapse(2)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t l = 0; l < L; l++) {
            const float *x = inp + (b * L + l) * D, *sh = shift + b * S, *sc = scale + b * S;
            float *o = out + (b * L + l) * D;
            for (int64_t d = 0; d < D; d++) o[d] = x[d] * (1.0f + sc[d]) + sh[d];
        }
    }
    return RD_OK;
}

rd_status rd_modulate_backward(float *dinp, float *dshift, float *dscale, const float *dout,
                               const float *inp, const float *scale, int64_t B, int64_t L,
                               int64_t D, int64_t S) {
    rd_status s = check_bld(B, L, D, S, "modulate_backward");
    if (s) return s;
#pragma omp parallel for
    for (int64_t b = 0; b < B; b++) {
        const float *sc = scale + b * S;
        float *dsh = dshift + b * S, *dsc = dscale + b * S;
        memset(dsh, 0, (size_t)D * sizeof(float));
        memset(dsc, 0, (size_t)D * sizeof(float));
        for (int64_t l = 0; l < L; l++) {
            const float *g = dout + (b * L + l) * D, *x = inp + (b * L + l) * D;
            float *dx = dinp + (b * L + l) * D;
            for (int64_t d = 0; d < D; d++) {
                dx[d] = g[d] * (1.0f + sc[d]);
                dsh[d] += g[d];
                dsc[d] += g[d] * x[d];
            }
        }
    }
    return RD_OK;
}

rd_status rd_gated_residual_forward(float *out, const float *inp, const float *h,
                                    const float *gate, int64_t B, int64_t L, int64_t D,
                                    int64_t S) {
    rd_status s = check_bld(B, L, D, S, "gated_residual");
    if (s) return s;
#pragma omp parallel for collapse(2)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t l = 0; l < L; l++) {
            const float *x = inp + (b * L + l) * D, *y = h + (b * L + l) * D, *g = gate + b * S;
            float *o = out + (b * L + l) * D;
            for (int64_t d = 0; d < D; d++) o[d] = x[d] + g[d] * y[d];
        }
    }
    return RD_OK;
}

rd_status rd_gated_residual_backward(float *dh, float *dgate, const float *dout, const float *h,
                                     const float *gate, int64_t B, int64_t L, int64_t D,
                                     int64_t S) {
    rd_status s = check_bld(B, L, D, S, "gated_residual_backward");
    if (s) return s;
#pragma omp parallel for
    for (int64_t b = 0; b < B; b++) {
        const float *g = gate + b * S;
        float *dg = dgate + b * S;
        memset(dg, 0, (size_t)D * sizeof(float));
        for (int64_t l = 0; l < L; l++) {
            const float *go = dout + (b * L + l) * D, *y = h + (b * L + l) * D;
            float *dy = dh + (b * L + l) * D;
            for (int64_t d = 0; d < D; d++) {
                dy[d] = g[d] * go[d];
                dg[d] += go[d] * y[d];
            }
        }
    }
    return RD_OK;
}

/* ---- attention ------------------------------------------------------------------ */

static rd_status check_attention(int64_t B, int64_t L, int64_t D, int64_t NH, const char *what) {
    if (bad_size(B) || bad_size(L) || bad_size(D) || bad_size(NH) || D % NH)
        return rd_fail(RD_EINVAL, "%s: need positive sizes and D %% NH == 0, got B=%lld L=%lld "
                       "D=%lld NH=%lld", what, (long long)B, (long long)L, (long long)D,
                       (long long)NH);
    if (!rd_have_sgemm()) return rd_fail(RD_EBLAS, "%s: no BLAS sgemm registered", what);
    if (3 * D > INT_MAX || L > INT_MAX)
        return rd_fail(RD_EINVAL, "%s: sizes exceed 32-bit BLAS", what);
    return RD_OK;
}

/* One (b, h) pair: att (L,L) = softmax(q k^T / sqrt(hd)), o (L,hd) = att v, where q, k, v
 * are (L,hd) blocks of qkv (row stride 3D) and o a block of out (row stride D). */
static void head_forward(float *o, float *att, const float *q, int64_t L, int64_t D, int64_t hd,
                         float scale) {
    const int D3 = (int)(3 * D);
    rd_matmul(att, (int)L, q, D3, 0, q + D, D3, 1, L, L, hd, scale, 0.0f);
    for (int64_t i = 0; i < L; i++) { /* softmax, max subtracted, in float32 */
        float *r = att + i * L;
        float mx = r[0];
        for (int64_t j = 1; j < L; j++) mx = r[j] > mx ? r[j] : mx;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < L; j++) {
            r[j] = rd_exp_nonpos(r[j] - mx); /* argument <= 0 */
            sum += r[j];
        }
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < L; j++) r[j] *= inv;
    }
    rd_matmul(o, (int)D, att, (int)L, 0, q + 2 * D, D3, 0, L, hd, L, 1.0f, 0.0f);
}

/* Backward of head_forward: dq, dk, dv blocks of dqkv from g (block of dout); da (L,L)
 * scratch. */
static void head_backward(float *dq, float *da, const float *g, const float *q, const float *att,
                          int64_t L, int64_t D, int64_t hd, float scale) {
    const int D3 = (int)(3 * D);
    rd_matmul(da, (int)L, g, (int)D, 0, q + 2 * D, D3, 1, L, L, hd, 1.0f, 0.0f);  /* g v^T */
    rd_matmul(dq + 2 * D, D3, att, (int)L, 1, g, (int)D, 0, L, hd, L, 1.0f, 0.0f); /* dv */
    for (int64_t i = 0; i < L; i++) { /* softmax backward, in place */
        const float *ar = att + i * L;
        float *dr = da + i * L;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < L; j++) dot += ar[j] * dr[j];
        for (int64_t j = 0; j < L; j++) dr[j] = ar[j] * (dr[j] - dot);
    }
    rd_matmul(dq, D3, da, (int)L, 0, q + D, D3, 0, L, hd, L, scale, 0.0f);        /* dS k */
    rd_matmul(dq + D, D3, da, (int)L, 1, q, D3, 0, L, hd, L, scale, 0.0f);        /* dS^T q */
}

/* Threading follows rd_get_threading() (process-wide, moe.h): with RD_THREADS_OMP the
 * (b, h) pairs run in an OpenMP loop with a single-threaded BLAS; with RD_THREADS_BLAS one
 * pair after another, each product threaded by the BLAS. Measured with
 * benchmarks/bench_model.py (B=8, NH=6, D=384, forward+backward, 2 cores shared with
 * other jobs, SciPy's OpenBLAS): at L=256 the OpenMP loop took 74 ms against 176 ms, the
 * L x L x hd products being too small for the BLAS to split well; at L=64 both took
 * 1-3 ms, within the noise. Dynamic scheduling lets one thread take over the pairs of a
 * thread the OS has descheduled. The sizes were checked before the loop, so rd_matmul
 * cannot fail inside it. */
rd_status rd_attention_forward(float *out, float *att, const float *qkv, int64_t B, int64_t L,
                               int64_t D, int64_t NH) {
    rd_status s = check_attention(B, L, D, NH, "attention");
    if (s) return s;
    const int64_t hd = D / NH;
    const float scale = 1.0f / sqrtf((float)hd);
    const int par = rd_get_threading() == RD_THREADS_OMP;
    const int prev = rd_blas_threads_enter();
#pragma omp parallel for schedule(dynamic, 1) if (par)
    for (int64_t bh = 0; bh < B * NH; bh++) {
        const int64_t b = bh / NH, h = bh % NH;
        head_forward(out + b * L * D + h * hd, att + bh * L * L, qkv + b * L * 3 * D + h * hd, L, D,
                     hd, scale);
    }
    rd_blas_threads_restore(prev);
    return RD_OK;
}

rd_status rd_attention_backward(float *dqkv, float *datt, const float *dout, const float *qkv,
                                const float *att, int64_t B, int64_t L, int64_t D, int64_t NH) {
    rd_status s = check_attention(B, L, D, NH, "attention_backward");
    if (s) return s;
    const int64_t hd = D / NH;
    const float scale = 1.0f / sqrtf((float)hd);
    const int par = rd_get_threading() == RD_THREADS_OMP;
    const int prev = rd_blas_threads_enter();
#pragma omp parallel for schedule(dynamic, 1) if (par)
    for (int64_t bh = 0; bh < B * NH; bh++) {
        const int64_t b = bh / NH, h = bh % NH, o = b * L * 3 * D + h * hd;
        head_backward(dqkv + o, datt + bh * L * L, dout + b * L * D + h * hd, qkv + o,
                      att + bh * L * L, L, D, hd, scale);
    }
    rd_blas_threads_restore(prev);
    return RD_OK;
}

/* ---- elementwise ---------------------------------------------------------------------- */

rd_status rd_silu_forward(float *out, const float *inp, int64_t n) {
#pragma omp parallel for if (n > 65536)
    for (int64_t i = 0; i < n; i++) out[i] = inp[i] / (1.0f + expf(-inp[i]));
    return RD_OK;
}

rd_status rd_silu_backward(float *dinp, const float *dout, const float *inp, int64_t n) {
#pragma omp parallel for if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        const float sg = 1.0f / (1.0f + expf(-inp[i]));
        dinp[i] = dout[i] * sg * (1.0f + inp[i] * (1.0f - sg));
    }
    return RD_OK;
}

/* The vectorisable GELU of moe_math.h (the experts' own), so dense and MoE blocks agree. */
rd_status rd_gelu_forward(float *out, const float *inp, int64_t n) {
#pragma omp parallel for simd if (n > 65536)
    for (int64_t i = 0; i < n; i++) out[i] = rd_gelu_tanh_v(inp[i]);
    return RD_OK;
}

rd_status rd_gelu_backward(float *dinp, const float *dout, const float *inp, int64_t n) {
#pragma omp parallel for simd if (n > 65536)
    for (int64_t i = 0; i < n; i++) dinp[i] = dout[i] * rd_gelu_tanh_grad_v(inp[i]);
    return RD_OK;
}

/* ---- label embedding ------------------------------------------------------------------- */

rd_status rd_embedding_forward(float *out, const int64_t *y, const float *table, int64_t B,
                               int64_t V, int64_t D) {
    if (B < 0 || bad_size(V) || bad_size(D)) return rd_fail(RD_EINVAL, "embedding: bad sizes");
    for (int64_t b = 0; b < B; b++)
        if (y[b] < 0 || y[b] >= V)
            return rd_fail(RD_EINVAL, "embedding: label y[%lld]=%lld outside [0, %lld]",
                           (long long)b, (long long)y[b], (long long)(V - 1));
    for (int64_t b = 0; b < B; b++)
        memcpy(out + b * D, table + y[b] * D, (size_t)D * sizeof(float));
    return RD_OK;
}

rd_status rd_embedding_backward(float *dtable, const float *dout, const int64_t *y, int64_t B,
                                int64_t V, int64_t D) {
    if (B < 0 || bad_size(V) || bad_size(D))
        return rd_fail(RD_EINVAL, "embedding_backward: bad sizes");
    for (int64_t b = 0; b < B; b++)
        if (y[b] < 0 || y[b] >= V)
            return rd_fail(RD_EINVAL, "embedding_backward: label y[%lld]=%lld outside [0, %lld]",
                           (long long)b, (long long)y[b], (long long)(V - 1));
    for (int64_t b = 0; b < B; b++) { /* serial: labels repeat, rows would race */
        float *row = dtable + y[b] * D;
        const float *g = dout + b * D;
        for (int64_t d = 0; d < D; d++) row[d] += g[d];
    }
    return RD_OK;
}
