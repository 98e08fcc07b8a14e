"""Data loaders: the built-in shapes, image folders, fast-DiT latents, MNIST IDX and CIFAR-10
batches, from tiny fixtures; bad data raises DataError naming the file."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from racedit import data

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


# ---- built-in shapes ------------------------------------------------------------------

def test_builtin_is_deterministic_and_balanced():
    x1, y1 = data.make_shapes(200, seed=3)
    x2, y2 = data.make_shapes(200, seed=3)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    x3, _ = data.make_shapes(200, seed=4)
    assert not np.array_equal(x1, x3)
    assert x1.shape == (200, 3, 32, 32) and x1.dtype == np.uint8
    assert np.bincount(y1, minlength=10).tolist() == [20] * 10


def test_builtin_classes_differ_and_fill_sensibly():
    x, y = data.make_shapes(500, seed=0)
    ds = data.ArrayDataset(x, y, 10, data.SHAPE_CLASSES)
    xb, yb = ds.batch(np.arange(500))
    assert xb.dtype == np.float32 and xb.min() >= -1 and xb.max() <= 1
    # foreground share per class: each shape covers a distinct part of its box
    fg = (np.abs(xb - xb[:, :, :1, :1]).sum(1) > 0.3).mean(axis=(1, 2))
    means = np.array([fg[y == c].mean() for c in range(10)])
    assert np.all(means > 0.03) and np.all(means < 0.6)
    assert len(data.SHAPE_CLASSES) == 10


def test_builtin_shape_masks_are_distinct():
    """Rendered at one place and size, no two classes share a mask."""
    g = (np.arange(64) + 0.5) / 32 - 1
    u, v = np.meshgrid(g, g)
    masks = [data._shape_mask(c, u[None], v[None])[0] for c in range(10)]
    for a in range(10):
        assert masks[a].mean() > 0.05
        for b in range(a + 1, 10):
            assert (masks[a] != masks[b]).mean() > 0.05, (a, b)


def test_load_data_builtin():
    ds = data.load_data("builtin", n=30, seed=1)
    assert len(ds) == 30 and ds.num_classes == 10 and ds.kind == "pixels"
    assert ds.class_names[0] == "circle" and ds.channels == 3 and ds.image_size == 32
    with pytest.raises(ValueError, match="data: .imagenet. is not a data kind; expected one of builtin"):
        data.load_data("imagenet")
    with pytest.raises(ValueError, match="needs a path"):
        data.load_data("folder")


# ---- image folders -----------------------------------------------------------------------

def _write_folder(root, sizes=((40, 50), (64, 32)), classes=("cat", "dog")):
    r = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c)
        for i, (w, h) in enumerate(sizes):
            arr = r.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")


def test_folder(tmp_path):
    _write_folder(tmp_path)
    ds = data.load_folder(str(tmp_path), image_size=16)
    assert len(ds) == 4 and ds.x.shape == (4, 3, 16, 16)
    assert ds.class_names == ["cat", "dog"] and ds.y.tolist() == [0, 0, 1, 1]


def test_center_crop_arr():
    arr = np.zeros((40, 100, 3), np.uint8)
    arr[:, 30:70] = 255  # a white centre band survives the centre crop
    out = data.center_crop_arr(Image.fromarray(arr), 20)
    assert out.shape == (20, 20, 3)
    assert out[:, 3:17].min() > 200


def test_folder_grayscale_converted(tmp_path):
    os.makedirs(tmp_path / "a")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "a" / "g.png")
    assert data.load_folder(str(tmp_path), 8).x.shape == (1, 3, 8, 8)


def test_folder_errors(tmp_path):
    with pytest.raises(data.DataError, match="not found"):
        data.load_folder(str(tmp_path / "nope"))
    with pytest.raises(data.DataError, match="no class sub-folders"):
        data.load_folder(str(tmp_path))
    _write_folder(tmp_path)
    bad = tmp_path / "dog" / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(data.DataError, match="bad.png"):
        data.load_folder(str(tmp_path), 16)
    bad.unlink()
    os.makedirs(tmp_path / "empty")
    with pytest.raises(data.DataError, match="empty.*no images"):
        data.load_folder(str(tmp_path), 16)


# ---- latents -------------------------------------------------------------------------------

def _write_latents(root, n=3, feat="features", lab="labels", shape=(1, 4, 4, 4)):
    os.makedirs(root / feat)
    os.makedirs(root / lab)
    r = np.random.default_rng(1)
    for i in range(n):
        np.save(root / feat / f"{i}.npy", r.standard_normal(shape).astype(np.float32))
        np.save(root / lab / f"{i}.npy", np.array([i % 2]))


def test_latents(tmp_path):
    _write_latents(tmp_path)
    ds = data.load_latents(str(tmp_path), num_classes=1000)
    assert ds.x.shape == (3, 4, 4, 4) and ds.kind == "latents" and ds.num_classes == 1000
    xb, yb = ds.batch(np.array([2, 0]))
    np.testing.assert_array_equal(xb[0], np.load(tmp_path / "features" / "2.npy")[0])
    assert yb.tolist() == [0, 0]


def test_latents_fastdit_names(tmp_path):
    _write_latents(tmp_path, feat="imagenet256_features", lab="imagenet256_labels",
                   shape=(4, 2, 2))
    ds = data.load_latents(str(tmp_path))
    assert ds.x.shape == (3, 4, 2, 2) and ds.num_classes == 2


def test_latents_errors(tmp_path):
    with pytest.raises(data.DataError, match="not found"):
        data.load_latents(str(tmp_path / "x"))
    with pytest.raises(data.DataError, match="no 'features'"):
        data.load_latents(str(tmp_path))
    _write_latents(tmp_path)
    np.save(tmp_path / "features" / "9.npy", np.zeros((1, 4, 8, 8), np.float32))
    np.save(tmp_path / "labels" / "9.npy", np.array([0]))
    with pytest.raises(data.DataError, match="9.npy.*mixed sizes"):
        data.load_latents(str(tmp_path))
    np.save(tmp_path / "features" / "9.npy", np.zeros((1, 4, 4, 4), np.float32))
    np.save(tmp_path / "labels" / "9.npy", np.array([0, 1]))
    with pytest.raises(data.DataError, match="9.npy.*label count mismatch"):
        data.load_latents(str(tmp_path))
    os.remove(tmp_path / "labels" / "9.npy")
    with pytest.raises(data.DataError, match="9.npy: no matching label file"):
        data.load_latents(str(tmp_path))
    os.remove(tmp_path / "features" / "9.npy")
    np.save(tmp_path / "labels" / "7.npy", np.array([0]))
    with pytest.raises(data.DataError, match="7.npy: label file without features"):
        data.load_latents(str(tmp_path))
    os.remove(tmp_path / "labels" / "7.npy")
    (tmp_path / "features" / "1.npy").write_bytes(b"garbage")
    with pytest.raises(data.DataError, match="1.npy: cannot read"):
        data.load_latents(str(tmp_path))


# ---- MNIST / CIFAR-10 ------------------------------------------------------------------------

def _idx(fp, arr, magic, gz=False):
    body = struct.pack(">I", magic) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()
    (gzip.open if gz else open)(fp, "wb").write(body)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist(tmp_path, gz):
    x = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    sfx = ".gz" if gz else ""
    _idx(str(tmp_path / f"train-images-idx3-ubyte{sfx}"), x, 2051, gz)
    _idx(str(tmp_path / f"train-labels-idx1-ubyte{sfx}"), np.arange(5, dtype=np.uint8), 2049, gz)
    ds = data.load_mnist(str(tmp_path))
    assert ds.x.shape == (5, 1, 32, 32) and ds.y.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(ds.x[:, 0, 2:30, 2:30], x)


def test_mnist_errors(tmp_path):
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte"):
        data.load_mnist(str(tmp_path))
    x = np.zeros((5, 28, 28), np.uint8)
    _idx(str(tmp_path / "train-images-idx3-ubyte"), x, 2051)
    _idx(str(tmp_path / "train-labels-idx1-ubyte"), np.arange(4, dtype=np.uint8), 2049)
    with pytest.raises(data.DataError, match="labels-idx1-ubyte.*label count mismatch"):
        data.load_mnist(str(tmp_path))
    _idx(str(tmp_path / "train-labels-idx1-ubyte"), np.arange(5, dtype=np.uint8), 2051)
    with pytest.raises(data.DataError, match="not an IDX file"):
        data.load_mnist(str(tmp_path))
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-10])
    _idx(str(tmp_path / "train-labels-idx1-ubyte"), np.arange(5, dtype=np.uint8), 2049)
    with pytest.raises(data.DataError, match="images-idx3-ubyte.*truncated"):
        data.load_mnist(str(tmp_path))


def _cifar(root, n=4, bad=None):
    os.makedirs(root / "cifar-10-batches-py")
    d = root / "cifar-10-batches-py"
    r = np.random.default_rng(0)
    for i in range(1, 6):
        b = {b"data": r.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        if bad == i:
            b[b"labels"] = list(range(n + 1))
        pickle.dump(b, open(d / f"data_batch_{i}", "wb"))
    pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, open(d / "batches.meta", "wb"))


def test_cifar10(tmp_path):
    _cifar(tmp_path)
    ds = data.load_cifar10(str(tmp_path))
    assert ds.x.shape == (20, 3, 32, 32) and ds.class_names[3] == "c3"


def test_cifar10_errors(tmp_path):
    with pytest.raises(data.DataError, match="not found"):
        data.load_cifar10(str(tmp_path / "none"))
    _cifar(tmp_path, bad=3)
    with pytest.raises(data.DataError, match="data_batch_3.*label count mismatch"):
        data.load_cifar10(str(tmp_path))
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x00junk")
    with pytest.raises(data.DataError, match="data_batch_2: not a CIFAR-10"):
        data.load_cifar10(str(tmp_path))
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_5")
    with pytest.raises(data.DataError, match="data_batch_2|data_batch_5"):
        data.load_cifar10(str(tmp_path))


def test_array_dataset_errors():
    with pytest.raises(data.DataError, match="labels"):
        data.ArrayDataset(np.zeros((3, 1, 2, 2), np.uint8), np.zeros(2))
    with pytest.raises(data.DataError, match=r"labels must lie in \[0, 2\)"):
        data.ArrayDataset(np.zeros((2, 1, 2, 2), np.uint8), np.array([0, 2]), num_classes=2)
    with pytest.raises(data.DataError, match="no samples"):
        data.ArrayDataset(np.zeros((0, 1, 2, 2), np.uint8), np.zeros(0))
