/* check.c — the checking backend ("check"): the CPU kernels behind a guarded pool, for the
 * tests. It plays a device whose memory the host must not touch: every allocation comes
 * from its own pool (guard bytes on both sides, fresh memory filled with NaN bytes), data
 * crosses only through upload / download (each side checked), and every op refuses a
 * pointer the pool did not hand out: a host array where backend memory is expected is an
 * RD_ESTATE error naming the op and the argument, and is counted in the pool's report. So a
 * host/device mix-up in the model graph or the binding fails on any machine; results are
 * the CPU's bit for bit.
 *
 * MoE states wrap the CPU's; what their views hand out (mask, gates, logits, hidden, the
 * PLR prediction) is copied into pool memory first, as a device backend would own it. */
#include "../backend.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GUARD 64            /* bytes on each side of an allocation */
#define GUARD_BYTE 0xA5
#define FRESH_BYTE 0xFF     /* a float of these bytes is a NaN */

typedef struct {
    char *p;      /* what the pool handed out */
    size_t bytes;
} chunk;

static struct {
    pthread_mutex_t mu;
    chunk *c;
    int64_t n, cap, bytes, errors;
    int64_t uploads, upload_bytes, downloads, download_bytes; /* since the last reset */
    char first[256];
} pool = {PTHREAD_MUTEX_INITIALIZER, NULL, 0, 0, 0, 0, 0, 0, 0, 0, ""};

/* One transfer counted (direction d: 0 upload, 1 download). */
static void count(int d, size_t bytes) {
    pthread_mutex_lock(&pool.mu);
    if (d) { pool.downloads++; pool.download_bytes += (int64_t)bytes; }
    else { pool.uploads++; pool.upload_bytes += (int64_t)bytes; }
    pthread_mutex_unlock(&pool.mu);
}

/* Record a misuse (the first message is kept) and return it as RD_ESTATE. Called with the
 * pool's lock held. */
static rd_status misuse(const char *fmt, const char *op, const char *arg) {
    char msg[256];
    snprintf(msg, sizeof msg, fmt, op, arg);
    if (pool.errors++ == 0) snprintf(pool.first, sizeof pool.first, "%s", msg);
    return rd_fail(RD_ESTATE, "%s", msg);
}

static int64_t find(const void *p) {
    const char *q = p;
    for (int64_t i = 0; i < pool.n; i++)
        if (q >= pool.c[i].p && q < pool.c[i].p + (pool.c[i].bytes ? pool.c[i].bytes : 1))
            return i;
    return -1;
}

static int guards_intact(const chunk *c) {
    for (int i = 0; i < GUARD; i++)
        if ((unsigned char)c->p[-1 - i] != GUARD_BYTE ||
            (unsigned char)c->p[c->bytes + i] != GUARD_BYTE)
            return 0;
    return 1;
}

static rd_status ck_alloc(void **out, size_t bytes) {
    *out = NULL;
    if (bytes == 0) return RD_OK;
    char *raw = malloc(bytes + 2 * GUARD);
    if (!raw) return rd_fail(RD_ENOMEM, "check backend: out of memory allocating %zu bytes", bytes);
    memset(raw, GUARD_BYTE, GUARD);
    memset(raw + GUARD, FRESH_BYTE, bytes);
    memset(raw + GUARD + bytes, GUARD_BYTE, GUARD);
    pthread_mutex_lock(&pool.mu);
    if (pool.n == pool.cap) {
        int64_t nc = pool.cap ? 2 * pool.cap : 64;
        chunk *c = realloc(pool.c, (size_t)nc * sizeof *c);
        if (!c) {
            pthread_mutex_unlock(&pool.mu);
            free(raw);
            return rd_fail(RD_ENOMEM, "check backend: out of memory for the pool's table");
        }
        pool.c = c;
        pool.cap = nc;
    }
    pool.c[pool.n++] = (chunk){raw + GUARD, bytes};
    pool.bytes += (int64_t)bytes;
    pthread_mutex_unlock(&pool.mu);
    *out = raw + GUARD;
    return RD_OK;
}

