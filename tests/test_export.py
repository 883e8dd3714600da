"""Export: ONNX and TorchScript equal the torch net, predict() runs on them, the BioImage Model Zoo package
passes bioimageio.core's model test, the drift detector travels with the weights, and the CLI and the app
take an exported model like a run."""

import json

import numpy as np
import pytest
import tifffile
import torch

from labelling import registry
from labelling.cli import main
from labelling.data.normalization import normalize
from labelling.data.simulate import simulate_field
from labelling.export import ExportError, bioimage, deployed, driftref, export_run
from labelling.inference import predict
from labelling.inference.load import load, load_task
from labelling.inference.model import Model
from labelling.runs.train import fit

pytest.importorskip("onnxruntime")

# 8 wells x 3 fields of 96 px: 6 validation fields of nine 32 px crops, enough for a calibrated detector
RUN = ["trainer.max_epochs=1", "data.field_size=96", "data.n_wells=8", "data.fields_per_well=3", "callbacks=[]",
       "test=false", "data.crops_per_epoch=16"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("runs") / "nuclei_mse"
    fit("nuclei_mse", TINY + RUN, run_dir=root)
    return root


@pytest.fixture(scope="module")
def onnx_export(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "onnx"
    return export_run(run, "onnx", out), out


def field(size=(200, 168), seed=7):
    bf = simulate_field([3, seed, 0], size=max(size)).brightfield
    return bf[: size[0], : size[1]].astype(np.float32)


def test_onnx_matches_torch_on_random_input_and_through_the_prediction_path(run, onnx_export):
    summary, out = onnx_export
    checks = summary["checks"]
    print(f"\nONNX vs torch on {checks['input_shape']}: max abs diff {checks['max_abs_diff']:.2e} "
          f"(embedding {checks['embedding_max_abs_diff']:.2e}); torch {checks['torch_ms']:.1f} ms, "
          f"onnxruntime {checks['exported_ms']:.1f} ms")
    assert checks["max_abs_diff"] < 1e-4 and checks["embedding_max_abs_diff"] < 1e-4
    assert {"model.onnx", "weights.pt", "deployment.json", "drift.npz", "config.yaml", "metrics.json",
            "manifest.json"} <= set(summary["files"])
    state = json.loads((out / "deployment.json").read_text())
    assert state["model"] == "model.onnx" and state["deployment"]["targets"] == ["nuclei"]

    torch_task, _ = load_task(run)
    onnx_task = load(out)
    assert isinstance(onnx_task, Model) and onnx_task.activated and onnx_task.config.name == "nuclei_mse"
    assert onnx_task.deployment == torch_task.deployment  # the same typed state, from the checkpoint or the export
    # dynamic batch, height and width (multiples of the net's spatial multiple)
    x = torch.randn(3, 1, 52, 84)
    with torch.no_grad():
        y, emb = torch_task.net(x, return_embedding=True)
    assert np.abs(onnx_task.tiles(x).numpy() - y.numpy()).max() < 1e-4
    assert np.abs(onnx_task.embed(x).numpy() - emb.numpy()).max() < 1e-4
    # the whole image, tiled with overlaps, normalized and de-normalized by predict() itself
    raw = field()
    want = predict.predict(torch_task, raw, tile=64)
    got = predict.predict(onnx_task, raw, tile=64)
    assert got.shape == want.shape == (1, 200, 168)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


def test_torchscript_export_matches_torch(run, tmp_path):
    summary = export_run(run, "torchscript", tmp_path / "ts", drift=False)
    assert summary["checks"]["max_abs_diff"] < 1e-5
    assert "drift.npz" not in summary["files"]
    assert {"model.pt", "weights.pt", "manifest.json"} <= set(summary["files"])
    task = load(tmp_path / "ts" / "model.pt")  # rebuilt from config + weights.pt; model.pt is never loaded
    torch_task, _ = load_task(run)
    raw = field((96, 128))
    assert np.abs(predict.predict(task, raw, tile=64) - predict.predict(torch_task, raw, tile=64)).max() < 1e-3


def test_exported_drift_detector_equals_the_in_memory_one(run, onnx_export):
    _, out = onnx_export
    task, cfg = load_task(run)
    dm = registry.build("data", cfg.data.name, **{"seed": cfg.seed, **cfg.data.args})
    dm.setup()
    found = driftref.drift_reference(task, dm.splits["train"], dm.splits["val"], 32)
    memory, loaded = found["detector"], driftref.load_detector(out)
    assert memory is not None and loaded.window == memory.window >= 2 and loaded.ert == memory.ert
    np.testing.assert_array_equal(loaded.thresholds, memory.thresholds)
    np.testing.assert_array_equal(loaded.ref, memory.ref)
    assert loaded.sigma == memory.sigma and loaded.k_rr == memory.k_rr
    # the same statistic and verdict at every step of a stream, clean then shifted
    stream = np.concatenate([found["online"][::-1], found["online"][:20] + 3.0 * found["online"].std(0)])
    for x in stream:
        (s1, d1), (s2, d2) = memory.update(x), loaded.update(x)
        assert s1 == pytest.approx(s2, rel=1e-9, abs=1e-12) and d1 == d2
    assert d1  # the shifted tail is detected
    ref = driftref.load_image_reference(out)
    np.testing.assert_allclose(ref["null"], found["image"]["null"], rtol=1e-9)
    assert ref["sigma"] == pytest.approx(found["image"]["sigma"])
    data = np.load(out / "drift.npz")
    np.testing.assert_allclose(data["embedding_mean"], found["online"].mean(0), rtol=1e-6)


def test_bioimageio_package_passes_bioimageio_core_model_test(run, tmp_path):
    pytest.importorskip("bioimageio.core")
    summary = export_run(run, "bioimageio", tmp_path / "bmz")
    assert summary["bioimageio_test"]["status"] == "passed", summary["bioimageio_test"]
    assert summary["bioimageio_test"]["details"] == [], summary["bioimageio_test"]
    files = summary["files"]
    print(f"\nbioimageio package: {summary['size_bytes'] / 1024:.0f} KiB in the folder, "
          f"zip {files[next(n for n in files if n.endswith('.zip'))] / 1024:.0f} KiB")
    assert {"rdf.yaml", "weights.onnx", "weights_torchscript.pt", "test_input.npy", "test_output.npy",
            "config.yaml", "metrics.json", "README.md", "cover.png"} <= set(files)
    assert summary["size_bytes"] < 2 * 2**20
    import yaml

    rdf = yaml.safe_load((tmp_path / "bmz" / "rdf.yaml").read_text())
    pre = [step["id"] for step in rdf["inputs"][0]["preprocessing"]]
    assert pre == ["ensure_dtype", "scale_range", "ensure_dtype"]  # the run normalizes per image (percentiles)
    assert rdf["outputs"][0]["postprocessing"][0]["id"] == "scale_linear" and rdf["cite"][0]["doi"]
    # the package's test output is what our prediction path gives for its test input
    x = np.load(tmp_path / "bmz" / "test_input.npy")[0]
    task, _ = load_task(run)
    np.testing.assert_allclose(np.load(tmp_path / "bmz" / "test_output.npy")[0],
                               predict.predict(task, x, tile=max(x.shape[1:])), rtol=1e-5, atol=1e-4)


def test_bioimageio_steps_reproduce_our_normalization():
    stats = [[200.0, 400.0], [10.0, 5.0]]
    from labelling.deployment import Deployment

    state = {"deployment": Deployment(normalize="fixed", denormalize="stats", input_stats=stats, in_channels=2,
                                      raw_channels=2, inputs=["a", "b"], target_stats=[[100.0, 50.0]]).to_dict()}
    (_, linear, _) = bioimage.preprocessing(state)
    kwargs = linear["kwargs"]
    x = np.random.default_rng(0).uniform(0, 4000, (2, 8, 8)).astype(np.float32)
    gain, offset = np.asarray(kwargs["gain"])[:, None, None], np.asarray(kwargs["offset"])[:, None, None]
    np.testing.assert_allclose(x * gain + offset, normalize(x, np.asarray(stats, np.float32)), rtol=1e-5, atol=1e-5)
    post = bioimage.postprocessing(state)[0]["kwargs"]
    assert (post["gain"], post["offset"]) == (50.0, 100.0)
    dep = state["deployment"]
    assert bioimage.postprocessing({"deployment": {**dep, "activation": "sigmoid"}})[0]["id"] == "ensure_dtype"
    zscore = bioimage.preprocessing({"deployment": {**dep, "normalize": "zscore"}})
    assert zscore[1]["id"] == "zero_mean_unit_variance"
    with pytest.raises(ValueError, match="no bioimage.io equivalent"):
        bioimage.preprocessing({"deployment": {**dep, "normalize": "log"}})
    with pytest.raises(ValueError, match="flat-field"):  # a package would predict otherwise than labelling
        bioimage.preprocessing({"deployment": {**dep, "flatfield": True}})


def test_a_flat_field_run_exports_to_onnx_with_its_correction_and_is_refused_by_bioimageio(tmp_path, capsys):
    from tests.conftest import TINY

    run = tmp_path / "run"
    fit("nuclei_mse", TINY + RUN + ["data.flatfield=true"], run_dir=run)
    out = tmp_path / "onnx"
    export_run(run, "onnx", out)
    bf = field((160, 128))
    exported = load(out)
    assert exported.deployment.flatfield
    np.testing.assert_allclose(predict.predict(exported, bf), predict.predict(load(run), bf), rtol=1e-3, atol=1e-2)
    # without the correction the export would predict something else: the correction is really applied
    import dataclasses

    plain = dataclasses.replace(exported, deployment=exported.deployment.model_copy(update={"flatfield": False}))
    assert np.abs(predict.predict(plain, bf) - predict.predict(exported, bf)).max() > 1e-2
    assert main(["export", str(run), "--format", "bioimageio", "--out", str(tmp_path / "bmz")]) == 2
    assert "flat-field" in capsys.readouterr().err and not (tmp_path / "bmz").exists()


def test_cli_exports_and_predicts_with_the_onnx_model(run, tmp_path, capsys):
    out = tmp_path / "d1"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out), "--no-drift"]) == 0
    assert json.loads(capsys.readouterr().out)["checks"]["max_abs_diff"] < 1e-4
    raw = field((120, 100))
    tifffile.imwrite(tmp_path / "img.tif", raw)
    task, _ = load_task(run)
    want = predict.predict(task, raw, tile=64)
    for model in (out, out / "model.onnx"):
        dest = tmp_path / f"pred_{model.name}"
        assert main(["predict", str(model), str(tmp_path / "img.tif"), "--out", str(dest), "--tile", "64"]) == 0
        got = tifffile.imread(next(dest.glob("*.ome.tif")))
        assert np.abs(got.reshape(want.shape) - want).max() < 1e-3


