"""Where in a CSV a parse error is, as an editor numbers lines, and how to fix it.

pyarrow's CSV errors say what went wrong but not where a person would look: "Expected 3
columns, got 4" gives the line's text, not its number, and its row numbers skip the line breaks
inside quoted fields and blank lines. These helpers run only once a read has failed, so they may
read the file again; all but quote_may_be_open, which looks at the last bytes of every CSV read,
and finds most files fine without reading more, and not_csv_text_error, which looks at its first.
"""

from __future__ import annotations

import csv
import gzip
import re
import zlib
from pathlib import Path
from typing import NamedTuple

from pipeline.errors import InputFileError, one_line

SCAN_BLOCK = 1 << 24  # bytes per read when looking for a line
_FIELD_COUNT = re.compile(r"Expected (\d+) columns, got (\d+): (.*)", re.S)
_CONVERSION = re.compile(r"CSV conversion error to \w+: invalid value '(.*)'", re.S)
_QUOTE, _FIELD_ENDS, _BOM, _GZIP_MAGIC = 0x22, b",\n\r", b"\xef\xbb\xbf", b"\x1f\x8b"
# A quoted value's bytes, "" included, up to its closing quote (or to the end of the bytes).
_QUOTED_BODY = re.compile(rb'(?:[^"]++|"")*+')


# Files that are no CSV text, told by their first bytes: what the file is, and how to make it one.
# A CSV's header can't start so (control bytes, or bytes no UTF-8 text starts with), except for
# Parquet's, which a NUL byte after it tells from a column named "PAR1...".
_OTHER_FORMATS = (
    (b"PAR1", "a Parquet file (it starts with Parquet's PAR1 marker)", "name it .parquet"),
    (b"PK\x03\x04", "a zip archive, as an Excel .xlsx workbook is", "export the sheet as CSV UTF-8, or unzip it"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an Excel 97-2003 (.xls) workbook", "export the sheet as CSV UTF-8"),
    (b"\x1f\x8b", "gzip-compressed data", "name it .csv.gz, which vaeguard decompresses"),
)
_UTF_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
             (b"\xfe\xff", "UTF-16"))
_HEAD_BYTES = 4096


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
        # A quote never closed makes its row end with the file, short of fields.
        other = other or unclosed_quote_error(path)
        if other:
            return other
        line = line_holding(path, text)
        where = f"line {line}" if line else "a line"
        return InputFileError(f"{path}: {where} has {got} fields where the header has {expected}: {text[:80]!r}; "
                              f"quote the fields that hold commas, or fix that line")
    if "straddling object" in message:  # a row longer than the largest block: or a quote never closed
        return unclosed_quote_error(path)
    value = _CONVERSION.search(message)
    if value and ("\n" in value.group(1) or "\r" in value.group(1)):  # the lines after a quote never closed?
        return unclosed_quote_error(path)
    if "Empty CSV file" in message:
        return InputFileError(f"{path}: has no data rows; expected a header row and data rows")
    if isinstance(exc, UnicodeDecodeError):  # pyarrow decodes column names in Python
        return InputFileError(f"{path}: its header holds text that is not UTF-8 ({one_line(exc)}); save the file "
                              f"as UTF-8")
    if "invalid UTF8" in message:
        found = first_invalid_utf8(path)
        if found is None:
            return InputFileError(f"{path}: holds text that is not UTF-8 ({one_line(exc)}); save the file as UTF-8")
        where = (f"row {found.row} (line {found.line})" if found.row else f"line {found.line}") + (
            f", column {found.column!r}" if found.column is not None else "")
        return InputFileError(f"{path}: {where} holds text that is not UTF-8 ({found.shown}); save the file as UTF-8 "
                              f"(from Windows-1252 or Latin-1, as Excel and older exports write: iconv -f cp1252 -t "
                              f"utf-8, or pandas' encoding='cp1252' and to_csv)")
    return None


class InvalidUtf8(NamedTuple):
    """Where a CSV's first bytes that are not UTF-8 are: their line; the data row it is (None where
    quoted fields or blank lines above make the count uncertain, or on the header line); the
    header's name of their column (None where it can't be told); and the bytes among their
    neighbours, as text."""
    line: int
    row: int | None
    column: str | None
    shown: str


