import numpy as np
import pytest

from pipeline.config import CalibrationConfig, TrainingConfig
from pipeline.errors import DataError
from pipeline.splits import rows_needed, split_rows


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


def test_too_few_rows_names_the_number_needed():
    needed = rows_needed(CalibrationConfig(), TrainingConfig(), labelled=False)
    split_rows(None, needed, CalibrationConfig(), TrainingConfig(), "t")  # exactly enough works
    with pytest.raises(DataError, match=rf"need at least {needed}"):
        split_rows(None, needed - 1, CalibrationConfig(), TrainingConfig(), "small.csv")
