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

The rate test alerts at any number of rows: its p-value already weighs how many there are, so a
small run alerts only when its count really is that unlikely (at a 1% target, every one of 2 rows
flagged gives p = 1e-4; at 5%, every one of 3). A run too small to reach the limit even with every
row flagged says so instead of staying silent.

The PSI alert needs the PSI both large (above ``max_psi``, 0.25, the usual "significant shift") and
unlikely with no drift (``psi_p_value``). On few rows, or against a small calibration set, PSI over
ten bins is mostly noise: with no drift, 30% of 50-row runs pass 0.25 against 2,000 calibration
rows, and 30% of 100-row runs against 79. Its null distribution is known, though: a run's rows
exchangeable with the calibration rows fall into the gaps between the calibration scores uniformly,
so its bin counts are Dirichlet-multinomial with the calibration's own bin counts (plus its one
extra gap) as weights. ``psi_p_value`` draws PSI_NULL_DRAWS runs from it, from a fixed seed so that
a run's p-value is the same on every machine. That is exact for distinct scores, whatever their
distribution; drawn runs of real scores agree with it to within their own sampling error at the
0.1% level (from 50 rows against 79 calibration rows to 100,000 against 20,000). A run too small
for any PSI to reach the limit (all its rows in one bin) says so instead of staying silent.
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
# Runs drawn from the PSI's null distribution for psi_p_value: its p-value is known to about
# +-0.0002 at 0.001, and the smallest it can give is 1 / (PSI_NULL_DRAWS + 1).
PSI_NULL_DRAWS = 20_000
PSI_NULL_SEED = 20240301
# Below this, calibrated_p_value sums the beta-binomial tail itself, TAIL_CHUNK terms at a time.
TAIL_BY_SUM = 1e-8
TAIL_CHUNK = 4096


@dataclass(frozen=True)
class DriftLimits:
    rate_p_value: float = 0.001  # alert when the anomaly count is this unlikely under the target (calibrated_p_value)
    max_psi: float = 0.25  # alert when the population stability index of scores exceeds this
    psi_p_value: float = 0.001  # ... and when a PSI that high is this unlikely with no drift (psi_p_value)

    def __post_init__(self) -> None:
        # Checked when built, so a bad limit fails before a run scores its files, not after. NaN
        # compares False both ways and would silently never alert.
        rate, psi, psi_p = self.rate_p_value, self.max_psi, self.psi_p_value
        if not (_real(rate) and 0.0 < rate < 1.0 and _real(psi) and psi > 0 and _real(psi_p) and 0.0 < psi_p < 1.0):
            raise ConfigError(f"drift limits rate_p_value={rate!r}, max_psi={psi!r}, psi_p_value={psi_p!r}: "
                              f"expected 0 < rate_p_value < 1, a finite max_psi > 0 and 0 < psi_p_value < 1; e.g. "
                              f"the defaults 0.001, 0.25 and 0.001")


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
    not_judged: tuple[str, ...] = ()  # the tests this run was too small for, and why: their silence means nothing
    psi_p_value: float = math.nan  # P(PSI >= psi) for a run of as many rows with no drift: what the PSI alert uses

    @property
    def alert(self) -> bool:
        return bool(self.alerts)

    def to_dict(self) -> dict:
        raw = asdict(self)
        clean = {key: _json_number(value) for key, value in raw.items() if key not in ("alerts", "not_judged")}
        return {**clean, "alerts": list(self.alerts), "alert": self.alert, "not_judged": list(self.not_judged)}

    def describe(self) -> str:
        if self.rows == 0:
            return "no rows scored: nothing to compare with calibration"
        text = (f"{_rows(self.rows)}, anomaly rate {self.observed_rate:.2%} (expected {self.expected_fpr:.2%}, "
                f"p={self.calibrated_p_value:.3g}); PSI {self.psi:.3f}, KS {self.ks_statistic:.3f}")
        text += "".join(f"; {note}" for note in self.not_judged)
        return text + ("; ALERT: " + "; ".join(self.alerts) if self.alerts else "")


def _rows(count: int) -> str:
    return f"{count:,} row" + ("" if count == 1 else "s")


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
        return DriftReport(0, 0, nan, expected_fpr, nan, nan, nan, nan, len(calibration), nan, (),
                           ("anomaly rate and PSI not judged: no rows scored",))
    ks = stats.ks_2samp(run, calibration)
    psi, null = population_stability_index(run, calibration), PsiNull(rows, calibration)
    report = DriftReport(
        rows=rows, anomalies=anomalies, observed_rate=anomalies / rows, expected_fpr=expected_fpr,
        rate_p_value=rate_p_value(anomalies, rows, expected_fpr),
        psi=psi, psi_p_value=null.p_value(psi),
        ks_statistic=float(ks.statistic), ks_p_value=float(ks.pvalue), calibration_rows=len(calibration),
        calibrated_p_value=calibrated_p_value(anomalies, rows, expected_fpr, len(calibration)), alerts=())
    return replace(report, alerts=drift_alerts(report, limits), not_judged=not_judged(report, limits, null))


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
    inner = _inner_edges(calibration, bins)
    # Ties in the calibration merge bins; the calibration's own shares are then counted, not assumed 1/bins.
    return float(_psi(_smoothed(_bin_counts(run, inner)), _smoothed(_bin_counts(calibration, inner))))


