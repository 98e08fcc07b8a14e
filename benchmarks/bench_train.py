"""Images per second of one whole training step — batch draw, noising, forward, loss,
backward, gradient norm and clipping, fused AdamW, EMA — for RaceDiT-S/2-2in8 and DiT-S/2
on 32x32x4 latents, batch 16 (racedit.train's own step function); with torch installed,
the ratio to a PyTorch eager implementation of the same step (tests/torch_dit.py's DiT,
torch.optim.AdamW, a foreach EMA), run in the same process with the same thread count.
Not a test.

    python3 benchmarks/bench_train.py [--repeat 5] [--batch 16] [--configs DiT-S/2,...]

The PyTorch MoE has no aux losses, so the comparison turns them off in racedit too
(PLR, similarity and balance weights 0); a last row times racedit with its defaults.
"""
import argparse
import io
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), os.path.join(HERE, "..", "tests")]

import racedit  # noqa: E402
from racedit.configs import get_config  # noqa: E402
from racedit.data import ArrayDataset  # noqa: E402
from racedit.train import TrainConfig, _Trainer, build_model  # noqa: E402


def timeit(fn, repeat):
    fn()  # warm-up: allocations, thread pools
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _latents(B, size, n_batches=4):
    r = np.random.default_rng(0)
    x = r.standard_normal((B * n_batches, 4, size, size)).astype(np.float32)
    return ArrayDataset(x, r.integers(0, 1000, B * n_batches), 1000, kind="latents", source="bench")


def bench_racedit(name, B, size, repeat, aux):
    w = {} if aux else dict(plr_weight=0.0, sim_weight=0.0, balance_weight=0.0)
    cfg = TrainConfig(model=name, global_batch_size=B, steps=10 ** 9, grad_clip=1.0, **w)
    ds = _latents(B, size)
    m = build_model(cfg, 4, size, 1000)
    tr = _Trainer(cfg, ds, m, "/nonexistent", False, io.StringIO())
    if not aux:
        tr.is_moe = False  # no PLR target (and no routing diagnostics) in the comparison
    return timeit(tr.train_step, repeat)


def bench_torch(name, B, size, repeat):
    import torch
    from torch_dit import DiT

    c = get_config(name)
    moe = (c.num_experts, c.k, c.expert_hidden) if c.is_moe else None
    torch.manual_seed(0)
    net = DiT(size, c.patch, 4, c.hidden, c.depth, c.heads, 1000, False, moe)
    params = [p for n, p in net.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0).float()
    x0 = torch.randn(B, 4, size, size)
    y = torch.randint(0, 1000, (B,))

    def step():
        t = torch.randint(0, 1000, (B,))
        noise = torch.randn_like(x0)
        a = ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.mse_loss(net(x_t, t, y), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(ema, 0.9999)
            torch._foreach_add_(ema, [p.detach() for p in params], alpha=1 - 0.9999)
    return timeit(step, repeat)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--configs", default="RaceDiT-S/2-2in8,DiT-S/2")
    args = ap.parse_args()
    threads = racedit.build_info()["num_threads"]
    try:
        import torch

        torch.set_num_threads(threads)
        have_torch = True
    except ImportError:
        have_torch = False
    B, S = args.batch, args.size
    print(f"one training step, batch {B}, {S}x{S}x4 latents, {threads} threads, "
          f"median of {args.repeat}")
    print(f"{'model':22s} {'racedit s':>10s} {'img/s':>8s} {'torch s':>9s} {'img/s':>8s} "
          f"{'ratio':>6s}")
    for name in args.configs.split(","):
        tr = bench_racedit(name, B, S, args.repeat, aux=False)
        row = f"{name:22s} {tr:10.3f} {B / tr:8.1f}"
        if have_torch:
            tt = bench_torch(name, B, S, args.repeat)
            row += f" {tt:9.3f} {B / tt:8.1f} {tr / tt:6.2f}"
        print(row, flush=True)
    for name in args.configs.split(","):
        if get_config(name).is_moe:
            ta = bench_racedit(name, B, S, args.repeat, aux=True)
            print(f"{name + ' +PLR+sim':22s} {ta:10.3f} {B / ta:8.1f}", flush=True)
    if have_torch:
        print("ratio = racedit step time / PyTorch step time (target <= 0.5)")


if __name__ == "__main__":
    main()
