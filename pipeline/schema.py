"""Which column is what: features (numeric or categorical), identifiers, the label.

Inferred from the training table and validated there, at the boundary, so every later step
can trust its input. Messages name the file, the column and the (1-based) data row.
"""

from __future__ import annotations

import difflib
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import PreprocessConfig
from pipeline.contract import OUTPUT_NAMES, SOURCE_COLUMN
from pipeline.csv_errors import line_of_row
from pipeline.errors import DataError
from pipeline.tables import category_strings, headerless_note

log = logging.getLogger("vaeguard")

# Share of values that must parse as numbers before a text column counts as numeric with a
# few bad cells (an error worth naming) rather than as a categorical column.
_NUMERIC_TEXT_SHARE = 0.9


@dataclass(frozen=True)
class TableSchema:
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    id_columns: tuple[str, ...] = ()
    label_column: str | None = None
    dropped: tuple[tuple[str, str], ...] = ()  # (column, why)

    @property
    def feature_columns(self) -> tuple[str, ...]:
        return self.numeric + self.categorical

    def to_dict(self) -> dict:
        return {
            "numeric": list(self.numeric),
            "categorical": list(self.categorical),
            "id_columns": list(self.id_columns),
            "label_column": self.label_column,
            "dropped": [{"column": c, "reason": r} for c, r in self.dropped],
        }

    @classmethod
    def from_dict(cls, raw: dict) -> "TableSchema":
        return cls(
            numeric=tuple(raw["numeric"]),
            categorical=tuple(raw["categorical"]),
            id_columns=tuple(raw["id_columns"]),
            label_column=raw["label_column"],
            dropped=tuple((d["column"], d["reason"]) for d in raw["dropped"]),
        )


def infer_schema(frame: pd.DataFrame, *, source: str, config: PreprocessConfig,
                 label_column: str | None = None, id_columns: tuple[str, ...] = ()) -> TableSchema:
    """Classify every column of a training table, failing on columns that can't be used."""
    for name in (*id_columns, *([label_column] if label_column else [])):
        if name not in frame.columns:
            option = "--label-column" if name == label_column else "--id-columns"
            raise DataError(f"{source}: column {name!r} was named by {option} but is not in the file "
                            f"({_nearest_columns(name, frame.columns)}); correct the name in {option}")
    for key in ("categorical_columns", "numeric_columns"):
        for name in getattr(config, key):
            if name not in frame.columns:
                raise DataError(
                    f"{source}: the config's preprocess.{key} names column {name!r}, which is not in the file "
                    f"({_nearest_columns(name, frame.columns)}); correct the name in the config file "
                    f"(--config), or remove it from preprocess.{key}")
    check_id_names(id_columns, source, several_inputs=True)

    trailing = _trailing_separator_column(frame)
    if trailing is not None:
        log.info("%s: ignoring column %d, which has no name and no values (every line ends with a separator)",
                 source, len(frame.columns))
    unnamed = [position for position, name in enumerate(frame.columns, start=1)
               if not str(name).strip() and position != trailing]
    if unnamed:
        # A pandas index written with to_csv() looks so: a row counter, learned as a feature that every
        # later batch lies beyond, and one that neither --id-columns nor the config can name.
        index_hint = (" (and pass it as --id-columns if it is a row number, as a pandas index written by "
                      "to_csv() is), or leave it out of the file (to_csv(index=False))") if unnamed[0] == 1 else \
            ", or leave it out of the file"
        raise DataError(f"{source}: column {unnamed[0]} has no name in the header; name it{index_hint}")
    numeric, categorical, dropped = [], [], []
    for position, name in enumerate(frame.columns, start=1):
        if name in id_columns or name == label_column or position == trailing:
            continue
        column = frame[name]
        if column.isna().all():
            raise DataError(
                f"{source}: column {name!r} is empty (all values missing); drop it from the file "
                f"or fill it"
            )
        kind = _column_kind(column, name, config, source)
        # A numeric column with one value and blanks (an error code, a flag set only on some rows)
        # carries its signal in which rows are blank: it stays, and its missing indicator learns that.
        distinct = column.nunique(dropna=kind == "numeric") + int(kind == "numeric" and bool(column.isna().any()))
        if distinct <= 1:
            dropped.append((name, "constant"))
        elif kind == "numeric":
            numeric.append(name)
        else:
            categorical.append(name)
    if not numeric and not categorical:
        raise DataError(f"{source}: no usable feature columns; every column is an id, the label, or constant")
    for name in numeric:
        column = frame[name]
        # Numbers stored as text (a Parquet string column) are judged as the numbers they become.
        _warn_if_sequence(column if pd.api.types.is_numeric_dtype(column) else pd.to_numeric(column, errors="coerce"),
                          name, source)
    return TableSchema(tuple(numeric), tuple(categorical), tuple(id_columns), label_column, tuple(dropped))


