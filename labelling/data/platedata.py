"""Training data from an HCS OME-Zarr plate, read lazily (``data: {name: plate, path: P.zarr}``).

Nothing holds a field in memory: training crops read only the chunks under them, each DataLoader worker
and DDP rank opening the store itself; validation reads its grid crops the same way; the test split and
run-end studies read one whole field at a time when they ask for it. Normalization statistics come from
the plate's stored per-field sketches (``labelling preprocess``), so no pass over the pixels is needed to
start training, and the ``fixed`` statistics pool the *training* fields only.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from labelling.data import plate as plates
from labelling.data.augment import PairedAugment
from labelling.data.datamodule import FluorescenceDataModule, GridCrops, to_batch
from labelling.data.normalization import balanced_floor, pooled_stats, sketch_stats, target_rule_stats
from labelling.data.readers import parse_planes
from labelling.data.splits import split_groups
from labelling.errors import ConfigError


class _Opened:
    """Mixin: the plate is opened lazily, once per process (DataLoader workers and DDP ranks open their own)."""

    path: str

    @property
    def plate(self) -> plates.Plate:
        if getattr(self, "_pid", None) != os.getpid():
            self._plate, self._pid = plates.Plate(self.path), os.getpid()
        return self._plate

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_plate", "_pid")}


class PlateField(_Opened):
    """One field as the rest of the framework sees an :class:`~labelling.data.datamodule.Image`, read on access.

    ``input`` / ``target`` are the normalized whole field, ``raw_input()`` / ``raw_target()`` its own units;
    each access reads the field again, so holding many of these costs nothing.
    """

    raw_channels = None

    def __init__(self, path: str, field: plates.Field, inputs: list[str], planes: list[int], targets: list[str],
                 target_plane: int, input_stats: np.ndarray, target_stats: np.ndarray, group: str, extra: dict):
        self.path, self.field, self.inputs, self.planes = path, field, inputs, planes
        self.targets, self.target_plane = targets, target_plane
        self.input_stats, self.target_stats, self.group, self.key, self.extra = (
            input_stats, target_stats, group, field.name, extra)

    def region(self, rows: slice = slice(None), cols: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Normalized (input, target) of a region, reading only its chunks."""
        if self.planes == [self.target_plane]:  # 2D: inputs and targets in one read
            both = self.plate.read(self.field, self.inputs + self.targets, self.planes, rows, cols)
            x, y = both[:len(self.inputs)], both[len(self.inputs):]
        else:
            x = self.plate.read(self.field, self.inputs, self.planes, rows, cols)
            y = self.plate.read(self.field, self.targets, [self.target_plane], rows, cols)
        return _norm(x, self.input_stats), _norm(y, self.target_stats)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.plate.shape(self.field)[3:])

    @property
    def input(self) -> np.ndarray:
        return _norm(self.plate.read(self.field, self.inputs, self.planes), self.input_stats)

    @property
    def target(self) -> np.ndarray:
        return _norm(self.plate.read(self.field, self.targets, [self.target_plane]), self.target_stats)

    def raw_input(self) -> np.ndarray:
        return self.plate.read(self.field, self.inputs, self.planes)

    def raw_target(self) -> np.ndarray:
        return self.plate.read(self.field, self.targets, [self.target_plane])


def _norm(x: np.ndarray, stats: np.ndarray) -> np.ndarray:
    return ((x - stats[:, :1, None]) / stats[:, 1:, None]).astype(np.float32)


