import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from labelling import config
from labelling.errors import redact
from labelling.runs.sweep import load_space, make_sampler, run_sweep, storage_url, suggest, write_summary
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
SECRET = "PASSWORD"


@pytest.fixture
def sweep_file(tmp_path, tiny):
    spec = {
        "experiment": "golgi_asym", "metric": "val/pcc", "direction": "maximize", "n_trials": 2,
        "overrides": [t for t in tiny if not t.startswith("logger.wandb")]
        + ["trainer.max_epochs=2", "trainer.limit_val_batches=1", "test=false", "logger.wandb=true"],
        "space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                  "loss.under_weight": {"type": "float", "low": 1.0, "high": 8.0},
                  "net.width": {"type": "categorical", "choices": [4, 8]}},
    }
    path = tmp_path / "tiny_sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_two_trial_sweep_resumes(sweep_file, tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    # W&B records the command line in every run's metadata: a password given there must not reach it
    monkeypatch.setattr(sys, "argv", ["labelling", "sweep", "x", "--storage", f"postgresql://u:{SECRET}@h/db"])
    study = run_sweep(sweep_file, n_trials=1, run_root=root)
    assert len(study.trials) == 1
    first = study.trials[0].params
    study = run_sweep(sweep_file, run_root=root)  # same command: resumes, runs only the missing trial
    assert len(study.trials) == 2 and study.trials[0].params == first
    # the console: one line per finished trial with its number, state, score, best so far and parameters
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("trial ")]
    assert [ln.split()[:3] for ln in lines] == [["trial", "0", "complete"], ["trial", "1", "complete"]], lines
    assert all("val/pcc=" in ln and "best=" in ln and "optim.lr=" in ln for ln in lines)
    assert f"(trial {study.best_trial.number})" in lines[-1]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    study = run_sweep(sweep_file, run_root=root)  # nothing left to do
    assert len(study.trials) == 2
    best = yaml.safe_load((root / "golgi_asym" / "best.yaml").read_text())
    assert best["value"] == pytest.approx(study.best_value)
    assert best["config"]["loss"]["under_weight"] == pytest.approx(study.best_params["loss.under_weight"])
    assert (root / "golgi_asym" / "study.db").exists() and (root / "golgi_asym" / "trials.csv").exists()
    assert (root / "golgi_asym" / "trial_001" / "metrics.json").exists()
    for t in ("trial_000", "trial_001"):  # each trial is its own (offline) W&B run
        assert len(list((root / "golgi_asym" / t / "wandb").glob("offline-run-*"))) == 1
    assert sys.argv[-1] == "postgresql://u:***@h/db"
    assert not [p for p in root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def test_sweep_space_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"experiment": "golgi_asym", "space": {"optimm.lr": {"type": "float", "low": 0, "high": 1}}}))
    with pytest.raises(config.ConfigError, match="optim"):
        load_space(bad)
    bad.write_text(yaml.safe_dump({"experiment": "golgi_asym", "space": {"optim.lr": {"type": "floatt"}}}))
    with pytest.raises(config.ConfigError, match="categorical"):
        load_space(bad)
    bad.write_text(yaml.safe_dump({"experiment": "golgi_asym", "trials": 3, "space": {}}))
    with pytest.raises(config.ConfigError, match="n_trials"):
        load_space(bad)


def test_repo_sweeps_are_valid():
    for path in config.SWEEPS_DIR.glob("*.yaml"):
        spec = load_space(path)
        assert spec["n_trials"] >= 1 and spec["space"]


@pytest.mark.parametrize("text,want", [
    (f"postgresql://u:{SECRET}@127.0.0.1:5432/db", "postgresql://u:***@127.0.0.1:5432/db"),
    (f"error at postgresql+psycopg2://user:p@{SECRET}@host/db: refused", "psycopg2://user:***@host/db: refused"),
    (f"mysql://root:{SECRET}@h", "mysql://root:***@h"),
    (f"WANDB_API_KEY={SECRET}123 and token: '{SECRET}'", "WANDB_API_KEY=*** and token: '***'"),
    ("sqlite:///runs/golgi_asym/study.db", "sqlite:///runs/golgi_asym/study.db"),
    ("postgresql://postgres@127.0.0.1:55432/postgres", "postgresql://postgres@127.0.0.1:55432/postgres"),
])
def test_redact(text, want):
    assert want in redact(text) and SECRET not in redact(text)


