"""What the Streamlit page does, as plain functions (tested without a browser)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np

from labelling.data.readers import ImageError, read_image

MAX_UPLOAD_BYTES = 64 * 2**20
MAX_SIDE = 4096
MIN_SIDE = 32
ALPHA = 0.05  # drift warning when an image is further from the training data than 95 % of clean fields


class UploadError(ValueError):
    """An upload the app refuses; the message is shown to the user."""


def find_runs(root: str | Path) -> list[Path]:
    """Run folders under `root` (up to three levels) that hold a best or last checkpoint, newest first."""
    root = Path(root)
    if not root.exists():
        return []
    runs = {p.parent.parent for pat in ("*/checkpoints/best.ckpt", "*/*/checkpoints/best.ckpt",
                                        "*/*/*/checkpoints/best.ckpt", "*/checkpoints/last.ckpt")
            for p in root.glob(pat)}
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)


def read_upload(name: str, data: bytes, channel: int | None = None, rgb: str | None = None) -> np.ndarray:
    """Decode an uploaded TIFF/PNG into a 2D float32 image, refusing oversized or invalid files.

    The size is checked from the file header before any pixel is decoded, so a small compressed file that
    would expand to gigabytes is refused cheaply. `channel` / `rgb` pick or combine the channels of a
    multichannel or RGB image (see :func:`labelling.data.readers.read_image`); without them such an image is
    refused. Every error names the uploaded file.
    """
    from labelling.data.readers import image_header

    suffix = Path(name).suffix.lower()
    if suffix not in (".tif", ".tiff", ".png"):
        raise UploadError(f"{name}: only TIFF or PNG images are accepted, not '{suffix or 'no extension'}'")
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadError(f"{name}: {len(data) / 2**20:.0f} MB is over the {MAX_UPLOAD_BYTES // 2**20} MB limit")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(name).name
        path.write_bytes(data)
        try:
            shape, axes = image_header(path)
            if len(shape) < 2:
                raise UploadError(f"{name}: not an image (shape {shape})")
            sizes = dict(zip(axes, shape))
            height, width = sizes.get("Y", shape[-2]), sizes.get("X", shape[-1])
            if min(height, width) < MIN_SIDE or max(height, width) > MAX_SIDE:
                raise UploadError(f"{name}: {width}x{height} px; sides must be {MIN_SIDE}..{MAX_SIDE} px")
            if float(np.prod(shape, dtype=np.float64)) > 4 * MAX_SIDE**2:  # a long stack: every plane decodes
                raise UploadError(f"{name}: shape {'x'.join(map(str, shape))} ({axes}) is too large for one "
                                  "image; upload a single 2D plane")
            img = read_image(path, channel=channel, rgb=rgb)
        except ImageError as err:
            raise UploadError(str(err).replace(str(path), name)) from None
    return img


def drift_reference(task, cfg, run_dir: Path, crop: int, n: int = 128) -> dict:
    """The drift reference of a run (cached in the run folder), from *training* fields only.

    Crops of one image are correlated, so a two-sample test of one image's crops against a reference set
    is far too eager (a clean new field of the same plate fails it). The verdict is therefore calibrated
    per image: the training fields give the reference embeddings, and each *validation* field (clean, never
    trained on, like an upload) gives one MMD^2 of its own crops against that reference - the null
    distribution an uploaded image's MMD^2 is ranked in (its p-value is the fraction of those fields at
    least as far from the reference).
    """
    cache = Path(run_dir) / "drift_reference.npz"
    if cache.exists():
        data = np.load(cache)
        return {"reference": data["reference"], "null": data["null"], "sigma": float(data["sigma"])}
    from labelling import registry, studies
    from labelling.analysis.drift import median_sigma, mmd2

    dm = registry.build("data", cfg.data.name, **{"seed": cfg.seed, **cfg.data.args})
    dm.setup()
    reference = studies.embed_images(task, [im.raw_input() for im in dm.splits["train"]], crop, max_crops=n)
    sigma = median_sigma(reference)
    null = [mmd2(reference, emb, sigma) for emb in (studies.embed_images(task, [im.raw_input()], crop, max_crops=64)
                                                    for im in dm.splits["val"]) if len(emb) >= 2]
    np.savez(cache, reference=reference, null=np.asarray(null, float), sigma=sigma)
    return {"reference": reference, "null": np.asarray(null, float), "sigma": sigma}


def analyse(task, cfg, run_dir: Path, image: np.ndarray, tile: int = 256, progress=None) -> dict:
    """Prediction (the deployed path), segmentation, downstream metrics and drift verdict for one image.

    Args:
        task: the trained task (from :func:`labelling.build.load_task`).
        cfg: its experiment config.
        run_dir: its run folder (holds the drift reference).
        image: the raw transmitted-light image.
        tile: tile side of the tiled prediction.
        progress: optional callable(fraction, text) for a progress indicator.
    """
    from labelling import predict, studies
    from labelling.analysis.downstream import image_metrics
    from labelling.analysis.drift import mmd2
    from labelling.analysis.segmentation import segment

    step = progress or (lambda fraction, text: None)
    step(0.1, "predicting")
    pred = predict.predict(task, image, tile=tile)
    step(0.5, "segmenting")
    labels = segment(pred[0])
    metrics = image_metrics(pred[0], labels)
    crop = int(cfg.data.args.get("crop", 64))
    drift = {"checked": False}
    if min(image.shape[-2:]) >= crop:
        step(0.7, "checking for drift")
        emb = studies.embed_images(task, [image[None] if image.ndim == 2 else image], crop, max_crops=64)
        ref = drift_reference(task, cfg, run_dir, crop)
        if len(emb) >= 2 and len(ref["null"]) >= 5:
            stat = mmd2(ref["reference"], emb, ref["sigma"])
            p = (1 + int((ref["null"] >= stat).sum())) / (1 + len(ref["null"]))
            alpha = max(ALPHA, 1 / (1 + len(ref["null"])))  # the smallest p-value this many fields can give
            drift = {"checked": True, "mmd2": stat, "p_value": p, "drift": p <= alpha, "n_crops": len(emb),
                     "n_reference_fields": len(ref["null"])}
    step(1.0, "done")
    return {"prediction": pred, "labels": labels, "metrics": metrics, "drift": drift}


def overlay(bf: np.ndarray, pred: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8: brightfield in grey, prediction in green, object outlines in magenta."""
    from skimage.segmentation import find_boundaries

    def unit(a):
        lo, hi = np.percentile(a, (0.5, 99.5))
        return np.clip((a - lo) / max(hi - lo, 1e-8), 0, 1)

    g, p = unit(bf), unit(pred)
    rgb = np.stack([g * 0.7, np.clip(g * 0.7 + p * 0.8, 0, 1), g * 0.7], -1)
    if labels is not None:
        rgb[find_boundaries(labels)] = (1.0, 0.0, 1.0)
    return (rgb * 255).astype(np.uint8)


def to_png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 image as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()
