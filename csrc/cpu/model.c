/* model.c — the whole Race-DiT (SPEC §1-§3) on CPU: DiT's embeddings, `depth` adaLN-Zero
 * blocks whose FFN is the MoE block of moe.h (or a dense 4D GELU-tanh MLP), the final
 * adaLN layer and unpatchify, forward and backward. It reads like DiT's models.py top
 * to bottom; every step is a layer of dit.c.
 *
 * Memory: the parameters and their gradients are two flat buffers owned by the caller
 * (the Python object) and passed to every call, laid out by the tensor table built in
 * rd_model_new. Activations live in one buffer owned here, carved for the largest batch
 * seen (or a fixed max_batch); the residual stream is updated in place and LayerNorm
 * saves its normalised output, so the block inputs themselves are not kept. Inference
 * (rd_model_infer) runs the same layers on an arena of its own holding one block's
 * activations, which every block overwrites, and one MoE state shared by the blocks. */
#include "../racedit.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Offsets (floats into the parameter buffer) of one block's tensors. */
typedef struct {
    int64_t qkv_w, qkv_b, proj_w, proj_b;  /* attn.qkv (3D,D), (3D); attn.proj (D,D), (D) */
    int64_t fc1_w, fc1_b, fc2_w, fc2_b;    /* dense: mlp.fc1 (4D,D), (4D); mlp.fc2 (D,4D), (D) */
    int64_t moe;                           /* MoE: start of the rd_moe_params block */
    int64_t ada_w, ada_b;                  /* adaLN_modulation.1 (6D,D), (6D) */
} block_offsets;

/* Saved activations of one block (N = B*L rows). */
typedef struct {
    float *mod;           /* (B,6D) shift1 scale1 gate1 shift2 scale2 gate2 */
    float *xhat1, *rstd1; /* (N,D), (N) LayerNorm before attention */
    float *m1;            /* (N,D) modulated attention input */
    float *qkv;           /* (N,3D) */
    float *att;           /* (B,NH,L,L) attention probabilities */
    float *atty;          /* (N,D) heads concatenated, before the projection */
    float *attproj;       /* (N,D) attention branch output (before the gate) */
    float *xhat2, *rstd2; /* (N,D), (N) LayerNorm before the FFN */
    float *m2;            /* (N,D) modulated FFN input */
    float *fc1, *gel;     /* dense: (N,4D) pre-activation and GELU output */
    float *ffn;           /* (N,D) FFN/MoE branch output (before the gate) */
} block_acts;

/* What a forward writes: the training arena's activations (a block_acts per block, kept
 * for backward) or the inference arena's (one block_acts that every block overwrites). */
typedef struct {
    float *patches;            /* (N,C*p*p) patch vectors in (c,i,j) order */
    float *tfreq, *th, *ths;   /* (B,F), (B,D), (B,D) timestep MLP */
    float *temb;               /* (B,D) its output (the training set: backward scratch dt1) */
    float *c, *sc;             /* (B,D) conditioning and SiLU(c) */
    float *x;                  /* (N,D) residual stream */
    block_acts *ba;            /* depth, or one when shared */
    int shared;                /* 1: every block writes ba[0] */
    float *modf, *xhatf, *rstdf, *mf, *otok; /* final layer: (B,2D) (N,D) (N) (N,D) (N,Pout) */
} fwd_acts;

