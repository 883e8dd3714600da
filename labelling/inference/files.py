"""``labelling predict MODEL IMAGE...``: image files through the one prediction path into OME-TIFF files.

Each output keeps its input's path relative to the inputs' common folder (two inputs with one file name never
collide), carries the model's channel names and pixel size, and is written atomically. An existing output
file is never replaced unless asked.
"""

from __future__ import annotations

import os
from pathlib import Path

from labelling.data import physical, readers
from labelling.inference import predict
from labelling.inference.model import Model

MAX_NAME = 60  # longest channel part of an output file name


def channel_suffix(targets: list[str]) -> str:
    """``_nuclei+er``; many channels (a 3D model's planes) as ``_<first>_<n>ch``, so names stay short."""
    joined = "+".join(targets)
    return f"_{joined}" if len(joined) <= MAX_NAME else f"_{targets[0][:MAX_NAME]}_{len(targets)}ch"


def output_paths(images: list[str | Path], out: Path, suffix: str) -> list[Path]:
    """One output per input, keeping the inputs' paths relative to their common folder."""
    paths = [Path(f).resolve() for f in images]
    common = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else Path(".")
    dests = [out / p.parent.relative_to(common) / f"{p.name.split('.')[0]}{suffix}.ome.tif" for p in paths]
    if len(set(dests)) != len(dests):
        raise ValueError("two inputs map to the same output name; give each image once")
    return dests


def check_writable(out: Path) -> None:
    """Fail before the first image, not after it, when `out` cannot be written."""
    probe = out / f".labelling-write-test.{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"cannot write predictions to {out}: {err.strerror or err}") from None


PIXEL_TOLERANCE = 0.10  # a pixel size this far (relative) from training's is a different magnification


def pixel_scale(model: Model, path: str | Path, match: bool = False) -> tuple[float, tuple[float, float] | None]:
    """(scale to predict at, the input's pixel size) for an image file.

    When both the model's training pixel size and the file's are known and differ by more than 10 %, a warning
    says so; with `match` the input is resized to the training pixel size instead (and the output back).
    """
    import warnings

    trained, given = model.deployment.pixel_size, physical.pixel_size(path)
    if not trained or not given:
        if match:
            raise ValueError(f"{path}: --match-pixel-size needs the pixel size of the image and of the training "
                             f"data (image: {given or 'unknown'}, training: {trained or 'unknown'} µm)")
        return 1.0, given
    ratio = given[1] / trained[1]
    if match:
        return ratio, given
    if abs(ratio - 1) > PIXEL_TOLERANCE:
        warnings.warn(f"{path}: pixels of {given[1]:.4g} µm, the model was trained on {trained[1]:.4g} µm "
                      f"({ratio:.2f}x); predictions at another magnification are not what it learned - pass "
                      "--match-pixel-size to resize the image to the training pixel size", stacklevel=2)
    return 1.0, given


def predict_files(model: Model, images: list[str | Path], out: str | Path, scales=(1.0,), overwrite: bool = False,
                  composite: bool = False, progress: bool = True, read_args: dict | None = None,
                  match_pixel_size: bool = False, **predict_args):
    """Predict image files into `out`; yields each written path.

    Args:
        model: the loaded model (:func:`labelling.inference.load.load`).
        images: image files.
        out: output folder.
        scales: predict at each of these scales (``_x<scale>`` in the name unless 1).
        overwrite: replace existing output files (refused otherwise, before any work).
        composite: also write a PNG of the predicted channels together.
        progress: a progress bar over images.
        read_args: ``channel``, ``rgb``, ``planes`` for :func:`labelling.inference.predict.read_input`.
        match_pixel_size: resize each image to the training pixel size (see :func:`pixel_scale`).
        **predict_args: tile, overlap, blend for :func:`labelling.inference.predict.predict`.
    """
    from tqdm.auto import tqdm

    for scale in scales:
        predict.check_options(scale=scale, **predict_args)
    out = Path(out)
    names = model.targets
    jobs = [(scale, src, dest) for scale in scales
            for src, dest in zip(images, output_paths(images, out, channel_suffix(names)
                                                      + ("" if scale == 1.0 else f"_x{scale:g}")))]
    existing = [str(dest) for _, _, dest in jobs if dest.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{len(existing)} output file(s) exist, e.g. {existing[0]}; refusing to overwrite: "
                              "give another --out or pass --overwrite")
    check_writable(out)
    for scale, src, dest in tqdm(jobs, desc="predict", disable=not progress or len(jobs) < 2):
        image = predict.read_input(model, src, **(read_args or {}))
        factor, size = pixel_scale(model, src, match_pixel_size)
        y = predict.predict(model, image, scale=scale * factor, name=str(src), **predict_args)
        readers.write_ome_tiff(dest, y, names[: len(y)], pixel_size=size)
        yield dest
        if composite:  # the predicted channels together, one colour each
            from PIL import Image

            from labelling.reporting.images import composite as colour

            png = dest.with_name(dest.name.removesuffix(".ome.tif") + "_composite.png")
            Image.fromarray(colour(y)).save(png)
            yield png
