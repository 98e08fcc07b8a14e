"""NumPy float64 twins of the route ops: a plain sort per group (no selection tricks),
against which the C radix select is checked. Selection has no gradient (docs/method.md §2)."""
from fractions import Fraction

import numpy as np

__all__ = ["route", "route_threshold", "route_plan", "route_kth", "num_thresholds",
           "route_thresholds", "threshold_update"]

# strategy -> axes of (B, L, E) that one top-K runs over; the other axes form the groups
_TOPK_AXES = {
    "token": (2,),
    "expert": (1,),
    "bl": (0, 1),
    "be": (0, 2),
    "le": (1, 2),
    "race": (0, 1, 2),
}


def route_plan(B, L, E, k, strategy):
    """(ngroups, K) for a (B, L, E) score tensor: K = k * (group size) / E, exactly."""
    axes = _TOPK_AXES[strategy]
    dims = (B, L, E)
    gsize = int(np.prod([dims[a] for a in axes]))
    ngroups = B * L * E // gsize
    # every group holds gsize pairs = gsize/E "tokens' worth" of experts, k each
    K = Fraction(k * gsize, E)
    if K.denominator != 1:
        raise ValueError(f"k: K = {K} is not an integer for strategy {strategy!r}")
    return ngroups, int(K)


def route_kth(scores, k, strategy="race"):
    """:func:`route` and every group's K-th largest score: (mask (B,L,E), kth (groups,)),
    groups in racedit.ops.route_plan's order (BL: one per expert e, BE: one per position l,
    race: one); kth is inf when K = 0."""
    mask, S, order, K = _route(scores, k, strategy)
    if K == 0:
        return mask, np.full(S.shape[0], np.inf)
    return mask, np.take_along_axis(S, order[:, K - 1 : K], axis=1)[:, 0]


def num_thresholds(strategy, L, E):
    """Thresholds of the eval-mode selection (docs/method.md §3): E for BL, L for BE, 1 for
    race; 0 for token, expert and LE choice (exact per-group top-K at inference)."""
    return {"bl": E, "be": L, "race": 1}.get(strategy, 0)


def route_thresholds(scores, tau, strategy):
    """Eval-mode selection of BL, BE and race: mask[b,l,e] = scores[b,l,e] >= tau[g], g = e
    (BL), l (BE), 0 (race); tau holds :func:`num_thresholds` values."""
    s = np.asarray(scores, np.float64)
    tau = np.asarray(tau, np.float64).reshape(-1)
    B, L, E = s.shape
    if tau.shape != (num_thresholds(strategy, L, E),) or tau.size == 0:
        raise ValueError(f"tau: expected {num_thresholds(strategy, L, E)} values for "
                         f"strategy {strategy!r}, got {tau.shape}")
    T = {"bl": tau[None, None, :], "be": tau[None, :, None]}.get(strategy, tau[0])
    return s >= T


def threshold_update(tau, kth, beta):
    """The EMA of the per-group K-th values: tau <- beta tau + (1 - beta) kth, or kth when
    tau is None (the first training batch)."""
    kth = np.asarray(kth, np.float64)
    return kth.copy() if tau is None else beta * np.asarray(tau, np.float64) + (1 - beta) * kth


def _route(scores, k, strategy):
    """The selection and what the K-th values are read from: (mask, S (groups, size) the
    scores per group, order (groups, size) the rank order, K)."""
    s = np.asarray(scores, dtype=np.float64)
    if np.isnan(s).any():
        raise ValueError("scores contains NaN")
    B, L, E = s.shape
    ngroups, K = route_plan(B, L, E, k, strategy)
    sel = _TOPK_AXES[strategy]
    perm = tuple(a for a in range(3) if a not in sel) + sel
    flat = np.arange(s.size).reshape(s.shape)
    S = s.transpose(perm).reshape(ngroups, -1)  # (groups, group size)
    F = flat.transpose(perm).reshape(ngroups, -1)
    order = np.lexsort((F, -S), axis=-1)  # primary -score, then flat index
    mask = np.zeros(s.size, dtype=bool)
    mask[np.take_along_axis(F, order[:, :K], axis=1).ravel()] = True
    return mask.reshape(s.shape), S, order, K


def route(scores, k, strategy="race", return_tau=False):
    """Sort-based twin of racedit.ops.route: in each group, order pairs by (-score, flat
    index) and keep the first K. Returns the bool mask (B, L, E) and, with return_tau,
    the mean over groups of the K-th largest score (inf when K = 0)."""
    if not return_tau:
        return _route(scores, k, strategy)[0]
    mask, kth = route_kth(scores, k, strategy)
    return mask, float(kth.mean())


def route_threshold(scores, tau):
    """mask = scores >= tau."""
    return np.asarray(scores) >= tau
