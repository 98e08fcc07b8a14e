"""racedit.torch.RaceMoE on CUDA tensors: the same outputs, selection and gradients as on
the CPU (racedit's CUDA kernels on the tensors' device memory), on a side stream of torch,
and under torch.autocast(bf16). Skipped without torch, a GPU, or a racedit built with CUDA."""
import pytest

torch = pytest.importorskip("torch")

import racedit  # noqa: E402
from racedit.torch import PARAM_NAMES, RaceMoE  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and racedit.cuda_available()),
    reason="needs torch with CUDA, a GPU and racedit built with CUDA")


def pair(**kw):
    torch.manual_seed(0)
    cpu = RaceMoE(32, 8, 2, **kw)
    with torch.no_grad():
        for name in ("router_b", "gate_b", "b1", "b2"):
            getattr(cpu, name).normal_(0, 0.1)
    gpu = RaceMoE(32, 8, 2, **kw).cuda()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


def same_routing(cpu, gpu):
    """The CPU and GPU routers round differently: selections agree except at near-ties,
    which these seeds do not have."""
    return torch.equal(cpu.aux["mask"], gpu.aux["mask"].cpu())


def run(m, x, target=None):
    x = x.clone().requires_grad_()
    y = m(x, target)
    ((y * y).sum() + m.aux_loss).backward()
    return y, x.grad


@pytest.mark.parametrize("side_stream", [False, True])
def test_cuda_matches_cpu(side_stream):
    cpu, gpu = pair(sim_weight=0.05, balance_weight=0.1, plr_dim=4)
    x = torch.randn(3, 16, 32)
    t = torch.randn(3, 16, 4)
    y0, dx0 = run(cpu, x, t)
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    with torch.cuda.stream(stream):
        y1, dx1 = run(gpu, x.cuda(), t.cuda())
    torch.cuda.synchronize()
    assert same_routing(cpu, gpu)
    torch.testing.assert_close(y1.cpu(), y0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx1.cpu(), dx0, rtol=1e-4, atol=1e-4)
    for name, p in cpu.named_parameters():
        torch.testing.assert_close(getattr(gpu, name).grad.cpu(), p.grad, rtol=1e-4, atol=1e-4)
    assert float(gpu.threshold) == pytest.approx(float(cpu.threshold), abs=1e-5)
    assert gpu._flat.is_cuda and all(getattr(gpu, n).grad.is_cuda for n in PARAM_NAMES)


def test_cuda_eval_routes_by_the_threshold_of_training():
    cpu, gpu = pair()
    x = torch.randn(2, 16, 32)
    run(cpu, x), run(gpu, x.cuda())
    cpu.eval(), gpu.eval()
    with torch.no_grad():
        y0, y1 = cpu(x), gpu(x.cuda())
    assert same_routing(cpu, gpu)
    torch.testing.assert_close(y1.cpu(), y0, rtol=1e-4, atol=1e-4)


def test_bf16_autocast():
    cpu, gpu = pair()
    x = torch.randn(2, 16, 32)
    y0, _ = run(cpu, x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y1, dx1 = run(gpu, x.cuda().bfloat16())
    assert y1.dtype == torch.float32 and torch.isfinite(dx1).all()
    assert same_routing(cpu, gpu)  # the routing stays fp32
    torch.testing.assert_close(y1.cpu(), y0, rtol=3e-2, atol=3e-2)


def test_device_mismatch_raises():
    _, gpu = pair()
    with pytest.raises(RuntimeError, match="same device"):
        gpu(torch.randn(1, 2, 32))
