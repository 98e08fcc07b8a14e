/* model.h — the DiT backbone of docs/method.md §1: its layers (csrc/cpu/dit.c) and the whole
 * model with MoE or dense blocks, one graph on any backend's op table (csrc/core). Included
 * by racedit.h; see there
 * for the conventions (row-major float32, parameter grads +=, activation grads =
 * unless named *_acc).
 *
 * Extra shape letters: C image channels (Co output channels), H W image size, p patch,
 * NH heads, hd = D/NH head width, F frequency width of the timestep embedding (256),
 * OC/IC output/input features of a linear, S row stride of a modulation buffer.
 *
 * Linear weights are stored (OC, IC) like torch.nn.Linear, out = inp @ W^T + b, so a
 * facebookresearch/DiT state dict loads without transposes. The MoE tensors keep the
 * (in, out) layout of moe.h. */
#ifndef RACEDIT_MODEL_H
#define RACEDIT_MODEL_H

/* ---- layers ------------------------------------------------------------------ */

/* Order of the p*p*C features of one patch. The patch embedding (a Conv2d(C, D, p,
 * stride p) whose weight is (D, C, p, p)) reads patches in (c, i, j) order; the final
 * layer writes them in (i, j, c) order, as DiT's unpatchify reads them. Token
 * l = hi*(W/p) + wi, row-major over the patch grid (timm's PatchEmbed). */
typedef enum { RD_PATCH_CIJ = 0, RD_PATCH_IJC = 1 } rd_patch_order;

/* tok (B,L,p*p*C) <- img (B,C,H,W); H and W multiples of p. Each is the other's inverse
 * permutation, so the backward of one is the forward of the other. */
rd_status rd_patchify_forward(float *tok, const float *img, int64_t B, int64_t C, int64_t H,
                              int64_t W, int64_t p, rd_patch_order order);
/* img (B,C,H,W) <- tok (B,L,p*p*C). */
rd_status rd_unpatchify_forward(float *img, const float *tok, int64_t B, int64_t C, int64_t H,
                                int64_t W, int64_t p, rd_patch_order order);

/* pe (gh*gw, D): DiT's fixed 2-D sin-cos embedding (MAE's get_2d_sincos_pos_embed):
 * token (r, s) gets [sin(s w), cos(s w), sin(r w), cos(r w)], w_k = 10000^(-k/(D/4)),
 * k < D/4 (the first half encodes the column s). D a multiple of 4. Computed in double. */
rd_status rd_pos_embed_2d(float *pe, int64_t gh, int64_t gw, int64_t D);

/* emb (B,F) = [cos(t f), sin(t f)], f_k = max_period^(-k/(F/2)), k < F/2 (F even);
 * DiT's timestep_embedding. No backward: t is data. */
rd_status rd_timestep_embedding_forward(float *emb, const float *t, int64_t B, int64_t F,
                                        float max_period);

/* out (N,OC) = inp (N,IC) @ W (OC,IC)^T + b (OC, may be NULL). */
rd_status rd_linear_forward(float *out, const float *inp, const float *W, const float *b,
                            int64_t N, int64_t IC, int64_t OC);
/* dinp (N,IC, may be NULL) = dout W; dW (OC,IC) += dout^T inp; db (OC, may be NULL) += sum_n dout. */
rd_status rd_linear_backward(float *dinp, float *dW, float *db, const float *dout,
                             const float *inp, const float *W, int64_t N, int64_t IC, int64_t OC);

/* LayerNorm without affine over the last dim, eps 1e-6 (biased variance):
 * out (N,D) = (inp - mean) * rstd, rstd (N) saved. */
rd_status rd_layernorm_forward(float *out, float *rstd, const float *inp, int64_t N, int64_t D);
/* dinp_acc (N,D) += d(inp) from dout (N,D), the saved normalised out (N,D) and rstd (N).
 * dinp_acc ACCUMULATES: LayerNorm always reads the residual stream. */
