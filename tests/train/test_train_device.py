"""The one training path on a device whose memory the host must not touch, on any machine:
the checking backend (``device="check"``: the CPU kernels behind a guarded pool that
refuses every pointer it did not hand out, with data crossing only by upload / download).
A run there must equal the CPU run bit for bit — log records, parameters, EMA, AdamW
moments, thresholds — whatever the objective (the fused step for the MSE losses, the
forward / host loss / backward / optimizer step of DiT's hybrid loss), and checkpoints,
resuming, fine-tuning, the NaN stop, sampling and the routing report must work across
devices; the pool must have seen no misuse."""
import io
import os

import numpy as np
import pytest
from _numerics import moved
from _subproc import run_cli
from test_train import TINY_DENSE, _run

import racedit
from racedit.checkpoint import load_checkpoint, save_checkpoint
from racedit.train import TrainingDiverged, model_from_checkpoint, train

pytestmark = pytest.mark.usefixtures("clean_check_pool")


def _records(res):
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in res.log]


def _same_tensors(a, b):
    ta, _ = load_checkpoint(a)
    tb, _ = load_checkpoint(b)
    assert set(ta) == set(tb)
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


@pytest.mark.parametrize("kw", [
    dict(objective="flow", warmup_steps=3, grad_clip=0.5, weight_decay=0.01,
         log_layers_every_step=True),
    dict(objective="ddpm", grad_clip=0.0, hflip=True),
    dict(objective="ddpm", learn_sigma=True, mc=TINY_DENSE, model="DiT-tiny/4"),
    dict(objective="flow", learn_sigma=True, routing="token", gating="softmax"),
], ids=["flow-moe-clip", "ddpm-moe", "ddpm-hybrid-dense", "flow-sigma-token"])
def test_check_device_equals_cpu(tmp_path, kw):
    cpu = _run(tmp_path / "cpu", 6, **kw)
    dev = _run(tmp_path / "dev", 6, device="check", **kw)
    assert dev.model.device == "check"
    assert _records(dev) == _records(cpu)
    np.testing.assert_array_equal(dev.ema, cpu.ema)
    np.testing.assert_array_equal(dev.model.param_buffer, cpu.model.param_buffer)
    _same_tensors(dev.checkpoint, cpu.checkpoint)


@pytest.mark.parametrize("kw,per_step", [
    (dict(objective="flow"), ((4, 2 * 8 * 3 * 32 * 32 * 4 + 8 * 4 + 8 * 8), (0, 0))),
    (dict(objective="ddpm", learn_sigma=True),   # the (B, 2C, H, W) output down, its dout up
     ((5, 2 * 8 * 3 * 32 * 32 * 4 + 8 * 6 * 32 * 32 * 4 + 8 * 4 + 8 * 8),
      (1, 8 * 6 * 32 * 32 * 4))),
], ids=["fused", "host-loss"])
def test_a_training_step_moves_only_its_batch(tmp_path, kw, per_step):
    """Between its log records a MoE run moves, per step, its batch (x_t, t, y, the target)
    up and nothing down on the fused step; on the host-loss path the output down and its
    gradient up. The routing statistics kept every step (experts per token by timestep)
    are counted on the device, not read back as masks."""
    runs = [np.ravel(moved(lambda: _run(tmp_path / str(steps), steps, device="check",
                                          log_every=100, **kw))[1]) for steps in (3, 7)]
    assert (runs[1] - runs[0]).tolist() == (4 * np.ravel(per_step)).tolist()


def test_checkpoints_cross_devices(tmp_path):
    kw = dict(objective="flow", ckpt_every=3, grad_clip=1.0, warmup_steps=2)
    full = _run(tmp_path / "a", 6, device="check", **kw)
    ck = os.path.join(full.run_dir, "checkpoints", "0000003.safetensors")
    assert load_checkpoint(ck)[1]["device"] == "check"
    again = dict(progress=False, final_samples=False, report=False, out=io.StringIO())
    on_dev = train(resume=ck, **again)                  # the checkpoint's device by default
    assert on_dev.model.device == "check" and _records(on_dev) == _records(full)
    on_cpu = train(resume=ck, device="cpu", **again)
    assert on_cpu.model.device == "cpu" and _records(on_cpu) == _records(full)
    _same_tensors(on_cpu.checkpoint, full.checkpoint)
    cpu = _run(tmp_path / "c", 6, **kw)
    ck = os.path.join(cpu.run_dir, "checkpoints", "0000003.safetensors")
    dev = train(resume=ck, device="check", **again)
    _same_tensors(dev.checkpoint, cpu.checkpoint)
    # both devices rebuild the same sampling model (EMA weights, thresholds)
    m_cpu, _ = model_from_checkpoint(dev.checkpoint)
    m_dev, _ = model_from_checkpoint(dev.checkpoint, device="check")
    np.testing.assert_array_equal(m_dev.param_buffer, m_cpu.param_buffer)
    np.testing.assert_array_equal(m_cpu.param_buffer, dev.ema)
    np.testing.assert_array_equal(m_dev.thresholds, m_cpu.thresholds)


