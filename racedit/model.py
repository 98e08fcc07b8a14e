"""RaceDiT: the whole diffusion transformer (SPEC §1-§3) as one object over the C core.

Python only orchestrates: it owns the flat parameter and gradient buffers (named views,
no copies), initialises them, drops labels for classifier-free guidance in training, and
calls racedit._C.model_forward / model_backward, which run every layer in C.
"""
import numpy as np

from . import _C
from .configs import count_params, get_config
from .moe import _weight_arg

__all__ = ["RaceDiT"]


def _xavier(rng, shape, fan_in, fan_out):
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=shape)


class ModelBase:
    """What the CPU :class:`RaceDiT` and the GPU :class:`racedit.cuda_model.CudaRaceDiT`
    share: the mode switches, the t / y checks and label dropout, sizes, the thresholds'
    shape check, the aux losses and layer diagnostics, per-sample experts per token, branch
    norms, state_dict and repr. A backend provides ``_batch()`` -> (max_batch, last batch),
    ``params``, ``num_params()``, ``_views()`` (per MoE layer a dict with ``have_forward``,
    ``have_tau``, ``tau`` and, after a forward, the keys of layer_stats and ``plr``, ``sim``,
    ``balance``), ``routing_masks()``, ``_get_thresholds()`` (list of float or None per MoE
    layer), ``_set_threshold(layer, tau or None)``, ``_branch_norms()`` ((depth, 2)
    float64) and ``_reserve(max_batch, fixed)``; and sets ``_drop_rng``."""

    _repr_extra = ""

    def _reserve_fixed(self, max_batch):
        """Allocate the activations for batches up to max_batch now, as a hard limit
        (None: allocate on the first forward and grow as needed)."""
        if max_batch is not None:
            if int(max_batch) < 1:
                raise ValueError(f"max_batch: expected >= 1, got {max_batch}")
            self._reserve(int(max_batch), True)

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
        """Evaluation mode: no label dropout; each MoE block selects G >= its threshold
        tau, or, while it has none (the model never ran a training forward and no
        ``thresholds`` were set, e.g. trained 0 steps), the training routing's batch top-K
        (nothing updated); with ``eval_topk`` always batch top-K."""
        return self.train(False)

    @property
    def num_moe_layers(self):
        """Number of MoE blocks (depth for MoE configs, 0 for dense)."""
        return self.config.depth if self.config.is_moe else 0

    @property
    def max_batch(self):
        """Batch the activations are allocated for (0 before the first forward)."""
        return self._batch()[0]

    def num_activated_params(self):
        """Parameters one token uses at inference (see racedit.configs.count_params)."""
        return count_params(self.config, self.input_size, self.in_channels, self.num_classes,
                            self.learn_sigma)["activated"]

    def experts_per_token_by_sample(self):
        """(B,) float64: for each sample of the last forward, the mean over MoE layers of
        its experts per token (zeros for a dense model)."""
        masks = self.routing_masks()
        if not masks:
            return np.zeros(self._batch()[1], dtype=np.float64)
        L = masks[0].shape[1]
        return np.mean([m.sum(axis=(1, 2)) / L for m in masks], axis=0)

    @property
    def thresholds(self):
        """(num_moe_layers,) float32 thresholds tau of the MoE layers, NaN where not yet
        set (before the first training forward). Settable with an array of that shape
        (e.g. from a checkpoint); NaN entries forget the layer's threshold, so its next
        training forward initialises it again."""
        return np.array([np.nan if tau is None else tau for tau in self._get_thresholds()],
                        dtype=np.float32)

    @thresholds.setter
    def thresholds(self, value):
        value = np.asarray(value, dtype=np.float32)
        if value.shape != (self.num_moe_layers,):
            raise ValueError(f"thresholds: expected shape ({self.num_moe_layers},), got {value.shape}")
        for l, tau in enumerate(value):
            self._set_threshold(l, None if np.isnan(tau) else float(tau))

    def state_dict(self):
        """dict name -> float32 copy of each parameter (DiT's names for the backbone)."""
        return {name: view.copy() for name, view in self.params.items()}

    def aux(self):
        """Unweighted aux losses of the last forward, each the mean over MoE layers:
        {"plr": L_PLR, "sim": L_sim, "balance": L_bal} as floats. A loss the last forward
        did not compute (eval mode, weight 0, no plr_target, dense model) is NaN."""
        views = [v for v in self._views() if v["have_forward"]]
        return {k: float(np.mean([v[k] for v in views])) if views else float("nan")
                for k in ("plr", "sim", "balance")}

    def layer_stats(self):
        """Per MoE layer diagnostics of the last forward: a list of dicts with ``load``
        (E,) int64 tokens per expert, ``dead_experts``, ``max_violation`` ((max - mean) /
        mean load), ``combination_usage`` (fraction of expert pairs holding 95 % of the
        co-selections), ``experts_per_token`` (selected pairs / tokens), ``tau`` (NaN
        before it is set), ``tau_b`` (batch threshold of the last training forward) and the
        layer's unweighted ``plr``, ``sim``, ``balance`` losses (NaN if not computed).
        [] for a dense model or before any forward."""
        keys = ("load", "dead_experts", "max_violation", "combination_usage",
                "experts_per_token", "tau_b", "plr", "sim", "balance")
        stats = []
        for v in self._views():
            if not v["have_forward"]:
                return []
            d = {k: v[k] for k in keys}
            d["tau"] = v["tau"] if v["have_tau"] else float("nan")
            stats.append(d)
        return stats

    def branch_norms(self):
        """What each block of the last forward added to the residual stream (SPEC §5, the
        paper's Fig. 5): {"attn": (depth,), "ffn": (depth,)} float64, the mean over the
        batch's tokens of ||gate1 * attention output|| and ||gate2 * FFN (MoE) output||.
        Small values in the first blocks are what PLR counters. RuntimeError before any
        forward."""
        a = self._branch_norms()
        return {"attn": a[:, 0].copy(), "ffn": a[:, 1].copy()}

    def __copy__(self):
        raise TypeError(f"{type(self).__name__} cannot be copied: a copy would share the model's C "
                        "state (activations, last forward, thresholds); build a new model and "
                        "copy param_buffer into it")

    def __deepcopy__(self, memo):
        return self.__copy__()

    def __repr__(self):
        return (f"RaceDiT({self.config.name!r}, input_size={self.input_size}, "
                f"in_channels={self.in_channels}, num_classes={self.num_classes}, "
                f"params={self.num_params():,}{self._repr_extra})")


