import numpy as np
import pytest

from pipeline.config import CalibrationConfig, TrainingConfig
from pipeline.errors import DataError
from pipeline.calibrate import calibrate
from pipeline.splits import exact_calibration_size, rows_needed, split_rows


def test_anomalies_are_never_trained_or_calibrated_on():
    labels = np.r_[np.zeros(900, int), np.ones(100, int)]
    splits = split_rows(labels, 1000, CalibrationConfig(), TrainingConfig(), "t.csv")
    anomalies = set(np.flatnonzero(labels))
    assert not anomalies & set(splits.train) and not anomalies & set(splits.val) and not anomalies & set(splits.cal)
    assert anomalies <= set(splits.test)
    everything = np.concatenate([splits.train, splits.val, splits.cal, splits.test])
    assert sorted(everything) == list(range(1000))  # a partition: no row lost or reused


def test_splits_are_fixed_by_the_seed():
    a = split_rows(None, 2000, CalibrationConfig(), TrainingConfig(seed=1), "t")
    b = split_rows(None, 2000, CalibrationConfig(), TrainingConfig(seed=1), "t")
    c = split_rows(None, 2000, CalibrationConfig(), TrainingConfig(seed=2), "t")
    np.testing.assert_array_equal(a.cal, b.cal)
    assert not np.array_equal(a.cal, c.cal)
    assert len(a.test) == 0  # no labels, no test split


@pytest.mark.parametrize("target", [0.01, 0.05, 0.002, 0.001])
def test_too_few_rows_names_the_number_needed(target):
    """The number is the fewest that work, not an overshoot: one row less must fail."""
    cal = CalibrationConfig(target_fpr=target)
    needed = rows_needed(cal, TrainingConfig(), labelled=False)
    split_rows(None, needed, cal, TrainingConfig(), "t")  # exactly enough works
    with pytest.raises(DataError, match=rf"need at least {needed}"):
        split_rows(None, needed - 1, cal, TrainingConfig(), "small.csv")


@pytest.mark.parametrize("target", [0.01, 0.05, 0.003, 0.001])
def test_calibration_size_makes_the_conformal_rate_meet_the_target(target):
    for wanted in (99, 150, 456, 667, 1232, 4559, 20_000):
        n = exact_calibration_size(wanted, target)
        assert n <= wanted
        if n < 1 / target - 1:  # too few rows for any rank: left for the caller's error
            assert n == wanted
            continue
        cal = calibrate(np.arange(n, dtype=np.float32), target)
        assert cal.expected_fpr <= target + 1e-12  # the conformal guarantee still holds
        # and the shortfall is gone: one row fewer with the same rank would exceed the target
        assert cal.rank / n > target


def test_split_calibration_rows_hit_the_target_rate_exactly():
    splits = split_rows(None, 3333, CalibrationConfig(target_fpr=0.01), TrainingConfig(), "t")
    assert len(splits.cal) == 599  # 20% is 667 rows, whose rank 6 gives 6/668 = 0.90%
    assert calibrate(np.arange(len(splits.cal), dtype=np.float32), 0.01).expected_fpr == pytest.approx(0.01)
    assert len(splits.train) + len(splits.val) + len(splits.cal) == 3333
