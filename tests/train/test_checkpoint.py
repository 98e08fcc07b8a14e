"""Checkpoints: round trip, RNG state, bad files, and a writer killed mid-save leaves the
previous checkpoint loadable."""
import io
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


# ---- permissions --------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_mode_follows_umask(tmp_path, umask):
    """Like every other output (mkstemp would make it 0600 whatever the umask)."""
    old = os.umask(umask)
    try:
        p = str(tmp_path / "c.safetensors")
        ck.save_checkpoint(p, _tensors(), {"step": 1})
    finally:
        os.umask(old)
    assert os.stat(p).st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["c.safetensors"]


# ---- a training checkpoint: what load_checkpoint checks -----------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint written by racedit.train (the tiny preset, two steps)."""
    import racedit

    res = racedit.train(preset="tiny", steps=2, results_dir=str(tmp_path_factory.mktemp("r")),
                        progress=False, final_samples=False, report=False, out=io.StringIO())
    return res.checkpoint


def _tampered(trained, tmp_path, edit_tensors=None, edit_meta=None):
    """A copy of the trained checkpoint with its tensors / metadata edited in place."""
    tensors, meta = ck.load_checkpoint(trained)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    p = str(tmp_path / "bad.safetensors")
    ck.save_checkpoint(p, tensors, meta)
    return p


W = "blocks.0.attn.qkv.weight"


def test_training_checkpoint_loads_and_resumes(trained, tmp_path):
    from racedit.train import model_from_checkpoint, train

    tensors, meta = ck.load_checkpoint(trained)
    assert meta["step"] == 2 and tensors["model." + W].dtype == np.float32
    m, _ = model_from_checkpoint(trained)
    assert m.config.name == "RaceDiT-tiny/4-2in4"
    res = train(resume=trained, steps=3, progress=False, final_samples=False, report=False,
                out=io.StringIO())
    assert res.log[-1]["step"] == 3


def test_thresholds_may_be_nan(trained, tmp_path):
    """A layer whose threshold is not set yet is saved as NaN: that loads."""
    p = _tampered(trained, tmp_path, lambda t: t["thresholds"].__setitem__(0, np.nan))
    assert np.isnan(ck.load_checkpoint(p)[0]["thresholds"][0])


def _set(d, path, value):
    *head, last = path.split("/")
    for k in head:
        d = d[k]
    if value is _DEL:
        del d[last]
    else:
        d[last] = value


_DEL = object()


def _poke(key, index, value):
    def edit(t):
        t[key].reshape(-1)[index] = value
    return edit


TENSOR_CASES = [
    ("i32_header", lambda t: t.__setitem__("ema." + W, t["ema." + W].view(np.int32)),
     rf"tensor 'ema\.{W}': header dtype I32, expected F32"),
    ("f64", lambda t: t.__setitem__("model." + W, t["model." + W].astype(np.float64)),
     rf"tensor 'model\.{W}': header dtype F64"),
    ("nan_weight", _poke("model." + W, 7, np.nan), rf"tensor 'model\.{W}' holds nan at flat index 7"),
    ("inf_ema", _poke("ema." + W, 3, -np.inf), rf"tensor 'ema\.{W}' holds -inf at flat index 3"),
    ("nan_adam", _poke("opt.m." + W, 0, np.nan), rf"tensor 'opt\.m\.{W}' holds nan"),
    ("negative_v", _poke("opt.v." + W, 1, -1.0), rf"tensor 'opt\.v\.{W}': AdamW second moments must be >= 0"),
    ("inf_threshold", _poke("thresholds", 1, np.inf), "tensor 'thresholds' holds inf"),
    ("threshold_3d", lambda t: t.__setitem__("thresholds", t["thresholds"][None, None]),
     r"tensor 'thresholds': expected 1-D or 2-D, got shape \(1, 1, 2\)"),
    ("missing_ema", lambda t: t.pop("ema." + W), rf"no tensor 'ema\.{W}' \(model\.{W} is saved\)"),
    ("shape", lambda t: t.__setitem__("opt.v." + W, t["opt.v." + W][:3]),
     rf"tensor 'opt\.v\.{W}' has shape \(3, 32\), model\.{W} has \(96, 32\)"),
    ("extra", lambda t: t.__setitem__("ema.nope", np.zeros(2, np.float32)),
     "tensor 'ema.nope' has no model.. counterpart"),
    ("no_model", lambda t: [t.pop(k) for k in list(t) if k.startswith("model.")],
     r"no 'model\.\*' tensors"),
]


@pytest.mark.parametrize("edit,match", [c[1:] for c in TENSOR_CASES], ids=[c[0] for c in TENSOR_CASES])
def test_bad_tensors(trained, tmp_path, edit, match):
    p = _tampered(trained, tmp_path, edit_tensors=edit)
    with pytest.raises(ck.CheckpointError, match="bad.safetensors: " + match):
        ck.load_checkpoint(p)


