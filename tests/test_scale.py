"""Reliability and scale: kill/resume, DDP on CPU, many sweep workers on one study, heartbeat retry."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["logger.wandb=false", "trainer.enable_progress_bar=false", "logger.panels=0", "callbacks=[]",
         "data.n_wells=4", "data.fields_per_well=2", "data.field_size=96", "data.crop=32", "net.width=8",
         "net.depth=2", "trainer.accelerator=cpu"]


def cli(*args, **kw):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "labelling", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def wait_for(pred, timeout=120, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def ckpt_step(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["global_step"]
    except Exception:  # being written
        return -1


def test_killed_run_resumes_from_last_checkpoint_without_lost_progress(tmp_path):
    run = tmp_path / "killed"
    args = ["train", "nuclei_mse", "--run-dir", str(run), *QUIET, "trainer.max_epochs=3", "checkpoint_every=4",
            "data.crops_per_epoch=256", "data.batch_size=8", "test=false"]
    proc = cli(*args)
    last = run / "checkpoints" / "last.ckpt"
    wait_for(lambda: last.exists() and ckpt_step(last) >= 40 or proc.poll() is not None, what="mid-run checkpoint")
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ckpt_step(last)
    assert 40 <= killed_at < 96  # killed in the second or third epoch, before the end
    out, _ = cli(*args).communicate(timeout=300)
    assert "resuming from" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 96  # 3 epochs x 32 steps: nothing redone, nothing lost
    assert len(list((run / "csv").glob("version_*/metrics.csv"))) == 2  # first run's log kept


def test_ddp_two_processes_on_cpu_match_one_process(tmp_path):
    base = ["train", "nuclei_mse", *QUIET, "trainer.max_epochs=6", "data.crops_per_epoch=512", "test=false",
            "data.batch_size=8", "checkpoint_every=0"]
    one = cli(*base, "--run-dir", str(tmp_path / "one"))
    out1, _ = one.communicate(timeout=600)
    two = cli(*base, "--run-dir", str(tmp_path / "two"), "trainer.devices=2", "trainer.strategy=ddp")
    out2, _ = two.communicate(timeout=600)
    assert one.returncode == 0, out1[-2000:]
    assert two.returncode == 0, out2[-2000:]
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    # each rank sees half the crops per epoch: half the optimizer steps at twice the effective batch
    assert m2["global_step"] == m1["global_step"] / 2
    assert abs(m2["val/pcc"] - m1["val/pcc"]) < 0.15, (m1["val/pcc"], m2["val/pcc"])
    assert m2["val/pcc"] > 0.2


def _sweep_file(tmp_path, n_trials):
    import yaml

    spec = {"experiment": "golgi_asym", "n_trials": n_trials, "heartbeat": 2,
            "overrides": QUIET + ["trainer.max_epochs=2", "data.crops_per_epoch=64", "test=false"],
            "space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.skipif(not os.environ.get("LABELLING_TEST_PG_URL"), reason="set LABELLING_TEST_PG_URL (.ci/run starts PostgreSQL)")
def test_many_workers_share_one_postgres_study(tmp_path):
    import optuna
    import sqlalchemy

    server = os.environ["LABELLING_TEST_PG_URL"]
    db = f"labelling_{os.getpid()}_{int(time.time())}"
    with sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT").connect() as con:
        con.execute(sqlalchemy.text(f"CREATE DATABASE {db}"))  # empty: the workers race to create the schema
    url = server.rsplit("/", 1)[0] + f"/{db}"
    name = "pg-study"
    sweep = _sweep_file(tmp_path, 4)
    workers = [cli("sweep", str(sweep), "--storage", url, "--study-name", name, "--run-root", str(tmp_path / "r"))
               for _ in range(2)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), [o[-3000:] for w, o in zip(workers, outs) if w.returncode]
    study = optuna.load_study(study_name=name, storage=url)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    # 4 wanted; a worker that was mid-trial when the 4th finished may add one more
    assert 4 <= len(done) <= 5 and len({t.number for t in done}) == len(done)
    assert len({t.user_attrs["run_dir"] for t in done}) == len(done)
    assert all("running" in o or "nothing to run" in o for o in outs)


def test_killed_sweep_worker_trial_is_retried_and_resumed(tmp_path):
    import optuna

    sweep = _sweep_file(tmp_path, 2)
    root = tmp_path / "r"
    spec = __import__("yaml").safe_load(sweep.read_text())
    spec["overrides"] = [o for o in spec["overrides"] if not o.startswith("trainer.max_epochs")] + [
        "trainer.max_epochs=6", "checkpoint_every=2"]
    sweep.write_text(__import__("yaml").safe_dump(spec))
    proc = cli("sweep", str(sweep), "--run-root", str(root))
    last = root / "golgi_asym" / "trial_000" / "checkpoints" / "last.ckpt"
    wait_for(lambda: last.exists() and ckpt_step(last) >= 4 or proc.poll() is not None, what="trial checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(5)  # > 2 x heartbeat: the dead trial is now stale
    out, _ = cli("sweep", str(sweep), "--run-root", str(root)).communicate(timeout=600)
    study = optuna.load_study(study_name="golgi_asym", storage=f"sqlite:///{root}/golgi_asym/study.db")
    states = [t.state.name for t in study.trials]
    assert states[0] == "FAIL" and states.count("COMPLETE") == 2, (states, out[-2000:])
    retry = study.trials[1]
    assert retry.system_attrs.get("failed_trial") == 0 and retry.params == study.trials[0].params
    assert "resuming from" in out and str(root / "golgi_asym" / "trial_000") in retry.user_attrs["run_dir"]
