"""Unseen categorical values: the counts, the rule that decides a warning, and its line."""

import json
import shutil
from collections import Counter

import pandas as pd
import pyarrow as pa
import pytest

from pipeline.batch_score import ScoreSummary
from pipeline.bundle import Bundle
from pipeline.preprocess import CategoricalStats, NumericStats
from pipeline.runtime import category_codes
from pipeline.schema import as_category_array
from pipeline.splits import split_rows
from pipeline.unseen import (EXAMPLES_KEPT, MissingCounts, UnseenCounts, file_entries, missing_counts_of, missing_entries,
                             missing_file_entries, training_missing_shares, unseen_counts_of, unseen_entries,
                             unseen_limit)
from tests.conftest import quiet_config, unknown_bucket_rows


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
    expected = unknown_bucket_rows(stats, as_category_array(column))
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


def test_a_long_unseen_value_is_kept_as_its_start_and_a_digest_and_counted_apart_from_its_likes():
    """One 20 MB cell made a 20 MB summary: examples were kept whole."""
    long_a, long_b = "y" * 5_000_000 + "a", "y" * 5_000_000 + "b"
    counts = UnseenCounts()
    texts, indices = category_codes(pa.array([long_a, long_a, long_b, "N"]))
    counts.count(texts, indices, frozenset({"yes", "no"}))
    entry = unseen_entries([CategoricalStats("flag", ("no", "yes"))], {"flag": counts})["flag"]
    assert len(json.dumps(entry)) < 2_000
    keys = sorted(entry["examples"], key=lambda key: -entry["examples"][key])
    assert [entry["examples"][k] for k in keys] == [2, 1, 1]
    assert keys[0].startswith("y" * 200 + "... (5,000,001 characters, sha1 ") and keys[0] != keys[1]
    assert "N" in keys


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


def test_with_several_inputs_the_warning_names_the_files_above_the_limit():
    """`score B mon.csv tue.csv wed.csv`: the run's total said a column changed, not which export."""
    stats = CategoricalStats("flag", ("no", "yes"), unknown_share=0.0)
    own = {"mon.csv": (2, 600), "tue.csv": (600, 600), "wed.csv": (590, 600)}
    files = [(name, {"flag": UnseenCounts(rows, unseen)}) for name, (unseen, rows) in own.items()]
    run = UnseenCounts(1800, 1192, Counter({"Y": 600, "N": 590, "x": 2}))
    warning = unseen_entries([stats], {"flag": run}, "", files)["flag"]["warning"]
    assert warning.startswith("column 'flag': 1,192 of 1,800 rows (66%) hold values the bundle never saw "
                              "(e.g. 'Y', 'N', 'x') in tue.csv (600 of 600 rows), wed.csv (590 of 600); it knows ")
    # At most three named, highest share first; the rest counted.
    many = [(f"d{i}.csv", {"flag": UnseenCounts(100, unseen)}) for i, unseen in enumerate((50, 90, 0, 70, 100, 60))]
    warning = unseen_entries([stats], {"flag": UnseenCounts(600, 370, Counter({"Y": 370}))}, "", many)["flag"]["warning"]
    assert "never saw (e.g. 'Y') in d4.csv (100 of 100 rows), d1.csv (90 of 100), d3.csv (70 of 100) and 2 more; " in warning
    # One input: the line starts with its path, as before, and names no file besides.
    single = unseen_entries([stats], {"flag": run}, "tue.csv: ", files[1:2])["flag"]["warning"]
    assert single == unseen_entries([stats], {"flag": run}, "tue.csv: ")["flag"]["warning"]
    assert single.startswith("tue.csv: column 'flag': ") and "never saw (e.g. 'Y', 'N', 'x'); it knows" in single


def test_a_files_entry_has_its_own_counts_without_examples():
    stats = [CategoricalStats("flag", ("no", "yes")), CategoricalStats("site", ("a",))]
    counts = {"flag": UnseenCounts(600, 150, Counter({"Y": 150}))}
    assert file_entries(stats, counts) == {"flag": {"rows": 600, "unseen": 150, "share": 0.25},
                                           "site": {"rows": 0, "unseen": 0, "share": 0.0}}
    assert unseen_counts_of(file_entries(stats, counts)["flag"]) == UnseenCounts(600, 150)


def _blank(missing: int, rows: int, training_share: float | None, files=(), where: str = "") -> dict:
    stats = NumericStats("temperature", 69.914, 4.93, training_share != 0.0)
    return missing_entries([stats], {"temperature": training_share}, {"temperature": MissingCounts(rows, missing)},
                           where, files)["temperature"]


