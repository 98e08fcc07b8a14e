"""The CUDA backend's precisions against the fp32 CPU ops and the float64 twins: bf16
experts (bf16 GEMM operands, fp32 accumulation, fp32 master weights) within bf16
tolerances, bf16 attention against the bf16 twin, per-call TF32, the side-stream GEMM mode,
routing masks that do not depend on the expert precision (router, gate and routing stay
fp32), precision switching and its errors; the whole model in bf16 against the bf16 twin
and within a stated tolerance of fp32. Skipped without a CUDA device.

Tolerances for bf16 (unit roundoff 2^-9 ~ 2e-3, a few roundings deep): every output and
gradient has a relative error norm ||got - want|| / ||want|| < 1e-2, and elementwise
|got - want| <= 2e-2 |want| + 2e-2 max|want|."""
import numpy as np
import pytest
from _model_pair import C, NCLS, S, batch, pair
from _moe_state import grad_of, layer_pair, masks_agree
from _numerics import experts_case, rel_err

from racedit import RaceDiT, ref
from racedit import cuda as rc

pytestmark = pytest.mark.gpu

BF16_REL_NORM = 1e-2
BF16_RTOL = 2e-2


def bf16_close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    assert np.isfinite(got).all(), f"{what}: non-finite values"
    if want.size == 0 or not np.abs(want).max() > 0:
        np.testing.assert_array_equal(got, want, err_msg=what)
        return
    e = rel_err(got, want)
    assert e < BF16_REL_NORM, f"{what}: relative error norm {e:.3g} >= {BF16_REL_NORM}"
    np.testing.assert_allclose(got, want, rtol=BF16_RTOL,
                               atol=BF16_RTOL * float(np.abs(want).max()), err_msg=what)


# odd widths (scalar paths), widths divisible by 4 (vector paths), an expert with no rows
SHAPES = [(5, 3, 1, 2), (17, 13, 5, 7), (64, 16, 4, 8), (300, 24, 8, 40), (520, 64, 6, 96)]


@pytest.mark.parametrize("N,D,E,He", SHAPES)
def test_experts_bf16_match_twin(N, D, E, He, gemm_mode):
    dy, *args = experts_case(N, D, E, He, 3 * N + D + E + He)
    bf16_close(rc.experts_forward(*args, precision="bf16"), ref.experts_forward(*args), "y")
    got = rc.experts_backward(dy, *args, precision="bf16")
    want = ref.experts_backward(dy, *args)
    for name, g, w in zip(("dx", "dG", "dw1", "db1", "dw2", "db2"), got, want):
        bf16_close(g, w, name)
    assert (got[1][~args[1]] == 0).all()  # dG is exactly 0 off the mask


def test_experts_bf16_is_not_fp32():
    """The bf16 path really rounds: it differs from the fp32 result (else the test above
    could pass on an fp32 path by accident), yet stays within the bf16 tolerances."""
    dy, *args = experts_case(300, 64, 8, 64, 4)
    y32 = rc.experts_forward(*args)
    y16 = rc.experts_forward(*args, precision="bf16")
    assert rel_err(y16, y32) > 1e-5
    bf16_close(y16, y32, "y bf16 vs fp32")


def test_experts_bf16_bitwise_deterministic(gemm_mode):
    dy, *args = experts_case(300, 24, 8, 40, 9)
    first = rc.experts_backward(dy, *args, precision="bf16")
    y = rc.experts_forward(*args, precision="bf16")
    for _ in range(2):
        np.testing.assert_array_equal(rc.experts_forward(*args, precision="bf16"), y)
        for a, b in zip(rc.experts_backward(dy, *args, precision="bf16"), first):
            np.testing.assert_array_equal(a, b)


def test_experts_tf32_precision_per_call():
    dy, *args = experts_case(300, 64, 8, 64, 2)
    want = ref.experts_forward(*args)
    np.testing.assert_allclose(rc.experts_forward(*args, precision="tf32"), want, rtol=2e-2,
                               atol=2e-3 * np.abs(want).max())
    for g, w in zip(rc.experts_backward(dy, *args, precision="tf32"), ref.experts_backward(dy, *args)):
        assert rel_err(g, w) < 1e-2
    assert rc.tf32() is False  # the per-call precision leaves the global knob alone


def test_experts_side_streams_match_loop():
    dy, *args = experts_case(520, 64, 6, 96, 12)
    prev = rc.expert_gemm(0)
    try:
        base = rc.experts_backward(dy, *args)
        rc.expert_gemm(2)
        for a, b in zip(rc.experts_backward(dy, *args), base):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(b).max()))
    finally:
        rc.expert_gemm(prev)


