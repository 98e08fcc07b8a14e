"""The whole model: C (racedit.RaceDiT) against the float64 reference (racedit.ref.dit)
for the output and every parameter gradient, the reference against finite differences,
the buffer/views contract, initialisation, modes and bad inputs."""
import numpy as np
import pytest
from _numerics import STRATEGIES

import racedit
from racedit import RaceDiT
from racedit import ref

S, C, NCLS = 8, 4, 5          # 8x8x4 input, p=2 -> L=16 tokens


def randomise(m, seed=0, scale=0.2):
    """Random values everywhere (the DiT init zeroes adaLN, which would hide most paths)."""
    rng = np.random.default_rng(seed)
    m.param_buffer[:] = rng.normal(0.0, scale, m.param_buffer.size)


def batch(B, seed=1, channels=C, size=S):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, channels, size, size)).astype(np.float32)
    t = rng.uniform(0, 1000, B).astype(np.float32)
    t[0] = 0.0
    y = rng.integers(0, NCLS + 1, B)
    y[-1] = NCLS                                      # the null label
    return x, t, y


MOE_KEYS = ("router_w", "router_b", "gate_w", "gate_b", "w1", "b1", "w2", "b2", "plr_w", "plr_b")


class RefMoE:
    """The MoE blocks of the float64 reference model: racedit.ref.moe_forward/backward and,
    in training, racedit.ref.moe_aux_forward/backward with each loss weight divided by the
    depth (the model's aux losses are means over layers). The selection is the C model's
    (float32 and float64 gates may order near-ties differently); `check_selection` then
    verifies it against the twin's own rule (racedit.ref.moe_select)."""

    def __init__(self, model):
        self.m = model
        self.masks = model.routing_masks()
        self.caches = {}
        self.aux = {}

    def forward(self, i, x, plr):
        m = self.m
        p = {k: np.asarray(m.params[f"blocks.{i}.moe.{k}"], np.float64) for k in MOE_KEYS}
        y, cache = ref.moe_forward(x, p, lambda G: self.masks[i], m.gating)
        aux = None
        if m.training:
            n = m.config.depth
            aux = ref.moe_aux_forward(cache, p, plr, sim_weight=m.sim_weight / n,
                                      balance_weight=m.balance_weight / n, plr_weight=m.plr_weight / n)
        self.caches[i] = (cache, p, aux)
        return y

    def backward(self, i, dy):
        cache, p, aux = self.caches[i]
        dx, g = ref.moe_backward(dy, cache, p)
        g["plr_w"], g["plr_b"] = np.zeros_like(p["plr_w"]), np.zeros_like(p["plr_b"])
        if aux is not None:
            dxa, ga = ref.moe_aux_backward(aux[2], cache, p)
            dx = dx + dxa
            for k, v in ga.items():
                g[k] = g[k] + v
        return dx, g

    def check_selection(self):
        m, c = self.m, self.m.config
        for i, (cache, _, _) in sorted(self.caches.items()):
            B, L, _ = cache["shape"]
            G = cache["G"].reshape(B, L, c.num_experts)
            tau = None if m.training or np.isnan(m.thresholds[i]) else m.thresholds[i]
            want = ref.moe_select(c.k, m.routing, tau, m.eval_topk)(G)
            np.testing.assert_array_equal(self.masks[i], want, err_msg=f"layer {i}")

    def check_aux(self):
        """C's aux() and aux_loss() against the twin's values."""
        if not self.m.training:
            assert all(np.isnan(v) for v in self.m.aux().values())
            assert self.m.aux_loss() == 0.0
            return
        vals = [self.caches[i][2][1] for i in sorted(self.caches)]
        got = self.m.aux()
        for key, name in (("plr", "plr_loss"), ("sim", "sim_loss"), ("balance", "balance_loss")):
            v = [d[name] for d in vals]
            if v[0] is None:
                assert np.isnan(got[key]), key
            else:
                assert got[key] == pytest.approx(np.mean(v), rel=1e-4, abs=1e-6), key
        total = sum(self.caches[i][2][0] for i in self.caches)
        assert self.m.aux_loss() == pytest.approx(total, rel=1e-4, abs=1e-7)


