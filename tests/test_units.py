"""Physical units end to end: pixel sizes read from the files, kept with the run, written to predictions, and a
warning (or a resize, --match-pixel-size) when an image's pixels differ from training's."""

import numpy as np
import pytest
import tifffile

from labelling.cli import main
from labelling.data.physical import pixel_size
from labelling.inference.load import load
from labelling.runs.train import fit
from tests.conftest import TINY


def _ome(path, image, size):
    tifffile.imwrite(path, image, ome=True, metadata={"axes": "YX", "PhysicalSizeX": size, "PhysicalSizeY": size,
                                                      "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})


def test_pixel_sizes_are_read_from_ome_imagej_and_not_invented(tmp_path):
    image = np.zeros((16, 16), np.float32)
    _ome(tmp_path / "a.ome.tif", image, 0.65)
    tifffile.imwrite(tmp_path / "b.tif", image, imagej=True, resolution=(2.0, 2.0), metadata={"unit": "um"})
    tifffile.imwrite(tmp_path / "c.tif", image)
    tifffile.imwrite(tmp_path / "d.ome.tif", image, ome=True, metadata={"axes": "YX", "PhysicalSizeX": 650,
                                                                       "PhysicalSizeY": 650,
                                                                       "PhysicalSizeXUnit": "nm",
                                                                       "PhysicalSizeYUnit": "nm"})
    assert pixel_size(tmp_path / "a.ome.tif") == pytest.approx((0.65, 0.65))
    assert pixel_size(tmp_path / "b.tif") == pytest.approx((0.5, 0.5))
    assert pixel_size(tmp_path / "c.tif") is None
    assert pixel_size(tmp_path / "d.ome.tif") == pytest.approx((0.65, 0.65))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("units")
    rng = np.random.default_rng(0)
    for i in range(6):
        bf = rng.gamma(2, 300, (64, 64)).astype(np.float32)
        _ome(root / f"A{i % 3 + 1}_s{i}_bf.ome.tif", bf, 0.65)
        _ome(root / f"A{i % 3 + 1}_s{i}_dapi.ome.tif", (bf * 2).astype(np.float32), 0.65)
    tiny = [t for t in TINY if not t.startswith(("data.n_wells", "data.fields", "data.field_size"))]
    fit("nuclei_mse", tiny + ["data.name=folder", f"data.root={root}", "data.inputs=[bf]", "data.targets=[dapi]",
                              r"data.pattern=(?P<well>A\d)_(?P<key>s\d)_(?P<channel>\w+)\.ome", "data.split_by=field",
                              "trainer.max_epochs=1", "callbacks=[]", "test=false"], run_dir=root / "run")
    return root / "run"


def test_the_training_pixel_size_travels_with_the_run_and_predictions_carry_theirs(run, tmp_path, recwarn):
    assert load(run).deployment.pixel_size == pytest.approx((0.65, 0.65))
    _ome(tmp_path / "same.ome.tif", np.random.default_rng(1).gamma(2, 300, (64, 64)).astype(np.float32), 0.65)
    assert main(["predict", str(run), str(tmp_path / "same.ome.tif"), "--out", str(tmp_path / "p")]) == 0
    written = next((tmp_path / "p").glob("*.ome.tif"))
    assert pixel_size(written) == pytest.approx((0.65, 0.65))
    assert not [w for w in recwarn if "trained on" in str(w.message)]


def test_another_magnification_warns_or_is_matched(run, tmp_path):
    image = np.random.default_rng(2).gamma(2, 300, (64, 64)).astype(np.float32)
    _ome(tmp_path / "x2.ome.tif", image, 1.3)
    with pytest.warns(UserWarning, match="1.3 µm, the model was trained on 0.65 µm"):
        assert main(["predict", str(run), str(tmp_path / "x2.ome.tif"), "--out", str(tmp_path / "plain")]) == 0
    assert main(["predict", str(run), str(tmp_path / "x2.ome.tif"), "--out", str(tmp_path / "matched"),
                 "--match-pixel-size"]) == 0
    plain = tifffile.imread(next((tmp_path / "plain").glob("*.ome.tif")))
    matched_path = next((tmp_path / "matched").glob("*.ome.tif"))
    matched = tifffile.imread(matched_path)
    assert matched.shape == plain.shape == (64, 64) and not np.allclose(matched, plain)
    assert pixel_size(matched_path) == pytest.approx((1.3, 1.3))  # the output is in the input's geometry
    tifffile.imwrite(tmp_path / "unknown.tif", image)
    assert main(["predict", str(run), str(tmp_path / "unknown.tif"), "--out", str(tmp_path / "u"),
                 "--match-pixel-size"]) == 2


def test_the_bioimageio_package_states_the_pixel_size_on_its_axes(run, tmp_path):
    pytest.importorskip("bioimageio.core")
    import yaml

    from labelling.export import export_run

    summary = export_run(run, "bioimageio", tmp_path / "bmz")
    assert summary["bioimageio_test"]["status"] == "passed", summary["bioimageio_test"]
    rdf = yaml.safe_load((tmp_path / "bmz" / "rdf.yaml").read_text())
    for tensor in (rdf["inputs"][0], rdf["outputs"][0]):
        space = [a for a in tensor["axes"] if a["type"] == "space"]
        assert [(a["scale"], a["unit"]) for a in space] == [(pytest.approx(0.65), "micrometer")] * 2
    assert "Real images" in (tmp_path / "bmz" / "README.md").read_text()


def test_an_ngff_image_with_micrometer_axes_states_its_pixel_size(tmp_path):
    """OME-Zarr names units in words ("micrometer"): read by the same function as the plates' scale transforms."""
    from labelling.data.readers import write_ome_zarr

    write_ome_zarr(tmp_path / "img.zarr", np.zeros((1, 16, 16), np.float32))
    import zarr

    group = zarr.open_group(str(tmp_path / "img.zarr"), mode="r+")
    attrs = dict(group.attrs)
    multiscales = attrs.get("multiscales") or attrs["ome"]["multiscales"]
    for axis in multiscales[0]["axes"]:
        if axis["name"] in "yx":
            axis["unit"] = "micrometer"
    multiscales[0]["datasets"][0]["coordinateTransformations"] = [
        {"type": "scale", "scale": [1.0] * (len(multiscales[0]["axes"]) - 2) + [0.4, 0.3]}]
    group.attrs.update(attrs)
    assert pixel_size(tmp_path / "img.zarr") == pytest.approx((0.4, 0.3))
