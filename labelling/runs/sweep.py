"""Optuna driver over :func:`labelling.runs.train.fit`.

A sweep is ``sweeps/<experiment>.yaml`` (or any YAML path): the metric and direction, a trial budget, and a
search space keyed by dotted config paths; all of it is validated against the experiment before any trial
runs. The study lives in ``sqlite:///runs/<exp>/study.db`` unless ``--storage`` (or ``$LABELLING_STORAGE``)
names any RDB URL (e.g. ``postgresql://`` for many workers). Re-running the same command resumes the study:
completed and pruned trials count towards ``n_trials``, which the study never exceeds however many workers
share it; each trial's draws are seeded by its number, so workers never repeat each other. Trials of a
killed worker are detected by heartbeat, marked failed and retried, continuing from their last checkpoint.
Passwords and API keys are redacted from everything printed or saved.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning
import yaml
from lightning.pytorch.utilities import rank_zero_info

from labelling import build, config
from labelling.data.atomic import write_file
from labelling.errors import redact, redact_obj
from labelling.reporting import reports

PARAM_TYPES = ("float", "int", "categorical")
PARAM_KEYS = ("type", "low", "high", "log", "choices")
SPEC_KEYS = ("experiment", "metric", "direction", "n_trials", "sampler", "pruner", "overrides", "space", "heartbeat")
DIRECTIONS = ("maximize", "minimize")
SAMPLER_KEYS = ("seed", "n_startup_trials")
PRUNER_KEYS = ("n_startup_trials", "n_warmup_steps")
STORAGE_ENV = "LABELLING_STORAGE"  # a storage URL from the environment keeps its password off command lines


# --------------------------------------------------------------------------- the sweep file

def load_space(name_or_path: str | Path, overrides: list[str] | None = None) -> dict:
    """Read and check a sweep file before any trial runs; errors name the file, the bad key and the valid ones.

    Every search-space key must be a config path: each parameter's extreme values (each choice) are applied to
    the experiment and validated like ``train`` would, so a typo (``optim.lrr``) or a value out of range fails
    here instead of leaving failed trials.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = config.SWEEPS_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        if Path(name_or_path).suffix in (".yaml", ".yml"):
            raise config.ConfigError(f"sweep file not found: {path}")
        valid = sorted(p.stem for p in config.SWEEPS_DIR.glob("*.yaml"))
        raise config.unknown("sweep", str(name_or_path), valid)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise config.ConfigError(f"sweep {path}: invalid YAML: {err}") from None
    if not isinstance(spec, dict):
        raise config.ConfigError(f"sweep {path}: expected a mapping at the top level, got {type(spec).__name__}")
    try:
        return _check_spec(spec, path, list(overrides or []))
    except config.ConfigError as err:
        raise config.ConfigError(f"sweep {path}: {err}") from None


def _check_spec(spec: dict, path: Path, extra: list[str]) -> dict:
    for key in spec:
        if key not in SPEC_KEYS:
            raise config.unknown("key", key, SPEC_KEYS)
    spec.setdefault("experiment", path.stem)
    spec.setdefault("metric", "val/pcc")
    spec.setdefault("direction", "maximize")
    spec.setdefault("n_trials", 8)
    if spec["direction"] not in DIRECTIONS:
        raise config.unknown("direction", spec["direction"], DIRECTIONS)
    for key in ("n_trials", "heartbeat"):
        if key in spec and not _positive_int(spec[key]):
            raise config.ConfigError(f"{key} must be a positive integer, got {spec[key]!r}")
    for key, valid in (("sampler", SAMPLER_KEYS), ("pruner", PRUNER_KEYS)):
        section = spec.get(key) or {}
        if not isinstance(section, dict):
            raise config.ConfigError(f"{key} must be a mapping of {', '.join(valid)}, got {section!r}")
        for k in section:
            if k not in valid:
                raise config.unknown(f"{key} key", k, valid)
    overrides = spec.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise config.ConfigError(f"overrides must be a list of key=value strings, got {overrides!r}")
    space = spec.get("space")
    if not space:
        raise config.ConfigError("empty `space:`")
    if not isinstance(space, dict):
        raise config.ConfigError(f"space must map dotted config paths to parameters, got {space!r}")
    for dotted, p in space.items():
        _check_param(dotted, p)
    _check_against_experiment(spec, extra)
    return spec


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_param(dotted: str, p) -> None:
    if not isinstance(p, dict):
        raise config.ConfigError(f"parameter {dotted} must be a mapping like {{type: float, low: 0.1, high: 1}}, got {p!r}")
    if p.get("type") not in PARAM_TYPES:
        raise config.unknown(f"parameter type of {dotted}", p.get("type"), PARAM_TYPES)
    for key in p:
        if key not in PARAM_KEYS:
            raise config.unknown(f"key of parameter {dotted}", key, PARAM_KEYS)
    if p["type"] == "categorical":
        if not isinstance(p.get("choices"), list) or not p["choices"]:
            raise config.ConfigError(f"parameter {dotted}: a categorical needs a non-empty `choices:` list")
        return
    number, what = (int, "an integer") if p["type"] == "int" else ((int, float), "a number")
    for key in ("low", "high"):
        if isinstance(p.get(key), bool) or not isinstance(p.get(key), number):
            raise config.ConfigError(f"parameter {dotted}: `{key}:` must be {what}, got {p.get(key)!r}")
    if p["low"] > p["high"]:
        raise config.ConfigError(f"parameter {dotted}: low={p['low']} is greater than high={p['high']}")
    if p.get("log") and p["low"] <= 0:
        raise config.ConfigError(f"parameter {dotted}: a log-scale range needs low > 0, got low={p['low']}")


