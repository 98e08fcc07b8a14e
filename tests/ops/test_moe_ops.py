"""The MoE block's ops (gating, router MLP, dropless experts): the float64 twins against
central finite differences, the C ops against the twins over odd sizes and edge cases,
and bad input for every function; the ops on every device (the checking backend, the GPU)
against the CPU's and the twins within the fp32 tolerances of a GPU (rtol 2e-4 or 1e-5,
atol 2e-5 or 1e-6 times max(1, max|reference|)).

Tolerances: the C ops run in float32 and are compared with the float64 twins with
rtol = 1e-4 and atol = 1e-5 * max(1, max|reference|) (float32 GEMM sums over at most a
few hundred terms at these sizes, ~1e-6 relative; GELU/exp in float32 ~1e-7). The twins
are checked against finite differences in float64 with rtol = 1e-6, atol = 1e-8
(central differences with step 1e-6 on O(1) values).
"""
import numpy as np
import pytest

from _numerics import GATINGS, assert_close, experts_case, gpu_close, numgrad, on

import racedit
from racedit import ops, ref

def f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def expert_params(rng, E, D, He, scale=0.5):
    return (f32(rng, E, D, He, scale=scale), f32(rng, E, He, scale=0.3),
            f32(rng, E, He, D, scale=scale), f32(rng, E, D, scale=0.3))


# ---- the twins against finite differences ------------------------------------------

@pytest.mark.parametrize("gating", GATINGS)
def test_ref_gate_grad_fd(gating):
    rng = np.random.default_rng(1)
    R = rng.standard_normal((4, 5)) * 2
    W = rng.standard_normal((4, 5))
    g = numgrad(lambda: float((ref.gate_forward(R, gating) * W).sum()), [R], 0)
    np.testing.assert_allclose(ref.gate_backward(W, ref.gate_forward(R, gating), gating), g,
                               rtol=1e-6, atol=1e-8)


def test_ref_router_grad_fd():
    rng = np.random.default_rng(2)
    N, D, E = 5, 4, 3
    arrs = [rng.standard_normal(s) for s in [(N, D), (D, D), (D,), (D, E), (E,)]]
    dR, dh_extra = rng.standard_normal((N, E)), rng.standard_normal((N, D))

    def loss():
        _, h, R = ref.router_forward(*arrs)
        return float((R * dR).sum() + (h * dh_extra).sum())

    hpre, h, _ = ref.router_forward(*arrs)
    dx, dWr, dbr, dWg, dbg = ref.router_backward(dR, hpre, h, arrs[0], arrs[1], arrs[3], dh_extra)
    for i, got in enumerate([dx, dWr, dbr, dWg, dbg]):
        np.testing.assert_allclose(got, numgrad(loss, arrs, i), rtol=1e-6, atol=1e-8,
                                   err_msg=f"router arg {i}")


def test_ref_experts_grad_fd():
    rng = np.random.default_rng(3)
    N, D, E, He = 5, 4, 3, 6
    mask = rng.random((N, E)) < 0.5
    mask[0] = False                      # a token with no expert
    mask[:, 1] = False                   # an expert with no token
    mask[1, 0] = True
    arrs = [rng.standard_normal((N, D)), rng.standard_normal((N, E)),
            rng.standard_normal((E, D, He)), rng.standard_normal((E, He)),
            rng.standard_normal((E, He, D)), rng.standard_normal((E, D))]
    dy = rng.standard_normal((N, D))

    def loss():
        x, G, w1, b1, w2, b2 = arrs
        return float((ref.experts_forward(x, mask, G, w1, b1, w2, b2) * dy).sum())

    x, G, w1, b1, w2, b2 = arrs
    dx, dG, dw1, db1, dw2, db2 = ref.experts_backward(dy, x, mask, G, w1, b1, w2, b2)
    for i, got in zip(range(6), [dx, dG, dw1, db1, dw2, db2]):
        np.testing.assert_allclose(got, numgrad(loss, arrs, i), rtol=1e-6, atol=1e-8,
                                   err_msg=f"experts arg {i}")
    assert np.all(dG[~mask] == 0)


