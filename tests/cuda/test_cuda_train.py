"""Training and sampling on the GPU (``--device cuda``): the tiny preset's 20 steps on the
GPU against the CPU with the same seed, exact resume on the GPU, GPU checkpoints on the CPU,
the CLI; skipped without a GPU. Without one, ``--device cuda`` must fail with a clear
message (that test is skipped when a GPU is present).

Tolerances: fp32 (TF32 off) starts from identical weights and batches, so the first loss
agrees to 1e-3 and the rest, where rounding differences compound through AdamW and can
flip a near-tied routing choice, to 2% per step; bf16 expert GEMMs (8-bit mantissas, fp32
accumulation) to 10% per step."""
import glob
import importlib.util
import io
import os

import numpy as np
import pytest
from _subproc import run_python

import racedit
from racedit.train import model_from_checkpoint, train

HAVE_GPU = racedit.cuda_available()
# checkpoints need safetensors, sample grids Pillow (the trainer's own dependencies)
MISSING = [m for m in ("safetensors", "PIL") if importlib.util.find_spec(m) is None]
gpu = pytest.mark.skipif(not HAVE_GPU or bool(MISSING),
                         reason="no CUDA device (or racedit built without CUDA)" if not HAVE_GPU
                         else f"training needs {MISSING}, not installed")


def _tiny(tmp_path, device, **kw):
    args = dict(preset="tiny", results_dir=str(tmp_path / "results"), progress=False,
                final_samples=False, report=False, out=io.StringIO(), device=device)
    args.update(kw)
    return train(**args)


def _losses(res):
    return np.array([r["loss"] for r in res.log])


@gpu
@pytest.mark.parametrize("precision,rtol", [("fp32", 0.02), ("bf16", 0.10)])
def test_cuda_loss_curve_matches_cpu(tmp_path, precision, rtol):
    cpu = _tiny(tmp_path / "cpu", "cpu")
    dev = _tiny(tmp_path / "dev", "cuda", precision=precision)
    lc, lg = _losses(cpu), _losses(dev)
    assert lc.shape == lg.shape == (20,)
    assert np.all(np.isfinite(lg))
    if precision == "fp32":
        np.testing.assert_allclose(lg[0], lc[0], rtol=1e-3)
    np.testing.assert_allclose(lg, lc, rtol=rtol)
    r = dev.log[-1]
    for key in ("grad_norm", "lr", "plr", "sim", "aux", "max_violation", "ept_by_t",
                "images_per_s"):
        assert key in r, key
    assert r["grad_norm"] > 0 and np.isfinite(r["grad_norm"])
    # the EMA came back from the device and differs from the live weights
    assert dev.ema.shape == (dev.model.num_params(),)
    assert not np.array_equal(dev.ema, dev.model.param_buffer)


@gpu
def test_cuda_resume_is_exact_and_loads_on_cpu(tmp_path):
    kw = dict(steps=8, ckpt_every=4, grad_clip=0.5, warmup_steps=3)
    full = _tiny(tmp_path, "cuda", **kw)
    ck = os.path.join(full.run_dir, "checkpoints", "0000004.safetensors")
    again = train(resume=ck, progress=False, final_samples=False, report=False,
                  out=io.StringIO())  # the checkpoint's device: cuda
    assert again.model.device == "cuda"
    assert _losses(again).tolist() == _losses(full).tolist()  # bit for bit
    np.testing.assert_array_equal(again.ema, full.ema)
    # on the CPU: the same weights, and training goes on from them
    m_cpu, meta = model_from_checkpoint(full.checkpoint)
    assert meta["device"] == "cuda"
    np.testing.assert_array_equal(m_cpu.param_buffer, full.ema)
    m_dev, _ = model_from_checkpoint(full.checkpoint, device="cuda")
    np.testing.assert_array_equal(m_dev.param_buffer, full.ema)
    np.testing.assert_array_equal(m_dev.thresholds, m_cpu.thresholds)
    on_cpu = train(resume=ck, device="cpu", progress=False, final_samples=False,
                   report=False, out=io.StringIO())
    np.testing.assert_allclose(_losses(on_cpu), _losses(full), rtol=0.02)
    # and a CPU checkpoint resumes on the GPU
    cpu = _tiny(tmp_path / "c", "cpu", **kw)
    ck = os.path.join(cpu.run_dir, "checkpoints", "0000004.safetensors")
    dev = train(resume=ck, device="cuda", progress=False, final_samples=False, report=False,
                out=io.StringIO())
    np.testing.assert_allclose(_losses(dev), _losses(cpu), rtol=0.02)


def _cli(*args, cwd):
    return run_python(["-m", "racedit", *args], cwd=cwd, capture_output=True, text=True,
                      timeout=300)


@gpu
def test_cuda_cli_train_and_sample(tmp_path):
    p = _cli("train", "--preset", "tiny", "--device", "cuda", "--precision", "bf16",
             "--steps", "3", "--num-samples", "40", "--no-progress", "--results-dir", "res",
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "on cuda (bf16)" in p.stdout
    ck = sorted(glob.glob(str(tmp_path / "res" / "*" / "checkpoints" / "*.safetensors")))
    assert ck
    p = _cli("sample", "--ckpt", ck[-1], "--device", "cuda", "--num-sampling-steps", "2",
             "--class-labels", "0,1,2", "--out", "s.png", "--no-progress", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert os.path.exists(tmp_path / "s.png")


@pytest.mark.skipif(HAVE_GPU, reason="a CUDA device is present")
def test_device_cuda_without_gpu_is_a_clear_error(tmp_path):
    why = "built without CUDA" if not racedit.build_info()["cuda"] else "no CUDA device"
    with pytest.raises(ValueError, match="--device cuda.*CUDA not available") as e:
        _tiny(tmp_path, "cuda", steps=1)
    assert why in str(e.value)
    assert not os.path.exists(tmp_path / "results")  # nothing started
    p = _cli("train", "--preset", "tiny", "--steps", "1", "--device", "cuda",
             "--results-dir", "res", cwd=tmp_path)
    assert p.returncode == 2
    assert "--device cuda" in p.stderr and "CUDA not available" in p.stderr and why in p.stderr
    assert "Traceback" not in p.stderr
    p = _cli("sample", "--ckpt", "missing.safetensors", "--device", "cuda", cwd=tmp_path)
    assert p.returncode == 2
    assert "--device cuda" in p.stderr and "CUDA not available" in p.stderr
    with pytest.raises(ValueError, match="--device cuda.*CUDA not available"):
        racedit.sample("missing.safetensors", device="cuda")
