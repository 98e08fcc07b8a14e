"""racedit.cuda — the CUDA backend's ops on NumPy arrays: the same names, arguments and
results as racedit.ops (CPU), computed on the GPU. Every call copies its inputs to the
device and its results back (copies at the boundary); :class:`MoEState` keeps one MoE
layer's activations, dispatch and threshold on the device between forward and backward.

Shapes: B batch, L tokens per image, N = B*L tokens, D width, E experts, He expert hidden.
Inputs are converted like racedit.ops (float64/float16 or non-contiguous arrays become a
C-contiguous float32 copy; masks must be bool). Results are float32 (bool for masks).

Without a usable GPU (racedit built without CUDA, or no device) every function raises
``RuntimeError("CUDA not available: ...")``; check :func:`racedit.cuda_available` first.
Precision: fp32 GEMMs by default; :func:`tf32` opts in to TF32 tensor cores.
"""
import numpy as np

from . import _C

__all__ = [
    "route", "route_threshold", "gate_forward", "gate_backward", "router_forward",
    "router_backward", "experts_forward", "experts_backward", "MoEState", "moe_forward",
    "moe_backward", "tf32", "expert_gemm", "info", "bench_moe",
]

PARAM_NAMES = ("router_w", "router_b", "gate_w", "gate_b", "w1", "b1", "w2", "b2")


def _require():
    info = _C.build_info()
    if not info.get("cuda"):
        from ._build_info import BUILD_INFO

        why = BUILD_INFO.get("cuda_reason", "not built")
        raise RuntimeError(f"CUDA not available: racedit was built without CUDA ({why})")
    if _C.cuda_device_count() == 0:
        raise RuntimeError("CUDA not available: racedit was built with CUDA but no CUDA device "
                           "is usable (no GPU or no driver)")


def route(scores, k, strategy="race", return_tau=False):
    """GPU twin of :func:`racedit.ops.route`: exactly K pairs per group of ``scores``
    (B,L,E) float32, ties to the lower flat index; the mask is identical to the CPU's.

    Returns the bool mask (B,L,E), and ``tau_b`` (float: mean over groups of the K-th
    largest score, inf when K = 0) when ``return_tau``. Raises TypeError / ValueError as
    the CPU op (bad dtype/shape, unknown strategy, k out of range, K not an integer, NaN
    in scores) and RuntimeError without a GPU."""
    _require()
    mask, tau = _C.cuda_route(scores, k, strategy)
    return (mask, tau) if return_tau else mask


def route_threshold(scores, tau):
    """GPU twin of :func:`racedit.ops.route_threshold`: bool ``scores >= tau`` (same shape),
    ValueError for NaN tau or NaN scores."""
    _require()
    return _C.cuda_route_threshold(scores, tau)


def gate_forward(R, gating="identity"):
    """G (N,E) float32 = gate(R (N,E)); gating ``identity``, ``sigmoid`` or ``softmax``."""
    _require()
    return _C.cuda_gate_forward(R, gating)


def gate_backward(dG, G, gating="identity"):
    """dR (N,E) float32 from dG (N,E) and the forward output G (N,E)."""
    _require()
    return _C.cuda_gate_backward(dG, G, gating)


def router_forward(x, Wr, br, Wg, bg):
    """The router MLP on the GPU: x (N,D), Wr (D,D), br (D,), Wg (D,E), bg (E,) ->
    ``(hpre (N,D), h = GELU_erf(hpre) (N,D), R (N,E))``."""
    _require()
    return _C.cuda_router_forward(x, Wr, br, Wg, bg)


def router_backward(dR, hpre, h, x, Wr, Wg, dh_extra=None):
    """Backward of :func:`router_forward`: dR (N,E), the forward's hpre, h (N,D), x (N,D),
    Wr (D,D), Wg (D,E), optional dh_extra (N,D) -> ``(dx, dWr, dbr, dWg, dbg)``."""
    _require()
    return _C.cuda_router_backward(dR, hpre, h, x, Wr, Wg, dh_extra)


def experts_forward(x, mask, G, w1, b1, w2, b2):
    """Dropless experts + gated combine on the GPU: y (N,D) with
    ``y_t = sum_e mask[t,e] G[t,e] (GELU_tanh(x_t w1[e] + b1[e]) w2[e] + b2[e])``.

    x (N,D), mask (N,E) bool, G (N,E), w1 (E,D,He), b1 (E,He), w2 (E,He,D), b2 (E,D)."""
    _require()
    return _C.cuda_experts_forward(x, mask, G, w1, b1, w2, b2)


def experts_backward(dy, x, mask, G, w1, b1, w2, b2):
    """Backward of :func:`experts_forward` (forward recomputed on the device, mask held
    constant): ``(dx (N,D), dG (N,E), dw1, db1, dw2, db2)``; dG is 0 off the mask.
    Bitwise reproducible run to run (no float atomics)."""
    _require()
    return _C.cuda_experts_backward(dy, x, mask, G, w1, b1, w2, b2)


