"""The one prediction path: tiling, normalization and de-normalization exactly as deployed."""

import numpy as np
import pytest
import tifffile
import torch

from labelling.data import readers
from labelling.data.normalization import image_stats, normalize
from labelling.inference import predict, tiling
from labelling.inference.model import Model
from labelling.losses.basic import MSELoss, PearsonLoss
from labelling.nets.unet import UNet
from tests.conftest import deployed_task


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return UNet(1, 2, depth=2, width=8, norm="instance").eval()


def make_task(net, loss=None, normalize="percentile"):
    return deployed_task(net, loss, normalize=normalize, targets=["nuclei", "er"],
                         target_stats=[[100.0, 50.0], [10.0, 2.0]], input_stats=[[200.0, 400.0]],
                         null_level=[120.0, 11.0])


def tiled(net, x, tile, overlap=0.25, blend="gaussian", halo=0):
    return tiling.tile_image(lambda t: net(t), x, tile=tile, overlap=overlap, blend=blend, halo=halo)


def test_tiles_cover_the_image_flush():
    assert tiling.tile_starts(100, 32, 24) == [0, 24, 48, 68]
    assert tiling.tile_starts(20, 32, 24) == [0]


@pytest.mark.parametrize("blend", ["gaussian", "linear"])
def test_tiled_equals_untiled_within_tolerance(net, blend):
    x = np.random.default_rng(0).normal(size=(1, 128, 128)).astype(np.float32)
    x = torch.nn.functional.avg_pool2d(torch.from_numpy(x)[None], 3, 1, 1)[0].numpy()  # some structure
    with torch.no_grad():
        full = net(torch.from_numpy(x)[None])[0].numpy()
    out = tiled(net, x, tile=64, overlap=0.5, blend=blend)
    assert out.shape == full.shape
    span = full.max() - full.min()
    assert np.abs(out - full).mean() < 0.01 * span
    assert np.abs(out - full).max() < 0.15 * span


def test_blending_hides_seams_better_than_plain_averaging_at_the_same_overlap(net):
    """Same tiles (overlap 0.5), only the weights differ: the centre-weighted window is closer to the whole-image
    output, and most so along the tile borders, where a plain average lets each tile's worst pixels through."""
    x = np.random.default_rng(1).normal(size=(1, 128, 128)).astype(np.float32)
    with torch.no_grad():
        full = net(torch.from_numpy(x)[None])[0].numpy()
    err_blend = np.abs(tiled(net, x, tile=64, overlap=0.5, blend="gaussian") - full)
    err_plain = np.abs(tiled(net, x, tile=64, overlap=0.5, blend="constant") - full)
    assert err_blend.mean() < err_plain.mean()
    seams = [32, 63, 64, 95]  # rows where one tile ends and/or the next begins (stride 32)
    assert err_blend[:, seams].mean() < err_plain[:, seams].mean()


def test_window_is_positive_and_peaks_in_the_centre():
    for mode in ("gaussian", "linear"):
        w = tiling.blend_window(32, mode)
        assert w.min() > 0 and w[16, 16] == pytest.approx(w.max(), rel=0.02) and w[0, 0] < 0.1
    with pytest.raises(ValueError, match="gaussian"):
        tiling.blend_window(8, "cosine")


@pytest.mark.parametrize("shape,tile,halo", [((1, 100, 70), 32, 0), ((1, 100, 70), 32, 8), ((1, 20, 90), 32, 0),
                                              ((1, 20, 13), 32, 5)])
def test_streamed_bands_equal_the_whole_image_and_each_row_is_written_once(net, shape, tile, halo):
    x = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    whole = tiled(net, x, tile, halo=halo)
    got, order = np.zeros((2, *shape[1:]), np.float32), []

    def write(top, bottom, rows):
        order.append((top, bottom))
        got[:, top:bottom] = rows

    reads = []

    def read(top, bottom):
        reads.append((top, bottom))
        assert 0 <= top < bottom <= shape[1]
        return x[:, top:bottom]

    tiling.tile_rows(lambda t: net(t), read, shape[1], shape[2], write, tile=tile, halo=halo)
    np.testing.assert_array_equal(got, whole)
    assert order[0][0] == 0 and order[-1][1] == shape[1]
    assert all(a[1] == b[0] for a, b in zip(order, order[1:]))  # contiguous, in order, no row twice
    assert max(b - a for a, b in reads) <= max(tile, 1)  # never more than one band in memory


