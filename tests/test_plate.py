"""HCS OME-Zarr plates: layout, statistics, lazy training data, streamed/resumable/DDP prediction, evaluation."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from labelling.data import plate as plates
from labelling.data import platetools
from labelling.data.normalization import dataset_stats, image_stats, pooled_stats, sketch_stats
from labelling.errors import ConfigError, ImageError
from labelling.inference import plates as platepredict
from labelling.inference import predict
from labelling.inference.load import load, load_task
from labelling.runs.train import fit
from labelling.studies import plates as plateeval

ROOT = Path(__file__).resolve().parents[1]
RUN_ARGS = ["trainer.max_epochs=1", "data.crops_per_epoch=16", "data.crop=32", "data.batch_size=4", "net.width=4",
            "net.depth=2", "logger.wandb=false", "callbacks=[]", "trainer.enable_progress_bar=false",
            "trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def plate_run(tmp_path_factory):
    """A simulated plate (6 wells x 2 fields, 96 px) and a run trained on it for one epoch."""
    root = tmp_path_factory.mktemp("plate")
    path = root / "P.zarr"
    platetools.simulate(path, wells=6, fields=2, size=96, progress=False)
    fit("nuclei_mse", ["data.name=plate", f"data.path={path}", *RUN_ARGS], run_dir=root / "run")
    return path, root / "run"


def copy_plate(path: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(path, dest)
    return dest


def test_plate_layout_is_ngff_04_and_readable_by_ome_zarr(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    path = platetools.simulate(tmp_path / "P.zarr", wells=3, fields=2, size=64, planes=3, progress=False).path
    plate = plates.Plate(path)
    assert [f.path for f in plate.fields] == ["A/1/0", "A/1/1", "A/2/0", "A/2/1", "A/3/0", "A/3/1"]
    assert plate.meta["version"] == "0.4" and plate.meta["field_count"] == 2
    assert plate.channels(plate.fields[0])[:2] == ["brightfield", "nuclei"]
    assert plate.shape(plate.fields[0]) == (1, 8, 3, 64, 64)
    assert plate.array(plate.fields[0]).chunks == (1, 1, 1, 64, 64)
    spec = next(iter(Reader(parse_url(str(path)))())).specs[0]  # OME's reader sees an HCS plate
    assert type(spec).__name__ == "Plate"
    region = plate.read(plate.fields[1], ["brightfield", "nuclei"], [0, 2], slice(5, 37), slice(10, 42))
    full = np.asarray(plate.array(plate.fields[1])[0])
    assert region.shape == (4, 32, 32)
    np.testing.assert_array_equal(region[1], full[0, 2, 5:37, 10:42])  # channel-major, then planes
    np.testing.assert_array_equal(region[2], full[1, 0, 5:37, 10:42])
    assert [f.path for f in plate.select(["A2", "A/3"])] == ["A/2/0", "A/2/1", "A/3/0", "A/3/1"]
    with pytest.raises(ConfigError, match="matches none"):
        plate.select(["H12"])
    with pytest.raises(ConfigError, match="Did you mean .nuclei."):
        plate.read(plate.fields[0], ["nucleii"])
    with pytest.raises(ImageError, match="not an HCS"):
        plates.Plate(plate.path + "/A/1/0")


def test_stored_statistics_equal_whole_field_normalization(tmp_path):
    plate = platetools.simulate(tmp_path / "P.zarr", wells=4, fields=2, size=64, progress=False)
    for f in plate.fields[:3]:
        full = plate.read(f, ["brightfield"])
        for method in ("percentile", "zscore", "minmax"):
            np.testing.assert_allclose(sketch_stats(plate.sketch(f, "brightfield", 0), method),
                                       image_stats(full, method)[0], rtol=1e-5)


def test_fixed_statistics_of_the_same_pixels_agree_as_folder_and_as_plate(tmp_path):
    """One rule: the same training fields give the same dataset-level statistics from files or from a plate."""
    plate = platetools.simulate(tmp_path / "P.zarr", wells=4, fields=2, size=64, progress=False)
    for channel in ("brightfield", "nuclei"):
        folder = dataset_stats([plate.read(f, [channel]) for f in plate.fields])[0]
        from_plate = pooled_stats([plate.sketch(f, channel, 0) for f in plate.fields])
        np.testing.assert_allclose(from_plate, folder, rtol=0, atol=1e-5 * max(1.0, abs(folder[1])))
        # and the pooled rule means what it says: close to the percentiles of all pixels pooled
        pixels = np.concatenate([plate.read(f, [channel]).ravel() for f in plate.fields])
        lo, hi = np.percentile(pixels, (1.0, 99.8))
        assert abs(folder[0] - lo) < 0.05 * (hi - lo) and abs(folder[0] + folder[1] - hi) < 0.05 * (hi - lo)


def test_convert_a_tiff_folder_into_a_plate(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "tiffs"
    src.mkdir()
    for well in ("B03", "C12"):
        for s in range(2):
            for ch in ("w1", "w2"):
                tifffile.imwrite(src / f"exp_{well}_s{s}_{ch}.tif", (rng.random((40, 48)) * 4000).astype(np.uint16))
    pattern = r"exp_(?P<well>[A-H]\d+)_(?P<key>s\d)_(?P<channel>w\d)"
    with pytest.raises(ConfigError, match=".zarr"):
        platetools.convert(src, pattern, tmp_path / "out")
    plate = platetools.convert(src, pattern, tmp_path / "P.zarr", channels=["w2", "w1"], progress=False)
    assert plate.wells == ["B/3", "C/12"] and len(plate.fields) == 4
    f = plate.fields[0]
    assert plate.channels(f) == ["w2", "w1"] and plate.shape(f) == (1, 2, 1, 40, 48)
    assert plate.array(f).dtype == np.uint16  # the source dtype is kept
    np.testing.assert_array_equal(plate.read(f, ["w1"])[0], tifffile.imread(src / "exp_B03_s0_w1.tif"))
    assert plate.attrs(f)["source"] == "B03_s0" and "stats" in plate.attrs(f)
    result = subprocess.run([sys.executable, "-m", "labelling", "convert", str(src), "--pattern", pattern, "--out",
                             str(tmp_path / "Q.zarr")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert plates.is_plate(tmp_path / "Q.zarr")


def test_plate_data_reads_lazily_and_splits_by_well(plate_run):
    from labelling.data.platedata import PlateDataModule, PlateField

    path, _ = plate_run
    dm = PlateDataModule(str(path), inputs=["brightfield"], targets=["nuclei", "er"], crop=32, batch_size=4,
                         crops_per_epoch=8, val_fraction=0.2, test_fraction=0.2)
    dm.setup("fit")
    wells = {s: {im.extra["well"] for im in dm.splits[s]} for s in dm.splits}
    assert all(wells[s] for s in wells) and not (wells["train"] & wells["test"]) and not (wells["train"] & wells["val"])
    assert all(isinstance(im, PlateField) for s in dm.splits.values() for im in s)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (4, 1, 32, 32) and batch["target"].shape == (4, 2, 32, 32)
    # fixed normalization: training fields only, and a validation crop is the field's region normalized
    im = dm.splits["val"][0]
    x, y = im.region(slice(0, 32), slice(32, 64))
    np.testing.assert_allclose(x, im.input[:, 0:32, 32:64], rtol=1e-6)
    np.testing.assert_allclose(im.raw_target(), dm.opened.read(im.field, ["nuclei", "er"]))
    train_means = [dm.opened.sketch(f.field, "nuclei")["mean"][0] for f in dm.splits["train"]]
    assert dm.null_level()[0] == pytest.approx(np.mean(train_means), rel=1e-6)
    # balanced targets from the stored sketches: the same numbers as the rule on the whole field
    from labelling.data.normalization import balanced_floor, balanced_stats, image_stats

    dm = PlateDataModule(str(path), inputs=["brightfield"], targets=["nuclei", "er"], crop=32, batch_size=4,
                         crops_per_epoch=8, val_fraction=0.2, test_fraction=0.2, normalize="fixed",
                         target_normalize="balanced")
    dm.setup("fit")
    fields = {s: [dm.opened.read(im.field, ["nuclei", "er"]) for im in dm.splits[s]] for s in dm.splits}
    floor = balanced_floor([image_stats(y, "zscore")[:, 1] for y in fields["train"]])
    for split, images in dm.splits.items():
        for im, y in zip(images, fields[split]):
            np.testing.assert_allclose(im.target_stats, balanced_stats(image_stats(y, "zscore"), floor), rtol=1e-4)
    with pytest.raises(ConfigError, match="not supported for plates"):
        PlateDataModule(str(path), target_transform="rolling_ball")
    with pytest.raises(ConfigError, match="flatfield is not supported for plates"):
        PlateDataModule(str(path), flatfield=True)
    with pytest.raises(ConfigError, match="planes"):
        PlateDataModule(str(path), planes=[0, 1])


def test_plate_round_trip_simulate_preprocess_train_predict(tmp_path):
    """The issue's commands: simulate --plate, preprocess, train on the plate, predict it; channels in place."""
    def cli(*args):
        result = subprocess.run([sys.executable, "-m", "labelling", *map(str, args)], capture_output=True, text=True,
                                cwd=ROOT)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    path = tmp_path / "P.zarr"
    cli("simulate", "--plate", path, "--wells", 4, "--fields", 2, "--size", 96)
    cli("preprocess", path)
    cli("train", "nuclei_mse", "data.name=plate", f"data.path={path}", "trainer.max_epochs=1",
        "data.crops_per_epoch=64", "logger.wandb=false", "callbacks=[]", f"run_dir={tmp_path / 'runs'}")
    run = tmp_path / "runs" / "nuclei_mse"
    assert "predicted 8 field(s)" in cli("predict", run, path)
    plate = plates.Plate(path)
    for f in plate.fields:
        assert plate.channels(f)[-1] == "nuclei_predicted" and plate.shape(f) == (1, 9, 1, 96, 96)
        entry = plate.attrs(f)["predictions"]["nuclei_predicted"]
        assert entry["complete"] and entry["normalize"] == "fixed" and entry["denormalize"]["scale"] > 0
    task, _ = load_task(run)
    f = plate.fields[5]  # the plate channel is what the single-image prediction path gives
    expected = predict.predict(task, plate.read(f, ["brightfield"]))
    # another process may pick other conv kernels (thread count): agree to 1e-4 of the output's range
    np.testing.assert_allclose(plate.read(f, ["nuclei_predicted"]), expected, rtol=0, atol=1e-4 * np.ptp(expected))
    assert "8 already finished" in cli("predict", run, path)
    summary = cli("evaluate", run, "--plate", path)
    assert '"plate/fields": 8.0' in summary and '"plate/wells": 4.0' in summary
    assert (tmp_path / "P_evaluation" / "report.md").exists()


