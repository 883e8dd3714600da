"""MONAI's UNets behind our net interface, so an experiment can pick them with ``net: {name: monai_unet}``.

The wrappers add what :class:`labelling.nets.unet.UNet` offers and the rest of the package relies on:
``in_channels``, ``out_channels``, ``depth``, ``embedding_dim``, any input size (replicate-padded to a
multiple of ``2**depth`` and cropped back) and ``forward(x, return_embedding=False)``, whose embedding is
the globally average-pooled bottleneck feature map, read by a forward hook.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from labelling.nets.unet import check_dropout, check_sizes


class _Wrapped(nn.Module):
    """A 2D MONAI net plus the module whose output is the bottleneck (its pooled output is the embedding)."""

    def __init__(self, net: nn.Module, bottleneck: nn.Module, in_channels: int, out_channels: int, depth: int,
                 embedding_dim: int):
        super().__init__()
        self.net, self.bottleneck = net, bottleneck
        self.in_channels, self.out_channels, self.depth = in_channels, out_channels, depth
        self.spatial_multiple, self.spatial_dims = 2**depth, 2  # the net contract (labelling.contracts.Net)
        self.embedding_dim = embedding_dim

    stacks_z = False  # 3D nets: the channel axis carries a z-stack, (B, Z, H, W) -> (B, 1, Z, H, W) inside

    def forward(self, x: torch.Tensor, return_embedding: bool = False):
        """(B, in_channels, H, W) -> (B, out_channels, H, W); with `return_embedding` also (B, embedding_dim)."""
        H, W = x.shape[-2:]
        m = 2**self.depth
        ph, pw = -H % m, -W % m
        if ph or pw:
            x = functional.pad(x, (0, pw, 0, ph), mode="replicate")
        found: list[torch.Tensor] = []
        # the hook only when the embedding is asked for: a plain forward stays one graph for torch.compile
        hook = self.bottleneck.register_forward_hook(lambda module, args, out: found.append(out)) \
            if return_embedding else None
        try:
            y = self.net(x[:, None] if self.stacks_z else x)[..., :H, :W]
        finally:
            if hook is not None:
                hook.remove()
        if self.stacks_z:  # (B, k, Z, H, W) -> (B, k * Z, H, W): k predicted stacks
            y = y.reshape(len(x), -1, H, W)
        return (y, found[-1].flatten(2).mean(-1)) if return_embedding else y

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, embedding_dim) pooled bottleneck features."""
        return self.forward(x, return_embedding=True)[1]


class MonaiBasicUNet(_Wrapped):
    """``monai.networks.nets.BasicUNet`` in 2D (four 2x down-samplings).

    Args:
        in_channels: input channels.
        out_channels: predicted channels.
        width: channels of the first level; the levels have (w, w, 2w, 4w, 8w) and the last up-block w.
        depth: 2x down-samplings; BasicUNet has exactly 4 (the argument exists so configs can say so).
        dropout: dropout probability inside the blocks.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: int = 32, depth: int = 4,
                 dropout: float = 0.0):
        from monai.networks.nets import BasicUNet

        check_sizes(in_channels=in_channels, out_channels=out_channels, width=width, depth=depth)
        check_dropout(dropout)
        if depth != 4:
            raise ValueError(f"depth must be 4 for monai_basicunet (got {depth}); use monai_unet or unet for others")
        features = (width, width, 2 * width, 4 * width, 8 * width, width)
        net = BasicUNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels, features=features,
                        dropout=dropout)
        super().__init__(net, net.down_4, in_channels, out_channels, depth=4, embedding_dim=features[4])


class MonaiUNet(_Wrapped):
    """``monai.networks.nets.UNet`` with residual units, in 2D or 3D.

    In 3D (``spatial_dims: 3``) the net convolves across z: the data carry a z-stack in the channel axis
    (input planes chosen with ``data.planes``, target planes with ``data.target_planes``), so
    ``(B, Z, H, W)`` becomes ``(B, 1, Z, H, W)`` inside the net and the output ``(B, k, Z, H, W)`` becomes
    ``(B, k * Z, H, W)`` - k predicted stacks of Z planes each. Down-sampling is in-plane only (stacks are
    short); the tiled predictor tiles in x and y over the whole stack.

    Args:
        in_channels: input channels (in 3D: the input planes).
        out_channels: predicted channels (in 3D: a multiple of the input planes).
        width: channels of the first level (doubling each level): the default gives channels (16, 32, 64, 128).
        depth: 2x down-samplings (strides (2,) * depth).
        num_res_units: residual units per block.
        dropout: dropout probability inside the blocks.
        spatial_dims: 2, or 3 for z-stack targets.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: int = 16, depth: int = 3,
                 num_res_units: int = 2, dropout: float = 0.0, spatial_dims: int = 2):
        from monai.networks.layers.simplelayers import SkipConnection
        from monai.networks.nets import UNet

        check_sizes(in_channels=in_channels, out_channels=out_channels, width=width, depth=depth,
                    num_res_units=num_res_units)
        check_dropout(dropout)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if spatial_dims == 3 and out_channels % in_channels:
            raise ValueError(f"a 3D net predicts whole stacks: its {out_channels} output planes must be a multiple "
                             f"of its {in_channels} input planes (set data.target_planes like data.planes)")
        channels = tuple(width * 2**i for i in range(depth + 1))
        strides = (2,) * depth if spatial_dims == 2 else ((1, 2, 2),) * depth
        net = UNet(spatial_dims=spatial_dims, in_channels=1 if spatial_dims == 3 else in_channels,
                   out_channels=out_channels // in_channels if spatial_dims == 3 else out_channels,
                   channels=channels, strides=strides, num_res_units=num_res_units, dropout=dropout)
        bottom = net.model
        while (skip := next((c for c in bottom.children() if isinstance(c, SkipConnection)), None)) is not None:
            bottom = skip.submodule  # descend the nested skip connections to the lowest level
        super().__init__(net, bottom, in_channels, out_channels, depth=depth, embedding_dim=channels[-1])
        self.spatial_dims, self.stacks_z = spatial_dims, spatial_dims == 3