@pytest.mark.parametrize("missing, rows, training_share, warns", [
    (500, 500, 0.0, True),        # an export that left the column empty
    (12, 600, 0.0, True),         # 2% of rows, where training had no blank
    (6, 600, 0.0, False),         # the odd blank cell: fewer rows than a handful of ten
    (60, 10_000, 0.0, False),     # 0.6%: not above 1% of the rows
    (9, 9, 0.0, False),           # a whole column, but of fewer than ten rows
    (500, 500, 0.02, True),       # training had a few blanks
    (90, 1_000, 0.02, False),     # 9%: not above 5 times training's 2%
    (110, 1_000, 0.02, True),
    (500, 500, 0.4, True),        # at most halfway from training's share to every row
    (690, 1_000, 0.4, False),
    (500, 500, 0.6, False),       # a sparse column: a night without a value is its normal ...
    (500, 500, 1.0, False),       # ... as for one that trained as always blank
    (500, 500, None, False),      # training had blanks, in a share the bundle can't say
    (0, 0, 0.0, False),
])
def test_a_numeric_column_warns_only_when_blank_far_more_often_than_in_training(missing, rows, training_share,
                                                                                warns):
    entry = _blank(missing, rows, training_share)
    assert (entry["rows"], entry["missing"], entry["training_share"]) == (rows, missing, training_share)
    assert entry["share"] == (missing / rows if rows else 0.0)
    assert bool(entry["warning"]) == warns


def test_the_blank_column_warning_names_the_column_its_share_and_the_median_it_got():
    assert _blank(500, 500, 0.0, where="new.csv: ")["warning"] == (
        "new.csv: column 'temperature': 500 of 500 rows (100%; none in training) are blank; scoring gives a blank "
        "training's median (69.914), so no value of this column can flag those rows: fill the column, or check the "
        "export that wrote the file")
    assert "(100%; 2.0% in training) are blank;" in _blank(500, 500, 0.02)["warning"]
    summary = ScoreSummary("b", "o", "cpu", 0.01, 0.01, "r", rows=500,
                           missing_numeric={"temperature": _blank(500, 500, 0.0), "flow": _blank(1, 500, 0.0)})
    assert summary.describe().endswith("; far more blanks than in training in 'temperature' (100% of rows): see the "
                                       "warning")


def test_with_several_inputs_a_file_left_blank_warns_and_is_named_though_the_run_is_not():
    """Nine nights with a blank a night and one left empty: the run's share (600 of 6,000, 10%) is not
    above 5 times training's 3%, and the file's own counts show which export changed."""
    own = {f"d{i}.csv": (18, 600) for i in range(9)} | {"tue.csv": (600, 600)}
    files = [(name, {"temperature": MissingCounts(rows, missing)}) for name, (missing, rows) in own.items()]
    entry = _blank(762, 6000, 0.03, files)
    assert entry["warning"].startswith("column 'temperature': 762 of 6,000 rows (13%; 3.0% in training) are blank "
                                       "in tue.csv (600 of 600 rows); scoring gives a blank ")
    assert missing_file_entries([NumericStats("temperature", 1.0, 1.0, True), NumericStats("flow", 1.0, 1.0, False)],
                                files[-1][1]) == {"temperature": {"rows": 600, "missing": 600, "share": 1.0},
                                                  "flow": {"rows": 0, "missing": 0, "share": 0.0}}
    assert missing_counts_of(entry) == MissingCounts(6000, 762)


def test_trainings_blank_share_is_the_manifests_share_of_the_rows_trained_on(trained_bundle, sensor_frame):
    """The manifest records it (preprocessing.numeric[].missing_share), so every runtime reads one
    number; before, each read the calibration rows' Parquet for a share of other rows."""
    bundle = Bundle.load(trained_bundle)
    shares = training_missing_shares(bundle)
    config = quiet_config()
    train = split_rows(sensor_frame["label"].to_numpy().astype(int), len(sensor_frame), config.calibration,
                       config.training, "t").train
    trained_on = sensor_frame.iloc[train]
    entries = bundle.manifest["preprocessing"]["numeric"]
    assert shares == {e["name"]: e["missing_share"] for e in entries}
    assert shares == {e["name"]: trained_on[e["name"]].isna().mean() for e in entries}
    assert shares["temperature"] == 0.0 and 0 < shares["vibration"] < 0.1  # both kinds of column
    calibration = pd.read_parquet(trained_bundle / "calibration_rows.parquet")
    assert shares["vibration"] != calibration["vibration"].isna().mean()  # not the calibration rows' share


def test_a_bundle_exported_before_the_share_takes_its_calibration_rows_share(trained_bundle, tmp_path):
    """A manifest without missing_share, as every bundle before it: 0 where training had no blank, else
    the share among the calibration rows the bundle keeps, or None (unknown) without them."""
    bundle = shutil.copytree(trained_bundle, tmp_path / "old")
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["preprocessing"]["numeric"]:
        del entry["missing_share"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    numeric = Bundle.load(bundle).preprocessor.numeric
    shares = training_missing_shares(Bundle.load(bundle))
    calibration = pd.read_parquet(bundle / "calibration_rows.parquet")
    assert shares == {s.name: calibration[s.name].isna().mean() if s.has_indicator else 0.0 for s in numeric}
    assert shares["temperature"] == 0.0 and 0 < shares["vibration"] < 0.1
    del manifest["files"]["calibration_rows.parquet"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    (bundle / "calibration_rows.parquet").unlink()
    assert training_missing_shares(Bundle.load(bundle)) == {s.name: None if s.has_indicator else 0.0 for s in numeric}


def test_blank_counts_take_a_null_and_nan_alike():
    counts = MissingCounts()
    counts.count(pa.array([1.0, None, float("nan"), 2.0]).to_numpy(zero_copy_only=False))
    counts.add(MissingCounts(3, 1))
    assert counts == MissingCounts(7, 3)
