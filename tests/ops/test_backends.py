"""One op surface for every device: each op of the table (backend.h) called through its one
binding with ``device=``, the whole model and the MoE layer on the checking backend
(``device="check"``: the CPU kernels behind a guarded pool that refuses any pointer it did
not hand out), all bit for bit the CPU's; the checker catching a host/device mix-up, an
overrun and a leak; the ``device`` argument's errors; one aux dict shape."""
import sys

import numpy as np
import pytest
from _numerics import moved

import racedit
from racedit import _C, ops, optim

CHECK = "check"


pytestmark = pytest.mark.usefixtures("clean_check_pool")


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def same(a, b):
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    else:
        np.testing.assert_array_equal(a, b)


# ---- every op on the checking backend equals the CPU ---------------------------------------
def op_cases():
    N, D, E, He, B, L, NH = 6, 8, 4, 5, 2, 3, 2
    x, R, G = rand(N, D), rand(N, E, seed=1), rand(N, E, seed=2)
    Wr, Wg, w1, w2 = rand(D, D, seed=3), rand(D, E, seed=4), rand(E, D, He, seed=5), rand(E, He, D, seed=6)
    mask = rand(N, E, seed=7) > 0
    x3, h3, rows = rand(B, L, D, seed=8), rand(B, L, D, seed=9), rand(B, 3 * D, seed=10)
    qkv = rand(B, L, 3 * D, seed=11)
    out, att = _C.dit_attention_forward(qkv, NH)
    ln, rstd = _C.dit_layernorm_forward(x)
    img = rand(B, 3, 4, 4, seed=12)
    return {
        "route": lambda d: ops.route(rand(B, L, E), 2, "race", return_tau=True, device=d),
        "route_threshold": lambda d: ops.route_threshold(R, 0.1, device=d),
        "gate": lambda d: ops.gate_forward(R, "softmax", device=d),
        "gate_backward": lambda d: ops.gate_backward(R, G, "sigmoid", device=d),
        "router": lambda d: ops.router_forward(x, Wr, x[0], Wg, R[0], device=d),
        "router_backward": lambda d: ops.router_backward(R, x, x, x, Wr, Wg, x, device=d),
        "experts": lambda d: ops.experts_forward(x, mask, G, w1, w1[:, 0], w2, w2[:, 0], device=d),
        "experts_backward": lambda d: ops.experts_backward(x, x, mask, G, w1, w1[:, 0], w2,
                                                          w2[:, 0], device=d),
        "patchify": lambda d: _C.dit_patchify(img, 2, "cij", device=d),
        "unpatchify": lambda d: _C.dit_unpatchify(rand(B, 4, 12), 3, 4, 4, 2, device=d),
        "timestep_embedding": lambda d: _C.dit_timestep_embedding(np.float32([0, 7, 999]), device=d),
        "linear": lambda d: _C.dit_linear_forward(x, Wr, x[0], device=d),
        "linear_backward": lambda d: linear_backward(x, Wr, d),
        "layernorm": lambda d: _C.dit_layernorm_forward(x, device=d),
        "layernorm_backward": lambda d: _C.dit_layernorm_backward(x, ln, rstd, x, device=d),
        "modulate": lambda d: _C.dit_modulate_forward(x3, rows, rows[::-1], device=d),
        "modulate_backward": lambda d: _C.dit_modulate_backward(x3, h3, rows, device=d),
        "gated_residual": lambda d: _C.dit_gated_residual_forward(x3, h3, rows, device=d),
        "gated_residual_backward": lambda d: _C.dit_gated_residual_backward(x3, h3, rows, device=d),
        "attention": lambda d: _C.dit_attention_forward(qkv, NH, device=d),
        "attention_backward": lambda d: _C.dit_attention_backward(out, qkv, att, NH, device=d),
        "silu": lambda d: _C.dit_silu_forward(x3, device=d),
        "silu_backward": lambda d: _C.dit_silu_backward(x3, h3, device=d),
        "gelu": lambda d: _C.dit_gelu_forward(x3, device=d),
        "gelu_backward": lambda d: _C.dit_gelu_backward(x3, h3, device=d),
        "embedding": lambda d: _C.dit_embedding_forward(np.array([2, 0, 2]), Wr, device=d),
        "embedding_backward": lambda d: embedding_backward(Wr, d),
        "adamw_step": lambda d: adamw(d),
        "grad_norm": lambda d: optim.grad_norm(x.ravel(), device=d),
        "nonfinite_index": lambda d: optim.nonfinite_index(np.float32([0, 1, np.inf]), device=d),
    }


