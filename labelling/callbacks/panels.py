"""Run-end prediction panels (brightfield | real | predicted) saved as PNG and logged to W&B."""

from __future__ import annotations

from pathlib import Path

import lightning
import numpy as np

from labelling.inference import predict
from labelling.inference.model import Model
from labelling.reporting.images import composite_figure, panel_figure, to_uint8


class PredictionPanels(lightning.Callback):
    """At the end of fit, predict `n` validation images and save/log panels.

    Args:
        n: number of panels.
        dirpath: output folder (default: ``<run>/panels``).
    """

    def __init__(self, n: int = 4, dirpath: str | None = None, deferred: bool = False):
        self.n, self.dirpath, self.deferred = n, dirpath, deferred
        self.paths: list[Path] = []

    def on_fit_end(self, trainer: lightning.Trainer, module: lightning.LightningModule) -> None:
        if not self.deferred:  # fit() renders deferred panels itself, after loading the best weights
            self.render(trainer, module)

    def render(self, trainer: lightning.Trainer, module: lightning.LightningModule) -> None:
        """Predict the first `n` validation fields through the deployed path and save/log the panels."""
        if not trainer.is_global_zero or self.n == 0 or trainer.sanity_checking:
            return
        dm = trainer.datamodule
        images = (dm.splits.get("val") or dm.splits.get("train"))[: self.n]
        out = Path(self.dirpath or Path(trainer.default_root_dir) / "panels")
        out.mkdir(parents=True, exist_ok=True)
        import matplotlib.pyplot as plt

        module.eval()
        model = Model.from_task(module)
        names = model.targets
        logged = []
        for img in images:
            raw, real = img.raw_input(), img.raw_target()
            pred = predict.predict(model, raw, name=img.key)
            names = list(names) + [f"ch{i}" for i in range(len(names), len(real))]
            fig = panel_figure(raw[0], real, pred, names, input_name=model.deployment.inputs[0])
            path = out / f"{img.key.replace('/', '_').replace(':', '_')}.png"
            fig.savefig(path, dpi=80)
            plt.close(fig)
            self.paths.append(path)
            if len(real) > 1:  # several organelles: also shown together, real beside predicted
                fig = composite_figure(real, pred, names)
                self.paths.append(path.with_name(path.stem + "_composite.png"))
                fig.savefig(self.paths[-1], dpi=80)
                plt.close(fig)
            logged.append(np.concatenate([to_uint8(raw[0]), to_uint8(real[0]), to_uint8(pred[0])], 1))
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image("val/panels", logged, caption=[i.key for i in images])


class AutoencoderSamples(lightning.Callback):
    """At the end of fit: a grid of validation crops and their reconstructions, and the convergence curve.

    Args:
        n: number of samples.
    """

    def __init__(self, n: int = 8):
        self.n = n
        self.paths: list[Path] = []

    def on_fit_end(self, trainer: lightning.Trainer, module: lightning.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(trainer.default_root_dir) / "panels"
        out.mkdir(parents=True, exist_ok=True)
        batch = next(iter(trainer.datamodule.val_dataloader()))
        x = batch["input"][: self.n].to(module.device)
        module.eval()
        y = module.predict(x).float().cpu().numpy()
        x = x.cpu().numpy()
        fig, axes = plt.subplots(2, len(x), figsize=(1.6 * len(x), 3.4), squeeze=False)
        for i in range(len(x)):
            for r, img in enumerate((x[i, 0], y[i, 0])):
                axes[r, i].imshow(img, cmap="gray", vmin=x[i, 0].min(), vmax=x[i, 0].max())
                axes[r, i].axis("off")
        axes[0, 0].set_title("input", fontsize=8, loc="left")
        axes[1, 0].set_title("reconstruction", fontsize=8, loc="left")
        fig.tight_layout()
        fig.savefig(out / "samples.png", dpi=80)
        plt.close(fig)
        hist = getattr(module, "history", [])
        fig, ax = plt.subplots(figsize=(4.5, 3))
        ax.plot([h["epoch"] for h in hist], [h["val/loss"] for h in hist], "o-", label="val/loss")
        ax.plot([h["epoch"] for h in hist], [h["train/loss"] for h in hist], "s-", label="train/loss")
        ax.set(xlabel="epoch", ylabel="loss", yscale="log", title="autoencoder convergence")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "convergence.png", dpi=80)
        plt.close(fig)
        self.paths = [out / "samples.png", out / "convergence.png"]
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image("val/autoencoder", [str(p) for p in self.paths])
