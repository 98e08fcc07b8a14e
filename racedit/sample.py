"""racedit.sample — class-conditional sampling from a checkpoint (DiT's sample.py).

EMA weights by default, eval-mode routing (each MoE layer selects the pairs whose gate
reaches its learned threshold, independent of the batch), classifier-free guidance with
the batch doubled by null labels, seeded numpy Generators. Pixel-space models write a PNG
grid (Pillow) and optionally an .npz; latent-space models write the latents (.npy) and
print how to decode them with a VAE you have.
"""
import dataclasses
import os
import sys

import numpy as np

from .diffusion import default_sampler, default_steps, guided, make_objective
from .diffusion import sample as run_sampler

__all__ = ["sample", "generate", "set_weights", "save_grid", "to_uint8", "SampleResult", "VAE_HINT"]

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
    """samples: (N, C, H, W) float32 (images in [-1, 1], or latents); labels (N,) int64;
    png / npz / npy: the files written (None when not written)."""

    samples: np.ndarray
    labels: np.ndarray
    png: str = None
    npz: str = None
    npy: str = None


def to_uint8(x):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 (C = 1 is kept as one channel)."""
    x = np.clip((np.asarray(x, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return x.transpose(0, 2, 3, 1)


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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[..., 0] if C == 1 else grid).save(path)
    return path


def set_weights(model, weights):
    """Load a flat float32 buffer as ``model``'s parameters: written into
    ``model.param_buffer`` on the CPU, uploaded with ``set_param_buffer`` for a GPU model
    (whose ``param_buffer`` is a host copy)."""
    if getattr(model, "device", "cpu") == "cuda":
        model.set_param_buffer(np.ascontiguousarray(weights, np.float32))
    else:
        model.param_buffer[...] = weights


def generate(model, objective, labels, weights=None, cfg_scale=4.0, sampler=None,
             num_steps=None, seed=0, clip_denoised=False, progress=True, batch_size=None):
    """Sample one image per label with ``model`` (eval mode for the duration).

    weights: a flat float32 buffer (e.g. the EMA) loaded into model.param_buffer for the
    call and restored after. labels: (N,) ints in [0, num_classes). cfg_scale 1 turns
    guidance off. batch_size: samples per model call (all at once by default).
    Returns (N, C, H, W) float32."""
    labels = np.asarray(labels, np.int64)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels: expected a non-empty 1-d array, got shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= model.num_classes:
        raise ValueError(f"labels: expected values in [0, {model.num_classes}), got "
                         f"[{labels.min()}, {labels.max()}]")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale: expected >= 0, got {cfg_scale}")
    sampler = sampler or default_sampler(objective.name)
    if sampler not in objective.samplers:
        raise ValueError(f"sampler: a {objective.name} model samples with "
                         f"{objective.samplers}, got {sampler!r}")
    num_steps = num_steps or default_steps(sampler)
    saved = model.param_buffer.copy() if weights is not None else None
    was_training = model.training
    rng = np.random.default_rng(seed)
    C, S = model.in_channels, model.input_size
    bs = int(batch_size or labels.size)
    try:
        if weights is not None:
            set_weights(model, weights)
        model.eval()
        outs = []
        for lo in range(0, labels.size, bs):
            y = labels[lo:lo + bs]
            fn = guided(lambda x, t, yy: model.forward(x, t, yy), y, cfg_scale, model.num_classes)
            outs.append(run_sampler(objective, fn, (y.size, C, S, S), rng, sampler=sampler,
                                    num_steps=num_steps, clip_denoised=clip_denoised,
                                    progress=progress))
        return np.concatenate(outs)
    finally:
        if saved is not None:
            set_weights(model, saved)
        model.train(was_training)


def _parse_labels(class_labels, num_classes, per_class):
    if class_labels is None:
        n = min(num_classes, 10)
        return np.repeat(np.arange(n), per_class)
    if isinstance(class_labels, str):
        class_labels = [int(s) for s in class_labels.replace(",", " ").split()]
    return np.asarray(class_labels, np.int64)


def sample(ckpt, class_labels=None, per_class=8, cfg_scale=4.0, num_sampling_steps=None,
           sampler=None, seed=0, use_ema=True, out=None, npz=False, grid_columns=None,
           progress=True, stream=None, batch_size=None, device="cpu", precision="fp32"):
    """Sample from a training checkpoint and write the results.

    class_labels: labels to draw (list or "1,2,3"); default ``per_class`` of each of the
    first 10 classes. sampler: ddpm/ddim (ddpm models) or euler/heun (flow models),
    default from the checkpoint's config, then ddpm / euler; num_sampling_steps likewise.
    out: the PNG path (default ``<run>/samples/sample-<sampler>-cfg<s>-seed<seed>.png``);
    npz: also write the samples as an .npz (uint8 HWC ``arr_0`` as DiT's sample_ddp, plus
    ``labels``). Latent models write ``.npy`` latents instead and print :data:`VAE_HINT`.
    device: "cpu" or "cuda" (a checkpoint from either device samples on either);
    precision: "fp32", or on cuda "tf32" / "bf16". ValueError for device "cuda" when CUDA
    is not available. Returns a :class:`SampleResult`."""
    from .train import check_device, model_from_checkpoint

    stream = stream or sys.stdout
    check_device(device, precision)
    model, meta = model_from_checkpoint(ckpt, use_ema=use_ema, device=device,
                                        precision=precision)
    tf32_was = None
    if device == "cuda":
        from .cuda import tf32

        tf32_was = tf32(precision in ("tf32", "bf16"))
    try:
        return _sample(model, meta, ckpt, class_labels, per_class, cfg_scale,
                       num_sampling_steps, sampler, seed, out, npz, grid_columns, progress,
                       stream, batch_size)
    finally:
        if tf32_was is not None:
            tf32(tf32_was)


def _sample(model, meta, ckpt, class_labels, per_class, cfg_scale, num_sampling_steps,
            sampler, seed, out, npz, grid_columns, progress, stream, batch_size):
    cfg = meta["config"]
    obj = make_objective(cfg["objective"], learn_sigma=cfg.get("learn_sigma", False))
    sampler = sampler or cfg.get("sampler") or default_sampler(obj.name)
    if num_sampling_steps is None and sampler == cfg.get("sampler"):
        num_sampling_steps = cfg.get("num_sampling_steps")
    num_sampling_steps = num_sampling_steps or default_steps(sampler)
    labels = _parse_labels(class_labels, model.num_classes, per_class)
    latent = meta["data"]["kind"] == "latents"
    x = generate(model, obj, labels, cfg_scale=cfg_scale, sampler=sampler,
                 num_steps=num_sampling_steps, seed=seed, clip_denoised=not latent,
                 progress=progress, batch_size=batch_size)
    if out is None:
        run = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
        out = os.path.join(run, "samples", f"sample-{sampler}{num_sampling_steps}-"
                                           f"cfg{cfg_scale:g}-seed{seed}.png")
    res = SampleResult(x, labels)
    if latent:
        res.npy = os.path.splitext(out)[0] + ".npy"
        os.makedirs(os.path.dirname(os.path.abspath(res.npy)), exist_ok=True)
        np.save(res.npy, x)
        print(f"racedit: wrote {x.shape[0]} latents {x.shape[1:]} to {res.npy}", file=stream)
        print(VAE_HINT.format(path=res.npy), file=stream)
        return res
    ncol = grid_columns or (per_class if class_labels is None else min(8, labels.size))
    res.png = save_grid(x, out, ncol=ncol)
    print(f"racedit: wrote {res.png}", file=stream)
    if npz:
        res.npz = os.path.splitext(out)[0] + ".npz"
        np.savez(res.npz, arr_0=to_uint8(x), labels=labels)
        print(f"racedit: wrote {res.npz}", file=stream)
    return res
