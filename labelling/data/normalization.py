"""THE normalization rule: per image or dataset-level (``fixed``), for folders and plates alike.

Every statistic a model is trained and deployed with comes from here:

* per image (``percentile``, ``zscore``, ``minmax``, ``none``): :func:`image_stats` of the whole field;
* ``fixed`` (dataset level): each training field is summarized by a :func:`sketch` (mean, SD and the
  :data:`GRID` percentiles of each channel) and the sketches are pooled by :func:`pooled_stats` (the
  average of the fields' piecewise-linear CDFs, so every field weighs the same, inverted by bisection).
  A plate stores the same sketches (``labelling preprocess``), so the same pixels give the same ``fixed``
  statistics whether they are read as a folder or as a plate (``tests/test_normalization.py``).

Statistics are ``(offset, scale)`` rows per channel: ``normalized = (raw - offset) / scale`` and its exact
inverse :func:`denormalize`.

Flat-field correction (``data.flatfield``) comes first when a model was trained with it: each raw input
channel is divided by a smooth quadratic illumination surface fitted to that field alone
(:func:`illumination`, :func:`flat_field`), so a vignetted or tilted field looks evenly lit.
"""

from __future__ import annotations

import numpy as np

from labelling.config import NORMALIZATIONS, PER_IMAGE, TARGET_NORMALIZATIONS

__all__ = ["GRID", "LOW", "HIGH", "NORMALIZATIONS", "PER_IMAGE", "TARGET_NORMALIZATIONS", "image_stats",
           "balanced_floor", "balanced_stats", "target_rule_stats", "sketch", "sketch_stats",
           "pooled_stats", "pooled_percentiles", "dataset_stats", "normalize", "denormalize", "bin_factor", "bin_image",
           "illumination", "illumination_surface", "flatten", "flat_field"]

LOW, HIGH = 1.0, 99.8  # the percentiles of ``percentile`` normalization (the only place they are written)
# the sketch's percentiles; LOW and HIGH are among them, so a per-image percentile from a sketch is exact
GRID = np.array([0, 0.1, 0.2, 0.5, LOW, 2, 3, 5, 7.5, *range(10, 91, 5), 92.5, 95, 97, 98, 99, 99.5, HIGH, 99.9, 100],
                float)
MIN_SCALE = 1e-6  # a constant channel still gets a usable (invertible) scale
BALANCE = 0.25  # ``balanced`` targets: a field's SD counts as at least this share of the median field's
MAX_SCALE = 8.0  # the largest resize factor of :func:`rescale` a prediction or a training study may ask for


def _rows(offset, scale) -> np.ndarray:
    return np.stack([np.asarray(offset, np.float64), np.maximum(np.asarray(scale, np.float64), MIN_SCALE)],
                    -1).astype(np.float32)


def image_stats(image: np.ndarray, method: str = "percentile") -> np.ndarray:
    """Per-channel ``(offset, scale)`` of a (C, H, W) image for a per-image normalization, shape (C, 2)."""
    if method not in PER_IMAGE:
        hint = " ('fixed' is dataset-level: use dataset_stats)" if method == "fixed" else ""
        raise ValueError(f"unknown per-image normalization '{method}'{hint}; valid: {list(PER_IMAGE)}")
    flat = np.asarray(image).reshape(len(image), -1).astype(np.float64)
    if method == "percentile":
        lo, hi = np.percentile(flat, (LOW, HIGH), axis=1)
        return _rows(lo, hi - lo)
    if method == "zscore":
        return _rows(flat.mean(1), flat.std(1))
    if method == "minmax":
        return _rows(flat.min(1), flat.max(1) - flat.min(1))
    return _rows(np.zeros(len(flat)), np.ones(len(flat)))


def balanced_floor(scales: np.ndarray) -> np.ndarray:
    """(C,) smallest scale of ``balanced`` targets: :data:`BALANCE` x the median training field's SD.

    `scales`: (N, C) per-image SDs of the N training targets (their ``zscore`` scales).
    """
    return BALANCE * np.median(np.asarray(scales, np.float64), 0)


