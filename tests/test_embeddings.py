import numpy as np
import pandas as pd
import pytest

from labelling.analysis import embeddings


def two_groups(n=60, d=8, shift=3.0, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d))
    b = rng.normal(size=(n, d)) + shift
    return np.concatenate([a, b]), np.r_[np.zeros(n, bool), np.ones(n, bool)]


def shift_data(n=40, d=4, seed=0, control=True):
    """Clean train set; test = clean, a real shift (+5), no shift ('blur', same distribution), control."""
    rng = np.random.default_rng(seed)
    train = rng.normal(size=(200, d))
    parts = [rng.normal(size=(n, d)), rng.normal(size=(n, d)) + 5, rng.normal(size=(n, d))]
    kinds, sevs = ["clean"] * n + ["brightness"] * n + ["blur"] * n, [0] * n + [5] * n + [1] * n
    src = ["test"] * 3 * n
    if control:
        parts.append(rng.normal(size=(n, d)))
        kinds, sevs, src = kinds + ["clean"] * n, sevs + [0] * n, src + ["control"] * n
    meta = pd.DataFrame({"corruption": kinds, "severity": sevs, "source": src})
    meta["corrupted"] = meta["corruption"] != "clean"
    return train, np.concatenate(parts), meta


def test_detection_f1_optimal_mapping_and_noise():
    _, corrupted = two_groups(n=20)
    assert embeddings.detection_f1(corrupted.astype(int), corrupted) == 1.0
    assert embeddings.detection_f1(1 - corrupted.astype(int), corrupted) == 1.0  # cluster ids are arbitrary
    # noise (-1) is its own group, mapped by majority: clean points marked as noise are called clean
    assert embeddings.detection_f1(np.where(corrupted, 0, -1), corrupted) == 1.0
    assert embeddings.detection_f1(np.where(corrupted, -1, 0), corrupted) == 1.0
    # mostly-clean noise is not "corrupted": 15 clean + 1 corrupted noise points, the rest split correctly
    labels = corrupted.astype(int)
    labels[:15] = -1
    labels[20] = -1
    assert embeddings.detection_f1(labels, corrupted) == pytest.approx(2 * 19 / (2 * 19 + 1))


def test_no_tie_bias_single_cluster_is_a_coin_flip():
    _, corrupted = two_groups(n=20)
    one = np.zeros(len(corrupted), int)
    f1 = np.array([embeddings.detection_f1(one, corrupted, seed=s) for s in range(400)])
    assert set(np.round(f1, 6)) == {0.0, round(2 / 3, 6)}  # all corrupted or all clean, not always 0.667
    assert f1.mean() == pytest.approx(1 / 3, abs=0.06)
    assert embeddings.detection_f1(one, corrupted, seed=3) == embeddings.detection_f1(one, corrupted, seed=3)  # seeded
    # all noise behaves the same (not all "corrupted")
    assert np.mean([embeddings.detection_f1(one - 1, corrupted, seed=s) for s in range(400)]) == pytest.approx(1 / 3, abs=0.06)


def test_clusterers_separate_two_groups():
    x, corrupted = two_groups()
    z = embeddings.fit_reducer(x, "pca").transform(x)
    assert z.shape == (len(x), 2)
    for c in embeddings.CLUSTERERS:
        assert embeddings.detection_f1(embeddings.cluster(z, c), corrupted) > 0.9, c
    with pytest.raises(ValueError, match="kmeans"):
        embeddings.cluster(np.zeros((4, 2)), "spectral")
    with pytest.raises(ValueError, match="pacmap"):
        embeddings.fit_reducer(x, "tsne")


def test_pca_reducer_is_fitted_on_train_only():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    train = rng.normal(size=(100, 5)) * [5, 3, 1, 1, 1]
    new = rng.normal(size=(50, 5)) * [1, 1, 1, 1, 8] + 4  # different mean and main axis
    r = embeddings.fit_reducer(train, "pca")
    comps = r.pca_.components_.copy()
    z = r.transform(new)
    np.testing.assert_array_equal(r.pca_.components_, comps)  # transform does not refit
    np.testing.assert_allclose(r.mean_, train.mean(0))
    ref = PCA(2, random_state=0).fit((train - train.mean(0)) / train.std(0))
    np.testing.assert_allclose(np.abs(r.pca_.components_), np.abs(ref.components_), atol=1e-8)
    np.testing.assert_allclose(z, ref.transform((new - train.mean(0)) / train.std(0)), atol=1e-8)
    assert abs(z.mean()) > 0.5  # new data keeps its offset (not re-standardized with its own statistics)
    np.testing.assert_allclose(r.transform(train), r.embedding_, atol=1e-8)


@pytest.mark.parametrize("method", ["umap", "pca_umap", "pacmap"])
def test_nonlinear_reducers_fit_once_and_transform_new_data(method):
    train, _ = two_groups(n=40, d=10, shift=4, seed=0)  # a clean set with two well-separated groups
    new, groups = two_groups(n=30, d=10, shift=4, seed=1)  # fresh draws of the same two groups
    r = embeddings.fit_reducer(train, method, seed=0)
    emb0 = r.embedding_.copy()
    z = r.transform(new)
    assert z.shape == (60, 2) and np.isfinite(z).all()
    np.testing.assert_array_equal(r.embedding_, emb0)  # the training fit is untouched
    assert embeddings.detection_f1(embeddings.cluster(z, "kmeans"), groups) > 0.9


