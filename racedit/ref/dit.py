"""NumPy float64 twins of the DiT layers (csrc/cpu/dit.c) and of the whole model
(csrc/core/model.c): the reference the C model is tested against, itself checked by finite
differences. Written for clarity, not speed.

Shape letters: B batch, C channels, H W image, p patch, L tokens, D width, NH heads,
N = B*L. Linear weights are (OC, IC) like torch.nn.Linear. Parameter names are those of
facebookresearch/DiT (``blocks.0.attn.qkv.weight``, ...); MoE blocks use
``blocks.<i>.moe.<router_w|...>`` instead of ``blocks.<i>.mlp.*``.
"""
import numpy as np

__all__ = [
    "dit_patchify", "dit_unpatchify", "dit_pos_embed", "dit_timestep_embedding",
    "dit_linear_forward", "dit_linear_backward", "dit_layernorm_forward",
    "dit_layernorm_backward", "dit_modulate_forward", "dit_modulate_backward",
    "dit_gated_residual_forward", "dit_gated_residual_backward", "dit_attention_forward",
    "dit_attention_backward", "dit_silu_forward", "dit_silu_backward", "dit_gelu_forward",
    "dit_gelu_backward", "dit_embedding_forward", "dit_embedding_backward",
    "dit_model_forward", "dit_model_backward", "dit_branch_norms", "round_bf16",
    "bf16_gemm_operands",
]

