"""Where in a CSV a parse error is, as an editor numbers lines, and how to fix it.

pyarrow's CSV errors say what went wrong but not where a person would look: "Expected 3
columns, got 4" gives the line's text, not its number, and its row numbers skip the line breaks
inside quoted fields and blank lines. These helpers run only once a read has failed, so they may
read the file again.
"""

from __future__ import annotations

import csv
import gzip
import re
from pathlib import Path

from pipeline.errors import InputFileError, one_line

SCAN_BLOCK = 1 << 24  # bytes per read when looking for a line
_FIELD_COUNT = re.compile(r"Expected (\d+) columns, got (\d+): (.*)", re.S)


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def structure_error(path: Path, exc: Exception) -> InputFileError | None:
    """The error to raise for a CSV whose structure pyarrow refused, or None for other errors."""
    message = str(exc)
    fields = _FIELD_COUNT.search(message)
    if fields:
        expected, got, text = int(fields.group(1)), int(fields.group(2)), fields.group(3).rstrip("\r\n")
        # A ';'-separated file whose decimal commas split its rows: the header is the cause, not
        # that line, and "quote the fields that hold commas" sent the user the wrong way.
        other = separator_error(path, [_first_line(path)]) if expected == 1 else None
        if other:
            return other
        line = line_holding(path, text)
        where = f"line {line}" if line else "a line"
        return InputFileError(f"{path}: {where} has {got} fields where the header has {expected}: {text[:80]!r}; "
                              f"quote the fields that hold commas, or fix that line")
    if "Empty CSV file" in message:
        return InputFileError(f"{path}: has no data rows; expected a header row and data rows")
    if isinstance(exc, UnicodeDecodeError):  # pyarrow decodes column names in Python
        return InputFileError(f"{path}: its header holds text that is not UTF-8 ({one_line(exc)}); save the file "
                              f"as UTF-8")
    if "invalid UTF8" in message:
        return InputFileError(f"{path}: holds text that is not UTF-8 ({one_line(exc)}); save the file as UTF-8")
    return None


def separator_error(path: Path, names: list[str]) -> InputFileError | None:
    """The error for a header that is one column holding another separator, or None."""
    if len(names) != 1:
        return None
    separator = next((s for s in (";", "\t", "|") if s in names[0]), None)
    if separator is None:
        return None
    # Read as CSV, "a;b;c" is one text column: training would learn nothing from it.
    return InputFileError(f"{path}: the header is a single column, {names[0][:60]!r}; the file looks separated by "
                          f"{separator!r}, but vaeguard reads comma-separated files; save it with commas")


def _first_line(path: Path) -> str:
    with _open_bytes(path) as handle:
        return handle.readline().decode("utf-8", "replace").removeprefix("\ufeff").rstrip("\r\n")


def line_holding(path: Path, text: str) -> int | None:
    """The 1-based number of the first line that is exactly ``text``, or None if no line is."""
    needle = b"\n" + text.encode() + b"\n"
    # A newline put before the file lets the first line match too; it is not counted.
    newlines_before, window_head = -1, b"\n"
    with _open_bytes(path) as handle:
        while block := handle.read(SCAN_BLOCK):
            window = (window_head + block).replace(b"\r\n", b"\n")
            found = window.find(needle)
            if found >= 0:
                return newlines_before + window.count(b"\n", 0, found + 1) + 1
            # Keep the end that a match could still start in (one byte more, for a "\r" whose "\n"
            # opens the next block); its newlines are counted next time.
            keep = min(len(window), len(needle))
            newlines_before += window.count(b"\n", 0, len(window) - keep)
            window_head = window[len(window) - keep:]
        window = window_head + b"\n"  # the last line may lack its newline
        found = window.find(needle)
        if found >= 0:
            return newlines_before + window.count(b"\n", 0, found + 1) + 1
    return None


def line_of_row(path: Path, row: int) -> int:
    """The line on which data row ``row`` (1-based, header not counted) starts.

    row + 1, unless quoted fields above it hold line breaks or blank lines come before it, which
    pyarrow's row count does not see; Python's csv reader counts physical lines.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as handle:
            reader, records, start = csv.reader(handle), -1, 1  # record 0 is the header
            for fields in reader:
                if fields:  # pyarrow skips empty lines, so they are not rows
                    records += 1
                    if records == row:
                        return start
                start = reader.line_num + 1
    except (csv.Error, OSError):
        pass  # a field past csv's size limit, say: the plain count is the best guess left
    return row + 1
