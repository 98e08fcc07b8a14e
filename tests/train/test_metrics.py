"""Sample metrics (racedit.metrics): the Fréchet distance against closed forms and its
singular-product numerics, feature statistics, racedit without torch, and the whole FID /
IS / precision-recall path run for real with a randomly initialised Inception of
torch-fidelity's architecture loaded from a file (``--inception``)."""
import hashlib
import json
import os

import numpy as np
import pytest
from _subproc import run_python

from racedit import metrics
from racedit.data import make_shapes


def _spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d) + (0 if rank else 0.1 * np.eye(d))


def _fd_reference(mu1, s1, mu2, s2):
    """tr sqrt(s1 s2) = tr sqrt(s1^1/2 s2 s1^1/2), the latter symmetric PSD: eigh only."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(lam).sum())


def test_frechet_distance_closed_forms():
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2 with s the standard deviations
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # diagonal covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = 1 + 4 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want)
    # general (non-commuting) covariances
    rng = np.random.default_rng(0)
    s1, s2 = _spd(rng, 6), _spd(rng, 6)
    m1, m2 = rng.standard_normal(6), rng.standard_normal(6)
    assert metrics.frechet_distance(m1, s1, m2, s2) == pytest.approx(
        _fd_reference(m1, s1, m2, s2), rel=1e-9)
    assert metrics.frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_rank_deficient_covariances():
    """N < d, as FID of a few thousand images in 2048 dims: sqrtm of a singular product,
    its round-off imaginary part dropped; the result matches the symmetric closed form."""
    rng = np.random.default_rng(1)
    f1, f2 = rng.standard_normal((5, 12)), rng.standard_normal((5, 12)) + 0.5
    m1, s1 = metrics.feature_stats(f1)
    m2, s2 = metrics.feature_stats(f2)
    fd = metrics.frechet_distance(m1, s1, m2, s2)
    assert isinstance(fd, float) and np.isfinite(fd)
    assert fd == pytest.approx(_fd_reference(m1, s1, m2, s2), rel=1e-6, abs=1e-6)
    assert metrics.frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_offsets_a_non_finite_root(monkeypatch):
    """When sqrtm of the product is not finite, eps is added to both diagonals (ADM)."""
    real = metrics._sqrtm
    calls = []

    def flaky(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real(a)

    monkeypatch.setattr(metrics, "_sqrtm", flaky)
    s1, s2 = np.diag([1.0, 0.0]), np.diag([4.0, 0.0])
    fd = metrics.frechet_distance([0, 0], s1, [0, 0], s2, eps=1e-2)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + 1e-2 * np.eye(2)) @ (s2 + 1e-2 * np.eye(2)))
    want = 1 + 4 - 2 * (np.sqrt(1.01 * 4.01) + 0.01)
    assert fd == pytest.approx(want, rel=1e-12)


def test_frechet_distance_rejects_a_complex_root(monkeypatch):
    monkeypatch.setattr(metrics, "_sqrtm", lambda a: np.eye(len(a)) * (1 + 0.5j))
    with pytest.raises(ValueError, match="imaginary component"):
        metrics.frechet_distance([0.0], [[1.0]], [0.0], [[1.0]])


def test_frechet_distance_and_stats_bad_input():
    with pytest.raises(ValueError, match=r"mu1, sigma1: expected \(d,\) and \(d, d\)"):
        metrics.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="same dimension"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="finite"):
        metrics.frechet_distance([np.nan], [[1.0]], [0.0], [[1.0]])
    with pytest.raises(ValueError, match=r"N >= 2, got shape \(1, 4\)"):
        metrics.feature_stats(np.zeros((1, 4)))
    f = np.random.default_rng(2).standard_normal((7, 3))
    mu, sigma = metrics.feature_stats(f)
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False))


def test_image_sets_are_streamed_and_checked(tmp_path):
    from _eval_nets import write_folder

    x = np.random.default_rng(3).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=x)
    got = list(metrics.iter_images(str(tmp_path / "s.npz"), batch_size=2))
    assert [b.shape[0] for b in got] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(got), x)
    assert metrics.count_images(str(tmp_path / "s.npz")) == 5
    write_folder(tmp_path / "imgs", x, [0, 0, 1, 1, 1])
    big, _ = make_shapes(1, seed=0, image_size=12)
    write_folder(tmp_path / "imgs" / "big", big.transpose(0, 2, 3, 1), [2])
    assert metrics.count_images(str(tmp_path / "imgs")) == 6
    with pytest.raises(ValueError, match="images of different sizes"):
        list(metrics.iter_images(str(tmp_path / "imgs"), batch_size=6))
    cropped = np.concatenate(list(metrics.iter_images(str(tmp_path / "imgs"), 4, 8)))
    assert cropped.shape == (6, 8, 8, 3)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable .npz"):
        metrics.count_images(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "nox.npz", y=np.zeros(2))
    with pytest.raises(ValueError, match="no arr_0"):
        metrics.iter_images(str(tmp_path / "nox.npz"))
    with pytest.raises(FileNotFoundError, match="no such image folder or .npz"):
        metrics.count_images(str(tmp_path / "none.npz"))


BLOCK_TORCH = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torch_fidelity", "torchvision", "diffusers"):
            raise ImportError(f"blocked {name}")
sys.meta_path.insert(0, Block())
"""


