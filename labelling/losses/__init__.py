"""Losses: the name table lives in :mod:`labelling.registry` (kind ``loss``); ``sum`` combines them."""

from __future__ import annotations

import torch
from torch import nn

from labelling.contracts import Loss
from labelling.losses.basic import AsymmetricLoss, BCELoss, GradientLoss, MSELoss, PearsonLoss

__all__ = ["AsymmetricLoss", "BCELoss", "GradientLoss", "MSELoss", "PearsonLoss", "PerChannel", "WeightedSum",
           "build_loss"]


class WeightedSum(Loss):
    """Weighted sum of losses, e.g. ``{name: sum, terms: [{name: mse, weight: 1}, {name: gradient, weight: 0.5}]}``.

    Args:
        terms: list of ``{name, weight, **args}`` of other registered losses.
    """

    def __init__(self, terms: list[dict]):
        super().__init__()
        if not terms:
            raise ValueError("loss 'sum' needs at least one term")
        self.weights = [float(t.get("weight", 1.0)) for t in terms]
        self.terms = nn.ModuleList(
            build_loss(t["name"], **{k: v for k, v in t.items() if k not in ("name", "weight")}) for t in terms
        )
        acts = {t.activation for t in self.terms}
        if len(acts) > 1:
            raise ValueError(f"loss 'sum' mixes terms on logits and on values: {[type(t).__name__ for t in self.terms]}")
        self.activation = acts.pop()
        self.scale_free = all(t.scale_free for t in self.terms)
        self.last: dict[str, float] = {}

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        parts = [w * t(pred, target) for w, t in zip(self.weights, self.terms)]
        self.last = {type(t).__name__: float(p.detach()) for t, p in zip(self.terms, parts)}
        return torch.stack(parts).sum()


class PerChannel(Loss):
    """One loss (and weight) per output channel, for multi-organelle models.

    ``{name: per_channel, terms: [{name: mse, weight: 1}, {name: asymmetric, weight: 2, under_weight: 4}]}``
    applies term i to channel i (nuclei with MSE, Golgi with the asymmetric loss twice as heavily); the
    result is the weighted mean. Terms must agree on logits vs values and on having units.

    Args:
        terms: list of ``{name, weight, **args}``, one per output channel.
    """

    def __init__(self, terms: list[dict]):
        super().__init__()
        if not terms:
            raise ValueError("loss 'per_channel' needs one term per output channel")
        self.weights = [float(t.get("weight", 1.0)) for t in terms]
        if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"per_channel weights must be >= 0 and not all 0, got {self.weights}")
        self.terms = nn.ModuleList(
            build_loss(t["name"], **{k: v for k, v in t.items() if k not in ("name", "weight")}) for t in terms
        )
        acts = {t.activation for t in self.terms}
        free = {t.scale_free for t in self.terms}
        if len(acts) > 1 or len(free) > 1:
            raise ValueError("loss 'per_channel' mixes logit and value losses, or scale-free (pearson) and unit "
                             f"losses: {[type(t).__name__ for t in self.terms]}; the outputs share one de-normalization")
        self.activation, self.scale_free = acts.pop(), free.pop()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape[1] != len(self.terms):
            raise ValueError(f"loss 'per_channel' has {len(self.terms)} terms for {pred.shape[1]} output channels")
        parts = [w * t(pred[:, c:c + 1], target[:, c:c + 1])
                 for c, (w, t) in enumerate(zip(self.weights, self.terms))]
        return torch.stack(parts).sum() / sum(self.weights)


def build_loss(name: str, **args) -> nn.Module:
    """Build a registered loss by name (see ``registry.TABLES['loss']``)."""
    from labelling import registry

    return registry.build("loss", name, **args)
