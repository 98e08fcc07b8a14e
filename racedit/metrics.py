"""racedit.metrics — sample quality as ADM's evaluator measures it: FID, Inception Score and
k-NN precision / recall of a set of samples against a reference set.

The statistics that need only NumPy and SciPy live here and import nothing else:
:func:`feature_stats` (mean and covariance of features) and :func:`frechet_distance` (the
Fréchet distance of two Gaussians, with ADM's / pytorch-fid's numerics: ``sqrtm`` of the
product, an ``eps`` offset when that product is singular, imaginary round-off dropped).

The rest is glue around torch-fidelity (the optional extra ``pip install "racedit[eval]"``,
imported only when called): its ``FeatureExtractorInceptionV3`` is a port of the TensorFlow
Inception graph that ADM's evaluator runs (same weights, same bilinear resize to 299), its
Inception Score and its precision / recall (Kynkäänniemi et al., k = 3 as ADM) are used as
they are. Nothing is downloaded: the weights come from a file the caller names, or from
torch's hub cache where torch-fidelity itself would have put them.

Image sets (``samples`` and ``ref`` of :func:`fid`): an ``.npz`` whose ``arr_0`` is
(N, H, W, C) uint8 (ADM's layout; what ``racedit sample --num-samples`` writes; read in
batches, never whole), an image folder (every image under it, sorted, center-cropped to
the samples' size as DiT's ``center_crop_arr``), or a statistics file: an ADM reference
batch (``mu``, ``sigma`` and its images ``arr_0``) or one :func:`fid` wrote with
``save_ref`` (``mu``, ``sigma``, ``features`` for precision / recall, the extractor's hash).
Shapes: features (N, d) float64, d = ``dims`` (2048 for FID as ADM); logits (N, 1008).
"""
import hashlib
import json
import os
import zipfile

import numpy as np

__all__ = ["feature_stats", "frechet_distance", "fid", "load_inception", "inception_score",
           "precision_recall", "iter_images", "count_images", "INCEPTION_URL",
           "INCEPTION_FILE", "DIMS", "save_ref_stats", "MissingExtra"]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 + INCEPTION_FILE)
DIMS = (64, 192, 768, 2048)  # Inception feature layers (pytorch-fid's --dims); 2048 is FID's
EXTRA_HINT = 'pip install "racedit[eval]" (torch-fidelity, torch, torchvision)'


# ---- NumPy / SciPy only -----------------------------------------------------------------

