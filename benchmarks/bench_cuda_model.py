"""Benchmark (not a test): one training step (forward + backward + AdamW + EMA) of
RaceDiT-B/2-4in32 on 32x32x4 latents (L = 256 tokens), batch 64, on the GPU: racedit's
device model (RaceDiT(device="cuda").step) against a compact PyTorch eager implementation
of the same model with the same shapes, and against torch.compile of it when that
compiles within the budget (run in a subprocess under a timeout).

racedit rows: "fp32" (exact fp32 GEMMs), "tf32" (every GEMM on TF32 tensor cores),
"bf16" (bf16 operands, fp32 accumulation in every linear layer, the attention products
and the expert GEMMs; the routers' GEMMs in TF32). PyTorch rows: "fp32" (TF32 off), "bf16"
(torch.autocast bf16 with fp32 master weights, SDPA attention), "compile bf16" (the same
with torch.compile on every dense region: each block's adaLN + attention part and each
router; the expert loop stays eager, its data-dependent shapes would recompile a
whole-model graph every step). The compiled run is a subprocess under --compile-timeout;
--warm-compile only compiles (filling the inductor cache so the timed run starts warm).

The PyTorch model (defined here): DiT's embeddings (Conv2d patch embed, sin-cos position
embedding, timestep MLP, label table), 12 adaLN-Zero blocks with qkv/proj attention
(scaled_dot_product_attention) and the MoE FFN: router Linear + GELU(erf) + gate Linear
(identity gating), Expert Race (one topk over all B*L*E fp32 scores), tokens sorted by
expert, a loop of per-expert GEMM + GELU(tanh) + GEMM, gated index_add_ combine, the PLR
head's MSE on the router hidden; final adaLN layer; loss = MSE + mean PLR; fused AdamW
(torch.optim.AdamW(fused=True)) and an EMA (torch._foreach_lerp_). Not included on the
torch side: the router-similarity loss and the threshold EMA (both small).

MFU counts routed FLOPs only: per token and block 2*D*3D (qkv) + 2*D*D (proj) + 4*L*D
(attention) + 2*D*D + 2*D*E (router) + 2*D*P (PLR head) + k*4*D*He (the k selected
experts), per image 2*D*6D (adaLN), plus embeddings and the final layer; a step is 3x the
forward. Peaks (H200 / H100 SXM, dense): bf16 989, tf32 494, fp32 67 TFLOP/s; the bf16 row
is measured against the bf16 peak.

Usage: python benchmarks/bench_cuda_model.py [--steps 5] [--batch 64] [--no-compile]
       [--compile-timeout 120] [--warm-compile] [--racedit-only fp32|tf32|bf16]
       [--config RaceDiT-B/2-4in32 | DiT-B/2 | ...]
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

PEAK = {"fp32": 67e12, "tf32": 494e12, "bf16": 989e12}


def step_flops(cfg, B, S, C):
    D, p, E, k, He = cfg.hidden, cfg.patch, cfg.num_experts, cfg.k, cfg.expert_hidden
    L = (S // p) ** 2
    P = p * p * C
    tok = 2 * D * 3 * D + 2 * D * D + 4 * L * D
    if cfg.is_moe:
        tok += 2 * D * D + 2 * D * E + 2 * D * P + k * 4 * D * He
    else:
        tok += 2 * 2 * D * 4 * D
    img = 2 * D * 6 * D
    fwd = cfg.depth * (B * L * tok + B * img)
    fwd += B * L * (2 * P * D + 2 * D * P) + B * (2 * 256 * D + 2 * D * D + 2 * D * 2 * D)
    return 3.0 * fwd


def data(B, S, C, ncls, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, C, S, S)).astype(np.float32)
    t = rng.integers(0, 1000, B).astype(np.float32)
    y = rng.integers(0, ncls, B)
    target = rng.standard_normal((B, C, S, S)).astype(np.float32)
    return x, t, y, target


# ---- racedit ----------------------------------------------------------------------------
def bench_racedit(args, cfg, only=None):
    import racedit
    from racedit import cuda as rc

    x, t, y, target = data(args.batch, args.size, 4, 1000)
    t0 = time.perf_counter()
    m = racedit.RaceDiT(args.config, input_size=args.size, in_channels=4, num_classes=1000,
                        device="cuda", max_batch=args.batch)
    print(f"racedit model built in {time.perf_counter() - t0:.1f} s ({m.num_params():,} params)")
    rows = []
    for name, tf32, dtype in (("fp32", False, "fp32"), ("tf32", True, "fp32"), ("bf16", True, "bf16")):
        if only and name not in only:
            continue
        rc.tf32(tf32)
        m.set_dtype(dtype)
        for _ in range(2):
            m.step(x, t, y, target, return_aux=False)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            r = m.step(x, t, y, target, return_aux=False)
        ms = (time.perf_counter() - t0) * 1e3 / args.steps   # each step reads its loss back
        rows.append((name, ms, r["loss"]))
        print(f"  racedit {name:5}: {ms:9.2f} ms/step  (loss {r['loss']:.4f})", flush=True)
    rc.tf32(False)
    del m
    return rows


# ---- PyTorch ------------------------------------------------------------------------------
def torch_model(cfg, S, C, ncls, torch, device="cuda"):
    nn, F = torch.nn, torch.nn.functional
    D, NH, p, E, k, He, depth = (cfg.hidden, cfg.heads, cfg.patch, cfg.num_experts, cfg.k,
                                 cfg.expert_hidden, cfg.depth)
    g = S // p
    L, P = g * g, p * p * C

    def pos_embed():
        q = D // 4
        w = 1.0 / 10000 ** (np.arange(q) / q)
        r, s = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
        a, b = np.outer(s.ravel(), w), np.outer(r.ravel(), w)
        return torch.tensor(np.concatenate([np.sin(a), np.cos(a), np.sin(b), np.cos(b)], 1),
                            dtype=torch.float32, device=device)

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.router, self.gate, self.plr = nn.Linear(D, D), nn.Linear(D, E), nn.Linear(D, P)
            self.w1 = nn.Parameter(torch.randn(E, D, He) / math.sqrt(D))
            self.b1 = nn.Parameter(torch.zeros(E, He))
            self.w2 = nn.Parameter(torch.randn(E, He, D) / math.sqrt(He))
            self.b2 = nn.Parameter(torch.zeros(E, D))

        def scores(self, h, tgt):  # the dense part: router MLP, gate scores, PLR loss
            r = F.gelu(self.router(h))
            return self.gate(r), F.mse_loss(self.plr(r).float(), tgt)   # identity gating

        def forward(self, h, tgt):  # h (N,D), tgt (N,P)
            N = h.shape[0]
            G, plr = self.scores(h, tgt)
            with torch.no_grad():
                idx = torch.topk(G.float().reshape(-1), N * k, sorted=False).indices
                e_of, t_of = idx % E, idx // E
                order = torch.argsort(e_of, stable=True)
                e_of, t_of = e_of[order], t_of[order]
                counts = torch.bincount(e_of, minlength=E).tolist()
            gsel = G[t_of, e_of]
            xs = h[t_of]
            ys, off = [], 0
            for e, c in enumerate(counts):
                if c:
                    a = F.gelu(xs[off:off + c] @ self.w1[e] + self.b1[e], approximate="tanh")
                    ys.append(a @ self.w2[e] + self.b2[e])
                off += c
            ys = torch.cat(ys) * gsel[:, None]
            out = torch.zeros(N, D, device=h.device, dtype=ys.dtype)
            return out.index_add_(0, t_of, ys), plr

    class MLP(nn.Module):  # the dense FFN of DiT configs (no PLR head)
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

        def forward(self, h, tgt):
            return self.fc2(F.gelu(self.fc1(h), approximate="tanh")), 0.0

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj, self.ada = nn.Linear(D, 3 * D), nn.Linear(D, D), nn.Linear(D, 6 * D)
            self.moe = MoE() if cfg.is_moe else MLP()

        def mix(self, x, c):  # the dense part: adaLN, attention, the FFN's input
            B = x.shape[0]
            s1, c1, g1, s2, c2, g2 = self.ada(c).unsqueeze(1).chunk(6, -1)
            h = F.layer_norm(x, (D,), eps=1e-6) * (1 + c1) + s1
            q, kk, v = self.qkv(h).reshape(B, L, 3, NH, D // NH).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, kk, v).transpose(1, 2).reshape(B, L, D)
            x = x + g1 * self.proj(a)
            return x, F.layer_norm(x, (D,), eps=1e-6) * (1 + c2) + s2, g2

        def forward(self, x, c, tgt):
            B = x.shape[0]
            x, h, g2 = self.mix(x, c)
            f, plr = self.moe(h.reshape(B * L, D), tgt)
            return x + g2 * f.reshape(B, L, D), plr

    class DiT(nn.Module):
        def __init__(self):
            super().__init__()
            self.xe = nn.Conv2d(C, D, p, p)
            self.t0, self.t2 = nn.Linear(256, D), nn.Linear(D, D)
            self.ye = nn.Embedding(ncls + 1, D)
            self.blocks = nn.ModuleList([Block() for _ in range(depth)])
            self.fa, self.fl = nn.Linear(D, 2 * D), nn.Linear(D, P)
            self.register_buffer("pe", pos_embed())
            self.register_buffer("freqs", torch.exp(-math.log(10000) * torch.arange(128) / 128))

        def forward(self, x, t, y, target):
            B = x.shape[0]
            h = self.xe(x).flatten(2).transpose(1, 2) + self.pe
            a = t[:, None] * self.freqs[None]
            c = self.t2(F.silu(self.t0(torch.cat([torch.cos(a), torch.sin(a)], 1)))) + self.ye(y)
            c = F.silu(c)
            tgt = target.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(B * L, P)
            plr = 0.0
            for blk in self.blocks:
                h, pl = blk(h, c, tgt)
                plr = plr + pl
            sh, sc = self.fa(c).unsqueeze(1).chunk(2, -1)
            o = self.fl(F.layer_norm(h, (D,), eps=1e-6) * (1 + sc) + sh)
            o = o.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, S, S)
            return F.mse_loss(o.float(), target) + plr / depth

    return DiT().to(device)


def bench_torch(args, cfg, modes):
    import torch

    x, t, y, target = (torch.tensor(a, device="cuda") for a in data(args.batch, args.size, 4, 1000))
    model = torch_model(cfg, args.size, 4, 1000, torch)
    params = [q for q in model.parameters()]
    ema = [q.detach().clone() for q in params]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    rows = []
    for mode in modes:
        torch.backends.cuda.matmul.allow_tf32 = mode != "fp32"
        torch.backends.cudnn.allow_tf32 = mode != "fp32"
        fwd = model.forward
        if mode == "compile bf16":
            # Regional compilation: every dense region (each block's adaLN + attention part,
            # each router) is compiled; the expert loop stays eager, as its data-dependent
            # per-expert shapes would recompile a whole-model graph on every step.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                        4 * cfg.depth)
            for blk in model.blocks:
                blk.mix = torch.compile(blk.mix)
                if cfg.is_moe:
                    blk.moe.scores = torch.compile(blk.moe.scores)
                else:
                    blk.moe = torch.compile(blk.moe)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode != "fp32"):
                loss = fwd(x, t, y, target)
            loss.backward()
            opt.step()
            torch._foreach_lerp_(ema, [q.detach() for q in params], 1e-4)
            return loss

        t0 = time.perf_counter()
        for _ in range(3 if mode == "compile bf16" else 2):
            step()
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        loss = float(loss)     # reads back, as racedit's step does
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3 / args.steps
        rows.append((mode, ms, loss))
        print(f"  torch   {mode:12}: {ms:9.2f} ms/step  (loss {loss:.4f}; warm-up {warm:.1f} s)",
              flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="RaceDiT-B/2-4in32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-timeout", type=int, default=120)
    ap.add_argument("--racedit-only", default=None, choices=("fp32", "tf32", "bf16"),
                    help="time racedit in this precision only (e.g. under a profiler)")
    ap.add_argument("--warm-compile", action="store_true",
                    help="only compile the torch.compile variant (fills the inductor cache)")
    ap.add_argument("--torch-only", default=None, help=argparse.SUPPRESS)  # subprocess mode
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from racedit.configs import get_config

    cfg = get_config(args.config)
    if args.warm_compile:
        args.steps = 1
        args.torch_only = "compile bf16"
    if args.torch_only:
        rows = bench_torch(args, cfg, [args.torch_only])
        print("RESULT " + json.dumps(rows[0]))
        return 0
    import racedit

    if not racedit.cuda_available():
        print("bench_cuda_model: racedit has no usable CUDA device; nothing to do")
        return 0
    flops = step_flops(cfg, args.batch, args.size, 4)
    print(f"{args.config} at {args.size}x{args.size}x4, batch {args.batch}: "
          f"{flops / 1e12:.2f} routed TFLOP per step")
    rd = bench_racedit(args, cfg, [args.racedit_only] if args.racedit_only else None)
    if args.racedit_only:
        return 0
    th = []
    try:
        import torch

        ok = torch.cuda.is_available()
    except ImportError:
        ok = False
    if ok:
        print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
        th = bench_torch(args, cfg, ["fp32", "bf16"])
        torch.cuda.empty_cache()
        if not args.no_compile:
            cmd = [sys.executable, os.path.abspath(__file__), "--torch-only", "compile bf16",
                   "--config", args.config, "--batch", str(args.batch), "--size", str(args.size),
                   "--steps", str(args.steps)]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.compile_timeout)
                lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                if lines:
                    th.append(tuple(json.loads(lines[-1][7:])))
                    print(f"  torch   compile bf16: {th[-1][1]:9.2f} ms/step")
                else:
                    print(f"  torch.compile failed (rc {p.returncode}): {p.stderr.strip()[-600:]}")
            except subprocess.TimeoutExpired:
                print(f"  torch.compile did not finish within {args.compile_timeout} s; no row")
    else:
        print("torch with CUDA not available: racedit rows only")
    print()
    hdr = f"{'run':22} {'ms/step':>9} {'TFLOP/s':>8} {'MFU':>6}   vs torch eager (same precision)"
    print(hdr)
    print("-" * len(hdr))
    eager = {m: ms for m, ms, _ in th}
    for name, ms, _ in rd:
        tf = flops / (ms * 1e-3)
        ref = eager.get("fp32" if name == "fp32" else "bf16")
        ratio = f"{ms / ref:.2f}x torch {'fp32' if name == 'fp32' else 'bf16'}" if ref else ""
        if "compile bf16" in eager and name == "bf16":
            ratio += f", {ms / eager['compile bf16']:.2f}x torch.compile"
        print(f"racedit {name:14} {ms:9.2f} {tf / 1e12:8.1f} {tf / PEAK[name]:6.1%}   {ratio}")
    for name, ms, _ in th:
        tf = flops / (ms * 1e-3)
        peak = PEAK["fp32" if name == "fp32" else "bf16"]
        print(f"torch   {name:14} {ms:9.2f} {tf / 1e12:8.1f} {tf / peak:6.1%}")
    print("(ratio < 1: racedit faster; targets: racedit bf16 <= 0.67x torch eager bf16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
