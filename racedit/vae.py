"""racedit.vae — the latent pipeline of the paper's ImageNet models: image folders encoded
to SD-VAE latents for ``--data latents``, and latent samples decoded back to images.

The autoencoder is diffusers' ``AutoencoderKL`` (the optional extra ``pip install
"racedit[vae]"``, imported only when used), loaded from a local folder written by
``save_pretrained`` (for the paper's models, ``stabilityai/sd-vae-ft-ema`` or ``-mse``
downloaded once); nothing is fetched at run time. Latents are scaled by the VAE's
``scaling_factor`` (0.18215 for SD's VAE, the scale of fast-DiT's features) when encoded and
unscaled before decoding.

:func:`encode_folder` writes fast-DiT's layout, ``OUT/features/<shard>.npy`` (n, C, h, w)
float32 and ``OUT/labels/<shard>.npy`` (n,) int64, which racedit.data.load_latents reads.
Images are read as ``--data folder`` reads them (ImageNet layout, classes in sorted order,
DiT's ``center_crop_arr``). Each latent is a draw from the encoder's Gaussian
(``latent_dist.sample()`` as fast-DiT) with noise from a generator keyed by (seed, index
of the image, mirrored or not), so the result depends neither on a resume nor, beyond the
round-off of the encoder's batched convolutions, on the batch size; with
``hflip`` every image is encoded twice, as it is and mirrored (DiT flips at random while
training; a flipped latent is not the latent of the flipped image). Memory holds one shard
of images; each shard is written atomically (labels, then features: a features file
implies its labels), and ``OUT/encode.json`` records the settings, so a second call with
the same settings encodes only the missing shards.
"""
import hashlib
import json
import os
import sys

import numpy as np

__all__ = ["VAE", "load_vae", "encode_folder", "SHARD_SIZE", "EXTRA_HINT"]

SHARD_SIZE = 1024   # source images per shard: the unit of a resume
EXTRA_HINT = 'pip install "racedit[vae]" (diffusers, torch)'
NOISE_KEY = 0x76616531  # spawn key of the encoder's noise (distinct from sampling's)


def _need(module):
    from .metrics import need

    return need(module, EXTRA_HINT, "racedit.vae")


class VAE:
    """diffusers' AutoencoderKL from a local folder, on ``device`` ("cpu" | "cuda").
    ``encode(images uint8 (B, H, W, 3), keys)`` -> scaled latents (B, C, h, w) float32;
    ``decode(latents)`` -> images (B, 3, H, W) float32 in [-1, 1]; ``factor``: H / h;
    ``identity``: the SHA-256 of its config and weights and its scaling factor (``path``:
    the folder, which may move)."""

    def __init__(self, path, device="cpu"):
        torch = _need("torch")
        diffusers = _need("diffusers")
        if not os.path.isfile(os.path.join(str(path), "config.json")):
            raise FileNotFoundError(f"vae (--vae): {path}: not a diffusers AutoencoderKL "
                                    "folder (config.json and weights, as save_pretrained "
                                    "writes; e.g. stabilityai/sd-vae-ft-ema downloaded)")
        try:
            self.model = diffusers.AutoencoderKL.from_pretrained(
                path, local_files_only=True, low_cpu_mem_usage=False).to(device).eval()
        except (OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"vae (--vae): {path}: cannot load an AutoencoderKL ({e})") from None
        cfg = self.model.config
        self.torch, self.device = torch, device
        self.scale = float(cfg.scaling_factor)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels, self.out_channels = int(cfg.latent_channels), int(cfg.out_channels)
        from .metrics import sha256_files

        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f == "config.json" or f.endswith((".safetensors", ".bin")))
        self.path = os.path.abspath(path)
        self.identity = {"sha256": sha256_files(files), "scaling_factor": self.scale}

    def image_hwc(self, latent_size):
        """(H, W, C) of the images decoded from latents of side ``latent_size``."""
        s = int(latent_size) * self.factor
        return (s, s, self.out_channels)

    def encode(self, images, keys):
        """Scaled latents (B, C, h, w) float32 of uint8 ``images`` (B, H, W, 3): the mean
        plus std times noise drawn from a generator keyed by each entry of ``keys`` (B,)."""
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        x = x.to(self.device, torch.float32) / 127.5 - 1.0
        with torch.no_grad():
            dist = self.model.encode(x).latent_dist
            mean, std = dist.mean.float().cpu().numpy(), dist.std.float().cpu().numpy()
        noise = np.stack([np.random.default_rng(np.random.SeedSequence(
            [int(k) for k in key], spawn_key=(NOISE_KEY,))).standard_normal(
            mean.shape[1:], dtype=np.float32) for key in keys])
        return ((mean + std * noise) * self.scale).astype(np.float32)

    def decode(self, latents, batch_size=8):
        """Images (B, 3, H, W) float32 in [-1, 1] of scaled ``latents`` (B, C, h, w),
        ``batch_size`` at a time (a 256 x 256 decode holds ~100 MB of activations per image)."""
        torch = self.torch
        z = np.asarray(latents, np.float32)
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"latents: expected (B, {self.latent_channels}, h, w) for this "
                             f"VAE, got shape {z.shape}")
        out = []
        with torch.no_grad():
            for lo in range(0, z.shape[0], batch_size):
                zt = torch.from_numpy(z[lo:lo + batch_size] / self.scale).to(self.device)
                out.append(self.model.decode(zt).sample.clamp(-1.0, 1.0).float().cpu().numpy())
        return np.concatenate(out)


def load_vae(path, device="cpu"):
    """A :class:`VAE` from the folder ``path``."""
    return VAE(path, device)