def feature_stats(features):
    """(mu (d,), sigma (d, d)) float64 of ``features`` (N, d): the mean and the unbiased
    covariance (``np.cov``, rows are samples). ValueError for fewer than 2 rows, another
    rank or a non-finite value."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features: expected (N, d) with N >= 2, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features: expected finite values, got NaN or Inf")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrtm(a):
    """scipy.linalg.sqrtm without its error estimate (the ``disp`` argument is deprecated
    from SciPy 1.16; before, ``disp=True`` printed to stdout for singular input)."""
    import warnings

    import scipy
    from scipy import linalg

    major, minor = (int(v) for v in scipy.__version__.split(".")[:2])
    with warnings.catch_warnings():  # singular input is expected (N < d); handled by the caller
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        if (major, minor) >= (1, 16):
            return linalg.sqrtm(a)
        return linalg.sqrtm(a, disp=False)[0]


def _check_gaussian(mu, sigma, which):
    mu = np.atleast_1d(np.asarray(mu, np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"mu{which}, sigma{which}: expected (d,) and (d, d), got "
                         f"{mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"mu{which}, sigma{which}: expected finite values")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """The Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2),
    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2))``, computed as
    ADM's evaluator and pytorch-fid do: ``scipy.linalg.sqrtm`` of the product; when that
    is not finite (a singular product), again with ``eps`` added to both diagonals; the
    imaginary part of the root (round-off) is dropped, ValueError when it is not
    negligible (a diagonal entry above 1e-3). Returns a float."""
    mu1, sigma1 = _check_gaussian(mu1, sigma1, 1)
    mu2, sigma2 = _check_gaussian(mu2, sigma2, 2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1, mu2: expected the same dimension, got {mu1.size} and {mu2.size}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(mu1.size) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"frechet_distance: sqrtm has an imaginary component {imag:g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ---- image sets --------------------------------------------------------------------------

def _npz_keys(path):
    try:
        with zipfile.ZipFile(path) as zf:
            return {os.path.splitext(n)[0] for n in zf.namelist()}
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz ({e})") from None


def _npz_member(path, key):
    """(open zip, open member, shape) of the uint8 image array ``key`` in the .npz
    ``path``, the member positioned at the array's data (read in pieces: a 50k-image
    arr_0 is 10 GB). ValueError for anything else."""
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz ({e})") from None
    try:
        f = zf.open(key + ".npy")
    except KeyError:
        zf.close()
        raise ValueError(f"{path}: no {key} (expected images (N, H, W, C) uint8)") from None
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except ValueError as e:
        f.close()
        zf.close()
        raise ValueError(f"{path}: {key} is not a readable array ({e})") from None
    if fortran or dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
        f.close()
        zf.close()
        raise ValueError(f"{path}: expected {key} of uint8 images (N, H, W, C) with C 1 or 3 "
                         f"(ADM's layout), got {dtype} {shape}"
                         + (" in Fortran order" if fortran else ""))
    return zf, f, shape


def _iter_npz(path, batch_size):
    zf, f, shape = _npz_member(path, "arr_0")
    row = int(np.prod(shape[1:]))
    with zf, f:
        for lo in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - lo)
            buf = f.read(n * row)
            if len(buf) != n * row:
                raise ValueError(f"{path}: arr_0 ends after {lo + len(buf) // row} of "
                                 f"{shape[0]} images (truncated)")
            yield np.frombuffer(buf, np.uint8).reshape((n,) + tuple(shape[1:]))


def _image_files(path):
    from .data import IMAGE_EXTS

    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                   if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise ValueError(f"{path}: no images ({', '.join(IMAGE_EXTS)}) under the folder")
    return files


def _read_rgb(fp, image_size):
    """One image as uint8 (H, W, 3): center-cropped to ``image_size`` as racedit.data reads
    training folders, or as it is (None)."""
    from PIL import Image

    from .data import read_image

    if image_size:
        return read_image(fp, image_size, 3)
    try:
        with Image.open(fp) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise ValueError(f"{fp}: cannot read image ({e})") from None


def _iter_folder(path, batch_size, image_size):
    files = _image_files(path)
    for lo in range(0, len(files), batch_size):
        out = [_read_rgb(fp, image_size) for fp in files[lo:lo + batch_size]]
        shapes = {a.shape for a in out}
        if len(shapes) > 1:
            raise ValueError(f"{path}: images of different sizes {sorted(shapes)}; give "
                             "image_size (--image-size) to center-crop them")
        yield np.stack(out)


def iter_images(path, batch_size=50, image_size=None):
    """Yield uint8 (B, H, W, C) batches of the image set ``path``: an .npz's ``arr_0``
    (streamed) or an image folder (converted to RGB; center-cropped to ``image_size``
    when given, else all images must share one size)."""
    if os.path.isdir(path):
        return _iter_folder(path, batch_size, image_size)
    _npz_shape(path)  # errors now, not at the first batch
    return _iter_npz(path, batch_size)


def _npz_shape(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such image folder or .npz")
    zf, f, shape = _npz_member(path, "arr_0")
    f.close()
    zf.close()
    return shape


def count_images(path):
    """Number of images in the set ``path`` (from the .npz header, or the folder listing)."""
    return len(_image_files(path)) if os.path.isdir(path) else int(_npz_shape(path)[0])


# ---- torch-fidelity's Inception ----------------------------------------------------------

class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def need(module, extra=EXTRA_HINT, who="racedit.metrics"):
    """``module`` imported, or :class:`MissingExtra` saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"{who}: {module} is needed for this (install it with {extra}); "
                           f"{e}") from e


