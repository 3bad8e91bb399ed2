import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.config import PreprocessConfig
from pipeline.errors import DataError
from pipeline.schema import check_finite, check_id_names, infer_schema, label_vector, numeric_matrix, scored_labels


@pytest.fixture
def table():
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "id": np.arange(100),
        "temp": rng.normal(size=100),
        "count": rng.integers(0, 1000, 100),       # many distinct ints: numeric
        "mode": rng.integers(0, 3, 100),           # few distinct ints: categorical
        "site": rng.choice(["a", "b"], 100),
        "const": np.full(100, 7.0),
        "label": rng.integers(0, 2, 100),
    })


def test_column_kinds(table):
    schema = infer_schema(table, source="t.csv", config=PreprocessConfig(), label_column="label", id_columns=("id",))
    assert schema.numeric == ("temp", "count")
    assert schema.categorical == ("mode", "site")
    assert schema.dropped == (("const", "constant"),)


def test_overrides_win(table):
    config = PreprocessConfig(categorical_columns=("count",), numeric_columns=("mode",))
    schema = infer_schema(table, source="t", config=config)
    assert "count" in schema.categorical and "mode" in schema.numeric


def test_all_missing_column_is_named(table):
    table["empty"] = np.nan
    with pytest.raises(DataError, match=r"t\.csv: column 'empty' is empty"):
        infer_schema(table, source="t.csv", config=PreprocessConfig())


def test_typo_in_numeric_column_names_column_and_row(table):
    table["temp"] = table["temp"].astype(str)
    table.loc[41, "temp"] = "n/a?"
    with pytest.raises(DataError, match=r"column 'temp' must be numeric but row 42 holds 'n/a\?'"):
        infer_schema(table, source="t.csv", config=PreprocessConfig())


def test_a_bad_number_in_a_csv_names_its_line_as_scoring_does(table, tmp_path):
    """Training said "row 42" and scoring "row 42 (line 44)" of the same cell; a quoted line break
    above it moves the line an editor shows."""
    table["temp"] = table["temp"].astype(str)
    table.loc[41, "temp"] = "n/a?"
    table["note"] = "x"
    table.loc[3, "note"] = "two\nlines"
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"column 'temp' must be numeric but row 42 \(line 44\) holds 'n/a\?'"):
        infer_schema(pd.read_csv(path), source=str(path), config=PreprocessConfig())


def test_infinity_names_column_and_row(table):
    table.loc[9, "temp"] = np.inf
    with pytest.raises(DataError, match=r"column 'temp' holds inf at row 10"):
        numeric_matrix(table, ("temp", "count"), "t.csv")


def test_values_beyond_float32_fail_like_infinities(table):
    table.loc[4, "temp"] = -1e39  # finite in float64, -inf once cast to the scorer's float32
    with pytest.raises(DataError, match=r"column 'temp' holds -1e\+39 at row 5; expected finite numbers within float32"):
        numeric_matrix(table, ("temp", "count"), "t.csv")
    table.loc[4, "temp"] = 3.4e38  # the largest float32s pass
    assert np.isfinite(numeric_matrix(table, ("temp", "count"), "t.csv")).all()


def test_label_must_be_binary(table):
    assert set(label_vector(table, "label", "t")) <= {0, 1}
    table.loc[3, "label"] = 2
    with pytest.raises(DataError, match=r"label column 'label' must be binary"):
        label_vector(table, "label", "t.csv")


def test_named_columns_must_exist(table):
    with pytest.raises(DataError, match="'nope'"):
        infer_schema(table, source="t", config=PreprocessConfig(), id_columns=("nope",))


@pytest.mark.parametrize("key", ["categorical_columns", "numeric_columns"])
def test_a_config_column_not_in_the_file_names_its_key_and_the_nearest_column(table, key):
    config = PreprocessConfig(**{key: ("Temp ",)})
    with pytest.raises(DataError) as raised:
        infer_schema(table, source="t.csv", config=config, id_columns=("id",))
    message = str(raised.value)
    assert message.startswith("t.csv: the config's preprocess.")
    assert f"preprocess.{key} names column 'Temp '" in message and "did you mean 'temp'?" in message
    assert f"or remove it from preprocess.{key}" in message and "\n" not in message
    # Nothing near it: the file's columns instead.
    with pytest.raises(DataError, match=r"preprocess\.categorical_columns names column 'zzz', which is not in the file "
                                        r"\(its columns are 'id', 'temp', 'count', 'mode', 'site', 'const', 'label'\)"):
        infer_schema(table, source="t.csv", config=PreprocessConfig(categorical_columns=("zzz",)))