struct rd_model {
    rd_model_cfg cfg;
    rd_moe_cfg layer;          /* what each MoE block gets: cfg.moe with the loss weights /depth */
    int64_t H, gh, gw, L;      /* image side, patch grid, tokens per image */
    int64_t Pin, Pout;         /* p*p*C, p*p*Co */
    rd_tensor_info *tensors;
    int ntensors, tcap;
    int64_t nparams;
    int64_t xe_w, xe_b, t0_w, t0_b, t2_w, t2_b, ytab, fl_w, fl_b, fa_w, fa_b;
    block_offsets *blk;        /* depth */
    float *pe;                 /* (L,D) fixed position embedding */
    rd_moe_state **moe;        /* depth states when MoE, else NULL */
    /* activations: one allocation, carved below */
    float *arena, *base;       /* the allocation and its 64-byte aligned start */
    int64_t cap;               /* batch the arena was carved for (0: none) */
    int fixed;                 /* 1: cap is a hard max_batch */
    int64_t *labels;           /* (cap) labels of the last forward */
    float *patches;            /* (N,C*p*p) patch vectors in (c,i,j) order */
    float *tfreq, *th, *ths;   /* (B,F), (B,D), (B,D) timestep MLP */
    float *c, *sc;             /* (B,D) conditioning and SiLU(c) */
    float *plr;                /* (N,Pin) patchified PLR target */
    float *x;                  /* (N,D) residual stream */
    block_acts *ba;            /* depth */
    float *modf, *xhatf, *rstdf, *mf, *otok; /* final layer: (B,2D) (N,D) (N) (N,D) (N,Pout) */
    /* backward scratch */
    float *dx, *da, *db, *dqkv, *datt, *dfc, *dmod, *dsc, *dt1, *dt2, *dotok;
    int64_t last_B;
    int have_forward, last_plr;
    /* inference (rd_model_infer): its own arena, one block's activations, one MoE state */
    float *iarena;             /* the allocation (its 64-byte aligned start carved into inf) */
    int64_t icap;              /* batch it was carved for (0: none) */
    block_acts iba;
    fwd_acts inf;
    rd_moe_state *imoe;        /* shared by the MoE blocks (each block's tau copied in) */
};


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

rd_status rd_model_new(rd_model **out, const rd_model_cfg *cfg) {
    *out = NULL;
    rd_status s = check_cfg(cfg);
    if (s) return s;
    rd_model *m = calloc(1, sizeof *m);
    if (!m) return rd_fail(RD_ENOMEM, "model: out of memory");
    m->cfg = *cfg;
    const int64_t p = cfg->patch, D = cfg->D;
    m->H = cfg->input_size;
    m->gh = m->gw = m->H / p;
    int64_t npe;
    if ((s = RD_SIZE(&m->L, sizeof(float), "model: tokens (input_size/patch)^2", m->gh, m->gw)) ||
        (s = RD_SIZE(&npe, sizeof(float), "model: position embedding (tokens, hidden)", m->L, D)) ||
        (s = RD_SIZE(&m->Pin, sizeof(float), "model: patch p*p*in_channels", p, p, cfg->in_channels)) ||
        (s = RD_SIZE(&m->Pout, sizeof(float), "model: patch p*p*out_channels", p, p, cfg->out_channels)))
        goto fail;
    if (cfg->moe.E > 0) {
        m->cfg.moe.plr_dim = m->Pin;
        /* each aux loss of the model is the mean over its layers (SPEC §3): per-layer weights */
        m->layer = m->cfg.moe;
        m->layer.plr_weight /= (float)cfg->depth;
        m->layer.sim_weight /= (float)cfg->depth;
        m->layer.balance_weight /= (float)cfg->depth;
        s = rd_moe_cfg_check(&m->layer);
        if (!s) s = rd_moe_aux_weights_check(&m->cfg.moe); /* the model's weights, as given */
        if (s) goto fail;
    }
    m->blk = calloc((size_t)cfg->depth, sizeof *m->blk);
    m->ba = calloc((size_t)cfg->depth, sizeof *m->ba);
    m->pe = malloc((size_t)npe * sizeof(float));
    if (!m->blk || !m->ba || !m->pe) {
        s = rd_fail(RD_ENOMEM, "model: out of memory (position embedding: %lld floats)",
                    (long long)npe);
        goto fail;
    }
    if ((s = build_layout(m))) goto fail;
    if ((s = rd_pos_embed_2d(m->pe, m->gh, m->gw, D))) goto fail;
    if (cfg->moe.E > 0) {
        m->moe = calloc((size_t)cfg->depth, sizeof *m->moe);
        if (!m->moe) {
            s = rd_fail(RD_ENOMEM, "model: out of memory");
            goto fail;
        }
        for (int64_t i = 0; i < cfg->depth; i++)
            if (!(m->moe[i] = rd_moe_state_new())) {
                s = rd_fail(RD_ENOMEM, "model: out of memory for the MoE states");
                goto fail;
            }
    }
    *out = m;
    return RD_OK;
fail:
    rd_model_free(m);
    return s;
}

void rd_model_free(rd_model *m) {
    if (!m) return;
    if (m->moe)
        for (int64_t i = 0; i < m->cfg.depth; i++) rd_moe_state_free(m->moe[i]);
    free(m->moe);
    free(m->tensors);
    free(m->blk);
    free(m->ba);
    free(m->pe);
    free(m->arena);
    free(m->labels);
    rd_model_infer_release(m);
    free(m);
}

