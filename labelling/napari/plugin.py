"""The napari plugin's functions, plain Python over the library (napari itself is imported by napari only).

* :func:`get_reader` opens an HCS OME-Zarr plate written by labelling (one layer per channel, fields stacked
  along a leading axis when they share a shape) and a prediction OME-TIFF (one layer per named channel, at its
  pixel size);
* :func:`predict_widget` (a widget napari generates from its signature) predicts the active image layer with
  a run, checkpoint or export through the one prediction path - tiled, blended, normalized and de-normalized
  exactly as ``labelling predict`` - and adds one layer per predicted channel.
"""

from __future__ import annotations

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


def predict_widget(image: napari.layers.Image, model: Path = Path("runs"),  # noqa: F821 (napari's own type)
                   tile: int = 256) -> list[napari.types.LayerDataTuple]:  # noqa: F821
    """Predict the stain of the active image layer with a trained run, checkpoint or export.

    Args:
        image: the transmitted-light image layer ((H, W), or (C, H, W) for a multi-channel or 2.5D model).
        model: a run folder, a ``.ckpt`` file or an export folder.
        tile: tile side of the tiled prediction.

    Returns:
        One image layer per predicted channel, named ``<target> (predicted)``, on the input's scale.
    """
    from labelling.inference import predict

    trained = _model(str(model))
    raw = np.asarray(image.data, np.float32)
    prediction = predict.predict(trained, raw, tile=tile, name=getattr(image, "name", "image"))
    scale = tuple(getattr(image, "scale", (1.0, 1.0)))[-2:]
    return [(channel, {"name": f"{name} (predicted)", "scale": scale}, "image")
            for name, channel in zip(trained.targets, prediction)]