def test_a_long_header_is_not_listed_whole(table):
    wide = pd.concat([table, pd.DataFrame(np.zeros((100, 30)), columns=[f"c{i}" for i in range(30)])], axis=1)
    with pytest.raises(DataError, match=r"'c12' and 17 more\); correct the name in --id-columns"):
        infer_schema(wide, source="t.csv", config=PreprocessConfig(), id_columns=("zzz",))


def test_a_named_column_missing_from_a_header_of_numbers_says_the_header_row_may_be_missing():
    """A file without its header row, whose first line was read as the names, listed those values as
    "its columns", as if the user had misspelled --id-columns."""
    frame = pd.DataFrame(np.arange(60).reshape(20, 3), columns=["23", "25", "37"])
    with pytest.raises(DataError, match=r"^t\.csv: column 'row_id' was named by --id-columns but is not in the file "
                                        r"\(its first line, 23, 25, 37, looks like data: is the header row missing\? "
                                        r"add a first line naming the columns\); correct the name in --id-columns$"):
        infer_schema(frame, source="t.csv", config=PreprocessConfig(), id_columns=("row_id",))


@pytest.mark.parametrize("name", ["score", "recon", "kl", "p_value", "is_anomaly", "source"])
def test_an_id_column_named_like_a_scores_column_is_refused_at_training(table, name):
    """The scores would hold two columns of that name, which pandas.read_parquet refuses."""
    with pytest.raises(DataError) as raised:
        infer_schema(table.rename(columns={"id": name}), source="t.csv", config=PreprocessConfig(),
                     id_columns=(name,))
    assert str(raised.value) == (
        f"t.csv: id column {name!r} has the name of a column vaeguard writes into the scores (score, recon, kl, "
        f"p_value, is_anomaly, and source when one output holds several inputs), which would then hold two "
        f"columns named {name!r}; rename that column in the file, or leave it out of --id-columns")


def test_features_named_like_the_scores_columns_are_taken(table):
    """Features are not copied into the scores: their names clash with nothing there."""
    renamed = table.rename(columns={"temp": "score", "site": "source", "count": "p_value", "id": "Score"})
    schema = infer_schema(renamed, source="t", config=PreprocessConfig(), id_columns=("Score",))
    assert schema.numeric == ("score", "p_value") and schema.categorical == ("mode", "source", "label")


def test_an_older_bundle_with_such_an_id_is_refused_at_scoring():
    with pytest.raises(DataError, match=r"^exported/old: id column 'kl' has .* retrain bundle 'old' with that column "
                                        r"renamed in its training file, or without it in --id-columns$"):
        check_id_names(("row", "kl"), "exported/old", several_inputs=False, bundle="old")
    # 'source' clashes only when one output holds several inputs, and then says so.
    check_id_names(("source",), "exported/old", several_inputs=False, bundle="old")
    with pytest.raises(DataError, match=r"id column 'source' .*; or score each input into its own output$"):
        check_id_names(("source",), "exported/old", several_inputs=True, bundle="old")


def test_category_arrays_share_one_str_per_category_and_accept_chunked_columns():
    import pyarrow as pa

    from pipeline.schema import as_category_array

    chunked = pa.chunked_array([["a", None], ["b", "a"], []])
    values = as_category_array(chunked)
    assert values.dtype == object and values.tolist() == ["a", "", "b", "a"]
    assert values[0] is values[3]  # one Python str per category, not one per cell
    assert as_category_array(pa.array([2.0, None, 3.0])).tolist() == ["2", "", "3"]  # spelled as training spelled them


