"""Which files in a landing folder still need scoring, and the record of what has been scored.

A scheduled run lists the landing folder, scores what ``pending_files`` returns and appends one
ledger line per file once its output is in place. The pieces are built so that together they
score every landed file exactly once:

- a file is keyed by (relative path, sha256): new content under the same name is a new version
  and is scored again, the same content is never scored twice;
- an output folder serves one landing folder (``claim_output``): its ledger keys files by their
  path inside the landing folder, so a day.csv landed in two folders sharing it was one key, and
  the second was never scored;
- a file whose (relative path, size, mtime_ns) matches a version recorded as done is not hashed
  again: hashing every file still in the folder re-read all the history on every run;
- a file whose mtime moved within ``settle_seconds`` is still being written and waits; one whose
  mtime is far in the future was not written now (a write sets it to now), so it is watched for
  ``settle_seconds`` instead, and taken when neither its size nor its mtime moved;
- only regular files (or links to them) are read: a named pipe would block the run, holding the
  lock every later run needs, and a link to nothing would be skipped without a word;
- the output name is a function of (relative path, sha256), one output per landed file, so a run
  killed after writing the output but before the ledger line rewrites the same file on restart
  instead of adding one;
- the ledger is appended with fsync and a torn last line is ignored, so a killed run leaves a
  readable ledger;
- ``run_lock`` keeps overlapping runs apart with a kernel lock that dies with its process;
- ``quarantine`` takes a file whose data keeps failing out of the landing folder, with the
  reason beside it, so it stops being retried; a failure outside the file (device, full disk,
  unwritable output or quarantine folder) is recorded as "failed" and leaves the file to be
  retried next run;
- a file rewritten or deleted between listing and the end of its scoring is neither recorded
  nor quarantined: what was read belongs to no complete version, and the next run lists the
  new content.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

from pipeline.bundle import Bundle, sha256_file
from pipeline.errors import ConfigError, DataError, EmptyInputError, InputFileError, PipelineError, one_line
from pipeline.outputs import (check_utf8_path, figures_dir, make_parents, remove_empty_folders, report_path,
                              summary_path, temp_path, text_path, write_atomic)
from pipeline.signals import signals_held

log = logging.getLogger("vaeguard")

LEDGER_NAME = "ledger.jsonl"
LOCK_NAME = ".run.lock"
CLAIM_NAME = "landing.json"  # which landing folder the output folder serves
# How long `vaeguard serve` waits for a run holding the output folder's lock to write its claim.
CLAIM_WAIT_SECONDS = 5.0
SCORES_DIR = "scores"
QUARANTINE_DIR = "quarantine"
REASON_SUFFIX = ".reason.txt"  # beside each quarantined file
# Copies of one content under one name that quarantine names fit for (a name shortened for it).
QUARANTINE_COPIES = 9999
DEFAULT_PATTERNS = ("*.csv", "*.csv.gz", "*.parquet", "*.pq")
# "failed" lines record a version that could not be scored for a reason outside its data (device,
# disk, permissions); only the final states make a version done, so a failed one is retried.
# "empty" lines record a file with its header but no data rows (a day without events): nothing to
# score and nothing wrong with it, so it is done without an output and without quarantine.
STATUSES = ("scored", "empty", "quarantined", "failed")
DONE_STATUSES = frozenset({"scored", "empty", "quarantined"})
# Only these say the file's own content is unusable: retrying it unchanged cannot help, so it is
# quarantined. Anything else is the machine's fault, and quarantining would punish good data.
DATA_FAULTS = (DataError, InputFileError)
# A write sets a file's mtime to the writer's now, so an mtime further ahead than clocks drift was
# set otherwise (a copy that kept a bad clock's time, `touch -d`) and says nothing about writing now.
FUTURE_MTIME_SECONDS = 60.0
# Bytes in one file name on Linux's file systems (ext4, xfs, btrfs, tmpfs); PC_NAME_MAX says 255.
NAME_MAX = 255


class LedgerError(PipelineError, ValueError):
    """The ledger file is unreadable, or an entry to record is incomplete."""


class LandingRunError(PipelineError, RuntimeError):
    """Landed files failed to score for a reason outside their data; they stay for the next run."""


@dataclass(frozen=True)
class LandedFile:
    path: Path  # absolute path in the landing folder
    relative: str  # path relative to the landing folder, '/'-separated (the ledger key)
    sha256: str
    size: int
    # With size, what the file looked like when hashed: a different pair later means it was
    # rewritten, and the hash (and any output read since) no longer describes it.
    mtime_ns: int


class Ledger:
    """Append-only JSON-lines record (OUT_DIR/ledger.jsonl) of every file scored or quarantined."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LEDGER_NAME

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        # Every acknowledged append ends with a newline, so whatever follows the last one is a
        # run killed mid-append; record() cuts it, so reading must not count it either.
        complete = self.path.read_bytes().split(b"\n")[:-1]
        return [self._parse(line, number) for number, line in enumerate(complete, start=1) if line.strip()]

    def _parse(self, line: bytes, number: int) -> dict:
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise LedgerError(
                f"{self.path}:{number}: expected one JSON object per line, got {line[:80]!r} ({exc}); "
                f"the ledger was edited by hand or corrupted: fix or delete that line (deleting it means "
                f"that file is scored again)"
            ) from None
        if not isinstance(entry, dict):
            raise LedgerError(f"{self.path}:{number}: expected a JSON object, got {type(entry).__name__}; "
                              f"fix or delete that line")
        return entry

    def done_keys(self) -> set[tuple[str, str]]:
        """(relative, sha256) of every version scored or quarantined; read once per listing."""
        return {(e.get("relative"), e.get("sha256")) for e in self.entries() if e.get("status") in DONE_STATUSES}

    def done_stats(self) -> set[tuple[str, int, int]]:
        """(relative, size, mtime_ns) of every version done, where recorded (ledgers written before
        they were recorded lack them: those files are hashed as before)."""
        return {(e["relative"], e["size"], e["mtime_ns"]) for e in self.entries()
                if e.get("status") in DONE_STATUSES and isinstance(e.get("size"), int)
                and isinstance(e.get("mtime_ns"), int)}

    def done(self, relative: str, sha256: str) -> bool:
        return (relative, sha256) in self.done_keys()

    def failures(self, relative: str, sha256: str) -> int:
        """How many runs failed to score this version for a reason outside its data."""
        return sum(1 for e in self.entries()
                   if e.get("status") == "failed" and e.get("relative") == relative and e.get("sha256") == sha256)

    def record(self, entry: dict) -> None:
        line = self._line(entry)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._drop_torn_tail()
        with open(self.path, "ab") as handle:
            handle.write(line)
            handle.flush()
            # The caller treats a returned record() as "this file will never be scored again".
            os.fsync(handle.fileno())

    def _line(self, entry: dict) -> bytes:
        missing = [key for key in ("relative", "sha256", "status") if not entry.get(key)]
        if missing:
            raise LedgerError(f"ledger entry for {entry.get('relative', '?')!r} lacks {missing}; "
                              f"every entry needs relative, sha256 and status")
        if entry["status"] not in STATUSES:
            raise LedgerError(f"ledger entry for {entry['relative']!r}: expected status in {STATUSES}, "
                              f"got {entry['status']!r}")
        full = {**entry, "recorded_at": utc_now()}
        try:
            text = json.dumps(full, allow_nan=False, default=_json_default)
        except (TypeError, ValueError) as exc:
            raise LedgerError(f"ledger entry for {entry['relative']!r} is not valid JSON ({exc}); "
                              f"pass plain numbers and strings, with None for NaN / infinity") from None
        return (text + "\n").encode()

    def _drop_torn_tail(self) -> None:
        # Appending after a torn line would glue the new entry onto it and corrupt both; the
        # torn fragment was never acknowledged, so cutting it loses nothing.
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) == b"\n":
                return
            handle.seek(0)
            handle.truncate(handle.read().rfind(b"\n") + 1)
            handle.flush()
            os.fsync(handle.fileno())


