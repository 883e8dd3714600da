"""HCS OME-Zarr plates: layout, lazy region reads, channel appends and per-field statistics.

A plate is the NGFF high-content-screening layout ``plate -> well (row/column) -> field -> (T, C, Z, Y, X)``
array, channels named in the field's ``omero`` metadata. Everything here reads only the chunks a region
needs, so a 384-well plate never has to fit in memory.

Why ome-zarr-py and not iohub: both are maintained (OME's reference implementation of the NGFF spec, and
CZ Biohub's reader that VisCy uses). iohub 0.2.3, the current release, pins ``zarr<3`` and an old tifffile,
which would downgrade our zarr 3 stack; ome-zarr-py 0.18 is built on zarr 3 and fsspec (so ``s3://``
plates work). For VisCy compatibility we *write* NGFF 0.4 plates (zarr format 2, the version iohub opens)
with ome-zarr-py's metadata writers, and read 0.4 and 0.5 plates.

Per-field statistics (``labelling preprocess``) live in each field's attributes under ``labelling.stats``:
per channel and z plane the mean, standard deviation and a quantile sketch. Per-image normalizations are
computed from them exactly as :func:`labelling.data.normalization.image_stats` would from the whole field,
and the dataset-level (``fixed``) statistics of any set of fields pool their sketches by the same rule as
folder data (:mod:`labelling.data.normalization`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labelling.data.atomic import replace_folder, sibling
from labelling.data.physical import multiscales_pixel_size
from labelling.errors import ConfigError, ImageError, unknown

KEY = "labelling"  # our attributes in a field's image group: {"stats": ..., "predictions": ...}
AXES = ("t", "c", "z", "y", "x")


@dataclass(frozen=True)
class Field:
    """One field of view: its image group path (``A/1/0``) and its well (``A/1``)."""

    path: str
    well: str

    @property
    def name(self) -> str:
        """Flat name for files and reports: ``A1_f0``."""
        row, column, fov = self.path.split("/")
        return f"{row}{column}_f{fov}"


def _ome(attrs) -> dict:
    """NGFF metadata of a group: top level in 0.4, under ``ome`` in 0.5."""
    attrs = dict(attrs)
    return {**attrs, **attrs.get("ome", {})}


def is_plate(path: str | Path) -> bool:
    """Whether `path` is an HCS OME-Zarr plate (a ``.zarr`` folder or URL with ``plate`` metadata)."""
    if not str(path).rstrip("/").endswith(".zarr"):
        return False
    try:
        import zarr

        return "plate" in _ome(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # not a zarr group at all
        return False


class Plate:
    """An opened HCS OME-Zarr plate. ``Plate(path)`` reads; ``mode="r+"`` also appends channels and statistics.

    `path` may be a local folder or an fsspec URL (``s3://bucket/plate.zarr``).
    """

    def __init__(self, path: str | Path, mode: str = "r"):
        import zarr

        self.path, self.mode = str(path), mode
        try:
            self.root = zarr.open_group(self.path, mode=mode)
        except Exception as err:
            raise ImageError(f"{path}: not a readable zarr plate ({err})") from None
        meta = _ome(self.root.attrs).get("plate")
        if not meta:
            raise ImageError(f"{path}: not an HCS OME-Zarr plate (no 'plate' metadata); single OME-Zarr images "
                             "are read as image files")
        self.meta = meta
        self.fields: list[Field] = []
        for well in meta.get("wells", []):
            try:
                images = _ome(self.root[well["path"]].attrs).get("well", {}).get("images", [])
            except KeyError:
                raise ImageError(f"{path}: the plate lists well {well.get('path')} but its folder is missing") from None
            self.fields += [Field(f"{well['path']}/{im['path']}", well["path"]) for im in images]
        self.local = "://" not in self.path or self.path.startswith("file://")
        self._arrays: dict[str, object] = {}
        self._channels: dict[str, list[str]] = {}  # parsing a field's attributes costs more than reading a crop

    def __repr__(self) -> str:
        return f"Plate({self.path!r}, {len(self.wells)} wells, {len(self.fields)} fields)"

    @property
    def wells(self) -> list[str]:
        return sorted({f.well for f in self.fields})

    def select(self, wells: list[str] | None) -> list[Field]:
        """Fields of the chosen wells (``A/1``, ``A1`` or a regular expression such as ``B.*``); all if None."""
        if not wells:
            return list(self.fields)
        chosen = []
        for pattern in wells:
            try:
                matcher = re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"--wells: '{pattern}' is not a valid regular expression ({err})") from None
            hits = [f for f in self.fields if f.well in (pattern, _slash(pattern)) or matcher.fullmatch(f.well)]
            if not hits:
                raise ConfigError(f"--wells: '{pattern}' matches none of the plate's wells ({', '.join(self.wells[:12])}"
                                  f"{' ...' if len(self.wells) > 12 else ''})")
            chosen += [f for f in hits if f not in chosen]
        return chosen

    # -- one field ---------------------------------------------------------------------------------
    def group(self, field: Field):
        try:
            return self.root[field.path]
        except KeyError:
            raise ImageError(f"{self.path}: the plate lists field {field.path} but its folder is missing") from None

    def array(self, field: Field):
        """The field's full-resolution (T, C, Z, Y, X) zarr array (lazy)."""
        if field.path not in self._arrays:
            meta = _ome(self.group(field).attrs)
            multiscales = meta.get("multiscales") or [{"datasets": [{"path": "0"}]}]
            name = multiscales[0]["datasets"][0]["path"]
            try:
                array = self.group(field)[name]
            except KeyError:
                raise ImageError(f"{self.path}/{field.path}: the image lists array '{name}' but it is missing") from None
            if np.iscomplexobj(np.empty(0, array.dtype)):
                raise ImageError(f"{self.path}/{field.path}: complex-valued pixels ({array.dtype}); give real intensities")
            if array.ndim != 5:
                raise ImageError(f"{self.path}/{field.path}: expected a (T, C, Z, Y, X) array, got {array.shape}")
            self._arrays[field.path] = array
        return self._arrays[field.path]

    def pixel_size(self, field: Field) -> tuple[float, float] | None:
        """(y, x) micrometres from the field's scale transform and axis units, or None when it does not say."""
        return multiscales_pixel_size(_ome(self.group(field).attrs).get("multiscales"))

    def shape(self, field: Field) -> tuple[int, int, int, int, int]:
        return tuple(self.array(field).shape)

    def channels(self, field: Field) -> list[str]:
        """Channel names from the field's ``omero`` metadata (``c0, c1, ...`` when unnamed)."""
        if field.path not in self._channels:
            omero = _ome(self.group(field).attrs).get("omero", {})
            names = [c.get("label", f"c{i}") for i, c in enumerate(omero.get("channels", []))]
            n = self.shape(field)[1]
            self._channels[field.path] = names + [f"c{i}" for i in range(len(names), n)]
        return list(self._channels[field.path])

    def channel_index(self, field: Field, names: list[str]) -> list[int]:
        have = self.channels(field)
        for name in names:
            if name not in have:
                raise unknown(f"channel of {field.path}", name, have)
        return [have.index(n) for n in names]

    def read(self, field: Field, channels: list[str], planes: list[int] | None = None, rows: slice = slice(None),
             cols: slice = slice(None), t: int = 0) -> np.ndarray:
        """(len(channels) * len(planes), h, w) float32 region; only the chunks it touches are read.

        Channels vary slowest: ``[c0 z0, c0 z1, ..., c1 z0, ...]`` (planes as input channels, 2.5D).
        """
        array, index = self.array(field), self.channel_index(field, channels)
        planes = list(planes) if planes is not None else [0]
        if max(planes) >= array.shape[2]:
            raise ImageError(f"{field.path}: planes {planes} but the field has {array.shape[2]} z plane(s)")
        where = f"{self.path}/{field.path}/{Path(str(array.path)).name} rows {rows.start or 0}:{rows.stop or array.shape[3]}"
        self._check_chunks(field, array, channels, index, planes, rows, where)
        # one orthogonal selection: zarr fetches every chunk in one call (each call costs ~1 ms of overhead)
        try:
            out = np.asarray(array.oindex[t, index, planes, rows, cols], np.float32)
        except Exception as err:  # a truncated or corrupt chunk: the codec's own error names no file
            raise ImageError(f"{where}: cannot read ({type(err).__name__}: {err}); the chunk is damaged") from None
        return out.reshape(-1, *out.shape[2:])

    def _check_chunks(self, field: Field, array, channels: list[str], index: list[int], planes: list[int],
                      rows: slice, where: str) -> None:
        """A chunk a labelling-written channel must have but that is gone is an error, never zeros."""
        complete = set(self.attrs(field).get("complete_channels", []))
        if not self.local or not complete.intersection(channels):
            return
        folder = Path(self.path.removeprefix("file://")) / field.path / Path(str(array.path)).name
        step_y, step_x = array.chunks[3], array.chunks[4]
        height, width = array.shape[3:]
        first, last = (rows.start or 0) // step_y, ((rows.stop or height) - 1) // step_y
        for name, c in zip(channels, index):
            if name not in complete:
                continue
            for z in planes:
                for i in range(first, last + 1):
                    for j in range(-(-width // step_x)):
                        key = array.metadata.encode_chunk_key((0, c, z, i, j))
                        if not (folder / key).is_file():
                            raise ImageError(f"{where}: chunk {key} of channel {name} is missing (deleted or "
                                             "never written); the plate is damaged")

    def attrs(self, field: Field) -> dict:
        return dict(self.group(field).attrs.get(KEY, {}))

    def update_attrs(self, field: Field, **values) -> None:
        group = self.group(field)
        group.attrs[KEY] = {**dict(group.attrs.get(KEY, {})), **values}

    def sketch(self, field: Field, channel: str, z: int | None = None) -> dict:
        """The stored statistics of one channel of a field: ``{"mean": [per z], "std": ..., "q": [[per z]]}``.

        With `z`, the :func:`labelling.data.normalization.sketch` of that plane.
        """
        stats = self.attrs(field).get("stats", {})
        if channel not in stats:
            raise ConfigError(f"{self.path}: field {field.path} has no statistics for channel '{channel}'; "
                              f"run `labelling preprocess {self.path}` first")
        return stats[channel] if z is None else plane_sketch(stats[channel], z)

    # -- writing -----------------------------------------------------------------------------------
    def append_channels(self, field: Field, names: list[str]) -> list[int]:
        """Indices of `names` in the field's array, adding the missing ones as new (empty) channels."""
        array, have = self.array(field), self.channels(field)
        new = [n for n in names if n not in have]
        if new:
            if not np.issubdtype(array.dtype, np.floating):
                raise ImageError(f"{self.path}: the plate stores {array.dtype} images and predictions are float32; "
                                 "write them into a new plate with --out NEW.zarr")
            shape = list(array.shape)
            shape[1] += len(new)
            array.resize(tuple(shape))
            group = self.group(field)
            omero = _ome(group.attrs).get("omero", {"channels": []})
            omero["channels"] = [*[{"label": n} for n in have], *[{"label": n} for n in new]]
            group.attrs["omero"] = omero
            self._channels.pop(field.path, None)
        return [(have + new).index(n) for n in names]


def _slash(well: str) -> str:
    """``A1``, ``A01`` or ``a/01`` -> ``A/1`` (the plate's own well names)."""
    found = re.fullmatch(r"([A-Za-z]+)/?0*(\d+)", well)
    return f"{found[1].upper()}/{found[2]}" if found else well


# --------------------------------------------------------------------------------- writing a plate
class PlateWriter:
    """Write a new NGFF 0.4 HCS plate field by field (constant memory); ``close()`` writes the layout.

    A local plate is written into a temporary sibling folder and renamed into place by ``close()``, so an
    interrupted write leaves nothing that opens as a plate, and an existing path is refused unless
    `overwrite` (then replaced only once the new plate is complete).

    Example::

        with PlateWriter("P.zarr", ["brightfield", "nuclei"]) as out:
            out.write("A", "1", 0, image)   # (C, Z, Y, X) or (C, Y, X)
    """

    def __init__(self, path: str | Path, channels: list[str], chunk: int = 256, name: str | None = None,
                 overwrite: bool = False, pixel_size: tuple[float, float] | None = None):
        import zarr

        self.path, self.channels, self.chunk, self.name = str(path), list(channels), chunk, name
        self.remote = "://" in self.path
        target = Path(self.path)
        if not self.remote and target.exists() and (target.is_file() or any(target.iterdir())) and not overwrite:
            what = "a plate" if is_plate(target) else "a file" if target.is_file() else "a folder that is not empty"
            raise ConfigError(f"{target} exists ({what}); refusing to overwrite it: give a new path, "
                              "or pass --overwrite to replace it once the new plate is complete")
        self.overwrite, self.pixel_size = overwrite, pixel_size
        self.staging = self.path if self.remote else str(sibling(target))  # unique: writers never share it
        self.root = zarr.open_group(self.staging, mode="w", zarr_format=2)
        self.wells: dict[tuple[str, str], list[str]] = {}

    def write(self, row: str, column: str, fov: int | str, image: np.ndarray, dtype=None) -> Field:
        """Write one field's (C, Z, Y, X) or (C, Y, X) image; returns its :class:`Field`."""
        image = np.asarray(image)
        image = image[:, None] if image.ndim == 3 else image
        if image.ndim != 4 or len(image) != len(self.channels):
            raise ImageError(f"expected ({len(self.channels)}, Z, Y, X) for channels {self.channels}, got {image.shape}")
        field, array = self.create(row, column, fov, image.shape[1:], dtype or image.dtype, _omero(self.channels, image))
        array[0] = image
        group = self.root[field.path]
        group.attrs[KEY] = {**dict(group.attrs.get(KEY, {})), "complete_channels": list(self.channels)}
        return field

    def create(self, row: str, column: str, fov: int | str, zyx: tuple[int, int, int], dtype="float32",
               omero: dict | None = None):
        """An empty field of shape (1, C, Z, Y, X) with its metadata; returns (:class:`Field`, zarr array)."""
        import numcodecs
        from ome_zarr.format import FormatV04
        from ome_zarr.writer import write_multiscales_metadata

        path = f"{row}/{column}/{fov}"
        group = self.root.require_group(path)
        shape = (1, len(self.channels), *zyx)
        chunks = (1, 1, 1, min(self.chunk, shape[3]), min(self.chunk, shape[4]))
        # lz4 decodes fast: training reads many small random crops
        array = group.create_array("0", shape=shape, chunks=chunks, dtype=dtype, fill_value=0, overwrite=True,
                                   compressors=numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE),
                                   config={"write_empty_chunks": True})  # every chunk on disk: a gap is damage
        yx = list(self.pixel_size) if self.pixel_size else [1.0, 1.0]  # micrometres when the source said
        scale = [{"type": "scale", "scale": [1.0, 1.0, 1.0, *map(float, yx)]}]
        write_multiscales_metadata(group, [{"path": "0", "coordinateTransformations": scale}], fmt=FormatV04(),
                                   axes=[{"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
                                         *[{"name": a, "type": "space",
                                            **({"unit": "micrometer"} if self.pixel_size and a != "z" else {})}
                                           for a in "zyx"]],
                                   name=path, metadata={"omero": omero or {"channels": [{"label": n} for n in
                                                                                         self.channels]}})
        self.wells.setdefault((row, str(column)), []).append(str(fov))
        return Field(path, f"{row}/{column}"), array

    def close(self) -> None:
        """Write the plate and well metadata (rows, columns, wells, field count)."""
        from ome_zarr.format import FormatV04
        from ome_zarr.writer import write_plate_metadata, write_well_metadata

        rows = sorted({r for r, _ in self.wells}, key=lambda r: (len(r), r))
        columns = sorted({c for _, c in self.wells}, key=lambda c: (len(c), c))
        wells = [f"{r}/{c}" for r, c in sorted(self.wells, key=lambda w: (rows.index(w[0]), columns.index(w[1])))]
        for (row, column), fovs in self.wells.items():
            write_well_metadata(self.root[f"{row}/{column}"], [{"path": f} for f in fovs], fmt=FormatV04())
        write_plate_metadata(self.root, rows, columns, wells, fmt=FormatV04(), name=self.name or Path(self.path).stem,
                             field_count=max(map(len, self.wells.values()), default=0))
        if not self.remote:
            if not self.overwrite and Path(self.path).exists():  # another writer finished first: it wins
                self.discard()
                raise ConfigError(f"{self.path} appeared while this plate was being written (another labelling "
                                  "process writing the same --out?); it was left as it is and nothing was replaced")
            replace_folder(self.staging, self.path)

    def discard(self) -> None:
        """Remove an unfinished local plate (nothing of it stays behind)."""
        import shutil

        if not self.remote:
            shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> PlateWriter:
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is None:
            self.close()
        else:
            self.discard()


def _omero(channels: list[str], image: np.ndarray) -> dict:
    lo, hi = float(np.min(image)), float(np.max(image))
    window = {"min": lo, "max": hi, "start": lo, "end": hi}
    return {"channels": [{"label": n, "active": True, "window": window} for n in channels]}


# ------------------------------------------------------------------------------- statistics
def plane_sketch(stored: dict, z: int) -> dict:
    """One plane's sketch from a channel's stored per-plane statistics."""
    return {key: stored[key][z] for key in ("mean", "std", "q")}
