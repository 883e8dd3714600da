"""Experiment configuration: a pydantic schema, YAML loading with one `extends:`, dotted overrides.

Top keys ``seed, data, net, loss, optim, trainer, callbacks, logger``; each component is ``{name: <short name>,
...arguments}``. :func:`validate` checks the schema and every value it knows (choices, ranges, types);
:func:`labelling.build.check_components` checks component and argument names against the builders in
:mod:`labelling.registry` and builds net and loss against their contracts: a mistake names the valid choices.
"""

from __future__ import annotations

import copy
import numbers
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from labelling.errors import ConfigError, suggest, unknown  # noqa: F401  (ConfigError, unknown: re-exported)

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR, SWEEPS_DIR = ROOT / "experiments", ROOT / "sweeps"

SCHEDULERS = ("cosine", "plateau", None)  # valid ``optim.scheduler`` values (built in labelling.tasks.stainer)
PER_IMAGE = ("percentile", "zscore", "minmax", "none")  # ``data.normalize``; the rule: labelling.data.normalization
NORMALIZATIONS = (*PER_IMAGE, "fixed")  # fixed: dataset-level statistics of the training split
TARGET_NORMALIZATIONS = (*NORMALIZATIONS, "balanced")  # balanced: halfway between per image and dataset-level
# What each task logs (see labelling/tasks) and which direction is better: `monitor` must be one of these.
MONITORS: dict[str, dict[str, str]] = {
    "stainer": {"val/pcc": "max", "val/ssim": "max", "val/loss": "min", "val/mse_normalized": "min", "train/loss": "min"},
    "autoencoder": {"val/pcc": "max", "val/loss": "min", "val/mse": "min", "train/loss": "min"}}
SPLIT_BY = ("well", "field")


class Component(BaseModel):
    """`name:` of a registered builder plus its keyword arguments (checked at build time)."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TaskComponent(Component):
    """The task; its name defaults to ``stainer``, so ``task.ema=0.99`` alone keeps the default task."""

    name: str = "stainer"


class OptimConfig(BaseModel):
    """Optimizer name, learning rate, weight decay and LR scheduler (cosine, plateau or null)."""

    model_config = ConfigDict(extra="forbid")
    name: str = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: str | None = "cosine"  # None | cosine | plateau


class TrainerConfig(BaseModel):
    """Arguments of ``lightning.Trainer`` that experiments use; anything else is refused."""

    model_config = ConfigDict(extra="forbid")
    max_epochs: int = Field(10, ge=1)
    max_time: str | None = None  # "DD:HH:MM:SS"
    limit_train_batches: float | int = 1.0
    limit_val_batches: float | int = 1.0
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 10
    fast_dev_run: bool | int = False
    enable_progress_bar: bool = True
    deterministic: bool = False
    accumulate_grad_batches: int = 1
    # CPU threads of torch in the training process (None: torch's default, or cores / (workers + 1) when
    # DataLoader workers run). One thread can be much faster than two on a loaded 2-core machine.
    threads: int | None = Field(None, ge=1)


class LoggerConfig(BaseModel):
    """Where runs are logged (CSV always; W&B, TensorBoard) and how many prediction panels."""

    model_config = ConfigDict(extra="forbid")
    wandb: bool = True
    project: str = "labelling"
    entity: str | None = None
    group: str | None = None
    tensorboard: bool = False
    panels: int = Field(4, ge=0)  # prediction panels saved as PNG at the end of a run


class InitConfig(BaseModel):
    """Fine-tuning from a trained model: ``init: {from: <run, checkpoint, export or BMZ package folder>}``.

    Matching layers are loaded (a mismatch names them), the source's input normalization is kept unless
    ``normalization: own``; ``freeze_encoder`` trains only the decoder.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    source: str | None = Field(None, validation_alias=AliasChoices("from", "source"))
    freeze_encoder: bool = False
    normalization: str = "source"

    @model_validator(mode="before")
    @classmethod
    def _one_name(cls, data):
        if isinstance(data, dict) and "from" in data and "source" in data:
            raise ValueError("init.from and init.source are one setting (two names): give one of them")
        return data

    @model_validator(mode="after")
    def _known(self):
        if self.normalization not in ("source", "own"):
            raise ValueError(f"init.normalization must be 'source' (keep the trained model's) or 'own', "
                             f"got {self.normalization!r}")
        return self


