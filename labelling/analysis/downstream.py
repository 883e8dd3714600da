"""Downstream metrics: per-object and per-image measurements of real vs. predicted fluorescence.

Per image: object count, total area, total and mean intensity. Across images, for every metric, the
agreement of predicted with real values - the question a biologist asks ("would I have counted the same
nuclei?"), not a pixel score:

* ``pearson``, ``spearman`` - association: a prediction 1.8x too high can still have r = 0.9;
* ``ccc`` - Lin's concordance correlation: 1 only when predicted == real (penalizes bias and scale);
* ``bias`` - relative bias, mean(predicted) / mean(real) (1 = unbiased);
* ``mae`` - mean absolute error in the metric's units;

each with a percentile-bootstrap 95 % CI over images (``*_lo``, ``*_hi``) and ``n``. A predictor that gives
every image the same value has zero covariance with the truth: its r, rho and CCC are reported as 0 and
flagged ``constant``. ``chance_p95`` is the 95th percentile of |r| when predictions are paired with the
wrong images (shuffled labels): an r below it is indistinguishable from chance at this n.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from skimage import measure

from labelling.analysis.segmentation import segment

IMAGE_METRICS = ("count", "total_area", "total_intensity", "mean_intensity")


def object_table(labels: np.ndarray, image: np.ndarray) -> pd.DataFrame:
    """One row per object: label, area, total and mean intensity, centroid."""
    props = measure.regionprops_table(labels, intensity_image=image,
                                      properties=("label", "area", "intensity_mean", "centroid"))
    df = pd.DataFrame(props).rename(columns={"intensity_mean": "mean_intensity", "centroid-0": "y",
                                             "centroid-1": "x"})
    df["total_intensity"] = df["area"] * df["mean_intensity"]
    return df


def image_metrics(image: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Count, total area, total and mean intensity (over segmented pixels) of one image."""
    fg = labels > 0
    total = float(image[fg].sum()) if fg.any() else 0.0
    return {"count": float(labels.max()), "total_area": float(fg.sum()), "total_intensity": total,
            "mean_intensity": total / max(float(fg.sum()), 1.0)}


AGREEMENT = ("pearson", "spearman", "ccc", "bias", "mae")


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return 0.0  # no covariance: no association (a constant predictor)
    return float(np.corrcoef(a, b)[0, 1])


def concordance(real: np.ndarray, pred: np.ndarray) -> float:
    """Lin's concordance correlation coefficient: 2 cov / (var_r + var_p + (mean_r - mean_p)^2)."""
    real, pred = np.asarray(real, float), np.asarray(pred, float)
    cov = np.mean((real - real.mean()) * (pred - pred.mean()))
    denom = real.var() + pred.var() + (real.mean() - pred.mean()) ** 2
    return float(2 * cov / denom) if denom > 0 else (1.0 if np.allclose(real, pred) else 0.0)


