"""The thesis studies that need several trainings: phenotype transfer, image-scale matrix, learning curve, cost.

Each study trains a handful of runs with :func:`labelling.runs.train.fit` (one folder each under
``<out_dir>/runs/``; re-running a study reuses finished runs), evaluates every model through the one
prediction path (:func:`labelling.studies.predict_pairs`, :func:`labelling.inference.predict.predict_null`) and the
downstream metrics (:func:`labelling.analysis.downstream.evaluate_pairs`), builds its tables with
:mod:`labelling.analysis.generalization`, and writes CSV + Markdown (+ PNG, ``report.md``/``.html``) into
`out_dir`. Give each study its own `out_dir`.

Training data are restricted without touching the experiment's data module: the run's config gets
``data: {name: study, base: <the experiment's data name>, <its arguments>, phenotypes, train_fields,
train_scale}``. :func:`labelling.data.restricted.study_data` builds the base module and, after its usual split into wells, keeps only
the training (and validation) fields of the given phenotypes, the first `train_fields` of a fixed seeded
order (so smaller training sets are nested in larger ones), and resizes training and validation fields by
`train_scale`. Test fields are never changed, and every study evaluates on the *base* module's test split, so
no condition ever trains on a field another condition is tested on. The dataset-level statistics (``fixed``
normalization, the stored input statistics) are recomputed from the fields actually trained on. What each
run trained on is written to ``<run>/study_splits.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning
import numpy as np
import pandas as pd

from labelling import build, config, studies
from labelling.analysis import downstream, generalization
from labelling.data.restricted import STUDY_DATA, STUDY_KEYS, phenotype_of
from labelling.inference import predict
from labelling.inference.load import load
from labelling.reporting import reports


def study_config(experiment, overrides=None, **study) -> config.Experiment:
    """The experiment with its data section wrapped in ``study`` data with the given restrictions."""
    cfg = experiment if isinstance(experiment, config.Experiment) else config.load(experiment, overrides)
    if isinstance(experiment, config.Experiment) and overrides:
        cfg = config.validate(config.apply_overrides(config.to_dict(cfg), overrides))
    raw = config.to_dict(cfg)
    data = {k: v for k, v in raw["data"].items() if k not in STUDY_KEYS and k != "name"}
    base = raw["data"].get("base", "simulated") if raw["data"]["name"] == STUDY_DATA else raw["data"]["name"]
    raw["data"] = {"name": STUDY_DATA, "base": base, **data, **{k: v for k, v in study.items() if v is not None}}
    cfg = config.validate(raw)
    build.check_components(cfg)
    return cfg


def base_datamodule(cfg: config.Experiment):
    """The unrestricted data module of a study config, set up: its test split is what every study scores."""
    args = {k: v for k, v in cfg.data.args.items() if k not in STUDY_KEYS and k != "base"}
    name = cfg.data.args.get("base", "simulated") if cfg.data.name == STUDY_DATA else cfg.data.name
    dm = build.build_data(config.validate({**config.to_dict(cfg), "data": {"name": name, **args}}))
    dm.setup()
    return dm


class RecordSplits(lightning.Callback):
    """Writes ``study_splits.json``: key, well, phenotype and shape of every field each split of the run held."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        splits = getattr(trainer.datamodule, "splits", None)
        if not splits or not trainer.is_global_zero:
            return
        record = {name: [{"key": im.key, "group": im.group, "phenotype": (im.extra or {}).get("phenotype"),
                          "shape": list(im.input.shape[1:])} for im in images] for name, images in splits.items()}
        Path(trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
        (Path(trainer.default_root_dir) / "study_splits.json").write_text(json.dumps(record, indent=1, default=int))


def train_condition(cfg: config.Experiment, run_dir: Path):
    """Train (or reuse) one run; returns (metrics, trained model, recorded splits)."""
    from labelling.runs.train import check_resume, fit

    run_dir, _ = check_resume(cfg, Path(run_dir))  # resume=false: the fresh numbered folder fit will use
    metrics = fit(cfg, run_dir=run_dir, callbacks=[RecordSplits()])
    task = load(run_dir)
    splits = json.loads((run_dir / "study_splits.json").read_text())
    return metrics, task, splits


def evaluate_condition(task, images, scale: float = 1.0, seg: dict | None = None, seed: int = 0, channel: int = 0):
    """(per-image table, agreement table with null rows) of `images` predicted at `scale` as deployed."""
    real, pred = studies.predict_pairs(task, images, scale=scale, channel=channel)
    null = [predict.predict_null(task, im.raw_input())[channel] for im in images]
    table, corr = downstream.evaluate_pairs(real, pred, [im.key for im in images], seg, studies.true_nuclei(images, task),
                                   null_images=null, seed=seed)
    table.insert(1, "phenotype", [(im.extra or {}).get("phenotype") for im in images])
    return table, corr


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    _pyplot().close(fig)
    return path


def _heatmaps(table: pd.DataFrame, rows: str, cols: str, values: list[str], path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(values), figsize=(3.6 * len(values), 3.2), squeeze=False)
    for ax, value in zip(axes[0], values):
        m = generalization.matrix(table, rows, cols, value).set_index(f"{rows} \\ {cols}")
        ax.imshow(m.to_numpy(float), vmin=-0.1 if value.endswith("pearson") else None, vmax=1.0, cmap="viridis")
        for (i, j), v in np.ndenumerate(m.to_numpy(float)):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=9)
        ax.set(xticks=range(m.shape[1]), xticklabels=m.columns, yticks=range(m.shape[0]),
               yticklabels=[str(i) for i in m.index], xlabel=cols, ylabel=rows, title=value)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _learning_plot(table: pd.DataFrame, path: Path) -> Path:
    fig, axes = _pyplot().subplots(1, 2, figsize=(8, 3.3))
    for ax, value in zip(axes, ("pixel_pearson", "count_ccc")):
        for split, g in table[table["predictor"] == "model"].groupby("split"):
            g = g.sort_values("n_train_fields")
            err = np.abs(np.vstack([g[value] - g[f"{value}_lo"], g[f"{value}_hi"] - g[value]]).astype(float))
            ax.errorbar(g["n_train_fields"], g[value], yerr=np.nan_to_num(err), marker="o", capsize=3, label=split)
        null = table[(table["predictor"] == "null") & (table["split"] == "test")]
        if len(null) and value != "pixel_pearson":
            ax.axhline(float(null[value].mean()), color="grey", ls=":", label="null (test)")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="training fields", ylabel=value, title=f"{value} (95 % CI)")
        ax.legend(fontsize=7)
    return _save(fig, path)