def test_a_plate_field_streamed_from_storage_equals_the_image_path(plate_run, tmp_path):
    """One path: a field predicted band by band from the plate (statistics from its stored sketch) gives what
    predict() gives for the same pixels read as one image."""
    from labelling.inference.load import load

    source, run = plate_run
    model = load(run)
    plate = plates.Plate(source)
    field = plate.fields[0]
    names, planes, _ = platepredict.input_layout(model, plate, field)
    expected = predict.predict(model, plate.read(field, names, planes), tile=32)
    got, bands = np.full_like(expected, np.nan), []

    def write(top, bottom, rows):
        got[:, top:bottom] = rows
        bands.append(bottom - top)

    assert predict.predict(model, platepredict.FieldSource(plate, field, names, planes), tile=32, write=write) is None
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4 * np.abs(expected).max())
    assert len(bands) > 1 and sum(bands) == expected.shape[1]  # streamed: several bands, every row once


def test_killed_plate_prediction_resumes_without_redoing_finished_fields(plate_run, tmp_path, monkeypatch):
    source, run = plate_run
    path = copy_plate(source, tmp_path / "P.zarr")
    real = platepredict.predict_field
    calls, crashed = [], []

    def crash_on_fifth(*args, **kw):
        calls.append(args[2].path)
        if len(calls) == 5 and not crashed:
            crashed.append(True)
            raise RuntimeError("killed")  # a crash mid-plate
        return real(*args, **kw)

    monkeypatch.setattr(platepredict, "predict_field", crash_on_fifth)
    with pytest.raises(RuntimeError, match="killed"):
        platepredict.predict_plate(run, path, accelerator="cpu", progress=False)
    plate = plates.Plate(path)
    finished = [f.path for f in plate.fields if plate.attrs(f).get("predictions", {}).get("nuclei_predicted")]
    assert finished == calls[:4]
    calls.clear()
    result = platepredict.predict_plate(run, path, accelerator="cpu", progress=False)
    assert result["predicted"] == len(plate.fields) - 4 and sorted(calls) == sorted(
        f.path for f in plate.fields if f.path not in finished)
    assert all(plate.attrs(f)["predictions"]["nuclei_predicted"]["writes"] == 1 for f in plate.fields)