class PsiNull:
    """The PSI of ``rows`` rows exchangeable with the calibration rows (no drift): PSI_NULL_DRAWS
    runs drawn from its Dirichlet-multinomial null (module docstring), the same on every call with
    the same inputs."""

    def __init__(self, rows: int, calibration: np.ndarray, bins: int = PSI_BINS):
        self.rows = rows
        self.counts = _bin_counts(calibration, _inner_edges(calibration, bins))
        # n calibration scores leave n + 1 gaps, each as likely for a new row: each bin's own, and
        # the one extra spread over the bins (which also keeps a bin that ties left empty drawable).
        weights = self.counts + 1 / len(self.counts)
        rng = np.random.default_rng(PSI_NULL_SEED)
        drawn = rng.multinomial(rows, rng.dirichlet(weights, size=PSI_NULL_DRAWS))
        self.psis = _psi(_smoothed(drawn), _smoothed(self.counts))

    def p_value(self, psi: float) -> float:
        """P(PSI >= psi) with no drift."""
        # A hair under psi: a drawn run with the same counts as this one must count, whatever the rounding.
        return float((1 + np.count_nonzero(self.psis >= psi * (1 - 1e-9))) / (1 + len(self.psis)))

    def smallest_p_value(self) -> float:
        """The p-value of the largest PSI this many rows can give: all of them in one bin."""
        expected, most = _smoothed(self.counts), 0.0
        for i in range(len(self.counts)):
            alone = np.zeros(len(self.counts))
            alone[i] = self.rows
            most = max(most, float(_psi(_smoothed(alone), expected)))
        return self.p_value(most)


def _inner_edges(calibration: np.ndarray, bins: int) -> np.ndarray:
    return np.unique(np.quantile(calibration, np.linspace(0.0, 1.0, bins + 1)[1:-1]))


def _bin_counts(values: np.ndarray, inner_edges: np.ndarray) -> np.ndarray:
    return np.bincount(np.searchsorted(inner_edges, values, side="right"), minlength=len(inner_edges) + 1)


def _smoothed(counts: np.ndarray) -> np.ndarray:
    """Shares of bin counts (the last axis), each at least PSI_EPS before renormalising."""
    shares = np.maximum(counts / counts.sum(axis=-1, keepdims=True), PSI_EPS)
    return shares / shares.sum(axis=-1, keepdims=True)


def _psi(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    return np.sum((actual - expected) * np.log(actual / expected), axis=-1)


def drift_alerts(report: DriftReport, limits: DriftLimits) -> tuple[str, ...]:
    alerts = []
    if report.calibrated_p_value < limits.rate_p_value:
        alerts.append(f"anomaly rate {report.observed_rate:.2%} is far above the expected {report.expected_fpr:.2%} "
                      f"(p={report.calibrated_p_value:.3g} < {limits.rate_p_value:g} allowing for the "
                      f"{report.calibration_rows:,}-row calibration set; binomial p={report.rate_p_value:.3g}): "
                      f"many real anomalies, or the input no longer looks like the calibration data; "
                      f"inspect the flagged rows")
    if report.psi > limits.max_psi and report.psi_p_value < limits.psi_p_value:
        alerts.append(f"score distribution has shifted from calibration (PSI {report.psi:.3f} > {limits.max_psi:g}, "
                      f"p={report.psi_p_value:.2g} with no drift; KS {report.ks_statistic:.3f}): check the input source, and retrain on recent normal data "
                      f"if the change is expected")
    return tuple(alerts)


def not_judged(report: DriftReport, limits: DriftLimits, null: PsiNull) -> tuple[str, ...]:
    """The tests this run is too small for, each with why, so that a quiet small run is not read as a calm one."""
    notes = []
    # The smallest p-value this many rows can give is with every row flagged; at or above the
    # limit, no count could alert, whatever the rows hold.
    floor = calibrated_p_value(report.rows, report.rows, report.expected_fpr, report.calibration_rows)
    if floor >= limits.rate_p_value:
        notes.append(f"anomaly rate not judged: {_rows(report.rows)}, too few to reach p < {limits.rate_p_value:g} "
                     f"even with every row flagged (p={floor:.3g})")
    # If even the largest PSI this many rows can give is not unlikely enough, no run of this size could alert.
    floor = null.smallest_p_value()
    if floor >= limits.psi_p_value:
        notes.append(f"PSI not judged: {_rows(report.rows)}, too few for any PSI to reach p < {limits.psi_p_value:g} "
                     f"with no drift (p={floor:.2g} with every row in one score bin)")
    return tuple(notes)
