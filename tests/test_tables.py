import re

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import DataError, InputFileError
from pipeline.tables import (category_strings, estimate_rows, iter_batches, read_columns, read_table,
                             read_text_columns)


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
        assert batch.column("id").null_count == n, path
    # Text that only resembles a spelling is kept, in both formats.
    pq.write_table(pa.table({"c": ["None", " NA", "na"]}), parquet)
    assert read_table(parquet)["c"].tolist() == ["None", " NA", "na"]