def compare_with_ref(m, B=3, seed=0, rtol=2e-4, plr=False):
    randomise(m, seed)
    x, t, y = batch(B, seed + 1)
    target = np.random.default_rng(seed + 3).normal(size=x.shape).astype(np.float32) if plr else None
    out = m.forward(x, t, y, plr_target=target)
    moe = RefMoE(m) if m.config.is_moe else None
    rout, cache = ref.dit_model_forward(m.params, x, t, y, heads=m.config.heads, patch=m.config.patch,
                                        moe=moe, plr_target=target)
    if moe:
        moe.check_selection()
        moe.check_aux()
    scale = np.abs(rout).max()
    np.testing.assert_allclose(out, rout, rtol=0, atol=rtol * scale)
    bn = m.branch_norms()
    np.testing.assert_allclose(np.stack([bn["attn"], bn["ffn"]], 1), ref.dit_branch_norms(cache),
                               rtol=rtol)
    dout = np.random.default_rng(seed + 2).normal(size=out.shape).astype(np.float32)
    m.zero_grad()
    m.backward(dout)
    G = ref.dit_model_backward(dout, cache)
    assert set(G) == set(m.grads)
    for name, g in m.grads.items():
        gs = np.abs(G[name]).max()
        np.testing.assert_allclose(g, G[name], rtol=0, atol=rtol * max(gs, 1e-3), err_msg=name)
        assert gs > 0 or (".moe.plr_" in name and not (plr and m.training)), name  # every parameter is reached
    return m


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_dense_matches_reference(learn_sigma):
    m = RaceDiT("DiT-T/2", input_size=S, in_channels=C, num_classes=NCLS, learn_sigma=learn_sigma,
                class_dropout_prob=0.0)
    compare_with_ref(m)




@pytest.mark.parametrize("routing", STRATEGIES)
def test_moe_matches_reference_every_strategy(routing):
    m = RaceDiT("RaceDiT-T/2-2in4", input_size=S, in_channels=C, num_classes=NCLS, routing=routing,
                class_dropout_prob=0.0)
    compare_with_ref(m, B=4)
    epts = m.experts_per_token_by_sample()
    assert epts.shape == (4,) and np.isclose(epts.mean(), 2.0)   # k on average, every strategy
    if routing == "token":
        np.testing.assert_allclose(epts, 2.0)


@pytest.mark.parametrize("gating", ["sigmoid", "softmax"])
def test_moe_matches_reference_gatings(gating):
    m = RaceDiT("RaceDiT-T/2-2in4", input_size=S, in_channels=C, num_classes=NCLS, gating=gating,
                class_dropout_prob=0.0)
    compare_with_ref(m, B=2, seed=3)


@pytest.mark.parametrize("routing", ["race", "token"])
def test_moe_aux_losses_match_reference(routing):
    # PLR target given, similarity and balance on, weights large enough to matter
    m = RaceDiT("RaceDiT-T/2-2in4", input_size=S, in_channels=C, num_classes=NCLS, routing=routing,
                plr_weight=2.0, sim_weight=0.5, balance_weight=0.3, class_dropout_prob=0.0)
    compare_with_ref(m, B=2, seed=11, plr=True)
    aux = m.aux()
    assert all(np.isfinite(v) and v > 0 for v in aux.values())
    assert m.aux_loss() == pytest.approx(2.0 * aux["plr"] + 0.5 * aux["sim"] + 0.3 * aux["balance"], rel=1e-5)
    for st in m.layer_stats():
        assert np.isfinite(st["plr"]) and 0 < st["combination_usage"] <= 1


def test_moe_aux_off():
    m = RaceDiT("RaceDiT-T/2-2in4", input_size=S, num_classes=NCLS, plr_weight=0.0, sim_weight=0.0,
                class_dropout_prob=0.0)
    randomise(m, 12)
    x, t, y = batch(2)
    m.forward(x, t, y, plr_target=x)                 # plr_weight 0: the target is not used
    assert all(np.isnan(v) for v in m.aux().values()) and m.aux_loss() == 0.0
    d = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS)
    d.forward(x, t, y)
    assert all(np.isnan(v) for v in d.aux().values()) and d.aux_loss() == 0.0
    assert d.layer_stats() == [] and d.routing_masks() == [] and d.thresholds.shape == (0,)
    np.testing.assert_array_equal(d.experts_per_token_by_sample(), np.zeros(2))