static void ck_free(void *p) {
    if (!p) return;
    pthread_mutex_lock(&pool.mu);
    int64_t i = find(p);
    if (i < 0 || pool.c[i].p != p) {
        misuse("check backend: %s of %s, a pointer the pool did not hand out", "free", "p");
    } else {
        if (!guards_intact(&pool.c[i]))
            misuse("check backend: %s: the guard bytes of %s were overwritten", "free",
                   "an allocation");
        free(pool.c[i].p - GUARD);
        pool.bytes -= (int64_t)pool.c[i].bytes;
        pool.c[i] = pool.c[--pool.n];
    }
    pthread_mutex_unlock(&pool.mu);
}

/* RD_OK when each non-NULL ptrs[i] lies in a live allocation; `names` lists the arguments
 * as written ("out, rstd, inp"), to name the one that does not. */
static rd_status check_ptrs(const char *op, const void *const *ptrs, int n, const char *names) {
    rd_status s = RD_OK;
    pthread_mutex_lock(&pool.mu);
    for (int i = 0; i < n && !s; i++) {
        if (!ptrs[i] || find(ptrs[i]) >= 0) continue;
        char arg[64] = "";
        const char *q = names;
        for (int k = 0; k < i && q; k++) q = strchr(q, ',') ? strchr(q, ',') + 1 : NULL;
        if (q) sscanf(q, " %63[^, ]", arg);
        s = misuse("check backend: %s: argument %s is not memory of this backend (a host "
                   "pointer?)", op, arg);
    }
    pthread_mutex_unlock(&pool.mu);
    return s;
}

