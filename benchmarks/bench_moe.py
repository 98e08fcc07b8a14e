"""Benchmark of the MoE block on CPU (not a test): racedit.MoE forward+backward per routing
strategy, the expert FFN's GEMM rate against a dense sgemm of equal FLOPs, and a PyTorch
eager implementation of the same block when torch is installed.

    python3 benchmarks/bench_moe.py [--repeat 5] [--case small|large|all] [--modes omp,blas]

What is measured, per case (B, L, D, E, k; He = 4D/k):
- layer: racedit.MoE.forward + backward in training mode (router, gate, top-K routing,
  dispatch, experts, combine, and all gradients), per strategy.
- experts: racedit.ops.experts_backward (the experts' forward and backward on the race
  selection of the layer, reusing one workspace); its GEMM FLOPs (6 products of
  2*P*D*He each, P selected pairs) divided by the whole time, gathers, GELU and combine
  included, against the rate of the six GEMMs of a dense MLP of equal FLOPs (N tokens,
  width P*He/N = 4D) run with scipy.linalg.blas.sgemm: the same SciPy OpenBLAS racedit
  calls, threaded by the BLAS itself with the same number of threads.
- torch: the same block in PyTorch eager mode (router MLP, torch.topk selection, tokens
  sorted by expert, index_select gathers, one addmm pair per expert on per-expert leaf
  weights as an nn.ModuleList holds them, index_add_ combine, autograd backward),
  torch.set_num_threads equal to racedit's OpenMP threads; its output is checked
  against racedit's.
Timings are the minimum over --repeat runs after one warm-up; racedit and the baselines
alternate run by run so that machine load hits both alike.

The BLAS kernels are whatever SciPy's OpenBLAS picks for the CPU (printed below); it can
be overridden with OPENBLAS_CORETYPE (e.g. SkylakeX on an AVX-512 CPU that OpenBLAS maps
to Haswell kernels), which changes racedit and the dense reference alike.

OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE, set here before racedit and torch
load their OpenMP runtimes, unless already set or --spin is given): on a machine shared
with other work, spinning threads steal the cores that the thread they wait for needs.
Both racedit and torch run under the same policy.
"""
import argparse
import os
import sys
import time

if "--spin" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
from scipy.linalg.blas import sgemm

import racedit
from racedit import ops

STRATEGIES = ["token", "expert", "bl", "be", "le", "race"]
CASES = {"small": dict(B=8, L=256, D=384, E=16, k=2), "large": dict(B=8, L=256, D=768, E=32, k=4)}


def interleaved(fns, repeat):
    """Minimum wall time of each of fns over `repeat` alternating runs (after a warm-up)."""
    for f in fns:
        f()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def blas_threads():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    libs = [f"{i['internal_api']} {i.get('architecture', '?')} kernels, {i['num_threads']} threads "
            f"({i['filepath'].rsplit('/', 1)[-1]})" for i in threadpool_info() if i["user_api"] == "blas"]
    return "; ".join(libs) or "none found"


def limit_blas(n):
    try:
        from threadpoolctl import threadpool_limits
        return threadpool_limits(n, "blas")
    except ImportError:
        return None


def dense_mlp_gemms(N, D, H, rng):
    """The six sgemm calls of a dense MLP (N,D)->(N,H)->(N,D), forward and backward,
    on preallocated Fortran-ordered buffers (no copies inside the timed call)."""
    f = lambda *s: np.asfortranarray(rng.standard_normal(s).astype(np.float32) * 0.05)
    x, W1, W2, dy, hdn = f(N, D), f(D, H), f(H, D), f(N, D), f(N, H)
    a, o, dW2, dh, dW1, dx = f(N, H), f(N, D), f(H, D), f(N, H), f(D, H), f(N, D)

    def run():
        sgemm(1.0, x, W1, c=a, overwrite_c=1)                       # a   = x W1
        sgemm(1.0, hdn, W2, c=o, overwrite_c=1)                     # o   = h W2
        sgemm(1.0, hdn, dy, trans_a=1, beta=1.0, c=dW2, overwrite_c=1)  # dW2 += h^T dy
        sgemm(1.0, dy, W2, trans_b=1, c=dh, overwrite_c=1)          # dh  = dy W2^T
        sgemm(1.0, x, dh, trans_a=1, beta=1.0, c=dW1, overwrite_c=1)    # dW1 += x^T da
        sgemm(1.0, dh, W1, trans_b=1, c=dx, overwrite_c=1)          # dx  = da W1^T
    return run


