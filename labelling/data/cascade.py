"""Cascades: predictions of other trained runs as extra input channels (thesis 5.3, 7.4).

``data: {cascade: [runs/nuclei, runs/actin]}`` appends, to every field's raw input, what those runs predict
from it - through the deployed path, in their target units. The loader (:func:`labelling.inference.load.
build_run`) loads the runs and hands them to the data module; the model stores the run paths
(``Deployment.cascade``) and the one prediction path computes the same channels from a new raw image, so a
cascade is deployed exactly as it was trained.
"""

from __future__ import annotations

from pathlib import Path

from labelling.errors import CheckpointError


def resolve(paths: list[str] | None) -> list[str]:
    """Absolute run paths of a cascade; a missing one is a clear error naming it."""
    out = []
    for path in paths or []:
        full = Path(path).expanduser().resolve()
        if not full.exists():
            raise CheckpointError(f"data.cascade: {path} does not exist; train that run first (or give its folder)")
        out.append(str(full))
    return out


def channels(models: list) -> int:
    """Extra input channels a cascade adds."""
    return sum(model.out_channels for model in models)


def names(paths: list[str], models: list) -> list[str]:
    """Names of the extra channels: ``<run folder>:<target channel>``."""
    return [f"{Path(path).name}:{target}" for path, model in zip(paths, models)
            for target in model.targets[: model.out_channels]]
