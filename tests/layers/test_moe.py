"""racedit.MoE, the composite layer: forward and every gradient against the float64 twin
(racedit.ref.moe_forward/moe_backward fed the C layer's own selection, so the comparison
does not hinge on float32-vs-float64 near-ties), the selection itself against
racedit.ref.route on the C layer's gates (exact), the threshold, the parameter layout,
and bad input. Tolerances as in ops/test_moe_ops.py: rtol 1e-4, atol 1e-5 * max(1, |ref|).
The layer on another device against the CPU layer: the checking backend bit for bit, the
GPU within fp32 tolerances.
"""
import numpy as np
import pytest

from _numerics import GATINGS, STRATEGIES, assert_close, exact, on, route_valid

import racedit
from racedit import _C, ops, ref

NAMES = ["router_w", "router_b", "gate_w", "gate_b", "w1", "b1", "w2", "b2"]


def make(D=13, E=5, k=2, strategy="race", gating="identity", seed=0, hidden=7, **kw):
    m = racedit.MoE(D, E, k, strategy=strategy, gating=gating, seed=seed, hidden=hidden, **kw)
    rng = np.random.default_rng(seed + 100)
    for name in ["router_b", "gate_b", "b1", "b2"]:   # non-zero biases exercise their paths
        m.params[name][...] = rng.standard_normal(m.params[name].shape) * 0.1
    return m


def x_like(m, B, L, seed=1):
    return np.random.default_rng(seed).standard_normal((B, L, m.dim)).astype(np.float32)


def check_against_ref(m, x, seed=2):
    """Forward + backward of m on x against the twin given m's selection; returns y."""
    y = m.forward(x)
    mask = m.mask
    assert y.dtype == np.float32 and y.shape == x.shape
    assert mask.dtype == bool and mask.shape == x.shape[:2] + (m.num_experts,)
    yr, cache = ref.moe_forward(x, m.params, lambda G: mask, m.gating)
    assert_close(m.logits, cache["R"].reshape(mask.shape), name="logits")
    assert_close(m.gates, cache["G"].reshape(mask.shape), name="gates")
    assert_close(m.router_hidden, cache["h"].reshape(x.shape), name="h")
    assert_close(y, yr, name="y")
    assert np.array_equal(m.expert_counts, mask.reshape(-1, m.num_experts).sum(0))
    dy = np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
    m.zero_grad()
    dx = m.backward(dy)
    dxr, grads = ref.moe_backward(dy, cache, m.params)
    assert dx.dtype == np.float32 and dx.shape == x.shape
    assert_close(dx, dxr, name="dx")
    for name in NAMES:
        assert_close(m.grads[name], grads[name], name=name)
    return y


# ---- parameters and construction ----------------------------------------------------

def test_param_layout_and_init():
    D, E, k = 16, 4, 2
    m = racedit.MoE(D, E, k, seed=3)
    He = 4 * D // k
    assert m.hidden == He
    shapes = dict(router_w=(D, D), router_b=(D,), gate_w=(D, E), gate_b=(E,), w1=(E, D, He),
                  b1=(E, He), w2=(E, He, D), b2=(E, D))
    assert list(m.params) == NAMES and list(m.grads) == NAMES
    total = sum(int(np.prod(s)) for s in shapes.values())
    assert m.param_buffer.shape == (total,) and m.grad_buffer.shape == (total,)
    assert m.param_buffer.dtype == np.float32 and m.grad_buffer.dtype == np.float32
    off = 0
    for name in NAMES:
        p, g = m.params[name], m.grads[name]
        assert p.shape == shapes[name] and g.shape == shapes[name]
        assert p.dtype == np.float32 and np.shares_memory(p, m.param_buffer)
        assert np.shares_memory(g, m.grad_buffer)
        assert p.ctypes.data == m.param_buffer.ctypes.data + 4 * off
        off += p.size
    for name in ["router_b", "gate_b", "b1", "b2"]:
        assert not m.params[name].any()
    bound = np.sqrt(6 / (5 * D))                        # dense 4D MLP fans
    for name in ["w1", "w2"]:
        w = m.params[name]
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    assert np.abs(m.params["router_w"]).max() <= np.sqrt(6 / (2 * D))
    assert np.abs(m.params["gate_w"]).max() <= np.sqrt(6 / (D + E))
    assert not m.grad_buffer.any()
    same = racedit.MoE(D, E, k, seed=3)
    assert np.array_equal(same.param_buffer, m.param_buffer)
    assert not np.array_equal(racedit.MoE(D, E, k, seed=4).param_buffer, m.param_buffer)


