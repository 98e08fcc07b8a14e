"""The CUDA backend (racedit.cuda) against the CPU ops and the float64 twins: routing masks
identical to the CPU's for all six strategies (ties, signed zeros, infinities, the radix
path over large groups), gating, router and experts within fp32 tolerances in both
expert-GEMM modes, bitwise determinism, the composite layer against racedit.MoE, and the
errors of bad input. Everything but the no-GPU test is skipped without a CUDA device."""
import numpy as np
import pytest
from _numerics import experts_case

import racedit
from racedit import ops, ref

HAVE_GPU = racedit.cuda_available()
gpu = pytest.mark.skipif(not HAVE_GPU, reason="CUDA not available: no CUDA device or racedit built without CUDA")
# argument checks come before the device check: these run on every CUDA build, GPU or not
built = pytest.mark.skipif(not racedit.build_info()["cuda"], reason="racedit built without CUDA")

if HAVE_GPU:
    from racedit import cuda as rc

STRATEGIES = ["token", "expert", "bl", "be", "le", "race"]
# fp32 on both sides, different summation orders (cuBLAS vs the CPU BLAS)
RTOL, ATOL = 2e-4, 2e-5


def close(a, b, rtol=RTOL, atol=ATOL, what=""):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.abs(b).max()) if b.size else 1.0)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale, err_msg=what)


