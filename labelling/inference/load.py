"""THE loader: a run folder, a checkpoint or an export -> one typed :class:`~labelling.inference.model.Model`.

Nothing it loads can run code:

* checkpoints are read weights-only (``torch.load(..., weights_only=True)``: tensors and plain data), and
  the net is rebuilt from the experiment config stored inside;
* an export folder is verified against its ``manifest.json`` (every file's SHA-256, written last by
  ``labelling export``, so an interrupted or mixed folder is refused) and run through ONNX Runtime, or,
  for a TorchScript export, rebuilt from its config and its weights-only ``weights.pt``. A TorchScript
  archive is code (``torch.jit.load`` runs what it holds): labelling never loads one; it is written for
  Fiji/deepImageJ only.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from labelling import build, config
from labelling.deployment import Deployment
from labelling.errors import CheckpointError, ExportError
from labelling.inference.model import Model

STATE_FILE, MANIFEST = "deployment.json", "manifest.json"
STATE_VERSION = 2
WEIGHTS_FILE = "weights.pt"  # the net's state dict (tensors only), in every onnx/torchscript export
LEGACY_BUFFERS = ("target_stats", "input_stats", "null_level")

__all__ = ["CheckpointError", "ExportError", "check_checkpoint", "fingerprint", "is_export", "load",
           "load_cascade", "load_task"]


# ----------------------------------------------------------------------------------- checkpoints
def _refusal(path: Path, err: Exception) -> CheckpointError:
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"(Unsupported [^\n]+)", text)
    what = f" ({found.group(1)})" if found else ""
    return CheckpointError(
        f"checkpoint {path} refused: it needs more than tensors and plain data to load{what}, i.e. it could run "
        "code. Labelling checkpoints never do; use a checkpoint written by `labelling train` from a trusted source")


def read_weights(path: str | Path) -> dict:
    """``torch.load`` weights-only on CPU, with errors that name the file (a refusal never runs anything)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give a .ckpt file or a run folder")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "unsupported" in str(err).lower():
            raise _refusal(path, err) from None
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({type(err).__name__}: {err}); "
                              "delete it to start over or point to another one") from err
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({type(err).__name__}: {err}); "
                              "delete it to start over or point to another one") from err


