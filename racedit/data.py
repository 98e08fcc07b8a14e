"""racedit.data — the training sets, checked before training starts.

* ``builtin``: 10 classes of coloured shapes (:data:`SHAPE_CLASSES`), 32x32 RGB, drawn
  deterministically from a seed by vectorised NumPy rasterisation (no download, no files).
* ``folder PATH``: images in ImageNet layout (one sub-folder per class, classes in sorted
  order), center-cropped and resized as DiT's ``center_crop_arr`` (Pillow).
* ``latents PATH``: pre-encoded SD-VAE latents in fast-DiT's layout, ``PATH/features/*.npy``
  and ``PATH/labels/*.npy`` (or ``*_features`` / ``*_labels``, e.g. ``imagenet256_features``),
  paired by file name; each features file (C,H,W) or (k,C,H,W), its label file () or (k,).
* ``mnist PATH``: the IDX files (``train-images-idx3-ubyte`` / ``-labels-idx1-ubyte``, gzipped
  or not), padded to the image size.
* ``cifar10 PATH``: the CIFAR-10 python batches (``data_batch_1..5``, ``batches.meta``).

The loaders return an :class:`ArrayDataset` held in memory (images as uint8, converted to
float32 in [-1, 1] per batch; latents as float32), checked whole before training starts.
Image and latent folders, which hold a file per sample (or per block of samples), can
instead be read per batch (:class:`LazyDataset`): for each rank of a multi-rank run, which
then checks only its share of the files (file i on rank i % W), and for a set of more than
:data:`LAZY_BYTES`. The values are the same bit for bit either way.
Files are untrusted: headers are checked against the file size before anything is
allocated (``.npy``, IDX), images against :data:`MAX_IMAGE_PIXELS` before they are decoded,
CIFAR-10 pickles are read by an unpickler that can build nothing but containers, strings,
numbers and NumPy arrays. Bad data — a missing folder, images of mixed or non-square sizes,
a corrupt file, a label count that does not match, a label out of range, a NaN/Inf or
non-real latent — raises :class:`DataError` naming the file.
"""
import gzip
import math
import os
import pickle
import struct
import zlib

import numpy as np

__all__ = [
    "SHAPE_CLASSES", "DataError", "ArrayDataset", "make_shapes", "load_builtin",
    "folder_files", "load_folder", "load_latents", "load_mnist", "load_cifar10", "load_data",
    "parse_data_arg", "center_crop_arr", "DATA_KINDS", "MAX_CLASSES", "MAX_IMAGE_SIZE",
    "MAX_CHANNELS", "MAX_IMAGE_PIXELS", "read_image", "check_image_size", "LAZY_BYTES",
    "LazyDataset", "ImageFolderDataset", "LatentFolderDataset",
]

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "ring", "horizontal bars",
                 "vertical bars", "diamond", "checker", "star")
DATA_KINDS = ("builtin", "folder", "latents", "mnist", "cifar10")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
# Sanity bounds: a label, side or channel count beyond them is a corrupt file, not a data
# set (ImageNet-21k has 21,841 classes); a label of 2**40 would otherwise build 2**40 names.
# Checkpoint metadata is held to the same bounds (racedit.checkpoint).
MAX_CLASSES = 1 << 16
MAX_IMAGE_SIZE = 4096
MAX_CHANNELS = 1024
# Images with more pixels are refused from their header, before decoding (decompression
# bombs); Pillow's own limit only warns below twice its 89 M.
MAX_IMAGE_PIXELS = 1 << 26


class DataError(ValueError):
    """A data set that cannot be used; the message names the offending file or folder."""


class ArrayDataset:
    """A labelled data set in memory.

    x: (N, C, H, W) uint8 images (0..255) or float32 values (latents, or images already in
    [-1, 1]); y: (N,) int64 labels in [0, num_classes). kind: "pixels" or "latents".
    ``batch(idx)`` returns (x float32 (B,C,H,W), y int64 (B,)), uint8 mapped to [-1, 1].
    """

    def __init__(self, x, y, num_classes=None, class_names=None, kind="pixels", source=""):
        where = source or "data"
        x = np.asarray(x)
        y = np.asarray(y)
        if x.ndim != 4:
            raise DataError(f"{where}: expected images (N, C, H, W), got shape {x.shape}")
        _check_sample_shape(where, x.shape[1:])
        if y.shape != (x.shape[0],):
            raise DataError(f"{where}: {x.shape[0]} images but labels of shape {y.shape}")
        if x.shape[0] == 0:
            raise DataError(f"{where}: no samples")
        self.x = _real_values(x, where)
        _set_labels(self, y, num_classes, class_names, kind, source)

    def __len__(self):
        return self.x.shape[0]

    @property
    def channels(self):
        return self.x.shape[1]

    @property
    def image_size(self):
        return self.x.shape[2]

    def batch(self, idx):
        """(x float32 (B,C,H,W), y int64 (B,)) for the index array idx."""
        x = self.x[idx]
        if x.dtype == np.uint8:
            x = _unit_range(x)
        return np.ascontiguousarray(x, np.float32), self.y[idx]

    def __repr__(self):
        return (f"ArrayDataset({len(self)} x {tuple(self.x.shape[1:])}, {self.num_classes} "
                f"classes, kind={self.kind!r}, source={self.source!r})")


