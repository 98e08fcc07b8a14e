"""What only the CUDA backend (racedit.cuda) has: routing masks identical to the CPU's for
all six strategies (ties, signed zeros, infinities, the radix path over large groups), the
experts in every expert-GEMM mode and under TF32, bitwise determinism on the device, the
layer state fed external parameters (MoEState) against racedit.MoE, the errors of bad input
on a CUDA build (checked before the device) and without a GPU. The ops that every device has
are checked on each in tests/ops/."""
import numpy as np
import pytest
from _moe_state import layer_pair, masks_agree
from _numerics import STRATEGIES, experts_case, route_valid
from _numerics import gpu_close as close

import racedit
from racedit import cuda as rc
from racedit import ops, ref

HAVE_GPU = racedit.cuda_available()
gpu = pytest.mark.gpu
# argument checks come before the device check: these run on every CUDA build, GPU or not
built = pytest.mark.skipif(not racedit.build_info()["cuda"], reason="racedit built without CUDA")


@pytest.mark.skipif(HAVE_GPU, reason="a GPU is present: the no-GPU path is not reachable")
def test_without_gpu_every_entry_raises_runtime_error():
    """Without a GPU, every entry point given VALID arguments raises RuntimeError naming
    the cause (never a CUDA error, a crash or a result)."""
    x = np.zeros((1, 2, 3), np.float32)
    N, D, E, He = 4, 6, 3, 5
    dy, xe, mask, G, w1, b1, w2, b2 = experts_case(N, D, E, He, 0)
    R = np.zeros((N, E), np.float32)
    xr, Wr, br = np.zeros((N, D), np.float32), np.zeros((D, D), np.float32), np.zeros(D, np.float32)
    Wg, bg = np.zeros((D, E), np.float32), np.zeros(E, np.float32)
    z3, rows = np.zeros((2, 3, 4), np.float32), np.zeros((2, 8), np.float32)
    qkv, p = np.zeros((1, 2, 12), np.float32), np.zeros(5, np.float32)
    calls = [
        lambda: rc.route(x, 1, "race"), lambda: rc.route_threshold(x, 0.0),
        lambda: rc.gate_forward(R), lambda: rc.gate_backward(R, R),
        lambda: rc.router_forward(xr, Wr, br, Wg, bg),
        lambda: rc.router_backward(R, xr, xr, xr, Wr, Wg),
        lambda: rc.experts_forward(xe, mask, G, w1, b1, w2, b2),
        lambda: rc.experts_backward(dy, xe, mask, G, w1, b1, w2, b2, precision="bf16"),
        lambda: rc.layernorm_forward(z3[0]),
        lambda: rc.layernorm_backward(z3[0], z3[0], z3[0, :, 0]),
        lambda: rc.modulate_forward(z3, rows, rows), lambda: rc.modulate_backward(z3, z3, rows),
        lambda: rc.gated_residual_forward(z3, z3, rows),
        lambda: rc.gated_residual_backward(z3, z3, rows),
        lambda: rc.silu_forward(z3), lambda: rc.silu_backward(z3, z3),
        lambda: rc.timestep_embedding(np.zeros(2, np.float32), 4),
        lambda: rc.attention_forward(qkv, 2),
        lambda: rc.attention_forward(qkv, 2, precision="bf16"),
        lambda: rc.attention_backward(np.zeros((1, 2, 4), np.float32), qkv,
                                     np.zeros((1, 2, 2, 2), np.float32), 2),
        lambda: rc.adamw_step(p, p.copy(), p.copy(), p.copy(), 1), lambda: rc.grad_norm(p),
        lambda: rc.nonfinite_index(p), lambda: rc.MoEState(4, 2, 1), lambda: rc.info(),
        lambda: rc.tf32(), lambda: rc.expert_gemm(),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(RuntimeError, match="CUDA not available"):
            call()


# ---- routing ---------------------------------------------------------------------------
# (B, L, E, k): odd sizes, E=1, L=1, k=E, k=0; groups both <= 256 (warp ranking) and
# > 256 elements (radix select, several 4096-element chunks)
SHAPES = [(3, 5, 7, 7), (3, 5, 7, 0), (2, 6, 3, 1), (1, 1, 1, 1), (4, 1, 5, 2), (2, 8, 4, 2),
          (2, 40, 12, 3), (1, 64, 33, 11), (4, 300, 8, 2), (8, 256, 16, 4), (2, 2048, 8, 2)]
CASES = [(B, L, E, k, s) for (B, L, E, k) in SHAPES for s in STRATEGIES
         if route_valid(B, L, E, k, s)]


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
    if not route_valid(B, L, E, k, s):
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
    x = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(TypeError, match="scores"):
        rc.route(x.astype(np.int32), 1)
    with pytest.raises(ValueError, match="scores"):
        rc.route(x[0], 1)
    with pytest.raises(ValueError, match="k"):
        rc.route(x, 5)
    with pytest.raises(ValueError, match="strategy"):
        rc.route(x, 1, "nope")
    with pytest.raises(ValueError):
        rc.route(np.zeros((2, 3, 4), np.float32), 1, "expert")  # K = 3/4
    with pytest.raises(ValueError, match="tau"):
        rc.route_threshold(x, float("nan"))


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


# ---- gating, router, experts ----------------------------------------------------------------
@built
def test_gate_router_bad_input():
    with pytest.raises(ValueError, match="gating"):
        rc.gate_forward(np.zeros((2, 3), np.float32), "relu")
    with pytest.raises(ValueError, match="G"):
        rc.gate_backward(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="Wr"):
        rc.router_forward(np.zeros((2, 3), np.float32), np.zeros((4, 4), np.float32),
                          np.zeros(3, np.float32), np.zeros((3, 2), np.float32), np.zeros(2, np.float32))


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
    dy, x, mask, G, w1, b1, w2, b2 = experts_case(6, 4, 3, 5, 1)
    with pytest.raises(TypeError, match="mask"):
        rc.experts_forward(x, mask.astype(np.float32), G, w1, b1, w2, b2)
    with pytest.raises(ValueError, match="w2"):
        rc.experts_forward(x, mask, G, w1, b1, w2[:, :, :3], b2)
    with pytest.raises(ValueError, match="dy"):
        rc.experts_backward(dy[:5], x, mask, G, w1, b1, w2, b2)
    with pytest.raises(ValueError, match="precision"):
        rc.experts_forward(x, mask, G, w1, b1, w2, b2, precision="fp16")


@built
def test_layers_bad_input():
    """Argument errors name the argument, on any CUDA build (checked before the device)."""
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="shift"):
        rc.modulate_forward(x, np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="scale"):
        rc.modulate_forward(x, np.zeros((2, 4), np.float32), np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="gate"):
        rc.gated_residual_forward(x, x, np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="num_heads"):
        rc.attention_forward(np.zeros((1, 2, 12), np.float32), 3)
    with pytest.raises(ValueError, match="dim"):
        rc.timestep_embedding(np.zeros(2, np.float32), 5)
    with pytest.raises(TypeError, match="inp"):
        rc.layernorm_forward(np.zeros((2, 3), np.int32))
    p = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="m"):
        rc.adamw_step(p, p.copy(), np.zeros(4), p.copy(), 1)
    with pytest.raises(ValueError, match="step"):
        rc.adamw_step(p, p.copy(), p.copy(), p.copy(), 0)
    with pytest.raises(ValueError, match="grads"):
        rc.adamw_step(p, np.zeros(3, np.float32), p.copy(), p.copy(), 1)


