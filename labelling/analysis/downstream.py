"""Downstream metrics: per-object and per-image measurements of real vs. predicted fluorescence.

Per image: object count, total area, total and mean intensity. Across images: Pearson and Spearman
between the predicted and the real value of every metric - the question a biologist asks ("would I
have counted the same nuclei?"), not a pixel score.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from skimage import measure

from labelling.analysis.segmentation import segment

IMAGE_METRICS = ("count", "total_area", "total_intensity", "mean_intensity")


def object_table(labels: np.ndarray, image: np.ndarray) -> pd.DataFrame:
    """One row per object: label, area, total and mean intensity, centroid."""
    props = measure.regionprops_table(labels, intensity_image=image,
                                      properties=("label", "area", "intensity_mean", "centroid"))
    df = pd.DataFrame(props).rename(columns={"intensity_mean": "mean_intensity", "centroid-0": "y",
                                             "centroid-1": "x"})
    df["total_intensity"] = df["area"] * df["mean_intensity"]
    return df


def image_metrics(image: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Count, total area, total and mean intensity (over segmented pixels) of one image."""
    fg = labels > 0
    total = float(image[fg].sum()) if fg.any() else 0.0
    return {"count": float(labels.max()), "total_area": float(fg.sum()), "total_intensity": total,
            "mean_intensity": total / max(float(fg.sum()), 1.0)}


def correlate(real: pd.DataFrame, pred: pd.DataFrame, metrics=IMAGE_METRICS) -> pd.DataFrame:
    """Pearson and Spearman of each metric across images (rows aligned)."""
    rows = []
    for m in metrics:
        a, b = real[m].to_numpy(float), pred[m].to_numpy(float)
        ok = len(a) >= 3 and a.std() > 0 and b.std() > 0
        rows.append({"metric": m, "pearson": stats.pearsonr(a, b)[0] if ok else np.nan,
                     "spearman": stats.spearmanr(a, b)[0] if ok else np.nan, "n": len(a),
                     "real_mean": a.mean() if len(a) else np.nan, "pred_mean": b.mean() if len(b) else np.nan})
    return pd.DataFrame(rows)


def evaluate_pairs(real_images, pred_images, names=None, seg_args: dict | None = None,
                   true_labels=None, return_objects: bool = False):
    """Segment every real and predicted image, measure both, correlate.

    Args:
        real_images, pred_images: sequences of 2D arrays in the same intensity units.
        names: image names for the table.
        seg_args: arguments of :func:`segment`.
        true_labels: optional true instance masks; adds object F1 of real and predicted segmentations.

        return_objects: also return the per-object table (image, source real/pred, label, area, intensities).

    Returns:
        (per-image table with ``real_*``/``pred_*`` columns, correlation table[, per-object table]).
    """
    from labelling.analysis.segmentation import match

    seg_args = seg_args or {}
    rows, real_rows, pred_rows, objects = [], [], [], []
    for i, (r, p) in enumerate(zip(real_images, pred_images)):
        lr, lp = segment(r, **seg_args), segment(p, **seg_args)
        if return_objects:
            for source, labels, img in (("real", lr, r), ("pred", lp, p)):
                objects.append(object_table(labels, img).assign(image=names[i] if names else i, source=source))
        mr, mp = image_metrics(r, lr), image_metrics(p, lp)
        row = {"image": names[i] if names else i, **{f"real_{k}": v for k, v in mr.items()},
               **{f"pred_{k}": v for k, v in mp.items()}}
        row["pixel_pearson"] = float(np.corrcoef(r.ravel(), p.ravel())[0, 1])
        if true_labels is not None:
            row["real_f1"] = match(true_labels[i], lr)["f1"]
            row["pred_f1"] = match(true_labels[i], lp)["f1"]
        rows.append(row)
        real_rows.append(mr)
        pred_rows.append(mp)
    table = pd.DataFrame(rows)
    corr = correlate(pd.DataFrame(real_rows), pd.DataFrame(pred_rows))
    if return_objects:
        return table, corr, pd.concat(objects, ignore_index=True) if objects else pd.DataFrame()
    return table, corr


def scatter_plots(table: pd.DataFrame, out_dir: str | Path, prefix: str = "") -> list[Path]:
    """One scatter (real vs predicted, identity line) per metric; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for m in IMAGE_METRICS:
        a, b = table[f"real_{m}"], table[f"pred_{m}"]
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(a, b, s=18)
        lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        r = np.corrcoef(a, b)[0, 1] if len(a) > 2 and a.std() > 0 and b.std() > 0 else np.nan
        ax.set(xlabel=f"real {m}", ylabel=f"predicted {m}", title=f"{m} (r={r:.2f})")
        fig.tight_layout()
        path = out_dir / f"{prefix}scatter_{m}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(table: pd.DataFrame, corr: pd.DataFrame, out_dir: str | Path, title: str = "Downstream",
                 images: list[Path] | None = None, objects: pd.DataFrame | None = None) -> Path:
    """CSV tables (per image, correlations, per object) plus a Markdown and an HTML report with the plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "per_image.csv", index=False)
    if objects is not None:
        objects.to_csv(out_dir / "objects.csv", index=False)
    corr.to_csv(out_dir / "correlations.csv", index=False)
    md = [f"# {title}", "", "## Correlation of predicted vs real (across images)", "",
          corr.to_markdown(index=False, floatfmt=".3f"), "", "## Per image", "",
          table.to_markdown(index=False, floatfmt=".3g"), ""]
    md += [f"![{p.stem}]({p.name})" for p in images or []]
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    html = [f"<html><head><meta charset='utf-8'><title>{title}</title></head><body><h1>{title}</h1>",
            "<h2>Correlation of predicted vs real</h2>", corr.to_html(index=False, float_format="%.3f"),
            "<h2>Per image</h2>", table.to_html(index=False, float_format="%.3g")]
    html += [f"<img src='{p.name}' width='320'>" for p in images or []]
    (out_dir / "report.html").write_text("\n".join(html) + "</body></html>\n")
    return out_dir / "report.md"
