"""The configuration table, name parsing and parameter counts (paper Table 4 convention);
how a TrainConfig's PLR weight reaches the model."""
import os

import numpy as np
import pytest

from racedit import RaceDiT
from racedit.configs import CONFIGS, SIZES, ModelConfig, TrainConfig, count_params, get_config


def test_table_has_the_dit_and_paper_names():
    for size in ("S", "B", "L", "XL"):
        for p in (2, 4, 8):
            assert f"DiT-{size}/{p}" in CONFIGS
    for name in ("RaceDiT-S/2-2in8", "RaceDiT-B/2-4in32", "RaceDiT-XL/2-4in32", "RaceDiT-T/2-2in4", "DiT-T/2"):
        assert name in CONFIGS
    c = get_config("DiT-XL/2")
    assert (c.depth, c.hidden, c.heads, c.patch, c.num_experts) == (28, 1152, 16, 2, 0)
    c = get_config("RaceDiT-XL/2-4in32")
    assert (c.depth, c.hidden, c.heads, c.num_experts, c.k, c.expert_hidden) == (28, 1152, 16, 32, 4, 1152)
    assert get_config("RaceDiT-S/2-2in8").expert_hidden == 4 * 384 // 2


def test_sizes():
    assert SIZES == {"T": (2, 32, 2), "S": (12, 384, 6), "B": (12, 768, 12), "M": (16, 960, 16),
                     "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def test_parse_any_k_in_e():
    c = get_config("RaceDiT-M/4-8in64")
    assert (c.depth, c.hidden, c.patch, c.k, c.num_experts, c.expert_hidden) == (16, 960, 4, 8, 64, 480)
    assert get_config("DiT-M/2").hidden == 960
    assert get_config(c) is c


@pytest.mark.parametrize("name", ["DiT-Q/2", "RaceDiT-S/2", "RaceDiT-S/2-9in8", "RaceDiT-S/2-0in8",
                                  "RaceDiT-T/2-3in4", "dit-s/2", "RaceDiT-S/0-2in8", ""])
def test_bad_names(name):
    with pytest.raises(ValueError):
        get_config(name)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="DiT-S/2"):
        get_config("nope")
    with pytest.raises(TypeError):
        get_config(3)


def test_print_table_and_paper_counts():
    rows = []
    for size in ("S", "B", "M", "L", "XL"):
        for name in (f"DiT-{size}/2", f"RaceDiT-{size}/2-4in32"):
            c = count_params(name, input_size=32, in_channels=4, num_classes=1000)
            rows.append((name, c))
    print()
    print(f"{'model':22s} {'blocks (B)':>11s} {'blk act (B)':>11s} {'total':>14s} {'activated':>14s}")
    for name, c in rows:
        print(f"{name:22s} {c['blocks'] / 1e9:11.3f} {c['blocks_activated'] / 1e9:11.3f} "
              f"{c['total']:14,d} {c['activated']:14,d}")
    # the paper's dense counts (Table 4), 3 significant digits
    for size, want in [("B", 0.127), ("M", 0.265), ("L", 0.453), ("XL", 0.669)]:
        assert round(count_params(f"DiT-{size}/2")["blocks"] / 1e9, 3) == want
    # MoE: per layer 4D^2 + 6D^2 + E*2*D*He + D^2; activated with k experts
    for size in ("B", "M", "L", "XL"):
        depth, D, _ = SIZES[size]
        E, k, He = 32, 4, D
        c = count_params(f"RaceDiT-{size}/2-4in32")
        assert c["blocks"] == depth * (11 * D * D + E * 2 * D * He)
        assert c["blocks_activated"] == depth * (11 * D * D + k * 2 * D * He)
    b = count_params("RaceDiT-B/2-4in32")
    assert round(b["blocks"] / 1e9, 3) == 0.531 and round(b["blocks_activated"] / 1e9, 3) == 0.134


@pytest.mark.parametrize("name,learn_sigma", [("DiT-T/2", False), ("DiT-T/4", True), ("DiT-S/2", True)])
def test_exact_count_equals_model_buffer_dense(name, learn_sigma):
    m = RaceDiT(name, input_size=16, in_channels=3, num_classes=7, learn_sigma=learn_sigma)
    c = count_params(name, 16, 3, 7, learn_sigma)
    assert m.num_params() == c["total"] == c["activated"] == m.num_activated_params()


def test_exact_count_moe_formula():
    D, E, k, He, p, C, depth = 32, 4, 2, 64, 2, 4, 2
    c = count_params("RaceDiT-T/2-2in4", input_size=8, in_channels=C, num_classes=10)
    dense = count_params("DiT-T/2", input_size=8, in_channels=C, num_classes=10)
    mlp = 4 * D * D + 4 * D + 4 * D * D + D
    moe = (D * D + D) + (D * E + E) + E * (2 * D * He + He + D) + (D * p * p * C + p * p * C)
    assert c["total"] == dense["total"] + depth * (moe - mlp)
    assert c["total"] - c["activated"] == depth * ((E - k) * (2 * D * He + He + D) + D * p * p * C + p * p * C)


def test_model_config_is_frozen():
    c = get_config("DiT-S/2")
    assert isinstance(c, ModelConfig) and not c.is_moe and get_config("RaceDiT-S/2-2in8").is_moe
    with pytest.raises(Exception):
        c.depth = 3


@pytest.mark.parametrize("mode, depth_factor", [("mean", 1), ("sum", 2)])
def test_plr_over_layers(mode, depth_factor):
    # RaceDiT-T has 2 MoE layers; the model averages its layers' PLR losses, so "sum" builds
    # it with plr_weight * depth and the weighted total is the sum of the layers' losses
    from racedit.factory import build_model

    cfg = TrainConfig(model="RaceDiT-T/4-2in4", plr_weight=0.3, plr_over_layers=mode,
                      sim_weight=0.0)
    assert cfg.model_plr_weight() == pytest.approx(0.3 * depth_factor)
    m = build_model(cfg, in_channels=3, input_size=16, num_classes=10)
    assert m.plr_weight == pytest.approx(0.3 * depth_factor)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    m.train()
    m.forward(x, np.array([10.0, 500.0], np.float32), np.array([1, 2]), plr_target=x)
    per_layer = [s["plr"] for s in m.layer_stats()]
    want = 0.3 * (np.sum(per_layer) if mode == "sum" else np.mean(per_layer))
    assert m.aux_loss() == pytest.approx(want, rel=1e-5)


def test_plr_over_layers_rejects_unknown(tmp_path):
    from racedit.train import train

    with pytest.raises(ValueError, match="plr_over_layers"):
        TrainConfig(model="RaceDiT-T/4-2in4", plr_over_layers="max").model_plr_weight()
    with pytest.raises(ValueError, match=r"plr_over_layers \(--plr-over-layers\)"):
        train("RaceDiT-T/4-2in4", plr_over_layers="max", steps=1, results_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []
