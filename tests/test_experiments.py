"""Every experiment file runs for one batch; runs write their artifacts; resume and bad checkpoints."""

import json

import lightning
import numpy as np
import pytest
import torch
import yaml

from labelling import config
from labelling.inference.load import CheckpointError, check_checkpoint, load_task
from labelling.runs.train import fit


class WeightProbe(lightning.Callback):
    """The task's parameters at the start and at the end of fitting."""

    def on_fit_start(self, trainer, module):
        self.before = {k: v.detach().clone() for k, v in module.named_parameters()}

    def on_fit_end(self, trainer, module):
        self.after = {k: v.detach().clone() for k, v in module.named_parameters()}


@pytest.mark.parametrize("name", config.list_experiments())
def test_experiment_runs_one_batch(name, tiny, tmp_path):
    data = config.load_raw(name)["data"]
    if data["name"] == "folder":
        from labelling.data.organelles import resolve_root

        if not resolve_root(data["root"]).exists():
            pytest.skip(f"real data {data['root']} is absent")
    probe = WeightProbe()
    metrics = fit(name, tiny + ["trainer.fast_dev_run=1"], run_dir=tmp_path / name, callbacks=[probe])
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["val/pcc"])
    changed = [k for k, v in probe.before.items() if not torch.equal(v, probe.after[k])]
    assert changed, "one training step left every parameter unchanged"
    assert (tmp_path / name / "config.yaml").exists() and (tmp_path / name / "metrics.json").exists()


