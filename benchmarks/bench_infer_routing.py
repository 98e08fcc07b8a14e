"""Benchmark (not a test): experts per token at inference, per routing strategy, on
single-timestep batches over a range of t, for the runs of a finished ablation study
(``python -m racedit ablate --study routing ...``).

Each run's checkpoint is loaded with its EMA weights and the thresholds recalibrated on
them (what sampling uses), put in eval mode (each strategy's inference routing,
docs/method.md §3) and run on batches of ``--images`` held-out images that share one
timestep t. Prints, per strategy and over the study's seeds, experts per token at each t
(mean over images and MoE layers), the mean over the t grid, and the largest deviation
from k at a single t, each also as a percentage of k; under it, what training's batch
top-K gave at the same t (the run's log.jsonl, the last fifth of training, the bucket of
width 0.1 that holds t), which threshold routing is meant to reproduce. Usage:

    python benchmarks/bench_infer_routing.py results/ablate-routing-small [--images 64]
"""
import argparse
import json
import os

import numpy as np

from racedit.ablate import VAL_DATA_SEED
from racedit.calibrate import routing_with
from racedit.data import load_builtin
from racedit.diffusion import make_objective
from racedit.evaluate import load_eval_model
from racedit.report import training_ept_by_t
from racedit.runs import read_log
from racedit.train import NUM_T_BUCKETS

T_GRID = (0.02, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)  # fraction of the noise range


def experts_by_t(ckpt, images, seed=0):
    """(k, [experts per token at each t of T_GRID]) for one checkpoint."""
    m, ema, ema_th, meta = load_eval_model(ckpt)
    obj = make_objective(meta["config"]["objective"])
    ds = load_builtin(n=images, seed=VAL_DATA_SEED, image_size=meta["data"]["image_size"])
    x0, y = ds.batch(np.arange(images))
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(x0.shape, dtype=np.float32)
    out = []
    with routing_with(m, weights=ema, thresholds=ema_th):
        for frac in T_GRID:
            t = obj.times_at_fraction(frac, images)
            x_t, _ = obj.make_batch(x0, t, noise)
            m.forward(x_t, obj.model_time(t), y)
            out.append(float(np.mean(m.experts_per_token_by_sample())))
    return m.config.k, out


def training_by_t(run_dir):
    """Training's experts per token (racedit.report.training_ept_by_t of the run's log) in
    the bucket of each t of T_GRID; NaN where no training step reached it."""
    by_t, _ = training_ept_by_t(read_log(os.path.join(run_dir, "log.jsonl")), NUM_T_BUCKETS)
    if not by_t:
        return [np.nan] * len(T_GRID)
    return [np.nan if v is None else v for v in
            (by_t[min(int(f * NUM_T_BUCKETS), NUM_T_BUCKETS - 1)] for f in T_GRID)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("study", help="a finished routing study folder")
    ap.add_argument("--images", type=int, default=64)
    args = ap.parse_args()
    with open(os.path.join(args.study, "summary.json")) as f:
        summary = json.load(f)
    print(f"{args.study}: experts per token at inference, EMA weights and recalibrated "
          f"thresholds, {args.images} held-out images per single-timestep batch; mean over "
          f"seeds {summary['seeds']}")
    print("| strategy | " + " | ".join(f"{t:g}" for t in T_GRID) +
          " | mean over t (vs k) | largest deviation at one t |")
    print("|---|" + "---:|" * (len(T_GRID) + 2))
    for run, recs in summary["per_run"].items():
        per = [experts_by_t(r["checkpoint"], args.images) for r in recs]
        k = per[0][0]
        e = np.mean([p[1] for p in per], axis=0)
        worst = e[np.argmax(np.abs(e - k))]
        print(f"| {run} | " + " | ".join(f"{v:.2f}" for v in e) +
              f" | {e.mean():.3f} ({100 * (e.mean() - k) / k:+.1f} %) | "
              f"{worst:.2f} ({100 * (worst - k) / k:+.1f} %) |", flush=True)
        tr = np.mean([training_by_t(r["run_dir"]) for r in recs], axis=0)
        print(f"| {run}, training | " + " | ".join(f"{v:.2f}" for v in tr) +
              f" | {np.nanmean(tr):.3f} | largest gap to inference {np.nanmax(np.abs(e - tr)):.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