def test_a_halo_mirrors_the_border_and_is_cropped(net):
    """With a halo the border pixels are predicted with mirrored context: output size unchanged, values differ
    at the border only."""
    x = np.random.default_rng(5).normal(size=(1, 96, 96)).astype(np.float32)
    plain, halo = tiled(net, x, 96), tiled(net, x, 96, halo=16)
    assert halo.shape == plain.shape
    border = np.zeros(plain.shape[1:], bool)
    border[:4], border[-4:], border[:, :4], border[:, -4:] = True, True, True, True
    assert np.abs(halo - plain)[:, border].mean() > 3 * np.abs(halo - plain)[:, 24:-24, 24:-24].mean()


def test_predict_normalizes_like_training_and_denormalizes_with_stored_stats(net, tmp_path):
    task = make_task(net)
    img = np.random.default_rng(2).gamma(2, 100, (90, 70)).astype(np.float32)
    for scale in (0.7, 1.0, 1.3):
        y = predict.predict(task, img, tile=32, scale=scale)
        assert y.shape == (2, 90, 70) and np.isfinite(y).all()
    y = predict.predict(task, img, tile=32)
    net_out = tiled(net, normalize(img[None], image_stats(img[None], "percentile")), 32)
    assert np.allclose(y[0], net_out[0] * 50 + 100, atol=1e-2)  # de-normalized with the stored training stats
    assert np.allclose(y[1], net_out[1] * 2 + 10, atol=1e-3)
    # fixed normalization uses the stored dataset statistics, not the image's own
    fixed = make_task(net, normalize="fixed")
    y_fixed = predict.predict(fixed, img, tile=32)
    assert np.allclose(y_fixed[0], tiled(net, (img[None] - 200) / 400, 32)[0] * 50 + 100, atol=1e-2)
    # a gain change of the raw image is cancelled by per-image normalization but reaches a fixed model
    assert np.allclose(predict.predict(task, img * 1.5, tile=32), y, atol=1e-3)
    assert not np.allclose(predict.predict(fixed, img * 1.5, tile=32), y_fixed, atol=1e-1)
    path = readers.write_ome_tiff(tmp_path / "p.ome.tif", y, ["a", "b"])
    back = tifffile.imread(path)
    assert back.shape == (2, 90, 70) and np.allclose(back, y)
    assert "OME" in tifffile.TiffFile(path).ome_metadata


