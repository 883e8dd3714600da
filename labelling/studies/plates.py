"""Score a whole plate's predictions against its real channels, per field and per well.

``labelling evaluate RUN --plate P.zarr`` reads, one field at a time, each real target channel and the
``<target>_predicted`` channel written by ``labelling predict RUN P.zarr`` (or by ``--predictions``
another plate), segments both, and compares counts, areas and intensities with the agreement statistics of
every downstream report (Pearson, Lin's CCC, bias, MAE with bootstrap CIs, n, and the null predictor's row).
Wells are scored on their summed counts, areas and intensities (mean intensity averaged).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from labelling.analysis import downstream
from labelling.data import plate as plates
from labelling.errors import ConfigError
from labelling.inference import plates as platepredict
from labelling.inference import predict
from labelling.reporting import reports


def provenance_problem(model, record: dict, plate_path: str) -> str | None:
    """Why a plate's stored prediction is not this model's prediction of this plate (None when it is)."""
    if record.get("model_sha256") != model.fingerprint:
        return (f"made by {record.get('run') or 'an unknown model'} (weights sha256 "
                f"{str(record.get('model_sha256'))[:12]}), not by this model ({model.fingerprint[:12]})")
    source = record.get("source_plate")
    if source and Path(source).resolve() != Path(plate_path).resolve():
        return f"predicted from plate {source}, not from {plate_path}"
    return None


def field_rows(task, plate: plates.Plate, preds: plates.Plate, field: plates.Field, seg: dict,
               accept_other: bool = False) -> list[dict]:
    """One row per target channel of a field: real/pred/null image metrics and the pixel Pearson r.

    Predictions another model made, or made from another plate, are refused (ConfigError) unless
    `accept_other`.
    """
    targets = task.targets
    names = platepredict.predicted_names(task)
    done = preds.attrs(field).get("predictions", {})
    rows = []
    for target, name in zip(targets, names):
        if not done.get(name, {}).get("complete"):
            continue
        problem = provenance_problem(task, done[name], plate.path)
        if problem and not accept_other:
            raise ConfigError(f"{preds.path} field {field.path}: the channel {name} was {problem}. Predict the "
                              "plate with this model first (labelling predict MODEL PLATE), or pass "
                              "--accept-other-predictions to score them as they are")
        plane = int(done[name].get("plane", 0))
        real_plane = plane if plate.shape(field)[2] > plane else 0
        real = plate.read(field, [target], [real_plane])[0]
        pred = preds.read(field, [name], [plane])[0]
        null = predict.predict_null(task, real[None])[targets.index(target)]
        table, _ = downstream.evaluate_pairs([real], [pred], [field.name], seg, null_images=[null])
        rows.append({"channel": target, "well": field.well, "field": field.path, **table.iloc[0].to_dict()})
    return rows


def well_table(fields: pd.DataFrame) -> pd.DataFrame:
    """Per-well sums of counts, areas and total intensities (mean intensity: the fields' average)."""
    summed = [f"{who}_{m}" for who in ("real", "pred", "null") for m in ("count", "total_area", "total_intensity")]
    averaged = [f"{who}_mean_intensity" for who in ("real", "pred", "null")]
    keys = ["channel", "well"]
    return (fields.groupby(keys)[[c for c in summed if c in fields]].sum()
            .join(fields.groupby(keys)[[c for c in averaged if c in fields]].mean())
            .join(fields.groupby(keys).size().rename("fields")).reset_index())


def agreement(table: pd.DataFrame) -> pd.DataFrame:
    """Model and null agreement rows of a per-field or per-well table (one channel)."""
    metrics = list(downstream.IMAGE_METRICS)
    real = table[[f"real_{m}" for m in metrics]].set_axis(metrics, axis=1)
    out = [downstream.correlate(real, table[[f"pred_{m}" for m in metrics]].set_axis(metrics, axis=1))
           .assign(predictor="model")]
    if f"null_{metrics[0]}" in table:
        out.append(downstream.correlate(real, table[[f"null_{m}" for m in metrics]].set_axis(metrics, axis=1))
                   .assign(predictor="null"))
    return pd.concat(out, ignore_index=True)


def evaluate_plate(model: str | Path, plate_path: str | Path, predictions: str | Path | None = None,
                   wells: list[str] | None = None, seg: dict | None = None, out: str | Path | None = None,
                   progress: bool = True, accept_other: bool = False) -> dict[str, float]:
    """Per-field and per-well downstream agreement of a plate's predicted channels; returns summary numbers.

    Writes ``fields.csv``, ``wells.csv``, agreement tables and ``report.md``/``.html`` to `out`
    (default ``<plate>_evaluation`` next to the plate).
    """
    from tqdm import tqdm

    from labelling.inference.load import load

    task = load(model)
    cfg = task.config
    plate = plates.Plate(plate_path)
    preds = plates.Plate(predictions or plate_path)
    stored = next((c.args.get("seg") for c in getattr(cfg, "callbacks", []) if c.name == "downstream"), None) or {}
    seg = {**stored, **(seg or {})}
    rows = []
    for field in tqdm(plate.select(wells), desc="scoring fields", unit="field", disable=not progress):
        rows += field_rows(task, plate, preds, field, seg, accept_other) if field in preds.fields else []
    if not rows:
        raise ConfigError(f"no field of {preds.path} holds finished predictions of this model "
                          f"({', '.join(platepredict.predicted_names(task))}); run `labelling predict {model} "
                          f"{plate_path}` first")
    fields = pd.DataFrame(rows)
    wells_ = well_table(fields)
    out = Path(out or f"{str(plate_path).rstrip('/').removesuffix('.zarr')}_evaluation")
    out.mkdir(parents=True, exist_ok=True)
    fields.to_csv(out / "fields.csv", index=False)
    wells_.to_csv(out / "wells.csv", index=False)
    summary, sections = {}, []
    for channel in fields["channel"].unique():
        for level, table in (("field", fields), ("well", wells_)):
            part = table[table["channel"] == channel]
            corr = agreement(part)
            reports.write_table(corr, out, f"{channel}_{level}_agreement")
            sections.append((f"{channel}: agreement per {level} (n = {len(part)})", reports.agreement_table(corr)))
            for _, row in corr[corr["predictor"] == "model"].iterrows():
                for key in ("pearson", "ccc", "mae"):
                    summary[f"plate/{channel}/{level}/{row['metric']}_{key}"] = float(row[key])
        ci = downstream.mean_ci(fields.loc[fields["channel"] == channel, "pixel_pearson"])
        summary[f"plate/{channel}/pixel_pearson"] = ci["mean"]
        sections.append((f"{channel}: pixel Pearson r per field", reports.mean_ci_table({"pixel r": ci})))
    summary["plate/fields"], summary["plate/wells"] = float(fields["field"].nunique()), float(len(wells_))
    reports.write_report(out, f"Plate evaluation - {Path(str(plate_path)).name}", sections, [],
                         notes="Real vs predicted channels of every scored field; wells sum their fields. "
                               "The null row predicts the training-mean intensity everywhere.")
    return {k: v for k, v in summary.items() if np.isfinite(v)}