def test_init_from_starts_the_ema_at_the_weights(tmp_path):
    base = _run(tmp_path / "a", 3, objective="flow")
    dev = _run(tmp_path / "b", 2, objective="flow", init_from=base.checkpoint, device="check",
               ema_decay=1.0)
    np.testing.assert_array_equal(dev.ema, base.model.param_buffer)


def test_sampling_and_report_use_the_ema(tmp_path):
    res = _run(tmp_path, 4, device="check", objective="flow", final_samples=True, report=True,
               sampler="euler", num_sampling_steps=2, num_samples=40)
    m = res.model
    assert os.path.exists(os.path.join(res.run_dir, "samples", "0000004.png"))
    assert res.report and os.path.exists(res.report)
    live = m.param_buffer
    assert not np.array_equal(live, res.ema)
    from racedit.sample import generate, sample
    obj = racedit.diffusion.make_objective("flow")
    labels = np.arange(3)
    m.thresholds = load_checkpoint(res.checkpoint)[0]["ema_thresholds"]  # those of the EMA
    a = generate(m, obj, labels, weights=res.ema, num_steps=2, sampler="euler", progress=False)
    np.testing.assert_array_equal(m.param_buffer, live)  # live weights restored
    cpu, _ = model_from_checkpoint(res.checkpoint)
    b = generate(cpu, obj, labels, num_steps=2, sampler="euler", progress=False)
    np.testing.assert_array_equal(a, b)
    s = sample(res.checkpoint, class_labels="0,1", device="check", num_sampling_steps=2,
               progress=False, stream=io.StringIO(), out=str(tmp_path / "s.png"))
    assert s.samples.shape[0] == 2 and os.path.exists(s.png)


def test_nan_in_a_parameter_stops_naming_it(tmp_path):
    res = _run(tmp_path, 1, device="check", mc=TINY_DENSE, model="DiT-tiny/4")
    m = res.model
    off, shape = next((o, s) for n, o, s in m.layout if n == "final_layer.linear.weight")
    p = m.param_buffer
    p[off] = np.nan
    m.set_param_buffer(p)
    from racedit.train import _Trainer

    tr = _Trainer(res.config, res.dataset, m, res.run_dir, False, io.StringIO())
    with pytest.raises(TrainingDiverged, match=r"step 1: .*first non-finite parameter in "
                                               r"final_layer\.linear\.weight"):
        tr.train_step()


def test_device_errors(tmp_path):
    with pytest.raises(ValueError, match="precision 'bf16'.*--device cuda"):
        _run(tmp_path, 1, precision="bf16")
    with pytest.raises(ValueError, match="device: expected"):
        _run(tmp_path, 1, device="tpu")
    with pytest.raises(ValueError, match="precision: expected"):
        _run(tmp_path, 1, device="cpu", precision="fp16")


@pytest.mark.skipif(racedit.cuda_available(), reason="checks the error without a GPU")
def test_cuda_checkpoint_resume_without_gpu_says_how(tmp_path):
    res = _run(tmp_path, 3, objective="flow", ckpt_every=2)
    ck = os.path.join(res.run_dir, "checkpoints", "0000002.safetensors")
    tensors, meta = load_checkpoint(ck)
    save_checkpoint(ck, tensors, dict(meta, device="cuda"))   # as a GPU run writes it
    again = dict(progress=False, final_samples=False, report=False, out=io.StringIO())
    with pytest.raises(ValueError, match=r"--device cuda.*CUDA not available.*--device cpu"):
        train(resume=ck, **again)
    on_cpu = train(resume=ck, device="cpu", **again)
    assert _records(on_cpu) == _records(res)


@pytest.mark.skipif(racedit.cuda_available(), reason="a CUDA device is present")
def test_device_cuda_without_gpu_is_a_clear_error(tmp_path):
    why = "built without CUDA" if not racedit.build_info()["cuda"] else "no CUDA device"
    with pytest.raises(ValueError, match="--device cuda.*CUDA not available") as e:
        train(preset="tiny", steps=1, device="cuda", results_dir=str(tmp_path / "results"),
              progress=False, final_samples=False, report=False, out=io.StringIO())
    assert why in str(e.value)
    assert not os.path.exists(tmp_path / "results")  # nothing started
    p = run_cli("train", "--preset", "tiny", "--steps", "1", "--device", "cuda",
             "--results-dir", "res", cwd=tmp_path)
    assert p.returncode == 2
    assert "--device cuda" in p.stderr and "CUDA not available" in p.stderr and why in p.stderr
    assert "Traceback" not in p.stderr
    p = run_cli("sample", "--ckpt", "missing.safetensors", "--device", "cuda", cwd=tmp_path)
    assert p.returncode == 2
    assert "--device cuda" in p.stderr and "CUDA not available" in p.stderr
    with pytest.raises(ValueError, match="--device cuda.*CUDA not available"):
        racedit.sample("missing.safetensors", device="cuda")
