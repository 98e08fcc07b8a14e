"""The whole model: C (racedit.RaceDiT) against the float64 reference (racedit.ref.dit)
for the output and every parameter gradient, the reference against finite differences,
the buffer/views contract, initialisation, modes and bad inputs."""
import numpy as np
import pytest

import racedit
from racedit import RaceDiT
from racedit import ref

S, C, NCLS = 8, 4, 5          # 8x8x4 input, p=2 -> L=16 tokens


def randomise(m, seed=0, scale=0.2):
    """Random values everywhere (the DiT init zeroes adaLN, which would hide most paths)."""
    rng = np.random.default_rng(seed)
    m.param_buffer[:] = rng.normal(0.0, scale, m.param_buffer.size)


def batch(B, seed=1, channels=C, size=S):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, channels, size, size)).astype(np.float32)
    t = rng.uniform(0, 1000, B).astype(np.float32)
    t[0] = 0.0
    y = rng.integers(0, NCLS + 1, B)
    y[-1] = NCLS                                      # the null label
    return x, t, y


def compare_with_ref(m, B=3, seed=0, rtol=2e-4):
    randomise(m, seed)
    x, t, y = batch(B, seed + 1)
    out = m.forward(x, t, y)
    rout, cache = ref.dit_model_forward(m.params, x, t, y, heads=m.config.heads, patch=m.config.patch)
    scale = np.abs(rout).max()
    np.testing.assert_allclose(out, rout, rtol=0, atol=rtol * scale)
    dout = np.random.default_rng(seed + 2).normal(size=out.shape).astype(np.float32)
    m.zero_grad()
    m.backward(dout)
    G = ref.dit_model_backward(dout, cache)
    assert set(G) == set(m.grads)
    for name, g in m.grads.items():
        gs = np.abs(G[name]).max()
        np.testing.assert_allclose(g, G[name], rtol=0, atol=rtol * max(gs, 1e-3), err_msg=name)
        assert gs > 0, name                           # every parameter is reached


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_dense_matches_reference(learn_sigma):
    m = RaceDiT("DiT-T/2", input_size=S, in_channels=C, num_classes=NCLS, learn_sigma=learn_sigma,
                class_dropout_prob=0.0)
    compare_with_ref(m)


def test_dense_odd_shapes_match_reference():
    # 3 channels, patch 3 on a 9x9 image (L=9), batch 1
    cfg = racedit.configs.ModelConfig("odd", depth=1, hidden=12, heads=3, patch=3)
    m = RaceDiT(cfg, input_size=9, in_channels=3, num_classes=2, class_dropout_prob=0.0)
    randomise(m, 5)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(1, 3, 9, 9)).astype(np.float32)
    out = m.forward(x, np.array([17.0]), np.array([1]))
    rout, cache = ref.dit_model_forward(m.params, x, [17.0], [1], heads=3, patch=3)
    np.testing.assert_allclose(out, rout, atol=2e-4 * np.abs(rout).max())
    d = rng.normal(size=out.shape).astype(np.float32)
    m.backward(d)
    for k, g in ref.dit_model_backward(d, cache).items():
        np.testing.assert_allclose(m.grads[k], g, atol=2e-4 * max(np.abs(g).max(), 1e-3), err_msg=k)


def test_reference_model_finite_differences():
    m = RaceDiT("DiT-T/2", input_size=4, in_channels=2, num_classes=3)
    rng = np.random.default_rng(7)
    P = {k: rng.normal(0, 0.3, v.shape) for k, v in m.params.items()}
    x = rng.normal(size=(2, 2, 4, 4))
    t, y = np.array([3.0, 700.0]), np.array([1, 3])
    f = lambda: ref.dit_model_forward(P, x, t, y, heads=2, patch=2)[0]
    out, cache = ref.dit_model_forward(P, x, t, y, heads=2, patch=2)
    d = rng.normal(size=out.shape)
    G = ref.dit_model_backward(d, cache)
    h = 1e-6
    for name in P:
        for _ in range(2):
            i = tuple(rng.integers(0, s) for s in P[name].shape)
            old = P[name][i]
            P[name][i] = old + h
            fp = np.sum(f() * d)
            P[name][i] = old - h
            fm = np.sum(f() * d)
            P[name][i] = old
            fd = (fp - fm) / (2 * h)
            assert abs(fd - G[name][i]) <= 1e-6 + 1e-4 * abs(fd), (name, i, fd, G[name][i])


# ---- buffers, views, init ---------------------------------------------------------------------

def test_views_share_the_buffers():
    m = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS)
    assert m.param_buffer.dtype == np.float32 and m.param_buffer.ndim == 1
    offsets = [off for _, off, _ in m.layout]
    assert offsets == sorted(offsets) and offsets[0] == 0
    total = 0
    for name, off, shape in m.layout:
        assert m.params[name].shape == tuple(shape) and m.params[name].dtype == np.float32
        assert np.shares_memory(m.params[name], m.param_buffer)
        assert np.shares_memory(m.grads[name], m.grad_buffer)
        assert off == total
        total += int(np.prod(shape))
    assert total == m.param_buffer.size == m.grad_buffer.size == m.num_params()
    names = [n for n, _, _ in m.layout]
    assert names[:7] == ["x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight",
                         "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
                         "y_embedder.embedding_table.weight"]
    assert m.params["blocks.1.mlp.fc1.weight"].shape == (128, 32)
    assert m.params["final_layer.linear.weight"].shape == (2 * 2 * C, 32)


