"""Which landed files are pending, the ledger, the run lock and quarantine."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import LandingJob, ServeJob
from pipeline.errors import ConfigError, DataError, DeviceError, InputFileError
from pipeline.outputs import summary_path, temp_path
from pipeline.landing import (
    STATUSES,
    LandedFile,
    LandingRunError,
    Ledger,
    LedgerError,
    output_path,
    pending_files,
    quarantine,
    record_empty,
    record_failure,
    record_scored,
    run_failure,
    run_lock,
    version,
)

LONG_AGO = time.time() - 3600


def ledger_summary(ledger: Ledger) -> dict:
    """How many ledger entries have each status."""
    counts = Counter(entry.get("status") for entry in ledger.entries())
    return {"entries": sum(counts.values()), **{status: counts.get(status, 0) for status in STATUSES}}


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
    assert first.mtime_ns == path.stat().st_mtime_ns

    scored(ledger, first)
    assert pending_files(landing, ledger) == []
    assert ledger.done("sensors.csv", first.sha256)

    land(landing, "sensors.csv", "a,b\n1,2\n3,4\n")
    [second] = pending_files(landing, ledger)
    assert second.relative == first.relative and second.sha256 != first.sha256
    assert output_path(out, second) != output_path(out, first)
    assert output_path(out, first) == out / "scores" / f"sensors.csv.{first.sha256[:12]}.parquet"
    # Same content, same output: a re-run after a crash overwrites instead of duplicating.
    assert output_path(out, second) == output_path(out, dataclasses.replace(second, size=0, mtime_ns=0))


def test_landed_files_with_the_same_bytes_each_get_their_own_output(dirs):
    """x.parquet and x.pq (or x.csv and x.CSV) with identical bytes both had the output
    x.<sha256[:12]>.parquet: two files scored into one, and discarding one discarded both."""
    landing, out = dirs
    for relative in ["x.parquet", "x.pq", "y.csv", "y.CSV", "z.parquet", "sub/x.parquet"]:
        land(landing, relative, "same bytes")
    found = pending_files(landing, Ledger(out))
    assert len({f.sha256 for f in found}) == 1
    outputs = {f.relative: output_path(out, f) for f in found}
    assert len(set(outputs.values())) == len(found) == 6
    sha = found[0].sha256[:12]
    assert outputs["x.pq"] == out / "scores" / f"x.pq.{sha}.parquet"
    assert outputs["sub/x.parquet"] == out / "scores" / "sub" / f"x.parquet.{sha}.parquet"


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


def test_listing_skips_hidden_and_unsupported_and_recurses(dirs):
    """Hidden names are writers' uploads in progress (rsync and curl write .name.tmp). A folder named
    quarantine is the upstream's own: the runs' quarantine is OUT/quarantine, never inside the
    landing folder (check_folders), and skipping it left a plant's quarantine/day.csv unscored."""
    landing, out = dirs
    for relative in [".hidden.csv", ".part.csv.tmp", ".tmp-upload/x.csv", "quarantine/bad.csv",
                     "deep/quarantine/bad.csv", "notes.txt", "data.json", "b/c/d.PARQUET", "a.csv", "b/c.pq",
                     "e.csv.gz", "f.json.gz"]:
        land(landing, relative)
    found = pending_files(landing, Ledger(out))
    assert [f.relative for f in found] == ["a.csv", "b/c.pq", "b/c/d.PARQUET", "deep/quarantine/bad.csv", "e.csv.gz",
                                           "quarantine/bad.csv"]
    assert output_path(out, found[4]) == out / "scores" / f"e.csv.gz.{found[4].sha256[:12]}.parquet"
    nested = found[2]
    assert output_path(out, nested, ".csv") == out / "scores" / "b" / "c" / f"d.PARQUET.{nested.sha256[:12]}.csv"


def count_hashes(monkeypatch) -> list[Path]:
    import pipeline.landing as landing_module

    hashed, real = [], landing_module.sha256_file

    def counting(path):
        hashed.append(Path(path))
        return real(path)

    monkeypatch.setattr(landing_module, "sha256_file", counting)
    return hashed