class Experiment(BaseModel):
    """The whole experiment. Unknown top-level keys are errors (`extra='forbid'`)."""

    model_config = ConfigDict(extra="forbid")
    name: str = "experiment"
    seed: int = 0
    run_dir: str = "runs"
    monitor: str = "val/pcc"  # metric for checkpointing, pruning and the sweep objective
    monitor_mode: str = "max"
    test: bool = True
    resume: bool = True  # continue from run_dir/checkpoints/last.ckpt when it exists
    checkpoint_every: int = Field(50, ge=0)  # also refresh last.ckpt every N training steps (0: epoch ends only)
    tta: bool = False  # deployed predictions average the 8 flips/rotations of each tile (labelling.inference.predict)
    task: TaskComponent = TaskComponent()
    data: Component
    net: Component = Component(name="unet")
    loss: Component = Component(name="mse")
    optim: OptimConfig = OptimConfig()
    trainer: TrainerConfig = TrainerConfig()
    callbacks: list[Component] = []
    logger: LoggerConfig = LoggerConfig()
    init: InitConfig = InitConfig()  # fine-tuning from a trained model (its weights, its normalization)
    # named override sets, e.g. ``profiles: {gpu: {net: {width: 64}, trainer: {precision: bf16-mixed}}}``,
    # applied by ``profile=gpu`` (command-line overrides still win)
    profile: str | None = None
    profiles: dict[str, dict] = {}

    @model_validator(mode="after")
    def _cross_checks(self):
        problems = check_values(self)
        if problems:
            raise ValueError("\n  ".join(problems))
        return self


# --------------------------------------------------------------------------- value checks

def _positive_int(v) -> bool:
    return _count(v) and v >= 1


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _fraction(v) -> bool:  # [0, 1)
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v < 1


# Component arguments whose values are checked before anything is built: {argument: (test, what is valid)}.
NET_ARGS = {**{k: (_positive_int, "a positive integer (>= 1)") for k in ("depth", "width", "latent_dim", "size")},
            "dropout": (_fraction, "a number in [0, 1)")}
DATA_ARGS = {"crop": (_positive_int, "a positive integer (pixels)"),
             "val_crop": (lambda v: v is None or _positive_int(v), "a positive integer (pixels) or null"),
             "batch_size": (_positive_int, "a positive integer"),
             "crops_per_epoch": (_positive_int, "a positive integer"),
             "n_wells": (_positive_int, "a positive integer"), "fields_per_well": (_positive_int, "a positive integer"),
             "field_size": (_positive_int, "a positive integer (pixels)"),
             "spatial_blocks": (_positive_int, "a positive integer"), "max_size": (_count, "an integer >= 0 (0 keeps)"),
             "num_workers": (_count, "an integer >= 0"), "mirror_margin": (_count, "an integer >= 0 (pixels)"),
             **{k: (_fraction, "a number in [0, 1)") for k in ("val_fraction", "test_fraction")},
             "flatfield": (lambda v: isinstance(v, bool), "true or false")}
# Known values that need no import to accept; anything else is looked up in the module that defines it.
# the arguments of labelling.data.augment.PairedAugment besides crop and seed (a test keeps them equal)
AUGMENT_KEYS = ("flip", "rotate", "scale", "corrupt_p", "max_severity", "corruptions")


def check_values(cfg: Experiment) -> list[str]:
    """Problems with the values of a config (ranges, choices, types), each naming the key and what is valid.

    Rewrites what it can interpret unambiguously (a single string for a list of channels) in place.
    """
    problems, tables = [], _registry_tables()
    if cfg.optim.name not in tables["optim"]:
        problems.append(str(unknown("optim.name", cfg.optim.name, tables["optim"])))
    if cfg.optim.scheduler not in SCHEDULERS:
        problems.append(str(unknown("optim.scheduler", cfg.optim.scheduler, ["null" if s is None else s for s in SCHEDULERS])))
    monitors = MONITORS.get(cfg.task.name)
    if monitors is not None and cfg.monitor not in monitors:
        problems.append(f"unknown monitor '{cfg.monitor}'.{suggest(cfg.monitor, monitors)} "
                        f"Valid (logged by task '{cfg.task.name}'): {', '.join(sorted(monitors))}")
    if cfg.monitor_mode not in ("min", "max"):
        problems.append(str(unknown("monitor_mode", cfg.monitor_mode, ("min", "max"))))
    elif monitors and cfg.monitor in monitors and monitors[cfg.monitor] != cfg.monitor_mode:
        better = "higher" if monitors[cfg.monitor] == "max" else "lower"
        problems.append(f"monitor_mode={cfg.monitor_mode} contradicts monitor={cfg.monitor} ({better} is better): "
                        f"set monitor_mode: {monitors[cfg.monitor]}")
    if cfg.net.name in tables.get("net", ()):
        problems += _check_args("net", cfg.net.args, NET_ARGS)
    if cfg.data.name in tables.get("data", ()):
        problems += _check_data(cfg.data)
    return problems


