import numpy as np
import pytest
import tifffile
import torch

from labelling.inference import blend_window, predict_image, predict_tiled, tile_starts, write_ome_tiff
from labelling.nets.unet import UNet


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return UNet(1, 2, depth=2, width=8, norm="instance").eval()


def test_tiles_cover_the_image_flush():
    assert tile_starts(100, 32, 24) == [0, 24, 48, 68]
    assert tile_starts(20, 32, 24) == [0]


@pytest.mark.parametrize("blend", ["gaussian", "linear"])
def test_tiled_equals_untiled_within_tolerance(net, blend):
    x = np.random.default_rng(0).normal(size=(1, 128, 128)).astype(np.float32)
    x = torch.nn.functional.avg_pool2d(torch.from_numpy(x)[None], 3, 1, 1)[0].numpy()  # some structure
    with torch.no_grad():
        full = net(torch.from_numpy(x)[None])[0].numpy()
    tiled = predict_tiled(net, x, tile=64, overlap=0.5, blend=blend)
    assert tiled.shape == full.shape
    span = full.max() - full.min()
    assert np.abs(tiled - full).mean() < 0.01 * span
    assert np.abs(tiled - full).max() < 0.15 * span


def test_blending_hides_seams_better_than_no_blending(net):
    x = np.random.default_rng(1).normal(size=(1, 128, 128)).astype(np.float32)
    with torch.no_grad():
        full = net(torch.from_numpy(x)[None])[0].numpy()
    err_blend = np.abs(predict_tiled(net, x, tile=64, overlap=0.5, blend="gaussian") - full).mean()
    err_plain = np.abs(predict_tiled(net, x, tile=64, overlap=0.0, blend="constant") - full).mean()
    assert err_blend < err_plain


def test_window_is_positive_and_peaks_in_the_centre():
    for mode in ("gaussian", "linear"):
        w = blend_window(32, mode)
        assert w.min() > 0 and w[16, 16] == pytest.approx(w.max(), rel=0.02) and w[0, 0] < 0.1
    with pytest.raises(ValueError, match="gaussian"):
        blend_window(8, "cosine")


def test_predict_image_any_size_and_scale(net, tmp_path):
    class Task:  # the parts of a Stainer that predict_image uses
        def __init__(self):
            self.net, self.loss = net, torch.nn.MSELoss()
            self.target_stats = torch.tensor([[100.0, 50.0], [10.0, 2.0]])

        def predict(self, x):
            return self.net(x)

    img = np.random.default_rng(2).gamma(2, 100, (90, 70)).astype(np.float32)
    for scale in (0.7, 1.0, 1.3):
        y = predict_image(Task(), img, tile=32, scale=scale)
        assert y.shape == (2, 90, 70) and np.isfinite(y).all()
    y = predict_image(Task(), img, tile=32)
    raw = predict_tiled(net, (img[None] - np.percentile(img, 1)) / (np.percentile(img, 99.8) - np.percentile(img, 1)), 32)
    assert np.allclose(y[0], raw[0] * 50 + 100, atol=1e-2)  # de-normalized with the stored stats
    with pytest.raises(ValueError, match="NaN"):
        predict_image(Task(), np.full((8, 8), np.nan, np.float32))
    path = write_ome_tiff(tmp_path / "p.ome.tif", y, ["a", "b"])
    back = tifffile.imread(path)
    assert back.shape == (2, 90, 70) and np.allclose(back, y)
    assert "OME" in tifffile.TiffFile(path).ome_metadata
