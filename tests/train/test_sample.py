"""Sampling at scale (racedit.sample): per-sample keyed noise (batch-size independence),
a bounded batch per model call, one progress bar only on a terminal, mass sampling into
resumable shards and a merged .npz, file names with the checkpoint step, PNG and .npz
agreement, run folders as --ckpt, a step-0 checkpoint, and bad settings."""
import importlib
import io
import os
import shutil

import numpy as np
import pytest
from _subproc import run_cli

import racedit
from racedit.diffusion import make_objective
from racedit.train import model_from_checkpoint

S = importlib.import_module("racedit.sample")  # the module (racedit.sample is the function)


def _train(root, steps=2, **kw):
    return racedit.train(preset="tiny", steps=steps, num_samples=40, results_dir=str(root),
                         progress=False, report=False, final_samples=False, out=io.StringIO(),
                         **kw)


@pytest.fixture(scope="module")
def flow_ckpt(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("flow")).checkpoint


@pytest.fixture(scope="module")
def ddpm_ckpt(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("ddpm"), objective="ddpm", sampler="ddpm",
                  num_sampling_steps=4).checkpoint


def _model(ckpt):
    m, meta = model_from_checkpoint(ckpt)
    return m, make_objective(meta["config"]["objective"])


def _quiet(**kw):
    return dict(progress=False, stream=io.StringIO(), **kw)


@pytest.fixture
def calls(monkeypatch):
    """Records the batch of every model evaluation; ``calls.stop_after = n`` interrupts the
    n+1-th (as a kill would)."""
    class Seen(list):
        stop_after = None

    seen = Seen()
    orig = S._denoise_fn

    def counting(model):
        fn = orig(model)

        def f(x, t, y):
            if seen.stop_after is not None and len(seen) >= seen.stop_after:
                raise KeyboardInterrupt
            seen.append(x.shape[0])
            return fn(x, t, y)
        return f

    monkeypatch.setattr(S, "_denoise_fn", counting)
    return seen


# ---- noise keyed per sample, bounded batch, progress -----------------------------------------

@pytest.mark.parametrize("which,sampler", [("ddpm", "ddpm"), ("flow", "heun")])
def test_samples_do_not_depend_on_the_batch_size(which, sampler, flow_ckpt, ddpm_ckpt):
    m, obj = _model(ddpm_ckpt if which == "ddpm" else flow_ckpt)
    labels = np.arange(7) % 10
    runs = [S.generate(m, obj, labels, sampler=sampler, num_steps=3, batch_size=b,
                       progress=False) for b in (None, 1, 3)]
    # equal up to fp32 rounding: the DiT layers' per-image bits can depend on the batch
    # size at the last ulp (the MoE routing and layer are batch-independent in eval)
    for r in runs[1:]:
        np.testing.assert_allclose(r, runs[0], rtol=0, atol=1e-5)
    # sample i is keyed (seed, i): a later call's sample 0 is the first one of this call
    one = S.generate(m, obj, labels[:1], sampler=sampler, num_steps=3, progress=False)
    np.testing.assert_allclose(one[0], runs[0][0], rtol=0, atol=1e-5)
    other = S.generate(m, obj, labels, sampler=sampler, num_steps=3, seed=1, progress=False)
    assert np.abs(other - runs[0]).max() > 1e-3


def test_default_batch_is_bounded(flow_ckpt, calls):
    m, obj = _model(flow_ckpt)
    n = 2 * S.DEFAULT_BATCH + 5
    S.generate(m, obj, np.arange(n) % 10, sampler="euler", num_steps=1, progress=False)
    # guidance doubles each batch: 3 calls of at most 2 * DEFAULT_BATCH
    assert calls == [2 * S.DEFAULT_BATCH, 2 * S.DEFAULT_BATCH, 10]
    calls.clear()
    S.generate(m, obj, np.arange(5) % 10, sampler="euler", num_steps=2, cfg_scale=1.0,
               batch_size=2, progress=False)
    assert calls == [2, 2, 2, 2, 1, 1]


def test_progress_bar_only_on_a_terminal(flow_ckpt, capsys):
    m, obj = _model(flow_ckpt)
    S.generate(m, obj, [0, 1, 2], sampler="heun", num_steps=2, batch_size=2)
    assert capsys.readouterr().err == ""          # stderr is not a terminal here
    S.generate(m, obj, [0, 1, 2], sampler="heun", num_steps=2, batch_size=2,
               progress="always")
    err = capsys.readouterr().err
    # one bar for everything: 2 batches x (2 heun steps = 3 model calls)
    assert "sample" in err and "6/6" in err and err.count("0/6") == 1


# ---- mass sampling -------------------------------------------------------------------------

def _mass(m, obj, path, labels, **kw):
    return S.generate_npz(m, obj, str(path), labels, sampler="euler", num_steps=2,
                          shard_size=4, batch_size=3, **_quiet(**kw))


