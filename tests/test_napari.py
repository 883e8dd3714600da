"""The napari plugin: a valid npe2 manifest, readers for our plates and prediction OME-TIFFs, and the predict
widget's function giving exactly what `labelling predict` gives (napari itself is not needed to test these)."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from labelling.napari import plugin

MANIFEST = Path(plugin.__file__).with_name("napari.yaml")


def test_the_manifest_is_a_valid_npe2_manifest_whose_commands_resolve():
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == "labelling"
    for command in manifest.contributions.commands:
        module, attr = command.python_name.split(":")
        assert callable(getattr(__import__(module, fromlist=[attr]), attr)), command.python_name
    assert manifest.contributions.readers[0].accepts_directories
    import tomllib

    entry = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["entry-points"]
    assert entry["napari.manifest"]["labelling"] == "labelling.napari:napari.yaml"


def test_readers_open_our_plates_and_predictions(tmp_path):
    from labelling.data import platetools
    from labelling.data.readers import write_ome_tiff

    platetools.simulate(tmp_path / "P.zarr", wells=2, fields=1, size=32, progress=False)
    reader = plugin.get_reader(str(tmp_path / "P.zarr"))
    layers = reader(str(tmp_path / "P.zarr"))
    names = [meta["name"] for _, meta, _ in layers]
    assert "brightfield" in names and "nuclei" in names and layers[0][0].shape == (2, 32, 32)
    y = np.random.default_rng(0).random((2, 16, 24)).astype(np.float32)
    write_ome_tiff(tmp_path / "p.ome.tif", y, ["nuclei", "er"], pixel_size=(0.5, 0.5))
    layers = plugin.get_reader(str(tmp_path / "p.ome.tif"))(str(tmp_path / "p.ome.tif"))
    assert [m["name"] for _, m, _ in layers] == ["nuclei", "er"] and layers[1][1]["scale"] == pytest.approx((0.5, 0.5))
    np.testing.assert_array_equal(layers[1][0], y[1])
    assert plugin.get_reader(str(tmp_path / "other.png")) is None


def test_the_predict_widget_gives_what_labelling_predict_gives(tmp_path):
    from labelling.inference import predict
    from labelling.inference.load import load
    from labelling.runs.train import fit
    from tests.conftest import TINY

    fit("nuclei_mse", TINY + ["trainer.max_epochs=1", "callbacks=[]", "test=false"], run_dir=tmp_path / "run")
    image = np.random.default_rng(1).gamma(2, 300, (48, 40)).astype(np.float32)
    layer = SimpleNamespace(data=image, scale=(1.0, 0.5, 0.5), name="bf")
    out = plugin.predict_widget(layer, tmp_path / "run", tile=32)
    assert [meta["name"] for _, meta, _ in out] == ["nuclei (predicted)"] and out[0][1]["scale"] == (0.5, 0.5)
    np.testing.assert_array_equal(out[0][0], predict.predict(load(tmp_path / "run"), image, tile=32)[0])
