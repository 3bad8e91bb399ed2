"""Unseen categorical values: the counts, the rule that decides a warning, and its line."""

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from pipeline.batch_score import ScoreSummary
from pipeline.preprocess import CategoricalStats, Preprocessor
from pipeline.runtime import category_codes
from pipeline.schema import as_category_array
from pipeline.unseen import EXAMPLES_KEPT, UnseenCounts, unseen_entries, unseen_limit


def _unknown_rows(stats: CategoricalStats, values: np.ndarray) -> np.ndarray:
    """Rows the bundle's one-hot (the reference scorer.onnx matches) puts in the unknown bucket."""
    return Preprocessor.one_hot(stats, values)[:, -1] == 1


@pytest.mark.parametrize("stats, values", [
    (CategoricalStats("flag", ("false", "true"), boolean=True), ["True", "FALSE", "yes", None, "Y", "Y", "true", ""]),
    (CategoricalStats("flag", ("", "false", "true"), boolean=True), ["True", None, "", "N", "false"]),
    (CategoricalStats("code", ("1", "2"), integer=True), ["1", "1.0", "2.0", "3", "3.0", "01", None, "2"]),
    (CategoricalStats("color", ("red", ""), ), ["red", "Red", "", None, "blue", "blue", "red "]),
])
def test_unseen_counts_read_spellings_as_the_graph_does(stats, values):
    """A boolean's 'True' and an integer code's '2.0' are categories (the graph maps them first),
    not unseen values: counted verbatim, every nightly CSV of pandas' spelling would warn."""
    column = pa.array(values, pa.string())
    texts, indices = category_codes(column)
    counts = UnseenCounts()
    counts.count(texts, indices, stats.known_texts)
    expected = _unknown_rows(stats, as_category_array(column))
    assert (counts.rows, counts.unseen) == (len(values), int(expected.sum()))
    assert sum(counts.examples.values()) == counts.unseen


def test_unseen_examples_keep_the_most_frequent_values_and_stay_bounded():
    counts = UnseenCounts()
    for batch in range(3):
        values = ["Y"] * 50 + ["N"] * 40 + [f"id{batch}-{i}" for i in range(500)]  # a new id per row besides
        texts, indices = category_codes(pa.array(values))
        counts.count(texts, indices, frozenset({"yes", "no"}))
    assert (counts.rows, counts.unseen) == (1770, 1770)
    assert counts.examples.most_common(2) == [("Y", 150), ("N", 120)] and len(counts.examples) <= EXAMPLES_KEPT
    other = UnseenCounts(10, 4, Counter({"N": 4}))
    counts.add(other)
    assert (counts.rows, counts.unseen, counts.examples["N"]) == (1780, 1774, 124)


def _judged(unseen: int, rows: int, training_share: float | None, categories=("no", "yes")) -> dict:
    stats = CategoricalStats("flag", categories, unknown_share=training_share)
    counts = {"flag": UnseenCounts(rows, unseen, Counter({"Y": unseen // 2, "N": unseen - unseen // 2}))}
    return unseen_entries([stats], counts)["flag"]


@pytest.mark.parametrize("unseen, rows, training_share, warns", [
    (600, 600, 0.0, True),       # every row spelled differently
    (12, 600, 0.0, True),        # 2% of rows: more than the odd new value
    (1, 600, 0.0, False),        # the odd new value
    (9, 100, 0.0, False),        # 9%, but fewer rows than a handful of ten
    (60, 10_000, 0.0, False),    # 0.6%: below 1% of rows
    (3_000, 10_000, 0.25, False),  # 30% where training had 25% of rare values
    (10_000, 10_000, 0.25, True),  # ... and every row: a changed format still shows
    (700, 1_000, 0.3, True),
    (4_000, 10_000, None, False),  # a bundle from before training's share was recorded: half the rows
    (6_000, 10_000, None, True),
    (0, 0, 0.0, False),
])
def test_a_column_warns_only_far_above_trainings_share(unseen, rows, training_share, warns):
    entry = _judged(unseen, rows, training_share)
    assert (entry["rows"], entry["unseen"], entry["training_share"]) == (rows, unseen, training_share)
    assert entry["share"] == (unseen / rows if rows else 0.0) and bool(entry["warning"]) == warns
    assert unseen_limit(training_share) < 1


def test_the_warning_line_names_the_column_its_share_examples_and_categories():
    entry = _judged(600, 600, 0.0)
    assert entry["examples"] == {"Y": 300, "N": 300}
    assert entry["warning"] == ("column 'flag': 600 of 600 rows (100%) hold values the bundle never saw (e.g. 'Y', "
                                "'N'); it knows 'no', 'yes'; a changed spelling or format sends every such row to "
                                "the unknown bucket and raises its score")
    many = _judged(900, 1000, 0.05, categories=tuple(f"c{i}" for i in range(11)) + ("",))
    assert "(90%; 5.0% in training)" in many["warning"] and "'c7' and 4 more;" in many["warning"]
    summary = ScoreSummary("b", "o", "cpu", 0.01, 0.01, "r", rows=600, unseen_categories={"flag": entry})
    assert summary.describe().endswith("; values the bundle never saw in 'flag' (100% of rows): see the warning")
    quiet = ScoreSummary("b", "o", "cpu", 0.01, 0.01, "r", rows=600, unseen_categories={"flag": _judged(1, 600, 0.0)})
    assert "never saw" not in quiet.describe()
