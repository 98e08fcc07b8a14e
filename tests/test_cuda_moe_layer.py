"""racedit.MoE(device="cuda") against the CPU racedit.MoE with the
same seed: identical initial parameters, forward / backward (fp32, tight) with the aux
losses, the views of the last forward, the threshold in eval mode, settable weights read
by the next forward, bf16 experts within a stated tolerance. Skipped without a GPU, except
the dispatch checks."""
import numpy as np
import pytest

import racedit
from racedit import MoE

HAVE_GPU = racedit.cuda_available()
gpu = pytest.mark.skipif(not HAVE_GPU, reason="CUDA not available: no CUDA device or racedit "
                         "built without CUDA")


def close(a, b, what="", rtol=1e-3, atol=1e-4):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.abs(b).max()) if b.size else 0.0, 1e-3)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale, err_msg=what)


def test_dispatch():
    assert type(MoE(8, 4, 2)) is MoE
    with pytest.raises(ValueError, match="device"):
        MoE(8, 4, 2, device="tpu")


@pytest.mark.skipif(HAVE_GPU, reason="checks the error without a GPU")
def test_cuda_layer_without_gpu_raises():
    with pytest.raises(RuntimeError, match="CUDA not available"):
        MoE(8, 4, 2, device="cuda")


def run(strategy, seed, training=True, **kw):
    kw = dict(plr_dim=3, sim_weight=0.1, balance_weight=0.05, **kw)
    c = MoE(16, 4, 2, strategy=strategy, seed=seed, **kw)
    g = MoE(16, 4, 2, strategy=strategy, seed=seed, device="cuda", **kw)
    np.testing.assert_array_equal(g.param_buffer, c.param_buffer)
    rng = np.random.default_rng(seed + 10)
    x = rng.standard_normal((3, 8, 16)).astype(np.float32)
    tgt = rng.standard_normal((3, 8, 3)).astype(np.float32)
    if not training:
        c.forward(x)
        g.forward(x)
        g.threshold = c.threshold
        c.eval()
        g.eval()
        x = rng.standard_normal((3, 8, 16)).astype(np.float32)
    yc, yg = c.forward(x, plr_target=tgt), g.forward(x, plr_target=tgt)
    return c, g, x, yc, yg


@gpu
@pytest.mark.parametrize("strategy", ["race", "token", "expert", "bl", "be", "le"])
@pytest.mark.parametrize("training", [True, False])
def test_layer_matches_cpu(strategy, training):
    for seed in range(5):
        c, g, x, yc, yg = run(strategy, seed, training)
        if np.array_equal(c.mask, g.mask):
            break
    else:
        pytest.fail("masks differ for every seed")
    close(yg, yc, "y")
    for k in ("gates", "logits", "router_hidden"):
        close(getattr(g, k), getattr(c, k), k)
    np.testing.assert_array_equal(g.expert_counts, c.expert_counts)
    ac, ag = c.aux, g.aux
    for k in ("sim_loss", "balance_loss", "plr_loss"):
        assert (ag[k] is None) == (ac[k] is None), k
        if ac[k] is not None:
            assert ag[k] == pytest.approx(ac[k], rel=1e-3, abs=1e-6), k
    dy = np.random.default_rng(seed).standard_normal(yc.shape).astype(np.float32)
    close(g.backward(dy), c.backward(dy), "dx")
    for name in c.grads:
        close(g.grads[name], c.grads[name], name)
    if training:
        assert g.threshold == pytest.approx(c.threshold, rel=1e-5, abs=1e-7)


@gpu
def test_settable_weights_reach_the_device_and_bf16():
    g = MoE(16, 4, 2, plr_dim=3, sim_weight=0.1, device="cuda")
    x = np.random.default_rng(0).standard_normal((2, 8, 16)).astype(np.float32)
    g.forward(x)
    assert g.aux["sim_loss"] is not None
    g.sim_weight = 0.0
    g.forward(x)
    assert g.aux["sim_loss"] is None
    y32 = g.forward(x)
    g.precision = "bf16"
    assert g.precision == "bf16" and "bf16" in repr(g)
    y16 = g.forward(x)
    assert np.linalg.norm(y16 - y32) <= 3e-2 * np.linalg.norm(y32)
    with pytest.raises(ValueError, match="precision"):
        g.precision = "fp8"
    with pytest.raises(TypeError, match="threshold"):
        g.threshold = "high"
