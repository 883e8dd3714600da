"""Fine-tuning: a run that starts from a trained model's weights (``init: {from: RUN | export | BMZ package}``).

The everyday case in cell line development: a model trained on one cell line, adapted with a few fields of a
new one. :func:`apply_init` runs before the data are set up: it loads the source net's weights into the new
net where every layer matches (a mismatch is an error naming the layers, never a silent partial load), keeps
the source's input normalization unless ``init.normalization: own`` (so the fine-tuned net sees inputs as the
source did), optionally freezes the encoder, and returns the lineage record that the new model's
``Deployment.lineage`` carries into its checkpoints and exports.
"""

from __future__ import annotations

from pathlib import Path

from labelling import config
from labelling.deployment import Deployment
from labelling.errors import ConfigError
from labelling.inference.load import (
    WEIGHTS_FILE,
    checkpoint_path,
    fingerprint,
    is_export,
    load_task,
    read_weights,
    verify_export,
)

SHOWN = 6  # layer names listed in a mismatch error


def source_weights(path: str | Path) -> tuple[dict, Deployment, str]:
    """(net state dict, deployment state, SHA-256 of the weights file) of a run, checkpoint, export or BMZ package."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"init.from={path}: no such run, checkpoint or export")
    folder = path if path.is_dir() else path.parent
    if is_export(path):
        import json

        manifest = verify_export(folder)
        state = json.loads((folder / "deployment.json").read_text())
        dep = Deployment.from_dict(state["deployment"], str(folder / "deployment.json"))
        return read_weights(folder / WEIGHTS_FILE), dep, manifest["files"].get(WEIGHTS_FILE, "")
    task, _ = load_task(path)
    return task.net.state_dict(), task.deployment, fingerprint(checkpoint_path(path))


def apply_init(cfg: config.Experiment, dm, task) -> dict | None:
    """Start `task` from ``cfg.init``'s model (before the data are set up); returns the lineage record or None."""
    if not cfg.init.source:
        return None
    source = cfg.init.source
    state, dep, digest = source_weights(source)
    target = task.net.state_dict()
    different = [k for k in target if k not in state or tuple(state[k].shape) != tuple(target[k].shape)]
    extra = [k for k in state if k not in target]
    if different or extra:
        shown = [f"{k} {tuple(state[k].shape) if k in state else 'missing'} -> {tuple(target[k].shape)}"
                 for k in different[:SHOWN]] + [f"{k} (not in the new net)" for k in extra[:SHOWN]]
        raise ConfigError(f"init.from={source}: the nets differ in {len(different) + len(extra)} layer(s): "
                          + "; ".join(shown) + ". Use the source's net settings (net.name, width, depth) and "
                          "channel counts")
    task.net.load_state_dict(state)
    if cfg.init.normalization == "source":
        dm.keep_input_normalization(dep.normalize, dep.input_stats, dep.flatfield)
    if cfg.init.freeze_encoder:
        prefixes = getattr(task.net, "encoder_prefixes", None)
        if not prefixes:
            raise ConfigError(f"init.freeze_encoder: net {type(task.net).__name__} does not declare its encoder "
                              "(encoder_prefixes); train all layers or use unet / monai_basicunet")
        for name, param in task.net.named_parameters():
            if name.startswith(tuple(prefixes)):
                param.requires_grad_(False)
    return {"source": str(Path(source).resolve()), "sha256": digest,
            "normalization": cfg.init.normalization, "freeze_encoder": cfg.init.freeze_encoder,
            "lineage": list(dep.lineage)}
