"""Acquisition corruptions of the *raw* image at severities -5..5, with a camera model.

Corruptions act on the image in its own units (camera counts), upstream of everything the deployed
pipeline does: the result is what the microscope would have recorded, and it then goes through the same
normalization and network as any other image. That matters: per-image normalization cancels a pure gain
or offset exactly, so only what survives the camera (saturation at full well, quantization) reaches the
network - the stability study reports that input change next to every metric change.

Kinds (thesis Table 5 parameters): ``blur`` (defocus, |severity|), ``contrast`` (gain about the mean,
signed), ``brightness`` (offset as a fraction of the image's own range on an 8-bit scale, signed), and
``noise`` (Poisson-Gaussian: fewer photons per count and more read noise with |severity|). Severity 0 is
the identity. After a corruption the :class:`Sensor` clips to the camera's range and quantizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

SEVERITIES = tuple(range(-5, 6))
BLUR_RADIUS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)  # severity 0..5, pixels
CONTRAST_GAIN = (3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.9, 0.8, 0.7, 0.5, 0.3)  # severity -5..5
BRIGHTNESS_BIAS = (-150, -135, -120, -90, -50, 0, 50, 90, 120, 135, 150)  # severity -5..5, 8-bit scale
NOISE_PHOTONS = (np.inf, 400.0, 150.0, 60.0, 25.0, 10.0)  # photo-electrons at the mean level, severity 0..5
NOISE_READ = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05)  # read-noise sd as a fraction of the mean level
UNSIGNED = ("blur", "noise")  # kinds where only |severity| matters
BIT_DEPTHS = (8, 10, 12, 14, 16)


@dataclass(frozen=True)
class Sensor:
    """A camera: values are clipped to [0, 2**bit_depth - 1] counts and rounded to whole counts.

    Images already in another range (floats in [0, 1], say) use ``full_scale`` for the top of the range;
    the quantization step is then ``full_scale / (2**bit_depth - 1)``.
    """

    bit_depth: int = 12
    full_scale: float | None = None

    @property
    def top(self) -> float:
        return float(self.full_scale if self.full_scale is not None else 2**self.bit_depth - 1)

    def digitize(self, image: np.ndarray) -> np.ndarray:
        step = self.top / (2**self.bit_depth - 1)
        return (np.round(np.clip(image, 0.0, self.top) / step) * step).astype(np.float32)

    @classmethod
    def for_image(cls, image: np.ndarray) -> Sensor:
        """The smallest common camera bit depth whose range holds the image (floats <= 1: a 16-bit [0, 1])."""
        top = float(np.max(image)) if np.size(image) else 0.0
        if np.issubdtype(np.asarray(image).dtype, np.floating) and top <= 1.0:
            return cls(16, 1.0)
        for bits in BIT_DEPTHS:
            if top <= 2**bits - 1:
                return cls(bits)
        return cls(16, top)


def _check(severity: int) -> int:
    if int(severity) != severity or int(severity) not in SEVERITIES:
        raise ValueError(f"severity must be an integer in -5..5, got {severity}")
    return int(severity)


def disk_kernel(radius: float, supersample: int = 8, alias_sigma: float = 0.5) -> np.ndarray:
    """Normalized defocus kernel: a supersampled pillbox of `radius`, softened by a Gaussian.

    The Gaussian of `alias_sigma` (as in the common ImageNet-C defocus blur) makes even radius 0.5 blur a little.
    """
    r = int(np.ceil(radius)) + 1
    ax = (np.arange((2 * r + 1) * supersample) + 0.5) / supersample - r - 0.5
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    inside = (yy**2 + xx**2 <= radius**2).astype(np.float64)
    k = inside.reshape(2 * r + 1, supersample, 2 * r + 1, supersample).mean((1, 3))
    if alias_sigma:
        k = ndi.gaussian_filter(k, alias_sigma, mode="constant")
    return k / k.sum()


def defocus_blur(image: np.ndarray, severity: int, rng=None) -> np.ndarray:
    """Disk blur of radius ``BLUR_RADIUS[|severity|]`` (defocus either way)."""
    radius = BLUR_RADIUS[abs(_check(severity))]
    if radius == 0:
        return image.copy()
    return ndi.convolve(image, disk_kernel(radius).astype(image.dtype), mode="reflect")


def _range(image: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(image, (0.1, 99.9))
    return float(lo), float(max(hi - lo, 1e-8))


def contrast(image: np.ndarray, severity: int, rng=None) -> np.ndarray:
    """Scale the contrast around the mean by ``CONTRAST_GAIN[severity]``."""
    gain = CONTRAST_GAIN[_check(severity) + 5]
    if gain == 1.0:
        return image.copy()
    mean = float(image.mean())
    return (mean + gain * (image - mean)).astype(image.dtype)


def brightness(image: np.ndarray, severity: int, rng=None) -> np.ndarray:
    """Add ``BRIGHTNESS_BIAS[severity]`` times the image's standard deviation."""
    bias = BRIGHTNESS_BIAS[_check(severity) + 5]
    if bias == 0:
        return image.copy()
    _, span = _range(image)
    return (image + bias / 255.0 * span).astype(image.dtype)


def noise(image: np.ndarray, severity: int, rng=None) -> np.ndarray:
    """Poisson-Gaussian noise: shot noise of `NOISE_PHOTONS` electrons at the mean level plus read noise."""
    sev = abs(_check(severity))
    if sev == 0:
        return image.copy()
    rng = rng if rng is not None else np.random.default_rng(0)
    level = max(float(np.mean(image)), 1e-8)
    gain = level / NOISE_PHOTONS[sev]  # counts per electron
    electrons = rng.poisson(np.clip(image, 0, None) / gain)
    out = electrons * gain + rng.normal(0.0, NOISE_READ[sev] * level, image.shape)
    return out.astype(image.dtype)


CORRUPTIONS = {"blur": defocus_blur, "contrast": contrast, "brightness": brightness, "noise": noise}


def grid(kinds=tuple(CORRUPTIONS), severities=SEVERITIES) -> list[tuple[str, int]]:
    """(kind, severity) pairs of a study, without the duplicate negative severities of unsigned kinds."""
    return [(k, s) for k in kinds for s in severities if s != 0 and not (k in UNSIGNED and s < 0)]


def corrupt(image: np.ndarray, kind: str, severity: int, sensor: Sensor | None = None,
            seed: int = 0) -> np.ndarray:
    """Corrupt a raw 2D image (its own units), then let the camera clip and quantize it.

    Args:
        image: raw image, e.g. camera counts.
        kind: ``blur``, ``contrast``, ``brightness`` or ``noise``.
        severity: integer in -5..5 (0: the image unchanged).
        sensor: the camera; default :meth:`Sensor.for_image` of the clean image.
        seed: seed of the noise.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption '{kind}'; valid: {sorted(CORRUPTIONS)}")
    image = np.asarray(image, np.float32)
    if _check(severity) == 0:
        return image.copy()
    sensor = sensor or Sensor.for_image(image)
    return sensor.digitize(CORRUPTIONS[kind](image, severity, np.random.default_rng(seed)))
