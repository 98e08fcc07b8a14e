"""racedit.torch — Expert Race as a ``torch.nn.Module`` computed by racedit's C kernels.

:class:`RaceMoE` is the MoE FFN of :class:`racedit.MoE` (SPEC §2) as a torch module: named
parameters shaped like ``racedit.MoE.params``, the threshold tau as a buffer (so
``state_dict()`` round-trips), ``train()`` / ``eval()`` switching batch top-K and threshold
routing, and the aux losses as tensors in the autograd graph (``module.aux_loss``).

The layer's forward and backward are one ``torch.autograd.Function`` around racedit's
per-layer state (csrc/moe.h), which reads and writes the tensors' memory by address: x, y,
dx, the parameter gradients, and the parameters as views of one flat buffer in racedit's
layout. Its outputs include the router's logits R and hidden h, on which the aux losses
and the PLR head are autograd Functions of their own, so an aux loss contributes to the
gradients exactly as much as the incoming gradient of that loss tensor says; nothing is
added behind autograd's back. See docs/torch.md for what runs where and what is copied.

``import racedit`` never imports this module (nor torch); import ``racedit.torch``.
"""
import contextlib

import numpy as np
import torch
from torch import nn

from . import _C
from .moe import MoE, check_loss_weight

__all__ = ["RaceMoE", "from_racedit", "to_racedit", "dit_state_dict_to_torch",
           "load_torch_dit_state_dict", "PARAM_NAMES"]

PARAM_NAMES = ("router_w", "router_b", "gate_w", "gate_b", "w1", "b1", "w2", "b2")


class RaceMoEShapeError(ValueError, RuntimeError):
    """A tensor of the wrong shape (a ValueError, and a RuntimeError as torch raises)."""


class RaceMoETypeError(TypeError, RuntimeError):
    """A tensor of the wrong dtype or device (a TypeError, and a RuntimeError as torch raises)."""


# ---- tensors <-> the C core's arrays ---------------------------------------------------