def _check_against_experiment(spec: dict, extra: list[str]) -> None:
    """Validate the experiment with the sweep's overrides, metric and every parameter's extreme values."""
    base = config.apply_overrides(config.load_raw(spec["experiment"]), list(spec.get("overrides") or []) + extra)
    fixed = {"monitor": spec["metric"], "monitor_mode": "max" if spec["direction"] == "maximize" else "min"}
    cfg = config.validate(base)
    monitors = config.MONITORS.get(cfg.task.name)
    if monitors is not None and spec["metric"] not in monitors:
        raise config.ConfigError(f"unknown metric '{spec['metric']}'.{config.suggest(spec['metric'], monitors)} "
                            f"Valid (logged by task '{cfg.task.name}'): {', '.join(sorted(monitors))}")
    if monitors and monitors[spec["metric"]] != fixed["monitor_mode"]:
        raise config.ConfigError(f"direction {spec['direction']} contradicts metric {spec['metric']} "
                            f"({'higher' if monitors[spec['metric']] == 'max' else 'lower'} is better)")
    low = {d: (p["choices"][0] if p["type"] == "categorical" else p["low"]) for d, p in spec["space"].items()}
    for dotted, p in spec["space"].items():
        values = p["choices"] if p["type"] == "categorical" else [p["low"], p["high"]]
        for value in values:
            try:
                cfg = config.validate(config.apply_overrides(base, {**fixed, **low, dotted: value}))
            except config.ConfigError as err:
                raise config.ConfigError(f"search-space parameter {dotted}={value!r}: {err}") from None
    build.check_components(cfg)  # argument names of components (net.widht, loss.under_weightt)


# --------------------------------------------------------------------------- sampling


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


def make_sampler(spec: dict):
    """TPE whose random stream is reseeded from ``seed + trial number`` at the start of every trial.

    Trial numbers are unique across all workers of a study, so parallel workers never draw the same
    parameters (a shared fixed seed made every worker's first trials identical), and a study stays
    reproducible whatever the number of workers.
    """
    import optuna

    class TrialSeededTPESampler(optuna.samplers.TPESampler):
        def __init__(self, seed: int, **kwargs):
            super().__init__(seed=seed, **kwargs)
            self.base_seed = seed

        def before_trial(self, study, trial) -> None:
            super().before_trial(study, trial)
            seed = (self.base_seed + trial.number) % 2**32
            rngs = [getattr(self, "_rng", None), getattr(getattr(self, "_random_sampler", None), "_rng", None)]
            if all(hasattr(r, "rng") for r in rngs):
                for r in rngs:
                    r.rng.seed(seed)
            else:  # Optuna internals changed: fall back to a fresh random stream per trial
                self.reseed_rng()

    cfg = spec.get("sampler") or {}
    return TrialSeededTPESampler(seed=int(cfg.get("seed", 0)), n_startup_trials=cfg.get("n_startup_trials", 4))