def _unit_range(x):
    """uint8 pixels (0..255) as float32 in [-1, 1]."""
    return x.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def _check_sample_shape(where, shape):
    """DataError unless a sample's (C, H, W) is square and within what a checkpoint holds."""
    if shape[1] != shape[2]:
        raise DataError(f"{where}: expected square images, got {shape[1]}x{shape[2]}")
    if shape[0] > MAX_CHANNELS or shape[1] > MAX_IMAGE_SIZE:
        raise DataError(f"{where}: at most {MAX_CHANNELS} channels of {MAX_IMAGE_SIZE}^2 "
                        f"pixels (what a checkpoint may hold), got shape {tuple(shape)}")


def _set_labels(ds, y, num_classes, class_names, kind, source):
    """The label fields of a data set (y checked, num_classes inferred when None)."""
    num_classes = _check_num_classes(num_classes)
    ds.y = _check_labels(y, source or "data", num_classes)
    if num_classes is None:
        num_classes = int(ds.y.max()) + 1
    ds.num_classes = int(num_classes)
    ds.class_names = (list(class_names) if class_names is not None
                      else [str(i) for i in range(ds.num_classes)])
    ds.kind = kind
    ds.source = source


def _check_num_classes(num_classes, name="num_classes"):
    """None, or an int in [1, MAX_CLASSES] (ValueError naming ``name`` otherwise)."""
    if num_classes is None:
        return None
    if (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
            or not 1 <= num_classes <= MAX_CLASSES):
        raise ValueError(f"{name}: expected an int in [1, {MAX_CLASSES}], got {num_classes!r}")
    return int(num_classes)


def _check_labels(y, where, num_classes=None):
    """Labels as int64, each an integer in [0, num_classes) (or [0, MAX_CLASSES)), checked
    in their own dtype before any cast (a uint64 or 1e30 label must not wrap)."""
    if y.size == 0:
        return y.astype(np.int64)
    integral = y.dtype.kind in "iu" or (y.dtype.kind == "f" and bool(np.isfinite(y).all())
                                        and bool((y == np.floor(y)).all()))
    if not integral:
        raise DataError(f"{where}: expected integer labels, got {y.dtype}")
    bound = MAX_CLASSES if num_classes is None else num_classes
    lo, hi = y.min(), y.max()
    if lo < 0 or hi >= bound:
        what = (f"num_classes {num_classes} (--num-classes)" if num_classes is not None
                else f"at most {MAX_CLASSES} classes")
        raise DataError(f"{where}: labels must lie in [0, {bound}) ({what}), got [{lo}, {hi}]")
    return y.astype(np.int64)


def _real_values(x, where):
    """uint8 pixels as they are; any other real array as float32, every value finite."""
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind not in "biuf":
        raise DataError(f"{where}: expected real numbers (uint8 or float), got {x.dtype}")
    with np.errstate(over="ignore"):  # what overflows to inf is reported below
        x = x.astype(np.float32, copy=False)
    bad = ~np.isfinite(x)
    if bad.any():
        i = np.unravel_index(int(np.argmax(bad)), x.shape)
        raise DataError(f"{where}: non-finite value {x[i]} at index {tuple(map(int, i))} "
                        "(or a value beyond float32's range)")
    return x


# ---- the built-in shapes -------------------------------------------------------------------