def test_buffer_is_read_on_every_call():
    m = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, class_dropout_prob=0.0)
    randomise(m, 1)
    x, t, y = batch(2)
    a = m.forward(x, t, y)
    saved = m.param_buffer.copy()
    m.param_buffer[...] = 0.5 * saved                 # e.g. swapping in EMA weights
    b = m.forward(x, t, y)
    assert not np.allclose(a, b)
    m.param_buffer[...] = saved
    np.testing.assert_array_equal(m.forward(x, t, y), a)


def test_init_follows_dit():
    m = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, seed=3)
    D = 32
    for name, v in m.params.items():
        if "adaLN_modulation" in name or name.startswith("final_layer.linear") or name.endswith("bias"):
            assert not v.any(), name
    w = m.params["blocks.0.attn.qkv.weight"]
    bound = np.sqrt(6 / (D + 3 * D))
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    w = m.params["x_embedder.proj.weight"]
    assert np.abs(w).max() <= np.sqrt(6 / (C * 4 + D))
    for name in ("y_embedder.embedding_table.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight"):
        assert 0.015 < m.params[name].std() < 0.025, name
    # adaLN-Zero: the blocks and the final layer start at zero output
    x, t, y = batch(2)
    assert not m.forward(x, t, y).any()
    same = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, seed=3)
    other = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, seed=4)
    np.testing.assert_array_equal(same.param_buffer, m.param_buffer)
    assert not np.array_equal(other.param_buffer, m.param_buffer)


# ---- gradients accumulate, modes --------------------------------------------------------------

def test_backward_accumulates_and_zero_grad():
    m = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, class_dropout_prob=0.0)
    randomise(m, 2)
    x, t, y = batch(2)
    out = m.forward(x, t, y)
    d = np.ones_like(out)
    m.backward(d)
    g1 = m.grad_buffer.copy()
    assert np.abs(g1).max() > 0
    m.backward(d)
    np.testing.assert_allclose(m.grad_buffer, 2 * g1, rtol=1e-6, atol=1e-7)
    m.zero_grad()
    assert not m.grad_buffer.any()


def test_label_dropout_in_training_only():
    m = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, class_dropout_prob=1.0)
    randomise(m, 3)
    x, t, _ = batch(3)
    y = np.array([0, 1, 2])
    null = np.full(3, NCLS)
    dropped = m.forward(x, t, y)
    np.testing.assert_array_equal(dropped, m.forward(x, t, null))
    m.eval()
    assert not m.training
    kept = m.forward(x, t, y)
    assert not np.allclose(kept, dropped)
    assert m.train() is m and m.training


def test_batch_grows_without_max_batch_and_float64_is_converted():
    m = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, class_dropout_prob=0.0)
    randomise(m, 4)
    x, t, y = batch(4)
    assert m.max_batch == 0
    small = m.forward(x[:1], t[:1], y[:1])
    assert m.max_batch == 1
    big = m.forward(x.astype(np.float64), t.astype(np.float64), y.astype(np.int32))
    assert m.max_batch == 4 and big.dtype == np.float32
    np.testing.assert_allclose(big[:1], small, rtol=1e-4, atol=1e-4)
    m.forward(x[:2], t[:2], y[:2])
    assert m.max_batch == 4
    with pytest.raises(ValueError, match=r"dout: expected shape \(2, 4, 8, 8\)"):
        m.backward(np.zeros((4, C, S, S), np.float32))
    m.backward(np.zeros((2, C, S, S), np.float32))


def test_integer_timesteps():
    m = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, class_dropout_prob=0.0)
    randomise(m, 5)
    x, _, y = batch(2)
    np.testing.assert_array_equal(m.forward(x, np.array([0, 999]), y),
                                  m.forward(x, np.array([0.0, 999.0], np.float32), y))


# ---- bad inputs --------------------------------------------------------------------------------

@pytest.fixture
def model():
    return RaceDiT("DiT-T/2", input_size=S, in_channels=C, num_classes=NCLS, max_batch=4)


def test_bad_image_size_and_channels(model):
    x, t, y = batch(2)
    with pytest.raises(ValueError, match=r"x: expected shape \(\*, 4, 8, 8\), got \(2, 4, 6, 6\)"):
        model.forward(x[:, :, :6, :6].copy(), t, y)
    with pytest.raises(ValueError, match="x: expected shape"):
        model.forward(x[:, :3].copy(), t, y)
    with pytest.raises(ValueError, match="x: expected a 4-d"):
        model.forward(x[0], t, y)


