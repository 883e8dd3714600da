"""Run-end analyses as thin callbacks over :mod:`labelling.evaluate`: downstream, stability, embeddings, drift.

Each runs after ``trainer.test`` on the test split, writes CSV + Markdown + PNG into ``<run>/<folder>``
and logs its numbers, tables and plots to every logger (W&B tables and images).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np

from labelling import evaluate as EV
from labelling.analysis import downstream as D


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
        tables, plots = self.analyse(module, images, out, trainer)
        for name, df in tables.items():
            EV.write_table(df, out, name)
        for logger in trainer.loggers:
            logger.log_metrics(self.results, step=trainer.global_step)
            if type(logger).__name__ == "WandbLogger":
                import wandb

                logger.experiment.log({**{f"{self.prefix}/{k}": wandb.Table(dataframe=v) for k, v in tables.items()},
                                       **{f"{self.prefix}/{p.stem}": wandb.Image(str(p)) for p in plots}})


class DownstreamEvaluation(_RunEndAnalysis):
    """Segment real and predicted test images; count/area/intensity correlations, scatter plots, report.

    Logs ``test/downstream/<metric>_{pearson,spearman}`` for count, total_area, total_intensity and
    mean_intensity (and segmentation F1 against the simulator's true nuclei when there are some).

    Args:
        max_images: cap on the number of test images evaluated.
        seg: arguments of :func:`labelling.analysis.segmentation.segment`.
    """

    folder, prefix = "downstream", "test/downstream"

    def __init__(self, max_images: int = 32, seg: dict | None = None):
        super().__init__(max_images)
        self.seg = seg or {}

    def analyse(self, module, images, out, trainer):
        pairs = [EV.predict_at_scale(module, im) for im in images]
        real, pred = [p[0] for p in pairs], [p[1] for p in pairs]
        truth = None
        if all(i.extra and "nuclei" in i.extra for i in images) and trainer.datamodule.organelles == ["nuclei"]:
            truth = [i.extra["nuclei"][: r.shape[0], : r.shape[1]] for i, r in zip(images, real)]
        table, corr, objects = D.evaluate_pairs(real, pred, [i.key for i in images], self.seg, truth,
                                                return_objects=True)
        plots = D.scatter_plots(table, out)
        D.write_report(table, corr, out, title=f"Downstream evaluation - {module.config.get('name', '')}",
                       images=plots, objects=objects)
        for _, row in corr.iterrows():
            for k in ("pearson", "spearman"):
                if np.isfinite(row[k]):
                    self.results[f"test/downstream/{row['metric']}_{k}"] = float(row[k])
        if "pred_f1" in table:
            self.results["test/downstream/real_seg_f1"] = float(table["real_f1"].mean())
            self.results["test/downstream/pred_seg_f1"] = float(table["pred_f1"].mean())
        return {"correlations": corr, "per_image": table}, plots


class StabilityAnalysis(_RunEndAnalysis):
    """Pixel and downstream correlations per corruption (blur/contrast/brightness) and severity -5..5."""

    def analyse(self, module, images, out, trainer):
        df = EV.stability_study(module, images, progress=False)
        for _, r in df.iterrows():
            self.results[f"test/stability/{r['corruption']}_{r['severity']:+d}_pcc"] = float(r["pixel_pearson"])
        return {"stability": df}, [EV.plot_stability(df, out / "stability.png")]


class EmbeddingAnalysis(_RunEndAnalysis):
    """Bottleneck embeddings of clean vs corrupted crops: reductions, clusterings, F1 table and plot."""

    def __init__(self, max_images: int = 8, reducers: list[str] | None = None, clusterers: list[str] | None = None):
        super().__init__(max_images)
        self.reducers, self.clusterers = reducers, clusterers

    def analyse(self, module, images, out, trainer):
        from labelling.analysis.embeddings import f1_summary, plot_projections

        f1, proj, meta, _ = EV.embedding_study(module, images, trainer.datamodule.crop, reducers=self.reducers, clusterers=self.clusterers)
        plot_projections(proj, meta, out / "embeddings.png")
        self.results["test/embeddings/best_mean_f1"] = float(f1[f1["corruption"] == "mean"]["f1"].max())
        return {"embeddings_f1": f1_summary(f1)}, [out / "embeddings.png"]


class DriftAnalysis(_RunEndAnalysis):
    """MMD two-sample test miss rates and online-MMD AUC-ROC tables on bottleneck embeddings."""

    def analyse(self, module, images, out, trainer):
        emb, meta = EV.corrupted_embeddings(module, images, trainer.datamodule.crop)
        fnr, online = EV.drift_study(emb, meta)
        self.results["test/drift/mean_auc"] = float(online["auc"].mean())
        self.results["test/drift/mean_fnr"] = float(fnr["false_negative_rate"].mean())
        return {"drift_fnr": fnr, "drift_online_auc": online}, []
