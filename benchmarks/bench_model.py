"""Forward+backward time of the whole model (racedit.RaceDiT, C core) for RaceDiT-S/2-2in8
and DiT-S/2 at 16x16x4 (L=64) and 32x32x4 (L=256) latents, batch 8; with torch installed,
the ratio to a PyTorch eager implementation of the same model (tests/torch_dit.py: DiT
with scaled_dot_product_attention, and an index_add_ MoE for the race blocks), run in the
same process with the same number of threads. Not a test.

    python3 benchmarks/bench_model.py [--repeat 5] [--batch 8] [--configs DiT-S/2,...] [--compile]
    OMP_NUM_THREADS=1 python3 benchmarks/bench_model.py     # one thread for both

The two implementations run alternately, step by step, so a machine shared with other
work slows both alike; min and median over the steps are printed, the ratio is of the
minima. Aux losses are off in the comparison (sim_weight = balance_weight = 0, no PLR
target) as the PyTorch model has none; the last rows time RaceDiT with its defaults
(PLR + similarity loss) on.
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
from racedit import _C  # noqa: E402
from racedit.configs import get_config  # noqa: E402


def alternate(steps, repeat):
    """Run each step once (warm-up), then `repeat` rounds of all steps in turn; returns
    [(min, median)] seconds per step."""
    for s in steps:
        s()
    ts = [[] for _ in steps]
    for _ in range(repeat):
        for s, t in zip(steps, ts):
            t0 = time.perf_counter()
            s()
            t.append(time.perf_counter() - t0)
    return [(min(t), statistics.median(t)) for t in ts]


def racedit_step(name, size, B, aux=False):
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
    return step


def torch_step(name, size, B, compile=False):
    """One PyTorch forward+backward step; compile: torch.compile the whole dense model, or
    for MoE models every dense region (each block's attention and adaLN, the embedders'
    MLPs, the final layer; the expert loop's data-dependent shapes stay eager)."""
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
    fwd = net
    if compile and not c.is_moe:
        fwd = torch.compile(net)
    elif compile:
        for blk in net.blocks:
            blk.attn = torch.compile(blk.attn)
            blk.adaLN_modulation = torch.compile(blk.adaLN_modulation)
        net.final_layer = torch.compile(net.final_layer)
    x = torch.randn(B, 4, size, size)
    t = torch.randint(0, 1000, (B,))
    y = torch.randint(0, 1000, (B,))
    dout = torch.randn(B, 4, size, size)

    def step():
        net.zero_grad(set_to_none=False)
        (fwd(x, t, y) * dout).sum().backward()
    return step


ATTN_ITERS = 10


def attention_steps(B, L):
    """Attention forward+backward (NH=6, D=384), ATTN_ITERS times per step, in both
    threading modes: OpenMP over the (b, h) pairs with a single-threaded BLAS (set once
    per step, as the model sets it once per pass), or the pairs in turn with a threaded
    BLAS."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    qkv = rng.normal(size=(B, L, 3 * 384)).astype(np.float32)
    out, att = _C.dit_attention_forward(qkv, 6)

    def iters():
        for _ in range(ATTN_ITERS):
            _C.dit_attention_forward(qkv, 6)
            _C.dit_attention_backward(out, qkv, att, 6)

    def run(mode):
        prev = _C.moe_threading(mode)
        try:
            if mode == "omp":
                with threadpool_limits(1, "blas"):
                    iters()
            else:
                iters()
        finally:
            _C.moe_threading(prev)
    return [lambda: run("omp"), lambda: run("blas")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--configs", default="DiT-S/2,RaceDiT-S/2-2in8")
    ap.add_argument("--sizes", default="16,32")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile of the PyTorch model (compiles for ~1 min per row)")
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
        have_tpc = True
    except ImportError:
        blas, have_tpc = "threadpoolctl not installed", False
    print(f"racedit: OpenMP {info['openmp']} ({info['num_threads']} threads), {info['blas']}; "
          f"BLAS pools: {blas}; threading mode {_C.moe_threading()}")
    if have_torch:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if have_tpc:
        for L in (64, 256):
            (o, _), (b, _) = alternate(attention_steps(args.batch, L), args.repeat)
            print(f"attention fwd+bwd B={args.batch} NH=6 D=384 L={L} (min): OpenMP over (b,h) "
                  f"{o / ATTN_ITERS * 1e3:.1f} ms, BLAS-threaded products "
                  f"{b / ATTN_ITERS * 1e3:.1f} ms")
    print(f"batch {args.batch}, {args.repeat} alternating steps, forward+backward, seconds (min / median)")
    comp = have_torch and args.compile
    print(f"{'model':20s} {'latent':>9s} {'L':>4s} {'racedit':>15s} {'torch':>15s} {'ratio':>6s}"
          + (f" {'torch.compile':>15s} {'ratio':>6s}" if comp else ""))
    for name in args.configs.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            L = (size // get_config(name).patch) ** 2
            steps = [racedit_step(name, size, args.batch)]
            if have_torch:
                steps.append(torch_step(name, size, args.batch))
            if comp:
                steps.append(torch_step(name, size, args.batch, compile=True))
            r = alternate(steps, args.repeat)       # the first (warm-up) call compiles
            ours = f"{r[0][0]:6.3f} / {r[0][1]:6.3f}"
            theirs, ratio = "n/a", float("nan")
            if have_torch:
                theirs, ratio = f"{r[1][0]:6.3f} / {r[1][1]:6.3f}", r[0][0] / r[1][0]
            extra = f" {r[2][0]:6.3f} / {r[2][1]:6.3f} {r[0][0] / r[2][0]:6.2f}" if comp else ""
            print(f"{name:20s} {size:>2d}x{size:<2d}x4 {L:4d} {ours:>15s} {theirs:>15s} {ratio:6.2f}"
                  + extra, flush=True)
    for name in args.configs.split(","):
        if get_config(name).is_moe:
            for size in (int(s) for s in args.sizes.split(",")):
                (mn, md), = alternate([racedit_step(name, size, args.batch, aux=True)], args.repeat)
                print(f"{name + ' +PLR+sim':20s} {size:>2d}x{size:<2d}x4 {(size // 2) ** 2:4d} "
                      f"{mn:6.3f} / {md:6.3f}")


if __name__ == "__main__":
    main()
