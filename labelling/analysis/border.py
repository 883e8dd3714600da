"""Error near the field's border vs in its interior: does a prediction degrade where the image ends?

Pure numpy on absolute-error maps (``|prediction - target|``, one (H, W) map per field): the pooled mean in
the outer band against the pooled mean deep inside, and the error by distance from the field centre (where
an uncorrected illumination falloff, rather than the border, shows).
"""

from __future__ import annotations

import numpy as np

__all__ = ["edge_distance", "centre_distance", "bands", "border_ratio", "binned_error", "by_radius", "by_edge_distance"]


def edge_distance(height: int, width: int) -> np.ndarray:
    """(H, W) distance of each pixel to the nearest field edge (0 on the outermost rows and columns)."""
    rows, cols = np.arange(height)[:, None], np.arange(width)[None]
    return np.minimum(np.minimum(rows, height - 1 - rows), np.minimum(cols, width - 1 - cols))


def centre_distance(height: int, width: int) -> np.ndarray:
    """(H, W) distance of each pixel to the field's centre."""
    yy, xx = np.mgrid[:height, :width]
    return np.hypot(yy - (height - 1) / 2, xx - (width - 1) / 2)


def bands(height: int, width: int, band: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the outer `band` pixels and of the pixels more than 2 x `band` from every edge."""
    edge = edge_distance(height, width)
    return edge < band, edge >= 2 * band


def border_ratio(errors: list[np.ndarray], band: int) -> dict:
    """Pooled border and interior mean absolute error of (H, W) error maps, and their ratio."""
    masks = [bands(*err.shape, band) for err in errors]
    border = np.concatenate([err[outer] for err, (outer, _) in zip(errors, masks)]).mean()
    interior = np.concatenate([err[inner] for err, (_, inner) in zip(errors, masks)]).mean()
    return {"border_mae": float(border), "interior_mae": float(interior), "ratio": float(border / interior)}


def binned_error(errors: list[np.ndarray], distance, edges) -> list[dict]:
    """Mean absolute error pooled over the error maps in bins ``[low, high)`` of ``distance(H, W)`` (pixels)."""
    rows = []
    for low, high in zip(edges[:-1], edges[1:]):
        values = np.concatenate([err[(d >= low) & (d < high)] for err in errors for d in [distance(*err.shape)]])
        if values.size:
            rows.append({"from_px": low, "to_px": high, "mae": float(values.mean())})
    return rows


def by_radius(errors: list[np.ndarray], edges=(0, 30, 60, 90, 120, 150, 180, 400)) -> list[dict]:
    """Mean absolute error in rings of distance from the field centre (pixels)."""
    return binned_error(errors, centre_distance, edges)


def by_edge_distance(errors: list[np.ndarray], edges=(0, 2, 8, 16, 32, 64, 10_000)) -> list[dict]:
    """Mean absolute error by distance to the nearest field edge (pixels)."""
    return binned_error(errors, edge_distance, edges)
