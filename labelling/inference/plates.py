"""Whole-plate prediction: every field of an HCS OME-Zarr plate, on one or many devices, resumable.

``labelling predict RUN P.zarr`` writes each target as a new channel ``<target>_predicted`` into the plate
(or into a new plate with ``--out NEW.zarr``). Each field goes through the one prediction path
(:mod:`labelling.inference.predict`): the training normalization (per-image statistics from the plate's stored
sketch, exactly what ``predict`` computes from the whole field), the same tiles and blending, streamed
band by band (:func:`~labelling.inference.predict.predict_tiled_rows`) so memory does not grow with the field, and
the training de-normalization, which is recorded in the field's attributes next to the run.

Fields are sharded over Lightning ``trainer.predict`` processes (DDP); a prediction writer marks each field
complete once its last band is written, so a killed run resumes with the fields it had not finished.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from labelling.data import plate as plates
from labelling.data.normalization import sketch_stats
from labelling.errors import ConfigError
from labelling.inference import predict
from labelling.inference.load import load
from labelling.inference.model import Model

SUFFIX = "_predicted"


def predicted_names(model: Model) -> list[str]:
    """Output channel names: ``<target>_predicted``."""
    return [f"{n}{SUFFIX}" for n in model.targets or ["prediction"]]


def input_layout(model: Model, plate: plates.Plate, field: plates.Field, channels: list[str] | None = None):
    """(channel names, z planes, output plane) the model reads from a plate field."""
    dep = model.deployment
    names = list(channels or dep.channels or dep.inputs[: dep.raw_channels] or [])
    planes = list(dep.planes or [0])
    have = plate.channels(field)
    if not names or any(n not in have for n in names):
        raise ConfigError(f"the model reads channel(s) {names or '?'} but the plate has {have}; "
                          "name the plate's input channel(s) with --channels")
    if len(names) * len(planes) != model.raw_channels:
        raise ConfigError(f"the model takes {model.raw_channels} input channel(s); {names} x planes {planes} "
                          f"gives {len(names) * len(planes)}")
    depth = plate.shape(field)[2]
    if max(planes) >= depth:
        raise ConfigError(f"the model reads z planes {planes} but field {field.path} has {depth}")
    return names, planes, planes[len(planes) // 2]


class FieldSource:
    """A plate field's input channels and planes, read lazily.

    What :func:`labelling.inference.predict.predict` streams from: rows on demand, per-image statistics from
    the field's stored sketches.
    """

    def __init__(self, plate: plates.Plate, field: plates.Field, names: list[str], planes: list[int]):
        self.plate, self.field, self.names, self.planes, self.name = plate, field, names, planes, field.path

    @property
    def shape(self) -> tuple[int, int, int]:
        _, _, _, height, width = self.plate.shape(self.field)
        return len(self.names) * len(self.planes), height, width

    def read(self, top: int, bottom: int) -> np.ndarray:
        return self.plate.read(self.field, self.names, self.planes, slice(top, bottom))

    def stats(self, method: str) -> np.ndarray | None:
        try:
            return np.array([sketch_stats(self.plate.sketch(self.field, c, z), method)
                             for c in self.names for z in self.planes], np.float32)
        except ConfigError:  # not preprocessed: predict computes them from the whole field
            return None


def predict_field(model: Model, plate: plates.Plate, field: plates.Field, out: plates.Plate,
                  channels: list[str] | None = None, tile: int = 256, overlap: float = 0.25, blend: str = "gaussian",
                  batch_size: int = 8) -> tuple[int, int]:
    """Predict one field into its ``<target>_predicted`` channels of `out`; returns (pixel count, plane written).

    The field goes through the one prediction path (:func:`labelling.inference.predict.predict`), streamed
    band by band from the plate to the output array. The plane is the model's output plane (the middle of
    its input planes), or 0 in a one-plane plate.
    """
    names, planes, plane = input_layout(model, plate, field, channels)
    plane = plane if out.shape(field)[2] > plane else 0
    indices = out.channel_index(field, predicted_names(model))
    array = out.array(field)

    def store(top: int, bottom: int, y: np.ndarray) -> None:  # y in target units
        for k, c in enumerate(indices):
            array[0, c, plane, top:bottom, :] = y[k]

    source = FieldSource(plate, field, names, planes)
    predict.predict(model, source, tile=tile, overlap=overlap, blend=blend, batch_size=batch_size, write=store)
    return source.shape[1] * source.shape[2], plane


# ------------------------------------------------------------------ Lightning: DDP over fields
class PlateJob(lightning.LightningDataModule):
    """The fields still to predict; rank 0 prepares the output channels, every rank takes its share."""

    def __init__(self, model: Model, source: str, out: str, wells: list[str] | None, overwrite: bool = False):
        super().__init__()
        self.model, self.source, self.out, self.wells, self.overwrite = model, source, out, wells, overwrite
        self.shard: list[str] = []

    def prepare_data(self) -> None:
        plate = plates.Plate(self.source)
        fields, names = plate.select(self.wells), predicted_names(self.model)
        if self.out != self.source and not plates.is_plate(self.out):
            with plates.PlateWriter(self.out, names, name=f"{Path(self.source).stem} predicted",
                                    overwrite=self.overwrite, pixel_size=plate.pixel_size(fields[0])) as writer:
                for f in fields:
                    row, column, fov = f.path.split("/")
                    writer.create(row, column, fov, (1, *plate.shape(f)[3:]))
        out = plates.Plate(self.out, mode="r+")
        pending = []
        for f in fields:
            if f not in out.fields:
                raise ConfigError(f"{self.out} has no field {f.path}; write into a new plate with another --out")
            done = out.attrs(f).get("predictions", {})
            out.append_channels(f, names)
            if not all(done.get(n, {}).get("complete") and done[n].get("model_sha256") == self.model.fingerprint
                       for n in names):
                pending.append(f.path)
        out.root.attrs[plates.KEY] = {**dict(out.root.attrs.get(plates.KEY, {})), "pending": pending}

    def setup(self, stage: str | None = None) -> None:
        pending = plates.Plate(self.out).root.attrs[plates.KEY]["pending"]
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.shard = pending[rank::world]  # every field exactly once: no padding, unlike a DistributedSampler

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.shard, batch_size=1, collate_fn=list)


class PlatePredictor(lightning.LightningModule):
    """Predicts the fields of a batch (their paths) into the output plate, band by band."""

    def __init__(self, model: Model, source: str, out: str, options: dict):
        super().__init__()
        self.model, self.source, self.out, self.options = model, source, out, options
        # a torch model's net as a submodule, so Lightning puts it on each process's device
        self.net = model.forward if isinstance(model.forward, torch.nn.Module) else None
        self.plates: tuple | None = None

    def predict_step(self, batch: list[str], batch_idx: int) -> list[dict]:
        if self.plates is None:  # each process opens the stores itself
            self.plates = plates.Plate(self.source), plates.Plate(self.out, mode="r+")
        plate, out = self.plates
        done = []
        for path in batch:
            field, start = plates.Field(path, path.rsplit("/", 1)[0]), time.perf_counter()
            pixels, plane = predict_field(self.model, plate, field, out, **self.options)
            done.append({"field": path, "pixels": pixels, "plane": plane, "seconds": time.perf_counter() - start})
        return done


class FieldWriter(BasePredictionWriter):
    """Marks each field complete (with the model, its source and the de-normalization used) once written."""

    def __init__(self, model: Model, source: str):
        super().__init__(write_interval="batch")
        self.model, self.source = model, source

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        out = pl_module.plates[1]
        dep = self.model.deployment
        stats = dep.output_stats()
        for record in prediction:
            field = plates.Field(record["field"], record["field"].rsplit("/", 1)[0])
            entries = out.attrs(field).get("predictions", {})
            for k, name in enumerate(predicted_names(self.model)):
                before = entries.get(name, {})
                same = before.get("model_sha256") == self.model.fingerprint
                entries[name] = {
                    "run": self.model.source, "model_sha256": self.model.fingerprint, "source_plate": self.source,
                    "complete": True, "plane": record["plane"], "normalize": dep.normalize,
                    "denormalize": None if stats is None else {"offset": float(stats[k, 0]), "scale": float(stats[k, 1])},
                    "seconds": round(record["seconds"], 3), "rank": trainer.global_rank,
                    # how often this model finished the field: a test checks DDP writes each field once
                    "writes": before.get("writes", 0) + 1 if same else 1}
            out.update_attrs(field, predictions=entries)


def check_devices(devices: int, accelerator: str) -> None:
    """Refuse a device count or accelerator this machine cannot give, before any process starts (ConfigError)."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"--devices must be a whole number >= 1, got {devices}")
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"unknown accelerator '{accelerator}'; valid: {', '.join(ACCELERATORS)}")
    if accelerator in ("gpu", "cuda"):
        have = torch.cuda.device_count()
        if devices > have:
            raise ConfigError(f"--accelerator {accelerator} --devices {devices}: this machine has {have} GPU(s); "
                              "use --accelerator cpu (processes share the cores) or fewer devices")
    elif accelerator == "cpu" and devices > (os.cpu_count() or 1):
        raise ConfigError(f"--devices {devices} CPU processes on {os.cpu_count()} cores; use at most that many")


ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