const rd_model_cfg *rd_model_config(const rd_model *m) { return &m->cfg; }
int64_t rd_model_num_params(const rd_model *m) { return m->nparams; }
int rd_model_num_tensors(const rd_model *m) { return m->ntensors; }
const rd_tensor_info *rd_model_tensor(const rd_model *m, int i) {
    return i >= 0 && i < m->ntensors ? &m->tensors[i] : NULL;
}
int64_t rd_model_num_moe(const rd_model *m) { return m->moe ? m->cfg.depth : 0; }
rd_moe_state *rd_model_moe_state(rd_model *m, int64_t l) {
    return m->moe && l >= 0 && l < m->cfg.depth ? m->moe[l] : NULL;
}
int64_t rd_model_max_batch(const rd_model *m) { return m->cap; }
int64_t rd_model_last_batch(const rd_model *m) { return m->have_forward ? m->last_B : 0; }

/* Mean over the N = B*L tokens of || gate[b] * v[t] ||_2, v (N,D), gate rows of mod (B,S). */
static double mean_gated_norm(const float *v, const float *gate, int64_t B, int64_t L, int64_t D,
                              int64_t S) {
    double total = 0.0;
    for (int64_t b = 0; b < B; b++) {
        const float *g = gate + b * S;
        for (int64_t l = 0; l < L; l++) {
            const float *r = v + (b * L + l) * D;
            double s = 0.0;
            for (int64_t d = 0; d < D; d++) {
                double u = (double)g[d] * r[d];
                s += u * u;
            }
            total += sqrt(s);
        }
    }
    return B * L > 0 ? total / (double)(B * L) : 0.0;
}

rd_status rd_model_branch_norms(const rd_model *m, double *out) {
    if (!m->have_forward) return rd_fail(RD_ESTATE, "branch_norms: no forward yet");
    const int64_t B = m->last_B, L = m->L, D = m->cfg.D, S = 6 * D, depth = m->cfg.depth;
#pragma omp parallel for schedule(static) if (depth > 1)
    for (int64_t i = 0; i < depth; i++) { /* one block per iteration: thread-count independent */
        const block_acts *a = &m->ba[i];
        out[2 * i] = mean_gated_norm(a->attproj, a->mod + 2 * D, B, L, D, S);
        out[2 * i + 1] = mean_gated_norm(a->ffn, a->mod + 5 * D, B, L, D, S);
    }
    return RD_OK;
}

/* ---- activations ------------------------------------------------------------------- */

/* Hands out n floats of the arena, 64-byte aligned; with base == NULL only counts.
 * Sizes are counted in double: no batch, however large, makes them wrap, and below
 * RD_MAX_ALLOC_BYTES (which rd_model_reserve enforces before carving) they are exact. */
static float *carve(float *base, double *used, double n) {
    float *p = base ? base + (int64_t)*used : NULL;
    *used += ceil(n / 16) * 16;
    return p;
}

