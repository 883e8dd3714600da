"""Run-end downstream evaluation: segment real and predicted test images, correlate, report, log."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np

from labelling.analysis import downstream as D
from labelling.data.transforms import denormalize
from labelling.inference import predict_tiled


def predict_split(module, images, tile: int = 256, overlap: float = 0.25, channel: int = 0):
    """Whole-image predictions of a list of normalized `Image`s, both de-normalized to target units."""
    real, pred = [], []
    module.eval()
    for img in images:
        y = predict_tiled(module.predict, img.input, tile=min(tile, *img.input.shape[1:]) // 16 * 16 or 16,
                          overlap=overlap)
        real.append(denormalize(img.target, img.target_stats)[channel])
        pred.append(denormalize(y, img.target_stats)[channel])
    return real, pred


class DownstreamEvaluation(L.Callback):
    """After `trainer.test`, compute downstream metrics on the test split and log them.

    Logs ``test/downstream/<metric>_pearson`` and ``_spearman`` for count, total_area, total_intensity and
    mean_intensity, writes ``<run>/downstream/{per_image.csv, correlations.csv, report.md, report.html,
    scatter_*.png}`` and sends the tables and plots to W&B.

    Args:
        max_images: cap on the number of test images evaluated.
        seg: arguments of :func:`labelling.analysis.segmentation.segment`.
    """

    def __init__(self, max_images: int = 32, seg: dict | None = None):
        self.max_images, self.seg = max_images, seg or {}
        self.results: dict[str, float] = {}

    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        images = trainer.datamodule.splits.get("test", [])[: self.max_images]
        if not images:
            return
        real, pred = predict_split(module, images)
        truth = None
        if all(i.extra and "nuclei" in i.extra for i in images) and trainer.datamodule.organelles == ["nuclei"]:
            truth = [i.extra["nuclei"][: r.shape[0], : r.shape[1]] for i, r in zip(images, real)]
        table, corr = D.evaluate_pairs(real, pred, [i.key for i in images], self.seg, truth)
        out = Path(trainer.default_root_dir) / "downstream"
        plots = D.scatter_plots(table, out)
        D.write_report(table, corr, out, title=f"Downstream evaluation - {module.config.get('name', '')}",
                       images=plots)
        for _, row in corr.iterrows():
            for k in ("pearson", "spearman"):
                if np.isfinite(row[k]):
                    self.results[f"test/downstream/{row['metric']}_{k}"] = float(row[k])
        if "pred_f1" in table:
            self.results["test/downstream/real_seg_f1"] = float(table["real_f1"].mean())
            self.results["test/downstream/pred_seg_f1"] = float(table["pred_f1"].mean())
        for logger in trainer.loggers:
            logger.log_metrics(self.results, step=trainer.global_step)
            if type(logger).__name__ == "WandbLogger":
                import wandb

                logger.experiment.log({"test/downstream/correlations": wandb.Table(dataframe=corr),
                                       "test/downstream/per_image": wandb.Table(dataframe=table),
                                       **{f"test/downstream/{p.stem}": wandb.Image(str(p)) for p in plots}})