def test_a_file_done_and_unchanged_is_not_read_again(dirs, monkeypatch):
    """Every run hashed every file still in the landing folder before looking in the ledger: with
    2 GB scored, a run with nothing to do read 2 GB (on a mounted bucket, downloaded it)."""
    landing, out = dirs
    ledger = Ledger(out)
    land(landing, "old.csv")
    land(landing, "sub/quiet.csv", "a,b\n")
    land(landing, "bad.csv", "a\n")
    items = {f.relative: f for f in pending_files(landing, ledger)}
    old, bad, quiet = items["old.csv"], items["bad.csv"], items["sub/quiet.csv"]
    record_scored(old, output_path(out, old), {"rows": 1, "anomalies": 0}, ledger)
    record_empty(quiet, ledger)
    entry = ledger.entries()[0]
    assert (entry["size"], entry["mtime_ns"]) == (old.size, old.mtime_ns)
    record_failure(out, bad, DeviceError("no GPU"), ledger)  # failed: retried, so hashed again

    hashed = count_hashes(monkeypatch)
    assert [f.relative for f in pending_files(landing, ledger)] == ["bad.csv"]
    assert [p.name for p in hashed] == ["bad.csv"]

    # Touched (same bytes): read once more, found done by its hash, not scored again.
    hashed.clear()
    os.utime(old.path, (LONG_AGO + 10, LONG_AGO + 10))
    assert [f.relative for f in pending_files(landing, ledger)] == ["bad.csv"]
    assert sorted(p.name for p in hashed) == ["bad.csv", "old.csv"]
    # Rewritten with the same size and a new mtime: a new version.
    land(landing, "old.csv", "a,b\n9,9\n", mtime=LONG_AGO + 20)
    assert [f.relative for f in pending_files(landing, ledger)] == ["bad.csv", "old.csv"]


def test_a_ledger_without_sizes_and_mtimes_still_reads_and_its_files_stay_done(dirs, monkeypatch):
    landing, out = dirs
    ledger = Ledger(out)
    land(landing, "before-upgrade.csv")
    [landed] = pending_files(landing, ledger)
    scored(ledger, landed)  # a line as written before size and mtime_ns were recorded
    hashed = count_hashes(monkeypatch)
    assert pending_files(landing, ledger) == [] and len(hashed) == 1


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
    assert ledger_summary(ledger) == {"entries": 2, "scored": 1, "empty": 0, "quarantined": 1, "failed": 0}


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


LONG_NAME = "売上" * 36 + ".csv"  # 220 bytes: legal, and 40 more in a temporary summary's name were not


def test_a_long_landed_name_gets_outputs_whose_every_name_fits(dirs):
    """A summary's temporary name (.NAME.<sha12>.summary.json.tmp-xxxxxxxx) of a 220-byte landed name
    was 260 bytes: ENAMETOOLONG, every run, and the file was never scored."""
    landing, out = dirs
    gzipped, longest_kept = "sub/" + LONG_NAME[:-4] + "!.csv.gz", "a" * 211 + ".csv"  # 215 bytes
    for relative in (LONG_NAME, gzipped, "short.csv", longest_kept):
        land(landing, relative)
    found = {f.relative: f for f in pending_files(landing, Ledger(out))}
    outputs = {relative: output_path(out, landed) for relative, landed in found.items()}
    for output in outputs.values():
        for written in (output, summary_path(output)):
            temp = temp_path(written)
            temp.parent.mkdir(parents=True, exist_ok=True)
            temp.write_text("")  # the name the run writes first: it must fit in 255 bytes too
            temp.rename(written)
    sha = found[LONG_NAME].sha256[:12]
    assert outputs["short.csv"].name == f"short.csv.{found['short.csv'].sha256[:12]}.parquet"  # as before
    assert outputs[longest_kept].name.startswith(longest_kept + ".")  # the longest name kept as it is
    long_output = outputs[LONG_NAME].name
    assert long_output.startswith("売上" * 30) and long_output.endswith(f".csv.{sha}.parquet")
    assert "~" in long_output and len(long_output.encode()) <= 255
    assert outputs[gzipped].name.endswith(f"~{outputs[gzipped].name.split('~')[1][:8]}.csv.gz."
                                          f"{found[gzipped].sha256[:12]}.parquet")
    assert outputs[gzipped].parent == out / "scores" / "sub"
    # The same on every run (a rerun overwrites its output), and apart from a long name that begins alike.
    assert output_path(out, found[LONG_NAME]) == outputs[LONG_NAME]
    twin = dataclasses.replace(found[LONG_NAME], relative=LONG_NAME[:-5] + "X.csv")
    assert output_path(out, twin) != outputs[LONG_NAME]