/* One block's activations for N = B*L tokens (att: B*NH*L*L floats). */
static void carve_block(block_acts *a, float *base, double *u, double B, double N, double D,
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

static double carve_all(rd_model *m, float *base, double B) {
    const rd_model_cfg *c = &m->cfg;
    const double D = c->D, L = m->L, N = B * L, F = RD_FREQ_DIM;
    const double att = B * c->NH * L * L;
    const int dense = c->moe.E == 0;
    double u = 0;
    m->patches = carve(base, &u, N * m->Pin);
    m->tfreq = carve(base, &u, B * F);
    m->th = carve(base, &u, B * D);
    m->ths = carve(base, &u, B * D);
    m->c = carve(base, &u, B * D);
    m->sc = carve(base, &u, B * D);
    m->plr = dense ? NULL : carve(base, &u, N * m->Pin);
    m->x = carve(base, &u, N * D);
    for (int64_t i = 0; i < c->depth; i++) carve_block(&m->ba[i], base, &u, B, N, D, att, dense);
    m->modf = carve(base, &u, B * 2 * D);
    m->xhatf = carve(base, &u, N * D);
    m->rstdf = carve(base, &u, N);
    m->mf = carve(base, &u, N * D);
    m->otok = carve(base, &u, N * m->Pout);
    m->dx = carve(base, &u, N * D);
    m->da = carve(base, &u, N * D);
    m->db = carve(base, &u, N * D);
    m->dqkv = carve(base, &u, N * 3 * D);
    m->datt = carve(base, &u, att);
    m->dfc = dense ? carve(base, &u, N * 4 * D) : NULL;
    m->dmod = carve(base, &u, B * 6 * D);
    m->dsc = carve(base, &u, B * D);
    m->dt1 = carve(base, &u, B * D);
    m->dt2 = carve(base, &u, B * D);
    m->dotok = carve(base, &u, N * m->Pout);
    return u;
}

rd_status rd_model_reserve(rd_model *m, int64_t max_batch, int fixed) {
    if (max_batch < 1)
        return rd_fail(RD_EINVAL, "max_batch must be >= 1, got %lld", (long long)max_batch);
    const double n = carve_all(m, NULL, (double)max_batch), bytes = n * sizeof(float) + 64;
    const double mib = (bytes + (double)max_batch * sizeof(int64_t)) / 1048576.0;
    if (bytes > RD_MAX_ALLOC_BYTES) /* the labels (8 bytes an image) are smaller still */
        return rd_fail(RD_ENOMEM, "model: activations of batch %lld need %.4g MiB, more than one "
                       "allocation can hold", (long long)max_batch, mib);
    float *arena = malloc((size_t)bytes);
    int64_t *labels = malloc((size_t)max_batch * sizeof(int64_t));
    if (!arena || !labels) {
        free(arena);
        free(labels);
        carve_all(m, m->base, (double)m->cap); /* keep the old carving valid */
        return rd_fail(RD_ENOMEM, "model: out of memory for activations of batch %lld "
                       "(%.0f MiB)", (long long)max_batch, mib);
    }
    free(m->arena);
    free(m->labels);
    m->arena = arena;
    m->labels = labels;
    m->base = (float *)(((uintptr_t)arena + 63) & ~(uintptr_t)63);
    carve_all(m, m->base, (double)max_batch);
    m->cap = max_batch;
    m->fixed = fixed;
    m->have_forward = 0;
    return RD_OK;
}

/* ---- forward ---------------------------------------------------------------------- */

#define TRY(call)                  \
    do {                           \
        rd_status s_ = (call);     \
        if (s_) return s_;         \
    } while (0)

static void point_moe(rd_model *m, rd_moe_params *mp, const float *buf, int64_t i) {
    rd_moe_params_point(mp, (float *)buf + m->blk[i].moe, &m->layer);
}

/* The state MoE block i routes with: its own in training arena forwards; in inference the
 * shared one, given block i's threshold (or none: batch top-K) first. */
static rd_status block_moe_state(rd_model *m, const fwd_acts *A, int64_t i, rd_moe_state **st) {
    if (!A->shared) {
        *st = m->moe[i];
        return RD_OK;
    }
    rd_moe_view v;
    rd_moe_state_view(m->moe[i], &v);
    *st = m->imoe;
    return rd_moe_set_threshold(m->imoe, v.have_tau ? &v.tau : NULL);
}

/* Block i on A's residual stream; plr (N,Pin, may be NULL) the PLR heads' target. */
static rd_status block_forward(rd_model *m, const fwd_acts *A, const float *P, int64_t i,
                               int64_t B, int training, const float *plr) {
    const rd_model_cfg *c = &m->cfg;
    const block_offsets *o = &m->blk[i];
    block_acts *a = A->shared ? A->ba : &A->ba[i];
    const int64_t D = c->D, L = m->L, N = B * L, S = 6 * D;
    TRY(rd_linear_forward(a->mod, A->sc, P + o->ada_w, P + o->ada_b, B, D, 6 * D));
    /* x = x + gate1 * Attn(modulate(LN(x), shift1, scale1)) */
    TRY(rd_layernorm_forward(a->xhat1, a->rstd1, A->x, N, D));
    TRY(rd_modulate_forward(a->m1, a->xhat1, a->mod, a->mod + D, B, L, D, S));
    TRY(rd_linear_forward(a->qkv, a->m1, P + o->qkv_w, P + o->qkv_b, N, D, 3 * D));
    TRY(rd_attention_forward(a->atty, a->att, a->qkv, B, L, D, c->NH));
    TRY(rd_linear_forward(a->attproj, a->atty, P + o->proj_w, P + o->proj_b, N, D, D));
    TRY(rd_gated_residual_forward(A->x, A->x, a->attproj, a->mod + 2 * D, B, L, D, S));
    /* x = x + gate2 * FFN(modulate(LN(x), shift2, scale2)), FFN = MoE or dense MLP */
    TRY(rd_layernorm_forward(a->xhat2, a->rstd2, A->x, N, D));
    TRY(rd_modulate_forward(a->m2, a->xhat2, a->mod + 3 * D, a->mod + 4 * D, B, L, D, S));
    if (m->moe) {
        rd_moe_params mp;
        rd_moe_state *st;
        point_moe(m, &mp, P, i);
        TRY(block_moe_state(m, A, i, &st));
        TRY(rd_moe_forward(st, a->ffn, a->m2, &m->layer, &mp, B, L, training, plr));
    } else {
        TRY(rd_linear_forward(a->fc1, a->m2, P + o->fc1_w, P + o->fc1_b, N, D, 4 * D));
        TRY(rd_gelu_forward(a->gel, a->fc1, N * 4 * D));
        TRY(rd_linear_forward(a->ffn, a->gel, P + o->fc2_w, P + o->fc2_b, N, 4 * D, D));
    }
    return rd_gated_residual_forward(A->x, A->x, a->ffn, a->mod + 5 * D, B, L, D, S);
}

static rd_status check_timesteps(const float *t, int64_t B) {
    for (int64_t b = 0; b < B; b++)
        if (!(t[b] >= 0.0f && t[b] <= RD_T_MAX)) /* also catches NaN */
            return rd_fail(RD_EINVAL, "t[%lld]=%g outside [0, %g]", (long long)b, (double)t[b],
                           (double)RD_T_MAX);
    return RD_OK;
}

/* The PLR heads' target (SPEC §3): (B,C,H,W) -> m->plr (N, p*p*C) in the (i,j,c) order
 * of the final layer's output; checked first, so a bad target costs no block. */
static rd_status patchify_target(rd_model *m, const float *target, int64_t B) {
    const rd_model_cfg *c = &m->cfg;
    const int64_t n = B * c->in_channels * m->H * m->H;
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(target[i]))
            return rd_fail(RD_EINVAL, "plr_target: non-finite value %g at flat index %lld of "
                           "(B,C,H,W)", (double)target[i], (long long)i);
    return rd_patchify_forward(m->plr, target, B, c->in_channels, m->H, m->H, c->patch,
                               RD_PATCH_IJC);
}

