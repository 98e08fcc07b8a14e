"""Several threads driving ONE racedit.MoE, ONE RaceDiT, or the experts ops (which share
one workspace) at once, run by tests/test_threads.py in a subprocess:
`python _thread_stress.py moe|model|experts ROUNDS THREADS`.

The thread switch interval is 1 us, so the GIL changes hands inside every binding call
that may drop it. Inputs mix batch sizes (so a layer's buffers grow while another call
could be using them) and kinds: float32 arrays, float64 np.memmap arrays (a subclass:
converting one runs Python) and float64 `Yielding` arrays, whose conversion sleeps, which
opens the widest window a conversion can between a call's start and its kernel.

A call either works or raises; the allowed exceptions are RuntimeError "in use by another
thread", RuntimeError for a backward (or diagnostics) with no forward to read, and
ValueError for a dy / dout whose shape is not that of the object's last forward (another
thread's forward came in between). Anything else is printed and ends the child with
status 1; a heap corruption ends it with a signal (faulthandler prints where). The last
line is a JSON summary."""
import collections
import faulthandler
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np

faulthandler.enable()

import racedit  # noqa: E402
from racedit import ops  # noqa: E402

TOKENS = 4  # L of the MoE inputs (B, L, 128)
ALLOWED = ("in use by another thread", "no forward to differentiate",
           "backward called before forward", "no forward yet")


def allowed(e):
    if isinstance(e, RuntimeError):
        return any(s in str(e) for s in ALLOWED)
    msg = str(e)
    return isinstance(e, ValueError) and msg.startswith(("dy:", "dout:")) and "expected shape" in msg


class Yielding(np.ndarray):
    """An ndarray subclass whose __array_finalize__ sleeps when a Yielding array is copied
    (as the binding's conversion to float32 does), handing the GIL to the other threads."""

    def __array_finalize__(self, obj):
        if isinstance(obj, Yielding):
            time.sleep(1e-4)


def as_input(rng, a, maps):
    """a (float32), or the same shape as a float64 np.memmap or a float64 Yielding array."""
    r = rng.random()
    if r < 0.3 and a.shape in maps:
        return maps[a.shape]
    if r < 0.6:
        return a.astype(np.float64).view(Yielding)
    return a


def memmaps(folder, shapes):
    """One float64 np.memmap per shape, filled with small random values."""
    rng = np.random.default_rng(0)
    out = {}
    for i, shape in enumerate(shapes):
        m = np.memmap(os.path.join(folder, f"m{i}.bin"), dtype=np.float64, mode="w+", shape=shape)
        m[...] = rng.standard_normal(shape) * 0.1
        out[shape] = m
    return out


def go_on(log, rounds):
    """Whether a worker goes on: until `rounds` rounds worked, so that every thread keeps
    contending to the end, within 50 * rounds attempts."""
    log["tries"] += 1
    return log["ok"] < rounds and log["tries"] <= 50 * rounds


def moe_round(obj, rng, maps):
    shape = (int(rng.integers(1, 65)), TOKENS, obj.dim)
    y = obj.forward(as_input(rng, rng.standard_normal(shape).astype(np.float32), maps))
    obj.backward(as_input(rng, np.ones(y.shape, np.float32), maps))
    obj.aux, obj.mask, obj.threshold


def model_round(obj, rng, maps):
    B, C, S = int(rng.integers(1, 9)), obj.in_channels, obj.input_size
    x = as_input(rng, rng.standard_normal((B, C, S, S)).astype(np.float32), maps)
    plr = as_input(rng, np.zeros((B, C, S, S), np.float32), maps) if rng.random() < 0.5 else None
    out = obj.forward(x, rng.uniform(0, 1000, B), rng.integers(0, obj.num_classes, B), plr)
    if rng.random() < 0.3:  # the inference arena grows while a forward could be using it
        obj.infer(x, rng.uniform(0, 1000, B), rng.integers(0, obj.num_classes, B))
    obj.backward(as_input(rng, np.ones(out.shape, np.float32), maps))
    obj.branch_norms(), obj.layer_stats(), obj.thresholds


def experts_round(obj, rng, maps):
    N, (D, E, He) = int(rng.integers(1, 257)), obj
    mask = rng.random((N, E)) < 0.4
    args = [rng.standard_normal(s).astype(np.float32) for s in ((N, D), (N, E), (E, D, He), (E, He),
                                                                 (E, He, D), (E, D))]
    x = as_input(rng, args[0], maps)
    ops.experts_forward(x, mask, *args[1:])
    ops.experts_backward(as_input(rng, np.ones((N, D), np.float32), maps), x, mask, *args[1:])


def worker(step, obj, rounds, seed, maps, log):
    rng = np.random.default_rng(seed)
    while go_on(log, rounds):
        try:
            step(obj, rng, maps)
            log["ok"] += 1
        except Exception as e:  # noqa: BLE001 - every exception is classified
            log["allowed" if allowed(e) else "bad"].append(f"{type(e).__name__}: {e}")
            if "another thread" in str(e):
                time.sleep(1e-4)  # let the holder finish now and then: both threads progress


def main(kind, rounds, nthreads):
    sys.setswitchinterval(1e-6)
    with tempfile.TemporaryDirectory() as d:
        if kind == "moe":
            obj, step = racedit.MoE(128, 8, 2), moe_round
            maps = memmaps(d, [(B, TOKENS, 128) for B in range(1, 65)])
        elif kind == "model":
            obj = racedit.RaceDiT("RaceDiT-T/2-2in4", input_size=8, in_channels=4, num_classes=3)
            step, maps = model_round, memmaps(d, [(B, 4, 8, 8) for B in range(1, 9)])
        else:
            obj, step, maps = (32, 8, 64), experts_round, {}
        logs = [{"ok": 0, "tries": 0, "allowed": [], "bad": []} for _ in range(nthreads)]
        threads = [threading.Thread(target=worker, args=(step, obj, rounds, i, maps, logs[i]))
                   for i in range(nthreads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        del maps
    msgs = [m for log in logs for m in log["allowed"]]
    bad = [m for log in logs for m in log["bad"]]
    summary = {"ok": sum(log["ok"] for log in logs),
               "busy": sum("another thread" in m for m in msgs),
               "allowed": dict(collections.Counter(m[:80] for m in msgs)), "bad": bad[:20]}
    print(json.dumps(summary), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