def test_a_feature_rising_on_every_row_is_warned_about(table, caplog):
    """A forgotten --id-columns: later batches' ids lie beyond the training range and all score high."""
    with caplog.at_level("WARNING", logger="vaeguard"):
        schema = infer_schema(table, source="t.csv", config=PreprocessConfig())
    assert "id" in schema.numeric  # still used: the warning says what to do, it does not guess
    [warning] = [r.getMessage() for r in caplog.records]
    assert "column 'id' rises on every row" in warning and "--id-columns id" in warning

    caplog.clear()
    with caplog.at_level("WARNING", logger="vaeguard"):
        infer_schema(table, source="t.csv", config=PreprocessConfig(), id_columns=("id",))
        infer_schema(table.sample(frac=1.0, random_state=0), source="t.csv", config=PreprocessConfig())
        infer_schema(table.head(99), source="t.csv", config=PreprocessConfig())  # too short to tell
    assert not caplog.records


@pytest.mark.parametrize("values, holds", [
    (pd.date_range("2024-01-01", periods=100, freq="min"), "timestamps, e.g. '2024-01-01 00:00:00'"),
    (pd.date_range("2024-01-01", periods=100, freq="min", tz="UTC"), "timestamps, e.g. '2024-01-01 00:00:00+00:00'"),
    (pd.timedelta_range(0, periods=100, freq="s"), "durations, e.g. '0 days 00:00:00'"),
    (pd.date_range("2024-01-01", periods=100).date, "dates, e.g. '2024-01-01'"),  # datetime.date objects, as Parquet date32 reads
], ids=["datetime", "datetime_tz", "timedelta", "date_objects"])
def test_a_date_or_time_column_is_named_with_the_fix(table, values, holds):
    """to_numeric reads every time as a number, so nothing was 'bad' and bad[0] raised IndexError.
    The message named the dtype, '(object)' for dates, where it should say what the column holds."""
    table["ts"] = values
    with pytest.raises(DataError, match=rf"column 'ts' holds dates or times \({re.escape(holds)}\).*--id-columns ts"):
        infer_schema(table, source="t.csv", config=PreprocessConfig(), label_column="label", id_columns=("id",))
    # Given as an id column, it is accepted.
    infer_schema(table, source="t.csv", config=PreprocessConfig(), label_column="label", id_columns=("id", "ts"))


def test_numbers_stored_as_objects_are_numeric_and_bool_objects_categorical(table):
    from decimal import Decimal

    table["dec"] = [Decimal(f"{v:.2f}") for v in table["temp"]]
    table["text"] = table["temp"].map(repr).astype(object)
    table["flag"] = pd.Series([None, True, False] * 33 + [True], dtype=object)
    config = PreprocessConfig(numeric_columns=("text",))
    schema = infer_schema(table, source="t.parquet", config=config, label_column="label", id_columns=("id",))
    assert {"dec", "text"} <= set(schema.numeric)
    assert "flag" in schema.categorical


@pytest.mark.parametrize("dtype", [bool, object])
def test_booleans_named_numeric_are_refused_not_taken_as_categories(table, dtype):
    """numeric_columns was silently ignored for a true/false column; scoring refuses booleans where
    it expects numbers, so training can't take them as 0/1 either."""
    table["flag"] = pd.Series([True, False] * 50, dtype=dtype)
    with pytest.raises(DataError, match=r"column 'flag' in numeric_columns, but it holds booleans"):
        infer_schema(table, source="t.parquet", config=PreprocessConfig(numeric_columns=("flag",)),
                     label_column="label", id_columns=("id",))


@pytest.mark.parametrize("name", ["", "  "])
def test_a_column_without_a_name_is_refused_with_its_position(table, name):
    """A pandas index written with to_csv() has no header name: it was learned as a feature rising on
    every row, with a warning to pass "--id-columns " (an empty name, which the option can't take)."""
    table.insert(0, name, np.arange(100))
    with pytest.raises(DataError, match=r"column 1 has no name in the header; name it .*index=False"):
        infer_schema(table, source="t.csv", config=PreprocessConfig(), label_column="label", id_columns=("id",))


