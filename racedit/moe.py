"""racedit.MoE — one Mixture-of-Experts FFN layer of Race-DiT (docs/method.md §2), forward and
backward through the C core, on the CPU or the GPU.

The layer owns its parameters and gradients as float32 host views into one flat buffer
each (the layout of csrc/moe.h, shared by grads and optimiser moments), and an opaque state
of its device holding the last forward's activations, the dispatch workspace and the
threshold tau. On CUDA the buffers are copied to the device on each call and the
gradients back: the same host buffers serve every device.
"""
import numpy as np

from . import _C

__all__ = ["MoE", "STRATEGIES", "GATINGS", "check_loss_weight"]

_NAMES = ("router_w", "router_b", "gate_w", "gate_b", "w1", "b1", "w2", "b2", "plr_w", "plr_b")
STRATEGIES = ("token", "expert", "bl", "be", "le", "race")
GATINGS = ("identity", "sigmoid", "softmax")


def _int_arg(name, v, lo):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name}: expected >= {lo}, got {v}")
    return int(v)


def check_loss_weight(name, v):
    """``v`` as a float: TypeError unless a real number, ValueError unless finite and >= 0
    (the aux-loss weights of MoE and RaceDiT)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{name}: expected a finite float >= 0, got {v}")
    return float(v)


def _input_copy(x, dim):
    """A private C-contiguous float32 copy of the layer input x (B, L, dim): TypeError for
    a non-array or non-float dtype, ValueError for another shape."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x: expected a numpy.ndarray, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(f"x: expected a floating dtype (float32 preferred), got {x.dtype}")
    if x.ndim != 3 or x.shape[2] != dim:
        raise ValueError(f"x: expected shape (B, L, {dim}), got {x.shape}")
    return np.array(x, dtype=np.float32, order="C", copy=True)


def _xavier(rng, shape, fan_in, fan_out):
    a = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-a, a, size=shape).astype(np.float32)


