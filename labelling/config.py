"""Experiment configuration: a pydantic schema, YAML loading with one `extends:`, dotted overrides.

An experiment YAML has the top keys ``seed, data, net, loss, optim, trainer, callbacks, logger``. Each
component is ``{name: <short name>, ...arguments}``; the arguments are checked against the builder's
signature by :mod:`labelling.registry`, so a typo anywhere names the valid choices before training starts.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = ROOT / "experiments"
SWEEPS_DIR = ROOT / "sweeps"


class ConfigError(ValueError):
    """A configuration mistake, with a message that says how to fix it."""


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown(kind: str, word: str, choices) -> ConfigError:
    """Build the error for an unknown key or name, listing the valid ones."""
    choices = sorted(str(c) for c in choices)
    return ConfigError(f"unknown {kind} '{word}'.{_suggest(word, choices)} Valid: {', '.join(choices)}")


class Component(BaseModel):
    """`name:` of a registered builder plus its keyword arguments (checked at build time)."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimConfig(BaseModel):
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


class LoggerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    wandb: bool = True
    project: str = "labelling"
    entity: str | None = None
    group: str | None = None
    tensorboard: bool = False
    panels: int = Field(4, ge=0)  # prediction panels saved as PNG at the end of a run


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
    task: Component = Component(name="stainer")
    data: Component
    net: Component = Component(name="unet")
    loss: Component = Component(name="mse")
    optim: OptimConfig = OptimConfig()
    trainer: TrainerConfig = TrainerConfig()
    callbacks: list[Component] = []
    logger: LoggerConfig = LoggerConfig()

    @model_validator(mode="after")
    def _cross_checks(self):
        # CAREamics-style: catch crop/depth mismatches before any data is built.
        crop = self.data.args.get("crop", 64)
        depth = self.net.args.get("depth", 3)
        if self.net.name in ("unet", "conv_ae", "vae") and isinstance(crop, int) and crop % (2**depth):
            raise ValueError(
                f"data.crop={crop} is not divisible by 2**net.depth={2 ** depth}; "
                f"use a crop that is a multiple of {2 ** depth} or a smaller depth"
            )
        if self.monitor_mode not in ("min", "max"):
            raise ValueError(f"monitor_mode must be 'min' or 'max', got {self.monitor_mode!r}")
        return self


# --------------------------------------------------------------------------- loading and overrides

def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, val in over.items():
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            parent = out[key]
            if "name" in val and val["name"] != parent.get("name"):
                parent = _keep_accepted(key, val["name"], parent)
            out[key] = _deep_merge(parent, val)
        else:
            out[key] = copy.deepcopy(val)
    return out


def _keep_accepted(kind: str, name: str, args: dict) -> dict:
    """A component switched to another `name:` keeps only the inherited arguments the new one accepts."""
    from labelling import registry  # late: registry imports this module

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
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def load_raw(name_or_path: str | Path) -> dict:
    """Read an experiment YAML and merge it over its `extends:` parent (one level)."""
    path = experiment_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    parent = raw.pop("extends", None)
    if parent:
        parent_path = path.parent / (parent if parent.endswith(".yaml") else f"{parent}.yaml")
        base = yaml.safe_load(parent_path.read_text()) or {}
        if "extends" in base:
            raise ConfigError(f"{parent_path}: only one level of `extends:` is allowed")
        raw = _deep_merge(base, raw)
    raw.setdefault("name", path.stem)
    return raw


def parse_value(text: str) -> Any:
    """`3` -> 3, `1e-3` -> 0.001, `[1,2]` -> list, `null` -> None, anything else stays a string."""
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
    """Turn a raw dict into an :class:`Experiment`, rewriting pydantic errors into short, helpful ones."""
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
                lines.append(f"{loc or 'config'}: {e['msg']}")
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


def load(name_or_path: str | Path, overrides: list[str] | dict | None = None) -> Experiment:
    """Load, merge, override and validate an experiment in one call."""
    return validate(apply_overrides(load_raw(name_or_path), overrides or []))


def to_dict(cfg: Experiment) -> dict:
    """Plain dict of a config (components flattened back to `name + args`), ready for YAML."""
    return cfg.model_dump(mode="json")


def save(cfg: Experiment, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