def test_export_refuses_bad_input_with_clear_messages(run, tmp_path, capsys):
    with pytest.raises(ExportError, match="unknown export format 'onx'. Did you mean 'onnx'"):
        export_run(run, "onx", tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "full")]) == 2
    assert "is not empty" in capsys.readouterr().err and (tmp_path / "full" / "keep.txt").exists()
    (tmp_path / "lonely.onnx").write_bytes(b"not a model")
    with pytest.raises(ExportError, match="no manifest.json"):
        load(tmp_path / "lonely.onnx")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "deployment.json").write_text("{not json")
    assert main(["predict", str(broken), str(tmp_path / "lonely.onnx"), "--out", str(tmp_path / "p")]) == 2
    assert "incomplete" in capsys.readouterr().err
    with pytest.raises(ExportError, match="no drift reference"):
        driftref.load_detector(tmp_path)


def test_app_uses_an_exported_model_and_its_drift_reference(run, onnx_export):
    from labelling.app import logic

    _, out = onnx_export
    assert out in logic.find_runs(out.parent)
    task, cfg = logic.load(out)
    bf = simulate_field([0, 99, 1], size=96).brightfield
    result = logic.analyse(task, cfg, out, bf)
    torch_task, _ = load_task(run)
    assert np.abs(result["prediction"] - predict.predict(torch_task, bf)).max() < 1e-3
    assert result["drift"]["checked"] and result["drift"]["n_reference_fields"] >= 4
    checker = np.indices((96, 96)).sum(0) % 2 * 4000.0 + 1000  # nothing like cells
    assert logic.analyse(task, cfg, out, checker.astype(np.float32))["drift"]["drift"]
    assert not (out / "drift_reference.npz").exists()  # read from the export, nothing computed or cached


