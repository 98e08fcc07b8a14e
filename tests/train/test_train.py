"""The training loop on the real model and the built-in data: the loss goes down, resuming
equals the uninterrupted run bit for bit, NaN/Inf stops training naming the step and the
layer, run folders, sampling from checkpoints, and bad settings."""
import io
import json
import os

import numpy as np
import pytest

import racedit
from racedit import data
from racedit.checkpoint import load_checkpoint
from racedit.train import TrainingDiverged, train

TINY_MOE = dict(depth=2, hidden=32, heads=2, patch=4, num_experts=4, k=2, expert_hidden=64)
TINY_DENSE = dict(depth=2, hidden=32, heads=2, patch=4)


def _run(tmp_path, steps, model="RaceDiT-tiny/4-2in4", mc=TINY_MOE, **kw):
    args = dict(model_config=mc, steps=steps, global_batch_size=8, num_samples=64, lr=1e-3,
                results_dir=str(tmp_path / "results"), log_every=5, progress=False,
                final_samples=False, report=False, out=io.StringIO(), ema_decay=0.9)
    args.update(kw)
    return train(model, **args)


def test_loss_decreases(tmp_path):
    res = _run(tmp_path, 60, objective="flow", warmup_steps=5, num_samples=256)
    losses = np.array([r["loss"] for r in res.log])
    assert len(losses) == 60 and np.all(np.isfinite(losses))
    assert losses[-15:].mean() < 0.8 * losses[:5].mean(), losses