def predict_plate(model: str | Path | Model, source: str | Path, out: str | Path | None = None,
                  wells: list[str] | None = None, devices: int = 1, accelerator: str = "auto",
                  strategy: str | None = None, channels=None, tile: int = 256, overlap: float = 0.25,
                  blend: str = "gaussian", batch_size: int = 8, progress: bool = True, overwrite: bool = False) -> dict:
    """Predict every field of a plate (or of `wells`) into the plate or into `out`; resumes unfinished runs.

    Every setting is checked before any process starts. `out` must be a new path or an existing plate
    (another folder is refused unless `overwrite`).

    Returns ``{"fields": n selected, "predicted": n this call, "seconds": wall, "megapixels_per_s": ...}``.
    """
    predict.check_options(tile=tile, overlap=overlap, blend=blend, batch_size=batch_size)
    check_devices(devices, accelerator)
    model = model if isinstance(model, Model) else load(model)
    source, out = str(source), str(out or source)
    if out != source and Path(out).exists() and not plates.is_plate(out) and not overwrite:
        raise ConfigError(f"--out {out} exists and is not a plate; give a new path (P.zarr) or an existing plate")
    plate = plates.Plate(source)
    fields = plate.select(wells)
    input_layout(model, plate, fields[0], channels)  # a wrong channel fails before any process starts
    options = {"channels": channels, "tile": tile, "overlap": overlap, "blend": blend, "batch_size": batch_size}
    if strategy is None:
        strategy = "auto" if devices == 1 else "ddp_spawn" if accelerator == "cpu" else "ddp"
    trainer = lightning.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, logger=False,
                                enable_checkpointing=False, enable_model_summary=False, use_distributed_sampler=False,
                                enable_progress_bar=progress, callbacks=[FieldWriter(model, source)])
    start = time.perf_counter()
    job = PlateJob(model, source, out, wells, overwrite)
    trainer.predict(PlatePredictor(model, source, out, options), datamodule=job, return_predictions=False)
    seconds = time.perf_counter() - start
    pending = plates.Plate(out).root.attrs[plates.KEY]["pending"]
    pixels = sum(int(np.prod(plate.shape(plates.Field(p, ""))[3:])) for p in pending)
    return {"fields": len(fields), "predicted": len(pending), "seconds": seconds,
            "megapixels_per_s": pixels / 1e6 / max(seconds, 1e-9), "out": out, "channels": predicted_names(model)}