def check_checkpoint(path: str | Path) -> dict:
    """Load a labelling checkpoint on CPU, weights-only; returns it.

    Raises:
        CheckpointError: missing, truncated or corrupted file, one that holds Python objects beyond tensors and
            plain data (refused without running anything), or one not written by labelling.
    """
    ckpt = read_weights(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    if not isinstance(ckpt.get("labelling_config"), dict):
        raise CheckpointError(f"{path} has no embedded labelling config; was it written by labelling?")
    return ckpt


def checkpoint_path(path: str | Path) -> Path:
    """The checkpoint of a run folder (``best.ckpt``, else ``last.ckpt``) or the file itself."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in ("checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        if (path / name).exists():
            return path / name
    raise CheckpointError(f"no checkpoints/best.ckpt or last.ckpt under run folder {path}")


def fingerprint(path: str | Path) -> str:
    """SHA-256 of a file (what a prediction records as the model it came from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _migrate(task, state_dict: dict) -> dict:
    """Version-1 checkpoints kept the statistics as buffers and the settings as a plain dict."""
    if not all(k in state_dict for k in LEGACY_BUFFERS):
        return state_dict
    state_dict = dict(state_dict)
    buffers = {k: state_dict.pop(k) for k in LEGACY_BUFFERS}
    extra = state_dict.pop("_extra_state", None) or {}
    state_dict["_extra_state"] = Deployment.from_legacy(extra, buffers, task.net, task.loss.activation).to_dict()
    return state_dict


def load_task(path: str | Path, _seen: tuple[str, ...] = ()):
    """Rebuild the trained task of a checkpoint or run folder (net + loss from its config), in eval mode.

    Returns:
        (task, validated config). The task's ``cascade_models`` hold its cascade's models.

    Raises:
        CheckpointError: no checkpoint in the run folder, or one that is unreadable, not labelling's, or
            whose cascade cannot be loaded (or lists itself).
    """
    path = checkpoint_path(path)
    ckpt = check_checkpoint(path)
    try:
        cfg = config.validate(ckpt["labelling_config"])
    except config.ConfigError as err:
        raise CheckpointError(f"{path}: its embedded config does not validate: {err}") from err
    io = ckpt.get("labelling_io", {"in": 1, "out": 1})
    task = build.build_task(cfg, io["in"], io["out"])
    state_dict = _migrate(task, ckpt["state_dict"])
    try:
        task.load_state_dict(state_dict)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: its weights do not fit the net its config builds: {err}") from None
    cascade = task.deployment.cascade if getattr(task, "deployment", None) else []
    task.cascade_models = load_cascade(cascade, (*_seen, str(path.resolve())))
    return task.eval(), cfg


def load_cascade(paths: list[str], _seen: tuple[str, ...] = ()) -> list[Model]:
    """The models of a cascade (run folders whose predictions are extra input channels), in order."""
    models = []
    for run in paths or []:
        try:
            target = str(checkpoint_path(run).resolve())
        except CheckpointError as err:
            raise CheckpointError(f"a run of the cascade cannot be loaded ({err}); the model needs it") from None
        if target in _seen:
            raise CheckpointError(f"cascade cycle: {run} takes its own prediction as input "
                                  f"({' -> '.join([*_seen, target])})")
        task, cfg = load_task(run, (*_seen, target))
        models.append(Model.from_task(task, source=str(run), config=cfg))
    return models


# ----------------------------------------------------------------------------------- exports
def is_export(path: str | Path) -> bool:
    """Whether `path` is an export folder (or a network file inside one)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return (folder / STATE_FILE).is_file() or (folder / MANIFEST).is_file()


def _inside(folder: Path, name: str) -> Path:
    """`folder/name`, refusing names that leave the folder (``../x``, absolute paths, links out)."""
    target = (folder / name).resolve()
    if Path(name).is_absolute() or folder.resolve() not in target.parents:
        raise ExportError(f"{folder}: the export names a file outside its folder ({name!r}); refused")
    return target


def verify_export(folder: Path) -> dict:
    """The export's manifest, after checking every listed file's SHA-256 (and that nothing is missing)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ExportError(f"{folder}: no {MANIFEST}: the export is incomplete (interrupted?) or was written "
                          "by an older labelling; export the run again")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = dict(manifest["files"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ExportError(f"{manifest_path}: unreadable manifest ({type(err).__name__}: {err})") from None
    for name, digest in files.items():
        target = _inside(folder, name)
        if not target.is_file():
            raise ExportError(f"{folder}: {name} is listed in the manifest but missing; export the run again")
        if fingerprint(target) != digest:
            raise ExportError(f"{folder}: {name} does not match the manifest (changed or from another export); "
                              "export the run again into an empty folder")
    return manifest


def onnx_runner(path: Path, threads: int | None = None):
    """(B, Cin, h, w) array or tensor -> the exported network's outputs (CPU tensors), through ONNX Runtime."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ExportError(f"{path}: running an exported model needs {err.name}: pip install 'labelling[export]'") from None
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    available = onnxruntime.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # a truncated or foreign file
        raise ExportError(f"{path}: cannot load the exported network ({type(err).__name__}: {err})") from None
    name = session.get_inputs()[0].name

    def run(x):
        x = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
        return [torch.from_numpy(o) for o in session.run(None, {name: np.ascontiguousarray(x, np.float32)})]

    return run


def load_export(path: str | Path, threads: int | None = None) -> Model:
    """The model of an export folder (or a network file in one), verified, without running stored code."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such exported model (file or folder)")
    folder = path if path.is_dir() else path.parent
    manifest = verify_export(folder)
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        dep = Deployment.from_dict(state["deployment"], str(folder / STATE_FILE))
        cfg = config.validate(state["config"])
    except (json.JSONDecodeError, KeyError, TypeError, OSError) as err:
        raise ExportError(f"{folder / STATE_FILE}: unreadable deployment state ({type(err).__name__}: {err})") from None
    except (CheckpointError, config.ConfigError) as err:
        raise ExportError(f"{folder / STATE_FILE}: {err}") from None
    source, digest = str(path), manifest["files"].get(state.get("model", ""), "")
    if state.get("model", "").endswith(".onnx"):
        run = onnx_runner(_inside(folder, state["model"]), threads)
        return Model(dep, forward=lambda x: run(x)[0], embedder=lambda x: _second(run(x), folder),
                     source=source, fingerprint=digest, config=cfg, activated=True)
    weights = _inside(folder, WEIGHTS_FILE)
    if not weights.is_file():
        raise ExportError(f"{folder}: no {WEIGHTS_FILE} beside the network; labelling does not load TorchScript "
                          "archives (they can run code): export the run again, or use --format onnx")
    task = build.build_task(cfg, dep.in_channels, dep.out_channels)
    try:
        task.net.load_state_dict(read_weights(weights))
    except RuntimeError as err:
        raise ExportError(f"{weights}: the weights do not fit the net of the stored config: {err}") from None
    task.deployment = dep
    return Model.from_task(task.eval(), source=source, fingerprint=manifest["files"].get(WEIGHTS_FILE, ""),
                           config=cfg)


def _second(outputs: list, folder: Path):
    if len(outputs) < 2:
        raise ExportError(f"{folder} was exported without its embedding output; export the run again")
    return outputs[1]


def load(path: str | Path, threads: int | None = None) -> Model:
    """The one loader: a run folder, a ``.ckpt``, an export folder or a network file inside one -> Model."""
    if is_export(path) or Path(path).suffix in (".onnx", ".pt"):
        return load_export(path, threads)
    ckpt = checkpoint_path(path)
    task, cfg = load_task(ckpt)
    return Model.from_task(task, source=str(path), fingerprint=fingerprint(ckpt), config=cfg)


# ----------------------------------------------------------------------------------- cascades
class CascadeInputs:
    """The loaded models of ``data.cascade``; calling it appends their predictions of a raw input to it."""

    def __init__(self, models: list[Model]):
        self.models = list(models)

    def __call__(self, raw: np.ndarray, name: str = "image") -> np.ndarray:
        from labelling.inference.predict import append_cascade

        return append_cascade(self.models, raw, name)


def build_run(cfg: config.Experiment):
    """(datamodule, task) of a config, with the runs of its ``data.cascade`` loaded (see :func:`labelling.build.build`)."""
    paths = cfg.data.args.get("cascade") or []
    from labelling.data.cascade import resolve

    return build.build(cfg, CascadeInputs(load_cascade(resolve(paths))) if paths else None)
