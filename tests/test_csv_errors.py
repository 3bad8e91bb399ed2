"""Finding the line a CSV error is on, as an editor numbers lines."""

import gzip
import random
import re

import pytest

from pipeline import csv_errors
from pipeline.csv_errors import (gzip_data_end, line_holding, line_of_row, not_csv_text_error, quote_may_be_open,
                                 unclosed_quote_error, unclosed_quote_line)
from pipeline.errors import InputFileError

LINES = ["id,x"] + [f"{i},{i / 7}" for i in range(400)]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("block", [1, 7, 8, 13, 1 << 24])
def test_line_holding_finds_a_line_across_block_edges(tmp_path, monkeypatch, newline, compressed, block):
    monkeypatch.setattr(csv_errors, "SCAN_BLOCK", block)
    data = (newline.join(LINES)).encode()  # no newline after the last line
    path = tmp_path / ("t.CSV.GZ" if compressed else "t.csv")
    path.write_bytes(gzip.compress(data) if compressed else data)
    assert line_holding(path, "id,x") == 1
    assert line_holding(path, LINES[250]) == 251
    assert line_holding(path, LINES[-1]) == len(LINES)
    assert line_holding(path, "250,35.7") is None  # part of a line is not the line


def test_line_of_row_counts_quoted_line_breaks_and_skips_blank_lines(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('id,note\n1,"a\nb\nc"\n\n2,plain\n3,x\n')
    assert [line_of_row(path, row) for row in (1, 2, 3)] == [2, 6, 7]
    assert line_of_row(path, 9) == 10  # past the end: the plain count


def _reference_opener(data: bytes) -> int | None:
    """Where a quote opens that the data never closes, by pyarrow's rules, one byte at a time: a quote
    opens a field only at its start, "" inside is a quote, any other quote closes it."""
    state, opened, i = "start", None, 3 if data.startswith(b"\xef\xbb\xbf") else 0
    while i < len(data):
        byte = data[i:i + 1]
        if state == "quoted":
            if byte == b'"' and data[i + 1:i + 2] == b'"':
                i += 1  # a quote in the value
            elif byte == b'"':
                state = "field"
        elif byte == b'"' and state == "start":
            state, opened = "quoted", i
        else:
            state = "start" if byte in (b",", b"\n", b"\r") else "field"
        i += 1
    return opened if state == "quoted" else None


def test_an_unclosed_quote_is_found_as_pyarrow_reads_quotes(tmp_path, monkeypatch):
    """Random files of quotes, separators and line ends (CR, LF, CR LF, a byte order mark), read in
    reads as short as one byte: the opening quote's line, or None, as the byte-at-a-time rules say;
    and the cheap look at the file's end never clears one that ends inside a quote."""
    rng = random.Random(7)
    pieces = ["a", "b", ",", ",", '"', '"', '"', '""', "\n", "\n", "\r", "\r\n"]
    path = tmp_path / "f.csv"
    for _ in range(3000):
        data = (rng.choice(["", "\ufeff"]) + "".join(rng.choice(pieces) for _ in range(rng.randint(1, 14)))).encode()
        path.write_bytes(data)
        opened = _reference_opener(data)
        line = None if opened is None else 1 + len(re.findall(rb"\r\n|\r|\n", data[:opened]))
        for block in (1, 2, 5, 1 << 24):
            monkeypatch.setattr(csv_errors, "SCAN_BLOCK", block)
            assert unclosed_quote_line(path) == line, (data, block)
        if opened is not None:  # any tail holding the opening quote and the byte before it
            for cut in [0] + list(range(4 if data.startswith(b"\xef") else 1, opened)):
                assert quote_may_be_open(data[cut:], from_start=cut == 0) is not None, (data, cut)


@pytest.mark.parametrize("compressed", [False, True])
def test_an_unclosed_quote_is_named_with_its_editor_line(tmp_path, compressed):
    text = "\ufeffid,note\r\n1,\"two\r\nlines\"\r\n\r\n2,\"x\"\"y\"\r3,\"oops\n4,z\n"
    path = tmp_path / ("q.csv.gz" if compressed else "q.csv")
    path.write_bytes(gzip.compress(text.encode()) if compressed else text.encode())
    assert unclosed_quote_line(path) == 6
    assert "line 6 opens a quoted field that is never closed" in str(unclosed_quote_error(path))
    path.write_bytes(gzip.compress(b"id,note\n1,\"ok\"\n") if compressed else b"id,note\n1,\"ok\"\n")
    assert unclosed_quote_line(path) is None and unclosed_quote_error(path) is None


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 24])
def test_gzip_data_end_is_where_zero_padding_starts(tmp_path, monkeypatch, block):
    monkeypatch.setattr(csv_errors, "SCAN_BLOCK", block)  # members, and what a read leaves over, across reads
    members = gzip.compress(b"id,x\n" + b"1,2\n" * 500) + gzip.compress(b"3,4\n" * 300)
    path = tmp_path / "t.csv.gz"
    for padding in (b"", b"\0", b"\0" * 1000):
        path.write_bytes(members + padding)
        assert gzip_data_end(path) == len(members)
    path.write_bytes(members[:-3])
    with pytest.raises(InputFileError, match="its gzip data ends early"):
        gzip_data_end(path)