def _json_default(value):
    # Numpy scalars and paths come straight from scoring summaries; anything else is a bug.
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


@contextmanager
def run_lock(out_dir: Path) -> Iterator[bool]:
    """fcntl.flock(LOCK_EX | LOCK_NB) on OUT_DIR/.run.lock; yields True if acquired, False if another run holds it.

    The kernel drops a flock when its process dies, so a killed run never leaves a stale lock.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # "a" rather than "w": opening must not truncate the holder's pid before we own the lock.
    with open(out_dir / LOCK_NAME, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            _write_holder(handle)
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _write_holder(handle) -> None:
    # Only for a person wondering which process holds the lock; the lock itself is the flock.
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()


def pending_files(landing_dir: Path, ledger: Ledger, settle_seconds: float = 30.0,
                  patterns: tuple[str, ...] = DEFAULT_PATTERNS, now: float | None = None) -> list[LandedFile]:
    """Landed files not yet scored or quarantined with their current content, sorted by relative path.

    Recursive. Skips hidden files and folders (writers' temp files: rsync and curl write
    ``.name.tmp`` beside the final name), names matching none of ``patterns`` (case-insensitive,
    like the readers), entries that are not regular files (warned: ``regular_file``), and files
    whose mtime is younger than ``settle_seconds``: a writer keeps moving mtime, so a file that has
    been still that long is taken as complete. A file whose mtime is more than
    FUTURE_MTIME_SECONDS ahead can't be judged so (it would wait until then, forever with a bad
    clock): it is watched for ``settle_seconds``, once for all such files, and taken if its size
    and mtime stayed. A file whose size and mtime_ns are those recorded with a done version of
    its path is that version, and is not read again: the folder keeps every file ever landed, and
    hashing them all re-read the whole history (on a mounted bucket, downloaded it) on every run.
    """
    landing_dir = Path(landing_dir).resolve()
    if not landing_dir.is_dir():
        raise LedgerError(f"landing folder {landing_dir} does not exist or is not a folder; "
                          f"create it or fix the path")
    now = time.time() if now is None else now
    done, unchanged = ledger.done_keys(), ledger.done_stats()
    found, ahead = [], []
    for path in candidate_paths(landing_dir, patterns):
        status = regular_file(path)
        if status is None:
            continue
        relative = path.relative_to(landing_dir).as_posix()
        if (relative, status.st_size, status.st_mtime_ns) in unchanged:
            continue
        if status.st_mtime - now > FUTURE_MTIME_SECONDS:
            ahead.append((path, status))
            last_ahead = time.monotonic()
        else:
            found.append(settled_file(path, landing_dir, settle_seconds, now))
    if ahead:
        found.extend(still_files(ahead, landing_dir, settle_seconds, now, last_ahead))
    pending = [landed for landed in found if landed is not None and (landed.relative, landed.sha256) not in done]
    return sorted(pending, key=lambda f: f.relative)


def candidate_paths(landing_dir: Path, patterns: tuple[str, ...]) -> Iterator[Path]:
    lowered = tuple(pattern.lower() for pattern in patterns)
    for folder, dirs, files in os.walk(landing_dir):
        # Pruning in place stops os.walk from descending into them at all. A folder named like
        # OUT/quarantine is not skipped: outputs are never inside the landing folder
        # (check_folders), so it is the upstream's own folder.
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and any(fnmatchcase(name.lower(), p) for p in lowered):
                yield Path(folder) / name


def regular_file(path: Path) -> os.stat_result | None:
    """The stat of a listed file, a link followed, or None, with a warning for what is no file.

    os.walk lists whatever is not a folder: a named pipe (FIFO) hung the run in its first read,
    holding the lock, so every later run skipped; a link to nothing was skipped without a word.
    A file that vanished since the listing is skipped quietly: nothing was there to score.
    """
    try:
        status = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            log.warning("%s: skipped, a symbolic link to %s, which does not exist; expected a landed file: "
                        "point the link at the file, or remove it", path, _link_target(path))
        return None
    except PermissionError as exc:  # a folder on its way that this user may not search
        _warn_unreadable(path, exc)
        return None
    except OSError as exc:  # a loop of links (ELOOP), a name too long to follow
        log.warning("%s: skipped, it can't be followed to a file (%s); expected a landed file", path,
                    exc.strerror or exc)
        return None
    if not stat.S_ISREG(status.st_mode):
        log.warning("%s: skipped, not a regular file (%s); expected a landed file: only files are scored, "
                    "remove it or land a file there", path, _file_kind(status.st_mode))
        return None
    return status


def _link_target(path: Path) -> str:
    try:
        return text_path(os.readlink(path))
    except OSError:
        return "?"


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a file"


def settled_file(path: Path, landing_dir: Path, settle_seconds: float, now: float,
                 still: os.stat_result | None = None) -> LandedFile | None:
    """The file with its hash, or None when it is still being written, vanished meanwhile or is unreadable.

    Settled: its mtime at least ``settle_seconds`` old, or, given ``still`` (how it was at least
    that long ago), its size and mtime unchanged since.
    """
    try:
        before = path.stat()
        if still is not None:
            if (before.st_size, before.st_mtime_ns) != (still.st_size, still.st_mtime_ns):
                return None
        elif now - before.st_mtime < settle_seconds:
            return None
        digest = sha256_file(path)
        after = path.stat()
    except FileNotFoundError:
        return None  # moved or deleted between listing and reading: nothing to score
    except PermissionError as exc:
        _warn_unreadable(path, exc)
        return None
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        return None  # written to while hashing: the hash matches no complete version
    relative = path.relative_to(landing_dir).as_posix()
    return LandedFile(path=path, relative=relative, sha256=digest, size=after.st_size, mtime_ns=after.st_mtime_ns)


def _warn_unreadable(path: Path, exc: OSError) -> None:
    # One file a writer left unreadable must not stop the others from being scored.
    log.warning("%s: skipped, this process may not read it (%s); expected a readable landed file: "
                "give the user running the flow read permission, and it is scored next run",
                path, exc.strerror or exc)


def still_files(ahead: list[tuple[Path, os.stat_result]], landing_dir: Path, settle_seconds: float,
                now: float, listed: float) -> list[LandedFile | None]:
    """Files with an mtime far ahead (``ahead``: each with its stat when listed, the last at
    time.monotonic() ``listed``), judged by their size and mtime staying the same for
    ``settle_seconds`` from then, waited once for them all.

    Their mtime was not set by a write now (one would set it to now): judged by it, they waited
    until that time came, forever with a clock set years ahead. A writer still at work moves the
    size or the mtime within the wait, and its file waits for the next run.
    """
    for path, status in ahead:
        log.warning("%s: its mtime, %s, is %s ahead of this machine's clock (a copy that kept a wrong clock's "
                    "time?); judged settled if its size and mtime stay the same for %g s instead", path,
                    datetime.fromtimestamp(status.st_mtime, timezone.utc).isoformat(timespec="seconds"),
                    _duration(status.st_mtime - now), settle_seconds)
    # Watched since they were listed: hashing the others counted towards the wait.
    time.sleep(max(0.0, settle_seconds - (time.monotonic() - listed)))
    return [settled_file(path, landing_dir, settle_seconds, now, still=status) for path, status in ahead]


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def change_since_listing(landed: LandedFile) -> str | None:
    """'vanished' or 'changed' (size or mtime_ns differ) when the file is no longer the version listed, else None."""
    try:
        current = landed.path.stat()
    except FileNotFoundError:
        return "vanished"
    if (current.st_size, current.st_mtime_ns) != (landed.size, landed.mtime_ns):
        return "changed"
    return None


def record_scored(landed: LandedFile, output: Path, result: dict, ledger: Ledger) -> dict:
    """Record a file whose output is in place; its run-report entry, status 'scored', 'changed' or 'vanished'.

    A file rewritten or deleted while it was scored may have been read half old, half new: its
    output (and the summary beside it) is deleted and nothing is recorded, so the next run scores whatever is there then.
    Checked after scoring: a change after this check came after the read, so the output holds.
    """
    change = change_since_listing(landed)
    if change:
        Path(output).unlink(missing_ok=True)
        summary_path(Path(output)).unlink(missing_ok=True)
        return {"file": landed.relative, "status": change, "rows": 0, "anomalies": 0,
                "reason": f"{change} while being scored; output discarded, its current content is scored next run"}
    ledger.record({**version(landed), "status": "scored", "output": str(output), **result})
    return {"file": landed.relative, "status": "scored", **result}


def record_empty(landed: LandedFile, ledger: Ledger) -> dict:
    """Record a file with the bundle's columns but no data rows as done, with no output and no
    quarantine; its run-report entry, status 'empty', or 'changed' / 'vanished' (nothing recorded)."""
    entry = {"file": landed.relative, "rows": 0, "anomalies": 0}
    change = change_since_listing(landed)
    if change:
        return {**entry, "status": change,
                "reason": f"{change} while being read (it had no data rows); its current content is scored next run"}
    ledger.record({**version(landed), "status": "empty", "rows": 0, "anomalies": 0})
    return {**entry, "status": "empty", "reason": "header only, no data rows: nothing to score"}


def version(landed: LandedFile) -> dict:
    """What the ledger records of a landed file: its key, and the size and mtime_ns that let a
    later listing know it unchanged without reading it."""
    return {"relative": landed.relative, "sha256": landed.sha256, "size": landed.size, "mtime_ns": landed.mtime_ns}


def name_fault(landed: LandedFile) -> InputFileError | None:
    """The error for a landed file whose path is not UTF-8 text, which the readers can't open, or None.

    Such a name can't be scored under any retry, and is quarantined like bad data: it failed in
    its task with ConfigError (so a 'failed' line, retried every run), and then the run itself,
    sending its name to Prefect in the run's artifact.
    """
    try:
        check_utf8_path(landed.relative, "landed file", InputFileError)
    except InputFileError as exc:
        return exc
    return None


def record_failure(out_dir: Path, landed: LandedFile, error: BaseException, ledger: Ledger) -> dict:
    """Settle a file whose scoring still failed after retries; its run-report entry.

    'empty' for a file with the bundle's columns but no rows (``record_empty``);
    'quarantined' for another fault in the file's data (DATA_FAULTS); 'changed' / 'vanished' when the
    file moved on meanwhile (the error may be about content that is gone: nothing recorded, the
    next run tries the new content); otherwise 'failed': a ledger line, and the file stays.
    """
    if isinstance(error, EmptyInputError):
        return record_empty(landed, ledger)
    reason = one_line(error)
    entry = {"file": landed.relative, "rows": 0, "anomalies": 0}
    change = change_since_listing(landed)
    if change is None and isinstance(error, DATA_FAULTS):
        try:
            moved = quarantine(out_dir, landed, reason, ledger)
        except OSError as exc:  # an unwritable or full quarantine folder must not stop the run
            if not landed.path.exists():
                # Moved, with its reason, but not recorded: out of the landing folder all the same.
                return {**entry, "status": "quarantined",
                        "reason": f"{reason} (the ledger could not record it: {one_line(exc)})"}
            return record_failed(landed, f"{reason}; could not be quarantined ({one_line(exc)}): it stays in the "
                                         f"landing folder and is tried again next run; "
                                         f"{_quarantine_fix(Path(out_dir) / QUARANTINE_DIR, exc)}",
                                 type(exc).__name__, ledger)
        if moved is not None:
            return {**entry, "status": "quarantined", "reason": reason}
        change = change_since_listing(landed) or "vanished"  # moved on between the check and the move
    if change:
        return {**entry, "status": change,
                "reason": f"{change} while being scored (scoring failed: {reason}); not quarantined, "
                          f"its current content is tried next run"}
    return record_failed(landed, reason, type(error).__name__, ledger)


def _quarantine_fix(folder: Path, exc: OSError) -> str:
    """What to do about a quarantine that failed with ``exc``: "make it writable" was said of every
    failure, a full disk and a name too long included."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR):
        return f"make {folder} a folder this user can write"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free space where {folder} is"
    return f"fix that, and it is quarantined in {folder} then"