LN_EPS = 1e-6
FREQ_DIM = 256


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def round_bf16(a):
    """a rounded as the device rounds an fp32 value to bf16 (to float32 first, then to 8
    significant bits, round to nearest even), returned as float64. NaN / inf pass."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    finite = (u & 0x7F800000) != 0x7F800000
    r = np.where(finite, (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000, u)
    return r.astype(np.uint32).view(np.float32).astype(np.float64)


# The GEMM operands of the linear layers and the attention pass through _gemm_operand: the
# identity (float64), or round_bf16 inside bf16_gemm_operands() — the twin of the CUDA
# model's bf16 precision, where every GEMM reads bf16 operands and accumulates in fp32.
_gemm_operand = _f64


class bf16_gemm_operands:
    """Context manager: inside it, the linear and attention twins (and so dit_model_forward /
    dit_model_backward) round every GEMM operand with :func:`round_bf16`, as the CUDA
    model's ``dtype="bf16"``; softmax, layernorm, bias gradients and everything else stay
    float64. Not thread-safe (a module-level switch)."""

    def __enter__(self):
        global _gemm_operand
        self._saved, _gemm_operand = _gemm_operand, round_bf16
        return self

    def __exit__(self, *exc):
        global _gemm_operand
        _gemm_operand = self._saved
        return False


# ---- patchify ---------------------------------------------------------------------------

def dit_patchify(img, p, order="ijc"):
    """img (B,C,H,W) -> tok (B,L,p*p*C), L = (H/p)*(W/p) row-major over the patch grid.
    order "ijc": features (i, j, c), c fastest (DiT's unpatchify); "cij": (c, i, j), the
    order of a Conv2d(C, D, p, stride p) weight (D, C, p, p)."""
    img = _f64(img)
    B, C, H, W = img.shape
    x = img.reshape(B, C, H // p, p, W // p, p)               # b c hi i wi j
    if order == "ijc":
        x = x.transpose(0, 2, 4, 3, 5, 1)                      # b hi wi i j c
    elif order == "cij":
        x = x.transpose(0, 2, 4, 1, 3, 5)                      # b hi wi c i j
    else:
        raise ValueError(f"order: expected 'cij' or 'ijc', got {order!r}")
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def dit_unpatchify(tok, C, H, W, p, order="ijc"):
    """tok (B,L,p*p*C) -> img (B,C,H,W); the inverse (and adjoint) of dit_patchify."""
    tok = _f64(tok)
    B = tok.shape[0]
    gh, gw = H // p, W // p
    if order == "ijc":
        x = tok.reshape(B, gh, gw, p, p, C).transpose(0, 5, 1, 3, 2, 4)   # b c hi i wi j
    elif order == "cij":
        x = tok.reshape(B, gh, gw, C, p, p).transpose(0, 3, 1, 4, 2, 5)
    else:
        raise ValueError(f"order: expected 'cij' or 'ijc', got {order!r}")
    return x.reshape(B, C, H, W)


# ---- fixed embeddings -------------------------------------------------------------------

def dit_pos_embed(gh, gw, D):
    """(gh*gw, D) 2-D sin-cos embedding as DiT's get_2d_sincos_pos_embed: token (r, s)
    -> [sin(s w), cos(s w), sin(r w), cos(r w)], w_k = 10000^(-k/(D/4))."""
    q = D // 4
    w = 1.0 / 10000.0 ** (np.arange(q, dtype=np.float64) / q)             # (D/4,)
    r, s = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    r, s = r.reshape(-1, 1) * w, s.reshape(-1, 1) * w                     # (L, D/4)
    return np.concatenate([np.sin(s), np.cos(s), np.sin(r), np.cos(r)], axis=1)


def dit_timestep_embedding(t, dim=FREQ_DIM, max_period=10000.0):
    """(B, dim) = [cos(t f), sin(t f)], f_k = max_period^(-k/(dim/2)) (DiT's order)."""
    half = dim // 2
    f = np.exp(-np.log(max_period) * np.arange(half, dtype=np.float64) / half)
    a = _f64(t)[:, None] * f[None]
    return np.concatenate([np.cos(a), np.sin(a)], axis=1)


# ---- linear, LayerNorm, modulate, gated residual ---------------------------------------

def dit_linear_forward(inp, W, b=None):
    """out (N,OC) = inp (N,IC) @ W (OC,IC)^T + b (OC)."""
    out = _gemm_operand(inp) @ _gemm_operand(W).T
    return out if b is None else out + _f64(b)


def dit_linear_backward(dout, inp, W):
    """-> dinp (N,IC), dW (OC,IC), db (OC)."""
    g = _gemm_operand(dout)
    return g @ _gemm_operand(W), g.T @ _gemm_operand(inp), _f64(dout).sum(0)


def dit_layernorm_forward(inp):
    """LayerNorm over the last dim without affine, eps 1e-6: -> (out (N,D), rstd (N,))."""
    x = _f64(inp)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + LN_EPS)
    return (x - mu) * rstd, rstd[..., 0]


def dit_layernorm_backward(dout, out, rstd):
    """d(inp) (N,D) from dout, the normalised out and rstd."""
    g, xh = _f64(dout), _f64(out)
    return rstd[..., None] * (g - g.mean(-1, keepdims=True)
                              - xh * (g * xh).mean(-1, keepdims=True))


def dit_modulate_forward(inp, shift, scale):
    """inp (B,L,D) * (1 + scale (B,D)) + shift (B,D)."""
    return _f64(inp) * (1.0 + _f64(scale)[:, None]) + _f64(shift)[:, None]


def dit_modulate_backward(dout, inp, scale):
    """-> dinp (B,L,D), dshift (B,D), dscale (B,D)."""
    g = _f64(dout)
    return g * (1.0 + _f64(scale)[:, None]), g.sum(1), (g * _f64(inp)).sum(1)


def dit_gated_residual_forward(inp, h, gate):
    """inp (B,L,D) + gate (B,D) * h (B,L,D)."""
    return _f64(inp) + _f64(gate)[:, None] * _f64(h)


def dit_gated_residual_backward(dout, h, gate):
    """-> dh (B,L,D), dgate (B,D); d(inp) is dout itself."""
    g = _f64(dout)
    return _f64(gate)[:, None] * g, (g * _f64(h)).sum(1)


# ---- attention -----------------------------------------------------------------------------

def _heads(a, NH):
    B, L, D = a.shape
    return a.reshape(B, L, NH, D // NH).transpose(0, 2, 1, 3)       # (B,NH,L,hd)


def _merge(a):
    B, NH, L, hd = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, L, NH * hd)


def dit_attention_forward(qkv, NH):
    """qkv (B,L,3D) = [q | k | v] -> (out (B,L,D), att (B,NH,L,L)), softmax(q k^T/sqrt(hd)) v."""
    qkv = _gemm_operand(qkv)
    D = qkv.shape[2] // 3
    q, k, v = (_heads(qkv[..., i * D:(i + 1) * D], NH) for i in range(3))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D // NH)
    s = np.exp(s - s.max(-1, keepdims=True))
    att = s / s.sum(-1, keepdims=True)
    return _merge(_gemm_operand(att) @ v), att


def dit_attention_backward(dout, qkv, att, NH):
    """-> dqkv (B,L,3D)."""
    qkv, att = _gemm_operand(qkv), _f64(att)
    D = qkv.shape[2] // 3
    q, k, v = (_heads(qkv[..., i * D:(i + 1) * D], NH) for i in range(3))
    g = _heads(_gemm_operand(dout), NH)
    datt = g @ v.transpose(0, 1, 3, 2)
    dv = _gemm_operand(att).transpose(0, 1, 3, 2) @ g
    ds = _gemm_operand(att * (datt - (datt * att).sum(-1, keepdims=True)))
    ds = ds / np.sqrt(D // NH)
    dq, dk = ds @ k, ds.transpose(0, 1, 3, 2) @ q
    return np.concatenate([_merge(dq), _merge(dk), _merge(dv)], axis=-1)


# ---- elementwise, label embedding --------------------------------------------------------------

def dit_silu_forward(x):
    x = _f64(x)
    return x / (1.0 + np.exp(-x))


def dit_silu_backward(dout, x):
    x = _f64(x)
    s = 1.0 / (1.0 + np.exp(-x))
    return _f64(dout) * s * (1.0 + x * (1.0 - s))


_GC = np.sqrt(2.0 / np.pi)


def dit_gelu_forward(x):
    """GELU with the tanh approximation."""
    x = _f64(x)
    return 0.5 * x * (1.0 + np.tanh(_GC * (x + 0.044715 * x ** 3)))


def dit_gelu_backward(dout, x):
    x = _f64(x)
    th = np.tanh(_GC * (x + 0.044715 * x ** 3))
    du = _GC * (1.0 + 3 * 0.044715 * x ** 2)
    return _f64(dout) * (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th ** 2) * du)


def dit_embedding_forward(y, table):
    """table (V,D)[y (B,)] -> (B,D)."""
    return _f64(table)[np.asarray(y)]


def dit_embedding_backward(dout, y, V):
    """-> dtable (V,D), rows scatter-added."""
    dtab = np.zeros((V, dout.shape[1]))
    np.add.at(dtab, np.asarray(y), _f64(dout))
    return dtab


# ---- the whole model --------------------------------------------------------------------------

def _depth(params):
    return 1 + max(int(k.split(".")[1]) for k in params if k.startswith("blocks."))


def dit_model_forward(params, x, t, y, heads, patch, moe=None, plr_target=None):
    """The whole DiT in float64. params: dict name -> array (DiT's names and shapes).
    x (B,C,H,W), t (B,), y (B,) -> (out (B,Co,H,W), cache for dit_model_backward).

    moe: for MoE blocks (``blocks.<i>.moe.*``), an object with
    ``forward(i, x (B,L,D), plr (B,L,p*p*C) or None) -> y (B,L,D)`` and
    ``backward(i, dy (B,L,D)) -> (dx (B,L,D), {short name: grad})`` (see tests); the
    dense MLP is used where ``blocks.<i>.mlp.fc1.weight`` exists."""
    P = {k: _f64(v) for k, v in params.items()}
    x = _f64(x)
    B, C, H, W = x.shape
    p, D = patch, P["x_embedder.proj.bias"].shape[0]
    L = (H // p) * (W // p)
    cache = dict(B=B, C=C, H=H, W=W, p=p, D=D, L=L, NH=heads, P=P, moe=moe, y=np.asarray(y))
    cache["patches"] = dit_patchify(x, p, "cij")                                   # (B,L,C*p*p)
    wx = P["x_embedder.proj.weight"].reshape(D, -1)
    h = dit_linear_forward(cache["patches"], wx, P["x_embedder.proj.bias"])
    h = h + dit_pos_embed(H // p, W // p, D)[None]                                 # (B,L,D)
    cache["tfreq"] = dit_timestep_embedding(t)                                     # (B,F)
    cache["th"] = dit_linear_forward(cache["tfreq"], P["t_embedder.mlp.0.weight"],
                                     P["t_embedder.mlp.0.bias"])
    cache["ths"] = dit_silu_forward(cache["th"])
    temb = dit_linear_forward(cache["ths"], P["t_embedder.mlp.2.weight"], P["t_embedder.mlp.2.bias"])
    cache["c"] = temb + dit_embedding_forward(y, P["y_embedder.embedding_table.weight"])
    sc = cache["sc"] = dit_silu_forward(cache["c"])                                # (B,D)
    plr = None if plr_target is None else dit_patchify(plr_target, p, "ijc")
    cache["blocks"] = []
    for i in range(_depth(P)):
        h, bc = _block_forward(P, i, h, sc, heads, moe, plr)
        cache["blocks"].append(bc)
    mod = dit_linear_forward(sc, P["final_layer.adaLN_modulation.1.weight"],
                             P["final_layer.adaLN_modulation.1.bias"])            # (B,2D)
    xh, rstd = dit_layernorm_forward(h)
    mf = dit_modulate_forward(xh, mod[:, :D], mod[:, D:])
    otok = dit_linear_forward(mf, P["final_layer.linear.weight"], P["final_layer.linear.bias"])
    cache["final"] = dict(mod=mod, xh=xh, rstd=rstd, mf=mf)
    Co = otok.shape[-1] // (p * p)
    return dit_unpatchify(otok, Co, H, W, p, "ijc"), cache


def _block_forward(P, i, h, sc, NH, moe, plr):
    pre = f"blocks.{i}."
    D = h.shape[-1]
    mod = dit_linear_forward(sc, P[pre + "adaLN_modulation.1.weight"], P[pre + "adaLN_modulation.1.bias"])
    sh1, s1, g1, sh2, s2, g2 = (mod[:, j * D:(j + 1) * D] for j in range(6))
    c = dict(mod=mod)
    c["xh1"], c["rstd1"] = dit_layernorm_forward(h)
    c["m1"] = dit_modulate_forward(c["xh1"], sh1, s1)
    c["qkv"] = dit_linear_forward(c["m1"], P[pre + "attn.qkv.weight"], P[pre + "attn.qkv.bias"])
    c["atty"], c["att"] = dit_attention_forward(c["qkv"], NH)
    c["ap"] = dit_linear_forward(c["atty"], P[pre + "attn.proj.weight"], P[pre + "attn.proj.bias"])
    h = dit_gated_residual_forward(h, c["ap"], g1)
    c["xh2"], c["rstd2"] = dit_layernorm_forward(h)
    c["m2"] = dit_modulate_forward(c["xh2"], sh2, s2)
    if pre + "mlp.fc1.weight" in P:
        c["fc1"] = dit_linear_forward(c["m2"], P[pre + "mlp.fc1.weight"], P[pre + "mlp.fc1.bias"])
        c["gel"] = dit_gelu_forward(c["fc1"])
        c["ffn"] = dit_linear_forward(c["gel"], P[pre + "mlp.fc2.weight"], P[pre + "mlp.fc2.bias"])
    else:
        c["ffn"] = moe.forward(i, c["m2"], plr)
    return dit_gated_residual_forward(h, c["ffn"], g2), c


def dit_model_backward(dout, cache):
    """Gradients of <dout (B,Co,H,W), out> for every parameter: dict name -> float64 array
    (plus the MoE blocks' own aux-loss gradients, as returned by ``moe.backward``)."""
    P, D, p, NH = cache["P"], cache["D"], cache["p"], cache["NH"]
    G = {}
    dtok = dit_patchify(dout, p, "ijc")                                            # (B,L,p*p*Co)
    f = cache["final"]
    dmf, G["final_layer.linear.weight"], G["final_layer.linear.bias"] = _lin_bwd(
        dtok, f["mf"], P["final_layer.linear.weight"])
    dxh, dsh, dsc_ = dit_modulate_backward(dmf, f["xh"], f["mod"][:, D:])
    dh = dit_layernorm_backward(dxh, f["xh"], f["rstd"])
    dsc, G["final_layer.adaLN_modulation.1.weight"], G["final_layer.adaLN_modulation.1.bias"] = \
        _lin_bwd(np.concatenate([dsh, dsc_], 1), cache["sc"], P["final_layer.adaLN_modulation.1.weight"])
    for i in reversed(range(len(cache["blocks"]))):
        dh, dsc_i = _block_backward(P, G, i, cache["blocks"][i], dh, cache["sc"], NH, cache["moe"])
        dsc = dsc + dsc_i
    wx = P["x_embedder.proj.weight"]
    _, dwx, G["x_embedder.proj.bias"] = _lin_bwd(dh, cache["patches"], wx.reshape(D, -1))
    G["x_embedder.proj.weight"] = dwx.reshape(wx.shape)
    dc = dit_silu_backward(dsc, cache["c"])
    G["y_embedder.embedding_table.weight"] = dit_embedding_backward(
        dc, cache["y"], P["y_embedder.embedding_table.weight"].shape[0])
    dths, G["t_embedder.mlp.2.weight"], G["t_embedder.mlp.2.bias"] = _lin_bwd(
        dc, cache["ths"], P["t_embedder.mlp.2.weight"])
    dth = dit_silu_backward(dths, cache["th"])
    _, G["t_embedder.mlp.0.weight"], G["t_embedder.mlp.0.bias"] = _lin_bwd(
        dth, cache["tfreq"], P["t_embedder.mlp.0.weight"])
    return G


def _lin_bwd(dout, inp, W):
    """dit_linear_backward over any leading dims of dout/inp."""
    OC, IC = W.shape
    di, dW, db = dit_linear_backward(dout.reshape(-1, OC), inp.reshape(-1, IC), W)
    return di.reshape(inp.shape), dW, db


def _block_backward(P, G, i, c, dh, sc, NH, moe):
    pre = f"blocks.{i}."
    D = dh.shape[-1]
    mod = c["mod"]
    dmod = np.zeros_like(mod)
    sl = [slice(j * D, (j + 1) * D) for j in range(6)]
    dffn, dmod[:, sl[5]] = dit_gated_residual_backward(dh, c["ffn"], mod[:, sl[5]])
    if pre + "mlp.fc1.weight" in P:
        dgel, G[pre + "mlp.fc2.weight"], G[pre + "mlp.fc2.bias"] = _lin_bwd(dffn, c["gel"], P[pre + "mlp.fc2.weight"])
        dfc1 = dit_gelu_backward(dgel, c["fc1"])
        dm2, G[pre + "mlp.fc1.weight"], G[pre + "mlp.fc1.bias"] = _lin_bwd(dfc1, c["m2"], P[pre + "mlp.fc1.weight"])
    else:
        dm2, gm = moe.backward(i, dffn)
        for k, v in gm.items():
            G[pre + "moe." + k] = v
    dxh2, dmod[:, sl[3]], dmod[:, sl[4]] = dit_modulate_backward(dm2, c["xh2"], mod[:, sl[4]])
    dh = dh + dit_layernorm_backward(dxh2, c["xh2"], c["rstd2"])
    dap, dmod[:, sl[2]] = dit_gated_residual_backward(dh, c["ap"], mod[:, sl[2]])
    datty, G[pre + "attn.proj.weight"], G[pre + "attn.proj.bias"] = _lin_bwd(dap, c["atty"], P[pre + "attn.proj.weight"])
    dqkv = dit_attention_backward(datty, c["qkv"], c["att"], NH)
    dm1, G[pre + "attn.qkv.weight"], G[pre + "attn.qkv.bias"] = _lin_bwd(dqkv, c["m1"], P[pre + "attn.qkv.weight"])
    dxh1, dmod[:, sl[0]], dmod[:, sl[1]] = dit_modulate_backward(dm1, c["xh1"], mod[:, sl[1]])
    dh = dh + dit_layernorm_backward(dxh1, c["xh1"], c["rstd1"])
    dsc, G[pre + "adaLN_modulation.1.weight"], G[pre + "adaLN_modulation.1.bias"] = _lin_bwd(
        dmod, sc, P[pre + "adaLN_modulation.1.weight"])
    return dh, dsc


def dit_branch_norms(cache):
    """(depth, 2): per block of the forward that made ``cache`` (dit_model_forward), the
    mean over its B*L tokens of ||gate1 * attention output|| and ||gate2 * FFN output||,
    what the two branches add to the residual stream (docs/method.md §6, the paper's Fig. 5)."""
    D = cache["D"]
    out = np.zeros((len(cache["blocks"]), 2))
    for i, c in enumerate(cache["blocks"]):
        for j, (key, g) in enumerate((("ap", 2), ("ffn", 5))):
            gate = c["mod"][:, None, g * D:(g + 1) * D]                         # (B,1,D)
            out[i, j] = np.linalg.norm(gate * _f64(c[key]), axis=-1).mean()
    return out
