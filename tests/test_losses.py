import pytest
import torch

from labelling import registry
from labelling.losses import WeightedSum

ARGS = {"sum": {"terms": [{"name": "mse", "weight": 1.0}, {"name": "gradient", "weight": 0.5}]}}


def _inputs(binary: bool):
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 2, 17, 23, generator=g)
    if binary:
        target = (target > 0.5).float()
    return target


@pytest.mark.parametrize("name", registry.names("loss"))
def test_loss_finite_minimal_at_target_and_differentiable(name):
    loss = registry.build("loss", name, **ARGS.get(name, {}))
    binary = getattr(loss, "activation", None) == "sigmoid"
    target = _inputs(binary)
    # "prediction equals target": for logit losses, logits that map onto the target
    perfect = (target * 2 - 1) * 12 if binary else target.clone()
    noisy = (perfect + torch.randn_like(perfect) * 0.5).requires_grad_(True)
    l_perfect, l_noisy = loss(perfect, target), loss(noisy, target)
    assert torch.isfinite(l_perfect) and torch.isfinite(l_noisy)
    assert l_perfect.item() < l_noisy.item()
    if not binary:
        assert l_perfect.item() == pytest.approx(0.0, abs=1e-5)
    l_noisy.backward()
    assert noisy.grad is not None and torch.isfinite(noisy.grad).all() and noisy.grad.abs().sum() > 0


def test_pearson_is_gain_and_offset_invariant():
    loss = registry.build("loss", "pearson")
    t = _inputs(False)
    assert loss(3 * t + 5, t).item() == pytest.approx(0.0, abs=1e-5)
    assert loss(-t, t).item() == pytest.approx(2.0, abs=1e-4)


def test_asymmetric_punishes_under_prediction_more():
    loss = registry.build("loss", "asymmetric", under_weight=4.0)
    t = torch.ones(1, 1, 4, 4)
    under, over = loss(t - 0.5, t), loss(t + 0.5, t)
    assert under.item() == pytest.approx(4 * over.item())


def test_gradient_loss_ignores_constant_offset_but_sees_blur():
    loss = registry.build("loss", "gradient")
    t = _inputs(False)
    assert loss(t + 1.0, t).item() == pytest.approx(0.0, abs=1e-6)
    blurred = torch.nn.functional.avg_pool2d(t, 3, 1, 1)
    assert loss(blurred, t).item() > 0.05


def test_weighted_sum_matches_manual_sum():
    s = WeightedSum([{"name": "mse", "weight": 2.0}, {"name": "asymmetric", "weight": 0.5, "under_weight": 3}])
    p, t = torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)
    manual = 2.0 * registry.build("loss", "mse")(p, t) + 0.5 * registry.build("loss", "asymmetric", under_weight=3)(p, t)
    assert s(p, t).item() == pytest.approx(manual.item(), rel=1e-6)


def test_weighted_sum_refuses_mixed_activations():
    with pytest.raises(ValueError, match="mixes"):
        WeightedSum([{"name": "bce"}, {"name": "mse"}])
