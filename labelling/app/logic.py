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
IN_DISTRIBUTION, OUT_OF_DISTRIBUTION, UNCHECKED = "in distribution", "out of distribution", "unchecked"


class UploadError(ValueError):
    """An upload the app refuses; the message is shown to the user."""


def find_runs(root: str | Path) -> list[Path]:
    """Run folders (with a best or last checkpoint) and exported models under `root` (up to three levels), newest first.

    An exported model is a folder from ``labelling export RUN --format onnx|torchscript`` (it holds
    ``manifest.json``); the app predicts with it exactly like with the run, through the same loader.
    """
    root = Path(root)
    if not root.exists():
        return []
    runs = {p.parent.parent for pat in ("*/checkpoints/best.ckpt", "*/*/checkpoints/best.ckpt",
                                        "*/*/*/checkpoints/best.ckpt", "*/checkpoints/last.ckpt")
            for p in root.glob(pat)}
    runs |= {p.parent for pat in ("manifest.json", "*/manifest.json", "*/*/manifest.json",
                                  "*/*/*/manifest.json") for p in root.glob(pat)}
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)


def load(path: str | Path):
    """(model, config) of a run folder, a checkpoint or an export, through the one loader."""
    from labelling.inference.load import load as load_model

    model = load_model(path)
    return model, model.config


def read_upload(name: str, data: bytes, channel: int | None = None, rgb: str | None = None,
                task=None) -> np.ndarray:
    """Decode an uploaded TIFF/PNG into a 2D float32 image, refusing oversized or invalid files.

    The size is checked from the file header before any pixel is decoded, so a small compressed file that
    would expand to gigabytes is refused cheaply. `channel` / `rgb` pick or combine the channels of a
    multichannel or RGB image (see :func:`labelling.data.readers.read_image`); without them such an image is
    refused. With a `task` that takes several input channels (a 2.5D model), a z-stack is read as that model
    takes it, (Cin, H, W) (see :func:`labelling.inference.predict.read_input`). Every error names the uploaded file.
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
            if task is not None and task.raw_channels > 1:
                from labelling.inference.predict import read_input

                img = read_input(task, path, channel=channel, rgb=rgb)
            else:
                img = read_image(path, channel=channel, rgb=rgb)
        except ImageError as err:
            raise UploadError(str(err).replace(str(path), name)) from None
    return img


def plate_fields(path: str | Path) -> list[str]:
    """Field paths (``A/1/0``) of an HCS OME-Zarr plate, for the page's field chooser."""
    from labelling.data.plate import Plate

    try:
        return [f.path for f in Plate(path).fields]
    except ImageError as err:
        raise UploadError(str(err)) from None


