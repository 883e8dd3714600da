"""Cascades: predictions of other trained runs as extra input channels (thesis 5.3, 7.4).

``data: {cascade: [runs/nuclei, runs/actin]}`` appends, to every field's raw input, what those runs predict
from it - through :func:`labelling.inference.predict.append_cascade`, the deployed path, in their target units. The model
stores the run paths (``deploy["cascade"]``) and :func:`labelling.inference.predict.network_output` computes the same
channels from a new raw image, so a cascade is deployed exactly as it was trained.
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


def load(paths: list[str]) -> list:
    """The trained tasks of a cascade, in eval mode."""
    from labelling.build import load_task  # late: building sits above the data layer

    return [load_task(path)[0] for path in paths]


def channels(tasks: list) -> int:
    """Extra input channels a cascade adds."""
    return sum(task.net.out_channels for task in tasks)


def names(paths: list[str], tasks: list) -> list[str]:
    """Names of the extra channels: ``<run folder>:<target channel>``."""
    from labelling.inference.predict import deployment

    return [f"{Path(path).name}:{target}" for path, task in zip(paths, tasks)
            for target in (deployment(task).get("targets") or ["prediction"])[: task.net.out_channels]]