@pytest.mark.skipif(HAVE_GPU, reason="a GPU is present: the no-GPU path is not reachable")
def test_without_gpu_every_entry_raises_runtime_error():
    """Without a GPU, every entry point given VALID arguments raises RuntimeError naming
    the cause (never a CUDA error, a crash or a result)."""
    from racedit import cuda as c

    x = np.zeros((1, 2, 3), np.float32)
    N, D, E, He = 4, 6, 3, 5
    dy, xe, mask, G, w1, b1, w2, b2 = experts_case(N, D, E, He, 0)
    R = np.zeros((N, E), np.float32)
    xr, Wr, br = np.zeros((N, D), np.float32), np.zeros((D, D), np.float32), np.zeros(D, np.float32)
    Wg, bg = np.zeros((D, E), np.float32), np.zeros(E, np.float32)
    z3, rows = np.zeros((2, 3, 4), np.float32), np.zeros((2, 8), np.float32)
    qkv, p = np.zeros((1, 2, 12), np.float32), np.zeros(5, np.float32)
    calls = [
        lambda: c.route(x, 1, "race"), lambda: c.route_threshold(x, 0.0),
        lambda: c.gate_forward(R), lambda: c.gate_backward(R, R),
        lambda: c.router_forward(xr, Wr, br, Wg, bg),
        lambda: c.router_backward(R, xr, xr, xr, Wr, Wg),
        lambda: c.experts_forward(xe, mask, G, w1, b1, w2, b2),
        lambda: c.experts_backward(dy, xe, mask, G, w1, b1, w2, b2, precision="bf16"),
        lambda: c.layernorm_forward(z3[0]), lambda: c.layernorm_backward(z3[0], z3[0], z3[0, :, 0]),
        lambda: c.modulate_forward(z3, rows, rows), lambda: c.modulate_backward(z3, z3, rows),
        lambda: c.gated_residual_forward(z3, z3, rows),
        lambda: c.gated_residual_backward(z3, z3, rows),
        lambda: c.silu_forward(z3), lambda: c.silu_backward(z3, z3),
        lambda: c.timestep_embedding(np.zeros(2, np.float32), 4),
        lambda: c.attention_forward(qkv, 2), lambda: c.attention_forward(qkv, 2, precision="bf16"),
        lambda: c.attention_backward(np.zeros((1, 2, 4), np.float32), qkv,
                                     np.zeros((1, 2, 2, 2), np.float32), 2),
        lambda: c.adamw_step(p, p.copy(), p.copy(), p.copy(), 1), lambda: c.grad_norm(p),
        lambda: c.nonfinite_index(p), lambda: c.MoEState(4, 2, 1), lambda: c.info(),
        lambda: c.tf32(), lambda: c.expert_gemm(),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(RuntimeError, match="CUDA not available"):
            call()


# ---- routing ---------------------------------------------------------------------------
def valid(B, L, E, k, s):
    """K of docs/method.md §2 is a whole number in [0, group size] (the rule of route_plan)."""
    num, den, size = {"token": (k, 1, E), "expert": (k * L, E, L), "bl": (B * L * k, E, B * L),
                      "be": (B * k, 1, B * E), "le": (L * k, 1, L * E),
                      "race": (B * L * k, 1, B * L * E)}[s]
    return 0 <= k <= E and num % den == 0 and num // den <= size


# (B, L, E, k): odd sizes, E=1, L=1, k=E, k=0; groups both <= 256 (warp ranking) and
# > 256 elements (radix select, several 4096-element chunks)
SHAPES = [(3, 5, 7, 7), (3, 5, 7, 0), (2, 6, 3, 1), (1, 1, 1, 1), (4, 1, 5, 2), (2, 8, 4, 2),
          (2, 40, 12, 3), (1, 64, 33, 11), (4, 300, 8, 2), (8, 256, 16, 4), (2, 2048, 8, 2)]
CASES = [(B, L, E, k, s) for (B, L, E, k) in SHAPES for s in STRATEGIES if valid(B, L, E, k, s)]


def route_both(x, k, s):
    m, t = rc.route(x, k, s, return_tau=True)
    cm, ct = ops.route(x, k, s, return_tau=True)
    assert m.dtype == np.bool_ and m.shape == x.shape
    np.testing.assert_array_equal(m, cm, err_msg=f"mask differs from the CPU's for {s} {x.shape} k={k}")
    if np.isinf(ct):
        assert t == ct
    else:
        np.testing.assert_allclose(t, ct, rtol=1e-6, atol=1e-7)
    return m


@gpu
@pytest.mark.parametrize("B,L,E,k,s", CASES)
def test_route_random_matches_cpu(B, L, E, k, s):
    rng = np.random.default_rng(B * 7919 + L * 31 + E * 7 + k)
    route_both(rng.standard_normal((B, L, E)).astype(np.float32), k, s)


@gpu
@pytest.mark.parametrize("s", STRATEGIES)
@pytest.mark.parametrize("B,L,E,k", [(2, 6, 4, 2), (4, 300, 8, 2), (2, 2048, 8, 2)])
def test_route_heavy_ties_match_cpu(B, L, E, k, s):
    """Few distinct values: the K-th largest is tied across many elements and chunks, so
    the lower-flat-index rule decides; signed zeros and infinities are mixed in."""
    if not valid(B, L, E, k, s):
        pytest.skip(f"K not an integer for {s} at {(B, L, E, k)}")
    rng = np.random.default_rng(B + L + E + k)
    vals = np.array([-np.inf, -1.0, -0.0, 0.0, 0.5, 1.0, np.inf], np.float32)
    route_both(vals[rng.integers(0, len(vals), (B, L, E))], k, s)
    route_both(np.zeros((B, L, E), np.float32), k, s)  # all tied


@gpu
def test_route_two_million_scores_race():
    """The race case at DiT-B scale (B=64, L=1024, E=32: 2.1e6 scores in one group)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1024, 32)).astype(np.float32)
    x[::3] = np.round(x[::3] * 4) / 4  # ties among the candidates too
    m = route_both(x, 4, "race")
    assert m.sum() == 64 * 1024 * 4


@gpu
def test_route_deterministic():
    x = np.random.default_rng(3).standard_normal((8, 256, 16)).astype(np.float32)
    a = rc.route(x, 2, "race")
    for _ in range(3):
        np.testing.assert_array_equal(rc.route(x, 2, "race"), a)


@gpu
def test_route_threshold_matches_cpu():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 50, 7)).astype(np.float32)
    x[0, 0, 0] = -0.0
    for tau in (0.0, -0.0, 0.3, -np.inf, np.inf):
        np.testing.assert_array_equal(rc.route_threshold(x, tau), ops.route_threshold(x, tau))


@built
def test_route_bad_input():
    from racedit import cuda as rcb

    x = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(TypeError, match="scores"):
        rcb.route(x.astype(np.int32), 1)
    with pytest.raises(ValueError, match="scores"):
        rcb.route(x[0], 1)
    with pytest.raises(ValueError, match="k"):
        rcb.route(x, 5)
    with pytest.raises(ValueError, match="strategy"):
        rcb.route(x, 1, "nope")
    with pytest.raises(ValueError):
        rcb.route(np.zeros((2, 3, 4), np.float32), 1, "expert")  # K = 3/4
    with pytest.raises(ValueError, match="tau"):
        rcb.route_threshold(x, float("nan"))


@gpu
def test_route_nan_scores():
    """NaN scores are found on the device and named by flat index."""
    x = np.zeros((2, 4, 4), np.float32)
    y = x.copy()
    y[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rc.route(y, 1, "race")
    with pytest.raises(ValueError, match="NaN"):
        rc.route(y, 1, "token")
    with pytest.raises(ValueError, match="NaN"):
        rc.route_threshold(y, 0.0)


# ---- gating and router -----------------------------------------------------------------
@gpu
@pytest.mark.parametrize("gating", ["identity", "sigmoid", "softmax"])
@pytest.mark.parametrize("N,E", [(1, 1), (7, 5), (33, 40), (300, 8)])
def test_gate_matches_cpu(gating, N, E):
    rng = np.random.default_rng(N * E)
    R = (3 * rng.standard_normal((N, E))).astype(np.float32)
    dG = rng.standard_normal((N, E)).astype(np.float32)
    G = rc.gate_forward(R, gating)
    close(G, ops.gate_forward(R, gating), 1e-5, 1e-6, "G")
    close(rc.gate_backward(dG, G, gating), ops.gate_backward(dG, G, gating), 1e-5, 1e-6, "dR")


@gpu
@pytest.mark.parametrize("N,D,E", [(1, 1, 1), (9, 13, 5), (64, 48, 8)])
def test_router_matches_twin(N, D, E):
    rng = np.random.default_rng(N + D + E)
    x = rng.standard_normal((N, D)).astype(np.float32)
    Wr = (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
    br = rng.standard_normal(D).astype(np.float32)
    Wg = (rng.standard_normal((D, E)) / np.sqrt(D)).astype(np.float32)
    bg = rng.standard_normal(E).astype(np.float32)
    hpre, h, R = rc.router_forward(x, Wr, br, Wg, bg)
    rh, rhh, rR = ref.router_forward(x, Wr, br, Wg, bg)
    close(hpre, rh, what="hpre"); close(h, rhh, what="h"); close(R, rR, what="R")
    dR = rng.standard_normal((N, E)).astype(np.float32)
    extra = rng.standard_normal((N, D)).astype(np.float32)
    for dh_extra in (None, extra):
        got = rc.router_backward(dR, hpre, h, x, Wr, Wg, dh_extra)
        want = ref.router_backward(dR, rh, rhh, x, Wr, Wg, dh_extra)
        for name, g, w in zip(("dx", "dWr", "dbr", "dWg", "dbg"), got, want):
            close(g, w, what=name)


@built
def test_gate_router_bad_input():
    from racedit import cuda as rcb

    with pytest.raises(ValueError, match="gating"):
        rcb.gate_forward(np.zeros((2, 3), np.float32), "relu")
    with pytest.raises(ValueError, match="G"):
        rcb.gate_backward(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="Wr"):
        rcb.router_forward(np.zeros((2, 3), np.float32), np.zeros((4, 4), np.float32),
                          np.zeros(3, np.float32), np.zeros((3, 2), np.float32), np.zeros(2, np.float32))


# ---- experts ---------------------------------------------------------------------------
EXPERT_SHAPES = [(1, 1, 1, 1), (5, 3, 1, 2), (17, 13, 5, 7), (300, 24, 8, 40), (520, 64, 6, 96)]


@gpu
@pytest.mark.parametrize("N,D,E,He", EXPERT_SHAPES)
def test_experts_match_twin(N, D, E, He, gemm_mode):
    dy, *args = experts_case(N, D, E, He, N + D + E + He)
    close(rc.experts_forward(*args), ref.experts_forward(*args), what="y")
    got = rc.experts_backward(dy, *args)
    want = ref.experts_backward(dy, *args)
    for name, g, w in zip(("dx", "dG", "dw1", "db1", "dw2", "db2"), got, want):
        close(g, w, what=name)
    assert (got[1][~args[1]] == 0).all()  # dG is exactly 0 off the mask


@gpu
def test_experts_match_cpu_op():
    dy, *args = experts_case(200, 32, 8, 48, 11)
    close(rc.experts_forward(*args), ops.experts_forward(*args), what="y")
    for name, g, w in zip(("dx", "dG", "dw1", "db1", "dw2", "db2"),
                          rc.experts_backward(dy, *args), ops.experts_backward(dy, *args)):
        close(g, w, what=name)


@gpu
@pytest.mark.parametrize("case", ["all", "none"])
def test_experts_all_or_no_pairs(case):
    dy, x, mask, *rest = experts_case(40, 16, 4, 8, 5)
    mask = np.full_like(mask, case == "all")
    close(rc.experts_forward(x, mask, *rest), ref.experts_forward(x, mask, *rest), what="y")
    for g, w in zip(rc.experts_backward(dy, x, mask, *rest), ref.experts_backward(dy, x, mask, *rest)):
        close(g, w)


@gpu
def test_experts_bitwise_deterministic(gemm_mode):
    dy, *args = experts_case(300, 24, 8, 40, 9)
    first = rc.experts_backward(dy, *args)
    y = rc.experts_forward(*args)
    for _ in range(2):
        np.testing.assert_array_equal(rc.experts_forward(*args), y)
        for a, b in zip(rc.experts_backward(dy, *args), first):
            np.testing.assert_array_equal(a, b)


@gpu
def test_experts_tf32_is_close_and_reversible():
    dy, *args = experts_case(300, 64, 8, 64, 2)
    want = ref.experts_forward(*args)
    prev = rc.tf32(True)
    try:
        close(rc.experts_forward(*args), want, 2e-2, 2e-3, "y (tf32)")
    finally:
        rc.tf32(prev)
    close(rc.experts_forward(*args), want, what="y (fp32 again)")


@built
def test_experts_bad_input():
    from racedit import cuda as rcb

    dy, x, mask, G, w1, b1, w2, b2 = experts_case(6, 4, 3, 5, 1)
    with pytest.raises(TypeError, match="mask"):
        rcb.experts_forward(x, mask.astype(np.float32), G, w1, b1, w2, b2)
    with pytest.raises(ValueError, match="w2"):
        rcb.experts_forward(x, mask, G, w1, b1, w2[:, :, :3], b2)
    with pytest.raises(ValueError, match="dy"):
        rcb.experts_backward(dy[:5], x, mask, G, w1, b1, w2, b2)
    with pytest.raises(ValueError, match="precision"):
        rcb.experts_forward(x, mask, G, w1, b1, w2, b2, precision="fp16")


@gpu
def test_expert_gemm_mode_checked():
    with pytest.raises(ValueError, match="mode"):
        rc.expert_gemm(3)


# ---- the composite layer -----------------------------------------------------------------
def layer_pair(strategy, gating, B, L, D, E, k, seed=0, eval_topk=False):
    cpu = racedit.MoE(D, E, k, strategy=strategy, gating=gating, seed=seed, eval_topk=eval_topk)
    st = rc.MoEState(D, E, k, hidden=cpu.hidden, strategy=strategy, gating=gating,
                     eval_topk=eval_topk)
    rng = np.random.default_rng(seed + 1)
    cpu.param_buffer[...] += 0.05 * rng.standard_normal(cpu.param_buffer.size).astype(np.float32)
    x = rng.standard_normal((B, L, D)).astype(np.float32)
    dy = rng.standard_normal((B, L, D)).astype(np.float32)
    return cpu, st, x, dy


def masks_agree(m_gpu, m_cpu, G, tau=None):
    """True when identical. Otherwise every difference must be explained by fp32 noise in
    G itself (it comes from GEMMs with different summation orders): under top-K, a pair
    selected only on one side has a near-equal partner selected only on the other (a swap
    inside a group); under a threshold, the flipped pair sits at tau."""
    diff = m_gpu != m_cpu
    if not diff.any():
        return True
    if tau is not None:
        assert np.all(np.abs(G[diff] - tau) < 1e-4), f"{diff.sum()} pairs differ away from tau"
        return False
    only_gpu, only_cpu = np.sort(G[m_gpu & ~m_cpu]), np.sort(G[m_cpu & ~m_gpu])
    assert only_gpu.size == only_cpu.size, "selected counts differ"
    assert np.all(np.abs(only_gpu - only_cpu) < 1e-4), f"{diff.sum()} pairs differ away from a tie"
    return False


@gpu
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("gating", ["identity", "softmax"])
def test_layer_matches_cpu_training(strategy, gating):
    B, L, D, E, k = 2, 16, 24, 4, 2
    cpu, st, x, dy = layer_pair(strategy, gating, B, L, D, E, k)
    y_cpu = cpu.forward(x)
    y = rc.moe_forward(st, x, cpu.param_buffer, training=True)
    v = st.view()
    same = masks_agree(v["mask"].reshape(B, L, E), cpu.mask, cpu.gates)
    close(v["G"].reshape(B, L, E), cpu.gates, what="G")
    if not same:
        pytest.skip("a gate score sits on the selection boundary at fp32 noise: outputs differ by design")
    close(y, y_cpu, what="y")
    np.testing.assert_array_equal(v["counts"], cpu.expert_counts)
    close(v["tau_b"], cpu.batch_threshold, 1e-5, 1e-6, "tau_b")
    want = cpu.threshold                   # per strategy: E, L, 1 or no thresholds
    if want is None:
        assert st.thresholds.size == 0
    else:
        close(st.thresholds, np.reshape(want, -1), 1e-5, 1e-6, "thresholds")
    cpu.zero_grad()
    dx_cpu = cpu.backward(dy)
    dx, grads = rc.moe_backward(st, dy, x, cpu.param_buffer)
    close(dx, dx_cpu, what="dx")
    close(grads, cpu.grad_buffer, what="grads")


@gpu
def test_layer_threshold_eval_and_tau_ema():
    B, L, D, E, k = 2, 16, 16, 4, 1
    cpu, st, x, dy = layer_pair("race", "identity", B, L, D, E, k, seed=3)
    rng = np.random.default_rng(5)
    for step in range(3):
        xs = x + 0.1 * step * rng.standard_normal(x.shape).astype(np.float32)
        cpu.forward(xs)
        rc.moe_forward(st, xs, cpu.param_buffer, training=True)
        close(st.threshold, cpu.threshold, 1e-5, 1e-6, f"tau after step {step}")
    cpu.eval()
    y_cpu = cpu.forward(x)
    y = rc.moe_forward(st, x, cpu.param_buffer, training=False)
    if masks_agree(st.view()["mask"].reshape(B, L, E), cpu.mask, cpu.gates, cpu.threshold):
        close(y, y_cpu, what="y (eval, G >= tau)")
    st.threshold = 0.25
    cpu.threshold = 0.25
    assert st.threshold == pytest.approx(0.25)
    rc.moe_forward(st, x, cpu.param_buffer, training=False)
    cpu.forward(x)
    masks_agree(st.view()["mask"].reshape(B, L, E), cpu.mask, cpu.gates, 0.25)


@gpu
def test_layer_eval_without_threshold_routes_by_batch_topk():
    """A fresh device layer (no tau) in eval: the batch top-K of the CPU layer, tau unset."""
    B, L, D, E, k = 2, 8, 8, 4, 1
    cpu, st, x, _ = layer_pair("race", "identity", B, L, D, E, k)
    y = rc.moe_forward(st, x, cpu.param_buffer, training=False)
    y_cpu = cpu.eval().forward(x)
    v = st.view()
    assert st.threshold is None and cpu.threshold is None
    if masks_agree(v["mask"].reshape(B, L, E), cpu.mask, cpu.gates):
        close(y, y_cpu, what="y (eval, no tau: batch top-K)")


@gpu
def test_layer_errors():
    cpu, st, x, dy = layer_pair("race", "identity", 2, 8, 8, 4, 1)
    with pytest.raises(RuntimeError, match="forward"):
        rc.moe_backward(st, dy, x, cpu.param_buffer)
    with pytest.raises(ValueError, match="params"):
        rc.moe_forward(st, x, cpu.param_buffer[:-1])
    with pytest.raises(ValueError, match="x"):
        rc.moe_forward(st, x[:, :, :5], cpu.param_buffer)
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rc.moe_forward(st, bad, cpu.param_buffer)
    rc.moe_forward(st, x, cpu.param_buffer)
    with pytest.raises(TypeError, match="grads"):
        rc.moe_backward(st, dy, x, cpu.param_buffer, grads=np.zeros(cpu.param_buffer.size))
