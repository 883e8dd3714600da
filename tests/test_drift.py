import numpy as np
import pytest

from labelling.analysis import drift
from tests.conftest import deployed_task


def test_mmd2_matches_brute_force_unbiased_estimate():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3)) + 0.5
    s = 1.3
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * s * s))  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / 42
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(a, b) for a in x for b in y) / 35
    assert drift.mmd2(x, y, s) == pytest.approx(xx + yy - 2 * xy)


def test_mmd_test_detects_shift_and_not_noise():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(60, 5))
    _, p_same = drift.mmd_test(ref, rng.normal(size=(30, 5)), 200)
    _, p_shift = drift.mmd_test(ref, rng.normal(size=(30, 5)) + 1.0, 200)
    assert p_shift < 0.01 < p_same


# --- the ERT promise -------------------------------------------------------------------------------------

_A = np.random.default_rng(123).standard_normal((4, 16))
_B = np.random.default_rng(124).standard_normal(16)


def _gaussian(rng, n):
    return rng.standard_normal((n, 8))


def _embedding_like(rng, n):
    """A fixed random nonlinear map of 4-d Gaussian noise into 16-d: a curved, bounded, low-dimensional cloud."""
    return np.tanh(rng.standard_normal((n, 4)) @ _A + _B) + 0.1 * rng.standard_normal((n, 16))


def _mean_run_length(sample, ert, window, n_refs=8, n_streams=25, seed=0):
    """Mean steps to the first (false) alarm: n_refs references (each its own data and split seed) x n_streams
    fresh streams from the same distribution. Streams of 30 * ert are never censored in practice (P ~ e^-30)."""
    runs = []
    for r in range(n_refs):
        rng = np.random.default_rng([seed, r])
        det = drift.OnlineMMD(sample(rng, 400), window=window, ert=ert, seed=seed * 1000 + r)
        for _ in range(n_streams):
            hit = det.run(sample(rng, 30 * ert))
            runs.append(30 * ert if hit is None else hit)
    return float(np.mean(runs))


# Why +-20 % over 200 streams is a strong test: run lengths are close to geometric (sd ~ mean), so the mean of
# 200 has a sampling sd of ~7 % of ERT; with the scatter between detectors (reference split, bootstrap) the
# measured sd of this 8 x 25 mean is 5-6 % of ERT (30 seed sets per setting), so an unbiased detector
# lands inside +-20 % (> 3 sd) essentially always, while a bias of 20 % or more cannot pass by luck. The
# previous single-threshold detector gave 2.1-2.5 x ERT here (79 / 153 / 266 for ERT 32 / 64 / 128), i.e.
# > 15 sd outside the band.
FAST = [(_gaussian, 32, 10), (_gaussian, 64, 10), (_embedding_like, 32, 10), (_embedding_like, 64, 10)]
SLOW = [(s, e, w) for s in (_gaussian, _embedding_like) for e, w in ((128, 10), (32, 20), (64, 20), (128, 20))]


def _ids(p):
    return f"{p[0].__name__[1:]}-ert{p[1]}-w{p[2]}"


@pytest.mark.parametrize("sample,ert,window", FAST, ids=[_ids(p) for p in FAST])
def test_online_mmd_mean_run_length_matches_ert(sample, ert, window):
    assert _mean_run_length(sample, ert, window) == pytest.approx(ert, rel=0.2)


@pytest.mark.slow
@pytest.mark.parametrize("sample,ert,window", SLOW, ids=[_ids(p) for p in SLOW])
def test_online_mmd_mean_run_length_matches_ert_grid(sample, ert, window):
    assert _mean_run_length(sample, ert, window) == pytest.approx(ert, rel=0.2)


@pytest.mark.parametrize("ert", [32, 64])
def test_acceptance_check_gaussian_reference_400x8_window_10(ert):
    """The reviewer's check, literally: 8 references x 25 fresh Gaussian streams, mean within 0.8-1.2 x ERT."""
    rng = np.random.default_rng(2024)
    runs = []
    for s in range(8):
        det = drift.OnlineMMD(rng.standard_normal((400, 8)), window=10, ert=ert, seed=s)
        for _ in range(25):
            hit = det.run(rng.standard_normal((30 * ert, 8)))
            runs.append(30 * ert if hit is None else hit)
    assert 0.8 * ert <= np.mean(runs) <= 1.2 * ert


# --- detector mechanics --------------------------------------------------------------------------------