def test_moe_learn_sigma_and_k1():
    m = RaceDiT("RaceDiT-T/2-1in4", input_size=S, in_channels=C, num_classes=NCLS, learn_sigma=True,
                class_dropout_prob=0.0)
    compare_with_ref(m, B=2, seed=4)


def test_moe_eval_mode_uses_thresholds():
    m = RaceDiT("RaceDiT-T/2-2in4", input_size=S, in_channels=C, num_classes=NCLS, class_dropout_prob=0.0)
    assert np.isnan(m.thresholds).all() and m.thresholds.shape == (2,)
    x, t, y = batch(3)
    m.eval()
    compare_with_ref(m, B=3, seed=6)                  # no tau yet: batch top-K (the twin's too)
    assert np.isnan(m.thresholds).all()               # ... and nothing set by it
    assert all(np.isclose(mk.sum() / mk.shape[1], 3 * 2) for mk in m.routing_masks())
    m.train()
    randomise(m, 7)
    m.forward(x, t, y)
    taus = m.thresholds
    assert np.isfinite(taus).all()
    stats = m.layer_stats()
    assert [s["tau"] for s in stats] == pytest.approx(taus.tolist())
    m.eval()
    compare_with_ref(m, B=3, seed=7)                  # eval: G >= tau, checked against the twin
    m.thresholds = taus + 100.0                       # nothing passes: the MoE branch is zero
    m.forward(x, t, y)
    assert not any(mk.any() for mk in m.routing_masks())
    np.testing.assert_allclose(m.experts_per_token_by_sample(), 0.0)
    m.thresholds = np.array([np.nan, taus[1]])
    assert np.isnan(m.thresholds[0]) and m.thresholds[1] == taus[1]
    with pytest.raises(ValueError, match=r"thresholds: expected shape \(2,\)"):
        m.thresholds = np.zeros(3)


def test_moe_threshold_ema():
    m = RaceDiT("RaceDiT-T/2-2in4", input_size=S, num_classes=NCLS, beta=0.5, class_dropout_prob=0.0)
    randomise(m, 8)
    x, t, y = batch(2)
    m.forward(x, t, y)
    tau0 = m.thresholds.copy()
    np.testing.assert_allclose(tau0, [s["tau_b"] for s in m.layer_stats()])   # first batch sets tau
    m.forward(x[::-1].copy(), t, y)
    tb = np.array([s["tau_b"] for s in m.layer_stats()])
    np.testing.assert_allclose(m.thresholds, 0.5 * tau0 + 0.5 * tb, rtol=1e-6)


def test_moe_layer_stats_and_views():
    m = RaceDiT("RaceDiT-T/2-2in4", input_size=S, num_classes=NCLS, class_dropout_prob=0.0)
    assert m.layer_stats() == [] and m.routing_masks() == []
    randomise(m, 9)
    x, t, y = batch(4)
    m.forward(x, t, y)
    for st, mask in zip(m.layer_stats(), m.routing_masks()):
        assert mask.shape == (4, 16, 4) and mask.sum() == 4 * 16 * 2
        np.testing.assert_array_equal(st["load"], mask.sum(axis=(0, 1)))
        assert st["dead_experts"] == int((st["load"] == 0).sum())
        assert st["experts_per_token"] == pytest.approx(2.0)
        lo = st["load"]
        assert st["max_violation"] == pytest.approx((lo.max() - lo.mean()) / lo.mean())
    assert m.num_moe_layers == 2


def test_moe_init_and_counts():
    m = RaceDiT("RaceDiT-T/2-2in4", input_size=S, in_channels=C, num_classes=NCLS, seed=1)
    D = 32
    bound = np.sqrt(6 / (D + 4 * D))                  # the dense MLP's fans
    for k in ("w1", "w2"):
        w = m.params[f"blocks.0.moe.{k}"]
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    for k in ("router_b", "gate_b", "b1", "b2", "plr_b"):
        assert not m.params[f"blocks.1.moe.{k}"].any()
    assert m.params["blocks.0.moe.plr_w"].shape == (D, 2 * 2 * C)
    c = racedit.configs.count_params("RaceDiT-T/2-2in4", S, C, NCLS)
    assert m.num_params() == c["total"] and m.num_activated_params() == c["activated"]
    x, t, y = batch(2)
    assert not m.forward(x, t, y).any()               # adaLN-Zero: starts at zero like the dense DiT
    with pytest.raises(ValueError, match="MoE model"):
        m.load_dit_state_dict(m.state_dict())


