"""racedit.torch.RaceMoE on CPU tensors: forward and every gradient (aux losses included)
against the float64 twins of racedit.ref fed the layer's own selection, equality with
racedit.MoE given the same weights, the parameters / buffers / state_dict, train and eval
routing, zero-copy views, torch.compile and bad input. Tolerances as in test_moe.py:
rtol 1e-4, atol 1e-5 * max(1, |ref|)."""
import copy
import io
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import racedit  # noqa: E402
from racedit import ref  # noqa: E402
from racedit.torch import PARAM_NAMES, RaceMoE, from_racedit, to_racedit  # noqa: E402
import racedit.torch as rt  # noqa: E402


def assert_close(got, want, name):
    got = got.detach().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    want = np.asarray(want, np.float64)
    atol = 1e-5 * max(1.0, float(np.abs(want).max()) if want.size else 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol, err_msg=name)


def make(D=16, E=4, k=2, seed=0, **kw):
    torch.manual_seed(seed)
    m = RaceMoE(D, E, k, **kw)
    with torch.no_grad():  # non-zero biases exercise their paths
        for name in ("router_b", "gate_b", "b1", "b2") + (("plr_b",) if m.plr_dim else ()):
            getattr(m, name).normal_(0, 0.1)
    return m


def inputs(m, B=2, L=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, m.dim, generator=g).requires_grad_()


def params64(m):
    return {n: p.detach().numpy().astype(np.float64) for n, p in m.named_parameters()}


# ---- against the float64 twins -----------------------------------------------------

@pytest.mark.parametrize("strategy,gating", [("race", "identity"), ("token", "softmax"),
                                             ("bl", "sigmoid"), ("le", "identity")])
def test_forward_and_gradients_match_ref(strategy, gating):
    m = make(strategy=strategy, gating=gating)
    x = inputs(m)
    y = m(x)
    mask = m.aux["mask"].numpy()
    assert y.dtype == torch.float32 and y.shape == x.shape
    yr, cache = ref.moe_forward(x.detach().numpy(), params64(m), lambda G: mask, gating)
    assert np.array_equal(mask, ref.route(cache["G"].astype(np.float32).reshape(mask.shape),
                                          m.k, strategy))
    assert_close(y, yr, "y")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y.backward(dy)
    dxr, grads = ref.moe_backward(dy.numpy(), cache, params64(m))
    assert_close(x.grad, dxr, "dx")
    for name in PARAM_NAMES:
        assert_close(getattr(m, name).grad, grads[name], name)


@pytest.mark.parametrize("scale", [1.0, 3.0, 0.0])
def test_aux_losses_are_graph_tensors_whose_gradient_autograd_carries(scale):
    """loss = sum(y * dy) + scale * aux_loss: every gradient as the twins' with the aux
    weights times `scale`; the aux losses enter only through the tensor the user adds."""
    w = dict(sim_weight=0.05, balance_weight=0.2, plr_weight=0.7)
    m = make(plr_dim=3, **w)
    x = inputs(m)
    target = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(4))
    y = m(x, plr_target=target)
    aux = m.aux
    for name in ("sim_loss", "balance_loss", "plr_loss", "aux_loss"):
        assert isinstance(aux[name], torch.Tensor) and aux[name].requires_grad, name
    mask = aux["mask"].numpy()
    P = params64(m)
    yr, cache = ref.moe_forward(x.detach().numpy(), P, lambda G: mask, m.gating)
    vals = ref.moe_aux_forward(cache, P, target.numpy(), **w)[1]
    aux_cache = ref.moe_aux_forward(cache, P, target.numpy(), **{k: v * scale for k, v in w.items()})[2]
    for name in ("sim_loss", "balance_loss", "plr_loss"):
        assert_close(aux[name], vals[name], name)
    assert_close(m.aux_loss, sum(w[n.replace("loss", "weight")] * vals[n]
                                 for n in ("sim_loss", "balance_loss", "plr_loss")), "aux_loss")
    assert_close(aux["plr_pred"], vals["plr_pred"].reshape(2, 6, 3), "plr_pred")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    ((y * dy).sum() + scale * m.aux_loss).backward()
    dxr, grads = ref.moe_backward(dy.numpy(), cache, P)
    dxa, grads_aux = ref.moe_aux_backward(aux_cache, cache, P)
    assert_close(x.grad, dxr + dxa, "dx")
    for name, p in m.named_parameters():
        want = grads.get(name, 0.0) + grads_aux.get(name, 0.0)
        assert_close(p.grad, np.broadcast_to(want, p.shape), name)