def test_init_output_scale_matches_a_dense_mlp():
    """With unit gates and k experts per token, the step-0 experts give the output scale
    of a dense DiT MLP (width 4D, xavier-uniform) on the same input."""
    D, E, k, N = 64, 8, 2, 2048
    m = racedit.MoE(D, E, k, seed=5)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((N, D)).astype(np.float32)
    mask = np.zeros((N, E), bool)
    mask[np.arange(N)[:, None], rng.permuted(np.tile(np.arange(E), (N, 1)), axis=1)[:, :k]] = True
    p = m.params
    y = ops.experts_forward(x, mask, np.ones((N, E), np.float32), p["w1"], p["b1"], p["w2"], p["b2"])
    a = np.sqrt(6 / (5 * D))
    W1, W2 = rng.uniform(-a, a, (D, 4 * D)), rng.uniform(-a, a, (4 * D, D))
    dense = ref.moe.gelu_tanh(x @ W1) @ W2
    assert 0.8 < y.std() / dense.std() < 1.25


@pytest.mark.parametrize("kw,exc,match", [
    (dict(dim=0), ValueError, "^dim:"),
    (dict(dim=2.0), TypeError, "^dim:"),
    (dict(num_experts=0), ValueError, "^num_experts:"),
    (dict(k=-1), ValueError, "^k:"),
    (dict(k=5), ValueError, "^k:"),
    (dict(k=True), TypeError, "^k:"),
    (dict(strategy="top1"), ValueError, "^strategy:"),
    (dict(gating="relu"), ValueError, "^gating:"),
    (dict(dim=7, k=3, hidden=None), ValueError, "hidden="),   # 4*7/3 is not an integer
    (dict(k=0, hidden=None), ValueError, "hidden="),
    (dict(hidden=0), ValueError, "^hidden:"),
    (dict(beta=1.0), ValueError, "beta"),
    (dict(beta=-0.1), ValueError, "beta"),
    (dict(beta=float("nan")), ValueError, "beta"),
])
def test_constructor_bad_args(kw, exc, match):
    args = dict(dim=12, num_experts=4, k=2, hidden=5)
    args.update(kw)
    with pytest.raises(exc, match=match):
        racedit.MoE(**args)


def test_hidden_default_and_override():
    assert racedit.MoE(12, 4, 2).hidden == 24
    assert racedit.MoE(12, 4, 3).hidden == 16
    assert racedit.MoE(7, 4, 4, hidden=9).hidden == 9
    assert racedit.MoE(7, 4, 0, hidden=3).k == 0


def test_settings_repr_and_modes():
    m = make(beta=0.9, eval_topk=True)
    with pytest.raises(AttributeError):
        m.strategy = "token"                            # fixed at construction
    assert m.beta == pytest.approx(0.9) and m.eval_topk is True
    m.beta, m.eval_topk = 0.5, False
    assert m.beta == 0.5 and m.eval_topk is False
    with pytest.raises(ValueError, match="beta"):
        m.beta = 1.5
    assert m.beta == 0.5
    assert m.training and m.eval() is m and not m.training and m.train() is m and m.training
    r = repr(m)
    for part in ["dim=13", "num_experts=5", "k=2", "hidden=7", "'race'", "'identity'", "beta=0.5"]:
        assert part in r
    for attr in ["mask", "gates", "logits", "router_hidden", "expert_counts", "batch_threshold",
                 "threshold"]:
        assert getattr(m, attr) is None, attr


# ---- eval mode with a threshold (no batch top-K involved) ------------------------------

@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("D,E,B,L,hidden", [(13, 5, 2, 7, 7), (8, 1, 3, 1, 5), (16, 6, 1, 9, 24)])
def test_eval_threshold_matches_ref(gating, D, E, B, L, hidden):
    m = make(D, E, min(2, E), gating=gating, hidden=hidden).eval()
    x = x_like(m, B, L)
    G0 = ref.moe_forward(x, m.params, lambda G: np.zeros(G.shape, bool), gating)[1]["G"]
    m.threshold = float(np.quantile(G0, 0.6))            # about 40 % of the pairs
    check_against_ref(m, x)
    assert np.array_equal(m.mask, m.gates >= np.float32(m.threshold))
    assert m.threshold == pytest.approx(float(np.quantile(G0, 0.6)))   # eval leaves tau


