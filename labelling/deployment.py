"""The typed deployment state: everything a trained model needs besides its weights to predict like in training.

A :class:`Deployment` is written by the data module at the start of training (from the *training* split only),
saved inside every checkpoint (the task's extra state, plain data that loads weights-only) and in every export
(``deployment.json``), and read by the one prediction path (:mod:`labelling.inference.predict`). It is
versioned (:data:`VERSION`); older checkpoints are migrated when loaded.

Nothing in it comes from an image being predicted: per-image normalization computes its statistics from the
image's own *input* pixels at deployment, everything else is fixed here.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from labelling.config import NORMALIZATIONS
from labelling.data.normalization import denormalize, flat_field, image_stats, normalize
from labelling.errors import CheckpointError

VERSION = 2
DENORMALIZE = ("stats", "affine", "none")  # training-target statistics, post-training calibration, none


class Deployment(BaseModel):
    """How a model turns a raw image into a prediction and the prediction into target units.

    Attributes:
        inputs: names of the input channels (raw inputs first, then a cascade's predicted channels).
        targets: names of the output channels.
        raw_channels: input channels read from the image (the rest are a cascade's predictions).
        in_channels, out_channels: the net's channel counts.
        spatial_multiple: the net takes heights and widths that are multiples of this.
        spatial_dims: 2, or 3 for nets that convolve a z-stack.
        normalize: input normalization rule (:data:`labelling.config.NORMALIZATIONS`).
        flatfield: divide each raw input channel by its own fitted illumination surface before normalizing
            (``data.flatfield``; :func:`labelling.data.normalization.flat_field`).
        input_stats: (Cin, 2) dataset-level ``(offset, scale)`` of the training inputs (used by ``fixed``).
        denormalize: ``stats`` (training-target statistics), ``affine`` (calibration of a scale-free loss
            fitted on the training split) or ``none`` (probabilities of a logit loss, binary targets).
        target_stats: (Cout, 2) ``(offset, scale)`` mapping the net output to target units.
        null_level: (Cout,) mean training target: the null ("blind") predictor.
        activation: ``None`` or ``"sigmoid"`` (the training loss's declared activation).
        target_transform: what was applied to the targets before training (``data.target_transform``).
        max_size: fields were binned to this longer side in training (0: not binned).
        planes: z planes of a 2.5D model's input; channels: plate channel names it reads.
        cascade: run folders whose predictions are extra input channels.
        tta: average the 8 flips/rotations of each tile.
        pixel_size: (y, x) size of a training pixel in micrometres, when the data said.
        lineage: the models this one was fine-tuned from, oldest last (``init.from``).
    """

    model_config = ConfigDict(extra="forbid", frozen=False)

    version: int = VERSION
    inputs: list[str] = Field(default_factory=lambda: ["input"])
    targets: list[str] = Field(default_factory=lambda: ["target"])
    raw_channels: int = Field(1, ge=1)
    in_channels: int = Field(1, ge=1)
    out_channels: int = Field(1, ge=1)
    spatial_multiple: int = Field(1, ge=1)
    spatial_dims: Literal[2, 3] = 2
    normalize: str = "percentile"
    flatfield: bool = False
    input_stats: list[list[float]] = Field(default_factory=lambda: [[0.0, 1.0]])
    denormalize: Literal["stats", "affine", "none"] = "stats"
    target_stats: list[list[float]] = Field(default_factory=lambda: [[0.0, 1.0]])
    null_level: list[float] = Field(default_factory=lambda: [0.0])
    activation: Literal["sigmoid"] | None = None
    target_transform: str = "none"
    max_size: int = Field(0, ge=0)
    planes: list[int] | None = None
    channels: list[str] | None = None
    cascade: list[str] = Field(default_factory=list)
    tta: bool = False
    pixel_size: tuple[float, float] | None = None
    lineage: list[dict] = Field(default_factory=list)  # models this one was fine-tuned from (source, sha256)

    @field_validator("normalize")
    @classmethod
    def _known_rule(cls, value: str) -> str:
        if value not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {value!r}; valid: {list(NORMALIZATIONS)}")
        return value

    @field_validator("planes")
    @classmethod
    def _planes(cls, value):
        if value is not None and any(z < 0 for z in value):
            raise ValueError(f"planes must be >= 0, got {value}")
        return value

    @model_validator(mode="after")
    def _shapes(self) -> Deployment:
        rows = {"input_stats": (self.input_stats, self.in_channels), "target_stats": (self.target_stats, self.out_channels)}
        for name, (stats, n) in rows.items():
            if len(stats) != n or any(len(r) != 2 for r in stats):
                raise ValueError(f"{name} must be {n} rows of (offset, scale), got {stats}")
            if not all(math.isfinite(v) for r in stats for v in r) or any(r[1] <= 0 for r in stats):
                raise ValueError(f"{name} must be finite with positive scales, got {stats}")
        if len(self.null_level) != self.out_channels or not all(math.isfinite(v) for v in self.null_level):
            raise ValueError(f"null_level must be {self.out_channels} finite values, got {self.null_level}")
        if self.raw_channels > self.in_channels:
            raise ValueError(f"raw_channels={self.raw_channels} exceeds in_channels={self.in_channels}")
        if self.pixel_size is not None and not all(math.isfinite(v) and v > 0 for v in self.pixel_size):
            raise ValueError(f"pixel_size must be positive, got {self.pixel_size}")
        return self

    # -- the rules ---------------------------------------------------------------------------------
    def input_stats_for(self, raw: np.ndarray, method: str | None = None) -> np.ndarray:
        """(Cin, 2) statistics that normalize `raw` as in training (or with rule `method`).

        `raw` as :meth:`normalize_input` hands it on: flat-field corrected already when ``flatfield``.
        """
        method = method or self.normalize
        if method == "fixed":
            return np.asarray(self.input_stats, np.float32)
        return image_stats(raw, method)

    def normalize_input(self, raw: np.ndarray, method: str | None = None) -> np.ndarray:
        """Raw (Cin, H, W) input -> the normalization the model was trained with (or rule `method`)."""
        raw = flat_field(raw, self.raw_channels) if self.flatfield else np.asarray(raw, np.float32)
        return normalize(raw, self.input_stats_for(raw, method))

    def output_stats(self) -> np.ndarray | None:
        """(Cout, 2) de-normalization of the (activated) net output, or None for probabilities."""
        if self.denormalize == "none" or self.activation == "sigmoid":
            return None
        return np.asarray(self.target_stats, np.float32)

    def denormalize_output(self, y: np.ndarray) -> np.ndarray:
        """Activated net output (Cout, H, W) -> target units."""
        stats = self.output_stats()
        return np.asarray(y if stats is None else denormalize(y, stats), np.float32)

    def activate(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw net output -> image (sigmoid for logit losses)."""
        return torch.sigmoid(raw) if self.activation == "sigmoid" else raw

    def null_image(self, height: int, width: int) -> np.ndarray:
        """The null predictor's output: the mean training target everywhere, whatever the input."""
        level = np.asarray(self.null_level, np.float32)
        return np.broadcast_to(level[:, None, None], (len(level), height, width)).copy()

    # -- storage -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON-able data (lists, numbers, strings): what checkpoints and exports store."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, state: dict, where: str = "deployment state") -> Deployment:
        """Validate stored state; a newer version or a bad value is a CheckpointError naming `where`."""
        state = dict(state)
        version = state.get("version", 1)
        if not isinstance(version, int) or version > VERSION:
            raise CheckpointError(f"{where}: deployment state version {version!r} is newer than this labelling "
                                  f"understands ({VERSION}); update labelling")
        try:
            return cls(**state)
        except (ValidationError, TypeError) as err:
            raise CheckpointError(f"{where}: invalid deployment state: {err}") from None

    @classmethod
    def from_legacy(cls, deploy: dict, buffers: dict, net, activation: str | None) -> Deployment:
        """Version-1 checkpoints: a plain ``deploy`` dict plus the task's ``*_stats``/``null_level`` buffers."""
        keep = {k: deploy[k] for k in ("normalize", "denormalize", "inputs", "targets", "target_transform",
                                       "max_size", "planes", "channels", "cascade", "tta") if deploy.get(k) is not None}
        rows = {k: np.asarray(buffers[k], np.float64).tolist() for k in ("input_stats", "target_stats", "null_level")}
        # a cascade's channels are named "<run>:<target>" after the raw inputs
        raw = sum(":" not in name for name in keep.get("inputs", [])) if keep.get("cascade") else net.in_channels
        return cls.from_dict({**keep, **rows, "activation": activation, "in_channels": net.in_channels,
                              "out_channels": net.out_channels, "spatial_multiple": net.spatial_multiple,
                              "spatial_dims": net.spatial_dims, "raw_channels": max(1, raw)}, "version-1 checkpoint")
