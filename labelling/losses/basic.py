"""Pixel losses as plain ``nn.Module``s: ``loss(pred, target) -> scalar``.

`pred` is the raw network output. A loss whose `activation` is ``"sigmoid"`` (BCE) takes logits; the
task applies that activation before computing image metrics or writing predictions.
"""

from __future__ import annotations

import torch
from torch.nn import functional

from labelling.contracts import Loss


class MSELoss(Loss):
    """Mean squared error."""


    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.mse_loss(pred, target)


def pearson_per_image(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pearson correlation of each (image, channel) over pixels: (B, C, H, W) -> (B, C)."""
    p = pred.flatten(2) - pred.flatten(2).mean(-1, keepdim=True)
    t = target.flatten(2) - target.flatten(2).mean(-1, keepdim=True)
    return (p * t).sum(-1) / (p.norm(dim=-1) * t.norm(dim=-1) + eps)


class PearsonLoss(Loss):
    """1 - Pearson correlation per channel. Invariant to intensity offset and gain.

    Args:
        pooled: correlate each channel over all crops of the batch at once (default) instead of per crop.
            A per-crop r asks a background-only crop to reproduce its noise at full contrast; pooled, each
            crop weighs by its own variance, as pixels of a whole image do when the deployed stain is scored.
    """

    scale_free = True  # output has no units: de-normalized by an affine calibration (labelling.inference.predict)

    def __init__(self, pooled: bool = True):
        super().__init__()
        self.pooled = bool(pooled)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.pooled:  # (B, C, H, W) -> (1, C, B*H*W)
            pred, target = (x.transpose(0, 1).reshape(1, x.shape[1], -1) for x in (pred, target))
        return 1.0 - pearson_per_image(pred, target).mean()


class BCELoss(Loss):
    """Binary cross-entropy on logits, for binarized targets (GFP expression masks).

    Args:
        pos_weight: weight of the positive class (>1 counters rare foreground).
    """

    activation = "sigmoid"

    def __init__(self, pos_weight: float = 1.0):
        super().__init__()
        self.register_buffer("pos_weight", torch.tensor(float(pos_weight)))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.binary_cross_entropy_with_logits(pred, target, pos_weight=self.pos_weight)


class AsymmetricLoss(Loss):
    """Squared (or absolute) error with under-prediction weighted more than over-prediction.

    Sparse, dim structures (Golgi puncta) are otherwise predicted as background; punishing a miss
    `under_weight` times harder than a false signal counters that.

    Args:
        under_weight: weight of pixels where pred < target (over-prediction has weight 1).
        power: 2 for squared error, 1 for absolute error.
    """


    def __init__(self, under_weight: float = 4.0, power: float = 2.0):
        super().__init__()
        if under_weight <= 0:
            raise ValueError(f"under_weight must be > 0, got {under_weight}")
        self.under_weight, self.power = float(under_weight), float(power)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        diff = target - pred
        w = torch.where(diff > 0, self.under_weight, 1.0)
        return (w * diff.abs() ** self.power).mean()


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences along y and x."""
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


class GradientLoss(Loss):
    """Mean absolute difference of image gradients: keeps edges sharp where MSE blurs them."""


    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        (py, px), (ty, tx) = image_gradients(pred), image_gradients(target)
        return 0.5 * ((py - ty).abs().mean() + (px - tx).abs().mean())