def test_eval_idle_experts_and_tokens_without_experts():
    m = make(13, 6, 2).eval()
    x = x_like(m, 2, 9)
    m.params["gate_b"][[1, 4]] = -50.0                  # experts 1 and 4 never pass
    m.threshold = float("inf")
    m.forward(x)
    best = m.gates.max(-1).ravel()                      # each token's best gate
    lo, nxt = np.sort(best)[:2]
    m.threshold = float((lo + nxt) / 2)                 # exactly one token gets no expert
    check_against_ref(m, x)
    mask = m.mask
    assert not mask[..., [1, 4]].any()
    assert (~mask.any(-1)).sum() == 1, "one token has no expert"


def test_eval_no_pair_selected_gives_zero():
    m = make().eval()
    m.threshold = float("inf")
    x = x_like(m, 2, 3)
    y = m.forward(x)
    assert not y.any() and not m.mask.any() and m.expert_counts.sum() == 0
    dx = m.backward(np.ones_like(y))
    assert not dx.any() and not m.grad_buffer.any()


def test_threshold_property():
    m = make()
    assert m.threshold is None
    m.threshold = 0.25
    assert m.threshold == 0.25
    m.threshold = np.float32(-1.5)
    assert m.threshold == -1.5
    m.threshold = None
    assert m.threshold is None
    with pytest.raises(ValueError, match="threshold"):
        m.threshold = float("nan")
    with pytest.raises(TypeError, match="threshold"):
        m.threshold = "high"
    assert m.threshold is None


def test_grads_accumulate_and_zero_grad():
    m = make().eval()
    m.threshold = 0.0
    x = x_like(m, 2, 5)
    y = m.forward(x)
    dy = np.random.default_rng(3).standard_normal(y.shape).astype(np.float32)
    dx1 = m.backward(dy)
    g1 = m.grad_buffer.copy()
    assert g1.any()
    dx2 = m.backward(dy)
    assert np.array_equal(dx1, dx2)
    assert np.array_equal(m.grad_buffer, 2 * g1)
    m.zero_grad()
    assert not m.grad_buffer.any()


def test_params_are_live_views():
    m = make().eval()
    m.threshold = -1e30                                 # every pair selected
    x = x_like(m, 1, 4)
    y0 = m.forward(x)
    m.params["b2"][...] += 1.0
    y1 = m.forward(x)
    assert_close(y1 - y0, np.broadcast_to(m.gates.sum(-1, keepdims=True), y0.shape))


def test_state_reuse_across_sizes():
    m = make(gating="softmax").eval()
    m.threshold = 0.2
    for B, L in [(2, 3), (5, 7), (1, 1), (3, 4)]:
        check_against_ref(m, x_like(m, B, L, seed=B * 10 + L))


def test_converted_inputs():
    m = make().eval()
    m.threshold = 0.0
    x = x_like(m, 2, 6)
    y = m.forward(x)
    xw = np.zeros((2, 12, m.dim))
    xw[:, ::2] = x
    assert np.array_equal(m.forward(xw[:, ::2]), y)            # float64, strided
    dy = np.ones_like(y)
    dx = m.backward(dy)
    assert np.array_equal(m.backward(np.ones(y.shape, np.float64)), dx)


def test_private_copy_of_x_for_backward():
    m = make().eval()
    m.threshold = 0.0
    x = x_like(m, 2, 3)
    m.forward(x)
    dy = np.ones(x.shape, np.float32)
    dx = m.backward(dy)
    x[...] = 0.0                                        # the caller reuses its buffer
    m.zero_grad()
    assert np.array_equal(m.backward(dy), dx)


def test_forward_backward_bad_inputs():
    m = make().eval()
    m.threshold = 0.0
    with pytest.raises(RuntimeError, match="forward first"):
        m.backward(np.zeros((1, 1, 13), np.float32))
    x = x_like(m, 2, 3)
    with pytest.raises(TypeError, match="^x:"):
        m.forward(x.tolist())
    with pytest.raises(TypeError, match="^x:"):
        m.forward(x.astype(np.int32))
    with pytest.raises(ValueError, match="^x:"):
        m.forward(x[0])
    with pytest.raises(ValueError, match="^x:"):
        m.forward(x[..., :4])
    with pytest.raises(ValueError, match="^x:"):
        m.forward(x[:, :0])
    m.forward(x)
    with pytest.raises(ValueError, match="^dy:"):
        m.backward(np.zeros((2, 4, 13), np.float32))
    with pytest.raises(ValueError, match="^dy:"):
        m.backward(np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError, match="^dy:"):
        m.backward(np.zeros((2, 3, 13), np.int64))
    with pytest.raises(TypeError, match="^dy:"):
        m.backward([[[0.0] * 13] * 3] * 2)
    m.backward(np.zeros((2, 3, 13), np.float32))        # still usable


