"""THE prediction path: raw image -> training normalization -> tiled net -> de-normalized output.

Everything that turns a transmitted-light image into a predicted stain calls :func:`predict`: the ``predict``
command for images and plates, ``evaluate``, every study and run-end callback, the prediction panels, the
app and the exports' checks. Nothing else predicts, so a score in a report is a score of what a user gets.

What the model needs at deployment is its typed :class:`~labelling.deployment.Deployment`, stored with it,
never anything of the image being predicted beyond its own input pixels:

* ``max_size`` - fields binned to this longer side in training are binned the same way before prediction,
  and the output is resized back to the input's size;
* ``normalize`` - how inputs were normalized in training: per image (``percentile``, ``zscore``,
  ``minmax``), ``fixed`` (dataset-level statistics of the training inputs) or ``none``;
* ``target_stats`` / ``denormalize`` - ``(offset, scale)`` per output channel mapping the network output to
  target units: the training targets' statistics for losses with units, an affine calibration fitted on the
  training split for scale-free losses (Pearson), nothing for logit losses (probabilities);
* ``null_level`` - the mean training target: the null ("blind") predictor every score is compared with;
* ``tta`` - each tile's output is the average over its 8 flips and 90-degree rotations (8x the cost);
* ``cascade`` - other runs' predictions of the same raw image are appended as input channels.

The field is tiled by the one tiler (:mod:`labelling.inference.tiling`): overlapping tiles blended with a
centre-weighted window, streamed band by band. A lazily read field (a plate's, :class:`Source`) is streamed
from storage to a writer without ever being whole in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from labelling.data.normalization import (
    MAX_SCALE,
    bin_factor,
    bin_image,
    image_stats,
    moment_matching,
    normalize,
    rescale,
)
from labelling.errors import ImageError
from labelling.inference.model import Model, as_model
from labelling.inference.tiling import BLENDS, fit_tile, tile_image, tile_rows

MAX_TILE = 8192


class Source(Protocol):
    """A field read lazily (e.g. from a plate): raw rows on demand and, when stored, its statistics."""

    name: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the raw input."""

    def read(self, top: int, bottom: int) -> np.ndarray:
        """Raw input rows (C, bottom - top, W)."""

    def stats(self, method: str) -> np.ndarray | None:
        """Per-image (C, 2) statistics of the whole field for `method`, or None to compute them from pixels."""


def check_options(scale: float = 1.0, tile: int = 256, overlap: float = 0.25, blend: str = "gaussian",
                  batch_size: int = 8, halo: int = 0) -> None:
    """Refuse prediction settings out of range, naming the valid range (ValueError)."""
    if not np.isfinite(scale) or not 0 < scale <= MAX_SCALE:
        raise ValueError(f"scale must be in (0, {MAX_SCALE:g}], got {scale}")
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or not 1 <= tile <= MAX_TILE:
        raise ValueError(f"tile must be a whole number of pixels in 1..{MAX_TILE}, got {tile}")
    if not np.isfinite(overlap) or not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1) (a fraction of the tile), got {overlap}")
    if blend not in BLENDS:
        raise ValueError(f"unknown blend '{blend}'; valid: {list(BLENDS)}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive whole number, got {batch_size}")
    if not isinstance(halo, (int, np.integer)) or halo < 0:
        raise ValueError(f"halo must be a whole number of pixels >= 0, got {halo}")


def check_image(raw: np.ndarray, in_channels: int, name: str = "image") -> np.ndarray:
    """(H, W) or (C, H, W) raw image with finite pixels and the channel count the model expects -> float32."""
    raw = np.asarray(raw)
    if raw.ndim == 2:
        raw = raw[None]
    if raw.ndim != 3:
        raise ImageError(f"{name}: expected a (H, W) or (C, H, W) image, got shape {raw.shape}")
    if np.iscomplexobj(raw):
        raise ImageError(f"{name}: complex-valued pixels; give a real-valued image")
    if raw.shape[0] != in_channels:
        raise ImageError(f"{name}: the model takes {in_channels} input channel(s), the image has {raw.shape[0]}")
    raw = raw.astype(np.float32)
    _check_finite(raw, name, "input")
    return raw