# ---- PyTorch eager baseline ---------------------------------------------------------

def torch_block(m, strategy, torch):
    """The same layer as m (same parameter values) in PyTorch eager mode."""
    F = torch.nn.functional
    P = {n: torch.tensor(v, requires_grad=True) for n, v in m.params.items()
         if n in ("router_w", "router_b", "gate_w", "gate_b")}
    # one leaf tensor per expert, as an nn.ModuleList of experts holds them: indexing a
    # stacked (E, ...) weight would make autograd build a full zero gradient per expert
    X = {n: [torch.tensor(v[e], requires_grad=True) for e in range(m.num_experts)]
         for n, v in m.params.items() if n in ("w1", "b1", "w2", "b2")}
    E, k = m.num_experts, m.k
    axes = {"token": (2,), "expert": (1,), "bl": (0, 1), "be": (0, 2), "le": (1, 2),
            "race": (0, 1, 2)}[strategy]

    def select(G):  # (B,L,E) -> bool mask, top-K over `axes` in every group
        B, L, _ = G.shape
        keep = [a for a in range(3) if a not in axes]
        perm = keep + list(axes)
        Gp = G.permute(*perm)
        gshape = Gp.shape
        flat = Gp.reshape(int(np.prod([gshape[i] for i in range(len(keep))])), -1)
        K = k * flat.shape[1] // E
        idx = flat.topk(K, dim=1).indices
        mk = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
        inv = np.argsort(perm).tolist()
        return mk.reshape(gshape).permute(*inv)

    def forward(x):
        B, L, D = x.shape
        xf = x.reshape(B * L, D)
        h = F.gelu(xf @ P["router_w"] + P["router_b"])
        R = h @ P["gate_w"] + P["gate_b"]
        G = R if m.gating == "identity" else (torch.sigmoid(R) if m.gating == "sigmoid"
                                              else torch.softmax(R, -1))
        with torch.no_grad():
            mask = select(G.detach().reshape(B, L, E)).reshape(B * L, E)
            tok, exp = mask.nonzero(as_tuple=True)
            order = torch.argsort(exp, stable=True)
            tok, exp = tok[order], exp[order]
            counts = torch.bincount(exp, minlength=E).tolist()
        xg = xf.index_select(0, tok)                                  # (P,D)
        g = G.reshape(-1).index_select(0, tok * E + exp)              # (P,)
        outs = []
        for e, xe in enumerate(torch.split(xg, counts)):
            if counts[e]:
                hdn = F.gelu(torch.addmm(X["b1"][e], xe, X["w1"][e]), approximate="tanh")
                outs.append(torch.addmm(X["b2"][e], hdn, X["w2"][e]))
        o = torch.cat(outs) * g[:, None]
        y = torch.zeros_like(xf).index_add_(0, tok, o)
        return y.reshape(B, L, D)

    def step(x, dy):
        for p in list(P.values()) + [t for ts in X.values() for t in ts]:
            p.grad = None
        xt = torch.from_numpy(x).requires_grad_(True)
        forward(xt).backward(torch.from_numpy(dy))
    return step, forward


# ---- main -------------------------------------------------------------------------------

