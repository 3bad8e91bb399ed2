"""Inputs unlike anything training saw, which the scorer absorbs without a word: categorical values
the bundle never saw, and numeric columns blank far more often than in training. Counted per
column as a run is scored, with a warning when a column's share is far above training's.

An unseen value goes to its column's unknown bucket, silently, which is right for the odd new
value. A whole column there is most likely the same data spelled differently ('Y' for 'yes', a
prefix on codes, a shifted column): every such row scores higher, and a night of false alarms
needs a line saying why. Counting is per distinct value of a batch (pipeline.runtime), so it
costs next to nothing per row.

A blank number gets training's median, silently too, and the opposite way: such a row looks
normal in that column, so a column an export left empty hides every anomaly in it and the night
reads as calm. Counting is one pass over each numeric column of a batch (pipeline.runtime).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from pipeline.bundle import CALIBRATION_ROWS, Bundle
from pipeline.preprocess import CategoricalStats, NumericStats

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
                self.examples[example_key(values[i])] += int(rows[i])
        self._trim()

    def _trim(self) -> None:
        if len(self.examples) > EXAMPLES_KEPT:
            self.examples = Counter(dict(self.examples.most_common(EXAMPLES_KEPT)))


# An example value longer than this is kept as its start and a digest: the summary holds examples
# whole otherwise, and one 20 MB cell made a 20 MB summary.
EXAMPLE_CHARS = 200


def example_key(value: str) -> str:
    """``value`` itself, or where long its first EXAMPLE_CHARS characters, its length and a digest of
    the whole: two long values that begin alike stay two examples, each counted on its own."""
    if len(value) <= EXAMPLE_CHARS:
        return value
    digest = hashlib.sha1(value.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{value[:EXAMPLE_CHARS]}... ({len(value):,} characters, sha1 {digest})"


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
        named = (_files_above(stats.name, files, lambda t: (t.unseen, t.rows), lambda n, rows: n / rows > limit)
                 if fired and len(files) > 1 else "")
        entries[stats.name] = {"rows": tally.rows, "unseen": tally.unseen, "share": share,
                               "training_share": stats.unknown_share,
                               "examples": dict(tally.examples.most_common(UNSEEN_EXAMPLES)),
                               "warning": _unseen_warning(stats, tally, share, where, named) if fired else None}
    return entries


def file_entries(categorical: Sequence[CategoricalStats], counts: dict[str, UnseenCounts]) -> dict[str, dict]:
    """One input's own counts per categorical column, for its entry in the summary's ``files``:
    compact (no examples), as a run may have thousands of inputs."""
    return _own_counts(categorical, counts, "unseen")


def _own_counts(columns: Sequence[CategoricalStats | NumericStats], counts: dict, counted: str) -> dict[str, dict]:
    """Per column, the rows scored, the rows ``counted`` ("unseen" or "missing") and their share."""
    entries = {}
    for stats in columns:
        tally = counts.get(stats.name)
        rows, count = (tally.rows, getattr(tally, counted)) if tally is not None else (0, 0)
        entries[stats.name] = {"rows": rows, counted: count, "share": count / rows if rows else 0.0}
    return entries


def unseen_counts_of(entry: dict) -> UnseenCounts:
    """Counts back from a summary's entry (or a file's, which has no examples), to add up several."""
    return UnseenCounts(entry["rows"], entry["unseen"], Counter(entry.get("examples", {})))


@dataclass
class MissingCounts:
    """One numeric column over a run: rows scored, and rows blank (missing, as the scorer reads it:
    NaN after reading, which training's median then fills)."""
    rows: int = 0
    missing: int = 0

    def add(self, other: "MissingCounts") -> None:
        self.rows += other.rows
        self.missing += other.missing

    def count(self, values: np.ndarray) -> None:
        """A batch's column as read (float64, a null as NaN): one vectorised pass, about 1 ns a value
        here (under 7 ms for 1M rows of 8 columns, whose CSV takes about 0.5 s to parse)."""
        self.rows += len(values)
        self.missing += int(np.count_nonzero(np.isnan(values)))


def training_missing_shares(bundle: Bundle) -> dict[str, float | None]:
    """Training's share of blank rows per numeric column: the manifest's ``missing_share``. A bundle
    exported before it was recorded says only whether training had a blank (``has_indicator``): 0
    where it had none, else the share among the calibration rows the bundle keeps (held out at random
    from the same rows as training's: up to 20,000, read in milliseconds), or None (unknown) in a
    bundle without them."""
    numeric = bundle.preprocessor.numeric
    shares: dict[str, float | None] = {
        s.name: s.missing_share if s.missing_share is not None else (None if s.has_indicator else 0.0) for s in numeric}
    sampled = [s.name for s in numeric if shares[s.name] is None]
    path = bundle.path / CALIBRATION_ROWS
    if sampled and CALIBRATION_ROWS in bundle.manifest.get("files", {}) and path.is_file():
        rows = pq.read_table(path, columns=sampled)
        for name in sampled:
            tally = MissingCounts()
            tally.count(rows.column(name).to_numpy().astype(np.float64, copy=False))
            shares[name] = tally.missing / tally.rows if tally.rows else None
    return shares


# A column blank in more than this share of training's rows is sparse by nature: a night with no value
# in it is its normal (a reading taken now and then, or a column with no value in the training rows at
# all, which trains as always blank), so it never warns.
MISSING_SPARSE_SHARE = 0.5


def blank_above_limit(missing: int, rows: int, training_share: float | None) -> bool:
    """A numeric column is blank far more often than in training: in more than unseen_limit of the rows
    (training had none: 1%). Never where training's share is unknown or above MISSING_SPARSE_SHARE."""
    if not rows or training_share is None or training_share > MISSING_SPARSE_SHARE:
        return False
    return missing / rows > unseen_limit(training_share)


def missing_entries(numeric: Sequence[NumericStats], training: dict[str, float | None],
                    counts: dict[str, MissingCounts], where: str = "",
                    files: Sequence[tuple[str, dict[str, MissingCounts]]] = ()) -> dict[str, dict]:
    """The summary's field for each numeric column: rows scored, rows blank, their share, training's
    share (``training``, from training_missing_shares; None: unknown), and the warning line or None.

    A blank number gets training's median, so the scorer can flag no such row on that column: a column
    an export left empty makes a night look calm. It warns at UNSEEN_MIN_ROWS blank rows or more, in
    the run or in one of its ``files`` (each input's name and own counts), whose share is above the
    limit (blank_above_limit); the odd blank cell of a column training never saw blank does not warn."""
    entries = {}
    for stats in numeric:
        tally = counts.get(stats.name, MissingCounts())
        training_share = training.get(stats.name)
        share = tally.missing / tally.rows if tally.rows else 0.0

        def above(missing: int, rows: int, training_share: float | None = training_share) -> bool:
            return blank_above_limit(missing, rows, training_share)

        fired = any(own.missing >= UNSEEN_MIN_ROWS and above(own.missing, own.rows)
                    for own in [tally, *(c[stats.name] for _, c in files if stats.name in c)])
        named = (_files_above(stats.name, files, lambda t: (t.missing, t.rows), above)
                 if fired and len(files) > 1 else "")
        entries[stats.name] = {"rows": tally.rows, "missing": tally.missing, "share": share,
                               "training_share": training_share,
                               "warning": _missing_warning(stats, tally, share, training_share, where, named)
                               if fired else None}
    return entries


def missing_file_entries(numeric: Sequence[NumericStats], counts: dict[str, MissingCounts]) -> dict[str, dict]:
    """One input's own counts per numeric column, for its entry in the summary's ``files``."""
    return _own_counts(numeric, counts, "missing")


def missing_counts_of(entry: dict) -> MissingCounts:
    """Counts back from a summary's entry (or a file's), to add up several."""
    return MissingCounts(entry["rows"], entry["missing"])


def warn_unseen(*fields: dict[str, dict]) -> None:
    """Each column's warning, of the summary's fields given (unseen_categories, missing_numeric)."""
    for entries in fields:
        for entry in entries.values():
            if entry["warning"]:
                log.warning("%s", entry["warning"])


def _files_above(column: str, files: Sequence[tuple[str, dict]], counted: Callable[[object], tuple[int, int]],
                 above: Callable[[int, int], bool]) -> str:
    """' in a.csv (600 of 600 rows), b.csv (590 of 600)': the inputs whose own count of the column
    (``counted``: the rows counted and the rows scored) is above the limit (``above``), highest share
    first. The run's share is their average, so one at least is."""
    found = []
    for name, counts in files:
        count, rows = counted(counts[column]) if column in counts else (0, 0)
        if rows and above(count, rows):
            found.append((name, count, rows))
    found.sort(key=lambda item: -item[1] / item[2])  # stable: ties stay in input order
    shown = [f"{name} ({count:,} of {rows:,}{' rows' if i == 0 else ''})"
             for i, (name, count, rows) in enumerate(found[:FILES_NAMED])]
    more = f" and {len(found) - FILES_NAMED} more" if len(found) > FILES_NAMED else ""
    return f" in {', '.join(shown)}{more}" if shown else ""


def _unseen_warning(stats: CategoricalStats, tally: UnseenCounts, share: float, where: str, named: str = "") -> str:
    training = f"; {percent(stats.unknown_share)} in training" if stats.unknown_share else ""
    examples = ", ".join(_shown(v) for v, _ in tally.examples.most_common(3))
    known = ", ".join(_shown(c) for c in stats.categories[:8]) + (
        f" and {len(stats.categories) - 8} more" if len(stats.categories) > 8 else "")
    return (f"{where}column {stats.name!r}: {tally.unseen:,} of {tally.rows:,} rows ({percent(share)}{training}) "
            f"hold values the bundle never saw (e.g. {examples}){named}; it knows {known}; a changed spelling or "
            f"format sends every such row to the unknown bucket and raises its score")


def _missing_warning(stats: NumericStats, tally: MissingCounts, share: float, training_share: float,
                     where: str, named: str = "") -> str:
    training = "none in training" if training_share == 0.0 else f"{percent(training_share)} in training"
    return (f"{where}column {stats.name!r}: {tally.missing:,} of {tally.rows:,} rows ({percent(share)}; {training}) "
            f"are blank{named}; scoring gives a blank training's median ({stats.median:.6g}), so no value of this "
            f"column can flag those rows: fill the column, or check the export that wrote the file")


def _shown(value: str) -> str:
    if value == "":
        return "'' (blank)"
    return repr(value if len(value) <= 40 else value[:40] + "...")


def percent(share: float) -> str:
    return f"{share:.0%}" if share >= 0.1 else f"{share:.1%}"
