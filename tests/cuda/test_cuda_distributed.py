"""Data parallel on the GPU (racedit.distributed): NCCL's all-reduce of the gradient buffer
through a world of one rank, and ``--grad-accum 2`` on the GPU against the CPU; skipped
without a GPU (the NCCL test also without NCCL in the build).

Tolerance: a dense model (no routing choice to flip) in fp32 from identical weights and
batches; the GPU sums the micro-batch gradients in its buffer and its GEMMs in another
order than the CPU, so parameters after 5 AdamW steps agree to 1e-3 absolute."""
import numpy as np
import pytest

import racedit
from racedit import _C
from racedit.model import RaceDiT
from racedit.train import train

HAVE_GPU = racedit.cuda_available()
gpu = pytest.mark.skipif(not HAVE_GPU, reason="no CUDA device (or racedit built without CUDA)")
nccl = pytest.mark.skipif(not (HAVE_GPU and _C.nccl_built()[0]),
                          reason="no CUDA device, or racedit built without NCCL")


@nccl
def test_nccl_allreduce_of_one_rank_scales_the_gradients():
    m = RaceDiT("DiT-T/2", input_size=8, in_channels=4, num_classes=10, device="cuda")
    g = np.random.default_rng(0).standard_normal(m.num_params()).astype(np.float32)
    m.set_grad_buffer(g)
    comm = _C.nccl_init(_C.nccl_unique_id(), 1, 0)
    _C.nccl_allreduce_grads(comm, m._model, 0.5)
    assert np.array_equal(m.grad_buffer, g * np.float32(0.5))


@nccl
def test_nccl_refuses_a_cpu_model():
    m = RaceDiT("DiT-T/2", input_size=8, in_channels=4, num_classes=10)
    comm = _C.nccl_init(_C.nccl_unique_id(), 1, 0)
    with pytest.raises(ValueError, match="expected a model on device 'cuda', got 'cpu'"):
        _C.nccl_allreduce_grads(comm, m._model, 1.0)


@gpu
def test_grad_accum_on_the_gpu_matches_the_cpu(tmp_path):
    kw = dict(preset="tiny", steps=5, global_batch_size=8, grad_accum=2, final_samples=False,
              report=False, progress=False, model_config=dict(num_experts=0))
    cpu = train(**kw, results_dir=str(tmp_path / "cpu"))
    gpu_run = train(**kw, device="cuda", results_dir=str(tmp_path / "gpu"))
    np.testing.assert_allclose(gpu_run.model.param_buffer, cpu.model.param_buffer, atol=1e-3)
    assert abs(gpu_run.log[0]["loss"] - cpu.log[0]["loss"]) < 1e-3 * abs(cpu.log[0]["loss"])
