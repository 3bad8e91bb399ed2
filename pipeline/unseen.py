"""Categorical values the bundle never saw: counted per column as a run is scored, and a warning
when a column's share of them is far above training's.

An unseen value goes to its column's unknown bucket, silently, which is right for the odd new
value. A whole column there is most likely the same data spelled differently ('Y' for 'yes', a
prefix on codes, a shifted column): every such row scores higher, and a night of false alarms
needs a line saying why. Counting is per distinct value of a batch (pipeline.runtime), so it
costs next to nothing per row.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.preprocess import CategoricalStats

log = logging.getLogger("vaeguard")

# Unseen values kept per column as examples: enough that the most frequent ones of a run survive
# the per-batch cut, few enough that a column of a new id per row costs no memory.
EXAMPLES_PER_BATCH = 20
EXAMPLES_KEPT = 100


@dataclass
class UnseenCounts:
    """One categorical column over a run: rows scored, rows whose value the scorer sends to the
    unknown bucket, and the most frequent such values (approximately, across batches)."""
    rows: int = 0
    unseen: int = 0
    examples: Counter = field(default_factory=Counter)

    def add(self, other: "UnseenCounts") -> None:
        self.rows += other.rows
        self.unseen += other.unseen
        self.examples.update(other.examples)
        self._trim()

    def count(self, dictionary: np.ndarray, indices: np.ndarray, known: frozenset[str]) -> None:
        """A batch given as its distinct values and each row's index into them: the work is per
        distinct value, plus one bincount over the rows."""
        self.rows += len(indices)
        unseen = np.fromiter((value not in known for value in dictionary), dtype=bool, count=len(dictionary))
        if not unseen.any():
            return
        rows = np.bincount(indices, minlength=len(dictionary))[unseen]
        self.unseen += int(rows.sum())
        values = dictionary[unseen]
        top = np.argsort(-rows, kind="stable")[:EXAMPLES_PER_BATCH]
        for i in top:  # a null and "" are one text, "": each adds to it
            if rows[i]:
                self.examples[values[i]] += int(rows[i])
        self._trim()

    def _trim(self) -> None:
        if len(self.examples) > EXAMPLES_KEPT:
            self.examples = Counter(dict(self.examples.most_common(EXAMPLES_KEPT)))


# When a categorical column's unknown bucket took far more of a run's rows than of training's, its
# values most likely come spelled differently ('Y' for 'yes', a prefix on codes, a shifted column):
# every such row then scores higher, and a night of false alarms needs a line saying why. Not for
# the odd new value (fewer than UNSEEN_MIN_ROWS rows, or at most UNSEEN_MIN_SHARE of them), nor for
# a share near training's own (its rare categories, beyond min_category_count and max_categories,
# went to the unknown bucket too).
UNSEEN_MIN_ROWS = 10
UNSEEN_MIN_SHARE = 0.01
UNSEEN_FACTOR = 5
# A bundle exported before training's share was recorded: it may have had any share of rare
# values, so only a majority of rows is taken as a changed format.
UNSEEN_WITHOUT_BASELINE = 0.5
UNSEEN_EXAMPLES = 5


def unseen_limit(training_share: float | None) -> float:
    """The share of a run's rows in a column's unknown bucket above which scoring warns: five times
    training's share, at least 1%, and at most halfway from training's share to every row (a column
    with 30% rare values in training still warns when its spelling changes and 100% go there)."""
    if training_share is None:
        return UNSEEN_WITHOUT_BASELINE
    return max(UNSEEN_MIN_SHARE, min(UNSEEN_FACTOR * training_share, (1 + training_share) / 2))


# Files named in a column's warning when a run has several inputs; the rest are counted.
FILES_NAMED = 3


def unseen_entries(categorical: Sequence[CategoricalStats], counts: dict[str, UnseenCounts], where: str = "",
                   files: Sequence[tuple[str, dict[str, UnseenCounts]]] = ()) -> dict[str, dict]:
    """The summary's field for each categorical column: rows scored, rows its unknown bucket took,
    their share and training's, the most frequent such values, and the warning line or None.

    ``files``, each input's name and own counts: with several, a warning names those whose own
    share is above the limit, since the run's total does not say which export changed."""
    entries = {}
    for stats in categorical:
        tally = counts.get(stats.name, UnseenCounts())
        share = tally.unseen / tally.rows if tally.rows else 0.0
        limit = unseen_limit(stats.unknown_share)
        fired = tally.unseen >= UNSEEN_MIN_ROWS and share > limit
        named = _files_above(stats.name, limit, files) if fired and len(files) > 1 else ""
        entries[stats.name] = {"rows": tally.rows, "unseen": tally.unseen, "share": share,
                               "training_share": stats.unknown_share,
                               "examples": dict(tally.examples.most_common(UNSEEN_EXAMPLES)),
                               "warning": _unseen_warning(stats, tally, share, where, named) if fired else None}
    return entries


