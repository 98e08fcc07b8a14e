"""racedit.ablate — the paper's ablation studies (docs/method.md §8) from one command.

    python -m racedit ablate --study routing --budget small --seeds 0,1,2
    racedit.ablate("routing", budget="toy")            # in a notebook

Studies (each a list of runs that differ only in the studied setting):

* ``routing`` (Table 6): token, expert, BL, BE, LE choice and expert race; identity gating.
* ``gating`` (Table 1): {token, expert, race} x {softmax, sigmoid, identity} in the paper's
  bare setting of that table (its numbers are Table 3's first rows): no PLR, no router
  similarity, batch top-K at evaluation (no learned threshold). Its race / softmax and
  race / identity runs are the components study's first two.
* ``components`` (Table 3): race + softmax (no PLR, no router similarity, batch top-K at
  evaluation) -> + identity gating -> + threshold (eval-mode routing by the learned
  threshold instead of batch top-K) -> + PLR -> + router similarity.
* ``balance`` (Table 2, a k-in-E with more experts: 4-in-32, the paper's, from the medium
  budget up): no constraint vs the balance loss (weight 0.01) vs router similarity (0.01):
  metric, MaxVio, combination usage. MaxVio lies in [0, E/k - 1], so it is compared only
  between runs of one k-in-E.
* ``scaling`` (Tables 4-5 and the "7.2x"): dense DiT vs MoE at equal activated parameters
  at two widths, and several k-in-E at the larger width (He = 4D/k keeps the activated
  FLOPs); the iteration speed-up of each MoE = steps the dense model of its width needed
  for its final (smoothed) training loss / steps the MoE needed to reach it.
* ``plr`` (the PLR weight, and the paper's Fig. 5): lambda_PLR in :data:`PLR_WEIGHTS` x the
  layers' PLR losses averaged ("mean", lambda / depth per layer) or summed ("sum", lambda
  per layer), and PLR off, at the depths and steps of :data:`PLR_DEPTHS` (6 and 12
  blocks); each run is compared with PLR off at its depth, and the tables add the
  per-block norms of what the attention and MoE branches add to the residual stream (the
  training log's attn_norm / ffn_norm, mean over the last tenth of the steps).

Unless a study varies them, every run uses race routing, identity gating, PLR weight 1.0
(mean over layers), router-similarity weight 0.01, no balance loss, threshold routing at
evaluation. Each table states its study's exact configuration above it. Within a
study every run of one seed index has the same training data and data order, the same
initial weights (the seed), the same noise/timestep/label-dropout stream, the same steps
and batch and the same activated FLOPs (He = 4D/k); the training data are the built-in
shapes (data seed 0) for every seed.

Metric (racedit.evaluate): the held-out diffusion loss (MSE of the eps / velocity
prediction) on a validation set of built-in images never trained on (data seed 1000003),
each image at every one of 10 timestep buckets with fixed noise and timesteps — the same
inputs for every run (paired; the set's SHA-256 fingerprint is recorded) — in eval mode,
with the EMA weights (the headline) and the live ("raw") weights; overall (mean over
buckets) and per bucket. Also: final training loss (mean diffusion loss of the last tenth
of the steps); MaxVio and combination usage both in training (batch top-K routing, mean
over layers and the last tenth of the steps) and from the EMA evaluation pass (the load
and co-selection counts of the whole pass, mean over layers); experts per token by
timestep bucket (Fig. 6) from the evaluation pass. Tables give mean ± std over seeds
(sample std) and, per run, the paired difference to the study's reference run (mean ± std
over seeds of run - reference); a difference within about one std of zero is seed noise.

Sample metric (``metric="samples"`` or ``"both"``, ``--metric``): each run's EMA weights
also draw :data:`SAMPLE_EVAL` [budget] ``num`` samples, labels ``i % 10``, sample i's noise
keyed by (:data:`SAMPLE_SEED`, i) — the same labels and noise for every run — with
classifier-free guidance, eval-mode routing (the learned thresholds; batch top-K for runs
that evaluate so), the flow objective's sampler, every model call a batch of one timestep;
racedit.shapes_metric judges them: class accuracy (how often a sample is recognised as its
label) and shapes-FD (a Fréchet distance to held-out real shapes in that recogniser's
feature space; docs/evaluation.md places its values). The tables gain these columns and
the paired difference of shapes-FD to the reference run. Runs finished without them get
them from their checkpoint when a study is run again with samples.

Budgets (model: depth / width D / heads / patch, tokens per image L; images are the
built-in shapes; every value is in ``BUDGETS``):

- ``toy`` (tests, CI; seconds): 1 / 16 / 2 / p4 on 16x16 (L = 16), 2in4 (balance 4in8),
  6 steps of batch 8, 64 training images, 4 held-out images.
- ``small`` (2 CPU cores): 2 / 64 / 4 / p4 on 32x32 (L = 64), 2in8 (balance 4in16),
  800 steps of batch 32, 4096 training images, 64 held-out images. One run takes 25-35 s
  single-threaded on a free core. Measured on a shared, loaded 2-core machine, one thread
  per study, the routing and balance studies side by side with seeds 0,1,2: routing (18
  runs, 24-107 s each) 18.6 min, balance (9 runs of 4in16, 48-107 s each) 11 min. The plr
  study trains its 12-block runs for 400 steps (6 blocks: 800): 29 min for one seed (14
  runs, 86-127 s each), one thread.
- ``medium`` (a GPU): 6 / 256 / 4 / p2 on 32x32 (L = 256), 2in8 (balance 4in32),
  20000 steps of batch 64, 50000 training images, 512 held-out images.
- ``large`` (a GPU): 12 / 384 / 6 / p2 (DiT-S width) on 32x32 (L = 256), 2in8 (balance
  4in32), 100000 steps of batch 128, 100000 training images, 1024 held-out images.

All budgets train the ``flow`` objective by default (``objective="ddpm"``, ``--objective
ddpm``, trains DiT's eps objective instead; ddpm runs are sampled with DDIM at twice the
steps, about the NFE of Heun's) with AdamW (lr 1e-3 toy/small, 3e-4 medium, 1e-4
large), linear warm-up, gradient clipping at 1.0 and a weight EMA (0.9 toy, 0.99 small,
0.999 medium, 0.9999 large). Scaling adds a second width, half the budget's. On a shared,
loaded machine pass ``threads=1`` (``--threads 1``) or set ``OMP_NUM_THREADS=1``: at these
sizes OpenMP threads waiting on busy cores cost far more than they give. With
``device="cuda"`` every run trains on the GPU in fp32 (racedit.train's device path); the
held-out evaluation loads each checkpoint on the CPU, so the metric is computed the same
way whatever the device.

Output, in ``out`` (default ``results/ablate-<study>-<budget>``, with ``-ddpm`` appended for
that objective): ``study.json`` (the
settings; a folder made with other settings is refused), ``runs/<run>/seed<s>/`` with the
training run folder (config, log.jsonl, checkpoint) and ``result.json`` — the run's
metrics, written atomically last, so a restarted study skips runs that have one and
retrains the others from scratch — then ``table.md`` (the paper's layout), ``summary.json``,
``loss_curves.png`` and ``allocation.png``.

``racedit.ablate`` is this function once ``racedit`` is imported (as ``racedit.sample``);
the module itself is ``sys.modules["racedit.ablate"]`` (``from racedit.ablate import
BUDGETS`` works as usual).
"""
import dataclasses
import io
import json
import math
import os
import shutil
import sys

