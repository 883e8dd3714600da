"""Run-end analyses as thin callbacks over :mod:`labelling.studies`: downstream, stability, embeddings, drift.

Each runs after ``trainer.test`` on the test split through the deployed prediction path, writes CSV +
Markdown + PNG into ``<run>/<folder>`` and logs its numbers, tables and plots to every logger.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from labelling import evaluate, reports, studies


class _RunEndAnalysis(L.Callback):
    folder, prefix = "analysis", "analysis"

    def __init__(self, max_images: int = 8):
        self.max_images = max_images
        self.results: dict[str, float] = {}

    def analyse(self, module, images, out: Path, trainer) -> tuple[dict, list[Path]]:
        raise NotImplementedError

    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
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
        for logger in trainer.loggers:
            logger.log_metrics(self.results, step=trainer.global_step)
            if type(logger).__name__ == "WandbLogger":
                import wandb

                logger.experiment.log({**{f"{self.prefix}/{k}": wandb.Table(dataframe=v) for k, v in tables.items()},
                                       **{f"{self.prefix}/{p.stem}": wandb.Image(str(p)) for p in plots}})


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

    def analyse(self, module, images, out, trainer):
        from labelling.analysis import downstream

        table, corr, objects = studies.downstream_study(module, images, self.seg)
        plots = downstream.scatter_plots(table, out)
        downstream.write_report(table, corr, out, title=f"Downstream evaluation - {module.config.get('name', '')} "
                                f"(test, n={len(images)})", images=plots, objects=objects)
        self.results.update(evaluate.downstream_summary(corr, table, prefix="test/downstream/"))
        return {"agreement": corr, "per_image": table}, plots


class StabilityAnalysis(_RunEndAnalysis):
    """Pixel and downstream agreement per raw-image corruption and severity -5..5, both normalization modes."""

    def analyse(self, module, images, out, trainer):
        df = studies.stability_study(module, images, progress=False)
        for _, r in df[df["corruption"] != "clean"].iterrows():
            self.results[f"test/stability/{r['mode']}/{r['corruption']}_{r['severity']:+d}_pcc"] = float(r["pixel_pearson"])
        return {"stability": df}, evaluate.plot_stability(df, out)


class EmbeddingAnalysis(_RunEndAnalysis):
    """Bottleneck embeddings of clean vs corrupted crops: F1 with chance levels and a clean control."""

    def __init__(self, max_images: int = 8, reducers: list[str] | None = None, clusterers: list[str] | None = None):
        super().__init__(max_images)
        self.reducers, self.clusterers = reducers, clusterers

    def analyse(self, module, images, out, trainer):
        from labelling.analysis.embeddings import f1_summary, plot_projections

        dm = trainer.datamodule
        f1, headline, proj, meta = studies.embedding_study(module, dm.splits["train"], images, dm.splits["val"],
                                                            dm.crop, self.reducers, self.clusterers)
        plot_projections(proj, meta, out / "embeddings.png")
        self.results.update({f"test/embeddings/{k}": float(v) for k, v in headline.items()
                             if isinstance(v, (int, float))})
        return {"embeddings_f1": f1_summary(f1)}, [out / "embeddings.png"]


class DriftAnalysis(_RunEndAnalysis):
    """MMD test miss rates, online-MMD AUC tables and run lengths (reference: training crops)."""

    def analyse(self, module, images, out, trainer):
        dm = trainer.datamodule
        found = studies.drift_study(module, dm.splits["train"], images, dm.crop)
        self.results.update({f"test/{k}": v for k, v in evaluate.drift_summary(found).items()})
        return found, []
