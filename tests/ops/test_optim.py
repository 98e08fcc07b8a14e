"""The fused optimiser loops (AdamW, grad norm, EMA, NaN finder) against their float64
twins, against torch.optim.AdamW when torch is installed, and on bad input; AdamW + EMA on
every device bit for bit a float32 replica of the CPU's arithmetic."""

from _numerics import on
from _subproc import run_python

import numpy as np
import pytest

from racedit import optim

SIZES = [0, 1, 7, 8191, 8192, 8193, 30011]


def _bufs(n, seed=0):
    r = np.random.default_rng(seed)
    p = r.standard_normal(n).astype(np.float32)
    g = (r.standard_normal(n) * 0.1).astype(np.float32)
    m = (r.standard_normal(n) * 0.01).astype(np.float32)
    v = (r.random(n) * 1e-3).astype(np.float32)
    return p, g, m, v


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("wd,scale,step", [(0.0, 1.0, 1), (0.1, 0.5, 3), (0.01, 1.0, 1000)])
def test_adamw_matches_twin(n, wd, scale, step):
    p, g, m, v = _bufs(n)
    kw = dict(lr=1e-3, step=step, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd,
              grad_scale=scale)
    rp, rm, rv = optim.adamw_step_ref(p, g, m, v, **kw)
    optim.adamw_step(p, g, m, v, **kw)
    np.testing.assert_allclose(m, rm, rtol=1e-5, atol=3e-8)  # cancellation in beta1*m + (1-beta1)*g
    np.testing.assert_allclose(v, rv, rtol=1e-5, atol=3e-10)
    np.testing.assert_allclose(p, rp, rtol=1e-5, atol=1e-6)


def test_adamw_update_moves_against_gradient():
    p = np.zeros(5, np.float32)
    g = np.array([1, -1, 2, 0, -3], np.float32)
    m, v = np.zeros(5, np.float32), np.zeros(5, np.float32)
    optim.adamw_step(p, g, m, v, lr=0.1, step=1)
    # first step: m_hat/sqrt(v_hat) = sign(g), so p = -lr*sign(g)
    np.testing.assert_allclose(p, -0.1 * np.sign(g), rtol=1e-5, atol=1e-7)


def test_adamw_against_twin_over_many_steps():
    p, _, _, _ = _bufs(1001, 1)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    rp, rm, rv = p.astype(np.float64), m.astype(np.float64), v.astype(np.float64)
    r = np.random.default_rng(2)
    for step in range(1, 21):
        g = r.standard_normal(p.size).astype(np.float32)
        optim.adamw_step(p, g, m, v, lr=1e-2, step=step, weight_decay=0.05, grad_scale=0.7)
        rp, rm, rv = optim.adamw_step_ref(rp, g, rm, rv, lr=1e-2, step=step,
                                          weight_decay=0.05, grad_scale=0.7)
    np.testing.assert_allclose(p, rp, rtol=1e-4, atol=1e-5)


