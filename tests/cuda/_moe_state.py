"""A CPU racedit.MoE and a GPU layer state (racedit.cuda.MoEState) fed the CPU layer's
parameters, and the check that their routing masks agree up to fp32 near ties."""
import numpy as np

import racedit
from racedit import cuda as rc


def layer_pair(strategy="race", gating="identity", B=2, L=16, D=24, E=4, k=2, seed=0,
               precision="fp32", **kw):
    """(cpu layer, GPU state, x, dy, PLR target or None): the CPU layer's parameters
    perturbed (0.05 noise), ``kw`` (eval_topk, plr_dim, the aux weights) given to both."""
    cpu = racedit.MoE(D, E, k, strategy=strategy, gating=gating, seed=seed, **kw)
    st = rc.MoEState(D, E, k, hidden=cpu.hidden, strategy=strategy, gating=gating,
                     precision=precision, **kw)
    rng = np.random.default_rng(seed + 1)
    cpu.param_buffer[...] += 0.05 * rng.standard_normal(cpu.param_buffer.size).astype(np.float32)
    x = rng.standard_normal((B, L, D)).astype(np.float32)
    dy = rng.standard_normal((B, L, D)).astype(np.float32)
    Pd = kw.get("plr_dim", 0)
    tgt = rng.standard_normal((B, L, Pd)).astype(np.float32) if Pd else None
    return cpu, st, x, dy, tgt


def masks_agree(m_gpu, m_cpu, G, tau=None):
    """True when identical. Otherwise every difference must be explained by fp32 noise in
    G itself (it comes from GEMMs with different summation orders): under top-K, a pair
    selected only on one side has a near-equal partner selected only on the other (a swap
    inside a group); under a threshold, the flipped pair sits at tau."""
    diff = m_gpu != m_cpu
    if not diff.any():
        return True
    if tau is not None:
        assert np.all(np.abs(G[diff] - tau) < 1e-4), f"{diff.sum()} pairs differ away from tau"
        return False
    only_gpu, only_cpu = np.sort(G[m_gpu & ~m_cpu]), np.sort(G[m_cpu & ~m_gpu])
    assert only_gpu.size == only_cpu.size, "selected counts differ"
    assert np.all(np.abs(only_gpu - only_cpu) < 1e-4), f"{diff.sum()} pairs differ away from a tie"
    return False


def grad_of(cpu, grads, name):
    """The slice of a flat gradient buffer (racedit.MoE.param_buffer's layout) for ``name``."""
    g = cpu.grads[name]
    off = (g.ctypes.data - cpu.grad_buffer.ctypes.data) // 4
    return grads[off:off + g.size].reshape(g.shape)
