"""Image readers: single images (TIFF/PNG/OME-TIFF/OME-Zarr) and paired channel folders.

Every reader fails loudly with the file name: a missing or unreadable file, NaN/inf pixels, an empty
(constant) image, or input/target shapes that do not match.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".zarr")


class ImageError(ValueError):
    """A bad image file; the message names the file."""


def read_image(path: str | Path, check: bool = True) -> np.ndarray:
    """Read a 2D image (or the first plane of a stack) as float32.

    Supports TIFF/OME-TIFF (tifffile), PNG incl. 16 bit (imageio/PIL) and OME-Zarr (highest resolution).

    Raises:
        ImageError: missing/unreadable file, NaN or inf pixels, or an empty (constant) image.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    try:
        suffix = path.suffix.lower()
        if suffix in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        elif suffix == ".zarr":
            arr = read_ome_zarr(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
    except ImageError:
        raise
    except Exception as err:  # any decoder error becomes one clear message
        raise ImageError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and suffix == ".png":
        arr = arr[..., :3].mean(-1)  # RGB(A) PNG -> grey
    while arr.ndim > 2:
        arr = arr[0]  # first plane of T/C/Z stacks
    arr = arr.astype(np.float32)
    if check:
        check_image(arr, path)
    return arr


def check_image(arr: np.ndarray, name: str | Path = "image") -> None:
    """Raise ImageError for a wrong rank, NaN/inf values or a constant (empty) image."""
    if arr.ndim != 2:
        raise ImageError(f"{name}: expected a 2D image, got shape {arr.shape}")
    if arr.size == 0:
        raise ImageError(f"{name}: image is empty (shape {arr.shape})")
    if not np.isfinite(arr).all():
        raise ImageError(f"{name}: contains {int((~np.isfinite(arr)).sum())} NaN/inf pixels")
    if float(arr.max()) == float(arr.min()):
        raise ImageError(f"{name}: image is constant ({float(arr.min())}); nothing to learn from")


def read_ome_zarr(path: str | Path) -> np.ndarray:
    """Highest-resolution array of an OME-Zarr image (``multiscales[0].datasets[0]``)."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    key = ms[0]["datasets"][0]["path"] if ms else "0"
    return np.asarray(group[key])


def write_ome_zarr(path: str | Path, image: np.ndarray, axes: str = "cyx") -> None:
    """Write a single-scale OME-Zarr (NGFF 0.4 attributes) so pipelines can round-trip."""
    import zarr

    group = zarr.open_group(str(path), mode="w")
    group.create_array("0", data=np.asarray(image))
    group.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": a, "type": "channel" if a == "c" else "space"} for a in axes],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * len(axes)}]}],
    }]


@dataclass
class Pair:
    """One field: input channel files and target channel files, with its split group."""

    key: str
    group: str
    inputs: list[Path]
    targets: list[Path]
    meta: dict = field(default_factory=dict)

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        x = np.stack([read_image(p) for p in self.inputs])
        y = np.stack([read_image(p, check=False) for p in self.targets])
        for p, img in zip(self.targets, y):
            if not np.isfinite(img).all():
                raise ImageError(f"{p}: contains NaN/inf pixels")
        if x.shape[1:] != y.shape[1:]:
            raise ImageError(
                f"{self.key}: input {self.inputs[0].name} is {x.shape[1:]} but target "
                f"{self.targets[0].name} is {y.shape[1:]}; paired images must have the same shape"
            )
        return x, y


def find_pairs(
    root: str | Path,
    pattern: str,
    inputs: list[str],
    targets: list[str],
    group: str = "well",
) -> list[Pair]:
    """Match one-file-per-channel images in a folder into input/target pairs.

    Args:
        root: folder searched recursively.
        pattern: regex matched against the path relative to root, with named groups ``channel`` and
            optionally ``key`` (what identifies a field; default: the path without the channel part) and
            the ``group`` name (e.g. ``well``).
        inputs: channel values used as input (e.g. ``["w2"]``).
        targets: channel values used as target (e.g. ``["w1"]``).
        group: regex group used to keep fields apart in splits; falls back to ``key``.

    Raises:
        FileNotFoundError: root missing or no file matches.
        ImageError: a field lacks one of the requested channels.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    rx = re.compile(pattern)
    if "channel" not in rx.groupindex:
        raise ValueError(f"pattern {pattern!r} needs a named group (?P<channel>...) (and usually (?P<key>...))")
    found: dict[str, dict[str, Path]] = defaultdict(dict)
    groups: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        rel = path.relative_to(root).as_posix()
        m = rx.search(rel)
        if not m:
            continue
        # without a `key` group, a field is its path with the channel part cut out
        key = m["key"] if "key" in rx.groupindex else rel[: m.start("channel")] + "*" + rel[m.end("channel"):]
        found[key][m["channel"]] = path
        groups[key] = m.groupdict().get(group) or key
    if not found:
        raise FileNotFoundError(f"no file under {root} matches pattern {pattern!r}")
    pairs = []
    for key, chans in sorted(found.items()):
        missing = [c for c in inputs + targets if c not in chans]
        if missing:
            raise ImageError(f"{root}/{key}: missing channel(s) {missing}; found {sorted(chans)}")
        pairs.append(Pair(key, groups[key], [chans[c] for c in inputs], [chans[c] for c in targets]))
    return pairs