def sha256_files(paths):
    """SHA-256 over the names and contents of ``paths`` (streamed)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _weights_path(path):
    """The Inception weights file: ``path``, or torch-fidelity's download in torch's hub
    cache. FileNotFoundError saying where to get it when there is none."""
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"inception (--inception): {path}: no such file; get "
                                    f"torch-fidelity's weights from {INCEPTION_URL}")
        return path
    torch = need("torch")
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    if os.path.isfile(cached):
        return cached
    raise FileNotFoundError(f"no Inception weights: download {INCEPTION_URL} and pass its "
                            f"path as --inception PATH (inception=), or put it at {cached}")


class Inception:
    """torch-fidelity's Inception-v3 (the TensorFlow graph's port), loaded from a weights
    file. ``features(batches)`` -> (pool (N, dims) float64, logits (N, 1008) float64);
    ``identity``: the file name and SHA-256, recorded with every result."""

    def __init__(self, path=None, dims=2048, device="cpu"):
        if dims not in DIMS:
            raise ValueError(f"dims (--dims): expected one of {DIMS}, got {dims!r}")
        torch = need("torch")
        fe = need("torch_fidelity.feature_extractor_inceptionv3")
        path = _weights_path(path)
        self.dims, self.device = int(dims), device
        self.identity = {"network": "torch-fidelity FeatureExtractorInceptionV3 "
                                    "(inception-v3-compat)",
                         "file": os.path.basename(path), "sha256": sha256_files([path])}
        try:  # weights_only first: the library's own load would unpickle anything
            torch.load(path, map_location="cpu", weights_only=True)
            net = fe.FeatureExtractorInceptionV3(
                "inception-v3-compat", [str(self.dims), "logits_unbiased"],
                feature_extractor_weights_path=path)
        except Exception as e:  # a wrong or corrupt file: unpickling or key errors
            raise ValueError(f"inception (--inception): {path} is not torch-fidelity's "
                             f"Inception-v3 state dict ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
        self.net, self.torch = net.to(device), torch

    def features(self, batches, progress=None):
        """(pool (N, dims), logits (N, 1008)) float64 of uint8 (B, H, W, C) batches (one
        channel is repeated to three). ``progress``: a tqdm bar advanced per image."""
        torch = self.torch
        pools, logits = [], []
        with torch.no_grad():
            for x in batches:
                if x.shape[-1] == 1:
                    x = np.repeat(x, 3, axis=-1)
                t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
                p, lg = self.net(t.to(self.device))
                pools.append(p.double().cpu().numpy())
                logits.append(lg.double().cpu().numpy())
                if progress is not None:
                    progress.update(x.shape[0])
        if not pools:
            raise ValueError("no images")
        return np.concatenate(pools), np.concatenate(logits)


def load_inception(path=None, dims=2048, device="cpu"):
    """An :class:`Inception` from ``path`` (or torch's hub cache); see :class:`Inception`."""
    return Inception(path, dims, device)


def inception_score(logits, split_size=5000):
    """(mean, std) of the Inception Score of ``logits`` (N, 1008) over consecutive splits of
    about ``split_size`` samples (ADM's: 10 splits of 50 000 samples; one below 7 500),
    computed by torch-fidelity (softmax in float64, no shuffle)."""
    torch = need("torch")
    isc = need("torch_fidelity.metric_isc")
    logits = np.asarray(logits, np.float64)
    splits = max(1, int(round(len(logits) / split_size)))
    r = isc.isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=False)
    return r[isc.KEY_METRIC_ISC_MEAN], r[isc.KEY_METRIC_ISC_STD]


