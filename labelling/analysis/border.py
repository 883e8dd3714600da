"""Error near the field's border vs in its interior: does a prediction degrade where the image ends?

Pure numpy on absolute-error maps (``|prediction - target|``, one (H, W) map per field): the pooled mean in
the outer band against the pooled mean deep inside, and the error by distance from the field centre (where
an uncorrected illumination falloff, rather than the border, shows).
"""

from __future__ import annotations

import numpy as np

__all__ = ["bands", "border_ratio", "by_radius", "by_edge_distance"]


def bands(height: int, width: int, band: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the outer `band` pixels and of the pixels more than 2 x `band` from every edge."""
    rows, cols = np.arange(height)[:, None], np.arange(width)[None]
    edge = np.minimum(np.minimum(rows, height - 1 - rows), np.minimum(cols, width - 1 - cols))
    return edge < band, edge >= 2 * band


def border_ratio(errors: list[np.ndarray], band: int) -> dict:
    """Pooled border and interior mean absolute error of (H, W) error maps, and their ratio."""
    border = interior = 0.0
    n_border = n_interior = 0
    for err in errors:
        outer, inner = bands(*err.shape, band)
        border, n_border = border + float(err[outer].sum()), n_border + int(outer.sum())
        interior, n_interior = interior + float(err[inner].sum()), n_interior + int(inner.sum())
    border, interior = border / n_border, interior / n_interior
    return {"border_mae": border, "interior_mae": interior, "ratio": border / interior}


def by_radius(errors: list[np.ndarray], edges=(0, 30, 60, 90, 120, 150, 180, 400)) -> list[dict]:
    """Mean absolute error in rings of distance from the field centre (pixels)."""
    rows = []
    for low, high in zip(edges[:-1], edges[1:]):
        values = []
        for err in errors:
            height, width = err.shape
            yy, xx = np.mgrid[:height, :width]
            radius = np.hypot(yy - (height - 1) / 2, xx - (width - 1) / 2)
            values.append(err[(radius >= low) & (radius < high)])
        values = np.concatenate(values)
        if values.size:
            rows.append({"from_px": low, "to_px": high, "mae": float(values.mean())})
    return rows


def by_edge_distance(errors: list[np.ndarray], edges=(0, 2, 8, 16, 32, 64, 10_000)) -> list[dict]:
    """Mean absolute error by distance to the nearest field edge (pixels)."""
    rows = []
    for low, high in zip(edges[:-1], edges[1:]):
        values = []
        for err in errors:
            height, width = err.shape
            r, c = np.arange(height)[:, None], np.arange(width)[None]
            edge = np.minimum(np.minimum(r, height - 1 - r), np.minimum(c, width - 1 - c))
            values.append(err[(edge >= low) & (edge < high)])
        values = np.concatenate(values)
        if values.size:
            rows.append({"from_px": low, "to_px": high, "mae": float(values.mean())})
    return rows
