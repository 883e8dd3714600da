"""Make HCS OME-Zarr plates: a simulated plate, or a folder of TIFFs converted.

``labelling simulate --plate`` and ``labelling convert`` call these. Both write field by field (constant
memory) and then store the per-field statistics (:func:`preprocess`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from labelling.data import plate as plates
from labelling.data.normalization import GRID, pooled_percentiles, pooled_stats, sketch
from labelling.data.plate import plane_sketch
from labelling.errors import ConfigError, ImageError


def well_position(name: str, index: int) -> tuple[str, str]:
    """(row, column) of a well name: ``C12`` -> (``C``, ``12``), ``A01`` -> (``A``, ``1``).

    Other names get row ``A`` and column ``index + 1`` (the original name is kept in the field's attributes).
    """
    found = re.fullmatch(r"([A-Za-z]{1,2})0*(\d+)", name)
    return (found[1].upper(), found[2]) if found else ("A", str(index + 1))


def source_dtype(path: Path) -> np.dtype:
    """The pixel type a TIFF stores (so a converted plate is no larger than its source); float32 otherwise."""
    import tifffile

    if path.suffix.lower() in (".tif", ".tiff"):
        with tifffile.TiffFile(path) as tif:
            return tif.series[0].dtype
    return np.dtype(np.float32)


def simulate_folder(out: str | Path, seed: int = 0, wells: int = 4, fields: int = 2, size: int = 256,
                    overwrite: bool = False) -> int:
    """Write a simulated plate as TIFF files (brightfield, organelles, true nucleus mask); returns the field count.

    A folder that already holds files is refused unless `overwrite`.
    """
    import tifffile

    from labelling.data.simulate import CHANNELS, simulate_plate

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; give a new --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for f in simulate_plate(seed, n_wells=wells, fields_per_well=fields, size=size):
        stem = f"{f.plate}_{f.well}_f{f.field}"
        tifffile.imwrite(out / f"{stem}_brightfield.tif", f.brightfield)
        for name, img in zip(CHANNELS, f.fluorescence):
            tifffile.imwrite(out / f"{stem}_{name}.tif", img)
        tifffile.imwrite(out / f"{stem}_nucleimask.tif", f.nuclei)
        n += 1
    return n


def simulate(path: str | Path, seed: int = 0, wells: int = 4, fields: int = 2, size: int = 256,
             planes: int = 1, progress: bool = True, chunk: int = 256, overwrite: bool = False) -> plates.Plate:
    """Write a simulated plate: brightfield plus every organelle channel (and the true nucleus mask).

    ``planes > 1`` writes a brightfield z-stack (defocused copies around the focal plane, plane
    ``planes // 2`` in focus) for 2.5D models; fluorescence stays in the focal plane of every z.
    """
    from scipy import ndimage
    from tqdm import tqdm

    from labelling.data.simulate import CHANNELS, simulate_plate

    for key, value, least in (("wells", wells, 1), ("fields", fields, 1), ("size", size, 16), ("planes", planes, 1)):
        if int(value) < least:
            raise ConfigError(f"--{key} must be at least {least}, got {value}")
    names = ["brightfield", *CHANNELS, "nuclei_mask"]
    with plates.PlateWriter(path, names, chunk=chunk, name=f"simulated_seed{seed}", overwrite=overwrite) as out:
        fields_ = simulate_plate(seed, n_wells=wells, fields_per_well=fields, size=size)
        for f in tqdm(fields_, desc="simulating", unit="field", disable=not progress):
            row, column = well_position(f.well, 0)
            bf = np.stack([ndimage.gaussian_filter(f.brightfield, abs(z - planes // 2)) if z != planes // 2
                           else f.brightfield for z in range(planes)])
            fluo = np.repeat(np.concatenate([f.fluorescence, (f.nuclei > 0)[None].astype(np.float32)])[:, None],
                             planes, 1)
            field = out.write(row, column, f.field, np.concatenate([bf[None], fluo]).astype(np.float32))
            attrs = out.root[field.path].attrs
            attrs[plates.KEY] = {**dict(attrs.get(plates.KEY, {})), "phenotype": int(f.phenotype), "well_name": f.well}
    preprocess(path, progress=progress)
    return plates.Plate(path)


def convert(root: str | Path, pattern: str, out: str | Path, channels: list[str] | None = None,
            progress: bool = True, overwrite: bool = False) -> plates.Plate:
    """A folder of one-file-per-channel images -> an HCS OME-Zarr plate with channel names.

    Args:
        root: the image folder.
        pattern: regular expression with named groups ``channel``, ``key`` (one field) and ``well``
            (as for folder experiments); without ``well`` every field is its own well.
        out: the plate to write (``.zarr``).
        channels: channel values to keep, in order (default: every channel found, sorted).
        progress: show a progress bar over fields.
        overwrite: replace an existing `out` (once the new plate is complete).

    Well names are normalized (``A1`` and ``A01`` are one well); two wells that would land in one place
    are an error naming both. Each field keeps a pixel type that holds every channel's values (uint8
    brightfield beside uint16 DAPI is stored as uint16), never a truncating cast.
    """
    from tqdm import tqdm

    from labelling.data.readers import image_header, read_image, scan_fields

    def read(path: Path) -> np.ndarray:  # (Z, Y, X): z-stacks are kept whole
        return read_image(path, planes="all") if len(image_header(path)[0]) >= 3 else read_image(path)[None]

    root = Path(root)
    if not str(out).endswith(".zarr"):
        raise ConfigError(f"the plate must be a .zarr folder, got {out}")
    found, well_of = scan_fields(root, pattern, "well")  # without a well group, each field is its own well
    names = list(channels or sorted({c for chans in found.values() for c in chans}))
    wells = sorted(set(well_of.values()))
    position, named = {}, {}
    for i, well in enumerate(wells):
        position[well] = well_position(well, i)
        first = named.setdefault(position[well], well)
        if well_position(first, 0) != well_position(well, 0):  # A1 and A01 are the same well; foo and A2 are not
            raise ConfigError(f"wells '{first}' and '{well}' would both be stored as well "
                              f"{'/'.join(position[well])}; rename one of them")
    fov_count: dict[tuple[str, str], int] = defaultdict(int)
    from labelling.data.physical import pixel_size

    first = found[sorted(found)[0]][names[0]] if found else None
    with plates.PlateWriter(out, names, name=root.name, overwrite=overwrite,
                            pixel_size=pixel_size(first) if first else None) as writer:
        for key in tqdm(sorted(found), desc="converting", unit="field", disable=not progress):
            missing = [c for c in names if c not in found[key]]
            if missing:
                raise ImageError(f"{root}/{key}: missing channel(s) {missing}; found {sorted(found[key])}")
            dtype = np.result_type(*[source_dtype(found[key][c]) for c in names])  # holds every channel's values
            image = np.stack([read(found[key][c]).astype(dtype) for c in names])
            well = well_of[key]
            row, column = position[well]
            field = writer.write(row, column, fov_count[(row, column)], image)
            fov_count[(row, column)] += 1
            attrs = writer.root[field.path].attrs
            attrs[plates.KEY] = {**dict(attrs.get(plates.KEY, {})), "source": key, "well_name": well,
                                 "files": [str(found[key][c]) for c in names]}
    preprocess(out, progress=progress)
    return plates.Plate(out)


# ------------------------------------------------------------------------------- statistics
def preprocess(path: str | Path, progress: bool = True) -> int:
    """Compute and store every field's per-channel, per-plane statistics (one pass, one plane in memory).

    Also stores the whole plate's pooled statistics in the plate's attributes (``labelling.stats``), for
    information; training computes its ``fixed`` statistics from the training fields only.
    Returns the number of fields.
    """
    from tqdm import tqdm

    plate = plates.Plate(path, mode="r+")
    pooled: dict[str, list[dict]] = {}
    per_field: list[dict] = []
    for field in tqdm(plate.fields, desc="fields", unit="field", disable=not progress):
        array, names = plate.array(field), plate.channels(field)
        stats = {}
        for c, name in enumerate(names):
            per_plane = [sketch(array[0, c, z]) for z in range(array.shape[2])]
            stats[name] = {k: [p[k] for p in per_plane] for k in ("mean", "std", "q")}
            pooled.setdefault(name, []).append(stats[name])
        plate.update_attrs(field, stats=stats, grid=GRID.tolist())
        per_field.append(stats)
    summary = {name: {"mean": float(np.mean([s["mean"] for s in items])),
                      "fixed_percentile": list(pooled_stats([plane_sketch(s, 0) for s in items]))}
               for name, items in pooled.items()}
    plate.root.attrs[plates.KEY] = {**dict(plate.root.attrs.get(plates.KEY, {})), "stats": summary, "fields": len(plate.fields)}
    write_norm_meta(plate, per_field)
    return len(plate.fields)


def _viscy_stats(sketches: list[dict]) -> dict:
    """mean, std, median and iqr (VisCy's keys) of the pixels of the given plane sketches pooled."""
    mean = float(np.mean([s["mean"] for s in sketches]))
    second = float(np.mean([s["std"] ** 2 + s["mean"] ** 2 for s in sketches]))
    q25, q50, q75 = pooled_percentiles(sketches, (25, 50, 75))
    return {"mean": mean, "std": float(np.sqrt(max(second - mean**2, 0.0))), "median": float(q50),
            "iqr": float(q75 - q25)}


def write_norm_meta(plate: plates.Plate, per_field: list[dict]) -> None:
    """The same statistics in the layout VisCy's ``HCSDataModule`` reads (its ``norm_meta``).

    As ``viscy preprocess`` writes it: ``normalization: {channel: {dataset_statistics, fov_statistics}}`` in
    each field's attributes and the dataset statistics in the plate's, over every plane of the channel (mean,
    std, median, iqr). Statistics another tool wrote there (``viscy preprocess``) are left as they are: they
    are replaced only where labelling wrote them itself (``labelling.norm_meta`` marks it).
    """
    root = dict(plate.root.attrs.get(plates.KEY, {}))
    if "normalization" in plate.root.attrs and not root.get("norm_meta"):
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"{plate.path}: keeping the `normalization` statistics another tool wrote (VisCy's); "
                       "labelling's own are in `labelling.stats`")
        return

    def planes(stored: dict) -> list[dict]:
        return [plane_sketch(stored, z) for z in range(len(stored["mean"]))]

    names = sorted({name for stats in per_field for name in stats})
    dataset = {name: _viscy_stats([p for stats in per_field if name in stats for p in planes(stats[name])])
               for name in names}
    plate.root.attrs["normalization"] = {name: {"dataset_statistics": dataset[name]} for name in names}
    plate.root.attrs[plates.KEY] = {**dict(plate.root.attrs.get(plates.KEY, {})), "norm_meta": True}
    for field, stats in zip(plate.fields, per_field):
        plate.group(field).attrs["normalization"] = {
            name: {"dataset_statistics": dataset[name], "fov_statistics": _viscy_stats(planes(stored))}
            for name, stored in stats.items()}
