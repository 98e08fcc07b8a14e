"""The DiT layers one by one: the C kernels (racedit._C.dit_*) against the float64 twins
(racedit.ref.dit), the twins against finite differences and against independent
transcriptions of DiT's formulas, and bad inputs; the layers on every device (the checking
backend bit for bit the CPU's, the GPU within fp32 tolerances: rtol 2e-4, atol 2e-5 times
max(1, max|reference|)) against the twins and the CPU ops."""
import numpy as np
import pytest

from _numerics import exact, fd_check, gpu_close, on

from racedit import _C
from racedit import ref

RTOL, ATOL = 2e-5, 2e-5


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def close(c, r, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(c, r, rtol=rtol, atol=atol)


# ---- patchify ------------------------------------------------------------------------------

@pytest.mark.parametrize("B,C,H,W,p", [(2, 4, 8, 8, 2), (1, 3, 6, 4, 2), (2, 1, 9, 6, 3), (1, 2, 5, 3, 1)])
@pytest.mark.parametrize("order", ["ijc", "cij"])
def test_patchify_c_vs_ref_and_roundtrip(B, C, H, W, p, order):
    rng = np.random.default_rng(1)
    img = f32(rng.normal(size=(B, C, H, W)))
    tok = _C.dit_patchify(img, p, order)
    np.testing.assert_array_equal(tok, ref.dit_patchify(img, p, order).astype(np.float32))
    back = _C.dit_unpatchify(tok, C, H, W, p, order)
    np.testing.assert_array_equal(back, img)
    np.testing.assert_array_equal(ref.dit_unpatchify(tok, C, H, W, p, order), img)


def test_patchify_ijc_is_inverse_of_dit_unpatchify():
    # DiT's unpatchify: x.reshape(N, h, w, p, p, c); einsum('nhwpqc->nchpwq'); reshape(N, c, h*p, w*p)
    rng = np.random.default_rng(2)
    N, h, w, p, c = 2, 3, 3, 2, 5
    tok = rng.normal(size=(N, h * w, p * p * c))
    x = np.einsum("nhwpqc->nchpwq", tok.reshape(N, h, w, p, p, c)).reshape(N, c, h * p, w * p)
    close(_C.dit_unpatchify(f32(tok), c, h * p, w * p, p, "ijc"), x)
    close(_C.dit_patchify(f32(x), p, "ijc"), tok)


def test_patchify_cij_is_a_strided_conv():
    # Conv2d(C, D, p, stride p) == linear over (c, i, j) patches with W.reshape(D, C*p*p)
    rng = np.random.default_rng(3)
    B, C, H, D, p = 2, 3, 6, 5, 2
    img, Wc, b = rng.normal(size=(B, C, H, H)), rng.normal(size=(D, C, p, p)), rng.normal(size=D)
    g = H // p
    conv = np.zeros((B, D, g, g))
    for r in range(g):
        for s in range(g):
            conv[:, :, r, s] = np.einsum("bcij,dcij->bd", img[:, :, r * p:(r + 1) * p, s * p:(s + 1) * p], Wc) + b
    tokens = conv.reshape(B, D, g * g).transpose(0, 2, 1)       # timm PatchEmbed: flatten(2).transpose(1, 2)
    lin = _C.dit_linear_forward(_C.dit_patchify(f32(img), p, "cij").reshape(-1, C * p * p),
                                f32(Wc.reshape(D, -1)), f32(b))
    close(lin.reshape(B, g * g, D), tokens, rtol=1e-4, atol=1e-4)


def test_patchify_bad_inputs():
    img = np.zeros((1, 2, 6, 6), np.float32)
    with pytest.raises(ValueError, match="multiple of p"):
        _C.dit_patchify(img, 4)
    with pytest.raises(ValueError, match="order"):
        _C.dit_patchify(img, 2, "hwc")
    with pytest.raises(ValueError, match="p: expected >= 1"):
        _C.dit_patchify(img, 0)
    with pytest.raises(ValueError, match="img: expected a 4-d"):
        _C.dit_patchify(img[0], 2)
    with pytest.raises(TypeError, match="img"):
        _C.dit_patchify(img.astype(np.int32), 2)
    with pytest.raises(ValueError, match="tok: expected shape"):
        _C.dit_unpatchify(np.zeros((1, 9, 7), np.float32), 2, 6, 6, 2)


# ---- fixed embeddings ----------------------------------------------------------------------

def dit_get_2d_sincos_pos_embed(embed_dim, grid_size):
    """A transcription of DiT's get_2d_sincos_pos_embed (MAE), for comparison."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    gh = np.arange(grid_size, dtype=np.float32)
    gw = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid_size, grid_size)
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("g,D", [(4, 32), (16, 384), (1, 8), (3, 12)])
def test_pos_embed_matches_dit(g, D):
    want = dit_get_2d_sincos_pos_embed(D, g)
    close(ref.dit_pos_embed(g, g, D), want, rtol=0, atol=1e-12)
    close(_C.dit_pos_embed(g, g, D), want, rtol=0, atol=1e-6)


def test_pos_embed_rectangular_and_bad():
    close(_C.dit_pos_embed(2, 5, 16), ref.dit_pos_embed(2, 5, 16), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 4"):
        _C.dit_pos_embed(2, 2, 6)
    with pytest.raises(ValueError, match="gh"):
        _C.dit_pos_embed(0, 2, 8)


def test_timestep_embedding_c_vs_ref_and_dit_formula():
    t = np.array([0, 1, 17.5, 500, 999, 1000], np.float32)
    r = ref.dit_timestep_embedding(t, 256)
    close(_C.dit_timestep_embedding(t), r, rtol=0, atol=2e-6)
    half = 128                                    # DiT: exp(-log(P) * arange(half) / half), cat(cos, sin)
    freqs = np.exp(-np.log(10000) * np.arange(half) / half)
    close(r, np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], 1), rtol=0, atol=1e-12)
    close(_C.dit_timestep_embedding(t, dim=6, max_period=100.0),
          ref.dit_timestep_embedding(t, 6, 100.0), rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="even"):
        _C.dit_timestep_embedding(t, dim=7)
    with pytest.raises(ValueError, match="t: expected a 1-d"):
        _C.dit_timestep_embedding(t[None])


# ---- linear, LayerNorm, modulate, gated residual -----------------------------------------------

@pytest.mark.parametrize("N,IC,OC", [(7, 5, 3), (1, 1, 1), (33, 17, 70)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(N, IC, OC, bias):
    rng = np.random.default_rng(4)
    x, W, b, g = (rng.normal(size=s) for s in [(N, IC), (OC, IC), (OC,), (N, OC)])
    out = _C.dit_linear_forward(f32(x), f32(W), f32(b) if bias else None)
    close(out, ref.dit_linear_forward(x, W, b if bias else None))
    dW0, db0 = rng.normal(size=(OC, IC)), rng.normal(size=OC)
    dW, db = f32(dW0), f32(db0)
    dx = _C.dit_linear_backward(f32(g), f32(x), f32(W), dW, db if bias else None)
    rdx, rdW, rdb = ref.dit_linear_backward(g, x, W)
    close(dx, rdx)
    close(dW, dW0 + rdW)                                        # accumulates
    close(db, db0 + (rdb if bias else 0))


def test_linear_ref_fd():
    rng = np.random.default_rng(5)
    x, W, b, g = (rng.normal(size=s) for s in [(4, 3), (5, 3), (5,), (4, 5)])
    dx, dW, db = ref.dit_linear_backward(g, x, W)
    fd_check(lambda v: ref.dit_linear_forward(v, W, b), x, g, dx)
    fd_check(lambda v: ref.dit_linear_forward(x, v, b), W, g, dW)
    fd_check(lambda v: ref.dit_linear_forward(x, W, v), b, g, db)


def test_linear_bad_inputs():
    x, W = np.zeros((2, 3), np.float32), np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="W: expected shape"):
        _C.dit_linear_forward(x, W.T.copy())
    with pytest.raises(ValueError, match="b: expected shape"):
        _C.dit_linear_forward(x, W, np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="dW"):
        _C.dit_linear_backward(np.zeros((2, 4), np.float32), x, W, np.zeros((4, 3)))
    with pytest.raises(ValueError, match="dW"):
        _C.dit_linear_backward(np.zeros((2, 4), np.float32), x, W, np.zeros((4, 3), np.float32).T)


@pytest.mark.parametrize("N,D", [(6, 32), (3, 7), (1, 1)])
def test_layernorm(N, D):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(N, D)) * 3 + 50.0                      # offset mean: two-pass variance
    out, rstd = _C.dit_layernorm_forward(f32(x))
    rout, rrstd = ref.dit_layernorm_forward(f32(x))
    close(out, rout, rtol=1e-4, atol=1e-4)
    close(rstd, rrstd, rtol=1e-4)
    g = rng.normal(size=(N, D))
    acc0 = rng.normal(size=(N, D))
    acc = f32(acc0)
    got = _C.dit_layernorm_backward(f32(g), out, rstd, dinp_acc=acc)
    close(got, acc0 + ref.dit_layernorm_backward(g, rout, rrstd), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(acc, f32(acc0))                # the accumulator is not modified
    close(_C.dit_layernorm_backward(f32(g), out, rstd), ref.dit_layernorm_backward(g, rout, rrstd),
          rtol=1e-4, atol=1e-4)


def test_layernorm_ref_fd():
    rng = np.random.default_rng(7)
    x, g = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    out, rstd = ref.dit_layernorm_forward(x)
    fd_check(lambda v: ref.dit_layernorm_forward(v)[0], x, g, ref.dit_layernorm_backward(g, out, rstd))


def test_layernorm_bad_inputs():
    out, rstd = _C.dit_layernorm_forward(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="rstd: expected shape"):
        _C.dit_layernorm_backward(out, out, rstd[:1].copy())
    with pytest.raises(ValueError, match="dinp_acc: expected shape"):
        _C.dit_layernorm_backward(out, out, rstd, np.zeros((3, 3), np.float32))


@pytest.mark.parametrize("B,L,D", [(2, 5, 8), (1, 1, 3), (3, 16, 33)])
def test_modulate_and_gated_residual(B, L, D):
    rng = np.random.default_rng(8)
    x, h, g = (rng.normal(size=(B, L, D)) for _ in range(3))
    sh, sc, gate = (rng.normal(size=(B, D)) for _ in range(3))
    close(_C.dit_modulate_forward(f32(x), f32(sh), f32(sc)), ref.dit_modulate_forward(x, sh, sc))
    for c, r in zip(_C.dit_modulate_backward(f32(g), f32(x), f32(sc)), ref.dit_modulate_backward(g, x, sc)):
        close(c, r, rtol=1e-4, atol=1e-4)
    close(_C.dit_gated_residual_forward(f32(x), f32(h), f32(gate)), ref.dit_gated_residual_forward(x, h, gate))
    for c, r in zip(_C.dit_gated_residual_backward(f32(g), f32(h), f32(gate)),
                    ref.dit_gated_residual_backward(g, h, gate)):
        close(c, r, rtol=1e-4, atol=1e-4)


def test_modulate_and_gated_residual_ref_fd():
    rng = np.random.default_rng(9)
    x, h, g = (rng.normal(size=(2, 3, 4)) for _ in range(3))
    sh, sc, gate = (rng.normal(size=(2, 4)) for _ in range(3))
    dx, dsh, dsc = ref.dit_modulate_backward(g, x, sc)
    fd_check(lambda v: ref.dit_modulate_forward(v, sh, sc), x, g, dx)
    fd_check(lambda v: ref.dit_modulate_forward(x, v, sc), sh, g, dsh)
    fd_check(lambda v: ref.dit_modulate_forward(x, sh, v), sc, g, dsc)
    dh, dgate = ref.dit_gated_residual_backward(g, h, gate)
    fd_check(lambda v: ref.dit_gated_residual_forward(x, v, gate), h, g, dh)
    fd_check(lambda v: ref.dit_gated_residual_forward(x, h, v), gate, g, dgate)
    fd_check(lambda v: ref.dit_gated_residual_forward(v, h, gate), x, g, g)


def test_modulate_bad_inputs():
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="shift: expected shape"):
        _C.dit_modulate_forward(x, np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="gate: expected shape"):
        _C.dit_gated_residual_forward(x, x, np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="h: expected shape"):
        _C.dit_gated_residual_backward(x, x[:, :2].copy(), np.zeros((2, 4), np.float32))


# ---- attention -----------------------------------------------------------------------------

@pytest.mark.parametrize("B,L,D,NH", [(2, 5, 12, 3), (1, 1, 4, 1), (3, 16, 32, 2), (2, 64, 24, 4)])
def test_attention(B, L, D, NH):
    rng = np.random.default_rng(10)
    qkv, g = rng.normal(size=(B, L, 3 * D)), rng.normal(size=(B, L, D))
    out, att = _C.dit_attention_forward(f32(qkv), NH)
    rout, ratt = ref.dit_attention_forward(qkv, NH)
    close(out, rout, rtol=1e-4, atol=1e-5)
    close(att, ratt, rtol=1e-4, atol=1e-6)
    close(att.sum(-1), np.ones((B, NH, L)), rtol=1e-5)
    close(_C.dit_attention_backward(f32(g), f32(qkv), att, NH),
          ref.dit_attention_backward(g, qkv, ratt, NH), rtol=1e-4, atol=1e-5)


def test_attention_large_scores_stay_finite():
    rng = np.random.default_rng(11)
    qkv = f32(rng.normal(size=(1, 8, 3 * 8)) * 300.0)          # scores ~1e5: exp would overflow unshifted
    out, att = _C.dit_attention_forward(qkv, 2)
    assert np.isfinite(out).all() and np.isfinite(att).all()
    close(att, ref.dit_attention_forward(qkv, 2)[1], rtol=1e-3, atol=1e-3)


def test_attention_ref_fd():
    rng = np.random.default_rng(12)
    qkv, g = rng.normal(size=(2, 4, 3 * 6)), rng.normal(size=(2, 4, 6))
    _, att = ref.dit_attention_forward(qkv, 2)
    fd_check(lambda v: ref.dit_attention_forward(v, 2)[0], qkv, g,
             ref.dit_attention_backward(g, qkv, att, 2), n=20)


def test_attention_bad_inputs():
    with pytest.raises(ValueError, match="heads"):
        _C.dit_attention_forward(np.zeros((1, 2, 12), np.float32), 3)
    with pytest.raises(ValueError, match="heads: expected >= 1"):
        _C.dit_attention_forward(np.zeros((1, 2, 12), np.float32), 0)
    with pytest.raises(ValueError, match="att: expected shape"):
        _C.dit_attention_backward(np.zeros((1, 2, 4), np.float32), np.zeros((1, 2, 12), np.float32),
                                  np.zeros((1, 2, 2, 3), np.float32), 2)


# ---- elementwise, label embedding ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["silu", "gelu"])
def test_elementwise(name):
    rng = np.random.default_rng(13)
    x = np.concatenate([rng.normal(size=100) * 4, [0.0, -30.0, 30.0]])
    g = rng.normal(size=x.size)
    fwd, bwd = getattr(_C, f"dit_{name}_forward"), getattr(_C, f"dit_{name}_backward")
    rfwd, rbwd = getattr(ref, f"dit_{name}_forward"), getattr(ref, f"dit_{name}_backward")
    close(fwd(f32(x)), rfwd(x), rtol=1e-5, atol=1e-6)
    close(bwd(f32(g), f32(x)), rbwd(g, x), rtol=1e-4, atol=1e-6)
    fd_check(rfwd, x[:10], g[:10], rbwd(g[:10], x[:10]))
    with pytest.raises(ValueError, match="inp: expected shape"):
        bwd(f32(g), f32(x[:5]))


def test_gelu_is_tanh_approximation():
    x = np.linspace(-5, 5, 11)
    want = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    close(ref.dit_gelu_forward(x), want, rtol=0, atol=1e-12)


def test_embedding():
    rng = np.random.default_rng(14)
    tab = rng.normal(size=(5, 6))
    y = np.array([4, 0, 4, 2])
    close(_C.dit_embedding_forward(y, f32(tab)), ref.dit_embedding_forward(y, tab))
    g = rng.normal(size=(4, 6))
    acc0 = rng.normal(size=(5, 6))
    acc = f32(acc0)
    _C.dit_embedding_backward(f32(g), y, acc)
    close(acc, acc0 + ref.dit_embedding_backward(g, y, 5))      # repeated label 4: summed
    with pytest.raises(ValueError, match=r"y\[1\]=5 outside \[0, 4\]"):
        _C.dit_embedding_forward(np.array([0, 5]), f32(tab))
    with pytest.raises(ValueError, match="outside"):
        _C.dit_embedding_forward(np.array([-1]), f32(tab))
    with pytest.raises(TypeError, match="y"):
        _C.dit_embedding_forward(np.array([0.0]), f32(tab))


# ---- every device against the twins (fp32 tolerances of a GPU: other summation orders) -----------

def wide(a, S):
    """(B, D) row gradients zero-padded to the (B, S) rows they were read from."""
    out = np.zeros((a.shape[0], S))
    out[:, :a.shape[1]] = a
    return out


@pytest.mark.parametrize("device", on())
@pytest.mark.parametrize("N,D", [(1, 1), (5, 3), (7, 33), (64, 384), (3, 1152)])
def test_layernorm_on(device, N, D):
    rng = np.random.default_rng(N + D)
    x = (3.0 + 2.0 * rng.standard_normal((N, D))).astype(np.float32)
    out, r = _C.dit_layernorm_forward(x, device=device)
    want_out, want_r = ref.dit_layernorm_forward(x)
    gpu_close(out, want_out, what="out")
    gpu_close(r, want_r, what="rstd")
    g = rng.standard_normal((N, D)).astype(np.float32)
    acc = rng.standard_normal((N, D)).astype(np.float32)
    acc0 = acc.copy()
    want = ref.dit_layernorm_backward(g, out, r)
    gpu_close(_C.dit_layernorm_backward(g, out, r, device=device), want, what="dinp")
    gpu_close(_C.dit_layernorm_backward(g, out, r, acc, device=device), acc0 + want,
              what="dinp_acc")
    np.testing.assert_array_equal(acc, acc0)  # the accumulator argument is not modified


@pytest.mark.parametrize("device", on())
@pytest.mark.parametrize("B,L,D,S", [(1, 1, 1, 1), (2, 5, 7, 42), (3, 64, 96, 576)])
def test_modulate_and_gated_residual_on(device, B, L, D, S):
    """The rows may be wider than D (adaLN's (B, 6D) chunks): the first D are read."""
    rng = np.random.default_rng(B * L + D)
    x, h, g = (rng.standard_normal((B, L, D)).astype(np.float32) for _ in range(3))
    sh, sc, gt = (rng.standard_normal((B, S)).astype(np.float32) for _ in range(3))
    gpu_close(_C.dit_modulate_forward(x, sh, sc, device=device),
              ref.dit_modulate_forward(x, sh[:, :D], sc[:, :D]), what="modulate")
    dx, dsh, dsc = ref.dit_modulate_backward(g, x, sc[:, :D])
    for got, want, n in zip(_C.dit_modulate_backward(g, x, sc, device=device),
                            (dx, wide(dsh, S), wide(dsc, S)), ("dinp", "dshift", "dscale")):
        gpu_close(got, want, what=n)
    gpu_close(_C.dit_gated_residual_forward(x, h, gt, device=device),
              ref.dit_gated_residual_forward(x, h, gt[:, :D]), what="gated")
    dh, dgt = ref.dit_gated_residual_backward(g, h, gt[:, :D])
    for got, want, n in zip(_C.dit_gated_residual_backward(g, h, gt, device=device),
                            (dh, wide(dgt, S)), ("dh", "dgate")):
        gpu_close(got, want, what=n)


@pytest.mark.parametrize("device", on())
def test_silu_and_timestep_embedding_on(device):
    rng = np.random.default_rng(3)
    x = (6 * rng.standard_normal((3, 5, 7))).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    gpu_close(_C.dit_silu_forward(x, device=device), ref.dit_silu_forward(x), what="silu")
    gpu_close(_C.dit_silu_backward(g, x, device=device), ref.dit_silu_backward(g, x), what="silu'")
    t = np.array([0.0, 1.0, 17.5, 999.0], np.float32)
    gpu_close(_C.dit_timestep_embedding(t, 256, 10000.0, device=device),
              ref.dit_timestep_embedding(t, 256), 1e-6, 1e-6, "timestep embedding")
    gpu_close(_C.dit_timestep_embedding(t, 6, 100.0, device=device),
              ref.dit_timestep_embedding(t, 6, 100.0), 1e-6, 1e-6, "small")


@pytest.mark.parametrize("device", on())
@pytest.mark.parametrize("B,L,D,NH", [(1, 1, 2, 1), (2, 5, 12, 3), (2, 64, 64, 4), (1, 256, 96, 6)])
def test_attention_on(device, B, L, D, NH):
    rng = np.random.default_rng(L + D)
    qkv = rng.standard_normal((B, L, 3 * D)).astype(np.float32)
    out, att = _C.dit_attention_forward(qkv, NH, precision="fp32", device=device)
    want_out, want_att = ref.dit_attention_forward(qkv, NH)
    gpu_close(out, want_out, what="out")
    gpu_close(att, want_att, what="att")
    g = rng.standard_normal((B, L, D)).astype(np.float32)
    gpu_close(_C.dit_attention_backward(g, qkv, att, NH, precision="fp32", device=device),
              ref.dit_attention_backward(g, qkv, want_att, NH), what="dqkv")


@pytest.mark.parametrize("device", on("check", "cuda"))
def test_layers_match_cpu_ops(device):
    """The same inputs through the CPU ops and those of ``device``: the checking backend bit
    for bit, the GPU within its fp32 tolerances."""
    def same(got, want, name, *tol):
        if exact(device):
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            gpu_close(got, want, *tol, what=name)

    rng = np.random.default_rng(11)
    B, L, D, NH = 2, 16, 24, 4
    x = rng.standard_normal((B * L, D)).astype(np.float32)
    out_c, r_c = _C.dit_layernorm_forward(x)
    out_g, r_g = _C.dit_layernorm_forward(x, device=device)
    same(out_g, out_c, "layernorm out")
    same(r_g, r_c, "rstd")
    g = rng.standard_normal(x.shape).astype(np.float32)
    same(_C.dit_layernorm_backward(g, out_c, r_c, device=device),
         _C.dit_layernorm_backward(g, out_c, r_c), "layernorm dinp")
    x3, g3, h3 = (rng.standard_normal((B, L, D)).astype(np.float32) for _ in range(3))
    sh, sc = (rng.standard_normal((B, D)).astype(np.float32) for _ in range(2))
    same(_C.dit_modulate_forward(x3, sh, sc, device=device), _C.dit_modulate_forward(x3, sh, sc),
         "modulate")
    for a, b in zip(_C.dit_modulate_backward(g3, x3, sc, device=device),
                    _C.dit_modulate_backward(g3, x3, sc)):
        same(a, b, "modulate backward")
    same(_C.dit_gated_residual_forward(x3, h3, sc, device=device),
         _C.dit_gated_residual_forward(x3, h3, sc), "gated")
    for a, b in zip(_C.dit_gated_residual_backward(g3, h3, sc, device=device),
                    _C.dit_gated_residual_backward(g3, h3, sc)):
        same(a, b, "gated backward")
    qkv = rng.standard_normal((B, L, 3 * D)).astype(np.float32)
    o_c, a_c = _C.dit_attention_forward(qkv, NH)
    o_g, a_g = _C.dit_attention_forward(qkv, NH, device=device)
    same(o_g, o_c, "attention out")
    same(a_g, a_c, "attention att")
    same(_C.dit_attention_backward(g3, qkv, a_c, NH, device=device),
         _C.dit_attention_backward(g3, qkv, a_c, NH), "attention dqkv")
    s = (4 * rng.standard_normal(1000)).astype(np.float32)
    same(_C.dit_silu_forward(s, device=device), _C.dit_silu_forward(s), "silu")
    same(_C.dit_silu_backward(s, s, device=device), _C.dit_silu_backward(s, s), "silu backward")
    t = np.array([0.0, 3.0, 999.0], np.float32)
    same(_C.dit_timestep_embedding(t, 256, 10000.0, device=device),
         _C.dit_timestep_embedding(t, 256), "temb", 1e-6, 1e-6)
