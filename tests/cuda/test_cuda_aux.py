"""The CUDA MoE layer's aux losses and diagnostics against the CPU composite (racedit.MoE
with the same parameters): router similarity, balance and PLR losses with all weights on,
their gradients through the router (dx, every parameter including the PLR head), the
head's prediction, the diagnostics of training and eval forwards, and the errors. fp32 on
both sides; skipped without a CUDA device."""
import numpy as np
import pytest
from _moe_state import grad_of, layer_pair
from _numerics import gpu_close as close

from racedit import cuda as rc

pytestmark = pytest.mark.gpu


def pair(strategy="race", gating="identity", B=2, L=16, D=24, E=6, k=2, Pd=5, sim=0.3, bal=0.2,
         plr=0.7, seed=0):
    return layer_pair(strategy, gating, B, L, D, E, k, seed, plr_dim=Pd, sim_weight=sim,
                      balance_weight=bal, plr_weight=plr)


def same_masks(st, cpu):
    return np.array_equal(st.view()["mask"].reshape(cpu.mask.shape), cpu.mask)


def check_aux(a, c, what):
    assert a is not None and c is not None
    for key in ("sim_loss", "balance_loss", "plr_loss"):
        if c[key] is None:
            assert a[key] is None, f"{what}: {key}"
        else:
            close(a[key], c[key], 1e-4, 1e-6, f"{what}: {key}")
    close(a["aux_loss"], c["aux_loss"], 1e-4, 1e-6, f"{what}: aux_loss")
    np.testing.assert_array_equal(a["expert_load"], c["expert_load"])
    for key in ("max_violation", "combination_usage", "experts_per_token"):
        assert a[key] == pytest.approx(c[key], rel=1e-12, abs=1e-12), f"{what}: {key}"
    assert a["dead_experts"] == c["dead_experts"]
    assert a["training"] == c["training"]
    if c["plr_pred"] is None:
        assert a["plr_pred"] is None
    else:
        close(a["plr_pred"], c["plr_pred"], what=f"{what}: plr_pred")


@pytest.mark.parametrize("strategy,gating", [("race", "identity"), ("token", "softmax"),
                                             ("expert", "sigmoid"), ("le", "identity")])
def test_aux_losses_and_grads_match_cpu(strategy, gating):
    # expert choice needs K = k*L/E whole: L=16, k=2 -> E=8
    cpu, st, x, dy, tgt = pair(strategy, gating, E=8 if strategy == "expert" else 6)
    y_cpu = cpu.forward(x, plr_target=tgt)
    y = rc.moe_forward(st, x, cpu.param_buffer, training=True, plr_target=tgt)
    if not same_masks(st, cpu):
        pytest.skip("a gate score sits on the selection boundary at fp32 noise")
    close(y, y_cpu, what="y")
    a, c = st.aux, cpu.aux
    assert a["sim_loss"] is not None and a["balance_loss"] is not None and a["plr_loss"] is not None
    check_aux(a, c, "training")
    cpu.zero_grad()
    dx_cpu = cpu.backward(dy)
    dx, grads = rc.moe_backward(st, dy, x, cpu.param_buffer)
    close(dx, dx_cpu, what="dx")
    for name, g in cpu.grads.items():
        close(grad_of(cpu, grads, name), g, what=f"grad {name}")


def test_aux_weights_change_only_the_router_grads():
    """The aux gradients are really applied: with the weights on, the router and head
    gradients differ from a layer with the weights off; the expert gradients do not."""
    cpu, st, x, dy, tgt = pair(sim=0.5, bal=0.5, plr=1.0)
    st0 = rc.MoEState(cpu.dim, cpu.num_experts, cpu.k, hidden=cpu.hidden, plr_dim=cpu.plr_dim,
                      plr_weight=0.0)
    rc.moe_forward(st, x, cpu.param_buffer, plr_target=tgt)
    rc.moe_forward(st0, x, cpu.param_buffer, plr_target=tgt)
    _, g1 = rc.moe_backward(st, dy, x, cpu.param_buffer)
    _, g0 = rc.moe_backward(st0, dy, x, cpu.param_buffer)
    offs = {n: (g.ctypes.data - cpu.grad_buffer.ctypes.data) // 4 for n, g in cpu.grads.items()}
    sl = {n: slice(offs[n], offs[n] + cpu.grads[n].size) for n in offs}
    assert not np.allclose(g1[sl["router_w"]], g0[sl["router_w"]])
    assert not np.allclose(g1[sl["plr_w"]], g0[sl["plr_w"]])
    assert np.all(g0[sl["plr_w"]] == 0)
    np.testing.assert_array_equal(g1[sl["w1"]], g0[sl["w1"]])
    assert st0.aux["sim_loss"] is None and st0.aux["plr_loss"] is not None
    assert st0.aux["aux_loss"] == 0.0


def test_aux_without_target_and_in_eval():
    cpu, st, x, dy, tgt = pair()
    cpu.forward(x)
    rc.moe_forward(st, x, cpu.param_buffer, training=True)
    if same_masks(st, cpu):
        check_aux(st.aux, cpu.aux, "no target")
    assert st.aux["plr_loss"] is None and st.aux["plr_pred"] is not None
    cpu.eval()
    cpu.forward(x)
    rc.moe_forward(st, x, cpu.param_buffer, training=False)
    a = st.aux
    assert a["training"] is False
    assert a["sim_loss"] is None and a["balance_loss"] is None and a["plr_pred"] is None
    assert a["aux_loss"] == 0.0
    if same_masks(st, cpu):
        check_aux(a, cpu.aux, "eval")
    dx, _ = rc.moe_backward(st, dy, x, cpu.param_buffer)
    assert np.isfinite(dx).all()


def test_aux_bitwise_deterministic():
    cpu, st, x, dy, tgt = pair(E=8, L=64)
    out = []
    for _ in range(2):
        rc.moe_forward(st, x, cpu.param_buffer, plr_target=tgt)
        dx, g = rc.moe_backward(st, dy, x, cpu.param_buffer)
        out.append((st.aux["aux_loss"], dx, g))
    assert out[0][0] == out[1][0]
    np.testing.assert_array_equal(out[0][1], out[1][1])
    np.testing.assert_array_equal(out[0][2], out[1][2])


def test_aux_errors():
    cpu, st, x, dy, tgt = pair()
    bad = tgt.copy()
    bad[1, 2, 3] = np.inf
    with pytest.raises(ValueError, match="target"):
        rc.moe_forward(st, x, cpu.param_buffer, plr_target=bad)
    with pytest.raises(ValueError, match="plr_target"):
        rc.moe_forward(st, x, cpu.param_buffer, plr_target=tgt[:, :, :2])
    cpu0, st0, x0, _, _ = pair(Pd=0)
    with pytest.raises(ValueError, match="plr_target"):
        rc.moe_forward(st0, x0, cpu0.param_buffer, plr_target=tgt)
    with pytest.raises(ValueError, match="num_experts"):
        rc.MoEState(8, 1, 1, sim_weight=0.1)
    with pytest.raises(ValueError, match="sim_weight"):
        rc.MoEState(8, 4, 1, sim_weight=-1.0)
    with pytest.raises(ValueError, match="params"):
        rc.moe_forward(st, x, cpu.param_buffer[:-1], plr_target=tgt)
