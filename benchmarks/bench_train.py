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
import resource
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


def _cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timeit(fns, repeat):
    """Times of each step function, run alternately (so a load change on the machine hits
    both alike) after one warm-up call each: per function (min wall, median wall, min
    process CPU seconds). On a busy machine the CPU time is the steadier measure."""
    for fn in fns:
        fn()  # warm-up: allocations, thread pools
    ts = [[] for _ in fns]
    cs = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0, c0 = time.perf_counter(), _cpu()
            fn()
            ts[i].append(time.perf_counter() - t0)
            cs[i].append(_cpu() - c0)
    return [(min(t), statistics.median(t), min(c)) for t, c in zip(ts, cs)]


def _latents(B, size, n_batches=4):
    r = np.random.default_rng(0)
    x = r.standard_normal((B * n_batches, 4, size, size)).astype(np.float32)
    return ArrayDataset(x, r.integers(0, 1000, B * n_batches), 1000, kind="latents", source="bench")


def racedit_step(name, B, size, aux):
    w = {} if aux else dict(plr_weight=0.0, sim_weight=0.0, balance_weight=0.0)
    cfg = TrainConfig(model=name, global_batch_size=B, steps=10 ** 9, grad_clip=1.0, **w)
    ds = _latents(B, size)
    m = build_model(cfg, 4, size, 1000)
    tr = _Trainer(cfg, ds, m, "/nonexistent", False, io.StringIO())
    if not aux:
        tr.is_moe = False  # no PLR target (and no routing diagnostics) in the comparison
    return tr.train_step


def torch_step(name, B, size):
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
    return step


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
          f"min / median of {args.repeat} (racedit and PyTorch steps alternate)")
    print(f"{'model':26s} {'racedit wall s':>15s} {'cpu s':>6s} {'img/s':>6s} "
          f"{'torch wall s':>15s} {'cpu s':>6s} {'img/s':>6s} {'ratio':>6s} {'cpu':>5s}")
    for name in args.configs.split(","):
        fns = [racedit_step(name, B, S, aux=False)]
        if have_torch:
            fns.append(torch_step(name, B, S))
        res = timeit(fns, args.repeat)
        rmin, rmed, rcpu = res[0]
        row = f"{name:26s} {rmin:7.3f}/{rmed:7.3f} {rcpu:6.2f} {B / rmin:6.1f}"
        if have_torch:
            tmin, tmed, tcpu = res[1]
            row += (f" {tmin:7.3f}/{tmed:7.3f} {tcpu:6.2f} {B / tmin:6.1f} {rmin / tmin:6.2f}"
                    f" {rcpu / tcpu:5.2f}")
        print(row, flush=True)
    for name in args.configs.split(","):
        if get_config(name).is_moe:
            (amin, amed, acpu), = timeit([racedit_step(name, B, S, aux=True)], args.repeat)
            print(f"{name + ' +PLR+sim':26s} {amin:7.3f}/{amed:7.3f} {acpu:6.2f} {B / amin:6.1f}",
                  flush=True)
    if have_torch:
        print("ratio = racedit / PyTorch minimum wall time (target <= 0.5); cpu = the same "
              "for process CPU time")


if __name__ == "__main__":
    main()