def test_run_folder_has_config_commit_metrics_panels_and_checkpoint(tiny, tmp_path):
    run = tmp_path / "run"
    metrics = fit("nuclei_mse", tiny + ["trainer.max_epochs=2", "trainer.limit_val_batches=2"], run_dir=run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["name"] == "nuclei" and saved["trainer"]["max_epochs"] == 2
    assert (run / "git.txt").read_text().strip()
    assert json.loads((run / "metrics.json").read_text())["best/val/pcc"] == pytest.approx(metrics["best/val/pcc"])
    assert "test/pcc" in metrics
    assert list((run / "panels").glob("*.png"))
    assert list((run / "csv").glob("version_*/metrics.csv"))
    task, cfg = load_task(run)
    assert cfg.data.name == "nuclei" and not task.training


def test_wandb_offline_run_is_written_and_self_contained(tiny, tmp_path, monkeypatch):
    """Everything W&B writes for a run - its tables' thumbnails included - lies in the run folder, so a copy of
    runs/ syncs completely; nothing goes to the home folder's W&B staging area."""
    import os

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for key in ("WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR", "WANDB_CACHE_DIR", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    tiny = [t for t in tiny if not t.startswith("logger.wandb")]
    fit("golgi_asym", tiny + ["trainer.max_epochs=1", "trainer.limit_val_batches=1", "logger.wandb=true",
                              "callbacks=[{name: downstream, max_images: 2}]"], run_dir=tmp_path / "wb")
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run folder"
    media = [p for p in (tmp_path / "wb" / "wandb").rglob("*") if p.suffix == ".png"]
    assert media, "the downstream table's thumbnails are not in the run folder"
    outside = [p for p in (tmp_path / "home").rglob("*") if p.is_file()] if (tmp_path / "home").exists() else []
    assert not [p for p in outside if "wandb" in str(p)], outside
    assert "WANDB_DATA_DIR" not in os.environ  # restored after the run


def test_resume_continues_from_last_checkpoint(tiny, tmp_path):
    run = tmp_path / "resume"
    first = fit("nuclei_mse", tiny + ["trainer.max_epochs=1", "test=false"], run_dir=run)
    assert (run / "checkpoints" / "last.ckpt").exists()
    second = fit("nuclei_mse", tiny + ["trainer.max_epochs=2", "test=false"], run_dir=run)
    # one more epoch of steps, not two: the first epoch was restored, not redone
    assert second["global_step"] == pytest.approx(2 * first["global_step"])


def test_corrupted_and_missing_checkpoints_give_clear_errors(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        check_checkpoint(tmp_path / "none.ckpt")
    run = tmp_path / "bad"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match="corrupted"):
        fit("nuclei_mse", tiny + ["trainer.max_epochs=1"], run_dir=run)


def test_rerun_with_another_config_is_refused_and_changes_nothing(tiny, tmp_path, capsys):
    from labelling.cli import main

    run = tmp_path / "done"
    first = fit("nuclei_mse", tiny + ["trainer.max_epochs=1"], run_dir=run)
    before = {p: p.read_bytes() for p in (run / "config.yaml", run / "metrics.json")}
    assert main(["train", "nuclei_mse", *tiny, "trainer.max_epochs=1", "optim.lr=0.5", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "resume=false" in err
    assert all(p.read_bytes() == b for p, b in before.items())  # nothing rewritten
    # the same config again: the finished run is reported, not redone or rewritten
    again = fit("nuclei_mse", tiny + ["trainer.max_epochs=1"], run_dir=run)
    assert again["global_step"] == first["global_step"]
    assert all(p.read_bytes() == b for p, b in before.items())
    # resume=false starts a fresh numbered folder next to it
    fresh = fit("nuclei_mse", tiny + ["trainer.max_epochs=1", "optim.lr=0.5", "resume=false"], run_dir=run)
    assert (tmp_path / "done-2" / "metrics.json").exists() and fresh["global_step"] == first["global_step"]
    assert yaml.safe_load((tmp_path / "done-2" / "config.yaml").read_text())["optim"]["lr"] == 0.5


def test_diverging_run_stops_with_a_message_and_nonzero_exit(tiny, tmp_path, capsys):
    from labelling.cli import main

    code = main(["train", "nuclei_mse", *tiny, "trainer.max_epochs=3", "optim.lr=1e6", "trainer.gradient_clip_val=null",
                 "--run-dir", str(tmp_path / "nan")])
    assert code != 0 and "optim.lr" in capsys.readouterr().err
    metrics = tmp_path / "nan" / "metrics.json"
    assert not metrics.exists() or json.loads(metrics.read_text())  # never half-written or NaN


def test_metrics_json_is_valid_json_with_non_finite_values(tmp_path):
    from labelling.runs.train import write_metrics

    write_metrics(tmp_path / "m.json", {"a": float("nan"), "b": float("-inf"), "c": 1.5})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": None, "b": None, "c": 1.5}


def test_cli_reports_config_errors(capsys):
    from labelling.cli import main

    assert main(["train", "golgi_asym", "optim.lrr=1"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert main(["show", "golgi_asym", "optim.lr=0.01"]) == 0
    assert "lr: 0.01" in capsys.readouterr().out


@pytest.mark.slow
def test_simulator_is_learnable_nuclei_pcc_above_0_7(tmp_path):
    m = fit("nuclei_mse", ["logger.wandb=false", "trainer.max_epochs=20", "trainer.enable_progress_bar=false"],
            run_dir=tmp_path / "learn")
    assert m["best/val/pcc"] > 0.7


def test_downstream_callback_evaluate_and_predict_commands(tiny, tmp_path):
    import tifffile

    from labelling.cli import main
    from labelling.runs.evaluate import evaluate_run

    run = tmp_path / "ds"
    tiny = [t for t in tiny if not t.startswith("data.n_wells") and not t.startswith("data.fields")]
    fit("nuclei_mse", tiny + ["data.n_wells=8", "data.fields_per_well=2", "trainer.max_epochs=1"],
                  run_dir=run)
    stored = json.loads((run / "metrics.json").read_text())
    for metric in ("count", "total_area", "total_intensity", "mean_intensity"):
        for stat in ("pearson", "spearman", "ccc", "bias", "mae"):
            assert f"test/downstream/{metric}_{stat}" in stored, (metric, stat)
            assert f"test/downstream/null/{metric}_{stat}" in stored, (metric, stat)
        assert stored[f"test/downstream/{metric}_ccc_lo"] <= stored[f"test/downstream/{metric}_ccc"]
    # the null predictor gives every image the same value: no association, whatever the images
    assert stored["test/downstream/null/mean_intensity_pearson"] == 0.0
    assert stored["test/downstream/n"] == 4 and "test/downstream/object_f1" in stored
    report = (run / "downstream" / "report.md").read_text()
    assert "Lin's CCC" in report and "null" in report and (run / "downstream" / "scatter_total_area.png").exists()
    summary = evaluate_run(run, scales=(0.7, 1.0))
    assert set(summary) >= {"downstream/pixel_pearson", "scaling/x0.7/pixel_pearson", "scaling/x1/pixel_pearson"}
    # evaluate and the run-end callback take the same path: the same numbers
    assert summary["downstream/count_ccc"] == pytest.approx(stored["test/downstream/count_ccc"])
    assert summary["downstream/pixel_pearson"] == pytest.approx(stored["test/downstream/pixel_pearson"], abs=1e-6)
    assert len(pd_read(run / "evaluate" / "scaling.csv")) == 2
    assert not (run / "wandb").exists()  # the run did not log to W&B, so evaluate does not either
    img = tmp_path / "bf.tif"
    tifffile.imwrite(img, np.random.default_rng(0).gamma(2, 300, (70, 90)).astype(np.float32))
    assert main(["predict", str(run), str(img), "--out", str(tmp_path / "pred"), "--tile", "32"]) == 0
    out = tifffile.imread(tmp_path / "pred" / "bf_nuclei.ome.tif")
    assert out.shape == (70, 90) and np.isfinite(out).all()


def pd_read(path):
    import pandas as pd

    return pd.read_csv(path)


def test_run_end_analyses_and_evaluate_all(tiny, tmp_path):
    from labelling.runs.evaluate import evaluate_run

    run = tmp_path / "robust"
    tiny = [t for t in tiny if not t.startswith("data.n_wells") and not t.startswith("data.fields")]
    cbs = ("callbacks=[{name: stability, max_images: 2}, {name: embeddings, max_images: 4, reducers: [pca], "
           "clusterers: [kmeans, dbscan]}, {name: drift, max_images: 4}]")
    metrics = fit("nuclei_robust", tiny + ["data.n_wells=16", "data.fields_per_well=2", "trainer.max_epochs=1", cbs],
                  run_dir=run)
    assert "test/stability/percentile/blur_+5_pcc" in metrics and "test/stability/fixed/contrast_-5_pcc" in metrics
    assert {"test/embeddings/f1_mean", "test/embeddings/f1_sd", "test/embeddings/chance_p95"} <= set(metrics)
    assert 0 <= metrics["test/drift/mean_auc"] <= 1
    for name in ("stability.csv", "stability.md", "stability_percentile.png", "stability_fixed.png",
                 "embeddings_f1.md", "embeddings.png", "drift_fnr.csv", "drift_online_auc.md", "drift_run_length.md"):
        assert (run / "analysis" / name).exists(), name
    stab = pd_read(run / "analysis" / "stability.csv")
    # per mode: clean + blur 1..5 + noise 1..5 + contrast and brightness -5..5 without 0
    assert len(stab) == 2 * (1 + 5 + 5 + 10 + 10)
    own = stab[stab["mode"] == "percentile"].set_index(["corruption", "severity"])
    fixed = stab[stab["mode"] == "fixed"].set_index(["corruption", "severity"])
    # per-image normalization cancels a brightness offset up to the camera's clipping; fixed does not
    assert own.loc[("brightness", 1), "input_rms_change"] < 0.1 < fixed.loc[("brightness", 1), "input_rms_change"]
    assert own.loc[("blur", 5), "input_rms_change"] > own.loc[("blur", 1), "input_rms_change"] > 0
    summary = evaluate_run(run, scales=(), stability=True, drift=True, max_images=4)
    assert "drift/mean_auc" in summary and (run / "evaluate" / "drift_run_length.md").exists()


def test_autoencoders_train_and_embed(tiny, tmp_path):
    from torch.nn import functional

    from labelling.build import build

    for name in ("ae_conv", "ae_vae"):
        run = tmp_path / name
        metrics = fit(name, tiny + ["trainer.max_epochs=2", "net.latent_dim=8"], run_dir=run)
        assert np.isfinite(metrics["val/loss"]) and metrics["best/val/loss"] <= metrics["val/loss"] + 1e-6
        assert (run / "panels" / "samples.png").exists() and (run / "panels" / "convergence.png").exists()
        task, cfg = load_task(run)
        torch.manual_seed(cfg.seed)
        dm, untrained = build(cfg)  # same architecture and initialisation, no training
        dm.setup("fit")
        x = next(iter(dm.val_dataloader()))["input"][:4]
        with torch.no_grad():
            trained_mse = functional.mse_loss(task.net(x), x).item()
            untrained_mse = functional.mse_loss(untrained.eval().net(x), x).item()
        assert trained_mse < untrained_mse, (name, trained_mse, untrained_mse)
        emb = task.embed(x)
        assert emb.shape == (4, 8) and torch.isfinite(emb).all()
        assert not torch.allclose(emb[0], emb[1]), "two different crops share an embedding"
    from labelling.runs.evaluate import evaluate_run

    summary = evaluate_run(tmp_path / "ae_vae", split="train", embeddings=True, max_images=3, log_wandb=False)
    assert 0 <= summary["embeddings/f1_mean"] <= 1 and "downstream/pixel_pearson" not in summary


def test_empty_test_split_is_an_error_naming_the_ways_out(tiny, tmp_path, capsys):
    from labelling.cli import main

    two = [t for t in tiny if not t.startswith(("data.n_wells", "data.fields"))] + ["data.n_wells=2",
                                                                                   "data.fields_per_well=1"]
    assert main(["train", "nuclei_mse", *two, "--run-dir", str(tmp_path / "two")]) == 2
    err = capsys.readouterr().err
    assert "no test fields" in err and "2 split group" in err and "test_groups" in err and "test=false" in err
    assert fit("nuclei_mse", two + ["test=false"], run_dir=tmp_path / "ok")["global_step"] > 0


def test_python_api_doc_example_runs(tmp_path, monkeypatch):
    """docs/python_api.md: its example is real code that trains with an extra callback."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "python_api.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "python_api.md", "exec"), scope)
    assert scope["timer"].seconds > 0 and np.isfinite(scope["metrics"]["val/pcc"])
    assert (tmp_path / "runs" / "api_example" / "metrics.json").exists()


def test_threads_setting_and_training_geometry_in_predict(tiny, tmp_path):
    import torch

    from labelling.data.normalization import rescale
    from labelling.inference import predict
    from labelling.runs.train import set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1
    finally:
        torch.set_num_threads(before)
    run = tmp_path / "geo"
    fit("nuclei_mse", tiny + ["trainer.max_epochs=1", "trainer.threads=1", "callbacks=[]", "test=false"], run_dir=run)
    assert torch.get_num_threads() == before  # fault: fit left the whole process on one thread
    task, _ = load_task(run)
    task.deployment.max_size = 32  # as if trained on fields binned to 32 px
    raw = np.random.default_rng(0).gamma(2, 300, (64, 64)).astype(np.float32)
    binned = predict.predict(task, raw)
    task.deployment.max_size = 0
    direct = predict.predict(task, raw.reshape(32, 2, 32, 2).mean((1, 3)))
    assert binned.shape == (1, 64, 64)  # back at the input's size
    # exactly: bin like training, predict at the binned size, resize the prediction back to the input's size
    assert np.allclose(binned, rescale(direct, 1.0, shape=(64, 64)), atol=1e-4)


def test_mixed_precision_runs_clip_gradients_with_an_unfused_optimizer(tiny, tmp_path):
    """bf16-mixed (the GPU profiles) with gradient clipping: Lightning's AMP plugin refuses fused optimizers."""
    metrics = fit("nuclei_mse", tiny + ["trainer.max_epochs=1", "trainer.precision=bf16-mixed", "callbacks=[]",
                                        "test=false", "trainer.gradient_clip_val=1.0"], run_dir=tmp_path / "bf16")
    import torch

    from labelling.tasks.stainer import fused_supported

    assert metrics["global_step"] > 0 and np.isfinite(metrics["train/loss_epoch"])
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert fused_supported(torch.optim.AdamW, params, "32-true")
    assert not fused_supported(torch.optim.AdamW, params, "bf16-mixed")


def test_panels_are_titled_with_the_channel_names():
    from labelling.reporting.images import panel_figure

    img = np.random.default_rng(0).random((2, 16, 16))
    fig = panel_figure(img[0], img, img, ["DAPI", "MAP2"], input_name="phase")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == ["phase", "real DAPI", "predicted DAPI"] and "real MAP2" in titles
