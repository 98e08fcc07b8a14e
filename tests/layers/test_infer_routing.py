"""Inference routing per strategy (docs/method.md §3): token, expert and LE choice keep
their exact per-group top-K at eval; BL learns one threshold per expert, BE one per token
position, race one scalar, each the EMA of its group's K-th largest gate. Checked against
the float64 twins (racedit.ref.route_kth / threshold_update / moe_select), for exact
experts per token, for batch independence at eval, on the CPU against the checking
backend, and through checkpoints (per-strategy shapes; the older one scalar per layer)."""
import os

import numpy as np
import pytest

import racedit
from racedit import RaceDiT, ref
from racedit.checkpoint import load_checkpoint, save_checkpoint, set_thresholds
from racedit.factory import build_model

from _numerics import on

STRATEGIES = ["token", "expert", "bl", "be", "le", "race"]
EXACT = ("token", "expert", "le")   # batch-independent groups: exact top-K at eval
CKPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                    "ckpt-0.1.0-step3.safetensors")
S, C, NCLS = 8, 3, 5                # 8x8 images, patch 2: L = 16 tokens


def layer(strategy, device="cpu", beta=0.5, E=4, k=2):
    return racedit.MoE(12, E, k, strategy=strategy, seed=3, beta=beta, hidden=6, device=device)


def xs(B, L, n, D=12, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((B, L, D)).astype(np.float32) for _ in range(n)]


def model(strategy, device="cpu", **kw):
    return RaceDiT("RaceDiT-T/2-2in4", input_size=S, in_channels=C, num_classes=NCLS,
                   routing=strategy, device=device, class_dropout_prob=0.0, **kw)


def batch(B, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, C, S, S)).astype(np.float32)
    t = rng.integers(0, 1000, B).astype(np.float32)
    return x, t, rng.integers(0, NCLS, B)


def warm(m, n=3):
    """n training forwards: the thresholds learned from n batches."""
    m.train()
    for i in range(n):
        m.forward(*batch(6, seed=10 + i))