import numpy as np

from .threads import thread_limit

__all__ = ["ablate", "STUDIES", "BUDGETS", "StudyRun", "study_runs", "AblationResult",
           "budgets_help", "PLR_DEPTHS", "PLR_WEIGHTS", "METRICS", "SAMPLE_EVAL",
           "SAMPLE_SEED"]

STUDIES = ("routing", "gating", "components", "balance", "scaling", "plr")
TRAIN_DATA_SEED = 0
VAL_DATA_SEED = 1000003
VAL_NOISE_SEED = 0
NUM_BUCKETS = 10

BUDGETS = {
    "toy": dict(depth=1, hidden=16, heads=2, patch=4, image_size=16, moe=(2, 4),
                moe_balance=(4, 8), scaling_k=((2, 4), (4, 8)), steps=6, batch=8,
                num_samples=64, val_images=4, eval_batch=40, lr=1e-3, warmup=0,
                ema=0.9, clip=1.0),
    "small": dict(depth=2, hidden=64, heads=4, patch=4, image_size=32, moe=(2, 8),
                  moe_balance=(4, 16), scaling_k=((1, 4), (2, 8), (4, 16)), steps=800,
                  batch=32, num_samples=4096, val_images=64, eval_batch=64, lr=1e-3,
                  warmup=50, ema=0.99, clip=1.0),
    "medium": dict(depth=6, hidden=256, heads=4, patch=2, image_size=32, moe=(2, 8),
                   moe_balance=(4, 32), scaling_k=((2, 8), (4, 16), (4, 32)), steps=20000,
                   batch=64, num_samples=50000, val_images=512, eval_batch=128, lr=3e-4,
                   warmup=500, ema=0.999, clip=1.0),
    "large": dict(depth=12, hidden=384, heads=6, patch=2, image_size=32, moe=(2, 8),
                  moe_balance=(4, 32), scaling_k=((2, 8), (4, 16), (4, 32)), steps=100000,
                  batch=128, num_samples=100000, val_images=1024, eval_batch=128, lr=1e-4,
                  warmup=1000, ema=0.9999, clip=1.0),
}

# The plr study: (depth, steps) per budget (the width, heads and patch are the budget's),
# and the PLR weights tried in each mode besides 0 (off).
PLR_DEPTHS = {"toy": ((2, 6), (3, 6)), "small": ((6, 800), (12, 400)),
              "medium": ((6, 20000), (12, 20000)), "large": ((6, 100000), (12, 100000))}
PLR_WEIGHTS = (0.01, 0.1, 1.0)

METRICS = ("loss", "samples", "both")
SAMPLE_SEED = 0
# How runs are judged by sampling (metric "samples" / "both"): samples per run, sampler and
# its steps, guidance scale, images per model call.
SAMPLE_EVAL = {
    "toy": dict(num=20, sampler="euler", steps=4, cfg_scale=1.5, batch=20),
    "small": dict(num=500, sampler="heun", steps=10, cfg_scale=1.5, batch=100),
    "medium": dict(num=2000, sampler="heun", steps=25, cfg_scale=1.5, batch=200),
    "large": dict(num=5000, sampler="heun", steps=25, cfg_scale=1.5, batch=200),
}

# every run's settings unless its study varies them
_BASE = dict(routing="race", gating="identity", plr_weight=0.01, sim_weight=0.01,
             balance_weight=0.0)
# the paper's bare setting (Table 1, the first rows of Table 3)
_BARE = dict(plr_weight=0.0, sim_weight=0.0)


@dataclasses.dataclass
class StudyRun:
    """One run of a study: ``name`` (folder name), ``label`` (table row), ``settings``
    (TrainConfig fields: routing, gating, aux weights), ``moe`` ((k, E), or None for a
    dense DiT), ``hidden`` (width), ``eval_topk`` (batch top-K routing at evaluation),
    ``group`` (a tuple used by grid tables and the speed-up: e.g. (routing, gating)),
    ``depth`` and ``steps`` (None: the budget's), ``reference`` (the run this one is
    compared with; None: the study's reference)."""

    name: str
    label: str
    settings: dict
    moe: tuple
    hidden: int
    eval_topk: bool = False
    group: tuple = ()
    depth: int = None
    steps: int = None
    reference: str = None


def _run(name, label, moe, hidden, eval_topk=False, group=(), **settings):
    s = dict(_BASE)
    s.update(settings)
    return StudyRun(name, label, s, moe, hidden, eval_topk, group)