def test_dense_odd_shapes_match_reference():
    # 3 channels, patch 3 on a 9x9 image (L=9), batch 1
    cfg = racedit.configs.ModelConfig("odd", depth=1, hidden=12, heads=3, patch=3)
    m = RaceDiT(cfg, input_size=9, in_channels=3, num_classes=2, class_dropout_prob=0.0)
    randomise(m, 5)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(1, 3, 9, 9)).astype(np.float32)
    out = m.forward(x, np.array([17.0]), np.array([1]))
    rout, cache = ref.dit_model_forward(m.params, x, [17.0], [1], heads=3, patch=3)
    np.testing.assert_allclose(out, rout, atol=2e-4 * np.abs(rout).max())
    d = rng.normal(size=out.shape).astype(np.float32)
    m.backward(d)
    for k, g in ref.dit_model_backward(d, cache).items():
        np.testing.assert_allclose(m.grads[k], g, atol=2e-4 * max(np.abs(g).max(), 1e-3), err_msg=k)


def check_fd(P, G, objective, rng, h=1e-6):
    """Central differences of objective() at two random entries of every parameter in P
    (modified in place and restored) against the analytic gradients G."""
    for name in P:
        for _ in range(2):
            i = tuple(rng.integers(0, s) for s in P[name].shape)
            old = P[name][i]
            P[name][i] = old + h
            fp = objective()
            P[name][i] = old - h
            fm = objective()
            P[name][i] = old
            fd = (fp - fm) / (2 * h)
            assert abs(fd - G[name][i]) <= 1e-6 + 1e-4 * abs(fd), (name, i, fd, G[name][i])


def test_reference_model_finite_differences():
    m = RaceDiT("DiT-T/2", input_size=4, in_channels=2, num_classes=3)
    rng = np.random.default_rng(7)
    P = {k: rng.normal(0, 0.3, v.shape) for k, v in m.params.items()}
    x = rng.normal(size=(2, 2, 4, 4))
    t, y = np.array([3.0, 700.0]), np.array([1, 3])
    f = lambda: ref.dit_model_forward(P, x, t, y, heads=2, patch=2)[0]
    out, cache = ref.dit_model_forward(P, x, t, y, heads=2, patch=2)
    d = rng.normal(size=out.shape)
    G = ref.dit_model_backward(d, cache)
    check_fd(P, G, lambda: np.sum(f() * d), rng)


class FixedSelectionMoE:
    """Reference MoE blocks (with aux losses) whose selection is frozen after the first
    forward, so the objective is smooth for finite differences."""

    def __init__(self, P, k, strategy, weights):
        self.P, self.k, self.strategy, self.w = P, k, strategy, weights
        self.masks, self.caches = {}, {}

    def forward(self, i, x, plr):
        p = {key: self.P[f"blocks.{i}.moe.{key}"] for key in MOE_KEYS}
        if i in self.masks:
            y, cache = ref.moe_forward(x, p, lambda G: self.masks[i])
        else:
            y, cache = ref.moe_forward(x, p, ref.moe_select(self.k, self.strategy))
            self.masks[i] = cache["mask"].reshape(x.shape[0], x.shape[1], -1)
        aux = ref.moe_aux_forward(cache, p, plr, **self.w)
        self.caches[i] = (cache, p, aux)
        return y

    def backward(self, i, dy):
        cache, p, aux = self.caches[i]
        dx, g = ref.moe_backward(dy, cache, p)
        dxa, ga = ref.moe_aux_backward(aux[2], cache, p)
        for key, v in ga.items():
            g[key] = g.get(key, 0.0) + v
        return dx + dxa, g

    def aux_total(self):
        return sum(c[2][0] for c in self.caches.values())


def test_reference_moe_model_finite_differences():
    m = RaceDiT("RaceDiT-T/2-2in4", input_size=4, in_channels=2, num_classes=3)
    rng = np.random.default_rng(13)
    P = {k: rng.normal(0, 0.3, v.shape) for k, v in m.params.items()}
    x, target = rng.normal(size=(2, 2, 4, 4)), rng.normal(size=(2, 2, 4, 4))
    t, y = np.array([3.0, 700.0]), np.array([1, 3])
    w = dict(sim_weight=0.3, balance_weight=0.2, plr_weight=0.5)
    moe = FixedSelectionMoE(P, 2, "race", w)
    out, cache = ref.dit_model_forward(P, x, t, y, heads=2, patch=2, moe=moe, plr_target=target)
    d = rng.normal(size=out.shape)
    G = ref.dit_model_backward(d, cache)

    def objective():
        o, _ = ref.dit_model_forward(P, x, t, y, heads=2, patch=2, moe=moe, plr_target=target)
        return np.sum(o * d) + moe.aux_total()
    check_fd(P, G, objective, rng)