def file_entries(categorical: Sequence[CategoricalStats], counts: dict[str, UnseenCounts]) -> dict[str, dict]:
    """One input's own counts per categorical column, for its entry in the summary's ``files``:
    compact (no examples), as a run may have thousands of inputs."""
    entries = {}
    for stats in categorical:
        tally = counts.get(stats.name, UnseenCounts())
        entries[stats.name] = {"rows": tally.rows, "unseen": tally.unseen,
                               "share": tally.unseen / tally.rows if tally.rows else 0.0}
    return entries


def unseen_counts_of(entry: dict) -> UnseenCounts:
    """Counts back from a summary's entry (or a file's, which has no examples), to add up several."""
    return UnseenCounts(entry["rows"], entry["unseen"], Counter(entry.get("examples", {})))


def warn_unseen(entries: dict[str, dict]) -> None:
    for entry in entries.values():
        if entry["warning"]:
            log.warning("%s", entry["warning"])


def _files_above(column: str, limit: float, files: Sequence[tuple[str, dict[str, UnseenCounts]]]) -> str:
    """' in a.csv (600 of 600 rows), b.csv (590 of 600)': the inputs whose own share of the column
    is above the limit, highest first. The run's share is their average, so one at least is."""
    above = [(name, tally) for name, counts in files
             if (tally := counts.get(column)) and tally.rows and tally.unseen / tally.rows > limit]
    above.sort(key=lambda item: -item[1].unseen / item[1].rows)  # stable: ties stay in input order
    shown = [f"{name} ({tally.unseen:,} of {tally.rows:,}{' rows' if i == 0 else ''})"
             for i, (name, tally) in enumerate(above[:FILES_NAMED])]
    more = f" and {len(above) - FILES_NAMED} more" if len(above) > FILES_NAMED else ""
    return f" in {', '.join(shown)}{more}" if shown else ""


def _unseen_warning(stats: CategoricalStats, tally: UnseenCounts, share: float, where: str, named: str = "") -> str:
    training = f"; {percent(stats.unknown_share)} in training" if stats.unknown_share else ""
    examples = ", ".join(_shown(v) for v, _ in tally.examples.most_common(3))
    known = ", ".join(_shown(c) for c in stats.categories[:8]) + (
        f" and {len(stats.categories) - 8} more" if len(stats.categories) > 8 else "")
    return (f"{where}column {stats.name!r}: {tally.unseen:,} of {tally.rows:,} rows ({percent(share)}{training}) "
            f"hold values the bundle never saw (e.g. {examples}){named}; it knows {known}; a changed spelling or "
            f"format sends every such row to the unknown bucket and raises its score")


def _shown(value: str) -> str:
    if value == "":
        return "'' (blank)"
    return repr(value if len(value) <= 40 else value[:40] + "...")


def percent(share: float) -> str:
    return f"{share:.0%}" if share >= 0.1 else f"{share:.1%}"
