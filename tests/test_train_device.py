"""The trainer's device path (``train(..., device="cuda")``) on any machine: a stand-in for
CudaRaceDiT backed by the CPU RaceDiT (same interface: host-copy buffers, ``step`` returning
scalars, ``optimizer_step``, EMA and AdamW state held by the model) replaces the GPU model,
so the plumbing — lr schedule, clipping, EMA, log records, NaN stop, checkpoints in both
directions, resume, sampling with the EMA weights — is checked against the CPU path, which
it must reproduce bit for bit (the stand-in does the CPU's arithmetic)."""
import importlib
import io
import math
import os

import numpy as np
import pytest

import racedit
from racedit import optim
from racedit.diffusion import _mse
from racedit.model import RaceDiT
from racedit.train import TrainingDiverged, model_from_checkpoint, train

factory = importlib.import_module("racedit.factory")  # where the trainer builds its model

TINY_MOE = dict(depth=2, hidden=32, heads=2, patch=4, num_experts=4, k=2, expert_hidden=64)
TINY_DENSE = dict(depth=2, hidden=32, heads=2, patch=4)


class FakeDeviceRaceDiT:
    """CudaRaceDiT's interface over a CPU RaceDiT (the parameters, EMA and AdamW state
    live "on the device": the accessors hand out copies)."""

    device = "cuda"

    def __init__(self, *args, dtype="fp32", **kw):
        self._m = RaceDiT(*args, **kw)
        self.dtype = dtype
        n = self._m.param_buffer.size
        self._ema = self._m.param_buffer.copy()
        self._am, self._av = np.zeros(n, np.float32), np.zeros(n, np.float32)
        self._step = 0
        self.calls = {"step": 0, "optimizer_step": 0}

    def __getattr__(self, name):  # forward, backward, zero_grad, aux, layer_stats, ...
        return getattr(self.__dict__["_m"], name)

    @property
    def param_buffer(self):
        return self._m.param_buffer.copy()

    @property
    def grad_buffer(self):
        return self._m.grad_buffer.copy()

    @property
    def ema_buffer(self):
        return self._ema.copy()

    @property
    def thresholds(self):
        return self._m.thresholds

    @thresholds.setter
    def thresholds(self, v):
        self._m.thresholds = v

    def set_param_buffer(self, values, ema=False):
        self._m.param_buffer[...] = values
        if ema:
            self._ema[...] = values

    def set_ema_buffer(self, values):
        self._ema[...] = values

    def optimizer_state(self):
        return {"m": self._am.copy(), "v": self._av.copy(), "step": self._step}

    def load_optimizer_state(self, st):
        self._am[...] = st["m"]
        self._av[...] = st["v"]
        self._step = int(st["step"])

    def _opt(self, lr, betas, eps, weight_decay, max_grad_norm, ema_decay):
        m = self._m
        norm = optim.grad_norm(m.grad_buffer) if max_grad_norm > 0 else None
        if norm is not None and not math.isfinite(norm):
            raise ValueError(f"train_step: non-finite gradient norm {norm} (step skipped)")
        self._step += 1
        optim.adamw_step(m.param_buffer, m.grad_buffer, self._am, self._av, lr=lr,
                         step=self._step, beta1=betas[0], beta2=betas[1], eps=eps,
                         weight_decay=weight_decay,
                         grad_scale=optim.clip_scale(norm, max_grad_norm) if norm is not None else 1.0)
        if ema_decay is not None:
            optim.ema_update(self._ema, m.param_buffer, ema_decay)
        return {"grad_norm": norm, "step": self._step}

    def step(self, x, t, y, target, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
             max_grad_norm=0.0, ema_decay=0.9999, return_aux=True):
        self.calls["step"] += 1
        m = self._m
        m.zero_grad()
        moe = m.config.is_moe
        out = m.forward(x, t, y, plr_target=target if moe else None)
        C = target.shape[1]
        loss, d = _mse(out[:, :C], target)
        if out.shape[1] != C:
            d = np.concatenate([d, np.zeros_like(d)], axis=1)
        m.backward(d)
        r = self._opt(lr, betas, eps, weight_decay, max_grad_norm, ema_decay)
        r["loss"] = loss
        if return_aux and moe:
            r["aux_loss"] = float(m.aux_loss())
            r.update(m.aux())
        return r

    def optimizer_step(self, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                       max_grad_norm=0.0, ema_decay=0.9999):
        self.calls["optimizer_step"] += 1
        return self._opt(lr, betas, eps, weight_decay, max_grad_norm, ema_decay)