def _np(t):
    """The float32 / bool C-contiguous NumPy array of tensor t: a view of its memory on the
    CPU (no copy), a host copy of a CUDA tensor (the CUDA ops stage host arrays)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().numpy()


def _t(a, device):
    """A tensor holding NumPy array a: the same memory on the CPU, a copy on a device."""
    t = torch.from_numpy(a)
    return t if device.type == "cpu" else t.to(device)


def _op_device(t):
    return "cuda" if t.device.type == "cuda" else "cpu"


# ---- the ops as autograd Functions ------------------------------------------------------

class _Layer(torch.autograd.Function):
    """(x (B,L,D), *params) -> (y (B,L,D), R (N,E) or None, h (N,D) or None): the layer's
    fused forward / backward in racedit's per-layer state (csrc/moe.h) on the module's flat
    parameter buffer. R and h, the router's logits and hidden state, are outputs for the aux
    losses and the PLR head; the gradients reaching them go through one more router
    backward. A backward whose forward a later forward of the same layer replaced (the
    layer called twice in one graph) recomputes the experts from the saved mask and gates."""

    @staticmethod
    def forward(ctx, x, m, want_R, want_h, *params):
        st = m._state(x)
        B, L, D = x.shape
        y = torch.empty_like(x)
        with _racedit_stream(x):
            _C.moe_forward_ptr(st, y.data_ptr(), x.data_ptr(), m._flat.data_ptr(), B, L, m.training)
        m._generation += 1
        ctx.m, ctx.gen, ctx.precision = m, m._generation, m._precision(x)
        ctx.mask, ctx.G = _C.moe_get(st, "mask"), _C.moe_get(st, "gates")   # (B,L,E) host
        m._last_mask = ctx.mask
        ctx.save_for_backward(x, *params)
        R = _t(_C.moe_get(st, "logits").reshape(-1, m.num_experts), x.device) if want_R else None
        h = _t(_C.moe_get(st, "hidden").reshape(-1, D), x.device) if want_h else None
        return y, R, h

    @staticmethod
    def backward(ctx, dy, dR, dh):
        x, *params = ctx.saved_tensors
        m = ctx.m
        dy = torch.zeros_like(x) if dy is None else dy.to(torch.float32).contiguous()
        if ctx.gen == m._generation:  # the state still holds this forward
            dx, flat = torch.empty_like(x), _grad_scratch(m)
            with _racedit_stream(x):
                _C.moe_backward_ptr(m._state(x), dx.data_ptr(), flat.data_ptr(), dy.data_ptr(),
                                    x.data_ptr(), m._flat.data_ptr())
            grads = _split(flat, params)
            if not x.is_cuda:  # autograd may keep what it is given: never the scratch itself
                grads = [g.clone() for g in grads]
        else:
            dx, dR_gate, expert_grads = _experts_gate_backward(dy, x, ctx, params)
            dR = dR_gate if dR is None else dR_gate + dR
            grads = [torch.zeros_like(p) for p in params[:4]] + expert_grads
        if dR is not None or dh is not None:
            dxr, router_grads = _router_backward(dR, dh, x, params)
            dx = dx + dxr.reshape(dx.shape)
            grads[:4] = [g + r for g, r in zip(grads[:4], router_grads)]
        return (dx, None, None, None, *grads)


def _grad_scratch(m):
    """A zeroed buffer shaped like the flat parameters for racedit's accumulating backward.
    On the CPU it is kept by the module between backwards: a fresh zeroed allocation of
    that size is mapped and faulted in page by page on every call (glibc maps blocks above
    32 MB), which costs more than the layer's own backward at D = 384; zeroing a kept one
    and copying out per-parameter gradients does not. On CUDA torch's caching allocator
    already reuses the memory."""
    if m._flat.is_cuda:
        return torch.zeros_like(m._flat)
    g = m.__dict__.get("_grad_buf")
    if g is None or g.shape != m._flat.shape:
        g = m.__dict__["_grad_buf"] = torch.zeros_like(m._flat)
    else:
        g.zero_()
    return g


@contextlib.contextmanager
def _racedit_stream(x):
    """racedit queues its CUDA work on the legacy default stream: order it after the work
    of torch's current stream, and that stream's later work after it (waits on the GPU, no
    host synchronisation). Nothing to do on the CPU or on the default stream."""
    if not x.is_cuda:
        yield
        return
    with torch.cuda.device(x.device):
        cur, default = torch.cuda.current_stream(), torch.cuda.default_stream()
        if cur != default:
            default.wait_stream(cur)
        yield
        if cur != default:
            cur.wait_stream(default)


def _split(flat, like):
    """Views of flat shaped like each tensor of `like`, in order."""
    out, off = [], 0
    for p in like:
        out.append(flat[off:off + p.numel()].view(p.shape))
        off += p.numel()
    return out


def _experts_gate_backward(dy, x, ctx, params):
    """dx (B,L,D), dR (N,E) and [dw1, db1, dw2, db2] of the experts and the gate at the
    mask and gates the forward saved, on x's device (computed on staged host arrays)."""
    m, N = ctx.m, x.shape[0] * x.shape[1]
    mask, G = ctx.mask.reshape(N, -1), ctx.G.reshape(N, -1)
    dx, dG, *dw = _C.experts_backward(_np(dy).reshape(N, -1), _np(x).reshape(N, -1), mask, G,
                                      *(_np(p) for p in params[4:8]), ctx.precision,
                                      device=_op_device(x))
    dR = _C.gate_backward(dG, G, m.gating, device=_op_device(x))
    return (_t(dx.reshape(x.shape), x.device), _t(dR, x.device),
            [_t(a, x.device) for a in dw])


def _router_backward(dR, dh, x, params):
    """dx (N,D) and [dWr, dbr, dWg, dbg] of the router for dR (N,E) and dh (N,D) (either
    may be None), its forward recomputed for the pre-activation; on x's device."""
    xf = _np(x).reshape(x.shape[0] * x.shape[1], -1)
    Wr, br, Wg, bg = (_np(p) for p in params[:4])
    dev = _op_device(x)
    hpre, h, _ = _C.router_forward(xf, Wr, br, Wg, bg, device=dev)
    dR = np.zeros((xf.shape[0], Wg.shape[1]), np.float32) if dR is None else _np(dR)
    extra = None if dh is None else _np(dh)
    dxr, *g = _C.router_backward(dR, hpre, h, xf, Wr, Wg, extra, device=dev)
    return _t(dxr, x.device), [_t(a, x.device) for a in g]