class PruningCallback(lightning.Callback):
    """Report the monitored metric to Optuna after each validation and stop unpromising trials."""

    def __init__(self, trial, monitor: str):
        self.trial, self.monitor = trial, monitor

    def on_validation_end(self, trainer: lightning.Trainer, module: lightning.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        epoch = trainer.current_epoch
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            import optuna

            raise optuna.TrialPruned(f"epoch {epoch}: {self.monitor}={value:.4f}")


def default_storage(exp: str, run_root: str | Path = "runs") -> str:
    """The SQLite storage URL ``runs/<exp>/study.db`` (its folder is created)."""
    path = Path(run_root) / exp / "study.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def storage_url(url: str) -> str:
    """Name a PostgreSQL driver that is installed.

    Plain ``postgresql://`` (and ``postgres://``) URLs use psycopg2 (``pip install 'labelling[hpo]'``); SQLAlchemy's own default (psycopg 3) is usually absent.
    """
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        if importlib.util.find_spec("psycopg2") is not None:
            return f"postgresql+psycopg2://{rest}"
        if importlib.util.find_spec("psycopg") is not None:
            return f"postgresql+psycopg://{rest}"
        raise config.ConfigError(f"storage {redact(url)}: no PostgreSQL driver is installed; "
                            "pip install 'labelling[hpo]' (psycopg2-binary)")
    return url


def make_storage(url: str, heartbeat: int = 30):
    """RDB storage with a heartbeat; trials whose worker died are failed and retried (up to 3 times)."""
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8; the warning is noise
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RDBStorage(storage_url(url), heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                          engine_kwargs=kwargs)


def _is_race(err: Exception, url: str) -> bool:
    """Errors of workers racing to create the tables and the study (worth a retry).

    Not those of a wrong URL, a missing driver or an unreachable server (permanent: reported at once).
    """
    if isinstance(err, (ImportError, config.ConfigError)) or type(err).__name__ in ("ArgumentError", "NoSuchModuleError"):
        return False
    text = str(err).lower()
    if type(err).__name__ == "OperationalError" and not url.startswith("sqlite"):
        return "deadlock" in text or "could not serialize" in text
    return True


def open_study(url: str, study_name: str, spec: dict, sampler, pruner):
    """Create or load the study; a storage that cannot be opened is a ConfigError with the URL redacted."""
    import optuna

    for attempt in range(5):  # workers starting together race to create the tables and the study
        try:
            storage = make_storage(url, spec.get("heartbeat", 30))
            return optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner,
                                       direction=spec["direction"], load_if_exists=True)
        except Exception as err:  # IntegrityError / DuplicatedStudyError / ProgrammingError from the race
            if attempt == 4 or not _is_race(err, url):
                detail = str(getattr(err, "orig", None) or err).strip().splitlines()
                raise config.ConfigError(f"cannot open the study storage {redact(url)}: {type(err).__name__}: "
                                    f"{redact(' '.join(line.strip() for line in detail))}") from None
            time.sleep(0.5 + attempt)


def retried_from(trial) -> int | None:
    """Number of the dead trial this one retries (set by the heartbeat retry callback), else None."""
    attrs = trial.study._storage.get_trial_system_attrs(trial._trial_id)
    return attrs.get("failed_trial")


class SurplusTrial(Exception):
    """Raised at the start of a trial the study no longer needs (other workers took the last slots)."""


