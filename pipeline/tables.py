"""Reading CSV and Parquet tables, whole (training) or in bounded chunks (scoring).

Both paths go through pyarrow with the same parsing rules, so a value means the same thing at
training and at scoring time: empty fields and the usual null markers ("NA", "null", ...) are
missing in every feature and label column, strings included, in a CSV and in a Parquet file's
text alike. Id columns are not read for meaning but carried to the scores: scoring keeps their
text as written, markers included (iter_batches).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.csv_errors import (gzip_data_end, line_of_row, not_csv_text_error, padded_gzip_end, quote_may_be_open,
                                 separator_error, structure_error, unclosed_quote_error)
from pipeline.errors import DataError, InputFileError, PipelineError, one_line
from pipeline.outputs import check_utf8_path

log = logging.getLogger("vaeguard")

# .csv.gz: nightly batch files often arrive gzipped; pyarrow decompresses them as it streams.
SUPPORTED_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")

# Peak memory grows with the block size (about 40x a block, measured), speed barely does:
# 1 MB blocks parse as fast as 16 MB ones here and keep a 5M-row CSV under ~200 MB.
_CSV_BLOCK_BYTES = 1 << 20
# A row must fit in one block: a longer one (a huge text field, even in a column no one reads)
# stopped the whole file with pyarrow's "straddling object". Such a file is read again with
# larger blocks, in this order, and only such a file pays their memory.
_LONG_ROW_BLOCK_BYTES = (1 << 22, 1 << 24, 1 << 26)
_BLOCK_SIZES = (_CSV_BLOCK_BYTES, *_LONG_ROW_BLOCK_BYTES)
# A quoted field may hold line breaks. Without this, pyarrow's chunker cuts blocks at any line
# break, and a file failed with "parser got out of sync" when a quoted one fell at a block's end.
CSV_PARSE_OPTIONS = pacsv.ParseOptions(newlines_in_values=True)


def table_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv" or path.name.lower().endswith(".csv.gz"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise InputFileError(
        f"{path}: unsupported file type {suffix or '(none)'!r}; expected one of {SUPPORTED_SUFFIXES}"
    )


def check_input_file(path: str | Path) -> Path:
    """Fail early, with the path in the message, on a missing or zero-byte input, or a "CSV" that is
    another format or text not in UTF-8 (its first bytes tell)."""
    path = Path(path)
    check_utf8_path(path, "input", InputFileError)
    if path.is_dir():  # else "unsupported file type '(none)'": a table bundle handed an image folder
        raise InputFileError(f"{path}: a folder, where a table file was expected ({', '.join(SUPPORTED_SUFFIXES)}); "
                             f"this bundle scores tables: score an image folder with a bundle trained on images")
    kind = table_format(path)
    if not path.exists():
        raise InputFileError(f"{path}: file not found; check the path")
    if not path.is_file():
        raise InputFileError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise InputFileError(f"{path}: the file is empty; expected a header row and data rows")
    if kind == "csv" and (not_text := not_csv_text_error(path)):
        raise not_text
    return path


def _is_gzip(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


@contextmanager
def _csv_source(path: Path, gzip_end: int | None = None) -> Iterator[Path | pa.NativeFile]:
    """What to hand pyarrow's CSV readers: the path, or a gzip stream for a .gz file.

    pyarrow detects gzip from a lower-case ".gz" extension only, while table_format accepts any
    case: given "X.CSV.GZ" it parsed the compressed bytes as text. A plain CSV is still opened by
    path, pyarrow's fastest way in (file scoring is benchmarked against parsing). ``gzip_end``:
    where the gzip data of a file padded with zero bytes ends (gzip_data_end). Never a Python file
    object: pyarrow reads ahead in its own threads, and one of those left holding a Python object
    aborted the interpreter at exit ("terminate called without an active exception").
    """
    if not _is_gzip(path):
        yield path
    elif gzip_end is None:
        with pa.input_stream(str(path), compression="gzip") as stream:
            yield stream
    else:
        with pa.memory_map(str(path)) as mapped, pa.CompressedInputStream(
                pa.BufferReader(mapped.read_buffer(gzip_end)), "gzip") as stream:
            yield stream


def _refuse_unclosed_quote(path: Path, block: int, last_value=None) -> None:
    """Fail on a CSV that ends inside a quoted field, once a reader with ``block`` has read it all.

    pyarrow reads the rest of such a file as that one value: the rows in it were lost without a
    word, and a category or label could be read from it. A plain file is cleared by its last bytes,
    with no cost per row. A gzip stream can't be read from its end, so its last row's last value
    (``last_value``, the header's last column, as text) is looked at: it holds every line after
    such a quote.
    """
    if _is_gzip(path):
        if isinstance(last_value, bytes):
            last_value = last_value.decode("utf-8", "replace")
        if not isinstance(last_value, str) or ("\n" not in last_value and "\r" not in last_value):
            return
    else:
        before = quote_may_be_open(*_file_tail(path, block))
        if before is None:
            return
        # Opened at a line's start, the field is its row's only one: pyarrow refused that row
        # already, unless the header has one column.
        if before in (b"\n", b"\r") and len(_read_csv(path, _convert_options(), read=_column_names)) > 1:
            return
    error = unclosed_quote_error(path)
    if error:
        raise error


def _file_tail(path: Path, block: int) -> tuple[bytes, bool]:
    """The file's last bytes, enough for its last row, and whether they are all of it.

    pyarrow reads a last row (from its start to the file's end) of at most two blocks, and refuses
    a longer one as "straddling" (pinned by a test).
    """
    keep = 2 * block + 1
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        start = size - keep if size > keep + 3 else 0  # all of it rather than a byte order mark cut
        handle.seek(start)
        return handle.read(), start == 0


def _convert_options(column_types: dict[str, pa.DataType] | None = None, include_columns: list[str] | None = None,
                     strings_can_be_null: bool = True) -> pacsv.ConvertOptions:
    return pacsv.ConvertOptions(strings_can_be_null=strings_can_be_null, column_types=column_types or {},
                                include_columns=include_columns or [])


def _next_attempt(path: Path, exc: Exception, block: int, gzip_end: int | None) -> tuple[int, int | None]:
    """How to read a CSV again after ``exc``: with larger blocks for a row too long for them, or
    without the zero bytes that pad a gzip file; otherwise ``exc``, or what it means, is raised."""
    if isinstance(exc, pa.ArrowInvalid) and "straddling object" in str(exc) and block < _BLOCK_SIZES[-1]:
        return _BLOCK_SIZES[_BLOCK_SIZES.index(block) + 1], gzip_end
    if isinstance(exc, OSError) and _is_gzip(path) and gzip_end is None:
        # pyarrow's gzip reader fails on zero padding after the data ("unknown compression
        # method"), which gzip -t takes; a file that is not whole gzip data gets its own message.
        end = gzip_data_end(path)
        if end < path.stat().st_size:
            return block, end
    raise exc


def _read_csv(path: Path, convert: pacsv.ConvertOptions, read: Callable = pacsv.read_csv, check_end: bool = False,
              gzip_end: int | None = None):
    """``read`` (pyarrow's read_csv, or a function of the same arguments) on the CSV, with blocks
    large enough for its longest row. ``check_end``: it read every column of the whole file, which
    is refused if it ends inside a quoted field. ``gzip_end``: where a padded gzip file's data ends,
    if known; a read of the whole file looks for it first (padded_gzip_end), a header's read has
    no need to."""
    if read is pacsv.read_csv and gzip_end is None:
        gzip_end = padded_gzip_end(path)
    block = _BLOCK_SIZES[0]
    while True:
        try:
            with _csv_source(path, gzip_end) as source:
                result = read(source, read_options=pacsv.ReadOptions(block_size=block),
                              parse_options=CSV_PARSE_OPTIONS, convert_options=convert)
            if check_end:
                last = result.column(result.num_columns - 1) if result.num_rows else None
                _refuse_unclosed_quote(path, block, last[-1].as_py() if last is not None else None)
            return result
        except PipelineError:
            raise
        except (pa.ArrowInvalid, OSError) as exc:
            block, gzip_end = _next_attempt(path, exc, block, gzip_end)


def _column_names(source, **options) -> list[str]:
    """read_csv's arguments, but only the header's names are read (and the first block)."""
    with pacsv.open_csv(source, **options) as reader:
        return list(reader.schema.names)


def _last_column_name(path: Path, gzip_end: int | None) -> str:
    """The header's last name. Read from a 64 KiB block first: for its first block, pyarrow's reader
    decompressed several MiB of a gzip stream ahead (12 ms on the benchmark's file, 2 ms so)."""
    try:
        with _csv_source(path, gzip_end) as source:
            return _column_names(source, read_options=pacsv.ReadOptions(block_size=1 << 16),
                                 parse_options=CSV_PARSE_OPTIONS)[-1]
    except (pa.ArrowInvalid, OSError):  # a longer first row, or the padding of a small gzip file
        return _read_csv(path, _convert_options(), read=_column_names, gzip_end=gzip_end)[-1]


def _stream_csv(path: Path, types: dict[str, pa.DataType], columns: list[str],
                verbatim: list[str] | tuple[str, ...] = ()) -> Iterator[pa.RecordBatch]:
    """The CSV's ``columns`` in batches, in order, in bounded memory. A row too long for the blocks
    makes the reader start over with larger ones; the rows already given are skipped, not given twice.

    ``verbatim``: text columns whose every value is kept as written, "" and "NA" included. pyarrow's
    null markers hold for all text columns or none, so with such columns the other text columns
    read them as missing here (missing_as_null: about 12 ms per million values, measured), and only
    then.

    Each batch is given once the next one is read, and the last once the file is known to end
    where it should (_refuse_unclosed_quote): a file refused there had its last rows, read from
    one value, used by nothing. From a gzip stream the header's last column is read too, for that
    check (pyarrow's decompression is the bottleneck there, so it is free).
    """
    gzip_end = padded_gzip_end(path)  # first: a padded file read whole failed at its end, and was read again
    last = _last_column_name(path, gzip_end) if _is_gzip(path) else None
    extra = [last] if last is not None and last not in columns else []
    convert = _convert_options(types | dict.fromkeys(extra, pa.string()), columns + extra,
                               strings_can_be_null=not verbatim)
    nullable = [c for c in columns if c not in verbatim and _is_text(types[c])] if verbatim else []
    given, block = 0, _BLOCK_SIZES[0]
    while True:
        skip, held, last_value = given, None, None
        try:
            with _csv_source(path, gzip_end) as source, pacsv.open_csv(
                    source, read_options=pacsv.ReadOptions(block_size=block), parse_options=CSV_PARSE_OPTIONS,
                    convert_options=convert) as reader:
                for batch in reader:
                    if last is not None and batch.num_rows:
                        last_value = batch.column(last)[batch.num_rows - 1].as_py()
                    if skip >= batch.num_rows:
                        skip -= batch.num_rows
                        continue
                    batch, skip = batch.slice(skip), 0
                    if held is not None:
                        given += held.num_rows
                        yield held
                    held = _with_missing_as_null(batch.select(columns) if extra else batch, nullable)
            _refuse_unclosed_quote(path, block, last_value)
            if held is not None:
                yield held
            return
        except PipelineError:
            raise
        except (pa.ArrowInvalid, OSError) as exc:
            block, gzip_end = _next_attempt(path, exc, block, gzip_end)


def _with_missing_as_null(batch: pa.RecordBatch, columns: list[str]) -> pa.RecordBatch:
    for name in columns:
        batch = batch.set_column(batch.schema.get_field_index(name), name, missing_as_null(batch.column(name)))
    return batch


def not_parquet_error(path: Path, exc: Exception) -> InputFileError | None:
    """For a .parquet whose end is not Parquet's (pyarrow: "magic bytes not found in footer"), what it
    is by its first bytes: a Parquet file cut short (a copy that stopped), or another format named
    .parquet; None for other errors."""
    if table_format(path) != "parquet" or "magic bytes not found" not in str(exc):
        return None
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if head.startswith(b"PAR1"):
        return InputFileError(f"{path}: a Parquet file that ends early ({path.stat().st_size:,} bytes, without the "
                              f"PAR1 marker a whole one ends with): it was cut off while written or copied; copy or "
                              f"export it again")
    if head.startswith(b"\x1f\x8b"):
        what, fix = "gzip-compressed data", "if it is a gzipped CSV, name it .csv.gz"
    else:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        what, fix = (("CSV text", "name it .csv") if "," in text or ";" in text or "\t" in text else
                     ("neither Parquet nor CSV", "export it again as Parquet or CSV"))
    return InputFileError(f"{path}: is {what}, not Parquet (a Parquet file starts and ends with PAR1); {fix}")


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a whole table for training; the header alone, or nothing, is an error."""
    path = check_input_file(path)
    try:
        if table_format(path) == "csv":
            table = _read_csv(path, _convert_options(), check_end=True)
            check_header(path, table.column_names)
            if table.num_rows:
                check_first_line(path, table)
        else:
            check_header(path, pq.ParquetFile(path).schema_arrow.names)  # before pyarrow refuses twice-named columns
            table = pq.read_table(path)
    except PipelineError:
        raise  # check_header's own message; an InputFileError is an OSError too
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise structure_error(path, exc) or not_parquet_error(path, exc) or InputFileError(
            f"{path}: could not be read as {table_format(path)}: {one_line(exc)}") from exc
    if table.num_rows == 0:
        raise DataError(f"{path}: has a header but no data rows; expected at least one row"
                        + headerless_hint(table.column_names))
    return _to_pandas(_plain_types(table, path))


# pandas' nullable integers: an integer column with a blank, read with numpy's types, becomes float64.
_NULLABLE_INTEGERS = {pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
                      pa.int64(): pd.Int64Dtype(), pa.uint8(): pd.UInt8Dtype(), pa.uint16(): pd.UInt16Dtype(),
                      pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype()}


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    """The table in pandas, integer columns with missing values as pandas' nullable integers.

    As float64 (pandas' default for them), a code column with a few values and one blank cell was
    judged numeric, and without the blank categorical: two nights of the same data trained
    different models. Columns without missing values keep numpy's types, as before.
    """
    frame = table.to_pandas()
    for name, column in zip(table.column_names, table.columns):
        # A Parquet file's pandas index is a column of the table, not of the frame.
        if pa.types.is_integer(column.type) and column.null_count and name in frame.columns:
            frame[name] = column.to_pandas(types_mapper=_NULLABLE_INTEGERS.get).array
    return frame


def _plain_types(table: pa.Table, path: Path) -> pa.Table:
    """Each column in the type that training's schema judges, as scoring will read it.

    A dictionary-encoded column (pandas categories written to Parquet) is decoded: as pandas'
    category dtype, integers with few values became numeric, not categorical as written plainly.
    float16 becomes float32 (pandas can't index float16: training crashed). A nested column has
    several values per row, nothing a feature can hold: it crashed training with "unhashable type".
    Decimals become integers or floats (_plain_decimals). Text reads the CSV reader's spellings of a
    missing value as missing (missing_as_null).
    """
    for position, field_ in enumerate(table.schema):
        kind = field_.type.value_type if pa.types.is_dictionary(field_.type) else field_.type
        if pa.types.is_nested(kind):
            raise DataError(f"{path}: column {field_.name!r} holds {kind} values, several per row; expected one "
                            f"number or text per row: flatten it into columns, or leave it out of the file")
        if pa.types.is_float16(kind):
            kind = pa.float32()
        if kind != field_.type:
            table = table.set_column(position, field_.name, table.column(position).cast(kind))
        if pa.types.is_decimal(kind):
            table = table.set_column(position, field_.name, _plain_decimals(table.column(position)))
        if _is_text(kind):
            table = table.set_column(position, field_.name, missing_as_null(table.column(position)))
    return table


def _plain_decimals(column: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A decimal column (a database's NUMBER(p, s), as exports write it) as the CSV of the same
    values reads: int64 where it has no digits after the point (scale 0 or less) and every value
    fits, float64 otherwise.

    Left as decimals, training's pandas saw Decimal objects and judged a code column of a few
    whole numbers numeric, where the same values as int64 or in a CSV are categories; and scoring
    spelled a category 1.50 as '1.50', not '1.5' as training does.
    """
    if column.type.scale <= 0:
        try:
            return column.cast(pa.int64())
        except pa.ArrowInvalid:
            pass  # beyond int64 (a NUMBER(38, 0) holds up to 38 digits): a float, as the CSV reader reads it
    # Through the text: pyarrow's own cast is a last bit off for about 3 values in 10 (813.43 became
    # 813.4300000000001, a category of its own), where parsing the text gives the nearest float, as
    # the CSV reader does. About 0.35 us a value, measured.
    return column.cast(pa.string()).cast(pa.float64())


def read_text_columns(path: str | Path, columns: list[str]) -> pd.DataFrame:
    """Columns of a CSV as the text written in it (missing as None), the way scoring streams them.

    Training reads a CSV with type inference, which turns a category '007' into the number 7 and
    'False' into a boolean spelled 'false'; scoring reads categories verbatim, so it would put
    every such row in the unknown bucket. Training re-reads its categorical columns with this.
    """
    path = check_input_file(path)
    try:
        # No check_end: read_table read the whole file first.
        return _read_csv(path, _convert_options({c: pa.string() for c in columns}, list(columns))).to_pandas()
    except PipelineError:
        raise  # an InputFileError is an OSError too
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise structure_error(path, exc) or InputFileError(
            f"{path}: could not be read as csv: {one_line(exc)}") from exc


def read_columns(path: str | Path, used: Collection[str] | None = None) -> list[str]:
    """The column names of a table, without reading its rows. ``used``: the only columns the caller
    reads, where alone a name twice is refused (check_header)."""
    path = check_input_file(path)
    try:
        if table_format(path) == "csv":
            names = _read_csv(path, _convert_options(), read=_column_names)
        else:
            names = list(pq.ParquetFile(path).schema_arrow.names)
    except PipelineError:
        raise  # an InputFileError is an OSError too
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise structure_error(path, exc) or not_parquet_error(path, exc) or InputFileError(
            f"{path}: could not be read as {table_format(path)}: {one_line(exc)}") from exc
    check_header(path, names, used)
    return names


def check_header(path: Path, names: list[str], used: Collection[str] | None = None) -> None:
    """Column names that would be read wrongly without a word: another separator, or a name twice
    among the ``used`` columns (all, if not given). Twice, a column read by name is ambiguous (pyarrow's
    CSV reader takes the first, silently); one no one reads is not (a pandas index and a trailing comma
    on every line make two unnamed columns)."""
    other_separator = separator_error(path, names)
    if other_separator:
        raise other_separator
    first: dict[str, int] = {}
    for position, name in enumerate(names, start=1):
        if used is not None and name not in used:
            continue
        if name in first:
            raise DataError(f"{path}: column {name!r} appears twice in the header (columns {first[name]} and "
                            f"{position}); rename or drop one, so that each column means one thing"
                            + headerless_hint(names))
        first[name] = position


def headerless_note(names: Sequence[str]) -> str:
    """For an error about a header's names: where most of them are numbers, the file most likely has
    no header, and its first data row was read as one (two equal values there were "a column named
    twice"; scoring found every column missing): a note that says so, else "". Only a hint: numbers
    are names in some tables."""
    if not _mostly_numbers(names):
        return ""
    return (f"its first line, {_first_fields(names)}, looks like data: is the header row missing? add a first line "
            f"naming the columns")


def headerless_hint(names: Sequence[str]) -> str:
    """headerless_note in parentheses, to follow an error's own words; else ""."""
    note = headerless_note(names)
    return f" ({note})" if note else ""


def _mostly_numbers(names: Sequence[str]) -> bool:
    return len(names) >= 2 and 2 * sum(_number(name) is not None for name in names) >= len(names)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _first_fields(names: Sequence[str], shown: int = 4) -> str:
    # Each cut short: in a file without its header, a "name" is a value, and may be a long text.
    fields = [name if len(name) <= 40 else name[:40] + "..." for name in names[:shown]]
    return ", ".join(fields) + (", ..." if len(names) > shown else "")


def check_first_line(path: Path, table: pa.Table) -> None:
    """Refuse a CSV whose header is most likely its first data row: the header row was lost, and a
    bundle trained so names its columns by one row's values, which no later file has. Most of the
    names are numbers, and nearly every one could be a value of its column (_could_be_value). Sure
    where one is a fraction ('70.62865110546697') or a text that its column holds ('B', 'False'): no
    one names columns so. Where every such name is a whole number it may be a name (a year, a
    wavelength), so it only warns. Checked only where most names are numbers: nothing to do
    otherwise."""
    names = table.column_names
    if not _mostly_numbers(names):
        return
    fitting = [name for name, column in zip(names, table.columns) if _could_be_value(name, column)]
    if len(names) - len(fitting) > len(names) // 10:
        return
    sure = any(not _WHOLE_NUMBER.fullmatch(name) for name in fitting if name.strip())
    if sure:
        raise DataError(f"{path}: its first line ({_first_fields(names)}) looks like data, not a header: is the header "
                        f"row missing? add a first line naming the columns")
    log.warning("%s: its header (%s) could be a line of data, each a number within its column's range: if the header "
                "row is missing, add a first line naming the columns; if these are the columns' names, ignore this",
                path, _first_fields(names))


_WHOLE_NUMBER = re.compile(r"\s*[+-]?\d+\s*")


def _could_be_value(name: str, column: pa.ChunkedArray) -> bool:
    """Whether a header's ``name`` could be one of ``column``'s values (the rows under it, as read):
    a number within the column's range widened by its width on each side (the first row of a file is
    rarely its extreme, but may be: an id counting from 0), a text the column holds, a boolean or a
    date a boolean or date column reads, or a blank where the column has blanks."""
    kind = column.type
    if not name.strip():
        return column.null_count > 0
    if pa.types.is_null(kind):
        return True
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        value, (low, high) = _number(name), pc.min_max(column).values()
        if value is None or low.as_py() is None:
            return value is not None
        width = high.as_py() - low.as_py()
        return low.as_py() - width <= value <= high.as_py() + width
    if _is_text(kind):
        return pc.index(column, name).as_py() >= 0
    try:
        pa.scalar(name).cast(kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return True


def iter_batches(path: str | Path, numeric: list[str], text: list[str], passthrough: list[str],
                 batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Stream a table in chunks of at most ``batch_rows`` rows with the given column types.

    ``numeric`` columns come as float64 (missing -> null); ``text`` columns (categories, a label)
    and ``passthrough`` columns (identifiers) as strings, verbatim from a CSV so leading zeros
    survive, so outputs of CSV and Parquet inputs share one schema. The null markers ("", "NA",
    "nan", "null", ...) are missing in ``text`` columns, as training reads them; in ``passthrough``
    columns they are kept as written, since ids join the scores back to their rows: an id "NA"
    came out null, and so did "nan", "null" and an empty one, rows no one could find again. A CSV
    holds text and no null, so its empty id is "", as a Parquet file's "" is; a Parquet null stays
    null. Memory stays bounded by a few chunks whatever the file size. A value that is not a number
    in a numeric column raises a DataError naming the column and the row.
    """
    path = check_input_file(path)
    if table_format(path) == "parquet":
        source = pq.ParquetFile(path)
        target = pa.schema([(c, pa.float64()) for c in numeric] + [(c, pa.string()) for c in text + passthrough])
        rows_before = 0
        for batch in source.iter_batches(batch_size=batch_rows, columns=numeric + text + passthrough):
            yield _cast_batch(batch, target, path, rows_before, set(passthrough))
            rows_before += batch.num_rows
        return
    types = {c: pa.float64() for c in numeric} | {c: pa.string() for c in text + passthrough}
    try:
        for batch in _stream_csv(path, types, numeric + text + passthrough, passthrough):
            for start in range(0, batch.num_rows, batch_rows):
                yield batch.slice(start, batch_rows)
    except pa.ArrowInvalid as exc:
        raise structure_error(path, exc) or _diagnose_csv_error(path, numeric, exc) from exc
    except PipelineError:
        raise
    except OSError as exc:  # an I/O error: raised bare, it named no file
        raise InputFileError(f"{path}: could not be read as csv: {one_line(exc)}") from exc


def _cast_batch(batch: pa.RecordBatch, target: pa.Schema, path: Path, rows_before: int,
                verbatim: set[str]) -> pa.RecordBatch:
    """The batch in ``target``'s types; text in the ``verbatim`` columns is kept as stored."""
    columns = []
    for field_ in target:
        column = batch.column(field_.name)
        if pa.types.is_dictionary(column.type):
            # pandas categories written to Parquet: the values count, not the encoding, as in training.
            column = column.dictionary_decode()
        if pa.types.is_decimal(column.type) and field_.name not in verbatim:
            column = _plain_decimals(column)  # as training reads them; an id keeps its text as stored
        if _is_text(column.type) and field_.name not in verbatim:
            column = missing_as_null(column)
        if column.type == field_.type:
            columns.append(column)
        elif _is_text(field_.type):
            columns.append(_as_text(column, field_, path))
        else:
            columns.append(_as_numbers(column, field_, path, rows_before))
    return pa.RecordBatch.from_arrays(columns, schema=target)


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


# The CSV reader's spellings of a missing value ("", "NA", "null", "nan", ...), as is_in's value set
# (it takes a large_string column too).
_MISSING_SPELLINGS = pa.array(pacsv.ConvertOptions().null_values, pa.string())


def missing_as_null(text: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A Parquet text column with the CSV reader's spellings of a missing value as missing.

    A CSV's 'NA' or 'nan' is missing in every column; the same text in a Parquet column was a
    category 'nan' (numpy's astype(str) writes NaN so), or refused in a column of numbers stored
    as text at training while scoring took it: the same table trained and scored differently as
    CSV and as Parquet.
    """
    spelled = pc.is_in(text, value_set=_MISSING_SPELLINGS)
    return pc.if_else(spelled, pa.scalar(None, text.type), text)


def _as_text(column: pa.Array, field_: pa.Field, path: Path) -> pa.Array:
    try:
        return category_strings(column)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(f"{path}: column {field_.name!r} must hold one category or id per row (text or a number) "
                        f"but holds {column.type} values; store it as text") from None


def _as_numbers(column: pa.Array, field_: pa.Field, path: Path, rows_before: int) -> pa.Array:
    if pa.types.is_boolean(column.type):
        # Training reads a true/false column as categories, and a CSV's 'true' in a numeric column
        # is refused: read as 0/1 here, it scored against a numeric range it never had.
        raise DataError(f"{path}: column {field_.name!r} must be numeric but holds booleans (true/false), which "
                        f"vaeguard reads as categories, never as numbers; store it as numbers (e.g. 0/1)")
    if _is_text(column.type):
        return _text_as_numbers(column, field_, path, rows_before)
    try:
        # An integer beyond 2**53 rounds to the nearest float, as training's pandas reads it: the
        # scorer computes in float32 anyway. A safe cast refused the whole column as "not numeric".
        return column.cast(field_.type, safe=not pa.types.is_integer(column.type))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(f"{path}: column {field_.name!r} must be numeric but holds {column.type} values; "
                        f"store it as numbers") from None


def _text_as_numbers(column: pa.Array, field_: pa.Field, path: Path, rows_before: int) -> pa.Array:
    text = column.cast(pa.string())
    # The spaces and tabs the CSV reader trims around a number (training's pandas takes them too):
    # ' 1.5' stored as text was refused here, and read in the same file as a CSV.
    text = pc.utf8_trim(text, characters=" \t")
    try:
        return text.cast(field_.type)
    except pa.ArrowInvalid:
        pass
    # Only on failure: find the first value the cast refuses, one at a time, to name its row.
    for row, value in enumerate(text.to_pylist()):
        try:
            pa.array([value], pa.string()).cast(field_.type)
        except pa.ArrowInvalid:
            raise DataError(f"{path}: column {field_.name!r} must be numeric but row {rows_before + row + 1} "
                            f"holds {value!r}; fix or blank out that value") from None
    raise DataError(f"{path}: column {field_.name!r} must be numeric but could not be read as numbers; "
                    f"store it as numbers")


def category_strings(column: pa.Array) -> pa.Array:
    """Categories as strings, spelled as training spelled them (integral floats without '.0').

    NaN is missing (null), as training reads it: its table goes through pandas, where NaN and
    null are one value. Left as NaN it broke the integral cast below, or became a category 'nan'.
    """
    if pa.types.is_floating(column.type):
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
        values = column.to_numpy(zero_copy_only=False)
        finite = values[~np.isnan(values)]
        if finite.size and np.all(finite == np.round(finite)):
            column = column.cast(pa.int64())
    return column.cast(pa.string())


def _diagnose_csv_error(path: Path, numeric: list[str], exc: Exception) -> DataError:
    """Arrow's conversion error names a column index; re-scan the raw bytes to name the column and row."""
    row_offset = 0
    try:
        # As bytes, so that a value that is not even UTF-8 is found too.
        for batch in _stream_csv(path, {c: pa.binary() for c in numeric}, numeric):
            for name in numeric:
                bad = _first_non_number(batch.column(name))
                if bad is not None:
                    row = row_offset + bad + 1
                    return DataError(
                        f"{path}: column {name!r} must be numeric but row {row} (line {line_of_row(path, row)}) "
                        f"holds {_shown(batch.column(name)[bad].as_py())}; fix or blank out that value"
                    )
            row_offset += batch.num_rows
    except PipelineError:
        raise  # what the re-read found is the better message (a quote never closed, say)
    except (pa.ArrowInvalid, OSError):
        pass  # raised bare from the handler of the first error, an I/O error named no file
    return DataError(f"{path}: could not be parsed: {one_line(exc)}")


def _shown(value: bytes) -> str:
    try:
        return repr(value.decode("utf-8"))
    except UnicodeDecodeError:
        return f"{value!r} (not UTF-8)"


def _first_non_number(raw: pa.Array) -> int | None:
    """Position of the first value pyarrow's CSV reader would not read as a number, or None.

    pyarrow's own cast judges (after trimming the spaces and tabs its CSV reader trims), so a
    value it refused is found even where pandas would have taken it ('\\v1.5'), and so is one that
    is not UTF-8; a binary search over slices finds the first.
    """
    def parses(start: int, stop: int) -> bool:
        try:
            pc.utf8_trim(raw.slice(start, stop - start).cast(pa.string()), characters=" \t").cast(pa.float64())
            return True
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return False

    if parses(0, len(raw)):
        return None
    low, high = 0, len(raw)  # the first bad value lies in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        if parses(low, middle):
            low = middle
        else:
            high = middle
    return low


def estimate_rows(path: str | Path) -> int | None:
    """Rows in a table, for a progress bar's ETA: exact for Parquet, from the first MB for CSV."""
    path = Path(path)
    try:
        if table_format(path) == "parquet":
            return pq.ParquetFile(path).metadata.num_rows
        if _is_gzip(path):
            return None  # the compressed size says little about the rows: a bar without an ETA
        with open(path, "rb") as handle:
            head = handle.read(1 << 20)
        lines = head.count(b"\n")
        return max(int(path.stat().st_size / (len(head) / lines)) - 1, 0) if lines > 1 else None
    except (OSError, pa.ArrowInvalid):
        return None