def test_bad_labels(model):
    x, t, _ = batch(2)
    with pytest.raises(ValueError, match=r"y: labels must lie in \[0, 5\]"):
        model.forward(x, t, np.array([0, NCLS + 1]))
    with pytest.raises(ValueError, match="y: labels"):
        model.forward(x, t, np.array([-1, 0]))
    with pytest.raises(TypeError, match="y"):
        model.forward(x, t, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"y: expected shape \(2,\)"):
        model.forward(x, t, np.array([0, 1, 2]))


def test_bad_timesteps(model):
    x, _, y = batch(2)
    for bad in ([-1.0, 0.0], [0.0, 1000.5], [np.nan, 1.0], [0.0, np.inf]):
        with pytest.raises(ValueError, match=r"t\[\d\]=.* outside \[0, 1000\]"):
            model.forward(x, np.array(bad, np.float32), y)
    with pytest.raises(TypeError, match="t"):
        model.forward(x, np.array([True, False]), y)
    with pytest.raises(ValueError, match=r"t: expected shape \(2,\)"):
        model.forward(x, np.array([1.0]), y)


def test_batch_larger_than_max_batch(model):
    x, t, y = batch(5)
    with pytest.raises(ValueError, match="batch 5 exceeds max_batch=4"):
        model.forward(x, t, y)
    model.forward(x[:4], t[:4], y[:4])                # the limit itself is fine
    with pytest.raises(ValueError, match="max_batch"):
        RaceDiT("DiT-T/2", input_size=S, max_batch=0)


def test_wrong_dtypes(model):
    x, t, y = batch(2)
    with pytest.raises(TypeError, match="x: expected dtype numpy.float32"):
        model.forward(x.astype(np.int32), t, y)
    with pytest.raises(TypeError, match="t: expected"):
        model.forward(x, t.astype(np.complex64), y)
    with pytest.raises(TypeError, match="plr_target"):
        model.forward(x, t, y, plr_target=np.zeros(x.shape, np.int32))
    model.forward(x, t, y)
    with pytest.raises(TypeError, match="dout"):
        model.backward(np.zeros((2, C, S, S), np.int64))


def test_backward_before_forward(model):
    with pytest.raises(RuntimeError, match="backward called before forward"):
        model.backward(np.zeros((1, C, S, S), np.float32))


def test_bad_buffers(model):
    x, t, y = batch(2)
    model.forward(x, t, y)
    model.grad_buffer = np.zeros(model.param_buffer.size, np.float64)
    with pytest.raises(TypeError, match="grads"):
        model.backward(np.zeros((2, C, S, S), np.float32))
    model.grad_buffer = model.param_buffer
    with pytest.raises(ValueError, match="grads: must not be the params buffer"):
        model.backward(np.zeros((2, C, S, S), np.float32))
    model.param_buffer = model.param_buffer[:-1]
    with pytest.raises(ValueError, match="params: expected a contiguous 1-d float32"):
        model.forward(x, t, y)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="config"):
        RaceDiT("DiT-Z/2")
    with pytest.raises(ValueError, match="input_size 9 is not a multiple of patch 2"):
        RaceDiT("DiT-T/2", input_size=9)
    with pytest.raises(ValueError, match="routing"):
        RaceDiT("DiT-T/2", input_size=8, routing="fastest")
    with pytest.raises(ValueError, match="gating"):
        RaceDiT("DiT-T/2", input_size=8, gating="relu")
    with pytest.raises(ValueError, match="class_dropout_prob"):
        RaceDiT("DiT-T/2", input_size=8, class_dropout_prob=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        RaceDiT("DiT-T/2", input_size=8, num_classes=0)


# ---- DiT state dicts --------------------------------------------------------------------------

def test_load_dit_state_dict_roundtrip_and_errors():
    a = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, learn_sigma=True, class_dropout_prob=0.0)
    randomise(a, 6)
    sd = a.state_dict()
    sd["pos_embed"] = racedit._C.dit_pos_embed(4, 4, 32)[None]
    b = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, learn_sigma=True, seed=9, class_dropout_prob=0.0)
    b.load_dit_state_dict({k: v.astype(np.float64) for k, v in sd.items()})
    np.testing.assert_array_equal(a.param_buffer, b.param_buffer)
    x, t, y = batch(2)
    np.testing.assert_array_equal(a.forward(x, t, y), b.forward(x, t, y))
    missing = dict(sd)
    del missing["blocks.1.attn.proj.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.attn.proj.bias'\]"):
        b.load_dit_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks.2.attn.proj.bias'\]"):
        b.load_dit_state_dict({**sd, "blocks.2.attn.proj.bias": np.zeros(32)})
    wrong = {**sd, "blocks.0.attn.qkv.weight": np.zeros((32, 96))}
    with pytest.raises(ValueError, match=r"blocks.0.attn.qkv.weight: expected shape \(96, 32\)"):
        b.load_dit_state_dict(wrong)
    with pytest.raises(ValueError, match="pos_embed"):
        b.load_dit_state_dict({**sd, "pos_embed": np.zeros((1, 16, 32))})
    c = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, learn_sigma=False)
    with pytest.raises(ValueError, match="learn_sigma"):
        c.load_dit_state_dict(sd)
    np.testing.assert_array_equal(b.param_buffer, a.param_buffer)   # failed loads change nothing
