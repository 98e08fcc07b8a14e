"""Benchmark (not a test): the MoE block in PyTorch eager bf16 on the GPU against
racedit's CUDA block (bf16 experts) on the same shapes, and both against dense bf16
GEMMs of the experts' FLOPs.

The PyTorch block is the usual eager implementation: bf16 parameters, router MLP
(Linear, GELU erf, Linear), identity gating, Expert Race selection (one torch.topk over
all B*L*E scores of the fp32 gates), tokens sorted by expert (stable argsort), a loop of
per-expert addmm + GELU tanh + addmm, gated index_add_ combine; then autograd backward.
Times are CUDA-event means per forward + backward after a warm-up. racedit's time is its
device-resident layer forward + backward (rd_cuda_bench_moe) with bf16 experts, for each
expert-GEMM mode, with the fp32 router ("bf16") and a TF32 router ("bf16+r32t").

Prints per configuration: torch eager ms, torch dense ms (6 bf16 matmuls of the experts'
FLOPs), the ratios dense/torch, and racedit's ms, dense/racedit and torch/racedit.

Usage: python benchmarks/bench_cuda_torch.py [--iters 10]
"""
import argparse
import sys
import time

import numpy as np

import racedit

CONFIGS = [
    ("S/2-2in16 B=8", 8, 256, 384, 16, 2),
    ("B/2-4in32 B=64", 64, 256, 768, 32, 4),
]


def params_for(D, E, He, rng):
    sizes = [D * D, D, D * E, E, E * D * He, E * He, E * He * D, E * D]
    scale = [1 / np.sqrt(D), 0.0, 1 / np.sqrt(D), 0.0, 1 / np.sqrt(D), 0.0, 1 / np.sqrt(He), 0.0]
    return np.concatenate([(s * rng.standard_normal(n)).astype(np.float32) for n, s in zip(sizes, scale)])


def torch_params(flat, D, E, He, torch):
    shapes = [(D, D), (D,), (D, E), (E,), (E, D, He), (E, He), (E, He, D), (E, D)]
    names = ["router_w", "router_b", "gate_w", "gate_b", "w1", "b1", "w2", "b2"]
    out, off = {}, 0
    for n, sh in zip(names, shapes):
        size = int(np.prod(sh))
        out[n] = torch.tensor(flat[off:off + size].reshape(sh), device="cuda",
                              dtype=torch.bfloat16).requires_grad_(True)
        off += size
    return out


def torch_block(P, k, torch):
    F = torch.nn.functional
    E = P["gate_b"].shape[0]

    def forward(x):  # x (N,D) bf16
        N = x.shape[0]
        h = F.gelu(torch.addmm(P["router_b"], x, P["router_w"]))
        G = torch.addmm(P["gate_b"], h, P["gate_w"])           # identity gating
        with torch.no_grad():
            flat = G.float().reshape(-1)
            idx = torch.topk(flat, N * k, sorted=False).indices  # Expert Race: one top-K
            tok, exp = idx // E, idx % E
            order = torch.argsort(exp * N + tok)                 # expert-major, tokens ascending
            tok, exp = tok[order], exp[order]
            counts = torch.bincount(exp, minlength=E).tolist()   # the host read-back
        xg = x[tok]
        outs, start = [], 0
        for e in range(E):
            n = counts[e]
            if n:
                hdn = F.gelu(torch.addmm(P["b1"][e], xg[start:start + n], P["w1"][e]), approximate="tanh")
                outs.append(torch.addmm(P["b2"][e], hdn, P["w2"][e]))
            start += n
        o = torch.cat(outs) * G[tok, exp][:, None]
        return torch.zeros_like(x).index_add_(0, tok, o)

    return forward


def time_cuda(fn, iters, torch):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def bench_config(name, B, L, D, E, k, rng, args, torch, rc):
    """Rows of one configuration (its tensors are freed on return)."""
    He = 4 * D // k
    N = B * L
    flat = params_for(D, E, He, rng)
    x = rng.standard_normal((B, L, D)).astype(np.float32)
    dy = rng.standard_normal((B, L, D)).astype(np.float32)
    P = torch_params(flat, D, E, He, torch)
    fwd = torch_block(P, k, torch)
    xt = torch.tensor(x.reshape(N, D), device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    dyt = torch.tensor(dy.reshape(N, D), device="cuda", dtype=torch.bfloat16)

    def step():
        for p in P.values():
            p.grad = None
        xt.grad = None
        fwd(xt).backward(dyt)

    torch_ms = time_cuda(step, args.iters, torch)
    # dense bf16 GEMMs of the experts' FLOPs (P = N*k rows through one expert)
    Pn = N * k
    a = torch.randn(Pn, D, device="cuda", dtype=torch.bfloat16)
    hh = torch.randn(Pn, He, device="cuda", dtype=torch.bfloat16)
    w1 = P["w1"][0].detach()
    w2 = P["w2"][0].detach()

    def dense():
        z = a @ w1
        o = hh @ w2
        _ = hh.t() @ o
        dz = o @ w2.t()
        _ = a.t() @ dz
        _ = dz @ w1.t()
        return z

    dense_ms = time_cuda(dense, args.iters, torch)
    cfg = dict(D=D, E=E, He=He, k=k, strategy="race", gating="identity", beta=0.99,
               eval_topk=False)
    modes = [0, 1, 2] if rc.info()["grouped_gemm"] else [0, 2]
    for label, tf32 in (("bf16", False), ("bf16+r32t", True)):
        for mode in modes:
            rc.expert_gemm(mode)
            rc.tf32(tf32)
            r = rc.bench_moe(cfg, x, flat, dy, iters=args.iters, precision="bf16")
            ms = r["fwdbwd_ms"]
            print(f"{name:16} {Pn:7d} {torch_ms:8.3f} {dense_ms:8.3f} {dense_ms / torch_ms:11.2f} | "
                  f"{label:>9} {('loop', 'grouped', 'streams')[mode]:7} {ms:8.3f} "
                  f"{r['dense_fwdbwd_ms'] / ms:8.2f} {torch_ms / ms:8.2f}", flush=True)
    rc.expert_gemm(0)
    rc.tf32(False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("bench_cuda_torch: torch not installed; nothing to do")
        return 0
    if not torch.cuda.is_available() or not racedit.cuda_available():
        print("bench_cuda_torch: needs torch with CUDA and racedit built with CUDA; nothing to do")
        return 0
    from racedit import cuda as rc

    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}; racedit {racedit.__version__}")
    hdr = (f"{'config':16} {'P':>7} {'torch':>8} {'t.dense':>8} {'dense/torch':>11} | "
           f"{'racedit':>9} {'gemm':7} {'mode ms':>8} {'dense/rd':>8} {'torch/rd':>8}")
    print(hdr)
    print("-" * len(hdr))
    t0 = time.time()
    rng = np.random.default_rng(0)
    for name, B, L, D, E, k in CONFIGS:
        bench_config(name, B, L, D, E, k, rng, args, torch, rc)
        torch.cuda.empty_cache()
    print(f"(ms per forward + backward, mean of {args.iters}; dense/rd uses racedit's own dense "
          f"bf16 GEMMs; total {time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
