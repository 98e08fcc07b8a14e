"""Routing: which (token, expert) pairs are computed. One top-K over a chosen set of
dimensions of the gate scores viewed as (B, L, E); the other dimensions form independent
groups (docs/method.md §2). Ties go to the lower flat index, so the result is deterministic."""
from .. import _C

__all__ = ["route", "route_threshold", "route_plan"]

STRATEGIES = ("token", "expert", "bl", "be", "le", "race")


def route(scores, k, strategy="race", return_tau=False, device="cpu"):
    """Select exactly K (token, expert) pairs in every group of ``scores``.

    Parameters
    ----------
    scores : ndarray (B, L, E), float32
        Gate scores. float64/float16 or non-contiguous arrays are converted to a
        C-contiguous float32 copy first (the input is never modified). ±inf are valid
        scores; -0.0 and 0.0 are equal (a tie).
    k : int
        Experts per token on average, 0 <= k <= E.
    strategy : str
        One of ``"token"`` (groups B·L, K = k), ``"expert"`` (groups B·E, K = k·L/E),
        ``"bl"`` (groups E, K = B·L·k/E), ``"be"`` (groups L, K = B·k),
        ``"le"`` (groups B, K = L·k), ``"race"`` (one group, K = B·L·k).
    return_tau : bool
        Also return ``tau_b``, the mean over groups of each group's K-th largest score
        (``inf`` when K = 0).
    device : str
        ``"cpu"`` or ``"cuda"`` (the same mask, bit for bit).

    Returns
    -------
    mask : ndarray (B, L, E), bool
        True on the K largest scores of every group; equal scores go to the lower flat
        index in (B, L, E).
    tau_b : float
        Only when ``return_tau``.

    Raises
    ------
    TypeError
        ``scores`` is not an ndarray or has a non-float dtype; ``k`` is not an int
        (bool included); ``strategy`` is not a str.
    ValueError
        ``scores.ndim != 3`` or an empty dimension; unknown ``strategy``; ``k`` outside
        [0, E]; K not an integer for the strategy (e.g. k·L/E); NaN in ``scores``.
    """
    mask, tau = _C.route(scores, k, strategy, device=device)
    return (mask, tau) if return_tau else mask


def route_threshold(scores, tau, device="cpu"):
    """Eval-mode selection: ``scores >= tau`` per pair, independent of the batch.

    ``scores`` is a float32 ndarray of any shape with ndim >= 1 (float64/float16 or
    non-contiguous input is converted to float32); ``tau`` a real number (compared in
    float32). Returns a bool ndarray of the same shape. TypeError for a non-array, a
    non-float dtype or a non-number ``tau``; ValueError for ndim 0, NaN ``tau`` or NaN in
    ``scores``. device: ``"cpu"`` or ``"cuda"``.
    """
    return _C.route_threshold(scores, tau, device=device)


def route_plan(B, L, E, k, strategy):
    """``(ngroups, K)`` for scores of shape (B, L, E), ``k`` experts per token on average
    and ``strategy`` (see :func:`route`). TypeError for non-int sizes, ValueError for sizes
    < 1, k outside [0, E], an unknown strategy or a K that is not an integer."""
    return _C.route_plan(B, L, E, k, strategy)
