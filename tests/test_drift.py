import numpy as np
import pytest

from labelling.analysis import drift as Dr


def test_mmd2_matches_brute_force_unbiased_estimate():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3)) + 0.5
    s = 1.3
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * s * s))  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / 42
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(a, b) for a in x for b in y) / 35
    assert Dr.mmd2(x, y, s) == pytest.approx(xx + yy - 2 * xy)


def test_mmd_test_detects_shift_and_not_noise():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(60, 5))
    _, p_same = Dr.mmd_test(ref, rng.normal(size=(30, 5)), 200)
    _, p_shift = Dr.mmd_test(ref, rng.normal(size=(30, 5)) + 1.0, 200)
    assert p_shift < 0.01 < p_same


def test_online_mmd_incremental_statistic_equals_batch_and_memory_is_bounded():
    rng = np.random.default_rng(2)
    det = Dr.OnlineMMD(rng.normal(size=(80, 4)), window=6, ert=64, n_bootstrap=300)
    stream = rng.normal(size=(200, 4))
    for i, x in enumerate(stream, 1):
        stat, _ = det.update(x)
        assert len(det.buf) <= 6 and len(det.kref) <= 6  # state does not grow with the stream
        if i >= 6 and i % 37 == 0:
            assert stat == pytest.approx(det.statistic(stream[i - 6:i]), abs=1e-9)


def test_online_mmd_threshold_matches_ert_and_detects_drift():
    rng = np.random.default_rng(3)
    clean = rng.normal(size=(400, 4))
    det = Dr.OnlineMMD(clean[:200], window=10, ert=50, n_bootstrap=2000)
    held = clean[200:]
    fpr = np.mean([det.statistic(held[rng.choice(200, 10, replace=False)]) > det.threshold for _ in range(2000)])
    assert fpr == pytest.approx(1 / 50, abs=0.015)
    det = Dr.OnlineMMD(clean[:200], window=10, ert=1000, n_bootstrap=3000)  # rare false alarms
    hit = det.run(np.concatenate([held[:30], rng.normal(size=(100, 4)) + 1.5]))
    assert hit is not None and 30 < hit <= 45  # fires within about one window after the shift
    assert Dr.measured_run_length(det, held, n_streams=5, length=300) > 20


def test_online_tables_and_fnr_tables_have_expected_shape():
    rng = np.random.default_rng(4)
    ref, clean = rng.normal(size=(60, 3)), rng.normal(size=(60, 3))
    shifted = {("blur", 5): rng.normal(size=(40, 3)) + 2, ("blur", 1): rng.normal(size=(40, 3)) + 0.1}
    t = Dr.online_tables(ref, clean, shifted, windows=(2, 5), erts=(32, 64), n_windows=40)
    assert len(t) == 2 * 2 * 2 and set(t.columns) >= {"auc", "auc_ert", "tpr", "fpr", "window", "ert"}
    strong = t[(t.severity == 5) & (t.window == 5)]["auc"].mean()
    weak = t[(t.severity == 1) & (t.window == 5)]["auc"].mean()
    assert strong > 0.95 and strong > weak
    fnr = Dr.false_negative_rates(ref, {("clean", 0): clean, **shifted}, window=10, n_windows=8, n_permutations=40)
    assert fnr.set_index(["corruption", "severity"]).loc[("blur", 5), "false_negative_rate"] == 0.0
