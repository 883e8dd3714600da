"""Invertible intensity normalization and paired augmentation (albumentations).

Geometry is drawn once per sample and applied to input and target alike (the target is registered as an
extra *image*, so it is interpolated bilinearly, not nearest-neighbour); flips and quarter turns alone are
an exact reindexing of the stacked input and target, done by numpy. Rotation/scale work on a larger
source crop that is centre-cropped afterwards, so no empty corners ever reach the network. Corruption
augmentations (blur, contrast, brightness, noise) touch the input only and act on the *raw* field, before
its normalization, exactly like a microscope fault would (see :mod:`labelling.analysis.corruptions`).
"""

from __future__ import annotations

import math

import albumentations
import cv2
import numpy as np

from labelling.analysis.corruptions import CORRUPTIONS, UNSIGNED, corrupt

PER_IMAGE = ("percentile", "zscore", "minmax", "none")
NORMALIZATIONS = (*PER_IMAGE, "fixed")  # fixed: percentile statistics of the whole training set


def norm_stats(image: np.ndarray, method: str = "percentile", low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Per-channel ``(offset, scale)`` for a (C, H, W) image such that ``(x - offset) / scale`` is normalized."""
    if method not in PER_IMAGE:
        hint = " ('fixed' is dataset-level: use dataset_stats)" if method == "fixed" else ""
        raise ValueError(f"unknown per-image normalization '{method}'{hint}; valid: {list(PER_IMAGE)}")
    flat = image.reshape(image.shape[0], -1).astype(np.float64)
    if method == "percentile":
        lo, hi = np.percentile(flat, (low, high), axis=1)
        off, scale = lo, hi - lo
    elif method == "zscore":
        off, scale = flat.mean(1), flat.std(1)
    elif method == "minmax":
        off, scale = flat.min(1), flat.max(1) - flat.min(1)
    else:
        off, scale = np.zeros(len(flat)), np.ones(len(flat))
    return np.stack([off, np.maximum(scale, 1e-6)], 1).astype(np.float32)  # (C, 2)


def dataset_stats(images: list[np.ndarray], max_pixels: int = 200_000, seed: int = 0) -> np.ndarray:
    """Percentile ``(offset, scale)`` per channel of a whole set of (C, H, W) images (``fixed`` normalization).

    Pixels are pooled over the images (an equal random subsample of each, at most `max_pixels` in all), so
    one bright field cannot dominate and the statistics are the same whatever the field order.
    """
    if not images:
        raise ValueError("dataset_stats needs at least one image")
    rng = np.random.default_rng(seed)
    per = max(1, max_pixels // len(images))
    pooled = []
    for img in images:
        flat = img.reshape(img.shape[0], -1)
        take = rng.choice(flat.shape[1], min(per, flat.shape[1]), replace=False)
        pooled.append(flat[:, take])
    pooled = np.concatenate(pooled, 1)
    return norm_stats(pooled[:, None, :], "percentile")


def bin_factor(shape: tuple[int, ...], max_size: int) -> int:
    """Integer binning factor that brings the longer side of `shape` (.., H, W) to at most `max_size` (0: none)."""
    longest = max(shape[-2:])
    return int(np.ceil(longest / max_size)) if max_size and longest > max_size else 1


def bin_image(image: np.ndarray, factor: int) -> np.ndarray:
    """Average `factor` x `factor` blocks of a (C, H, W) image (the remainder rows/columns are dropped)."""
    if factor <= 1:
        return image
    c, h, w = image.shape
    image = image[:, : h - h % factor, : w - w % factor]
    return image.reshape(c, h // factor, factor, w // factor, factor).mean((2, 4)).astype(np.float32)


def normalize(image: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """Apply ``(x - offset) / scale`` per channel; `stats` is (C, 2) from :func:`norm_stats`."""
    return ((image - stats[:, :1, None]) / stats[:, 1:, None]).astype(np.float32)


def denormalize(image, stats):
    """Exact inverse of :func:`normalize`; works on numpy arrays and torch tensors, (C,H,W) or (B,C,H,W)."""
    off, scale = stats[..., 0], stats[..., 1]
    return image * scale[..., None, None] + off[..., None, None]


class PairedAugment:
    """Random geometric augmentation shared by input and target, plus input-only corruptions.

    Args:
        crop: output side length.
        flip: random horizontal/vertical flips and 90-degree rotations.
        rotate: maximum free rotation in degrees (0 disables).
        scale: (min, max) zoom factor.
        corrupt_p: probability of one random corruption of the input.
        max_severity: largest |severity| drawn for corruptions (1..5).
        corruptions: kinds drawn from (default blur, contrast, brightness).
        seed: seed of the augmentation random stream.
    """

    def __init__(self, crop: int, flip: bool = True, rotate: float = 0.0, scale=(1.0, 1.0),
                 corrupt_p: float = 0.0, max_severity: int = 3, corruptions: list[str] | None = None,
                 seed: int = 0):
        self.crop = crop
        self.corrupt_p, self.max_severity = corrupt_p, max_severity
        self.corruption_kinds = list(corruptions or ["blur", "contrast", "brightness"])
        for kind in self.corruption_kinds:
            if kind not in CORRUPTIONS:
                raise ValueError(f"unknown corruption '{kind}' in augment.corruptions; valid: {sorted(CORRUPTIONS)}")
        self.rng = np.random.default_rng(seed)
        self.geometry_rng = np.random.default_rng([seed, 1])
        # Flips and quarter turns alone (the default) are the 8 symmetries of the square: an exact reindexing
        # that numpy applies to the whole stack at once, 10x faster than a per-plane albumentations call
        # (which the training step then waits for). Interpolating geometry (rotate, scale) uses albumentations.
        self.dihedral = bool(flip) and not rotate and tuple(scale) == (1.0, 1.0)
        angle = math.radians(min(abs(rotate), 45.0))
        grow = (math.cos(angle) + math.sin(angle)) / min(scale[0], 1.0) if (rotate or scale[0] < 1) else 1.0
        self.source = int(math.ceil(crop * grow)) + (2 if grow > 1 else 0)
        ops = []
        if flip:
            ops += [albumentations.HorizontalFlip(p=0.5), albumentations.VerticalFlip(p=0.5), albumentations.RandomRotate90(p=0.5)]
        if rotate or tuple(scale) != (1.0, 1.0):
            ops.append(albumentations.Affine(rotate=(-rotate, rotate), scale=tuple(scale), interpolation=cv2.INTER_LINEAR,
                                border_mode=cv2.BORDER_REFLECT_101, p=1.0))
        ops.append(albumentations.CenterCrop(crop, crop))
        self.geometry = albumentations.Compose(ops, seed=seed)
        self._targets = 1

    def reseed(self, seed: int) -> None:
        """Give each DataLoader worker its own stream."""
        self.rng = np.random.default_rng(seed)
        self.geometry_rng = np.random.default_rng([seed, 1])
        self.geometry.set_random_seed(seed)

    def draw_corruption(self) -> tuple[str, int, int] | None:
        """(kind, severity, noise seed) of a random corruption with probability `corrupt_p`, else None."""
        if self.corrupt_p <= 0 or self.rng.uniform() >= self.corrupt_p:
            return None
        kind = str(self.rng.choice(self.corruption_kinds))
        sev = int(self.rng.integers(1, self.max_severity + 1))
        if kind not in UNSIGNED and self.rng.uniform() < 0.5:
            sev = -sev
        return kind, sev, int(self.rng.integers(2**31))

    def corrupt_raw(self, raw: np.ndarray) -> np.ndarray:
        """Corrupt a *raw* (C, H, W) image like the microscope would (upstream of normalization), or not."""
        drawn = self.draw_corruption()
        if drawn is None:
            return raw
        kind, sev, seed = drawn
        return np.stack([corrupt(c, kind, sev, seed=seed) for c in raw])

    def __call__(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(C, S, S) source crops -> (C, crop, crop) augmented crops.

        Every channel of input and target goes through OpenCV as its own single-channel image: OpenCV
        interpolates 1- and n-channel images slightly differently, so this is what makes the geometry
        bit-identical across input and target.
        """
        if self.dihedral:  # one of the 8 symmetries, drawn uniformly, on input and target stacked
            k = int(self.geometry_rng.integers(8))
            both = np.rot90(np.concatenate([x, y]), k % 4, (1, 2))
            both = np.ascontiguousarray(both[:, :, ::-1] if k >= 4 else both)
            return both[: len(x)], both[len(x):]
        planes = [*x, *y]
        if len(planes) > self._targets:
            self.geometry.add_targets({f"c{i}": "image" for i in range(self._targets, len(planes))})
            self._targets = len(planes)
        out = self.geometry(image=np.ascontiguousarray(planes[0]),
                            **{f"c{i}": np.ascontiguousarray(p) for i, p in enumerate(planes[1:], 1)})
        res = [out["image"]] + [out[f"c{i}"] for i in range(1, len(planes))]
        res = [r[..., 0] if r.ndim == 3 else r for r in res]
        return np.stack(res[: len(x)]), np.stack(res[len(x):])