@pytest.mark.parametrize("name", registry.names("net"))
def test_every_net_exports_to_onnx_or_is_refused_by_name(name, tmp_path):
    from labelling import config
    from labelling.build import build_task

    raw = config.load_raw("nuclei_mse")
    raw["net"], raw["data"]["crop"] = {"name": name, "width": 4}, 32
    cfg = config.validate(raw)
    from tests.conftest import deployed_task

    task = deployed_task(build_task(cfg, 1, 1).net)
    try:
        deployed.check_exportable(task)
    except ExportError as err:
        assert type(task.net).__name__ in str(err) and "cannot be exported" in str(err)
        return
    deployed.export_onnx(task, tmp_path / "model.onnx")
    assert deployed.compare(task, deployed.onnx_runner(tmp_path / "model.onnx"))["max_abs_diff"] < 1e-4


# ------------------------------------------------------------------ exports that cannot run code or mix models
def test_a_scripted_torchscript_that_writes_a_file_runs_no_code_through_predict(run, tmp_path):
    """A TorchScript archive is code: one swapped in for model.pt is refused by the manifest, and even with a
    forged manifest labelling never loads it (it rebuilds the net from the config and weights.pt)."""
    from labelling.export.deployed import write_manifest

    out = tmp_path / "ts"
    export_run(run, "torchscript", out, drift=False)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"\0" * 64)

    # an archive that maps a file of the user's into memory and fills it, scripted from a real source file
    source = tmp_path / "evil_module.py"
    source.write_text("import torch\n\n\nclass Evil(torch.nn.Module):\n    def forward(self, x):\n"
                      f"        mapped = torch.from_file({str(victim)!r}, shared=True, size=64, dtype=torch.uint8)\n"
                      "        mapped.fill_(7)\n        return x + 0 * mapped[0].float(), x.mean((2, 3))\n")
    import importlib.util

    spec = importlib.util.spec_from_file_location("evil_module", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    evil = torch.jit.script(module.Evil())
    evil.save(str(out / "model.pt"))
    check = torch.jit.load(str(out / "model.pt"))  # the archive really does write the file when run (a test of the test)
    check(torch.zeros(1, 1, 8, 8))
    assert victim.read_bytes() == b"\7" * 64
    victim.write_bytes(b"\0" * 64)
    tifffile.imwrite(tmp_path / "img.tif", field((64, 64)))
    assert main(["predict", str(out), str(tmp_path / "img.tif"), "--out", str(tmp_path / "p1")]) == 2
    assert victim.read_bytes() == b"\0" * 64
    write_manifest(out, None)  # a forged manifest that lists the evil file: still never loaded
    assert main(["predict", str(out), str(tmp_path / "img.tif"), "--out", str(tmp_path / "p2")]) == 0
    assert victim.read_bytes() == b"\0" * 64


def test_an_export_over_another_run_never_mixes_a_net_with_foreign_statistics(run, tmp_path):
    """--overwrite replaces the whole folder: no file of the old export survives beside the new one."""
    other = tmp_path / "other"
    fit("nuclei_mse", __import__("tests.conftest").conftest.TINY + RUN + ["seed=5", "data.normalize=fixed"],
        run_dir=other)
    out = tmp_path / "x"
    export_run(other, "onnx", out, drift=False)
    export_run(run, "torchscript", out, drift=False, overwrite=True)
    assert not (out / "model.onnx").exists()
    assert json.loads((out / "deployment.json").read_text())["source"]["run"] == str(run.resolve())
    assert load(out).deployment == load_task(run)[0].deployment


@pytest.mark.parametrize("change", ["tamper", "outside", "stats", "missing"])
def test_a_changed_or_incomplete_export_is_refused(run, onnx_export, tmp_path, change):
    import shutil

    from labelling.export.deployed import write_manifest

    _, source = onnx_export
    out = tmp_path / "copy"
    shutil.copytree(source, out)
    state = json.loads((out / "deployment.json").read_text())
    if change == "tamper":  # edited statistics without a new manifest
        state["deployment"]["target_stats"] = [[0.0, 9.0]]
        (out / "deployment.json").write_text(json.dumps(state))
        match = "does not match the manifest"
    elif change == "outside":  # the model points out of the folder (and the manifest is forged to match)
        state["model"] = "../elsewhere.onnx"
        (out / "deployment.json").write_text(json.dumps(state))
        write_manifest(out, None)
        match = "outside its folder"
    elif change == "stats":  # a scale that is not positive, with a consistent manifest
        state["deployment"]["target_stats"] = [[0.0, -1.0]]
        (out / "deployment.json").write_text(json.dumps(state))
        write_manifest(out, None)
        match = "positive scales"
    else:  # an export killed before its manifest
        (out / "manifest.json").unlink()
        match = "incomplete"
    with pytest.raises(ExportError, match=match):
        load(out)


def test_evaluate_scores_an_export_like_its_run(run, onnx_export, tmp_path):
    from labelling.runs.evaluate import evaluate_run

    _, out = onnx_export
    args = {"scales": (), "split": "val", "max_images": 3}
    from_run = evaluate_run(run, out=tmp_path / "run", **args)
    from_export = evaluate_run(out, out=tmp_path / "export", **args)
    assert from_export.keys() == from_run.keys()
    for key in ("downstream/pixel_pearson", "downstream/count_ccc"):
        assert from_export[key] == pytest.approx(from_run[key], abs=1e-3)


@pytest.mark.parametrize("experiment,epochs,extra", [
    ("nuclei_mse", 1, []), ("nuclei_pearson", 3, []),
    # the real-data recipe's net and fixed normalization: MONAI in the architecture's environment, a halo
    ("nuclei_pearson", 1, ["net={name: monai_unet, width: 4, depth: 2}", "data.normalize=fixed"])])
def test_bioimageio_packages_of_ordinary_runs_pass_without_warnings_and_say_what_they_are(experiment, epochs, extra,
                                                                                           tmp_path):
    """MSE and Pearson runs, short and longer, our UNet and MONAI's: every package passes bioimageio.core's test of
    every weights format (pytorch_state_dict, TorchScript, ONNX) with no warning, names its maintainer, version,
    code and training data, declares a halo exactly where the normalization allows one, and the folder loads in
    labelling like an export and predicts what the run predicts."""
    pytest.importorskip("bioimageio.core")
    import yaml

    from tests.conftest import TINY

    run = tmp_path / "run"
    fit(experiment, TINY + RUN[1:] + [f"trainer.max_epochs={epochs}"] + extra, run_dir=run)
    summary = export_run(run, "bioimageio", tmp_path / "bmz", github_user="octocat",
                         git_repo="https://github.com/octocat/labelling")
    assert summary["bioimageio_test"] == {"status": "passed", "details": [], "warnings": []}, summary["bioimageio_test"]
    rdf = yaml.safe_load((tmp_path / "bmz" / "rdf.yaml").read_text())
    assert rdf["maintainers"][0]["github_user"] == "octocat" and rdf["authors"][0]["github_user"] == "octocat"
    assert rdf["version"] and rdf["git_repo"].endswith("/labelling")
    assert set(rdf["weights"]) == {"pytorch_state_dict", "torchscript", "onnx"}
    assert rdf["weights"]["torchscript"]["parent"] == rdf["weights"]["onnx"]["parent"] == "pytorch_state_dict"
    assert rdf["training_data"]["type"] == "dataset" and "imulated" in rdf["training_data"]["description"]
    halos = [axis.get("halo") for axis in rdf["outputs"][0]["axes"] if axis["type"] == "space"]
    assert halos == ([32, 32] if "data.normalize=fixed" in extra else [None, None])
    readme = (tmp_path / "bmz" / "README.md").read_text()
    assert "## Training data" in readme and "Simulated cells" in readme and "## Intended use and limits" in readme
    image = field((72, 80))
    np.testing.assert_allclose(predict.predict(load(tmp_path / "bmz"), image, tile=64),
                               predict.predict(load(run), image, tile=64), rtol=1e-5, atol=1e-4)