def study_runs(study, budget="small"):
    """The runs of ``study`` at ``budget`` (lists of :class:`StudyRun`, the reference run
    last). ValueError for an unknown study or budget."""
    b = _budget(budget)
    if study not in STUDIES:
        raise ValueError(f"study: expected one of {STUDIES}, got {study!r}")
    D, moe = b["hidden"], tuple(b["moe"])
    if study == "routing":
        names = [("token", "Token choice"), ("expert", "Expert choice"), ("bl", "BL choice"),
                 ("be", "BE choice"), ("le", "LE choice"), ("race", "Expert race")]
        return [_run(r, lab, moe, D, group=(r,), routing=r) for r, lab in names]
    if study == "gating":
        return [_run(f"{r}-{g}", f"{r} / {g}", moe, D, True, group=(r, g), routing=r, gating=g,
                     **_BARE)
                for g in ("softmax", "sigmoid", "identity") for r in ("token", "expert", "race")]
    if study == "components":
        return [
            _run("race-softmax", "Expert race + softmax", moe, D, True, gating="softmax",
                 **_BARE),
            _run("identity", "+ identity gating", moe, D, True, **_BARE),
            _run("threshold", "+ learnable threshold", moe, D, **_BARE),
            _run("plr", "+ per-layer regularization", moe, D, sim_weight=0.0),
            _run("router-sim", "+ router similarity", moe, D)]
    if study == "balance":
        kb = tuple(b["moe_balance"])
        return [_run("none", "No constraint", kb, D, sim_weight=0.0),
                _run("balance-loss", "Balance loss", kb, D, sim_weight=0.0, balance_weight=0.01),
                _run("router-sim", "Router similarity", kb, D)]
    if study == "plr":
        return _plr_runs(budget, moe, D)
    runs = []  # scaling: dense vs MoE at two widths, several k-in-E at the larger one
    half = D // 2
    kmax = tuple(b["scaling_k"][-1])
    runs.append(_run(f"dense-d{half}", f"DiT (D={half})", None, half, group=(half,)))
    runs.append(_run(f"{kmax[0]}in{kmax[1]}-d{half}", f"MoE {kmax[0]}-in-{kmax[1]} (D={half})",
                     kmax, half, group=(half,)))
    runs.append(_run(f"dense-d{D}", f"DiT (D={D})", None, D, group=(D,)))
    for k, E in b["scaling_k"]:
        runs.append(_run(f"{k}in{E}-d{D}", f"MoE {k}-in-{E} (D={D})", (k, E), D, group=(D,)))
    return runs


def _plr_runs(budget, moe, D):
    """The plr study: per depth, PLR off (the depth's reference), then each weight of
    PLR_WEIGHTS averaged and summed over the layers."""
    runs = []
    for depth, steps in PLR_DEPTHS[budget]:
        off = f"d{depth}-off"
        runs.append(dataclasses.replace(
            _run(off, f"{depth} blocks, PLR off", moe, D, group=(depth, "off", 0.0),
                 plr_weight=0.0), depth=depth, steps=steps, reference=off))
        for mode in ("mean", "sum"):
            for w in PLR_WEIGHTS:
                r = _run(f"d{depth}-{mode}-{w:g}", f"{depth} blocks, λ {w:g} {mode}", moe, D,
                         group=(depth, mode, w), plr_weight=w, plr_over_layers=mode)
                runs.append(dataclasses.replace(r, depth=depth, steps=steps, reference=off))
    return runs


def _steps(run, b):
    return run.steps or b["steps"]


