"""Losses: the name table lives in :mod:`labelling.registry` (kind ``loss``); ``sum`` combines them."""

from __future__ import annotations

import torch
from torch import nn

from labelling.losses.basic import AsymmetricLoss, BCELoss, GradientLoss, MSELoss, PearsonLoss

__all__ = ["AsymmetricLoss", "BCELoss", "GradientLoss", "MSELoss", "PearsonLoss", "WeightedSum", "build_loss"]


class WeightedSum(nn.Module):
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
        self.scale_free = all(getattr(t, "scale_free", False) for t in self.terms)
        self.last: dict[str, float] = {}

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        parts = [w * t(pred, target) for w, t in zip(self.weights, self.terms)]
        self.last = {type(t).__name__: float(p.detach()) for t, p in zip(self.terms, parts)}
        return torch.stack(parts).sum()


def build_loss(name: str, **args) -> nn.Module:
    """Build a registered loss by name (see ``registry.TABLES['loss']``)."""
    from labelling import registry

    return registry.build("loss", name, **args)
