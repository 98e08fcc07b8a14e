"""Router-similarity loss, balance loss, PLR head and PLR loss: the float64 twins against
finite differences, the C ops against the twins (random, odd and adversarial masks), the
paper's Fig. 4 toy example, and bad input."""
import zlib

import numpy as np
import pytest
from _numerics import fd_grad

from racedit import ops, ref

ROUTER_LOSSES = ["router_similarity_loss", "balance_loss"]


def rand_mask(rng, shape, p=0.4):
    return rng.random(shape) < p


# ---- twins vs finite differences -------------------------------------------------

@pytest.mark.parametrize("name", ROUTER_LOSSES)
@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 5), (6, 2)])
def test_twin_router_loss_grad_fd(name, shape):
    rng = np.random.default_rng(1)
    R = rng.standard_normal(shape)
    mask = rand_mask(rng, shape, 0.5)
    f = getattr(ref, name)
    _, dR = f(R, mask)
    g = fd_grad(lambda r: f(r, mask)[0], R.copy())
    np.testing.assert_allclose(dR, g, rtol=1e-6, atol=1e-8)
    assert np.abs(dR).max() > 1e-4   # a nonzero gradient was checked


def test_twin_plr_grad_fd():
    rng = np.random.default_rng(2)
    N, D, Pd = 5, 3, 4
    h, wt, bt = rng.standard_normal((N, D)), rng.standard_normal((D, Pd)), rng.standard_normal(Pd)
    target = rng.standard_normal((N, Pd))

    def loss(h_, wt_, bt_):
        return ref.plr_loss(ref.plr_head_forward(h_, wt_, bt_), target)[0]

    _, dT = ref.plr_loss(ref.plr_head_forward(h, wt, bt), target)
    dh, dwt, dbt = ref.plr_head_backward(dT, h, wt)
    np.testing.assert_allclose(dh, fd_grad(lambda x: loss(x, wt, bt), h.copy()), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(dwt, fd_grad(lambda x: loss(h, x, bt), wt.copy()), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(dbt, fd_grad(lambda x: loss(h, wt, x), bt.copy()), rtol=1e-6, atol=1e-9)


# ---- C vs twin -------------------------------------------------------------------

def check_router_loss(name, R, mask, atol=2e-6):
    loss, dR = getattr(ops, name)(R.astype(np.float32), mask)
    rloss, rdR = getattr(ref, name)(R.astype(np.float32).astype(np.float64), mask)
    assert np.isfinite(loss)
    assert dR.dtype == np.float32 and dR.shape == R.shape
    np.testing.assert_allclose(loss, rloss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dR, rdR, rtol=1e-4, atol=atol)
    return loss, dR


@pytest.mark.parametrize("name", ROUTER_LOSSES)
@pytest.mark.parametrize("shape", [(1, 2), (7, 3), (13, 5), (2, 9, 7), (3, 1, 33), (33000, 8)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_router_loss_vs_twin_random(name, shape, p):
    rng = np.random.default_rng(zlib.crc32(repr((name, shape, p)).encode()))
    R = 2.0 * rng.standard_normal(shape)
    check_router_loss(name, R, rand_mask(rng, shape, p))


def adversarial_masks(N, E):
    one = np.zeros((N, E), bool)
    one[:, 0] = True                                   # all tokens to one expert
    balanced = np.zeros((N, E), bool)
    balanced[np.arange(N), np.arange(N) % E] = True    # perfectly balanced, 1 expert each
    two = balanced | np.roll(balanced, 1, axis=1)      # balanced, 2 experts each
    first_token = np.zeros((N, E), bool)
    first_token[0] = True                              # one token takes every expert
    return {
        "none": np.zeros((N, E), bool),
        "all": np.ones((N, E), bool),
        "one_expert": one,
        "balanced_1": balanced,
        "balanced_2": two,
        "first_token": first_token,
    }


@pytest.mark.parametrize("name", ROUTER_LOSSES)
@pytest.mark.parametrize("case", list(adversarial_masks(4, 4)))
@pytest.mark.parametrize("NE", [(8, 4), (9, 2), (12, 6)])
def test_router_loss_vs_twin_adversarial(name, case, NE):
    rng = np.random.default_rng(3)
    mask = adversarial_masks(*NE)[case]
    loss, dR = check_router_loss(name, 1.5 * rng.standard_normal(NE), mask)
    if case == "none":
        assert loss == 0.0 and not dR.any()


def test_similarity_uniform_weights_give_one():
    # every pair selected: W is all ones, so L_sim = (1/N) sum_t (sum_i P_ti)^2 = 1, dR = 0
    rng = np.random.default_rng(4)
    R = rng.standard_normal((11, 6)).astype(np.float32)
    loss, dR = ops.router_similarity_loss(R, np.ones((11, 6), bool))
    assert loss == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(dR, 0.0, atol=1e-6)


def test_similarity_single_expert_tokens_diagonal_only():
    # no token has two experts: off-diagonal weights 0, loss = (1/N) sum_i W_ii sum_t P_ti^2
    rng = np.random.default_rng(5)
    N, E = 10, 4
    R = rng.standard_normal((N, E))
    mask = np.zeros((N, E), bool)
    mask[np.arange(N), rng.integers(0, E, N)] = True
    load = mask.sum(0)
    P = ref.softmax(R)
    expect = (E * load / load.sum() * (P * P).sum(0)).sum() / N
    loss, _ = ops.router_similarity_loss(R.astype(np.float32), mask)
    assert loss == pytest.approx(expect, rel=1e-5)


def test_fig4_collapsed_pairs_cost_more_at_equal_balance():
    """Paper Fig. 4: 2-in-4 with perfect balance. Collapsed: every token picks {0,1} or
    {2,3} (effectively 1-in-2); diverse: all 6 pairs used equally. Router logits agree
    with each assignment. The similarity loss must prefer the diverse one; the balance
    loss cannot tell them apart."""
    E, reps = 4, 5
    pairs_collapsed = [(0, 1), (2, 3)] * 3
    pairs_diverse = [(0, 1), (2, 3), (0, 2), (1, 3), (0, 3), (1, 2)]

    def build(pairs):
        mask = np.zeros((len(pairs) * reps, E), bool)
        for t, (i, j) in enumerate(pairs * reps):
            mask[t, [i, j]] = True
        return mask, np.where(mask, 2.0, 0.0).astype(np.float32)

    mc, Rc = build(pairs_collapsed)
    md, Rd = build(pairs_diverse)
    np.testing.assert_array_equal(mc.sum(0), md.sum(0))          # equal, perfect balance
    assert ops.max_violation(mc) == 0.0 == ops.max_violation(md)
    sim_c, _ = ops.router_similarity_loss(Rc, mc)
    sim_d, _ = ops.router_similarity_loss(Rd, md)
    assert sim_c > sim_d + 0.1
    # hand values: a = e^2/(2e^2+2), b = 1/(2e^2+2); collapsed 8(a^2+b^2), diverse 1
    a, b = np.e**2 / (2 * np.e**2 + 2), 1 / (2 * np.e**2 + 2)
    assert sim_c == pytest.approx(8 * (a * a + b * b), rel=1e-5)
    assert sim_d == pytest.approx(1.0, rel=1e-5)
    bal_c, _ = ops.balance_loss(Rc, mc)
    bal_d, _ = ops.balance_loss(Rd, md)
    assert bal_c == pytest.approx(bal_d, rel=1e-6)
    # two pairs of 50 % each: the first stays below 95 %; six of 1/6 each: five do
    assert ops.combination_usage(mc) == pytest.approx(1 / 6)
    assert ops.combination_usage(md) == pytest.approx(5 / 6)


def test_similarity_gradient_step_decorrelates_collapsed_pair():
    # a small step against dR lowers the loss (the gradient points the right way)
    rng = np.random.default_rng(6)
    R = rng.standard_normal((40, 4)).astype(np.float32)
    mask = np.zeros((40, 4), bool)
    mask[:20, [0, 1]] = True
    mask[20:, [2, 3]] = True
    loss, dR = ops.router_similarity_loss(R, mask)
    loss2, _ = ops.router_similarity_loss(R - 0.5 * dR, mask)
    assert loss2 < loss


def test_router_loss_3d_equals_2d():
    rng = np.random.default_rng(7)
    R = rng.standard_normal((2, 5, 6)).astype(np.float32)
    mask = rand_mask(rng, R.shape)
    for name in ROUTER_LOSSES:
        l3, d3 = getattr(ops, name)(R, mask)
        l2, d2 = getattr(ops, name)(R.reshape(10, 6), mask.reshape(10, 6))
        assert l3 == l2
        np.testing.assert_array_equal(d3.reshape(10, 6), d2)


def test_router_loss_accepts_float64_and_noncontiguous():
    rng = np.random.default_rng(8)
    R = rng.standard_normal((6, 10))
    mask = rand_mask(rng, (6, 10))
    for name in ROUTER_LOSSES:
        l1, d1 = getattr(ops, name)(R[:, ::2], mask[:, ::2])
        l2, d2 = getattr(ops, name)(np.ascontiguousarray(R[:, ::2], np.float32),
                                    np.ascontiguousarray(mask[:, ::2]))
        assert l1 == l2
        np.testing.assert_array_equal(d1, d2)


@pytest.mark.parametrize("shape", [(1, 1), (6, 5), (17, 33)])
def test_plr_vs_twin(shape):
    rng = np.random.default_rng(9)
    N, D = shape
    Pd = 7
    h = rng.standard_normal((N, D)).astype(np.float32)
    wt = rng.standard_normal((D, Pd)).astype(np.float32)
    bt = rng.standard_normal(Pd).astype(np.float32)
    target = rng.standard_normal((N, Pd)).astype(np.float32)
    T = ops.plr_head_forward(h, wt, bt)
    np.testing.assert_allclose(T, ref.plr_head_forward(h, wt, bt), rtol=1e-5, atol=1e-5)
    loss, dT = ops.plr_loss(T, target)
    rloss, rdT = ref.plr_loss(T, target)
    assert loss == pytest.approx(rloss, rel=1e-6)
    np.testing.assert_allclose(dT, rdT, rtol=1e-6, atol=1e-8)
    for got, want in zip(ops.plr_head_backward(dT, h, wt), ref.plr_head_backward(dT, h, wt)):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_plr_loss_large_and_any_shape():
    rng = np.random.default_rng(10)
    T = rng.standard_normal((3, 300, 300)).astype(np.float32)     # past the parallel cut-off
    target = rng.standard_normal(T.shape).astype(np.float32)
    loss, dT = ops.plr_loss(T, target)
    rloss, rdT = ref.plr_loss(T, target)
    assert loss == pytest.approx(rloss, rel=1e-6)
    np.testing.assert_allclose(dT, rdT, rtol=1e-5, atol=1e-10)


# ---- bad input ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ROUTER_LOSSES)
def test_router_loss_bad_input(name):
    f = getattr(ops, name)
    R = np.zeros((4, 3), np.float32)
    m = np.zeros((4, 3), bool)
    with pytest.raises(ValueError, match="mask: expected the shape of R"):
        f(R, np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="mask: expected the shape of R"):
        f(R, np.zeros((1, 4, 3), bool))
    with pytest.raises(TypeError, match="mask: expected dtype numpy.bool"):
        f(R, m.astype(np.uint8))
    with pytest.raises(TypeError, match="mask: expected dtype numpy.bool"):
        f(R, m.astype(np.float32))
    with pytest.raises(TypeError, match="R: expected dtype"):
        f(R.astype(np.int32), m)
    with pytest.raises(TypeError, match="R: expected a numpy.ndarray"):
        f(R.tolist(), m)
    with pytest.raises(ValueError, match="E must be >= 2"):
        f(np.zeros((4, 1), np.float32), np.ones((4, 1), bool))
    with pytest.raises(ValueError, match="N must be >= 1"):
        f(np.zeros((0, 3), np.float32), np.zeros((0, 3), bool))
    with pytest.raises(ValueError, match="R: expected an \\(N, E\\) or \\(B, L, E\\)"):
        f(np.zeros(3, np.float32), np.zeros(3, bool))
    for bad in (np.nan, np.inf, -np.inf):
        Rb = R.copy()
        Rb[2, 1] = bad
        with pytest.raises(ValueError, match=r"R: non-finite logit .* at \(2, 1\)"):
            f(Rb, m)


def test_plr_bad_input():
    h = np.zeros((4, 3), np.float32)
    wt = np.zeros((3, 2), np.float32)
    bt = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="wt: expected shape"):
        ops.plr_head_forward(h, np.zeros((4, 2), np.float32), bt)
    with pytest.raises(ValueError, match="bt: expected shape"):
        ops.plr_head_forward(h, wt, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="h: expected a 2-d"):
        ops.plr_head_forward(h[None], wt, bt)
    with pytest.raises(TypeError, match="h: expected dtype"):
        ops.plr_head_forward(h.astype(np.int64), wt, bt)
    with pytest.raises(ValueError, match="plr_dim >= 1"):
        ops.plr_head_forward(h, np.zeros((3, 0), np.float32), np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="dT: expected shape"):
        ops.plr_head_backward(np.zeros((4, 3), np.float32), h, wt)
    with pytest.raises(ValueError, match="target: expected shape"):
        ops.plr_loss(np.zeros((4, 2), np.float32), np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="at least one element"):
        ops.plr_loss(np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32))
    with pytest.raises(ValueError, match="target: non-finite"):
        ops.plr_loss(np.zeros((2, 2), np.float32), np.array([[0, 1], [np.nan, 0]], np.float32))
    with pytest.raises(TypeError, match="T: expected a numpy.ndarray"):
        ops.plr_loss([1.0], np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="T: expected an array with ndim >= 1"):
        ops.plr_loss(np.array(1.0, np.float32), np.zeros(1, np.float32))


# ---- the MoE layer with its aux losses ---------------------------------------------

import racedit  # noqa: E402

AUX_NAMES = ("router_w", "router_b", "gate_w", "gate_b", "w1", "b1", "w2", "b2", "plr_w", "plr_b")


def make_aux_layer(D=6, E=5, k=2, plr_dim=3, strategy="race", gating="identity", **kw):
    kw.setdefault("sim_weight", 0.3)
    kw.setdefault("balance_weight", 0.2)
    kw.setdefault("plr_weight", 0.7)
    m = racedit.MoE(D, E, k, strategy=strategy, gating=gating, hidden=4, plr_dim=plr_dim, seed=3, **kw)
    rng = np.random.default_rng(11)
    for v in m.params.values():                      # nonzero biases everywhere
        v += 0.1 * rng.standard_normal(v.shape).astype(np.float32)
    return m


def twin_layer(x, params, mask, target, gating, weights, dy):
    """Whole-layer float64 twin with the aux losses and a fixed selection: returns
    (objective sum(y*dy) + aux total, values, dx, grads)."""
    y, cache = ref.moe_forward(x, params, lambda G: mask, gating)
    total, vals, aux_cache = ref.moe_aux_forward(cache, params, target, **weights)
    dx, grads = ref.moe_backward(dy, cache, params)
    dxa, grads_a = ref.moe_aux_backward(aux_cache, cache, params)
    for k_, v in grads_a.items():
        grads[k_] = grads.get(k_, 0.0) + v
    return float((y * dy).sum()) + total, vals, dx + dxa, grads


WEIGHTS = dict(sim_weight=0.3, balance_weight=0.2, plr_weight=0.7)


@pytest.mark.parametrize("strategy,gating", [("race", "identity"), ("token", "softmax"),
                                             ("be", "sigmoid")])
def test_moe_aux_layer_vs_twin(strategy, gating):
    m = make_aux_layer(strategy=strategy, gating=gating)
    rng = np.random.default_rng(12)
    B, L = 2, 5
    x = rng.standard_normal((B, L, m.dim)).astype(np.float32)
    target = rng.standard_normal((B, L, m.plr_dim)).astype(np.float32)
    dy = rng.standard_normal((B, L, m.dim)).astype(np.float32)
    m.zero_grad()
    m.forward(x, plr_target=target)
    aux = m.aux
    dx = m.backward(dy)
    mask = m.mask.reshape(B * L, -1)
    _, vals, rdx, rgrads = twin_layer(x, m.params, mask, target, gating, WEIGHTS, dy)
    for name in ("sim_loss", "balance_loss", "plr_loss"):
        assert aux[name] == pytest.approx(vals[name], rel=1e-5)
    want = (WEIGHTS["sim_weight"] * vals["sim_loss"] + WEIGHTS["balance_weight"] * vals["balance_loss"]
            + WEIGHTS["plr_weight"] * vals["plr_loss"])
    assert aux["aux_loss"] == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(aux["plr_pred"].reshape(B * L, -1), vals["plr_pred"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-5)
    for name in AUX_NAMES:
        np.testing.assert_allclose(m.grads[name], rgrads[name], rtol=1e-4, atol=1e-5, err_msg=name)
    # diagnostics of the layer's own selection agree with the standalone ops
    assert aux["max_violation"] == pytest.approx(ops.max_violation(m.mask))
    assert aux["combination_usage"] == pytest.approx(ops.combination_usage(m.mask))
    assert aux["dead_experts"] == ops.dead_experts(m.mask)
    np.testing.assert_array_equal(aux["expert_load"], ops.expert_load(m.mask))
    assert aux["experts_per_token"] == pytest.approx(m.mask.sum() / (B * L))
    tau = None if m.threshold is None else pytest.approx(float(np.mean(m.threshold)), rel=1e-6)
    assert aux["threshold"] == tau and aux["training"] is True     # the thresholds' mean


def test_moe_aux_twin_fd():
    """Finite differences of the whole-layer twin (aux losses on, selection fixed)."""
    rng = np.random.default_rng(13)
    B, L, D, E, He, Pd = 2, 3, 3, 4, 2, 2
    shapes = dict(router_w=(D, D), router_b=(D,), gate_w=(D, E), gate_b=(E,), w1=(E, D, He),
                  b1=(E, He), w2=(E, He, D), b2=(E, D), plr_w=(D, Pd), plr_b=(Pd,))
    params = {n: 0.5 * rng.standard_normal(s) for n, s in shapes.items()}
    x = rng.standard_normal((B, L, D))
    target = rng.standard_normal((B, L, Pd))
    dy = rng.standard_normal((B, L, D))
    mask = rng.random((B * L, E)) < 0.5
    mask[0, :2] = True                                  # at least one co-selected pair
    for gating in ("identity", "softmax"):
        _, _, dx, grads = twin_layer(x, params, mask, target, gating, WEIGHTS, dy)

        def J(p=params, x_=x):
            return twin_layer(x_, p, mask, target, gating, WEIGHTS, dy)[0]

        np.testing.assert_allclose(dx, fd_grad(lambda v: J(x_=v), x.copy()), rtol=1e-5, atol=1e-8)
        for name in ("router_w", "router_b", "gate_w", "gate_b", "plr_w", "plr_b", "w1"):
            def Jp(v, name=name):
                return J(p={**params, name: v})
            np.testing.assert_allclose(grads[name], fd_grad(Jp, params[name].copy()),
                                       rtol=1e-5, atol=1e-8, err_msg=f"{gating} {name}")


def test_moe_aux_gradient_is_additive():
    # the aux losses add exactly their twin gradient on top of the plain layer's
    rng = np.random.default_rng(14)
    plain = make_aux_layer(sim_weight=0.0, balance_weight=0.0)
    full = make_aux_layer()
    np.testing.assert_array_equal(plain.param_buffer, full.param_buffer)
    x = rng.standard_normal((3, 4, plain.dim)).astype(np.float32)
    target = rng.standard_normal((3, 4, plain.plr_dim)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    for m in (plain, full):
        m.zero_grad()
        m.forward(x)                 # no target: no PLR loss; plain has no aux loss at all
    np.testing.assert_array_equal(plain.mask, full.mask)
    dx_plain, dx_full = plain.backward(dy), full.backward(dy)
    assert plain.aux["sim_loss"] is None and plain.aux["plr_loss"] is None
    assert plain.aux["plr_pred"] is not None            # the head still predicts
    assert full.aux["plr_loss"] is None and full.aux["sim_loss"] is not None
    assert not plain.grads["plr_w"].any() and not full.grads["plr_w"].any()
    assert np.abs(dx_full - dx_plain).max() > 1e-6       # sim + balance reach x
    # a zero-weight head contributes nothing even with a target
    plain.plr_weight = 0.0
    plain.zero_grad()
    plain.forward(x, plr_target=target)
    dx0 = plain.backward(dy)
    np.testing.assert_allclose(dx0, dx_plain, rtol=1e-6, atol=1e-7)
    assert plain.aux["plr_loss"] > 0 and plain.aux["aux_loss"] == 0.0
    assert not plain.grads["plr_w"].any()


def test_moe_aux_eval_mode_skips_losses_and_head():
    m = make_aux_layer()
    rng = np.random.default_rng(15)
    x = rng.standard_normal((2, 4, m.dim)).astype(np.float32)
    target = rng.standard_normal((2, 4, m.plr_dim)).astype(np.float32)
    assert m.aux is None
    m.forward(x, plr_target=target)
    tau = m.threshold
    m.eval()
    m.forward(x, plr_target=target)
    aux = m.aux
    assert aux["training"] is False
    assert aux["sim_loss"] is None and aux["balance_loss"] is None and aux["plr_loss"] is None
    assert aux["plr_pred"] is None and aux["aux_loss"] == 0.0
    assert aux["threshold"] == tau
    np.testing.assert_array_equal(aux["expert_load"], ops.expert_load(m.mask))
    m.zero_grad()
    m.backward(np.ones_like(x))
    assert not m.grads["plr_w"].any() and not m.grads["plr_b"].any()


def test_moe_aux_collapsed_router_pays_similarity():
    # the layer-level loss sees the same Fig. 4 effect as the op: same balance, more
    # similarity when every token's pair is duplicated
    m = make_aux_layer(D=4, E=4, k=2, plr_dim=0, strategy="token")
    m.params["router_w"][...] = np.eye(4, dtype=np.float32)
    m.params["router_b"][...] = 0.0
    m.params["gate_b"][...] = 0.0
    m.params["gate_w"][...] = 4.0 * np.array([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]],
                                             np.float32)
    x = np.zeros((1, 8, 4), np.float32)
    x[0, ::2, 0] = 2.0
    x[0, 1::2, 1] = 2.0
    m.forward(x)
    collapsed = m.aux
    assert collapsed["max_violation"] == pytest.approx(0.0)
    assert collapsed["combination_usage"] == pytest.approx(1 / 6)
    assert collapsed["sim_loss"] > 1.0


def test_moe_aux_bad_input():
    m = make_aux_layer()
    x = np.zeros((2, 3, m.dim), np.float32)
    with pytest.raises(ValueError, match="plr_target: expected shape"):
        m.forward(x, plr_target=np.zeros((2, 3, m.plr_dim + 1), np.float32))
    with pytest.raises(TypeError, match="plr_target: expected a numpy.ndarray"):
        m.forward(x, plr_target=[[0.0]])
    bad = np.zeros((2, 3, m.plr_dim), np.float32)
    bad[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="target: non-finite"):
        m.forward(x, plr_target=bad)
    with pytest.raises(ValueError, match="no PLR head"):
        make_aux_layer(plr_dim=0).forward(x, plr_target=np.zeros((2, 3, 1), np.float32))
    with pytest.raises(ValueError, match="sim_weight: expected a finite float >= 0"):
        make_aux_layer(sim_weight=-0.1)
    with pytest.raises(ValueError, match="balance_weight: expected a finite float >= 0"):
        make_aux_layer(balance_weight=float("nan"))
    with pytest.raises(TypeError, match="plr_weight: expected a float"):
        make_aux_layer(plr_weight="1")
    with pytest.raises(ValueError, match="num_experts >= 2"):
        racedit.MoE(4, 1, 1, sim_weight=0.01)
    with pytest.raises(ValueError, match="plr_dim: expected >= 0"):
        make_aux_layer(plr_dim=-1)
    one = racedit.MoE(4, 1, 1)
    with pytest.raises(ValueError, match="num_experts >= 2"):
        one.balance_weight = 0.5
    with pytest.raises(ValueError, match="sim_weight: expected a finite float >= 0"):
        m.sim_weight = -1.0
    m.sim_weight = 0.05
    assert m.sim_weight == pytest.approx(0.05)