def test_padded_gzip_end_looks_only_at_the_last_bytes_of_a_file_not_padded(tmp_path, monkeypatch):
    """A file is decompressed to find its end only where four zero bytes end it: a length below 16 MiB
    ends a gzip file in zero bytes too, and such a file must not pay a second pass."""
    members = gzip.compress(b"id,x\n" + b"1,2\n" * 500) + gzip.compress(b"3,4\n" * 300)
    assert members.endswith(b"\x04\0\0")  # the last member's length, 1200
    path = tmp_path / "t.CSV.GZ"
    for padding in (b"\0\0", b"\0" * 4096):
        path.write_bytes(members + padding)
        assert csv_errors.padded_gzip_end(path) == len(members)
    plain = tmp_path / "t.csv"
    plain.write_bytes(b"id,x\n1,2\n\0\0\0\0")
    monkeypatch.setattr(csv_errors, "gzip_data_end", lambda path: pytest.fail(f"{path} decompressed"))
    for data in (members, members + b"\0"):  # one zero byte of padding is found as the read fails
        path.write_bytes(data)
        assert csv_errors.padded_gzip_end(path) is None, data[-8:]
    assert csv_errors.padded_gzip_end(plain) is None


@pytest.mark.parametrize("data", [
    b"PAR1,PAR2\n1,2\n",                          # a column named like Parquet's marker: no NUL byte follows
    b"id,note\n1,a\0b\n" + b"2,plain\n" * 50,      # a stray NUL in a value is the reader's to judge
    "\ufeffid,caf\xe9\n1,\xe9t\xe9\n".encode(),      # UTF-8 with its byte order mark
    "id,caf\xe9\n1,2\n".encode("latin-1"),          # not UTF-8, but no wider encoding: the reader names the value
    b"a\n1\n",                                     # shorter than the look at NUL bytes needs
])
def test_csv_text_in_utf8_is_not_taken_for_another_format(tmp_path, data):
    path = tmp_path / "t.csv"
    path.write_bytes(data)
    assert not_csv_text_error(path) is None
    path = tmp_path / "t.csv.gz"
    path.write_bytes(gzip.compress(data))
    assert not_csv_text_error(path) is None