def _hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB, all (N,) in [0, 1]; returns (N, 3)."""
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(c, -1) for c in
                      ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return table[i, np.arange(h.shape[0])]  # (N, 3)


def _shape_mask(c, u, v):
    """Coverage mask of class c at normalised coordinates u, v (x right, y down; the shape
    spans about [-1, 1]). u, v: (n, P, P) float; returns bool (n, P, P)."""
    au, av = np.abs(u), np.abs(v)
    r = np.sqrt(u * u + v * v)
    inside = (au <= 0.9) & (av <= 0.9)
    if c == 0:  # circle
        return r <= 1.0
    if c == 1:  # square
        return np.maximum(au, av) <= 0.82
    if c == 2:  # triangle, apex up
        return (v <= 0.75) & (au <= 0.95 * (v + 0.95) / 1.7)
    if c == 3:  # cross (plus)
        return ((au <= 0.34) & (av <= 0.95)) | ((av <= 0.34) & (au <= 0.95))
    if c == 4:  # ring
        return (r >= 0.58) & (r <= 1.0)
    if c == 5:  # horizontal bars: 3 bars of 5 bands
        return inside & (np.floor((v + 0.9) / 0.36).astype(np.int64) % 2 == 0)
    if c == 6:  # vertical bars
        return inside & (np.floor((u + 0.9) / 0.36).astype(np.int64) % 2 == 0)
    if c == 7:  # diamond
        return au + av <= 1.0
    if c == 8:  # checker, 2x2
        return inside & ((u < 0) == (v < 0))
    if c == 9:  # five-pointed star, a point up
        theta = np.arctan2(u, -v)
        return r <= 0.45 + 0.6 * np.abs(np.cos(2.5 * theta)) ** 4
    raise ValueError(c)


def make_shapes(n, seed=0, image_size=32, supersample=2):
    """The built-in data set: ``n`` images of :data:`SHAPE_CLASSES`, labels balanced
    (``i % 10`` shuffled), random position, size and colour, on a dark background.

    Deterministic in (n, seed, image_size). Returns (x uint8 (n, 3, S, S), y int64 (n,)).
    Edges are anti-aliased by averaging ``supersample``^2 sub-pixels.
    """
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    if image_size < 8:
        raise ValueError(f"image_size: expected >= 8, got {image_size}")
    rng = np.random.default_rng(seed)
    S, ss = int(image_size), int(supersample)
    y = rng.permutation(np.arange(n) % len(SHAPE_CLASSES)).astype(np.int64)
    half = rng.uniform(0.28, 0.42, n) * S                    # (n,) half-size in pixels
    room = np.minimum(S / 2 - 0.5 - half, S / 8)             # centre jitter: inside, <= S/8
    cx = S / 2 + rng.uniform(-1, 1, n) * room
    cy = S / 2 + rng.uniform(-1, 1, n) * room
    fg = _hsv_to_rgb(rng.random(n), rng.uniform(0.55, 1.0, n), rng.uniform(0.75, 1.0, n))
    bg = _hsv_to_rgb(rng.random(n), rng.uniform(0.0, 0.5, n), rng.uniform(0.0, 0.25, n))
    P = S * ss
    grid = (np.arange(P) + 0.5) / ss                          # (P,) sub-pixel centres
    cover = np.zeros((n, S, S), np.float32)
    for c in range(len(SHAPE_CLASSES)):                       # one vectorised pass per class
        idx = np.flatnonzero(y == c)
        for lo in range(0, idx.size, 1024):                   # bounded memory
            j = idx[lo:lo + 1024]
            u = (grid[None, None, :] - cx[j, None, None]) / half[j, None, None]   # (n,1,P)
            v = (grid[None, :, None] - cy[j, None, None]) / half[j, None, None]   # (n,P,1)
            u, v = np.broadcast_arrays(u, v)
            m = _shape_mask(c, u, v).astype(np.float32)       # (n,P,P)
            cover[j] = m.reshape(-1, S, ss, S, ss).mean(axis=(2, 4))
    img = (bg[:, :, None, None] * (1 - cover[:, None]) + fg[:, :, None, None] * cover[:, None])
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8), y


def load_builtin(n=10000, seed=0, image_size=32):
    """The built-in shapes as an :class:`ArrayDataset` (10 classes, kind "pixels")."""
    x, y = make_shapes(n, seed, image_size)
    return ArrayDataset(x, y, len(SHAPE_CLASSES), SHAPE_CLASSES, "pixels",
                        f"builtin(n={n}, seed={seed})")


# ---- image folders ---------------------------------------------------------------------

def center_crop_arr(pil_image, image_size):
    """DiT's (ADM's) preprocessing: halve with a box filter while the short side is at least
    twice the target, resize bicubically so the short side is ``image_size``, then crop the
    centre square. Returns a uint8 (image_size, image_size, 3) array ((image_size,
    image_size) for a one-channel "L" image)."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size),
                                 resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def folder_files(path):
    """(files, labels, classes) of an ImageNet-layout folder (``path/<class>/<image>``):
    the image paths relative to ``path``, class by class in sorted order, each class's
    images sorted by name; labels (N,) int64; the sorted class names. DataError for a
    missing folder, no classes or an empty class."""
    if not os.path.isdir(path):
        raise DataError(f"{path}: image folder not found")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise DataError(f"{path}: no class sub-folders (expected ImageNet layout "
                        "path/<class>/<image>)")
    files, labels = [], []
    for ci, cname in enumerate(classes):
        cdir = os.path.join(path, cname)
        names = sorted(f for f in os.listdir(cdir) if f.lower().endswith(IMAGE_EXTS))
        if not names:
            raise DataError(f"{cdir}: class folder holds no images ({', '.join(IMAGE_EXTS)})")
        files += [os.path.join(cname, f) for f in names]
        labels += [ci] * len(names)
    return files, np.asarray(labels, np.int64), classes