rd_status rd_layernorm_backward(float *dinp_acc, const float *dout, const float *out,
                                const float *rstd, int64_t N, int64_t D);

/* out (B,L,D) = inp * (1 + scale[b]) + shift[b]; shift, scale rows (B, stride S). */
rd_status rd_modulate_forward(float *out, const float *inp, const float *shift,
                              const float *scale, int64_t B, int64_t L, int64_t D, int64_t S);
/* dinp (B,L,D) = dout * (1 + scale); dshift, dscale (B, stride S) = sums over L. */
rd_status rd_modulate_backward(float *dinp, float *dshift, float *dscale, const float *dout,
                               const float *inp, const float *scale, int64_t B, int64_t L,
                               int64_t D, int64_t S);

/* out (B,L,D) = inp + gate[b] * h; gate rows (B, stride S); out may alias inp. */
rd_status rd_gated_residual_forward(float *out, const float *inp, const float *h,
                                    const float *gate, int64_t B, int64_t L, int64_t D, int64_t S);
/* dh (B,L,D) = gate * dout; dgate (B, stride S) = sum_l dout * h. d(inp) = dout (not written). */
rd_status rd_gated_residual_backward(float *dh, float *dgate, const float *dout, const float *h,
                                     const float *gate, int64_t B, int64_t L, int64_t D,
                                     int64_t S);

/* Multi-head softmax attention. qkv (B,L,3D) holds [q | k | v], head h at columns
 * h*hd..h*hd+hd-1 of each; att (B,NH,L,L) the saved probabilities; out (B,L,D) heads
 * concatenated. Scores are scaled by 1/sqrt(hd), softmax in float32 with the row max
 * subtracted. Memory is O(B*NH*L^2): fine on CPU for L <= 256 (8x8 ... 32x32 latents
 * at p=2), a flash-style kernel is the CUDA issue's business. */
rd_status rd_attention_forward(float *out, float *att, const float *qkv, int64_t B, int64_t L,
                               int64_t D, int64_t NH);
/* dqkv (B,L,3D) from dout (B,L,D); datt (B,NH,L,L) is scratch owned by the caller. */
rd_status rd_attention_backward(float *dqkv, float *datt, const float *dout, const float *qkv,
                                const float *att, int64_t B, int64_t L, int64_t D, int64_t NH);

/* Elementwise: out (n) = SiLU(inp) = inp*sigmoid(inp); GELU with the tanh approximation. */
rd_status rd_silu_forward(float *out, const float *inp, int64_t n);
rd_status rd_silu_backward(float *dinp, const float *dout, const float *inp, int64_t n);
rd_status rd_gelu_forward(float *out, const float *inp, int64_t n);
rd_status rd_gelu_backward(float *dinp, const float *dout, const float *inp, int64_t n);

/* Label embedding: out (B,D) = table[y[b]] for table (V,D); y outside [0,V) -> RD_EINVAL. */
rd_status rd_embedding_forward(float *out, const int64_t *y, const float *table, int64_t B,
                               int64_t V, int64_t D);
/* dtable (V,D) += scatter of dout (B,D) by y. */
rd_status rd_embedding_backward(float *dtable, const float *dout, const int64_t *y, int64_t B,
                                int64_t V, int64_t D);

/* ---- the model ----------------------------------------------------------------- */

#define RD_FREQ_DIM 256        /* F: sinusoidal timestep features, as DiT */
#define RD_MAX_PERIOD 10000.0f
#define RD_T_MAX 1000.0f       /* t must lie in [0, RD_T_MAX] */