def read_plate_field(task, path: str | Path, field: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(raw input as the model takes it, the field's real target channels or None) of one plate field.

    The input is read exactly as ``labelling predict RUN PLATE`` reads it (the model's channels and planes);
    a one-channel model gets a 2D image like an upload.
    """
    from labelling.data.plate import Field, Plate
    from labelling.errors import ConfigError
    from labelling.inference.plates import input_layout

    plate = Plate(path)
    chosen = Field(field, field.rsplit("/", 1)[0])
    if chosen not in plate.fields:
        raise UploadError(f"{path} has no field {field}")
    try:
        names, planes, plane = input_layout(task, plate, chosen)
    except ConfigError as err:
        raise UploadError(str(err)) from None
    image = plate.read(chosen, names, planes)
    targets = [t for t in task.targets if t in plate.channels(chosen)]
    real = plate.read(chosen, targets, [min(plane, plate.shape(chosen)[2] - 1)]) if targets else None
    return (image[0] if len(image) == 1 else image), real


def drift_reference(task, cfg, run_dir: Path, crop: int, n: int = 128) -> dict | None:
    """The per-image drift reference of a run (cached in the run folder) or of an exported model.

    Crops of one image are correlated, so a two-sample test of one image's crops against a reference set
    is far too eager (a clean new field of the same plate fails it). The verdict is therefore calibrated
    per image: the training fields give the reference embeddings, and each *validation* field (clean, never
    trained on, like an upload) gives one MMD^2 of its own crops against that reference - the null
    distribution an uploaded image's MMD^2 is ranked in (see :mod:`labelling.export.driftref`). An exported
    model carries it in ``drift.npz`` (None when it was exported with ``--no-drift``).
    """
    from labelling.export import driftref
    from labelling.inference.load import build_run, is_export

    run_dir = Path(run_dir)
    if is_export(run_dir):  # an export: the reference shipped with it, no training data needed
        return driftref.load_image_reference(run_dir) if (run_dir / driftref.DRIFT_FILE).is_file() else None
    cache = run_dir / "drift_reference.npz"
    if cache.exists():
        data = np.load(cache)
        return {"reference": data["reference"], "null": data["null"], "sigma": float(data["sigma"])}
    dm, _ = build_run(cfg)
    dm.setup()
    ref = driftref.image_reference(task, dm.splits["train"], dm.splits["val"], crop, n)
    np.savez(cache, reference=ref["reference"], null=ref["null"], sigma=ref["sigma"])
    return ref


def analyse(task, cfg, run_dir: Path, image: np.ndarray, tile: int = 256, progress=None) -> dict:
    """Prediction (the deployed path), segmentation, downstream metrics and drift verdict for one image.

    Args:
        task: the trained task (from :func:`load`: a run or an exported model).
        cfg: its experiment config.
        run_dir: its run folder or export folder (holds the drift reference).
        image: the raw transmitted-light image.
        tile: tile side of the tiled prediction.
        progress: optional callable(fraction, text) for a progress indicator.

    Returns:
        ``prediction``, ``labels``, ``metrics``, ``drift`` (see :func:`labelling.export.driftref.image_verdict`;
        ``reason`` says why an image was not checked) and ``state``: :data:`OUT_OF_DISTRIBUTION` when the drift
        check flags the image at :data:`ALPHA` (its metrics are not to be shown as valid), else
        :data:`IN_DISTRIBUTION` or :data:`UNCHECKED`.
    """
    from labelling.analysis.downstream import image_metrics
    from labelling.analysis.segmentation import segment
    from labelling.export import driftref
    from labelling.inference import predict

    step = progress or (lambda fraction, text: None)
    step(0.1, "predicting")
    pred = predict.predict(task, image, tile=tile)
    step(0.5, "segmenting")
    labels = segment(pred[0])
    metrics = image_metrics(pred[0], labels)
    crop = int(cfg.data.args.get("crop", 64))
    drift = {"checked": False, "reason": f"the image is smaller than the {crop} px crops the check compares"}
    if min(image.shape[-2:]) >= crop:
        step(0.7, "checking for drift")
        ref = drift_reference(task, cfg, run_dir, crop)
        if ref is None:
            drift = {"checked": False, "reason": "this exported model has no drift reference"}
        else:
            drift = driftref.image_verdict(task, image, ref, crop, ALPHA)
            if not drift["checked"]:
                drift["reason"] = "too few crops or reference fields for the check"
    step(1.0, "done")
    state = UNCHECKED if not drift["checked"] else OUT_OF_DISTRIBUTION if drift["drift"] else IN_DISTRIBUTION
    return {"prediction": pred, "labels": labels, "metrics": metrics, "drift": drift, "state": state}


def to_ome_tiff_bytes(prediction: np.ndarray, names: list[str], pixel_size=None) -> bytes:
    """The prediction (C, Y, X) as OME-TIFF bytes with channel names: what the page's download button gives."""
    from labelling.data.readers import write_ome_tiff

    with tempfile.TemporaryDirectory() as tmp:
        path = write_ome_tiff(Path(tmp) / "prediction.ome.tif", prediction, list(names)[: len(prediction)],
                              pixel_size=pixel_size)
        return path.read_bytes()


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