def test_mass_sampling_matches_generate(flow_ckpt, tmp_path):
    m, obj = _model(flow_ckpt)
    labels = S.mass_labels(10, m.num_classes)
    path, man = _mass(m, obj, tmp_path / "s.npz", labels)
    z = np.load(path)
    x = S.generate(m, obj, labels, sampler="euler", num_steps=2, clip_denoised=True,
                   progress=False)
    np.testing.assert_array_equal(z["arr_0"], S.to_uint8(x))
    assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(z["labels"], labels)
    assert sorted(os.listdir(tmp_path / "s")) == ["manifest.json", "shard-00000.npz",
                                                  "shard-00001.npz", "shard-00002.npz"]
    assert man == str(tmp_path / "s" / "manifest.json")


def test_mass_sampling_resumes_after_an_interrupt(flow_ckpt, tmp_path, calls):
    m, obj = _model(flow_ckpt)
    labels = S.mass_labels(10, m.num_classes)
    whole, _ = _mass(m, obj, tmp_path / "whole.npz", labels)
    # shards of 4, 4, 2 images in batches of 3: 2, 2, 1 batches of 2 Euler steps each
    assert len(calls) == 10
    calls.clear()
    calls.stop_after = 5                      # dies inside the second shard
    with pytest.raises(KeyboardInterrupt):
        _mass(m, obj, tmp_path / "cut.npz", labels)
    assert sorted(os.listdir(tmp_path / "cut")) == ["manifest.json", "shard-00000.npz"]
    assert not os.path.exists(tmp_path / "cut.npz")
    calls.clear()
    calls.stop_after = None
    out = io.StringIO()
    S.generate_npz(m, obj, str(tmp_path / "cut.npz"), labels, sampler="euler", num_steps=2,
                   shard_size=4, batch_size=3, progress=False, stream=out)
    assert "1 of 3 shards present" in out.getvalue()
    assert len(calls) == 6                    # only shards 1 and 2 were sampled
    a, b = np.load(whole), np.load(tmp_path / "cut.npz")
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["labels"], b["labels"])


def test_mass_sampling_refuses_other_settings(flow_ckpt, tmp_path):
    m, obj = _model(flow_ckpt)
    labels = S.mass_labels(6, m.num_classes)
    _mass(m, obj, tmp_path / "s.npz", labels)
    with pytest.raises(ValueError, match="seed: 0 there, 1 now"):
        _mass(m, obj, tmp_path / "s.npz", labels, seed=1)
    with pytest.raises(ValueError, match="num_samples"):
        _mass(m, obj, tmp_path / "s.npz", S.mass_labels(7, m.num_classes))
    # a different batch size is the same samples: the run resumes (here: nothing to do)
    S.generate_npz(m, obj, str(tmp_path / "s.npz"), labels, sampler="euler", num_steps=2,
                   shard_size=4, batch_size=5, **_quiet())
    with pytest.raises(ValueError, match=r"path: expected a file name ending in \.npz"):
        _mass(m, obj, tmp_path / "s", labels)


def test_mass_labels():
    even = S.mass_labels(25, 10)
    assert np.bincount(even).tolist() == [3] * 5 + [2] * 5
    r = S.mass_labels(1000, 10, seed=3, random_labels=True)
    np.testing.assert_array_equal(r, S.mass_labels(1000, 10, seed=3, random_labels=True))
    assert r.min() == 0 and r.max() == 9 and not np.array_equal(r, S.mass_labels(1000, 10))
    assert not np.array_equal(r, S.mass_labels(1000, 10, seed=4, random_labels=True))
    with pytest.raises(ValueError, match="--num-samples"):
        S.mass_labels(0, 10)


# ---- files from a checkpoint -----------------------------------------------------------------

def test_png_and_npz_agree_and_carry_the_step(flow_ckpt):
    from PIL import Image

    res = racedit.sample(flow_ckpt, class_labels=[3, 1, 4], npz=True, batch_size=2, **_quiet())
    base = os.path.join(os.path.dirname(os.path.dirname(flow_ckpt)), "samples",
                        "sample-0000002-euler4-cfg4-seed0-y3_1_4")
    assert res.png == base + ".png" and res.npz == base + ".npz"
    z = np.load(res.npz)
    np.testing.assert_array_equal(z["arr_0"], S.to_uint8(res.samples))
    np.testing.assert_array_equal(z["labels"], [3, 1, 4])
    png = np.asarray(Image.open(res.png))
    for i in range(3):  # tile i of the grid: 2 pixels of padding, every pixel drawn 2x2
        x0 = 2 * (2 + i * 34)
        np.testing.assert_array_equal(png[4:68:2, x0:x0 + 64:2], z["arr_0"][i])
    # other labels, another per-class or the live weights: another file, nothing overwritten
    b = racedit.sample(flow_ckpt, class_labels=[3, 1, 5], **_quiet())
    c = racedit.sample(flow_ckpt, per_class=1, use_ema=False, **_quiet())
    assert len({res.png, b.png, c.png}) == 3
    assert c.png.endswith("sample-0000002-euler4-cfg4-seed0-x1-live.png")


