"""`labelling evaluate RUN`: the thesis's tables and plots for a trained run, through the deployed path.

Writes into ``<run>/evaluate/``:
* downstream report: per-image and per-object CSV, the agreement table (Pearson, Spearman, Lin's CCC,
  bias, MAE with 95 % CIs and n, next to the null predictor), scatter plots, Markdown and HTML;
* ``scaling.*`` - pixel Pearson and downstream agreement when predicting at another scale;
* ``stability.*`` - the same per raw-image corruption and severity -5..5, with the network-input change,
  as deployed and with fixed (dataset-level) normalization;
* ``embeddings_f1.*`` + ``embeddings.png`` - clean vs corrupted separability of bottleneck embeddings with
  shuffled-label chance levels and a clean-vs-clean control; the headline is the mean over configurations;
* ``drift_fnr.*``, ``drift_online_auc.*``, ``drift_run_length.*`` - MMD test miss rates, online-MMD AUC-ROC
  with negatives from unseen clean images, and run lengths of the calibrated detector;
* ``studies/phenotypes``, ``studies/scaling_matrix``, ``studies/learning_curve`` - studies that train more
  models of the run's experiment (phenotype generalization, train x predict scale, "will more data help?");
* ``cost.*`` - the run's measured throughput as hours and USD on named AWS GPU instances.
Every table is CSV + Markdown; W&B gets them too when the run logged to W&B.
"""

from __future__ import annotations

from pathlib import Path

from labelling import studies
from labelling.inference.load import build_run, load
from labelling.reporting import plots as figures
from labelling.reporting import reports


def load_run(run: str | Path):
    """(model, cfg, datamodule with splits set up) of a run folder, a checkpoint or an export.

    An export is scored exactly like its run: the same loader, the same prediction path, the data of the
    config it carries.
    """
    model = load(run)
    cfg = model.config
    dm, _ = build_run(cfg)
    dm.setup()
    return model, cfg, dm


def run_dir_of(run: str | Path) -> Path:
    """The run folder of a run folder, of a checkpoint inside its ``checkpoints/``, or an export folder."""
    run = Path(run)
    if run.is_dir():
        return run
    return run.parent if run.suffix in (".onnx", ".pt") else run.parent.parent


