"""Thin per-organelle DataModules and the folder (real data) DataModule.

Each organelle class only fixes the target channel and its usual preprocessing, so an experiment reads
``data: {name: golgi, crop: 64}``.
"""

from __future__ import annotations

from pathlib import Path

from labelling.data.datamodule import FluorescenceDataModule
from labelling.data.normalization import bin_factor, bin_image
from labelling.data.physical import pixel_size
from labelling.data.readers import find_pairs, parse_planes


class NucleiDataModule(FluorescenceDataModule):
    """Nuclear stain (DAPI/Hoechst-like, textured chromatin) from brightfield."""

    def __init__(self, **kw):
        super().__init__(organelle="nuclei", **kw)


class ERDataModule(FluorescenceDataModule):
    """Endoplasmic reticulum network from brightfield."""

    def __init__(self, **kw):
        super().__init__(organelle="er", **kw)


class GolgiDataModule(FluorescenceDataModule):
    """Golgi puncta from brightfield; targets are Golgi-enhanced (diffuse low signal clipped) by default."""

    def __init__(self, target_transform: str = "golgi_enhance", **kw):
        super().__init__(organelle="golgi", target_transform=target_transform, **kw)


class ActinDataModule(FluorescenceDataModule):
    """Cortical actin and stress fibres from brightfield."""

    def __init__(self, **kw):
        super().__init__(organelle="actin", **kw)


class GFPDataModule(FluorescenceDataModule):
    """GFP reporter expression; binarized to an expression mask by default (train with BCE)."""

    def __init__(self, target_transform: str = "gfp_mask", **kw):
        super().__init__(organelle="gfp", target_transform=target_transform, **kw)


class NucleoliDataModule(FluorescenceDataModule):
    """Nucleoli from brightfield."""

    def __init__(self, **kw):
        super().__init__(organelle="nucleoli", **kw)


class FolderDataModule(FluorescenceDataModule):
    """Paired image folders (TIFF/PNG/OME-Zarr, one file per channel) matched by a filename regex.

    Args:
        root: data folder (e.g. ``../shared/data/isl_condB_phase``).
        pattern: regex with named groups ``key`` and ``channel`` (and optionally ``well``).
        inputs: channel values used as input; several become input channels.
        targets: channel values used as target.
        spatial_blocks: cut every field into k x k blocks that are split independently - a spatial
            hold-out for data sets with a single field.
        max_size: downsample fields whose longer side exceeds this (area averaging), 0 to keep.
        planes: z planes used as input channels (2.5D): an index, a list or a range like ``"4:9"``. An
            input name containing ``{z}`` stands for one file per plane (``z_depth-{z},channel-PHASE``);
            otherwise every input file is a z-stack and these planes are taken from it. The same planes
            are taken from the stack given to ``predict``.
        target_planes: the same for the targets: z-stack targets of a 3D model
            (``net: {name: monai_unet, spatial_dims: 3}``).
        **kw: everything :class:`FluorescenceDataModule` takes (crop, batch_size, normalize, ...).
    """

    def __init__(self, root: str, pattern: str, inputs: list[str], targets: list[str],
                 spatial_blocks: int = 1, max_size: int = 0, planes: int | str | list[int] | None = None,
                 target_planes: int | str | list[int] | None = None, **kw):
        kw.setdefault("normalize", "fixed")  # real data: dataset-level statistics survive sparse and dim fields
        super().__init__(organelle=kw.pop("organelle", "nuclei"), **kw)
        root = str(resolve_root(root))
        self.root, self.pattern = root, pattern
        self.spatial_blocks, self.max_size = spatial_blocks, max_size
        self.planes = None if planes is None else parse_planes(planes, None, "data.planes")
        self.target_planes = None if target_planes is None else parse_planes(target_planes, None, "data.target_planes")
        # per-plane files ({z} in the name) become one channel each; stack files give their chosen planes
        self.inputs, self.stacks = expand_planes(inputs, self.planes, "planes")
        self.targets, self.target_stacks = expand_planes(targets, self.target_planes, "target_planes")
        find_pairs(root, pattern, self.inputs, self.targets)  # fail at construction, not mid-training

    @property
    def raw_channels(self) -> int:  # type: ignore[override]
        return len(self.raw_input_names)

    @property
    def out_channels(self) -> int:
        return len(self.target_names)

    @property
    def raw_input_names(self) -> list[str]:
        return plane_names(self.inputs, self.stacks, self.planes)

    @property
    def target_names(self) -> list[str]:
        return plane_names(self.targets, self.target_stacks, self.target_planes)

    def load_pairs(self):
        out = []
        for pair in find_pairs(self.root, self.pattern, self.inputs, self.targets, self.split_by):
            x, y = self._load(pair)
            factor = bin_factor(x.shape, self.max_size)
            if not out:  # the pixel size the model learns at (after binning), when the files say it
                size = pixel_size(pair.inputs[0])
                self.pixel_size = (size[0] * factor, size[1] * factor) if size else None
            x, y = bin_image(x, factor), bin_image(y, factor)
            k = self.spatial_blocks
            H, W = x.shape[1] // k, x.shape[2] // k
            for i in range(k):
                for j in range(k):
                    sl = (slice(None), slice(i * H, (i + 1) * H), slice(j * W, (j + 1) * W))
                    key = f"{pair.key}" if k == 1 else f"{pair.key}:b{i}{j}"
                    group = pair.group if k == 1 else f"{pair.group}:b{i}{j}"
                    out.append((x[sl], y[sl], group, key, {"files": [str(p) for p in pair.inputs + pair.targets]}))
        return out


    def _load(self, pair):
        """Inputs of a pair: per-plane files as they are, stack files reduced to the chosen planes."""
        return pair.load(self.planes, [name in self.stacks for name in self.inputs],
                         self.target_planes, [name in self.target_stacks for name in self.targets])


def expand_planes(names: list[str], planes: list[int] | None, key: str) -> tuple[list[str], list[str]]:
    """(channel names to find, the names that are z-stack files) for `names` with optional ``{z}`` planes."""
    per_plane = [name for name in names if "{z}" in name]
    if per_plane and planes is None:
        raise ValueError(f"{per_plane[0]!r} names one file per plane ({{z}}); set data.{key}, e.g. '4:9'")
    files = [name.replace("{z}", str(z)) for name in names for z in (planes if "{z}" in name else [None])]
    return files, [name for name in names if "{z}" not in name] if planes is not None else []


def plane_names(files: list[str], stacks: list[str], planes: list[int] | None) -> list[str]:
    """One name per channel: stack files give ``name[z=k]`` per plane."""
    return [f"{name}[z={z}]" if name in stacks else name for name in files
            for z in (planes if name in stacks else [None])]


def resolve_root(root: str | Path) -> Path:
    """A data root with ``~`` and ``$VARIABLES`` expanded, looked up from the working directory, then the project root."""
    import os

    from labelling.config import ROOT

    path = Path(os.path.expandvars(str(root))).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return ROOT / path if (ROOT / path).exists() else path