# ---- attention in bf16 -------------------------------------------------------------------
@pytest.mark.parametrize("B,L,D,NH", [(1, 1, 2, 1), (2, 5, 12, 3), (2, 64, 64, 4), (1, 256, 96, 6)])
def test_attention_bf16(B, L, D, NH):
    """bf16 operands (fp32 accumulation, fp32 softmax) against the float64 twin that rounds
    the same operands (ref.bf16_gemm_operands): relative error norm < 5e-4 for out and dqkv
    (what is left is fp32 accumulation and the rare operand whose fp32 value rounds to the
    other bf16 neighbour), < 1e-4 for att. The bf16 twin is 2-4e-3 from the unrounded one
    (tests/layers/test_ref_bf16.py), so the fp32 path would fail here."""
    rng = np.random.default_rng(L + D)
    qkv = rng.standard_normal((B, L, 3 * D)).astype(np.float32)
    out, att = rc.attention_forward(qkv, NH, precision="bf16")
    with ref.bf16_gemm_operands():
        want_out, want_att = ref.dit_attention_forward(qkv, NH)
    assert rel_err(out, want_out) < 5e-4
    assert rel_err(att, want_att) < 1e-4
    g = rng.standard_normal((B, L, D)).astype(np.float32)
    got = rc.attention_backward(g, qkv, att, NH, precision="bf16")
    with ref.bf16_gemm_operands():
        want = ref.dit_attention_backward(g, qkv, att, NH)
    assert rel_err(got, want) < 5e-4
    if L > 1:  # not the fp32 path: farther from the unrounded twin than from the rounded one
        f32_out, _ = rc.attention_forward(qkv, NH)
        assert rel_err(out, f32_out) > 4 * rel_err(out, want_out)


# ---- the composite layer in bf16 ---------------------------------------------------------
@pytest.mark.parametrize("strategy", ["race", "token", "expert"])
@pytest.mark.parametrize("gating", ["identity", "softmax"])
def test_layer_bf16_matches_cpu(strategy, gating):
    B, L, D, E, k = 2, 16, 24, 4, 2
    cpu, st, x, dy, _ = layer_pair(strategy, gating, B, L, D, E, k, precision="bf16")
    assert st.precision == "bf16"
    y_cpu = cpu.forward(x)
    y = rc.moe_forward(st, x, cpu.param_buffer, training=True)
    v = st.view()
    np.testing.assert_allclose(v["G"].reshape(B, L, E), cpu.gates, rtol=2e-4,
                               atol=2e-5 * max(1.0, np.abs(cpu.gates).max()))
    if not masks_agree(v["mask"].reshape(B, L, E), cpu.mask, cpu.gates):
        pytest.skip("a gate score sits on the selection boundary at fp32 noise")
    np.testing.assert_array_equal(v["counts"], cpu.expert_counts)
    bf16_close(y, y_cpu, "y")
    cpu.zero_grad()
    dx_cpu = cpu.backward(dy)
    dx, grads = rc.moe_backward(st, dy, x, cpu.param_buffer)
    bf16_close(dx, dx_cpu, "dx")
    for name, g in cpu.grads.items():
        bf16_close(grad_of(cpu, grads, name), g, f"grad {name}")


def test_layer_masks_do_not_depend_on_precision():
    B, L, D, E, k = 2, 32, 16, 8, 2
    cpu, st, x, _, _ = layer_pair("race", "identity", B, L, D, E, k, seed=7, precision="fp32")
    rc.moe_forward(st, x, cpu.param_buffer, training=True)
    v32 = st.view()
    st16 = rc.MoEState(D, E, k, hidden=cpu.hidden, strategy="race", precision="bf16")
    rc.moe_forward(st16, x, cpu.param_buffer, training=True)
    v16 = st16.view()
    np.testing.assert_array_equal(v16["mask"], v32["mask"])
    np.testing.assert_array_equal(v16["G"], v32["G"])
    assert v16["tau"] == v32["tau"]


def test_layer_precision_switch_and_errors():
    B, L, D, E, k = 2, 8, 8, 4, 1
    cpu, st, x, dy, _ = layer_pair("race", "identity", B, L, D, E, k, precision="fp32")
    assert st.precision == "fp32"
    rc.moe_forward(st, x, cpu.param_buffer)
    st.precision = "bf16"
    with pytest.raises(RuntimeError, match="forward"):  # the fp32 activations were dropped
        rc.moe_backward(st, dy, x, cpu.param_buffer)
    y = rc.moe_forward(st, x, cpu.param_buffer)
    dx, _ = rc.moe_backward(st, dy, x, cpu.param_buffer)
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    with pytest.raises(ValueError, match="precision"):
        st.precision = "fp16"
    with pytest.raises(ValueError, match="precision"):
        rc.MoEState(D, E, k, precision="half")
    assert st.precision == "bf16"


