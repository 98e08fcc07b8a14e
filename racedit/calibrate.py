"""racedit.calibrate — routing thresholds that belong to the weights they are used with
(docs/method.md §3), and experts per token at inference over a sampler's timestep grid.

A layer's thresholds are learned in training as the EMA of each group's K-th largest gate
under the *live* weights; sampling uses the EMA weights, whose gates sit elsewhere. So
when a checkpoint is written the thresholds are measured again on the EMA weights:
``passes`` no-grad training-mode forwards over training batches at timesteps drawn as in
training, each setting every threshold to its group's K-th value in that batch (no EMA,
no parameter change), averaged over the passes. The batches come from a generator keyed
by (seed, step), so a resumed run recalibrates exactly as the uninterrupted one. The
model's weights, thresholds and mode are restored afterwards: the training run itself is
unchanged.

Experts per token at inference are measured the way a sampler meets them: one image per
model evaluation of the sampler's grid (``objective.sampler_times``), each noised to its
time, routed in eval mode. Eval routing does not depend on the rest
of the batch (docs/method.md §3; ``eval_topk`` models excepted), so one batch holding the
whole grid gives each image what a single-timestep batch would.
"""
import contextlib

import numpy as np

from .sample import set_weights

__all__ = ["recalibrate_thresholds", "inference_experts_per_token", "ema_routing",
           "routing_with"]


@contextlib.contextmanager
def routing_with(model, weights=None, thresholds=None, training=False):
    """For the block: ``weights`` (flat float32; None: the model's own), ``thresholds``
    (None: the model's own) and the mode; the model's weights, thresholds and mode are
    restored after."""
    saved_w, saved_th, was_training = model.param_buffer.copy(), model.thresholds, model.training
    try:
        if weights is not None:
            set_weights(model, weights)
        if thresholds is not None:
            model.thresholds = thresholds
        model.train(training)
        yield model
    finally:
        set_weights(model, saved_w)
        model.thresholds = saved_th
        model.train(was_training)


def _keyed_batch(dataset, obj, rng, n):
    """n training images, their labels, and training-distributed timesteps and noise."""
    idx = rng.choice(len(dataset), size=n, replace=len(dataset) < n)
    x0, y = dataset.batch(np.sort(idx))
    t, noise = obj.draw(rng, x0)
    x_t, _ = obj.make_batch(x0, t, noise)
    return x_t, obj.model_time(t), y


def recalibrate_thresholds(model, weights, obj, dataset, seed=0, step=0, passes=4, batch=16):
    """The thresholds (``model.threshold_shape``, float32) that ``weights`` (flat float32)
    route with: for each of ``passes`` training batches of ``batch`` images (keyed by
    (seed, step)), a training-mode forward sets every threshold to its group's K-th value;
    the result is their mean. The model's weights, thresholds and mode are restored.
    A model whose strategy has no thresholds (token, expert, LE) gets its (layers, 0)."""
    shape = model.threshold_shape
    if not model.config.is_moe or int(np.prod(shape)) == 0:
        return np.zeros(shape, np.float32)
    rng = np.random.default_rng([int(seed), 11, int(step)])
    nan = np.full(shape, np.nan, np.float32)
    acc = np.zeros(shape, np.float64)
    with routing_with(model, weights, training=True):
        for _ in range(int(passes)):
            x_t, tm, y = _keyed_batch(dataset, obj, rng, int(batch))
            model.thresholds = nan                 # forgotten: this batch's K-th values
            model.forward(x_t, tm, y)
            acc += model.thresholds
    return (acc / int(passes)).astype(np.float32)


def inference_experts_per_token(model, weights, thresholds, obj, dataset, sampler, num_steps,
                                seed=0, batch=16):
    """Experts per token at inference over the sampler's grid: dict with ``t`` (the model
    times of the grid), ``experts_per_token`` (one image each, the mean over MoE layers)
    and ``mean`` (over the grid). Eval-mode forwards of ``batch`` images at a time;
    ``weights`` / ``thresholds`` (None: the model's own) are used for the measurement, and
    the model's weights, thresholds and mode restored after (its last forward is this
    measurement's)."""
    t = obj.sampler_times(sampler, num_steps)
    rng = np.random.default_rng([int(seed), 12])
    idx = rng.choice(len(dataset), size=len(t), replace=len(dataset) < len(t))
    x0, y = dataset.batch(np.sort(idx))
    x_t, _ = obj.make_batch(x0, t, rng.standard_normal(x0.shape, dtype=np.float32))
    tm = obj.model_time(t)
    per = []
    with routing_with(model, weights, thresholds):
        for i in range(0, len(t), int(batch)):
            model.forward(x_t[i:i + batch], tm[i:i + batch], y[i:i + batch])
            per.append(model.experts_per_token_by_sample())
    ept = np.concatenate(per).astype(np.float64)
    return {"t": tm.tolist(), "experts_per_token": ept.tolist(), "mean": float(ept.mean())}


def ema_routing(model, weights, obj, dataset, sampler, num_steps, seed=0, step=0, passes=4,
                batch=16):
    """The thresholds recalibrated on ``weights`` (:func:`recalibrate_thresholds`) and a
    summary: inference experts per token over the sampler's grid with them
    (``infer_experts_per_token``) and with the live thresholds
    (``infer_experts_per_token_live_thresholds``), the passes and batch used."""
    th = recalibrate_thresholds(model, weights, obj, dataset, seed, step, passes, batch)
    summary = {"passes": int(passes), "batch": int(batch), "sampler": sampler,
               "num_steps": int(num_steps), "k": model.config.k}
    with_cal = inference_experts_per_token(model, weights, th, obj, dataset, sampler,
                                           num_steps, seed, batch)
    live = inference_experts_per_token(model, weights, None, obj, dataset, sampler, num_steps,
                                       seed, batch)
    summary["infer_experts_per_token"] = with_cal["mean"]
    summary["infer_experts_per_token_live_thresholds"] = live["mean"]
    return th, summary
