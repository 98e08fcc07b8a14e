"""racedit.cuda — the CUDA backend's knobs (:func:`tf32`, :func:`expert_gemm`, :func:`info`,
:func:`bench_moe`) and, kept for one release, the names its ops had before every op took a
``device`` argument: each is a thin alias of the one op with ``device="cuda"``, e.g.
``route(s, k)`` is ``racedit.ops.route(s, k, device="cuda")`` and ``layernorm_forward(x)``
is ``racedit._C.dit_layernorm_forward(x, device="cuda")``. The model and the layer are
``racedit.RaceDiT(..., device="cuda")`` and ``racedit.MoE(..., device="cuda")``;
:class:`MoEState` with :func:`moe_forward` / :func:`moe_backward` is a MoE layer state on the
GPU fed with external parameters.

Without a usable GPU every function raises ``RuntimeError("CUDA not available: ...")``
(after checking its arguments, on a CUDA build); check :func:`racedit.cuda_available`.
Precision: fp32 GEMMs by default; :func:`tf32` opts in to TF32 tensor cores everywhere; the
expert GEMMs also take ``precision="fp32" | "tf32" | "bf16"``.
"""
import contextlib

import numpy as np

from . import _C, ops, optim

__all__ = [
    "route", "route_threshold", "gate_forward", "gate_backward", "router_forward",
    "router_backward", "experts_forward", "experts_backward", "MoEState", "moe_forward",
    "moe_backward", "tf32", "expert_gemm", "info", "bench_moe", "PRECISIONS",
    "layernorm_forward", "layernorm_backward", "modulate_forward", "modulate_backward",
    "gated_residual_forward", "gated_residual_backward", "silu_forward", "silu_backward",
    "timestep_embedding", "attention_forward", "attention_backward", "adamw_step",
    "grad_norm", "nonfinite_index", "precision_scope", "require_cuda",
]

PRECISIONS = ("fp32", "tf32", "bf16")
CUDA = "cuda"


def require_cuda():
    """RuntimeError saying why CUDA is not available (built without it, or no device)."""
    info = _C.build_info()
    if not info.get("cuda"):
        from ._build_info import BUILD_INFO

        why = BUILD_INFO.get("cuda_reason", "not built")
        raise RuntimeError(f"CUDA not available: racedit was built without CUDA ({why})")
    if _C.cuda_device_count() == 0:
        raise RuntimeError("CUDA not available: racedit was built with CUDA but no CUDA device "
                           "is usable (no GPU or no driver)")


# ---- the ops on the GPU (aliases) ----------------------------------------------------------
def _on_cuda(op):
    """``op`` with device="cuda": the alias of its former racedit.cuda name."""
    def alias(*args, **kwargs):
        return op(*args, device=CUDA, **kwargs)

    alias.__name__, alias.__doc__ = op.__name__, op.__doc__
    return alias


route, route_threshold = _on_cuda(ops.route), _on_cuda(ops.route_threshold)
gate_forward, gate_backward = _on_cuda(ops.gate_forward), _on_cuda(ops.gate_backward)
router_forward, router_backward = _on_cuda(ops.router_forward), _on_cuda(ops.router_backward)
experts_forward, experts_backward = _on_cuda(ops.experts_forward), _on_cuda(ops.experts_backward)
layernorm_forward = _on_cuda(_C.dit_layernorm_forward)
layernorm_backward = _on_cuda(_C.dit_layernorm_backward)
modulate_forward = _on_cuda(_C.dit_modulate_forward)
modulate_backward = _on_cuda(_C.dit_modulate_backward)
gated_residual_forward = _on_cuda(_C.dit_gated_residual_forward)
gated_residual_backward = _on_cuda(_C.dit_gated_residual_backward)
grad_norm, nonfinite_index = _on_cuda(optim.grad_norm), _on_cuda(optim.nonfinite_index)


def silu_forward(inp):
    return _C.dit_silu_forward(np.asarray(inp), device=CUDA)


def silu_backward(dout, inp):
    return _C.dit_silu_backward(np.asarray(dout), np.asarray(inp), device=CUDA)


def timestep_embedding(t, dim, max_period=10000.0):
    return _C.dit_timestep_embedding(t, int(dim), float(max_period), device=CUDA)


