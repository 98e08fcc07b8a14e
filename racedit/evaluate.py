"""racedit.evaluate — the held-out metric of the ablation studies: a diffusion loss on a
fixed validation set with fixed noise and fixed timesteps, so that two runs are compared
on exactly the same inputs (a paired comparison) and the same checkpoint always gives the
same number.

A :class:`ValidationSet` holds every validation image at every one of ``num_buckets``
timestep buckets: sample (i, b) is image i noised at a timestep drawn uniformly inside
bucket b (ddpm: integer steps in [b T/nb, (b+1) T/nb); flow: t in [b/nb, (b+1)/nb)),
with noise and timesteps drawn from a generator seeded by ``seed`` alone — never by the
run's seed, routing or model. Its ``fingerprint`` (SHA-256 of images, labels, timesteps
and noise) is recorded with every result, so a pairing can be checked after the fact.

:func:`evaluate` runs the model in eval mode (labels kept, MoE routing by the learned
threshold, or by batch top-K when ``eval_topk``) over the fixed batches and returns the
mean squared error of the model's prediction (eps for ddpm, velocity for flow; the first
C channels under learn_sigma) overall (the mean over buckets) and per bucket, plus, for an
MoE model, the routing diagnostics of that pass (docs/method.md §6): MaxVio of the per-expert
load summed over the pass, combination usage of the co-selection counts summed over the
pass, and experts per token by timestep bucket (the paper's Fig. 6) and by layer.
Shapes: x0, noise (n*nb, C, H, W) float32; y, t (n*nb,).
"""
import dataclasses
import hashlib

import numpy as np

from .checkpoint import load_checkpoint

__all__ = ["ValidationSet", "validation_set", "evaluate", "evaluate_checkpoint",
           "load_eval_model", "usage_from_pairs"]


@dataclasses.dataclass
class ValidationSet:
    """Fixed validation inputs (see the module docstring). ``x0`` (M, C, H, W) float32
    clean images, ``y`` (M,) int64 labels, ``t`` (M,) the objective's timesteps (int64
    steps for ddpm, float64 fractions for flow), ``noise`` like x0, ``bucket`` (M,) int64
    timestep bucket of each sample, ``objective`` the racedit.diffusion objective,
    ``num_buckets``, ``batch_size`` (samples per forward) and ``fingerprint`` (hex)."""

    x0: np.ndarray
    y: np.ndarray
    t: np.ndarray
    noise: np.ndarray
    bucket: np.ndarray
    objective: object
    num_buckets: int
    batch_size: int
    fingerprint: str

    def __len__(self):
        return self.x0.shape[0]

    def batches(self):
        """Yield (x_t, t_model, y, target, bucket) for the fixed batches, in order."""
        obj = self.objective
        for s in range(0, len(self), self.batch_size):
            sl = slice(s, s + self.batch_size)
            x_t, target = obj.make_batch(self.x0[sl], self.t[sl], self.noise[sl])
            yield x_t, obj.model_time(self.t[sl]), self.y[sl], target, self.bucket[sl]


