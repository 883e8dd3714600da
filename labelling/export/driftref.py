"""The drift reference of a trained stain, computed once from its own fields and shipped with its weights.

Two checks use embeddings of the deployed-normalized crops (:func:`labelling.studies.embed_images`):

* a per-image verdict (the app): the MMD^2 of one image's crops against crops of the *training* fields,
  ranked among the MMD^2 of each clean *validation* field against the same reference (its p-value is the
  fraction of those fields at least as far away);
* the online detector (:class:`labelling.analysis.drift.OnlineMMD`): a stream of crop embeddings compared
  window by window with a reference of *validation* fields (as :func:`labelling.studies.drift_study`
  builds it), with thresholds calibrated to an expected run time to a false alarm.

:func:`drift_reference` computes both; :func:`save` writes them to ``drift.npz`` (reference embeddings and
their mean and standard deviation, the calibrated thresholds and the detector's reference split), and
:func:`load_detector` restores the calibrated detector from that file alone, without the training data
and without recalibrating.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from labelling.errors import ExportError

DRIFT_FILE = "drift.npz"
ALPHA = 0.05  # per-image warning when an image is further from the reference than 95 % of clean fields


def image_reference(task, train_images, val_images, crop: int, n: int = 128) -> dict:
    """Per-image drift reference: training-field embeddings and one MMD^2 per validation field (the null).

    Crops of one image are correlated, so a two-sample test of one image's crops against a reference set
    is far too eager; the verdict is calibrated per image instead (see :func:`image_verdict`).
    """
    from labelling import studies
    from labelling.analysis.drift import median_sigma, mmd2

    reference = studies.embed_images(task, [im.raw_input() for im in train_images], crop, max_crops=n)
    sigma = median_sigma(reference)
    null = [mmd2(reference, emb, sigma) for emb in (studies.embed_images(task, [im.raw_input()], crop, max_crops=64)
                                                    for im in val_images) if len(emb) >= 2]
    return {"reference": reference, "null": np.asarray(null, float), "sigma": float(sigma)}


def image_verdict(task, image: np.ndarray, reference: dict, crop: int, alpha: float = ALPHA) -> dict:
    """Drift verdict of one raw image against a per-image reference (:func:`image_reference`).

    Returns:
        ``{"checked": False}`` when the image or the reference is too small, else ``checked``, ``mmd2``,
        ``p_value``, ``drift`` (p <= alpha, or the smallest p-value the reference can give), ``n_crops``
        and ``n_reference_fields``.
    """
    from labelling import studies
    from labelling.analysis.drift import mmd2

    if min(image.shape[-2:]) < crop:
        return {"checked": False}
    emb = studies.embed_images(task, [image[None] if image.ndim == 2 else image], crop, max_crops=64)
    null = np.asarray(reference["null"], float)
    if len(emb) < 2 or len(null) < 5:
        return {"checked": False}
    stat = mmd2(reference["reference"], emb, float(reference["sigma"]))
    p = (1 + int((null >= stat).sum())) / (1 + len(null))
    alpha = max(alpha, 1 / (1 + len(null)))  # the smallest p-value this many fields can give
    return {"checked": True, "mmd2": stat, "p_value": p, "drift": p <= alpha, "n_crops": len(emb),
            "n_reference_fields": len(null)}


def online_window(n_reference: int, window: int = 10) -> int | None:
    """The largest window <= `window` that a reference of this size supports (4W - 1 samples), or None."""
    from labelling.analysis.drift import min_reference_size

    while window >= 2 and min_reference_size(window) > n_reference:
        window -= 1
    return window if window >= 2 else None


def drift_reference(task, train_images, val_images, crop: int, window: int = 10, ert: float = 128,
                    max_crops: int = 120, seed: int = 0) -> dict:
    """Both drift references of a task and its online detector (None when the reference is too small).

    Returns:
        ``{"image": per-image reference, "online": reference embeddings (n, D), "detector": OnlineMMD or
        None, "crop": crop}``.
    """
    from labelling import studies
    from labelling.analysis.drift import OnlineMMD

    online = studies.embed_images(task, [im.raw_input() for im in val_images], crop, 4 * max_crops, seed)
    w = online_window(len(online), window)
    detector = OnlineMMD(online, window=w, ert=ert, seed=seed) if w else None
    return {"image": image_reference(task, train_images, val_images, crop), "online": online,
            "detector": detector, "crop": int(crop), "seed": int(seed)}


def _rows(reference: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Index in `reference` of each of `rows` (identical rows are interchangeable)."""
    lookup = {r.tobytes(): i for i, r in enumerate(reference)}
    return np.array([lookup[r.tobytes()] for r in rows], np.int32)