#define CK(op, ...)                                                                \
    do {                                                                           \
        const void *const p_[] = {__VA_ARGS__};                                    \
        rd_status s_ = check_ptrs((op), p_, (int)(sizeof p_ / sizeof *p_), #__VA_ARGS__); \
        if (s_) return s_;                                                         \
    } while (0)

/* Host memory must not be the pool's either: an upload from backend memory is a mix-up. */
static rd_status host_side(const char *op, const void *p) {
    rd_status s = RD_OK;
    pthread_mutex_lock(&pool.mu);
    if (p && find(p) >= 0)
        s = misuse("check backend: %s: argument %s is memory of this backend, not a host array",
                   op, "host");
    pthread_mutex_unlock(&pool.mu);
    return s;
}

static rd_status ck_upload(void *dst, const void *host, size_t bytes) {
    CK("upload", dst);
    rd_status s = host_side("upload", host);
    if (!s && bytes) memcpy(dst, host, bytes);
    if (!s) count(0, bytes);
    return s;
}

static rd_status ck_download(void *host, const void *src, size_t bytes) {
    CK("download", src);
    rd_status s = host_side("download", host);
    if (!s && bytes) memcpy(host, src, bytes);
    if (!s) count(1, bytes);
    return s;
}

static rd_status ck_copy(void *dst, const void *src, size_t bytes) {
    CK("copy", dst, src);
    if (bytes) memmove(dst, src, bytes);
    return RD_OK;
}

static rd_status ck_memset(void *p, int byte, size_t bytes) {
    CK("memset", p);
    if (bytes) memset(p, byte, bytes);
    return RD_OK;
}

void rd_check_pool_report(rd_check_report *out) {
    pthread_mutex_lock(&pool.mu);
    for (int64_t i = 0; i < pool.n; i++)
        if (!guards_intact(&pool.c[i]))
            misuse("check backend: %s: the guard bytes of %s were overwritten", "report",
                   "a live allocation");
    out->live = pool.n;
    out->bytes = pool.bytes;
    out->errors = pool.errors;
    out->uploads = pool.uploads;
    out->upload_bytes = pool.upload_bytes;
    out->downloads = pool.downloads;
    out->download_bytes = pool.download_bytes;
    snprintf(out->first_error, sizeof out->first_error, "%s", pool.first);
    pthread_mutex_unlock(&pool.mu);
}

void rd_check_pool_reset(void) {
    pthread_mutex_lock(&pool.mu);
    pool.errors = pool.uploads = pool.upload_bytes = pool.downloads = pool.download_bytes = 0;
    pool.first[0] = 0;
    pthread_mutex_unlock(&pool.mu);
}

/* ---- ops: the CPU table's, after the pointer checks -------------------------------- */
#define CPU rd_backend_cpu

/* ck_<op>(params): CK of the listed pointer arguments, then the CPU op with args. */
#define CHECKED(op, params, args, ...)                 \
    static rd_status ck_##op params {                  \
        CK(#op, __VA_ARGS__);                          \
        return CPU.op args;                            \
    }

CHECKED(patchify, (float *tok, const float *img, int64_t B, int64_t C, int64_t H, int64_t W,
        int64_t p, rd_patch_order o),
        (tok, img, B, C, H, W, p, o), tok, img)
CHECKED(unpatchify, (float *img, const float *tok, int64_t B, int64_t C, int64_t H, int64_t W,
        int64_t p, rd_patch_order o),
        (img, tok, B, C, H, W, p, o), img, tok)
CHECKED(patch_embed, (void *ctx, float *x, const float *patches, const float *W, const float *b,
        const float *pe, int64_t B, int64_t L, int64_t IC, int64_t D),
        (ctx, x, patches, W, b, pe, B, L, IC, D), x, patches, W, b, pe)
CHECKED(timestep_embedding, (float *emb, const float *t, int64_t B, int64_t F, float mp),
        (emb, t, B, F, mp), emb, t)
CHECKED(linear_forward, (void *ctx, float *out, const float *inp, const float *W, const float *b,
        int64_t N, int64_t IC, int64_t OC),
        (ctx, out, inp, W, b, N, IC, OC), out, inp, W, b)
CHECKED(linear_backward, (void *ctx, float *dinp, float *dW, float *db, const float *dout,
        const float *inp, const float *W, int64_t N, int64_t IC, int64_t OC),
        (ctx, dinp, dW, db, dout, inp, W, N, IC, OC), dinp, dW, db, dout, inp, W)
CHECKED(layernorm_forward, (float *out, float *rstd, const float *inp, int64_t N, int64_t D),
        (out, rstd, inp, N, D), out, rstd, inp)
CHECKED(layernorm_backward, (float *dinp_acc, const float *dout, const float *out,
        const float *rstd, int64_t N, int64_t D),
        (dinp_acc, dout, out, rstd, N, D), dinp_acc, dout, out, rstd)
CHECKED(modulate_forward, (float *out, const float *inp, const float *shift, const float *scale,
        int64_t B, int64_t L, int64_t D, int64_t S),
        (out, inp, shift, scale, B, L, D, S), out, inp, shift, scale)
CHECKED(modulate_backward, (float *dinp, float *dshift, float *dscale, const float *dout,
        const float *inp, const float *scale, int64_t B, int64_t L, int64_t D, int64_t S),
        (dinp, dshift, dscale, dout, inp, scale, B, L, D, S),
        dinp, dshift, dscale, dout, inp, scale)
CHECKED(gated_residual_forward, (float *out, const float *inp, const float *h, const float *gate,
        int64_t B, int64_t L, int64_t D, int64_t S),
        (out, inp, h, gate, B, L, D, S), out, inp, h, gate)
CHECKED(gated_residual_backward, (float *dh, float *dgate, const float *dout, const float *h,
        const float *gate, int64_t B, int64_t L, int64_t D, int64_t S),
        (dh, dgate, dout, h, gate, B, L, D, S), dh, dgate, dout, h, gate)
CHECKED(attention_forward, (void *ctx, float *out, float *att, const float *qkv, int64_t B,
        int64_t L, int64_t D, int64_t NH),
        (ctx, out, att, qkv, B, L, D, NH), out, att, qkv)
CHECKED(attention_backward, (void *ctx, float *dqkv, float *datt, const float *dout,
        const float *qkv, const float *att, int64_t B, int64_t L, int64_t D, int64_t NH),
        (ctx, dqkv, datt, dout, qkv, att, B, L, D, NH), dqkv, datt, dout, qkv, att)
CHECKED(silu_forward, (float *out, const float *inp, int64_t n),
        (out, inp, n), out, inp)
CHECKED(silu_backward, (float *dinp, const float *dout, const float *inp, int64_t n),
        (dinp, dout, inp, n), dinp, dout, inp)
CHECKED(gelu_forward, (float *out, const float *inp, int64_t n),
        (out, inp, n), out, inp)
CHECKED(gelu_backward, (float *dinp, const float *dout, const float *inp, int64_t n),
        (dinp, dout, inp, n), dinp, dout, inp)
CHECKED(embedding_forward, (float *out, const int64_t *y, const float *table, int64_t B,
        int64_t V, int64_t D),
        (out, y, table, B, V, D), out, y, table)
CHECKED(embedding_backward, (float *dtable, const float *dout, const int64_t *y, int64_t B,
        int64_t V, int64_t D),
        (dtable, dout, y, B, V, D), dtable, dout, y)
CHECKED(add, (float *y, const float *x, int64_t n),
        (y, x, n), y, x)
CHECKED(mse, (void *ctx, double *loss, float *dout, const float *out, const float *target,
        int64_t B, int64_t C, int64_t Co, int64_t HW),
        (ctx, loss, dout, out, target, B, C, Co, HW), dout, out, target)
CHECKED(gated_norm, (void *ctx, double *out, const float *v, const float *gate, int64_t B,
        int64_t L, int64_t D, int64_t S),
        (ctx, out, v, gate, B, L, D, S), v, gate)
CHECKED(route, (uint8_t *mask, float *tau_b, const float *scores, int64_t B, int64_t L, int64_t E,
        int64_t k, rd_strategy s),
        (mask, tau_b, scores, B, L, E, k, s), mask, tau_b, scores)
CHECKED(route_threshold, (uint8_t *mask, const float *scores, int64_t n, float tau),
        (mask, scores, n, tau), mask, scores)
CHECKED(mask_row_counts, (int64_t *counts, const uint8_t *mask, int64_t rows, int64_t cols),
        (counts, mask, rows, cols), mask)
CHECKED(gate_forward, (float *G, const float *R, int64_t N, int64_t E, rd_gating g),
        (G, R, N, E, g), G, R)
CHECKED(gate_backward, (float *dR, const float *dG, const float *G, int64_t N, int64_t E,
        rd_gating g),
        (dR, dG, G, N, E, g), dR, dG, G)
CHECKED(router_forward, (float *hpre, float *h, float *R, const float *x, const float *Wr,
        const float *br, const float *Wg, const float *bg, int64_t N, int64_t D, int64_t E),
        (hpre, h, R, x, Wr, br, Wg, bg, N, D, E), hpre, h, R, x, Wr, br, Wg, bg)
CHECKED(router_backward, (float *dx_acc, float *dWr, float *dbr, float *dWg, float *dbg,
        float *dh, const float *dR, const float *dh_extra, const float *hpre, const float *h,
        const float *x, const float *Wr, const float *Wg, int64_t N, int64_t D, int64_t E),
        (dx_acc, dWr, dbr, dWg, dbg, dh, dR, dh_extra, hpre, h, x, Wr, Wg, N, D, E),
        dx_acc, dWr, dbr, dWg, dbg, dh, dR, dh_extra, hpre, h, x, Wr, Wg)
CHECKED(experts_forward, (void *ex, float *y, const uint8_t *mask, const float *G, const float *x,
        const float *W1, const float *b1, const float *W2, const float *b2, int64_t N, int64_t D,
        int64_t E, int64_t He),
        (ex, y, mask, G, x, W1, b1, W2, b2, N, D, E, He), y, mask, G, x, W1, b1, W2, b2)
CHECKED(experts_backward, (void *ex, float *dx, float *dG, float *dW1, float *db1, float *dW2,
        float *db2, const float *dy, const float *W1, const float *W2, int64_t N, int64_t D,
        int64_t E, int64_t He),
        (ex, dx, dG, dW1, db1, dW2, db2, dy, W1, W2, N, D, E, He),
        dx, dG, dW1, db1, dW2, db2, dy, W1, W2)
CHECKED(adamw_step, (float *params, const float *grads, float *m, float *v, float *ema, int64_t n,
        double lr, double b1, double b2, double eps, double wd, int64_t step, double grad_scale,
        double ema_decay),
        (params, grads, m, v, ema, n, lr, b1, b2, eps, wd, step, grad_scale, ema_decay),
        params, grads, m, v, ema)
CHECKED(grad_norm, (void *ctx, double *out, const float *grads, int64_t n),
        (ctx, out, grads, n), grads)
CHECKED(nonfinite_index, (int64_t *index, const float *x, int64_t n),
        (index, x, n), x)

static rd_status ck_sync(void) { return RD_OK; }
static rd_status ck_ctx_new(void **ctx) { return CPU.ctx_new(ctx); }
static void ck_ctx_free(void *ctx) { CPU.ctx_free(ctx); }
static rd_status ck_set_precision(void *ctx, int prec) { return CPU.set_precision(ctx, prec); }
static rd_status ck_experts_new(void **ex) { return CPU.experts_new(ex); }
static void ck_experts_free(void *ex) { CPU.experts_free(ex); }
static rd_status ck_experts_set_precision(void *ex, int prec) {
    return CPU.experts_set_precision(ex, prec);
}

/* ---- the MoE layer: the CPU state, with pool copies of what its views hand out ------- */

typedef struct {
    size_t cap;
    void *p;
} pool_buf;

typedef struct {
    void *st;               /* the CPU state */
    pool_buf view, aux;     /* pool copies: mask, G, R, h of the last view; plr_pred */
} ck_moe;

static rd_status ck_moe_new(void **out) {
    ck_moe *w = calloc(1, sizeof *w);
    if (!w) return rd_fail(RD_ENOMEM, "moe: out of memory for the layer state");
    rd_status s = CPU.moe_new(&w->st);
    if (s) free(w);
    *out = s ? NULL : w;
    return s;
}

static void ck_moe_free(void *p) {
    ck_moe *w = p;
    if (!w) return;
    CPU.moe_free(w->st);
    ck_free(w->view.p);
    ck_free(w->aux.p);
    free(w);
}

static rd_status ck_moe_set_precision(void *p, int prec) {
    return CPU.moe_set_precision(((ck_moe *)p)->st, prec);
}

/* Each parameter of cfg's layer in backend memory; an empty one (plr_w and plr_b with
 * plr_dim 0) points at the end of its buffer and is never read, so it is not checked. */
static rd_status check_params(const char *op, const rd_moe_cfg *cfg, const rd_moe_params *p) {
    int64_t sizes[RD_MOE_NPARAM];
    if (!cfg) return RD_OK; /* the CPU layer refuses it */
    rd_moe_param_sizes(sizes, cfg);
    for (int i = 0; i < RD_MOE_NPARAM; i++)
        if (sizes[i]) CK(op, p->p[i]);
    return RD_OK;
}

static rd_status ck_moe_forward(void *p, float *y, const float *x, const rd_moe_cfg *cfg,
                                const rd_moe_params *prm, int64_t B, int64_t L, int training,
                                const float *plr_target) {
    CK("moe_forward", y, x, plr_target);
    rd_status s = check_params("moe_forward", cfg, prm);
    return s ? s : CPU.moe_forward(((ck_moe *)p)->st, y, x, cfg, prm, B, L, training, plr_target);
}

static rd_status ck_moe_backward(void *p, float *dx, const rd_moe_params *grad, const float *dy,
                                 const float *x, const rd_moe_cfg *cfg, const rd_moe_params *prm) {
    CK("moe_backward", dx, dy, x);
    rd_status s = check_params("moe_backward", cfg, grad);
    if (!s) s = check_params("moe_backward", cfg, prm);
    return s ? s : CPU.moe_backward(((ck_moe *)p)->st, dx, grad, dy, x, cfg, prm);
}

/* b grown to hold `bytes` (its contents are not kept). */
static rd_status grow(pool_buf *b, size_t bytes) {
    if (bytes <= b->cap) return RD_OK;
    ck_free(b->p);
    b->p = NULL;
    b->cap = 0;
    rd_status s = ck_alloc(&b->p, bytes);
    if (!s) b->cap = bytes;
    return s;
}

/* *ptr (host memory of the CPU state, n bytes) replaced by its copy at b + at. */
static void to_pool(pool_buf *b, size_t at, const void **ptr, size_t n) {
    memcpy((char *)b->p + at, *ptr, n);
    *ptr = (char *)b->p + at;
}

static rd_status ck_moe_view(void *p, rd_moe_view *v) {
    ck_moe *w = p;
    rd_status s = CPU.moe_view(w->st, v);
    if (s || !v->have_forward) return s;
    const size_t ne = (size_t)(v->N * v->E), nf = ne * sizeof(float);
    const size_t nm = (ne + 63) / 64 * 64, nh = (size_t)(v->N * v->D) * sizeof(float);
    if ((s = grow(&w->view, nm + 2 * nf + nh))) return s;
    to_pool(&w->view, 0, (const void **)&v->mask, ne);
    to_pool(&w->view, nm, (const void **)&v->G, nf);
    to_pool(&w->view, nm + nf, (const void **)&v->R, nf);
    to_pool(&w->view, nm + 2 * nf, (const void **)&v->h, nh);
    return RD_OK;
}

static rd_status ck_moe_aux(void *p, rd_moe_aux *a) {
    ck_moe *w = p;
    rd_status s = CPU.moe_aux(w->st, a);
    if (s || !a->plr_pred) return s;
    const size_t n = (size_t)(a->N * a->plr_dim) * sizeof(float);
    if ((s = grow(&w->aux, n))) return s;
    to_pool(&w->aux, 0, (const void **)&a->plr_pred, n);
    return RD_OK;
}

static rd_status ck_moe_set_threshold(void *p, const float *tau, int64_t n) {
    return CPU.moe_set_threshold(((ck_moe *)p)->st, tau, n);
}

static rd_status ck_moe_copy_threshold(void *dst, void *src) {
    return CPU.moe_copy_threshold(((ck_moe *)dst)->st, ((ck_moe *)src)->st);
}

const rd_backend rd_backend_check = {
    .name = "check", .host_memory = 0,
    .alloc = ck_alloc, .free = ck_free, .upload = ck_upload, .download = ck_download,
    .copy = ck_copy, .memset = ck_memset, .sync = ck_sync, .ctx_new = ck_ctx_new,
    .ctx_free = ck_ctx_free, .set_precision = ck_set_precision,
    .enter = rd_blas_threads_enter, .leave = rd_blas_threads_restore,
    .patchify = ck_patchify, .unpatchify = ck_unpatchify, .patch_embed = ck_patch_embed,
    .timestep_embedding = ck_timestep_embedding, .linear_forward = ck_linear_forward,
    .linear_backward = ck_linear_backward, .layernorm_forward = ck_layernorm_forward,
    .layernorm_backward = ck_layernorm_backward, .modulate_forward = ck_modulate_forward,
    .modulate_backward = ck_modulate_backward, .gated_residual_forward = ck_gated_residual_forward,
    .gated_residual_backward = ck_gated_residual_backward,
    .attention_forward = ck_attention_forward, .attention_backward = ck_attention_backward,
    .silu_forward = ck_silu_forward, .silu_backward = ck_silu_backward,
    .gelu_forward = ck_gelu_forward, .gelu_backward = ck_gelu_backward,
    .embedding_forward = ck_embedding_forward, .embedding_backward = ck_embedding_backward,
    .add = ck_add, .mse = ck_mse, .gated_norm = ck_gated_norm,
    .route = ck_route, .route_threshold = ck_route_threshold,
    .mask_row_counts = ck_mask_row_counts,
    .gate_forward = ck_gate_forward, .gate_backward = ck_gate_backward,
    .router_forward = ck_router_forward, .router_backward = ck_router_backward,
    .experts_new = ck_experts_new, .experts_free = ck_experts_free,
    .experts_set_precision = ck_experts_set_precision,
    .experts_forward = ck_experts_forward, .experts_backward = ck_experts_backward,
    .moe_new = ck_moe_new, .moe_free = ck_moe_free, .moe_set_precision = ck_moe_set_precision,
    .moe_forward = ck_moe_forward, .moe_backward = ck_moe_backward, .moe_view = ck_moe_view,
    .moe_aux = ck_moe_aux, .moe_set_threshold = ck_moe_set_threshold,
    .moe_copy_threshold = ck_moe_copy_threshold,
    .adamw_step = ck_adamw_step, .grad_norm = ck_grad_norm,
    .nonfinite_index = ck_nonfinite_index,
};