def budgets_help():
    """One line per budget: model, steps, batch (for ``--help``)."""
    lines = ["budgets (depth/width/heads/patch on image side; MoE k-in-E):"]
    for name, b in BUDGETS.items():
        L = (b["image_size"] // b["patch"]) ** 2
        lines.append(f"  {name}: {b['depth']}/{b['hidden']}/{b['heads']}/p{b['patch']} on "
                     f"{b['image_size']}x{b['image_size']} (L={L}), {b['moe'][0]}in{b['moe'][1]}"
                     f" (balance {b['moe_balance'][0]}in{b['moe_balance'][1]}), "
                     f"{b['steps']} steps of batch {b['batch']}, lr {b['lr']:g}, "
                     f"{b['num_samples']} training images, {b['val_images']} held-out x "
                     f"{NUM_BUCKETS} timesteps")
    return "\n".join(lines)


def _budget(budget):
    if budget not in BUDGETS:
        raise ValueError(f"budget: expected one of {tuple(BUDGETS)}, got {budget!r}")
    return BUDGETS[budget]


def _reference(study, runs):
    """The run every other is compared with: the last (the paper's best); None for
    scaling, where each MoE is compared with the dense model of its width."""
    return None if study == "scaling" else runs[-1].name


def _model_args(run, b, budget):
    p, depth = b["patch"], run.depth or b["depth"]
    size = f"{depth}x{run.hidden}" if run.depth else f"d{run.hidden}"
    if run.moe is None:
        name = f"DiT-{budget}-{size}/{p}"
        mc = dict(depth=depth, hidden=run.hidden, heads=b["heads"], patch=p)
    else:
        k, E = run.moe
        if (4 * run.hidden) % k:
            raise ValueError(f"{run.name}: 4*D = {4 * run.hidden} is not divisible by k = {k}")
        name = f"RaceDiT-{budget}-{size}/{p}-{k}in{E}"
        mc = dict(depth=depth, hidden=run.hidden, heads=b["heads"], patch=p,
                  num_experts=E, k=k, expert_hidden=4 * run.hidden // k)
    return name, mc


@dataclasses.dataclass
class AblationResult:
    """What :func:`ablate` returns: the study folder, the markdown table (also in
    ``table.md``), the summary dict (also ``summary.json``) and the plot paths."""

    out: str
    table: str
    summary: dict
    plots: dict

    def _repr_markdown_(self):
        return self.table


def _atomic_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _smooth(x, w):
    """Trailing moving average of x (n,) over w steps (shorter at the start)."""
    x = np.asarray(x, np.float64)
    c = np.cumsum(np.insert(x, 0, 0.0))
    i = np.arange(1, x.size + 1)
    lo = np.maximum(i - w, 0)
    return (c[i] - c[lo]) / (i - lo)


def _train_one(run, seed, b, budget, ds, rdir, device, objective):
    from .train import train

    name, mc = _model_args(run, b, budget)
    s, steps = run.settings, _steps(run, b)
    res = train(name, model_config=mc, dataset=ds, image_size=b["image_size"],
                num_samples=b["num_samples"], objective=objective, routing=s["routing"],
                gating=s["gating"], plr_weight=s["plr_weight"],
                plr_over_layers=s.get("plr_over_layers", "mean"), sim_weight=s["sim_weight"],
                balance_weight=s["balance_weight"], global_batch_size=b["batch"],
                steps=steps, lr=b["lr"], warmup_steps=b["warmup"], grad_clip=b["clip"],
                ema_decay=b["ema"], seed=seed, results_dir=rdir, ckpt_every=0,
                log_every=max(1, steps // 10), log_layers_every_step=True,
                progress=False, out=io.StringIO(),
                final_samples=False, report=False, device=device)
    return res


def _run_metrics(run, seed, res, val, steps):
    from .evaluate import evaluate_checkpoint

    ev = evaluate_checkpoint(res.checkpoint, val, eval_topk=run.eval_topk, raw=True)
    diff = np.array([r["diffusion"] for r in res.log], np.float64)
    tail = max(1, steps // 10)
    m = res.model
    return {
        "run": run.name, "seed": seed, "label": run.label, "settings": run.settings,
        "moe": list(run.moe) if run.moe else None, "hidden": run.hidden,
        "eval_topk": run.eval_topk, "run_dir": os.path.abspath(res.run_dir),
        "checkpoint": os.path.abspath(res.checkpoint), "steps": steps,
        "params": m.num_params(), "activated_params": m.num_activated_params(),
        "final_train_loss": float(diff[-tail:].mean()),
        "train_routing": _tail_routing(res.log, steps),
        "branch_norms": _tail_norms(res.log, steps),
        "train_curve": diff.tolist(), "eval": ev,
        "fingerprint": ev["ema"]["fingerprint"], "wall_time": res.wall_time}


def _sample_metrics(run, ckpt, budget):
    """The shapes metric of samples drawn from the checkpoint's EMA weights with the
    budget's :data:`SAMPLE_EVAL` settings (see the module docstring), with those settings."""
    from .diffusion import make_objective
    from .evaluate import load_eval_model
    from .sample import generate
    from .shapes_metric import shapes_judge

    from .calibrate import routing_with

    m, ema, ema_th, meta = load_eval_model(ckpt, eval_topk=run.eval_topk)
    s = _sample_eval(budget, meta["config"]["objective"])
    labels = np.arange(s["num"]) % m.num_classes
    with routing_with(m, thresholds=ema_th):      # the EMA weights route by their own
        x = generate(m, make_objective(meta["config"]["objective"]), labels, weights=ema,
                     cfg_scale=s["cfg_scale"], sampler=s["sampler"], num_steps=s["steps"],
                     seed=SAMPLE_SEED, clip_denoised=True, progress=False,
                     batch_size=s["batch"])
    return dict(shapes_judge(m.input_size).score(x, labels), settings=dict(s, seed=SAMPLE_SEED))


def _sample_eval(budget, objective):
    """SAMPLE_EVAL[budget] for models of ``objective``: ddpm models take DDIM with twice
    the steps (Heun's NFE is 2 steps - 1)."""
    s = dict(SAMPLE_EVAL[budget])
    if objective == "ddpm":
        s.update(sampler="ddim", steps=2 * s["steps"])
    return s


def _mean_std(v):
    v = np.asarray([x for x in v if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return None, None
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _fmt(ms, nd=4, sign=False):
    m, s = ms
    if m is None:
        return "–"
    f = f"{{:{'+' if sign else ''}.{nd}f}}"
    return f"{f.format(m)} ± {s:.{nd}f}"


def _speedup(dense_curve, moe_curve, w):
    """(steps for the MoE's smoothed training loss (trailing mean over w steps, counted
    from step w on) to reach the dense model's final smoothed loss, speed-up = dense
    steps / those steps), or (None, None) if it never does."""
    d, m = _smooth(dense_curve, w), _smooth(moe_curve, w)
    start = min(w, m.size) - 1  # not before the average holds a full window
    hit = np.flatnonzero(m[start:] <= d[-1])
    if hit.size == 0:
        return None, None
    steps = start + int(hit[0]) + 1
    return steps, len(d) / steps


def _train_routing(rec):
    """(MaxVio, combination usage) in training (batch top-K routing): means over the MoE
    layers and the last tenth of the steps of the run's log; (None, None) when dense."""
    if "train_routing" not in rec:  # records written before the field existed
        from .runs import read_log

        log = read_log(os.path.join(rec["run_dir"], "log.jsonl"))
        rec["train_routing"] = _tail_routing(log, rec["steps"])
    return rec["train_routing"]


def _tail_routing(log, steps):
    tail = [r for r in log[-max(1, steps // 10):] if "max_violation" in r]
    if not tail:
        return [None, None]
    return [float(np.mean([r[k] for r in tail])) for k in ("max_violation", "combination_usage")]


def _tail_norms(log, steps):
    """Per block, the mean over the last tenth of the steps of what the attention and the
    FFN / MoE branch added to the residual stream: {"attn": [...], "ffn": [...]}."""
    tail = [r for r in log[-max(1, steps // 10):] if "ffn_norm" in r]
    if not tail:
        return None
    return {k: np.mean([r[k + "_norm"] for r in tail], 0).tolist() for k in ("attn", "ffn")}


def _mean_norms(rs):
    """The runs' branch norms averaged over seeds (None when a record lacks them)."""
    if not rs or any(r.get("branch_norms") is None for r in rs):
        return None
    return {k: np.mean([r["branch_norms"][k] for r in rs], 0).tolist() for k in ("attn", "ffn")}


def _aggregate(study, runs, results, b):
    """Per-run means and stds over seeds, paired differences to the reference."""
    ref = _reference(study, runs)
    seeds = sorted({r["seed"] for rs in results.values() for r in rs})
    agg = {}
    w = max(5, b["steps"] // 20)
    for run in runs:
        rs = results[run.name]
        a = {"label": run.label, "moe": list(run.moe) if run.moe else None,
             "hidden": run.hidden, "settings": run.settings, "eval_topk": run.eval_topk,
             "seeds": [r["seed"] for r in rs], "params": rs[0]["params"],
             "activated_params": rs[0]["activated_params"]}
        for key, get in (("heldout_ema", lambda r: r["eval"]["ema"]["loss"]),
                         ("heldout_raw", lambda r: r["eval"]["raw"]["loss"]),
                         ("final_train_loss", lambda r: r["final_train_loss"]),
                         ("max_violation", lambda r: r["eval"]["ema"].get("max_violation")),
                         ("train_max_violation", lambda r: _train_routing(r)[0]),
                         ("train_combination_usage", lambda r: _train_routing(r)[1]),
                         ("combination_usage",
                          lambda r: r["eval"]["ema"].get("combination_usage")),
                         ("experts_per_token",
                          lambda r: r["eval"]["ema"].get("experts_per_token"))):
            a[key] = _mean_std([get(r) for r in rs])
        a["sample_fd"] = _mean_std([r["samples"]["fd"] for r in rs if "samples" in r])
        a["sample_accuracy"] = _mean_std([r["samples"]["accuracy"] for r in rs if "samples" in r])
        a["heldout_by_t"] = np.mean([r["eval"]["ema"]["loss_by_t"] for r in rs], 0).tolist()
        a["branch_norms"] = _mean_norms(rs)
        if run.moe:
            a["ept_by_t"] = np.mean([r["eval"]["ema"]["ept_by_t"] for r in rs], 0).tolist()
        if ref is not None:
            byseed = {r["seed"]: r for r in results[run.reference or ref]}
            a["delta_vs_ref"] = _mean_std([r["eval"]["ema"]["loss"] -
                                           byseed[r["seed"]]["eval"]["ema"]["loss"]
                                           for r in rs if r["seed"] in byseed])
            a["delta_fd_vs_ref"] = _paired_fd(rs, byseed)
        agg[run.name] = a
    if study == "scaling":
        for run in runs:
            if run.moe is None:
                continue
            dense = next(r for r in runs if r.moe is None and r.hidden == run.hidden)
            dby = {r["seed"]: r for r in results[dense.name]}
            sp = [_speedup(dby[r["seed"]]["train_curve"], r["train_curve"], w)
                  for r in results[run.name] if r["seed"] in dby]
            a = agg[run.name]
            a["steps_to_dense_loss"] = _mean_std([s for s, _ in sp])
            a["speedup"] = _mean_std([x for _, x in sp])
            a["reached"] = sum(s is not None for s, _ in sp)
            a["delta_vs_dense"] = _mean_std(
                [r["eval"]["ema"]["loss"] - dby[r["seed"]]["eval"]["ema"]["loss"]
                 for r in results[run.name] if r["seed"] in dby])
            a["delta_fd_vs_dense"] = _paired_fd(results[run.name], dby)
    return {"reference": ref, "seeds": seeds, "smoothing_window": w, "runs": agg}


def _paired_fd(rs, byseed):
    """Mean and std over seeds of shapes-FD(run) - shapes-FD(reference), same seed."""
    return _mean_std([r["samples"]["fd"] - byseed[r["seed"]]["samples"]["fd"] for r in rs
                      if "samples" in r and "samples" in byseed.get(r["seed"], {})])


_TITLES = {
    "routing": "Routing strategies (paper Table 6; identity gating)",
    "gating": "Gating functions x routing strategies (paper Table 1)",
    "components": "Components, added one at a time (paper Table 3)",
    "balance": "Load-balancing constraints (paper Table 2)",
    "scaling": "Dense vs MoE at equal activated parameters (paper Tables 4-5, 7.2x)",
    "plr": "Per-layer regularization weight, mean vs sum over layers (paper Fig. 5)",
}

# Above each table, after its configuration: what the study's settings mean for reading it.
_NOTES = {
    "gating": "The paper's bare setting of Table 1 (its numbers are Table 3's first rows): "
              "no learned threshold, no PLR, no router similarity. Race / softmax and race / "
              "identity are the components study's first two runs.",
    "components": "Each row adds one component to the row above.",
    "balance": "MaxVio lies between 0 and E/k - 1 = {maxvio:g} at {k}-in-{E} (7 at the "
               "paper's 4-in-32): compare it only between runs of one k-in-E, not with other "
               "studies or budgets.",
    "scaling": "He = 4D/k keeps every MoE's activated FFN FLOPs equal to the dense model's; "
               "each MoE is compared with the dense model of its width.",
    "plr": "Mean: each layer's PLR loss weighted λ/depth (racedit's default); sum: weighted "
           "λ. Δ is paired with PLR off at the same depth.",
}
_ROUTING_NAMES = {"token": "token choice", "expert": "expert choice", "bl": "BL choice",
                  "be": "BE choice", "le": "LE choice", "race": "expert race"}


def _one_or_all(runs, get, fmt=str):
    """The value every run shares, or "a / b / ... (varies)" over the distinct values."""
    vals = []
    for r in runs:
        v = get(r)
        if v not in vals:
            vals.append(v)
    return fmt(vals[0]) if len(vals) == 1 else " / ".join(fmt(v) for v in vals) + " (varies)"


def _weight(w):
    return "off" if w == 0 else f"λ {w:g}"


def _plr_text(r):
    w, mode = r.settings["plr_weight"], r.settings.get("plr_over_layers", "mean")
    return "off" if w == 0 else f"λ {w:g} ({mode} over layers)"


def _configuration(study, budget, runs, objective="flow"):
    """The study's configuration in words: what its runs share and what they vary."""
    b = BUDGETS[budget]
    L = (b["image_size"] // b["patch"]) ** 2
    moe = [r for r in runs if r.moe]
    experts = _one_or_all(runs, lambda r: r.moe, lambda m: f"{m[0]}-in-{m[1]}" if m else "dense")
    experts += ", expert width He = 4D/k" if moe else ""
    lines = [f"Model: blocks {_one_or_all(runs, lambda r: r.depth or b['depth'])}, width "
             f"{_one_or_all(runs, lambda r: r.hidden)}, heads {b['heads']}, patch {b['patch']} "
             f"on {b['image_size']}x{b['image_size']} built-in shapes (L = {L}); experts "
             f"{experts}.",
             f"Training: {objective} objective, steps {_one_or_all(runs, lambda r: _steps(r, b))}, "
             f"batch {b['batch']}, AdamW lr {b['lr']:g} with {b['warmup']} warm-up steps, "
             f"gradient clip {b['clip']:g}, weight EMA {b['ema']:g}."]
    if moe:
        def get(key):
            return lambda r: r.settings[key]

        lines.append(
            f"Routing {_one_or_all(moe, get('routing'), _ROUTING_NAMES.get)}; gating "
            f"{_one_or_all(moe, get('gating'))}; PLR {_one_or_all(moe, _plr_text)}; router "
            f"similarity {_one_or_all(moe, get('sim_weight'), _weight)}; balance loss "
            f"{_one_or_all(moe, get('balance_weight'), _weight)}; evaluation routing "
            + _one_or_all(moe, lambda r: r.eval_topk,
                          lambda t: "batch top-K (no learned threshold)" if t
                          else "the learned threshold (docs/method.md §3)") + ".")
    lines.append(_note(study, budget, moe))
    return " ".join(x for x in lines if x)


def _note(study, budget, moe):
    """The study's reading note (:data:`_NOTES`) with its numbers filled in."""
    note = _NOTES.get(study, "")
    if study == "balance":
        k, E = moe[0].moe
        note = note.format(maxvio=E / k - 1, k=k, E=E)
        if (k, E) == (4, 32):
            note = note.replace(" (7 at the paper's 4-in-32)", " (as the paper's)")
    if study == "plr":
        note += " Steps per depth: " + ", ".join(f"{d} blocks {n}"
                                                 for d, n in PLR_DEPTHS[budget]) + "."
    return note


def _delta(r, a, ref, key, nd):
    """The paired difference cell: "0 (ref)" for the reference, "–" where there is none."""
    if r.name == (r.reference or ref):
        return "0 (ref)"
    return _fmt(a[key], nd, True) if key in a else "–"


def _loss_columns(ref, refl, delta_key):
    """(header, align, cell(run, a)) of the held-out loss columns."""
    def delta(r, a):
        return _delta(r, a, ref, delta_key, 4)

    return [("held-out loss ↓", "---:", lambda r, a: _fmt(a["heldout_ema"])),
            (f"Δ vs {refl} (paired)", "---:", delta),
            ("held-out (raw)", "---:", lambda r, a: _fmt(a["heldout_raw"])),
            ("final train loss", "---:", lambda r, a: _fmt(a["final_train_loss"]))]


def _sample_columns(ref, refl, delta_key):
    """(header, align, cell(run, a)) of the sample-metric columns."""
    def delta(r, a):
        return _delta(r, a, ref, delta_key, 3)

    return [("shapes-FD ↓", "---:", lambda r, a: _fmt(a["sample_fd"], 3)),
            (f"Δ FD vs {refl} (paired)", "---:", delta),
            ("class acc ↑", "---:", lambda r, a: _fmt(a["sample_accuracy"], 3))]


def _routing_columns():
    def ept(r, a):
        v = a.get("ept_by_t")
        return " ".join(f"{x:.2f}" for x in v[::max(1, len(v) // 5)]) if v else "–"

    def usage(r, a):
        return " / ".join(f"{100 * c[0]:.0f} ± {100 * c[1]:.0f} %" if c[0] is not None
                          else "–" for c in (a["train_combination_usage"],
                                             a["combination_usage"]))

    return [("MaxVio ↓ train / eval", "---:", lambda r, a:
             f"{_fmt(a['train_max_violation'], 2)} / {_fmt(a['max_violation'], 2)}"),
            ("Comb. usage train / eval", "---:", usage),
            ("experts/token, t: low → high", "---", ept)]


def _scaling_columns(n_steps):
    def speedup(r, a):
        return (f"{_fmt(a['speedup'], 2)}× ({a['reached']}/{len(a['seeds'])} reached)"
                if r.moe else "1 (reference)")

    return [("steps to dense loss", "---:", lambda r, a:
             _fmt(a["steps_to_dense_loss"], 0) if r.moe else str(n_steps)),
            ("speed-up ↑", "---:", speedup)]


def _columns(study, metric, ref, refl, n_steps):
    if study == "scaling":
        cols = [("activated params", "---:", lambda r, a: f"{a['activated_params']:,}"),
                ("total params", "---:", lambda r, a: f"{a['params']:,}")]
        dense = None  # every MoE is compared with the dense model of its width
        if metric != "samples":
            cols += _loss_columns(dense, "dense", "delta_vs_dense")
        if metric != "loss":
            cols += _sample_columns(dense, "dense", "delta_fd_vs_dense")
        return cols + _scaling_columns(n_steps)
    cols = _loss_columns(ref, refl, "delta_vs_ref") if metric != "samples" else []
    if metric != "loss":
        cols += _sample_columns(ref, refl, "delta_fd_vs_ref")
    return cols + _routing_columns()


def _caption(budget, seeds, metric, objective="flow"):
    parts = [f"Budget `{budget}`, seeds {seeds}."]
    if metric != "samples":
        what = "flow, velocity MSE" if objective == "flow" else "ddpm, noise MSE"
        parts.append(f"Held-out diffusion loss ({what}; EMA weights, eval-mode "
                     "routing; same validation noise and timesteps for every run).")
    if metric != "loss":
        s = _sample_eval(budget, objective)
        parts.append(f"Samples: {s['num']} per run (labels i % 10, seed {SAMPLE_SEED}, "
                     f"{s['sampler']} {s['steps']} steps, CFG {s['cfg_scale']:g}, EMA weights, "
                     "eval-mode routing) judged by racedit.shapes_metric: shapes-FD to "
                     "held-out real shapes and class accuracy.")
    parts.append("Mean ± std over seeds; Δ is paired (same seed).")
    return " ".join(parts)


def _table(study, budget, runs, agg, n_steps, metric="loss", objective="flow"):
    A, ref = agg["runs"], agg["reference"]
    seeds = ",".join(map(str, agg["seeds"]))
    refl = "PLR off at the same depth" if study == "plr" else A[ref]["label"] if ref else None
    cols = _columns(study, metric, ref, refl, n_steps)
    lines = [f"### {_TITLES[study]}", "", _caption(budget, seeds, metric, objective), "",
             _configuration(study, budget, runs, objective), "",
             "| " + ("Model" if study == "scaling" else "Run") + " | "
             + " | ".join(c[0] for c in cols) + " |",
             "|---|" + "|".join(c[1] for c in cols) + "|"]
    for r in runs:
        a = A[r.name]
        lines.append(f"| {a['label']} | " + " | ".join(c[2](r, a) for c in cols) + " |")
    if study == "gating":
        grids = ([("Held-out loss ↓", "heldout_ema", 4)] if metric != "samples" else []) + \
                ([("shapes-FD ↓", "sample_fd", 3)] if metric != "loss" else [])
        for title, key, nd in grids:
            lines += ["", f"{title} (rows: gating, columns: routing)", "",
                      "| gating | token | expert | race |", "|---|---:|---:|---:|"]
            for g in ("softmax", "sigmoid", "identity"):
                cells = [_fmt(A[f"{r}-{g}"][key], nd) for r in ("token", "expert", "race")]
                lines.append(f"| {g} | " + " | ".join(cells) + " |")
    nb = len(next(iter(A.values()))["heldout_by_t"])
    lines += ["", "Held-out loss by timestep bucket (mean over seeds; t = 0 clean → 1 noise)",
              "", "| Run | " + " | ".join(f"{(i + .5) / nb:.2f}" for i in range(nb)) + " |",
              "|---|" + "---:|" * nb]
    for r in runs:
        lines.append(f"| {A[r.name]['label']} | " +
                     " | ".join(f"{v:.4f}" for v in A[r.name]["heldout_by_t"]) + " |")
    if study == "plr":
        lines += _norm_tables(runs, A)
    return "\n".join(lines) + "\n"


def _norm_tables(runs, A):
    """Per depth and branch, the per-block norms of what the branch adds to the residual
    stream (mean over the last tenth of the training steps and over seeds)."""
    lines = []
    for depth in sorted({r.depth for r in runs}):
        rs = [r for r in runs if r.depth == depth and A[r.name]["branch_norms"]]
        for key, what in (("ffn", "MoE"), ("attn", "Attention")):
            if not rs:
                continue
            lines += ["", f"{what} branch norm per block, {depth} blocks (the paper's Fig. 5; "
                      "block 1 = first)", "",
                      "| Run | " + " | ".join(str(i + 1) for i in range(depth)) + " |",
                      "|---|" + "---:|" * depth]
            for r in rs:
                v = A[r.name]["branch_norms"][key]
                lines.append(f"| {A[r.name]['label']} | " + " | ".join(f"{x:.3g}" for x in v)
                             + " |")
    return lines


def _by_t(ax, runs, A, key, ylabel, title):
    """One line per run of A[run][key] (one value per timestep bucket)."""
    for r in runs:
        v = A[r.name][key]
        ax.plot((np.arange(len(v)) + 0.5) / len(v), v, "o-", ms=3, label=A[r.name]["label"])
    ax.set_xlabel("timestep t (0 = clean, 1 = noise)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)


def _plots(study, runs, results, agg, out, w):
    from matplotlib.figure import Figure

    A = agg["runs"]
    fig = Figure(figsize=(16, 4))
    ax, axd = fig.add_subplot(1, 3, 1), fig.add_subplot(1, 3, 2)
    for r in runs:
        c = np.mean([_smooth(x["train_curve"], w) for x in results[r.name]], 0)
        ax.plot(np.arange(1, c.size + 1), c, label=A[r.name]["label"])
        ref = r.reference or agg["reference"] or next(x.name for x in runs
                                                      if x.moe is None and x.hidden == r.hidden)
        if r.name != ref:  # paired: the same seed's reference run
            by = {x["seed"]: x["train_curve"] for x in results[ref]}
            d = np.mean([_smooth(x["train_curve"], w) - _smooth(by[x["seed"]], w)
                         for x in results[r.name] if x["seed"] in by], 0)
            axd.plot(np.arange(1, d.size + 1), d, label=A[r.name]["label"])
    ax.set_xlabel("step")
    ax.set_ylabel(f"training diffusion loss (moving average {w})")
    ax.set_yscale("log")
    ax.set_title(f"{study}: training loss (mean over seeds)")
    ax.legend(fontsize=7)
    axd.axhline(0.0, color="gray", lw=0.8)
    axd.set_xlabel("step")
    axd.set_ylabel("run - reference (same seed)")
    axd.set_title("training loss difference to " + (A[agg["reference"]]["label"]
                                                    if agg["reference"] else "dense"))
    axd.legend(fontsize=7)
    _by_t(fig.add_subplot(1, 3, 3), runs, A, "heldout_by_t", "held-out loss (EMA)",
          "held-out loss by timestep")
    fig.tight_layout()
    paths = {"loss_curves": os.path.join(out, "loss_curves.png")}
    fig.savefig(paths["loss_curves"], dpi=100)
    moe = [r for r in runs if r.moe]
    if moe:
        fig = Figure(figsize=(11, 4))
        _by_t(fig.add_subplot(1, 2, 1), moe, A, "ept_by_t", "experts per token (eval, EMA)",
              f"{study}: allocation by timestep (Fig. 6)")
        ax2 = fig.add_subplot(1, 2, 2)
        x = np.arange(len(moe))
        for j, (key, lab) in enumerate((("max_violation", "MaxVio"),
                                        ("combination_usage", "combination usage"))):
            m = [A[r.name][key][0] or 0.0 for r in moe]
            s = [A[r.name][key][1] or 0.0 for r in moe]
            ax2.bar(x + (j - 0.5) * 0.4, m, 0.4, yerr=s, label=lab)
        ax2.set_xticks(x)
        ax2.set_xticklabels([A[r.name]["label"] for r in moe], rotation=30, ha="right",
                            fontsize=7)
        ax2.set_title("load balance (eval pass)")
        ax2.legend(fontsize=7)
        fig.tight_layout()
        paths["allocation"] = os.path.join(out, "allocation.png")
        fig.savefig(paths["allocation"], dpi=100)
    if study == "plr":
        paths["branch_norms"] = _plot_norms(runs, A, out)
    return paths


def _plot_norms(runs, A, out):
    """branch_norms.png: per depth, the MoE branch norm per block of every run."""
    from matplotlib.figure import Figure

    depths = sorted({r.depth for r in runs})
    fig = Figure(figsize=(6 * len(depths), 4))
    for i, depth in enumerate(depths):
        ax = fig.add_subplot(1, len(depths), i + 1)
        for r in runs:
            bn = A[r.name]["branch_norms"]
            if r.depth == depth and bn:
                ax.plot(np.arange(1, depth + 1), bn["ffn"], "o-", ms=3, label=A[r.name]["label"])
        ax.set_xlabel("block")
        ax.set_ylabel("MoE branch norm (end of training)")
        ax.set_yscale("log")
        ax.set_title(f"{depth} blocks: what each MoE block adds (Fig. 5)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "branch_norms.png")
    fig.savefig(path, dpi=100)
    return path


def _settings(study, budget, b, seeds, runs, objective):
    return {"study": study, "budget": budget, "budget_settings": b, "objective": objective,
            "train_data_seed": TRAIN_DATA_SEED, "val_data_seed": VAL_DATA_SEED,
            "val_noise_seed": VAL_NOISE_SEED, "num_buckets": NUM_BUCKETS,
            "runs": [_run_settings(r) for r in runs]}


def _run_settings(run):
    """A run as study.json records it; depth, steps and reference only when set, so a
    folder of a study that sets none of them is the same as before they existed."""
    d = dataclasses.asdict(run)
    for k in ("depth", "steps", "reference"):
        if d[k] is None:
            del d[k]
    return d


def _check_device(device):
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        from .factory import check_device

        check_device(device, "fp32")


def ablate(study, budget="small", seeds=(0,), device="cpu", out=None, progress=True,
           stream=None, threads=None, metric="loss", objective="flow"):
    """Run (or finish) an ablation study and return an :class:`AblationResult`.

    study: one of :data:`STUDIES`; budget: a key of :data:`BUDGETS` ("toy", "small",
    "medium", "large"; the module docstring lists each one's model, steps and batch);
    seeds: the seed indices (each seeds the initial weights, the data order and the noise);
    device: "cpu" or "cuda" (ValueError saying why when CUDA is not available); out: the study
    folder (default ``results/ablate-<study>-<budget>``); progress: a tqdm bar over runs;
    stream: where one line per run is printed (default stdout); threads: limit the
    OpenMP and BLAS threads to this many while the study runs (needs threadpoolctl; 1 is
    fastest for the toy and small models on a shared machine), None leaves them alone.
    metric: "loss" (the held-out loss), "samples" (the sample metric; see the module
    docstring) or "both" — which columns the tables show; "samples" and "both" also
    sample every run (the held-out evaluation runs in every case: it gives the routing
    statistics). objective: "flow" (default) or "ddpm", what every run trains.

    A folder with a ``result.json`` for a (run, seed) skips that run; a run folder without
    it (interrupted) is deleted and trained again. ValueError for an unknown study, budget
    or device, empty seeds, or a folder made with other settings."""
    stream = stream or sys.stdout
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    b = _budget(budget)
    runs = study_runs(study, budget)
    _check_device(device)
    from .diffusion import OBJECTIVES

    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct seed indices, got {seeds}")
    tail = "" if objective == "flow" else f"-{objective}"
    out = os.path.abspath(out or os.path.join("results", f"ablate-{study}-{budget}{tail}"))
    os.makedirs(out, exist_ok=True)
    settings = _settings(study, budget, b, seeds, runs, objective)
    sp = os.path.join(out, "study.json")
    if os.path.exists(sp):
        with open(sp) as f:
            old = json.load(f)
        old.pop("seeds", None)
        if old != json.loads(json.dumps(settings)):
            raise ValueError(f"{out}: holds a study made with other settings; use another --out")
    _atomic_json(sp, dict(settings, seeds=seeds))

    from .data import load_builtin
    from .diffusion import make_objective
    from .evaluate import validation_set

    ds = load_builtin(n=b["num_samples"], seed=TRAIN_DATA_SEED, image_size=b["image_size"])
    vds = load_builtin(n=b["val_images"], seed=VAL_DATA_SEED, image_size=b["image_size"])
    val = validation_set(make_objective(objective), vds, NUM_BUCKETS, seed=VAL_NOISE_SEED,
                         batch_size=b["eval_batch"])
    with thread_limit(threads):
        results = _run_all(study, runs, seeds, b, budget, ds, val, out, device, progress,
                           stream, metric != "loss", objective)
    fps = {r["fingerprint"] for rs in results.values() for r in rs}
    if len(fps) != 1:
        raise RuntimeError(f"{out}: runs were evaluated on different validation sets")
    agg = _aggregate(study, runs, results, b)
    table = _table(study, budget, runs, agg, b["steps"], metric, objective)
    plots = _plots(study, runs, results, agg, out, agg["smoothing_window"])
    summary = dict(settings, seeds=seeds, fingerprint=fps.pop(), aggregate=agg, metric=metric,
                   sample_eval=dict(_sample_eval(budget, objective), seed=SAMPLE_SEED),
                   train_time_s=sum(r["wall_time"] for rs in results.values() for r in rs),
                   per_run={k: [{kk: vv for kk, vv in r.items() if kk != "train_curve"}
                                for r in v] for k, v in results.items()},
                   table="table.md", plots={k: os.path.basename(p) for k, p in plots.items()})
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    _atomic_json(os.path.join(out, "summary.json"), summary)
    print(f"racedit ablate: {study} ({budget}) -> {out}", file=stream)
    return AblationResult(out, table, summary, plots)


def _run_all(study, runs, seeds, b, budget, ds, val, out, device, progress, stream,
             samples=False, objective="flow"):
    """Train and evaluate every (run, seed) without a result.json, and with ``samples``
    judge by sampling every run whose record lacks it (or has other sample settings);
    {run: [records]}."""
    jobs = [(r, s) for s in seeds for r in runs]
    bar = _bar(progress, len(jobs), study)
    results = {r.name: [] for r in runs}
    for run, seed in jobs:
        rdir = os.path.join(out, "runs", run.name, f"seed{seed}")
        marker = os.path.join(rdir, "result.json")
        if os.path.exists(marker):
            with open(marker) as f:
                rec = json.load(f)
            status = "done before"
        else:
            if os.path.isdir(rdir):
                shutil.rmtree(rdir)  # interrupted: start that run again
            os.makedirs(rdir)
            res = _train_one(run, seed, b, budget, ds, rdir, device, objective)
            rec = _run_metrics(run, seed, res, val, _steps(run, b))
            _atomic_json(marker, rec)  # the training is safe; samples may follow
            status = f"{res.wall_time:.0f} s"
        want = dict(_sample_eval(budget, objective), seed=SAMPLE_SEED)
        if samples and rec.get("samples", {}).get("settings") != want:
            rec["samples"] = _sample_metrics(run, rec["checkpoint"], budget)
            _atomic_json(marker, rec)
        results[run.name].append(rec)
        judged = (f", samples FD {rec['samples']['fd']:.3f} acc {rec['samples']['accuracy']:.3f}"
                  if samples else "")
        msg = (f"{study}/{run.name} seed {seed}: held-out {rec['eval']['ema']['loss']:.4f}, "
               f"train {rec['final_train_loss']:.4f}{judged} ({status})")
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(msg)
        else:
            print(msg, file=stream)
    if bar is not None:
        bar.close()
    return results


def _bar(progress, total, study):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=f"ablate {study}", unit="run", dynamic_ncols=True)
