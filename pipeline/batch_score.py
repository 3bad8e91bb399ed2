"""Batch scoring of CSV / Parquet files through a bundle's scorer.onnx.

Files are streamed in chunks, so memory stays bounded whatever their size; a reader thread
parses the next chunk while the current one is scored (parsing, not the model, is the slow
part). Output goes to a temporary file beside the target and is renamed into place, with its
summary, only when every input has been scored and the summary written, so a failed run leaves
no partial output and never replaces an existing one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline.bundle import Bundle
from pipeline.calibrate import stored_fpr_range
from pipeline.config import ScoreJob, show_progress
from pipeline.cores import resolve_threads
from pipeline.contract import OUTPUT_NAMES
from pipeline.errors import ConfigError, DataError, EmptyInputError
from pipeline.metrics import auprc, auroc
from pipeline.outputs import OutputWriter, StagedOutputs, check_scores_target, stage_report_removal, summary_path
from pipeline.runtime import BundleScorer, shared_scorer
from pipeline.schema import check_id_names, scored_labels
from pipeline.signals import join_thread, queue_get, queue_put, raise_deferred, signals_deferred
from pipeline.tables import estimate_rows, headerless_hint, iter_batches, read_columns
from pipeline.unseen import (MissingCounts, UnseenCounts, file_entries, missing_entries, missing_file_entries, percent,
                             training_missing_shares, unseen_entries, warn_unseen)

log = logging.getLogger("vaeguard")


@dataclass
class FileSummary:
    input: str
    rows: int = 0
    anomalies: int = 0
    target_fpr: float = 0.0
    skipped: int = 0  # image inputs: this input's unreadable files
    auroc: float | None = None  # only when this input carries the bundle's label column, both classes
    seconds: float = 0.0
    # This input's own rows, unseen rows and share per categorical column (unseen.file_entries).
    unseen_categories: dict[str, dict] = field(default_factory=dict)
    # This input's own rows, blank rows and share per numeric column (unseen.missing_file_entries).
    missing_numeric: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The summary's entry for this input: the fields and rounding of the scoring flow's entries
        (flows.score.combine_summaries), so that a plain run's summary and a Dask run's read alike."""
        return {"input": self.input, "rows": self.rows, "anomalies": self.anomalies,
                "anomaly_rate": round(self.anomalies / self.rows, 6) if self.rows else 0.0,
                "target_fpr": self.target_fpr, "skipped": self.skipped,
                "auroc": None if self.auroc is None else round(self.auroc, 4),
                "rows_per_second": round(self.rows / self.seconds) if self.seconds else 0,
                "unseen_categories": self.unseen_categories, "missing_numeric": self.missing_numeric}


@dataclass
class ScoreSummary:
    bundle: str
    output: str
    device: str
    target_fpr: float
    expected_fpr: float
    fpr_range: str  # where this bundle's own rate lies, given its calibration size
    rows: int = 0
    anomalies: int = 0
    seconds: float = 0.0
    files: list[FileSummary] = field(default_factory=list)
    auroc: float | None = None  # only when the input carries the bundle's label column
    auprc: float | None = None
    skipped: int = 0  # image inputs: unreadable files, listed in <output>.errors.csv
    # Per categorical column, the rows its unknown bucket took and the warning, if any (unseen_entries).
    unseen_categories: dict[str, dict] = field(default_factory=dict)
    # Per numeric column, the blank rows (given training's median) and the warning, if any (missing_entries).
    missing_numeric: dict[str, dict] = field(default_factory=dict)

    @property
    def anomaly_rate(self) -> float:
        return self.anomalies / self.rows if self.rows else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "files": [f.to_dict() for f in self.files], "anomaly_rate": self.anomaly_rate,
                "rows_per_second": self.rows / self.seconds if self.seconds else None}

    def describe(self) -> str:
        text = (f"{self.rows:,} rows, {self.anomalies:,} anomalies: observed rate {self.anomaly_rate:.4%} "
                f"against target FPR {self.target_fpr:.4%} (expected {self.expected_fpr:.4%} on normal data; "
                f"{self.fpr_range})")
        if self.skipped:
            text += f"; {self.skipped:,} unreadable image(s) skipped"
        if self.auroc is not None:
            text += f"; AUROC {self.auroc:.4f}, AUPRC {self.auprc:.4f} on the label column"
        warned = [f"{name!r} ({percent(entry['share'])} of rows)"
                  for name, entry in self.unseen_categories.items() if entry["warning"]]
        if warned:
            text += f"; values the bundle never saw in {', '.join(warned)}: see the warning"
        blank = [f"{name!r} ({percent(entry['share'])} of rows)"
                 for name, entry in self.missing_numeric.items() if entry["warning"]]
        if blank:
            text += f"; far more blanks than in training in {', '.join(blank)}: see the warning"
        return text


