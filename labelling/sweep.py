"""Optuna driver over :func:`labelling.train.fit`.

A sweep is ``sweeps/<experiment>.yaml``: the metric and direction, a trial budget, and a search space keyed
by dotted config paths. The study lives in ``sqlite:///runs/<exp>/study.db`` unless ``--storage`` names any
RDB URL (e.g. PostgreSQL for many workers). Re-running the same command resumes the study: completed and
pruned trials count towards ``n_trials``; trials of a killed worker are detected by heartbeat, marked failed
and retried, continuing from their last checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import yaml

from labelling import config as C

PARAM_TYPES = ("float", "int", "categorical")


def load_space(name_or_path: str | Path) -> dict:
    """Read and check a sweep file; errors name the bad key and the valid ones."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = C.SWEEPS_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        valid = sorted(p.stem for p in C.SWEEPS_DIR.glob("*.yaml"))
        raise C.unknown("sweep", str(name_or_path), valid)
    spec = yaml.safe_load(path.read_text()) or {}
    allowed = {"experiment", "metric", "direction", "n_trials", "sampler", "pruner", "overrides", "space",
               "heartbeat"}
    for key in spec:
        if key not in allowed:
            raise C.unknown(f"key in sweep {path.name}", key, allowed)
    spec.setdefault("experiment", path.stem)
    spec.setdefault("metric", "val/pcc")
    spec.setdefault("direction", "maximize")
    spec.setdefault("n_trials", 8)
    if not spec.get("space"):
        raise C.ConfigError(f"sweep {path.name}: empty `space:`")
    raw = C.load_raw(spec["experiment"])
    for dotted, p in spec["space"].items():
        if p.get("type") not in PARAM_TYPES:
            raise C.unknown(f"parameter type of {dotted}", p.get("type"), PARAM_TYPES)
        _check_path(raw, dotted)
    return spec


def _check_path(raw: dict, dotted: str) -> None:
    """The section of a dotted path must exist (the leaf may be a new argument)."""
    node = raw
    parts = dotted.split(".")
    for key in parts[:-1]:
        if not isinstance(node, dict) or key not in node:
            raise C.unknown("sweep parameter section", ".".join(parts[:-1]), _paths(raw))
        node = node[key]


def _paths(raw: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in raw.items():
        if isinstance(v, dict):
            out.append(prefix + k)
            out += _paths(v, prefix + k + ".")
    return out


def suggest(trial, space: dict) -> dict[str, Any]:
    """Draw one value per dotted parameter with the trial."""
    out = {}
    for dotted, p in space.items():
        if p["type"] == "float":
            out[dotted] = trial.suggest_float(dotted, float(p["low"]), float(p["high"]), log=p.get("log", False))
        elif p["type"] == "int":
            out[dotted] = trial.suggest_int(dotted, int(p["low"]), int(p["high"]), log=p.get("log", False))
        else:
            out[dotted] = trial.suggest_categorical(dotted, p["choices"])
    return out


class PruningCallback(L.Callback):
    """Report the monitored metric to Optuna after each validation and stop unpromising trials."""

    def __init__(self, trial, monitor: str):
        self.trial, self.monitor = trial, monitor

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        epoch = trainer.current_epoch
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            import optuna

            raise optuna.TrialPruned(f"epoch {epoch}: {self.monitor}={value:.4f}")


def default_storage(exp: str, run_root: str | Path = "runs") -> str:
    path = Path(run_root) / exp / "study.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def make_storage(url: str, heartbeat: int = 30):
    """RDB storage with a heartbeat; trials whose worker died are failed and retried (up to 3 times)."""
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                      engine_kwargs=kwargs)


def retried_from(trial) -> int | None:
    """Number of the dead trial this one retries (set by the heartbeat retry callback), else None."""
    attrs = trial.study._storage.get_trial_system_attrs(trial._trial_id)
    return attrs.get("failed_trial")


