"""Config -> objects: ``build(cfg) -> (datamodule, task)``, and checkpoint -> task (:func:`load_task`).

Train, the predict CLI, evaluate, the app and the training studies all build through here, so a config
means the same objects everywhere.
"""

from __future__ import annotations

from pathlib import Path

from labelling import config, registry
from labelling.errors import CheckpointError
from labelling.inference.checkpoints import check_checkpoint

__all__ = ["build", "build_task", "load_task"]


def build_task(cfg: config.Experiment, in_channels: int, out_channels: int):
    """Net + loss + LightningModule of a config (the net's channel counts come from the data)."""
    net_args = dict(cfg.net.args)
    if "size" in (registry.accepted_args(registry.get("net", cfg.net.name)) or []):
        net_args.setdefault("size", cfg.data.args.get("crop", 64))  # fixed-size autoencoders
    net = registry.build("net", cfg.net.name, in_channels=in_channels, out_channels=out_channels, **net_args)
    loss = registry.build("loss", cfg.loss.name, **cfg.loss.args)
    return registry.build("task", cfg.task.name, net=net, loss=loss, optim=cfg.optim.model_dump(),
                          config=config.to_dict(cfg), **cfg.task.args)


def build(cfg: config.Experiment):
    """Build (datamodule, task) from a validated config."""
    data_args = {"seed": cfg.seed, **cfg.data.args}
    dm = registry.build("data", cfg.data.name, **data_args)
    out = dm.in_channels if cfg.task.name == "autoencoder" else dm.out_channels
    return dm, build_task(cfg, dm.in_channels, out)


def load_task(path: str | Path):
    """Rebuild the task (net + loss from the embedded config) of a checkpoint or run folder, in eval mode.

    Returns:
        (task, validated config).

    Raises:
        CheckpointError: no checkpoint in the run folder, or one that is unreadable or not labelling's.
    """
    path = Path(path)
    if path.is_dir():  # a run folder
        for name in ("checkpoints/best.ckpt", "checkpoints/last.ckpt"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise CheckpointError(f"no checkpoints/best.ckpt or last.ckpt under run folder {path}")
    ckpt = check_checkpoint(path)
    try:
        cfg = config.validate(ckpt["labelling_config"])
    except config.ConfigError as err:
        raise CheckpointError(f"{path}: its embedded config does not validate: {err}") from err
    io = ckpt.get("labelling_io", {"in": 1, "out": 1})
    task = build_task(cfg, io["in"], io["out"])
    task.load_state_dict(ckpt["state_dict"])
    cascade = (getattr(task, "deploy", None) or {}).get("cascade") or []
    try:  # runs whose predictions this model takes as extra input channels
        task.cascade = [load_task(run)[0] for run in cascade]
    except CheckpointError as err:
        raise CheckpointError(f"{path}: a run of its cascade cannot be loaded ({err}); the model needs it") from None
    return task.eval(), cfg