typedef struct {
    int64_t depth, D, NH;          /* blocks, width, heads (D % NH == 0, D % 4 == 0)       */
    int64_t patch, input_size;     /* p; the image is input_size x input_size             */
    int64_t in_channels, out_channels, num_classes; /* labels 0..num_classes (null class) */
    rd_moe_cfg moe;                /* moe.E == 0: dense blocks with a 4D GELU-tanh MLP;    */
                                   /* else moe.D must equal D; rd_model_new sets           */
                                   /* moe.plr_dim = p*p*in_channels (heads always present, */
                                   /* so the layout does not depend on plr_weight). The    */
                                   /* loss weights are the model's lambdas: each aux loss  */
                                   /* is the mean over the MoE layers, so every layer gets */
                                   /* weight / depth.                                      */
} rd_model_cfg;

/* One tensor of the parameter buffer: DiT's module names (facebookresearch/DiT
 * models.py) for the backbone, "blocks.<i>.moe.<name>" for the MoE tensors (moe.h
 * order: router_w, router_b, gate_w, gate_b, w1, b1, w2, b2, plr_w, plr_b). */
#define RD_NAME_MAX 64
typedef struct {
    char name[RD_NAME_MAX];
    int64_t offset, numel;       /* in floats, into the parameter (and gradient) buffer */
    int ndim;
    int64_t shape[4];
} rd_tensor_info;

typedef struct rd_model rd_model;
struct rd_backend;

/* Validates the configuration, builds the layout and allocates, in the memory of backend
 * `be` (backend.h), the five buffers of rd_model_num_params floats the model owns, the
 * llm.c way: parameters, gradients, the AdamW moments m and v, and the EMA of the
 * parameters (zeros; the caller initialises the parameters and the EMA). No activation
 * memory yet. */
rd_status rd_model_new(rd_model **out, const rd_model_cfg *cfg, const struct rd_backend *be);
void rd_model_free(rd_model *m);
const struct rd_backend *rd_model_backend(const rd_model *m);
const rd_model_cfg *rd_model_config(const rd_model *m);
int64_t rd_model_num_params(const rd_model *m);     /* floats in each buffer */
int rd_model_num_tensors(const rd_model *m);
const rd_tensor_info *rd_model_tensor(const rd_model *m, int i);
enum { RD_BUF_PARAMS = 0, RD_BUF_GRADS = 1, RD_BUF_ADAM_M = 2, RD_BUF_ADAM_V = 3,
       RD_BUF_EMA = 4, RD_MODEL_NBUF = 5 };
/* Buffer `which` (RD_BUF_*), backend memory laid out by the tensor table; NULL for a bad
 * index. Read on every call (never cached): writing it takes effect at once. */
float *rd_model_buffer(rd_model *m, int which);
/* Number of MoE blocks (depth, or 0 when dense) and the backend MoE state of block l. */
int64_t rd_model_num_moe(const rd_model *m);
void *rd_model_moe_state(rd_model *m, int64_t l);
/* Precision of the model's GEMMs (rd_precision; the CPU has fp32 only). bf16: every linear
 * layer, the attention products and the MoE blocks' expert GEMMs take bf16 operands with
 * fp32 accumulation; each forward rounds the weights it uses into copies its backward
 * reads. Drops the last forward. */
rd_status rd_model_set_precision(rd_model *m, int prec);
/* AdamW steps taken (the bias correction's count); settable for resuming. */
int64_t rd_model_get_step(const rd_model *m);
rd_status rd_model_set_step(rd_model *m, int64_t step);

/* Allocate activations for batches up to max_batch. fixed=1: a larger batch is an error
 * naming max_batch; fixed=0: the buffers grow when a larger batch arrives. */
rd_status rd_model_reserve(rd_model *m, int64_t max_batch, int fixed);
int64_t rd_model_max_batch(const rd_model *m);       /* 0 before any allocation */

/* The entry points below take HOST arrays (x, t, y, targets, dout, out), validate t in
 * [0, RD_T_MAX], y in [0, num_classes] and the targets' finiteness on the host, and copy
 * them into the backend at the boundary; everything else stays in backend memory.
 *
 * out (B,Co,H,W, may be NULL: kept in the backend) = model(x (B,C,H,W), t (B), y (B)).
 * plr_target (B,C,H,W, may be NULL): the diffusion regression target, patchified here
 * for the MoE blocks' PLR heads. training selects the MoE routing mode. */
