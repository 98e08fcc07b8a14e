"""The held-out metric of the ablations (racedit.evaluate): fixed validation inputs that do
not depend on the model, a deterministic loss, the loss and routing diagnostics against
direct computations and the float64 references, and bad input."""
import io

import numpy as np
import pytest

from racedit.data import load_builtin
from racedit.diffusion import make_objective
from racedit.evaluate import (evaluate, evaluate_checkpoint, load_eval_model, usage_from_pairs,
                              validation_set)
from racedit.model import RaceDiT
from racedit.ref import losses as ref_losses
from racedit.train import train

TINY_MOE = dict(depth=1, hidden=16, heads=2, patch=4, num_experts=4, k=2, expert_hidden=32)


@pytest.fixture(scope="module")
def data16():
    return load_builtin(n=6, seed=5, image_size=16)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    res = train("RaceDiT-t/4-2in4", model_config=TINY_MOE, image_size=16, num_samples=32,
                objective="flow", global_batch_size=8, steps=5, lr=1e-3, ema_decay=0.5,
                results_dir=str(tmp_path_factory.mktemp("r")), progress=False,
                final_samples=False, report=False, out=io.StringIO())
    return res.checkpoint


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_validation_set_buckets(objective, data16):
    obj = make_objective(objective)
    v = validation_set(obj, data16, num_buckets=5, seed=3, batch_size=7)
    assert len(v) == 6 * 5 and v.x0.shape == (30, 3, 16, 16) and v.noise.shape == v.x0.shape
    assert np.array_equal(np.bincount(v.bucket), [6] * 5)
    frac = obj.time_fraction(v.t) if objective == "ddpm" else v.t
    assert np.all(np.floor(np.asarray(frac) * 5).astype(int) == v.bucket)
    sizes = [b[0].shape[0] for b in v.batches()]
    assert sizes == [7, 7, 7, 7, 2]
    again = validation_set(obj, data16, num_buckets=5, seed=3, batch_size=7)
    assert again.fingerprint == v.fingerprint and np.array_equal(again.noise, v.noise)
    other = validation_set(obj, data16, num_buckets=5, seed=4, batch_size=7)
    assert other.fingerprint != v.fingerprint
    assert validation_set(obj, data16, 5, seed=3, max_images=2).x0.shape[0] == 10


def test_validation_set_bad_input(data16):
    obj = make_objective("flow")
    with pytest.raises(ValueError, match="num_buckets"):
        validation_set(obj, data16, num_buckets=0)
    with pytest.raises(ValueError, match="batch_size"):
        validation_set(obj, data16, batch_size=0)
    with pytest.raises(ValueError, match="no images"):
        validation_set(obj, data16, max_images=0)


def test_checkpoint_metric_is_deterministic(ckpt, data16):
    val = validation_set(make_objective("flow"), data16, num_buckets=4, batch_size=8)
    a = evaluate_checkpoint(ckpt, val)
    b = evaluate_checkpoint(ckpt, val)
    assert a == b
    assert np.isfinite(a["ema"]["loss"]) and a["ema"]["loss"] != a["raw"]["loss"]
    assert a["ema"]["fingerprint"] == val.fingerprint
    # a fresh validation set built the same way gives the same number
    val2 = validation_set(make_objective("flow"), data16, num_buckets=4, batch_size=8)
    assert evaluate_checkpoint(ckpt, val2, raw=False)["ema"] == a["ema"]


