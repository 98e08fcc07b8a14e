"""racedit.shapes_metric — a sample metric for the built-in shapes (racedit.data.make_shapes),
in NumPy only: how often a generated sample is recognised as its conditioning class, and a
Fréchet distance ("shapes-FD") between the samples and held-out real shapes in the feature
space of that recogniser. It plays the part that FID and an ImageNet classifier play for
the paper's models, at a scale where a model trains in minutes on a CPU.

Features (:func:`descriptors`), read off each image with the generator's own geometry in
mind (a flat shape of one colour on a darker flat background): the background colour (the
median of the border pixels) and the foreground colour (the mean of the pixels farthest
from it); the coverage map alpha (each pixel's position between the two colours, with a
soft threshold that ignores faint noise); the shape's centroid and radius of gyration;
alpha resampled on a 12 x 12 grid in units of that radius around that centroid (the shape
with its position and size taken out); and three quality cues — contrast, the RMS of what
the two-colour model does not explain (noise, smears, stray colours) and the share of
partly covered pixels (blur). The feature vector is the grid's first 16 principal
components (fitted on real shapes) and the 13 other values, each standardised by its
spread over real shapes (at least 0.02, so that a cue that real shapes hold nearly fixed
does not turn a small deviation into a huge one): F = 29 values.

The classifier is a multinomial logistic regression on F, fitted by L-BFGS on real shapes,
a share of them with added Gaussian pixel noise so that a slightly noisy sample is still
read as its shape. It is built once per image size from fixed seeds (training shapes,
noise and held-out reference shapes drawn from seeds used nowhere else: never the
training data of racedit's runs) and cached as ``shapes-judge-v<version>-s<size>-<key>.npz``
under ``$XDG_CACHE_HOME/racedit`` (``~/.cache/racedit``), the key a hash of every setting
below, so a change of method is a new file. Building takes seconds; the cached file makes
the judge the same on every later call.

Where a number sits (documented in docs/evaluation.md with measurements):
:func:`reference_points` gives the floor (held-out real shapes against the reference;
accuracy 1.0, FD a fraction that shrinks as 1/n) and a bad reference (each label's class-
mean image plus Gaussian noise of std 0.1: blurry blobs of the right class, accuracy about
0.7, FD about 67).
"""
import hashlib
import json
import os

import numpy as np

from .threads import thread_limit

__all__ = ["ShapesJudge", "shapes_judge", "shapes_score", "score_npz", "reference_points",
           "descriptors", "as_unit_images", "VERSION", "cache_dir"]

VERSION = 1
GRID = 12           # canonical coverage grid (GRID x GRID)
GRID_SPAN = 1.9     # the grid covers +-GRID_SPAN radii of gyration around the centroid
PCS = 16            # principal components of the grid kept
SD_FLOOR = 0.02     # lower bound of a feature's standardising spread
TRAIN_N, TRAIN_SEED, NOISE_SEED = 4000, 7000003, 7000019
AUG_SIGMAS = (0, 0, 8, 16, 32)  # pixel noise std (0..255) of the training shapes, drawn per image
REF_N, REF_SEED = 5000, 2000003  # held-out real shapes: the FD reference
FLOOR_SEED, BAD_SEED = 2000029, 2000039
L2 = 1e-3           # logistic regression's weight penalty
MAXITER = 100       # L-BFGS iterations (accuracy on real shapes is 1.0 well before)
CHUNK = 1024        # images per descriptor pass (bounds memory)

_SETTINGS = dict(version=VERSION, grid=GRID, span=GRID_SPAN, pcs=PCS, sd_floor=SD_FLOOR,
                 train=(TRAIN_N, TRAIN_SEED, NOISE_SEED, AUG_SIGMAS), ref=(REF_N, REF_SEED),
                 l2=L2, maxiter=MAXITER)
_MEMO = {}