rd_status rd_model_forward(rd_model *m, float *out, const float *x, const float *t,
                           const int64_t *y, const float *plr_target, int64_t B, int training);
/* out (B,Co,H,W) = rd_model_forward(..., plr_target NULL, training 0), bit for bit, keeping
 * nothing for a backward: the blocks share one block's activations in an inference arena
 * of the model's own (grown to the largest batch seen, max_batch does not apply) and the
 * MoE blocks one routing workspace (each block's threshold copied in; a block without one
 * routes by batch top-K). Memory O(B * one block), not O(B * depth). The training
 * activations, the last forward (backward, branch norms, the MoE layers' views) and the
 * thresholds are left as they were. */
rd_status rd_model_infer(rd_model *m, float *out, const float *x, const float *t,
                         const int64_t *y, int64_t B);
/* Free the inference arena and workspace (the next rd_model_infer allocates them again),
 * and the batch it holds (0: none). */
void rd_model_infer_release(rd_model *m);
int64_t rd_model_infer_batch(const rd_model *m);
/* Backward of the last forward: the gradient buffer ACCUMULATES the gradient of
 * <dout (B,Co,H,W), out> plus the MoE blocks' weighted aux losses. The parameters must
 * hold the values the forward used. RD_ESTATE before any forward. */
rd_status rd_model_backward(rd_model *m, const float *dout);
/* Batch size of the last forward (0 before any). */
int64_t rd_model_last_batch(const rd_model *m);
/* What each block of the last forward added to the residual stream (docs/method.md §6, the
 * paper's Fig. 5): out (depth, 2, host) = per block, the mean over its B*L tokens of the L2
 * norm of gate1 * attention output and of gate2 * FFN/MoE output (the two branches before their
 * residual adds), summed in double. RD_ESTATE before any forward. */
rd_status rd_model_branch_norms(rd_model *m, double *out);

/* ---- training ---------------------------------------------------------------------- */
/* The optimiser's settings: AdamW (torch.optim.AdamW), the clip of the gradient norm
 * (max_grad_norm 0: the norm is not even computed; inf: computed, never clipping) and the
 * EMA decay (< 0: no EMA). */
typedef struct {
    double lr, beta1, beta2, eps, weight_decay, max_grad_norm, ema_decay;
} rd_model_opt;
typedef struct {
    double loss;      /* the diffusion MSE (train_step; NaN for optimizer_step)             */
    double aux;       /* the MoE blocks' weighted aux losses of the forward (0 when dense)   */
    double grad_norm; /* NaN when not computed                                              */
    int64_t step;     /* AdamW steps taken, after this one                                   */
    int updated;      /* 0: the loss or the gradient norm was not finite; nothing changed   */
} rd_model_step_out;
/* The optimiser on the gradients as they are: the gradient norm (when max_grad_norm > 0),
 * the clip scale min(1, max_grad_norm / (norm + 1e-6)), then AdamW (step count + 1) fused
 * with the EMA of the updated parameters. A non-finite norm stops before any update
 * (res->updated 0). */
rd_status rd_model_optimizer_step(rd_model *m, rd_model_step_out *res, const rd_model_opt *o);
/* One training step: forward in training mode (the MoE PLR heads regress `target`), loss =
 * mean((out[:, :C] - target)^2) over (B,C,H,W) (with learn_sigma the variance channels get
 * no gradient; summed in double in NumPy's pairwise order on the CPU), gradients zeroed
 * then backward, and rd_model_optimizer_step. A non-finite loss + aux stops before the
 * backward (res->updated 0). x, t, y, target are HOST arrays. */
rd_status rd_model_train_step(rd_model *m, rd_model_step_out *res, const float *x,
                              const float *t, const int64_t *y, const float *target, int64_t B,
                              const rd_model_opt *o);

#endif
