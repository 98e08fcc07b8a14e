"""NumPy float64 twins of the MoE ops (docs/method.md §2): gating, the router MLP, the dropless
experts with their combine, and the composite layer given a selection function.

The experts use the dense masked formulation (every expert on every token, then the
mask): simple and loop-free, meant for test sizes only. Shapes: N tokens, D width,
E experts, He expert hidden width. Every function takes and returns float64 arrays
(inputs are converted with ``np.asarray(..., float64)``).
"""
import numpy as np
from scipy.special import erfc, expit

# The GELU helpers stay module-level (racedit.ref.moe.gelu_tanh ...), out of __all__.
__all__ = [
    "gate_forward", "gate_backward", "router_forward", "router_backward",
    "experts_forward", "experts_backward", "moe_select", "moe_forward", "moe_backward",
]

_C0 = np.sqrt(2.0 / np.pi)
_C1 = 0.044715


def _f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def gelu_tanh(x):
    """GELU with the tanh approximation (the experts' nonlinearity):
    0.5 x (1 + tanh u) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3), written with
    the sigmoid so that the negative tail does not cancel."""
    return x * expit(2.0 * _C0 * (x + _C1 * x**3))


def gelu_tanh_grad(x):
    """d/dx of :func:`gelu_tanh`: sigmoid(2u) + x (1 - tanh^2 u) u'(x) / 2."""
    u2 = 2.0 * _C0 * (x + _C1 * x**3)
    s, sm = expit(u2), expit(-u2)
    return s + 2.0 * x * s * sm * _C0 * (1.0 + 3.0 * _C1 * x * x)


def gelu_erf(x):
    """Exact GELU (the router's nonlinearity): x Phi(x) = 0.5 x erfc(-x / sqrt 2)."""
    return 0.5 * x * erfc(-x / np.sqrt(2.0))


def gelu_erf_grad(x):
    """d/dx of :func:`gelu_erf`: Phi(x) + x phi(x)."""
    return 0.5 * erfc(-x / np.sqrt(2.0)) + x * np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)


def gate_forward(R, gating="identity"):
    """G (N,E) = gate(R (N,E)): ``identity``, ``sigmoid`` or ``softmax`` over E."""
    (R,) = _f64(R)
    if gating == "identity":
        return R.copy()
    if gating == "sigmoid":
        return 1.0 / (1.0 + np.exp(-R))
    if gating == "softmax":
        z = np.exp(R - R.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)
    raise ValueError(f"gating: expected one of identity, sigmoid, softmax, got {gating!r}")


def gate_backward(dG, G, gating="identity"):
    """dR (N,E) from dG (N,E) and the forward output G (N,E)."""
    dG, G = _f64(dG, G)
    if gating == "identity":
        return dG.copy()
    if gating == "sigmoid":
        return dG * G * (1.0 - G)
    if gating == "softmax":
        return G * (dG - (dG * G).sum(axis=-1, keepdims=True))
    raise ValueError(f"gating: expected one of identity, sigmoid, softmax, got {gating!r}")


def router_forward(x, Wr, br, Wg, bg):
    """hpre (N,D) = x Wr + br; h = GELU_erf(hpre); R (N,E) = h Wg + bg. Returns (hpre, h, R)."""
    x, Wr, br, Wg, bg = _f64(x, Wr, br, Wg, bg)
    hpre = x @ Wr + br
    h = gelu_erf(hpre)
    return hpre, h, h @ Wg + bg


def router_backward(dR, hpre, h, x, Wr, Wg, dh_extra=None):
    """Gradients of the router given dR (N,E) (and dh_extra (N,D) reaching h from another
    head). Returns (dx (N,D), dWr (D,D), dbr (D), dWg (D,E), dbg (E))."""
    dR, hpre, h, x, Wr, Wg = _f64(dR, hpre, h, x, Wr, Wg)
    dh = dR @ Wg.T
    if dh_extra is not None:
        dh = dh + np.asarray(dh_extra, dtype=np.float64)
    dhpre = dh * gelu_erf_grad(hpre)
    return dhpre @ Wr.T, x.T @ dhpre, dhpre.sum(0), h.T @ dR, dR.sum(0)


def _experts_dense(x, w1, b1, w2, b2):
    a = np.einsum("nd,edh->neh", x, w1) + b1          # (N,E,He)
    hdn = gelu_tanh(a)
    o = np.einsum("neh,ehd->ned", hdn, w2) + b2       # (N,E,D)
    return a, hdn, o


