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


def read_upload(name: str, data: bytes) -> np.ndarray:
    """Decode an uploaded TIFF/PNG into a 2D float32 image, refusing oversized or invalid files."""
    suffix = Path(name).suffix.lower()
    if suffix not in (".tif", ".tiff", ".png"):
        raise UploadError(f"{name}: only TIFF or PNG images are accepted, not '{suffix or 'no extension'}'")
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadError(f"{name}: {len(data) / 2**20:.0f} MB is over the {MAX_UPLOAD_BYTES // 2**20} MB limit")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(name).name
        path.write_bytes(data)
        try:
            img = read_image(path)
        except ImageError as err:
            raise UploadError(str(err).replace(str(path), name)) from None
    if min(img.shape) < MIN_SIDE or max(img.shape) > MAX_SIDE:
        raise UploadError(f"{name}: {img.shape[1]}x{img.shape[0]} px; sides must be {MIN_SIDE}..{MAX_SIDE} px")
    return img


def reference_embeddings(task, cfg, run_dir: Path, crop: int, n: int = 64) -> np.ndarray:
    """Bottleneck embeddings of training crops (cached in the run folder) - the drift reference."""
    cache = Path(run_dir) / "reference_embeddings.npy"
    if cache.exists():
        return np.load(cache)
    from labelling import registry
    from labelling.analysis.embeddings import embed_crops, grid_crops

    dm = registry.build("data", cfg.data.name, **{"seed": cfg.seed, **cfg.data.args})
    dm.setup()
    crops = grid_crops([im.input for im in dm.splits["train"]], crop)
    crops = crops[np.random.default_rng(0).permutation(len(crops))[:n]]
    emb = embed_crops(task.embed, crops)
    np.save(cache, emb)
    return emb


def analyse(task, cfg, run_dir: Path, image: np.ndarray, tile: int = 256) -> dict:
    """Prediction, segmentation, downstream metrics and drift verdict for one uploaded image."""
    from labelling.analysis.downstream import image_metrics
    from labelling.analysis.drift import mmd_test
    from labelling.analysis.embeddings import embed_crops, grid_crops
    from labelling.analysis.segmentation import segment
    from labelling.data.transforms import norm_stats, normalize
    from labelling.inference import predict_image

    pred = predict_image(task, image, tile=tile)
    labels = segment(pred[0])
    metrics = image_metrics(pred[0], labels)
    crop = int(cfg.data.args.get("crop", 64))
    x = normalize(image[None], norm_stats(image[None]))
    crops = grid_crops([x], crop) if min(image.shape) >= crop else None
    drift = {"checked": False}
    if crops is not None and len(crops) >= 2:
        ref = reference_embeddings(task, cfg, run_dir, crop)
        emb = embed_crops(task.embed, crops[:64])
        stat, p = mmd_test(ref, emb, n_permutations=200)
        drift = {"checked": True, "mmd2": stat, "p_value": p, "drift": p < 0.01, "n_crops": len(emb)}
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
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()
