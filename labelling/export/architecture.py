"""The ``pytorch_state_dict`` weights of a BioImage Model Zoo package: ``weights.pt`` and ``architecture.py``.

``architecture.py`` is the run's net as source (its ``labelling.nets`` module and those it imports, inlined) plus
``Stain``, the net with its output activation, so a consumer with torch (and MONAI for the MONAI nets) rebuilds
exactly what the TorchScript and ONNX weights compute, without labelling. labelling itself never runs the file.
Also the package's halo rule (:func:`halo`).
"""

from __future__ import annotations

from pathlib import Path

import yaml

ARCHITECTURE = "architecture.py"


def _sources(module, seen: list) -> None:
    """`module`'s source and, first, those of the ``labelling.nets`` modules it imports (depth first)."""
    import importlib
    import inspect
    import re

    for dep in re.findall(r"^from (labelling\.nets\.\w+) import", inspect.getsource(module), re.M):
        _sources(importlib.import_module(dep), seen)
    if module not in seen:
        seen.append(module)


def architecture(cfg) -> tuple[str, str]:
    """A self-contained ``architecture.py`` for the package's ``pytorch_state_dict`` weights, and its callable.

    The file holds the source of the run's net (its ``labelling.nets`` module and the ones that module imports,
    inlined) and ``Stain``: the net plus the output activation, so ``Stain(**kwargs)`` with the package's
    state dict gives exactly what the TorchScript and ONNX weights give. It needs torch (and MONAI for the
    MONAI nets), never labelling.
    """
    import importlib
    import inspect

    from labelling import registry

    cls = registry.get("net", cfg.net.name)
    modules: list = []
    _sources(importlib.import_module(cls.__module__), modules)
    body = []
    for module in modules:
        lines = [line for line in inspect.getsource(module).splitlines()
                 if not line.startswith(("from __future__", "from labelling"))]
        body += [f"# ---- {module.__name__} (labelling) ----", *lines, ""]
    wrapper = f'''
class Stain({cls.__name__}):
    """The deployed stain: normalized input (B, C, H, W) -> activated prediction, before de-normalization.

    The net itself (its state dict is the package's weights.pt, the file labelling's exports share), plus
    the output activation.
    """

    def __init__(self, net_kwargs: dict, sigmoid: bool = False):
        super().__init__(**net_kwargs)
        self.sigmoid = sigmoid

    def forward(self, x):
        y = super().forward(x)
        return torch.sigmoid(y) if self.sigmoid else y
'''
    header = (f'"""The architecture of a labelling export: net `{cfg.net.name}` ({cls.__module__}.{cls.__name__}) and '
              'Stain, its deployed wrapper. Written by labelling export."""\n\nfrom __future__ import annotations\n')
    return header + "\n".join(body) + wrapper, "Stain"


def write_state_dict(task, cfg, out: Path) -> dict:
    """``weights.pt`` (the net's tensors, as in every export) and ``architecture.py``; their ``pytorch_state_dict``."""
    import hashlib

    import torch

    from labelling.build import net_args
    from labelling.export import deployed

    source, name = architecture(cfg)
    (out / ARCHITECTURE).write_text(source)
    weights = deployed.write_weights(task, out)
    dep = task.deployment
    kwargs = {"net_kwargs": {"in_channels": dep.in_channels, "out_channels": dep.out_channels, **net_args(cfg)},
              "sigmoid": dep.activation == "sigmoid"}
    entry = {"source": weights.name, "pytorch_version": torch.__version__.split("+")[0],
             "architecture": {"source": ARCHITECTURE, "callable": name, "kwargs": kwargs,
                              "sha256": hashlib.sha256((out / ARCHITECTURE).read_bytes()).hexdigest()}}
    if cls_needs_monai(cfg):
        import monai

        (out / "environment.yaml").write_text(yaml.safe_dump({
            "name": "labelling-export", "channels": ["conda-forge", "nodefaults"],
            "dependencies": ["python>=3.10", "pip", {"pip": [f"torch=={entry['pytorch_version']}",
                                                              f"monai=={monai.__version__}"]}]}, sort_keys=False))
        entry["dependencies"] = {"source": "environment.yaml"}
    return entry


def cls_needs_monai(cfg) -> bool:
    """Whether the run's net is one of MONAI's (the package then lists MONAI as a dependency)."""
    from labelling import registry

    return "monai" in registry.get("net", cfg.net.name).__module__


def halo(state: dict) -> int:
    """The output halo a tiled consumer may discard per side, or 0 where the normalization is per image."""
    dep = state["deployment"]
    if dep["normalize"] not in ("fixed", "none"):
        return 0
    return max(32, 4 * dep["spatial_multiple"])
