"""RaceDiT.infer, the eval-mode forward that keeps nothing for a backward: bit-identical to
forward in eval mode (dense and MoE, thresholds set or not, growing batches, learn_sigma),
the training state (activations, last forward, thresholds) untouched by it, its own arena
(max_batch does not apply, free_infer gives it back), bad input, and its peak memory against
the training forward's (in subprocesses); the same on the checking backend (device="check",
a device whose memory the host must not touch) and on the GPU (fp32 and bf16), each
against its own forward; the GPU runs are skipped without a CUDA device."""
import json
import os

import numpy as np
import pytest
from _numerics import on
from _subproc import run_python

from racedit import RaceDiT

S, C, NCLS = 8, 4, 5          # 8x8x4 input, p=2 -> L=16 tokens
CONFIGS = ["DiT-T/2", "RaceDiT-T/2-2in4"]
DEVICE_DTYPES = [pytest.param(d, t, id=f"{d}-{t}", marks=pytest.mark.gpu if d == "cuda" else ())
                 for d, t in (("cpu", "fp32"), ("check", "fp32"), ("cuda", "fp32"),
                              ("cuda", "bf16"))]


def model(config, device="cpu", **kw):
    m = RaceDiT(config, input_size=S, in_channels=C, num_classes=NCLS, device=device, **kw)
    rng = np.random.default_rng(3)
    m.set_param_buffer((0.2 * rng.standard_normal(m.num_params())).astype(np.float32))
    return m


def batch(B, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, C, S, S)).astype(np.float32)
    t = rng.uniform(0, 1000, B).astype(np.float32)
    y = rng.integers(0, NCLS + 1, B)
    return x, t, y


def eval_forward(m, x, t, y):
    was = m.training
    out = m.eval().forward(x, t, y)
    m.train(was)
    return out


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_infer_equals_eval_forward(config, learn_sigma, device, dtype):
    m = model(config, device, learn_sigma=learn_sigma, dtype=dtype)
    for B, seed in ((3, 1), (6, 2), (2, 3)):          # the arena grows, then serves a smaller batch
        x, t, y = batch(B, seed)
        out = m.infer(x, t, y)                        # MoE: no threshold yet (batch top-K)
        assert out.dtype == np.float32 and out.shape == (B, m.out_channels, S, S)
        np.testing.assert_array_equal(out, eval_forward(m, x, t, y))
    assert m.infer_batch == 6 and m.max_batch == 6
    if m.config.is_moe:                               # thresholds from a training forward
        x, t, y = batch(4, 7)
        m.train().forward(x, t, y, plr_target=x)
        assert np.isfinite(m.thresholds).all()
        for B in (4, 9):
            x, t, y = batch(B, B)
            np.testing.assert_array_equal(m.infer(x, t, y), eval_forward(m, x, t, y))
    m.free_infer()
    assert m.infer_batch == 0


def test_infer_is_eval_mode_whatever_the_mode():
    """No label dropout (class_dropout_prob 1 drops every label in training) and eval
    routing, in training mode too; the mode is left as it was."""
    m = model("RaceDiT-T/2-2in4", class_dropout_prob=1.0)
    x, t, y = batch(4)
    m.train().forward(x, t, y)                        # sets the thresholds
    taus = m.thresholds
    out = m.infer(x, t, y)
    assert m.training
    np.testing.assert_array_equal(out, eval_forward(m, x, t, y))
    np.testing.assert_array_equal(m.thresholds, taus)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("device", on())
def test_infer_leaves_the_training_state(config, device):
    """forward / infer / backward: the backward, branch norms, routing masks and layer
    stats are the last forward's, as without the infer; thresholds unchanged."""
    m = model(config, device, class_dropout_prob=0.0)
    x, t, y = batch(4)
    xi, ti, yi = batch(7, seed=5)
    dout = np.random.default_rng(9).normal(size=(4, m.out_channels, S, S)).astype(np.float32)

    def step(with_infer):
        m.zero_grad()
        out = m.forward(x, t, y, plr_target=x)
        if with_infer:
            m.infer(xi, ti, yi)
        m.backward(dout)
        return (out, m.grad_buffer.copy(), m.branch_norms(), m.routing_masks(),
                [{k: v for k, v in s.items() if k != "load"} for s in m.layer_stats()],
                m.thresholds, m.aux_loss(), m.max_batch)

    m.thresholds = np.full(m.num_moe_layers, 0.1, np.float32)
    want = step(False)
    m.thresholds = np.full(m.num_moe_layers, 0.1, np.float32)
    got = step(True)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    for k in ("attn", "ffn"):
        np.testing.assert_array_equal(got[2][k], want[2][k])
    assert len(got[3]) == len(want[3]) == m.num_moe_layers
    for a, b in zip(got[3], want[3]):
        np.testing.assert_array_equal(a, b)
    assert repr(got[4]) == repr(want[4])              # repr: NaN (losses not computed) too
    np.testing.assert_array_equal(got[5], want[5])
    assert got[6] == want[6] and got[7] == want[7] == 4
    m.zero_grad()
    m.backward(dout)                                  # a second backward still sees that forward
    np.testing.assert_array_equal(m.grad_buffer, want[1])


