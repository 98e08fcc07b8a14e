/* optim.h — the optimiser area: fused loops over the flat parameter buffer (AdamW, the
 * gradient norm for clipping, the EMA of the weights, a NaN/Inf finder). Parameters,
 * gradients, AdamW moments and the EMA all share one layout (n floats), so each update
 * is a single loop, as in llm.c. Included by racedit.h; see there for conventions. */
#ifndef RACEDIT_OPTIM_H
#define RACEDIT_OPTIM_H

/* One AdamW step, as torch.optim.AdamW (decoupled weight decay):
 *   g = grad_scale * grads
 *   p <- p * (1 - lr*weight_decay)
 *   m <- beta1*m + (1-beta1)*g ;  v <- beta2*v + (1-beta2)*g*g
 *   p <- p - lr/(1-beta1^step) * m / (sqrt(v)/sqrt(1-beta2^step) + eps)
 * `step` is 1-based (the number of this update). grad_scale folds gradient clipping
 * (and loss scaling) into the same pass. params, m, v are updated in place. The
 * hyper-parameters are double so that 1-beta and the bias corrections are formed before
 * rounding to float, as torch does (0.999f alone is 1.3e-5 off in 1-beta2). */
rd_status rd_adamw_step(float *params /* (n) */, const float *grads /* (n) */,
                        float *m /* (n) */, float *v /* (n) */, int64_t n,
                        double lr, double beta1, double beta2, double eps,
                        double weight_decay, int64_t step, double grad_scale);

/* The hyper-parameter checks of rd_adamw_step and its CUDA twin (op names the caller in
 * the message): n >= 0, step >= 1, betas in [0, 1), and with an EMA its decay in [0, 1]. */
rd_status rd_adamw_check(const char *op, int64_t n, int64_t step, double beta1, double beta2,
                         int has_ema, double ema_decay);

/* *out = sqrt(sum grads^2), accumulated in double over fixed chunks of
 * RD_NORM_CHUNK elements whose partial sums are added in order: the result is the same
 * bit for bit whatever the number of threads (exact resume depends on it). */
#define RD_NORM_CHUNK 8192
rd_status rd_grad_norm(double *out, const float *grads /* (n) */, int64_t n);

/* ema <- decay*ema + (1-decay)*params (as DiT's update_ema). */
rd_status rd_ema_update(float *ema /* (n) */, const float *params /* (n) */, int64_t n,
                        double decay);

/* *index = the first i with x[i] NaN or +-Inf, or -1 when all are finite. */
rd_status rd_nonfinite_index(int64_t *index, const float *x /* (n) */, int64_t n);

#endif
