import numpy as np
import pytest
import torch

from labelling import registry
from labelling.contracts import loss_problems
from labelling.losses import WeightedSum
from tests.conftest import deployed_task

ARGS = {"sum": {"terms": [{"name": "mse", "weight": 1.0}, {"name": "gradient", "weight": 0.5}]},
        "per_channel": {"terms": [{"name": "mse", "weight": 1.0}, {"name": "asymmetric", "weight": 2.0}]}}


def _inputs(binary: bool):
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 2, 17, 23, generator=g)
    if binary:
        target = (target > 0.5).float()
    return target


@pytest.mark.parametrize("name", registry.names("loss"))
def test_loss_finite_minimal_at_target_and_differentiable(name):
    loss = registry.build("loss", name, **ARGS.get(name, {}))
    assert loss_problems(loss) == []  # the declared contract prediction and calibration read
    binary = loss.activation == "sigmoid"
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


def test_pooled_pearson_weighs_background_crops_by_their_variance():
    """A crop of faint background noise must not count as much as a crop holding the stain (pooled r)."""
    g = torch.Generator().manual_seed(1)
    cell = torch.zeros(1, 1, 16, 16)
    cell[..., 4:12, 4:12] = 10.0
    noise_t, noise_p = (torch.randn(1, 1, 16, 16, generator=g) * 0.01 for _ in range(2))
    target, pred = torch.cat([cell, noise_t]), torch.cat([cell, noise_p])  # the noise is not reproduced
    per_crop = registry.build("loss", "pearson", pooled=False)(pred, target).item()
    pooled = registry.build("loss", "pearson")(pred, target).item()
    assert per_crop == pytest.approx(0.5, abs=0.3)  # half the batch is an uncorrelated crop
    assert pooled < 1e-3
    flat = 1 - torch.corrcoef(torch.stack([pred.flatten(), target.flatten()]))[0, 1]
    assert pooled == pytest.approx(flat.item(), abs=1e-5)


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