/* The forward's layers, writing A's activations; t checked, plr (N,Pin, may be NULL) the
 * patchified PLR target. */
static rd_status forward_pass(rd_model *m, const fwd_acts *A, float *out, const float *P,
                              const float *x, const float *t, const int64_t *y, const float *plr,
                              int64_t B, int training) {
    const rd_model_cfg *c = &m->cfg;
    const int64_t D = c->D, L = m->L, N = B * L, p = c->patch, H = m->H, V = c->num_classes + 1;
    /* x = x_embedder(x) + pos_embed: start each row from bias + pe, then add the product */
    TRY(rd_patchify_forward(A->patches, x, B, c->in_channels, H, H, p, RD_PATCH_CIJ));
#pragma omp parallel for collapse(2)
    for (int64_t b = 0; b < B; b++)
        for (int64_t l = 0; l < L; l++) {
            float *row = A->x + (b * L + l) * D;
            const float *pe = m->pe + l * D, *bias = P + m->xe_b;
            for (int64_t d = 0; d < D; d++) row[d] = bias[d] + pe[d];
        }
    TRY(rd_matmul_par(A->x, (int)D, A->patches, (int)m->Pin, 0, P + m->xe_w, (int)m->Pin, 1, N,
                      D, m->Pin, 1.0f, 1.0f));
    /* c = t_embedder(t) + y_embedder(y); every adaLN reads SiLU(c) */
    TRY(rd_timestep_embedding_forward(A->tfreq, t, B, RD_FREQ_DIM, RD_MAX_PERIOD));
    TRY(rd_linear_forward(A->th, A->tfreq, P + m->t0_w, P + m->t0_b, B, RD_FREQ_DIM, D));
    TRY(rd_silu_forward(A->ths, A->th, B * D));
    TRY(rd_linear_forward(A->temb, A->ths, P + m->t2_w, P + m->t2_b, B, D, D));
    TRY(rd_embedding_forward(A->c, y, P + m->ytab, B, V, D));
    for (int64_t i = 0; i < B * D; i++) A->c[i] += A->temb[i];
    TRY(rd_silu_forward(A->sc, A->c, B * D));
    for (int64_t i = 0; i < c->depth; i++) TRY(block_forward(m, A, P, i, B, training, plr));
    /* final layer: modulate(LN(x), shift, scale) -> Linear -> unpatchify */
    TRY(rd_linear_forward(A->modf, A->sc, P + m->fa_w, P + m->fa_b, B, D, 2 * D));
    TRY(rd_layernorm_forward(A->xhatf, A->rstdf, A->x, N, D));
    TRY(rd_modulate_forward(A->mf, A->xhatf, A->modf, A->modf + D, B, L, D, 2 * D));
    TRY(rd_linear_forward(A->otok, A->mf, P + m->fl_w, P + m->fl_b, N, D, m->Pout));
    return rd_unpatchify_forward(out, A->otok, B, c->out_channels, H, H, p, RD_PATCH_IJC);
}