def balanced_stats(stats: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """``balanced`` (offset, scale) of a target from its ``zscore`` stats and the :func:`balanced_floor`.

    The offset is the field's own mean; the scale is the geometric mean of the field's own SD (at least
    `floor`) and the median training field's SD, so a field 16x dimmer than the median is stretched 4x.

    Why: with dataset-level targets a scale-free loss weighs a bright well far above a dim one, while the
    score weighs every block alike, so the dim well goes unlearned (``worm_gfp``: 0.59 vs 0.67 test r). A
    full per-image z-score equalizes them but stretches a nearly empty field (background, padding) to full
    contrast and costs where fields differ only in content (``isl_dapi`` 0.79 vs 0.83). Halfway (the square
    root) kept both; the floor stops the stretch of a nearly empty field at 2x. The price: the net learns
    each field's relative intensities, so its calibrated output loses the brightness differences between
    fields (matched objects' intensity CCC falls; docs/quality.md). Not the real-data default for that reason.
    """
    stats = np.array(stats, np.float32)
    median = np.asarray(floor, np.float64) / BALANCE
    stats[:, 1] = np.sqrt(np.maximum(stats[:, 1], floor) * median)
    return stats


def target_rule_stats(method: str, own, fixed: np.ndarray | None, floor: np.ndarray | None) -> np.ndarray:
    """(Cout, 2) statistics of one target under ``target_normalize`` rule `method` (folders and plates alike).

    `own(rule)` gives the field's own per-image statistics for a per-image rule (from its pixels or its
    sketch); `fixed` the training split's dataset-level ones; `floor` the :func:`balanced_floor`.
    """
    if method == "fixed":
        return fixed
    if method == "balanced":
        return balanced_stats(own("zscore"), floor)
    return own(method)


def sketch(plane: np.ndarray) -> dict:
    """Mean, SD and :data:`GRID` percentiles of one 2D plane: what a field contributes to ``fixed`` statistics."""
    flat = np.asarray(plane, np.float64).ravel()
    return {"mean": float(flat.mean()), "std": float(flat.std()), "q": np.percentile(flat, GRID).tolist()}


def sketch_stats(one: dict, method: str) -> tuple[float, float]:
    """``(offset, scale)`` of a plane from its :func:`sketch`, equal to :func:`image_stats` of the plane."""
    q = one["q"]
    if method == "percentile":
        lo, hi = np.interp(LOW, GRID, q), np.interp(HIGH, GRID, q)
        off, scale = lo, hi - lo
    elif method == "zscore":
        off, scale = one["mean"], one["std"]
    elif method == "minmax":
        off, scale = q[0], q[-1] - q[0]
    elif method == "none":
        off, scale = 0.0, 1.0
    else:
        raise ValueError(f"unknown per-image normalization '{method}'; valid: {list(PER_IMAGE)}")
    return float(np.float32(off)), float(np.float32(max(scale, MIN_SCALE)))


def pooled_percentiles(sketches: list[dict], percents) -> list[float]:
    """Percentiles of several fields' pixels pooled (equal weight per field), from their sketches."""
    if not sketches:
        raise ValueError("dataset-level statistics need at least one field")
    qs = np.array([s["q"] for s in sketches], float)

    def inverse(percent: float) -> float:
        lo, hi = float(qs[:, 0].min()), float(qs[:, -1].max())
        for _ in range(60):
            mid = (lo + hi) / 2
            below = np.mean([np.interp(mid, q, GRID) for q in qs]) < percent
            lo, hi = (mid, hi) if below else (lo, mid)
        return (lo + hi) / 2

    return [inverse(float(p)) for p in percents]


def pooled_stats(sketches: list[dict]) -> tuple[float, float]:
    """Percentile ``(offset, scale)`` of several fields' pixels pooled, from their sketches (``fixed``).

    Each field's distribution is the piecewise-linear CDF through its sketch; the pooled CDF is their
    average (equal weight per field: one large or bright field cannot dominate, and the order of the fields
    does not matter), inverted by bisection.
    """
    a, b = pooled_percentiles(sketches, (LOW, HIGH))
    return float(np.float32(a)), float(np.float32(max(b - a, MIN_SCALE)))


def dataset_stats(images: list[np.ndarray]) -> np.ndarray:
    """``fixed`` statistics (C, 2) of a set of (C, H, W) fields: :func:`pooled_stats` of their sketches."""
    if not len(images):
        raise ValueError("dataset_stats needs at least one image")
    return np.array([pooled_stats([sketch(img[c]) for img in images]) for c in range(len(images[0]))], np.float32)


def moment_matching(mean_p, sd_p, mean_t, sd_t):
    """(offset, gain) mapping outputs of mean `mean_p` and SD `sd_p` onto targets' `mean_t`, `sd_t`.

    The calibration of a scale-free loss's output: deployment fits it on training fields
    (:func:`labelling.inference.predict.calibrate_affine`), the validation metrics on training batches.
    Works on numpy arrays and torch tensors alike.
    """
    gain = sd_t / sd_p
    return mean_t - gain * mean_p, gain


FLAT_GRID = 16  # the illumination is fitted to a FLAT_GRID x FLAT_GRID grid of block means
FLAT_FLOOR = 0.2  # a fitted surface dipping below this share of its mean is no illumination: left uncorrected


def _quadratic(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], -1)