def _spots(n: int = 4, size: int = 48, seed: int = 0) -> torch.Tensor:
    """Sparse bright blobs on a dim background (a nuclear stain)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    img = torch.zeros(n, 1, size, size)
    for i in range(n):
        for cy, cx in torch.randint(6, size - 6, (3, 2), generator=g).tolist():
            img[i, 0] += torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
    return img + 0.02 * torch.rand(n, 1, size, size, generator=g)


def test_otsu_threshold_separates_foreground_from_background():
    from labelling.losses.structure import otsu_threshold

    target = _spots()
    thr = otsu_threshold(target)
    assert thr.shape == (4, 1, 1, 1)
    frac = (target > thr).float().mean().item()
    assert 0.01 < frac < 0.3  # the blobs, not the background and not everything


def test_spotlight_loss_punishes_a_missed_blob_more_than_mse_does():
    target = _spots()
    blank = torch.full_like(target, target.mean().item())  # the dim, blurred field plain MSE tolerates
    spot, mse = registry.build("loss", "spotlight"), registry.build("loss", "mse")
    # relative to an error of the same MSE spread over the background, missing the blobs costs more
    background_error = target + (blank - target).pow(2).mean().sqrt() * torch.sign(torch.randn_like(target))
    assert mse(blank, target).item() == pytest.approx(mse(background_error, target).item(), rel=0.05)
    assert spot(blank, target).item() > 2 * spot(background_error, target).item()


def test_ms_ssim_is_one_at_the_target_and_drops_with_blur_and_noise():
    from torch.nn import functional

    from labelling.losses.structure import ms_ssim

    target = _spots()
    assert torch.allclose(ms_ssim(target, target), torch.ones(4, 1), atol=1e-5)
    blurred = functional.avg_pool2d(target, 5, 1, 2)
    noisy = target + 0.2 * torch.randn_like(target)
    assert (ms_ssim(blurred, target) < 0.99).all() and (ms_ssim(noisy, target) < ms_ssim(blurred, target)).all()
    assert ms_ssim(target[..., :9, :9], target[..., :9, :9]).shape == (4, 1)  # too small for 3 scales: fewer


@pytest.mark.parametrize(("name", "args"), [("spotlight", {"softness": 0}), ("spotlight", {"dice_weight": -1}),
                                            ("msssim", {"alpha": 2}), ("msssim", {"pixel": "huber"})])
def test_structure_losses_refuse_bad_arguments(name, args):
    with pytest.raises(Exception, match=next(iter(args))):
        registry.build("loss", name, **args)


def test_a_multi_target_model_logs_one_pcc_per_named_channel():
    from labelling.nets.unet import UNet
    from labelling.tasks.stainer import Stainer

    task = Stainer(net=UNet(1, 2, depth=2, width=4), loss=registry.build("loss", "mse"))
    task = deployed_task(task.net, targets=["nuclei", "er"])
    logged = {}
    task.log_dict = lambda values, **kw: logged.update(values)
    task.log = lambda name, value, **kw: logged.update({name: value})
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        pred = task.activate(task(x))
    # channel 0's target follows the prediction, channel 1's is its negative plus noise: r near +1 and near -1
    target = torch.stack([pred[:, 0] * 3 + 1, -pred[:, 1] + 0.01 * torch.rand(2, 32, 32)], 1)
    task._evaluate({"input": x, "target": target}, "val")
    task.on_validation_epoch_end()
    assert {"val/pcc/nuclei", "val/pcc/er", "val/pcc"} <= logged.keys()
    for c, name in enumerate(("nuclei", "er")):
        expected = np.corrcoef(pred[:, c].flatten().numpy(), target[:, c].flatten().numpy())[0, 1]
        assert float(logged[f"val/pcc/{name}"]) == pytest.approx(expected, abs=1e-4)
    assert float(logged["val/pcc/nuclei"]) > 0.99 and float(logged["val/pcc/er"]) < -0.9


def test_val_pcc_is_the_pearson_r_of_all_validation_pixels_pooled_over_batches():
    """val/pcc correlates every pixel of the epoch at once; a near-empty crop weighs by its own variance."""
    from labelling.nets.unet import UNet
    from labelling.tasks.stainer import Stainer

    task = Stainer(net=UNet(1, 1, depth=2, width=4), loss=registry.build("loss", "mse"))
    logged = {}
    task.log_dict = lambda values, **kw: None
    task.log = lambda name, value, **kw: logged.update({name: float(value)})
    g = torch.Generator().manual_seed(3)
    batches = [{"input": torch.rand(3, 1, 16, 16, generator=g), "target": torch.rand(3, 1, 16, 16, generator=g) * k}
               for k in (1.0, 0.01)]  # the second batch is faint: it must barely move the pooled r
    preds = []
    for batch in batches:
        task._evaluate(batch, "val")
        preds.append(task.predict(batch["input"]))
    task.on_validation_epoch_end()
    p = torch.cat([x.flatten() for x in preds])
    t = torch.cat([b["target"].flatten() for b in batches])
    assert logged["val/pcc"] == pytest.approx(torch.corrcoef(torch.stack([p, t]))[0, 1].item(), abs=1e-4)
    task.on_validation_epoch_end()  # reset after logging: a second epoch starts from nothing
    assert logged["val/pcc"] == pytest.approx(torch.corrcoef(torch.stack([p, t]))[0, 1].item(), abs=1e-4)


def test_per_channel_loss_applies_each_term_to_its_channel():
    loss = registry.build("loss", "per_channel", terms=[{"name": "mse", "weight": 1.0},
                                                        {"name": "asymmetric", "weight": 3.0, "under_weight": 4.0}])
    target = torch.zeros(2, 2, 8, 8)
    pred = target.clone()
    pred[:, 1] -= 1.0  # under-predict channel 1 only: the asymmetric loss counts it 4x, weighted 3 of 4
    assert loss(pred, target).item() == pytest.approx(3.0 * 4.0 / 4.0)
    with pytest.raises(ValueError, match="2 terms for 3 output channels"):
        loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="mixes"):
        registry.build("loss", "per_channel", terms=[{"name": "mse"}, {"name": "bce"}])


class _Identity(torch.nn.Module):
    """A 'net' whose output is its input, so a test decides exactly what the model predicts."""

    in_channels, out_channels, spatial_multiple, spatial_dims = 1, 1, 1, 2

    def forward(self, x, return_embedding=False):
        return (x, x.mean((2, 3))) if return_embedding else x


def _logged_metrics(loss_name: str, train_pred, val_pred, target) -> dict:
    from labelling.tasks.stainer import Stainer

    task = Stainer(_Identity(), registry.build("loss", loss_name), channels_last=False)
    logged = {}
    task.log_dict = lambda values, **kw: logged.update({k: float(v) for k, v in values.items()})
    task.log = lambda name, value, **kw: logged.update({name: float(value)})
    task.track_training(task.activate(train_pred) if task.loss.scale_free else None, target)  # what training saw
    task._evaluate({"input": val_pred, "target": target}, "val")
    return logged


@pytest.mark.parametrize("loss_name", ["pearson", "mse"])
def test_a_better_correlated_prediction_never_gets_a_worse_logged_mse_or_ssim(loss_name):
    """val/mse_normalized and val/ssim score the output as deployed: for a scale-free loss its raw output has
    no units (here 100x too small plus an offset), so they are taken after the training-batch calibration."""
    g = torch.Generator().manual_seed(0)
    target = torch.nn.functional.avg_pool2d(torch.rand(4, 1, 32, 32, generator=g), 3, 1, 1)
    noise = torch.randn(4, 1, 32, 32, generator=g) * target.std()
    scale, offset = (0.01, 5.0) if loss_name == "pearson" else (1.0, 0.0)
    good = (target + 0.2 * noise) * scale + offset   # better correlated
    bad = (target + 1.0 * noise) * scale + offset
    m_good, m_bad = (_logged_metrics(loss_name, p, p, target) for p in (good, bad))
    assert m_good["val/mse_normalized"] < m_bad["val/mse_normalized"]
    assert m_good["val/ssim"] > m_bad["val/ssim"]
    assert m_good["val/ssim"] > 0.1  # not ~0 from comparing uncalibrated output with the targets