def test_racedit_imports_and_measures_without_torch(tmp_path):
    """racedit, its metrics' statistics and the shapes metric need no torch; the parts
    that do say which extra to install, and the CLI prints that as one line."""
    code = BLOCK_TORCH + r"""
import numpy as np
import racedit
import racedit.cli
M = racedit.metrics
assert not any(m.split(".")[0] in ("torch", "torch_fidelity", "diffusers") for m in sys.modules)
print("shapes", racedit.shapes_metric.shapes_judge(8, cache=False).weights.shape)
print("fd", M.frechet_distance([0.0], [[1.0]], [1.0], [[1.0]]))
for call, extra in ((lambda: M.load_inception("x.pth"), "racedit[eval]"),
                    (lambda: racedit.vae.load_vae("somewhere"), "racedit[vae]")):
    try:
        call()
    except M.MissingExtra as e:
        assert extra in str(e), e
        print("missing", extra)
rc = racedit.cli.main(["fid", "--samples", "s.npz", "--ref", "r.npz", "--inception", "x.pth"])
print("rc", rc)
"""
    for f in ("s.npz", "r.npz"):
        np.savez(tmp_path / f, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    r = run_python(["-c", code], cwd=str(tmp_path), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "fd 1.0" in r.stdout and "rc 2" in r.stdout and "shapes (29, 10)" in r.stdout
    assert r.stdout.count("missing") == 2
    assert 'pip install "racedit[eval]"' in r.stderr


# ---- the FID path with a random Inception -------------------------------------------------

tf = pytest.importorskip  # the tests below need the [eval] extra


@pytest.fixture(scope="module")
def inception():
    """The random Inception's file; while the module runs, the features of a set of images
    already seen are served from memory (the network ran on those exact bytes once: the
    tests compare several references against the same sets, at 0.5 s per image)."""
    tf("torch_fidelity")
    from _eval_nets import random_inception

    cache, real = {}, metrics.Inception.features

    def features(self, batches, progress=None):
        batches = list(batches)
        key = (self.identity["sha256"], self.dims,
               hashlib.sha1(b"".join(b.tobytes() for b in batches)).hexdigest())
        if key not in cache:
            cache[key] = real(self, batches, progress)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics.Inception, "features", features)
        yield random_inception()


def _shapes_nhwc(n, seed, size=16):
    x, y = make_shapes(n, seed=seed, image_size=size)
    return x.transpose(0, 2, 3, 1), y


@pytest.fixture(scope="module")
def sets(tmp_path_factory, inception):
    """6 samples as an .npz, the same 6 as an image folder, and 6 other images."""
    from _eval_nets import write_folder

    d = tmp_path_factory.mktemp("fid")
    x, y = _shapes_nhwc(6, 1)
    np.savez(d / "samples.npz", arr_0=x, labels=y)
    write_folder(d / "ref", x, y)
    x2, _ = _shapes_nhwc(6, 2)
    np.savez(d / "other.npz", arr_0=x2)
    return d


def test_fid_of_identical_sets_is_zero_and_ref_stats_round_trip(sets, inception):
    d = sets
    r = metrics.fid(str(d / "samples.npz"), str(d / "ref"), inception=inception, dims=192,
                    save_ref=str(d / "ref_stats.npz"), progress=False)
    assert abs(r["fid"]) < 1e-4 and r["precision"] == 1.0 and r["recall"] == 1.0
    assert r["num_samples"] == 6 and r["num_ref"] == 6 and r["dims"] == 192
    assert r["feature_extractor"]["sha256"] == metrics.sha256_files([inception])
    with open(r["json"]) as f:
        assert json.load(f)["fid"] == r["fid"]
    with np.load(d / "ref_stats.npz") as z:
        assert z["mu"].shape == (192,) and z["features"].shape == (6, 192)
    other = metrics.fid(str(d / "other.npz"), str(d / "ref"), inception=inception, dims=192,
                        out=False, progress=False)
    again = metrics.fid(str(d / "other.npz"), str(d / "ref_stats.npz"), inception=inception,
                        dims=192, out=False, progress=False)
    assert other["fid"] > 1e3 * max(abs(r["fid"]), 1e-6)
    for k in ("fid", "inception_score", "precision", "recall"):
        assert again[k] == pytest.approx(other[k], rel=1e-9, abs=1e-12), k
    assert again["ref_kind"] == "statistics (.npz)" and "json" not in again


def test_adm_reference_batch(sets, inception):
    """An ADM reference batch: FID from its mu / sigma, precision / recall from its images."""
    d = sets
    with np.load(d / "ref_stats.npz") as z:
        mu, sigma = z["mu"], z["sigma"]
    x, _ = _shapes_nhwc(6, 1)
    np.savez(d / "adm.npz", arr_0=x, mu=mu, sigma=sigma)
    np.savez(d / "adm_stats_only.npz", mu=mu, sigma=sigma)
    r = metrics.fid(str(d / "other.npz"), str(d / "adm.npz"), inception=inception, dims=192,
                    out=False, progress=False)
    ref = metrics.fid(str(d / "other.npz"), str(d / "ref_stats.npz"), inception=inception,
                      dims=192, out=False, progress=False)
    assert r["ref_kind"] == "ADM reference batch"
    assert r["fid"] == pytest.approx(ref["fid"]) and r["recall"] == ref["recall"]
    s = metrics.fid(str(d / "other.npz"), str(d / "adm_stats_only.npz"), inception=inception,
                    dims=192, out=False, progress=False)
    assert s["fid"] == pytest.approx(ref["fid"]) and s["precision"] is None


def test_fid_refuses_what_cannot_be_compared(sets, inception, tmp_path):
    d = sets
    with pytest.raises(ValueError, match="192-dim features, the network gives dims 64"):
        metrics.fid(str(d / "other.npz"), str(d / "ref_stats.npz"), inception=inception,
                    dims=64, out=False, progress=False)
    with np.load(d / "ref_stats.npz") as z:
        np.savez(tmp_path / "foreign.npz", mu=z["mu"], sigma=z["sigma"],
                 extractor_sha256=np.array("0" * 64))
    with pytest.raises(ValueError, match="another feature extractor"):
        metrics.fid(str(d / "other.npz"), str(tmp_path / "foreign.npz"), inception=inception,
                    dims=192, out=False, progress=False)
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"uint8 images \(N, H, W, C\).*float32"):
        metrics.fid(str(tmp_path / "float.npz"), str(d / "ref_stats.npz"),
                    inception=inception, dims=192, out=False, progress=False)
    with pytest.raises(ValueError, match="dims"):
        metrics.load_inception(inception, dims=100)


def test_inception_weights_missing_or_wrong(tmp_path, monkeypatch):
    tf("torch_fidelity")
    import torch

    with pytest.raises(FileNotFoundError, match=metrics.INCEPTION_URL):
        metrics.load_inception(str(tmp_path / "nope.pth"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="--inception PATH"):
        metrics.load_inception()
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="not torch-fidelity's Inception-v3 state dict"):
        metrics.load_inception(str(bad))


def test_fid_cli(sets, inception, capsys):
    from racedit.cli import main

    d = sets
    out = d / "cli.json"
    rc = main(["fid", "--samples", str(d / "other.npz"), "--ref", str(d / "ref_stats.npz"),
               "--inception", inception, "--dims", "192", "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert {"fid", "inception_score", "precision", "recall", "num_samples",
            "feature_extractor"} <= set(res)
    assert "FID" in capsys.readouterr().out
    rc = main(["fid", "--samples", str(d / "other.npz"), "--ref", str(d / "missing.npz"),
               "--inception", inception])
    assert rc == 2 and "no such image folder" in capsys.readouterr().err
    assert os.path.exists(inception)
