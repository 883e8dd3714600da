"""Numbers a scientist can trust: evaluation takes the deployed path and nothing from the evaluated image."""

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch

from labelling import studies
from labelling.analysis import downstream
from labelling.data.datamodule import FluorescenceDataModule
from labelling.data.normalization import denormalize
from labelling.inference import predict
from labelling.inference.load import load_task
from labelling.losses.basic import MSELoss
from labelling.runs.train import attach_deployment, calibration_fields, calibration_pixels, calibration_windows, fit
from labelling.tasks.stainer import Stainer


class BlindNet(torch.nn.Module):
    """Ignores its input: the same (normalized) map for every image."""

    in_channels, out_channels, spatial_multiple, spatial_dims = 1, 1, 1, 2

    def __init__(self, pattern: np.ndarray):
        super().__init__()
        self.register_buffer("pattern", torch.from_numpy(pattern.astype(np.float32)))

    def forward(self, x, return_embedding=False):
        out = self.pattern[None, None, : x.shape[2], : x.shape[3]].expand(len(x), 1, -1, -1).clone()
        return (out, x.mean((2, 3))) if return_embedding else out


@pytest.fixture(scope="module")
def plate():
    dm = FluorescenceDataModule(n_wells=16, fields_per_well=3, field_size=128)
    dm.setup()
    return dm


def test_a_blind_model_scores_nothing_but_the_old_leaky_evaluation_gave_it_a_high_r(plate):
    pattern = plate.splits["train"][0].target[0]  # a realistic-looking map, the same for every image
    task = Stainer(BlindNet(pattern), MSELoss()).eval()
    attach_deployment(plate, task)
    images = plate.splits["test"]
    real, pred = studies.predict_pairs(task, images)
    _, corr = downstream.evaluate_pairs(real, pred, seed=0)
    honest = corr.set_index("metric")
    assert abs(honest.loc["mean_intensity", "pearson"]) < 0.3 and abs(honest.loc["total_intensity", "pearson"]) < 0.3
    # the bug this guards against: de-normalizing with each test image's own target statistics
    leaky = [denormalize(task.predict(torch.from_numpy(im.input[None]))[0].numpy(), im.target_stats)[0]
             for im in images]
    _, corr_leaky = downstream.evaluate_pairs(real, leaky, seed=0)
    assert corr_leaky.set_index("metric").loc["mean_intensity", "pearson"] > 0.5


def test_a_prediction_never_depends_on_the_evaluated_target(plate):
    torch.manual_seed(0)
    from labelling.nets.unet import UNet

    task = Stainer(UNet(1, 1, depth=2, width=4), MSELoss()).eval()
    attach_deployment(plate, task)
    images = [copy.copy(im) for im in plate.splits["test"][:3]]
    real_before, before = studies.predict_pairs(task, images)
    for im in images:  # the same pixels as a target 5x brighter plus 100: other statistics, other units
        im.target_stats = im.target_stats * np.array([[1.0, 5.0]], np.float32) + np.array([[100.0, 0.0]], np.float32)
    real_after, after = studies.predict_pairs(task, images)
    # the evaluated targets did change (this is what a leaky evaluation would pick up) ...
    for r0, r1 in zip(real_before, real_after):
        assert r1.std() == pytest.approx(5 * r0.std(), rel=1e-4) and not np.allclose(r0, r1)
    # ... and the predictions did not move by a single bit
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_deployment_state_comes_from_the_training_split_only(plate):
    from labelling.nets.unet import UNet

    task = Stainer(UNet(1, 1, depth=2, width=4), MSELoss())
    attach_deployment(plate, task)
    train = plate.splits["train"]
    dep = task.deployment
    assert np.allclose(dep.target_stats, np.mean([im.target_stats for im in train], 0))
    assert np.allclose(dep.null_level, np.mean([im.raw_target().mean((1, 2)) for im in train], 0))
    test_stats = np.mean([im.target_stats for im in plate.splits["test"]], 0)
    assert not np.allclose(dep.target_stats, test_stats)  # would pass with any split's statistics otherwise
    assert dep.normalize == "percentile" and dep.targets == ["nuclei"] and dep.version >= 2


