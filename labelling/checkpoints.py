"""Checkpoint loading with clear errors, and rebuilding a trained task from its embedded config."""

from __future__ import annotations

from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A missing, truncated or foreign checkpoint; the message names the file."""


def check_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint on CPU and verify it is a labelling checkpoint; returns it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({type(err).__name__}: {err}); "
                              "delete it to start over or point to another one") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    if "labelling_config" not in ckpt:
        raise CheckpointError(f"{path} has no embedded labelling config; was it written by labelling?")
    return ckpt


def load_task(path: str | Path):
    """Rebuild the Stainer (net + loss from the embedded config) and load its weights, in eval mode."""
    from labelling import config as C

    path = Path(path)
    if path.is_dir():  # a run folder
        for name in ("checkpoints/best.ckpt", "checkpoints/last.ckpt"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise CheckpointError(f"no checkpoints/best.ckpt or last.ckpt under run folder {path}")
    ckpt = check_checkpoint(path)
    cfg = C.validate(ckpt["labelling_config"])
    io = ckpt.get("labelling_io", {"in": 1, "out": 1})
    from labelling.train import build_task

    task = build_task(cfg, io["in"], io["out"])
    task.load_state_dict(ckpt["state_dict"])
    return task.eval(), cfg
