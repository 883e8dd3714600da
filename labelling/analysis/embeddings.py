"""Embeddings of clean and corrupted images: extraction, 2D reduction, clustering, and F1 of corruption detection.

Protocol (chosen so that a shift that is not there scores at chance, and chance is measured, not assumed):

* **Reducers** (``pca``, ``umap``, ``pca_umap`` = PCA to <= 50 dims then UMAP, ``pacmap``) are fitted on
  clean *training* embeddings only (:func:`fit_reducer`; standardized with the training mean/sd) and then
  applied with ``transform`` to the evaluated crops, so the projection never sees a corruption. Caveat:
  UMAP/PaCMAP ``transform`` places a new point next to its nearest *training* points, so an
  out-of-distribution group is pulled onto the edge of the clean map rather than extrapolated like PCA.
* **Clusterers**: ``dbscan``, ``hdbscan``, ``kmeans`` (k = 2) on the 2-D projection.
* **Cluster -> label** (:func:`detection_f1`): every cluster, *including the noise points* (-1) as one group
  of their own, predicts the label held by the majority of its members (the mapping that maximizes
  agreement; for two groups on balanced data it is the one-to-one/Hungarian optimum). Noise is therefore
  not automatically "corrupted". An exact tie (equal counts) is broken by a seeded coin flip, never
  systematically toward one class, so one cluster on balanced data scores 0.667 or 0 (expected ~0.33).
  F1 is that of the corrupted class.
* **Comparisons** (:func:`f1_table`) are balanced (clean test crops vs the same number of one
  (corruption, severity) group's crops) and scored against a permutation null: the same clustering
  scored against ``n_shuffles`` shuffled label vectors (``chance_mean``, ``chance_p95``, ``p_value``). A
  clean-vs-clean ``control`` row per configuration should sit at chance.
* **Headline** (:func:`f1_headline`): the mean over configurations of the per-configuration mean F1, with
  its spread; the best configuration is reported separately and is not the headline.
"""

from __future__ import annotations

from collections.abc import Sequence

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

    Legacy helper (corrupts normalized crops); prefer corrupting raw images upstream.

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


