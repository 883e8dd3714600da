"""Export: ONNX and TorchScript equal the torch net, predict() runs on them, the BioImage Model Zoo package
passes bioimageio.core's model test, the drift detector travels with the weights, and the CLI and the app
take an exported model like a run."""

import json

import numpy as np
import pytest
import tifffile
import torch

from labelling import registry
from labelling.build import load_task
from labelling.cli import main
from labelling.data.normalization import normalize
from labelling.data.simulate import simulate_field
from labelling.export import ExportError, bioimage, deployed, driftref, export_run
from labelling.inference import predict
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
    assert {"model.onnx", "deployment.json", "drift.npz", "config.yaml", "metrics.json"} <= set(summary["files"])
    state = json.loads((out / "deployment.json").read_text())
    assert state["model"] == "model.onnx" and state["deploy"]["targets"] == ["nuclei"]

    torch_task, _ = load_task(run)
    onnx_task, cfg = deployed.load_model(out)
    assert isinstance(onnx_task, deployed.ExportedTask) and cfg.name == "nuclei_mse"
    # dynamic batch, height and width, including sides the net must pad (not multiples of 2**depth)
    x = torch.randn(3, 1, 52, 84)
    with torch.no_grad():
        y, emb = torch_task.net(x, return_embedding=True)
    assert np.abs(onnx_task.predict(x).numpy() - y.numpy()).max() < 1e-4
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
    task, _ = deployed.load_model(tmp_path / "ts" / "model.pt")
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
    assert summary["bioimageio_test"] == {"status": "passed", "details": []}, summary["bioimageio_test"]
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
    state = {"deploy": {"normalize": "fixed", "denormalize": "stats"}, "input_stats": stats,
             "target_stats": [[100.0, 50.0]], "activation": None}
    (_, linear, _) = bioimage.preprocessing(state)
    kwargs = linear["kwargs"]
    x = np.random.default_rng(0).uniform(0, 4000, (2, 8, 8)).astype(np.float32)
    gain, offset = np.asarray(kwargs["gain"])[:, None, None], np.asarray(kwargs["offset"])[:, None, None]
    np.testing.assert_allclose(x * gain + offset, normalize(x, np.asarray(stats, np.float32)), rtol=1e-5, atol=1e-5)
    post = bioimage.postprocessing(state)[0]["kwargs"]
    assert (post["gain"], post["offset"]) == (50.0, 100.0)
    assert bioimage.postprocessing({**state, "activation": "sigmoid"})[0]["id"] == "ensure_dtype"
    zscore = bioimage.preprocessing({**state, "deploy": {"normalize": "zscore"}})
    assert zscore[1]["id"] == "zero_mean_unit_variance"
    with pytest.raises(ValueError, match="no bioimage.io equivalent"):
        bioimage.preprocessing({**state, "deploy": {"normalize": "log"}})


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
    with pytest.raises(ExportError, match="not an exported model"):
        deployed.load_model(tmp_path / "lonely.onnx")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "deployment.json").write_text("{not json")
    assert main(["predict", str(broken), str(tmp_path / "lonely.onnx"), "--out", str(tmp_path / "p")]) == 2
    assert "unreadable deployment state" in capsys.readouterr().err
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
    task = build_task(cfg, 1, 1).eval()
    try:
        deployed.check_exportable(task)
    except ExportError as err:
        assert type(task.net).__name__ in str(err) and "cannot be exported" in str(err)
        return
    state = deployed.deployment_state(task, cfg)
    deployed.export_onnx(task, state, tmp_path / "model.onnx")
    assert deployed.compare(task, state, tmp_path / "model.onnx")["max_abs_diff"] < 1e-4