@pytest.mark.parametrize("gating", GATINGS)
def test_ref_moe_composite_grad_fd(gating):
    rng = np.random.default_rng(4)
    B, L, D, E, He = 2, 3, 4, 3, 5
    mask = rng.random((B, L, E)) < 0.5
    names = ["router_w", "router_b", "gate_w", "gate_b", "w1", "b1", "w2", "b2"]
    shapes = [(D, D), (D,), (D, E), (E,), (E, D, He), (E, He), (E, He, D), (E, D)]
    arrs = [rng.standard_normal((B, L, D))] + [rng.standard_normal(s) * 0.7 for s in shapes]
    dy = rng.standard_normal((B, L, D))

    def run():
        return ref.moe_forward(arrs[0], dict(zip(names, arrs[1:])), lambda G: mask, gating)

    def loss():
        return float((run()[0] * dy).sum())

    _, cache = run()
    dx, grads = ref.moe_backward(dy, cache, dict(zip(names, arrs[1:])))
    np.testing.assert_allclose(dx, numgrad(loss, arrs, 0), rtol=1e-6, atol=1e-8)
    for i, n in enumerate(names, start=1):
        np.testing.assert_allclose(grads[n], numgrad(loss, arrs, i), rtol=1e-6, atol=1e-8,
                                   err_msg=n)


# ---- C against the twins ---------------------------------------------------------------

@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("N,E", [(1, 1), (7, 5), (64, 33)])
def test_gate_matches_ref(gating, N, E):
    rng = np.random.default_rng(N * 100 + E)
    R = f32(rng, N, E, scale=3)
    R[0, 0] = 80.0                          # exp overflow territory: must stay finite
    if E > 1:
        R[-1, -1] = -80.0
    G = ops.gate_forward(R, gating)
    assert G.dtype == np.float32 and G.shape == (N, E) and np.isfinite(G).all()
    Gr = ref.gate_forward(R, gating)
    assert_close(G, Gr)
    dG = f32(rng, N, E)
    assert_close(ops.gate_backward(dG, G, gating), ref.gate_backward(dG, Gr, gating))


@pytest.mark.parametrize("N,D,E", [(1, 1, 1), (7, 13, 5), (33, 24, 16)])
@pytest.mark.parametrize("extra", [False, True])
def test_router_matches_ref(N, D, E, extra):
    rng = np.random.default_rng(N + D + E)
    x, Wr, br = f32(rng, N, D), f32(rng, D, D, scale=D ** -0.5), f32(rng, D, scale=0.1)
    Wg, bg = f32(rng, D, E, scale=D ** -0.5), f32(rng, E, scale=0.1)
    got = ops.router_forward(x, Wr, br, Wg, bg)
    want = ref.router_forward(x, Wr, br, Wg, bg)
    for g, w, n in zip(got, want, ["hpre", "h", "R"]):
        assert g.dtype == np.float32 and g.shape == w.shape
        assert_close(g, w, name=n)
    dR = f32(rng, N, E)
    dh_extra = f32(rng, N, D) if extra else None
    got = ops.router_backward(dR, got[0], got[1], x, Wr, Wg, dh_extra)
    want = ref.router_backward(dR, want[0], want[1], x, Wr, Wg, dh_extra)
    for g, w, n in zip(got, want, ["dx", "dWr", "dbr", "dWg", "dbg"]):
        assert g.dtype == np.float32 and g.shape == w.shape
        assert_close(g, w, name=n)


