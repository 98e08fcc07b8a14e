"""Checkpoints: round trip, RNG state, bad files, and a writer killed mid-save leaves the
previous checkpoint loadable."""
import os
import signal
import subprocess

from _subproc import run_python
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("safetensors")
from racedit import checkpoint as ck  # noqa: E402


def _tensors(seed=0, n=1000):
    r = np.random.default_rng(seed)
    return {"model.blocks.0.w": r.standard_normal((3, 5)).astype(np.float32),
            "ema.blocks.0.w": r.standard_normal((3, 5)).astype(np.float32),
            "opt.m.x": r.standard_normal(n).astype(np.float32),
            "thresholds": np.array([0.5, -1.25], np.float32),
            "step": np.array([12], np.int64)}


def test_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    rng.random(3)
    t = _tensors()
    meta = {"step": 12, "config": {"model": "RaceDiT-S/2-2in8", "lr": 1e-4},
            "rng": ck.rng_state(rng)}
    p = tmp_path / "sub" / "0000012.safetensors"
    ck.save_checkpoint(str(p), t, meta)
    t2, meta2 = ck.load_checkpoint(str(p), training=False)
    assert set(t2) == set(t)
    for k in t:
        assert t2[k].dtype == t[k].dtype
        np.testing.assert_array_equal(t2[k], t[k])
    assert meta2 == meta
    r2 = ck.rng_from_state(meta2["rng"])
    np.testing.assert_array_equal(r2.random(10), rng.random(10))
    assert [f for f in os.listdir(p.parent)] == ["0000012.safetensors"]  # no temp left


def test_overwrite_replaces(tmp_path):
    p = str(tmp_path / "c.safetensors")
    ck.save_checkpoint(p, _tensors(0), {"step": 1})
    ck.save_checkpoint(p, _tensors(1), {"step": 2})
    t, m = ck.load_checkpoint(p, training=False)
    assert m["step"] == 2
    np.testing.assert_array_equal(t["opt.m.x"], _tensors(1)["opt.m.x"])


def test_non_contiguous_is_stored(tmp_path):
    a = np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2]
    p = str(tmp_path / "c.safetensors")
    ck.save_checkpoint(p, {"a": a}, {})
    np.testing.assert_array_equal(ck.load_checkpoint(p, training=False)[0]["a"], a)


def test_bad_inputs_and_files(tmp_path):
    p = str(tmp_path / "c.safetensors")
    with pytest.raises(TypeError, match="tensors\\['a'\\]"):
        ck.save_checkpoint(p, {"a": [1, 2]}, {})
    with pytest.raises(TypeError):
        ck.save_checkpoint(p, {"a": np.zeros(2)}, {"x": object()})
    assert not os.path.exists(p) and os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="c.safetensors"):
        ck.load_checkpoint(p)
    open(p, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ck.CheckpointError, match="c.safetensors"):
        ck.load_checkpoint(p)
    from safetensors.numpy import save_file

    save_file({"a": np.zeros(2, np.float32)}, p)
    with pytest.raises(ck.CheckpointError, match="not a racedit checkpoint"):
        ck.load_checkpoint(p)


WRITER = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from racedit import checkpoint as ck
    path, mode = sys.argv[1], sys.argv[2]
    ck.save_checkpoint(path, {"x": np.full(10, 1.0, np.float32)}, {"step": 1})
    if mode == "before_rename":
        real = os.replace
        def stuck(a, b):
            print("WRITTEN", flush=True)
            time.sleep(600)
        os.replace = stuck
        big = {"x": np.full(10, 2.0, np.float32)}
    else:
        big = {"x": np.full(10, 2.0, np.float32),
               "big": np.ones(100_000_000, np.float32)}  # 400 MB: the write takes a while
    print("SAVING", flush=True)
    ck.save_checkpoint(path, big, {"step": 2})
    print("DONE", flush=True)
""")


@pytest.mark.parametrize("mode", ["before_rename", "mid_write"])
def test_crash_during_save_keeps_previous(tmp_path, mode):
    path = str(tmp_path / "ckpt.safetensors")
    proc = run_python(["-c", WRITER, path, mode], popen=True, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "SAVING"
        if mode == "before_rename":
            assert proc.stdout.readline().strip() == "WRITTEN"
        else:  # kill as soon as the temporary file is being written
            deadline, tmps = time.time() + 60, []
            while time.time() < deadline and not tmps:
                tmps = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
                time.sleep(0.001)
            assert tmps, "the writer never created its temporary file"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the writer finished before it was killed"
    t, meta = ck.load_checkpoint(path, training=False)
    assert meta == {"step": 1}
    np.testing.assert_array_equal(t["x"], np.full(10, 1.0, np.float32))
    assert "big" not in t