def test_online_mmd_detects_a_shift_within_about_one_window():
    delays = []
    for s in range(5):  # shifted from the first stream sample: no chance of a false alarm first
        rng = np.random.default_rng(10 + s)
        det = drift.OnlineMMD(rng.standard_normal((400, 8)), window=10, ert=500, n_bootstraps=5000, seed=s)
        delays.append(det.run(rng.standard_normal((100, 8)) + 1.5))
        assert delays[-1] is not None and delays[-1] <= 10
    assert np.mean(delays) <= 6
    rng = np.random.default_rng(0)  # after a clean stretch (a false alarm there has probability ~4 %)
    det = drift.OnlineMMD(rng.standard_normal((400, 8)), window=10, ert=500, n_bootstraps=5000)
    hit = det.run(np.concatenate([rng.standard_normal((20, 8)), rng.standard_normal((100, 8)) + 1.5]))
    assert hit is not None and 20 < hit <= 30


def test_online_mmd_incremental_statistic_equals_batch_and_memory_is_bounded():
    rng = np.random.default_rng(2)
    w = 6
    det = drift.OnlineMMD(rng.normal(size=(80, 4)), window=w, ert=64, n_bootstraps=300)
    assert det.thresholds.shape == (w,) and det.threshold == det.thresholds[-1]
    state = lambda: sum(v.nbytes for v in vars(det).values() if isinstance(v, np.ndarray))  # noqa: E731
    size = state()
    stream = rng.normal(size=(3000, 4))
    for i, x in enumerate(stream, 1):
        stat, _ = det.update(x)
        if i < w or i % 37 == 0:  # early windows hold W - i held-out reference samples
            window = np.concatenate([det.init[i - 1:], stream[:i]]) if i < w else stream[i - w:i]
            assert np.array_equal(det.window_samples(), window)
            assert stat == pytest.approx(det.statistic(window), abs=1e-9)
    assert det.t == len(stream) and state() == size  # state does not grow with the stream


def test_online_mmd_run_matches_update_loop_and_old_keyword():
    rng = np.random.default_rng(5)
    det = drift.OnlineMMD(rng.normal(size=(120, 3)), window=5, ert=8, n_bootstrap=500, seed=3)
    assert det.n_bootstraps == 500
    for _ in range(20):
        stream = rng.normal(size=(300, 3)) + rng.choice([0.0, 0.3])
        first = None
        det.reset()
        for i, x in enumerate(stream, 1):
            if det.update(x)[1]:
                first = i
                break
        state = det.window_samples()
        assert det.run(stream) == first
        if first is not None:  # run leaves the state where the update loop stopped
            assert np.allclose(det.window_samples(), state) and det.t == first


def test_online_mmd_rejects_too_small_reference():
    with pytest.raises(ValueError, match=r"window=15 .*at least 59 .*got 30"):
        drift.OnlineMMD(np.random.default_rng(0).normal(size=(30, 4)), window=15)
    drift.OnlineMMD(np.random.default_rng(0).normal(size=(59, 4)), window=15, ert=16, n_bootstraps=100)


def test_no_repeat_stream_has_no_duplicate_inside_a_window():
    rng = np.random.default_rng(6)
    for n_pool, w in [(10, 10), (15, 10), (19, 10), (40, 10), (7, 2)]:
        idx = drift._no_repeat_stream(n_pool, 500, w, rng)
        assert len(idx) == 500 and idx.max() < n_pool
        assert all(len(set(idx[i:i + w])) == w for i in range(len(idx) - w + 1))


# --- tables --------------------------------------------------------------------------------------------


def test_run_lengths_shorter_for_a_shifted_pool():
    rng = np.random.default_rng(7)
    ref = rng.normal(size=(200, 4))
    pools = {"clean": rng.normal(size=(300, 4)), "shifted": rng.normal(size=(300, 4)) + 1.0}
    t = drift.run_lengths(ref, pools, window=5, ert=32, n_streams=40, seed=1).set_index("name")
    assert set(t.columns) >= {"window", "ert", "mean_run_length", "median_run_length", "sd", "n_streams",
                              "censored", "ci_low", "ci_high"}
    assert t.loc["shifted", "mean_run_length"] < 8 < 16 < t.loc["clean", "mean_run_length"]
    assert t.loc["clean", "ci_low"] < t.loc["clean", "mean_run_length"] < t.loc["clean", "ci_high"]


