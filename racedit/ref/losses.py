"""NumPy float64 twins of the losses ops (racedit.ops.losses): written from docs/method.md §4-§6
as directly as possible, with the same conventions for degenerate masks."""
import numpy as np

__all__ = [
    "softmax",
    "similarity_weights",
    "router_similarity_loss",
    "balance_loss",
    "plr_head_forward",
    "plr_head_backward",
    "plr_loss",
    "expert_load",
    "coselect_counts",
    "dead_experts",
    "max_violation",
    "combination_usage",
    "allocation_by_key",
    "moe_aux_forward",
    "moe_aux_backward",
]


def _rows(a):
    a = np.asarray(a)
    return a.reshape(-1, a.shape[-1])                      # (N, E)


def softmax(R):
    """softmax over the last axis, float64."""
    R = np.asarray(R, dtype=np.float64)
    z = np.exp(R - R.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _softmax_backward(dP, P):
    return P * (dP - (P * dP).sum(axis=-1, keepdims=True))


def similarity_weights(mask):
    """W (E, E) of docs/method.md §5 from a bool mask (N, E)."""
    M = _rows(mask).astype(np.float64)                    # (N, E)
    E = M.shape[1]
    C = M.T @ M                                           # (E, E)
    diag = np.eye(E, dtype=bool)
    sd, so = C[diag].sum(), C[~diag].sum()
    W = np.zeros((E, E))
    if sd > 0:
        W[diag] = E * C[diag] / sd
    if so > 0:
        W[~diag] = (E * E - E) * C[~diag] / so
    return W


def router_similarity_loss(R, mask):
    """(loss, dR) in float64; R, mask (N, E) or (B, L, E)."""
    shape = np.shape(R)
    P = softmax(_rows(R))                                 # (N, E)
    N = P.shape[0]
    W = similarity_weights(mask)                          # (E, E)
    loss = float((W * (P.T @ P)).sum() / N)
    dP = P @ (W + W.T) / N                                # (N, E)
    return loss, _softmax_backward(dP, P).reshape(shape)


def balance_loss(R, mask):
    """(loss, dR) in float64; R, mask (N, E) or (B, L, E)."""
    shape = np.shape(R)
    P = softmax(_rows(R))                                 # (N, E)
    N, E = P.shape
    load = _rows(mask).sum(axis=0).astype(np.float64)     # (E,)
    f = load / load.sum() if load.sum() > 0 else np.zeros(E)
    loss = float(E * (f * P.mean(axis=0)).sum())
    dP = np.broadcast_to(E * f / N, P.shape)
    return loss, _softmax_backward(dP, P).reshape(shape)


def plr_head_forward(h, wt, bt):
    """T (N, Pd) = h (N, D) @ wt (D, Pd) + bt (Pd), float64."""
    return np.asarray(h, np.float64) @ np.asarray(wt, np.float64) + np.asarray(bt, np.float64)


def plr_head_backward(dT, h, wt):
    """(dh (N, D), dwt (D, Pd), dbt (Pd,)) given dT (N, Pd), float64."""
    dT, h, wt = (np.asarray(a, np.float64) for a in (dT, h, wt))
    return dT @ wt.T, h.T @ dT, dT.sum(axis=0)


def plr_loss(T, target):
    """(mean((T - target)^2), dT), float64."""
    d = np.asarray(T, np.float64) - np.asarray(target, np.float64)
    return float((d * d).mean()), 2.0 * d / d.size


def expert_load(mask):
    """int64 (E,) tokens per expert."""
    return _rows(mask).sum(axis=0).astype(np.int64)


def coselect_counts(mask):
    """int64 (E, E) = mask^T mask."""
    M = _rows(mask).astype(np.int64)
    return M.T @ M


def dead_experts(mask):
    return int((expert_load(mask) == 0).sum())


def max_violation(mask):
    load = expert_load(mask).astype(np.float64)
    mean = load.mean()
    return 0.0 if mean == 0 else float((load.max() - mean) / mean)


def combination_usage(mask, coverage=0.95):
    """Fraction of the C(E,2) pair bins, in decreasing order of count, whose cumulative
    share of the pair mass stays strictly below ``coverage`` (docs/method.md §6), by
    enumerating the pairs of every token (independent of the M^T M route of the C op)."""
    M = _rows(mask).astype(bool)
    E = M.shape[1]
    if E < 2:
        return 0.0
    iu = np.triu_indices(E, k=1)
    hist = np.zeros((E, E))
    for row in M:                                         # reference: per token, per pair
        sel = np.flatnonzero(row)
        for a in range(len(sel)):
            for b in range(a + 1, len(sel)):
                hist[sel[a], sel[b]] += 1
    bins = np.sort(hist[iu])[::-1]
    total = bins.sum()
    if total == 0:
        return 0.0
    cum = np.cumsum(bins / total)
    return int(np.count_nonzero(cum < coverage * (1 - 1e-12))) / len(bins)


def allocation_by_key(mask, keys, num_buckets):
    """(mean (num_buckets,) float64, NaN when empty; count (num_buckets,) int64)."""
    mask = np.asarray(mask, bool)                         # (B, L, E)
    keys = np.asarray(keys)
    per_sample = mask.sum(axis=(1, 2)) / mask.shape[1]    # (B,) experts per token
    mean = np.full(num_buckets, np.nan)
    count = np.zeros(num_buckets, np.int64)
    for b in range(num_buckets):
        sel = keys == b
        count[b] = sel.sum()
        if count[b]:
            mean[b] = per_sample[sel].mean()
    return mean, count


def moe_aux_forward(cache, params, plr_target=None, sim_weight=0.0, balance_weight=0.0,
                    plr_weight=1.0):
    """The MoE layer's aux losses from a :func:`racedit.ref.moe.moe_forward` cache.

    params: the layer's dict, with ``plr_w`` (D, plr_dim) and ``plr_b`` (plr_dim,) when
    the PLR head is on; plr_target (B, L, plr_dim) or None. Returns (weighted total,
    values dict with ``sim_loss``, ``balance_loss``, ``plr_loss`` (None when off) and
    ``plr_pred`` (N, plr_dim), aux cache for :func:`moe_aux_backward`)."""
    R, mask, h = cache["R"], cache["mask"], cache["h"]            # (N,E), (N,E), (N,D)
    vals = dict(sim_loss=None, balance_loss=None, plr_loss=None, plr_pred=None)
    grads = dict(dR=np.zeros_like(R), dT=None)
    total = 0.0
    if sim_weight > 0:
        vals["sim_loss"], dR = router_similarity_loss(R, mask)
        total += sim_weight * vals["sim_loss"]
        grads["dR"] += sim_weight * dR
    if balance_weight > 0:
        vals["balance_loss"], dR = balance_loss(R, mask)
        total += balance_weight * vals["balance_loss"]
        grads["dR"] += balance_weight * dR
    if "plr_w" in params and np.size(params["plr_w"]) > 0:
        T = plr_head_forward(h, params["plr_w"], params["plr_b"])  # (N, plr_dim)
        vals["plr_pred"] = T
        if plr_target is not None:
            vals["plr_loss"], dT = plr_loss(T, np.asarray(plr_target, np.float64).reshape(T.shape))
            total += plr_weight * vals["plr_loss"]
            grads["dT"] = plr_weight * dT
    return total, vals, grads


def moe_aux_backward(aux_cache, cache, params):
    """Gradients of the weighted aux total of :func:`moe_aux_forward`: returns (dx (B,L,D),
    grads dict over router_w, router_b, gate_w, gate_b and, with the head, plr_w, plr_b)."""
    from .moe import router_backward

    B, L, D = cache["shape"]
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    dh_extra, out = None, {}
    if aux_cache["dT"] is not None:
        dh_extra, out["plr_w"], out["plr_b"] = plr_head_backward(aux_cache["dT"], cache["h"], p["plr_w"])
    dx, out["router_w"], out["router_b"], out["gate_w"], out["gate_b"] = router_backward(
        aux_cache["dR"], cache["hpre"], cache["h"], cache["x"], p["router_w"], p["gate_w"],
        dh_extra=dh_extra)
    return dx.reshape(B, L, D), out
