from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from skimage import draw

from labelling.analysis import downstream, filters
from labelling.analysis.corruptions import (
    BLUR_RADIUS,
    CONTRAST_GAIN,
    CORRUPTIONS,
    SEVERITIES,
    Sensor,
    corrupt,
    disk_kernel,
)
from labelling.analysis.segmentation import iou_matrix, match, segment
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
    m = downstream.image_metrics(img, truth)
    assert m["count"] == 6 and m["total_area"] == (truth > 0).sum()
    assert m["total_intensity"] == pytest.approx(img[truth > 0].sum(), rel=1e-5)
    t = downstream.object_table(truth, img)
    assert len(t) == 6 and t["area"].sum() == m["total_area"]
    assert t["total_intensity"].sum() == pytest.approx(m["total_intensity"], rel=1e-4)


def test_correlate_matches_scipy():
    rng = np.random.default_rng(0)
    real = pd.DataFrame({m: rng.random(10) for m in downstream.IMAGE_METRICS})
    pred = real * 2 + rng.random((10, 4)) * 0.3
    c = downstream.correlate(real, pred, n_boot=50).set_index("metric")
    for m in downstream.IMAGE_METRICS:
        assert c.loc[m, "pearson"] == pytest.approx(stats.pearsonr(real[m], pred[m])[0])
        assert c.loc[m, "spearman"] == pytest.approx(stats.spearmanr(real[m], pred[m])[0])


def test_evaluate_pairs_report(tmp_path):
    # predictions: the same blobs but one extra object per image and 1.5x brighter
    pairs = [(blobs(n=k, size=128, seed=k)[0], blobs(n=k + 1, size=128, seed=k)[0] * 1.5) for k in range(2, 8)]
    reals, preds = zip(*pairs)
    nulls = [np.full_like(r, 0.3) for r in reals]
    table, corr, objects = downstream.evaluate_pairs(reals, preds, return_objects=True, null_images=nulls)
    c = corr[corr["predictor"] == "model"].set_index("metric")
    null = corr[corr["predictor"] == "null"].set_index("metric")
    assert c.loc["count", "pearson"] == pytest.approx(1.0)  # perfectly correlated ...
    assert c.loc["count", "bias"] == pytest.approx(np.mean(range(3, 9)) / np.mean(range(2, 8)))  # ... but biased
    assert c.loc["count", "mae"] == pytest.approx(1.0) and c.loc["count", "ccc"] < 0.95
    assert c.loc["mean_intensity", "bias"] > 1.3
    assert (null["pearson"] == 0).all() and (null["constant"] == 1).all()
    assert table["object_f1"].between(0.7, 1).all()
    real_objects = objects[objects["source"] == "real"]
    assert len(real_objects) == table["real_count"].sum()  # one row per segmented object
    assert real_objects.groupby("image")["area"].sum().tolist() == table["real_total_area"].tolist()
    from labelling.reporting import downstream as report

    plots = report.scatter_plots(table, tmp_path)
    md = report.write_report(table, corr, tmp_path, images=plots, objects=objects)
    assert (tmp_path / "objects.csv").exists()
    assert len(plots) == 4 and all(p.exists() for p in plots)
    text = md.read_text()
    assert "Lin's CCC" in text and "null r" in text and "(constant)" in text
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # plots embedded, the file stands alone


def test_thresholds_and_gfp_mask():
    img, truth = blobs()
    for method in ("otsu", "mean"):  # both separate background (~0) from blobs (>= 0.6)
        assert 0.03 < filters.threshold(img, method) < 0.5
    with pytest.raises(ValueError, match="otsu"):
        filters.threshold(img, "median")
    assert filters.local_threshold(img, 20).shape == img.shape
    mask = filters.gfp_mask(img)
    assert ((mask > 0) == (truth > 0)).mean() > 0.97
    noise = np.random.default_rng(0).normal(100, 3, (64, 64)).astype(np.float32)
    assert filters.gfp_mask(noise).sum() == 0  # a GFP-negative field stays empty


def test_rolling_ball_fast_path_removes_background():
    img, truth = blobs(size=128)
    yy, xx = np.mgrid[:128, :128]
    bg = 0.5 + 0.004 * xx + 0.002 * yy
    out = filters.rolling_ball(img + bg, radius=30)
    assert abs(np.median(out[truth == 0])) < 0.05
    assert out[truth > 0].mean() > 0.5
    exact = filters.rolling_ball(img + bg, radius=30, downsample=1)
    assert np.abs(out - exact)[truth == 0].mean() < 0.05


def test_golgi_enhancement_clips_low_and_rescales():
    img = np.linspace(0, 1, 1000, dtype=np.float32).reshape(40, 25)
    out = filters.enhance_golgi(img, low_quantile=0.6)
    assert out.min() == 0 and out.max() == pytest.approx(1.0)
    assert (out == 0).mean() == pytest.approx(0.6, abs=0.01)


