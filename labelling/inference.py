"""Whole-image prediction: overlapping tiles blended with Gaussian or linear weights; OME-TIFF output.

Tiles overlap by a fraction of their size and each tile's prediction is weighted by a window that is
highest in its centre and falls towards its edges (Gaussian like MONAI's, sigma = tile/8, or a linear
pyramid), so tile borders - where the network sees least context - contribute least and no seam shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from labelling.data.transforms import denormalize, norm_stats, normalize

BLENDS = ("gaussian", "linear", "constant")


def blend_window(tile: int, mode: str = "gaussian") -> np.ndarray:
    """(tile, tile) weights, strictly positive everywhere."""
    if mode not in BLENDS:
        raise ValueError(f"unknown blend '{mode}'; valid: {list(BLENDS)}")
    c = (np.arange(tile) - (tile - 1) / 2) / tile
    if mode == "gaussian":
        w1 = np.exp(-0.5 * (c / 0.125) ** 2)
    elif mode == "linear":
        w1 = 1.0 - 2 * np.abs(c)
    else:
        w1 = np.ones(tile)
    w = np.outer(w1, w1)
    return np.maximum(w / w.max(), 1e-3).astype(np.float32)


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

    Returns:
        (Cout, H, W) float32.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    C, H, W = image.shape
    pad_h, pad_w = max(0, tile - H), max(0, tile - W)
    if pad_h or pad_w:  # images smaller than a tile: reflect-pad, crop at the end
        image = np.pad(image, ((0, 0), (0, pad_h), (0, pad_w)), mode="reflect")
    Hp, Wp = image.shape[1:]
    stride = max(1, int(round(tile * (1 - overlap))))
    window = blend_window(tile, blend)
    boxes = [(t, l) for t in tile_starts(Hp, tile, stride) for l in tile_starts(Wp, tile, stride)]
    out = acc = None
    device = device or _device(model)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        x = torch.from_numpy(np.stack([image[:, t:t + tile, l:l + tile] for t, l in chunk])).to(device)
        y = model(x).float().cpu().numpy()
        if out is None:
            out = np.zeros((y.shape[1], Hp, Wp), np.float32)
            acc = np.zeros((Hp, Wp), np.float32)
        for (t, l), yy in zip(chunk, y):
            out[:, t:t + tile, l:l + tile] += yy * window
            acc[t:t + tile, l:l + tile] += window
    return (out / acc)[:, :H, :W]


def fit_tile(net, tile: int, side: int) -> int:
    """Largest multiple of the net's 2**depth that is <= min(tile, side) (at least one multiple)."""
    m = 2 ** getattr(net, "depth", 0)
    return max(m, min(tile, side) // m * m)


def _device(model):
    try:
        return next(model.__self__.parameters()).device  # bound method of a module
    except (AttributeError, StopIteration):
        try:
            return next(model.parameters()).device
        except (AttributeError, StopIteration):
            return torch.device("cpu")


def rescale(image: np.ndarray, scale: float, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Resize a (C, H, W) image by `scale` (or to `shape`) with area/linear interpolation."""
    import cv2

    if scale == 1.0 and shape is None:
        return image
    H, W = image.shape[1:]
    size = shape or (max(1, int(round(H * scale))), max(1, int(round(W * scale))))
    interp = cv2.INTER_AREA if size[0] < H else cv2.INTER_LINEAR
    return np.stack([cv2.resize(c, (size[1], size[0]), interpolation=interp) for c in image]).astype(np.float32)


def predict_image(task, image: np.ndarray, tile: int = 256, overlap: float = 0.25, blend: str = "gaussian",
                  scale: float = 1.0, target_stats: np.ndarray | None = None, normalization: str = "percentile",
                  batch_size: int = 8) -> np.ndarray:
    """Raw brightfield (Cin, H, W) -> fluorescence (Cout, H, W) in target intensity units.

    The input is normalized like in training; the output is de-normalized with `target_stats` (e.g.
    the real image's when evaluating) or the training set's mean stats stored in the checkpoint.
    `scale` resizes the input first (scaling study: 0.7 / 1.0 / 1.3) and the output back to (H, W).
    """
    if image.ndim == 2:
        image = image[None]
    if not np.isfinite(image).all():
        raise ValueError("input image contains NaN/inf pixels")
    H, W = image.shape[1:]
    x = normalize(image.astype(np.float32), norm_stats(image, normalization))
    x = rescale(x, scale)
    tile = fit_tile(task.net, tile, max(x.shape[1:]))
    y = predict_tiled(task.predict, x, tile=tile, overlap=overlap, blend=blend, batch_size=batch_size)
    y = rescale(y, 1.0, shape=(H, W)) if scale != 1.0 else y
    stats = target_stats if target_stats is not None else getattr(task, "target_stats", None)
    if stats is not None and getattr(task.loss, "activation", None) != "sigmoid":
        y = denormalize(y, np.asarray(stats, np.float32))
    return y.astype(np.float32)


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


def _predict_cmd(args) -> int:
    from labelling.checkpoints import load_task
    from labelling.data.readers import read_image

    task, cfg = load_task(args.checkpoint)
    names = task.config.get("data", {}).get("name", "pred")
    out = Path(args.out)
    for f in args.images:
        img = read_image(f)
        for s in args.scale:
            y = predict_image(task, img, tile=args.tile, overlap=args.overlap, blend=args.blend, scale=s)
            dest = out / f"{Path(f).stem.split('.')[0]}_{names}{'' if s == 1.0 else f'_x{s:g}'}.ome.tif"
            write_ome_tiff(dest, y, [f"{names}{i}" if y.shape[0] > 1 else names for i in range(y.shape[0])])
            print(f"wrote {dest}")
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("predict", help="tiled whole-image prediction: predict RUN_OR_CKPT IMAGE... --out DIR")
    p.add_argument("checkpoint", help="run folder or .ckpt file")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", default="predictions")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--blend", choices=BLENDS, default="gaussian")
    p.add_argument("--scale", type=float, nargs="+", default=[1.0], help="e.g. --scale 0.7 1.0 1.3")
    p.set_defaults(fn=_predict_cmd)
