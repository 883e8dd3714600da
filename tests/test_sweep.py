import optuna
import pytest
import yaml

from labelling import config as C
from labelling.sweep import load_space, run_sweep


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


def test_two_trial_sweep_resumes(sweep_file, tmp_path):
    root = tmp_path / "runs"
    study = run_sweep(sweep_file, n_trials=1, run_root=root)
    assert len(study.trials) == 1
    first = study.trials[0].params
    study = run_sweep(sweep_file, run_root=root)  # same command: resumes, runs only the missing trial
    assert len(study.trials) == 2 and study.trials[0].params == first
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


def test_sweep_space_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"experiment": "golgi_asym", "space": {"optimm.lr": {"type": "float", "low": 0, "high": 1}}}))
    with pytest.raises(C.ConfigError, match="optim"):
        load_space(bad)
    bad.write_text(yaml.safe_dump({"experiment": "golgi_asym", "space": {"optim.lr": {"type": "floatt"}}}))
    with pytest.raises(C.ConfigError, match="categorical"):
        load_space(bad)
    bad.write_text(yaml.safe_dump({"experiment": "golgi_asym", "trials": 3, "space": {}}))
    with pytest.raises(C.ConfigError, match="n_trials"):
        load_space(bad)


def test_repo_sweeps_are_valid():
    for path in C.SWEEPS_DIR.glob("*.yaml"):
        spec = load_space(path)
        assert spec["n_trials"] >= 1 and spec["space"]
