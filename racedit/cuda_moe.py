"""The MoE layer on the GPU: ``racedit.MoE(..., device="cuda")`` builds a :class:`CudaMoE`,
a :class:`racedit.MoE` whose forward / backward run on the device (racedit.cuda's
MoEState: routing, experts, aux losses and the threshold tau stay on the GPU between
forward and backward). Parameters and gradients stay host NumPy buffers with the CPU
layer's layout and named views (uploaded on every forward / backward, gradients copied
back and accumulated), so optimisers and checkpoints treat both layers alike.
"""
import numpy as np

from . import _C
from .moe import MoE, _input_copy

__all__ = ["CudaMoE"]


class CudaMoE(MoE):
    """racedit.MoE on the GPU. Arguments are MoE's plus ``precision`` of the expert GEMMs
    (``"fp32"``, ``"tf32"`` or ``"bf16"``: bf16 operands with fp32 accumulation; router,
    gate and routing stay fp32, so the masks do not depend on it). beta, eval_topk and the
    loss weights stay settable (read by the next forward). Raises RuntimeError without a
    usable GPU, and MoE's errors for bad arguments."""

    device = "cuda"

    def __init__(self, *args, device="cuda", precision="fp32", **kwargs):
        from . import cuda

        super().__init__(*args, **kwargs)
        D, E, k, He, strategy, gating, plr_dim = self._dims
        c = _C.moe_configure(self._state)
        self._dev = cuda.MoEState(D, E, k, hidden=He, strategy=strategy, gating=gating,
                                  beta=c["beta"], eval_topk=c["eval_topk"], precision=precision,
                                  plr_dim=plr_dim, sim_weight=c["sim_weight"],
                                  balance_weight=c["balance_weight"], plr_weight=c["plr_weight"])
        self._bl = None

    @property
    def precision(self):
        """Expert GEMM precision (str); settable (a change drops the last forward)."""
        return self._dev.precision

    @precision.setter
    def precision(self, p):
        self._dev.precision = p

    def _settings(self):
        return dict(super()._settings(), device="cuda", precision=self.precision)

    def _sync_cfg(self):
        c = _C.moe_configure(self._state)
        for k in ("beta", "sim_weight", "balance_weight", "plr_weight"):
            self._dev.cfg[k] = float(c[k])
        self._dev.cfg["eval_topk"] = bool(c["eval_topk"])

    def forward(self, x, plr_target=None):
        """As :meth:`racedit.MoE.forward`, on the GPU (x copied in, y back)."""
        from . import cuda

        x = _input_copy(x, self.dim)  # private: the device state keeps it for backward
        self._sync_cfg()
        y = cuda.moe_forward(self._dev, x, self.param_buffer, self.training, plr_target)
        self._bl = x.shape[:2]
        return y

    __call__ = forward

    def backward(self, dy):
        """As :meth:`racedit.MoE.backward`, on the GPU: dx back, gradients ACCUMULATE
        into ``grad_buffer``."""
        from . import cuda

        dx, _ = cuda.moe_backward(self._dev, dy, None, self.param_buffer, self.grad_buffer)
        return dx

    @property
    def aux(self):
        """As :attr:`racedit.MoE.aux` (computed on the GPU)."""
        return self._dev.aux

    def _view(self, key):
        v = self._dev.view()
        if not v["have_forward"]:
            return None
        a = v[key]
        return a.reshape(*self._bl, a.shape[-1])

    @property
    def mask(self):
        """bool (B,L,E) selection of the last forward (None before)."""
        return self._view("mask")

    @property
    def gates(self):
        """float32 (B,L,E) G of the last forward (None before)."""
        return self._view("G")

    @property
    def logits(self):
        """float32 (B,L,E) router logits R of the last forward (None before)."""
        return self._view("R")

    @property
    def router_hidden(self):
        """float32 (B,L,D) router hidden h of the last forward (None before)."""
        return self._view("h")

    @property
    def expert_counts(self):
        """int64 (E,) tokens per expert of the last forward (None before)."""
        v = self._dev.view()
        return v["counts"] if v["have_forward"] else None

    @property
    def batch_threshold(self):
        """tau_b of the last training forward (None before)."""
        return self._dev.view()["tau_b"]

    @property
    def threshold(self):
        """tau (float) or None; settable (None forgets it)."""
        return self._dev.threshold

    @threshold.setter
    def threshold(self, tau):
        if tau is not None and not isinstance(tau, (int, float, np.integer, np.floating)):
            raise TypeError(f"threshold: expected a float or None, got {type(tau).__name__}")
        self._dev.threshold = tau

    def __repr__(self):
        return super().__repr__()[:-1] + f", device='cuda', precision={self.precision!r})"