def test_a_bad_file_with_a_long_name_is_quarantined_with_its_reason(dirs):
    """Its reason file's temporary name was too long: the file could not be quarantined, stayed
    'failed' for ever, and the reason said to make the quarantine folder writable."""
    landing, out = dirs
    ledger = Ledger(out)
    name = "é" * 122 + ".csv"  # 248 bytes
    land(landing, name, "x,y\n1,2\n")
    [landed] = pending_files(landing, ledger)
    entry = record_failure(out, landed, DataError(f"{name}: column 'a' missing"), ledger)
    assert entry["status"] == "quarantined", entry["reason"]
    [target] = [p for p in (out / "quarantine").iterdir() if not p.name.endswith(".reason.txt")]
    assert target.name.startswith("é" * 90) and target.name.endswith(".csv") and target.read_text() == "x,y\n1,2\n"
    assert f"file: {name}\n" in Path(f"{target}.reason.txt").read_text()  # the reason keeps the whole name
    land(landing, name, "x,y\n1,2\n")  # the same content lands again: quarantined beside the first
    second = quarantine(out, landed, "column 'a' missing", ledger)
    assert second.parent == target.parent and second != target and Path(f"{second}.reason.txt").exists()


def test_a_quarantine_that_fails_says_what_to_fix_for_its_cause(dirs, monkeypatch):
    import pipeline.landing as landing_module

    landing, out = dirs
    ledger = Ledger(out)
    land(landing, "bad.csv")
    [landed] = pending_files(landing, ledger)
    reasons = {}
    for code in (errno.EACCES, errno.ENOSPC, errno.EIO):
        def failing(source, target, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(landing_module, "move_file", failing)
        reasons[code] = record_failure(out, landed, DataError("bad.csv: column 'a' missing"), ledger)["reason"]
    assert reasons[errno.EACCES].endswith(f"make {out / 'quarantine'} a folder this user can write")
    assert reasons[errno.ENOSPC].endswith(f"free space where {out / 'quarantine'} is")
    assert "writable" not in reasons[errno.EIO] and "can write" not in reasons[errno.EIO]


def test_failed_attempts_are_counted_but_keep_the_file_pending(dirs):
    landing, out = dirs
    ledger = Ledger(out)
    land(landing, "flaky.csv")
    [landed] = pending_files(landing, ledger)
    for _ in range(2):
        ledger.record({"relative": landed.relative, "sha256": landed.sha256, "status": "failed", "error": "boom"})
    assert ledger.failures(landed.relative, landed.sha256) == 2
    assert pending_files(landing, ledger) == [landed]


def test_a_watch_or_output_that_is_a_file_is_refused_before_serving(tmp_path):
    """`serve --watch batch1.csv` said "landing folder batch1.csv does not exist"; `--output` naming a
    file was accepted, and every run then crashed with a traceback in mkdir."""
    from pipeline.landing import check_folders

    (tmp_path / "landing").mkdir()
    (tmp_path / "batch1.csv").write_text("a\n1\n")
    with pytest.raises(ConfigError, match=r"^landing folder .*batch1\.csv is a file, not a folder; --watch takes"):
        check_folders(tmp_path / "batch1.csv", tmp_path / "out")
    with pytest.raises(ConfigError, match=r"^output folder .*batch1\.csv is a file, not a folder; --output takes"):
        check_folders(tmp_path / "landing", tmp_path / "batch1.csv")
    with pytest.raises(ConfigError, match=r"^output folder .*batch1\.csv/out can't be created: .*batch1\.csv is a "
                                          r"file"):
        check_folders(tmp_path / "landing", tmp_path / "batch1.csv" / "out")


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this process can't write: by its mode, or for root (whom modes don't stop) immutable."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.access(folder, os.W_OK):
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        if not immutable or os.access(folder, os.W_OK):
            pytest.skip("no way to make a folder read-only for this user here")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_an_output_folder_that_cannot_be_written_is_refused_before_serving(tmp_path, read_only_folder):
    from pipeline.landing import check_folders

    (tmp_path / "landing").mkdir()
    with pytest.raises(ConfigError, match=r"^output folder .*read-only is not writable by this user"):
        check_folders(tmp_path / "landing", read_only_folder)
    with pytest.raises(ConfigError, match=r"^output folder .*read-only/out can't be created: .*read-only is not "
                                          r"writable"):
        check_folders(tmp_path / "landing", read_only_folder / "out")


