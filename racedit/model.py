"""RaceDiT: the whole diffusion transformer (docs/method.md §1, §2, §4) as one object over
the C core, on any device.

Python only orchestrates: it initialises the parameters, drops labels for classifier-free
guidance in training, and calls racedit._C.model_*, which run the model graph of
csrc/core (every layer, the loss and the optimiser) on the device's op table. The model
owns its five flat buffers (parameters, gradients, AdamW moments, EMA) in the device's
memory.
"""
import numpy as np

from . import _C
from .configs import count_params, get_config
from .moe import GATINGS, STRATEGIES, check_loss_weight

__all__ = ["RaceDiT", "DeviceArray", "DEVICES", "DTYPES"]

DEVICES = ("cpu", "cuda")
DTYPES = ("fp32", "bf16")
_PARAMS, _GRADS, _ADAM_M, _ADAM_V, _EMA = range(5)
_BUFFERS = {"params": _PARAMS, "grads": _GRADS, "adam_m": _ADAM_M, "adam_v": _ADAM_V,
            "ema": _EMA}


class DeviceArray:
    """One of a model's flat buffers in its device's memory, shared, not copied
    (:meth:`RaceDiT.device_buffer`): ``(n,)`` float32 at address ``ptr``.

    On CUDA it exposes ``__cuda_array_interface__`` (version 3), so ``torch.as_tensor(a,
    device="cuda")``, ``cupy.asarray(a)`` or ``numba.cuda.as_cuda_array(a)`` wrap the
    model's own memory: what they write, the model reads on its next call. Its ``stream``
    is 1, the legacy default stream on which racedit queues all its CUDA work, so a
    consumer orders its work after racedit's. It keeps its model alive, so the address
    stays valid while it (or a consumer's view holding it) lives. ``interface`` is the same
    dict on any device.
    """

    def __init__(self, owner, ptr, n, device):
        self._owner, self.ptr, self.device = owner, int(ptr), device
        self.shape, self.dtype = (int(n),), np.dtype(np.float32)

    def __len__(self):
        return self.shape[0]

    @property
    def nbytes(self):
        return self.shape[0] * self.dtype.itemsize

    @property
    def interface(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False),
                "strides": None, "version": 3, "stream": 1}

    @property
    def __cuda_array_interface__(self):
        if self.device != "cuda":
            raise AttributeError(f"__cuda_array_interface__: this buffer is in the memory of "
                                 f"the {self.device!r} backend, not CUDA memory")
        return self.interface

    def __repr__(self):
        return f"DeviceArray(shape={self.shape}, dtype=float32, device={self.device!r}, ptr={self.ptr:#x})"


def _xavier(rng, shape, fan_in, fan_out):
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=shape)


