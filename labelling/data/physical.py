"""Physical units of images: the pixel size in micrometres, as the files state it."""

from __future__ import annotations

from pathlib import Path

MICRONS = {"µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "μm": 1.0, "nm": 1e-3, "mm": 1e3,
           "m": 1e6, "cm": 1e4, "micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3}  # NGFF names last


def multiscales_pixel_size(multiscales: list) -> tuple[float, float] | None:
    """(y, x) micrometres from NGFF ``multiscales`` metadata (first dataset's scale, axis units), or None."""
    try:
        scale = next(t["scale"] for t in multiscales[0]["datasets"][0]["coordinateTransformations"]
                     if t["type"] == "scale")
        axes = multiscales[0]["axes"]
    except (KeyError, IndexError, StopIteration, TypeError):
        return None
    found = {a.get("name"): (s, MICRONS.get(str(a.get("unit", "")))) for a, s in zip(axes, scale) if isinstance(a, dict)}
    if all(k in found and found[k][1] for k in "yx"):
        return float(found["y"][0]) * found["y"][1], float(found["x"][0]) * found["x"][1]
    return None


def ome_pixels(tif) -> dict:
    """The OME ``Pixels`` element of an open ``tifffile.TiffFile`` (first image) as a dict; {} without OME-XML."""
    import tifffile

    if not tif.ome_metadata:
        return {}
    image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
    return (image[0] if isinstance(image, list) else image)["Pixels"]


def pixel_size(path: str | Path) -> tuple[float, float] | None:
    """(y, x) pixel size in micrometres from an image's metadata, or None when the file does not say.

    OME-TIFF ``PhysicalSizeY/X`` (with their units), ImageJ TIFF resolution tags with a length unit, and
    OME-Zarr scale transforms with micrometre axes. A resolution without a length unit is not a pixel size.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                pixels = ome_pixels(tif)
                if pixels:
                    sizes = [pixels.get(f"PhysicalSize{a}") for a in "YX"]
                    units = [MICRONS.get(str(pixels.get(f"PhysicalSize{a}Unit", "µm")), None) for a in "YX"]
                    if all(sizes) and all(units):
                        return float(sizes[0]) * units[0], float(sizes[1]) * units[1]
                unit = MICRONS.get(str((tif.imagej_metadata or {}).get("unit", "")))
                tags = tif.pages[0].tags
                if unit and "XResolution" in tags and "YResolution" in tags:
                    (xn, xd), (yn, yd) = tags["XResolution"].value, tags["YResolution"].value
                    if xn and yn:
                        return yd / yn * unit, xd / xn * unit
        elif path.suffix.lower() == ".zarr":
            import zarr

            meta = dict(zarr.open_group(str(path), mode="r").attrs)
            return multiscales_pixel_size(meta.get("multiscales") or meta.get("ome", {}).get("multiscales"))
    except Exception:  # metadata that cannot be parsed says nothing about the pixel size
        return None
    return None