def test_loss_and_diagnostics_match_direct_computation(ckpt, data16):
    obj = make_objective("flow")
    val = validation_set(obj, data16, num_buckets=3, batch_size=18)   # one batch
    m, ema, _, _ = load_eval_model(ckpt)
    live = m.param_buffer.copy()
    res = evaluate(m, val, weights=ema)
    assert np.array_equal(m.param_buffer, live) and m.training  # restored
    m.param_buffer[...] = ema
    m.eval()
    x_t, target = obj.make_batch(val.x0, val.t, val.noise)
    out = m.forward(x_t, obj.model_time(val.t), val.y)
    per = np.mean((out.astype(np.float64) - target) ** 2, axis=(1, 2, 3))
    want = [per[val.bucket == b].mean() for b in range(3)]
    np.testing.assert_allclose(res["loss_by_t"], want, rtol=1e-12)
    np.testing.assert_allclose(res["loss"], np.mean(want), rtol=1e-12)
    masks = m.routing_masks()
    np.testing.assert_allclose(res["max_violation_per_layer"],
                               [ref_losses.max_violation(k) for k in masks], rtol=1e-12)
    np.testing.assert_allclose(res["combination_usage_per_layer"],
                               [ref_losses.combination_usage(k) for k in masks], rtol=1e-12)
    ept = m.experts_per_token_by_sample()
    np.testing.assert_allclose(res["ept_by_t"], [ept[val.bucket == b].mean() for b in range(3)],
                               rtol=1e-12)
    assert res["experts_per_token"] == pytest.approx(np.mean(ept), rel=1e-12)


def test_topk_evaluation_keeps_k_on_average(ckpt, data16):
    val = validation_set(make_objective("flow"), data16, num_buckets=2, batch_size=12)
    m, ema, _, _ = load_eval_model(ckpt, eval_topk=True)
    res = evaluate(m, val, weights=ema)
    assert res["experts_per_token"] == pytest.approx(2.0)  # batch top-K: exactly k per token


def test_dense_model_has_no_routing_stats(data16):
    m = RaceDiT("DiT-T/4", input_size=16, in_channels=3, num_classes=10, seed=0)
    val = validation_set(make_objective("ddpm"), data16, num_buckets=2)
    res = evaluate(m, val)
    assert set(res) == {"loss", "loss_by_t", "fingerprint"} and np.isfinite(res["loss"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_usage_from_pairs_matches_reference(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((37, 6)) < [0.9, 0.5, 0.4, 0.2, 0.1, 0.05]
    M = mask.astype(np.float64)
    assert usage_from_pairs(M.T @ M) == pytest.approx(ref_losses.combination_usage(mask))
    assert usage_from_pairs(np.eye(6)) == 0.0          # no pair co-selected
    assert usage_from_pairs(np.ones((1, 1))) == 0.0


def test_usage_from_pairs_counts_bins_strictly_below_coverage():
    # pair counts 5, 3, 1, 1 of C(4,2) = 6 bins: cumulative shares 0.5, 0.8, 0.9, 1.0;
    # three stay below 95 % (the fourth, which reaches it, is not counted)
    P = np.zeros((4, 4))
    for (i, j), c in {(0, 1): 5, (0, 2): 3, (1, 2): 1, (2, 3): 1}.items():
        P[i, j] = P[j, i] = c
    assert usage_from_pairs(P) == pytest.approx(3 / 6)
    assert usage_from_pairs(P, coverage=0.5) == 0.0
    one = np.zeros((4, 4))
    one[0, 1] = one[1, 0] = 9                          # one pair holds all the mass
    assert usage_from_pairs(one) == 0.0


def test_missing_checkpoint(tmp_path, data16):
    val = validation_set(make_objective("flow"), data16, num_buckets=2)
    with pytest.raises(FileNotFoundError):
        evaluate_checkpoint(str(tmp_path / "none.safetensors"), val)


def test_ema_weights_are_evaluated_with_their_recalibrated_thresholds(ckpt, data16):
    """The "ema" numbers route by the checkpoint's ema_thresholds (recalibrated on the EMA
    weights when it was written), the "raw" ones by the live thresholds; both restored."""
    from racedit.calibrate import routing_with

    val = validation_set(make_objective("flow"), data16, num_buckets=2, batch_size=12)
    m, ema, ema_th, _ = load_eval_model(ckpt)
    assert ema_th is not None and ema_th.shape == m.thresholds.shape
    assert not np.array_equal(ema_th, m.thresholds)
    live_th = m.thresholds.copy()
    with routing_with(m, thresholds=ema_th):
        want = evaluate(m, val, weights=ema)
    res = evaluate_checkpoint(ckpt, val)
    assert res["ema"] == want
    assert np.array_equal(m.thresholds, live_th)
    assert res["raw"] == evaluate(m, val)