def _attention_precision(precision):
    """A bad precision is a ValueError naming it before any device is asked for."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision: expected 'fp32' or 'bf16', got {precision!r}")
    return precision


def attention_forward(qkv, num_heads, precision="fp32"):
    return _C.dit_attention_forward(qkv, int(num_heads), precision=_attention_precision(precision),
                                    device=CUDA)


def attention_backward(dout, qkv, att, num_heads, precision="fp32"):
    return _C.dit_attention_backward(dout, qkv, att, int(num_heads),
                                     precision=_attention_precision(precision), device=CUDA)


def adamw_step(params, grads, m, v, step, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
               weight_decay=0.0, grad_scale=1.0, ema=None, ema_decay=0.9999):
    optim.adamw_step(params, grads, m, v, lr=lr, step=step, beta1=betas[0], beta2=betas[1],
                     eps=eps, weight_decay=weight_decay, grad_scale=grad_scale, ema=ema,
                     ema_decay=ema_decay, device=CUDA)


# ---- a MoE layer state fed with external parameters ---------------------------------------
class MoEState:
    """One MoE layer's state on the GPU (the activations and dispatch of the last forward,
    the threshold tau) for :func:`moe_forward` / :func:`moe_backward`, which take the
    parameters (racedit.MoE's ``param_buffer`` layout, or a dict of its names) each call.
    Arguments as racedit.MoE's (dim, num_experts, k, hidden=4*dim/k, strategy, gating,
    beta, eval_topk, precision, plr_dim, sim_weight, balance_weight, plr_weight)."""

    def __init__(self, dim, num_experts, k, hidden=None, strategy="race", gating="identity",
                 beta=0.99, eval_topk=False, precision="fp32", plr_dim=0, sim_weight=0.0,
                 balance_weight=0.0, plr_weight=1.0):
        if hidden is None:
            if not k or (4 * dim) % k:
                raise ValueError(f"hidden: 4*dim/k = {4 * dim}/{k} is not an integer; pass hidden=")
            hidden = 4 * dim // k
        self._cap = _C.moe_new(device=CUDA, precision=precision, dim=dim, num_experts=num_experts,
                               expert_hidden=hidden, k=k, strategy=strategy, gating=gating,
                               beta=float(beta), eval_topk=bool(eval_topk), plr_dim=int(plr_dim),
                               sim_weight=float(sim_weight), balance_weight=float(balance_weight),
                               plr_weight=float(plr_weight))
        self.cfg = _C.moe_configure(self._cap)
        self.num_params = int(sum(_C.moe_param_sizes(self._cap)))

    @property
    def precision(self):
        """The expert GEMMs' precision (str); settable (a change drops the last forward)."""
        return _C.moe_precision(self._cap)

    @precision.setter
    def precision(self, precision):
        _C.moe_precision(self._cap, precision)

    def view(self):
        """What the last forward left: dict with ``mask`` (N,E) bool, ``G``, ``R`` (N,E),
        ``h`` (N,D) float32, ``counts`` (E,) int64, ``P`` (selected pairs), ``tau`` and
        ``tau_b`` (float or None), ``have_forward``."""
        get = lambda name: _C.moe_get(self._cap, name)  # noqa: E731
        d = {"tau": get("threshold"), "tau_b": get("batch_threshold"), "have_forward": False}
        mask = get("mask")
        if mask is not None:
            E, D = mask.shape[-1], self.cfg["dim"]
            d.update(have_forward=True, mask=mask.reshape(-1, E), G=get("gates").reshape(-1, E),
                     R=get("logits").reshape(-1, E), h=get("hidden").reshape(-1, D),
                     counts=get("counts"), P=get("pairs"))
        return d

    @property
    def aux(self):
        """The aux losses and diagnostics of the last forward: racedit.MoE.aux's dict."""
        return _C.moe_get(self._cap, "aux")

    @property
    def threshold(self):
        """The mean of the thresholds (race: tau itself; float) or None before the first
        training forward and for strategies without thresholds; settable with one value
        (None forgets)."""
        return _C.moe_get(self._cap, "threshold")

    @threshold.setter
    def threshold(self, tau):
        _C.moe_set_threshold(self._cap, None if tau is None else float(tau))

    @property
    def thresholds(self):
        """All thresholds (float32 (n,): 1 for race, E for BL, L for BE, 0 for token,
        expert and LE choice) or None before the first training forward; settable with
        1-D values (None forgets)."""
        return _C.moe_get(self._cap, "thresholds")

    @thresholds.setter
    def thresholds(self, tau):
        _C.moe_set_threshold(self._cap, tau)


