"""`labelling evaluate RUN`: the thesis's tables and plots for a trained run.

Writes into ``<run>/evaluate/``:
* downstream report (per-image CSV, correlations, scatter plots, Markdown/HTML);
* ``scaling.*`` - pixel Pearson and downstream correlations when predicting at another scale;
* ``stability.*`` - the same per corruption (blur, contrast, brightness) and severity -5..5;
* ``embeddings_f1.*`` + ``embeddings.png`` - clean vs corrupted separability of the bottleneck embeddings;
* ``drift_fnr.*``, ``drift_online_auc.*`` - MMD test miss rates and online-MMD AUC-ROC tables.
Every table is CSV + Markdown; with W&B installed they are also logged to an (offline by default) run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from labelling.analysis import downstream as D
from labelling.analysis.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from labelling.data.transforms import denormalize
from labelling.inference import fit_tile, predict_tiled, rescale


def load_run(run: str | Path):
    """(task, cfg, datamodule with splits set up) of a run folder or checkpoint."""
    from labelling import registry
    from labelling.checkpoints import load_task

    task, cfg = load_task(run)
    dm = registry.build("data", cfg.data.name, **{"seed": cfg.seed, **cfg.data.args})
    dm.setup()
    return task, cfg, dm


def predict_at_scale(task, img, scale: float = 1.0, tile: int = 256, channel: int = 0, corruption=None):
    """(real, predicted) of one normalized `Image` in target units; input rescaled by `scale` and back.

    `corruption` = (kind, severity) corrupts the (normalized) input first - i.e. with the normalization of
    the clean image, as a fixed-normalization acquisition pipeline would see it.
    """
    x = img.input
    if corruption is not None:
        x = np.stack([corrupt(c, *corruption) for c in x])
    x = rescale(x, scale)
    y = predict_tiled(task.predict, x, tile=fit_tile(task.net, tile, min(x.shape[1:])), overlap=0.25)
    y = rescale(y, 1.0, shape=img.input.shape[1:]) if scale != 1.0 else y
    return denormalize(img.target, img.target_stats)[channel], denormalize(y, img.target_stats)[channel]


def _correlation_row(task, images, seg: dict | None, spearman: bool = True, **predict) -> dict:
    """Mean pixel Pearson and per-metric downstream correlations of `images` predicted with `predict` args."""
    pairs = [predict_at_scale(task, im, **predict) for im in images]
    table, corr = D.evaluate_pairs([p[0] for p in pairs], [p[1] for p in pairs], seg_args=seg)
    row = {"pixel_pearson": float(table["pixel_pearson"].mean())}
    for _, c in corr.iterrows():
        row[f"{c['metric']}_pearson"] = c["pearson"]
        if spearman:
            row[f"{c['metric']}_spearman"] = c["spearman"]
    return row


def scaling_study(task, images, scales=(0.7, 1.0, 1.3), seg: dict | None = None) -> pd.DataFrame:
    """Pixel Pearson and downstream correlations per prediction scale."""
    return pd.DataFrame([{"scale": s, **_correlation_row(task, images, seg, scale=s)} for s in scales])


def stability_study(task, images, kinds=tuple(CORRUPTIONS), severities=SEVERITIES, seg: dict | None = None,
                    progress: bool = True) -> pd.DataFrame:
    """Pixel Pearson and downstream correlations per corruption kind and severity."""
    from tqdm.auto import tqdm

    grid = [(k, s) for k in kinds for s in severities if not (k == "blur" and s < 0)]
    return pd.DataFrame([{"corruption": kind, "severity": sev,
                          **_correlation_row(task, images, seg, spearman=False, corruption=(kind, sev))}
                         for kind, sev in tqdm(grid, desc="stability", disable=not progress)])


def plot_stability(df: pd.DataFrame, path: Path, columns=("pixel_pearson", "count_pearson", "total_area_pearson")):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.4), squeeze=False)
    for ax, col in zip(axes[0], columns):
        for kind, g in df.groupby("corruption"):
            ax.plot(g["severity"], g[col], "o-", label=kind)
        ax.axvline(0, color="k", lw=0.5)
        ax.set(xlabel="severity", ylabel=col, ylim=(-0.1, 1.05))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def corrupted_embeddings(task, images, crop: int = 64, max_crops: int = 60, seed: int = 0):
    """Embeddings of clean crops and of every corruption of them -> (embeddings (N, D), meta table)."""
    from labelling.analysis import embeddings as E

    crops = E.grid_crops([im.input for im in images], crop)
    crops = crops[np.random.default_rng(seed).permutation(len(crops))[:max_crops]]
    allc, meta = E.corrupted_set(crops)
    return E.embed_crops(task.embed, allc), meta


def embedding_study(task, images, crop: int = 64, max_crops: int = 60, reducers=None, clusterers=None,
                    seed: int = 0):
    """Embeddings of clean and corrupted crops -> (F1 table, projections, meta, embeddings)."""
    from labelling.analysis import embeddings as E

    emb, meta = corrupted_embeddings(task, images, crop, max_crops, seed)
    table, proj = E.f1_table(emb, meta, reducers or E.REDUCERS, clusterers or E.CLUSTERERS, seed)
    return table, proj, meta, emb


def drift_study(emb: np.ndarray, meta: pd.DataFrame, windows=(2, 5, 10, 15, 20), erts=(32, 64, 128, 256),
                seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """MMD test false-negative rates and online-MMD AUC tables from clean/corrupted embeddings."""
    from labelling.analysis import drift as Dr

    clean = emb[(meta["corruption"] == "clean").to_numpy()]
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(clean))
    ref, held = clean[idx[: len(idx) // 2]], clean[idx[len(idx) // 2:]]
    shifted = {(k, s): emb[((meta["corruption"] == k) & (meta["severity"] == s)).to_numpy()]
               for k, s in meta[meta["corrupted"]][["corruption", "severity"]].drop_duplicates().itertuples(index=False)}
    fnr = Dr.false_negative_rates(ref, {("clean", 0): held, **shifted}, window=min(10, len(held)), n_windows=10,
                                  n_permutations=50, seed=seed)
    windows = [w for w in windows if 2 * w <= len(ref)]
    online = Dr.online_tables(ref, held, shifted, windows=windows, erts=erts, n_windows=50, seed=seed)
    return fnr, online


def write_table(df: pd.DataFrame, out: Path, name: str) -> None:
    df.to_csv(out / f"{name}.csv", index=False)
    (out / f"{name}.md").write_text(df.to_markdown(index=False, floatfmt=".3f") + "\n")


def plot_scaling(df: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for col in ["pixel_pearson"] + [f"{m}_pearson" for m in D.IMAGE_METRICS]:
        ax.plot(df["scale"], df[col], "o-", label=col)
    ax.set(xlabel="prediction scale (1.0 = training scale)", ylabel="Pearson r", ylim=(-0.1, 1.05))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def evaluate_run(run: str | Path, scales=(0.7, 1.0, 1.3), split: str = "test", max_images: int = 32,
                 out: str | Path | None = None, stability: bool = False, embeddings: bool = False,
                 drift: bool = False, log_wandb: bool = True) -> dict:
    """Tables and plots of a trained run (see module doc); returns the summary numbers."""
    task, cfg, dm = load_run(run)
    images = dm.splits[split][:max_images]
    if not images:
        raise ValueError(f"split '{split}' of {run} is empty")
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent.parent
    out = Path(out or run_dir / "evaluate")
    out.mkdir(parents=True, exist_ok=True)
    seg = next((c.args.get("seg") for c in cfg.callbacks if c.name == "downstream"), None) or {}
    summary, tables, plots = {}, {}, []
    if cfg.task.name == "stainer":
        pairs = [predict_at_scale(task, im) for im in images]
        table, corr, objects = D.evaluate_pairs([p[0] for p in pairs], [p[1] for p in pairs],
                                                [im.key for im in images], seg, return_objects=True)
        plots += D.scatter_plots(table, out)
        D.write_report(table, corr, out, title=f"Downstream evaluation - {cfg.name} ({split})", images=plots,
                       objects=objects)
        summary.update({f"downstream/{r['metric']}_pearson": r["pearson"] for _, r in corr.iterrows()})
        summary["pixel_pearson"] = float(table["pixel_pearson"].mean())
        tables["downstream"] = corr
        if scales:
            scaling = scaling_study(task, images, scales, seg)
            write_table(scaling, out, "scaling")
            plots.append(plot_scaling(scaling, out / "scaling.png"))
            summary.update({f"scaling/x{r['scale']:g}/pixel_pearson": r["pixel_pearson"]
                            for _, r in scaling.iterrows()})
            tables["scaling"] = scaling
        if stability:
            stab = stability_study(task, images, seg=seg)
            write_table(stab, out, "stability")
            plots.append(plot_stability(stab, out / "stability.png"))
            tables["stability"] = stab
            worst = stab.loc[stab["pixel_pearson"].idxmin()]
            summary[f"stability/worst_pixel_pearson({worst['corruption']},{worst['severity']})"] = worst["pixel_pearson"]
    if embeddings or drift:
        from labelling.analysis import embeddings as E

        emb, meta = corrupted_embeddings(task, images, crop=cfg.data.args.get("crop", 64))
        if embeddings:
            f1, proj = E.f1_table(emb, meta)
            write_table(E.f1_summary(f1), out, "embeddings_f1")
            E.plot_projections(proj, meta, out / "embeddings.png")
            plots.append(out / "embeddings.png")
            tables["embeddings_f1"] = f1
            summary["embeddings/best_mean_f1"] = float(f1[f1["corruption"] == "mean"]["f1"].max())
        if drift:
            fnr, online = drift_study(emb, meta)
            write_table(fnr, out, "drift_fnr")
            write_table(online, out, "drift_online_auc")
            pivot = online.pivot_table(index=["corruption", "severity"], columns="window", values="auc")
            (out / "drift_auc_by_window.md").write_text(pivot.to_markdown(floatfmt=".3f") + "\n")
            tables.update({"drift_fnr": fnr, "drift_online_auc": online})
            summary["drift/mean_auc"] = float(online["auc"].mean())
    if log_wandb:
        _log_wandb(cfg, run_dir, tables, plots)
    return summary


def _log_wandb(cfg, run_dir: Path, tables: dict, plots: list) -> None:
    try:
        import wandb
    except ImportError:
        return
    from labelling.train import wandb_mode

    run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group or cfg.name,
                     name=f"{run_dir.name}-evaluate", job_type="evaluate", dir=str(run_dir), mode=wandb_mode(),
                     config={"experiment": cfg.name})
    run.log({**{f"evaluate/{k}": wandb.Table(dataframe=v) for k, v in tables.items()},
             **{f"evaluate/{Path(p).stem}": wandb.Image(str(p)) for p in plots}})
    run.finish()


def _evaluate_cmd(args) -> int:
    import json

    every = args.all
    summary = evaluate_run(args.run, scales=args.scales, split=args.split, max_images=args.max_images,
                           stability=args.stability or every, embeddings=args.embeddings or every,
                           drift=args.drift or every)
    print(json.dumps({k: round(float(v), 4) for k, v in summary.items()}, indent=2))
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("evaluate", help="downstream report + scaling study of a trained run: evaluate RUN")
    p.add_argument("run", help="run folder or checkpoint")
    p.add_argument("--scales", type=float, nargs="+", default=[0.7, 1.0, 1.3])
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--max-images", type=int, default=32)
    p.add_argument("--stability", action="store_true", help="corruptions x severities table and plot")
    p.add_argument("--embeddings", action="store_true", help="PCA/UMAP/PaCMAP x DBSCAN/HDBSCAN/k-means F1")
    p.add_argument("--drift", action="store_true", help="MMD test FNR and online-MMD AUC tables")
    p.add_argument("--all", action="store_true", help="all of the above")
    p.set_defaults(fn=_evaluate_cmd)
