"""A plate written and preprocessed by labelling opens in iohub as VisCy opens it, and its `normalization`
statistics (VisCy's norm_meta) describe the pixels iohub reads.

iohub pins zarr 2 (labelling uses zarr 3), so it lives in its own virtual environment: `.venv-iohub` beside the
project (or $LABELLING_IOHUB_VENV), created on first use with `pip install iohub`. Without PyPI the test skips,
except under CI=true, where it fails.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labelling.config import ROOT

VENV = Path(os.environ.get("LABELLING_IOHUB_VENV", ROOT / ".venv-iohub"))

# Run inside the iohub environment: what VisCy's HCSDataModule does with a plate (open_ome_zarr(layout="hcs"),
# every position's image "0" as (T, C, Z, Y, X), `normalization` per channel and level), plus the
# fov-level z-score VisCy's NormalizeSampled applies.
SCRIPT = r"""
import json, sys
import numpy as np
from iohub import open_ome_zarr
out = {"positions": {}}
with open_ome_zarr(sys.argv[1], layout="hcs", mode="r") as plate:
    out["channels"] = list(plate.channel_names)
    for name, pos in plate.positions():
        image = np.asarray(pos["0"][:], np.float64)
        meta = pos.zattrs["normalization"]
        row = {"shape": list(image.shape), "levels": {c: sorted(meta[c]) for c in meta}}
        for c, channel in enumerate(plate.channel_names):
            fov = meta[channel]["fov_statistics"]
            z = (image[:, c] - fov["mean"]) / fov["std"]
            row[channel] = {"z_mean": float(z.mean()), "z_std": float(z.std()),
                            "median_error": float(abs(np.median(image[:, c]) - fov["median"]) / fov["std"])}
        out["positions"][name] = row
print(json.dumps(out))
"""


def iohub_python() -> Path:
    python = VENV / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import iohub"], capture_output=True).returncode == 0:
        return python
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [[base, "-m", "venv", str(VENV)], [VENV / "bin" / "pip", "install", "-q", "iohub>=0.2,<0.3"]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=600)
        if done.returncode:
            why = f"could not set up iohub in {VENV}: {' '.join(map(str, step))}: {done.stderr[-400:]}"
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI=true: {why}")
            pytest.skip(why)
    return python


def test_iohub_opens_a_preprocessed_labelling_plate_as_viscy_does(tmp_path):
    from labelling.data import platetools

    plate = platetools.simulate(tmp_path / "P.zarr", wells=2, fields=2, size=64, progress=False)
    platetools.preprocess(tmp_path / "P.zarr", progress=False)
    done = subprocess.run([iohub_python(), "-c", SCRIPT, str(tmp_path / "P.zarr")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["channels"] == plate.channels(plate.fields[0])
    assert sorted(seen["positions"]) == sorted(f.path for f in plate.fields)
    for name, row in seen["positions"].items():
        assert row["shape"][1] == len(seen["channels"]) and row["shape"][-2:] == [64, 64], name
        for channel in seen["channels"]:
            assert row["levels"][channel] == ["dataset_statistics", "fov_statistics"]
            # the field's own statistics z-score exactly what iohub reads: mean 0, SD 1
            assert abs(row[channel]["z_mean"]) < 1e-4 and abs(row[channel]["z_std"] - 1) < 1e-3, (name, channel)
            assert row[channel]["median_error"] < 1e-2, (name, channel)
