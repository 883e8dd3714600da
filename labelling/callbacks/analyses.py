"""Run-end analyses as thin callbacks over :mod:`labelling.evaluate`: stability, embeddings, drift.

Each runs after ``trainer.test`` on the test split, writes CSV + Markdown + PNG into ``<run>/analysis``
and logs the tables and plots to W&B.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from labelling import evaluate as EV


class _RunEndAnalysis(L.Callback):
    def __init__(self, max_images: int = 8):
        self.max_images = max_images
        self.results: dict[str, float] = {}

    def analyse(self, module, images, out: Path, crop: int) -> tuple[dict, list[Path]]:
        raise NotImplementedError

    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        images = trainer.datamodule.splits.get("test", [])[: self.max_images]
        if not images:
            return
        out = Path(trainer.default_root_dir) / "analysis"
        out.mkdir(parents=True, exist_ok=True)
        tables, plots = self.analyse(module, images, out, trainer.datamodule.crop)
        for name, df in tables.items():
            EV.write_table(df, out, name)
        for logger in trainer.loggers:
            logger.log_metrics(self.results, step=trainer.global_step)
            if type(logger).__name__ == "WandbLogger":
                import wandb

                logger.experiment.log({**{f"analysis/{k}": wandb.Table(dataframe=v) for k, v in tables.items()},
                                       **{f"analysis/{p.stem}": wandb.Image(str(p)) for p in plots}})


class StabilityAnalysis(_RunEndAnalysis):
    """Pixel and downstream correlations per corruption (blur/contrast/brightness) and severity -5..5."""

    def analyse(self, module, images, out, crop):
        df = EV.stability_study(module, images, progress=False)
        for _, r in df.iterrows():
            self.results[f"test/stability/{r['corruption']}_{r['severity']:+d}_pcc"] = float(r["pixel_pearson"])
        return {"stability": df}, [EV.plot_stability(df, out / "stability.png")]


class EmbeddingAnalysis(_RunEndAnalysis):
    """Bottleneck embeddings of clean vs corrupted crops: reductions, clusterings, F1 table and plot."""

    def __init__(self, max_images: int = 8, reducers: list[str] | None = None, clusterers: list[str] | None = None):
        super().__init__(max_images)
        self.reducers, self.clusterers = reducers, clusterers

    def analyse(self, module, images, out, crop):
        from labelling.analysis.embeddings import f1_summary, plot_projections

        f1, proj, meta, _ = EV.embedding_study(module, images, crop, reducers=self.reducers, clusterers=self.clusterers)
        plot_projections(proj, meta, out / "embeddings.png")
        self.results["test/embeddings/best_mean_f1"] = float(f1[f1["corruption"] == "mean"]["f1"].max())
        return {"embeddings_f1": f1_summary(f1)}, [out / "embeddings.png"]


class DriftAnalysis(_RunEndAnalysis):
    """MMD two-sample test miss rates and online-MMD AUC-ROC tables on bottleneck embeddings."""

    def analyse(self, module, images, out, crop):
        _, _, meta, emb = EV.embedding_study(module, images, crop, reducers=("pca",), clusterers=("kmeans",))
        fnr, online = EV.drift_study(emb, meta)
        self.results["test/drift/mean_auc"] = float(online["auc"].mean())
        self.results["test/drift/mean_fnr"] = float(fnr["false_negative_rate"].mean())
        return {"drift_fnr": fnr, "drift_online_auc": online}, []