class RaceDiT:
    """Race-DiT (or a dense DiT) with forward, backward and the training step in C, on the
    CPU or the GPU.

    Parameters
    ----------
    config : str or ModelConfig
        e.g. ``"RaceDiT-S/2-2in8"`` or ``"DiT-S/2"`` (see racedit.configs.get_config).
    input_size : int, default 32
        Side of the (square) input latent; a multiple of the patch size.
    in_channels : int, default 4
    num_classes : int, default 10
        Labels are 0..num_classes-1; the value ``num_classes`` is the null label (CFG).
    seed : int, default 0
        Seeds the initialisation and the label dropout (numpy.random.default_rng).
    learn_sigma : bool, default False
        True: out_channels = 2*in_channels (DiT's learned variance), else in_channels.
    routing : {"race", "token", "expert", "bl", "be", "le"}, default "race"
    gating : {"identity", "sigmoid", "softmax"}, default "identity"
    plr_weight, sim_weight, balance_weight : float, defaults 0.01, 0.01, 0.0
        Weights of the per-layer regularization, router-similarity and balance losses,
        whose gradients backward() adds. routing, gating and these are ignored when dense.
    beta : float, default 0.99
        EMA factor of each MoE layer's threshold.
    eval_topk : bool, default False
        True keeps batch top-K selection in eval mode instead of the threshold.
    class_dropout_prob : float, default 0.1
        In training, each label is replaced by the null label with this probability.
    max_batch : int or None, default None
        Activations are allocated for this many images and a larger batch raises
        ValueError. None: allocated at the first forward and grown when a larger batch
        arrives.
    device : {"cpu", "cuda"}, default "cpu"
        Where the model's buffers live and its graph runs (the same C graph on either
        device's op table; see Memory). RuntimeError "CUDA not available: ..." when there
        is no usable GPU.
    dtype : {"fp32", "bf16"}, default "fp32"
        Precision of the GEMMs on CUDA (see :meth:`set_dtype`); the CPU computes in fp32.

    Layout
    ------
    ``param_buffer`` / ``grad_buffer`` are 1-D float32 arrays; ``layout`` lists
    ``(name, offset, shape)`` in buffer order and ``params`` / ``grads`` map each name to
    a view. Names and shapes are facebookresearch/DiT's (linear weights (out, in) as
    torch.nn.Linear; ``x_embedder.proj.weight`` is the conv weight (D, C, p, p)); an MoE
    block has ``blocks.<i>.moe.{router_w (D,D), router_b, gate_w (D,E), gate_b,
    w1 (E,D,He), b1 (E,He), w2 (E,He,D), b2 (E,D), plr_w (D,p*p*C), plr_b}`` (the (in, out)
    layout of racedit.MoE) in place of ``blocks.<i>.mlp.*``.

    Memory
    ------
    The model owns five flat buffers of ``num_params()`` floats on its device, the llm.c
    way: ``param_buffer``, ``grad_buffer``, the AdamW moments (``optimizer_state()``) and
    ``ema_buffer`` (initialised to the parameters). On the CPU each is a live NumPy view of
    the model's memory: the model reads it on every call, so ``param_buffer[...] = w``
    takes effect at once (the attributes cannot be rebound). On CUDA each access returns a
    host COPY (writing into it changes nothing); ``set_param_buffer`` /
    ``set_ema_buffer`` / ``load_optimizer_state`` upload. Code written against the second
    contract (read the property, write with the setters) runs on either device.
    ``device_buffer(which)`` shares a buffer without a copy on either device: the live view
    on the CPU, a :class:`DeviceArray` with ``__cuda_array_interface__`` on CUDA.

    Initialisation (DiT's)
    ----------------------
    xavier-uniform linears with zero biases, the patch embedding as a linear over its
    flattened (D, C*p*p) weight, normal(0, 0.02) label table and timestep-MLP weights,
    zero adaLN modulations and final linear (adaLN-Zero: every block starts as the
    identity, dense or MoE alike). Experts: w1 and w2 are drawn xavier-uniform with the
    fans of the dense DiT MLP (D -> 4D -> D), so each expert is a 1/k slice of that MLP's
    width with the same weight scale, and the k experts a token uses on average together
    have its width and (before the gate values scale them) its output variance; router,
    gate and PLR head are xavier-uniform.

    MoE blocks
    ----------
    Each block's MLP is racedit's MoE layer (docs/method.md §2, §4, §5) with its PLR head predicting
    the patchified ``plr_target`` (width p*p*in_channels, the (i, j, c) order of DiT's
    unpatchify). Each aux loss of the model is the mean over its MoE layers, so every
    layer gets weight/depth; ``aux()`` reports the means, ``aux_loss()`` the weighted sum
    whose gradient ``backward()`` adds. Training mode routes by batch top-K and updates
    each layer's thresholds (EMA with ``beta`` of each batch-spanning group's K-th value,
    initialised by the first batch; see ``thresholds``). Eval mode (docs/method.md §3):
    token, expert and LE choice keep their exact per-group top-K, BL / BE / race select
    G >= tau_e / tau_l / tau, falling back to batch top-K (nothing updated) in a layer
    that has no thresholds yet (no training forward, no ``thresholds`` set);
    ``eval_topk=True`` keeps batch top-K always. Threads: OpenMP with a
    single-threaded BLAS, or the BLAS's own threads, as ``racedit._C.moe_threading()``
    says (process-wide; the model follows the MoE layer's mode).

    Loading a DiT checkpoint
    ------------------------
    For dense configs, ``load_dit_state_dict(state)`` takes facebookresearch/DiT's
    state dict as NumPy arrays. From a .pt file::

        import numpy as np, torch
        sd = torch.load("DiT-XL-2-256x256.pt", map_location="cpu")
        np.savez("dit_xl2.npz", **{k: v.numpy() for k, v in sd.items()})
        m = RaceDiT("DiT-XL/2", input_size=32, num_classes=1000, learn_sigma=True)
        m.load_dit_state_dict(dict(np.load("dit_xl2.npz")))

    Inference
    ---------
    ``infer(x, t, y)`` is the eval-mode forward for sampling: bit-identical to
    ``eval().forward(x, t, y)``, in O(B * one block) memory of its own (the training
    arena holds every block's activations and the backward's scratch: depth times more),
    leaving the training state (last forward, thresholds) untouched; ``free_infer()``
    gives the memory back.

    Determinism: forward, infer, backward and the optimiser (racedit.optim) give the same
    bits at any thread count in the "omp" threading mode (``racedit._C.moe_threading()``,
    the default when racedit controls the BLAS's threads, as with SciPy's OpenBLAS):
    every BLAS call runs single-threaded on row blocks chosen from the product's shape
    alone, and every reduction runs in a fixed order (tests/layers/test_determinism.py). In
    "blas" mode the BLAS threads the products itself, and OpenBLAS's threaded sgemm
    blocks the inner dimension differently from its single-threaded one for some sizes:
    results may then differ in the last bits between thread counts.

    Errors: TypeError / ValueError for bad arguments (naming the argument, expected vs
    actual), RuntimeError for backward before forward.
    """

    def __init__(self, config, input_size=32, in_channels=4, num_classes=10, seed=0,
                 learn_sigma=False, routing="race", gating="identity", plr_weight=0.01,
                 sim_weight=0.01, balance_weight=0.0, beta=0.99, eval_topk=False,
                 class_dropout_prob=0.1, max_batch=None, device="cpu", dtype="fp32"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
        if device == "cpu" and dtype != "fp32":
            raise ValueError(f"dtype: the CPU model is fp32 only, got {dtype!r}")
        cfg = get_config(config)
        if not 0.0 <= class_dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob: expected a value in [0, 1], got {class_dropout_prob}")
        plr_weight, sim_weight, balance_weight = (check_loss_weight(n, w) for n, w in (
            ("plr_weight", plr_weight), ("sim_weight", sim_weight), ("balance_weight", balance_weight)))
        for name, value, allowed in (("routing", routing, STRATEGIES), ("gating", gating, GATINGS)):
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")
        self.config = cfg
        self.input_size = int(input_size)
        self.in_channels = int(in_channels)
        self.out_channels = 2 * self.in_channels if learn_sigma else self.in_channels
        self.num_classes = int(num_classes)
        self.learn_sigma = bool(learn_sigma)
        self.class_dropout_prob = float(class_dropout_prob)
        self.routing, self.gating = routing, gating
        self.plr_weight, self.sim_weight = float(plr_weight), float(sim_weight)
        self.balance_weight, self.beta, self.eval_topk = float(balance_weight), float(beta), bool(eval_topk)
        self._model = _C.model_new(
            cfg.depth, cfg.hidden, cfg.heads, cfg.patch, self.input_size, self.in_channels,
            self.out_channels, self.num_classes, device=device, precision=dtype,
            num_experts=cfg.num_experts, k=max(cfg.k, 1), expert_hidden=cfg.expert_hidden,
            strategy=routing, gating=gating, beta=beta, eval_topk=bool(eval_topk),
            plr_weight=plr_weight, sim_weight=sim_weight, balance_weight=balance_weight)
        self.device, self.dtype = device, dtype
        self.layout = _C.model_layout(self._model)
        self._n = _C.model_num_params(self._model)
        # on the CPU the buffers are the model's memory itself: views made once
        self._live = [_C.model_buffer(self._model, i) for i in range(5)] if device == "cpu" else None
        init = np.zeros(self._n, np.float32)
        self._init_params(self._named(init), np.random.default_rng(seed))
        self.set_param_buffer(init, ema=True)
        self._drop_rng = np.random.default_rng([seed, 1])
        self.training = True
        if max_batch is not None:
            if int(max_batch) < 1:
                raise ValueError(f"max_batch: expected >= 1, got {max_batch}")
            _C.model_reserve(self._model, int(max_batch), True)

    # ---- initialisation -----------------------------------------------------------------
    def _init_params(self, params, rng):
        D, p, C = self.config.hidden, self.config.patch, self.in_channels
        for name, view in params.items():
            short = name.rsplit(".", 1)[-1]
            if name.endswith(".bias") or short.endswith("_b") or short in ("b1", "b2"):
                continue  # zero
            if "adaLN_modulation" in name or name == "final_layer.linear.weight":
                continue  # adaLN-Zero
            if name == "x_embedder.proj.weight":
                w = _xavier(rng, (D, C * p * p), C * p * p, D).reshape(view.shape)
            elif name.startswith("t_embedder") or name.startswith("y_embedder"):
                w = rng.normal(0.0, 0.02, size=view.shape)
            elif short in ("w1", "w2"):
                w = _xavier(rng, view.shape, D, 4 * D)
            elif view.ndim == 2:
                w = _xavier(rng, view.shape, view.shape[0], view.shape[1])
            else:  # pragma: no cover - every tensor is handled above
                raise AssertionError(f"no initialiser for {name}")
            view[...] = w

    # ---- buffers ------------------------------------------------------------------------
    def _buffer(self, which):
        return self._live[which] if self._live else _C.model_buffer(self._model, which)

    def _named(self, flat):
        return {name: flat[off:off + int(np.prod(shape))].reshape(shape)
                for name, off, shape in self.layout}

    def device_buffer(self, which="params"):
        """Buffer ``which`` ("params", "grads", "adam_m", "adam_v" or "ema") in the model's
        own memory, not a copy: on the CPU its live NumPy view (as ``param_buffer``), on
        another device a :class:`DeviceArray` (``__cuda_array_interface__`` on CUDA).
        Writing through it changes the model as ``set_param_buffer`` would, without the
        upload; the optimizer's steps and the EMA then start from what was written."""
        if not isinstance(which, str) or which not in _BUFFERS:
            raise ValueError(f"which: expected one of {', '.join(map(repr, _BUFFERS))}, "
                             f"got {which!r}")
        if self._live:
            return self._live[_BUFFERS[which]]
        return DeviceArray(self, _C.model_buffer(self._model, _BUFFERS[which], True), self._n,
                           self.device)

    @property
    def param_buffer(self):
        """(num_params,) float32 parameters: a live view on the CPU, a copy on CUDA."""
        return self._buffer(_PARAMS)

    @property
    def grad_buffer(self):
        """(num_params,) float32 gradients: a live view on the CPU, a copy on CUDA."""
        return self._buffer(_GRADS)

    @property
    def ema_buffer(self):
        """(num_params,) float32 EMA of the parameters: a live view on the CPU, a copy on
        CUDA."""
        return self._buffer(_EMA)

    @property
    def params(self):
        """dict name -> array: views of :attr:`param_buffer` (live on the CPU; of one copy on
        CUDA)."""
        if self._live:
            if not hasattr(self, "_pviews"):
                self._pviews = self._named(self._live[_PARAMS])
            return self._pviews
        return self._named(self.param_buffer)

    @property
    def grads(self):
        """dict name -> array: views of :attr:`grad_buffer` (live on the CPU)."""
        if self._live:
            if not hasattr(self, "_gviews"):
                self._gviews = self._named(self._live[_GRADS])
            return self._gviews
        return self._named(self.grad_buffer)

    def set_param_buffer(self, values, ema=False):
        """Set the parameters to (num_params,) float32 ``values`` (ema=True: the EMA too).
        ValueError / TypeError for a wrong shape or dtype."""
        _C.model_set_buffer(self._model, _PARAMS, values)
        if ema:
            _C.model_set_buffer(self._model, _EMA, values)

    def set_ema_buffer(self, values):
        """Set the EMA weights to (num_params,) float32 ``values``."""
        _C.model_set_buffer(self._model, _EMA, values)

    def set_grad_buffer(self, values):
        """Set the gradients to (num_params,) float32 ``values`` (e.g. summed over ranks)."""
        _C.model_set_buffer(self._model, _GRADS, values)

    def optimizer_state(self):
        """dict with the AdamW moments ``m``, ``v`` ((num_params,) float32; live views on the
        CPU, copies on CUDA) and the ``step`` count."""
        return {"m": self._buffer(_ADAM_M), "v": self._buffer(_ADAM_V),
                "step": _C.model_step(self._model)}

    def load_optimizer_state(self, state):
        """Restore :meth:`optimizer_state` (``m``, ``v`` (num_params,) float32, ``step``)."""
        _C.model_set_buffer(self._model, _ADAM_M, state["m"])
        _C.model_set_buffer(self._model, _ADAM_V, state["v"])
        _C.model_step(self._model, int(state["step"]))

    def ema_state_dict(self):
        """dict name -> float32 copy of each EMA weight."""
        return {k: v.copy() for k, v in self._named(self.ema_buffer).items()}

    def state_dict(self):
        """dict name -> float32 copy of each parameter (DiT's names for the backbone)."""
        return {name: view.copy() for name, view in self._named(self.param_buffer).items()}

    def load_state_dict(self, state, ema=False):
        """Set the parameters from a full dict name -> array (every parameter, this model's
        shapes); ema=True also sets the EMA weights. ValueError for missing / unexpected
        keys or shapes (nothing changed)."""
        missing = sorted(set(self.params) - set(state))
        extra = sorted(set(state) - set(self.params))
        if missing or extra:
            raise ValueError(f"load_state_dict: missing keys {missing}, unexpected keys {extra}")
        flat = np.empty(self._n, np.float32)
        for name, view in self._named(flat).items():
            v = np.asarray(state[name])
            if v.shape != view.shape:
                raise ValueError(f"load_state_dict: {name}: expected shape {view.shape}, got {v.shape}")
            view[...] = v
        self.set_param_buffer(flat, ema=ema)

    def set_dtype(self, dtype):
        """The GEMM precision on CUDA: "bf16" — every linear layer (embedders, adaLN, qkv,
        proj, the dense FFN, the final layer), the attention products and the MoE blocks'
        expert GEMMs take bf16 operands with fp32 accumulation and fp32 results; the master
        weights, gradients, AdamW state, activations, softmax, layernorm, the routers and the
        routing stay fp32 (each forward rounds the weights it uses into bf16 copies its
        backward reads); "fp32": fp32 GEMMs (TF32 under ``racedit.cuda.tf32(True)``). Drops
        the last forward. The CPU has fp32 only (ValueError)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
        _C.model_precision(self._model, dtype)
        self.dtype = dtype

    # ---- modes and inputs ----------------------------------------------------------------
    def _ty(self, t, y, drop):
        """A forward's t as float32 and y as int64, checked (TypeError for a wrong dtype,
        ValueError for labels outside [0, num_classes]); with ``drop``, labels replaced by
        the null label with class_dropout_prob (classifier-free guidance)."""
        t = np.asarray(t)
        if t.dtype == np.bool_ or not (np.issubdtype(t.dtype, np.integer)
                                       or np.issubdtype(t.dtype, np.floating)):
            raise TypeError(f"t: expected an int or float array, got dtype {t.dtype}")
        t = t.astype(np.float32)
        y = np.asarray(y)
        if not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"y: expected an integer array, got dtype {y.dtype}")
        if y.ndim == 1 and y.size and (y.min() < 0 or y.max() > self.num_classes):
            raise ValueError(f"y: labels must lie in [0, {self.num_classes}] "
                             f"({self.num_classes} = null label), got [{y.min()}, {y.max()}]")
        if drop and self.class_dropout_prob > 0 and y.ndim == 1:
            d = self._drop_rng.random(y.shape[0]) < self.class_dropout_prob
            y = np.where(d, self.num_classes, y)
        return t, y.astype(np.int64, copy=False)

    def train(self, mode=True):
        """Training mode (labels dropped, MoE batch top-K routing, thresholds updated)."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Evaluation mode: no label dropout; each MoE block of token, expert or LE choice
        keeps its exact per-group top-K, one of BL, BE or race selects G >= its
        thresholds, or, while it has none (the model never ran a training forward and no
        ``thresholds`` were set, e.g. trained 0 steps), the training routing's batch top-K
        (nothing updated); with ``eval_topk`` always batch top-K."""
        return self.train(False)

    # ---- compute ------------------------------------------------------------------------
    def forward(self, x, t, y, plr_target=None):
        """out (B, out_channels, H, W) float32 for x (B, in_channels, H, W) float32 (float64
        is converted), t (B,) timesteps in [0, 1000] (int or float), y (B,) int labels in
        [0, num_classes] (num_classes = null). plr_target (B, in_channels, H, W) or None:
        the diffusion regression target for the MoE blocks' PLR heads (training only).
        In training mode labels are replaced by the null label with class_dropout_prob.
        Raises TypeError for a wrong dtype, ValueError for a wrong shape, out-of-range
        t or y, or a batch above max_batch."""
        t, y = self._ty(t, y, self.training)
        return _C.model_forward(self._model, x, t, y, plr_target, self.training)

    __call__ = forward

    def infer(self, x, t, y):
        """out (B, out_channels, H, W) float32: the eval-mode forward (no label dropout, the
        MoE blocks route as in ``eval``), bit for bit what ``forward`` returns after ``eval()``, whatever
        the mode, but keeping nothing for a backward. Arguments and errors as
        :meth:`forward` (no plr_target).

        Memory: the blocks share one block's activations (and the MoE blocks one routing
        workspace) in an inference arena of their own, O(B * one block) instead of the
        training arena's O(B * depth); it is allocated at the first call, grown to the
        largest batch (``max_batch`` does not apply; see ``infer_batch``) and kept until
        :meth:`free_infer` or the model's end. The training activations are neither
        allocated nor touched: the last ``forward`` stays the one ``backward``,
        ``branch_norms``, ``layer_stats`` and ``routing_masks`` see, and no threshold
        changes."""
        t, y = self._ty(t, y, False)
        return _C.model_infer(self._model, x, t, y)

    @property
    def infer_batch(self):
        """Batch the inference arena is allocated for (0 before any :meth:`infer` or
        after :meth:`free_infer`)."""
        return _C.model_infer_batch(self._model)

    def free_infer(self):
        """Free the inference arena of :meth:`infer` (the next call allocates it again)."""
        _C.model_infer_release(self._model)

    def backward(self, dout):
        """Backpropagate dout (B, out_channels, H, W) through the last forward. Gradients
        ACCUMULATE into grad_buffer (call zero_grad() between steps), including the MoE
        blocks' weighted aux-loss gradients. RuntimeError before any forward."""
        _C.model_backward(self._model, dout)

    def zero_grad(self):
        """Set every gradient to 0."""
        _C.model_zero_grad(self._model)

    @staticmethod
    def _opt(lr, betas, eps, weight_decay, max_grad_norm, ema_decay):
        return dict(lr=float(lr), beta1=float(betas[0]), beta2=float(betas[1]), eps=float(eps),
                    weight_decay=float(weight_decay), max_grad_norm=float(max_grad_norm),
                    ema_decay=-1.0 if ema_decay is None else float(ema_decay))

    def step(self, x, t, y, target, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
             max_grad_norm=0.0, ema_decay=0.9999, return_aux=True):
        """One fused training step in C: forward in training mode (labels dropped with
        class_dropout_prob; the MoE PLR heads regress ``target``), loss = mean((out[:, :C]
        - target)^2) (the diffusion MSE; with learn_sigma the variance channels get no
        gradient), gradients zeroed then backward (aux-loss gradients included), the
        gradient norm (clipped to ``max_grad_norm`` when > 0; ``inf``: computed, never
        clipping; 0: not computed), one AdamW step (torch.optim.AdamW) fused with the EMA
        update (``ema_decay`` None: no EMA).

        x, target (B, in_channels, H, W) float32; t (B,) in [0, 1000]; y (B,) int labels.
        Returns a dict: ``loss`` (the MSE), ``aux`` (the weighted aux losses), ``grad_norm``
        (None when not computed), ``step`` (AdamW steps so far), ``updated`` (False: the
        loss + aux or the gradient norm was not finite and nothing changed) and, for MoE
        models with return_aux, ``aux_loss`` and the unweighted ``plr``, ``sim``,
        ``balance`` (means over layers, NaN when not computed). Only these scalars cross
        from the device."""
        t, y = self._ty(t, y, True)
        r = _C.model_train_step(self._model, x, t, y, target,
                                **self._opt(lr, betas, eps, weight_decay, max_grad_norm, ema_decay))
        if return_aux and self.num_moe_layers:
            r["aux_loss"] = r["aux"]
            r.update(self.aux())
        return r

    def optimizer_step(self, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                       max_grad_norm=0.0, ema_decay=0.9999):
        """The optimiser part of :meth:`step` alone, on the gradients as they are (e.g.
        after :meth:`backward` with a dout computed on the host, such as DiT's hybrid loss
        with learn_sigma): gradient norm and clip, AdamW, EMA. Returns {"grad_norm" (None
        when not computed), "step", "updated" (False for a non-finite norm: nothing
        changed), ...}. ValueError for bad arguments."""
        return _C.model_optimizer_step(
            self._model, **self._opt(lr, betas, eps, weight_decay, max_grad_norm, ema_decay))

    # ---- MoE losses and diagnostics ------------------------------------------------------
    @property
    def num_moe_layers(self):
        """Number of MoE blocks (depth for MoE configs, 0 for dense)."""
        return self.config.depth if self.config.is_moe else 0

    def _moe_get(self, name):
        """Per MoE layer, ``name`` of its last forward (racedit.MoE's names: "aux" the dict of
        racedit.MoE.aux, "mask" the (B, L, E) selection, ...), None before any."""
        return [_C.model_moe_get(self._model, l, name) for l in range(self.num_moe_layers)]

    def _auxes(self):
        """Per MoE layer the aux dict of its last forward without the PLR prediction (no
        array crosses from the device), None before any."""
        return self._moe_get("aux_stats")

    def aux(self):
        """Unweighted aux losses of the last forward, each the mean over MoE layers:
        {"plr": L_PLR, "sim": L_sim, "balance": L_bal} as floats. A loss the last forward
        did not compute (eval mode, weight 0, no plr_target, dense model) is NaN."""
        auxes = [a for a in self._auxes() if a is not None]
        return {k: float(np.mean([_nan(a[k + "_loss"]) for a in auxes])) if auxes else float("nan")
                for k in ("plr", "sim", "balance")}

    def aux_loss(self):
        """plr_weight*L_PLR + sim_weight*L_sim + balance_weight*L_bal of the last forward
        (the losses averaged over MoE layers, only those computed; 0.0 when none). This is
        what backward() adds the gradient of."""
        return float(sum(a["aux_loss"] for a in self._auxes() if a is not None))

    def routing_masks(self):
        """list (one per MoE layer) of the (B, L, E) bool selection of the last forward
        (copies); [] for a dense model or before any forward."""
        return [m for m in self._moe_get("mask") if m is not None]

    def layer_stats(self):
        """Per MoE layer diagnostics of the last forward: a list of dicts with ``load``
        (E,) int64 tokens per expert, ``dead_experts``, ``max_violation`` ((max - mean) /
        mean load), ``combination_usage`` (fraction of expert pairs holding 95 % of the
        co-selections), ``experts_per_token`` (selected pairs / tokens), ``tau`` (the mean
        of the layer's thresholds; NaN before they are set and for strategies without
        any), ``tau_b`` (mean K-th value of the last training forward's groups) and the
        layer's unweighted ``plr``, ``sim``, ``balance`` losses (NaN if not computed).
        [] for a dense model or before any forward."""
        stats = []
        for a in self._auxes():
            if a is None:
                return []
            stats.append(dict(load=a["expert_load"], dead_experts=a["dead_experts"],
                              max_violation=a["max_violation"],
                              combination_usage=a["combination_usage"],
                              experts_per_token=a["experts_per_token"],
                              tau_b=_nan(a["batch_threshold"]), plr=_nan(a["plr_loss"]),
                              sim=_nan(a["sim_loss"]), balance=_nan(a["balance_loss"]),
                              tau=_nan(a["threshold"])))
        return stats

    def experts_per_token_by_sample(self):
        """(B,) float64: for each sample of the last forward, the mean over MoE layers of
        its experts per token (zeros for a dense model). Counted where the masks are: B
        numbers per layer leave the device."""
        pairs = [p for p in self._moe_get("sample_pairs") if p is not None]
        if not pairs:
            return np.zeros(self._batch()[1], dtype=np.float64)
        return np.mean([p / self._grid ** 2 for p in pairs], axis=0)

    @property
    def threshold_shape(self):
        """Shape of ``thresholds`` (docs/method.md §3): (num_moe_layers,) for race (one
        scalar tau per layer), (num_moe_layers, E) for BL (one per expert),
        (num_moe_layers, L) for BE (one per token position), (num_moe_layers, 0) for
        token, expert and LE choice (exact top-K at inference, no threshold); (0,) for a
        dense model."""
        n = self.num_moe_layers
        if n == 0 or self.routing == "race":
            return (n,)
        return (n, {"bl": self.config.num_experts, "be": self._grid ** 2}.get(self.routing, 0))

    @property
    def thresholds(self):
        """float32 thresholds of the MoE layers, of shape ``threshold_shape``: each is the
        EMA of its group's K-th largest gate in training, NaN (a layer's whole row) where
        not yet set (before the first training forward). Settable with an array of that
        shape (e.g. from a checkpoint); a NaN row forgets the layer's thresholds, so its
        next training forward initialises them again. Also settable with one scalar per
        layer, (num_moe_layers,), the format of checkpoints before per-strategy
        thresholds: BL and BE broadcast it over the layer's E or L thresholds, token,
        expert and LE choice have none to set (NaN or not, the layer keeps exact top-K)."""
        shape = self.threshold_shape
        width = shape[1] if len(shape) == 2 else 1
        out = np.full((shape[0], width), np.nan, np.float32)
        for l in range(shape[0]):
            th = _C.model_threshold(self._model, l)
            if th is not None and th.size == width:
                out[l] = th
        return out.reshape(shape)

    @thresholds.setter
    def thresholds(self, value):
        value = np.asarray(value, dtype=np.float32)
        shape, n = self.threshold_shape, self.num_moe_layers
        if value.shape == (n,) and shape != (n,):       # one scalar per layer: broadcast
            value = np.repeat(value[:, None], shape[1], axis=1)
        if value.shape != shape:
            extra = f" or ({n},)" if shape != (n,) else ""
            raise ValueError(f"thresholds: expected shape {shape}{extra}, got {value.shape}")
        rows = value.reshape(n, -1) if n else value.reshape(0, 0)
        for l, row in enumerate(rows):
            nan = np.isnan(row)
            if nan.any() and not nan.all():
                raise ValueError(f"thresholds: layer {l} holds NaN in some entries only "
                                 "(a whole NaN row forgets the layer's thresholds)")
        for l, row in enumerate(rows):
            _C.model_threshold(self._model, l, None if row.size and np.isnan(row).all() else row)

    def branch_norms(self):
        """What each block of the last forward added to the residual stream (docs/method.md §6, the
        paper's Fig. 5): {"attn": (depth,), "ffn": (depth,)} float64, the mean over the
        batch's tokens of ||gate1 * attention output|| and ||gate2 * FFN (MoE) output||.
        Small values in the first blocks are what PLR counters. RuntimeError before any
        forward."""
        a = _C.model_branch_norms(self._model)
        return {"attn": a[:, 0].copy(), "ffn": a[:, 1].copy()}

    # ---- sizes ------------------------------------------------------------------------------
    @property
    def _grid(self):
        """Patches per side of an image (its tokens: the square of it)."""
        return self.input_size // self.config.patch

    def _batch(self):
        """(max_batch, batch of the last forward)."""
        return _C.model_batch(self._model)

    @property
    def max_batch(self):
        """Batch the activations are allocated for (0 before the first forward)."""
        return self._batch()[0]

    def num_params(self):
        """Floats in the parameter buffer (every parameter)."""
        return int(self._n)

    def num_activated_params(self):
        """Parameters one token uses at inference (see racedit.configs.count_params)."""
        return count_params(self.config, self.input_size, self.in_channels, self.num_classes,
                            self.learn_sigma)["activated"]

    def load_dit_state_dict(self, state):
        """Load a facebookresearch/DiT state dict given as a dict of NumPy arrays (see the
        class docstring for converting a .pt file) as the parameters and the EMA. Dense
        configs only. Every parameter must be present with DiT's shape; ``pos_embed``
        (1, L, D) may be present and must equal the fixed sin-cos embedding (it is not a
        parameter here). Missing or unexpected keys, wrong shapes (e.g. learn_sigma mismatch
        on final_layer.linear.*) raise ValueError."""
        if self.config.is_moe:
            raise ValueError(f"load_dit_state_dict: {self.config.name} is an MoE model; "
                             "DiT checkpoints fit dense configs (DiT-<size>/<p>) only")
        state = dict(state)
        pe = state.pop("pos_embed", None)
        shapes = {name: tuple(shape) for name, _, shape in self.layout}
        missing = sorted(set(shapes) - set(state))
        extra = sorted(set(state) - set(shapes))
        if missing or extra:
            raise ValueError(f"load_dit_state_dict: missing keys {missing}, unexpected keys {extra}")
        for name, shape in shapes.items():
            v = np.asarray(state[name])
            if v.shape != shape:
                hint = (" (learn_sigma mismatch?)" if name.startswith("final_layer.linear") else "")
                raise ValueError(f"load_dit_state_dict: {name}: expected shape {shape}, "
                                 f"got {v.shape}{hint}")
        if pe is not None:
            want = _C.dit_pos_embed(self._grid, self._grid, self.config.hidden)[None]
            pe = np.asarray(pe)
            if pe.shape != want.shape or not np.allclose(pe, want, atol=1e-4):
                raise ValueError(f"load_dit_state_dict: pos_embed {pe.shape} is not the fixed "
                                 f"2-D sin-cos embedding of shape {want.shape}")
        self.load_state_dict(state, ema=True)

    def __copy__(self):
        raise TypeError(f"{type(self).__name__} cannot be copied: a copy would share the model's C "
                        "state (activations, last forward, thresholds); build a new model and "
                        "copy param_buffer into it")

    def __deepcopy__(self, memo):
        return self.__copy__()

    def __repr__(self):
        extra = "" if self.device == "cpu" else f", device={self.device!r}, dtype={self.dtype!r}"
        return (f"RaceDiT({self.config.name!r}, input_size={self.input_size}, "
                f"in_channels={self.in_channels}, num_classes={self.num_classes}, "
                f"params={self.num_params():,}{extra})")


def _nan(v):
    return float("nan") if v is None else float(v)