def test_log_records(tmp_path):
    res = _run(tmp_path, 4, warmup_steps=4)
    with open(os.path.join(res.run_dir, "log.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    r = recs[-1]
    for key in ("loss", "diffusion", "mse", "plr", "sim", "balance", "aux", "grad_norm", "lr",
                "images_per_s", "max_violation", "combination_usage", "dead_experts",
                "ept_by_t", "attn_norm", "ffn_norm"):
        assert key in r, key
    assert len(r["attn_norm"]) == len(r["ffn_norm"]) == TINY_MOE["depth"]
    assert all(v >= 0 for v in r["attn_norm"] + r["ffn_norm"])
    assert r["loss"] == pytest.approx(r["diffusion"] + r["aux"])
    assert len(r["max_violation"]) == TINY_MOE["depth"]
    assert [x["lr"] for x in recs] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # warm-up
    assert sum(1 for _ in r["ept_by_t"]) >= 1
    cfg = json.load(open(os.path.join(res.run_dir, "config.json")))
    assert cfg["steps"] == 4 and cfg["model_config"] == TINY_MOE


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_resume_equals_uninterrupted(tmp_path, objective):
    full = _run(tmp_path / "a", 10, objective=objective, ckpt_every=4, grad_clip=0.5,
                warmup_steps=3, hflip=True)
    ck = os.path.join(full.run_dir, "checkpoints", "0000004.safetensors")
    assert os.path.exists(ck)
    again = train(resume=ck, progress=False, final_samples=False, report=False, out=io.StringIO())
    assert again.run_dir == full.run_dir
    la = [r["loss"] for r in full.log]
    lb = [r["loss"] for r in again.log]
    assert lb == la  # exact, every step (steps 1-4 from the log, 5-10 recomputed)
    np.testing.assert_array_equal(again.model.param_buffer, full.model.param_buffer)
    np.testing.assert_array_equal(again.ema, full.ema)
    np.testing.assert_array_equal(again.model.thresholds, full.model.thresholds)


def test_resume_extends_steps(tmp_path):
    a = _run(tmp_path, 3)
    b = train(resume=a.checkpoint, steps=5, progress=False, final_samples=False, report=False,
              out=io.StringIO())
    assert [r["step"] for r in b.log] == [1, 2, 3, 4, 5]
    t, meta = load_checkpoint(b.checkpoint)
    assert meta["step"] == 5 and meta["config"]["steps"] == 5


def test_nan_stops_with_step_and_layer(tmp_path):
    x, y = data.make_shapes(16, 0)
    xf = x.astype(np.float32) / 127.5 - 1
    ds = data.ArrayDataset(xf, y, 10, data.SHAPE_CLASSES)
    ds.x[3, 0, 5, 5] = np.nan  # after the constructor, which refuses NaN data
    with pytest.raises(TrainingDiverged, match=r"step 1: .*input batch holds NaN.*x_embedder"):
        _run(tmp_path, 3, dataset=ds, global_batch_size=16)
    with pytest.raises(TrainingDiverged, match=r"step 1: loss is nan.*input batch holds NaN"):
        _run(tmp_path / "dense", 3, dataset=ds, global_batch_size=16, model="DiT-tiny/4",
             mc=TINY_DENSE)


def test_nan_in_parameters_is_named(tmp_path):
    res = _run(tmp_path, 1, mc=TINY_DENSE, model="DiT-tiny/4")
    name = next(n for n in res.model.params if n.startswith("blocks.1.attn"))
    res.model.params[name].flat[0] = np.inf
    from racedit.train import _Trainer

    tr = _Trainer(res.config, res.dataset, res.model, res.run_dir, False, io.StringIO())
    with pytest.raises(TrainingDiverged, match=r"step 1: .*first non-finite parameter in blocks\.1\.attn"):
        tr.train_step()


def test_run_folders_are_numbered(tmp_path):
    a = _run(tmp_path, 1)
    b = _run(tmp_path, 1, model="DiT-tiny/4", mc=TINY_DENSE)
    assert os.path.basename(a.run_dir) == "000-RaceDiT-tiny-4-2in4"
    assert os.path.basename(b.run_dir) == "001-DiT-tiny-4"
    for d in ("checkpoints", "samples"):
        assert os.path.isdir(os.path.join(a.run_dir, d))


def test_dense_learn_sigma_ddpm_and_sampling(tmp_path):
    res = _run(tmp_path, 3, model="DiT-tiny/4", mc=TINY_DENSE, learn_sigma=True,
               objective="ddpm", final_samples=True, sampler="ddim", num_sampling_steps=3)
    assert res.model.out_channels == 6
    assert "vb" in res.log[-1] and np.isfinite(res.log[-1]["vb"])
    assert os.path.exists(os.path.join(res.run_dir, "samples", "0000003.png"))


def test_sample_from_checkpoint(tmp_path):
    res = _run(tmp_path, 2, objective="flow")
    out = str(tmp_path / "g.png")
    s = racedit.sample(res.checkpoint, class_labels="1,2,3", sampler="euler",
                       num_sampling_steps=2, out=out, npz=True, progress=False,
                       stream=io.StringIO())
    assert s.samples.shape == (3, 3, 32, 32) and s.labels.tolist() == [1, 2, 3]
    assert np.all(np.abs(s.samples) <= 1)
    assert os.path.exists(out) and os.path.exists(s.npz)
    z = np.load(s.npz)
    assert z["arr_0"].shape == (3, 32, 32, 3) and z["arr_0"].dtype == np.uint8
    again = racedit.sample(res.checkpoint, class_labels=[1, 2, 3], sampler="euler",
                           num_sampling_steps=2, out=out, progress=False, stream=io.StringIO())
    np.testing.assert_array_equal(again.samples, s.samples)  # seeded
    with pytest.raises(ValueError, match="sampler"):
        racedit.sample(res.checkpoint, sampler="ddim", progress=False, stream=io.StringIO())
    with pytest.raises(ValueError, match="labels"):
        racedit.sample(res.checkpoint, class_labels=[10], progress=False, stream=io.StringIO())


def test_sample_uses_ema_and_restores_weights(tmp_path):
    from racedit.diffusion import make_objective
    from racedit.sample import generate

    res = _run(tmp_path, 3, objective="flow")
    m = res.model
    live = m.param_buffer.copy()
    obj = make_objective("flow")
    a = generate(m, obj, [0, 1], weights=res.ema, sampler="euler", num_steps=2, progress=False)
    np.testing.assert_array_equal(m.param_buffer, live)
    assert m.training
    b = generate(m, obj, [0, 1], sampler="euler", num_steps=2, progress=False)
    assert not np.array_equal(a, b)  # EMA weights differ from the live ones


def test_latent_model_writes_npy_and_hint(tmp_path):
    r = np.random.default_rng(0)
    ds = data.ArrayDataset(r.standard_normal((16, 4, 8, 8)).astype(np.float32),
                           np.arange(16) % 3, kind="latents", source="mem")
    res = _run(tmp_path, 2, dataset=ds, objective="flow")
    buf = io.StringIO()
    s = racedit.sample(res.checkpoint, class_labels=[0, 2], sampler="euler",
                       num_sampling_steps=2, progress=False, stream=buf)
    assert s.png is None and s.npy and np.load(s.npy).shape == (2, 4, 8, 8)
    assert "AutoencoderKL" in buf.getvalue() and "0.18215" in buf.getvalue()


def test_routing_report(tmp_path):
    res = _run(tmp_path, 3, report=True)
    rep = json.load(open(os.path.join(res.run_dir, "routing_report-0000003.json")))
    assert len(rep["eval"]["experts_per_token"]) == 10
    assert len(rep["eval"]["load_share"]) == TINY_MOE["depth"]
    for part in ("eval", "train"):
        bn = rep[part]["branch_norms"]
        assert len(bn["attn"]) == len(bn["ffn"]) == TINY_MOE["depth"]
    assert os.path.getsize(os.path.join(res.run_dir, "routing_report-0000003.png")) > 1000
    assert res.report == os.path.join(res.run_dir, "routing_report-0000003.json")


def test_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="objective"):
        _run(tmp_path, 1, objective="edm")
    with pytest.raises(TypeError, match="unknown settings"):
        _run(tmp_path, 1, learning_rate=1.0)
    with pytest.raises(ValueError, match="preset"):
        train(preset="huge")
    with pytest.raises(ValueError, match="global_batch_size 100 exceeds"):
        _run(tmp_path, 1, global_batch_size=100)
    with pytest.raises(data.DataError, match="nowhere"):
        _run(tmp_path, 1, data="folder", data_path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown model"):
        _run(tmp_path, 1, model="DiT-Q/9", mc=None)
    assert not os.path.exists(tmp_path / "results")  # nothing created before the checks