# ---- the layer against the float64 twins -------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_threshold_update_matches_twin(strategy):
    """Each training forward: tau <- beta tau + (1 - beta) kth per group (kth the group's
    K-th largest gate), tau = kth on the first; token / expert / LE hold none."""
    B, L, k, beta = 3, 4, 2, 0.5
    m, tau = layer(strategy, beta=beta), None
    for x in xs(B, L, 3):
        m.forward(x)
        mask, kth = ref.route_kth(m.gates, k, strategy)
        assert np.array_equal(m.mask, mask)
        tau = ref.threshold_update(tau, kth, beta)
    if strategy in EXACT:
        assert m.threshold is None
        return
    assert tau.shape == ({"bl": 4, "be": L}.get(strategy, 1),)
    np.testing.assert_allclose(m.threshold, tau if strategy != "race" else tau[0], rtol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_eval_routing_matches_twin(strategy):
    """Eval: exact top-K for token / expert / LE, G >= tau_e / tau_l / tau for BL / BE /
    race, and the output is the twin's for that selection."""
    B, L, k = 3, 4, 2
    m = layer(strategy)
    for x in xs(B, L, 2):
        m.forward(x)
    tau = m.threshold
    m.eval()
    x = xs(B, L, 1, seed=7)[0]
    y = m.forward(x)
    G = m.gates
    want = ref.moe_select(k, strategy, tau=tau)(G)
    assert np.array_equal(m.mask, want)
    if strategy not in EXACT:
        per = {"bl": lambda t: t[None, None, :], "be": lambda t: t[None, :, None]}
        assert np.array_equal(want, G >= per.get(strategy, lambda t: t)(np.float32(tau)))
    yr, _ = ref.moe_forward(x, m.params, lambda g: want, m.gating)
    np.testing.assert_allclose(y, yr, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(m.threshold, tau)          # eval updates nothing


def test_twin_thresholds_route_per_group():
    """ref.route_thresholds: BL compares against its expert's, BE its position's value."""
    G = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    bl = ref.route_thresholds(G, [0, 100, 5, 22], "bl")
    assert np.array_equal(bl, G >= np.array([0, 100, 5, 22])[None, None, :])
    be = ref.route_thresholds(G, [3, 100, 17], "be")
    assert np.array_equal(be, G >= np.array([3, 100, 17])[None, :, None])
    assert np.array_equal(ref.route_thresholds(G, [10], "race"), G >= 10)
    with pytest.raises(ValueError, match="tau"):
        ref.route_thresholds(G, [1, 2], "bl")
    mask, kth = ref.route_kth(G, 2, "bl")      # per expert: K = B*L*k/E = 3 of its 6 tokens
    np.testing.assert_array_equal(kth, G.reshape(6, 4)[-3])
    assert ref.threshold_update(None, kth, 0.9).tolist() == kth.tolist()


@pytest.mark.parametrize("device", on())
def test_be_thresholds_of_another_length_are_refused(device):
    """BE learns one threshold per position: another L is an error, not a guess, at eval
    and in training (whose update would mix the positions), on every device."""
    m = layer("be", device=device)
    m.forward(xs(2, 4, 1)[0])
    assert m.threshold.shape == (4,)
    with pytest.raises(RuntimeError, match="holds 4 thresholds, strategy be with L=5, E=4 needs 5"):
        m.forward(xs(2, 5, 1)[0])
    m.eval()
    with pytest.raises(RuntimeError, match="holds 4 thresholds, strategy be with L=5, E=4 needs 5"):
        m.forward(xs(2, 5, 1)[0])
    m.forward(xs(2, 4, 1)[0])                   # the layer still works at its own length
    with pytest.raises(ValueError, match=r"needs shape \(E,\) = \(4,\)"):
        layer("bl").threshold = [0.1, 0.2]
    with pytest.raises(ValueError, match="no threshold"):
        layer("expert").threshold = 0.3
    with pytest.raises(ValueError, match="nan"):
        m.threshold = [0.1, np.nan, 0.2, 0.3]


# ---- the model: exact k, batch independence, CPU vs check -------------------------------

@pytest.mark.parametrize("strategy", EXACT)
def test_eval_experts_per_token_is_k(strategy):
    """Token, expert and LE choice: every image gets exactly k experts per token on
    average at eval, alone or in a batch, whatever its timestep."""
    m = model(strategy)
    warm(m)
    m.eval()
    for B in (1, 2, 5):
        m.forward(*batch(B, seed=40 + B))
        np.testing.assert_array_equal(m.experts_per_token_by_sample(), np.full(B, m.config.k))
    if strategy == "token":
        for mask in m.routing_masks():
            assert (mask.sum(-1) == m.config.k).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_eval_routing_is_batch_independent(strategy):
    """One image routed alone is routed as in a batch of images at other timesteps."""
    m = model(strategy)
    warm(m)
    m.eval()
    x, t, y = batch(4, seed=50)
    out = m.forward(x, t, y)
    masks = m.routing_masks()
    for b in range(4):
        alone = m.forward(x[b:b + 1], t[b:b + 1], y[b:b + 1])
        for mb, ma in zip(masks, m.routing_masks()):
            assert np.array_equal(mb[b:b + 1], ma), f"image {b} routed differently alone"
        np.testing.assert_allclose(alone[0], out[b], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cpu_and_check_backend_agree(strategy):
    a, b = model(strategy), model(strategy, device="check")
    warm(a)
    warm(b)
    np.testing.assert_array_equal(a.thresholds, b.thresholds)
    a.eval()
    b.eval()
    x, t, y = batch(3, seed=60)
    np.testing.assert_array_equal(a.forward(x, t, y), b.forward(x, t, y))
    for ma, mb in zip(a.routing_masks(), b.routing_masks()):
        assert np.array_equal(ma, mb)
    np.testing.assert_array_equal(a.infer(x, t, y), b.infer(x, t, y))


# ---- thresholds in the model and in checkpoints -------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_threshold_shape_per_strategy(strategy):
    m = model(strategy)
    n, E, L = m.num_moe_layers, m.config.num_experts, (S // 2) ** 2
    want = {"race": (n,), "bl": (n, E), "be": (n, L)}.get(strategy, (n, 0))
    assert m.threshold_shape == want and m.thresholds.shape == want
    assert np.isnan(m.thresholds).all()
    warm(m, 1)
    assert m.thresholds.shape == want and np.isfinite(m.thresholds).all()
    stats = m.layer_stats()
    for s, row in zip(stats, m.thresholds.reshape(n, -1)):
        assert np.isnan(s["tau"]) if row.size == 0 else s["tau"] == pytest.approx(row.mean())


@pytest.mark.parametrize("strategy", ["bl", "be", "race"])
def test_thresholds_round_trip_through_a_checkpoint(strategy, tmp_path):
    m = model(strategy)
    warm(m)
    path = str(tmp_path / "c.safetensors")
    save_checkpoint(path, {"thresholds": m.thresholds}, {"step": 0})
    tensors, _ = load_checkpoint(path, training=False)
    b = model(strategy)
    set_thresholds(b, tensors, path)
    np.testing.assert_array_equal(b.thresholds, m.thresholds)
    m.eval()
    b.eval()
    x, t, y = batch(2, seed=70)
    np.testing.assert_array_equal(m.forward(x, t, y), b.forward(x, t, y))


def test_thresholds_setter_checks():
    m = model("bl")
    n, E = m.num_moe_layers, m.config.num_experts
    with pytest.raises(ValueError, match=rf"expected shape \({n}, {E}\) or \({n},\)"):
        m.thresholds = np.zeros((n, E + 1))
    partial = np.zeros((n, E), np.float32)
    partial[0, 1] = np.nan
    with pytest.raises(ValueError, match="layer 0 holds NaN in some entries only"):
        m.thresholds = partial
    warm(m, 1)
    th = m.thresholds
    th[1] = np.nan                                   # a NaN row forgets that layer's
    m.thresholds = th
    assert np.isnan(m.thresholds[1]).all() and np.isfinite(m.thresholds[0]).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_old_scalar_checkpoint_loads_into_every_strategy(strategy):
    """The checkpoints before per-strategy thresholds hold one scalar per layer (the file
    is a race model's): race takes it, BL / BE broadcast it over E / L, token / expert /
    LE have nothing to set; the model then samples."""
    tensors, meta = load_checkpoint(CKPT)
    old = tensors["thresholds"]
    cfg = racedit.TrainConfig.from_dict(meta["config"])
    d = meta["data"]
    m = build_model(cfg, d["channels"], d["image_size"], d["num_classes"])
    m = RaceDiT(m.config, input_size=m.input_size, in_channels=m.in_channels,
                num_classes=m.num_classes, learn_sigma=m.learn_sigma, routing=strategy)
    set_thresholds(m, tensors, CKPT)
    th = m.thresholds
    if strategy == "race":
        np.testing.assert_array_equal(th, old)
    elif strategy in ("bl", "be"):
        assert th.shape[1] == (m.config.num_experts if strategy == "bl" else
                               (m.input_size // m.config.patch) ** 2)
        np.testing.assert_array_equal(th, np.repeat(old[:, None], th.shape[1], axis=1))
    else:
        assert th.shape == (len(old), 0)
    x = np.zeros((2, m.in_channels, m.input_size, m.input_size), np.float32)
    assert np.isfinite(m.infer(x, [10, 900], [0, 1])).all()


# ---- CUDA: the same thresholds and eval routing as the CPU (skipped without a GPU) --------

HAVE_GPU = racedit.cuda_available()
gpu = pytest.mark.skipif(not HAVE_GPU, reason="CUDA not available: no CUDA device or racedit "
                         "built without CUDA")


@gpu
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda_thresholds_and_eval_routing_match_cpu(strategy):
    """Per-strategy thresholds learned on the device equal the CPU's to fp32 summation
    noise; in eval the device routes as the CPU given the same thresholds (pairs may flip
    only where a gate sits within noise of its threshold or K-th value), also in infer, and
    one image alone as in the batch."""
    a, g = model(strategy), model(strategy, device="cuda")
    warm(a)
    warm(g)
    ta, tg = a.thresholds, g.thresholds
    assert tg.shape == ta.shape == a.threshold_shape
    np.testing.assert_allclose(tg, ta, rtol=1e-3, atol=1e-4)
    g.thresholds = ta
    np.testing.assert_array_equal(g.thresholds, ta)
    a.eval()
    g.eval()
    x, t, y = batch(3, seed=80)
    out_a, out_g = a.forward(x, t, y), g.forward(x, t, y)
    flips = sum(int((ma != mg).sum()) for ma, mg in zip(a.routing_masks(), g.routing_masks()))
    total = sum(m.size for m in a.routing_masks())
    assert flips <= max(2, total // 500), f"{flips} of {total} pairs routed differently"
    if flips == 0:
        np.testing.assert_allclose(out_g, out_a, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(g.infer(x, t, y), out_g)
    if strategy in EXACT:
        np.testing.assert_array_equal(g.experts_per_token_by_sample(), np.full(3, g.config.k))
    masks = g.routing_masks()
    g.forward(x[1:2], t[1:2], y[1:2])
    for mb, ma in zip(masks, g.routing_masks()):
        assert np.array_equal(mb[1:2], ma), "image 1 routed differently alone on the GPU"