def test_redact_secret_environment_values(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert redact("logged in with 0123456789abcdef") == "logged in with ***"


def test_plain_postgresql_urls_use_the_installed_driver():
    assert storage_url("postgresql://u:pw@h/db") == "postgresql+psycopg2://u:pw@h/db"
    assert storage_url("postgres://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert storage_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert storage_url("sqlite:///x.db") == "sqlite:///x.db"


def test_summary_files_are_redacted(tmp_path):
    study = optuna.create_study(direction="maximize")
    dist = {"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    for i, lr in enumerate((1e-3, 2e-3)):
        study.add_trial(optuna.trial.create_trial(
            params={"optim.lr": lr}, distributions=dist, value=0.5 + i,
            user_attrs={"config": {"data": {"root": f"s3://key:{SECRET}@bucket/data"}}, "run_dir": "r"}))
    spec = {"metric": "val/pcc", "direction": "maximize"}
    write_summary(study, tmp_path, spec, storage=f"postgresql://u:{SECRET}@h/db")
    best = (tmp_path / "best.yaml").read_text()
    assert SECRET not in best and "postgresql://u:***@h/db" in best and "s3://key:***@bucket" in best
    assert SECRET not in (tmp_path / "trials.csv").read_text()


def test_parallel_workers_draw_distinct_parameters_and_stop_at_exactly_n_trials(tmp_path):
    """Two worker processes on one SQLite study: distinct parameters, exactly n_trials complete or pruned."""
    spec = {"experiment": "golgi_asym", "n_trials": 4, "heartbeat": 5,
            "sampler": {"seed": 0, "n_startup_trials": 4},
            "overrides": TINY + ["trainer.max_epochs=1", "test=false", "callbacks=[]", "logger.panels=0",
                                 "checkpoint_every=0"],
            "space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                      "net.dropout": {"type": "float", "low": 0.0, "high": 0.2}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    root = tmp_path / "r"
    env = {**os.environ, "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "labelling", "sweep", str(path), "--run-root", str(root)]
    workers = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), [o[-3000:] for o in outs]
    study = optuna.load_study(study_name="golgi_asym", storage=f"sqlite:///{root}/golgi_asym/study.db")
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4, [(t.number, t.state.name) for t in study.trials]
    assert len({tuple(sorted(t.params.items())) for t in finished}) == 4  # no two trials drew the same values
    assert all(t.user_attrs.get("surplus") for t in study.trials if t.state.name == "FAIL")
    assert all("TPE seed 0 + trial number" in o or "nothing to run" in o for o in outs)
    # the draws depend on the trial number only: a single worker would have drawn the same parameters
    single = optuna.create_study(sampler=make_sampler(spec))
    space = yaml.safe_load(path.read_text())["space"]  # in the file's order: the order of the draws
    for t in study.trials:
        trial = single.ask()
        assert trial.number == t.number
        if t.state.name != "FAIL":
            assert suggest(trial, space) == pytest.approx(t.params)


def test_trial_beyond_n_trials_stops_before_training(sweep_file, tmp_path):
    """A worker that starts a trial while others hold the last slots marks it surplus and trains nothing."""
    root = tmp_path / "runs"
    (root / "golgi_asym").mkdir(parents=True)
    storage = f"sqlite:///{root}/golgi_asym/study.db"
    study = optuna.create_study(study_name="golgi_asym", storage=storage, direction="maximize")
    dist = {"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    for i in range(2):
        study.add_trial(optuna.trial.create_trial(params={"optim.lr": 1e-3 * (i + 1)}, distributions=dist,
                                                  value=0.1 * i))
    study.ask()  # another worker's trial, still running
    study = run_sweep(sweep_file, n_trials=3, run_root=root)  # 2 done + 1 running: nothing left for this worker
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "RUNNING", "FAIL"] and study.trials[3].user_attrs["surplus"]
    assert not list(root.rglob("trial_*"))
    import pandas as pd

    assert set(pd.read_csv(root / "golgi_asym" / "trials.csv")["number"]) == {0, 1, 2}  # surplus left out


def test_redaction_leaves_ordinary_words_alone(monkeypatch):
    """A secret-looking variable holding a word (issue 24: "cannot") must not blank that word in messages."""
    monkeypatch.setenv("MY_TOKEN", "cannot")
    monkeypatch.setenv("OTHER_SECRET", "hunter22-long")
    assert redact("/etc/passwd: cannot load the exported network") == "/etc/passwd: cannot load the exported network"
    assert redact("the key is hunter22-long.") == "the key is ***."
    assert redact("xhunter22-longx") == "xhunter22-longx"  # only whole tokens


def test_a_sweep_names_its_objective_and_keeps_its_summary_when_killed(sweep_file, tmp_path, monkeypatch):
    """The dashboard shows the metric's name; best.yaml and trials.csv exist after every trial, so a sweep
    stopped midway (Ctrl-C on the second trial here) still has them."""
    import labelling.runs.train as train_module

    real_fit, calls = train_module.fit, []

    def fit_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(train_module, "fit", fit_then_die)
    root = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep_file, n_trials=3, run_root=root)
    out = root / "golgi_asym"
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["best_trial"] == 0 and best["metric"] == "val/pcc"
    assert (out / "trials.csv").read_text().count("\n") >= 2  # header + the finished trial
    study = optuna.load_study(study_name="golgi_asym", storage=f"sqlite:///{out / 'study.db'}")
    assert study.metric_names == ["val/pcc"]
    attrs = study.trials[0].user_attrs
    assert attrs["run_dir"].endswith("trial_000") and "metric:val/pcc" in attrs and attrs["config"]["name"]
