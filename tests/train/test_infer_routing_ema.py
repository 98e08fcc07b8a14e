"""Thresholds that belong to the EMA weights (docs/method.md §3, racedit.calibrate): the
recalibration a checkpoint write runs (deterministic, the model left as it was, saved as
``ema_thresholds`` and used when sampling with the EMA), the sampler's timestep grid it
measures inference experts per token on, the log line and the routing report."""
import io
import json

import numpy as np
import pytest

import racedit
from racedit import RaceDiT
from racedit.calibrate import _keyed_batch, inference_experts_per_token, recalibrate_thresholds
from racedit.checkpoint import load_checkpoint
from racedit.diffusion import make_objective
from racedit.factory import model_from_checkpoint

S, C, NCLS = 8, 3, 5


class _Data:
    """A minimal training set: ``batch(idx)`` -> (x0, y)."""

    def __init__(self, n=24, seed=0):
        rng = np.random.default_rng(seed)
        self.x = rng.uniform(-1, 1, (n, C, S, S)).astype(np.float32)
        self.y = rng.integers(0, NCLS, n)

    def __len__(self):
        return len(self.x)

    def batch(self, idx):
        return self.x[idx].copy(), self.y[idx].copy()


def model(strategy="race"):
    m = RaceDiT("RaceDiT-T/2-2in4", input_size=S, in_channels=C, num_classes=NCLS,
                routing=strategy, class_dropout_prob=0.0)
    rng = np.random.default_rng(1)
    for _ in range(2):
        x = rng.standard_normal((6, C, S, S)).astype(np.float32)
        m.forward(x, rng.integers(0, 1000, 6).astype(np.float32), rng.integers(0, NCLS, 6))
    return m


def other_weights(m, seed=3):
    w = m.param_buffer.copy()
    return w + np.float32(0.05) * np.random.default_rng(seed).standard_normal(w.shape).astype(np.float32)


@pytest.mark.parametrize("objective,sampler,steps", [("ddpm", "ddpm", 7), ("ddpm", "ddim", 5),
                                                     ("flow", "euler", 6), ("flow", "heun", 4)])
def test_sampler_times_are_where_the_sampler_evaluates(objective, sampler, steps):
    obj = make_objective(objective)
    seen = []

    def fn(x, t):
        seen.append(float(t[0]))
        return np.zeros_like(x)

    obj.sample(fn, np.zeros((1, 1, 2, 2), np.float32), np.random.default_rng(0),
               sampler=sampler, num_steps=steps, progress=False)
    np.testing.assert_array_equal(obj.model_time(obj.sampler_times(sampler, steps)),
                                  np.asarray(seen, np.float32))


@pytest.mark.parametrize("strategy", ["race", "bl", "be", "token"])
def test_recalibration_leaves_the_model_and_is_deterministic(strategy):
    m, obj, ds = model(strategy), make_objective("flow"), _Data()
    w, th, ema = m.param_buffer.copy(), m.thresholds, other_weights(m)
    a = recalibrate_thresholds(m, ema, obj, ds, seed=4, step=10, passes=3, batch=4)
    np.testing.assert_array_equal(m.param_buffer, w)
    np.testing.assert_array_equal(m.thresholds, th)
    assert m.training and a.shape == m.threshold_shape and a.dtype == np.float32
    b = recalibrate_thresholds(m, ema, obj, ds, seed=4, step=10, passes=3, batch=4)
    np.testing.assert_array_equal(a, b)
    if a.size:
        assert np.isfinite(a).all()
        c = recalibrate_thresholds(m, ema, obj, ds, seed=4, step=11, passes=3, batch=4)
        assert not np.array_equal(a, c)               # other batches at another step