class _RouterLoss(torch.autograd.Function):
    """R (N,E) -> L_sim or L_bal (a 0-d tensor) for the selection mask (N,E) bool ndarray;
    its gradient is the incoming gradient of the loss times the C op's dL/dR."""

    @staticmethod
    def forward(ctx, R, mask, fn):
        value, dR = fn(_np(R), mask)
        ctx.dR, ctx.device = dR, R.device
        return torch.tensor(value, dtype=torch.float32, device=R.device)

    @staticmethod
    def backward(ctx, g):
        return g * _t(ctx.dR, ctx.device), None, None


class _PLRHead(torch.autograd.Function):
    """(h (N,D), wt (D,P), bt (P)) -> T (N,P) = h wt + bt."""

    @staticmethod
    def forward(ctx, h, wt, bt):
        T = _C.plr_head_forward(_np(h), _np(wt), _np(bt))
        ctx.save_for_backward(h, wt)
        return _t(T, h.device)

    @staticmethod
    def backward(ctx, dT):
        h, wt = ctx.saved_tensors
        out = _C.plr_head_backward(_np(dT), _np(h), _np(wt))
        return tuple(_t(a, h.device) for a in out)


class _PLRLoss(torch.autograd.Function):
    """(T, target) -> mean((T - target)^2), a 0-d tensor."""

    @staticmethod
    def forward(ctx, T, target):
        value, dT = _C.plr_loss(_np(T), _np(target))
        ctx.dT, ctx.device = dT, T.device
        return torch.tensor(value, dtype=torch.float32, device=T.device)

    @staticmethod
    def backward(ctx, g):
        dT = g * _t(ctx.dT, ctx.device)
        return dT, -dT


# ---- the module ----------------------------------------------------------------------------

def _hidden_width(dim, k, hidden):
    if hidden is not None:
        return hidden
    if k == 0 or (4 * dim) % k:
        raise ValueError(f"hidden: 4*dim/k = {4 * dim}/{k} is not an integer; pass hidden= "
                         "(the expert width) explicitly")
    return 4 * dim // k


