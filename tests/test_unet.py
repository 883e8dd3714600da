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


@pytest.mark.parametrize("init", INITS)
def test_inits_are_deterministic_under_seed_and_differ(init):
    torch.manual_seed(0)
    a = UNet(width=4, init=init).down[0][0].weight.clone()
    torch.manual_seed(0)
    b = UNet(width=4, init=init).down[0][0].weight
    assert torch.equal(a, b)
    if init == "xavier":
        torch.manual_seed(0)
        k = UNet(width=4, init="kaiming").down[0][0].weight
        assert not torch.allclose(k, b)


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