def load_folder(path, image_size=32, channels=3, shard=(0, 1), lazy=None):
    """Images in ImageNet layout (``path/<class>/<image>``), converted to RGB
    (``channels=3``) or grayscale (``channels=1``, Pillow's "L") and center-cropped to
    ``image_size``. Class indices follow the sorted folder names. DataError for a missing
    folder, no classes, an empty class or an unreadable image or one of more than
    :data:`MAX_IMAGE_PIXELS` pixels (naming it).

    ``shard`` = (rank, world size). In memory (an :class:`ArrayDataset`, every image
    opened now) when ``lazy`` is False, or when it is None, the world size is 1 and the
    decoded images fit :data:`LAZY_BYTES`; otherwise an :class:`ImageFolderDataset` that
    decodes now only the images i with i % W == rank (to check them) and reads the
    others' at ``batch()``."""
    check_image_size(image_size)
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 (grayscale) or 3 (RGB), got {channels!r}")
    rank, size = _check_shard(shard)
    files, labels, classes = folder_files(path)
    if _use_lazy(lazy, size, lambda: len(files) * channels * image_size ** 2):
        return ImageFolderDataset(path, files, labels, classes, image_size, channels, shard)
    xs = [read_image(os.path.join(path, f), image_size, channels)
          .reshape(image_size, image_size, channels).transpose(2, 0, 1) for f in files]
    return ArrayDataset(np.stack(xs), labels, len(classes), classes, "pixels", path)


def read_image(fp, image_size, channels):
    """One image, its size checked from the header before it is decoded, converted to
    "L" or "RGB" and center-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(fp) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise DataError(f"{fp}: {w}x{h} pixels exceed the limit of {MAX_IMAGE_PIXELS} "
                                "(decompression bomb?)")
            im.load()
            return center_crop_arr(im.convert("L" if channels == 1 else "RGB"), image_size)
    except Image.DecompressionBombError as e:  # Pillow's own limit, hit at open
        raise DataError(f"{fp}: image too large ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{fp}: cannot read image ({e})") from None


def check_image_size(image_size):
    """ValueError unless image_size is an int in [1, MAX_IMAGE_SIZE]."""
    if (isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer))
            or not 1 <= image_size <= MAX_IMAGE_SIZE):
        raise ValueError(f"image_size: expected an int in [1, {MAX_IMAGE_SIZE}], "
                         f"got {image_size!r}")


# ---- fast-DiT latents --------------------------------------------------------------------

def _latent_dirs(path):
    if not os.path.isdir(path):
        raise DataError(f"{path}: latent folder not found")
    if os.path.isdir(os.path.join(path, "features")):
        f, l = os.path.join(path, "features"), os.path.join(path, "labels")
    else:
        feats = sorted(d for d in os.listdir(path) if d.endswith("_features"))
        if not feats:
            raise DataError(f"{path}: no 'features' (or '*_features') folder "
                            "(expected fast-DiT's layout features/*.npy, labels/*.npy)")
        f = os.path.join(path, feats[0])
        l = os.path.join(path, feats[0][: -len("_features")] + "_labels")
    if not os.path.isdir(l):
        raise DataError(f"{l}: labels folder not found (it must sit beside {f})")
    return f, l


def _npy_header(f, fp, order=False):
    """(shape, dtype) of an open .npy file, checked against the file's size before anything
    is allocated (a header may claim petabytes); with ``order``, (shape, dtype, fortran)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"unsupported .npy version {version}")
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{fp}: cannot read .npy ({e})") from None
    need = math.prod(shape) * dtype.itemsize  # Python ints: no wrap-around
    have = os.fstat(f.fileno()).st_size - f.tell()
    if need > have:
        raise DataError(f"{fp}: header claims shape {shape} of {dtype} ({need} bytes) but "
                        f"the file holds {have} bytes (truncated or corrupt)")
    return (shape, dtype, fortran) if order else (shape, dtype)


def _load_npy(fp, kinds, what):
    """A .npy array whose dtype kind is in ``kinds`` (e.g. "f" for features), its header
    checked before the array is read."""
    try:
        with open(fp, "rb") as f:
            shape, dtype = _npy_header(f, fp)
            if dtype.kind not in kinds:
                raise DataError(f"{fp}: expected {what}, got dtype {dtype}")
            f.seek(0)
            return np.lib.format.read_array(f, allow_pickle=False)
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{fp}: cannot read .npy ({e})") from None


def _latent_header(fp):
    """The (k, C, H, W) shape of a features file from its header, checked as
    :func:`_latent_pair` checks the array."""
    try:
        with open(fp, "rb") as f:
            shape, dtype = _npy_header(f, fp)
    except OSError as e:
        raise DataError(f"{fp}: cannot read .npy ({e})") from None
    if dtype.kind != "f":
        raise DataError(f"{fp}: expected floating-point features, got dtype {dtype}")
    if len(shape) not in (3, 4):
        raise DataError(f"{fp}: expected features (C,H,W) or (k,C,H,W), got {shape}")
    if shape[-1] != shape[-2]:
        raise DataError(f"{fp}: expected square latents (H == W), got shape {shape[-3:]}")
    return (1,) * (4 - len(shape)) + tuple(shape)


def _latent_labels(lp, num_classes):
    """The labels (k,) int64 of one label file (a () file is one label), checked."""
    y = np.atleast_1d(_load_npy(lp, "iu", "integer labels"))
    if y.ndim != 1:
        raise DataError(f"{lp}: expected labels () or (k,), got shape {y.shape}")
    return _check_labels(y, lp, num_classes)