def _flat(params, total, name):
    """A dict of the layer's parameters (names of racedit.MoE.params) or a flat float32
    buffer (racedit.MoE.param_buffer) -> the flat float32 buffer."""
    if isinstance(params, dict):
        missing = [n for n in PARAM_NAMES if n not in params]
        if missing:
            raise ValueError(f"{name}: missing entries {missing}")
        flat = np.concatenate([np.asarray(params[n], np.float32).ravel() for n in PARAM_NAMES])
    else:
        flat = params
    if not isinstance(flat, np.ndarray):
        raise TypeError(f"{name}: expected a dict of arrays or a 1-d float32 ndarray, got "
                        f"{type(params).__name__}")
    if flat.ndim != 1 or flat.size != total:
        raise ValueError(f"{name}: expected {total} parameters in all, got shape {flat.shape}")
    return flat


class MoEState:
    """One MoE layer's device state (SPEC §2): the saved activations and dispatch of the
    last forward and the threshold tau, kept on the GPU between forward and backward.

    Args:
        dim (D), num_experts (E), k (experts per token on average), hidden (He; default
        4*dim/k), strategy (``"race"``, ``"token"``, ``"expert"``, ``"bl"``, ``"be"``,
        ``"le"``), gating (``"identity"``, ``"sigmoid"``, ``"softmax"``), beta (threshold
        EMA in [0, 1)), eval_topk (eval mode keeps batch top-K).

    The parameter layout is racedit.MoE's (``param_buffer``): pass that buffer, or a dict
    with its names, to :func:`moe_forward` / :func:`moe_backward`. The aux losses (router
    similarity, balance, PLR) are not on the GPU yet. Raises RuntimeError without a GPU,
    ValueError for a bad configuration.
    """

    def __init__(self, dim, num_experts, k, hidden=None, strategy="race", gating="identity",
                 beta=0.99, eval_topk=False):
        _require()
        if hidden is None:
            if not k or (4 * dim) % k:
                raise ValueError(f"hidden: 4*dim/k = {4 * dim}/{k} is not an integer; pass hidden=")
            hidden = 4 * dim // k
        self.cfg = dict(D=dim, E=num_experts, He=hidden, k=k, strategy=strategy, gating=gating,
                        beta=float(beta), eval_topk=bool(eval_topk))
        D, E, He = dim, num_experts, hidden
        self.num_params = D * D + D + D * E + E + 2 * E * D * He + E * He + E * D
        self._cap = _C.cuda_moe_state()

    def view(self):
        """What the last forward left: dict with ``mask`` (N,E) bool, ``G``, ``R`` (N,E),
        ``h`` (N,D) float32, ``counts`` (E,) int64, ``P`` (selected pairs), ``tau`` and
        ``tau_b`` (float or None), ``have_forward``."""
        return _C.cuda_moe_view(self._cap)

    @property
    def threshold(self):
        """tau (float) or None before the first training forward; settable (None forgets)."""
        return self.view()["tau"]

    @threshold.setter
    def threshold(self, tau):
        _C.cuda_moe_set_threshold(self._cap, None if tau is None else float(tau))


def moe_forward(state, x, params, training=True):
    """y (B,L,D) float32 = MoE(x (B,L,D)) on the GPU with the layer state ``state``
    (:class:`MoEState`) and ``params`` (flat buffer or dict). training: batch top-K and a
    tau update; else ``G >= tau`` (or top-K with eval_topk / token choice). Raises
    ValueError (shapes, NaN gate scores), RuntimeError (eval before any tau)."""
    flat = _flat(params, state.num_params, "params")
    return _C.cuda_moe_forward(state._cap, x, flat, state.cfg, bool(training))


def moe_backward(state, dy, x, params, grads=None):
    """dx (B,L,D) of the last :func:`moe_forward` on ``state`` (same x, params). Parameter
    gradients ACCUMULATE into ``grads`` (a flat float32 buffer of the params' layout,
    modified in place) or into a new zero buffer. Returns ``(dx, grads)``."""
    flat = _flat(params, state.num_params, "params")
    if grads is None:
        grads = np.zeros(state.num_params, np.float32)
    dx = _C.cuda_moe_backward(state._cap, dy, x, flat, grads, state.cfg)
    return dx, grads


def tf32(on=None):
    """Read (on=None) or set TF32 tensor-core GEMMs (process-wide); returns the previous
    setting. Off by default: fp32 products as exact as the CPU's."""
    _require()
    return _C.cuda_tf32(on)


def expert_gemm(mode=None):
    """Read (None) or set how the per-expert GEMMs run: 0 a loop of cublasGemmEx (default),
    1 one cublasGemmGroupedBatchedEx per product. Returns the previous mode; ValueError
    when grouped GEMMs are not in the linked cuBLAS."""
    _require()
    return _C.cuda_expert_gemm(mode)


def info():
    """Dict: ``cublas_version``, ``grouped_gemm`` (bool), ``runtime`` (CUDA runtime version),
    ``devices`` (count)."""
    _require()
    return _C.cuda_info()


def bench_moe(state_cfg, x, params, dy, iters=20):
    """Device-resident timings (ms per call) of the layer described by ``state_cfg`` (a
    :class:`MoEState`'s ``cfg`` dict) on x, dy (B,L,D) and ``params`` (flat): routing,
    forward, forward+backward, experts alone, and dense GEMMs of equal FLOPs. Returns a
    dict of ms and ``P``."""
    _require()
    return _C.cuda_bench_moe(x, params, dy, state_cfg, int(iters))
