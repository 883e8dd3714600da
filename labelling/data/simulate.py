"""Seeded procedural simulator of a cell-culture well plate: brightfield + six organelle channels + masks.

Every field is reproducible from ``(seed, well, field)`` alone. Cells are star-shaped domes with an
elliptical nucleus. Organelles are drawn where biology puts them: textured chromatin with nucleoli, an ER
network that thins towards the cell edge, Golgi puncta in a perinuclear crescent, a cortical actin ring
with stress fibres, and clone-level GFP expression (some wells negative). The brightfield image is a
defocused phase image of the cells' optical thickness (transport-of-intensity contrast, ``1 - dz * lap(phi)``)
with uneven illumination and shot noise, so organelles are only *indirectly* visible, as in real data.

Two phenotypes differ the way a treated clone would: larger nuclei with more nucleoli, a fragmented,
dispersed Golgi and fewer stress fibres.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dc_field

import numpy as np
from scipy import ndimage as ndi

CHANNELS = ("nuclei", "er", "golgi", "actin", "gfp", "nucleoli")
ROWS = "ABCDEFGH"


@dataclass
class Field:
    """One simulated field of view.

    Attributes:
        brightfield: (H, W) float32 transmitted-light image (camera counts).
        fluorescence: (6, H, W) float32, channel order :data:`CHANNELS`.
        cells: (H, W) int32 cell instance labels (0 = background).
        nuclei: (H, W) int32 nucleus instance labels, same ids as their cell.
        masks: (6, H, W) bool true foreground of each channel.
    """

    brightfield: np.ndarray
    fluorescence: np.ndarray
    cells: np.ndarray
    nuclei: np.ndarray
    masks: np.ndarray
    plate: str = "P1"
    well: str = "A1"
    field: int = 0
    phenotype: int = 0
    gfp_positive: bool = True
    meta: dict = dc_field(default_factory=dict)

    def channel(self, name: str) -> np.ndarray:
        return self.fluorescence[CHANNELS.index(name)]


def _noise(rng, shape, sigma):
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return n / (n.std() + 1e-8)


def _splat(shape, ys, xs, weights, sigma):
    """Gaussian blobs at sub-pixel points: accumulate impulses, blur once (fast for many points)."""
    img = np.zeros(shape, np.float32)
    ys, xs = np.round(ys).astype(int), np.round(xs).astype(int)
    keep = (ys >= 0) & (ys < shape[0]) & (xs >= 0) & (xs < shape[1])  # points outside the field are cut off
    np.add.at(img, (ys[keep], xs[keep]), np.asarray(weights)[keep])
    return ndi.gaussian_filter(img, sigma) * (2 * np.pi * sigma**2)


def _place_centres(rng, size, n, min_dist, margin):
    pts: list[tuple[float, float]] = []
    for _ in range(n * 60):
        if len(pts) == n:
            break
        p = rng.uniform(-margin, size + margin, 2)
        if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 >= min_dist**2 for q in pts):
            pts.append((float(p[0]), float(p[1])))
    return np.array(pts, np.float32).reshape(-1, 2)


def simulate_field(
    seed: int | list[int] = 0,
    size: int = 256,
    phenotype: int = 0,
    gfp_positive: bool = True,
    density: float = 1.0,
    cell_radius: float = 20.0,
    noise: float = 0.02,
    live: float = 0.0,
) -> Field:
    """Render one field.

    Args:
        seed: int or list of ints for ``np.random.default_rng``.
        size: side length in pixels (fields are square).
        phenotype: 0 (control) or 1 (treated-like morphology).
        gfp_positive: whether this clone expresses the GFP reporter.
        density: multiplies the number of cells per area.
        cell_radius: mean cell radius in pixels; sets the image scale.
        noise: relative noise level of every channel.
        live: 0 for fixed cells; up to 1 for live, unfixed cells imaged in brightfield - rounder and
            thicker cells with less nuclear contrast, motion blur along a random direction and a drifting
            focus (a real-looking shift for drift detection, thesis 9.2). The cells are the same ones in the
            same places, and a field with ``live=0`` is exactly the fixed field of the same seed.
    """
    rng = np.random.default_rng(seed)
    H = W = size
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    n_cells = max(1, int(rng.poisson(density * 0.55 * size * size / (np.pi * cell_radius**2))))
    centres = _place_centres(rng, size, n_cells, 1.45 * cell_radius, 0.3 * cell_radius)

    cells = np.zeros((H, W), np.int32)
    nuclei = np.zeros((H, W), np.int32)
    best = np.full((H, W), np.inf, np.float32)
    cell_h = np.zeros((H, W), np.float32)  # dome height of cytoplasm
    nuc_h = np.zeros((H, W), np.float32)
    nuc_tex = np.zeros((H, W), np.float32)
    gfp = np.zeros((H, W), np.float32)
    edge = np.zeros((H, W), np.float32)  # 1 at the cell cortex
    nuc_dist = np.full((H, W), np.inf, np.float32)  # distance to own nucleus, in cell radii
    golgi_pts, nucleoli_pts, fibre_imgs = [], [], np.zeros((H, W), np.float32)
    chromatin = 0.5 + 0.5 * np.tanh(_noise(rng, (H, W), 1.2))

    big_nuc = 1.25 if phenotype else 1.0
    for i, (cy, cx) in enumerate(centres, start=1):
        R = cell_radius * rng.uniform(0.8, 1.2)
        box = (slice(max(0, int(cy - 1.4 * R)), min(H, int(cy + 1.4 * R) + 1)),
               slice(max(0, int(cx - 1.4 * R)), min(W, int(cx + 1.4 * R) + 1)))
        if box[0].stop <= box[0].start or box[1].stop <= box[1].start:
            continue
        y, x = yy[box] - cy, xx[box] - cx
        theta = np.arctan2(y, x)
        radius = np.ones_like(theta)
        for k in (2, 3, 4):  # live cells round up: weaker shape harmonics (same draws, so live=0 is unchanged)
            radius += (1 - 0.8 * live) * rng.uniform(0, 0.12 / k * 2) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        rho = np.hypot(y, x) / (R * radius)
        mine = (rho < 1) & (rho < best[box])
        if mine.sum() < 20:
            continue
        best[box] = np.where(mine, rho, best[box])
        cells[box][mine] = i
        cell_h[box] = np.where(mine, np.sqrt(np.clip(1 - rho**2, 0, 1)), cell_h[box])
        edge[box] = np.where(mine, np.exp(-((1 - rho) / 0.07) ** 2), edge[box])
        expression = rng.lognormal(0.0, 0.35) if gfp_positive else 0.0
        gfp[box] = np.where(mine, expression, gfp[box])

        # Nucleus: an ellipse slightly off-centre, clipped to the cell.
        a = R * rng.uniform(0.42, 0.52) * big_nuc
        b = a * rng.uniform(0.7, 1.0) / (1.1 if phenotype else 1.0)
        phi = rng.uniform(0, np.pi)
        off = rng.uniform(0, 0.15 * R, 2)
        ny, nx = cy + off[0], cx + off[1]
        u = (xx[box] - nx) * np.cos(phi) + (yy[box] - ny) * np.sin(phi)
        v = -(xx[box] - nx) * np.sin(phi) + (yy[box] - ny) * np.cos(phi)
        rn = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        inside = mine & (rn < 1)
        nuclei[box][inside] = i
        nuc_h[box] = np.where(inside, np.sqrt(np.clip(1 - rn**2, 0, 1)), nuc_h[box])
        nuc_tex[box] = np.where(inside, rng.uniform(0.6, 1.4) * (0.55 + 0.45 * chromatin[box]), nuc_tex[box])
        nuc_dist[box] = np.where(mine, np.clip(rn - 1, 0, None) * a / R, nuc_dist[box])

        # Nucleoli: a few blobs well inside the nucleus.
        k = rng.integers(3, 6) if phenotype else rng.integers(1, 4)
        t, r = rng.uniform(0, 2 * np.pi, k), np.sqrt(rng.uniform(0, 0.35, k))
        nucleoli_pts += [(ny + r * b * np.sin(t), nx + r * a * np.cos(t), rng.uniform(0.7, 1.3, k))]

        # Golgi: perinuclear crescent (control) or fragmented and dispersed (treated).
        side = rng.uniform(0, 2 * np.pi)
        if phenotype:
            m = rng.integers(14, 24)
            ang = rng.uniform(0, 2 * np.pi, m)
            dist = rng.uniform(1.05, 1.9, m)
        else:
            m = rng.integers(8, 14)
            ang = side + rng.normal(0, 0.45, m)
            dist = rng.uniform(1.0, 1.3, m)
        gy = ny + dist * (a * np.abs(np.cos(ang - phi)) + b * np.abs(np.sin(ang - phi))) * np.sin(ang)
        gx = nx + dist * (a * np.abs(np.cos(ang - phi)) + b * np.abs(np.sin(ang - phi))) * np.cos(ang)
        golgi_pts += [(gy, gx, rng.uniform(0.6, 1.4, m))]

        # Stress fibres: straight lines across the cell, masked to it below.
        for _ in range(rng.integers(0, 2) if phenotype else rng.integers(2, 5)):
            ang, shift = rng.uniform(0, np.pi), rng.uniform(-0.5, 0.5) * R
            dist_line = np.abs(-(x) * np.sin(ang) + y * np.cos(ang) - shift)
            fibre_imgs[box] += np.where(mine, np.exp(-(dist_line / 0.9) ** 2) * rng.uniform(0.3, 0.7), 0)

    cyto = (cells > 0) & (nuclei == 0)
    pts = lambda lst, j: np.concatenate([p[j] for p in lst]) if lst else np.zeros(0)  # noqa: E731
    nucleoli = _splat((H, W), pts(nucleoli_pts, 0), pts(nucleoli_pts, 1), pts(nucleoli_pts, 2), 1.6)
    nucleoli *= nuclei > 0
    golgi = _splat((H, W), pts(golgi_pts, 0), pts(golgi_pts, 1), pts(golgi_pts, 2), 1.2) * (cells > 0)
    net_noise = _noise(rng, (H, W), 1.8)
    er_net = np.exp(-(net_noise / 0.35) ** 2)  # zero-crossings of band-limited noise form a network
    er = cyto * er_net * np.exp(-np.where(np.isfinite(nuc_dist), nuc_dist, 9) / 0.45) * (0.3 + cell_h)
    actin = (edge + fibre_imgs) * (cells > 0)
    nuc_signal = nuc_tex * (0.4 + 0.6 * nuc_h) * (1 - 0.6 * np.clip(nucleoli, 0, 1))
    gfp_img = gfp * (0.25 + cell_h) * np.where(nuclei > 0, 0.75, 1.0)

    clean = np.stack([nuc_signal, er, golgi, actin, gfp_img, nucleoli]).astype(np.float32)
    clean = ndi.gaussian_filter(clean, (0, 0.8, 0.8))  # optical PSF
    masks = np.stack([nuclei > 0, er > 0.15, golgi > 0.25, actin > 0.3, gfp_img > 0.1, nucleoli > 0.25])

    # Brightfield: optical thickness -> defocused phase contrast + weak absorption, uneven illumination.
    thickness = (1.0 + 0.5 * live) * cell_h + 0.8 * (1 - 0.5 * live) * nuc_h + 0.6 * nucleoli + 0.35 * golgi + 0.45 * er
    live_rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), 104729])  # never shifts the fixed draws
    focus = 1.0 + live * live_rng.uniform(0.5, 1.5)  # live plates drift out of focus
    phase = ndi.gaussian_filter(thickness, focus)
    if live > 0:  # cells move during the exposure: blur along one direction
        length, angle = 1 + int(round(4 * live)), live_rng.uniform(0, np.pi)
        steps = np.arange(-length, length + 1)
        phase = np.mean([ndi.shift(phase, (t * np.sin(angle), t * np.cos(angle)), order=1, mode="nearest")
                         for t in steps], axis=0)
    bf = 1.0 - 0.9 * ndi.laplace(phase) - 0.08 * phase
    illum = 1 + 0.12 * (xx / W - 0.5) * rng.uniform(-1, 1) + 0.12 * (yy / H - 0.5) * rng.uniform(-1, 1)
    illum -= 0.1 * (((xx - W / 2) ** 2 + (yy - H / 2) ** 2) / (W * W / 2))
    bf = bf * illum + noise * rng.standard_normal((H, W))

    fluo = 1000.0 * clean + 100.0  # camera offset
    fluo = fluo + noise * 1000.0 * np.sqrt(np.clip(clean, 0, None) + 0.05) * rng.standard_normal(clean.shape)
    return Field(
        brightfield=(2000.0 * bf).astype(np.float32),
        fluorescence=fluo.astype(np.float32),
        cells=cells,
        nuclei=nuclei,
        masks=masks,
        phenotype=phenotype,
        gfp_positive=gfp_positive,
    )


def well_name(index: int, cols: int = 12) -> str:
    """Plate well name of a running index (A1, A2, ... row-major, `cols` per row)."""
    return f"{ROWS[index // cols % len(ROWS)]}{index % cols + 1}"


def simulate_plate(
    seed: int = 0,
    n_wells: int = 8,
    fields_per_well: int = 4,
    size: int = 256,
    gfp_negative_fraction: float = 0.25,
    **field_args,
) -> list[Field]:
    """Simulate a plate: alternating phenotypes per well, some GFP-negative clones, several fields per well.

    Each field depends only on ``(seed, well, field)``, so growing the plate never changes existing fields.
    """
    out = []
    for w in range(n_wells):
        wrng = np.random.default_rng([seed, w, 7919])
        phenotype = w % 2
        positive = bool(wrng.uniform() >= gfp_negative_fraction)
        for f in range(fields_per_well):
            fld = simulate_field([seed, w, f], size=size, phenotype=phenotype, gfp_positive=positive,
                                 **field_args)
            fld.plate, fld.well, fld.field = f"P{seed}", well_name(w), f
            out.append(fld)
    return out
