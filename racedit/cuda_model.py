"""The RaceDiT model on the GPU: ``racedit.RaceDiT(..., device="cuda")`` builds a
:class:`CudaRaceDiT`. Every layer, the MoE blocks with their aux losses, the loss and the
AdamW + EMA update run on the device (cuda/model.cu); Python only validates, drops
labels for classifier-free guidance and copies arrays at the boundary.

The parameter layout is the CPU model's (same names, offsets and shapes), so
``state_dict`` / ``load_dit_state_dict`` / checkpoints are shared between the two.
Unlike the CPU class, ``params`` / ``grads`` / ``param_buffer`` / ``grad_buffer`` are
host COPIES of the device buffers made on each access: writing into them changes
nothing; use :meth:`set_param_buffer` (or :meth:`load_state_dict`) to upload.
"""
import numpy as np

from . import _C
from .model import ModelBase

__all__ = ["CudaRaceDiT", "DTYPES"]

DTYPES = ("fp32", "bf16")
_PARAMS, _GRADS, _ADAM_M, _ADAM_V, _EMA = range(5)


def _nan(v):
    return float("nan") if v is None else float(v)


class CudaRaceDiT(ModelBase):
    """RaceDiT on the GPU; the constructor arguments are those of :class:`racedit.RaceDiT`
    (the initialisation is the CPU class's, drawn on the host with the same seed, so both
    start from identical weights) plus

    dtype : {"fp32", "bf16"}, default "fp32"
        "bf16": every GEMM of the model — the linear layers (embedders, adaLN, qkv,
        proj, the dense FFN, the final layer), the attention products and the MoE blocks'
        expert GEMMs — takes bf16 operands with fp32 accumulation and fp32 results. The
        master weights, gradients, AdamW state, activations, softmax, layernorm, the
        routers and the routing stay fp32 (so routing decisions see fp32 scores). Each
        forward rounds the weights it uses into bf16 copies (2 bytes of device memory
        per weight) read by its backward. "fp32": fp32 GEMMs (TF32 under
        ``racedit.cuda.tf32(True)``).

    Methods mirror the CPU class (forward / infer / backward / zero_grad / train / eval /
    aux / aux_loss / routing_masks / layer_stats / thresholds / state_dict /
    load_dit_state_dict), taking and returning NumPy arrays. :meth:`step` runs a whole
    training step on the device and returns only scalars. The device holds the
    parameters, gradients, AdamW moments and the EMA of the weights (initialised to the
    parameters; :meth:`ema_state_dict`).

    Raises RuntimeError when CUDA is not available, and the CPU class's errors for bad
    arguments.
    """

    device = "cuda"

    def __init__(self, config, input_size=32, in_channels=4, num_classes=10, seed=0,
                 learn_sigma=False, routing="race", gating="identity", plr_weight=1.0,
                 sim_weight=0.01, balance_weight=0.0, beta=0.99, eval_topk=False,
                 class_dropout_prob=0.1, max_batch=None, dtype="fp32"):
        from .cuda import _require
        from .model import RaceDiT

        _require()
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
        host = RaceDiT(config, input_size, in_channels, num_classes, seed=seed,
                       learn_sigma=learn_sigma, routing=routing, gating=gating,
                       plr_weight=plr_weight, sim_weight=sim_weight,
                       balance_weight=balance_weight, beta=beta, eval_topk=eval_topk,
                       class_dropout_prob=class_dropout_prob, device="cpu")
        for k in ("config", "input_size", "in_channels", "out_channels", "num_classes",
                  "learn_sigma", "class_dropout_prob", "routing", "gating", "plr_weight",
                  "sim_weight", "balance_weight", "beta", "eval_topk", "layout"):
            setattr(self, k, getattr(host, k))
        self.dtype = dtype
        cfg = self.config
        self._cap = _C.cuda_model_new(
            cfg.depth, cfg.hidden, cfg.heads, cfg.patch, self.input_size, self.in_channels,
            self.out_channels, self.num_classes, num_experts=cfg.num_experts, k=max(cfg.k, 1),
            expert_hidden=cfg.expert_hidden, strategy=routing, gating=gating, beta=beta,
            eval_topk=bool(eval_topk), plr_weight=plr_weight, sim_weight=sim_weight,
            balance_weight=balance_weight)
        n = _C.cuda_model_num_params(self._cap)
        if n != host.param_buffer.size:  # pragma: no cover - one layout by construction
            raise AssertionError(f"device layout has {n} floats, the CPU's {host.param_buffer.size}")
        self._n = n
        self._shapes = [(name, off, tuple(shape)) for name, off, shape in self.layout]
        _C.cuda_model_set(self._cap, _PARAMS, host.param_buffer)
        _C.cuda_model_set(self._cap, _EMA, host.param_buffer)
        del host
        self._states = [_C.cuda_model_moe_state(self._cap, l) for l in range(self.num_moe_layers)]
        if dtype == "bf16":
            self.set_dtype(dtype)
        self._drop_rng = np.random.default_rng([seed, 1])
        self.training = True
        self._reserve_fixed(max_batch)

    def set_dtype(self, dtype):
        """Switch the GEMM precision ("fp32" | "bf16", see the class); drops the last forward."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
        _C.cuda_model_precision(self._cap, 2 if dtype == "bf16" else 0)
        self.dtype = dtype

    # ---- buffers (host copies) -------------------------------------------------------------
    def _named(self, flat):
        return {name: flat[off:off + int(np.prod(shape))].reshape(shape)
                for name, off, shape in self._shapes}

    @property
    def param_buffer(self):
        """(num_params,) float32 host COPY of the device parameters."""
        return _C.cuda_model_get(self._cap, _PARAMS)

    @property
    def grad_buffer(self):
        """(num_params,) float32 host COPY of the device gradients."""
        return _C.cuda_model_get(self._cap, _GRADS)

    @property
    def ema_buffer(self):
        """(num_params,) float32 host COPY of the device EMA weights."""
        return _C.cuda_model_get(self._cap, _EMA)

    @property
    def params(self):
        """dict name -> array: views of ONE host copy of the parameters (writes are lost)."""
        return self._named(self.param_buffer)

    @property
    def grads(self):
        """dict name -> array: views of ONE host copy of the gradients."""
        return self._named(self.grad_buffer)

    def set_param_buffer(self, values, ema=False):
        """Upload (num_params,) float32 values as the parameters (ema=True: also as the
        EMA weights). ValueError / TypeError for a wrong shape or dtype."""
        _C.cuda_model_set(self._cap, _PARAMS, values)
        if ema:
            _C.cuda_model_set(self._cap, _EMA, values)

    def set_ema_buffer(self, values):
        """Upload (num_params,) float32 values as the EMA weights."""
        _C.cuda_model_set(self._cap, _EMA, values)

    def optimizer_state(self):
        """dict with host copies of the AdamW moments ``m``, ``v`` and the ``step`` count."""
        return {"m": _C.cuda_model_get(self._cap, _ADAM_M),
                "v": _C.cuda_model_get(self._cap, _ADAM_V),
                "step": _C.cuda_model_step(self._cap)}

    def load_optimizer_state(self, state):
        """Restore :meth:`optimizer_state` (``m``, ``v`` (num_params,) float32, ``step``)."""
        _C.cuda_model_set(self._cap, _ADAM_M, state["m"])
        _C.cuda_model_set(self._cap, _ADAM_V, state["v"])
        _C.cuda_model_step(self._cap, int(state["step"]))

    def ema_state_dict(self):
        """dict name -> float32 copy of each EMA weight."""
        return {k: v.copy() for k, v in self._named(self.ema_buffer).items()}

    def load_state_dict(self, state, ema=False):
        """Upload a full dict name -> array (every parameter, this model's shapes); ema=True
        also sets the EMA weights. ValueError for missing / unexpected keys or shapes."""
        missing = sorted(set(self.params) - set(state))
        extra = sorted(set(state) - set(self.params))
        if missing or extra:
            raise ValueError(f"load_state_dict: missing keys {missing}, unexpected keys {extra}")
        flat = np.empty(self._n, np.float32)
        for name, off, shape in self._shapes:
            v = np.asarray(state[name])
            if v.shape != shape:
                raise ValueError(f"load_state_dict: {name}: expected shape {shape}, got {v.shape}")
            flat[off:off + v.size] = v.reshape(-1)
        self.set_param_buffer(flat, ema=ema)

    def load_dit_state_dict(self, state):
        """As :meth:`racedit.RaceDiT.load_dit_state_dict` (dense configs; checked on the
        CPU class), then uploaded to the device (parameters and EMA)."""
        from .model import RaceDiT

        host = RaceDiT(self.config, self.input_size, self.in_channels, self.num_classes,
                       learn_sigma=self.learn_sigma, device="cpu")
        host.load_dit_state_dict(state)
        self.set_param_buffer(host.param_buffer, ema=True)

    # ---- compute ------------------------------------------------------------------------
    def forward(self, x, t, y, plr_target=None):
        """out (B, out_channels, H, W) float32 on the GPU; arguments and errors as
        :meth:`racedit.RaceDiT.forward` (x and plr_target are copied to the device, out
        back)."""
        t, y = self._ty(t, y, self.training)
        return _C.cuda_model_forward(self._cap, x, t, y, plr_target, self.training)

    __call__ = forward

    def infer(self, x, t, y):
        """As :meth:`racedit.RaceDiT.infer`, on the GPU: the eval-mode forward, bit for bit
        what ``forward`` returns after ``eval()``, in a device inference arena of its own
        with one block's activations (grown to the largest batch, kept until
        :meth:`free_infer`), leaving the training activations, the last forward and the
        thresholds as they were."""
        t, y = self._ty(t, y, False)
        return _C.cuda_model_infer(self._cap, x, t, y)

    @property
    def infer_batch(self):
        """Batch the device inference arena is allocated for (0: none)."""
        return _C.cuda_model_infer_batch(self._cap)

    def free_infer(self):
        """Free the device inference arena of :meth:`infer`."""
        _C.cuda_model_infer_release(self._cap)

    def backward(self, dout):
        """Backpropagate dout (B, out_channels, H, W) through the last forward; device
        gradients ACCUMULATE (zero_grad() between steps), MoE aux gradients included.
        RuntimeError before any forward."""
        _C.cuda_model_backward(self._cap, dout)

    def zero_grad(self):
        """Set every device gradient to 0."""
        _C.cuda_model_set(self._cap, _GRADS, np.zeros(self._n, np.float32))

    def step(self, x, t, y, target, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
             max_grad_norm=0.0, ema_decay=0.9999, return_aux=True):
        """One training step on the device: forward in training mode (labels dropped with
        class_dropout_prob; the MoE PLR heads regress ``target``), loss = mean((out[:, :C]
        - target)^2) (the diffusion MSE; with learn_sigma the variance channels get no
        gradient), gradients zeroed then backward (aux-loss gradients included), the
        gradient clipped to ``max_grad_norm`` (0: off), one AdamW step (torch.optim.AdamW)
        fused with the EMA update (``ema_decay`` None: no EMA).

        x, target (B, in_channels, H, W) float32; t (B,) in [0, 1000]; y (B,) int labels.
        Returns a dict: ``loss`` (the MSE), ``grad_norm`` (None when not clipping),
        ``step`` (AdamW steps so far) and, for MoE models with return_aux, ``aux_loss``
        (weighted, what the gradient included) and the unweighted ``plr``, ``sim``,
        ``balance`` (means over layers, NaN when not computed). Only these scalars come
        back from the device."""
        t, y = self._ty(t, y, True)
        b1, b2 = betas
        r = _C.cuda_model_train_step(self._cap, x, t, y, target, float(lr), float(b1), float(b2),
                                     float(eps), float(weight_decay), float(max_grad_norm),
                                     -1.0 if ema_decay is None else float(ema_decay))
        if return_aux and self._states:
            aux = [_C.cuda_moe_aux(s, 0) for s in self._states]
            r["aux_loss"] = float(sum(a["aux_loss"] for a in aux))
            for k in ("plr", "sim", "balance"):
                vals = [a[k + "_loss"] for a in aux if a[k + "_loss"] is not None]
                r[k] = float(np.mean(vals)) if vals else float("nan")
        return r

    def optimizer_step(self, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                       max_grad_norm=0.0, ema_decay=0.9999):
        """The optimiser part of :meth:`step` alone, on the device gradients as they are
        (e.g. after :meth:`backward` with a dout computed on the host, such as DiT's
        hybrid loss with learn_sigma): clip to ``max_grad_norm`` (0: off), AdamW, EMA
        (``ema_decay`` None: off). Returns {"grad_norm" (None when not clipping), "step"}.
        ValueError for a non-finite gradient norm (nothing updated) or bad arguments."""
        b1, b2 = betas
        return _C.cuda_model_optimizer_step(self._cap, float(lr), float(b1), float(b2),
                                            float(eps), float(weight_decay), float(max_grad_norm),
                                            -1.0 if ema_decay is None else float(ema_decay))

    # ---- MoE losses and diagnostics ------------------------------------------------------
    def _views(self, mask=False):
        """Per MoE layer: the scalars and diagnostics of the last forward (computed on the
        device), plus the (N, E) selection mask when ``mask`` (N*E bytes per layer come
        back; nothing else of size N does)."""
        out = []
        for st in self._states:
            v = _C.cuda_moe_view(st, 1 if mask else 0)
            d = {"have_forward": v["have_forward"], "have_tau": v["tau"] is not None,
                 "tau": _nan(v["tau"])}
            if v["have_forward"]:
                a = _C.cuda_moe_aux(st, 0)
                d.update(mask=v.get("mask"), load=a["expert_load"], dead_experts=a["dead_experts"],
                         max_violation=a["max_violation"],
                         combination_usage=a["combination_usage"],
                         experts_per_token=a["experts_per_token"], tau_b=_nan(v["tau_b"]),
                         plr=_nan(a["plr_loss"]), sim=_nan(a["sim_loss"]),
                         balance=_nan(a["balance_loss"]), aux_loss=a["aux_loss"])
            out.append(d)
        return out

    def aux_loss(self):
        """The weighted aux loss of the last forward (what backward adds the gradient of)."""
        auxs = [_C.cuda_moe_aux(s, 0) for s in self._states]
        return float(sum(a["aux_loss"] for a in auxs if a is not None))

    def routing_masks(self):
        """list (one per MoE layer) of the (B, L, E) bool selection of the last forward."""
        B = self._batch()[1]
        return [v["mask"].reshape(B, -1, v["mask"].shape[-1])
                for v in self._views(mask=True) if v["have_forward"]]

    # ---- sizes ----------------------------------------------------------------------------
    def _batch(self):
        return _C.cuda_model_batch(self._cap)

    def _get_thresholds(self):
        return [_C.cuda_moe_view(s, 0)["tau"] for s in self._states]

    def _set_threshold(self, layer, tau):
        _C.cuda_moe_set_threshold(self._states[layer], tau)

    def _branch_norms(self):
        return _C.cuda_model_branch_norms(self._cap)

    def _reserve(self, max_batch, fixed):
        _C.cuda_model_reserve(self._cap, max_batch, fixed)

    @property
    def _repr_extra(self):
        return f", device='cuda', dtype={self.dtype!r}"

    def num_params(self):
        """Floats in the parameter buffer (every parameter)."""
        return int(self._n)