/* The training arena's pointers as a forward's activation set. */
static fwd_acts train_acts(const rd_model *m) {
    fwd_acts A = {m->patches, m->tfreq, m->th, m->ths, m->dt1, m->c, m->sc, m->x, m->ba, 0,
                  m->modf, m->xhatf, m->rstdf, m->mf, m->otok};
    return A;
}

static rd_status model_forward(rd_model *m, float *out, const float *params, const float *x,
                               const float *t, const int64_t *y, const float *plr_target,
                               int64_t B, int training) {
    const rd_model_cfg *c = &m->cfg;
    if (B < 1) return rd_fail(RD_EINVAL, "batch must be >= 1, got %lld", (long long)B);
    if (B > m->cap) {
        if (m->fixed)
            return rd_fail(RD_EINVAL, "batch %lld exceeds max_batch=%lld given at construction",
                           (long long)B, (long long)m->cap);
        TRY(rd_model_reserve(m, B, 0));
    }
    TRY(check_timesteps(t, B));
    m->have_forward = 0;
    m->last_plr = m->moe && plr_target && training && c->moe.plr_weight != 0.0f;
    if (m->last_plr) TRY(patchify_target(m, plr_target, B));
    const fwd_acts A = train_acts(m);
    TRY(forward_pass(m, &A, out, params, x, t, y, m->last_plr ? m->plr : NULL, B, training));
    memcpy(m->labels, y, (size_t)B * sizeof(int64_t));
    m->last_B = B;
    m->have_forward = 1;
    return RD_OK;
}

/* ---- inference --------------------------------------------------------------------- */

/* The inference arena's carving into A and its one block set ba, for batch B; with
 * base == NULL only counts (A and ba then hold NULLs). */
static double carve_infer(const rd_model *m, fwd_acts *A, block_acts *ba, float *base,
                          double B) {
    const rd_model_cfg *c = &m->cfg;
    const double D = c->D, L = m->L, N = B * L;
    double u = 0;
    A->patches = carve(base, &u, N * m->Pin);
    A->tfreq = carve(base, &u, B * RD_FREQ_DIM);
    A->th = carve(base, &u, B * D);
    A->ths = carve(base, &u, B * D);
    A->temb = carve(base, &u, B * D);
    A->c = carve(base, &u, B * D);
    A->sc = carve(base, &u, B * D);
    A->x = carve(base, &u, N * D);
    carve_block(ba, base, &u, B, N, D, B * c->NH * L * L, c->moe.E == 0);
    A->ba = ba;
    A->shared = 1;
    A->modf = carve(base, &u, B * 2 * D);
    A->xhatf = carve(base, &u, N * D);
    A->rstdf = carve(base, &u, N);
    A->mf = carve(base, &u, N * D);
    A->otok = carve(base, &u, N * m->Pout);
    return u;
}