def _check_finite(array: np.ndarray, name: str, what: str) -> None:
    if not np.isfinite(array).all():
        if what == "input":
            raise ImageError(f"{name}: the input image contains NaN/inf pixels")
        raise FloatingPointError(f"{name}: the model produced NaN/inf values from finite input "
                                 "(a diverged checkpoint?)")


def tile_model(model: Model):
    """The callable the tiler runs on normalized square tiles: the model, or its 8-fold TTA average."""
    if not model.deployment.tta:
        return model.tiles

    def averaged(x: torch.Tensor) -> torch.Tensor:
        total = 0
        for k in range(4):
            for flip in (False, True):
                view = torch.rot90(x, k, (2, 3))
                view = view.flip(3) if flip else view
                y = model.tiles(view)
                y = y.flip(3) if flip else y
                total = total + torch.rot90(y, -k, (2, 3))
        return total / 8

    return averaged


def predict(model, raw, scale: float = 1.0, tile: int = 256, overlap: float = 0.25, blend: str = "gaussian",
            batch_size: int = 8, normalization: str | None = None, name: str | None = None, write=None,
            halo: int = 0, denormalize: bool = True) -> np.ndarray | None:
    """Raw transmitted-light image -> predicted fluorescence in target units, exactly as deployed.

    Args:
        model: a :class:`~labelling.inference.model.Model` (from :func:`labelling.inference.load.load`) or a
            trained task in memory.
        raw: (H, W) or (Cin, H, W) image in its own units (camera counts), or a lazily read :class:`Source`.
        scale: resize the *normalized* input by this factor first and the output back (scaling study).
        tile: tile side (fitted down to a multiple of the net's ``spatial_multiple``).
        overlap: fraction of a tile shared with each neighbour, in [0, 1).
        blend: tile blending window, ``gaussian``, ``linear`` or ``constant``.
        batch_size: tiles per forward pass.
        normalization: override the input normalization (only for the fixed-normalization view of the
            stability study); None uses the model's own.
        name: what error messages call the image.
        write: ``write(top, bottom, rows)``: receive the output band by band instead of as one array
            (a lazily read field is then streamed end to end).
        halo: mirrored border (pixels) added around the field before tiling.
        denormalize: False returns the activated network output before de-normalization (calibration).

    Returns:
        (Cout, H, W) float32 in target units (probabilities for logit losses), or None with `write`.
    """
    check_options(scale, tile, overlap, blend, batch_size, halo)
    model = as_model(model)
    dep = model.deployment
    name = name or getattr(raw, "name", None) or "image"
    finish = dep.denormalize_output if denormalize else (lambda y: y)
    lazy = not isinstance(raw, np.ndarray) and hasattr(raw, "read")
    if lazy:
        channels, height, width = raw.shape
        if channels != model.raw_channels:
            raise ImageError(f"{name}: the model takes {model.raw_channels} input channel(s), the field gives {channels}")
        size = fit_tile(dep.spatial_multiple, tile, max(height, width))
        streamable = (write is not None and not model.cascade and scale == 1.0 and normalization is None
                      and not dep.flatfield and bin_factor((1, height, width), dep.max_size) == 1)
        if streamable:
            stats = dep.input_stats_for(None, "fixed") if dep.normalize == "fixed" else raw.stats(dep.normalize)
            if stats is None:
                stats = image_stats(check_image(raw.read(0, height), channels, name), dep.normalize)

            def read(top: int, bottom: int) -> np.ndarray:
                rows = raw.read(top, bottom)
                _check_finite(rows, name, "input")
                return normalize(rows, stats)

            def deliver(top: int, bottom: int, rows: np.ndarray) -> None:
                y = finish(rows)
                _check_finite(y, name, "output")
                write(top, bottom, y)

            tile_rows(tile_model(model), read, height, width, deliver, tile=size, overlap=overlap, blend=blend,
                      batch_size=batch_size, device=model.device, halo=halo)
            return None
        raw = raw.read(0, height)  # binned, cascaded or rescaled: the whole field in memory
    raw = check_image(raw, model.raw_channels, name)
    if model.cascade:  # the cascade's predictions of the raw image as extra input channels, as in training
        raw = append_cascade(model.cascade, raw, name, tile=tile, overlap=overlap, blend=blend)
    height, width = raw.shape[1:]
    binned = bin_image(raw, bin_factor(raw.shape, dep.max_size))  # the training geometry
    x = rescale(dep.normalize_input(binned, normalization), scale)
    size = fit_tile(dep.spatial_multiple, tile, max(x.shape[1:]))
    y = tile_image(tile_model(model), x, tile=size, overlap=overlap, blend=blend, batch_size=batch_size,
                   device=model.device, halo=halo)
    y = rescale(y, 1.0, shape=(height, width)) if y.shape[1:] != (height, width) else y
    y = finish(y)
    _check_finite(y, name, "output")
    if write is not None:
        write(0, height, y)
        return None
    return y


