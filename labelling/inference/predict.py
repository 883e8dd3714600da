"""THE prediction path: raw image -> training normalization -> tiled net -> de-normalized output.

Everything that turns a brightfield image into a predicted stain calls :func:`predict`: the ``predict``
command, ``evaluate``, every run-end callback, the prediction panels and the app. Nothing else predicts, so
a score in a report is a score of what a user gets.

What the model needs at deployment travels inside its checkpoint (``Stainer.deploy`` and two buffers),
never from the image being predicted beyond its own input pixels:

* ``deploy["max_size"]`` - fields binned to this longer side in training are binned the same way before
  prediction, and the output is resized back to the input's size;
* ``deploy["normalize"]`` - how inputs were normalized in training: per image (``percentile``, ``zscore``,
  ``minmax``), ``fixed`` (dataset-level statistics of the training inputs, the ``input_stats`` buffer) or
  ``none``;
* ``target_stats`` buffer - ``(offset, scale)`` per output channel mapping the network output to target
  units. For losses with units (MSE, asymmetric, gradient) it is the mean normalization of the *training*
  targets. For scale-free losses (Pearson) the output has no units, so after training an affine
  calibration is fitted on the training split only: it matches the mean and standard deviation of the
  predictions over the training fields to those of the real training targets (``deploy["denormalize"]``
  says which). Logit losses (BCE) output probabilities and are not de-normalized.
* ``null_level`` buffer - the mean training target intensity per channel: the null ("blind") predictor
  every downstream score is compared with.

* ``deploy["tta"]`` - test-time augmentation: each tile's output is the average over its 8 flips and
  90-degree rotations, mapped back (:func:`tile_model`); 8x the inference cost.

Tiles overlap by a fraction of their size and are blended with a window that is highest in the centre
(Gaussian like MONAI's, sigma = tile/8, or linear), so tile borders - where the net sees least context -
contribute least and no seam shows.

Why our tiler and not MONAI's ``SlidingWindowInferer``: ``bench/run.py`` compares the two on the same net
and image; ours was 1.02x as fast at equal output (largest difference 3e-4), and it adds what the inferer
lacks here - binning, per-channel de-normalization and blending that is the same for every caller. MONAI's
nets are available as ``net: {name: monai_unet}`` / ``monai_basicunet``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from labelling.data.normalization import bin_factor, bin_image, denormalize, image_stats, normalize

BLENDS = ("gaussian", "linear", "constant")
MAX_SCALE = 8.0


def blend_window(tile: int, mode: str = "gaussian") -> np.ndarray:
    """(tile, tile) weights, strictly positive everywhere."""
    if mode not in BLENDS:
        raise ValueError(f"unknown blend '{mode}'; valid: {list(BLENDS)}")
    centred = (np.arange(tile) - (tile - 1) / 2) / tile
    if mode == "gaussian":
        line = np.exp(-0.5 * (centred / 0.125) ** 2)
    elif mode == "linear":
        line = 1.0 - 2 * np.abs(centred)
    else:
        line = np.ones(tile)
    window = np.outer(line, line)
    return np.maximum(window / window.max(), 1e-3).astype(np.float32)


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering [0, size) with the last tile flush to the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


@torch.no_grad()
def predict_tiled(model, image: np.ndarray, tile: int = 256, overlap: float = 0.25, blend: str = "gaussian",
                  batch_size: int = 8, device: str | torch.device | None = None) -> np.ndarray:
    """Predict a normalized (Cin, H, W) image of any size with overlapping tiles.

    Args:
        model: callable (B, Cin, h, w) -> (B, Cout, h, w), e.g. ``task.predict``.
        image: normalized input.
        tile: tile side (a multiple of 2**depth keeps the net from padding).
        overlap: fraction of the tile shared with each neighbour (0 <= overlap < 1).
        blend: ``gaussian``, ``linear`` or ``constant`` (plain average).
        batch_size: tiles per forward pass.
        device: where to run (default: the model's).

    Returns:
        (Cout, H, W) float32.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    _, height, width = image.shape
    pad_h, pad_w = max(0, tile - height), max(0, tile - width)
    if pad_h or pad_w:  # images smaller than a tile: reflect-pad, crop at the end
        mode = "reflect" if pad_h < height and pad_w < width else "symmetric"
        image = np.pad(image, ((0, 0), (0, pad_h), (0, pad_w)), mode=mode)
    padded_h, padded_w = image.shape[1:]
    stride = max(1, int(round(tile * (1 - overlap))))
    window = blend_window(tile, blend)
    boxes = [(top, left) for top in tile_starts(padded_h, tile, stride) for left in tile_starts(padded_w, tile, stride)]
    out = weight = None
    device = device or _device(model)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        x = torch.from_numpy(np.stack([image[:, t:t + tile, l:l + tile] for t, l in chunk])).to(device)
        y = model(x).float().cpu().numpy()
        if out is None:
            out = np.zeros((y.shape[1], padded_h, padded_w), np.float32)
            weight = np.zeros((padded_h, padded_w), np.float32)
        for (t, l), yy in zip(chunk, y):
            out[:, t:t + tile, l:l + tile] += yy * window
            weight[t:t + tile, l:l + tile] += window
    return (out / weight)[:, :height, :width]


@torch.no_grad()
def predict_tiled_rows(model, read, height: int, width: int, write, tile: int = 256, overlap: float = 0.25,
                       blend: str = "gaussian", batch_size: int = 8, device=None) -> None:
    """:func:`predict_tiled` streamed row band by row band: memory grows with the width, not the field.

    The tiles, windows and sums are those of :func:`predict_tiled` on the whole image, so the result is the
    same (up to float rounding); rows are handed to `write` as soon as no later tile touches them.

    Args:
        model: callable (B, Cin, h, w) -> (B, Cout, h, w).
        read: ``read(top, bottom)`` -> normalized input rows (Cin, bottom - top, width).
        height: the field's height (at least `tile`).
        width: the field's width (at least `tile`).
        write: ``write(top, bottom, rows)`` receives finished output rows (Cout, bottom - top, width).
        tile: tile side.
        overlap: fraction of a tile shared with each neighbour.
        blend: tile blending window.
        batch_size: tiles per forward pass.
        device: where to run (default: the model's).
    """
    if height < tile or width < tile:
        raise ValueError(f"streamed tiling needs a field of at least one tile ({tile}), got {height}x{width}")
    stride = max(1, int(round(tile * (1 - overlap))))
    window = blend_window(tile, blend)
    tops, lefts = tile_starts(height, tile, stride), tile_starts(width, tile, stride)
    device = device or _device(model)
    out = weight = None
    base = 0  # first row held in the accumulators
    for i, top in enumerate(tops):
        rows = read(top, top + tile)
        need = top + tile - base  # grow the accumulators down to this band's last row
        if out is not None and need > out.shape[1]:
            grow = need - out.shape[1]
            out = np.concatenate([out, np.zeros((out.shape[0], grow, width), np.float32)], 1)
            weight = np.concatenate([weight, np.zeros((grow, width), np.float32)], 0)
        for j in range(0, len(lefts), batch_size):
            chunk = lefts[j:j + batch_size]
            x = torch.from_numpy(np.stack([rows[:, :, l:l + tile] for l in chunk])).to(device)
            y = model(x).float().cpu().numpy()
            if out is None:
                out = np.zeros((y.shape[1], tile, width), np.float32)
                weight = np.zeros((tile, width), np.float32)
            for l, yy in zip(chunk, y):
                out[:, top - base:top - base + tile, l:l + tile] += yy * window
                weight[top - base:top - base + tile, l:l + tile] += window
        done = tops[i + 1] if i + 1 < len(tops) else height  # rows no later tile reaches
        write(base, done, out[:, :done - base] / weight[:done - base])
        out, weight, base = out[:, done - base:], weight[done - base:], done


def fit_tile(net, tile: int, side: int) -> int:
    """Largest multiple of the net's 2**depth that is <= min(tile, side) (at least one multiple)."""
    multiple = 2 ** getattr(net, "depth", 0)
    return max(multiple, min(tile, side) // multiple * multiple)


def _device(model):
    try:
        return next(model.__self__.parameters()).device  # bound method of a module
    except (AttributeError, StopIteration):
        try:
            return next(model.parameters()).device
        except (AttributeError, StopIteration):
            return torch.device("cpu")


def rescale(image: np.ndarray, scale: float, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Resize a (C, H, W) image by `scale` (or to `shape`) with area (down) or linear (up) interpolation."""
    import cv2

    if scale == 1.0 and shape is None:
        return image
    height, width = image.shape[1:]
    size = shape or (max(1, int(round(height * scale))), max(1, int(round(width * scale))))
    interp = cv2.INTER_AREA if size[0] < height else cv2.INTER_LINEAR
    return np.stack([cv2.resize(c, (size[1], size[0]), interpolation=interp) for c in image]).astype(np.float32)


# --------------------------------------------------------------------------- deployment state of a task

DEFAULT_DEPLOY = {"normalize": "percentile", "denormalize": "stats", "inputs": ["input"], "targets": ["target"]}


def deployment(task) -> dict:
    """The task's deployment settings (normalization, de-normalization rule, channel names)."""
    return {**DEFAULT_DEPLOY, **(getattr(task, "deploy", None) or {})}


def normalize_input(task, raw: np.ndarray, normalization: str | None = None) -> np.ndarray:
    """Raw (Cin, H, W) input -> the normalization the model was trained with (or `normalization`)."""
    method = normalization or deployment(task)["normalize"]
    raw = np.asarray(raw, np.float32)
    if method == "fixed":
        stats = getattr(task, "input_stats", None)
        if stats is None:
            raise ValueError("fixed normalization needs the training input statistics stored in the checkpoint")
        stats = stats.detach().cpu().numpy() if torch.is_tensor(stats) else np.asarray(stats)
        return normalize(raw, stats.astype(np.float32))
    return normalize(raw, image_stats(raw, method))


def output_stats(task) -> np.ndarray | None:
    """(Cout, 2) de-normalization of the task's output, or None for probability outputs."""
    if deployment(task)["denormalize"] == "none" or getattr(task.loss, "activation", None) == "sigmoid":
        return None
    return task.target_stats.detach().cpu().numpy().astype(np.float32)


def denormalize_output(task, y: np.ndarray) -> np.ndarray:
    """Network output (Cout, H, W) -> target units with the training statistics stored in the task."""
    stats = output_stats(task)
    return (y if stats is None else denormalize(y, stats)).astype(np.float32)


def read_input(task, path: str | Path, channel: int | None = None, rgb: str | None = None,
               planes: int | str | list[int] | None = None) -> np.ndarray:
    """Read a raw input file as the model takes it: (Cin, H, W).

    A 2.5D model (trained on z planes, ``deploy["planes"]``) takes the same planes from a z-stack file
    (`planes` overrides them); another multi-channel model takes a file with exactly its channel count; a
    one-channel model reads a 2D image (`channel` / `rgb` pick from an RGB or multichannel file).
    """
    from labelling.data.readers import ImageError, image_header, read_image

    in_channels = task.net.in_channels
    planes = planes if planes is not None else deployment(task).get("planes")
    if planes is not None:
        image = read_image(path, channel=channel, rgb=rgb, planes=planes)
    elif in_channels == 1:
        image = read_image(path, channel=channel, rgb=rgb)[None]
    else:
        shape, _ = image_header(path)
        image = read_image(path, planes="all") if len(shape) >= 3 else read_image(path)[None]
    if len(image) != in_channels:
        raise ImageError(f"{path}: the model takes {in_channels} input channel(s) "
                         f"({', '.join(deployment(task)['inputs'])}), this file gives {len(image)}")
    return image


def check_image(raw: np.ndarray, in_channels: int, name: str = "image") -> np.ndarray:
    """(H, W) or (C, H, W) raw image with finite pixels and the channel count the model expects."""
    raw = np.asarray(raw)
    if raw.ndim == 2:
        raw = raw[None]
    if raw.ndim != 3:
        raise ValueError(f"{name}: expected a (H, W) or (C, H, W) image, got shape {raw.shape}")
    if raw.shape[0] != in_channels:
        raise ValueError(f"{name}: the model takes {in_channels} input channel(s), the image has {raw.shape[0]}")
    if not np.isfinite(raw).all():
        raise ValueError(f"{name}: input image contains NaN/inf pixels")
    return raw.astype(np.float32)


def predict(task, raw: np.ndarray, scale: float = 1.0, tile: int = 256, overlap: float = 0.25,
            blend: str = "gaussian", batch_size: int = 8, normalization: str | None = None,
            name: str = "image") -> np.ndarray:
    """Raw transmitted-light image -> predicted fluorescence in target units, exactly as deployed.

    Args:
        task: a trained ``Stainer`` (e.g. from :func:`labelling.build.load_task`), in eval mode.
        raw: (H, W) or (Cin, H, W) image in its own units (camera counts).
        scale: resize the *normalized* input by this factor first and the output back (scaling study).
        tile: tile side (see :func:`predict_tiled`).
        overlap: fraction of a tile shared with each neighbour.
        blend: tile blending window, ``gaussian``, ``linear`` or ``constant``.
        batch_size: tiles per forward pass.
        normalization: override the input normalization (only for the fixed-normalization view of the
            stability study); None uses the model's own.
        name: what error messages call the image.

    Returns:
        (Cout, H, W) float32 in target units (probabilities for logit losses).
    """
    y = denormalize_output(task, network_output(task, raw, scale, tile, overlap, blend, batch_size,
                                                normalization, name))
    if not np.isfinite(y).all():
        raise FloatingPointError(f"{name}: the model produced NaN/inf values (a diverged checkpoint?)")
    return y


def network_output(task, raw: np.ndarray, scale: float = 1.0, tile: int = 256, overlap: float = 0.25,
                   blend: str = "gaussian", batch_size: int = 8, normalization: str | None = None,
                   name: str = "image") -> np.ndarray:
    """The tiled network output of a raw image before de-normalization (see :func:`predict`)."""
    if not np.isfinite(scale) or not 0 < scale <= MAX_SCALE:
        raise ValueError(f"scale must be in (0, {MAX_SCALE:g}], got {scale}")
    if tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    cascade = getattr(task, "cascade", None) or []
    raw = check_image(raw, task.net.in_channels - sum(t.net.out_channels for t in cascade), name)
    if cascade:  # predictions of the cascade's runs as extra input channels, as in training
        raw = append_cascade(cascade, raw, name, tile=tile, overlap=overlap, blend=blend)
    height, width = raw.shape[1:]
    # the training geometry: fields binned to data.max_size in training are binned the same way here
    raw = bin_image(raw, bin_factor(raw.shape, deployment(task).get("max_size", 0)))
    x = rescale(normalize_input(task, raw, normalization), scale)
    size = fit_tile(task.net, tile, max(x.shape[1:]))
    y = predict_tiled(tile_model(task), x, tile=size, overlap=overlap, blend=blend, batch_size=batch_size,
                      device=_device(task.predict))
    return rescale(y, 1.0, shape=(height, width)) if y.shape[1:] != (height, width) else y


def tile_model(task):
    """The callable that predicts batches of normalized square tiles.

    ``task.predict``, or with ``deploy["tta"]`` its average over the 8 flips and 90-degree rotations of each
    tile (each output mapped back).
    """
    if not deployment(task).get("tta"):
        return task.predict

    def averaged(x: torch.Tensor) -> torch.Tensor:
        total = 0
        for k in range(4):
            for flip in (False, True):
                view = torch.rot90(x, k, (2, 3))
                view = view.flip(3) if flip else view
                y = torch.as_tensor(task.predict(view))
                y = y.flip(3) if flip else y
                total = total + torch.rot90(y, -k, (2, 3))
        return total / 8

    return averaged


def append_cascade(cascade: list, raw: np.ndarray, name: str = "image", **predict_args) -> np.ndarray:
    """Raw (Cin, H, W) input followed by each cascade run's prediction of it (see :mod:`labelling.data.cascade`).

    Training data and deployment both build a cascaded model's input here; `predict_args` (tile, overlap,
    blend) go to :func:`predict`.
    """
    return np.concatenate([raw] + [predict(t, raw, name=name, **predict_args) for t in cascade]).astype(np.float32)


def calibrate_affine(task, raw_inputs: list[np.ndarray], raw_targets: list[np.ndarray]) -> np.ndarray:
    """(Cout, 2) affine de-normalization for a scale-free loss, fitted on *training* images only.

    Matches the mean and standard deviation of the network output pooled over the given fields to those of
    the real targets (moment matching keeps the intensity spread, unlike a least-squares fit that shrinks
    it towards the mean). Returns ``(offset, scale)`` rows usable as ``task.target_stats``.
    """
    outs = np.concatenate([network_output(task, x).reshape(task.net.out_channels, -1) for x in raw_inputs], 1)
    targets = np.concatenate([np.asarray(y, np.float32).reshape(len(y), -1) for y in raw_targets], 1)
    gain = targets.std(1) / np.maximum(outs.std(1), 1e-8)
    offset = targets.mean(1) - gain * outs.mean(1)
    return np.stack([offset, gain], 1).astype(np.float32)


def predict_null(task, raw: np.ndarray) -> np.ndarray:
    """The null predictor: the training-mean target intensity everywhere, whatever the input."""
    level = task.null_level.detach().cpu().numpy().astype(np.float32)
    height, width = np.asarray(raw).shape[-2:]
    return np.broadcast_to(level[:, None, None], (len(level), height, width)).copy()


def write_ome_tiff(path: str | Path, image: np.ndarray, channel_names: list[str] | None = None) -> Path:
    """Write (C, Y, X) float32 as OME-TIFF with channel names."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"axes": "CYX"}
    if channel_names:
        meta["Channel"] = {"Name": list(channel_names)}
    tifffile.imwrite(path, image.astype(np.float32), ome=True, metadata=meta, photometric="minisblack")
    return path