def precision_recall(sample_features, ref_features, k=3, batch_size=2000):
    """(precision, recall) of the samples against the reference (Kynkäänniemi et al.;
    k-th nearest neighbour radii with k = 3, as ADM's evaluator): precision is the share
    of samples inside the reference manifold, recall the share of reference images inside
    the samples'. torch-fidelity's implementation, ``batch_size`` rows at a time."""
    torch = need("torch")
    prc = need("torch_fidelity.metric_prc")
    a = torch.from_numpy(np.ascontiguousarray(sample_features, np.float32))
    b = torch.from_numpy(np.ascontiguousarray(ref_features, np.float32))
    n = min(len(a), len(b))
    if n <= k:
        raise ValueError(f"precision_recall: need more than k = {k} samples and reference "
                         f"images, got {len(a)} and {len(b)}")
    r = prc.prc_features_to_metric(a, b, prc_neighborhood=k, prc_batch_size=batch_size,
                                   save_cpu_ram=True, verbose=False)
    return r[prc.KEY_METRIC_PRECISION], r[prc.KEY_METRIC_RECALL]


# ---- the fid command ----------------------------------------------------------------------

def _ref_stats(path):
    """The statistics file's arrays {mu, sigma, features?, sha256?, has_images} or None when
    ``path`` is an image set."""
    if os.path.isdir(path) or not os.path.isfile(path):
        return None
    keys = _npz_keys(path)
    if not {"mu", "sigma"} <= keys:
        return None
    with np.load(path, allow_pickle=False) as z:
        out = {"mu": z["mu"], "sigma": z["sigma"], "has_images": "arr_0" in keys}
        if "features" in keys:
            out["features"] = z["features"]
        if "extractor_sha256" in keys:
            out["sha256"] = str(z["extractor_sha256"])
    return out


def _check_ref(stats, path, net):
    d = stats["mu"].shape
    if d != (net.dims,):
        raise ValueError(f"ref (--ref): {path} holds statistics of {d[0] if d else '?'}-dim "
                         f"features, the network gives dims {net.dims} (--dims)")
    if stats.get("sha256") not in (None, net.identity["sha256"]):
        raise ValueError(f"ref (--ref): {path} was computed with another feature extractor "
                         f"(sha256 {stats['sha256'][:12]}..., this one "
                         f"{net.identity['sha256'][:12]}...): statistics of two networks "
                         "are not comparable")


def _bar(progress, total, desc):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True,
                disable=None if progress is True else False)


def _extract(net, path, batch_size, image_size, progress, desc):
    bar = _bar(progress, count_images(path), desc)
    try:
        return net.features(iter_images(path, batch_size, image_size), bar)
    finally:
        if bar is not None:
            bar.close()


def _sample_size(path):
    """Side of the samples' images (for center-cropping a reference folder)."""
    return None if os.path.isdir(path) else int(_npz_shape(path)[1])


def _reference(net, ref, stats, batch_size, image_size, progress):
    """(mu, sigma, features or None, num images or None, kind) of the reference ``ref``
    (``stats``: its statistics file's arrays, or None for an image set)."""
    if stats is None:
        feats, _ = _extract(net, ref, batch_size, image_size, progress, "fid ref")
        mu, sigma = feature_stats(feats)
        kind = "image folder" if os.path.isdir(ref) else "images (.npz)"
        return mu, sigma, feats, len(feats), kind
    feats = stats.get("features")
    kind = "statistics (.npz)"
    if feats is None and stats["has_images"]:  # an ADM reference batch: PR from its images
        feats, _ = _extract(net, ref, batch_size, None, progress, "fid ref")
        kind = "ADM reference batch"
    n = None if feats is None else len(feats)
    return stats["mu"], stats["sigma"], feats, n, kind


