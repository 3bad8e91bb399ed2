import numpy as np
import pytest

from pipeline.calibrate import calibrate, conformal_p_values, min_calibration_rows
from pipeline.errors import ConfigError, DataError


def test_threshold_is_kth_largest_and_matches_p_value_rule():
    scores = np.random.default_rng(0).gamma(2.0, size=999).astype(np.float32)
    cal = calibrate(scores, 0.01)
    assert cal.rank == 10  # floor(0.01 * 1000)
    assert cal.threshold == np.sort(scores)[-10]
    new = np.random.default_rng(1).gamma(2.0, size=20_000).astype(np.float32)
    flagged = new > cal.threshold
    # The threshold rule and the conformal p-value rule are the same decision.
    np.testing.assert_array_equal(flagged, cal.p_values(new) <= cal.target_fpr)


def test_false_positive_rate_on_exchangeable_normals_is_near_target():
    rng = np.random.default_rng(2)
    rates = []
    for _ in range(200):
        cal = calibrate(rng.normal(size=1999).astype(np.float32), 0.05)
        rates.append((rng.normal(size=2000) > cal.threshold).mean())
    assert abs(np.mean(rates) - 0.05) < 0.004


def test_p_values_are_uniform_on_normals():
    rng = np.random.default_rng(3)
    cal = calibrate(rng.normal(size=4999).astype(np.float32), 0.01)
    p = cal.p_values(rng.normal(size=50_000).astype(np.float32))
    hist, _ = np.histogram(p, bins=10, range=(0, 1))
    assert np.all(np.abs(hist / len(p) - 0.1) < 0.01)


def test_p_value_formula_counts_ties_and_extremes():
    table = np.array([1.0, 2.0, 2.0, 3.0], dtype=np.float32)
    p = conformal_p_values(table, np.array([0.5, 2.0, 2.5, 3.0, 9.0], dtype=np.float32))
    np.testing.assert_allclose(p, [5 / 5, 4 / 5, 2 / 5, 2 / 5, 1 / 5])


def test_too_few_calibration_rows_says_how_many():
    assert min_calibration_rows(0.01) == 99
    with pytest.raises(DataError, match="at least 99"):
        calibrate(np.ones(50, dtype=np.float32), 0.01)
    with pytest.raises(ConfigError):
        calibrate(np.ones(50, dtype=np.float32), 0.0)