# --------------------------------------------------------------------------- the studies


def phenotype_generalization(experiment, overrides=None, out_dir: str | Path = "runs/studies/phenotypes",
                             phenotypes=(0, 1), include_both: bool = True, match_size: bool = True,
                             seg: dict | None = None, max_images: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Train on one simulated phenotype only (each in turn, optionally on both) and test on each phenotype.

    Every model is scored on the test fields of each phenotype separately; validation (checkpoint selection)
    uses fields of the trained phenotype(s) only. With `match_size` the model trained on both phenotypes gets
    as many training fields as a one-phenotype model (half of each), so the comparison is not about data size.

    Returns the long table: ``train_phenotype`` (an int or ``"both"``), ``test_phenotype``, ``predictor``
    (model / null), ``n`` and the columns of :func:`labelling.analysis.generalization.condition_rows`, plus
    ``n_train_fields``. Writes ``phenotype_generalization.*``, ``phenotype_matrix_*.*``, ``phenotype_gap.*``,
    ``per_image.csv`` (with each image's phenotype), ``phenotype_generalization.png`` and ``report.md``.
    """
    out = Path(out_dir)
    base_cfg = study_config(experiment, overrides)
    dm = base_datamodule(base_cfg)
    test = {p: [im for im in dm.splits["test"] if phenotype_of(im) == p][: max_images or None] for p in phenotypes}
    conditions: list[tuple] = [(p, [p], None) for p in phenotypes]
    if include_both:
        single = min(sum(phenotype_of(im) == p for im in dm.splits["train"]) for p in phenotypes)
        conditions.append(("both", list(phenotypes), single if match_size else None))
    results, per_image, sizes = {}, [], {}
    for label, keep, n_fields in conditions:
        cfg = study_config(base_cfg, phenotypes=keep, train_fields=n_fields)
        _, task, splits = train_condition(cfg, out / "runs" / f"train_phenotype_{label}")
        sizes[label] = len(splits["train"])
        for p, images in test.items():
            table, corr = evaluate_condition(task, images, seg=seg, seed=seed)
            results[(label, p)] = (table, corr)
            per_image.append(table.assign(train_phenotype=label, test_phenotype=p))
    df = generalization.condition_table(results, ("train_phenotype", "test_phenotype"), seed=seed)
    df.insert(2, "n_train_fields", df["train_phenotype"].map(sizes))
    out.mkdir(parents=True, exist_ok=True)
    pd.concat(per_image, ignore_index=True).to_csv(out / "per_image.csv", index=False)
    reports.write_table(df, out, "phenotype_generalization")
    sections = [("Model and null predictor per (train, test) phenotype", df)]
    for value in ("pixel_pearson", "count_ccc"):
        m = generalization.matrix(df.astype({"train_phenotype": str}), "train_phenotype", "test_phenotype", value)
        reports.write_table(m, out, f"phenotype_matrix_{value}")
        sections.append((f"{value}: rows trained on, columns tested on", m))
    gap = generalization.diagonal_gap(df.astype({"train_phenotype": str}), "train_phenotype", "test_phenotype")
    reports.write_table(gap, out, "phenotype_gap")
    sections.append(("Transfer gap of pixel Pearson (other phenotype minus own)", gap))
    plot = _heatmaps(df.astype({"train_phenotype": str}), "train_phenotype", "test_phenotype",
                     ["pixel_pearson", "count_ccc"], out / "phenotype_generalization.png", "phenotype transfer")
    reports.write_report(out, "Phenotype generalization", sections, [plot], notes=NOTES)
    return df


def scaling_matrix(experiment, overrides=None, out_dir: str | Path = "runs/studies/scaling",
                   train_scales=(0.7, 1.0, 1.3), predict_scales=(0.7, 1.0, 1.3), seg: dict | None = None,
                   max_images: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Train at each image scale x predict at each scale (thesis Table 2).

    "Train at 0.7" resizes every training and validation field (input and target) by 0.7, so the model
    learns cells 0.7x as large in pixels. Each model then predicts the native-scale test fields with
    ``predict(..., scale=s)`` (input resized by s, output resized back, scored at native resolution). The
    model sees cells at s/train_scale of the size it was trained on: ``relative_scale``, 1 on the diagonal.

    Returns the long table (``train_scale``, ``predict_scale``, ``relative_scale``, ``predictor``, ``n``,
    pixel Pearson and count agreement with CIs); writes it, the 3x3 pivots ``scaling_matrix_pixel_pearson``
    and ``scaling_matrix_count_ccc``, ``scaling_gap``, ``scaling_matrix.png`` and ``report.md``.
    """
    out = Path(out_dir)
    base_cfg = study_config(experiment, overrides)
    images = base_datamodule(base_cfg).splits["test"][: max_images or None]
    results = {}
    for a in train_scales:
        _, task, _ = train_condition(study_config(base_cfg, train_scale=float(a)), out / "runs" / f"train_scale_{a:g}")
        for s in predict_scales:
            results[(float(a), float(s))] = evaluate_condition(task, images, scale=float(s), seg=seg, seed=seed)
    df = generalization.condition_table(results, ("train_scale", "predict_scale"), seed=seed)
    df.insert(2, "relative_scale", df["predict_scale"] / df["train_scale"])
    out.mkdir(parents=True, exist_ok=True)
    reports.write_table(df, out, "scaling_matrix")
    sections = [("Model and null predictor per (train, predict) scale", df)]
    for value in ("pixel_pearson", "count_ccc"):
        m = generalization.matrix(df, "train_scale", "predict_scale", value)
        reports.write_table(m, out, f"scaling_matrix_{value}")
        sections.append((f"{value}: rows trained at, columns predicted at", m))
    gap = generalization.diagonal_gap(df, "train_scale", "predict_scale")
    reports.write_table(gap, out, "scaling_gap")
    sections.append(("Pixel Pearson off the matched scale minus matched", gap))
    plot = _heatmaps(df, "train_scale", "predict_scale", ["pixel_pearson", "count_ccc"], out / "scaling_matrix.png",
                     "train scale x predict scale")
    reports.write_report(out, "Scaling matrix", sections, [plot], notes=NOTES)
    return df


def learning_curve(experiment, overrides=None, out_dir: str | Path = "runs/studies/learning_curve",
                   sizes=(2, 4, 8, 16, 32), splits=("val", "test"), seg: dict | None = None,
                   max_images: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Pixel Pearson and count agreement (with CIs) vs the number of training fields: will more data help?

    The training sets are nested prefixes of one seeded, phenotype-interleaved field order. Every run has the
    same budget in optimizer steps (``trainer.max_epochs`` x ``crops_per_epoch / batch_size`` random crops,
    whatever the number of fields: a smaller set is revisited more often, not trained for less), and the same
    validation split. Sizes larger than the training split are dropped with a warning.

    Returns the long table (``n_train_fields``, ``split``, ``predictor``, ``n``, scores, ``global_step``,
    ``fit_seconds``, ``best_val_pcc``); writes it, ``learning_curve.png``, ``learning_curve_summary`` (gain per
    doubling at the end of the curve) and ``report.md``.
    """
    from lightning.pytorch.utilities import rank_zero_warn

    out = Path(out_dir)
    base_cfg = study_config(experiment, overrides)
    dm = base_datamodule(base_cfg)
    available = len(dm.splits["train"])
    if any(n > available for n in sizes):
        rank_zero_warn(f"learning curve: the training split holds {available} fields; dropping sizes "
                       f"{[n for n in sizes if n > available]}")
    sizes = sorted({int(n) for n in sizes if n <= available})
    results, extra = {}, {}
    for n in sizes:
        metrics, task, _ = train_condition(study_config(base_cfg, train_fields=n), out / "runs" / f"train_fields_{n}")
        extra[n] = {"global_step": metrics.get("global_step", np.nan), "fit_seconds": metrics.get("fit_seconds", np.nan),
                    "best_val_pcc": metrics.get(f"best/{base_cfg.monitor}", np.nan)}
        for split in splits:
            results[(n, split)] = evaluate_condition(task, dm.splits[split][: max_images or None], seg=seg, seed=seed)
    df = generalization.condition_table(results, ("n_train_fields", "split"), seed=seed)
    for key in ("global_step", "fit_seconds", "best_val_pcc"):
        df[key] = df["n_train_fields"].map(lambda n, key=key: extra[n][key])
    out.mkdir(parents=True, exist_ok=True)
    reports.write_table(df, out, "learning_curve")
    summary = pd.DataFrame([{"split": s, "value": v, **generalization.learning_curve_summary(df, v, s)}
                            for s in splits for v in ("pixel_pearson", "count_ccc")])
    reports.write_table(summary, out, "learning_curve_summary")
    plot = _learning_plot(df, out / "learning_curve.png")
    steps = sorted(set(df["global_step"].dropna().astype(int)))
    notes = NOTES + f" Budget: every run trained for the same number of optimizer steps ({steps})."
    reports.write_report(out, "Learning curve", [("Scores vs training fields", df),
                                                 ("Will more data help? (end of the curve)", summary)], [plot], notes)
    return df


def training_cost(run_dir: str | Path, out_dir: str | Path | None = None, **kwargs) -> pd.DataFrame:
    """:func:`labelling.studies.cost.cost_from_run` of a finished run, written as ``cost.{csv,md}``."""
    from labelling.studies import cost

    df = cost.cost_from_run(run_dir, **kwargs)
    reports.write_table(df, Path(out_dir or run_dir), "cost")
    return df


NOTES = ("Every model predicts through the deployed path (training normalization and de-normalization) on test "
         "fields that no condition trained on. `null` is the blind predictor (the model's training-mean "
         "intensity everywhere): a model must beat it. Brackets / `_lo`, `_hi`: bootstrap 95 % CIs over images; n "
         "is the number of test images of the condition.")


def run_training_studies(cfg, out: Path, which: dict, max_images: int | None = None) -> dict:
    """Run the selected training studies of an experiment config into `out`; returns their tables."""
    tables = {}
    if which.get("phenotypes"):
        tables["phenotypes"] = phenotype_generalization(cfg, out_dir=out / "phenotypes", max_images=max_images)
    if which.get("scaling_matrix"):
        tables["scaling_matrix"] = scaling_matrix(cfg, out_dir=out / "scaling_matrix", max_images=max_images)
    if which.get("learning_curve"):
        tables["learning_curve"] = learning_curve(cfg, out_dir=out / "learning_curve", max_images=max_images)
    return tables
