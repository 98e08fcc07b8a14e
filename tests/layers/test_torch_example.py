"""examples/torch_dit_racemoe.py (a plain PyTorch DiT with its MLPs swapped for RaceMoE,
trained with AdamW) runs, and the benchmark's PyTorch-native layer computes what RaceMoE
computes (so the benchmark compares the same routing)."""
import importlib.util
import math
import os

import pytest

torch = pytest.importorskip("torch")

from racedit.torch import RaceMoE  # noqa: E402
from _subproc import run_python  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_example_trains_a_few_adamw_steps():
    r = run_python([os.path.join(ROOT, "examples", "torch_dit_racemoe.py"), "--steps", "3",
                    "--batch", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("step")] == ["1", "2", "3"]
    first, last = (float(v) for v in lines[-1].split()[2::2])
    assert math.isfinite(first) and math.isfinite(last)


def _load_bench(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    path = os.path.join(ROOT, "benchmarks", "bench_torch_moe.py")
    spec = importlib.util.spec_from_file_location("bench_torch_moe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("gating", ["identity", "softmax"])
def test_benchmark_native_layer_equals_racemoe(gating, monkeypatch):
    bench = _load_bench(monkeypatch)
    torch.manual_seed(0)
    race = RaceMoE(16, 4, 2, gating=gating)
    native = bench.TorchNativeMoE(16, 4, 2, race.hidden, gating=gating)
    native.load_state_dict(race.state_dict())
    x = torch.randn(2, 8, 16)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [race(xs[0]), native(xs[1])]
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-4, atol=1e-5)
    for y in ys:
        y.pow(2).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)
    for name, p in race.named_parameters():
        torch.testing.assert_close(p.grad, getattr(native, name).grad, rtol=1e-4, atol=1e-5)


def test_benchmark_floor_products_are_the_layers(monkeypatch, capsys):
    """The floor's products are the layer's: router (N,D)x(D,D), gate (N,D)x(D,E) and the
    experts' two layers over N*k rows, each forward and both backward products; and a
    benchmark row prints the ratio with its floor."""
    bench = _load_bench(monkeypatch)
    calls = []
    real_mm = torch.mm

    def mm(a, b, out=None):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real_mm(a, b, out=out)

    step = bench.gemm_floor_step(2, 8, 16, 4, 2, 24, "cpu", False)
    monkeypatch.setattr(torch, "mm", mm)
    step()
    N, D, E, K, He = 16, 16, 4, 32, 24
    want = []
    for m, kk, n in ((N, D, D), (N, D, E), (K, D, He), (K, He, D)):
        want += [((m, kk), (kk, n)), ((m, n), (n, kk)), ((kk, m), (m, n))]
    assert calls == want
    monkeypatch.setattr(torch, "mm", real_mm)
    ratio = bench.bench("tiny", 2, 8, 16, 4, 2, 2, "cpu", False, False)
    assert ratio > 0 and " floor " in capsys.readouterr().out
