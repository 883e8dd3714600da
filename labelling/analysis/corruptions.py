"""Image corruptions at severities -5..5 with the thesis parameters: defocus blur, contrast, brightness.

Severity 0 is the identity. Contrast and brightness are signed (negative severities raise contrast /
darken); blur uses |severity|. Values act on the image's own intensity range, so they behave the same on
8-bit, 16-bit or normalized images.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

SEVERITIES = tuple(range(-5, 6))
BLUR_RADIUS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)  # severity 0..5, pixels
CONTRAST_GAIN = (3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.9, 0.8, 0.7, 0.5, 0.3)  # severity -5..5
BRIGHTNESS_BIAS = (-150, -135, -120, -90, -50, 0, 50, 90, 120, 135, 150)  # severity -5..5, 8-bit scale


def _check(severity: int) -> int:
    if int(severity) not in SEVERITIES:
        raise ValueError(f"severity must be an integer in -5..5, got {severity}")
    return int(severity)


def disk_kernel(radius: float, supersample: int = 8, alias_sigma: float = 0.5) -> np.ndarray:
    """Normalized defocus kernel: a supersampled pillbox of `radius`, softened by a Gaussian of
    `alias_sigma` (as in the common ImageNet-C defocus blur), so even radius 0.5 blurs a little."""
    r = int(np.ceil(radius)) + 1
    ax = (np.arange((2 * r + 1) * supersample) + 0.5) / supersample - r - 0.5
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    inside = (yy**2 + xx**2 <= radius**2).astype(np.float64)
    k = inside.reshape(2 * r + 1, supersample, 2 * r + 1, supersample).mean((1, 3))
    if alias_sigma:
        k = ndi.gaussian_filter(k, alias_sigma, mode="constant")
    return k / k.sum()


def defocus_blur(image: np.ndarray, severity: int) -> np.ndarray:
    radius = BLUR_RADIUS[abs(_check(severity))]
    if radius == 0:
        return image.copy()
    return ndi.convolve(image, disk_kernel(radius).astype(image.dtype), mode="reflect")


def _range(image: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(image, (0.1, 99.9))
    return float(lo), float(max(hi - lo, 1e-8))


def contrast(image: np.ndarray, severity: int) -> np.ndarray:
    gain = CONTRAST_GAIN[_check(severity) + 5]
    if gain == 1.0:
        return image.copy()
    mean = float(image.mean())
    return (mean + gain * (image - mean)).astype(image.dtype)


def brightness(image: np.ndarray, severity: int) -> np.ndarray:
    bias = BRIGHTNESS_BIAS[_check(severity) + 5]
    if bias == 0:
        return image.copy()
    _, span = _range(image)
    return (image + bias / 255.0 * span).astype(image.dtype)


CORRUPTIONS = {"blur": defocus_blur, "contrast": contrast, "brightness": brightness}


def corrupt(image: np.ndarray, kind: str, severity: int) -> np.ndarray:
    """Apply corruption `kind` (blur | contrast | brightness) at `severity` in -5..5."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption '{kind}'; valid: {sorted(CORRUPTIONS)}")
    return CORRUPTIONS[kind](np.asarray(image, np.float32), severity)