def _trailing_separator_column(frame: pd.DataFrame) -> int | None:
    """The position of a last column without name or values: what a separator at the end of every
    line (header included) makes, which is no column anyone wrote. None where there is none."""
    if len(frame.columns) < 2 or str(frame.columns[-1]).strip() or not frame.iloc[:, -1].isna().all():
        return None
    return len(frame.columns)


_COLUMNS_SHOWN = 20


def _nearest_columns(name: str, columns) -> str:
    """The file's column nearest ``name`` (as 'did you mean'), else the columns it has: a long header
    listed whole buries the one name that was meant."""
    names = [str(c) for c in columns]
    alike = {c.strip().casefold(): c for c in names}  # 'Pressure ' for 'pressure': hard to see in a list
    nearest = alike.get(name.strip().casefold()) or next(iter(difflib.get_close_matches(name, names, n=1)), None)
    if nearest is not None:
        return f"did you mean {nearest!r}?"
    shown = ", ".join(map(repr, names[:_COLUMNS_SHOWN]))
    return headerless_note(names) or (f"its columns are {shown}" + (
        f" and {len(names) - _COLUMNS_SHOWN} more" if len(names) > _COLUMNS_SHOWN else ""))


def check_id_names(id_columns: tuple[str, ...] | list[str], where: str, *, several_inputs: bool,
                   bundle: str | None = None) -> None:
    """Id columns are copied into the scores beside vaeguard's own columns (and ``source`` when one
    file holds several inputs): one named like those would give the scores two columns of one name,
    which a Parquet reader refuses (pandas: "Multiple matches for FieldRef.Name"), and a CSV reader
    renames or confuses. Training refuses them for any later run; scoring, for a bundle made before
    that, refuses to write such a file. ``bundle`` names it at scoring, which then says to retrain."""
    taken = (*((SOURCE_COLUMN,) if several_inputs else ()), *OUTPUT_NAMES)
    clashes = [name for name in id_columns if name in taken]
    if not clashes:
        return
    name = clashes[0]
    fix = "rename that column in the file, or leave it out of --id-columns"
    if bundle is not None:
        fix = (f"retrain bundle {bundle!r} with that column renamed in its training file, or without it in "
               f"--id-columns" + ("; or score each input into its own output" if name == SOURCE_COLUMN else ""))
    written = ", ".join(OUTPUT_NAMES) + (f", and {SOURCE_COLUMN} when one output holds several inputs"
                                         if several_inputs else "")
    raise DataError(f"{where}: id column {name!r} has the name of a column vaeguard writes into the scores "
                    f"({written}), which would then hold two columns named {name!r}; {fix}")


# Fewer rows than this prove nothing: a short table can be sorted by a real measurement.
_SEQUENCE_MIN_ROWS = 100
# A column that never falls is a date or a clock only with this many values: a setting raised twice
# over the file is none, while a week of dates written as numbers (20240301) is one.
_SEQUENCE_MIN_DISTINCT = 7