def test_online_tables_and_fnr_tables_have_expected_shape():
    rng = np.random.default_rng(4)
    ref, clean = rng.normal(size=(60, 3)), rng.normal(size=(60, 3))
    shifted = {("blur", 5): rng.normal(size=(40, 3)) + 2, ("blur", 1): rng.normal(size=(40, 3)) + 0.1}
    t = drift.online_tables(ref, clean, shifted, windows=(2, 5, 20), erts=(32, 64), n_windows=40)  # 20: too large
    assert len(t) == 2 * 2 * 2 and set(t.window) == {2, 5}
    assert set(t.columns) >= {"auc", "balanced_accuracy", "tpr", "fpr", "window", "ert", "n_windows"}
    assert "auc_ert" not in t.columns and (t.n_windows == 40).all()
    strong = t[(t.severity == 5) & (t.window == 5)]
    weak = t[(t.severity == 1) & (t.window == 5)]["auc"].mean()
    assert strong["auc"].mean() > 0.95 and strong["auc"].mean() > weak
    assert (strong["tpr"] > 0.9).all() and t["fpr"].max() < 0.2
    assert np.allclose(t.balanced_accuracy, (t.tpr + 1 - t.fpr) / 2)
    empty = drift.online_tables(ref[:10], clean, shifted, windows=(5,), erts=(32,), n_windows=5)
    assert empty.empty and {"auc", "balanced_accuracy"} <= set(empty.columns)
    fnr = drift.false_negative_rates(ref, {("clean", 0): clean, **shifted}, window=10, n_windows=8, n_permutations=40)
    assert fnr.set_index(["corruption", "severity"]).loc[("blur", 5), "false_negative_rate"] == 0.0


def test_unbiased_mmd_matches_torchdrift_up_to_the_kernel_diagonal():
    """torchdrift's kernel MMD keeps the kernel diagonal (all ones) in its within-sample sums; ours drops it.

    So theirs = ours + 1/(n-1) + 1/(m-1) for the same Gaussian bandwidth.
    """
    torch = pytest.importorskip("torch")
    torchdrift_mmd = pytest.importorskip("torchdrift.detectors.mmd")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.5, 1.0, size=(17, 5))
    ours = drift.mmd2(x, y, sigma=1.7)
    theirs = torchdrift_mmd.kernel_mmd(torch.from_numpy(x), torch.from_numpy(y), n_perm=None,
                                       kernel=torchdrift_mmd.GaussianKernel(lengthscale=1.7))
    assert float(theirs) == pytest.approx(ours + 1 / 11 + 1 / 16, rel=1e-9, abs=1e-12)
    assert ours > 0.01  # a real shift, so the comparison is not between two zeros


def test_live_cells_are_a_real_looking_shift_detected_sooner_than_fixed_cells_of_a_new_plate():
    """Thesis 9.2: live, unfixed cells as corrupted input; the calibrated online MMD flags them quickly."""
    from labelling.build import build_task
    from labelling.config import load
    from labelling.data.simulate import simulate_field
    from labelling.studies import live_cell_drift

    fixed, live = simulate_field(3, size=96), simulate_field(3, size=96, live=1.0)
    assert fixed.cells.max() == live.cells.max()  # the same cells in the same places, imaged live
    assert np.corrcoef(fixed.fluorescence[0].ravel(), live.fluorescence[0].ravel())[0, 1] > 0.8
    assert not np.allclose(fixed.brightfield, live.brightfield)
    assert np.array_equal(simulate_field(3, size=96, live=0.0).brightfield, fixed.brightfield)

    import torch

    torch.manual_seed(0)
    task = deployed_task(build_task(load("nuclei_mse", {"net.width": 8, "net.depth": 2}), 1, 1).net)
    from labelling.data.datamodule import FluorescenceDataModule

    dm = FluorescenceDataModule(n_wells=4, fields_per_well=4, field_size=128, seed=0)
    dm.setup()
    table = live_cell_drift(task, dm.splits["val"] + dm.splits["train"], crop=32, n_wells=2, fields_per_well=4,
                            size=128, windows=(5,), ert=32, max_crops=60)
    runs = dict(zip(table["name"], table["mean_run_length"]))
    fixed_run = next(v for k, v in runs.items() if k.startswith("fixed"))
    live_run = next(v for k, v in runs.items() if k.startswith("live"))
    assert live_run < 0.5 * fixed_run  # a real shift is found several times sooner than a false alarm
    assert fixed_run > 0.3 * 32  # the new fixed plate is (roughly) in distribution