def _fingerprint(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def validation_set(objective, dataset, num_buckets=10, seed=0, batch_size=64, max_images=None):
    """Build the :class:`ValidationSet` of ``dataset`` (an racedit.data.ArrayDataset held
    out from training) for ``objective`` (a racedit.diffusion objective). Every image is
    used once per bucket (``max_images`` caps the images). Samples are ordered image by
    image, each at buckets 0..nb-1, so every forward batch mixes images and timesteps, the
    same way for every model. Raises ValueError for num_buckets < 1, batch_size < 1 or an empty set."""
    if int(num_buckets) < 1:
        raise ValueError(f"num_buckets: expected >= 1, got {num_buckets}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    if n < 1:
        raise ValueError("validation_set: no images")
    nb = int(num_buckets)
    x, y = dataset.batch(np.arange(n))                                  # (n,C,H,W), (n,)
    rng = np.random.default_rng([int(seed), 11])
    bucket = np.tile(np.arange(nb, dtype=np.int64), n)                  # (n*nb,) image-major
    img = np.repeat(np.arange(n), nb)
    u = rng.random(n * nb)                                              # position in bucket
    if objective.name == "ddpm":
        T = objective.num_timesteps
        lo = bucket * T // nb
        hi = (bucket + 1) * T // nb
        t = np.minimum(lo + np.floor(u * (hi - lo)).astype(np.int64), T - 1)
    else:
        t = (bucket + u) / nb
    x0 = np.ascontiguousarray(x[img], dtype=np.float32)                # (n*nb,C,H,W)
    noise = rng.standard_normal(x0.shape, dtype=np.float32)
    yy = np.asarray(y, np.int64)[img]
    fp = _fingerprint(x0, yy, np.asarray(t), noise)
    return ValidationSet(x0, yy, t, noise, bucket, objective, nb, int(batch_size), fp)


def usage_from_pairs(pairs, coverage=0.95):
    """Combination usage (docs/method.md §6) from an (E, E) co-selection count matrix
    (M^T M summed over tokens): the fraction of the C(E,2) expert pairs, taken in
    decreasing order of count, whose cumulative share of the pair mass stays strictly
    below ``coverage``; 0.0 with no co-selected pair or one pair holding ``coverage``."""
    pairs = np.asarray(pairs, np.float64)
    E = pairs.shape[0]
    if E < 2:
        return 0.0
    bins = np.sort(pairs[np.triu_indices(E, k=1)])[::-1]
    total = bins.sum()
    if total <= 0:
        return 0.0
    cum = np.cumsum(bins / total)
    return int(np.count_nonzero(cum < coverage * (1 - 1e-12))) / bins.size


def evaluate(model, val, weights=None):
    """Held-out loss and routing diagnostics of ``model`` (a RaceDiT) on ``val`` (a
    :class:`ValidationSet`). ``weights``: a flat float32 buffer (e.g. the EMA) evaluated
    in place of the live weights, which are restored afterwards, as is the model's mode.

    Returns a dict: ``loss`` (mean over buckets of the per-bucket mean squared error),
    ``loss_by_t`` (list of num_buckets floats, bucket 0 = least noise), ``fingerprint``
    (val's), and for an MoE model ``max_violation`` and ``combination_usage`` (means over
    layers of the pass-level values), ``max_violation_per_layer``,
    ``combination_usage_per_layer``, ``experts_per_token`` (mean), ``ept_by_t`` (list per
    bucket), ``ept_per_layer``, ``load_share`` (layers x E) and ``dead_experts`` (per layer).
    """
    nb = val.num_buckets
    sq_sum = np.zeros(nb)
    cnt = np.zeros(nb)
    ept_sum = np.zeros(nb)
    loads = pairs = None
    saved = model.param_buffer.copy()
    was_training = model.training
    try:
        if weights is not None:
            model.set_param_buffer(np.ascontiguousarray(weights, np.float32))
        model.eval()
        for x_t, tm, y, target, b in val.batches():
            out = model.forward(x_t, tm, y)                              # (B,C_out,H,W)
            C = target.shape[1]
            d = out[:, :C].astype(np.float64) - target
            per = np.mean(d * d, axis=(1, 2, 3))                         # (B,)
            sq_sum += np.bincount(b, weights=per, minlength=nb)
            cnt += np.bincount(b, minlength=nb)
            if model.config.is_moe:
                masks = model.routing_masks()                            # layers x (B,L,E)
                ept_sum += np.bincount(b, weights=model.experts_per_token_by_sample(),
                                       minlength=nb)
                M = np.stack([m.reshape(-1, m.shape[-1]) for m in masks]).astype(np.float32)
                ld = M.sum(axis=1, dtype=np.float64)                     # (layers, E)
                co = np.einsum("lne,lnf->lef", M, M).astype(np.float64)  # (layers, E, E)
                loads = ld if loads is None else loads + ld
                pairs = co if pairs is None else pairs + co
    finally:
        model.set_param_buffer(saved)
        model.train(was_training)
    by_t = sq_sum / np.maximum(cnt, 1)
    res = {"loss": float(by_t[cnt > 0].mean()), "loss_by_t": by_t.tolist(),
           "fingerprint": val.fingerprint}
    if loads is not None:
        mean = loads.mean(axis=1)
        mv = (loads.max(axis=1) - mean) / np.maximum(mean, 1e-12)       # (layers,)
        cu = np.array([usage_from_pairs(p) for p in pairs])             # (layers,) per layer
        L = int(np.prod(val.x0.shape[2:]) // model.config.patch ** 2)
        res.update({
            "max_violation": float(mv.mean()), "max_violation_per_layer": mv.tolist(),
            "combination_usage": float(cu.mean()), "combination_usage_per_layer": cu.tolist(),
            "experts_per_token": float(loads.sum(axis=1).mean() / (len(val) * L)),
            "ept_by_t": (ept_sum / np.maximum(cnt, 1)).tolist(),
            "ept_per_layer": (loads.sum(axis=1) / (len(val) * L)).tolist(),
            "load_share": (loads / np.maximum(loads.sum(axis=1, keepdims=True), 1e-12)).tolist(),
            "dead_experts": (loads == 0).sum(axis=1).tolist()})
    return res


def load_eval_model(path, eval_topk=False):
    """(model, ema, ema_thresholds, meta) from a training checkpoint: a RaceDiT built as
    the run's config says (``eval_topk`` as given: True keeps batch top-K routing in eval
    mode), holding the live weights and routing thresholds; ``ema`` is the EMA buffer
    (float32, the model's buffer layout) and ``ema_thresholds`` the thresholds recalibrated
    on it when the checkpoint was written (None in checkpoints from before they were kept).
    Raises FileNotFoundError / racedit.checkpoint.CheckpointError."""
    from .configs import TrainConfig
    from .model import RaceDiT

    tensors, meta = load_checkpoint(path)
    cfg, d = meta["config"], meta["data"]
    tc = TrainConfig.from_dict(cfg)
    m = RaceDiT(tc.to_model_config(), input_size=d["image_size"], in_channels=d["channels"],
                num_classes=d["num_classes"], seed=cfg["seed"], learn_sigma=cfg["learn_sigma"],
                routing=cfg["routing"], gating=cfg["gating"], plr_weight=tc.model_plr_weight(),
                sim_weight=cfg["sim_weight"], balance_weight=cfg["balance_weight"],
                beta=cfg["beta"], eval_topk=eval_topk, class_dropout_prob=0.0)
    ema = np.empty_like(m.param_buffer)
    for name, off, shape in m.layout:
        size = int(np.prod(shape))
        for prefix, buf in (("model.", m.param_buffer), ("ema.", ema)):
            a = tensors.get(prefix + name)
            if a is None or a.size != size:
                raise ValueError(f"{path}: tensor {prefix + name} missing or of the wrong size")
            buf[off:off + size] = a.reshape(-1)
    th = tensors.get("thresholds")
    if th is not None and th.size:
        m.thresholds = th
    ema_th = tensors.get("ema_thresholds")
    return m, ema, (ema_th if ema_th is not None and ema_th.size else None), meta


def evaluate_checkpoint(path, val, eval_topk=False, raw=True):
    """Evaluate a training checkpoint on ``val``: {"ema": evaluate(...) with the EMA
    weights, "raw": ... with the live weights (only when ``raw``)}. Deterministic: the
    same checkpoint and validation set give the same numbers."""
    from .calibrate import routing_with

    m, ema, ema_th, _ = load_eval_model(path, eval_topk=eval_topk)
    with routing_with(m, thresholds=ema_th):       # the EMA weights route by their own
        res = {"ema": evaluate(m, val, weights=ema)}
    if raw:
        res["raw"] = evaluate(m, val)
    return res