def test_corruption_parameters_and_effects():
    assert len(SEVERITIES) == 11 and CONTRAST_GAIN[5] == 1.0 and BLUR_RADIUS == (0, 0.5, 1, 1.5, 2, 3)
    img = blobs()[0] * 200 + 20  # 8-bit camera range
    for kind in CORRUPTIONS:
        assert np.array_equal(corrupt(img, kind, 0), img)
    # the thesis parameters, before the camera
    assert CORRUPTIONS["contrast"](img, 5).std() == pytest.approx(0.3 * img.std(), rel=1e-3)
    assert CORRUPTIONS["contrast"](img, -5).std() == pytest.approx(3.5 * img.std(), rel=1e-3)
    assert corrupt(img, "brightness", 5).mean() > img.mean() > corrupt(img, "brightness", -5).mean()
    assert corrupt(img, "blur", 5).std() < corrupt(img, "blur", 1).std() < img.std()
    assert disk_kernel(0.5).sum() == pytest.approx(1.0)
    # the camera clips and quantizes: strong contrast saturates an 8-bit sensor at 0 and 255
    strong = corrupt(img, "contrast", -5)
    assert strong.min() == 0 and strong.max() == 255 and np.array_equal(strong, np.round(strong))
    assert strong.std() < 3.5 * img.std()
    # noise grows with severity and keeps the mean (Poisson-Gaussian, unbiased)
    flat = np.full((128, 128), 1000.0, np.float32)
    sds = [corrupt(flat, "noise", s, Sensor(12)).std() for s in (1, 3, 5)]
    assert sds[0] < sds[1] < sds[2] and abs(corrupt(flat, "noise", 5, Sensor(12)).mean() - 1000) < 5
    assert sds[2] == pytest.approx(np.sqrt(1000**2 / 10 + (0.05 * 1000) ** 2), rel=0.1)
    with pytest.raises(ValueError, match="-5..5"):
        corrupt(img, "blur", 6)


def test_sensor_picks_the_camera_range():
    assert Sensor.for_image(np.array([0, 200.0])).top == 255
    assert Sensor.for_image(np.array([0, 3000.0])).top == 4095
    assert Sensor.for_image(np.array([0, 0.5], np.float32)).top == 1.0
    assert np.array_equal(Sensor(8).digitize(np.array([-3.0, 12.4, 300.0])), [0.0, 12.0, 255.0])


def test_agreement_ccc_bias_mae_against_formulas_and_ci_covers():
    rng = np.random.default_rng(0)
    real = rng.gamma(4, 10, 30)
    pred = 1.8 * real + rng.normal(0, 2, 30)  # highly correlated but 1.8x too many
    a = downstream.agreement(real, pred, n_boot=300, n_shuffle=300)
    assert a["pearson"] == pytest.approx(stats.pearsonr(real, pred)[0]) and a["pearson"] > 0.95
    assert a["spearman"] == pytest.approx(stats.spearmanr(real, pred)[0])
    cov = np.mean((real - real.mean()) * (pred - pred.mean()))
    ccc = 2 * cov / (real.var() + pred.var() + (real.mean() - pred.mean()) ** 2)
    assert a["ccc"] == pytest.approx(ccc) and a["ccc"] < 0.6  # concordance sees what r hides
    assert a["bias"] == pytest.approx(pred.mean() / real.mean()) and a["bias"] > 1.7
    assert a["mae"] == pytest.approx(np.abs(pred - real).mean())
    for key in ("pearson", "ccc", "bias", "mae"):
        assert a[f"{key}_lo"] <= a[key] <= a[f"{key}_hi"], key
    assert a["n"] == 30 and a["chance_p95"] < 0.5
    const = downstream.agreement(real, np.full(30, 5.0), n_boot=50, n_shuffle=50)
    assert const["pearson"] == 0 and const["ccc"] == 0 and const["constant"] == 1.0


def test_bootstrap_ci_coverage_is_about_95_percent():
    """The promise of a 95 % CI, checked: over repeated samples it covers the true r about 95 % of the time."""
    rng = np.random.default_rng(1)
    true_r, covered, trials = 0.6, 0, 300
    cov = [[1, true_r], [true_r, 1]]
    for _ in range(trials):
        x = rng.multivariate_normal([0, 0], cov, 60)
        a = downstream.agreement(x[:, 0], x[:, 1], n_boot=1000, n_shuffle=10, seed=int(rng.integers(1 << 30)))
        covered += a["pearson_lo"] <= true_r <= a["pearson_hi"]
    assert 0.90 <= covered / trials <= 0.99


def test_shuffled_chance_level_is_calibrated():
    """Unrelated values exceed chance_p95 in about 5 % of samples, not more."""
    rng = np.random.default_rng(2)
    hits = sum(abs(a["pearson"]) > a["chance_p95"]
               for a in (downstream.agreement(rng.random(20), rng.random(20), n_boot=10, n_shuffle=200,
                                    seed=int(rng.integers(1 << 30))) for _ in range(200)))
    assert hits / 200 < 0.1


def test_object_agreement_pools_objects_over_images_and_measures_matched_intensities():
    """Known objects: perfect prediction -> F1 1, CCC 1; one missed object per image and 2x brightness ->
    pooled F1 from the object counts, intensity r 1 but CCC well below 1."""
    def field(centres, value):
        img = np.zeros((96, 96), np.float32)
        for k, (y, x) in enumerate(centres):
            img[y - 6:y + 6, x - 6:x + 6] = value * (1 + 0.2 * k)
        return img

    centres = [(16, 16), (16, 60), (60, 16), (60, 60)]
    real = [field(centres, 100.0) for _ in range(3)]
    same = downstream.object_agreement(real, real, {"offset": 0.0, "min_size": 10})
    assert same["object_f1"] == pytest.approx(1.0) and same["object_intensity_ccc"] == pytest.approx(1.0)
    assert same["n_real_objects"] == 12 and same["n_matched"] == 12
    worse = [field(centres[:3], 200.0) for _ in range(3)]  # one object missed per image, twice as bright
    got = downstream.object_agreement(real, worse, {"offset": 0.0, "min_size": 10})
    assert got["n_matched"] == 9 and got["object_f1"] == pytest.approx(2 * 9 / (2 * 9 + 0 + 3))
    assert got["object_intensity_pearson"] == pytest.approx(1.0, abs=1e-6) and got["object_intensity_ccc"] < 0.5