def evaluate_run(run: str | Path, scales=(0.7, 1.0, 1.3), split: str = "test", max_images: int = 32,
                 out: str | Path | None = None, stability: bool = False, embeddings: bool = False,
                 drift: bool = False, log_wandb: bool | None = None, seg: dict | None = None,
                 phenotypes: bool = False, scaling_matrix: bool = False, learning_curve: bool = False,
                 cost: bool = False, live: bool = False) -> dict:
    """Tables and plots of a trained run (see module doc); returns the summary numbers."""
    task, cfg, dm = load_run(run)
    images = dm.splits[split][:max_images]
    if not images:
        raise ValueError(f"split '{split}' of {run} is empty")
    run_dir = run_dir_of(run)
    out = Path(out or run_dir / "evaluate")
    out.mkdir(parents=True, exist_ok=True)
    stored = next((c.args.get("seg") for c in cfg.callbacks if c.name == "downstream"), None) or {}
    seg = {**stored, **(seg or {})}
    summary, tables, plots = {}, {}, []
    crop = int(cfg.data.args.get("crop", 64))
    if cfg.task.name == "stainer":
        table, corr, report_plots, warnings = studies.downstream_report(
            task, images, out, seg, title=f"Downstream evaluation - {cfg.name} ({split})")
        plots += report_plots
        summary["downstream/segmentation_warnings"] = float(len(warnings))
        summary.update(studies.downstream_summary(corr, table))
        tables["downstream"] = corr
        if scales:
            scaling = studies.scaling_study(task, images, scales, seg)
            reports.write_table(scaling, out, "scaling")
            plots.append(figures.plot_lines(scaling, "scale", ["pixel_pearson", "count_pearson", "count_ccc"],
                                    out / "scaling.png"))
            summary.update({f"scaling/x{r['scale']:g}/pixel_pearson": r["pixel_pearson"] for _, r in scaling.iterrows()})
            tables["scaling"] = scaling
        if stability:
            stab = studies.stability_study(task, images, seg=seg)
            reports.write_table(stab, out, "stability")
            plots += figures.plot_stability(stab, out)
            tables["stability"] = stab
            summary.update(studies.stability_summary(stab))
    # both studies look at the same corrupted test crops: embed them once
    test_embeddings = studies.corrupted_embeddings(task, images, crop) if embeddings and drift else None
    if embeddings:
        from labelling.analysis.embeddings import f1_summary

        f1, headline, proj, meta = studies.embedding_study(task, dm.splits["train"], images, dm.splits["val"], crop,
                                                            test_embeddings=test_embeddings)
        reports.write_table(f1_summary(f1), out, "embeddings_f1")
        figures.plot_projections(proj, meta, out / "embeddings.png")
        plots.append(out / "embeddings.png")
        tables["embeddings_f1"] = f1
        summary.update({f"embeddings/{k}": v for k, v in headline.items() if isinstance(v, (int, float))})
    if drift:
        found = studies.drift_study(task, dm.splits["val"], images, crop, test_embeddings=test_embeddings)
        for name, df in found.items():
            reports.write_table(df, out, name)
        tables.update(found)
        summary.update(studies.drift_summary(found))
    if live:  # simulator runs only: a new plate imaged as fixed vs as live, unfixed cells
        if not hasattr(dm, "plate") or cfg.data.name in ("folder", "study"):
            raise ValueError("--live simulates live cells: it needs a run on the simulator, not on folder data")
        runs = studies.live_cell_drift(task, dm.splits["val"], crop, size=dm.plate["size"], seed=cfg.seed)
        reports.write_table(runs, out, "drift_live_cells")
        tables["drift_live_cells"] = runs
        summary.update({f"drift/live/{r['name']}/w{r['window']}": r["mean_run_length"] for _, r in runs.iterrows()})
    studies_wanted = {"phenotypes": phenotypes, "scaling_matrix": scaling_matrix, "learning_curve": learning_curve}
    if any(studies_wanted.values()):
        from labelling import config
        from labelling.studies.training import run_training_studies

        study_cfg = config.validate(config.apply_overrides(config.to_dict(cfg), ["callbacks=[]", "logger.wandb=false"]))
        for name, df in run_training_studies(study_cfg, out / "studies", studies_wanted, max_images).items():
            tables[name] = df
            plots += sorted((out / "studies" / name).glob("*.png"))
    if cost:
        from labelling.studies.training import training_cost

        tables["cost"] = training_cost(run_dir, out)
    reports.write_report(out, f"Evaluation of {cfg.name} ({split}, n={len(images)})",
                         [(name, df) for name, df in tables.items() if name != "downstream"],
                         [p for p in plots if Path(p).exists()], notes=SUMMARY_NOTES, stem="summary")
    if log_wandb if log_wandb is not None else cfg.logger.wandb:
        _log_wandb(cfg, run_dir, tables, plots)
    return summary


SUMMARY_NOTES = ("Every table here comes from the deployed prediction path. The downstream agreement with CIs "
                 "and the null predictor is in report.md / report.html; this page gathers the other studies.")


def _log_wandb(cfg, run_dir: Path, tables: dict, plots: list) -> None:
    try:
        import wandb
    except ImportError:
        return
    from labelling.runs.train import wandb_mode

    run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group or cfg.name,
                     name=f"{run_dir.name}-evaluate", job_type="evaluate", dir=str(run_dir), mode=wandb_mode(),
                     config={"experiment": cfg.name})
    run.log({**{f"evaluate/{k}": wandb.Table(dataframe=v) for k, v in tables.items()},
             **{f"evaluate/{Path(p).stem}": wandb.Image(str(p)) for p in plots}})
    run.finish()
