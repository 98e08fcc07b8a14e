"""A small model configuration, a batch for it, and a CPU model paired with a model on
another device holding the same weights."""
import numpy as np

from racedit import RaceDiT

S, C, NCLS = 8, 4, 5          # 8x8x4 input, p=2 -> L=16 tokens


def batch(B, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, C, S, S)).astype(np.float32)
    t = rng.uniform(0, 1000, B).astype(np.float32)
    t[0] = 0.0
    y = rng.integers(0, NCLS + 1, B)
    y[-1] = NCLS
    target = rng.normal(size=(B, C, S, S)).astype(np.float32)
    return x, t, y, target


def pair(config, device, seed=0, scale=0.2, **kw):
    """A CPU model with random weights everywhere (adaLN included) and a model on ``device``
    with the same weights."""
    kw.setdefault("class_dropout_prob", 0.0)
    m = RaceDiT(config, input_size=S, in_channels=C, num_classes=NCLS, **kw)
    m.param_buffer[:] = np.random.default_rng(seed).normal(0.0, scale, m.param_buffer.size)
    g = RaceDiT(config, input_size=S, in_channels=C, num_classes=NCLS, device=device, **kw)
    g.set_param_buffer(m.param_buffer, ema=True)
    return m, g
