"""racedit.data — the training sets, loaded and checked whole before training starts.

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

Every loader returns an :class:`ArrayDataset` held in memory (images as uint8, converted to
float32 in [-1, 1] per batch; latents as float32). Bad data — a missing folder, images of
mixed sizes, a corrupt file, a label count that does not match — raises :class:`DataError`
naming the file.
"""
import gzip
import os
import pickle
import struct

import numpy as np

__all__ = [
    "SHAPE_CLASSES", "DataError", "ArrayDataset", "make_shapes", "load_builtin",
    "load_folder", "load_latents", "load_mnist", "load_cifar10", "load_data",
    "center_crop_arr", "DATA_KINDS",
]

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "ring", "horizontal bars",
                 "vertical bars", "diamond", "checker", "star")
DATA_KINDS = ("builtin", "folder", "latents", "mnist", "cifar10")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class DataError(ValueError):
    """A data set that cannot be used; the message names the offending file or folder."""


class ArrayDataset:
    """A labelled data set in memory.

    x: (N, C, H, W) uint8 images (0..255) or float32 values (latents, or images already in
    [-1, 1]); y: (N,) int64 labels in [0, num_classes). kind: "pixels" or "latents".
    ``batch(idx)`` returns (x float32 (B,C,H,W), y int64 (B,)), uint8 mapped to [-1, 1].
    """

    def __init__(self, x, y, num_classes=None, class_names=None, kind="pixels", source=""):
        x = np.asarray(x)
        y = np.asarray(y)
        if x.ndim != 4:
            raise DataError(f"{source or 'data'}: expected images (N, C, H, W), got shape {x.shape}")
        if y.shape != (x.shape[0],):
            raise DataError(f"{source or 'data'}: {x.shape[0]} images but labels of shape {y.shape}")
        if x.dtype not in (np.uint8, np.float32):
            x = x.astype(np.float32)
        if x.shape[0] == 0:
            raise DataError(f"{source or 'data'}: no samples")
        y = y.astype(np.int64)
        if num_classes is None:
            num_classes = int(y.max()) + 1
        if y.min() < 0 or y.max() >= num_classes:
            raise DataError(f"{source or 'data'}: labels must lie in [0, {num_classes}), "
                            f"got [{y.min()}, {y.max()}]")
        self.x, self.y = x, y
        self.num_classes = int(num_classes)
        self.class_names = (list(class_names) if class_names is not None
                            else [str(i) for i in range(self.num_classes)])
        self.kind = kind
        self.source = source

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
            x = x.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)
        return np.ascontiguousarray(x, np.float32), self.y[idx]

    def __repr__(self):
        return (f"ArrayDataset({len(self)} x {tuple(self.x.shape[1:])}, {self.num_classes} "
                f"classes, kind={self.kind!r}, source={self.source!r})")


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
    centre square. Returns a uint8 (image_size, image_size, 3) array."""
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


def load_folder(path, image_size=32):
    """Images in ImageNet layout (``path/<class>/<image>``), every image opened, converted to
    RGB and center-cropped to ``image_size`` now. Class indices follow the sorted folder
    names. DataError for a missing folder, no classes, an empty class or an unreadable
    image (naming it)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isdir(path):
        raise DataError(f"{path}: image folder not found")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise DataError(f"{path}: no class sub-folders (expected ImageNet layout "
                        "path/<class>/<image>)")
    xs, ys = [], []
    for ci, cname in enumerate(classes):
        cdir = os.path.join(path, cname)
        files = sorted(f for f in os.listdir(cdir) if f.lower().endswith(IMAGE_EXTS))
        if not files:
            raise DataError(f"{cdir}: class folder holds no images ({', '.join(IMAGE_EXTS)})")
        for f in files:
            fp = os.path.join(cdir, f)
            try:
                with Image.open(fp) as im:
                    im.load()
                    arr = center_crop_arr(im.convert("RGB"), image_size)
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                raise DataError(f"{fp}: cannot read image ({e})") from None
            xs.append(arr.transpose(2, 0, 1))
            ys.append(ci)
    return ArrayDataset(np.stack(xs), np.array(ys), len(classes), classes, "pixels", path)


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