class RaceMoE(nn.Module):
    """A Mixture-of-Experts FFN routed by Expert Race, computed by racedit's kernels.

    ``y = sum_e M[t,e] G[t,e] FFN_e(x_t)`` with the router ``R = GELU(x Wr + br) Wg + bg``,
    gates ``G = gate(R)`` and M a top-K of G over the strategy's groups (training) or
    ``G >= threshold`` (eval); exactly :class:`racedit.MoE`, see there for the arguments.

    Args:
        dim, num_experts, k, strategy, gating, hidden, beta, plr_dim, sim_weight,
        balance_weight, plr_weight, eval_topk: as for :class:`racedit.MoE`.
        precision: of the expert GEMMs on CUDA (``"fp32"``, ``"tf32"``, ``"bf16"``); under
            ``torch.autocast("cuda", torch.bfloat16)`` the experts compute in bf16.
        device, dtype: factory kwargs as for ``torch.nn`` modules; dtype must be float32.

    Parameters (named and shaped like ``racedit.MoE.params``): ``router_w`` (D,D),
    ``router_b`` (D), ``gate_w`` (D,E), ``gate_b`` (E), ``w1`` (E,D,He), ``b1`` (E,He),
    ``w2`` (E,He,D), ``b2`` (E,D), and with plr_dim > 0 ``plr_w`` (D,plr_dim), ``plr_b``.
    Buffers: ``threshold``, the eval-mode thresholds of :attr:`racedit.MoE.threshold`:
    race 0-d, BL (E,), BE (L,) (empty until the first training forward gives L), token,
    expert and LE choice empty (they keep their exact top-K at inference); NaN (race, BL)
    or empty (BE) until the first training forward sets them.

    After each forward: ``aux_loss`` (0-d tensor in the graph: the weighted sum of the aux
    losses this forward computed; add it to your loss) and ``aux`` (a dict: ``sim_loss``,
    ``balance_loss``, ``plr_loss`` as graph tensors or None, ``aux_loss``, ``plr_pred``
    and the detached diagnostics ``mask`` (B,L,E) bool, ``max_violation``,
    ``combination_usage``, ``experts_per_token``, ``dead_experts``, ``expert_load``,
    ``threshold``, ``batch_threshold``, ``training``).
    """

    def __init__(self, dim, num_experts, k, strategy="race", gating="identity", hidden=None,
                 beta=0.99, plr_dim=0, sim_weight=0.0, balance_weight=0.0, plr_weight=1.0,
                 eval_topk=False, precision="fp32", device=None, dtype=None):
        super().__init__()
        if dtype is not None and dtype != torch.float32:
            raise RaceMoETypeError(f"dtype: racedit computes in float32, got {dtype}")
        hidden = _hidden_width(dim, k, hidden)
        weights = {n: check_loss_weight(n, v) for n, v in (
            ("sim_weight", sim_weight), ("balance_weight", balance_weight), ("plr_weight", plr_weight))}
        # racedit's own checks of every setting (the layer's C states are made on first use)
        _C.moe_new(precision=precision, dim=dim, num_experts=num_experts, expert_hidden=hidden,
                   k=k, strategy=strategy, gating=gating, beta=float(beta),
                   eval_topk=bool(eval_topk), plr_dim=plr_dim, **weights)
        self.dim, self.num_experts, self.k, self.hidden = dim, num_experts, k, hidden
        self.strategy, self.gating, self.plr_dim = strategy, gating, plr_dim
        self.beta, self.eval_topk, self.precision = float(beta), bool(eval_topk), precision
        self.sim_weight, self.balance_weight = weights["sim_weight"], weights["balance_weight"]
        self.plr_weight = weights["plr_weight"]
        D, E, He = dim, num_experts, hidden
        shapes = dict(router_w=(D, D), router_b=(D,), gate_w=(D, E), gate_b=(E,), w1=(E, D, He),
                      b1=(E, He), w2=(E, He, D), b2=(E, D), plr_w=(D, plr_dim), plr_b=(plr_dim,))
        for name in PARAM_NAMES + (("plr_w", "plr_b") if plr_dim else ()):
            self.register_parameter(name, nn.Parameter(torch.empty(shapes[name], device=device)))
        self.register_buffer("threshold", self._unset_threshold(device))
        self.aux, self.aux_loss = None, None
        self._states, self._flat, self._generation = {}, None, 0
        self.flatten_parameters()
        self.reset_parameters()

    def reset_parameters(self):
        """racedit.MoE's initialisation, drawn from torch's generator: zero biases,
        xavier-uniform router_w, gate_w (and plr_w), and every expert a slice of a dense
        4·D MLP (bound sqrt(6/(D+4D))). Forgets the threshold."""
        D, E = self.dim, self.num_experts
        bound = lambda fi, fo: (6.0 / (fi + fo)) ** 0.5  # noqa: E731
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.zero_()
            self.router_w.uniform_(-bound(D, D), bound(D, D))
            self.gate_w.uniform_(-bound(D, E), bound(D, E))
            self.w1.uniform_(-bound(D, 4 * D), bound(D, 4 * D))
            self.w2.uniform_(-bound(4 * D, D), bound(4 * D, D))
            if self.plr_dim:
                self.plr_w.uniform_(-bound(D, self.plr_dim), bound(D, self.plr_dim))
            self.threshold = self._unset_threshold(self.threshold.device)

    def _unset_threshold(self, device):
        """The threshold buffer before any training forward (see the class)."""
        shape = {"race": (), "bl": (self.num_experts,)}.get(self.strategy, (0,))
        return torch.full(shape, float("nan"), device=device)

    def _threshold_value(self):
        """The buffer as racedit.MoE.threshold takes it: None when unset, a float for race,
        a float32 array for BL / BE."""
        t = self.threshold.detach()
        if t.numel() == 0 or bool(torch.isnan(t).any()):
            return None
        return float(t) if self.strategy == "race" else t.float().cpu().numpy()

    def _set_threshold_value(self, tau):
        """Set the buffer from racedit's value (None, a float or an array)."""
        if tau is None:
            self.threshold = self._unset_threshold(self.threshold.device)
            return
        t = torch.as_tensor(np.asarray(tau, np.float32), device=self.threshold.device)
        if t.shape == self.threshold.shape:
            with torch.no_grad():
                self.threshold.copy_(t)
        else:                                    # BE: the first L, or another sequence length
            self.threshold = t.clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # BE's buffer takes its length L from the state it loads
        t = state_dict.get(prefix + "threshold")
        if (self.strategy == "be" and isinstance(t, torch.Tensor) and t.ndim == 1
                and t.shape != self.threshold.shape):
            self.threshold = torch.empty_like(t, device=self.threshold.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        return (f"dim={self.dim}, num_experts={self.num_experts}, k={self.k}, "
                f"hidden={self.hidden}, strategy={self.strategy!r}, gating={self.gating!r}, "
                f"beta={self.beta:g}, plr_dim={self.plr_dim}, sim_weight={self.sim_weight:g}, "
                f"balance_weight={self.balance_weight:g}")

    # ---- forward -----------------------------------------------------------------------
    def forward(self, x, plr_target=None):
        """y (B,L,D) = MoE(x (B,L,D)); see the class. plr_target (B,L,plr_dim): the PLR
        head's regression target (training mode, plr_dim > 0)."""
        x, plr_target = self._check_input(x, plr_target)
        return _race_forward(self, x, plr_target)

    def _check_input(self, x, plr_target):
        if not isinstance(x, torch.Tensor):
            raise RaceMoETypeError(f"RaceMoE: expected x to be a torch.Tensor, got {type(x).__name__}")
        x = self._as_float32(x, "x")
        if x.dim() != 3 or x.shape[2] != self.dim:
            raise RaceMoEShapeError(f"RaceMoE: expected x of shape (B, L, {self.dim}), but got "
                                    f"input of size: {list(x.shape)}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise RaceMoEShapeError(f"RaceMoE: expected x with B, L >= 1, got input of size: {list(x.shape)}")
        for name, p in self.named_parameters():
            if p.dtype != torch.float32:
                raise RaceMoETypeError(f"RaceMoE: parameter {name} must be float32 (racedit "
                                       f"computes in float32), got {p.dtype}")
            if p.device != x.device:
                raise RaceMoETypeError(
                    f"RaceMoE: expected all tensors to be on the same device, but found x on "
                    f"{x.device} and parameter {name} on {p.device}")
        if plr_target is not None:
            if self.plr_dim == 0:
                raise RaceMoEShapeError("plr_target: given, but the layer has no PLR head (plr_dim=0)")
            plr_target = self._as_float32(plr_target, "plr_target")
            want = (x.shape[0], x.shape[1], self.plr_dim)
            if tuple(plr_target.shape) != want:
                raise RaceMoEShapeError(f"plr_target: expected size {list(want)}, got {list(plr_target.shape)}")
            if plr_target.device != x.device:
                raise RaceMoETypeError(f"plr_target: expected device {x.device}, got {plr_target.device}")
        return x, plr_target

    @staticmethod
    def _as_float32(t, name):
        if t.dtype == torch.float32:
            return t
        if t.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(t.device.type):
            return t.float()  # autocast's low-precision activations; racedit routes in fp32
        raise RaceMoETypeError(f"RaceMoE: expected {name} of dtype torch.float32, got {t.dtype}")

    def _precision(self, x):
        if x.device.type == "cuda" and torch.is_autocast_enabled("cuda") and \
                torch.get_autocast_dtype("cuda") == torch.bfloat16:
            return "bf16"
        return self.precision

    # ---- the flat parameter buffer and the C state --------------------------------------
    def flatten_parameters(self):
        """Make router_w ... b2 views of one contiguous float32 buffer in racedit's layout
        (csrc/moe.h), the buffer the C core reads (as ``torch.nn.LSTM`` does for cuDNN).
        Called on construction, after ``.to()`` / ``.cuda()`` and by a forward that finds
        the parameters apart (a ``load_state_dict(assign=True)``): one copy then."""
        params = [getattr(self, n) for n in PARAM_NAMES]
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).float() for p in params]).contiguous()
            for p, view in zip(params, _split(flat, params)):
                p.data = view
        self._flat = flat

    def _is_flat(self):
        f, off = self._flat, 0
        if f is None:
            return False
        for n in PARAM_NAMES:
            p = getattr(self, n)
            if p.device != f.device or p.dtype != torch.float32 or not p.is_contiguous() or \
                    p.data_ptr() != f.data_ptr() + 4 * off:
                return False
            off += p.numel()
        return True

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        # .to() / .cuda() make new tensors; share_memory() moves the one storage in place
        if not self._is_flat() and all(getattr(self, n).dtype == torch.float32 for n in PARAM_NAMES):
            self.flatten_parameters()
        return out

    def _state(self, x):
        """racedit's layer state for x's device (made on first use), configured as self."""
        dev = _op_device(x)
        st = self._states.get(dev)
        if st is None:
            st = self._states[dev] = _C.moe_new(
                device=dev, dim=self.dim, num_experts=self.num_experts,
                expert_hidden=self.hidden, k=self.k, strategy=self.strategy, gating=self.gating)
        return st

    def _configure(self, x):
        """Push beta, eval_topk, the GEMM precision and the threshold buffer into the state."""
        st = self._state(x)
        _C.moe_configure(st, beta=float(self.beta), eval_topk=bool(self.eval_topk))
        prec = self._precision(x)
        if _C.moe_precision(st) != prec:
            _C.moe_precision(st, prec)
        _C.moe_set_threshold(st, self._threshold_value())
        return st

    def __getstate__(self):
        """For copy.deepcopy (an EMA copy) and pickle: without the C states (remade on first
        use) and without what the last forward left (graph tensors cannot be copied)."""
        state = self.__dict__.copy()
        state.update(_states={}, aux=None, aux_loss=None, _last_mask=None)
        state.pop("_grad_buf", None)
        return state

    # ---- racedit interop ----------------------------------------------------------------
    def racedit_settings(self):
        """The racedit.MoE constructor arguments of this layer."""
        return dict(dim=self.dim, num_experts=self.num_experts, k=self.k, strategy=self.strategy,
                    gating=self.gating, hidden=self.hidden, beta=self.beta,
                    eval_topk=self.eval_topk, plr_dim=self.plr_dim, sim_weight=self.sim_weight,
                    balance_weight=self.balance_weight, plr_weight=self.plr_weight,
                    precision=self.precision)


