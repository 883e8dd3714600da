from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from skimage import draw

from labelling.analysis import downstream as D
from labelling.analysis.corruptions import BLUR_RADIUS, CONTRAST_GAIN, SEVERITIES, corrupt, disk_kernel
from labelling.analysis.segmentation import iou_matrix, match, segment
from labelling.data import preprocess as P
from labelling.data.simulate import simulate_field

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def blobs(n=6, size=96, touching=False, seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.float32)
    labels = np.zeros((size, size), np.int32)
    centres = [(30, 30), (30, 47)] if touching else []
    while len(centres) < n:
        c = tuple(rng.integers(12, size - 12, 2))
        if all((c[0] - d[0]) ** 2 + (c[1] - d[1]) ** 2 > 26**2 for d in centres):
            centres.append(c)
    for i, (y, x) in enumerate(centres, 1):
        rr, cc = draw.disk((y, x), 9, shape=img.shape)
        img[rr, cc] += rng.uniform(0.6, 1.0)
        labels[rr, cc] = i
    return img + 0.02 * rng.normal(size=img.shape).astype(np.float32), labels


def test_segment_finds_separate_blobs():
    img, truth = blobs()
    r = match(truth, segment(img, min_size=20))
    assert r["f1"] == 1.0 and r["n_pred"] == 6


def test_watershed_splits_touching_nuclei():
    img, truth = blobs(n=4, touching=True)
    assert segment(img, watershed=False).max() == 3
    assert segment(img, watershed=True, min_distance=5).max() == 4


def test_iou_and_match_counts():
    a = np.zeros((10, 10), int)
    a[:5, :5] = 1
    a[6:, 6:] = 2
    b = np.zeros((10, 10), int)
    b[:5, :4] = 1
    m = iou_matrix(a, b)
    assert m.shape == (2, 1) and m[0, 0] == pytest.approx(20 / 25)
    r = match(a, b)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 0, 1) and r["f1"] == pytest.approx(2 / 3)


def test_segmentation_matches_simulator_masks():
    f = simulate_field(5, size=192)
    r = match(f.nuclei, segment(f.channel("nuclei")))
    assert r["f1"] > 0.7, r


@pytest.mark.realdata
def test_segmentation_on_dsb2018_true_mask():
    if not (SHARED / "stardist_dsb2018_nuclei").exists():
        pytest.skip("../shared/data/stardist_dsb2018_nuclei is absent")
    import tifffile

    img = tifffile.imread(SHARED / "stardist_dsb2018_nuclei" / "img2d.tif").astype(np.float32)
    truth = tifffile.imread(SHARED / "stardist_dsb2018_nuclei" / "mask2d.tif")
    r = match(truth, segment(img))
    assert r["f1"] > 0.8, r


def test_image_metrics_and_object_table():
    img, truth = blobs()
    m = D.image_metrics(img, truth)
    assert m["count"] == 6 and m["total_area"] == (truth > 0).sum()
    assert m["total_intensity"] == pytest.approx(img[truth > 0].sum(), rel=1e-5)
    t = D.object_table(truth, img)
    assert len(t) == 6 and t["area"].sum() == m["total_area"]
    assert t["total_intensity"].sum() == pytest.approx(m["total_intensity"], rel=1e-4)


def test_correlate_matches_scipy():
    rng = np.random.default_rng(0)
    real = pd.DataFrame({m: rng.random(10) for m in D.IMAGE_METRICS})
    pred = real * 2 + rng.random((10, 4)) * 0.3
    c = D.correlate(real, pred).set_index("metric")
    for m in D.IMAGE_METRICS:
        assert c.loc[m, "pearson"] == pytest.approx(stats.pearsonr(real[m], pred[m])[0])
        assert c.loc[m, "spearman"] == pytest.approx(stats.spearmanr(real[m], pred[m])[0])


def test_evaluate_pairs_report(tmp_path):
    reals, preds = zip(*[(blobs(n=k, seed=k)[0], blobs(n=k, seed=k)[0] * 1.1) for k in range(2, 8)])
    table, corr, objects = D.evaluate_pairs(reals, preds, return_objects=True)
    c = corr.set_index("metric")
    real_objects = objects[objects["source"] == "real"]
    assert len(real_objects) == table["real_count"].sum()  # one row per segmented object
    assert real_objects.groupby("image")["area"].sum().tolist() == table["real_total_area"].tolist()
    assert c.loc["count", "pearson"] == pytest.approx(1.0) and c.loc["total_intensity", "pearson"] > 0.99
    plots = D.scatter_plots(table, tmp_path)
    md = D.write_report(table, corr, tmp_path, images=plots, objects=objects)
    assert (tmp_path / "objects.csv").exists()
    assert len(plots) == 4 and all(p.exists() for p in plots)
    assert "count" in md.read_text() and (tmp_path / "report.html").exists()


def test_thresholds_and_gfp_mask():
    img, truth = blobs()
    for method in ("otsu", "mean"):  # both separate background (~0) from blobs (>= 0.6)
        assert 0.03 < P.threshold(img, method) < 0.5
    with pytest.raises(ValueError, match="otsu"):
        P.threshold(img, "median")
    assert P.local_threshold(img, 20).shape == img.shape
    mask = P.gfp_mask(img)
    assert ((mask > 0) == (truth > 0)).mean() > 0.97
    noise = np.random.default_rng(0).normal(100, 3, (64, 64)).astype(np.float32)
    assert P.gfp_mask(noise).sum() == 0  # a GFP-negative field stays empty


def test_rolling_ball_fast_path_removes_background():
    img, truth = blobs(size=128)
    yy, xx = np.mgrid[:128, :128]
    bg = 0.5 + 0.004 * xx + 0.002 * yy
    out = P.rolling_ball(img + bg, radius=30)
    assert abs(np.median(out[truth == 0])) < 0.05
    assert out[truth > 0].mean() > 0.5
    exact = P.rolling_ball(img + bg, radius=30, downsample=1)
    assert np.abs(out - exact)[truth == 0].mean() < 0.05


def test_golgi_enhancement_clips_low_and_rescales():
    img = np.linspace(0, 1, 1000, dtype=np.float32).reshape(40, 25)
    out = P.enhance_golgi(img, low_quantile=0.6)
    assert out.min() == 0 and out.max() == pytest.approx(1.0)
    assert (out == 0).mean() == pytest.approx(0.6, abs=0.01)


def test_corruption_parameters_and_effects():
    assert len(SEVERITIES) == 11 and CONTRAST_GAIN[5] == 1.0 and BLUR_RADIUS == (0, 0.5, 1, 1.5, 2, 3)
    img = blobs()[0] * 200
    for kind in ("blur", "contrast", "brightness"):
        assert np.allclose(corrupt(img, kind, 0), img)
    assert corrupt(img, "contrast", 5).std() == pytest.approx(0.3 * img.std(), rel=1e-3)
    assert corrupt(img, "contrast", -5).std() == pytest.approx(3.5 * img.std(), rel=1e-3)
    assert corrupt(img, "brightness", 5).mean() > img.mean() > corrupt(img, "brightness", -5).mean()
    assert corrupt(img, "blur", 5).std() < corrupt(img, "blur", 1).std() < img.std()
    assert disk_kernel(0.5).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="-5..5"):
        corrupt(img, "blur", 6)
