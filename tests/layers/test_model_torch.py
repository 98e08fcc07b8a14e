"""A PyTorch DiT (tests/torch_dit.py, DiT's module names) exports its state dict, which
RaceDiT.load_dit_state_dict loads: outputs and every gradient must agree. Skipped when
torch is not installed."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from racedit import RaceDiT  # noqa: E402

from torch_dit import DiT  # noqa: E402

S, C, NCLS = 8, 4, 5


def build(learn_sigma, seed=0):
    torch.manual_seed(seed)
    net = DiT(S, 2, C, 32, 2, 2, NCLS, learn_sigma).double()
    with torch.no_grad():   # random everywhere: DiT's zero adaLN init would hide most of the model
        for name, p in net.named_parameters():
            if name != "pos_embed":
                p.normal_(0.0, 0.2)
    m = RaceDiT("DiT-T/2", input_size=S, in_channels=C, num_classes=NCLS,
                learn_sigma=learn_sigma, class_dropout_prob=0.0)
    m.load_dit_state_dict({k: v.detach().numpy() for k, v in net.state_dict().items()})
    return net, m


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_torch_dit_state_dict_reproduces_forward_and_grads(learn_sigma):
    net, m = build(learn_sigma)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, C, S, S)).astype(np.float32)
    t = np.array([0, 431, 999])
    y = np.array([0, 4, NCLS])
    tx = torch.tensor(x, dtype=torch.float64)
    want = net(tx, torch.tensor(t), torch.tensor(y))
    out = m.forward(x, t, y)
    assert out.shape == (3, 2 * C if learn_sigma else C, S, S)
    w = want.detach().numpy()
    np.testing.assert_allclose(out, w, rtol=0, atol=3e-4 * np.abs(w).max())
    dout = rng.normal(size=out.shape).astype(np.float32)
    (want * torch.tensor(dout, dtype=torch.float64)).sum().backward()
    m.backward(dout)
    for name, p in net.named_parameters():
        if name == "pos_embed":
            continue
        g = p.grad.numpy()
        np.testing.assert_allclose(m.grads[name], g, rtol=0, atol=3e-4 * max(np.abs(g).max(), 1e-3),
                                   err_msg=name)


def test_torch_state_dict_has_exactly_our_names():
    net, m = build(False)
    names = set(net.state_dict()) - {"pos_embed"}
    assert names == set(m.params)
    for k, v in net.state_dict().items():
        if k != "pos_embed":
            assert tuple(v.shape) == m.params[k].shape, k
