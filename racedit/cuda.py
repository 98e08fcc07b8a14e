"""racedit.cuda — the CUDA backend's ops on NumPy arrays: the same names, arguments and
results as racedit.ops (CPU), computed on the GPU. Every call copies its inputs to the
device and its results back (copies at the boundary); :class:`MoEState` keeps one MoE
layer's activations, dispatch and threshold on the device between forward and backward.

Shapes: B batch, L tokens per image, N = B*L tokens, D width, E experts, He expert hidden.
Inputs are converted like racedit.ops (float64/float16 or non-contiguous arrays become a
C-contiguous float32 copy; masks must be bool). Results are float32 (bool for masks).

The whole model and the layer have device classes of their own:
``racedit.RaceDiT(..., device="cuda")`` (racedit.cuda_model.CudaRaceDiT: every layer, the
loss and AdamW + EMA on the device, ``step`` returning only scalars) and
``racedit.MoE(..., device="cuda")`` (racedit.cuda_moe.CudaMoE).

Without a usable GPU (racedit built without CUDA, or no device) every function raises
``RuntimeError("CUDA not available: ...")``; check :func:`racedit.cuda_available` first.
Precision: fp32 GEMMs by default; :func:`tf32` opts in to TF32 tensor cores everywhere.
The expert GEMMs also take a per-call / per-layer ``precision``: ``"fp32"``, ``"tf32"``, or
``"bf16"`` (bf16 copies of the activations and expert weights feed the GEMMs with fp32
accumulation; fp32 master weights, gradients, biases, combine, router, gate and routing).
"""
import numpy as np

from . import _C

__all__ = [
    "route", "route_threshold", "gate_forward", "gate_backward", "router_forward",
    "router_backward", "experts_forward", "experts_backward", "MoEState", "moe_forward",
    "moe_backward", "tf32", "expert_gemm", "info", "bench_moe", "PRECISIONS",
    "layernorm_forward", "layernorm_backward", "modulate_forward", "modulate_backward",
    "gated_residual_forward", "gated_residual_backward", "silu_forward", "silu_backward",
    "timestep_embedding", "attention_forward", "attention_backward", "adamw_step",
    "grad_norm", "nonfinite_index",
]

PRECISIONS = ("fp32", "tf32", "bf16")


