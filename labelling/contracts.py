"""What every net and loss declares, so the crop check, the tiler and the exports can rely on it.

A component in a :mod:`labelling.registry` table meets its contract or is refused when built, with a message
that names what is missing (``tests/test_tables.py`` checks every entry against it):

* a **loss** is a :class:`Loss`: ``forward(pred, target) -> scalar`` on the net's raw output, plus
  ``activation`` (``None``, or ``"sigmoid"`` for losses on logits: predictions are probabilities and are
  not de-normalized) and ``scale_free`` (True when the loss ignores the output's scale and offset, e.g.
  Pearson: the output is calibrated to target units after training);
* a **net** is a :class:`Net`: ``in_channels``, ``out_channels``, ``spatial_multiple`` (the height and
  width it takes must be multiples of this: 2**depth for a UNet, 4 * 2**stages with a stride-4 stem),
  ``spatial_dims`` (2, or 3 for nets that convolve a z-stack carried in the channel axis) and
  ``forward(x, return_embedding=False)`` mapping (B, Cin, H, W) to (B, Cout, H, W), and with
  ``return_embedding`` also a (B, D) embedding.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

from labelling.errors import ConfigError

ACTIVATIONS = (None, "sigmoid")


class Loss(nn.Module):
    """Base class of the losses: subclass it and implement ``forward(pred, target)``.

    Attributes:
        activation: ``None`` (the raw output is the image) or ``"sigmoid"`` (the loss takes logits).
        scale_free: the loss ignores the output's offset and scale (calibrated after training).
    """

    activation: str | None = None
    scale_free: bool = False


@runtime_checkable
class Net(Protocol):
    """The attributes and forward every image-to-image net has (see the module docstring)."""

    in_channels: int
    out_channels: int
    spatial_multiple: int
    spatial_dims: int

    def forward(self, x, return_embedding: bool = False): ...


def loss_problems(loss) -> list[str]:
    """What `loss` lacks of the :class:`Loss` contract (empty when it meets it)."""
    if not isinstance(loss, Loss):
        return [f"{type(loss).__name__} is not a labelling.contracts.Loss: subclass it (it declares "
                "`activation` and `scale_free`, which prediction and calibration read)"]
    problems = []
    if loss.activation not in ACTIVATIONS:
        problems.append(f"{type(loss).__name__}.activation={loss.activation!r}: must be one of {list(ACTIVATIONS)}")
    if not isinstance(loss.scale_free, bool):
        problems.append(f"{type(loss).__name__}.scale_free must be True or False")
    return problems


def net_problems(net) -> list[str]:
    """What `net` lacks of the :class:`Net` contract (empty when it meets it)."""
    name, problems = type(net).__name__, []
    for attr in ("in_channels", "out_channels", "spatial_multiple", "spatial_dims"):
        value = getattr(net, attr, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name}.{attr} must be a positive int, got {value!r}")
    if getattr(net, "spatial_dims", 2) not in (2, 3):
        problems.append(f"{name}.spatial_dims must be 2 or 3")
    if not callable(getattr(net, "forward", None)):
        problems.append(f"{name} has no forward")
    return problems


def check(kind: str, component) -> None:
    """Raise ConfigError when a built ``net`` or ``loss`` does not meet its contract."""
    problems = {"net": net_problems, "loss": loss_problems}[kind](component) if kind in ("net", "loss") else []
    if problems:
        raise ConfigError(f"{kind} {type(component).__name__} does not meet labelling's {kind} contract "
                          f"(labelling/contracts.py): " + "; ".join(problems))


def check_crop(net: Net, crop: int, what: str = "data.crop") -> None:
    """Refuse a training crop the net cannot take (not a multiple of its ``spatial_multiple``)."""
    multiple = net.spatial_multiple
    if crop % multiple:
        raise ConfigError(f"{what}={crop} is not a multiple of {multiple}, the spatial multiple of net "
                          f"{type(net).__name__}; use a crop that is a multiple of {multiple} "
                          f"(e.g. {max(multiple, crop // multiple * multiple)}) or a shallower net")
