"""Embeddings of clean and corrupted images: extraction, 2D reduction, clustering, and F1 of corruption detection.

Reducers: ``pca``, ``umap``, ``pca_umap`` (PCA to 50 dims first), ``pacmap``. Clusterers: ``dbscan``,
``hdbscan``, ``kmeans``. A clustering separates clean from corrupted when its clusters are pure: each
cluster is labelled by majority vote and noise points (DBSCAN/HDBSCAN label -1) count as "corrupted"
(outliers), then F1 is computed for the corrupted class. Every comparison is balanced (clean vs one
corruption at one severity, equal counts), so the trivial "all corrupted" answer scores 0.67.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from labelling.analysis.corruptions import corrupt

REDUCERS = ("pca", "umap", "pca_umap", "pacmap")
CLUSTERERS = ("dbscan", "hdbscan", "kmeans")


@torch.no_grad()
def embed_crops(embed_fn, crops: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, C, h, w) normalized crops -> (N, D) embeddings with `embed_fn` (e.g. ``task.embed``)."""
    out = []
    for i in range(0, len(crops), batch_size):
        out.append(embed_fn(torch.from_numpy(np.ascontiguousarray(crops[i:i + batch_size]))).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def grid_crops(images: list[np.ndarray], crop: int) -> np.ndarray:
    """Non-overlapping (C, crop, crop) crops of a list of (C, H, W) images."""
    out = [img[:, t:t + crop, l:l + crop] for img in images
           for t in range(0, img.shape[1] - crop + 1, crop) for l in range(0, img.shape[2] - crop + 1, crop)]
    return np.stack(out).astype(np.float32)


def corrupted_set(crops: np.ndarray, kinds=("blur", "contrast", "brightness"), severities=(-5, -3, 3, 5)):
    """Clean crops plus every (kind, severity) corruption of them, with a label table.

    Returns:
        (all crops (M, C, h, w), DataFrame with columns corruption, severity, corrupted).
    """
    parts, rows = [crops], [{"corruption": "clean", "severity": 0}] * len(crops)
    for kind in kinds:
        for s in severities:
            if kind == "blur" and s < 0:
                continue
            parts.append(np.stack([np.stack([corrupt(c, kind, s) for c in crop]) for crop in crops]))
            rows += [{"corruption": kind, "severity": s}] * len(crops)
    meta = pd.DataFrame(rows)
    meta["corrupted"] = meta["corruption"] != "clean"
    return np.concatenate(parts), meta


def reduce(x: np.ndarray, method: str = "pca", dim: int = 2, seed: int = 0) -> np.ndarray:
    """Reduce (N, D) embeddings to (N, dim)."""
    if method not in REDUCERS:
        raise ValueError(f"unknown reducer '{method}'; valid: {list(REDUCERS)}")
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(dim, random_state=seed).fit_transform(x)
    if method == "pacmap":
        import pacmap

        return pacmap.PaCMAP(n_components=dim, random_state=seed, n_neighbors=min(10, len(x) - 2)).fit_transform(x)
    import umap

    if method == "pca_umap":
        from sklearn.decomposition import PCA

        x = PCA(min(50, x.shape[1], len(x)), random_state=seed).fit_transform(x)
    return umap.UMAP(n_components=dim, random_state=seed, n_neighbors=min(15, len(x) - 1),
                     n_jobs=1).fit_transform(x)


def cluster(x: np.ndarray, method: str = "kmeans", n_clusters: int = 2, seed: int = 0) -> np.ndarray:
    """Cluster labels of (N, d) points; -1 marks noise for density-based methods."""
    if method not in CLUSTERERS:
        raise ValueError(f"unknown clusterer '{method}'; valid: {list(CLUSTERERS)}")
    if method == "kmeans":
        from sklearn.cluster import KMeans

        return KMeans(n_clusters, n_init=10, random_state=seed).fit_predict(x)
    if method == "dbscan":
        from sklearn.cluster import DBSCAN
        from sklearn.neighbors import NearestNeighbors

        k = 5  # eps from the knee of the 5-NN distance distribution (90th percentile)
        d = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)[0][:, -1]
        return DBSCAN(eps=float(np.percentile(d, 90)), min_samples=k).fit_predict(x)
    import hdbscan

    return hdbscan.HDBSCAN(min_cluster_size=max(5, len(x) // 20)).fit_predict(x)


def detection_f1(labels: np.ndarray, corrupted: np.ndarray) -> float:
    """F1 of the corrupted class when each cluster predicts its majority class (noise -> corrupted)."""
    corrupted = np.asarray(corrupted, bool)
    pred = np.ones_like(corrupted)
    for c in np.unique(labels):
        if c == -1:
            continue
        member = labels == c
        pred[member] = corrupted[member].mean() >= 0.5
    tp = int((pred & corrupted).sum())
    fp, fn = int((pred & ~corrupted).sum()), int((~pred & corrupted).sum())
    return 2 * tp / max(2 * tp + fp + fn, 1)


def f1_table(emb: np.ndarray, meta: pd.DataFrame, reducers=REDUCERS, clusterers=CLUSTERERS,
             seed: int = 0) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """F1 of telling corrupted from clean crops, per reducer x clusterer x (corruption, severity).

    Each comparison is balanced: the clean crops against one (corruption, severity) group of the same
    size, clustered in the 2D projection (k-means with k = 2). A clustering that learns nothing scores
    about 0.67 (everything called corrupted) or less, a perfect one 1.0. Returns a long table (one row per
    comparison, with ``f1_mean`` rows per reducer x clusterer) and the 2D projections for plots.
    """
    rows, projections = [], {}
    clean = (meta["corruption"] == "clean").to_numpy()
    groups = meta.loc[~clean, ["corruption", "severity"]].drop_duplicates().itertuples(index=False)
    groups = list(groups)
    for r in reducers:
        z = reduce(emb, r, seed=seed)
        projections[r] = z
        for c in clusterers:
            scores = []
            for kind, sev in groups:
                sel = clean | ((meta["corruption"] == kind) & (meta["severity"] == sev)).to_numpy()
                f1 = detection_f1(cluster(z[sel], c, seed=seed), meta["corrupted"].to_numpy()[sel])
                rows.append({"reducer": r, "clusterer": c, "corruption": kind, "severity": sev, "f1": f1})
                scores.append(f1)
            rows.append({"reducer": r, "clusterer": c, "corruption": "mean", "severity": 0,
                         "f1": float(np.mean(scores))})
    return pd.DataFrame(rows), projections


def f1_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Wide view: reducer x clusterer rows, one column per corruption/severity, plus the mean."""
    t = table.assign(group=table["corruption"] + table["severity"].map(lambda s: f"{s:+d}" if s else ""))
    return t.pivot_table(index=["reducer", "clusterer"], columns="group", values="f1").reset_index()


def plot_projections(projections: dict[str, np.ndarray], meta: pd.DataFrame, path) -> None:
    """One row per reducer: points coloured by corruption kind, and by severity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(projections), 2, figsize=(9, 4 * len(projections)), squeeze=False)
    kinds = sorted(set(meta["corruption"]))
    for row, (name, z) in enumerate(projections.items()):
        ax = axes[row, 0]
        for k in kinds:
            sel = (meta["corruption"] == k).to_numpy()
            ax.scatter(z[sel, 0], z[sel, 1], s=6, label=k, alpha=0.7)
        ax.set_title(f"{name}: corruption")
        ax.legend(markerscale=2, fontsize=7)
        sc = axes[row, 1].scatter(z[:, 0], z[:, 1], c=meta["severity"], cmap="coolwarm", s=6, vmin=-5, vmax=5)
        axes[row, 1].set_title(f"{name}: severity")
        fig.colorbar(sc, ax=axes[row, 1])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
