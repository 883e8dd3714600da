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

import time
from pathlib import Path

import lightning
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from labelling.data import plate as plates
from labelling.data.normalization import bin_factor, denormalize, image_stats, normalize, sketch_stats
from labelling.errors import ConfigError
from labelling.inference import predict

SUFFIX = "_predicted"


def predicted_names(task) -> list[str]:
    """Output channel names: ``<target>_predicted``."""
    return [f"{n}{SUFFIX}" for n in predict.deployment(task).get("targets") or ["prediction"]]


def run_id(path: str | Path) -> str:
    """What identifies a trained model for resuming: its path and the newest time its files changed."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.suffix in (".ckpt", ".onnx", ".pt")]
    return f"{path}@{max((p.stat().st_mtime_ns for p in files), default=0)}"


def input_layout(task, plate: plates.Plate, field: plates.Field, channels: list[str] | None = None):
    """(channel names, z planes, output plane) the model reads from a plate field."""
    dep = predict.deployment(task)
    names = list(channels or dep.get("channels") or dep.get("inputs") or [])
    planes = list(dep.get("planes") or [0])
    have = plate.channels(field)
    if not names or any(n not in have for n in names):
        raise ConfigError(f"the model reads channel(s) {names or '?'} but the plate has {have}; "
                          "name the plate's input channel(s) with --channels")
    expected = task.net.in_channels - sum(t.net.out_channels for t in getattr(task, "cascade", None) or [])
    if len(names) * len(planes) != expected:
        raise ConfigError(f"the model takes {task.net.in_channels} input channel(s); {names} x planes {planes} "
                          f"gives {len(names) * len(planes)}")
    return names, planes, planes[len(planes) // 2]


def input_stats(task, plate: plates.Plate, field: plates.Field, names: list[str], planes: list[int]) -> np.ndarray:
    """(Cin, 2) normalization of a field's input, as :func:`labelling.inference.predict.normalize_input` would compute it."""
    method = predict.deployment(task)["normalize"]
    if method == "fixed":
        return task.input_stats.detach().cpu().numpy().astype(np.float32)
    try:
        return np.array([sketch_stats(plate.sketch(field, c, z), method) for c in names for z in planes],
                        np.float32)
    except ConfigError:  # not preprocessed: the same statistics from the whole field
        return image_stats(plate.read(field, names, planes), method)


def predict_field(task, plate: plates.Plate, field: plates.Field, out: plates.Plate, channels: list[str] | None = None,
                  tile: int = 256, overlap: float = 0.25, blend: str = "gaussian", batch_size: int = 8) -> tuple[int, int]:
    """Predict one field into its ``<target>_predicted`` channels of `out`; returns (pixel count, plane written).

    The plane is the model's output plane (the middle of its input planes), or 0 in a one-plane plate.
    """
    names, planes, plane = input_layout(task, plate, field, channels)
    plane = plane if out.shape(field)[2] > plane else 0
    indices = out.channel_index(field, predicted_names(task))
    _, _, _, height, width = plate.shape(field)
    array, stats = out.array(field), predict.output_stats(task)
    size = predict.fit_tile(task.net, tile, max(height, width))

    def store(top: int, bottom: int, y: np.ndarray) -> None:  # y in target units
        if not np.isfinite(y).all():
            raise FloatingPointError(f"{field.path}: the model produced NaN/inf values (a diverged checkpoint?)")
        for k, c in enumerate(indices):
            array[0, c, plane, top:bottom, :] = y[k]

    dep = predict.deployment(task)
    streamable = (not getattr(task, "cascade", None) and height >= size and width >= size
                  and bin_factor((1, height, width), dep.get("max_size", 0)) == 1)
    if streamable:
        xs = input_stats(task, plate, field, names, planes)
        predict.predict_tiled_rows(predict.tile_model(task), lambda a, b: normalize(plate.read(field, names, planes, slice(a, b)), xs),
                                   height, width, lambda a, b, rows: store(a, b, rows if stats is None else
                                                                           denormalize(rows, stats)),
                                   tile=size, overlap=overlap, blend=blend, batch_size=batch_size,
                                   device=predict._device(task.predict))
    else:  # binned, cascaded or smaller than a tile: the whole field in memory, through predict()
        y = predict.predict(task, plate.read(field, names, planes), tile=tile, overlap=overlap, blend=blend,
                            batch_size=batch_size, name=field.path)
        store(0, height, y)
    return height * width, plane