@pytest.mark.parametrize("spelled", [["0", "1"], ["false", "true"], ["FALSE", "True"], [0.0, 1.0], [False, True]])
def test_a_label_means_the_same_in_training_and_scoring_whatever_its_type(table, spelled):
    """A Parquet label stored as text '0'/'1' was refused with "holds '0', '1'; recode it to 0/1"."""
    import pyarrow as pa

    from pipeline.tables import category_strings

    expected = table["label"].to_numpy()
    table["label"] = pd.Series([spelled[v] for v in expected], dtype=object)
    assert label_vector(table, "label", "t.parquet").tolist() == expected.tolist()
    as_scored = category_strings(pa.array(table["label"].astype(type(spelled[0])), from_pandas=True))
    assert scored_labels(as_scored, "label", "t.parquet").tolist() == expected.tolist()


def test_a_label_that_is_not_0_or_1_is_named(table):
    import pyarrow as pa

    table["label"] = table["label"].astype(str).where(table.index != 5, "yes")
    with pytest.raises(DataError, match=r"must be binary .* holds 'yes'; recode it to 0/1"):
        label_vector(table, "label", "t.csv")
    with pytest.raises(DataError, match=r"label column 'label' must be 0 \(normal\) or 1 \(anomaly\) but row 106 "
                                        r"holds 'yes'"):
        scored_labels(pa.array(table["label"].tolist()), "label", "t.csv", row_offset=100)
    assert np.isnan(scored_labels(pa.array(["1", None]), "label", "t.csv")).tolist() == [False, True]


@pytest.mark.parametrize("spelled", ["0_1", "\uff11", "\u0661", "\x1c1", "1\x85", "1\x1f", "\ufeff1"],
                         ids=["underscore", "fullwidth_digit", "arabic_digit", "x1c", "x85", "x1f", "bom"])
def test_a_label_the_numeric_columns_would_refuse_is_refused(table, spelled):
    """float() read '0_1' as 1 and '１' as a number, and str.strip() took control characters for spaces:
    labels that pyarrow refuses in a numeric column, and that the Node example refuses, were taken."""
    table["label"] = table["label"].astype(str).where(table.index != 5, spelled)
    with pytest.raises(DataError, match="must be binary"):
        label_vector(table, "label", "t.csv")
    with pytest.raises(DataError, match=r"but row 6 holds"):
        scored_labels(pa.array(table["label"].tolist()), "label", "t.csv")


@pytest.mark.parametrize("spelled", ["1.0", "1e0", "+1", "1.", " 1 ", "\t1", "\xa01\u3000", "1\n"])
def test_a_label_spelled_as_a_number_or_with_white_space_is_taken(table, spelled):
    """The spellings both runtimes take: pyarrow's numbers, white space as the Node example trims it."""
    zero = {"1.0": "0.0", "1e0": "0e0", "+1": "-0", "1.": ".0"}.get(spelled, spelled.replace("1", "0"))
    table["label"] = [spelled if v else zero for v in table["label"]]
    expected = [1 if v == spelled else 0 for v in table["label"]]
    assert label_vector(table, "label", "t.csv").tolist() == expected
    scored = scored_labels(pa.array(table["label"].tolist()), "label", "t.csv")
    assert scored.tolist() == expected and not np.signbit(scored).any()  # '-0' is 0, not -0.0


def test_a_label_that_marks_only_the_anomalies_says_to_fill_the_rest(table):
    """Blank for normal, 1 for anomaly: the error said a value was missing at row 1, not what to put there."""
    table["label"] = table["label"].where(table["label"] == 1)
    with pytest.raises(DataError, match=r"missing a value at row \d+; .*only anomalies \(1\) are labelled: fill "
                                        r"the other rows with 0"):
        label_vector(table, "label", "t.csv")
    table.loc[table["label"].first_valid_index(), "label"] = 0  # some normal rows labelled too: no such hint
    with pytest.raises(DataError, match=r"on every row$"):
        label_vector(table, "label", "t.csv")