def record_failed(landed: LandedFile, reason: str, error: str, ledger: Ledger) -> dict:
    """Record a version that stays in the landing folder for the next run; its run-report entry, status 'failed'.

    A ledger that can't be written either (full disk) is said in the reason, not raised: the run
    still settles its other files and publishes its report, and the version is retried anyway.
    """
    try:
        ledger.record({**version(landed), "status": "failed", "reason": reason, "error": error})
    except OSError as exc:
        reason = f"{reason} (the ledger could not record it either: {one_line(exc)})"
    return {"file": landed.relative, "rows": 0, "anomalies": 0, "status": "failed", "reason": reason}


def run_failure(files: list[dict]) -> LandingRunError | None:
    """The error that fails a run in which files failed outside their data, or None when none did."""
    failed = [f for f in files if f["status"] == "failed"]
    if not failed:
        return None
    return LandingRunError(
        f"{len(failed)} landed file(s) could not be scored for a reason outside their data (first: "
        f"{text_path(failed[0]['file'])}: {failed[0]['reason']}); expected every file to score or be quarantined: "
        f"they stay in the landing folder and are retried next run, once the cause (device, disk space, "
        f"permissions) is fixed")


def output_path(out_dir: Path, landed: LandedFile, suffix: str = ".parquet") -> Path:
    """OUT_DIR/scores/<relative>.<sha256[:12]><suffix>, subfolders mirrored; a name too long for
    it is shortened (``fitted_name``).

    Deterministic per (relative, content): re-scoring after a crash overwrites the same file
    instead of adding a duplicate; a changed file gets a new output next to the old one. The
    file's whole name, suffix included: x.parquet and x.pq (or x.csv and x.CSV) with the same
    bytes are two landed files, each with its own output, where one output named after the stem
    was written by both, and discarding one (rewritten while scored) took the other's too.
    """
    relative = PurePosixPath(landed.relative)
    tag = f".{landed.sha256[:12]}{suffix}"
    name = fitted_name(relative.name, lambda base: _output_names(base + tag)) + tag
    return Path(out_dir) / SCORES_DIR / Path(*relative.parent.parts) / name


