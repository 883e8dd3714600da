"""Paired transmitted-light -> fluorescence DataModule with grouped splits and invertible normalization.

Fields become :class:`~labelling.data.crops.Image` objects, served as random training crops and grid
validation/test crops (:mod:`labelling.data.crops`).

Splits are drawn over *groups* (wells by default), never over crops, so neighbouring tiles of a field can
never end up on both sides of a split.
"""

from __future__ import annotations

import lightning
import numpy as np
import torch
from torch.utils.data import DataLoader

from labelling import registry
from labelling.config import unknown
from labelling.data import cascade as cascade_runs
from labelling.data.augment import PairedAugment
from labelling.data.crops import GridCrops, Image, RandomCrops, foreground_threshold, to_batch  # noqa: F401
from labelling.data.normalization import (
    NORMALIZATIONS,
    TARGET_NORMALIZATIONS,
    balanced_floor,
    dataset_stats,
    flat_field,
    flatten,
    image_stats,
    normalize,
    target_rule_stats,
)
from labelling.data.simulate import CHANNELS, simulate_plate
from labelling.data.splits import split_groups
from labelling.deployment import Deployment


class FluorescenceDataModule(lightning.LightningDataModule):
    """Brightfield -> fluorescence data from the built-in plate simulator (base class of every source).

    Args:
        organelle: target channel(s): one of ``nuclei, er, golgi, actin, gfp, nucleoli`` or a list.
        crop: training crop side (multiple of 2**net depth).
        val_crop: validation crop side (default: `crop`); larger crops make ``val/pcc`` less noisy on
            sparse real images, where many small crops hold only background.
        batch_size: crops per batch.
        crops_per_epoch: random training crops per epoch.
        val_fraction, test_fraction: fraction of split groups held out.
        test_groups, val_groups: split groups (names or regular expressions, e.g. ``["pos12"]`` or
            ``["A.*"]``) held out explicitly; the fractions then split only the remaining groups.
        seed: seed of splits, crops and augmentation (``data.seed``; defaults to the experiment's ``seed``,
            so changing ``seed`` alone also changes the split).
        split_by: ``well`` or ``field`` (simulator) - the unit that never straddles splits.
        normalize: normalization of input and target: per image (``percentile``, ``zscore``, ``minmax``,
            ``none``) or ``fixed`` (percentile statistics of the whole training split, stored with the
            model: contrast and brightness changes of the microscope then reach the network).
        target_normalize: the targets' normalization when it differs from the input's (e.g. inputs
            ``zscore`` per image against illumination changes, targets ``fixed`` to keep intensity units),
            or ``balanced``: each target's own mean, and a scale halfway (geometric mean) between its own SD
            and the median training field's (:func:`~labelling.data.normalization.balanced_stats`).
        target_transform: ``none``, ``rolling_ball``, ``golgi_enhance`` or ``gfp_mask`` (binary, not normalized).
        flatfield: divide each raw input field by its own fitted quadratic illumination (vignetting, tilt)
            before normalizing it, in training and deployment alike (:func:`~labelling.data.normalization.flat_field`).
        augment: dict for :class:`PairedAugment` (flip, rotate, scale, corrupt_p, max_severity).
        foreground_crops: share of training crops drawn to contain stained foreground (at least 2 % of the
            crop above the training targets' triangle threshold); the rest are uniform. 0 samples uniformly.
        mirror_margin: uniform training crops may reach this many pixels past the field's edge, the field
            (input and target) mirrored there as ``predict(..., halo=)`` mirrors it, so the net learns the
            border the way it is deployed (0: crops stay inside the field).
        num_workers: DataLoader workers.
        n_wells, fields_per_well, field_size: simulated plate geometry (the default test split holds 4
            wells x 6 fields = 24 fields, both phenotypes).
    """

    def __init__(self, organelle: str | list[str] = "nuclei", crop: int = 64, val_crop: int | None = None,
                 batch_size: int = 16,
                 crops_per_epoch: int = 512, val_fraction: float = 0.25, test_fraction: float = 0.25,
                 split_by: str = "well", normalize: str = "percentile", target_normalize: str | None = None,
                 target_transform: str = "none", flatfield: bool = False,
                 augment: dict | None = None, foreground_crops: float = 0.0, mirror_margin: int = 0,
                 num_workers: int = 0, seed: int = 0,
                 test_groups: list[str] | None = None, val_groups: list[str] | None = None,
                 n_wells: int = 16, fields_per_well: int = 6, field_size: int = 256, cascade: list[str] | None = None):
        super().__init__()
        self.organelles = [organelle] if isinstance(organelle, str) else list(organelle)
        for o in self.organelles:
            if o not in CHANNELS:
                raise unknown("organelle", o, CHANNELS)
        if target_transform not in registry.TABLES["transform"]:
            raise unknown("target_transform", target_transform, registry.names("transform"))
        for method, valid in ((normalize, NORMALIZATIONS), (target_normalize or normalize, TARGET_NORMALIZATIONS)):
            if method not in valid:
                raise unknown("normalization", method, valid)
        self.target_norm = target_normalize or normalize
        if split_by not in ("well", "field"):
            raise ValueError(f"split_by must be 'well' or 'field', got {split_by!r}")
        self.crop, self.batch_size, self.crops_per_epoch = crop, batch_size, crops_per_epoch
        self.val_crop = val_crop or crop
        self.val_fraction, self.test_fraction, self.split_by = val_fraction, test_fraction, split_by
        self.test_groups, self.val_groups = list(test_groups or []), list(val_groups or [])
        self.norm, self.target_transform, self.num_workers, self.seed = normalize, target_transform, num_workers, seed
        self.flatfield = bool(flatfield)
        self.augment_args = {"flip": True, **(augment or {})}
        if not 0 <= foreground_crops <= 1:
            raise ValueError(f"foreground_crops must be a share in [0, 1], got {foreground_crops}")
        self.foreground_crops, self.mirror_margin = foreground_crops, mirror_margin
        self.cascade = cascade_runs.resolve(cascade)
        self.cascade_inputs = None  # the loaded cascade (labelling.build.build_data attaches it)
        if self.cascade and self.augment_args.get("corrupt_p", 0):
            raise ValueError("data.cascade with corruption augmentation would need the cascade's predictions of "
                             "every corrupted crop; set augment.corrupt_p=0")
        PairedAugment(crop, **self.augment_args)  # fail fast on bad augmentation arguments
        self.plate = dict(n_wells=n_wells, fields_per_well=fields_per_well, size=field_size)
        self.splits: dict[str, list[Image]] = {}
        self.input_stats: np.ndarray | None = None  # dataset-level (fixed) statistics of the training inputs
        self.target_stats: np.ndarray | None = None
        self.target_floor: np.ndarray | None = None  # ``balanced`` targets' smallest scale (training split)

    @property
    def input_names(self) -> list[str]:
        return self.raw_input_names + cascade_runs.names(self.cascade, self.cascade_models)

    @property
    def raw_input_names(self) -> list[str]:
        return ["brightfield"]

    input_override: np.ndarray | None = None  # dataset-level input statistics given, not computed (fine-tuning)

    def keep_input_normalization(self, rule: str, stats, flatfield: bool = False) -> None:
        """Normalize inputs with another model's rule and dataset-level statistics (call before setup).

        Fine-tuning keeps the source model's view of the input.
        """
        stats = np.asarray(stats, np.float32)
        if self.splits:
            raise RuntimeError("keep_input_normalization must come before setup()")
        if len(stats) != self.in_channels:
            raise ValueError(f"the source model normalizes {len(stats)} input channel(s), this data has "
                             f"{self.in_channels}")
        self.norm, self.input_override, self.flatfield = rule, stats, bool(flatfield)

    def attach_cascade(self, inputs) -> None:
        """Take the loaded cascade (:class:`labelling.inference.load.CascadeInputs`).

        ``inputs.models`` give the channel counts and names; ``inputs(raw, key)`` the raw input followed by
        their predictions (the deployed path).
        """
        if self.cascade and inputs is None:
            raise ValueError("data.cascade lists runs but none were loaded; build with "
                             "labelling.inference.load.build_run(cfg)")
        self.cascade_inputs = inputs

    @property
    def cascade_models(self) -> list:
        """The models of ``cascade`` (empty without one)."""
        if self.cascade and self.cascade_inputs is None:
            self.attach_cascade(None)
        return list(self.cascade_inputs.models) if self.cascade else []

    @property
    def target_names(self) -> list[str]:
        return list(self.organelles)

    # -- properties the task and the deployment state need ----------------------------------------
    raw_channels = 1
    max_size = 0  # fields binned to this longer side (folder data)
    planes: list[int] | None = None  # z planes read as input channels
    channels: list[str] | None = None  # plate channel names read as inputs
    pixel_size: tuple[float, float] | None = None  # (y, x) micrometres, when the files say
    spatial_multiple = 16  # whole-field val/test crops are cut to this (build sets the net's)

    def deployment(self, net, loss, tta: bool = False, reconstruct: bool = False) -> Deployment:
        """The typed deployment state of a model trained on this data, from the *training* split only.

        The input normalization (and dataset-level input statistics), the output de-normalization (the
        training targets' statistics; ``affine`` for scale-free losses, refitted after training; ``none``
        for logit losses and binary targets), the null predictor's level and the geometry and channels.
        With `reconstruct` (an autoencoder) the outputs are the normalized inputs themselves.
        """
        self.setup("fit")
        geometry = dict(inputs=list(self.input_names), raw_channels=self.raw_channels, in_channels=net.in_channels,
                        out_channels=net.out_channels, spatial_multiple=net.spatial_multiple,
                        spatial_dims=net.spatial_dims, normalize=self.norm, flatfield=self.flatfield,
                        input_stats=np.asarray(self.input_stats).tolist(), max_size=int(self.max_size or 0),
                        pixel_size=self.pixel_size)
        n = net.out_channels
        if reconstruct:
            return Deployment(**geometry, targets=list(self.input_names)[:n], denormalize="none",
                              target_stats=[[0.0, 1.0]] * n, null_level=[0.0] * n)
        rule = "none" if loss.activation == "sigmoid" or self.binary_target else "affine" if loss.scale_free else "stats"
        train = self.splits["train"]
        target_stats = self.target_stats if self.target_norm == "fixed" else np.mean([im.target_stats for im in train], 0)
        return Deployment(
            **geometry, targets=list(self.target_names), denormalize=rule, target_stats=np.asarray(target_stats).tolist(),
            null_level=np.asarray(self.null_level(), np.float64).tolist(), activation=loss.activation,
            target_transform=self.target_transform, planes=list(self.planes) if self.planes is not None else None,
            channels=list(self.channels) if self.channels is not None else None, cascade=list(self.cascade),
            tta=bool(tta))

    @property
    def in_channels(self) -> int:
        return self.raw_channels + cascade_runs.channels(self.cascade_models)

    @property
    def out_channels(self) -> int:
        return len(self.organelles)

    @property
    def binary_target(self) -> bool:
        return self.target_transform == "gfp_mask"

    # -- sources -------------------------------------------------------------------------------
    def load_pairs(self) -> list[tuple[np.ndarray, np.ndarray, str, str, dict]]:
        """Raw (input (Cin,H,W), target (Cout,H,W), group, key, extra) per field. Subclasses override."""
        idx = [CHANNELS.index(o) for o in self.organelles]
        out = []
        for f in simulate_plate(self.seed, **self.plate):
            key = f"{f.plate}_{f.well}_f{f.field}"
            group = f.well if self.split_by == "well" else key
            extra = {"nuclei": f.nuclei, "cells": f.cells, "masks": f.masks[idx], "phenotype": f.phenotype,
                     "well": f.well, "field": f.field, "stratum": f"phenotype{f.phenotype}"}
            out.append((f.brightfield[None], f.fluorescence[idx], group, key, extra))
        return out

    def transform_target(self, y: np.ndarray) -> np.ndarray:
        tt = registry.get("transform", self.target_transform)
        return np.stack([tt(c) for c in y]).astype(np.float32)

    def prepare_image(self, x: np.ndarray, y: np.ndarray, group: str, key: str, extra=None) -> Image:
        """Normalize one raw pair (the target already transformed) with this module's normalization."""
        x, illum = flatten(x, self.raw_channels) if self.flatfield else (np.asarray(x, np.float32), None)
        xs = self.input_stats if self.norm == "fixed" else image_stats(x, self.norm)
        ys = target_rule_stats(self.target_norm, lambda rule: image_stats(y, rule), self.target_stats, self.target_floor)
        if self.binary_target:
            ys = image_stats(y, "none")
        return Image(normalize(x, xs), normalize(y, ys), xs, ys, group, key, extra,
                     self.raw_channels if self.cascade else None, illum)

    def fit_target_statistics(self, targets: list[np.ndarray]) -> None:
        """Dataset-level statistics of the training targets, and the ``balanced`` floor when that is the rule."""
        self.target_stats = dataset_stats(targets)
        self.target_floor = balanced_floor([image_stats(y, "zscore")[:, 1] for y in targets]) \
            if self.target_norm == "balanced" else None

    def null_level(self) -> np.ndarray:
        """The null predictor's level: the mean training target per channel, in target units."""
        return np.mean([im.raw_target().mean((1, 2)) for im in self.splits["train"]], 0)

    def flat(self, raw: np.ndarray) -> np.ndarray:
        """`raw` with its raw channels flat-field corrected (``data.flatfield``), else unchanged."""
        return flat_field(raw, self.raw_channels) if self.flatfield else raw

    def normalize_raw(self, raw: np.ndarray, image: Image) -> np.ndarray:
        """Normalize a raw input like deployment does (fixed: the stored statistics of `image`)."""
        raw = self.flat(raw)
        stats = image.input_stats if self.norm == "fixed" else image_stats(raw, self.norm)
        return normalize(raw, stats)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        pairs = [(x, self.transform_target(y), *rest) for x, y, *rest in self.load_pairs()]
        if self.cascade:  # the cascade runs' predictions of each raw field become extra input channels
            pairs = [(self.cascade_inputs(x, key), y, group, key, extra)
                     for x, y, group, key, extra in pairs]
        strata = {p[2]: p[4]["stratum"] for p in pairs if p[4] and "stratum" in p[4]}
        where = split_groups([p[2] for p in pairs], self.val_fraction, self.test_fraction, self.seed, strata,
                             self.test_groups, self.val_groups)
        train = [p for p in pairs if where[p[2]] == "train"]
        # Dataset-level statistics from the training split only (fixed normalization, and the fixed view
        # of the stability study); test images never contribute to anything the model uses.
        self.input_stats = self.input_override if self.input_override is not None else dataset_stats(
            [self.flat(p[0]) for p in train])
        self.fit_target_statistics([p[1] for p in train])
        self.splits = {"train": [], "val": [], "test": []}
        for p in pairs:
            self.splits[where[p[2]]].append(self.prepare_image(*p))

    # -- loaders -------------------------------------------------------------------------------
    def _loader(self, ds, shuffle=False, batch_size=None, drop_last=False) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size or self.batch_size, shuffle=shuffle, drop_last=drop_last,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def _train_loader(self, crops) -> DataLoader:
        """A training loader whose batches are all full (unless an epoch is shorter than one batch).

        A short last batch of random crops adds nothing, and a compiled training step (``task.compile``)
        would compile again for its shape.
        """
        return self._loader(crops, drop_last=len(crops) >= self.batch_size)

    def train_dataloader(self) -> DataLoader:
        aug = PairedAugment(self.crop, seed=self.seed, **self.augment_args)
        return self._train_loader(RandomCrops(self.splits["train"], self.crops_per_epoch, aug, self.seed,
                                              renormalize=self.normalize_raw, foreground=self.foreground_crops,
                                              mirror_margin=self.mirror_margin))

    def val_dataloader(self) -> DataLoader:
        return self._loader(GridCrops(self.splits["val"], self.val_crop))

    def test_dataloader(self) -> DataLoader:
        return self._loader(GridCrops(self.splits["test"], None, self.spatial_multiple), batch_size=1)