def _warn_if_sequence(column: pd.Series, name: str, source: str) -> None:
    """Warn about a feature that rises on every row, like a row id, or never falls over the file,
    like a date with many rows per day (20240301 as a number) or a running count.

    Its training range ends where training data ends, so every later batch lies beyond it and
    scores as anomalous: a forgotten --id-columns makes the whole next night's file an alarm.
    A file sorted by a real measurement warns too; that is rare, and the warning says so.
    """
    values = column.dropna()
    # Monotonic first: one vectorised pass that fails fast, before is_unique's hashing.
    if len(values) < _SEQUENCE_MIN_ROWS or not values.is_monotonic_increasing:
        return
    if values.is_unique:
        log.warning("%s: column %r rises on every row, like an id or a timestamp; as a feature, later "
                    "rows fall outside its training range and score as anomalies. If it is an id, pass "
                    "--id-columns %s; if it is a time, leave it out or give its cyclic parts instead",
                    source, name, shlex.quote(name))
    elif (distinct := values.nunique()) >= _SEQUENCE_MIN_DISTINCT:
        log.warning("%s: column %r never falls over the file (%s distinct values in %s rows), like a date, a "
                    "timestamp or a running count; as a feature, later rows fall outside its training range and "
                    "score as anomalies. If it is a date or time, leave it out or derive numeric features from it "
                    "(e.g. day of week); if it is an id, pass --id-columns %s; if the file is only sorted by "
                    "this measurement, ignore this", source, name, f"{distinct:,}", f"{len(values):,}",
                    shlex.quote(name))


def _column_kind(column: pd.Series, name: str, config: PreprocessConfig, source: str) -> str:
    if name in config.categorical_columns:
        return "categorical"
    inferred = pd.api.types.infer_dtype(column, skipna=True)
    # True/False stored as objects (a nullable bool written without pandas metadata) count too.
    if pd.api.types.is_bool_dtype(column) or inferred == "boolean":
        if name in config.numeric_columns:
            # Read as 0/1 here, scoring would have to take true/false as numbers, where a CSV's 'true'
            # in a numeric column is refused: one rule for both, booleans are categories.
            raise DataError(f"{source}: config lists column {name!r} in numeric_columns, but it holds booleans "
                            f"(true/false), which vaeguard reads as categories; remove it from numeric_columns, "
                            f"or store it as numbers (e.g. 0/1)")
        return "categorical"
    if pd.api.types.is_integer_dtype(column):
        if name in config.numeric_columns:
            return "numeric"
        return "categorical" if column.nunique() <= config.max_integer_categories else "numeric"
    if pd.api.types.is_float_dtype(column):
        return "numeric"
    # Dates and times are refused, not guessed at: to_numeric below would turn them into
    # nanosecond counts, and as a feature a time's training range ends where training data ends,
    # so every later row would score as an anomaly; as categories each date would be new.
    # Written as text, they are the same: pyarrow's CSV reader types ISO dates alone, and a Parquet
    # text column none, so 01/03/2024 trained as a category that every later night's date missed.
    kind = _typed_date_or_time(column, inferred)
    if kind is not None:
        raise _date_or_time_error(source, name, kind, column.dropna().iloc[0])
    text = _text_values(column)
    if (dates := _dates_in_text(text)) is not None:
        raise _date_or_time_error(source, name, *dates)
    integers = _integers_in_text(text)
    if integers is not None and name not in config.numeric_columns:
        # Integer codes stored as text (a Parquet string column) are judged as the CSV reader's
        # integers of the same text are: as numbers stored as text, they trained as numeric in a
        # Parquet file and as categories in a CSV.
        return "categorical" if len(pc.unique(integers)) <= config.max_integer_categories else "numeric"
    # Text or objects: numeric if nearly every value parses as a number (then the rest are typos to
    # report). Every value may parse (decimals, numbers stored as text): numeric, nothing to report.
    parsed = pd.to_numeric(column, errors="coerce")
    present = column.notna()
    if name in config.numeric_columns or parsed[present].notna().mean() >= _NUMERIC_TEXT_SHARE:
        bad = np.flatnonzero((parsed.isna() & present).to_numpy())
        if len(bad):
            row = int(bad[0])
            # Most values being numbers makes the column numeric; a column of codes with one letter
            # among them ('L' among sizes 1..50) is categorical, which only the config can say.
            if name in config.numeric_columns:
                # The config, not the data, made it numeric: a column of words is most likely named there by mistake.
                raise DataError(
                    f"{source}: column {name!r} must be numeric, as the config's preprocess.numeric_columns says, but "
                    f"{_where(source, row + 1)} holds {column.iloc[row]!r}; fix or blank out that value, or remove "
                    f"{name!r} from preprocess.numeric_columns in the --config file")
            raise DataError(
                f"{source}: column {name!r} must be numeric but {_where(source, row + 1)} holds {column.iloc[row]!r}; "
                f"fix or blank out that value, or, if {name!r} holds categories, name it in the --config file: "
                f"preprocess: {{categorical_columns: [{name}]}}"
            )
        return "numeric"
    return "categorical"