def test_attention_precision_checked_first():
    """A bad precision is a ValueError naming it, with or without a GPU."""
    qkv = np.zeros((1, 2, 12), np.float32)
    with pytest.raises(ValueError, match="precision.*'tf32'"):
        rc.attention_forward(qkv, 3, precision="tf32")
    with pytest.raises(ValueError, match="precision"):
        rc.attention_backward(np.zeros((1, 2, 4), np.float32), qkv,
                                        np.zeros((1, 3, 2, 2), np.float32), 3, precision="fp16")


@gpu
def test_expert_gemm_mode_checked():
    with pytest.raises(ValueError, match="mode"):
        rc.expert_gemm(3)


# ---- the composite layer -----------------------------------------------------------------
@gpu
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("gating", ["identity", "softmax"])
def test_layer_matches_cpu_training(strategy, gating):
    B, L, D, E, k = 2, 16, 24, 4, 2
    cpu, st, x, dy, _ = layer_pair(strategy, gating, B, L, D, E, k)
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
    cpu, st, x, dy, _ = layer_pair("race", "identity", B, L, D, E, k, seed=3)
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
    cpu, st, x, _, _ = layer_pair("race", "identity", B, L, D, E, k)
    y = rc.moe_forward(st, x, cpu.param_buffer, training=False)
    y_cpu = cpu.eval().forward(x)
    v = st.view()
    assert st.threshold is None and cpu.threshold is None
    if masks_agree(v["mask"].reshape(B, L, E), cpu.mask, cpu.gates):
        close(y, y_cpu, what="y (eval, no tau: batch top-K)")


@gpu
def test_layer_errors():
    cpu, st, x, dy, _ = layer_pair("race", "identity", 2, 8, 8, 4, 1)
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