def test_an_output_folder_serves_one_landing_folder(tmp_path):
    """Two landing folders scored into one output folder, each with a day.csv: the ledger keyed both
    by "day.csv" and its sha256, so the second folder's file was never scored, and no one was told."""
    from pipeline.landing import check_folders, claim_output

    plant_a, plant_b, out = tmp_path / "plantA", tmp_path / "plantB", tmp_path / "out"
    plant_a.mkdir(), plant_b.mkdir(), out.mkdir()
    check_folders(plant_a, out), check_folders(plant_b, out)  # nothing claimed yet
    claim_output(out, plant_a)
    claim_output(out, plant_a / ".." / "plantA")  # the same folder, named otherwise
    check_folders(plant_a, out)
    message = rf"^output folder {out} serves the landing folder {plant_a}, not {plant_b}: .*own --output"
    with pytest.raises(ConfigError, match=message):
        check_folders(plant_b, out)
    with pytest.raises(ConfigError, match=message):
        claim_output(out, plant_b)
    (out / "landing.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"landing\.json: expected .*can't be read"):
        check_folders(plant_a, out)


def test_output_inside_the_landing_folder_is_refused(tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.landing import check_folders

    (tmp_path / "landing").mkdir()
    check_folders(tmp_path / "landing", tmp_path / "out")
    with pytest.raises(ConfigError, match="inside the landing folder"):
        check_folders(tmp_path / "landing", tmp_path / "landing" / "scored")
    with pytest.raises(ConfigError, match="does not exist"):
        check_folders(tmp_path / "nope", tmp_path / "out")


def test_a_bundle_inside_the_landing_folder_is_refused(tmp_path):
    """`serve --watch .` from the folder that holds exported/: every run would score the bundle's
    calibration_rows.parquet, find it lacks the id columns and quarantine it, that is move it out
    of the bundle, which then fails its hash check on every later run."""
    from pipeline.landing import check_folders

    (tmp_path / "landing" / "exported" / "machines").mkdir(parents=True)
    check_folders(tmp_path / "landing", tmp_path / "out", tmp_path / "models" / "machines")
    with pytest.raises(ConfigError, match=r"bundle .*machines is inside the landing folder .*landing; keep bundles "
                                          r"elsewhere"):
        check_folders(tmp_path / "landing", tmp_path / "out", tmp_path / "landing" / "exported" / "machines")


def test_unreadable_file_is_skipped_with_a_warning_and_the_others_listed(dirs, monkeypatch, caplog):
    import pipeline.landing as landing_module

    landing, out = dirs
    land(landing, "a.csv")
    locked = land(landing, "locked.csv", "a,b\n5,6\n")
    real_hash = landing_module.sha256_file

    def hash_or_refuse(path):
        # As root a chmod 000 file is still readable, so the refusal is simulated where it happens.
        if Path(path).name == "locked.csv":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_hash(path)

    monkeypatch.setattr(landing_module, "sha256_file", hash_or_refuse)
    with caplog.at_level(logging.WARNING, logger="vaeguard"):
        found = pending_files(landing, Ledger(out))
    assert [f.relative for f in found] == ["a.csv"]
    [warning] = [r for r in caplog.records if r.name == "vaeguard"]
    assert str(locked.resolve()) in warning.getMessage() and "read permission" in warning.getMessage()


def test_a_named_pipe_is_skipped_with_a_warning_not_read(dirs, caplog):
    """`mkfifo landing/pipe.csv`: hashing it blocked the run for ever, holding the lock every later
    run needs. Were it opened, a writer let in after 5 s ends the read, and the pipe is listed."""
    landing, out = dirs
    land(landing, "a.csv")
    pipe = landing / "pipe.csv"
    os.mkfifo(pipe)
    unblock = threading.Timer(5, lambda: os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)))
    unblock.start()
    try:
        with caplog.at_level(logging.WARNING, logger="vaeguard"):
            found = pending_files(landing, Ledger(out), settle_seconds=0)
    finally:
        unblock.cancel()
    assert [f.relative for f in found] == ["a.csv"]
    [warning] = [r.getMessage() for r in caplog.records if r.name == "vaeguard"]
    assert warning.startswith(f"{pipe.resolve()}: skipped, not a regular file (a named pipe)")


