"""The presets of the paper's ImageNet 256x256 models (racedit.train.PRESETS "imagenet256-*"):
the models of its Table 4 on 32x32x4 SD-VAE latents with the paper's optimiser settings,
checked without building them (XL-4in32 has 2.8 B parameters)."""
import pytest

from racedit.cli import main
from racedit.configs import count_params
from racedit.train import PRESETS, TrainConfig

PAPER_DENSE_BLOCKS = {"b": 0.127e9, "m": 0.265e9, "l": 0.453e9, "xl": 0.669e9}


@pytest.mark.parametrize("size", ["b", "m", "l", "xl"])
def test_imagenet_presets_are_the_papers_models(size):
    moe = TrainConfig(**PRESETS[f"imagenet256-racedit-{size}"])
    dense = TrainConfig(**PRESETS[f"imagenet256-dit-{size}"])
    assert moe.model == f"RaceDiT-{size.upper()}/2-4in32" and dense.model == f"DiT-{size.upper()}/2"
    for c in (moe, dense):  # what the paper states
        assert (c.data, c.num_classes, c.lr, c.weight_decay, c.ema_decay, c.beta1, c.beta2,
                c.class_dropout_prob) == ("latents", 1000, 1e-4, 0.0, 0.9999, 0.9, 0.999, 0.1)
        assert c.global_batch_size == 256 and c.model_config["patch"] == 2
    assert (moe.routing, moe.gating) == ("race", "identity")
    d = count_params(dense.model, input_size=32, in_channels=4)
    m = count_params(moe.model, input_size=32, in_channels=4)
    assert d["blocks"] == pytest.approx(PAPER_DENSE_BLOCKS[size], rel=0.01)
    # 4-in-32 with He = D: the activated blocks are the dense ones plus the router's D^2
    D, depth = moe.model_config["hidden"], moe.model_config["depth"]
    assert m["blocks_activated"] == d["blocks"] + depth * D * D


def test_imagenet_preset_needs_the_latents(capsys):
    assert main(["train", "--preset", "imagenet256-racedit-b", "--no-progress"]) == 2
    assert "latents needs a path" in capsys.readouterr().err
