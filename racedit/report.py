"""racedit.report — the routing report of a trained Race-DiT (docs/method.md §6): how many
experts a token gets at each diffusion timestep (the paper's Fig. 6: expert race gives more
compute to the harder steps) and how the load spreads over experts, per layer.

It is measured twice: at inference (EMA weights with the thresholds recalibrated on them,
eval-mode routing, a fixed batch of training images noised to the centre of each timestep
bucket) and from the training log (batch top-K routing, the last fifth of the steps). The
summary ``experts_per_token`` holds both means side by side: inference over the sampler's
own timestep grid (racedit.calibrate, with the recalibrated and with the live thresholds)
and training. Written per checkpoint step as
``routing_report-<step:07d>.json`` and ``.png`` (matplotlib) in the run folder, so a later
report never replaces an earlier one of another step.
"""
import json
import os

import numpy as np

from .calibrate import routing_with

__all__ = ["routing_report", "plot_routing_report", "report_path", "training_ept_by_t"]


def report_path(run_dir, step, ext="json"):
    """``<run_dir>/routing_report-<step:07d>.<ext>`` (``routing_report.<ext>`` for step None)."""
    name = "routing_report" if step is None else f"routing_report-{int(step):07d}"
    return os.path.join(run_dir, f"{name}.{ext}")


def routing_report(model, weights, obj, dataset, records, run_dir, seed=0, batch=64,
                   buckets=10, plot=True, step=None, thresholds=None, ema_routing=None):
    """Measure and write the report of checkpoint step ``step`` (:func:`report_path`);
    returns its dict with the paths under "json"/"png" and "replaced": whether a report of
    that step was there before.

    model: a MoE RaceDiT; weights: the flat buffer to evaluate (EMA) or None for the live
    weights; obj: the training objective; dataset: the training ArrayDataset; records: the
    training log up to ``step`` (list of dicts; those with "ept_by_t" are used); batch:
    images per timestep bucket (>= 1); thresholds: those to route with at inference (the
    ones recalibrated on ``weights``) or None for the model's own; ema_routing: the
    checkpoint's summary of racedit.calibrate.ema_routing (inference experts per token
    over the sampler's grid), or None. The model's weights, thresholds and mode are
    restored afterwards."""
    if isinstance(batch, bool) or int(batch) != batch or batch < 1:
        raise ValueError(f"batch: expected an integer >= 1, got {batch!r}")
    rng = np.random.default_rng([seed, 7])
    idx = rng.permutation(len(dataset))[:batch]
    x0, y = dataset.batch(idx)
    centers = (np.arange(buckets) + 0.5) / buckets
    ept, per_layer_ept, loads, norms = [], [], None, []
    with routing_with(model, weights, thresholds):
        for frac in centers:
            t = obj.times_at_fraction(frac, x0.shape[0])
            noise = rng.standard_normal(x0.shape, dtype=np.float32)
            x_t, _ = obj.make_batch(x0, t, noise)
            model.forward(x_t, obj.model_time(t), y)
            ept.append(float(np.mean(model.experts_per_token_by_sample())))
            bn = model.branch_norms()
            norms.append(np.stack([bn["attn"], bn["ffn"]]))                         # (2, depth)
            stats = model.layer_stats()
            per_layer_ept.append([float(s.get("experts_per_token", np.nan)) for s in stats])
            ld = np.array([np.asarray(s["load"], np.float64) for s in stats]) if stats and \
                "load" in stats[0] else None
            if ld is not None:
                loads = ld if loads is None else loads + ld
    rep = {"model": model.config.name, "objective": obj.name,
           "t_bucket_centers": centers.tolist(),
           "eval": {"experts_per_token": ept, "experts_per_token_per_layer": per_layer_ept,
                    "k": model.config.k, "num_experts": model.config.num_experts}}
    nm = np.mean(norms, axis=0)           # over the timestep buckets
    rep["eval"]["branch_norms"] = {"attn": nm[0].tolist(), "ffn": nm[1].tolist()}
    if loads is not None:
        share = loads / np.maximum(loads.sum(axis=1, keepdims=True), 1e-12)      # (layers, E)
        mean = loads.mean(axis=1, keepdims=True)
        rep["eval"]["load_share"] = share.tolist()
        rep["eval"]["max_violation"] = ((loads.max(1) - mean[:, 0]) / np.maximum(mean[:, 0], 1e-12)).tolist()
        rep["eval"]["dead_experts"] = (loads == 0).sum(1).tolist()
    by_t, tail = training_ept_by_t(records, buckets)
    if tail:
        rep["train"] = {"experts_per_token": by_t, "steps": [tail[0]["step"], tail[-1]["step"]]}
        if "ffn_norm" in tail[0]:
            rep["train"]["branch_norms"] = {
                key: np.mean([r[key + "_norm"] for r in tail], axis=0).tolist()
                for key in ("attn", "ffn")}
    rep["experts_per_token"] = _summary(model, records, ema_routing, thresholds is not None)
    if step is not None:
        rep["step"] = int(step)
    rep["json"] = report_path(run_dir, step)
    rep["png"] = report_path(run_dir, step, "png") if plot else None
    replaced = os.path.exists(rep["json"])
    with open(rep["json"], "w") as f:
        json.dump(rep, f, indent=1)
    if plot:
        plot_routing_report(rep, rep["png"])
    rep["replaced"] = replaced
    return rep