# ---- encoding an image folder ------------------------------------------------------------

def _manifest(out, settings):
    """Write ``out``/encode.json, or check an existing one against ``settings`` (all but
    where the images and the VAE lie: their listing and hash say what they are)."""
    path = os.path.join(out, "encode.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items()
                if k not in ("source", "vae_path") and old.get(k) != v]
        if diff:
            raise ValueError(f"{out} holds latents of other settings ({'; '.join(diff)}): "
                             "give another --out, or remove it to start over")
        return path
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(settings, f, indent=2)
    os.replace(tmp, path)
    return path


def _shard_done(fp, lp, n, shape):
    """True when shard ``fp`` / ``lp`` holds ``n`` latents of ``shape``."""
    if not (os.path.exists(fp) and os.path.exists(lp)):
        return False
    try:
        x = np.load(fp, mmap_mode="r")
        y = np.load(lp)
        return x.shape == (n,) + shape and y.shape == (n,)
    except (OSError, ValueError):
        return False


def _save_npy(path, arr):
    d, b = os.path.split(path)
    tmp = os.path.join(d, f".{b}.{os.getpid()}.tmp")  # not *.npy: load_latents skips it
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def _encode_shard(vae, root, files, labels, lo, image_size, hflip, seed, batch_size, bar):
    """(features (n, C, h, w), labels (n,)) of source images [lo, lo + len(files))."""
    from .data import read_image

    feats, labs = [], []
    for b in range(0, len(files), batch_size):
        imgs = np.stack([read_image(os.path.join(root, f), image_size, 3)
                         for f in files[b:b + batch_size]])                 # (B,H,W,3)
        idx = np.arange(lo + b, lo + b + imgs.shape[0])
        views = [(imgs, 0)] + ([(imgs[:, :, ::-1], 1)] if hflip else [])
        z = [vae.encode(v, [(seed, i, flip) for i in idx]) for v, flip in views]
        feats.append(np.stack(z, 1).reshape((-1,) + z[0].shape[1:]))      # image, then mirror
        labs.append(np.repeat(labels[b:b + imgs.shape[0]], len(views)))
        if bar is not None:
            bar.update(imgs.shape[0])
    return np.concatenate(feats), np.concatenate(labs)


def encode_folder(data_path, vae, out, image_size=256, hflip=False, batch_size=16,
                  shard_size=None, seed=0, device="cpu", progress=True, stream=None):
    """Encode the ImageNet-layout folder ``data_path`` with ``vae`` (a folder or a
    :class:`VAE`) into ``out`` in fast-DiT's latent layout (see the module docstring),
    resumably. image_size: the side images are center-cropped to (256 for the paper's
    32 x 32 latents); hflip: also encode every image mirrored; shard_size: source images
    per file (:data:`SHARD_SIZE`). Returns the number of latents written in all."""
    from .data import check_image_size, folder_files

    stream = stream or sys.stdout
    check_image_size(image_size)
    shard_size = SHARD_SIZE if shard_size is None else int(shard_size)
    if shard_size < 1 or int(batch_size) < 1:
        raise ValueError(f"shard_size, batch_size (--shard-size, --batch-size): expected >= 1, "
                         f"got {shard_size}, {batch_size}")
    files, labels, classes = folder_files(data_path)
    vae = vae if isinstance(vae, VAE) else load_vae(vae, device)
    if image_size % vae.factor:
        raise ValueError(f"image_size (--image-size): {image_size} is not a multiple of the "
                         f"VAE's downsampling factor {vae.factor}")
    for sub in ("features", "labels"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    listing = hashlib.sha1("\n".join(f"{f}\t{y}" for f, y in zip(files, labels)).encode())
    _manifest(out, {"source": os.path.abspath(data_path), "num_images": len(files),
                    "files_sha1": listing.hexdigest(), "classes": classes,
                    "image_size": int(image_size), "hflip": bool(hflip), "seed": int(seed),
                    "shard_size": shard_size, "vae": vae.identity, "vae_path": vae.path})
    h = image_size // vae.factor
    shape, per = (vae.latent_channels, h, h), 2 if hflip else 1
    spans = [(k, lo, min(lo + shard_size, len(files)))
             for k, lo in enumerate(range(0, len(files), shard_size))]
    paths = [(os.path.join(out, "features", f"{k:05d}.npy"),
              os.path.join(out, "labels", f"{k:05d}.npy")) for k, _, _ in spans]
    todo = [s for s, (fp, lp) in zip(spans, paths)
            if not _shard_done(fp, lp, (s[2] - s[1]) * per, shape)]
    if len(todo) < len(spans):
        print(f"racedit encode: {out}: {len(spans) - len(todo)} of {len(spans)} shards "
              f"present, encoding the other {len(todo)}", file=stream)
    bar = _bar(progress, sum(hi - lo for _, lo, hi in todo))
    try:
        for k, lo, hi in todo:
            x, y = _encode_shard(vae, data_path, files[lo:hi], labels[lo:hi], lo, image_size,
                                 hflip, seed, int(batch_size), bar)
            _save_npy(paths[k][1], y)   # labels first: a features file implies its labels
            _save_npy(paths[k][0], x)
    finally:
        if bar is not None:
            bar.close()
    n = len(files) * per
    print(f"racedit encode: {n} latents {shape} of {len(files)} images in {len(classes)} "
          f"classes -> {out} (train with --data latents {out})", file=stream)
    return n


def _bar(progress, total):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="encode", unit="img", dynamic_ncols=True,
                disable=None if progress is True else False)
