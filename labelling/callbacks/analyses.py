"""Run-end analyses as thin callbacks over :mod:`labelling.studies`: downstream, stability, embeddings, drift.

Each runs after ``trainer.test`` on the test split through the deployed prediction path, writes CSV +
Markdown + PNG into ``<run>/<folder>`` and logs its numbers, tables and plots to every logger. To W&B (offline
unless logged in) each logs one set of report-ready panels under its prefix: every table as a ``wandb.Table``
(``test/downstream/per_image`` with 8-bit thumbnails of the input, the real and the predicted image per
field; ``test/drift/drift_fnr``, ``drift_online_auc``, ``drift_run_length``; ``test/stability/...``,
``test/embeddings/...``) and every plot as an image.
"""

from __future__ import annotations

from pathlib import Path

import lightning
import numpy as np

from labelling import studies
from labelling.inference import predict
from labelling.inference.model import Model
from labelling.reporting import plots as figures
from labelling.reporting import reports


def thumbnail(image: np.ndarray, size: int = 128) -> np.ndarray:
    """(H, W) or (C, H, W) float image -> (h, w) uint8, longer side <= `size`, 0.5-99.5 % percentile contrast.

    W&B renders float images by clipping to [0, 1] (camera counts come out white, normalized images
    black), so tables get 8-bit thumbnails.
    """
    import cv2

    image = np.asarray(image, np.float32)
    image = image[0] if image.ndim == 3 else image
    factor = max(image.shape) / size
    if factor > 1:
        shape = (max(1, round(image.shape[1] / factor)), max(1, round(image.shape[0] / factor)))
        image = cv2.resize(image, shape, interpolation=cv2.INTER_AREA)
    lo, hi = np.percentile(image, (0.5, 99.5))
    return (np.clip((image - lo) / max(hi - lo, 1e-8), 0, 1) * 255).round().astype(np.uint8)


def wandb_payload(tables: dict, plots: list[Path], prefix: str, columns: dict | None = None) -> dict:
    """What one analysis logs to W&B: each table as a ``wandb.Table``, each plot as a ``wandb.Image``.

    Args:
        tables: name -> DataFrame.
        plots: PNG files.
        prefix: key prefix, e.g. ``test/downstream``.
        columns: table name -> {column name: one uint8 image per row}, added as image columns.
    """
    import wandb

    payload = {}
    for name, df in tables.items():
        table = wandb.Table(dataframe=df.reset_index(drop=True))
        for column, thumbs in (columns or {}).get(name, {}).items():
            table.add_column(column, [wandb.Image(t) for t in thumbs])
        payload[f"{prefix}/{name}"] = table
    stems = [p.stem for p in plots]  # per-channel reports repeat file names: keep their folder in the key
    payload.update({f"{prefix}/{p.parent.name + '/' if stems.count(p.stem) > 1 else ''}{p.stem}": wandb.Image(str(p))
                    for p in plots})
    return payload


