"""Writing results so that a failed run leaves nothing behind and replaces nothing.

Every output goes to a hidden temporary file beside its target and is renamed into place only
when complete: readers never see half a file, and an existing file survives a failed run. The
files of one run (scores, their summary, an errors file, anomaly maps) are renamed together, and an
earlier run's files that would describe other data beside them (an errors file, a scoring report)
removed in the same step (StagedOutputs).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import queue
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import ConfigError, DataError
from pipeline.signals import join_thread, queue_get, queue_put, signals_deferred, signals_held


# Parquet dictionary-encodes only the columns with few distinct values. Tried on every column
# (pyarrow's default) it builds a dictionary for each unique id and score before giving up:
# writing 1M scored rows took 0.24 CPU-s that way and 0.06 like this, and the file is smaller.
DICTIONARY_COLUMNS = ("source", "p_value")  # booleans are bit-packed anyway

# Scored chunks are small (a CSV block is about 6,800 rows), and each write_table call makes a
# row group: 147 of them for 1M rows, each with its own page headers and statistics. Gathering
# chunks into row groups of this many rows took writing 1M scored rows from 0.09 to 0.06 CPU-s,
# and readers filter on fewer, larger statistics. About 7 MB of results wait at most.
ROW_GROUP_ROWS = 1 << 17

log = logging.getLogger("vaeguard")


def parquet_writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    return pq.ParquetWriter(path, schema, use_dictionary=[c for c in DICTIONARY_COLUMNS if c in schema.names])


def temp_path(target: Path) -> Path:
    """A hidden name beside ``target`` for it to be written under until it is complete."""
    return target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """Which file ``path`` names now (None: none): a file renamed into place there is another one."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino, status.st_mtime_ns


def summary_path(output: Path) -> Path:
    return output.with_name(output.stem + ".summary.json")


def report_path(output: Path) -> Path:
    """<output stem>.report.html beside the scores, like the summary: nightly runs writing into one
    folder keep one report each (a shared report.html kept only the last run's)."""
    return output.with_name(output.stem + ".report.html")


def figures_dir(page: Path) -> Path:
    """The folder of a report page's PNGs: ``<stem>_files/`` beside it."""
    return page.parent / f"{page.stem}_files"


# The PNGs a scoring report writes into its figures folder (pipeline.report_html names each figure
# by its title), and so the only files a later run's commit removes from there.
SCORING_REPORT_FIGURES = frozenset({"scores_against_calibration.png", "feature_contributions.png", "top_images.png"})


def output_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    raise ConfigError(f"--output {path}: unsupported extension {suffix or '(none)'!r}; use .parquet or .csv")


def check_output_location(path: Path) -> None:
    """Fail before any work when ``path`` can't become the output file.

    Otherwise every input was scored first and the final rename failed. A parent folder that
    does not exist yet is fine: the writer creates it.
    """
    check_location(path, "--output", "file")


def check_location(path: Path, option: str, kind: str) -> None:
    """Fail, naming ``option``, when ``path`` can't become a ``kind`` ("file" or "directory"): the
    other kind is there already, or a file sits where one of its folders would have to be."""
    other = "directory" if kind == "file" else "file"
    if path.exists() and path.is_dir() != (kind == "directory"):
        raise ConfigError(f"{option} {path}: is an existing {other}; expected a path for a {kind}, or move "
                          f"that {other} away")
    blocking = file_above(path)
    if blocking is not None:
        raise ConfigError(f"{option} {path}: {blocking} is a file, not a directory; write into a directory, "
                          f"or move that file away")
    check_writable(path if kind == "directory" and path.is_dir() else next(p for p in path.parents if p.exists()),
                   path, option)


def check_writable(folder: Path, path: Path, option: str) -> None:
    """Fail when ``folder``, where ``path`` (or the folders above it) would be made, refuses new files.

    Found only when the first chunk was written, it was "unexpected PermissionError" naming a hidden
    temporary file, after the inputs were opened and the model loaded. An unnamed temporary file
    (O_TMPFILE, which leaves no trace) asks the file system itself: permission bits, a read-only
    mount, an immutable folder, which os.access does not see for root.
    """
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot write into {folder} ({exc.strerror or exc}); choose a folder "
                          f"you can write into, or change that one's permissions") from None