def test_csv_text_in_utf16_is_told_from_its_nul_bytes_without_a_byte_order_mark(tmp_path):
    text = "\u03b8\u03b5\u03c3\u03b7,\u03c4\u03b9\u03bc\u03ae\n" + "".join(f"\u03b1{i},{i / 7}\n" for i in range(200))
    path = tmp_path / "t.csv"
    for encoding in ("utf-16-le", "utf-16-be"):  # Greek names: only the ASCII digits and commas have a NUL byte
        path.write_bytes(text.encode(encoding))
        assert "it looks UTF-16: it has NUL bytes between its characters" in str(not_csv_text_error(path)), encoding
    path.write_bytes(text.encode("utf-32-le"))
    assert "it looks UTF-32: it has three NUL bytes beside each character" in str(not_csv_text_error(path))


def test_a_gz_file_that_is_no_gzip_is_left_to_the_gzip_check(tmp_path):
    path = tmp_path / "t.csv.gz"
    path.write_bytes(b"id,x\n1,2\n")
    assert not_csv_text_error(path) is None
    with pytest.raises(InputFileError, match="is not gzip data"):
        gzip_data_end(path)


LATIN1_ROWS = "id,note,x\n" + "".join(f"{i},caf\u00e9 {i},{i / 3}\n" for i in range(40))


@pytest.mark.parametrize("block", [csv_errors.SCAN_BLOCK, 7, 5])
@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_text_that_is_not_utf8_is_found_by_row_line_and_column_name(tmp_path, monkeypatch, block, suffix):
    """pyarrow said `In CSV column #1: ... invalid UTF8 data`, numbered from 0 and with no line. Small
    blocks cut lines and UTF-8 characters at block ends (the 'é's above line 22 are UTF-8 here): a line
    begun in an earlier block lost its column's name."""
    monkeypatch.setattr(csv_errors, "SCAN_BLOCK", block)
    head, bad = LATIN1_ROWS.splitlines(keepends=True)[:22], LATIN1_ROWS.splitlines(keepends=True)[22:]
    data = "".join(head).encode("utf-8") + "".join(bad).encode("latin-1")
    path = tmp_path / f"t{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    assert csv_errors.first_invalid_utf8(path) == (23, 22, "note", "bytes b'\\xe9' in '21,caf\\xe9 21,7.0'")
    error = csv_errors.structure_error(path, ValueError("In CSV column #1: CSV conversion error to string: "
                                                        "invalid UTF8 data"))
    assert str(error) == (f"{path}: row 22 (line 23), column 'note' holds text that is not UTF-8 (bytes b'\\xe9' in "
                          f"'21,caf\\xe9 21,7.0'); save the file as UTF-8 (from Windows-1252 or Latin-1, as Excel and "
                          f"older exports write: iconv -f cp1252 -t utf-8, or pandas' encoding='cp1252' and to_csv)")
    whole = LATIN1_ROWS.encode("utf-8")
    path.write_bytes(gzip.compress(whole) if suffix.endswith(".gz") else whole)
    assert csv_errors.first_invalid_utf8(path) is None


def test_bad_utf8_after_quoted_line_breaks_or_in_a_long_line_is_told_by_what_is_sure(tmp_path, monkeypatch):
    """Quoted line breaks and blank lines above make the row uncertain (the line is still sure); a line
    longer than what is kept between blocks loses its column's name, not its line; neighbours far
    from the line's ends are cut with '...'."""
    path = tmp_path / "t.csv"
    path.write_bytes(b'id,note,x\n1,"two\nlines",2\n\n2,caf\xe9,3\n')
    assert csv_errors.first_invalid_utf8(path) == (5, None, "note", "bytes b'\\xe9' in '2,caf\\xe9,3'")
    monkeypatch.setattr(csv_errors, "SCAN_BLOCK", 64)
    monkeypatch.setattr(csv_errors, "_LINE_KEPT", 32)
    path.write_bytes(b"id,note,x\n1," + b"y" * 100 + b"\xe9" + b"z" * 100 + b",2\n")
    assert csv_errors.first_invalid_utf8(path) == (2, 1, None, "bytes b'\\xe9' in '..." + "y" * 20 + "\\xe9"
                                                   + "z" * 20 + "...'")
