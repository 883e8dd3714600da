"""Paired augmentation (albumentations); the normalization rule is :mod:`labelling.data.normalization`.

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


def reflect_index(index: np.ndarray, size: int) -> np.ndarray:
    """Map positions outside [0, size) into it by mirror reflection without repeating the edge (numpy 'reflect')."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.mod(index, period)
    return np.where(index >= size, period - index, index)


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