def required_columns(bundle: Bundle, path: Path, warn: bool = True) -> tuple[list[str], bool]:
    """Check an input's header: missing columns fail, extra ones are ignored with a warning.

    ``warn=False`` for a check ahead of a task that scores the file, and so warns, itself.
    """
    schema = bundle.schema
    needed = list(schema.id_columns) + list(schema.feature_columns)
    columns = read_columns(path, used=[*needed, *([schema.label_column] if schema.label_column else [])])
    missing = [c for c in needed if c not in columns]
    if missing:
        # 'pressure ' against 'pressure', or 'Pressure': hard to see in a list of names, so named.
        alike = {c.strip().casefold(): c for c in columns}
        near = [f"{alike[c.strip().casefold()]!r} for {c!r}" for c in missing if c.strip().casefold() in alike]
        raise DataError(
            f"{path}: missing column(s) [{first_of([repr(c) for c in missing])}] that bundle {bundle.name!r} was "
            f"trained on"
            + (f" (the file has {first_of(near)}, which differ in case or spaces: rename them)" if near else "")
            + headerless_hint(columns)
            + "; add them (empty values are allowed) or score with a bundle trained on these columns"
        )
    has_label = bool(schema.label_column) and schema.label_column in columns
    extra = [(position, c) for position, c in enumerate(columns, start=1)
             if c not in needed and c != schema.label_column]
    if extra and warn:
        # Quoted, as a name may be blank or end in a space; a pandas index written by to_csv() has no name.
        shown = [repr(c) if c else f"column {position} (no name)" for position, c in extra]
        log.warning("%s: ignoring %d column(s) the bundle does not use: %s", path, len(extra), first_of(shown))
    return needed, has_label


def first_of(items: list[str], shown: int = 10) -> str:
    """The first ``shown`` items, and how many more: a 2,000-column table renamed made a 57 KB line."""
    more = f" and {len(items) - shown:,} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


# How long a stopped run waits for the reader thread to leave pyarrow: a chunk parses in milliseconds.
READER_STOP_SECONDS = 10.0


