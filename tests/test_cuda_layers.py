"""The CUDA DiT layers and optimiser passes (racedit.cuda) against NumPy float64 twins kept
here (the twins themselves are checked by central finite differences, which runs without a
GPU): LayerNorm, adaLN modulate, gated residual, SiLU, timestep embedding, multi-head
attention forward/backward (fp32, and bf16 operands against the bf16 twin
racedit.ref.bf16_gemm_operands); AdamW + EMA bit for bit against a float32 replica of the
CPU optimiser's arithmetic; the gradient norm and the NaN/Inf finder; bad input."""
import numpy as np
import pytest
from _numerics import rel_err

import racedit
from racedit import ref

HAVE_GPU = racedit.cuda_available()
gpu = pytest.mark.skipif(not HAVE_GPU, reason="CUDA not available: no CUDA device or racedit "
                         "built without CUDA")
built = pytest.mark.skipif(not racedit.build_info()["cuda"], reason="racedit built without CUDA")
if HAVE_GPU:
    from racedit import cuda as rc

EPS = 1e-6


def close(a, b, rtol=2e-4, atol=2e-5, what=""):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.abs(b).max()) if b.size else 1.0)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale, err_msg=what)


# ---- float64 twins -------------------------------------------------------------------------
def ln_fwd(x):
    x = np.asarray(x, np.float64)
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    r = 1.0 / np.sqrt(v + EPS)
    return (x - m) * r, r[..., 0]


def ln_bwd(g, out, rstd):
    g, out = np.asarray(g, np.float64), np.asarray(out, np.float64)
    mg = g.mean(-1, keepdims=True)
    mgx = (g * out).mean(-1, keepdims=True)
    return np.asarray(rstd, np.float64)[:, None] * (g - mg - out * mgx)


def mod_fwd(x, shift, scale):
    D = x.shape[2]
    return x * (1.0 + scale[:, None, :D]) + shift[:, None, :D]


def mod_bwd(g, x, scale):
    B, L, D = x.shape
    dsh, dsc = np.zeros_like(scale, np.float64), np.zeros_like(scale, np.float64)
    dsh[:, :D] = g.sum(1)
    dsc[:, :D] = (g * x).sum(1)
    return g * (1.0 + scale[:, None, :D]), dsh, dsc


def gr_fwd(x, h, gate):
    return x + gate[:, None, :x.shape[2]] * h


def gr_bwd(g, h, gate):
    D = h.shape[2]
    dg = np.zeros_like(gate, np.float64)
    dg[:, :D] = (g * h).sum(1)
    return gate[:, None, :D] * g, dg


def silu(x):
    return x / (1.0 + np.exp(-x))


def silu_bwd(g, x):
    s = 1.0 / (1.0 + np.exp(-x))
    return g * s * (1.0 + x * (1.0 - s))


