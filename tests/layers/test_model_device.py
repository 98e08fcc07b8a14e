"""The whole model on another device (RaceDiT(device=...): the checking backend, the GPU)
against the CPU RaceDiT on the same weights and inputs: the output and every parameter
gradient (bit for bit on the checking backend; fp32 within tolerances on the GPU), dense
and MoE over several strategies and gatings, routing masks identical, aux losses and
diagnostics; eval mode with the thresholds; a 20-step training loop (device step vs the CPU
model with a NumPy AdamW) whose loss curves agree; the train step's clip / EMA / grads;
bitwise run-to-run determinism and resume; bad input; device_buffer shares the model's
memory (__cuda_array_interface__ on CUDA). bf16 models: tests/cuda."""
import numpy as np
import pytest
from _model_pair import C, NCLS, S, batch, pair
from _numerics import assert_close, exact, on

import racedit
from racedit import RaceDiT, optim

RTOL = 1e-3                   # fp32 CPU vs GPU: other summation orders, scaled by max |ref|
DEVICES = on("check", "cuda")


def close(a, b, what="", rtol=RTOL, atol=1e-4, device="cuda"):
    """Bit for bit on the checking backend; else rtol, atol * max(max |b|, 1e-3)."""
    if exact(device):
        np.testing.assert_array_equal(a, b, err_msg=what)
    else:
        assert_close(a, b, rtol=rtol, atol=atol, name=what, floor=1e-3)


def near_tie_flips(g, cpu_masks, tol=1e-4):
    """True when every mask difference between GPU and CPU sits on a near tie of the GPU's
    gate scores: the flipped score lies within tol * max |G| of a score on the other side
    of the selection, or of the layer's threshold (eval mode)."""
    for layer, want in enumerate(cpu_masks):
        get = lambda name: racedit._C.model_moe_get(g._model, layer, name)  # noqa: E731
        got = get("mask").reshape(want.shape).ravel()
        diff = got != want.ravel()
        if not diff.any():
            continue
        G = get("gates").ravel()
        tau = get("threshold")
        eps = tol * max(float(np.abs(G).max()), 1e-6)
        for i in np.flatnonzero(diff):
            other = G[got != got[i]]
            near_other = other.size and np.abs(other - G[i]).min() <= eps
            near_tau = tau is not None and abs(G[i] - tau) <= eps
            if not (near_other or near_tau):
                return False
    return True


def compare(config, device, B=3, plr=True, training=True, seeds=(0, 1, 2, 3, 4), **kw):
    """Forward + backward on CPU and GPU; for MoE, tries seeds until the routing has no near
    tie (a flip on a tie is not an error; any other mask difference is)."""
    for seed in seeds:
        m, g = pair(config, device, seed=seed, **kw)
        x, t, y, target = batch(B, seed + 1)
        if not training:   # set the thresholds with one training forward first
            m.forward(x, t, y)
            g.forward(x, t, y)
            g.thresholds = m.thresholds
            m.eval()
            g.eval()
            x, t, y, target = batch(B, seed + 11)   # other inputs: no score equals tau
        out_c = m.forward(x, t, y, plr_target=target if plr else None)
        out_g = g.forward(x, t, y, plr_target=target if plr else None)
        if m.config.is_moe:
            cm = m.routing_masks()
            gm = g.routing_masks()
            if not all(np.array_equal(a, b) for a, b in zip(cm, gm)):
                assert near_tie_flips(g, cm), f"seed {seed}: masks differ away from any tie"
                continue
        close(out_g, out_c, "out", device=device)
        dout = np.random.default_rng(seed + 2).normal(size=out_c.shape).astype(np.float32)
        m.zero_grad()
        m.backward(dout)
        g.zero_grad()
        g.backward(dout)
        gg = g.grads
        assert set(gg) == set(m.grads)
        for name, want in m.grads.items():
            close(gg[name], want, name, device=device)
        return m, g
    pytest.fail(f"every seed of {seeds} met a routing near tie")


