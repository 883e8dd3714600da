"""What a data module hands the trainer: normalized fields, random training crops, grid validation crops.

Fields are :class:`Image` objects; crops come as typed batch dicts (:func:`to_batch`).

A batch is a dict: ``input`` (B, Cin, h, w), ``target`` (B, Cout, h, w), ``target_stats`` (B, Cout, 2)
to invert the target normalization, ``input_stats`` likewise, and ``index`` of the source image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from labelling.data.augment import PairedAugment, reflect_index
from labelling.data.normalization import denormalize, illumination_surface

__all__ = ["Image", "to_batch", "RandomCrops", "GridCrops", "foreground_threshold"]


@dataclass
class Image:
    """One normalized field: input (Cin,H,W), target (Cout,H,W), their stats and split group."""

    input: np.ndarray
    target: np.ndarray
    input_stats: np.ndarray
    target_stats: np.ndarray
    group: str
    key: str
    extra: dict | None = None
    raw_channels: int | None = None  # with a cascade: the leading channels that are the real raw input
    illumination: np.ndarray | None = None  # data.flatfield: the raw channels' fitted illumination, divided out

    def raw_input(self) -> np.ndarray:
        """The input in its own units (camera counts), as a deployed model receives it."""
        raw = denormalize(self.input, self.input_stats).astype(np.float32)[: self.raw_channels]
        if self.illumination is not None:  # the field as it came from the camera, illumination and all
            n = len(self.illumination)
            raw[:n] *= illumination_surface(self.illumination, *raw.shape[1:])
        return raw

    def raw_target(self) -> np.ndarray:
        """The target in its own units (after the target transform): what predictions are scored against."""
        return denormalize(self.target, self.target_stats).astype(np.float32)


def to_batch(x, y, xs, ys, index) -> dict:
    """The typed batch dict: input, target, their normalization statistics and the image index."""
    return {"input": torch.from_numpy(x), "target": torch.from_numpy(y), "input_stats": torch.from_numpy(xs),
            "target_stats": torch.from_numpy(ys), "index": index}


class RandomCrops(Dataset):
    """`length` random crops per epoch from a list of images, augmented with :class:`PairedAugment`."""

    def __init__(self, images: list[Image], length: int, augment: PairedAugment, seed: int = 0,
                 renormalize=None, foreground: float = 0.0, min_fraction: float = 0.02, mirror_margin: int = 0):
        self.images, self.length, self.augment, self.seed = images, length, augment, seed
        self.mirror_margin = int(mirror_margin)  # uniform crops may reach this far past the edge, mirrored
        self.renormalize = renormalize  # raw (C, H, W) -> normalized, for corruption augmentation
        self.rng = np.random.default_rng(seed)
        self._worker = None
        # Foreground-aware sampling: on sparse real images most uniform crops hold only background (43 % of
        # mlcp_dna's, 69 % of isl_dapi's), so a share `foreground` of the crops is drawn until one holds at
        # least `min_fraction` foreground pixels (the target above the training split's triangle threshold).
        self.foreground, self.min_fraction = float(foreground), float(min_fraction)
        self.tables: list[np.ndarray] = []
        self.pixels: list[np.ndarray] = []
        self.cumulative = None  # cumulative image weights of the foreground draw
        if self.foreground > 0:
            threshold = foreground_threshold(images)
            for img in images:  # summed-area tables: the foreground count of any crop in O(1)
                mask = (img.target > threshold).any(0)
                self.tables.append(np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0))).astype(np.int64))
                self.pixels.append(np.flatnonzero(mask).astype(np.int64))
            counts = np.array([len(p) for p in self.pixels], float)
            self.cumulative = np.cumsum(counts / counts.sum()) if counts.sum() > 0 else None

    def _position(self, H: int, W: int, s: int) -> tuple[int, int]:
        return int(self.rng.integers(H - s + 1)), int(self.rng.integers(W - s + 1))

    def _foreground_crop(self, s: int) -> tuple[int, int, int] | None:
        """(image, top, left) of a crop with enough foreground, or None after 10 tries."""
        for _ in range(10):  # a crop around a random foreground pixel (at a random place in the crop)
            k = min(int(np.searchsorted(self.cumulative, self.rng.random(), side="right")), len(self.images) - 1)
            H, W = self.images[k].input.shape[1:]
            if H < s or W < s:
                return None
            y, x = divmod(int(self.pixels[k][self.rng.integers(len(self.pixels[k]))]), W)
            top = int(np.clip(y - self.rng.integers(s), 0, H - s))
            left = int(np.clip(x - self.rng.integers(s), 0, W - s))
            t = self.tables[k]
            count = t[top + s, left + s] - t[top, left + s] - t[top + s, left] + t[top, left]
            if count >= self.min_fraction * s * s:
                return k, top, left
        return None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        # One random stream per (DDP rank, worker): ranks and workers draw different crops, reproducibly.
        info = get_worker_info()
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        key = (rank, info.id if info else -1, info.seed if info else 0)
        if key != self._worker:
            self._worker = key
            seed = [self.seed, rank, (info.seed % 2**31) if info else 0]
            self.rng = np.random.default_rng(seed)
            self.augment.reseed(int(np.random.default_rng(seed).integers(2**31)))
        s = self.augment.source
        chosen = None
        if self.cumulative is not None and self.rng.random() < self.foreground:
            chosen = self._foreground_crop(s)
        k = chosen[0] if chosen else int(self.rng.integers(len(self.images)))
        img = self.images[k]
        H, W = img.input.shape[1:]
        x, y = img.input, img.target
        if self.augment.corrupt_p > 0 and self.renormalize is not None:
            # Corrupt the raw field, then normalize it as deployment would: a contrast or brightness change
            # that per-image normalization cancels is cancelled here too.
            raw = img.raw_input()
            corrupted = self.augment.corrupt_raw(raw)
            if corrupted is not raw:
                x = self.renormalize(corrupted, img)
        if H < s or W < s:  # small images: reflect-pad up to the source crop
            pad = ((0, 0), (0, max(0, s - H)), (0, max(0, s - W)))
            x, y = np.pad(x, pad, mode="reflect"), np.pad(y, pad, mode="reflect")
            H, W = x.shape[1:]
        m = 0 if chosen else min(self.mirror_margin, H - 1, W - 1)
        top, left = chosen[1:] if chosen else self._position(H + 2 * m, W + 2 * m, s)
        if m:  # the field mirrored past its edge, as predict's halo mirrors it (the target alike)
            rows, cols = reflect_index(np.arange(top - m, top - m + s), H), reflect_index(np.arange(left - m, left - m + s), W)
            x, y, top, left = x[:, rows][:, :, cols], y[:, rows][:, :, cols], 0, 0
        xc, yc = self.augment(x[:, top:top + s, left:left + s], y[:, top:top + s, left:left + s])
        return to_batch(xc, yc, img.input_stats, img.target_stats, k)


def foreground_threshold(images: list[Image], samples: int = 200_000, seed: int = 0) -> float:
    """Triangle threshold of the pooled (normalized) targets of `images`: what counts as stained foreground.

    The triangle method suits fluorescence, where a dominant background peak hides rare bright objects
    (Otsu's threshold then lands inside the background noise).
    """
    from skimage.filters import threshold_triangle

    rng = np.random.default_rng(seed)
    per = max(1, samples // max(1, len(images)))
    pooled = np.concatenate([rng.choice(img.target.ravel(), min(per, img.target.size), replace=False)
                             for img in images])
    return float(threshold_triangle(pooled)) if np.ptp(pooled) > 0 else float(pooled.max())


class GridCrops(Dataset):
    """Deterministic non-overlapping crops (val/test); `crop=None` yields whole images cut to a multiple."""

    def __init__(self, images: list[Image], crop: int | None, multiple: int = 16):
        self.images, self.items = images, []
        for k, img in enumerate(images):
            H, W = img.input.shape[1:]
            if crop is None:
                self.items.append((k, 0, 0, H - H % multiple, W - W % multiple))
            elif H < crop or W < crop:  # a field smaller than the crop is still validated, whole
                self.items.append((k, 0, 0, max(multiple, H - H % multiple), max(multiple, W - W % multiple)))
            else:
                self.items += [(k, t, l, crop, crop) for t in range(0, H - crop + 1, crop)
                               for l in range(0, W - crop + 1, crop)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        k, t, l, h, w = self.items[i]
        img = self.images[k]
        return to_batch(np.ascontiguousarray(img.input[:, t:t + h, l:l + w]),
                        np.ascontiguousarray(img.target[:, t:t + h, l:l + w]), img.input_stats, img.target_stats, k)
