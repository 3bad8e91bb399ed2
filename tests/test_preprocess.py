import warnings

import numpy as np
import pandas as pd
import pytest

from pipeline.config import PreprocessConfig
from pipeline.errors import DataError
from pipeline.preprocess import UNKNOWN, NumericStats, Preprocessor, fit_preprocessor
from pipeline.schema import infer_schema
from pipeline.synthetic import SyntheticSpec, make_sensor_table


@pytest.fixture
def frame():
    rng = np.random.default_rng(0)
    x = rng.normal(10.0, 2.0, 1000)
    x[::50] = np.nan
    return pd.DataFrame({"x": x, "y": rng.normal(size=1000),
                         "color": rng.choice(["red", "blue", "green"], 1000, p=[0.6, 0.3, 0.1])})


def fitted(frame, **config):
    config = PreprocessConfig(**config)
    return fit_preprocessor(frame, infer_schema(frame, source="t", config=config), config, "t")


def test_robust_statistics_and_feature_layout(frame):
    pre = fitted(frame)
    x = pre.numeric[0]
    assert x.median == pytest.approx(np.nanmedian(frame["x"]), rel=1e-6)
    assert x.scale == pytest.approx(2.0, rel=0.1)  # IQR / 1.349 recovers the std of a Gaussian
    assert x.has_indicator and not pre.numeric[1].has_indicator
    assert pre.feature_names == ["x", "y", "x__missing", "color=red", "color=blue", "color=green", f"color={UNKNOWN}"]


def test_transform_imputes_flags_and_one_hots(frame):
    pre = fitted(frame)
    out = pre.transform(np.array([[np.nan, 0.0], [pre.numeric[0].median, 1.0]], np.float32),
                        [np.array(["blue", "purple"], dtype=object)])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], [0.0, 0.0])       # missing -> median -> 0 after scaling
    np.testing.assert_array_equal(out[:, 2], [1.0, 0.0])    # missing indicator
    np.testing.assert_array_equal(out[0, 3:], [0, 1, 0, 0])  # blue
    np.testing.assert_array_equal(out[1, 3:], [0, 0, 0, 1])  # unseen -> unknown, no error


def test_rare_categories_go_to_unknown(frame):
    pre = fitted(frame, max_categories=2)
    assert pre.categorical[0].categories == ("red", "blue")


def test_round_trips_through_the_manifest_dict(frame):
    pre = fitted(frame)
    assert Preprocessor.from_dict(pre.to_dict()) == pre


def test_the_share_of_training_rows_in_the_unknown_bucket_is_recorded(frame):
    """Scoring warns when a run's unseen values are far above training's own share (its rare
    categories go to the unknown bucket too): that share must be in the manifest."""
    colors = frame["color"].to_numpy(dtype=object).copy()
    colors[:7] = [f"odd{i}" for i in range(7)]  # seen once each: below min_category_count
    colors[::100] = None  # 10 blanks: kept as the category "" (a blank is not unknown)
    pre = fitted(frame.assign(color=colors))
    color = pre.categorical[0]
    assert "" in color.categories and color.unknown_share == pytest.approx(6 / 1000)  # row 0 is blank
    rows = pre.onehot_block([np.where(pd.isna(colors), "", colors).astype(object)], len(colors))
    assert rows[:, -1].sum() == 6  # the share is what the one-hot (and so the graph) sends there
    # Beyond max_categories too; spellings read as one category count as the category.
    assert fitted(frame, max_categories=2).categorical[0].unknown_share == pytest.approx(
        (frame["color"] == "green").mean())
    flags = fitted(frame.assign(flag=np.tile(["True", "true", "FALSE"], 334)[:1000])).categorical[1]
    assert flags.boolean and flags.unknown_share == 0.0
    raw = pre.to_dict()
    assert raw["categorical"][0]["unknown_share"] == color.unknown_share and Preprocessor.from_dict(raw) == pre
    check_share_is_optional_and_checked(raw, "categorical", "unknown_share")


