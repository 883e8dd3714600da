"""`fit(cfg) -> metrics`: the one function the CLI, the tests and the sweeps call."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

import lightning
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info

from labelling import build, config, registry
from labelling.callbacks.panels import PredictionPanels
from labelling.data.atomic import write_file
from labelling.inference.load import build_run, check_checkpoint
from labelling.inference.predict import calibrate_affine
from labelling.runs.finetune import apply_init
from labelling.tasks.autoencoding import Autoencoding
from labelling.tasks.stainer import Stainer


def git_commit() -> str:
    """Current commit (with ``-dirty`` when the tree has changes), or ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=config.ROOT, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=config.ROOT, capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty and sha else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def wandb_mode() -> str:
    """Respect WANDB_MODE; otherwise online only when the user is logged in, else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    return "online" if netrc.exists() and "api.wandb.ai" in netrc.read_text() else "offline"


def make_loggers(cfg: config.Experiment, run_dir: Path) -> list:
    """CSV logger always; W&B and TensorBoard when the config asks for them and they are installed."""
    loggers: list = [CSVLogger(run_dir, name="csv")]  # version_N per (re)start: a resume keeps old logs
    if cfg.logger.wandb:
        try:
            import wandb  # noqa: F401
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:
            rank_zero_info("wandb is not installed; logging to CSV only (pip install 'labelling[tracking]')")
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            keep_wandb_files_in(run_dir / "wandb")
            loggers.append(WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity,
                                       group=cfg.logger.group, name=run_dir.name, save_dir=str(run_dir),
                                       mode=wandb_mode(), config=config.to_dict(cfg), job_type="train"))
    if cfg.logger.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(run_dir, name="tb", version=""))
    return loggers


WANDB_DIRS = ("WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR", "WANDB_CACHE_DIR")
_WANDB_BEFORE: dict[str, str | None] = {}


def keep_wandb_files_in(folder: Path) -> None:
    """Keep every file W&B stages (table thumbnails, media, artifacts) inside the run folder.

    A copy of ``runs/`` then syncs completely (`wandb sync`); the previous settings come back when the run
    finishes.
    """
    for key in WANDB_DIRS:
        _WANDB_BEFORE.setdefault(key, os.environ.get(key))
        os.environ[key] = str(folder / key.removeprefix("WANDB_").removesuffix("_DIR").lower())


def _restore_wandb_dirs() -> None:
    for key, value in _WANDB_BEFORE.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _WANDB_BEFORE.clear()


def log_model_artifact(run, run_dir: Path) -> bool:
    """The best checkpoint as a W&B model artifact (online runs only: offline ones keep it in the run folder)."""
    best = run_dir / "checkpoints" / "best.ckpt"
    if wandb_mode() != "online" or not best.is_file():
        return False
    import wandb

    artifact = wandb.Artifact(f"{run_dir.name}-model", type="model", metadata={"run_dir": str(run_dir)})
    artifact.add_file(str(best))
    run.log_artifact(artifact, aliases=["best"])
    return True


class LastCheckpoint(ModelCheckpoint):
    """The one writer of ``last.ckpt`` (what a resume reads); ``best.ckpt`` is another callback's alone.

    Written at each validation end (or epoch end without validation) and, with `every_n_train_steps`, also
    every that many steps so a killed run loses at most that many; always at the end of training.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int | None = None):
        super().__init__(dirpath=dirpath, filename="last", save_top_k=1, every_n_train_steps=every_n_train_steps,
                         enable_version_counter=False)
        self.periodic = bool(every_n_train_steps)

    def _save_now(self, trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if self.periodic:
            self._save_now(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_now(trainer)


def attach_deployment(dm, task, tta: bool = False) -> None:
    """Give a virtual-staining task its typed deployment state, from the *training* split only.

    See :meth:`labelling.data.datamodule.FluorescenceDataModule.deployment`; it is saved with every checkpoint.
    """
    if isinstance(task, Autoencoding):  # reconstructions of the normalized input (embedding studies)
        task.deployment = dm.deployment(task.net, task.loss, reconstruct=True)
        return
    task.deployment = dm.deployment(task.net, task.loss, tta=tta)
    task.cascade_models = dm.cascade_models


def set_threads(threads: int | None, num_workers: int = 0) -> int:
    """Set torch's CPU threads: `threads`, or cores / (workers + 1) when DataLoader workers share the cores."""
    if threads is None and num_workers > 0:
        threads = max(1, (os.cpu_count() or 1) // (num_workers + 1))
    if threads is not None:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def check_splits(cfg: config.Experiment, dm) -> None:
    """Refuse a run whose validation or (with ``test: true``) test split came out empty, naming the ways out."""
    splits = getattr(dm, "splits", None)
    if not splits or cfg.trainer.fast_dev_run:
        return
    groups = sorted({im.group for images in splits.values() for im in images})
    shown = ", ".join(groups[:8]) + (" ..." if len(groups) > 8 else "")
    ways = ("name the held-out groups with data.test_groups=[...] / data.val_groups=[...] (names or regular "
            "expressions), cut each field into blocks that are split independently with data.spatial_blocks=4 "
            "(folder data), or add fields")
    if not splits.get("val"):
        raise config.ConfigError(f"no validation fields: the data has {len(groups)} split group(s) ({shown}) and none "
                            f"was left for validation. Ways out: {ways}.")
    if cfg.test and not splits.get("test"):
        raise config.ConfigError(f"no test fields: the data has {len(groups)} split group(s) ({shown}) and none was "
                            f"left for testing, so no test or downstream metrics could be written. Ways out: {ways}; "
                            "or set test=false to train without a test.")


CALIBRATION_FIELDS = 16  # training fields the affine calibration of a scale-free loss predicts (8x with TTA)
CALIBRATION_PIXELS = 2**20  # pixels it predicts in all: a window of each field when fields are large


def calibration_fields(train: list, k: int = CALIBRATION_FIELDS) -> list:
    """At most `k` training fields, spread evenly over the split (whose order often follows a class or well)."""
    if len(train) <= k:
        return list(train)
    return [train[i] for i in np.unique(np.linspace(0, len(train) - 1, k).round().astype(int))]


def calibration_pixels(task) -> int | None:
    """The calibration's pixel budget for `task`: windows with dataset-level (``fixed``) input statistics.

    Per-image normalization would normalize a window by the window's own statistics, not the whole
    field's as deployment does, so such runs calibrate on whole fields (None).
    """
    return CALIBRATION_PIXELS if task.deployment.normalize == "fixed" else None


def calibration_windows(train: list, pixels: int | None = CALIBRATION_PIXELS, seed: int = 0) -> tuple[list, list]:
    """Raw (inputs, targets) the affine calibration predicts: :func:`calibration_fields`, each cut to a window.

    Each field gives one square window at a seeded random place (no part of a field is favoured), at least
    256 px and sized so the windows hold about `pixels` in all (None: whole fields). Moment matching needs
    the spread of many fields, not every pixel of each: on 600 px blocks this predicts 1 M pixels instead
    of 5.8 M (x8 with TTA).
    """
    fields = calibration_fields(train)
    side = max(256, math.isqrt(pixels // max(1, len(fields)))) if pixels else 1 << 30
    rng = np.random.default_rng(seed)
    inputs, targets = [], []
    for im in fields:
        x, y = im.raw_input(), im.raw_target()
        height, width = x.shape[1:]
        top, left = (int(rng.integers(n - min(side, n) + 1)) for n in (height, width))
        window = (slice(None), slice(top, top + side), slice(left, left + side))
        inputs.append(np.ascontiguousarray(x[window]))
        targets.append(np.ascontiguousarray(y[window]))
    return inputs, targets


def finalize_deployment(task, dm, checkpoint: ModelCheckpoint, is_global_zero: bool) -> None:
    """Load the best weights into `task`, and calibrate scale-free losses.

    For scale-free losses fit the affine de-normalization on the training split and write it into the saved
    checkpoints (each replaced atomically), so tests, evaluation and deployment agree.
    """
    best = checkpoint.best_model_path
    if best and Path(best).exists():
        task.load_state_dict(check_checkpoint(best)["state_dict"])
    if not isinstance(task, Stainer) or task.deployment.denormalize != "affine":
        return
    task.eval()
    stats = calibrate_affine(task, *calibration_windows(dm.splits["train"], calibration_pixels(task)))
    task.deployment = task.deployment.model_copy(update={"target_stats": stats.tolist()})
    if not is_global_zero:
        return
    for path in {best, str(Path(checkpoint.dirpath or ".") / "last.ckpt")}:
        if path and Path(path).exists():
            ckpt = check_checkpoint(path)
            ckpt["state_dict"]["_extra_state"] = task.deployment.to_dict()
            write_file(path, lambda partial, ckpt=ckpt: torch.save(ckpt, partial))  # never a half-written file


def fit(cfg: config.Experiment | str, overrides: list[str] | dict | None = None, run_dir: str | Path | None = None,
        callbacks: list | None = None) -> dict[str, float]:
    """Train (and test) one experiment; returns its metrics.

    The run folder (``<run_dir>/<name>`` unless given) receives ``config.yaml``, ``git.txt``,
    ``metrics.json``, ``checkpoints/{best,last}.ckpt``, ``panels/*.png`` and the logger files. When
    ``resume`` is on and ``checkpoints/last.ckpt`` exists, training continues from it.
    """
    if not isinstance(cfg, config.Experiment):
        cfg = config.load(cfg, overrides)
    elif overrides:
        cfg = config.validate(config.apply_overrides(config.to_dict(cfg), overrides))
    build.check_components(cfg)
    run_dir = Path(run_dir or Path(cfg.run_dir) / cfg.name)
    run_dir, finished = check_resume(cfg, run_dir)
    if finished is not None:
        rank_zero_info(f"{run_dir} already finished with this config; its metrics.json is left as it is")
        return finished
    lightning.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    dm, task = build_run(cfg)
    lineage = apply_init(cfg, dm, task)  # fine-tuning: the source's weights and normalization, before setup
    attach_deployment(dm, task, tta=cfg.tta)
    if lineage and getattr(task, "deployment", None) is not None:
        task.deployment.lineage = [lineage, *lineage.pop("lineage")]
    check_splits(cfg, dm)

    ckpt_dir = run_dir / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=cfg.monitor, mode=cfg.monitor_mode,
                                 save_top_k=1, enable_version_counter=False)
    cbs = [checkpoint, LastCheckpoint(ckpt_dir, cfg.checkpoint_every or None)]  # two files, one writer each
    cbs += ([PredictionPanels(cfg.logger.panels, deferred=True)] if cfg.task.name == "stainer" else [])
    cbs += [registry.build("callback", c.name, **c.args) for c in cfg.callbacks]
    cbs += list(callbacks or [])
    trainer_args = {k: v for k, v in cfg.trainer.model_dump().items() if v is not None}
    threads_before = torch.get_num_threads()  # restored on return: fit must not leave the process single-threaded
    set_threads(trainer_args.pop("threads", None), int(cfg.data.args.get("num_workers", 0) or 0))
    trainer = lightning.Trainer(default_root_dir=str(run_dir), logger=make_loggers(cfg, run_dir), callbacks=cbs,
                        **trainer_args)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(cfg, run_dir / "config.yaml")
        (run_dir / "git.txt").write_text(git_commit() + "\n")

    resume = ckpt_dir / "last.ckpt"
    ckpt_path = str(resume) if cfg.resume and resume.exists() and not cfg.trainer.fast_dev_run else None
    if ckpt_path:
        check_checkpoint(resume)
        rank_zero_info(f"resuming from {resume}")
    start = time.time()
    try:
        metrics = _fit_and_test(cfg, trainer, task, dm, checkpoint, ckpt_path)
    except BaseException:
        _finish_wandb(trainer, None, exit_code=1)  # a pruned or crashed trial must not leak its W&B run
        raise
    finally:
        torch.set_num_threads(threads_before)
    metrics["fit_seconds"] = time.time() - start
    if trainer.is_global_zero:
        write_metrics(run_dir / "metrics.json", metrics)
    _finish_wandb(trainer, metrics)
    return metrics


RUN_LENGTH_KEYS = ("trainer.max_epochs", "trainer.max_time", "trainer.enable_progress_bar", "resume")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume(cfg: config.Experiment, run_dir: Path) -> tuple[Path, dict | None]:
    """Decide what a run folder that already holds a run means for this config.

    Returns (run folder to use, stored metrics when the same run already finished, else None). A resume
    happens only when the stored config equals the new one except run-length keys; otherwise the run is
    refused with the differing keys, and ``resume=false`` picks a fresh numbered folder instead. A finished
    run's files are never rewritten.
    """
    stored_path, ckpt, metrics_path = run_dir / "config.yaml", run_dir / "checkpoints" / "last.ckpt", run_dir / "metrics.json"
    if cfg.trainer.fast_dev_run or not stored_path.exists() or not (ckpt.exists() or metrics_path.exists()):
        return run_dir, None
    if not cfg.resume:
        n = 2
        while Path(f"{run_dir}-{n}").exists():
            n += 1
        rank_zero_info(f"{run_dir} holds an earlier run and resume=false: this run goes to {run_dir}-{n}")
        return Path(f"{run_dir}-{n}"), None
    import yaml

    old, new = _flatten(yaml.safe_load(stored_path.read_text()) or {}), _flatten(config.to_dict(cfg))
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RUN_LENGTH_KEYS)
    if differ:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:8])
        raise config.ConfigError(f"{run_dir} already holds a run with another config ({shown}). Resuming it would "
                            "mix two experiments. Start a fresh numbered run folder with resume=false, pick "
                            "another folder with name=... (or --run-dir), or delete the old run.")
    if metrics_path.exists() and old.get("trainer.max_epochs") == new.get("trainer.max_epochs"):
        try:
            return run_dir, json.loads(metrics_path.read_text())
        except json.JSONDecodeError:
            return run_dir, None
    return run_dir, None


def write_metrics(path: Path, metrics: dict) -> None:
    """metrics.json, always valid JSON: a non-finite number (a diverged metric) is written as null."""
    clean = {k: (float(v) if np.isfinite(v) else None) for k, v in metrics.items()}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(clean, indent=2, sort_keys=True, allow_nan=False))
    tmp.replace(path)  # atomic: a crash never leaves half a file