def _output_names(name: str) -> list[str]:
    """The names scoring writes, reads or removes for an output named ``name``: it, its summary,
    its report and the report's figures folder, and the hidden temporary name of each."""
    output = Path(name)
    paths = [output, summary_path(output), report_path(output), figures_dir(report_path(output))]
    return [path.name for path in paths] + [temp_path(path).name for path in paths]


def fitted_name(name: str, derived: Callable[[str], list[str]]) -> str:
    """``name`` itself when every name ``derived`` from it fits in NAME_MAX bytes; else its first
    bytes, "~", 8 hex digits of the sha1 of the whole name and its extension, as many first bytes
    as leave every derived name within NAME_MAX, e.g. "売上売上…売上~3f2a9c1b.csv".

    A landed name is at most NAME_MAX bytes itself, and the run writes names longer by up to 40:
    a name of 72 CJK characters (220 bytes) was never scored, nor quarantined, and failed every
    run on ENAMETOOLONG. The digest keeps apart long names that begin alike, as anomaly_maps.map_name
    does, and is the same on every run, so a rerun overwrites its output rather than adding one.
    """
    def longest(candidate: str) -> int:
        return max(len(os.fsencode(item)) for item in derived(candidate))

    if longest(name) <= NAME_MAX:
        return name
    extension = _extension(name)
    start = os.fsencode(name[:len(name) - len(extension)])
    tag = f"~{hashlib.sha1(os.fsencode(name)).hexdigest()[:8]}{extension}"
    keep, fitted = len(start), name
    while keep > 0 and longest(fitted) > NAME_MAX:
        keep = max(0, keep - (longest(fitted) - NAME_MAX))
        while 0 < keep < len(start) and (start[keep] & 0xC0) == 0x80:
            keep -= 1  # a UTF-8 character is cut before its first byte, never inside it
        fitted = os.fsdecode(start[:keep]) + tag
    return fitted