def _typed_date_or_time(column: pd.Series, inferred: str) -> str | None:
    """What a column of date or time values holds, in words; None for any other column."""
    if pd.api.types.is_datetime64_any_dtype(column) or inferred in ("datetime64", "datetime"):
        return "timestamps"
    if inferred == "date":  # datetime.date objects: a CSV's ISO dates, a Parquet date32
        return "dates"
    if inferred == "time":  # a CSV's 06:00, a Parquet time64
        return "times of day"
    if pd.api.types.is_timedelta64_dtype(column) or inferred in ("timedelta64", "timedelta"):
        return "durations"
    if isinstance(column.dtype, pd.PeriodDtype) or inferred == "period":
        return "periods"
    return None


# Dates and times written as text, in the shapes that exports write: what pyarrow's CSV reader
# types as dates, timestamps and times (so that a Parquet text column of them is judged as the same
# CSV's), and the day-month-year orders it leaves as text (01/03/2024, 1.3.2024, 01-Mar-2024,
# Mar 1, 2024), with a time of day or not. Strict on purpose: a year has four digits (two only in
# d/m/yy), day and month are in range, so codes ('2024A'), versions ('1.2.3', '1.2.10') and ratios
# ('1:10') are no dates. A year and month alone ('2024-03') and a date as a number (20240301) are
# not taken: codes are written so too.
_DAY = r"(?:0?[1-9]|[12][0-9]|3[01])"
_MONTH = r"(?:0?[1-9]|1[0-2])"
_YEAR = r"[12][0-9]{3}"
_MONTH_NAME = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"
_SECONDS = r"(?::[0-5][0-9](?:[.,][0-9]+)?)?"
_CLOCK = rf"(?:[01]?[0-9]|2[0-3]):[0-5][0-9]{_SECONDS}(?: ?[ap]\.?m\.?)?(?: ?(?:z|utc|gmt|[+-][0-9]{{2}}:?[0-9]{{2}}))?"
_DATE = (rf"(?:(?:mon|tue|wed|thu|fri|sat|sun)[a-z]*\.?,? )?"
         rf"(?:{_YEAR}[-/.]{_MONTH}[-/.]{_DAY}|{_DAY}[-/.]{_DAY}[-/.]{_YEAR}|{_DAY}/{_DAY}/[0-9]{{2}}"
         rf"|{_DAY}[- ]{_MONTH_NAME}[- ,]+{_YEAR}|{_MONTH_NAME} {_DAY}(?:st|nd|rd|th)?,? {_YEAR})")
# A time of day alone has two-digit hours, as the CSV reader asks ('06:00'), or says am/pm ('6:00 pm').
_TIME = rf"(?:(?:[01][0-9]|2[0-3]):[0-5][0-9]{_SECONDS}|(?:[01]?[0-9]):[0-5][0-9]{_SECONDS} ?[ap]\.?m\.?)"
_DATE_OR_TIME_TEXT = rf"^[ \t]*(?:{_DATE}(?:(?:[ T]|, ){_CLOCK})?|{_TIME})[ \t]*$"
_TIME_TEXT = re.compile(rf"[ \t]*{_TIME}[ \t]*", re.IGNORECASE)
# Share of a text column's values that must be dates for it to count as dates: a column of dates
# with the odd typo or 'unknown' among them is one all the same.
_DATE_TEXT_SHARE = 0.9


def _dates_in_text(text: pa.Array | None) -> tuple[str, str] | None:
    """What a text column holds in words, and its first such value, where nearly all its present
    values (_text_values) are dates or times written in one of the shapes above; None otherwise."""
    if text is None or len(text) == 0:
        return None
    # One pass of RE2 over the column, about 70 ms a million values.
    matched = pc.match_substring_regex(text, _DATE_OR_TIME_TEXT, ignore_case=True)
    if pc.sum(matched).as_py() < _DATE_TEXT_SHARE * len(text):
        return None
    example = text[pc.index(matched, True).as_py()].as_py()
    return ("times of day" if _TIME_TEXT.fullmatch(example) else "dates") + " written as text", example


