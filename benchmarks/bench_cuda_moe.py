"""Benchmark of the CUDA MoE block (not a test): device-resident timings from
racedit.cuda.bench_moe (inputs uploaded once, CUDA events around each region).

For each configuration, strategy, expert-GEMM mode (a loop of cublasGemmEx, one
cublasGemmGroupedBatchedEx per product, or the loop over side streams) and precision it
prints (precisions: fp32; tf32 everywhere; bf16 experts with the fp32 router; bf16 experts
with a TF32 router, "bf16+r32t"):
  route    routing alone (top-K over the strategy's groups)
  fwd      the layer forward (router, gate, routing, dispatch, experts, combine)
  fwd+bwd  the layer forward + backward
  exp f+b  the experts alone, forward + backward (dispatch, 6 GEMM sets, combine)
  dense    6 dense cuBLAS GEMMs of the experts' FLOPs (all P rows in one expert), with the
           experts' operand / result types (bf16 operands for the bf16 rows)
  ratio    dense / exp f+b: the fraction of the dense GEMM rate the experts reach
  blk      dense / fwd+bwd: the same for the whole block (router GEMMs included)
  blk*     blk with the router's GEMM FLOPs (6 N D (D + E)) credited at the dense rate:
           (dense * (F_experts + F_router) / F_experts) / fwd+bwd
  TFLOP/s  routed expert FLOPs (6 * 2 * P * D * He per fwd+bwd) / exp f+b time
The ratio target of the design is >= 0.60.

Usage: python benchmarks/bench_cuda_moe.py [--iters 20] [--quick] [--strategies race,token]
"""
import argparse
import sys
import time

import numpy as np

import racedit

# (name, B, L, D, E, k): bench_moe.py's CPU case, and RaceDiT-B/2-4in32 at 32x32x4 latents
CONFIGS = [
    ("S/2-2in16 B=8", 8, 256, 384, 16, 2),
    ("B/2-4in32 B=64", 64, 256, 768, 32, 4),
]


def params_for(cfg, rng):
    st_sizes = [cfg["D"] * cfg["D"], cfg["D"], cfg["D"] * cfg["E"], cfg["E"],
                cfg["E"] * cfg["D"] * cfg["He"], cfg["E"] * cfg["He"],
                cfg["E"] * cfg["He"] * cfg["D"], cfg["E"] * cfg["D"]]
    D, He = cfg["D"], cfg["He"]
    scale = [1 / np.sqrt(D), 0.0, 1 / np.sqrt(D), 0.0, 1 / np.sqrt(D), 0.0, 1 / np.sqrt(He), 0.0]
    return np.concatenate([(s * rng.standard_normal(n)).astype(np.float32)
                           for n, s in zip(st_sizes, scale)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="race only, fp32 and bf16 only")
    ap.add_argument("--strategies", default="race,token,expert,le")
    args = ap.parse_args()
    if not racedit.cuda_available():
        print("bench_cuda_moe: CUDA not available (no device or built without CUDA); nothing to do")
        return 0
    from racedit import cuda as rc

    info = rc.info()
    print(f"racedit {racedit.__version__}, CUDA runtime {info['runtime']}, cuBLAS "
          f"{info['cublas_version']}, grouped GEMM {'yes' if info['grouped_gemm'] else 'no'}")
    modes = [0, 1, 2] if info["grouped_gemm"] else [0, 2]
    strategies = ["race"] if args.quick else args.strategies.split(",")
    # (label, global TF32 knob, expert precision)
    precisions = [("fp32", False, "fp32"), ("bf16", False, "bf16")]
    if not args.quick:
        precisions = [("fp32", False, "fp32"), ("tf32", True, "tf32"), ("bf16", False, "bf16"),
                      ("bf16+r32t", True, "bf16")]
    rng = np.random.default_rng(0)
    hdr = (f"{'config':16} {'strategy':8} {'gemm':7} {'prec':9} {'route':>7} {'fwd':>8} "
           f"{'fwd+bwd':>8} {'exp f+b':>8} {'dense':>8} {'ratio':>6} {'blk':>5} {'blk*':>5} {'TFLOP/s':>8}")
    print(hdr)
    print("-" * len(hdr))
    t0 = time.time()
    for name, B, L, D, E, k in CONFIGS:
        cfg = dict(D=D, E=E, He=4 * D // k, k=k, strategy="race", gating="identity", beta=0.99,
                   eval_topk=False)
        p = params_for(cfg, rng)
        x = rng.standard_normal((B, L, D)).astype(np.float32)
        dy = rng.standard_normal((B, L, D)).astype(np.float32)
        for s in strategies:
            cfg["strategy"] = s
            for mode in modes:
                for label, tf32, prec in precisions:
                    rc.expert_gemm(mode)
                    rc.tf32(tf32)
                    r = rc.bench_moe(cfg, x, p, dy, iters=args.iters, precision=prec)
                    flops = 6 * 2 * r["P"] * D * cfg["He"]
                    router = 6 * B * L * D * (D + E)
                    print(f"{name:16} {s:8} {('loop', 'grouped', 'streams')[mode]:7} "
                          f"{label:9} {r['route_ms']:7.3f} {r['fwd_ms']:8.3f} "
                          f"{r['fwdbwd_ms']:8.3f} {r['experts_fwdbwd_ms']:8.3f} "
                          f"{r['dense_fwdbwd_ms']:8.3f} "
                          f"{r['dense_fwdbwd_ms'] / r['experts_fwdbwd_ms']:6.2f} "
                          f"{r['dense_fwdbwd_ms'] / r['fwdbwd_ms']:5.2f} "
                          f"{r['dense_fwdbwd_ms'] * (flops + router) / flops / r['fwdbwd_ms']:5.2f} "
                          f"{flops / r['experts_fwdbwd_ms'] / 1e9:8.2f}", flush=True)
    rc.expert_gemm(0)
    rc.tf32(False)
    print(f"(times in ms per call, mean of {args.iters}; total {time.time() - t0:.1f} s; "
          f"grouped GEMM type combinations refused by cuBLAS (run as the loop): "
          f"{rc.info()['grouped_fallbacks']} {rc.info()['grouped_refused']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
