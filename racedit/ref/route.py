"""NumPy float64 twins of the route ops: a plain sort per group (no selection tricks),
against which the C radix select is checked. Selection has no gradient (docs/method.md §2)."""
from fractions import Fraction

import numpy as np

__all__ = ["route", "route_threshold", "route_plan"]

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


def route(scores, k, strategy="race", return_tau=False):
    """Sort-based twin of racedit.ops.route: in each group, order pairs by (-score, flat
    index) and keep the first K. Returns the bool mask (B, L, E) and, with return_tau,
    the mean over groups of the K-th largest score (inf when K = 0)."""
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
    mask = mask.reshape(s.shape)
    if not return_tau:
        return mask
    if K == 0:
        return mask, float("inf")
    kth = np.take_along_axis(S, order[:, K - 1 : K], axis=1)
    return mask, float(kth.mean())


def route_threshold(scores, tau):
    """mask = scores >= tau."""
    return np.asarray(scores) >= tau