def test_integer_codes_stored_as_text_are_judged_as_a_csvs_integers(tmp_path):
    """A Parquet text column of codes '1', '2', '3' trained as numeric (numbers stored as text), and
    the same column in a CSV as categories (the CSV reader's integers): one night's model differed
    from the next's by the file's format alone."""
    from pipeline.tables import read_table

    rng = np.random.default_rng(0)
    codes = rng.integers(1, 4, 200)
    frame = pd.DataFrame({
        "x": rng.normal(size=200),
        "code": [str(c) for c in codes],
        "padded": [f"{c:03d}" for c in codes],              # kept as written: categories '001', ...
        "spaced": [f" {c}" for c in codes],                  # the CSV reader trims spaces around a number
        "blank": [None if i % 40 == 0 else str(c) for i, c in enumerate(codes)],
        "many": [str(v) for v in rng.integers(-10**6, 10**6, 200)],  # many values: numeric, as before
        "decimal": [f"{c}.5" for c in codes],                # decimals stored as text: numeric, as before
    })
    parquet, csv = tmp_path / "t.parquet", tmp_path / "t.csv"
    frame.to_parquet(parquet)
    frame.to_csv(csv, index=False)
    config = PreprocessConfig()
    from_parquet, from_csv = (infer_schema(read_table(p), source=str(p), config=config) for p in (parquet, csv))
    assert from_parquet == from_csv
    assert from_parquet.categorical == ("code", "padded", "spaced", "blank")
    assert from_parquet.numeric == ("x", "many", "decimal")
    forced = PreprocessConfig(numeric_columns=("code",))
    assert "code" in infer_schema(read_table(parquet), source="t", config=forced).numeric


def test_a_text_value_in_a_mostly_numeric_column_names_the_categorical_override(table):
    """A code column with a letter among its numbers ('L' among sizes) was refused with "fix or blank
    out that value" alone, where the fix was to say it holds categories."""
    table["size"] = [str(i % 50) for i in range(100)]
    table.loc[41, "size"] = "L"
    with pytest.raises(DataError, match=r"column 'size' must be numeric but row 42 holds 'L'; fix or blank out that "
                                        r"value, or, if 'size' holds categories, name it in the --config file: "
                                        r"preprocess: \{categorical_columns: \[size\]\}$"):
        infer_schema(table, source="t.csv", config=PreprocessConfig())
    assert "size" in infer_schema(table, source="t.csv", config=PreprocessConfig(categorical_columns=("size",))).categorical
    with pytest.raises(DataError, match=r"holds 'L'; fix or blank out that value, or remove 'size' from "
                                        r"preprocess\.numeric_columns"):  # named numeric: the config is the way out
        infer_schema(table, source="t.csv", config=PreprocessConfig(numeric_columns=("size",)))


def test_a_column_the_config_makes_numeric_names_the_config_in_its_error(table, tmp_path):
    """A text column named in preprocess.numeric_columns failed with "column 'line' must be numeric but
    row 1 (line 2) holds 'A'; fix or blank out that value": the data was blamed for the config's word."""
    table["line"] = np.tile(["A", "B", "C", "D"], 25)
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    with pytest.raises(DataError) as raised:
        infer_schema(pd.read_csv(path), source=str(path), config=PreprocessConfig(numeric_columns=("line",)))
    assert str(raised.value) == (
        f"{path}: column 'line' must be numeric, as the config's preprocess.numeric_columns says, but row 1 (line 2) "
        f"holds 'A'; fix or blank out that value, or remove 'line' from preprocess.numeric_columns in the --config file")


