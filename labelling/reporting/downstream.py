"""Downstream reports: scatter plots, segmentation previews and the Markdown/HTML report of an agreement table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from labelling.analysis.downstream import IMAGE_METRICS, _pearson, concordance, mean_ci
from labelling.analysis.segmentation import segment
from labelling.reporting import reports


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
        if f"null_{m}" in table:
            ax.axhline(float(table[f"null_{m}"].mean()), color="grey", ls=":", lw=1, label="null predictor")
            ax.legend(fontsize=7)
        r, ccc = _pearson(a.to_numpy(float), b.to_numpy(float)), concordance(a, b)
        ax.set(xlabel=f"real {m}", ylabel=f"predicted {m}", title=f"{m}: r={r:.2f}, CCC={ccc:.2f}, n={len(a)}")
        fig.tight_layout()
        path = out_dir / f"{prefix}scatter_{m}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def segmentation_preview(real_images, pred_images, path: str | Path, seg_args: dict | None = None, n: int = 3) -> Path:
    """Real and predicted fields with their segmentation outlines (the first `n`), as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    pairs = list(zip(real_images, pred_images))[:n]
    fig, axes = plt.subplots(len(pairs), 2, figsize=(7, 3.4 * len(pairs)), squeeze=False)
    for row, (real, pred) in enumerate(pairs):
        for col, (img, title) in enumerate(((real, "real"), (pred, "predicted"))):
            labels = segment(img, **(seg_args or {}))
            lo, hi = np.percentile(img, (0.5, 99.5))
            axes[row, col].imshow(img, cmap="gray", vmin=lo, vmax=hi)
            edges = np.ma.masked_where(~find_boundaries(labels), np.ones(labels.shape))
            axes[row, col].imshow(edges, cmap="autumn", alpha=0.9)
            axes[row, col].set_title(f"{title}: {int(labels.max())} objects", fontsize=9)
            axes[row, col].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def write_report(table: pd.DataFrame, corr: pd.DataFrame, out_dir: str | Path, title: str = "Downstream",
                 images: list[Path] | None = None, objects: pd.DataFrame | None = None,
                 warnings: list[str] | None = None) -> Path:
    """CSV tables (per image, agreement, per object) plus a Markdown and an HTML report with the plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "per_image.csv", index=False)
    if objects is not None:
        objects.to_csv(out_dir / "objects.csv", index=False)
    corr.to_csv(out_dir / "agreement.csv", index=False)
    summary = reports.agreement_table(corr)
    extra = {}
    if "pixel_pearson" in table:
        extra["pixel Pearson (mean over images)"] = mean_ci(table["pixel_pearson"])
    if "object_f1" in table:
        extra["object F1, predicted vs real segmentation (IoU > 0.5)"] = mean_ci(table["object_f1"])
    sections = [("Agreement of predicted with real, across images", summary),
                ("Image-level means (95 % CI)", reports.mean_ci_table(extra)),
                ("Per image", table)]
    notes = "".join(f"WARNING: {w}\n\n" for w in warnings or []) + REPORT_NOTES
    return reports.write_report(out_dir, title, sections, images or [], notes=notes)


REPORT_NOTES = (
    "Predictions come from the deployed prediction path (training normalization, training-set "
    "de-normalization; nothing from the evaluated image but its input pixels). `null` is a blind predictor "
    "that outputs the training-mean intensity everywhere: a model must beat it. CCC is Lin's concordance "
    "(1 only when predicted equals real); bias is mean(predicted)/mean(real); brackets are bootstrap 95 % "
    "CIs over images; `chance |r| p95` is the 95th percentile of |Pearson| when predictions are paired "
    "with the wrong images.")