def test_a_link_to_nothing_is_skipped_with_a_warning_naming_its_target_and_a_link_to_a_file_is_read(dirs, caplog,
                                                                                                   tmp_path):
    landing, out = dirs
    (landing / "broken.csv").symlink_to("/nonexistent/day.csv")
    (landing / "linked.csv").symlink_to(land(tmp_path, "elsewhere.csv"))
    with caplog.at_level(logging.WARNING, logger="vaeguard"):
        found = pending_files(landing, Ledger(out))
    assert [f.relative for f in found] == ["linked.csv"]
    [warning] = [r.getMessage() for r in caplog.records if r.name == "vaeguard"]
    assert warning.startswith(f"{landing.resolve() / 'broken.csv'}: skipped, a symbolic link to /nonexistent/day.csv, "
                              f"which does not exist")


def test_a_file_dated_in_the_future_is_taken_once_its_size_and_mtime_stay_for_the_settle_time(dirs, monkeypatch,
                                                                                             caplog):
    """`touch -d 2100-01-01 day.csv` (or a copy that kept a bad clock's time): judged by its mtime, it
    waited until 2100. A write sets the mtime to now, so one far ahead was not written now: the run
    watches it for the settle time instead."""
    landing, out = dirs
    ahead = time.time() + 75 * 365 * 86400
    path = land(landing, "day.csv", mtime=ahead)
    waits = []
    monkeypatch.setattr(time, "sleep", waits.append)
    with caplog.at_level(logging.WARNING, logger="vaeguard"):
        [found] = pending_files(landing, Ledger(out), settle_seconds=30)
    assert found.relative == "day.csv" and found.mtime_ns == path.stat().st_mtime_ns
    assert len(waits) == 1 and 29 < waits[0] <= 30
    [warning] = [r.getMessage() for r in caplog.records if r.name == "vaeguard"]
    assert "is 75 years ahead of this machine's clock" in warning and "for 30 s instead" in warning

    ledger = Ledger(out)
    ledger.record({**version(found), "status": "scored"})
    waits.clear()
    assert pending_files(landing, ledger, settle_seconds=30) == [] and waits == []  # done: not watched again


def test_a_file_dated_in_the_future_that_is_written_meanwhile_waits(dirs, monkeypatch):
    """The settle guarantee holds for it too: a writer at work (on a server whose clock is ahead)
    moves its size or mtime within the wait."""
    landing, out = dirs
    path = land(landing, "day.csv", mtime=time.time() + 3600)
    monkeypatch.setattr(time, "sleep", lambda seconds: path.write_text("a,b\n1,2\n3,4\n"))
    assert pending_files(landing, Ledger(out), settle_seconds=30) == []
    slightly_ahead = land(landing, "soon.csv", mtime=time.time() + 30)  # clocks that drift apart: as before
    assert pending_files(landing, Ledger(out), settle_seconds=30) == []
    assert [f.relative for f in pending_files(landing, Ledger(out), settle_seconds=30, now=time.time() + 90)] == [
        "day.csv", slightly_ahead.name]


def test_scored_file_that_changed_or_vanished_meanwhile_is_not_recorded(dirs):
    landing, out = dirs
    ledger = Ledger(out)
    land(landing, "same.csv")
    land(landing, "rewritten.csv")
    land(landing, "gone.csv")
    same, rewritten, gone = sorted(pending_files(landing, ledger), key=lambda f: ["same.csv", "rewritten.csv",
                                                                                  "gone.csv"].index(f.relative))
    outputs = {}
    for item in (same, rewritten, gone):
        outputs[item.relative] = output_path(out, item)
        outputs[item.relative].parent.mkdir(parents=True, exist_ok=True)
        outputs[item.relative].write_bytes(b"scores")
        summary_path(outputs[item.relative]).write_text("{}")
    land(landing, "rewritten.csv", "a,b\n1,2\n3,4\n")  # re-exported while it was scored
    gone.path.unlink()  # retracted while it was scored

    results = {item.relative: record_scored(item, outputs[item.relative], {"rows": 1, "anomalies": 0}, ledger)
               for item in (same, rewritten, gone)}
    assert {k: v["status"] for k, v in results.items()} == {"same.csv": "scored", "rewritten.csv": "changed",
                                                            "gone.csv": "vanished"}
    assert results["rewritten.csv"]["rows"] == 0 and "next run" in results["rewritten.csv"]["reason"]
    assert outputs["same.csv"].exists()
    assert not outputs["rewritten.csv"].exists() and not outputs["gone.csv"].exists()
    assert sorted(p.name for p in (out / "scores").iterdir()) == sorted([outputs["same.csv"].name,
                                                                         summary_path(outputs["same.csv"]).name])
    assert [(e["relative"], e["status"]) for e in ledger.entries()] == [("same.csv", "scored")]
    # The new content is listed again; the vanished file is simply gone.
    [again] = pending_files(landing, ledger)
    assert again.relative == "rewritten.csv" and again.sha256 != rewritten.sha256


