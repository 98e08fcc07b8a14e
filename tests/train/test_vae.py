"""The latent pipeline (racedit.vae) with a tiny randomly initialised diffusers AutoencoderKL
saved by save_pretrained: encoding an image folder to fast-DiT's layout (scaled, keyed
noise, resumable), training on it, sampling with --vae (decoded PNG and .npz), and FID of
the decoded samples, end to end."""
import importlib
import json
import os

import numpy as np
import pytest

pytest.importorskip("diffusers")

import racedit  # noqa: E402
from _eval_nets import tiny_vae, write_folder  # noqa: E402
from racedit.data import load_latents, make_shapes  # noqa: E402
from racedit.vae import VAE, encode_folder, load_vae  # noqa: E402

SAMPLE = importlib.import_module("racedit.sample")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """6 built-in shapes of 20 x 20 pixels in 2 class folders (center-cropped to 16)."""
    x, y = make_shapes(6, seed=3, image_size=20)
    root = tmp_path_factory.mktemp("imgs") / "train"
    return write_folder(root, x.transpose(0, 2, 3, 1), y % 2)


@pytest.fixture(scope="module")
def vae():
    return load_vae(tiny_vae())


def _encode(src, vae, out, **kw):
    kw = dict(dict(image_size=16, shard_size=4, batch_size=2, progress=False), **kw)
    return encode_folder(src, vae, str(out), **kw)


def _all(out):
    ds = load_latents(str(out))
    return ds.x, ds.y


def test_encode_writes_fast_dit_layout_deterministically(images, vae, tmp_path):
    n = _encode(images, vae, tmp_path / "a")
    assert n == 6
    f = sorted(os.listdir(tmp_path / "a" / "features"))
    assert f == ["00000.npy", "00001.npy"] == sorted(os.listdir(tmp_path / "a" / "labels"))
    assert np.load(tmp_path / "a" / "features" / "00000.npy").shape == (4, 4, 8, 8)
    x, y = _all(tmp_path / "a")
    assert x.dtype == np.float32 and y.tolist() == [0, 0, 0, 1, 1, 1]
    # other batch and shard sizes: the same latents (noise keyed by image; the encoder's
    # batched convolutions round differently, nothing more)
    _encode(images, vae, tmp_path / "b", batch_size=5, shard_size=6)
    np.testing.assert_allclose(_all(tmp_path / "b")[0], x, rtol=1e-5, atol=1e-6)
    # scaled by the VAE's scaling factor: the latents spread like mean*0.18215 + noise
    from racedit.data import read_image

    first = sorted(os.listdir(os.path.join(images, "c0")))[0]
    img = read_image(os.path.join(images, "c0", first), 16, 3)[None].copy()
    torch = vae.torch
    with torch.no_grad():
        dist = vae.model.encode(torch.from_numpy(img.transpose(0, 3, 1, 2)).float() / 127.5 - 1)
    mean = dist.latent_dist.mean.numpy()[0] * 0.18215
    std = dist.latent_dist.std.numpy()[0] * 0.18215
    z = (x[0] - mean) / std  # the standard normal noise of that draw
    assert abs(z.mean()) < 0.5 and 0.6 < z.std() < 1.4


def test_encode_resumes_and_refuses_other_settings(images, vae, tmp_path, monkeypatch, capsys):
    out = tmp_path / "lat"
    _encode(images, vae, out)
    x, _ = _all(out)
    os.remove(out / "features" / "00001.npy")
    calls = []
    real = VAE.encode
    monkeypatch.setattr(VAE, "encode", lambda self, im, keys: calls.append(len(im)) or
                        real(self, im, keys))
    _encode(images, vae, out)
    assert sum(calls) == 2 and "1 of 2 shards present" in capsys.readouterr().out
    np.testing.assert_array_equal(_all(out)[0], x)
    with pytest.raises(ValueError, match="holds latents of other settings.*hflip"):
        _encode(images, vae, out, hflip=True)
    with pytest.raises(ValueError, match="not a multiple of the VAE's downsampling factor 2"):
        _encode(images, vae, tmp_path / "odd", image_size=15)