def _axes(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    return np.linspace(-1, 1, height), np.linspace(-1, 1, width)


def illumination(image: np.ndarray) -> np.ndarray:
    """(C, 6) quadratic illumination of each channel of a (C, H, W) field, fitted to its block means.

    The surface ``a + b u + c v + d u^2 + e u v + f v^2`` (``u``, ``v`` in [-1, 1] across the field) is the
    least-squares fit to a :data:`FLAT_GRID` grid of block means: smooth enough to leave cells alone and to
    catch vignetting and tilted illumination. A channel whose fit is not a positive illumination (mean <= 0
    or dipping below :data:`FLAT_FLOOR` of its mean: a background-subtracted or mostly empty field) gets the
    flat surface ``(1, 0, ...)``, i.e. no correction.
    """
    import cv2

    image = np.asarray(image, np.float32)
    c, height, width = image.shape
    gy, gx = min(FLAT_GRID, height), min(FLAT_GRID, width)
    rows, cols = _axes(height, width)
    v = cv2.resize(rows[:, None].repeat(2, 1).astype(np.float32), (1, gy), interpolation=cv2.INTER_AREA)[:, 0]
    u = cv2.resize(cols[None].repeat(2, 0).astype(np.float32), (gx, 1), interpolation=cv2.INTER_AREA)[0]
    design = _quadratic(*np.meshgrid(u, v)).reshape(-1, 6).astype(np.float64)
    out = np.zeros((c, 6))
    for k, plane in enumerate(image):
        means = cv2.resize(plane, (gx, gy), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
        coef = np.linalg.lstsq(design, means, rcond=None)[0]
        low, mean = _extremes(coef, rows, cols)
        out[k] = coef / mean if mean > 0 and low >= FLAT_FLOOR * mean else (1, 0, 0, 0, 0, 0)
    return out


def _extremes(coef: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[float, float]:
    """(min, mean) of a quadratic surface over the field, on a 64 x 64 grid spanning it (corners included)."""
    grid = _quadratic(*np.meshgrid(np.linspace(-1, 1, 64), np.linspace(-1, 1, 64))) @ coef
    full_mean = coef[0] + coef[3] * np.mean(cols ** 2) + coef[5] * np.mean(rows ** 2)  # odd terms average to 0
    return float(grid.min()), float(full_mean)


def illumination_surface(coeffs: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) float32 surfaces of :func:`illumination` coefficients (each of mean 1 over the field)."""
    rows, cols = _axes(height, width)
    terms = _quadratic(*np.meshgrid(cols, rows))
    return np.einsum("hwk,ck->chw", terms, np.asarray(coeffs, np.float64)).astype(np.float32)


def flatten(image: np.ndarray, channels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the field with its first `channels` (all) channels divided by their illumination, that illumination).

    The illumination is :func:`illumination`'s coefficients (channels, 6); multiplying by their
    :func:`illumination_surface` gives the field back.
    """
    image = np.array(image, np.float32)
    n = len(image) if channels is None else channels
    coeffs = illumination(image[:n])
    image[:n] /= illumination_surface(coeffs, *image.shape[1:])
    return image, coeffs


def flat_field(image: np.ndarray, channels: int | None = None) -> np.ndarray:
    """A (C, H, W) field with its first `channels` (all) channels divided by their :func:`illumination`."""
    return flatten(image, channels)[0]


def normalize(image: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """``(x - offset) / scale`` per channel of a (C, H, W) image; `stats` is (C, 2)."""
    stats = np.asarray(stats, np.float32)
    return ((np.asarray(image, np.float32) - stats[:, :1, None]) / stats[:, 1:, None]).astype(np.float32)


def denormalize(image, stats):
    """Exact inverse of :func:`normalize`; numpy arrays and torch tensors, (C, H, W) or (B, C, H, W)."""
    off, scale = stats[..., 0], stats[..., 1]
    return image * scale[..., None, None] + off[..., None, None]


def bin_factor(shape: tuple[int, ...], max_size: int) -> int:
    """Integer binning factor bringing the longer side of `shape` (.., H, W) to at most `max_size` (0: none)."""
    longest = max(shape[-2:])
    return int(np.ceil(longest / max_size)) if max_size and longest > max_size else 1


def bin_image(image: np.ndarray, factor: int) -> np.ndarray:
    """Average `factor` x `factor` blocks of a (C, H, W) image (the remainder rows/columns are dropped)."""
    if factor <= 1:
        return image
    c, h, w = image.shape
    image = image[:, : h - h % factor, : w - w % factor]
    return image.reshape(c, h // factor, factor, w // factor, factor).mean((2, 4)).astype(np.float32)


def rescale(image: np.ndarray, scale: float, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Resize a (C, H, W) image by `scale` (or to `shape`) with area (down) or linear (up) interpolation."""
    import cv2

    if scale == 1.0 and shape is None:
        return image
    height, width = image.shape[1:]
    size = shape or (max(1, int(round(height * scale))), max(1, int(round(width * scale))))
    interp = cv2.INTER_AREA if size[0] < height else cv2.INTER_LINEAR
    return np.stack([cv2.resize(c, (size[1], size[0]), interpolation=interp) for c in image]).astype(np.float32)
