"""A PyTorch eager DiT written after facebookresearch/DiT's models.py (same module names,
so its state_dict is a DiT state dict), plus an MoE block with racedit's semantics
(router MLP, identity gating, batch top-K "race" routing, dropless per-expert matmuls
with index_add_). Used by tests/layers/test_model_torch.py and benchmarks/bench_model.py;
imports torch, so only import it where torch is installed."""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """DiT's (MAE's) fixed embedding, (grid_size**2, embed_dim) float64."""
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    g = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(g, g), axis=0).reshape(2, 1, grid_size, grid_size)
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    def __init__(self, patch, in_channels, hidden):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, patch, stride=patch, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)              # (B, L, D)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden, freq=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.freq = freq

    def forward(self, t):
        half = self.freq // 2
        dt = self.mlp[0].weight.dtype           # DiT computes in float32; follow the model's dtype
        f = torch.exp(-math.log(10000) * torch.arange(half, dtype=dt) / half)
        a = t[:, None].to(dt) * f[None]
        return self.mlp(torch.cat([torch.cos(a), torch.sin(a)], dim=-1))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, hidden):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y):
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=True)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RaceMoE(nn.Module):
    """Expert Race MoE, identity gating, dropless: the top B*L*k (token, expert) scores of
    the whole batch are selected; tokens are sorted by expert, each expert runs its two
    matmuls on its rows, and outputs are scaled by the gate and index_add_-ed back."""

    def __init__(self, hidden, num_experts, k, expert_hidden):
        super().__init__()
        D, E, He = hidden, num_experts, expert_hidden
        self.E, self.k = E, k
        self.router_w = nn.Parameter(torch.randn(D, D) * D ** -0.5)
        self.router_b = nn.Parameter(torch.zeros(D))
        self.gate_w = nn.Parameter(torch.randn(D, E) * D ** -0.5)
        self.gate_b = nn.Parameter(torch.zeros(E))
        self.w1 = nn.Parameter(torch.randn(E, D, He) * D ** -0.5)
        self.b1 = nn.Parameter(torch.zeros(E, He))
        self.w2 = nn.Parameter(torch.randn(E, He, D) * He ** -0.5)
        self.b2 = nn.Parameter(torch.zeros(E, D))

    def forward(self, x):
        B, L, D = x.shape
        xf = x.reshape(-1, D)
        G = F.gelu(xf @ self.router_w + self.router_b) @ self.gate_w + self.gate_b   # (N, E)
        K = xf.shape[0] * self.k
        flat = torch.topk(G.detach().reshape(-1), K, sorted=False).indices
        flat, _ = torch.sort(flat % self.E * xf.shape[0] + flat // self.E)          # expert-major
        expert, token = flat // xf.shape[0], flat % xf.shape[0]
        counts = torch.bincount(expert, minlength=self.E).tolist()
        gate = G[token, expert]
        y = torch.zeros_like(xf)
        start = 0
        for e, n in enumerate(counts):
            if n:
                tok = token[start:start + n]
                h = F.gelu(xf[tok] @ self.w1[e] + self.b1[e], approximate="tanh")
                y.index_add_(0, tok, (h @ self.w2[e] + self.b2[e]) * gate[start:start + n, None])
            start += n
        return y.reshape(B, L, D)


class DiTBlock(nn.Module):
    def __init__(self, hidden, heads, moe=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        if moe is None:
            self.mlp = Mlp(hidden)
        else:
            self.moe = RaceMoE(hidden, *moe)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, sc1))
        ffn = self.mlp if hasattr(self, "mlp") else self.moe
        return x + g2.unsqueeze(1) * ffn(modulate(self.norm2(x), s2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, hidden, patch, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """moe: None (dense) or (num_experts, k, expert_hidden)."""

    def __init__(self, input_size, patch, in_channels, hidden, depth, heads, num_classes,
                 learn_sigma, moe=None):
        super().__init__()
        self.patch, self.out_channels = patch, in_channels * (2 if learn_sigma else 1)
        self.x_embedder = PatchEmbed(patch, in_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = LabelEmbedder(num_classes, hidden)
        g = input_size // patch
        pe = torch.from_numpy(get_2d_sincos_pos_embed(hidden, g)).float().unsqueeze(0)
        self.pos_embed = nn.Parameter(pe, requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, moe) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden, patch, self.out_channels)

    def unpatchify(self, x):
        c, p = self.out_channels, self.patch
        h = w = int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))
