import pytest
import torch

from labelling.nets.unet import INITS, UNet


@pytest.mark.parametrize("size", [(33, 47), (64, 64), (17, 100), (7, 9)])
@pytest.mark.parametrize("depth", [1, 3])
def test_unet_keeps_any_size_and_returns_embedding(size, depth):
    net = UNet(in_channels=2, out_channels=3, depth=depth, width=4).eval()
    x = torch.randn(2, 2, *size)
    y, emb = net(x, return_embedding=True)
    assert y.shape == (2, 3, *size)
    assert emb.shape == (2, net.embedding_dim) and net.embedding_dim == 4 * 2**depth
    assert torch.allclose(net(x), y)


def _expected_std(init: str, fan_in: int, fan_out: int) -> float:
    """Weight standard deviation each scheme promises (conv weights, fans include the kernel area)."""
    return {"default": (1 / fan_in) ** 0.5 / 3**0.5,  # PyTorch: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))
            "kaiming": (2 / fan_out) ** 0.5,  # fan-out mode, ReLU gain
            "xavier": (2 / (fan_in + fan_out)) ** 0.5,  # uniform with bound sqrt(6/(fan_in+fan_out))
            "orthogonal": (1 / fan_in) ** 0.5}[init]  # orthonormal rows of length fan_in


@pytest.mark.parametrize("init", INITS)
def test_inits_are_deterministic_under_seed_and_differ(init):
    torch.manual_seed(0)
    a = UNet(width=16, init=init).down[1][0].weight.clone()  # Conv2d(16, 32, 3x3)
    torch.manual_seed(0)
    b = UNet(width=16, init=init).down[1][0].weight
    assert torch.equal(a, b)
    fan_in, fan_out = 16 * 9, 32 * 9
    assert b.std().item() == pytest.approx(_expected_std(init, fan_in, fan_out), rel=0.08)
    if init == "orthogonal":
        rows = b.flatten(1)
        assert torch.allclose(rows @ rows.T, torch.eye(32), atol=1e-4)
    for other in INITS:
        if other != init:
            torch.manual_seed(0)
            assert not torch.allclose(UNet(width=16, init=other).down[1][0].weight, b), (init, other)


def test_dropout_active_only_in_training():
    net = UNet(width=4, depth=2, dropout=0.5)
    x = torch.randn(1, 1, 32, 32)
    net.train()
    assert not torch.allclose(net(x), net(x))
    net.eval()
    assert torch.allclose(net(x), net(x))


def test_bad_options_fail_with_choices():
    with pytest.raises(ValueError, match="kaiming"):
        UNet(init="he")
    with pytest.raises(ValueError, match="batch"):
        UNet(norm="layer")