def heads(qkv, NH):
    B, L, D3 = qkv.shape
    D = D3 // 3
    q, k, v = (qkv[:, :, i * D:(i + 1) * D].reshape(B, L, NH, D // NH).transpose(0, 2, 1, 3)
               for i in range(3))
    return q, k, v, D // NH


def att_fwd(qkv, NH):
    qkv = np.asarray(qkv, np.float64)
    q, k, v, hd = heads(qkv, NH)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(qkv.shape[0], qkv.shape[1], -1)
    return o, a


def att_bwd(g, qkv, NH):
    qkv = np.asarray(qkv, np.float64)
    B, L, D3 = qkv.shape
    q, k, v, hd = heads(qkv, NH)
    _, a = att_fwd(qkv, NH)
    gh = np.asarray(g, np.float64).reshape(B, L, NH, hd).transpose(0, 2, 1, 3)
    dv = a.transpose(0, 1, 3, 2) @ gh
    da = gh @ v.transpose(0, 1, 3, 2)
    ds = a * (da - (a * da).sum(-1, keepdims=True)) / np.sqrt(hd)
    dq, dk = ds @ k, ds.transpose(0, 1, 3, 2) @ q
    back = lambda t: t.transpose(0, 2, 1, 3).reshape(B, L, D3 // 3)
    return np.concatenate([back(dq), back(dk), back(dv)], axis=2)


def temb(t, F, max_period=10000.0):
    half = F // 2
    f = np.exp(-np.log(max_period) * np.arange(half) / half)
    a = np.asarray(t, np.float64)[:, None] * f[None]
    return np.concatenate([np.cos(a), np.sin(a)], axis=1)


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


# ---- the twins by central differences (no GPU needed) ---------------------------------------
def fd_check(f, x, g, analytic, h=1e-6, n=12, seed=0):
    rng = np.random.default_rng(seed)
    flat = x.reshape(-1)
    for i in rng.choice(flat.size, size=min(n, flat.size), replace=False):
        old = flat[i]
        flat[i] = old + h
        up = (f(x) * g).sum()
        flat[i] = old - h
        dn = (f(x) * g).sum()
        flat[i] = old
        np.testing.assert_allclose(analytic.reshape(-1)[i], (up - dn) / (2 * h), rtol=1e-5, atol=1e-7)


def test_twins_by_finite_differences():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 7))
    g = rng.standard_normal((3, 7))
    out, r = ln_fwd(x)
    fd_check(lambda z: ln_fwd(z)[0], x, g, ln_bwd(g, out, r))
    x3, g3 = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 5))
    sh, sc = rng.standard_normal((2, 8)), rng.standard_normal((2, 8))
    dx, dsh, dsc = mod_bwd(g3, x3, sc)
    fd_check(lambda z: mod_fwd(z, sh, sc), x3, g3, dx)
    fd_check(lambda z: mod_fwd(x3, z, sc), sh, g3, dsh)
    fd_check(lambda z: mod_fwd(x3, sh, z), sc, g3, dsc)
    hh = rng.standard_normal((2, 3, 5))
    dh, dg = gr_bwd(g3, hh, sc)
    fd_check(lambda z: gr_fwd(x3, z, sc), hh, g3, dh)
    fd_check(lambda z: gr_fwd(x3, hh, z), sc, g3, dg)
    xs, gs = rng.standard_normal(20) * 4, rng.standard_normal(20)
    fd_check(silu, xs, gs, silu_bwd(gs, xs))
    qkv, go = rng.standard_normal((2, 5, 3 * 4)), rng.standard_normal((2, 5, 4))
    fd_check(lambda z: att_fwd(z, 2)[0], qkv, go, att_bwd(go, qkv, 2), n=24)


# ---- the GPU ops against the twins -----------------------------------------------------------
@gpu
@pytest.mark.parametrize("N,D", [(1, 1), (5, 3), (7, 33), (64, 384), (3, 1152)])
def test_layernorm(N, D):
    rng = np.random.default_rng(N + D)
    x = (3.0 + 2.0 * rng.standard_normal((N, D))).astype(np.float32)
    out, r = rc.layernorm_forward(x)
    want_out, want_r = ln_fwd(x)
    close(out, want_out, what="out")
    close(r, want_r, what="rstd")
    g = rng.standard_normal((N, D)).astype(np.float32)
    acc = rng.standard_normal((N, D)).astype(np.float32)
    acc0 = acc.copy()
    close(rc.layernorm_backward(g, out, r), ln_bwd(g, out, r), what="dinp")
    close(rc.layernorm_backward(g, out, r, acc), acc0 + ln_bwd(g, out, r), what="dinp_acc")
    np.testing.assert_array_equal(acc, acc0)  # the accumulator argument is not modified


@gpu
@pytest.mark.parametrize("B,L,D,S", [(1, 1, 1, 1), (2, 5, 7, 42), (3, 64, 96, 576)])
def test_modulate_and_gated_residual(B, L, D, S):
    rng = np.random.default_rng(B * L + D)
    x, h, g = (rng.standard_normal((B, L, D)).astype(np.float32) for _ in range(3))
    sh, sc, gt = (rng.standard_normal((B, S)).astype(np.float32) for _ in range(3))
    close(rc.modulate_forward(x, sh, sc), mod_fwd(x, sh, sc), what="modulate")
    for got, want, n in zip(rc.modulate_backward(g, x, sc), mod_bwd(g, x, sc),
                            ("dinp", "dshift", "dscale")):
        close(got, want, what=n)
    close(rc.gated_residual_forward(x, h, gt), gr_fwd(x, h, gt), what="gated")
    for got, want, n in zip(rc.gated_residual_backward(g, h, gt), gr_bwd(g, h, gt), ("dh", "dgate")):
        close(got, want, what=n)