def test_two_process_cpu_ddp_predicts_each_field_exactly_once(plate_run, tmp_path):
    source, run = plate_run
    out = tmp_path / "out.zarr"
    code = ("from labelling.inference.plates import predict_plate\n"
            "if __name__ == '__main__':\n"
            f"    r = predict_plate({str(run)!r}, {str(source)!r}, out={str(out)!r}, wells=['A1', 'A2', 'A3', 'A4'],"
            " devices=2, accelerator='cpu', progress=False)\n"
            "    print('PREDICTED', r['predicted'])\n")
    script = tmp_path / "ddp.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PREDICTED 8" in result.stdout
    plate = plates.Plate(out)
    assert len(plate.fields) == 8 and plate.channels(plate.fields[0]) == ["nuclei_predicted"]
    entries = [plate.attrs(f)["predictions"]["nuclei_predicted"] for f in plate.fields]
    assert [e["writes"] for e in entries] == [1] * 8  # each field written by exactly one process, once
    assert sorted({e["rank"] for e in entries}) == [0, 1]  # and both processes took their share
    task, _ = load_task(run)
    f = plate.fields[3]
    expected = predict.predict(task, plates.Plate(source).read(f, ["brightfield"]))
    np.testing.assert_allclose(plate.read(f, ["nuclei_predicted"]), expected, rtol=0, atol=1e-4 * np.ptp(expected))


