"""Plates that cannot lose data or mix models: convert keeps every field and value, damage is an error naming the
array and chunk, predictions know the model and plate they came from."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

from labelling.cli import main
from labelling.data import plate as plates
from labelling.data import platetools
from labelling.errors import ConfigError, ImageError


def _folder(root: Path, wells: dict[str, int], dtype_bf=np.uint8, dtype_dapi=np.uint16) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for well, n in wells.items():
        for f in range(n):
            tifffile.imwrite(root / f"{well}_s{f}_bf.tif", rng.integers(0, 255, (40, 48)).astype(dtype_bf))
            tifffile.imwrite(root / f"{well}_s{f}_dapi.tif", rng.integers(0, 4000, (40, 48)).astype(dtype_dapi))
    return root


PATTERN = r"(?P<well>[A-Z]\d+)_(?P<key>s\d)_(?P<channel>\w+)\.tif"


def test_convert_keeps_a1_and_a01_as_one_well_with_both_fields(tmp_path):
    folder = _folder(tmp_path / "in", {"A1": 1, "A01": 1, "B2": 1})
    plate = platetools.convert(folder, PATTERN, tmp_path / "P.zarr", progress=False)
    assert sorted(f.path for f in plate.fields) == ["A/1/0", "A/1/1", "B/2/0"]  # nothing overwritten
    sources = sorted(plate.attrs(f)["well_name"] for f in plate.fields if f.well == "A/1")
    assert sources == ["A01", "A1"]
    assert len({tuple(f.path for f in plate.fields)}) == 1 and len(plate.fields) == len(set(plate.fields))


def test_convert_refuses_two_wells_that_would_land_in_one_place(tmp_path):
    folder = _folder(tmp_path / "in", {"A2": 1})
    for name in ("foo_s0_bf.tif", "foo_s0_dapi.tif"):  # 'foo' is not a well name: it would be stored as A/2
        tifffile.imwrite(folder / name, np.ones((40, 48), np.uint8))
    pattern = r"(?P<well>[A-Za-z]+\d*)_(?P<key>s\d)_(?P<channel>\w+)\.tif"
    with pytest.raises(ConfigError, match="'A2' and 'foo' would both be stored as well A/2"):
        platetools.convert(folder, pattern, tmp_path / "P.zarr", progress=False)
    assert not (tmp_path / "P.zarr").exists()  # nothing half-written is left


def test_convert_keeps_a_uint16_target_beside_a_uint8_input(tmp_path):
    folder = _folder(tmp_path / "in", {"A1": 1})
    plate = platetools.convert(folder, PATTERN, tmp_path / "P.zarr", progress=False)
    field = plate.fields[0]
    dapi = plate.read(field, ["dapi"])[0]
    np.testing.assert_array_equal(dapi, tifffile.imread(folder / "A1_s0_dapi.tif"))
    assert dapi.max() > 255 and plate.array(field).dtype == np.uint16
    np.testing.assert_array_equal(plate.read(field, ["bf"])[0], tifffile.imread(folder / "A1_s0_bf.tif"))


def test_an_existing_plate_is_never_replaced_unless_asked_and_then_only_when_complete(tmp_path):
    path = tmp_path / "P.zarr"
    platetools.simulate(path, wells=1, fields=1, size=32, progress=False)
    before = plates.Plate(path).read(plates.Plate(path).fields[0], ["nuclei"])
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        platetools.simulate(path, seed=1, wells=1, fields=1, size=32, progress=False)
    np.testing.assert_array_equal(plates.Plate(path).read(plates.Plate(path).fields[0], ["nuclei"]), before)
    platetools.simulate(path, seed=1, wells=1, fields=1, size=32, progress=False, overwrite=True)
    assert not np.array_equal(plates.Plate(path).read(plates.Plate(path).fields[0], ["nuclei"]), before)
    assert [p.name for p in tmp_path.iterdir()] == ["P.zarr"]  # no staging folder left behind


def test_an_interrupted_plate_write_leaves_nothing_that_opens(tmp_path, monkeypatch):
    path = tmp_path / "P.zarr"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plates.PlateWriter, "close", crash)
    with pytest.raises(KeyboardInterrupt):
        platetools.simulate(path, wells=1, fields=1, size=32, progress=False)
    assert not path.exists() and not plates.is_plate(path)


def test_damaged_plates_are_errors_that_name_the_array_and_chunk(tmp_path):
    path = tmp_path / "P.zarr"
    plate = platetools.simulate(path, wells=2, fields=1, size=64, chunk=32, progress=False)
    field = plate.fields[0]
    chunk = Path(path) / field.path / "0" / "0.0.0.1.1"  # brightfield, plane 0, rows 32..63, columns 32..63
    assert chunk.is_file()
    chunk.unlink()  # a deleted chunk: zarr alone would read zeros
    with pytest.raises(ImageError, match=r"chunk 0\.0\.0\.1\.1 of channel brightfield is missing"):
        plates.Plate(path).read(field, ["brightfield"])
    assert plates.Plate(path).read(field, ["brightfield"], rows=slice(0, 32)).shape == (1, 32, 64)  # before the gap
    other = plate.fields[1]
    target = Path(path) / other.path / "0" / "0.0.0.0.0"
    target.write_bytes(target.read_bytes()[:10])  # a truncated chunk
    with pytest.raises(ImageError, match=rf"{other.path}/0 rows 0:64: cannot read .*damaged"):
        plates.Plate(path).read(other, ["brightfield"])
    import shutil

    shutil.rmtree(Path(path) / other.path)
    with pytest.raises(ImageError, match=f"field {other.path} but its folder is missing"):
        plates.Plate(path).read(other, ["brightfield"])


def test_plate_evaluation_refuses_predictions_of_another_model_or_plate(tmp_path, capfd):
    from labelling.runs.train import fit
    from tests.conftest import TINY

    path = tmp_path / "P.zarr"
    platetools.simulate(path, wells=4, fields=1, size=64, progress=False)
    runs = []
    for seed in (0, 1):
        runs.append(tmp_path / f"run{seed}")
        fit("nuclei_mse", TINY + ["trainer.max_epochs=1", "callbacks=[]", "test=false", f"seed={seed}"], run_dir=runs[-1])
    assert main(["predict", str(runs[0]), str(path), "--out", str(tmp_path / "pred.zarr")]) == 0
    capfd.readouterr()
    code = main(["evaluate", str(runs[1]), "--plate", str(path), "--predictions", str(tmp_path / "pred.zarr")])
    assert code == 2 and "not by this model" in capfd.readouterr().err
    assert main(["evaluate", str(runs[0]), "--plate", str(path), "--predictions", str(tmp_path / "pred.zarr")]) == 0
    assert main(["evaluate", str(runs[1]), "--plate", str(path), "--predictions", str(tmp_path / "pred.zarr"),
                 "--accept-other-predictions"]) == 0  # named explicitly: scored as they are
    # the same layout, another plate: its predictions are not this plate's
    other = tmp_path / "Q.zarr"
    platetools.simulate(other, seed=3, wells=4, fields=1, size=64, progress=False)
    capfd.readouterr()
    code = main(["evaluate", str(runs[0]), "--plate", str(other), "--predictions", str(tmp_path / "pred.zarr")])
    assert code == 2 and "predicted from plate" in capfd.readouterr().err
    record = plates.Plate(tmp_path / "pred.zarr").attrs(plates.Plate(tmp_path / "pred.zarr").fields[0])
    entry = next(iter(record["predictions"].values()))
    assert len(entry["model_sha256"]) == 64 and entry["source_plate"] == str(path)


def test_a_model_trained_on_a_one_plane_plate_predicts_a_plain_2d_tiff(tmp_path, capfd):
    """Issue 24: such a run refused a 2D TIFF in `predict` (the app accepted it): one reader for both now."""
    from labelling.runs.train import fit
    from tests.conftest import TINY

    path = tmp_path / "P.zarr"
    platetools.simulate(path, wells=4, fields=1, size=64, progress=False)
    tiny = [t for t in TINY if not t.startswith(("data.n_wells", "data.fields", "data.field_size"))]
    fit("nuclei_mse", tiny + ["data.name=plate", f"data.path={path}", "trainer.max_epochs=1", "callbacks=[]",
                              "test=false"], run_dir=tmp_path / "run")
    tifffile.imwrite(tmp_path / "field.tif", np.random.default_rng(0).gamma(2, 300, (64, 64)).astype(np.float32))
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "field.tif"), "--out", str(tmp_path / "p")]) == 0
    assert len(list((tmp_path / "p").glob("*.ome.tif"))) == 1


def test_preprocess_also_writes_the_statistics_viscy_reads(tmp_path):
    """VisCy's HCSDataModule reads ``normalization[channel]["dataset_statistics"|"fov_statistics"]`` (mean, std,
    median, iqr) from each position's attributes; our preprocess writes that layout from its own sketches."""
    plate = platetools.simulate(tmp_path / "P.zarr", wells=2, fields=2, size=64, progress=False)
    pixels = np.concatenate([plate.read(f, ["nuclei"]).ravel() for f in plate.fields]).astype(np.float64)
    field = plate.fields[0]
    meta = dict(plate.group(field).attrs)["normalization"]["nuclei"]
    assert set(meta) == {"dataset_statistics", "fov_statistics"}
    own = plate.read(field, ["nuclei"]).ravel().astype(np.float64)
    fov = meta["fov_statistics"]
    assert fov["mean"] == pytest.approx(own.mean(), rel=1e-5) and fov["std"] == pytest.approx(own.std(), rel=1e-4)
    assert fov["median"] == pytest.approx(np.median(own), abs=1e-3 * own.std())
    q25, q75 = np.percentile(own, (25, 75))
    assert fov["iqr"] == pytest.approx(q75 - q25, rel=1e-3, abs=1e-3 * own.std())
    data = meta["dataset_statistics"]
    assert data["mean"] == pytest.approx(pixels.mean(), rel=1e-5) and data["std"] == pytest.approx(pixels.std(), rel=1e-4)
    assert dict(plate.root.attrs)["normalization"]["nuclei"]["dataset_statistics"] == data
    # preprocessing again replaces labelling's own; statistics another tool wrote are kept as they are
    platetools.preprocess(tmp_path / "P.zarr", progress=False)
    import zarr

    root = zarr.open_group(str(tmp_path / "P.zarr"), mode="r+")
    foreign = {"nuclei": {"dataset_statistics": {"mean": 1.0, "std": 2.0, "median": 3.0, "iqr": 4.0}}}
    root.attrs["normalization"] = foreign
    attrs = dict(root.attrs[plates.KEY])
    attrs.pop("norm_meta")
    root.attrs[plates.KEY] = attrs
    with pytest.warns(UserWarning, match="keeping the `normalization` statistics another tool wrote"):
        platetools.preprocess(tmp_path / "P.zarr", progress=False)
    assert dict(zarr.open_group(str(tmp_path / "P.zarr"), mode="r").attrs)["normalization"] == foreign