# ---- buffers, views, init ---------------------------------------------------------------------

def test_views_share_the_buffers():
    m = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS)
    assert m.param_buffer.dtype == np.float32 and m.param_buffer.ndim == 1
    offsets = [off for _, off, _ in m.layout]
    assert offsets == sorted(offsets) and offsets[0] == 0
    total = 0
    for name, off, shape in m.layout:
        assert m.params[name].shape == tuple(shape) and m.params[name].dtype == np.float32
        assert np.shares_memory(m.params[name], m.param_buffer)
        assert np.shares_memory(m.grads[name], m.grad_buffer)
        assert off == total
        total += int(np.prod(shape))
    assert total == m.param_buffer.size == m.grad_buffer.size == m.num_params()
    names = [n for n, _, _ in m.layout]
    assert names[:7] == ["x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight",
                         "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
                         "y_embedder.embedding_table.weight"]
    assert m.params["blocks.1.mlp.fc1.weight"].shape == (128, 32)
    assert m.params["final_layer.linear.weight"].shape == (2 * 2 * C, 32)


def test_buffer_is_read_on_every_call():
    m = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, class_dropout_prob=0.0)
    randomise(m, 1)
    x, t, y = batch(2)
    a = m.forward(x, t, y)
    saved = m.param_buffer.copy()
    m.param_buffer[...] = 0.5 * saved                 # e.g. swapping in EMA weights
    b = m.forward(x, t, y)
    assert not np.allclose(a, b)
    m.param_buffer[...] = saved
    np.testing.assert_array_equal(m.forward(x, t, y), a)


def test_init_follows_dit():
    m = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, seed=3)
    D = 32
    for name, v in m.params.items():
        if "adaLN_modulation" in name or name.startswith("final_layer.linear") or name.endswith("bias"):
            assert not v.any(), name
    w = m.params["blocks.0.attn.qkv.weight"]
    bound = np.sqrt(6 / (D + 3 * D))
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    w = m.params["x_embedder.proj.weight"]
    assert np.abs(w).max() <= np.sqrt(6 / (C * 4 + D))
    for name in ("y_embedder.embedding_table.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight"):
        assert 0.015 < m.params[name].std() < 0.025, name
    # adaLN-Zero: the blocks and the final layer start at zero output
    x, t, y = batch(2)
    assert not m.forward(x, t, y).any()
    same = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, seed=3)
    other = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, seed=4)
    np.testing.assert_array_equal(same.param_buffer, m.param_buffer)
    assert not np.array_equal(other.param_buffer, m.param_buffer)


# ---- gradients accumulate, modes --------------------------------------------------------------

def test_backward_accumulates_and_zero_grad():
    m = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, class_dropout_prob=0.0)
    randomise(m, 2)
    x, t, y = batch(2)
    out = m.forward(x, t, y)
    d = np.ones_like(out)
    m.backward(d)
    g1 = m.grad_buffer.copy()
    assert np.abs(g1).max() > 0
    m.backward(d)
    np.testing.assert_allclose(m.grad_buffer, 2 * g1, rtol=1e-6, atol=1e-7)
    m.zero_grad()
    assert not m.grad_buffer.any()


def test_label_dropout_in_training_only():
    m = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, class_dropout_prob=1.0)
    randomise(m, 3)
    x, t, _ = batch(3)
    y = np.array([0, 1, 2])
    null = np.full(3, NCLS)
    dropped = m.forward(x, t, y)
    np.testing.assert_array_equal(dropped, m.forward(x, t, null))
    m.eval()
    assert not m.training
    kept = m.forward(x, t, y)
    assert not np.allclose(kept, dropped)
    assert m.train() is m and m.training