def check_scores_target(output: Path, inputs: Iterable[Path | str], bundle: Path) -> None:
    """Every check a scoring run makes of its --output before any work: file scoring, image
    scoring and the scoring flow share it."""
    check_utf8_path(output, "--output")
    check_utf8_path(bundle, "bundle")
    output_format(output)  # first: the other checks' advice is moot for a file that can't be written
    check_output_location(output)
    check_not_an_input(output, inputs)
    check_summary_not_anothers(output)
    check_outside_bundle(output, bundle, "--output")
    check_inputs_distinct(inputs)


def check_summary_not_anothers(output: Path) -> None:
    """Refuse an output whose summary (and errors file and report, named alike) belong to other
    scores that are still there: ``s.csv`` and ``s.parquet`` share ``s.summary.json``, so scoring
    one after the other left the first file's scores with the second run's summary."""
    summary = summary_path(output)
    try:
        recorded = json.loads(summary.read_text(encoding="utf-8")).get("output")
    except (OSError, ValueError, AttributeError):
        return  # no summary, or not one of ours: nothing that a run's summary describes
    if not isinstance(recorded, str):
        return
    owner = output.with_name(Path(recorded).name)  # recorded as given, relative to where that run started
    if owner.name != output.name and owner.exists():
        raise ConfigError(f"--output {output}: its summary {summary} is that of the scores {owner}, which share "
                          f"its name up to the extension, and this run would replace it; choose another output "
                          f"name, or remove {owner} first")


def check_inputs_distinct(inputs: Iterable[Path | str]) -> None:
    """Refuse an input given twice (``data/*.csv data/today.csv``, or a link to it): its rows
    were scored twice, and the summary's counts and anomaly rate counted them twice."""
    seen: dict[object, Path] = {}
    for source in map(Path, inputs):
        # As same_file judges, in one pass: thousands of inputs are common in nightly folders.
        try:
            status = os.stat(source)
            keys = [os.path.realpath(source), (status.st_dev, status.st_ino)]
        except OSError:
            keys = [os.path.realpath(source)]  # missing: scoring names it
        earlier = next((seen[k] for k in keys if k in seen), None)
        if earlier is not None:
            shown = f"{source}" if str(source) == str(earlier) else f"{source} and {earlier}, the same file"
            raise ConfigError(f"{shown}: given twice as an input, so its rows would be scored and counted twice; "
                              f"give each input once")
        seen.update(dict.fromkeys(keys, source))


def check_utf8_path(path: Path | str, what: str, error: type[Exception] = ConfigError) -> None:
    """Refuse, before any work, a path that is not UTF-8 text (a Latin-1 folder name on Linux).

    pyarrow and onnxruntime take paths as UTF-8 only: such a path failed deep inside them, after
    the scoring work, with a bare UnicodeEncodeError, and the CLI could not even print it back.
    """
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = os.fsencode(path)
        raise error(f"{what} {raw.decode('utf-8', 'backslashreplace')}: the path is not UTF-8 text (byte "
                    f"{raw[exc.start:exc.start + 1]!r} at position {exc.start + 1}), and pyarrow and onnxruntime "
                    f"open UTF-8 paths only; rename that file or folder to a UTF-8 name") from None


def check_outside_bundle(path: Path, bundle: Path, option: str) -> None:
    """Refuse, before any work, an output inside the bundle folder.

    A file there that the manifest lists (``--output B/scorer.onnx``) would break the bundle's
    hashes, and anything else would be lost when retraining replaces the folder whole.
    """
    root = os.path.realpath(bundle)
    if os.path.commonpath([os.path.realpath(path), root]) == root:
        raise ConfigError(f"{option} {path}: is inside the bundle {bundle}, which a retrain replaces whole and "
                          f"whose files are hash-checked; write it outside the bundle folder")


