"""The napari plugin's functions, plain Python over the library (napari itself is imported by napari only).

* :func:`get_reader` opens an HCS OME-Zarr plate written by labelling (one layer per channel, fields stacked
  along a leading axis when they share a shape) and a prediction OME-TIFF (one layer per named channel, at its
  pixel size);
* :func:`predict_widget` (a widget napari generates from its signature) predicts the active image layer with
  a run, checkpoint or export through the one prediction path - tiled, blended, normalized and de-normalized
  exactly as ``labelling predict`` - and adds one layer per predicted channel.
"""

from functools import lru_cache
from pathlib import Path

import numpy as np


def get_reader(path):
    """The reader for `path` when it is a labelling plate or an OME-TIFF, else None (napari asks others)."""
    if isinstance(path, list):
        path = path[0]
    from labelling.data.plate import is_plate

    if is_plate(path):
        return read_plate
    if str(path).lower().endswith((".ome.tif", ".ome.tiff")):
        return read_ome_tiff
    return None


def read_plate(path) -> list[tuple]:
    """One image layer per channel of a plate's fields (stacked along a field axis when shapes agree)."""
    from labelling.data.plate import Plate

    path = path[0] if isinstance(path, list) else path
    plate = Plate(path)
    first = plate.fields[0]
    same = [f for f in plate.fields if plate.shape(f) == plate.shape(first)]
    layers = []
    for channel in plate.channels(first):
        stack = np.stack([plate.read(f, [channel])[0] for f in same])
        layers.append((stack, {"name": channel, "metadata": {"fields": [f.path for f in same]}}, "image"))
    return layers


def read_ome_tiff(path) -> list[tuple]:
    """One image layer per channel of an OME-TIFF, named from its metadata, at its pixel size."""
    import tifffile

    from labelling.data.physical import ome_pixels, pixel_size

    path = path[0] if isinstance(path, list) else path
    with tifffile.TiffFile(path) as tif:
        data = tif.asarray()
        channels = ome_pixels(tif).get("Channel", [])
        names = [c.get("Name", "") for c in (channels if isinstance(channels, list) else [channels])]
    data = data if data.ndim == 3 else data[None]
    scale = pixel_size(path) or (1.0, 1.0)
    return [(plane, {"name": names[c] if c < len(names) and names[c] else f"{Path(path).name} [{c}]",
                     "scale": scale}, "image") for c, plane in enumerate(data)]


@lru_cache(maxsize=4)
def _model(path: str):
    from labelling.inference.load import load

    return load(path)


class _Rows:
    """An in-memory (C, H, W) image read band by band, so the one prediction path streams it (and reports rows)."""

    def __init__(self, data: np.ndarray, name: str):
        self.data, self.name = data, name

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.data.shape

    def read(self, top: int, bottom: int) -> np.ndarray:
        return self.data[:, top:bottom]

    def stats(self, method: str) -> None:
        return None  # computed from the whole image, as for an array


def _bar(total: int, desc: str):
    """A progress bar in napari's activity panel, or a silent stand-in outside napari."""
    try:
        from napari.utils import progress
    except ImportError:
        return SimpleBar()
    return progress(total=total, desc=desc)


class SimpleBar:
    """What a progress bar offers, doing nothing (napari absent)."""

    n = 0

    def update(self, n: int) -> None:
        self.n += n

    def close(self) -> None:
        pass


def predict_image(trained, raw: np.ndarray, tile: int, name: str, bar) -> np.ndarray:
    """One image (H, W) or (C, H, W) through :func:`labelling.inference.predict.predict`, rows reported to `bar`."""
    from labelling.inference import predict

    raw = raw[None] if raw.ndim == 2 else raw
    out = np.zeros((len(trained.targets), *raw.shape[1:]), np.float32)

    def write(top: int, bottom: int, rows: np.ndarray) -> None:
        out[:, top:bottom] = rows
        bar.update(bottom - top)

    predict.predict(trained, _Rows(raw, name), tile=tile, name=name, write=write)
    return out


# The annotations magicgui builds the widget from: real classes, and napari's own types as strings it resolves
def predict_widget(image: "napari.layers.Image", model: Path = Path("runs"),  # noqa: F821 (napari's own type)
                   tile: int = 256) -> "list[napari.types.LayerDataTuple]":  # noqa: F821
    """Predict the stain of the active image layer with a trained run, checkpoint or export.

    A layer with one more leading axis than the model takes (the fields of a plate, a time series) is
    predicted plane by plane. Progress (rows predicted) shows in napari's activity panel.

    Args:
        image: the transmitted-light image layer: (H, W), (C, H, W) for a multi-channel or 2.5D model, or a
            stack of those.
        model: a run folder, a ``.ckpt`` file or an export folder.
        tile: tile side of the tiled prediction.

    Returns:
        One image layer per predicted channel, named ``<target> (predicted)``, on the input's scale.
    """
    from labelling.errors import ImageError

    trained = _model(str(model))
    name = getattr(image, "name", "image")
    if getattr(image, "rgb", False):
        raise ImageError(f"layer '{name}' is an RGB image; the model takes {trained.raw_channels} transmitted-light "
                         "channel(s): convert it to one grey channel first")
    raw = np.asarray(image.data, np.float32)
    single = 2 if trained.raw_channels == 1 else 3  # dimensions of one image
    if raw.ndim not in (single, single + 1):
        raise ImageError(f"layer '{name}' has shape {raw.shape}: the model takes {trained.raw_channels} channel(s), "
                         f"so one image of {single} dimensions or a stack of them")
    images = raw[None] if raw.ndim == single else raw
    bar = _bar(len(images) * raw.shape[-2], f"predicting {', '.join(trained.targets)}")
    try:
        predicted = np.stack([predict_image(trained, im, tile, name, bar) for im in images], 1)  # (Cout, N, H, W)
    finally:
        bar.close()
    predicted = predicted[:, 0] if raw.ndim == single else predicted
    scale = tuple(getattr(image, "scale", (1.0,) * raw.ndim))
    scale = scale[-2:] if raw.ndim == single else (scale[0], *scale[-2:])  # the stack axis, then y, x
    return [(channel, {"name": f"{name} (predicted)", "scale": scale}, "image")
            for name, channel in zip(trained.targets, predicted)]
