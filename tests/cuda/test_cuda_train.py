"""Training and sampling on the GPU (``--device cuda``): the tiny preset's 20 steps on the
GPU against the CPU with the same seed, exact resume on the GPU, GPU checkpoints on the CPU,
the CLI; skipped without a GPU (tests/train/test_train_device.py checks the error then).

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
from _subproc import run_cli

from racedit.train import model_from_checkpoint, train

# checkpoints need safetensors, sample grids Pillow (the trainer's own dependencies)
MISSING = [m for m in ("safetensors", "PIL") if importlib.util.find_spec(m) is None]
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(bool(MISSING), reason=f"training needs {MISSING}, not installed")]


def _tiny(tmp_path, device, **kw):
    args = dict(preset="tiny", results_dir=str(tmp_path / "results"), progress=False,
                final_samples=False, report=False, out=io.StringIO(), device=device)
    args.update(kw)
    return train(**args)


def _losses(res):
    return np.array([r["loss"] for r in res.log])


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


def test_cuda_cli_train_and_sample(tmp_path):
    p = run_cli("train", "--preset", "tiny", "--device", "cuda", "--precision", "bf16",
             "--steps", "3", "--num-samples", "40", "--no-progress", "--results-dir", "res",
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "on cuda (bf16)" in p.stdout
    ck = sorted(glob.glob(str(tmp_path / "res" / "*" / "checkpoints" / "*.safetensors")))
    assert ck
    p = run_cli("sample", "--ckpt", ck[-1], "--device", "cuda", "--num-sampling-steps", "2",
             "--class-labels", "0,1,2", "--out", "s.png", "--no-progress", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert os.path.exists(tmp_path / "s.png")
