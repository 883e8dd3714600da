"""Writes that appear complete or not at all: a temporary sibling, then one rename.

Every writer of labelling (prediction OME-TIFFs, plates, exports, checkpoints, sweep summaries, manifests)
goes through these two functions, so an interrupted write never leaves something that loads, and two
writers - even in one process - never share a temporary name.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def sibling(path: str | Path, kind: str = "partial") -> Path:
    """A hidden, unique sibling of `path` (``.<name>.<pid>.<random>.<kind>``) on the same file system."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{kind}")


def write_file(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary_path)`` and rename the result onto `path`; nothing is left on failure."""
    path = Path(path)
    partial = sibling(path)
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def replace_folder(staging: str | Path, target: str | Path) -> None:
    """Rename a finished folder onto `target`; an existing target is moved aside first and removed after."""
    staging, target = Path(staging), Path(target)
    old = sibling(target, "old")
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