def test_without_aux_loss_in_the_loss_no_aux_gradient():
    m = make(sim_weight=0.5, balance_weight=0.5)
    plain = make(seed=0)
    x = inputs(m)
    m(x).sum().backward()
    plain(x.detach().requires_grad_()).sum().backward()
    for name in PARAM_NAMES:
        assert torch.equal(getattr(m, name).grad, getattr(plain, name).grad), name


def test_eval_mode_skips_aux_losses_and_routes_by_threshold():
    m = make(sim_weight=0.1)
    x = inputs(m)
    assert torch.isnan(m.threshold)
    m.eval()
    m(x)  # no threshold yet: batch top-K, threshold untouched
    assert torch.isnan(m.threshold) and m.aux["sim_loss"] is None
    assert float(m.aux_loss) == 0.0 and not m.aux["training"]
    m.train()
    m(x)
    tau = float(m.threshold)
    assert tau == pytest.approx(m.aux["batch_threshold"])
    m.eval()
    with torch.no_grad():
        m(x * 0.5)
    G = ref.moe_forward((x * 0.5).detach().numpy(), params64(m), lambda G: G > 0, m.gating)[1]["G"]
    assert np.array_equal(m.aux["mask"].numpy().reshape(-1, 4), G.astype(np.float32) >= np.float32(tau))
    assert float(m.threshold) == tau  # eval forwards leave it


def test_threshold_ema_in_training():
    m = make(beta=0.5)
    x = inputs(m)
    m(x)
    t1 = float(m.threshold)
    m(x * 2)
    b = np.float32(0.5)
    want = b * np.float32(t1) + (np.float32(1) - b) * np.float32(m.aux["batch_threshold"])
    assert float(m.threshold) == pytest.approx(float(want), rel=1e-6)


# ---- racedit.MoE ------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["race", "expert", "token", "bl", "be"])
def test_equal_to_racedit_moe_given_the_same_weights(strategy):
    moe = racedit.MoE(16, 4, 2, strategy=strategy, seed=5, sim_weight=0.01, balance_weight=0.1,
                      plr_dim=2, beta=0.9)
    m = from_racedit(moe)
    rng = np.random.default_rng(0)
    for step in range(3):  # training steps: same outputs, gradients, aux and threshold
        x = rng.standard_normal((3, 4, 16)).astype(np.float32)
        t = rng.standard_normal((3, 4, 2)).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        y0 = moe.forward(x, plr_target=t)
        moe.zero_grad()
        dx0 = moe.backward(dy)
        xt = torch.from_numpy(x).requires_grad_()
        m.zero_grad()
        y1 = m(xt, plr_target=torch.from_numpy(t))
        ((y1 * torch.from_numpy(dy)).sum() + m.aux_loss).backward()
        np.testing.assert_array_equal(y1.detach().numpy(), y0)
        np.testing.assert_array_equal(m.aux["mask"].numpy(), moe.mask)
        assert_close(xt.grad, dx0, "dx")
        for name, g in moe.grads.items():
            assert_close(getattr(m, name).grad, g, name)
        assert m.aux_loss.item() == pytest.approx(moe.aux["aux_loss"], rel=1e-6)
        if moe.threshold is None:                    # token / expert: exact top-K at eval
            assert m.threshold.numel() == 0
        else:                                        # race 0-d, BL (E,), BE (L,)
            np.testing.assert_array_equal(m.threshold.numpy(),
                                          np.asarray(moe.threshold, np.float32))
        for key in ("max_violation", "combination_usage", "experts_per_token", "dead_experts"):
            assert m.aux[key] == moe.aux[key], key
        with torch.no_grad():
            for name, arr in moe.params.items():  # the same update on both
                arr -= 0.1 * moe.grads[name]
                getattr(m, name).sub_(0.1 * torch.from_numpy(moe.grads[name]))
    moe.eval(), m.eval()
    x = rng.standard_normal((2, 4, 16)).astype(np.float32)   # BE: the trained positions
    np.testing.assert_array_equal(m(torch.from_numpy(x)).detach().numpy(), moe.forward(x))
    back = to_racedit(m)
    np.testing.assert_array_equal(np.asarray(back.threshold, np.float32) if
                                  back.threshold is not None else [],
                                  np.asarray(moe.threshold, np.float32) if
                                  moe.threshold is not None else [])