def append_cascade(cascade: list[Model], raw: np.ndarray, name: str = "image", **predict_args) -> np.ndarray:
    """Raw (Cin, H, W) input followed by each cascade model's prediction of it.

    Training data (:mod:`labelling.data.datamodule`) and deployment both build a cascaded model's input here.
    """
    return np.concatenate([raw] + [predict(m, raw, name=name, **predict_args) for m in cascade]).astype(np.float32)


def calibrate_affine(model, raw_inputs: list[np.ndarray], raw_targets: list[np.ndarray]) -> np.ndarray:
    """(Cout, 2) affine de-normalization for a scale-free loss, fitted on *training* images only.

    Matches the mean and standard deviation of the network output pooled over the given fields to those of
    the real targets (moment matching keeps the intensity spread, unlike a least-squares fit that shrinks
    it towards the mean). Returns ``(offset, scale)`` rows for ``Deployment.target_stats``.
    """
    model = as_model(model)
    outs = np.concatenate([predict(model, x, denormalize=False).reshape(model.out_channels, -1)
                           for x in raw_inputs], 1)
    targets = np.concatenate([np.asarray(y, np.float32).reshape(len(y), -1) for y in raw_targets], 1)
    offset, gain = moment_matching(outs.mean(1), np.maximum(outs.std(1), 1e-8), targets.mean(1), targets.std(1))
    return np.stack([offset, np.maximum(gain, 1e-8)], 1).astype(np.float32)


def predict_null(model, raw: np.ndarray) -> np.ndarray:
    """The null predictor: the training-mean target intensity everywhere, whatever the input."""
    return as_model(model).null_image(raw)


def read_input(model, path: str | Path, channel: int | None = None, rgb: str | None = None,
               planes: int | str | list[int] | None = None) -> np.ndarray:
    """Read a raw input file as the model takes it: (Cin, H, W).

    A 2.5D model (trained on z planes, ``Deployment.planes``) takes the same planes from a z-stack file
    (`planes` overrides them); another multi-channel model takes a file with exactly its channel count; a
    one-channel model reads a 2D image (`channel` / `rgb` pick from an RGB or multichannel file).
    """
    from labelling.data.readers import image_header, read_image

    model = as_model(model)
    dep = model.deployment
    in_channels = model.raw_channels
    explicit = planes is not None
    planes = planes if explicit else dep.planes
    if explicit or (planes is not None and len(planes) > 1):  # a 2.5D model: its planes of a z-stack
        image = read_image(path, channel=channel, rgb=rgb, planes=planes)
    elif in_channels == 1:  # also a one-plane plate's model: a plain 2D image
        image = read_image(path, channel=channel, rgb=rgb)[None]
    else:
        shape, _ = image_header(path)
        image = read_image(path, planes="all") if len(shape) >= 3 else read_image(path)[None]
    if len(image) != in_channels:
        raise ImageError(f"{path}: the model takes {in_channels} input channel(s) "
                         f"({', '.join(dep.inputs[:in_channels])}), this file gives {len(image)}")
    return image