def check_experts(mask, rng, D, He, G=None):
    N, E = mask.shape
    x = f32(rng, N, D)
    G = f32(rng, N, E) if G is None else G
    w = expert_params(rng, E, D, He, scale=(D ** -0.5))
    y = ops.experts_forward(x, mask, G, *w)
    assert y.dtype == np.float32 and y.shape == (N, D)
    assert_close(y, ref.experts_forward(x, mask, G, *w), name="y")
    dy = f32(rng, N, D)
    got = ops.experts_backward(dy, x, mask, G, *w)
    want = ref.experts_backward(dy, x, mask, G, *w)
    for g, wv, n in zip(got, want, ["dx", "dG", "dw1", "db1", "dw2", "db2"]):
        assert g.dtype == np.float32 and g.shape == wv.shape, n
        assert_close(g, wv, name=n)
    assert np.all(got[1][~mask] == 0), "dG must be exactly 0 off the mask"
    notok = ~mask.any(1)
    assert np.all(y[notok] == 0) and np.all(got[0][notok] == 0), "tokens with no expert"
    idle = ~mask.any(0)
    for g in got[2:]:
        assert np.all(g[idle] == 0), "experts with no token get no gradient"
    return y, got


@pytest.mark.parametrize("N,D,E,He,p", [
    (1, 1, 1, 1, 1.0),        # smallest
    (9, 13, 1, 7, 1.0),       # E = 1, k = E
    (10, 13, 4, 11, 1.0),     # every expert on every token (k = E)
    (23, 13, 5, 9, 0.35),     # D not a multiple of 8
    (150, 24, 8, 40, 0.25),   # many rows per expert
    (120, 70, 3, 100, 0.5),   # row blocks split inside an expert (omp threading)
])
def test_experts_match_ref(N, D, E, He, p):
    rng = np.random.default_rng(N * 7 + E)
    check_experts(rng.random((N, E)) < p, rng, D, He)


def test_experts_idle_experts_and_tokens():
    rng = np.random.default_rng(5)
    N, D, E, He = 17, 13, 6, 10
    mask = rng.random((N, E)) < 0.5
    mask[:, [0, 3]] = False        # experts 0 and 3 get no token
    mask[[2, 5, 11]] = False       # tokens 2, 5, 11 get no expert
    mask[7] = True                 # token 7 gets every other expert
    mask[7, [0, 3]] = False
    check_experts(mask, rng, D, He)


def test_experts_empty_and_one_expert_takes_all():
    rng = np.random.default_rng(6)
    N, D, E, He = 12, 13, 4, 6
    y, got = check_experts(np.zeros((N, E), bool), rng, D, He)
    assert not y.any() and not any(g.any() for g in got)
    mask = np.zeros((N, E), bool)
    mask[:, 2] = True
    check_experts(mask, rng, D, He)


def test_experts_deterministic_and_threading_modes():
    rng = np.random.default_rng(7)
    N, D, E, He = 200, 16, 6, 24
    mask = rng.random((N, E)) < 0.3
    x, G = f32(rng, N, D), f32(rng, N, E)
    w = expert_params(rng, E, D, He, scale=0.25)
    dy = f32(rng, N, D)
    a = ops.experts_backward(dy, x, mask, G, *w)
    b = ops.experts_backward(dy, x, mask, G, *w)
    for u, v in zip(a, b):
        assert np.array_equal(u, v)
    old = ops.moe_threading()
    omp = racedit.build_info()["openmp"]
    try:
        for mode in ["blas", "omp"]:
            ops.moe_threading(mode)
            assert ops.moe_threading() == (mode if omp else "blas")
            assert_close(ops.experts_forward(x, mask, G, *w), ref.experts_forward(x, mask, G, *w))
            for u, v in zip(ops.experts_backward(dy, x, mask, G, *w),
                            ref.experts_backward(dy, x, mask, G, *w)):
                assert_close(u, v)
    finally:
        ops.moe_threading(old)
    assert ops.moe_threading() == old


