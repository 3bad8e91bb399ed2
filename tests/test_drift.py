"""Drift of a run's scores against the calibration scores."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from pipeline.drift import DriftLimits, calibrated_p_value, drift_report
from pipeline.errors import ConfigError, DataError

N_CAL = 1999
RANK = 20  # the conformal threshold for target 1%: floor(0.01 * (N_CAL + 1))
EXPECTED_FPR = RANK / (N_CAL + 1)


@pytest.fixture(scope="module")
def calibration() -> np.ndarray:
    return np.sort(np.random.default_rng(0).gamma(2.0, size=N_CAL))


def flagged(scores: np.ndarray, calibration: np.ndarray) -> int:
    return int(np.count_nonzero(scores > calibration[-RANK]))


def test_batch_like_calibration_raises_no_alert(calibration):
    run = np.random.default_rng(1).gamma(2.0, size=5000)
    report = drift_report(run, flagged(run, calibration), calibration, EXPECTED_FPR)
    assert not report.alert, report.alerts
    assert report.rows == 5000 and report.psi < 0.05 and report.calibrated_p_value > 0.001


def test_shifted_batch_alerts_on_rate_and_psi(calibration):
    run = np.random.default_rng(2).gamma(2.0, size=5000) * 1.5
    report = drift_report(run, flagged(run, calibration), calibration, EXPECTED_FPR)
    assert report.alert and len(report.alerts) == 2
    # In the upper tail the calibration's own uncertainty makes the test more cautious, never less.
    assert report.rate_p_value <= report.calibrated_p_value < 1e-6
    rate, shape = report.alerts
    assert rate.startswith("anomaly rate") and "far above the expected 1.00%" in rate
    assert "PSI" in shape and report.psi > 0.25
    assert report.ks_statistic > 0.1 and report.ks_p_value < 1e-6


def test_too_few_rows_never_alert(calibration):
    run = calibration[-50:] * 3  # every row far out
    report = drift_report(run, len(run), calibration, EXPECTED_FPR)
    assert report.calibrated_p_value < 1e-6 and report.psi > 1
    assert not report.alert
    assert drift_report(run, len(run), calibration, EXPECTED_FPR, DriftLimits(min_rows=50)).alert


def test_rate_p_value_is_scipys_one_sided_binomial_test():
    calibration = np.linspace(0.0, 1.0, 99)
    report = drift_report(np.linspace(0.0, 1.0, 200), 7, calibration, 0.02)
    assert report.rate_p_value == pytest.approx(stats.binomtest(7, 200, 0.02, alternative="greater").pvalue)
    # By hand: P(X >= 7) = 1 - sum_{i<7} C(200, i) 0.02^i 0.98^(200-i)
    by_hand = 1 - sum(math.comb(200, i) * 0.02**i * 0.98 ** (200 - i) for i in range(7))
    assert report.rate_p_value == pytest.approx(by_hand)
    # 0.02 = 2 / (99 + 1): threshold at the 2nd largest of 99 calibration scores.
    assert report.calibrated_p_value == pytest.approx(stats.betabinom.sf(6, 200, 2, 98))


def test_calibrated_p_value_falls_back_to_binomial_without_a_rank():
    assert calibrated_p_value(3, 100, 0.001, 99) == pytest.approx(stats.binom.sf(2, 100, 0.001))
    assert calibrated_p_value(0, 100, 0.01, 99) == 1.0


def test_report_is_strict_json_even_when_empty(calibration):
    empty = drift_report(np.array([]), 0, calibration, EXPECTED_FPR)
    assert empty.rows == 0 and not empty.alert
    raw = json.loads(json.dumps(empty.to_dict(), allow_nan=False))
    assert raw["psi"] is None and raw["ks_p_value"] is None and raw["alerts"] == [] and raw["alert"] is False

    run = np.random.default_rng(3).gamma(2.0, size=300).astype(np.float32) * 2
    full = json.loads(json.dumps(drift_report(run, flagged(run, calibration), calibration, EXPECTED_FPR).to_dict(),
                                 allow_nan=False))
    assert full["alert"] is True and isinstance(full["rows"], int) and isinstance(full["psi"], float)


def test_an_overflowed_score_counts_in_the_top_bin(calibration):
    """The scorer publishes +inf for a row that overflows float32; drift counts it as a score
    above every calibration score instead of refusing the run."""
    run = np.random.default_rng(1).gamma(2.0, size=5000)
    with_overflow = run.copy()
    with_overflow[7] = np.inf
    finite = drift_report(np.where(np.isinf(with_overflow), calibration[-1] + 1, with_overflow),
                          flagged(with_overflow, calibration), calibration, EXPECTED_FPR)
    report = drift_report(with_overflow, flagged(with_overflow, calibration), calibration, EXPECTED_FPR)
    assert report.psi == pytest.approx(finite.psi) and report.ks_statistic == pytest.approx(finite.ks_statistic)
    with pytest.raises(DataError, match="calibration scores: expected finite numbers"):
        drift_report(run, 0, np.append(calibration, np.inf), EXPECTED_FPR)
    with pytest.raises(DataError, match="run scores"):
        drift_report(np.array([1.0, -np.inf]), 0, calibration, EXPECTED_FPR)


def test_bad_inputs_say_what_was_expected(calibration):
    with pytest.raises(DataError, match="between 0 and the 10 scored rows"):
        drift_report(np.ones(10), 11, calibration, EXPECTED_FPR)
    with pytest.raises(DataError, match="NaN"):
        drift_report(np.array([1.0, np.nan]), 0, calibration, EXPECTED_FPR)
    with pytest.raises(DataError, match="calibration scores"):
        drift_report(np.ones(10), 0, np.array([]), EXPECTED_FPR)
    with pytest.raises(ConfigError, match="expected_fpr"):
        drift_report(np.ones(10), 0, calibration, 0.0)


def test_calibrated_p_value_keeps_its_digits_far_in_the_tail():
    """scipy's sf is 1 - cdf: 300 of 1,000 rows flagged against 1% showed p = 0, and 5 of 5 was 0.2% off."""
    n, k = 599, 6
    assert calibrated_p_value(5, 5, k / (n + 1), n) == pytest.approx(stats.betabinom.pmf(5, 5, k, n + 1 - k), rel=1e-9)
    far = calibrated_p_value(300, 1000, k / (n + 1), n)
    terms = stats.betabinom.pmf(np.arange(300, 1001), 1000, k, n + 1 - k)
    assert far > 0 and far == pytest.approx(terms.sum(), rel=1e-9)
    # Unchanged where sf is accurate.
    assert calibrated_p_value(30, 1000, k / (n + 1), n) == stats.betabinom.sf(29, 1000, k, n + 1 - k)


@pytest.mark.parametrize("limits", [{"max_psi": 0.0}, {"max_psi": float("nan")}, {"max_psi": float("inf")},
                                    {"rate_p_value": 0.0}, {"rate_p_value": 1.5}, {"rate_p_value": float("nan")},
                                    {"min_rows": 0}, {"min_rows": 2.5}])
def test_limits_are_checked_when_built(limits):
    """Before, only drift_report checked them, at the end of a run that had scored every file; and a
    NaN max_psi passed there, so the shape alert could never fire."""
    with pytest.raises(ConfigError, match=r"expected 0 < rate_p_value < 1, a finite max_psi > 0 and min_rows >= 1"):
        DriftLimits(**limits)