def save_ref_stats(path, mu, sigma, features, identity, dims):
    """Write reference statistics that :func:`fid` reads back as ``ref``: ``mu``,
    ``sigma``, ``features`` (for precision / recall), the extractor's SHA-256 and dims."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, features=np.asarray(features, np.float32),
                 extractor_sha256=np.array(identity["sha256"]), dims=np.array(dims))
    os.replace(tmp, path)
    return path


def fid(samples, ref, inception=None, dims=2048, batch_size=50, device="cpu",
        image_size=None, save_ref=None, out=None, progress=True, stream=None):
    """FID, Inception Score, precision and recall of ``samples`` against ``ref`` (see the
    module docstring for what each may be), as ADM's evaluator computes them, and write
    them as JSON to ``out`` (default: ``samples`` without ``.npz`` + ``.metrics.json``;
    False: no file).

    inception: the weights file of torch-fidelity's Inception-v3 (default: torch's hub
    cache; nothing is downloaded). dims: the feature layer of FID and precision / recall
    (2048 as ADM; 64, 192 or 768 as pytorch-fid's ``--dims``). image_size: side that a
    reference folder's images are center-cropped to (default: the samples'). save_ref:
    also write the reference's statistics there (reused later as ``ref``, much faster).
    Returns the result dict: ``fid``, ``inception_score`` (and ``_std``), ``precision``,
    ``recall`` (None when the reference has no features for them), ``num_samples``,
    ``num_ref``, ``dims``, ``feature_extractor`` (file name and SHA-256), the paths."""
    import sys

    stream = stream or sys.stdout
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size (--batch-size): expected an integer >= 1, got {batch_size!r}")
    if not os.path.exists(ref):
        raise FileNotFoundError(f"ref (--ref): {ref}: no such image folder or .npz")
    net = load_inception(inception, dims, device)
    stats = _ref_stats(ref)
    if stats is not None:  # before hours of feature extraction
        _check_ref(stats, ref, net)
    image_size = image_size or _sample_size(samples)
    feats, logits = _extract(net, samples, batch_size, None, progress, "fid samples")
    mu, sigma = feature_stats(feats)
    rmu, rsigma, rfeats, nref, kind = _reference(net, ref, stats, batch_size, image_size,
                                                 progress)
    if save_ref:
        save_ref_stats(save_ref, rmu, rsigma, rfeats, net.identity, net.dims)
    is_mean, is_std = inception_score(logits)
    prec = rec = None
    if rfeats is not None:
        prec, rec = precision_recall(feats, rfeats)
    res = {"fid": frechet_distance(mu, sigma, rmu, rsigma), "inception_score": is_mean,
           "inception_score_std": is_std, "precision": prec, "recall": rec,
           "num_samples": int(len(feats)), "num_ref": nref, "dims": net.dims,
           "samples": os.path.abspath(samples), "ref": os.path.abspath(ref), "ref_kind": kind,
           "feature_extractor": net.identity}
    if out is not False:
        out = out or os.path.splitext(samples.rstrip(os.sep))[0] + ".metrics.json"
        with open(out, "w") as f:
            json.dump(res, f, indent=2)
        res["json"] = out
    _print(res, stream)
    return res


def _print(res, stream):
    pr = ("precision / recall: n/a (the reference has only mu / sigma)"
          if res["precision"] is None else
          f"precision {res['precision']:.4f}, recall {res['recall']:.4f}")
    ref = res["ref_kind"] + ("" if res["num_ref"] is None else f" of {res['num_ref']} images")
    ident = res["feature_extractor"]
    print(f"racedit fid: {res['num_samples']} samples vs {ref}: FID {res['fid']:.4f}, "
          f"IS {res['inception_score']:.4f} ± {res['inception_score_std']:.4f}, {pr} "
          f"(Inception {ident['file']} sha256 {ident['sha256'][:12]}, dims {res['dims']})",
          file=stream)
    if "json" in res:
        print(f"racedit fid: wrote {res['json']}", file=stream)
