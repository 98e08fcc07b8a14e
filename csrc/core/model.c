/* model.c — the whole Race-DiT (docs/method.md §1, §2, §4), written once against the op table of
 * backend.h: DiT's embeddings, `depth` adaLN-Zero blocks whose FFN is the MoE block of
 * moe.h (or a dense 4D GELU-tanh MLP), the final adaLN layer and unpatchify, forward and
 * backward. It reads like DiT's models.py top to bottom; every step is an op of the table.
 *
 * Memory (the llm.c way): the model owns five buffers of nparams floats in backend memory,
 * laid out by the tensor table built in rd_model_new: parameters, gradients, the AdamW
 * moments and the EMA, so that the optimiser step is one fused loop (train.c). Activations
 * live in one backend arena carved for the largest batch seen (or a fixed max_batch),
 * together with the staged host inputs; the residual stream is updated in place and
 * LayerNorm saves its normalised output, so the block inputs are not kept. Inference
 * (rd_model_infer) runs the same layers on an arena of its own holding one block's
 * activations, which every block overwrites, and one MoE state shared by the blocks. */
#include "model_impl.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- layout ---------------------------------------------------------------------- */

static int64_t add_tensor(rd_model *m, int ndim, const int64_t *shape, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int64_t add_tensor(rd_model *m, int ndim, const int64_t *shape, const char *fmt, ...) {
    if (m->ntensors == m->tcap) {
        int nc = m->tcap ? 2 * m->tcap : 64;
        rd_tensor_info *t = realloc(m->tensors, (size_t)nc * sizeof *t);
        if (!t) return -1;
        m->tensors = t;
        m->tcap = nc;
    }
    rd_tensor_info *t = &m->tensors[m->ntensors++];
    memset(t, 0, sizeof *t);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    t->ndim = ndim;
    t->numel = 1;
    int fits = m->nparams >= 0;
    for (int i = 0; i < ndim; i++) {
        t->shape[i] = shape[i];
        fits = fits && rd_mul_ok(t->numel, shape[i], &t->numel);
    }
    t->offset = m->nparams;
    if (!fits || __builtin_add_overflow(m->nparams, t->numel, &m->nparams)) {
        m->nparams = -1; /* more than 64 bits count: build_layout says so */
        return -1;
    }
    return t->offset;
}

#define SHAPE(...) ((const int64_t[]){__VA_ARGS__})
#define NDIM(...) ((int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)))
#define TENSOR(m, name_fmt, ...) \
    add_tensor((m), NDIM(__VA_ARGS__), SHAPE(__VA_ARGS__), name_fmt)
#define TENSOR_I(m, name_fmt, i, ...) \
    add_tensor((m), NDIM(__VA_ARGS__), SHAPE(__VA_ARGS__), name_fmt, (i))

static const char *const moe_names[RD_MOE_NPARAM] = {
    "router_w", "router_b", "gate_w", "gate_b", "w1", "b1", "w2", "b2", "plr_w", "plr_b"};

/* The MoE tensors of block i, in moe.h order with its shapes. */
static int add_moe_tensors(rd_model *m, int64_t i) {
    const rd_moe_cfg *c = &m->layer;
    const int64_t D = c->D, E = c->E, He = c->He, P = c->plr_dim;
    const int64_t shapes[RD_MOE_NPARAM][3] = {{D, D}, {D}, {D, E}, {E}, {E, D, He},
                                              {E, He}, {E, He, D}, {E, D}, {D, P}, {P}};
    const int nd[RD_MOE_NPARAM] = {2, 1, 2, 1, 3, 2, 3, 2, 2, 1};
    m->blk[i].moe = m->nparams;
    for (int j = 0; j < RD_MOE_NPARAM; j++)
        if (add_tensor(m, nd[j], shapes[j], "blocks.%lld.moe.%s", (long long)i, moe_names[j]) < 0)
            return -1;
    int64_t sizes[RD_MOE_NPARAM];
    if (rd_moe_param_sizes(sizes, c) != m->nparams - m->blk[i].moe) return -2;
    return 0;
}

/* Tensor order follows DiT's state_dict (pos_embed aside: it is not a parameter here). */
static rd_status build_layout(rd_model *m) {
    const rd_model_cfg *c = &m->cfg;
    const int64_t D = c->D, p = c->patch;
    int fail = 0;
#define T(dst, ...) fail |= ((dst) = TENSOR(m, __VA_ARGS__)) < 0
    T(m->xe_w, "x_embedder.proj.weight", D, c->in_channels, p, p);
    T(m->xe_b, "x_embedder.proj.bias", D);
    T(m->t0_w, "t_embedder.mlp.0.weight", D, RD_FREQ_DIM);
    T(m->t0_b, "t_embedder.mlp.0.bias", D);
    T(m->t2_w, "t_embedder.mlp.2.weight", D, D);
    T(m->t2_b, "t_embedder.mlp.2.bias", D);
    T(m->ytab, "y_embedder.embedding_table.weight", c->num_classes + 1, D);
#undef T
#define TI(dst, ...) fail |= ((dst) = TENSOR_I(m, __VA_ARGS__)) < 0
    for (int64_t i = 0; i < c->depth && !fail; i++) {
        block_offsets *b = &m->blk[i];
        long long li = (long long)i;
        TI(b->qkv_w, "blocks.%lld.attn.qkv.weight", li, 3 * D, D);
        TI(b->qkv_b, "blocks.%lld.attn.qkv.bias", li, 3 * D);
        TI(b->proj_w, "blocks.%lld.attn.proj.weight", li, D, D);
        TI(b->proj_b, "blocks.%lld.attn.proj.bias", li, D);
        if (c->moe.E > 0) {
            int r = add_moe_tensors(m, i);
            if (r == -2) return rd_fail(RD_EINVAL, "model: MoE layout disagrees with rd_moe_param_sizes");
            fail |= r < 0;
        } else {
            TI(b->fc1_w, "blocks.%lld.mlp.fc1.weight", li, 4 * D, D);
            TI(b->fc1_b, "blocks.%lld.mlp.fc1.bias", li, 4 * D);
            TI(b->fc2_w, "blocks.%lld.mlp.fc2.weight", li, D, 4 * D);
            TI(b->fc2_b, "blocks.%lld.mlp.fc2.bias", li, D);
        }
        TI(b->ada_w, "blocks.%lld.adaLN_modulation.1.weight", li, 6 * D, D);
        TI(b->ada_b, "blocks.%lld.adaLN_modulation.1.bias", li, 6 * D);
    }
#undef TI
#define T(dst, ...) fail |= ((dst) = TENSOR(m, __VA_ARGS__)) < 0
    T(m->fl_w, "final_layer.linear.weight", m->Pout, D);
    T(m->fl_b, "final_layer.linear.bias", m->Pout);
    T(m->fa_w, "final_layer.adaLN_modulation.1.weight", 2 * D, D);
    T(m->fa_b, "final_layer.adaLN_modulation.1.bias", 2 * D);
#undef T
    if (m->nparams < 0)
        return rd_fail(RD_EINVAL, "model: depth %lld, hidden %lld and the patch widths %lld, %lld "
                       "give more parameters than a 64-bit size counts", (long long)c->depth,
                       (long long)D, (long long)m->Pin, (long long)m->Pout);
    return fail ? rd_fail(RD_ENOMEM, "model: out of memory building the layout") : RD_OK;
}

static rd_status check_cfg(const rd_model_cfg *c) {
    if (c->depth < 1 || c->D < 1 || c->NH < 1 || c->patch < 1 || c->input_size < 1 ||
        c->in_channels < 1 || c->out_channels < 1 || c->num_classes < 1)
        return rd_fail(RD_EINVAL, "model: depth, hidden, heads, patch, input_size, channels and "
                       "num_classes must be >= 1");
    if (c->D > INT_MAX || c->patch > INT_MAX || c->in_channels > INT_MAX ||
        c->out_channels > INT_MAX || c->num_classes > INT_MAX)
        return rd_fail(RD_EINVAL, "model: hidden %lld, patch %lld, channels %lld, %lld and "
                       "num_classes %lld must each be <= %d (32-bit BLAS sizes)", (long long)c->D,
                       (long long)c->patch, (long long)c->in_channels,
                       (long long)c->out_channels, (long long)c->num_classes, INT_MAX);
    if (c->D % c->NH)
        return rd_fail(RD_EINVAL, "model: hidden %lld is not a multiple of heads %lld",
                       (long long)c->D, (long long)c->NH);
    if (c->D % 4)
        return rd_fail(RD_EINVAL, "model: hidden %lld must be a multiple of 4 (2-D sin-cos "
                       "position embedding)", (long long)c->D);
    if (c->input_size % c->patch)
        return rd_fail(RD_EINVAL, "model: input_size %lld is not a multiple of patch %lld",
                       (long long)c->input_size, (long long)c->patch);
    if (c->moe.E < 0) return rd_fail(RD_EINVAL, "model: num_experts must be >= 0");
    if (c->moe.E > 0 && c->moe.D != c->D)
        return rd_fail(RD_EINVAL, "model: moe.D=%lld differs from hidden %lld",
                       (long long)c->moe.D, (long long)c->D);
    return RD_OK;
}

/* Sizes, the per-layer MoE configuration and the checks that need them. */
static rd_status derive_sizes(rd_model *m) {
    const rd_model_cfg *cfg = &m->cfg;
    const int64_t p = cfg->patch;
    int64_t npe;
    rd_status s;
    m->H = cfg->input_size;
    m->gh = m->gw = m->H / p;
    if ((s = RD_SIZE(&m->L, sizeof(float), "model: tokens (input_size/patch)^2", m->gh, m->gw)) ||
        (s = RD_SIZE(&npe, sizeof(float), "model: position embedding (tokens, hidden)", m->L, cfg->D)) ||
        (s = RD_SIZE(&m->Pin, sizeof(float), "model: patch p*p*in_channels", p, p, cfg->in_channels)) ||
        (s = RD_SIZE(&m->Pout, sizeof(float), "model: patch p*p*out_channels", p, p, cfg->out_channels)))
        return s;
    if (cfg->moe.E == 0) return RD_OK;
    m->cfg.moe.plr_dim = m->Pin;
    /* each aux loss of the model is the mean over its layers (docs/method.md §4): per-layer weights */
    m->layer = m->cfg.moe;
    m->layer.plr_weight /= (float)cfg->depth;
    m->layer.sim_weight /= (float)cfg->depth;
    m->layer.balance_weight /= (float)cfg->depth;
    s = rd_moe_cfg_check(&m->layer);
    return s ? s : rd_moe_aux_weights_check(&m->cfg.moe); /* the model's weights, as given */
}

/* The fixed position embedding, computed on the host and uploaded. */
static rd_status make_pos_embed(rd_model *m) {
    const size_t bytes = (size_t)(m->L * m->cfg.D) * sizeof(float);
    float *pe = malloc(bytes);
    if (!pe) return rd_fail(RD_ENOMEM, "model: out of memory (position embedding: %zu bytes)", bytes);
    rd_status s = rd_pos_embed_2d(pe, m->gh, m->gw, m->cfg.D);
    if (!s) s = m->be->alloc((void **)&m->pe, bytes);
    if (!s) s = m->be->upload(m->pe, pe, bytes);
    free(pe);
    return s;
}

static rd_status alloc_buffers(rd_model *m) {
    const rd_backend *be = m->be;
    const size_t bytes = (size_t)m->nparams * sizeof(float);
    if ((double)m->nparams * sizeof(float) > RD_MAX_ALLOC_BYTES)
        return rd_fail(RD_ENOMEM, "model: %lld parameters need more than one allocation holds",
                       (long long)m->nparams);
    for (int i = 0; i < RD_MODEL_NBUF; i++) {
        TRY(be->alloc((void **)&m->buf[i], bytes));
        TRY(be->memset(m->buf[i], 0, bytes));
    }
    if (m->cfg.moe.E == 0) return RD_OK;
    m->moe = calloc((size_t)m->cfg.depth, sizeof *m->moe);
    if (!m->moe) return rd_fail(RD_ENOMEM, "model: out of memory");
    for (int64_t i = 0; i < m->cfg.depth; i++) TRY(be->moe_new(&m->moe[i]));
    return RD_OK;
}

rd_status rd_model_new(rd_model **out, const rd_model_cfg *cfg, const rd_backend *be) {
    *out = NULL;
    rd_status s = check_cfg(cfg);
    if (s) return s;
    rd_model *m = calloc(1, sizeof *m);
    if (!m) return rd_fail(RD_ENOMEM, "model: out of memory");
    m->cfg = *cfg;
    m->be = be;
    if ((s = derive_sizes(m))) goto fail;
    m->blk = calloc((size_t)cfg->depth, sizeof *m->blk);
    m->ba = calloc((size_t)cfg->depth, sizeof *m->ba);
    if (!m->blk || !m->ba) {
        s = rd_fail(RD_ENOMEM, "model: out of memory");
        goto fail;
    }
    if ((s = build_layout(m)) || (s = be->ctx_new(&m->ctx)) || (s = make_pos_embed(m)) ||
        (s = alloc_buffers(m)))
        goto fail;
    *out = m;
    return RD_OK;
fail:
    rd_model_free(m);
    return s;
}

void rd_model_free(rd_model *m) {
    if (!m) return;
    const rd_backend *be = m->be;
    if (m->moe)
        for (int64_t i = 0; i < m->cfg.depth; i++) be->moe_free(m->moe[i]);
    free(m->moe);
    rd_model_infer_release(m);
    for (int i = 0; i < RD_MODEL_NBUF; i++) be->free(m->buf[i]);
    be->free(m->pe);
    be->free(m->arena);
    be->ctx_free(m->ctx);
    free(m->tensors);
    free(m->blk);
    free(m->ba);
    free(m);
}

const rd_backend *rd_model_backend(const rd_model *m) { return m->be; }
const rd_model_cfg *rd_model_config(const rd_model *m) { return &m->cfg; }
int64_t rd_model_num_params(const rd_model *m) { return m->nparams; }
int rd_model_num_tensors(const rd_model *m) { return m->ntensors; }
const rd_tensor_info *rd_model_tensor(const rd_model *m, int i) {
    return i >= 0 && i < m->ntensors ? &m->tensors[i] : NULL;
}
float *rd_model_buffer(rd_model *m, int which) {
    return which >= 0 && which < RD_MODEL_NBUF ? m->buf[which] : NULL;
}
int64_t rd_model_num_moe(const rd_model *m) { return m->moe ? m->cfg.depth : 0; }
void *rd_model_moe_state(rd_model *m, int64_t l) {
    return m->moe && l >= 0 && l < m->cfg.depth ? m->moe[l] : NULL;
}
int64_t rd_model_max_batch(const rd_model *m) { return m->cap; }
int64_t rd_model_last_batch(const rd_model *m) { return m->have_forward ? m->last_B : 0; }
int64_t rd_model_get_step(const rd_model *m) { return m->step; }

rd_status rd_model_set_step(rd_model *m, int64_t step) {
    if (step < 0) return rd_fail(RD_EINVAL, "model: step must be >= 0, got %lld", (long long)step);
    m->step = step;
    return RD_OK;
}

rd_status rd_model_set_precision(rd_model *m, int prec) {
    const rd_backend *be = m->be;
    TRY(be->set_precision(m->ctx, prec));
    m->have_forward = 0;
    for (int64_t i = 0; i < rd_model_num_moe(m); i++) TRY(be->moe_set_precision(m->moe[i], prec));
    if (m->imoe) TRY(be->moe_set_precision(m->imoe, prec));
    m->prec = prec;
    return RD_OK;
}

/* ---- activations ------------------------------------------------------------------- */

/* Hands out n floats of the arena, 256-byte aligned; with base == NULL only counts.
 * Sizes are counted in double: no batch, however large, makes them wrap, and below
 * RD_MAX_ALLOC_BYTES (which the callers enforce before carving) they are exact. */
static float *carve(char *base, double *used, double n) {
    float *p = base ? (float *)(base + (int64_t)*used) : NULL;
    *used += ceil(n / 64) * 256;
    return p;
}

/* One block's activations for N = B*L tokens (att: B*NH*L*L floats). */
static void carve_block(block_acts *a, char *base, double *u, double B, double N, double D,
                        double att, int dense) {
    a->mod = carve(base, u, B * 6 * D);
    a->xhat1 = carve(base, u, N * D);
    a->rstd1 = carve(base, u, N);
    a->m1 = carve(base, u, N * D);
    a->qkv = carve(base, u, N * 3 * D);
    a->att = carve(base, u, att);
    a->atty = carve(base, u, N * D);
    a->attproj = carve(base, u, N * D);
    a->xhat2 = carve(base, u, N * D);
    a->rstd2 = carve(base, u, N);
    a->m2 = carve(base, u, N * D);
    a->fc1 = dense ? carve(base, u, N * 4 * D) : NULL;
    a->gel = dense ? carve(base, u, N * 4 * D) : NULL;
    a->ffn = carve(base, u, N * D);
}

/* A forward's set: the staged inputs, the output image and the activations; `ba` holds
 * `nblocks` block sets (the caller says whether they are shared, and carves temb). */
static void carve_forward(const rd_model *m, fwd_acts *A, block_acts *ba, int nblocks,
                          char *base, double *u, double B) {
    const rd_model_cfg *c = &m->cfg;
    const double D = c->D, L = m->L, N = B * L, HW = (double)m->H * m->H;
    A->labels = (int64_t *)carve(base, u, 2 * B);
    A->tdev = carve(base, u, B);
    A->xin = carve(base, u, B * c->in_channels * HW);
    A->outimg = carve(base, u, B * c->out_channels * HW);
    A->patches = carve(base, u, N * m->Pin);
    A->tfreq = carve(base, u, B * RD_FREQ_DIM);
    A->th = carve(base, u, B * D);
    A->ths = carve(base, u, B * D);
    A->c = carve(base, u, B * D);
    A->sc = carve(base, u, B * D);
    A->x = carve(base, u, N * D);
    for (int i = 0; i < nblocks; i++)
        carve_block(&ba[i], base, u, B, N, D, B * c->NH * L * L, c->moe.E == 0);
    A->ba = ba;
    A->modf = carve(base, u, B * 2 * D);
    A->xhatf = carve(base, u, N * D);
    A->rstdf = carve(base, u, N);
    A->mf = carve(base, u, N * D);
    A->otok = carve(base, u, N * m->Pout);
}

/* The training arena: a forward set with every block's activations, then the targets,
 * the backward's scratch (dt1 doubles as the forward's temb). */
static double carve_train(rd_model *m, char *base, double B) {
    const rd_model_cfg *c = &m->cfg;
    const double D = c->D, L = m->L, N = B * L, HW = (double)m->H * m->H;
    const double att = B * c->NH * L * L;
    const int dense = c->moe.E == 0;
    double u = 0;
    carve_forward(m, &m->A, m->ba, (int)c->depth, base, &u, B);
    m->A.shared = 0;
    m->tgt = carve(base, &u, B * c->in_channels * HW);
    m->dout = carve(base, &u, B * c->out_channels * HW);
    m->plr = dense ? NULL : carve(base, &u, N * m->Pin);
    m->dx = carve(base, &u, N * D);
    m->da = carve(base, &u, N * D);
    m->db = carve(base, &u, N * D);
    m->dqkv = carve(base, &u, N * 3 * D);
    m->datt = carve(base, &u, att);
    m->dfc = dense ? carve(base, &u, N * 4 * D) : NULL;
    m->dmod = carve(base, &u, B * 6 * D);
    m->dsc = carve(base, &u, B * D);
    m->dt1 = m->A.temb = carve(base, &u, B * D);
    m->dt2 = carve(base, &u, B * D);
    m->dotok = carve(base, &u, N * m->Pout);
    return u;
}

/* A new arena of `bytes` for batch B (MemoryError text naming the batch), or NULL. */
static rd_status new_arena(rd_model *m, void **arena, double bytes, int64_t B, const char *what) {
    *arena = NULL;
    if (bytes > RD_MAX_ALLOC_BYTES)
        return rd_fail(RD_ENOMEM, "model%s: activations of batch %lld need %.4g MiB, more than "
                       "one allocation can hold", what, (long long)B, bytes / 1048576.0);
    rd_status s = m->be->alloc(arena, (size_t)bytes);
    if (s)
        return rd_fail(s, "model%s: out of memory for activations of batch %lld (%.0f MiB)",
                       what, (long long)B, bytes / 1048576.0);
    return RD_OK;
}

rd_status rd_model_reserve(rd_model *m, int64_t max_batch, int fixed) {
    if (max_batch < 1)
        return rd_fail(RD_EINVAL, "max_batch must be >= 1, got %lld", (long long)max_batch);
    void *arena;
    TRY(new_arena(m, &arena, carve_train(m, NULL, (double)max_batch), max_batch, ""));
    m->be->free(m->arena); /* after the new one: a failure keeps the old carving valid */
    m->arena = arena;
    carve_train(m, arena, (double)max_batch);
    m->cap = max_batch;
    m->fixed = fixed;
    m->have_forward = 0;
    return RD_OK;
}

/* Grow the inference arena (and make the shared MoE state) for batch B. */
static rd_status infer_reserve(rd_model *m, int64_t B) {
    const rd_backend *be = m->be;
    if (m->moe && !m->imoe) {
        TRY(be->moe_new(&m->imoe));
        TRY(be->moe_set_precision(m->imoe, m->prec));
    }
    double u = 0;
    fwd_acts A;
    block_acts ba;
    carve_forward(m, &A, &ba, 1, NULL, &u, (double)B);
    A.temb = carve(NULL, &u, (double)B * m->cfg.D);
    void *arena;
    TRY(new_arena(m, &arena, u, B, " infer"));
    be->free(m->iarena);
    m->iarena = arena;
    u = 0;
    carve_forward(m, &m->inf, &m->iba, 1, arena, &u, (double)B);
    m->inf.temb = carve(arena, &u, (double)B * m->cfg.D);
    m->inf.shared = 1;
    m->icap = B;
    return RD_OK;
}

void rd_model_infer_release(rd_model *m) {
    if (!m) return;
    m->be->free(m->iarena);
    m->iarena = NULL;
    m->icap = 0;
    if (m->imoe) m->be->moe_free(m->imoe);
    m->imoe = NULL;
}

int64_t rd_model_infer_batch(const rd_model *m) { return m->icap; }

/* ---- forward ---------------------------------------------------------------------- */

static void point_moe(rd_model *m, rd_moe_params *mp, const float *buf, int64_t i) {
    rd_moe_params_point(mp, (float *)buf + m->blk[i].moe, &m->layer);
}

/* Block i on A's residual stream; plr (N,Pin, may be NULL) the PLR heads' target. */
static rd_status block_forward(rd_model *m, const fwd_acts *A, int64_t i, int64_t B,
                               int training, const float *plr) {
    const rd_backend *be = m->be;
    const rd_model_cfg *c = &m->cfg;
    const block_offsets *o = &m->blk[i];
    const float *P = m->buf[RD_BUF_PARAMS];
    block_acts *a = A->shared ? A->ba : &A->ba[i];
    const int64_t D = c->D, L = m->L, N = B * L, S = 6 * D;
    TRY(be->linear_forward(m->ctx, a->mod, A->sc, P + o->ada_w, P + o->ada_b, B, D, 6 * D));
    /* x = x + gate1 * Attn(modulate(LN(x), shift1, scale1)) */
    TRY(be->layernorm_forward(a->xhat1, a->rstd1, A->x, N, D));
    TRY(be->modulate_forward(a->m1, a->xhat1, a->mod, a->mod + D, B, L, D, S));
    TRY(be->linear_forward(m->ctx, a->qkv, a->m1, P + o->qkv_w, P + o->qkv_b, N, D, 3 * D));
    TRY(be->attention_forward(m->ctx, a->atty, a->att, a->qkv, B, L, D, c->NH));
    TRY(be->linear_forward(m->ctx, a->attproj, a->atty, P + o->proj_w, P + o->proj_b, N, D, D));
    TRY(be->gated_residual_forward(A->x, A->x, a->attproj, a->mod + 2 * D, B, L, D, S));
    /* x = x + gate2 * FFN(modulate(LN(x), shift2, scale2)), FFN = MoE or dense MLP */
    TRY(be->layernorm_forward(a->xhat2, a->rstd2, A->x, N, D));
    TRY(be->modulate_forward(a->m2, a->xhat2, a->mod + 3 * D, a->mod + 4 * D, B, L, D, S));
    if (m->moe) {
        /* inference: the shared state, given block i's threshold (or none: batch top-K) */
        void *st = A->shared ? m->imoe : m->moe[i];
        rd_moe_params mp;
        point_moe(m, &mp, P, i);
        if (A->shared) TRY(be->moe_copy_threshold(m->imoe, m->moe[i]));
        TRY(be->moe_forward(st, a->ffn, a->m2, &m->layer, &mp, B, L, training, plr));
    } else {
        TRY(be->linear_forward(m->ctx, a->fc1, a->m2, P + o->fc1_w, P + o->fc1_b, N, D, 4 * D));
        TRY(be->gelu_forward(a->gel, a->fc1, N * 4 * D));
        TRY(be->linear_forward(m->ctx, a->ffn, a->gel, P + o->fc2_w, P + o->fc2_b, N, 4 * D, D));
    }
    return be->gated_residual_forward(A->x, A->x, a->ffn, a->mod + 5 * D, B, L, D, S);
}

/* The forward's layers on A's staged inputs into A->outimg; plr (N,Pin, may be NULL) the
 * patchified PLR target. */
static rd_status forward_pass(rd_model *m, const fwd_acts *A, int64_t B, int training,
                              const float *plr) {
    const rd_backend *be = m->be;
    const rd_model_cfg *c = &m->cfg;
    const float *P = m->buf[RD_BUF_PARAMS];
    const int64_t D = c->D, L = m->L, N = B * L, p = c->patch, H = m->H, V = c->num_classes + 1;
    /* x = x_embedder(x) + pos_embed */
    TRY(be->patchify(A->patches, A->xin, B, c->in_channels, H, H, p, RD_PATCH_CIJ));
    TRY(be->patch_embed(m->ctx, A->x, A->patches, P + m->xe_w, P + m->xe_b, m->pe, B, L,
                        m->Pin, D));
    /* c = t_embedder(t) + y_embedder(y); every adaLN reads SiLU(c) */
    TRY(be->timestep_embedding(A->tfreq, A->tdev, B, RD_FREQ_DIM, RD_MAX_PERIOD));
    TRY(be->linear_forward(m->ctx, A->th, A->tfreq, P + m->t0_w, P + m->t0_b, B, RD_FREQ_DIM, D));
    TRY(be->silu_forward(A->ths, A->th, B * D));
    TRY(be->linear_forward(m->ctx, A->temb, A->ths, P + m->t2_w, P + m->t2_b, B, D, D));
    TRY(be->embedding_forward(A->c, A->labels, P + m->ytab, B, V, D));
    TRY(be->add(A->c, A->temb, B * D));
    TRY(be->silu_forward(A->sc, A->c, B * D));
    for (int64_t i = 0; i < c->depth; i++) TRY(block_forward(m, A, i, B, training, plr));
    /* final layer: modulate(LN(x), shift, scale) -> Linear -> unpatchify */
    TRY(be->linear_forward(m->ctx, A->modf, A->sc, P + m->fa_w, P + m->fa_b, B, D, 2 * D));
    TRY(be->layernorm_forward(A->xhatf, A->rstdf, A->x, N, D));
    TRY(be->modulate_forward(A->mf, A->xhatf, A->modf, A->modf + D, B, L, D, 2 * D));
    TRY(be->linear_forward(m->ctx, A->otok, A->mf, P + m->fl_w, P + m->fl_b, N, D, m->Pout));
    return be->unpatchify(A->outimg, A->otok, B, c->out_channels, H, H, p, RD_PATCH_IJC);
}

/* t in [0, RD_T_MAX], y in [0, num_classes] and, when given, `target` (B,C,H,W) finite:
 * checked on the host, so that no op sees a bad index and a bad target costs no block. */
static rd_status check_inputs(const rd_model *m, const float *t, const int64_t *y,
                              const float *target, const char *target_name, int64_t B) {
    if (B < 1) return rd_fail(RD_EINVAL, "batch must be >= 1, got %lld", (long long)B);
    for (int64_t b = 0; b < B; b++)
        if (!(t[b] >= 0.0f && t[b] <= RD_T_MAX)) /* also catches NaN */
            return rd_fail(RD_EINVAL, "t[%lld]=%g outside [0, %g]", (long long)b, (double)t[b],
                           (double)RD_T_MAX);
    for (int64_t b = 0; b < B; b++)
        if (y[b] < 0 || y[b] > m->cfg.num_classes)
            return rd_fail(RD_EINVAL, "y[%lld]=%lld outside [0, %lld] (%lld = null label)",
                           (long long)b, (long long)y[b], (long long)m->cfg.num_classes,
                           (long long)m->cfg.num_classes);
    const int64_t n = B * m->cfg.in_channels * m->H * m->H;
    for (int64_t i = 0; target && i < n; i++)
        if (!isfinite(target[i]))
            return rd_fail(RD_EINVAL, "%s: non-finite value %g at flat index %lld of (B,C,H,W)",
                           target_name, (double)target[i], (long long)i);
    return RD_OK;
}

/* Copy x (B,C,H,W), t (B), y (B) from the host into A's staging buffers. */
static rd_status upload_inputs(const rd_model *m, const fwd_acts *A, const float *x,
                               const float *t, const int64_t *y, int64_t B) {
    const rd_backend *be = m->be;
    const size_t img = (size_t)(B * m->cfg.in_channels * m->H * m->H) * sizeof(float);
    TRY(be->upload(A->xin, x, img));
    TRY(be->upload(A->tdev, t, (size_t)B * sizeof(float)));
    return be->upload(A->labels, y, (size_t)B * sizeof(int64_t));
}

/* The training arena for batch B (grown unless max_batch is fixed). */
static rd_status ensure_batch(rd_model *m, int64_t B) {
    if (B <= m->cap) return RD_OK;
    if (m->fixed)
        return rd_fail(RD_EINVAL, "batch %lld exceeds max_batch=%lld given at construction",
                       (long long)B, (long long)m->cap);
    return rd_model_reserve(m, B, 0);
}

/* A training-arena forward of the validated host inputs; target (B,C,H,W, host, may be
 * NULL) is staged into m->tgt, and patchified for the PLR heads when they use it. */
rd_status rd_model_forward_staged(rd_model *m, const float *x, const float *t, const int64_t *y,
                                  const float *target, int64_t B, int training) {
    const rd_model_cfg *c = &m->cfg;
    TRY(ensure_batch(m, B));
    m->have_forward = 0;
    TRY(upload_inputs(m, &m->A, x, t, y, B));
    m->last_plr = m->moe && target && training && c->moe.plr_weight != 0.0f;
    if (target)
        TRY(m->be->upload(m->tgt, target, (size_t)(B * c->in_channels * m->H * m->H) * sizeof(float)));
    if (m->last_plr)
        TRY(m->be->patchify(m->plr, m->tgt, B, c->in_channels, m->H, m->H, c->patch, RD_PATCH_IJC));
    TRY(forward_pass(m, &m->A, B, training, m->last_plr ? m->plr : NULL));
    m->last_B = B;
    m->have_forward = 1;
    return RD_OK;
}

static rd_status download_out(rd_model *m, float *out, const float *img, int64_t B) {
    const size_t n = (size_t)(B * m->cfg.out_channels * m->H * m->H);
    return out ? m->be->download(out, img, n * sizeof(float)) : RD_OK;
}

static rd_status model_forward(rd_model *m, float *out, const float *x, const float *t,
                               const int64_t *y, const float *plr_target, int64_t B,
                               int training) {
    const int plr = m->moe && plr_target && training && m->cfg.moe.plr_weight != 0.0f;
    TRY(check_inputs(m, t, y, plr ? plr_target : NULL, "plr_target", B));
    TRY(rd_model_forward_staged(m, x, t, y, plr ? plr_target : NULL, B, training));
    return download_out(m, out, m->A.outimg, B);
}

static rd_status model_infer(rd_model *m, float *out, const float *x, const float *t,
                             const int64_t *y, int64_t B) {
    TRY(check_inputs(m, t, y, NULL, NULL, B));
    if (B > m->icap) TRY(infer_reserve(m, B));
    TRY(upload_inputs(m, &m->inf, x, t, y, B));
    TRY(forward_pass(m, &m->inf, B, 0, NULL));
    return download_out(m, out, m->inf.outimg, B);
}

/* ---- backward ---------------------------------------------------------------------- */

/* dsc (B,D) += the adaLN branch's input gradient dmod (B,OC) @ W (OC,D); grads of W, b. */
static rd_status adaln_backward(rd_model *m, int64_t w, int64_t bias, const float *dmod,
                                int64_t B, int64_t OC) {
    const float *P = m->buf[RD_BUF_PARAMS];
    float *G = m->buf[RD_BUF_GRADS];
    const int64_t D = m->cfg.D;
    TRY(m->be->linear_backward(m->ctx, m->dt1, G + w, G + bias, dmod, m->A.sc, P + w, B, D, OC));
    return m->be->add(m->dsc, m->dt1, B * D);
}

/* The FFN branch's backward: d(its input m2) into m->db from d(ffn output) in m->da. */
static rd_status ffn_backward(rd_model *m, int64_t i, int64_t B) {
    const rd_backend *be = m->be;
    const block_offsets *o = &m->blk[i];
    const block_acts *a = &m->ba[i];
    const float *P = m->buf[RD_BUF_PARAMS];
    float *G = m->buf[RD_BUF_GRADS];
    const int64_t D = m->cfg.D, N = B * m->L;
    if (m->moe) {
        rd_moe_params mp, mg;
        point_moe(m, &mp, P, i);
        point_moe(m, &mg, G, i);
        return be->moe_backward(m->moe[i], m->db, &mg, m->da, a->m2, &m->layer, &mp);
    }
    TRY(be->linear_backward(m->ctx, m->dfc, G + o->fc2_w, G + o->fc2_b, m->da, a->gel,
                            P + o->fc2_w, N, 4 * D, D));
    TRY(be->gelu_backward(m->dfc, m->dfc, a->fc1, N * 4 * D));
    return be->linear_backward(m->ctx, m->db, G + o->fc1_w, G + o->fc1_b, m->dfc, a->m2,
                               P + o->fc1_w, N, D, 4 * D);
}

/* On entry m->dx holds d(block output); on exit d(block input). */
static rd_status block_backward(rd_model *m, int64_t i, int64_t B) {
    const rd_backend *be = m->be;
    const rd_model_cfg *c = &m->cfg;
    const block_offsets *o = &m->blk[i];
    const block_acts *a = &m->ba[i];
    const float *P = m->buf[RD_BUF_PARAMS];
    float *G = m->buf[RD_BUF_GRADS];
    const int64_t D = c->D, L = m->L, N = B * L, S = 6 * D;
    float *dmod = m->dmod;
    /* FFN branch: d(ffn) = gate2 * dx; the residual path passes dx through unchanged */
    TRY(be->gated_residual_backward(m->da, dmod + 5 * D, m->dx, a->ffn, a->mod + 5 * D, B, L, D, S));
    TRY(ffn_backward(m, i, B));
    TRY(be->modulate_backward(m->da, dmod + 3 * D, dmod + 4 * D, m->db, a->xhat2, a->mod + 4 * D,
                              B, L, D, S));
    TRY(be->layernorm_backward(m->dx, m->da, a->xhat2, a->rstd2, N, D));
    /* attention branch */
    TRY(be->gated_residual_backward(m->da, dmod + 2 * D, m->dx, a->attproj, a->mod + 2 * D, B,
                                    L, D, S));
    TRY(be->linear_backward(m->ctx, m->db, G + o->proj_w, G + o->proj_b, m->da, a->atty,
                            P + o->proj_w, N, D, D));
    TRY(be->attention_backward(m->ctx, m->dqkv, m->datt, m->db, a->qkv, a->att, B, L, D, c->NH));
    TRY(be->linear_backward(m->ctx, m->da, G + o->qkv_w, G + o->qkv_b, m->dqkv, a->m1,
                            P + o->qkv_w, N, D, 3 * D));
    TRY(be->modulate_backward(m->db, dmod, dmod + D, m->da, a->xhat1, a->mod + D, B, L, D, S));
    TRY(be->layernorm_backward(m->dx, m->db, a->xhat1, a->rstd1, N, D));
    return adaln_backward(m, o->ada_w, o->ada_b, dmod, B, 6 * D);
}

/* Backward of the last forward from the staged dout (B,Co,H,W) in m->dout. */
rd_status rd_model_backward_staged(rd_model *m) {
    if (!m->have_forward) return rd_fail(RD_ESTATE, "backward called before forward");
    const rd_backend *be = m->be;
    const rd_model_cfg *c = &m->cfg;
    const int64_t B = m->last_B, D = c->D, L = m->L, N = B * L, p = c->patch, H = m->H;
    const float *P = m->buf[RD_BUF_PARAMS];
    float *G = m->buf[RD_BUF_GRADS];
    const fwd_acts *A = &m->A;
    TRY(be->memset(m->dsc, 0, (size_t)(B * D) * sizeof(float)));
    /* final layer */
    TRY(be->patchify(m->dotok, m->dout, B, c->out_channels, H, H, p, RD_PATCH_IJC));
    TRY(be->linear_backward(m->ctx, m->da, G + m->fl_w, G + m->fl_b, m->dotok, A->mf,
                            P + m->fl_w, N, D, m->Pout));
    TRY(be->modulate_backward(m->db, m->dmod, m->dmod + D, m->da, A->xhatf, A->modf + D, B, L, D,
                              2 * D));
    TRY(be->memset(m->dx, 0, (size_t)(N * D) * sizeof(float)));
    TRY(be->layernorm_backward(m->dx, m->db, A->xhatf, A->rstdf, N, D));
    TRY(adaln_backward(m, m->fa_w, m->fa_b, m->dmod, B, 2 * D));
    for (int64_t i = c->depth - 1; i >= 0; i--) TRY(block_backward(m, i, B));
    /* embeddings: patch projection (pos_embed is fixed), then the conditioning path */
    TRY(be->linear_backward(m->ctx, NULL, G + m->xe_w, G + m->xe_b, m->dx, A->patches,
                            P + m->xe_w, N, m->Pin, D));
    float *dc = m->dt2;
    TRY(be->silu_backward(dc, m->dsc, A->c, B * D));
    TRY(be->embedding_backward(G + m->ytab, dc, A->labels, B, c->num_classes + 1, D));
    TRY(be->linear_backward(m->ctx, m->dt1, G + m->t2_w, G + m->t2_b, dc, A->ths, P + m->t2_w,
                            B, D, D));
    TRY(be->silu_backward(m->dt1, m->dt1, A->th, B * D));
    return be->linear_backward(m->ctx, NULL, G + m->t0_w, G + m->t0_b, m->dt1, A->tfreq,
                               P + m->t0_w, B, RD_FREQ_DIM, D);
}

static rd_status model_backward(rd_model *m, const float *dout) {
    if (!m->have_forward) return rd_fail(RD_ESTATE, "backward called before forward");
    const size_t n = (size_t)(m->last_B * m->cfg.out_channels * m->H * m->H);
    TRY(m->be->upload(m->dout, dout, n * sizeof(float)));
    return rd_model_backward_staged(m);
}

rd_status rd_model_branch_norms(rd_model *m, double *out) {
    if (!m->have_forward) return rd_fail(RD_ESTATE, "branch_norms: no forward yet");
    const int64_t B = m->last_B, L = m->L, D = m->cfg.D, S = 6 * D;
    for (int64_t i = 0; i < m->cfg.depth; i++) {
        const block_acts *a = &m->ba[i];
        TRY(m->be->gated_norm(m->ctx, &out[2 * i], a->attproj, a->mod + 2 * D, B, L, D, S));
        TRY(m->be->gated_norm(m->ctx, &out[2 * i + 1], a->ffn, a->mod + 5 * D, B, L, D, S));
    }
    return RD_OK;
}

/* ---- entry points: a whole pass inside the backend's enter / leave ---------------- */

int rd_model_enter(const rd_model *m) { return m->be->enter ? m->be->enter() : 0; }
void rd_model_leave(const rd_model *m, int prev) {
    if (m->be->leave) m->be->leave(prev);
}

rd_status rd_model_forward(rd_model *m, float *out, const float *x, const float *t,
                           const int64_t *y, const float *plr_target, int64_t B, int training) {
    const int prev = rd_model_enter(m);
    rd_status s = model_forward(m, out, x, t, y, plr_target, B, training);
    rd_model_leave(m, prev);
    return s;
}

rd_status rd_model_infer(rd_model *m, float *out, const float *x, const float *t,
                         const int64_t *y, int64_t B) {
    const int prev = rd_model_enter(m);
    rd_status s = model_infer(m, out, x, t, y, B);
    rd_model_leave(m, prev);
    return s;
}

rd_status rd_model_backward(rd_model *m, const float *dout) {
    const int prev = rd_model_enter(m);
    rd_status s = model_backward(m, dout);
    rd_model_leave(m, prev);
    return s;
}

rd_status rd_model_check_target(const rd_model *m, const float *t, const int64_t *y,
                                const float *target, int64_t B) {
    return check_inputs(m, t, y, target, "target", B);
}
