"""Helpers shared by the tests: the devices a test runs on, the tolerance checks, finite
differences, the relative error norm and the expert-FFN test case.

Devices: ``"cpu"``; ``"check"``, the checking backend (the CPU kernels behind a guarded pool,
so its results equal the CPU's bit for bit); ``"cuda"``, marked ``gpu`` (skipped, with the
reason, where racedit has no usable CUDA device; see conftest.py)."""
import numpy as np
import pytest

GATINGS = ("identity", "sigmoid", "softmax")
STRATEGIES = ("token", "expert", "bl", "be", "le", "race")
DEVICES = ("cpu", "check", "cuda")
# fp32 on the GPU vs fp32 on the CPU or a float64 twin: other summation orders (cuBLAS vs the
# CPU BLAS), atol scaled by max(1, max |reference|)
GPU_RTOL, GPU_ATOL = 2e-4, 2e-5


def on(*devices):
    """pytest parameters for ``devices`` (default: every device), "cuda" marked ``gpu``."""
    return [pytest.param(d, id=d, marks=pytest.mark.gpu if d == "cuda" else ())
            for d in devices or DEVICES]


def moved(f):
    """f()'s result and the transfers it made on the checking backend (its pool counts every
    upload and download): (result, ((uploads, bytes up), (downloads, bytes down)))."""
    from racedit import _C

    a = _C.check_pool()
    r = f()
    b = _C.check_pool()
    return r, tuple(tuple(b[k] - a[k] for k in pair) for pair in
                    (("uploads", "upload_bytes"), ("downloads", "download_bytes")))


def exact(device):
    """The checking backend runs the CPU kernels: compared with the CPU, bit for bit."""
    return device in ("cpu", "check")


def assert_close(actual, expected, rtol=1e-4, atol=1e-5, name="", floor=1.0):
    """float32 result vs a reference: rtol, and atol scaled by max(floor, max |expected|)."""
    expected = np.asarray(expected, np.float64)
    scale = max(floor, float(np.abs(expected).max())) if expected.size else max(floor, 0.0)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol,
                               atol=atol * scale, err_msg=name)


def gpu_close(got, want, rtol=GPU_RTOL, atol=GPU_ATOL, what=""):
    """assert_close with the tolerances of fp32 on a GPU against the CPU or a twin."""
    assert_close(got, want, rtol=rtol, atol=atol, name=what)


def rel_err(got, want):
    """||got - want|| / ||want|| (Frobenius, float64); the plain norm when want is 0."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    den = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / (den if den > 0 else 1.0))


def fd_grad(f, x, eps=1e-6):
    """Central differences of the scalar f(x) w.r.t. every element of x (changed in place,
    then restored)."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        j = it.multi_index
        old = x[j]
        x[j] = old + eps
        fp = f(x)
        x[j] = old - eps
        fm = f(x)
        x[j] = old
        g[j] = (fp - fm) / (2 * eps)
    return g


def numgrad(f, arrays, i, eps=1e-6):
    """Central-difference gradient of the scalar f() w.r.t. arrays[i] (modified in place)."""
    return fd_grad(lambda _: f(), arrays[i], eps)


def route_valid(B, L, E, k, strategy):
    """Whether K (docs/method.md section 2) is a whole number in [0, group size] for scores
    (B, L, E), k and ``strategy`` (racedit.ref.route_plan's rule)."""
    from racedit import ref

    try:
        ref.route_plan(B, L, E, k, strategy)
        return True
    except ValueError:
        return False


def fd_check(f, x, dout, grad, n=8, h=1e-6, rng=None):
    """Central differences of <dout, f(x)> at n random coordinates of x vs `grad`."""
    rng = rng or np.random.default_rng(0)
    x = np.array(x, dtype=np.float64)
    for _ in range(n):
        i = tuple(rng.integers(0, s) for s in x.shape)
        old = x[i]
        x[i] = old + h
        fp = np.sum(f(x) * dout)
        x[i] = old - h
        fm = np.sum(f(x) * dout)
        x[i] = old
        fd = (fp - fm) / (2 * h)
        assert abs(fd - grad[i]) <= 1e-6 + 1e-5 * abs(fd), (i, fd, grad[i])


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
