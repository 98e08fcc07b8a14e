"""Forward+backward time of the whole model (racedit.RaceDiT, C core) for RaceDiT-S/2-2in8
and DiT-S/2 at 16x16x4 (L=64) and 32x32x4 (L=256) latents, batch 8; with torch installed,
the ratio to a PyTorch eager implementation of the same model (tests/torch_dit.py: DiT
with scaled_dot_product_attention, and an index_add_ MoE for the race blocks), run in the
same process with the same number of threads. Not a test.

    python3 benchmarks/bench_model.py [--repeat 5] [--batch 8] [--configs DiT-S/2,...]

Aux losses are off in the comparison (sim_weight = balance_weight = 0, no PLR target) as
the PyTorch model has none; the last rows time RaceDiT with its defaults (PLR + sim) on.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), os.path.join(HERE, "..", "tests")]

import racedit  # noqa: E402
from racedit.configs import get_config  # noqa: E402


def timeit(fn, repeat):
    fn()                                     # warm-up (allocations, thread pools)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_racedit(name, size, B, repeat, aux=False):
    kw = {} if aux else dict(sim_weight=0.0, balance_weight=0.0, plr_weight=0.0)
    m = racedit.RaceDiT(name, input_size=size, in_channels=4, num_classes=1000, seed=0,
                        class_dropout_prob=0.0, **kw)
    rng = np.random.default_rng(0)
    m.param_buffer[:] += rng.normal(0, 0.02, m.param_buffer.size).astype(np.float32)
    x = rng.normal(size=(B, 4, size, size)).astype(np.float32)
    t = rng.integers(0, 1000, B)
    y = rng.integers(0, 1000, B)
    dout = rng.normal(size=(B, 4, size, size)).astype(np.float32)
    plr = dout if aux else None

    def step():
        m.forward(x, t, y, plr_target=plr)
        m.backward(dout)
    return timeit(step, repeat)


def bench_torch(name, size, B, repeat):
    import torch
    from torch_dit import DiT

    c = get_config(name)
    moe = (c.num_experts, c.k, c.expert_hidden) if c.is_moe else None
    torch.manual_seed(0)
    net = DiT(size, c.patch, 4, c.hidden, c.depth, c.heads, 1000, False, moe)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n != "pos_embed":
                p.normal_(0.0, 0.02)
    x = torch.randn(B, 4, size, size)
    t = torch.randint(0, 1000, (B,))
    y = torch.randint(0, 1000, (B,))
    dout = torch.randn(B, 4, size, size)

    def step():
        net.zero_grad(set_to_none=False)
        (net(x, t, y) * dout).sum().backward()
    return timeit(step, repeat)


def bench_attention(B, L, repeat):
    """Attention forward+backward (B, NH=6, D=384) in both threading modes: OpenMP over
    the (b, h) pairs with a single-threaded BLAS, or pairs in turn with a threaded BLAS."""
    from racedit import _C
    rng = np.random.default_rng(0)
    qkv = rng.normal(size=(B, L, 3 * 384)).astype(np.float32)
    out, att = _C.dit_attention_forward(qkv, 6)

    def step():
        _C.dit_attention_forward(qkv, 6)
        _C.dit_attention_backward(out, qkv, att, 6)
    res = {}
    prev = _C.moe_threading()
    try:
        for mode in ("omp", "blas"):
            _C.moe_threading(mode)
            if mode == "omp":
                try:
                    from threadpoolctl import threadpool_limits
                except ImportError:
                    res[mode] = float("nan")
                    continue
                with threadpool_limits(1, "blas"):
                    res[mode] = timeit(step, 4 * repeat)
            else:
                res[mode] = timeit(step, 4 * repeat)
    finally:
        _C.moe_threading(prev)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--configs", default="DiT-S/2,RaceDiT-S/2-2in8")
    ap.add_argument("--sizes", default="16,32")
    args = ap.parse_args()
    try:
        import torch
        have_torch = True
    except ImportError:
        have_torch = False
    info = racedit.build_info()
    try:
        from threadpoolctl import threadpool_info
        blas = ", ".join(f"{d['internal_api']} {d.get('num_threads')} threads"
                         for d in threadpool_info() if d["user_api"] == "blas")
    except ImportError:
        blas = "threadpoolctl not installed"
    print(f"racedit: OpenMP {info['openmp']} ({info['num_threads']} threads), {info['blas']}; BLAS pools: {blas}")
    if have_torch:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for L in (64, 256):
        r = bench_attention(args.batch, L, args.repeat)
        print(f"attention fwd+bwd B={args.batch} NH=6 D=384 L={L}: OpenMP over (b,h) "
              f"{r['omp'] * 1e3:.1f} ms, BLAS-threaded products {r['blas'] * 1e3:.1f} ms")
    print(f"threading mode of the model: {racedit._C.moe_threading()}")
    print(f"batch {args.batch}, median of {args.repeat}, forward+backward, seconds")
    print(f"{'model':20s} {'latent':>9s} {'L':>4s} {'racedit':>9s} {'torch':>9s} {'ratio':>7s}")
    for name in args.configs.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            L = (size // get_config(name).patch) ** 2
            try:
                ours = bench_racedit(name, size, args.batch, args.repeat)
            except ValueError as e:                  # e.g. a build without the MoE composite
                print(f"{name:20s} {size}x{size}x4 {L:4d}   n/a ({e})")
                continue
            theirs = bench_torch(name, size, args.batch, args.repeat) if have_torch else float("nan")
            print(f"{name:20s} {size:>2d}x{size:<2d}x4 {L:4d} {ours:9.3f} {theirs:9.3f} {ours / theirs:7.2f}",
                  flush=True)
    for name in args.configs.split(","):
        if get_config(name).is_moe:
            for size in (int(s) for s in args.sizes.split(",")):
                try:
                    ours = bench_racedit(name, size, args.batch, args.repeat, aux=True)
                    print(f"{name + ' +PLR+sim':20s} {size:>2d}x{size:<2d}x4 {(size // 2) ** 2:4d} {ours:9.3f}")
                except ValueError as e:
                    print(f"{name + ' +PLR+sim':20s} n/a ({e})")


if __name__ == "__main__":
    main()