@torch.compiler.disable
def _race_forward(m, x, plr_target):
    """The layer on racedit's state (outside torch.compile's graphs: the ops run in the C
    core), then the aux losses on its router outputs."""
    B, L = x.shape[:2]
    if not m._is_flat():
        m.flatten_parameters()
    st = m._configure(x)
    aux_on = m.training and (m.sim_weight > 0 or m.balance_weight > 0)
    plr_on = m.training and m.plr_dim > 0
    params = [getattr(m, n) for n in PARAM_NAMES]
    y, R, h = _Layer.apply(x.contiguous(), m, aux_on, plr_on, *params)
    info = _C.moe_get(st, "aux_stats")  # the diagnostics; the PLR head is torch's here
    if m.training and m.strategy in ("race", "bl", "be"):
        th = _C.moe_get(st, "thresholds")
        m._set_threshold_value(None if th is None or th.size == 0 else
                               float(th[0]) if m.strategy == "race" else th)
    mask_np = m._last_mask                                             # (B,L,E) bool
    losses = _aux_losses(m, R, h, mask_np.reshape(B * L, -1), plr_target) if m.training else {}
    _record_aux(m, mask_np, losses, info)
    return y


def _aux_losses(m, R, h, mask, plr_target):
    """The training forward's aux losses (graph tensors), each only when its weight is > 0,
    and the PLR head's prediction; mask (N,E) bool ndarray."""
    out = {}
    if m.sim_weight > 0:
        out["sim_loss"] = _RouterLoss.apply(R, mask, _C.router_similarity_loss)
    if m.balance_weight > 0:
        out["balance_loss"] = _RouterLoss.apply(R, mask, _C.balance_loss)
    if m.plr_dim:
        out["plr_pred"] = _PLRHead.apply(h, m.plr_w, m.plr_b)
        if plr_target is not None and m.plr_weight > 0:
            target = plr_target.reshape(-1, m.plr_dim)
            out["plr_loss"] = _PLRLoss.apply(out["plr_pred"], target)
    return out


