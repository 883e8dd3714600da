"""Write the deployed net as a file (ONNX, TorchScript for Fiji) with the state that makes it predict like the run.

An export folder holds the network file, ``weights.pt`` (the net's weights as plain tensors),
``deployment.json`` (the typed :class:`~labelling.deployment.Deployment` and the training config) and, written
last, ``manifest.json`` with every file's SHA-256 and the run's checkpoint hash. The loader
(:func:`labelling.inference.load.load`) verifies the manifest and runs the ONNX file through ONNX Runtime or
rebuilds the net from the config and ``weights.pt``; it never loads the TorchScript archive, which is code.

The network file takes ``(B, Cin, H, W)`` *normalized* inputs with any batch size and H, W multiples of the
net's ``spatial_multiple`` and returns ``prediction`` (the activated output, before de-normalization) and
``embedding`` (the bottleneck feature map averaged over space, for the drift check).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from labelling import config
from labelling.data.atomic import write_file
from labelling.deployment import Deployment
from labelling.errors import ExportError, redact_obj
from labelling.inference.load import MANIFEST, STATE_FILE, STATE_VERSION, WEIGHTS_FILE, fingerprint, onnx_runner

INPUT, OUTPUTS = "input", ("prediction", "embedding")
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}

__all__ = ["Deployed", "ExportError", "check_exportable", "export_state", "export_onnx", "export_torchscript",
           "compare", "onnx_runner", "write_state", "write_manifest"]


class Deployed(nn.Module):
    """The net plus its output activation: normalized input -> (prediction, embedding).

    Args:
        net: the trained image-to-image net (``forward(x, return_embedding=True)`` -> (y, embedding)).
        deployment: its deployment state (the activation rule).
        embedding: also return the bottleneck embedding.
    """

    def __init__(self, net: nn.Module, deployment: Deployment, embedding: bool = True):
        super().__init__()
        self.net, self.sigmoid, self.embedding = net, deployment.activation == "sigmoid", embedding

    def forward(self, x: torch.Tensor):
        """(B, Cin, H, W), H and W multiples of the net's spatial multiple -> (B, Cout, H, W) [and (B, D)]."""
        y, emb = self.net(x, return_embedding=True)
        y = torch.sigmoid(y) if self.sigmoid else y
        return (y, emb) if self.embedding else y


def check_exportable(task) -> None:
    """Refuse what the export cannot carry: a task without deployment state or a net without embeddings."""
    dep = getattr(task, "deployment", None)
    if not isinstance(dep, Deployment):
        raise ExportError(f"only virtual-staining runs (task 'stainer') can be exported, not {type(task).__name__}")
    if dep.cascade:
        raise ExportError("this model takes other runs' predictions as input channels (data.cascade); an export "
                          "would carry its net only and expect those channels from the user - predict from the "
                          "run instead, or export each run of the cascade and combine them yourself")
    net, multiple = task.net, dep.spatial_multiple
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, net.in_channels, 4 * multiple, 6 * multiple), return_embedding=True)
    except TypeError as err:
        raise ExportError(f"net {type(net).__name__} does not return an embedding; it cannot be exported") from err
    except (ValueError, RuntimeError) as err:  # fixed-size nets (the autoencoders) refuse other sizes
        raise ExportError(f"net {type(net).__name__} does not take images of any size ({err}); "
                          "it cannot be exported for whole-image prediction") from err
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ExportError(f"net {type(net).__name__} does not return (prediction, embedding); it cannot be exported")


def export_state(task, cfg) -> dict:
    """What ``deployment.json`` holds: the typed deployment state, the training config, the crop side."""
    return {
        "format_version": STATE_VERSION,
        "deployment": task.deployment.to_dict(),
        "crop": int(cfg.data.args.get("crop", 64)),
        "experiment": cfg.name,
        "config": redact_obj(config.to_dict(cfg)),  # exports are shared: no passwords or API keys
        "torch_version": torch.__version__,
    }