# The longest start of a line kept from one block to the next, so that a bad byte's column can be
# told wherever the blocks end; of a longer line it is not told.
_LINE_KEPT = 1 << 20
# Bytes shown on each side of the bad ones.
_SHOWN_AROUND = 20


def first_invalid_utf8(path: Path) -> InvalidUtf8 | None:
    """The first bytes of ``path`` that are not UTF-8 (InvalidUtf8), or None. pyarrow says only
    "CSV column #4", numbered from 0, and no line; this reads the file again, once it failed."""
    newlines, kept, line_whole, rows_plain = 0, b"", True, True
    with _open_bytes(path) as handle:
        while True:
            block = handle.read(SCAN_BLOCK)
            data = kept + block
            try:
                data.decode("utf-8")
                valid = len(data)
            except UnicodeDecodeError as exc:
                if not block or exc.reason != "unexpected end of data":
                    # What follows, for the neighbours shown, where the block ends soon after.
                    return _located(data + handle.read(_SHOWN_AROUND + 1), exc.start, exc.end, newlines,
                                    line_whole, rows_plain, path)
                valid = exc.start  # a character cut by the block's end: read on
            if not block:
                return None
            lines_end = data.rfind(b"\n", 0, valid) + 1
            cut = lines_end if len(data) - lines_end <= _LINE_KEPT else valid
            rows_plain = rows_plain and _plain_rows(data, cut)
            newlines += data.count(b"\n", 0, cut)
            line_whole = line_whole if cut == 0 else cut == lines_end
            kept = data[cut:]


def _plain_rows(data: bytes, end: int) -> bool:
    """``data[:end]``, which starts a line, holds no quote and no blank line (which pyarrow skips):
    each line in it is one row. With bytes.find: a regular expression made the scan 4 times as slow."""
    return (data.find(b'"', 0, end) < 0 and data.find(b"\n\n", 0, end) < 0 and data.find(b"\n\r\n", 0, end) < 0
            and not data.startswith((b"\n", b"\r\n")))


def _located(data: bytes, start: int, end: int, newlines: int, line_whole: bool, rows_plain: bool,
             path: Path) -> InvalidUtf8:
    """InvalidUtf8 for bad bytes at ``data[start:end]``, after ``newlines`` line breaks in the bytes
    before ``data``; ``line_whole``: ``data`` starts at a line's start; ``rows_plain``: the bytes
    before it hold no quote and no blank line."""
    line_start = data.rfind(b"\n", 0, start) + 1
    line = newlines + data.count(b"\n", 0, start) + 1
    plain = rows_plain and _plain_rows(data, line_start)
    column = None
    if line > 1 and (line_start or line_whole):
        before = data[line_start:start].decode("utf-8", "replace")
        index = len(next(csv.reader([before]), [""])) - 1 if before else 0
        names = next(csv.reader([_first_line(path)]), [])
        column = names[index] if index < len(names) else None
    begin = max(line_start, start - _SHOWN_AROUND)
    after = data[end:end + _SHOWN_AROUND].split(b"\n")[0]
    cut_before = begin > line_start or not (line_start or line_whole)
    cut_after = len(after) == _SHOWN_AROUND and data[end + _SHOWN_AROUND:end + _SHOWN_AROUND + 1] not in (b"", b"\n",
                                                                                                          b"\r")
    text = (("..." if cut_before else "") + data[begin:end].decode("utf-8", "backslashreplace")
            + after.rstrip(b"\r").decode("utf-8", "backslashreplace") + ("..." if cut_after else ""))
    return InvalidUtf8(line, line - 1 if plain and line > 1 else None, column,
                       f"bytes {data[start:end]!r} in '{text}'")