def test_predict_refuses_bad_input_and_bad_output(net):
    task = make_task(net)
    with pytest.raises(ValueError, match="NaN"):
        predict.predict(task, np.full((8, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="input channel"):
        predict.predict(task, np.zeros((3, 32, 32), np.float32))
    for scale in (0, -1, 100):
        with pytest.raises(ValueError, match="scale"):
            predict.predict(task, np.ones((32, 32), np.float32), scale=scale)
    for overlap in (1.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="overlap"):
            predict.predict(task, np.ones((32, 32), np.float32), overlap=overlap)
    with pytest.raises(ValueError, match="finite with positive scales"):  # a broken state never loads
        make_task(net).deployment.model_validate({**task.deployment.to_dict(), "target_stats": [[0, float("nan")]] * 2})
    diverged = UNet(1, 2, depth=2, width=8)
    with torch.no_grad():
        for param in diverged.parameters():
            param.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN/inf values from finite input"):
        predict.predict(deployed_task(diverged), np.random.default_rng(0).random((32, 32)).astype(np.float32), tile=32)


def test_null_predictor_is_the_training_mean_whatever_the_input(net):
    """The deployment a data module writes holds the training targets' mean; the null predictor outputs it."""
    from labelling.data.datamodule import FluorescenceDataModule

    dm = FluorescenceDataModule(organelle=["nuclei", "er"], n_wells=8, fields_per_well=1, field_size=64, crop=32)
    task = deployed_task(net)
    task.deployment = dm.deployment(net, MSELoss())
    train_mean = np.mean([im.raw_target().mean((1, 2)) for im in dm.splits["train"]], 0)
    test_mean = np.mean([im.raw_target().mean((1, 2)) for im in dm.splits["test"]], 0)
    a = predict.predict_null(task, np.zeros((40, 50)))
    b = predict.predict_null(task, dm.splits["test"][0].raw_input()[:, :40, :50])
    assert a.shape == (2, 40, 50) and np.array_equal(a, b)
    np.testing.assert_allclose(a[:, 0, 0], train_mean, rtol=1e-5)
    assert not np.allclose(a[:, 0, 0], test_mean, rtol=1e-3)  # nothing of the evaluated split goes into it


def test_affine_calibration_matches_training_moments(net):
    task = make_task(net, PearsonLoss())
    rng = np.random.default_rng(3)
    raws = [rng.gamma(2, 100, (64, 64)).astype(np.float32) for _ in range(3)]
    outs = [predict.predict(task, r, denormalize=False) for r in raws]
    targets = [o * 7.0 + 300.0 for o in outs]  # targets an exact affine function of the output
    stats = predict.calibrate_affine(task, raws, targets)
    assert np.allclose(stats[:, 1], 7.0, rtol=1e-3) and np.allclose(stats[:, 0], 300.0, rtol=1e-3)


def test_composite_shows_each_channel_in_its_own_colour_on_the_reference_contrast():
    from labelling.reporting.images import PALETTE, composite

    image = np.zeros((2, 32, 32), np.float32)
    image[0, :16] = 1.0  # channel 0 in the top half, channel 1 in the bottom half
    image[1, 16:] = 1.0
    rgb = composite(image)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    assert np.allclose(rgb[4, 4] / 255, PALETTE[0], atol=0.01) and np.allclose(rgb[24, 4] / 255, PALETTE[1], atol=0.01)
    dim = composite(image * 0.5, reference=image)  # half as bright as the reference: half as bright on screen
    assert abs(int(dim[4, 4].max()) - int(rgb[4, 4].max()) // 2) <= 2


def test_predict_composite_writes_a_colour_png_per_image(tmp_path, monkeypatch):
    import tifffile
    from PIL import Image

    from labelling.build import build_task
    from labelling.cli import main
    from labelling.config import load
    from labelling.inference.model import Model

    task = build_task(load("nuclei_mse"), 1, 2).eval()
    task = deployed_task(task.net, targets=["nuclei", "er"])
    monkeypatch.setattr("labelling.inference.load.load", lambda path: Model.from_task(task))
    tifffile.imwrite(tmp_path / "field.tif", np.random.default_rng(0).random((64, 64)).astype(np.float32))
    assert main(["predict", "RUN", str(tmp_path / "field.tif"), "--out", str(tmp_path / "out"), "--composite"]) == 0
    png = np.asarray(Image.open(tmp_path / "out" / "field_nuclei+er_composite.png"))
    assert png.shape == (64, 64, 3) and png.std() > 0


def test_a_multi_target_run_scores_and_shows_each_organelle(tiny, tmp_path):
    """One model, several organelles: per-channel val/pcc/<name>, channel-named outputs, composite panels."""
    from labelling.inference.load import load
    from labelling.runs import train

    run = tmp_path / "run"
    metrics = train.fit("nuclei_mse", tiny + ["data.name=simulated", "data.organelle=[nuclei,er]",
                                              "trainer.max_epochs=1", "data.n_wells=8"], run_dir=run)
    assert {"val/pcc/nuclei", "val/pcc/er"} <= metrics.keys()
    # one downstream report per organelle, each next to its own null predictor
    assert {"test/downstream/nuclei/pixel_pearson", "test/downstream/er/pixel_pearson"} <= metrics.keys()
    assert metrics["test/downstream/nuclei/pixel_pearson"] == metrics["test/downstream/pixel_pearson"]
    assert list((run / "downstream" / "er").glob("*.html"))
    model = load(run)
    assert model.targets == ["nuclei", "er"] and model.out_channels == 2
    assert list((run / "panels").glob("*_composite.png"))


def test_wandb_keys_of_per_channel_plots_do_not_overwrite_each_other(tmp_path):
    import pandas as pd
    from PIL import Image

    from labelling.callbacks.analyses import wandb_payload

    plots = []
    for channel in ("nuclei", "er"):
        (tmp_path / channel).mkdir()
        plots.append(tmp_path / channel / "scatter_count.png")
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(plots[-1])
    plots.append(tmp_path / "summary.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(plots[-1])
    payload = wandb_payload({"agreement": pd.DataFrame({"a": [1]})}, plots, "test/downstream")
    assert {"test/downstream/nuclei/scatter_count", "test/downstream/er/scatter_count",
            "test/downstream/summary", "test/downstream/agreement"} <= payload.keys()


def test_tta_averages_the_eight_flips_and_rotations_of_each_tile(net):
    """deploy["tta"]: each tile's output is the group average over its 8 dihedral views, mapped back.

    A group average is exactly equivariant: rotating or flipping the input rotates or flips the output,
    which the plain net is not, and which a wrong back-mapping breaks.
    """
    task = make_task(net)
    x = torch.nn.functional.avg_pool2d(torch.randn(2, 1, 32, 32), 3, 1, 1)
    with torch.no_grad():
        plain = task.predict(x)
        task.deployment.tta = True
        tta = predict.tile_model(Model.from_task(task))
        averaged = tta(x)
        for k in (1, 2, 3):
            torch.testing.assert_close(tta(torch.rot90(x, k, (2, 3))), torch.rot90(averaged, k, (2, 3)))
        torch.testing.assert_close(tta(x.flip(3)), averaged.flip(3))
        torch.testing.assert_close(tta(x.flip(2)), averaged.flip(2))
        assert not torch.allclose(task.predict(torch.rot90(x, 1, (2, 3))), torch.rot90(plain, 1, (2, 3)), atol=1e-4)
    image = np.random.default_rng(1).normal(1000, 100, size=(1, 96, 80)).astype(np.float32)
    with_tta = predict.predict(task, image, tile=32)
    task.deployment.tta = False
    without = predict.predict(task, image, tile=32)
    assert with_tta.shape == without.shape and not np.allclose(with_tta, without)


def test_a_version_1_checkpoint_is_migrated_and_predicts_bit_identically(tiny, tmp_path):
    """Checkpoints written before the typed Deployment (statistics as buffers, settings as a plain dict) load
    through the one loader and give exactly the predictions of the same weights in the new layout."""
    from labelling.inference.load import check_checkpoint, load
    from labelling.runs.train import fit

    run = tmp_path / "run"
    fit("nuclei_mse", tiny + ["trainer.max_epochs=1", "callbacks=[]", "test=false", "data.normalize=fixed"],
        run_dir=run)
    ckpt_path = run / "checkpoints" / "best.ckpt"
    current = load(run)
    ckpt = check_checkpoint(ckpt_path)
    dep = ckpt["state_dict"].pop("_extra_state")
    assert dep["version"] == 2
    for key in ("input_stats", "target_stats", "null_level"):  # the version-1 layout
        ckpt["state_dict"][key] = torch.tensor(dep[key], dtype=torch.float32)
    ckpt["state_dict"]["_extra_state"] = {k: dep[k] for k in ("normalize", "denormalize", "inputs", "targets",
                                                              "target_transform", "max_size", "planes", "cascade")}
    torch.save(ckpt, ckpt_path)
    (run / "checkpoints" / "last.ckpt").unlink()
    migrated = load(run)
    assert migrated.deployment.normalize == "fixed" and migrated.deployment.version == 2
    np.testing.assert_allclose(migrated.deployment.input_stats, current.deployment.input_stats, rtol=1e-6)
    raw = np.random.default_rng(0).gamma(2, 300, (70, 90)).astype(np.float32)
    np.testing.assert_array_equal(predict.predict(migrated, raw, tile=32), predict.predict(current, raw, tile=32))