def test_batch_grows_without_max_batch_and_float64_is_converted():
    m = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, class_dropout_prob=0.0)
    randomise(m, 4)
    x, t, y = batch(4)
    assert m.max_batch == 0
    small = m.forward(x[:1], t[:1], y[:1])
    assert m.max_batch == 1
    big = m.forward(x.astype(np.float64), t.astype(np.float64), y.astype(np.int32))
    assert m.max_batch == 4 and big.dtype == np.float32
    np.testing.assert_allclose(big[:1], small, rtol=1e-4, atol=1e-4)
    m.forward(x[:2], t[:2], y[:2])
    assert m.max_batch == 4
    with pytest.raises(ValueError, match=r"dout: expected shape \(2, 4, 8, 8\)"):
        m.backward(np.zeros((4, C, S, S), np.float32))
    m.backward(np.zeros((2, C, S, S), np.float32))


def test_integer_timesteps():
    m = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, class_dropout_prob=0.0)
    randomise(m, 5)
    x, _, y = batch(2)
    np.testing.assert_array_equal(m.forward(x, np.array([0, 999]), y),
                                  m.forward(x, np.array([0.0, 999.0], np.float32), y))


# ---- bad inputs --------------------------------------------------------------------------------

@pytest.fixture
def model():
    return RaceDiT("DiT-T/2", input_size=S, in_channels=C, num_classes=NCLS, max_batch=4)


def test_bad_image_size_and_channels(model):
    x, t, y = batch(2)
    with pytest.raises(ValueError, match=r"x: expected shape \(\*, 4, 8, 8\), got \(2, 4, 6, 6\)"):
        model.forward(x[:, :, :6, :6].copy(), t, y)
    with pytest.raises(ValueError, match="x: expected shape"):
        model.forward(x[:, :3].copy(), t, y)
    with pytest.raises(ValueError, match="x: expected a 4-d"):
        model.forward(x[0], t, y)


def test_bad_labels(model):
    x, t, _ = batch(2)
    with pytest.raises(ValueError, match=r"y: labels must lie in \[0, 5\]"):
        model.forward(x, t, np.array([0, NCLS + 1]))
    with pytest.raises(ValueError, match="y: labels"):
        model.forward(x, t, np.array([-1, 0]))
    with pytest.raises(TypeError, match="y"):
        model.forward(x, t, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"y: expected shape \(2,\)"):
        model.forward(x, t, np.array([0, 1, 2]))


def test_bad_timesteps(model):
    x, _, y = batch(2)
    for bad in ([-1.0, 0.0], [0.0, 1000.5], [np.nan, 1.0], [0.0, np.inf]):
        with pytest.raises(ValueError, match=r"t\[\d\]=.* outside \[0, 1000\]"):
            model.forward(x, np.array(bad, np.float32), y)
    with pytest.raises(TypeError, match="t"):
        model.forward(x, np.array([True, False]), y)
    with pytest.raises(ValueError, match=r"t: expected shape \(2,\)"):
        model.forward(x, np.array([1.0]), y)


def test_batch_larger_than_max_batch(model):
    x, t, y = batch(5)
    with pytest.raises(ValueError, match="batch 5 exceeds max_batch=4"):
        model.forward(x, t, y)
    model.forward(x[:4], t[:4], y[:4])                # the limit itself is fine
    with pytest.raises(ValueError, match="max_batch"):
        RaceDiT("DiT-T/2", input_size=S, max_batch=0)


def test_wrong_dtypes(model):
    x, t, y = batch(2)
    with pytest.raises(TypeError, match="x: expected dtype numpy.float32"):
        model.forward(x.astype(np.int32), t, y)
    with pytest.raises(TypeError, match="t: expected"):
        model.forward(x, t.astype(np.complex64), y)
    with pytest.raises(TypeError, match="plr_target"):
        model.forward(x, t, y, plr_target=np.zeros(x.shape, np.int32))
    model.forward(x, t, y)
    with pytest.raises(TypeError, match="dout"):
        model.backward(np.zeros((2, C, S, S), np.int64))


def test_bad_plr_target(model):
    x, t, y = batch(2)
    with pytest.raises(ValueError, match=r"plr_target: expected shape \(2, 4, 8, 8\)"):
        model.forward(x, t, y, plr_target=x[:1].copy())
    m = RaceDiT("RaceDiT-T/2-2in4", input_size=S, num_classes=NCLS)
    with pytest.raises(ValueError, match="plr_target"):
        m.forward(x, t, y, plr_target=np.full(x.shape, np.nan, np.float32))


