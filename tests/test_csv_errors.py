"""Finding the line a CSV error is on, as an editor numbers lines."""

import gzip

import pytest

from pipeline import csv_errors
from pipeline.csv_errors import line_holding, line_of_row

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