def test_only_data_faults_quarantine_and_other_failures_stay_pending(dirs):
    landing, out = dirs
    ledger = Ledger(out)
    for name in ("bad_rows.csv", "empty.csv", "device.csv", "disk.csv"):
        land(landing, name)
    items = {f.relative: f for f in pending_files(landing, ledger)}
    errors = {"bad_rows.csv": DataError("bad_rows.csv: column 'a' row 2: expected a number"),
              "empty.csv": InputFileError("empty.csv: the file is empty"),
              "device.csv": DeviceError("device 'cuda' requested but no GPU is visible"),
              "disk.csv": OSError(errno.ENOSPC, "No space left on device")}
    results = {name: record_failure(out, items[name], error, ledger) for name, error in errors.items()}
    assert {k: v["status"] for k, v in results.items()} == {
        "bad_rows.csv": "quarantined", "empty.csv": "quarantined", "device.csv": "failed", "disk.csv": "failed"}
    assert results["disk.csv"]["reason"] == "[Errno 28] No space left on device"
    assert sorted(p.name for p in landing.iterdir()) == ["device.csv", "disk.csv"]
    assert (out / "quarantine" / "bad_rows.csv").exists()
    failed = [e for e in ledger.entries() if e["status"] == "failed"]
    assert [(e["relative"], e["error"]) for e in failed] == [("device.csv", "DeviceError"), ("disk.csv", "OSError")]
    assert "no GPU" in failed[0]["reason"]
    assert ledger.failures("device.csv", items["device.csv"].sha256) == 1
    # A failed line does not make the version done: the next run retries both.
    assert [f.relative for f in pending_files(landing, ledger)] == ["device.csv", "disk.csv"]

    error = run_failure(list(results.values()))
    assert isinstance(error, LandingRunError)
    message = str(error)
    assert "\n" not in message and message.startswith("2 landed file(s)")
    assert "device.csv: device 'cuda' requested" in message and "retried next run" in message
    assert run_failure([results["bad_rows.csv"]]) is None


def test_failed_file_that_changed_or_vanished_is_neither_quarantined_nor_recorded(dirs):
    landing, out = dirs
    ledger = Ledger(out)
    land(landing, "rewritten.csv", "x\n")
    land(landing, "gone.csv", "x\n")
    rewritten, gone = sorted(pending_files(landing, ledger), key=lambda f: f.relative != "rewritten.csv")
    land(landing, "rewritten.csv", "a,b\n1,2\n")  # fixed upstream while the broken version failed
    gone.path.unlink()
    first = record_failure(out, rewritten, DataError("rewritten.csv: column 'a' missing"), ledger)
    second = record_failure(out, gone, InputFileError("gone.csv: file not found; check the path"), ledger)
    assert (first["status"], second["status"]) == ("changed", "vanished")
    assert "column 'a' missing" in first["reason"]
    assert ledger.entries() == [] and not (out / "quarantine").exists()
    assert (landing / "rewritten.csv").read_text() == "a,b\n1,2\n"
    # quarantine() itself refuses a file gone since listing instead of raising FileNotFoundError.
    assert quarantine(out, gone, "whatever", ledger) is None
    assert ledger.entries() == [] and not list(out.rglob("*.reason.txt"))