def _record_aux(m, mask_np, losses, info):
    weights = dict(sim_loss=m.sim_weight, balance_loss=m.balance_weight, plr_loss=m.plr_weight)
    terms = [weights[n] * losses[n] for n in weights if n in losses]
    dev = m.threshold.device
    m.aux_loss = sum(terms[1:], terms[0]) if terms else torch.zeros((), device=dev)
    pred = losses.get("plr_pred")
    m.aux = dict(
        sim_loss=losses.get("sim_loss"), balance_loss=losses.get("balance_loss"),
        plr_loss=losses.get("plr_loss"), aux_loss=m.aux_loss,
        plr_pred=None if pred is None else pred.detach().reshape(*mask_np.shape[:2], -1),
        mask=_t(mask_np, dev), expert_load=_t(info["expert_load"], dev),
        **{k: info[k] for k in ("max_violation", "combination_usage", "experts_per_token",
                                "dead_experts", "threshold", "batch_threshold", "training")})


# ---- racedit.MoE <-> RaceMoE -------------------------------------------------------------

def from_racedit(moe, device=None):
    """A RaceMoE with the settings, parameters, threshold and mode of racedit.MoE ``moe``
    (copied: the two do not share memory)."""
    if not isinstance(moe, MoE):
        raise TypeError(f"moe: expected a racedit.MoE, got {type(moe).__name__}")
    s = moe._settings()
    for key in ("seed", "device"):
        s.pop(key)
    m = RaceMoE(**s, device=device)
    with torch.no_grad():
        for name, arr in moe.params.items():
            getattr(m, name).copy_(torch.from_numpy(arr))
        m._set_threshold_value(moe.threshold)
    return m.train(moe.training)


