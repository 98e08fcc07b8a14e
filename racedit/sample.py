"""racedit.sample — class-conditional sampling from a checkpoint (DiT's sample.py and
sample_ddp.py).

EMA weights by default, eval-mode routing (each MoE layer selects the pairs whose gate
reaches its learned threshold, independent of the batch), classifier-free guidance with
the batch doubled by null labels. Every sample i draws all its noise (x_T and the ancestral
sampler's per-step noise) from its own Generator keyed by (seed, i), so a sample does not
depend on the batch size, the shard or a resume. The model sees at most ``batch_size``
images per call (:data:`DEFAULT_BATCH`; twice that with guidance), whatever the number of
samples; one progress bar covers every batch and sampler step.

Pixel-space models write a PNG grid (Pillow) and optionally an .npz with the same base
name; latent-space models write the latents (.npy) and, given a VAE (``vae``, racedit.vae),
decode them to the same PNG grid and .npz of images, else print how to decode them. Mass
sampling (``num_samples``) writes uint8 shards and a merged ``.npz``
(``arr_0`` N x H x W x C uint8, as ADM's evaluator reads, plus ``labels``; a latent
model's samples decoded by the VAE batch by batch) and resumes from the shards present.
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import zipfile

import numpy as np

from .diffusion import default_sampler, default_steps, guided, make_objective, space_timesteps
from .diffusion import sample as run_sampler
from .runs import latest_checkpoint

__all__ = ["sample", "generate", "generate_npz", "mass_labels", "latest_checkpoint",
           "set_weights", "save_grid", "to_uint8", "SampleResult", "VAE_HINT", "DEFAULT_BATCH",
           "SHARD_SIZE"]

DEFAULT_BATCH = 64   # images per model call (2x with guidance): bounds the activations
SHARD_SIZE = 1000    # images per shard of a mass-sampling run (the unit of a resume)

VAE_HINT = """These are SD-VAE latents times 0.18215 (the scale of fast-DiT's features).
To decode them with a VAE you have (diffusers):

    import numpy as np, torch
    from diffusers.models import AutoencoderKL
    vae = AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-ema")   # or a local path
    z = torch.from_numpy(np.load("{path}"))
    with torch.no_grad():
        img = vae.decode(z / 0.18215).sample                  # (N, 3, 8H, 8W) in [-1, 1]
"""


@dataclasses.dataclass
class SampleResult:
    """samples: (N, C, H, W) float32 (images in [-1, 1], or latents; None for a mass-sampling
    run, whose samples are only in the .npz); labels (N,) int64; png / npz / npy: the files
    written (None when not written); manifest: a mass-sampling run's manifest.json."""

    samples: np.ndarray
    labels: np.ndarray
    png: str = None
    npz: str = None
    npy: str = None
    manifest: str = None


def to_uint8(x):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 (C = 1 is kept as one channel)."""
    x = np.clip((np.asarray(x, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return x.transpose(0, 2, 3, 1)


@contextlib.contextmanager
def _atomic(path):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` (a crash
    leaves the old file or none, never a torn one)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_grid(x, path, ncol=8, pad=2, scale=2):
    """Write images (N, C, H, W) in [-1, 1] as a PNG grid of ``ncol`` columns, ``pad``
    pixels apart, each pixel drawn ``scale`` x ``scale`` (nearest). Returns the path."""
    from PIL import Image

    imgs = to_uint8(x)                                    # (N,H,W,C)
    N, H, W, C = imgs.shape
    ncol = max(1, min(int(ncol), N))
    nrow = -(-N // ncol)
    grid = np.full((nrow * (H + pad) + pad, ncol * (W + pad) + pad, C), 255, np.uint8)
    r, c = np.divmod(np.arange(N), ncol)
    for i in range(N):  # one copy per image, not per pixel
        y0, x0 = pad + r[i] * (H + pad), pad + c[i] * (W + pad)
        grid[y0:y0 + H, x0:x0 + W] = imgs[i]
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    with _atomic(path) as tmp:
        Image.fromarray(grid[..., 0] if C == 1 else grid).save(tmp, format="PNG")
    return path


def _save_npz(path, **arrays):
    with _atomic(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return path


def set_weights(model, weights):
    """Load a flat float32 buffer as ``model``'s parameters (on any device)."""
    model.set_param_buffer(np.ascontiguousarray(weights, np.float32))


# ---- one model evaluation, per-sample noise, settings ------------------------------------

def _denoise_fn(model):
    """The one place a sampler evaluates the model: fn(x (B,C,H,W), t (B,), y (B,)) -> out."""
    return lambda x, t, y: model.infer(x, t, y)


class _SampleNoise:
    """Stands in for a numpy Generator in the samplers: ``standard_normal((B, ...))`` fills
    row b from sample b's own Generator, keyed by (seed, index of the sample), so what a
    sample draws does not depend on which other samples share its batch."""

    def __init__(self, seed, indices):
        self.gens = [np.random.default_rng([seed, int(i)]) for i in indices]

    def standard_normal(self, shape, dtype=np.float64):
        if shape[0] != len(self.gens):
            raise ValueError(f"noise: expected a batch of {len(self.gens)}, got shape {shape}")
        out = np.empty(shape, dtype)
        for g, row in zip(self.gens, out):
            g.standard_normal(dtype=dtype, out=row)
        return out


def _int_at_least(name, flag, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} ({flag}): expected an integer >= {low}, got {value!r}")
    return int(value)


@dataclasses.dataclass
class _Plan:
    """How to sample: the sampler and its steps, guidance, seed, clipping, batch size."""

    sampler: str
    num_steps: int
    cfg_scale: float
    seed: int
    clip_denoised: bool
    batch_size: int

    def evals(self, objective):
        """Model calls per batch (Heun corrects every step but the last)."""
        if self.sampler in ("ddpm", "ddim"):
            return len(space_timesteps(objective.num_timesteps, self.num_steps))
        return 2 * self.num_steps - 1 if self.sampler == "heun" else self.num_steps

    def bar_total(self, objective, n):
        return -(-n // self.batch_size) * self.evals(objective)


def _check_numbers(cfg_scale, num_steps, batch_size, seed):
    """(num_steps or None, batch_size, seed) checked: ValueError naming the argument and
    its flag for a non-finite or negative cfg_scale, or a count below 1 (0 is not "the
    default")."""
    try:
        ok = math.isfinite(float(cfg_scale)) and float(cfg_scale) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"cfg_scale (--cfg-scale): expected a finite number >= 0, got {cfg_scale!r}")
    if num_steps is not None:
        num_steps = _int_at_least("num_sampling_steps", "--num-sampling-steps", num_steps, 1)
    bs = DEFAULT_BATCH if batch_size is None else _int_at_least(
        "batch_size", "--batch-size", batch_size, 1)
    return num_steps, bs, _int_at_least("seed", "--seed", seed, 0)


def _plan(objective, sampler, num_steps, cfg_scale, seed, clip_denoised, batch_size):
    """A checked :class:`_Plan` (ValueError naming the argument and its flag)."""
    num_steps, bs, seed = _check_numbers(cfg_scale, num_steps, batch_size, seed)
    sampler = sampler or default_sampler(objective.name)
    if sampler not in objective.samplers:
        raise ValueError(f"sampler: a {objective.name} model samples with "
                         f"{objective.samplers}, got {sampler!r}")
    num_steps = num_steps or default_steps(sampler)
    return _Plan(sampler, num_steps, float(cfg_scale), seed, bool(clip_denoised), bs)


def _check_labels(labels, num_classes):
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: expected a non-empty 1-d integer array, got shape "
                         f"{labels.shape} dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels: expected values in [0, {num_classes}), got "
                         f"[{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


def _bar(progress, total):
    """One tqdm bar (stderr) over ``total`` model calls: progress True draws it only when
    stderr is a terminal, "always" draws it anyway, False never. None without tqdm."""
    if not progress:
        return contextlib.nullcontext()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return contextlib.nullcontext()
    return tqdm(total=total, desc="sample", unit="step", dynamic_ncols=True,
                disable=None if progress is True else False)


@contextlib.contextmanager
def _eval_weights(model, weights):
    """Eval mode, and ``weights`` (flat float32, or None: the model's own) for the block;
    the mode and the weights are restored after."""
    saved = model.param_buffer.copy() if weights is not None else None
    was_training = model.training
    try:
        if weights is not None:
            set_weights(model, weights)
        model.eval()
        yield model
    finally:
        if saved is not None:
            set_weights(model, saved)
        model.train(was_training)


def _batches(model, objective, labels, first, plan, bar):
    """Yield the samples (B, C, H, W) float32 of ``labels`` (N,) batch by batch; sample j
    is keyed (plan.seed, first + j). ``bar`` (tqdm or None) advances once per model call."""
    C, S = model.in_channels, model.input_size
    den = _denoise_fn(model)

    def counted(x, t, y):
        out = den(x, t, y)
        if bar is not None:
            bar.update(1)
        return out

    for lo in range(0, labels.size, plan.batch_size):
        y = labels[lo:lo + plan.batch_size]
        fn = guided(counted, y, plan.cfg_scale, model.num_classes)
        noise = _SampleNoise(plan.seed, range(first + lo, first + lo + y.size))
        yield run_sampler(objective, fn, (y.size, C, S, S), noise, sampler=plan.sampler,
                          num_steps=plan.num_steps, clip_denoised=plan.clip_denoised,
                          progress=False)


def generate(model, objective, labels, weights=None, cfg_scale=4.0, sampler=None,
             num_steps=None, seed=0, clip_denoised=False, progress=True, batch_size=None):
    """Sample one image per label with ``model`` (eval mode for the duration).

    weights: a flat float32 buffer (e.g. the EMA) loaded into model.param_buffer for the
    call and restored after. labels: (N,) ints in [0, num_classes). cfg_scale 1 turns
    guidance off. seed: sample i draws its noise from a Generator keyed by (seed, i), so
    the result does not depend on batch_size (images per model call, default
    :data:`DEFAULT_BATCH`). progress: one bar over every batch and step, drawn when stderr
    is a terminal (True), always ("always") or never (False).
    Returns (N, C, H, W) float32."""
    labels = _check_labels(labels, model.num_classes)
    plan = _plan(objective, sampler, num_steps, cfg_scale, seed, clip_denoised, batch_size)
    with _eval_weights(model, weights), \
            _bar(progress, plan.bar_total(objective, labels.size)) as bar:
        return np.concatenate(list(_batches(model, objective, labels, 0, plan, bar)))


# ---- mass sampling: uint8 shards, a manifest, a merged .npz --------------------------------

LABEL_KEY = 0x6C61626C  # spawn key of the label Generator (distinct from every sample's)


def mass_labels(num_samples, num_classes, seed=0, random_labels=False):
    """The labels of a mass-sampling run (N,) int64: ``i % num_classes`` (every class
    equally often, within one), or uniform random labels drawn from a Generator keyed by
    ``seed``."""
    n = _int_at_least("num_samples", "--num-samples", num_samples, 1)
    if not random_labels:
        return np.arange(n, dtype=np.int64) % num_classes
    ss = np.random.SeedSequence(_int_at_least("seed", "--seed", seed, 0), spawn_key=(LABEL_KEY,))
    return np.random.default_rng(ss).integers(0, num_classes, n, dtype=np.int64)


def _shard_path(folder, k):
    return os.path.join(folder, f"shard-{k:05d}.npz")


def _open_manifest(folder, manifest):
    """Write ``folder``/manifest.json for a new run, or check that an existing run's matches
    (ValueError naming every setting that differs). Returns its path."""
    path = os.path.join(folder, "manifest.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in manifest.items()
                if k not in _NOT_COMPARED and old.get(k) != v]
        if diff:
            raise ValueError(f"{folder} holds samples of other settings ({'; '.join(diff)}): "
                             "give another --out, or remove that folder to start over")
        return path
    with _atomic(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2)
    return path


# Recorded but free to change on a resume: they do not change what a sample is.
_NOT_COMPARED = ("checkpoint", "batch_size", "device", "precision")


def _shard_done(path, labels, hwc):
    """True when the shard ``path`` exists and holds ``labels`` at image shape ``hwc``."""
    if not os.path.exists(path):
        return False
    try:
        with np.load(path) as z:
            ok = z["arr_0"].shape == (labels.size,) + hwc and np.array_equal(z["labels"], labels)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: unreadable shard ({e}); remove it to sample it again") from None
    if not ok:
        raise ValueError(f"{path}: holds other samples than this run's; remove it or give "
                         "another --out")
    return True


def _write_merged(path, shard_paths, labels, hwc):
    """The shards, in order, as one .npz (``arr_0`` (N,H,W,C) uint8, ``labels`` (N,)),
    streamed one shard at a time into the zip member."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
              "fortran_order": False, "shape": (labels.size,) + hwc}
    with _atomic(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                for p in shard_paths:
                    with np.load(p) as z:
                        f.write(np.ascontiguousarray(z["arr_0"]).data)
            with zf.open("labels.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, labels)
    return path


def generate_npz(model, objective, path, labels, weights=None, cfg_scale=4.0, sampler=None,
                 num_steps=None, seed=0, clip_denoised=True, progress=True, batch_size=None,
                 shard_size=None, info=None, stream=None, decoder=None):
    """Sample one image per label into ``path`` (.npz: ``arr_0`` (N, H, W, C) uint8 and
    ``labels``), resumably and in bounded memory.

    The samples go in shards of ``shard_size`` (:data:`SHARD_SIZE`) to the folder named as ``path`` without
    .npz (``shard-00000.npz`` ...), each written atomically, with a manifest.json of the
    settings (``info``, e.g. the checkpoint and step, plus the sampling settings); a call
    whose folder already holds shards of the same settings samples only the missing ones
    (ValueError when the settings differ). Sample i is keyed (seed, i) as in
    :func:`generate`, so the result does not depend on batch_size or on resumes. Only one
    shard of uint8 images is held at a time. decoder: a racedit.vae.VAE that turns each
    batch of a latent model's samples into images (its identity belongs in ``info``).
    Other arguments as :func:`generate`. Returns (path, manifest path)."""
    stream = stream or sys.stdout
    if not str(path).endswith(".npz"):
        raise ValueError(f"path: expected a file name ending in .npz, got {path!r}")
    labels = _check_labels(labels, model.num_classes)
    plan = _plan(objective, sampler, num_steps, cfg_scale, seed, clip_denoised, batch_size)
    shard_size = SHARD_SIZE if shard_size is None else _int_at_least(
        "shard_size", "--shard-size", shard_size, 1)
    hwc = (decoder.image_hwc(model.input_size) if decoder is not None
           else (model.input_size, model.input_size, model.in_channels))
    folder = os.path.splitext(path)[0]
    manifest = dict(info or {}, **dataclasses.asdict(plan), num_samples=int(labels.size),
                    shard_size=shard_size, image_shape=list(hwc),
                    labels_sha1=hashlib.sha1(labels.tobytes()).hexdigest())
    man = _open_manifest(folder, manifest)
    spans = [(k, lo, min(lo + shard_size, labels.size))
             for k, lo in enumerate(range(0, labels.size, shard_size))]
    todo = [s for s in spans if not _shard_done(_shard_path(folder, s[0]), labels[s[1]:s[2]], hwc)]
    if len(todo) < len(spans):
        print(f"racedit: {folder}: {len(spans) - len(todo)} of {len(spans)} shards present"
              + (f", sampling the other {len(todo)}" if todo else ""), file=stream)
    total = sum(plan.bar_total(objective, hi - lo) for _, lo, hi in todo)
    with _eval_weights(model, weights), _bar(progress, total) as bar:
        for k, lo, hi in todo:
            imgs = np.empty((hi - lo,) + hwc, np.uint8)                   # (n,H,W,C)
            j = 0
            for x in _batches(model, objective, labels[lo:hi], lo, plan, bar):
                imgs[j:j + x.shape[0]] = to_uint8(x if decoder is None else decoder.decode(x))
                j += x.shape[0]
            _save_npz(_shard_path(folder, k), arr_0=imgs, labels=labels[lo:hi])
    _write_merged(path, [_shard_path(folder, k) for k, _, _ in spans], labels, hwc)
    print(f"racedit: wrote {labels.size} samples to {path}", file=stream)
    return path, man


# ---- from a checkpoint -----------------------------------------------------------------------

def _parse_labels(class_labels, num_classes, per_class):
    if class_labels is None:
        per_class = _int_at_least("per_class", "--per-class", per_class, 1)
        return np.repeat(np.arange(min(num_classes, 10)), per_class)
    if isinstance(class_labels, str):
        try:
            class_labels = [int(s) for s in class_labels.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"class_labels (--class-labels): expected integers like "
                             f"'0,3,7', got {class_labels!r}") from None
    return np.asarray(class_labels, np.int64)


def _check_args(cfg_scale, num_sampling_steps, batch_size, seed, num_samples, class_labels,
                random_labels, shard_size, grid_columns, out):
    """Reject bad settings before a checkpoint is read (the same checks run again later)."""
    _check_numbers(cfg_scale, num_sampling_steps, batch_size, seed)
    if grid_columns is not None:
        _int_at_least("grid_columns", "--grid-columns", grid_columns, 1)
    ext = ".png" if num_samples is None else ".npz"
    if out is not None and not str(out).endswith(ext):
        # the .npz / .npy written next to the PNG take its base name: they must not collide
        raise ValueError(f"out (--out): expected a path ending in {ext}, got {out!r}")
    if num_samples is None:
        if random_labels:
            raise ValueError("random_labels (--random-labels) needs num_samples (--num-samples)")
        return
    _int_at_least("num_samples", "--num-samples", num_samples, 1)
    if shard_size is not None:
        _int_at_least("shard_size", "--shard-size", shard_size, 1)
    if class_labels is not None:
        raise ValueError("class_labels (--class-labels) and num_samples (--num-samples): "
                         "give one (--num-samples spreads the samples over all classes)")


def sample(ckpt, class_labels=None, per_class=8, cfg_scale=4.0, num_sampling_steps=None,
           sampler=None, seed=0, use_ema=True, out=None, npz=False, grid_columns=None,
           progress=True, stream=None, batch_size=None, device="cpu", precision="fp32",
           num_samples=None, random_labels=False, shard_size=None, threads=None, vae=None):
    """Sample from a training checkpoint and write the results.

    ckpt: a checkpoint file, or a run folder (its latest checkpoint).
    class_labels: labels to draw (list or "1,2,3"); default ``per_class`` of each of the
    first 10 classes. sampler: ddpm/ddim (ddpm models) or euler/heun (flow models),
    default from the checkpoint's config, then ddpm / euler; num_sampling_steps likewise.
    out: the PNG path (default ``<run>/samples/sample-<step>-<sampler><steps>-cfg<s>-
    seed<seed>.png``, with the labels, ``-live`` (use_ema False) and the device added when
    not the defaults, so that other settings never overwrite a file); npz: also write the samples, with the same base name, as an .npz (uint8 HWC
    ``arr_0`` as DiT's sample_ddp, plus ``labels``). grid_columns: columns of the grid.
    Latent models write ``.npy`` latents instead and print :data:`VAE_HINT`; with ``vae``
    (a diffusers AutoencoderKL folder, racedit.vae) they also decode them to the PNG (and
    .npz) of images, and may mass-sample.

    num_samples: mass sampling (DiT's sample_ddp) of N images spread evenly over all
    classes (or uniformly random labels, ``random_labels``) with :func:`generate_npz`:
    out is then the .npz (default ``<run>/samples/sample-...-n<N>.npz``), the shards of
    ``shard_size`` (:data:`SHARD_SIZE`) and the manifest go to the folder of that name, and the same call
    resumes an interrupted run. No PNG; ``samples`` of the result is None.

    batch_size: images per model call (:data:`DEFAULT_BATCH`); progress: see
    :func:`generate`; threads: limit the OpenMP and BLAS threads. device: "cpu" or "cuda"
    (a checkpoint from either device samples on either); precision: "fp32", or on cuda
    "tf32" / "bf16". ValueError for bad settings (before the checkpoint is read) or for
    device "cuda" when CUDA is not available. Returns a :class:`SampleResult`."""
    from .threads import thread_limit
    from .factory import check_device, model_from_checkpoint

    stream = stream or sys.stdout
    _check_args(cfg_scale, num_sampling_steps, batch_size, seed, num_samples, class_labels,
                random_labels, shard_size, grid_columns, out)
    check_device(device, precision)
    with thread_limit(threads):
        ckpt = latest_checkpoint(ckpt)
        model, meta = model_from_checkpoint(ckpt, use_ema=use_ema, device=device,
                                            precision=precision)
        decoder = _load_decoder(vae, meta, device)
        call = _Call(ckpt=ckpt, meta=meta, model=model, class_labels=class_labels,
                     per_class=per_class, cfg_scale=cfg_scale,
                     num_sampling_steps=num_sampling_steps, sampler=sampler, seed=seed,
                     use_ema=use_ema, out=out, npz=npz, grid_columns=grid_columns,
                     progress=progress, stream=stream, batch_size=batch_size, device=device,
                     precision=precision, num_samples=num_samples,
                     random_labels=random_labels, shard_size=shard_size, decoder=decoder)
        from .cuda import precision_scope

        with precision_scope(device, precision):
            return call.run_many() if num_samples is not None else call.run()


def _load_decoder(vae, meta, device):
    """The racedit.vae.VAE of the folder ``vae`` for a latent checkpoint (None without
    one); ValueError for a pixel-space checkpoint."""
    if vae is None:
        return None
    if meta["data"]["kind"] != "latents":
        raise ValueError(f"vae (--vae): this checkpoint's model samples pixels "
                         f"({meta['data']['kind']} data); a VAE decodes latents")
    from .vae import load_vae

    return load_vae(vae, device)


@dataclasses.dataclass
class _Call:
    """One call of :func:`sample` with its checkpoint loaded."""

    ckpt: str
    meta: dict
    model: object
    class_labels: object
    per_class: int
    cfg_scale: float
    num_sampling_steps: int
    sampler: str
    seed: int
    use_ema: bool
    out: str
    npz: bool
    grid_columns: int
    progress: object
    stream: object
    batch_size: int
    device: str
    precision: str
    num_samples: int
    random_labels: bool
    shard_size: int
    decoder: object = None

    def __post_init__(self):
        cfg = self.meta["config"]
        self.obj = make_objective(cfg["objective"], learn_sigma=cfg.get("learn_sigma", False))
        self.sampler = self.sampler or cfg.get("sampler") or default_sampler(self.obj.name)
        if self.num_sampling_steps is None and self.sampler == cfg.get("sampler"):
            self.num_sampling_steps = cfg.get("num_sampling_steps")
        if self.num_sampling_steps is None:
            self.num_sampling_steps = default_steps(self.sampler)
        self.latent = self.meta["data"]["kind"] == "latents"
        self.step = int(self.meta.get("step", 0))

    def base(self, tag):
        """Default output path without extension: every setting that changes the samples."""
        run = os.path.dirname(os.path.dirname(os.path.abspath(self.ckpt)))
        dev = "" if self.device == "cpu" else f"-{self.device}-{self.precision}"
        name = (f"sample-{self.step:07d}-{self.sampler}{self.num_sampling_steps}-"
                f"cfg{self.cfg_scale:g}-seed{self.seed}{tag}{'' if self.use_ema else '-live'}"
                f"{dev}")
        return os.path.join(run, "samples", name)

    def labels_tag(self, labels):
        if self.class_labels is None:
            return "" if self.per_class == 8 else f"-x{self.per_class}"
        if labels.size <= 8:
            return "-y" + "_".join(map(str, labels.tolist()))
        return "-y" + hashlib.sha1(labels.tobytes()).hexdigest()[:8]

    def run(self):
        labels = _parse_labels(self.class_labels, self.model.num_classes, self.per_class)
        x = generate(self.model, self.obj, labels, cfg_scale=self.cfg_scale,
                     sampler=self.sampler, num_steps=self.num_sampling_steps, seed=self.seed,
                     clip_denoised=not self.latent, progress=self.progress,
                     batch_size=self.batch_size)
        base = (os.path.splitext(self.out)[0] if self.out
                else self.base(self.labels_tag(labels)))
        res = SampleResult(x, labels)
        if self.latent:
            res.npy = base + ".npy"
            with _atomic(res.npy) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, x)
            print(f"racedit: wrote {x.shape[0]} latents {x.shape[1:]} to {res.npy}",
                  file=self.stream)
            if self.decoder is None:
                print(VAE_HINT.format(path=res.npy), file=self.stream)
                return res
            x = self.decoder.decode(x)                                    # (N,3,H,W)
        ncol = self.grid_columns or (self.per_class if self.class_labels is None
                                     else min(8, labels.size))
        res.png = save_grid(x, self.out or base + ".png", ncol=ncol,
                            scale=2 if self.decoder is None else 1)
        print(f"racedit: wrote {res.png}", file=self.stream)
        if self.npz:
            res.npz = _save_npz(base + ".npz", arr_0=to_uint8(x), labels=labels)
            print(f"racedit: wrote {res.npz}", file=self.stream)
        return res

    def run_many(self):
        if self.latent and self.decoder is None:
            raise ValueError("num_samples (--num-samples) writes uint8 images; this "
                             "checkpoint's model samples latents: give a VAE to decode them "
                             "(--vae DIR), or sample without it for .npy")
        labels = mass_labels(self.num_samples, self.model.num_classes, self.seed,
                             self.random_labels)
        path = self.out or self.base(f"-n{self.num_samples}"
                                     + ("-random" if self.random_labels else "")) + ".npz"
        info = {"checkpoint": os.path.abspath(self.ckpt),
                "checkpoint_file": os.path.basename(self.ckpt),
                "step": self.step, "model": self.meta.get("model_config", {}).get("name"),
                "use_ema": self.use_ema, "labels": "random" if self.random_labels else "even",
                "device": self.device, "precision": self.precision}
        if self.decoder is not None:
            info["vae"] = self.decoder.identity
        npz, man = generate_npz(self.model, self.obj, path, labels, cfg_scale=self.cfg_scale,
                                sampler=self.sampler, num_steps=self.num_sampling_steps,
                                seed=self.seed, clip_denoised=not self.latent,
                                progress=self.progress, batch_size=self.batch_size,
                                shard_size=self.shard_size, info=info, stream=self.stream,
                                decoder=self.decoder)
        return SampleResult(None, labels, npz=npz, manifest=man)
