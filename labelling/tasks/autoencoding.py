"""Autoencoder LightningModule: reconstruct the brightfield input; its latent is an image embedding."""

from __future__ import annotations

import lightning
import torch
from torch.nn import functional

from labelling.deployment import Deployment
from labelling.losses.basic import pearson_per_image
from labelling.tasks.stainer import configure_optimizers


class Autoencoding(lightning.LightningModule):
    """Train an autoencoder net on ``batch["input"]``; logs ``train/loss``, ``val/loss``, ``val/pcc``.

    Args:
        net: :class:`~labelling.nets.autoencoder.ConvAutoencoder` or ``VariationalAutoencoder``.
        loss: reconstruction loss (e.g. MSE).
        optim: ``{name, lr, weight_decay, scheduler}``.
        kl_weight: weight of the VAE's KL term (ignored for plain autoencoders).
        config: resolved experiment config, stored in checkpoints.
    """

    def __init__(self, net, loss=None, optim: dict | None = None, kl_weight: float = 1e-3, config: dict | None = None):
        super().__init__()
        self.net, self.loss = net, loss or torch.nn.MSELoss()
        self.optim = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, **(optim or {})}
        self.kl_weight, self.config = kl_weight, config or {}
        self.history: list[dict] = []  # convergence curve for plots
        self.deployment: Deployment | None = None  # how its inputs are normalized (the embedding studies)

    def get_extra_state(self) -> dict:
        """The deployment state as plain data, stored in the state dict (loads with ``weights_only=True``)."""
        return self.deployment.to_dict() if self.deployment is not None else {}

    def set_extra_state(self, state: dict) -> None:
        self.deployment = Deployment.from_dict(state, "checkpoint") if state else None

    def forward(self, x):
        return self.net(x)

    @torch.no_grad()
    def predict(self, x):
        return self.net(x)

    @torch.no_grad()
    def embed(self, x):
        return self.net.embed(x)

    def _step(self, batch, stage):
        x = batch["input"]
        y = self.net(x)
        rec = self.loss(y, x)
        loss = rec + (self.kl_weight * self.net.kl if getattr(self.net, "variational", False) else 0.0)
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=stage != "train", batch_size=len(x),
                 on_step=stage == "train", on_epoch=True)
        if stage != "train":
            self.log(f"{stage}/pcc", pearson_per_image(y, x).mean(), sync_dist=True, batch_size=len(x))
            self.log(f"{stage}/mse", functional.mse_loss(y, x), sync_dist=True, batch_size=len(x))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._step(batch, "test")

    def on_validation_epoch_end(self):
        m = self.trainer.callback_metrics
        if "val/loss" in m and not self.trainer.sanity_checking:
            self.history.append({"epoch": self.current_epoch, "val/loss": float(m["val/loss"]),
                                 "train/loss": float(m.get("train/loss_epoch", float("nan")))})

    def configure_optimizers(self):
        return configure_optimizers(self, self.optim)  # the Stainer's optimizer and scheduler rules

    def on_save_checkpoint(self, checkpoint):
        checkpoint["labelling_config"] = self.config
        checkpoint["labelling_io"] = {"in": self.net.in_channels, "out": self.net.out_channels}