# ---- another device vs the CPU ---------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_dense_matches_cpu(device, learn_sigma):
    compare("DiT-T/2", device, learn_sigma=learn_sigma)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("routing", ["race", "token", "expert", "bl", "le"])
def test_moe_matches_cpu(device, routing):
    m, g = compare("RaceDiT-T/2-2in4", device, routing=routing)
    got, want = g.aux(), m.aux()
    for k in ("plr", "sim", "balance"):
        if np.isnan(want[k]):
            assert np.isnan(got[k]), k
        else:
            assert got[k] == pytest.approx(want[k], rel=1e-3, abs=1e-6), k
    assert g.aux_loss() == pytest.approx(m.aux_loss(), rel=1e-3, abs=1e-7)
    for a, b in zip(g.layer_stats(), m.layer_stats()):
        np.testing.assert_array_equal(a["load"], b["load"])
        assert a["dead_experts"] == b["dead_experts"]
        assert a["experts_per_token"] == pytest.approx(b["experts_per_token"])
        assert a["tau_b"] == pytest.approx(b["tau_b"], rel=1e-4, abs=1e-6, nan_ok=True)
    close(g.thresholds, m.thresholds, "tau", rtol=1e-4, atol=1e-6, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gating", ["sigmoid", "softmax"])
def test_moe_gatings_match_cpu(device, gating):
    compare("RaceDiT-T/2-2in4", device, gating=gating, balance_weight=0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_moe_k1_learn_sigma_and_eval_mode(device):
    compare("RaceDiT-T/2-1in4", device, learn_sigma=True)
    compare("RaceDiT-T/2-2in4", device, training=False, plr=False)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_run_to_run(device):
    m, g = pair("RaceDiT-T/2-2in4", device, seed=5)
    x, t, y, target = batch(4, 6)
    outs, grads = [], []
    for _ in range(2):
        g.thresholds = [np.nan] * g.num_moe_layers
        outs.append(g.forward(x, t, y, plr_target=target))
        g.zero_grad()
        g.backward(np.ones_like(outs[-1]))
        grads.append(g.grad_buffer)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(grads[0], grads[1])


# ---- the device training step -------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", ["DiT-T/2", "RaceDiT-T/2-2in4"])
def test_training_loop_matches_cpu(device, config):
    """20 steps, same data, noise and label dropout: the device step against the CPU model +
    racedit.optim (AdamW, gradient clipping at norm 1, as the trainer). The curves agree
    within 2 % per step (float32 rounding, and for MoE the
    odd routing flip on a near tie, perturb the trajectories slightly), and both learn."""
    kw = dict(class_dropout_prob=0.1, seed=3)
    m = RaceDiT(config, input_size=S, in_channels=C, num_classes=NCLS, **kw)
    g = RaceDiT(config, input_size=S, in_channels=C, num_classes=NCLS, device=device, **kw)
    np.testing.assert_array_equal(g.param_buffer, m.param_buffer)   # the same initialisation
    n = m.param_buffer.size
    am, av = np.zeros(n, np.float32), np.zeros(n, np.float32)
    lr, B = 1e-3, 8
    lc, lg = [], []
    for step in range(20):
        x, t, y, target = batch(B, 100 + step % 4)
        out = m.forward(x, t, y, plr_target=target)
        n = target.size
        diff = out[:, :C] - target
        lc.append(float(np.mean(diff.astype(np.float64) ** 2)))
        dout = np.zeros_like(out)
        dout[:, :C] = 2.0 * diff / n
        m.zero_grad()
        m.backward(dout)
        gn = optim.grad_norm(m.grad_buffer)
        optim.adamw_step(m.param_buffer, m.grad_buffer, am, av, lr=lr, step=step + 1,
                         grad_scale=optim.clip_scale(gn, 1.0))
        r = g.step(x, t, y, target, lr=lr, max_grad_norm=1.0, ema_decay=None)
        assert r["grad_norm"] == pytest.approx(gn, rel=2e-2)
        lg.append(r["loss"])
        assert r["step"] == step + 1
        if m.config.is_moe:
            assert r["aux_loss"] == pytest.approx(m.aux_loss(), rel=5e-2, abs=1e-5)
    lc, lg = np.array(lc), np.array(lg)
    print("loss cpu", np.round(lc, 5), "gpu", np.round(lg, 5))
    assert lg[0] == pytest.approx(lc[0], rel=1e-5)
    np.testing.assert_allclose(lg, lc, rtol=2e-2)
    assert lg[-4:].mean() < lg[:4].mean() and lc[-4:].mean() < lc[:4].mean()


@pytest.mark.parametrize("device", DEVICES)
def test_step_clip_ema_and_grads(device):
    m, g = pair("RaceDiT-T/2-2in4", device, seed=7)
    x, t, y, target = batch(4, 8)
    p0 = g.param_buffer
    r = g.step(x, t, y, target, lr=1e-3, max_grad_norm=1e-3, ema_decay=0.5)
    grads = g.grad_buffer
    assert r["grad_norm"] == pytest.approx(np.linalg.norm(grads.astype(np.float64)), rel=1e-4)
    assert r["grad_norm"] > 1e-3          # clipped: the first Adam step moves by ~lr anyway
    p1 = g.param_buffer
    np.testing.assert_allclose(g.ema_buffer, 0.5 * p0 + 0.5 * p1, rtol=1e-6, atol=1e-7)
    # the step's gradients are those of forward + backward with the MSE's dout
    g.set_param_buffer(p0)
    g.thresholds = [np.nan] * g.num_moe_layers
    out = g.forward(x, t, y, plr_target=target)
    g.zero_grad()
    g.backward(2.0 * (out - target) / target.size)
    close(g.grad_buffer, grads, "grads", rtol=1e-5, atol=1e-6)
    st = g.optimizer_state()
    assert st["step"] == 1 and np.abs(st["m"]).max() > 0
    # optimizer_step on these gradients from the same start repeats the step's update
    h = RaceDiT("RaceDiT-T/2-2in4", input_size=S, in_channels=C, num_classes=NCLS,
                class_dropout_prob=0.0, device=device)
    h.set_param_buffer(p0, ema=True)
    h.thresholds = [np.nan] * h.num_moe_layers
    h.forward(x, t, y, plr_target=target)
    h.zero_grad()
    h.backward(2.0 * (out - target) / target.size)
    r2 = h.optimizer_step(lr=1e-3, max_grad_norm=1e-3, ema_decay=0.5)
    assert r2["step"] == 1 and r2["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5)
    close(h.param_buffer, p1, "params after optimizer_step", rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_diagnostics_copy_only_what_they_need(device):
    """What a device MoE block's last forward left comes back by name (the mask, the counts,
    the pairs of each block agree with each other); layer_stats, routing_masks and
    experts_per_token_by_sample agree with the CPU model."""
    m, g = pair("RaceDiT-T/2-2in4", device, seed=3)
    x, t, y, _ = batch(3, 4)
    m.forward(x, t, y)
    g.forward(x, t, y)
    for layer, mask in enumerate(g.routing_masks()):
        get = lambda name: racedit._C.model_moe_get(g._model, layer, name)  # noqa: E731
        np.testing.assert_array_equal(get("mask"), mask)
        np.testing.assert_array_equal(get("counts"), mask.sum(axis=(0, 1)))
        np.testing.assert_array_equal(get("sample_pairs"), mask.sum(axis=(1, 2)))
        assert get("sample_pairs").dtype == np.int64 and get("pairs") == int(mask.sum())
    with pytest.raises(ValueError, match="name"):
        racedit._C.model_moe_get(g._model, 0, "arrays")
    if all(np.array_equal(a, b) for a, b in zip(m.routing_masks(), g.routing_masks())):
        np.testing.assert_allclose(g.experts_per_token_by_sample(),
                                   m.experts_per_token_by_sample(), rtol=1e-12)
        for a, b in zip(g.layer_stats(), m.layer_stats()):
            assert a["dead_experts"] == b["dead_experts"]
            np.testing.assert_allclose(a["experts_per_token"], b["experts_per_token"], rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", ["DiT-T/2", "RaceDiT-T/2-2in4"])
def test_branch_norms_match_cpu(device, config):
    """The per-block norms of the gated attention / FFN outputs (computed on the device,
    2*depth doubles back) equal the CPU model's on the same weights and inputs; zero at
    the adaLN-Zero initialisation; RuntimeError before a forward."""
    fresh = RaceDiT(config, input_size=S, in_channels=C, num_classes=NCLS, device=device)
    with pytest.raises(RuntimeError, match="no forward"):
        fresh.branch_norms()
    x, t, y, _ = batch(3, 2)
    fresh.forward(x, t, y)
    assert not fresh.branch_norms()["ffn"].any()
    for seed in range(6, 12):  # a seed without a near-tied routing choice (one would flip)
        m, g = pair(config, device, seed=seed)
        m.forward(x, t, y)
        g.forward(x, t, y)
        if all(np.array_equal(p, q) for p, q in zip(m.routing_masks(), g.routing_masks())):
            break
    else:
        pytest.fail("every seed flipped a routing choice")
    a, b = g.branch_norms(), m.branch_norms()
    for key in ("attn", "ffn"):
        assert (b[key] > 0).all()
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, err_msg=key)


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip_and_layout(device):
    m, g = pair("DiT-T/2", device, seed=4)
    np.testing.assert_array_equal(g.param_buffer, m.param_buffer)
    assert [k for k in g.params] == [k for k in m.params]
    h = RaceDiT("DiT-T/2", input_size=S, in_channels=C, num_classes=NCLS, device=device)
    h.load_state_dict(m.state_dict())
    np.testing.assert_array_equal(h.param_buffer, m.param_buffer)
    h2 = RaceDiT("DiT-T/2", input_size=S, in_channels=C, num_classes=NCLS, device=device)
    h2.load_dit_state_dict(m.state_dict())
    np.testing.assert_array_equal(h2.ema_buffer, m.param_buffer)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    g = RaceDiT("RaceDiT-T/2-2in4", input_size=S, in_channels=C, num_classes=NCLS, device=device,
                max_batch=4)
    x, t, y, target = batch(3)
    with pytest.raises(RuntimeError, match="before forward"):
        g.backward(np.zeros((3, C, S, S), np.float32))
    with pytest.raises(ValueError, match="y"):
        g.forward(x, t, np.array([0, 1, NCLS + 1]))
    with pytest.raises(ValueError, match="t"):
        g.forward(x, np.array([0, 1, 1001], np.float32), y)
    with pytest.raises(ValueError, match="t"):
        g.forward(x, np.array([0, np.nan, 1], np.float32), y)
    with pytest.raises(ValueError, match="x"):
        g.forward(x[:, :2], t, y)
    with pytest.raises(ValueError, match="max_batch"):
        xb, tb, yb, _ = batch(5)
        g.forward(xb, tb, yb)
    bad = target.copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        g.step(x, t, y, bad)
    with pytest.raises(ValueError, match="target"):
        g.step(x, t, y, target[:2])
    with pytest.raises(ValueError, match="values"):
        g.set_param_buffer(np.zeros(3, np.float32))
    out = g.forward(x, t, y)
    with pytest.raises(ValueError, match="dout"):
        g.backward(out[:2])
    assert np.isfinite(out).all()


@pytest.mark.parametrize("device", DEVICES)
def test_resume_from_saved_state_is_bitwise(device):
    """Parameters, EMA, AdamW moments and step, and thresholds saved from one model and
    loaded into another: the next step gives identical results on both."""
    kw = dict(input_size=S, in_channels=C, num_classes=NCLS, class_dropout_prob=0.0,
              device=device)
    a = RaceDiT("RaceDiT-T/2-2in4", seed=1, **kw)
    b = RaceDiT("RaceDiT-T/2-2in4", seed=2, **kw)
    for s in range(2):
        x, t, y, target = batch(4, 20 + s)
        a.step(x, t, y, target, lr=1e-3)
    b.set_param_buffer(a.param_buffer)
    b.set_ema_buffer(a.ema_buffer)
    b.load_optimizer_state(a.optimizer_state())
    b.thresholds = a.thresholds
    x, t, y, target = batch(4, 30)
    ra, rb = a.step(x, t, y, target, lr=1e-3), b.step(x, t, y, target, lr=1e-3)
    assert ra["loss"] == rb["loss"] and ra["step"] == rb["step"] == 3
    np.testing.assert_array_equal(a.param_buffer, b.param_buffer)
    np.testing.assert_array_equal(a.ema_buffer, b.ema_buffer)
    if exact(device):                 # the CPU kernels compute in fp32 only
        with pytest.raises(ValueError, match="fp32 only"):
            a.set_dtype("bf16")
    else:
        a.set_dtype("bf16")
        assert a.dtype == "bf16"
    with pytest.raises(ValueError, match="dtype"):
        a.set_dtype("fp16")


def _host_view(buf):
    """A NumPy view of a DeviceArray of the checking backend (whose memory the host can
    read): what a CUDA consumer of __cuda_array_interface__ would get on the GPU."""
    import ctypes
    return np.ctypeslib.as_array((ctypes.c_float * len(buf)).from_address(buf.ptr))


@pytest.mark.parametrize("device", on("cpu", "check", "cuda"))
def test_device_buffer_shares_the_model_memory(device):
    """device_buffer(which): the live view on the CPU; elsewhere a DeviceArray at the
    buffer's address (no copy): what is written through it, the model computes with, and
    it keeps the model alive."""
    m, _ = pair("RaceDiT-T/2-2in4", "cpu", seed=5)
    g = RaceDiT("RaceDiT-T/2-2in4", input_size=S, in_channels=C, num_classes=NCLS,
                device=device, class_dropout_prob=0.0)
    x, t, y, _ = batch(3)
    with pytest.raises(ValueError, match="which: expected one of 'params'.*got 'weights'"):
        g.device_buffer("weights")
    buf = g.device_buffer("params")
    if device == "cpu":
        assert isinstance(buf, np.ndarray) and np.shares_memory(buf, g.param_buffer)
        assert racedit._C.model_buffer(g._model, 0, True) == buf.ctypes.data
        buf[:] = m.param_buffer
    else:
        assert isinstance(buf, racedit.DeviceArray)
        assert len(buf) == g.num_params() and buf.nbytes == 4 * g.num_params()
        iface = buf.interface
        assert iface == {"shape": (g.num_params(),), "typestr": "<f4",
                         "data": (buf.ptr, False), "strides": None, "version": 3, "stream": 1}
        assert hasattr(buf, "__cuda_array_interface__") == (device == "cuda")
        ptrs = {g.device_buffer(w).ptr for w in ("params", "grads", "adam_m", "adam_v", "ema")}
        assert len(ptrs) == 5 and buf.ptr in ptrs
        if device == "check":
            _host_view(buf)[:] = m.param_buffer
        else:
            torch = pytest.importorskip("torch")
            if not torch.cuda.is_available():
                pytest.skip("torch without CUDA")
            view = torch.as_tensor(buf, device="cuda")
            assert view.data_ptr() == buf.ptr
            view.copy_(torch.from_numpy(m.param_buffer).cuda())
    np.testing.assert_array_equal(g.param_buffer, m.param_buffer)
    close(g.forward(x, t, y), m.forward(x, t, y), "out", device=device)
    if device == "check":
        del g
        import gc
        gc.collect()
        np.testing.assert_array_equal(_host_view(buf), m.param_buffer)   # the model lives on