def save(found: dict, out: Path) -> Path:
    """Write a :func:`drift_reference` to ``out/drift.npz`` (plain arrays; loads without pickle).

    Embeddings are the net's float32 outputs and are stored as such (losslessly); the detector's reference
    subset and initial window are stored as row indices into the online reference.
    """
    image, online, det = found["image"], np.asarray(found["online"]), found["detector"]
    arrays = {"crop": found["crop"], "seed": found.get("seed", 0),
              "image_reference": _lossless(image["reference"]), "image_null": image["null"],
              "image_sigma": image["sigma"], "online_reference": _lossless(online),
              "embedding_mean": online.mean(0) if len(online) else np.zeros(0),
              "embedding_std": online.std(0) if len(online) else np.zeros(0)}
    if det is not None:
        wide = np.asarray(online, np.float64)
        arrays.update(window=det.window, ert=det.ert, n_bootstraps=det.n_bootstraps, sigma=det.sigma,
                      thresholds=det.thresholds, ref_index=_rows(wide, det.ref), init_index=_rows(wide, det.init),
                      k_rr=det.k_rr)
    path = Path(out) / DRIFT_FILE
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
    return path


def _lossless(x: np.ndarray) -> np.ndarray:
    """float32 when that loses nothing (the net's embeddings), else the array as it is."""
    x = np.asarray(x)
    narrow = x.astype(np.float32)
    return narrow if np.array_equal(narrow, x) else x


def _read(path: Path) -> dict:
    path = Path(path)
    path = path / DRIFT_FILE if path.is_dir() else path
    if not path.is_file():
        raise ExportError(f"{path}: no drift reference; export the run again without --no-drift")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise ExportError(f"{path}: unreadable drift reference ({err})") from None


def load_image_reference(path: str | Path) -> dict:
    """The per-image reference of an export (folder or ``drift.npz``), as :func:`image_reference` returns it."""
    data = _read(Path(path))
    return {"reference": data["image_reference"], "null": data["image_null"], "sigma": float(data["image_sigma"])}


def load_detector(path: str | Path):
    """The calibrated :class:`OnlineMMD` of an export, restored from ``drift.npz`` without recalibrating.

    Raises:
        ExportError: no drift file, or one exported with too few reference embeddings for a detector.
    """
    from labelling.analysis.drift import OnlineMMD, kernel
    data = _read(Path(path))
    if "thresholds" not in data:
        raise ExportError(f"{path}: the reference ({len(data['online_reference'])} embeddings) was too small for "
                          "an online detector (it needs at least 7); export a run with more validation fields")
    det = OnlineMMD.__new__(OnlineMMD)  # the calibrated state, as OnlineMMD.__init__ leaves it
    det.window, det.ert, det.n_bootstraps = int(data["window"]), float(data["ert"]), int(data["n_bootstraps"])
    det.sigma, det.k_rr = float(data["sigma"]), float(data["k_rr"])
    reference = data["online_reference"].astype(np.float64)
    det.ref, det.init = reference[data["ref_index"]], reference[data["init_index"]]
    det._ref_sq = (det.ref * det.ref).sum(1)
    kww = kernel(det.init, det.init, det.sigma)
    np.fill_diagonal(kww, 0.0)
    det._init_kww, det._init_kref = kww, kernel(det.init, det.ref, det.sigma).mean(1)
    det.thresholds = data["thresholds"].astype(np.float64)
    det.threshold = float(det.thresholds[-1])
    det.reset()
    return det
