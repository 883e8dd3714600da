"""Drift detection on image embeddings: kernel MMD two-sample test and an online MMD detector.

* :func:`mmd_test` - unbiased MMD^2 with a Gaussian kernel (median-heuristic bandwidth) and a
  permutation p-value.
* :class:`OnlineMMD` - sliding-window MMD^2 against a reference set. The threshold is set by bootstrap on
  held-out reference data so that a window of clean data exceeds it with probability 1/ERT (expected run
  time between false alarms). Each update costs O((n_ref + window) * d): constant in the stream length.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pandas as pd


def sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.maximum((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T, 0.0)


def median_sigma(x: np.ndarray) -> float:
    """Median heuristic: bandwidth = median pairwise distance."""
    d = np.sqrt(sq_dists(x, x))
    return float(np.median(d[np.triu_indices(len(x), 1)])) or 1.0


def kernel(x: np.ndarray, y: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-sq_dists(x, y) / (2 * sigma**2))


def offdiag_mean(k: np.ndarray) -> float:
    """Mean of a square kernel matrix without its diagonal (the unbiased within-sample term)."""
    n = len(k)
    return float((k.sum() - np.trace(k)) / (n * (n - 1)))


def mmd2_from_kernel(k: np.ndarray, n: int) -> float:
    """Unbiased MMD^2 from the pooled kernel matrix of [x (n rows); y (rest)]."""
    return offdiag_mean(k[:n, :n]) + offdiag_mean(k[n:, n:]) - 2 * float(k[:n, n:].mean())


def mmd2(x: np.ndarray, y: np.ndarray, sigma: float | None = None) -> float:
    z = np.concatenate([x, y])
    sigma = sigma or median_sigma(z)
    return mmd2_from_kernel(kernel(z, z, sigma), len(x))


def mmd_test(x: np.ndarray, y: np.ndarray, n_permutations: int = 200, sigma: float | None = None,
             seed: int = 0) -> tuple[float, float]:
    """Kernel MMD two-sample test. Returns (MMD^2, permutation p-value)."""
    if len(x) < 2 or len(y) < 2:
        raise ValueError("mmd_test needs at least 2 samples on each side")
    z = np.concatenate([x, y]).astype(np.float64)
    sigma = sigma or median_sigma(z)
    k = kernel(z, z, sigma)
    stat = mmd2_from_kernel(k, len(x))
    rng = np.random.default_rng(seed)
    count = 0
    for _ in range(n_permutations):
        p = rng.permutation(len(z))
        count += mmd2_from_kernel(k[np.ix_(p, p)], len(x)) >= stat
    return stat, (count + 1) / (n_permutations + 1)


def false_negative_rates(reference: np.ndarray, shifted: dict, window: int = 20, n_windows: int = 20,
                         alpha: float = 0.05, n_permutations: int = 100, seed: int = 0) -> pd.DataFrame:
    """Per (corruption, severity): fraction of windows of shifted embeddings the MMD test misses.

    Args:
        reference: (n, d) clean embeddings.
        shifted: {(corruption, severity): (m, d) embeddings}; ("clean", 0) gives the false-positive rate.
    """
    rng = np.random.default_rng(seed)
    sigma = median_sigma(reference)
    rows = []
    for (kind, sev), emb in shifted.items():
        detected = 0
        for _ in range(n_windows):
            w = emb[rng.choice(len(emb), min(window, len(emb)), replace=False)]
            _, p = mmd_test(reference, w, n_permutations, sigma, int(rng.integers(1 << 31)))
            detected += p < alpha
        rate = detected / n_windows
        rows.append({"corruption": kind, "severity": sev, "window": window,
                     "detection_rate": rate, "false_negative_rate": 1 - rate if kind != "clean" else np.nan,
                     "false_positive_rate": rate if kind == "clean" else np.nan})
    return pd.DataFrame(rows)


class OnlineMMD:
    """Sliding-window online MMD drift detector.

    Args:
        reference: (n, d) clean embeddings; half builds the reference, half calibrates the threshold.
        window: number of most recent samples compared with the reference (>= 2).
        ert: expected run time (steps) between false alarms on clean data.
        n_bootstrap: clean windows drawn to estimate the threshold.
        sigma: kernel bandwidth (default: median heuristic on the reference).
    """

    def __init__(self, reference: np.ndarray, window: int = 10, ert: int = 128, n_bootstrap: int = 2000,
                 sigma: float | None = None, seed: int = 0):
        if window < 2:
            raise ValueError("window must be >= 2")
        rng = np.random.default_rng(seed)
        reference = np.asarray(reference, np.float64)
        perm = rng.permutation(len(reference))
        half = len(reference) // 2
        self.ref, held = reference[perm[:half]], reference[perm[half:]]
        if len(held) < window:
            raise ValueError(f"need at least {2 * window} reference samples for window={window}")
        self.window, self.ert = window, ert
        self.sigma = sigma or median_sigma(self.ref)
        self.k_rr = offdiag_mean(kernel(self.ref, self.ref, self.sigma))
        stats = [self.statistic(held[rng.choice(len(held), window, replace=False)]) for _ in range(n_bootstrap)]
        self.threshold = float(np.quantile(stats, 1 - 1 / ert))
        self.reset()

    def statistic(self, w: np.ndarray) -> float:
        """MMD^2 of a whole window against the reference (batch form, for calibration and checks)."""
        return float(offdiag_mean(kernel(w, w, self.sigma)) + self.k_rr - 2 * kernel(w, self.ref, self.sigma).mean())

    def reset(self) -> None:
        self.buf: deque = deque()
        self.kref: deque = deque()  # mean kernel of each window sample with the reference
        self.s_ww = 0.0  # sum over ordered pairs i != j in the window
        self.t = 0

    def update(self, x: np.ndarray) -> tuple[float | None, bool]:
        """Add one embedding; returns (statistic or None while the window fills, drift detected)."""
        x = np.asarray(x, np.float64).reshape(1, -1)
        if len(self.buf) == self.window:
            old = self.buf.popleft()
            self.kref.popleft()
            if self.buf:
                self.s_ww -= 2 * kernel(old[None], np.stack(self.buf), self.sigma).sum()
        if self.buf:
            self.s_ww += 2 * kernel(x, np.stack(self.buf), self.sigma).sum()
        self.buf.append(x[0])
        self.kref.append(float(kernel(x, self.ref, self.sigma).mean()))
        self.t += 1
        if len(self.buf) < self.window:
            return None, False
        w = self.window
        stat = self.s_ww / (w * (w - 1)) + self.k_rr - 2 * float(np.mean(self.kref))
        return stat, stat > self.threshold

    def run(self, stream: np.ndarray) -> int | None:
        """Feed a stream; return the step (1-based) of the first detection, or None."""
        self.reset()
        for i, x in enumerate(stream, 1):
            if self.update(x)[1]:
                return i
        return None


def online_tables(reference: np.ndarray, clean: np.ndarray, shifted: dict, windows=(2, 5, 10, 15, 20),
                  erts=(32, 64, 128, 256), n_windows: int = 200, seed: int = 0) -> pd.DataFrame:
    """AUC-ROC of the online statistic per (corruption, severity, window, ERT).

    ``auc`` is threshold-free (clean vs shifted windows, depends on the window only); ``auc_ert`` is the
    ROC area of the calibrated detector at that ERT's threshold ((TPR + TNR) / 2); ``tpr`` and ``fpr``
    are its rates per window.
    """
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    rows = []
    for w in windows:
        for ert in erts:
            det = OnlineMMD(reference, window=w, ert=ert, n_bootstrap=1000, seed=seed)
            neg = np.array([det.statistic(clean[rng.choice(len(clean), w, replace=False)]) for _ in range(n_windows)])
            fpr = float((neg > det.threshold).mean())
            for (kind, sev), emb in shifted.items():
                pos = np.array([det.statistic(emb[rng.choice(len(emb), w, replace=False)]) for _ in range(n_windows)])
                tpr = float((pos > det.threshold).mean())
                auc = roc_auc_score(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos])
                rows.append({"corruption": kind, "severity": sev, "window": w, "ert": ert, "auc": auc,
                             "auc_ert": (tpr + 1 - fpr) / 2, "tpr": tpr, "fpr": fpr})
    return pd.DataFrame(rows)


def measured_run_length(detector: OnlineMMD, clean: np.ndarray, n_streams: int = 20, length: int = 2000,
                        seed: int = 0) -> float:
    """Mean steps to the first (false) alarm on clean streams resampled from `clean` (censored at `length`)."""
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(n_streams):
        hit = detector.run(clean[rng.integers(len(clean), size=length)])
        runs.append(hit if hit is not None else length)
    return float(np.mean(runs))