def _example(dep: Deployment, batch: int = 2, height: int = 96, width: int = 128, seed: int = 0) -> torch.Tensor:
    """A seeded random normalized input, sides rounded up to multiples of the net's spatial multiple."""
    m = dep.spatial_multiple
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dep.in_channels, -(-height // m) * m, -(-width // m) * m, generator=gen)


def export_onnx(task, path: Path, opset: int = 18, embedding: bool = True) -> Path:
    """Write the deployed net as ONNX with dynamic batch, height and width (multiples of the spatial multiple)."""
    dep = task.deployment
    module = Deployed(task.net, dep, embedding).eval()
    m = dep.spatial_multiple
    height, width = torch.export.Dim("height", min=1, max=8192 // m), torch.export.Dim("width", min=1, max=8192 // m)
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=4096), 2: m * height, 3: m * width}}
    outputs = list(OUTPUTS if embedding else OUTPUTS[:1])
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it lists every torchvision op it skips
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (_example(dep),), str(path), dynamo=True, dynamic_shapes=shapes,
                              input_names=[INPUT], output_names=outputs, opset_version=opset,
                              external_data=False, verbose=False)
    finally:
        quiet.setLevel(level)
    import onnx

    onnx.checker.check_model(str(path))
    return path


def export_torchscript(task, path: Path, embedding: bool = True) -> dict:
    """Write the deployed net traced to TorchScript (for Fiji/deepImageJ); returns its check against torch.

    The traced module is compared in memory, before it is written: labelling never loads a TorchScript file.
    """
    dep = task.deployment
    module = Deployed(task.net, dep, embedding).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracing is deprecated and warns on every Python branch
        traced = torch.jit.trace(module, _example(dep), check_trace=False)
    def run(x):
        with torch.no_grad():
            return [o.numpy() for o in _tuple(traced(torch.from_numpy(x)))]

    checks = compare(task, run, embedding)
    traced.save(str(path))
    return checks


def _tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def compare(task, run, embedding: bool = True, repeats: int = 3) -> dict:
    """Exported vs torch net on a seeded random input: largest absolute difference and times per forward."""
    dep = task.deployment
    x = _example(dep, batch=2, height=256, width=192, seed=1)  # not the traced size: the shapes are dynamic
    module = Deployed(task.net, dep, embedding=embedding).eval()
    with torch.no_grad():
        exported, reference = [np.asarray(o) for o in run(x.numpy())], [o.numpy() for o in _tuple(module(x))]
    torch_s, exported_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            module(x)
        torch_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        run(x.numpy())
        exported_s.append(time.perf_counter() - start)
    diffs = [float(np.abs(a - b).max()) for a, b in zip(exported, reference)]
    return {"input_shape": list(x.shape), "max_abs_diff": diffs[0],
            "embedding_max_abs_diff": diffs[1] if len(diffs) > 1 else None,
            "torch_ms": 1e3 * min(torch_s), "exported_ms": 1e3 * min(exported_s)}


def write_weights(task, out: Path) -> Path:
    """The net's state dict as plain tensors (loads weights-only): what labelling rebuilds a net from."""
    path = Path(out) / WEIGHTS_FILE
    torch.save({k: v.detach().cpu().contiguous() for k, v in task.net.state_dict().items()}, path)
    return path


def write_state(out: Path, state: dict) -> Path:
    """Write ``deployment.json`` into `out`."""
    path = Path(out) / STATE_FILE
    path.write_text(json.dumps(state, indent=1, default=float) + "\n")
    return path


def write_manifest(out: Path, run_checkpoint: str | Path | None) -> Path:
    """Write ``manifest.json`` last: every file of the export with its SHA-256, and the checkpoint it came from.

    Written to a temporary name and renamed, so a folder without a complete manifest is never taken for a
    complete export.
    """
    out = Path(out)
    files = {p.name: fingerprint(p) for p in sorted(out.iterdir()) if p.is_file() and p.name != MANIFEST
             and not p.name.startswith(".")}
    manifest = {"format_version": STATE_VERSION, "files": files,
                "checkpoint": {"path": str(run_checkpoint) if run_checkpoint else None,
                               "sha256": fingerprint(run_checkpoint) if run_checkpoint else None}}
    return write_file(out / MANIFEST, lambda partial: partial.write_text(json.dumps(manifest, indent=1) + "\n"))