def test_backward_before_forward(model):
    with pytest.raises(RuntimeError, match="backward called before forward"):
        model.backward(np.zeros((1, C, S, S), np.float32))


def test_bad_buffers(model):
    """The buffers are the model's own: set through the setters, which check what they copy."""
    n = model.num_params()
    with pytest.raises(AttributeError):
        model.grad_buffer = np.zeros(n, np.float32)
    with pytest.raises(TypeError, match="values"):
        model.set_param_buffer(np.zeros(n, np.int32))
    with pytest.raises(ValueError, match="values: expected shape"):
        model.set_param_buffer(np.zeros(n - 1, np.float32))
    with pytest.raises(ValueError, match="values: expected shape"):
        model.load_optimizer_state({"m": np.zeros(n + 1, np.float32), "v": 0, "step": 1})


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="config"):
        RaceDiT("DiT-Z/2")
    with pytest.raises(ValueError, match="input_size 9 is not a multiple of patch 2"):
        RaceDiT("DiT-T/2", input_size=9)
    with pytest.raises(ValueError, match="routing"):
        RaceDiT("DiT-T/2", input_size=8, routing="fastest")
    with pytest.raises(ValueError, match="gating"):
        RaceDiT("DiT-T/2", input_size=8, gating="relu")
    with pytest.raises(ValueError, match="class_dropout_prob"):
        RaceDiT("DiT-T/2", input_size=8, class_dropout_prob=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        RaceDiT("DiT-T/2", input_size=8, num_classes=0)


# ---- DiT state dicts --------------------------------------------------------------------------

def test_load_dit_state_dict_roundtrip_and_errors():
    a = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, learn_sigma=True, class_dropout_prob=0.0)
    randomise(a, 6)
    sd = a.state_dict()
    sd["pos_embed"] = racedit._C.dit_pos_embed(4, 4, 32)[None]
    b = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, learn_sigma=True, seed=9, class_dropout_prob=0.0)
    b.load_dit_state_dict({k: v.astype(np.float64) for k, v in sd.items()})
    np.testing.assert_array_equal(a.param_buffer, b.param_buffer)
    x, t, y = batch(2)
    np.testing.assert_array_equal(a.forward(x, t, y), b.forward(x, t, y))
    missing = dict(sd)
    del missing["blocks.1.attn.proj.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.attn.proj.bias'\]"):
        b.load_dit_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks.2.attn.proj.bias'\]"):
        b.load_dit_state_dict({**sd, "blocks.2.attn.proj.bias": np.zeros(32)})
    wrong = {**sd, "blocks.0.attn.qkv.weight": np.zeros((32, 96))}
    with pytest.raises(ValueError, match=r"blocks.0.attn.qkv.weight: expected shape \(96, 32\)"):
        b.load_dit_state_dict(wrong)
    with pytest.raises(ValueError, match="pos_embed"):
        b.load_dit_state_dict({**sd, "pos_embed": np.zeros((1, 16, 32))})
    c = RaceDiT("DiT-T/2", input_size=S, num_classes=NCLS, learn_sigma=False)
    with pytest.raises(ValueError, match="learn_sigma"):
        c.load_dit_state_dict(sd)
    np.testing.assert_array_equal(b.param_buffer, a.param_buffer)   # failed loads change nothing


def test_branch_norms_zero_init_and_errors():
    """adaLN-Zero starts every gate at 0, so nothing reaches the residual stream: both
    branch norms are exactly 0 at initialisation; positive once the gates are not; the
    same at any thread count; RuntimeError before a forward."""
    m = RaceDiT("RaceDiT-T/2-2in4", input_size=S, in_channels=C, num_classes=NCLS)
    with pytest.raises(RuntimeError, match="no forward"):
        m.branch_norms()
    x, t, y = batch(3)
    m.forward(x, t, y)
    bn = m.branch_norms()
    assert bn["attn"].shape == bn["ffn"].shape == (m.config.depth,)
    assert not bn["attn"].any() and not bn["ffn"].any()
    randomise(m, 1)
    m.forward(x, t, y)
    bn = m.branch_norms()
    assert (bn["attn"] > 0).all() and (bn["ffn"] > 0).all()
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="openmp"):
        one = m.branch_norms()
    np.testing.assert_array_equal(one["attn"], bn["attn"])
    np.testing.assert_array_equal(one["ffn"], bn["ffn"])
