"""Dashboards: `labelling dashboard` (optuna-dashboard on a sweep's study, loopback only) and the W&B tables
the run-end analyses log (offline)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from labelling.cli import main
from labelling.runs.dashboard import dashboard_storage

ROOT = Path(__file__).resolve().parents[1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode()


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses listening on `port`, from /proc/net/tcp (no traffic sent)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


@pytest.fixture
def study_root(tmp_path):
    optuna = pytest.importorskip("optuna")
    pytest.importorskip("optuna_dashboard")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    (tmp_path / "runs" / "tiny_exp").mkdir(parents=True)
    study = optuna.create_study(study_name="tiny_exp", storage=f"sqlite:///{tmp_path}/runs/tiny_exp/study.db",
                                direction="maximize")
    study.optimize(lambda trial: -(trial.suggest_float("optim.lr", 1e-4, 1e-1, log=True) - 0.01) ** 2, n_trials=3)
    return tmp_path / "runs"


def test_dashboard_serves_the_study_on_loopback_only(study_root):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LABELLING_STORAGE", None)
    proc = subprocess.Popen([sys.executable, "-m", "labelling", "dashboard", "tiny_exp", "--run-root", str(study_root),
                             "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, body = time.monotonic() + 60, None
        while time.monotonic() < deadline and body is None:
            if proc.poll() is not None:
                pytest.fail(f"dashboard exited {proc.returncode}: {proc.stdout.read().decode()[-2000:]}")
            try:
                status, body = _get(f"http://127.0.0.1:{port}/api/studies")
            except OSError:
                time.sleep(0.3)
        assert body is not None, "the dashboard did not answer within 60 s"
        studies = json.loads(body)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["tiny_exp"] and status == 200
        status, page = _get(f"http://127.0.0.1:{port}/dashboard")
        assert status == 200 and "<html" in page.lower()
        if Path("/proc/net/tcp").exists():
            assert _listening_addresses(port) == {"127.0.0.1"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_dashboard_storage_names_the_sweep_database_or_says_how_to_make_one(study_root, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LABELLING_STORAGE", raising=False)
    assert dashboard_storage("tiny_exp", None, str(study_root)) == f"sqlite:///{study_root}/tiny_exp/study.db"
    assert dashboard_storage("tiny_exp", "sqlite:///other.db", str(study_root)) == "sqlite:///other.db"
    monkeypatch.setenv("LABELLING_STORAGE", "sqlite:///from_env.db")
    assert dashboard_storage("tiny_exp", None, str(study_root)) == "sqlite:///from_env.db"
    monkeypatch.delenv("LABELLING_STORAGE")
    assert main(["dashboard", "golgi_asym", "--run-root", str(study_root)]) == 2
    err = capsys.readouterr().err
    assert "make sweep EXP=golgi_asym" in err and "tiny_exp" in err
    assert main(["dashboard", "tiny_exp", "--run-root", str(study_root), "--port", "0"]) == 2
    assert "--port must be in 1..65535" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", "tiny_exp", "--run-root", str(study_root), "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is taken" in capsys.readouterr().err


# --------------------------------------------------------------------------- W&B tables (offline)

def test_thumbnails_are_8_bit_and_not_black():
    from labelling.callbacks.analyses import thumbnail

    image = np.random.default_rng(0).uniform(500, 3000, (1, 300, 200)).astype(np.float32)  # camera counts
    thumb = thumbnail(image)
    assert thumb.dtype == np.uint8 and max(thumb.shape) == 128 and thumb.shape == (128, 85)
    assert thumb.min() == 0 and thumb.max() == 255 and 60 < thumb.mean() < 200


def test_downstream_and_drift_tables_are_logged_to_wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger
    from PIL import Image

    from labelling import config
    from labelling.build import build
    from labelling.callbacks.analyses import DownstreamEvaluation, DriftAnalysis
    from labelling.runs.train import attach_deployment
    from tests.conftest import TINY

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))  # where the tables' artifacts are staged
    cfg = config.load("nuclei_mse", TINY + ["data.field_size=96", "data.n_wells=8", "data.fields_per_well=3"])
    dm, task = build(cfg)
    attach_deployment(dm, task)  # untrained weights; the deployment state as after training
    logger = WandbLogger(project="labelling-test", save_dir=str(tmp_path), offline=True)
    logged = {}
    log = logger.experiment.log
    monkeypatch.setattr(logger.experiment, "log", lambda payload, *a, **k: (logged.update(payload), log(payload, *a, **k)))
    trainer = SimpleNamespace(is_global_zero=True, datamodule=dm, default_root_dir=str(tmp_path), loggers=[logger],
                              global_step=0)
    # the drift study itself is tested in test_drift; here only what its callback logs (its real table shapes)
    fnr = pd.DataFrame({"corruption": ["clean", "blur"], "severity": [0, 3], "window": [10, 10],
                        "detection_rate": [0.05, 0.8], "false_negative_rate": [np.nan, 0.2],
                        "false_positive_rate": [0.05, np.nan]})
    online = pd.DataFrame({"corruption": ["blur"], "severity": [3], "window": [5], "ert": [32], "n_windows": [200],
                           "auc": [0.9], "balanced_accuracy": [0.8], "tpr": [0.7], "fpr": [0.1]})
    runs = pd.DataFrame({"name": ["clean (unseen)", "blur+3"], "window": [5, 5], "ert": [128, 128],
                         "mean_run_length": [120.0, 9.0], "censored": [0.1, 0.0]})
    monkeypatch.setattr("labelling.studies.drift_study", lambda *a, **k: {
        "drift_fnr": fnr, "drift_online_auc": online, "drift_run_length": runs})
    try:
        DownstreamEvaluation(max_images=3).on_test_end(trainer, task.eval())
        DriftAnalysis(max_images=3).on_test_end(trainer, task)
        run_dir = Path(logger.experiment.dir)
    finally:
        wandb.finish()
    keys = ("test/downstream/per_image", "test/downstream/agreement", "test/drift/drift_fnr",
            "test/drift/drift_online_auc", "test/drift/drift_run_length")
    for key in keys:
        assert isinstance(logged.get(key), wandb.Table), (key, sorted(logged))
        assert list((run_dir / "media" / "table").glob(f"{key}_*.table.json")), key  # written to the offline run
    per_image = logged["test/downstream/per_image"]
    assert {"image", "input", "real", "predicted"} <= set(per_image.columns) and len(per_image.data) == 3
    assert "false_negative_rate" in logged["test/drift/drift_fnr"].columns
    for column in ("input", "real", "predicted"):
        cell = per_image.data[0][per_image.columns.index(column)]
        assert isinstance(cell, wandb.Image)
        pixels = np.asarray(Image.open(cell._path))
        assert pixels.dtype == np.uint8 and pixels.std() > 5, column  # 8-bit, neither black nor flat
