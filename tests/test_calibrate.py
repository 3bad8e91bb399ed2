import subprocess
import sys

import numpy as np
import pytest

from pipeline.calibrate import (FPR_RANGE_KEY, calibrate, conformal_p_values, describe_fpr_range, fpr_range,
                                min_calibration_rows, stored_fpr_range)
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


def test_fpr_range_covers_the_bundles_own_rate_as_often_as_it_says():
    """Each calibration set's threshold has its own true rate (Uniform(0, 1) scores: 1 - threshold);
    the stated 90% range must hold for about 90% of sets, not for nearly all or far fewer."""
    rng = np.random.default_rng(4)
    n, hits, draws = 599, 0, 3000
    for _ in range(draws):
        cal = calibrate(rng.random(n).astype(np.float32), 0.01)
        low, high = cal.fpr_range()
        hits += low <= 1.0 - cal.threshold <= high
    assert 0.875 <= hits / draws <= 0.925


def test_fpr_range_narrows_with_more_calibration_rows():
    small, large = fpr_range(6, 599), fpr_range(200, 19_999)
    assert small[0] < 0.005 and small[1] > 0.017  # k = 6: the rate is known to within a factor ~2
    assert 0.0088 < large[0] < 0.01 < large[1] < 0.0113
    assert describe_fpr_range(6, 599) == "0.44%-1.75% for 90% of calibration sets of 599 rows"


def test_scoring_reads_the_fpr_range_the_manifest_stored():
    calibration = calibrate(np.random.default_rng(3).gamma(2.0, size=799), target_fpr=0.01)
    section = calibration.to_dict()
    assert stored_fpr_range(section) == describe_fpr_range(calibration.rank, calibration.n)
    assert stored_fpr_range(section | {FPR_RANGE_KEY: [0.001, 0.002]}).startswith("0.10%-0.20% for 90%")
    older = {k: v for k, v in section.items() if k != FPR_RANGE_KEY}  # a manifest without the stored range
    assert stored_fpr_range(older) == stored_fpr_range(section)


def test_scoring_does_not_import_scipy():
    """scipy.stats adds 60 MB to each process: a 5M-row CSV peaked at 720 MB with it, 650 MB without."""
    code = ("import sys, pipeline.cli, pipeline.batch_score, pipeline.image_score; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'scipy'))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


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