def _extension(name: str) -> str:
    """The landed format's extension of ``name`` (".csv.gz", ".CSV"), as written; else its last
    suffix, where short: a shortened name still says what it holds."""
    lowered = name.lower()
    known = [len(pattern) - 1 for pattern in DEFAULT_PATTERNS if lowered.endswith(pattern[1:])]
    if known:
        return name[-max(known):]
    suffix = PurePosixPath(name).suffix
    return suffix if len(os.fsencode(suffix)) <= 16 else ""


def quarantine(out_dir: Path, landed: LandedFile, reason: str, ledger: Ledger) -> Path | None:
    """Move a landed file to OUT_DIR/quarantine/<relative>, with <that path>.reason.txt, and record it.

    Order matters for a run killed midway: the reason file is written before the move, so a
    quarantined file is never without its reason; the ledger line comes last, and a file moved
    but not yet recorded is already out of the landing folder, so it is not retried either.
    Returns None, moving and recording nothing, when the file is no longer the version listed:
    the reason was about content that is gone.
    """
    if change_since_listing(landed):
        return None
    target = free_quarantine_path(Path(out_dir), landed)
    target.parent.mkdir(parents=True, exist_ok=True)
    reason_path = target.with_name(target.name + REASON_SUFFIX)
    write_atomic(reason_path, reason_text(landed, reason))
    try:
        move_file(landed.path, target)
    except FileNotFoundError:
        if landed.path.exists():
            _remove_quietly(reason_path)
            raise  # not the file vanishing: something else is missing, and hiding it would hide a bug
        reason_path.unlink(missing_ok=True)  # deleted between the check and the move
        return None
    except OSError:
        _remove_quietly(reason_path)  # the file stays: a reason beside nothing would say it was quarantined
        raise
    ledger.record({**version(landed), "status": "quarantined", "reason": reason, "quarantined_to": str(target)})
    return target


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # the error being raised says more than this one