def training_ept_by_t(records, buckets=10):
    """Training's experts per token by timestep bucket (``buckets`` of them, 0 = least
    noise) over the last fifth of the log ``records``, from those that carry ``ept_by_t``:
    (a list with None for buckets no step reached, the records used); ([], []) when none
    carries it."""
    tail = [r for r in records[-max(1, len(records) // 5):] if "ept_by_t" in r]
    if not tail:
        return [], []
    sums, cnt = np.zeros(buckets), np.zeros(buckets)
    for r in tail:
        for k, v in r["ept_by_t"].items():
            sums[int(k)] += v
            cnt[int(k)] += 1
    return [float(s / c) if c else None for s, c in zip(sums, cnt)], tail


def _summary(model, records, ema_routing, recalibrated):
    """Experts per token at inference and in training, side by side: k; the inference
    mean over the sampler's grid with the thresholds recalibrated on the EMA weights and
    with the live ones (from ``ema_routing``); the training mean over the logged steps
    (batch top-K: k by construction, a check)."""
    out = {"k": model.config.k, "thresholds": "recalibrated on the EMA weights"
           if recalibrated else "live (learned on the live weights)"}
    if ema_routing:
        out["inference_sampler_grid"] = ema_routing.get("infer_experts_per_token")
        out["inference_sampler_grid_live_thresholds"] = ema_routing.get(
            "infer_experts_per_token_live_thresholds")
        out["sampler"] = ema_routing.get("sampler")
        out["num_steps"] = ema_routing.get("num_steps")
    train = [np.mean(r["experts_per_token"]) for r in records if r.get("experts_per_token")]
    out["training"] = float(np.mean(train)) if train else None
    return out


def plot_routing_report(rep, path=None):
    """Draw the report: experts per token by timestep (inference and training), the
    per-layer, per-expert load share, and per block the norm of what the attention and
    MoE branches add to the residual stream (the paper's Fig. 5). With ``path`` the figure
    is drawn off-screen (no pyplot state is touched) and saved there; without, it is a
    pyplot figure (shown inline in a notebook). Returns the figure."""
    ev = rep["eval"]
    has_load = "load_share" in ev
    has_norms = "branch_norms" in ev
    ncol = 1 + has_load + has_norms
    size = (5.5 * ncol, 4)
    if path is not None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=size)
    else:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=size)
    ax = fig.add_subplot(1, ncol, 1)
    c = np.asarray(rep["t_bucket_centers"])
    sm = rep.get("experts_per_token", {})
    grid = sm.get("inference_sampler_grid")
    extra = f"; {sm.get('sampler')} grid mean {grid:.3f}" if grid is not None else ""
    ax.plot(c, ev["experts_per_token"], "o-", label=f"inference (EMA{extra})")
    if "train" in rep:
        tr = np.array([np.nan if v is None else v for v in rep["train"]["experts_per_token"]])
        mean = sm.get("training")
        ax.plot(c, tr, "s--", label="training (batch top-K" +
                (f"; mean {mean:.3f})" if mean is not None else ")"))
    ax.axhline(ev["k"], color="gray", lw=0.8, ls=":", label=f"k = {ev['k']}")
    ax.set_xlabel("timestep t / T  (0 = clean, 1 = noise)")
    ax.set_ylabel("experts per token")
    ax.set_title(f"{rep['model']}: allocation by timestep")
    ax.legend(fontsize=8)
    if has_load:
        ax2 = fig.add_subplot(1, ncol, 2)
        share = np.asarray(ev["load_share"])
        im = ax2.imshow(share * share.shape[1], aspect="auto", cmap="viridis")
        ax2.set_xticks(range(0, share.shape[1], max(1, share.shape[1] // 16)))
        ax2.set_yticks(range(share.shape[0]))
        ax2.set_xlabel("expert")
        ax2.set_ylabel("layer")
        ax2.set_title("load / mean load (inference)")
        fig.colorbar(im, ax=ax2)
    if has_norms:
        ax3 = fig.add_subplot(1, ncol, ncol)
        layers = np.arange(len(ev["branch_norms"]["ffn"]))
        for key, style in (("ffn", "o-"), ("attn", "s-")):
            ax3.plot(layers, ev["branch_norms"][key], style,
                     label=f"{'MoE' if key == 'ffn' else 'attention'} (inference, EMA)")
        tb = rep.get("train", {}).get("branch_norms")
        if tb:
            ax3.plot(layers, tb["ffn"], "o--", alpha=0.6, label="MoE (training, live weights)")
        ax3.set_xticks(layers)
        ax3.set_xlabel("block")
        ax3.set_ylabel("mean ||gate * branch output||")
        ax3.set_title("what each block adds to the residual stream")
        ax3.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
