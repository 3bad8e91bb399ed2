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


def test_a_small_extreme_run_alerts(calibration):
    """Before, a run under 100 rows never alerted: an hourly file of 50 rows, every one far out,
    passed as calm. Both p-values weigh the row count themselves."""
    run = calibration[-50:] * 3  # every row far out
    report = drift_report(run, len(run), calibration, EXPECTED_FPR)
    assert report.calibrated_p_value < 1e-6 and report.psi > 1 and report.psi_p_value < 1e-3
    rate, shape = report.alerts
    assert rate.startswith("anomaly rate 100.00% is far above the expected 1.00%")
    assert shape.startswith(f"score distribution has shifted from calibration (PSI {report.psi:.3f} > 0.25, p=5e-05 "
                            f"with no drift;")
    assert report.not_judged == () and report.to_dict()["alert"] is True
    # A shape far from calibration with nothing flagged: the PSI alone.
    low = drift_report(calibration[:50] / 2, 0, calibration, EXPECTED_FPR)
    assert len(low.alerts) == 1 and low.alerts[0].startswith("score distribution has shifted")


def _null_runs(n_calibration: int, rows: int, runs: int, seed: int):
    """Runs drawn from the calibration's own distribution: no drift at all. Each against a calibration
    set of its own, since, as the rate's, the PSI's p-value allows for the calibration draw (over
    bundles, not for one bundle's fixed set)."""
    rng = np.random.default_rng(seed)
    rank = max(1, int(0.01 * (n_calibration + 1)))
    for _ in range(runs):
        calibration = np.sort(rng.gamma(2.0, size=n_calibration))
        run = rng.gamma(2.0, size=rows)
        yield drift_report(run, int(np.count_nonzero(run > calibration[-rank])), calibration,
                           rank / (n_calibration + 1))


@pytest.mark.parametrize("n_calibration, rows", [(79, 120), (1999, 60)])
def test_psi_alerts_on_runs_without_drift_are_as_rare_as_the_limit_says(n_calibration, rows):
    """Before, PSI > 0.25 alone alerted: with no drift, 20-30% of such runs (a 79-row calibration
    set, or 60 rows a run) raised a false shape alert."""
    reports = list(_null_runs(n_calibration, rows, runs=300, seed=n_calibration))
    over = sum(r.psi > 0.25 for r in reports)
    assert over > 30  # the old rule's false alerts, on these very runs
    assert sum("score distribution" in " ".join(r.alerts) for r in reports) <= 3  # 0.3 expected at p < 0.001


def test_psi_p_values_of_runs_without_drift_are_uniform():
    """The Dirichlet-multinomial null is the real one: p <= t for about a share t of drifted-free runs."""
    p = np.array([r.psi_p_value for r in _null_runs(499, 100, runs=400, seed=7)])
    for t in (0.05, 0.2, 0.5):
        assert abs(np.mean(p <= t) - t) < 4 * math.sqrt(t * (1 - t) / len(p)) + 0.01, (t, np.mean(p <= t))


def test_the_psi_p_value_is_the_same_on_every_call(calibration):
    run = np.random.default_rng(4).gamma(2.0, size=70)
    first, again = (drift_report(run, 0, calibration, EXPECTED_FPR).psi_p_value for _ in range(2))
    assert first == again and 0 < first < 1


def test_a_run_too_small_to_reach_the_rate_limit_says_so(calibration):
    """At a 1% target one flagged row has p = 0.01: no single row can reach 0.001, so the rate is
    not judged; two rows both flagged have p = 1e-4 and alert."""
    one = drift_report(calibration[-1:] * 3, 1, calibration, EXPECTED_FPR)
    assert not one.alert
    assert one.not_judged[0] == ("anomaly rate not judged: 1 row, too few to reach p < 0.001 even with every row "
                                 "flagged (p=0.01)")
    # One row lands in one of ten bins: any PSI it gives has p of about 0.1 with no drift.
    assert one.not_judged[1].startswith("PSI not judged: 1 row, too few for any PSI to reach p < 0.001 with no drift "
                                        "(p=0.1")
    two = drift_report(calibration[-2:] * 3, 2, calibration, EXPECTED_FPR)
    assert two.alerts[0].startswith("anomaly rate") and not two.not_judged[0].startswith("anomaly rate")
    assert drift_report(calibration[:2], 0, calibration, EXPECTED_FPR).not_judged == two.not_judged
    # From a handful of rows on, all of them in one bin is unlikely enough for the PSI to be judged.
    assert drift_report(calibration[:6], 0, calibration, EXPECTED_FPR).not_judged == ()


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
    assert empty.not_judged == ("anomaly rate and PSI not judged: no rows scored",)
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
                                    {"psi_p_value": 0.0}, {"psi_p_value": 1.0}, {"psi_p_value": float("nan")}])
def test_limits_are_checked_when_built(limits):
    """Before, only drift_report checked them, at the end of a run that had scored every file; and a
    NaN max_psi passed there, so the shape alert could never fire."""
    with pytest.raises(ConfigError, match=r"expected 0 < rate_p_value < 1, a finite max_psi > 0 and 0 < psi_p_value < 1"):
        DriftLimits(**limits)