def to_racedit(module, device="cpu"):
    """A racedit.MoE (on racedit's ``device``) with the settings, parameters, threshold and
    mode of RaceMoE ``module`` (copied)."""
    if not isinstance(module, RaceMoE):
        raise TypeError(f"module: expected a racedit.torch.RaceMoE, got {type(module).__name__}")
    moe = MoE(**module.racedit_settings(), device=device)
    for name, arr in moe.params.items():
        arr[...] = getattr(module, name).detach().float().cpu().numpy()
    moe.threshold = module._threshold_value()
    return moe.train(module.training)


# ---- RaceDiT <-> a torch DiT with RaceMoE FFNs ----------------------------------------------

def dit_state_dict_to_torch(model):
    """RaceDiT ``model`` as the state dict of a torch DiT with facebookresearch/DiT's module
    names whose MoE blocks hold a :class:`RaceMoE` as ``blocks.<i>.moe`` (with ``plr_dim`` =
    p·p·in_channels): every parameter as a float32 tensor (a copy), each MoE block's
    thresholds as ``blocks.<i>.moe.threshold`` (its row of ``model.thresholds``: 0-d for
    race) and DiT's fixed sin-cos ``pos_embed`` (1, L, D)."""
    state = {name: torch.from_numpy(arr) for name, arr in model.state_dict().items()}
    for i, tau in enumerate(model.thresholds):
        state[f"blocks.{i}.moe.threshold"] = torch.tensor(np.array(tau, np.float32))
    g = model.input_size // model.config.patch
    state["pos_embed"] = torch.from_numpy(_C.dit_pos_embed(g, g, model.config.hidden)[None])
    return state


def load_torch_dit_state_dict(model, state):
    """Set RaceDiT ``model``'s parameters and MoE thresholds from the state dict of such a
    torch DiT (the layout of :func:`dit_state_dict_to_torch`; ``pos_embed`` is the fixed
    embedding and is skipped, a missing threshold leaves that layer without one). Raises
    ValueError for missing / unexpected keys or shapes, as ``RaceDiT.load_state_dict``."""
    arrays = {name: t.detach().float().cpu().numpy() for name, t in state.items()}
    arrays.pop("pos_embed", None)
    shape = model.threshold_shape[1:]
    taus = []
    for i in range(model.num_moe_layers):
        tau = arrays.pop(f"blocks.{i}.moe.threshold", None)
        if tau is None or tau.size == 0 and shape != (0,):      # missing, or BE never trained
            tau = np.full(shape, np.nan, np.float32)
        if tau.shape != shape:
            raise ValueError(f"state: blocks.{i}.moe.threshold: expected shape {shape}, "
                             f"got {tau.shape}")
        taus.append(tau)
    model.load_state_dict(arrays)
    if taus:
        model.thresholds = np.stack(taus).reshape(model.threshold_shape)
    return model