def test_quarantine_survives_the_file_vanishing_between_check_and_move(dirs, monkeypatch):
    import pipeline.landing as landing_module

    landing, out = dirs
    ledger = Ledger(out)
    land(landing, "racy.csv")
    [landed] = pending_files(landing, ledger)
    real_move = landing_module.move_file

    def delete_then_move(source, target):
        Path(source).unlink()  # the upstream retracts the file just before the move
        real_move(source, target)

    monkeypatch.setattr(landing_module, "move_file", delete_then_move)
    assert quarantine(out, landed, "column 'a' missing", ledger) is None
    assert ledger.entries() == [] and not list(out.rglob("*.reason.txt"))
    assert record_failure(out, landed, DataError("x"), ledger)["status"] == "vanished"


def test_a_quarantine_folder_that_cannot_be_written_leaves_the_file_failed_for_the_next_run(dirs):
    """The write failure while quarantining ended the run with a traceback before the files scored
    with it were recorded: they were scored again every run, and crashed it again."""
    landing, out = dirs
    ledger = Ledger(out)
    land(landing, "bad.csv")
    [landed] = pending_files(landing, ledger)
    out.mkdir()
    (out / "quarantine").write_text("in the way")  # as unwritable as a read-only folder, for root too
    entry = record_failure(out, landed, DataError("bad.csv: column 'a' row 2: expected a number"), ledger)
    assert entry["status"] == "failed"
    assert entry["reason"].startswith("bad.csv: column 'a' row 2: expected a number; could not be quarantined (")
    assert "tried again next run" in entry["reason"] and "\n" not in entry["reason"]
    assert [(e["relative"], e["status"]) for e in ledger.entries()] == [("bad.csv", "failed")]
    assert landed.path.exists() and [f.relative for f in pending_files(landing, ledger)] == ["bad.csv"]


def test_a_failure_the_ledger_cannot_record_is_reported_not_raised(dirs):
    from pipeline.landing import record_failed

    landing, out = dirs
    land(landing, "a.csv")
    [landed] = pending_files(landing, Ledger(out))
    out.mkdir()
    (out / "ledger.jsonl").mkdir()  # the ledger can't be opened for appending
    entry = record_failed(landed, "no GPU", "DeviceError", Ledger(out))
    assert entry["status"] == "failed" and entry["reason"].startswith("no GPU (the ledger could not record it either: ")


def test_a_name_that_is_not_utf8_is_a_fault_of_the_file_shown_escaped(dirs):
    from pipeline.landing import name_fault
    from pipeline.outputs import text_path

    landing, out = dirs
    land(landing, "caf\udce9.csv")  # os.fsdecode(b"caf\xe9.csv")
    land(landing, "café.csv")
    weird, fine = sorted(pending_files(landing, Ledger(out)), key=lambda f: f.relative.isprintable())
    assert name_fault(fine) is None
    fault = name_fault(weird)
    assert isinstance(fault, InputFileError) and r"landed file caf\xe9.csv: the path is not UTF-8" in str(fault)
    assert text_path(weird.relative) == r"caf\xe9.csv" and text_path(fine.relative) == "café.csv"
    entry = record_failure(out, weird, fault, Ledger(out))
    assert entry["status"] == "quarantined"
    assert r"file: caf\xe9.csv" in (out / "quarantine" / "caf\udce9.csv.reason.txt").read_text()
    assert pending_files(landing, Ledger(out)) == [fine]


def test_header_only_file_is_done_as_empty_unless_it_changed_meanwhile(dirs):
    landing, out = dirs
    ledger = Ledger(out)
    land(landing, "quiet.csv", "a,b\n")
    land(landing, "refilled.csv", "a,b\n")
    quiet, refilled = sorted(pending_files(landing, ledger), key=lambda f: f.relative != "quiet.csv")
    land(landing, "refilled.csv", "a,b\n1,2\n")  # the day's rows arrived after all
    assert record_empty(quiet, ledger)["status"] == "empty"
    assert record_empty(refilled, ledger)["status"] == "changed"
    assert [(e["relative"], e["status"]) for e in ledger.entries()] == [("quiet.csv", "empty")]
    assert [f.relative for f in pending_files(landing, ledger)] == ["refilled.csv"]
    assert (landing / "quiet.csv").exists() and not (out / "scores").exists()


# --- the serve and landing jobs (pipeline/config.py): checked when built, shared by the CLI and the flow


def landing_job(tmp_path: Path, **values) -> LandingJob:
    return LandingJob(**{"bundle": tmp_path / "bundle", "watch": tmp_path / "landing", "output": tmp_path / "out",
                         **values})