def test_two_writers_of_one_new_plate_never_replace_each_other(tmp_path):
    """The second writer to finish finds the first's plate in place and fails with a clear message."""
    path = tmp_path / "new.zarr"
    first = plates.PlateWriter(path, ["a"])
    second = plates.PlateWriter(path, ["a"])
    first.write("A", "1", 0, np.ones((1, 8, 8), np.float32))
    second.write("A", "1", 0, np.zeros((1, 8, 8), np.float32))
    first.close()
    with pytest.raises(ConfigError, match="appeared while this plate was being written"):
        second.close()
    plate = plates.Plate(path)
    assert plate.read(plate.fields[0], ["a"]).max() == 1.0  # the first writer's plate, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.zarr"]


def test_a_converted_plate_keeps_the_source_pixel_size_and_a_run_on_it_records_it(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    rng = np.random.default_rng(0)
    for well in ("A1", "A2", "B1", "B2"):
        for channel in ("bf", "dapi"):
            tifffile.imwrite(root / f"{well}_s0_{channel}.ome.tif", rng.random((48, 48)).astype(np.float32), ome=True,
                             metadata={"axes": "YX", "PhysicalSizeX": 0.325, "PhysicalSizeY": 0.325})
    plate = platetools.convert(root, r"(?P<well>[A-Z]\d+)_(?P<key>s\d)_(?P<channel>\w+)\.ome", tmp_path / "P.zarr",
                               progress=False)
    assert plate.pixel_size(plate.fields[0]) == pytest.approx((0.325, 0.325))
    from labelling.data.platedata import PlateDataModule

    dm = PlateDataModule(str(tmp_path / "P.zarr"), inputs=["bf"], targets=["dapi"], crop=16, batch_size=2,
                         val_fraction=0.25, test_fraction=0.25)
    assert dm.pixel_size == pytest.approx((0.325, 0.325))