def test_plate_prediction_refuses_integer_plates_in_place_and_evaluation_needs_predictions(plate_run, tmp_path):
    _, run = plate_run
    rng = np.random.default_rng(0)
    with plates.PlateWriter(tmp_path / "U.zarr", ["brightfield", "nuclei"]) as writer:
        writer.write("A", "1", 0, (rng.random((2, 64, 64)) * 1000).astype(np.uint16))
    platetools.preprocess(tmp_path / "U.zarr", progress=False)
    with pytest.raises(ImageError, match="--out"):
        platepredict.predict_plate(run, tmp_path / "U.zarr", accelerator="cpu", progress=False)
    with pytest.raises(ConfigError, match="labelling predict"):
        plateeval.evaluate_plate(run, tmp_path / "U.zarr", progress=False)
    with pytest.raises(ConfigError, match="--channels"):
        platepredict.predict_plate(run, tmp_path / "U.zarr", channels=["dapi"], accelerator="cpu", progress=False)
    result = platepredict.predict_plate(run, tmp_path / "U.zarr", out=tmp_path / "V.zarr", accelerator="cpu",
                                        progress=False)
    assert result["predicted"] == 1 and plates.Plate(tmp_path / "V.zarr").shape(plates.Plate(tmp_path / "V.zarr").fields[0]) == (1, 1, 1, 64, 64)


def test_app_reads_a_plate_field_like_predict(plate_run):
    from labelling.app import logic

    path, run = plate_run
    task = load(run)
    fields = logic.plate_fields(path)
    image, real = logic.read_plate_field(task, path, fields[2])
    plate = plates.Plate(path)
    assert image.shape == (96, 96) and real.shape == (1, 96, 96)
    np.testing.assert_array_equal(image, plate.read(plate.fields[2], ["brightfield"])[0])
    with pytest.raises(logic.UploadError, match="no field"):
        logic.read_plate_field(task, path, "H/12/0")
    with pytest.raises(logic.UploadError, match="not an HCS"):
        logic.plate_fields(str(path) + "/A/1")


def test_a_plate_behind_an_fsspec_url_is_read_like_a_folder(tmp_path):
    """s3:// plates go through zarr's fsspec store; the in-memory filesystem exercises the same path offline."""
    import os

    import fsspec

    local = platetools.simulate(tmp_path / "P.zarr", wells=2, fields=1, size=64, progress=False)
    fs = fsspec.filesystem("memory")
    for folder, _, files in os.walk(local.path):
        for name in files:
            full = os.path.join(folder, name)
            fs.pipe(f"/url_test/P.zarr/{os.path.relpath(full, local.path)}", Path(full).read_bytes())
    remote = plates.Plate("memory://url_test/P.zarr")
    assert [f.path for f in remote.fields] == [f.path for f in local.fields]
    np.testing.assert_array_equal(remote.read(remote.fields[1], ["nuclei"], rows=slice(3, 40)),
                                  local.read(local.fields[1], ["nuclei"], rows=slice(3, 40)))
    assert remote.sketch(remote.fields[0], "brightfield") == local.sketch(local.fields[0], "brightfield")


def test_a_z_range_of_a_plate_becomes_input_channels(tmp_path):
    """2.5D from a plate: data.planes picks input planes; the target comes from the middle plane."""
    from labelling.data.platedata import PlateDataModule

    path = platetools.simulate(tmp_path / "Z.zarr", wells=4, fields=1, size=64, planes=5, progress=False).path
    dm = PlateDataModule(path, planes="1:4", crop=32, batch_size=2, crops_per_epoch=4, normalize="zscore")
    dm.setup("fit")
    assert dm.planes == [1, 2, 3] and dm.target_plane == 2 and dm.in_channels == 3
    assert dm.raw_input_names == ["brightfield_z1", "brightfield_z2", "brightfield_z3"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (2, 3, 32, 32) and batch["target"].shape == (2, 1, 32, 32)
    im = dm.splits["train"][0]
    raw = dm.opened.array(im.field)
    np.testing.assert_array_equal(im.raw_input()[0], raw[0, 0, 1])  # plane 1 of the brightfield stack
    np.testing.assert_array_equal(im.raw_target()[0], raw[0, 1, 2])  # nuclei at the middle plane
    assert not np.array_equal(im.raw_input()[0], im.raw_input()[1])  # defocus differs between planes
