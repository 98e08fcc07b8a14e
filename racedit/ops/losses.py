"""The router's auxiliary losses and the routing diagnostics (docs/method.md §4-§6), as thin
functions over the C core.

Shapes: ``R`` router logits and ``mask`` the selection are (N, E) or (B, L, E) (only the
last axis is E); ``mask`` must be a ``bool`` array (other dtypes raise TypeError, never
cast). Float inputs may be float32 or float64 (converted to float32) and need not be
contiguous. Every function raises ValueError/TypeError naming the argument, the expected
and the actual value.

Conventions for degenerate inputs (documented here once, tested in tests/):

- ``router_similarity_loss`` and ``balance_loss`` need E >= 2 and N >= 1 (ValueError
  otherwise: with one expert softmax is the constant 1). When no pair is selected the
  similarity diagonal weights are 0; when no token has two experts the off-diagonal
  weights are 0; the loss is the remaining terms (0 if nothing is selected), never NaN.
  The balance loss is 0 with zero gradient when nothing is selected.
- ``max_violation`` is 0 when nothing is selected.
- ``combination_usage`` is 0.0 when E < 2, no token has two experts, or one pair holds at
  least ``coverage`` of the pair mass.
- ``allocation_by_key`` gives NaN for an empty bucket (its count is 0).
"""
from .. import _C

__all__ = [
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
]


def router_similarity_loss(R, mask):
    """Router-similarity loss of docs/method.md §5 and its gradient.

    P = softmax(R) over E; M' = mask^T mask (E, E) co-selection counts (no gradient);
    W[i,i] = E M'[i,i] / sum_k M'[k,k], W[i,j] = (E^2-E) M'[i,j] / sum_{k!=l} M'[k,l];
    loss = (1/N) sum_ij W[i,j] (P^T P)[i,j]. A uniform W gives 1.

    Args:
        R: float (N, E) or (B, L, E) router logits, finite.
        mask: bool array of R's shape, the selected (token, expert) pairs.
    Returns:
        (loss, dR): a Python float and float32 dR = d loss / d R, R's shape.
    Raises:
        TypeError for a non-array or non-bool mask; ValueError for a shape mismatch,
        E < 2, N = 0 or a non-finite logit.
    """
    return _C.router_similarity_loss(R, mask)


def balance_loss(R, mask):
    """Switch/GShard balance loss ``E * sum_i f_i * mean_t softmax(R)[t, i]`` and its gradient.

    f_i = (selected pairs of expert i) / (all selected pairs), 0 when none (then the loss
    and gradient are 0); f is constant, the gradient flows through softmax(R) only.

    Args:
        R: float (N, E) or (B, L, E) router logits, finite.
        mask: bool array of R's shape.
    Returns:
        (loss, dR): a Python float and float32 dR of R's shape.
    Raises:
        as :func:`router_similarity_loss`.
    """
    return _C.balance_loss(R, mask)


def plr_head_forward(h, wt, bt):
    """Per-layer regularization head ``T = h @ wt + bt`` (docs/method.md §4).

    Args:
        h: float (N, D) router hidden state.
        wt: float (D, plr_dim); bt: float (plr_dim,).
    Returns:
        float32 T (N, plr_dim).
    Raises:
        TypeError/ValueError for wrong dtypes or shapes (D, plr_dim >= 1).
    """
    return _C.plr_head_forward(h, wt, bt)


def plr_head_backward(dT, h, wt):
    """Gradients of the PLR head given dT (N, plr_dim).

    Returns:
        (dh (N, D), dwt (D, plr_dim), dbt (plr_dim,)), float32: dh = dT wt^T,
        dwt = h^T dT, dbt = sum over tokens of dT.
    Raises:
        TypeError/ValueError for wrong dtypes or shapes.
    """
    return _C.plr_head_backward(dT, h, wt)


def plr_loss(T, target):
    """``mean((T - target)**2)`` over all entries, accumulated in float64, and dT.

    Args:
        T: float array, any shape with ndim >= 1 and at least one entry.
        target: float array of T's shape, finite.
    Returns:
        (loss, dT): a Python float and float32 dT = 2 (T - target) / T.size.
    Raises:
        TypeError/ValueError for wrong dtypes, shapes, no entries or a non-finite target.
    """
    return _C.plr_loss(T, target)


def expert_load(mask):
    """Tokens routed to each expert: int64 (E,) = mask summed over all leading axes.

    mask: bool (N, E) or (B, L, E). Raises TypeError/ValueError on a bad mask.
    """
    return _C.expert_load(mask)


def coselect_counts(mask):
    """int64 (E, E) co-selection counts ``mask^T mask``: [i, j] = tokens that selected
    both i and j; the diagonal is the load. mask: bool (N, E) or (B, L, E)."""
    return _C.coselect_counts(mask)


def dead_experts(mask):
    """Number (int) of experts that received no token. mask: bool (N, E) or (B, L, E)."""
    return _C.dead_experts(mask)


def max_violation(mask):
    """MaxVio = (max_i load_i - mean_i load_i) / mean_i load_i (a float; 0 for perfect
    balance and when nothing is selected). mask: bool (N, E) or (B, L, E), E >= 1."""
    return _C.max_violation(mask)


def combination_usage(mask, coverage=0.95):
    """Fraction of the C(E,2) expert pairs whose cumulative share of the pair mass stays
    strictly below ``coverage`` (docs/method.md §6).

    Every unordered pair of experts co-selected on a token counts once into its bin; the
    bins are sorted descending and the result is n / C(E,2), n the number of bins whose
    cumulative count stays strictly below ``coverage`` of the total (a cumulative count
    within a relative 1e-12 of it counts as reaching it): the bin that reaches it is not
    counted. A uniform histogram gives (ceil(coverage*C(E,2)) - 1) / C(E,2); one pair
    holding at least ``coverage`` of the mass gives 0.0, as do E < 2 and no token with two
    experts.

    Args:
        mask: bool (N, E) or (B, L, E).
        coverage: real in (0, 1], default 0.95.
    Raises:
        TypeError/ValueError on a bad mask or coverage.
    """
    return _C.combination_usage(mask, coverage)


def allocation_by_key(mask, keys, num_buckets):
    """Mean experts per token for the samples of each key bucket (the paper's Fig. 6).

    Args:
        mask: bool (B, L, E).
        keys: integer array (B,), values in [0, num_buckets) (e.g. a timestep bucket).
        num_buckets: int >= 1.
    Returns:
        (mean, count): float64 (num_buckets,) mean experts per token, NaN where no sample
        has that key; int64 (num_buckets,) number of samples per key.
    Raises:
        TypeError for non-integer keys or a non-bool mask; ValueError for shapes, keys out
        of range or num_buckets < 1.
    """
    return _C.allocation_by_key(mask, keys, num_buckets)
