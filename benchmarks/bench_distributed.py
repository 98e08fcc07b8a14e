"""Data-parallel throughput on the CPU: 2 ranks x 1 thread against 1 rank x 1 thread, with
the per-rank micro-batch fixed (the global batch doubles with the ranks, as with DiT's
torchrun training), and the gradient all-reduce's share of a step.

    python benchmarks/bench_distributed.py [--preset quick] [--micro-batch 32] [--steps 40]

Each configuration runs ``python -m racedit train`` (under mpiexec for 2 ranks) and reads
its log.jsonl: images/s per step (global images over rank 0's step time) and, for 2 ranks,
``allreduce_s`` (rank 0's time in MPI_Allreduce, waiting for the slower rank included).
The first steps (warm-up) are left out; medians are reported. Needs the ``mpi`` extra.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np


def _mpiexec():
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    exe = shutil.which("mpiexec", path=path) or shutil.which("mpirun", path=path)
    if exe is None:
        sys.exit("bench_distributed: mpiexec not found (pip install '.[mpi]')")
    return exe


def run(ranks, args, root):
    out = os.path.join(root, f"r{ranks}")
    cmd = [sys.executable, "-m", "racedit", "train", "--preset", args.preset,
           "--steps", str(args.steps), "--global-batch-size", str(args.micro_batch * ranks),
           "--threads", "1", "--no-report", "--no-progress", "--results-dir", out,
           "--log-every", str(args.steps)]
    if ranks > 1:
        cmd = [_mpiexec(), "-n", str(ranks), *cmd]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    (log,) = glob.glob(os.path.join(out, "*", "log.jsonl"))
    recs = [json.loads(l) for l in open(log)]
    recs = [r for r in recs if "step" in r and "event" not in r][args.warmup:]
    ips = np.median([r["images_per_s"] for r in recs])
    frac = None
    if ranks > 1:
        frac = np.median([r["allreduce_s"] * r["images_per_s"] / (args.micro_batch * ranks)
                          for r in recs])
    return ips, frac


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--micro-batch", type=int, default=32, help="samples per rank per step")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        one, _ = run(1, args, root)
        two, frac = run(2, args, root)
    print(f"preset {args.preset}, {args.micro_batch} samples per rank per step, 1 thread per "
          f"rank, median over steps {args.warmup + 1}-{args.steps}")
    print(f"1 rank : {one:8.1f} images/s")
    print(f"2 ranks: {two:8.1f} images/s  ({two / one:.2f}x); all-reduce {100 * frac:.1f} % "
          "of a step")


if __name__ == "__main__":
    main()