def _prec(precision):
    """'fp32' | 'tf32' | 'bf16' -> 0 | 1 | 2; ValueError otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    return PRECISIONS.index(precision)

PARAM_NAMES = ("router_w", "router_b", "gate_w", "gate_b", "w1", "b1", "w2", "b2")


def _require_build():
    """RuntimeError when racedit was built without CUDA (there are no cuda_* entry points).
    The stateless ops call only this: their bindings check the arguments first and the
    device after, so bad input is a TypeError / ValueError on any CUDA build, GPU or not."""
    info = _C.build_info()
    if not info.get("cuda"):
        from ._build_info import BUILD_INFO

        why = BUILD_INFO.get("cuda_reason", "not built")
        raise RuntimeError(f"CUDA not available: racedit was built without CUDA ({why})")


def _require():
    _require_build()
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
    _require_build()
    mask, tau = _C.cuda_route(scores, k, strategy)
    return (mask, tau) if return_tau else mask


def route_threshold(scores, tau):
    """GPU twin of :func:`racedit.ops.route_threshold`: bool ``scores >= tau`` (same shape),
    ValueError for NaN tau or NaN scores."""
    _require_build()
    return _C.cuda_route_threshold(scores, tau)


def gate_forward(R, gating="identity"):
    """G (N,E) float32 = gate(R (N,E)); gating ``identity``, ``sigmoid`` or ``softmax``."""
    _require_build()
    return _C.cuda_gate_forward(R, gating)


def gate_backward(dG, G, gating="identity"):
    """dR (N,E) float32 from dG (N,E) and the forward output G (N,E)."""
    _require_build()
    return _C.cuda_gate_backward(dG, G, gating)


def router_forward(x, Wr, br, Wg, bg):
    """The router MLP on the GPU: x (N,D), Wr (D,D), br (D,), Wg (D,E), bg (E,) ->
    ``(hpre (N,D), h = GELU_erf(hpre) (N,D), R (N,E))``."""
    _require_build()
    return _C.cuda_router_forward(x, Wr, br, Wg, bg)


def router_backward(dR, hpre, h, x, Wr, Wg, dh_extra=None):
    """Backward of :func:`router_forward`: dR (N,E), the forward's hpre, h (N,D), x (N,D),
    Wr (D,D), Wg (D,E), optional dh_extra (N,D) -> ``(dx, dWr, dbr, dWg, dbg)``."""
    _require_build()
    return _C.cuda_router_backward(dR, hpre, h, x, Wr, Wg, dh_extra)


def experts_forward(x, mask, G, w1, b1, w2, b2, precision="fp32"):
    """Dropless experts + gated combine on the GPU: y (N,D) with
    ``y_t = sum_e mask[t,e] G[t,e] (GELU_tanh(x_t w1[e] + b1[e]) w2[e] + b2[e])``.

    x (N,D), mask (N,E) bool, G (N,E), w1 (E,D,He), b1 (E,He), w2 (E,He,D), b2 (E,D);
    precision of the expert GEMMs: ``"fp32"`` (default), ``"tf32"`` or ``"bf16"``."""
    _require_build()
    return _C.cuda_experts_forward(x, mask, G, w1, b1, w2, b2, _prec(precision))


def experts_backward(dy, x, mask, G, w1, b1, w2, b2, precision="fp32"):
    """Backward of :func:`experts_forward` (forward recomputed on the device, mask held
    constant): ``(dx (N,D), dG (N,E), dw1, db1, dw2, db2)``; dG is 0 off the mask.
    Bitwise reproducible run to run (no float atomics). precision as in experts_forward."""
    _require_build()
    return _C.cuda_experts_backward(dy, x, mask, G, w1, b1, w2, b2, _prec(precision))


def _flat(params, total, name, plr=False):
    """A dict of the layer's parameters (names of racedit.MoE.params) or a flat float32
    buffer (racedit.MoE.param_buffer) -> the flat float32 buffer."""
    if isinstance(params, dict):
        names = PARAM_NAMES + (("plr_w", "plr_b") if plr else ())
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"{name}: missing entries {missing}")
        flat = np.concatenate([np.asarray(params[n], np.float32).ravel() for n in names])
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
        EMA in [0, 1)), eval_topk (eval mode keeps batch top-K), precision of the expert
        GEMMs (``"fp32"``, ``"tf32"``, ``"bf16"``; the router, gate and routing stay fp32, so
        the masks do not depend on it).

    Aux losses, as racedit.MoE: plr_dim (width of the PLR head on the router hidden, 0:
    none), sim_weight, balance_weight (0: off) and plr_weight (default 1.0). In training
    forwards they are computed on the GPU (the PLR loss when :func:`moe_forward` gets a
    ``plr_target``) and their weighted gradients enter :func:`moe_backward`; :attr:`aux`
    holds their values and the routing diagnostics of every forward.

    The parameter layout is racedit.MoE's (``param_buffer``): pass that buffer, or a dict
    with its names, to :func:`moe_forward` / :func:`moe_backward`. Raises RuntimeError
    without a GPU, ValueError for a bad configuration.
    """

    def __init__(self, dim, num_experts, k, hidden=None, strategy="race", gating="identity",
                 beta=0.99, eval_topk=False, precision="fp32", plr_dim=0, sim_weight=0.0,
                 balance_weight=0.0, plr_weight=1.0):
        _require()
        prec = _prec(precision)
        if hidden is None:
            if not k or (4 * dim) % k:
                raise ValueError(f"hidden: 4*dim/k = {4 * dim}/{k} is not an integer; pass hidden=")
            hidden = 4 * dim // k
        self.cfg = dict(D=dim, E=num_experts, He=hidden, k=k, strategy=strategy, gating=gating,
                        beta=float(beta), eval_topk=bool(eval_topk), plr_dim=int(plr_dim),
                        sim_weight=float(sim_weight), balance_weight=float(balance_weight),
                        plr_weight=float(plr_weight))
        if self.cfg["plr_dim"] < 0:
            raise ValueError(f"plr_dim: expected >= 0, got {plr_dim}")
        for n in ("sim_weight", "balance_weight", "plr_weight"):
            w = self.cfg[n]
            if not (w >= 0.0 and np.isfinite(w)):
                raise ValueError(f"{n}: expected a finite number >= 0, got {w}")
        if num_experts < 2 and (self.cfg["sim_weight"] > 0 or self.cfg["balance_weight"] > 0):
            raise ValueError(f"sim_weight / balance_weight > 0 need num_experts >= 2, got {num_experts}")
        D, E, He, Pd = dim, num_experts, hidden, self.cfg["plr_dim"]
        self.num_params = (D * D + D + D * E + E + 2 * E * D * He + E * He + E * D
                           + D * Pd + Pd)
        self._cap = _C.cuda_moe_state()
        _C.cuda_moe_precision(self._cap, prec)

    @property
    def precision(self):
        """The expert GEMMs' precision (str); settable (a change drops the last forward)."""
        return PRECISIONS[_C.cuda_moe_precision(self._cap)]

    @precision.setter
    def precision(self, precision):
        _C.cuda_moe_precision(self._cap, _prec(precision))

    def view(self):
        """What the last forward left: dict with ``mask`` (N,E) bool, ``G``, ``R`` (N,E),
        ``h`` (N,D) float32, ``counts`` (E,) int64, ``P`` (selected pairs), ``tau`` and
        ``tau_b`` (float or None), ``have_forward``."""
        return _C.cuda_moe_view(self._cap)

    @property
    def aux(self):
        """The aux losses and diagnostics of the last forward (None before any): the dict of
        racedit.MoE.aux (``sim_loss``, ``balance_loss``, ``plr_loss`` (None when not
        computed), ``aux_loss``, ``max_violation``, ``combination_usage``, ``dead_experts``,
        ``experts_per_token``, ``expert_load``, ``threshold``, ``batch_threshold``,
        ``plr_pred`` (B,L,plr_dim) or None, ``training``)."""
        return _C.cuda_moe_aux(self._cap, self.cfg["plr_dim"])

    @property
    def threshold(self):
        """tau (float) or None before the first training forward; settable (None forgets)."""
        return self.view()["tau"]

    @threshold.setter
    def threshold(self, tau):
        _C.cuda_moe_set_threshold(self._cap, None if tau is None else float(tau))