@pytest.fixture
def fake_cuda(monkeypatch):
    made = []

    def new_model(device, precision, *args, **kw):
        if device == "cuda":
            made.append(FakeDeviceRaceDiT(*args, dtype="bf16" if precision == "bf16" else "fp32", **kw))
            return made[-1]
        return RaceDiT(*args, **kw)

    monkeypatch.setattr(factory, "_require_cuda", lambda: None)
    monkeypatch.setattr(factory, "_new_model", new_model)
    tf = {"on": False, "calls": []}

    def tf32(on=None):
        was = tf["on"]
        if on is not None:
            tf["on"] = bool(on)
            tf["calls"].append(bool(on))
        return was

    import racedit.cuda
    monkeypatch.setattr(racedit.cuda, "tf32", tf32)
    return {"models": made, "tf32": tf}


def _run(tmp_path, steps, mc=TINY_MOE, model="RaceDiT-tiny/4-2in4", **kw):
    args = dict(model_config=mc, steps=steps, global_batch_size=8, num_samples=64, lr=1e-3,
                results_dir=str(tmp_path / "results"), log_every=5, progress=False,
                final_samples=False, report=False, out=io.StringIO(), ema_decay=0.9)
    args.update(kw)
    return train(model, **args)


def _losses(res):
    return [r["loss"] for r in res.log]


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_device_path_equals_cpu(tmp_path, fake_cuda, clip):
    kw = dict(objective="flow", warmup_steps=3, grad_clip=clip, weight_decay=0.01,
              log_layers_every_step=True)
    cpu = _run(tmp_path / "cpu", 6, **kw)
    dev = _run(tmp_path / "dev", 6, device="cuda", **kw)
    m = fake_cuda["models"][-1]
    assert m.calls == {"step": 6, "optimizer_step": 0}
    assert _losses(dev) == _losses(cpu)
    for a, b in zip(cpu.log, dev.log):
        assert a["lr"] == b["lr"] and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-12)
        for k in ("plr", "sim", "aux", "max_violation", "ept_by_t", "mse"):
            assert a[k] == b[k], k
    np.testing.assert_array_equal(dev.ema, cpu.ema)
    np.testing.assert_array_equal(dev.model.param_buffer, cpu.model.param_buffer)


def test_device_hybrid_loss_uses_optimizer_step(tmp_path, fake_cuda):
    kw = dict(objective="ddpm", learn_sigma=True, mc=TINY_DENSE, model="DiT-tiny/4")
    cpu = _run(tmp_path / "cpu", 4, **kw)
    dev = _run(tmp_path / "dev", 4, device="cuda", **kw)
    assert fake_cuda["models"][-1].calls == {"step": 0, "optimizer_step": 4}
    assert _losses(dev) == _losses(cpu)
    assert [r["vb"] for r in dev.log] == [r["vb"] for r in cpu.log]