@pytest.mark.parametrize("values, message", [
    ({"max_psi": -1.0}, r"^landing\.max_psi \(--max-psi\) must be a number above 0, got -1\.0; e\.g\. --max-psi 0\.25"),
    ({"max_psi": float("nan")}, r"--max-psi\) must be a number above 0, got nan"),
    ({"max_psi": float("inf")}, r"--max-psi\) must be a number above 0, got inf"),
    ({"rate_p_value": 0.0}, r"--rate-p-value\) must be a number above 0 and below 1, got 0\.0"),
    ({"rate_p_value": 1.0}, r"--rate-p-value\) must be a number above 0 and below 1, got 1\.0"),
    ({"settle_seconds": -0.5}, r"--settle-seconds\) must be a number of at least 0, got -0\.5"),
    ({"settle_seconds": True}, r"--settle-seconds\) must be a number of at least 0, got True"),
    ({"device": "gpu"}, r"^landing\.device \(--device\) must be one of auto, cpu, cuda, got 'gpu'; e\.g\. --device "
                        r"cpu"),
    ({"device": 3}, r"^landing\.device \(--device\) must be one of auto, cpu, cuda, got 3; e\.g\."),
    ({"batch_size": 0}, r"^landing\.batch_size must be a whole number of rows of at least 1, got 0; e\.g\. batch_size "
                        r"65536"),
])
def test_landing_job_refuses_values_out_of_range(tmp_path, values, message):
    with pytest.raises(ConfigError, match=message):
        landing_job(tmp_path, **values)


@pytest.mark.parametrize("key, value, shown", [("watch", "", "''"), ("watch", ".", "'.'"),
                                               ("output", "scored", "'scored'"), ("bundle", Path("exported/m"),
                                                                                   "'exported/m'"),
                                               ("watch", None, "None")])
def test_landing_job_paths_must_be_absolute(tmp_path, key, value, shown):
    """A deployment run started by hand (`prefect deployment run ... --param watch=`) starts in the
    folder `vaeguard serve` was started in: an empty or relative path pointed the run at that
    folder, whose files it scored and quarantined (moved away)."""
    with pytest.raises(ConfigError, match=rf"^landing\.{key} \(.*\) must be an absolute path, got {shown}; name it "
                                          rf"from the root, e\.g\. /"):
        landing_job(tmp_path, **{key: value})


def test_landing_job_parameters_are_json_and_rebuild_the_same_job(tmp_path):
    """A deployment stores the flow's parameters as JSON and each run builds the job from them."""
    job = landing_job(tmp_path, settle_seconds=0.5, device="cpu", max_psi=0.5, rate_p_value=0.01)
    parameters = json.loads(json.dumps(job.parameters()))
    assert parameters["bundle"] == str(tmp_path / "bundle") and parameters["max_psi"] == 0.5
    assert LandingJob(**parameters) == job


@pytest.mark.parametrize("schedule, message", [
    ({}, r"give exactly one schedule: --cron EXPR or --interval SECONDS"),
    ({"cron": "0 * * * *", "interval": 60.0}, r"give exactly one schedule"),
    ({"cron": "  "}, r"--cron must be a cron expression, got '  '"),
    ({"interval": 0.0}, r"--interval must be a number of seconds above 0 and at most 31622400 \(366 days\), got 0\.0"),
    ({"interval": -5}, r"--interval must be a number of seconds above 0 .*got -5"),
    ({"interval": float("inf")}, r"--interval must be a number of seconds above 0 .*got inf"),
    ({"interval": 1e15}, r"--interval must be a number of seconds above 0 .*got 1000000000000000\.0"),
    ({"interval": 60.0, "name": ""}, r"--name must be a deployment name, got ''"),
])
def test_serve_job_needs_exactly_one_valid_schedule(tmp_path, schedule, message):
    with pytest.raises(ConfigError, match=message):
        ServeJob(landing=landing_job(tmp_path), **schedule)


def test_serve_job_names_its_deployment_after_the_bundle_unless_named(tmp_path):
    assert ServeJob(landing=landing_job(tmp_path), interval=0.5).deployment_name("machines") == "vaeguard-machines"
    assert ServeJob(landing=landing_job(tmp_path), cron="0 * * * *", name="nightly").deployment_name("m") == "nightly"