def moe_forward(state, x, params, training=True, plr_target=None):
    """y (B,L,D) float32 = MoE(x (B,L,D)) on the GPU with the layer state ``state``
    (:class:`MoEState`) and ``params`` (flat buffer or dict). training: batch top-K, a
    tau update and the aux losses; else ``G >= tau`` (or batch top-K, nothing updated,
    with eval_topk, token choice, or while the layer has no tau yet). plr_target
    (B,L,plr_dim): the PLR head's regression target (training only). Raises ValueError
    (shapes, NaN gate scores, non-finite target or logits under an aux loss, plr_target
    without a head)."""
    flat = _flat(params, state.num_params, "params", state.cfg["plr_dim"] > 0)
    return _C.cuda_moe_forward(state._cap, x, flat, state.cfg, bool(training), plr_target)


def moe_backward(state, dy, x, params, grads=None):
    """dx (B,L,D) of the last :func:`moe_forward` on ``state`` (same x, params). Parameter
    gradients ACCUMULATE into ``grads`` (a flat float32 buffer of the params' layout,
    modified in place) or into a new zero buffer. Returns ``(dx, grads)``."""
    flat = _flat(params, state.num_params, "params", state.cfg["plr_dim"] > 0)
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
    1 one cublasGemmGroupedBatchedEx per product (a type combination cuBLAS refuses runs
    as the loop; ``info()["grouped_fallbacks"]`` counts them), 2 the loop spread over
    side streams. Returns the previous mode; ValueError for another value or when grouped
    GEMMs are not in the linked cuBLAS."""
    _require()
    return _C.cuda_expert_gemm(mode)


def info():
    """Dict: ``cublas_version``, ``grouped_gemm`` (bool), ``runtime`` (CUDA runtime version),
    ``devices`` (count), ``grouped_fallbacks`` (type combinations grouped GEMMs refused)
    and ``grouped_refused`` (which: "operands->results", e.g. "bf16->fp32")."""
    _require()
    return _C.cuda_info()


def bench_moe(state_cfg, x, params, dy, iters=20, precision="fp32"):
    """Device-resident timings (ms per call) of the layer described by ``state_cfg`` (a
    :class:`MoEState`'s ``cfg`` dict) on x, dy (B,L,D) and ``params`` (flat): routing,
    forward, forward+backward, experts alone, and dense GEMMs of equal FLOPs, all with the
    expert ``precision``. Returns a dict of ms and ``P``."""
    _require()
    return _C.cuda_bench_moe(x, params, dy, state_cfg, int(iters), _prec(precision))


# ---- DiT layers and the optimiser (the CPU model / optimiser ops, on the GPU) -------------
def layernorm_forward(inp):
    """LayerNorm without affine over the last dim (eps 1e-6, biased variance) of inp (N,D)
    -> ``(out (N,D), rstd (N,))`` float32."""
    _require_build()
    return _C.cuda_layernorm_forward(inp)


def layernorm_backward(dout, out, rstd, dinp_acc=None):
    """d(inp) (N,D) of :func:`layernorm_forward` from dout (N,D), its out (N,D) and rstd (N,),
    added to ``dinp_acc`` (N,D; not modified) when given."""
    _require_build()
    return _C.cuda_layernorm_backward(dout, out, rstd, dinp_acc)


def modulate_forward(inp, shift, scale):
    """adaLN modulate: out (B,L,D) = inp * (1 + scale[b]) + shift[b] for inp (B,L,D) and
    shift, scale (B,S) with S >= D (rows of a wider adaLN output; the first D columns used)."""
    _require_build()
    return _C.cuda_modulate_forward(inp, shift, scale)


def modulate_backward(dout, inp, scale):
    """``(dinp (B,L,D), dshift (B,S), dscale (B,S))`` of :func:`modulate_forward` (columns
    past D of dshift / dscale are 0)."""
    _require_build()
    return _C.cuda_modulate_backward(dout, inp, scale)


def gated_residual_forward(inp, h, gate):
    """out (B,L,D) = inp + gate[b] * h for inp, h (B,L,D) and gate (B,S), S >= D."""
    _require_build()
    return _C.cuda_gated_residual_forward(inp, h, gate)


def gated_residual_backward(dout, h, gate):
    """``(dh (B,L,D), dgate (B,S))`` of :func:`gated_residual_forward` (d(inp) = dout)."""
    _require_build()
    return _C.cuda_gated_residual_backward(dout, h, gate)


def silu_forward(inp):
    """SiLU(inp) = inp * sigmoid(inp), float32 of inp's shape."""
    _require_build()
    a = np.ascontiguousarray(inp, np.float32)
    return _C.cuda_silu(a.reshape(-1)).reshape(a.shape)


def silu_backward(dout, inp):
    """d(inp) of :func:`silu_forward` given dout (same shape as inp)."""
    _require_build()
    a = np.ascontiguousarray(inp, np.float32)
    g = np.ascontiguousarray(dout, np.float32)
    if g.shape != a.shape:
        raise ValueError(f"dout: expected shape {a.shape} like inp, got {g.shape}")
    return _C.cuda_silu(g.reshape(-1), a.reshape(-1)).reshape(a.shape)


def timestep_embedding(t, dim, max_period=10000.0):
    """DiT's sinusoidal embedding: (B, dim) float32, [cos(t f) | sin(t f)] with
    f_k = max_period^(-k/(dim/2)); t (B,) float32, dim even."""
    _require_build()
    return _C.cuda_timestep_embedding(t, int(dim), float(max_period))


def _attention_bf16(precision):
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision: expected 'fp32' or 'bf16', got {precision!r}")
    return precision == "bf16"


def attention_forward(qkv, num_heads, precision="fp32"):
    """Multi-head softmax attention of qkv (B,L,3D) = [q | k | v] -> ``(out (B,L,D),
    att (B,NH,L,L))``, scores scaled by 1/sqrt(D/NH). ``precision="bf16"`` rounds the GEMM
    operands (q, k, v and the probabilities) to bf16 with fp32 accumulation; the softmax
    and both results stay fp32."""
    bf = _attention_bf16(precision)
    _require_build()
    return _C.cuda_attention_forward(qkv, int(num_heads), bf)


def attention_backward(dout, qkv, att, num_heads, precision="fp32"):
    """dqkv (B,L,3D) of :func:`attention_forward` from dout (B,L,D), qkv and its att;
    ``precision`` as there (bf16: dout, qkv, att and the score gradients are rounded)."""
    bf = _attention_bf16(precision)
    _require_build()
    return _C.cuda_attention_backward(dout, qkv, att, int(num_heads), bf)


def adamw_step(params, grads, m, v, step, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
               weight_decay=0.0, grad_scale=1.0, ema=None, ema_decay=0.9999):
    """One AdamW step (torch.optim.AdamW arithmetic, bit for bit the CPU optimiser's) on
    1-d float32 buffers, IN PLACE: params, m, v (and ``ema`` <- ema_decay*ema +
    (1-ema_decay)*params with the updated params, in the same pass, when given). step is
    1-based. Raises ValueError for bad hyper-parameters, TypeError for non-float32 buffers."""
    _require_build()
    _C.cuda_adamw_step(params, grads, m, v, ema, float(lr), float(betas[0]), float(betas[1]),
                       float(eps), float(weight_decay), int(step), float(grad_scale),
                       float(ema_decay))


def grad_norm(grads):
    """sqrt(sum grads^2) (float) of a 1-d float32 buffer, accumulated in double."""
    _require_build()
    return _C.cuda_grad_norm(grads)


def nonfinite_index(x):
    """The first index of a NaN / inf in the 1-d float32 x, or -1."""
    _require_build()
    return _C.cuda_nonfinite_index(x)
