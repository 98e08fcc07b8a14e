/* model_impl.h — the model's internals shared by the files of csrc/core (the graph in
 * model.c, the training step in train.c). */
#ifndef RACEDIT_MODEL_IMPL_H
#define RACEDIT_MODEL_IMPL_H

#include "../backend.h"

#define TRY(call)                  \
    do {                           \
        rd_status s_ = (call);     \
        if (s_) return s_;         \
    } while (0)

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

/* What a forward reads and writes: the training arena's (a block_acts per block, kept for
 * backward) or the inference arena's (one block_acts that every block overwrites). */
typedef struct {
    int64_t *labels;           /* (B) staged y */
    float *tdev, *xin;         /* (B) staged t, (B,C,H,W) staged x */
    float *outimg;             /* (B,Co,H,W) the output */
    float *patches;            /* (N,C*p*p) patch vectors in (c,i,j) order */
    float *tfreq, *th, *ths;   /* (B,F), (B,D), (B,D) timestep MLP */
    float *temb;               /* (B,D) its output (the training set: backward scratch dt1) */
    float *c, *sc;             /* (B,D) conditioning and SiLU(c) */
    float *x;                  /* (N,D) residual stream */
    block_acts *ba;            /* depth, or one when shared */
    int shared;                /* 1: every block writes ba[0] (inference) */
    float *modf, *xhatf, *rstdf, *mf, *otok; /* final layer: (B,2D) (N,D) (N) (N,D) (N,Pout) */
} fwd_acts;

struct rd_model {
    const rd_backend *be;
    void *ctx;                 /* the backend's context (GEMM scratch, bf16 weight copies) */
    rd_model_cfg cfg;
    rd_moe_cfg layer;          /* what each MoE block gets: cfg.moe with the loss weights /depth */
    int64_t H, gh, gw, L;      /* image side, patch grid, tokens per image */
    int64_t Pin, Pout;         /* p*p*C, p*p*Co */
    rd_tensor_info *tensors;
    int ntensors, tcap;
    int64_t nparams;
    int64_t xe_w, xe_b, t0_w, t0_b, t2_w, t2_b, ytab, fl_w, fl_b, fa_w, fa_b;
    block_offsets *blk;        /* depth */
    float *buf[RD_MODEL_NBUF]; /* params, grads, adam m, adam v, ema (backend memory) */
    float *pe;                 /* (L,D) fixed position embedding (backend memory) */
    void **moe;                /* depth backend MoE states when MoE, else NULL */
    int64_t step;              /* AdamW steps taken */
    int prec;
    /* training arena (backend memory), carved for cap images */
    void *arena;
    int64_t cap;
    int fixed;                 /* 1: cap is a hard max_batch */
    fwd_acts A;
    block_acts *ba;            /* depth */
    float *tgt, *dout;         /* (B,C,H,W) staged target, (B,Co,H,W) d loss / d out */
    float *plr;                /* (N,Pin) patchified PLR target */
    float *dx, *da, *db, *dqkv, *datt, *dfc, *dmod, *dsc, *dt1, *dt2, *dotok;
    int64_t last_B;
    int have_forward, last_plr;
    /* inference (rd_model_infer): its own arena, one block's activations, one MoE state */
    void *iarena;
    int64_t icap;
    block_acts iba;
    fwd_acts inf;
    void *imoe;
};

/* For train.c: a training forward of validated host inputs (target staged in m->tgt), the
 * backward from m->dout, the host checks of t, y and target, and a pass's enter / leave. */
rd_status rd_model_forward_staged(rd_model *m, const float *x, const float *t, const int64_t *y,
                                  const float *target, int64_t B, int training);
rd_status rd_model_backward_staged(rd_model *m);
rd_status rd_model_check_target(const rd_model *m, const float *t, const int64_t *y,
                                const float *target, int64_t B);
int rd_model_enter(const rd_model *m);
void rd_model_leave(const rd_model *m, int prev);

#endif