def test_binding_state_checks():
    """The low-level state functions validate what racedit.MoE would never pass."""
    C = racedit._C
    m = make().eval()
    m.threshold = 0.0
    x = x_like(m, 1, 2)
    with pytest.raises(TypeError, match="^state:"):
        C.moe_forward(object(), x, m.param_buffer)
    with pytest.raises(ValueError, match="^params:"):
        C.moe_forward(m._state, x, m.param_buffer[:-1], False)
    y = C.moe_forward(m._state, x, m.param_buffer, False)
    with pytest.raises(TypeError, match="^grads:"):
        C.moe_backward(m._state, y, x, m.param_buffer, m.grad_buffer.astype(np.float64))
    with pytest.raises(ValueError, match="^grads:"):
        C.moe_backward(m._state, y, x, m.param_buffer, m.grad_buffer[::2])
    with pytest.raises(ValueError, match="^x:"):
        C.moe_backward(m._state, y, x[:, :1], m.param_buffer, m.grad_buffer)
    with pytest.raises(ValueError, match="^name:"):
        C.moe_get(m._state, "everything")
    with pytest.raises(TypeError, match="unknown MoE setting"):
        C.moe_configure(m._state, colour=1)
    with pytest.raises(ValueError, match="fixed"):
        C.moe_configure(m._state, dim=14)
    with pytest.raises(ValueError, match="k"):
        C.moe_configure(m._state, k=6)
    with pytest.raises(TypeError, match="keyword"):
        C.moe_new(13)


# ---- training: batch top-K selection for every strategy ----------------------------------



@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("gating", GATINGS)
def test_training_matches_ref(strategy, gating):
    B, L, D, E, k = 2, 6, 13, 4, 2
    m = make(D, E, k, strategy=strategy, gating=gating, hidden=9)
    x = x_like(m, B, L)
    check_against_ref(m, x)
    G = m.gates
    mask, tau_b = ref.route(G, k, strategy, return_tau=True)
    assert np.array_equal(m.mask, mask), "selection differs from ref.route on the same gates"
    assert np.array_equal(m.mask, ref.moe_select(k, strategy)(G))
    _, K = ref.route_plan(B, L, E, k, strategy)
    assert m.mask.sum() == B * L * k
    assert m.batch_threshold == pytest.approx(tau_b, rel=1e-6, abs=1e-7)
    kth = ref.route_kth(G, k, strategy)[1]                  # first training forward: tau = kth
    if strategy in ("token", "expert", "le"):
        assert m.threshold is None                          # exact top-K at eval: no threshold
    else:
        np.testing.assert_allclose(m.threshold, kth if strategy != "race" else kth[0], rtol=1e-6)


@pytest.mark.parametrize("B,L,E,k", [(3, 5, 1, 1), (2, 4, 3, 3), (4, 1, 4, 2), (1, 8, 8, 1)])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_training_odd_sizes(B, L, E, k, strategy):
    m = make(13, E, k, strategy=strategy, hidden=5)
    x = x_like(m, B, L)
    if not route_valid(B, L, E, k, strategy):
        with pytest.raises(ValueError, match="integer"):
            m.forward(x)
        return
    check_against_ref(m, x)
    assert np.array_equal(m.mask, ref.route(m.gates, k, strategy))
    if k == E:
        assert m.mask.all()


def test_training_ties_deterministic():
    """Identical tokens give tied gates; the lower flat index wins, run after run."""
    m = make(13, 4, 2, strategy="race")
    x = np.repeat(x_like(m, 1, 1), 6, axis=1).reshape(2, 3, 13)
    y = check_against_ref(m, x)
    assert np.array_equal(m.mask, ref.route(m.gates, 2, "race"))
    assert np.array_equal(m.forward(x), y)


def test_training_idle_experts_and_tokens():
    m = make(13, 5, 2, strategy="race")
    m.params["gate_b"][[0, 3]] = -30.0                  # experts 0 and 3 lose every race
    m.params["gate_b"][1] = 30.0                        # expert 1 wins every token
    check_against_ref(m, x_like(m, 2, 8))
    mask = m.mask
    assert not mask[..., [0, 3]].any() and mask[..., 1].all()