def test_ckpt_may_be_a_run_folder(flow_ckpt, tmp_path):
    run = tmp_path / "run"
    os.makedirs(run / "checkpoints")
    for step in (2, 10, 9):
        shutil.copy(flow_ckpt, run / "checkpoints" / f"{step:07d}.safetensors")
    assert S.latest_checkpoint(str(run)) == str(run / "checkpoints" / "0000010.safetensors")
    assert S.latest_checkpoint(flow_ckpt) == flow_ckpt
    res = racedit.sample(str(run), class_labels=[0], **_quiet())
    assert os.path.basename(res.png).startswith("sample-0000002-")  # the step it holds
    os.makedirs(tmp_path / "empty" / "checkpoints")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        racedit.sample(str(tmp_path / "empty"), **_quiet())


def test_sample_from_a_step0_checkpoint(tmp_path):
    """Trained 0 steps, no routing threshold yet: eval routing falls back to batch top-K."""
    ck = _train(tmp_path, steps=0).checkpoint
    res = racedit.sample(ck, class_labels=[0, 1], num_sampling_steps=2, **_quiet())
    assert res.samples.shape == (2, 3, 32, 32) and np.all(np.isfinite(res.samples))


@pytest.mark.parametrize("kw,match", [
    (dict(cfg_scale=float("nan")), "--cfg-scale"),
    (dict(cfg_scale=float("inf")), "--cfg-scale"),
    (dict(cfg_scale=-1.0), "--cfg-scale"),
    (dict(num_sampling_steps=0), "--num-sampling-steps"),
    (dict(batch_size=0), "--batch-size"),
    (dict(batch_size=-2), "--batch-size"),
    (dict(num_samples=0), "--num-samples"),
    (dict(num_samples=10, shard_size=0), "--shard-size"),
    (dict(num_samples=10, class_labels="1,2"), "give one"),
    (dict(random_labels=True), "--random-labels"),
    (dict(grid_columns=0), "--grid-columns"),
    (dict(seed=-1), "--seed"),
    (dict(threads=0), "threads"),
    (dict(out="s.npz", npz=True), r"--out\): expected a path ending in \.png"),
    (dict(out="s.png", num_samples=5), r"--out\): expected a path ending in \.npz"),
])
def test_bad_settings_are_refused_up_front(kw, match, tmp_path):
    # the checkpoint does not exist: the settings are checked before it is read
    with pytest.raises(ValueError, match=match):
        racedit.sample(str(tmp_path / "none.safetensors"), **_quiet(**kw))


def test_bad_labels(flow_ckpt):
    with pytest.raises(ValueError, match="--class-labels"):
        racedit.sample(flow_ckpt, class_labels="1,x", **_quiet())
    with pytest.raises(ValueError, match="--per-class"):
        racedit.sample(flow_ckpt, per_class=0, **_quiet())
    m, obj = _model(flow_ckpt)
    with pytest.raises(ValueError, match="--num-sampling-steps"):
        S.generate(m, obj, [0], num_steps=0, progress=False)


# ---- the command -------------------------------------------------------------------------------

def _cli(*args, cwd):
    return run_cli("sample", *args, cwd=cwd)


def test_cli_mass_sampling_and_grid(flow_ckpt, tmp_path):
    run = os.path.dirname(os.path.dirname(flow_ckpt))
    p = _cli("--ckpt", run, "--num-samples", "7", "--shard-size", "4", "--seed", "5",
             "--threads", "1", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""                      # no progress bar: stderr is not a terminal
    npz = os.path.join(run, "samples", "sample-0000002-euler4-cfg4-seed5-n7.npz")
    assert f"wrote 7 samples to {npz}" in p.stdout
    z = np.load(npz)
    assert z["arr_0"].shape == (7, 32, 32, 3) and z["labels"].tolist() == list(range(7))
    p = _cli("--ckpt", flow_ckpt, "--class-labels", "0,1,2,3,4", "--grid-columns", "2",
             "--out", "g.png", "--progress", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "sample" in p.stderr and "4/4" in p.stderr   # forced bar: 1 batch x 4 steps
    from PIL import Image
    assert Image.open(tmp_path / "g.png").size == (2 * (2 * 34 + 2), 2 * (3 * 34 + 2))


@pytest.mark.parametrize("flag,value", [("--cfg-scale", "nan"), ("--num-sampling-steps", "0"),
                                        ("--batch-size", "0"), ("--num-samples", "0")])
def test_cli_errors_name_the_flag(flag, value, tmp_path):
    p = _cli("--ckpt", str(tmp_path / "none.safetensors"), flag, value, cwd=tmp_path)
    assert p.returncode == 2 and flag in p.stderr and "Traceback" not in p.stderr