def test_device_checkpoints_cross_devices(tmp_path, fake_cuda):
    kw = dict(objective="flow", ckpt_every=3, grad_clip=1.0, warmup_steps=2)
    full = _run(tmp_path / "a", 6, device="cuda", precision="bf16", **kw)
    assert fake_cuda["models"][-1].dtype == "bf16"
    assert fake_cuda["tf32"]["calls"] == [True, False]  # on for the run, restored after
    ck = os.path.join(full.run_dir, "checkpoints", "0000003.safetensors")
    _, meta = racedit.checkpoint.load_checkpoint(ck)
    assert meta["device"] == "cuda" and meta["precision"] == "bf16"
    # resumed on the device (the checkpoint's device by default), and on the CPU
    on_dev = train(resume=ck, progress=False, final_samples=False, report=False,
                   out=io.StringIO())
    assert isinstance(on_dev.model, FakeDeviceRaceDiT)
    assert _losses(on_dev) == _losses(full)
    on_cpu = train(resume=ck, device="cpu", progress=False, final_samples=False,
                   report=False, out=io.StringIO())
    assert isinstance(on_cpu.model, RaceDiT)
    assert _losses(on_cpu) == _losses(full)  # the stand-in computes as the CPU does
    # a CPU checkpoint resumes on the device
    cpu = _run(tmp_path / "c", 6, **kw)
    ck = os.path.join(cpu.run_dir, "checkpoints", "0000003.safetensors")
    dev = train(resume=ck, device="cuda", progress=False, final_samples=False, report=False,
                out=io.StringIO())
    assert isinstance(dev.model, FakeDeviceRaceDiT)
    assert _losses(dev) == _losses(cpu)
    np.testing.assert_array_equal(dev.ema, cpu.ema)
    # both devices rebuild the same sampling model (EMA weights, thresholds)
    m_cpu, _ = model_from_checkpoint(dev.checkpoint)
    m_dev, _ = model_from_checkpoint(dev.checkpoint, device="cuda")
    np.testing.assert_array_equal(m_dev.param_buffer, m_cpu.param_buffer)
    np.testing.assert_array_equal(m_cpu.param_buffer, dev.ema)
    np.testing.assert_array_equal(m_dev.thresholds, m_cpu.thresholds)


def test_device_sampling_and_report_use_the_ema(tmp_path, fake_cuda):
    res = _run(tmp_path, 4, device="cuda", objective="flow", final_samples=True, report=True,
               sampler="euler", num_sampling_steps=2, num_samples=40)
    m = res.model
    assert os.path.exists(os.path.join(res.run_dir, "samples", "0000004.png"))
    live = m.param_buffer
    assert not np.array_equal(live, res.ema)
    from racedit.sample import generate, sample
    obj = racedit.diffusion.make_objective("flow")
    labels = np.arange(3)
    a = generate(m, obj, labels, weights=res.ema, num_steps=2, sampler="euler", progress=False)
    np.testing.assert_array_equal(m.param_buffer, live)  # live weights restored
    cpu, _ = model_from_checkpoint(res.checkpoint)
    b = generate(cpu, obj, labels, num_steps=2, sampler="euler", progress=False)
    np.testing.assert_array_equal(a, b)
    s = sample(res.checkpoint, class_labels="0,1", device="cuda", num_sampling_steps=2,
               progress=False, stream=io.StringIO(), out=str(tmp_path / "s.png"))
    assert s.samples.shape[0] == 2 and os.path.exists(s.png)


def test_device_nan_stops_naming_step_and_layer(tmp_path, fake_cuda, monkeypatch):
    orig = FakeDeviceRaceDiT.step

    def poisoned(self, *a, **kw):
        if self._step == 2:  # the third step: a NaN weight in the final layer
            w = self._m.params["final_layer.linear.weight"]
            w.flat[0] = np.nan
        return orig(self, *a, **kw)

    monkeypatch.setattr(FakeDeviceRaceDiT, "step", poisoned)
    with pytest.raises(TrainingDiverged, match=r"step 3.*final_layer\.linear\.weight"):
        _run(tmp_path, 5, device="cuda", objective="flow")


def test_device_errors(tmp_path):
    with pytest.raises(ValueError, match="precision 'bf16'.*--device cuda"):
        _run(tmp_path, 1, precision="bf16")
    with pytest.raises(ValueError, match="device: expected"):
        _run(tmp_path, 1, device="tpu")
    with pytest.raises(ValueError, match="precision: expected"):
        _run(tmp_path, 1, device="cpu", precision="fp16")


def test_cuda_checkpoint_resume_without_gpu_says_how(tmp_path, fake_cuda, monkeypatch):
    res = _run(tmp_path, 3, device="cuda", objective="flow", ckpt_every=2)
    ck = os.path.join(res.run_dir, "checkpoints", "0000002.safetensors")

    def no_gpu():
        raise RuntimeError("CUDA not available: racedit was built without CUDA (test)")

    monkeypatch.setattr(factory, "_require_cuda", no_gpu)
    with pytest.raises(ValueError, match=r"--device cuda.*CUDA not available.*--device cpu"):
        train(resume=ck, progress=False, final_samples=False, report=False, out=io.StringIO())
    again = train(resume=ck, device="cpu", progress=False, final_samples=False, report=False,
                  out=io.StringIO())
    assert _losses(again) == _losses(res)