def test_bench_bf16_runs():
    cfg = dict(D=16, E=4, He=32, k=2, strategy="race", gating="identity", beta=0.99,
               eval_topk=False)
    rng = np.random.default_rng(0)
    n = 16 * 16 + 16 + 16 * 4 + 4 + 2 * 4 * 16 * 32 + 4 * 32 + 4 * 16
    p = (0.1 * rng.standard_normal(n)).astype(np.float32)
    x = rng.standard_normal((2, 8, 16)).astype(np.float32)
    r = rc.bench_moe(cfg, x, p, x, iters=2, precision="bf16")
    assert r["P"] == 2 * 8 * 2 and r["fwdbwd_ms"] > 0 and r["dense_fwdbwd_ms"] > 0


# ---- the whole model in bf16 ---------------------------------------------------------------
def test_bf16_dense_matches_bf16_twin():
    """dtype="bf16" rounds the GEMM operands of every linear layer and of the attention;
    the float64 twin inside ref.bf16_gemm_operands rounds the same ones. Output within 2e-3
    and the whole gradient within 4e-3 (relative error norms; what is left is fp32
    accumulation and operands whose fp32 value lands on the other bf16 neighbour) of that
    twin. The twin itself is 0.5-3 % from the float64 model (tests/layers/test_ref_bf16.py), so a
    layer left in fp32 shows, and so does the fp32 model here."""
    m = RaceDiT("DiT-T/2", input_size=S, in_channels=C, num_classes=NCLS, class_dropout_prob=0.0)
    m.param_buffer[:] = np.random.default_rng(0).normal(0.0, 0.2, m.param_buffer.size)
    h = RaceDiT("DiT-T/2", input_size=S, in_channels=C, num_classes=NCLS, class_dropout_prob=0.0,
                device="cuda", dtype="bf16")
    h.set_param_buffer(m.param_buffer)
    x, t, y, _ = batch(3, 1)
    got = h.forward(x, t, y)
    dout = np.random.default_rng(5).normal(size=got.shape).astype(np.float32)
    kw = dict(heads=m.config.heads, patch=m.config.patch)
    with ref.bf16_gemm_operands():
        want, cache = ref.dit_model_forward(m.params, x, t, y, **kw)
        wg = ref.dit_model_backward(dout, cache)
    assert rel_err(got, want) < 2e-3
    h.zero_grad()
    h.backward(dout)
    hg = h.grads
    names = sorted(wg)
    flat = lambda d: np.concatenate([np.asarray(d[k]).ravel() for k in names])  # noqa: E731
    assert rel_err(flat(hg), flat(wg)) < 4e-3
    f32 = RaceDiT("DiT-T/2", input_size=S, in_channels=C, num_classes=NCLS,
                  class_dropout_prob=0.0, device="cuda")
    f32.set_param_buffer(m.param_buffer)
    assert rel_err(f32.forward(x, t, y), want) > 2 * rel_err(got, want)
    # switching back to fp32 gives the fp32 results again (the bf16 copies are freed), and
    # to bf16 once more the same bf16 results
    h.set_dtype("fp32")
    np.testing.assert_array_equal(h.forward(x, t, y), f32.forward(x, t, y))
    h.set_dtype("bf16")
    np.testing.assert_array_equal(h.forward(x, t, y), got)


def test_bf16_experts_close_to_fp32():
    """dtype="bf16" on a MoE model (bf16 operands for every GEMM, experts included; fp32
    accumulation, router and routing): the output within 4 % (relative Frobenius norm) of
    fp32, gradients within 8 % — the dense part alone is 1-2 % / 1-2 % from float64 in the
    bf16 twin (tests/layers/test_ref_bf16.py) and the experts add a few roundings more — on a seed
    where the bf16 perturbation flips no routing decision of the second block (a flip moves
    one token's output by a whole expert, which no tolerance on the rounding covers)."""
    for seed in range(2, 8):
        m, g = pair("RaceDiT-T/2-2in4", "cuda", seed=seed)
        h = RaceDiT("RaceDiT-T/2-2in4", input_size=S, in_channels=C, num_classes=NCLS,
                    class_dropout_prob=0.0, device="cuda", dtype="bf16")
        h.set_param_buffer(m.param_buffer)
        x, t, y, target = batch(3, seed + 1)
        a = g.forward(x, t, y, plr_target=target)
        b = h.forward(x, t, y, plr_target=target)
        if all(np.array_equal(p, q) for p, q in zip(g.routing_masks(), h.routing_masks())):
            break
    else:
        pytest.fail("bf16 flipped a routing decision for every seed")
    assert np.linalg.norm(b - a) <= 4e-2 * np.linalg.norm(a)
    dout = np.ones_like(a)
    g.zero_grad()
    g.backward(dout)
    h.zero_grad()
    h.backward(dout)
    ga, gb = g.grad_buffer, h.grad_buffer
    assert np.linalg.norm(gb - ga) <= 8e-2 * np.linalg.norm(ga)