META_CASES = [
    ("no_data", "data", _DEL, "metadata has no 'data'"),
    ("no_step", "step", _DEL, "metadata has no 'step'"),
    ("step_str", "step", "2", "metadata 'step': expected int, got '2'"),
    ("step_negative", "step", -1, "metadata 'step': expected >= 0, got -1"),
    ("channels_str", "data/channels", "3", "metadata 'data.channels': expected int, got '3'"),
    ("channels_bool", "data/channels", True, "metadata 'data.channels': expected int, got True"),
    ("no_image_size", "data/image_size", _DEL, "metadata has no 'data.image_size'"),
    ("num_classes_huge", "data/num_classes", 2 ** 40, r"metadata 'data.num_classes': expected 1\.\.65536"),
    ("kind", "data/kind", "video", "metadata 'data.kind': expected 'pixels' or 'latents'"),
    ("class_names", "data/class_names", [1, 2], "metadata 'data.class_names': expected strings"),
    ("config_list", "config", [], "metadata 'config': expected dict, got"),
    ("lr_str", "config/lr", "fast", "metadata 'config.lr': expected int or float, got 'fast'"),
    ("lr_nan", "config/lr", float("nan"), "metadata 'config.lr': expected int or float, got nan"),
    ("seed_float", "config/seed", 0.5, "metadata 'config.seed': expected int, got 0.5"),
    ("learn_sigma_int", "config/learn_sigma", 1, "metadata 'config.learn_sigma': expected bool, got 1"),
    ("no_routing", "config/routing", _DEL, "metadata has no 'config.routing'"),
    ("model_config_key", "config/model_config/depthh", 2,
     "metadata 'config.model_config.depthh': unknown key"),
    ("model_config_missing", "config/model_config/hidden", _DEL,
     "metadata has no 'config.model_config.hidden'"),
    ("model_config_str", "config/model_config/depth", "2",
     "metadata 'config.model_config.depth': expected int, got '2'"),
    ("rng_seed", "rng/bit_generator", "seed", "metadata 'rng' is not a generator state .*'seed'"),
    ("rng_state", "rng/state", {"state": 1}, "metadata 'rng' is not a generator state"),
    ("device", "device", 3, "metadata 'device': expected str, got 3"),
]


@pytest.mark.parametrize("key,value,match", [c[1:] for c in META_CASES], ids=[c[0] for c in META_CASES])
def test_bad_metadata(trained, tmp_path, key, value, match):
    p = _tampered(trained, tmp_path, edit_meta=lambda m: _set(m, key, value))
    state = np.random.get_state()[1].copy()
    with pytest.raises(ck.CheckpointError, match="bad.safetensors: " + match):
        ck.load_checkpoint(p)
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # nothing was called


def test_metadata_not_an_object(tmp_path):
    from safetensors.numpy import save_file

    p = str(tmp_path / "c.safetensors")
    save_file({"a": np.zeros(2, np.float32)}, p, metadata={"format": ck.FORMAT, "racedit": "[1]"})
    with pytest.raises(ck.CheckpointError, match="c.safetensors: metadata: expected a JSON object"):
        ck.load_checkpoint(p, training=False)


def test_rng_from_state_names_a_bit_generator():
    with pytest.raises(ValueError, match="'seed' is not a numpy bit generator"):
        ck.rng_from_state({"bit_generator": "seed", "state": {}})


# ---- a training checkpoint that does not fit its model ------------------------------------

MODEL_CASES = [
    ("unknown_model", lambda t, m: (_set(m, "config/model", "Nope-X/9"),
                                    _set(m, "config/model_config", None)),
     "its config does not build a model .*Nope-X/9"),
    ("thresholds_len", lambda t, m: t.__setitem__("thresholds", np.zeros(5, np.float32)),
     r"tensor 'thresholds' does not fit the model .*got \(5,\)"),
    ("qkv_shape", lambda t, m: [t.__setitem__(f + W, np.zeros((96, 16), np.float32))
                                for f in ck.PARAM_FAMILIES],
     rf"tensor 'ema\.{W}' has shape \(96, 16\), the model expects \(96, 32\)"),
    ("missing_param", lambda t, m: [t.pop(f + W) for f in ck.PARAM_FAMILIES],
     rf"checkpoint has no tensor 'ema\.{W}'"),
]


@pytest.mark.parametrize("edit,match", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_model_from_bad_checkpoint(trained, tmp_path, edit, match):
    from racedit.train import model_from_checkpoint

    tensors, meta = ck.load_checkpoint(trained)
    edit(tensors, meta)
    p = str(tmp_path / "bad.safetensors")
    ck.save_checkpoint(p, tensors, meta)
    with pytest.raises(ck.CheckpointError, match="bad.safetensors: " + match):
        model_from_checkpoint(p)