def _latent_pair(fp, lp, num_classes):
    """features (k,C,H,W) float32 and labels (k,) int64 of one file pair, all checked."""
    x = _load_npy(fp, "f", "floating-point features")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise DataError(f"{fp}: expected features (C,H,W) or (k,C,H,W), got {x.shape}")
    if x.shape[2] != x.shape[3]:
        raise DataError(f"{fp}: expected square latents (H == W), got shape {x.shape[1:]}")
    x = _real_values(x, fp)
    y = np.atleast_1d(_load_npy(lp, "iu", "integer labels"))
    if y.shape != (x.shape[0],):
        raise DataError(f"{lp}: {y.shape[0] if y.ndim else 0} integer labels expected "
                        f"{x.shape[0]} (label count mismatch with {fp}), got {y.shape} {y.dtype}")
    return x, _check_labels(y, lp, num_classes)


def load_latents(path, num_classes=None, shard=(0, 1), lazy=None):
    """fast-DiT latent features (already scaled by 0.18215) and labels, paired by file name.
    DataError for a missing folder, a file without its pair, mixed or non-square shapes, a
    label count that does not match the features, a label outside [0, num_classes) (or
    beyond :data:`MAX_CLASSES`), a non-real or non-finite feature, or an unreadable file.

    ``shard`` = (rank, world size). In memory (an :class:`ArrayDataset`) when ``lazy`` is
    False, or when it is None, the world size is 1 and the feature files hold at most
    :data:`LAZY_BYTES`; otherwise a :class:`LatentFolderDataset` that reads every label
    file, checks now only the feature files i with i % W == rank, and reads features at
    ``batch()``."""
    num_classes = _check_num_classes(num_classes)
    rank, size = _check_shard(shard)
    fdir, ldir = _latent_dirs(path)
    fnames = sorted(n for n in os.listdir(fdir) if n.endswith(".npy"))
    lnames = set(n for n in os.listdir(ldir) if n.endswith(".npy"))
    if not fnames:
        raise DataError(f"{fdir}: no .npy feature files")
    if _use_lazy(lazy, size, lambda: sum(os.path.getsize(os.path.join(fdir, n)) for n in fnames)):
        return LatentFolderDataset(path, fdir, ldir, fnames, lnames, num_classes, shard)
    xs, ys, shape = [], [], None
    for name in fnames:
        fp, lp = os.path.join(fdir, name), os.path.join(ldir, name)
        if name not in lnames:
            raise DataError(f"{fp}: no matching label file {lp}")
        x, y = _latent_pair(fp, lp, num_classes)
        if shape is None:
            shape = x.shape[1:]
        elif x.shape[1:] != shape:
            raise DataError(f"{fp}: features of shape {x.shape[1:]} differ from the first "
                            f"file's {shape} (mixed sizes)")
        xs.append(x)
        ys.append(y)
    _no_extra_labels(ldir, lnames, fnames)
    return ArrayDataset(np.concatenate(xs), np.concatenate(ys), num_classes, None, "latents", path)


def _no_extra_labels(ldir, lnames, fnames):
    extra = lnames - set(fnames)
    if extra:
        raise DataError(f"{os.path.join(ldir, sorted(extra)[0])}: label file without features "
                        f"(label count mismatch: {len(lnames)} label files, {len(fnames)} features)")


# ---- data sets read per batch ----------------------------------------------------------------

# Above this many bytes of samples (decoded images, or feature files) a loader of a world of
# one rank reads per batch rather than holding the set in memory.
LAZY_BYTES = 4 << 30


def _check_shard(shard):
    """(rank, size) of ``shard``: ints with 0 <= rank < size (ValueError otherwise)."""
    try:
        rank, size = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise ValueError(f"shard: expected (rank, world size), got {shard!r}") from None
    if not 0 <= rank < size:
        raise ValueError(f"shard: expected 0 <= rank < world size, got {shard!r}")
    return rank, size


def _use_lazy(lazy, size, nbytes):
    """Whether a loader reads per batch: ``lazy`` when given, else for several ranks or
    more than :data:`LAZY_BYTES` (``nbytes()``, asked only for one rank)."""
    if lazy is not None:
        return bool(lazy)
    return size > 1 or nbytes() > LAZY_BYTES