def _registry_tables() -> dict:
    from labelling import registry  # late: the registry sits above this module (its tables import nothing)

    return registry.TABLES


def _check_args(section: str, args: dict, rules: dict) -> list[str]:
    return [f"{section}.{key}={args[key]!r}: must be {wanted}"
            for key, (test, wanted) in rules.items() if key in args and not test(args[key])]


def _check_data(data: Component) -> list[str]:
    args = data.args
    problems = _check_args("data", args, DATA_ARGS)
    fractions = [args.get(k, 0.25) for k in ("val_fraction", "test_fraction")]
    if all(_fraction(f) for f in fractions) and sum(fractions) >= 1:
        problems.append(f"data.val_fraction + data.test_fraction = {sum(fractions):g}: must be < 1 "
                        "(something must be left to train on)")
    if "split_by" in args and args["split_by"] not in SPLIT_BY:
        problems.append(str(unknown("data.split_by", args["split_by"], SPLIT_BY)))
    for key, valid in (("normalize", NORMALIZATIONS), ("target_normalize", TARGET_NORMALIZATIONS)):
        if args.get(key) is not None and args[key] not in valid:
            problems.append(str(unknown(f"data.{key}", args[key], valid)))
    transforms = _registry_tables()["transform"]
    if "target_transform" in args and args["target_transform"] not in transforms:
        problems.append(str(unknown("data.target_transform", args["target_transform"], sorted(transforms))))
    augment = args.get("augment")
    if augment is not None and not isinstance(augment, dict):
        problems.append(f"data.augment={augment!r}: must be a mapping, e.g. {{flip: true, rotate: 15}}")
    elif augment:
        problems += [str(unknown("data.augment key", k, AUGMENT_KEYS)) for k in augment if k not in AUGMENT_KEYS]
    for key in ("inputs", "targets"):
        if key in args:
            channels, problem = _channel_list(key, args[key])
            if problem:
                problems.append(problem)
            else:
                data.model_extra[key] = channels  # one string is one channel, never a list of letters
    return problems


def _channel_list(key: str, value) -> tuple[list[str], str | None]:
    """`inputs`/`targets` as a list of channel names; a single name (string or number) is a one-element list."""
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        return [], f"data.{key}={value!r}: must be a non-empty list of channel names, e.g. ['w2']"
    if bad := [v for v in value if not isinstance(v, (str, int)) or isinstance(v, bool)]:
        return [], f"data.{key}: channel names must be strings, got {bad!r}"
    return [str(v) for v in value], None


# --------------------------------------------------------------------------- loading and overrides

def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, val in over.items():
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            renamed = "name" in val and val["name"] != out[key].get("name")
            out[key] = _deep_merge(_keep_accepted(key, val["name"], out[key]) if renamed else out[key], val)
        else:
            out[key] = copy.deepcopy(val)
    return out


def _keep_accepted(kind: str, name: str, args: dict) -> dict:
    """A component switched to another `name:` keeps only the inherited arguments the new one accepts."""
    from labelling import registry  # late: the registry sits above this module

    if kind not in registry.TABLES or name not in registry.TABLES[kind]:
        return {}
    valid = registry.accepted_args(registry.get(kind, name))
    return {k: v for k, v in args.items() if valid is None or k in valid}