def _date_or_time_error(source: str, name: str, kind: str, example: object) -> DataError:
    """Dates can't be features: each new day lies beyond training's (as a number) or is a category it
    never saw (as text), so every later row would score as an anomaly. Numbers derived from them can."""
    if kind.startswith("times of day"):
        why, fix = "", (f"derive a number from it (e.g. hour of day), pass it as --id-columns {shlex.quote(name)}, or leave it out "
                        f"of the file; if it holds a few times that recur (a shift's start), name it in the --config "
                        f"file: preprocess: {{categorical_columns: [{name}]}}")
    elif kind == "durations":
        why, fix = "", (f"convert it to a number (e.g. seconds), pass it as --id-columns {shlex.quote(name)}, or leave it out "
                        f"of the file")
    else:
        why = ": later rows hold dates that training never saw, so all of them would score as anomalies"
        fix = (f"leave it out of the file, derive numeric features from it (e.g. day of week, hour of day), "
               f"or pass it as --id-columns {shlex.quote(name)}")
    return DataError(f"{source}: column {name!r} holds dates or times ({kind}, e.g. {str(example)!r}), which cannot "
                     f"be a feature{why}; {fix}")


def _where(source: str, row: int) -> str:
    """Data row ``row`` (1-based), and in a CSV file its line, as scoring names the same cell: an editor
    goes to a line, which quoted line breaks or blank lines above it move."""
    path = Path(source)
    if path.name.lower().endswith((".csv", ".csv.gz")) and path.is_file():
        return f"row {row} (line {line_of_row(path, row)})"
    return f"row {row}"


# An integer as pyarrow's CSV reader takes it (it trims spaces and tabs, and keeps '007' as 7).
# Not preprocess's rule for integer-coded categories, which takes pandas' '3.0' and not '007'.
_CSV_INTEGER_TEXT = r"^[ \t]*-?[0-9]+[ \t]*$"