def _flat(params, state):
    """A dict of the layer's parameters (names of racedit.MoE.params) or a flat float32
    buffer (racedit.MoE.param_buffer) -> the flat buffer."""
    if isinstance(params, dict):
        names = ("router_w", "router_b", "gate_w", "gate_b", "w1", "b1", "w2", "b2")
        names += ("plr_w", "plr_b") if state.cfg["plr_dim"] > 0 else ()
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"params: missing entries {missing}")
        return np.concatenate([np.asarray(params[n], np.float32).ravel() for n in names])
    return params


def moe_forward(state, x, params, training=True, plr_target=None):
    """y (B,L,D) = MoE(x (B,L,D)) on the GPU with ``state`` (:class:`MoEState`) and
    ``params``; as racedit.MoE.forward."""
    return _C.moe_forward(state._cap, x, _flat(params, state), bool(training), plr_target)


def moe_backward(state, dy, x, params, grads=None):
    """dx (B,L,D) of the last :func:`moe_forward` on ``state``; the parameter gradients
    ACCUMULATE into ``grads`` (flat float32, modified in place) or a new zero buffer.
    Returns ``(dx, grads)``."""
    if grads is None:
        grads = np.zeros(state.num_params, np.float32)
    return _C.moe_backward(state._cap, dy, x, _flat(params, state), grads), grads


# ---- knobs ------------------------------------------------------------------------------
@contextlib.contextmanager
def precision_scope(device, precision):
    """While a run of ``precision`` lasts on ``device``: TF32 tensor cores for the fp32
    GEMMs with "tf32" and "bf16" on CUDA (the routers' small GEMMs under bf16), the previous
    setting restored after; nothing on another device."""
    if device != CUDA:
        yield
        return
    was = tf32(precision in ("tf32", "bf16"))
    try:
        yield
    finally:
        tf32(was)


def tf32(on=None):
    """Read (on=None) or set TF32 tensor-core GEMMs (process-wide); returns the previous
    setting. Off by default: fp32 products as exact as the CPU's."""
    require_cuda()
    return _C.cuda_tf32(on)


def expert_gemm(mode=None):
    """Read (None) or set how the per-expert GEMMs run: 0 a loop of cublasGemmEx (default),
    1 one cublasGemmGroupedBatchedEx per product (a type combination cuBLAS refuses runs
    as the loop; ``info()["grouped_fallbacks"]`` counts them), 2 the loop spread over
    side streams. Returns the previous mode; ValueError for another value or when grouped
    GEMMs are not in the linked cuBLAS."""
    require_cuda()
    return _C.cuda_expert_gemm(mode)


def info():
    """Dict: ``cublas_version``, ``grouped_gemm`` (bool), ``runtime`` (CUDA runtime version),
    ``devices`` (count), ``grouped_fallbacks`` (type combinations grouped GEMMs refused)
    and ``grouped_refused`` (which: "operands->results", e.g. "bf16->fp32")."""
    require_cuda()
    return _C.cuda_info()


def bench_moe(state_cfg, x, params, dy, iters=20, precision="fp32"):
    """Device-resident timings (ms per call) of the layer described by ``state_cfg`` (a
    :class:`MoEState`'s ``cfg``, or a dict with D, E, He for dim, num_experts, expert_hidden)
    on x, dy (B,L,D) and ``params`` (flat): routing, forward, forward+backward, experts
    alone, and dense GEMMs of equal FLOPs, all with the expert ``precision``. Returns a dict
    of ms and ``P``."""
    require_cuda()
    names = {"D": "dim", "E": "num_experts", "He": "expert_hidden"}
    settings = {names.get(k, k): v for k, v in state_cfg.items()}
    return _C.cuda_bench_moe(x, params, dy, int(iters), precision, **settings)
