"""The built-in shapes' sample metric (racedit.shapes_metric): a fixed, cached, deterministic
judge; its floor (held-out real shapes) and a bad reference (class means plus noise); the
input layouts it reads; ``fid --ref builtin``; ``ablate --metric samples``."""
import json

import numpy as np
import pytest

import racedit
from racedit import shapes_metric as SM
from racedit.data import make_shapes

S = 16  # the toy budget's image side: the judge builds in about a second


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("judge-cache"))


def test_judge_is_cached_and_deterministic(cache):
    judge = SM.shapes_judge(S, cache)
    files = __import__("os").listdir(cache)
    assert files == [f"shapes-judge-{judge.key}.npz"]
    SM._MEMO.clear()
    from_file = SM.shapes_judge(S, cache)
    fresh = SM.shapes_judge(S, cache=False)
    for k in SM.ShapesJudge.ARRAYS:
        np.testing.assert_array_equal(getattr(from_file, k), getattr(judge, k))
        np.testing.assert_array_equal(getattr(fresh, k), getattr(judge, k))
    assert SM.shapes_judge(S, cache) is from_file  # memo


def test_corrupt_cache_is_rebuilt(tmp_path):
    judge = SM.shapes_judge(S, str(tmp_path))
    path = tmp_path / f"shapes-judge-{judge.key}.npz"
    path.write_bytes(b"not a zip")
    SM._MEMO.clear()
    again = SM.shapes_judge(S, str(tmp_path))
    np.testing.assert_array_equal(again.weights, judge.weights)
    with np.load(path) as z:  # rewritten
        np.testing.assert_array_equal(z["weights"], judge.weights)


def test_floor_and_bad_reference(cache):
    """Real shapes: every one recognised, FD a fraction; class means plus noise: FD far
    above the floor, accuracy well below 1."""
    ref = SM.reference_points(200, S, cache)
    real, bad = ref["real"], ref["class_mean_noise"]
    assert real["accuracy"] == 1.0 and real["num_samples"] == 200
    assert 0.0 < real["fd"] < 2.0
    assert bad["fd"] > 10 * real["fd"] and bad["fd"] > 10.0
    assert bad["accuracy"] < 0.95


def test_fd_grows_with_noise_and_accuracy_follows_labels(cache):
    x, y = make_shapes(300, seed=5, image_size=S)
    judge = SM.shapes_judge(S, cache)
    rng = np.random.default_rng(0)
    fds = []
    for sigma in (0, 16, 48):
        xn = np.clip(x + rng.normal(0, sigma, x.shape), 0, 255).astype(np.uint8)
        fds.append(judge.score(xn, y)["fd"])
    assert fds[0] < fds[1] < fds[2]
    wrong = judge.score(x, (y + 1) % 10)  # the right images under the wrong labels
    assert wrong["accuracy"] == 0.0 and wrong["fd"] == pytest.approx(fds[0])
    per = judge.score(x[y < 5], y[y < 5])["per_class_accuracy"]
    assert per[:5] == [1.0] * 5 and per[5:] == [None] * 5


def test_layouts_give_the_same_features(cache):
    x, y = make_shapes(20, seed=6, image_size=S)
    judge = SM.shapes_judge(S, cache)
    f = judge.features(x)
    np.testing.assert_allclose(judge.features(x.transpose(0, 2, 3, 1)), f)
    np.testing.assert_allclose(judge.features(x.astype(np.float32) / 127.5 - 1.0), f,
                               atol=1e-5)


def test_bad_input(cache):
    judge = SM.shapes_judge(S, cache)
    x, y = make_shapes(4, seed=7, image_size=S)
    with pytest.raises(ValueError, match=r"labels: expected \(4,\) integers"):
        judge.score(x, y[:3])
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 10\)"):
        judge.score(x, y + 10)
    with pytest.raises(ValueError, match="this judge is for 16x16 shapes, got 32x32"):
        judge.features(make_shapes(4, seed=7, image_size=32)[0])
    with pytest.raises(ValueError, match="square RGB images"):
        judge.features(np.zeros((4, 1, S, S), np.uint8))
    with pytest.raises(ValueError, match="finite"):
        judge.features(np.full((4, 3, S, S), np.nan, np.float32))
    with pytest.raises(ValueError, match="image_size: expected an int >= 8"):
        SM.shapes_judge(4, cache)


def test_fid_ref_builtin(tmp_path, cache, monkeypatch, capsys):
    from racedit.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    x, y = make_shapes(50, seed=8, image_size=S)
    np.savez(tmp_path / "s.npz", arr_0=x.transpose(0, 2, 3, 1), labels=y)
    assert main(["fid", "--samples", str(tmp_path / "s.npz"), "--ref", "builtin"]) == 0
    res = json.loads((tmp_path / "s.shapes.json").read_text())
    assert res["accuracy"] == 1.0 and res["num_samples"] == 50
    assert "class accuracy 1.0000" in capsys.readouterr().out
    assert (tmp_path / "xdg" / "racedit").is_dir()  # the judge's cache
    np.savez(tmp_path / "nolabels.npz", arr_0=x.transpose(0, 2, 3, 1))
    assert main(["fid", "--samples", str(tmp_path / "nolabels.npz"), "--ref", "builtin"]) == 2
    assert "expected arr_0 (images) and labels" in capsys.readouterr().err


def test_ablate_metric_samples(tmp_path, monkeypatch):
    """--metric samples judges each run by sampling; runs finished with the loss metric
    get the samples from their checkpoints, without training again."""
    import importlib

    A = importlib.import_module("racedit.ablate")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = str(tmp_path / "study")
    first = racedit.ablate("balance", budget="toy", out=out, progress=False, threads=1)
    assert "shapes-FD" not in first.table
    trained = []
    real = A._train_one
    monkeypatch.setattr(A, "_train_one", lambda *a: trained.append(a) or real(*a))
    res = racedit.ablate("balance", budget="toy", out=out, progress=False, threads=1,
                         metric="both")
    assert trained == []
    assert "shapes-FD ↓" in res.table and "class acc ↑" in res.table
    assert "held-out loss ↓" in res.table
    rec = json.loads((tmp_path / "study/runs/none/seed0/result.json").read_text())
    s = rec["samples"]
    assert s["num_samples"] == A.SAMPLE_EVAL["toy"]["num"] and 0 <= s["accuracy"] <= 1
    assert s["settings"] == dict(A.SAMPLE_EVAL["toy"], seed=A.SAMPLE_SEED)
    agg = res.summary["aggregate"]["runs"]["balance-loss"]
    assert agg["sample_fd"][0] == pytest.approx(
        json.loads((tmp_path / "study/runs/balance-loss/seed0/result.json").read_text())
        ["samples"]["fd"])
    only = racedit.ablate("balance", budget="toy", out=out, progress=False, threads=1,
                          metric="samples")
    assert "held-out loss ↓" not in only.table and "Δ FD vs Router similarity" in only.table
    again = racedit.ablate("balance", budget="toy", out=out, progress=False, threads=1,
                           metric="samples")
    assert again.summary["per_run"] == only.summary["per_run"]  # fixed seeds and labels
    with pytest.raises(ValueError, match="metric: expected one of"):
        racedit.ablate("balance", budget="toy", out=out, metric="fid")
