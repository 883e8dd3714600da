"""The thesis studies of a trained stain, each run through the one prediction path (:mod:`labelling.inference.predict`).

Every function takes a trained task and a list of :class:`labelling.data.datamodule.Image` (fields with
their raw input and target) and returns tables; the numbers come from :mod:`labelling.analysis`. The
``evaluate`` command and the run-end callbacks both call these, so a report and a W&B run always agree.

Rules that make the numbers mean what they say:
* predictions start from the *raw* input, normalized and de-normalized as deployed; nothing of the
  evaluated image's target is used to produce its prediction;
* every downstream score has the null predictor (training-mean intensity) beside it;
* corruptions act on the raw image upstream of the deployed normalization, with a camera model;
* embedding reducers are fitted on clean *training* crops; the drift reference is clean *validation*
  fields (never trained on), and its negatives are clean test fields it never saw.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from labelling.analysis import downstream
from labelling.analysis.corruptions import CORRUPTIONS, SEVERITIES, corrupt, grid
from labelling.inference import predict
from labelling.inference.model import as_model
from labelling.reporting import downstream as report


def corrupt_image(raw: np.ndarray, corruption: tuple[str, int] | None, seed: int = 0) -> np.ndarray:
    """Apply ``(kind, severity)`` to every channel of a raw (C, H, W) image (None: unchanged)."""
    if corruption is None or corruption[1] == 0:
        return raw
    return np.stack([corrupt(c, corruption[0], corruption[1], seed=seed) for c in raw])


def corrupt_images(images, corruption: tuple[str, int] | None = None) -> list[np.ndarray]:
    """Raw inputs of `images`, each corrupted with ``(kind, severity)`` (noise seeded by the image's index)."""
    return [corrupt_image(im.raw_input(), corruption, seed=i) for i, im in enumerate(images)]


def predict_pairs(task, images, scale: float = 1.0, corruption=None, normalization: str | None = None,
                  channel: int = 0, tile: int = 256, raws: list[np.ndarray] | None = None):
    """(real targets, predictions) of `images` in target units, for one output channel.

    `raws` are the inputs to predict when already made (default: :func:`corrupt_images` of `corruption`).
    """
    raws = corrupt_images(images, corruption) if raws is None else raws
    pred = [predict.predict(task, raw, scale=scale, tile=tile, normalization=normalization, name=im.key)[channel]
            for raw, im in zip(raws, images)]
    return [im.raw_target()[channel] for im in images], pred


def true_nuclei(images, task, channel: int = 0) -> list[np.ndarray] | None:
    """The simulator's true nucleus masks when target `channel` is nuclei, else None."""
    targets = as_model(task).targets
    if targets[channel:channel + 1] == ["nuclei"] and all(im.extra and "nuclei" in im.extra for im in images):
        return [im.extra["nuclei"] for im in images]
    return None


def downstream_report(task, images, out, seg: dict | None = None, title: str = "Downstream evaluation",
                      seed: int = 0, channel: int = 0, predictions: list[np.ndarray] | None = None):
    """Downstream agreement of `images` (model and null predictor) for one target `channel`, as a report in `out`.

    The report holds the tables, scatter plots, a segmentation preview and warnings when the real images'
    segmentation is implausible. `predictions` are the images' (Cout, H, W) predictions when already made
    (one report per channel of a multi-organelle model shares them). Returns (per-image table, agreement
    table, plots, warnings).
    """
    from pathlib import Path

    from lightning.pytorch.utilities import rank_zero_warn

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if predictions is None:
        real, pred = predict_pairs(task, images, channel=channel)
    else:
        real, pred = [im.raw_target()[channel] for im in images], [p[channel] for p in predictions]
    null = [predict.predict_null(task, im.raw_input())[channel] for im in images]
    table, corr, objects = downstream.evaluate_pairs(real, pred, [im.key for im in images], seg,
                                                     true_nuclei(images, task, channel), return_objects=True,
                                                     null_images=null, seed=seed)
    warnings = downstream.segmentation_warnings(table, real[0].shape)
    for warning in warnings:
        rank_zero_warn(f"{title}: {warning}")
    preview = report.segmentation_preview(real, pred, out / "segmentation_preview.png", seg)
    plots = report.scatter_plots(table, out) + [preview]
    report.write_report(table, corr, out, title=f"{title} (n={len(images)})", images=plots, objects=objects,
                            warnings=warnings)
    return table, corr, plots, warnings


def agreement_row(real, pred, seg: dict | None = None, seed: int = 0, null=None,
                  stats=("pearson", "ccc")) -> dict:
    """THE agreement row of a set of predicted fields, the one every study reports.

    n, pixel Pearson (mean and 95 % CI over fields) and, for every downstream metric, the chosen statistics
    (Pearson, Lin's CCC, bias, MAE) across fields. With `null` (the null predictor's images),
    ``null_<metric>_<stat>`` columns beside them.
    """
    table, corr = downstream.evaluate_pairs(real, pred, seg_args=seg, seed=seed, null_images=null)
    pix = downstream.mean_ci(table["pixel_pearson"], seed=seed)
    row = {"n": len(real), "pixel_pearson": pix["mean"], "pixel_pearson_lo": pix["lo"], "pixel_pearson_hi": pix["hi"]}
    for _, c in corr.iterrows():
        prefix = "null_" if c.get("predictor", "model") == "null" else ""
        for stat in stats:
            row[f"{prefix}{c['metric']}_{stat}"] = c[stat]
    return row


def scaling_study(task, images, scales=(0.7, 1.0, 1.3), seg: dict | None = None) -> pd.DataFrame:
    """Pixel Pearson and downstream agreement when the input is resized by each scale (and the output back)."""
    return pd.DataFrame([{"scale": s, **agreement_row(*predict_pairs(task, images, scale=s), seg)} for s in scales])


def input_change(task, clean_raws, corrupted_raws, normalization: str | None = None) -> float:
    """RMS change of the *network input* (normalized units) caused by a raw-image corruption."""
    dep = as_model(task).deployment
    diffs = [np.mean((dep.normalize_input(bad, normalization) - dep.normalize_input(good, normalization)) ** 2)
             for good, bad in zip(clean_raws, corrupted_raws)]
    return float(np.sqrt(np.mean(diffs)))


def stability_modes(task) -> list[str]:
    """The model's own normalization, plus the fixed (dataset-statistics) view when it differs."""
    own = as_model(task).deployment.normalize
    return [own] if own == "fixed" else [own, "fixed"]


def stability_study(task, images, kinds=tuple(CORRUPTIONS), severities=SEVERITIES, seg: dict | None = None,
                    modes: list[str] | None = None, progress: bool = True) -> pd.DataFrame:
    """Metrics per input normalization mode x corruption x severity, with the network-input change.

    Columns: ``mode`` (the model's own normalization = as deployed, and ``fixed`` = dataset-level
    statistics, where gain and offset changes reach the net), ``corruption``, ``severity``,
    ``input_rms_change`` (normalized units), pixel Pearson and per-metric Pearson/CCC, and ``delta_*`` =
    change from the clean images in the same mode.
    """
    from tqdm.auto import tqdm

    modes = modes or stability_modes(task)
    conditions = [(m, None) for m in modes] + [(m, c) for m in modes for c in grid(kinds, severities)]
    rows, clean, clean_raws = [], {}, corrupt_images(images)
    for mode, corruption in tqdm(conditions, desc="stability", disable=not progress):
        raws = corrupt_images(images, corruption) if corruption else clean_raws
        row = agreement_row(*predict_pairs(task, images, normalization=mode, raws=raws), seg)
        kind, sev = corruption or ("clean", 0)
        base = clean.setdefault(mode, row)
        rows.append({"mode": mode, "corruption": kind, "severity": sev,
                     "input_rms_change": input_change(task, clean_raws, raws, mode) if corruption else 0.0,
                     **row, **{f"delta_{k}": row[k] - base[k] for k in row if k.endswith(("pearson", "ccc"))}})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- embeddings and drift

def crops_of(task, raws: list[np.ndarray], crop: int, normalization: str | None = None) -> np.ndarray:
    """Non-overlapping crops of raw images normalized as deployed (whole image first, then cut)."""
    from labelling.analysis.embeddings import grid_crops

    dep = as_model(task).deployment
    normed = [dep.normalize_input(r, normalization) for r in raws]
    normed = [n for n in normed if min(n.shape[1:]) >= crop]
    if not normed:
        return np.zeros((0, raws[0].shape[0] if raws else 1, crop, crop), np.float32)
    return grid_crops(normed, crop)


def embed_images(task, raws: list[np.ndarray], crop: int, max_crops: int | None = None, seed: int = 0) -> np.ndarray:
    """Bottleneck embeddings of the deployed-normalized crops of raw images."""
    from labelling.analysis.embeddings import embed_crops

    crops = crops_of(task, raws, crop)
    if max_crops is not None and len(crops) > max_crops:
        crops = crops[np.sort(np.random.default_rng(seed).permutation(len(crops))[:max_crops])]
    return embed_crops(as_model(task).embed, crops)


def corrupted_embeddings(task, images, crop: int, kinds=("blur", "contrast", "brightness", "noise"),
                         severities=(-5, -3, 3, 5), max_crops: int = 120, seed: int = 0):
    """Embeddings of clean and raw-corrupted crops of `images` -> (embeddings (N, D), meta table)."""
    parts, rows, clean = [], [], corrupt_images(images)
    for corruption in [None] + grid(kinds, severities):
        raws = [corrupt_image(raw, corruption, seed=i) for i, raw in enumerate(clean)]
        emb = embed_images(task, raws, crop, max_crops, seed)
        kind, sev = corruption or ("clean", 0)
        parts.append(emb)
        rows += [{"corruption": kind, "severity": sev}] * len(emb)
    meta = pd.DataFrame(rows)
    meta["corrupted"] = meta["corruption"] != "clean"
    meta["source"] = "test"
    return np.concatenate(parts), meta


def embedding_study(task, train_images, test_images, control_images, crop: int, reducers=None, clusterers=None,
                    max_crops: int = 120, seed: int = 0, test_embeddings=None):
    """F1 of telling corrupted from clean test crops, reducers fitted on clean *training* crops only.

    `test_embeddings` = :func:`corrupted_embeddings` of `test_images` when already computed (for drift).
    Returns (F1 table, headline dict, projections, meta).
    """
    from labelling.analysis import embeddings

    train = embed_images(task, [im.raw_input() for im in train_images], crop, 2 * max_crops, seed)
    emb, meta = test_embeddings or corrupted_embeddings(task, test_images, crop, max_crops=max_crops, seed=seed)
    if control_images:
        control = embed_images(task, [im.raw_input() for im in control_images], crop, max_crops, seed)
        emb = np.concatenate([emb, control])
        extra = pd.DataFrame({"corruption": "clean", "severity": 0, "corrupted": False, "source": "control"},
                             index=range(len(control)))
        meta = pd.concat([meta, extra], ignore_index=True)
    table, projections = embeddings.f1_table(train, emb, meta, reducers or embeddings.REDUCERS,
                                             clusterers or embeddings.CLUSTERERS, seed=seed)
    return table, embeddings.f1_headline(table), projections, meta


def drift_study(task, reference_images, test_images, crop: int, windows=(5, 10, 20), erts=(32, 64, 128),
                max_crops: int = 120, seed: int = 0, test_embeddings=None) -> dict[str, pd.DataFrame]:
    """MMD test miss rates, online-MMD AUC tables and run lengths.

    The reference should be clean fields the network never trained on (the validation split): a trained
    network embeds its own training crops differently from new ones, so a reference of training crops makes
    every new clean image look drifted (measured: mean run length 58 at ERT 128 on clean test fields). The
    in-distribution negatives are clean crops of test fields the reference never saw. `test_embeddings` =
    :func:`corrupted_embeddings` of `test_images` when already computed (for the embedding study).
    """
    from labelling.analysis import drift

    reference = embed_images(task, [im.raw_input() for im in reference_images], crop, 4 * max_crops, seed)
    emb, meta = test_embeddings or corrupted_embeddings(task, test_images, crop, max_crops=max_crops, seed=seed)
    clean = emb[(meta["corruption"] == "clean").to_numpy()]
    shifted = {(k, s): emb[((meta["corruption"] == k) & (meta["severity"] == s)).to_numpy()]
               for k, s in meta.loc[meta["corrupted"], ["corruption", "severity"]].drop_duplicates().itertuples(index=False)}
    windows = [w for w in windows if len(reference) >= 4 * w and len(clean) >= w]  # the detector needs 4W - 1
    fnr = drift.false_negative_rates(reference, {("clean", 0): clean, **shifted}, window=min(10, len(clean)),
                                     n_windows=20, n_permutations=100, seed=seed)
    online = drift.online_tables(reference, clean, shifted, windows=windows, erts=erts, n_windows=200, seed=seed)
    pools = {"clean (unseen)": clean, **{f"{k}{s:+d}": v for (k, s), v in shifted.items()}}
    runs = pd.concat([drift.run_lengths(reference, pools, window=w, ert=max(erts), n_streams=100, seed=seed)
                      for w in windows], ignore_index=True) if windows else pd.DataFrame()
    return {"drift_fnr": fnr, "drift_online_auc": online, "drift_run_length": runs}


def live_cell_drift(task, reference_images, crop: int, n_wells: int = 4, fields_per_well: int = 6,
                    size: int = 256, live: float = 1.0, windows=(5, 10), ert: float = 128, max_crops: int = 120,
                    seed: int = 0) -> pd.DataFrame:
    """Online-MMD run lengths of a fixed-cell stream vs a live-cell stream (thesis 9.2), calibrated detector.

    Both streams come from a new simulated plate: its fields imaged fixed (in-distribution: the mean run
    length should be near `ert`) and the same fields imaged as live, unfixed cells (rounder, thicker, moving,
    drifting focus - see :func:`labelling.data.simulate.simulate_field`). The reference is `reference_images`
    (clean validation fields the network never trained on).
    """
    from labelling.analysis import drift
    from labelling.data.simulate import simulate_plate

    reference = embed_images(task, [im.raw_input() for im in reference_images], crop, 4 * max_crops, seed)
    plate = {"seed": seed + 1000, "n_wells": n_wells, "fields_per_well": fields_per_well, "size": size}
    pools = {name: embed_images(task, [f.brightfield[None] for f in simulate_plate(**plate, live=level)], crop,
                                max_crops, seed)
             for name, level in (("fixed cells (new plate)", 0.0), (f"live cells (live={live:g})", live))}
    windows = [w for w in windows if len(reference) >= 4 * w]
    return pd.concat([drift.run_lengths(reference, pools, window=w, ert=ert, n_streams=100, seed=seed)
                      for w in windows], ignore_index=True)


# --------------------------------------------------------------------------- flat summaries

def downstream_summary(corr: pd.DataFrame, table: pd.DataFrame, prefix: str = "downstream/") -> dict[str, float]:
    """Flat numbers of a downstream agreement table: ``<metric>_<stat>`` and ``null/<metric>_<stat>``."""
    out = {}
    for _, row in corr.iterrows():
        who = "" if row.get("predictor", "model") == "model" else "null/"
        for key in (*downstream.AGREEMENT, "chance_p95"):
            for suffix in ("", "_lo", "_hi"):
                value = row.get(f"{key}{suffix}")
                if value is not None and np.isfinite(value):
                    out[f"{prefix}{who}{row['metric']}_{key}{suffix}"] = float(value)
        out[f"{prefix}{who}n"] = float(row["n"])
    for col in ("pixel_pearson", "object_f1", "pred_f1", "real_f1"):
        if col in table:
            ci = downstream.mean_ci(table[col])
            out.update({f"{prefix}{col}": ci["mean"], f"{prefix}{col}_lo": ci["lo"], f"{prefix}{col}_hi": ci["hi"]})
    return {k: v for k, v in out.items() if np.isfinite(v)}


def stability_summary(stab: pd.DataFrame) -> dict[str, float]:
    """Worst pixel Pearson per mode and the largest input change of the deployed mode."""
    out = {}
    for mode, g in stab[stab["corruption"] != "clean"].groupby("mode"):
        worst = g.loc[g["pixel_pearson"].idxmin()]
        out[f"stability/{mode}/worst_pixel_pearson"] = float(worst["pixel_pearson"])
        out[f"stability/{mode}/mean_delta_pixel_pearson"] = float(g["delta_pixel_pearson"].mean())
    return out


def drift_summary(found: dict[str, pd.DataFrame]) -> dict[str, float]:
    """Headline drift numbers (mean online AUC, run lengths) from the drift study's tables."""
    online, runs = found["drift_online_auc"], found["drift_run_length"]
    out = {"drift/mean_auc": float(online["auc"].mean()) if len(online) else float("nan")}
    if len(runs):
        clean = runs[runs["name"] == "clean (unseen)"]
        out["drift/clean_mean_run_length"] = float(clean["mean_run_length"].mean())
        out["drift/shifted_mean_run_length"] = float(runs[runs["name"] != "clean (unseen)"]["mean_run_length"].mean())
    return {k: v for k, v in out.items() if np.isfinite(v)}