class _RunEndAnalysis(lightning.Callback):
    folder, prefix = "analysis", "analysis"

    def __init__(self, max_images: int = 8):
        self.max_images = max_images
        self.results: dict[str, float] = {}

    def analyse(self, module, images, out: Path, trainer) -> tuple[dict, list[Path]]:
        raise NotImplementedError

    def image_columns(self, module, images) -> dict:
        """Table name -> {column: uint8 thumbnails, one per row} for W&B (none by default)."""
        return {}

    def on_test_end(self, trainer: lightning.Trainer, module: lightning.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        images = trainer.datamodule.splits.get("test", [])[: self.max_images]
        if not images:
            return
        out = Path(trainer.default_root_dir) / self.folder
        out.mkdir(parents=True, exist_ok=True)
        module.eval()
        tables, plots = self.analyse(module, images, out, trainer)
        for name, df in tables.items():
            reports.write_table(df, out, name)
        columns = None
        for logger in trainer.loggers:
            logger.log_metrics(self.results, step=trainer.global_step)
            if type(logger).__name__ == "WandbLogger":
                columns = self.image_columns(module, images) if columns is None else columns
                logger.experiment.log(wandb_payload(tables, plots, self.prefix, columns))


class DownstreamEvaluation(_RunEndAnalysis):
    """Segment real and predicted test images; agreement with CIs next to the null predictor; report.

    Logs ``test/downstream/<metric>_<stat>`` for count, total_area, total_intensity and mean_intensity with
    stat in pearson, spearman, ccc, bias, mae (and ``_lo``/``_hi`` CIs, ``n``), the same for the null
    predictor under ``test/downstream/null/``, ``object_f1`` (predicted vs real segmentation) and, on the
    simulator's nuclei, segmentation F1 against the true nuclei.

    Args:
        max_images: cap on the number of test images evaluated.
        seg: arguments of :func:`labelling.analysis.segmentation.segment`.
    """

    folder, prefix = "downstream", "test/downstream"

    def __init__(self, max_images: int = 64, seg: dict | None = None):
        super().__init__(max_images)
        self.seg = seg or {}
        self.predictions: list[np.ndarray] = []  # of the test fields analysed last

    def analyse(self, module, images, out, trainer):
        title = f"Downstream evaluation - {module.config.get('name', '')} (test)"
        # every report (and the W&B thumbnails) uses these predictions: each test field is predicted once
        self.predictions = [predict.predict(module, im.raw_input(), name=im.key) for im in images]
        table, corr, plots, warnings = studies.downstream_report(module, images, out, self.seg, title=title,
                                                                 predictions=self.predictions)
        self.results["test/downstream/segmentation_warnings"] = float(len(warnings))
        self.results.update(studies.downstream_summary(corr, table, prefix="test/downstream/"))
        tables = {"agreement": corr, "per_image": table}
        names = Model.from_task(module).targets
        if len(names) > 1:  # several organelles: one report per channel as well
            for c, name in enumerate(names):
                t, agreement, channel_plots, _ = studies.downstream_report(
                    module, images, Path(out) / name, self.seg, title=f"{title} - {name}", channel=c,
                    predictions=self.predictions)
                self.results.update(studies.downstream_summary(agreement, t, prefix=f"test/downstream/{name}/"))
                tables[f"agreement_{name}"] = agreement
                plots = plots + channel_plots
        return tables, plots

    def image_columns(self, module, images) -> dict:
        """Thumbnails of each test field's input, real target and prediction (first channel) for the W&B table."""
        return {"per_image": {
            "input": [thumbnail(im.raw_input()) for im in images],
            "real": [thumbnail(im.raw_target()) for im in images],
            "predicted": [thumbnail(p) for p in self.predictions]}}  # made by analyse() for these images


class StabilityAnalysis(_RunEndAnalysis):
    """Pixel and downstream agreement per raw-image corruption and severity -5..5, both normalization modes."""

    prefix = "test/stability"

    def analyse(self, module, images, out, trainer):
        df = studies.stability_study(module, images, progress=False)
        for _, r in df[df["corruption"] != "clean"].iterrows():
            self.results[f"test/stability/{r['mode']}/{r['corruption']}_{r['severity']:+d}_pcc"] = float(r["pixel_pearson"])
        return {"stability": df}, figures.plot_stability(df, out)


class EmbeddingAnalysis(_RunEndAnalysis):
    """Bottleneck embeddings of clean vs corrupted crops: F1 with chance levels and a clean control."""

    prefix = "test/embeddings"

    def __init__(self, max_images: int = 8, reducers: list[str] | None = None, clusterers: list[str] | None = None):
        super().__init__(max_images)
        self.reducers, self.clusterers = reducers, clusterers

    def analyse(self, module, images, out, trainer):
        from labelling.analysis.embeddings import f1_summary

        dm = trainer.datamodule
        f1, headline, proj, meta = studies.embedding_study(module, dm.splits["train"], images, dm.splits["val"],
                                                            dm.crop, self.reducers, self.clusterers)
        figures.plot_projections(proj, meta, out / "embeddings.png")
        self.results.update({f"test/embeddings/{k}": float(v) for k, v in headline.items()
                             if isinstance(v, (int, float))})
        return {"embeddings_f1": f1_summary(f1)}, [out / "embeddings.png"]


class DriftAnalysis(_RunEndAnalysis):
    """MMD test miss rates, online-MMD AUC tables and run lengths (reference: validation fields)."""

    prefix = "test/drift"

    def analyse(self, module, images, out, trainer):
        dm = trainer.datamodule
        found = studies.drift_study(module, dm.splits["val"], images, dm.crop)
        self.results.update({f"test/{k}": v for k, v in studies.drift_summary(found).items()})
        return found, []


class TrainingCost(lightning.Callback):
    """Measured training throughput of this run -> hours and USD on named AWS GPU instances (``cost.md``).

    The throughput is measured over the training epochs only (validation excluded); GPU speed-ups and
    prices come from the editable, dated table ``labelling/studies/aws_prices.yaml``.

    Args:
        runs: how many such trainings to price (e.g. the trials of a sweep).
    """

    def __init__(self, runs: int = 1):
        self.runs = runs
        self.seconds, self.start = 0.0, None
        self.results: dict[str, float] = {}

    def on_train_epoch_start(self, trainer, module) -> None:
        import time

        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        import time

        if self.start is not None:
            self.seconds += time.perf_counter() - self.start
            self.start = None

    def on_test_end(self, trainer, module) -> None:
        if not trainer.is_global_zero or self.seconds <= 0:
            return
        from labelling.analysis.cost import cost_table
        from labelling.studies.cost import load_prices

        dm = trainer.datamodule
        crops = trainer.global_step * dm.batch_size * trainer.accumulate_grad_batches * trainer.world_size
        speed = crops / self.seconds
        total = (trainer.max_epochs or 1) * dm.crops_per_epoch
        table = cost_table(speed, n_crops=total, prices=load_prices(), runs=self.runs)
        reports.write_table(table, Path(trainer.default_root_dir), "cost")
        self.results["test/cost/crops_per_second"] = float(speed)