# ----------------------------------------------------------------------------------------------- reducers
class FittedReducer:
    """A 2-D (``dim``-D) projection fitted once on training embeddings; :meth:`transform` never refits.

    Attributes: ``method``, ``mean_``/``scale_`` (training standardization), ``pca_`` (sklearn PCA for
    ``pca`` and ``pca_umap``, else None), ``model_`` (the fitted ``umap.UMAP`` / ``pacmap.PaCMAP``, else
    None), ``embedding_`` (the training points' own coordinates).
    """

    def __init__(self, method: str = "pca", dim: int = 2, seed: int = 0, **kwargs):
        if method not in REDUCERS:
            raise ValueError(f"unknown reducer '{method}'; valid: {list(REDUCERS)}")
        self.method, self.dim, self.seed, self.kwargs = method, dim, seed, kwargs
        self.pca_ = self.model_ = self.embedding_ = None

    def _standardize(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) - self.mean_) / self.scale_

    def fit(self, x: np.ndarray) -> FittedReducer:
        from sklearn.decomposition import PCA

        x = np.asarray(x, np.float64)
        n, d = x.shape
        self.mean_ = x.mean(0)
        sd = x.std(0)
        self.scale_ = np.where(sd > 1e-8, sd, 1.0)  # constant features stay constant, not blown up
        x = self._standardize(x)
        if self.method == "pca":
            self.pca_ = PCA(min(self.dim, n, d), random_state=self.seed).fit(x)
            self.embedding_ = self.pca_.transform(x)
            return self
        if self.method == "pca_umap":
            self.pca_ = PCA(min(50, n, d), random_state=self.seed).fit(x)
            x = self.pca_.transform(x)
        if self.method == "pacmap":
            import pacmap

            kw = {"n_neighbors": min(10, n - 2), **self.kwargs}
            # save_tree=True keeps the kNN index so that transform() can place new points (pacmap >= 0.7)
            self.model_ = pacmap.PaCMAP(n_components=self.dim, random_state=self.seed, save_tree=True, **kw)
        else:
            import umap

            kw = {"n_neighbors": min(15, n - 1), "n_jobs": 1, **self.kwargs}
            self.model_ = umap.UMAP(n_components=self.dim, random_state=self.seed, **kw)
        self.embedding_ = np.asarray(self.model_.fit_transform(x.astype(np.float32)))
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Project new embeddings (N, D) -> (N, dim) with the training fit (no refitting)."""
        if self.embedding_ is None:
            raise RuntimeError("fit the reducer first")
        x = self._standardize(x)
        if self.pca_ is not None:
            x = self.pca_.transform(x)
        if self.model_ is None:
            return x
        return np.asarray(self.model_.transform(x.astype(np.float32)), np.float64)


def fit_reducer(train_emb: np.ndarray, method: str = "pca", dim: int = 2, seed: int = 0, **kwargs) -> FittedReducer:
    """Fit a reducer on (clean, training) embeddings; apply it to other data with ``.transform(x)``.

    ``kwargs`` go to ``umap.UMAP`` / ``pacmap.PaCMAP`` (e.g. ``n_epochs``, ``n_neighbors``).
    """
    return FittedReducer(method, dim, seed, **kwargs).fit(train_emb)


def reduce(x: np.ndarray, method: str = "pca", dim: int = 2, seed: int = 0) -> np.ndarray:
    """In-sample (N, D) -> (N, dim) projection of `x` fitted on `x` itself (plots only, not for scoring)."""
    return fit_reducer(x, method, dim, seed).embedding_


# ------------------------------------------------------------------------------------ clustering and F1
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


def _f1_batch(labels: np.ndarray, truths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """F1 of the corrupted class for one clustering against S label vectors ``truths`` (S, N) -> (S,).

    Each group of ``labels`` (noise -1 is one group like any other) predicts its majority label; exact
    ties are decided by a fair coin from ``rng`` (one flip per group and label vector).
    """
    _, inv = np.unique(np.asarray(labels), return_inverse=True)
    inv = inv.ravel()
    size = np.bincount(inv).astype(np.int64)  # (G,)
    onehot = np.zeros((len(inv), len(size)), np.int64)
    onehot[np.arange(len(inv)), inv] = 1
    truths = np.asarray(truths, bool)
    n_corr = truths.astype(np.int64) @ onehot  # (S, G) corrupted members per group
    n_clean = size - n_corr
    coin = rng.random(n_corr.shape) < 0.5
    pred = (n_corr > n_clean) | ((n_corr == n_clean) & coin)  # group predicted "corrupted"
    tp = (pred * n_corr).sum(1)
    fp = (pred * n_clean).sum(1)
    fn = truths.sum(1) - tp
    return 2 * tp / np.maximum(2 * tp + fp + fn, 1)


def detection_f1(labels: np.ndarray, corrupted: np.ndarray, seed: int | Sequence[int] = 0) -> float:
    """F1 of the corrupted class when every cluster predicts its majority label.

    Noise points (-1) form their own group (not automatically "corrupted"). An exact tie within a group
    is broken by a coin flip seeded with `seed` (an int or a sequence of ints for ``np.random.default_rng``):
    e.g. a single cluster on balanced data scores 0.667 or 0 depending on the seed (expected ~0.33), never
    0.667 systematically.
    """
    corrupted = np.asarray(corrupted, bool)
    return float(_f1_batch(labels, corrupted[None], np.random.default_rng(seed))[0])


def shuffled_f1(labels: np.ndarray, corrupted: np.ndarray, n_shuffles: int = 200,
                seed: int | Sequence[int] = 0) -> np.ndarray:
    """Permutation null: F1 of the same clustering against `n_shuffles` shuffled copies of `corrupted`.

    (Ties broken by coin flips as in :func:`detection_f1`).
    """
    corrupted = np.asarray(corrupted, bool)
    rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), 1])
    perms = np.stack([rng.permutation(corrupted) for _ in range(n_shuffles)]) if n_shuffles else \
        np.zeros((0, len(corrupted)), bool)
    return _f1_batch(labels, perms, rng)


def _score(z, truth, clusterer, seed, n_shuffles, tie_seed):
    labels = cluster(z, clusterer, seed=seed)
    return detection_f1(labels, truth, tie_seed), shuffled_f1(labels, truth, n_shuffles, tie_seed)


def _row(r, c, kind, sev, f1, null, n):
    chance = {"chance_mean": float(null.mean()), "chance_p95": float(np.percentile(null, 95)),
              "p_value": float((1 + (null >= f1 - 1e-12).sum()) / (1 + len(null)))} if len(null) else \
        {"chance_mean": np.nan, "chance_p95": np.nan, "p_value": np.nan}
    return {"reducer": r, "clusterer": c, "corruption": kind, "severity": sev, "f1": float(f1), **chance, "n": int(n)}


def f1_table(train_emb: np.ndarray, emb: np.ndarray, meta: pd.DataFrame, reducers=REDUCERS, clusterers=CLUSTERERS,
             seed: int = 0, n_shuffles: int = 200) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """F1 of telling corrupted from clean crops, per reducer x clusterer x (corruption, severity).

    Args:
        train_emb: (M, D) clean *training* embeddings; each reducer is fitted on these only.
        emb: (N, D) evaluated embeddings, one row per row of `meta`, projected with ``transform``.
        meta: columns ``corruption`` ("clean" or a kind), ``severity``, (``corrupted``, = corruption !=
            "clean"; not needed) and optionally ``source``: "test" rows and "control" rows (clean crops of
            other unseen images). Without ``source`` every row is "test".
        reducers: names of the 2-D projections to compare.
        clusterers: names of the clusterings to compare.
        seed: seed of the subsampling, projections, clusterings and coin flips.
        n_shuffles: permutations for the chance level.

    Each comparison is balanced: the clean test crops vs the same number of one (corruption, severity)
    group's crops (the larger side is subsampled, seeded; tie coin flips are seeded per comparison from
    ``[seed, reducer index, clusterer index, comparison index]``), clustered in the 2-D projection and scored by
    :func:`detection_f1` against membership of the group. Columns: reducer, clusterer, corruption,
    severity, f1, chance_mean, chance_p95 (mean and 95th percentile of the same clustering's F1 against
    shuffled labels), p_value (permutation p of f1), n (crops per side; 2n clustered). Per reducer x
    clusterer there is also a ``control`` row (clean test vs control crops, else two random halves of the
    clean test crops; should sit at chance) and a ``mean`` row (mean over the corruption groups, control
    excluded; its chance columns come from the null distribution of that mean). Returns (table,
    projections: reducer -> (N, 2) transform of `emb`).
    """
    if len(emb) != len(meta):
        raise ValueError(f"emb has {len(emb)} rows but meta has {len(meta)}")
    meta = meta.reset_index(drop=True)
    source = meta["source"].astype(str).to_numpy() if "source" in meta else np.full(len(meta), "test")
    test = source == "test"
    clean_idx = np.flatnonzero(test & (meta["corruption"] == "clean").to_numpy())
    control_idx = np.flatnonzero((source == "control") & (meta["corruption"] == "clean").to_numpy())
    if len(clean_idx) < 4:
        raise ValueError("need clean test crops (corruption == 'clean', source == 'test')")
    groups = meta.loc[test & (meta["corruption"] != "clean").to_numpy(), ["corruption", "severity"]]
    groups = list(groups.drop_duplicates().itertuples(index=False, name=None))

    rng = np.random.default_rng(seed)
    comparisons = []  # (kind, severity, clean indices, other indices), same for every configuration
    for kind, sev in groups:
        other = np.flatnonzero(test & (meta["corruption"] == kind).to_numpy() & (meta["severity"] == sev).to_numpy())
        m = min(len(clean_idx), len(other))
        comparisons.append((kind, sev, np.sort(rng.choice(clean_idx, m, replace=False)),
                            np.sort(rng.choice(other, m, replace=False))))
    if len(control_idx):
        m = min(len(clean_idx), len(control_idx))
        a, b = np.sort(rng.choice(clean_idx, m, replace=False)), np.sort(rng.choice(control_idx, m, replace=False))
    else:
        perm = rng.permutation(clean_idx)
        a, b = np.sort(perm[:len(perm) // 2]), np.sort(perm[len(perm) // 2:2 * (len(perm) // 2)])
    control = ("control", 0, a, b)

    rows, projections = [], {}
    for ri, r in enumerate(reducers):
        z = fit_reducer(train_emb, r, seed=seed).transform(emb)
        projections[r] = z
        for ci, c in enumerate(clusterers):
            f1s, nulls, ns = [], [], []
            for gi, (kind, sev, ia, ib) in enumerate(comparisons + [control]):
                sel = np.concatenate([ia, ib])
                truth = np.r_[np.zeros(len(ia), bool), np.ones(len(ib), bool)]
                # independent (but seeded) tie coin flips per comparison, so ties do not all fall one way
                f1, null = _score(z[sel], truth, c, seed, n_shuffles, tie_seed=[seed, ri, ci, gi])
                rows.append(_row(r, c, kind, sev, f1, null, len(ia)))
                if kind != "control":
                    f1s.append(f1), nulls.append(null), ns.append(len(ia))
            if f1s:
                rows.append(_row(r, c, "mean", 0, np.mean(f1s), np.mean(nulls, 0), sum(ns)))
    return pd.DataFrame(rows), projections


def f1_headline(table: pd.DataFrame) -> dict:
    """Headline of an :func:`f1_table`: the mean over configurations of the per-configuration mean F1.

    Returns a dict: f1_mean, f1_sd (across configurations, ddof=1), f1_min, f1_max, n_configs, best_config
    ("reducer/clusterer", shown separately: a max over configurations is optimistic), best_f1,
    chance_mean and chance_p95 (mean over configurations of the mean rows' chance levels), f1_over_chance
    (f1_mean - chance_mean), control_f1 and control_chance_p95 (mean over configurations).
    """
    m = table[table["corruption"] == "mean"]
    ctl = table[table["corruption"] == "control"]
    if m.empty:
        raise ValueError("table has no 'mean' rows")
    best = m.loc[m["f1"].idxmax()]
    f1 = m["f1"].to_numpy(float)
    return {"f1_mean": float(f1.mean()), "f1_sd": float(f1.std(ddof=1)) if len(f1) > 1 else 0.0,
            "f1_min": float(f1.min()), "f1_max": float(f1.max()), "n_configs": int(len(f1)),
            "best_config": f"{best['reducer']}/{best['clusterer']}", "best_f1": float(best["f1"]),
            "chance_mean": float(m["chance_mean"].mean()), "chance_p95": float(m["chance_p95"].mean()),
            "f1_over_chance": float(f1.mean() - m["chance_mean"].mean()),
            "control_f1": float(ctl["f1"].mean()) if len(ctl) else float("nan"),
            "control_chance_p95": float(ctl["chance_p95"].mean()) if len(ctl) else float("nan")}


def _group_name(kind, sev) -> str:
    if kind in ("mean", "control") or not sev:
        return str(kind)
    return f"{kind}{float(sev):+g}"


def f1_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Wide view: reducer x clusterer rows, one F1 column per corruption/severity.

    Plus ``mean``, ``control`` and the chance columns ``chance_mean``/``chance_p95`` (null of the mean row) and
    ``control_chance_p95``.
    """
    t = table.assign(group=[_group_name(k, s) for k, s in zip(table["corruption"], table["severity"])])
    wide = t.pivot_table(index=["reducer", "clusterer"], columns="group", values="f1", sort=False)
    wide.columns.name = None
    for col, kind, src in (("chance_mean", "mean", "chance_mean"), ("chance_p95", "mean", "chance_p95"),
                           ("control_chance_p95", "control", "chance_p95")):
        sub = t[t["corruption"] == kind]
        if len(sub):
            wide[col] = sub.set_index(["reducer", "clusterer"])[src]
    return wide.reset_index()
