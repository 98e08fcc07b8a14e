"""Helpers shared by the tests: the relative error norm and the expert-FFN test case."""
import numpy as np


def rel_err(got, want):
    """||got - want|| / ||want|| (Frobenius, float64); the plain norm when want is 0."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    den = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / (den if den > 0 else 1.0))


def experts_case(N, D, E, He, seed, density=0.4):
    """(dy, x, mask, G, w1, b1, w2, b2) float32 for the expert FFN ops, with an expert that
    gets no token (E > 2) and a token that gets no expert (N > 2)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D)).astype(np.float32)
    mask = rng.random((N, E)) < density
    if E > 2:
        mask[:, 1] = False           # an expert with no tokens
    if N > 2:
        mask[2, :] = False           # a token with no expert
    G = rng.standard_normal((N, E)).astype(np.float32)
    w1 = (rng.standard_normal((E, D, He)) / np.sqrt(D)).astype(np.float32)
    b1 = (0.1 * rng.standard_normal((E, He))).astype(np.float32)
    w2 = (rng.standard_normal((E, He, D)) / np.sqrt(He)).astype(np.float32)
    b2 = (0.1 * rng.standard_normal((E, D))).astype(np.float32)
    dy = rng.standard_normal((N, D)).astype(np.float32)
    return dy, x, mask, G, w1, b1, w2, b2