def cache_dir():
    """Where judges are cached: ``$XDG_CACHE_HOME/racedit`` or ``~/.cache/racedit``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "racedit")


def as_unit_images(images):
    """(N, 3, S, S) float64 in [0, 1] from uint8 (N, 3, S, S) as make_shapes gives or uint8
    (N, S, S, 3) as an ADM .npz holds, or float (N, 3, S, S) in [-1, 1] as
    racedit.sample.generate returns. ValueError for anything else."""
    x = np.asarray(images)
    if x.ndim == 4 and x.dtype == np.uint8 and x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.transpose(0, 3, 1, 2)                                    # NHWC -> NCHW
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
        raise ValueError(f"images: expected square RGB images (N, 3, S, S), or uint8 "
                         f"(N, S, S, 3), got shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float64) / 255.0
    if x.dtype.kind != "f":
        raise ValueError(f"images: expected uint8, or float in [-1, 1], got {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError("images: expected finite values, got NaN or Inf")
    return np.clip((x.astype(np.float64) + 1.0) * 0.5, 0.0, 1.0)


def _bilinear(a, py, px):
    """a (N, S, S) sampled at pixel coordinates (py, px) (N, G, G); 0 outside."""
    N, S, _ = a.shape
    y0, x0 = np.floor(py).astype(np.int64), np.floor(px).astype(np.int64)
    fy, fx = py - y0, px - x0
    n = np.arange(N)[:, None, None]
    out = np.zeros(py.shape)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yi, xi = y0 + dy, x0 + dx
            inside = (yi >= 0) & (yi < S) & (xi >= 0) & (xi < S)
            v = a[n, np.clip(yi, 0, S - 1), np.clip(xi, 0, S - 1)]
            out += wy * wx * np.where(inside, v, 0.0)
    return out


def _colours(x):
    """(bg (N,3), fg (N,3), distance from bg (N,S,S)) of x (N, 3, S, S) in [0, 1]."""
    N = x.shape[0]
    border = np.concatenate([x[:, :, 0, :], x[:, :, -1, :], x[:, :, 1:-1, 0],
                             x[:, :, 1:-1, -1]], axis=2)                      # (N,3,4S-4)
    bg = np.median(border, axis=2)
    d = np.sqrt(((x - bg[:, :, None, None]) ** 2).sum(1))                  # (N,S,S)
    far = d >= 0.5 * np.quantile(d.reshape(N, -1), 0.97, axis=1)[:, None, None]
    fg = (x * far[:, None]).sum((2, 3)) / np.maximum(far.sum((1, 2)), 1)[:, None]
    return bg, fg, d


def _descriptors(x):
    """(grid (N, GRID^2), other (N, 13)) of x (N, 3, S, S) in [0, 1]."""
    N, _, S, _ = x.shape
    bg, fg, _ = _colours(x)
    v = fg - bg                                                               # (N,3)
    vv = np.maximum((v * v).sum(1), 1e-6)
    rel = x - bg[:, :, None, None]
    a = np.clip(np.einsum("nchw,nc->nhw", rel, v) / vv[:, None, None], 0.0, 1.0)
    resid = np.sqrt(((rel - a[:, None] * v[:, :, None, None]) ** 2).mean((1, 2, 3)))
    partial = ((a > 0.1) & (a < 0.9)).sum((1, 2)) / np.maximum((a >= 0.5).sum((1, 2)), 1)
    a = np.clip((a - 0.25) / 0.5, 0.0, 1.0)  # faint noise on the background is not shape
    m = a.sum((1, 2)) + 1e-6
    g = np.arange(S) + 0.5
    cx = (a * g[None, None, :]).sum((1, 2)) / m
    cy = (a * g[None, :, None]).sum((1, 2)) / m
    r2 = (g[None, None, :] - cx[:, None, None]) ** 2 + (g[None, :, None] - cy[:, None, None]) ** 2
    rg = np.sqrt((a * r2).sum((1, 2)) / m) + 1e-6                             # (N,)
    u = np.linspace(-GRID_SPAN, GRID_SPAN, GRID)
    px = cx[:, None, None] + u[None, None, :] * rg[:, None, None] - 0.5      # (N,1,G)
    py = cy[:, None, None] + u[None, :, None] * rg[:, None, None] - 0.5      # (N,G,1)
    px, py = np.broadcast_arrays(px, py)
    grid = _bilinear(a, py, px).reshape(N, -1)
    other = np.concatenate([fg, bg, np.stack([cx / S, cy / S, rg / S, m / S ** 2,
                                              np.sqrt(vv), resid, partial], 1)], 1)
    return grid, other


def descriptors(images):
    """(grid (N, GRID^2), other (N, 13)) float64: the coverage grid and the colour,
    geometry and quality values of each image (see the module docstring), in chunks."""
    x = as_unit_images(images)
    parts = [_descriptors(x[lo:lo + CHUNK]) for lo in range(0, x.shape[0], CHUNK)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


class ShapesJudge:
    """The fixed classifier and reference statistics for one image size (build with
    :func:`shapes_judge`). ``features(images)`` (N, F); ``logits`` (N, 10); ``predict``
    (N,); ``score(images, labels)`` the metric dict; ``key`` names the build."""

    ARRAYS = ("grid_mean", "pcs", "feat_mean", "feat_scale", "weights", "bias", "ref_mu",
              "ref_sigma")

    def __init__(self, arrays, image_size, key):
        for k in self.ARRAYS:
            setattr(self, k, np.asarray(arrays[k], np.float64))
        self.image_size, self.key = int(image_size), key

    def _raw(self, images):
        grid, other = descriptors(images)
        return np.concatenate([(grid - self.grid_mean) @ self.pcs, other], 1)

    def features(self, images):
        """(N, F) float64: the standardised feature vectors of ``images``."""
        x = as_unit_images(images)
        if x.shape[2] != self.image_size:
            raise ValueError(f"images: this judge is for {self.image_size}x{self.image_size} "
                             f"shapes, got {x.shape[2]}x{x.shape[3]}")
        return (self._raw(x) - self.feat_mean) / self.feat_scale

    def logits(self, images=None, features=None):
        f = self.features(images) if features is None else features
        return f @ self.weights + self.bias

    def predict(self, images=None, features=None):
        return np.argmax(self.logits(images, features), axis=1)

    def score(self, images, labels):
        """{"accuracy", "fd", "num_samples", "per_class_accuracy" (10, None for a class
        without samples), "image_size", "judge"} of generated ``images`` with their
        conditioning ``labels`` (N,) in [0, 10)."""
        from .metrics import feature_stats, frechet_distance

        labels = np.asarray(labels)
        f = self.features(images)
        if labels.shape != (f.shape[0],) or labels.dtype.kind not in "iu":
            raise ValueError(f"labels: expected ({f.shape[0]},) integers, got "
                             f"{labels.dtype} {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.weights.shape[1]):
            raise ValueError(f"labels: expected values in [0, {self.weights.shape[1]}), got "
                             f"[{labels.min()}, {labels.max()}]")
        hit = self.predict(features=f) == labels
        per = [float(hit[labels == c].mean()) if (labels == c).any() else None
               for c in range(self.weights.shape[1])]
        mu, sigma = feature_stats(f)
        return {"accuracy": float(hit.mean()),
                "fd": frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma),
                "num_samples": int(f.shape[0]), "per_class_accuracy": per,
                "image_size": self.image_size, "judge": self.key}


def _key(image_size):
    blob = json.dumps(dict(_SETTINGS, image_size=int(image_size)), sort_keys=True)
    return f"v{VERSION}-s{int(image_size)}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def _noisy(x, sigmas, seed):
    """uint8 images with Gaussian pixel noise of a std drawn from ``sigmas`` per image."""
    rng = np.random.default_rng(seed)
    s = rng.choice(np.asarray(sigmas, np.float64), x.shape[0])[:, None, None, None]
    return np.clip(np.round(x + rng.standard_normal(x.shape) * s), 0, 255).astype(np.uint8)


def _fit_logistic(z, y, classes):
    """(weights (F, classes), bias (classes,)) of an L2-penalised multinomial logistic
    regression, by L-BFGS from zero (deterministic)."""
    from scipy.optimize import minimize

    n, F = z.shape
    A = np.concatenate([z, np.ones((n, 1))], 1)
    onehot = np.eye(classes)[y]

    def loss(w):
        W = w.reshape(F + 1, classes)
        lg = A @ W
        lg -= lg.max(1, keepdims=True)
        p = np.exp(lg)
        p /= p.sum(1, keepdims=True)
        val = -np.log(p[np.arange(n), y] + 1e-300).mean() + L2 * (W[:-1] ** 2).sum()
        g = A.T @ (p - onehot) / n
        g[:-1] += 2 * L2 * W[:-1]
        return val, g.ravel()

    r = minimize(loss, np.zeros((F + 1) * classes), jac=True, method="L-BFGS-B",
                 options=dict(maxiter=MAXITER))
    W = r.x.reshape(F + 1, classes)
    return W[:-1], W[-1]


def _build(image_size):
    """The arrays of a new judge for ``image_size`` (seconds; see the module docstring)."""
    from .data import SHAPE_CLASSES, make_shapes
    from .metrics import feature_stats

    x, y = make_shapes(TRAIN_N, seed=TRAIN_SEED, image_size=image_size)
    grid, other = descriptors(x)
    gmean = grid.mean(0)
    _, vecs = np.linalg.eigh(np.cov(grid, rowvar=False))                # ascending
    pcs = vecs[:, ::-1][:, :PCS].copy()                                 # (G*G, PCS)
    pcs *= np.sign(pcs[np.argmax(np.abs(pcs), axis=0), np.arange(PCS)])  # a fixed sign
    raw = np.concatenate([(grid - gmean) @ pcs, other], 1)
    fmean, fscale = raw.mean(0), np.maximum(raw.std(0), SD_FLOOR)
    arrays = dict(grid_mean=gmean, pcs=pcs, feat_mean=fmean, feat_scale=fscale,
                  weights=np.zeros((raw.shape[1], len(SHAPE_CLASSES))),
                  bias=np.zeros(len(SHAPE_CLASSES)), ref_mu=np.zeros(raw.shape[1]),
                  ref_sigma=np.eye(raw.shape[1]))
    judge = ShapesJudge(arrays, image_size, _key(image_size))
    z = judge.features(_noisy(x, AUG_SIGMAS, NOISE_SEED))
    arrays["weights"], arrays["bias"] = _fit_logistic(z, y, len(SHAPE_CLASSES))
    xr, _ = make_shapes(REF_N, seed=REF_SEED, image_size=image_size)
    arrays["ref_mu"], arrays["ref_sigma"] = feature_stats(judge.features(xr))
    return arrays


def _load(path, image_size, key):
    try:
        with np.load(path, allow_pickle=False) as z:
            judge = ShapesJudge({k: z[k] for k in ShapesJudge.ARRAYS}, image_size, key)
    except (OSError, KeyError, ValueError):
        return None  # a partial or foreign file: build again
    return judge


def _save(path, arrays):
    """Write the cache file atomically; a cache that cannot be written is skipped."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass


def shapes_judge(image_size=32, cache=None):
    """The :class:`ShapesJudge` for ``image_size`` (8..MAX_IMAGE_SIZE): from this process's
    memo, else the cache folder ``cache`` (default :func:`cache_dir`), else built (seconds)
    and cached. ``cache=False`` builds without reading or writing files."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
            or image_size < 8:
        raise ValueError(f"image_size: expected an int >= 8 (make_shapes'), got {image_size!r}")
    key = _key(image_size)
    folder = None if cache is False else (cache or cache_dir())
    memo = (key, folder)
    if memo in _MEMO:
        return _MEMO[memo]
    path = None if folder is None else os.path.join(folder, f"shapes-judge-{key}.npz")
    judge = _load(path, image_size, key) if path and os.path.exists(path) else None
    if judge is None:
        with thread_limit(1):  # one BLAS thread: the same sums, whatever the machine
            arrays = _build(int(image_size))
        if path:
            _save(path, arrays)
        judge = ShapesJudge(arrays, image_size, key)
    _MEMO[memo] = judge
    return judge


def shapes_score(images, labels, cache=None):
    """The metric of generated ``images`` (see :func:`as_unit_images`) with their class
    ``labels``: {"accuracy", "fd", "num_samples", "per_class_accuracy", ...} (see
    :meth:`ShapesJudge.score`); the judge is the one for the images' size."""
    x = as_unit_images(images)
    return shapes_judge(x.shape[2], cache).score(x, labels)


