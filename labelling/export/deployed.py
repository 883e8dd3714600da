"""The deployed net as a file (ONNX or TorchScript) and the state that makes it predict like the run.

An export is a folder holding the network file and ``deployment.json``: the normalization rule and
statistics, the de-normalization, the null level, the output activation, channel names and the net's
depth. :func:`load_exported` rebuilds from them an :class:`ExportedTask`, a stand-in for the trained
``Stainer`` that :func:`labelling.inference.predict.predict` accepts unchanged, so an exported model predicts through
the one prediction path (binning, normalization, tiling, blending, de-normalization) like the run did.

The network file takes ``(B, Cin, H, W)`` *normalized* inputs with any batch size and H, W multiples of
``2**depth`` (the tiled predictor only sends such tiles; :class:`ExportedTask` pads other sizes exactly as
the torch net does) and returns ``prediction`` (the activated output, before de-normalization) and
``embedding`` (the bottleneck feature map averaged over space, for the drift check).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from labelling import config
from labelling.errors import UserError, redact_obj
from labelling.inference import predict

STATE_FILE = "deployment.json"
STATE_VERSION = 1
INPUT, OUTPUTS = "input", ("prediction", "embedding")
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}


class ExportError(UserError, ValueError):
    """A run that cannot be exported, or an export folder that cannot be loaded; the message says why."""


class Deployed(nn.Module):
    """The net plus its output activation: normalized input -> (prediction, embedding).

    Args:
        net: the trained image-to-image net (``forward(x, return_embedding=True)`` -> (y, embedding)).
        activation: ``"sigmoid"`` for logit losses, None otherwise.
        embedding: also return the bottleneck embedding.
    """

    def __init__(self, net: nn.Module, activation: str | None = None, embedding: bool = True):
        super().__init__()
        self.net, self.sigmoid, self.embedding = net, activation == "sigmoid", embedding

    def forward(self, x: torch.Tensor):
        """(B, Cin, H, W), H and W multiples of 2**depth -> (B, Cout, H, W) [and (B, D)]."""
        y, emb = self.net(x, return_embedding=True)
        y = torch.sigmoid(y) if self.sigmoid else y
        return (y, emb) if self.embedding else y


def check_exportable(task) -> None:
    """Refuse what the export cannot carry: a task without deployment state or a net without embeddings."""
    if not hasattr(task, "target_stats") or not hasattr(task, "deploy"):
        raise ExportError(f"only virtual-staining runs (task 'stainer') can be exported, not {type(task).__name__}")
    if (task.deploy or {}).get("cascade"):
        raise ExportError("this model takes other runs' predictions as input channels (data.cascade); an export "
                          "would carry its net only and expect those channels from the user - predict from the "
                          "run instead, or export each run of the cascade and combine them yourself")
    net = task.net
    multiple = 2 ** getattr(net, "depth", 0)
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


def deployment_state(task, cfg) -> dict:
    """Everything :func:`labelling.inference.predict.predict` reads from a task, as plain JSON-able data."""
    net = task.net
    return {
        "format_version": STATE_VERSION,
        "deploy": predict.deployment(task),
        "input_stats": task.input_stats.detach().cpu().tolist(),
        "target_stats": task.target_stats.detach().cpu().tolist(),
        "null_level": task.null_level.detach().cpu().tolist(),
        "activation": getattr(task.loss, "activation", None),
        "in_channels": int(net.in_channels), "out_channels": int(net.out_channels),
        "depth": int(getattr(net, "depth", 0)), "multiple": 2 ** int(getattr(net, "depth", 0)),
        "inputs": list(predict.deployment(task).get("inputs") or []),
        "targets": list(predict.deployment(task).get("targets") or []),
        "crop": int(cfg.data.args.get("crop", 64)),
        "experiment": cfg.name,
        "config": redact_obj(config.to_dict(cfg)),  # exports are shared: no passwords or API keys
        "torch_version": torch.__version__,
    }


def _example(state: dict, batch: int = 2, height: int = 96, width: int = 128, seed: int = 0) -> torch.Tensor:
    """A seeded random normalized input, sides rounded up to multiples of the net's 2**depth."""
    m = state["multiple"]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, state["in_channels"], -(-height // m) * m, -(-width // m) * m, generator=gen)


def export_onnx(task, state: dict, path: Path, opset: int = 18, embedding: bool = True) -> Path:
    """Write the deployed net as ONNX with dynamic batch, height and width (multiples of 2**depth)."""
    module = Deployed(task.net, state["activation"], embedding).eval()
    m = state["multiple"]
    height, width = torch.export.Dim("height", min=1, max=8192 // m), torch.export.Dim("width", min=1, max=8192 // m)
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=4096), 2: m * height, 3: m * width}}
    outputs = list(OUTPUTS if embedding else OUTPUTS[:1])
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it lists every torchvision op it skips
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (_example(state),), str(path), dynamo=True, dynamic_shapes=shapes,
                              input_names=[INPUT], output_names=outputs, opset_version=opset,
                              external_data=False, verbose=False)
    finally:
        quiet.setLevel(level)
    import onnx

    onnx.checker.check_model(str(path))
    return path


