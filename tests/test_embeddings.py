import numpy as np
import pytest

from labelling.analysis import embeddings as E


def two_groups(n=60, d=8, shift=3.0, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d))
    b = rng.normal(size=(n, d)) + shift
    return np.concatenate([a, b]), np.r_[np.zeros(n, bool), np.ones(n, bool)]


def test_detection_f1_and_clusterers_separate_two_groups():
    x, corrupted = two_groups()
    assert E.detection_f1(corrupted.astype(int), corrupted) == 1.0
    assert E.detection_f1(np.zeros(len(x), int), corrupted) == pytest.approx(2 / 3)  # all called corrupted
    z = E.reduce(x, "pca")
    assert z.shape == (len(x), 2)
    for c in E.CLUSTERERS:
        assert E.detection_f1(E.cluster(z, c), corrupted) > 0.9, c


@pytest.mark.parametrize("method", ["umap", "pca_umap", "pacmap"])
def test_nonlinear_reducers_keep_groups_apart(method):
    x, corrupted = two_groups(n=40, d=10, shift=4)
    z = E.reduce(x, method)
    assert z.shape == (80, 2)
    assert E.detection_f1(E.cluster(z, "kmeans"), corrupted) > 0.9


def test_corrupted_set_labels():
    crops = np.random.default_rng(0).normal(size=(3, 1, 16, 16)).astype(np.float32)
    allc, meta = E.corrupted_set(crops, severities=(-5, 5))
    # clean + blur(5) + contrast(-5, 5) + brightness(-5, 5) = 6 groups of 3
    assert len(allc) == len(meta) == 18 and meta["corrupted"].sum() == 15
    assert not np.allclose(allc[3], allc[0])
    with pytest.raises(ValueError, match="kmeans"):
        E.cluster(np.zeros((4, 2)), "spectral")


def test_f1_table_is_balanced_and_separates_only_real_shifts():
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 40
    emb = np.concatenate([rng.normal(size=(n, 6)), rng.normal(size=(n, 6)) + 5, rng.normal(size=(n, 6))])
    meta = pd.DataFrame({"corruption": ["clean"] * n + ["brightness"] * n + ["blur"] * n,
                         "severity": [0] * n + [5] * n + [1] * n})
    meta["corrupted"] = meta["corruption"] != "clean"
    t, proj = E.f1_table(emb, meta, reducers=("pca",), clusterers=("kmeans",))
    f1 = t.set_index("corruption")["f1"]
    assert f1["brightness"] > 0.95  # a real shift is found
    assert f1["blur"] < 0.8  # no shift: near chance, not the 0.95 an imbalanced count would give
    assert f1["mean"] == pytest.approx((f1["brightness"] + f1["blur"]) / 2)
    wide = E.f1_summary(t)
    assert {"brightness+5", "blur+1", "mean"} <= set(wide.columns) and len(wide) == 1
    assert proj["pca"].shape == (3 * n, 2)