/* Grow the inference arena (and make the shared MoE state) for batch B. */
static rd_status infer_reserve(rd_model *m, int64_t B) {
    if (m->moe && !m->imoe && !(m->imoe = rd_moe_state_new()))
        return rd_fail(RD_ENOMEM, "model infer: out of memory for the MoE state");
    fwd_acts A;
    block_acts ba;
    const double bytes = carve_infer(m, &A, &ba, NULL, (double)B) * sizeof(float) + 64;
    if (bytes > RD_MAX_ALLOC_BYTES)
        return rd_fail(RD_ENOMEM, "model infer: activations of batch %lld need %.4g MiB, more "
                       "than one allocation can hold", (long long)B, bytes / 1048576.0);
    float *arena = malloc((size_t)bytes);
    if (!arena)
        return rd_fail(RD_ENOMEM, "model infer: out of memory for activations of batch %lld "
                       "(%.0f MiB)", (long long)B, bytes / 1048576.0);
    free(m->iarena);
    m->iarena = arena;
    carve_infer(m, &m->inf, &m->iba, (float *)(((uintptr_t)arena + 63) & ~(uintptr_t)63),
                (double)B);
    m->icap = B;
    return RD_OK;
}

static rd_status model_infer(rd_model *m, float *out, const float *params, const float *x,
                             const float *t, const int64_t *y, int64_t B) {
    if (B < 1) return rd_fail(RD_EINVAL, "batch must be >= 1, got %lld", (long long)B);
    TRY(check_timesteps(t, B));
    if (B > m->icap) TRY(infer_reserve(m, B));
    return forward_pass(m, &m->inf, out, params, x, t, y, NULL, B, 0);
}

void rd_model_infer_release(rd_model *m) {
    if (!m) return;
    free(m->iarena);
    m->iarena = NULL;
    m->icap = 0;
    rd_moe_state_free(m->imoe);
    m->imoe = NULL;
}

int64_t rd_model_infer_batch(const rd_model *m) { return m->icap; }

/* ---- backward ---------------------------------------------------------------------- */

/* dsc (B,D) += the adaLN branch's input gradient dmod (B,OC) @ W (OC,D); grads of W, b. */
static rd_status adaln_backward(rd_model *m, float *G, const float *P, int64_t w, int64_t bias,
                                const float *dmod, int64_t B, int64_t OC) {
    const int64_t D = m->cfg.D;
    TRY(rd_linear_backward(m->dt1, G + w, G + bias, dmod, m->sc, P + w, B, D, OC));
    for (int64_t i = 0; i < B * D; i++) m->dsc[i] += m->dt1[i];
    return RD_OK;
}

/* On entry m->dx holds d(block output); on exit d(block input). */
static rd_status block_backward(rd_model *m, float *G, const float *P, int64_t i, int64_t B) {
    const rd_model_cfg *c = &m->cfg;
    const block_offsets *o = &m->blk[i];
    const block_acts *a = &m->ba[i];
    const int64_t D = c->D, L = m->L, N = B * L, S = 6 * D;
    float *dmod = m->dmod;
    /* FFN branch: d(ffn) = gate2 * dx; the residual path passes dx through unchanged */
    TRY(rd_gated_residual_backward(m->da, dmod + 5 * D, m->dx, a->ffn, a->mod + 5 * D, B, L, D, S));
    if (m->moe) {
        rd_moe_params mp, mg;
        point_moe(m, &mp, P, i);
        point_moe(m, &mg, G, i);
        TRY(rd_moe_backward(m->moe[i], m->db, &mg, m->da, a->m2, &m->layer, &mp));
    } else {
        TRY(rd_linear_backward(m->dfc, G + o->fc2_w, G + o->fc2_b, m->da, a->gel, P + o->fc2_w,
                               N, 4 * D, D));
        TRY(rd_gelu_backward(m->dfc, m->dfc, a->fc1, N * 4 * D));
        TRY(rd_linear_backward(m->db, G + o->fc1_w, G + o->fc1_b, m->dfc, a->m2, P + o->fc1_w,
                               N, D, 4 * D));
    }
    TRY(rd_modulate_backward(m->da, dmod + 3 * D, dmod + 4 * D, m->db, a->xhat2, a->mod + 4 * D,
                             B, L, D, S));
    TRY(rd_layernorm_backward(m->dx, m->da, a->xhat2, a->rstd2, N, D));
    /* attention branch */
    TRY(rd_gated_residual_backward(m->da, dmod + 2 * D, m->dx, a->attproj, a->mod + 2 * D, B, L,
                                   D, S));
    TRY(rd_linear_backward(m->db, G + o->proj_w, G + o->proj_b, m->da, a->atty, P + o->proj_w, N,
                           D, D));
    TRY(rd_attention_backward(m->dqkv, m->datt, m->db, a->qkv, a->att, B, L, D, c->NH));
    TRY(rd_linear_backward(m->da, G + o->qkv_w, G + o->qkv_b, m->dqkv, a->m1, P + o->qkv_w, N, D,
                           3 * D));
    TRY(rd_modulate_backward(m->db, dmod, dmod + D, m->da, a->xhat1, a->mod + D, B, L, D, S));
    TRY(rd_layernorm_backward(m->dx, m->db, a->xhat1, a->rstd1, N, D));
    return adaln_backward(m, G, P, o->ada_w, o->ada_b, dmod, B, 6 * D);
}