def test_pearson_run_is_calibrated_on_training_fields_and_evaluate_equals_predict(tiny, tmp_path):
    from labelling.cli import main

    run = tmp_path / "pearson"
    tiny = [t for t in tiny if not t.startswith(("data.n_wells", "data.fields"))]
    fit("nuclei_pearson", tiny + ["data.n_wells=8", "data.fields_per_well=2", "trainer.max_epochs=1"], run_dir=run)
    task, cfg = load_task(run)
    assert task.deployment.denormalize == "affine"
    dm = FluorescenceDataModule(**{"seed": cfg.seed, **cfg.data.args, "organelle": "nuclei"})
    dm.setup()
    train = calibration_fields(dm.splits["train"])
    assert train[0] is dm.splits["train"][0] and train[-1] is dm.splits["train"][-1]  # spread, not the first k
    assert calibration_pixels(task) is None  # per-image normalization: whole fields, normalized as deployed
    # moment matching, checked from what a user gets: the deployed predictions of the calibration fields have the
    # pooled mean and SD of their real targets (not recomputed by the calibration function itself)
    inputs, targets = calibration_windows(dm.splits["train"], None)
    preds = np.concatenate([predict.predict(task, x).ravel() for x in inputs])
    real = np.concatenate([y.ravel() for y in targets])
    assert preds.mean() == pytest.approx(real.mean(), rel=1e-3, abs=1e-3 * float(real.std()))
    assert preds.std() == pytest.approx(real.std(), rel=1e-3)
    held_out = np.concatenate([predict.predict(task, im.raw_input()).ravel() for im in dm.splits["test"]])
    assert abs(held_out.std() / real.std() - 1) > 1e-3  # a check that could fail: other fields, other moments
    # the prediction written by `labelling predict` is the one the report scored
    im = dm.splits["test"][0]
    tifffile.imwrite(tmp_path / "field.tif", im.raw_input()[0])
    assert main(["predict", str(run), str(tmp_path / "field.tif"), "--out", str(tmp_path / "out")]) == 0
    written = tifffile.imread(tmp_path / "out" / "field_nuclei.ome.tif")
    _, scored = studies.predict_pairs(task, [im])
    assert np.allclose(written, scored[0], rtol=1e-5, atol=1e-4)
    metrics = json.loads((run / "metrics.json").read_text())
    assert abs(metrics["test/downstream/null/mean_intensity_pearson"]) < 0.3 and "test/downstream/count_ccc" in metrics


def test_calibration_fields_spread_over_the_whole_training_split():
    """The affine calibration sees every part of a split sorted by class or well, not its first fields."""
    fields = list(range(100))
    chosen = calibration_fields(fields)
    assert len(chosen) == 16 and chosen == sorted(set(chosen))
    assert chosen[0] == 0 and chosen[-1] == 99 and max(np.diff(chosen)) <= 7
    assert calibration_fields(fields[:5]) == fields[:5]


def test_calibration_predicts_aligned_windows_of_the_spread_fields_within_a_pixel_budget():
    """Large fields are cut to one window each, input and target from the same place, ~1 M pixels in all."""
    from labelling.data.datamodule import Image

    rng = np.random.default_rng(0)
    stats = np.array([[0.0, 1.0]], np.float32)
    fields = []
    for i in range(20):  # the target is the input plus 1000: any misaligned window would show
        x = rng.normal(size=(1, 600, 700)).astype(np.float32) + i
        fields.append(Image(x, x + 1000, stats, stats, f"g{i}", f"k{i}"))
    inputs, targets = calibration_windows(fields, pixels=16 * 256**2)
    assert len(inputs) == 16 and all(x.shape == (1, 256, 256) for x in inputs + targets)
    assert sum(x.size for x in inputs) == 16 * 256**2
    assert all(np.array_equal(x + 1000, y) for x, y in zip(inputs, targets))
    # windows at seeded random places: the first one is not always the top-left corner, and runs repeat
    assert not np.array_equal(inputs[0], fields[0].input[:, :256, :256])
    again, _ = calibration_windows(fields, pixels=16 * 256**2)
    assert all(np.array_equal(a, b) for a, b in zip(inputs, again))
    small, _ = calibration_windows(fields[:3], pixels=10**9)  # small fields stay whole
    assert [x.shape for x in small] == [(1, 600, 700)] * 3
    whole, _ = calibration_windows(fields, pixels=None)
    assert len(whole) == 16 and all(x.shape == (1, 600, 700) for x in whole)
    # only dataset-level input statistics normalize a window exactly as its whole field
    assert calibration_pixels(SimpleNamespace(deployment=SimpleNamespace(normalize="fixed"))) == 2**20
    assert calibration_pixels(SimpleNamespace(deployment=SimpleNamespace(normalize="zscore"))) is None
