"""Edges of the Python API: copies of an object that owns C state, gradient buffers that
share memory with what a kernel reads, loss weights, names with an embedded NUL, and the
one-thread-at-a-time claim being handed back on every way out of a call."""
import copy

import numpy as np
import pytest

import racedit
from racedit import _C, ops


def moe_layer(**kw):
    return racedit.MoE(8, 4, 2, seed=3, **kw)


def data(B=2, L=5, D=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, L, D)).astype(np.float32)


def tiny_model(**kw):
    return racedit.RaceDiT("RaceDiT-T/2-2in4", input_size=8, num_classes=3, **kw)


def model_inputs(B=2):
    rng = np.random.default_rng(1)
    return (rng.standard_normal((B, 4, 8, 8)).astype(np.float32), rng.uniform(0, 1000, B),
            rng.integers(0, 3, B))


# ---- copies -------------------------------------------------------------------------------

def test_moe_shallow_copy_is_refused():
    with pytest.raises(TypeError, match="shallow-copied.*deepcopy"):
        copy.copy(moe_layer())


def test_moe_deepcopy_is_independent():
    """The copy's forward must not change what the original's backward differentiates (a
    shared C state did: the original's dx came from the copy's activations)."""
    m = moe_layer(sim_weight=0.01)
    m.forward(data(seed=5))  # a threshold to copy
    m.beta = 0.5
    twin = copy.deepcopy(m)
    assert twin.threshold == m.threshold and twin.beta == 0.5 and twin.sim_weight == m.sim_weight
    np.testing.assert_array_equal(twin.param_buffer, m.param_buffer)
    reference = copy.deepcopy(m)
    x1, x2, dy = data(seed=1), data(B=3, seed=2), data(seed=4)
    m.zero_grad(), reference.zero_grad()
    m.forward(x1)
    twin.forward(x2)
    dx = m.backward(dy)
    reference.forward(x1)
    np.testing.assert_array_equal(dx, reference.backward(dy))
    np.testing.assert_array_equal(m.grad_buffer, reference.grad_buffer)
    twin.param_buffer[:] = 0
    assert np.any(m.param_buffer != 0)


def test_deepcopy_of_a_fresh_layer_needs_its_own_forward():
    twin = copy.deepcopy(moe_layer())
    with pytest.raises(RuntimeError, match="no forward"):
        twin.backward(data())


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy])
def test_model_copies_are_refused(how):
    with pytest.raises(TypeError, match="cannot be copied"):
        how(tiny_model())


# ---- buffers that share memory -------------------------------------------------------------

def test_moe_grad_buffer_must_not_be_the_param_buffer():
    m = moe_layer()
    y = m.forward(data())
    m.grad_buffer = m.param_buffer
    before = m.param_buffer.copy()
    with pytest.raises(ValueError, match="grads: must not be the params buffer"):
        m.backward(np.ones_like(y))
    np.testing.assert_array_equal(m.param_buffer, before)


def test_moe_dy_inside_the_grad_buffer_is_refused():
    m = moe_layer()
    y = m.forward(data())
    dy = m.grad_buffer[:y.size].reshape(y.shape)
    with pytest.raises(ValueError, match="grads: must not be the dy buffer"):
        m.backward(dy)


def test_model_buffers_are_the_models_own():
    """The model owns its buffers (parameters, gradients, AdamW moments, EMA: disjoint by
    construction), so none can be rebound to overlapping memory; on the CPU they are live
    views of the model's memory."""
    m = tiny_model()
    with pytest.raises(AttributeError):
        m.param_buffer = np.zeros(m.num_params(), np.float32)
    with pytest.raises(AttributeError):
        m.grad_buffer = m.param_buffer
    bufs = [m.param_buffer, m.grad_buffer, m.ema_buffer, *m.optimizer_state().values()][:5]
    assert not any(np.shares_memory(a, b) for i, a in enumerate(bufs) for b in bufs[i + 1:])
    out = m.forward(*model_inputs())
    m.param_buffer[:] = 0                       # read by the next call: every output is 0
    np.testing.assert_array_equal(m.forward(*model_inputs()), np.zeros_like(out))