def test_k_zero_selects_nothing():
    m = make(13, 4, 0, hidden=5)
    x = x_like(m, 2, 3)
    y = m.forward(x)
    assert not y.any() and not m.mask.any() and m.threshold == float("inf")
    assert not m.backward(np.ones_like(y)).any() and not m.grad_buffer.any()


def test_threshold_update_arithmetic():
    beta = 0.9
    m = make(beta=beta)
    m.forward(x_like(m, 2, 5, seed=1))
    tau1 = m.threshold
    assert tau1 == m.batch_threshold
    m.forward(x_like(m, 2, 5, seed=2))
    tb2 = m.batch_threshold
    assert tb2 != tau1
    assert m.threshold == pytest.approx(beta * tau1 + (1 - beta) * tb2, rel=1e-6)
    tau2 = m.threshold
    m.eval().forward(x_like(m, 2, 5, seed=3))            # eval leaves tau alone
    assert m.threshold == tau2 and m.batch_threshold == tb2
    m.train()
    m.threshold = None                                   # forget: restart from tau_b
    m.forward(x_like(m, 2, 5, seed=4))
    assert m.threshold == m.batch_threshold
    m.threshold = 5.0
    m.beta = 0.0                                         # beta = 0: tau follows tau_b
    m.forward(x_like(m, 2, 5, seed=5))
    assert m.threshold == m.batch_threshold


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_eval_selection(strategy):
    """Eval (docs/method.md §3): token, expert and LE choice keep their exact per-group
    top-K; BL / BE / race select G >= tau_e / tau_l / tau per pair; eval_topk keeps the
    batch top-K."""
    B, L, D, E, k = 2, 6, 13, 4, 2
    m = make(D, E, k, strategy=strategy)
    m.forward(x_like(m, B, L, seed=1))
    tau = m.threshold
    x = x_like(m, B, L, seed=2)
    m.eval()
    check_against_ref(m, x)
    G = m.gates
    if strategy in ("token", "expert", "le"):
        assert tau is None and np.array_equal(m.mask, ref.route(G, k, strategy))
    else:
        t = np.float32(tau)
        T = {"bl": lambda: t[None, None, :], "be": lambda: t[None, :, None]}
        assert np.array_equal(m.mask, G >= T.get(strategy, lambda: t)())
    assert np.array_equal(m.mask, ref.moe_select(k, strategy, tau=tau)(G))
    m.eval_topk = True
    check_against_ref(m, x)
    assert np.array_equal(m.mask, ref.route(m.gates, k, strategy))
    np.testing.assert_array_equal(m.threshold, tau)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_eval_without_threshold_routes_by_batch_topk(strategy):
    """A layer never trained (no tau) routes eval forwards by the training's batch top-K,
    setting nothing; once tau is set, BL / BE / race select G >= tau again."""
    B, L, k = 2, 6, 2
    m = make(E=4, k=k, strategy=strategy).eval()
    x = x_like(m, B, L)
    check_against_ref(m, x)
    assert np.array_equal(m.mask, ref.route(m.gates, k, strategy))
    assert m.threshold is None
    if strategy in ("token", "expert", "le"):
        with pytest.raises(ValueError, match="no threshold"):
            m.threshold = 0.0
        return
    m.threshold = {"race": 0.0, "bl": np.zeros(4), "be": np.zeros(L)}[strategy]
    m.forward(x)
    assert np.array_equal(m.mask, m.gates >= 0)


def test_token_choice_eval_needs_no_threshold():
    m = make(strategy="token").eval()
    x = x_like(m, 2, 3)
    check_against_ref(m, x)
    assert m.threshold is None and (m.mask.sum(-1) == 2).all()