def experts_forward(x, mask, G, w1, b1, w2, b2):
    """y (N,D) = sum_e mask[t,e] G[t,e] FFN_e(x_t), FFN_e(z) = GELU_tanh(z w1[e] + b1[e]) w2[e] + b2[e].
    x (N,D), mask (N,E) bool, G (N,E), w1 (E,D,He), b1 (E,He), w2 (E,He,D), b2 (E,D)."""
    x, G, w1, b1, w2, b2 = _f64(x, G, w1, b1, w2, b2)
    _, _, o = _experts_dense(x, w1, b1, w2, b2)
    return np.einsum("ne,ned->nd", np.asarray(mask, bool) * G, o)


def experts_backward(dy, x, mask, G, w1, b1, w2, b2):
    """Gradients of :func:`experts_forward` with the mask held constant: returns
    (dx (N,D), dG (N,E), dw1, db1, dw2, db2); dG is 0 where mask is False."""
    dy, x, G, w1, b1, w2, b2 = _f64(dy, x, G, w1, b1, w2, b2)
    M = np.asarray(mask, bool).astype(np.float64)
    a, hdn, o = _experts_dense(x, w1, b1, w2, b2)
    dG = M * np.einsum("nd,ned->ne", dy, o)
    do = (M * G)[:, :, None] * dy[:, None, :]           # (N,E,D)
    dw2 = np.einsum("neh,ned->ehd", hdn, do)
    da = np.einsum("ned,ehd->neh", do, w2) * gelu_tanh_grad(a)
    dw1 = np.einsum("nd,neh->edh", x, da)
    dx = np.einsum("neh,edh->nd", da, w1)
    return dx, dG, dw1, da.sum(0), dw2, do.sum(0)


def moe_select(k, strategy="race", tau=None, eval_topk=False):
    """The layer's selection rule as a function G (B,L,E) -> mask (B,L,E) bool
    (docs/method.md §3): the batch top-K by racedit.ref.route in training (``tau`` None),
    with ``eval_topk``, and for token, expert and LE choice (exact per-group top-K at
    inference too); else BL / BE / race select ``G >= tau[e] / tau[l] / tau`` per pair."""
    from .route import num_thresholds, route, route_thresholds

    def select(G):
        B, L, E = np.shape(G)
        if tau is None or eval_topk or num_thresholds(strategy, L, E) == 0:
            return route(G, k, strategy)
        return route_thresholds(G, tau, strategy)
    return select


def moe_forward(x, params, select, gating="identity"):
    """The composite layer: router -> gate -> select -> experts -> combine.

    x (B,L,D); params a dict with router_w, router_b, gate_w, gate_b, w1, b1, w2, b2;
    select(G (B,L,E) float64) -> mask (B,L,E) bool (e.g. :func:`moe_select`). Returns (y (B,L,D), cache) where
    cache holds what :func:`moe_backward` needs (and ``mask``, ``G``, ``R``, ``h``)."""
    (x,) = _f64(x)
    B, L, D = x.shape
    xf = x.reshape(B * L, D)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    hpre, h, R = router_forward(xf, p["router_w"], p["router_b"], p["gate_w"], p["gate_b"])
    G = gate_forward(R, gating)
    E = G.shape[1]
    mask = np.asarray(select(G.reshape(B, L, E)), bool).reshape(B * L, E)
    y = experts_forward(xf, mask, G, p["w1"], p["b1"], p["w2"], p["b2"])
    cache = dict(x=xf, hpre=hpre, h=h, R=R, G=G, mask=mask, gating=gating, shape=(B, L, D))
    return y.reshape(B, L, D), cache


def moe_backward(dy, cache, params):
    """Gradients of :func:`moe_forward` (selection held constant): returns
    (dx (B,L,D), grads dict with the names of ``params``)."""
    B, L, D = cache["shape"]
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    dyf = np.asarray(dy, np.float64).reshape(B * L, D)
    dxe, dG, dw1, db1, dw2, db2 = experts_backward(dyf, cache["x"], cache["mask"], cache["G"],
                                                   p["w1"], p["b1"], p["w2"], p["b2"])
    dR = gate_backward(dG, cache["G"], cache["gating"])
    dxr, dWr, dbr, dWg, dbg = router_backward(dR, cache["hpre"], cache["h"], cache["x"],
                                              p["router_w"], p["gate_w"])
    grads = dict(router_w=dWr, router_b=dbr, gate_w=dWg, gate_b=dbg, w1=dw1, b1=db1, w2=dw2, b2=db2)
    return (dxe + dxr).reshape(B, L, D), grads