def test_the_share_of_training_rows_blank_in_each_numeric_column_is_recorded(frame):
    """Scoring warns when a numeric column is blank far more often than in training: that share was
    not in the manifest, so each runtime read it from the calibration rows' Parquet (Node decoded
    its footer). The share is of the rows fitted on, and 0 exactly where there is no indicator."""
    x = frame["x"].to_numpy().copy()
    x[[1, 2, 3]] = np.nan  # besides every 50th row's, the fixture's
    trained = frame.assign(x=x).iloc[:800]  # the rows fitted on: 16 + 3 blanks
    pre = fitted(trained)
    assert pre.numeric[0].missing_share == trained["x"].isna().mean() == 19 / 800
    assert pre.numeric[0].has_indicator and pre.numeric[1].missing_share == 0.0 and not pre.numeric[1].has_indicator
    raw = pre.to_dict()
    assert raw["numeric"][0] == {"name": "x", "median": pre.numeric[0].median, "scale": pre.numeric[0].scale,
                                 "has_indicator": True, "missing_share": 19 / 800}
    assert Preprocessor.from_dict(raw) == pre
    check_share_is_optional_and_checked(raw, "numeric", "missing_share")


def check_share_is_optional_and_checked(raw: dict, kind: str, key: str) -> None:
    """A bundle exported before ``key`` was recorded reads as not knowing it (None), and writes it back
    without it; a value that is no share from 0 to 1 is refused, naming the column."""
    del raw[kind][0][key]
    assert getattr(getattr(Preprocessor.from_dict(raw), kind)[0], key) is None
    assert key not in Preprocessor.from_dict(raw).to_dict()[kind][0]
    for bad in ("0.1", 1.5, -0.1, True):
        raw[kind][0][key] = bad
        with pytest.raises(TypeError, match=rf"^{kind} column '{raw[kind][0]['name']}': '{key}' must be a number from "
                                            rf"0 to 1, got "):
            Preprocessor.from_dict(raw)


@pytest.mark.parametrize("values, hint", [
    ([f"c{i}" for i in range(1000)], ""),
    ([f"images/{i}.png" for i in range(1000)], r" \(if the rows are image paths, train on images with --image-size\)"),
])
def test_a_text_column_of_rare_values_only_is_named_as_an_identifier(frame, values, hint):
    """Before: training ran to the end and the export failed with "unexpected ValueError: Could not
    infer attribute `cats_strings` type from empty iterator" (a CSV of image paths given without
    --image-size, which is read as a table, did the same)."""
    with pytest.raises(DataError, match=r"^t: column 'code' has 1,000 distinct values in 1,000 training rows and "
                                        r"none seen 2 times \(e\.g\. '.+'\), so it is no category: it looks like an "
                                        rf"identifier; pass it with --id-columns code, or leave it out of the file{hint}$"):
        fitted(frame.assign(code=values))


@pytest.mark.parametrize("spelled", ["\u20ac{:,.2f}", "{:,.0f}", "{:.1f} kg", "USD {:.2f}"])
def test_a_column_of_amounts_written_for_people_is_told_to_be_plain_numbers_not_an_id(frame, spelled):
    """'€1,546.46' was called an identifier, and passing it with --id-columns lost the amount from
    the model; naming it in categorical_columns (the README's advice for such columns) did nothing."""
    values = [spelled.format(x) for x in np.random.default_rng(5).uniform(1_000, 3_000_000, 1000)]
    for config, named in (({}, ""),
                          ({"categorical_columns": ("price",)},
                           "; naming it in preprocess.categorical_columns keeps a column categorical, but no value "
                           "of this one repeats, so it has no category to keep")):
        with pytest.raises(DataError) as caught:
            fitted(frame.assign(price=values), **config)
        assert str(caught.value).startswith("t: column 'price' holds numbers written with separators or units (e.g. ")
        assert str(caught.value).endswith("so it is no category: write them as plain numbers (1546.46, not "
                                          "\u20ac1,546.46) and it trains as numeric; or leave it out of the file"
                                          + named)


def test_a_suggested_id_column_is_spelled_for_the_shell(frame):
    """`pass it with --id-columns Order ID ,` split in the shell into two arguments."""
    with pytest.raises(DataError, match=r"pass it with --id-columns 'Order ID ', or leave it out of the file$"):
        fitted(frame.assign(**{"Order ID ": [f"c{i}" for i in range(1000)]}))


