"""pipeline.outputs: where results may be written, checked before any work."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.outputs import check_location, check_output_location
from tests.conftest import run_main


@pytest.fixture
def unwritable_folder(tmp_path) -> Path:
    """A folder that refuses new files to this process: read-only bits, or for root (whom they do not
    stop) a folder of /sys, which refuses new files to everyone."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        yield folder
        folder.chmod(stat.S_IRWXU)
        return
    folder = Path("/sys/kernel")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pytest.skip("no folder here refuses new files to root")
    except OSError:
        yield folder


def test_an_output_in_a_folder_that_refuses_files_fails_before_any_work(unwritable_folder):
    with pytest.raises(ConfigError, match=rf"^--output {unwritable_folder}/new/s\.parquet: cannot write into "
                                          rf"{unwritable_folder} \(.+\); choose a folder you can write into"):
        check_output_location(unwritable_folder / "new" / "s.parquet")
    with pytest.raises(ConfigError, match=rf"^--maps {unwritable_folder}: cannot write into {unwritable_folder} "):
        check_location(unwritable_folder, "--maps", "directory")


def test_a_writable_output_folder_is_left_as_it_was(tmp_path):
    check_output_location(tmp_path / "new" / "s.parquet")
    check_location(tmp_path, "--maps", "directory")
    assert list(tmp_path.iterdir()) == []  # the check leaves no file, and makes no folder


def test_score_into_a_folder_that_refuses_files_is_one_line_naming_the_output(capsys, trained_bundle, incoming_csv,
                                                                             unwritable_folder):
    """It was `error: unexpected PermissionError: ... Failed to open local file '.../.s.parquet.tmp-...'`."""
    output = unwritable_folder / "s.parquet"
    code, _, err = run_main(capsys, "score", trained_bundle, incoming_csv, "--output", output)
    assert code == 1
    [line] = err.splitlines()
    assert line.startswith(f"error: --output {output}: cannot write into {unwritable_folder} (")
    assert line.endswith("); choose a folder you can write into, or change that one's permissions")


@pytest.mark.parametrize("first, second", [("s.csv", "s.parquet"), ("s.parquet", "s.pq")])
def test_scores_that_would_take_another_outputs_summary_are_refused(capsys, trained_bundle, incoming_csv, tmp_path,
                                                                   first, second):
    """`s.csv` and then `s.parquet` both wrote `s.summary.json`: the CSV's scores were left with the
    Parquet run's summary. Once the first file is gone, its summary is free to replace."""
    code, _, _ = run_main(capsys, "score", trained_bundle, incoming_csv, "--output", tmp_path / first)
    assert code == 0
    summary = (tmp_path / "s.summary.json").read_bytes()
    code, _, err = run_main(capsys, "score", trained_bundle, incoming_csv, "--output", tmp_path / second)
    assert code == 1
    assert err.splitlines() == [
        f"error: --output {tmp_path / second}: its summary {tmp_path / 's.summary.json'} is that of the scores "
        f"{tmp_path / first}, which share its name up to the extension, and this run would replace it; choose "
        f"another output name, or remove {tmp_path / first} first"]
    assert (tmp_path / "s.summary.json").read_bytes() == summary and not (tmp_path / second).exists()
    (tmp_path / first).unlink()
    code, _, _ = run_main(capsys, "score", trained_bundle, incoming_csv, "--output", tmp_path / second)
    assert code == 0 and json.loads((tmp_path / "s.summary.json").read_text())["output"] == str(tmp_path / second)


def test_scoring_again_into_the_same_output_replaces_its_own_summary(capsys, trained_bundle, incoming_csv, tmp_path):
    for _ in range(2):
        code, _, _ = run_main(capsys, "score", trained_bundle, incoming_csv, "--output", tmp_path / "s.csv")
        assert code == 0


def test_an_unsupported_output_extension_is_said_before_a_summary_that_is_anothers(capsys, trained_bundle,
                                                                                  incoming_csv, tmp_path):
    """Before: `--output e.txt` beside `e.parquet` was told to remove e.parquet, and then only that
    .txt can't be written."""
    assert run_main(capsys, "score", trained_bundle, incoming_csv, "--output", tmp_path / "e.parquet")[0] == 0
    code, _, err = run_main(capsys, "score", trained_bundle, incoming_csv, "--output", tmp_path / "e.txt")
    assert code == 1
    assert err.splitlines() == [f"error: --output {tmp_path / 'e.txt'}: unsupported extension '.txt'; use .parquet or .csv"]


def test_train_into_a_folder_that_refuses_files_is_one_line_naming_out(capsys, sensor_csv, unwritable_folder):
    """It was `error: unexpected OSError: [Errno 30] Read-only file system: '.../.q.run-...'`."""
    for out in (unwritable_folder, unwritable_folder / "sub"):
        code, _, err = run_main(capsys, "train", sensor_csv, "--name", "q", "--out", out)
        assert code == 1
        [line] = err.splitlines()
        assert line.startswith(f"error: --out {out}: cannot write into {unwritable_folder} (")
        assert line.endswith("); choose a folder you can write into, or change that one's permissions")