def file_above(path: Path) -> Path | None:
    """The nearest existing path above ``path`` when it is a file, so nothing can be created there; else None."""
    existing = next((p for p in path.parents if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def missing_parents(path: Path) -> list[Path]:
    """The folders above ``path`` that do not exist yet, deepest first.

    A failed run hands them to ``remove_empty_folders``: an output folder the user never had must
    not be left behind, empty, by a run that wrote nothing into it.
    """
    return list(itertools.takewhile(lambda p: not p.exists(), path.parents))


def make_parents(path: Path) -> list[Path]:
    """Create the missing folders above ``path``; returns those it created, deepest first."""
    missing = missing_parents(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty; one that holds anything stays, with those above it."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):  # symbolic links and '..' resolved, existing or not
        return True
    try:
        return os.path.samefile(a, b)  # hard links, and other names of one file the paths don't show
    except OSError:
        return False  # one of them does not exist (yet): not the same file


def check_not_an_input(output: Path, inputs: Iterable[Path | str]) -> None:
    """Refuse, before any work, an output or summary file that is one of the inputs.

    Outputs replace their target at the end of a run, so ``score x.csv -o x.csv`` succeeded and
    left the scores where the user's data had been.
    """
    for source in map(Path, inputs):
        if same_file(output, source):
            raise ConfigError(f"--output {output}: is the input {source}, which the scores would replace; "
                              f"write the scores to another file")
        if same_file(summary_path(output), source):
            raise ConfigError(f"--output {output}: its summary {summary_path(output)} is the input {source}, "
                              f"which the summary would replace; choose another output name")


class StagedOutputs:
    """The files of one run, made real together.

    Each is written first under a hidden name beside its target (``temp_for``, ``text``, an
    OutputWriter handed this), and ``commit`` renames them into place in the order they came, in
    one short block that holds Ctrl-C and SIGTERM (pipeline.signals); files of an earlier run that
    would mislead beside them (``remove``) go in the same block. Until then no target is touched: a
    run that fails or is stopped before the commit (a full disk as the summary is written) leaves
    the earlier scores, summary, errors file, report and maps as they were. As a context manager, a
    block that fails before the commit removes the temporary files and the folders made for them.
    The commit first checks that no target is a folder (one made meanwhile, or a user's folder named
    like a map), which would fail its rename after the files before it were replaced; it fails
    then with nothing changed. After that only a rename the file system refuses can fail (a folder
    made read-only meanwhile): those before it stay done, and the rest are removed.
    """

    def __init__(self) -> None:
        # (temporary file, target, owned): a temporary file is renamed to its target; None: the target
        # goes, a file, or with ``owned`` a folder of which only the files ``owned`` names go.
        self._steps: list[tuple[Path | None, Path, Callable[[str], bool] | None]] = []
        self._folders: list[Path] = []
        self.committed = False

    def __enter__(self) -> "StagedOutputs":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None and not self.committed:
            self.discard()

    def temp_for(self, target: Path) -> Path:
        """The name to write ``target`` under until the commit."""
        temp = temp_path(target)
        self._steps.append((temp, target, None))
        return temp

    def text(self, target: Path, text: str) -> None:
        self.temp_for(target).write_text(text)

    def add(self, temp: Path, target: Path, folders: Iterable[Path] = ()) -> None:
        """``temp``, written already, becomes ``target``; ``folders`` were made for it (removed if it is discarded)."""
        self._steps.append((temp, target, None))
        self._folders.extend(folders)

    def remove(self, target: Path, owned: Callable[[str], bool] | None = None) -> None:
        """``target`` goes at the commit: a file of an earlier run that would mislead beside this one's.

        With ``owned``, ``target`` is a folder an earlier run wrote files into: the files whose names
        ``owned`` accepts go, and the folder once nothing else is in it (a file of the user's stays,
        and the folder with it). A folder where a file was, or a link where a folder was, is not the
        earlier run's: it stays."""
        self._steps.append((None, target, owned))

    def commit(self) -> None:
        with signals_held():
            for temp, target, _ in self._steps:
                if temp is not None and target.is_dir() and not target.is_symlink():  # a link is replaced
                    raise ConfigError(f"{target}: is a folder, where this run puts a file; nothing was replaced, "
                                      f"and the earlier output stays; move that folder away and run again")
            for temp, target, owned in self._steps:
                if temp is not None:
                    os.replace(temp, target)
                elif owned is not None:
                    remove_owned_files(target, owned)
                elif target.is_symlink() or not target.is_dir():
                    target.unlink(missing_ok=True)
            self.committed = True

    def discard(self) -> None:
        with signals_deferred():  # a second Ctrl-C must not leave some of the temporary files behind
            for temp, _, _ in self._steps:
                if temp is not None:
                    temp.unlink(missing_ok=True)
            remove_empty_folders(self._folders)


def remove_owned_files(folder: Path, owned: Callable[[str], bool]) -> None:
    """The files in ``folder`` whose names ``owned`` accepts, then ``folder`` if that left it empty.

    A file that can't be removed stays, and the commit goes on: a report's PNG left without its
    page describes nothing. A link to a folder is not followed: what it points at is not the run's."""
    if folder.is_symlink() or not folder.is_dir():
        return
    with os.scandir(folder) as entries:
        doomed = [entry.path for entry in entries if owned(entry.name) and not entry.is_dir(follow_symlinks=False)]
    for path in doomed:
        with contextlib.suppress(OSError):
            os.unlink(path)
    remove_empty_folders([folder])


def stage_report_removal(staged: StagedOutputs, output: Path) -> None:
    """An earlier run's scoring report beside ``output`` goes in the commit of this run's scores: it
    names that file and describes other data. A run with --report writes its own after the commit,
    so one that fails or is stopped then leaves no report rather than the earlier one.

    Called before the run's files are staged, so that these steps come first in the commit, the
    figures before the page: if the page can't be removed the commit fails before anything else
    changed (the earlier scores keep their page, maybe without some figures), not halfway."""
    page = report_path(output)
    staged.remove(figures_dir(page), owned=SCORING_REPORT_FIGURES.__contains__)
    staged.remove(page)


class OutputWriter:
    """Writes result chunks to a hidden temp file; ``commit`` renames it into place, or hands it
    to ``into`` (StagedOutputs) to be renamed with the run's other files.

    Chunks are written by a background thread (Parquet and CSV encoding release the GIL), so
    writing the output overlaps scoring the next chunk; at most a few chunks wait in between.
    As a context manager it commits when the block succeeds and removes the temp file when it
    raises, so callers can't forget either. The hand-over between the threads takes Ctrl-C and
    SIGTERM only where that is safe (pipeline.signals), and a failed or stopped run ends the
    writer thread before its file is removed: left running, it was still inside pyarrow as
    the process exited, which crashed it.
    """

    _DONE = object()

    # How long a stopped run waits for the writer thread to leave pyarrow: a row group takes
    # milliseconds; only a stalled disk takes longer, and the run must end all the same.
    STOP_SECONDS = 10.0

    def __init__(self, target: Path, depth: int = 2, into: StagedOutputs | None = None):
        self.target = target
        self.format = output_format(target)
        check_output_location(target)
        self.temp = temp_path(target)
        self._into = into
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None
        self._abandoned = threading.Event()  # stop at once: the output is not wanted any more
        self._error: BaseException | None = None
        self._created: list[Path] = []  # folders this writer made, removed again if it fails

    def __enter__(self) -> "OutputWriter":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()

    def write(self, table: pa.Table) -> None:
        self._raise_writer_error()
        if self._thread is None:
            self._created = make_parents(self.target)
            self._thread = threading.Thread(target=self._drain, args=(table.schema,), daemon=True)
            self._thread.start()
        if not queue_put(self._queue, table, self._thread.is_alive):
            self._raise_writer_error()  # it ended on an error, which it keeps for here

    def _drain(self, schema: pa.Schema) -> None:
        writer = None
        try:
            writer = parquet_writer(self.temp, schema) if self.format == "parquet" else pacsv.CSVWriter(self.temp, schema)
            waiting: list[pa.Table] = []
            while not self._abandoned.is_set():
                table = queue_get(self._queue, lambda: not self._abandoned.is_set(), gone=self._DONE)
                if self._abandoned.is_set():
                    return
                finished = table is self._DONE
                if not finished:
                    waiting.append(table)
                full = self.format == "csv" or sum(t.num_rows for t in waiting) >= ROW_GROUP_ROWS
                if waiting and (full or finished):
                    writer.write_table(pa.concat_tables(waiting))
                    waiting = []
                if finished:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller at its next call
            self._error = exc  # and the thread ends: the caller's next put finds it gone
        finally:
            if writer is not None:
                try:
                    writer.close()  # Parquet's footer: a full disk can show only here
                except BaseException as exc:  # noqa: BLE001 - as above
                    self._error = self._error or exc

    def _stop(self, abandon: bool) -> bool:
        """Ends the writer thread: once it has written every chunk, or (``abandon``) at once, waiting
        at most STOP_SECONDS then. False if it is still running."""
        if self._thread is None:
            return True
        if abandon:
            self._abandoned.set()
            return join_thread(self._thread, self.STOP_SECONDS)
        queue_put(self._queue, self._DONE, self._thread.is_alive)
        return join_thread(self._thread)

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            raise self._error

    def commit(self) -> None:
        if self._thread is None:
            raise DataError(f"nothing to write to {self.target}: the inputs had no rows")
        try:
            self._stop(abandon=False)
            self._raise_writer_error()
            if self._into is None:
                os.replace(self.temp, self.target)
        except BaseException:
            # The writer or the rename failed (target turned into a folder, disk full, interrupted):
            # the half-written temp file must not stay behind either way.
            self.abort()
            raise
        if self._into is not None:
            self._into.add(self.temp, self.target, self._created)

    def abort(self) -> None:
        with signals_deferred():  # a signal now must not leave the temp file behind
            stopped = self._stop(abandon=True)
            self.temp.unlink(missing_ok=True)
            remove_empty_folders(self._created)
        if not stopped:
            log.warning("%s: the writer thread did not stop within %.0f s (a stalled disk?); its temporary file "
                        "was removed all the same", self.target, self.STOP_SECONDS)


def write_atomic(path: Path, text: str) -> None:
    temp = temp_path(path)
    try:
        temp.write_text(text)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)  # a failed write leaves nothing, not a hidden temp file
        raise


def text_path(item: str) -> str:
    """``item`` as text that can be written anywhere: bytes of a file name that are not valid
    UTF-8 (kept by Python as lone surrogates, e.g. b"caf\\xe9.png") become "\\xe9" escapes.

    Without this, writing one such name to a table or CSV raised UnicodeEncodeError and failed
    the whole run.
    """
    try:
        return os.fsencode(item).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return item.encode("utf-8", "backslashreplace").decode("utf-8")  # surrogates fsencode can't take


def merge_scored_parts(parts: list[tuple[str, Path]], output: Path) -> int:
    """Concatenate per-file score parts (Parquet) into one output, atomically.

    Used when each input was scored by its own task; a ``source`` column names the input when
    there is more than one. Returns the number of rows written.
    """
    check_not_an_input(output, [source for source, _ in parts])
    rows = 0
    with OutputWriter(output) as writer:
        for source, part in parts:
            for batch in pq.ParquetFile(part).iter_batches():
                table = pa.Table.from_batches([batch])
                if len(parts) > 1:
                    # An image folder's name need not be UTF-8 (its rows' paths are escaped alike).
                    table = table.add_column(0, "source", pa.array([text_path(source)] * batch.num_rows, pa.string()))
                writer.write(table)
                rows += batch.num_rows
    return rows
