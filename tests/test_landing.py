"""Which landed files are pending, the ledger, the run lock and quarantine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.landing import (
    LandedFile,
    Ledger,
    LedgerError,
    ledger_summary,
    output_path,
    pending_files,
    quarantine,
    run_lock,
)

LONG_AGO = time.time() - 3600


def land(folder: Path, relative: str, text: str = "a,b\n1,2\n", mtime: float | None = LONG_AGO) -> Path:
    """Write a file as a finished upload: its mtime an hour back unless told otherwise."""
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def scored(ledger: Ledger, landed: LandedFile) -> None:
    ledger.record({"relative": landed.relative, "sha256": landed.sha256, "status": "scored"})


@pytest.fixture
def dirs(tmp_path) -> tuple[Path, Path]:
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    return landing, out


def test_scored_file_is_done_until_its_content_changes(dirs):
    landing, out = dirs
    ledger = Ledger(out)
    path = land(landing, "sensors.csv")
    [first] = pending_files(landing, ledger)
    assert first.path == path.resolve() and first.relative == "sensors.csv" and first.size == path.stat().st_size

    scored(ledger, first)
    assert pending_files(landing, ledger) == []
    assert ledger.done("sensors.csv", first.sha256)

    land(landing, "sensors.csv", "a,b\n1,2\n3,4\n")
    [second] = pending_files(landing, ledger)
    assert second.relative == first.relative and second.sha256 != first.sha256
    assert output_path(out, second) != output_path(out, first)
    assert output_path(out, first) == out / "scores" / f"sensors.{first.sha256[:12]}.parquet"
    # Same content, same output: a re-run after a crash overwrites instead of duplicating.
    assert output_path(out, second) == output_path(out, LandedFile(second.path, second.relative, second.sha256, 0))


def test_file_still_being_written_waits_for_settle_time(dirs):
    landing, out = dirs
    ledger = Ledger(out)
    land(landing, "fresh.csv", mtime=None)
    land(landing, "empty.csv", "", mtime=None)
    assert pending_files(landing, ledger, settle_seconds=30) == []
    later = time.time() + 60
    assert [f.relative for f in pending_files(landing, ledger, settle_seconds=30, now=later)] == ["empty.csv",
                                                                                                   "fresh.csv"]
    assert len(pending_files(landing, ledger, settle_seconds=0, now=later)) == 2


def test_listing_skips_hidden_quarantine_and_unsupported_and_recurses(dirs):
    landing, out = dirs
    for relative in [".hidden.csv", ".part.csv.tmp", ".tmp-upload/x.csv", "quarantine/bad.csv",
                     "deep/quarantine/bad.csv", "notes.txt", "data.json", "b/c/d.PARQUET", "a.csv", "b/c.pq",
                     "e.csv.gz", "f.json.gz"]:
        land(landing, relative)
    found = pending_files(landing, Ledger(out))
    assert [f.relative for f in found] == ["a.csv", "b/c.pq", "b/c/d.PARQUET", "e.csv.gz"]
    assert output_path(out, found[3]) == out / "scores" / f"e.csv.{found[3].sha256[:12]}.parquet"
    nested = found[2]
    assert output_path(out, nested, ".csv") == out / "scores" / "b" / "c" / f"d.{nested.sha256[:12]}.csv"


def test_torn_last_ledger_line_is_ignored_and_appends_continue(dirs):
    _, out = dirs
    ledger = Ledger(out)
    ledger.record({"relative": "a.csv", "sha256": "1" * 64, "status": "scored"})
    with open(ledger.path, "a") as handle:
        handle.write('{"relative": "b.csv", "sha256": "2222')  # killed mid-append
    assert [e["relative"] for e in ledger.entries()] == ["a.csv"]
    assert not ledger.done("b.csv", "2" * 64)

    ledger.record({"relative": "c.csv", "sha256": "3" * 64, "status": "quarantined", "rows": np.int64(5)})
    entries = ledger.entries()
    assert [e["relative"] for e in entries] == ["a.csv", "c.csv"]
    assert entries[1]["recorded_at"].endswith("+00:00") and entries[1]["rows"] == 5
    assert all(json.loads(line) for line in ledger.path.read_text().splitlines())
    assert ledger_summary(ledger) == {"entries": 2, "scored": 1, "quarantined": 1, "failed": 0}


def test_ledger_rejects_incomplete_entries_and_corrupt_middle_lines(dirs):
    _, out = dirs
    ledger = Ledger(out)
    with pytest.raises(LedgerError, match="lacks"):
        ledger.record({"relative": "a.csv", "status": "scored"})
    with pytest.raises(LedgerError, match="status"):
        ledger.record({"relative": "a.csv", "sha256": "1" * 64, "status": "done"})
    with pytest.raises(LedgerError, match="NaN"):
        ledger.record({"relative": "a.csv", "sha256": "1" * 64, "status": "scored", "auroc": float("nan")})
    out.mkdir()
    ledger.path.write_text('{"relative": "a.csv"}\nnot json\n{"relative": "b.csv"}\n')
    with pytest.raises(LedgerError, match=r"ledger.jsonl:2"):
        ledger.entries()


def hold_lock_in_subprocess(out: Path, seconds: float) -> subprocess.Popen:
    code = ("import fcntl, sys, time\n"
            f"handle = open({str(out / '.run.lock')!r}, 'a')\n"
            "fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "print('held', flush=True)\n"
            f"time.sleep({seconds})\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def try_lock_in_subprocess(out: Path) -> bool:
    code = ("import fcntl\n"
            f"handle = open({str(out / '.run.lock')!r}, 'a')\n"
            "try:\n    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)\n    print('acquired')\n"
            "except BlockingIOError:\n    print('busy')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return result.stdout == "acquired\n"


def test_run_lock_excludes_other_processes_and_dies_with_its_holder(dirs):
    _, out = dirs
    with run_lock(out) as acquired:
        assert acquired
        assert not try_lock_in_subprocess(out)
    assert try_lock_in_subprocess(out)

    holder = hold_lock_in_subprocess(out, seconds=60)
    try:
        with run_lock(out) as acquired:
            assert not acquired
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with run_lock(out) as acquired:
        assert acquired
        assert (out / ".run.lock").read_text().strip() == str(os.getpid())


def test_quarantine_moves_file_with_reason_and_never_overwrites(dirs):
    landing, out = dirs
    ledger = Ledger(out)
    land(landing, "in/broken.csv", "not,a\ntable")
    [landed] = pending_files(landing, ledger)
    target = quarantine(out, landed, "column 'a' missing", ledger)

    assert target == out / "quarantine" / "in" / "broken.csv"
    assert target.read_text() == "not,a\ntable" and not landed.path.exists()
    reason = Path(f"{target}.reason.txt").read_text()
    assert "column 'a' missing" in reason and landed.sha256 in reason and "quarantined_at" in reason
    [entry] = ledger.entries()
    assert entry["status"] == "quarantined" and entry["quarantined_to"] == str(target)
    assert entry["reason"] == "column 'a' missing" and entry["relative"] == "in/broken.csv"

    # The same name lands again with other content, and is still refused: both copies are kept.
    land(landing, "in/broken.csv", "still broken")
    [again] = pending_files(landing, ledger)
    second = quarantine(out, again, "still broken", ledger)
    assert second == out / "quarantine" / "in" / f"broken.{again.sha256[:12]}.csv"
    assert target.read_text() == "not,a\ntable" and second.read_text() == "still broken"
    assert Path(f"{second}.reason.txt").exists()
    assert pending_files(landing, ledger) == []
    assert ledger_summary(ledger)["quarantined"] == 2


def test_failed_attempts_are_counted_but_keep_the_file_pending(dirs):
    landing, out = dirs
    ledger = Ledger(out)
    land(landing, "flaky.csv")
    [landed] = pending_files(landing, ledger)
    for _ in range(2):
        ledger.record({"relative": landed.relative, "sha256": landed.sha256, "status": "failed", "error": "boom"})
    assert ledger.failures(landed.relative, landed.sha256) == 2
    assert pending_files(landing, ledger) == [landed]


def test_output_inside_the_landing_folder_is_refused(tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.landing import check_folders

    (tmp_path / "landing").mkdir()
    check_folders(tmp_path / "landing", tmp_path / "out")
    with pytest.raises(ConfigError, match="inside the landing folder"):
        check_folders(tmp_path / "landing", tmp_path / "landing" / "scored")
    with pytest.raises(ConfigError, match="does not exist"):
        check_folders(tmp_path / "nope", tmp_path / "out")