def _load_npy(fp):
    try:
        return np.load(fp, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{fp}: cannot read .npy ({e})") from None


def load_latents(path, num_classes=None):
    """fast-DiT latent features (already scaled by 0.18215) and labels, paired by file name.
    DataError for a missing folder, a file without its pair, mixed shapes, a label count
    that does not match the features, or an unreadable file."""
    fdir, ldir = _latent_dirs(path)
    fnames = sorted(n for n in os.listdir(fdir) if n.endswith(".npy"))
    lnames = set(n for n in os.listdir(ldir) if n.endswith(".npy"))
    if not fnames:
        raise DataError(f"{fdir}: no .npy feature files")
    xs, ys, shape = [], [], None
    for name in fnames:
        fp, lp = os.path.join(fdir, name), os.path.join(ldir, name)
        if name not in lnames:
            raise DataError(f"{fp}: no matching label file {lp}")
        x, y = _load_npy(fp), _load_npy(lp)
        if x.ndim == 3:
            x = x[None]
        y = np.atleast_1d(y)
        if x.ndim != 4:
            raise DataError(f"{fp}: expected features (C,H,W) or (k,C,H,W), got {x.shape}")
        if shape is None:
            shape = x.shape[1:]
        elif x.shape[1:] != shape:
            raise DataError(f"{fp}: features of shape {x.shape[1:]} differ from the first "
                            f"file's {shape} (mixed sizes)")
        if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{lp}: {y.shape[0] if y.ndim else 0} integer labels expected "
                            f"{x.shape[0]} (label count mismatch with {fp}), got {y.shape} {y.dtype}")
        xs.append(x.astype(np.float32))
        ys.append(y.astype(np.int64))
    extra = lnames - set(fnames)
    if extra:
        raise DataError(f"{os.path.join(ldir, sorted(extra)[0])}: label file without features "
                        f"(label count mismatch: {len(lnames)} label files, {len(fnames)} features)")
    return ArrayDataset(np.concatenate(xs), np.concatenate(ys), num_classes, None, "latents", path)


# ---- MNIST and CIFAR-10 -----------------------------------------------------------------

def _find(path, names):
    for n in names:
        for cand in (n, n + ".gz"):
            p = os.path.join(path, cand)
            if os.path.isfile(p):
                return p
    raise DataError(f"{path}: none of {', '.join(names)} (or .gz) found")


def _read_idx(fp, magic, ndim):
    opener = gzip.open if fp.endswith(".gz") else open
    try:
        with opener(fp, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{fp}: cannot read ({e})") from None
    if len(data) < 4 + 4 * ndim or struct.unpack(">I", data[:4])[0] != magic:
        raise DataError(f"{fp}: not an IDX file with magic {magic}")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{fp}: header says {dims} but holds {body.size} bytes (truncated?)")
    return body.reshape(dims)


def load_mnist(path, split="train", image_size=32):
    """MNIST (or Fashion-MNIST) from its IDX files in ``path``; the 28x28 digits are padded
    with black to ``image_size`` (>= 28). One channel, 10 classes."""
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
    if image_size < x.shape[1]:
        raise DataError(f"{ifp}: image_size {image_size} is smaller than the {x.shape[1]}-pixel digits")
    p = image_size - x.shape[1]
    x = np.pad(x, ((0, 0), (p // 2, p - p // 2), (p // 2, p - p // 2)))
    return ArrayDataset(x[:, None], y, 10, [str(i) for i in range(10)], "pixels", path)


def load_cifar10(path, split="train"):
    """CIFAR-10 from its python batches in ``path`` (or ``path/cifar-10-batches-py``)."""
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
        try:
            with open(fp, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            x = np.asarray(d[b"data"], np.uint8)
            y = np.asarray(d[b"labels"], np.int64)
        except Exception as e:  # a corrupt pickle can raise nearly anything
            raise DataError(f"{fp}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
        if x.ndim != 2 or x.shape[1] != 3072:
            raise DataError(f"{fp}: expected data of shape (N, 3072), got {x.shape}")
        if y.shape != (x.shape[0],):
            raise DataError(f"{fp}: {y.shape} labels for {x.shape[0]} images (label count mismatch)")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    classes = [str(i) for i in range(10)]
    meta = os.path.join(path, "batches.meta")
    if os.path.isfile(meta):
        try:
            with open(meta, "rb") as f:
                classes = [c.decode() for c in pickle.load(f, encoding="bytes")[b"label_names"]]
        except Exception:
            pass  # the names are cosmetic
    return ArrayDataset(np.concatenate(xs), np.concatenate(ys), 10, classes, "pixels", path)


def load_data(kind="builtin", path=None, image_size=32, num_classes=None, seed=0, n=10000):
    """Load a training set by kind (:data:`DATA_KINDS`). ``path`` is required for all but
    builtin; ``n``/``seed`` only shape the built-in set; ``num_classes`` overrides the
    count inferred from the labels (latents, e.g. 1000 for ImageNet)."""
    if kind not in DATA_KINDS:
        raise ValueError(f"data: expected one of {DATA_KINDS}, got {kind!r}")
    if kind == "builtin":
        return load_builtin(n, seed, image_size)
    if not path:
        raise ValueError(f"data: {kind} needs a path")
    if kind == "folder":
        return load_folder(path, image_size)
    if kind == "latents":
        return load_latents(path, num_classes)
    if kind == "mnist":
        return load_mnist(path, image_size=image_size)
    return load_cifar10(path)