def reference_points(n=1000, image_size=32, cache=None, noise=0.1):
    """Where a score sits: {"real": the score of ``n`` held-out real shapes (the floor),
    "class_mean_noise": the score of each label's class-mean image (over REF_N real
    shapes) plus Gaussian noise of std ``noise`` (in [0, 1] units): a bad reference}."""
    from .data import make_shapes

    judge = shapes_judge(image_size, cache)
    x, y = make_shapes(n, seed=FLOOR_SEED, image_size=image_size)
    xr, yr = make_shapes(REF_N, seed=REF_SEED, image_size=image_size)
    means = np.stack([xr[yr == c].mean(0) for c in range(judge.weights.shape[1])]) / 255.0
    rng = np.random.default_rng(BAD_SEED)
    bad = np.clip(means[y] + noise * rng.standard_normal(x.shape), 0.0, 1.0) * 2.0 - 1.0
    return {"real": judge.score(x, y), "class_mean_noise": judge.score(bad, y)}


def score_npz(path, out=None, stream=None):
    """Score a samples .npz (``arr_0`` (N, S, S, 3) uint8 and ``labels`` (N,), as ``racedit
    sample --num-samples`` writes), print the result and write it as JSON to ``out``
    (default: ``path`` without .npz + ``.shapes.json``). Returns the result dict."""
    import sys

    stream = stream or sys.stdout
    try:
        with np.load(path, allow_pickle=False) as z:
            if "arr_0" not in z or "labels" not in z:
                raise ValueError(f"{path}: expected arr_0 (images) and labels, got "
                                 f"{sorted(z.keys())}")
            x, y = z["arr_0"], z["labels"]
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz ({e})") from None
    res = dict(shapes_score(x, y), samples=os.path.abspath(path))
    out = out or os.path.splitext(path)[0] + ".shapes.json"
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"racedit fid: {res['num_samples']} samples of the built-in shapes: class accuracy "
          f"{res['accuracy']:.4f}, shapes-FD {res['fd']:.4f} (judge {res['judge']}); wrote "
          f"{out}", file=stream)
    return res