def _taken(study, before: int | None = None) -> int:
    """Trials finished (complete/pruned), running or queued, optionally only those numbered below `before`."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if before is None or t.number < before)


def worker_id() -> str:
    """``host:pid`` of this worker, recorded with every trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def run_sweep(sweep: str | Path, storage: str | None = None, n_trials: int | None = None,
              overrides: list[str] | None = None, study_name: str | None = None,
              run_root: str | Path = "runs"):
    """Run (or resume) a sweep; returns the Optuna study. Writes ``best.yaml`` and ``trials.csv``.

    Any number of workers may run the same command on one storage: the study ends with exactly ``n_trials``
    complete or pruned trials (a trial that would exceed it stops at once, marked failed and ``surplus``).
    The storage URL may also come from ``$LABELLING_STORAGE``; its password is never printed or saved.
    """
    import optuna

    from labelling.runs.train import fit

    sys.argv[:] = [redact(a) for a in sys.argv]  # W&B saves the command line in every run's metadata
    storage = storage or os.environ.get(STORAGE_ENV) or None
    spec = load_space(sweep, overrides)
    exp = spec["experiment"]
    study_name = study_name or exp
    out_dir = Path(run_root) / exp
    out_dir.mkdir(parents=True, exist_ok=True)
    url = storage or default_storage(exp, run_root)
    pr = spec.get("pruner") or {}
    pruner = optuna.pruners.MedianPruner(n_startup_trials=pr.get("n_startup_trials", 3),
                                         n_warmup_steps=pr.get("n_warmup_steps", 3))
    study = open_study(url, study_name, spec, make_sampler(spec), pruner)
    study.set_metric_names([spec["metric"]])  # the dashboard names the objective (not "Objective 0")
    base = config.load_raw(exp)
    base_overrides = list(spec.get("overrides") or []) + list(overrides or [])
    total = n_trials or spec["n_trials"]
    if not _positive_int(total):
        raise config.ConfigError(f"--n-trials must be a positive integer, got {total!r}")

    def objective(trial) -> float:
        if _taken(study, before=trial.number) >= total:  # other workers took the last slots meanwhile
            trial.set_user_attr("surplus", True)
            study.stop()
            raise SurplusTrial(f"the study already has {total} trials finished or running; not starting another")
        params = suggest(trial, spec["space"])
        retried = retried_from(trial)
        number = retried if retried is not None else trial.number
        run_dir = out_dir / f"trial_{number:03d}"
        raw = config.apply_overrides(config.apply_overrides(base, base_overrides), params)
        raw = config.apply_overrides(raw, {"name": f"{exp}-t{number:03d}", "monitor": spec["metric"],
                                      "monitor_mode": "max" if spec["direction"] == "maximize" else "min",
                                      "resume": retried is not None, "logger.group": study_name,
                                      "trainer.enable_progress_bar": False})  # one bar over trials instead
        cfg = config.validate(raw)
        trial.set_user_attr("config", redact_obj(config.to_dict(cfg)))
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", worker_id())
        metrics = fit(cfg, run_dir=run_dir, callbacks=[PruningCallback(trial, spec["metric"])])
        value = metrics.get(f"best/{spec['metric']}", metrics.get(spec["metric"], math.nan))
        for k, v in metrics.items():
            trial.set_user_attr(f"metric:{k}", v)
        return value

    def summarise(study, trial) -> None:  # after every trial: a killed sweep keeps best.yaml and trials.csv
        write_summary(study, out_dir, spec, storage=url, plot=False)

    def stop_when_full(study, trial) -> None:
        # Every worker stops once the study as a whole has `total` trials done, running or queued; the check
        # at the start of `objective` settles the races this leaves.
        if _taken(study) >= total:
            study.stop()

    from optuna.trial import TrialState

    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    remaining = total - len(done)
    if remaining > 0:
        seed = (spec.get("sampler") or {}).get("seed", 0)
        rank_zero_info(f"study '{study_name}' at {redact(url)}: {len(done)} trials done, running {remaining} "
                       f"more (worker {worker_id()}, TPE seed {seed} + trial number)")
        console = reports.TrialConsole(remaining, spec["metric"], study_name)
        try:
            study.optimize(objective, n_trials=remaining, catch=(FloatingPointError, SurplusTrial),
                           callbacks=[stop_when_full, summarise, console])
        finally:
            console.close()
    else:
        rank_zero_info(f"study '{study_name}': all {len(done)} trials done; nothing to run")
    write_summary(study, out_dir, spec, storage=url)
    return study


def write_summary(study, out_dir: Path, spec: dict, storage: str | None = None, plot: bool = True) -> None:
    """``best.yaml`` (resolved config + value), ``trials.csv`` and an optimisation-history plot (secrets redacted).

    Written after every trial (the files are replaced atomically), so a sweep stopped at any point has them.
    """
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not complete:
        return
    best = study.best_trial
    cfg = copy.deepcopy(best.user_attrs.get("config", {}))
    summary = {"best_trial": best.number, "metric": spec["metric"], "value": best.value,
               "params": best.params, "run_dir": best.user_attrs.get("run_dir"), "config": cfg,
               "study": study.study_name, "storage": storage}
    text = yaml.safe_dump(redact_obj(summary), sort_keys=False)
    write_file(out_dir / "best.yaml", lambda partial: partial.write_text(text))
    surplus = {t.number for t in study.trials if t.user_attrs.get("surplus")}
    df = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration"))
    df = df[~df["number"].isin(surplus)]
    df = df.map(lambda v: redact(v) if isinstance(v, str) else v)
    write_file(out_dir / "trials.csv", lambda partial: df.to_csv(partial, index=False))
    if not plot:
        return
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