def _flag_features(pre: Preprocessor, values: list[str]) -> np.ndarray:
    return pre.onehot_block([np.array(values, dtype=object)] + [np.array(["red"] * len(values), dtype=object)],
                            len(values))[:, :len(pre.categorical[0].categories) + 1]


def test_a_boolean_column_means_the_same_in_every_spelling(frame):
    """A bundle fitted on a Parquet bool column (read as 'true'/'false') put every row of the same
    data in a pandas-written CSV ('True'/'False') in the unknown bucket, and the other way round."""
    written = np.where(frame["y"] > 0, "True", "False").astype(object)
    written[::97] = None
    pre = fitted(pd.DataFrame({"flag": written, "color": frame["color"]}))
    np.testing.assert_array_equal(_flag_features(pre, ["true", "True", "TRUE"]), _flag_features(pre, ["True"] * 3))
    np.testing.assert_array_equal(_flag_features(pre, ["false", "False", "FALSE"]), _flag_features(pre, ["False"] * 3))
    flag = pre.categorical[0]
    assert (flag.name, flag.boolean) == ("flag", True) and sorted(flag.categories) == ["", "false", "true"]
    assert not pre.categorical[1].boolean
    assert _flag_features(pre, ["True"])[0, :-1].any() and not _flag_features(pre, ["True"])[0, -1]
    assert _flag_features(pre, ["yes"])[0, -1] == 1.0  # any other value: unknown, as an unseen category
    assert _flag_features(pre, [""])[0, flag.categories.index("")] == 1.0  # missing stays missing
    # Mixed spellings are one category, counted together; a bool column is boolean too.
    mixed = fitted(pd.DataFrame({"x": frame["x"], "flag": np.tile(["true", "True", "FALSE", "false"], 250)}))
    assert mixed.categorical[0].boolean and sorted(mixed.categorical[0].categories) == ["false", "true"]
    assert fitted(pd.DataFrame({"x": frame["x"], "flag": frame["y"] > 0})).categorical[0].boolean


def test_only_true_false_makes_a_column_boolean(frame):
    for values in (np.tile(["True", "yes"], 500), np.tile(["1", "0"], 500), np.tile(["t", "f"], 500)):
        pre = fitted(pd.DataFrame({"x": frame["x"], "flag": values}), categorical_columns=("flag",))
        assert not pre.categorical[0].boolean and set(pre.categorical[0].categories) == set(values)


def test_the_boolean_flag_round_trips_and_old_manifests_read_as_before(frame):
    pre = fitted(frame.assign(flag=frame["y"] > 0))
    raw = pre.to_dict()
    assert raw["categorical"] == [{"name": "color", "categories": ["red", "blue", "green"], "unknown_share": 0.0},
                                  {"name": "flag", "categories": ["false", "true"], "boolean": True,
                                   "unknown_share": 0.0}]
    assert Preprocessor.from_dict(raw) == pre
    del raw["categorical"][1]["boolean"]  # a bundle exported before the flag: categories verbatim
    old = Preprocessor.from_dict(raw).categorical[1]
    assert not old.boolean and Preprocessor.one_hot(old, np.array(["True"], dtype=object)).tolist() == [[0, 0, 1]]
    raw["categorical"][1]["boolean"] = "yes"
    with pytest.raises(TypeError, match="'boolean' must be true or false, got 'yes'"):
        Preprocessor.from_dict(raw)


