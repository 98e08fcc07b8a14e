/* train.c — the training step of the model graph, the same on every backend: the fused
 * step (forward, the diffusion MSE and its gradient, backward) and the optimiser step
 * (gradient norm and clip, AdamW fused with the EMA over the flat buffers the model owns,
 * as llm.c's gpt2_update). Only scalars cross to the host: the loss, the aux losses and the
 * gradient norm, each read once. */
#include "model_impl.h"

#include <math.h>
#include <string.h>

static rd_status check_opt(const rd_model *m, const rd_model_opt *o) {
    if (!(o->lr >= 0.0) || !(o->weight_decay >= 0.0) || !(o->eps > 0.0) || !(o->max_grad_norm >= 0.0))
        return rd_fail(RD_EINVAL, "train_step: lr, weight_decay, max_grad_norm must be >= 0 and "
                       "eps > 0");
    return rd_adamw_check("train_step", m->nparams, m->step + 1, o->beta1, o->beta2,
                          o->ema_decay >= 0.0, o->ema_decay);
}

/* The gradient norm when asked, its clip scale (racedit.optim.clip_scale, torch's
 * clip_grad_norm_: min(1, max / (norm + 1e-6))), then AdamW + EMA, unless the norm is not
 * finite. */
static rd_status opt_step(rd_model *m, const rd_model_opt *o, rd_model_step_out *res) {
    const rd_backend *be = m->be;
    double scale = 1.0;
    res->grad_norm = NAN;
    if (o->max_grad_norm > 0.0) {
        TRY(be->grad_norm(m->ctx, &res->grad_norm, m->buf[RD_BUF_GRADS], m->nparams));
        if (!isfinite(res->grad_norm)) return RD_OK;
        scale = o->max_grad_norm / (res->grad_norm + 1e-6);
        if (scale > 1.0) scale = 1.0;
    }
    const int ema = o->ema_decay >= 0.0;
    TRY(be->adamw_step(m->buf[RD_BUF_PARAMS], m->buf[RD_BUF_GRADS], m->buf[RD_BUF_ADAM_M],
                       m->buf[RD_BUF_ADAM_V], ema ? m->buf[RD_BUF_EMA] : NULL, m->nparams, o->lr,
                       o->beta1, o->beta2, o->eps, o->weight_decay, m->step + 1, scale,
                       ema ? o->ema_decay : 0.0));
    m->step++;
    res->updated = 1;
    return RD_OK;
}

rd_status rd_model_optimizer_step(rd_model *m, rd_model_step_out *res, const rd_model_opt *o) {
    memset(res, 0, sizeof *res);
    res->loss = NAN;
    TRY(check_opt(m, o));
    const int prev = rd_model_enter(m);
    rd_status s = opt_step(m, o, res);
    rd_model_leave(m, prev);
    res->step = m->step;
    return s;
}

/* The weighted aux losses of the last forward, summed over the MoE blocks in order. */
static rd_status aux_total(rd_model *m, double *out) {
    *out = 0.0;
    for (int64_t i = 0; i < rd_model_num_moe(m); i++) {
        rd_moe_aux a;
        TRY(m->be->moe_aux(m->moe[i], &a));
        *out += (double)a.aux_loss;
    }
    return RD_OK;
}

static rd_status train_step(rd_model *m, rd_model_step_out *res, const float *x, const float *t,
                            const int64_t *y, const float *target, int64_t B,
                            const rd_model_opt *o) {
    const rd_backend *be = m->be;
    const rd_model_cfg *c = &m->cfg;
    TRY(check_opt(m, o));
    TRY(rd_model_check_target(m, t, y, target, B));
    TRY(rd_model_forward_staged(m, x, t, y, target, B, 1));
    TRY(be->mse(m->ctx, &res->loss, m->dout, m->A.outimg, m->tgt, B, c->in_channels,
                c->out_channels, m->H * m->H));
    TRY(aux_total(m, &res->aux));
    TRY(be->memset(m->buf[RD_BUF_GRADS], 0, (size_t)m->nparams * sizeof(float)));
    TRY(rd_model_backward_staged(m));
    if (!isfinite(res->loss + res->aux)) return RD_OK;
    return opt_step(m, o, res);
}

rd_status rd_model_train_step(rd_model *m, rd_model_step_out *res, const float *x,
                              const float *t, const int64_t *y, const float *target, int64_t B,
                              const rd_model_opt *o) {
    memset(res, 0, sizeof *res);
    res->grad_norm = NAN;
    const int prev = rd_model_enter(m);
    rd_status s = train_step(m, res, x, t, y, target, B, o);
    rd_model_leave(m, prev);
    res->step = m->step;
    return s;
}
