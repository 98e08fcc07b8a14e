"""A plain PyTorch DiT whose MLPs are swapped for racedit.torch.RaceMoE, trained a few steps
with torch.optim.AdamW on a toy denoising task.

The DiT is the usual one in a few lines (patch embedding, adaLN-Zero blocks of attention
and MLP, final layer), written for torch alone. ``swap_mlps_for_racemoe`` replaces each
block's ``mlp`` by an Expert Race MoE of the same activated width (k experts of width 4D/k
per token on average); the training loop adds every MoE's ``aux_loss`` (router similarity
and balance losses) to the denoising loss, so autograd carries their gradients into the
routers. The data are random Gaussian blobs; the model learns to predict the noise.

Usage: python examples/torch_dit_racemoe.py [--steps 20] [--batch 16] [--experts 4] [--k 2]
"""
import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

from racedit.torch import RaceMoE


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """adaLN-Zero DiT block: x + g1 * attn(mod(norm(x))), then x + g2 * mlp(mod(norm(x)))."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight), nn.init.zeros_(self.ada[1].bias)

    def attn(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), s2, sc2))


class DiT(nn.Module):
    """Unconditional DiT on (B, C, S, S) images with patch size p."""

    def __init__(self, size=8, patch=2, channels=2, dim=64, depth=2, heads=4):
        super().__init__()
        self.p, self.C, self.g = patch, channels, size // patch
        self.embed = nn.Linear(patch * patch * channels, dim)
        self.pos = nn.Parameter(torch.randn(1, self.g * self.g, dim) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(64, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final = nn.Linear(dim, patch * patch * channels)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        nn.init.zeros_(self.final.weight), nn.init.zeros_(self.final.bias)

    def patchify(self, x):                                   # (B,C,S,S) -> (B,L,p*p*C)
        B, p, g = x.shape[0], self.p, self.g
        x = x.reshape(B, self.C, g, p, g, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, g * g, p * p * self.C)

    def unpatchify(self, t):                                 # (B,L,p*p*C) -> (B,C,S,S)
        B, p, g = t.shape[0], self.p, self.g
        t = t.reshape(B, g, g, p, p, self.C).permute(0, 5, 1, 3, 2, 4)
        return t.reshape(B, self.C, g * p, g * p)

    def forward(self, x, t):
        half = 32
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device) / half)
        c = self.t_mlp(torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1))
        h = self.embed(self.patchify(x)) + self.pos
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=1)
        return self.unpatchify(self.final(modulate(self.final_norm(h), shift, scale)))


def swap_mlps_for_racemoe(model, num_experts, k, **kw):
    """Replace every block's dense ``mlp`` by a RaceMoE of the same activated width."""
    for block in model.blocks:
        dim = block.mlp.fc1.in_features
        block.mlp = RaceMoE(dim, num_experts, k, **kw)
    return model


def aux_loss(model):
    """The mean over the MoE blocks of their aux losses (graph tensors of the last forward)."""
    moes = [m for m in model.modules() if isinstance(m, RaceMoE)]
    return sum(m.aux_loss for m in moes) / max(len(moes), 1)


def blobs(batch, channels, size, gen):
    """Random Gaussian blobs in [-1, 1]: the toy data set."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = torch.rand(batch, channels, 2, 1, 1, generator=gen) * size
    d2 = (yy - centre[:, :, 0]) ** 2 + (xx - centre[:, :, 1]) ** 2
    return 2 * torch.exp(-d2 / (0.1 * size * size)) - 1


def train(steps, batch, experts, k, seed=0, log=print):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = swap_mlps_for_racemoe(DiT(), experts, k, sim_weight=0.01, balance_weight=0.01)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    losses = []
    for step in range(1, steps + 1):
        x0 = blobs(batch, 2, 8, gen)
        t = torch.rand(batch, generator=gen)
        a = torch.cos(t * math.pi / 2)[:, None, None, None]
        eps = torch.randn(x0.shape, generator=gen)
        pred = model(a * x0 + (1 - a * a).sqrt() * eps, t * 1000)
        mse = F.mse_loss(pred, eps)
        loss = mse + aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(mse))
        moe = model.blocks[0].mlp
        log(f"step {step:3d}  mse {float(mse):.4f}  aux {float(aux_loss(model)):.4f}  "
            f"experts/token {moe.aux['experts_per_token']:.2f}  MaxVio {moe.aux['max_violation']:.3f}  "
            f"tau {float(moe.threshold):+.4f}")
    return model, losses


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model, losses = train(args.steps, args.batch, args.experts, args.k, args.seed)
    model.eval()
    with torch.no_grad():  # eval mode routes by each layer's learned threshold
        model(torch.zeros(2, 2, 8, 8), torch.full((2,), 500.0))
    print(f"eval experts/token {model.blocks[0].mlp.aux['experts_per_token']:.2f}")
    print(f"mse first {losses[0]:.4f} last {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
