"""Generalization tables of the multi-training studies: phenotype transfer, image scale, training-set size.

Pure functions (per-condition result tables in, DataFrame out; no Lightning, no I/O). A *condition* is one
trained model evaluated on one set of images in one way, e.g. (train phenotype 0, test phenotype 1) or
(train scale 0.7, predict scale 1.3). Its result is the pair returned by
:func:`labelling.analysis.downstream.evaluate_pairs` with ``null_images``: the per-image table and the
agreement table (model and null predictor rows). :func:`condition_rows` flattens one such pair into two rows,
the model's and the null predictor's, so every score in these tables has the blind baseline beside it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from labelling.analysis.downstream import mean_ci

PREDICTORS = ("model", "null")
STATS = ("pearson", "ccc", "bias", "mae")


def condition_rows(per_image: pd.DataFrame, agreement: pd.DataFrame, metrics=("count",), seed: int = 0) -> pd.DataFrame:
    """Two rows (``predictor`` = model, null) summarizing one condition.

    Columns: ``predictor``, ``n`` (images), ``pixel_pearson`` with ``_lo``/``_hi`` (mean over images, bootstrap
    95 % CI), ``object_f1`` (+ CI) and, on the simulator's nuclei, ``pred_f1`` (segmentation of the
    prediction vs the true nuclei, + CI), then ``<metric>_<stat>`` with ``_lo``/``_hi`` for every metric in
    `metrics` and stat in :data:`STATS`.

    The null predictor is constant in space, so its pixel Pearson is 0 by the convention of
    :mod:`labelling.analysis.downstream` (no covariance, no association) and its object scores are left out
    (NaN): it has no objects of its own worth matching.
    """
    rows = []
    for predictor in PREDICTORS:
        corr = agreement[agreement.get("predictor", "model") == predictor] if len(agreement) else agreement
        if predictor == "null" and not len(corr):
            continue
        row: dict = {"predictor": predictor, "n": int(len(per_image))}
        for col in ("pixel_pearson", "object_f1", "pred_f1"):
            if col not in per_image:
                continue
            if predictor == "model":
                ci = mean_ci(per_image[col], seed=seed)
                row.update({col: ci["mean"], f"{col}_lo": ci["lo"], f"{col}_hi": ci["hi"]})
            else:
                value = 0.0 if col == "pixel_pearson" else np.nan
                row.update({col: value, f"{col}_lo": value, f"{col}_hi": value})
        for metric in metrics:
            found = corr[corr["metric"] == metric]
            for stat in STATS:
                for suffix in ("", "_lo", "_hi"):
                    key = f"{stat}{suffix}"
                    row[f"{metric}_{key}"] = float(found.iloc[0][key]) if len(found) and key in found else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def condition_table(results: dict, keys: tuple[str, ...], metrics=("count",), seed: int = 0) -> pd.DataFrame:
    """Long table of many conditions: one model row and one null row per condition.

    Args:
        results: ``{condition: (per_image, agreement)}``; a condition is a tuple of values named by `keys`
            (a scalar when there is one key).
        keys: names of the condition columns, e.g. ``("train_phenotype", "test_phenotype")``.
        metrics: downstream metrics to report (see :func:`condition_rows`).
        seed: seed of the bootstrap confidence intervals.
    """
    parts = []
    for condition, (per_image, agreement) in results.items():
        values = condition if isinstance(condition, tuple) else (condition,)
        if len(values) != len(keys):
            raise ValueError(f"condition {condition!r} does not match the keys {keys}")
        rows = condition_rows(per_image, agreement, metrics, seed)
        for key, value in reversed(list(zip(keys, values))):
            rows.insert(0, key, [value] * len(rows))
        parts.append(rows)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*keys, "predictor", "n"])


def matrix(table: pd.DataFrame, rows: str, cols: str, value: str, predictor: str = "model") -> pd.DataFrame:
    r"""Pivot of one value, `rows` down and `cols` across, for one predictor.

    The row labels are a column (``"<rows> \ <cols>"``) so the table writes as CSV/Markdown without an index.
    """
    sub = table[table["predictor"] == predictor] if "predictor" in table else table
    pivot = sub.pivot_table(index=rows, columns=cols, values=value, aggfunc="first", sort=True, dropna=False)
    pivot.columns = [str(c) for c in pivot.columns]
    return pivot.reset_index().rename(columns={rows: f"{rows} \\ {cols}"})


def diagonal_gap(table: pd.DataFrame, rows: str, cols: str, value: str = "pixel_pearson",
                 predictor: str = "model") -> pd.DataFrame:
    """How much `value` drops off the diagonal: each off-diagonal condition vs its row's matched one.

    For the phenotype study the diagonal is in-domain (trained and tested on the same phenotype) and the
    off-diagonal cells are transfer to the other phenotype; for the scaling study the diagonal is the matched
    scale. Rows whose label never appears among the columns (e.g. ``train_phenotype = "both"``) are skipped.

    Returns columns `rows`, `cols`, ``matched`` (the row's diagonal value), ``value`` and ``gap`` = value -
    matched (negative: worse off the diagonal).
    """
    sub = table[table["predictor"] == predictor] if "predictor" in table else table
    out = []
    for label, group in sub.groupby(rows, sort=True):
        diagonal = group[group[cols].astype(str) == str(label)]
        if not len(diagonal):
            continue
        matched = float(diagonal.iloc[0][value])
        for _, r in group[group[cols].astype(str) != str(label)].iterrows():
            out.append({rows: label, cols: r[cols], "matched": matched, "value": float(r[value]),
                        "gap": float(r[value]) - matched})
    return pd.DataFrame(out, columns=[rows, cols, "matched", "value", "gap"])


def learning_curve_summary(table: pd.DataFrame, value: str = "pixel_pearson", split: str = "test",
                           size: str = "n_train_fields", last: int = 3) -> dict[str, float]:
    """Will more data help? The gain per doubling of the training set at the end of the curve.

    Returns ``gain_per_doubling`` (least-squares slope of `value` against log2(size) over the `last` largest
    sizes), ``last_doubling_gain`` (value at the largest size minus the value at the next smaller one),
    ``last_ci_overlap`` (1.0 when the CIs of those two points overlap: the last step is within noise), and
    ``largest`` and ``value_at_largest``.
    """
    sub = table[(table.get("predictor", "model") == "model")]
    if "split" in sub:
        sub = sub[sub["split"] == split]
    sub = sub.sort_values(size)
    nan = {"gain_per_doubling": np.nan, "last_doubling_gain": np.nan, "last_ci_overlap": np.nan,
           "largest": np.nan, "value_at_largest": np.nan}
    if len(sub) < 2:
        return nan if not len(sub) else {**nan, "largest": float(sub[size].iloc[-1]),
                                          "value_at_largest": float(sub[value].iloc[-1])}
    tail = sub.tail(last)
    x, y = np.log2(tail[size].to_numpy(float)), tail[value].to_numpy(float)
    slope = float(np.polyfit(x, y, 1)[0]) if len(tail) >= 2 and np.ptp(x) > 0 else np.nan
    a, b = sub.iloc[-2], sub.iloc[-1]
    overlap = np.nan
    if f"{value}_lo" in sub and np.isfinite([a[f"{value}_lo"], a[f"{value}_hi"], b[f"{value}_lo"], b[f"{value}_hi"]]).all():
        overlap = float(a[f"{value}_hi"] >= b[f"{value}_lo"] and b[f"{value}_hi"] >= a[f"{value}_lo"])
    return {"gain_per_doubling": slope, "last_doubling_gain": float(b[value] - a[value]), "last_ci_overlap": overlap,
            "largest": float(b[size]), "value_at_largest": float(b[value])}