def not_csv_text_error(path: Path) -> InputFileError | None:
    """The error for a file named .csv (or .csv.gz) that its first bytes show is no UTF-8 text, or None.

    Read as CSV, a Parquet file or a workbook was refused as "separated by '\\t'" with its binary
    header shown, and UTF-16 text (Excel's "Unicode Text", Windows tools) for a line "that has 1
    field": messages that sent the user to fix the wrong thing. A few KiB, read before the file is
    parsed; a .gz file that does not decompress is left to the gzip checks (gzip_data_end).
    """
    compressed = path.name.lower().endswith(".gz")
    try:
        with _open_bytes(path) as handle:
            head = handle.read(_HEAD_BYTES)
    except (OSError, EOFError, zlib.error):
        return None
    inside = "its gzip data is" if compressed else "is"
    for magic, what, fix in _OTHER_FORMATS:
        if head.startswith(magic) and (magic != b"PAR1" or b"\0" in head):
            if compressed and magic == _GZIP_MAGIC:
                what, fix = "gzip-compressed again", "decompress it once (gunzip)"
            elif compressed:
                fix = f"decompress it (gunzip), then {fix}"
            return InputFileError(f"{path}: {inside} {what}, not CSV text; {fix}")
    encoding = _wide_encoding(head)
    if encoding:
        return InputFileError(f"{path}: {inside} not UTF-8 text (it looks {encoding}); save it as CSV in UTF-8")
    return None


def _wide_encoding(head: bytes) -> str | None:
    """How the text of ``head`` looks encoded when not UTF-8 but UTF-16 or UTF-32, with why; or None.

    Without a byte-order mark, UTF-16 shows as NUL bytes at every other position: a CSV's commas,
    digits and line ends are ASCII, one NUL byte beside each. A stray NUL in UTF-8 text is no sign.
    """
    for bom, encoding in _UTF_BOMS:
        if head.startswith(bom):
            return f"{encoding}: it starts with a {encoding} byte-order mark"
    if len(head) < 8:
        return None
    even, odd = head[0::2].count(0) / len(head[0::2]), head[1::2].count(0) / len(head[1::2])
    if min(even, odd) > 0.25:
        return "UTF-32: it has three NUL bytes beside each character"
    if max(even, odd) > 0.25:
        return "UTF-16: it has NUL bytes between its characters"
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


def quote_may_be_open(tail: bytes, from_start: bool) -> bytes | None:
    """None when a CSV ending in ``tail`` surely does not end inside a quoted field; else the byte
    before the quote that may open one (b"" at the file's start, or where ``tail`` is cut).

    ``tail`` holds the file's last bytes (all of them when ``from_start``), at least its last row
    and the byte before it. A field left open opens with a run of an odd number of quotes at a
    field's start, and only pairs ("", a quote in the value) follow it: so the last odd run tells,
    and only where it starts a field must unclosed_quote_line read the file. Found from the end
    with rfind: a tail without quotes costs a memrchr, one whose last quote closes a value no more.
    """
    end = len(tail)
    while (last := tail.rfind(b'"', 0, end)) >= 0:
        start = last
        while start > 0 and tail[start - 1] == _QUOTE:
            start -= 1
        if (last + 1 - start) % 2 == 0:
            end = start
            continue
        if start == 0 or (from_start and start == len(_BOM) and tail.startswith(_BOM)):
            return b""
        before = tail[start - 1:start]
        return before if before in (b",", b"\n", b"\r") else None
    return None


def unclosed_quote_line(path: Path) -> int | None:
    """The line on which a quoted field opens that the file never closes, or None."""
    opened = _unclosed_quote_offset(path)
    return None if opened is None else _line_at(path, opened)


def _unclosed_quote_offset(path: Path) -> int | None:
    """The byte offset of a quote that opens a field the file never closes, or None.

    Follows pyarrow's reader: a quote opens a field only at the field's start, "" inside it is a
    quote, and any other quote closes it. Reads the whole file, a quoted field at a time.
    """
    inside = quote_last = False  # quote_last: the read ended, inside, on a quote: "" or the closing one?
    opened, offset, before = None, 0, b"\n"[0]  # offset: of data in the file; before: the byte before data
    with _open_bytes(path) as handle:
        data = handle.read(max(SCAN_BLOCK, len(_BOM)))
        if data.startswith(_BOM):
            offset, data = len(_BOM), data[len(_BOM):] or handle.read(SCAN_BLOCK)
        while data:
            position = 0
            if quote_last:
                quote_last = False
                inside, position = data[0] == _QUOTE, int(data[0] == _QUOTE)
            while True:
                if inside:
                    end = _QUOTED_BODY.match(data, position).end()
                    if end >= len(data) - 1:  # the value, or its last quote, goes on in the next read
                        quote_last = end == len(data) - 1
                        break
                    inside, position = False, end + 1
                quote = data.find(b'"', position)
                if quote < 0:
                    break
                if (data[quote - 1] if quote else before) in _FIELD_ENDS:
                    inside, opened = True, offset + quote
                position = quote + 1
            offset, before = offset + len(data), data[-1]
            data = handle.read(SCAN_BLOCK)
    return opened if inside and not quote_last else None


