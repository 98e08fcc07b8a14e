"""Hostile and malformed data files: every loader checks values and shapes before training
and raises DataError naming the file; no file can run code, and no header can make a loader
allocate more than the file holds."""
import gzip
import os
import pickle
import struct
import textwrap
import zlib

import numpy as np
import pytest

from _subproc import run_python
from racedit import data

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


# ---- CIFAR-10: a restricted unpickler -------------------------------------------------------

class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2's str opcodes (SHORT_BINSTRING / BINSTRING), as the real
    CIFAR-10 batches (cPickle protocol 2) hold them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        n = len(obj)
        op = (pickle.SHORT_BINSTRING + bytes([n]) if n < 256
              else pickle.BINSTRING + struct.pack("<i", n))
        self.write(op + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def _batch(n, seed=0, labels=None):
    r = np.random.default_rng(seed)
    return {b"batch_label": b"training batch 1 of 5",
            b"labels": list(r.integers(0, 10, n).tolist()) if labels is None else labels,
            b"data": r.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def _py2_dumps(obj):
    import io

    f = io.BytesIO()
    _Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


def _cifar_dir(root, blobs, meta=None):
    d = root / "cifar-10-batches-py"
    os.makedirs(d, exist_ok=True)
    for i, blob in enumerate(blobs, 1):
        (d / f"data_batch_{i}").write_bytes(blob)
    names = {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": 3}
    (d / "batches.meta").write_bytes(pickle.dumps(names, protocol=2) if meta is None else meta)
    return d


@pytest.mark.parametrize("writer", ["py3_protocol2", "py2_numpy_core", "protocol5"])
def test_cifar10_faithful_batches_load(tmp_path, writer):
    """Batches as CIFAR-10 ships them (a dict pickled with protocol 2, NumPy's array
    reconstruction named numpy.core as NumPy 1 wrote it, bytes as Python 2 str) still load,
    as do batches re-saved by NumPy 2 under protocol 5."""
    batches = [_batch(3, seed=i) for i in range(5)]
    if writer == "py3_protocol2":
        blobs = [pickle.dumps(b, protocol=2) for b in batches]
        assert b"_codecs" in blobs[0]  # Python 3 writes bytes as _codecs.encode(str, latin1)
    elif writer == "py2_numpy_core":
        blobs = [_py2_dumps(b).replace(b"numpy._core.", b"numpy.core.") for b in batches]
        assert b"numpy.core.multiarray\n_reconstruct" in blobs[0] and b"_codecs" not in blobs[0]
    else:
        blobs = [pickle.dumps(b, protocol=5) for b in batches]
    _cifar_dir(tmp_path, blobs)
    ds = data.load_cifar10(str(tmp_path))
    assert ds.x.shape == (15, 3, 32, 32) and ds.class_names[9] == "c9"
    np.testing.assert_array_equal(ds.x[3:6].reshape(3, 3072), batches[1][b"data"])
    assert ds.y.tolist() == sum((b[b"labels"] for b in batches), [])


class _Payload:
    """Unpickling this calls open(marker, "w"): the file appears iff code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("where", ["top", "data", "labels"])
def test_cifar10_pickle_payload_never_runs(tmp_path, where):
    marker = str(tmp_path / "pwned")
    b = _batch(3)
    if where == "top":
        b = _Payload(marker)
    else:
        b[b"data" if where == "data" else b"labels"] = _Payload(marker)
    good = pickle.dumps(_batch(3), protocol=2)
    _cifar_dir(tmp_path, [pickle.dumps(b, protocol=2)] + [good] * 4)
    with pytest.raises(data.DataError, match=r"data_batch_1: .*'io\.open' is not allowed"):
        data.load_cifar10(str(tmp_path))
    assert not os.path.exists(marker)


def test_cifar10_meta_payload_never_runs(tmp_path):
    marker = str(tmp_path / "pwned")
    good = pickle.dumps(_batch(3), protocol=2)
    _cifar_dir(tmp_path, [good] * 5, meta=pickle.dumps({b"label_names": _Payload(marker)}))
    ds = data.load_cifar10(str(tmp_path))
    assert ds.class_names == [str(i) for i in range(10)] and not os.path.exists(marker)


def test_cifar10_refuses_other_globals(tmp_path):
    """A hand-written pickle naming os.system, and _codecs.encode with another codec."""
    evil = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
    codec = b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00abX\x03\x00\x00\x00hex\x86R."
    good = pickle.dumps(_batch(3), protocol=2)
    d = _cifar_dir(tmp_path, [evil] + [good] * 4)
    with pytest.raises(data.DataError, match="data_batch_1: .*'os.system' is not allowed"):
        data.load_cifar10(str(tmp_path))
    (d / "data_batch_1").write_bytes(codec)
    with pytest.raises(data.DataError, match="data_batch_1: .*'hex'.* not allowed"):
        data.load_cifar10(str(tmp_path))


@pytest.mark.parametrize("field,value,match", [
    (b"data", np.zeros((3, 3072), np.int64), r"uint8 \(N, 3072\), got int64"),
    (b"data", np.zeros((3, 3072), object), "got object"),
    (b"data", [0] * 3072, "got list"),
    (b"labels", [0, 1, 10], r"labels must lie in \[0, 10\)"),
    (b"labels", [0, 1, -1], r"labels must lie in \[0, 10\)"),
    (b"labels", [b"0", b"1", b"2"], "a list of ints"),
    (b"labels", [0, 1], "label count mismatch"),
])
def test_cifar10_fields_checked(tmp_path, field, value, match):
    b = _batch(3)
    b[field] = value
    good = pickle.dumps(_batch(3), protocol=2)
    _cifar_dir(tmp_path, [good, pickle.dumps(b, protocol=2)] + [good] * 3)
    with pytest.raises(data.DataError, match="data_batch_2: .*" + match):
        data.load_cifar10(str(tmp_path))


# ---- latents: labels, values, shapes, .npy headers --------------------------------------------

def _latents(root, feats, labels):
    os.makedirs(root / "features", exist_ok=True)
    os.makedirs(root / "labels", exist_ok=True)
    for i, (x, y) in enumerate(zip(feats, labels)):
        np.save(root / "features" / f"{i}.npy", x)
        np.save(root / "labels" / f"{i}.npy", y)


def _ok(k=2, shape=(4, 4, 4)):
    return np.random.default_rng(k).standard_normal((k, *shape)).astype(np.float32)


LABEL_BOMB = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from racedit import data
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    try:
        data.load_latents(sys.argv[1])
    except data.DataError as e:
        print("DataError:", e)
""")


def test_latent_label_2_pow_40_is_refused_up_front(tmp_path):
    """Without the bound, ArrayDataset would build 2**40 class names; the child's address
    space is capped so that a regression fails here instead of exhausting the machine."""
    _latents(tmp_path, [_ok(), _ok()], [np.array([0, 1]), np.array([1, 2 ** 40])])
    r = run_python(["-c", LABEL_BOMB, str(tmp_path)], capture_output=True, text=True,
                   timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "DataError:" in r.stdout and os.path.join("labels", "1.npy") in r.stdout
    assert "1099511627776" in r.stdout and str(data.MAX_CLASSES) in r.stdout


def test_latent_label_bounds_name_the_file(tmp_path):
    _latents(tmp_path, [_ok(), _ok()], [np.array([0, 1]), np.array([1, data.MAX_CLASSES])])
    with pytest.raises(data.DataError, match=r"labels[/\\]1\.npy: labels must lie in"):
        data.load_latents(str(tmp_path))
    _latents(tmp_path, [_ok(), _ok()], [np.array([0, 1]), np.array([1, 5])])
    with pytest.raises(data.DataError, match=r"1\.npy: .*\[0, 3\) \(num_classes 3 \(--num-classes\)\)"):
        data.load_latents(str(tmp_path), num_classes=3)
    assert data.load_latents(str(tmp_path), num_classes=6).num_classes == 6
    # a uint64 label beyond int64 must not wrap to a negative (or a valid) value
    _latents(tmp_path, [_ok(), _ok()], [np.array([0, 1]), np.array([1, 2 ** 64 - 1], np.uint64)])
    with pytest.raises(data.DataError, match=r"labels[/\\]1\.npy: labels must lie"):
        data.load_latents(str(tmp_path))
    with pytest.raises(ValueError, match="num_classes: expected an int in"):
        data.load_latents(str(tmp_path), num_classes=2 ** 40)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_latent_non_finite_values(tmp_path, bad):
    x = _ok()
    x[1, 2, 3, 0] = bad
    _latents(tmp_path, [_ok(), x], [np.array([0, 1])] * 2)
    with pytest.raises(data.DataError, match=r"features[/\\]1\.npy: non-finite value .* "
                                             r"at index \(1, 2, 3, 0\)"):
        data.load_latents(str(tmp_path))


def test_latent_float64_beyond_float32(tmp_path):
    x = _ok().astype(np.float64)
    x[0, 0, 0, 0] = 1e300  # finite in float64, inf once stored as float32
    _latents(tmp_path, [x], [np.array([0, 1])])
    with pytest.raises(data.DataError, match=r"0\.npy: non-finite value"):
        data.load_latents(str(tmp_path))


@pytest.mark.parametrize("x", [
    np.full((2, 4, 4, 4), "1.5"),
    np.zeros((2, 4, 4, 4), np.complex64) + 1j,
    np.zeros((2, 4, 4, 4), np.int32),
    np.zeros((2, 4, 4, 4), bool),
], ids=["str", "complex", "int", "bool"])
def test_latent_non_real_dtypes(tmp_path, x):
    _latents(tmp_path, [_ok(), x], [np.array([0, 1])] * 2)
    with pytest.raises(data.DataError, match=r"features[/\\]1\.npy: expected floating-point "
                                             "features, got dtype"):
        data.load_latents(str(tmp_path))


def test_latent_non_integer_labels(tmp_path):
    _latents(tmp_path, [_ok()], [np.array([0.0, 1.5])])
    with pytest.raises(data.DataError, match=r"labels[/\\]0\.npy: expected integer labels"):
        data.load_latents(str(tmp_path))


def test_latent_non_square(tmp_path):
    _latents(tmp_path, [_ok(shape=(4, 4, 6))], [np.array([0, 1])])
    with pytest.raises(data.DataError, match=r"0\.npy: expected square latents \(H == W\), "
                                             r"got shape \(4, 4, 6\)"):
        data.load_latents(str(tmp_path))


def _npy_with_header(fp, shape, descr="<f4", body=b""):
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * ((64 - (10 + len(header) + 1) % 64) % 64) + b"\n"
    fp.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + body)


@pytest.mark.parametrize("shape", [(2 ** 50,), (2, 4, 2 ** 20, 2 ** 20), (1, 4, 4, 4)])
def test_npy_header_larger_than_file(tmp_path, shape):
    """A header claiming petabytes (or just more than is there) is refused before any
    allocation, naming the file, the shape and both sizes."""
    _latents(tmp_path, [_ok()], [np.array([0, 1])])
    _npy_with_header(tmp_path / "features" / "0.npy", shape, body=b"\0" * 100)
    need = int(np.prod(shape, dtype=object)) * 4
    with pytest.raises(data.DataError, match=rf"0\.npy: header claims shape .* \({need} bytes\) "
                                             r"but the file holds 100 bytes"):
        data.load_latents(str(tmp_path))


def test_npy_header_garbage(tmp_path):
    _latents(tmp_path, [_ok()], [np.array([0, 1])])
    _npy_with_header(tmp_path / "features" / "0.npy", "(2, 'x')")
    with pytest.raises(data.DataError, match=r"0\.npy: cannot read \.npy"):
        data.load_latents(str(tmp_path))


# ---- MNIST IDX headers and shapes -------------------------------------------------------------

def _idx_raw(fp, magic, dims, body=b"", gz=False):
    raw = struct.pack(">I", magic) + struct.pack(">" + "I" * len(dims), *dims) + body
    (gzip.open if gz else open)(fp, "wb").write(raw)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_header_product_wraps(tmp_path, gz):
    """2**31 * 2**31 * 4 is 0 in int64: the old size check passed an empty body."""
    sfx = ".gz" if gz else ""
    _idx_raw(str(tmp_path / f"train-images-idx3-ubyte{sfx}"), 2051, (2 ** 31, 2 ** 31, 4), gz=gz)
    _idx_raw(str(tmp_path / f"train-labels-idx1-ubyte{sfx}"), 2049, (0,), gz=gz)
    with pytest.raises(data.DataError, match=r"images-idx3-ubyte.*: header says \(2147483648, "
                                             r"2147483648, 4\) \(18446744073709551616 bytes\) "
                                             "but holds 0 bytes"):
        data.load_mnist(str(tmp_path))


def test_mnist_extra_bytes(tmp_path):
    _idx_raw(str(tmp_path / "train-images-idx3-ubyte"), 2051, (1, 2, 2), b"\0" * 5)
    _idx_raw(str(tmp_path / "train-labels-idx1-ubyte"), 2049, (1,), b"\0")
    with pytest.raises(data.DataError, match=r"images-idx3-ubyte: header says .* holds more"):
        data.load_mnist(str(tmp_path))


def test_mnist_non_square_digits(tmp_path):
    _idx_raw(str(tmp_path / "train-images-idx3-ubyte"), 2051, (2, 28, 30), b"\0" * (2 * 28 * 30))
    _idx_raw(str(tmp_path / "train-labels-idx1-ubyte"), 2049, (2,), b"\0\1")
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte: expected square digits, "
                                             "got 28x30 pixels"):
        data.load_mnist(str(tmp_path))


def test_mnist_label_out_of_range(tmp_path):
    _idx_raw(str(tmp_path / "train-images-idx3-ubyte"), 2051, (2, 28, 28), b"\0" * (2 * 784))
    _idx_raw(str(tmp_path / "train-labels-idx1-ubyte"), 2049, (2,), b"\1\x0c")
    with pytest.raises(data.DataError, match=r"train-labels-idx1-ubyte: labels must lie in "
                                             r"\[0, 10\).*got \[1, 12\]"):
        data.load_mnist(str(tmp_path))


def test_mnist_truncated_gzip(tmp_path):
    fp = tmp_path / "train-images-idx3-ubyte.gz"
    _idx_raw(str(fp), 2051, (2, 28, 28), b"\7" * (2 * 784), gz=True)
    fp.write_bytes(fp.read_bytes()[:30])
    _idx_raw(str(tmp_path / "train-labels-idx1-ubyte"), 2049, (2,), b"\0\1")
    with pytest.raises(data.DataError, match=r"images-idx3-ubyte\.gz: cannot read"):
        data.load_mnist(str(tmp_path))


# ---- image folders: decompression bombs, channels ----------------------------------------------

def _png_header_only(fp, w, h):
    """A PNG whose IHDR claims w x h 8-bit grayscale (the pixel data is never reached)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    fp.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                   + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _one_image_folder(root, arr=None):
    os.makedirs(root / "a", exist_ok=True)
    arr = np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8) if arr is None else arr
    Image.fromarray(arr).save(root / "a" / "0.png")
    return root / "a"


def test_folder_pixel_limit_checked_before_decoding(tmp_path, monkeypatch):
    _one_image_folder(tmp_path)
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 1999)
    with pytest.raises(data.DataError, match=r"0\.png: 50x40 pixels exceed the limit of 1999"):
        data.load_folder(str(tmp_path), 16)
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 2000)
    assert data.load_folder(str(tmp_path), 16).x.shape == (1, 3, 16, 16)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [9000, 20000])  # ours (81 M > 67 M), then Pillow's (400 M)
def test_folder_decompression_bomb(tmp_path, side):
    d = _one_image_folder(tmp_path)
    _png_header_only(d / "bomb.png", side, side)
    with pytest.raises(data.DataError, match=rf"bomb\.png: .*{side}x{side}|bomb\.png: image too large"):
        data.load_folder(str(tmp_path), 16)


def test_folder_channels(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (16, 16, 3), np.uint8)
    _one_image_folder(tmp_path, arr)
    g = data.load_folder(str(tmp_path), 16, channels=1)
    assert g.x.shape == (1, 1, 16, 16) and g.channels == 1
    np.testing.assert_array_equal(g.x[0, 0], np.asarray(Image.fromarray(arr).convert("L")))
    rgb = data.load_data("folder", str(tmp_path), image_size=16)
    np.testing.assert_array_equal(rgb.x[0], arr.transpose(2, 0, 1))
    assert data.load_data("folder", str(tmp_path), image_size=16, channels=1).channels == 1
    with pytest.raises(ValueError, match="channels: expected 1 .* or 3 .*, got 2"):
        data.load_folder(str(tmp_path), 16, channels=2)
    with pytest.raises(ValueError, match="channels: expected 1 or 3, got 4"):
        data.load_data("folder", str(tmp_path), channels=4)


def test_load_data_channels_of_other_kinds(tmp_path):
    assert data.load_data("builtin", n=10, channels=3).channels == 3
    with pytest.raises(ValueError, match="channels: builtin data has 3, got 1 "
                                         r"\(channels converts image folders only\)"):
        data.load_data("builtin", n=10, channels=1)


# ---- settings and the --data words -------------------------------------------------------------

def test_parse_data_arg(tmp_path):
    p = str(tmp_path)
    assert data.parse_data_arg(["builtin"]) == ("builtin", None)
    assert data.parse_data_arg(["latents", p]) == ("latents", p)
    with pytest.raises(ValueError) as e:
        data.parse_data_arg([p])
    assert str(e.value) == (f"--data: {p!r} is not a data kind; expected one of builtin | "
                            f"folder PATH | latents PATH | mnist PATH | cifar10 PATH "
                            f"(e.g. --data folder {p})")
    with pytest.raises(ValueError, match="'imagenet' is not a data kind; expected one of "
                                         r"builtin \| folder PATH \| .*cifar10 PATH$"):
        data.parse_data_arg(["imagenet"])
    with pytest.raises(ValueError, match="--data folder needs exactly one PATH, got 0"):
        data.parse_data_arg(["folder"])
    with pytest.raises(ValueError, match="--data mnist needs exactly one PATH, got 2"):
        data.parse_data_arg(["mnist", p, p])
    with pytest.raises(ValueError, match="--data builtin takes no path"):
        data.parse_data_arg(["builtin", p])
    with pytest.raises(ValueError, match="--data: expected one of builtin"):
        data.parse_data_arg([])


@pytest.mark.parametrize("kw,match", [
    (dict(image_size=0), "image_size: expected an int in"),
    (dict(image_size=10 ** 6), "image_size: expected an int in"),
    (dict(image_size=32.5), "image_size: expected an int in"),
    (dict(num_classes=0), "num_classes: expected an int in"),
    (dict(num_classes=2 ** 40), "num_classes: expected an int in"),
])
def test_load_data_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        data.load_data("builtin", n=10, **kw)


def test_array_dataset_checks_values_and_shapes():
    with pytest.raises(data.DataError, match="src: expected square images, got 2x3"):
        data.ArrayDataset(np.zeros((1, 1, 2, 3), np.float32), [0], source="src")
    x = np.zeros((2, 1, 2, 2), np.float32)
    x[1, 0, 1, 0] = np.nan
    with pytest.raises(data.DataError, match=r"src: non-finite value nan at index \(1, 0, 1, 0\)"):
        data.ArrayDataset(x, [0, 1], source="src")
    with pytest.raises(data.DataError, match="src: expected real numbers .*, got complex128"):
        data.ArrayDataset(np.zeros((1, 1, 2, 2), complex), [0], source="src")
    with pytest.raises(data.DataError, match=r"labels must lie in \[0, 65536\)"):
        data.ArrayDataset(np.zeros((1, 1, 2, 2), np.uint8), [2 ** 40])
    with pytest.raises(data.DataError, match="expected integer labels, got float64"):
        data.ArrayDataset(np.zeros((1, 1, 2, 2), np.uint8), [np.nan])
    with pytest.raises(ValueError, match="num_classes: expected an int in"):
        data.ArrayDataset(np.zeros((1, 1, 2, 2), np.uint8), [0], num_classes=2 ** 40)
    with pytest.raises(data.DataError, match=r"src: at most 1024 channels .*got shape \(1025, 1, 1\)"):
        data.ArrayDataset(np.zeros((1, 1025, 1, 1), np.uint8), [0], source="src")
    with pytest.raises(data.DataError, match=r"src: at most .*got shape \(1, 4097, 4097\)"):
        data.ArrayDataset(np.zeros((1, 1, 4097, 4097), np.uint8), [0], source="src")
    ds = data.ArrayDataset(np.ones((1, 1, 2, 2), np.float64), np.array([3.0]))
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64 and ds.num_classes == 4