class PlateCrops(Dataset):
    """`length` random training crops per epoch read from the plate's chunks, augmented as usual.

    Each read takes a random region twice the crop's side and `crops_per_read` crops are cut from it at
    random places (VisCy samples several patches per read likewise): a zarr read costs about a millisecond
    per chunk file, far more than cutting a crop, and neighbouring crops share chunks.
    """

    def __init__(self, fields: list[PlateField], length: int, augment: PairedAugment, seed: int = 0,
                 crops_per_read: int = 4):
        self.fields, self.length, self.augment, self.seed = fields, length, augment, seed
        self.crops_per_read, self.buffer, self.left = max(1, int(crops_per_read)), None, 0
        self.shapes = [f.shape for f in fields]
        area = np.array([h * w for h, w in self.shapes], float)
        self.weights = area / area.sum()  # every pixel equally likely, whatever the field sizes
        self.rng, self._worker = np.random.default_rng(seed), None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        info = get_worker_info()
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if dist else 0
        key = (rank, info.id if info else -1, info.seed if info else 0, os.getpid())
        if key != self._worker:  # one random stream per rank and worker: they draw different crops
            self._worker = key
            seed = [self.seed, rank, (info.seed % 2**31) if info else 0]
            self.rng = np.random.default_rng(seed)
            self.augment.reseed(int(np.random.default_rng(seed).integers(2**31)))
            self.left = 0
        s = self.augment.source
        if self.left == 0:  # a new region: random field (by area), random place
            k = int(self.rng.choice(len(self.fields), p=self.weights))
            H, W = self.shapes[k]
            if H < s or W < s:
                raise ConfigError(f"field {self.fields[k].key} is {H}x{W}, smaller than the training crop {s}")
            h, w = min(H, 2 * s), min(W, 2 * s)
            top, left = int(self.rng.integers(H - h + 1)), int(self.rng.integers(W - w + 1))
            self.buffer, self.left = (k, *self.fields[k].region(slice(top, top + h), slice(left, left + w))), \
                self.crops_per_read
        k, x, y = self.buffer
        self.left -= 1
        top, left = int(self.rng.integers(x.shape[1] - s + 1)), int(self.rng.integers(x.shape[2] - s + 1))
        xc, yc = self.augment(x[:, top:top + s, left:left + s], y[:, top:top + s, left:left + s])
        return to_batch(xc, yc, self.fields[k].input_stats, self.fields[k].target_stats, k)


class PlateGridCrops(GridCrops):
    """Validation grid crops read region by region (never the whole field)."""

    def __init__(self, fields: list[PlateField], crop: int, multiple: int = 16):
        self.images, self.items = fields, []
        for k, f in enumerate(fields):
            H, W = f.shape
            if H < crop or W < crop:
                self.items.append((k, 0, 0, max(multiple, H - H % multiple), max(multiple, W - W % multiple)))
            else:
                self.items += [(k, t, l, crop, crop) for t in range(0, H - crop + 1, crop)
                               for l in range(0, W - crop + 1, crop)]

    def __getitem__(self, i: int) -> dict:
        k, t, l, h, w = self.items[i]
        f = self.images[k]
        x, y = f.region(slice(t, t + h), slice(l, l + w))
        return to_batch(x, y, f.input_stats, f.target_stats, k)