# ---- loss weights and names ------------------------------------------------------------------

@pytest.mark.parametrize("config", ["RaceDiT-T/2-2in4", "DiT-S/2"])
@pytest.mark.parametrize("weight", ["sim_weight", "plr_weight", "balance_weight"])
def test_negative_model_loss_weight_is_refused_at_construction(config, weight):
    with pytest.raises(ValueError, match=f"{weight}: expected a finite float >= 0, got -1"):
        racedit.RaceDiT(config, input_size=8, **{weight: -1})


def test_negative_loss_weight_is_refused_by_the_c_core():
    with pytest.raises(ValueError, match="sim_weight >= 0, got -1"):
        _C.model_new(2, 32, 2, 2, 8, 4, 4, 3, num_experts=4, k=2, expert_hidden=64, sim_weight=-1.0)


def test_names_with_an_embedded_nul_are_refused():
    scores = np.zeros((1, 2, 4), np.float32)
    with pytest.raises(ValueError, match="strategy: expected one of"):
        ops.route(scores, 1, "race\x00")
    with pytest.raises(ValueError, match="strategy: expected one of"):
        ops.route_plan(1, 2, 4, 1, "race\x00junk")
    with pytest.raises(ValueError, match="routing: expected one of"):
        tiny_model(routing="race\x00")
    with pytest.raises(ValueError, match="gating: expected one of"):
        tiny_model(gating="softmax\x00")
    with pytest.raises(ValueError, match="strategy: expected one of"):
        _C.moe_new(dim=8, num_experts=4, expert_hidden=16, k=2, strategy="token\x00")
    with pytest.raises(TypeError, match="unknown MoE setting"):
        _C.moe_configure(moe_layer()._state, **{"beta\x00": 0.5})
    with pytest.raises(ValueError, match="mode: expected 'blas' or 'omp'"):
        _C.moe_threading("omp\x00")
    with pytest.raises(ValueError, match="order: expected 'cij' or 'ijc'"):
        _C.dit_patchify(np.zeros((1, 1, 2, 2), np.float32), 1, "ijc\x00")


# ---- the claim is handed back on every exit ---------------------------------------------------

def test_moe_state_is_released_after_every_error():
    m = moe_layer()
    x = data()
    with pytest.raises(ValueError):
        m.forward(data(D=7))
    with pytest.raises(RuntimeError, match="no forward"):
        m.backward(x)
    y = m.forward(x)
    with pytest.raises(ValueError, match="dy"):
        m.backward(np.ones((1, 1, 8), np.float32))
    with pytest.raises(TypeError):
        m.backward(np.ones(y.shape, np.int64))
    with pytest.raises(ValueError):
        _C.moe_get(m._state, "nothing")
    with pytest.raises(ValueError):
        m.threshold = float("nan")
    with pytest.raises(ValueError):
        m.beta = 2.0
    m.threshold = 0.25
    assert m.threshold == 0.25 and m.mask.shape == (2, 5, 4)
    m.backward(np.ones_like(y))


def test_model_is_released_after_every_error():
    m = tiny_model(max_batch=2)
    x, t, y = model_inputs()
    with pytest.raises(RuntimeError, match="before forward"):
        m.backward(np.ones((2, 4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="max_batch"):
        m.forward(*model_inputs(B=3))
    with pytest.raises(ValueError):
        m.forward(x[:, :2], t, y)
    out = m.forward(x, t, y)
    with pytest.raises(ValueError, match="dout"):
        m.backward(np.ones((1, 4, 8, 8), np.float32))
    with pytest.raises(IndexError):
        _C.model_threshold(m._model, 99, 0.5)
    with pytest.raises(IndexError):
        _C.model_moe_get(m._model, -1, "aux")
    with pytest.raises(ValueError, match="max_batch"):
        _C.model_reserve(m._model, 0, True)
    m.thresholds = np.full(m.num_moe_layers, 0.1, np.float32)
    m.backward(np.ones_like(out))
    assert m.branch_norms()["attn"].shape == (m.config.depth,) and m.max_batch == 2
