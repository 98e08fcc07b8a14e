"""Peak memory and images per second of mass sampling (racedit.sample.generate_npz, the
path of ``python -m racedit sample --num-samples N``) with the quick preset's model at
32x32, guidance scale 4 (every model call on twice the batch). Trains nothing: the model
has its random initial weights and thresholds set by one training forward of 8 images,
unless --ckpt gives a checkpoint. Not a test.

    python3 benchmarks/bench_sample.py [--num-samples 1000] [--batch-size 64,128]
                                       [--steps 20] [--sampler heun] [--ckpt PATH]
                                       [--preset quick|tiny] [--threads N]

Each configuration runs in its own child process, so its peak resident set size
(ru_maxrss, which includes the interpreter, NumPy and the model) is its own. The goal:
1000 samples under 1 GB, and 50 000 samples no higher than 1000 (memory bounded by the
batch and one shard, not by N).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..")]

LIMIT_MB = 1024


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")  # pragma: no cover - not Linux


def _model(args):
    """(model, objective) of the preset's model (random init) or of --ckpt."""
    import numpy as np

    from racedit.diffusion import make_objective
    from racedit.train import PRESETS, TrainConfig, build_model, model_from_checkpoint

    if args.ckpt:
        m, meta = model_from_checkpoint(args.ckpt)
        c = meta["config"]
        return m, make_objective(c["objective"], learn_sigma=c["learn_sigma"])
    cfg = TrainConfig(**PRESETS[args.preset])
    m = build_model(cfg, 3, 32, 10)
    r = np.random.default_rng(0)
    m.train()  # one training forward sets each MoE layer's threshold from its batch
    m.forward(r.standard_normal((8, 3, 32, 32)).astype(np.float32), r.uniform(0, 1000, 8),
              r.integers(0, 10, 8))
    return m, make_objective(cfg.objective)


def child(args):
    """Sample in this process and print one JSON line of measurements."""
    from racedit.sample import generate_npz, mass_labels
    from racedit.threads import thread_limit

    with thread_limit(args.threads):
        m, obj = _model(args)
        labels = mass_labels(args.num_samples, m.num_classes, seed=0)
        rss0 = _rss_mb()
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            generate_npz(m, obj, os.path.join(d, "s.npz"), labels, cfg_scale=4.0,
                         sampler=args.sampler, num_steps=args.steps, seed=0,
                         batch_size=args.batch_size, progress=False, stream=open(os.devnull, "w"))
            wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"batch": args.batch_size, "n": args.num_samples, "wall": wall,
                      "rss0": rss0, "peak": peak}))


def _run_child(args, bs):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--batch-size", str(bs),
           "--num-samples", str(args.num_samples), "--steps", str(args.steps),
           "--sampler", args.sampler, "--preset", args.preset]
    cmd += ["--ckpt", args.ckpt] if args.ckpt else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"batch {bs}: child failed\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--batch-size", default="64", help="comma-separated images per call")
    ap.add_argument("--steps", type=int, default=20, help="sampler steps (quick preset: 20)")
    ap.add_argument("--sampler", default="heun")
    ap.add_argument("--preset", default="quick", choices=("quick", "tiny"),
                    help="the model (tiny: a cheap check that memory does not grow with N)")
    ap.add_argument("--ckpt", help="sample this checkpoint instead of a random preset model")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.batch_size = int(args.batch_size)
        return child(args)
    print(f"{args.num_samples} samples, cfg 4, {args.sampler} {args.steps} steps, "
          f"{'checkpoint ' + args.ckpt if args.ckpt else args.preset + ' preset, random init'}")
    print(f"{'batch':>6} {'samples':>8} {'wall s':>8} {'img/s':>7} {'RSS before MB':>14} "
          f"{'peak RSS MB':>12} {'<= 1 GB':>8}")
    for bs in (int(b) for b in args.batch_size.split(",")):
        r = _run_child(args, bs)
        print(f"{r['batch']:>6} {r['n']:>8} {r['wall']:>8.1f} {r['n'] / r['wall']:>7.1f} "
              f"{r['rss0']:>14.0f} {r['peak']:>12.0f} {str(r['peak'] <= LIMIT_MB):>8}")


if __name__ == "__main__":
    main()