@contextlib.contextmanager
def _prefetch(batches: Iterator[pa.RecordBatch], depth: int = 2) -> Iterator[Iterator[pa.RecordBatch]]:
    """Parse ahead in a thread; pyarrow releases the GIL, so parsing overlaps scoring.

    The thread has ended when the block does, whatever ended it: left parsing while a stopped
    run removed its files and the process exited, it crashed the process."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    done, gone = object(), object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                if not queue_put(slots, batch, lambda: not stop.is_set()):
                    return
            queue_put(slots, done, lambda: not stop.is_set())
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            queue_put(slots, exc, lambda: not stop.is_set())
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # its open file, here where it is read, not in whichever thread collects it

    def consume() -> Iterator[pa.RecordBatch]:
        while True:
            item = queue_get(slots, worker.is_alive, gone=gone)
            if item is done:
                return
            if item is gone:
                raise RuntimeError("the reader thread ended without a reason")  # not expected: produce says why
            if isinstance(item, BaseException):
                raise item
            yield item

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        yield consume()
    finally:
        stop.set()
        if not join_thread(worker, READER_STOP_SECONDS):
            log.warning("the reader thread did not stop within %.0f s (a stalled input?)", READER_STOP_SECONDS)


def _result_table(batch: pa.RecordBatch, id_columns: list[str], outputs: dict[str, np.ndarray],
                  source: str | None) -> pa.Table:
    columns, names = [], []
    if source is not None:
        columns.append(pa.array(np.full(batch.num_rows, source, dtype=object), pa.string()))
        names.append("source")
    for name in id_columns:
        columns.append(batch.column(name))
        names.append(name)
    for name in OUTPUT_NAMES:
        columns.append(pa.array(outputs[name]))
        names.append(name)
    return pa.Table.from_arrays(columns, names=names)


def file_scoring_threads(threads: int | None) -> int:
    """onnxruntime threads for file scoring: unless told, one core fewer than in-memory scoring.

    pyarrow parses the next chunk in the reader thread meanwhile (about one core: 1.1 cores for
    a CSV here), and onnxruntime's threads contending with it cost more than they give: on 2
    cores, 1 thread scored a 1M-row CSV end to end at 1.51 M rows/s, 2 threads at 1.27 M.
    """
    return threads if threads and threads > 0 else max(1, resolve_threads(None) - 1)


def score_files(job: ScoreJob, scorer: BundleScorer | None = None, warn: bool = True) -> ScoreSummary:
    """Score every input into one output file (with a ``source`` column when several).

    ``warn=False`` leaves the warnings on unseen categories and blank numeric columns to a caller
    that adds up several runs' counts (the scoring flow), so that each column warns once."""
    if job.batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive number of rows, got {job.batch_size}")
    staged = StagedOutputs()
    writer = OutputWriter(job.output, into=staged)  # validates the output extension before any work
    stage_report_removal(staged, job.output)
    check_scores_target(job.output, job.inputs, job.bundle)
    # Inputs are checked before the session is built, so a bad path fails with its own error
    # alone, not after a device warning.
    bundle = scorer.bundle if scorer else Bundle.load(job.bundle)
    check_id_names(bundle.schema.id_columns, str(bundle.path), several_inputs=len(job.inputs) > 1, bundle=bundle.name)
    checked = [(Path(p), *required_columns(bundle, Path(p))) for p in job.inputs]
    scorer = scorer or shared_scorer(bundle, job.device, file_scoring_threads(job.threads), job.precision)
    bundle = scorer.bundle
    schema = bundle.schema
    calibration = bundle.calibration_for(scorer.precision)
    summary = ScoreSummary(bundle=str(bundle.path), output=str(job.output), device=scorer.device,
                           target_fpr=calibration["target_fpr"], expected_fpr=calibration["expected_fpr"],
                           fpr_range=stored_fpr_range(calibration))
    labels, scores = [], []
    unseen: dict[str, UnseenCounts] = {}
    per_file: list[tuple[str, dict[str, UnseenCounts]]] = []
    missing: dict[str, MissingCounts] = {}
    missing_per_file: list[tuple[str, dict[str, MissingCounts]]] = []
    started = time.perf_counter()
    show = show_progress()
    total = sum(estimate_rows(path) or 0 for path, _, _ in checked) if show else None
    progress = tqdm(total=total or None, unit="rows", unit_scale=True, desc="scoring", disable=not show, leave=False)
    # The scores and their summary become real together, or the earlier ones stay as they were
    # (StagedOutputs): a failed summary must not leave new scores beside the old summary. An earlier
    # report goes in the same commit, so a --report that fails or is stopped after it leaves none. Ctrl-C
    # and SIGTERM stop the run between two chunks or while it waits for one, never inside a
    # hand-over between threads or inside onnxruntime (pipeline.signals).
    with staged, signals_deferred():
        with progress, writer:
            for path, _, has_label in checked:
                file_summary = FileSummary(str(path), target_fpr=summary.target_fpr)
                file_started, file_labels = time.perf_counter(), len(labels)
                file_unseen: dict[str, UnseenCounts] = {}
                file_missing: dict[str, MissingCounts] = {}
                text = list(schema.categorical) + ([schema.label_column] if has_label else [])
                source = str(path) if len(checked) > 1 else None
                batches = iter_batches(path, list(schema.numeric), text, list(schema.id_columns), job.batch_size)
                with _prefetch(batches) as chunks:
                    for batch in chunks:
                        raise_deferred()
                        if has_label:
                            labels.append(scored_labels(batch.column(schema.label_column), schema.label_column,
                                                        str(path), file_summary.rows))
                        outputs = scorer.score_batch(batch, str(path), row_offset=file_summary.rows,
                                                     unseen=file_unseen, missing=file_missing)
                        writer.write(_result_table(batch, list(schema.id_columns), outputs, source))
                        file_summary.rows += batch.num_rows
                        file_summary.anomalies += int(outputs["is_anomaly"].sum())
                        if has_label:
                            scores.append(outputs["score"])
                        progress.update(batch.num_rows)
                file_summary.seconds = time.perf_counter() - file_started
                if len(labels) > file_labels:
                    file_summary.auroc, _ = label_metrics_of(np.concatenate(labels[file_labels:]),
                                                             np.concatenate(scores[file_labels:]))
                file_summary.unseen_categories = file_entries(bundle.preprocessor.categorical, file_unseen)
                for name, tally in file_unseen.items():
                    unseen.setdefault(name, UnseenCounts()).add(tally)
                    tally.examples.clear()  # the run's counts have them; a file's warning names it by its counts
                per_file.append((str(path), file_unseen))
                file_summary.missing_numeric = missing_file_entries(bundle.preprocessor.numeric, file_missing)
                for name, tally in file_missing.items():
                    missing.setdefault(name, MissingCounts()).add(tally)
                missing_per_file.append((str(path), file_missing))
                summary.files.append(file_summary)
                summary.rows += file_summary.rows
                summary.anomalies += file_summary.anomalies
            if summary.rows == 0:
                raise EmptyInputError(f"{', '.join(map(str, job.inputs))}: no data rows to score; "
                                      f"expected at least one row")
            summary.seconds = time.perf_counter() - started
            where = f"{checked[0][0]}: " if len(checked) == 1 else ""
            summary.unseen_categories = unseen_entries(bundle.preprocessor.categorical, unseen, where, per_file)
            summary.missing_numeric = missing_entries(bundle.preprocessor.numeric, training_missing_shares(bundle),
                                                      missing, where, missing_per_file)
            if labels:
                # Needs every labelled row's score in memory (12 bytes a row), unlike the scoring itself.
                summary.auroc, summary.auprc = label_metrics_of(np.concatenate(labels), np.concatenate(scores))
        staged.text(summary_path(job.output), json.dumps(summary.to_dict(), indent=2, allow_nan=False))
        if warn:  # before the commit, after which a signal is one after the output was written
            warn_unseen(summary.unseen_categories, summary.missing_numeric)
        raise_deferred()  # one that came before the commit stops the run with no output
        staged.commit()
    return summary


def label_metrics_of(labels: np.ndarray, scores: np.ndarray) -> tuple[float | None, float | None]:
    """AUROC and AUPRC of a run's scores against its labels (0.0/1.0, NaN where a row has none):
    unlabelled rows left out, and None unless both classes occur."""
    known = ~np.isnan(labels)
    if len(np.unique(labels[known])) != 2:
        return None, None
    return auroc(labels[known], scores[known]), auprc(labels[known], scores[known])


def read_score_column(paths: list[Path]) -> np.ndarray:
    """The ``score`` column of scored files, for drift statistics over a run."""
    parts = [pq.read_table(p, columns=["score"]).column("score").to_numpy() for p in paths]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