def run_sweep(sweep: str | Path, storage: str | None = None, n_trials: int | None = None,
              overrides: list[str] | None = None, study_name: str | None = None,
              run_root: str | Path = "runs"):
    """Run (or resume) a sweep; returns the Optuna study. Writes ``best.yaml`` and ``trials.csv``."""
    import optuna

    from labelling.train import fit

    spec = load_space(sweep)
    exp = spec["experiment"]
    study_name = study_name or exp
    out_dir = Path(run_root) / exp
    out_dir.mkdir(parents=True, exist_ok=True)
    storage_url = storage or default_storage(exp, run_root)
    sampler = optuna.samplers.TPESampler(seed=spec.get("sampler", {}).get("seed", 0),
                                         n_startup_trials=spec.get("sampler", {}).get("n_startup_trials", 4))
    pr = spec.get("pruner", {})
    pruner = optuna.pruners.MedianPruner(n_startup_trials=pr.get("n_startup_trials", 3),
                                         n_warmup_steps=pr.get("n_warmup_steps", 3))
    for attempt in range(5):  # workers starting together race to create the tables and the study
        try:
            storage_obj = make_storage(storage_url, spec.get("heartbeat", 30))
            study = optuna.create_study(study_name=study_name, storage=storage_obj, sampler=sampler, pruner=pruner,
                                        direction=spec["direction"], load_if_exists=True)
            break
        except Exception:  # IntegrityError / DuplicatedStudyError / ProgrammingError from the race
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)
    base = C.load_raw(exp)
    base_overrides = list(spec.get("overrides", [])) + list(overrides or [])

    def objective(trial) -> float:
        params = suggest(trial, spec["space"])
        retried = retried_from(trial)
        number = retried if retried is not None else trial.number
        run_dir = out_dir / f"trial_{number:03d}"
        raw = C.apply_overrides(C.apply_overrides(base, base_overrides), params)
        raw = C.apply_overrides(raw, {"name": f"{exp}-t{number:03d}", "monitor": spec["metric"],
                                      "monitor_mode": "max" if spec["direction"] == "maximize" else "min",
                                      "resume": retried is not None, "logger.group": study_name})
        cfg = C.validate(raw)
        trial.set_user_attr("config", C.to_dict(cfg))
        trial.set_user_attr("run_dir", str(run_dir))
        metrics = fit(cfg, run_dir=run_dir, callbacks=[PruningCallback(trial, spec["metric"])])
        value = metrics.get(f"best/{spec['metric']}", metrics.get(spec["metric"], math.nan))
        for k, v in metrics.items():
            trial.set_user_attr(f"metric:{k}", v)
        return value

    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    total = n_trials or spec["n_trials"]
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    remaining = total - len(done)
    if remaining > 0:
        print(f"study '{study_name}' at {storage_url}: {len(done)} trials done, running {remaining} more")
        # other workers may share the study: every worker stops once the study as a whole has `total`
        stop = MaxTrialsCallback(total, states=(TrialState.COMPLETE, TrialState.PRUNED))
        study.optimize(objective, n_trials=remaining, catch=(FloatingPointError,), callbacks=[stop])
    else:
        print(f"study '{study_name}': all {len(done)} trials done; nothing to run")
    write_summary(study, out_dir, spec)
    return study


def write_summary(study, out_dir: Path, spec: dict) -> None:
    """``best.yaml`` (resolved config + value), ``trials.csv`` and an optimisation-history plot."""
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not complete:
        return
    best = study.best_trial
    cfg = copy.deepcopy(best.user_attrs.get("config", {}))
    summary = {"best_trial": best.number, "metric": spec["metric"], "value": best.value,
               "params": best.params, "run_dir": best.user_attrs.get("run_dir"), "config": cfg}
    (out_dir / "best.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    df = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration"))
    df.to_csv(out_dir / "trials.csv", index=False)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [t.number for t in complete]
    ys = [t.value for t in complete]
    ax.plot(xs, ys, "o", label="complete")
    pruned = [t for t in study.trials if t.state.name == "PRUNED" and t.intermediate_values]
    ax.plot([t.number for t in pruned], [list(t.intermediate_values.values())[-1] for t in pruned], "x",
            label="pruned (last report)")
    agg = max if spec["direction"] == "maximize" else min
    ax.plot(xs, [agg(ys[: i + 1]) for i in range(len(ys))], "-", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(spec["metric"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "history.png", dpi=80)
    plt.close(fig)
    print(json.dumps({"best_trial": best.number, spec["metric"]: best.value, "params": best.params}, indent=2))