def run_case(name, c, args, torch):
    B, L, D, E, k = c["B"], c["L"], c["D"], c["E"], c["k"]
    N, He = B * L, 4 * D // k
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, L, D)).astype(np.float32)
    dy = rng.standard_normal((B, L, D)).astype(np.float32)
    print(f"\n== {name}: B={B} L={L} D={D} E={E} k={k} He={He} (N={N}) ==")

    # experts alone, on the race selection, against a dense MLP of equal FLOPs
    m = racedit.MoE(D, E, k, strategy="race", seed=0)
    m.forward(x)
    mask, G = m.mask.reshape(N, E), m.gates.reshape(N, E)
    P = int(mask.sum())
    xf, dyf = x.reshape(N, D), dy.reshape(N, D)
    w = [m.params[n] for n in ["w1", "b1", "w2", "b2"]]
    flops = 6 * 2 * P * D * He
    dense = dense_mlp_gemms(N, D, P * He // N, rng)
    print(f"experts fwd+bwd on the race selection (P={P}), {flops / 1e9:.2f} GFLOP of GEMMs; "
          f"dense reference: scipy.linalg.blas.sgemm, 6 GEMMs of a ({N},{D})->({N},{P * He // N}) MLP")
    for mode in args.modes:
        ops.moe_threading(mode)
        t_exp, t_dense = interleaved([lambda: ops.experts_backward(dyf, xf, mask, G, *w), dense],
                                     args.repeat)
        r_exp, r_dense = flops / t_exp / 1e9, flops / t_dense / 1e9
        print(f"  [{mode:4}] experts {t_exp * 1e3:7.1f} ms = {r_exp:6.1f} GFLOP/s | dense "
              f"{t_dense * 1e3:7.1f} ms = {r_dense:6.1f} GFLOP/s | ratio {r_exp / r_dense:.2f}")

    # the whole layer per strategy, against PyTorch, in the first mode; the other modes
    # in their own pass (a mode's leftover BLAS threads must not spin during another's run)
    print(f"layer forward+backward (training), racedit threading '{args.modes[0]}':")
    head = f"  {'strategy':8} {'racedit ms':>11}"
    if torch is not None:
        head += f" {'torch ms':>10} {'torch/racedit':>14}"
    print(head)
    layers = {s: racedit.MoE(D, E, k, strategy=s, seed=0) for s in STRATEGIES}

    def step(m):
        m.forward(x)
        m.backward(dy)
        m.zero_grad()
    ops.moe_threading(args.modes[0])
    for s in STRATEGIES:
        fns = [lambda m=layers[s]: step(m)]
        if torch is not None:
            tstep, tforward = torch_block(layers[s], s, torch)
            fns.append(lambda: tstep(x, dy))
            with torch.no_grad():   # the two compute the same block
                yt = tforward(torch.from_numpy(x)).numpy()
            y = layers[s].forward(x)
            diff = np.abs(yt - y).max() / np.abs(y).max()
        ts = interleaved(fns, args.repeat)
        line = f"  {s:8} {ts[0] * 1e3:11.1f}"
        if torch is not None:
            line += f" {ts[1] * 1e3:10.1f} {ts[1] / ts[0]:14.2f}   (max |y_torch - y| / max |y| = {diff:.1e})"
        print(line)
    for mode in args.modes[1:]:
        ops.moe_threading(mode)
        ts = interleaved([lambda m=layers[s]: step(m) for s in STRATEGIES], args.repeat)
        print(f"  threading '{mode}': " + ", ".join(f"{s} {t * 1e3:.1f}" for s, t in zip(STRATEGIES, ts))
              + " ms")
    ops.moe_threading(args.modes[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--case", choices=["small", "large", "all"], default="all")
    ap.add_argument("--modes", default="omp,blas", help="racedit threading modes to time")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--spin", action="store_true", help="leave OMP_WAIT_POLICY unset")
    args = ap.parse_args()
    args.modes = args.modes.split(",")
    try:
        import torch
    except ImportError:
        torch = None
    if args.no_torch:
        torch = None
    info = racedit.build_info()
    T = info["num_threads"]
    limit = limit_blas(T)   # the dense reference and 'blas' mode use T BLAS threads
    print(f"racedit: OpenMP {info['openmp']} with {T} threads "
          f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}); BLAS {info['blas']}")
    print(f"BLAS threads (threadpoolctl): {blas_threads()}")
    print(f"racedit can set the BLAS thread count: {racedit._C.blas_thread_control()} "
          f"(mode 'omp' runs the BLAS single-threaded inside OpenMP tasks; 'blas' lets it thread)")
    if torch is not None:
        torch.set_num_threads(T)
        print(f"torch {torch.__version__}: {torch.get_num_threads()} threads, "
              f"MKL {torch.backends.mkl.is_available()}, oneDNN {torch.backends.mkldnn.is_available()}")
    else:
        print("torch not installed: no PyTorch comparison")
    cases = list(CASES) if args.case == "all" else [args.case]
    for name in cases:
        run_case(name, CASES[name], args, torch)
    del limit


if __name__ == "__main__":
    main()