def test_converted_inputs_give_the_same_result():
    """float64 and non-contiguous inputs are converted to contiguous float32."""
    rng = np.random.default_rng(8)
    N, D, E, He = 9, 5, 3, 4
    x, G, mask = f32(rng, N, D), f32(rng, N, E), rng.random((N, E)) < 0.5
    w = expert_params(rng, E, D, He)
    y = ops.experts_forward(x, mask, G, *w)
    xw = np.zeros((N, 2 * D), np.float32)
    xw[:, ::2] = x
    Gf = np.asfortranarray(G.astype(np.float64))
    assert np.array_equal(ops.experts_forward(xw[:, ::2], mask, Gf, *w), y)
    R = f32(rng, N, E)
    assert np.array_equal(ops.gate_forward(R[::-1].astype(np.float64), "softmax"),
                          ops.gate_forward(np.ascontiguousarray(R[::-1]), "softmax"))


def test_gelu_accuracy():
    """The vectorised GELUs of the C core against float64, isolated: with identity
    weights the products are exact, so h = GELU_erf(x) in the router and
    y = GELU_tanh(x) in the experts; backward with unit upstream gradients gives the
    derivatives. Relative precision holds in the negative tails too (no 1 + erf / 1 + tanh
    cancellation): rtol 1e-5 on values, 1e-5 plus atol 1e-6 on derivatives (they cross 0)."""
    x = np.concatenate([np.linspace(-9, 9, 3001), [-1e-3, 1e-3, 0.0]]).astype(np.float32)
    n = x.size
    xs = x.reshape(n, 1)
    one = np.ones((1, 1), np.float32)
    zero = np.zeros(1, np.float32)
    hpre, h, _ = ops.router_forward(xs, one, zero, one, zero)
    assert np.array_equal(hpre, xs)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(h[:, 0], ref.moe.gelu_erf(x64), rtol=1e-5, atol=1e-38)
    dx = ops.router_backward(np.ones((n, 1), np.float32), hpre, h, xs, one, one)[0]
    np.testing.assert_allclose(dx[:, 0], ref.moe.gelu_erf_grad(x64), rtol=1e-5, atol=1e-6)

    xt = x[np.abs(x) <= 6].reshape(-1, 1)             # exp(-2|u|) keeps 1e-5 up to |x| = 6
    m = xt.shape[0]
    eye, zb = np.ones((1, 1, 1), np.float32), np.zeros((1, 1), np.float32)
    mask, G = np.ones((m, 1), bool), np.ones((m, 1), np.float32)
    y = ops.experts_forward(xt, mask, G, eye, zb, eye, zb)
    np.testing.assert_allclose(y[:, 0], ref.moe.gelu_tanh(xt[:, 0].astype(np.float64)),
                               rtol=1e-5, atol=1e-38)
    dxt = ops.experts_backward(np.ones((m, 1), np.float32), xt, mask, G, eye, zb, eye, zb)[0]
    np.testing.assert_allclose(dxt[:, 0], ref.moe.gelu_tanh_grad(xt[:, 0].astype(np.float64)),
                               rtol=1e-5, atol=1e-6)


# ---- bad input ---------------------------------------------------------------------------

def _router_args(rng, N=4, D=3, E=2):
    return [f32(rng, N, D), f32(rng, D, D), f32(rng, D), f32(rng, D, E), f32(rng, E)]


def _expert_args(rng, N=4, D=3, E=2, He=5):
    return [f32(rng, N, D), rng.random((N, E)) < 0.5, f32(rng, N, E), *expert_params(rng, E, D, He)]


# ---- every device (fp32 tolerances of a GPU: cuBLAS vs the CPU BLAS) ----------------------------

@pytest.mark.parametrize("device", on("check", "cuda"))
@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("N,E", [(1, 1), (7, 5), (33, 40), (300, 8)])
def test_gate_on_matches_cpu(device, gating, N, E):
    rng = np.random.default_rng(N * E)
    R = (3 * rng.standard_normal((N, E))).astype(np.float32)
    dG = rng.standard_normal((N, E)).astype(np.float32)
    G = ops.gate_forward(R, gating, device=device)
    gpu_close(G, ops.gate_forward(R, gating), 1e-5, 1e-6, "G")
    gpu_close(ops.gate_backward(dG, G, gating, device=device), ops.gate_backward(dG, G, gating),
              1e-5, 1e-6, "dR")


