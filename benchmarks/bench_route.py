"""Speed of racedit.ops.route (expert race: one top-K over all B*L*E scores) against
NumPy's argpartition of the same flat array, run in the same process. Not a test.

    python3 benchmarks/bench_route.py [--repeat N]   (installed, or PYTHONPATH=. in the repo)

argpartition only finds the top K (no tie rule, no mask); racedit also builds the
(B, L, E) bool mask with ties to the lower flat index. Threads: OpenMP as built
(OMP_NUM_THREADS to change); NumPy is single-threaded here.
"""
import argparse
import time

import numpy as np

import racedit
from racedit import ops

CASES = [((32, 256, 64), 4), ((8, 256, 16), 2)]


def best_time(fn, repeat):
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    info = racedit.build_info()
    print(f"openmp={info['openmp']} threads={info['num_threads']}")
    print(f"{'(B, L, E)':>16} {'k':>3} {'K':>8} {'racedit ms':>11} {'argpartition ms':>16} {'ratio':>7}")
    rng = np.random.default_rng(0)
    for shape, k in CASES:
        x = rng.standard_normal(shape).astype(np.float32)
        K = shape[0] * shape[1] * k
        flat = x.ravel()
        t_rd = best_time(lambda: ops.route(x, k, "race"), args.repeat)
        t_np = best_time(lambda: np.argpartition(-flat, K - 1)[:K], args.repeat)
        print(f"{str(shape):>16} {k:>3} {K:>8} {t_rd * 1e3:>11.3f} {t_np * 1e3:>16.3f} "
              f"{t_np / t_rd:>6.1f}x")
    print("ratio = argpartition time / racedit time (higher is better for racedit)")


if __name__ == "__main__":
    main()