@gpu
def test_silu_and_timestep_embedding():
    rng = np.random.default_rng(3)
    x = (6 * rng.standard_normal((3, 5, 7))).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    close(rc.silu_forward(x), silu(x.astype(np.float64)), what="silu")
    close(rc.silu_backward(g, x), silu_bwd(g, x.astype(np.float64)), what="silu'")
    t = np.array([0.0, 1.0, 17.5, 999.0], np.float32)
    close(rc.timestep_embedding(t, 256), temb(t, 256), 1e-6, 1e-6, "timestep embedding")
    close(rc.timestep_embedding(t, 6, 100.0), temb(t, 6, 100.0), 1e-6, 1e-6, "small")


@gpu
@pytest.mark.parametrize("B,L,D,NH", [(1, 1, 2, 1), (2, 5, 12, 3), (2, 64, 64, 4), (1, 256, 96, 6)])
def test_attention(B, L, D, NH):
    rng = np.random.default_rng(L + D)
    qkv = rng.standard_normal((B, L, 3 * D)).astype(np.float32)
    out, att = rc.attention_forward(qkv, NH)
    want_out, want_att = att_fwd(qkv, NH)
    close(out, want_out, what="out")
    close(att, want_att, what="att")
    g = rng.standard_normal((B, L, D)).astype(np.float32)
    close(rc.attention_backward(g, qkv, att, NH), att_bwd(g, qkv, NH), what="dqkv")


@gpu
@pytest.mark.parametrize("B,L,D,NH", [(1, 1, 2, 1), (2, 5, 12, 3), (2, 64, 64, 4), (1, 256, 96, 6)])
def test_attention_bf16(B, L, D, NH):
    """bf16 operands (fp32 accumulation, fp32 softmax) against the float64 twin that rounds
    the same operands (ref.bf16_gemm_operands): relative error norm < 5e-4 for out and dqkv
    (what is left is fp32 accumulation and the rare operand whose fp32 value rounds to the
    other bf16 neighbour), < 1e-4 for att. The bf16 twin is 2-4e-3 from the unrounded one
    (tests/test_ref_bf16.py), so the fp32 path would fail here."""
    rng = np.random.default_rng(L + D)
    qkv = rng.standard_normal((B, L, 3 * D)).astype(np.float32)
    out, att = rc.attention_forward(qkv, NH, precision="bf16")
    with ref.bf16_gemm_operands():
        want_out, want_att = ref.dit_attention_forward(qkv, NH)
    assert rel_err(out, want_out) < 5e-4
    assert rel_err(att, want_att) < 1e-4
    g = rng.standard_normal((B, L, D)).astype(np.float32)
    got = rc.attention_backward(g, qkv, att, NH, precision="bf16")
    with ref.bf16_gemm_operands():
        want = ref.dit_attention_backward(g, qkv, att, NH)
    assert rel_err(got, want) < 5e-4
    if L > 1:  # not the fp32 path: farther from the unrounded twin than from the rounded one
        f32_out, _ = rc.attention_forward(qkv, NH)
        assert rel_err(out, f32_out) > 4 * rel_err(out, want_out)


def test_attention_precision_checked_first():
    """A bad precision is a ValueError naming it, with or without a GPU."""
    from racedit import cuda as rcu

    qkv = np.zeros((1, 2, 12), np.float32)
    with pytest.raises(ValueError, match="precision.*'tf32'"):
        rcu.attention_forward(qkv, 3, precision="tf32")
    with pytest.raises(ValueError, match="precision"):
        rcu.attention_backward(np.zeros((1, 2, 4), np.float32), qkv,
                                        np.zeros((1, 3, 2, 2), np.float32), 3, precision="fp16")


@gpu
@pytest.mark.parametrize("with_ema", [False, True])
def test_adamw_ema_bitwise(with_ema):
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
        kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, grad_scale=0.5)
        rc.adamw_step(p, g, m, v, step, ema=ema, ema_decay=0.99, **kw)
        adamw_f32(P, g, M, V, step, 1e-3, 0.9, 0.999, 1e-8, 0.01, 0.5, E, 0.99)
        np.testing.assert_array_equal(p, P)
        np.testing.assert_array_equal(m, M)
        np.testing.assert_array_equal(v, V)
        if with_ema:
            np.testing.assert_array_equal(ema, E)