# ------------------------------------------------------------------ Lightning: DDP over fields
class PlateJob(lightning.LightningDataModule):
    """The fields still to predict; rank 0 prepares the output channels, every rank takes its share."""

    def __init__(self, task, source: str, out: str, wells: list[str] | None, run: str):
        super().__init__()
        self.task, self.source, self.out, self.wells, self.run = task, source, out, wells, run
        self.shard: list[str] = []

    def prepare_data(self) -> None:
        plate = plates.Plate(self.source)
        fields, names = plate.select(self.wells), predicted_names(self.task)
        if self.out != self.source and not plates.is_plate(self.out):
            with plates.PlateWriter(self.out, names, name=f"{Path(self.source).stem} predicted") as writer:
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
            if not all(done.get(n, {}).get("complete") and done[n].get("run") == self.run for n in names):
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

    def __init__(self, task, source: str, out: str, options: dict):
        super().__init__()
        self.task, self.source, self.out, self.options = task, source, out, options
        self.plates: tuple | None = None

    def predict_step(self, batch: list[str], batch_idx: int) -> list[dict]:
        if self.plates is None:  # each process opens the stores itself
            self.plates = plates.Plate(self.source), plates.Plate(self.out, mode="r+")
        plate, out = self.plates
        done = []
        for path in batch:
            field, start = plates.Field(path, path.rsplit("/", 1)[0]), time.perf_counter()
            pixels, plane = predict_field(self.task, plate, field, out, **self.options)
            done.append({"field": path, "pixels": pixels, "plane": plane, "seconds": time.perf_counter() - start})
        return done


class FieldWriter(BasePredictionWriter):
    """Marks each field complete (with the run and the de-normalization used) once all its bands are written."""

    def __init__(self, task, run: str):
        super().__init__(write_interval="batch")
        self.task, self.run = task, run

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        out = pl_module.plates[1]
        stats = predict.output_stats(self.task)
        dep = predict.deployment(self.task)
        for record in prediction:
            field = plates.Field(record["field"], record["field"].rsplit("/", 1)[0])
            entries = out.attrs(field).get("predictions", {})
            for k, name in enumerate(predicted_names(self.task)):
                before = entries.get(name, {})
                entries[name] = {
                    "run": self.run, "complete": True, "plane": record["plane"], "normalize": dep["normalize"],
                    "denormalize": None if stats is None else {"offset": float(stats[k, 0]), "scale": float(stats[k, 1])},
                    "seconds": round(record["seconds"], 3), "rank": trainer.global_rank,
                    # how often this run finished the field: a test checks DDP writes each field once
                    "writes": before.get("writes", 0) + 1 if before.get("run") == self.run else 1}
            out.update_attrs(field, predictions=entries)


def predict_plate(model: str | Path, source: str | Path, out: str | Path | None = None, wells: list[str] | None = None,
                  devices: int = 1, accelerator: str = "auto", strategy: str | None = None, channels=None,
                  tile: int = 256, overlap: float = 0.25, blend: str = "gaussian", batch_size: int = 8,
                  progress: bool = True) -> dict:
    """Predict every field of a plate (or of `wells`) into the plate or into `out`; resumes unfinished runs.

    Returns ``{"fields": n selected, "predicted": n this call, "seconds": wall, "megapixels_per_s": ...}``.
    """
    from labelling.export.deployed import load_model

    task, _ = load_model(model)
    source, out = str(source), str(out or source)
    run = run_id(model)
    plate = plates.Plate(source)
    fields = plate.select(wells)
    input_layout(task, plate, fields[0], channels)  # a wrong channel fails before any process starts
    options = {"channels": channels, "tile": tile, "overlap": overlap, "blend": blend, "batch_size": batch_size}
    if strategy is None:
        strategy = "auto" if devices == 1 else "ddp_spawn" if accelerator == "cpu" else "ddp"
    trainer = lightning.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, logger=False,
                                enable_checkpointing=False, enable_model_summary=False, use_distributed_sampler=False,
                                enable_progress_bar=progress, callbacks=[FieldWriter(task, run)])
    start = time.perf_counter()
    job = PlateJob(task, source, out, wells, run)
    trainer.predict(PlatePredictor(task, source, out, options), datamodule=job, return_predictions=False)
    seconds = time.perf_counter() - start
    pending = plates.Plate(out).root.attrs[plates.KEY]["pending"]
    pixels = sum(int(np.prod(plate.shape(plates.Field(p, ""))[3:])) for p in pending)
    return {"fields": len(fields), "predicted": len(pending), "seconds": seconds,
            "megapixels_per_s": pixels / 1e6 / max(seconds, 1e-9), "out": out, "channels": predicted_names(task)}