class MoE:
    """A Mixture-of-Experts FFN routed by Expert Race (or another top-K strategy).

    ``y = sum_e M[t,e] G[t,e] FFN_e(x_t)`` with router ``R = GELU(x Wr + br) Wg + bg``,
    gates ``G = gate(R)`` and the selection ``M`` a top-K of G over the strategy's groups
    (docs/method.md §2). Nothing is dropped or padded; a token may get 0..E experts.

    Args:
        dim: model width D (>= 1).
        num_experts: E (>= 1).
        k: experts per token on average, 0 <= k <= E.
        strategy: ``"race"`` (top-K over all B·L·E pairs), ``"token"``, ``"expert"``,
            ``"bl"``, ``"be"`` or ``"le"``.
        gating: ``"identity"`` (G = R), ``"sigmoid"`` or ``"softmax"`` over E.
        seed: seed of ``numpy.random.default_rng`` for the initial parameters.
        hidden: expert hidden width He; default 4·dim/k (the "hidden split" that keeps the
            activated FLOPs of a dense 4·D MLP). When 4·dim is not a multiple of k (or
            k = 0), pass ``hidden=`` explicitly.
        beta: threshold EMA factor in [0, 1): tau <- beta·tau + (1-beta)·kth each
            training forward, kth the K-th largest gate of each threshold's group
            (tau = kth on the first); see ``threshold``.
        eval_topk: in eval mode keep the batch top-K selection instead of the thresholds.
        plr_dim: width of the per-layer regularization head ``T = h plr_w + plr_b`` on the
            router hidden h (docs/method.md §4; p·p·C_out in a DiT); 0 (default) means no head.
        sim_weight: weight of the router-similarity loss (docs/method.md §5; the paper uses 0.01); 0 (default): off.
        balance_weight: weight of the Switch/GShard balance loss; 0 (default): off.
        plr_weight: weight of this layer's PLR loss (default 1.0). A model averaging L_PLR
            over its layers passes lambda_PLR / num_layers here.
        device: ``"cpu"`` (default) or ``"cuda"``: where the layer is computed (RuntimeError
            "CUDA not available: ..." without a usable GPU). Parameters and gradients stay
            host arrays on either (copied to the device and back on each call).
        precision: of the expert GEMMs on CUDA: ``"fp32"`` (default), ``"tf32"`` or
            ``"bf16"`` (bf16 operands, fp32 accumulation); the router, gate and routing stay
            fp32, so the masks do not depend on it. The CPU computes in fp32 only.

    Aux losses (training mode only): ``forward(x, plr_target=...)`` with a target
    (B,L,plr_dim) for the head (the patchified diffusion target: eps or velocity)
    computes ``L_PLR = mean((T - plr_target)^2)``; with sim_weight / balance_weight > 0 it
    computes L_sim / L_bal on the router logits and the selection. ``backward(dy)`` then
    adds ``weight * d(loss)/d(params, x)`` of each, so a trainer adds ``moe.aux["aux_loss"]``
    to its logged loss and needs nothing else. ``moe.aux`` also holds the diagnostics
    (MaxVio, combination usage, load, dead experts, experts per token) of every forward.
    In eval mode the head and the losses are skipped.

    Initialisation: biases are zero; router_w (D,D) and gate_w (D,E) are xavier-uniform;
    every expert's w1 (D,He) and w2 (He,D) are xavier-uniform with the fan sizes of a
    dense DiT MLP of width 4·D (bound sqrt(6/(D+4D))), i.e. each expert is a column/row
    slice of such an MLP. A token routed to k experts with unit gates therefore gets the
    output variance of the dense MLP (each expert carries 1/k of it); the gates then scale
    it (identity gating: the selected logits, O(1) at initialisation). In a DiT block the
    adaLN-Zero gate multiplies this output by 0 at step 0 anyway.

    Attributes:
        params, grads: dicts name -> float32 array view (router_w (D,D), router_b (D,),
            gate_w (D,E), gate_b (E,), w1 (E,D,He), b1 (E,He), w2 (E,He,D), b2 (E,D), and
            with plr_dim > 0 plr_w (D,plr_dim), plr_b (plr_dim,)) into ``param_buffer`` /
            ``grad_buffer`` (1-d float32, one each). Update them in place.
        training: True after ``train()`` (the default), False after ``eval()``.

    Raises:
        TypeError / ValueError naming the argument for a bad size, strategy or gating.
    """

    def __init__(self, dim, num_experts, k, strategy="race", gating="identity", seed=0,
                 hidden=None, beta=0.99, eval_topk=False, plr_dim=0, sim_weight=0.0,
                 balance_weight=0.0, plr_weight=1.0, device="cpu", precision="fp32"):
        dim = _int_arg("dim", dim, 1)
        num_experts = _int_arg("num_experts", num_experts, 1)
        k = _int_arg("k", k, 0)
        if k > num_experts:
            raise ValueError(f"k: expected 0 <= k <= num_experts={num_experts}, got {k}")
        if hidden is None:
            if k == 0 or (4 * dim) % k:
                raise ValueError(f"hidden: 4*dim/k = {4 * dim}/{k} is not an integer; pass "
                                 f"hidden= (the expert width) explicitly")
            hidden = 4 * dim // k
        hidden = _int_arg("hidden", hidden, 1)
        plr_dim = _int_arg("plr_dim", plr_dim, 0)
        weights = {n: check_loss_weight(n, v) for n, v in (("sim_weight", sim_weight),
                   ("balance_weight", balance_weight), ("plr_weight", plr_weight))}
        if num_experts < 2 and (weights["sim_weight"] > 0 or weights["balance_weight"] > 0):
            raise ValueError(f"sim_weight / balance_weight > 0 need num_experts >= 2, got {num_experts}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if gating not in GATINGS:
            raise ValueError(f"gating: expected one of {', '.join(GATINGS)}, got {gating!r}")
        self._state = _C.moe_new(device=device, precision=precision, dim=dim,
                                 num_experts=num_experts, expert_hidden=hidden, k=k,
                                 strategy=strategy, gating=gating, beta=float(beta),
                                 eval_topk=bool(eval_topk), plr_dim=plr_dim, **weights)
        self._dims = (dim, num_experts, k, hidden, strategy, gating, plr_dim)
        D, E, He = dim, num_experts, hidden
        shapes = dict(router_w=(D, D), router_b=(D,), gate_w=(D, E), gate_b=(E,),
                      w1=(E, D, He), b1=(E, He), w2=(E, He, D), b2=(E, D),
                      plr_w=(D, plr_dim), plr_b=(plr_dim,))
        sizes = _C.moe_param_sizes(self._state)
        total = int(sum(sizes))
        self.param_buffer = np.zeros(total, np.float32)
        self.grad_buffer = np.zeros(total, np.float32)
        self.params, self.grads = {}, {}
        off = 0
        for name, size in zip(_NAMES, sizes):
            if name.startswith("plr_") and plr_dim == 0:
                continue
            self.params[name] = self.param_buffer[off:off + size].reshape(shapes[name])
            self.grads[name] = self.grad_buffer[off:off + size].reshape(shapes[name])
            off += size
        rng = np.random.default_rng(seed)
        p = self.params
        p["router_w"][...] = _xavier(rng, (D, D), D, D)
        p["gate_w"][...] = _xavier(rng, (D, E), D, E)
        p["w1"][...] = _xavier(rng, (E, D, He), D, 4 * D)
        p["w2"][...] = _xavier(rng, (E, He, D), 4 * D, D)
        if plr_dim:  # drawn last: layers without a head keep the same initial weights
            p["plr_w"][...] = _xavier(rng, (D, plr_dim), D, plr_dim)
        self.training = True
        self._seed = seed

    # ---- configuration --------------------------------------------------------
    dim = property(lambda self: self._dims[0], doc="Model width D (read-only).")
    num_experts = property(lambda self: self._dims[1], doc="Number of experts E (read-only).")
    k = property(lambda self: self._dims[2], doc="Experts per token on average (read-only).")
    hidden = property(lambda self: self._dims[3], doc="Expert hidden width He (read-only).")
    strategy = property(lambda self: self._dims[4], doc="Routing strategy (read-only).")
    gating = property(lambda self: self._dims[5], doc="Gate function (read-only).")
    plr_dim = property(lambda self: self._dims[6], doc="Width of the PLR head, 0: none (read-only).")
    device = property(lambda self: _C.moe_device(self._state), doc="Where the layer is computed.")

    @property
    def precision(self):
        """Expert GEMM precision (str); settable (a change drops the last forward)."""
        return _C.moe_precision(self._state)

    @precision.setter
    def precision(self, p):
        _C.moe_precision(self._state, p)

    @property
    def beta(self):
        """Threshold EMA factor in [0, 1) (settable)."""
        return _C.moe_configure(self._state)["beta"]

    @beta.setter
    def beta(self, v):
        _C.moe_configure(self._state, beta=float(v))

    @property
    def eval_topk(self):
        """True: eval mode keeps batch top-K instead of ``G >= tau`` (settable)."""
        return _C.moe_configure(self._state)["eval_topk"]

    @eval_topk.setter
    def eval_topk(self, v):
        _C.moe_configure(self._state, eval_topk=bool(v))

    def _weight(name):
        def get(self):
            return _C.moe_configure(self._state)[name]

        def set(self, v):
            v = check_loss_weight(name, v)
            if self.num_experts < 2 and v > 0 and name != "plr_weight":
                raise ValueError(f"{name} > 0 needs num_experts >= 2, got {self.num_experts}")
            _C.moe_configure(self._state, **{name: v})

        return property(get, set, doc=f"{name} (float >= 0, settable; used by the next forward).")

    sim_weight = _weight("sim_weight")
    balance_weight = _weight("balance_weight")
    plr_weight = _weight("plr_weight")
    del _weight

    def train(self, mode=True):
        """Training mode (batch top-K selection, tau updated each forward). Returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Eval mode (docs/method.md §3): token, expert and LE choice keep their exact
        per-group top-K (their groups lie inside one image); BL, BE and race select
        ``G >= tau`` per pair with the pair's threshold (``threshold``), or the batch top-K
        (the training routing, with nothing updated) with eval_topk or while the layer has
        no threshold yet (no training forward, ``threshold`` not set). Returns self."""
        return self.train(False)

    # ---- forward / backward -----------------------------------------------------
    def forward(self, x, plr_target=None):
        """y (B,L,D) float32 = MoE(x (B,L,D)).

        plr_target: None, or the PLR head's regression target (B,L,plr_dim) (floating,
        converted to float32; the layer must have plr_dim > 0). In training mode it makes
        the forward compute L_PLR, which ``backward`` then includes; see ``aux``.

        x must be a floating ndarray; float64/float16 or non-contiguous input is copied to
        C-contiguous float32 (a private copy is always kept for backward). In training
        mode tau is updated; in eval mode a layer without a threshold routes by batch
        top-K (see ``eval``). Raises TypeError (not an array, non-float dtype) and
        ValueError (shape; NaN router scores under top-K selection).
        """
        x = _input_copy(x, self.dim)  # private: the state keeps it for backward
        return _C.moe_forward(self._state, x, self.param_buffer, self.training, plr_target)

    __call__ = forward

    def backward(self, dy):
        """dx (B,L,D) float32 given dy (B,L,D) of the last forward; parameter gradients
        ACCUMULATE into ``grads`` (call ``zero_grad()`` between steps). dy is converted
        like x. Raises RuntimeError before any forward, TypeError/ValueError for a bad dy
        and ValueError when grad_buffer shares memory with param_buffer or dy."""
        return _C.moe_backward(self._state, dy, None, self.param_buffer, self.grad_buffer)

    def zero_grad(self):
        """Set every gradient to 0."""
        self.grad_buffer[...] = 0.0

    # ---- what the last forward left ---------------------------------------------
    @property
    def aux(self):
        """The aux losses and diagnostics of the last forward (None before any), a dict:

        - ``sim_loss``, ``balance_loss``, ``plr_loss``: unweighted float, or None when that
          loss was not computed (eval mode, weight 0, no head or no ``plr_target``);
        - ``aux_loss``: their weighted sum (what ``backward`` differentiates besides dy);
        - ``max_violation``, ``combination_usage`` (coverage 0.95), ``dead_experts``,
          ``experts_per_token``, ``expert_load`` (int64 (E,)): of the selection;
        - ``threshold``, ``batch_threshold``: the mean of the thresholds (None before
          the first training forward, and for token / expert / LE choice, which have
          none) and the mean over groups of the last training batch's K-th values;
        - ``plr_pred``: the head's prediction T (B,L,plr_dim) float32 of a training
          forward with plr_dim > 0, else None;
        - ``training``: whether that forward was a training forward.
        See racedit.ops.losses for the definitions and degenerate cases."""
        return _C.moe_get(self._state, "aux")

    @property
    def mask(self):
        """bool (B,L,E): the selected (token, expert) pairs of the last forward (None before)."""
        return _C.moe_get(self._state, "mask")

    @property
    def gates(self):
        """float32 (B,L,E): G of the last forward (None before)."""
        return _C.moe_get(self._state, "gates")

    @property
    def logits(self):
        """float32 (B,L,E): router logits R of the last forward (None before)."""
        return _C.moe_get(self._state, "logits")

    @property
    def router_hidden(self):
        """float32 (B,L,D): the router's hidden h of the last forward (None before)."""
        return _C.moe_get(self._state, "hidden")

    @property
    def expert_counts(self):
        """int64 (E,): tokens per expert in the last forward (None before)."""
        return _C.moe_get(self._state, "counts")

    @property
    def batch_threshold(self):
        """tau_b of the last training forward: the mean over groups of the K-th largest
        gate (None before any forward)."""
        return _C.moe_get(self._state, "batch_threshold")

    @property
    def threshold(self):
        """The eval-mode thresholds (docs/method.md §3), learned in training as the EMA of
        the K-th largest gate of each batch-spanning group: for race the scalar tau
        (float), for BL one per expert (float32 (E,)), for BE one per token position
        (float32 (L,)); None before the first training forward (eval mode then routes by
        batch top-K), and always for token, expert and LE choice, which keep their exact
        top-K at inference. Settable: values of that shape without NaN (BE: L is checked
        by the next forward), or None to forget them (the next training forward starts
        them from its batch)."""
        th = _C.moe_get(self._state, "thresholds")
        if th is None or th.size == 0:
            return None
        return float(th[0]) if self.strategy == "race" else th

    @threshold.setter
    def threshold(self, tau):
        if tau is None:
            _C.moe_set_threshold(self._state, None)
            return
        strategy, E = self.strategy, self.num_experts
        if strategy == "race":
            if not isinstance(tau, (int, float, np.integer, np.floating)):
                raise TypeError(f"threshold: expected a float or None, got {type(tau).__name__}")
            _C.moe_set_threshold(self._state, float(tau))
            return
        if strategy not in ("bl", "be"):
            raise ValueError(f"threshold: strategy {strategy!r} keeps its exact top-K at "
                             "inference and has no threshold (only None)")
        try:
            t = np.asarray(tau, np.float32)
        except (TypeError, ValueError):
            raise TypeError(f"threshold: expected a 1-D array of floats or None, got "
                            f"{type(tau).__name__}") from None
        want = "(E,) = ({},)".format(E) if strategy == "bl" else "(L,)"
        if t.ndim != 1 or (strategy == "bl" and t.shape != (E,)) or t.size == 0:
            raise ValueError(f"threshold: strategy {strategy!r} needs shape {want}, got {t.shape}")
        _C.moe_set_threshold(self._state, t)

    # ---- copies ----------------------------------------------------------------------
    def __copy__(self):
        raise TypeError(f"{type(self).__name__} cannot be shallow-copied: the copy would share "
                        "the layer's C state (its last forward, threshold and buffers); use "
                        "copy.deepcopy")

    def _settings(self):
        """The constructor's arguments that rebuild this layer (its current settings)."""
        D, E, k, He, strategy, gating, plr_dim = self._dims
        return dict(dim=D, num_experts=E, k=k, strategy=strategy, gating=gating, seed=self._seed,
                    hidden=He, beta=self.beta, eval_topk=self.eval_topk, plr_dim=plr_dim,
                    sim_weight=self.sim_weight, balance_weight=self.balance_weight,
                    plr_weight=self.plr_weight, device=self.device, precision=self.precision)

    def __deepcopy__(self, memo):
        """A new layer with the same settings, parameters, gradients, threshold and mode
        (the last forward is not copied: backward needs a forward of the copy)."""
        new = type(self)(**self._settings())
        new.param_buffer[...] = self.param_buffer
        new.grad_buffer[...] = self.grad_buffer
        new.threshold = self.threshold
        new.training = self.training
        memo[id(self)] = new
        return new

    def __repr__(self):
        return (f"MoE(dim={self.dim}, num_experts={self.num_experts}, k={self.k}, "
                f"hidden={self.hidden}, strategy={self.strategy!r}, gating={self.gating!r}, "
                f"beta={self.beta:g}, eval_topk={self.eval_topk}, plr_dim={self.plr_dim}, "
                f"sim_weight={self.sim_weight:g}, balance_weight={self.balance_weight:g}, "
                f"plr_weight={self.plr_weight:g}, training={self.training}, "
                f"params={self.param_buffer.size}{self._repr_device()})")

    def _repr_device(self):
        d = self.device
        return "" if d == "cpu" else f", device={d!r}, precision={self.precision!r}"