def free_quarantine_path(out_dir: Path, landed: LandedFile) -> Path:
    """OUT_DIR/quarantine/<relative>, subfolders mirrored, its name shortened where too long
    (``fitted_name``); <stem>.<sha256[:12]><suffix>, then -2, -3 ..., where that is taken."""
    relative = PurePosixPath(landed.relative)
    folder = out_dir / QUARANTINE_DIR / Path(*relative.parent.parts)
    name = PurePosixPath(fitted_name(relative.name, _quarantine_names))
    first = folder / name.name
    if not first.exists():
        return first
    tagged = f"{name.stem}.{landed.sha256[:12]}"
    candidate, n = folder / f"{tagged}{name.suffix}", 2
    # The same content can be quarantined twice (landed again after the first time).
    while candidate.exists():
        candidate, n = folder / f"{tagged}-{n}{name.suffix}", n + 1
    return candidate


def _quarantine_names(name: str) -> list[str]:
    """The names quarantine writes for a file quarantined as ``name``: it, its reason, each one's
    temporary name (a move across file systems copies to one), and the same for its tagged
    names, up to QUARANTINE_COPIES copies of one content."""
    path = PurePosixPath(name)
    tagged = f"{path.stem}.{'0' * 12}-{QUARANTINE_COPIES}{path.suffix}"
    return [item for base in (name, tagged) for written in (base, base + REASON_SUFFIX)
            for item in (written, temp_path(Path(written)).name)]