@pytest.mark.parametrize("strategy", ["race", "bl", "be"])
def test_recalibration_is_the_mean_of_the_batches_kth_values(strategy):
    """The result is the mean over the passes of the thresholds one training forward on
    each batch sets on the EMA weights from scratch (each group's K-th value)."""
    m, obj, ds = model(strategy), make_objective("ddpm"), _Data()
    ema = other_weights(m)
    got = recalibrate_thresholds(m, ema, obj, ds, seed=2, step=5, passes=2, batch=4)
    twin = model(strategy)
    twin.set_param_buffer(ema)
    rng = np.random.default_rng([2, 11, 5])
    want = []
    for _ in range(2):
        x_t, tm, y = _keyed_batch(ds, obj, rng, 4)
        twin.thresholds = np.full(twin.threshold_shape, np.nan, np.float32)
        twin.forward(x_t, tm, y)
        kth = []
        for mask, G in zip(twin.routing_masks(), twin._moe_get("gates")):
            # the K-th value of each group is the smallest selected gate of the group
            axes = {"race": None, "bl": (0, 1), "be": (0, 2)}[strategy]
            kth.append(np.where(mask, G, np.inf).min(axis=axes))
        want.append(np.array(kth, np.float64).reshape(twin.threshold_shape))
    np.testing.assert_allclose(got, np.mean(want, axis=0), rtol=1e-6)


def test_inference_experts_per_token_over_the_grid():
    m, obj, ds = model("token"), make_objective("flow"), _Data()
    r = inference_experts_per_token(m, None, None, obj, ds, "heun", 4, batch=3)
    assert len(r["t"]) == len(r["experts_per_token"]) == 7             # 2 * 4 - 1 evaluations
    assert r["mean"] == m.config.k                                     # token choice: exact
    m2 = model("race")
    th = m2.thresholds
    hi = inference_experts_per_token(m2, None, th - 1.0, obj, ds, "euler", 5)["mean"]
    lo = inference_experts_per_token(m2, None, th + 1.0, obj, ds, "euler", 5)["mean"]
    assert hi > lo and m2.training
    np.testing.assert_array_equal(m2.thresholds, th)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny run to step 4 with a checkpoint at step 2, and one resumed from that step."""
    d = str(tmp_path_factory.mktemp("r"))
    kw = dict(progress=False, final_samples=False, out=io.StringIO(), results_dir=d)
    full = racedit.train(preset="tiny", steps=4, ckpt_every=2, report=True, **kw)
    ck2 = full.checkpoint.replace("0000004", "0000002")
    resumed = racedit.train(resume=ck2, steps=4, report=False, **kw)
    return full, resumed


def test_checkpoint_holds_ema_thresholds_and_resume_is_exact(runs):
    full, resumed = runs
    a, meta = load_checkpoint(full.checkpoint)
    b, _ = load_checkpoint(resumed.checkpoint)
    assert a["ema_thresholds"].shape == a["thresholds"].shape
    for key in ("thresholds", "ema_thresholds"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["ema_thresholds"], a["thresholds"])
    r = meta["ema_routing"]
    assert r["k"] == 2 and r["passes"] >= 1 and 0 < r["infer_experts_per_token"] <= 4
    with open(f"{full.run_dir}/log.txt") as f:
        said = [line for line in f if "EMA routing at step" in line]
    assert [line.split("at step ")[1].split(":")[0] for line in said] == ["2", "4"]
    assert f"grid {r['infer_experts_per_token']:.3f}" in said[1]


def test_sampling_model_routes_with_the_ema_thresholds(runs):
    full, _ = runs
    tensors, _ = load_checkpoint(full.checkpoint)
    m, _ = model_from_checkpoint(full.checkpoint)
    np.testing.assert_array_equal(m.thresholds, tensors["ema_thresholds"])
    live, _ = model_from_checkpoint(full.checkpoint, use_ema=False)
    np.testing.assert_array_equal(live.thresholds, tensors["thresholds"])


def test_report_shows_inference_and_training_experts_per_token(runs):
    full, _ = runs
    with open(full.report) as f:
        rep = json.load(f)
    s = rep["experts_per_token"]
    assert s["thresholds"] == "recalibrated on the EMA weights"
    meta = load_checkpoint(full.checkpoint)[1]["ema_routing"]
    assert s["inference_sampler_grid"] == meta["infer_experts_per_token"]
    assert s["inference_sampler_grid_live_thresholds"] == meta["infer_experts_per_token_live_thresholds"]
    assert s["training"] == pytest.approx(2.0) and s["k"] == 2