def test_f1_table_real_shift_vs_no_shift_vs_control():
    train, emb, meta = shift_data()
    t, proj = embeddings.f1_table(train, emb, meta, reducers=("pca",), clusterers=("kmeans",), n_shuffles=200)
    assert {"reducer", "clusterer", "corruption", "severity", "f1", "chance_mean", "chance_p95", "p_value",
            "n"} <= set(t.columns)
    row = t.set_index("corruption")
    assert list(row.index) == ["brightness", "blur", "control", "mean"]
    assert (row.loc[["brightness", "blur", "control"], "n"] == 40).all()
    shift, none, ctl = row.loc["brightness"], row.loc["blur"], row.loc["control"]
    assert shift["f1"] > 0.95 and shift["f1"] > shift["chance_p95"] and shift["p_value"] < 0.01  # real shift
    assert none["f1"] <= none["chance_p95"] + 0.05  # no shift: at chance
    assert none["chance_mean"] < 0.6  # chance is ~0.5 for a balanced 2-cluster split, not the old 0.667
    assert ctl["f1"] <= ctl["chance_p95"] + 0.05 and ctl["chance_mean"] < 0.6  # clean vs clean control
    assert row.loc["mean", "f1"] == pytest.approx((shift["f1"] + none["f1"]) / 2)  # control not in the mean
    assert row.loc["mean", "chance_mean"] == pytest.approx((shift["chance_mean"] + none["chance_mean"]) / 2)
    assert proj["pca"].shape == (len(meta), 2)
    wide = embeddings.f1_summary(t)
    assert {"brightness+5", "blur+1", "mean", "control", "chance_mean", "chance_p95"} <= set(wide.columns)
    assert len(wide) == 1


def test_no_shift_is_calibrated_over_seeds():
    """Across datasets, a non-existent shift scores chance on average and rarely beats chance_p95."""
    f1, chance, above = [], [], []
    for s in range(8):
        train, emb, meta = shift_data(seed=10 + s, control=False)
        t = embeddings.f1_table(train, emb, meta, reducers=("pca",), clusterers=("kmeans", "hdbscan"), seed=s,
                       n_shuffles=100)[0]
        t = t[t["corruption"].isin(["blur", "control"])]  # control = two halves of the clean crops here
        f1 += list(t["f1"])
        chance += list(t["chance_mean"])
        above += list(t["f1"] > t["chance_p95"])
    assert abs(np.mean(f1) - np.mean(chance)) < 0.08 and np.mean(chance) < 0.6
    assert np.mean(above) <= 0.2


def test_f1_table_balances_unequal_groups_and_runs_all_reducers():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(60, 5))
    emb = np.concatenate([rng.normal(size=(20, 5)), rng.normal(size=(30, 5)) + 5])
    meta = pd.DataFrame({"corruption": ["clean"] * 20 + ["contrast"] * 30, "severity": [0] * 20 + [-3] * 30})
    meta["corrupted"] = meta["corruption"] != "clean"
    t, proj = embeddings.f1_table(train, emb, meta, clusterers=("kmeans",), n_shuffles=20)
    assert set(proj) == set(embeddings.REDUCERS) and all(p.shape == (50, 2) for p in proj.values())
    c = t[t["corruption"] == "contrast"]
    assert (c["n"] == 20).all() and len(c) == len(embeddings.REDUCERS)
    assert (t.loc[t["corruption"] == "control", "n"] == 10).all()  # two halves of the clean crops
    h = embeddings.f1_headline(t)
    assert h["n_configs"] == len(embeddings.REDUCERS)


def test_f1_headline_is_the_mean_not_the_max():
    rows = []
    for r, c, f1 in [("pca", "kmeans", 0.9), ("umap", "kmeans", 0.5), ("pacmap", "hdbscan", 0.7)]:
        rows.append({"reducer": r, "clusterer": c, "corruption": "mean", "severity": 0, "f1": f1,
                     "chance_mean": 0.5, "chance_p95": 0.62, "n": 80})
        rows.append({"reducer": r, "clusterer": c, "corruption": "control", "severity": 0, "f1": 0.5,
                     "chance_mean": 0.5, "chance_p95": 0.65, "n": 40})
        rows.append({"reducer": r, "clusterer": c, "corruption": "blur", "severity": 1, "f1": 0.99,
                     "chance_mean": 0.5, "chance_p95": 0.6, "n": 40})
    h = embeddings.f1_headline(pd.DataFrame(rows))
    assert h["f1_mean"] == pytest.approx(0.7)
    assert h["f1_sd"] == pytest.approx(0.2) and h["f1_min"] == 0.5 and h["f1_max"] == 0.9
    assert h["best_config"] == "pca/kmeans" and h["best_f1"] == 0.9
    assert h["chance_mean"] == pytest.approx(0.5) and h["control_f1"] == pytest.approx(0.5)
    assert h["f1_over_chance"] == pytest.approx(0.2) and h["n_configs"] == 3


def test_corrupted_set_labels():
    crops = np.random.default_rng(0).normal(size=(3, 1, 16, 16)).astype(np.float32)
    allc, meta = embeddings.corrupted_set(crops, severities=(-5, 5))
    # clean + blur(5) + contrast(-5, 5) + brightness(-5, 5) = 6 groups of 3
    assert len(allc) == len(meta) == 18 and meta["corrupted"].sum() == 15
    assert not np.allclose(allc[3], allc[0])