class PlateDataModule(FluorescenceDataModule):
    """Brightfield -> fluorescence from an HCS OME-Zarr plate, split by well (or field) from its layout.

    Args:
        path: the plate (``P.zarr``, or an fsspec URL such as ``s3://bucket/P.zarr``).
        inputs: input channel names (as in the plate's ``omero`` metadata).
        targets: target channel names.
        planes: z planes of the inputs used as input channels (2.5D): an index, list or range ``"2:5"``.
        target_plane: the targets' z plane (default: the middle of `planes`).
        wells: wells to use (``A/1``, ``A1`` or regular expressions); default all.
        crops_per_read: training crops cut from each region read from the store (see :class:`PlateCrops`).
        **kw: everything :class:`~labelling.data.datamodule.FluorescenceDataModule` takes (crop,
            batch_size, normalize, split_by, val/test fractions or groups, augment, num_workers, seed).
    """

    def __init__(self, path: str, inputs: list[str] | None = None, targets: list[str] | None = None,
                 planes: int | str | list[int] | None = None, target_plane: int | None = None,
                 wells: list[str] | None = None, crops_per_read: int = 4, **kw):
        for key, bad, why in (("target_transform", "none", "store the transformed target as a plate channel"),
                              ("foreground_crops", 0, "use uniform crops"), ("cascade", None, ""),
                              ("flatfield", False, "correct the fields' illumination before writing the plate")):
            if kw.get(key) and kw[key] != bad:
                raise ConfigError(f"data.{key} is not supported for plates yet; {why or 'train without it'}")
        if (kw.get("augment") or {}).get("corrupt_p", 0):
            raise ConfigError("corruption augmentation needs whole raw fields; not supported for plates yet "
                              "(set data.augment.corrupt_p=0)")
        kw.setdefault("normalize", "fixed")  # dataset-level statistics: the real-data default (sparse fields)
        super().__init__(organelle="nuclei", **kw)
        self.path, self.crops_per_read = str(path), crops_per_read
        self.opened = plates.Plate(self.path)  # fails now on a missing or foreign store, not mid-training
        self.inputs, self.targets = list(inputs or ["brightfield"]), list(targets or ["nuclei"])
        self.planes = parse_planes(planes, None, "data.planes") if planes is not None else [0]
        self.target_plane = int(target_plane if target_plane is not None else self.planes[len(self.planes) // 2])
        self.fields = self.opened.select(wells)
        first = self.fields[0]
        self.opened.channel_index(first, self.inputs + self.targets)
        z = self.opened.shape(first)[2]
        if max(self.planes + [self.target_plane]) >= z:
            raise ConfigError(f"data.planes {self.planes} / target_plane {self.target_plane}: the plate has {z} plane(s)")
        self.plate = {"size": self.opened.shape(first)[3]}
        self.pixel_size = self.opened.pixel_size(first)  # carried into the deployment state

    @property
    def channels(self) -> list[str]:
        """The plate channels the model reads (its deployment input)."""
        return list(self.inputs)

    @property
    def raw_channels(self) -> int:  # type: ignore[override]
        return len(self.inputs) * len(self.planes)

    @property
    def raw_input_names(self) -> list[str]:
        if len(self.planes) == 1:
            return list(self.inputs)
        return [f"{c}_z{p}" for c in self.inputs for p in self.planes]

    @property
    def target_names(self) -> list[str]:
        return list(self.targets)

    @property
    def out_channels(self) -> int:
        return len(self.targets)

    @staticmethod
    def _stats(method: str, sketches: list[dict], rows: list[tuple[str, int]], field=None) -> np.ndarray:
        if method == "fixed":
            return np.array([pooled_stats([plates.plane_sketch(s[c], z) for s in sketches]) for c, z in rows], np.float32)
        return np.array([sketch_stats(plates.plane_sketch(field[c], z), method) for c, z in rows], np.float32)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        plate = self.opened
        meta = [plate.attrs(f) for f in self.fields]
        sketches = [{c: plate.sketch(f, c) for c in self.inputs + self.targets} for f in self.fields]
        groups = [f.well if self.split_by == "well" else f.path for f in self.fields]
        strata = {g: f"phenotype{m['phenotype']}" for g, m in zip(groups, meta) if "phenotype" in m}
        where = split_groups(groups, self.val_fraction, self.test_fraction, self.seed, strata or None,
                             self.test_groups, self.val_groups)
        in_rows = [(c, z) for c in self.inputs for z in self.planes]
        out_rows = [(c, self.target_plane) for c in self.targets]
        train = [s for s, g in zip(sketches, groups) if where[g] == "train"]
        self.input_stats, self.target_stats = self._stats("fixed", train, in_rows), self._stats("fixed", train, out_rows)
        if self.input_override is not None:  # fine-tuning: the source model's statistics
            self.input_stats = self.input_override
        self.means = np.array([[s[c]["mean"][z] for c, z in out_rows] for s in train])
        floor = balanced_floor([self._stats("zscore", [], out_rows, s)[:, 1] for s in train]) \
            if self.target_norm == "balanced" else None
        self.splits = {"train": [], "val": [], "test": []}
        for f, s, g, m in zip(self.fields, sketches, groups, meta):
            xs = self.input_stats if self.norm == "fixed" else self._stats(self.norm, [], in_rows, s)
            ys = target_rule_stats(self.target_norm, lambda rule, s=s: self._stats(rule, [], out_rows, s),
                                   self.target_stats, floor)
            extra = {"well": f.well, "field": f.path, **({"phenotype": m["phenotype"]} if "phenotype" in m else {})}
            self.splits[where[g]].append(PlateField(self.path, f, self.inputs, self.planes, self.targets,
                                                    self.target_plane, xs, ys, g, extra))

    def null_level(self) -> np.ndarray:
        """Mean training target per channel, from the stored statistics (no pass over the pixels)."""
        return self.means.mean(0).astype(np.float32)

    def train_dataloader(self):
        aug = PairedAugment(self.crop, seed=self.seed, **self.augment_args)
        return self._train_loader(PlateCrops(self.splits["train"], self.crops_per_epoch, aug, self.seed,
                                             self.crops_per_read))

    def val_dataloader(self):
        return self._loader(PlateGridCrops(self.splits["val"], self.val_crop))