def agreement_stats(real: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Point values of :data:`AGREEMENT` for paired per-image values."""
    real, pred = np.asarray(real, float), np.asarray(pred, float)
    spearman = _pearson(stats.rankdata(real), stats.rankdata(pred))
    mean_real = real.mean()
    return {"pearson": _pearson(real, pred), "spearman": spearman, "ccc": concordance(real, pred),
            "bias": float(pred.mean() / mean_real) if mean_real != 0 else float("nan"),
            "mae": float(np.abs(pred - real).mean())}


def _batch_stats(real: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`agreement_stats` for B resamples at once: (B, n) arrays -> (B,) per statistic."""

    def pearson(a, b):
        a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
        den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
        return np.divide((a * b).sum(1), den, out=np.zeros(len(a)), where=den > 0)

    mr, mp = real.mean(1), pred.mean(1)
    cov = ((real - mr[:, None]) * (pred - mp[:, None])).mean(1)
    denom = real.var(1) + pred.var(1) + (mr - mp) ** 2
    ccc = np.divide(2 * cov, denom, out=np.zeros(len(real)), where=denom > 0)
    return {"pearson": pearson(real, pred),
            "spearman": pearson(stats.rankdata(real, axis=1), stats.rankdata(pred, axis=1)),
            "ccc": ccc, "bias": np.divide(mp, mr, out=np.full(len(mr), np.nan), where=mr != 0),
            "mae": np.abs(pred - real).mean(1)}


def agreement(real, pred, n_boot: int = 1000, n_shuffle: int = 1000, seed: int = 0) -> dict[str, float]:
    """Agreement of predicted with real per-image values, with bootstrap 95 % CIs, n and chance level.

    Returns keys ``pearson, spearman, ccc, bias, mae`` and for each ``<key>_lo`` / ``<key>_hi``, plus ``n``,
    ``constant`` (1.0 when the prediction does not vary), ``chance_p95`` (95th percentile of |r| over
    shuffled pairings), ``real_mean`` and ``pred_mean``.
    """
    real, pred = np.asarray(real, float), np.asarray(pred, float)
    n = len(real)
    out: dict[str, float] = {"n": float(n), "real_mean": float(real.mean()) if n else np.nan,
                             "pred_mean": float(pred.mean()) if n else np.nan,
                             "constant": float(n > 0 and pred.std() == 0)}
    if n < 3:
        return {**out, **{k: np.nan for k in AGREEMENT}, **{f"{k}_{e}": np.nan for k in AGREEMENT
                                                            for e in ("lo", "hi")}, "chance_p95": np.nan}
    out.update(agreement_stats(real, pred))
    rng = np.random.default_rng(seed)
    idx = rng.integers(n, size=(max(n_boot, 1), n))
    boots = _batch_stats(real[idx], pred[idx])
    for key in AGREEMENT:
        values = boots[key][np.isfinite(boots[key])]
        lo, hi = np.percentile(values, (2.5, 97.5)) if len(values) and n_boot else (np.nan, np.nan)
        out[f"{key}_lo"], out[f"{key}_hi"] = float(lo), float(hi)
    perms = np.argsort(rng.random((max(n_shuffle, 1), n)), axis=1)
    shuffled = np.abs(_batch_stats(np.broadcast_to(real, perms.shape), pred[perms])["pearson"])
    out["chance_p95"] = float(np.percentile(shuffled, 95))
    return out


def correlate(real: pd.DataFrame, pred: pd.DataFrame, metrics=IMAGE_METRICS, seed: int = 0,
              n_boot: int = 1000) -> pd.DataFrame:
    """One row per metric: :func:`agreement` of predicted with real values across images (rows aligned)."""
    return pd.DataFrame([{"metric": m, **agreement(real[m].to_numpy(float), pred[m].to_numpy(float),
                                                   n_boot=n_boot, n_shuffle=n_boot, seed=seed)}
                         for m in metrics])


def mean_ci(values, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean with a percentile-bootstrap 95 % CI and n (e.g. of per-image pixel Pearson or object F1)."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if not len(values):
        return {"mean": np.nan, "lo": np.nan, "hi": np.nan, "n": 0.0}
    rng = np.random.default_rng(seed)
    means = values[rng.integers(len(values), size=(n_boot, len(values)))].mean(1)
    lo, hi = np.percentile(means, (2.5, 97.5))
    return {"mean": float(values.mean()), "lo": float(lo), "hi": float(hi), "n": float(len(values))}


def evaluate_pairs(real_images, pred_images, names=None, seg_args: dict | None = None,
                   true_labels=None, return_objects: bool = False, null_images=None, seed: int = 0):
    """Segment every real and predicted image, measure both, compare.

    Args:
        real_images: sequence of real 2D images.
        pred_images: predicted 2D images, in the same intensity units as `real_images`.
        names: image names for the table.
        seg_args: arguments of :func:`segment`.
        true_labels: optional true instance masks; adds object F1 of real and predicted segmentations.
        return_objects: also return the per-object table (image, source real/pred, label, area, intensities).
        null_images: predictions of the null predictor for the same images; adds ``null_*`` columns and
            rows with ``predictor == "null"`` to the agreement table.
        seed: seed of the bootstrap and shuffles.

    Returns:
        (per-image table with ``real_*``/``pred_*`` columns, agreement table (one row per predictor and
        metric)[, per-object table]).
    """
    from labelling.analysis.segmentation import match

    seg_args = seg_args or {}
    rows, real_rows, pred_rows, null_rows, objects = [], [], [], [], []
    for i, (r, p) in enumerate(zip(real_images, pred_images)):
        lr, lp = segment(r, **seg_args), segment(p, **seg_args)
        if return_objects:
            for source, labels, img in (("real", lr, r), ("pred", lp, p)):
                objects.append(object_table(labels, img).assign(image=names[i] if names else i, source=source))
        mr, mp = image_metrics(r, lr), image_metrics(p, lp)
        row = {"image": names[i] if names else i, **{f"real_{k}": v for k, v in mr.items()},
               **{f"pred_{k}": v for k, v in mp.items()}}
        row["pixel_pearson"] = _pearson(r.ravel().astype(float), p.ravel().astype(float))
        row["object_f1"] = match(lr, lp)["f1"]  # predicted objects vs objects segmented in the real image
        if null_images is not None:
            mn = image_metrics(null_images[i], segment(null_images[i], **seg_args))
            row.update({f"null_{k}": v for k, v in mn.items()})
            null_rows.append(mn)
        if true_labels is not None:
            row["real_f1"] = match(true_labels[i], lr)["f1"]
            row["pred_f1"] = match(true_labels[i], lp)["f1"]
        rows.append(row)
        real_rows.append(mr)
        pred_rows.append(mp)
    table = pd.DataFrame(rows)
    corr = correlate(pd.DataFrame(real_rows), pd.DataFrame(pred_rows), seed=seed).assign(predictor="model")
    if null_rows:
        null = correlate(pd.DataFrame(real_rows), pd.DataFrame(null_rows), seed=seed).assign(predictor="null")
        corr = pd.concat([corr, null], ignore_index=True)
    if return_objects:
        return table, corr, pd.concat(objects, ignore_index=True) if objects else pd.DataFrame()
    return table, corr


def segmentation_warnings(table: pd.DataFrame, shape: tuple[int, int], max_fraction: float = 0.5) -> list[str]:
    """Warnings when the *real* images' segmentation looks implausible, so downstream numbers are meaningless.

    That is: most of a field marked as foreground (a dim or diffuse channel thresholded into noise), or no objects.
    """
    if not len(table):
        return []
    warnings = []
    fraction = table["real_total_area"] / float(shape[0] * shape[1])
    if (fraction > max_fraction).mean() > 0.5:
        warnings.append(f"the real-image segmentation marks {fraction.median():.0%} of a typical field as foreground "
                        f"({table['real_count'].median():.0f} objects): the channel may be too dim or diffuse for "
                        "these segmentation settings, and every downstream number below may be meaningless. Look "
                        "at segmentation_preview.png and try evaluate --seg offset=... min_size=...")
    if (table["real_count"] == 0).mean() > 0.5:
        warnings.append("the real-image segmentation finds no objects in most fields: downstream numbers are "
                        "meaningless; check segmentation_preview.png and the --seg settings")
    return warnings


def object_agreement(real_images, pred_images, seg_args: dict | None = None, iou: float = 0.5,
                     n_boot: int = 1000, seed: int = 0, segmenter=None) -> dict[str, float]:
    """Object-level agreement pooled over every object of every image (what a biologist counts and measures).

    Each real and predicted image is segmented the same way; objects match at IoU > `iou` (unique matches).
    Returns the pooled object F1 (2 TP / (2 TP + FP + FN) over all images, so each object counts once, not each
    image), the numbers of real, predicted and matched objects, and Lin's CCC and Pearson r of the matched
    objects' mean intensities (real vs predicted, pooled over all matches). The 95 % intervals
    (``object_f1_ci``, ``object_intensity_ccc_ci``) resample whole images, not objects: objects of one image
    are not independent (one focus or exposure error moves them all).

    `segmenter` (image -> labels) replaces our segmentation with `seg_args`, e.g. a pretrained net
    (:class:`labelling.studies.segmenters.OnnxNuclei`).
    """
    from scipy import ndimage

    from labelling.analysis.segmentation import matched_objects

    cut = segmenter or (lambda image: segment(image, **(seg_args or {})))
    per_image = []  # (tp, n_real, n_pred, real means, predicted means) of each image
    for real, pred in zip(real_images, pred_images):
        lr, lp, pairs = matched_objects(cut(real), cut(pred), iou)
        means = (list(ndimage.mean(real, lr, [i for i, _ in pairs])), list(ndimage.mean(pred, lp, [j for _, j in pairs]))) \
            if pairs else ([], [])
        per_image.append((len(pairs), int(lr.max()), int(lp.max()), *means))

    def pooled(rows) -> tuple[float, float]:
        tp, n_real, n_pred = (sum(r[k] for r in rows) for k in range(3))
        f1 = 2 * tp / max(n_real + n_pred, 1)
        real_means = np.array([m for r in rows for m in r[3]])
        pred_means = np.array([m for r in rows for m in r[4]])
        return f1, concordance(real_means, pred_means) if tp >= 3 else float("nan")

    tp, n_real, n_pred = (sum(r[k] for r in per_image) for k in range(3))
    f1, ccc = pooled(per_image)
    out = {"object_f1": f1, "n_real_objects": float(n_real), "n_pred_objects": float(n_pred), "n_matched": float(tp),
           "n_images": float(len(per_image))}
    if per_image and n_boot:
        rng = np.random.default_rng(seed)
        draws = np.array([pooled([per_image[i] for i in rng.integers(len(per_image), size=len(per_image))])
                          for _ in range(n_boot)])
        out["object_f1_ci"] = [float(v) for v in np.nanpercentile(draws[:, 0], (2.5, 97.5))]
        if tp >= 3 and np.isfinite(draws[:, 1]).any():
            out["object_intensity_ccc_ci"] = [float(v) for v in np.nanpercentile(draws[:, 1], (2.5, 97.5))]
    if tp >= 3:
        real_means = np.array([m for r in per_image for m in r[3]])
        pred_means = np.array([m for r in per_image for m in r[4]])
        out["object_intensity_ccc"] = ccc
        out["object_intensity_pearson"] = _pearson(real_means, pred_means)
    return out