def _fit_and_test(cfg, trainer, task, dm, checkpoint, ckpt_path) -> dict[str, float]:
    trainer.fit(task, dm, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if checkpoint.best_model_score is not None:
        metrics[f"best/{cfg.monitor}"] = float(checkpoint.best_model_score)
    stainer = cfg.task.name == "stainer" and not cfg.trainer.fast_dev_run
    if stainer:  # from here on the task holds the best weights and their calibration
        finalize_deployment(task, dm, checkpoint, trainer.is_global_zero)
        for cb in trainer.callbacks:
            if isinstance(cb, PredictionPanels) and cb.deferred:
                cb.render(trainer, task)
    if cfg.test and not cfg.trainer.fast_dev_run and dm.splits.get("test"):
        best = None if stainer else checkpoint.best_model_path or None
        for row in trainer.test(task, dm, ckpt_path=best, verbose=False):
            metrics.update({k: float(v) for k, v in row.items()})
        for cb in trainer.callbacks:
            metrics.update(getattr(cb, "results", {}))
    metrics["global_step"] = float(trainer.global_step)
    return metrics


def _finish_wandb(trainer, metrics: dict | None, exit_code: int = 0) -> None:
    if not any(type(lg).__name__ == "WandbLogger" for lg in trainer.loggers):
        return
    import wandb

    if wandb.run is not None:
        if metrics:
            wandb.run.summary.update(metrics)
            log_model_artifact(wandb.run, Path(trainer.default_root_dir))
        wandb.finish(exit_code=exit_code)
    _restore_wandb_dirs()