class LazyDataset:
    """A labelled data set whose samples stay in their files: :class:`ArrayDataset`'s
    interface (len, channels, image_size, num_classes, class_names, kind, source, y,
    ``batch(idx)``), with ``batch()`` opening, reading and closing the files of the
    requested samples only (no file stays open or mapped). Labels are held whole.

    Made by the loaders for a rank of a multi-rank run (``shard`` = (rank, W)) or for a
    large set: file i was checked at construction when i % W == rank, so the W ranks
    check every file once, before training. ``checked``: the indices of the files this
    object checked. Values equal the in-memory loader's bit for bit."""

    def __init__(self, shape, y, num_classes, class_names, kind, source, shard, nfiles):
        _check_sample_shape(source, shape)
        if y.shape[0] == 0:
            raise DataError(f"{source}: no samples")
        self.shape = tuple(int(v) for v in shape)
        _set_labels(self, y, num_classes, class_names, kind, source)
        rank, size = _check_shard(shard)
        self.checked = range(rank, nfiles, size)

    def __len__(self):
        return self.y.shape[0]

    @property
    def channels(self):
        return self.shape[0]

    @property
    def image_size(self):
        return self.shape[1]

    def batch(self, idx):
        """(x float32 (B,C,H,W), y int64 (B,)) for the index array idx."""
        rows = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = np.asarray(rows, np.int64).reshape(-1)
        bad = (rows < -len(self)) | (rows >= len(self))
        if bad.any():
            raise IndexError(f"index {rows[bad][0]} is out of bounds for {len(self)} samples")
        rows %= len(self)
        x = np.empty((rows.size,) + self.shape, np.float32)
        self._read(rows, x)
        return x, self.y[rows]

    def __repr__(self):
        return (f"{type(self).__name__}({len(self)} x {self.shape}, {self.num_classes} classes, "
                f"kind={self.kind!r}, source={self.source!r}, read per batch)")


class ImageFolderDataset(LazyDataset):
    """An ImageNet-layout folder read per batch (see :func:`load_folder`)."""

    def __init__(self, path, files, labels, classes, image_size, channels, shard=(0, 1)):
        super().__init__((channels, image_size, image_size), labels, len(classes), classes,
                         "pixels", path, shard, len(files))
        self.files = files
        for i in self.checked:
            self._image(i)

    def _image(self, i):
        s, c = self.image_size, self.channels
        return (read_image(os.path.join(self.source, self.files[i]), s, c)
                .reshape(s, s, c).transpose(2, 0, 1))

    def _read(self, rows, out):
        for b, i in enumerate(rows):
            out[b] = _unit_range(self._image(i))


class LatentFolderDataset(LazyDataset):
    """A fast-DiT latent folder read per batch (see :func:`load_latents`): every label file
    read (they give each feature file's sample count), the feature files of this rank's
    share read whole and checked as the in-memory loader checks them, the others' headers
    read at ``batch()`` only."""

    def __init__(self, path, fdir, ldir, fnames, lnames, num_classes=None, shard=(0, 1)):
        for name in fnames:
            if name not in lnames:
                raise DataError(f"{os.path.join(fdir, name)}: no matching label file "
                                f"{os.path.join(ldir, name)}")
        _no_extra_labels(ldir, lnames, fnames)
        self.features = [os.path.join(fdir, n) for n in fnames]
        ys = [_latent_labels(os.path.join(ldir, n), num_classes) for n in fnames]
        self.starts = np.cumsum([0] + [y.shape[0] for y in ys], dtype=np.int64)
        first = _latent_header(self.features[0])
        super().__init__(first[1:], np.concatenate(ys), num_classes, None, "latents", path,
                         shard, len(fnames))
        for i in self.checked:
            x, _ = _latent_pair(self.features[i], os.path.join(ldir, fnames[i]), num_classes)
            if x.shape[1:] != self.shape:
                raise DataError(f"{self.features[i]}: features of shape {x.shape[1:]} differ "
                                f"from the first file's {self.shape} (mixed sizes)")

    def _read(self, rows, out):
        files = np.searchsorted(self.starts, rows, side="right") - 1
        for f in np.unique(files):
            at = np.flatnonzero(files == f)
            self._read_file(int(f), rows[at] - self.starts[f], out, at)

    def _read_file(self, f, offsets, out, at):
        """Samples ``offsets`` of feature file f into ``out[at]``, converted as
        :func:`_real_values` converts (float32)."""
        fp, k = self.features[f], int(self.starts[f + 1] - self.starts[f])
        with open(fp, "rb") as fh:
            shape, dtype, fortran = _npy_header(fh, fp, order=True)
            if (dtype.kind != "f" or tuple(shape[-3:]) != self.shape
                    or math.prod(shape[:-3]) != k):
                raise DataError(f"{fp}: features of shape {shape} {dtype} changed since they "
                                f"were checked (expected {k} x {self.shape} floats)")
            with np.errstate(over="ignore"):  # as _real_values; checked values are finite
                if fortran:  # samples are not contiguous: the whole file
                    fh.seek(0)
                    x = np.lib.format.read_array(fh, allow_pickle=False)
                    out[at] = x.reshape((k,) + self.shape)[offsets].astype(np.float32)
                    return
                start, n = fh.tell(), math.prod(self.shape) * dtype.itemsize
                for b, o in zip(at, offsets):
                    fh.seek(start + int(o) * n)
                    buf = fh.read(n)
                    if len(buf) != n:
                        raise DataError(f"{fp}: truncated since it was checked")
                    out[b] = np.frombuffer(buf, dtype).reshape(self.shape).astype(np.float32)


