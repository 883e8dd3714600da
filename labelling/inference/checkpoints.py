"""Checkpoint loading with clear errors (rebuilding a task from one: :func:`labelling.build.load_task`).

Checkpoints are loaded weights-only (``torch.load(..., weights_only=True)``): tensors and plain data
(dicts, lists, strings, numbers) only, so a crafted ``.ckpt`` cannot run code in ``predict``, ``evaluate``,
the app or a resume. Labelling checkpoints need nothing more: the experiment config travels as a plain dict
(``labelling_config``) and Lightning's own entries are plain data too.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from labelling.errors import CheckpointError

__all__ = ["CheckpointError", "check_checkpoint"]


def _refusal(path: Path, err: Exception) -> CheckpointError:
    """Error for a checkpoint the weights-only loader refuses; names the file and the offending object."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"(Unsupported [^\n]+)", text)
    what = f" ({found.group(1)})" if found else ""
    return CheckpointError(
        f"checkpoint {path} refused: it needs more than tensors and plain data to load{what}, i.e. it could run "
        "code. Labelling checkpoints never do; use a checkpoint written by `labelling train` from a trusted source")


def check_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint on CPU, weights-only, and verify it is a labelling checkpoint; returns it.

    Raises:
        CheckpointError: missing, truncated or corrupted file, one that holds Python objects beyond tensors and
            plain data (refused without running anything), or one not written by labelling.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give a .ckpt file or a run folder to load_task")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "unsupported" in str(err).lower():
            raise _refusal(path, err) from None
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({type(err).__name__}: {err}); "
                              "delete it to start over or point to another one") from err
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({type(err).__name__}: {err}); "
                              "delete it to start over or point to another one") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    if not isinstance(ckpt.get("labelling_config"), dict):
        raise CheckpointError(f"{path} has no embedded labelling config; was it written by labelling?")
    return ckpt
