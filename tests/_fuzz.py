"""Random-argument fuzzing of racedit's public entry points, run by tests/test_fuzz.py in a
subprocess: `python _fuzz.py SEED [SEED ...]`. Every call must return or raise a Python
exception; a crash kills the process (faulthandler prints where) and the test sees it.

Arguments: arrays of random rank (0-4), sizes (0-5, empty included) and dtypes (float32 /
64 / 16, int32 / 64, bool, uint8), some non-contiguous, Fortran-ordered, read-only or
holding NaN / inf; scalars of the wrong kind (None, negatives, 2**40, NaN, strings,
lists, objects); argument counts one short or one long. The expert ops also get
well-formed cases with one argument replaced; the model and the MoE layer get random
batches, gradients and thresholds. The racedit.cuda ops are included (on a machine
without a GPU their argument checks run, then RuntimeError), and so are the ops, the model
and the layer on the checking backend (device="check": every array staged into its pool)."""
import faulthandler
import functools
import inspect
import sys

import numpy as np

faulthandler.enable()

import racedit  # noqa: E402
import racedit.ops as ops  # noqa: E402
from racedit import cuda  # noqa: E402

SKIP_CUDA = {"MoEState", "bench_moe", "tf32", "expert_gemm", "info", "moe_forward", "moe_backward"}


def fuzz(seed, calls=400, models=60):
    rng = np.random.default_rng(seed)

    def rand_array():
        kind = rng.integers(0, 10)
        shape = tuple(int(s) for s in rng.integers(0, 6, int(rng.integers(0, 5))))
        dt = [np.float32, np.float64, np.int32, np.int64, np.bool_, np.float16, np.uint8][rng.integers(0, 7)]
        a = rng.random(shape) < 0.5 if dt == np.bool_ else (rng.standard_normal(shape) * 3).astype(dt)
        if kind == 0 and a.ndim >= 1 and a.shape[-1] > 1:
            a = a[..., ::2]                                   # non-contiguous
        if kind == 1 and a.size and a.dtype.kind == "f":
            a.flat[rng.integers(0, a.size)] = [np.nan, np.inf, -np.inf][rng.integers(0, 3)]
        if kind == 2 and a.ndim >= 2:
            a = np.asfortranarray(a)
        if kind == 3:
            a.setflags(write=False)
        return a

    def rand_arg():
        if rng.integers(0, 12) < 7:
            return rand_array()
        return [None, -1, 0, 3, 2**40, 1.5, "race", "x", True, float("nan"), [1, 2],
                object()][rng.integers(0, 12)]

    def expert_case():
        N, D, E, He = (int(v) for v in rng.integers(0, 6, 4))
        a = dict(dy=np.zeros((N, D), np.float32), x=np.zeros((N, D), np.float32),
                 mask=rng.random((N, E)) < 0.5, G=rng.standard_normal((N, E)).astype(np.float32),
                 w1=np.zeros((E, D, He), np.float32), b1=np.zeros((E, He), np.float32),
                 w2=np.zeros((E, He, D), np.float32), b2=np.zeros((E, D), np.float32))
        a[list(a)[rng.integers(0, len(a))]] = rand_array()
        return a

    funcs = [(n, getattr(ops, n)) for n in dir(ops) if not n.startswith("_")
             and callable(getattr(ops, n)) and n not in ("losses", "moe")]
    funcs += [(n + "@check", functools.partial(f, device="check")) for n, f in funcs
              if "device" in inspect.signature(f).parameters]
    funcs += [(n, getattr(cuda, n)) for n in cuda.__all__
              if callable(getattr(cuda, n)) and n not in SKIP_CUDA]
    for _ in range(calls):
        name, f = funcs[rng.integers(0, len(funcs))]
        required = [p for p in inspect.signature(f).parameters.values() if p.default is p.empty]
        args = [rand_arg() for _ in range(max(0, len(required) + int(rng.integers(-1, 2))))]
        if name.startswith("experts_") and rng.random() < 0.7:
            a = expert_case()
            keys = ("dy",) * name.endswith("backward") + ("x", "mask", "G", "w1", "b1", "w2", "b2")
            args = [a[k] for k in keys]
        try:
            f(*args)
        except Exception:
            pass
    for _ in range(models):
        try:
            m = racedit.RaceDiT("RaceDiT-T/2-2in4", input_size=int(rng.choice([4, 8])),
                                in_channels=int(rng.choice([1, 4])), num_classes=3,
                                device=str(rng.choice(["cpu", "check"])))
            B, C, S = int(rng.integers(0, 3)), m.in_channels, m.input_size
            pick = lambda good: rand_array() if rng.random() < 0.3 else good  # noqa: E731
            out = m.forward(pick(np.zeros((B, C, S, S), np.float32)), pick(np.zeros(B, np.float32)),
                            pick(np.zeros(B, np.int64)))
            m.branch_norms()
            m.backward(pick(np.zeros_like(out)))
            m.thresholds = rand_array()
        except Exception:
            pass
        try:
            moe = racedit.MoE(int(rng.integers(1, 6)), int(rng.integers(1, 5)), int(rng.integers(0, 3)),
                              strategy=["race", "token", "expert", "bl", "be", "le"][rng.integers(0, 6)],
                              device=str(rng.choice(["cpu", "check"])))
            y = moe.forward(rand_array() if rng.random() < 0.4 else np.zeros((2, 3, moe.dim), np.float32))
            moe.backward(rand_array() if rng.random() < 0.4 else np.zeros_like(y))
        except Exception:
            pass


if __name__ == "__main__":
    for s in sys.argv[1:]:
        fuzz(int(s))
        print("seed", s, "ok", flush=True)