static rd_status model_backward(rd_model *m, float *grads, const float *dout, const float *params) {
    if (!m->have_forward)
        return rd_fail(RD_ESTATE, "backward called before forward");
    const rd_model_cfg *c = &m->cfg;
    const int64_t B = m->last_B, D = c->D, L = m->L, N = B * L, p = c->patch, H = m->H;
    const float *P = params;
    float *G = grads;
    memset(m->dsc, 0, (size_t)(B * D) * sizeof(float));
    /* final layer */
    TRY(rd_unpatchify_backward(m->dotok, dout, B, c->out_channels, H, H, p, RD_PATCH_IJC));
    TRY(rd_linear_backward(m->da, G + m->fl_w, G + m->fl_b, m->dotok, m->mf, P + m->fl_w, N, D,
                           m->Pout));
    TRY(rd_modulate_backward(m->db, m->dmod, m->dmod + D, m->da, m->xhatf, m->modf + D, B, L, D,
                             2 * D));
    memset(m->dx, 0, (size_t)(N * D) * sizeof(float));
    TRY(rd_layernorm_backward(m->dx, m->db, m->xhatf, m->rstdf, N, D));
    TRY(adaln_backward(m, G, P, m->fa_w, m->fa_b, m->dmod, B, 2 * D));
    for (int64_t i = c->depth - 1; i >= 0; i--) TRY(block_backward(m, G, P, i, B));
    /* embeddings: patch projection (pos_embed is fixed), then the conditioning path */
    TRY(rd_linear_backward(NULL, G + m->xe_w, G + m->xe_b, m->dx, m->patches, P + m->xe_w, N,
                           m->Pin, D));
    float *dc = m->dt2;
    TRY(rd_silu_backward(dc, m->dsc, m->c, B * D));
    TRY(rd_embedding_backward(G + m->ytab, dc, m->labels, B, c->num_classes + 1, D));
    TRY(rd_linear_backward(m->dt1, G + m->t2_w, G + m->t2_b, dc, m->ths, P + m->t2_w, B, D, D));
    TRY(rd_silu_backward(m->dt1, m->dt1, m->th, B * D));
    return rd_linear_backward(NULL, G + m->t0_w, G + m->t0_b, m->dt1, m->tfreq, P + m->t0_w, B,
                              RD_FREQ_DIM, D);
}

/* The BLAS is made single-threaded once for the whole pass in RD_THREADS_OMP mode (moe.h),
 * so OpenMP and BLAS threads never compete; every layer inside follows the same mode. */
rd_status rd_model_forward(rd_model *m, float *out, const float *params, const float *x,
                           const float *t, const int64_t *y, const float *plr_target,
                           int64_t B, int training) {
    const int prev = rd_blas_threads_enter();
    rd_status s = model_forward(m, out, params, x, t, y, plr_target, B, training);
    rd_blas_threads_restore(prev);
    return s;
}

rd_status rd_model_infer(rd_model *m, float *out, const float *params, const float *x,
                         const float *t, const int64_t *y, int64_t B) {
    const int prev = rd_blas_threads_enter();
    rd_status s = model_infer(m, out, params, x, t, y, B);
    rd_blas_threads_restore(prev);
    return s;
}

rd_status rd_model_backward(rd_model *m, float *grads, const float *dout, const float *params) {
    const int prev = rd_blas_threads_enter();
    rd_status s = model_backward(m, grads, dout, params);
    rd_blas_threads_restore(prev);
    return s;
}
