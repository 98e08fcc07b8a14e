"""racedit.optim — the optimiser's fused C loops over a flat float32 parameter buffer, as
thin validated functions, plus their NumPy float64 twins (``*_ref``) that the tests hold
the C code to.

Parameters, gradients, the AdamW moments ``m``/``v`` and the EMA all share one layout (the
model's ``param_buffer``), so every update is one OpenMP loop, never a Python loop over
parameters. The buffers updated in place must be float32, 1-D, C-contiguous and writeable;
they are never converted (a converted copy would swallow the update).
"""
import math

import numpy as np

from . import _C

__all__ = [
    "adamw_step", "grad_norm", "ema_update", "nonfinite_index", "clip_scale",
    "adamw_step_ref", "grad_norm_ref", "ema_update_ref", "nonfinite_index_ref",
]


def adamw_step(params, grads, m, v, *, lr, step, beta1=0.9, beta2=0.999, eps=1e-8,
               weight_decay=0.0, grad_scale=1.0, ema=None, ema_decay=0.9999, device="cpu"):
    """One AdamW update in place, as ``torch.optim.AdamW`` (decoupled weight decay).

    params, grads, m, v: float32 (n,) host buffers; params, m, v are written (on another
    device: copied there and back). lr >= 0; step: the 1-based number of this update (bias
    correction); betas in [0, 1); eps > 0; weight_decay >= 0; grad_scale >= 0 multiplies
    the gradients (clipping; see :func:`clip_scale`). ema (n,), when given, gets
    ``ema_decay*ema + (1-ema_decay)*params`` of the updated params in the same pass.
    Raises TypeError/ValueError naming the bad argument; the buffers must not share memory.
    """
    _C.adamw_step(params, grads, m, v, lr=float(lr), step=_int("step", step),
                  beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                  weight_decay=float(weight_decay), grad_scale=float(grad_scale), ema=ema,
                  ema_decay=float(ema_decay), device=device)


def grad_norm(grads, device="cpu"):
    """L2 norm of a float32 (n,) buffer, accumulated in double over fixed chunks, so the
    result is bit-identical whatever the number of threads. Returns a Python float (inf or
    nan when the buffer holds them)."""
    return _C.grad_norm(grads, device=device)


def ema_update(ema, params, decay):
    """``ema <- decay*ema + (1-decay)*params`` in place. ema, params: float32 (n,);
    decay in [0, 1]."""
    _C.ema_update(ema, params, float(decay))


def nonfinite_index(x, device="cpu"):
    """Index of the first NaN/Inf in a float32 (n,) buffer, or -1 when all are finite."""
    return _C.nonfinite_index(x, device=device)


def clip_scale(norm, max_norm):
    """The factor that brings a gradient of L2 norm ``norm`` to at most ``max_norm``
    (``torch.nn.utils.clip_grad_norm_``'s ``max_norm / (norm + 1e-6)``, capped at 1).
    max_norm <= 0 or None disables clipping (returns 1.0)."""
    if max_norm is None or max_norm <= 0:
        return 1.0
    return float(min(1.0, max_norm / (norm + 1e-6)))


def _int(name, x):
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}")
    return int(x)


# ---- NumPy float64 twins -------------------------------------------------------------

def adamw_step_ref(params, grads, m, v, *, lr, step, beta1=0.9, beta2=0.999, eps=1e-8,
                   weight_decay=0.0, grad_scale=1.0):
    """Float64 twin of :func:`adamw_step`; returns new ``(params, m, v)`` arrays."""
    p = np.asarray(params, np.float64)
    g = np.asarray(grads, np.float64) * grad_scale
    m = beta1 * np.asarray(m, np.float64) + (1 - beta1) * g
    v = beta2 * np.asarray(v, np.float64) + (1 - beta2) * g * g
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    p = p * (1 - lr * weight_decay) - (lr / bc1) * m / (np.sqrt(v) / math.sqrt(bc2) + eps)
    return p, m, v


def grad_norm_ref(grads):
    """Float64 twin of :func:`grad_norm`."""
    g = np.asarray(grads, np.float64)
    return float(np.sqrt(np.sum(g * g)))


def ema_update_ref(ema, params, decay):
    """Float64 twin of :func:`ema_update`; returns the new EMA."""
    return decay * np.asarray(ema, np.float64) + (1 - decay) * np.asarray(params, np.float64)


def nonfinite_index_ref(x):
    """Twin of :func:`nonfinite_index`."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(x)))
    return int(bad[0]) if bad.size else -1
