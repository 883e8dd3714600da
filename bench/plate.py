"""Plate-scale figures for `make bench` (also runnable alone: ``python bench/plate.py``).

On simulated HCS OME-Zarr plates of 16 and 256 fields:
- peak RSS of a training run on each (lazy reads: memory must not grow with the plate, ratio <= 1.5);
- training crops/s the loader reads from Zarr (0 and 2 workers) vs what a training step consumes (>= 3x);
- whole-plate prediction megapixels/s with 1 and 2 processes (CPU DDP over fields).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["trainer.max_epochs=1", "data.crops_per_epoch=512", "data.val_crop=128", "logger.wandb=false",
         "callbacks=[]", "test=false", "trainer.enable_progress_bar=false"]


def peak_rss_training(plate: Path, run_dir: Path) -> float:
    """Peak resident memory (MB) of a process that trains one epoch on `plate`.

    VmHWM, not ``getrusage``: Linux carries a forking parent's peak RSS across ``exec`` into ``ru_maxrss``.
    """
    code = ("from labelling.runs.train import fit\n"
            f"fit('nuclei_mse', ['data.name=plate', 'data.path={plate}', *{TRAIN!r}], run_dir={str(run_dir)!r})\n"
            "peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
            "print('RSS_KB', peak.split()[1])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return int(out.split("RSS_KB")[-1].split()[0]) / 1024


def loader_crops_per_s(plate: Path, batches: int = 40) -> dict:
    from labelling.data.platedata import PlateDataModule

    out = {}
    for workers in (0, 2):
        dm = PlateDataModule(str(plate), crop=64, batch_size=16, crops_per_epoch=16 * batches, num_workers=workers,
                             augment={"flip": True, "rotate": 30, "scale": [0.9, 1.1]})
        dm.setup("fit")
        it = iter(dm.train_dataloader())
        next(it)  # worker start-up is not throughput
        start = time.perf_counter()
        n = sum(len(b["input"]) for b in it)
        out[f"workers{workers}"] = n / (time.perf_counter() - start)
    return out


def predict_mp_per_s(run: Path, plate: Path, work: Path) -> dict:
    """Whole-plate prediction into a new plate with 1 and 2 CPU processes."""
    out = {}
    for devices in (1, 2):
        code = ("from labelling.inference.plates import predict_plate\nimport json\nif __name__ == '__main__':\n"
                f"    r = predict_plate({str(run)!r}, {str(plate)!r}, out={str(work / f'pred{devices}.zarr')!r}, "
                f"devices={devices}, accelerator='cpu', progress=False)\n    print('RESULT', json.dumps(r))\n")
        script = work / f"predict{devices}.py"
        script.write_text(code)
        start = time.perf_counter()
        text = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, check=True).stdout
        wall = time.perf_counter() - start
        r = json.loads(text.split("RESULT", 1)[1])
        out[f"processes{devices}"] = {"mp_per_s": r["megapixels_per_s"], "fields": r["predicted"],
                                      "seconds_in_predict": r["seconds"], "wall_seconds_with_startup": wall}
    return out


def plate_bench(training_crops_per_s: float, sizes=(16, 256), field: int = 256) -> dict:
    """All plate figures; `training_crops_per_s` is what one training step of the default net consumes."""
    from labelling.data import platetools

    work = Path(tempfile.mkdtemp(prefix="plate_bench_"))
    r: dict = {"field_px": field, "sizes": list(sizes)}
    plates = {}
    for n in sizes:
        plates[n] = work / f"P{n}.zarr"
        wells = max(4, n // 16)
        platetools.simulate(plates[n], wells=wells, fields=n // wells, size=field, progress=False)
        r[f"train_peak_rss_mb_{n}"] = peak_rss_training(plates[n], work / f"run{n}")
    small, large = sizes
    r["rss_ratio"] = r[f"train_peak_rss_mb_{large}"] / r[f"train_peak_rss_mb_{small}"]
    loader = loader_crops_per_s(plates[large])
    r["loader_crops_per_s"] = loader
    r["training_consumes_crops_per_s"] = training_crops_per_s
    r["loader_over_training"] = max(loader.values()) / training_crops_per_s
    r["predict"] = predict_mp_per_s(work / f"run{small}", plates[large], work)
    return r


def markdown(r: dict) -> list[str]:
    small, large = r["sizes"]
    p1, p2 = r["predict"]["processes1"], r["predict"]["processes2"]
    return [f"## Plates (simulated HCS OME-Zarr, {r['field_px']} px fields)", "",
            "| figure | value |", "|---|---|",
            f"| peak RSS training, {small} fields | {r[f'train_peak_rss_mb_{small}']:.0f} MB |",
            f"| peak RSS training, {large} fields | {r[f'train_peak_rss_mb_{large}']:.0f} MB |",
            f"| RSS ratio {large}/{small} (goal <= 1.5) | **{r['rss_ratio']:.2f}** |",
            f"| loader crops/s from Zarr, 0 / 2 workers | {r['loader_crops_per_s']['workers0']:.0f} / "
            f"{r['loader_crops_per_s']['workers2']:.0f} |",
            f"| training consumes crops/s | {r['training_consumes_crops_per_s']:.0f} |",
            f"| loader / training (goal >= 3) | **{r['loader_over_training']:.1f}** |",
            f"| plate prediction, 1 process | {p1['mp_per_s']:.2f} MP/s ({p1['fields']} fields, "
            f"{p1['wall_seconds_with_startup']:.0f} s wall) |",
            f"| plate prediction, 2 processes (CPU DDP) | {p2['mp_per_s']:.2f} MP/s ({p2['fields']} fields, "
            f"{p2['wall_seconds_with_startup']:.0f} s wall) |", "",
            "Two processes share this machine's 2 cores, so DDP cannot beat one process here; on a multi-GPU "
            "instance each process gets its own GPU.", ""]


if __name__ == "__main__":
    result = plate_bench(float(sys.argv[1]) if len(sys.argv) > 1 else 100.0)
    print(json.dumps(result, indent=2))
    print("\n".join(markdown(result)))