# ---- MNIST and CIFAR-10 -----------------------------------------------------------------

def _find(path, names):
    for n in names:
        for cand in (n, n + ".gz"):
            p = os.path.join(path, cand)
            if os.path.isfile(p):
                return p
    raise DataError(f"{path}: none of {', '.join(names)} (or .gz) found")


def _read_idx(fp, magic, ndim):
    """An IDX array of uint8 with ``ndim`` dims. The size the header claims is computed in
    Python ints (a uint32 product can wrap in int64) and the body is read in chunks up to
    that size, so a lying header (or a gzip bomb behind it) allocates no more than the file
    really holds."""
    opener = gzip.open if fp.endswith(".gz") else open
    try:
        with opener(fp, "rb") as f:
            head = f.read(4 + 4 * ndim)
            if len(head) < 4 + 4 * ndim or struct.unpack(">I", head[:4])[0] != magic:
                raise DataError(f"{fp}: not an IDX file with magic {magic}")
            dims = struct.unpack(">" + "I" * ndim, head[4:])
            need = math.prod(dims)
            body = _read_upto(f, need + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{fp}: cannot read ({e})") from None
    if len(body) != need:
        held = f"{len(body)} bytes" if len(body) < need else "more"
        raise DataError(f"{fp}: header says {dims} ({need} bytes) but holds {held} "
                        "(truncated or corrupt?)")
    return np.frombuffer(body, np.uint8).reshape(dims)


def _read_upto(f, n, chunk=1 << 24):
    """At most ``n`` bytes of ``f``, read in chunks (memory follows the data, not ``n``)."""
    parts, got = [], 0
    while got < n:
        b = f.read(min(chunk, n - got))
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def load_mnist(path, split="train", image_size=32):
    """MNIST (or Fashion-MNIST) from its IDX files in ``path``; the square digits (28x28)
    are padded with black to ``image_size`` (>= their side). One channel, 10 classes."""
    check_image_size(image_size)
    if not os.path.isdir(path):
        raise DataError(f"{path}: MNIST folder not found")
    pre = "train" if split == "train" else "t10k"
    ifp = _find(path, [f"{pre}-images-idx3-ubyte", f"{pre}-images.idx3-ubyte"])
    lfp = _find(path, [f"{pre}-labels-idx1-ubyte", f"{pre}-labels.idx1-ubyte"])
    x = _read_idx(ifp, 2051, 3)
    y = _read_idx(lfp, 2049, 1)
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{lfp}: {y.shape[0]} labels for {x.shape[0]} images in {ifp} "
                        "(label count mismatch)")
    if x.shape[1] != x.shape[2]:
        raise DataError(f"{ifp}: expected square digits, got {x.shape[1]}x{x.shape[2]} pixels")
    if image_size < x.shape[1]:
        raise DataError(f"{ifp}: image_size {image_size} is smaller than the {x.shape[1]}-pixel digits")
    y = _check_labels(y, lfp, 10)
    p = image_size - x.shape[1]
    x = np.pad(x, ((0, 0), (p // 2, p - p // 2), (p // 2, p - p // 2)))
    return ArrayDataset(x[:, None], y, 10, [str(i) for i in range(10)], "pixels", path)


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as Python 3's protocol-2 pickles use it for bytes, latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) "
                                     "is not allowed")
    return text.encode("latin1")


def _pickle_globals():
    """The only callables a CIFAR-10 batch may name: NumPy's array reconstruction (under
    the module names NumPy 1 and 2 write) and latin-1 bytes."""
    try:
        from numpy._core.multiarray import _reconstruct
        from numpy._core.numeric import _frombuffer
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct
        from numpy.core.numeric import _frombuffer
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):
        allowed[(core + ".multiarray", "_reconstruct")] = _reconstruct
        allowed[(core + ".numeric", "_frombuffer")] = _frombuffer
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, tuples, bytes, str, numbers and NumPy arrays and nothing
    else: any other global (``os.system``, ``builtins.eval``, a class with ``__reduce__``)
    is refused before it is looked up, so loading runs no code from the file."""

    def find_class(self, module, name):
        fn = _pickle_globals().get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed "
                                         "(only NumPy arrays, containers and strings)")
        return fn


def _unpickle(fp):
    with open(fp, "rb") as f:
        return _BatchUnpickler(f, encoding="bytes").load()


def _cifar_batch(fp):
    """(x uint8 (N, 3, 32, 32), y int64 (N,)) of one CIFAR-10 python batch, every field
    checked: a dict with b"data" a uint8 (N, 3072) array and b"labels" N ints in [0, 10)."""
    try:
        d = _unpickle(fp)
    except Exception as e:  # a corrupt pickle can raise nearly anything
        raise DataError(f"{fp}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise DataError(f"{fp}: not a CIFAR-10 python batch (expected a dict with b'data' "
                        f"and b'labels', got {type(d).__name__})")
    x, y = d[b"data"], d[b"labels"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise DataError(f"{fp}: expected data of uint8 (N, 3072), got "
                        f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    if not isinstance(y, (list, np.ndarray)) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in y):
        raise DataError(f"{fp}: expected b'labels' a list of ints")
    y = np.array(y, np.int64) if len(y) else np.zeros(0, np.int64)
    if y.shape != (x.shape[0],):
        raise DataError(f"{fp}: {y.shape} labels for {x.shape[0]} images (label count mismatch)")
    return x.reshape(-1, 3, 32, 32), _check_labels(y, fp, 10)


def _cifar_names(meta):
    """The class names of batches.meta; the digits when it is missing or odd (cosmetic)."""
    try:
        names = _unpickle(meta)[b"label_names"]
        if len(names) == 10 and all(isinstance(c, bytes) for c in names):
            return [c.decode("utf-8", "replace") for c in names]
    except Exception:  # a corrupt pickle can raise nearly anything
        pass
    return [str(i) for i in range(10)]


def load_cifar10(path, split="train"):
    """CIFAR-10 from its python batches in ``path`` (or ``path/cifar-10-batches-py``), read
    by an unpickler that builds only containers, strings, numbers and NumPy arrays."""
    if os.path.isdir(os.path.join(path, "cifar-10-batches-py")):
        path = os.path.join(path, "cifar-10-batches-py")
    if not os.path.isdir(path):
        raise DataError(f"{path}: CIFAR-10 folder not found")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for n in names:
        fp = os.path.join(path, n)
        if not os.path.isfile(fp):
            raise DataError(f"{fp}: CIFAR-10 batch not found")
        x, y = _cifar_batch(fp)
        xs.append(x)
        ys.append(y)
    meta = os.path.join(path, "batches.meta")
    classes = _cifar_names(meta) if os.path.isfile(meta) else [str(i) for i in range(10)]
    return ArrayDataset(np.concatenate(xs), np.concatenate(ys), 10, classes, "pixels", path)


# ---- choosing a data set ------------------------------------------------------------------

def _kinds_usage():
    return " | ".join(k if k == "builtin" else f"{k} PATH" for k in DATA_KINDS)


def parse_data_arg(args_list):
    """(kind, path) of the ``--data KIND [PATH]`` words (path None for builtin). ValueError
    saying which kinds exist when the first word is not one of :data:`DATA_KINDS` (e.g. a
    path given without its kind), or when the path is missing or extra."""
    args_list = list(args_list)
    if not args_list:
        raise ValueError(f"--data: expected one of {_kinds_usage()}")
    kind, rest = args_list[0], args_list[1:]
    if kind not in DATA_KINDS:
        example = f" (e.g. --data folder {kind})" if os.sep in kind or os.path.exists(kind) else ""
        raise ValueError(f"--data: {kind!r} is not a data kind; expected one of "
                         f"{_kinds_usage()}{example}")
    if kind == "builtin":
        if rest:
            raise ValueError(f"--data builtin takes no path, got {rest}")
        return kind, None
    if len(rest) != 1:
        raise ValueError(f"--data {kind} needs exactly one PATH, got {len(rest)}: {rest}")
    return kind, rest[0]


def load_data(kind="builtin", path=None, image_size=32, num_classes=None, seed=0, n=10000,
              channels=None, shard=(0, 1), lazy=None):
    """Load a training set by kind (:data:`DATA_KINDS`). ``path`` is required for all but
    builtin; ``n``/``seed`` only shape the built-in set; ``num_classes`` overrides the
    count inferred from the labels (latents, e.g. 1000 for ImageNet); ``channels`` (1 or
    3) converts image folders to grayscale or RGB (None: RGB); for the other kinds it
    must be None or their own count (mnist 1, builtin and cifar10 3, latents theirs).
    ``shard`` (rank, world size) and ``lazy`` choose how folders and latents are read
    (:func:`load_folder`, :func:`load_latents`); the other kinds are read whole.
    Settings are checked before any file is read (ValueError naming the setting)."""
    if kind not in DATA_KINDS:
        raise ValueError(f"data: {kind!r} is not a data kind; expected one of {_kinds_usage()}")
    check_image_size(image_size)
    _check_num_classes(num_classes)
    if channels not in (None, 1, 3) and kind != "latents":
        raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
    if kind == "builtin":
        return _same_channels(load_builtin(n, seed, image_size), channels, kind)
    if not path:
        raise ValueError(f"data: {kind} needs a path")
    if kind == "folder":
        return load_folder(path, image_size, 3 if channels is None else channels, shard, lazy)
    if kind == "latents":
        return _same_channels(load_latents(path, num_classes, shard, lazy), channels, kind)
    if kind == "mnist":
        return _same_channels(load_mnist(path, image_size=image_size), channels, kind)
    return _same_channels(load_cifar10(path), channels, kind)


def _same_channels(ds, channels, kind):
    if channels is not None and channels != ds.channels:
        raise ValueError(f"channels: {kind} data has {ds.channels}, got {channels} "
                         "(channels converts image folders only)")
    return ds