def test_nan_input_raises():
    m = make()
    x = x_like(m, 2, 3)
    x[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        m.forward(x)
    with pytest.raises(RuntimeError, match="forward first"):
        m.backward(np.zeros_like(x))
    m.eval()
    m.threshold = 0.0
    with pytest.raises(ValueError, match="NaN"):
        m.forward(x)


def test_k_not_an_integer_for_the_strategy():
    m = make(13, 4, 1, strategy="expert")               # K = k*L/E = 3/4
    with pytest.raises(ValueError, match=r"K = k\*L/E .* 3/4"):
        m.forward(x_like(m, 2, 3))
    m = make(13, 4, 2, strategy="expert")
    m.forward(x_like(m, 2, 2))                           # K = 2*2/4 = 1: fine


# ---- the layer on another device against the CPU layer --------------------------------------
def pair_on(device, strategy, seed, training=True, plr_dim=3, **kw):
    """The CPU layer and one on ``device`` from the same seed (identical parameters), their
    outputs on one input (in eval after a training forward when not ``training``)."""
    kw = dict(plr_dim=plr_dim, sim_weight=0.1, balance_weight=0.05, strategy=strategy,
              seed=seed, **kw)
    c, g = racedit.MoE(16, 4, 2, **kw), racedit.MoE(16, 4, 2, device=device, **kw)
    assert g.device == device and g.precision == "fp32"
    np.testing.assert_array_equal(g.param_buffer, c.param_buffer)
    rng = np.random.default_rng(seed + 10)
    x = rng.standard_normal((3, 8, 16)).astype(np.float32)
    tgt = rng.standard_normal((3, 8, plr_dim)).astype(np.float32) if plr_dim else None
    if not training:
        c.forward(x)
        g.forward(x)
        if c.threshold is not None:  # token / expert / LE choice hold none
            g.threshold = c.threshold
        c.eval()
        g.eval()
        x = rng.standard_normal((3, 8, 16)).astype(np.float32)
    return c, g, c.forward(x, plr_target=tgt), g.forward(x, plr_target=tgt)


@pytest.mark.parametrize("device", on("check", "cuda"))
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("plr_dim", [3, 0])
def test_layer_on_a_device_matches_cpu(device, strategy, training, plr_dim):
    """The checking backend bit for bit; the GPU within fp32 tolerances (rtol 1e-3, atol
    1e-4 * max(|ref|, 1e-3)) once its masks equal the CPU's for one of five seeds. With and
    without the PLR head (plr_dim 0: empty parameters at the end of the buffer)."""
    tol = dict(rtol=0, atol=0) if exact(device) else dict(rtol=1e-3, atol=1e-4, floor=1e-3)
    for seed in range(1 if exact(device) else 5):
        c, g, yc, yg = pair_on(device, strategy, seed, training, plr_dim)
        if np.array_equal(c.mask, g.mask):
            break
    else:
        pytest.fail("masks differ for every seed")
    assert_close(yg, yc, name="y", **tol)
    for k in ("gates", "logits", "router_hidden"):
        assert_close(getattr(g, k), getattr(c, k), name=k, **tol)
    np.testing.assert_array_equal(g.expert_counts, c.expert_counts)
    ac, ag = c.aux, g.aux
    if exact(device):
        assert str(ag) == str(ac)
    for k in ("sim_loss", "balance_loss", "plr_loss"):
        assert (ag[k] is None) == (ac[k] is None), k
        if ac[k] is not None:
            assert ag[k] == pytest.approx(ac[k], rel=1e-3, abs=1e-6), k
    dy = np.random.default_rng(seed).standard_normal(yc.shape).astype(np.float32)
    assert_close(g.backward(dy), c.backward(dy), name="dx", **tol)
    for name in c.grads:
        assert_close(g.grads[name], c.grads[name], name=name, **tol)
    if exact(device):
        np.testing.assert_array_equal(g.grad_buffer, c.grad_buffer)
        np.testing.assert_array_equal(g.threshold, c.threshold)   # float, array or None
    elif training and c.threshold is not None:
        assert_close(np.asarray(g.threshold, np.float64), np.asarray(c.threshold, np.float64),
                     name="threshold", rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_settable_weights_reach_the_device_and_bf16():
    g = racedit.MoE(16, 4, 2, plr_dim=3, sim_weight=0.1, device="cuda")
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


@pytest.mark.parametrize("device", on())
@pytest.mark.parametrize("B,L,E", [(1, 1, 2), (3, 300, 8), (2, 37, 5)])
def test_sample_pairs_count_each_samples_selection(device, B, L, E):
    """moe_get "sample_pairs": the pairs the last forward selected for each sample, counted
    where the mask lives (rows longer and shorter than a GPU block), as the mask says."""
    layer = racedit.MoE(16, E, 2, strategy="race", device=device)
    assert _C.moe_get(layer._state, "sample_pairs") is None          # before any forward
    layer.forward(np.random.default_rng(B * L).standard_normal((B, L, 16)).astype(np.float32))
    mask = _C.moe_get(layer._state, "mask")
    got = _C.moe_get(layer._state, "sample_pairs")
    assert got.dtype == np.int64 and got.shape == (B,)
    np.testing.assert_array_equal(got, mask.sum(axis=(1, 2)))
