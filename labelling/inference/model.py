"""The one typed model every prediction takes: a :class:`~labelling.deployment.Deployment` plus a net over tiles.

:func:`labelling.inference.load.load` returns a :class:`Model` for a run folder, a checkpoint or an export
(ONNX); a task in memory becomes one with :meth:`Model.from_task` (the end of training, run-end callbacks).
Whatever the source, :func:`labelling.inference.predict.predict` sees the same object: the deployment state
decides normalization, activation and de-normalization, the model only maps normalized tiles to activated
output tiles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from labelling.deployment import Deployment


@dataclass
class Model:
    """A trained model as deployment sees it.

    Attributes:
        deployment: the typed deployment state (normalization, statistics, channels, activation, ...).
        forward: (B, Cin, h, w) normalized tiles -> (B, Cout, h, w) *raw* net output (h, w multiples of
            ``deployment.spatial_multiple``).
        embedder: (B, Cin, h, w) -> (B, D) bottleneck embedding, or None when the model has none.
        cascade: models whose predictions are this model's extra input channels.
        source: where it was loaded from (a run folder, checkpoint or export), or "" for a task in memory.
        fingerprint: SHA-256 of the weights (checkpoint or network file) it was loaded from, or "".
        config: the experiment config it was trained with, when known.
        activated: `forward` already applies the activation (an ONNX export's ``prediction`` output).
    """

    deployment: Deployment
    forward: Callable
    embedder: Callable | None = None
    cascade: list[Model] = field(default_factory=list)
    source: str = ""
    fingerprint: str = ""
    config: object | None = None
    activated: bool = False

    @property
    def device(self) -> torch.device:
        """Where `forward` runs: a torch net's device, else the CPU (ONNX Runtime takes numpy)."""
        params = self.forward.parameters() if isinstance(self.forward, torch.nn.Module) else iter(())
        return next(params, torch.empty(0)).device

    @property
    def in_channels(self) -> int:
        return self.deployment.in_channels

    @property
    def out_channels(self) -> int:
        return self.deployment.out_channels

    @property
    def raw_channels(self) -> int:
        """Input channels read from the image (the others are the cascade's predictions)."""
        return self.deployment.raw_channels

    @property
    def targets(self) -> list[str]:
        return list(self.deployment.targets)

    @torch.no_grad()
    def tiles(self, x: torch.Tensor) -> torch.Tensor:
        """Activated output (image space, before de-normalization) of normalized tiles."""
        y = torch.as_tensor(self.forward(x)).float()
        return y if self.activated else self.deployment.activate(y)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) bottleneck embedding of normalized (B, Cin, h, w) inputs."""
        if self.embedder is None:
            raise ValueError(f"{self.source or 'this model'} has no embedding output (an export without it?); "
                             "re-export it with its embedding")
        return torch.as_tensor(self.embedder(x)).float()

    def null_image(self, raw: np.ndarray) -> np.ndarray:
        """The null predictor for `raw`: the training-mean target everywhere, whatever the input."""
        height, width = np.asarray(raw).shape[-2:]
        return self.deployment.null_image(height, width)

    @classmethod
    def from_task(cls, task, source: str = "", fingerprint: str = "", config=None) -> Model:
        """The model of a trained task in memory (its deployment state must be set)."""
        if isinstance(task, Model):
            return task
        deployment = getattr(task, "deployment", None)
        if not isinstance(deployment, Deployment):
            raise ValueError(f"{type(task).__name__} has no deployment state: only a trained virtual-staining "
                             "task (task 'stainer') predicts images")
        return cls(deployment=deployment, forward=task, embedder=task.embed,
                   cascade=[cls.from_task(t) for t in getattr(task, "cascade_models", [])],
                   source=source, fingerprint=fingerprint, config=config)


def as_model(model_or_task) -> Model:
    """`model_or_task` as a :class:`Model` (a trained task in memory is wrapped, a Model passes)."""
    return model_or_task if isinstance(model_or_task, Model) else Model.from_task(model_or_task)