def test_adamw_against_torch():
    torch = pytest.importorskip("torch")
    n = 2049
    p, _, _, _ = _bufs(n, 3)
    tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
    opt = torch.optim.AdamW([tp], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    r = np.random.default_rng(4)
    for step in range(1, 11):
        g = r.standard_normal(n).astype(np.float32)
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        optim.adamw_step(p, g, m, v, lr=3e-3, step=step, beta1=0.9, beta2=0.95, eps=1e-8,
                         weight_decay=0.1)
    st = opt.state[tp]
    np.testing.assert_allclose(m, st["exp_avg"].numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(v, st["exp_avg_sq"].numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_clip_scale_matches_torch():
    torch = pytest.importorskip("torch")
    g = np.random.default_rng(5).standard_normal(300).astype(np.float32) * 3
    t = torch.nn.Parameter(torch.zeros(300))
    t.grad = torch.from_numpy(g.copy())
    torch.nn.utils.clip_grad_norm_([t], max_norm=1.0)
    scale = optim.clip_scale(optim.grad_norm(g), 1.0)
    np.testing.assert_allclose(g * np.float32(scale), t.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_clip_scale():
    assert optim.clip_scale(10.0, 0) == 1.0
    assert optim.clip_scale(10.0, None) == 1.0
    assert optim.clip_scale(0.5, 1.0) == 1.0
    assert abs(optim.clip_scale(4.0, 1.0) - 1 / (4.0 + 1e-6)) < 1e-12


@pytest.mark.parametrize("n", SIZES)
def test_grad_norm_matches_twin(n):
    g = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    assert optim.grad_norm(g) == pytest.approx(optim.grad_norm_ref(g), rel=1e-12, abs=0)


def test_grad_norm_nonfinite():
    g = np.ones(10, np.float32)
    g[3] = np.inf
    assert optim.grad_norm(g) == np.inf
    g[4] = np.nan
    assert np.isnan(optim.grad_norm(g))


def test_grad_norm_independent_of_thread_count():
    code = ("import numpy as np; from racedit import optim; "
            "g = np.random.default_rng(0).standard_normal(300007).astype(np.float32); "
            "print(repr(optim.grad_norm(g)))")
    outs = []
    for threads in ("1", "2", "3"):
        outs.append(run_python(["-c", code], env_extra={"OMP_NUM_THREADS": threads}, check=True,
                               capture_output=True, text=True).stdout.strip())
    assert outs[0] == outs[1] == outs[2], outs


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9999, 1.0])
def test_ema_matches_twin(n, decay):
    r = np.random.default_rng(n)
    e = r.standard_normal(n).astype(np.float32)
    p = r.standard_normal(n).astype(np.float32)
    ref = optim.ema_update_ref(e, p, decay)
    optim.ema_update(e, p, decay)
    np.testing.assert_allclose(e, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n", [1, 7, 8192, 8193, 30011])
def test_nonfinite_index(n):
    x = np.zeros(n, np.float32)
    assert optim.nonfinite_index(x) == -1 == optim.nonfinite_index_ref(x)
    for pos in sorted({0, n // 2, n - 1}):
        y = x.copy()
        y[pos] = np.nan
        if pos + 1 < n:
            y[-1] = np.inf  # a later one must not win
        assert optim.nonfinite_index(y) == pos == optim.nonfinite_index_ref(y)
    y = x.copy()
    y[n - 1] = -np.inf
    assert optim.nonfinite_index(y) == n - 1


def test_nonfinite_index_empty():
    assert optim.nonfinite_index(np.zeros(0, np.float32)) == -1


# ---- bad input ------------------------------------------------------------------------

def test_adamw_bad_dtype_and_shape():
    p, g, m, v = _bufs(10)
    with pytest.raises(TypeError, match="params"):
        optim.adamw_step(p.astype(np.float64), g, m, v, lr=1e-3, step=1)
    with pytest.raises(TypeError, match="grads"):
        optim.adamw_step(p, g.astype(np.float64), m, v, lr=1e-3, step=1)
    with pytest.raises(ValueError, match="grads.*expected shape \\(10,\\)"):
        optim.adamw_step(p, g[:9], m, v, lr=1e-3, step=1)
    with pytest.raises(ValueError, match="m: expected shape"):
        optim.adamw_step(p, g, m[:9], v, lr=1e-3, step=1)
    with pytest.raises(ValueError, match="v: expected"):
        optim.adamw_step(p, g, m, v.reshape(2, 5), lr=1e-3, step=1)
    with pytest.raises(ValueError, match="params: expected a C-contiguous"):
        optim.adamw_step(np.zeros(20, np.float32)[::2], g, m, v, lr=1e-3, step=1)
    with pytest.raises(TypeError, match="params: expected a numpy.ndarray"):
        optim.adamw_step(list(p), g, m, v, lr=1e-3, step=1)
    ro = p.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="params"):
        optim.adamw_step(ro, g, m, v, lr=1e-3, step=1)


def test_adamw_bad_values():
    p, g, m, v = _bufs(10)
    before = p.copy()
    cases = [(dict(lr=-1.0), "lr"), (dict(lr=np.nan), "lr"), (dict(step=0), "step"),
             (dict(beta1=1.0), "beta1"), (dict(beta2=-0.1), "beta2"), (dict(eps=0.0), "eps"),
             (dict(weight_decay=-1.0), "weight_decay"), (dict(grad_scale=np.inf), "grad_scale")]
    for over, name in cases:
        kw = dict(lr=1e-3, step=1)
        kw.update(over)
        with pytest.raises(ValueError, match=name):
            optim.adamw_step(p, g, m, v, **kw)
    with pytest.raises(TypeError, match="step"):
        optim.adamw_step(p, g, m, v, lr=1e-3, step=1.5)
    np.testing.assert_array_equal(p, before)  # nothing written on error


def test_adamw_aliasing_rejected():
    p, g, m, v = _bufs(10)
    with pytest.raises(ValueError, match="params and m must not share memory"):
        optim.adamw_step(p, g, p, v, lr=1e-3, step=1)
    buf = np.zeros(15, np.float32)
    with pytest.raises(ValueError, match="share memory"):
        optim.adamw_step(p, g, buf[:10], buf[5:], lr=1e-3, step=1)


def test_other_bad_inputs():
    with pytest.raises(TypeError, match="grads"):
        optim.grad_norm(np.zeros(3, np.float64))
    with pytest.raises(ValueError, match="grads: expected a 1-d"):
        optim.grad_norm(np.zeros((3, 3), np.float32))
    with pytest.raises(TypeError, match="x"):
        optim.nonfinite_index([1.0, 2.0])
    e = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="decay"):
        optim.ema_update(e, np.zeros(4, np.float32), 1.5)
    with pytest.raises(ValueError, match="params: expected shape \\(4,\\)"):
        optim.ema_update(e, np.zeros(5, np.float32), 0.5)
    with pytest.raises(ValueError, match="ema and params must not share memory"):
        optim.ema_update(e, e, 0.5)
    with pytest.raises(TypeError, match="ema"):
        optim.ema_update(e.astype(np.float64), np.zeros(4, np.float32), 0.5)


# ---- every device: bit for bit the CPU optimiser's float32 arithmetic ------------------------
def adamw_f32(p, g, m, v, step, lr, b1, b2, eps, wd, gs, ema=None, ema_decay=0.9999):
    """The CPU optimiser's float32 arithmetic, operation by operation (no FMA)."""
    f = np.float32
    bc1, bc2 = 1.0 - b1 ** step, 1.0 - b2 ** step
    step_size, inv = f(lr / bc1), f(1.0 / np.sqrt(bc2))
    decay = f(1.0 - lr * wd)
    gg = g * f(gs)
    m[...] = f(b1) * m + f(1.0 - b1) * gg
    v[...] = f(b2) * v + f(1.0 - b2) * gg * gg
    denom = np.sqrt(v) * inv + f(eps)
    p[...] = p * decay - step_size * m / denom
    if ema is not None:
        ema[...] = ema * f(ema_decay) + p * f(1.0 - ema_decay)


@pytest.mark.parametrize("device", on())
@pytest.mark.parametrize("with_ema", [False, True])
def test_adamw_ema_bitwise(device, with_ema):
    rng = np.random.default_rng(7)
    n = 10007
    p = rng.standard_normal(n).astype(np.float32)
    m = np.zeros(n, np.float32)
    v = np.zeros(n, np.float32)
    ema = p.copy() if with_ema else None
    P, M, V = p.copy(), m.copy(), v.copy()
    E = ema.copy() if with_ema else None
    for step in range(1, 4):
        g = rng.standard_normal(n).astype(np.float32)
        g[::97] = 0.0
        optim.adamw_step(p, g, m, v, lr=1e-3, step=step, beta1=0.9, beta2=0.999, eps=1e-8,
                         weight_decay=0.01, grad_scale=0.5, ema=ema, ema_decay=0.99, device=device)
        adamw_f32(P, g, M, V, step, 1e-3, 0.9, 0.999, 1e-8, 0.01, 0.5, E, 0.99)
        np.testing.assert_array_equal(p, P)
        np.testing.assert_array_equal(m, M)
        np.testing.assert_array_equal(v, V)
        if with_ema:
            np.testing.assert_array_equal(ema, E)


@pytest.mark.parametrize("device", on())
def test_grad_norm_and_nonfinite_on(device):
    rng = np.random.default_rng(9)
    for n in (0, 1, 8192, 8193, 100000):
        g = rng.standard_normal(n).astype(np.float32)
        want = np.sqrt(np.sum(g.astype(np.float64) ** 2))
        assert optim.grad_norm(g, device=device) == pytest.approx(want, rel=1e-12, abs=0.0)
        assert optim.nonfinite_index(g, device=device) == -1
    x = np.zeros(50000, np.float32)
    x[[40001, 12345]] = [np.inf, np.nan]
    assert optim.nonfinite_index(x, device=device) == 12345