def export_torchscript(task, state: dict, path: Path, embedding: bool = True) -> Path:
    """Write the deployed net traced to TorchScript (inputs: sides multiples of 2**depth)."""
    module = Deployed(task.net, state["activation"], embedding).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracing is deprecated and warns on every Python branch
        traced = torch.jit.trace(module, _example(state), check_trace=False)
    traced.save(str(path))
    return path


def runner(path: Path, threads: int | None = None):
    """A function (B, Cin, H, W) float32 numpy -> list of numpy outputs, for an ONNX or TorchScript file."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        available = onnxruntime.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: np.ascontiguousarray(x, np.float32)})
    module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x):
        with torch.no_grad():
            out = module(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
        return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]

    return run


def compare(task, state: dict, path: Path, repeats: int = 3) -> dict:
    """Exported vs torch net on a seeded random input: largest absolute difference and times per forward."""
    x = _example(state, batch=2, height=256, width=192, seed=1)  # not the traced size: the shapes are dynamic
    module = Deployed(task.net, state["activation"], embedding=True).eval()
    run = runner(path)
    exported, reference = run(x.numpy()), None
    torch_s, exported_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            reference = [o.numpy() for o in module(x)]
        torch_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        exported = run(x.numpy())
        exported_s.append(time.perf_counter() - start)
    diffs = [float(np.abs(a - b).max()) for a, b in zip(exported, reference)]
    return {"input_shape": list(x.shape), "max_abs_diff": diffs[0],
            "embedding_max_abs_diff": diffs[1] if len(diffs) > 1 else None,
            "torch_ms": 1e3 * min(torch_s), "exported_ms": 1e3 * min(exported_s)}


class ExportedTask:
    """What :func:`labelling.inference.predict.predict` needs of a trained task, backed by an ONNX/TorchScript file.

    Attributes:
        net: ``in_channels``, ``out_channels`` and ``depth`` of the exported net.
        loss: ``activation`` of the training loss (``sigmoid`` outputs are not de-normalized).
        deploy: the deployment settings (normalization rule, channel names, ``max_size``).
        input_stats, target_stats, null_level: the run's stored statistics, as tensors.
        path: the exported network file.
    """

    def __init__(self, path: Path, state: dict, threads: int | None = None):
        self.path, self.state = Path(path), state
        self.net = SimpleNamespace(in_channels=state["in_channels"], out_channels=state["out_channels"],
                                   depth=state["depth"])
        self.loss = SimpleNamespace(activation=state["activation"])
        self.deploy = dict(state["deploy"])
        self.input_stats = torch.tensor(state["input_stats"], dtype=torch.float32)
        self.target_stats = torch.tensor(state["target_stats"], dtype=torch.float32)
        self.null_level = torch.tensor(state["null_level"], dtype=torch.float32)
        self._run = runner(self.path, threads)

    def eval(self) -> ExportedTask:
        """Already in inference mode (for code that calls ``task.eval()``)."""
        return self

    def _forward(self, x) -> list[np.ndarray]:
        x = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
        height, width = x.shape[-2:]
        m = 2 ** self.state["depth"]
        ph, pw = (-height) % m, (-width) % m
        if ph or pw:  # the torch net pads the same way inside its forward
            mode = "reflect" if ph < height and pw < width else "edge"
            x = np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)), mode=mode)
        out = self._run(x)
        return [out[0][..., :height, :width], *out[1:]]

    def predict(self, x) -> torch.Tensor:
        """Image-space prediction (activated, not de-normalized) of normalized (B, Cin, H, W) inputs."""
        return torch.from_numpy(np.asarray(self._forward(x)[0]))

    def embed(self, x) -> torch.Tensor:
        """(B, D) bottleneck embedding of normalized (B, Cin, H, W) inputs."""
        out = self._forward(x)
        if len(out) < 2:
            raise ExportError(f"{self.path} was exported without its embedding output; re-export it")
        return torch.from_numpy(np.asarray(out[1]))


def write_state(out: Path, state: dict) -> Path:
    """Write ``deployment.json`` into `out`."""
    path = Path(out) / STATE_FILE
    path.write_text(json.dumps(state, indent=1, default=float) + "\n")
    return path


def state_file(path: str | Path) -> Path | None:
    """The ``deployment.json`` of an export folder or of a network file inside one, else None."""
    path = Path(path)
    if path.is_dir():
        return path / STATE_FILE if (path / STATE_FILE).is_file() else None
    if path.suffix in (".onnx", ".pt") and (path.parent / STATE_FILE).is_file():
        return path.parent / STATE_FILE
    return None


def load_exported(path: str | Path, threads: int | None = None):
    """Rebuild (task stand-in, config) from an export folder or its ``model.onnx`` / ``model.pt``.

    Raises:
        ExportError: no or an unreadable ``deployment.json``, a missing network file, or a config this
            version of labelling cannot validate.
    """
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such exported model (file or folder)")
    found = state_file(path)
    if found is None:
        raise ExportError(f"{path}: not an exported model (no {STATE_FILE} beside it); "
                          "export a run with `labelling export RUN --format onnx --out DIR`")
    try:
        state = json.loads(found.read_text())
        model = found.parent / (path.name if path.suffix in (".onnx", ".pt") else state["model"])
        missing = {"deploy", "input_stats", "target_stats", "null_level", "in_channels", "out_channels",
                   "depth", "config"} - set(state)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ExportError(f"{found}: unreadable deployment state ({type(err).__name__}: {err})") from None
    if missing:
        raise ExportError(f"{found}: deployment state lacks {sorted(missing)}; re-export the run")
    if not model.is_file():
        raise ExportError(f"{found.parent}: the network file {model.name} is missing")
    try:
        cfg = config.validate(state["config"])
    except config.ConfigError as err:
        raise ExportError(f"{found}: its training config does not validate: {err}") from err
    try:
        task = ExportedTask(model, state, threads)
    except ImportError as err:
        raise ExportError(f"{model}: running an exported model needs {err.name}: pip install 'labelling[export]'") from None
    except Exception as err:  # a truncated or foreign file: onnxruntime and torch raise their own types
        raise ExportError(f"{model}: cannot load the exported network ({type(err).__name__}: {err})") from None
    return task, cfg


def load_model(path: str | Path):
    """(task, config) of a run folder, a checkpoint or an exported ONNX/TorchScript model."""
    if state_file(path) is not None or Path(path).suffix == ".onnx":
        return load_exported(path)
    from labelling.build import load_task

    return load_task(path)
