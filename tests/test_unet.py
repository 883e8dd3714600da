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


def _tasks(**kw):
    import copy

    from labelling import registry
    from labelling.tasks.stainer import Stainer

    torch.manual_seed(0)
    net = UNet(1, 1, depth=2, width=4)
    plain = copy.deepcopy(net)  # before the first task turns `net` channels-last in place
    return (Stainer(net, registry.build("loss", "mse"), {"scheduler": None, **kw}),
            Stainer(plain, registry.build("loss", "mse"), {"scheduler": None, **kw}, channels_last=False))


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "rmsprop"])
def test_optimizers_run_fused_where_torch_can_and_step_like_the_plain_loop(name):
    """A fused kernel updates all parameters at once; the weights it gives match torch's per-tensor loop."""
    from labelling import registry
    from labelling.tasks.stainer import configure_optimizers, fused_supported

    _, task = _tasks(name=name, lr=1e-2, weight_decay=1e-3)  # the plain layout: only the kernel differs
    opt = configure_optimizers(task, task.optim)
    cls = registry.get("optim", name)
    assert bool(opt.param_groups[0].get("fused")) == fused_supported(cls, list(task.parameters()))
    if name == "rmsprop":  # no fused kernel in torch: built as before
        assert "fused" not in opt.param_groups[0]
        return
    if name in ("adamw", "adam"):
        assert opt.param_groups[0]["fused"] is True
    torch.manual_seed(0)
    plain = UNet(1, 1, depth=2, width=4)
    plain.load_state_dict(task.net.state_dict())
    ref = cls(plain.parameters(), lr=1e-2, weight_decay=1e-3)
    for model, optimizer in ((task.net, opt), (plain, ref)):
        g = torch.Generator().manual_seed(1)  # the same gradients for both: only the update rule is compared
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))
            optimizer.step()
    for a, b in zip(task.net.parameters(), plain.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    start = _tasks()[1].net  # the same seeded initial weights: the steps moved every parameter
    assert all(not torch.equal(a, b) for a, b in zip(task.net.parameters(), start.parameters()))
    assert not fused_supported(cls, [torch.zeros(2, dtype=torch.int64)])  # integer tensors: no fused kernel


def test_channels_last_changes_the_memory_layout_not_the_numbers():
    from labelling import registry
    from labelling.nets.monai_nets import MonaiUNet
    from labelling.tasks.stainer import Stainer

    fast, plain = _tasks()
    conv = next(m for m in fast.net.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    x = torch.rand(2, 1, 32, 32)
    assert fast.layout(x).is_contiguous(memory_format=torch.channels_last)
    # float rounding of another summation order (~2e-5 here); a layout mix-up would differ by O(1)
    assert torch.allclose(fast.predict(x), plain.predict(x), atol=1e-4)
    assert torch.allclose(fast.embed(x), plain.embed(x), atol=1e-4)
    plain.load_state_dict(fast.state_dict())  # checkpoints move between layouts
    assert torch.allclose(fast.predict(x), plain.predict(x), atol=1e-4)
    # training: fused SGD on channels-last weights (gradients take the weights' layout) steps like the plain
    # loop; SGD is linear in the gradient, so a layout mix-up would show at the scale of lr * gradient
    from labelling.tasks.stainer import configure_optimizers

    fast.optim.update(name="sgd", lr=0.1)
    fast_opt = configure_optimizers(fast, fast.optim)
    assert fast_opt.param_groups[0].get("fused")
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    y = torch.rand(2, 1, 32, 32)
    for task, opt in ((fast, fast_opt), (plain, plain_opt)):
        for _ in range(3):
            opt.zero_grad()
            task.loss(task(x), y).backward()
            opt.step()
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(fast.net.parameters(), plain.net.parameters()))
    stack = Stainer(MonaiUNet(3, 3, width=4, depth=1, spatial_dims=3), registry.build("loss", "mse"))
    assert not stack.channels_last  # a 3D net keeps its layout (channels-last is a 2D format)