def test_infer_allocates_no_training_state():
    m = model("RaceDiT-T/2-2in4", max_batch=2)
    x, t, y = batch(5)                                # above max_batch: infer has its own arena
    m.infer(x, t, y)
    assert m.max_batch == 2 and m._batch()[1] == 0 and m.infer_batch == 5
    assert m.routing_masks() == [] and m.layer_stats() == []
    assert np.isnan(m.thresholds).all()
    with pytest.raises(RuntimeError, match="before forward"):
        m.backward(np.zeros((5, C, S, S), np.float32))
    with pytest.raises(RuntimeError, match="forward"):
        m.branch_norms()
    with pytest.raises(ValueError, match="max_batch"):
        m.forward(x, t, y)                            # the training arena keeps its limit


def test_free_infer():
    m = model("RaceDiT-T/2-2in4")
    x, t, y = batch(3)
    want = m.infer(x, t, y)
    m.free_infer()
    assert m.infer_batch == 0
    m.free_infer()                                    # twice: nothing to free
    np.testing.assert_array_equal(m.infer(x, t, y), want)
    assert m.infer_batch == 3


def test_infer_bad_input():
    m = model("RaceDiT-T/2-2in4")
    x, t, y = batch(2)
    with pytest.raises(ValueError, match=r"x: expected shape \(\*, 4, 8, 8\)"):
        m.infer(x[:, :3], t, y)
    with pytest.raises(ValueError, match="x: expected a batch of at least 1"):
        m.infer(x[:0], t[:0], y[:0])
    with pytest.raises(ValueError, match=r"t\[1\]=1001 outside \[0, 1000\]"):
        m.infer(x, np.array([0.0, 1001.0]), y)
    with pytest.raises(ValueError, match=r"y: labels must lie in \[0, 5\]"):
        m.infer(x, t, np.array([0, 6]))
    with pytest.raises(TypeError, match="y: expected an integer array"):
        m.infer(x, t, y.astype(np.float32))
    with pytest.raises(ValueError, match="y"):
        m.infer(x, t, y[:1])
    assert m.infer_batch == 0                         # nothing allocated by the failures


# ---- memory -------------------------------------------------------------------------------

PEAK = r"""
import json, sys
import numpy as np
from racedit.train import PRESETS, TrainConfig, build_model


def hwm_kib():  # this process's peak RSS (reset by exec, unlike ru_maxrss)
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("VmHWM:")).split()[1])


mode, B = sys.argv[1], int(sys.argv[2])
m = build_model(TrainConfig(**PRESETS["quick"]), 3, 32, 10).eval()
rng = np.random.default_rng(0)
m.param_buffer[...] = rng.normal(0.0, 0.05, m.param_buffer.size)
x = rng.normal(size=(B, 3, 32, 32)).astype(np.float32)
t = rng.uniform(0, 1000, B).astype(np.float32)
y = rng.integers(0, 11, B)
base = hwm_kib()
out = m.infer(x, t, y) if mode == "infer" else m.forward(x, t, y)
print(json.dumps({"kib": hwm_kib() - base, "sum": float(np.abs(out).sum())}))
"""


def peak_kib(mode, B):
    r = run_python(["-c", PEAK, mode, str(B)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM (Linux)")
def test_infer_peak_memory_is_a_fraction_of_the_forwards():
    """The quick preset (4 MoE blocks) at 64 images: the training forward holds every
    block's activations, the MoE layers' routing state and the backward's scratch; infer
    one block's and one routing workspace. Measured as the growth of the peak RSS in a
    fresh process (same output)."""
    fwd, inf = peak_kib("forward", 64), peak_kib("infer", 64)
    assert fwd["sum"] == inf["sum"]
    assert inf["kib"] < 0.4 * fwd["kib"], (inf, fwd)
