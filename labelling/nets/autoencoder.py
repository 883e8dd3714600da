"""Two autoencoders for brightfield embeddings. Pure torch.

* :class:`ConvAutoencoder` - strided-conv encoder to a vector, transposed-conv decoder.
* :class:`VariationalAutoencoder` - same backbone with a Gaussian latent (mean, log-variance) and the
  reparameterisation trick; its KL term is returned for the task to weigh.
"""

from __future__ import annotations

import torch
from torch import nn

from labelling.nets.unet import check_dropout, check_sizes, init_weights


def _encoder(cin: int, width: int, depth: int) -> nn.Sequential:
    layers, c = [], cin
    for i in range(depth):
        layers += [nn.Conv2d(c, width * 2**i, 4, stride=2, padding=1), nn.BatchNorm2d(width * 2**i), nn.LeakyReLU(0.1)]
        c = width * 2**i
    return nn.Sequential(*layers)


def _decoder(cout: int, width: int, depth: int) -> nn.Sequential:
    layers = []
    for i in reversed(range(1, depth)):
        layers += [nn.ConvTranspose2d(width * 2**i, width * 2 ** (i - 1), 4, stride=2, padding=1),
                   nn.BatchNorm2d(width * 2 ** (i - 1)), nn.LeakyReLU(0.1)]
    layers.append(nn.ConvTranspose2d(width, cout, 4, stride=2, padding=1))
    return nn.Sequential(*layers)


class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder with a `latent_dim` bottleneck vector.

    Args:
        in_channels: image channels.
        size: input side length (square crops, multiple of 2**depth).
        depth: number of stride-2 stages.
        width: channels of the first stage.
        latent_dim: embedding size.
        dropout: dropout on the latent vector during training.
        init: weight initialisation (see :func:`labelling.nets.unet.init_weights`).
    """

    variational = False

    def __init__(self, in_channels: int = 1, size: int = 64, depth: int = 3, width: int = 16, latent_dim: int = 32,
                 dropout: float = 0.0, init: str = "kaiming", out_channels: int | None = None):
        super().__init__()
        check_sizes(in_channels=in_channels, size=size, depth=depth, width=width, latent_dim=latent_dim)
        if out_channels is not None:
            check_sizes(out_channels=out_channels)
        check_dropout(dropout)
        if size % 2**depth:
            raise ValueError(f"autoencoder size {size} must be a multiple of 2**depth={2 ** depth}")
        self.in_channels, self.size, self.depth, self.embedding_dim = in_channels, size, depth, latent_dim
        self.spatial_multiple, self.spatial_dims = 2**depth, 2  # the net contract; it takes size x size only
        self.out_channels = out_channels or in_channels
        self.grid = size // 2**depth
        feat = width * 2 ** (depth - 1) * self.grid**2
        self.encoder = _encoder(in_channels, width, depth)
        self.to_latent = nn.Linear(feat, latent_dim * (2 if self.variational else 1))
        self.from_latent = nn.Linear(latent_dim, feat)
        self.decoder = _decoder(self.out_channels, width, depth)
        self.dropout = nn.Dropout(dropout)
        self.width = width
        init_weights(self, init)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, size, size) -> (B, latent_dim) (for the VAE: the posterior mean)."""
        if x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"autoencoder expects {self.size}x{self.size} crops, got {tuple(x.shape[-2:])}")
        h = self.to_latent(self.encoder(x).flatten(1))
        return h[:, : self.embedding_dim]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_latent(z).view(len(z), self.width * 2 ** (self.depth - 1), self.grid, self.grid)
        return self.decoder(h)

    def forward(self, x: torch.Tensor, return_embedding: bool = False):
        """Reconstruct x; with `return_embedding` also return the latent vector."""
        z = self.encode(x)
        y = self.decode(self.dropout(z))
        return (y, z) if return_embedding else y

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)


class VariationalAutoencoder(ConvAutoencoder):
    """VAE: Gaussian posterior; `forward` stores the KL divergence of the last batch in ``self.kl``."""

    variational = True

    def forward(self, x: torch.Tensor, return_embedding: bool = False):
        if x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"autoencoder expects {self.size}x{self.size} crops, got {tuple(x.shape[-2:])}")
        h = self.to_latent(self.encoder(x).flatten(1))
        mu, logvar = h.chunk(2, dim=1)
        logvar = logvar.clamp(-10, 10)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        self.kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu**2 - logvar.exp(), dim=1))
        y = self.decode(self.dropout(z))
        return (y, mu) if return_embedding else y
