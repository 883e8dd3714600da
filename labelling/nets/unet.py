"""UNet for image-to-image regression that also returns its bottleneck embedding. Pure torch."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

INITS = ("default", "kaiming", "xavier", "orthogonal")
NORMS = ("batch", "instance", "group", "none")


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "instance":
        return nn.InstanceNorm2d(ch, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, ch), ch)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """Two 3x3 conv -> norm -> ReLU, with optional spatial dropout."""

    def __init__(self, cin: int, cout: int, norm: str, dropout: float):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"), _norm(norm, cout), nn.ReLU(inplace=True),
            nn.Dropout2d(dropout) if dropout else nn.Identity(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=norm == "none"), _norm(norm, cout), nn.ReLU(inplace=True),
        )


def init_weights(module: nn.Module, scheme: str = "kaiming") -> None:
    """Custom initialisation of every conv/linear layer: kaiming (ReLU fan-out), xavier or orthogonal."""
    if scheme not in INITS:
        raise ValueError(f"unknown init '{scheme}'; valid: {list(INITS)}")
    if scheme == "default":
        return
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if scheme == "kaiming":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.orthogonal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def check_sizes(**sizes) -> None:
    """Raise ValueError unless every size (depth, width, channels...) is an integer >= 1."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_dropout(dropout: float) -> None:
    """Raise ValueError unless 0 <= dropout < 1 (a probability of dropping; 1 would drop everything)."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")


class UNet(nn.Module):
    """UNet with configurable depth/width; works at any input size (reflect-pads to a multiple of 2**depth).

    Args:
        in_channels: input channels (brightfield: 1).
        out_channels: predicted fluorescence channels.
        depth: number of 2x down-samplings.
        width: channels of the first level (doubles each level).
        dropout: Dropout2d probability inside every block (0 disables).
        norm: ``batch``, ``instance``, ``group`` or ``none``.
        init: weight initialisation, see :func:`init_weights`.
        upsample: ``transpose`` (learned) or ``bilinear``.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, depth: int = 3, width: int = 32,
                 dropout: float = 0.0, norm: str = "batch", init: str = "kaiming", upsample: str = "transpose"):
        super().__init__()
        check_sizes(in_channels=in_channels, out_channels=out_channels, depth=depth, width=width)
        check_dropout(dropout)
        if norm not in NORMS:
            raise ValueError(f"unknown norm '{norm}'; valid: {list(NORMS)}")
        if upsample not in ("transpose", "bilinear"):
            raise ValueError(f"unknown upsample '{upsample}'; valid: ['transpose', 'bilinear']")
        self.depth, self.in_channels, self.out_channels = depth, in_channels, out_channels
        self.spatial_multiple, self.spatial_dims = 2**depth, 2  # the net contract (labelling.contracts.Net)
        self.encoder_prefixes = ("down.",)  # what init.freeze_encoder freezes
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([ConvBlock(in_channels, chans[0], norm, 0.0)])
        self.down.extend(ConvBlock(chans[i], chans[i + 1], norm, dropout) for i in range(depth))
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for i in reversed(range(depth)):
            if upsample == "transpose":
                self.up.append(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2))
            else:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"),
                                             nn.Conv2d(chans[i + 1], chans[i], 1)))
            self.merge.append(ConvBlock(2 * chans[i], chans[i], norm, dropout if i else 0.0))
        self.head = nn.Conv2d(chans[0], out_channels, 1)
        self.embedding_dim = chans[-1]
        init_weights(self, init)

    def forward(self, x: torch.Tensor, return_embedding: bool = False):
        """Predict fluorescence.

        Args:
            x: (B, in_channels, H, W), any H and W.
            return_embedding: also return the bottleneck embedding.

        Returns:
            (B, out_channels, H, W); with `return_embedding`, also (B, embedding_dim) - the bottleneck
            feature map averaged over space.
        """
        H, W = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-H) % m, (-W) % m
        if ph or pw:  # reflect needs pad < size; replicate handles tiny inputs
            x = functional.pad(x, (0, pw, 0, ph), mode="reflect" if ph < H and pw < W else "replicate")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else functional.max_pool2d(x, 2))
            skips.append(x)
        bottleneck = skips.pop()
        x = bottleneck
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], 1))
        y = self.head(x)[..., :H, :W]
        if return_embedding:
            return y, bottleneck.mean((-2, -1))
        return y

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, embedding_dim) bottleneck embedding."""
        return self.forward(x, return_embedding=True)[1]
