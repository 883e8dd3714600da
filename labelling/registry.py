"""Name -> builder tables, one per kind, and `build(kind, name, **args)`.

Entries are ``"module:attribute"`` strings so importing the registry stays cheap (umap, optuna and
wandb load only when used). Tests loop over every table, so a new entry is tested the moment it is added.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from labelling.errors import ConfigError, ImageError, unknown

TABLES: dict[str, dict[str, str]] = {
    "data": {
        "simulated": "labelling.data.datamodule:FluorescenceDataModule",
        "folder": "labelling.data.organelles:FolderDataModule",
        "plate": "labelling.data.platedata:PlateDataModule",  # HCS OME-Zarr plate, read lazily
        "nuclei": "labelling.data.organelles:NucleiDataModule",
        "er": "labelling.data.organelles:ERDataModule",
        "golgi": "labelling.data.organelles:GolgiDataModule",
        "actin": "labelling.data.organelles:ActinDataModule",
        "gfp": "labelling.data.organelles:GFPDataModule",
        "nucleoli": "labelling.data.organelles:NucleoliDataModule",
        "study": "labelling.data.restricted:study_data",  # restricted training data of the training studies
    },
    "task": {
        "stainer": "labelling.tasks.stainer:Stainer",
        "autoencoder": "labelling.tasks.autoencoding:Autoencoding",
    },
    "net": {
        "unet": "labelling.nets.unet:UNet",
        "conv_ae": "labelling.nets.autoencoder:ConvAutoencoder",
        "vae": "labelling.nets.autoencoder:VariationalAutoencoder",
        "monai_basicunet": "labelling.nets.monai_nets:MonaiBasicUNet",
        "monai_unet": "labelling.nets.monai_nets:MonaiUNet",
    },
    "loss": {
        "mse": "labelling.losses.basic:MSELoss",
        "pearson": "labelling.losses.basic:PearsonLoss",
        "bce": "labelling.losses.basic:BCELoss",
        "asymmetric": "labelling.losses.basic:AsymmetricLoss",
        "gradient": "labelling.losses.basic:GradientLoss",
        "spotlight": "labelling.losses.structure:SpotlightLoss",
        "msssim": "labelling.losses.structure:MSSSIMLoss",
        "sum": "labelling.losses:WeightedSum",
        "per_channel": "labelling.losses:PerChannel",
    },
    "optim": {
        "adam": "torch.optim:Adam",
        "adamw": "torch.optim:AdamW",
        "sgd": "torch.optim:SGD",
        "rmsprop": "torch.optim:RMSprop",
    },
    "transform": {  # data.target_transform: applied to each target channel before normalization
        "none": "labelling.analysis.filters:identity",
        "rolling_ball": "labelling.analysis.filters:rolling_ball",
        "golgi_enhance": "labelling.analysis.filters:enhance_golgi",
        "gfp_mask": "labelling.analysis.filters:gfp_mask",
        "denoise_gaussian": "labelling.analysis.filters:denoise_gaussian",  # noise reduction of targets (thesis 6.3.3)
        "denoise_median": "labelling.analysis.filters:denoise_median",
        "denoise_nl_means": "labelling.analysis.filters:denoise_nl_means",
    },
    "callback": {
        "panels": "labelling.callbacks.panels:PredictionPanels",
        "downstream": "labelling.callbacks.analyses:DownstreamEvaluation",
        "ae_samples": "labelling.callbacks.panels:AutoencoderSamples",
        "stability": "labelling.callbacks.analyses:StabilityAnalysis",
        "embeddings": "labelling.callbacks.analyses:EmbeddingAnalysis",
        "drift": "labelling.callbacks.analyses:DriftAnalysis",
        "cost": "labelling.callbacks.analyses:TrainingCost",
        "early_stopping": "lightning.pytorch.callbacks:EarlyStopping",
        "ema": "lightning.pytorch.callbacks:EMAWeightAveraging",  # validate, save and deploy averaged weights
    },
}


def names(kind: str) -> list[str]:
    """Valid names of one kind."""
    if kind not in TABLES:
        raise unknown("component kind", kind, TABLES)
    return sorted(TABLES[kind])


def get(kind: str, name: str):
    """The class or function registered as `name` under `kind`."""
    table = TABLES.get(kind)
    if table is None:
        raise unknown("component kind", kind, TABLES)
    if name not in table:
        raise unknown(f"{kind} name", name, table)
    module, attr = table[name].split(":")
    return getattr(importlib.import_module(module), attr)


def accepted_args(fn) -> list[str] | None:
    """Keyword arguments `fn` accepts; follows ``**kwargs`` of a subclass into its base classes.

    Returns None when anything goes (a plain function with ``**kwargs``).
    """
    chain = [c.__init__ for c in inspect.getmro(fn) if "__init__" in vars(c)] if inspect.isclass(fn) else [fn]
    valid: list[str] = []
    for f in chain:
        params = inspect.signature(f).parameters
        valid += [n for n, p in params.items()
                  if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in valid]
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return valid
    return None if not inspect.isclass(fn) else valid


def check_args(fn, args: dict[str, Any], where: str) -> None:
    """Refuse arguments that `fn` does not take, listing the ones it does."""
    valid = accepted_args(fn)
    if valid is None:
        return
    for key in args:
        if key not in valid:
            raise unknown(f"argument of {where}", key, valid)


def build(kind: str, name: str, **args):
    """Instantiate a registered component, with clear errors for unknown names, arguments and values.

    A builder's ``TypeError`` or ``ValueError`` (a bad argument value) becomes a ConfigError that names the
    component; an ImageError (a bad file) passes unchanged. A net or loss that does not meet its contract
    (:mod:`labelling.contracts`) is a ConfigError naming what it lacks.
    """
    fn = get(kind, name)
    check_args(fn, args, f"{kind} '{name}'")
    try:
        built = fn(**args)
    except ImageError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{kind} '{name}': {err}") from err
    if kind in ("net", "loss"):  # every table entry meets its declared contract, or is refused here
        from labelling import contracts

        contracts.check(kind, built)
    return built