def test_from_racedit_and_to_racedit_round_trip():
    moe = racedit.MoE(8, 4, 1, gating="sigmoid", hidden=12, seed=2, plr_dim=3, eval_topk=True)
    moe.threshold = 0.25
    moe.eval()
    m = from_racedit(moe)
    assert not m.training and m.eval_topk and m.hidden == 12 and float(m.threshold) == 0.25
    back = to_racedit(m)
    assert back.threshold == 0.25 and not back.training
    assert {**back._settings(), "seed": 2} == moe._settings()
    np.testing.assert_array_equal(back.param_buffer, moe.param_buffer)
    with pytest.raises(TypeError, match="moe: expected a racedit.MoE"):
        from_racedit(m)
    with pytest.raises(TypeError, match="module: expected a racedit.torch.RaceMoE"):
        to_racedit(moe)


# ---- parameters, buffers, state_dict -------------------------------------------------------

def test_parameters_named_and_shaped_like_racedit_moe():
    m = RaceMoE(16, 4, 2, plr_dim=5)
    moe = racedit.MoE(16, 4, 2, plr_dim=5)
    got = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert got == {n: a.shape for n, a in moe.params.items()}
    assert [n for n, _ in m.named_buffers()] == ["threshold"]
    assert set(m.state_dict()) == set(moe.params) | {"threshold"}
    with torch.no_grad():
        assert float(m.router_b.abs().sum()) == 0.0 and float(m.w1.abs().max()) <= (6 / 80) ** 0.5


def test_state_dict_round_trip():
    m = make(plr_dim=2)
    x = inputs(m)
    m(x)  # sets the threshold
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    other = RaceMoE(16, 4, 2, plr_dim=2)
    other.load_state_dict(torch.load(buf))
    assert float(other.threshold) == float(m.threshold)
    m.eval(), other.eval()
    assert torch.equal(m(x), other(x))
    assert torch.equal(m.aux["mask"], other.aux["mask"])


def test_parameters_are_views_of_one_flat_buffer_the_core_reads():
    m = make()
    flat = m._flat
    off = 0
    for name in PARAM_NAMES:
        p = getattr(m, name)
        assert p.data_ptr() == flat.data_ptr() + 4 * off, name
        off += p.numel()
    assert off == flat.numel()
    x = inputs(m)
    assert rt._np(x).ctypes.data == x.data_ptr()  # the staged ops read the tensor's memory
    with torch.no_grad():  # an in-place update (what an optimizer does) reaches the core
        m.w2.mul_(0.0)
        m.b2.zero_()
        assert float(m(x).abs().max()) == 0.0


def test_address_bindings_reject_bad_addresses():
    from racedit import _C
    m = make()
    st = m._state(torch.zeros(1))
    x = torch.zeros(1, 2, 16)
    with pytest.raises(RuntimeError, match="no forward"):
        _C.moe_backward_ptr(st, x.data_ptr(), m._flat.data_ptr(), x.data_ptr(), x.data_ptr(),
                            m._flat.data_ptr())
    for bad in (0, -1, "x", None):
        with pytest.raises(ValueError, match="x: expected a non-zero memory address"):
            _C.moe_forward_ptr(st, x.data_ptr(), bad, m._flat.data_ptr(), 1, 2, True)
    with pytest.raises(ValueError, match="B, L: expected >= 1"):
        _C.moe_forward_ptr(st, x.data_ptr(), x.data_ptr(), m._flat.data_ptr(), 0, 2, True)


def test_parameters_replaced_are_flattened_again():
    m = make()
    x = inputs(m)
    m(x)
    m.eval()
    want = m(x)
    other = RaceMoE(16, 4, 2)
    other.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)
    assert not other._is_flat()
    other.eval()
    assert torch.equal(other(x), want) and other._is_flat()


def test_share_memory_keeps_the_flat_buffer_shared():
    m = make().share_memory()
    assert m._is_flat() and m._flat.is_shared() and m.w1.is_shared()


def test_copies_after_a_training_forward():
    """What a training forward leaves (graph tensors in aux) must not stop a deepcopy (an
    EMA model) or pickle; the copies compute what the layer computes."""
    m = make(sim_weight=0.1)
    x = inputs(m)
    m(x).sum().backward()
    copies = [copy.deepcopy(m).to(torch.device("cpu")), pickle.loads(pickle.dumps(m))]
    assert m.aux is not None and all(c.aux is None for c in copies)
    m.eval()
    want = m(x)
    for c in copies:
        assert torch.equal(c.eval()(x), want) and c._is_flat()