def _line_at(path: Path, offset: int) -> int:
    """The line that byte ``offset`` is on, as an editor counts lines (LF, CR LF or CR ends one)."""
    line, after_cr = 1, False
    with _open_bytes(path) as handle:
        while offset > 0 and (data := handle.read(min(SCAN_BLOCK, offset))):
            line += data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n") - (after_cr and data[0] == 0x0A)
            after_cr, offset = data.endswith(b"\r"), offset - len(data)
    return line


def unclosed_quote_error(path: Path) -> InputFileError | None:
    """The error for a CSV that ends inside a quoted field, or None."""
    line = unclosed_quote_line(path)
    if line is None:
        return None
    # pyarrow takes the rest of the file as that one value: the rows after it vanished without a word.
    return InputFileError(f'{path}: line {line} opens a quoted field that is never closed, so the rest of the file '
                          f'would be one value; close that quote, or write a quote inside a value as ""')


def padded_gzip_end(path: Path) -> int | None:
    """Where the gzip data of a .gz file ends, when its last bytes say zero bytes pad it; else None.

    A gzip member ends with its data's length modulo 4 GiB, so a file ending in four zero bytes is
    padded (or its last member holds 0 bytes, or a multiple of 4 GiB). Known before a read, the end
    costs one pass of zlib, where a read that failed at the padding parsed the file a second time.
    Fewer zero bytes at the end can't be told from a length's own: such a file is found as its read
    fails.
    """
    if not path.name.lower().endswith(".gz"):
        return None
    with open(path, "rb") as raw:
        if raw.seek(0, 2) < 4:
            return None
        raw.seek(-4, 2)
        if raw.read() != b"\0\0\0\0":
            return None
        size = raw.tell()
    end = gzip_data_end(path)
    return end if end < size else None


def gzip_data_end(path: Path) -> int:
    """Where the gzip data of a .gz file ends: its size, or less where zero bytes pad it (gzip -t
    takes such padding, pyarrow's reader fails on it). An InputFileError for a file that is not
    gzip, is cut short or damaged, or holds other bytes after its data."""
    with open(path, "rb") as raw:
        if raw.read(2) != _GZIP_MAGIC:
            raise InputFileError(f"{path}: is not gzip data, though its name ends in .gz; compress it with gzip, "
                                 f"or name it .csv if it is plain text")
        end = 0  # where the members read so far end
        # Output is thrown away (only where a member ends matters); 1 MiB steps keep it in cache,
        # about 15% faster than 16 MiB ones.
        step = min(SCAN_BLOCK, 1 << 20)
        while True:
            raw.seek(end)
            if raw.read(2) != _GZIP_MAGIC:
                break
            raw.seek(end)
            inflater = zlib.decompressobj(31)  # one gzip member
            try:
                while not inflater.eof:
                    data = inflater.unconsumed_tail or raw.read(step)
                    if not inflater.decompress(data, step) and not data and not inflater.eof:
                        raise InputFileError(f"{path}: its gzip data ends early: the file is cut short (an "
                                             f"interrupted copy or download?); copy or compress it again")
            except zlib.error as exc:
                raise InputFileError(f"{path}: its gzip data is damaged ({one_line(exc)}); copy or compress it "
                                     f"again") from None
            end = raw.tell() - len(inflater.unused_data)  # unused_data: the bytes after the member
        raw.seek(end)
        while block := raw.read(SCAN_BLOCK):
            if block.strip(b"\0"):
                raise InputFileError(f"{path}: holds bytes after its gzip data that are neither gzip data nor zero "
                                     f"padding (gzip -t calls them trailing garbage); compress the CSV again, e.g. "
                                     f"gzip -c data.csv > data.csv.gz")
    return end