def test_an_integer_coded_column_reads_its_decimal_spelling_as_the_integer(frame):
    """A code column with one blank cell, read by pandas, becomes float64, and its to_csv writes
    '3.0' for 3: read verbatim, every row of that night landed in the unknown bucket."""
    codes = pd.array(np.random.default_rng(1).integers(-1, 3, 1000), dtype="Int64")
    codes[::97] = pd.NA
    pre = fitted(pd.DataFrame({"code": codes, "color": frame["color"]}))
    code = pre.categorical[0]

    def features(values):
        return pre.onehot_block([np.array(values, dtype=object), np.array(["red"] * len(values), dtype=object)],
                                len(values))[:, :len(code.categories) + 1]

    np.testing.assert_array_equal(features(["-1.0", "0.0", "1.0", "2.0", ""]), features(["-1", "0", "1", "2", ""]))
    assert (code.name, code.integer, code.boolean) == ("code", True, False)
    assert sorted(code.categories) == ["", "-1", "0", "1", "2"] and not pre.categorical[1].integer
    assert not features(["2.0"])[0, -1] and features([""])[0, code.categories.index("")] == 1.0
    # Only what tools write: other texts of the number, or a code never seen, are unknown.
    assert (features(["2.00", " 2", "+2", "2.", "2e0", "3", "3.0", "x", UNKNOWN])[:, -1] == 1).all()
    # A text column of the integers' text, or of both spellings, is integer-coded too, counted as one.
    both = fitted(pd.DataFrame({"x": frame["x"], "code": np.tile(["1", "1.0", "2", "2.0"], 250)}),
                  categorical_columns=("code",)).categorical[0]
    assert both.integer and sorted(both.categories) == ["1", "2"]


@pytest.mark.parametrize("values", [["007", "012"], ["1", "x"], ["1.5", "2"], ["1", "2.5"], ["true", "false"], ["-0", "1"]])
def test_only_integers_text_makes_a_column_integer_coded(frame, values):
    """A code with leading zeros is text as written (pandas itself would write '7', not '007.0')."""
    pre = fitted(pd.DataFrame({"x": frame["x"], "code": np.tile(values, 500)}), categorical_columns=("code",))
    assert not pre.categorical[0].integer and set(pre.categorical[0].categories) == {v.lower() for v in values}


def test_the_integer_flag_round_trips_and_old_manifests_read_as_before(frame):
    pre = fitted(frame.assign(code=np.tile([1, 2], 500)))
    raw = pre.to_dict()
    assert raw["categorical"][1] == {"name": "code", "categories": ["1", "2"], "integer": True, "unknown_share": 0.0}
    assert "integer" not in raw["categorical"][0] and Preprocessor.from_dict(raw) == pre
    del raw["categorical"][1]["integer"]  # a bundle exported before the flag: categories verbatim
    old = Preprocessor.from_dict(raw).categorical[1]
    assert not old.integer and Preprocessor.one_hot(old, np.array(["1", "1.0"], dtype=object)).tolist() == [[1, 0, 0],
                                                                                                            [0, 0, 1]]
    raw["categorical"][1]["integer"] = 1
    with pytest.raises(TypeError, match="'integer' must be true or false, got 1"):
        Preprocessor.from_dict(raw)


def test_a_numeric_column_without_a_value_in_the_training_rows_is_learned_as_always_blank(frame, caplog):
    """A sparse column whose two values fell in the held-out rows (seed 0 did so on 1,500 rows) crashed
    training after two numpy "Mean of empty slice" warnings: "unexpected IndexError: index -1 is out
    of bounds for axis 0 with size 0". The whole table has values, so the schema keeps it numeric."""
    rare = np.full(len(frame), np.nan)
    rare[[59, 175]] = [2.0, 1.0]
    table = frame.assign(rare=rare)
    config = PreprocessConfig()
    schema = infer_schema(table, source="t", config=config)
    assert "rare" in schema.numeric
    held_out = np.isin(np.arange(len(table)), [59, 175])
    with warnings.catch_warnings(), caplog.at_level("WARNING", logger="vaeguard"):
        warnings.simplefilter("error")  # numpy's RuntimeWarnings too
        pre = fit_preprocessor(table[~held_out], schema, config, "t")
    assert pre.numeric[schema.numeric.index("rare")] == NumericStats("rare", 0.0, 1.0, True, 1.0)
    assert [r.getMessage() for r in caplog.records] == [
        "t: numeric column 'rare' has no value in any of the 998 training rows (its few values all fell in the rows "
        "held out from training), so the model learns it as always blank and nothing from its values; leave the "
        "column out of the file, unless later training data will hold values in it"]
    features = pre.transform_frame(table[held_out | (np.arange(len(table)) == 0)], "t")
    names = pre.feature_names
    np.testing.assert_array_equal(features[:, names.index("rare")], [0.0, 2.0, 1.0])  # blank: the median, 0
    np.testing.assert_array_equal(features[:, names.index("rare__missing")], [1.0, 0.0, 0.0])
    assert np.isfinite(features).all()
    # One value in training (no spread): its own median, scale 1, as before; no warning of either kind.
    caplog.clear()
    with warnings.catch_warnings(), caplog.at_level("WARNING", logger="vaeguard"):
        warnings.simplefilter("error")
        one = fit_preprocessor(table.drop(index=59), schema, config, "t")
    assert one.numeric[schema.numeric.index("rare")] == NumericStats("rare", 1.0, 1.0, True, 998 / 999)
    assert not caplog.records


