"""Config -> objects: the only place that builds a data module, net, loss or task from an experiment config.

Training, the studies, the loader (:mod:`labelling.inference.load`, which rebuilds a checkpoint's task from the
config stored inside it) and ``show``/``sweep`` (:func:`check_components`) all build through here, so a config
means the same objects everywhere and is refused for the same reasons everywhere.
"""

from __future__ import annotations

from labelling import config, contracts, registry

__all__ = ["build", "build_data", "build_task", "check_components", "net_args"]


def net_args(cfg: config.Experiment) -> dict:
    """The net's constructor arguments of a config, besides its channel counts."""
    args = dict(cfg.net.args)
    if "size" in (registry.accepted_args(registry.get("net", cfg.net.name)) or []):
        args.setdefault("size", cfg.data.args.get("crop", 64))  # fixed-size autoencoders
    return args


def build_task(cfg: config.Experiment, in_channels: int, out_channels: int):
    """Net + loss + LightningModule of a config (the net's channel counts come from the data).

    Raises:
        ConfigError: a component that does not meet its contract, or a training crop the net cannot take.
    """
    net = registry.build("net", cfg.net.name, in_channels=in_channels, out_channels=out_channels, **net_args(cfg))
    contracts.check_crop(net, int(cfg.data.args.get("crop", 64)))
    loss = registry.build("loss", cfg.loss.name, **cfg.loss.args)
    return registry.build("task", cfg.task.name, net=net, loss=loss, optim=cfg.optim.model_dump(),
                          config=config.to_dict(cfg), **cfg.task.args)


def build_data(cfg: config.Experiment, cascade: list | None = None):
    """The data module of a config.

    `cascade` is the loaded ``data.cascade`` (:class:`labelling.inference.load.CascadeInputs`): their
    predictions are extra input channels.
    """
    dm = registry.build("data", cfg.data.name, **{"seed": cfg.seed, **cfg.data.args})
    if dm.cascade:
        dm.attach_cascade(cascade)
    return dm


def build(cfg: config.Experiment, cascade: list | None = None):
    """Build (datamodule, task) from a validated config (see :func:`build_data` for `cascade`)."""
    dm = build_data(cfg, cascade)
    out = dm.in_channels if cfg.task.name == "autoencoder" else dm.out_channels
    task = build_task(cfg, dm.in_channels, out)
    dm.spatial_multiple = task.net.spatial_multiple  # whole-field val/test crops are cut to what the net takes
    return dm, task


def check_components(cfg: config.Experiment) -> None:
    """Check every component of a config without data (names, arguments, contracts, crop vs net).

    Names and argument names against the builders, the net and loss against their contracts
    (:mod:`labelling.contracts`), and the crop against the net's spatial multiple.
    :func:`labelling.config.validate` checks the schema and values; ``show``, ``train`` and ``sweep`` run both,
    so ``show`` refuses exactly what ``train`` would refuse before training. Raises ConfigError.
    """
    for kind, comp in (("task", cfg.task), ("data", cfg.data), ("net", cfg.net), ("loss", cfg.loss)):
        registry.check_args(registry.get(kind, comp.name), comp.args, f"{kind} '{comp.name}'")
    registry.get("optim", cfg.optim.name)
    for comp in cfg.callbacks:
        registry.check_args(registry.get("callback", comp.name), comp.args, f"callback '{comp.name}'")
    # the net with one channel in and out: its contract and spatial multiple do not depend on the data
    channels = 1
    net = registry.build("net", cfg.net.name, in_channels=channels, out_channels=channels, **net_args(cfg))
    contracts.check_crop(net, int(cfg.data.args.get("crop", 64)))
    registry.build("loss", cfg.loss.name, **cfg.loss.args)
    if cfg.data.args.get("cascade"):  # the runs must exist (loading them is the data's job, not a check's)
        from labelling.data.cascade import resolve

        resolve(cfg.data.args["cascade"])
