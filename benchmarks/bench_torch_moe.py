"""Benchmark (not a test): racedit.torch.RaceMoE against a PyTorch-native MoE with the same
routing, each the FFN of the same small torch model: forward + backward (+ AdamW with --adamw).

The native layer (:class:`TorchNativeMoE`) has RaceMoE's parameters and computes the same
function: router MLP (matmul, GELU erf, matmul), identity/sigmoid/softmax gating, Expert
Race selection (one ``torch.topk`` over all B·L·E gates), the selected pairs sorted by
expert (stable argsort, megablocks' dispatch), a loop of per-expert GEMMs with GELU tanh,
the gated ``index_add_`` combine; autograd does the backward. The model around either
layer is LayerNorm -> MoE -> residual -> Linear, trained on an MSE loss.

Prints per configuration the median step time of each (rounds of one step each, after a
warm-up) and the ratio racedit/native (lower is better), and the floor of that ratio: the
same model with an identity FFN (LayerNorm, head, loss, autograd: what every FFN shares)
plus the layer's matrix products alone (router, gate and experts at k tokens per token,
forward and both backward products, as dense torch.mm calls on preallocated outputs),
over native. No implementation of the layer that does its products with this machine's
BLAS gets below the floor; the routing and the elementwise work only add to it. Usage:
    python benchmarks/bench_torch_moe.py [--iters 10] [--threads N] [--device cpu|cuda] [--adamw] [--bf16]
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from bench_model import alternate
from racedit.torch import RaceMoE

CONFIGS = [  # name, B, L, D, E, k
    ("D128 E8 k2 B8 L64", 8, 64, 128, 8, 2),
    ("D256 E16 k2 B8 L64", 8, 64, 256, 16, 2),
    ("D384 E16 k2 B4 L256", 4, 256, 384, 16, 2),
]


class TorchNativeMoE(nn.Module):
    """RaceMoE's layer (race strategy, training routing) in plain torch ops: the baseline.
    Parameters as RaceMoE's; copy them with ``load_state_dict(race.state_dict())``."""

    def __init__(self, dim, num_experts, k, hidden, gating="identity"):
        super().__init__()
        D, E, He = dim, num_experts, hidden
        self.k, self.gating = k, gating
        shapes = dict(router_w=(D, D), router_b=(D,), gate_w=(D, E), gate_b=(E,),
                      w1=(E, D, He), b1=(E, He), w2=(E, He, D), b2=(E, D))
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))
        self.register_buffer("threshold", torch.full((), float("nan")))

    def forward(self, x):
        B, L, D = x.shape
        xf = x.reshape(B * L, D)                                       # (N,D)
        h = F.gelu(xf @ self.router_w + self.router_b)                 # (N,D)
        R = h @ self.gate_w + self.gate_b                              # (N,E)
        G = R if self.gating == "identity" else (
            torch.sigmoid(R) if self.gating == "sigmoid" else torch.softmax(R, -1))
        E = G.shape[1]
        pair = torch.topk(G.detach().reshape(-1), B * L * self.k, sorted=False).indices  # (K,)
        expert, order = torch.sort(pair % E, stable=True)              # (K,) grouped by expert
        pair = pair[order]
        token = pair // E                                              # (K,)
        counts = torch.bincount(expert, minlength=E).tolist()
        xs = xf[token]                                                 # (K,D)
        outs = []
        for e, xe in enumerate(torch.split(xs, counts)):
            a = F.gelu(torch.addmm(self.b1[e], xe, self.w1[e]), approximate="tanh")
            outs.append(torch.addmm(self.b2[e], a, self.w2[e]))        # (n_e,D)
        o = torch.cat(outs) * G.reshape(-1)[pair].unsqueeze(1)         # (K,D)
        return torch.zeros_like(xf).index_add_(0, token, o.to(xf.dtype)).reshape(B, L, D)


class Model(nn.Module):
    """LayerNorm -> ffn -> residual -> Linear head: the model both layers sit in."""

    def __init__(self, ffn, dim):
        super().__init__()
        self.norm, self.ffn, self.head = nn.LayerNorm(dim), ffn, nn.Linear(dim, dim)

    def forward(self, x):
        return self.head(x + self.ffn(self.norm(x)))


def stepper(model, x, target, adamw, bf16):
    """One training step of model (forward, MSE, backward; with adamw an AdamW update too;
    with bf16 under torch.autocast(bfloat16)) as a function."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if adamw else None
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(model(x).float(), target)
        loss.backward()
        if opt is not None:
            opt.step()
        sync()
    return step


def gemm_floor_step(B, L, D, E, k, He, device, bf16):
    """The layer's matrix products as dense torch.mm calls: forward C = A @ W, backward
    dA = dC @ W^T and dW = A^T @ dC, for the router (N,D)x(D,D), the gate (N,D)x(D,E) and
    the experts' two layers over the N*k selected pairs, (Nk,D)x(D,He) and (Nk,He)x(He,D)."""
    N = B * L
    dt = torch.bfloat16 if bf16 else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    prods = []
    for m, kk, n in ((N, D, D), (N, D, E), (N * k, D, He), (N * k, He, D)):
        a, w, c = (torch.randn(*s, device=device, dtype=dt) for s in ((m, kk), (kk, n), (m, n)))
        prods.append((a, w, c, torch.empty_like(c), torch.empty_like(a), torch.empty_like(w)))

    def step():
        for a, w, dc, c, da, dw in prods:
            torch.mm(a, w, out=c)
            torch.mm(dc, w.t(), out=da)
            torch.mm(a.t(), dc, out=dw)
        sync()
    return step


def bench(name, B, L, D, E, k, iters, device, adamw, bf16):
    torch.manual_seed(0)
    race = RaceMoE(D, E, k, device=device)
    native = TorchNativeMoE(D, E, k, race.hidden).to(device)
    native.load_state_dict(race.state_dict())
    x = torch.randn(B, L, D, device=device)
    target = torch.randn(B, L, D, device=device)
    head = Model(race, D).to(device)
    base = Model(native, D).to(device)
    base.load_state_dict(head.state_dict())
    rest = Model(nn.Identity(), D).to(device)
    rest.load_state_dict(head.state_dict(), strict=False)
    (min_r, t_race), (min_n, t_native), (_, t_rest), (_, t_gemm) = alternate(
        [stepper(head, x, target, adamw, bf16), stepper(base, x, target, adamw, bf16),
         stepper(rest, x, target, adamw, bf16), gemm_floor_step(B, L, D, E, k, race.hidden,
                                                               device, bf16)], iters)
    floor = (t_rest + t_gemm) / t_native
    print(f"{name:22s} racedit {t_race * 1e3:8.2f} ms   native {t_native * 1e3:8.2f} ms   "
          f"racedit/native {t_race / t_native:5.2f} (median; min {min_r / min_n:5.2f})   "
          f"floor {floor:5.2f} (rest {t_rest * 1e3:.2f} ms + products {t_gemm * 1e3:.2f} ms)",
          flush=True)
    return t_race / t_native


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--adamw", action="store_true", help="time the AdamW update too")
    ap.add_argument("--bf16", action="store_true", help="under torch.autocast(bfloat16)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"step: forward + backward{' + AdamW' if args.adamw else ''}"
          f"{', autocast bf16' if args.bf16 else ''}")
    for cfg in CONFIGS:
        bench(*cfg, args.iters, args.device, args.adamw, args.bf16)


if __name__ == "__main__":
    main()