def test_hflip_encodes_every_image_twice(images, vae, tmp_path):
    assert _encode(images, vae, tmp_path / "f", hflip=True) == 12
    x, y = _all(tmp_path / "f")
    assert x.shape == (12, 4, 8, 8) and y.tolist() == [0] * 6 + [1] * 6
    assert not np.array_equal(x[0], x[1])  # an image, then its mirror


def test_vae_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(str(tmp_path))
    v = load_vae(tiny_vae())
    with pytest.raises(ValueError, match=r"latents: expected \(B, 4, h, w\)"):
        v.decode(np.zeros((1, 3, 8, 8), np.float32))


def test_encode_train_sample_decode_fid(images, tmp_path):
    """encode -> train 2 steps on the latents -> sample with --vae (grid and mass) -> fid."""
    from racedit.cli import main

    lat, res = str(tmp_path / "lat"), str(tmp_path / "results")
    assert main(["encode", "--data", "folder", images, "--vae", tiny_vae(), "--out", lat,
                 "--image-size", "16", "--no-progress"]) == 0
    assert main(["train", "--model", "RaceDiT-T/2-2in4", "--data", "latents", lat,
                 "--steps", "2", "--global-batch-size", "4", "--objective", "flow",
                 "--sampler", "euler", "--num-sampling-steps", "2", "--results-dir", res,
                 "--no-progress", "--no-report"]) == 0
    run = os.path.join(res, os.listdir(res)[0])
    png = str(tmp_path / "grid.png")
    assert main(["sample", "--ckpt", run, "--vae", tiny_vae(), "--per-class", "2", "--npz",
                 "--out", png, "--no-progress"]) == 0
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (2 + 2 * 18, 2 + 2 * 18)  # 2 x 2 images of 16 px, 2 px apart
    with np.load(str(tmp_path / "grid.npz")) as z:
        assert z["arr_0"].shape == (4, 16, 16, 3) and z["arr_0"].dtype == np.uint8
    assert np.load(str(tmp_path / "grid.npy")).shape == (4, 4, 8, 8)
    npz = str(tmp_path / "mass.npz")
    assert main(["sample", "--ckpt", run, "--vae", tiny_vae(), "--num-samples", "6",
                 "--out", npz, "--no-progress"]) == 0
    with np.load(npz) as z:
        assert z["arr_0"].shape == (6, 16, 16, 3)
    with open(os.path.join(npz[:-4], "manifest.json")) as f:
        assert json.load(f)["vae"]["scaling_factor"] == pytest.approx(0.18215)
    # the same samples once more: resumed from the shards, same bytes
    assert main(["sample", "--ckpt", run, "--vae", tiny_vae(), "--num-samples", "6",
                 "--out", npz, "--no-progress"]) == 0
    pytest.importorskip("torch_fidelity")
    from _eval_nets import random_inception

    out = str(tmp_path / "fid.json")
    assert main(["fid", "--samples", npz, "--ref", images, "--inception", random_inception(),
                 "--dims", "64", "--out", out, "--no-progress"]) == 0
    r = json.loads(open(out).read())
    assert r["num_samples"] == 6 and r["num_ref"] == 6 and np.isfinite(r["fid"])


def test_vae_needs_a_latent_model_and_a_latent_model_needs_it(tmp_path, images):
    pix = racedit.train(preset="tiny", steps=1, num_samples=20, results_dir=str(tmp_path / "p"),
                        progress=False, report=False, final_samples=False)
    with pytest.raises(ValueError, match="samples pixels"):
        racedit.sample(pix.checkpoint, vae=tiny_vae(), progress=False)
    lat = str(tmp_path / "lat")
    _encode(images, load_vae(tiny_vae()), lat)
    res = racedit.train("RaceDiT-T/2-2in4", data="latents", data_path=lat, steps=1,
                        global_batch_size=2, results_dir=str(tmp_path / "l"), progress=False,
                        report=False, final_samples=False, objective="flow")
    with pytest.raises(ValueError, match=r"--vae DIR"):
        racedit.sample(res.checkpoint, num_samples=4, progress=False)
