"""The same bits at any thread count on the CPU: the model's forward and backward (every
layer, the MoE blocks with their aux losses, thresholds and diagnostics), the PLR loss, and
whole training runs (tiny and quick presets) at 1 and 2 threads, resumed at the other count.

What makes it hold: every reduction runs in a fixed order (per-row sums, column sums in row
order, fixed chunks added in chunk order), and every BLAS call is the same call at any
thread count — in the default threading mode ("omp", racedit._C.moe_threading()) the BLAS
is single-threaded inside the model and products are split into row blocks chosen from
their shapes alone. The limit: in "blas" mode the BLAS threads the products itself, and
OpenBLAS's threaded sgemm blocks the inner dimension differently from its single-threaded
one for some sizes, so results may differ in the last bits between thread counts; these
tests run in the default mode."""
import io
import os

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import racedit
from racedit import _C, ops
from racedit.train import PRESETS, TrainConfig, build_model, train

pytestmark = pytest.mark.skipif(
    _C.moe_threading() != "omp",
    reason="thread-count independence holds in the 'omp' threading mode (the default when "
           "racedit controls the BLAS's threads)")

THREADS = (1, 2, 3)


def test_default_mode_is_omp_with_blas_thread_control():
    assert _C.blas_thread_control() and _C.moe_threading() == "omp"


def chunked_sq_mean(T, target, chunk=8192):
    """The PLR loss as the C core sums it: float64 squares, each chunk summed in order,
    the chunks in order (np.cumsum is sequential)."""
    d = np.asarray(T, np.float64).ravel() - np.asarray(target, np.float64).ravel()
    parts = [np.cumsum(d[i:i + chunk] ** 2)[-1] for i in range(0, d.size, chunk)]
    return float(np.float32(np.cumsum(parts)[-1] / d.size))


def test_plr_loss_same_bits_at_any_thread_count():
    rng = np.random.default_rng(0)
    n = (1 << 19) + 5                                 # above the parallel threshold (2^18)
    T = rng.normal(size=n).astype(np.float32)
    target = rng.normal(size=n).astype(np.float32)
    losses = []
    for th in THREADS:
        with threadpool_limits(th):
            losses.append(ops.plr_loss(T, target)[0])
    assert losses == [chunked_sq_mean(T, target)] * len(THREADS)


def step_at(m, th, x, t, y, target):
    """Forward (training, PLR target) and backward at `th` threads; what they produce."""
    with threadpool_limits(th):
        m.zero_grad()
        out = m.forward(x, t, y, plr_target=target if m.config.is_moe else None)
        m.backward(out - target)
    bn = m.branch_norms()
    return [out, m.grad_buffer.copy(), bn["attn"], bn["ffn"], m.thresholds,
            np.array([m.aux_loss()] + list(m.aux().values()))] + m.routing_masks()


@pytest.mark.parametrize("model", [None, "DiT-S/4"], ids=["quick", "dense"])
def test_model_step_same_bits_at_any_thread_count(model):
    """The quick preset's model (and a dense DiT) on a 32x32 batch: one forward/backward
    per thread count from the same weights and thresholds."""
    kw = dict(PRESETS["quick"])
    if model:
        kw.update(model=model, model_config=None)
    m = build_model(TrainConfig(**kw), 3, 32, 10)
    rng = np.random.default_rng(1)
    m.param_buffer[...] += rng.normal(0.0, 0.05, m.param_buffer.size).astype(np.float32)
    B = 16
    x = rng.normal(size=(B, 3, 32, 32)).astype(np.float32)
    t = rng.uniform(0, 1000, B).astype(np.float32)
    y = rng.integers(0, 11, B)
    target = rng.normal(size=x.shape).astype(np.float32)
    ref = None
    for th in THREADS:
        m.thresholds = np.full(m.num_moe_layers, np.nan, np.float32)
        got = step_at(m, th, x, t, y, target)
        if ref is None:
            ref = got
            continue
        for i, (a, b) in enumerate(zip(got, ref)):
            np.testing.assert_array_equal(a, b, err_msg=f"item {i} at {th} threads")


# ---- whole runs ---------------------------------------------------------------------------

def run(tmp_path, threads, preset, steps, resume=None):
    args = dict(progress=False, final_samples=False, report=False, out=io.StringIO())
    with threadpool_limits(threads):
        if resume:
            return train(resume=resume, **args)
        return train(preset=preset, steps=steps, num_samples=128, ckpt_every=2, log_every=100,
                     results_dir=str(tmp_path / f"{preset}-{threads}"), **args)


def summary(res):
    logs = [{k: v for k, v in r.items() if k != "images_per_s"} for r in res.log]
    return logs, res.model.param_buffer.copy(), res.ema.copy(), res.model.thresholds


@pytest.mark.parametrize("preset,steps", [("tiny", 4), ("quick", 3)])
def test_training_same_bits_at_1_and_2_threads_and_resumed_across(tmp_path, preset, steps):
    one = run(tmp_path, 1, preset, steps)
    two = run(tmp_path, 2, preset, steps)
    ck = os.path.join(one.run_dir, "checkpoints", "0000002.safetensors")
    resumed = run(tmp_path, 2, preset, steps, resume=ck)   # steps 1-2 at 1 thread, then 2
    want = summary(one)
    assert len(want[0]) == steps
    for other in (two, resumed):
        got = summary(other)
        assert repr(got[0]) == repr(want[0])               # every logged number, NaN included
        for a, b in zip(got[1:], want[1:]):
            np.testing.assert_array_equal(a, b)