def experiment_path(name_or_path: str | Path) -> Path:
    """Resolve `golgi_asym` or a path to an experiment YAML; unknown names list the valid ones."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ConfigError(f"experiment file not found: {path}")
        return path
    path = EXPERIMENTS_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise unknown("experiment", str(name_or_path), list_experiments())
    return path


def list_experiments() -> list[str]:
    """Experiment names in ``experiments/`` (files starting with ``_`` are bases, not experiments)."""
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def parent_path(child: Path, parent) -> Path:
    """The file an `extends:` names: next to the child YAML first, then in ``experiments/``."""
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{child}: `extends:` must be one experiment name (a string, e.g. `extends: _base`), "
                          f"got {parent!r}; only one parent is allowed")
    name = parent if parent.endswith((".yaml", ".yml")) else f"{parent}.yaml"
    candidates = [Path(name)] if Path(name).is_absolute() else [child.parent / name, EXPERIMENTS_DIR / name]
    for path in candidates:
        if path.exists():
            return path
    valid = sorted({p.stem for d in (child.parent, EXPERIMENTS_DIR) for p in d.glob("*.yaml")} - {child.stem})
    looked = " and ".join(str(c) for c in candidates)
    raise ConfigError(f"{child}: `extends: {parent}` not found (looked for {looked}).{suggest(parent, valid)} "
                      f"Valid: {', '.join(valid)}")


def load_raw(name_or_path: str | Path) -> dict:
    """Read an experiment YAML and merge it over its `extends:` parent (one level)."""
    path = experiment_path(name_or_path)
    raw = _read_yaml(path)
    if "extends" in raw:
        parent = parent_path(path, raw.pop("extends"))
        base = _read_yaml(parent)
        if "extends" in base:
            raise ConfigError(f"{parent}: only one level of `extends:` is allowed")
        raw = _deep_merge(base, raw)
    raw.setdefault("name", path.stem)
    return raw


def parse_value(text: str) -> Any:
    """`3` -> 3, `1e-3` -> 0.001, `[1,2]` -> list, `null` -> None; anything else (and `6:7`, not base-60 367) a string."""
    if re.fullmatch(r"\s*[-+]?\d+(:\d+)+\s*", text):
        return text.strip()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """Apply dotted `key=value` overrides (``optim.lr=1e-3 data.crop=96``) to a raw config dict."""
    raw = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else (_split(o) for o in overrides)
    for dotted, value in items:
        if isinstance(value, str) and not isinstance(overrides, dict):
            value = parse_value(value)
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key, {}), dict):
                raise ConfigError(f"override {dotted}: '{key}' is not a section")
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw


def _split(override: str) -> tuple[str, str]:
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like key=value (e.g. optim.lr=1e-3)")
    key, value = override.split("=", 1)
    return key.strip(), value


def validate(raw: dict) -> Experiment:
    """Raw dict -> :class:`Experiment`, short errors; ``data.name: [nuclei, er]`` is one multi-target model."""
    data = raw.get("data") if isinstance(raw, dict) else None
    if isinstance(data, dict) and isinstance(data.get("name"), list):
        if not data["name"]:
            raise ConfigError("data.name=[]: name one data module, or a non-empty list of organelles")
        raw = {**raw, "data": {**data, "name": "simulated", "organelle": list(data["name"])}}
    try:
        return Experiment.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                section = _model_at(e["loc"][:-1])
                lines.append(str(unknown("config key", loc, _field_paths(section, e["loc"][:-1]))))
            else:
                msg = e["msg"].removeprefix("Value error, ")
                lines.append(f"{loc}: {msg}" if loc and not msg.startswith(f"unknown {loc}") else msg)
        raise ConfigError("invalid experiment config:\n  " + "\n  ".join(lines)) from None


def _model_at(loc) -> type[BaseModel]:
    model: type[BaseModel] = Experiment
    for part in loc:
        ann = model.model_fields[part].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
    return model


def _field_paths(model: type[BaseModel], loc) -> list[str]:
    prefix = ".".join(str(p) for p in loc)
    return [f"{prefix}.{f}" if prefix else f for f in model.model_fields]


def apply_profile(raw: dict, overrides: list[str] | dict[str, Any] | None = None) -> dict:
    """Merge the profile ``raw["profile"]`` names (from ``raw["profiles"]``), then the overrides again on top."""
    name = raw.get("profile")
    if not name:
        return raw
    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict) or name not in profiles:
        raise unknown("profile", str(name), sorted(profiles) if isinstance(profiles, dict) else [])
    if not isinstance(profiles[name], dict):
        raise ConfigError(f"profile {name}: expected a mapping of config sections, got {profiles[name]!r}")
    return apply_overrides(_deep_merge(raw, profiles[name]), overrides or [])


def load(name_or_path: str | Path, overrides: list[str] | dict | None = None) -> Experiment:
    """Load, merge, override (with a ``profile=...`` applied) and validate an experiment in one call."""
    return validate(apply_profile(apply_overrides(load_raw(name_or_path), overrides or []), overrides))


def to_dict(cfg: Experiment) -> dict:
    """Plain dict of a config (components flattened back to `name + args`), ready for YAML."""
    return cfg.model_dump(mode="json")


def save(cfg: Experiment, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