def _text_values(column: pd.Series) -> pa.Array | None:
    """The present values of a text column as one Arrow string array; None for any other column."""
    try:
        text = pa.array(column.dropna(), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None  # objects of mixed types: not one text column
    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks()
    return text if pa.types.is_string(text.type) or pa.types.is_large_string(text.type) else None


def _integers_in_text(text: pa.Array | None) -> pa.Array | None:
    """A text column's present values (_text_values) as integers, where the CSV reader would read every
    one as an int64; None otherwise (decimals, other text, integers beyond int64, not text at all)."""
    if text is None:
        return None
    if not pc.all(pc.match_substring_regex(text, _CSV_INTEGER_TEXT)).as_py():
        return None
    try:
        return pc.utf8_trim(text, characters=" \t").cast(pa.int64())
    except pa.ArrowInvalid:
        return None


def numeric_matrix(frame: pd.DataFrame, columns: tuple[str, ...], source: str) -> np.ndarray:
    """Numeric features as float32 with NaN for missing; infinities and values beyond float32 are an error."""
    if not columns:
        return np.zeros((len(frame), 0), dtype=np.float32)
    values = frame[list(columns)].to_numpy(dtype=np.float64, na_value=np.nan)
    check_finite(values, columns, source)
    return values.astype(np.float32)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_finite(values: np.ndarray, columns: tuple[str, ...] | list[str], source: str,
                 row_offset: int = 0) -> None:
    """Every value missing (NaN) or a finite float32. The scorer computes in float32, where a
    value like 1e300 becomes an infinity and its row's score NaN, which no threshold flags."""
    with np.errstate(invalid="ignore"):
        out_of_range = np.abs(values) > FLOAT32_MAX  # infinities too; NaN compares False
    if out_of_range.any():
        row, col = map(int, np.argwhere(out_of_range)[0])
        raise DataError(
            f"{source}: column {columns[col]!r} holds {values[row, col]} at {_where(source, row_offset + row + 1)}; "
            f"expected finite numbers within float32's range (|x| <= {FLOAT32_MAX:.3g}): replace it with "
            f"a number in range or leave the cell empty"
        )


def categorical_strings(frame: pd.DataFrame, columns: tuple[str, ...]) -> list[np.ndarray]:
    """Each categorical column as an array of str, missing as "" (as the ONNX scorer expects)."""
    return [as_category_array(pa.array(frame[name], from_pandas=True)) for name in columns]


def as_category_array(column: pa.Array) -> np.ndarray:
    """An object array of str, missing as "". Built from the column's distinct values, so a
    category is one Python str shared by its cells, not one per cell: half the time on 1M rows."""
    if isinstance(column, pa.ChunkedArray):  # pa.array gives one for some pandas string dtypes
        column = column.combine_chunks()
    encoded = pc.dictionary_encode(category_strings(column).fill_null(""))
    return np.asarray(encoded.dictionary.to_pylist(), dtype=object)[encoded.indices.to_numpy()]


def label_vector(frame: pd.DataFrame, label_column: str, source: str) -> np.ndarray:
    """The label as 0/1 ints; anything but 0/1 (or false/true, as numbers, booleans or text) is an error.

    Judged on its text, as scoring judges it (scored_labels): a Parquet label stored as text '0'/'1'
    was refused with "holds '0', '1'; recode it to 0/1", and 'true'/'false' taken by one and not the other.
    """
    column = frame[label_column]
    if column.isna().any():
        row = int(np.flatnonzero(column.isna().to_numpy())[0])
        # Marking the anomalies alone is a common way to label: say what the blanks must become.
        only_anomalies = {_label_meaning(v) for v in column.dropna().astype(str).unique()} == {1.0}
        raise DataError(
            f"{source}: label column {label_column!r} is missing a value at {_where(source, row + 1)}; "
            f"expected 0 (normal) or 1 (anomaly) on every row"
            + ("; only anomalies (1) are labelled: fill the other rows with 0 if they are normal"
               if only_anomalies else "")
        )
    text = column.astype(str)
    meanings = {value: _label_meaning(value) for value in text.unique()}
    bad = sorted(repr(value) for value, meaning in meanings.items() if meaning is None)
    if bad:
        raise DataError(
            f"{source}: label column {label_column!r} must be binary (0 = normal, 1 = anomaly) but "
            f"holds {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; recode it to 0/1"
        )
    return text.map(meanings).to_numpy().astype(int)


# A label as text (a CSV's as written, a Parquet column's through category_strings) and what it
# means: the values training's label_vector takes, in the spellings its CSV reader reads as 0/1.
_LABEL_TEXT = {"0": 0.0, "1": 1.0, **dict.fromkeys(("false", "False", "FALSE"), 0.0),
               **dict.fromkeys(("true", "True", "TRUE"), 1.0)}
# A number as pyarrow's CSV reader reads one in a numeric column: ASCII digits only. Python's
# float() also took '0_1' (as 1) and '１' or '١' (other scripts' digits), which that very column refuses.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# The white space trimmed around a label: str.strip()'s, less the control characters it also strips
# (\x1c-\x1f, \x85: separators to it, not blanks to a person); the Node example's LABEL_SPACE_CHARS
# (examples/node/score.js), so that both runtimes take the same labels.
_LABEL_SPACE = "\t\n\v\f\r \u00a0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"


def scored_labels(column: pa.Array, label_column: str, source: str, row_offset: int = 0) -> np.ndarray:
    """The label of rows being scored, as text, to 0.0/1.0 with NaN where missing.

    Read as a number, a label of true/false failed ("must be numeric but row 1 holds 'false'") on
    the very file a bundle was trained on, where training takes it. Decided per distinct value.
    """
    encoded = pc.dictionary_encode(column)
    meanings = []
    for value in encoded.dictionary.to_pylist():
        meaning = _label_meaning(value)
        if meaning is None:
            row = row_offset + pc.index(column, value).as_py() + 1
            raise DataError(f"{source}: label column {label_column!r} must be 0 (normal) or 1 (anomaly) but row "
                            f"{row} holds {value!r}; recode it to 0/1, blank it out, or leave the column out")
        meanings.append(meaning)
    indices = encoded.indices.fill_null(len(meanings)).to_numpy(zero_copy_only=False)
    return np.array([*meanings, np.nan])[indices]


def _label_meaning(value: str) -> float | None:
    """0.0 or 1.0 for a label's text ('1', '1.0', 'true', ...), None for anything else."""
    text = value.strip(_LABEL_SPACE)
    meaning = _LABEL_TEXT.get(text)
    if meaning is not None:
        return meaning
    if not _DECIMAL.fullmatch(text):
        return None
    number = float(text)
    return number + 0.0 if number in (0.0, 1.0) else None  # + 0.0: '-0' means 0.0, not -0.0
