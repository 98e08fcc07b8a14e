"""The bf16 twin of the CUDA model's ``dtype="bf16"`` (racedit.ref.round_bf16 and the
bf16_gemm_operands switch of the DiT twins): the rounding against hand-worked values and
torch.bfloat16 (when installed), the switch's scope, and that the switched twin is far
enough from the float64 one for the GPU tests that compare against it to tell a bf16 path
from an fp32 one. Runs without a GPU."""
import importlib.util

import numpy as np
import pytest
from _numerics import rel_err

from racedit import ref


def test_round_bf16_hand_values():
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 3 * 2**-8), 1 + 2**-8 + 2**-20, 0.0, -0.0,
                  np.inf, -np.inf, np.finfo(np.float32).max, 2.0**-130], np.float32)
    got = ref.round_bf16(x)
    want = [1.0, 1.0, 1 + 2**-6, -(1 + 2**-6), 1 + 2**-7, 0.0, -0.0, np.inf, -np.inf, np.inf,
            2.0**-130]
    np.testing.assert_array_equal(got, want)
    assert np.signbit(got[6]) and not np.signbit(got[5])
    assert got.dtype == np.float64
    assert np.isnan(ref.round_bf16(np.array([np.nan], np.float32))).all()


def test_round_bf16_is_float32_then_bf16():
    """float64 inputs go through float32 first, as the device's fp32 activations do."""
    a = np.array([1 + 2**-8 + 2**-40], np.float64)      # float32 drops 2^-40: a tie, to even
    assert ref.round_bf16(a)[0] == 1.0
    rng = np.random.default_rng(0)
    v = rng.standard_normal(10000) * np.exp(rng.uniform(-20, 20, 10000))
    r = ref.round_bf16(v)
    assert np.all(np.abs(r - v) <= 2.0**-8 * np.abs(v))   # unit roundoff of 8 significant bits
    assert np.all((r.astype(np.float32).view(np.uint32) & 0xFFFF) == 0)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_round_bf16_matches_torch():
    import torch

    rng = np.random.default_rng(1)
    v = (rng.standard_normal(100000) * np.exp(rng.uniform(-30, 30, 100000))).astype(np.float32)
    v[:3] = [np.float32(1 + 2**-8), np.float32(1 + 3 * 2**-8), np.float32(-(1 + 2**-8))]
    want = torch.from_numpy(v).to(torch.bfloat16).to(torch.float64).numpy()
    np.testing.assert_array_equal(ref.round_bf16(v), want)


def test_switch_scope_and_restore():
    rng = np.random.default_rng(2)
    x, W = rng.standard_normal((5, 7)), rng.standard_normal((3, 7))
    exact = ref.dit_linear_forward(x, W)
    np.testing.assert_array_equal(exact, x @ W.T)
    with ref.bf16_gemm_operands():
        got = ref.dit_linear_forward(x, W)
        np.testing.assert_array_equal(got, ref.round_bf16(x) @ ref.round_bf16(W).T)
        dx, dW, db = ref.dit_linear_backward(np.ones((5, 3)) / 3, x, W)
        np.testing.assert_array_equal(dx, ref.round_bf16(np.ones((5, 3)) / 3) @ ref.round_bf16(W))
        np.testing.assert_allclose(db, np.full(3, 5 / 3), rtol=1e-15)  # bias grads: unrounded
    np.testing.assert_array_equal(ref.dit_linear_forward(x, W), exact)
    with pytest.raises(RuntimeError):
        with ref.bf16_gemm_operands():
            raise RuntimeError("boom")
    np.testing.assert_array_equal(ref.dit_linear_forward(x, W), exact)


@pytest.mark.parametrize("B,L,D,NH", [(2, 5, 12, 3), (2, 64, 64, 4), (1, 256, 96, 6)])
def test_attention_twin_separates_bf16_from_fp32(B, L, D, NH):
    """The GPU test test_cuda_layers.test_attention_bf16 allows 5e-4 (relative error norm)
    against the bf16 twin; the bf16 twin sits >= 4x farther than that from the float64
    one, so an fp32 attention would fail it."""
    rng = np.random.default_rng(L + D)
    qkv = rng.standard_normal((B, L, 3 * D)).astype(np.float32)
    g = rng.standard_normal((B, L, D)).astype(np.float32)
    out, att = ref.dit_attention_forward(qkv, NH)
    dq = ref.dit_attention_backward(g, qkv, att.astype(np.float32), NH)
    with ref.bf16_gemm_operands():
        ob, ab = ref.dit_attention_forward(qkv, NH)
        dqb = ref.dit_attention_backward(g, qkv, att.astype(np.float32), NH)
    for e in (rel_err(ob, out), rel_err(dqb, dq)):
        assert 2e-3 < e < 2e-2
    assert 1e-3 < rel_err(ab, att) < 1e-2


def test_model_twin_separates_bf16_from_fp32():
    """DiT-T/2 on 8x8x4 (the GPU test's case): the bf16 twin is 0.5-3 % from float64 in
    the output and the gradients (the GPU test allows 2e-3 / 4e-3 against the bf16 twin),
    while float32 CPU arithmetic is ~1e-6 from float64."""
    from racedit import RaceDiT

    m = RaceDiT("DiT-T/2", input_size=8, in_channels=4, num_classes=5, class_dropout_prob=0.0)
    m.param_buffer[:] = np.random.default_rng(0).normal(0.0, 0.2, m.param_buffer.size)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 4, 8, 8)).astype(np.float32)
    t, y = np.array([0.0, 500.0, 999.0], np.float32), np.array([0, 3, 5])
    kw = dict(heads=m.config.heads, patch=m.config.patch)
    out, cache = ref.dit_model_forward(m.params, x, t, y, **kw)
    g = ref.dit_model_backward(np.ones_like(out), cache)
    with ref.bf16_gemm_operands():
        ob, cb = ref.dit_model_forward(m.params, x, t, y, **kw)
        gb = ref.dit_model_backward(np.ones_like(out), cb)
    names = sorted(g)
    flat = lambda d: np.concatenate([d[k].ravel() for k in names])  # noqa: E731
    assert 5e-3 < rel_err(ob, out) < 3e-2
    assert 5e-3 < rel_err(flat(gb), flat(g)) < 3e-2
    m.forward(x, t, y)
    assert rel_err(m.forward(x, t, y), out) < 1e-5
