"""Plots people would rather look at than read: metric curves, stability panels, embedding projections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def plot_lines(df: pd.DataFrame, x: str, columns, path: Path, group: str | None = None, ylabel: str = "value",
               ylim=(-0.1, 1.05)) -> Path:
    """One panel per column: `columns` against `x`, one line per `group` value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in columns if c in df]
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.4), squeeze=False)
    for ax, col in zip(axes[0], columns):
        for name, g in (df.groupby(group) if group else [(col, df)]):
            ax.plot(g[x], g[col], "o-", label=str(name))
        ax.set(xlabel=x, ylabel=col if ylabel == "value" else ylabel, ylim=ylim)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_stability(df: pd.DataFrame, out: Path) -> list[Path]:
    """Per mode: metric vs severity, one line per corruption, plus the network-input change."""
    paths = []
    for mode, g in df[df["corruption"] != "clean"].groupby("mode"):
        paths.append(plot_lines(g, "severity", ["pixel_pearson", "count_ccc", "input_rms_change"],
                                out / f"stability_{mode}.png", group="corruption", ylim=None))
    return paths


def plot_projections(projections: dict[str, np.ndarray], meta: pd.DataFrame, path) -> None:
    """One row per reducer: points coloured by corruption kind (control crops apart), and by severity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = meta["corruption"].astype(str).to_numpy().copy()
    if "source" in meta:
        kind[(meta["source"] == "control").to_numpy()] = "control"
    fig, axes = plt.subplots(len(projections), 2, figsize=(9, 4 * len(projections)), squeeze=False)
    kinds = sorted(set(kind))
    for row, (name, z) in enumerate(projections.items()):
        ax = axes[row, 0]
        for k in kinds:
            sel = kind == k
            ax.scatter(z[sel, 0], z[sel, 1], s=6, label=k, alpha=0.7)
        ax.set_title(f"{name}: corruption (reducer fitted on clean training crops)")
        ax.legend(markerscale=2, fontsize=7)
        sc = axes[row, 1].scatter(z[:, 0], z[:, 1], c=meta["severity"], cmap="coolwarm", s=6, vmin=-5, vmax=5)
        axes[row, 1].set_title(f"{name}: severity")
        fig.colorbar(sc, ax=axes[row, 1])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