def reason_text(landed: LandedFile, reason: str) -> str:
    return (f"file: {text_path(landed.relative)}\n"
            f"sha256: {landed.sha256}\n"
            f"size: {landed.size}\n"
            f"quarantined_at: {utc_now()}\n"
            f"reason: {reason}\n"
            f"to retry: fix the file and copy it back into the landing folder; "
            f"new content is scored as a new version\n")


def move_file(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # Across filesystems a plain shutil.move could leave a half-copied file under the final
        # name if killed; copy beside it, rename into place, then delete the original.
        temp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copy2(source, temp)
        os.replace(temp, target)
        os.unlink(source)


def check_folders(landing_dir: Path, out_dir: Path, bundle_dir: Path | None = None) -> None:
    """The landing folder a folder, the output folder one this user can create or write, and
    serving this landing folder alone, or a one-line ConfigError; `vaeguard serve` checks before
    serving, and each run again.

    Neither the output folder nor the bundle may sit inside the landing folder: scores would be
    re-scored, and the bundle's calibration_rows.parquet scored, found wanting and quarantined,
    that is moved out of the bundle, which then fails its hash check on every later run."""
    landing, out = Path(landing_dir).resolve(), Path(out_dir).resolve()
    if landing.exists() and not landing.is_dir():
        raise ConfigError(f"landing folder {landing_dir} is a file, not a folder; --watch takes the folder files "
                          f"land in (this file's is {landing.parent})")
    if not landing.is_dir():
        raise ConfigError(f"landing folder {landing_dir} does not exist; create it or fix the path")
    check_utf8_path(landing, "landing folder")
    check_utf8_path(out, "output folder")
    if out == landing or out.is_relative_to(landing):
        raise ConfigError(f"output folder {out_dir} is inside the landing folder {landing_dir}; "
                          f"put outputs elsewhere, or their scores would be scored as landed files")
    if bundle_dir is not None and Path(bundle_dir).resolve().is_relative_to(landing):
        raise ConfigError(f"bundle {bundle_dir} is inside the landing folder {landing_dir}; keep bundles elsewhere, "
                          f"or the runs would score its files as landed ones and quarantine (move) them out of it")
    check_output_folder(out_dir)
    claimed = claimed_landing(out)
    if claimed is not None and claimed != landing:
        raise _claimed_by(out_dir, claimed, landing_dir)


def check_table_bundle(bundle: Bundle) -> None:
    """A bundle that scores table rows, or a one-line ConfigError; `vaeguard serve` checks before
    serving, and each run again.

    Landed files are tables (DEFAULT_PATTERNS) scored as tables: an image bundle failed every file
    on the table schema it lacks, was retried, and ended each run blaming the device or the disk."""
    modality = bundle.manifest.get("modality", "table")
    if modality != "table":
        kind = "images" if modality == "image" else f"{modality!r} inputs"
        raise ConfigError(f"bundle {bundle.name} ({bundle.path}) scores {kind}; landing folders are scored with a "
                          f"table bundle (their {', '.join(DEFAULT_PATTERNS)} files are tables): serve a bundle "
                          f"trained on a table, or score a folder of images with `vaeguard score {bundle.path} "
                          f"FOLDER --output scores.parquet`")


def check_output_folder(out_dir: Path) -> None:
    """A folder this user can write, or one it can create; else a one-line ConfigError.

    Either failed every run with a traceback (mkdir or the run lock's OSError), scoring nothing."""
    out = Path(out_dir).resolve()
    existing = next(folder for folder in (out, *out.parents) if folder.exists())
    if not existing.is_dir():
        where = "is a file" if existing == out else f"can't be created: {existing} is a file"
        raise ConfigError(f"output folder {out_dir} {where}, not a folder; --output takes a folder (created if "
                          f"missing) for the scores, ledger, quarantine and run reports")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is not writable" if existing == out else f"can't be created: {existing} is not writable"
        raise ConfigError(f"output folder {out_dir} {where} by this user (uid {os.geteuid()}); make it writable "
                          f"(on Linux `lsattr -d` shows an immutable folder) or give another --output")


def claimed_landing(out_dir: Path) -> Path | None:
    """The landing folder that OUT_DIR serves (its OUT_DIR/landing.json), or None before its first run."""
    path = Path(out_dir) / CLAIM_NAME
    try:
        claim = json.loads(path.read_text())
        return Path(claim["watch"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{path}: expected {{\"watch\": \"/the/landing/folder\"}}, the landing folder this output "
                          f"folder serves, but it can't be read ({one_line(exc)}); fix it, or delete it if this output "
                          f"folder serves one landing folder only") from None


def claim_output(out_dir: Path, landing_dir: Path) -> bool:
    """Tie OUT_DIR to the landing folder on its first run or serve (OUT_DIR/landing.json); refuse
    another after. True when this call wrote the claim.

    The ledger keys a file by its path inside the landing folder: two landing folders scored
    into one output folder each with a day.csv were one key, so the second was never scored,
    and their runs shared one lock, scores folder and quarantine. Keying by the landing folder
    too would not part the rest, so one output folder serves one landing folder, whatever the
    bundle (a new bundle version for the same folder goes on with its ledger). Call it holding
    the run lock: two runs claiming at once would both find the folder free.
    """
    landing = Path(landing_dir).resolve()
    claimed = claimed_landing(out_dir)
    if claimed is None:
        write_atomic(Path(out_dir) / CLAIM_NAME, json.dumps({"watch": str(landing), "claimed_at": utc_now()}) + "\n")
        return True
    if claimed != landing:
        raise _claimed_by(out_dir, claimed, landing_dir)
    return False


@contextmanager
def output_claimed(out_dir: Path, landing_dir: Path, wait: float = CLAIM_WAIT_SECONDS) -> Iterator[None]:
    """OUT_DIR claimed for the landing folder (claim_output, under the run lock) while the block
    runs: `vaeguard serve` from its start-up checks to its stop.

    The first run claimed it, and only then: a second serve of another landing folder into the same
    output folder, started before that run, passed every start-up check, and each of its runs failed.
    On the way out, a claim this wrote is taken back, with the lock file and folders it made, where
    no run wrote anything beside them: a serve refused or stopped before any run leaves the output
    folder as it found it. A claim that was there (a serve restarted on its landing folder) stays.
    """
    out, landing = Path(out_dir), Path(landing_dir).resolve()
    made, lock_made, wrote = [], False, False
    try:
        try:
            made = make_parents(out / LOCK_NAME)
            lock_made = not (out / LOCK_NAME).exists()
            wrote = _claim_when_free(out, landing, wait)
        except OSError as exc:  # check_folders found it writable: it changed since, or the disk is full
            raise ConfigError(f"output folder {out_dir} can't be written ({one_line(exc)}); expected a folder this "
                              f"user can write: fix its permissions or free space, or give another --output") from None
        yield
    finally:
        with signals_held():  # a stop signal must not leave the claim gone and its folder there
            _take_back(out, wrote, lock_made, made)


def _claim_when_free(out: Path, landing: Path, wait: float) -> bool:
    """claim_output under the run lock; where a run holds the lock, its claim is judged instead."""
    deadline = time.monotonic() + wait
    while True:
        with run_lock(out) as acquired:
            if acquired:
                return claim_output(out, landing)
        # A run claims right after it takes the lock: its claim is there, or is within moments.
        claimed = claimed_landing(out)
        if claimed is not None or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if claimed is not None and claimed != landing:
        raise _claimed_by(out, claimed, landing)
    return False


def _take_back(out: Path, claim: bool, lock: bool, made: list[Path]) -> None:
    """Remove the claim (``claim``), the lock file (``lock``) and the folders (``made``) that
    output_claimed made, unless a run wrote into the output folder meanwhile."""
    if not (claim or lock or made):
        return
    try:
        with run_lock(out) as acquired:
            if not acquired or set(os.listdir(out)) - {CLAIM_NAME, LOCK_NAME}:
                return  # a run is in it, or left its ledger, scores or report: they are keyed by the claim
            if claim:
                (out / CLAIM_NAME).unlink(missing_ok=True)
            if lock:
                (out / LOCK_NAME).unlink(missing_ok=True)
        remove_empty_folders(made)
    except OSError as exc:  # what is left says nothing wrong: a later serve of the same folder goes on with it
        log.debug("could not remove the claim of %s (%s)", out, one_line(exc))


def _claimed_by(out_dir: Path, claimed: Path, landing_dir: Path) -> ConfigError:
    return ConfigError(f"output folder {out_dir} serves the landing folder {text_path(str(claimed))}, not "
                       f"{landing_dir}: its ledger keys files by their path inside the landing folder, so a file "
                       f"with the same name in both would be scored once; give each landing folder its own --output "
                       f"(and its own --name), or, if the landing folder moved, delete "
                       f"{Path(out_dir) / CLAIM_NAME}")
