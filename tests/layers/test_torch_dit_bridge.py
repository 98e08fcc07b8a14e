"""Checkpoints move both ways between RaceDiT and a torch DiT (DiT's module names,
tests/torch_dit.py) whose blocks hold racedit.torch.RaceMoE: the torch model loads
RaceDiT's state strictly and computes the same output; a trained torch state loads back."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from racedit import RaceDiT  # noqa: E402
from racedit.torch import RaceMoE, dit_state_dict_to_torch, load_torch_dit_state_dict  # noqa: E402

from torch_dit import DiT  # noqa: E402

S, C, NCLS = 8, 4, 5


def torch_dit(m):
    c = m.config
    net = DiT(S, c.patch, C, c.hidden, c.depth, c.heads, NCLS, False,
              moe=(c.num_experts, c.k, c.expert_hidden))
    for block in net.blocks:
        block.moe = RaceMoE(c.hidden, c.num_experts, c.k, hidden=c.expert_hidden,
                            plr_dim=c.patch * c.patch * C)
    return net


def racedit_dit(seed=0):
    m = RaceDiT("RaceDiT-T/2-2in4", input_size=S, in_channels=C, num_classes=NCLS, seed=seed,
                class_dropout_prob=0.0)
    rng = np.random.default_rng(seed)
    p = m.param_buffer  # random everywhere: adaLN-Zero would hide the blocks
    p[...] = rng.normal(0.0, 0.2, p.shape).astype(np.float32)
    return m


def test_torch_dit_loads_racedit_state_and_computes_the_same():
    m = racedit_dit()
    m.thresholds = np.array([-np.inf, -np.inf], np.float32)  # eval: every expert, no ties
    net = torch_dit(m)
    net.load_state_dict(dit_state_dict_to_torch(m), strict=True)
    assert float(net.blocks[1].moe.threshold) == -np.inf
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, C, S, S)).astype(np.float32)
    t, y = np.array([3, 700]), np.array([0, 4])
    m.eval(), net.eval()
    want = m.forward(x, t, y)
    with torch.no_grad():
        got = net(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_trained_torch_state_loads_back_into_racedit():
    m = racedit_dit()
    net = torch_dit(m)
    net.load_state_dict(dit_state_dict_to_torch(m))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x = torch.randn(2, C, S, S)
    net(x, torch.tensor([5, 9]), torch.tensor([1, 2])).pow(2).mean().backward()
    opt.step()  # and the training forward set each block's threshold
    other = RaceDiT("RaceDiT-T/2-2in4", input_size=S, in_channels=C, num_classes=NCLS, seed=3)
    load_torch_dit_state_dict(other, net.state_dict())
    for name, arr in other.state_dict().items():
        np.testing.assert_array_equal(arr, net.state_dict()[name].numpy(), err_msg=name)
    taus = [float(b.moe.threshold) for b in net.blocks]
    np.testing.assert_array_equal(other.thresholds, np.array(taus, np.float32))
    with pytest.raises(ValueError, match="unexpected keys"):
        load_torch_dit_state_dict(other, {**net.state_dict(), "extra": torch.zeros(1)})