def linear_backward(x, W, device):
    dW, db = np.ones_like(W), np.ones(W.shape[0], np.float32)   # accumulated into
    dx = _C.dit_linear_backward(x, x, W, dW, db, device=device)
    return dx, dW, db


def embedding_backward(table, device):
    dt = np.ones_like(table)
    _C.dit_embedding_backward(table[:3], np.array([1, 1, 0]), dt, device=device)
    return dt


def adamw(device):
    p, g, m, v, e = (rand(50, seed=s) for s in range(5))
    v = np.abs(v)
    optim.adamw_step(p, g, m, v, lr=1e-2, step=3, weight_decay=0.1, grad_scale=0.5, ema=e,
                     ema_decay=0.9, device=device)
    return p, m, v, e


@pytest.mark.parametrize("name", sorted(op_cases()))
def test_op_on_the_checking_backend_equals_the_cpu(name):
    f = op_cases()[name]
    same(f(CHECK), f("cpu"))


def test_device_argument():
    x = rand(2, 3)
    with pytest.raises(ValueError, match="device: expected 'cpu' or 'cuda', got 'tpu'"):
        _C.dit_layernorm_forward(x, device="tpu")
    with pytest.raises(TypeError, match="device: expected a str"):
        _C.dit_layernorm_forward(x, device=0)
    with pytest.raises(ValueError, match="device"):
        racedit.RaceDiT("DiT-T/2", input_size=8, device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        racedit.RaceDiT("DiT-T/2", input_size=8, dtype="bf16")
    assert type(racedit.RaceDiT("DiT-T/2", input_size=8, device="cpu")) is racedit.RaceDiT
    assert type(racedit.MoE(8, 4, 2)) is racedit.MoE
    with pytest.raises(ValueError, match="device"):
        racedit.MoE(8, 4, 2, device="tpu")
    with pytest.raises(ValueError, match="precision: the CPU computes in fp32 only"):
        ops.experts_forward(*op_args_experts(), precision="bf16")
    if not racedit.cuda_available():
        with pytest.raises(RuntimeError, match="CUDA not available"):
            _C.dit_layernorm_forward(x, device="cuda")
        with pytest.raises(RuntimeError, match="CUDA not available"):
            racedit.MoE(8, 4, 2, device="cuda")
        with pytest.raises(RuntimeError, match="CUDA not available"):
            racedit.RaceDiT("DiT-T/2", input_size=8, device="cuda")


def op_args_experts():
    x, mask, G = rand(3, 4), np.ones((3, 2), bool), rand(3, 2)
    return x, mask, G, rand(2, 4, 5), rand(2, 5), rand(2, 5, 4), rand(2, 4)


# ---- the whole model and the layer -------------------------------------------------------------
@pytest.mark.parametrize("config,kw", [
    ("RaceDiT-T/2-2in4", dict(routing="race", sim_weight=0.1, balance_weight=0.05)),
    ("RaceDiT-T/2-2in4", dict(routing="token", gating="softmax", learn_sigma=True)),
    ("DiT-T/2", dict()),
])
def test_model_on_the_checking_backend_equals_the_cpu(config, kw):
    S, C = 8, 4
    a = racedit.RaceDiT(config, input_size=S, num_classes=3, **kw)
    b = racedit.RaceDiT(config, input_size=S, num_classes=3, device=CHECK, **kw)
    assert b.device == CHECK and "device='check'" in repr(b)
    same(b.param_buffer, a.param_buffer)
    same(b.ema_buffer, a.ema_buffer)
    x, tgt = rand(3, C, S, S, seed=1), rand(3, C, S, S, seed=2)
    t, y = np.float32([0, 500, 999]), np.array([0, 3, 1])
    for m in (a, b):
        m.zero_grad()
        m.backward_out = m.forward(x, t, y, plr_target=tgt)
        m.backward(np.ones_like(m.backward_out))
    same(b.backward_out, a.backward_out)
    same(b.grad_buffer, a.grad_buffer)
    same(b.branch_norms()["ffn"], a.branch_norms()["ffn"])
    same(b.thresholds, a.thresholds)
    same(b.routing_masks(), a.routing_masks()) if a.num_moe_layers else None
    assert str(b.layer_stats()) == str(a.layer_stats()) and b.aux_loss() == a.aux_loss()
    same(b.infer(x, t, y), a.infer(x, t, y))
    same(b.eval().forward(x, t, y), a.eval().forward(x, t, y))
    ra = a.train().step(x, t, y, tgt, lr=1e-3, max_grad_norm=0.5, ema_decay=0.9)
    rb = b.train().step(x, t, y, tgt, lr=1e-3, max_grad_norm=0.5, ema_decay=0.9)
    assert str(ra) == str(rb) and ra["updated"]
    ra = a.optimizer_step(lr=1e-3, ema_decay=None)
    rb = b.optimizer_step(lr=1e-3, ema_decay=None)
    assert ra == rb and ra["grad_norm"] is None and ra["step"] == 2
    for get in (lambda m: m.param_buffer, lambda m: m.ema_buffer,
                lambda m: m.optimizer_state()["v"]):
        same(get(b), get(a))


def test_memory_contract():
    """CPU: the buffers are live views of the model's memory. Elsewhere: copies, and the
    setters upload."""
    cpu = racedit.RaceDiT("DiT-T/2", input_size=8, num_classes=3)
    dev = racedit.RaceDiT("DiT-T/2", input_size=8, num_classes=3, device=CHECK)
    cpu.param_buffer[:3] = 7.0
    assert np.all(cpu.param_buffer[:3] == 7.0) and cpu.params["x_embedder.proj.weight"].flat[0] == 7
    p = dev.param_buffer
    p[:3] = 7.0
    assert not np.any(dev.param_buffer[:3] == 7.0)          # a copy: the write is lost
    dev.set_param_buffer(p)
    same(dev.param_buffer[:3], np.float32([7, 7, 7]))
    st = cpu.optimizer_state()
    dev.load_optimizer_state({"m": st["m"] + 1, "v": st["v"], "step": 5})
    assert dev.optimizer_state()["step"] == 5 and np.all(dev.optimizer_state()["m"] == 1)


def test_one_aux_dict_for_the_layer_and_the_model():
    m = racedit.RaceDiT("RaceDiT-T/2-2in4", input_size=8, num_classes=3)
    layer = racedit.MoE(8, 4, 2, plr_dim=3)
    assert _C.model_moe_get(m._model, 0, "aux") is None and layer.aux is None
    m.forward(rand(2, 4, 8, 8), [1, 2], [0, 1], plr_target=rand(2, 4, 8, 8))
    layer.forward(rand(2, 5, 8), plr_target=rand(2, 5, 3))
    assert set(_C.model_moe_get(m._model, 0, "aux")) == set(layer.aux)


@pytest.mark.parametrize("name", sorted(op_cases()))
def test_op_frees_its_copies(name):
    """A call stages its arrays in the pool and frees every copy before it returns."""
    f = op_cases()[name]
    live = _C.check_pool()["live"]
    f(CHECK)
    assert _C.check_pool()["live"] == live


def test_refused_op_frees_its_copies_and_references():
    """A kernel's refusal after staging (NaN scores), a refusal while validating (a written
    buffer of the wrong layout) and a success leave no copy in the pool and no reference
    taken on an argument."""
    scores = np.zeros((2, 4, 4), np.float32)
    scores[1, 2, 3] = np.nan
    x, W, dW = rand(3, 4), rand(4, 4, seed=1), np.zeros((4, 4), np.float32)
    refs = [sys.getrefcount(a) for a in (scores, x, W, dW)]
    live = _C.check_pool()["live"]
    for _ in range(3):
        with pytest.raises(ValueError, match="NaN"):
            _C.route(scores, 1, "race", device=CHECK)
        with pytest.raises(ValueError, match="dW"):
            _C.dit_linear_backward(x, x, W, dW[:, :3], device=CHECK)
        _C.dit_linear_backward(x, x, W, dW, device=CHECK)
    assert _C.check_pool()["live"] == live
    assert [sys.getrefcount(a) for a in (scores, x, W, dW)] == refs


def test_an_array_read_and_written_by_one_call_has_one_copy():
    """The same array passed as an input and as a buffer the op writes (W as dW): one memory
    on the CPU, so one copy on the device, and the write reaches the array as on the CPU;
    nothing is left in the pool."""
    dout, inp = rand(4, 3), rand(4, 3, seed=1)
    results = {}
    for device in ("cpu", CHECK):
        W = rand(3, 3, seed=2)
        refs, live = sys.getrefcount(W), _C.check_pool()["live"]
        dinp = _C.dit_linear_backward(dout, inp, W, W, device=device)
        assert sys.getrefcount(W) == refs and _C.check_pool()["live"] == live
        results[device] = (dinp, W)
    same(results[CHECK], results["cpu"])
    np.testing.assert_allclose(results["cpu"][1], rand(3, 3, seed=2) + dout.T @ inp, rtol=1e-6)


def test_an_op_moves_only_its_arrays():
    """Staging uploads the inputs and the buffers an op accumulates into, downloads what it
    writes; a new output is zeroed on the backend (not uploaded) and the attention
    backward's scratch never crosses."""
    qkv, g = rand(2, 5, 12), rand(2, 5, 4, seed=1)
    (out, att), traffic = moved(lambda: _C.dit_attention_forward(qkv, 2, device=CHECK))
    assert traffic == ((1, qkv.nbytes), (2, out.nbytes + att.nbytes))
    dqkv, traffic = moved(lambda: _C.dit_attention_backward(g, qkv, att, 2, device=CHECK))
    assert traffic == ((3, g.nbytes + qkv.nbytes + att.nbytes), (1, dqkv.nbytes))
    same(dqkv, _C.dit_attention_backward(g, qkv, att, 2))
    x, W = rand(4, 3), rand(2, 3, seed=2)
    dout, dW, db = rand(4, 2, seed=3), np.ones_like(W), np.ones(2, np.float32)
    dx, traffic = moved(lambda: _C.dit_linear_backward(dout, x, W, dW, db, device=CHECK))
    up = dout.nbytes + x.nbytes + W.nbytes + dW.nbytes + db.nbytes
    assert traffic == ((5, up), (3, dx.nbytes + dW.nbytes + db.nbytes))
    _, traffic = moved(lambda: _C.dit_linear_backward(dout, x, W, W, device=CHECK))
    assert traffic == ((3, dout.nbytes + x.nbytes + W.nbytes), (2, dx.nbytes + W.nbytes))


def test_a_training_step_moves_only_its_batch():
    """The fused step uploads x, t, y and the target and downloads nothing (its scalars
    come back through the op table's host outputs); the aux losses and layer statistics
    read scalars only; a forward and an inference download the output alone."""
    m = racedit.RaceDiT("RaceDiT-T/2-2in4", input_size=8, num_classes=3, device=CHECK)
    x, tgt = rand(2, 4, 8, 8), rand(2, 4, 8, 8, seed=1)
    t, y = np.float32([3, 700]), np.int64([0, 2])
    batch = x.nbytes + t.nbytes + y.nbytes
    for _ in range(2):
        r, traffic = moved(lambda: m.step(x, t, y, tgt, max_grad_norm=1.0))
        assert traffic == ((4, batch + tgt.nbytes), (0, 0)) and np.isfinite(r["plr"])
    _, traffic = moved(lambda: (m.aux(), m.aux_loss(), m.layer_stats()))
    assert traffic == ((0, 0), (0, 0))
    out, traffic = moved(lambda: m.forward(x, t, y))
    assert traffic == ((3, batch), (1, out.nbytes))
    m.eval()
    out, traffic = moved(lambda: m.infer(x, t, y))
    assert traffic == ((3, batch), (1, out.nbytes))


# ---- the checker itself --------------------------------------------------------------------
def test_checker_refuses_mix_ups():
    assert "argument x is not memory of this backend" in _C.check_probe("host")
    assert "add" in _C.check_probe("host")
    assert "upload: argument host is memory of this backend" in _C.check_probe("upload")
    assert "guard bytes" in _C.check_probe("guard")
    assert _C.check_pool(reset=True)["errors"] == 1


def test_checker_sees_no_leak():
    live = _C.check_pool()["live"]
    m = racedit.RaceDiT("RaceDiT-T/2-2in4", input_size=8, num_classes=3, device=CHECK)
    m.forward(rand(2, 4, 8, 8), [1, 2], [0, 1])
    m.infer(rand(3, 4, 8, 8), [1, 2, 3], [0, 1, 2])
    assert _C.check_pool()["live"] > live
    del m
    assert _C.check_pool()["live"] == live