@gpu
def test_grad_norm_and_nonfinite():
    rng = np.random.default_rng(9)
    for n in (0, 1, 8192, 8193, 100000):
        g = rng.standard_normal(n).astype(np.float32)
        want = np.sqrt(np.sum(g.astype(np.float64) ** 2))
        assert rc.grad_norm(g) == pytest.approx(want, rel=1e-12, abs=0.0)
        assert rc.nonfinite_index(g) == -1
    x = np.zeros(50000, np.float32)
    x[[40001, 12345]] = [np.inf, np.nan]
    assert rc.nonfinite_index(x) == 12345


@built
def test_layers_bad_input():
    """Argument errors name the argument, on any CUDA build (checked before the device)."""
    from racedit import cuda as rcb

    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="shift"):
        rcb.modulate_forward(x, np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="scale"):
        rcb.modulate_forward(x, np.zeros((2, 4), np.float32), np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="gate"):
        rcb.gated_residual_forward(x, x, np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="num_heads"):
        rcb.attention_forward(np.zeros((1, 2, 12), np.float32), 3)
    with pytest.raises(ValueError, match="dim"):
        rcb.timestep_embedding(np.zeros(2, np.float32), 5)
    with pytest.raises(TypeError, match="inp"):
        rcb.layernorm_forward(np.zeros((2, 3), np.int32))
    p = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="m"):
        rcb.adamw_step(p, p.copy(), np.zeros(4), p.copy(), 1)
    with pytest.raises(ValueError, match="step"):
        rcb.adamw_step(p, p.copy(), p.copy(), p.copy(), 0)
    with pytest.raises(ValueError, match="grads"):
        rcb.adamw_step(p, np.zeros(3, np.float32), p.copy(), p.copy(), 1)


@gpu
def test_layers_match_cpu_ops():
    """The same inputs through the CPU model ops (racedit._C.dit_*) and the GPU ops."""
    from racedit import _C

    rng = np.random.default_rng(11)
    B, L, D, NH = 2, 16, 24, 4
    x = rng.standard_normal((B * L, D)).astype(np.float32)
    out_c, r_c = _C.dit_layernorm_forward(x)
    out_g, r_g = rc.layernorm_forward(x)
    close(out_g, out_c, what="layernorm out")
    close(r_g, r_c, what="rstd")
    g = rng.standard_normal(x.shape).astype(np.float32)
    close(rc.layernorm_backward(g, out_c, r_c), _C.dit_layernorm_backward(g, out_c, r_c),
          what="layernorm dinp")
    x3, g3, h3 = (rng.standard_normal((B, L, D)).astype(np.float32) for _ in range(3))
    sh, sc = (rng.standard_normal((B, D)).astype(np.float32) for _ in range(2))
    close(rc.modulate_forward(x3, sh, sc), _C.dit_modulate_forward(x3, sh, sc), what="modulate")
    for a, b in zip(rc.modulate_backward(g3, x3, sc), _C.dit_modulate_backward(g3, x3, sc)):
        close(a, b, what="modulate backward")
    close(rc.gated_residual_forward(x3, h3, sc), _C.dit_gated_residual_forward(x3, h3, sc), what="gated")
    for a, b in zip(rc.gated_residual_backward(g3, h3, sc), _C.dit_gated_residual_backward(g3, h3, sc)):
        close(a, b, what="gated backward")
    qkv = rng.standard_normal((B, L, 3 * D)).astype(np.float32)
    o_c, a_c = _C.dit_attention_forward(qkv, NH)
    o_g, a_g = rc.attention_forward(qkv, NH)
    close(o_g, o_c, what="attention out")
    close(a_g, a_c, what="attention att")
    close(rc.attention_backward(g3, qkv, a_c, NH), _C.dit_attention_backward(g3, qkv, a_c, NH),
          what="attention dqkv")
    s = (4 * rng.standard_normal(1000)).astype(np.float32)
    close(rc.silu_forward(s), _C.dit_silu_forward(s), what="silu")
    close(rc.silu_backward(s, s), _C.dit_silu_backward(s, s), what="silu backward")
    t = np.array([0.0, 3.0, 999.0], np.float32)
    close(rc.timestep_embedding(t, 256), _C.dit_timestep_embedding(t, 256), 1e-6, 1e-6, "temb")
