"""Randomly initialised stand-ins for the networks of the sample metrics, saved the way the
real ones are distributed: torch-fidelity's Inception-v3 architecture as a state_dict file
(what ``--inception`` loads) and a tiny diffusers AutoencoderKL as a ``save_pretrained``
folder (what ``--vae`` loads). Each is built once per test session, in a folder that is
removed when the session ends."""
import atexit
import functools
import os
import shutil
import tempfile
from unittest import mock

import numpy as np

_ROOT = tempfile.mkdtemp(prefix="racedit-eval-nets-")
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def random_inception():
    """Path of a state_dict of torch-fidelity's FeatureExtractorInceptionV3 with random
    weights (Kaiming-normal convolutions, so the features neither vanish nor explode)."""
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    # the constructor loads weights; let it load none, then initialise them here
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict",
                              lambda self, *a, **k: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = os.path.join(_ROOT, "random-inception.pth")
    torch.save(net.state_dict(), path)
    return path


@functools.lru_cache(maxsize=None)
def tiny_vae():
    """Folder of a randomly initialised AutoencoderKL: 3 -> 4 latent channels, downsampling
    by 2 (16 x 16 images <-> 8 x 8 latents), scaling factor 0.18215."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                        sample_size=16, scaling_factor=0.18215)
    path = os.path.join(_ROOT, "tiny-vae")
    vae.save_pretrained(path)
    return path


def write_folder(root, images, labels):
    """Write uint8 (N, H, W, 3) images as PNGs in ImageNet layout root/c<label>/<i>.png."""
    from PIL import Image

    for i, (im, y) in enumerate(zip(images, labels)):
        d = os.path.join(root, f"c{int(y)}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(im)).save(os.path.join(d, f"{i:04d}.png"))
    return str(root)
