import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.errors import DataError, InputFileError
from pipeline.tables import (category_strings, estimate_rows, iter_batches, read_columns, read_table,
                             read_text_columns)
from tests.conftest import NOT_CSV_TEXT, TABLE_TEXT, not_csv_text


def test_missing_empty_and_header_only_files(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        read_table(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InputFileError, match="empty"):
        read_table(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="no data rows"):
        read_table(tmp_path / "header.csv")
    with pytest.raises(InputFileError, match="unsupported file type"):
        read_table(tmp_path / "x.txt")


def test_null_markers_mean_missing_in_text_columns_too(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,s\n1,x\nNA,NA\n,\n")
    frame = read_table(path)
    assert frame["a"].isna().sum() == 2 and frame["s"].isna().sum() == 2


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_batches_are_bounded_and_complete(tmp_path, suffix):
    frame = pd.DataFrame({"id": [f"{i:05d}" for i in range(1000)], "x": np.arange(1000.0), "c": ["a"] * 1000})
    path = tmp_path / f"t{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    batches = list(iter_batches(path, ["x"], ["c"], ["id"], batch_rows=64))
    assert max(b.num_rows for b in batches) <= 64
    assert sum(b.num_rows for b in batches) == 1000
    assert batches[0].column("id")[0].as_py() == "00000"  # ids verbatim, leading zeros kept
    assert read_columns(path) == ["id", "x", "c"]


def test_non_numeric_value_in_stream_names_column_and_row(tmp_path):
    path = tmp_path / "t.csv"
    rows = ["x,y"] + [f"{i},{i}" for i in range(500)]
    rows[301] = "300,oops"  # data row 301
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"column 'y' must be numeric but row 301 \(line 302\) holds 'oops'"):
        list(iter_batches(path, ["x", "y"], [], [], batch_rows=100))


def test_row_estimate_for_progress_bars(tmp_path):
    frame = pd.DataFrame({"x": np.arange(50_000.0), "c": ["abc"] * 50_000})
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    assert estimate_rows(tmp_path / "t.parquet") == 50_000
    assert abs(estimate_rows(tmp_path / "t.csv") - 50_000) < 2_500  # from the first MB's line lengths


def test_gzipped_csv_reads_as_the_plain_one(tmp_path):
    frame = pd.DataFrame({"id": [f"{i:05d}" for i in range(3000)], "x": np.arange(3000.0) / 7, "c": ["a", "b", ""] * 1000})
    plain, zipped = tmp_path / "t.csv", tmp_path / "t.csv.gz"
    frame.to_csv(plain, index=False)
    frame.to_csv(zipped, index=False, compression="gzip")
    pd.testing.assert_frame_equal(read_table(zipped), read_table(plain))
    streamed = [list(iter_batches(p, ["x"], ["c"], ["id"], batch_rows=500)) for p in (plain, zipped)]
    assert [b.to_pydict() for b in streamed[0]] == [b.to_pydict() for b in streamed[1]]
    assert read_columns(zipped) == ["id", "x", "c"]
    assert estimate_rows(zipped) is None  # the compressed size says nothing about the row count
    with pytest.raises(InputFileError, match=r"unsupported file type '.gz'"):
        read_table(tmp_path / "t.json.gz")


@pytest.mark.parametrize("separator", [";", "\t"])
def test_a_file_separated_otherwise_is_refused_with_the_reason(tmp_path, separator):
    path = tmp_path / "t.csv"
    pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]}).to_csv(path, index=False, sep=separator)
    for read in (read_table, read_columns):
        with pytest.raises(InputFileError, match=rf"single column.*separated by {re.escape(repr(separator))}.*commas"):
            read(path)
    (tmp_path / "one.csv").write_text("reading\n1\n2\n")  # a genuine one-column file is fine
    assert read_columns(tmp_path / "one.csv") == ["reading"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_column_named_twice_is_refused(tmp_path, suffix):
    path = tmp_path / f"t{suffix}"
    if suffix == ".csv":
        path.write_text("a,b,a\n1,2,3\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table([[1.0], [2.0], [3.0]], names=["a", "b", "a"]), path)
    for read in (read_table, read_columns):
        with pytest.raises(DataError, match=r"column 'a' appears twice in the header \(columns 1 and 3\)"):
            read(path)


@pytest.mark.parametrize("name", ["t.CSV.GZ", "t.Csv.Gz", "t.csv.GZ"])
def test_gzipped_csv_with_an_upper_case_suffix_is_decompressed(tmp_path, name):
    """table_format accepts any case; pyarrow detects gzip from a lower-case '.gz' only."""
    frame = pd.DataFrame({"id": [f"{i:05d}" for i in range(3000)], "x": np.arange(3000.0) / 7,
                          "c": ["007", "b", ""] * 1000})
    plain, zipped = tmp_path / "t.csv", tmp_path / name
    frame.to_csv(plain, index=False)
    frame.to_csv(zipped, index=False, compression="gzip")
    assert zipped.read_bytes()[:2] == b"\x1f\x8b"
    pd.testing.assert_frame_equal(read_table(zipped), read_table(plain))
    pd.testing.assert_frame_equal(read_text_columns(zipped, ["c"]), read_text_columns(plain, ["c"]))
    assert read_columns(zipped) == ["id", "x", "c"]
    streamed = [list(iter_batches(p, ["x"], ["c"], ["id"], batch_rows=500)) for p in (plain, zipped)]
    assert [b.to_pydict() for b in streamed[0]] == [b.to_pydict() for b in streamed[1]]
    bad = frame.astype({"x": object})
    bad.loc[2000, "x"] = "oops"
    bad.to_csv(zipped, index=False, compression="gzip")
    with pytest.raises(DataError, match=r"column 'x' must be numeric but row 2001 \(line 2002\) holds 'oops'"):
        list(iter_batches(zipped, ["x"], ["c"], ["id"], batch_rows=500))


def test_nan_in_a_float_category_is_missing_as_in_training(tmp_path):
    """A Parquet float category holding NaN (not null) is missing, spelled as training spells it.

    Scoring used to fail casting NaN to int64; training reads the column through pandas, where
    NaN is null, and spells its categories with schema.categorical_strings.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.schema import as_category_array, categorical_strings

    path = tmp_path / "t.parquet"
    values = [1.0, float("nan"), None, 2.0, 7.0]
    pq.write_table(pa.table({"c": pa.array(values, pa.float64(), from_pandas=False), "x": [1.0] * 5}), path)
    assert pq.read_table(path).column("c").null_count == 1  # one null and one real NaN
    trained = categorical_strings(read_table(path), ("c",))[0]
    [batch] = iter_batches(path, ["x"], ["c"], [], batch_rows=100)
    assert batch.column("c").to_pylist() == ["1", None, None, "2", "7"]
    assert as_category_array(batch.column("c")).tolist() == trained.tolist() == ["1", "", "", "2", "7"]
    fractions = category_strings(pa.array([0.5, float("nan")], from_pandas=False))
    assert fractions.to_pylist() == ["0.5", None]  # NaN is missing here too, not a category 'nan'


def test_parquet_numbers_stored_as_text_read_as_the_same_csv_would(tmp_path):
    """A text column where the bundle wants numbers: the CSV reader's missing spellings are
    missing, and a value that is not a number is named with its own row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "text.parquet"
    pq.write_table(pa.table({"x": ["1.5", "", "NA", "null", "2", None]}), path)
    [batch] = list(iter_batches(path, ["x"], [], [], batch_rows=100))
    assert batch.column("x").to_pylist() == [1.5, None, None, None, 2.0, None]

    pq.write_table(pa.table({"x": ["1.5", "", "NA"] * 50 + ["oops"] + ["2"] * 10}), path)
    with pytest.raises(DataError, match=r"column 'x' must be numeric but row 151 holds 'oops'"):
        list(iter_batches(path, ["x"], [], [], batch_rows=100))
    pq.write_table(pa.table({"x": pa.array([0, 1], pa.timestamp("s"))}), path)
    with pytest.raises(DataError, match=r"column .x. must be numeric but holds timestamp\[m?s\] values"):
        list(iter_batches(path, ["x"], [], [], batch_rows=100))


@pytest.mark.parametrize("name", ["fields.csv", "fields.CSV.GZ"])
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_line_with_too_many_fields_is_named_with_its_line(tmp_path, name, newline):
    """pyarrow reports the line's text but not where it is; the error says which line, and how to fix it."""
    import gzip

    lines = ["id,x,c"] + [f"{i},{i / 7},c{i % 3}" for i in range(3000)]
    lines[2001] = "2000,1.5,has, a comma"
    text = (newline.join(lines) + newline).encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(text) if name.lower().endswith(".gz") else text)
    expected = r"line 2002 has 4 fields where the header has 3: '2000,1.5,has, a comma'; quote the fields"
    with pytest.raises(InputFileError, match=expected):
        read_table(path)
    with pytest.raises(InputFileError, match=expected):
        list(iter_batches(path, ["x"], ["c"], ["id"], batch_rows=500))


def test_csv_without_rows_or_not_utf8_says_how_to_fix_it(tmp_path):
    header_only = tmp_path / "header.csv"
    header_only.write_bytes(b"id,x,c")
    with pytest.raises((InputFileError, DataError), match="no data rows"):
        read_table(header_only)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("id,x,c\n1,2.5,caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputFileError, match="not UTF-8 .*; save the file as UTF-8"):
        list(iter_batches(latin, ["x"], ["c"], ["id"], batch_rows=500))
    # In the header, pyarrow's own decoding of the names raised a bare UnicodeDecodeError.
    named = tmp_path / "latin_header.csv"
    named.write_bytes("id,caf\xe9\n1,2.5\n".encode("latin-1"))
    for read in (read_columns, read_table):
        with pytest.raises(InputFileError, match="header holds text that is not UTF-8 .*; save the file as UTF-8"):
            read(named)


def test_a_bad_value_after_a_quoted_line_break_is_named_with_its_editor_line(tmp_path):
    path = tmp_path / "quoted.csv"
    path.write_text('id,x,note\n1,1.5,"two\nlines"\n\n2,2.5,plain\n3,oops,plain\n')
    # Row 3 of the data starts on line 6: the quoted field spans lines 2-3 and line 4 is blank.
    with pytest.raises(DataError, match=r"column 'x' must be numeric but row 3 \(line 6\) holds 'oops'"):
        list(iter_batches(path, ["x"], ["note"], ["id"], batch_rows=500))


def _quoted_line_breaks_csv(path, rows=20_000, note=163):
    # With 163 characters after each quoted line break, one of them falls at the end of the
    # first 1 MiB block: pyarrow's chunker, cutting at any line break, lost the row structure.
    lines = ["id,x,note"] + [f'{i},{i * 0.5},"a\n{"y" * note}"' for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_quoted_line_breaks_read_wherever_the_blocks_end(tmp_path):
    path = _quoted_line_breaks_csv(tmp_path / "notes.csv")
    batches = list(iter_batches(path, ["x"], ["note"], ["id"], batch_rows=65_536))
    assert sum(b.num_rows for b in batches) == 20_000
    x = np.concatenate([b.column("x").to_numpy() for b in batches])
    assert np.array_equal(x, np.arange(20_000) * 0.5)
    assert len(read_table(path)) == 20_000


def test_a_row_longer_than_a_block_is_read_with_larger_blocks_without_repeating_rows(tmp_path):
    """A 2 MB field (in a column scoring does not even read) stopped the whole file."""
    frame = pd.DataFrame({"id": [str(i) for i in range(30_000)], "x": np.arange(30_000) * 0.25, "blob": ""})
    frame.loc[25_000, "blob"] = "z" * (2 << 20)  # after several 1 MiB blocks were already given
    path = tmp_path / "long.csv"
    frame.to_csv(path, index=False)
    batches = list(iter_batches(path, ["x"], [], ["id"], batch_rows=4_096))
    ids = np.concatenate([b.column("id").to_numpy(zero_copy_only=False) for b in batches])
    assert ids.tolist() == frame["id"].tolist()
    assert read_columns(path) == ["id", "x", "blob"]
    assert read_table(path)["blob"].str.len().max() == 2 << 20


@pytest.mark.parametrize("cell, shown", [(b"\x0b1.5", r"'\x0b1.5'"), (b"\xe9", r"b'\xe9' (not UTF-8)"),
                                         (b"1.5.2", "'1.5.2'")])
def test_a_value_pyarrow_refuses_is_named_with_its_column_and_row(tmp_path, cell, shown):
    """pandas reads '\\v1.5' as a number and can't read bytes that are not UTF-8 at all, so
    judging by pandas, these failed with "could not be parsed: In CSV column #1" and no row."""
    path = tmp_path / "odd.csv"
    path.write_bytes(b"id,x\n" + b"".join(b"%d, %d.5\n" % (i, i) for i in range(3000)) + b"3000," + cell + b"\n")
    with pytest.raises(DataError) as caught:
        list(iter_batches(path, ["x"], [], ["id"], batch_rows=500))
    assert str(caught.value) == (f"{path}: column 'x' must be numeric but row 3001 (line 3002) holds {shown}; "
                                 f"fix or blank out that value")


def _score_parquet(path, column, numeric=("x",), text=()):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": column}), path)
    return list(iter_batches(path, list(numeric), list(text), [], batch_rows=100))


def test_parquet_booleans_where_the_bundle_wants_numbers_are_refused_like_csv_text(tmp_path):
    """They were read as 0/1 without a word, where a CSV's 'true' in that column is refused and
    training reads a true/false column as categories."""
    import pyarrow as pa

    with pytest.raises(DataError, match=r"column 'x' must be numeric but holds booleans \(true/false\).*0/1"):
        _score_parquet(tmp_path / "b.parquet", pa.array([True, False, None]))
    csv = tmp_path / "b.csv"
    csv.write_text("x\n1.5\ntrue\n")
    with pytest.raises(DataError, match=r"column 'x' must be numeric but row 2 \(line 3\) holds 'true'"):
        list(iter_batches(csv, ["x"], [], [], batch_rows=100))
    # As a category, a boolean is read as training reads it.
    [batch] = _score_parquet(tmp_path / "b.parquet", pa.array([True, None]), numeric=(), text=("x",))
    assert batch.column("x").to_pylist() == ["true", None]


def test_parquet_dictionary_columns_read_as_their_values(tmp_path):
    """pandas categories written to Parquet: a bad number was reported as "holds dictionary<values=string,
    indices=int32, ordered=0> values", without its row."""
    import pyarrow as pa

    [batch] = _score_parquet(tmp_path / "d.parquet", pa.array(["1.5", "NA", "2"]).dictionary_encode())
    assert batch.column("x").to_pylist() == [1.5, None, 2.0]
    with pytest.raises(DataError, match=r"column 'x' must be numeric but row 2 holds 'oops'"):
        _score_parquet(tmp_path / "d.parquet", pa.array(["1.5", "oops"]).dictionary_encode())
    [batch] = _score_parquet(tmp_path / "d.parquet", pa.array([1.0, 2.0]).dictionary_encode(), numeric=(), text=("x",))
    assert batch.column("x").to_pylist() == ["1", "2"]  # integral floats spelled as training spells them


def test_parquet_integers_beyond_float_precision_are_numbers(tmp_path):
    """A safe cast refused int64 2**62 as "must be numeric but holds int64 values"."""
    import pyarrow as pa

    [batch] = _score_parquet(tmp_path / "i.parquet", pa.array([1, 2**62, None]))
    assert batch.column("x").to_pylist() == [1.0, float(2**62), None]
    [batch] = _score_parquet(tmp_path / "u.parquet", pa.array([2**64 - 1], pa.uint64()))
    assert batch.column("x").to_pylist() == [float(2**64 - 1)]


def test_parquet_nested_values_are_refused_in_any_slot(tmp_path):
    """A list in a category or id column crashed with ArrowNotImplementedError."""
    import pyarrow as pa

    with pytest.raises(DataError, match=r"column 'x' must be numeric but holds list<.*> values"):
        _score_parquet(tmp_path / "n.parquet", pa.array([[1.0], [2.0]]))
    with pytest.raises(DataError, match=r"column 'x' must hold one category or id per row .* holds struct<"):
        _score_parquet(tmp_path / "n.parquet", pa.array([{"a": 1}, {"a": 2}]), numeric=(), text=("x",))


def test_training_reads_parquet_types_as_scoring_does(tmp_path):
    """float16 crashed training ("float16 indexes are not supported"), a list column crashed it
    ("unhashable type"), and a dictionary of few integers became numeric where the plain column
    is categorical."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import PreprocessConfig
    from pipeline.schema import infer_schema

    rng = np.random.default_rng(0)
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"half": pa.array(rng.normal(size=200).astype(np.float16)),
                             "mode": pa.array(rng.integers(0, 3, 200)).dictionary_encode(),
                             "text": pa.array(rng.choice(["a", "b"], 200)).dictionary_encode()}), path)
    frame = read_table(path)
    schema = infer_schema(frame, source=str(path), config=PreprocessConfig())
    assert schema.numeric == ("half",) and schema.categorical == ("mode", "text")
    assert frame["half"].dtype == np.float32
    pq.write_table(pa.table({"x": [1.0, 2.0], "nested": [[1.0], [2.0, 3.0]]}), path)
    with pytest.raises(DataError, match=r"column 'nested' holds list<.*> values, several per row.*flatten"):
        read_table(path)


def test_a_semicolon_file_with_decimal_commas_is_named_for_its_separator(tmp_path):
    """Its rows split on the decimal commas, so pyarrow failed first with "a line has 3 fields where the
    header has 1 ...; quote the fields that hold commas", and training wrapped the separator message
    in "could not be read as csv: <path>: ..."."""
    path = tmp_path / "european.csv"
    pd.DataFrame({"a": [1.5, 2.5], "b": [3.5, 4.5]}).to_csv(path, index=False, sep=";", decimal=",")
    for read in (read_table, read_columns):
        with pytest.raises(InputFileError) as caught:
            read(path)
        assert str(caught.value) == (f"{path}: the header is a single column, 'a;b'; the file looks separated by "
                                     f"';', but vaeguard reads comma-separated files; save it with commas")
    pd.DataFrame({"a": [1.5, 2.5], "b": [3.5, 4.5]}).to_csv(path, index=False, sep=";")
    with pytest.raises(InputFileError, match=rf"^{re.escape(str(path))}: the header is a single column"):
        read_table(path)


def test_parquet_numbers_as_text_with_spaces_read_as_in_a_csv(tmp_path):
    """' 1.5' was refused from Parquet text, while the CSV reader and training's pandas take it."""
    import pyarrow as pa

    [batch] = _score_parquet(tmp_path / "s.parquet", pa.array([" 1.5", "2 ", "\t3", None]))
    assert batch.column("x").to_pylist() == [1.5, 2.0, 3.0, None]
    csv = tmp_path / "s.csv"
    csv.write_text("x\n 1.5\n2 \n\t3\n\n")
    assert next(iter_batches(csv, ["x"], [], [], 10)).column("x").to_pylist() == [1.5, 2.0, 3.0]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_an_integer_column_with_a_blank_keeps_its_kind(tmp_path, suffix, caplog):
    """One blank cell made the column float64, and a code with 3 values numeric instead of
    categorical: two nights of the same data trained two different models."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from pipeline.config import PreprocessConfig
    from pipeline.schema import categorical_strings, infer_schema, numeric_matrix

    rng = np.random.default_rng(0)
    blank = np.arange(200) == 5
    table = pa.table({"x": rng.normal(size=200), "code": pa.array(rng.integers(1, 4, 200), mask=blank),
                      "count": pa.array(rng.integers(0, 1000, 200), pa.int32(), mask=blank),
                      "seq": pa.array(np.arange(200), mask=blank)})
    path = tmp_path / f"t{suffix}"
    if suffix == ".parquet":
        pq.write_table(table, path)  # as other tools write it: no pandas metadata to say Int64
    else:
        pacsv.write_csv(table, path)
    frame = read_table(path)
    with caplog.at_level("WARNING", logger="vaeguard"):
        schema = infer_schema(frame, source=str(path), config=PreprocessConfig())
    assert schema.categorical == ("code",) and schema.numeric == ("x", "count", "seq")
    assert [r.getMessage().split(" rises")[0] for r in caplog.records] == [f"{path}: column 'seq'"]
    codes = categorical_strings(frame, ("code",))[0]
    assert codes[5] == "" and set(codes) == {"1", "2", "3", ""}  # as scoring reads them: '3', not '3.0'
    counts = numeric_matrix(frame, ("count",), str(path))[:, 0]
    assert np.isnan(counts[5]) and np.array_equal(counts[~blank], table["count"].drop_null().to_numpy())
    full = tmp_path / f"full{suffix}"
    if suffix == ".parquet":
        frame.drop(index=5).to_parquet(full)
    else:
        frame.drop(index=5).to_csv(full, index=False)
    assert infer_schema(read_table(full), source=str(full), config=PreprocessConfig()) == schema  # the other night


@pytest.mark.parametrize("encoding", ["plain", "dictionary", "large_string"])
def test_a_parquet_texts_missing_spellings_are_missing_as_in_a_csv(tmp_path, encoding):
    """A CSV's 'NA' or 'nan' is missing in every column. The same text in a Parquet column was a
    category 'nan' (numpy's astype(str) writes NaN so) in training and scoring, and in numbers
    stored as text refused by training while scoring took it: one table, two models."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    spellings = ["NA", "nan", "null", "N/A", "NaN", ""]
    n = len(spellings)
    columns = {"c": ["a", "b"] * n + spellings, "x": ["1.5", "2"] * n + spellings, "id": [f"r{i}" for i in range(2 * n)] + spellings}
    arrays = {name: pa.array(values) for name, values in columns.items()}
    if encoding == "dictionary":
        arrays = {name: array.dictionary_encode() for name, array in arrays.items()}
    elif encoding == "large_string":
        arrays = {name: array.cast(pa.large_string()) for name, array in arrays.items()}
    parquet, csv = tmp_path / "t.parquet", tmp_path / "t.csv"
    pq.write_table(pa.table(arrays), parquet)
    pd.DataFrame(columns).to_csv(csv, index=False)
    expected = [False] * (2 * n) + [True] * n
    for path in (parquet, csv):
        frame = read_table(path)
        assert [frame[name].isna().tolist() for name in columns] == [expected] * 3, path
        [batch] = list(iter_batches(path, ["x"], ["c"], ["id"], batch_rows=100))
        assert batch.column("c").to_pylist() == ["a", "b"] * n + [None] * n, path
        assert batch.column("x").to_pylist() == [1.5, 2.0] * n + [None] * n, path
        assert batch.column("id").to_pylist() == columns["id"], path  # ids as written (iter_batches)
    # Text that only resembles a spelling is kept, in both formats.
    pq.write_table(pa.table({"c": ["None", " NA", "na"]}), parquet)
    assert read_table(parquet)["c"].tolist() == ["None", " NA", "na"]


# The differential fuzz's file; r1's value in one column opens a quote that is never closed.
FUZZED = [dict(row_id="r0", a="0.1", b="0.2", c="101", cat="red", flag="true", code="2", label="0", note="ok"),
          dict(row_id="r1", a="-1.2", b="-2.5", c="95.5", cat="green", flag="false", code="1", label="0", note="oops"),
          dict(row_id="r2", a="1.3", b="2.7", c="110", cat="blue", flag="true", code="3", label="0", note="fine"),
          dict(row_id="r3", a="0.0", b="0.05", c="99", cat="red", flag="False", code="2", label="1", note="fine")]
NEVER_CLOSED = (r"line 3 opens a quoted field that is never closed, so the rest of the file would be one value; "
                r'close that quote, or write a quote inside a value as ""')


def _write(path, text: str):
    import gzip

    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.name.lower().endswith(".gz") else data)
    return path


def _unclosed_quote_csv(path, column: str, last: bool):
    names = [n for n in FUZZED[0] if n != column] + [column] if last else list(FUZZED[0])
    rows = [dict(row) for row in FUZZED]
    rows[1][column] = '"' + rows[1][column]
    return _write(path, "\n".join([",".join(names)] + [",".join(row[n] for n in names) for row in rows]) + "\n")


@pytest.mark.parametrize("name", ["t.csv", "t.csv.gz", "t.CSV.GZ"])
@pytest.mark.parametrize("column, last", [("note", True), ("cat", True), ("a", True), ("label", True), ("cat", False)],
                         ids=["unread_text_last", "category_last", "number_last", "label_last", "category_inside"])
def test_a_quote_never_closed_is_refused_with_the_line_it_opens_on(tmp_path, name, column, last):
    """In the last column, pyarrow took the rest of the file as that value: r2 and r3 vanished without
    a word, in training and scoring alike ('green\\n...' an unseen category); in another column it was
    "a line has 5 fields where the header has 9"."""
    path = _unclosed_quote_csv(tmp_path / name, column, last)
    with pytest.raises(InputFileError, match=re.escape(str(path)) + ": " + NEVER_CLOSED):
        read_table(path)
    for batch_rows in (1, 500):  # not even the rows before it are given: a scoring run writes nothing
        batches = iter_batches(path, ["a", "b"], ["cat"], ["row_id"], batch_rows=batch_rows)
        with pytest.raises(InputFileError, match=re.escape(str(path)) + ": " + NEVER_CLOSED):
            next(batches)


@pytest.mark.parametrize("name", ["t.csv", "t.csv.gz"])
@pytest.mark.parametrize("last", ['"last\n"', '"last,"', '"last"', 'last"', '""'])
def test_quoted_values_that_close_near_the_end_still_read(tmp_path, name, last):
    """A value ending in a line break or a comma (its closing quote looks like an opening one from the
    end), quotes doubled inside one, or a quote inside an unquoted value: none is an unclosed quote."""
    text = 'id,x,note\n1,1.5,"a\nb\n"\n2,2.5,"c,"\n3,3.5,"say ""hi"""\n4,4.5,""\n5,5.5,5" pipe\n6,6.5,' + last
    path = _write(tmp_path / name, text)
    notes = ["a\nb\n", "c,", 'say "hi"', "", '5" pipe', {'""': "", 'last"': 'last"'}.get(last, last.strip('"'))]
    assert read_table(path)["note"].fillna("").tolist() == notes
    assert sum(b.num_rows for b in iter_batches(path, ["x"], [], ["id"], batch_rows=3)) == 6


def test_a_quote_never_closed_is_found_wherever_the_blocks_end(tmp_path, monkeypatch):
    """The check reads the file's last two blocks: pyarrow refuses a longer last row (pinned here)."""
    import io

    import pyarrow.csv as pacsv

    from pipeline import tables

    block = 1_000
    monkeypatch.setattr(tables, "_BLOCK_SIZES", (block, 4 * block))
    rows = [f"{i},{i * 0.5},ok" for i in range(300)]
    for after in range(0, 2 * block, 97):  # bytes of lines the quote takes from the end of the file
        lines = rows + ['300,150.0,"oops'] + [f"{i},0.5,fine" for i in range(after // 11)]
        path = _write(tmp_path / "t.csv", "id,x,note\n" + "\n".join(lines) + "\n")
        with pytest.raises(InputFileError, match="line 302 opens a quoted field that is never closed"):
            list(iter_batches(path, ["x"], [], ["id"], batch_rows=64))
        with pytest.raises(InputFileError, match="line 302 opens a quoted field that is never closed"):
            read_table(path)
    # What the check relies on: a last row longer than two blocks is pyarrow's error, not a value.
    longest = "id,x,note\n" + "\n".join(rows) + '\n1,2,"' + "z" * (2 * block) + "\n"
    with pytest.raises(pa.ArrowInvalid, match="straddling"):
        pacsv.read_csv(io.BytesIO(longest.encode()), read_options=pacsv.ReadOptions(block_size=block),
                       parse_options=tables.CSV_PARSE_OPTIONS)
    with pytest.raises(pa.ArrowInvalid, match="straddling"):
        list(pacsv.open_csv(io.BytesIO(longest.encode()), read_options=pacsv.ReadOptions(block_size=block),
                            parse_options=tables.CSV_PARSE_OPTIONS))


@pytest.mark.parametrize("trailer", [b"\0" * 16, b"\0"])
def test_a_gzip_file_padded_with_zero_bytes_reads_as_the_plain_one(tmp_path, trailer):
    """gzip -t and Python's gzip take zero bytes after the data (tape padding); pyarrow failed with
    "zlib inflate failed: unknown compression method"."""
    import gzip

    frame = pd.DataFrame({"id": [f"{i:05d}" for i in range(3000)], "x": np.arange(3000.0) / 7})
    plain = tmp_path / "t.csv"
    frame.to_csv(plain, index=False)
    padded = tmp_path / "t.csv.gz"
    padded.write_bytes(gzip.compress(plain.read_bytes()) + trailer)
    pd.testing.assert_frame_equal(read_table(padded), read_table(plain))
    streamed = [list(iter_batches(p, ["x"], [], ["id"], batch_rows=500)) for p in (plain, padded)]
    assert [b.to_pydict() for b in streamed[0]] == [b.to_pydict() for b in streamed[1]]
    assert read_columns(padded) == ["id", "x"]


def test_a_gzip_file_padded_with_zero_bytes_is_read_once_up_to_its_data(tmp_path, monkeypatch):
    """Read whole first, it failed at the padding once its rows were parsed, and was parsed again up to
    the data's end: the file was decompressed about three times before scoring. Now one pass finds the
    end and every read stops there (one to three zero bytes still go the old way: see padded_gzip_end)."""
    import gzip

    from pipeline import tables

    plain = tmp_path / "t.csv"
    plain.write_text("id,x\n" + "".join(f"{i:05d},{i / 7}\n" for i in range(3000)))
    data = gzip.compress(plain.read_bytes())
    padded = tmp_path / "t.csv.gz"
    padded.write_bytes(data + b"\0" * 512)
    streamed, table = [b.to_pydict() for b in iter_batches(plain, ["x"], [], ["id"], 500)], read_table(plain)
    read_up_to = []
    csv_source = tables._csv_source

    def spy(path, gzip_end=None):
        read_up_to.append(gzip_end)
        return csv_source(path, gzip_end)

    monkeypatch.setattr(tables, "_csv_source", spy)
    assert [b.to_pydict() for b in iter_batches(padded, ["x"], [], ["id"], 500)] == streamed
    pd.testing.assert_frame_equal(read_table(padded), table)
    assert read_up_to and set(read_up_to) == {len(data)}


@pytest.mark.parametrize("damage, message", [
    (lambda data: data + b"junk\n", "holds bytes after its gzip data that are neither gzip data nor zero padding"),
    (lambda data: data + b"\0\0x", "holds bytes after its gzip data that are neither gzip data nor zero padding"),
    (lambda data: data[:-40], "its gzip data ends early: the file is cut short"),
    (lambda data: data[:200] + bytes(b ^ 0xFF for b in data[200:260]) + data[260:], "its gzip data is damaged"),
], ids=["trailing_text", "zeros_then_text", "truncated", "corrupted"])
def test_a_gzip_file_that_is_not_whole_gzip_data_says_what_is_wrong(tmp_path, damage, message):
    """It was "could not be read as csv: zlib inflate failed: ..." in training, and iter_batches raised
    a bare OSError, naming no file."""
    import gzip

    path = tmp_path / "t.csv.gz"
    path.write_bytes(damage(gzip.compress(("id,x\n" + "".join(f"{i},{i / 7}\n" for i in range(3000))).encode())))
    with pytest.raises(InputFileError, match=re.escape(str(path)) + ": " + message):
        read_table(path)
    with pytest.raises(InputFileError, match=re.escape(str(path)) + ": " + message):
        list(iter_batches(path, ["x"], [], ["id"], batch_rows=500))


def test_a_plain_csv_named_gz_is_said_to_be_no_gzip(tmp_path):
    path = tmp_path / "t.csv.gz"
    path.write_text("id,x\n1,2.5\n")
    for read in (read_table, read_columns, lambda p: list(iter_batches(p, ["x"], [], ["id"], batch_rows=5))):
        with pytest.raises(InputFileError, match="is not gzip data, though its name ends in .gz"):
            read(path)


def test_an_io_error_while_diagnosing_a_bad_value_is_still_one_error_naming_the_file(tmp_path, monkeypatch):
    """The diagnosis re-reads the file from inside the first error's handler: an I/O error there
    came out bare, naming no file, past iter_batches' own handling."""
    from pipeline import tables

    path = tmp_path / "t.csv"
    path.write_text("a,b\n1,x\n")
    read_once = tables._stream_csv

    def failing_again(*args, **kwargs):
        if kwargs or args[1] != {"a": pa.float64(), "b": pa.float64()}:
            raise OSError("Input/output error")
        yield from read_once(*args, **kwargs)

    monkeypatch.setattr(tables, "_stream_csv", failing_again)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: could not be parsed: "):
        list(iter_batches(path, ["a", "b"], [], [], 100))


ID_SPELLINGS = ["007", "NA", "", "nan", " 7 ", "1e5", "1,000", "null", "N/A", "NaN"]


@pytest.mark.parametrize("name", ["t.csv", "t.csv.gz", "t.parquet"])
def test_ids_are_kept_as_written_while_features_and_labels_read_markers_as_missing(tmp_path, name):
    """Ids join the scores back to their rows: 'NA', 'nan', 'null' and an empty id came out null, rows
    no one could find again. Categories, labels and numbers still read the markers as missing."""
    import csv
    import gzip
    import io

    import pyarrow.parquet as pq

    n = len(ID_SPELLINGS)
    markers = ["NA", "", "nan", "null"] * 3
    columns = {"id": ID_SPELLINGS + ["r10", "r11"], "c": markers, "label": markers, "x": markers}
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.table({**columns, "id": pa.array(ID_SPELLINGS + [None, "r11"])}), path)
    else:
        text = io.StringIO()
        csv.writer(text).writerows([list(columns), *zip(*columns.values())])  # quotes "1,000" only
        data = text.getvalue().encode()
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    batches = list(iter_batches(path, ["x"], ["c", "label"], ["id"], batch_rows=5))
    ids = [value for batch in batches for value in batch.column("id").to_pylist()]
    # A CSV holds text, no null: its empty id is "", as a Parquet file's; a Parquet null stays null.
    assert ids == ID_SPELLINGS + [None if name.endswith(".parquet") else "r10", "r11"]
    for column in ("c", "label", "x"):
        assert [v for batch in batches for v in batch.column(column).to_pylist()] == [None] * (n + 2), column
    # Without id columns, the same read (the other way of reading a CSV's text).
    [plain] = list(iter_batches(path, ["x"], ["c", "label"], [], batch_rows=100))
    assert plain.column("c").null_count == plain.column("label").null_count == n + 2


@pytest.mark.parametrize("kind", list(NOT_CSV_TEXT))
def test_a_csv_that_is_another_format_or_encoding_is_named_for_what_it_is(tmp_path, kind):
    """A Parquet file named .csv was "a single column ... separated by '\\t'" with its binary header
    shown, a UTF-16 CSV "line 602 has 1 fields": both sent the user to fix the wrong thing."""
    path = tmp_path / "t.csv"
    path.write_bytes(not_csv_text(kind, tmp_path))
    reads = (read_table, read_columns, lambda p: list(iter_batches(p, ["x"], ["c"], ["id"], batch_rows=100)),
             lambda p: read_text_columns(p, ["c"]))
    for read in reads:
        with pytest.raises(InputFileError, match=re.escape(str(path)) + ": " + NOT_CSV_TEXT[kind]):
            read(path)


def test_a_gzipped_csv_in_another_encoding_is_named_for_it(tmp_path):
    import gzip

    path = tmp_path / "t.csv.gz"
    path.write_bytes(gzip.compress(TABLE_TEXT.encode("utf-16")))
    with pytest.raises(InputFileError, match=r"its gzip data is not UTF-8 text \(it looks UTF-16: it starts with"):
        read_table(path)
    path.write_bytes(gzip.compress(gzip.compress(TABLE_TEXT.encode())))
    with pytest.raises(InputFileError, match=r"its gzip data is gzip-compressed again, not CSV text; decompress it "
                                             r"once \(gunzip\)$"):
        read_columns(path)


def _decimal_table(rows: int = 600) -> tuple[pa.Table, pa.Table]:
    """A table with a code column of three whole numbers, as int64 and as a database export's
    decimal128(5, 0) (blank in one row), and an amount with two digits after the point."""
    from decimal import Decimal

    rng = np.random.default_rng(0)
    codes = [None if i == 7 else int(c) for i, c in enumerate(rng.integers(1, 4, rows))]
    cents = rng.integers(100, 100_000, rows)
    plain = pa.table({"row_id": [f"r{i}" for i in range(rows)], "x": rng.normal(size=rows),
                      "code": pa.array(codes, pa.int64()), "amount": cents / 100})
    exported = plain.set_column(2, "code", pa.array([None if c is None else Decimal(c) for c in codes],
                                                    pa.decimal128(5, 0)))
    exported = exported.set_column(3, "amount", pa.array([Decimal(int(c)).scaleb(-2) for c in cents],
                                                         pa.decimal128(10, 2)))
    return plain, exported


def test_parquet_decimals_read_as_the_integers_or_floats_they_hold(tmp_path):
    """A decimal128(p, 0) code column (database exports) reached the schema as Decimal objects and
    trained as numeric, where the same values as int64 or in a CSV are categories; scoring spelled a
    decimal category 1.50 as '1.50', where training's float reads '1.5'."""
    import pyarrow.parquet as pq

    from pipeline.config import PreprocessConfig
    from pipeline.schema import categorical_strings, infer_schema

    plain, exported = _decimal_table()
    paths = {"plain": tmp_path / "plain.parquet", "exported": tmp_path / "exported.parquet"}
    pq.write_table(plain, paths["plain"])
    pq.write_table(exported, paths["exported"])
    frames = {kind: read_table(path) for kind, path in paths.items()}
    assert str(frames["exported"]["code"].dtype) == "Int64" and frames["exported"]["amount"].dtype == np.float64
    pd.testing.assert_frame_equal(frames["exported"], frames["plain"])
    config = PreprocessConfig(categorical_columns=("amount",))  # its spelling as a category, too
    schemas = {kind: infer_schema(frame, source=kind, config=config, id_columns=("row_id",))
               for kind, frame in frames.items()}
    assert schemas["exported"] == schemas["plain"] and schemas["exported"].categorical == ("code", "amount")
    trained = categorical_strings(frames["exported"], ("code", "amount"))
    for path in paths.values():  # scoring reads either file as training read it
        [batch] = iter_batches(path, ["x"], ["code", "amount"], ["row_id"], batch_rows=1000)
        assert batch.column("code").to_pylist() == [c or None for c in trained[0]]
        assert batch.column("amount").to_pylist() == list(trained[1])
    assert trained[1][0] == f"{plain['amount'][0].as_py():g}"  # '123.4', not '123.40'
    [batch] = iter_batches(paths["exported"], ["code", "amount"], [], [], batch_rows=1000)
    assert batch.column("code").to_pylist() == plain["code"].cast(pa.float64()).to_pylist()
    assert batch.column("amount").to_pylist() == plain["amount"].to_pylist()
    # An id keeps its text as stored; a whole number beyond int64 is a float, as a CSV reads it.
    [batch] = iter_batches(paths["exported"], [], [], ["amount"], batch_rows=1000)
    assert batch.column("amount")[0].as_py() == str(exported["amount"][0].as_py())
    huge = tmp_path / "huge.parquet"
    pq.write_table(pa.table({"n": pa.array([10**30, 1], pa.decimal128(38, 0)),
                             "m": pa.array([2**62, None], pa.decimal128(38, 0))}), huge)
    assert read_table(huge)["n"].tolist() == [1e30, 1.0] and read_table(huge)["m"].tolist() == [2**62, pd.NA]


def test_a_bundle_trained_on_decimal_codes_decides_as_one_trained_on_integers(tmp_path):
    """The decimal file trained another model than the int64 one (its codes numeric), so the same rows
    got other scores and decisions; each bundle must score either file as the other does."""
    import pyarrow.parquet as pq

    from pipeline.batch_score import score_files
    from pipeline.config import ScoreJob, TrainJob
    from pipeline.workflow import run_training
    from tests.conftest import quiet_config

    plain, exported = _decimal_table()
    scores = {}
    for kind, table in (("plain", plain), ("exported", exported)):
        pq.write_table(table, tmp_path / f"{kind}.parquet")
        bundle = run_training(TrainJob(data=tmp_path / f"{kind}.parquet", name=kind, out_dir=tmp_path / "bundles",
                                       id_columns=("row_id",), config=quiet_config(max_epochs=3)))["bundle"]
        schema = json.loads((Path(bundle) / "manifest.json").read_text())["schema"]
        assert (schema["numeric"], schema["categorical"]) == (["x", "amount"], ["code"])
    for kind in ("plain", "exported"):
        for data in ("plain", "exported"):
            out = tmp_path / f"{kind}-{data}.parquet"
            score_files(ScoreJob(tmp_path / "bundles" / kind, (tmp_path / f"{data}.parquet",), out, device="cpu"))
            scores[kind, data] = pd.read_parquet(out)
    for frame in scores.values():
        pd.testing.assert_frame_equal(frame, scores["plain", "plain"])


def test_a_headerless_table_whose_first_row_repeats_a_value_is_told_its_header_looks_like_data(tmp_path):
    """Training on a CSV without its header row said `column '1.0' appears twice in the header`."""
    path = tmp_path / "t.csv"
    path.write_text("1.0,1.0,2.0\n" + "3.5,4.5,5.5\n" * 20)
    with pytest.raises(DataError, match=r"column '1\.0' appears twice in the header \(columns 1 and 2\); rename or "
                                        r"drop one, so that each column means one thing \(its first line, 1\.0, 1\.0, "
                                        r"2\.0, looks like data: is the header row missing\?"):
        read_table(path)
    named = tmp_path / "named.csv"
    named.write_text("x,x,y\n" + "3.5,4.5,5.5\n" * 20)
    with pytest.raises(DataError) as caught:
        read_table(named)
    assert "looks like data" not in str(caught.value)


@pytest.mark.parametrize("kind", ["csv", "gzip", "truncated"])
def test_a_parquet_name_on_other_bytes_says_what_they_are(tmp_path, kind):
    """Each was pyarrow's "Parquet magic bytes not found in footer. Either the file is corrupted or
    this is not a parquet file.", which says neither which nor what to do."""
    import gzip

    path = tmp_path / "t.parquet"
    if kind == "truncated":
        pd.DataFrame({"x": np.arange(500.0)}).to_parquet(path)
        path.write_bytes(path.read_bytes()[:-300])
        expected = (r"a Parquet file that ends early \([0-9,]+ bytes, without the PAR1 marker a whole one ends with\): "
                    r"it was cut off while written or copied; copy or export it again")
    else:
        path.write_bytes(TABLE_TEXT.encode() if kind == "csv" else gzip.compress(TABLE_TEXT.encode()))
        expected = ("is CSV text, not Parquet .*; name it .csv" if kind == "csv" else
                    "is gzip-compressed data, not Parquet .*; if it is a gzipped CSV, name it .csv.gz")
    for read in (read_table, read_columns):
        with pytest.raises(InputFileError, match=rf"^{re.escape(str(path))}: {expected}$"):
            read(path)


def _without_header(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False, header=False)
    return path


def test_training_on_a_csv_without_its_header_row_is_refused_where_its_first_line_is_surely_data(tmp_path, caplog):
    """With no equal values in its first line, a headerless CSV trained without a word: a bundle
    whose columns were named '0', '70.62865110546697', ..., which no later file has."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"row_id": np.arange(300), "temp": rng.normal(70, 5, 300), "speed": rng.integers(100, 200, 300),
                          "line": rng.choice(["A", "B"], 300)})
    fractions = _without_header(frame, tmp_path / "fractions.csv")
    first = frame.iloc[0]
    with pytest.raises(DataError, match=rf"^{re.escape(str(fractions))}: its first line \(0, {first.temp}, "
                                        rf"{first.speed}, {first.line}\) looks like data, not a header: is the header "
                                        rf"row missing\? add a first line naming the columns$"):
        read_table(fractions)
    # Whole numbers, but a text its column holds ('A' or 'B'): no header names a column so.
    words = _without_header(frame.drop(columns="temp"), tmp_path / "words.csv")
    with pytest.raises(DataError, match="looks like data, not a header"):
        read_table(words)
    # Whole numbers alone may be names (years, heights): read, with a warning.
    counts = _without_header(frame[["row_id", "speed"]], tmp_path / "counts.csv")
    with caplog.at_level("WARNING", logger="vaeguard"):
        assert read_table(counts).columns.tolist() == ["0", str(first.speed)]
    assert caplog.messages == [f"{counts}: its header (0, {first.speed}) could be a line of data, each a number within "
                               f"its column's range: if the header row is missing, add a first line naming the "
                               f"columns; if these are the columns' names, ignore this"]


@pytest.mark.parametrize("names", [["400", "410", "420"], ["2019", "2020", "note"], ["x", "y", "1.5"]])
def test_a_header_of_numbers_that_are_no_values_of_their_columns_is_read_without_a_word(tmp_path, caplog, names):
    """Wavelengths over reflectances, years over a few percent: names, not a row of data. And a header
    where most names are words is not looked at."""
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({name: rng.uniform(0, 1, 50) for name in names})
    if "note" in names:
        frame["note"] = rng.choice(["a", "b"], 50)
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    with caplog.at_level("WARNING", logger="vaeguard"):
        assert read_table(path).columns.tolist() == names
    assert not caplog.messages


def test_a_file_of_one_line_of_data_says_its_header_row_may_be_missing(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("3.5,4.5," + "z" * 100 + "\n")
    with pytest.raises(DataError, match=r"has a header but no data rows; expected at least one row \(its first line, "
                                        r"3\.5, 4\.5, z{40}\.\.\., looks like data: is the header row missing\? add a "
                                        r"first line naming the columns\)$"):
        read_table(path)