def _days(n: int = 100, rows_per_day: int = 10) -> pd.DatetimeIndex:
    return pd.date_range("2024-03-01", periods=-(-n // rows_per_day)).repeat(rows_per_day)[:n]


@pytest.mark.parametrize("suffix, written, example, holds", [
    (".csv", "%d/%m/%Y", "01/03/2024", "dates written as text"),      # the CSV reader leaves these as text
    (".parquet", "%Y-%m-%d", "2024-03-01", "dates written as text"),  # a Parquet text column of ISO dates
    (".csv", "%Y-%m-%d", "2024-03-01", "dates"),                      # the CSV reader types these: not '(object)'
    (".parquet", "%d-%b-%Y %H:%M", "01-Mar-2024 00:00", "dates written as text"),
], ids=["dmy_csv", "iso_parquet_text", "iso_csv_typed", "timestamp_text"])
def test_dates_written_as_text_are_refused_as_typed_dates_are(table, tmp_path, suffix, written, example, holds):
    """A CSV's 01/03/2024 or a Parquet text column of 2024-03-01 trained as a category, and the next
    night every row held a date training never saw; a CSV's ISO dates were refused as '(object)'."""
    from pipeline.tables import read_table

    table["day"] = _days().strftime(written)
    if holds != "dates":  # (a typo makes the CSV reader leave a column as text)
        table.loc[7, "day"] = "n/a?"  # a typo among them: nearly all are dates, so the column holds dates
    path = tmp_path / f"t{suffix}"
    table.to_csv(path, index=False) if suffix == ".csv" else table.to_parquet(path)
    with pytest.raises(DataError) as raised:
        infer_schema(read_table(path), source=str(path), config=PreprocessConfig(), label_column="label",
                     id_columns=("id",))
    assert str(raised.value) == (
        f"{path}: column 'day' holds dates or times ({holds}, e.g. {example!r}), which cannot be a feature: later "
        f"rows hold dates that training never saw, so all of them would score as anomalies; leave it out of the "
        f"file, derive numeric features from it (e.g. day of week, hour of day), or pass it as --id-columns day")
    schema = infer_schema(read_table(path), source=str(path), config=PreprocessConfig(), label_column="label",
                          id_columns=("id", "day"))
    assert "day" not in schema.feature_columns


@pytest.mark.parametrize("values", [
    ["2024A", "2024B", "2023C"],               # codes with a year in them
    ["1.2.3", "1.2.10", "2.0.1"],              # version strings
    ["1:10", "1:20", "1:50"],                  # ratios
    ["2024-03", "2024-04", "2024-05"],         # a year and month: codes are written so too
    ["12-34-56", "AB-12-2024", "v2024.03.01"],
])
def test_text_that_is_not_a_date_stays_a_category(table, values):
    table["code"] = np.tile(values, 34)[:100]
    assert "code" in infer_schema(table, source="t.parquet", config=PreprocessConfig(), id_columns=("id",)).categorical


def test_only_a_column_of_nearly_all_dates_is_refused(table):
    dates = pd.Series(_days().strftime("%d/%m/%Y"))
    table["day"] = dates.where(table.index % 10 != 0, "unknown")  # 90% dates: a date column with blanks spelled out
    with pytest.raises(DataError, match=r"column 'day' holds dates or times \(dates written as text, e\.g\. '01/03/2024'\)"):
        infer_schema(table, source="t.parquet", config=PreprocessConfig(), id_columns=("id",))
    table["day"] = dates.where(table.index % 5 != 0, "unknown")  # 80%: text that holds some dates
    assert "day" in infer_schema(table, source="t.parquet", config=PreprocessConfig(), id_columns=("id",)).categorical


def test_times_of_day_written_as_text_are_refused_as_a_csvs_typed_ones(table, tmp_path):
    """The CSV reader types 06:00 as a time, refused; the same text in a Parquet column trained as a
    category. A few recurring times (a shift's start) stay categories when the config says so."""
    from pipeline.tables import read_table

    table["start"] = np.tile(["06:00", "14:00", "22:00", "06:30"], 25)
    for suffix in (".csv", ".parquet"):
        path = tmp_path / f"t{suffix}"
        table.to_csv(path, index=False) if suffix == ".csv" else table.to_parquet(path)
        holds = "times of day" if suffix == ".csv" else "times of day written as text"
        with pytest.raises(DataError, match=rf"column 'start' holds dates or times \({holds}, e\.g\. '06:00(:00)?'\), "
                                            r"which cannot be a feature; derive a number from it \(e\.g\. hour of day\).*"
                                            r"name it in the --config file: preprocess: \{categorical_columns: \[start\]\}$"):
            infer_schema(read_table(path), source=str(path), config=PreprocessConfig(), id_columns=("id",))
        forced = PreprocessConfig(categorical_columns=("start",))
        assert "start" in infer_schema(read_table(path), source=str(path), config=forced, id_columns=("id",)).categorical


def test_a_feature_that_never_falls_with_many_values_is_warned_about(table, tmp_path, caplog):
    """A date written as a number (20240301, ten rows a day, in order) trained with no warning, as the
    check asked for a new value on every row; every later night's dates lie beyond training's."""
    from pipeline.tables import read_table

    table["day"] = _days().strftime("%Y%m%d").astype(int)  # 10 days
    table["step"] = np.repeat([1.0, 1.5, 2.0], 34)[:100]    # a setting raised twice: no date
    table["sorted"] = np.sort(table["temp"].to_numpy()).round(1)  # repeats, in order: a file sorted by it
    path = tmp_path / "t.parquet"
    table.assign(day=table["day"].astype(str)).to_parquet(path)  # numbers as text: judged as those numbers
    for frame in (table, read_table(path)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="vaeguard"):
            schema = infer_schema(frame, source="t.csv", config=PreprocessConfig(), id_columns=("id",))
        assert {"day", "step", "sorted"} <= set(schema.numeric)
        assert [r.getMessage() for r in caplog.records] == [
            f"t.csv: column {name!r} never falls over the file ({distinct} distinct values in 100 rows), like a date, "
            f"a timestamp or a running count; as a feature, later rows fall outside its training range and score as "
            f"anomalies. If it is a date or time, leave it out or derive numeric features from it (e.g. day of week); "
            f"if it is an id, pass --id-columns {name}; if the file is only sorted by this measurement, ignore this"
            for name, distinct in (("day", 10), ("sorted", table["sorted"].nunique()))]

    caplog.clear()
    with caplog.at_level("WARNING", logger="vaeguard"):  # in another order, or an ordinary feature: no warning
        infer_schema(table.sample(frac=1.0, random_state=0), source="t.csv", config=PreprocessConfig(), id_columns=("id",))
    assert not caplog.records


def test_a_separator_at_the_end_of_every_line_makes_no_column(table, tmp_path):
    """A CSV whose every line ends with a comma has a last column with no name and no values: it was
    refused as "column 9 has no name ... as a pandas index written by to_csv() is"."""
    from pipeline.tables import read_table

    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    path.write_text("".join(line + ",\n" for line in path.read_text().splitlines()))
    frame = read_table(path)
    assert frame.columns[-1] == "" and frame.iloc[:, -1].isna().all()
    schema = infer_schema(frame, source=str(path), config=PreprocessConfig(), label_column="label", id_columns=("id",))
    assert schema == infer_schema(table, source="t", config=PreprocessConfig(), label_column="label", id_columns=("id",))

    # A last column without a name that holds values is refused, and is no pandas index.
    frame.iloc[3, -1] = "x"
    with pytest.raises(DataError, match=rf"column {len(frame.columns)} has no name in the header; name it, or leave "
                                        r"it out of the file$"):
        infer_schema(frame, source=str(path), config=PreprocessConfig(), label_column="label", id_columns=("id",))


@pytest.mark.parametrize("value", [1.0, 2.5])
def test_a_numeric_column_of_one_value_and_blanks_is_kept(table, value):
    """Which rows are blank is the signal of such a column (an error code set on some rows): it
    trains as numeric, where its missing indicator learns it, not dropped as constant."""
    table["flag"] = np.where(np.arange(100) % 3 == 0, value, np.nan)
    schema = infer_schema(table, source="t.csv", config=PreprocessConfig(), label_column="label", id_columns=("id",))
    assert "flag" in schema.numeric
    assert schema.dropped == (("const", "constant"),)


def test_an_infinity_and_a_missing_label_in_a_csv_are_named_by_row_and_line(tmp_path):
    """"row 3" alone, where a quoted line break above puts it on line 5, and where a bad number in
    the same file was already "row 3 (line 5)" (and the Node example's infinity too)."""
    path = tmp_path / "t.csv"
    path.write_text('x,note,label\n1.0,"two\nlines",0\n2.0,b,\ninf,c,1\n')
    frame = pd.read_csv(path)
    with pytest.raises(DataError, match=r"column 'x' holds inf at row 3 \(line 5\); expected finite"):
        check_finite(frame[["x"]].to_numpy(dtype=np.float64), ["x"], str(path))
    with pytest.raises(DataError, match=r"label column 'label' is missing a value at row 2 \(line 4\); expected 0"):
        label_vector(frame, "label", str(path))