def test_layer_called_twice_in_one_graph():
    """The second forward replaces the state's activations: the first backward recomputes."""
    m = make(sim_weight=0.1, plr_dim=2)
    x = inputs(m)
    t = torch.randn(2, 6, 2)
    y1 = m(x, t)
    a1 = m.aux_loss
    y2 = m(x * 2, t)
    (y1.sum() + y2.sum() + a1 + m.aux_loss).backward()
    together = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad()
    for scale in (1, 2):
        y = m(x * scale, t)
        (y.sum() + m.aux_loss).backward()
    apart = [x.grad] + [p.grad for p in m.parameters()]
    for a, b in zip(together, apart):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adamw_steps_change_the_output():
    m = make()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = inputs(m).detach()
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = m(x).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert m._is_flat() and losses[-1] < losses[0]


def test_torch_compile_runs_with_a_graph_break():
    torch._dynamo.reset()
    m = make()
    lin = torch.nn.Linear(16, 16)
    model = torch.nn.Sequential(lin, m)
    x = inputs(m).detach()
    want = model(x)
    compiled = torch.compile(model, backend="aot_eager")
    got = compiled(x)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert lin.weight.grad is not None and m.w1.grad is not None


# ---- bad input --------------------------------------------------------------------------

def test_bad_input_raises_torch_style_errors():
    m = make(plr_dim=2)
    x = inputs(m).detach()
    cases = [
        (lambda: m(x.numpy()), TypeError, "expected x to be a torch.Tensor"),
        (lambda: m(x[0]), ValueError, r"expected x of shape \(B, L, 16\), but got input of size: \[6, 16\]"),
        (lambda: m(x[..., :8]), ValueError, r"input of size: \[2, 6, 8\]"),
        (lambda: m(x.double()), TypeError, "expected x of dtype torch.float32, got torch.float64"),
        (lambda: m(x.to(torch.int32)), TypeError, "got torch.int32"),
        (lambda: m(x[:, :0]), ValueError, "B, L >= 1"),
        (lambda: m(x, torch.zeros(2, 6, 3)), ValueError, r"plr_target: expected size \[2, 6, 2\]"),
        (lambda: make()(x, torch.zeros(2, 6, 2)), ValueError, "no PLR head"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()
        with pytest.raises(RuntimeError):  # what torch modules raise
            fn()
    with pytest.raises(TypeError, match="parameter router_w must be float32"):
        copy.deepcopy(m).double()(x.double().float())
    with pytest.raises(ValueError, match="hidden"):
        RaceMoE(10, 4, 3)
    with pytest.raises(ValueError, match="strategy"):
        RaceMoE(16, 4, 2, strategy="nope")
    with pytest.raises(TypeError, match="dtype"):
        RaceMoE(16, 4, 2, dtype=torch.float64)


def test_nan_router_scores_raise():
    m = make()
    x = inputs(m).detach()
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError):
        m(x)


def test_be_threshold_buffer_takes_its_length_from_the_state():
    """BE's buffer is empty until a training forward gives it L, and a state dict of
    another module with L positions loads into a fresh one."""
    m = RaceMoE(16, 4, 2, strategy="be")
    assert m.threshold.shape == (0,)
    m(torch.randn(2, 6, 16))
    assert m.threshold.shape == (6,) and not torch.isnan(m.threshold).any()
    fresh = RaceMoE(16, 4, 2, strategy="be")
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.threshold, m.threshold)
    m.eval(), fresh.eval()
    x = torch.randn(3, 6, 16)
    assert torch.equal(m(x), fresh(x))


def test_gradients_accumulate_over_backwards_without_aliasing():
    """Two backwards without zero_grad add up (the module's kept gradient buffer is zeroed
    per backward; what autograd keeps in .grad must not be that buffer)."""
    torch.manual_seed(0)
    m = RaceMoE(16, 4, 2, strategy="race")
    xa, xb = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    alone = []
    for x in (xa, xb):
        m.zero_grad()
        m(x).square().sum().backward()
        alone.append({n: p.grad.clone() for n, p in m.named_parameters()})
    m.zero_grad()
    m(xa).square().sum().backward()
    m(xb).square().sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, alone[0][n] + alone[1][n], rtol=1e-5, atol=1e-6,
                                   msg=n)
