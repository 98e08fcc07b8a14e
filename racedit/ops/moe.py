"""The MoE block's ops (docs/method.md §2) as thin functions on NumPy arrays: gating, the router
MLP and the dropless experts with their combine. The layer itself is :class:`racedit.MoE`.

Shapes: N tokens, D width, E experts, He expert hidden width. All results are new
float32 arrays. Float inputs of another dtype (float64, float16) or a non-contiguous
layout are converted to C-contiguous float32; ``mask`` must be a bool array. A wrong
dtype raises TypeError, a wrong ndim/shape or an unknown gating ValueError, each naming
the argument and the expected vs actual value. ``device`` ("cpu" or "cuda") says where an
op runs; the arrays are copied there and the results back.
"""
from .. import _C

__all__ = [
    "gate_forward", "gate_backward", "router_forward", "router_backward",
    "experts_forward", "experts_backward", "moe_threading",
]


def gate_forward(R, gating="identity", device="cpu"):
    """G (N,E) float32 = gate(R (N,E)).

    gating: ``"identity"`` (G = R), ``"sigmoid"`` or ``"softmax"`` (over E, max-subtracted).
    """
    return _C.gate_forward(R, gating, device=device)


def gate_backward(dG, G, gating="identity", device="cpu"):
    """dR (N,E) float32: the gradient dG (N,E) sent back through the gate whose forward
    output was G (N,E)."""
    return _C.gate_backward(dG, G, gating, device=device)


def router_forward(x, Wr, br, Wg, bg, device="cpu"):
    """The router MLP. x (N,D), Wr (D,D), br (D,), Wg (D,E), bg (E,).

    Returns ``(hpre, h, R)``: hpre (N,D) = x Wr + br, h (N,D) = GELU_erf(hpre),
    R (N,E) = h Wg + bg (the router logits), all float32.
    """
    return _C.router_forward(x, Wr, br, Wg, bg, device=device)


def router_backward(dR, hpre, h, x, Wr, Wg, dh_extra=None, device="cpu"):
    """Backward of :func:`router_forward` given dR (N,E) and the forward's hpre, h (N,D).

    dh_extra (N,D), optional: a gradient reaching h from another head (the PLR head).
    Returns ``(dx (N,D), dWr (D,D), dbr (D,), dWg (D,E), dbg (E,))``, float32.
    """
    return _C.router_backward(dR, hpre, h, x, Wr, Wg, dh_extra, device=device)


def experts_forward(x, mask, G, w1, b1, w2, b2, precision="fp32", device="cpu"):
    """Dropless experts and combine: y (N,D) float32 with
    ``y_t = sum_e mask[t,e] * G[t,e] * (GELU_tanh(x_t w1[e] + b1[e]) w2[e] + b2[e])``.

    x (N,D), mask (N,E) bool (any number of experts per token, any number of tokens per
    expert; a token with none gets 0), G (N,E), w1 (E,D,He), b1 (E,He), w2 (E,He,D), b2 (E,D).
    precision of the expert GEMMs on CUDA: ``"fp32"``, ``"tf32"`` or ``"bf16"`` (bf16
    operands, fp32 accumulation); the CPU computes in fp32.
    """
    return _C.experts_forward(x, mask, G, w1, b1, w2, b2, precision, device=device)


def experts_backward(dy, x, mask, G, w1, b1, w2, b2, precision="fp32", device="cpu"):
    """Backward of :func:`experts_forward` (the mask held constant), recomputing the
    forward. dy (N,D); the rest as for :func:`experts_forward`. Bitwise reproducible run to
    run on every device (no float atomics).

    Returns ``(dx (N,D), dG (N,E), dw1 (E,D,He), db1 (E,He), dw2 (E,He,D), db2 (E,D))``,
    float32; dG is 0 where mask is False.
    """
    return _C.experts_backward(dy, x, mask, G, w1, b1, w2, b2, precision, device=device)


def moe_threading(mode=None):
    """How the MoE block's matrix products are threaded, process-wide; returns the
    previous mode (``"blas"`` or ``"omp"``). ``None`` only reads it.

    ``"omp"``: OpenMP tasks over (expert, block of rows), each a single-threaded sgemm
    (the router's products split over OpenMP threads by rows); the BLAS is set to one
    thread for the duration of each call when racedit can control its thread count
    (``racedit._C.blas_thread_control()``: SciPy's OpenBLAS), otherwise limit it yourself
    (``threadpoolctl.threadpool_limits(1, "blas")``). ``"blas"``: experts in turn, each
    sgemm threaded by the BLAS. The default is ``"omp"`` when the BLAS thread count can be
    controlled, else ``"blas"``; built without OpenMP it is always ``"blas"`` (a request
    for ``"omp"`` is ignored). Raises ValueError/TypeError for another mode.
    """
    return _C.moe_threading(mode)
