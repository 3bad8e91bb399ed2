"""Threshold and conformal p-values from scores of normal rows that training never saw.

With n calibration scores and a target false-positive rate alpha, a new normal row's
conformal p-value p = (1 + #{calibration scores >= s}) / (n + 1) is uniform (up to ties), so
flagging p <= alpha keeps the false-positive rate at most alpha, with no assumption about the
score distribution. That rule is the same as ``score > threshold`` where the threshold is the
k-th largest calibration score, k = floor(alpha * (n + 1)): the graph uses the threshold, the
p-value is reported beside it, and the two never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError, DataError

# The share of calibration draws that the reported false-positive range covers.
FPR_RANGE_LEVEL = 0.9
FPR_RANGE_KEY = "fpr_range_90"  # the manifest's copy of fpr_range() at FPR_RANGE_LEVEL


@dataclass(frozen=True)
class Calibration:
    scores: np.ndarray  # float32, sorted ascending
    target_fpr: float
    threshold: float
    rank: int  # k: the threshold is the k-th largest calibration score

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def expected_fpr(self) -> float:
        """The exact false-positive rate the conformal rule gives on exchangeable normal rows."""
        return self.rank / (self.n + 1)

    def fpr_range(self, level: float = FPR_RANGE_LEVEL) -> tuple[float, float]:
        return fpr_range(self.rank, self.n, level)

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        return conformal_p_values(self.scores, scores)

    def search_table(self) -> np.ndarray:
        """The sorted scores laid out for the scorer graph's branch-free binary search.

        Entry j (1-based) holds the j-th smallest score and entry 0 is -inf, so a search step
        reads the entry at its candidate count directly, with no index shift; +inf pads the
        table to a power of two > n, so every row takes the same log2 steps.
        """
        size = 1 << math.ceil(math.log2(self.n + 1))
        table = np.full(size, np.inf, dtype=np.float32)
        table[0] = -np.inf
        table[1: self.n + 1] = self.scores
        return table

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "expected_fpr": self.expected_fpr,
            FPR_RANGE_KEY: list(self.fpr_range()),
            "rank": self.rank,
            "n_calibration": self.n,
            "rule": "is_anomaly = score > threshold  (equivalently p_value <= target_fpr)",
            "p_value": "(1 + #{calibration scores >= score}) / (n_calibration + 1)",
            "scores": [float(s) for s in self.scores],
        }

    @classmethod
    def from_dict(cls, raw: dict) -> "Calibration":
        return cls(np.asarray(raw["scores"], dtype=np.float32), raw["target_fpr"], raw["threshold"], raw["rank"])


def fpr_range(rank: int, n: int, level: float = FPR_RANGE_LEVEL) -> tuple[float, float]:
    """Where the threshold's false-positive rate on normal data lies, for ``level`` of the ways
    the n calibration rows could have been drawn.

    expected_fpr is an average over calibration sets; a given bundle's own rate is the chance
    that a normal row beats the k-th largest of n calibration scores, which is Beta(k, n + 1 - k)
    whatever the score distribution (for continuous scores). At 1% that is 0.44%-1.75% with
    599 rows and 0.89%-1.12% with 20,000: users see how precise their threshold is, and that more
    calibration rows are what narrows it.
    """
    # Imported here: scipy.stats adds 60 MB to every process that imports it, and scoring reads
    # the range the manifest stored at training (``stored_fpr_range``) instead.
    from scipy import stats

    tail = (1.0 - level) / 2.0
    low, high = stats.beta.ppf([tail, 1.0 - tail], rank, n + 1 - rank)
    return float(low), float(high)


def format_fpr_range(rank: int, n: int, stored: Sequence[float] | None = None) -> str:
    """'low%-high%', from ``stored`` (a manifest's copy) when given, else computed."""
    low, high = stored if stored else fpr_range(rank, n)
    return f"{low:.2%}-{high:.2%}"


def describe_fpr_range(rank: int, n: int, stored: Sequence[float] | None = None) -> str:
    return f"{format_fpr_range(rank, n, stored)} for {FPR_RANGE_LEVEL:.0%} of calibration sets of {n:,} rows"


def stored_fpr_range(calibration: dict) -> str:
    """describe_fpr_range of a manifest's calibration section, from the range stored in it."""
    return describe_fpr_range(calibration["rank"], calibration["n_calibration"], calibration.get(FPR_RANGE_KEY))


def min_calibration_rows(target_fpr: float) -> int:
    """Fewest calibration rows for which some threshold reaches the target rate."""
    check_target_fpr(target_fpr)
    return math.ceil(1.0 / target_fpr) - 1


def check_target_fpr(target_fpr: float) -> None:
    if not 0.0 < target_fpr < 0.5:
        raise ConfigError(f"target FPR must be in (0, 0.5), got {target_fpr}; 0.01 means 1% false alarms")


def calibrate(scores: np.ndarray, target_fpr: float) -> Calibration:
    check_target_fpr(target_fpr)
    ordered = np.sort(np.asarray(scores, dtype=np.float32))
    n = len(ordered)
    rank = math.floor(target_fpr * (n + 1) + 1e-9)
    if rank < 1:
        raise DataError(
            f"{n} calibration rows cannot calibrate a target FPR of {target_fpr}: at least "
            f"{min_calibration_rows(target_fpr)} are needed; give more rows or raise the target FPR"
        )
    return Calibration(ordered, float(target_fpr), float(ordered[n - rank]), rank)


def placeholder_calibration(n: int, target_fpr: float) -> Calibration:
    """A calibration of ``n`` made-up scores, for exporting a scorer graph before it has scores.

    The graph depends on n alone (the table's padded size sets the search's steps), so the graph
    exported with this scores exactly as the final one; its table and threshold are then replaced
    (pipeline.precision_graphs.write_table) by the calibration on the scores it gave. Distinct
    values, so the exporter cannot merge the table with an equal initializer.
    """
    return calibrate(np.arange(1, n + 1, dtype=np.float32), target_fpr)


def conformal_p_values(sorted_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(1 + #{cal >= s}) / (n + 1) in float32, computed as scorer.onnx computes it."""
    n = len(sorted_scores)
    below = np.searchsorted(sorted_scores, np.asarray(scores, dtype=np.float32), side="left")
    return (np.float32(n + 1) - below.astype(np.float32)) / np.float32(n + 1)