class RaceDiT(ModelBase):
    """Race-DiT (or a dense DiT) with forward and backward in C.

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
    plr_weight, sim_weight, balance_weight : float, defaults 1.0, 0.01, 0.0
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
        "cuda" returns a racedit.cuda_model.CudaRaceDiT: the same methods on the GPU, whose
        ``params`` / ``grads`` are host copies, plus a device training ``step``.
    dtype : {"fp32", "bf16"}, default "fp32"
        Expert GEMM precision on CUDA ("bf16": bf16 operands, fp32 accumulation and
        master weights); the CPU model is fp32 only.

    Layout
    ------
    ``param_buffer`` / ``grad_buffer`` are 1-D float32 arrays; ``layout`` lists
    ``(name, offset, shape)`` in buffer order and ``params`` / ``grads`` map each name to
    a view. Names and shapes are facebookresearch/DiT's (linear weights (out, in) as
    torch.nn.Linear; ``x_embedder.proj.weight`` is the conv weight (D, C, p, p)); an MoE
    block has ``blocks.<i>.moe.{router_w (D,D), router_b, gate_w (D,E), gate_b,
    w1 (E,D,He), b1 (E,He), w2 (E,He,D), b2 (E,D), plr_w (D,p*p*C), plr_b}`` (the (in, out)
    layout of racedit.MoE) in place of ``blocks.<i>.mlp.*``. The model reads the buffer
    on every call, so writing into ``param_buffer[...]`` (e.g. EMA weights) takes effect
    at once; rebinding the attribute does not.

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
    Each block's MLP is racedit's MoE layer (SPEC §2-§4) with its PLR head predicting
    the patchified ``plr_target`` (width p*p*in_channels, the (i, j, c) order of DiT's
    unpatchify). Each aux loss of the model is the mean over its MoE layers, so every
    layer gets weight/depth; ``aux()`` reports the means, ``aux_loss()`` the weighted sum
    whose gradient ``backward()`` adds. Training mode routes by batch top-K and updates
    each layer's threshold tau (EMA with ``beta``, initialised by the first batch); eval
    mode selects G >= tau, falling back to batch top-K (nothing updated) in a layer that
    has no tau yet (no training forward, no ``thresholds`` set); ``eval_topk=True``
    keeps batch top-K always. Threads: OpenMP with a
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
    alone, and every reduction runs in a fixed order (tests/test_determinism.py). In
    "blas" mode the BLAS threads the products itself, and OpenBLAS's threaded sgemm
    blocks the inner dimension differently from its single-threaded one for some sizes:
    results may then differ in the last bits between thread counts.

    Errors: TypeError / ValueError for bad arguments (naming the argument, expected vs
    actual), RuntimeError for backward before forward.
    """

    def __new__(cls, *args, device="cpu", dtype="fp32", **kwargs):
        if device == "cuda":
            from .cuda_model import CudaRaceDiT

            return CudaRaceDiT(*args, dtype=dtype, **kwargs)
        return super().__new__(cls)

    def __init__(self, config, input_size=32, in_channels=4, num_classes=10, seed=0,
                 learn_sigma=False, routing="race", gating="identity", plr_weight=1.0,
                 sim_weight=0.01, balance_weight=0.0, beta=0.99, eval_topk=False,
                 class_dropout_prob=0.1, max_batch=None, device="cpu", dtype="fp32"):
        if device != "cpu":
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
        if dtype != "fp32":
            raise ValueError(f"dtype: the CPU model is fp32 only, got {dtype!r}")
        cfg = get_config(config)
        if not 0.0 <= class_dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob: expected a value in [0, 1], got {class_dropout_prob}")
        plr_weight, sim_weight, balance_weight = (_weight_arg(n, w) for n, w in (
            ("plr_weight", plr_weight), ("sim_weight", sim_weight), ("balance_weight", balance_weight)))
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
            self.out_channels, self.num_classes, num_experts=cfg.num_experts, k=max(cfg.k, 1),
            expert_hidden=cfg.expert_hidden, strategy=routing, gating=gating, beta=beta,
            eval_topk=bool(eval_topk), plr_weight=plr_weight, sim_weight=sim_weight,
            balance_weight=balance_weight)
        self.layout = _C.model_layout(self._model)
        n = _C.model_num_params(self._model)
        self.param_buffer = np.zeros(n, dtype=np.float32)
        self.grad_buffer = np.zeros(n, dtype=np.float32)
        self.params, self.grads = {}, {}
        for name, off, shape in self.layout:
            size = int(np.prod(shape))
            self.params[name] = self.param_buffer[off:off + size].reshape(shape)
            self.grads[name] = self.grad_buffer[off:off + size].reshape(shape)
        self._init_params(np.random.default_rng(seed))
        self._drop_rng = np.random.default_rng([seed, 1])
        self.training = True
        self._reserve_fixed(max_batch)

    # ---- initialisation -----------------------------------------------------------------
    def _init_params(self, rng):
        D, p, C = self.config.hidden, self.config.patch, self.in_channels
        for name, view in self.params.items():
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

    # ---- modes --------------------------------------------------------------------------
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
        return _C.model_forward(self._model, self.param_buffer, x, t, y, plr_target, self.training)

    __call__ = forward

    def infer(self, x, t, y):
        """out (B, out_channels, H, W) float32: the eval-mode forward (no label dropout, the
        MoE blocks select G >= tau, or batch top-K where a block has no threshold yet or
        with eval_topk), bit for bit what ``forward`` returns after ``eval()``, whatever
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
        return _C.model_infer(self._model, self.param_buffer, x, t, y)

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
        blocks' weighted aux-loss gradients. RuntimeError before any forward; ValueError
        when grad_buffer shares memory with param_buffer or dout."""
        _C.model_backward(self._model, self.param_buffer, self.grad_buffer, dout)

    def zero_grad(self):
        """Set every gradient to 0."""
        self.grad_buffer.fill(0.0)

    # ---- MoE losses and diagnostics ------------------------------------------------------
    def _views(self):
        return [_C.model_moe_view(self._model, l) for l in range(self.num_moe_layers)]

    def aux_loss(self):
        """plr_weight*L_PLR + sim_weight*L_sim + balance_weight*L_bal of the last forward
        (the losses averaged over MoE layers, only those computed; 0.0 when none). This is
        what backward() adds the gradient of."""
        return float(sum(v["aux_loss"] for v in self._views() if v["have_forward"]))

    def routing_masks(self):
        """list (one per MoE layer) of the (B, L, E) bool selection of the last forward
        (copies); [] for a dense model or before any forward."""
        return [v["mask"] for v in self._views() if v["have_forward"]]

    # ---- sizes and state ------------------------------------------------------------------
    def _batch(self):
        return _C.model_batch(self._model)

    def _get_thresholds(self):
        return [v["tau"] if v["have_tau"] else None for v in self._views()]

    def _set_threshold(self, layer, tau):
        _C.model_set_threshold(self._model, layer, tau)

    def _branch_norms(self):
        return _C.model_branch_norms(self._model)

    def _reserve(self, max_batch, fixed):
        _C.model_reserve(self._model, max_batch, fixed)

    def num_params(self):
        """Floats in the parameter buffer (every parameter)."""
        return int(self.param_buffer.size)

    def load_dit_state_dict(self, state):
        """Load a facebookresearch/DiT state dict given as a dict of NumPy arrays (see the
        class docstring for converting a .pt file). Dense configs only. Every parameter
        must be present with DiT's shape; ``pos_embed`` (1, L, D) may be present and must
        equal the fixed sin-cos embedding (it is not a parameter here). Missing or
        unexpected keys, wrong shapes (e.g. learn_sigma mismatch on
        final_layer.linear.*) raise ValueError."""
        if self.config.is_moe:
            raise ValueError(f"load_dit_state_dict: {self.config.name} is an MoE model; "
                             "DiT checkpoints fit dense configs (DiT-<size>/<p>) only")
        state = dict(state)
        pe = state.pop("pos_embed", None)
        missing = sorted(set(self.params) - set(state))
        extra = sorted(set(state) - set(self.params))
        if missing or extra:
            raise ValueError(f"load_dit_state_dict: missing keys {missing}, unexpected keys {extra}")
        for name, view in self.params.items():
            v = np.asarray(state[name])
            if v.shape != view.shape:
                hint = (" (learn_sigma mismatch?)" if name.startswith("final_layer.linear") else "")
                raise ValueError(f"load_dit_state_dict: {name}: expected shape {view.shape}, "
                                 f"got {v.shape}{hint}")
        if pe is not None:
            g = self.input_size // self.config.patch
            want = _C.dit_pos_embed(g, g, self.config.hidden)[None]
            pe = np.asarray(pe)
            if pe.shape != want.shape or not np.allclose(pe, want, atol=1e-4):
                raise ValueError(f"load_dit_state_dict: pos_embed {pe.shape} is not the fixed "
                                 f"2-D sin-cos embedding of shape {want.shape}")
        for name, view in self.params.items():
            view[...] = np.asarray(state[name], dtype=np.float32)