def _mostly_unknown_warnings(caplog, table, **config) -> list[str]:
    caplog.clear()
    with caplog.at_level("WARNING", logger="vaeguard"):
        fitted(table, **config)
    return [r.getMessage() for r in caplog.records]


_RAISE_MAX_CATEGORIES = ("; if it is a category with more than 50 common values, raise preprocess.max_categories in "
                         "the --config file")


@pytest.mark.parametrize("values, example, more", [
    # Thousands: most of those rows hold values seen 2 or 3 times, beyond the 50 most common.
    ([f"{n:,}" for n in np.random.default_rng(1).integers(1, 1000, 1000) * 1000], "'473,000'", _RAISE_MAX_CATEGORIES),
    ([f"€{v:.2f}" for v in np.random.default_rng(1).normal(100, 10, 1000)], "'€108.22'", ""),  # a currency
    ([f"ORD-{i // 2 if i < 400 else i:06d}" for i in range(1000)], "'ORD-000050'", ""),  # an undeclared code
])
def test_a_categorical_column_mostly_in_the_unknown_bucket_is_warned_about(frame, caplog, values, example, more):
    """Numbers written with separators or a currency, or a code nearly unique per row, trained as
    categories with 83-92% of the rows in the unknown bucket (the manifest's unknown_share), and no
    word at training: the column taught the model nothing, and only the manifest told."""
    table = frame.assign(amount=values)
    [warning] = _mostly_unknown_warnings(caplog, table)
    share = fitted(table).categorical[1].unknown_share
    assert share > 0.5
    assert warning == (
        f"t: column 'amount' puts {share:.0%} of the 1,000 training rows in its 'unknown' category "
        f"({len(set(values)):,} distinct values, e.g. {example}; a category must be seen at least 2 times and be "
        f"among the 50 most common), so the model learns little from it: if it holds numbers written with "
        f"thousands separators or units, write them as plain numbers; if it is an identifier, pass it with "
        f"--id-columns amount{more}; or, to keep it as it is without this warning, name it in the --config file: "
        f"preprocess: {{categorical_columns: [amount]}}")
    # Named a category in the config, the column is kept knowingly: no warning.
    assert _mostly_unknown_warnings(caplog, table, categorical_columns=("amount",)) == []


def test_the_mostly_unknown_warning_spares_ordinary_categories_and_names_max_categories_where_it_is_the_cause(
        frame, caplog):
    assert _mostly_unknown_warnings(caplog, frame) == []  # a few common categories
    # A long tail: a Zipf-like column of 500 values cut at the 50 most common sends about a third.
    rng = np.random.default_rng(2)
    weights = 1 / np.arange(1, 501)
    tail = rng.choice([f"v{i}" for i in range(500)], 5000, p=weights / weights.sum())
    wide = pd.DataFrame({"x": rng.normal(size=5000), "kind": tail})
    assert 0.25 < fitted(wide).categorical[0].unknown_share < 0.5 and _mostly_unknown_warnings(caplog, wide) == []
    # The synthetic demo's table (its labelled anomalies, line 'D' among them, are held out of training).
    demo = make_sensor_table(SyntheticSpec(n_rows=2000, seed=0))
    assert _mostly_unknown_warnings(caplog, demo[demo["label"] == 0].drop(columns=["row_id", "label"])) == []
    # 200 values seen 20 times each: common enough, but beyond max_categories; raising it is the fix.
    many = pd.DataFrame({"x": rng.normal(size=4000), "kind": np.tile([f"k{i}" for i in range(200)], 20)})
    [warning] = _mostly_unknown_warnings(caplog, many)
    assert "puts 75% of the 4,000 training rows" in warning and f"{_RAISE_MAX_CATEGORIES}; or, to keep it" in warning
