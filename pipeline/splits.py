"""Splitting rows into train / validation / calibration / test.

Only normal rows are ever trained or calibrated on: labelled anomalies go to the test split,
where, with held-out normal rows, they measure AUROC and AUPRC. Without labels there is no
test split. Splits are random but fixed by the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.calibrate import min_calibration_rows
from pipeline.config import CalibrationConfig, TrainingConfig
from pipeline.errors import DataError

MIN_TRAIN_ROWS = 50
MIN_VAL_ROWS = 10
# On small tables calibration takes the rows the target FPR needs even beyond cal_fraction,
# as long as training keeps at least this share: an honest threshold matters more than the
# last few training rows (ADBench's breastw and pima have about 220 normal training rows).
MIN_TRAIN_SHARE = 0.4


@dataclass(frozen=True)
class Splits:
    train: np.ndarray  # row positions in the training table
    val: np.ndarray
    cal: np.ndarray
    test: np.ndarray  # held-out normal rows, then every anomaly

    def sizes(self) -> dict[str, int]:
        return {k: int(len(v)) for k, v in vars(self).items()}


def exact_calibration_size(n_cal: int, target_fpr: float) -> int:
    """The largest n <= n_cal whose conformal rank k = floor(target (n + 1)) gives k / (n + 1) as
    close to the target as that k allows.

    The conformal threshold's false-positive rate is k / (n + 1), below the target by up to
    1 / (n + 1): 667 rows at 1% give 6 / 668 = 0.90%, a 10% shortfall that shows on every
    dataset. Trimming to n = ceil(k / target) - 1 (599 here) removes it; the trimmed rows
    train instead.
    """
    rank = math.floor(target_fpr * (n_cal + 1) + 1e-9)
    if rank < 1:
        return n_cal
    return min(n_cal, math.ceil(rank / target_fpr - 1e-9) - 1)


def _sizes(n_normal: int, cal: CalibrationConfig, training: TrainingConfig, labelled: bool):
    wanted = max(round(cal.cal_fraction * n_normal), min_calibration_rows(cal.target_fpr))
    n_cal = exact_calibration_size(min(cal.max_calibration_rows, wanted), cal.target_fpr)
    n_test = round(cal.test_fraction * n_normal) if labelled else 0
    n_val = max(MIN_VAL_ROWS, round(training.val_fraction * n_normal))
    return n_cal, n_val, n_test, n_normal - n_cal - n_val - n_test


def _enough(n_normal: int, cal: CalibrationConfig, training: TrainingConfig, labelled: bool) -> bool:
    n_cal, _, _, n_train = _sizes(n_normal, cal, training, labelled)
    return (n_cal >= min_calibration_rows(cal.target_fpr)
            and n_train >= max(MIN_TRAIN_ROWS, MIN_TRAIN_SHARE * n_normal))


def rows_needed(cal: CalibrationConfig, training: TrainingConfig, labelled: bool) -> int:
    """Fewest normal rows that give every split its minimum size."""
    low, n = MIN_TRAIN_ROWS + MIN_VAL_ROWS - 1, MIN_TRAIN_ROWS + MIN_VAL_ROWS
    while not _enough(n, cal, training, labelled):
        low, n = n, max(n + 1, math.ceil(n * 1.01))
    # 1% steps find a size that is enough quickly (0.1% needs about 10,000 rows); the fewest lies
    # after the last size that was not, so the error message does not ask for more than needed.
    return next(m for m in range(low + 1, n + 1) if _enough(m, cal, training, labelled))


def check_enough_rows(n_normal: int, cal: CalibrationConfig, training: TrainingConfig, labelled: bool,
                      source: str, counted: str = "normal rows") -> None:
    """Fail when ``n_normal`` rows (``counted``, in the message) can't give every split its minimum size.

    The training workflow asks it of all the rows before the columns are judged, as an upper bound
    of the normal ones: in one row every column is constant, and such a file was refused as having
    "no usable feature columns" instead of for its length.
    """
    if not _enough(n_normal, cal, training, labelled):
        raise DataError(
            f"{source}: too few rows to train and calibrate: {n_normal} {counted}, need "
            f"at least {rows_needed(cal, training, labelled)} for target FPR {cal.target_fpr} (calibration alone "
            f"needs {min_calibration_rows(cal.target_fpr)}); add rows or raise --target-fpr"
        )


def split_rows(labels: np.ndarray | None, n_rows: int, cal: CalibrationConfig,
               training: TrainingConfig, source: str) -> Splits:
    rng = np.random.default_rng(training.seed)
    labelled = labels is not None
    normal = np.flatnonzero(labels == 0) if labelled else np.arange(n_rows)
    anomalies = np.flatnonzero(labels == 1) if labelled else np.array([], dtype=np.int64)
    n_cal, n_val, n_test, n_train = _sizes(len(normal), cal, training, labelled)
    check_enough_rows(len(normal), cal, training, labelled, source)
    shuffled = rng.permutation(normal)
    cuts = np.cumsum([n_train, n_val, n_cal])
    train, val, cal_rows, test_normal = np.split(shuffled, cuts)
    return Splits(train=np.sort(train), val=np.sort(val), cal=np.sort(cal_rows),
                  test=np.concatenate([np.sort(test_normal), anomalies]))
