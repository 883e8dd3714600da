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

from labelling.errors import ImageError

__all__ = ["IMAGE_SUFFIXES", "RGB_MODES", "ImageError", "Pair", "check_image", "find_pairs", "image_header",
           "image_shape", "parse_planes", "read_image", "read_ome_zarr", "write_ome_zarr"]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".zarr")
RGB_MODES = ("luminance", "mean")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")
_STACK_AXES = "TZ"  # time and depth: planes must be chosen; any other axis (C, S, Q...) holds channels


def image_header(path: str | Path) -> tuple[tuple[int, ...], str]:
    """Shape and axes of an image, read from its header only (no pixel data is decoded).

    Axes use tifffile's letters: ``Y``, ``X``, ``S`` (RGB samples), ``C`` (channels), ``Z``, ``T``, ``Q``
    (unknown). Raises ImageError naming the file when it cannot be read.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                return tuple(int(n) for n in series.shape), series.axes
        if suffix == ".zarr":
            array, axes = _ome_zarr_array(path)
            return tuple(int(n) for n in array.shape), axes
        from PIL import Image

        with Image.open(path) as im:  # lazy: reads the header only
            width, height = im.size
            bands = len(im.getbands())
        return ((height, width), "YX") if bands == 1 else ((height, width, bands), "YXS")
    except ImageError:
        raise
    except Exception as err:  # any decoder error becomes one clear message
        raise ImageError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err


def image_shape(path: str | Path) -> tuple[int, ...]:
    """Shape of an image as :func:`read_image` would decode it before reduction to 2D, from the header only."""
    return image_header(path)[0]


def read_image(path: str | Path, check: bool = True, channel: int | None = None, rgb: str | None = None,
               planes: int | str | list[int] | None = None) -> np.ndarray:
    """Read a 2D image, or chosen planes of a z-stack, as float32.

    Supports TIFF/OME-TIFF (tifffile), PNG incl. 16 bit (PIL) and OME-Zarr (highest resolution). A stack is
    never cut silently: a z-stack (or time series) with several planes needs `planes` (see
    :func:`parse_planes`), which returns them as a (P, Y, X) array. An image with several channels (RGB,
    multichannel) is never reduced silently either: pass `channel` (index) or, for RGB, `rgb` (``luminance``
    or ``mean``). An RGB file whose three channels are identical (grey saved as RGB) is read as that grey
    image.

    Raises:
        ImageError: missing/unreadable file, several planes or channels and no choice, NaN or inf pixels, or
            an empty (constant) image. The message names the file.
    """
    path = Path(path)
    if rgb is not None and rgb not in RGB_MODES:
        raise ImageError(f"{path}: rgb must be one of {', '.join(RGB_MODES)}, got {rgb!r}")
    if rgb is not None and channel is not None:
        raise ImageError(f"{path}: give either a channel or an rgb conversion, not both")
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    try:
        suffix = path.suffix.lower()
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                arr, axes = series.asarray(), series.axes
        elif suffix == ".zarr":
            array, axes = _ome_zarr_array(path)
            arr = np.asarray(array)
        else:
            from PIL import Image

            with Image.open(path) as im:
                if im.mode == "P":  # palette: expand to the colours it stands for
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                arr = np.asarray(im)
            axes = "YX" if arr.ndim == 2 else "YXS"
    except ImageError:
        raise
    except Exception as err:  # any decoder error becomes one clear message
        raise ImageError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err
    if np.iscomplexobj(arr):
        raise ImageError(f"{path}: complex-valued pixels (e.g. an FFT or phase image); give real-valued intensities")
    arr = to_plane(np.asarray(arr), axes, path, channel=channel, rgb=rgb, planes=planes).astype(np.float32)
    if check:
        for plane in arr.reshape(-1, *arr.shape[-2:]):
            check_image(plane, path)
    return arr


def parse_planes(spec: int | str | list[int], n: int | None = None, name: str | Path = "image") -> list[int]:
    """Plane indices from an int, a list of ints, ``"a:b"`` (a..b-1), ``"a:b:step"`` or ``"all"``.

    Args:
        spec: the choice.
        n: planes in the stack (checks the range and resolves ``"all"`` and open ranges); None when unknown.
        name: what error messages call the stack.

    Raises:
        ImageError: a malformed choice, or a plane outside the stack.
    """
    try:
        if isinstance(spec, bool):
            raise ValueError
        if isinstance(spec, (int, np.integer)):
            out = [int(spec)]
        elif isinstance(spec, str) and spec.strip() == "all":
            if n is None:
                raise ValueError
            out = list(range(n))
        elif isinstance(spec, str):
            parts = [int(p) if p.strip() else None for p in spec.split(":")]
            if len(parts) == 1:
                out = [parts[0]]
            elif len(parts) in (2, 3):
                start, stop, step = (parts + [None])[:3]
                if stop is None and n is None:
                    raise ValueError
                out = list(range(start or 0, n if stop is None else stop, step or 1))
            else:
                raise ValueError
        else:
            out = [int(p) for p in spec if not isinstance(p, bool)]
            if len(out) != len(spec):
                raise ValueError
    except (TypeError, ValueError):
        raise ImageError(f"{name}: planes must be an index, a list of indices or a range like '4:9' "
                         f"(planes 4..8), got {spec!r}") from None
    if not out:
        raise ImageError(f"{name}: planes {spec!r} selects no plane")
    bad = [p for p in out if p < 0 or (n is not None and p >= n)]
    if bad:
        have = f"the stack has {n} planes (0..{n - 1})" if n is not None else "indices start at 0"
        raise ImageError(f"{name}: plane(s) {bad} do not exist; {have}")
    return out


def to_plane(arr: np.ndarray, axes: str, name: str | Path = "image", channel: int | None = None,
             rgb: str | None = None, planes: int | str | list[int] | None = None) -> np.ndarray:
    """Reduce a decoded image with tifffile-style `axes` to (Y, X), or (P, Y, X) with `planes`.

    See :func:`read_image` for the rules.
    """
    if len(axes) != arr.ndim or not (axes.endswith("YX") or axes.endswith("YXS")):
        axes = _guess_axes(arr.shape)
    if planes is not None:
        return _select_planes(arr, axes, name, channel, rgb, planes)
    for ax, n in zip(axes, arr.shape):
        if ax in _STACK_AXES and n > 1:
            what = "z-stack" if ax == "Z" else "time series"
            raise ImageError(f"{name}: a {what} of {n} planes ({arr.shape[-1]}x{arr.shape[-2]} px) is never cut "
                             f"silently; choose planes with data.planes (training) or --planes (predict), "
                             f"e.g. 6 or '4:9'")
    index, kept = [], ""
    for ax, n in zip(axes, arr.shape):
        if ax in "YX" or (ax not in _STACK_AXES and n > 1):  # unknown axes count as channels
            index.append(slice(None))
            kept += ax
        else:  # length-1 axes
            index.append(0)
    arr = arr[tuple(index)]
    extra = [i for i, ax in enumerate(kept) if ax not in "YX"]
    if not extra:
        if channel not in (None, 0):
            raise ImageError(f"{name}: has a single channel; --channel {channel} does not exist (use 0 or omit it)")
        return arr
    if len(extra) > 1:
        raise ImageError(f"{name}: has several channel axes (shape {arr.shape}, axes {kept}); "
                         "save one channel per file")
    arr = np.moveaxis(arr, extra[0], 0)  # (channels, Y, X)
    n = len(arr)
    if channel is not None:
        if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) or not 0 <= channel < n:
            raise ImageError(f"{name}: channel {channel!r} does not exist; the image has {n} channels (0..{n - 1})")
        return arr[channel]
    samples = kept[extra[0]] == "S"  # colour samples of one pixel (RGB, RGBA, grey + alpha)
    color = arr[: n - 1] if samples and n in (2, 4) else arr  # alpha is not an intensity
    is_rgb = samples and len(color) == 3
    if rgb == "luminance":
        if len(color) != 3:
            raise ImageError(f"{name}: --rgb luminance needs an RGB image; this one has {n} channels "
                             f"(use --channel 0..{n - 1} or --rgb mean)")
        return np.tensordot(np.asarray(_LUMA, np.float64), color.astype(np.float64), axes=1)
    if rgb == "mean":
        return color.astype(np.float64).mean(0)
    if samples and all(np.array_equal(color[0], c) for c in color[1:]):
        return color[0]  # grey saved as RGB(A) / grey+alpha: nothing to choose
    what, how = ("an RGB", "or convert it to grey with --rgb luminance|mean") if is_rgb else \
        ("a multichannel", "or average them with --rgb mean")
    raise ImageError(f"{name}: {what} image with {n} channels ({arr.shape[2]}x{arr.shape[1]} px); choose one "
                     f"channel with --channel N (0..{n - 1}) {how}")


def _select_planes(arr: np.ndarray, axes: str, name, channel, rgb, planes) -> np.ndarray:
    """(P, Y, X) planes of the z axis (or the only stack-like axis of a file without axis names)."""
    candidates = [i for i, ax in enumerate(axes) if ax == "Z"] or \
        [i for i, ax in enumerate(axes) if ax in "TQCS" and arr.shape[i] > 1]
    if len(candidates) != 1:
        raise ImageError(f"{name}: planes were chosen but the image has no single z axis "
                         f"(shape {arr.shape}, axes {axes})")
    axis = candidates[0]
    chosen = parse_planes(planes, arr.shape[axis], name)
    stack = np.moveaxis(np.take(arr, chosen, axis=axis), axis, 0)
    rest = axes[:axis] + axes[axis + 1:]
    return np.stack([to_plane(plane, rest, name, channel=channel, rgb=rgb) for plane in stack])


def _guess_axes(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3 and shape[-1] in (3, 4) and min(shape[:2]) > 4:
        return "YXS"
    return "Q" * (len(shape) - 2) + "YX"


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
    return np.asarray(_ome_zarr_array(path)[0])


def _ome_zarr_array(path: str | Path):
    """The (lazy) highest-resolution zarr array of an OME-Zarr image and its axes in tifffile letters."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    key = ms[0]["datasets"][0]["path"] if ms else "0"
    array = group[key]
    names = [a.get("name", "?") if isinstance(a, dict) else str(a) for a in (ms[0].get("axes") or [])] if ms else []
    axes = "".join({"c": "C", "t": "T", "z": "Z", "y": "Y", "x": "X"}.get(n.lower(), "Q") for n in names)
    return array, axes if len(axes) == array.ndim else _guess_axes(array.shape)


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

    def load(self, planes: int | str | list[int] | None = None, stacks: list[bool] | None = None,
             target_planes: int | str | list[int] | None = None,
             target_stacks: list[bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(inputs (Cin, H, W), targets (Cout, H, W)).

        Args:
            planes: z planes taken from the input files that are stacks; they become input channels.
            stacks: which inputs are z-stacks (default: all of them when `planes` is given).
            target_planes: z planes taken from the target files that are stacks (a 3D model's targets).
            target_stacks: which targets are z-stacks (default: all of them when `target_planes` is given).
        """
        def read(paths, chosen, which, check=True):
            which = which if which is not None else [chosen is not None] * len(paths)
            return np.concatenate([read_image(p, check=check, planes=chosen) if stack else
                                   read_image(p, check=check)[None] for p, stack in zip(paths, which)])

        x = read(self.inputs, planes, stacks)
        y = read(self.targets, target_planes, target_stacks, check=False)
        for p, img in zip(self.targets, y):
            if not np.isfinite(img).all():
                raise ImageError(f"{p}: contains NaN/inf pixels")
        if x.shape[1:] != y.shape[1:]:
            raise ImageError(
                f"{self.key}: input {self.inputs[0].name} is {x.shape[1:]} but target "
                f"{self.targets[0].name} is {y.shape[1:]}; paired images must have the same shape"
            )
        return x, y


def scan_fields(root: str | Path, pattern: str, group: str = "well") -> tuple[dict[str, dict[str, Path]], dict[str, str]]:
    """Image files under `root` matched by `pattern`: ``({field key: {channel: path}}, {field key: group})``.

    The ``channel`` group names a file's channel; ``key`` (default: the path with the channel part cut out)
    names its field, and the `group` regex group (e.g. ``well``) its split group, falling back to the key.
    A key found in two groups (``s0`` in wells B03 and C12) becomes ``<group>_<key>`` so no field is lost.

    Raises:
        FileNotFoundError: root missing or no file matches.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    rx = re.compile(pattern)
    if "channel" not in rx.groupindex:
        raise ValueError(f"pattern {pattern!r} needs a named group (?P<channel>...) (and usually (?P<key>...))")
    by_key: dict[tuple[str, str], dict[str, Path]] = defaultdict(dict)
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        rel = path.relative_to(root).as_posix()
        m = rx.search(rel)
        if not m:
            continue
        # without a `key` group, a field is its path with the channel part cut out
        key = m["key"] if "key" in rx.groupindex else rel[: m.start("channel")] + "*" + rel[m.end("channel"):]
        by_key[(m.groupdict().get(group) or key, key)][m["channel"]] = path
    if not by_key:
        raise FileNotFoundError(f"no file under {root} matches pattern {pattern!r}")
    groups_of: dict[str, set[str]] = defaultdict(set)
    for g, key in by_key:
        groups_of[key].add(g)
    found, groups = {}, {}
    for (g, key), chans in by_key.items():
        name = key if len(groups_of[key]) == 1 else f"{g}_{key}"
        found[name], groups[name] = chans, g
    return found, groups


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
    found, groups = scan_fields(root, pattern, group)
    pairs = []
    for key, chans in sorted(found.items()):
        missing = [c for c in inputs + targets if c not in chans]
        if missing:
            raise ImageError(f"{root}/{key}: missing channel(s) {missing}; found {sorted(chans)}")
        pairs.append(Pair(key, groups[key], [chans[c] for c in inputs], [chans[c] for c in targets]))
    return pairs


def write_ome_tiff(path: str | Path, image: np.ndarray, channel_names: list[str] | None = None,
                   pixel_size: tuple[float, float] | None = None) -> Path:
    """Write (C, Y, X) float32 as OME-TIFF with channel names (and pixel size in micrometres), atomically.

    The file appears complete or not at all: it is written to a temporary sibling and renamed into place.
    """
    import tifffile

    from labelling.data.atomic import write_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta: dict = {"axes": "CYX"}
    if channel_names:
        meta["Channel"] = {"Name": list(channel_names)}
    if pixel_size:
        meta.update(PhysicalSizeY=float(pixel_size[0]), PhysicalSizeYUnit="µm",
                    PhysicalSizeX=float(pixel_size[1]), PhysicalSizeXUnit="µm")
    return write_file(path, lambda partial: tifffile.imwrite(partial, np.asarray(image, np.float32), ome=True,
                                                             metadata=meta, photometric="minisblack"))