@pytest.mark.parametrize("device", on())
@pytest.mark.parametrize("N,D,E", [(1, 1, 1), (9, 13, 5), (64, 48, 8)])
def test_router_on_matches_twin(device, N, D, E):
    rng = np.random.default_rng(N + D + E)
    x = rng.standard_normal((N, D)).astype(np.float32)
    Wr = (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
    br = rng.standard_normal(D).astype(np.float32)
    Wg = (rng.standard_normal((D, E)) / np.sqrt(D)).astype(np.float32)
    bg = rng.standard_normal(E).astype(np.float32)
    hpre, h, R = ops.router_forward(x, Wr, br, Wg, bg, device=device)
    rh, rhh, rR = ref.router_forward(x, Wr, br, Wg, bg)
    gpu_close(hpre, rh, what="hpre")
    gpu_close(h, rhh, what="h")
    gpu_close(R, rR, what="R")
    dR = rng.standard_normal((N, E)).astype(np.float32)
    extra = rng.standard_normal((N, D)).astype(np.float32)
    for dh_extra in (None, extra):
        got = ops.router_backward(dR, hpre, h, x, Wr, Wg, dh_extra, device=device)
        want = ref.router_backward(dR, rh, rhh, x, Wr, Wg, dh_extra)
        for name, g, w in zip(("dx", "dWr", "dbr", "dWg", "dbg"), got, want):
            gpu_close(g, w, what=name)


@pytest.mark.parametrize("device", on("check", "cuda"))
def test_experts_on_match_cpu_op(device):
    dy, *args = experts_case(200, 32, 8, 48, 11)
    gpu_close(ops.experts_forward(*args, device=device), ops.experts_forward(*args), what="y")
    for name, g, w in zip(("dx", "dG", "dw1", "db1", "dw2", "db2"),
                          ops.experts_backward(dy, *args, device=device),
                          ops.experts_backward(dy, *args)):
        gpu_close(g, w, what=name)


@pytest.mark.parametrize("device", on())
@pytest.mark.parametrize("case", ["all", "none"])
def test_experts_on_all_or_no_pairs(device, case):
    dy, x, mask, *rest = experts_case(40, 16, 4, 8, 5)
    mask = np.full_like(mask, case == "all")
    gpu_close(ops.experts_forward(x, mask, *rest, device=device),
              ref.experts_forward(x, mask, *rest), what="y")
    for g, w in zip(ops.experts_backward(dy, x, mask, *rest, device=device),
                    ref.experts_backward(dy, x, mask, *rest)):
        gpu_close(g, w)


def test_gate_bad_inputs():
    rng = np.random.default_rng(9)
    R = f32(rng, 3, 4)
    with pytest.raises(ValueError, match="^gating:"):
        ops.gate_forward(R, "relu")
    with pytest.raises(TypeError, match="^gating:"):
        ops.gate_forward(R, 1)
    with pytest.raises(TypeError, match="^R:"):
        ops.gate_forward(R.astype(np.int32))
    with pytest.raises(TypeError, match="^R:"):
        ops.gate_forward(R.tolist())
    with pytest.raises(ValueError, match="^R:"):
        ops.gate_forward(R[0])
    with pytest.raises(ValueError, match="^R:"):
        ops.gate_forward(np.zeros((3, 0), np.float32))
    with pytest.raises(ValueError, match="^dG:"):
        ops.gate_backward(R[:2], R, "softmax")
    with pytest.raises(TypeError, match="^dG:"):
        ops.gate_backward(R.astype(np.int64), R)
    with pytest.raises(ValueError, match="^gating:"):
        ops.gate_backward(R, R, "tanh")


@pytest.mark.parametrize("i,bad,exc", [
    (0, lambda a: a.astype(np.int32), TypeError),
    (0, lambda a: a[None], ValueError),
    (1, lambda a: a[:, :2], ValueError),
    (2, lambda a: a[:2], ValueError),
    (3, lambda a: a[:2], ValueError),
    (3, lambda a: a.astype(np.complex64), TypeError),
    (4, lambda a: np.zeros(7, np.float32), ValueError),
    (4, lambda a: "bg", TypeError),
])
def test_router_forward_bad_inputs(i, bad, exc):
    args = _router_args(np.random.default_rng(10))
    names = ["x", "Wr", "br", "Wg", "bg"]
    args[i] = bad(args[i])
    with pytest.raises(exc, match=f"^{names[i]}:"):
        ops.router_forward(*args)


def test_router_backward_bad_inputs():
    rng = np.random.default_rng(11)
    x, Wr, br, Wg, bg = _router_args(rng)
    hpre, h, R = ops.router_forward(x, Wr, br, Wg, bg)
    good = dict(dR=R, hpre=hpre, h=h, x=x, Wr=Wr, Wg=Wg)
    for name in good:
        for bad, exc in [(good[name][None], ValueError), (good[name].astype(np.int16), TypeError)]:
            kw = dict(good)
            kw[name] = bad
            with pytest.raises(exc, match=f"^{name}:"):
                ops.router_backward(**kw)
    with pytest.raises(ValueError, match="^dh_extra:"):
        ops.router_backward(**good, dh_extra=h[:1])
    # x sets N and D, Wg sets E: a disagreement is reported on the first other array
    for name, other, reported in [("hpre", "x", "dR"), ("dR", "Wg", "dR")]:
        kw = dict(good)
        kw[name] = good[name][:, :1]
        with pytest.raises(ValueError, match=f"^{name}:"):
            ops.router_backward(**kw)
        kw = dict(good)
        kw[other] = good[other][:1] if other == "x" else good[other][:, :1]
        with pytest.raises(ValueError, match=f"^{reported}:"):
            ops.router_backward(**kw)


@pytest.mark.parametrize("fn", ["forward", "backward"])
def test_experts_bad_inputs(fn):
    rng = np.random.default_rng(12)
    names = ["x", "mask", "G", "w1", "b1", "w2", "b2"]
    good = _expert_args(rng)
    call = ops.experts_forward if fn == "forward" else (
        lambda *a: ops.experts_backward(np.zeros_like(good[0]), *a))
    cases = [
        (0, good[0][None], ValueError),
        (0, good[0].astype(np.int32), TypeError),
        (0, good[0][:, :2], ValueError, "w1"),     # x sets D: w1 disagrees
        (0, good[0][:2], ValueError, "mask"),      # x sets N: mask disagrees
        (1, good[1].astype(np.uint8), TypeError),  # mask must be bool
        (1, good[1].astype(np.float32), TypeError),
        (1, good[1][:3], ValueError),
        (2, good[2][:, :1], ValueError),
        (3, good[3][None], ValueError),
        (3, np.zeros((2, 3, 0), np.float32), ValueError),
        (4, good[4][:, :2], ValueError),
        (5, good[5].transpose(0, 2, 1), ValueError),
        (6, good[6][:1], ValueError),
        (6, [[0.0]], TypeError),
    ]
    for i, bad, exc, *named in cases:
        args = list(good)
        args[i] = bad
        with pytest.raises(exc, match=f"^{named[0] if named else names[i]}:"):
            call(*args)
    if fn == "backward":
        with pytest.raises(ValueError, match="^dy:"):
            ops.experts_backward(good[0][:2], *good)
        with pytest.raises(TypeError, match="^dy:"):
            ops.experts_backward(good[0].astype(np.int8), *good)


def test_moe_threading_bad_mode():
    old = ops.moe_threading()
    with pytest.raises(ValueError, match="^mode:"):
        ops.moe_threading("fast")
    with pytest.raises(TypeError, match="^mode:"):
        ops.moe_threading(1)
    assert ops.moe_threading() == old
