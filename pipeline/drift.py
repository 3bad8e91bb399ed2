"""Does this run's score distribution still look like the calibration set's?

Two questions, each with its own alert. The anomaly rate: if new normal rows are exchangeable
with the calibration rows, the number flagged is about Binomial(rows, expected_fpr), so a count
far in its upper tail means many real anomalies or data that no longer looks like calibration.
The shape: the population stability index of the scores over the calibration deciles catches a
shift even before the tail rate moves. The KS statistic is reported beside them, not alerted
on: with millions of rows it rejects for shifts too small to matter.

The rate alert does not use the plain binomial p-value (reported as ``rate_p_value``). The
threshold is the k-th largest of n calibration scores, so the true false-positive rate of a
given bundle is itself random, Beta(k, n + 1 - k) around expected_fpr; the count flagged on
normal rows is therefore BetaBinomial(rows, k, n + 1 - k). With 5,000 calibration rows and
100,000 scored rows the plain binomial test at p < 0.001 fires on about 23% of bundles with no
drift at all, on every run; the beta-binomial one on about 0.1%, as intended.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import stats
from scipy.special import logsumexp

from pipeline.errors import ConfigError, DataError

PSI_BINS = 10
# Keeps an empty bin from making PSI infinite; small enough not to matter for a filled one.
PSI_EPS = 1e-4
# Below this, calibrated_p_value sums the beta-binomial tail itself, TAIL_CHUNK terms at a time.
TAIL_BY_SUM = 1e-8
TAIL_CHUNK = 4096


@dataclass(frozen=True)
class DriftLimits:
    rate_p_value: float = 0.001  # alert when the anomaly count is this unlikely under the target (calibrated_p_value)
    max_psi: float = 0.25  # alert when the population stability index of scores exceeds this
    min_rows: int = 100  # fewer rows: report, never alert (too little evidence)

    def __post_init__(self) -> None:
        # Checked when built, so a bad limit fails before a run scores its files, not after. NaN
        # compares False both ways and would silently never alert.
        rate, psi, rows = self.rate_p_value, self.max_psi, self.min_rows
        if not (_real(rate) and 0.0 < rate < 1.0 and _real(psi) and psi > 0
                and isinstance(rows, int) and not isinstance(rows, bool) and rows >= 1):
            raise ConfigError(f"drift limits rate_p_value={rate!r}, max_psi={psi!r}, min_rows={rows!r}: expected "
                              f"0 < rate_p_value < 1, a finite max_psi > 0 and min_rows >= 1; e.g. the defaults "
                              f"0.001, 0.25 and 100")


@dataclass(frozen=True)
class DriftReport:
    rows: int
    anomalies: int
    observed_rate: float
    expected_fpr: float
    rate_p_value: float  # P(X >= anomalies | X ~ Binomial(rows, expected_fpr))
    psi: float  # run scores vs calibration scores, 10 bins at the calibration deciles
    ks_statistic: float
    ks_p_value: float
    calibration_rows: int
    calibrated_p_value: float  # the same tail under BetaBinomial(rows, k, n + 1 - k): what the rate alert uses
    alerts: tuple[str, ...]

    @property
    def alert(self) -> bool:
        return bool(self.alerts)

    def to_dict(self) -> dict:
        raw = asdict(self)
        clean = {key: _json_number(value) for key, value in raw.items() if key != "alerts"}
        return {**clean, "alerts": list(self.alerts), "alert": self.alert}

    def describe(self) -> str:
        if self.rows == 0:
            return "no rows scored: nothing to compare with calibration"
        text = (f"{self.rows:,} rows, anomaly rate {self.observed_rate:.2%} (expected {self.expected_fpr:.2%}, "
                f"p={self.calibrated_p_value:.3g}); PSI {self.psi:.3f}, KS {self.ks_statistic:.3f}")
        return text + ("; ALERT: " + "; ".join(self.alerts) if self.alerts else "")


def _real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _json_number(value):
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def drift_report(scores: np.ndarray, anomalies: int, calibration_scores: np.ndarray, expected_fpr: float,
                 limits: DriftLimits = DriftLimits()) -> DriftReport:
    run = _checked_scores(scores, "run scores", overflow_allowed=True)
    calibration = _checked_scores(calibration_scores, "calibration scores", overflow_allowed=False)
    rows, anomalies = len(run), int(anomalies)
    _check_inputs(rows, anomalies, len(calibration), expected_fpr)
    if rows == 0:
        nan = float("nan")
        return DriftReport(0, 0, nan, expected_fpr, nan, nan, nan, nan, len(calibration), nan, ())
    ks = stats.ks_2samp(run, calibration)
    report = DriftReport(
        rows=rows, anomalies=anomalies, observed_rate=anomalies / rows, expected_fpr=expected_fpr,
        rate_p_value=rate_p_value(anomalies, rows, expected_fpr),
        psi=population_stability_index(run, calibration),
        ks_statistic=float(ks.statistic), ks_p_value=float(ks.pvalue), calibration_rows=len(calibration),
        calibrated_p_value=calibrated_p_value(anomalies, rows, expected_fpr, len(calibration)), alerts=())
    return replace(report, alerts=drift_alerts(report, limits))


def _checked_scores(values: np.ndarray, what: str, overflow_allowed: bool) -> np.ndarray:
    # +inf is a real score: the scorer gives it to a row so far out that float32 overflows, and
    # it counts in the top bin like any score above the calibration's. Calibration rows never
    # overflow (training refuses such values), and no score is ever NaN or -inf.
    array = np.asarray(values, dtype=np.float64).ravel()
    bad = np.count_nonzero(np.isnan(array) | np.isneginf(array) | (np.isposinf(array) & (not overflow_allowed)))
    if bad:
        allowed = "finite numbers or +inf" if overflow_allowed else "finite numbers"
        raise DataError(f"{what}: expected {allowed}, got {bad:,} NaN / infinite of {len(array):,}; "
                        f"the scorer should never produce them: check the bundle and the input rows")
    return array


def _check_inputs(rows: int, anomalies: int, n_calibration: int, expected_fpr: float) -> None:
    if not 0 <= anomalies <= rows:
        raise DataError(f"anomalies: expected a count between 0 and the {rows:,} scored rows, got {anomalies:,}; "
                        f"pass the number of rows flagged in this run")
    if n_calibration == 0:
        raise DataError("calibration scores: expected the bundle's calibration scores, got none; "
                        "re-export the bundle with its calibration table")
    if not 0.0 < expected_fpr < 1.0:
        raise ConfigError(f"expected_fpr: expected a rate strictly between 0 and 1, got {expected_fpr}; "
                          f"pass the bundle's calibration expected_fpr")


def rate_p_value(anomalies: int, rows: int, expected_fpr: float) -> float:
    """One-sided: how likely at least this many flags are if the true rate is ``expected_fpr``."""
    return float(stats.binomtest(anomalies, rows, expected_fpr, alternative="greater").pvalue)


def calibrated_p_value(anomalies: int, rows: int, expected_fpr: float, n_calibration: int) -> float:
    """One-sided tail allowing for the calibration set's own uncertainty about the rate.

    expected_fpr is rank / (n + 1) for the conformal threshold, which recovers the rank k.
    """
    rank = round(expected_fpr * (n_calibration + 1))
    if not 1 <= rank <= n_calibration:
        # Calibration scores that do not match expected_fpr (a subsample, another bundle's):
        # no rank to recover, so fall back to the plain binomial tail.
        return rate_p_value(anomalies, rows, expected_fpr)
    if anomalies == 0:
        return 1.0
    a, b = rank, n_calibration + 1 - rank
    p = float(stats.betabinom.sf(anomalies - 1, rows, a, b))
    if p > TAIL_BY_SUM:
        return p
    # scipy's sf is 1 - cdf here: below about 1e-8 it keeps few digits, and by 1e-17 none, so a
    # run far above its rate showed p = 0. Summed term by term (the terms fall past the mode),
    # the tail keeps its digits down to float's limit.
    log_total, start = -np.inf, anomalies
    while start <= rows:
        terms = stats.betabinom.logpmf(np.arange(start, min(rows, start + TAIL_CHUNK - 1) + 1), rows, a, b)
        log_total = np.logaddexp(log_total, logsumexp(terms))
        if terms[-1] < log_total - 40:  # the rest adds less than e^-40 of the sum
            break
        start += TAIL_CHUNK
    return float(np.exp(log_total))


def population_stability_index(run: np.ndarray, calibration: np.ndarray, bins: int = PSI_BINS) -> float:
    """PSI over bins cut at the calibration quantiles, with both sides' shares eps-smoothed."""
    inner = np.unique(np.quantile(calibration, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    # Ties in the calibration merge bins; the calibration's own shares are then counted, not assumed 1/bins.
    expected = _bin_shares(calibration, inner)
    actual = _bin_shares(run, inner)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def _bin_shares(values: np.ndarray, inner_edges: np.ndarray) -> np.ndarray:
    counts = np.bincount(np.searchsorted(inner_edges, values, side="right"), minlength=len(inner_edges) + 1)
    shares = np.maximum(counts / len(values), PSI_EPS)
    return shares / shares.sum()


def drift_alerts(report: DriftReport, limits: DriftLimits) -> tuple[str, ...]:
    if report.rows < limits.min_rows:
        return ()
    alerts = []
    if report.calibrated_p_value < limits.rate_p_value:
        alerts.append(f"anomaly rate {report.observed_rate:.2%} is far above the expected {report.expected_fpr:.2%} "
                      f"(p={report.calibrated_p_value:.3g} < {limits.rate_p_value:g} allowing for the "
                      f"{report.calibration_rows:,}-row calibration set; binomial p={report.rate_p_value:.3g}): "
                      f"many real anomalies, or the input no longer looks like the calibration data; "
                      f"inspect the flagged rows")
    if report.psi > limits.max_psi:
        alerts.append(f"score distribution has shifted from calibration (PSI {report.psi:.3f} > {limits.max_psi:g}, "
                      f"KS {report.ks_statistic:.3f}): check the input source, and retrain on recent normal data "
                      f"if the change is expected")
    return tuple(alerts)
